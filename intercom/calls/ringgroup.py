"""The ring group: a press rings every online device of the flat; the first answer wins.

One call at a time per station (one door, one camera, one speaker): presses during a
ring or a call start nothing. Every transition is logged and raised as an event.

Devices of the flat that are not online are rung through the ``Notifier`` (Web Push,
``intercom.push``): the call then rings on for them until the ring time is up even with
no device online, a device that comes online during the ring is rung at once (opened
from the notification, it shows the ringing call), and one may decline without coming
online (``decline_remote``). When the call is taken or missed the notifier is told, to
clear the notification on the devices it rang.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from intercom.config import ButtonConfig, CallsConfig
from intercom.events import (
    CallAnswered,
    CallDeclined,
    CallEnded,
    CallMissed,
    CallRinging,
    DoorbellPressed,
    Event,
    EventBus,
)

log = logging.getLogger(__name__)


class CallState(enum.Enum):
    """Where a call is."""

    RINGING = "ringing"  # devices are rung and see the door; no audio either way
    IN_CALL = "in_call"  # one device answered: two-way audio with it, the others stopped
    MISSED = "missed"  # over: nobody answered in time, or every rung device declined
    ENDED = "ended"  # over: an answered call was hung up, timed out or lost its device


class Notifier(Protocol):
    """Rings the devices that are not online (``intercom.push.notifier``)."""

    def ring(self, call: Call, online: set[str]) -> set[str]:
        """Ring the flat's principals not in ``online``; the principals it rang."""

    def settled(self, call: Call, outcome: str, principals: set[str]) -> None:
        """The call was ``taken``, ``missed`` or ``ended``: clear it on ``principals``."""


class Device(Protocol):
    """An online, authenticated resident device (a signalling session)."""

    id: str
    principal: str
    flats: frozenset[str]

    def send(self, message: dict[str, Any]) -> None:
        """Queue a signalling message to the device."""

    def start_video(self) -> None:
        """Show the door to the device."""

    def stop_video(self) -> None:
        """Stop showing the door."""

    def start_audio(self) -> None:
        """Two-way audio with the door."""

    def stop_audio(self) -> None:
        """No audio either way."""


@dataclass
class Call:
    """One ring and, if answered, one conversation."""

    id: str
    flat: str
    pressed_at: float
    state: CallState = CallState.RINGING
    rung: list[Device] = field(default_factory=list)
    ringing: list[Device] = field(default_factory=list)
    answerer: Device | None = None
    answered_at: float | None = None
    ring_sent_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    pushed: set[str] = field(default_factory=set)  # rung by the notifier, not yet answered
    notified: set[str] = field(default_factory=set)  # every principal the notifier rang
    label: str | None = None  # what the installer named the button for its residents

    def ring_message(self) -> dict[str, Any]:
        """What a rung device is sent (the button's label, when it has one)."""
        message = {"type": "ring", "call": self.id, "flat": self.flat, "at": self.pressed_at}
        return message if self.label is None else {**message, "label": self.label}


