"""The MQTT bridge component: availability, state, events from the log, signed commands.

It never blocks the station: bus handlers only note the latest state, and everything
that talks to the broker runs in the link's own tasks. While the broker is away the lock,
the log and calls carry on; the bridge catches up from its persisted cursor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from intercom.config import MqttConfig, Settings
from intercom.errors import ConfigError
from intercom.events import DoorbellPressed, Event, EventBus, public_details
from intercom.mqtt.cursor import Cursor
from intercom.mqtt.discovery import (
    ALARMS,
    FORCED_OPEN,
    HELD_OPEN,
    TAMPER,
    Wiring,
    discovery_messages,
)
from intercom.mqtt.link import MqttLink
from intercom.mqtt.topics import Topics, default_prefix
from intercom.security.limits import TokenBucket
from intercom.security.verifier import Context

log = logging.getLogger(__name__)

BATCH = 500  # events read and published per round (QoS 1, pipelined)
REPLAY_S = 10.0  # after losing the broker, re-publish what it acked this long before
CURSOR_FILE = "mqtt.cursor"
DENIED_REPLIES_PER_S = 20.0  # beyond this, denied commands go unanswered (a flood)
# How call events move one call; the station's call state is the busiest of its calls.
CALL_STATES = {"CallRinging": "ringing", "CallAnswered": "in_call", "CallMissed": None,
               "CallEnded": None}
# Events that raise an alarm (on <p>/alarm, and on in <p>/state/alarms until the door closes,
# or for tamper until TamperCleared).
ALARM_EVENTS = {"TamperDetected": TAMPER, "DoorForcedOpen": FORCED_OPEN,
                "DoorHeldOpen": HELD_OPEN}
SENSOR_EVENTS = {"DoorOpened", "DoorClosed", "TamperCleared", *ALARM_EVENTS}
TRANSITIONS = 256  # state changes kept, in order, for the next publish round
LIVE = 64  # presses and alarms kept for the next publish round (while the broker is away)


class LoggedEventLike(Protocol):
    """What the bridge reads of a logged event."""

    seq: int
    type: str
    at: float
    details: dict[str, Any]


class EventSource(Protocol):
    """The part of the event log the bridge uses."""

    @property
    def last_seq(self) -> int:
        """Highest durable seq."""

    def read_after(self, seq: int, limit: int = 500) -> list[Any]:
        """Events with seq above ``seq``, ascending."""

    async def wait_for_after(self, seq: int) -> None:
        """Return once an event above ``seq`` is durable."""

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The latest signed checkpoint as JSON."""


class DecisionLike(Protocol):
    """What the bridge reads of a verifier's decision."""

    @property
    def granted(self) -> bool:
        """Whether the command was granted."""

    @property
    def jti(self) -> str | None:
        """The command's id, when it had one."""


MQTT_CONTEXT = Context("mqtt")
# The one verifier's ``submit(token, context)``: every command goes through it.
Submit = Callable[[Any, Context], Awaitable[DecisionLike]]


def event_json(event: LoggedEventLike) -> bytes:
    """An event for ``<p>/events``: seq, type, time, and the event's public details.

    The details are ``events.public_details``: no log-only field (a denial's reason),
    no personal field but the pseudonymous principal id, nothing of an unknown type.
    """
    details = public_details(event.type, event.details)
    body = {"seq": event.seq, "type": event.type, "at": event.at, "details": details}
    return json.dumps(body, separators=(",", ":"), default=str).encode()


