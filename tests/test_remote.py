"""Answering from anywhere, the station's side: its names and origins, a trusted reverse
proxy's forwarded address, short-lived TURN credentials (coturn's REST scheme), the ICE
policy. The whole call through NAT, TURN and a reverse proxy is tests/test_remote_call.py.

Real: the station in this process with its HTTPS server on loopback, aiohttp clients
sending the headers a browser (or a hostile page) sends.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from intercom.calls import server
from intercom.calls.origin import Origins
from intercom.calls.turn import IceProvider, read_secret
from intercom.config import Settings, TurnConfig, WebConfig
from intercom.errors import ConfigError
from intercom.events import DoorbellPressed
from intercom.station import Station

from . import test_calls_client as kit
from .netlab import stop_process, stun_answered, stun_request
from .test_calls_client import DeviceKey, call_settings, pair, pinned

call_station = kit.call_station
devices = kit.devices

SECRET = "lab-secret-" + "x" * 16  # a test's own, never a default anywhere


def secret_file(tmp_path: Path, text: str = SECRET) -> Path:
    path = tmp_path / "turn-secret"
    path.write_text(text + "\n")
    return path


def web_with_turn(tmp_path: Path, **web: Any) -> WebConfig:
    turn = {"urls": ["turn:turn.example.test:3478"], "secret_file": str(secret_file(tmp_path))}
    return WebConfig.model_validate({"turn": turn, **web})


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("web", "key"),
    [
        ({"ice_servers": [{"urls": ["turn:t.example.test"], "credential": "long-lived"}]},
         "ice_servers"),
        ({"ice_policy": "relay"}, "ice_policy"),
        ({"turn": {"urls": ["turn:t.example.test"]}}, "secret_file"),
        ({"turn": {"urls": ["stun:t.example.test"], "secret_file": "/x"}}, "urls"),
        ({"trusted_proxies": ["proxy.example.test"]}, "trusted_proxies"),
    ],
)
def test_bad_remote_settings_are_refused_naming_the_key(web: dict[str, Any], key: str) -> None:
    with pytest.raises(ValidationError) as refused:
        WebConfig.model_validate(web)
    assert key in str(refused.value)
    assert "long-lived" not in str(refused.value).split("input_value")[0]


def test_the_turn_secret_comes_from_a_file_or_a_systemd_credential(tmp_path: Path) -> None:
    path = secret_file(tmp_path)
    assert read_secret(TurnConfig(urls=["turn:t"], secret_file=path)) == SECRET.encode()
    by_name = TurnConfig(urls=["turn:t"], secret_credential=path.name)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert read_secret(by_name, env) == SECRET.encode()
    for config, environ, key in (
        (by_name, {}, "web.turn.secret_credential: $CREDENTIALS_DIRECTORY is not set"),
        (TurnConfig(urls=["turn:t"], secret_file=tmp_path / "none"), {}, "cannot read"),
        (TurnConfig(urls=["turn:t"], secret_file=secret_file(tmp_path, "short")), {},
         "at least 16 characters"),
    ):
        with pytest.raises(ConfigError) as refused:
            read_secret(config, environ)
        assert key in str(refused.value)
        assert "web.turn.secret" in str(refused.value)


# --- short-lived TURN credentials --------------------------------------------------------------


def test_each_end_gets_its_own_short_lived_credential_in_coturns_rest_scheme(tmp_path):
    now = 1_800_000_000.0
    web = web_with_turn(tmp_path, ice_servers=[{"urls": ["stun:stun.example.test"]}])
    ice = IceProvider(web, SECRET.encode(), clock=lambda: now)
    device = ice.ice_config("res-0123456789abcdef")
    stun, turn = device["ice_servers"]
    assert stun == {"urls": ["stun:stun.example.test"]}
    expiry = int(now) + web.turn.ttl_s  # type: ignore[union-attr]
    assert turn["username"] == f"{expiry}:res-0123456789abcdef"
    mac = hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert base64.b64decode(turn["credential"]) == mac
    assert device["ice_expires_at"] == expiry
    assert device["ice_policy"] == "all"
    (_stun, station_turn) = ice.station_servers("st-1")
    assert station_turn.username == f"{expiry}:st-1"
    assert station_turn.credential != turn["credential"]
    assert SECRET not in repr(device)


def test_without_a_turn_server_nobody_gets_credentials_and_no_public_server_is_used():
    ice = IceProvider(WebConfig(), None)
    assert ice.ice_config("res-0123456789abcdef") == {
        "ice_servers": [], "ice_policy": "all", "ice_expires_at": None}
    assert ice.station_servers("st-1") == []
    assert ice.ttl_s is None


# --- the station's names and origins -----------------------------------------------------------


def test_only_the_stations_own_names_and_pages_are_answered():
    origins = Origins(lambda: ("door-1.local", "*.home.example.test"),
                      "https://door.example.test/")
    answered = [
        ("door-1.local:8443", None),
        ("door-1.local:8443", "https://door-1.local:8443"),
        ("192.0.2.7:8443", "https://192.0.2.7:8443"),
        ("[2001:db8::7]:8443", "https://[2001:db8::7]:8443"),
        ("front.home.example.test:8443", "https://front.home.example.test:8443"),
        ("door.example.test", "https://door.example.test"),  # through the reverse proxy
        ("192.0.2.7:8443", "https://door.example.test"),  # a proxy that keeps its Host
        ("door.example.test:443", "https://door.example.test:443"),
    ]
    for host, origin in answered:
        assert origins.refusal(host, origin) is None, (host, origin)
    refused = [
        ("evil.example.test:8443", None, "Host"),  # DNS rebinding
        ("a.b.home.example.test", None, "Host"),  # the wildcard covers one label
        ("", None, "Host"),
        (None, None, "Host"),
        ("door-1.local:8443", "https://evil.example.test", "Origin"),  # hijacking the socket
        ("door-1.local:8443", "http://door-1.local:8443", "Origin"),
        ("door-1.local:8443", "https://door-1.local:9443", "Origin"),
        ("door-1.local:8443", "null", "Origin"),
        ("door-1.local:8443", "https://door.example.test:8443", "Origin"),
    ]
    for host, origin, why in refused:
        reason = origins.refusal(host, origin)
        assert reason is not None, (host, origin)
        assert why in reason, (host, origin, reason)


@pytest.fixture
async def proxied_station(tmp_path: Path) -> AsyncIterator[Station]:
    data = call_settings(tmp_path / "state").model_dump(mode="json")
    data["web"].update({"public_url": "https://door.example.test/",
                        "trusted_proxies": ["127.0.0.1"]})
    station = Station(Settings.model_validate(data))
    await station.start()
    yield station
    await station.stop("test finished")


async def answer(station: Station, path: str, headers: dict[str, str],
                 method: str = "GET", body: Any = None) -> tuple[int, str]:
    assert station.calls is not None
    assert station.calls.server is not None
    port = station.calls.server.bound_port()
    url = f"https://127.0.0.1:{port}/{path}"
    async with (aiohttp.ClientSession() as http,
                http.request(method, url, headers=headers, json=body,
                             ssl=pinned(station)) as response):
        return response.status, await response.text()


async def test_a_page_of_another_site_gets_nowhere_and_the_stations_own_do(
    proxied_station, caplog
):
    station = proxied_station
    assert station.calls is not None
    # the pairing link and its QR name the public URL
    link = (await station.calls.pair_request({"flat": "1"}))["url"]
    assert link.startswith("https://door.example.test/#pair=")
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()}
    for headers, status in (
        ({"Origin": "https://evil.example.test", **upgrade}, 403),
        ({"Host": "evil.example.test", **upgrade}, 403),
        ({"Origin": "https://door.example.test", **upgrade}, 101),
        ({"Host": "door.example.test", "Origin": "https://door.example.test", **upgrade}, 101),
        ({**upgrade}, 101),  # an app: no Origin
    ):
        got, text = await answer(station, "ws", headers)
        assert got == status, (headers, got, text)
    status, text = await answer(station, "api/pair", {"Origin": "https://evil.example.test"},
                                "POST", {"code": "x"})
    assert status == 403
    assert "Origin" in text
    # logged (refusals are logged at a bounded rate: the first one at least)
    assert any("web: refused GET /ws" in r.getMessage() and "(Origin)" in r.getMessage()
               for r in caplog.records)


async def test_a_trusted_proxy_s_forwarded_address_is_the_one_limits_count(proxied_station):
    """Behind a reverse proxy every resident arrives from the proxy's address; the
    pairing limit (10 attempts a minute per address) must count each client, and only a
    proxy the owner named may say who the client is."""
    station = proxied_station
    burst = int(server.PAIR_RATE_PER_ADDRESS[1])
    wrong = {"code": "WRONGWRONG22", "jwk": DeviceKey().jwk()}

    async def attempts(forwarded: str) -> list[int]:
        return [(await answer(station, "api/pair", {"X-Forwarded-For": forwarded},
                              "POST", wrong))[0] for _ in range(burst + 1)]

    # 127.0.0.1 is the trusted proxy here: two clients behind it, each its own limit
    assert (await attempts("192.0.2.1"))[-2:] == [403, 429]
    assert (await attempts("198.51.100.9, 192.0.2.2"))[-2:] == [403, 429]
    # a forged first hop does not help: the proxy's own last entry counts
    assert (await attempts("192.0.2.3, 192.0.2.2"))[0] == 429


async def test_an_untrusted_sender_s_forwarded_address_is_ignored(call_station):
    """Without trusted_proxies, X-Forwarded-For is anyone's word: every "client" here is
    127.0.0.1, one pairing limit."""
    burst = int(server.PAIR_RATE_PER_ADDRESS[1])
    wrong = {"code": "WRONGWRONG22", "jwk": DeviceKey().jwk()}
    statuses = [(await answer(call_station, "api/pair", {"X-Forwarded-For": f"192.0.2.{i}"},
                              "POST", wrong))[0] for i in range(burst + 1)]
    assert statuses[-2:] == [403, 429]


# --- fresh credentials before they expire (coturn on loopback) ---------------------------------


@contextmanager
def loopback_coturn(folder: Path, secret: str) -> Iterator[int]:
    """Debian's coturn on 127.0.0.1 (a free UDP port), TURN REST auth with ``secret``;
    loopback peers allowed (everything here is on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "turnserver.conf"
    conf.write_text(
        f"listening-ip=127.0.0.1\nrelay-ip=127.0.0.1\nlistening-port={port}\n"
        f"realm=turn.example.test\nuse-auth-secret\nstatic-auth-secret={secret}\n"
        f"fingerprint\nno-cli\nno-tls\nno-dtls\nno-tcp\nallow-loopback-peers\n"
        f"log-file={folder}/turnserver.log\nsimple-log\npidfile={folder}/turnserver.pid\n"
        f"userdb={folder}/turndb\n")
    proc = subprocess.Popen(["turnserver", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(0.2)
            while True:
                assert proc.poll() is None, (folder / "turnserver.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "coturn did not answer"
                udp.sendto(stun_request(b"remote-ready"), ("127.0.0.1", port))
                with suppress(OSError):
                    if stun_answered(udp.recv(2048)) == b"remote-ready":
                        break
        yield port
    finally:
        stop_process(proc)


@pytest.fixture
async def turn_station(tmp_path: Path) -> AsyncIterator[Station]:
    with loopback_coturn(tmp_path / "coturn", SECRET) as port:
        data = call_settings(tmp_path / "state", ring_timeout_s=10).model_dump(mode="json")
        data["web"]["turn"] = {"urls": [f"turn:127.0.0.1:{port}?transport=udp"],
                               "secret_file": str(secret_file(tmp_path)), "ttl_s": 600}
        station = Station(Settings.model_validate(data))
        await station.start()
        yield station
        await station.stop("test finished")


def check_credential(config: dict[str, Any], principal: str, made: tuple[float, float]) -> int:
    """The TURN credential of ``config`` is the principal's own and expires ttl_s (600)
    after it was made, between ``made``'s two readings; its expiry."""
    (turn,) = config["ice_servers"]
    expiry, name = turn["username"].split(":", 1)
    assert name == principal
    mac = hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert base64.b64decode(turn["credential"]) == mac
    assert config["ice_expires_at"] == int(expiry)
    assert int(made[0]) + 600 <= int(expiry) <= int(made[1]) + 600
    return int(expiry)


async def test_devices_get_fresh_credentials_and_connections_before_theirs_expire(
    turn_station, devices
):
    """At sign-in a device gets credentials of its own and the station's offer carries a
    relayed candidate (coturn took the station's own credential). Past half their life,
    an idle device gets fresh ones and a fresh connection; a rung device gets the
    credentials at once and the connection when the call is over."""
    station = turn_station
    calls = station.calls
    assert calls is not None
    assert calls.signalling is not None
    device = await pair(station)
    devices.append(device)
    before = time.time()
    await device.connect()
    signed_in = (before, time.time())
    await device.wait_connected()
    first = device.ready
    check_credential(first, device.principal, signed_in)
    assert first["ice_policy"] == "all"
    # the station's own end got a relay from coturn with its own credential
    (session,) = calls.signalling.sessions.values()
    assert session.peer is not None
    assert " typ relay " in session.peer.pc.localDescription.sdp

    # idle, half the life gone (moved due: ttl_s is at least 10 minutes)
    before = time.time()
    session.ice_renew_at = 0
    fresh = await device.expect("ice", timeout=10)
    refreshed = (before, time.time())
    check_credential(fresh, device.principal, refreshed)
    assert fresh["ice_servers"] != first["ice_servers"]
    await device.wait_renewed(after=1, timeout=15)
    assert device.number == 2
    # due again after half of the 600 s
    assert session.ice_renew_at is not None
    assert refreshed[0] + 300 <= session.ice_renew_at <= refreshed[1] + 300

    # rung: the credentials at once, the connection once the ring is over
    station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
    ring = await device.expect("ring", timeout=10)
    session.ice_renew_at = 0
    await device.expect("ice", timeout=10)
    await asyncio.sleep(0.5)
    assert device.number == 2, "a rung device's connection was replaced mid-ring"
    await device.send({"type": "decline", "call": ring["call"]})
    await device.wait_renewed(after=2, timeout=15)
