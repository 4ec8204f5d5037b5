import asyncio
import base64
import logging
import os
import sqlite3
import sys
import time

import pytest

from intercom.admin import Admin
from intercom.cli import main
from intercom.control import ControlServer
from intercom.eventlog import EventLogError, MasterKeyError
from intercom.eventlog.checkpoints import Checkpoint
from intercom.eventlog.reader import LogReader, Query
from intercom.eventlog.store import db_path, open_log
from intercom.events import DoorbellPressed, EventBus, LogCheckpoint, UnlockGranted
from intercom.identity import create_identity, credential_name
from intercom.security.registry import Registry
from intercom.security.secretbox import create_key
from intercom.statedir import InstanceLock
from tests.test_eventlog_support import Clock, VisitorNamed, all_bytes, check, make_log


def bell(flat: str = "1") -> DoorbellPressed:
    return DoorbellPressed(button="bell", flat=flat)


def grant(principal: str, jti: str = "j") -> UnlockGranted:
    return UnlockGranted(door="front", principal=principal, via="cli", jti=jti)


async def test_appends_return_contiguous_durable_seqs_and_read_back(tmp_path):
    log = make_log(tmp_path)
    await log.start()
    try:
        seqs = [await log.append(bell(str(i))) for i in range(3)]
        assert seqs == [1, 2, 3]
        assert log.last_seq == 3
        # A second connection (another process would do the same) sees them committed.
        conn = sqlite3.connect(db_path(tmp_path))
        assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 3
        events = log.read_after(1)
        assert [(e.seq, e.type, e.details["flat"]) for e in events] == [
            (2, "DoorbellPressed", "1"), (3, "DoorbellPressed", "2"),
        ]
    finally:
        await log.stop()
    assert check(tmp_path).ok


async def test_concurrent_appends_share_transactions(tmp_path):
    log = make_log(tmp_path)
    await log.start()
    try:
        seqs = await asyncio.gather(*(log.append(bell()) for _ in range(300)))
        assert sorted(seqs) == list(range(1, 301))
        assert log.status()["eventlog"]["transactions"] < 100
    finally:
        await log.stop()


async def test_every_bus_event_is_logged_and_checkpoints_are_published(tmp_path):
    bus = EventBus()
    published: list = []
    bus.on(published.append)
    log = make_log(tmp_path, bus, checkpoint_every=5)
    await log.start()
    try:
        for i in range(12):
            bus.publish(bell(str(i)))
        await log.wait_for_after(11)
        for _ in range(50):
            if any(isinstance(e, LogCheckpoint) for e in published):
                break
            await asyncio.sleep(0.01)
        checkpoints = [e for e in published if isinstance(e, LogCheckpoint)]
        assert checkpoints
        identity = create_identity(tmp_path)
        witness = Checkpoint.from_dict(checkpoints[0].to_dict())
        assert witness.valid_for(identity.public_key)
        assert log.latest_checkpoint() is not None
        await log.wait_for_after(12)  # the LogCheckpoint event is logged too
        types = [e.type for e in log.read_after(0)]
        assert types.count("DoorbellPressed") == 12
        assert "LogCheckpoint" in types
    finally:
        await log.stop()
    assert check(tmp_path).ok


async def test_stop_drains_queued_events(tmp_path):
    bus = EventBus()
    log = make_log(tmp_path, bus)
    await log.start()
    for i in range(200):
        bus.publish(bell(str(i)))
    await log.stop()
    conn, keyring = open_log(tmp_path, create=False)
    assert len(LogReader(conn, keyring).read_after(0, 1000)) == 200


async def test_checkpoint_after_minutes_with_the_test_clock(tmp_path):
    clock = Clock()
    log = make_log(tmp_path, clock=clock, checkpoint_every=1000, checkpoint_minutes=10)
    await log.start()
    try:
        await log.append(bell())
        assert log.latest_checkpoint() is None
        clock.advance(601)
        await log.append(bell())
        await asyncio.sleep(0)
        assert log.latest_checkpoint()["seq"] == 2
    finally:
        await log.stop()


