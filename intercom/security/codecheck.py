"""The enrolment's code check: whether a code is the one the authenticator shows now.

Right after pairing, the resident types the current code from the authenticator app
they just scanned the enrolment into, so that a failed scan or a phone with a wrong clock
is found then and not at the door. The device keeps no TOTP secret, so only the station
can answer; it does so over the device's signed-in signalling socket (``totp-check``).

The check opens nothing and spends nothing: a right code stays usable for one unlock
in its time step (each code still opens once, see docs/security.md). Being an oracle for
codes, it is guarded like the unlock path and then some: a locked-out or backing-off
principal is not checked, each principal has ``Limits.code_checks_per_min`` checks a
minute, and a wrong code counts as a TOTP failure toward the same backoff and lockout.
"""

from __future__ import annotations

import enum
import logging
import secrets
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from intercom.errors import IntercomError
from intercom.security import limits as lim
from intercom.security.store import Guard
from intercom.security.totp import DEFAULT, match_step

if TYPE_CHECKING:
    from intercom.security.registry import Registry

log = logging.getLogger(__name__)

MAX_TRACKED = 4096  # principals whose check budget is remembered (oldest forgotten)

Failed = Callable[[str, Guard, Guard], None]


class CodeCheck(enum.StrEnum):
    """The station's answer to one code check."""

    RIGHT = "right"  # a current code (this step or one either side): the enrolment works
    WRONG = "wrong"  # not a current code; counted as a TOTP failure when it was 6 digits
    WAIT = "wait"  # too many checks this minute, or backoff after failures: not checked
    LOCKED = "locked"  # locked out after repeated failures until `principals reset`
    UNAVAILABLE = "unavailable"  # the principal is not active, or the failure not recorded


class CodeChecker:
    """Answers code checks for the principals of ``registry``.

    ``failed(principal, old_guard, new_guard)`` is told of every counted failure (the
    verifier announces a lockout there, as it does for unlock commands).
    """

    def __init__(
        self,
        registry: Registry,
        limits: lim.Limits,
        failed: Failed,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._registry = registry
        self._limits = limits
        self._failed = failed
        self._clock = clock
        self._monotonic = monotonic
        per_min = limits.code_checks_per_min
        self._budget = lim.BucketTable(per_min / 60.0, per_min, MAX_TRACKED)

    async def check(self, pid: str, code: str) -> CodeCheck:
        """Whether ``code`` is ``pid``'s current TOTP code; opens and spends nothing."""
        now = self._clock()
        guard = self._registry.guard(pid)
        if refused := self._refusal(pid, guard, now):
            return refused
        if len(code) != DEFAULT.digits or not code.isascii() or not code.isdigit():
            return CodeCheck.WRONG  # a typing slip guesses nothing: not counted
        step = match_step(self._registry.secret(pid), code, now, self._limits.totp_window)
        if step is None:
            new_guard = lim.after_failure(guard, self._limits, now)
            answer = CodeCheck.WRONG
        else:  # failures end as after an unlock; the step is not spent
            new_guard = Guard(failures=0, blocked_until=0.0, last_step=guard.last_step)
            answer = CodeCheck.RIGHT
        log.info("code check: %s: %s", pid, answer.value)
        if new_guard == guard:
            return answer
        # Recorded the way a command's use is (same transaction, durable before the
        # answer), under an id of its own that is forgotten at the next purge.
        jti = f"code-check:{secrets.token_hex(12)}"
        self._registry.spend(pid, new_guard, jti, now)
        self._failed(pid, guard, new_guard)
        try:
            await self._registry.persist_use(pid, new_guard, jti, now)
        except (IntercomError, sqlite3.Error):
            log.exception("code check: cannot record the check of %s", pid)
            return CodeCheck.UNAVAILABLE
        return answer

    def _refusal(self, pid: str, guard: Guard, now: float) -> CodeCheck | None:
        """Why ``pid`` gets no check now (takes one from its budget when it may), or None."""
        principal = self._registry.get(pid)
        if principal is None or principal.inactive_reason(now):
            return CodeCheck.UNAVAILABLE
        if guard.failures >= self._limits.lockout_after:
            return CodeCheck.LOCKED
        if lim.blocked_reason(guard, self._limits, now):
            return CodeCheck.WAIT
        if not self._budget.take(pid, self._monotonic()):
            log.info("code check: %s made too many checks this minute", pid)
            return CodeCheck.WAIT
        return None
