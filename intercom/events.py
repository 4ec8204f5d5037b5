"""Typed domain events and the in-process bus they flow out on.

Hardware, calls and the command verifier *publish* events; the event log, the MQTT
bridge, the call manager and the status view *subscribe*. No component calls another
to report something.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened at the station.

    ``personal_fields`` names the details that identify a person (a principal id, a
    name); the event log encrypts them under a per-principal key so that erasing a
    person is destroying one key.

    ``log_only_fields`` names the details that are for the station's own logs only (the
    encrypted event log and the journal), never for the wire: what would help an
    attacker, such as the check a denied command failed, or free text that may name
    someone. Every transport sends ``public_details`` (below), which leaves out both
    these and every personal field but the pseudonymous ``principal`` id.
    """

    personal_fields: ClassVar[tuple[str, ...]] = ()
    log_only_fields: ClassVar[tuple[str, ...]] = ()
    at: float = field(default_factory=time.time)

    @property
    def type(self) -> str:
        """The event's type name, as it appears in logs and on MQTT."""
        return type(self).__name__

    def details(self) -> dict[str, Any]:
        """The event's fields other than its time, as plain JSON-able values."""
        data = dataclasses.asdict(self)
        data.pop("at", None)
        return data

    def to_dict(self) -> dict[str, Any]:
        """Type, time and details in one JSON-able mapping (for the station's own log)."""
        return {"type": self.type, "at": self.at, **self.details()}

    def public_dict(self) -> dict[str, Any]:
        """Type, time and the details that may leave the station (``public_details``)."""
        return {"type": self.type, "at": self.at, **public_details(self.type, self.details())}


# --- station -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StationStarted(Event):
    """The daemon finished starting and is ready."""

    station: str
    version: str
    simulated: bool


@dataclass(frozen=True, kw_only=True)
class StationStopping(Event):
    """The daemon is stopping (signal or fault)."""

    reason: str


# --- hardware ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DoorbellPressed(Event):
    """A doorbell button was pressed (after debouncing and coalescing)."""

    button: str
    flat: str


@dataclass(frozen=True, kw_only=True)
class LockStateChanged(Event):
    """The lock relay was energised (``unlocked``) or released (``locked``)."""

    door: str
    state: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class DoorOpened(Event):
    """The door contact reports the door open."""

    door: str


@dataclass(frozen=True, kw_only=True)
class DoorClosed(Event):
    """The door contact reports the door closed."""

    door: str


@dataclass(frozen=True, kw_only=True)
class DoorHeldOpen(Event):
    """The door has stayed open longer than the configured time."""

    door: str
    seconds: float


@dataclass(frozen=True, kw_only=True)
class DoorForcedOpen(Event):
    """The door opened without a preceding unlock grant."""

    door: str


@dataclass(frozen=True, kw_only=True)
class TamperDetected(Event):
    """The tamper switch tripped (the station's cover was opened)."""

    sensor: str


@dataclass(frozen=True, kw_only=True)
class TamperCleared(Event):
    """The tamper switch closed again after a trip (the cover is back on)."""

    sensor: str


# --- commands ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class UnlockGranted(Event):
    """A verified command opened a door."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    door: str
    principal: str
    via: str
    jti: str


@dataclass(frozen=True, kw_only=True)
class UnlockDenied(Event):
    """A command to open a door was refused; ``reason`` says which check failed.

    ``reason`` is log-only: on the wire it would tell a forger how far his command got
    ("wrong TOTP code" means the signature was good). ``principal`` is the id the
    command claimed, when a principal of that id is registered; empty otherwise.
    """

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    log_only_fields: ClassVar[tuple[str, ...]] = ("reason",)
    door: str
    principal: str
    via: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class UnlockDenialsSuppressed(Event):
    """More commands were denied than are worth an event each; ``count`` were not raised."""

    count: int
    seconds: float


@dataclass(frozen=True, kw_only=True)
class PrincipalAdded(Event):
    """A principal was registered (seen by the running station)."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    principal: str
    role: str