class RingGroup:
    """Online devices and the current call."""

    def __init__(
        self,
        bus: EventBus,
        config: CallsConfig,
        is_active: Callable[[str], bool],
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
    ) -> None:
        self._bus = bus
        self.config = config
        self._is_active = is_active
        self._clock = clock
        self.notifier = notifier
        self.devices: list[Device] = []
        self.call: Call | None = None
        self.last_call: Call | None = None
        self.calls = 0
        self.labels: dict[str, str] = {}  # button name: what its residents see

    def set_labels(self, buttons: list[ButtonConfig]) -> None:
        """The buttons' labels for residents (at start, and from the config writer)."""
        self.labels = {b.name: b.label for b in buttons if b.label is not None}

    @property
    def state(self) -> str:
        """``idle``, ``ringing`` or ``in_call``."""
        return self.call.state.value if self.call else "idle"

    # --- devices -------------------------------------------------------------------------

    def add(self, device: Device) -> None:
        """A device came online; during a ring of its flat it is rung at once."""
        self.devices.append(device)
        call = self.call
        if (
            call is not None
            and call.state is CallState.RINGING
            and call.flat in device.flats
            and device not in call.rung
            and self._is_active(device.principal)
        ):
            call.rung.append(device)
            call.ringing.append(device)
            call.pushed.discard(device.principal)
            device.send(call.ring_message())
            device.start_video()
            log.info("call %s: a device came online and is rung", call.id)

    def remove(self, device: Device) -> None:
        """A device went away: it leaves the ring, or ends the call it was in."""
        if device in self.devices:
            self.devices.remove(device)
        call = self.call
        if call is None:
            return
        if call.answerer is device:
            self._end(call, "device gone")
        elif device in call.ringing:
            call.ringing.remove(device)
            if not call.ringing and not call.pushed:
                self._missed(call, "every rung device went away")

    # --- the door ----------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Bus handler: a press rings the flat."""
        if isinstance(event, DoorbellPressed):
            self.press(event.flat, event.at, event.button)

    def press(self, flat: str, pressed_at: float, button: str = "") -> Call | None:
        """Ring every online device of ``flat``; None when a call is already on."""
        if self.call is not None:
            log.info(
                "call %s is %s: press for flat %s starts no second call",
                self.call.id,
                self.call.state.value,
                flat,
            )
            return None
        call = Call(id=f"c-{secrets.token_hex(8)}", flat=flat, pressed_at=pressed_at,
                    label=self.labels.get(button))
        targets = [d for d in self.devices if flat in d.flats and self._is_active(d.principal)]
        self.call, self.last_call = call, call
        self.calls += 1
        call.rung = list(targets)
        call.ringing = list(targets)
        message = call.ring_message()
        for device in targets:
            device.send(message)
            device.start_video()
        call.ring_sent_at = self._clock()
        if self.notifier is not None:
            call.pushed = self.notifier.ring(call, {d.principal for d in self.devices})
            call.notified = set(call.pushed)
        log.info("call %s: idle -> ringing (flat %s, %d devices, %d pushed)",
                 call.id, flat, len(targets), len(call.pushed))
        self._bus.publish(CallRinging(call=call.id, flat=flat, devices=len(targets)))
        if not targets and not call.pushed:
            self._missed(call, "no device online")
            return call
        loop = asyncio.get_running_loop()
        call.timer = loop.call_later(self.config.ring_timeout_s, self._ring_timeout, call)
        return call

    def hangup_door(self, reason: str = "hung up at the door") -> bool:
        """End the current call from the door side; False when there is none."""
        call = self.call
        if call is None:
            return False
        if call.state is CallState.IN_CALL:
            self._end(call, reason)
        else:
            self._missed(call, reason)
        return True

    # --- the devices' requests ------------------------------------------------------------

    def _current(self, call_id: str) -> Call | None:
        call = self.call
        return call if call is not None and call.id == call_id else None

    def accept(self, device: Device, call_id: str) -> None:
        """The device answers: the first one wins, later ones are told it is taken."""
        call = self._current(call_id)
        if call is None or device not in call.rung:
            device.send({"type": "call", "call": call_id, "state": "ended"})
            return
        if call.state is not CallState.RINGING or device not in call.ringing:
            device.send({"type": "call", "call": call_id, "state": "taken"})
            return
        self._cancel_timer(call)
        call.state, call.answerer, call.answered_at = CallState.IN_CALL, device, self._clock()
        log.info("call %s: ringing -> in_call", call.id)
        for other in call.ringing:
            if other is not device:
                other.stop_video()
                other.send({"type": "call", "call": call.id, "state": "taken"})
        call.ringing = []
        self._settled(call, "taken", exclude=device.principal)
        device.start_audio()
        device.send({"type": "call", "call": call.id, "state": "answered"})
        self._bus.publish(CallAnswered(call=call.id, principal=device.principal))
        loop = asyncio.get_running_loop()
        call.timer = loop.call_later(self.config.max_call_s, self._end, call, "maximum length")

    def decline(self, device: Device, call_id: str) -> None:
        """The device stops ringing; when none rings any more the call is missed."""
        call = self._current(call_id)
        if call is None or call.state is not CallState.RINGING or device not in call.ringing:
            return
        call.ringing.remove(device)
        device.stop_video()
        self._bus.publish(CallDeclined(call=call.id, principal=device.principal))
        if not call.ringing and not call.pushed:
            self._missed(call, "declined by every device")

    def decline_remote(self, principal: str, call_id: str) -> bool:
        """A rung principal declines from its notification, not online; False if not rung."""
        call = self._current(call_id)
        if call is None or call.state is not CallState.RINGING:
            return False
        devices = [d for d in call.ringing if d.principal == principal]
        if principal not in call.pushed and not devices:
            return False
        call.pushed.discard(principal)
        for device in devices:
            call.ringing.remove(device)
            device.stop_video()
        self._bus.publish(CallDeclined(call=call.id, principal=principal))
        if not call.ringing and not call.pushed:
            self._missed(call, "declined by every device")
        return True

    def hangup(self, device: Device, call_id: str) -> None:
        """The answering device hangs up (a ringing one declines)."""
        call = self._current(call_id)
        if call is None:
            return
        if call.answerer is device:
            self._end(call, "hung up by the resident")
        else:
            self.decline(device, call_id)

    def may_unlock(self, device: Device) -> bool:
        """Whether the device is rung by or in the current call (unlocking from a call)."""
        call = self.call
        return call is not None and (device is call.answerer or device in call.ringing)

    # --- endings -----------------------------------------------------------------------------

    def _ring_timeout(self, call: Call) -> None:
        if self.call is call and call.state is CallState.RINGING:
            self._missed(call, "no answer")

    def _missed(self, call: Call, why: str) -> None:
        self._cancel_timer(call)
        log.info("call %s: %s -> missed (%s)", call.id, call.state.value, why)
        call.state = CallState.MISSED
        for device in call.rung:
            device.stop_video()
            if device in self.devices:
                device.send({"type": "call", "call": call.id, "state": "missed"})
        call.ringing = []
        self._settled(call, "missed")
        self.call = None
        self._bus.publish(CallMissed(call=call.id, flat=call.flat))

    def _end(self, call: Call, reason: str) -> None:
        if self.call is not call or call.state is not CallState.IN_CALL:
            return
        self._cancel_timer(call)
        log.info("call %s: in_call -> ended (%s)", call.id, reason)
        call.state = CallState.ENDED
        device = call.answerer
        if device is not None:
            device.stop_audio()
            device.stop_video()
            if device in self.devices:
                device.send({"type": "call", "call": call.id, "state": "ended"})
        self.call = None
        duration = round(self._clock() - (call.answered_at or call.pressed_at), 3)
        self._bus.publish(CallEnded(call=call.id, reason=reason, duration_s=duration))

    def _settled(self, call: Call, outcome: str, exclude: str = "") -> None:
        call.pushed.clear()
        notified = call.notified - {exclude}
        if self.notifier is not None and notified:
            self.notifier.settled(call, outcome, notified)

    @staticmethod
    def _cancel_timer(call: Call) -> None:
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None

    def close(self) -> None:
        """Stop the timers (the station is stopping)."""
        if self.call is not None:
            self.hangup_door("station stopping")
