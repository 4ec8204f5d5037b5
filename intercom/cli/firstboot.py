"""``intercom firstboot``: provision the station from the installer file on the boot partition."""

from __future__ import annotations

import argparse
from pathlib import Path

from intercom.config import DEFAULT_STATE_DIR
from intercom.deploy.firstboot import DEFAULT_WIFI_CONF, INSTALLER_FILE, FirstBoot


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``firstboot`` command."""
    cmd = sub.add_parser(
        "firstboot",
        help="provision from the installer file on the boot partition (run by systemd)",
        description=f"Move BOOT_DIR/{INSTALLER_FILE} to ETC_DIR, its secrets to root-only "
        "files, remove it from the boot partition, make the station key, TLS certificate and "
        "event log master key when missing (never replacing one), register the installer "
        "and print the enrolment. Running it again is safe.",
    )
    cmd.add_argument("--boot-dir", type=Path, default=Path("/boot/firmware"),
                     help="the mounted boot partition (default /boot/firmware)")
    cmd.add_argument("--etc-dir", type=Path, default=Path("/etc/intercom"),
                     help="where the config goes (default /etc/intercom)")
    cmd.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                     help=f"the station's state folder (default {DEFAULT_STATE_DIR})")
    cmd.add_argument("--wifi-conf", type=Path, default=DEFAULT_WIFI_CONF,
                     help=f"wpa_supplicant file for [wifi] (default {DEFAULT_WIFI_CONF})")
    cmd.add_argument("--owner", default=None,
                     help="user (and group) that gets the state folder, e.g. intercom")
    cmd.set_defaults(func=cmd_firstboot)


def cmd_firstboot(args: argparse.Namespace) -> int:
    """Provision and print what was done."""
    report = FirstBoot(
        boot_dir=args.boot_dir, etc_dir=args.etc_dir, state_dir=args.state_dir,
        owner=args.owner, wifi_conf=args.wifi_conf,
    ).run()
    print("intercom first boot:")
    for line in report.lines:
        print(f"  {line}")
    return 0
