"""Benchmark calls with Debian's Chromium as the resident: latency and the sender's CPU.

Latency (--calls N, default 20; a random pause of 0.5-2 s before each press):
  press -> ring message at the page, press -> first preview frame presented at the page
  (requestVideoFrameCallback), answer tap -> first audible resident audio at the door.
Sender CPU: the station process's CPU time per second of video while 1 or 4 devices are
rung at once, software-encoded (aiortc encodes per peer) versus passthrough (H.264 packets
encoded once by intercom.media.encodeonce, as the Pi's hardware encoder gives them; that
stand-in encoder's own CPU is measured and subtracted: on a Pi the hardware does it).

Usage: scripts/bench call [--calls N] [--cpu-seconds S] [--sources software,passthrough]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import (  # noqa: E402
    SimStation,
    chromium,
    new_device,
    pair_device,
    tone_wav,
    wait_call_state,
)

TICKS = os.sysconf("SC_CLK_TCK")
STAND_IN_CPU = "encoder-cpu"  # file in the state dir where the stand-in encoder reports
SPEAKER_ONSETS = "speaker-onsets"  # times the door speaker started hearing sound
ONSET_GAP_S = 0.3
RESOLUTION = 0.005  # CPU figures below half a percent of a core are noise on a shared VM


def station_worker(source: str, state_dir: str) -> None:
    """Run ``intercom run --simulate`` in this process, with the chosen camera source."""
    import intercom.station as station_module  # noqa: PLC0415

    if source == "passthrough":
        from intercom.media.encodeonce import EncodeOnceCamera  # noqa: PLC0415
        from intercom.media.synthetic import SyntheticCamera  # noqa: PLC0415

        report = Path(state_dir) / STAND_IN_CPU
        spent = {"cpu": 0.0, "calls": 0}

        class Camera(EncodeOnceCamera):
            """The stand-in for the Pi's hardware encoder, its CPU time counted."""

            def _make_codec(self, frame: Any) -> Any:
                codec = super()._make_codec(frame)
                codec.thread_count = 1  # all its work on the timed thread
                return codec

            def _encode(self, frame: Any, keyframe: bool) -> list[Any]:
                started = time.thread_time()
                try:
                    return super()._encode(frame, keyframe)
                finally:
                    spent["cpu"] += time.thread_time() - started
                    spent["calls"] += 1
                    if spent["calls"] % 15 == 0:
                        partial = report.with_suffix(".new")
                        partial.write_text(f"{spent['cpu']:.6f}")
                        partial.replace(report)  # readers never see a half-written file

        station_module.open_camera = lambda cfg: Camera(
            SyntheticCamera(cfg.width, cfg.height, cfg.fps), cfg.fps
        )

    onsets = Path(state_dir) / SPEAKER_ONSETS
    open_audio = station_module.open_audio

    def timed_audio(config: Any) -> Any:
        """The simulated door speaker, also noting when sound starts after silence."""
        microphone, speaker = open_audio(config)
        play, last = speaker.play, [0.0]

        async def noted(frame: Any) -> None:
            await play(frame)
            if speaker.levels and speaker.levels[-1] > speaker.SILENCE:
                now = time.time()
                if now - last[0] > ONSET_GAP_S:
                    with onsets.open("a") as out:
                        out.write(f"{now:.6f}\n")
                last[0] = now

        speaker.play = noted
        return microphone, speaker

    station_module.open_audio = timed_audio
    from intercom.cli import main  # noqa: PLC0415

    sys.exit(main(sys.argv[sys.argv.index("run") :]))


def start_station(source: str, workdir: Path) -> SimStation:
    state = workdir / f"state-{source}"
    command = [sys.executable, __file__, "--station-worker", source, str(state)]
    return SimStation(state, command=command)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def encoder_cpu(station: SimStation) -> float:
    path = station.state_dir / STAND_IN_CPU
    return float(path.read_text()) if path.exists() else 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name:38s} median {statistics.median(values):7.1f} ms   p95 {pct(values, 0.95):7.1f} ms"
        f"   min {min(values):6.1f}   max {max(values):6.1f}   (n={len(values)})"
    )


def wait_onset(station: SimStation, after: float, timeout: float = 10) -> float:
    """When the door speaker first heard sound after ``after`` (unix time)."""
    path = station.state_dir / SPEAKER_ONSETS
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            times = [float(t) for t in path.read_text().split()]
            later = [t for t in times if t >= after]
            if later:
                return later[0]
        time.sleep(0.02)
    raise AssertionError("no resident audio reached the door")


def latency(station: SimStation, page: Any, calls: int) -> dict[str, list[float]]:
    ring, released, preview, receive, decode, audio = [], [], [], [], [], []
    for _ in range(calls):
        time.sleep(random.uniform(0.5, 2.0))  # noqa: S311 - a pause, not a secret
        station.press()
        wait_call_state(page, "ringing")
        page.wait_for_function(
            "() => { const r = window.intercom.rings.at(-1);"
            " return window.intercom.frames.some(t => t >= r.pressed); }",
            timeout=10000,
        )
        pressed, rang, frame, received, decoded = page.evaluate(
            "() => { const w = window.intercom, r = w.rings.at(-1);"
            " const i = w.frames.findIndex(t => t >= r.pressed);"
            " return [r.pressed, r.at, w.frames[i], w.received[i], w.decoded[i]]; }"
        )
        ring.append(rang - pressed)
        preview.append(frame - pressed)
        receive.append(received - pressed)
        decode.append(decoded - pressed)
        tapped = time.time()
        page.click("#btn-answer")
        wait_call_state(page, "in_call")
        first_audio = wait_onset(station, tapped)
        audio.append((first_audio - tapped) * 1000)
        timing = station.status()["calls"]["last_call"] or {}
        if timing.get("first_frame_at") and timing.get("pressed_at"):
            released.append((timing["first_frame_at"] - timing["pressed_at"]) * 1000)
        page.click("#btn-hangup")
        wait_call_state(page, "idle")
        station.wait("idle", lambda s: s["call"] == "idle")
    return {
        "ring": ring,
        "released": released,
        "receive": receive,
        "decode": decode,
        "preview": preview,
        "audio": audio,
    }


