"""Benchmark a building's worth of resident devices online at one station.

For each device count N (--devices, default 1,10,50,100): a simulated station
(``intercom run --simulate`` with one button per flat, 640x480 at 15 fps) and N aiortc
devices in worker processes (--per-process devices each), paired through ``/api/pair``
and signed in as docs/calls.md describes (a challenge signed with the device key, the
station's offer answered, audio ``sendrecv`` with no track until a call is answered).
Each device comes from its own loopback address (127.0.1.x), as phones on a LAN do.

Measured, all on the machine's wall clock (``time.time()`` in every process):
  * with every device connected and the station idle for --idle-seconds: the station
    process's RSS, threads, descriptors and CPU (% of one core, from /proc/PID/stat),
    the kernel's UDP receive-buffer drops (/proc/net/snmp, machine-wide) and how many
    devices lost their connection and signed in again;
  * --presses presses, rotating over the flats that have a device online; the press time
    is taken just before the press request goes to the station's control socket; the
    ends are a device's receipt of the ``ring`` message (every rung device; "whole flat"
    is the last device of the flat), and the first video frame decoded by the device
    that answers (the flat's first device, which accepts on that frame). The door then
    hangs up.

A breakdown beside the first frame: press -> the station releases the call's first
video frame to the first of the rung devices' senders, and to the last of them
(``first_frame_at`` and ``last_first_frame_at`` of ``last_call`` in the control
socket's status, the station's clock, the same machine's). Each sender packetises and
sends a whole frame before the next one takes its frame, so the second is the first
plus sending the frame to the others.

--idle-audio makes the devices behave as the web client did before: a (silent) audio
track attached from the start, i.e. 50 audio packets/s from every idle device.
--split-cores runs the station on the first CPU and every device process on the others
(``taskset``), so the devices' own work (decoding what they are sent, their jitter
buffers) does not share the station's core: phones do their own decoding. The answering
devices (each flat's first) then run in processes of their own, and the others at the
lowest priority (``nice -n 19``), so that the ten rung devices' decoders on the bench's
one core do not queue before the answerer's as they would not on ten phones.

Usage: scripts/bench devices [--devices 1,10,50,100] [--flats 10] [--idle-seconds 30]
       [--presses 20] [--per-process 10]
       [--camera encode-once|software|software-per-device|passthrough]
       [--idle-audio] [--split-cores] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TICKS = os.sysconf("SC_CLK_TCK")
# The buttons' pins: not 22, 23, 27 (contact, tamper, relay)
PINS = [5, 6, 12, 13, 16, 17, 19, 20, 21, 24, 25, 26, 4, 18]
COALESCE_S = 3.2
NICE = ["nice", "-n", "19"]  # --split-cores: the devices that do not answer
CAMERA_FPS = 15  # the config below
RING_WAIT_S = 5.0
CONNECT_WAIT_S = 180.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def address(index: int) -> str:
    """The loopback source address of device ``index`` (127.0.1.1, 127.0.1.2, ...)."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


# ------------------------------------------------------------------ the device processes


