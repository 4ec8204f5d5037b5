"""The endurance run, ``scripts/soak``: real Mosquitto, aiortc devices, Chromium, presses.

The default suite runs it for 3 minutes; the slow suite for 60 minutes and for 50
``kill -9`` of the station in a call. Each run is the script itself, as a user runs it,
judged by the JSON report it writes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "scripts" / "soak.py"
WARM_UP_MIN = 10.0


def run_soak(tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    """Run scripts/soak with ``args``; its JSON report, the output kept for messages."""
    report = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), *args, "--json", str(report), "--keep", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    assert report.exists(), f"no report; exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(report.read_text())
    result["output"] = proc.stdout[-3000:]
    result["returncode"] = proc.returncode
    return result


def fds_after(samples: list[dict[str, Any]], minute: float) -> list[int]:
    return [int(s["fds"]) for s in samples if s["minute"] >= minute]


@pytest.mark.timeout(480)
def test_three_minutes_of_presses_fail_no_call_and_lose_no_event(tmp_path: Path):
    result = run_soak(tmp_path, "--minutes", "3", timeout=450)
    out = result["output"]
    assert result["calls"] >= 9, out
    assert result["failed"] == [], out
    assert result["lost_events"] == [], out
    assert result["verify"] == "ok", out
    assert any(result.get("purges", [])), f"no purge shredded anything: {result.get('purges')}"
    # descriptors do not grow: the last minute's samples (taken idle, before each
    # press) hold no more than those of the second minute, after the first calls
    second = fds_after(result["samples"], 1.0)[:3]
    last = fds_after(result["samples"], 2.0)
    assert max(last) <= max(second) + 2, result["samples"]
    assert result["returncode"] == 0, out


@pytest.mark.slow
@pytest.mark.timeout(4200)
def test_an_hour_of_presses_grows_memory_at_most_ten_percent(tmp_path: Path):
    result = run_soak(tmp_path, "--minutes", "60", timeout=4100)
    out = result["output"]
    assert result["failed"] == [], out
    assert result["lost_events"] == [], out
    assert result["verify"] == "ok", out
    samples = result["samples"]
    warm = [s for s in samples if s["minute"] >= WARM_UP_MIN]
    base_rss = statistics.median(s["rss_mib"] for s in warm[:3])
    end_rss = statistics.median(s["rss_mib"] for s in warm[-3:])
    assert end_rss <= base_rss * 1.10, (base_rss, end_rss)
    base_fds = max(s["fds"] for s in warm[:3])
    assert max(s["fds"] for s in warm[-9:]) <= base_fds + 2, (base_fds, warm[-9:])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fifty_kills_in_a_call_leave_the_relay_off_and_the_devices_rung(tmp_path: Path):
    result = run_soak(tmp_path, "--kills", "50", timeout=1700)
    out = result["output"]
    assert result["kills"] == 50, out
    assert result["failed"] == [], out  # relay off, every device rung within 5 s of READY
    assert len(result["ring_after_ready_s"]) == 50
    assert max(result["ring_after_ready_s"]) <= 5.0
    assert result["lost_events"] == [], out
    assert result["verify"] == "ok", out
