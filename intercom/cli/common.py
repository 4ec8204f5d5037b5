"""Arguments and helpers shared by several commands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from intercom.config import DEFAULT_STATE_DIR

SIM_STATE_DIR = (
    Path(os.environ.get("XDG_STATE_HOME", str(Path.home() / ".local" / "state"))) / "intercom-sim"
)


def add_state_dir(parser: argparse.ArgumentParser) -> None:
    """Add ``--state-dir`` with the documented default."""
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the station's state directory (default: $INTERCOM_STATE_DIR, else "
        f"{DEFAULT_STATE_DIR} when a station runs there, else {SIM_STATE_DIR})",
    )


def state_dir(args: argparse.Namespace) -> Path:
    """The state directory a command acts on."""
    if args.state_dir is not None:
        return Path(args.state_dir)
    if env := os.environ.get("INTERCOM_STATE_DIR"):
        return Path(env)
    if (DEFAULT_STATE_DIR / "control.sock").exists():
        return DEFAULT_STATE_DIR
    return SIM_STATE_DIR
