"""The registry: the one owner of ``principals.db`` and the one place principals change.

It keeps the principals, their TOTP secrets, their guards and the command ids still
kept in memory, and writes every change through its own worker thread with SQLite's
``synchronous=FULL``, so the event loop never waits for a disk and a change is durable
when the awaiting caller hears of it. Creating, revoking, resetting, extending and
erasing principals happen only here, whoever asks: the control socket (the CLI),
pairing, first boot, or a command run while no station runs. Each change is published
on the bus as it is made, and whoever ``watch``es the registry (the calls component)
is told at once, so a revoked device is dropped without waiting for a timer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from intercom.errors import IntercomError
from intercom.events import (
    EventBus,
    PrincipalAdded,
    PrincipalRevoked,
    PrivilegedAction,
)
from intercom.security.principals import Principal, Role
from intercom.security.store import Guard, PrincipalStore, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")
Watcher = Callable[[str], None]


class Registry:
    """Principals in memory, written through to ``principals.db`` by one thread."""

    def __init__(
        self,
        open_store: Callable[[], PrincipalStore],
        bus: EventBus,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._open_store = open_store
        self._bus = bus
        self._clock = clock
        self._store: PrincipalStore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._principals: dict[str, Principal] = {}
        self._secrets: dict[str, str] = {}
        self._guards: dict[str, Guard] = {}
        self._spent: dict[str, float] = {}
        self._push: dict[str, dict[str, Any]] = {}
        self._watchers: list[Watcher] = []

    @classmethod
    def for_state_dir(
        cls, state_dir: Path, key: bytes, bus: EventBus, *, create: bool = False
    ) -> Registry:
        """A registry of ``STATE_DIR/principals.db`` (made only with ``create``)."""
        return cls(lambda: PrincipalStore(state_dir, key, create=create), bus)

    # --- life cycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the database in the worker thread and load it into memory."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="principals-db")
        try:
            self._store = await self._run(self._open_store)
            store = self._store

            def load() -> tuple[list[Principal], dict[str, str], dict[str, Guard], Any, Any]:
                principals = store.principals()
                secrets = {p.id: store.totp_secret(p.id) for p in principals}
                store.purge(self._clock())
                seen = store.seen(self._clock())
                return principals, secrets, store.guards(), seen, store.push_subscriptions()

            (principals, self._secrets, self._guards, self._spent,
             self._push) = await self._run(load)
        except BaseException:
            await self.close()
            raise
        self._principals = {p.id: p for p in principals}
        log.info("registry: %d principals loaded", len(self._principals))

    async def close(self) -> None:
        """Close the database (after every pending write) and stop the worker."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if self._store is not None:
            store, self._store = self._store, None
            await asyncio.get_running_loop().run_in_executor(executor, store.close)
        executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the database thread (every database call goes through here)."""
        if self._executor is None:
            raise StoreError("the principals registry is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def store(self) -> PrincipalStore:
        """The open database (for calls made through ``_run`` only)."""
        if self._store is None:
            raise StoreError("the principals registry is not open")
        return self._store

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher(principal_id)`` after each change of a principal."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    def _changed(self, pid: str) -> None:
        for watcher in list(self._watchers):
            try:
                watcher(pid)
            except Exception:
                log.exception("registry: watcher %r failed", watcher)

    # --- reads (memory) --------------------------------------------------------------------

    def get(self, pid: str) -> Principal | None:
        """One principal, or None."""
        return self._principals.get(pid)

    def principals(self) -> list[Principal]:
        """Every principal, revoked ones included, by id."""
        return [self._principals[pid] for pid in sorted(self._principals)]

    def secret(self, pid: str) -> str:
        """A principal's TOTP secret (for the verifier)."""
        return self._secrets[pid]

    def guard(self, pid: str) -> Guard:
        """A principal's defence state (a fresh one when it has none)."""
        return self._guards.get(pid, Guard())

    def guards(self) -> dict[str, Guard]:
        """Every principal's defence state that has one."""
        return dict(self._guards)

    def spent(self, jti: str) -> bool:
        """Whether a command id has been used (and is still kept)."""
        return jti in self._spent

    def is_active(self, pid: str) -> bool:
        """Whether ``pid`` exists and may act now."""
        principal = self._principals.get(pid)
        return principal is not None and principal.inactive_reason(self._clock()) is None

    def push_subscription(self, pid: str) -> dict[str, Any] | None:
        """The principal's Web Push subscription (endpoint, p256dh, auth), or None."""
        return self._push.get(pid)

    def push_subscribers(self) -> list[str]:
        """The principals with a Web Push subscription."""
        return sorted(self._push)

    # --- Web Push subscriptions -------------------------------------------------------------

    async def set_push(self, pid: str, subscription: dict[str, Any]) -> None:
        """Keep the device's push subscription (sealed at rest); replaces an older one."""
        self._require(pid)
        if self._push.get(pid) == subscription:
            return
        await self._run(self.store.set_push, pid, subscription, self._clock())
        self._push[pid] = subscription

    async def drop_push(self, pid: str) -> bool:
        """Forget the device's push subscription (gone at the push service, or withdrawn)."""
        if self._push.pop(pid, None) is None:
            return False
        return bool(await self._run(self.store.drop_push, pid))

    # --- the verifier's writes ---------------------------------------------------------------

    def spend(self, pid: str, guard: Guard, jti: str, keep_until: float) -> None:
        """Mark a command id used and set the guard, in memory at once (no await between)."""
        self._spent[jti] = keep_until
        self._guards[pid] = guard

    async def persist_use(self, pid: str, guard: Guard, jti: str, keep_until: float) -> None:
        """Make what ``spend`` marked durable; StoreError when it could not be written."""
        await self._run(self.store.record, pid, guard, jti, keep_until)

    async def purge(self) -> int:
        """Forget command ids past their keeping time."""
        now = self._clock()
        self._spent = {j: t for j, t in self._spent.items() if t >= now}
        return await self._run(self.store.purge, now)

    # --- changes -------------------------------------------------------------------------------

    async def add(self, principal: Principal, secret: str, actor: str | None = None) -> None:
        """Register a principal with its TOTP secret; StoreError when the id is taken."""
        await self._run(self.store.add, principal, secret)
        self._principals[principal.id] = principal
        self._secrets[principal.id] = secret
        self._bus.publish(PrincipalAdded(principal=principal.id, role=principal.role.value))
        if actor is not None:
            self._audit(actor, "principal-add", principal.id, principal.role.value)
        self._changed(principal.id)

    async def revoke(self, pid: str, actor: str, *, role: Role | None = None) -> bool:
        """Revoke ``pid`` (only if of ``role``); False when it was revoked already."""
        principal = self._require(pid, role)
        now = self._clock()
        changed = await self._run(self.store.revoke, pid, now)
        if changed:
            self._principals[pid] = dataclasses.replace(principal, revoked_at=now)
            self._push.pop(pid, None)  # the store dropped it in the same transaction
            self._bus.publish(PrincipalRevoked(principal=pid))
            action = "revoke" if role is Role.INSTALLER else "principal-revoke"
            self._audit(actor, action, pid)
            self._changed(pid)
        return bool(changed)

    async def reset(self, pid: str, actor: str) -> None:
        """Clear a principal's TOTP failures and backoff."""
        self._require(pid)
        await self._run(self.store.reset_guard, pid)
        guard = self._guards.get(pid)
        if guard is not None:
            self._guards[pid] = Guard(0, 0.0, guard.last_step)
        self._audit(actor, "principal-reset", pid)
        self._changed(pid)

    async def extend(self, pid: str, until: float, actor: str, *, role: Role) -> None:
        """Move the expiry of ``pid`` (of ``role``: installers are extended, not others)."""
        principal = self._require(pid, role)
        await self._run(self.store.set_valid_until, pid, until)
        self._principals[pid] = dataclasses.replace(principal, valid_until=until)
        detail = time.strftime("until %Y-%m-%dT%H:%M:%SZ", time.gmtime(until))
        self._audit(actor, "installer-extend", pid, detail)
        self._changed(pid)

    async def erase(self, pid: str) -> bool:
        """Delete ``pid`` with its key, secret, guard and used ids; False when unknown.

        Nothing naming ``pid`` is published: that would make new data about them. The
        caller logs the erase without the id.
        """
        erased = bool(await self._run(self.store.erase, pid))
        self._principals.pop(pid, None)
        self._secrets.pop(pid, None)
        self._guards.pop(pid, None)
        self._push.pop(pid, None)
        self._changed(pid)
        return erased

    def _require(self, pid: str, role: Role | None = None) -> Principal:
        principal = self._principals.get(pid)
        if principal is None:
            raise StoreError(f"no principal {pid!r}")
        if role is not None and principal.role is not role:
            raise IntercomError(f"{pid} is a {principal.role.value}, not an {role.value}")
        return principal

    def _audit(self, actor: str, action: str, target: str, detail: str = "") -> None:
        self._bus.publish(
            PrivilegedAction(actor=actor, action=action, target=target, detail=detail)
        )
