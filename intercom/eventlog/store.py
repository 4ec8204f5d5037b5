"""The SQLite file of the event log: schema, pragmas and opening with the right key.

Only seq, epoch, nonce, ciphertext and chain hash of a record are in clear; wrapped keys
and signed checkpoints sit beside them. ``secure_delete`` zeroes deleted content in the
file, and a truncating WAL checkpoint follows every shred, so no file in the state
directory keeps a destroyed key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from intercom.eventlog.errors import EventLogError, MasterKeyError, NoLogError
from intercom.eventlog.keys import (
    Keyring,
    create_master_key,
    master_key_source,
    read_master_key,
)

log = logging.getLogger(__name__)

DB_FILE = "eventlog.db"
FORMAT = "intercom-eventlog/1"
BUSY_TIMEOUT_MS = 10_000
DEFAULT_EPOCH_S = 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS epoch_keys (epoch INTEGER PRIMARY KEY, wrapped BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS principal_keys (
    key_id BLOB PRIMARY KEY,
    lookup BLOB NOT NULL UNIQUE,
    wrapped BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    signed_at INTEGER NOT NULL,
    key TEXT NOT NULL,
    signature BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_epoch ON records (epoch);
"""


def db_path(state_dir: Path) -> Path:
    """Where the event log's database lives."""
    return state_dir / DB_FILE


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode with WAL, synchronous=FULL and secure_delete."""
    # Each connection is used by one thread at a time, not always the one that opened it.
    conn = sqlite3.connect(
        path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA secure_delete=ON")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise EventLogError(f"{path}: not a usable event log: {exc}") from exc
    if mode != "wal":
        conn.close()
        raise EventLogError(f"{path}: cannot switch to WAL (journal mode {mode})")
    return conn


def _meta(conn: sqlite3.Connection, name: str) -> bytes | None:
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else bytes(row[0])


def _has_meta(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    return row is not None and _meta(conn, "key_check") is not None


def epoch_seconds(conn: sqlite3.Connection) -> float:
    """The epoch length this log was made with (fixed for its life)."""
    value = _meta(conn, "epoch_seconds")
    return float(value.decode()) if value else DEFAULT_EPOCH_S


def open_log(
    state_dir: Path, *, create: bool, epoch_s: float = DEFAULT_EPOCH_S
) -> tuple[sqlite3.Connection, Keyring]:
    """Open the log with its master key; with ``create``, make both when there are none.

    A new log takes ``epoch_s`` as its epoch length, for good.

    A new master key is only ever made for a database that has never held one: a
    missing or wrong key for an existing log is a MasterKeyError, never a fresh start.
    """
    path = db_path(state_dir)
    if not path.exists():
        if not create:
            raise NoLogError(f"no event log at {path}")
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = os.umask(0o177)  # SQLite makes the file (and its -wal/-shm) 0600
        try:
            conn = connect(path)
        finally:
            os.umask(old)
    else:
        conn = connect(path)
    try:
        keyring = _open_keyring(conn, state_dir, create=create, epoch_s=epoch_s)
    except BaseException:
        conn.close()
        raise
    return conn, keyring


def _open_keyring(
    conn: sqlite3.Connection, state_dir: Path, *, create: bool, epoch_s: float
) -> Keyring:
    source = master_key_source(state_dir)
    if _has_meta(conn):
        keyring = Keyring(read_master_key(source))
        if _meta(conn, "key_check") != keyring.check:
            raise MasterKeyError(
                f"event log master key {source.path} does not open this log "
                f"({db_path(state_dir)}); refusing to continue"
            )
        return keyring
    if not create:
        raise NoLogError(f"the event log at {db_path(state_dir)} was never initialised")
    if source.path.exists() or source.credential:
        master = read_master_key(source)
    else:
        master = create_master_key(state_dir)
        log.info("event log: made a new master key in %s", source.path)
    keyring = Keyring(master)
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    with transaction(conn):
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT.encode(),))
        conn.execute(
            "INSERT OR REPLACE INTO meta VALUES ('epoch_seconds', ?)", (repr(epoch_s).encode(),)
        )
        conn.execute("INSERT INTO meta VALUES ('key_check', ?)", (keyring.check,))
    return keyring


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT (durable on return), ROLLBACK on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def truncate_wal(conn: sqlite3.Connection) -> bool:
    """Copy the WAL into the database and truncate it, so old page images go.

    False when a reader kept it from completing (the caller retries).
    """
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as exc:
        log.warning("event log: WAL checkpoint failed: %s", exc)
        return False
    if busy:
        log.info("event log: WAL checkpoint incomplete (a reader was busy); will retry")
    return not busy
