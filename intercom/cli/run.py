"""``intercom run`` and ``intercom check-config``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from intercom.cli.common import SIM_STATE_DIR
from intercom.config import (
    DEFAULT_CONFIG,
    Settings,
    load_settings,
    simulated_settings,
    wiring_warnings,
)
from intercom.logsetup import setup_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` and ``check-config`` commands."""
    run = sub.add_parser(
        "run",
        help="run the station daemon",
        description="Run the door station until SIGTERM or SIGINT. With --simulate it needs "
        "no config: gpiozero mock pins and synthetic media, driven by 'intercom sim'.",
    )
    run.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"config file (default {DEFAULT_CONFIG}; optional with --simulate)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="state directory, overriding station.state_dir "
        f"(default with --simulate: {SIM_STATE_DIR})",
    )
    run.add_argument(
        "--simulate",
        action="store_true",
        help="simulated station: mock pins, synthetic camera and audio",
    )
    run.add_argument(
        "--mqtt",
        metavar="URL",
        default=None,
        help="connect to this MQTT broker (mqtt://HOST[:PORT] or mqtts://HOST[:PORT]); "
        "other [mqtt] settings come from the config file",
    )
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file: exit 0 when valid, 2 with one line per problem.",
    )
    check.add_argument("file", type=Path, help="the TOML file to check")
    check.set_defaults(func=cmd_check_config)


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings ``run`` uses, from the file and the flags."""
    settings = _settings_for(args)
    if getattr(args, "mqtt", None):
        from intercom.mqtt.url import config_from_url  # noqa: PLC0415

        mqtt = config_from_url(args.mqtt, settings.mqtt)
        settings = settings.model_copy(update={"mqtt": mqtt})
    return settings


def _settings_for(args: argparse.Namespace) -> Settings:
    if args.simulate:
        base = load_settings(args.config) if args.config else None
        state_dir = args.state_dir or (base.station.state_dir if base else SIM_STATE_DIR)
        return simulated_settings(Path(state_dir), base)
    settings = load_settings(args.config or DEFAULT_CONFIG)
    if args.state_dir:
        settings = settings.with_state_dir(Path(args.state_dir))
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon."""
    from intercom.station import run_station  # noqa: PLC0415 - keep --help fast

    settings = settings_for(args)
    setup_logging(args.log_level or settings.station.log_level)
    for warning in wiring_warnings(settings):
        logging.getLogger("intercom.config").warning("%s", warning)
    return asyncio.run(run_station(settings))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file."""
    settings = load_settings(args.file)
    for warning in wiring_warnings(settings):
        print(f"intercom: warning: {warning}", file=sys.stderr)
    print(f"{args.file}: valid (station {settings.station.id})")
    return 0
