"""``intercom log``: show, verify, export and purge the event log (read beside the daemon)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from intercom.cli.common import add_state_dir, ask, station_dir
from intercom.errors import ConfigError
from intercom.eventlog import checkpoints
from intercom.eventlog.errors import MasterKeyError, NoLogError
from intercom.eventlog.reader import LogReader, Query, to_jsonl
from intercom.eventlog.records import LoggedEvent
from intercom.eventlog.store import connect, db_path, open_log
from intercom.eventlog.verify import verify
from intercom.identity import StationIdentity, load_identity

RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``log show|verify|export|purge|checkpoint``."""
    parser = sub.add_parser(
        "log",
        help="read, verify, export or purge the event log",
        description="The encrypted, hash-chained event log in the state directory. Reading "
        "(show, verify, export, checkpoint) opens the database through SQLite beside a "
        "running station; purge asks the station to shred (or, with none running, "
        "shreds under the state directory's lock).",
    )
    cmds = parser.add_subparsers(dest="log_command", metavar="ACTION", required=True)

    show = cmds.add_parser("show", help="print decrypted events",
                           description="Print decrypted events, oldest first.")
    show.add_argument("--since", type=when, help="from this time: unix seconds, ISO 8601 or "
                      "an age such as 30m, 2h, 7d")
    show.add_argument("--until", type=when, help="up to this time (same forms)")
    show.add_argument("--type", action="append", default=[], dest="types",
                      help="only events of this type (repeatable)")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    add_state_dir(show)
    show.set_defaults(func=cmd_show)

    check = cmds.add_parser(
        "verify", help="check the hash chain and the signed checkpoints",
        description="Check the hash chain and every signed checkpoint; with the master key, "
        "also authenticate the records no checkpoint covers. Exit 1 names the first bad seq.",
    )
    check.add_argument("--checkpoint", type=Path, metavar="FILE",
                       help="a checkpoint kept elsewhere (JSON, e.g. from MQTT): detects a "
                       "truncated tail")
    check.add_argument("--deep", action="store_true",
                       help="authenticate every record's ciphertext, not only the tail")
    check.add_argument("--json", action="store_true", help="print the verdict as JSON")
    add_state_dir(check)
    check.set_defaults(func=cmd_verify)

    export = cmds.add_parser("export", help="write decrypted events as JSON lines",
                             description="Write decrypted events, one JSON object per line.")
    export.add_argument("--format", choices=["jsonl"], default="jsonl", help="output format")
    export.add_argument("--principal", metavar="ID", help="only events about this principal")
    export.add_argument("--output", type=Path, help="write to this file (mode 0600), not stdout")
    add_state_dir(export)
    export.set_defaults(func=cmd_export)

    purge = cmds.add_parser(
        "purge", help="shred epochs older than a number of hours",
        description="Delete every epoch that ended more than HOURS ago, with its key "
        "(crypto-shredding), and log the purge as a LogPurged event.",
    )
    purge.add_argument("--older-than", type=float, required=True, metavar="HOURS",
                       help="shred epochs that ended more than this many hours ago")
    add_state_dir(purge)
    purge.set_defaults(func=cmd_purge)

    latest = cmds.add_parser("checkpoint", help="print the newest signed checkpoint (JSON)",
                             description="Print the newest signed checkpoint, to keep as a "
                             "witness for 'log verify --checkpoint'.")
    add_state_dir(latest)
    latest.set_defaults(func=cmd_checkpoint)


def when(text: str) -> float:
    """A time from unix seconds, ISO 8601, or an age like ``2h`` (before now)."""
    if match := RELATIVE.match(text):
        return time.time() - float(match[1]) * UNITS[match[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from exc
    return moment.timestamp()


def _identity(state: Path) -> StationIdentity:
    return load_identity(state)


def _reader(state: Path) -> LogReader:
    conn, keyring = open_log(state, create=False)
    return LogReader(conn, keyring)


def _line(event: LoggedEvent) -> str:
    stamp = datetime.fromtimestamp(event.at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
    details = " ".join(f"{k}={_show(v)}" for k, v in event.details.items())
    return f"{event.seq:>8}  {stamp}  {event.type:<20} {details}"


def _show(value: Any) -> str:
    return "<erased>" if value is None else json.dumps(value) if not isinstance(value, str) \
        else value


def cmd_show(args: argparse.Namespace) -> int:
    """Print decrypted events."""
    reader = _reader(station_dir(args))
    query = Query(since=args.since, until=args.until, types=frozenset(args.types))
    for event in reader.query(query):
        print(to_jsonl(event) if args.json else _line(event))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check chain and checkpoints; exit 1 naming the first bad seq."""
    state = station_dir(args)
    public_key: Ed25519PublicKey = _identity(state).public_key
    witness = checkpoints.load_file(args.checkpoint) if args.checkpoint else None
    reader: LogReader | None = None
    try:
        reader = _reader(state)
        conn = reader.conn
    except MasterKeyError as exc:
        print(f"intercom: {exc}; checking the chain without authenticating records",
              file=sys.stderr)
        if not db_path(state).exists():
            raise NoLogError(f"no event log at {db_path(state)}") from exc
        conn = connect(db_path(state))
    try:
        verdict = verify(conn, public_key, witness=witness, reader=reader, deep=args.deep)
    except sqlite3.DatabaseError as exc:
        print(f"TAMPERED: the database is damaged: {exc}")
        return 1
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    elif verdict.ok:
        print(f"ok: {verdict.records} records (seq {verdict.first_seq}-{verdict.last_seq}), "
              f"{verdict.checkpoints} signed checkpoints, {verdict.authenticated} records "
              "authenticated by key")
    else:
        where = f"first bad seq {verdict.bad_seq}: " if verdict.bad_seq is not None else ""
        print(f"TAMPERED: {where}{verdict.problem}")
    for note in verdict.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0 if verdict.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    """Write JSON lines."""
    reader = _reader(station_dir(args))
    if args.principal is not None and reader.principal_key_id(args.principal) is None:
        print("intercom: the log holds no key for this principal (never seen, or erased)",
              file=sys.stderr)
    events = reader.query(Query(principal=args.principal))
    if args.output is None:
        for event in events:
            print(to_jsonl(event))
        return 0
    fd = _create_private(args.output)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        for event in events:
            out.write(to_jsonl(event) + "\n")
    return 0


def _create_private(path: Path) -> int:
    from intercom.safefiles import create_new  # noqa: PLC0415

    return create_new(path)  # a new 0600 file: an existing file or link is refused


def cmd_purge(args: argparse.Namespace) -> int:
    """Shred old epochs and log the purge (by the station, or here under its lock)."""
    if args.older_than < 0:
        raise ConfigError(["--older-than: must be 0 or more hours"])
    answer = ask(station_dir(args), {"request": "log-purge", "hours": args.older_than})
    through = answer["through_seq"]
    print(f"shredded {answer['epochs']} epochs, {answer['records']} records"
          + (f" (through seq {through})" if through else "")
          + f"; logged as seq {answer['logged_seq']}")
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Print the newest checkpoint."""
    state = station_dir(args)
    if not db_path(state).exists():
        raise NoLogError(f"no event log at {db_path(state)}")
    conn = connect(db_path(state))
    latest = checkpoints.latest(conn)
    if latest is None:
        print("intercom: the log has no signed checkpoint yet", file=sys.stderr)
        return 1
    print(json.dumps(latest.to_dict()))
    return 0
