"""Benchmark the unlock verifier: throughput for valid and forged commands, and the p99
latency of valid commands while a flood of forged commands arrives.

Everything is real except the transport: a real registry over principals.db (SQLite,
synchronous=FULL, written in the registry's own thread), a real relay on gpiozero mock
pins, the real event bus. Commands are handed to ``Verifier.submit`` as the MQTT bridge
and the call code do.

Usage: scripts/bench unlock-verify [--seconds S] [--flood-rate N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")
warnings.filterwarnings("ignore")

from gpiozero.pins.mock import MockFactory  # noqa: E402

from intercom.events import EventBus  # noqa: E402
from intercom.security.limits import Limits  # noqa: E402
from intercom.security.principals import Role  # noqa: E402
from intercom.security.registry import Registry  # noqa: E402
from intercom.security.store import Guard  # noqa: E402
from intercom.security.verifier import Verifier  # noqa: E402
from tests.test_security_kit import (  # noqa: E402
    SITE,
    Clock,
    Signer,
    add_principal,
    open_registry,
    relay_lock,
)

UNLIMITED = Limits(shared_rate=1e9, shared_burst=1e9, denied_events_per_s=20)


def make_rig(
    state: Path, loop: asyncio.AbstractEventLoop, limits: Limits, clock: Clock, n: int
) -> tuple[Verifier, Registry, list[Signer], MockFactory]:
    """A started verifier over an open registry of ``n`` admins (close both after)."""
    factory = MockFactory()
    bus = EventBus(history=10)
    registry = loop.run_until_complete(open_registry(state, bus, clock))

    async def register() -> list[Signer]:
        return [await add_principal(registry, clock, f"p{i}", Role.ADMIN) for i in range(n)]

    signers = loop.run_until_complete(register())
    lock = relay_lock(factory, bus, loop)
    verifier = Verifier(registry, SITE, bus, lock, limits=limits, clock=clock)
    loop.run_until_complete(verifier.start())
    return verifier, registry, signers, factory


def stop_rig(loop: asyncio.AbstractEventLoop, verifier: Verifier, registry: Registry) -> None:
    loop.run_until_complete(verifier.stop())
    loop.run_until_complete(registry.close())


def rate(loop: asyncio.AbstractEventLoop, verifier: Verifier, tokens: list[str],
         clock: Clock | None = None, step: float = 0.0) -> tuple[float, dict[str, int]]:
    """Commands per second through ``submit``, and the count of each reason."""
    reasons: dict[str, int] = {}

    async def go() -> float:
        start = time.perf_counter()
        for token in tokens:
            if clock is not None:
                clock.now += step
            decision = await verifier.submit(token, "mqtt")
            reasons[decision.reason] = reasons.get(decision.reason, 0) + 1
        return time.perf_counter() - start

    elapsed = loop.run_until_complete(go())
    return len(tokens) / elapsed, reasons


def throughput(n: int) -> None:
    """Verifications per second of valid and of forged commands."""
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        verifier, registry, signers, _ = make_rig(Path(tmp), loop, UNLIMITED, clock, 3)
        alice, mallory = signers[0], signers[1]
        # Valid: one principal, the clock moving one TOTP step per command.
        t0 = clock.now
        valid = [alice.token(now=t0 + 30 * (i + 1), jti=f"valid-{i:08d}") for i in range(n)]
        per_s, reasons = rate(loop, verifier, valid, clock, 30.0)
        print(f"valid commands (grant, SQLite commit, relay pulse): {per_s:8.0f} /s  {reasons}")
        forged_sig = [mallory.token(kid=alice.pid, jti=f"forged-{i:08d}", now=clock.now)
                      for i in range(n)]
        per_s, reasons = rate(loop, verifier, forged_sig)
        print(f"forged, known kid, bad signature (checked):         {per_s:8.0f} /s  {reasons}")
        forged_kid = [t.replace(t.split(".")[0], mallory.token(kid="nobody").split(".")[0])
                      for t in forged_sig]
        per_s, reasons = rate(loop, verifier, forged_kid)
        print(f"forged, unknown kid:                                {per_s:8.0f} /s  {reasons}")
        per_s, reasons = rate(loop, verifier, ["x" * 200] * n)
        print(f"malformed:                                          {per_s:8.0f} /s  {reasons}")
        stop_rig(loop, verifier, registry)
    budget = Limits()
    loop2 = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        verifier, registry, signers, _ = make_rig(Path(tmp), loop2, budget, clock, 2)
        forged = [signers[1].token(kid=signers[0].pid, jti=f"forged-{i:08d}") for i in range(n)]
        per_s, reasons = rate(loop2, verifier, forged)
        print(f"forged, known kid, default budget (mostly refused): {per_s:8.0f} /s  {reasons}")
        stop_rig(loop2, verifier, registry)


def forged_commands(kind: str, valid: list[Signer], target: Signer) -> list[str]:
    """2,000 well-formed commands signed with the wrong key (valid[0]'s) for other kids."""
    pool = []
    for i in range(2000):
        kid = {
            "unknown": "nobody",
            "victim": valid[2 + i % (len(valid) - 2)].pid,
            "other": target.pid,
        }[kind]
        pool.append(valid[0].token(kid=kid, jti=f"flood-{i:08d}", now=time.time()))
    return pool


def report(
    name: str, forged_rate: float, cpu: float, latencies: list[float], service: list[float],
    outcomes: dict[str, int],
) -> None:
    """Print one flood scenario's line."""
    lat = sorted(x * 1000 for x in latencies)
    svc = sorted(x * 1000 for x in service)

    def p99(values: list[float]) -> float:
        return values[min(len(values) - 1, int(len(values) * 0.99))]

    print(
        f"{name:<44} forged {forged_rate:5.0f}/s  CPU {cpu:4.0%}  valid n={len(lat)}: "
        f"arrival->decision p50 {statistics.median(lat):6.2f} p99 {p99(lat):7.2f} ms, "
        f"less fsync p50 {statistics.median(svc):5.2f} p99 {p99(svc):6.2f} ms  {outcomes}"
    )


def time_writes(registry: Registry) -> list[float]:
    """Record how long each durable write of a command's use takes (it runs off the loop).

    ``submit`` awaits the registry's write (SQLite commit with fsync, in the registry's
    thread) before it answers; this is the time of that wait.
    """
    real = registry.persist_use
    times: list[float] = []

    async def timed(pid: str, guard: Guard, jti: str, keep_until: float) -> None:
        began = time.perf_counter()
        await real(pid, guard, jti, keep_until)
        times.append(time.perf_counter() - began)

    registry.persist_use = timed  # type: ignore[method-assign]
    return times


async def register(registry: Registry, n: int) -> tuple[list[Signer], Signer]:
    """``n`` admins for the valid senders, and one more principal as a flood target."""
    clock = Clock()
    valid = [await add_principal(registry, clock, f"v{i}", Role.ADMIN) for i in range(n)]
    target = await add_principal(registry, clock, "target", Role.ADMIN)
    return valid, target


async def flood_scenario(
    name: str, seconds: float, flood_rate: int, kind: str, n_valid_principals: int
) -> None:
    """p50/p99/max latency of valid commands (10/s) while forged ones arrive at flood_rate/s."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        factory = MockFactory()
        bus = EventBus(history=10)
        registry = await open_registry(Path(tmp), bus)  # the wall clock, as in production
        valid, target = await register(registry, n_valid_principals)
        lock = relay_lock(factory, bus, loop)
        # The wall clock: TOTP and freshness as in production.
        verifier = Verifier(registry, SITE, bus, lock, limits=Limits())
        await verifier.start()
        syncs = time_writes(registry)
        forged_pool = forged_commands(kind, valid, target)
        latencies: list[float] = []  # from the command's arrival time to the decision
        service: list[float] = []  # inside submit, less the durable write (off the loop)
        outcomes: dict[str, int] = {}
        stop_at = loop.time() + seconds
        forged_sent = 0

        async def flood() -> None:
            nonlocal forged_sent
            if flood_rate <= 0:
                return
            batch = max(1, flood_rate // 200)  # every 5 ms
            next_at = loop.time()
            while loop.time() < stop_at:
                for _ in range(batch):
                    await verifier.submit(forged_pool[forged_sent % len(forged_pool)], "mqtt")
                    forged_sent += 1
                next_at += batch / flood_rate
                await asyncio.sleep(max(0.0, next_at - loop.time()))

        async def valid_sender() -> None:
            i = 0
            next_at = loop.time() + 0.05
            while loop.time() < stop_at and i < len(valid) - 2:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                signer = valid[2 + i]
                token = signer.token(jti=f"valid-{i:08d}", now=time.time())
                arrived = next_at
                began = time.perf_counter()
                decision = await verifier.submit(token, "mqtt")
                service.append(time.perf_counter() - began - (syncs.pop() if syncs else 0.0))
                latencies.append(loop.time() - arrived)
                outcomes[decision.reason] = outcomes.get(decision.reason, 0) + 1
                i += 1
                next_at += 0.1

        cpu = time.process_time()
        await asyncio.gather(flood(), valid_sender())
        cpu = (time.process_time() - cpu) / seconds
        await verifier.stop()
        await registry.close()
        lock.close()
        factory.close()
    report(name, forged_sent / seconds, cpu, latencies, service, outcomes)


def main() -> None:
    """Run every figure and print it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each flood run")
    parser.add_argument("--flood-rate", type=int, default=2000, help="forged commands per second")
    parser.add_argument("-n", type=int, default=2000, help="commands per throughput figure")
    args = parser.parse_args()
    print(f"unlock-verify benchmark, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    throughput(args.n)
    n_valid = int(args.seconds * 10) + 10
    for name, kind in (
        ("no flood", None),
        ("flood: unknown kid", "unknown"),
        ("flood: another principal's kid, bad sig", "other"),
        ("flood: the valid senders' own kids, bad sig", "victim"),
    ):
        rate_ = 0 if kind is None else args.flood_rate
        asyncio.run(flood_scenario(name, args.seconds, rate_, kind or "unknown", n_valid))


if __name__ == "__main__":
    main()
