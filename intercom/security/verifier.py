"""The one command verifier: every way to open the door (MQTT, call, CLI) ends here.

Checks run cheapest first and each denial names the failed check in the station's log
only; the sender learns granted or denied, nothing more. Signature checks, the one
expensive step, run only for commands that passed every cheap check and fit the
signature budget (see ``intercom.security.limits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intercom.errors import IntercomError
from intercom.events import (
    EventBus,
    PrincipalAdded,
    PrincipalLockedOut,
    PrincipalRevoked,
    UnlockDenialsSuppressed,
    UnlockDenied,
    UnlockGranted,
)
from intercom.security import command as cmdfmt
from intercom.security import limits as lim
from intercom.security.principals import Principal
from intercom.security.store import Guard, PrincipalStore
from intercom.security.totp import match_step

if TYPE_CHECKING:
    from intercom.hardware.lock import Lock
    from intercom.station import Station

log = logging.getLogger(__name__)

VIAS = frozenset({"mqtt", "cli", "call"})
HOUSEKEEPING_S = 1.0
PURGE_EVERY_S = 60.0


@dataclass(frozen=True)
class Decision:
    """The verifier's answer; ``reason`` is for the log only, never for the sender."""

    granted: bool
    reason: str
    jti: str | None
    principal: str | None


@dataclass(frozen=True)
class Site:
    """What a command must match at this station: its id, its door, the flats it serves."""

    station: str
    door: str
    flats: frozenset[str]


