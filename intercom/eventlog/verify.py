"""Checking the chain and the signed checkpoints, naming the first bad seq.

The chain walk needs no key. With the keyring (the CLI has it), records after the last
signed checkpoint are also authenticated, and a rewritten chain is narrowed down to
the first record whose ciphertext does not belong at its seq.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from intercom.eventlog.checkpoints import Checkpoint
from intercom.eventlog.reader import LogReader
from intercom.eventlog.records import ZERO_HASH, chain_hash


@dataclass
class Verdict:
    """The outcome of a verification: ok, or the first bad seq and why."""

    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    checkpoints: int = 0
    authenticated: int = 0
    bad_seq: int | None = None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return self.problem is None

    def fail(self, seq: int | None, problem: str) -> None:
        """Record a problem, keeping the one at the lowest seq."""
        if self.problem is None or (
            seq is not None and (self.bad_seq is None or seq < self.bad_seq)
        ):
            self.bad_seq, self.problem = seq, problem

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for ``--json``."""
        return {
            "ok": self.ok, "records": self.records, "first_seq": self.first_seq,
            "last_seq": self.last_seq, "checkpoints": self.checkpoints,
            "authenticated": self.authenticated, "bad_seq": self.bad_seq,
            "problem": self.problem, "notes": self.notes,
        }


def _load_checkpoints(
    conn: sqlite3.Connection, public_key: Ed25519PublicKey, verdict: Verdict
) -> dict[int, Checkpoint]:
    good: dict[int, Checkpoint] = {}
    for row in conn.execute("SELECT seq, hash, signed_at, key, signature FROM checkpoints"):
        checkpoint = Checkpoint.from_row(row)
        if checkpoint.valid_for(public_key):
            good[checkpoint.seq] = checkpoint
        else:
            seq = checkpoint.seq
            verdict.fail(seq, f"the checkpoint at seq {seq} has a bad signature")
    verdict.checkpoints = len(good)
    return good


def verify(  # noqa: C901, PLR0912 - one walk, its cases listed in order
    conn: sqlite3.Connection,
    public_key: Ed25519PublicKey,
    *,
    witness: Checkpoint | None = None,
    reader: LogReader | None = None,
    deep: bool = False,
) -> Verdict:
    """Walk the chain from its anchor; check every checkpoint and the optional witness."""
    verdict = Verdict()
    signed = _load_checkpoints(conn, public_key, verdict)
    if witness is not None and not witness.valid_for(public_key):
        verdict.fail(None, "the given checkpoint is not signed by this station's key")
        witness = None
    first, last, count = conn.execute(
        "SELECT min(seq), max(seq), count(*) FROM records"
    ).fetchone()
    verdict.records, verdict.first_seq, verdict.last_seq = count, first or 0, last or 0
    anchor_seq = (first - 1) if first else max(signed, default=0)
    if anchor_seq == 0:
        digest = ZERO_HASH
    elif anchor_seq in signed:
        digest = signed[anchor_seq].hash
    else:
        older = [s for s in signed if s < anchor_seq]
        verdict.fail(
            max(older, default=0) + 1,
            f"records before seq {anchor_seq + 1} are missing and no signed checkpoint "
            f"anchors seq {anchor_seq}",
        )
        digest = ZERO_HASH
    if witness is not None and witness.seq == anchor_seq and witness.hash != digest:
        verdict.fail(anchor_seq, "the given checkpoint does not match the log's anchor")
    expected = anchor_seq + 1
    good_seq = anchor_seq  # the last seq a signature vouches for
    witness_seq = witness.seq if witness is not None else -1
    for seq, epoch, nonce, ciphertext, stored in conn.execute(
        "SELECT seq, epoch, nonce, ciphertext, hash FROM records ORDER BY seq"
    ):
        if seq != expected:
            verdict.fail(expected, f"record {expected} is missing (the next is {seq})")
            break
        digest = chain_hash(digest, seq, epoch, nonce, ciphertext)
        if digest != stored:
            verdict.fail(seq, f"record {seq} does not match its chain hash (altered, "
                         "reordered or inserted)")
            break
        if seq in signed or seq == witness_seq:
            vouching = [c for c in (signed.get(seq), witness) if c is not None and c.seq == seq]
            if any(c.hash != digest for c in vouching):
                bad = _narrow(conn, reader, good_seq, seq)
                verdict.fail(bad, f"the chain was rewritten: the signed checkpoint at seq {seq} "
                             f"does not match; first bad record {bad}"
                             + ("" if reader else f" or later, up to {seq}"))
                break
            good_seq = seq
        expected += 1
    if verdict.problem is None:
        end = verdict.last_seq or anchor_seq
        beyond = [s for s in signed if s > end]
        if witness is not None and witness.seq > end:
            beyond.append(witness.seq)
        if beyond:
            verdict.fail(end + 1, f"the log ends at seq {end} but a "
                         f"signed checkpoint covers seq {max(beyond)} (truncated)")
    if witness is not None and witness.seq < anchor_seq:
        verdict.notes.append(f"the given checkpoint (seq {witness.seq}) predates the oldest "
                             "kept record; it cannot be checked")
    if verdict.problem is None and reader is not None:
        _authenticate(conn, reader, verdict, 0 if deep else good_seq)
    return verdict


def _narrow(conn: sqlite3.Connection, reader: LogReader | None, after: int, upto: int) -> int:
    """The first record in (after, upto] whose ciphertext is not genuine at its seq."""
    if reader is not None:
        for seq, epoch, nonce, ciphertext in conn.execute(
            "SELECT seq, epoch, nonce, ciphertext FROM records WHERE seq > ? AND seq <= ? "
            "ORDER BY seq",
            (after, upto),
        ):
            if not reader.authenticates(seq, epoch, bytes(nonce), bytes(ciphertext)):
                return int(seq)
    return after + 1


def _authenticate(
    conn: sqlite3.Connection, reader: LogReader, verdict: Verdict, after: int
) -> None:
    """Check the ciphertexts no signature vouches for (all of them when ``after`` is 0)."""
    cache: dict[int, AESGCM | None] = {}
    for seq, epoch, nonce, ciphertext in conn.execute(
        "SELECT seq, epoch, nonce, ciphertext FROM records WHERE seq > ? ORDER BY seq", (after,)
    ):
        if not reader.authenticates(seq, epoch, bytes(nonce), bytes(ciphertext), cache):
            verdict.fail(seq, f"record {seq} does not authenticate (forged or altered)")
            return
        verdict.authenticated += 1
