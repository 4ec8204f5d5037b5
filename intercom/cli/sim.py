"""``intercom status`` and ``intercom sim``: talk to a running station's control socket."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from intercom.cli.common import add_state_dir, state_dir
from intercom.control import request_sync
from intercom.events import public_details
from intercom.simulator import ACTIONS

EVENTS_SHOWN = 10


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``status`` and ``sim`` commands."""
    status = sub.add_parser(
        "status",
        help="show the running station's state",
        description="Print the running station's id, version, uptime, lock/door/call state, "
        "where it listens, its health (load, memory, disk, camera, calls, clock, links), "
        "active alerts and its recent events with their times and public details.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    add_state_dir(status)
    status.set_defaults(func=cmd_status)

    sim = sub.add_parser(
        "sim",
        help="act on a simulated station's hardware",
        description="Act like a person at the door of a simulated station: press the bell, "
        "open or close the door, trip the tamper switch. A press says how many devices "
        "were rung and what became of the call.",
    )
    sim.add_argument("action", choices=ACTIONS)
    sim.add_argument("--button", help="button name or flat to press (default: the first)")
    add_state_dir(sim, simulate=True)
    sim.set_defaults(func=cmd_sim)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the station's status."""
    answer = request_sync(state_dir(args), {"request": "status"})
    if not answer.get("ok"):
        print(f"intercom: {answer.get('error')}")
        return 1
    status: dict[str, Any] = answer["status"]
    # The daemon sends only public details; filtered again here, so that even a daemon
    # of another release never gets a log-only field (a denial's reason) printed.
    status["recent_events"] = [_public(e) for e in status.get("recent_events", [])]
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    mode = "simulated" if status["simulated"] else "hardware"
    print(f"station  {status['station']} ({mode}), intercom {status['version']}")
    print(f"uptime   {_duration(status['uptime_s'])}, pid {status['pid']}")
    print(f"lock     {status['lock']}")
    print(f"door     {status['door']}")
    print(f"call     {status['call']}")
    if status.get("tamper"):
        print("tamper   TRIPPED")
    for name, where in status["listening"].items():
        print(f"listen   {name}: {where}")
    if mqtt := status.get("mqtt"):
        error = f", last error: {mqtt['last_error']}" if mqtt.get("last_error") else ""
        print(
            f"mqtt     {mqtt['state']} to {mqtt['broker']}{' (TLS)' if mqtt['tls'] else ''}"
            f", {mqtt['events_published']} events published{error}"
        )
    if log := status.get("eventlog"):
        print(f"log      {_log_line(log, status.get('health') or {})}")
    if health := status.get("health"):
        for line in _health_lines(health) + _selftest_lines(status.get("selftest")):
            print(line)
    for event in status["recent_events"][-EVENTS_SHOWN:]:
        print(f"event    {_event_line(event)}")
    return 0


def _clock(at: Any) -> str:
    """A unix time as the local wall clock (the date too when not today)."""
    if not isinstance(at, int | float):
        return "--:--:--"
    when = datetime.fromtimestamp(at).astimezone()
    today = datetime.now().astimezone().date()
    return when.strftime("%H:%M:%S" if when.date() == today else "%Y-%m-%d %H:%M:%S")


def _event_line(event: dict[str, Any]) -> str:
    """``12:03:04 CallMissed call=... flat=1``: time, type and the public details."""
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in {"type", "at"})
    return f"{_clock(event.get('at'))} {event['type']} {details}".rstrip()


def _log_line(log: dict[str, Any], health: dict[str, Any]) -> str:
    line = f"seq {log['last_seq']}"
    if log.get("checkpoint_seq") is None:
        line += ", no signed checkpoint yet"
    else:
        line += f", signed checkpoint at seq {log['checkpoint_seq']}"
        if (age := health.get("checkpoint_age_s")) is not None:
            line += f" ({_duration(age)} ago)"
    if (size := health.get("eventlog_bytes")) is not None:
        line += f", {_bytes(size)} on disk"
    return line


