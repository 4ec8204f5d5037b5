"""Administration requests: principals, installers, erasure, purges and audit notes.

One code path whoever runs it: the running station answers these requests on its
control socket; with no station running, the command that asks runs the very same
handlers itself (``offline``), under the state directory's instance lock, so the
databases always have one owner. The actor of each change comes from the control
socket's peer credentials (or, offline, from the command's own user).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intercom.errors import CommandRefusedError
from intercom.events import EventBus, LogPurged, PrivilegedAction
from intercom.security import totp
from intercom.security.limits import Limits
from intercom.security.principals import Principal, PrincipalError, Role
from intercom.security.registry import Registry

if TYPE_CHECKING:
    from intercom.eventlog import EventLog
    from intercom.security.store import Guard

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# Notes a command may ask the station to log after it read data out (exports).
AUDIT_ACTIONS = frozenset({"export", "snapshots-export", "log-export"})
MAX_TEXT = 200


def _text(request: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = request.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise CommandRefusedError(f"{key} must be a string of 1-{MAX_TEXT} characters")
    return value


def _number(request: dict[str, Any], key: str) -> float | None:
    value = request.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e11:
        raise CommandRefusedError(f"{key} must be a unix time")
    return float(value)


def _names(request: dict[str, Any], key: str) -> tuple[str, ...]:
    value = request.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CommandRefusedError(f"{key} must be a list of names")
    return tuple(value)


def principal_state(p: Principal, guard: Guard | None, now: float) -> str:
    """``active``, ``revoked``, ``expired``, ``not yet valid`` or ``locked out``."""
    if reason := p.inactive_reason(now):
        return reason.removeprefix("principal ")
    if guard is not None and guard.failures >= Limits().lockout_after:
        return "locked out"
    return "active"


def describe(p: Principal, guard: Guard | None, now: float) -> dict[str, Any]:
    """A principal as JSON for the command line (never its TOTP secret)."""
    return {
        "id": p.id,
        "role": p.role.value,
        "flats": list(p.flats),
        "doors": list(p.doors),
        "key_kind": p.key_kind,
        "thumbprint": p.key.thumbprint(),
        "algorithms": sorted(p.algorithms),
        "public_key": p.jwk,
        "valid_from": p.valid_from,
        "valid_until": p.valid_until,
        "revoked_at": p.revoked_at,
        "created_at": p.created_at,
        "failures": guard.failures if guard is not None else 0,
        "state": principal_state(p, guard, now),
    }


class Admin:
    """The administration requests of one station (or of one offline command)."""

    def __init__(
        self,
        registry: Registry,
        bus: EventBus,
        eventlog: EventLog | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._bus = bus
        self._eventlog = eventlog
        self._clock = clock

    def handlers(self) -> dict[str, Handler]:
        """Request type to handler, for the control socket."""
        return {
            "principals": self.principals_request,
            "installer": self.installer_request,
            "erase": self.erase_request,
            "log-purge": self.purge_request,
            "audit": self.audit_request,
        }

    async def _logged(self) -> int | None:
        """Wait until what was published so far is durable; the log's last seq."""
        if self._eventlog is None:
            return None
        return await self._eventlog.flush()

    # --- principals ------------------------------------------------------------------------

    async def principals_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """``add``, ``list``, ``show``, ``revoke`` and ``reset``."""
        action = request.get("action")
        actor = _text(request, "actor")
        registry = self._registry
        now = self._clock()
        if action == "list":
            guards = registry.guards()
            return {"ok": True, "principals": [describe(p, guards.get(p.id), now)
                                               for p in registry.principals()]}
        if action == "add":
            return await self._add(request, actor, now)
        pid = _text(request, "id")
        if action == "show":
            principal = registry.get(pid)
            if principal is None:
                raise CommandRefusedError(f"no principal {pid!r}")
            return {"ok": True, "principal": describe(principal, registry.guards().get(pid), now)}
        if action == "revoke":
            changed = await registry.revoke(pid, actor)
            return {"ok": True, "changed": changed, "logged_seq": await self._logged()}
        if action == "reset":
            await registry.reset(pid, actor)
            return {"ok": True, "logged_seq": await self._logged()}
        raise CommandRefusedError(f"unknown principals action {str(action)[:20]!r}")

    async def _add(self, request: dict[str, Any], actor: str, now: float) -> dict[str, Any]:
        try:
            role = Role(str(request.get("role")))
        except ValueError as exc:
            raise CommandRefusedError("role must be one of " + ", ".join(Role)) from exc
        jwk = request.get("jwk")
        if not isinstance(jwk, dict):
            raise CommandRefusedError("jwk must be a public key (JWK object)")
        valid_from = _number(request, "valid_from") or now
        valid_until = _number(request, "valid_until")
        pid = _text(request, "id", required=False) or f"{role.value}-{secrets.token_hex(3)}"
        try:
            principal = Principal(
                id=pid, role=role, jwk=jwk, valid_from=valid_from, valid_until=valid_until,
                flats=_names(request, "flats"), doors=_names(request, "doors"), created_at=now,
            )
        except PrincipalError as exc:
            raise CommandRefusedError(str(exc)) from exc
        issuer = _text(request, "issuer", required=False) or "intercom"  # checked before adding
        secret = totp.new_secret()
        await self._registry.add(principal, secret, actor)
        return {
            "ok": True,
            "principal": describe(principal, None, now),
            "totp_uri": totp.enrolment_uri(secret, pid, issuer),
            "logged_seq": await self._logged(),
        }

    async def installer_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """``extend`` (``until``) or ``revoke`` an installer."""
        actor, pid = _text(request, "actor"), _text(request, "id")
        action = request.get("action")
        if action == "extend":
            until = _number(request, "until")
            if until is None or until <= self._clock():
                raise CommandRefusedError("until must be a unix time in the future")
            await self._registry.extend(pid, until, actor, role=Role.INSTALLER)
            return {"ok": True, "until": until, "logged_seq": await self._logged()}
        if action == "revoke":
            changed = await self._registry.revoke(pid, actor, role=Role.INSTALLER)
            return {"ok": True, "changed": changed, "logged_seq": await self._logged()}
        raise CommandRefusedError(f"unknown installer action {str(action)[:20]!r}")

    # --- erasure, purges and notes -------------------------------------------------------

    async def erase_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Erase a principal: registry entry and event-log key; logged without the id."""
        actor, pid = _text(request, "actor"), _text(request, "id")
        registry = await self._registry.erase(pid)
        log_key = False
        if self._eventlog is not None:
            log_key = await self._eventlog.erase_principal(pid)
        logged = None
        if registry or log_key:
            detail = ("registry entry deleted; " if registry else "") + (
                "event-log key destroyed" if log_key else "no event-log key held"
            )
            self._bus.publish(PrivilegedAction(actor=actor, action="erase", detail=detail))
            logged = await self._logged()
        return {"ok": True, "registry": registry, "log_key": log_key, "logged_seq": logged}

    async def purge_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Shred the event log's epochs older than ``hours`` and log the purge."""
        hours = request.get("hours")
        if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 <= hours < 1e6:
            raise CommandRefusedError("hours must be a number of hours, 0 or more")
        if self._eventlog is None:
            raise CommandRefusedError("this station has no event log")
        shredded = await self._eventlog.shred(float(hours) * 3600)
        epochs = shredded.epochs if shredded else 0
        records = shredded.records if shredded else 0
        through = shredded.through_seq if shredded else 0
        self._bus.publish(LogPurged(reason="purge", older_than_hours=float(hours), epochs=epochs,
                                    records=records, through_seq=through))
        return {"ok": True, "epochs": epochs, "records": records, "through_seq": through,
                "logged_seq": await self._logged()}

    async def audit_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Log that a command read data out (an export), with its actor."""
        actor, action = _text(request, "actor"), _text(request, "action")
        if action not in AUDIT_ACTIONS:
            raise CommandRefusedError(f"audit action must be one of {sorted(AUDIT_ACTIONS)}")
        target = _text(request, "target", required=False)
        if target and self._registry.get(target) is None and not request.get("known"):
            target = ""  # naming an unknown id would make data about nobody we hold
        detail = _text(request, "detail", required=False)
        self._bus.publish(PrivilegedAction(actor=actor, action=action, target=target,
                                           detail=detail))
        return {"ok": True, "logged_seq": await self._logged()}


def _check_owner(state_dir: Path) -> None:
    """Refuse to act for a state dir another user owns: files made now would be ours."""
    owner = state_dir.stat().st_uid
    if owner == os.geteuid():
        return
    try:
        name = pwd.getpwuid(owner).pw_name
    except KeyError:
        name = f"uid {owner}"
    raise CommandRefusedError(
        f"no station is running and {state_dir} belongs to {name}: run this as that "
        f"user (sudo -u {name} intercom ...) or start the station"
    )


async def offline(state_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Answer an administration request with no station running, under the instance lock.

    The state directory must hold a station (its keys); nothing is created but the
    principals database of a station that has none yet.
    """
    from intercom.config import EventLogConfig  # noqa: PLC0415
    from intercom.control import answer  # noqa: PLC0415
    from intercom.eventlog import EventLog  # noqa: PLC0415
    from intercom.eventlog.errors import NoLogError  # noqa: PLC0415
    from intercom.identity import load_identity  # noqa: PLC0415
    from intercom.security.secretbox import load_key  # noqa: PLC0415
    from intercom.statedir import InstanceLock  # noqa: PLC0415

    await asyncio.to_thread(_check_owner, state_dir)
    identity = load_identity(state_dir)
    key = load_key(state_dir)
    lock = InstanceLock(state_dir, "cli")
    await asyncio.to_thread(lock.acquire)
    bus = EventBus()
    registry = Registry.for_state_dir(state_dir, key, bus, create=True)
    eventlog: EventLog | None = EventLog(
        state_dir, identity, bus, EventLogConfig(), create=False, retention=False
    )
    try:
        await registry.open()
        try:
            await eventlog.start() if eventlog is not None else None
        except NoLogError:
            eventlog = None
        try:
            handlers = Admin(registry, bus, eventlog).handlers()
            return await answer(handlers, request)
        finally:
            if eventlog is not None:
                await eventlog.stop()
    finally:
        await registry.close()
        lock.release()


