"""Reading the log back: decrypting records, filtered by seq, time, type or principal."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from intercom.eventlog.errors import MasterKeyError
from intercom.eventlog.keys import NONCE_BYTES, Keyring, epoch_aad, principal_aad
from intercom.eventlog.records import LoggedEvent, decode, record_aad, unreadable

BATCH = 500


@dataclass(frozen=True)
class Query:
    """Which records to read; every field that is set must match."""

    since: float | None = None
    until: float | None = None
    types: frozenset[str] = frozenset()
    principal: str | None = None


class LogReader:
    """Decrypts records through its own connection (a WAL reader beside the writer)."""

    def __init__(self, conn: sqlite3.Connection, keyring: Keyring) -> None:
        self.conn = conn
        self.keyring = keyring

    def _epoch_cipher(self, epoch: int, cache: dict[int, AESGCM | None]) -> AESGCM | None:
        if epoch not in cache:
            row = self.conn.execute(
                "SELECT wrapped FROM epoch_keys WHERE epoch = ?", (epoch,)
            ).fetchone()
            wrapped = None if row is None else bytes(row[0])
            cache[epoch] = None if wrapped is None else self.keyring.aead(wrapped, epoch_aad(epoch))
        return cache[epoch]

    def _principal_cipher(self, key_id: bytes) -> AESGCM | None:
        row = self.conn.execute(
            "SELECT wrapped FROM principal_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        if row is None:
            return None
        return self.keyring.aead(bytes(row[0]), principal_aad(key_id))

    def principal_key_id(self, principal_id: str) -> bytes | None:
        """The key id of a principal's personal fields (None: never seen, or erased)."""
        row = self.conn.execute(
            "SELECT key_id FROM principal_keys WHERE lookup = ?",
            (self.keyring.principal_lookup(principal_id),),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _rows(self, after: int, limit: int | None) -> Iterator[tuple[int, int, bytes, bytes]]:
        """Raw rows with seq > after, ascending, fetched in batches."""
        remaining = limit
        while remaining is None or remaining > 0:
            size = BATCH if remaining is None else min(BATCH, remaining)
            rows = self.conn.execute(
                "SELECT seq, epoch, nonce, ciphertext FROM records WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after, size),
            ).fetchall()
            yield from rows
            if len(rows) < size:
                return
            after = rows[-1][0]
            if remaining is not None:
                remaining -= len(rows)

    def _decrypt(
        self, row: tuple[int, int, bytes, bytes], cache: dict[int, AESGCM | None]
    ) -> tuple[LoggedEvent, bytes]:
        seq, epoch, nonce, ciphertext = row
        try:
            cipher = self._epoch_cipher(epoch, cache)
        except MasterKeyError:
            return unreadable(seq, "its epoch key does not open"), b""
        if cipher is None:
            return unreadable(seq, "its epoch key is gone"), b""
        try:
            plain = cipher.decrypt(bytes(nonce), bytes(ciphertext), record_aad(seq, epoch))
        except InvalidTag:
            return unreadable(seq, "it does not authenticate (altered?)"), b""
        try:
            return decode(seq, plain, self._principal_lookup)
        except (ValueError, KeyError, TypeError) as exc:
            return unreadable(seq, f"malformed content: {exc}"), b""

    def _principal_lookup(self, key_id: bytes) -> AESGCM | None:
        try:
            return self._principal_cipher(key_id)
        except MasterKeyError:
            return None

    def read_after(self, seq: int, limit: int = 500) -> list[LoggedEvent]:
        """Up to ``limit`` records with a seq above ``seq``, ascending."""
        cache: dict[int, AESGCM | None] = {}
        return [self._decrypt(row, cache)[0] for row in self._rows(seq, limit)]

    def query(self, query: Query) -> Iterator[LoggedEvent]:
        """Every record that matches ``query``, ascending."""
        key_id = b""
        if query.principal is not None:
            found = self.principal_key_id(query.principal)
            if found is None:
                return
            key_id = found
        cache: dict[int, AESGCM | None] = {}
        for row in self._rows(0, None):
            event, owner = self._decrypt(row, cache)
            if query.principal is not None and owner != key_id:
                continue
            if query.types and event.type not in query.types:
                continue
            if query.since is not None and event.at < query.since:
                continue
            if query.until is not None and event.at > query.until:
                continue
            yield event

    def authenticates(
        self,
        seq: int,
        epoch: int,
        nonce: bytes,
        ciphertext: bytes,
        cache: dict[int, AESGCM | None] | None = None,
    ) -> bool:
        """Whether a record's ciphertext is genuine for its seq and epoch."""
        cache = {} if cache is None else cache
        try:
            cipher = self._epoch_cipher(epoch, cache)
        except MasterKeyError:
            return False
        if cipher is None or len(nonce) != NONCE_BYTES:
            return False
        try:
            cipher.decrypt(nonce, ciphertext, record_aad(seq, epoch))
        except InvalidTag:
            return False
        return True

    def stats(self) -> dict[str, int]:
        """Record count and the first and last seq kept."""
        count, first, last = self.conn.execute(
            "SELECT count(*), min(seq), max(seq) FROM records"
        ).fetchone()
        return {"records": int(count), "first_seq": int(first or 0), "last_seq": int(last or 0)}


def to_jsonl(event: LoggedEvent) -> str:
    """One export line."""
    return json.dumps(event.to_dict(), separators=(",", ":"), sort_keys=False)
