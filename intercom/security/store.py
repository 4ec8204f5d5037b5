"""``STATE_DIR/principals.db``: principals, their secrets, guards, push subscriptions.

Also the command ids seen. TOTP secrets and Web Push subscriptions are sealed.

One SQLite file (WAL, ``synchronous=FULL``: a commit is durable when it returns), with
one owner: the running station's registry (``intercom.security.registry``), or a
command run while no station runs, under the instance lock. Nothing else opens,
closes, renames or syncs the file or its ``-wal``/``-shm``: SQLite does all of that.
The calls here block (fsync); the registry runs them in its own thread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intercom.errors import IntercomError
from intercom.security.principals import Principal, PrincipalError, Role
from intercom.security.secretbox import SecretBox

DB_NAME = "principals.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS principals (
    id TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    flats TEXT NOT NULL,
    doors TEXT NOT NULL,
    jwk TEXT NOT NULL,
    totp_sealed BLOB NOT NULL,
    valid_from REAL NOT NULL,
    valid_until REAL,
    revoked_at REAL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS guards (
    principal TEXT PRIMARY KEY,
    failures INTEGER NOT NULL DEFAULT 0,
    blocked_until REAL NOT NULL DEFAULT 0,
    last_step INTEGER NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS seen_jti (
    jti TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    keep_until REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_jti_keep ON seen_jti (keep_until);
CREATE TABLE IF NOT EXISTS push_subscriptions (
    principal TEXT PRIMARY KEY,
    sealed BLOB NOT NULL,
    updated_at REAL NOT NULL
);
"""


class StoreError(IntercomError):
    """The principals database cannot be opened or changed as asked."""


@dataclass
class Guard:
    """Per-principal defence state: consecutive TOTP failures, backoff, last used step."""

    failures: int = 0
    blocked_until: float = 0.0
    last_step: int = -1


