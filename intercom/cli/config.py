"""``intercom config get|set``: read or change the running station's config file."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from typing import Any

from intercom.cli.common import add_state_dir, state_dir
from intercom.control import request_sync
from intercom.errors import IntercomError

EXIT_USAGE = 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``config get`` and ``config set``."""
    config = sub.add_parser(
        "config",
        help="read or change the running station's config file (through its one writer)",
        description="Every change goes through the station's config writer: validated by "
        "the models of check-config, written atomically, logged with who made it. A bad "
        "value is refused naming the key and the reason (exit 2). Keys set at installation "
        "(station.id, station.state_dir) and secrets (mqtt.password: give password_file) "
        "are refused. Comments in the file are not kept.",
    )
    verbs = config.add_subparsers(dest="verb", metavar="VERB", required=True)
    get = verbs.add_parser("get", help="print the file's settings as JSON (secrets masked)")
    add_state_dir(get)
    get.set_defaults(func=cmd_get)
    set_ = verbs.add_parser(
        "set", help='set KEY to VALUE (a TOML value: 17, true, "flat 2", [[0,0],[1,0],[1,1]])',
        description="Set each KEY (a path: hardware.relay.pulse_s, hardware.buttons[0].flat, "
        "privacy.zones) to its VALUE, written as a TOML value; a VALUE that is not TOML is "
        "taken as text. All keys are checked together and written at once, or none is. "
        "The answer says which keys took effect now and which at the next start.",
    )
    set_.add_argument("pairs", nargs="+", metavar="KEY VALUE", help="key and value, repeated")
    add_state_dir(set_)
    set_.set_defaults(func=cmd_set)


def toml_value(text: str) -> Any:
    """``text`` read as a TOML value; text that is not one is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def cmd_get(args: argparse.Namespace) -> int:
    """Print the station's config file as JSON."""
    answer = request_sync(state_dir(args), {"request": "config-get"})
    if not answer.get("ok"):
        raise IntercomError(str(answer.get("error")))
    print(json.dumps(answer["config"], indent=2))
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    """Ask the station's writer to set the keys; print what it did or refused."""
    if len(args.pairs) % 2:
        print("intercom config set: give KEY VALUE pairs (an odd number of words was given)",
              file=sys.stderr)
        return EXIT_USAGE
    changes = {key: toml_value(value) for key, value in zip(args.pairs[::2], args.pairs[1::2],
                                                            strict=True)}
    answer = request_sync(state_dir(args), {"request": "config-set", "changes": changes})
    if not answer.get("ok"):
        refused = answer.get("refused")
        if not refused:
            raise IntercomError(str(answer.get("error")))
        for problem in refused:
            print(f"intercom: config: {problem['key']}: {problem['reason']}", file=sys.stderr)
        return EXIT_USAGE
    if answer.get("applied"):
        print(f"applied now: {', '.join(answer['applied'])}")
    if answer.get("at_restart"):
        print(f"written; takes effect at the next start: {', '.join(answer['at_restart'])}")
    for warning in answer.get("warnings", []):
        print(f"intercom: warning: {warning}", file=sys.stderr)
    return 0
