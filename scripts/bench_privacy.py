"""Benchmark the privacy work per frame: zone masking (ms) and face redaction (frames/s).

Zones: two polygons on a 640x480 yuv420p frame, mask precomputed once, applied with
numpy to the Y, U and V planes (goal: at most 1 ms). Redaction: a real face picture
(scikit-image's astronaut, a dev dependency), detection on a downscaled grey image and
pixelation, OpenCV limited to one thread (goal: at least 15 frames/s on one core).
Also the resident memory each lazily imported part adds to a fresh process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import av
import cv2
import numpy as np

from intercom.privacy.redact import FaceRedactor
from intercom.privacy.zones import ZoneMask, ZoneMasks

try:
    from skimage import data
except ImportError:  # the dev extra ships the face picture
    data = None

W, H = 640, 480
ZONES = [
    [(0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (0.0, 1.0)],
    [(0.7, 0.6), (0.95, 0.95), (0.6, 0.95)],
]
RSS_STEPS = {
    "station modules": "import intercom.station",
    "+ numpy and a zone mask": "import intercom.station\n"
    "from intercom.privacy.zones import ZoneMask\nZoneMask(ZONES, 640, 480)",
    "+ OpenCV and the face model": "import intercom.station\n"
    "from intercom.privacy.zones import ZoneMask\nZoneMask(ZONES, 640, 480)\n"
    "from intercom.privacy.redact import FaceRedactor\nr = FaceRedactor()\nr._classifiers()",
}


def ms_per_call(func: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and 99th percentile in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def bench_zones(repeat: int) -> None:
    start = time.perf_counter()
    mask = ZoneMask(ZONES, W, H)
    made_ms = (time.perf_counter() - start) * 1000
    frame = av.VideoFrame(W, H, "yuv420p")
    for plane in frame.planes:
        plane.update(b"\x80" * plane.buffer_size)
    masks = ZoneMasks(ZONES)
    masks.apply_frame(frame)
    med, p99 = ms_per_call(lambda: masks.apply_frame(frame), repeat)
    print(f"zones: {len(ZONES)} polygons covering {mask.fraction:.1%} of {W}x{H}; "
          f"mask made once in {made_ms:.1f} ms")
    print(f"zones: av.VideoFrame yuv420p  median {med:.3f} ms/frame, p99 {p99:.3f} ms "
          f"(goal <= 1 ms)")
    buffer = np.full((H * 3 // 2, W), 128, np.uint8)
    med, p99 = ms_per_call(lambda: mask.apply_i420(buffer, W), repeat)
    print(f"zones: I420 buffer (Pi pre-callback)  median {med:.3f} ms/frame, p99 {p99:.3f} ms")


def bench_redaction(seconds: float) -> None:
    if data is None:
        print("redaction: skipped: scikit-image (the dev extra) has the face picture")
        return
    rgb = np.ascontiguousarray(cv2.resize(data.astronaut(), (W, W))[80 : 80 + H])
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    redactor = FaceRedactor()
    grey = frame.to_ndarray(format="yuv420p")[:H]
    faces = len(redactor.detect(grey))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        redactor.redact_frame(frame)
        count += 1
    elapsed = time.perf_counter() - start
    detect_med, _ = ms_per_call(lambda: redactor.detect(grey), 20)
    print(f"redaction: {faces} face in a {W}x{H} frame, detection at {redactor.detect_width} px "
          f"wide, OpenCV threads {cv2.getNumThreads()}")
    print(f"redaction: {count / elapsed:.1f} frames/s ({elapsed / count * 1000:.1f} ms/frame; "
          f"detection alone {detect_med:.1f} ms) (goal >= 15 frames/s)")
    thorough = FaceRedactor(thorough=True)
    bgr = frame.to_ndarray(format="bgr24")
    still_med, _ = ms_per_call(lambda: thorough.redact_bgr(bgr), 5)
    print(f"redaction: a manager's still (thorough: 3 models, profile both ways, "
          f"{thorough.detect_width} px wide) {still_med:.0f} ms")


def rss_kib(code: str) -> int:
    probe = (
        f"ZONES = {ZONES!r}\n{code}\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    return int(done.stdout.strip())


def bench_rss() -> None:
    last = 0
    for name, code in RSS_STEPS.items():
        rss = rss_kib(code)
        extra = f" (+{(rss - last) / 1024:.1f} MiB)" if last else ""
        print(f"memory: {name}: RSS {rss / 1024:.1f} MiB{extra}")
        last = rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=2000, help="zone masks to time")
    parser.add_argument("--seconds", type=float, default=5.0, help="redaction run length")
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          "pinned to one core")
    bench_zones(args.repeat)
    bench_redaction(args.seconds)
    bench_rss()


if __name__ == "__main__":
    main()
