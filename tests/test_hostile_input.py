"""Hostile input gets one clean refusal: no traceback, one log line, the station still answers."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
import pytest

from intercom import control
from intercom.calls import peer as peer_module
from intercom.calls import signalling
from intercom.security import command
from intercom.station import Station

from . import test_calls_client as kit
from .conftest import Recorder
from .test_calls_client import Device, DeviceKey, b64url, pair
from .test_calls_unlock import in_call, relay_was_energised

call_station = kit.call_station
devices = kit.devices

FLOOD = 4000


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def warnings_from(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def forged(station: Station, **claims: Any) -> str:
    """An unsigned command of a registered-looking form with these claims."""
    header = {"alg": "Ed25519", "kid": "res-0123456789abcdef"}
    body = {
        "aud": station.id,
        "cmd": "unlock",
        "door": "front",
        "iat": 1_800_000_000,
        "exp": 1_800_000_030,
        "jti": "hostile-jti-1",
        "totp": "123456",
        **claims,
    }
    segments = [json.dumps(header).encode(), json.dumps(body).encode(), b"s" * 64]
    return ".".join(b64url(s) for s in segments)


# --- (a) numeric claims --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "value"),
    [("iat", 10**400 - 1), ("exp", 10**400 - 1), ("iat", -(10**400)), ("exp", 1e300)],
    ids=["huge-iat", "huge-exp", "hugely-negative-iat", "float-exp"],
)
async def test_an_absurd_iat_or_exp_is_a_clean_refusal(
    call_station: Station, caplog: pytest.LogCaptureFixture, claim: str, value: float
):
    station = call_station
    recorder = Recorder(station.bus)
    caplog.set_level(logging.INFO)
    token = forged(station, **{claim: value})
    answer = await control.request(station.state_dir, {"request": "unlock", "token": token})
    assert answer == {"ok": True, "result": "denied"}
    (denied,) = await recorder.wait_for("UnlockDenied")
    assert denied.reason == "iat/exp out of range"
    assert tracebacks(caplog) == []
    # the station still answers
    again = await control.request(station.state_dir, {"request": "unlock", "token": "x.y.z"})
    assert again == {"ok": True, "result": "denied"}


# --- (b) deeply nested JSON on the signalling socket ---------------------------------------

NESTED = "[" * 60_000


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    async for _ in ws:
        pass
    return ws.close_code


async def test_deep_nesting_before_sign_in_is_a_clean_4400(
    call_station: Station, devices: list[Device], caplog: pytest.LogCaptureFixture
):
    station = call_station
    caplog.set_level(logging.INFO)
    stranger = Device(station, DeviceKey(), "res-1", "")
    devices.append(stranger)
    ws = await stranger.open_socket()
    assert (await ws.receive_json(timeout=5))["type"] == "challenge"
    await ws.send_str(NESTED)
    assert await asyncio.wait_for(closed_with(ws), 10) == signalling.CLOSE_MALFORMED
    assert tracebacks(caplog) == []
    assert len(warnings_from(caplog, "intercom.calls.signalling")) == 1
    # the station still answers: a paired device signs in
    phone = await pair(station)
    devices.append(phone)
    await phone.connect()
    await phone.send({"type": "ping"})
    await phone.expect("pong")


async def test_deep_nesting_after_sign_in_closes_only_that_socket_with_4400(
    call_station: Station, devices: list[Device], caplog: pytest.LogCaptureFixture
):
    station = call_station
    bad, good = await pair(station), await pair(station)
    devices.extend([bad, good])
    await bad.connect(answer=False)
    await good.connect(answer=False)
    caplog.clear()
    caplog.set_level(logging.INFO)
    await bad.ws.send_str(NESTED)  # type: ignore[union-attr]
    for _ in range(250):
        if bad.close_code is not None:
            break
        await asyncio.sleep(0.02)
    assert bad.close_code == signalling.CLOSE_MALFORMED
    assert tracebacks(caplog) == []
    await good.send({"type": "ping"})
    await good.expect("pong")


# --- (c) the data channel ------------------------------------------------------------------


async def drain(device: Device, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """The next ``count`` answers on the device's data channel (bounded wait)."""
    return [await asyncio.wait_for(device.channel_messages.get(), timeout) for _ in range(count)]


async def test_a_data_channel_flood_is_limited_and_logged_once(
    call_station: Station, devices: list[Device], caplog: pytest.LogCaptureFixture
):
    station = call_station
    phone, _ = await in_call(station, devices)
    caplog.clear()
    caplog.set_level(logging.INFO)
    for _ in range(FLOOD):
        phone.channel.send("not a token")
    answers = await drain(phone, FLOOD)  # every message answered, in a bounded time
    assert {a["result"] for a in answers} == {"denied"}
    assert tracebacks(caplog) == []
    assert len([r for r in warnings_from(caplog, "intercom.calls.peer") if "beyond" in r.msg]) == 1
    # Only the burst and the trickle of the rate reach the verifier: the whole flood
    # leaves a few lines, never one per message.
    assert peer_module.CHANNEL_RATE[1] < FLOOD // 100
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) < FLOOD // 20
    assert not relay_was_energised(station)
    # the station still answers: once the bucket refills, the door opens
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        token = phone.unlock_token()
        phone.channel.send(token)
        (result,) = await drain(phone, 1)
        if result["result"] == "granted" or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)
    assert result["result"] == "granted"
    assert relay_was_energised(station)


async def test_an_internal_error_still_answers_denied(
    call_station: Station,
    devices: list[Device],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
):
    station = call_station
    phone, _ = await in_call(station, devices)
    assert station.calls is not None
    assert station.calls.signalling is not None
    (session,) = [
        s for s in station.calls.signalling.sessions.values() if s.principal == phone.principal
    ]
    assert session.peer is not None

    async def broken(_token: str) -> dict[str, Any]:
        raise RuntimeError("a fault of the station's own")

    monkeypatch.setattr(session.peer, "_unlock", broken)
    token = phone.unlock_token()
    phone.channel.send(token)
    (answer,) = await drain(phone, 1, timeout=5)
    jti = command.parse(token).jti
    assert answer == {"type": "unlock-result", "jti": jti, "result": "denied"}
    # an unexpected fault of ours: logged once as an ERROR with its traceback
    (error,) = tracebacks(caplog)
    assert error.exc_info is not None
    assert not relay_was_energised(station)