class MqttBridge:
    """Connects the station to the building's broker (component ``mqtt``)."""

    name = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        station_id: str,
        state_dir: Path,
        bus: EventBus,
        eventlog: EventSource | None,
        submit: Submit | None,
        wiring: Wiring,
        initial_state: Callable[[], dict[str, str]] | None = None,
        known: Callable[[str], bool] | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(
            config.topic_prefix or default_prefix(station_id),
            station_id,
            config.discovery_prefix,
        )
        self._bus = bus
        self._log = eventlog
        self._submit = submit
        self._wiring = wiring
        self._door = wiring.door
        self._initial_state = initial_state
        self.cursor = Cursor(state_dir / CURSOR_FILE)
        self._known = known
        self.refused = 0  # commands dropped on reading: malformed, or naming no signer
        self.link = MqttLink(
            config, self.topics, config.client_id or f"intercom-{station_id}", self._session,
            admit=self._admit,
        )
        # The latest value of each retained state topic, and, while a session is on, every
        # change of one in order (a ring nobody can answer is ringing and idle within one
        # bus delivery: both go). With the broker away only the latest state goes, later.
        self._in_session = False
        self._state: dict[str, dict[str, Any]] = {}
        self._transitions: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(
            maxlen=TRANSITIONS)
        self._calls: dict[str, str] = {}
        self._state_changed = asyncio.Event()
        self._live: collections.deque[tuple[str, bytes]] = collections.deque(maxlen=LIVE)
        self._ring_image: bytes | None = None  # the latest only: an image is large
        self._acks: collections.deque[tuple[float, int]] = collections.deque()
        self._lost_at: float | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._denied_replies = TokenBucket(DENIED_REPLIES_PER_S, DENIED_REPLIES_PER_S)
        self.published = 0
        self.commands = 0
        self.unanswered = 0

    async def start(self) -> None:
        """Check credentials and TLS files, then connect in the background."""
        self.link.prepare()
        self.cursor.load()
        if self._log is not None and self.cursor.seq > self._log.last_seq:
            log.warning("mqtt cursor %d is past the log's end; publishing from the start",
                        self.cursor.seq)
            self.cursor.advance(0)
            self.cursor.save()
        state = self._initial_state() if self._initial_state else {}
        now = time.time()
        self._state = {
            "lock": {"state": state.get("lock", "locked"), "door": self._door, "at": now},
            "door": {"state": state.get("door", "unknown"), "door": self._door, "at": now},
            "call": {"state": state.get("call", "idle"), "at": now},
            # Forced and held open are on from their event until the door closes; tamper
            # until the cover is shut again. A cover found open at start was reported
            # before the bridge listened: the bus's history has it.
            "alarms": {**dict.fromkeys(ALARMS, False), "door": self._door, "at": now,
                       TAMPER: self._tampered_before()},
        }
        self._unsubscribe = self._bus.on(self._on_event)
        self.link.start()

    def _tampered_before(self) -> bool:
        """Whether the bus's history ends with the cover open (tripped, not cleared)."""
        tamper = [e.type for e in self._bus.recent if e.type in {"TamperDetected",
                                                                  "TamperCleared"}]
        return bool(tamper) and tamper[-1] == "TamperDetected"

    async def stop(self) -> None:
        """Publish ``offline`` and disconnect."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.link.stop()
        if self.cursor.dirty:
            await asyncio.to_thread(self.cursor.save)

    def status(self) -> dict[str, Any]:
        """Link state, cursor and counters."""
        return {
            "mqtt": {
                **self.link.status(),
                "prefix": self.topics.prefix,
                "cursor": self.cursor.seq,
                "events_published": self.published,
                "commands": self.commands,
                "commands_dropped_unknown": self.refused,
                "denied_unanswered": self.unanswered,
            }
        }

    def note_health(self, health: dict[str, Any]) -> None:
        """Publish the monitor's latest sample on ``<p>/state/health`` (retained)."""
        self._state["health"] = dict(health)  # only the latest counts: no transitions
        self._state_changed.set()

    def note_selftest(self, report: dict[str, Any]) -> None:
        """Publish the latest self-test on ``<p>/state/selftest`` (retained)."""
        self._state["selftest"] = dict(report)
        self._state_changed.set()

    def note_ring_image(self, jpeg: bytes) -> None:
        """Publish a ring's redacted JPEG on ``<p>/ring_image``, once, not retained.

        While the broker is away only the latest waits (a newer frame, or the blank one
        that replaces an expired frame, takes the older one's place).
        """
        self._ring_image = jpeg
        self._state_changed.set()

    # --- from the bus (runs at publication: must stay quick) -------------------------

    def _on_event(self, event: Event) -> None:
        kind = event.type
        if kind == "LockStateChanged":
            self._note("lock", {"state": getattr(event, "state", "unknown"), "door": self._door})
        elif kind in SENSOR_EVENTS:
            self._sensor_changed(kind)
        elif kind in CALL_STATES:
            self._call_changed(str(getattr(event, "call", "")), CALL_STATES[kind])
        elif kind in {"UnlockGranted", "UnlockDenied"}:
            # The decision only: who asked and why it was denied stay at the station.
            self._note("unlock", {"state": "granted" if kind == "UnlockGranted" else "denied",
                                  "door": self._door})
        elif kind == "LogCheckpoint":
            self._state_changed.set()
        elif isinstance(event, DoorbellPressed):
            shown = public_details(kind, event.details())  # the one filter, here too
            press = {"event_type": "press", "button": shown.get("button"),
                     "flat": shown.get("flat")}
            self._send_live(self.topics.doorbell, press)
            if event.button in self._wiring.buttons:  # a name the config checked
                self._send_live(self.topics.doorbell_button(event.button), press)

    def _sensor_changed(self, kind: str) -> None:
        """The door contact's or the tamper switch's event: door state and alarms."""
        if kind in {"DoorOpened", "DoorClosed"}:
            self._note("door", {"state": "open" if kind == "DoorOpened" else "closed",
                                "door": self._door})
            if kind == "DoorClosed":
                self._alarms_changed({FORCED_OPEN: False, HELD_OPEN: False})
        elif kind == "TamperCleared":
            self._alarms_changed({TAMPER: False})
        else:
            alarm = ALARM_EVENTS[kind]
            self._alarms_changed({alarm: True})
            self._send_live(self.topics.alarm, {"event_type": alarm})

    def _call_changed(self, call: str, state: str | None) -> None:
        if state is None:
            self._calls.pop(call, None)
        else:
            self._calls[call] = state
        states = set(self._calls.values())
        summary = next((s for s in ("in_call", "ringing") if s in states), "idle")
        if summary != self._state.get("call", {}).get("state"):
            self._note("call", {"state": summary})

    def _alarms_changed(self, changes: dict[str, bool]) -> None:
        alarms = {k: v for k, v in self._state["alarms"].items() if k != "at"}
        if any(alarms.get(k) != v for k, v in changes.items()):
            self._note("alarms", alarms | changes)

    def _note(self, key: str, value: dict[str, Any]) -> None:
        """A retained state's new value; a change of more than its time is a transition."""
        previous = {k: v for k, v in self._state.get(key, {}).items() if k != "at"}
        self._state[key] = {**value, "at": time.time()}
        if previous != value and self._in_session:
            self._transitions.append((key, self._state[key]))
        self._state_changed.set()

    def _send_live(self, topic: str, body: dict[str, Any]) -> None:
        """A message that is not retained (a press, an alarm): sent once, when it happens."""
        self._live.append((topic, json.dumps(body).encode()))
        self._state_changed.set()

    # --- one connected session -------------------------------------------------------

    async def _session(self, client: aiomqtt.Client, protocol: aiomqtt.ProtocolVersion) -> None:
        self._in_session = True
        try:
            await self._serve(client, protocol)
        finally:
            self._in_session = False
            self._transitions.clear()  # the next session starts from the latest state

    async def _serve(self, client: aiomqtt.Client, protocol: aiomqtt.ProtocolVersion) -> None:
        client.pending_calls_threshold = 1 << 30  # pipelined QoS 1 publishes are normal
        self._rewind_after_loss()
        await client.subscribe(self.topics.command, qos=1)
        if self.config.discovery:
            for topic, body in discovery_messages(self.topics, self._wiring).items():
                await client.publish(topic, json.dumps(body), qos=1, retain=True)
        v5 = protocol is aiomqtt.ProtocolVersion.V5
        jobs: list[Coroutine[Any, Any, None]] = [
            self._publish_state(client),
            self._serve_commands(client, v5),
        ]
        if self._log is not None:
            jobs.append(self._publish_events(client, self._log))
        tasks = [asyncio.create_task(job, name=f"mqtt-{i}") for i, job in enumerate(jobs)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # the first failure (usually the lost connection) goes up
        except BaseException:
            self._lost_at = time.monotonic()
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _rewind_after_loss(self) -> None:
        """Re-publish what the broker acked just before it went away.

        A broker killed mid-burst may have acknowledged events it never passed on.
        """
        if self._lost_at is None:
            return
        since = self._lost_at - REPLAY_S
        earlier = [before for at, before in self._acks if at >= since]
        if earlier and min(earlier) < self.cursor.seq:
            log.info("mqtt: re-publishing events after seq %d", min(earlier))
            self.cursor.advance(min(earlier))
        self._acks.clear()
        self._lost_at = None

    async def _publish_state(self, client: aiomqtt.Client) -> None:
        sent: dict[str, dict[str, Any]] = {}
        sent_checkpoint: dict[str, Any] | None = None
        topics = {"lock": self.topics.state_lock, "door": self.topics.state_door,
                  "call": self.topics.state_call, "health": self.topics.state_health,
                  "selftest": self.topics.state_selftest, "alarms": self.topics.state_alarms,
                  "unlock": self.topics.state_unlock}
        while True:
            self._state_changed.clear()
            while self._transitions:  # every change, in order, then the latest of each
                key, value = self._transitions.popleft()
                if sent.get(key) != value:
                    await client.publish(topics[key], json.dumps(value), qos=1, retain=True)
                    sent[key] = value
            for key, value in list(self._state.items()):
                if sent.get(key) != value:
                    await client.publish(topics[key], json.dumps(value), qos=1, retain=True)
                    sent[key] = value
            while self._live:
                topic, payload = self._live.popleft()
                await client.publish(topic, payload, qos=1)
            await self._publish_ring_image(client)
            checkpoint = self._log.latest_checkpoint() if self._log is not None else None
            if checkpoint is not None and checkpoint != sent_checkpoint:
                await client.publish(self.topics.checkpoint, json.dumps(checkpoint, default=str),
                                     qos=1, retain=True)
                sent_checkpoint = checkpoint
            await self._state_changed.wait()

    async def _publish_ring_image(self, client: aiomqtt.Client) -> None:
        if self._ring_image is None:
            return
        image, self._ring_image = self._ring_image, None
        try:
            await client.publish(self.topics.ring_image, image, qos=1, retain=False)
        except BaseException:
            if self._ring_image is None:  # not sent, nor replaced: it goes out next session
                self._ring_image = image
            raise

    async def _publish_events(self, client: aiomqtt.Client, source: EventSource) -> None:
        while True:
            batch = source.read_after(self.cursor.seq, BATCH)
            if not batch:
                if self.cursor.dirty:
                    await asyncio.to_thread(self.cursor.save)
                await source.wait_for_after(self.cursor.seq)
                continue
            before = self.cursor.seq
            await asyncio.gather(*(
                client.publish(self.topics.events, event_json(e), qos=1) for e in batch
            ))
            self._acks.append((time.monotonic(), before))
            while self._acks and self._acks[0][0] < time.monotonic() - 2 * REPLAY_S:
                self._acks.popleft()
            self.published += len(batch)
            self.cursor.advance(batch[-1].seq)
            if self.cursor.save_due():
                await asyncio.to_thread(self.cursor.save)

    def _admit(self, kid: str, message: aiomqtt.Message) -> bool:
        """Whether a message may wait for the verifier: a command must name a signer."""
        if message.topic.value != self.topics.command:
            return True
        if kid and (self._known is None or self._known(kid)):
            return True
        self.refused += 1
        return False

    async def _serve_commands(self, client: aiomqtt.Client, v5: bool) -> None:
        async for message in client.messages:
            if message.topic.value != self.topics.command:
                continue
            self.commands += 1
            payload = message.payload
            token = payload if isinstance(payload, bytes | str) else str(payload or "")
            granted, jti = await self._decide(token)
            if not granted and not self._denied_replies.take(time.monotonic()):
                self.unanswered += 1  # a flood of bad commands gets no answers
                continue
            answer = json.dumps({"jti": jti, "result": "granted" if granted else "denied"})
            topic, properties = self._reply_to(message.properties if v5 else None)
            task = asyncio.create_task(self._reply(client, topic, answer, properties))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _decide(self, token: str | bytes) -> tuple[bool, str | None]:
        if self._submit is None:
            log.warning("mqtt command refused: this station has no command verifier")
            return False, None
        try:
            decision = await self._submit(token, MQTT_CONTEXT)
        except Exception:
            log.exception("the verifier failed on an MQTT command; denied")
            return False, None
        jti = decision.jti
        return bool(decision.granted), jti if isinstance(jti, str) else None

    def _reply_to(self, props: Properties | None) -> tuple[str, Properties | None]:
        topic = self.topics.command_result
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        if not isinstance(response, str):
            return topic, None
        if not self.topics.response_topic_allowed(response):
            log.debug("mqtt: response topic refused; answering on %s", topic)
            return topic, None
        out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        correlation = getattr(props, "CorrelationData", None)
        if isinstance(correlation, bytes) and len(correlation) <= 256:
            out.CorrelationData = correlation
        return response, out

    async def _reply(
        self, client: aiomqtt.Client, topic: str, answer: str, props: Properties | None
    ) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topic, answer, qos=0, properties=props)


def mqtt_bridge(
    settings: Settings,
    bus: EventBus,
    eventlog: EventSource | None,
    submit: Submit | None,
    initial_state: Callable[[], dict[str, str]] | None = None,
    known: Callable[[str], bool] | None = None,
) -> MqttBridge:
    """The bridge of a station's settings, its event log, the verifier's ``submit``.

    ``known(kid)``: whether a principal of that id is registered; commands naming no
    such signer are dropped on reading.
    """
    if settings.mqtt is None:
        raise ConfigError(["mqtt: the section is missing"])
    hardware = settings.hardware
    wiring = Wiring(
        door=hardware.relay.door,
        buttons=tuple(b.name for b in hardware.buttons),
        door_contact=hardware.door_contact is not None,
        tamper=hardware.tamper is not None,
        ring_image=settings.mqtt.ring_image,
    )
    return MqttBridge(
        settings.mqtt,
        settings.station.id,
        settings.station.state_dir,
        bus,
        eventlog,
        submit,
        wiring,
        initial_state,
        known,
    )
