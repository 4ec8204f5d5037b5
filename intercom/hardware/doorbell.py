"""Doorbell buttons: debounced in our code, coalesced, one event per press."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from intercom.config import ButtonConfig
from intercom.events import DoorbellPressed, EventBus
from intercom.hardware.pins import EdgeRelay, open_device

log = logging.getLogger(__name__)


class Doorbell:
    """One button: an edge is a press when the pin was quiet for the debounce time.

    gpiozero's ``MockFactory`` pins do not emulate bounce and the kernel's debounce is
    not portable, so we debounce here: an active edge after ``debounce_ms`` without any
    edge starts a press; every other edge is bounce. A press within ``coalesce_s`` of the
    last reported one is coalesced (an impatient visitor rings once, not five times).
    """

    def __init__(self, config: ButtonConfig, pin_factory: Any, bus: EventBus) -> None:
        from gpiozero import DigitalInputDevice  # noqa: PLC0415

        self.config = config
        self._bus = bus
        self._last_edge = -math.inf
        self._last_press = -math.inf
        self.presses = 0
        self.coalesced = 0
        self.device = open_device(
            f"hardware.buttons[{config.name}] (GPIO{config.pin})",
            lambda: DigitalInputDevice(
                config.pin, pull_up=config.active_low, pin_factory=pin_factory
            ),
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start listening for edges."""
        relay = EdgeRelay(loop, self.edge)
        self.device.when_activated = relay.active
        self.device.when_deactivated = relay.inactive

    def edge(self, active: bool, at: float) -> None:
        """Handle one edge seen at monotonic time ``at`` (on the event loop)."""
        quiet = at - self._last_edge
        self._last_edge = at
        if not active or quiet * 1000 < self.config.debounce_ms:
            return
        if at - self._last_press < self.config.coalesce_s:
            self.coalesced += 1
            log.debug("button %s: press coalesced", self.config.name)
            return
        self._last_press = at
        self.presses += 1
        self._bus.publish(DoorbellPressed(button=self.config.name, flat=self.config.flat))

    def close(self) -> None:
        """Release the pin."""
        self.device.close()
