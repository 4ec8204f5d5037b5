"""aiomqtt's client, reading every packet that is waiting each time the socket wakes up.

aiomqtt (2.5) reads one MQTT packet per readable event (paho's ``loop_read`` reads one
QoS 0 packet). Under a flood, a command then sits in the socket behind hundreds of
others, and the fair queue (``fairqueue.py``) cannot put it ahead because it has not
been read yet. This subclass reads up to ``READ_BURST`` packets per wake-up, as long
as more bytes are waiting, so the queue sees them all. It replaces one private method
of aiomqtt 2.x (pinned ``<3`` in pyproject.toml); everything else is aiomqtt's.
"""

from __future__ import annotations

import select
import socket
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt

READ_BURST = 256


def _more_waiting(sock: Any) -> bool:
    if sock is None:
        return False
    pending = getattr(sock, "pending", None)
    if pending is not None and pending() > 0:  # TLS: bytes already decrypted
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class Client(aiomqtt.Client):
    """An ``aiomqtt.Client`` that drains its socket on each wake-up."""

    def _on_socket_open(
        self, client: mqtt.Client, userdata: Any, sock: socket.socket | Any
    ) -> None:
        super()._on_socket_open(client, userdata, sock)
        self._loop.call_soon_threadsafe(self._replace_reader, client, sock.fileno())

    def _replace_reader(self, client: mqtt.Client, fileno: int) -> None:
        def read() -> None:
            try:
                for _ in range(READ_BURST):
                    client.loop_read()
                    if not _more_waiting(client.socket()):
                        break
            except Exception as exc:  # noqa: BLE001 - as aiomqtt: a broken connection
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        self._loop.remove_reader(fileno)
        self._loop.add_reader(fileno, read)