async def test_erasing_a_principal_destroys_only_their_personal_fields(tmp_path):
    log = make_log(tmp_path)
    await log.start()
    try:
        await log.append(grant("alice-7f3a", "1"))
        await log.append(VisitorNamed(principal="bob-91c2", name="Bob Example", door="front"))
        await log.append(grant("bob-91c2", "2"))
        reader = log._reader
        alice = [e.seq for e in reader.query(Query(principal="alice-7f3a"))]
        bob = [e.seq for e in reader.query(Query(principal="bob-91c2"))]
        assert (alice, bob) == ([1], [2, 3])
        assert log.read_after(1, 1)[0].details["name"] == "Bob Example"
        assert await log.erase_principal("bob-91c2") is True
        assert await log.erase_principal("bob-91c2") is False
        events = log.read_after(0)
        assert events[0].details["principal"] == "alice-7f3a"
        assert events[1].details == {"door": "front", "principal": None, "name": None}
        assert events[2].details["principal"] is None
        assert events[2].details["jti"] == "2"
        assert list(reader.query(Query(principal="bob-91c2"))) == []
    finally:
        await log.stop()
    assert check(tmp_path, deep=True).ok  # erasure does not touch the chain
    assert b"Bob Example" not in all_bytes(tmp_path)


async def test_no_plaintext_in_any_file_of_the_state_dir(tmp_path):
    bus = EventBus()
    log = make_log(tmp_path, bus, checkpoint_every=3)
    await log.start()
    secrets = [b"DoorbellPressed", b"UnlockGranted", b"VisitorNamed", b"LogCheckpoint",
               b"alice-7f3a", b"bob-91c2", b"Bob Example", b"jti-unique-5150"]
    try:
        for i in range(20):
            bus.publish(bell(str(i)))
            bus.publish(grant("alice-7f3a", "jti-unique-5150"))
            bus.publish(VisitorNamed(principal="bob-91c2", name="Bob Example", door="front"))
        await log.wait_for_after(59)
        blob = all_bytes(tmp_path)
        assert (tmp_path / "eventlog.db-wal").exists()
        assert [s for s in secrets if s in blob] == []
    finally:
        await log.stop()
    assert [s for s in secrets if s in all_bytes(tmp_path)] == []


async def test_retention_shreds_rows_and_key_and_export_cannot_recover(tmp_path, capsys):
    clock = Clock()
    log = make_log(tmp_path, clock=clock, retention_hours=1, epoch_minutes=60)
    await log.start()
    try:
        for _ in range(5):
            await log.append(grant("alice-7f3a", "old-jti-1"))
        conn = sqlite3.connect(db_path(tmp_path))
        (old_key,) = conn.execute("SELECT wrapped FROM epoch_keys").fetchone()
        old_cts = [r[0] for r in conn.execute("SELECT ciphertext FROM records")]
        clock.advance(3600)  # next epoch; the first has ended but is not yet expired
        await log.append(bell("new"))
        assert await log.enforce_retention() is None
        clock.advance(3600 + 1)
        shredded = await log.enforce_retention()
        assert (shredded.epochs, shredded.records, shredded.through_seq) == (1, 5, 5)
        assert bytes(old_key) not in all_bytes(tmp_path)  # while running: WAL truncated too
        assert conn.execute("SELECT min(seq) FROM records").fetchone()[0] == 6
        await log.flush()  # the LogPurged append may open a new epoch: count after it
        gone = conn.execute("SELECT count(*) FROM epoch_keys WHERE wrapped = ?", (old_key,))
        assert gone.fetchone()[0] == 0
        await log.wait_for_after(8)  # two LogCheckpoint (time, anchor) and LogPurged
        types = [e.type for e in log.read_after(0)]
        assert types[0] == "DoorbellPressed"
        assert "LogPurged" in types
    finally:
        await log.stop()
    blob = all_bytes(tmp_path)
    assert bytes(old_key) not in blob
    assert not any(bytes(ct) in blob for ct in old_cts)
    assert main(["log", "export", "--format", "jsonl", "--state-dir", str(tmp_path)]) == 0
    exported = capsys.readouterr().out
    assert "old-jti-1" not in exported
    assert '"seq":6' in exported
    verdict = check(tmp_path)
    assert verdict.ok, verdict.problem
    assert verdict.first_seq == 6


