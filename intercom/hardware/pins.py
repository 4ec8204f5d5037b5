"""Choosing the gpiozero pin backend, and opening pins with clear errors."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from intercom.errors import HardwareError


def make_pin_factory(kind: Literal["lgpio", "mock"]) -> Any:
    """A new pin factory of the configured kind (one per station)."""
    if kind == "mock":
        from gpiozero.pins.mock import MockFactory  # noqa: PLC0415

        return MockFactory()
    if not os.access(".", os.W_OK | os.X_OK):
        # lgpio's edge notifications are FIFOs it makes in the working directory and
        # opens by a relative name: elsewhere the first button fails obscurely.
        raise HardwareError(
            f"hardware.pin_factory: lgpio needs a writable working directory for its "
            f"notification FIFOs, and {Path.cwd()} is not (intercom.service runs in "
            "/run/intercom)"
        )
    try:
        from gpiozero.pins.lgpio import LGPIOFactory  # noqa: PLC0415

        return LGPIOFactory()
    except Exception as exc:
        raise HardwareError(
            f"hardware.pin_factory: cannot open the lgpio backend ({exc}); "
            "on a machine without GPIO run 'intercom run --simulate'"
        ) from exc


def open_device(what: str, factory: Callable[[], Any]) -> Any:
    """Create a gpiozero device, turning its errors into one clear HardwareError."""
    try:
        return factory()
    except Exception as exc:
        name = type(exc).__name__
        raise HardwareError(f"{what}: cannot open the pin: {name}: {exc}") from exc


class EdgeRelay:
    """Hands gpiozero's edge callbacks (another thread) to the event loop, with times."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, handler: Callable[[bool, float], None]
    ) -> None:
        self._loop = loop
        self._handler = handler

    def active(self) -> None:
        """The device became active."""
        self._loop.call_soon_threadsafe(self._handler, True, time.monotonic())

    def inactive(self) -> None:
        """The device became inactive."""
        self._loop.call_soon_threadsafe(self._handler, False, time.monotonic())
