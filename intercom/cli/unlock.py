"""``intercom sign-command``, ``sign-bearer`` and ``unlock``: sign a command or a bearer, unlock."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyotp

from intercom.cli.common import add_state_dir, state_dir
from intercom.control import request_sync
from intercom.errors import CommandRefusedError, IntercomError
from intercom.security import command, totp


def _signer_arguments(parser: argparse.ArgumentParser, who: str) -> None:
    """``--key``, ``--kid`` and ``--station``: who signs, for which station."""
    parser.add_argument("--key", required=True, type=Path, metavar="PEMFILE",
                        help=f"the {who}'s private key (Ed25519 or ECDSA P-256, PEM)")
    parser.add_argument("--kid", required=True, metavar="ID", help=f"the {who}'s id (kid)")
    parser.add_argument("--station", required=True, metavar="ID", help="the station id (aud)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``sign-command``, ``sign-bearer`` and ``unlock`` commands."""
    sign = sub.add_parser(
        "sign-command",
        help="print a signed unlock command (compact JWS)",
        description="Sign an unlock command for a station's door with a principal's private "
        "key and current TOTP code, and print it as a compact JWS. Any JOSE library can make "
        "the same; see docs/security.md.",
    )
    _signer_arguments(sign, "principal")
    sign.add_argument("--door", required=True, metavar="NAME", help="the door to open")
    code = sign.add_mutually_exclusive_group(required=True)
    code.add_argument("--totp", metavar="CODE", help="the current TOTP code")
    code.add_argument("--totp-secret-file", type=Path, metavar="F",
                      help="file holding the TOTP secret (base32) or its otpauth:// URI")
    sign.add_argument("--lifetime", type=int, default=30, metavar="S",
                      help="seconds until the command expires, 1-60 (default 30)")
    sign.add_argument("--alg", choices=["Ed25519", "EdDSA", "ES256"],
                      help="JWS algorithm (default: Ed25519 or ES256 by the key)")
    sign.set_defaults(func=cmd_sign)

    bearer = sub.add_parser(
        "sign-bearer",
        help="print a manager's read-only bearer token for /metrics or /whep",
        description="Sign a read-only bearer token with a manager principal's private key and "
        "print it (a compact JWS whose cmd is the scope). A Prometheus scraper sends a "
        "'metrics' bearer as 'Authorization: Bearer TOKEN' to /metrics ([monitor] metrics = "
        "true); a WHEP client sends a 'whep' bearer to /whep, the redacted live view ([whep] "
        "enabled = true). It opens nothing; it stops working when it expires or the "
        "principal is revoked.",
    )
    _signer_arguments(bearer, "manager")
    bearer.add_argument("--scope", choices=["metrics", "whep"], default="metrics",
                        help="what the token may read (default metrics)")
    life = bearer.add_mutually_exclusive_group()
    life.add_argument("--days", type=float, metavar="N",
                      help="days until the token expires (metrics: at most 366, default 365)")
    life.add_argument("--hours", type=float, metavar="N",
                      help="hours until the token expires (whep: default 24, at most the "
                      "station's [whep] max_bearer_hours)")
    bearer.set_defaults(func=cmd_sign_bearer)

    unlock = sub.add_parser(
        "unlock",
        help="hand a signed command to the running station",
        description="Hand a signed unlock command to the running station over its local "
        "control socket. Exit 0 when granted, 1 when denied (the reason is in the "
        "station's log only).",
    )
    unlock.add_argument("jws", metavar="TOKEN", help="the command; - reads it from stdin")
    add_state_dir(unlock)
    unlock.set_defaults(func=cmd_unlock)


def _code_from_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise IntercomError(f"cannot read {path}: {exc.strerror or exc}") from exc
    problem = IntercomError(f"{path} holds no TOTP secret (base32) or otpauth:// URI")
    if text.startswith("otpauth://"):
        try:
            generator = pyotp.parse_uri(text)
        except ValueError as exc:
            raise problem from exc
        if not isinstance(generator, pyotp.TOTP):
            raise problem
        return str(generator.now())
    try:
        return totp.code_at(text, time.time())
    except (ValueError, TypeError) as exc:
        raise problem from exc


def cmd_sign(args: argparse.Namespace) -> int:
    """Print a signed unlock command."""
    try:
        pem = args.key.read_bytes()
    except OSError as exc:
        raise IntercomError(f"cannot read {args.key}: {exc.strerror or exc}") from exc
    code = args.totp if args.totp is not None else _code_from_file(args.totp_secret_file)
    try:
        key = command.load_private_key(pem)
        token = command.sign(
            key, kid=args.kid, station=args.station, door=args.door, totp=code,
            lifetime=args.lifetime, alg=args.alg,
        )
    except (command.CommandFormatError, ValueError) as exc:
        raise CommandRefusedError(str(exc)) from exc
    print(token)
    return 0


def cmd_sign_bearer(args: argparse.Namespace) -> int:
    """Print a signed read-only bearer."""
    try:
        pem = args.key.read_bytes()
    except OSError as exc:
        raise IntercomError(f"cannot read {args.key}: {exc.strerror or exc}") from exc
    try:
        key = command.load_private_key(pem)
        if args.hours is not None:
            lifetime = args.hours * 3600
        elif args.days is not None:
            lifetime = args.days * 86_400
        else:
            lifetime = 365 * 86_400 if args.scope == "metrics" else 24 * 3600
        token = command.sign_bearer(
            key, kid=args.kid, station=args.station, scope=args.scope, lifetime=lifetime
        )
    except (command.CommandFormatError, ValueError) as exc:
        raise CommandRefusedError(str(exc)) from exc
    print(token)
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    """Send the command; exit 0 when granted, 1 when denied."""
    token = sys.stdin.read() if args.jws == "-" else args.jws
    answer = request_sync(state_dir(args), {"request": "unlock", "token": token.strip()})
    if not answer.get("ok"):
        raise IntercomError(str(answer.get("error", "the station refused the request")))
    result = answer.get("result")
    print(result)
    return 0 if result == "granted" else 1
