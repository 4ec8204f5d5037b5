"""The daemon's one config writer: validated like check-config, atomic, logged with its actor."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from intercom.config import load_settings, simulated_settings
from intercom.configwriter import ConfigRefusedError, ConfigWriter, parse_key
from intercom.control import request
from intercom.errors import IntercomError
from intercom.events import EventBus, PrivilegedAction
from intercom.station import Station
from tests.test_privacy import ZONES, assert_zones_masked

from .conftest import INTERCOM, Recorder

CONFIG = """\
# the installer's notes
[station]
id = "door-1"

[hardware]
pin_factory = "mock"

[[hardware.buttons]]
name = "bell"
pin = 17
flat = "1"

[hardware.relay]
pin = 27
pulse_s = 3.0

[web]
host = "127.0.0.1"
port = 0
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "intercom.toml"
    path.parent.mkdir()
    path.write_text(CONFIG)
    path.chmod(0o640)
    return path


@contextlib.asynccontextmanager
async def station_of(config_file: Path, state: Path) -> AsyncIterator[Station]:
    settings = simulated_settings(state, load_settings(config_file))
    station = Station(settings, config_path=config_file)
    await station.start()
    try:
        yield station
    finally:
        await station.stop("test finished")


async def intercom(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *INTERCOM, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_change_is_validated_written_and_logged_with_its_actor(config_file, tmp_path):
    state = tmp_path / "state"
    async with station_of(config_file, state) as station:
        code, out, err = await intercom("config", "set", "hardware.relay.pulse_s", "5",
                                        "hardware.buttons[0].flat", '"2b"',
                                        "--state-dir", str(state))
        assert code == 0, err
        assert out == ("written; takes effect at the next start: hardware.relay.pulse_s, "
                       "hardware.buttons[0].flat\n")
        settings = load_settings(config_file)  # check-config's reading of the new file
        assert settings.hardware.relay.pulse_s == 5.0
        assert settings.hardware.buttons[0].flat == "2b"
        assert settings.station.id == "door-1"
        assert config_file.stat().st_mode & 0o777 == 0o640
        assert sorted(p.name for p in config_file.parent.iterdir()) == ["intercom.toml"]
        assert station.eventlog is not None
        await station.eventlog.flush()
        (logged,) = [e for e in station.eventlog.read_after(0, 500)
                     if e.type == "PrivilegedAction" and e.details["action"] == "config-set"]
        assert logged.details["actor"] == f"local:{getpass.getuser()}"
        assert "hardware.relay.pulse_s, hardware.buttons[0].flat" in logged.details["detail"]
        assert "2b" not in logged.details["detail"]  # keys, never values

        code, out, _ = await intercom("config", "get", "--state-dir", str(state))
        assert code == 0
        assert '"pulse_s": 5.0' in out


async def test_cli_refuses_a_pin_already_used_naming_the_key_changed(config_file, tmp_path):
    state = tmp_path / "state"
    before = config_file.read_bytes()
    async with station_of(config_file, state):
        code, out, err = await intercom("config", "set", "hardware.buttons[0].pin", "27",
                                        "--state-dir", str(state))
    assert code == 2
    assert out == ""
    assert err == ("intercom: config: hardware.buttons[0].pin: pin 27 is already used by "
                   "hardware.relay.pin\n")
    assert config_file.read_bytes() == before


async def writer_of(config_file: Path) -> tuple[ConfigWriter, Recorder]:
    bus = EventBus()
    return ConfigWriter(config_file, bus), Recorder(bus)


@pytest.mark.parametrize(("changes", "key", "reason"), [
    ({"hardware.relay.pulse_s": 60}, "hardware.relay.pulse_s", "must be at most 30"),
    ({"hardware.relay.puls_s": 1}, "hardware.relay.puls_s", "unknown key; did you mean 'pulse_s'?"),
    ({"hardware.buttons[0].pin": "seventeen"}, "hardware.buttons[0].pin",
     "must be a whole number, got 'seventeen'"),
    ({"station.id": "door-2"}, "station.id", "set at installation"),
    ({"mqtt.password": "hunter2"}, "mqtt.password", "a secret is not written into the config"),
    ({"hardware.buttons[3].pin": 5}, "hardware.buttons[3].pin", "no such item"),
    ({"privacy.zones": [[[0, 0], [1, 0]]]}, "privacy.zones[0]",
     "must have at least 3 item(s)"),
    ({"hardware..relay": 1}, "hardware..relay", "not a config key path"),
])
async def test_a_bad_value_is_refused_with_its_key_and_reason(config_file, changes, key, reason):
    writer, recorder = await writer_of(config_file)
    before = config_file.read_bytes()
    with pytest.raises(ConfigRefusedError) as refused:
        await writer.change(changes, actor="local:test")
    (problem,) = refused.value.refused
    assert problem.key == key
    assert problem.reason.startswith(reason), problem.reason
    assert config_file.read_bytes() == before
    assert recorder.of("PrivilegedAction") == []
    assert "hunter2" not in str(refused.value)


async def test_appliers_take_their_keys_at_once(config_file):
    writer, recorder = await writer_of(config_file)
    seen: list[list[list[tuple[float, float]]]] = []
    writer.on_change("privacy.zones", lambda s: seen.append(
        [list(zone) for zone in s.privacy.zones]))
    zone = [[0.1, 0.1], [0.5, 0.1], [0.5, 0.5]]
    written = await writer.change({"privacy.zones": [zone], "calls.ring_timeout_s": 20},
                                  actor="inst-1")
    assert (written.applied, written.at_restart) == (["privacy.zones"],
                                                     ["calls.ring_timeout_s"])
    assert seen == [[[(0.1, 0.1), (0.5, 0.1), (0.5, 0.5)]]]
    assert tomllib.loads(config_file.read_text())["privacy"]["zones"] == [zone]
    (action,) = recorder.of("PrivilegedAction")
    assert isinstance(action, PrivilegedAction)
    assert (action.actor, action.action) == ("inst-1", "config-set")


async def test_a_link_in_place_of_the_file_is_not_written_through(config_file, tmp_path):
    target = tmp_path / "elsewhere.toml"
    target.write_text(CONFIG)
    link = config_file.parent / "linked.toml"
    link.symlink_to(target)
    writer, _ = await writer_of(link)
    with pytest.raises(IntercomError, match="not a regular file"):
        await writer.change({"hardware.relay.pulse_s": 4}, actor="local:test")
    assert target.read_text() == CONFIG


async def test_a_station_without_a_file_says_so(sim_settings):
    station = Station(sim_settings)
    with pytest.raises(IntercomError, match="runs without a config file"):
        await station.config_writer.change({"hardware.relay.pulse_s": 4}, actor="local:test")


def test_key_paths():
    assert parse_key("hardware.buttons[1].flat") == ["hardware", "buttons", 1, "flat"]
    assert parse_key("privacy.zones[0][2]") == ["privacy", "zones", 0, 2]
    for bad in ("", "Hardware", "a.b[x]", "a/b", "a." + "b" * 300):
        with pytest.raises(ConfigRefusedError):
            parse_key(bad)


async def test_zones_set_through_the_writer_mask_every_output_at_once(config_file, tmp_path):
    state = tmp_path / "state"
    async with station_of(config_file, state) as station:
        assert station.camera is not None
        zones = json.dumps([[list(p) for p in zone] for zone in ZONES])
        code, out, err = await intercom("config", "set", "privacy.zones", zones,
                                        "--state-dir", str(state))
        assert code == 0, err
        assert out == "applied now: privacy.zones\n"
        for _ in range(2):  # what calls, snapshots and previews read
            assert_zones_masked(await station.camera.next())
        preview = await request(state, {"request": "privacy-preview"})
        assert preview["zones"] == [[list(p) for p in zone] for zone in ZONES]
    assert load_settings(config_file).privacy.zones == ZONES


async def test_writable_says_whether_the_folder_can_take_the_new_file(config_file, tmp_path):
    writer, _ = await writer_of(config_file)
    assert writer.writable()
    assert not ConfigWriter(None, EventBus()).writable()
    gone = ConfigWriter(tmp_path / "no-such-folder" / "intercom.toml", EventBus())
    assert not gone.writable()
    with pytest.raises(IntercomError, match="cannot read"):
        await gone.change({"hardware.relay.pulse_s": 4}, actor="local:test")
