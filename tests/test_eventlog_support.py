"""Helpers shared by the event log tests (no tests here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from intercom.config import EventLogConfig
from intercom.eventlog import EventLog
from intercom.eventlog.reader import LogReader
from intercom.eventlog.store import open_log
from intercom.eventlog.verify import Verdict, verify
from intercom.events import Event, EventBus
from intercom.identity import StationIdentity, create_identity

T0 = 1_800_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True, kw_only=True)
class VisitorNamed(Event):
    """A test event that names a person besides the principal."""

    personal_fields: ClassVar[tuple[str, ...]] = ("principal", "name")
    principal: str
    name: str
    door: str


def make_log(
    state: Path,
    bus: EventBus | None = None,
    clock: Clock | None = None,
    **config: float,
) -> EventLog:
    identity = create_identity(state)
    return EventLog(
        state,
        identity,
        bus or EventBus(),
        EventLogConfig.model_validate(config),
        clock or Clock(),
    )


def check(state: Path, identity: StationIdentity | None = None, **kwargs: object) -> Verdict:
    """Verify the log in ``state`` with keys (as the CLI does)."""
    identity = identity or create_identity(state)
    conn, keyring = open_log(state, create=False)
    try:
        return verify(conn, identity.public_key, reader=LogReader(conn, keyring), **kwargs)  # type: ignore[arg-type]
    finally:
        conn.close()


def all_bytes(state: Path) -> bytes:
    """Every byte of every file under the state directory."""
    return b"".join(p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file())