class BenchDevice:
    """One resident device: its socket, its peer connection, what it saw (to stdout)."""

    def __init__(self, spec: dict[str, Any], url: str, fp: str, idle_audio: bool) -> None:
        from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
            load_pem_private_key,
        )

        self.index: int = spec["index"]
        self.principal: str = spec["principal"]
        self.answerer: bool = spec["answerer"]
        self.key: Any = load_pem_private_key(spec["key"].encode(), None)
        self.url = url
        self.fp = bytes.fromhex(fp)
        self.idle_audio = idle_audio
        self.call: str | None = None
        self.want_frame = False
        self.ws: Any = None
        self.sender: Any = None
        self.pc: Any = None
        self.number = 0  # the station's number of the current connection
        from aiortc.mediastreams import AudioStreamTrack  # noqa: PLC0415

        self.mic = AudioStreamTrack()  # silence: only its packets matter here

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"e": event, "d": self.index, "t": time.time(), **fields})
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def run(self) -> None:
        while True:
            try:
                await self.session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a device just tries again
                self.emit("lost", why=f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(1.0)

    async def session(self) -> None:
        import aiohttp  # noqa: PLC0415

        connector = aiohttp.TCPConnector(local_addr=(address(self.index), 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            try:
                ws = self.ws = await http.ws_connect(
                    self.url + "ws", ssl=aiohttp.Fingerprint(self.fp)
                )
                challenge = await ws.receive_json(timeout=60)
                data = f"intercom-auth:{challenge['station']}:{challenge['nonce']}".encode()
                signature = b64url(self.key.sign(data))
                await ws.send_json(
                    {"type": "auth", "principal": self.principal, "signature": signature}
                )
                ready = await ws.receive_json(timeout=60)
                if ready.get("type") != "ready":
                    raise RuntimeError(f"not signed in: {ready}")
                self.emit("ready")
                offer = await ws.receive_json(timeout=60)
                await self.answer(offer)
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        await self.on_message(json.loads(message.data))
                self.emit("lost", why=f"socket closed {ws.close_code}")
            finally:
                self.want_frame = False
                if self.pc is not None:
                    await asyncio.shield(self.pc.close())
                    self.pc = None

    async def answer(self, offer: dict[str, Any]) -> None:
        """Answer an offer as docs/calls.md says: a new number is a new connection (the
        first, and the idle one after each call), the same number a ring's media."""
        from aiortc import (  # noqa: PLC0415
            RTCConfiguration,
            RTCPeerConnection,
            RTCSessionDescription,
        )

        if self.pc is None or offer["peer"] != self.number:
            old = self.pc
            pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            self.number = offer["peer"]
            pc.on("track", lambda track: asyncio.ensure_future(self.consume(track)))

            @pc.on("connectionstatechange")
            async def changed() -> None:
                if pc is not self.pc:
                    return
                self.emit("state", state=pc.connectionState)
                if pc.connectionState == "failed" and self.ws is not None:
                    await self.ws.close()  # as the web client: a fresh sign-in, a fresh offer

            if old is not None:
                await asyncio.shield(old.close())
        pc = self.pc
        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        audio = next(t for t in pc.getTransceivers() if t.kind == "audio")
        audio.direction = "sendrecv"
        self.sender = audio.sender
        if self.idle_audio:
            self.sender.replaceTrack(self.mic)
        await pc.setLocalDescription(await pc.createAnswer())
        if self.ws is None:
            return
        await self.ws.send_json(
            {"type": "answer", "sdp": pc.localDescription.sdp, "peer": self.number}
        )

    async def on_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "offer":
            await self.answer(msg)
        elif msg["type"] == "ring":
            self.call = msg["call"]
            self.want_frame = True
            self.emit("ring", call=msg["call"])
        elif msg["type"] == "call" and msg.get("call") == self.call:
            on = msg["state"] == "answered"
            if not self.idle_audio:
                self.sender.replaceTrack(self.mic if on else None)
            self.emit("call", call=self.call, state=msg["state"])
            if not on:
                self.want_frame = False

    async def consume(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError  # noqa: PLC0415

        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video" and self.want_frame:
                self.want_frame = False
                self.emit("frame", call=self.call)
                if self.answerer and self.ws is not None:
                    await self.ws.send_json({"type": "accept", "call": self.call})


async def worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())  # noqa: ASYNC240 - once, before anything runs
    devices = [BenchDevice(d, spec["url"], spec["fp"], spec["idle_audio"]) for d in spec["devices"]]
    tasks = []
    for device in devices:
        tasks.append(asyncio.create_task(device.run()))
        await asyncio.sleep(spec["stagger_s"])
    await asyncio.gather(*tasks)


# ------------------------------------------------------------------ the station and its control


def camera_keys(camera: str, work: Path) -> str:
    """The ``[media.camera]`` keys of a bench source (640x480 at 15 fps)."""
    if camera == "passthrough":  # the Pi's path: packets of an H.264 encoder as they are
        from bench_call import make_h264  # noqa: PLC0415 - scripts/ is on the path

        video = make_h264(work / "door.h264")
        return f'source = "file"\ndevice = "{video}"\npassthrough = true'
    if camera == "software-per-device":  # aiortc's own VP8 encoder in every rung sender
        return 'source = "synthetic"\nvp8_per_device = true'
    encode_once = "true" if camera == "encode-once" else "false"
    return f'source = "synthetic"\nencode_once = {encode_once}'


def write_config(path: Path, state_dir: Path, flats: int, camera: str) -> None:
    buttons = ", ".join(
        f'{{ name = "bell{f}", pin = {PINS[f - 1]}, flat = "{f}" }}' for f in range(1, flats + 1)
    )
    path.write_text(
        f"""[station]
id = "bench"
state_dir = "{state_dir}"

[hardware]
pin_factory = "mock"
buttons = [{buttons}]
relay = {{ pin = 27, door = "front" }}
door_contact = {{ pin = 22 }}
tamper = {{ pin = 23 }}

[media.camera]
{camera_keys(camera, path.parent)}
width = 640
height = 480
fps = 15

[web]
host = "127.0.0.1"
port = 0

[calls]
ring_timeout_s = 30
"""
    )


class Station:
    """``intercom run --simulate --config`` as its own process."""

    def __init__(self, work: Path, flats: int, camera: str, cpus: list[str] | None = None) -> None:
        self.cpus = cpus or []  # a command prefix (taskset) for the station's process
        self.state_dir = work / "state"
        self.config = work / "intercom.toml"
        write_config(self.config, self.state_dir, flats, camera)
        self.log = (work / "station.log").open("a")
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.fp = ""

    async def start(self) -> None:
        env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
        self.proc = await asyncio.create_subprocess_exec(
            *self.cpus,
            sys.executable,
            "-m",
            "intercom",
            "run",
            "--simulate",
            "--config",
            str(self.config),
            env=env,
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status = (await self.ask({"request": "status"}))["status"]
                if status["listening"].get("web"):
                    self.url = status["listening"]["web"]
                    break
            except (OSError, KeyError, ValueError):
                pass
            await asyncio.sleep(0.1)
        else:
            raise SystemExit("station did not start; see station.log")
        # The devices pin the certificate the station presents (its leaf: the pairing
        # link's fingerprint is the station CA's, which a device would install instead).
        from cryptography import x509  # noqa: PLC0415
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415

        leaf = x509.load_pem_x509_certificate((self.state_dir / "keys/tls.crt").read_bytes())
        self.fp = leaf.fingerprint(hashes.SHA256()).hex()

    async def ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        from tests.browser import control_request  # noqa: PLC0415 - not in the device processes

        return (await asyncio.to_thread(control_request, self.state_dir, payload))[1]

    async def hangup(self) -> None:
        """End the call from the door and wait until the station is idle again."""
        await self.ask({"request": "hangup"})
        for _ in range(100):
            if (await self.ask({"request": "status"}))["status"]["call"] == "idle":
                return
            await asyncio.sleep(0.05)

    async def press(self, flat: int) -> float:
        from tests.browser import control_request  # noqa: PLC0415 - not in the device processes

        press = {"request": "sim", "action": "press", "button": f"bell{flat}"}
        sent, answer = await asyncio.to_thread(control_request, self.state_dir, press)
        if not answer.get("ok"):
            raise SystemExit(f"press refused: {answer}")
        return sent

    def proc_figures(self) -> dict[str, float]:
        if self.proc is None:
            raise RuntimeError("station not started")
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]),
            "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
            "cpu_s": cpu_seconds(pid),
        }

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def udp_rcvbuf_errors() -> int:
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    udp = [line for line in lines if line[0] == "Udp:"]
    return int(dict(zip(udp[0][1:], udp[1][1:], strict=True))["RcvbufErrors"])


async def pair_all(station: Station, count: int, flats: int) -> list[dict[str, Any]]:
    """Pair ``count`` devices over /api/pair (flats round-robin), each from its own address."""
    import aiohttp  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    made = []
    for index in range(count):
        flat = str(1 + index % flats)
        code = (await station.ask({"request": "pair", "flat": flat}))["code"]
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        connector = aiohttp.TCPConnector(local_addr=(address(index), 0))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(
                station.url + "api/pair",
                json={"code": code, "jwk": jwk, "name": f"bench {index}"},
                ssl=aiohttp.Fingerprint(bytes.fromhex(station.fp)),
            ) as response,
        ):
            body = await response.json()
            if response.status != 200:
                raise SystemExit(f"pairing device {index} failed: {body}")
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        made.append({"index": index, "principal": body["principal"], "flat": flat, "key": pem})
    return made


