"""Benchmark calls with Debian's Chromium as the resident, measured as the resident sees them.

Latency (--latency-sources; --calls N presses each, default 20, a random 0.5-2 s pause
before each). Every time is this machine's wall clock, nothing subtracted: the press is
``time.time()`` in this script just before the press request goes to the station's control
socket; the page's times are ``performance.timeOrigin + performance.now()`` (the bench
checks at each press that the page's clock agrees with ``time.time()``).
  press -> ring screen shown    (the page has run setCallState("ringing"))
  press -> ring screen painted  (the next animation frame after it)
  press -> first frame presented (the first requestVideoFrameCallback of the call: its now)
  breakdown: press -> the station's press stamp (DoorbellPressed), -> the station releases
  the first frame, -> its last packet received (requestVideoFrameCallback's receiveTime),
  -> that plus the decoder's time (processingDuration: not any wait in the jitter buffer
  before decoding), -> handed to the compositor (presentationTime);
  answer tap -> first audible resident audio at the door.
--busy-core runs a process that keeps one core busy during the latency part;
--chromium-arg adds a Chromium flag (experiments, e.g. a field trial; say so in records).

CPU (--cpu-sources, --peers 1,2,4,8): the station process's CPU time (utime + stime from
/proc/PID/stat) per second, in % of one core, absolute: with N pages connected and idle,
and with the same N pages rung. Every source is configured through the station's own
config file ([media.camera]) and shows the same picture, an H.264 file this script makes
once with libx264 (Annex-B, 640x480, 15 fps, an IDR every second):
  software     the file decoded by PyAV, VP8 encoded once for every rung peer (the default)
  software-per-device  the same, VP8 encoded by aiortc for each peer (vp8_per_device)
  encode-once  the file decoded by PyAV, H.264 encoded once (libx264) for every peer
  passthrough  the file's H.264 packets as they are (H264PassthroughCamera), no codec

Latency sources: synthetic (the simulated station's camera, VP8 encoded once for every
rung peer), synthetic-per-device (the same, VP8 encoded by aiortc per peer) and
synthetic-encode-once (the same camera, H.264 encoded once), or any CPU source.

Usage: scripts/bench call [--calls N] [--latency-sources A,B] [--busy-core]
                          [--cpu-sources A,B] [--peers 1,2,4,8] [--cpu-seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
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
SPEAKER_ONSETS = "speaker-onsets"  # times the door speaker started hearing sound
ONSET_GAP_S = 0.3
VIDEO = {"width": 640, "height": 480, "fps": 15, "idr_every": 15, "seconds": 20}

# [media.camera] of each source; "file" is replaced by the H.264 file's path.
CAMERAS: dict[str, dict[str, Any]] = {
    "synthetic": {"source": "synthetic"},
    "synthetic-per-device": {"source": "synthetic", "vp8_per_device": True},
    "synthetic-encode-once": {"source": "synthetic", "encode_once": True},
    "software": {"source": "file", "device": "file"},
    "software-per-device": {"source": "file", "device": "file", "vp8_per_device": True},
    "encode-once": {"source": "file", "device": "file", "encode_once": True},
    "passthrough": {"source": "file", "device": "file", "passthrough": True},
}


def make_h264(path: Path) -> Path:
    """The door camera's picture as an Annex-B H.264 file (libx264, an IDR every second).

    A moving test picture (FFmpeg's testsrc2) with a little sensor-like noise, so that
    every frame differs as a real camera's do.
    """
    import av  # noqa: PLC0415

    if path.exists():
        return path
    w, h, fps = VIDEO["width"], VIDEO["height"], VIDEO["fps"]
    graph = f"testsrc2=size={w}x{h}:rate={fps},noise=alls=6:allf=t+u,format=yuv420p"
    partial = path.with_suffix(".part")
    with av.open(graph, format="lavfi") as src, av.open(str(partial), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 1_000_000
        keyint = VIDEO["idr_every"]
        stream.options = {
            "preset": "veryfast",
            "tune": "zerolatency",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:repeat-headers=1",
        }
        for n, frame in enumerate(src.decode(video=0)):
            if n >= fps * VIDEO["seconds"]:
                break
            frame.pts = None
            frame.pict_type = av.video.frame.PictureType.NONE  # lavfi marks every frame I
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    partial.replace(path)
    return path


def write_config(path: Path, camera: dict[str, Any], video: Path) -> Path:
    """A station config: one bell for flat 1, a relay, any free web port, this camera."""
    keys = {**camera, "width": VIDEO["width"], "height": VIDEO["height"], "fps": VIDEO["fps"]}
    if keys.get("device") == "file":
        keys["device"] = str(video)
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text(
        '[station]\nid = "bench"\n\n[hardware]\npin_factory = "mock"\n\n'
        '[[hardware.buttons]]\nname = "bell"\npin = 17\nflat = "1"\n\n'
        "[hardware.relay]\npin = 27\n\n[web]\nport = 0\n\n"
        "[media.camera]\n" + "\n".join(lines) + "\n"
    )
    return path


def station_worker() -> None:
    """``intercom run`` in this process, its door speaker noting when sound starts."""
    import intercom.station as station_module  # noqa: PLC0415

    state_dir = Path(sys.argv[sys.argv.index("--state-dir") + 1])
    onsets = state_dir / SPEAKER_ONSETS
    open_audio = station_module.open_audio

    def timed_audio(config: Any) -> Any:
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


def start_station(source: str, workdir: Path, video: Path, timed_audio: bool) -> SimStation:
    """A simulated station with the source's camera config; the plain daemon for CPU runs."""
    state = workdir / f"state-{source}"
    config = write_config(workdir / f"{source}.toml", CAMERAS[source], video)
    if timed_audio:
        command = [sys.executable, __file__, "--station-worker"]
    else:
        command = [sys.executable, "-m", "intercom"]
    return SimStation(state, ("--config", str(config)), command=command)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def figures(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p95": pct(values, 0.95),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:44s} (none)"
    f = figures(values)
    return (
        f"{name:44s} median {f['median']:6.1f} ms   p95 {f['p95']:6.1f} ms"
        f"   min {f['min']:6.1f}   max {f['max']:6.1f}   (n={f['n']})"
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


def clock_skew(page: Any) -> float:
    """The page's clock minus time.time(), in ms (at most the bracket's width off)."""
    before = time.time()
    page_now = page.evaluate("performance.timeOrigin + performance.now()")
    after = time.time()
    return float(page_now - (before + after) / 2 * 1000)


FIRST_FRAME = """(pressed) => {
  const w = window.intercom, r = w.rings.at(-1);
  if (!r || r.at < pressed || r.painted === undefined) return null;
  const i = w.frames.findIndex(t => t >= pressed);
  if (i < 0) return null;
  return {ring: r, frame: w.frames[i], received: w.received[i], decoded: w.decoded[i],
          composited: w.composited[i]};
}"""


def latency(station: SimStation, page: Any, calls: int) -> dict[str, list[float]]:
    keys = (
        "ring_message", "ring_shown", "ring_painted", "presented",
        "station_press", "released", "received", "decoded", "composited", "audio", "skew",
    )  # fmt: skip
    out: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(calls):
        time.sleep(random.uniform(0.5, 2.0))  # noqa: S311 - a pause, not a secret
        out["skew"].append(clock_skew(page))
        pressed = station.press() * 1000  # epoch ms, just before the request was sent
        handle = page.wait_for_function(FIRST_FRAME, arg=pressed, timeout=10000)
        seen = handle.json_value()
        ring = seen["ring"]
        out["ring_message"].append(ring["at"] - pressed)
        out["ring_shown"].append(ring["shown"] - pressed)
        out["ring_painted"].append(ring["painted"] - pressed)
        out["presented"].append(seen["frame"] - pressed)
        out["received"].append(seen["received"] - pressed)
        out["decoded"].append(seen["decoded"] - pressed)
        out["composited"].append(seen["composited"] - pressed)
        out["station_press"].append(ring["pressed"] - pressed)
        tapped = time.time()
        page.click("#btn-answer")
        wait_call_state(page, "in_call")
        first_audio = wait_onset(station, tapped)
        out["audio"].append((first_audio - tapped) * 1000)
        timing = station.status()["calls"]["last_call"] or {}
        if timing.get("first_frame_at"):
            out["released"].append(timing["first_frame_at"] * 1000 - pressed)
        page.click("#btn-hangup")
        wait_call_state(page, "idle")
        station.wait("idle", lambda s: s["call"] == "idle")
    return out


def sample_cpu(pid: int, seconds: float) -> float:
    """The process's CPU time per second over ``seconds``, as a fraction of one core."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def frames_decoded(pages: list[Any]) -> list[int]:
    return [int(page.evaluate("window.intercom.stats()")["framesDecoded"]) for page in pages]


def cpu_with(station: SimStation, pages: list[Any], seconds: float) -> dict[str, float]:
    """Absolute station CPU with ``pages`` connected: idle, then all of them rung."""
    pid = station.proc.pid
    station.wait("idle", lambda s: s["call"] == "idle")
    time.sleep(1)
    idle = sample_cpu(pid, seconds)
    station.press()
    for page in pages:
        wait_call_state(page, "ringing")
    time.sleep(1)  # connections warm (encoders made, keyframes sent)
    before, t0 = frames_decoded(pages), time.monotonic()
    ringing = sample_cpu(pid, seconds)
    elapsed = time.monotonic() - t0
    after = frames_decoded(pages)
    station.request({"request": "hangup"})
    for page in pages:
        wait_call_state(page, "idle")
    fps = [(a - b) / elapsed for a, b in zip(after, before, strict=True)]
    return {"idle": idle, "ringing": ringing, "fps_min": min(fps)}


def run_cpu(source: str, workdir: Path, video: Path, peers: list[int], seconds: float) -> Any:
    station = start_station(source, workdir, video, timed_audio=False)
    result: dict[str, Any] = {}
    try:
        with chromium(station.url) as browser:
            devices = []
            for _ in range(max(peers)):
                context, page = new_device(browser, station.url)
                pair_device(page, station.pair_link("1"))
                devices.append((context, page))
            for n in sorted(peers, reverse=True):
                for context, _ in devices[n:]:
                    context.close()
                devices = devices[:n]
                station.wait(f"{n} online", lambda s, n=n: s["calls"]["devices_online"] == n)
                result[str(n)] = cpu_with(station, [p for _, p in devices], seconds)
                print(f"  {source}: {n} peer(s) {result[str(n)]}", file=sys.stderr)
    except Exception:
        print(station.log(), file=sys.stderr)
        raise
    finally:
        station.stop()
    return result


def run_latency(
    source: str, workdir: Path, video: Path, calls: int, flags: list[str]
) -> dict[str, list[float]]:
    station = start_station(source, workdir, video, timed_audio=True)
    try:
        tone = tone_wav(workdir / "voice.wav")
        args = (f"--use-file-for-fake-audio-capture={tone}", *flags)
        with chromium(station.url, args) as browser:
            _, page = new_device(browser, station.url)
            pair_device(page, station.pair_link("1"))
            return latency(station, page, calls)
    except Exception:
        print(station.log(), file=sys.stderr)
        raise
    finally:
        station.stop()


def busy_core() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy (nice 0, like any other job on the machine).

    It ends with the benchmark, however that ends (a killed benchmark left it running).
    """
    loop = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
    return subprocess.Popen([sys.executable, "-c", loop])


def report_latency(source: str, lat: dict[str, list[float]], busy: bool, flags: list[str]) -> None:
    print(f"\n== latency, {source} source{' (one core kept busy)' if busy else ''} ==")
    if flags:
        print(f"(Chromium with {' '.join(flags)})")
    print(summary("press -> ring message handled by the page", lat["ring_message"]))
    print(summary("press -> ring screen shown", lat["ring_shown"]))
    print(summary("press -> ring screen painted (next frame)", lat["ring_painted"]))
    print(summary("press -> first frame PRESENTED", lat["presented"]))
    print("  breakdown:")
    print(summary("  press -> station's press stamp", lat["station_press"]))
    print(summary("  press -> station releases first frame", lat["released"]))
    print(summary("  press -> first frame's last packet received", lat["received"]))
    print(summary("  press -> that + decoder's time", lat["decoded"]))
    print(summary("  press -> first frame to the compositor", lat["composited"]))
    print(summary("answer tap -> first resident audio at door", lat["audio"]))
    skew = lat["skew"]
    print(f"page clock - time.time(): {min(skew):+.2f} .. {max(skew):+.2f} ms")


def report_cpu(cpu: dict[str, Any]) -> None:
    print("\n== station CPU, % of one core, absolute (idle with the pages connected / rung) ==")
    peers = sorted({int(n) for data in cpu.values() for n in data})
    print(f"{'source':14s}" + "".join(f"{f'{n} peer(s)':>22s}" for n in peers))
    for source, data in cpu.items():
        cells = []
        for n in peers:
            c = data.get(str(n))
            cells.append(
                f"{c['idle'] * 100:6.1f} / {c['ringing'] * 100:5.1f} ({c['fps_min']:4.1f}fps)"
                if c
                else "-"
            )
        print(f"{source:14s}" + "".join(f"{cell:>22s}" for cell in cells))
    if "passthrough" in cpu:
        pt = cpu["passthrough"]
        if "1" in pt and "4" in pt:
            ratio = pt["4"]["ringing"] / pt["1"]["ringing"]
            print(f"passthrough rung: 4 peers / 1 peer = {ratio:.2f}x")
        for other in ("software", "encode-once"):
            if other not in cpu:
                continue
            for n in peers:
                a, b = cpu[other].get(str(n)), pt.get(str(n))
                if a and b:
                    print(
                        f"{other} / passthrough rung, {n} peer(s): "
                        f"{a['ringing'] / b['ringing']:.1f}x"
                    )
            lo, hi = str(min(peers)), str(max(peers))
            if lo != hi and lo in pt and hi in pt and lo in cpu[other] and hi in cpu[other]:
                span = int(hi) - int(lo)
                slope_o = (cpu[other][hi]["ringing"] - cpu[other][lo]["ringing"]) / span
                slope_p = (pt[hi]["ringing"] - pt[lo]["ringing"]) / span
                print(
                    f"each added peer ({lo} -> {hi} rung): {other} {slope_o * 100:.2f} %, "
                    f"passthrough {slope_p * 100:.2f} % of a core"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="presses timed per source")
    parser.add_argument("--latency-sources", default="synthetic", help="'' for none")
    parser.add_argument("--busy-core", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument("--cpu-sources", default="software,encode-once,passthrough")
    parser.add_argument("--peers", default="1,2,4,8", help="rung pages per CPU sample")
    parser.add_argument("--cpu-seconds", type=float, default=10, help="seconds per CPU sample")
    parser.add_argument("--keep", type=Path, default=None, help="keep the H.264 file here")
    parser.add_argument("--chromium-arg", action="append", default=[], help="extra flag")
    args = parser.parse_args()
    latency_sources = [s for s in args.latency_sources.split(",") if s]
    cpu_sources = [s for s in args.cpu_sources.split(",") if s]
    for source in latency_sources + cpu_sources:
        if source not in CAMERAS:
            parser.error(f"unknown source {source!r}: one of {', '.join(CAMERAS)}")
    peers = [int(n) for n in args.peers.split(",") if n]
    started = time.time()
    load = [os.getloadavg()[0]]
    results: dict[str, Any] = {
        "latency": {},
        "cpu": {},
        "busy_core": args.busy_core,
        "chromium_args": args.chromium_arg,
    }
    with tempfile.TemporaryDirectory(prefix="bench-call-") as tmp:
        workdir = Path(tmp)
        video = make_h264(args.keep or workdir / "door.h264")
        burner = busy_core() if args.busy_core and latency_sources else None
        try:
            for source in latency_sources:
                results["latency"][source] = run_latency(
                    source, workdir, video, args.calls, args.chromium_arg
                )
                load.append(os.getloadavg()[0])
        finally:
            if burner is not None:
                burner.kill()
                burner.wait()
        for source in cpu_sources:
            results["cpu"][source] = run_cpu(source, workdir, video, peers, args.cpu_seconds)
            load.append(os.getloadavg()[0])
    for source, lat in results["latency"].items():
        report_latency(source, lat, args.busy_core, args.chromium_arg)
    if results["cpu"]:
        report_cpu(results["cpu"])
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(started))
    print(
        f"\n(started {when} UTC, {time.time() - started:.0f} s; load average (1 min) "
        f"{min(load):.1f}-{max(load):.1f} at the start and after each source)"
    )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--station-worker":
        station_worker()
    sys.exit(main())
