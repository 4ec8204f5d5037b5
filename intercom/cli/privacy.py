"""``intercom privacy``: zone preview, snapshots, installer hand-off, export and erase."""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from pathlib import Path
from typing import Any

from intercom.cli.common import add_state_dir, ask, state_dir, station_dir
from intercom.cli.principals import show_time
from intercom.config import DEFAULT_CONFIG, PrivacyConfig, Settings
from intercom.control import SOCKET_NAME, request_sync
from intercom.errors import IntercomError

ZONE_COLOUR = (0, 255, 0)  # BGR: the outline drawn over the masked zones
MAX_EXTEND_HOURS = 24 * 30


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``privacy preview|snapshots|export|erase|installer``."""
    parser = sub.add_parser(
        "privacy",
        help="privacy zones preview, snapshots, installer hand-off, export and erase",
        description="Check the privacy zones, read snapshots as a manager or resident sees "
        "them, extend or revoke an installer, and answer data subject requests (export, "
        "erase). Privileged actions are logged with the local user who did them.",
    )
    cmds = parser.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)

    preview = cmds.add_parser(
        "preview", help="write one camera frame with the zones masked and outlined (PNG)",
        description="Take one frame with the privacy zones masked as every output gets "
        "them, outline the zones in green and write a PNG. The frame comes from the running "
        "station when there is one (and neither --config nor --simulate is given), else "
        "from the camera the config names.",
    )
    preview.add_argument("--out", type=Path, required=True, metavar="FILE.png")
    preview.add_argument("--config", type=Path, default=None,
                         help=f"config file (default {DEFAULT_CONFIG}; optional with --simulate)")
    preview.add_argument("--simulate", action="store_true",
                         help="use the synthetic camera (zones still from --config, if given)")
    add_state_dir(preview)
    preview.set_defaults(func=cmd_preview)

    snaps = cmds.add_parser(
        "snapshots", help="write the stored snapshots as JPEG files",
        description="Write the snapshots still held in the event log. For a manager "
        "(the default) faces are redacted; for a resident only their flat's rings, with "
        "the zones masked.",
    )
    snaps.add_argument("--out", type=Path, required=True, metavar="DIR")
    snaps.add_argument("--for", dest="audience", choices=["manager", "resident"],
                       default="manager", help="whose view (default manager: redacted)")
    snaps.add_argument("--flat", action="append", default=[],
                       help="a resident's flat (required with --for resident; repeatable)")
    add_state_dir(snaps)
    snaps.set_defaults(func=cmd_snapshots)

    export = cmds.add_parser(
        "export", help="export everything held about a principal (JSON and images)",
        description="Write the principal's registry entry, their events and the snapshots "
        "of their flats' rings into DIR (mode 0700). Logged.",
    )
    export.add_argument("--principal", required=True, metavar="ID")
    export.add_argument("--out", type=Path, required=True, metavar="DIR")
    add_state_dir(export)
    export.set_defaults(func=cmd_export)

    erase = cmds.add_parser(
        "erase", help="erase a principal: delete their keys, make their log fields unreadable",
        description="Delete the principal's registry entry (public key, TOTP secret) and "
        "destroy their key in the event log, so their personal fields are unreadable in "
        "every record; the chain still verifies. Logged without naming them.",
    )
    erase.add_argument("--principal", required=True, metavar="ID")
    add_state_dir(erase)
    erase.set_defaults(func=cmd_erase)

    installer = cmds.add_parser(
        "installer", help="extend or revoke an installer's time box (hand-off)",
        description="Installers are valid for a limited time after provisioning. The owner "
        "extends the time box or revokes the installer at hand-off. Logged.",
    )
    acts = installer.add_subparsers(dest="installer_command", metavar="ACTION", required=True)
    extend = acts.add_parser("extend", help="make an installer valid for HOURS from now")
    extend.add_argument("id", metavar="ID")
    extend.add_argument("--hours", type=float, default=None,
                        help="hours from now, at most 720 (default: the config's "
                        "privacy.installer_valid_hours, "
                        f"{PrivacyConfig().installer_valid_hours:g} unless set)")
    extend.add_argument("--config", type=Path, default=None,
                        help=f"config file to take the default from (default {DEFAULT_CONFIG} "
                        "when it exists)")
    add_state_dir(extend)
    extend.set_defaults(func=cmd_installer_extend)
    revoke = acts.add_parser("revoke", help="revoke an installer now (hand-off done)")
    revoke.add_argument("id", metavar="ID")
    add_state_dir(revoke)
    revoke.set_defaults(func=cmd_installer_revoke)


def _actor() -> str:
    from intercom.privacy.audit import local_actor  # noqa: PLC0415

    return local_actor()


def _settings(args: argparse.Namespace) -> Settings:
    from intercom.cli.run import settings_for  # noqa: PLC0415

    args.mqtt = None
    return settings_for(args)


def cmd_preview(args: argparse.Namespace) -> int:
    """Write a PNG of one masked frame with the zones outlined."""
    if args.out.suffix.lower() != ".png":
        raise IntercomError(f"--out {args.out}: the preview is a PNG; name it FILE.png")
    import numpy as np  # noqa: PLC0415

    from intercom.privacy.redact import load_cv2  # noqa: PLC0415

    cv2 = load_cv2()
    state = state_dir(args)
    if not args.config and not args.simulate and (state / SOCKET_NAME).exists():
        # The running station holds the camera: it sends a frame as its outputs get it.
        answer = request_sync(state, {"request": "privacy-preview"}, timeout=15)
        if not answer.get("ok"):
            raise IntercomError(f"the station refused: {answer.get('error')}")
        jpeg = np.frombuffer(base64.b64decode(answer["jpeg"]), np.uint8)
        image = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
        zones = answer["zones"]
        source = "the running station"
    else:
        settings = _settings(args)
        image = asyncio.run(_grab(settings)).to_ndarray(format="bgr24")
        zones = settings.privacy.zones
        source = f"the {settings.media.camera.source} camera"
    height, width = image.shape[:2]
    for zone in zones:
        points = np.array([[round(x * width), round(y * height)] for x, y in zone], np.int32)
        cv2.polylines(image, [points], isClosed=True, color=ZONE_COLOUR, thickness=2)
    if not cv2.imwrite(str(args.out), image):
        raise IntercomError(f"cannot write {args.out}")
    print(f"wrote {args.out}: {width}x{height} from {source}, {len(zones)} zones masked")
    return 0


async def _grab(settings: Settings) -> Any:
    from intercom.media import open_camera  # noqa: PLC0415
    from intercom.privacy.camera import privacy_camera, still_frame  # noqa: PLC0415

    camera = privacy_camera(open_camera(settings.media.camera), settings.privacy)
    await camera.open()
    try:
        return await asyncio.wait_for(still_frame(camera), 10)
    finally:
        await camera.close()


def cmd_snapshots(args: argparse.Namespace) -> int:
    """Write the readable snapshots for one audience."""
    from intercom.privacy.dsr import open_reader  # noqa: PLC0415
    from intercom.privacy.snapshots import read_snapshots  # noqa: PLC0415
    from intercom.safefiles import make_private_dir, write_new  # noqa: PLC0415

    if args.audience == "resident" and not args.flat:
        raise IntercomError("--for resident needs --flat: a resident sees only their flat's")
    reader = open_reader(state_dir(args))
    if reader is None:
        raise IntercomError("no event log in the state directory")
    flats = frozenset(args.flat) if args.flat else None
    make_private_dir(args.out)  # new, 0700: an existing folder or link is refused
    count = 0
    try:
        for snap in read_snapshots(reader, args.audience, flats=flats):
            path = write_new(args.out, f"snapshot-{snap.seq}.jpg", snap.jpeg)
            count += 1
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.at))
            print(f"{path}  {when}  flat {snap.flat}" + ("  (redacted)" if snap.redacted else ""))
    finally:
        reader.conn.close()
    print(f"{count} snapshots written for a {args.audience}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export what is held about a principal."""
    from intercom.privacy.dsr import export_principal, registry_entry  # noqa: PLC0415

    state = station_dir(args)
    try:
        shown = ask(state, {"request": "principals", "action": "show", "id": args.principal})
        entry: dict[str, Any] | None = registry_entry(shown["principal"])
    except IntercomError as exc:
        if not str(exc).startswith("no principal"):
            raise
        entry = None
    report = export_principal(state, args.principal, args.out, _actor(), entry)
    if not report.found:
        print(f"nothing is held about {args.principal}; wrote an empty export to {args.out}")
        return 0
    answer = ask(state, {"request": "audit", "action": "export", "target": args.principal,
                         "known": True,
                         "detail": f"{report.events} events, {report.snapshots} snapshots"})
    print(f"exported {args.principal} to {args.out}: registry entry, {report.events} events, "
          f"{report.snapshots} snapshots" + _logged(answer.get("logged_seq")))
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """Erase a principal."""
    answer = ask(station_dir(args), {"request": "erase", "id": args.principal})
    if not answer["registry"] and not answer["log_key"]:
        raise IntercomError(f"nothing is held about {args.principal}: nothing erased")
    print(f"erased {args.principal}: "
          + ("registry entry deleted, " if answer["registry"] else "no registry entry, ")
          + ("event-log key destroyed" if answer["log_key"] else "no event-log key")
          + _logged(answer.get("logged_seq")))
    return 0


