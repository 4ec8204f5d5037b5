"""Benchmark the event log: durable appends/s, verify records/s, peak RSS.

scripts/bench eventlog [--appends N] [--concurrency C] [--verify-records M] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from intercom.config import EventLogConfig
from intercom.eventlog import EventLog
from intercom.eventlog.reader import LogReader
from intercom.eventlog.records import Entry
from intercom.eventlog.store import open_log
from intercom.eventlog.verify import verify
from intercom.eventlog.writer import LogWriter
from intercom.events import DoorbellPressed, EventBus, UnlockGranted
from intercom.identity import create_identity


def event(n: int) -> DoorbellPressed | UnlockGranted:
    if n % 4 == 0:
        return UnlockGranted(door="front", principal=f"resident-{n % 7}", via="mqtt", jti=str(n))
    return DoorbellPressed(button="bell", flat=str(n % 12))


async def appends(state: Path, count: int, concurrency: int) -> float:
    """Durable appends per second with ``concurrency`` appenders awaiting each append."""
    log = EventLog(state, create_identity(state), EventBus(), EventLogConfig())
    await log.start()
    per_task = count // concurrency

    async def appender(k: int) -> None:
        for i in range(per_task):
            await log.append(event(k * per_task + i))

    started = time.perf_counter()
    await asyncio.gather(*(appender(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - started
    transactions = log.status()["eventlog"]["transactions"]
    await log.stop()
    print(f"  {concurrency:>3} appenders: {per_task * concurrency / elapsed:>9,.0f} appends/s "
          f"({per_task * concurrency} appends, {transactions} transactions)")
    return per_task * concurrency / elapsed


def baseline(path: Path, commits: int = 500) -> None:
    """Bare SQLite commits/s (WAL, synchronous=FULL, one tiny row each): the disk's pace."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b BLOB)")
    started = time.perf_counter()
    for _ in range(commits):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (b) VALUES (zeroblob(100))")
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    print(f"  baseline: {commits / elapsed:>9,.0f} bare SQLite commits/s (the fsync ceiling "
          "for one appender)")


def build(state: Path, records: int) -> None:
    """Fill a log with ``records`` records in transactions of 1,000."""
    conn, keyring = open_log(state, create=True)
    writer = LogWriter(conn, keyring, create_identity(state), EventLogConfig())
    started = time.perf_counter()
    batch = 1000
    for start in range(0, records, batch):
        writer.append([Entry.from_event(event(n)) for n in range(start, start + batch)])
    writer.checkpoint(force=True)
    elapsed = time.perf_counter() - started
    writer.close()
    print(f"  bulk build: {records:,} records in {elapsed:.1f} s "
          f"({records / elapsed:,.0f} appends/s in transactions of {batch})")


def check(state: Path) -> None:
    """Verify the chain and checkpoints without keys, then read back with keys."""
    conn, keyring = open_log(state, create=False)
    public = create_identity(state).public_key
    started = time.perf_counter()
    verdict = verify(conn, public)
    elapsed = time.perf_counter() - started
    if not verdict.ok:
        raise SystemExit(f"verify failed: {verdict.problem}")
    print(f"  verify: {verdict.records:,} records in {elapsed:.2f} s "
          f"({verdict.records / elapsed:,.0f} records/s, {verdict.checkpoints:,} checkpoints)")
    reader = LogReader(conn, keyring)
    started = time.perf_counter()
    read = len(reader.read_after(0, 50_000))
    elapsed = time.perf_counter() - started
    print(f"  decrypt (read_after): {read / elapsed:,.0f} records/s")
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--appends", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--verify-records", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the test logs")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-eventlog-", dir=args.dir))
    try:
        print("durable appends (WAL, synchronous=FULL, each awaited until committed):")
        baseline(root / "baseline.db")
        asyncio.run(appends(root / "one", args.appends // 2, 1))
        asyncio.run(appends(root / "many", args.appends * 5, args.concurrency))
        print(f"verify over {args.verify_records:,} records:")
        build(root / "big", args.verify_records)
        check(root / "big")
        size = sum(p.stat().st_size for p in (root / "big").glob("eventlog.db*"))
        print(f"  database size: {size / 1e6:,.0f} MB")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS: {peak / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