# ------------------------------------------------------------------ one round


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {pct(values, 0.95):.1f} ms"


class Collector:
    """What the device processes report, by kind."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.readers: list[asyncio.Task[None]] = []

    async def read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue
            self.changed.set()

    def of(self, kind: str, since: float = 0.0, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["e"] == kind and e["t"] >= since and all(e.get(k) == v for k, v in fields.items())
        ]

    async def until(self, check: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
        return True


async def start_workers(
    args: argparse.Namespace, work: Path, station: Station, online: list[dict[str, Any]]
) -> tuple[list[asyncio.subprocess.Process], Collector]:
    """The device processes, each hosting --per-process devices, reporting to a collector."""
    answerers = answerers_of(online)
    collector = Collector()
    procs = []
    groups = [online]
    if args.split_cores:  # the answering devices in processes of their own, first in line
        groups = [
            [d for d in online if answerers[d["flat"]] == d["index"]],
            [d for d in online if answerers[d["flat"]] != d["index"]],
        ]
    size = args.per_process
    chunks = [group[i : i + size] for group in groups for i in range(0, len(group), size)]
    devices_prefix = cpu_split(args)[1]
    for number, chunk in enumerate(chunks):
        answering = all(answerers[d["flat"]] == d["index"] for d in chunk)
        prefix = devices_prefix + ([] if answering or not args.split_cores else NICE)
        spec = {
            "url": station.url,
            "fp": station.fp,
            "idle_audio": args.idle_audio,
            "stagger_s": 0.05,
            "devices": [{**d, "answerer": answerers[d["flat"]] == d["index"]} for d in chunk],
        }
        spec_path = work / f"worker-{number}.json"
        spec_path.write_text(json.dumps(spec))
        with (work / "workers.log").open("a") as errors:
            proc = await asyncio.create_subprocess_exec(
                *prefix,
                sys.executable,
                __file__,
                "--worker",
                str(spec_path),
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
                limit=1 << 20,
            )
        procs.append(proc)
        if proc.stdout is not None:
            collector.readers.append(asyncio.create_task(collector.read(proc.stdout)))
    return procs, collector


def cpu_split(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The command prefixes for the station and the device processes (--split-cores)."""
    if not args.split_cores:
        return [], []
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--split-cores: needs at least two CPUs")
    rest = ",".join(str(c) for c in cpus[1:])
    return ["taskset", "-c", str(cpus[0])], ["taskset", "-c", rest]


