"""What the CLI says to a newcomer: status with times and details, what a press did,
where to go without a config, and config problems with their line and a suggestion."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from intercom.cli import main
from intercom.config import EventLogConfig, Settings
from intercom.events import CallAnswered, DoorOpened, UnlockGranted
from intercom.station import Station

from .conftest import INTERCOM, Recorder
from .test_mqtt_broker import until

CLOCK = r"\d\d:\d\d:\d\d"


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in a thread (it runs its own loop) beside the station's loop."""
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


async def test_status_prints_times_details_health_and_no_none(station: Station, capsys):
    station.bus.publish(UnlockGranted(door="front", principal="p-gone", via="call", jti="j-1"))
    station.bus.publish(CallAnswered(call="c-1", principal="p-gone"))
    code, out, _ = await cli(capsys, "status", "--state-dir", str(station.state_dir))
    assert code == 0
    assert "None" not in out.replace("principal=None", "")  # an erased id reads None
    assert re.search(r"^log      seq \d+, no signed checkpoint yet, [\d.]+ KiB on disk$", out,
                     re.MULTILINE), out
    assert re.search(rf"^event    {CLOCK} UnlockGranted door=front principal=None via=call "
                     r"jti=j-1$", out, re.MULTILINE), out
    assert re.search(rf"^event    {CLOCK} CallAnswered call=c-1 principal=None$", out,
                     re.MULTILINE), out
    assert re.search(rf"^event    {CLOCK} StationStarted station=", out, re.MULTILINE), out
    assert re.search(r"^health   load [\d.]+, RSS [\d.]+ MiB, \d+ open descriptors$", out,
                     re.MULTILINE), out
    assert re.search(r"^disk     [\d.]+ [KMG]iB free \([\d.]+%\)$", out, re.MULTILINE), out
    assert "calls    0 in the last 24 h" in out
    assert "web      listening" in out
    assert "alerts   none" in out


async def test_status_shows_the_checkpoint_and_its_age(sim_settings: Settings, capsys):
    settings = sim_settings.model_copy(update={"eventlog": EventLogConfig(checkpoint_every=1)})
    station = Station(settings)
    await station.start()
    try:
        assert station.eventlog is not None
        assert station.monitor is not None
        station.bus.publish(DoorOpened(door="front"))
        await until(lambda: station.eventlog.latest_checkpoint() is not None)  # type: ignore[union-attr]
        await station.monitor.sample()
        _, out, _ = await cli(capsys, "status", "--state-dir", str(station.state_dir))
    finally:
        await station.stop("test finished")
    assert re.search(r"^log      seq \d+, signed checkpoint at seq \d+ \(\d+ s ago\)", out,
                     re.MULTILINE), out


async def test_sim_press_with_nobody_paired_says_so(station: Station, capsys):
    recorder = Recorder(station.bus)
    code, out, _ = await cli(capsys, "sim", "press", "--state-dir", str(station.state_dir))
    assert code == 0
    (missed,) = recorder.of("CallMissed")
    assert out.strip() == (
        f"pressed bell (flat 1): no device of flat 1 is signed in, so nobody was rung; call "
        f"{missed.call} was missed at once (pair a device with 'intercom pair --flat 1')"  # type: ignore[attr-defined]
    )


async def test_a_press_within_coalesce_time_says_it_was_not_taken(station: Station, capsys):
    await cli(capsys, "sim", "press", "--state-dir", str(station.state_dir))
    _, out, _ = await cli(capsys, "sim", "press", "--state-dir", str(station.state_dir))
    assert out.startswith("pressed, but no new press was taken: within coalesce_s")


def test_press_report_while_devices_ring():
    from intercom.cli.sim import press_report  # noqa: PLC0415

    text = press_report({"pressed": True, "button": "bell", "flat": "2", "call": "c-9",
                         "devices": 3, "missed": False, "ring_timeout_s": 30.0})
    assert text == ("pressed bell (flat 2): ringing 3 device(s) of the flat, call c-9; "
                    "missed unless answered within 30 s")


def test_run_without_a_config_points_to_simulate_and_config(tmp_path: Path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no $INTERCOM_CONFIG
    res = subprocess.run([*INTERCOM, "run"], capture_output=True, text=True, env=env,
                         timeout=30, check=False)
    assert res.returncode == 2
    assert "--config FILE" in res.stderr
    assert "intercom run --simulate" in res.stderr
    assert res.stderr.count("\n") == 1


def test_check_config_gives_line_suggestion_and_plain_words(tmp_path: Path):
    config = tmp_path / "door.toml"
    config.write_text(
        '[station]\nid = "door"\n\n[[hardware.buttons]]\npin = 17\nflat = "1"\n\n'
        '[hardware.relay]\npin = 27\npulse = 3\nmax_open_s = "ten"\n'
    )
    res = subprocess.run([*INTERCOM, "check-config", str(config)], capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "intercom: config: line 10: hardware.relay.pulse: unknown key; did you mean 'pulse_s'?",
        "intercom: config: line 11: hardware.relay.max_open_s: must be a number, got 'ten'",
    ]
