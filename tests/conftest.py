"""Shared fixtures: real gpiozero mock pins, a bus that records, a simulated station."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from gpiozero.pins.mock import MockFactory

from intercom.config import Settings, simulated_settings
from intercom.events import Event, EventBus
from intercom.station import Station

from .mosquitto import Broker

os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")

INTERCOM = [sys.executable, "-m", "intercom"]


class Recorder:
    """Collects every event published on a bus."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        bus.on(self.events.append)

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def of(self, name: str) -> list[Event]:
        return [e for e in self.events if e.type == name]

    async def wait_for(self, name: str, count: int = 1, timeout: float = 5) -> list[Event]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.of(name)) < count:
            if loop.time() > deadline:
                raise AssertionError(f"no {name} within {timeout} s; saw {self.types()}")
            await asyncio.sleep(0.01)
        return self.of(name)


@pytest.fixture
def pin_factory() -> Iterator[MockFactory]:
    factory = MockFactory()
    yield factory
    factory.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A real Mosquitto on a free loopback port."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.kill()


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def recorder(bus: EventBus) -> Recorder:
    return Recorder(bus)


@pytest.fixture
def sim_settings(tmp_path: Path) -> Settings:
    return simulated_settings(tmp_path / "state")


@pytest.fixture
async def station(sim_settings: Settings) -> AsyncIterator[Station]:
    st = Station(sim_settings)
    await st.start()
    yield st
    await st.stop("test finished")


async def settle(seconds: float = 0.02) -> None:
    """Let callbacks handed over from gpiozero's threads run."""
    await asyncio.sleep(seconds)
