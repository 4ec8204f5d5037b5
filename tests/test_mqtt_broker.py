"""The MQTT bridge against a real Mosquitto: availability, will, state, TLS, ACL, refusals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from intercom.config import MqttConfig, Settings
from intercom.events import CallAnswered, CallEnded, CallMissed, CallRinging
from intercom.mqtt.bridge import MqttBridge
from intercom.mqtt.link import LinkState, MqttLink
from intercom.mqtt.topics import Topics
from intercom.station import Station
from tests.mosquitto import Broker, TlsFiles, V311OnlyProxy, make_tls_files
from tests.test_security_kit import Clock, add_principal, new_principal

INTERCOM = [sys.executable, "-m", "intercom"]
PREFIX = "building/door-1"


def mqtt_settings(settings: Settings, **mqtt: Any) -> Settings:
    config = MqttConfig(host="127.0.0.1", topic_prefix=PREFIX, reconnect_min_s=0.05,
                        reconnect_max_s=0.5, **mqtt)
    return settings.model_copy(update={"mqtt": config})


def bridge_of(station: Station) -> MqttBridge:
    return next(c for c in station.components if isinstance(c, MqttBridge))


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Station]:
    station = Station(settings)
    await station.start()
    try:
        yield station
    finally:
        await station.stop("test finished")


async def retained(port: int, topic: str, quiet: float = 0.3, **kw: Any) -> dict[str, Any]:
    """The retained messages under ``topic`` (payloads decoded as JSON where they are)."""
    found: dict[str, Any] = {}
    async with aiomqtt.Client("127.0.0.1", port, **kw) as client:
        await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            while True:
                message = await asyncio.wait_for(anext(client.messages), quiet)
                payload = message.payload
                assert isinstance(payload, bytes)
                try:
                    found[message.topic.value] = json.loads(payload)
                except ValueError:
                    found[message.topic.value] = payload.decode()
    return found


async def test_station_reports_availability_state_and_discovery(broker, sim_settings):
    async with running(mqtt_settings(sim_settings, port=broker.port)) as station:
        bridge = bridge_of(station)
        await until(lambda: bridge.link.state is LinkState.CONNECTED, what="connected")
        seen = await retained(broker.port, "#")
        assert seen[f"{PREFIX}/availability"] == "online"
        assert seen[f"{PREFIX}/state/lock"]["state"] == "locked"
        assert seen[f"{PREFIX}/state/door"]["state"] == "closed"
        assert seen[f"{PREFIX}/state/call"]["state"] == "idle"
        discovery = {t: v for t, v in seen.items() if t.startswith("homeassistant/")}
        kinds = {t.split("/")[1] + "/" + t.split("/")[3]: t for t in discovery}
        core = ["binary_sensor/door", "binary_sensor/forced_open", "binary_sensor/held_open",
                "binary_sensor/lock", "binary_sensor/online", "binary_sensor/tamper",
                "event/doorbell", "event/doorbell_bell", "sensor/call", "sensor/unlock"]
        triggers = ["device_automation/forced_open", "device_automation/held_open",
                    "device_automation/press_bell", "device_automation/tamper"]
        assert sorted(k for k in kinds if k in core) == core
        assert sorted(k for k in kinds if k.startswith("device_automation/")) == triggers
        # The rest are the monitor's health figures, all diagnostic (tests/test_monitor.py).
        health = [k for k in kinds if k not in core + triggers]
        assert "sensor/memory" in health
        assert all(discovery[kinds[k]]["entity_category"] == "diagnostic" for k in health)
        for kind, topic in kinds.items():
            config = discovery[topic]
            if kind in triggers:  # device triggers have a topic and no entity
                assert config["topic"].startswith(PREFIX + "/")
                continue
            assert config["state_topic"].startswith(PREFIX + "/")
            assert config["unique_id"]
        status = station.status()["mqtt"]
        assert status["state"] == "connected"
        assert status["protocol"] == "5"
    seen = await retained(broker.port, f"{PREFIX}/availability")
    assert seen[f"{PREFIX}/availability"] == "offline"


async def test_state_topics_follow_the_bus(broker, sim_settings):
    async with running(mqtt_settings(sim_settings, port=broker.port)) as station, \
            aiomqtt.Client("127.0.0.1", broker.port) as watcher:
        bridge = bridge_of(station)
        await until(lambda: bridge.link.state is LinkState.CONNECTED)
        await watcher.subscribe(f"{PREFIX}/state/#", qos=1)
        await watcher.subscribe(f"{PREFIX}/doorbell", qos=1)
        assert station.simulator is not None
        assert station.lock is not None
        await station.simulator.act("open-door")
        station.lock.pulse(0.2)
        await station.simulator.act("press")
        wanted = {("door", "open"), ("lock", "unlocked"), ("lock", "locked"), ("doorbell", "press")}
        got: set[tuple[str, str]] = set()
        async with asyncio.timeout(5):
            async for message in watcher.messages:
                body = json.loads(message.payload)  # type: ignore[arg-type]
                kind = message.topic.value.rsplit("/", 1)[1]
                got.add((kind, body.get("state") or body.get("event_type")))
                if wanted <= got:
                    break
    seen = await retained(broker.port, f"{PREFIX}/state/#")
    assert seen[f"{PREFIX}/state/door"]["state"] == "open"
    assert seen[f"{PREFIX}/state/lock"]["state"] == "locked"


async def test_last_will_says_offline_when_the_station_dies(broker, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        *INTERCOM, "run", "--simulate", "--state-dir", str(tmp_path / "st"),
        "--mqtt", f"mqtt://127.0.0.1:{broker.port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port) as watcher:
            await watcher.subscribe("intercom/+/availability", qos=1)
            async with asyncio.timeout(20):
                async for message in watcher.messages:
                    if message.payload == b"online":
                        break
                proc.send_signal(signal.SIGKILL)
                async for message in watcher.messages:
                    if message.payload == b"offline":
                        break
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def test_wrong_password_is_refused_and_never_reported_connected(tmp_path, sim_settings):
    broker = Broker(tmp_path / "broker", users={"station": secrets.token_urlsafe(12)})
    wrong = secrets.token_urlsafe(12)
    broker.start()
    try:
        settings = mqtt_settings(sim_settings, port=broker.port, username="station",
                                 password=wrong)
        async with running(settings) as station:
            bridge = bridge_of(station)
            states: list[LinkState] = []
            for _ in range(100):
                states.append(bridge.link.state)
                await asyncio.sleep(0.01)
            await until(lambda: bridge.link.state is LinkState.REFUSED)
            assert LinkState.CONNECTED not in states
            assert bridge.link.connects == 0
            status = station.status()["mqtt"]
            assert status["state"] == "refused"
            assert "refused" in status["last_error"]
            assert wrong not in json.dumps(station.status())
    finally:
        broker.kill()


ACL = f"""\
user station
topic readwrite {PREFIX}/#
topic write homeassistant/#

