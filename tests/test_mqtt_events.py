"""Events from the real event log reach a real Mosquitto: nothing lost across kills."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Self

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from intercom.events import DoorbellPressed, UnlockGranted
from intercom.mqtt.link import LinkState
from intercom.station import Station
from tests.mosquitto import Broker
from tests.test_mqtt_broker import (
    PREFIX,
    bridge_of,
    mqtt_settings,
    retained,
    running,
    until,
)
from tests.test_mqtt_commands import command_settings, energised
from tests.test_security_kit import Clock, add_principal

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

EVENTS = f"{PREFIX}/events"


class Watcher:
    """A consumer with a persistent session that keeps reconnecting and dedupes by seq."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seqs: dict[int, dict[str, Any]] = {}
        self.copies = 0
        self.received: list[int] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 5)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="seq-watcher", clean_start=False,
                    protocol=aiomqtt.ProtocolVersion.V5, properties=props,
                ) as client:
                    await client.subscribe(EVENTS, qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        body = json.loads(message.payload)  # type: ignore[arg-type]
                        self.copies += 1
                        self.received.append(body["seq"])
                        self.seqs[body["seq"]] = body
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)


def logged_seqs(station: Station, after: int) -> dict[int, str]:
    assert station.eventlog is not None
    out: dict[int, str] = {}
    while batch := station.eventlog.read_after(after, 500):
        out.update((e.seq, e.type) for e in batch)
        after = batch[-1].seq
    return out


async def test_events_carry_seq_and_type_and_principal_ids_only(tmp_path, sim_settings):
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        # The watcher subscribes first: an event published before any subscription exists
        # has no one to be kept for, and StationStarted is published at start-up.
        async with Watcher(broker.port) as watcher, \
                running(mqtt_settings(sim_settings, port=broker.port)) as station:
            station.bus.publish(UnlockGranted(door="front", principal="p-7", via="cli", jti="j1"))
            await until(lambda: any(b["type"] == "UnlockGranted" for b in watcher.seqs.values()))
            body = next(b for b in watcher.seqs.values() if b["type"] == "UnlockGranted")
            assert body["details"] == {"door": "front", "principal": "p-7", "via": "cli",
                                       "jti": "j1"}
            assert set(body) == {"seq", "type", "at", "details"}
            started = next(b for b in watcher.seqs.values() if b["type"] == "StationStarted")
            assert started["seq"] < body["seq"]
            # A signed checkpoint every 100 records (the default): the latest is retained.
            for i in range(120):
                station.bus.publish(DoorbellPressed(button="bell", flat=str(i)))
            assert station.eventlog is not None
            await until(lambda: station.eventlog.latest_checkpoint() is not None)  # type: ignore[union-attr]
            latest = station.eventlog.latest_checkpoint()
            assert latest is not None
            for _ in range(25):  # published when the bridge next runs its state task
                seen = await retained(broker.port, f"{PREFIX}/log/checkpoint", 0.2)
                want = json.loads(json.dumps(station.eventlog.latest_checkpoint(), default=str))
                if seen.get(f"{PREFIX}/log/checkpoint") == want:
                    break
            assert seen[f"{PREFIX}/log/checkpoint"] == want
            assert want["seq"] >= latest["seq"]
    finally:
        broker.kill()