class Verifier:
    """Checks signed unlock commands and pulses the lock for the granted ones."""

    name = "verifier"

    def __init__(
        self,
        state_dir: Path,
        site: Site,
        bus: EventBus,
        lock: Lock | None,
        limits: lim.Limits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_dir = state_dir
        self.site = site
        self.limits = limits or lim.Limits()
        self._bus = bus
        self._lock = lock
        self._clock = clock
        self._monotonic = monotonic
        self._store: PrincipalStore | None = None
        self._version = -1
        self._principals: dict[str, tuple[Principal, str]] = {}
        self._guards: dict[str, Guard] = {}
        self._budget = lim.SignatureBudget(self.limits)
        self._event_bucket = lim.TokenBucket(
            self.limits.denied_events_per_s, self.limits.denied_events_per_s
        )
        self._suppressed = 0
        self._suppressed_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._unsynced = False
        self.granted = 0
        self.denied = 0

    @classmethod
    def for_station(cls, station: Station) -> Verifier:
        """A verifier for a station's id, door, served flats, bus and lock."""
        hw = station.settings.hardware
        site = Site(station.id, hw.relay.door, frozenset(b.flat for b in hw.buttons))
        return cls(station.state_dir, site, station.bus, station.lock)

    # --- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the principals database and load it."""
        self._store = PrincipalStore(self.state_dir)
        self._refresh(announce=False)
        self._store.purge(self._clock())
        self._task = asyncio.create_task(self._housekeeping(), name="verifier-housekeeping")

    async def stop(self) -> None:
        """Stop housekeeping and close the database."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._flush_suppressed()
        if self._store is not None:
            self._store.close()
            self._store = None

    def status(self) -> dict[str, Any]:
        """Counts for ``intercom status`` (no principal ids)."""
        return {
            "verifier": {
                "principals": len(self._principals),
                "granted": self.granted,
                "denied": self.denied,
            }
        }

    # --- the API of the transports -----------------------------------------------------

    async def submit(self, token: str | bytes, via: str) -> Decision:
        """Verify ``token``; on grant pulse the lock. Never raises on bad input."""
        via = via if via in VIAS else "other"
        try:
            if isinstance(token, str | bytes | bytearray):
                decision = self.decide(token)
            else:
                decision = Decision(False, "command is not text", None, None)
            if self._unsynced and self._store is not None:
                # What decide recorded (spent jti, TOTP step, failures) is made durable
                # before anyone hears of it, without blocking the loop on fsync.
                self._unsynced = False
                await asyncio.get_running_loop().run_in_executor(None, self._store.sync)
        except Exception:
            log.exception("verifier: unexpected failure; the command is denied")
            decision = Decision(False, "internal error", None, None)
        if decision.granted and self._lock is not None:
            self._lock.pulse(reason=f"unlock via {via}")
            self.granted += 1
            self._bus.publish(
                UnlockGranted(
                    door=self.site.door,
                    principal=decision.principal or "",
                    via=via,
                    jti=decision.jti or "",
                )
            )
        else:
            if decision.granted:  # no relay to pulse: nothing was opened
                decision = Decision(False, "no lock", decision.jti, decision.principal)
            self.denied += 1
            self._announce_denial(decision, via)
        return decision

    async def control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's ``unlock`` request: ``{"token": ...}``."""
        token = request.get("token")
        if not isinstance(token, str):
            token = ""
        decision = await self.submit(token, "cli")
        return {"ok": True, "result": "granted" if decision.granted else "denied"}

    # --- the checks ------------------------------------------------------------------------

    def decide(self, token: str | bytes) -> Decision:
        """Run every check, cheapest first; record what must survive a restart."""
        store = self._store
        if store is None:
            return Decision(False, "verifier not running", None, None)
        now = self._clock()
        self._refresh(announce=True)
        try:
            cmd = cmdfmt.parse(token)
        except cmdfmt.CommandFormatError as exc:
            return Decision(False, str(exc), None, None)
        entry = self._principals.get(cmd.kid)
        if entry is None:
            return Decision(False, "unknown principal", cmd.jti, None)
        principal, secret = entry
        guard = self._guards.get(principal.id, Guard())
        reason = self._cheap_checks(cmd, principal, guard, now)
        if reason is None and store.seen(cmd.jti):
            reason = "replayed command id"
        if reason is None and not self._budget.take(principal.id, self._monotonic()):
            reason = "signature budget exhausted"
        if reason is None and not cmdfmt.verify_signature(cmd, principal.key):
            reason = "bad signature"
        if reason is None:
            reason = self._authenticated(store, cmd, principal, secret, guard, now)
        if reason is not None:
            return Decision(False, reason, cmd.jti, principal.id)
        return Decision(True, "granted", cmd.jti, principal.id)

    def _cheap_checks(  # noqa: PLR0911 - one return per check reads best
        self, cmd: cmdfmt.UnverifiedCommand, principal: Principal, guard: Guard, now: float
    ) -> str | None:
        """Checks on the unverified command that need no crypto; why it fails, or None."""
        limits = self.limits
        if reason := principal.inactive_reason(now):
            return reason
        if cmd.alg not in principal.algorithms:
            return "algorithm does not match the principal's key"
        if reason := lim.blocked_reason(guard, limits, now):
            return reason
        if cmd.aud != self.site.station:
            return "wrong audience"
        if reason := principal.may_open(cmd.door, self.site.door, self.site.flats):
            return reason
        if not 0 < cmd.exp - cmd.iat <= cmdfmt.MAX_LIFETIME_S:
            return "lifetime not within 0-60 s"
        if cmd.iat > now + limits.max_skew_s:
            return "issued in the future"
        if cmd.exp + limits.max_skew_s <= now:
            return "expired"
        return None

    def _authenticated(
        self,
        store: PrincipalStore,
        cmd: cmdfmt.UnverifiedCommand,
        principal: Principal,
        secret: str,
        guard: Guard,
        now: float,
    ) -> str | None:
        """TOTP and single use for a correctly signed command; spends its id either way."""
        limits = self.limits
        step = match_step(secret, cmd.totp, now, limits.totp_window)
        reason: str | None = None
        if step is None:
            new_guard, reason = lim.after_failure(guard, limits, now), "wrong TOTP code"
        elif step <= guard.last_step:
            new_guard, reason = guard, "TOTP step already used"
        else:
            new_guard = lim.after_success(guard, step)
        try:
            store.record(principal.id, new_guard, cmd.jti, cmd.exp + limits.max_skew_s)
        except sqlite3.Error:
            log.exception("verifier: cannot record a command's use; denying it")
            return "cannot record the command's use"
        self._unsynced = True
        self._guards[principal.id] = new_guard
        if new_guard.failures == limits.lockout_after > guard.failures:
            log.warning("verifier: principal locked out after %d failures", limits.lockout_after)
            self._bus.publish(
                PrincipalLockedOut(principal=principal.id, failures=new_guard.failures)
            )
        return reason

    # --- internals -------------------------------------------------------------------------

    def _refresh(self, announce: bool) -> None:
        """Reload principals and guards when another process changed the database."""
        store = self._store
        if store is None:
            return
        version = store.data_version()
        if version == self._version:
            return
        self._version = version
        try:
            loaded = {p.id: (p, store.totp_secret(p.id)) for p in store.principals()}
            guards = store.guards()
        except IntercomError:
            log.exception("verifier: the principals database is unusable; keeping the old view")
            return
        if announce:
            for pid, (p, _) in loaded.items():
                old = self._principals.get(pid)
                if old is None:
                    self._bus.publish(PrincipalAdded(principal=pid, role=p.role.value))
                if p.revoked_at is not None and (old is None or old[0].revoked_at is None):
                    self._bus.publish(PrincipalRevoked(principal=pid))
        self._principals, self._guards = loaded, guards
        self._budget.forget_except(set(loaded))
        log.info("verifier: %d principals loaded", len(loaded))

    def _announce_denial(self, decision: Decision, via: str) -> None:
        if not self._event_bucket.take(self._monotonic()):
            if self._suppressed == 0:
                self._suppressed_since = self._monotonic()
            self._suppressed += 1
            log.debug("verifier: denied (%s), event suppressed", decision.reason)
            return
        self._flush_suppressed()
        self._bus.publish(
            UnlockDenied(
                door=self.site.door,
                principal=decision.principal or "",
                via=via,
                reason=decision.reason,
            )
        )

    def _flush_suppressed(self) -> None:
        if self._suppressed:
            seconds = round(self._monotonic() - self._suppressed_since, 3)
            self._bus.publish(UnlockDenialsSuppressed(count=self._suppressed, seconds=seconds))
            self._suppressed = 0

    async def _housekeeping(self) -> None:
        last_purge = self._monotonic()
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                self._refresh(announce=True)
                self._flush_suppressed()
                if self._monotonic() - last_purge >= PURGE_EVERY_S and self._store is not None:
                    last_purge = self._monotonic()
                    self._store.purge(self._clock())
            except sqlite3.Error:
                log.exception("verifier: housekeeping failed")