@dataclass(frozen=True, kw_only=True)
class PrincipalRevoked(Event):
    """A principal was revoked (seen by the running station)."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    principal: str


@dataclass(frozen=True, kw_only=True)
class PrincipalLockedOut(Event):
    """A principal sent too many wrong TOTP codes and is locked out until reset."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    principal: str
    failures: int


# --- calls ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CallRinging(Event):
    """A press rings every online device of a flat; ``devices`` is how many."""

    call: str
    flat: str
    devices: int


@dataclass(frozen=True, kw_only=True)
class CallAnswered(Event):
    """A device answered the call: two-way audio with the door."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    call: str
    principal: str


@dataclass(frozen=True, kw_only=True)
class CallDeclined(Event):
    """A device declined the call (the others keep ringing)."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    call: str
    principal: str


@dataclass(frozen=True, kw_only=True)
class CallMissed(Event):
    """Nobody answered in time (or every rung device declined)."""

    call: str
    flat: str


@dataclass(frozen=True, kw_only=True)
class CallEnded(Event):
    """An answered call ended; ``reason`` says how."""

    call: str
    reason: str
    duration_s: float


@dataclass(frozen=True, kw_only=True)
class PrincipalPaired(Event):
    """A resident's device paired with a one-time code and became a principal."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    principal: str
    flat: str


# --- privacy -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LiveViewStarted(Event):
    """A manager began watching the redacted live view (WHEP); ``view`` names the session."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    view: str
    principal: str
    via: str


