import subprocess
from pathlib import Path

import pytest

from intercom.config import load_settings, parse_settings, simulated_settings
from intercom.errors import ConfigError

from .conftest import INTERCOM

GOOD = """
[station]
id = "front-door"
state_dir = "/var/lib/intercom"

[[hardware.buttons]]
name = "bell-1a"
pin = 17
flat = "1A"

[[hardware.buttons]]
name = "bell-2b"
pin = 5
flat = "2B"

[hardware.relay]
pin = 27
door = "front"
pulse_s = 3
max_open_s = 10

[hardware.door_contact]
pin = 22
held_open_s = 30

[hardware.tamper]
pin = 23

[media.camera]
source = "v4l2"
device = "/dev/video0"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(text)
    return info.value.problems


def test_good_config_parses():
    settings = parse_settings(GOOD)
    assert settings.station.id == "front-door"
    assert [b.flat for b in settings.hardware.buttons] == ["1A", "2B"]
    assert settings.hardware.relay.max_open_s == 10
    assert settings.hardware.door_contact is not None
    assert settings.hardware.door_contact.held_open_s == 30
    assert settings.media.camera.device == "/dev/video0"
    assert settings.hardware.pin_factory == "lgpio"


def test_out_of_range_names_key_and_value():
    text = GOOD.replace("max_open_s = 10", "max_open_s = 90")
    assert problems(text) == ["hardware.relay.max_open_s: must be less than or equal to 30, got 90"]


def test_unknown_key_is_refused():
    text = GOOD.replace('door = "front"', 'door = "front"\nopen_forever = true')
    assert problems(text) == ["hardware.relay.open_forever: unknown key"]


def test_missing_key_is_named():
    text = GOOD.replace('id = "front-door"\n', "")
    assert problems(text) == ["station.id: required key is missing"]


def test_wrong_type_is_named():
    text = GOOD.replace("pin = 27", 'pin = "twenty-seven"')
    (line,) = problems(text)
    assert line.startswith("hardware.relay.pin: must be a valid integer")
    assert "'twenty-seven'" in line


def test_pin_outside_header_is_refused():
    (line,) = problems(GOOD.replace("pin = 23", "pin = 40"))
    assert line.startswith("hardware.tamper.pin: must be less than or equal to 27")


def test_busy_pin_names_both_users():
    (line,) = problems(GOOD.replace("pin = 23", "pin = 27"))
    assert line == "hardware.tamper.pin: pin 27 is already used by relay.pin"


def test_pulse_longer_than_maximum():
    (line,) = problems(GOOD.replace("pulse_s = 3", "pulse_s = 12"))
    assert line.startswith("hardware.relay: pulse_s (12.0) must not exceed max_open_s")


def test_camera_device_required():
    (line,) = problems(GOOD.replace('device = "/dev/video0"\n', ""))
    assert line == "media.camera.device: required when source is 'v4l2'"


def test_several_problems_one_line_each():
    text = GOOD.replace("max_open_s = 10", "max_open_s = 0").replace('flat = "2B"', "flat = 2")
    lines = problems(text)
    assert len(lines) == 2
    assert any(x.startswith("hardware.buttons[1].flat:") for x in lines)
    assert any(x.startswith("hardware.relay.max_open_s: must be greater than") for x in lines)


def test_bad_toml_names_line():
    (line,) = problems("[station\nid = 1")
    assert "not valid TOML" in line
    assert "line 1" in line


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.toml")
    assert "cannot read" in info.value.problems[0]


def test_simulated_settings_keep_wiring_and_use_mock(tmp_path: Path):
    base = parse_settings(GOOD)
    sim = simulated_settings(tmp_path, base)
    assert sim.hardware.pin_factory == "mock"
    assert sim.media.camera.source == "synthetic"
    assert sim.hardware.buttons == base.hardware.buttons
    assert sim.station.state_dir == tmp_path.resolve()
    assert sim.simulated


def test_check_config_cli(tmp_path: Path):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    ok = subprocess.run([*INTERCOM, "check-config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("max_open_s = 10", "max_open_s = 90"))
    res = subprocess.run([*INTERCOM, "check-config", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "intercom: config: hardware.relay.max_open_s: must be less than or equal to 30, got 90"
    )


def test_simulated_settings_keep_a_video_file_camera(tmp_path: Path):
    text = GOOD.replace(
        'source = "v4l2"\ndevice = "/dev/video0"',
        'source = "file"\ndevice = "door.mp4"\npassthrough = true',
    )
    sim = simulated_settings(tmp_path, parse_settings(text))
    assert sim.media.camera.source == "file"
    assert sim.media.camera.passthrough
    assert sim.media.audio.input == "synthetic"
