"""Rate limits of the verifier: signature budgets, failure backoff and lockout.

* Signature checks are the one expensive step. Each known principal has a small reserved
  budget of its own; beyond it, checks draw on a shared global budget. A flood of forged
  commands naming one principal (or none) cannot use up another principal's reserve,
  so a valid command of that other principal is checked at once, never queued.
* Wrong TOTP codes under a valid signature are guesses. After ``backoff_after``
  consecutive ones the principal waits (doubling, capped); after ``lockout_after`` it
  is locked out until ``intercom principals reset``. ``lockout_after`` is far below the
  100 consecutive failures NIST SP 800-63B allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from intercom.security.store import Guard


@dataclass(frozen=True)
class Limits:
    """The verifier's tunables; the defaults are the documented ones."""

    shared_rate: float = 500.0  # signature checks per second, shared by all principals
    shared_burst: float = 100.0
    reserve_rate: float = 5.0  # signature checks per second reserved for each principal
    reserve_burst: float = 10.0
    backoff_after: int = 3  # consecutive TOTP failures before waiting
    backoff_max_s: float = 300.0
    lockout_after: int = 20  # consecutive TOTP failures before a lockout
    denied_events_per_s: float = 20.0  # UnlockDenied events; beyond, they are counted
    totp_window: int = 1  # steps either side of now
    max_skew_s: float = 30.0


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    stamp: float = 0.0

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SignatureBudget:
    """Per-principal reserves in front of one shared budget for signature checks."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._shared = TokenBucket(limits.shared_rate, limits.shared_burst)
        self._reserves: dict[str, TokenBucket] = {}

    def take(self, principal: str, now: float) -> bool:
        """Whether a signature check for ``principal`` may run now."""
        reserve = self._reserves.get(principal)
        if reserve is None:
            reserve = TokenBucket(self._limits.reserve_rate, self._limits.reserve_burst)
            self._reserves[principal] = reserve
        return reserve.take(now) or self._shared.take(now)

    def forget_except(self, principals: set[str]) -> None:
        """Drop the reserves of principals no longer registered."""
        for pid in set(self._reserves) - principals:
            del self._reserves[pid]


def blocked_reason(guard: Guard, limits: Limits, now: float) -> str | None:
    """Why a principal may not try now (lockout or backoff), or None."""
    if guard.failures >= limits.lockout_after:
        return "principal locked out after repeated TOTP failures"
    if now < guard.blocked_until:
        return "principal in backoff after TOTP failures"
    return None


def after_failure(guard: Guard, limits: Limits, now: float) -> Guard:
    """The guard after one more consecutive TOTP failure."""
    failures = guard.failures + 1
    blocked_until = guard.blocked_until
    if failures >= limits.backoff_after:
        wait = min(2.0 ** (failures - limits.backoff_after), limits.backoff_max_s)
        blocked_until = now + wait
    return Guard(failures=failures, blocked_until=blocked_until, last_step=guard.last_step)


def after_success(guard: Guard, step: int) -> Guard:
    """The guard after an accepted code of ``step``."""
    return Guard(failures=0, blocked_until=0.0, last_step=max(step, guard.last_step))
