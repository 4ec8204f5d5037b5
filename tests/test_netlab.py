"""The network lab proves its topology with real traffic (issue #14, answer through NAT).

Needs root (``ip netns``), coturn, nginx and iptables, as scripts/setup-dev installs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import selectors
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from .netlab import (
    NAMESPACES,
    Certificate,
    Coturn,
    Lab,
    lab,
    remove_stale,
    server_certificate,
    stun_answered,
    stun_request,
)

PEER = Path(__file__).with_name("netlab_peer.py")
PUBLIC_NAME = "door.example.test"
NO_PATH_WAIT_S = 5  # host and srflx pairs that work connect in well under a second here


@pytest.fixture(scope="module")
def netlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with lab(tmp_path_factory.mktemp("netlab")) as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def turn(netlab: Lab) -> Coturn:
    return netlab.coturn("lab-secret", "netlab.example.test")


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}


def connect_from(netlab: Lab, where: str, address: tuple[str, int]) -> None:
    """A TCP connection from namespace ``where`` to ``address``, closed at once."""
    with netlab.socket(where) as client:
        client.settimeout(3)
        client.connect(address)


def test_mobile_reaches_the_home_only_through_the_port_forward(netlab: Lab) -> None:
    a = netlab.addresses
    with netlab.socket("home") as listener, netlab.socket("home", socket.SOCK_DGRAM) as inbox:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((a.home, 8443))
        listener.listen()
        listener.settimeout(5)
        inbox.bind((a.home, 9999))
        with netlab.socket("mobile") as client:
            client.settimeout(5)
            client.connect((a.router_wan, 8443))
            accepted, peer = listener.accept()
            accepted.close()
        assert peer[0] == a.mrouter_wan  # the carrier NAT's address, through the home NAT
        with pytest.raises(OSError):  # the station's private address: no route
            connect_from(netlab, "mobile", (a.home, 8443))
        with pytest.raises(ConnectionRefusedError):  # a port the router does not forward
            connect_from(netlab, "mobile", (a.router_wan, 9443))
        with netlab.socket("mobile", socket.SOCK_DGRAM) as udp:
            udp.sendto(b"mobile to home", (a.home, 9999))
            udp.sendto(b"mobile to router", (a.router_wan, 9999))
        with netlab.socket("router", socket.SOCK_DGRAM) as udp:
            udp.sendto(b"router to home", (a.home, 9999))
        inbox.settimeout(5)
        received = [inbox.recv(64), *until_quiet(inbox, 0.3)]
    assert received == [b"router to home"]


def until_quiet(sock: socket.socket, quiet_s: float) -> list[bytes]:
    """Datagrams ``sock`` receives until none comes for ``quiet_s``."""
    sock.settimeout(quiet_s)
    received: list[bytes] = []
    while True:
        try:
            received.append(sock.recv(2048))
        except TimeoutError:
            return received


@dataclass
class Attempt:
    """Two peers' offer and answer, and what each reported once connected (or None)."""

    offer: str
    answer: str
    connected: list[dict[str, Any]] | None


async def _line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    if not line:
        raise AssertionError("the peer exited; see its log")
    message: dict[str, Any] = json.loads(line)
    return message


def _send(proc: asyncio.subprocess.Process, message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message).encode() + b"\n")


