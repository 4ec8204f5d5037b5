"""A user-space UDP relay that delays every datagram: the lab's stand-in for a long path.

The kernel here has no ``netem`` qdisc, so delay is added in user space. The relay
listens on one address and forwards each client flow (its source address and port) from
a socket of its own to one upstream address, so the upstream sees one source port per
client flow, as it would through a NAT. Each datagram waits ``rtt / 2`` on the way up
and again on the way back, in order within a flow. Flows idle for ``--idle`` seconds are
closed.

With ``--rate-kbps`` each direction is also a bottleneck of that rate, shared by every
flow (what a slow mobile link is): a datagram leaves once the ones before it have, at
most that many kbit/s counting its IP and UDP headers (28 bytes), and one that would
wait more than ``--queue-ms`` in that queue is dropped (drop-tail). The propagation
delay (``rtt / 2``) comes after the queue. Without it (the default) nothing is limited.

Run: ``python tests/udpdelay.py --listen 10.77.0.1:3478 --upstream 203.0.113.1:3478
--rtt-ms 200 [--rate-kbps 500 --queue-ms 200]``. It prints ``listening`` on stdout once
bound, and runs until killed; on SIGTERM it logs what each bottleneck sent and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
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


UDP_IP_HEADERS = 28  # bytes a datagram takes on the link beyond its payload (IPv4 + UDP)


class Bottleneck:
    """One direction of a link of ``rate_bps``, its queue at most ``queue_s`` long.

    ``admit`` is given each datagram as it arrives and tells when its last bit leaves
    the link (the ``clock``'s time), or None when it is dropped because it would wait in
    the queue longer than ``queue_s`` (drop-tail). No rate (``None``): it leaves at once.
    """

    def __init__(self, rate_bps: float | None, queue_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_bps = rate_bps
        self.queue_s = queue_s
        self._clock = clock
        self._free_at = 0.0  # when the link has sent everything admitted so far
        self.sent = 0  # datagrams admitted
        self.sent_bytes = 0
        self.dropped = 0

    def admit(self, size: int) -> float | None:
        """When a datagram of ``size`` payload bytes arriving now has left, or None."""
        now = self._clock()
        if self.rate_bps is None:
            self.sent += 1
            self.sent_bytes += size
            return now
        start = max(now, self._free_at)
        if start - now > self.queue_s:
            self.dropped += 1
            return None
        self._free_at = start + (size + UDP_IP_HEADERS) * 8 / self.rate_bps
        self.sent += 1
        self.sent_bytes += size
        return self._free_at


class DelayLine:
    """Datagrams sent with ``send`` after ``delay`` seconds, in the order they came,
    through ``link`` first when it is given (its queue, then the delay)."""

    def __init__(self, delay: float, send: Callable[[bytes], object], name: str,
                 link: Bottleneck | None = None) -> None:
        self._delay = delay
        self._send = send
        self._link = link
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def put(self, data: bytes) -> None:
        """Queue one datagram, due ``delay`` after it has crossed the link (or dropped)."""
        left = time.monotonic() if self._link is None else self._link.admit(len(data))
        if left is not None:
            self._queue.put_nowait((left + self._delay, data))

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
                 to_client: Callable[[bytes, Address], None],
                 links: tuple[Bottleneck, Bottleneck] | None = None) -> None:
        self.client = client
        self.last_seen = time.monotonic()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(upstream)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)
        up_link, down_link = links if links is not None else (None, None)
        self.up = DelayLine(delay, self.sock.send, f"udpdelay-up-{client}", up_link)
        self.down = DelayLine(delay, lambda data: to_client(data, client),
                              f"udpdelay-down-{client}", down_link)

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

    def __init__(self, upstream: Address, delay: float, idle: float,
                 rate_bps: float | None = None, queue_s: float = 0.2) -> None:
        self.upstream = upstream
        self.delay = delay
        self.idle = idle
        # one link each way, shared by every flow (none without a rate)
        self.links = (None if rate_bps is None else
                      (Bottleneck(rate_bps, queue_s), Bottleneck(rate_bps, queue_s)))
        self.flows: dict[Address, Flow] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            flow = self.flows[addr] = Flow(addr, self.upstream, self.delay, self.send_to_client,
                                           self.links)
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


async def serve(listen: Address, upstream: Address, rtt_ms: float, idle: float,
                rate_kbps: float | None = None, queue_ms: float = 200.0) -> None:
    """Relay until cancelled."""
    loop = asyncio.get_running_loop()
    rate_bps = None if rate_kbps is None else rate_kbps * 1000
    relay = Relay(upstream, rtt_ms / 2000, idle, rate_bps, queue_ms / 1000)
    transport, _ = await loop.create_datagram_endpoint(lambda: relay, local_addr=listen)
    sys.stdout.write("listening\n")
    sys.stdout.flush()
    try:
        while True:
            await asyncio.sleep(min(idle, 10))
            relay.expire()
    finally:
        if relay.links is not None:
            for way, link in zip(("up", "down"), relay.links, strict=True):
                log.info("%s: %d datagrams (%d bytes) sent, %d dropped at the queue",
                         way, link.sent, link.sent_bytes, link.dropped)
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
    parser.add_argument("--rate-kbps", type=float, default=None,
                        help="each direction's bottleneck rate (default: none)")
    parser.add_argument("--queue-ms", type=float, default=200.0,
                        help="the bottleneck's queue: longer waits are dropped")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="udpdelay %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.upstream, args.rtt_ms, args.idle,
                          args.rate_kbps, args.queue_ms))


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