async def test_retention_timer_and_start_up_shred_without_being_asked(tmp_path):
    clock = Clock()
    log = make_log(tmp_path, clock=clock, retention_hours=1)
    log.retention_poll_s = 0.02
    await log.start()
    try:
        await log.append(bell())
        clock.advance(3 * 3600)
        for _ in range(200):
            if log.status()["eventlog"]["shredded_records"]:
                break
            await asyncio.sleep(0.01)
        assert log.status()["eventlog"]["shredded_records"] == 1
        await log.append(bell())
    finally:
        await log.stop()
    clock.advance(3 * 3600)
    log = make_log(tmp_path, clock=clock, retention_hours=1)
    await log.start()
    try:
        assert log.status()["eventlog"]["shredded_records"] >= 1
    finally:
        await log.stop()
    assert check(tmp_path).ok


async def test_missing_master_key_is_refused_and_never_replaced(tmp_path):
    log = make_log(tmp_path)
    await log.start()
    await log.append(bell())
    await log.stop()
    key = tmp_path / "keys" / "eventlog.key"
    key.rename(tmp_path / "moved.key")
    with pytest.raises(MasterKeyError, match="missing"):
        await make_log(tmp_path).start()
    assert not key.exists()
    (tmp_path / "moved.key").rename(key)
    await make_log(tmp_path).start()  # still opens; nothing was laid over it


async def test_corrupt_wrong_or_exposed_master_key_is_refused(tmp_path):
    log = make_log(tmp_path)
    await log.start()
    await log.stop()
    key = tmp_path / "keys" / "eventlog.key"
    good = key.read_bytes()
    key.write_bytes(b"short")
    with pytest.raises(MasterKeyError, match="corrupt"):
        await make_log(tmp_path).start()
    key.write_bytes(os.urandom(32))
    with pytest.raises(MasterKeyError, match="does not open this log"):
        await make_log(tmp_path).start()
    key.write_bytes(good)
    key.chmod(0o644)
    with pytest.raises(MasterKeyError, match="0600"):
        await make_log(tmp_path).start()
    key.chmod(0o600)
    assert main(["log", "show", "--state-dir", str(tmp_path)]) == 0