def answerers_of(online: list[dict[str, Any]]) -> dict[str, int]:
    """The device of each flat that answers its rings: the flat's first."""
    answerers: dict[str, int] = {}
    for device in online:
        answerers.setdefault(device["flat"], device["index"])
    return answerers


async def idle_window(
    args: argparse.Namespace, station: Station, collector: Collector
) -> dict[str, Any]:
    """The station's cost with every device connected and nobody at the door."""
    since = time.time()
    drops0, fig0 = udp_rcvbuf_errors(), station.proc_figures()
    await asyncio.sleep(args.idle_seconds)
    drops1, fig1 = udp_rcvbuf_errors(), station.proc_figures()
    return {
        "rss_mib": fig1["rss_mib"],
        "threads": fig1["threads"],
        "fds": fig1["fds"],
        "idle_cpu": (fig1["cpu_s"] - fig0["cpu_s"]) / args.idle_seconds * 100,
        "udp_drops_per_s": (drops1 - drops0) / args.idle_seconds,
        "idle_lost": len(collector.of("lost", since=since)),
        "idle_signins": len(collector.of("ready", since=since)),
    }


async def presses(
    args: argparse.Namespace, station: Station, collector: Collector, online: list[dict[str, Any]]
) -> dict[str, Any]:
    """Press the flats' buttons in turn; ring and first-frame times as the devices saw them."""
    answerers = answerers_of(online)
    ring_each: list[float] = []
    ring_flat: list[float] = []
    first_frame: list[float] = []
    released: list[float] = []
    released_all: list[float] = []
    missed_rings = no_frame = 0
    last_press: dict[int, float] = defaultdict(lambda: -1e9)
    began, cpu0 = time.time(), station.proc_figures()["cpu_s"]
    phase = random.Random(len(online))  # noqa: S311 - a spread of pauses, not a secret
    # Only flats with a device online: with fewer devices than flats (one device: flat 1
    # alone), every press still rings someone.
    flats = sorted({int(d["flat"]) for d in online})
    for number in range(args.presses if online else 0):
        flat = flats[number % len(flats)]
        rung = [d["index"] for d in online if d["flat"] == str(flat)]
        if not rung:
            continue
        await asyncio.sleep(max(0.0, last_press[flat] + COALESCE_S - time.monotonic()))
        last_press[flat] = time.monotonic()
        # 0.2 s and a random part of a frame interval: the last press ended on a frame's
        # arrival, so a fixed pause would press at one phase of the camera's frame clock
        # for the whole run (and the next frame, which the device's jitter buffer waits
        # for, would come equally late each time: 30-61 ms at one device over four runs).
        await asyncio.sleep(0.2 + phase.uniform(0.0, 1 / CAMERA_FPS))
        pressed = await station.press(flat)
        answerer = answerers[str(flat)]

        def done(
            pressed: float = pressed, rung: list[int] = rung, answerer: int = answerer
        ) -> bool:
            rang = {e["d"] for e in collector.of("ring", since=pressed)}
            framed = {e["d"] for e in collector.of("frame", since=pressed)}
            return set(rung) <= rang and answerer in framed

        await collector.until(done, RING_WAIT_S)
        rings = {e["d"]: e["t"] for e in collector.of("ring", since=pressed) if e["d"] in rung}
        frames = {e["d"]: e["t"] for e in collector.of("frame", since=pressed)}
        ring_each += [(t - pressed) * 1000 for t in rings.values()]
        missed_rings += len(rung) - len(rings)
        if len(rings) == len(rung):
            ring_flat.append((max(rings.values()) - pressed) * 1000)
        if answerer in frames:
            first_frame.append((frames[answerer] - pressed) * 1000)
        else:
            no_frame += 1
        timing = (await station.ask({"request": "status"}))["status"]["calls"]["last_call"]
        if timing and timing.get("first_frame_at"):
            released.append((timing["first_frame_at"] - pressed) * 1000)
            released_all.append((timing["last_first_frame_at"] - pressed) * 1000)
        await station.hangup()
    seconds = max(time.time() - began, 1e-9)
    return {
        "ring_each": fmt(ring_each),
        "ring_flat": fmt(ring_flat),
        "first_frame": fmt(first_frame),
        "released": fmt(released),
        "released_all": fmt(released_all),
        "missed_rings": missed_rings,
        "no_frame": no_frame,
        "press_cpu": (station.proc_figures()["cpu_s"] - cpu0) / seconds * 100,
    }


