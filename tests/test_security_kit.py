"""Helpers of the security tests: signers, hand-made tokens, a verifier on a real lock.

Principals are added through a ``Registry`` (the one owner of ``principals.db``): the
station's own (``station.registry``) beside a running station, or one opened here
(``open_registry``) for a verifier tested without a station.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joserfc.jwk import ECKey, OKPKey

from intercom.config import RelayConfig
from intercom.events import EventBus
from intercom.hardware.lock import Lock
from intercom.security import command, totp
from intercom.security.limits import Limits
from intercom.security.principals import Principal, Role
from intercom.security.registry import Registry
from intercom.security.secretbox import create_key
from intercom.security.store import PrincipalStore
from intercom.security.verifier import Site, Verifier

STATION = "st-1"
DOOR = "front"
SITE = Site(STATION, DOOR, frozenset({"1", "2"}))
RELAY_PIN = 27


class Clock:
    """A wall clock the test moves."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


@dataclass
class Signer:
    """A principal's side: its private key and TOTP secret."""

    pid: str
    key: OKPKey | ECKey
    secret: str
    clock: Clock
    used: set[int] = field(default_factory=set)

    def code(self, at: float | None = None) -> str:
        return totp.code_at(self.secret, self.clock() if at is None else at)

    def token(self, **kw: Any) -> str:
        now = kw.pop("now", self.clock())
        args: dict[str, Any] = {
            "kid": self.pid, "station": STATION, "door": DOOR, "totp": self.code(now),
            "now": now,
        }
        args.update(kw)
        return command.sign(self.key, **args)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes, sig: bytes) -> str:
    """A compact JWS made by hand, signature included as given."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{b64(h)}.{b64(p)}.{b64(sig)}"


def claims(signer: Signer, **kw: Any) -> dict[str, Any]:
    now = int(signer.clock())
    base = {
        "aud": STATION, "cmd": "unlock", "door": DOOR, "iat": now, "exp": now + 30,
        "jti": f"jti-{time.perf_counter_ns()}", "totp": signer.code(),
    }
    base.update(kw)
    return base


def sign_raw(
    signer: Signer, header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes
) -> str:
    """A compact JWS over exactly these bytes, signed with the signer's key."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(h)}.{b64(p)}".encode()
    op = signer.key.get_op_key("sign")
    if isinstance(signer.key, ECKey):
        from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        from cryptography.hazmat.primitives.asymmetric.utils import (  # noqa: PLC0415
            decode_dss_signature,
        )

        r, s = decode_dss_signature(op.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        sig = op.sign(signing_input)
    return f"{signing_input.decode()}.{b64(sig)}"


def new_principal(
    clock: Clock,
    pid: str,
    role: Role = Role.RESIDENT,
    kind: str = "Ed25519",
    **kw: Any,
) -> tuple[Principal, Signer]:
    """A principal with a fresh key and TOTP secret (not registered), and its signer."""
    key: OKPKey | ECKey = (
        OKPKey.generate_key("Ed25519") if kind == "Ed25519" else ECKey.generate_key("P-256")
    )
    public = {k: v for k, v in key.as_dict(private=False).items() if k != "kid"}
    if role is Role.RESIDENT:
        kw.setdefault("flats", ("1",))
    if role is Role.MANAGER:
        kw.setdefault("doors", (DOOR,))
    if role is Role.INSTALLER:
        kw.setdefault("valid_until", clock() + 3600)
    kw.setdefault("valid_from", clock() - 60)
    principal = Principal(id=pid, role=role, jwk=public, **kw)
    return principal, Signer(pid, key, totp.new_secret(), clock)


async def add_principal(
    registry: Registry,
    clock: Clock,
    pid: str,
    role: Role = Role.RESIDENT,
    kind: str = "Ed25519",
    **kw: Any,
) -> Signer:
    """Register a principal through ``registry`` with a fresh key and TOTP secret."""
    principal, signer = new_principal(clock, pid, role, kind, **kw)
    await registry.add(principal, signer.secret)
    return signer


def new_registry(
    state_dir: Path, bus: EventBus, clock: Clock | None = None
) -> Registry:
    """A registry of ``state_dir`` (key and database made when missing), not yet open."""
    key = create_key(state_dir)
    return Registry(
        lambda: PrincipalStore(state_dir, key, create=True), bus, clock or time.time
    )


async def open_registry(
    state_dir: Path, bus: EventBus, clock: Clock | None = None
) -> Registry:
    """``new_registry``, opened; the caller closes it."""
    registry = new_registry(state_dir, bus, clock)
    await registry.open()
    return registry


def relay_lock(pin_factory: Any, bus: EventBus, loop: Any) -> Lock:
    return Lock(RelayConfig(pin=RELAY_PIN, door=DOOR), pin_factory, bus, loop)


def relay_was_energised(pin_factory: Any) -> bool:
    return any(s.state for s in pin_factory.pin(RELAY_PIN).states)


def new_verifier(
    registry: Registry, bus: EventBus, lock: Lock | None, clock: Clock,
    limits: Limits | None = None,
) -> Verifier:
    """A verifier of ``SITE`` reading ``registry`` (start it: it denies until then)."""
    return Verifier(registry, SITE, bus, lock, limits=limits, clock=clock)
