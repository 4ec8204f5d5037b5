"""Data subject rights: export everything held about a principal, or erase it for good.

Export writes the registry entry, the events whose personal fields name the principal,
and (for a resident) the snapshots of rings of their flats, as JSON and JPEG files.
Erase deletes the registry entry (public key, TOTP secret, guards) and destroys the
principal's key in the event log: their personal fields become unreadable in every
record, while the records themselves, and so the hash chain and ``log verify``, stay.
Both are logged as a PrivilegedAction naming who did them. The registry entry and the
erase go through the station (``intercom.admin``): the running one, or the command
itself under the instance lock; the event log is read here through SQLite.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from intercom.eventlog.errors import NoLogError
from intercom.eventlog.reader import LogReader, Query
from intercom.eventlog.store import open_log
from intercom.privacy.snapshots import read_snapshots
from intercom.safefiles import make_private_dir, write_new


@dataclass
class ExportReport:
    """What an export wrote."""

    found: bool
    events: int = 0
    snapshots: int = 0
    files: list[Path] = field(default_factory=list)
    logged_seq: int | None = None


REGISTRY_FIELDS = ("id", "role", "flats", "doors", "public_key", "valid_from", "valid_until",
                   "revoked_at", "created_at")


def registry_entry(principal: dict[str, Any]) -> dict[str, Any]:
    """A principal's registry entry as JSON (the TOTP secret stays sealed, not exported)."""
    entry = {k: principal.get(k) for k in REGISTRY_FIELDS}
    entry["totp_secret"] = "held sealed at the station; not exported (a credential)"  # noqa: S105
    return entry


def open_reader(state_dir: Path) -> LogReader | None:
    """A reader of the state dir's event log, or None when there is none."""
    try:
        conn, keyring = open_log(state_dir, create=False)
    except NoLogError:
        return None
    return LogReader(conn, keyring)


def _write(path: Path, data: bytes) -> Path:
    return write_new(path.parent, path.name, data)  # a new 0600 file, never through a link


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def export_principal(
    state_dir: Path, pid: str, out: Path, actor: str, principal: dict[str, Any] | None
) -> ExportReport:
    """Write what is held about ``pid`` (``principal``: its registry entry) into ``out``.

    The caller logs the export (``audit`` request) once it is written.
    """
    reader = open_reader(state_dir)
    events: list[dict[str, Any]] = []
    snapshots = []
    try:
        if reader is not None:
            events = [e.to_dict() for e in reader.query(Query(principal=pid))]
            if principal is not None and principal.get("role") == "resident":
                flats = frozenset(principal.get("flats") or ())
                snapshots = list(read_snapshots(reader, "resident", flats=flats))
    finally:
        if reader is not None:
            reader.conn.close()
    found = principal is not None or bool(events)
    make_private_dir(out)  # new, 0700: an existing folder or link is refused
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
    return report
