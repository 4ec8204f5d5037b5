"""Pairing limits under a hostile network: per address, charged before the body is read."""

from __future__ import annotations

import asyncio
import json
import ssl
from urllib.parse import urlsplit

import aiohttp

from intercom.calls import server
from intercom.security.limits import BucketTable
from intercom.station import Station

from . import test_calls_client as kit
from .test_calls_client import DeviceKey, pinned

call_station = kit.call_station

WRONG = "WRONGWRONG22"
BURST = int(server.PAIR_RATE_PER_ADDRESS[1])


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def headers_only(
    station: Station, source: str, length: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A pairing request from ``source`` whose headers are sent and whose body is not yet."""
    assert station.calls is not None
    url = urlsplit(station.calls.url)
    assert url.hostname is not None
    assert url.port is not None
    reader, writer = await asyncio.open_connection(
        url.hostname, url.port, ssl=unverified(), local_addr=(source, 0)
    )
    writer.write(
        (
            f"POST /api/pair HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    return reader, writer


async def status_of(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    return int(line.split()[1])


async def test_concurrent_attempts_from_one_address_are_charged_before_their_bodies(
    call_station: Station,
):
    body = json.dumps({"code": WRONG, "jwk": DeviceKey().jwk()}).encode()
    attempts = 3 * BURST
    connections = [
        await headers_only(call_station, "127.0.0.2", len(body)) for _ in range(attempts)
    ]
    answers = [asyncio.create_task(status_of(reader)) for reader, _ in connections]
    try:
        # What the station refuses it answers at once; wait (bounded) for those.
        deadline = asyncio.get_running_loop().time() + 3
        while sum(a.done() for a in answers) < attempts - BURST:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        for answer, (_, writer) in zip(answers, connections, strict=True):
            if not answer.done():
                writer.write(body)
        statuses = await asyncio.wait_for(asyncio.gather(*answers), 10)
    finally:
        for _, writer in connections:
            writer.close()
    assert statuses.count(403) == BURST  # evaluated: at most the burst
    assert statuses.count(429) == attempts - BURST


async def post_code(station: Station, source: str, code: str) -> int:
    assert station.calls is not None
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.post(
            station.calls.url + "api/pair",
            json={"code": code, "jwk": DeviceKey().jwk()},
            ssl=pinned(station),
        ) as response,
    ):
        return response.status


async def test_wrong_codes_from_other_addresses_never_block_a_valid_code(call_station: Station):
    station = call_station
    assert station.calls is not None
    for host in range(2, 9):  # seven addresses, each using up its own budget
        source = f"127.0.0.{host}"
        statuses = [await post_code(station, source, WRONG) for _ in range(BURST + 1)]
        assert statuses == [403] * BURST + [429], source
    code = str((await station.calls.pair_request({"flat": "1"}))["code"])
    assert await post_code(station, "127.0.0.9", code) == 200


def test_a_full_address_table_forgets_the_oldest_address_only():
    table = BucketTable(rate=0.0, burst=1.0, size=3)
    for address in ("a", "b", "c"):
        assert table.take(address, 0.0)
    assert not table.take("a", 0.0)  # "a" is refused and now the most recently used
    assert table.take("d", 0.0)  # the table is full: "b", used longest ago, goes
    assert len(table) == 3
    assert not table.take("a", 0.0)  # still refused: the table was not cleared
    assert not table.take("c", 0.0)
