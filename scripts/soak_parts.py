"""The parts of ``scripts/soak``: its station, its MQTT subscriber, its residents."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_devices as bench  # noqa: E402

from tests.mosquitto import free_port  # noqa: E402

RESIDENTS = Path(__file__).resolve().parent / "soak_residents.py"
READY_RING_S = 5.0  # after a restart, every device is rung within this of READY=1
SETTLE_S = 3.0  # after every resident is online, before the first press
TOTP_STEP_S = 30  # the residents' TOTP time step (RFC 6238's default, the station's)

# Linux's SO_TIMESTAMP (asm-generic/socket.h, x86_64 and arm64), which Python does not name
SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)
TIMEVAL_SPACE = socket.CMSG_SPACE(struct.calcsize("@ll"))  # struct timeval
WEB_PORT_0 = 'host = "127.0.0.1"\nport = 0'
MORE_CONFIG = """
[mqtt]
host = "127.0.0.1"
port = {port}

[eventlog]
retention_hours = 1
epoch_minutes = 1
checkpoint_minutes = 1

[monitor]
interval_s = 10
"""


class StationDied(Exception):  # noqa: N818 - what happened, not an error of the soak's
    """The station process exited during the run."""


class SoakStation(bench.Station):
    """bench_devices' station (one flat) with MQTT, a short ring timeout and fast epochs.

    It tells a notify socket of its own when it is READY, as it would tell systemd; the
    kernel stamps each datagram as it arrives (SO_TIMESTAMP), so READY's time is when
    the station sent it, however late the soak reads it.
    """

    def __init__(self, work: Path, broker_port: int, ring_timeout_s: float) -> None:
        super().__init__(work, 1, "encode-once")
        text = self.config.read_text()
        if "ring_timeout_s = 30" not in text or WEB_PORT_0 not in text:
            raise SystemExit("bench_devices' config has changed: no ring_timeout_s or web port")
        text = text.replace("ring_timeout_s = 30", f"ring_timeout_s = {ring_timeout_s}")
        # one port for the station's life: devices come back to it after a restart
        text = text.replace(WEB_PORT_0, WEB_PORT_0[:-1] + str(free_port()))
        self.config.write_text(text + MORE_CONFIG.format(port=broker_port))
        self.prefix = "intercom/bench"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(work / "notify.sock"))
        self.notify.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        self.notify.setblocking(False)
        os.environ["NOTIFY_SOCKET"] = str(work / "notify.sock")  # for the station processes
        self._last_press = -bench.COALESCE_S

    async def press(self, flat: int) -> float:
        """Press (after the button's coalesce time since the last press)."""
        await asyncio.sleep(max(0.0, self._last_press + bench.COALESCE_S - time.monotonic()))
        self._last_press = time.monotonic()
        try:
            return await super().press(flat)
        except (OSError, ValueError):
            await self.check_alive()
            raise

    async def ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A control request; StationDied when the station is gone."""
        try:
            return await super().ask(payload)
        except (OSError, ValueError):
            await self.check_alive()
            raise

    async def check_alive(self) -> None:
        """Raise StationDied when the station process has exited."""
        if self.proc is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 1)
        if self.proc.returncode is not None:
            raise StationDied(f"the station exited with status {self.proc.returncode} "
                              "(see station.log)")

    async def ready(self, timeout: float = 60) -> float:
        """Wait for the next READY=1 on the notify socket; when it arrived (unix seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, ancillary, _flags, _addr = self.notify.recvmsg(4096, TIMEVAL_SPACE)
            except BlockingIOError:
                await asyncio.sleep(0.02)
                continue
            if b"READY=1" in data.split(b"\n"):
                return arrival(ancillary)
        raise SystemExit(f"no READY=1 within {timeout} s; see station.log")

    def drain_notify(self) -> None:
        """Forget what the last station process said."""
        with contextlib.suppress(BlockingIOError):
            while self.notify.recv(4096):
                pass

    async def kill_and_restart(self) -> float:
        """SIGKILL the station, start it again; when it said READY=1."""
        if self.proc is None:
            raise RuntimeError("station not started")
        self.proc.kill()
        await self.proc.wait()
        self.drain_notify()
        await self.start()
        return await self.ready()


def arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The kernel's SO_TIMESTAMP of a datagram (unix seconds) from recvmsg's ancillary data."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP:
            seconds, micros = struct.unpack("@ll", data[: struct.calcsize("@ll")])
            return seconds + micros / 1e6
    raise RuntimeError("the notify socket gave no SO_TIMESTAMP")


def jti_of(token: str) -> str:
    """The ``jti`` claim of a compact JWS (read, not verified: the station verifies)."""
    payload = token.split(".")[1]
    padded = payload + "=" * (-len(payload) % 4)
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    return str(claims["jti"])


class MqttWatcher:
    """An MQTT 5 subscriber with a persistent session: every event by seq, command results."""

    def __init__(self, port: int, prefix: str) -> None:
        self.port = port
        self.prefix = prefix
        self.events: dict[int, dict[str, Any]] = {}
        self.results: dict[str, str] = {}
        self.client: Any = None
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="soak-mqtt")
        await asyncio.wait_for(self.subscribed.wait(), 10)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        import aiomqtt  # noqa: PLC0415
        from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
        from paho.mqtt.properties import Properties  # noqa: PLC0415

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="soak-watcher", clean_start=False,
                    protocol=aiomqtt.ProtocolVersion.V5, properties=props,
                ) as client:
                    await client.subscribe(f"{self.prefix}/events", qos=1)
                    await client.subscribe(f"{self.prefix}/command/result", qos=1)
                    self.client = client
                    self.subscribed.set()
                    async for message in client.messages:
                        body = json.loads(message.payload)
                        if message.topic.matches(f"{self.prefix}/events"):
                            self.events[body["seq"]] = body
                        elif body.get("jti"):
                            self.results[body["jti"]] = body["result"]
            except aiomqtt.MqttError:
                self.client = None
                await asyncio.sleep(0.2)

    @property
    def last_seq(self) -> int:
        """The highest seq received so far."""
        return max(self.events, default=0)

    def find(self, kind: str, after: int, **details: Any) -> list[dict[str, Any]]:
        """Events of ``kind`` after seq ``after`` whose details match."""
        return [
            e
            for seq, e in sorted(self.events.items())
            if seq > after and e["type"] == kind
            and all(e["details"].get(k) == v for k, v in details.items())
        ]

    async def wait_event(
        self, kind: str, after: int, timeout: float, **details: Any
    ) -> dict[str, Any] | None:
        """The first such event, waiting up to ``timeout``; None if none came."""
        if not await until(lambda: self.find(kind, after, **details), timeout):
            return None
        return self.find(kind, after, **details)[0]

    def granted_after(self, after: int, principal: str) -> list[dict[str, Any]]:
        """UnlockGranted events after ``after`` for ``principal``."""
        return self.find("UnlockGranted", after, principal=principal)

    def events_of_call(self, after: int, call: str) -> list[dict[str, Any]]:
        """Every event after ``after`` naming ``call``."""
        return [e for s, e in sorted(self.events.items()) if s > after
                and e["details"].get("call") == call]

    async def command(self, token: str, timeout: float = 10) -> str:
        """Publish a command on ``<p>/command``; the station's answer, or ``no answer``."""
        jti = jti_of(token)
        if not await until(lambda: self.client is not None, timeout):
            return "no connection"
        await self.client.publish(f"{self.prefix}/command", token, qos=1)
        if not await until(lambda: jti in self.results, timeout):
            return "no answer"
        return self.results[jti]

    async def lost(self, station: SoakStation) -> list[int]:
        """Seqs the station logged that never came, once the subscriber had 15 s to catch up.

        With the station gone, the seqs are read from its log (``intercom log show``).
        """
        try:
            last = (await station.ask({"request": "status"}))["status"]["eventlog"]["last_seq"]
        except (OSError, ValueError, StationDied):
            logged = await logged_seqs(station.state_dir)
            return [seq for seq in logged if seq not in self.events]
        await until(lambda: self.last_seq >= last, 15)
        return [seq for seq in range(1, last + 1) if seq not in self.events]


