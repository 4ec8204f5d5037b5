"""Web Push (RFC 8030/8291/8292): a station rings devices that are not online.

Real parts: the station in this process with its web server and signalling on
loopback, aiortc devices (tests/test_calls_client.py), and a push service stand-in
(tests/pushservice.py, an aiohttp server with TLS on 127.0.0.1) that checks each
request as a push service does and decrypts it with its own RFC 8291 code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from intercom.events import DoorbellPressed
from intercom.push.component import decline_message
from intercom.push.webpush import SubscriptionError, encrypt, parse_subscription
from intercom.security.principals import ID_PATTERN
from intercom.station import Station

from . import test_calls_client as kit
from .mosquitto import make_tls_files
from .pushservice import Browser, PushService, b64d, b64e, decrypt
from .test_calls_client import Device, b64url, call_settings, eventually, pair, pinned

devices = kit.devices

# --- the browser's side, checked against the RFC's own worked example ----------------------


def test_the_stand_in_decrypts_rfc_8291s_example():
    """RFC 8291 Appendix A: the receiver's keys, the message and the plaintext it holds."""
    ua_private = ec.derive_private_key(
        int.from_bytes(b64d("q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94"), "big"),
        ec.SECP256R1(),
    )
    body = b64d(
        "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLoc"
        "InmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLV"
        "WGNWQexSgSxsj_Qulcy4a-fN"
    )
    plaintext = decrypt(body, ua_private, b64d("BTBZMqHH6r4Tts7J_aSIgg"))
    assert plaintext == b"When I grow up, I want to be a watermelon"


