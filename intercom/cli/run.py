"""``intercom run`` and ``intercom check-config``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
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
from intercom.errors import ConfigError
from intercom.logsetup import setup_logging
from intercom.netaddr import lan_address
from intercom.statedir import CONFIG_ENV, STATE_ENV, resolve


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
        help=f"config file (default ${CONFIG_ENV}, else {DEFAULT_CONFIG}; optional with "
        "--simulate, which then keeps its wiring and web port)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"state directory (default ${STATE_ENV}, else the config's station.state_dir, "
        f"else /var/lib/intercom; with --simulate {SIM_STATE_DIR})",
    )
    run.add_argument(
        "--simulate",
        action="store_true",
        help="simulated station: mock pins, synthetic camera and audio",
    )
    run.add_argument(
        "--lan",
        action="store_true",
        help="with --simulate: listen on this machine's LAN address (its first IPv4 address "
        "that is not loopback or link-local, else IPv6) instead of loopback, on the "
        "config's [web] port, so a phone on the same network can pair (scripts/demo --lan)",
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
        description="Validate a config file: exit 0 when valid, 2 with one line per problem "
        "(its line in the file, the key, what is wrong; a misspelt key gets a 'did you "
        "mean').",
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
    config = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if getattr(args, "lan", False) and not args.simulate:
        raise ConfigError(["--lan: only with --simulate; a station listens on [web] host"])
    if args.simulate:
        base = load_settings(config) if config else None
        where = resolve(args.state_dir, config, simulate=True, settings=base)
        settings = simulated_settings(where.state_dir, base)
        if getattr(args, "lan", False):
            web = settings.web.model_copy(update={"host": str(lan_address())})
            settings = settings.model_copy(update={"web": web})
        return settings
    path = config or DEFAULT_CONFIG
    if not path.exists():
        how = (f"give one with --config FILE (or ${CONFIG_ENV})" if config is None
               else "check the path given")
        problem = (f"{path}: no such config file; {how}, or try a simulated station, "
                   "which needs none: intercom run --simulate")
        raise ConfigError([problem])
    settings = load_settings(path)
    where = resolve(args.state_dir, config or DEFAULT_CONFIG, settings=settings)
    return settings.with_state_dir(where.state_dir)


def config_path(args: argparse.Namespace) -> Path | None:
    """The file the daemon's config writer changes: the one it was started from, if any."""
    config = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    return config if config is not None or args.simulate else DEFAULT_CONFIG


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon."""
    from intercom.station import run_station  # noqa: PLC0415 - keep --help fast

    settings = settings_for(args)
    setup_logging(args.log_level or settings.station.log_level)
    for warning in wiring_warnings(settings):
        logging.getLogger("intercom.config").warning("%s", warning)
    return asyncio.run(run_station(settings, config_path=config_path(args)))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file."""
    settings = load_settings(args.file)
    for warning in wiring_warnings(settings):
        print(f"intercom: warning: {warning}", file=sys.stderr)
    print(f"{args.file}: valid (station {settings.station.id})")
    return 0
