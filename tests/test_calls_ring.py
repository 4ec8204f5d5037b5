"""The ring group with real aiortc devices over the station's own addresses."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from intercom.config import CallsConfig
from intercom.control import request
from intercom.events import DoorbellPressed
from intercom.station import Station

from . import test_calls_client as kit
from .conftest import INTERCOM, Recorder
from .test_calls_client import Device, DeviceKey, call_settings, eventually, pair

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
    await eventually(lambda: len(phone.video_frames) >= 5, what="video decoded while ringing")
    assert phone.audio_frames == 0, "no door audio before answering"
    speaker = station.speaker
    assert speaker.frames == 0
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    await eventually(lambda: phone.audible_frames > 10, what="door microphone reaches the device")
    await eventually(lambda: speaker.audible_frames > 10, what="device audio reaches the door")
    status = station.status()
    assert status["speaker"]["audible_frames"] >= 10
    timing = status["calls"]["last_call"]
    assert timing["answered_at"] < timing["first_audio_at"] < timing["answered_at"] + 5
    await phone.send({"type": "hangup", "call": ring["call"]})
    await phone.expect("call", state="ended")
    assert recorder.types().count("CallRinging") == 1
    assert [e.type for e in recorder.events if e.type.startswith("Call")] == [
        "CallRinging",
        "CallAnswered",
        "CallEnded",
    ]


def press(station: Station, flat: str = "1") -> None:
    station.bus.publish(DoorbellPressed(button="bell0", flat=flat))


async def test_a_ring_renegotiates_the_audio_and_leaves_a_fresh_idle_connection(
    call_station: Station, devices: list[Device]
):
    station = call_station
    assert station.calls is not None
    assert station.calls.signalling is not None
    phone, other = await online(station, devices, 2)
    sessions = {s.principal: s for s in station.calls.signalling.sessions.values()}
    first = {d.principal: sessions[d.principal].peer for d in (phone, other)}
    assert all(p is not None and not p.media_on for p in first.values())
    press(station)
    ring = await phone.expect("ring")
    await eventually(lambda: len(phone.video_frames) >= 1, what="video with no negotiation")
    # then the ring's offer renegotiates the same connection (same number): audio on
    offer = await phone.expect("offer")
    assert offer["peer"] == 1
    assert "a=sendrecv" in offer["sdp"].split("m=audio")[1].split("m=application")[0]
    await other.expect("offer", peer=1)
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    await eventually(lambda: phone.audible_frames > 5, what="door audio once answered")
    # the device told "taken" is out of the call at once: a fresh idle connection
    await other.wait_renewed(1)
    assert sessions[other.principal].peer is not first[other.principal]
    await eventually(
        lambda: first[other.principal].pc.connectionState == "closed",  # type: ignore[union-attr]
        what="the replaced connection closed once the new one was answered",
    )
    # the answering one keeps its call's connection until the call is over
    assert sessions[phone.principal].peer is first[phone.principal]
    await phone.send({"type": "hangup", "call": ring["call"]})
    await phone.expect("call", state="ended")
    await phone.wait_renewed(1)
    fresh = sessions[phone.principal].peer
    assert fresh is not None
    assert not fresh.media_on
    assert first[phone.principal].pc.connectionState == "closed"  # type: ignore[union-attr]
    # and the next ring works on the fresh connection
    frames = len(phone.video_frames)
    press(station)
    await phone.expect("ring")
    await eventually(lambda: len(phone.video_frames) > frames + 3, what="video on the fresh one")
    timing = station.status()["calls"]["last_call"]
    assert timing["pressed_at"] < timing["first_frame_at"]  # in order; its speed: scripts/bench
    assert timing["devices"] == 2  # both rung: the first frame went to each
    assert timing["last_first_frame_at"] is not None


async def test_two_accepts_at_once_give_exactly_one_call(
    call_station: Station, devices: list[Device]
):
    station = call_station
    recorder = Recorder(station.bus)
    first, second = await online(station, devices, 2)
    for round_ in range(3):
        press(station)
        ring = await first.expect("ring")
        assert (await second.expect("ring"))["call"] == ring["call"]
        accept = {"type": "accept", "call": ring["call"]}
        await asyncio.gather(first.send(accept), second.send(accept))
        first_state = (await first.expect("call", call=ring["call"]))["state"]
        second_state = (await second.expect("call", call=ring["call"]))["state"]
        assert {first_state, second_state} == {"answered", "taken"}
        assert len(recorder.of("CallAnswered")) == round_ + 1
        assert station.calls is not None
        assert station.calls.state == "in_call"
        winner = first if first_state == "answered" else second
        await winner.send({"type": "hangup", "call": ring["call"]})
        await winner.expect("call", state="ended")
    assert len(recorder.of("CallRinging")) == 3
    assert len(recorder.of("CallEnded")) == 3


async def test_unanswered_ring_is_missed_and_stops_video(
    call_station: Station, devices: list[Device]
):
    station = call_station
    recorder = Recorder(station.bus)
    (phone,) = await online(station, devices, 1)
    press(station)
    ring = await phone.expect("ring")
    missed = await phone.expect("call", timeout=6, state="missed")
    assert missed["call"] == ring["call"]
    (event,) = recorder.of("CallMissed")
    assert event.flat == "1"
    assert "CallAnswered" not in recorder.types()
    await asyncio.sleep(0.3)
    frames = len(phone.video_frames)
    await asyncio.sleep(0.5)
    assert len(phone.video_frames) == frames, "no video after the ring ended"
    # a late accept is told the call is over
    await phone.send({"type": "accept", "call": ring["call"]})
    assert (await phone.expect("call", call=ring["call"]))["state"] == "ended"


async def test_declined_by_every_device_is_missed(call_station: Station, devices: list[Device]):
    station = call_station
    recorder = Recorder(station.bus)
    first, second = await online(station, devices, 2)
    press(station)
    ring = await first.expect("ring")
    await first.send({"type": "decline", "call": ring["call"]})
    await recorder.wait_for("CallDeclined")
    assert station.calls is not None
    assert station.calls.state == "ringing", "the other device still rings"
    await second.send({"type": "decline", "call": ring["call"]})
    await recorder.wait_for("CallMissed")
    assert len(recorder.of("CallDeclined")) == 2
    assert station.calls.state == "idle"


async def test_device_vanishing_mid_call_ends_it(call_station: Station, devices: list[Device]):
    station = call_station
    recorder = Recorder(station.bus)
    phone, other = await online(station, devices, 2)
    press(station)
    ring = await phone.expect("ring")
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    await other.expect("call", state="taken")
    await phone.vanish()
    (ended,) = await recorder.wait_for("CallEnded")
    assert ended.reason == "device gone"
    assert station.calls is not None
    assert station.calls.state == "idle"
    # the station carries on: the next press rings the device that is left
    press(station)
    await other.expect("ring")


async def test_presses_during_a_call_start_no_second_call(
    call_station: Station, devices: list[Device]
):
    station = call_station
    recorder = Recorder(station.bus)
    (phone,) = await online(station, devices, 1)
    press(station)
    ring = await phone.expect("ring")
    press(station)
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    press(station)
    await asyncio.sleep(0.2)
    assert len(recorder.of("CallRinging")) == 1
    assert [m for m in phone.seen if m["type"] == "ring"] == [ring]


async def test_revoked_device_is_never_rung_and_loses_its_socket(
    call_station: Station, devices: list[Device]
):
    station = call_station
    recorder = Recorder(station.bus)
    kept, revoked = await online(station, devices, 2)
    cli = await asyncio.create_subprocess_exec(
        *INTERCOM, "principals", "revoke", revoked.principal,
        "--state-dir", str(station.state_dir), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await cli.communicate()
    assert cli.returncode == 0, err
    assert out.decode().startswith("revoked")
    # At once, not at the next housekeeping: when the command has its answer, the
    # station has dropped the revoked device's session (and kept the other).
    assert station.calls is not None
    assert station.calls.signalling is not None
    online_now = {s.principal for s in station.calls.signalling.sessions.values()}
    assert online_now == {kept.principal}
    press(station)
    await kept.expect("ring")
    (ringing,) = recorder.of("CallRinging")
    assert ringing.devices == 1
    for _ in range(100):
        if revoked.close_code is not None:
            break
        await asyncio.sleep(0.05)
    assert revoked.close_code == 4401
    assert [m for m in revoked.seen if m["type"] == "ring"] == []
    # and it cannot sign in again
    with pytest.raises(AssertionError):
        await revoked.connect()


async def test_unpaired_device_is_refused_and_never_rung(
    call_station: Station, devices: list[Device]
):
    station = call_station
    (paired,) = await online(station, devices, 1)
    stranger = Device(station, DeviceKey(), "res-0000000000000000", "")
    devices.append(stranger)
    with pytest.raises(AssertionError):
        await stranger.connect()
    assert stranger.ws is not None
    assert stranger.ws.close_code == 4401
    impostor = Device(station, DeviceKey(), paired.principal, "")  # right id, wrong key
    devices.append(impostor)
    with pytest.raises(AssertionError):
        await impostor.connect()
    assert impostor.ws is not None
    assert impostor.ws.close_code == 4401
    press(station)
    await paired.expect("ring")


async def test_device_of_another_flat_is_never_rung(tmp_path: Path, devices: list[Device]):
    station = Station(call_settings(tmp_path / "state", flats=("1", "2")))
    await station.start()
    try:
        recorder = Recorder(station.bus)
        (one,) = await online(station, devices, 1, flat="1")
        (two,) = await online(station, devices, 1, flat="2")
        press(station, "2")
        ring = await two.expect("ring")
        assert ring["flat"] == "2"
        await asyncio.sleep(0.5)
        assert [m for m in one.seen if m["type"] == "ring"] == []
        assert one.video_frames == [], "another flat's device sees nothing"
        assert recorder.of("CallRinging")[0].devices == 1
    finally:
        await station.stop("test finished")


async def test_maximum_call_length_and_hangup_at_the_door(
    call_station: Station, devices: list[Device]
):
    station = call_station
    assert station.calls is not None
    recorder = Recorder(station.bus)
    (phone,) = await online(station, devices, 1)
    station.calls.ring_group.config = CallsConfig.model_construct(ring_timeout_s=3, max_call_s=0.5)
    press(station)
    ring = await phone.expect("ring")
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    await phone.expect("call", state="ended")
    assert recorder.of("CallEnded")[-1].reason == "maximum length"
    station.calls.ring_group.config = CallsConfig()
    press(station)
    ring = await phone.expect("ring")
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    answer = await request(station.state_dir, {"request": "hangup"})
    assert answer == {"ok": True, "ended": True}
    await phone.expect("call", state="ended")
    assert recorder.of("CallEnded")[-1].reason == "hung up at the door"


async def test_simulated_button_press_rings(call_station: Station, devices: list[Device]):
    station = call_station
    (phone,) = await online(station, devices, 1)
    await request(station.state_dir, {"request": "sim", "action": "press", "button": "bell0"})
    ring = await phone.expect("ring")
    assert ring["flat"] == "1"
    assert abs(ring["received_at"] - ring["at"]) < 1
    status = (await request(station.state_dir, {"request": "status"}))["status"]
    assert status["call"] == "ringing"
    assert status["listening"]["web"] == station.calls.url if station.calls else False
    timing = status["calls"]["last_call"]
    assert timing["call"] == ring["call"]
    assert timing["ring_sent_at"] >= timing["pressed_at"]


def open_sockets() -> int:
    """Sockets open in this process (the station's and the test devices')."""
    fd_dir = Path("/proc/self/fd")
    count = 0
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            count += str(fd.readlink()).startswith("socket:")
    return count


async def test_rings_declined_and_answered_leave_no_connection_behind(
    call_station: Station, devices: list[Device]
):
    """Every ring replaces the rung devices' connections: none may be left open.

    A decline stops the device's video twice (its own decline, then the call missed);
    each stop asked for a fresh connection, and the first one made was never used nor
    closed: 6 sockets a declined ring, found by ``scripts/soak``.
    """
    station = call_station
    (phone,) = await online(station, devices, 1)
    await asyncio.sleep(0.5)
    before = open_sockets()
    for round_ in range(3):
        number = phone.number
        press(station)
        ring = await phone.expect("ring")
        await phone.expect("offer", peer=number)  # the audio, renegotiated while ringing
        kind = "decline" if round_ != 1 else "accept"
        await phone.send({"type": kind, "call": ring["call"]})
        if kind == "accept":
            await phone.expect("call", state="answered")
            await phone.send({"type": "hangup", "call": ring["call"]})
        await phone.expect("call", state="missed" if kind == "decline" else "ended")
        await phone.wait_renewed(number)
    await eventually(lambda: open_sockets() == before, what=f"sockets back to {before}")
