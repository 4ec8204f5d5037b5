"""Power cuts: a writer killed with SIGKILL at random points loses no acknowledged record.

The test starts one "zygote" process that has imported everything; for each cut it forks
a writer that appends from several tasks and prints each acknowledged seq, and kills it
after a random short delay. One database is reused across all cuts.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intercom.config import EventLogConfig
from intercom.eventlog import EventLog
from intercom.events import DoorbellPressed, EventBus, UnlockGranted
from intercom.identity import StationIdentity, create_identity

ROOT = Path(__file__).resolve().parent.parent
APPENDERS = 4


def _writer(state: Path, identity: StationIdentity) -> None:
    """Append forever from several tasks, printing ``ack SEQ`` once each is durable."""

    async def run() -> None:
        log = EventLog(state, identity, EventBus(), EventLogConfig(checkpoint_every=20),
                       retention_poll_s=3600)
        await log.start()

        async def appender(k: int) -> None:
            n = 0
            while True:
                n += 1
                event = (
                    UnlockGranted(door="front", principal=f"p-{n % 5}", via="cli", jti=str(n))
                    if n % 3 == 0 else DoorbellPressed(button="bell", flat=str(k))
                )
                seq = await log.append(event)
                os.write(1, f"ack {seq}\n".encode())

        await asyncio.gather(*(appender(k) for k in range(APPENDERS)))

    asyncio.run(run())


def _zygote(state: Path) -> None:
    """Fork a writer on ``fork``; on ``reap PID`` wait for it and print its status."""
    identity = create_identity(state)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    _writer(state, identity)
                finally:
                    os._exit(3)
            sys.stdout.write(f"pid {pid}\n")
            sys.stdout.flush()
        elif command == "reap":
            _, status = os.waitpid(int(rest[0]), 0)
            sys.stdout.write(f"done {rest[0]} {status}\n")
            sys.stdout.flush()


class Zygote:
    def __init__(self, state: Path, stderr: Path) -> None:
        self._err = stderr.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_eventlog_powercut", str(state)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
            text=True, bufsize=1,
        )
        self.stderr = stderr

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def until(self, prefix: str, acks: list[int]) -> list[str]:
        """Read lines, collecting acks, until one starts with ``prefix``."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, f"zygote died: {self.stderr.read_text()[-2000:]}"
            word, *rest = line.split()
            if word == "ack":
                acks.append(int(rest[0]))
            elif word == prefix:
                return rest

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(5)
        self._err.close()


def _cut(zygote: Zygote, rng: random.Random, acks: list[int]) -> None:
    zygote.send("fork")
    (pid,) = zygote.until("pid", acks)
    # Mostly mid-append; sometimes while the log is still opening.
    pause = rng.uniform(0, 0.012) if rng.random() < 0.2 else rng.uniform(0.01, 0.06)
    time.sleep(pause)
    os.kill(int(pid), signal.SIGKILL)
    zygote.send(f"reap {pid}")
    _, status = zygote.until("done", acks)
    assert os.WIFSIGNALED(int(status)), f"writer exited by itself: {zygote.stderr.read_text()}"


def _present(state: Path) -> tuple[int, int, int]:
    conn = sqlite3.connect(state / "eventlog.db")
    try:
        count, first, last = conn.execute(
            "SELECT count(*), min(seq), max(seq) FROM records"
        ).fetchone()
    except sqlite3.OperationalError:  # cut before the first open finished
        return 0, 0, 0
    finally:
        conn.close()
    return int(count), int(first or 0), int(last or 0)


def _full_check(state: Path) -> None:
    from tests.test_eventlog_support import check  # noqa: PLC0415

    verdict = check(state)
    assert verdict.ok, verdict.problem
    conn = sqlite3.connect(state / "eventlog.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def _power_cuts(state: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)  # noqa: S311 - reproducible cut points, not secrets
    zygote = Zygote(state, state.parent / "zygote.err")
    all_acks: list[int] = []
    try:
        for n in range(1, kills + 1):
            acks: list[int] = []
            _cut(zygote, rng, acks)
            all_acks.extend(acks)
            count, first, last = _present(state)
            if acks:
                assert max(acks) <= last, f"cut {n}: acknowledged seq {max(acks)} lost"
            assert count == (last - first + 1 if count else 0), f"cut {n}: a gap in seqs"
            if n % 50 == 0 or n == kills:
                _full_check(state)
    finally:
        zygote.close()
    assert len(set(all_acks)) == len(all_acks), "a seq was acknowledged twice"
    assert len(all_acks) > kills  # the writers did write between the cuts


def test_power_cuts(tmp_path):
    state = tmp_path / "state"
    _power_cuts(state, kills=200, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_power_cuts_soak(tmp_path):
    state = tmp_path / "state"
    _power_cuts(state, kills=1000, seed=2)


if __name__ == "__main__":
    _zygote(Path(sys.argv[1]))
