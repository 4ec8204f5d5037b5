"""The link to the broker: explicit states, TLS, credentials, last will, reconnect loop.

aiomqtt's ``Client`` is one connection (an async context manager); this module owns the
retry loop around it, with the ``ReconnectPolicy`` choosing the waits. The state says
``connected`` only after the broker accepted the CONNECT (a CONNACK with success).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as mqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from intercom.config import MqttConfig
from intercom.errors import ConfigError
from intercom.identity import secret_line
from intercom.mqtt.backoff import ReconnectPolicy
from intercom.mqtt.client import Client
from intercom.mqtt.fairqueue import Admit, FairQueue
from intercom.mqtt.topics import OFFLINE, ONLINE, Topics

log = logging.getLogger(__name__)

# Largest packet the station accepts from the broker (MQTT 5 tells the broker so, and
# the broker drops bigger ones instead of sending them); commands are a few KiB.
MAX_INCOMING_PACKET = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
# CONNACK codes that mean "I do not speak this protocol version" (3.1.1 and 5).
PROTOCOL_REFUSED = {1, 132}

Session = Callable[[aiomqtt.Client, aiomqtt.ProtocolVersion], Coroutine[Any, Any, None]]


class LinkState(enum.Enum):
    """Where the link to the broker stands."""

    IDLE = "idle"  # not started
    CONNECTING = "connecting"  # TCP/TLS and CONNECT sent, no CONNACK yet
    CONNECTED = "connected"  # the broker accepted us; the session runs
    REFUSED = "refused"  # the broker answered with a refusal (credentials, ACL, ...)
    DISCONNECTED = "disconnected"  # unreachable or connection lost; waiting to retry
    STOPPED = "stopped"  # stopped for good


def protocols_of(config: MqttConfig) -> list[aiomqtt.ProtocolVersion]:
    """The protocol versions to try, in order: ``auto`` is MQTT 5, then 3.1.1."""
    if config.protocol == "5":
        return [aiomqtt.ProtocolVersion.V5]
    if config.protocol == "3.1.1":
        return [aiomqtt.ProtocolVersion.V311]
    return [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311]


def read_password(config: MqttConfig, environ: dict[str, str] | None = None) -> str | None:
    """The broker password from the config, a file or a systemd credential."""
    if config.password is not None:
        return config.password.get_secret_value()
    return secret_line(("mqtt.password_file", config.password_file),
                       ("mqtt.password_credential", config.password_credential), environ)


def tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context for the broker (hostname checked), or None for plain TCP."""
    if not config.uses_tls:
        return None
    try:
        ctx = ssl.create_default_context(
            cafile=str(config.ca_file) if config.ca_file else None
        )
        if config.client_cert is not None and config.client_key is not None:
            ctx.load_cert_chain(str(config.client_cert), str(config.client_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"mqtt: cannot load the TLS files: {exc}"]) from exc
    return ctx