async def one_round(
    args: argparse.Namespace, work: Path, count: int, paired: list[dict[str, Any]]
) -> dict[str, Any]:
    """Start a station and ``count`` devices; the idle figures, then the presses."""
    station = Station(work, args.flats, args.camera, cpu_split(args)[0])
    await station.start()
    online = paired[:count]
    procs: list[asyncio.subprocess.Process] = []
    collector = Collector()
    try:
        procs, collector = await start_workers(args, work, station, online)

        def all_connected() -> bool:
            return len({e["d"] for e in collector.of("state", state="connected")}) >= count

        began = time.time()
        await collector.until(all_connected, CONNECT_WAIT_S)
        up = len({e["d"] for e in collector.of("state", state="connected")})
        print(f"  {up} of {count} devices connected in {time.time() - began:.1f} s", flush=True)
        await asyncio.sleep(5)  # settle
        result = {"devices": count, **await idle_window(args, station, collector)}
        result.update(await presses(args, station, collector, online))
        result["lost_total"] = len(collector.of("lost"))
        print("  " + json.dumps(result), flush=True)
        with (work / f"events-{count}.jsonl").open("w") as out:
            out.writelines(json.dumps(e) + "\n" for e in collector.events)
        return result
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
        for proc in procs:
            await proc.wait()
        for reader in collector.readers:
            reader.cancel()
        await station.stop()


