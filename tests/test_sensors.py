"""Door contact and tamper switch through MockFactory pins."""

import asyncio

from intercom.config import DoorContactConfig, TamperConfig
from intercom.hardware.sensors import DoorContact, DoorState, TamperSwitch

from .conftest import settle


def make_contact(pin_factory, bus, last_unlock=lambda: -1e9, **kw):
    cfg = DoorContactConfig(pin=22, **kw)
    pin = pin_factory.pin(22)
    contact = DoorContact(cfg, "front", pin_factory, bus, last_unlock)
    pin.drive_low()  # magnet at the switch: door closed
    contact.start(asyncio.get_running_loop())
    return contact, pin


async def test_open_close(pin_factory, bus, recorder):
    contact, pin = make_contact(pin_factory, bus)
    assert contact.state is DoorState.CLOSED
    pin.drive_high()
    await settle()
    assert contact.state is DoorState.OPEN
    pin.drive_low()
    await settle()
    assert recorder.types() == ["DoorOpened", "DoorForcedOpen", "DoorClosed"]


async def test_opening_after_unlock_is_not_forced(pin_factory, bus, recorder):
    loop = asyncio.get_running_loop()
    unlocked = loop.time()
    _, pin = make_contact(pin_factory, bus, last_unlock=lambda: unlocked)
    pin.drive_high()
    await settle()
    assert recorder.types() == ["DoorOpened"]


async def test_opening_long_after_unlock_is_forced(pin_factory, bus, recorder):
    loop = asyncio.get_running_loop()
    unlocked = loop.time() - 20
    _, pin = make_contact(pin_factory, bus, last_unlock=lambda: unlocked, grant_window_s=15)
    pin.drive_high()
    await settle()
    assert "DoorForcedOpen" in recorder.types()


async def test_held_open(pin_factory, bus, recorder):
    contact, pin = make_contact(pin_factory, bus, held_open_s=1)
    pin.drive_high()
    await asyncio.sleep(0.6)
    assert recorder.of("DoorHeldOpen") == []
    await asyncio.sleep(0.6)
    (held,) = recorder.of("DoorHeldOpen")
    assert held.seconds == 1
    contact.close()


async def test_closing_in_time_cancels_held_open(pin_factory, bus, recorder):
    _, pin = make_contact(pin_factory, bus, held_open_s=1)
    pin.drive_high()
    await asyncio.sleep(0.3)
    pin.drive_low()
    await asyncio.sleep(1.0)
    assert recorder.of("DoorHeldOpen") == []


async def test_tamper(pin_factory, bus, recorder):
    pin = pin_factory.pin(23)
    switch = TamperSwitch(TamperConfig(pin=23), pin_factory, bus)
    pin.drive_low()  # cover shut: normally-closed switch to ground
    switch.start(asyncio.get_running_loop())
    assert recorder.types() == []
    pin.drive_high()
    await settle()
    pin.drive_low()
    await settle()
    pin.drive_high()
    await settle()
    # Each trip and each closing after it, once: a closed cover at start clears nothing.
    assert recorder.types() == ["TamperDetected", "TamperCleared", "TamperDetected"]
    assert switch.tripped_at is not None
    pin.drive_low()
    await settle()
    pin.drive_low()  # no edge: nothing more
    await settle()
    assert recorder.types() == ["TamperDetected", "TamperCleared", "TamperDetected",
                                "TamperCleared"]
    assert switch.tripped_at is None
    switch.close()


async def test_a_cover_open_at_start_clears_when_shut(pin_factory, bus, recorder):
    pin = pin_factory.pin(23)
    switch = TamperSwitch(TamperConfig(pin=23), pin_factory, bus)
    pin.drive_high()  # the cover is off when the station starts
    switch.start(asyncio.get_running_loop())
    assert recorder.types() == ["TamperDetected"]
    pin.drive_low()
    await settle()
    assert recorder.types() == ["TamperDetected", "TamperCleared"]
    (cleared,) = recorder.of("TamperCleared")
    assert cleared.sensor == "cover"
    switch.close()
