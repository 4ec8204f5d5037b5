"""Contracts with private parts of libraries we rely on: a library change fails here, loudly.

intercom/mqtt/client.py overrides aiomqtt's private ``_on_socket_open`` (no public API
reaches the socket reads), and intercom/mqtt/fairqueue.py stands in for the
``asyncio.Queue`` aiomqtt expects as ``queue_type``. These tests pin what both rely on
against the installed aiomqtt and paho, and run the override over a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import time
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import aiomqtt
import aiomqtt.client
import paho.mqtt.client as mqtt
from packaging.requirements import Requirement
from paho.mqtt.enums import CallbackAPIVersion

from intercom.mqtt.client import READ_BURST, Client
from intercom.mqtt.fairqueue import PER_SIGNER, FairQueue

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pinned(name: str) -> Requirement:
    """The requirement on ``name`` in pyproject.toml."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == name)


def test_installed_aiomqtt_is_in_the_range_pyproject_pins():
    requirement = pinned("aiomqtt")
    assert requirement.specifier.contains(version("aiomqtt")), (requirement, version("aiomqtt"))
    assert aiomqtt.__version__ == version("aiomqtt")
    # The pin must stop before the next major version: that is where private names move.
    assert not requirement.specifier.contains("3.0.0")


def test_the_private_socket_hook_keeps_its_name_and_signature():
    hook = inspect.signature(aiomqtt.Client._on_socket_open)
    assert list(hook.parameters) == ["self", "client", "userdata", "sock"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in hook.parameters.values())
    # aiomqtt hands it to paho as paho's public on_socket_open callback ...
    assert "on_socket_open = self._on_socket_open" in inspect.getsource(aiomqtt.Client)
    # ... and its reader reads through the paho client's public loop_read, which the
    # override replaces on that one client.
    reader = inspect.getsource(aiomqtt.Client._on_socket_open)
    assert "client.loop_read()" in reader
    assert list(inspect.signature(mqtt.Client.loop_read).parameters) == ["self", "max_packets"]
    assert list(inspect.signature(mqtt.Client.socket).parameters) == ["self"]


def test_aiomqtt_uses_only_the_queue_methods_the_fair_queue_has():
    source = inspect.getsource(aiomqtt.client)
    assert "queue_type(maxsize=" in source
    used = set(re.findall(r"\b_queue\.(\w+)", source))
    assert used == {"put_nowait", "get", "qsize"}, used  # a new one: FairQueue must have it
    assert all(callable(getattr(FairQueue, name, None)) for name in used)
    assert inspect.iscoroutinefunction(FairQueue.get)
    assert "queue_type" in inspect.signature(aiomqtt.Client).parameters


def publish_size(topic: str, payload: bytes) -> int:
    """Bytes of an MQTT 3.1.1 QoS 0 PUBLISH packet (remaining length under 128)."""
    remaining = 2 + len(topic.encode()) + len(payload)
    assert remaining < 128
    return 2 + remaining


def wait_until_buffered(sock: Any, size: int, timeout: float = 5) -> None:
    """Block until ``size`` bytes wait in ``sock``, unread (the loop is held meanwhile)."""
    deadline = time.monotonic() + timeout
    while len(sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)) < size:
        if time.monotonic() > deadline:
            raise AssertionError(f"{size} bytes did not arrive within {timeout} s")
        time.sleep(0.005)


async def test_one_wake_up_reads_every_waiting_packet_over_a_real_broker(broker):
    opened: list[mqtt.Client] = []

    class Watched(Client):
        def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
            opened.append(client)
            super()._on_socket_open(client, userdata, sock)

    payloads = [b"%03d" % i for i in range(PER_SIGNER - 1)]  # with the end: one signer's fill
    assert len(payloads) + 1 <= READ_BURST
    queue_type = cast("type[asyncio.Queue[aiomqtt.Message]]", FairQueue)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2)
    async with Watched("127.0.0.1", broker.port, queue_type=queue_type) as station:
        await station.subscribe("burst/#")
        (paho,) = opened  # the override ran, with paho's client, when the socket opened
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        try:
            # Nothing awaits from here to the first sleep: the station's loop is held
            # while the broker delivers, so every packet waits in its socket at once.
            for payload in payloads:
                publisher.publish("burst/x", payload, qos=0)
            publisher.publish("burst/end", b"", qos=1).wait_for_publish(5)
        finally:
            publisher.disconnect()  # first: its network thread then ends at once
            publisher.loop_stop()
        wait_until_buffered(
            paho.socket(),
            sum(publish_size("burst/x", p) for p in payloads) + publish_size("burst/end", b""),
        )
        await asyncio.sleep(0)  # the loop polls the socket; the reader runs after this task
        await asyncio.sleep(0)  # ... so here it has run exactly once
        assert len(station.messages) == len(payloads) + 1  # aiomqtt alone reads 1
        got = [m.payload for m in [await anext(station.messages) for _ in payloads]]
        assert got == payloads  # through FairQueue, in order (no signer claimed: one round)
