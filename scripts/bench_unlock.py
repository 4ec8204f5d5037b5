"""Benchmark: a signed command published on MQTT -> the relay's mock pin energised.

Runs a real Mosquitto on a free loopback port and a simulated station (real verifier,
event log, MQTT bridge, gpiozero MockFactory relay) in this process. Each of N managers
signs one command (each TOTP step is single use per principal); the clock starts just
before the publish and stops at the relay pin's change (the lock's LockStateChanged,
raised right after the pin is driven). Then again while a second process floods the
command topic with forged commands (valid form, a known principal id, the wrong key).

    scripts/bench unlock [--commands 1000] [--flood-rate 2000]

With ``--flood-rates 2000,10000,20000`` it instead floods for ``--flood-seconds`` (20)
at each rate, publishes one genuine command in the middle, and meanwhile a separate
process asks the control socket for ``status`` and fetches ``/api/info`` over HTTPS
every 50 ms: it prints the genuine command's publish-to-relay time, the probes'
p50/p99 and the station process's CPU, and the highest rate whose genuine command
still opened within 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from joserfc.jwk import OKPKey  # noqa: E402

from intercom.config import MqttConfig, simulated_settings  # noqa: E402
from intercom.events import Event  # noqa: E402
from intercom.mqtt.bridge import MqttBridge  # noqa: E402
from intercom.security import command, totp  # noqa: E402
from intercom.security.principals import Principal, Role  # noqa: E402
from intercom.security.registry import Registry  # noqa: E402
from intercom.security.verifier import Context  # noqa: E402
from intercom.station import Station  # noqa: E402
from tests.mosquitto import Broker  # noqa: E402

STATION = "bench"
DOOR = "front"
PREFIX = f"intercom/{STATION}"
Signer = tuple[str, OKPKey, str]  # a manager's id, private key and TOTP secret
EXTRA_MANAGERS = 32  # managers whose ids the --flood-rates forgeries name

# The manager: publishes each command it reads on stdin, and answers with the
# perf_counter just before its publish (CLOCK_MONOTONIC: comparable across processes).
MANAGER = textwrap.dedent("""
    import socket, sys, time
    import paho.mqtt.client as mqtt
    port, topic = int(sys.argv[1]), sys.argv[2]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="manager")
    client.connect("127.0.0.1", port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    print("ready", flush=True)
    for line in sys.stdin:
        token = line.strip()
        started = time.perf_counter()
        client.publish(topic, token, qos=0)
        print(repr(started), flush=True)
    client.disconnect(); client.loop_stop()
""")

FLOODER = textwrap.dedent("""
    import json, sys, time
    import paho.mqtt.client as mqtt
    port, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    tokens = [line.strip() for line in open(sys.argv[4]) if line.strip()]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder")
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic(); sent = 0; tick = 0.005
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            client.publish(sys.argv[5], tokens[sent % len(tokens)], qos=0)
            sent += 1
        time.sleep(tick)
    elapsed = time.monotonic() - start
    client.disconnect(); client.loop_stop()
    print(json.dumps({"sent": sent, "seconds": elapsed}), flush=True)
""")


# The prober: what a building manager's tools and a resident's phone see meanwhile.
PROBER = textwrap.dedent("""
    import http.client, json, socket, ssl, statistics, sys, time
    control, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    ctx = ssl.create_default_context(); ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # loopback, the station's own certificate
    def status():
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5); s.connect(control); s.sendall(b'{"request": "status"}\\n')
            data = b""
            while not data.endswith(b"\\n"):
                chunk = s.recv(65536)
                if not chunk: break
                data += chunk
    def info():
        c = http.client.HTTPSConnection(host, port, context=ctx, timeout=5)
        c.request("GET", "/api/info"); c.getresponse().read(); c.close()
    print("ready", flush=True)
    sys.stdin.readline()
    out = {"control": [], "https": [], "failed": 0}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, probe in (("control", status), ("https", info)):
            t = time.perf_counter()
            try:
                probe(); out[name].append((time.perf_counter() - t) * 1000)
            except Exception:
                out["failed"] += 1
        time.sleep(0.05)
    def q(v):
        if len(v) < 2: return None
        p = statistics.quantiles(v, n=100, method="inclusive")
        return {"n": len(v), "p50": round(p[49], 1), "p99": round(p[98], 1),
                "max": round(max(v), 1)}
    print(json.dumps({"control": q(out["control"]), "https": q(out["https"]),
                      "failed": out["failed"]}), flush=True)