def _health_lines(health: dict[str, Any]) -> list[str]:
    """The monitor's latest sample, a line per subject; unknown figures left out."""
    lines = _machine_lines(health)
    if health.get("camera_frames") is not None:
        fps = f"{health['camera_fps']} fps, " if health.get("camera_fps") is not None else ""
        lines.append(f"camera   {fps}{health['camera_frames']} frames read")
    lines.append(f"calls    {health.get('calls_24h', 0)} in the last 24 h")
    synced = health.get("clock_synchronized")
    clock = "synchronisation unknown" if synced is None else (
        "synchronised" if synced else "NOT synchronised")
    lines.append(f"clock    {clock}")
    lines.append(f"web      {health.get('web', 'unknown')}")
    alerts = health.get("alerts") or {}
    if not alerts:
        lines.append("alerts   none")
    for name, alert in sorted(alerts.items()):
        lines.append(f"ALERT    {name} since {_clock(alert.get('since'))}: {alert.get('message')}")
    return lines


def _selftest_lines(selftest: dict[str, Any] | None) -> list[str]:
    """``selftest 12:03:04 (start): FAILED: camera, clock`` (nothing before the first)."""
    if not selftest:
        return []
    failed = selftest.get("failed") or []
    return [f"selftest {_clock(selftest.get('at'))} ({selftest.get('trigger')}): "
            + (f"FAILED: {', '.join(failed)}" if failed else "passed")]


def _machine_lines(health: dict[str, Any]) -> list[str]:
    def known(*keys: str) -> bool:
        return all(health.get(k) is not None for k in keys)

    system = [f"load {health['load_1m']}"] if known("load_1m") else []
    if known("cpu_temp_c"):
        system.append(f"{health['cpu_temp_c']} °C")
    if known("rss_bytes"):
        system.append(f"RSS {_bytes(health['rss_bytes'])}")
    if known("open_fds"):
        system.append(f"{health['open_fds']} open descriptors")
    disk = []
    if known("disk_free_bytes", "disk_free_percent"):
        disk.append(f"{_bytes(health['disk_free_bytes'])} free ({health['disk_free_percent']}%)")
    if known("write_bytes_per_day"):
        disk.append(f"{_bytes(health['write_bytes_per_day'])} written per day")
    lines = [f"health   {', '.join(system)}"] if system else []
    if disk:
        lines.append(f"disk     {', '.join(disk)}")
    return lines


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _public(event: dict[str, Any]) -> dict[str, Any]:
    kind = str(event.get("type"))
    rest = {k: v for k, v in event.items() if k not in {"type", "at"}}
    return {"type": kind, "at": event.get("at"), **public_details(kind, rest)}


def cmd_sim(args: argparse.Namespace) -> int:
    """Send one simulator action."""
    payload = {"request": "sim", "action": args.action, "button": args.button}
    answer = request_sync(state_dir(args), payload)
    if not answer.get("ok"):
        print(f"intercom: {answer.get('error')}")
        return 1
    if isinstance(press := answer.get("press"), dict):
        print(press_report(press))
    else:
        print(f"{args.action}: done")
    return 0


def press_report(press: dict[str, Any]) -> str:
    """What became of a simulated press, in words."""
    if not press.get("pressed"):
        return ("pressed, but no new press was taken: within coalesce_s of the previous "
                "one (see 'intercom status' for the events)")
    where = f"{press.get('button')} (flat {press.get('flat')})"
    call = press.get("call")
    if call is None:
        return f"pressed {where}: a call is already on, so no new call was started"
    devices = int(press.get("devices") or 0)
    if devices == 0:
        return (f"pressed {where}: no device of flat {press.get('flat')} is signed in, so "
                f"nobody was rung; call {call} was missed at once (pair a device with "
                f"'intercom pair --flat {press.get('flat')}')")
    if press.get("missed"):
        return f"pressed {where}: rang {devices} device(s); call {call} was missed"
    return (f"pressed {where}: ringing {devices} device(s) of the flat, call {call}; "
            f"missed unless answered within {press.get('ring_timeout_s'):g} s")
