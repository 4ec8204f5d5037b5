"""Sign-in slots of the signalling socket under a hostile network (loopback addresses)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from intercom.calls import signalling
from intercom.station import Station

from . import test_calls_client as kit
from .test_calls_client import Device, pair, pinned

call_station = kit.call_station
devices = kit.devices


@contextlib.asynccontextmanager
async def client_from(address: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose connections come from ``address`` (any of 127.0.0.0/8)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        yield http


async def open_socket(
    http: aiohttp.ClientSession, station: Station
) -> aiohttp.ClientWebSocketResponse:
    assert station.calls is not None
    return await http.ws_connect(station.calls.url + "ws", ssl=pinned(station), autoclose=True)


async def keep_pinging(ws: aiohttp.ClientWebSocketResponse, every: float) -> None:
    """Send a PING control frame every ``every`` seconds, never a message."""
    with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
        while not ws.closed:
            await ws.ping()
            await asyncio.sleep(every)


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """Read until the station closes the socket; its close code."""
    async for _ in ws:
        pass
    return ws.close_code


async def first_answer(ws: aiohttp.ClientWebSocketResponse) -> str | int | None:
    """``"challenge"`` when the station offers sign-in, else the close code."""
    message = await ws.receive(timeout=5)
    if message.type is aiohttp.WSMsgType.TEXT:
        return str(message.json()["type"])
    return ws.close_code


async def test_pinging_idle_sockets_are_closed_at_the_sign_in_deadline(
    call_station: Station, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(signalling, "AUTH_TIMEOUT_S", 0.6)
    async with client_from("127.0.0.2") as http:
        sockets = [await open_socket(http, call_station) for _ in range(4)]
        pingers = [asyncio.create_task(keep_pinging(ws, 0.1)) for ws in sockets]
        try:
            # Control frames come far more often than the deadline; none extends it.
            codes = await asyncio.wait_for(asyncio.gather(*(closed_with(ws) for ws in sockets)), 10)
        finally:
            for task in pingers:
                task.cancel()
    assert codes == [signalling.CLOSE_AUTH] * 4


async def test_one_address_cannot_hold_the_sign_in_slots_of_all(
    call_station: Station, devices: list[Device]
):
    station = call_station
    phone = await pair(station)
    devices.append(phone)
    async with client_from("127.0.0.2") as http:
        sockets = [await open_socket(http, station) for _ in range(signalling.MAX_UNAUTHENTICATED)]
        pingers = [asyncio.create_task(keep_pinging(ws, 1)) for ws in sockets]
        try:
            answers = [await first_answer(ws) for ws in sockets]
            held = answers.count("challenge")
            assert held == signalling.MAX_UNAUTHENTICATED_PER_ADDRESS
            assert answers.count(signalling.CLOSE_BUSY) == len(sockets) - held
            # A paired device from another address signs in while those are held.
            await phone.connect()
            await phone.send({"type": "ping"})
            await phone.expect("pong")
            assert sum(not ws.closed for ws in sockets) == held
        finally:
            for task in pingers:
                task.cancel()
            for ws in sockets:
                await ws.close()