def sender_cpu(station: SimStation, pages: list[Any], seconds: float) -> dict[str, float]:
    """Station CPU per second of ringing (video to every page), minus the idle baseline."""
    pid = station.proc.pid
    station.wait("idle", lambda s: s["call"] == "idle")
    time.sleep(1)
    c0, e0, t0 = cpu_seconds(pid), encoder_cpu(station), time.monotonic()
    time.sleep(seconds)
    idle = (cpu_seconds(pid) - c0 - (encoder_cpu(station) - e0)) / (time.monotonic() - t0)
    station.press()
    for page in pages:
        wait_call_state(page, "ringing")
    time.sleep(1)  # connections warm (encoders made, keyframes sent)
    decoded = [page.evaluate("window.intercom.stats()")["framesDecoded"] for page in pages]
    c0, e0, t0 = cpu_seconds(pid), encoder_cpu(station), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    encoder = (encoder_cpu(station) - e0) / elapsed
    ringing = (cpu_seconds(pid) - c0) / elapsed - encoder
    frames = [
        page.evaluate("window.intercom.stats()")["framesDecoded"] - before
        for page, before in zip(pages, decoded, strict=True)
    ]
    station.request({"request": "hangup"})
    for page in pages:
        wait_call_state(page, "idle")
    return {
        "idle": idle,
        "ringing": ringing,
        "per_call": ringing - idle,
        "stand_in_encoder": encoder,
        "fps_min": min(frames) / elapsed,
    }


def run_source(
    source: str, workdir: Path, calls: int, cpu_s: float, results: dict[str, Any]
) -> None:
    station = start_station(source, workdir)
    try:
        tone = tone_wav(workdir / "voice.wav")
        with chromium(station.url, (f"--use-file-for-fake-audio-capture={tone}",)) as browser:
            devices = []
            for _ in range(4):
                context, page = new_device(browser, station.url)
                pair_device(page, station.pair_link("1"))
                devices.append((context, page))
            pages = [page for _, page in devices]
            four = sender_cpu(station, pages, cpu_s)
            for context, _ in devices[1:]:
                context.close()
            station.wait("one device online", lambda s: s["calls"]["devices_online"] == 1)
            one = sender_cpu(station, pages[:1], cpu_s)
            results[source] = {"cpu_1": one, "cpu_4": four}
            if calls:
                results[source]["latency"] = latency(station, pages[0], calls)
    except Exception:
        print(station.log(), file=sys.stderr)
        raise
    finally:
        station.stop()


def report(results: dict[str, Any], calls: int) -> None:
    for source, data in results.items():
        print(f"\n== {source} source ==")
        for peers in (1, 4):
            c = data[f"cpu_{peers}"]
            print(
                f"sender CPU, {peers} peer(s) ringing: {c['per_call'] * 100:5.1f} % of a core "
                f"above idle ({c['idle'] * 100:.1f} %); stand-in encoder "
                f"{c['stand_in_encoder'] * 100:.1f} % (subtracted); each page decoded "
                f">= {c['fps_min']:.1f} fps"
            )
        if "latency" in data:
            lat = data["latency"]
            print(summary("press -> ring message at the page", lat["ring"]))
            if lat["released"]:
                print(summary("press -> station releases first frame", lat["released"]))
            print(summary("press -> first frame's packets received", lat["receive"]))
            print(summary("press -> first preview frame decoded", lat["decode"]))
            print(summary("press -> first preview frame shown", lat["preview"]))
            print(summary("answer tap -> first resident audio at door", lat["audio"]))
    if {"software", "passthrough"} <= results.keys():
        sw, pt = results["software"], results["passthrough"]
        for peers in (1, 4):
            soft, passed = sw[f"cpu_{peers}"]["per_call"], pt[f"cpu_{peers}"]["per_call"]
            if passed >= RESOLUTION:
                print(f"software / passthrough CPU, {peers} peer(s): {soft / passed:.1f}x")
            else:
                print(
                    f"software / passthrough CPU, {peers} peer(s): passthrough is below the "
                    f"resolution ({RESOLUTION * 100:.0f} % of a core), so > "
                    f"{soft / RESOLUTION:.0f}x"
                )
        one, four = pt["cpu_1"]["per_call"], pt["cpu_4"]["per_call"]
        if one >= RESOLUTION:
            print(f"passthrough, 4 peers / 1 peer: {four / one:.2f}x")
        else:
            print(f"passthrough, 1 peer {one * 100:.1f} %, 4 peers {four * 100:.1f} % of a core")
    print(f"\n(calls per source: {calls}; machine load average {os.getloadavg()[0]:.1f})")
    print(json.dumps(results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="calls timed per source")
    parser.add_argument("--cpu-seconds", type=float, default=8, help="seconds per CPU sample")
    parser.add_argument(
        "--sources", default="software,passthrough", help="camera sources to compare"
    )
    parser.add_argument("--latency-sources", default="software,passthrough")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-call-") as tmp:
        for source in args.sources.split(","):
            calls = args.calls if source in args.latency_sources.split(",") else 0
            run_source(source, Path(tmp), calls, args.cpu_seconds, results)
    report(results, args.calls)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--station-worker":
        station_worker(sys.argv[2], sys.argv[3])
    sys.exit(main())
