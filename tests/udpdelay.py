"""A user-space UDP relay that delays every datagram: the lab's stand-in for a long path.

The kernel here has no ``netem`` qdisc, so delay is added in user space. The relay
listens on one address and forwards each client flow (its source address and port) from
a socket of its own to one upstream address, so the upstream sees one source port per
client flow, as it would through a NAT. Each datagram waits ``rtt / 2`` on the way up
and again on the way back, in order within a flow. Flows idle for ``--idle`` seconds are
closed.

Run: ``python tests/udpdelay.py --listen 10.77.0.1:3478 --upstream 203.0.113.1:3478
--rtt-ms 200``. It prints ``listening`` on stdout once bound, and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import cast

log = logging.getLogger("udpdelay")

Address = tuple[str, int]


def parse_address(text: str) -> Address:
    """``host:port`` as a tuple."""
    host, _, port = text.rpartition(":")
    return host, int(port)


class DelayLine:
    """Datagrams sent with ``send`` after ``delay`` seconds, in the order they came."""

    def __init__(self, delay: float, send: Callable[[bytes], object], name: str) -> None:
        self._delay = delay
        self._send = send
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def put(self, data: bytes) -> None:
        """Queue one datagram, due ``delay`` from now."""
        self._queue.put_nowait((time.monotonic() + self._delay, data))

    def close(self) -> None:
        """Drop what is queued and stop."""
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            due, data = await self._queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            with contextlib.suppress(OSError):  # an ICMP error from an earlier datagram
                self._send(data)


class Flow:
    """One client flow: its own connected socket toward the upstream address."""

    def __init__(self, client: Address, upstream: Address, delay: float,
                 to_client: Callable[[bytes, Address], None]) -> None:
        self.client = client
        self.last_seen = time.monotonic()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(upstream)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)
        self.up = DelayLine(delay, self.sock.send, f"udpdelay-up-{client}")
        self.down = DelayLine(delay, lambda data: to_client(data, client),
                              f"udpdelay-down-{client}")

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:  # ICMP unreachable for an earlier datagram
                log.debug("flow %s: %s", self.client, exc)
                return
            self.last_seen = time.monotonic()
            self.down.put(data)

    def close(self) -> None:
        """Stop both directions and close the socket."""
        self.up.close()
        self.down.close()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class Relay(asyncio.DatagramProtocol):
    """The listening socket: client datagrams in, each flow to its own upstream socket."""

    def __init__(self, upstream: Address, delay: float, idle: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.idle = idle
        self.flows: dict[Address, Flow] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self.flows[addr] = Flow(addr, self.upstream, self.delay, self.send_to_client)
            log.info("flow %s:%d opened", *addr)
        flow.last_seen = time.monotonic()
        flow.up.put(data)

    def send_to_client(self, data: bytes, client: Address) -> None:
        """Send on the listening socket, so the client sees the address it sent to."""
        if self.transport is not None:
            self.transport.sendto(data, client)

    def expire(self) -> None:
        """Close flows that have been idle for longer than ``idle`` seconds."""
        now = time.monotonic()
        for client, flow in list(self.flows.items()):
            if now - flow.last_seen > self.idle:
                log.info("flow %s:%d idle, closed", *client)
                flow.close()
                del self.flows[client]


async def serve(listen: Address, upstream: Address, rtt_ms: float, idle: float) -> None:
    """Relay until cancelled."""
    loop = asyncio.get_running_loop()
    relay = Relay(upstream, rtt_ms / 2000, idle)
    transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=listen)
    sys.stdout.write("listening\n")
    sys.stdout.flush()
    try:
        while True:
            await asyncio.sleep(min(idle, 10))
            relay.expire()
    finally:
        for flow in relay.flows.values():
            flow.close()
        transport.close()


def main() -> None:
    """Command line: listen, upstream, round-trip time to add, idle expiry."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=parse_address, required=True, help="host:port")
    parser.add_argument("--upstream", type=parse_address, required=True, help="host:port")
    parser.add_argument("--rtt-ms", type=float, required=True, help="round-trip time to add")
    parser.add_argument("--idle", type=float, default=180.0, help="seconds before a flow ends")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="udpdelay %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.upstream, args.rtt_ms, args.idle))


if __name__ == "__main__":
    main()