user manager
topic write {PREFIX}/command
topic read {PREFIX}/#

user snoop
topic read {PREFIX}/state/#
topic write {PREFIX}/command/result
"""
USERS = {user: secrets.token_urlsafe(12) for user in ("station", "manager", "snoop")}
CREDENTIAL = "mqtt-password"


def tls_client(tls: TlsFiles, user: str) -> dict[str, Any]:
    return {
        "username": user,
        "password": USERS[user],
        "tls_params": aiomqtt.TLSParameters(
            ca_certs=str(tls.ca), certfile=str(tls.client_cert), keyfile=str(tls.client_key)
        ),
    }


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Broker, TlsFiles]]:
    tls = make_tls_files(tmp_path / "tls")
    b = Broker(tmp_path / "broker", tls=tls, users=USERS, acl=ACL)
    b.start()
    yield b, tls
    b.kill()


async def test_tls_client_certificate_credential_and_acl(tls_broker, sim_settings, tmp_path,
                                                         monkeypatch):
    broker, tls = tls_broker
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / CREDENTIAL).write_text(USERS["station"] + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = mqtt_settings(
        sim_settings, port=broker.port, username="station", password_credential=CREDENTIAL,
        ca_file=tls.ca, client_cert=tls.client_cert, client_key=tls.client_key,
    )
    async with running(settings) as station:
        bridge = bridge_of(station)
        await until(lambda: bridge.link.state is LinkState.CONNECTED, what="TLS connection")
        assert station.status()["mqtt"]["tls"] is True
        seen = await retained(broker.port, f"{PREFIX}/#", **tls_client(tls, "manager"))
        assert seen[f"{PREFIX}/availability"] == "online"
        # Without a client certificate the broker refuses the TLS handshake.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username="manager", password=USERS["manager"],
                tls_params=aiomqtt.TLSParameters(ca_certs=str(tls.ca)), timeout=3,
            ):
                pass
        # The ACL lets the manager send commands; the snoop's never reach the station.
        # (A broker may also disconnect a client for a denied publish: that is fine too.)
        # Forgeries naming a registered signer: junk would be dropped unread anyway.
        assert station.registry is not None
        await add_principal(station.registry, Clock(), "alice")
        forged = new_principal(Clock(), "mallory")[1].token(kid="alice").encode()
        with contextlib.suppress(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", broker.port,
                                      protocol=aiomqtt.ProtocolVersion.V5,
                                      **tls_client(tls, "snoop")) as snoop:
                for _ in range(5):
                    await snoop.publish(f"{PREFIX}/command", forged, qos=1)
        async with aiomqtt.Client("127.0.0.1", broker.port, **tls_client(tls, "manager")) as mgr:
            await mgr.subscribe(f"{PREFIX}/command/result", qos=1)
            await mgr.publish(f"{PREFIX}/command", forged, qos=1)
            async with asyncio.timeout(5):
                message = await anext(mgr.messages)
            assert json.loads(message.payload)["result"] == "denied"  # type: ignore[arg-type]
        assert bridge.commands == 1


async def test_unknown_ca_never_connects(tls_broker, sim_settings):
    broker, tls = tls_broker
    settings = mqtt_settings(
        sim_settings, port=broker.port, username="station", password=USERS["station"],
        ca_file=tls.other_ca, client_cert=tls.client_cert, client_key=tls.client_key,
    )
    async with running(settings) as station:
        bridge = bridge_of(station)
        await until(lambda: bridge.link.last_error is not None, what="an error")
        await asyncio.sleep(0.3)
        assert bridge.link.connects == 0
        assert bridge.link.state is not LinkState.CONNECTED
        assert "certificate" in (bridge.link.last_error or "").lower()


async def test_falls_back_to_mqtt_311_when_the_broker_refuses_5(broker, sim_settings):
    proxy = V311OnlyProxy(broker.port)
    await proxy.start()
    try:
        async with running(mqtt_settings(sim_settings, port=proxy.port)) as station:
            bridge = bridge_of(station)
            await until(lambda: bridge.link.state is LinkState.CONNECTED, what="3.1.1")
            assert proxy.refused_v5 >= 1
            assert station.status()["mqtt"]["protocol"] == "3.1.1"
            seen = await retained(broker.port, f"{PREFIX}/availability")
            assert seen[f"{PREFIX}/availability"] == "online"
    finally:
        await proxy.stop()


async def test_forced_311(broker, sim_settings):
    async with running(mqtt_settings(sim_settings, port=broker.port, protocol="3.1.1")) as st:
        bridge = bridge_of(st)
        await until(lambda: bridge.link.state is LinkState.CONNECTED)
        assert st.status()["mqtt"]["protocol"] == "3.1.1"


async def test_broker_away_never_delays_the_lock_and_the_link_comes_back(broker, sim_settings):
    async with running(mqtt_settings(sim_settings, port=broker.port)) as station:
        bridge = bridge_of(station)
        await until(lambda: bridge.link.state is LinkState.CONNECTED)
        broker.kill()
        await until(lambda: bridge.link.state is not LinkState.CONNECTED, 10, "loss noticed")
        assert station.lock is not None
        pin = station.pin_factory.pin(station.settings.hardware.relay.pin)
        station.lock.pulse(0.1)
        assert pin.state  # energised within the call, with no await: the broker cannot delay it
        await asyncio.sleep(1.0)
        broker.start()
        # The link comes back by itself (its retries are at most 0.5 s apart here); the
        # wait's limit only keeps a broken link from hanging the test.
        await until(lambda: bridge.link.state is LinkState.CONNECTED, 10, "reconnect")
        assert bridge.link.connects == 2
        seen = await retained(broker.port, f"{PREFIX}/#")
        assert seen[f"{PREFIX}/availability"] == "online"
        assert seen[f"{PREFIX}/state/lock"]["state"] == "locked"


async def test_a_lost_broker_ends_a_session_that_is_not_reading(broker):
    """The loss is noticed when paho drops the socket, not when a publish times out.

    aiomqtt tells only its message iterator; a session busy elsewhere (publishing the
    discovery burst, waiting for a PUBACK) used to keep the link "connected" for the
    publish's 10 s timeout, or until keepalive if it waited on nothing of aiomqtt's.
    """
    started = asyncio.Event()
    ended: list[BaseException] = []

    async def session(client: aiomqtt.Client, protocol: aiomqtt.ProtocolVersion) -> None:
        await client.publish(f"{PREFIX}/probe", b"1", qos=1)
        started.set()
        try:
            await asyncio.Event().wait()  # busy with something that is not the broker
        except BaseException as exc:
            ended.append(exc)
            raise

    config = MqttConfig(host="127.0.0.1", port=broker.port, topic_prefix=PREFIX,
                        keepalive_s=60, reconnect_min_s=5.0, reconnect_max_s=5.0)
    link = MqttLink(config, Topics(PREFIX, "door-1"), "lost-test", session)
    link.prepare()
    link.start()
    try:
        await until(started.is_set, 5, "session started")
        broker.kill()
        # Keepalive is 60 s: noticing within a few seconds can only be the closed socket.
        await until(lambda: link.state is LinkState.DISCONNECTED, 5, "loss noticed")
        assert link.last_error == "the connection to the broker was lost"
        assert [type(e) for e in ended] == [asyncio.CancelledError]
    finally:
        await link.stop()


async def test_call_state_follows_the_call_events(broker, sim_settings):
    async with running(mqtt_settings(sim_settings, port=broker.port)) as station, \
            aiomqtt.Client("127.0.0.1", broker.port) as watcher:
        bridge = bridge_of(station)
        await until(lambda: bridge.link.state is LinkState.CONNECTED)
        await watcher.subscribe(f"{PREFIX}/state/call", qos=1)
        await anext(watcher.messages)  # the retained "idle"
        steps = [
            (CallRinging(call="c1", flat="1", devices=2), "ringing"),
            (CallRinging(call="c2", flat="2", devices=1), None),  # still ringing
            (CallAnswered(call="c1", principal="p-1"), "in_call"),
            (CallMissed(call="c2", flat="2"), None),  # c1 still in call
            (CallEnded(call="c1", reason="hangup", duration_s=3.0), "idle"),
        ]
        seen = []
        for event, expected in steps:
            station.bus.publish(event)
            if expected is not None:
                async with asyncio.timeout(5):
                    message = await anext(watcher.messages)
                seen.append(json.loads(message.payload)["state"])  # type: ignore[arg-type]
        assert seen == ["ringing", "in_call", "idle"]
