"""Health metrics and alerts: each alert made to happen, seen as an event and on MQTT."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from intercom.config import MonitorConfig, RelayConfig, Settings
from intercom.events import AlertRaised, EventBus, UnlockDenied
from intercom.hardware.lock import Lock
from intercom.monitor import Links, MeteredCamera, Monitor, Probes
from intercom.mqtt.link import LinkState
from intercom.station import Station
from tests.mosquitto import Broker
from tests.test_mqtt_broker import PREFIX, bridge_of, mqtt_settings, retained, until
from tests.test_mqtt_events import Watcher

from .conftest import Recorder, settle

GIB = 1 << 30


class FakeClock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def statvfs_with(free: int, total: int = 16 * GIB) -> Callable[[str], os.statvfs_result]:
    """A statvfs that reports ``free`` of ``total`` bytes in 4 KiB blocks."""
    def statvfs(_path: str) -> os.statvfs_result:
        blocks, avail = total // 4096, free // 4096
        return os.statvfs_result((4096, 4096, blocks, avail, avail, 1000, 500, 500, 0, 255))
    return statvfs


class Disk:
    """A filesystem whose free space the test sets."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, path: str) -> os.statvfs_result:
        return statvfs_with(self.free)(path)


def quiet_probes(**kw: Any) -> Probes:
    """Probes of a healthy machine, with ``kw`` replacing some."""
    base: dict[str, Any] = {"statvfs": statvfs_with(8 * GIB), "synchronized": lambda: True}
    return Probes(**{**base, **kw})


def monitor(bus: EventBus, tmp_path: Path, **kw: Any) -> Monitor:
    config = MonitorConfig(**kw.pop("config", {}))
    kw.setdefault("probes", quiet_probes())
    return Monitor(config, bus, tmp_path, kw.pop("camera", None), **kw)


def raised(recorder: Recorder) -> list[str]:
    return [e.alert for e in recorder.of("AlertRaised")]  # type: ignore[attr-defined]


def cleared(recorder: Recorder) -> list[str]:
    return [e.alert for e in recorder.of("AlertCleared")]  # type: ignore[attr-defined]


def certificate(path: Path, days: float) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "door")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


async def test_metrics_of_the_process_and_machine(bus, recorder, tmp_path):
    (tmp_path / "eventlog.db").write_bytes(b"x" * 5000)
    mon = monitor(bus, tmp_path, links=Links(mqtt=lambda: "connected", web=lambda: "listening",
                                             checkpoint_at=lambda: time.time() - 60))
    health = await mon.sample()
    assert health["rss_bytes"] > 10 * (1 << 20)
    assert health["open_fds"] >= 3
    assert health["disk_free_bytes"] == 8 * GIB
    assert health["disk_free_percent"] == 50.0
    assert health["eventlog_bytes"] == 5000
    assert 59 <= health["checkpoint_age_s"] <= 70
    assert (health["mqtt"], health["web"], health["clock_synchronized"]) == (
        "connected", "listening", True)
    assert health["alerts"] == []
    assert raised(recorder) == []


async def test_a_thermal_zone_is_read_where_there_is_one(bus, tmp_path):
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("48312\n")
    mon = monitor(bus, tmp_path, probes=quiet_probes(thermal=tmp_path / "thermal"))
    assert (await mon.sample())["cpu_temp_c"] == 48.3
    none = monitor(bus, tmp_path, probes=quiet_probes(thermal=tmp_path / "none"))
    assert (await none.sample())["cpu_temp_c"] is None


