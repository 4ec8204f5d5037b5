"""Benchmark a resident away from home: press -> first frame presented through TURN at
100 ms RTT, and the TURN traffic of an idle standing connection.

The setup is tests/test_remote_call.py's (tests/remote_rig.py): network namespaces with
the station behind a home NAT, coturn and nginx (docs/remote.md's config) in an
"internet", Debian's Chromium behind a symmetric carrier NAT, relay only, TURN over UDP;
the phone's path to coturn gets --rtt-ms of round trip (tests/udpdelay.py) and no loss.

Every time is this machine's wall clock, nothing subtracted: the press is ``time.time()``
just before the press request goes to the station's control socket; the first frame is
the first requestVideoFrameCallback of the call in the page (its ``now``,
``performance.timeOrigin + performance.now()``). After each press the phone declines, and
the next press waits for the fresh standing connection the station offers.

TURN traffic: the bytes to and from coturn's port (both ends' allocations, permissions,
channel refreshes and the ICE consent checks relayed through it), counted by iptables in
the "internet" namespace while the phone's standing connection idles --idle-minutes;
the per-hour figure is that count scaled to an hour (labelled so).

Lossy calls (--lossy-calls N): tests/test_remote_call.py's slow test N times, each on a
fresh setup: the phone's path to coturn gets --rtt-ms of round trip and --loss of its UDP
datagrams dropped; the phone answers, talks and opens the door, and the call goes on
--call-seconds; the figures are Chromium's own for the call's video (inbound-rtp:
freezeCount, totalFreezesDuration, packetsLost, nackCount).

A slow link (--rate-kbps K): the phone's path to coturn is also a bottleneck of K kbit/s
each way with a drop-tail queue of --queue-ms (tests/udpdelay.py); its own counts of
datagrams sent and dropped are printed. --encoder chooses the station's VP8: one shared
encoder whose rate follows the worst watching device's loss (``shared``, the default)
or aiortc's per device
(``per-device``: ``vp8_per_device = true``). --camera: the simulated station's
synthetic colour bars (the default) or ``file``, bench_call's moving noisy test picture
(an H.264 file, 640x480 at 15 fps), which needs the bitrate a real camera does.

Usage: scripts/bench remote [--calls N] [--rtt-ms MS] [--idle-minutes M]
       scripts/bench remote --lossy-calls N [--rtt-ms MS] [--loss P] [--call-seconds S]
           [--rate-kbps K] [--queue-ms MS] [--encoder shared|per-device]
           [--camera synthetic|file]
(needs root)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_call import FIRST_FRAME, VIDEO, clock_skew, make_h264, summary  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from tests.browser import wait_call_state  # noqa: E402
from tests.remote_rig import PUBLIC_URL, first_page, remote_station  # noqa: E402
from tests.test_remote_call import lossy_call, pair_at_home, relayed  # noqa: E402
from tests.test_webclient import stats as page_stats  # noqa: E402
from tests.test_webclient import wait_stats  # noqa: E402


def fresh_connection(page: Any) -> dict[str, Any]:
    """The standing connection, up through the relay, no frame decoded on it yet."""
    return wait_stats(page, lambda s: relayed(s) and s["framesDecoded"] == 0,
                      "a fresh standing connection through TURN", timeout=60)


def presses(remote: Any, page: Any, calls: int) -> tuple[list[float], list[float]]:
    station = remote.station
    presented: list[float] = []
    skews: list[float] = []
    for _ in range(calls):
        station.wait("idle", lambda s: s["call"] == "idle")
        fresh_connection(page)
        time.sleep(1.0)
        skews.append(clock_skew(page))
        pressed = station.press() * 1000
        seen = page.wait_for_function(FIRST_FRAME, arg=pressed, timeout=20000).json_value()
        presented.append(seen["frame"] - pressed)
        page.click("#btn-decline")
        wait_call_state(page, "idle", timeout=20)
    return presented, skews


def camera_keys(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The station's ``[media.camera]`` for --camera and --encoder."""
    keys: dict[str, Any] = {}
    if args.camera == "file":
        video = make_h264(folder / "door.h264")
        keys = {"source": "file", "device": str(video), "width": VIDEO["width"],
                "height": VIDEO["height"], "fps": VIDEO["fps"]}
    if args.encoder == "per-device":
        keys["vp8_per_device"] = True
    return keys


