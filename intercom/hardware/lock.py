"""The lock relay: timed pulses, a hard maximum open time, off on stop and on crash.

The relay is energised only through ``pulse``, and only the command verifier holds the
lock (the station hands it to nobody else). Whatever happens afterwards, an independent
guard thread releases the relay once it has been energised for ``max_open_s`` without a
break: a pulse whose timer never fires, a task that crashes mid-pulse, even a blocked
event loop cannot hold the door open longer.

What happens when the process dies: ``close`` runs on a clean stop and from ``atexit``;
on SIGKILL or a power cut the GPIO line is released and goes back to its power-on
default. The wiring in ``hw/wiring.md`` makes that default "relay off" (a pin pulled
low at power-on driving an active-high relay input), so the lock falls back to its
fail-secure (or, if the installer wired it so, fail-safe) state.
"""

from __future__ import annotations

import asyncio
import atexit
import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from intercom.config import RelayConfig
from intercom.errors import HardwareError
from intercom.events import EventBus, LockStateChanged
from intercom.hardware.pins import open_device

log = logging.getLogger(__name__)


class LockState(enum.Enum):
    """What the relay is doing."""

    LOCKED = "locked"  # relay released: the strike holds the door
    UNLOCKED = "unlocked"  # relay energised: the door can be pushed open


class Lock:
    """The relay that drives the door strike or motor lock."""

    def __init__(
        self,
        config: RelayConfig,
        pin_factory: Any,
        bus: EventBus,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from gpiozero import OutputDevice  # noqa: PLC0415

        self.config = config
        self._bus = bus
        self._loop = loop
        self._clock = clock
        self._mutex = threading.RLock()
        self._state = LockState.LOCKED
        self._opened_at = 0.0
        self._release_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._guard: threading.Timer | None = None
        self._closed = False
        self.last_unlocked_at = -1e18  # monotonic time of the last energise
        self.device = open_device(
            f"hardware.relay (GPIO{config.pin})",
            lambda: OutputDevice(
                config.pin,
                active_high=config.active_high,
                initial_value=False,
                pin_factory=pin_factory,
            ),
        )
        atexit.register(self.close)

    @property
    def state(self) -> LockState:
        """Whether the relay is energised now."""
        return self._state

    @property
    def door(self) -> str:
        """The door this relay opens."""
        return self.config.door

    def pulse(self, seconds: float | None = None, reason: str = "grant") -> float:
        """Energise for ``seconds`` (default ``pulse_s``), clamped to the maximum.

        A pulse during an open period extends it, but never past ``max_open_s`` from
        the moment the relay was energised. Returns the seconds it will stay energised.
        """
        seconds = self.config.pulse_s if seconds is None else seconds
        seconds = min(max(seconds, 0.0), self.config.max_open_s)
        with self._mutex:
            if self._closed:
                return 0.0
            now = self._clock()
            self._energise_locked(reason, now)
            limit = self._opened_at + self.config.max_open_s
            self._release_at = min(max(self._release_at, now + seconds), limit)
            remaining = self._release_at - now
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(remaining, self.release, "pulse ended")
        return remaining

    def _energise_locked(self, reason: str, now: float) -> None:
        self.last_unlocked_at = now
        if self._state is LockState.UNLOCKED:
            return
        self.device.on()
        self._state = LockState.UNLOCKED
        self._opened_at = now
        self._release_at = now
        self._guard = threading.Timer(self.config.max_open_s, self._guard_fired)
        self._guard.daemon = True
        self._guard.name = f"lock-guard-{self.config.door}"
        self._guard.start()
        log.info("lock %s: relay energised (%s)", self.door, reason)
        self._announce(LockState.UNLOCKED, reason)

    def readback(self) -> str:
        """The relay pin read back: what it is driven to, or HardwareError when it differs.

        Reads only: the relay is never moved here.
        """
        with self._mutex:
            driven = self._state is LockState.UNLOCKED
            level = bool(self.device.value)  # gpiozero raises when the pin is closed
        words = {True: "energised", False: "released"}
        if level != driven:
            raise HardwareError(f"GPIO{self.config.pin} reads {words[level]} while driven "
                                f"{words[driven]}")
        return f"GPIO{self.config.pin} reads back {words[driven]}, as driven"

    def release(self, reason: str = "released") -> None:
        """De-energise the relay now (safe from any thread, any number of times)."""
        with self._mutex:
            if self._state is LockState.UNLOCKED or self.device.value:
                self.device.off()
            if self._state is LockState.LOCKED:
                return
            self._state = LockState.LOCKED
            guard, self._guard = self._guard, None
        if guard is not None and guard is not threading.current_thread():
            guard.cancel()
        log.info("lock %s: relay released (%s)", self.door, reason)
        self._announce(LockState.LOCKED, reason)

    def _guard_fired(self) -> None:
        log.warning(
            "lock %s: energised for the maximum %.1f s; the guard releases it",
            self.door,
            self.config.max_open_s,
        )
        self.release("maximum open time reached")

    def _announce(self, state: LockState, reason: str) -> None:
        event = LockStateChanged(door=self.door, state=state.value, reason=reason)
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._bus.publish(event)
        else:
            self._loop.call_soon_threadsafe(self._bus.publish, event)

    def close(self) -> None:
        """Release the relay for good and free the pin."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
            if self._guard is not None:
                self._guard.cancel()
            self._state = LockState.LOCKED
            try:
                self.device.off()
                self.device.close()
            except Exception:
                log.exception("lock %s: cannot switch the relay off", self.door)
        atexit.unregister(self.close)
        log.info("lock %s: relay off, pin released", self.door)
