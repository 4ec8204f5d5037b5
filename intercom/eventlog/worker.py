"""The writer thread: takes queued operations and runs them, appends by group commit.

Appends queued while a transaction syncs are written together in the next one: many
appenders share one fsync, and none is answered before its record is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from intercom.eventlog.checkpoints import Checkpoint
from intercom.eventlog.errors import EventLogError
from intercom.eventlog.records import Entry
from intercom.eventlog.writer import LogWriter

log = logging.getLogger(__name__)

MAX_BATCH = 1000
IDLE_S = 5.0


class Kind(Enum):
    """What an operation asks of the writer."""

    APPEND = "append"  # payload: Entry; result: seq
    CHECKPOINT = "checkpoint"  # sign if due; result: Checkpoint | None
    SHRED = "shred"  # payload: seconds; result: Shredded | None
    ERASE = "erase"  # payload: principal id; result: bool
    STOP = "stop"  # sign the head, close; result: None


@dataclass(frozen=True)
class Op:
    """One queued operation; ``token`` comes back with its outcome."""

    kind: Kind
    payload: Any = None
    token: Any = None


@dataclass(frozen=True)
class Outcome:
    """What became of one operation."""

    token: Any
    result: Any = None
    error: BaseException | None = None


Deliver = Callable[[list[Outcome], int, list[Checkpoint]], None]


class WriterThread(threading.Thread):
    """Owns the LogWriter; ``deliver`` gets outcomes, the last seq and new checkpoints."""

    def __init__(self, writer: LogWriter, deliver: Deliver) -> None:
        super().__init__(name="eventlog-writer", daemon=True)
        self.writer = writer
        self.deliver = deliver
        self.queue: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self.failures = 0
        self.transactions = 0

    def submit(self, op: Op) -> None:
        """Queue an operation (any thread)."""
        self.queue.put(op)

    def run(self) -> None:
        """Take batches until a STOP."""
        try:
            while True:
                try:
                    if not self._step():
                        return
                except Exception:  # never let the thread die with operations queued
                    log.exception("event log: writer step failed")
                    time.sleep(0.1)
        finally:
            self.writer.close()

    def _step(self) -> bool:
        try:
            batch = [self.queue.get(timeout=IDLE_S)]
        except queue.Empty:
            batch = [Op(Kind.CHECKPOINT)]
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        outcomes: list[Outcome] = []
        signed: list[Checkpoint] = []
        running = True
        appends: list[Op] = []
        for op in batch:
            if op.kind is Kind.APPEND and running:
                appends.append(op)
                continue
            self._append(appends, outcomes, signed)
            appends = []
            if not running:
                outcomes.append(Outcome(op.token, error=EventLogError("the event log stopped")))
                continue
            outcomes.append(self._run(op, signed))
            running = op.kind is not Kind.STOP
        if running:
            self._append(appends, outcomes, signed)
        else:
            stopped = EventLogError("the event log stopped")
            outcomes.extend(Outcome(op.token, error=stopped) for op in appends)
        self.deliver(outcomes, self.writer.last_seq, signed)
        return running

    def _append(self, ops: list[Op], outcomes: list[Outcome], signed: list[Checkpoint]) -> None:
        if not ops:
            return
        try:
            seqs, checkpoint = self.writer.append([op.payload for op in ops])
        except Exception as exc:
            self.failures += len(ops)
            log.exception("event log: %d records could not be appended", len(ops))
            error = EventLogError(f"the event could not be appended: {exc}")
            outcomes.extend(Outcome(op.token, error=error) for op in ops)
            return
        self.transactions += 1
        outcomes.extend(Outcome(op.token, seq) for op, seq in zip(ops, seqs, strict=True))
        if checkpoint is not None:
            signed.append(checkpoint)

    def _run(self, op: Op, signed: list[Checkpoint]) -> Outcome:
        try:
            result: Any = None
            if op.kind is Kind.CHECKPOINT:
                result = self.writer.checkpoint()
            elif op.kind is Kind.SHRED:
                result = self.writer.shred(float(op.payload))
                if result is not None and result.anchor is not None:
                    signed.append(result.anchor)
                    return Outcome(op.token, result)
            elif op.kind is Kind.ERASE:
                result = self.writer.erase_principal(str(op.payload))
            elif op.kind is Kind.STOP:
                self.writer.checkpoint(force=True)
                return Outcome(op.token)
        except Exception as exc:
            log.exception("event log: %s failed", op.kind.value)
            return Outcome(op.token, error=EventLogError(f"{op.kind.value} failed: {exc}"))
        if isinstance(result, Checkpoint):
            signed.append(result)
        return Outcome(op.token, result)


def entry_op(entry: Entry, token: Any = None) -> Op:
    """An append operation."""
    return Op(Kind.APPEND, entry, token)
