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


@pytest.mark.parametrize(("label", "reason"), [
    ('"Main\\nentrance"', "no control, format or line-break characters ('\\n')"),
    ('"Main \\u202eecnartne"', "no control, format or line-break characters ('\\u202e')"),
    ('" Main entrance"', "no space at the start or the end"),
    ('""', "must have at least 1 character"),
    (f'"{"x" * 41}"', "must have at most 40 characters"),
])
def test_a_label_for_residents_is_plain_short_text(label: str, reason: str):
    text = GOOD.replace('flat = "1A"', f'flat = "1A"\nlabel = {label}')
    [problem] = problems(text)
    assert f"hardware.buttons[0].label: {reason}" in problem, problem


def test_a_label_for_residents_may_be_any_language():
    text = GOOD.replace('flat = "1A"', 'flat = "1A"\nlabel = "Entrée, côté jardin"')
    assert parse_settings(text).hardware.buttons[0].label == "Entrée, côté jardin"
    assert parse_settings(GOOD).hardware.buttons[1].label is None


def test_out_of_range_names_key_and_value():
    text = GOOD.replace("max_open_s = 10", "max_open_s = 90")
    assert problems(text) == ["line 20: hardware.relay.max_open_s: must be at most 30, got 90"]


def test_unknown_key_is_refused_listing_the_known_ones():
    text = GOOD.replace('door = "front"', 'door = "front"\nopen_forever = true')
    assert problems(text) == [
        ("line 19: hardware.relay.open_forever: unknown key (known keys here: pin, door, "
        "active_high, pulse_s, max_open_s)")
    ]


@pytest.mark.parametrize(
    ("typo", "meant", "line"),
    [("pulse_sec = 3", "pulse_s", 19), ("max_opens = 9", "max_open_s", 19)],
)
def test_a_misspelt_key_gets_a_did_you_mean(typo: str, meant: str, line: int):
    text = GOOD.replace("pulse_s = 3", typo)
    assert problems(text) == [
        (f"line {line}: hardware.relay.{typo.split(maxsplit=1)[0]}: unknown key; "
        f"did you mean {meant!r}?")
    ]


def test_a_misspelt_section_gets_a_did_you_mean_at_its_header():
    text = GOOD + "\n[monitr]\ninterval_s = 5\n"
    assert problems(text) == [
        f"line {len(GOOD.splitlines()) + 2}: monitr: unknown key; did you mean 'monitor'?"
    ]


def test_problems_of_the_second_array_table_name_its_line():
    text = GOOD.replace('flat = "2B"', 'flat = "2B"\npn = 6')
    assert problems(text) == [
        "line 15: hardware.buttons[1].pn: unknown key; did you mean 'pin'?"
    ]


@pytest.mark.parametrize(
    ("old", "new", "wanted"),
    [
        ("pin = 27", 'pin = "twenty-seven"',
         "line 17: hardware.relay.pin: must be a whole number, got 'twenty-seven'"),
        ("pulse_s = 3", 'pulse_s = "soon"',
         "line 19: hardware.relay.pulse_s: must be a number, got 'soon'"),
        ("pin = 23", 'pin = 23\nactive_low = "maybe"', ("line 28: hardware.tamper.active_low: "
         "must be true or false, got 'maybe'")),
        ('flat = "2B"', "flat = 2", "line 14: hardware.buttons[1].flat: must be text in quotes"),
        ('source = "v4l2"', 'source = "usb"', ("line 30: media.camera.source: must be one of "
         "'synthetic', 'picamera2', 'v4l2' or 'file'")),
        ("max_open_s = 10", "max_open_s = 0", ("line 20: hardware.relay.max_open_s: must be at "
         "least 0.5, got 0")),
    ],
)
def test_wrong_values_are_told_plainly(old: str, new: str, wanted: str):
    (line,) = problems(GOOD.replace(old, new))
    assert line.startswith(wanted)
    assert "Input should" not in line
    assert "unable to parse" not in line


def test_missing_key_is_named():
    text = GOOD.replace('id = "front-door"\n', "")
    assert problems(text) == ["line 2: station.id: required key is missing"]


def test_wrong_type_is_named():
    text = GOOD.replace("pin = 27", 'pin = "twenty-seven"')
    (line,) = problems(text)
    assert line == "line 17: hardware.relay.pin: must be a whole number, got 'twenty-seven'"


def test_pin_outside_header_is_refused():
    (line,) = problems(GOOD.replace("pin = 23", "pin = 40"))
    assert line == "line 27: hardware.tamper.pin: must be at most 27, got 40"


def test_busy_pin_names_both_users():
    (line,) = problems(GOOD.replace("pin = 23", "pin = 27"))
    assert line == "line 27: hardware.tamper.pin: pin 27 is already used by relay.pin"


def test_pulse_longer_than_maximum():
    (line,) = problems(GOOD.replace("pulse_s = 3", "pulse_s = 12"))
    assert line.startswith("line 16: hardware.relay: pulse_s (12.0) must not exceed max_open_s")


def test_camera_device_required():
    (line,) = problems(GOOD.replace('device = "/dev/video0"\n', ""))
    assert line == "line 29: media.camera.device: required when source is 'v4l2'"


def test_several_problems_one_line_each():
    text = GOOD.replace("max_open_s = 10", "max_open_s = 0").replace('flat = "2B"', "flat = 2")
    lines = problems(text)
    assert len(lines) == 2
    assert lines == [  # in the order of the file
        "line 14: hardware.buttons[1].flat: must be text in quotes, got 2",
        "line 20: hardware.relay.max_open_s: must be at least 0.5, got 0",
    ]


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


def test_a_simulated_station_keeps_the_config_s_web_port_on_loopback(tmp_path: Path):
    """``run --simulate --config`` listens where the config says: a paired browser finds it
    again after a restart (scripts/demo relies on it)."""
    base = parse_settings(GOOD + '\n[web]\nhost = "0.0.0.0"\nport = 18443\n')
    sim = simulated_settings(tmp_path, base)
    assert (sim.web.host, sim.web.port) == ("127.0.0.1", 18443)
    assert simulated_settings(tmp_path).web.port == 0  # no config: a free port


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
        "intercom: config: line 20: hardware.relay.max_open_s: must be at most 30, got 90"
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
