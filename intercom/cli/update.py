"""``intercom update``: build, verify and apply signed update bundles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from intercom.deploy.bundle import build_bundle, generate_release_key, load_private_key
from intercom.deploy.health import HealthCheck, ProbeCheck, ServiceCheck
from intercom.deploy.releases import Layout, apply, verify
from intercom.errors import IntercomError

DEFAULT_TIMEOUT_S = 90.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``update`` command group."""
    update = sub.add_parser(
        "update",
        help="build, verify and apply signed update bundles",
        description="Signed updates: a bundle is a tar of wheels and a manifest signed "
        "with an Ed25519 release key. A bad signature, an unknown key or an older version "
        "is refused; a new version that does not reach READY in time is rolled back.",
    )
    verbs = update.add_subparsers(dest="verb", metavar="VERB", required=True)

    def root_arg(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--root", type=Path, default=Path("/"),
            help="file system root holding opt/intercom and the release keys (default /)",
        )

    apply_p = verbs.add_parser(
        "apply", help="install a bundle and switch to it",
        description="Verify BUNDLE, install it beside the running release, switch "
        "opt/intercom/current to it and check that it reaches READY; roll back if not.",
    )
    apply_p.add_argument("bundle", type=Path, help="the .bundle file")
    root_arg(apply_p)
    apply_p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S,
        help=f"seconds the new version has to reach READY (default {DEFAULT_TIMEOUT_S:g})",
    )
    apply_p.add_argument(
        "--check", choices=["service", "probe", "none"], default="service",
        help="service: restart intercom.service and wait for READY (default); probe: start "
        "the new release's 'intercom run --simulate' and wait for READY; none: no check",
    )
    apply_p.add_argument("--unit", default="intercom.service", help="unit for --check service")
    apply_p.set_defaults(func=cmd_apply)

    verify_p = verbs.add_parser(
        "verify", help="check a bundle without installing it",
        description="Check the signature, the key and the version of BUNDLE.",
    )
    verify_p.add_argument("bundle", type=Path)
    root_arg(verify_p)
    verify_p.set_defaults(func=cmd_verify)

    status_p = verbs.add_parser("status", help="show installed releases and update history")
    root_arg(status_p)
    status_p.set_defaults(func=cmd_status)

    build_p = verbs.add_parser(
        "build", help="make a signed bundle from wheels (release machine)",
        description="Sign every wheel in WHEELS (the intercom wheel and all its dependencies, "
        "built for the station's platform) into one bundle; the version is the intercom "
        "wheel's.",
    )
    build_p.add_argument("--wheels", type=Path, required=True, help="folder of .whl files")
    build_p.add_argument("--key", type=Path, required=True, help="release private key (PEM)")
    build_p.add_argument("--out", type=Path, required=True, help="bundle file to write")
    build_p.set_defaults(func=cmd_build)

    keygen_p = verbs.add_parser(
        "keygen", help="make a release key pair (release machine)",
        description="Write PREFIX.key (private, mode 0600; keep it offline) and PREFIX.pem "
        "(public; ships in the image under usr/share/intercom/release-keys/).",
    )
    keygen_p.add_argument("prefix", type=Path)
    keygen_p.set_defaults(func=cmd_keygen)


def _check(args: argparse.Namespace) -> HealthCheck | None:
    if args.check == "service":
        return ServiceCheck(args.unit)
    if args.check == "probe":
        return ProbeCheck()
    return None


def cmd_apply(args: argparse.Namespace) -> int:
    """Apply a bundle."""
    result = apply(Layout(args.root), args.bundle, _check(args), args.timeout)
    print(
        f"intercom {result.version} installed (was {result.previous or 'none'}); "
        f"{result.health.detail} after {result.health.seconds:.1f} s"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify a bundle."""
    manifest = verify(Layout(args.root), args.bundle)
    print(
        f"{args.bundle}: intercom {manifest.version}, signed by release key "
        f"{manifest.key_id}, {len(manifest.wheels)} wheels: can be applied"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Show releases and history."""
    layout = Layout(args.root)
    state = layout.read_state()
    releases = sorted(p.name for p in layout.releases.iterdir()) if layout.releases.is_dir() else []
    print(f"current: {layout.current_version() or 'none'}")
    print(f"highest run: {state.get('highest') or 'none'}")
    print(f"installed: {', '.join(releases) or 'none'}")
    for item in state.get("history", [])[-5:]:
        outcome = "ok" if item.get("ready") else "rolled back"
        print(f"  {item.get('from')} -> {item.get('version')}: {outcome} ({item.get('detail')})")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build a bundle."""
    wheels = sorted(args.wheels.glob("*.whl"))
    if not wheels:
        raise IntercomError(f"{args.wheels}: no .whl files")
    manifest = build_bundle(wheels, load_private_key(args.key), args.out)
    print(f"{args.out}: intercom {manifest.version}, {len(wheels)} wheels, "
          f"signed by release key {manifest.key_id}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Make a release key pair."""
    private, public = args.prefix.with_suffix(".key"), args.prefix.with_suffix(".pem")
    if private.exists():
        print(f"intercom: {private} exists; not replacing a key", file=sys.stderr)
        return 1
    kid = generate_release_key(private, public)
    print(f"release key {kid}: private {private}, public {public}")
    return 0
