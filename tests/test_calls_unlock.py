"""Opening the door from a call: the signed command over the data channel, one verifier."""

from __future__ import annotations

import asyncio

import pyotp

from intercom.events import DoorbellPressed
from intercom.station import Station

from . import test_calls_client as kit
from .conftest import Recorder
from .test_calls_client import RELAY_PIN, Device, pair

call_station = kit.call_station
devices = kit.devices


def relay_was_energised(station: Station) -> bool:
    return any(s.state for s in station.pin_factory.pin(RELAY_PIN).states)


def wrong_code(device: Device) -> str:
    right = pyotp.parse_uri(device.totp_uri).now()
    return f"{(int(right) + 1) % 1_000_000:06d}"


async def in_call(station: Station, devices: list[Device]) -> tuple[Device, Device]:
    phone, other = await pair(station), await pair(station)
    devices.extend([phone, other])
    for device in (phone, other):
        await device.connect()
        await device.wait_connected()
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    ring = await phone.expect("ring")
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    return phone, other


async def test_unlock_in_the_call_pulses_the_relay(call_station: Station, devices: list[Device]):
    station = call_station
    recorder = Recorder(station.bus)
    phone, _ = await in_call(station, devices)
    assert not relay_was_energised(station)
    token = phone.unlock_token()
    phone.channel.send(token)
    result = await asyncio.wait_for(phone.channel_messages.get(), 5)
    assert result["type"] == "unlock-result"
    assert result["result"] == "granted"
    (granted,) = await recorder.wait_for("UnlockGranted")
    assert granted.via == "call"
    assert granted.principal == phone.principal
    assert result["jti"] == granted.jti
    assert relay_was_energised(station)


async def test_wrong_code_does_not_open(call_station: Station, devices: list[Device]):
    station = call_station
    recorder = Recorder(station.bus)
    phone, _ = await in_call(station, devices)
    result = await phone.unlock(wrong_code(phone))
    assert result["result"] == "denied"
    (denied,) = await recorder.wait_for("UnlockDenied")
    assert denied.reason == "wrong TOTP code"
    assert denied.via == "call"
    assert not relay_was_energised(station)


async def test_only_the_call_may_unlock(call_station: Station, devices: list[Device]):
    station = call_station
    recorder = Recorder(station.bus)
    phone, other = await in_call(station, devices)
    # the device that was told "taken" is out of the call (and on a fresh connection)
    await other.wait_renewed(1)
    assert (await other.unlock())["result"] == "denied"
    # a command signed by another principal, sent over this device's channel
    other.channel.send(phone.unlock_token())
    assert (await asyncio.wait_for(other.channel_messages.get(), 5))["result"] == "denied"
    # junk on the channel
    phone.channel.send("not a token")
    assert (await asyncio.wait_for(phone.channel_messages.get(), 5))["result"] == "denied"
    assert not relay_was_energised(station)
    assert recorder.of("UnlockGranted") == []
    # the call over, the answering device may not open either
    await phone.send({"type": "hangup", "call": station.calls.ring_group.last_call.id})
    await phone.expect("call", state="ended")
    await phone.wait_renewed(1)
    assert (await phone.unlock())["result"] == "denied"
    assert not relay_was_energised(station)