def offline_pair(state_dir: Path, config: Path | None, request: dict[str, Any]) -> dict[str, Any]:
    """A pairing code made with no station running: spooled for the station to take at start.

    The same answer as the running station's ``pair`` and ``pair-installer`` requests,
    made under the instance lock from the station's config (its flats and address) and
    its certificate; only the code's hash goes into the spool (``pairing-spool.json``),
    which the station empties into its pending codes when it starts. The code expires
    10 minutes after it is made, as any other.
    """
    from intercom.calls.pairing import MAX_PENDING  # noqa: PLC0415
    from intercom.calls.tls import StationCert  # noqa: PLC0415
    from intercom.config import load_settings  # noqa: PLC0415
    from intercom.deploy.tlscert import station_url  # noqa: PLC0415
    from intercom.security.pairingcodes import spool_code, spooled  # noqa: PLC0415
    from intercom.statedir import InstanceLock  # noqa: PLC0415

    if config is None:
        raise CommandRefusedError(
            f"no station is running at {state_dir}, and without a config file the flats and "
            "the station's address are unknown: start the station, or pass --config FILE"
        )
    settings = load_settings(config)
    web = settings.web
    if web.port == 0 and web.public_url is None:
        raise CommandRefusedError(
            f"no station is running at {state_dir}, and {config} leaves web.port to be chosen "
            "at start (0): only the running station knows its address; start it and ask again"
        )
    _check_owner(state_dir)
    installer = request.get("request") == "pair-installer"
    flat = "" if installer else str(request.get("flat"))
    flats = sorted({button.flat for button in settings.hardware.buttons})
    if not installer and flat not in flats:
        raise CommandRefusedError(
            f"flat {flat!r} is not served by this station (its flats: {', '.join(flats)})"
        )
    hours = float(settings.privacy.installer_valid_hours) if installer else 0.0
    lock = InstanceLock(state_dir, "cli")
    lock.acquire()
    try:
        now = time.time()
        if len(spooled(state_dir, now)) >= MAX_PENDING:
            raise CommandRefusedError("too many pairing codes pending; wait for some to expire")
        cert = StationCert(state_dir, settings.station.id, web)
        cert.load()  # the station's own CA (made at its first start), or the owner's
        code, expires_at = spool_code(state_dir, flat, now, hours)
    finally:
        lock.release()
    url = station_url(web)
    page = f"{url}installer.html" if installer else url
    answer: dict[str, Any] = {
        "ok": True, "code": code, "url": f"{page}#pair={code}&fp={cert.fingerprint}",
        "station_url": url, "fingerprint": cert.fingerprint,
        "trust_url": "" if cert.owner else f"{url}trust.html",
        "expires_at": expires_at, "spooled": True,
    }
    if installer:
        answer["valid_hours"] = hours
    return answer