async def connect_peers(netlab: Lab, servers: dict[str, list[dict[str, str]]], relay: bool,
                        timeout: float, label: str) -> Attempt:
    """An aiortc peer in ``home`` offers, one in ``mobile`` answers; did a message cross?"""
    procs: dict[str, asyncio.subprocess.Process] = {}
    for where, role in (("home", "offer"), ("mobile", "answer")):
        argv = [sys.executable, str(PEER), role, "--servers", json.dumps(servers[where])]
        with (netlab.folder / f"peer-{label}-{where}.log").open("ab") as log:
            procs[where] = await asyncio.create_subprocess_exec(
                *netlab.argv(where, [*argv, *(["--relay"] if relay else [])]),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            )
    home, mobile = procs["home"], procs["mobile"]
    connected = None
    try:
        offer = await _line(home, 30)  # the first line waits for aiortc's import too
        _send(mobile, offer)
        answer = await _line(mobile, 30)
        _send(home, answer)
        try:
            connected = list(await asyncio.wait_for(
                asyncio.gather(_line(home, timeout), _line(mobile, timeout)), timeout))
        except TimeoutError:
            connected = None
        return Attempt(offer["sdp"], answer["sdp"], connected)
    finally:
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            if connected is None:
                proc.kill()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_home_and_mobile_connect_through_a_turn_relay(netlab: Lab, turn: Coturn) -> None:
    servers = {}
    for where in ("home", "mobile"):
        username, password = turn.credentials(where)
        servers[where] = [{"urls": turn.urls[0], "username": username, "credential": password}]
    before = turn.traffic()
    attempt = await connect_peers(netlab, servers, relay=True, timeout=20, label="relay")
    assert attempt.connected is not None, "no data channel through coturn"
    for report in attempt.connected:
        assert (report["local"], report["remote"]) == ("relay", "relay")
        assert report["local_address"][0] == report["remote_address"][0] == turn.address[0]
    after = turn.traffic()
    assert after.udp_in.packets > before.udp_in.packets
    assert after.udp_out.bytes > before.udp_out.bytes


async def test_without_turn_home_and_mobile_do_not_connect(netlab: Lab, turn: Coturn) -> None:
    a = netlab.addresses
    stun = [{"urls": f"stun:{a.public}:3478"}]
    none: list[dict[str, str]] = []
    with_stun, without_servers = await asyncio.gather(
        connect_peers(netlab, {"home": stun, "mobile": stun}, relay=False,
                      timeout=NO_PATH_WAIT_S, label="stun"),
        connect_peers(netlab, {"home": none, "mobile": none}, relay=False,
                      timeout=NO_PATH_WAIT_S, label="none"),
    )
    # each side offered its private address and the address its NAT showed coturn...
    assert f"{a.home} " in with_stun.offer
    assert f"{a.router_wan} " in with_stun.offer
    assert "typ srflx" in with_stun.offer
    assert f"{a.mobile} " in with_stun.answer
    assert f"{a.mrouter_wan} " in with_stun.answer
    assert "typ srflx" in with_stun.answer
    # ...and no pair of them gets a message across
    assert with_stun.connected is None
    assert "typ srflx" not in without_servers.offer
    assert without_servers.connected is None


async def test_through_a_cone_carrier_nat_server_reflexive_pairs_would_connect(
    netlab: Lab, turn: Coturn
) -> None:
    """The control for the test above: the symmetric carrier NAT is what stops them."""
    stun = [{"urls": f"stun:{netlab.addresses.public}:3478"}]
    netlab.carrier_nat(symmetric=False)
    try:
        attempt = await connect_peers(netlab, {"home": stun, "mobile": stun}, relay=False,
                                      timeout=20, label="cone")
    finally:
        netlab.carrier_nat(symmetric=True)
    assert attempt.connected is not None
    assert {report["remote"] for report in attempt.connected} & {"srflx", "prflx"}
    assert {report["local"] for report in attempt.connected} == {"host"}


def test_impairment_delays_and_drops_the_mobiles_turn_datagrams(netlab: Lab, turn: Coturn) -> None:
    # Delayed, in order: a request sent from the mobile first is answered after one sent
    # at once from the carrier's router, whose own traffic is not delayed.
    netlab.impair(rtt_ms=120.0, loss=0.0)
    try:
        with netlab.socket("mobile", socket.SOCK_DGRAM) as delayed, \
                netlab.socket("mrouter", socket.SOCK_DGRAM) as direct:
            delayed.sendto(stun_request(b"via-thedelay"), turn.address)
            direct.sendto(stun_request(b"direct-to-it"), turn.address)
            arrived: list[bytes | None] = []
            with selectors.DefaultSelector() as selector:
                selector.register(delayed, selectors.EVENT_READ)
                selector.register(direct, selectors.EVENT_READ)
                while len(arrived) < 2:
                    ready = selector.select(timeout=5)
                    assert ready, f"answers missing: {arrived}"
                    for key, _ in ready:
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        arrived.append(stun_answered(sock.recv(2048)))
                        selector.unregister(sock)
    finally:
        netlab.impair(0, 0)
    assert arrived == [b"direct-to-it", b"via-thedelay"]
    count = 200
    netlab.impair(rtt_ms=120.0, loss=0.05)
    try:
        with netlab.socket("mobile", socket.SOCK_DGRAM) as udp:
            for n in range(count):  # STUN Binding requests to coturn: its answers echo them
                udp.sendto(stun_request(n.to_bytes(12, "big")), turn.address)
            answers = until_quiet(udp, 2)
    finally:
        netlab.impair(0, 0)
    assert 0 < len(answers) < count  # 5 % lost each way: some lost, most answered


