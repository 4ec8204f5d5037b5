"""Rings the flat's devices that are not online, by Web Push, and clears the ring after.

The ring group (``intercom.calls.ringgroup``) asks at each press: the principals of the
flat that are active residents, have a push subscription, and have no device online
get a ``ring`` message; when the call is taken or missed, those it rang get a ``clear``
under the same ``Topic``, which also replaces a ring the push service still holds for
a phone that was offline. A subscription the push service says is gone (404, 410) is
dropped. Sending never holds up the ring: each push is a task of its own.

Messages (JSON, encrypted for the device; no picture, no names)::

    {"v": 1, "type": "ring", "call": "c-...", "door": "front", "at": 1764..., "until": 1764...,
     "label": "Main entrance"}   (label: only when the installer gave the button one)
    {"v": 1, "type": "clear", "call": "c-...", "state": "taken" | "missed"}
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from intercom.calls.ringgroup import Call
from intercom.config import PushConfig
from intercom.push.webpush import Outcome, PushClient, SubscriptionError, parse_subscription
from intercom.security.principals import Principal, Role

log = logging.getLogger(__name__)


class Subscribers(Protocol):
    """What the notifier reads and changes of the registry."""

    def get(self, pid: str) -> Principal | None:
        """One principal, or None."""

    def is_active(self, pid: str) -> bool:
        """Whether ``pid`` exists and may act now."""

    def push_subscribers(self) -> list[str]:
        """The principals with a push subscription."""

    def push_subscription(self, pid: str) -> dict[str, Any] | None:
        """The principal's subscription."""

    async def drop_push(self, pid: str) -> bool:
        """Forget the principal's subscription."""


def topic_for(door: str) -> str:
    """The ``Topic`` of a door's pushes: a newer one replaces an undelivered older one."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"ring-{door}")[:32]


@dataclass
class PushStats:
    """Counts for ``intercom status``."""

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0


class PushNotifier:
    """The ring group's ``Notifier``: one push per principal, never awaited by the ring."""

    def __init__(
        self,
        registry: Subscribers,
        client: PushClient,
        config: PushConfig,
        door: str,
        ring_timeout_s: float,
    ) -> None:
        self._registry = registry
        self._client = client
        self.config = config
        self.door = door
        self.topic = topic_for(door)
        self._ring_timeout_s = ring_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = PushStats()

    def ring(self, call: Call, online: set[str]) -> set[str]:
        """Push a ring to the flat's subscribed principals that are not online."""
        targets = {
            pid for pid in self._registry.push_subscribers()
            if pid not in online and self._rings(pid, call.flat)
        }
        message = {
            "v": 1, "type": "ring", "call": call.id, "door": self.door,
            "at": round(call.pressed_at, 3),
            "until": round(call.pressed_at + self._ring_timeout_s, 3),
        }
        if call.label is not None:  # the installer's words for these residents, nothing else
            message["label"] = call.label
        for pid in sorted(targets):
            self._spawn(pid, message)
        return targets

    def settled(self, call: Call, outcome: str, principals: set[str]) -> None:
        """Push ``clear`` to the principals rung: the call was taken or missed."""
        message = {"v": 1, "type": "clear", "call": call.id, "state": outcome}
        for pid in sorted(principals):
            self._spawn(pid, message)

    def _rings(self, pid: str, flat: str) -> bool:
        principal = self._registry.get(pid)
        return (
            principal is not None
            and principal.role is Role.RESIDENT
            and flat in principal.flats
            and self._registry.is_active(pid)
        )

    def _spawn(self, pid: str, message: dict[str, Any]) -> None:
        task = asyncio.create_task(self._send(pid, message), name=f"push-{message['type']}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, pid: str, message: dict[str, Any]) -> None:
        stored = self._registry.push_subscription(pid)
        if stored is None:
            return
        try:
            subscription = parse_subscription(stored, self.config.allowed_hosts)
        except SubscriptionError as exc:  # e.g. allowed_hosts narrowed since
            log.warning("push: a kept subscription is no longer usable (%s); dropped", exc)
            await self._drop(pid)
            return
        self.stats.sent += 1
        try:
            outcome = await self._client.send(
                subscription, message, ttl_s=self.config.ttl_s, topic=self.topic
            )
        except Exception:
            log.exception("push: sending failed")
            outcome = Outcome(None, "internal error")
        if outcome.delivered:
            self.stats.delivered += 1
            log.info("push: %s for call %s accepted (%d)", message["type"], message["call"],
                     outcome.status)
        elif outcome.gone:
            log.info("push: the push service says a subscription is gone (%d); dropped",
                     outcome.status)
            await self._drop(pid)
        else:
            self.stats.failed += 1
            log.warning("push: %s for call %s not accepted: %s", message["type"],
                        message["call"], outcome.status or outcome.error)

    async def _drop(self, pid: str) -> None:
        if await self._registry.drop_push(pid):
            self.stats.dropped += 1

    async def close(self) -> None:
        """Let the pushes in flight finish (briefly), then close the HTTP client."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        for task in set(self._tasks):
            task.cancel()
        await self._client.close()

    def status(self) -> dict[str, Any]:
        """Counts of pushes, for ``intercom status``."""
        return {
            "subscribed": len(self._registry.push_subscribers()),
            "sent": self.stats.sent,
            "delivered": self.stats.delivered,
            "failed": self.stats.failed,
            "dropped": self.stats.dropped,
        }