""")


async def make_managers(registry: Registry, count: int) -> list[Signer]:
    """Register ``count`` managers of the door through the running station's registry.

    Their ids, private keys and TOTP secrets.
    """
    out = []
    now = time.time()
    for i in range(count):
        key = OKPKey.generate_key("Ed25519")
        public = {k: v for k, v in key.as_dict(private=False).items() if k != "kid"}
        secret = totp.new_secret()
        pid = f"mgr-{i:05d}"
        await registry.add(Principal(id=pid, role=Role.MANAGER, jwk=public, valid_from=now - 60,
                                     doors=(DOOR,)), secret)
        out.append((pid, key, secret))
    return out


def bridge_of(station: Station) -> MqttBridge:
    """The station's MQTT bridge."""
    return next(c for c in station.components if isinstance(c, MqttBridge))


def fresh_token(signer: Signer) -> str:
    """A valid command, signed now with the current TOTP code (both go stale in 30-60 s)."""
    pid, key, secret = signer
    now = time.time()
    return command.sign(key, kid=pid, station=STATION, door=DOOR,
                        totp=totp.code_at(secret, now), now=now)


def forged(managers: list[Signer], count: int, kind: str) -> list[str]:
    """Well-formed commands signed with the wrong key.

    ``one``: all name one real manager (an attacker who knows one id); ``spread``: they
    name every registered manager in turn, so no per-principal budget runs dry (the
    worst case: every one costs a signature check); ``unknown``: random ids.
    """
    wrong = OKPKey.generate_key("Ed25519")
    now = time.time()

    def kid(i: int) -> str:
        if kind == "one":
            return managers[-1][0]
        if kind == "spread":
            return managers[i % len(managers)][0]
        return f"nobody-{i:05d}"

    return [
        command.sign(wrong, kid=kid(i), station=STATION, door=DOOR, totp="000000", now=now,
                     lifetime=60)
        for i in range(count)
    ]


class Child:
    """A helper process (the manager's client, the flooder) on a line protocol."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        if proc.stdin is None or proc.stdout is None:
            raise RuntimeError("the child needs pipes")
        self.stdin: asyncio.StreamWriter = proc.stdin
        self.stdout: asyncio.StreamReader = proc.stdout

    @classmethod
    async def start(cls, code: str, *args: str) -> Child:
        """Start ``python -c code args``; return once it says it is ready."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        child = cls(proc)
        await child.stdout.readline()
        return child

    async def ask(self, line: str) -> str:
        """Send one line, read one line back."""
        self.stdin.write(f"{line}\n".encode())
        await self.stdin.drain()
        return (await self.stdout.readline()).decode().strip()

    async def close(self) -> None:
        """Close its input and wait for it (killing it after 10 s)."""
        self.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


Samples = dict[str, list[float]]


async def measure(
    station: Station, manager: Child, signers: list[Signer], gap_s: float = 0.0
) -> Samples:
    """Milliseconds from publish to relay energised, one command at a time.

    Also split at the moment the bridge hands the command to the verifier: "to verifier"
    is the manager's client, the broker and the bridge; "verifier" is the checks, the
    database and the relay.
    """
    lock = station.lock
    if lock is None:
        raise RuntimeError("the station has no lock")
    # The bridge was handed the verifier's submit at start: the hand-over is timed there.
    bridge = bridge_of(station)
    pin = station.pin_factory.pin(station.settings.hardware.relay.pin)
    energised = asyncio.Event()
    stamp = {"pin": 0.0, "submit": 0.0}
    wanted = {"token": ""}
    submit = bridge._submit  # noqa: SLF001 - the benchmark looks inside
    if submit is None:
        raise RuntimeError("the bridge has no verifier")

    async def timed_submit(token: str | bytes, context: Context) -> Any:
        if token in {wanted["token"], wanted["token"].encode()}:
            stamp["submit"] = time.perf_counter()
        return await submit(token, context)

    def on_event(event: Event) -> None:
        unlocked = event.type == "LockStateChanged" and getattr(event, "state", "") == "unlocked"
        if unlocked and stamp["submit"] and pin.state:  # this command's, not a late one
            stamp["pin"] = time.perf_counter()
            energised.set()

    off = station.bus.on(on_event)
    bridge._submit = timed_submit  # noqa: SLF001
    out: Samples = {"total": [], "to verifier": [], "verifier": []}
    missed = 0
    try:
        for signer in signers:
            token = fresh_token(signer)  # before the clock starts
            energised.clear()
            stamp["submit"] = stamp["pin"] = 0.0
            wanted["token"] = token
            started = float(await manager.ask(token))
            try:
                await asyncio.wait_for(energised.wait(), 2.0)
            except TimeoutError:
                missed += 1
                await asyncio.sleep(2.0)  # a late grant must not count for the next one
                lock.release("benchmark")
                continue
            out["total"].append((stamp["pin"] - started) * 1000)
            out["to verifier"].append((stamp["submit"] - started) * 1000)
            out["verifier"].append((stamp["pin"] - stamp["submit"]) * 1000)
            lock.release("benchmark")
            await asyncio.sleep(gap_s)
    finally:
        off()
        bridge._submit = submit  # noqa: SLF001
    if missed:
        print(f"  {missed} of {len(signers)} valid commands did not open within 2 s")
    return out


