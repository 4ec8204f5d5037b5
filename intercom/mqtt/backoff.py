"""The reconnect policy: capped exponential backoff with jitter, reset by a good connection."""

from __future__ import annotations

import random
from collections.abc import Callable


class ReconnectPolicy:
    """How long to wait before the next connection attempt.

    The n-th consecutive failure waits ``min(first * 2**(n-1), cap)`` scaled by a
    random factor in ``[1 - jitter, 1]``, so a building full of stations does not
    reconnect in lock-step after the broker returns, and no wait exceeds ``cap``.
    """

    def __init__(
        self,
        first_s: float,
        cap_s: float,
        jitter: float = 0.25,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < first_s <= cap_s:
            raise ValueError("need 0 < first_s <= cap_s")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.first_s = first_s
        self.cap_s = cap_s
        self.jitter = jitter
        self._rand = rand
        self.failures = 0

    def next_delay(self) -> float:
        """Record one failed or lost connection; the seconds to wait before retrying."""
        self.failures += 1
        # Exponent capped so the float never overflows however long the broker is away.
        base = min(self.first_s * 2.0 ** min(self.failures - 1, 64), self.cap_s)
        return base * (1.0 - self.jitter * self._rand())

    def succeeded(self) -> None:
        """A connection was accepted: the next failure starts from ``first_s`` again."""
        self.failures = 0