async def main(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.devices.split(",")]
    if args.flats > len(PINS):
        raise SystemExit(f"--flats: at most {len(PINS)}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-devices-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    audio = "idle devices send silence" if args.idle_audio else "no audio from idle devices"
    if args.split_cores:
        audio += "; station and devices on separate cores"
    print(
        f"bench devices: {when} UTC, {os.cpu_count()} cores, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; devices {counts}, {args.flats} flats, "
        f"{args.per_process} devices a process, camera {args.camera}, "
        f"idle {args.idle_seconds:.0f} s, {args.presses} presses, {audio}",
        flush=True,
    )
    try:
        paired_file = work / "paired.json"
        paired: list[dict[str, Any]] = (
            json.loads(paired_file.read_text()) if paired_file.exists() else []
        )
        if len(paired) < max(counts):
            station = Station(work, args.flats, args.camera, cpu_split(args)[0])
            await station.start()
            try:
                paired = await pair_all(station, max(counts), args.flats)
            finally:
                await station.stop()
            paired_file.write_text(json.dumps(paired))
        results = []
        for count in counts:
            print(f"{count} devices:", flush=True)
            results.append(await one_round(args, work, count, paired))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        "| devices | RSS | threads / fds | idle CPU | UDP drops | devices lost while idle "
        "| press -> ring, each device p50 / p95 | whole flat p50 / p95 "
        "| first frame at the answerer | station releases first frame: to one device "
        "| to every rung device | rings missed | CPU while pressing |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['devices']} | {r['rss_mib']:.0f} MiB | {r['threads']} / {r['fds']} "
            f"| {r['idle_cpu']:.1f} % | {r['udp_drops_per_s']:.0f}/s | {r['idle_lost']} "
            f"| {r['ring_each']} | {r['ring_flat']} | {r['first_frame']} (none: {r['no_frame']}) "
            f"| {r['released']} | {r['released_all']} | {r['missed_rings']} "
            f"| {r['press_cpu']:.0f} % |"
        )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench devices",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--devices", default="1,10,50,100", help="device counts, comma-separated")
    parser.add_argument("--flats", type=int, default=10, help="flats (one button each)")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--presses", type=int, default=20)
    parser.add_argument("--per-process", type=int, default=10, help="devices in one worker process")
    parser.add_argument(
        "--camera",
        choices=("encode-once", "software", "software-per-device", "passthrough"),
        default="encode-once",
        help="encode-once: one H.264 encoder for every peer (libx264 standing in for the "
        "Pi's hardware encoder), its packets passed through (default); software: the "
        "synthetic camera's frames, one VP8 encoder shared by every rung peer (the "
        "station's default for frame sources); software-per-device: aiortc encodes VP8 "
        "per peer (vp8_per_device = true); passthrough: the packets of an H.264 file (an "
        "IDR a second) as they are, the station's own part of the Pi's path",
    )
    parser.add_argument(
        "--idle-audio", action="store_true", help="idle devices send silence (the old client)"
    )
    parser.add_argument(
        "--split-cores",
        action="store_true",
        help="the station on the first CPU, the device processes on the others (taskset)",
    )
    parser.add_argument("--keep", help="work folder to keep (and reuse its paired devices)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    if arguments.worker:
        asyncio.run(worker(arguments.worker))
    else:
        asyncio.run(main(arguments))
