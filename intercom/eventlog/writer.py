"""Every write to the log: appends (many per transaction), checkpoints, shreds, erasures.

The writer reads the chain head inside each ``BEGIN IMMEDIATE`` transaction, so a second
process (``intercom log purge`` beside the daemon) can write without forking the chain.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from intercom.config import EventLogConfig
from intercom.eventlog import checkpoints
from intercom.eventlog.checkpoints import Checkpoint
from intercom.eventlog.keys import Keyring, epoch_aad, new_key, principal_aad, seal
from intercom.eventlog.records import ZERO_HASH, Entry, chain_hash, encode, record_aad
from intercom.eventlog.store import epoch_seconds, transaction, truncate_wal
from intercom.identity import StationIdentity

log = logging.getLogger(__name__)

KEY_ID_BYTES = 16
CHECKPOINT_TYPE = "LogCheckpoint"


@dataclass(frozen=True)
class Shredded:
    """What one shred removed: whole epochs, their records, through which seq."""

    epochs: int
    records: int
    through_seq: int
    anchor: Checkpoint | None


class LogWriter:
    """Writes to one log database through one connection (one thread at a time)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        keyring: Keyring,
        identity: StationIdentity,
        config: EventLogConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conn = conn
        self.keyring = keyring
        self.identity = identity
        self.config = config
        self.clock = clock
        self.epoch_s = epoch_seconds(conn)
        self.opened_at = clock()
        self.last_seq = self._head()[0]
        # Records other than our own LogCheckpoint events since the last checkpoint.
        self._dirty = True
        # The WAL still holds page images of something shredded or erased.
        self.wal_pending = False

    def _head(self) -> tuple[int, bytes, int]:
        """Seq, chain hash and epoch of the newest record (or of the shred anchor)."""
        row = self.conn.execute(
            "SELECT seq, hash, epoch FROM records ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            return int(row[0]), bytes(row[1]), int(row[2])
        anchor = checkpoints.latest(self.conn)
        if anchor is not None:
            return anchor.seq, anchor.hash, 0
        return 0, ZERO_HASH, 0

    def _epoch_cipher(self, epoch: int) -> AESGCM:
        row = self.conn.execute(
            "SELECT wrapped FROM epoch_keys WHERE epoch = ?", (epoch,)
        ).fetchone()
        if row is None:
            wrapped = self.keyring.wrap(new_key(), epoch_aad(epoch))
            self.conn.execute("INSERT INTO epoch_keys VALUES (?, ?)", (epoch, wrapped))
        else:
            wrapped = bytes(row[0])
        return self.keyring.aead(wrapped, epoch_aad(epoch))

    def _principal_cipher(self, principal_id: str) -> tuple[bytes, AESGCM]:
        lookup = self.keyring.principal_lookup(principal_id)
        row = self.conn.execute(
            "SELECT key_id, wrapped FROM principal_keys WHERE lookup = ?", (lookup,)
        ).fetchone()
        if row is None:
            key_id = os.urandom(KEY_ID_BYTES)
            wrapped = self.keyring.wrap(new_key(), principal_aad(key_id))
            self.conn.execute(
                "INSERT INTO principal_keys VALUES (?, ?, ?)", (key_id, lookup, wrapped)
            )
        else:
            key_id, wrapped = bytes(row[0]), bytes(row[1])
        return key_id, self.keyring.aead(wrapped, principal_aad(key_id))

    def append(self, entries: Sequence[Entry]) -> tuple[list[int], Checkpoint | None]:
        """Append entries in one transaction; durable when this returns."""
        now = self.clock()
        with transaction(self.conn):
            seq, digest, last_epoch = self._head()
            epoch = max(math.floor(now / self.epoch_s), last_epoch)
            cipher = self._epoch_cipher(epoch)
            principals: dict[str, tuple[bytes, AESGCM]] = {}
            rows = []
            seqs = []
            for entry in entries:
                seq += 1
                owner = entry.owner()
                principal = None
                if owner is not None:
                    principal = principals.get(owner) or self._principal_cipher(owner)
                    principals[owner] = principal
                nonce, ciphertext = seal(
                    cipher, encode(entry, seq, principal), record_aad(seq, epoch)
                )
                digest = chain_hash(digest, seq, epoch, nonce, ciphertext)
                rows.append((seq, epoch, nonce, ciphertext, digest))
                seqs.append(seq)
                if entry.type != CHECKPOINT_TYPE:
                    self._dirty = True
            self.conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?)", rows)
            checkpoint = self._checkpoint_if_due(seq, digest, now)
        self.last_seq = seq
        return seqs, checkpoint

    def _checkpoint_if_due(self, seq: int, digest: bytes, now: float) -> Checkpoint | None:
        last = checkpoints.latest(self.conn)
        last_seq = last.seq if last else 0
        if not self._dirty or seq <= last_seq:
            return None
        since = last.signed_at if last else self.opened_at
        if (
            seq - last_seq < self.config.checkpoint_every
            and now - since < self.config.checkpoint_minutes * 60
        ):
            return None
        checkpoint = checkpoints.sign(self.identity, seq, digest, now)
        checkpoints.store(self.conn, checkpoint)
        self._dirty = False
        return checkpoint

    def checkpoint(self, *, force: bool = False) -> Checkpoint | None:
        """Sign the head when a checkpoint is due (or, with ``force``, if not yet signed).

        Also retries truncating the WAL after a shred or erasure a reader held up.
        """
        if self.wal_pending:
            self.wal_pending = not truncate_wal(self.conn)
        if not force and not self._dirty:
            return None
        now = self.clock()
        with transaction(self.conn):
            seq, digest, _ = self._head()
            if force:
                last = checkpoints.latest(self.conn)
                if seq == 0 or (last is not None and last.seq >= seq):
                    return None
                checkpoint = checkpoints.sign(self.identity, seq, digest, now)
                checkpoints.store(self.conn, checkpoint)
                return checkpoint
            return self._checkpoint_if_due(seq, digest, now)

    def expired_through(self, older_than_s: float) -> int:
        """The newest epoch that ended more than ``older_than_s`` ago."""
        return math.floor((self.clock() - older_than_s) / self.epoch_s) - 1

    def shred(self, older_than_s: float) -> Shredded | None:
        """Delete every epoch that ended ``older_than_s`` ago: its records and its key."""
        through = self.expired_through(older_than_s)
        with transaction(self.conn):
            keys = [
                bytes(row[0])
                for row in self.conn.execute(
                    "SELECT wrapped FROM epoch_keys WHERE epoch <= ?", (through,)
                )
            ]
            seq, count = self.conn.execute(
                "SELECT max(seq), count(*) FROM records WHERE epoch <= ?", (through,)
            ).fetchone()
            if not keys and not count:
                return None
            anchor = None
            if seq is not None:
                anchor = self._anchor(int(seq))
                self.conn.execute("DELETE FROM records WHERE seq <= ?", (seq,))
                self.conn.execute("DELETE FROM checkpoints WHERE seq < ?", (seq,))
            self.conn.execute("DELETE FROM epoch_keys WHERE epoch <= ?", (through,))
        for wrapped in keys:
            self.keyring.forget(wrapped)
        self.wal_pending = not truncate_wal(self.conn)
        log.info("event log: shredded %d epochs, %d records", len(keys), count)
        return Shredded(len(keys), int(count), int(seq or 0), anchor)

    def _anchor(self, seq: int) -> Checkpoint | None:
        """Sign the stored hash at ``seq`` (the last shredded record), checking its chain.

        A broken chain is logged at ERROR but does not stop the shred: the records go
        either way, and the kept records stay chained to the stored hash.
        """
        row = self.conn.execute(
            "SELECT seq, hash, signed_at, key, signature FROM checkpoints "
            "WHERE seq <= ? ORDER BY seq DESC LIMIT 1",
            (seq,),
        ).fetchone()
        base = Checkpoint.from_row(row) if row else None
        if base is not None and base.seq == seq:
            return None
        digest = base.hash if base else ZERO_HASH
        expected = base.seq + 1 if base else 1
        stored = digest
        for rseq, epoch, nonce, ciphertext, stored_hash in self.conn.execute(
            "SELECT seq, epoch, nonce, ciphertext, hash FROM records "
            "WHERE seq >= ? AND seq <= ? ORDER BY seq",
            (expected, seq),
        ):
            digest = chain_hash(digest, rseq, epoch, nonce, ciphertext)
            stored = bytes(stored_hash)
            if rseq != expected or digest != stored:
                break
            expected += 1
        if expected != seq + 1:
            log.error(
                "event log: chain broken at seq %d in records being shredded; "
                "anchoring the kept records to the stored hash",
                expected,
            )
            stored = bytes(
                self.conn.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()[0]
            )
        checkpoint = checkpoints.sign(self.identity, seq, stored, self.clock())
        checkpoints.store(self.conn, checkpoint)
        return checkpoint

    def erase_principal(self, principal_id: str) -> bool:
        """Destroy a principal's key: their personal fields become unreadable for good."""
        lookup = self.keyring.principal_lookup(principal_id)
        with transaction(self.conn):
            row = self.conn.execute(
                "SELECT wrapped FROM principal_keys WHERE lookup = ?", (lookup,)
            ).fetchone()
            if row is None:
                return False
            self.conn.execute("DELETE FROM principal_keys WHERE lookup = ?", (lookup,))
        self.keyring.forget(bytes(row[0]))
        self.wal_pending = not truncate_wal(self.conn)
        return True

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()
