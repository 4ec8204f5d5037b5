"""Benchmark the managers' redacted live view (WHEP) beside a resident's call.

The station (``intercom run --simulate --config``, a real process, pinned to one core with
``taskset -c 0`` unless --cores all) plays scikit-image's astronaut at 640x480, 15 fps
from its file camera, with ``[whep] enabled``. Debian's Chromium, paired as a resident
of flat 1, is rung (the ring's video flows as in a call); then 0, 1 and 3 aiortc WHEP
viewers (this process, on the other core) watch the redacted stream. For each step:
  - frames per second each viewer decoded (redacted, one redaction per frame for all
    viewers, one VP8 encoder per viewer), the lowest of the viewers;
  - frames per second the resident's page decoded (its getStats framesDecoded);
  - the station process's CPU time per second (utime + stime, /proc/PID/stat), in % of
    one core.
Goal: >= 15 fps redacted while the resident's call keeps its frame rate.

Usage: scripts/bench whep [--seconds S] [--viewers 1,3] [--cores one|all]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from joserfc.jwk import OKPKey  # noqa: E402

from intercom.security import command  # noqa: E402
from tests.browser import (  # noqa: E402
    SimStation,
    chromium,
    new_device,
    pair_device,
    station_ca,
    wait_call_state,
)
from tests.whepkit import Viewer, astronaut_video  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def write_config(path: Path, video: Path, viewers: int) -> Path:
    path.write_text(
        '[station]\nid = "bench"\n\n[hardware]\npin_factory = "mock"\n\n'
        '[[hardware.buttons]]\nname = "bell"\npin = 17\nflat = "1"\n\n'
        "[hardware.relay]\npin = 27\n\n[web]\nport = 0\n\n[calls]\nring_timeout_s = 300\n\n"
        f'[media.camera]\nsource = "file"\ndevice = "{video}"\nwidth = 640\nheight = 480\n'
        f"fps = 15\n\n[whep]\nenabled = true\nmax_viewers = {viewers}\n"
    )
    return path


class Loop:
    """An asyncio loop in a thread of its own (Playwright's sync API owns the main one)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def manager_token(station: SimStation) -> str:
    key = OKPKey.generate_key("Ed25519")
    answer = station.request({"request": "principals", "action": "add", "role": "manager",
                              "id": "bench-mgr", "doors": ["front"],
                              "jwk": key.as_dict(private=False)})
    if not answer.get("ok"):
        raise SystemExit(f"cannot add the manager: {answer}")
    return command.sign_bearer(key, kid="bench-mgr", station="bench", scope="whep",
                               lifetime=3600)


def measure(station: SimStation, page: Any, viewers: list[Viewer], seconds: float
            ) -> dict[str, float]:
    pid = station.proc.pid
    def decoded() -> int:
        return int(page.evaluate("window.intercom.stats()")["framesDecoded"])

    c0, t0 = cpu_seconds(pid), time.monotonic()
    r0, v0 = decoded(), [v.count for v in viewers]
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    r1, v1 = decoded(), [v.count for v in viewers]
    cpu = (cpu_seconds(pid) - c0) / elapsed
    fps = [(b - a) / elapsed for a, b in zip(v0, v1, strict=True)]
    return {"cpu": cpu * 100, "resident_fps": (r1 - r0) / elapsed,
            "viewer_fps_min": min(fps) if fps else 0.0,
            "viewer_fps_max": max(fps) if fps else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--viewers", default="1,3")
    parser.add_argument("--cores", choices=["one", "all"], default="one")
    args = parser.parse_args()
    counts = [int(n) for n in args.viewers.split(",")]
    one_core = args.cores == "one" and (os.cpu_count() or 1) > 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-whep-"))
    video = astronaut_video(workdir / "astronaut.mkv")
    config = write_config(workdir / "bench.toml", video, max(counts))
    run = [sys.executable, "-m", "intercom"]
    station = SimStation(workdir / "state", ("--config", str(config)),
                         command=["taskset", "-c", "0", *run] if one_core else run)
    if one_core:
        os.sched_setaffinity(0, {1})  # this script, Chromium and the viewers: the other core
    loop = Loop()
    tls = __import__("ssl").create_default_context(cadata=station_ca(station.url))
    results: list[tuple[int, dict[str, float]]] = []
    try:
        token = manager_token(station)
        with chromium(station.url) as browser:
            _, page = new_device(browser, station.url)
            pair_device(page, station.pair_link())
            station.press()
            wait_call_state(page, "ringing")
            time.sleep(2)
            results.append((0, measure(station, page, [], args.seconds)))
            viewers: list[Viewer] = []
            for count in counts:
                while len(viewers) < count:
                    viewer = Viewer(station.url, tls)
                    status, _, text = loop.run(viewer.post(token))
                    if status != 201:
                        raise SystemExit(f"WHEP refused: {status} {text}")
                    viewers.append(viewer)
                for viewer in viewers:
                    loop.run(viewer.wait_frames(5))
                time.sleep(2)
                results.append((count, measure(station, page, viewers, args.seconds)))
            for viewer in viewers:
                loop.run(viewer.close())
    finally:
        station.stop()
    where = "the station pinned to one core (taskset -c 0)" if one_core else "all cores"
    print(f"whep: astronaut 640x480 at 15 fps, {args.seconds:.0f} s per step, {where}; "
          "resident rung in Chromium (video flowing)")
    for count, figures in results:
        viewers_text = (f"viewers min {figures['viewer_fps_min']:.1f} / max "
                        f"{figures['viewer_fps_max']:.1f} fps redacted" if count else "no viewer")
        print(f"whep: {count} viewer(s): {viewers_text}; resident {figures['resident_fps']:.1f}"
              f" fps; station CPU {figures['cpu']:.0f} % of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