@dataclass(frozen=True, kw_only=True)
class LiveViewEnded(Event):
    """A redacted live view session ended: who watched, from ``started_at`` to now, why."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    view: str
    principal: str
    started_at: float
    duration_s: float
    reason: str


@dataclass(frozen=True, kw_only=True)
class SnapshotTaken(Event):
    """One frame at a ring (zones masked), kept in the log only; never put on the bus.

    ``bucket`` names the key that encrypts the image (one per hour, shredded after the
    snapshot retention); ``image`` is a base64 JPEG.
    """

    personal_fields: ClassVar[tuple[str, ...]] = ("bucket", "image")
    button: str
    flat: str
    redacted: bool
    bucket: str
    image: str


@dataclass(frozen=True, kw_only=True)
class PrivilegedAction(Event):
    """Someone did something privileged (pairing, revocation, config, export, erase).

    ``actor`` is a principal id or, for local commands, ``local:<OS user>``; ``target``
    is the principal acted on, empty if none. Both are personal (an OS user may be a
    person's login): encrypted under the target's key, else the actor's, and kept off
    the wire. ``detail`` is log-only: free text, some of it from the control socket's
    caller, that can tie the action to a flat or a person (``flat 12`` at a pairing),
    or help an attacker (an installer's access window, config digests).
    """

    personal_fields: ClassVar[tuple[str, ...]] = ("target", "actor")
    log_only_fields: ClassVar[tuple[str, ...]] = ("detail",)
    actor: str
    action: str
    target: str = ""
    detail: str = ""


# --- event log -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LogCheckpoint(Event):
    """The event log signed its chain hash at ``seq``; keep it as a witness."""

    seq: int
    hash: str
    signed_at: int
    key: str
    signature: str


@dataclass(frozen=True, kw_only=True)
class LogPurged(Event):
    """Whole epochs of the event log were shredded (retention or ``log purge``)."""

    reason: str
    older_than_hours: float
    epochs: int
    records: int
    through_seq: int


# --- health --------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AlertRaised(Event):
    """Something needs attention (``intercom.monitor``): ``alert`` names it.

    ``alert`` is one of camera_stalled, clock_unsynchronised, disk_low,
    broker_unreachable, certificate_expiry (conditions, later ``AlertCleared``),
    relay_guard and unlock_failures (occurrences). ``principal`` is the principal whose
    unlock commands kept failing, empty for every other alert.
    """

    personal_fields: ClassVar[tuple[str, ...]] = ("principal",)
    alert: str
    message: str
    principal: str = ""


@dataclass(frozen=True, kw_only=True)
class AlertCleared(Event):
    """A condition raised as ``AlertRaised`` has ended."""

    alert: str


@dataclass(frozen=True, kw_only=True)
class SelfTestCompleted(Event):
    """The station tested its parts (``intercom.selftest``), at start or when asked.

    ``failed`` names the parts that failed, comma-separated (empty when all passed);
    ``trigger`` is ``start`` or ``request``.
    """

    passed: bool
    failed: str
    trigger: str


EVENT_TYPES: dict[str, type[Event]] = {}


def register(cls: type[Event]) -> type[Event]:
    """Make an event class known by its type name (for decoding stored events)."""
    EVENT_TYPES[cls.__name__] = cls
    return cls


for _cls in (
    StationStarted,
    StationStopping,
    DoorbellPressed,
    LockStateChanged,
    DoorOpened,
    DoorClosed,
    DoorHeldOpen,
    DoorForcedOpen,
    TamperDetected,
    TamperCleared,
    UnlockGranted,
    UnlockDenied,
    UnlockDenialsSuppressed,
    PrincipalAdded,
    PrincipalRevoked,
    PrincipalLockedOut,
    CallRinging,
    CallAnswered,
    CallDeclined,
    CallMissed,
    CallEnded,
    PrincipalPaired,
    LiveViewStarted,
    LiveViewEnded,
    SnapshotTaken,
    PrivilegedAction,
    LogCheckpoint,
    LogPurged,
    AlertRaised,
    AlertCleared,
    SelfTestCompleted,
):
    register(_cls)


# Of the personal fields, only this pseudonymous id ever leaves the station.
PUBLIC_PERSONAL_FIELDS = frozenset({"principal"})


def public_details(event_type: str, details: Mapping[str, Any]) -> dict[str, Any]:
    """The details of an event that may leave the station: the one filter of every transport.

    Kept: the fields the event class declares, less its ``log_only_fields`` and its
    ``personal_fields`` other than ``principal`` (an erased person's id stays None, as
    the event log gives it). A key the class does not declare (a record written by
    another version) and every detail of a type not known here are left out: what is
    not known to be public does not go out. The event log and the journal keep the
    rest; MQTT, ``intercom status`` and anything else that carries events off the
    station send only this.
    """
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        return {}
    hidden = set(cls.log_only_fields) | (set(cls.personal_fields) - PUBLIC_PERSONAL_FIELDS)
    allowed = {f.name for f in dataclasses.fields(cls)} - hidden - {"at"}
    return {key: value for key, value in details.items() if key in allowed}


Handler = Callable[[Event], None]


class EventBus:
    """Fan-out of events to subscribers, in publication order, on one event loop.

    ``publish`` never blocks and never raises: each subscriber has its own queue, so a
    slow subscriber cannot delay the hardware or another subscriber. Handlers
    registered with ``on`` run synchronously at publication and must be quick.

    An event published from inside a handler is delivered after the event being
    delivered has reached every handler and queue: every subscriber sees every event
    in the same order, the order of publication.
    """

    def __init__(self, history: int = 50) -> None:
        self._queues: list[asyncio.Queue[Event]] = []
        self._handlers: list[Handler] = []
        self._pending: deque[Event] = deque()
        self._delivering = False
        self.recent: deque[Event] = deque(maxlen=history)

    def publish(self, event: Event) -> None:
        """Send an event to every subscriber (after the ones published before it)."""
        self._pending.append(event)
        if self._delivering:
            return  # published by a handler: the loop below delivers it next
        self._delivering = True
        try:
            while self._pending:
                self._deliver(self._pending.popleft())
        finally:
            self._delivering = False

    def _deliver(self, event: Event) -> None:
        log.info("event %s %s", event.type, _public_details(event))
        self.recent.append(event)
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                log.exception("event handler %r failed on %s", handler, event.type)
        for queue in list(self._queues):
            queue.put_nowait(event)

    def on(self, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` for each event; returns a function that unsubscribes."""
        self._handlers.append(handler)
        return lambda: self._handlers.remove(handler)

    async def subscribe(self) -> AsyncIterator[Event]:
        """Yield every event published from now on."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)


def _public_details(event: Event) -> str:
    """Details for the text log, with personal fields left out."""
    details = event.details()
    return " ".join(f"{k}={v}" for k, v in details.items() if k not in event.personal_fields)