def lossy(args: argparse.Namespace) -> int:
    rate = "no rate limit" if args.rate_kbps is None else (
        f"a {args.rate_kbps:.0f} kbit/s bottleneck each way ({args.queue_ms:.0f} ms queue)")
    print(f"\n== remote: {args.lossy_calls} calls of {args.call_seconds:.0f} s through coturn, "
          f"phone's RTT to coturn +{args.rtt_ms:.0f} ms, {args.loss:.1%} of its UDP lost, "
          f"{rate}; VP8 {args.encoder}, camera {args.camera} ==")
    freezes: list[int] = []
    with tempfile.TemporaryDirectory(prefix="bench-remote-video-") as videos:
        camera = camera_keys(args, Path(videos))
        for n in range(args.lossy_calls):
            with tempfile.TemporaryDirectory(prefix="bench-remote-") as folder:
                s, impaired = lossy_call(Path(folder), args.rtt_ms, args.loss,
                                         args.call_seconds, args.rate_kbps, args.queue_ms,
                                         camera)
            if not impaired:
                raise SystemExit("the delay and the losses were not on the media's path")
            freezes.append(int(s["freezeCount"]))
            print(f"call {n + 1}: freezeCount {s['freezeCount']}, totalFreezesDuration "
                  f"{s['totalFreezesDuration']:.3f} s, frames {s['framesDecoded']} "
                  f"(fps now {s.get('framesPerSecond')}), framesDropped "
                  f"{s.get('framesDropped')}, keyFramesDecoded {s.get('keyFramesDecoded')}, "
                  f"packetsLost {s['packetsLost']}, nackCount {s['nackCount']}, pliCount "
                  f"{s['pliCount']}, pair RTT {s.get('rtt')} s, "
                  f"{s.get('localCandidate')}/{s.get('remoteCandidate')}")
            for line in s.get("link", []):
                print(f"  bottleneck {line}")
    print(f"freezes per call: {freezes} (most {max(freezes)})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--idle-minutes", type=float, default=5.0)
    parser.add_argument("--lossy-calls", type=int, default=0,
                        help="instead: this many whole calls over a lossy path")
    parser.add_argument("--loss", type=float, default=0.02, help="share of UDP dropped")
    parser.add_argument("--call-seconds", type=float, default=60.0)
    parser.add_argument("--rate-kbps", type=float, default=None,
                        help="lossy calls: a bottleneck of this rate each way (default: none)")
    parser.add_argument("--queue-ms", type=float, default=200.0,
                        help="the bottleneck's drop-tail queue")
    parser.add_argument("--encoder", choices=("shared", "per-device"), default="shared",
                        help="lossy calls: the station's VP8 encoder")
    parser.add_argument("--camera", choices=("synthetic", "file"), default="synthetic",
                        help="lossy calls: the station's picture")
    args = parser.parse_args()
    if args.lossy_calls:
        return lossy(args)
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as folder:
        tmp = Path(folder)
        with remote_station(tmp, udp_only=True) as (remote, home), sync_playwright() as p:
            pair_at_home(remote, p, tmp / "profile", home)
            remote.lab.impair(args.rtt_ms, 0.0)
            context = remote.phone(p, "mobile", tmp / "profile", home)
            try:
                page = first_page(context)
                page.goto(PUBLIC_URL)
                page.wait_for_selector("body[data-link='online']", timeout=60000)
                stats = fresh_connection(page)
                presented, skews = presses(remote, page, args.calls)
                stats = fresh_connection(page)
                before = remote.turn.traffic().total_bytes
                started = time.monotonic()
                page.wait_for_timeout(args.idle_minutes * 60_000)
                idle_bytes = remote.turn.traffic().total_bytes - before
                idle_s = time.monotonic() - started
                still = page_stats(page)
            finally:
                context.close()
    print(f"\n== remote: relay/relay through coturn, phone's RTT to coturn +{args.rtt_ms:.0f} ms "
          f"(measured pair RTT {stats.get('rtt')} s), relay over {stats.get('relayProtocol')} ==")
    print(summary("press -> first frame PRESENTED", presented))
    print(f"page clock - time.time(): {min(skews):.1f} .. {max(skews):.1f} ms")
    per_hour = idle_bytes * 3600 / idle_s
    print(f"idle standing connection, TURN traffic: {idle_bytes} bytes in {idle_s:.0f} s "
          f"(scaled to an hour: {per_hour / 1000:.0f} kB/h); still {still.get('connection')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
