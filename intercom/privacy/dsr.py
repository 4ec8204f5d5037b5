"""Data subject rights: export everything held about a principal, or erase it for good.

Export writes the registry entry, the events whose personal fields name the principal,
and (for a resident) the snapshots of rings of their flats, as JSON and JPEG files.
Erase deletes the registry entry (public key, TOTP secret, guards) and destroys the
principal's key in the event log: their personal fields become unreadable in every
record, while the records themselves, and so the hash chain and ``log verify``, stay.
Both are logged as a PrivilegedAction naming who did them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intercom.config import EventLogConfig
from intercom.errors import IntercomError
from intercom.eventlog.errors import NoLogError
from intercom.eventlog.reader import LogReader, Query
from intercom.eventlog.store import open_log
from intercom.eventlog.writer import LogWriter
from intercom.events import PrivilegedAction
from intercom.identity import load_or_create_identity
from intercom.privacy.audit import log_action
from intercom.privacy.snapshots import read_snapshots
from intercom.security.principals import Principal, Role
from intercom.security.store import DB_NAME, PrincipalStore


@dataclass
class ExportReport:
    """What an export wrote."""

    found: bool
    events: int = 0
    snapshots: int = 0
    files: list[Path] = field(default_factory=list)
    logged_seq: int | None = None


@dataclass
class EraseReport:
    """What an erase destroyed."""

    registry: bool
    log_key: bool
    logged_seq: int | None = None


def registry_entry(principal: Principal) -> dict[str, Any]:
    """A principal's registry entry as JSON (the TOTP secret stays sealed, not exported)."""
    return {
        "id": principal.id,
        "role": principal.role.value,
        "flats": list(principal.flats),
        "doors": list(principal.doors),
        "public_key": principal.jwk,
        "valid_from": principal.valid_from,
        "valid_until": principal.valid_until,
        "revoked_at": principal.revoked_at,
        "created_at": principal.created_at,
        "totp_secret": "held sealed at the station; not exported (a credential)",
    }


def open_reader(state_dir: Path) -> LogReader | None:
    """A reader of the state dir's event log, or None when there is none."""
    try:
        conn, keyring = open_log(state_dir, create=False)
    except NoLogError:
        return None
    return LogReader(conn, keyring)


def _write(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def export_principal(state_dir: Path, pid: str, out: Path, actor: str) -> ExportReport:
    """Write what is held about ``pid`` into ``out`` (made 0700); log who exported it."""
    principal = None
    if (state_dir / DB_NAME).exists():  # never make a registry where there is none
        store = PrincipalStore(state_dir)
        try:
            principal = store.get(pid)
        finally:
            store.close()
    reader = open_reader(state_dir)
    events: list[dict[str, Any]] = []
    snapshots = []
    try:
        if reader is not None:
            events = [e.to_dict() for e in reader.query(Query(principal=pid))]
            if principal is not None and principal.role is Role.RESIDENT:
                flats = frozenset(principal.flats)
                snapshots = list(read_snapshots(reader, "resident", flats=flats))
    finally:
        if reader is not None:
            reader.conn.close()
    found = principal is not None or bool(events)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise IntercomError(f"cannot make {out}: {exc.strerror or exc}") from exc
    report = ExportReport(found=found, events=len(events), snapshots=len(snapshots))
    manifest = {
        "principal": pid,
        "exported_at": time.time(),
        "exported_by": actor,
        "found": found,
        "contents": {
            "principal.json": "the registry entry (null: none held)",
            "events.json": "every event-log record whose personal fields name the principal",
            "snapshots.json": "snapshots of rings of the principal's flats; images beside it",
        },
    }
    report.files.append(_write(out / "manifest.json", _json(manifest)))
    entry = registry_entry(principal) if principal is not None else None
    report.files.append(_write(out / "principal.json", _json(entry)))
    report.files.append(_write(out / "events.json", _json(events)))
    metas = []
    for snap in snapshots:
        name = f"snapshot-{snap.seq}.jpg"
        report.files.append(_write(out / name, snap.jpeg))
        metas.append({**snap.meta(), "file": name})
    report.files.append(_write(out / "snapshots.json", _json(metas)))
    # Name the target only when it exists: logging an unknown id would create data.
    action = PrivilegedAction(actor=actor, action="export", target=pid if found else "",
                              detail=f"{len(events)} events, {len(snapshots)} snapshots")
    report.logged_seq = log_action(state_dir, action)
    return report


def erase_principal(state_dir: Path, pid: str, actor: str) -> EraseReport:
    """Delete ``pid`` from the registry and destroy their key in the log; log the erase."""
    registry = False
    if (state_dir / DB_NAME).exists():
        store = PrincipalStore(state_dir)
        try:
            registry = store.erase(pid)
            store.sync()
        finally:
            store.close()
    log_key = False
    try:
        conn, keyring = open_log(state_dir, create=False)
    except NoLogError:
        conn = None
    if conn is not None:
        writer = LogWriter(conn, keyring, load_or_create_identity(state_dir), EventLogConfig())
        try:
            log_key = writer.erase_principal(pid)
        finally:
            writer.close()
    report = EraseReport(registry=registry, log_key=log_key)
    if not registry and not log_key:
        return report
    # The erased id is not named: that would make new personal data about them.
    detail = ("registry entry deleted; " if registry else "") + (
        "event-log key destroyed" if log_key else "no event-log key held"
    )
    report.logged_seq = log_action(
        state_dir, PrivilegedAction(actor=actor, action="erase", detail=detail)
    )
    return report
