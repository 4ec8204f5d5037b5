"""The ring group with real aiortc devices over the station's own addresses."""

from __future__ import annotations

import asyncio

from intercom.events import DoorbellPressed
from intercom.station import Station

from . import test_calls_client as kit
from .conftest import Recorder
from .test_calls_client import Device, pair

call_station = kit.call_station
devices = kit.devices


async def online(
    station: Station, devices: list[Device], count: int, flat: str = "1"
) -> list[Device]:
    made = []
    for _ in range(count):
        device = await pair(station, flat)
        devices.append(device)
        await device.connect()
        made.append(device)
    for device in made:
        await device.wait_connected()
    return made


async def test_press_rings_device_with_video_before_answer_and_audio_after(
    call_station: Station, devices: list[Device]
):
    station = call_station
    recorder = Recorder(station.bus)
    (phone,) = await online(station, devices, 1)
    await asyncio.sleep(0.3)
    assert phone.video_frames == []
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    ring = await phone.expect("ring")
    await asyncio.sleep(1.0)
    assert len(phone.video_frames) >= 5, "video decoded while ringing"
    assert phone.audio_frames == 0, "no door audio before answering"
    speaker = station.speaker
    assert speaker.frames == 0
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    await asyncio.sleep(1.5)
    assert phone.audible_frames > 10, "door microphone reaches the device"
    assert speaker.audible_frames > 10, "device audio reaches the door speaker"
    await phone.send({"type": "hangup", "call": ring["call"]})
    await phone.expect("call", state="ended")
    assert recorder.types().count("CallRinging") == 1
    assert [e.type for e in recorder.events if e.type.startswith("Call")] == [
        "CallRinging",
        "CallAnswered",
        "CallEnded",
    ]