def report(name: str, samples: Samples) -> None:
    """Print p50/p99/max of a run and of its two parts."""
    for part, values in samples.items():
        if not values:
            print(f"{name}: no samples")
            return
        q = statistics.quantiles(values, n=100, method="inclusive")
        label = name if part == "total" else f"  {part}"
        print(f"{label}: n={len(values)} p50={q[49]:.2f} ms p99={q[98]:.2f} ms "
              f"max={max(values):.2f} ms")


async def connected_station(work: Path, port: int) -> Station:
    """A started simulated station whose MQTT link is up."""
    base = simulated_settings(work / "state")
    settings = base.model_copy(update={
        "station": base.station.model_copy(update={"id": STATION}),
        "mqtt": MqttConfig(host="127.0.0.1", port=port),
    })
    station = Station(settings)
    await station.start()
    await asyncio.wait_for(bridge_of(station).link.connected.wait(), 10)
    return station


async def flood_round(
    station: Station, manager: Child, signers: list[Signer], forged_file: Path, args: Any
) -> None:
    """Measure again while another client floods forged commands."""
    port = station.settings.mqtt.port if station.settings.mqtt else 0
    seconds = 3 + len(signers) * (0.02 + args.gap_ms / 1000)
    flooder = await Child.start(FLOODER, str(port), str(args.flood_rate), str(seconds),
                                str(forged_file), f"{PREFIX}/command")
    try:
        flooder.stdin.write(b"go\n")
        await asyncio.sleep(1.0)  # let the flood reach its rate first
        cpu, wall = time.process_time(), time.perf_counter()
        flooded = await measure(station, manager, signers, args.gap_ms / 1000)
        busy = (time.process_time() - cpu) / (time.perf_counter() - wall)
        report(f"unlock, {args.flood_rate:.0f} forged/s flood ({args.flood_kind})", flooded)
        line = (await flooder.stdout.readline()).decode().strip()
        print(f"flooder: {line}; station process CPU during the flood: {busy:.0%} of one core")
    finally:
        await flooder.close()


async def flood_middle(
    station: Station, manager: Child, signer: Signer, forged_file: Path, rate: float,
    seconds: float,
) -> bool:
    """Flood at ``rate`` for ``seconds``, one genuine command in the middle; True if it opened.

    Prints the command's publish-to-relay time, the prober's figures and the CPU.
    """
    port = station.settings.mqtt.port if station.settings.mqtt else 0
    web = station.calls.url if station.calls else ""
    web_port = int(web.rstrip("/").rsplit(":", 1)[1])
    prober = await Child.start(PROBER, str(station.control.path), "127.0.0.1", str(web_port),
                               str(seconds))
    flooder = await Child.start(FLOODER, str(port), str(rate), str(seconds), str(forged_file),
                                f"{PREFIX}/command")
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        prober.stdin.write(b"go\n")
        flooder.stdin.write(b"go\n")
        await asyncio.sleep(seconds / 2)
        sample = await measure(station, manager, [signer])
        opened = bool(sample["total"])
        took = f"{sample['total'][0]:.1f} ms" if opened else "not within 2 s"
        sent = json.loads((await flooder.stdout.readline()).decode())
        busy = (time.process_time() - cpu) / (time.perf_counter() - wall)
        probes = json.loads((await prober.stdout.readline()).decode())
        print(f"flood {rate:.0f}/s asked, {sent['sent'] / sent['seconds']:.0f}/s sent for "
              f"{sent['seconds']:.1f} s: genuine command opened in {took}; station CPU "
              f"{busy:.0%} of one core")
        print(f"  control socket: {probes['control']}; HTTPS /api/info: {probes['https']}; "
              f"failed probes: {probes['failed']}")
        return opened
    finally:
        await flooder.close()
        await prober.close()


