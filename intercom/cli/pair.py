"""``intercom pair``: a one-time pairing code for a resident's device, with its QR code."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import segno

from intercom.cli.common import add_state_dir, resolved
from intercom.control import request_sync
from intercom.deploy.stationca import grouped
from intercom.errors import IntercomError, StationNotRunningError
from intercom.privacy.audit import local_actor


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``pair`` command."""
    pair = sub.add_parser(
        "pair",
        help="make a one-time pairing code for a resident's device (or an installer's phone)",
        description="Ask the running station for a one-time pairing code (single use, "
        "expires in 10 minutes) for a resident of FLAT, and print the code, the pairing "
        "link and a QR code of the link. With no station running, the code is made here "
        "from the config file (--config: its flats and address) and spooled for the station "
        "to take when it starts (as the state directory's owner, under its instance lock). "
        "The link holds the station URL, the code and "
        "the SHA-256 fingerprint of the station's CA certificate (of the owner's "
        "certificate with [web] tls_cert_file); the page the CA is installed from "
        "(trust.html) shows the same fingerprint.",
    )
    who = pair.add_mutually_exclusive_group(required=True)
    who.add_argument("--flat", help="the flat whose resident pairs")
    who.add_argument("--installer", action="store_true",
                     help="pair an installer's phone for the installer console (installer.html), "
                     "valid privacy.installer_valid_hours once paired")
    pair.add_argument(
        "--name", help="a name for the device, printed here only (never sent to the station)"
    )
    pair.add_argument("--png", type=Path, metavar="FILE", help="also write the QR code as PNG")
    pair.add_argument("--svg", type=Path, metavar="FILE", help="also write the QR code as SVG")
    pair.add_argument("--no-qr", action="store_true", help="do not print the QR code")
    add_state_dir(pair)
    pair.set_defaults(func=cmd_pair)


def cmd_pair(args: argparse.Namespace) -> int:
    """Print a pairing code, its link and QR code."""
    request = ({"request": "pair-installer"} if args.installer
               else {"request": "pair", "flat": args.flat})
    where = resolved(args)
    try:
        answer = request_sync(where.state_dir, request)
    except StationNotRunningError:
        from intercom.admin import offline_pair  # noqa: PLC0415

        station = where.require_station()
        answer = offline_pair(station, where.config, {**request, "actor": local_actor()})
    if not answer.get("ok"):
        raise IntercomError(str(answer.get("error", "the station refused the request")))
    link = str(answer["url"])
    expires = dt.datetime.fromtimestamp(float(answer["expires_at"]), dt.UTC)
    qr = segno.make(link, error="m")
    for path, kind in ((args.png, "png"), (args.svg, "svg")):
        if path is not None:
            try:
                qr.save(str(path), kind=kind, scale=8, border=4)
            except OSError as exc:
                raise IntercomError(f"cannot write {path}: {exc.strerror or exc}") from exc
    who = f" ({args.name})" if args.name else ""
    whom = (f"an installer, valid {answer['valid_hours']:g} h once paired" if args.installer
            else f"flat {args.flat}")
    print(f"pairing code for {whom}{who}: {answer['code']}")
    print(f"expires:     {expires:%Y-%m-%d %H:%M:%S} UTC (single use)")
    if answer.get("spooled"):
        print("             no station is running: it takes this code when it starts, "
              "so start it before then")
    print(f"fingerprint: {grouped(str(answer['fingerprint']))}")
    if answer.get("trust_url"):
        print(f"trust:       {answer['trust_url']} (install the station's CA of this fingerprint)")
    print(f"link:        {link}")
    if not args.no_qr:
        qr.terminal(out=sys.stdout, compact=True)
    return 0
