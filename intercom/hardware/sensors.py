"""The optional door contact (reed switch) and tamper switch."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from intercom.config import DoorContactConfig, TamperConfig
from intercom.events import (
    DoorClosed,
    DoorForcedOpen,
    DoorHeldOpen,
    DoorOpened,
    EventBus,
    TamperCleared,
    TamperDetected,
)
from intercom.hardware.pins import EdgeRelay, open_device

log = logging.getLogger(__name__)


class DoorState(enum.Enum):
    """What the door contact reports."""

    CLOSED = "closed"
    OPEN = "open"
    UNKNOWN = "unknown"  # no contact wired


class DoorContact:
    """Reports the door open or closed, held open too long, or forced open.

    An opening is *forced* unless the lock was energised within ``grant_window_s``
    before it (``last_unlocked_at`` gives that time, from the lock).
    """

    def __init__(
        self,
        config: DoorContactConfig,
        door: str,
        pin_factory: Any,
        bus: EventBus,
        last_unlocked_at: Callable[[], float],
    ) -> None:
        from gpiozero import DigitalInputDevice  # noqa: PLC0415

        self.config = config
        self.door = door
        self._bus = bus
        self._last_unlocked_at = last_unlocked_at
        self._held_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.device = open_device(
            f"hardware.door_contact (GPIO{config.pin})",
            lambda: DigitalInputDevice(config.pin, pull_up=True, pin_factory=pin_factory),
        )
        self.state = DoorState.UNKNOWN

    def _read(self) -> DoorState:
        high = not self.device.is_active  # pull-up: active means the pin reads low
        return DoorState.OPEN if high == self.config.open_when_high else DoorState.CLOSED

    def describe(self) -> str:
        """The pin read now, in words (gpiozero raises when it cannot be read)."""
        return f"GPIO{self.config.pin} reads the door {self._read().value}"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the current state and start listening for changes."""
        self._loop = loop
        self.state = self._read()
        relay = EdgeRelay(loop, lambda _active, at: self._changed(at))
        self.device.when_activated = relay.active
        self.device.when_deactivated = relay.inactive
        if self.state is DoorState.OPEN:
            self._arm_held_timer()

    def _changed(self, at: float) -> None:
        state = self._read()
        if state is self.state:
            return
        self.state = state
        if state is DoorState.OPEN:
            self._bus.publish(DoorOpened(door=self.door))
            if at - self._last_unlocked_at() > self.config.grant_window_s:
                log.warning("door %s opened without an unlock", self.door)
                self._bus.publish(DoorForcedOpen(door=self.door))
            self._arm_held_timer()
        else:
            self._cancel_held_timer()
            self._bus.publish(DoorClosed(door=self.door))

    def _arm_held_timer(self) -> None:
        self._cancel_held_timer()
        loop = self._loop or asyncio.get_running_loop()
        self._held_timer = loop.call_later(self.config.held_open_s, self._held_open)

    def _cancel_held_timer(self) -> None:
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None

    def _held_open(self) -> None:
        self._held_timer = None
        if self.state is DoorState.OPEN:
            self._bus.publish(DoorHeldOpen(door=self.door, seconds=self.config.held_open_s))

    def close(self) -> None:
        """Stop timers and release the pin."""
        self._cancel_held_timer()
        self.device.close()


class TamperSwitch:
    """Raises ``TamperDetected`` when the station's cover is opened, ``TamperCleared`` when shut."""

    def __init__(self, config: TamperConfig, pin_factory: Any, bus: EventBus) -> None:
        from gpiozero import DigitalInputDevice  # noqa: PLC0415

        self.config = config
        self._bus = bus
        self.tripped_at: float | None = None
        self.device = open_device(
            f"hardware.tamper (GPIO{config.pin})",
            lambda: DigitalInputDevice(config.pin, pull_up=True, pin_factory=pin_factory),
        )

    def _tampered(self) -> bool:
        low = bool(self.device.is_active)
        return low == self.config.active_low

    def describe(self) -> str:
        """The pin read now, in words (gpiozero raises when it cannot be read)."""
        return f"GPIO{self.config.pin} reads the cover {'open' if self._tampered() else 'closed'}"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start listening; a switch already tripped at start is reported too."""
        relay = EdgeRelay(loop, lambda _active, _at: self._changed())
        self.device.when_activated = relay.active
        self.device.when_deactivated = relay.inactive
        self._changed()

    def _changed(self) -> None:
        if self._tampered():
            if self.tripped_at is None:
                self.tripped_at = time.time()
                log.warning("tamper switch tripped")
                self._bus.publish(TamperDetected(sensor="cover"))
        elif self.tripped_at is not None:
            self.tripped_at = None
            log.info("tamper switch closed again")
            self._bus.publish(TamperCleared(sensor="cover"))

    def close(self) -> None:
        """Release the pin."""
        self.device.close()