async def flood_rates(station: Station, manager: Child, managers: list[Signer], work: Path,
                      args: Any) -> None:
    """One middle-of-the-flood round per rate; the highest rate that still opened."""
    forged_file = work / "forged.txt"
    # The forgeries name other managers than the genuine signers (managers[2:2+rates]): a
    # flood naming a principal's own id denies that principal while it lasts (see
    # docs/security.md), which is not what this measures.
    others = managers[-EXTRA_MANAGERS:]
    forged_file.write_text("\n".join(forged(others, 4000, args.flood_kind)))
    passed = []
    for i, rate in enumerate(float(r) for r in args.flood_rates.split(",")):
        if await flood_middle(station, manager, managers[2 + i], forged_file, rate,
                              args.flood_seconds):
            passed.append(rate)
        await asyncio.sleep(3)  # let the broker and the station drain
    best = f"{max(passed):.0f}/s" if passed else "none"
    print(f"highest flood rate whose genuine command opened within 2 s: {best} "
          f"({args.flood_kind} ids)")


async def main() -> None:
    """Run both rounds and print their figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--flood-rate", type=float, default=2000.0)
    parser.add_argument("--gap-ms", type=float, default=25.0,
                        help="pause after each unlock (the relay released), so each command "
                        "meets a station that finished the last one's events")
    parser.add_argument("--broker-nagle", action="store_true",
                        help="leave mosquitto's set_tcp_nodelay at its default (false)")
    parser.add_argument("--flood-kind", choices=["one", "spread", "unknown"], default="one",
                        help="whom the forged commands name (see forged())")
    parser.add_argument("--flood-rates", metavar="R1,R2,...",
                        help="instead: flood at each rate, a genuine command in the middle")
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("intercom.mqtt").setLevel(logging.INFO)  # link losses show up
    with tempfile.TemporaryDirectory(prefix="bench-unlock-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker", nodelay=not args.broker_nagle)
        broker.start()
        try:
            station = await connected_station(work, broker.port)
            try:
                started = time.perf_counter()
                n = args.commands
                if station.registry is None:
                    raise RuntimeError("the station has no registry")
                managers = await make_managers(station.registry, 2 * n + 2 + EXTRA_MANAGERS)
                print(f"registered {len(managers)} managers in "
                      f"{time.perf_counter() - started:.1f} s")
                manager = await Child.start(MANAGER, str(broker.port), f"{PREFIX}/command")
                try:
                    if args.flood_rates:
                        await measure(station, manager, managers[:1])  # warm-up
                        await flood_rates(station, manager, managers, work, args)
                        return
                    # Warm-up: the first command's path (imports, caches, the link).
                    await measure(station, manager, managers[:1])
                    quiet = await measure(station, manager, managers[1:n + 1],
                                          args.gap_ms / 1000)
                    report(f"unlock, quiet broker, {args.gap_ms:g} ms between", quiet)
                    forged_file = work / "forged.txt"
                    forged_file.write_text("\n".join(forged(managers, 4000, args.flood_kind)))
                    await flood_round(station, manager, managers[n + 1:2 * n + 1],
                                      forged_file, args)
                finally:
                    await manager.close()
                status = station.status()
                print(f"verifier: {status.get('verifier')}")
                print(f"mqtt: commands={status['mqtt']['commands']} "
                      f"events_published={status['mqtt']['events_published']}")
            finally:
                await station.stop("benchmark finished")
        finally:
            broker.kill()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load}, "
          f"Python {sys.version.split()[0]}")


if __name__ == "__main__":
    asyncio.run(main())
