"""The ring group's state machine on its own, with devices that record what they are told."""

from __future__ import annotations

import asyncio
from typing import Any

from intercom.calls.ringgroup import CallState, RingGroup
from intercom.config import CallsConfig
from intercom.events import DoorbellPressed, EventBus

from .conftest import Recorder


class Phone:
    """A device of the ring group that keeps its messages and gate states."""

    def __init__(self, name: str, flats: frozenset[str] = frozenset({"1"})) -> None:
        self.id = name
        self.principal = f"res-{name}"
        self.flats = flats
        self.sent: list[dict[str, Any]] = []
        self.video = False
        self.audio = False

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def start_video(self) -> None:
        self.video = True

    def stop_video(self) -> None:
        self.video = False

    def start_audio(self) -> None:
        self.audio = True

    def stop_audio(self) -> None:
        self.audio = False

    def states(self) -> list[str]:
        return [m["state"] for m in self.sent if m["type"] == "call"]


def group(bus: EventBus, active: set[str] | None = None, **config: float) -> RingGroup:
    settings = CallsConfig.model_construct(**{"ring_timeout_s": 30, "max_call_s": 300, **config})
    return RingGroup(bus, settings, lambda pid: active is None or pid in active)


async def test_a_press_without_devices_is_missed_at_once(bus: EventBus, recorder: Recorder):
    rings = group(bus)
    bus.on(rings.on_event)
    bus.publish(DoorbellPressed(button="bell", flat="1"))
    assert recorder.types()[-2:] == ["CallRinging", "CallMissed"]
    assert recorder.of("CallRinging")[0].devices == 0
    assert rings.state == "idle"


async def test_first_accept_wins_and_gates_follow(bus: EventBus, recorder: Recorder):
    rings = group(bus)
    a, b, c = Phone("a"), Phone("b"), Phone("c", frozenset({"2"}))
    for phone in (a, b, c):
        rings.add(phone)
    call = rings.press("1", 1000.0)
    assert call is not None
    assert (a.video, b.video, c.video) == (True, True, False)
    assert rings.state == "ringing"
    rings.accept(b, call.id)
    rings.accept(a, call.id)
    assert call.state is CallState.IN_CALL
    assert (b.states(), a.states()) == (["answered"], ["taken", "taken"])
    assert (a.video, a.audio, b.video, b.audio) == (False, False, True, True)
    assert c.sent == []
    # neither a stranger's hangup nor a late decline touches the call
    rings.hangup(a, call.id)
    rings.decline(a, call.id)
    rings.hangup(b, "c-other")
    assert rings.state == "in_call"
    rings.hangup(b, call.id)
    assert (b.states()[-1], b.audio, b.video) == ("ended", False, False)
    assert rings.state == "idle"
    assert [e.type for e in recorder.events] == ["CallRinging", "CallAnswered", "CallEnded"]


async def test_ring_timeout_and_maximum_length_fire(bus: EventBus, recorder: Recorder):
    rings = group(bus, ring_timeout_s=0.05, max_call_s=0.05)
    phone = Phone("a")
    rings.add(phone)
    rings.press("1", 1000.0)
    await recorder.wait_for("CallMissed", timeout=1)
    assert phone.states() == ["missed"]
    assert not phone.video
    call = rings.press("1", 1001.0)
    assert call is not None
    rings.accept(phone, call.id)
    (ended,) = await recorder.wait_for("CallEnded", timeout=1)
    assert ended.reason == "maximum length"
    assert phone.states()[-1] == "ended"
    await asyncio.sleep(0.1)  # no timer of an old call fires into the next one
    assert rings.state == "idle"


async def test_inactive_principals_and_departures(bus: EventBus, recorder: Recorder):
    rings = group(bus, active={"res-a", "res-b"})
    a, b, revoked = Phone("a"), Phone("b"), Phone("x")
    for phone in (a, b, revoked):
        rings.add(phone)
    call = rings.press("1", 1000.0)
    assert call is not None
    assert revoked.sent == []
    assert not revoked.video
    rings.remove(a)
    assert rings.state == "ringing"
    rings.remove(b)
    assert rings.state == "idle"
    assert recorder.types()[-1] == "CallMissed"
    rings.add(a)
    assert rings.press("1", 1001.0) is not None  # a fresh call after the miss
    assert rings.press("1", 1002.0) is None  # but not a second one during it
