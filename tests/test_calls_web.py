"""The station's HTTPS server, pairing and the signalling socket's defences."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from pathlib import Path

import aiohttp
import pyotp
import pytest

from intercom.calls import signalling
from intercom.errors import IntercomError
from intercom.events import DoorbellPressed
from intercom.security.store import Guard
from intercom.station import Station

from . import test_calls_client as kit
from . import test_calls_unlock as unlock_kit
from .conftest import Recorder
from .test_calls_client import Device, DeviceKey, pair, pinned

call_station = kit.call_station
devices = kit.devices


async def fetch(
    station: Station, method: str, path: str, **kwargs: object
) -> tuple[int, dict[str, str], str]:
    assert station.calls is not None
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, station.calls.url + path, ssl=pinned(station), **kwargs) as response,
    ):
        return response.status, dict(response.headers), await response.text()


async def new_code(station: Station, flat: str = "1") -> str:
    assert station.calls is not None
    return str((await station.calls.pair_request({"flat": flat}))["code"])


async def test_info_and_client_files_over_pinned_tls(call_station: Station):
    station = call_station
    assert station.calls is not None
    status, headers, body = await fetch(station, "GET", "api/info")
    assert status == 200
    info = json.loads(body)
    assert info["station"] == station.id
    assert info["door"] == "front"
    assert info["fingerprint"] == station.calls.fingerprint
    assert len(info["fingerprint"]) == 64
    status, headers, body = await fetch(station, "GET", "")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    for path in ("nothing-here.js", "%2e%2e/%2e%2e/etc/passwd", "..%2fconfig.py"):
        status, _, body = await fetch(station, "GET", path)
        assert status == 404, path
        assert "Traceback" not in body


async def test_a_wrong_fingerprint_is_refused(call_station: Station):
    station = call_station
    assert station.calls is not None
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ServerFingerprintMismatch):
            await http.get(station.calls.url + "api/info", ssl=aiohttp.Fingerprint(b"\0" * 32))
        # plain HTTP is not served at all
        with pytest.raises(aiohttp.ClientError):
            await http.get(station.calls.url.replace("https://", "http://") + "api/info")
        # a client trusting the certificate file itself (no hostname: the station has none)
        context = ssl.create_default_context(cafile=str(station.calls.cert.cert_path))
        context.check_hostname = False
        async with http.get(station.calls.url + "api/info", ssl=context) as response:
            assert response.status == 200


@pytest.mark.parametrize("kind", ["Ed25519", "P-256"])
async def test_pairing_registers_a_resident_with_totp(
    call_station: Station, devices: list[Device], kind: str
):
    station = call_station
    device = await pair(station, kind=kind)
    devices.append(device)
    registry = station.registry  # its owner: principals.db is never opened beside it
    assert registry is not None
    principal = registry.get(device.principal)
    assert principal is not None
    assert principal.role.value == "resident"
    assert principal.flats == ("1",)
    assert principal.key_kind == kind
    secret = registry.secret(device.principal)
    totp = pyotp.parse_uri(device.totp_uri)
    assert totp.secret == secret
    assert len(totp.byte_secret()) * 8 >= 160
    await device.connect()
    await device.wait_connected()


async def test_pairing_codes_are_single_use_and_expire(call_station: Station):
    station = call_station
    assert station.calls is not None
    code = await new_code(station)
    jwk = DeviceKey().jwk()
    status, _, body = await fetch(station, "POST", "api/pair", json={"code": code, "jwk": jwk})
    assert status == 200
    for attempt in (code, "AAAAAAAAAAAA", 12):
        status, _, body = await fetch(
            station, "POST", "api/pair", json={"code": attempt, "jwk": jwk}
        )
        assert (status, json.loads(body)) == (403, {"error": "pairing code invalid or expired"})
    expired = await new_code(station)
    station.calls.pairing._clock = lambda: time.time() + 601
    status, _, _ = await fetch(station, "POST", "api/pair", json={"code": expired, "jwk": jwk})
    assert status == 403


async def test_bad_pairing_bodies_are_refused_without_spending_the_code(call_station: Station):
    station = call_station
    code = await new_code(station)
    private = DeviceKey().jwk() | {"d": "AAAA"}
    rsa = {"kty": "RSA", "n": "AQAB", "e": "AQAB"}
    for body in ({"code": code, "jwk": rsa}, {"code": code}, {"code": code, "jwk": "x"}):
        status, _, text = await fetch(station, "POST", "api/pair", json=body)
        assert status == 400, text
    status, _, _ = await fetch(station, "POST", "api/pair", data=b"{not json")
    assert status == 400
    status, _, _ = await fetch(station, "POST", "api/pair", data=b"x" * 100_000)
    assert status == 413
    # a JWK with a private member: the private part is dropped, never stored
    status, _, text = await fetch(station, "POST", "api/pair", json={"code": code, "jwk": private})
    assert status == 200, text


async def test_pairing_is_rate_limited(call_station: Station):
    station = call_station
    jwk = DeviceKey().jwk()
    statuses = []
    for _ in range(13):
        status, _, _ = await fetch(
            station, "POST", "api/pair", json={"code": "WRONGWRONG22", "jwk": jwk}
        )
        statuses.append(status)
    assert statuses[:10] == [403] * 10
    assert statuses[10:] == [429] * 3
    # the right code is refused too while the address waits
    code = await new_code(station)
    status, _, _ = await fetch(station, "POST", "api/pair", json={"code": code, "jwk": jwk})
    assert status == 429


async def test_pair_command_prints_link_and_writes_qr(call_station: Station, tmp_path: Path):
    station = call_station
    assert station.calls is not None
    png, svg = tmp_path / "pair.png", tmp_path / "pair.svg"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intercom", "pair", "--flat", "1", "--name", "kitchen tablet",
        "--png", str(png), "--svg", str(svg), "--state-dir", str(station.state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    text = out.decode()
    link = next(line.split()[-1] for line in text.splitlines() if line.startswith("link:"))
    assert link.startswith(station.calls.url + "#pair=")
    assert link.endswith("&fp=" + station.calls.fingerprint)
    assert png.read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in svg.read_bytes()
    assert "\u2580" in text or "\u2588" in text  # the terminal QR code
    code = link.split("#pair=")[1].split("&")[0]
    status, _, _ = await fetch(
        station, "POST", "api/pair", json={"code": code, "jwk": DeviceKey().jwk()}
    )
    assert status == 200
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intercom", "pair", "--flat", "9", "--state-dir",
        str(station.state_dir), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    assert process.returncode == 1
    assert "not served by this station" in err.decode()


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    async for _ in ws:
        pass
    return ws.close_code


async def test_socket_gets_only_the_challenge_until_signed_in(call_station: Station):
    station = call_station
    stranger = Device(station, DeviceKey(), "res-1", "")
    for first in ({"type": "ping"}, {"type": "answer", "sdp": "v=0"}):
        ws = await stranger.open_socket()
        assert (await ws.receive_json())["type"] == "challenge"
        await ws.send_json(first)
        assert await close_code(ws) == 4401
    ws = await stranger.open_socket()
    await ws.receive_json()
    await ws.send_str("][")
    assert await close_code(ws) == 4400
    await stranger.close()


async def test_no_sign_in_in_time_closes(call_station: Station, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(signalling, "AUTH_TIMEOUT_S", 0.3)
    stranger = Device(call_station, DeviceKey(), "res-1", "")
    ws = await stranger.open_socket()
    await ws.receive_json()
    assert await close_code(ws) == 4401
    await stranger.close()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", 4400),
        ("[1, 2]", 4400),
        ('{"type": 5}', 4400),
        ('{"type": "launch"}', 4400),
        ('{"type": "accept"}', 4400),
        ('{"type": "answer", "sdp": 1}', 4400),
        ('{"type": "answer", "sdp": "v=0"}', 4400),  # a second answer
        (b"\x00binary", 4400),
        # 1009; or 1006 when the station's close races the rest of the oversized frame
        ("x" * (70 * 1024), (1009, 1006)),
    ],
)
async def test_bad_messages_close_only_that_socket(
    call_station: Station, devices: list[Device], message: str | bytes, code: int | tuple[int, int]
):
    station = call_station
    bad, good = await pair(station), await pair(station)
    devices.extend([bad, good])
    await bad.connect()
    await good.connect()
    await good.wait_connected()
    assert bad.ws is not None
    if isinstance(message, bytes):
        await bad.ws.send_bytes(message)
    else:
        await bad.ws.send_str(message)
    for _ in range(100):
        if bad.close_code is not None:
            break
        await asyncio.sleep(0.02)
    assert bad.close_code in (code if isinstance(code, tuple) else (code,))
    await good.send({"type": "ping"})
    await good.expect("pong")
    assert station.calls is not None
    assert station.status()["calls"]["devices_online"] == 1


async def test_message_flood_closes_the_socket(call_station: Station, devices: list[Device]):
    station = call_station
    device = await pair(station)
    devices.append(device)
    await device.connect()
    for _ in range(60):
        await device.send({"type": "ping"})
    for _ in range(100):
        if device.close_code is not None:
            break
        await asyncio.sleep(0.02)
    assert device.close_code == 4429


async def test_a_second_socket_of_a_device_replaces_the_first(
    call_station: Station, devices: list[Device]
):
    station = call_station
    first = await pair(station)
    devices.append(first)
    await first.connect()
    again = Device(station, first.key, first.principal, first.totp_uri)
    devices.append(again)
    await again.connect()
    for _ in range(100):
        if first.close_code is not None:
            break
        await asyncio.sleep(0.02)
    assert first.close_code == 4409
    await again.send({"type": "ping"})
    await again.expect("pong")


@pytest.mark.parametrize(
    "sdp", ["garbage", "v=0\r\n", "", "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"]
)
async def test_a_broken_answer_closes_only_that_socket(
    call_station: Station, devices: list[Device], sdp: str
):
    station = call_station
    device = await pair(station)
    devices.append(device)
    await device.connect(answer=False)
    await device.send({"type": "answer", "sdp": sdp})
    for _ in range(100):
        if device.close_code is not None:
            break
        await asyncio.sleep(0.02)
    assert device.close_code == 4400
    again = await pair(station)
    devices.append(again)
    await again.connect()
    await again.wait_connected()


async def test_an_internal_fault_is_a_short_500_without_a_trace(
    call_station: Station, monkeypatch: pytest.MonkeyPatch
):
    station = call_station
    assert station.calls is not None

    async def broken(_code: object, _jwk: object) -> None:
        raise RuntimeError("disk on fire at /var/lib/intercom")

    monkeypatch.setattr(station.calls.pairing, "redeem", broken)
    status, headers, body = await fetch(
        station, "POST", "api/pair", json={"code": "X", "jwk": DeviceKey().jwk()}
    )
    assert (status, json.loads(body)) == (500, {"error": "internal error"})
    assert "Content-Security-Policy" in headers
    status, _, _ = await fetch(station, "GET", "api/info")
    assert status == 200


async def test_a_taken_port_is_a_clear_error_and_the_first_station_carries_on(
    call_station: Station, tmp_path: Path
):
    station = call_station
    assert station.calls is not None
    port = int(station.calls.url.rsplit(":", 1)[1].strip("/"))
    settings = kit.call_settings(tmp_path / "other")
    settings = settings.model_copy(update={"web": settings.web.model_copy(update={"port": port})})
    second = Station(settings)
    with pytest.raises(IntercomError, match=f"web: cannot listen on 127.0.0.1:{port}"):
        await second.start()
    status, _, _ = await fetch(station, "GET", "api/info")
    assert status == 200


async def test_totp_check_answers_limits_and_counts_but_opens_and_spends_nothing(
    call_station: Station, devices: list[Device]
):
    """The enrolment's confirm step (docs/security.md, "The enrolment's code check")."""
    station = call_station
    registry = station.registry
    assert registry is not None
    recorder = Recorder(station.bus)
    phone = await pair(station)
    devices.append(phone)
    await phone.connect()
    await phone.wait_connected()
    totp = pyotp.parse_uri(phone.totp_uri)

    async def check(code: str) -> dict[str, object]:
        await phone.send({"type": "totp-check", "code": code})
        return await phone.expect("totp-check")

    # a wrong code: refused, and counted toward backoff and lockout like a command's
    answer = await check(unlock_kit.wrong_code(phone))
    assert (answer["ok"], answer["result"]) == (False, "wrong")
    assert registry.guard(phone.principal).failures == 1
    assert (await check("12345"))["result"] == "wrong"  # a typing slip: not counted
    assert registry.guard(phone.principal).failures == 1
    # the code the authenticator shows: right, the failures end, nothing opens
    right = totp.now()
    answer = await check(right)
    assert (answer["ok"], answer["result"]) == (True, "right")
    assert registry.guard(phone.principal).failures == 0
    assert not unlock_kit.relay_was_energised(station)
    assert not [t for t in recorder.types() if t.startswith("Unlock")]
    # 5 checks a minute: the fourth and fifth are answered, the sixth is not even checked
    assert [(await check(right))["result"] for _ in range(3)] == ["right", "right", "wait"]
    # the right code was not spent: it still opens the door once, in a call
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    ring = await phone.expect("ring")
    await phone.send({"type": "accept", "call": ring["call"]})
    await phone.expect("call", state="answered")
    assert (await phone.unlock(right))["result"] == "granted"
    assert (await phone.unlock(right))["result"] == "denied"  # and only once
    await phone.send({"type": "hangup", "call": ring["call"]})
    # a locked-out principal is not checked at all, even with a right code
    registry.spend(phone.principal, Guard(failures=20, last_step=-1), "test-lockout", 0.0)
    assert (await check(totp.now()))["result"] == "locked"
    # a code that is not a string closes the socket as malformed
    await phone.send({"type": "totp-check", "code": 123456})
    await kit.eventually(lambda: phone.close_code is not None, 5, "socket not closed")
    assert phone.close_code == signalling.CLOSE_MALFORMED
