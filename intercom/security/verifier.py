"""The one command verifier: every way to open the door (MQTT, call, CLI) ends here.

Checks run cheapest first and each denial names the failed check in the station's log
only; the sender learns granted or denied, nothing more. Signature checks, the one
expensive step, run only for commands that passed every cheap check and fit the
signature budget (see ``intercom.security.limits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from intercom.errors import IntercomError
from intercom.events import (
    EventBus,
    PrincipalLockedOut,
    UnlockDenialsSuppressed,
    UnlockDenied,
    UnlockGranted,
)
from intercom.security import command as cmdfmt
from intercom.security import limits as lim
from intercom.security.codecheck import CodeCheck, CodeChecker
from intercom.security.principals import Principal, Role
from intercom.security.registry import Registry
from intercom.security.store import Guard
from intercom.security.totp import match_step

if TYPE_CHECKING:
    from intercom.hardware.lock import Lock

log = logging.getLogger(__name__)

_Token = TypeVar("_Token", cmdfmt.UnverifiedBearer, cmdfmt.UnverifiedRequest)
VIAS = frozenset({"mqtt", "cli", "call", "console"})
HOUSEKEEPING_S = 1.0
PURGE_EVERY_S = 60.0


@dataclass(frozen=True)
class Decision:
    """The verifier's answer; ``reason`` is for the log only, never for the sender.

    For a bearer: ``forbidden`` when the token is authentic (signature, audience, scope
    and times good) but its signer may not read (not a manager, revoked, expired), so a
    transport may answer 403 rather than 401; ``expires_at`` is a granted bearer's ``exp``.
    """

    granted: bool
    reason: str
    jti: str | None
    principal: str | None
    forbidden: bool = False
    expires_at: float | None = None


@dataclass(frozen=True)
class Site:
    """What a command must match at this station: its id, its door, the flats it serves."""

    station: str
    door: str
    flats: frozenset[str]


@dataclass(frozen=True)
class Context:
    """What the transport knows about a command's sender, for the verifier to judge.

    ``signer``: the only principal that may have signed it (a call's device), or None.
    ``refusal``: why the transport's sender may not unlock now ("device not rung"), or
    "" when it may. The verifier denies, logs and counts such commands like any other.
    """

    via: str
    signer: str | None = None
    refusal: str = ""


def _sender_refusal(cmd: cmdfmt.UnverifiedCommand, context: Context | None) -> str | None:
    """Why the transport's sender may not send this command, or None."""
    if context is None:
        return None
    if context.signer is not None and cmd.kid != context.signer:
        return "signed by another principal than the sender"
    return context.refusal or None


@dataclass(frozen=True)
class _Use:
    """What a correctly signed command spends: made durable before the answer."""

    principal: str
    guard: Guard
    jti: str
    keep_until: float


class Verifier:
    """Checks signed unlock commands and pulses the lock for the granted ones.

    It is the only holder of the lock: nothing else can energise the relay.
    """

    name = "verifier"

    def __init__(
        self,
        registry: Registry,
        site: Site,
        bus: EventBus,
        lock: Lock | None,
        limits: lim.Limits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.site = site
        self.limits = limits or lim.Limits()
        self._registry = registry
        self._bus = bus
        self._lock = lock
        self._clock = clock
        self._monotonic = monotonic
        self._budget = lim.SignatureBudget(self.limits)
        self._event_bucket = lim.TokenBucket(
            self.limits.denied_events_per_s, self.limits.denied_events_per_s
        )
        self._suppressed = 0
        self._suppressed_since = 0.0
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self.granted = 0
        self.denied = 0
        self._requests: dict[str, float] = {}  # console request ids used, until they expire
        self._codes = CodeChecker(registry, self.limits, self._failed, clock, monotonic)

    # --- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start housekeeping (the registry is opened by its owner)."""
        self._running = True
        self._task = asyncio.create_task(self._housekeeping(), name="verifier-housekeeping")

    async def stop(self) -> None:
        """Stop housekeeping; deny from now on."""
        self._running = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._flush_suppressed()

    def status(self) -> dict[str, Any]:
        """Counts for ``intercom status`` (no principal ids)."""
        return {
            "verifier": {
                "principals": len(self._registry.principals()),
                "granted": self.granted,
                "denied": self.denied,
            }
        }

    # --- the API of the transports -----------------------------------------------------

    async def submit(self, token: Any, context: Context | str) -> Decision:
        """Verify ``token`` from a transport; on grant pulse the lock. Never raises."""
        if isinstance(context, str):
            context = Context(context)
        via = context.via if context.via in VIAS else "other"
        try:
            if isinstance(token, str | bytes | bytearray):
                decision, use = self.decide(
                    bytes(token) if isinstance(token, bytearray) else token, context
                )
            else:
                decision, use = Decision(False, "command is not text", None, None), None
            if use is not None:
                # What decide spent (command id, TOTP step, failures) is durable before
                # anyone hears of the decision; the write runs off the event loop.
                try:
                    await self._registry.persist_use(
                        use.principal, use.guard, use.jti, use.keep_until
                    )
                except (IntercomError, sqlite3.Error):
                    log.exception("verifier: cannot record a command's use; denying it")
                    decision = Decision(False, "cannot record the command's use",
                                        decision.jti, decision.principal)
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

    async def check_code(self, principal: str, code: str) -> CodeCheck:
        """The enrolment's check of a typed TOTP code (``intercom.security.codecheck``).

        It opens nothing, spends no code, publishes no unlock event; a wrong code counts
        toward the principal's backoff and lockout like a wrong code in a command.
        """
        if not self._running:
            return CodeCheck.UNAVAILABLE
        return await self._codes.check(principal, code)

    async def control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's ``unlock`` request: ``{"token": ...}``."""
        token = request.get("token")
        if not isinstance(token, str):
            token = ""
        decision = await self.submit(token, Context("cli"))
        return {"ok": True, "result": "granted" if decision.granted else "denied"}

    # --- the checks ------------------------------------------------------------------------

    def decide(
        self, token: str | bytes, context: Context | None = None
    ) -> tuple[Decision, _Use | None]:
        """Run every check, cheapest first, in memory; what it spent, to make durable.

        Nothing here awaits, so two commands cannot both pass the single-use checks.
        """
        if not self._running:
            return Decision(False, "verifier not running", None, None), None
        now = self._clock()
        try:
            cmd = cmdfmt.parse(token)
        except cmdfmt.CommandFormatError as exc:
            return Decision(False, str(exc), None, None), None
        registry = self._registry
        principal = registry.get(cmd.kid)
        if principal is None:
            return Decision(False, "unknown principal", cmd.jti, None), None
        guard = registry.guard(principal.id)
        reason = _sender_refusal(cmd, context) or self._cheap_checks(cmd, principal, guard, now)
        if reason is None and registry.spent(cmd.jti):
            reason = "replayed command id"
        if reason is None and not self._budget.take(principal.id, self._monotonic()):
            reason = "signature budget exhausted"
        if reason is None and not cmdfmt.verify_signature(cmd, principal.key):
            reason = "bad signature"
        use = None
        if reason is None:
            reason, use = self._authenticated(cmd, principal, guard, now)
        if reason is not None:
            return Decision(False, reason, cmd.jti, principal.id), use
        return Decision(True, "granted", cmd.jti, principal.id), use

    def _cheap_checks(
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
        return self._times(cmd.iat, cmd.exp, cmdfmt.MAX_LIFETIME_S, now)

    def _times(self, iat: float, exp: float, max_lifetime: float, now: float) -> str | None:
        """Why a token's issue and expiry times are refused at ``now``, or None."""
        if not 0 < exp - iat <= max_lifetime:
            return f"lifetime not within 0-{max_lifetime:g} s"
        if iat > now + self.limits.max_skew_s:
            return "issued in the future"
        if exp + self.limits.max_skew_s <= now:
            return "expired"
        return None

    # --- read-only bearers -----------------------------------------------------------------

    def check_bearer(
        self, token: str, scope: str, max_lifetime: float | None = None
    ) -> Decision:
        """Whether ``token`` is a manager's valid bearer for reading ``scope``.

        The command's checks, cheapest first, on the same registry, signature budget and
        signature check, less what only opening the door needs: no TOTP and no single
        use (a scraper shows one bearer at every scrape), nothing spent, no event. It
        never opens anything; the caller logs a refusal. ``max_lifetime`` (seconds)
        tightens the scope's own limit (``command.BEARER_LIFETIMES_S``).

        Whether the signer may read (a manager, active) is judged only once the
        signature is good: a forger who names a resident's id learns nothing from a
        ``forbidden`` answer.
        """
        now = self._clock()
        longest = cmdfmt.BEARER_LIFETIMES_S.get(scope, 0.0)
        if max_lifetime is not None:
            longest = min(longest, max_lifetime)
        who: list[str] = []

        def checks(bearer: cmdfmt.UnverifiedBearer, principal: Principal) -> str | None:
            reason = self._bearer_checks(bearer, principal, scope, longest, now)
            if reason is None:
                who.append(self._bearer_signer_refusal(principal, now) or "")
            return reason

        bearer, decision = self._signed(token, cmdfmt.parse_bearer, checks)
        if not decision.granted or bearer is None:
            return decision
        if who and who[0]:
            return dataclasses.replace(decision, granted=False, reason=who[0], forbidden=True)
        return dataclasses.replace(decision, expires_at=bearer.exp)

    def check_request(self, token: str, method: str, path: str, body_hash: str) -> Decision:
        """Whether ``token`` signs this console request by an installer or admin, once.

        The command's checks, cheapest first (parse, known key, active, role, algorithm,
        audience, the request it names, times), then the signature budget, the signature,
        and single use of its id (kept until it expires). No TOTP: it opens nothing (the
        console's relay test is an unlock command of its own). No event: the caller
        logs a refusal.
        """
        now = self._clock()
        request, decision = self._signed(
            token, cmdfmt.parse_request,
            lambda req, principal: self._request_checks(req, principal,
                                                        (method, path, body_hash), now))
        if not decision.granted or request is None:
            return decision
        self._requests = {j: t for j, t in self._requests.items() if t > now}
        if request.jti in self._requests:
            return Decision(False, "request id already used", request.jti, decision.principal)
        self._requests[request.jti] = request.exp + self.limits.max_skew_s
        return decision

    def _signed(
        self,
        token: str,
        parse: Callable[[str], _Token],
        checks: Callable[[_Token, Principal], str | None],
    ) -> tuple[_Token | None, Decision]:
        """A read-only token checked: the parsed token (when it parses) and the decision.

        Parse, find the signer, run ``checks`` (no crypto), then spend from the
        signature budget and check the signature.
        """
        if not self._running:
            return None, Decision(False, "verifier not running", None, None)
        try:
            parsed = parse(token)
        except cmdfmt.CommandFormatError as exc:
            return None, Decision(False, str(exc), None, None)
        principal = self._registry.get(parsed.kid)
        if principal is None:
            return parsed, Decision(False, "unknown principal", parsed.jti, None)
        reason = checks(parsed, principal)
        if reason is None and not self._budget.take(principal.id, self._monotonic()):
            reason = "signature budget exhausted"
        if reason is None and not cmdfmt.verify_signature(parsed, principal.key):
            reason = "bad signature"
        return parsed, Decision(reason is None, reason or "granted", parsed.jti, principal.id)

    def _request_checks(
        self, request: cmdfmt.UnverifiedRequest, principal: Principal,
        made: tuple[str, str, str], now: float,
    ) -> str | None:
        if reason := principal.inactive_reason(now):
            return reason
        if principal.role not in {Role.INSTALLER, Role.ADMIN}:
            return "not an installer or admin"
        if request.alg not in principal.algorithms:
            return "algorithm does not match the principal's key"
        if request.aud != self.site.station:
            return "wrong audience"
        if (request.method, request.path, request.body_hash) != made:
            return "signed for another request"
        return self._times(request.iat, request.exp, cmdfmt.MAX_REQUEST_LIFETIME_S, now)

    def _bearer_checks(
        self, bearer: cmdfmt.UnverifiedBearer, principal: Principal, scope: str,
        longest: float, now: float,
    ) -> str | None:
        """Checks on the unverified bearer that need no crypto; why it fails, or None."""
        if bearer.alg not in principal.algorithms:
            return "algorithm does not match the principal's key"
        if bearer.aud != self.site.station:
            return "wrong audience"
        if bearer.scope != scope:
            return f"bearer not for {scope}"
        return self._times(bearer.iat, bearer.exp, longest, now)

    @staticmethod
    def _bearer_signer_refusal(principal: Principal, now: float) -> str | None:
        """Why this (authentic) bearer's signer may not read now, or None."""
        if reason := principal.inactive_reason(now):
            return reason
        if principal.role is not Role.MANAGER:
            return "not a manager's bearer"
        return None

    def _authenticated(
        self, cmd: cmdfmt.UnverifiedCommand, principal: Principal, guard: Guard, now: float
    ) -> tuple[str | None, _Use]:
        """TOTP and single use for a correctly signed command; spends its id either way."""
        limits = self.limits
        step = match_step(self._registry.secret(principal.id), cmd.totp, now, limits.totp_window)
        reason: str | None = None
        if step is None:
            new_guard, reason = lim.after_failure(guard, limits, now), "wrong TOTP code"
        elif step <= guard.last_step:
            new_guard, reason = guard, "TOTP step already used"
        else:
            new_guard = lim.after_success(guard, step)
        keep_until = cmd.exp + limits.max_skew_s
        self._registry.spend(principal.id, new_guard, cmd.jti, keep_until)
        self._failed(principal.id, guard, new_guard)
        return reason, _Use(principal.id, new_guard, cmd.jti, keep_until)

    def _failed(self, principal: str, guard: Guard, new_guard: Guard) -> None:
        """Announce a lockout when this change of a principal's guard made one."""
        if new_guard.failures == self.limits.lockout_after > guard.failures:
            log.warning("verifier: principal locked out after %d failures",
                        self.limits.lockout_after)
            self._bus.publish(PrincipalLockedOut(principal=principal, failures=new_guard.failures))

    # --- internals -------------------------------------------------------------------------

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
                self._flush_suppressed()
                self._budget.forget_except({p.id for p in self._registry.principals()})
                if self._monotonic() - last_purge >= PURGE_EVERY_S:
                    last_purge = self._monotonic()
                    await self._registry.purge()
            except (IntercomError, sqlite3.Error):
                log.exception("verifier: housekeeping failed")
