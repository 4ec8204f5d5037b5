"""Rate limits of the verifier: signature budgets, failure backoff and lockout.

* Signature checks are the one expensive step. Each known principal has a small reserved
  budget of its own; beyond it, checks draw on a shared global budget. A flood of forged
  commands naming one principal (or none) cannot use up another principal's reserve,
  so a valid command of that other principal is checked at once, never queued.
* Wrong TOTP codes under a valid signature are guesses. After ``backoff_after``
  consecutive ones the principal waits (doubling, capped); after ``lockout_after`` it
  is locked out until ``intercom principals reset``. ``lockout_after`` is far below the
  100 consecutive failures NIST SP 800-63B allows.
* The network side uses the same token bucket: pairing attempts per source address
  (``BucketTable``, ``source_key``), data-channel messages per channel; refusals are
  logged once per burst (``RefusalLog``), so a flood cannot flood the log.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import OrderedDict
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
    code_checks_per_min: float = 5.0  # enrolment code checks (codecheck.py) per principal
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


def refund(bucket: TokenBucket) -> None:
    """Give back one token taken from ``bucket`` (up to its burst)."""
    bucket.tokens = min(bucket.burst, bucket.tokens + 1.0)


class BucketTable:
    """One token bucket per key (a source address), at most ``size`` of them.

    When full, the bucket used longest ago is forgotten, never the whole table: a flood
    of new addresses cannot reset the bucket of an address that is being refused now.
    """

    def __init__(self, rate: float, burst: float, size: int) -> None:
        self.rate = rate
        self.burst = burst
        self.size = size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket if there is one."""
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.size:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def refund(self, key: str) -> None:
        """Give back the token ``key`` took last (when the attempt turned out legitimate)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            refund(bucket)


def source_key(remote: str | None) -> str:
    """The key a client's address is limited under: an IPv4 address, or an IPv6 /64.

    One IPv6 host usually holds a whole /64, so limiting single IPv6 addresses would
    limit nothing.
    """
    if not remote:
        return "?"
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return remote[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class RefusalLog:
    """Logs refusals: the first of a burst as a WARNING, the rest of the burst at DEBUG.

    A burst ends after ``quiet_s`` seconds without a refusal; the next burst's WARNING
    says how many refusals the previous one had beyond its first.
    """

    def __init__(self, logger: logging.Logger, quiet_s: float = 10.0) -> None:
        self._log = logger
        self.quiet_s = quiet_s
        self._last = -math.inf
        self._in_burst = 0

    def refused(self, now: float, message: str, *args: object) -> None:
        """Log one refusal (``message`` with %-style ``args``)."""
        if now - self._last >= self.quiet_s:
            if self._in_burst > 1:
                message += " (the previous burst: %d more refusals)"
                args = (*args, self._in_burst - 1)
            self._log.warning(message, *args)
            self._in_burst = 0
        else:
            self._log.debug(message, *args)
        self._in_burst += 1
        self._last = now