async def _serve_station(netlab: Lab, certificate: Certificate) -> web.AppRunner:
    """An HTTPS and WebSocket echo on the station's address, port 8443."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({
            "host": request.host,
            "forwarded_for": request.headers.get("X-Forwarded-For"),
            "remote": request.remote,
        })

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/echo", echo)
    app.router.add_get("/ws", websocket)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert_pem, certificate.key_pem)
    sock = netlab.socket("home")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((netlab.addresses.home, 8443))
    await web.SockSite(runner, sock, ssl_context=context).start()
    return runner


async def _open_from_mobile(
    netlab: Lab, ca: Path
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = netlab.socket("mobile")
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (netlab.addresses.public, 443))
    context = ssl.create_default_context(cafile=ca)
    return await asyncio.open_connection(sock=sock, ssl=context, server_hostname=PUBLIC_NAME)


async def test_nginx_proxies_https_and_websockets_to_the_port_forward(
    netlab: Lab, tmp_path: Path
) -> None:
    a = netlab.addresses
    public = server_certificate(tmp_path / "public", PUBLIC_NAME, "Netlab Public CA")
    station = server_certificate(tmp_path / "station", PUBLIC_NAME, "Netlab Station CA")
    runner = await _serve_station(netlab, station)
    proxy = netlab.nginx(f"{a.router_wan}:8443", PUBLIC_NAME, public.cert_pem, public.key_pem,
                         station.ca_pem)
    netlab.hosts("mobile", {PUBLIC_NAME: a.public})  # for programs run there, Chromium too
    assert netlab.sh("mobile", "getent", "hosts", PUBLIC_NAME).split() == [a.public, PUBLIC_NAME]
    try:
        reader, writer = await _open_from_mobile(netlab, public.ca_pem)
        writer.write(f"GET /echo HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nConnection: close\r\n\r\n"
                     .encode())
        head, _, body = (await asyncio.wait_for(reader.read(), 10)).partition(b"\r\n\r\n")
        writer.close()
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(body) == {
            "host": PUBLIC_NAME, "forwarded_for": a.mrouter_wan, "remote": a.public,
        }

        reader, writer = await _open_from_mobile(netlab, public.ca_pem)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws HTTP/1.1\r\nHost: {PUBLIC_NAME}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        mask = os.urandom(4)
        text = b"through nginx"
        masked = bytes(byte ^ mask[n % 4] for n, byte in enumerate(text))
        writer.write(bytes([0x81, 0x80 | len(text)]) + mask + masked)  # one masked text frame
        frame = await asyncio.wait_for(reader.readexactly(2 + len(text)), 10)
        assert frame == bytes([0x81, len(text)]) + text
        writer.close()
    finally:
        proxy.stop()
        await runner.cleanup()


def test_a_failing_test_still_tears_its_lab_down(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def failing_test() -> None:
        with lab(tmp_path) as inner:
            seen["coturn"] = inner.coturn("secret", "realm.example.test").proc
            seen["names"] = {inner.ns(name) for name in NAMESPACES}
            assert seen["names"] <= namespaces()
            raise RuntimeError("failed on purpose")

    with pytest.raises(RuntimeError, match="failed on purpose"):
        failing_test()
    assert seen["coturn"].poll() is not None
    assert not seen["names"] & namespaces()


def test_namespaces_of_dead_runs_are_removed(netlab: Lab) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"icl{gone.pid}n0-home"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    remove_stale()  # (a parallel run starting a lab may remove it first: fine too)
    assert stale not in namespaces()
    assert netlab.ns("home") in namespaces()  # a live run's are left alone
