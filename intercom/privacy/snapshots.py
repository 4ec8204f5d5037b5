"""Snapshots: one masked frame per ring, encrypted in the event log, shredded on time.

A snapshot is a ``SnapshotTaken`` record appended straight to the log (never published
on the bus, so no subscriber or broker sees the image). Its image is a personal field
encrypted under the key of its hour's *bucket* (``snapshots/<YYYYMMDDHH>``, a name no
principal id can take); destroying that key after ``snapshot_retention_hours`` shreds the
hour's images while the records, and so the hash chain, stay. Managers get the images
redacted; residents of the flat that was rung get them with the zones masked only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from intercom.errors import IntercomError
from intercom.eventlog.errors import EventLogError
from intercom.eventlog.reader import LogReader, Query
from intercom.events import DoorbellPressed, Event, EventBus, SnapshotTaken
from intercom.privacy.camera import still_frame

if TYPE_CHECKING:
    from intercom.config import Settings
    from intercom.eventlog import EventLog
    from intercom.media import CameraSource

log = logging.getLogger(__name__)

BUCKET_S = 3600
BUCKET_PREFIX = "snapshots/"
STILL_TIMEOUT_S = 3.0
RETENTION_POLL_S = 60.0
AUDIENCES = ("resident", "manager")


def bucket_of(at: float) -> str:
    """The key bucket of a snapshot taken at ``at`` (one per UTC hour)."""
    return BUCKET_PREFIX + time.strftime("%Y%m%d%H", time.gmtime(at))


def last_expired_hour(now: float, keep_hours: float) -> int:
    """The newest hour (hours since 1970) whose snapshots are all past ``keep_hours``."""
    return int((now - keep_hours * 3600) // BUCKET_S) - 1


def manager_jpeg(jpeg: bytes, *, redacted: bool) -> bytes:
    """A still as managers get it: face-redacted thoroughly unless it was at the camera.

    The one redaction of stills for managers: their snapshots (``read_snapshots``) and
    the ring image sent to the building's broker (``ringimage``).
    """
    if redacted:
        return jpeg
    from intercom.privacy.redact import shared_redactor  # noqa: PLC0415

    return bytes(shared_redactor(thorough=True).redact_jpeg(jpeg))


@dataclass(frozen=True)
class Snapshot:
    """One readable snapshot from the log."""

    seq: int
    at: float
    button: str
    flat: str
    redacted: bool
    jpeg: bytes

    def meta(self) -> dict[str, Any]:
        """Everything but the image, as JSON."""
        return {"seq": self.seq, "at": self.at, "button": self.button, "flat": self.flat,
                "redacted": self.redacted}


def read_snapshots(
    reader: LogReader,
    audience: str,
    flats: frozenset[str] | None = None,
    since: float | None = None,
) -> Iterator[Snapshot]:
    """Readable snapshots, oldest first; a manager's are always face-redacted.

    ``flats`` limits them to rings of those flats (a resident sees only their own).
    """
    if audience not in AUDIENCES:
        raise IntercomError(f"unknown audience {audience!r}; one of {', '.join(AUDIENCES)}")
    for event in reader.query(Query(since=since, types=frozenset({"SnapshotTaken"}))):
        image = event.details.get("image")
        flat = str(event.details.get("flat", ""))
        if not isinstance(image, str) or (flats is not None and flat not in flats):
            continue  # shredded, or not theirs
        try:
            jpeg = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            log.warning("snapshots: record %d holds no valid image", event.seq)
            continue
        redacted = bool(event.details.get("redacted"))
        if audience == "manager":
            jpeg, redacted = manager_jpeg(jpeg, redacted=redacted), True
        yield Snapshot(event.seq, event.at, str(event.details.get("button", "")), flat,
                       redacted, jpeg)


class Snapshots:
    """Takes a snapshot at each ring and shreds them after the retention time."""

    def __init__(
        self, settings: Settings, bus: EventBus, camera: CameraSource, eventlog: EventLog
    ) -> None:
        self.config = settings.privacy
        self._log_retention_hours = settings.eventlog.retention_hours
        self._bus = bus
        self._camera = camera
        self._eventlog = eventlog
        self.taken = 0
        self.failed = 0
        self._unsubscribe: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retention: asyncio.Task[None] | None = None
        self._checked_through: int | None = None

    async def start(self, *, take: bool = True) -> None:
        """Listen for rings (with ``take``); shred what is past retention, then each minute."""
        if take:
            self._unsubscribe = self._bus.on(self._on_event)
        self._retention = asyncio.create_task(self._retention_loop(), name="snapshot-retention")

    async def stop(self) -> None:
        """Stop listening; let snapshots being taken finish briefly."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STILL_TIMEOUT_S)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, DoorbellPressed):
            task = asyncio.create_task(self.take(event), name="snapshot")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def take(self, ring: DoorbellPressed) -> int | None:
        """Store one frame for a ring; its seq, or None when it could not be taken."""
        from intercom.privacy.redact import frame_to_jpeg  # noqa: PLC0415

        camera, eventlog = self._camera, self._eventlog
        try:
            frame = await asyncio.wait_for(still_frame(camera), STILL_TIMEOUT_S)
            jpeg = await asyncio.to_thread(frame_to_jpeg, frame)
            event = SnapshotTaken(
                at=ring.at, button=ring.button, flat=ring.flat,
                redacted=self.config.redact_all_outputs, bucket=bucket_of(ring.at),
                image=base64.b64encode(jpeg).decode(),
            )
            seq = await eventlog.append(event)
        except (TimeoutError, IntercomError, OSError) as exc:
            self.failed += 1
            log.warning("snapshot: not taken: %s", exc)
            return None
        except Exception:
            self.failed += 1
            log.exception("snapshot: not taken (unexpected failure)")
            return None
        self.taken += 1
        log.info("snapshot: stored for flat %s as seq %d", ring.flat, seq)
        return seq

    async def shred_expired(self, now: float | None = None) -> int:
        """Destroy the keys of the hours past retention; how many buckets had one."""
        eventlog = self._eventlog
        now = time.time() if now is None else now
        last = last_expired_hour(now, self.config.snapshot_retention_hours)
        if self._checked_through is None:  # first run: as far back as the log keeps records
            look_back = self._log_retention_hours + 48
            self._checked_through = int((now - look_back * 3600) // BUCKET_S)
        shredded = 0
        for hour in range(self._checked_through + 1, last + 1):
            bucket = bucket_of(hour * BUCKET_S)
            if await eventlog.erase_principal(bucket):
                shredded += 1
                log.info("snapshots: shredded %s", bucket)
            self._checked_through = hour
        return shredded

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.shred_expired()
            except EventLogError as exc:
                log.error("snapshots: retention could not run: %s", exc)  # noqa: TRY400
            await asyncio.sleep(RETENTION_POLL_S)

    def counts(self) -> dict[str, int]:
        """Snapshots taken and failed since start, for ``intercom status``."""
        return {"taken": self.taken, "failed": self.failed}
