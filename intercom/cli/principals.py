"""``intercom principals``: register, list, show, revoke and reset who may unlock.

A running station makes each change itself (asked over its control socket), so it
takes effect at once: a revoked principal's commands are denied and its devices
dropped. With no station running, this command makes the change under the state
directory's instance lock, through the same registry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import time
from pathlib import Path
from typing import Any

import segno

from intercom.cli.common import add_state_dir, ask, station_dir
from intercom.config import PrivacyConfig
from intercom.errors import IntercomError
from intercom.security.principals import Role, public_jwk_from_file

RELATIVE = re.compile(r"^\+(\d+)([mhd])$")
UNITS = {"m": 60, "h": 3600, "d": 86400}
# Installers are time-boxed; the same default as privacy.installer_valid_hours.
INSTALLER_DEFAULT_S = int(PrivacyConfig.model_fields["installer_valid_hours"].default * 3600)
TIME_HELP = "ISO 8601 (UTC unless it has an offset) or relative: +30m, +8h, +90d"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``principals`` command and its subcommands."""
    parser = sub.add_parser(
        "principals",
        help="manage who may send unlock commands",
        description="Register, list, show, revoke and reset the principals whose signed "
        "commands may unlock the door. A running station makes each change at once; "
        "with none running, the command makes it under the state directory's lock.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        help="register a principal and print its TOTP enrolment",
        description="Register a principal with its public key (Ed25519 or ECDSA P-256, PEM "
        "or JWK). Prints the TOTP enrolment once, as an otpauth:// URI and a QR code.",
    )
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument("--flat", action="append", default=[], help="a resident's flat (repeatable)")
    add.add_argument("--door", action="append", default=[], help="a manager's door (repeatable)")
    add.add_argument("--public-key", required=True, type=Path, metavar="PEMFILE",
                     help="the principal's public key, PEM or JWK")
    add.add_argument("--id", help="principal id, the JWS kid (default: ROLE-<random>)")
    add.add_argument("--valid-from", metavar="T", help=f"default now; {TIME_HELP}")
    add.add_argument("--valid-until", metavar="T",
                     help=f"default never (installers: +72h); {TIME_HELP}")
    add.add_argument("--issuer", default="intercom", help="issuer shown by authenticator apps")
    add.add_argument("--no-qr", action="store_true", help="print the URI only, no QR code")
    add_state_dir(add)
    add.set_defaults(func=cmd_add)

    lst = actions.add_parser("list", help="list every principal")
    add_state_dir(lst)
    lst.set_defaults(func=cmd_list)

    for name, text, func in (
        ("show", "show one principal (never its TOTP secret)", cmd_show),
        ("revoke", "revoke a principal: its commands are denied from now on", cmd_revoke),
        ("reset", "clear a principal's TOTP failures and lockout", cmd_reset),
    ):
        one = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        one.add_argument("id", metavar="ID")
        add_state_dir(one)
        one.set_defaults(func=func)


def parse_time(text: str, now: float) -> float:
    """A unix time from ISO 8601 (UTC when naive) or ``+N[mhd]``."""
    if match := RELATIVE.match(text.strip()):
        return now + int(match.group(1)) * UNITS[match.group(2)]
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise IntercomError(f"not a time: {text!r} ({TIME_HELP})") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def show_time(value: float | None) -> str:
    """ISO 8601 UTC to the second, or ``-``."""
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_add(args: argparse.Namespace) -> int:
    """Register a principal; print its id and TOTP enrolment."""
    now = time.time()
    role = Role(args.role)
    try:
        jwk = public_jwk_from_file(args.public_key.read_bytes())
    except OSError as exc:
        raise IntercomError(f"cannot read {args.public_key}: {exc.strerror or exc}") from exc
    valid_from = parse_time(args.valid_from, now) if args.valid_from else now
    valid_until = parse_time(args.valid_until, now) if args.valid_until else None
    if role is Role.INSTALLER and valid_until is None:
        valid_until = valid_from + INSTALLER_DEFAULT_S
    answer = ask(station_dir(args), {
        "request": "principals", "action": "add", "role": role.value, "jwk": jwk,
        "id": args.id, "flats": args.flat, "doors": args.door, "valid_from": valid_from,
        "valid_until": valid_until, "issuer": args.issuer,
    })
    p = answer["principal"]
    uri = str(answer["totp_uri"])
    print(f"added    {p['id']} ({p['role']}{_scope(p)}), {p['key_kind']} key")
    print(f"valid    {show_time(p['valid_from'])} .. {show_time(p['valid_until'])}")
    print("TOTP enrolment (shown once; scan it into the signer or an authenticator app):")
    print(uri)
    if not args.no_qr:
        segno.make(uri, error="m").terminal(out=sys.stdout, compact=True)
    return 0


def _scope(p: dict[str, Any]) -> str:
    if p["flats"]:
        return ", flats " + ",".join(p["flats"])
    if p["doors"]:
        return ", doors " + ",".join(p["doors"])
    return ""


def cmd_list(args: argparse.Namespace) -> int:
    """Print one line per principal."""
    answer = ask(station_dir(args), {"request": "principals", "action": "list"})
    print(f"{'ID':<24} {'ROLE':<9} {'SCOPE':<16} {'KEY':<7} {'VALID UNTIL':<20} STATE")
    for p in answer["principals"]:
        scope = ",".join(p["flats"] or p["doors"]) or "*"
        print(
            f"{p['id']:<24} {p['role']:<9} {scope:<16} {p['key_kind']:<7} "
            f"{show_time(p['valid_until']):<20} {p['state']}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print one principal's record (never its secret)."""
    answer = ask(station_dir(args), {"request": "principals", "action": "show", "id": args.id})
    p = answer["principal"]
    print(f"id           {p['id']}")
    print(f"role         {p['role']}{_scope(p)}")
    print(f"key          {p['key_kind']}, JWK thumbprint {p['thumbprint']}")
    print(f"algorithms   {', '.join(p['algorithms'])}")
    print(f"valid        {show_time(p['valid_from'])} .. {show_time(p['valid_until'])}")
    print(f"revoked      {show_time(p['revoked_at'])}")
    print(f"state        {p['state']}")
    if p["failures"]:
        print(f"failures     {p['failures']} consecutive TOTP failures")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Revoke a principal: denied, disconnected and no longer rung, at once."""
    answer = ask(station_dir(args), {"request": "principals", "action": "revoke", "id": args.id})
    print(f"revoked  {args.id}" if answer["changed"] else f"{args.id} was revoked already")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    """Clear a principal's failure count and lockout."""
    ask(station_dir(args), {"request": "principals", "action": "reset", "id": args.id})
    print(f"reset    {args.id}: TOTP failures cleared")
    return 0
