"""Endurance run: a simulated station rung every 20 s by real clients for --minutes.

The parts are real: a Mosquitto on a loopback port, ``intercom run --simulate`` with a
config (scripts/bench_devices.py's, plus MQTT, a short ring timeout and frequent
checkpoints), aiortc resident devices in worker processes (bench_devices' devices,
``scripts/soak_residents.py``) and the web client in Debian's headless Chromium. Every
resident is in flat 1 and is rung by each press. The presses go round three outcomes:
answered (by an aiortc device and by Chromium in turn, with an unlock: the device's
signed command sent on MQTT, the page's over the call's data channel; then hung up),
declined (by every resident) and missed (the ring times out). An MQTT subscriber, there
before the station starts, takes every event; log purges (``intercom log purge``'s
request) shred the older epochs every --purge-every-s.

Reported: the station's RSS, descriptors and threads before each press, failed calls
(each with what was missing), lost events (a seq of the log that the subscriber never
got), station CPU per call, and ``intercom log verify`` at the end. --json FILE writes
all of it; the exit status is 1 when a call failed, an event was lost or the log does
not verify.

With --kills N (scripts/soak --kills 50): N times, ring, answer, unlock and ``kill -9``
the station in the call, start it again, and check that the relay is off, and that every
device is rung by a press within 5 s of the station's READY=1 (its $NOTIFY_SOCKET).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from soak_parts import (  # noqa: E402
    MqttWatcher,
    Residents,
    SoakStation,
    StationDied,
    add_devices,
    log_verify,
    sample_at,
)

PLANS = ("answer", "decline", "ignore")
PLAN_LEAD_S = 1.0  # the residents are told the plan this long before the press at least


def plan_of(number: int, residents: Residents) -> tuple[str, str]:
    """Press ``number``'s plan and, when answered, who answers (devices and Chromium in turn)."""
    plan = PLANS[number % len(PLANS)]
    if plan != "answer":
        return plan, ""
    answered = number // len(PLANS)
    aiortc = residents.aiortc_principals
    if answered % 2 == 1 or not aiortc:
        return plan, "chromium"
    return plan, aiortc[(answered // 2) % len(aiortc)]


async def one_call(
    plan: str, who: str, station: SoakStation, residents: Residents, watcher: MqttWatcher,
    args: argparse.Namespace,
) -> list[str]:
    """Press once, the residents told ``plan`` already; what went wrong."""
    after = watcher.last_seq
    pressed = await station.press(1)
    ringing = await watcher.wait_event("CallRinging", after, 5)
    if ringing is None:
        return ["no CallRinging on MQTT within 5 s"]
    call = ringing["details"]["call"]
    problems: list[str] = []
    if ringing["details"]["devices"] != residents.online:
        problems.append(f"{ringing['details']['devices']} devices rung of {residents.online}")
    if plan == "answer" and who != "chromium":
        problems += await residents.unlock_over_mqtt(call, who, watcher, args.talk_s)
        await station.hangup()
    end = "CallEnded" if plan == "answer" else "CallMissed"
    if await watcher.wait_event(end, after, args.ring_timeout_s + 20, call=call) is None:
        problems.append(f"no {end}")
    problems += judge(plan, who, residents, watcher, after, call)
    problems += await residents.check_rung(call, pressed, plan)
    return problems


def judge(
    plan: str, who: str, residents: Residents, watcher: MqttWatcher, after: int, call: str
) -> list[str]:
    """What the call's events on MQTT say went other than planned."""
    events = watcher.events_of_call(after, call)
    answers = [e["details"].get("principal") for e in events if e["type"] == "CallAnswered"]
    declines = [e for e in events if e["type"] == "CallDeclined"]
    problems = []
    if plan == "answer":
        principal = residents.chromium_principal if who == "chromium" else who
        if answers != [principal]:
            problems.append(f"answered by {answers} instead of {principal}")
        if len(granted := watcher.granted_after(after, principal)) != 1:
            problems.append(f"{len(granted)} UnlockGranted for the answering device")
    elif answers:
        problems.append(f"answered although planned to be {plan}")
    if plan == "decline" and len(declines) != residents.online:
        problems.append(f"{len(declines)} CallDeclined of {residents.online}")
    if plan == "ignore" and declines:
        problems.append("declined although planned to be missed")
    return problems


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The endurance run; its report."""
    result: dict[str, Any] = {"minutes": args.minutes, "calls": 0, "failed": [], "samples": []}
    async with contextlib.AsyncExitStack() as stack:
        station, watcher, residents = await start_parts(args, work, stack, chromium=True)
        began = time.monotonic()
        cpu0 = station.proc_figures()["cpu_s"]
        try:
            await presses(args, result, station, residents, watcher)
        except StationDied as exc:
            result["failed"].append({"press": result["calls"], "plan": "-", "problems": [str(exc)]})
            print(f"  FAILED: {exc}", flush=True)
        seconds = time.monotonic() - began
        cpu = result["samples"][-1]["cpu_s"] - cpu0 if result["samples"] else 0.0
        with contextlib.suppress(OSError):
            cpu = station.proc_figures()["cpu_s"] - cpu0
        result["station_cpu_s"] = cpu
        result["cpu_per_call_s"] = cpu / max(1, result["calls"])
        result["cpu_percent"] = cpu / seconds * 100
        result["chromium_failures"] = residents.chromium_failures()
        result["device_signins"] = residents.signins()
        result["lost_events"] = await watcher.lost(station)
        await station.stop()
        result["verify"] = await log_verify(station.state_dir)
    return result


async def presses(
    args: argparse.Namespace, result: dict[str, Any], station: SoakStation,
    residents: Residents, watcher: MqttWatcher,
) -> None:
    """Press every --period-s for --minutes, purging the log as it goes; into ``result``."""
    began = last_purge = next_press = time.monotonic()
    number = 0
    while time.monotonic() - began < args.minutes * 60:
        # the plan goes out first: a worker busy with the last call reads it in time
        plan, who = plan_of(number, residents)
        residents.plan({"plan": plan, "who": who, "talk_s": args.talk_s})
        await asyncio.sleep(max(PLAN_LEAD_S, next_press - time.monotonic()))
        next_press = time.monotonic() + args.period_s
        try:
            figures = station.proc_figures()
        except OSError:  # /proc/PID gone
            await station.check_alive()
            raise
        result["samples"].append({"minute": (time.monotonic() - began) / 60, **figures})
        problems = await one_call(plan, who, station, residents, watcher, args)
        result["calls"] += 1
        if problems:
            result["failed"].append({"press": number, "plan": plan, "problems": problems})
            print(f"  press {number} ({plan}) FAILED: {'; '.join(problems)}", flush=True)
        if time.monotonic() - last_purge >= args.purge_every_s:
            last_purge = time.monotonic()
            purged = await station.ask({"request": "log-purge", "hours": args.purge_hours})
            result.setdefault("purges", []).append(purged.get("records"))
        number += 1
        if number % 9 == 0:
            s = result["samples"][-1]
            print(
                f"  {s['minute']:.1f} min: {number} calls, RSS {s['rss_mib']:.1f} MiB, "
                f"{s['fds']} fds, {len(result['failed'])} failed",
                flush=True,
            )


async def kills(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``kill -9`` the station in a call, --kills times; what each restart looked like."""
    result: dict[str, Any] = {"kills": 0, "failed": [], "ring_after_ready_s": []}
    async with contextlib.AsyncExitStack() as stack:
        station, watcher, residents = await start_parts(args, work, stack, chromium=False)
        try:
            await kill_rounds(args, result, station, residents, watcher)
        except StationDied as exc:
            result["failed"].append({"kill": result["kills"], "problems": [str(exc)]})
            print(f"  FAILED: {exc}", flush=True)
        result["lost_events"] = await watcher.lost(station)
        await station.stop()
        result["verify"] = await log_verify(station.state_dir)
    return result


async def kill_rounds(
    args: argparse.Namespace, result: dict[str, Any], station: SoakStation,
    residents: Residents, watcher: MqttWatcher,
) -> None:
    """Ring, answer, unlock, kill -9 and restart, --kills times; into ``result``."""
    for number in range(args.kills):
        who = residents.aiortc_principals[number % len(residents.aiortc_principals)]
        residents.plan({"plan": "answer", "who": who, "talk_s": 0.0})
        await asyncio.sleep(PLAN_LEAD_S)
        after = watcher.last_seq
        await station.press(1)
        problems: list[str] = []
        ringing = await watcher.wait_event("CallRinging", after, 5)
        if ringing is None:
            problems.append("no CallRinging before the kill")
        else:
            problems += await residents.unlock_over_mqtt(
                ringing["details"]["call"], who, watcher, 0.0
            )
        residents.plan({"plan": "ignore"})  # for the ring after the restart
        ready = await station.kill_and_restart()
        result["kills"] += 1
        status = (await station.ask({"request": "status"}))["status"]
        if status["lock"] != "locked":
            problems.append(f"lock {status['lock']} after the restart")
        rung_in = await residents.ring_after(station, ready)
        if rung_in is None:
            problems.append("not every device rung within 5 s of READY")
        else:
            result["ring_after_ready_s"].append(rung_in)
        await station.hangup()
        if problems:
            result["failed"].append({"kill": number, "problems": problems})
            print(f"  kill {number} FAILED: {'; '.join(problems)}", flush=True)
        elif number % 5 == 4:
            print(f"  {number + 1} kills, ring {rung_in:.2f} s after READY", flush=True)


async def start_parts(
    args: argparse.Namespace, work: Path, stack: contextlib.AsyncExitStack, *, chromium: bool
) -> tuple[SoakStation, MqttWatcher, Residents]:
    """Broker, subscriber, station, devices (and Chromium), all connected."""
    from tests.mosquitto import Broker  # noqa: PLC0415

    broker = Broker(work / "broker")
    broker.start()
    stack.callback(broker.kill)
    station = SoakStation(work, broker.port, args.ring_timeout_s)
    watcher = MqttWatcher(broker.port, station.prefix)
    await stack.enter_async_context(watcher)
    await station.start()
    stack.push_async_callback(station.stop)
    devices = await add_devices(station, args.devices)
    residents = Residents(work, station, devices, args)
    stack.push_async_callback(residents.stop)
    await residents.start(chromium=chromium)
    print(
        f"  station up, {residents.online} residents online "
        f"({args.devices} aiortc, {'1' if chromium else 'no'} Chromium)",
        flush=True,
    )
    return station, watcher, residents


def summary(result: dict[str, Any]) -> str:
    """The human report: figures over time, calls, failures, lost events, verify."""
    lines = []
    if "samples" in result:
        lines.append("| minute | RSS | descriptors | threads |")
        lines.append("|---|---|---|---|")
        for minute in (0, 10, 30, 60):
            s = sample_at(result["samples"], minute)
            if s is not None:
                lines.append(
                    f"| {minute} ({s['minute']:.1f}) | {s['rss_mib']:.1f} MiB | {s['fds']} "
                    f"| {s['threads']} |"
                )
        last = result["samples"][-1] if result["samples"] else None
        if last is not None:
            lines.append(
                f"| end ({last['minute']:.1f}) | {last['rss_mib']:.1f} MiB | {last['fds']} "
                f"| {last['threads']} |"
            )
        lines.append(
            f"calls {result['calls']}, failed {len(result['failed'])}; station CPU "
            f"{result['cpu_per_call_s']:.2f} s a call ({result['cpu_percent']:.1f} % of a core); "
            f"Chromium failures {result['chromium_failures']}; device sign-ins "
            f"{result['device_signins']}"
        )
    else:
        rings = result["ring_after_ready_s"]
        worst = f"{max(rings):.2f} s" if rings else "-"
        lines.append(f"kills {result['kills']}, failed {len(result['failed'])}, "
                     f"ring after READY at worst {worst}")
    lines.append(f"lost events {len(result['lost_events'])}; log verify: {result['verify']}")
    return "\n".join(lines)


def ok(result: dict[str, Any]) -> bool:
    """No failed call, no lost event, the log verifies."""
    return not result["failed"] and not result["lost_events"] and result["verify"] == "ok"


async def main(args: argparse.Namespace) -> int:
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    what = f"{args.kills} kills" if args.kills else f"{args.minutes:g} minutes"
    print(
        f"soak: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {socket.gethostname()}, "
        f"{os.cpu_count()} cores, load {load[0]:.2f}; {what}, a press every {args.period_s:g} s, "
        f"{args.devices} aiortc devices; work folder {work}",
        flush=True,
    )
    try:
        result = await (kills(args, work) if args.kills else soak(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(result), flush=True)
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(result, indent=1))
    return 0 if ok(result) else 1


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/soak", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--minutes", type=float, default=60.0, help="how long (default 60)")
    add("--kills", type=int, default=0, metavar="N",
        help="instead: kill -9 the station in a call N times")
    add("--period-s", type=float, default=20.0, help="seconds between presses (default 20)")
    add("--devices", type=int, default=4, help="aiortc resident devices (default 4)")
    add("--per-process", type=int, default=2,
        help="devices in one worker process (default 2)")
    add("--ring-timeout-s", type=float, default=8.0,
        help="the station's [calls] ring_timeout_s: a missed call ends then (default 8)")
    add("--talk-s", type=float, default=2.0, help="seconds an answered call lasts (default 2)")
    add("--purge-every-s", type=float, default=60.0,
        help="how often to purge the event log (default 60)")
    add("--purge-hours", type=float, default=0.02,
        help="each purge shreds epochs older than this (default 0.02: 72 s)")
    add("--json", metavar="FILE", help="write the whole report as JSON")
    add("--keep", metavar="DIR", help="work folder to keep")
    args = parser.parse_args()
    if args.minutes <= 0:
        parser.error(f"--minutes must be more than 0, not {args.minutes:g}")
    if args.kills < 0:
        parser.error(f"--kills must be 0 or more, not {args.kills}")
    if args.period_s < args.ring_timeout_s + 5:
        parser.error(f"--period-s {args.period_s:g} leaves a missed call no time to end: give "
                     f"at least --ring-timeout-s + 5 = {args.ring_timeout_s + 5:g}")
    if args.devices < 1:
        parser.error(f"--devices must be at least 1, not {args.devices}")
    if args.per_process < 1:
        parser.error(f"--per-process must be at least 1, not {args.per_process}")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
