"""``intercom selftest``: the running station tests its parts and says which failed."""

from __future__ import annotations

import argparse
import json
from typing import Any

from intercom.cli.common import add_state_dir, state_dir
from intercom.control import request_sync
from intercom.errors import IntercomError

# The camera waits up to 3 s for a first frame and counts for 1 s; the event log verifies.
TIMEOUT_S = 60.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``selftest`` command."""
    test = sub.add_parser(
        "selftest",
        help="test the station's parts now (camera, microphone, pins, clock, disk, log, ...)",
        description="Ask the running station to test its parts: camera (frames at the "
        "configured rate), microphone, door contact, tamper switch, relay pin (read back, "
        "never energised), clock (timesyncd), free disk, event log (chain verified, tail "
        "authenticated), certificates and the MQTT link. One line a part: ok, FAILED with "
        "what is wrong, or skipped with why. Exit 0 when no part failed, 1 naming the "
        "parts that did. The station also tests itself at start ('intercom status').",
    )
    test.add_argument("--json", action="store_true", help="print the result as JSON")
    add_state_dir(test)
    test.set_defaults(func=cmd_selftest)


def report_lines(report: dict[str, Any]) -> list[str]:
    """One line a part, ``camera       ok       15.0 fps (configured 15)``."""
    words = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}
    return [f"{c['part']:<13}{words.get(c['outcome'], c['outcome']):<9}{c['detail']}"
            for c in report.get("checks", [])]


def cmd_selftest(args: argparse.Namespace) -> int:
    """Run the self-test on the station; exit 1 naming the parts that failed."""
    answer = request_sync(state_dir(args), {"request": "selftest"}, timeout=TIMEOUT_S)
    if not answer.get("ok"):
        raise IntercomError(str(answer.get("error", "the station refused the self-test")))
    report: dict[str, Any] = answer["selftest"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in report_lines(report):
            print(line)
        failed = report.get("failed") or []
        print(f"self-test FAILED: {', '.join(failed)}" if failed else "self-test passed")
    return 1 if report.get("failed") else 0
