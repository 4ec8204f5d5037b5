"""Each kind of alteration is detected, and at the right seq."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from intercom.config import EventLogConfig
from intercom.eventlog.checkpoints import Checkpoint
from intercom.eventlog.records import Entry, chain_hash
from intercom.eventlog.store import db_path, open_log
from intercom.eventlog.writer import LogWriter
from intercom.identity import create_identity
from tests.test_eventlog_support import Clock, check

RECORDS = 100


@pytest.fixture
def state(tmp_path):
    """A log of 100 records with signed checkpoints at 25, 50, 75 and 100."""
    identity = create_identity(tmp_path)
    conn, keyring = open_log(tmp_path, create=True)
    writer = LogWriter(conn, keyring, identity, EventLogConfig(checkpoint_every=25), Clock())
    for i in range(RECORDS):
        writer.append([Entry("DoorbellPressed", 1.0 + i, {"button": "bell", "flat": str(i)})])
    writer.close()
    assert check(tmp_path).ok
    return tmp_path


def db(state):
    return sqlite3.connect(db_path(state), isolation_level=None)


def row(conn, seq):
    return conn.execute(
        "SELECT epoch, nonce, ciphertext, hash FROM records WHERE seq = ?", (seq,)
    ).fetchone()


def rehash_from(conn, seq):
    """What an attacker without keys can do: recompute every chain hash from ``seq``."""
    (prev,) = conn.execute("SELECT hash FROM records WHERE seq = ?", (seq - 1,)).fetchone()
    rows = conn.execute(
        "SELECT seq, epoch, nonce, ciphertext FROM records WHERE seq >= ? ORDER BY seq", (seq,)
    ).fetchall()
    for rseq, epoch, nonce, ciphertext in rows:
        prev = chain_hash(prev, rseq, epoch, nonce, ciphertext)
        conn.execute("UPDATE records SET hash = ? WHERE seq = ?", (prev, rseq))


def flipped(data):
    return bytes([data[0] ^ 1]) + bytes(data[1:])


def test_edited_record(state):
    conn = db(state)
    _, _, ciphertext, _ = row(conn, 37)
    conn.execute("UPDATE records SET ciphertext = ? WHERE seq = 37", (flipped(ciphertext),))
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 37)
    assert "chain hash" in verdict.problem


def test_edited_record_with_the_chain_recomputed(state):
    conn = db(state)
    _, _, ciphertext, _ = row(conn, 37)
    conn.execute("UPDATE records SET ciphertext = ? WHERE seq = 37", (flipped(ciphertext),))
    rehash_from(conn, 37)
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 37)
    assert "checkpoint at seq 50" in verdict.problem


def test_deleted_record(state):
    db(state).execute("DELETE FROM records WHERE seq = 37")
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 37)
    assert "missing" in verdict.problem


def test_deleted_record_with_later_records_renumbered(state):
    conn = db(state)
    conn.execute("DELETE FROM records WHERE seq = 37")
    for seq in range(38, RECORDS + 1):
        conn.execute("UPDATE records SET seq = ? WHERE seq = ?", (seq - 1, seq))
    rehash_from(conn, 37)
    conn.execute("DELETE FROM checkpoints WHERE seq = 100")
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 37)


def test_deleted_oldest_record(state):
    db(state).execute("DELETE FROM records WHERE seq = 1")
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 1)


def test_reordered_records(state):
    conn = db(state)
    a, b = row(conn, 37), row(conn, 38)
    for seq, (epoch, nonce, ciphertext, digest) in ((37, b), (38, a)):
        conn.execute(
            "UPDATE records SET epoch = ?, nonce = ?, ciphertext = ?, hash = ? WHERE seq = ?",
            (epoch, nonce, ciphertext, digest, seq),
        )
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 37)


def test_reordered_records_with_the_chain_recomputed(state):
    conn = db(state)
    a, b = row(conn, 37), row(conn, 38)
    for seq, (epoch, nonce, ciphertext, _) in ((37, b), (38, a)):
        conn.execute(
            "UPDATE records SET epoch = ?, nonce = ?, ciphertext = ? WHERE seq = ?",
            (epoch, nonce, ciphertext, seq),
        )
    rehash_from(conn, 37)
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 37)


def test_inserted_record(state):
    conn = db(state)
    for seq in range(RECORDS, 36, -1):
        conn.execute("UPDATE records SET seq = ? WHERE seq = ?", (seq + 1, seq))
    epoch, nonce, ciphertext, _ = row(conn, 36)
    conn.execute(
        "INSERT INTO records VALUES (37, ?, ?, ?, ?)", (epoch, nonce, ciphertext, b"\0" * 32)
    )
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 37)
    rehash_from(conn, 37)  # and the stronger attacker, who also fixes the hashes
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 37)


def test_forged_record_appended_after_the_last_checkpoint(state):
    conn = db(state)
    epoch, _, _, prev = row(conn, RECORDS)
    nonce, ciphertext = os.urandom(12), os.urandom(80)
    digest = chain_hash(prev, RECORDS + 1, epoch, nonce, ciphertext)
    conn.execute(
        "INSERT INTO records VALUES (?, ?, ?, ?, ?)",
        (RECORDS + 1, epoch, nonce, ciphertext, digest),
    )
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, RECORDS + 1)
    assert "authenticate" in verdict.problem


def test_truncated_tail(state):
    conn = db(state)
    (witness_row,) = [
        Checkpoint.from_row(r)
        for r in conn.execute("SELECT seq, hash, signed_at, key, signature FROM checkpoints")
        if r[0] == RECORDS
    ]
    conn.execute("DELETE FROM records WHERE seq > 80")
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 81)  # the log's own checkpoint at 100
    conn.execute("DELETE FROM checkpoints WHERE seq > 80")
    assert check(state).ok  # nothing in the log itself betrays it any more...
    verdict = check(state, witness=witness_row)  # ...but the witness does
    assert (verdict.ok, verdict.bad_seq) == (False, 81)
    assert "truncated" in verdict.problem


def test_bad_checkpoint_signature(state):
    conn = db(state)
    (signature,) = conn.execute("SELECT signature FROM checkpoints WHERE seq = 50").fetchone()
    conn.execute("UPDATE checkpoints SET signature = ? WHERE seq = 50", (flipped(signature),))
    verdict = check(state)
    assert (verdict.ok, verdict.bad_seq) == (False, 50)
    assert "bad signature" in verdict.problem


def test_forged_witness_is_refused(state):
    other = create_identity(state / "other")
    witness = Checkpoint(100, hashlib.sha256(b"x").digest(), 1, other.fingerprint, b"")
    witness = Checkpoint(100, witness.hash, 1, other.fingerprint, other.sign(witness.message()))
    verdict = check(state, witness=witness)
    assert not verdict.ok
    assert "not signed by this station" in verdict.problem


def test_cli_verify_names_the_first_bad_seq_and_exits_1(state, tmp_path_factory):
    conn = db(state)
    witness = tmp_path_factory.mktemp("witness") / "checkpoint.json"
    latest = subprocess.run(
        [sys.executable, "-m", "intercom", "log", "checkpoint", "--state-dir", str(state)],
        capture_output=True, text=True, check=True,
    ).stdout
    witness.write_text(json.dumps({"type": "LogCheckpoint", "at": 1.0, **json.loads(latest)}))
    conn.execute("DELETE FROM records WHERE seq > 90")
    conn.execute("DELETE FROM checkpoints WHERE seq > 90")
    command = [sys.executable, "-m", "intercom", "log", "verify", "--state-dir", str(state)]
    ok = subprocess.run(command, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([*command, "--checkpoint", str(witness)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert bad.stdout.startswith("TAMPERED: first bad seq 91:")
