"""aiomqtt's client, reading every packet that is waiting each time the socket wakes up.

aiomqtt (2.x) reads one MQTT packet per readable event: its reader calls paho's
``loop_read``, which reads one QoS 0 packet. Under a flood a command then sits in the
socket behind hundreds of others, and the fair queue (``fairqueue.py``) cannot put it
ahead because it has not been read yet. Here that ``loop_read`` reads up to
``READ_BURST`` packets, as long as more bytes are waiting, so the queue sees them all.

No public API reaches the reading: aiomqtt keeps its paho client private and wires
paho's public ``on_socket_open`` callback to its own private ``_on_socket_open``.
Rewriting aiomqtt on paho's public callbacks would copy some 300 lines to save one
hook, so the hook stays, as narrow as it goes: the override is handed paho's client as
the callback's argument, wraps that client's public ``loop_read`` and passes on to
aiomqtt, whose reader, TLS handling and error path run unchanged. No other private
name of aiomqtt is used. tests/test_contracts.py pins the hook's name and signature,
aiomqtt's version against the range in pyproject.toml (``<3``) and, over a real
Mosquitto, that one wake-up reads a whole burst: a change in aiomqtt fails there.

The same hook chains paho's public ``on_socket_close`` so that ``lost`` is set the moment
paho drops the socket. aiomqtt tells only its message iterator of a lost connection; a
QoS 1 publish waiting for its PUBACK waits out its whole timeout (10 s) even though paho
saw the broker go. The link (``link.py``) waits on ``lost`` beside the session.
"""

from __future__ import annotations

import asyncio
import select
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

READ_BURST = 256


def _more_waiting(sock: Any) -> bool:
    if sock is None:
        return False
    pending = getattr(sock, "pending", None)
    if pending is not None and pending() > 0:  # TLS: bytes already decrypted
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def read_in_bursts(client: mqtt.Client) -> None:
    """Make ``client.loop_read`` read every waiting packet, up to ``READ_BURST``."""
    if "loop_read" in vars(client):
        return  # done at an earlier connection of the same client
    read_one = client.loop_read

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        rc = read_one(max_packets)
        for _ in range(READ_BURST - 1):
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not _more_waiting(client.socket()):
                break
            rc = read_one(max_packets)
        return rc

    client.loop_read = loop_read  # type: ignore[method-assign]  # this instance only


def tell_on_close(
    client: mqtt.Client, lost: asyncio.Event, loop: asyncio.AbstractEventLoop
) -> None:
    """Chain ``client.on_socket_close`` to set ``lost`` on ``loop``, from any thread."""
    chained = client.on_socket_close
    if getattr(chained, "sets", None) is lost:
        return  # done at an earlier connection of the same client

    def on_socket_close(paho: mqtt.Client, userdata: Any, sock: Any) -> None:
        if chained is not None:
            chained(paho, userdata, sock)
        if not loop.is_closed():
            loop.call_soon_threadsafe(lost.set)

    on_socket_close.sets = lost  # type: ignore[attr-defined]
    client.on_socket_close = on_socket_close


class Client(aiomqtt.Client):
    """An ``aiomqtt.Client`` that drains its socket on each wake-up and says when it is lost."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set when paho closes the socket, for whatever reason; one connection's worth
        # (the link makes a new Client for each connection).
        self.lost = asyncio.Event()
        self._lost_loop = asyncio.get_running_loop()

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        read_in_bursts(client)  # before aiomqtt registers the reader that calls it
        tell_on_close(client, self.lost, self._lost_loop)
        super()._on_socket_open(client, userdata, sock)