class MqttLink:
    """Keeps one connection to the broker up and runs ``session`` while it is."""

    def __init__(
        self,
        config: MqttConfig,
        topics: Topics,
        client_id: str,
        session: Session,
        policy: ReconnectPolicy | None = None,
        admit: Admit | None = None,
    ) -> None:
        self.config = config
        self._admit = admit
        self.topics = topics
        self.client_id = client_id
        self._session = session
        self.policy = policy or ReconnectPolicy(config.reconnect_min_s, config.reconnect_max_s)
        self.state = LinkState.IDLE
        self.protocol: aiomqtt.ProtocolVersion | None = None
        self.last_error: str | None = None
        self.connects = 0
        self.since = time.time()
        self.connected = asyncio.Event()
        self._password: str | None = None
        self._tls: ssl.SSLContext | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    def prepare(self) -> None:
        """Read credentials and TLS files now, so that bad ones refuse start-up."""
        self._password = read_password(self.config)
        self._tls = tls_context(self.config)

    def start(self) -> None:
        """Start connecting in the background; never waits for the broker."""
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name="mqtt-link")

    async def stop(self) -> None:
        """Publish ``offline``, disconnect cleanly and stop retrying."""
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 2.0)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        self._set(LinkState.STOPPED, "stopped")

    def _set(self, state: LinkState, why: str) -> None:
        if state is self.state:
            return
        quiet = state in {LinkState.DISCONNECTED, LinkState.REFUSED, LinkState.CONNECTING}
        level = logging.DEBUG if quiet and self._warned else logging.INFO
        if state in {LinkState.DISCONNECTED, LinkState.REFUSED} and not self._warned:
            level = logging.WARNING
            self._warned = True
        log.log(level, "mqtt link %s -> %s (%s)", self.state.value, state.value, why)
        self.state = state
        self.since = time.time()
        if state is LinkState.CONNECTED:
            self._warned = False
            self.connected.set()
        else:
            self.connected.clear()

    def _client(self, protocol: aiomqtt.ProtocolVersion) -> Client:
        v5 = protocol is aiomqtt.ProtocolVersion.V5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.MaximumPacketSize = MAX_INCOMING_PACKET
        return Client(
            self.config.host,
            self.config.effective_port,
            username=self.config.username,
            password=self._password,
            identifier=self.client_id,
            protocol=protocol,
            will=aiomqtt.Will(self.topics.availability, OFFLINE, qos=1, retain=True),
            clean_session=None if v5 else True,
            clean_start=True if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=self.config.keepalive_s,
            timeout=CONNECT_TIMEOUT_S,
            max_queued_incoming_messages=None,  # FairQueue bounds itself (MAX_WAITING)
            # aiomqtt types this as asyncio.Queue but calls only put_nowait, get and
            # qsize, which FairQueue has (tests/test_contracts.py pins the list).
            # aiomqtt builds it as queue_type(maxsize=...): a partial carries ``admit``.
            queue_type=cast(
                "type[asyncio.Queue[aiomqtt.Message]]",
                functools.partial(FairQueue, admit=self._admit),
            ),
            # paho leaves Nagle on: a command's answer and the state after it would wait
            # for the broker's delayed ACK (up to 40 ms on Linux).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            properties=properties,
            tls_context=self._tls,
            logger=logging.getLogger("intercom.mqtt.paho"),
        )

    async def _run(self) -> None:
        protocols = protocols_of(self.config)
        choice = 0
        while not self._stopping.is_set():
            protocol = protocols[choice]
            self._set(LinkState.CONNECTING, f"{self.config.host}:{self.config.effective_port}")
            try:
                await self._connect_once(protocol)
                delay = 0.0 if self._stopping.is_set() else self.policy.next_delay()
            except MqttConnectError as exc:
                code = connack_code(exc.rc)
                if code in PROTOCOL_REFUSED and choice + 1 < len(protocols):
                    choice += 1
                    log.info("mqtt broker refuses MQTT 5; falling back to 3.1.1")
                    continue
                self.last_error = f"refused by the broker: {exc}"
                self._set(LinkState.REFUSED, self.last_error)
                delay = self.policy.next_delay()
            except (aiomqtt.MqttError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                self._set(LinkState.DISCONNECTED, self.last_error)
                delay = self.policy.next_delay()
            except Exception as exc:
                log.exception("mqtt session failed unexpectedly; reconnecting")
                self.last_error = f"internal error: {type(exc).__name__}"
                self._set(LinkState.DISCONNECTED, self.last_error)
                delay = self.policy.next_delay()
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)

    async def _connect_once(self, protocol: aiomqtt.ProtocolVersion) -> None:
        client = self._client(protocol)
        async with client:
            self.protocol = protocol
            self.connects += 1
            self.last_error = None
            self.policy.succeeded()
            self._set(LinkState.CONNECTED, "MQTT 5" if protocol.value == 5 else "MQTT 3.1.1")
            await client.publish(self.topics.availability, ONLINE, qos=1, retain=True)
            session = asyncio.create_task(self._session(client, protocol), name="mqtt-session")
            stop = asyncio.create_task(self._stopping.wait(), name="mqtt-stop-wait")
            # paho dropping the socket ends the session at once, even one that waits on a
            # publish's PUBACK (aiomqtt would let that wait run out its timeout).
            lost = asyncio.create_task(client.lost.wait(), name="mqtt-lost-wait")
            try:
                await asyncio.wait({session, stop, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                lost.cancel()
                if not session.done():
                    session.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await session  # re-raises the session's error (a lost connection)
            if client.lost.is_set() and not self._stopping.is_set():
                raise aiomqtt.MqttError("the connection to the broker was lost")
            if self._stopping.is_set():
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(
                        self.topics.availability, OFFLINE, qos=1, retain=True, timeout=1.0
                    )
        if not self._stopping.is_set():
            self._set(LinkState.DISCONNECTED, "session ended")

    def status(self) -> dict[str, Any]:
        """State, broker, protocol and the last error, for ``intercom status``."""
        version = {5: "5", 4: "3.1.1"}.get(self.protocol.value) if self.protocol else None
        return {
            "state": self.state.value,
            "broker": f"{self.config.host}:{self.config.effective_port}",
            "tls": self.config.uses_tls,
            "protocol": version,
            "since": round(self.since, 3),
            "connects": self.connects,
            "last_error": self.last_error,
        }


def connack_code(rc: Any) -> int | None:
    """The number of a CONNACK's return or reason code (paho gives an int or a ReasonCode)."""
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None
