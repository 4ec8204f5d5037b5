"""One aiortc peer with a data channel, run inside a lab namespace by tests/test_netlab.py.

Signalling goes through the parent test as JSON lines: the offerer prints its offer and
reads the answer from stdin; the answerer reads the offer and prints its answer. When a
``ping``/``pong`` has crossed the data channel, each prints ``{"event": "connected"}``
with the selected candidate pair (types and addresses), then waits for stdin to close.

Run: ``python tests/netlab_peer.py offer|answer --servers JSON [--relay]`` where JSON is
a list of ``{"urls": ..., "username": ..., "credential": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)

log = logging.getLogger("netlab_peer")


def say(message: dict[str, Any]) -> None:
    """One JSON line to the parent test."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def hear() -> str:
    """One line from the parent test ('' when it closed stdin)."""
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def selected_pair(pc: RTCPeerConnection) -> dict[str, Any]:
    """The nominated candidate pair of the connection's one ICE component."""
    assert pc.sctp is not None
    connection = pc.sctp.transport.transport.iceGatherer._connection
    pair = connection._nominated[1]
    local, remote = pair.local_candidate, pair.remote_candidate
    return {
        "local": local.type,
        "remote": remote.type,
        "local_address": [local.host, local.port],
        "remote_address": [remote.host, remote.port],
    }


async def run(role: str, servers: list[dict[str, Any]], relay: bool) -> None:
    """Connect as ``role``, report the pair once a message has crossed, wait for stdin EOF."""
    config = RTCConfiguration(
        iceServers=[RTCIceServer(**server) for server in servers],  # [] means none at all
        iceTransportPolicy=RTCIceTransportPolicy.RELAY if relay else RTCIceTransportPolicy.ALL,
    )
    pc = RTCPeerConnection(config)
    done = asyncio.get_running_loop().create_future()

    @pc.on("iceconnectionstatechange")
    def _ice_state() -> None:
        log.info("%s: ICE %s", role, pc.iceConnectionState)

    def wire(channel: RTCDataChannel) -> None:
        @channel.on("message")
        def _message(message: object) -> None:
            if message == "ping":
                channel.send("pong")
            if message in {"ping", "pong"} and not done.done():
                done.set_result(None)

    if role == "offer":
        channel = pc.createDataChannel("lab")
        wire(channel)
        channel.on("open", lambda: channel.send("ping"))
        await pc.setLocalDescription(await pc.createOffer())
        say({"type": "offer", "sdp": pc.localDescription.sdp})
        await pc.setRemoteDescription(RTCSessionDescription(**json.loads(await hear())))
    else:
        pc.on("datachannel", wire)
        await pc.setRemoteDescription(RTCSessionDescription(**json.loads(await hear())))
        await pc.setLocalDescription(await pc.createAnswer())
        say({"type": "answer", "sdp": pc.localDescription.sdp})
    await done
    say({"event": "connected", **selected_pair(pc)})
    await hear()
    await pc.close()


def main() -> None:
    """Command line: role, ICE servers as JSON, relay-only policy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["offer", "answer"])
    parser.add_argument("--servers", type=json.loads, default=[])
    parser.add_argument("--relay", action="store_true", help="iceTransportPolicy relay")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    asyncio.run(run(args.role, args.servers, args.relay))


if __name__ == "__main__":
    main()
