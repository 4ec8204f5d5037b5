"""The simulator control: acts on a simulated station's mock pins like a person would.

It drives gpiozero's own ``MockFactory`` pins (``drive_low``/``drive_high``), so the
station's button, contact and tamper code is exactly the code that runs on a Pi.
"""

from __future__ import annotations

import asyncio
from typing import Any

from intercom.config import Settings
from intercom.errors import CommandRefusedError

ACTIONS = ("press", "open-door", "close-door", "tamper")


class Simulator:
    """Drives the mock pins of a simulated station."""

    def __init__(self, settings: Settings, pin_factory: Any) -> None:
        self.settings = settings
        self._factory = pin_factory

    def _pin(self, number: int) -> Any:
        return self._factory.pin(number)

    @staticmethod
    def _drive(pin: Any, high: bool) -> None:
        if high:
            pin.drive_high()
        else:
            pin.drive_low()

    def prepare(self) -> None:
        """Put sensors into their resting state: door closed, cover shut."""
        hw = self.settings.hardware
        if hw.door_contact:
            self._drive(self._pin(hw.door_contact.pin), not hw.door_contact.open_when_high)
        if hw.tamper:
            self._drive(self._pin(hw.tamper.pin), hw.tamper.active_low)

    async def act(self, action: str, button: str | None = None, hold_s: float = 0.15) -> None:
        """Do one thing a person at the door would do."""
        hw = self.settings.hardware
        if action == "press":
            buttons = [b for b in hw.buttons if button in {None, b.name, b.flat}]
            if not buttons:
                raise CommandRefusedError(f"no button named {button!r}")
            cfg = buttons[0]
            pin = self._pin(cfg.pin)
            self._drive(pin, not cfg.active_low)
            await asyncio.sleep(hold_s)
            self._drive(pin, cfg.active_low)
        elif action in {"open-door", "close-door"}:
            if hw.door_contact is None:
                raise CommandRefusedError("this station has no door contact")
            opened = action == "open-door"
            self._drive(self._pin(hw.door_contact.pin), opened == hw.door_contact.open_when_high)
        elif action == "tamper":
            if hw.tamper is None:
                raise CommandRefusedError("this station has no tamper switch")
            pin = self._pin(hw.tamper.pin)
            self._drive(pin, not hw.tamper.active_low)
            await asyncio.sleep(hold_s)
            self._drive(pin, hw.tamper.active_low)
        else:
            raise CommandRefusedError(f"unknown simulator action {action!r}")
