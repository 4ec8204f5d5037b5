"""The incoming command queue: fair between signers, so a flood cannot starve anyone.

aiomqtt takes the class of its message queue (``queue_type``). This one files each
message under the key id (``kid``) its JWS header claims, read without checking anything
(the verifier does that), and hands messages out round-robin between those ids. A flood
naming one id therefore waits behind its own messages only, and each id keeps at most
``PER_SIGNER`` waiting messages: beyond that its oldest are dropped (a newer command of
the same signer is at least as fresh). Claiming an id gains nothing but a turn: the
signature is checked as before. At most ``MAX_WAITING`` messages wait in all; beyond
that the oldest message of the signer with the most waiting is dropped (the head of
the round when every signer has one), so under overload the station works on fresh
commands rather than on a growing backlog, and a flood spread over many ids cannot
push out the one command of a signer who sent just that.

``FairQueue`` is its own class, not an ``asyncio.Queue`` with private methods replaced:
it offers the few public methods aiomqtt calls, built on a deque per signer and an
``asyncio.Event``.

Before a message takes a slot, ``admit(kid, message)`` decides whether it may: the
bridge admits commands only when they claim the id of a registered principal. A flood
of malformed commands or of made-up ids is dropped there, on reading, before it costs
a task, a parse of the whole token or a place that a real signer's command needs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import aiomqtt

log = logging.getLogger(__name__)

PER_SIGNER = 32
MAX_WAITING = 1024  # about 0.3 s of work at a forgery's cost
HEADER_PEEK = 512  # bytes of payload looked at to find the claimed kid


def claimed_kid(payload: Any) -> str:
    """The ``kid`` a compact JWS claims in its header, or "" when there is none."""
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogateescape")
    if not isinstance(payload, bytes | bytearray):
        return ""
    head, dot, _ = bytes(payload[:HEADER_PEEK]).partition(b".")
    if not dot or len(head) > HEADER_PEEK - 1:
        return ""
    try:
        header = json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4)))
    except (binascii.Error, ValueError):
        return ""
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid[:128] if isinstance(kid, str) else ""


class Rounds:
    """Messages filed by claimed signer, taken round-robin: what ``FairQueue`` holds."""

    def __init__(self, limit: int = MAX_WAITING) -> None:
        self.limit = limit
        self._by_kid: collections.OrderedDict[str, collections.deque[aiomqtt.Message]] = (
            collections.OrderedDict()
        )
        self._count = 0
        self.dropped = 0  # messages dropped: their signer had too many, or all had
        # _sized[n]: the signers with n messages waiting (1..PER_SIGNER), to find the
        # busiest one in at most PER_SIGNER steps.
        self._sized: list[set[str]] = [set() for _ in range(PER_SIGNER + 1)]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[aiomqtt.Message]:
        for waiting in self._by_kid.values():
            yield from waiting

    def append(self, item: aiomqtt.Message, kid: str | None = None) -> None:
        """File a message under the signer it claims (``kid``, read here when not given)."""
        kid = claimed_kid(item.payload) if kid is None else kid
        waiting = self._by_kid.get(kid)
        if waiting is not None and len(waiting) >= PER_SIGNER:
            self._drop_oldest(kid)
            self._dropped(f"more than {PER_SIGNER} commands wait for one signer")
        elif self._count >= self.limit:
            busiest = self._busiest()
            if busiest is not None:
                self._drop_oldest(busiest)
            else:  # every signer has one waiting: the head of the round goes
                self.popleft()
            self._dropped(f"more than {self.limit} commands wait")
            waiting = self._by_kid.get(kid)  # that may have retired it
        if waiting is None:
            waiting = self._by_kid[kid] = collections.deque()
        self._resize(kid, len(waiting), len(waiting) + 1)
        waiting.append(item)
        self._count += 1

    def _resize(self, kid: str, old: int, new: int) -> None:
        if old:
            self._sized[old].discard(kid)
        if new:
            self._sized[new].add(kid)

    def _busiest(self) -> str | None:
        """A signer with the most messages waiting, if one has two or more."""
        for size in range(PER_SIGNER, 1, -1):
            if self._sized[size]:
                return next(iter(self._sized[size]))
        return None

    def _drop_oldest(self, kid: str) -> None:
        waiting = self._by_kid[kid]
        self._resize(kid, len(waiting), len(waiting) - 1)
        waiting.popleft()
        self._count -= 1
        if not waiting:
            del self._by_kid[kid]

    def _dropped(self, why: str) -> None:
        self.dropped += 1
        if not self.dropped & (self.dropped - 1):  # the 1st, 2nd, 4th, 8th, ... drop
            log.log(logging.WARNING if self.dropped == 1 else logging.DEBUG,
                    "mqtt: %s; the oldest dropped (%d so far)", why, self.dropped)

    def popleft(self) -> aiomqtt.Message:
        """The next signer's oldest message; that signer goes to the back of the round."""
        kid, waiting = next(iter(self._by_kid.items()))
        self._resize(kid, len(waiting), len(waiting) - 1)
        item = waiting.popleft()
        del self._by_kid[kid]
        if waiting:
            self._by_kid[kid] = waiting
        self._count -= 1
        return item