def _logged(seq: int | None) -> str:
    return f"; logged as seq {seq}" if seq is not None else "; NOT logged (no event log)"


def cmd_installer_extend(args: argparse.Namespace) -> int:
    """Move an installer's expiry to HOURS from now."""
    if args.hours is None:
        args.hours = _installer_hours(args.config)
    if not 0 < args.hours <= MAX_EXTEND_HOURS:
        raise IntercomError(f"--hours: more than 0, at most {MAX_EXTEND_HOURS}")
    until = time.time() + args.hours * 3600
    answer = ask(station_dir(args), {"request": "installer", "action": "extend", "id": args.id,
                                     "until": until})
    print(f"installer {args.id} valid until {show_time(until)}"
          + _logged(answer.get("logged_seq")))
    return 0


def _installer_hours(config: Path | None) -> float:
    """The config's installer validity (the built-in default when there is no config)."""
    from intercom.config import load_settings  # noqa: PLC0415

    path = config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is None:
        return PrivacyConfig().installer_valid_hours
    return load_settings(path).privacy.installer_valid_hours


def cmd_installer_revoke(args: argparse.Namespace) -> int:
    """Revoke an installer."""
    answer = ask(station_dir(args), {"request": "installer", "action": "revoke", "id": args.id})
    if not answer["changed"]:
        print(f"{args.id} was revoked already")
        return 0
    print(f"revoked installer {args.id}" + _logged(answer.get("logged_seq")))
    return 0