async def test_master_key_from_systemd_credential(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    # As the unit's LoadCredential=intercom:DIR names DIR/eventlog.key.
    key = creds / credential_name("eventlog.key")
    key.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")  # text form
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    state = tmp_path / "state"
    log = make_log(state)
    await log.start()
    await log.append(bell())
    await log.stop()
    assert not (state / "keys" / "eventlog.key").exists()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(MasterKeyError, match="missing"):
        await make_log(state).start()


async def test_append_failure_is_logged_as_error_and_raised(tmp_path, caplog):
    log = make_log(tmp_path)
    await log.start()
    try:
        await log.append(bell())
        other = sqlite3.connect(db_path(tmp_path))
        other.execute("DROP TABLE records")
        other.commit()
        other.close()
        with caplog.at_level(logging.ERROR), pytest.raises(EventLogError):
            await log.append(bell())
        assert "could not be appended" in caplog.text
        assert log.status()["eventlog"]["append_failures"] == 1
    finally:
        await log.stop()


async def test_cli_show_export_purge_and_checkpoint(tmp_path, capsys):
    clock = Clock()
    log = make_log(tmp_path, clock=clock)
    await log.start()
    await log.append(bell("4"))
    await log.append(grant("alice-7f3a"))
    await log.append(grant("carol-0b1d"))
    await log.stop()
    create_key(tmp_path)  # the station's other key (make_log made its identity)
    state = ["--state-dir", str(tmp_path)]
    assert main(["log", "show", "--type", "UnlockGranted", *state]) == 0
    out = capsys.readouterr().out
    assert "alice-7f3a" in out
    assert "DoorbellPressed" not in out
    assert main(["log", "export", "--format", "jsonl", "--principal", "carol-0b1d", *state]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert '"principal":"carol-0b1d"' in lines[0]
    assert main(["log", "checkpoint", *state]) == 0
    assert '"seq": 3' in capsys.readouterr().out
    # No station runs: purge shreds itself, under the lock (asyncio.run: in a thread).
    assert await asyncio.to_thread(main, ["log", "purge", "--older-than", "0", *state]) == 0
    assert "logged as seq 4" in capsys.readouterr().out
    assert main(["log", "show", "--type", "LogPurged", *state]) == 0
    assert "reason=purge" in capsys.readouterr().out
    assert main(["log", "verify", *state]) == 0
    assert capsys.readouterr().out.startswith("ok: 4 records")
    assert main(["log", "show", *["--state-dir", str(tmp_path / "none")]]) == 1


async def test_station_logs_its_events_and_verifies_after_stop(station, capsys):
    assert station.eventlog is not None
    await station.simulator.act("press", None)
    for _ in range(300):
        types = [e.type for e in station.eventlog.read_after(0)]
        if "DoorbellPressed" in types:
            break
        await asyncio.sleep(0.01)
    assert {"StationStarted", "DoorbellPressed"} <= set(types)
    assert station.status()["eventlog"]["last_seq"] >= 2
    state = ["--state-dir", str(station.state_dir)]
    assert main(["log", "verify", *state]) == 0
    capsys.readouterr()


async def test_a_detail_that_is_not_json_is_logged_as_text(tmp_path):
    log = make_log(tmp_path)
    await log.start()
    try:
        await log.append(VisitorNamed(principal="p-1", name=tmp_path, door="front"))  # a Path
        assert log.read_after(0)[0].details["name"] == str(tmp_path)
    finally:
        await log.stop()


async def test_cli_purge_beside_a_running_log_keeps_one_chain(tmp_path):
    clock = Clock(time.time() - 10 * 3600)  # the running log's records are 10 hours old
    bus = EventBus()
    log = make_log(tmp_path, bus, clock)
    # The log's owner, as a station is: it holds the instance lock and answers the
    # control socket, so `intercom log purge` asks it to shred rather than write itself.
    owner = InstanceLock(tmp_path, "run")
    owner.acquire()
    registry = Registry.for_state_dir(tmp_path, create_key(tmp_path), bus, create=True)
    control = ControlServer(tmp_path)
    for name, handler in Admin(registry, bus, log).handlers().items():
        control.register(name, handler)
    await registry.open()
    await log.start()
    await control.start()
    try:
        for _ in range(5):
            await log.append(bell())
        clock.advance(10 * 3600)  # now: those records are 10 hours old
        purge = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "intercom", "log", "purge", "--older-than", "1",
            "--state-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await purge.communicate()
        assert purge.returncode == 0
        # The running log shreds as its retention does: it signs the last shredded
        # record's hash (seq 5), logged as seq 6, then logs the purge as seq 7.
        assert b"shredded 1 epochs, 5 records (through seq 5); logged as seq 7" in out
        assert await log.append(bell()) == 8  # the chain goes on after the purge's record
    finally:
        await control.stop()
        await log.stop()
        await registry.close()
        owner.release()
    conn, keyring = open_log(tmp_path, create=False)
    events = LogReader(conn, keyring).read_after(0)
    assert [(e.seq, e.type) for e in events] == [
        (6, "LogCheckpoint"), (7, "LogPurged"), (8, "DoorbellPressed"),
    ]
    assert events[0].details["seq"] == 5  # the anchor of the kept records
    assert events[1].details["reason"] == "purge"
    assert check(tmp_path).ok