# admit(claimed kid, message): whether the message may wait for the verifier.
Admit = Callable[[str, aiomqtt.Message], bool]


class FairQueue:
    """aiomqtt's incoming queue (``queue_type``), taking messages round-robin by signer.

    aiomqtt types ``queue_type`` as ``asyncio.Queue`` but only builds it with ``maxsize``
    and calls ``put_nowait``, ``get`` and ``qsize`` (tests/test_contracts.py pins that).
    This class has those, with asyncio.Queue's meaning, on public asyncio parts only.
    ``maxsize`` lowers the bound on waiting messages below ``MAX_WAITING``; beyond it
    the oldest is dropped as well, so ``put_nowait`` never refuses the newest message.
    """

    def __init__(self, maxsize: int = 0, admit: Admit | None = None) -> None:
        self.maxsize = maxsize
        self._queue = Rounds(min(maxsize, MAX_WAITING) if maxsize > 0 else MAX_WAITING)
        self._ready = asyncio.Event()  # set while messages wait
        self._admit = admit
        self.refused = 0  # messages not admitted (malformed, or no such signer)

    @property
    def dropped(self) -> int:
        """How many messages were dropped to keep the bounds."""
        return self._queue.dropped

    def qsize(self) -> int:
        """How many messages wait."""
        return len(self._queue)

    def empty(self) -> bool:
        """Whether no message waits."""
        return not self._queue

    def put_nowait(self, item: aiomqtt.Message) -> None:
        """File a message under its claimed signer, if admitted; never blocks."""
        kid = claimed_kid(item.payload)
        if self._admit is not None and not self._admit(kid, item):
            self.refused += 1
            if not self.refused & (self.refused - 1):  # the 1st, 2nd, 4th, 8th, ...
                log.log(logging.WARNING if self.refused == 1 else logging.DEBUG,
                        "mqtt: dropped a command naming no registered signer (%d so far)",
                        self.refused)
            return
        self._queue.append(item, kid)
        self._ready.set()

    def get_nowait(self) -> aiomqtt.Message:
        """The next signer's oldest message; ``asyncio.QueueEmpty`` when none waits."""
        if not self._queue:
            raise asyncio.QueueEmpty
        item = self._queue.popleft()
        if not self._queue:
            self._ready.clear()
        return item

    async def get(self) -> aiomqtt.Message:
        """The next signer's oldest message, once there is one."""
        while not self._queue:
            # Taking happens only after the wait, in one step: a getter cancelled
            # while waiting loses nothing, and several getters share the messages.
            await self._ready.wait()
        return self.get_nowait()
