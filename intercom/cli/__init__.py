"""The ``intercom`` command line.

Each command group lives in its own module with a ``register(subparsers)`` function
that adds its parser and sets ``func`` (taking the parsed arguments, returning the exit
code). Exit codes: 0 ok, 1 refused or failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from intercom import __version__
from intercom.errors import ConfigError, IntercomError, StationNotRunningError
from intercom.statedir import InstanceLockedError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Command modules, in the order --help lists them.
COMMAND_MODULES = (
    "intercom.cli.run",
    "intercom.cli.sim",
    "intercom.cli.selftest",
    "intercom.cli.config",
    "intercom.cli.log",
    "intercom.cli.principals",
    "intercom.cli.unlock",
    "intercom.cli.pair",
    "intercom.cli.update",
    "intercom.cli.firstboot",
    "intercom.cli.privacy",
)

EPILOG = """\
exit codes: 0 ok, 1 refused or failed, 2 usage or configuration error.
Run 'intercom COMMAND --help' for a command's options."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the problem and where help is, then exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command group registered."""
    parser = Parser(
        prog="intercom",
        description="Privacy-first video intercom door station.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"intercom {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the command, map errors to exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for line in exc.problems:
            print(f"intercom: config: {line}", file=sys.stderr)
        return EXIT_USAGE
    except StationNotRunningError as exc:
        print(f"intercom: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except InstanceLockedError as exc:  # a second station, or a command beside one
        print(f"intercom: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except IntercomError as exc:
        print(f"intercom: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
