"""Benchmark: ``intercom principals revoke`` -> the revoked device's socket closed.

A simulated station runs in this process with its web server on loopback; a resident
device (aiohttp WebSocket client, signed in) is paired for each round. The revocation
is what an administrator types: ``intercom principals revoke ID`` as its own process,
asking the running station over the control socket. One clock (this process's
``perf_counter``): the start is taken just before the command is spawned; the ends are
the station's registry finishing the revocation (durable), the device seeing its
socket closed (4401), and the command exiting.

    scripts/bench revoke [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from intercom.station import Station  # noqa: E402
from tests.test_calls_client import Device, call_settings, pair  # noqa: E402


async def one_round(station: Station) -> dict[str, float]:
    """Pair and sign in one device, revoke it by the CLI; milliseconds to each end."""
    registry = station.registry
    assert registry is not None  # noqa: S101 - a started station has one
    device: Device = await pair(station)
    await device.connect(answer=False)
    ws = device.ws
    assert ws is not None  # noqa: S101
    stamps: dict[str, float] = {}
    revoke = registry.revoke

    async def timed_revoke(pid: str, actor: str, **kw: Any) -> bool:
        changed = await revoke(pid, actor, **kw)
        stamps["revoked"] = time.perf_counter()
        return changed

    registry.revoke = timed_revoke  # type: ignore[method-assign]
    reader = device._tasks[0]  # noqa: SLF001 - the device's socket reader ends at the close
    closed = asyncio.get_running_loop().create_future()
    reader.add_done_callback(lambda _: closed.done() or closed.set_result(time.perf_counter()))
    try:
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "intercom", "principals", "revoke", device.principal,
            "--state-dir", str(station.state_dir),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        done_at = await asyncio.wait_for(closed, 10)
        _, err = await proc.communicate()
        exited = time.perf_counter()
        if proc.returncode != 0:
            raise RuntimeError(f"revoke failed: {err.decode()}")
    finally:
        registry.revoke = revoke  # type: ignore[method-assign]
        await device.close()
    return {
        "command start -> device disconnected": (done_at - started) * 1000,
        "revocation durable -> device disconnected": (done_at - stamps["revoked"]) * 1000,
        "command start -> command exited": (exited - started) * 1000,
        "close code": float(ws.close_code or 0),
    }


def report(rounds: list[dict[str, float]]) -> None:
    """p50/p95/max of each measure."""
    for name in rounds[0]:
        if name == "close code":
            codes = sorted({int(r[name]) for r in rounds})
            print(f"close codes seen by the device: {codes}")
            continue
        values = [r[name] for r in rounds]
        q = statistics.quantiles(values, n=20, method="inclusive")
        print(f"{name}: n={len(values)} p50={statistics.median(values):.1f} ms "
              f"p95={q[18]:.1f} ms max={max(values):.1f} ms")


async def main() -> None:
    """Run the rounds and print the figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-revoke-") as tmp:
        station = Station(call_settings(Path(tmp) / "state"))
        await station.start()
        try:
            await one_round(station)  # warm-up: imports, the first connection
            rounds = [await one_round(station) for _ in range(args.rounds)]
        finally:
            await station.stop("benchmark finished")
    report(rounds)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load}, "
          f"Python {sys.version.split()[0]}")


if __name__ == "__main__":
    asyncio.run(main())
