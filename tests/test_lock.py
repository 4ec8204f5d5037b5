"""The lock relay: whatever a caller does, it never stays energised past max_open_s."""

import asyncio
import time

import pytest

from intercom.config import RelayConfig
from intercom.hardware.lock import Lock, LockState

from .conftest import settle

MAX = 0.5  # the smallest maximum the config allows


@pytest.fixture
def make_lock(pin_factory):
    made = []

    def make(factory, bus, **kw):
        cfg = RelayConfig(pin=27, pulse_s=kw.pop("pulse_s", 0.2), max_open_s=MAX, **kw)
        lock = Lock(cfg, factory, bus, asyncio.get_running_loop())
        made.append(lock)
        return lock, factory.pin(27)

    yield make
    for lock in made:
        lock.close()


def energised_for(pin) -> list[float]:
    """Durations of each high period in the pin's history."""
    out, start = [], None
    t = 0.0
    for state in pin.states:
        t += state.timestamp
        if state.state and start is None:
            start = t
        elif not state.state and start is not None:
            out.append(t - start)
            start = None
    return out


async def test_starts_off(make_lock, pin_factory, bus):
    lock, pin = make_lock(pin_factory, bus)
    assert pin.state is False
    assert lock.state is LockState.LOCKED


async def test_pulse_ends_by_itself(make_lock, pin_factory, bus, recorder):
    lock, pin = make_lock(pin_factory, bus)
    assert lock.pulse() == pytest.approx(0.2)
    assert pin.state is True
    await asyncio.sleep(0.3)
    assert pin.state is False
    assert energised_for(pin) == [pytest.approx(0.2, abs=0.05)]
    assert [e.state for e in recorder.of("LockStateChanged")] == ["unlocked", "locked"]


async def test_pulse_is_clamped_to_maximum(make_lock, pin_factory, bus):
    lock, pin = make_lock(pin_factory, bus)
    assert lock.pulse(3600) == pytest.approx(MAX)
    await asyncio.sleep(MAX + 0.15)
    assert pin.state is False
    assert energised_for(pin)[0] <= MAX + 0.05


async def test_repeated_pulses_never_pass_maximum(make_lock, pin_factory, bus):
    lock, pin = make_lock(pin_factory, bus)
    for _ in range(12):
        lock.pulse(0.2)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert pin.state is False
    assert max(energised_for(pin)) <= MAX + 0.05


async def test_longest_pulse_is_cut_at_max_open(make_lock, pin_factory, bus, recorder):
    lock, pin = make_lock(pin_factory, bus)
    lock.pulse(3600, reason="held by a careless caller")
    await asyncio.sleep(MAX + 0.2)
    assert pin.state is False
    assert lock.state is LockState.LOCKED
    await settle()
    assert recorder.of("LockStateChanged")[-1].reason in {"maximum open time reached",
                                                          "pulse ended"}


async def test_task_crashing_mid_pulse(make_lock, pin_factory, bus):
    lock, pin = make_lock(pin_factory, bus)

    async def careless() -> None:
        lock.pulse(3600, reason="crashing task")
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    task = asyncio.create_task(careless())
    with pytest.raises(RuntimeError):
        await task
    assert pin.state is True
    await asyncio.sleep(MAX + 0.2)
    assert pin.state is False


async def test_guard_works_while_the_loop_is_blocked(make_lock, pin_factory, bus):
    lock, pin = make_lock(pin_factory, bus)
    lock.pulse(3600, reason="then the loop hangs")
    time.sleep(MAX + 0.2)  # block the event loop: only the guard thread can act
    assert pin.state is False
    await settle()


async def test_active_low_relay(make_lock, pin_factory, bus):
    lock, pin = make_lock(pin_factory, bus, active_high=False)
    assert pin.state is True  # off, for an active-low relay board
    lock.pulse(0.2)
    assert pin.state is False
    await asyncio.sleep(0.3)
    assert pin.state is True


async def test_close_releases_and_refuses(make_lock, pin_factory, bus):
    lock, pin = make_lock(pin_factory, bus)
    lock.pulse(3600, reason="about to stop")
    lock.close()
    assert pin.state is False
    assert lock.pulse() == 0.0
    assert pin.state is False
