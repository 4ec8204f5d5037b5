"""The EventLog station component: every event on the bus, appended durably."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from intercom.config import EventLogConfig
from intercom.eventlog import checkpoints
from intercom.eventlog.checkpoints import Checkpoint
from intercom.eventlog.errors import EventLogError
from intercom.eventlog.reader import LogReader
from intercom.eventlog.records import Entry, LoggedEvent
from intercom.eventlog.store import connect, db_path, open_log
from intercom.eventlog.verify import Verdict, verify
from intercom.eventlog.worker import Kind, Op, Outcome, WriterThread, entry_op
from intercom.eventlog.writer import LogWriter, Shredded
from intercom.events import Event, EventBus, LogPurged
from intercom.identity import StationIdentity

log = logging.getLogger(__name__)

RETENTION_POLL_S = 30.0
STOP_WAIT_S = 1.5


class EventLog:
    """Appends every bus event to the encrypted, hash-chained log; shreds on schedule."""

    name = "eventlog"

    def __init__(
        self,
        state_dir: Path,
        identity: StationIdentity,
        bus: EventBus,
        config: EventLogConfig,
        clock: Callable[[], float] = time.time,
        *,
        retention_poll_s: float = RETENTION_POLL_S,
        create: bool = True,
        retention: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.identity = identity
        self.bus = bus
        self.config = config
        self.clock = clock
        self.retention_poll_s = retention_poll_s
        self.create = create  # False: a command's own log access; never a new log
        self.retention = retention  # False: a command's, which knows no retention setting
        self._last_seq = 0
        self._thread: WriterThread | None = None
        self._reader: LogReader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._latest: Checkpoint | None = None
        self._shredded = 0

    async def start(self) -> None:
        """Open (or create) the log, subscribe to the bus, enforce retention."""
        self._loop = asyncio.get_running_loop()
        conn, keyring = await asyncio.to_thread(
            open_log, self.state_dir, create=self.create, epoch_s=self.config.epoch_minutes * 60
        )
        writer = LogWriter(conn, keyring, self.identity, self.config, self.clock)
        if writer.epoch_s != self.config.epoch_minutes * 60:
            log.warning(
                "event log: keeps the epoch of %.0f minutes it was made with (config: %.0f)",
                writer.epoch_s / 60, self.config.epoch_minutes,
            )
        self._reader = LogReader(connect(db_path(self.state_dir)), keyring)
        self._last_seq = writer.last_seq
        self._latest = checkpoints.latest(conn)
        self._thread = WriterThread(writer, self._deliver_threadsafe)
        self._thread.start()
        self._unsubscribe = self.bus.on(self._on_event)
        if not self.retention:
            log.info("event log open at seq %d", self._last_seq)
            return
        try:
            await self.enforce_retention()
        except EventLogError as exc:  # the log still takes events; the timer retries
            log.error("event log: retention could not run at start: %s", exc)  # noqa: TRY400
        self._retention = asyncio.create_task(self._retention_loop(), name="eventlog-retention")
        log.info("event log open at seq %d", self._last_seq)

    async def stop(self) -> None:
        """Stop taking events, write what is queued durably, sign the head, close."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
            self._retention = None
        if self._thread is not None:
            with contextlib.suppress(EventLogError):
                await self._submit(Kind.STOP)
            await asyncio.to_thread(self._thread.join, STOP_WAIT_S)
            self._thread = None
        if self._reader is not None:
            self._reader.conn.close()
            self._reader = None

    def _on_event(self, event: Event) -> None:
        if self._thread is not None:
            self._thread.submit(entry_op(Entry.from_event(event)))

    async def _submit(self, kind: Kind, payload: Any = None) -> Any:
        if self._thread is None or not self._thread.is_alive() or self._loop is None:
            raise EventLogError("the event log is not running")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._thread.submit(Op(kind, payload, future))
        return await future

    async def append(self, event: Event) -> int:
        """Append one event (not also published on the bus); its seq once durable."""
        if self._thread is None or not self._thread.is_alive() or self._loop is None:
            raise EventLogError("the event log is not running")
        future: asyncio.Future[int] = self._loop.create_future()
        self._thread.submit(entry_op(Entry.from_event(event), future))
        return await future

    def _deliver_threadsafe(
        self, outcomes: list[Outcome], last_seq: int, signed: list[Checkpoint]
    ) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._deliver, outcomes, last_seq, signed)

    def _deliver(self, outcomes: list[Outcome], last_seq: int, signed: list[Checkpoint]) -> None:
        self._last_seq = max(self._last_seq, last_seq)
        for outcome in outcomes:
            future = outcome.token
            if future is None or future.done():
                continue
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.result)
        still = []
        for seq, waiter in self._waiters:
            if self._last_seq > seq:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((seq, waiter))
        self._waiters = still
        for checkpoint in signed:
            self._latest = checkpoint
            if self._unsubscribe is not None:
                self.bus.publish(checkpoint.to_event())

    @property
    def last_seq(self) -> int:
        """The highest durable seq (0 when empty)."""
        return self._last_seq

    def read_after(self, seq: int, limit: int = 500) -> list[LoggedEvent]:
        """Up to ``limit`` decrypted records with a seq above ``seq``, ascending."""
        if self._reader is None:
            raise EventLogError("the event log is not running")
        return self._reader.read_after(seq, limit)

    async def wait_for_after(self, seq: int) -> None:
        """Return once a record above ``seq`` is durable."""
        if self._last_seq > seq:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, future))
        await future

    async def verify_tail(self) -> Verdict:
        """The chain and checkpoints checked, the records after the last one authenticated.

        Read on a connection of its own in a worker thread, beside the writer (WAL).
        """
        if self._reader is None:
            raise EventLogError("the event log is not running")
        keyring, public_key = self._reader.keyring, self.identity.public_key

        def run() -> Verdict:
            conn = connect(db_path(self.state_dir))
            try:
                return verify(conn, public_key, reader=LogReader(conn, keyring))
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest signed checkpoint as JSON."""
        return None if self._latest is None else self._latest.to_dict()

    async def flush(self) -> int:
        """Wait until every event published so far is durable; the last seq."""
        await self._submit(Kind.CHECKPOINT)  # the writer takes operations in order
        return self._last_seq

    async def shred(self, older_than_s: float) -> Shredded | None:
        """Shred every epoch that ended more than ``older_than_s`` ago (not logged here)."""
        shredded: Shredded | None = await self._submit(Kind.SHRED, older_than_s)
        if shredded is not None:
            self._shredded += shredded.records
        return shredded

    async def erase_principal(self, principal_id: str) -> bool:
        """Destroy a principal's key; False when the log holds none for them."""
        return bool(await self._submit(Kind.ERASE, principal_id))

    async def enforce_retention(self) -> Shredded | None:
        """Shred every epoch past retention now; log the shred as a LogPurged event."""
        hours = self.config.retention_hours
        shredded: Shredded | None = await self._submit(Kind.SHRED, hours * 3600)
        if shredded is not None:
            self._shredded += shredded.records
            self.bus.publish(
                LogPurged(reason="retention", older_than_hours=hours, epochs=shredded.epochs,
                          records=shredded.records, through_seq=shredded.through_seq)
            )
        return shredded

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retention_poll_s)
            try:
                await self.enforce_retention()
            except EventLogError as exc:
                log.error("event log: retention could not run: %s", exc)  # noqa: TRY400

    def status(self) -> dict[str, Any]:
        """Last seq, latest checkpoint, append failures, retention."""
        return {
            "eventlog": {
                "last_seq": self._last_seq,
                "checkpoint_seq": self._latest.seq if self._latest else None,
                "append_failures": self._thread.failures if self._thread else 0,
                "transactions": self._thread.transactions if self._thread else 0,
                "retention_hours": self.config.retention_hours,
                "shredded_records": self._shredded,
            }
        }
