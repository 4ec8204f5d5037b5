"""Whether a newly installed release reaches READY within a time limit.

Two checks: on a station, restart the systemd unit (``systemctl restart`` of a
``Type=notify`` unit returns once the daemon sent ``READY=1``, or fails); elsewhere,
start the release's own ``intercom run --simulate`` with a notify socket of ours and
wait for ``READY=1``.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

SYSTEMCTL = "/usr/bin/systemctl"


@dataclass(frozen=True)
class HealthResult:
    """The outcome of one check."""

    ready: bool
    detail: str
    seconds: float


class HealthCheck(Protocol):
    """Starts the release in ``release_dir`` and tells whether it reached READY."""

    def __call__(self, release_dir: Path, timeout_s: float) -> HealthResult:
        """Run the check, giving up after ``timeout_s``."""


class ServiceCheck:
    """Restart the systemd unit and wait for it to report READY."""

    def __init__(self, unit: str = "intercom.service") -> None:
        self.unit = unit

    def __call__(self, release_dir: Path, timeout_s: float) -> HealthResult:
        """Restart the unit; READY when ``systemctl restart`` returns 0 in time."""
        del release_dir  # the unit runs /opt/intercom/current, which points at it
        started = time.monotonic()
        try:
            result = subprocess.run(
                [SYSTEMCTL, "restart", self.unit],
                capture_output=True, text=True, timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired:
            subprocess.run([SYSTEMCTL, "stop", "--no-block", self.unit], check=False)
            return HealthResult(False, f"{self.unit} not READY within {timeout_s:g} s",
                                time.monotonic() - started)
        except OSError as exc:
            return HealthResult(False, f"cannot run systemctl: {exc}", 0.0)
        elapsed = time.monotonic() - started
        if result.returncode != 0:
            return HealthResult(False, f"{self.unit} failed to start: {result.stderr.strip()}",
                                elapsed)
        return HealthResult(True, f"{self.unit} READY", elapsed)


class ProbeCheck:
    """Start ``RELEASE/bin/intercom run --simulate`` and wait for its READY=1."""

    def __init__(
        self, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        self.extra_args = extra_args
        self.env = env

    def __call__(self, release_dir: Path, timeout_s: float) -> HealthResult:
        """Run the probe; it is stopped with SIGTERM whatever the outcome."""
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="intercom-probe-") as tmp:
            address = str(Path(tmp) / "notify")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.bind(address)
                env = dict(os.environ if self.env is None else self.env)
                env["NOTIFY_SOCKET"] = address
                env.pop("WATCHDOG_USEC", None)
                command = [
                    str(release_dir / "bin" / "intercom"), "run", "--simulate",
                    "--state-dir", str(Path(tmp) / "state"), *self.extra_args,
                ]
                try:
                    proc = subprocess.Popen(
                        command, env=env, cwd=tmp, stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )
                except OSError as exc:
                    return HealthResult(False, f"cannot start {command[0]}: {exc}", 0.0)
                try:
                    ready, detail = _wait_ready(sock, proc, started + timeout_s)
                finally:
                    _stop(proc)
                if not ready and proc.stderr is not None:
                    tail = proc.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
                    detail += f" ({' / '.join(tail)})" if tail else ""
                if proc.stderr is not None:
                    proc.stderr.close()
        return HealthResult(ready, detail, time.monotonic() - started)


def _wait_ready(
    sock: socket.socket, proc: subprocess.Popen[bytes], deadline: float
) -> tuple[bool, str]:
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], min(left, 0.2))
        if readable:
            lines = sock.recv(4096).decode(errors="replace").splitlines()
            if "READY=1" in lines:
                return True, "READY=1 received"
        elif proc.poll() is not None:
            return False, f"exited with status {proc.returncode} before READY"
    return False, "no READY=1 within the time limit"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("probe %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()
