"""Daemon footprint: time from process start to READY=1, and RSS after idling.

Runs the simulated station (`intercom run --simulate`) as systemd would: with a notify
socket that this script listens on. Goal (issue 2): <= 2 s to READY, <= 120 MB RSS
after 10 s idle.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb(pid: int) -> tuple[float, float]:
    """Current and peak resident set size of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def one_run(workdir: Path, idle: float) -> tuple[float, float, float]:
    """Start a station, wait for READY, idle, measure, stop."""
    notify = workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
    cmd = [sys.executable, "-m", "intercom", "run", "--simulate"]
    cmd += ["--state-dir", str(workdir / "state"), "--log-level", "warning"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env)
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.monotonic() - started
        time.sleep(idle)
        rss, peak = rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        sock.close()
        notify.unlink()
    return ready, rss, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="start-ups to time")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds idle before RSS")
    args = parser.parse_args()
    readies, rsses, peaks = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            run_dir = Path(tmp) / str(i)
            run_dir.mkdir()
            ready, rss, peak = one_run(run_dir, args.idle if i == 0 else 0.5)
            readies.append(ready)
            if i == 0:
                rsses.append(rss)
                peaks.append(peak)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"start to READY=1: median {statistics.median(readies):.3f} s, "
          f"max {max(readies):.3f} s over {args.runs} runs (goal <= 2 s)")
    print(f"RSS after {args.idle:.0f} s idle: {rsses[0]:.1f} MB, peak {peaks[0]:.1f} MB "
          "(goal <= 120 MB)")


if __name__ == "__main__":
    main()
