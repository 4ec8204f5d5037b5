"""``intercom status`` and ``intercom sim``: talk to a running station's control socket."""

from __future__ import annotations

import argparse
import json
from typing import Any

from intercom.cli.common import add_state_dir, state_dir
from intercom.control import request_sync
from intercom.events import public_details
from intercom.simulator import ACTIONS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``status`` and ``sim`` commands."""
    status = sub.add_parser(
        "status",
        help="show the running station's state",
        description="Print the running station's id, version, uptime, lock/door/call state, "
        "where it listens and its recent events.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    add_state_dir(status)
    status.set_defaults(func=cmd_status)

    sim = sub.add_parser(
        "sim",
        help="act on a simulated station's hardware",
        description="Act like a person at the door of a simulated station: press the bell, "
        "open or close the door, trip the tamper switch.",
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
    print(f"uptime   {status['uptime_s']:.0f} s, pid {status['pid']}")
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
        print(f"log      seq {log['last_seq']}, checkpoint at {log['checkpoint_seq']}")
    for event in status["recent_events"][-5:]:
        details = " ".join(f"{k}={v}" for k, v in event.items() if k not in {"type", "at"})
        print(f"event    {event['type']} {details}".rstrip())
    return 0


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
    return 0