async def test_bytes_written_per_day_and_calls_per_day(bus, tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    clock = FakeClock()
    mon = monitor(bus, tmp_path, probes=quiet_probes(proc=proc, monotonic=clock))
    (proc / "io").write_text("rchar: 1\nwrite_bytes: 1000000\n")
    assert (await mon.sample())["write_bytes_per_day"] is None  # no span yet
    await mon.start()
    try:
        clock.now += 3600
        (proc / "io").write_text("rchar: 1\nwrite_bytes: 3000000\n")
        from intercom.events import CallRinging  # noqa: PLC0415
        for i in range(3):
            bus.publish(CallRinging(call=f"c{i}", flat="1", devices=0))
        health = await mon.sample()
        assert health["write_bytes_per_day"] == 2_000_000 * 24
        assert health["calls_24h"] == 3
        clock.now += 86_400
        assert (await mon.sample())["calls_24h"] == 0
    finally:
        await mon.stop()


async def test_disk_low_is_raised_and_cleared(bus, recorder, tmp_path):
    disk = Disk(8 * GIB)
    mon = monitor(bus, tmp_path, probes=quiet_probes(statvfs=disk))
    await mon.sample()
    disk.free = GIB // 2  # 3 % of 16 GiB
    health = await mon.sample()
    assert raised(recorder) == ["disk_low"]
    assert health["alerts"] == ["disk_low"]
    (event,) = recorder.of("AlertRaised")
    assert "3.1% free" in event.message  # type: ignore[attr-defined]
    await mon.sample()
    assert raised(recorder) == ["disk_low"]  # once per episode
    disk.free = 8 * GIB
    await mon.sample()
    assert cleared(recorder) == ["disk_low"]
    assert mon.status()["health"]["alerts"] == {}


async def test_clock_unsynchronised_is_raised_and_unknown_is_not(bus, recorder, tmp_path):
    synced: dict[str, bool | None] = {"now": None}
    mon = monitor(bus, tmp_path, probes=quiet_probes(synchronized=lambda: synced["now"]))
    assert (await mon.sample())["clock_synchronized"] is None
    assert raised(recorder) == []
    synced["now"] = False
    await mon.sample()
    assert raised(recorder) == ["clock_unsynchronised"]
    synced["now"] = True
    await mon.sample()
    assert cleared(recorder) == ["clock_unsynchronised"]


async def test_certificate_near_expiry(bus, recorder, tmp_path):
    soon = certificate(tmp_path / "soon.pem", days=5)
    later = certificate(tmp_path / "later.pem", days=400)
    mon = monitor(bus, tmp_path, certificates=(later,))
    await mon.sample()
    assert raised(recorder) == []
    mon = monitor(bus, tmp_path, certificates=(later, soon))
    await mon.sample()
    assert raised(recorder) == ["certificate_expiry"]
    (event,) = recorder.of("AlertRaised")
    assert event.message.startswith("soon.pem expires ")  # type: ignore[attr-defined]


async def test_broker_unreachable_for_the_configured_time(bus, recorder, tmp_path):
    clock = FakeClock()
    state = {"link": "connected"}
    mon = monitor(bus, tmp_path, config={"broker_unreachable_s": 120},
                  links=Links(mqtt=lambda: state["link"]), probes=quiet_probes(monotonic=clock))
    await mon.sample()
    state["link"] = "disconnected"
    await mon.sample()
    clock.now += 119
    await mon.sample()
    assert raised(recorder) == []
    clock.now += 2
    await mon.sample()
    assert raised(recorder) == ["broker_unreachable"]
    state["link"] = "connected"
    await mon.sample()
    assert cleared(recorder) == ["broker_unreachable"]


class StallingCamera:
    """Gives ``frames`` frames, then none until ``resume`` is set."""

    encoded = False
    name = "stalling"

    def __init__(self, frames: int) -> None:
        self.left = frames
        self.resume = asyncio.Event()

    async def open(self) -> None:
        pass

    async def next(self) -> Any:
        if self.left <= 0:
            await self.resume.wait()
        self.left -= 1
        return object()

    def request_keyframe(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_camera_that_stops_delivering_is_stalled(bus, recorder, tmp_path):
    clock = FakeClock()
    source = StallingCamera(frames=5)
    camera = MeteredCamera(source, clock=clock)
    mon = monitor(bus, tmp_path, camera=camera, config={"camera_stall_s": 10},
                  probes=quiet_probes(monotonic=clock))

    async def reader() -> None:
        while True:
            await camera.next()
            await asyncio.sleep(0)

    task = asyncio.create_task(reader())
    try:
        await settle()
        assert camera.frames == 5
        await mon.sample()
        clock.now += 9
        await mon.sample()
        assert raised(recorder) == []
        clock.now += 2
        health = await mon.sample()
        assert raised(recorder) == ["camera_stalled"]
        assert health["camera_frames"] == 5
        source.resume.set()
        await settle()
        assert camera.frames > 5
        await mon.sample()
        assert cleared(recorder) == ["camera_stalled"]
    finally:
        task.cancel()


async def test_an_idle_camera_is_probed_so_a_dead_one_is_found(bus, recorder, tmp_path):
    clock = FakeClock()
    source = StallingCamera(frames=0)  # dead from the start, and nobody watches
    camera = MeteredCamera(source, clock=clock)
    mon = monitor(bus, tmp_path, camera=camera, config={"camera_stall_s": 10},
                  probes=quiet_probes(monotonic=clock))
    await mon.start()
    try:
        await mon.sample()  # nothing read since the first sample: the monitor reads a frame
        await settle()
        assert camera.waiting_s() == 0  # the probe waits since now
        clock.now += 11
        await mon.sample()
        assert raised(recorder) == ["camera_stalled"]
    finally:
        await mon.stop()


async def test_the_relay_guard_firing_is_an_alert(bus, recorder, tmp_path, pin_factory):
    lock = Lock(RelayConfig(pin=27, pulse_s=0.2, max_open_s=0.5), pin_factory, bus,
                asyncio.get_running_loop())
    mon = monitor(bus, tmp_path)
    await mon.start()
    try:
        lock.pulse(3600, reason="then the loop hangs")
        time.sleep(0.7)  # block the loop: the pulse's timer cannot run, only the guard
        await settle()
        assert raised(recorder) == ["relay_guard"]
        lock.pulse(0.2)  # an ordinary pulse ends by its timer: no alert
        await asyncio.sleep(0.3)
        assert raised(recorder) == ["relay_guard"]
    finally:
        await mon.stop()
        lock.close()


async def test_repeated_unlock_failures_of_one_principal(bus, recorder, tmp_path):
    mon = monitor(bus, tmp_path, config={"unlock_failures": 3})
    await mon.start()
    try:
        for principal in ("p-1", "p-2", "p-1", "", "", "", "p-1"):
            bus.publish(UnlockDenied(door="front", principal=principal, via="mqtt",
                                     reason="wrong TOTP code"))
        (event,) = recorder.of("AlertRaised")
        assert isinstance(event, AlertRaised)
        assert (event.alert, event.principal) == ("unlock_failures", "p-1")
        assert "wrong TOTP" not in event.message  # the reason stays log-only
    finally:
        await mon.stop()


async def first(port: int, topic: str) -> Any:
    """The first message on ``topic`` (the retained one, if any), as JSON."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(topic, qos=1)
        message = await asyncio.wait_for(anext(client.messages), 5)
        return json.loads(message.payload)  # type: ignore[arg-type]


def monitored_settings(settings: Settings, port: int) -> Settings:
    settings = mqtt_settings(settings, port=port)
    config = MonitorConfig(interval_s=0.1, broker_unreachable_s=0.3)
    return settings.model_copy(update={"monitor": config})


async def test_alerts_and_health_reach_mqtt_with_diagnostic_entities(tmp_path, sim_settings):
    broker = Broker(tmp_path / "broker")
    broker.start()
    disk = Disk(8 * GIB)
    probes = Probes(statvfs=disk, synchronized=lambda: False)
    station = Station(monitored_settings(sim_settings, broker.port), probes=probes)
    try:
        await station.start()
        recorder = Recorder(station.bus)
        async with Watcher(broker.port) as watcher:
            bridge = bridge_of(station)
            await until(lambda: bridge.link.state is LinkState.CONNECTED)

            def alerts_on_mqtt() -> list[str]:
                return [b["details"]["alert"] for b in watcher.seqs.values()
                        if b["type"] == "AlertRaised"]

            await until(lambda: "clock_unsynchronised" in alerts_on_mqtt(), what="clock alert")
            disk.free = GIB // 4
            await until(lambda: "disk_low" in alerts_on_mqtt(), what="disk alert")
            seen = await retained(broker.port, "homeassistant/#")
            health = await first(broker.port, f"{PREFIX}/state/health")
            assert health["alerts"] == ["clock_unsynchronised", "disk_low"]
            assert health["rss_bytes"] > 0
            assert health["web"] == "listening"
            node = bridge.topics.node_id
            diagnostic = {t.split("/")[1] + "/" + t.split("/")[3]: c for t, c in seen.items()
                          if t.startswith("homeassistant/")
                          and c.get("entity_category") == "diagnostic"}
            for wanted in ("sensor/uptime", "sensor/load", "sensor/memory", "sensor/disk_free",
                           "sensor/camera_fps", "sensor/calls_per_day",
                           "binary_sensor/clock_synchronized", "binary_sensor/problem"):
                assert wanted in diagnostic, wanted
                assert diagnostic[wanted]["device"]["identifiers"] == [node]
            assert diagnostic["sensor/memory"]["state_topic"] == f"{PREFIX}/state/health"

            status = station.status()["health"]
            assert set(status["alerts"]) == {"clock_unsynchronised", "disk_low"}

            # The broker goes away: after broker_unreachable_s an alert is logged, and the
            # broker has it once it is back: the bridge's cursor passes it only when the
            # broker acknowledged it (the path of every event, seen end to end above).
            broker.kill()
            await until(lambda: "broker_unreachable" in raised(recorder), 10, "broker alert")
            eventlog = station.eventlog
            assert eventlog is not None

            def logged() -> list[int]:
                return [e.seq for e in eventlog.read_after(0, 500)
                        if e.type == "AlertRaised" and e.details["alert"] == "broker_unreachable"]

            # On the bus first, in the log once the writer has appended it.
            await until(lambda: bool(logged()), 10, "the alert in the event log")
            (seq,) = logged()
            assert bridge.cursor.seq < seq
            broker.start()
            await until(lambda: bridge.cursor.seq >= seq, 20, "the broker acked the alert")
            await until(lambda: "broker_unreachable" in cleared(recorder), 10, "cleared")
    finally:
        await station.stop("test finished")
        broker.kill()


@pytest.mark.parametrize("key", ["interval_s", "camera_stall_s", "broker_unreachable_s"])
def test_thresholds_refuse_nonsense(key: str):
    from pydantic import ValidationError  # noqa: PLC0415
    with pytest.raises(ValidationError):
        MonitorConfig(**{key: 0})


class OneReaderCamera:
    """A camera source that fails, as the encode-once camera did, when read twice at once."""

    encoded = False
    name = "one-reader"

    def __init__(self) -> None:
        self.reading = False
        self.reads = 0

    async def next(self) -> int:
        if self.reading:
            raise RuntimeError("read twice at once")
        self.reading = True
        try:
            await asyncio.sleep(0.01)
            self.reads += 1
            return self.reads
        finally:
            self.reading = False


async def test_concurrent_readers_share_each_frame_and_the_camera_has_one_reader():
    source = OneReaderCamera()
    camera = MeteredCamera(source)  # type: ignore[arg-type]

    async def reader(count: int) -> list[int]:
        return [await camera.next() for _ in range(count)]

    relay, selftest = await asyncio.gather(reader(20), reader(10))
    assert relay == list(range(1, 21)), "the relay got every frame, in order"
    assert selftest == list(range(1, 11)), "the self-test got the same frames, none taken"
    assert source.reads == camera.frames == 20
    # a reader that gives up does not cut the frame the others wait for
    waiting = asyncio.ensure_future(camera.next())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(camera.next(), 0.001)
    assert await waiting == 21
    assert camera.waiting_s() == 0