async def test_broker_killed_mid_burst_loses_none_of_1000_events(tmp_path, sim_settings):
    broker = Broker(tmp_path / "broker", persistence=True)
    broker.start()
    # Default reconnect policy: the claim "back within 5 s" is about the shipped settings.
    settings = command_settings(sim_settings, broker.port)
    mqtt = settings.mqtt.model_copy(update={"reconnect_min_s": 0.5, "reconnect_max_s": 4.0})  # type: ignore[union-attr]
    settings = settings.model_copy(update={"mqtt": mqtt})
    try:
        async with running(settings) as station, Watcher(broker.port) as watcher:
            bridge = bridge_of(station)
            await until(lambda: bridge.link.state is LinkState.CONNECTED)
            assert station.eventlog is not None
            await asyncio.sleep(1.2)  # the broker saves the watcher's session (autosave 1 s)
            base = station.eventlog.last_seq
            published_before = bridge.published
            for i in range(1000):
                station.bus.publish(DoorbellPressed(button="bell", flat=str(i)))
                if i % 50 == 49:
                    await asyncio.sleep(0.01)
                if i == 500:
                    await until(lambda: bridge.published > published_before + 200, 10)
                    broker.kill()
            await until(lambda: bridge.link.state is not LinkState.CONNECTED, what="loss")
            await until(lambda: station.eventlog.last_seq >= base + 1000, 10)  # type: ignore[union-attr]
            # With the broker away, a local unlock (the CLI's path) works at once.
            assert station.registry is not None
            alice, bob = [
                await add_principal(station.registry, Clock(), p, flats=("1",))
                for p in ("alice", "bob")
            ]
            assert station.verifier is not None
            assert (await station.verifier.submit(bob.token(), "cli")).granted
            assert energised(station) == 1
            station.lock.release("test")  # type: ignore[union-attr]
            await asyncio.sleep(0.5)
            broker.start()
            # Unlock over MQTT works again once the broker is back (the timeout only
            # keeps a broken station from hanging the test; speed is the benchmark's).
            async with asyncio.timeout(30):
                # The manager retries until the station is back (a command sent before
                # it resubscribed is simply not delivered to it).
                while energised(station) == 1:
                    with contextlib.suppress(aiomqtt.MqttError):
                        async with aiomqtt.Client("127.0.0.1", broker.port) as manager:
                            await manager.publish(f"{PREFIX}/command", alice.token(), qos=1)
                    with contextlib.suppress(AssertionError):
                        await until(lambda: energised(station) == 2, 0.25)
            expected = logged_seqs(station, base)
            doorbells = [s for s, t in expected.items() if t == "DoorbellPressed"]
            assert len(doorbells) == 1000
            await until(lambda: set(expected) <= set(watcher.seqs), 20, "every seq")
            assert bridge.link.connects == 2
    finally:
        broker.kill()


async def test_restart_resumes_from_the_cursor(tmp_path, sim_settings):
    broker = Broker(tmp_path / "broker")
    settings = mqtt_settings(sim_settings, port=broker.port)
    # Broker down: the station runs, logs, and opens the door all the same.
    async with running(settings) as station:
        for i in range(20):
            station.bus.publish(DoorbellPressed(button="bell", flat=str(i)))
        assert station.eventlog is not None
        await until(lambda: len(logged_seqs(station, 0)) >= 21)
        assert bridge_of(station).link.state is not LinkState.CONNECTED
    broker.start()
    try:
        async with Watcher(broker.port) as watcher:
            async with running(settings) as station:
                bridge = bridge_of(station)
                offline = logged_seqs(station, 0)
                await until(lambda: set(offline) <= set(watcher.seqs), 10, "the backlog")
                await until(lambda: bridge.cursor.seq >= max(offline))
            copies = watcher.copies
            cursor = bridge.cursor.seq  # saved in STATE_DIR/mqtt.cursor
            async with running(settings) as station:
                await until(lambda: bridge_of(station).link.state is LinkState.CONNECTED)
                await until(lambda: watcher.copies > copies)
                await asyncio.sleep(0.3)
                # Only events after the saved cursor went out again.
                assert all(seq > cursor for seq in watcher.received[copies:])
    finally:
        broker.kill()


async def test_a_press_and_the_call_it_causes_reach_the_wire_in_that_order(
    tmp_path, sim_settings
):
    """The call's events are published from inside the press's handler: on MQTT they
    still come after the press (by arrival and by seq)."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        async with Watcher(broker.port) as watcher, \
                running(mqtt_settings(sim_settings, port=broker.port)) as station:
            station.bus.publish(DoorbellPressed(button="bell0", flat="1"))
            await until(lambda: any(b["type"] == "CallMissed" for b in watcher.seqs.values()))
            arrived = [watcher.seqs[seq]["type"] for seq in watcher.received]
            call = [kind for kind in arrived if kind.startswith(("Doorbell", "Call"))]
            assert call == ["DoorbellPressed", "CallRinging", "CallMissed"], arrived
            assert watcher.received == sorted(watcher.received)  # seq order is arrival order
    finally:
        broker.kill()