async def add_devices(station: bench.Station, count: int) -> list[dict[str, Any]]:
    """Register ``count`` resident devices of flat 1 (keys made here); their specs.

    Registered through the ``principals add`` request, which answers with the TOTP
    enrolment the devices need to sign unlock commands (bench_devices' ``pair_all`` does
    not keep the one ``/api/pair`` returns).
    """
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: PLC0415
        Ed25519PrivateKey,
    )

    made = []
    for index in range(count):
        key = Ed25519PrivateKey.generate()
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": bench.b64url(raw)}
        answer = await station.ask({"request": "principals", "action": "add",
                                    "role": "resident", "flats": ["1"], "jwk": jwk})
        if not answer.get("ok"):
            raise SystemExit(f"registering device {index} failed: {answer}")
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        made.append({"index": index, "principal": answer["principal"]["id"], "flat": "1",
                     "key": pem, "totp_uri": answer["totp_uri"]})
    return made


class Residents:
    """The resident processes: aiortc device workers and the Chromium resident."""

    def __init__(
        self, work: Path, station: SoakStation, devices: list[dict[str, Any]],
        args: argparse.Namespace,
    ) -> None:
        self.work = work
        self.station = station
        self.devices = devices
        self.args = args
        self.collector = bench.Collector()
        self.procs: list[asyncio.subprocess.Process] = []
        self.chromium_principal = ""
        self.aiortc_principals = [d["principal"] for d in devices]
        self.online = len(devices)

    async def _spawn(self, mode: str, spec: dict[str, Any], name: str) -> None:
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(spec))
        with (self.work / f"{name}.log").open("a") as errors:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(RESIDENTS), mode, str(path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=errors,
                limit=1 << 20,
            )
        self.procs.append(proc)
        if proc.stdout is not None:
            self.collector.readers.append(asyncio.create_task(self.collector.read(proc.stdout)))

    async def start(self, *, chromium: bool) -> None:
        """Start every resident and wait until the station counts them all online."""
        station = self.station
        per = self.args.per_process
        for start in range(0, len(self.devices), per):
            spec = {"url": station.url, "fp": station.fp, "station": "bench", "door": "front",
                    "devices": self.devices[start : start + per]}
            await self._spawn("--devices", spec, f"devices-{start}")
        if chromium:
            link = (await station.ask({"request": "pair", "flat": "1"}))["url"]
            spec = {"url": station.url, "link": link,
                    "ring_wait_s": self.args.ring_timeout_s + 10}
            await self._spawn("--chromium", spec, "chromium")
            if not await self.collector.until(lambda: self.collector.of("ready", d=None), 90):
                raise SystemExit("the Chromium resident did not pair; see chromium.log")
            self.chromium_principal = self.collector.of("ready", d=None)[0]["principal"]
            self.online += 1
        everyone = {d["index"] for d in self.devices}

        def connected() -> bool:
            return everyone <= {e["d"] for e in self.collector.of("state", state="connected")}

        if not await self.collector.until(connected, 120):
            raise SystemExit("not every aiortc device connected its media; see devices-*.log")
        deadline = time.monotonic() + 60
        while await self.devices_online() < self.online:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {await self.devices_online()} of {self.online} online")
            await asyncio.sleep(0.5)
        await asyncio.sleep(SETTLE_S)

    async def devices_online(self) -> int:
        """How many residents the station has signed in."""
        status = (await self.station.ask({"request": "status"}))["status"]
        return int(status["calls"]["devices_online"])

    def plan(self, plan: dict[str, Any]) -> None:
        """Tell every resident what to do with the next ring."""
        line = (json.dumps(plan) + "\n").encode()
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.write(line)

    async def unlock_over_mqtt(
        self, call: str, who: str, watcher: MqttWatcher, talk_s: float
    ) -> list[str]:
        """The answering device's signed command, sent on MQTT; what went wrong."""
        collector = self.collector
        index = next(d["index"] for d in self.devices if d["principal"] == who)
        # up to a TOTP step late: a device waits for a code it has not sent before
        wait_s = TOTP_STEP_S + 10
        if not await collector.until(lambda: collector.of("unlock", d=index, call=call), wait_s):
            saw = [k for k in ("ring", "frame", "call") if collector.of(k, d=index, call=call)]
            return [f"the answering device made no unlock command (it saw: {saw or 'nothing'})"]
        token = collector.of("unlock", d=index, call=call)[0]["token"]
        result = await watcher.command(token)
        await asyncio.sleep(talk_s)
        return [] if result == "granted" else [f"unlock over MQTT: {result}"]

    async def check_rung(self, call: str, pressed: float, plan: str) -> list[str]:
        """Whether every resident saw the ring, and Chromium did as planned."""
        problems = []
        rang = {e["d"] for e in self.collector.of("ring", call=call)}
        if missing := sorted({d["index"] for d in self.devices} - rang):
            problems.append(f"devices {missing} not rung")
        if self.chromium_principal:
            collector = self.collector

            def done() -> list[dict[str, Any]]:
                return collector.of("done", since=pressed) + collector.of("failed", since=pressed)

            if not await collector.until(done, self.args.ring_timeout_s + 40):
                problems.append("Chromium did not report")
            elif (report := done()[0])["e"] == "failed" or report["plan"] != plan:
                problems.append(f"Chromium: {report}")
            elif report.get("answered") and report.get("unlock") != "granted":
                problems.append(f"Chromium's unlock: {report.get('unlock')}")
        return problems

    def chromium_failures(self) -> int:
        """Rings the Chromium resident could not handle as planned."""
        return len(self.collector.of("failed"))

    def signins(self) -> int:
        """Sign-ins of aiortc devices after their first (each one a lost connection)."""
        return len([e for e in self.collector.of("ready") if e.get("d") is not None]) - len(
            self.devices
        )

    async def ring_after(self, station: SoakStation, ready: float) -> float | None:
        """Press once every device is back; how long after READY the last was rung.

        The residents must have been told to let this ring ring (plan ``ignore``).
        """
        deadline = ready + READY_RING_S
        online = 0
        while online < self.online and time.time() < deadline:
            online = await self.devices_online()
        pressed = await station.press(1)
        collector = self.collector
        everyone = {d["index"] for d in self.devices}

        def rung() -> bool:
            return everyone <= {e["d"] for e in collector.of("ring", since=pressed)}

        await collector.until(rung, max(0.5, deadline - time.time()))
        rings = [float(e["t"]) for e in collector.of("ring", since=pressed)]
        if not rung():
            return None
        return max(rings) - ready

    async def stop(self) -> None:
        """Stop every resident process; keep what they reported in residents.jsonl.

        Their stdin is closed first, so that Chromium is closed by its resident (a killed
        resident leaves Playwright's driver to notice); what is still running 5 s later
        is killed.
        """
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        for reader in self.collector.readers:
            reader.cancel()
        lines = "".join(json.dumps(e) + "\n" for e in self.collector.events)
        await asyncio.to_thread((self.work / "residents.jsonl").write_text, lines)


async def logged_seqs(state_dir: Path) -> list[int]:
    """The seqs of the event log's records (``intercom log show --json``)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intercom", "log", "show", "--json", "--state-dir", str(state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return [int(json.loads(line)["seq"]) for line in out.splitlines() if line.strip()]


async def log_verify(state_dir: Path) -> str:
    """``intercom log verify``: ``ok``, or what it said."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intercom", "log", "verify", "--state-dir", str(state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return "ok" if proc.returncode == 0 else out.decode(errors="replace")[-500:]


async def until(check: Any, timeout: float, step: float = 0.05) -> bool:
    """Poll ``check()`` until it is truthy (True) or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)


def sample_at(samples: list[dict[str, Any]], minute: float) -> dict[str, Any] | None:
    """The first sample at or after ``minute`` (within a minute of it), or None."""
    for sample in samples:
        if minute <= sample["minute"] < minute + 1:
            return sample
    return None
