"""The lab's slow link (tests/udpdelay.py's ``Bottleneck``), on a clock of the test's own."""

from __future__ import annotations

import pytest

from .udpdelay import UDP_IP_HEADERS, Bottleneck


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_datagrams_leave_at_the_rate_one_after_another():
    clock = Clock()
    link = Bottleneck(1_000_000, 0.2, clock)  # 1 Mbit/s: 125 bytes a millisecond
    size = 1250 - UDP_IP_HEADERS  # 10 ms on the link each
    assert link.admit(size) == pytest.approx(100.010)
    assert link.admit(size) == pytest.approx(100.020)  # queued behind the first
    clock.now = 101.0  # the link idle again: leaves 10 ms after it arrives
    assert link.admit(size) == pytest.approx(101.010)
    assert (link.sent, link.dropped) == (3, 0)


def test_beyond_the_queue_datagrams_are_dropped_until_it_drains():
    clock = Clock()
    link = Bottleneck(1_000_000, 0.055, clock)  # 55 ms of queue: 5 datagrams of 10 ms waiting
    size = 1250 - UDP_IP_HEADERS
    left = [link.admit(size) for _ in range(8)]
    assert left[:6] == pytest.approx([100.010, 100.020, 100.030, 100.040, 100.050, 100.060])
    assert left[6:] == [None, None]  # the 7th would wait 60 ms
    clock.now = 100.020  # two have left: room again
    assert link.admit(size) == pytest.approx(100.070)
    assert (link.sent, link.dropped) == (7, 2)


def test_without_a_rate_nothing_waits_or_is_dropped():
    clock = Clock()
    link = Bottleneck(None, 0.0, clock)
    assert [link.admit(60_000) for _ in range(100)] == [100.0] * 100
    assert link.dropped == 0
