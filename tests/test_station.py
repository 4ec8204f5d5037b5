"""A whole simulated station in the test's own event loop."""

import asyncio
import os
import signal

import pytest
from gpiozero import DigitalInputDevice

from intercom.config import ButtonConfig, Settings
from intercom.control import request
from intercom.errors import HardwareError, IntercomError
from intercom.hardware.doorbell import Doorbell
from intercom.station import Station, run_station

from .conftest import Recorder


async def test_sim_press_over_control_socket(station: Station):
    recorder = Recorder(station.bus)
    answer = await request(station.state_dir, {"request": "sim", "action": "press"})
    (pressed,) = await recorder.wait_for("DoorbellPressed")
    (ringing,) = recorder.of("CallRinging")
    assert answer == {"ok": True, "press": {
        "pressed": True, "button": "bell", "flat": "1", "call": ringing.call,  # type: ignore[attr-defined]
        "devices": 0, "missed": True, "ring_timeout_s": 30.0}}
    assert pressed.flat == "1"
    status = (await request(station.state_dir, {"request": "status"}))["status"]
    assert status["station"] == station.id
    assert status["lock"] == "locked"
    assert status["door"] == "closed"
    assert "DoorbellPressed" in [e["type"] for e in status["recent_events"]]


async def test_sim_door_and_tamper(station: Station):
    recorder = Recorder(station.bus)
    await request(station.state_dir, {"request": "sim", "action": "open-door"})
    await recorder.wait_for("DoorForcedOpen")
    await request(station.state_dir, {"request": "sim", "action": "close-door"})
    await recorder.wait_for("DoorClosed")
    await request(station.state_dir, {"request": "sim", "action": "tamper"})
    await recorder.wait_for("TamperDetected")
    await recorder.wait_for("TamperCleared")  # the simulator shuts the cover again


async def test_bad_control_requests_are_refused_and_station_carries_on(station: Station):
    path = str(station.control.path)
    for junk in (b"not json\n", b"[1,2]\n", b'{"request": 5}\n', b"\xff\xfe\n"):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(junk)
        answer = await reader.readline()
        writer.close()
        assert b'"ok": false' in answer
    answer = await request(station.state_dir, {"request": "sim", "action": "dance"})
    assert answer["ok"] is False
    assert "unknown simulator action" in answer["error"]
    answer = await request(station.state_dir, {"request": "status"})
    assert answer["ok"] is True


async def test_control_socket_is_private(station: Station):
    assert (station.control.path.stat().st_mode & 0o777) == 0o600
    assert ((station.state_dir / "keys" / "station.key").stat().st_mode & 0o777) == 0o600


async def test_second_station_on_same_state_dir_is_refused(station: Station):
    other = Station(station.settings)
    with pytest.raises(IntercomError, match="holds the state directory"):
        await other.start()
    # the first one still answers
    assert (await request(station.state_dir, {"request": "status"}))["ok"]


async def test_sigterm_stops_cleanly_with_relay_off(sim_settings: Settings):
    station = Station(sim_settings)
    task = asyncio.create_task(run_station(sim_settings, station=station))
    for _ in range(200):
        if station.control.path.exists():
            break
        await asyncio.sleep(0.02)
    assert station.lock is not None
    pin = station.pin_factory.pin(sim_settings.hardware.relay.pin)
    station.lock.pulse(3600, reason="door held for the test")
    assert pin.state is True
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 5) == 0
    assert pin.state is False
    assert not station.control.path.exists()


async def test_busy_pin_is_a_clear_error(pin_factory, bus):
    holder = DigitalInputDevice(17, pin_factory=pin_factory)
    with pytest.raises(HardwareError, match=r"buttons\[bell\] \(GPIO17\): cannot open the pin"):
        Doorbell(ButtonConfig(name="bell", pin=17, flat="1"), pin_factory, bus)
    holder.close()


async def test_failed_start_leaves_nothing_running(sim_settings: Settings):
    bad = sim_settings.model_copy(
        update={
            "media": sim_settings.media.model_copy(
                update={
                    "camera": sim_settings.media.camera.model_copy(
                        update={"source": "v4l2", "device": "/dev/video-missing"}
                    )
                }
            )
        }
    )
    station = Station(bad)
    with pytest.raises(HardwareError, match="/dev/video-missing"):
        await station.start()
    assert station.lock is not None
    assert station.lock.device.closed
    assert not station.control.path.exists()
