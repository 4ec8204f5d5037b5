"""Arguments and helpers shared by several commands: where the station is, and asking it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from intercom.config import DEFAULT_CONFIG, DEFAULT_STATE_DIR
from intercom.control import request_sync
from intercom.errors import IntercomError, StationNotRunningError
from intercom.statedir import CONFIG_ENV, SIM_STATE_DIR, STATE_ENV, Resolved, resolve

__all__ = ["SIM_STATE_DIR", "add_state_dir", "ask", "resolved", "state_dir", "station_dir"]

STATE_HELP = (
    f"the station's state directory (default: ${STATE_ENV}, else station.state_dir of "
    f"--config / ${CONFIG_ENV} / {DEFAULT_CONFIG}, else {DEFAULT_STATE_DIR})"
)


def add_state_dir(parser: argparse.ArgumentParser, *, simulate: bool = False) -> None:
    """Add ``--state-dir`` and ``--config`` with the documented resolution."""
    default = SIM_STATE_DIR if simulate else DEFAULT_STATE_DIR
    parser.add_argument(
        "--state-dir", type=Path, default=None, help=STATE_HELP.replace(
            str(DEFAULT_STATE_DIR) + ")", f"{default})")
    )
    with contextlib.suppress(argparse.ArgumentError):  # the command has its own --config
        parser.add_argument(
            "--config", type=Path, default=None, metavar="FILE",
            help="read the state directory from this config file's station.state_dir",
        )
    parser.set_defaults(simulate_default=simulate)


def resolved(args: argparse.Namespace) -> Resolved:
    """Where this command's station state is, and how that was decided."""
    return resolve(
        getattr(args, "state_dir", None),
        getattr(args, "config", None),
        simulate=bool(getattr(args, "simulate_default", False) or getattr(args, "simulate", False)),
    )


def state_dir(args: argparse.Namespace) -> Path:
    """The state directory this command acts on (whether or not a station is there)."""
    return resolved(args).state_dir


def station_dir(args: argparse.Namespace) -> Path:
    """The state directory of a station that has made its keys; a clear error otherwise."""
    return resolved(args).require_station()


def ask(state: Path, request: dict[str, Any]) -> dict[str, Any]:
    """The station's answer to ``request``; when none runs, the same handlers run here.

    With no station running, the request is answered by this process under the
    state directory's instance lock (``intercom.admin.offline``). A refusal raises
    IntercomError with the station's reason.
    """
    sent = {**request, "sudo_user": os.environ.get("SUDO_USER")}
    try:
        answer = request_sync(state, sent)
    except StationNotRunningError:
        from intercom.admin import offline  # noqa: PLC0415
        from intercom.privacy.audit import local_actor  # noqa: PLC0415

        answer = asyncio.run(offline(state, {**request, "actor": local_actor()}))
    if not answer.get("ok"):
        raise IntercomError(str(answer.get("error", "the station refused the request")))
    return answer