class PrincipalStore:
    """The principals database of one state directory."""

    def __init__(self, state_dir: Path, key: bytes, *, create: bool = False) -> None:
        self.path = state_dir / DB_NAME
        if not create and not self.path.exists():
            raise StoreError(f"no principals database {self.path}")
        self.box = SecretBox(key)
        old = os.umask(0o177)  # SQLite makes the file and its -wal/-shm: 0600
        try:
            # One connection, used by one thread at a time (the registry's worker).
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 5000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")  # durable at each commit
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        finally:
            os.umask(old)

    def close(self) -> None:
        """Close the database (SQLite checkpoints and removes the WAL when it may)."""
        self._db.close()

    # --- principals --------------------------------------------------------------------

    def add(self, principal: Principal, totp_secret: str) -> None:
        """Register a principal with its TOTP secret (sealed); refuse a taken id."""
        sealed = self.box.seal(totp_secret.encode(), principal.id)
        try:
            self._db.execute(
                "INSERT INTO principals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    principal.id,
                    principal.role.value,
                    json.dumps(list(principal.flats)),
                    json.dumps(list(principal.doors)),
                    json.dumps(principal.jwk, sort_keys=True),
                    sealed,
                    principal.valid_from,
                    principal.valid_until,
                    principal.revoked_at,
                    principal.created_at or time.time(),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"principal {principal.id!r} exists already") from exc

    def principals(self) -> list[Principal]:
        """Every principal, revoked ones included, by id."""
        rows = self._db.execute(
            "SELECT id, role, flats, doors, jwk, valid_from, valid_until, revoked_at, created_at"
            " FROM principals ORDER BY id"
        ).fetchall()
        return [_principal(row) for row in rows]

    def get(self, pid: str) -> Principal | None:
        """One principal, or None."""
        return next((p for p in self.principals() if p.id == pid), None)

    def totp_secret(self, pid: str) -> str:
        """The principal's TOTP secret, unsealed."""
        row = self._db.execute(
            "SELECT totp_sealed FROM principals WHERE id = ?", (pid,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no principal {pid!r}")
        return self.box.open(bytes(row[0]), pid).decode()

    def revoke(self, pid: str, now: float) -> bool:
        """Mark a principal revoked; False when it was revoked already."""
        if self.get(pid) is None:
            raise StoreError(f"no principal {pid!r}")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "UPDATE principals SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, pid),
            )
            # A revoked device is never pushed to again: its subscription goes with it.
            self._db.execute("DELETE FROM push_subscriptions WHERE principal = ?", (pid,))
        return cur.rowcount == 1

    def set_valid_until(self, pid: str, until: float) -> None:
        """Move a principal's expiry (an installer's time box extended or cut short)."""
        principal = self.get(pid)
        if principal is None:
            raise StoreError(f"no principal {pid!r}")
        if until <= principal.valid_from:
            raise StoreError("valid-until must be after valid-from")
        self._db.execute("UPDATE principals SET valid_until = ? WHERE id = ?", (until, pid))

    def erase(self, pid: str) -> bool:
        """Delete a principal with its key, TOTP secret, guard and used command ids.

        The freed pages are zeroed and the WAL truncated, so the row does not linger.
        """
        self._db.execute("PRAGMA secure_delete = ON")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute("DELETE FROM principals WHERE id = ?", (pid,))
            self._db.execute("DELETE FROM guards WHERE principal = ?", (pid,))
            self._db.execute("DELETE FROM seen_jti WHERE principal = ?", (pid,))
            self._db.execute("DELETE FROM push_subscriptions WHERE principal = ?", (pid,))
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return cur.rowcount == 1

    # --- Web Push subscriptions ---------------------------------------------------------

    def push_subscriptions(self) -> dict[str, dict[str, Any]]:
        """Each principal's push subscription (endpoint and keys), unsealed."""
        rows = self._db.execute("SELECT principal, sealed FROM push_subscriptions").fetchall()
        return {
            str(pid): json.loads(self.box.open(bytes(sealed), f"push:{pid}"))
            for pid, sealed in rows
        }

    def set_push(self, pid: str, subscription: dict[str, Any], now: float) -> None:
        """Keep (or replace) the principal's push subscription, sealed."""
        if self.get(pid) is None:
            raise StoreError(f"no principal {pid!r}")
        sealed = self.box.seal(json.dumps(subscription, sort_keys=True).encode(), f"push:{pid}")
        self._db.execute(
            "INSERT INTO push_subscriptions VALUES (?, ?, ?) ON CONFLICT (principal) DO UPDATE"
            " SET sealed = excluded.sealed, updated_at = excluded.updated_at",
            (pid, sealed, now),
        )

    def drop_push(self, pid: str) -> bool:
        """Forget the principal's push subscription; False when it had none."""
        cur = self._db.execute("DELETE FROM push_subscriptions WHERE principal = ?", (pid,))
        return cur.rowcount == 1

    # --- guards and seen command ids ----------------------------------------------------

    def guards(self) -> dict[str, Guard]:
        """The defence state of every principal that has one."""
        rows = self._db.execute("SELECT principal, failures, blocked_until, last_step FROM guards")
        return {r[0]: Guard(int(r[1]), float(r[2]), int(r[3])) for r in rows}

    def reset_guard(self, pid: str) -> None:
        """Clear a principal's failure count and backoff (after a lockout)."""
        if self.get(pid) is None:
            raise StoreError(f"no principal {pid!r}")
        self._db.execute(
            "UPDATE guards SET failures = 0, blocked_until = 0 WHERE principal = ?", (pid,)
        )

    def seen(self, now: float) -> dict[str, float]:
        """Every command id still kept (used before ``keep_until``), with its keeping time."""
        rows = self._db.execute("SELECT jti, keep_until FROM seen_jti WHERE keep_until >= ?",
                                (now,))
        return {str(r[0]): float(r[1]) for r in rows}

    def record(self, pid: str, guard: Guard, jti: str, keep_until: float) -> None:
        """Durably store a used command id and the principal's guard, in one transaction."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR IGNORE INTO seen_jti VALUES (?, ?, ?)", (jti, pid, keep_until)
            )
            self._db.execute(
                "INSERT INTO guards VALUES (?, ?, ?, ?) ON CONFLICT (principal) DO UPDATE SET"
                " failures = excluded.failures, blocked_until = excluded.blocked_until,"
                " last_step = excluded.last_step",
                (pid, guard.failures, guard.blocked_until, guard.last_step),
            )

    def purge(self, now: float) -> int:
        """Forget command ids past their keeping time; how many were dropped."""
        return self._db.execute("DELETE FROM seen_jti WHERE keep_until < ?", (now,)).rowcount


def _principal(row: tuple[Any, ...]) -> Principal:
    try:
        return Principal(
            id=row[0],
            role=Role(row[1]),
            flats=tuple(json.loads(row[2])),
            doors=tuple(json.loads(row[3])),
            jwk=json.loads(row[4]),
            valid_from=row[5],
            valid_until=row[6],
            revoked_at=row[7],
            created_at=row[8],
        )
    except (PrincipalError, ValueError) as exc:
        raise StoreError(f"principal {row[0]!r} in the database is invalid: {exc}") from exc
