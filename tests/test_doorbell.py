"""The doorbell, driven through gpiozero's own MockFactory pins."""

import asyncio

from intercom.config import ButtonConfig
from intercom.events import DoorbellPressed
from intercom.hardware.doorbell import Doorbell

from .conftest import settle


def make_bell(pin_factory, bus, **kw):
    cfg = ButtonConfig(name="bell", pin=17, flat="1A", **kw)
    bell = Doorbell(cfg, pin_factory, bus)
    bell.start(asyncio.get_running_loop())
    return bell, pin_factory.pin(17)


async def press(pin, hold=0.06):
    pin.drive_low()
    await asyncio.sleep(hold)
    pin.drive_high()
    await settle()


async def test_one_press_one_event(pin_factory, bus, recorder):
    _, pin = make_bell(pin_factory, bus)
    await press(pin)
    events = recorder.of("DoorbellPressed")
    assert events == [DoorbellPressed(at=events[0].at, button="bell", flat="1A")]


async def test_bounce_burst_is_one_press(pin_factory, bus, recorder):
    bell, pin = make_bell(pin_factory, bus, debounce_ms=30, coalesce_s=0)
    # A burst of 20 edges within a few milliseconds on pressing and on release.
    for _ in range(10):
        pin.drive_low()
        pin.drive_high()
    pin.drive_low()
    await asyncio.sleep(0.08)
    for _ in range(10):
        pin.drive_high()
        pin.drive_low()
    pin.drive_high()
    await settle()
    assert len(recorder.of("DoorbellPressed")) == 1
    assert bell.presses == 1


async def test_presses_within_interval_coalesce(pin_factory, bus, recorder):
    bell, pin = make_bell(pin_factory, bus, debounce_ms=10, coalesce_s=0.5)
    for _ in range(4):
        await press(pin, hold=0.03)
        await asyncio.sleep(0.03)
    assert len(recorder.of("DoorbellPressed")) == 1
    assert bell.coalesced == 3
    await asyncio.sleep(0.5)
    await press(pin)
    assert len(recorder.of("DoorbellPressed")) == 2


async def test_separate_presses_after_interval(pin_factory, bus, recorder):
    _, pin = make_bell(pin_factory, bus, debounce_ms=10, coalesce_s=0.1)
    for _ in range(3):
        await press(pin, hold=0.03)
        await asyncio.sleep(0.12)
    assert len(recorder.of("DoorbellPressed")) == 3


async def test_active_high_button(pin_factory, bus, recorder):
    make_bell(pin_factory, bus, active_low=False)
    pin = pin_factory.pin(17)
    pin.drive_high()
    await asyncio.sleep(0.05)
    pin.drive_low()
    await settle()
    assert len(recorder.of("DoorbellPressed")) == 1