def test_the_station_encrypts_for_the_subscription_alone():
    browser = Browser("https://fcm.googleapis.com/fcm/send/abc")
    subscription = parse_subscription(browser.subscription(), ["fcm.googleapis.com"])
    body = encrypt(b'{"type":"ring"}', subscription)
    assert browser.decrypt(body) == b'{"type":"ring"}'
    other = Browser(browser.endpoint)  # another browser's keys cannot open it
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidTag
        other.decrypt(body)
    assert encrypt(b"x", subscription)[:16] != encrypt(b"x", subscription)[:16], "fresh salt"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"endpoint": "http://fcm.googleapis.com/x"}, "https URL"),
        ({"endpoint": "https://169.254.169.254/latest"}, "not in [push] allowed_hosts"),
        ({"endpoint": "https://user:pw@fcm.googleapis.com/x"}, "without credentials"),
        ({"endpoint": "https://fcm.googleapis.com/" + "a" * 1100}, "at most 1024"),
        ({"keys": {"p256dh": "AAAA", "auth": b64e(b"0" * 16)}}, "P-256 public key"),
        ({"keys": {"auth": b64e(b"0" * 16)}}, "keys.p256dh"),
        ({"keys": "x"}, "keys must be an object"),
        ({"auth16": True}, "keys.auth must be 16 bytes"),
    ],
)
def test_a_bad_subscription_is_refused_with_what_is_wrong(change: dict[str, Any], reason: str):
    data = Browser("https://fcm.googleapis.com/fcm/send/abc").subscription()
    if change.pop("auth16", False):
        data["keys"]["auth"] = b64e(b"short")
    data.update(change)
    with pytest.raises(SubscriptionError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        parse_subscription(data, ["fcm.googleapis.com", "*.notify.windows.com"])


def test_allowed_hosts_are_patterns():
    data = Browser("https://wns2-par02p.notify.windows.com/w/?token=x").subscription()
    assert parse_subscription(data, ["*.notify.windows.com"]).endpoint.startswith("https://wns2")
    data["endpoint"] = "https://notify.windows.com.evil.example/w"
    with pytest.raises(SubscriptionError):
        parse_subscription(data, ["*.notify.windows.com"])


# --- the station, a push service and devices ----------------------------------------------


@pytest.fixture
async def push_service(tmp_path: Path) -> AsyncIterator[PushService]:
    tls = make_tls_files(tmp_path / "push-tls")
    service = PushService(tls.server_cert, tls.server_key)
    service.ca = tls.ca  # type: ignore[attr-defined]
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def station(tmp_path: Path, push_service: PushService) -> AsyncIterator[Station]:
    settings = call_settings(tmp_path / "state", ring_timeout_s=4)
    data = settings.model_dump(mode="json")
    data["push"] = {"allowed_hosts": ["127.0.0.1"], "ca_file": str(push_service.ca),  # type: ignore[attr-defined]
                    "contact": "mailto:building@example.org"}
    station = Station(type(settings).model_validate(data))
    await station.start()
    yield station
    await station.stop("test finished")


async def subscribed(
    station: Station, push_service: PushService, devices: list[Device]
) -> tuple[Device, Browser]:
    """A paired device that subscribes to pushes, then goes offline (the app closed)."""
    device = await pair(station)
    devices.append(device)
    await device.connect()
    browser = Browser(push_service.endpoint())
    await device.send({"type": "push-subscribe", "subscription": browser.subscription()})
    assert (await device.expect("push"))["subscribed"] is True
    await device.close()
    await eventually(lambda: not station.calls.signalling.sessions, what="device offline")  # type: ignore[union-attr]
    return device, browser


def again(device: Device) -> Device:
    """The same phone opening the app again (a new socket and connection)."""
    return Device(device.station, device.key, device.principal, device.totp_uri)


def message(push_service: PushService, browser: Browser, index: int = -1) -> dict[str, Any]:
    pushes = [p for p in push_service.pushes if p.endpoint == browser.endpoint]
    return json.loads(browser.decrypt(pushes[index].body))


async def test_a_ring_reaches_the_closed_app_by_push_and_opening_it_shows_the_call(
    station: Station, push_service: PushService, devices: list[Device]
):
    phone, browser = await subscribed(station, push_service, devices)
    tablet, tablet_browser = await subscribed(station, push_service, devices)
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    await eventually(lambda: len(push_service.pushes) == 2, what="a push per device")
    assert push_service.refused == []
    push = next(p for p in push_service.pushes if p.endpoint == browser.endpoint)
    assert push.headers["TTL"] == "30"
    assert push.headers["Urgency"] == "high"
    assert push.headers["Topic"] == "ring-front"
    assert push.claims["sub"] == "mailto:building@example.org"
    ring = message(push_service, browser)
    assert set(ring) == {"v", "type", "call", "door", "at", "until"}  # no names, no picture
    assert ring["type"] == "ring"
    assert ring["door"] == "front"
    assert station.calls is not None
    last = station.calls.ring_group.last_call
    assert last is not None
    assert ring["call"] == last.id
    assert ring["at"] == round(last.pressed_at, 3)  # the press's own time, not the push's
    assert ring["until"] == round(last.pressed_at + 4, 3)  # ring_timeout_s after it
    # Nobody is online, yet the call rings on for the pushed devices.
    assert station.calls is not None
    assert station.calls.state == "ringing"
    # The resident taps the notification: the app opens, signs in, and is rung at once
    # with the door's picture, for the call the push named.
    opened = again(phone)
    devices.append(opened)
    await opened.connect()
    rung = await opened.expect("ring")
    assert rung["call"] == ring["call"]
    await eventually(lambda: len(opened.video_frames) >= 3, what="the preview plays")
    await opened.send({"type": "accept", "call": ring["call"]})
    await opened.expect("call", state="answered")
    # The other device is told by a second push that the call is taken.
    await eventually(lambda: len(push_service.pushes) == 3, what="the clear push")
    clear = message(push_service, tablet_browser)
    assert clear == {"v": 1, "type": "clear", "call": ring["call"], "state": "taken"}
    assert push_service.pushes[-1].headers["Topic"] == "ring-front"  # replaces a held ring
    await eventually(lambda: station.status()["push"]["delivered"] == 3, what="201s counted")
    del tablet


async def signed_decline(device: Device, call: str, *, key_of: Device | None = None) -> int:
    assert device.station.calls is not None
    signature = (key_of or device).key.sign(decline_message(device.station.id, call))
    body = {"principal": device.principal, "call": call, "signature": b64url(signature)}
    async with aiohttp.ClientSession() as http, http.post(
        device.station.calls.url + "api/push/decline", json=body, ssl=pinned(device.station)
    ) as response:
        return response.status


async def test_decline_from_the_notification_ends_the_ring_without_opening_the_app(
    station: Station, push_service: PushService, devices: list[Device]
):
    phone, browser = await subscribed(station, push_service, devices)
    other = await pair(station)  # paired, no subscription: its key is no phone's key
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    await eventually(lambda: len(push_service.pushes) == 1, what="the ring push")
    call = message(push_service, browser)["call"]
    assert station.calls is not None
    assert await signed_decline(phone, call, key_of=other) == 403  # another device's key
    assert station.calls.state == "ringing"
    assert await signed_decline(phone, call) == 200
    await eventually(lambda: station.calls.state == "idle", what="the call is missed")  # type: ignore[union-attr]
    assert station.calls.ring_group.last_call is not None
    assert station.calls.ring_group.last_call.state.value == "missed"


@pytest.mark.parametrize("status", [410, 404])
async def test_a_subscription_the_push_service_says_is_gone_is_dropped(
    station: Station, push_service: PushService, devices: list[Device], status: int
):
    phone, browser = await subscribed(station, push_service, devices)
    assert station.registry is not None
    assert station.registry.push_subscription(phone.principal) is not None
    (push_service.gone if status == 410 else push_service.not_found).add(browser.endpoint)
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    await eventually(lambda: station.registry.push_subscription(phone.principal) is None,  # type: ignore[union-attr]
                     what="the subscription dropped")
    assert push_service.pushes == []
    assert station.status()["push"]["dropped"] == 1


async def test_subscriptions_are_sealed_at_rest_and_go_with_a_revoked_principal(
    station: Station, push_service: PushService, devices: list[Device], tmp_path: Path
):
    phone, browser = await subscribed(station, push_service, devices)
    database = b"".join(p.read_bytes() for p in (tmp_path / "state").glob("principals.db*"))
    token = browser.endpoint.rsplit("/", 1)[1].encode()
    assert token not in database, "the endpoint is sealed at rest"
    assert b64e(browser.auth).encode() not in database
    assert station.registry is not None
    await station.registry.revoke(phone.principal, "test")
    assert station.registry.push_subscription(phone.principal) is None
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    await asyncio.sleep(0.5)
    assert push_service.pushes == [], "a revoked device is not pushed to"
    assert station.calls is not None
    assert station.calls.state == "idle", "no device: missed at once"


async def test_an_erased_principal_s_subscription_goes_with_it(
    station: Station, push_service: PushService, devices: list[Device]
):
    phone, _browser = await subscribed(station, push_service, devices)
    assert station.registry is not None
    assert await station.registry.erase(phone.principal)  # what `privacy erase` runs
    assert station.registry.push_subscription(phone.principal) is None
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    await asyncio.sleep(0.5)
    assert push_service.pushes == [], "an erased device is not pushed to"


async def test_a_device_online_is_rung_on_its_socket_not_pushed(
    station: Station, push_service: PushService, devices: list[Device]
):
    phone, browser = await subscribed(station, push_service, devices)
    _tablet, tablet_browser = await subscribed(station, push_service, devices)
    opened = again(phone)  # the phone's app open again: online
    devices.append(opened)
    await opened.connect()
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    await opened.expect("ring")
    await eventually(lambda: len(push_service.pushes) == 1, what="the offline tablet's push")
    await asyncio.sleep(0.5)  # and nothing more arrives for the online phone
    assert [p.endpoint for p in push_service.pushes] == [tablet_browser.endpoint]
    assert browser.endpoint != tablet_browser.endpoint


async def test_an_unusable_subscription_is_refused_and_the_socket_stays(
    station: Station, devices: list[Device]
):
    device = await pair(station)
    devices.append(device)
    await device.connect()
    elsewhere = Browser("https://169.254.169.254/latest/meta-data").subscription()
    await device.send({"type": "push-subscribe", "subscription": elsewhere})
    answer = await device.expect("push")
    assert answer["subscribed"] is False
    assert "allowed_hosts" in answer["error"]
    await device.send({"type": "ping"})
    await device.expect("pong")
    assert station.registry is not None
    assert station.registry.push_subscription(device.principal) is None
    assert ID_PATTERN.match(device.principal)


async def test_the_push_key_is_in_api_info(station: Station):
    assert station.calls is not None
    async with aiohttp.ClientSession() as http, http.get(
        station.calls.url + "api/info", ssl=pinned(station)
    ) as response:
        info = await response.json()
    key = b64d(info["push_key"])
    assert len(key) == 65
    assert key[0] == 4
