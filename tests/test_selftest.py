"""The self-test: every part of a real simulated station, and each failure made to happen."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from intercom.config import CameraConfig, MediaConfig, Settings
from intercom.eventlog.store import db_path
from intercom.events import SelfTestCompleted
from intercom.monitor import Probes
from intercom.selftest import PARTS, Report
from intercom.station import Station
from tests.test_monitor import GIB, Disk, quiet_probes
from tests.test_mqtt_broker import PREFIX, bridge_of, mqtt_settings, retained, until

from .conftest import INTERCOM, Recorder


@contextlib.asynccontextmanager
async def started(settings: Settings, probes: Probes | None = None) -> Any:
    """A running station whose start-up self-test is over (so a new one may run)."""
    station = Station(settings, probes=probes or quiet_probes())
    recorder = Recorder(station.bus)
    await station.start()
    try:
        await recorder.wait_for("SelfTestCompleted", timeout=10)
        yield station, recorder
    finally:
        await station.stop("test finished")


def outcomes(report: dict[str, Any]) -> dict[str, str]:
    return dict(report["parts"])


async def cli_selftest(state: Path, *extra: str) -> tuple[int, str]:
    """``intercom selftest`` in a process of its own, asking the station over its socket."""
    proc = await asyncio.create_subprocess_exec(
        *INTERCOM, "selftest", "--state-dir", str(state), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_every_part_of_a_healthy_station_passes(sim_settings):
    async with started(sim_settings) as (station, recorder):
        (first,) = recorder.of("SelfTestCompleted")
        assert isinstance(first, SelfTestCompleted)
        assert (first.trigger, first.passed, first.failed) == ("start", True, "")
        assert station.selftest is not None
        assert station.lock is not None
        pin = station.lock.device.pin
        report = (await station.selftest.run("request")).to_dict()
        # The relay pin was read, never energised (a lock moves only for the verifier).
        assert not any(state.state for state in pin.states)
    parts = outcomes(report)
    assert list(parts) == list(PARTS)
    for part in ("camera", "microphone", "door_contact", "tamper", "relay", "disk",
                 "eventlog", "certificate"):
        assert parts[part] == "ok", report
    assert parts["mqtt"] == "skipped"  # no [mqtt]
    details = {c["part"]: c["detail"] for c in report["checks"]}
    assert details["relay"] == "GPIO27 reads back released, as driven"
    assert details["door_contact"] == "GPIO22 reads the door closed"
    fps = float(details["camera"].split()[0])
    assert fps >= 0.5 * sim_settings.media.camera.fps
    assert station.status()["selftest"]["trigger"] == "request"


async def test_the_door_contact_is_read_as_it_is_now(sim_settings):
    async with started(sim_settings) as (station, _):
        assert station.simulator is not None
        await station.simulator.act("open-door", None)
        assert station.selftest is not None
        report = await station.selftest.run("request")
    (contact,) = [c for c in report.checks if c.part == "door_contact"]
    assert contact.detail == "GPIO22 reads the door open"


@pytest.mark.parametrize(("part", "probes", "words"), [
    ("clock", {"synchronized": lambda: False}, "not synchronised"),
    ("disk", {"statvfs": Disk(GIB // 4)}, "1.6% free"),
])
async def test_cli_names_an_unsynchronised_clock_or_a_nearly_full_disk(
        sim_settings, part, probes, words):
    async with started(sim_settings, quiet_probes(**probes)) as (station, recorder):
        code, out = await cli_selftest(sim_settings.station.state_dir)
        assert code == 1, out
        assert out.splitlines()[-1] == f"self-test FAILED: {part}"
        (line,) = [line for line in out.splitlines() if line.startswith(part + " ")]
        assert "FAILED" in line
        assert words in line
        camera = next(line for line in out.splitlines() if line.startswith("camera "))
        assert " ok " in camera
        done = recorder.of("SelfTestCompleted")[-1]
        assert isinstance(done, SelfTestCompleted)
        assert (done.trigger, done.passed, done.failed) == ("request", False, part)
        assert station.eventlog is not None
        await station.eventlog.flush()
        logged = [e for e in station.eventlog.read_after(0, 500) if e.type == "SelfTestCompleted"]
        assert logged[-1].details["failed"] == part


Y4M_W, Y4M_H = 160, 120


class StallingPipe:
    """A named pipe carrying a Y4M video of ``frames`` frames, then nothing: a real stall.

    The writer keeps the pipe open without writing, so the camera's decoder blocks.
    ``release`` ends the video and lets the decoder's reopening at its end find an
    empty pipe, so its thread ends before the camera is closed.
    """

    def __init__(self, path: Path, frames: int) -> None:
        os.mkfifo(path)
        self.path, self.frames = path, frames
        self._done = threading.Event()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._writer.start()

    def _write(self) -> None:
        with self.path.open("wb") as pipe:
            pipe.write(f"YUV4MPEG2 W{Y4M_W} H{Y4M_H} F15:1 Ip A1:1 C420jpeg\n".encode())
            for i in range(self.frames):
                pipe.write(b"FRAME\n" + bytes([16 + i]) * (Y4M_W * Y4M_H)
                           + b"\x80" * (Y4M_W * Y4M_H // 2))
                pipe.flush()
            self._done.wait(30)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # the decoder opens the file again at its end
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                time.sleep(0.02)
            else:
                return

    async def release(self) -> None:
        self._done.set()
        await asyncio.to_thread(self._writer.join, 5)
        await asyncio.sleep(0.2)  # the decoder's thread sees the empty pipe and ends


async def test_cli_names_a_stalled_camera(sim_settings, tmp_path):
    pipe = tmp_path / "camera.y4m"
    camera = CameraConfig(source="file", device=str(pipe), fps=15)
    settings = sim_settings.model_copy(
        update={"media": MediaConfig(camera=camera, audio=sim_settings.media.audio)})
    stalling = StallingPipe(pipe, frames=5)
    async with started(settings) as (station, _):
        try:
            code, out = await cli_selftest(settings.station.state_dir)
            assert code == 1, out
            assert out.splitlines()[-1] == "self-test FAILED: camera"
            (line,) = [line for line in out.splitlines() if line.startswith("camera ")]
            assert "FAILED" in line
            assert "stalled: no frame within 3 s" in line
            assert station.status()["selftest"]["failed"] == ["camera"]
        finally:
            await stalling.release()


async def test_a_tampered_event_log_fails_its_part(sim_settings):
    async with started(sim_settings) as (station, _):
        assert station.eventlog is not None
        assert station.selftest is not None
        await station.eventlog.flush()
        with contextlib.closing(sqlite3.connect(db_path(sim_settings.station.state_dir))) as db:
            db.execute("UPDATE records SET ciphertext = randomblob(length(ciphertext)) "
                       "WHERE seq = 2")
            db.commit()
        report = await station.selftest.run("request")
    (part,) = [c for c in report.checks if c.part == "eventlog"]
    assert (part.outcome.value, report.failed) == ("failed", ["eventlog"])
    assert "record 2" in part.detail


async def test_one_selftest_at_a_time_and_a_healthy_cli_run_exits_0(sim_settings):
    async with started(sim_settings) as (station, _):
        assert station.selftest is not None
        first = asyncio.create_task(station.selftest.run("request"))
        await asyncio.sleep(0.05)
        code, out = await cli_selftest(sim_settings.station.state_dir)
        assert code == 1
        assert "a self-test is already running" in out
        assert isinstance(await first, Report)
        code, out = await cli_selftest(sim_settings.station.state_dir)
        assert code == 0, out
        assert out.splitlines()[-1] == "self-test passed"


async def test_the_result_reaches_mqtt_with_a_diagnostic_entity_a_part(broker, sim_settings):
    settings = mqtt_settings(sim_settings, port=broker.port)
    async with started(settings, quiet_probes(synchronized=lambda: False)) as (station, _):
        bridge = bridge_of(station)
        assert station.selftest is not None
        await until(lambda: bridge.link.state.value == "connected", what="connected")
        await station.selftest.run("request")
        seen: dict[str, Any] = {}

        async def published() -> bool:
            seen.update(await retained(broker.port, "#"))
            shown = seen.get(f"{PREFIX}/state/selftest") or {}
            return shown.get("trigger") == "request"

        deadline = time.monotonic() + 5
        while not await published():
            assert time.monotonic() < deadline, "no self-test on MQTT"
    shown = seen[f"{PREFIX}/state/selftest"]
    assert shown["failed"] == ["clock"]
    assert shown["parts"]["mqtt"] == "ok"
    node = bridge.topics.node_id
    summary = seen[f"homeassistant/binary_sensor/{node}/selftest/config"]
    assert summary["entity_category"] == "diagnostic"
    assert summary["state_topic"] == f"{PREFIX}/state/selftest"
    for part in PARTS:
        entity = seen[f"homeassistant/binary_sensor/{node}/selftest_{part}/config"]
        assert entity["device_class"] == "problem"
        assert f"value_json.parts.{part}" in entity["value_template"]


async def test_the_microphone_is_read_once_for_all_its_readers(station):
    """The calls keep the microphone read; the self-test's read shares that frame."""
    from intercom.media.audio import ToneSource  # noqa: PLC0415
    from intercom.media.shared import OneReader  # noqa: PLC0415

    microphone = station.microphone
    assert isinstance(microphone, OneReader)
    assert isinstance(microphone.inner, ToneSource)
    source = OneReader(ToneSource())
    await source.open()
    first, second = await asyncio.gather(source.next(), source.next())
    assert first is second
    assert source.inner.frames == 1
    task = asyncio.ensure_future(source.next())
    with contextlib.suppress(TimeoutError):  # a reader giving up cuts no one's frame
        await asyncio.wait_for(source.next(), 0.0001)
    assert (await task).pts == 960
