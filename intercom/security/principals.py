"""Principals: who may send unlock commands, with which key, for which doors, until when."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey

from intercom.errors import IntercomError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")

# Signature algorithms per key kind: the allow-list. Never "none", never HMAC.
ALGORITHMS: dict[str, frozenset[str]] = {
    "Ed25519": frozenset({"Ed25519", "EdDSA"}),  # RFC 9864 name and the RFC 8037 one
    "P-256": frozenset({"ES256"}),
}
ALL_ALGORITHMS = frozenset().union(*ALGORITHMS.values())

PublicKey = OKPKey | ECKey


class PrincipalError(IntercomError, ValueError):
    """A principal's data is invalid (bad id, key, role scope or times)."""


class Role(enum.StrEnum):
    """What a principal may open."""

    RESIDENT = "resident"  # the station's door, when one of their flats is served here
    MANAGER = "manager"  # the doors listed for them
    INSTALLER = "installer"  # every door, only while valid (always time-boxed)
    ADMIN = "admin"  # every door


@dataclass(frozen=True)
class Principal:
    """One registered signer. The TOTP secret is not here: the store keeps it sealed."""

    id: str
    role: Role
    jwk: dict[str, Any]
    valid_from: float
    valid_until: float | None = None
    flats: tuple[str, ...] = ()
    doors: tuple[str, ...] = ()
    revoked_at: float | None = None
    created_at: float = 0.0
    key: PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", import_public_jwk(self.jwk))
        check_scope(self.id, self.role, self.flats, self.doors)
        if self.valid_until is not None and self.valid_until <= self.valid_from:
            raise PrincipalError("valid-until must be after valid-from")
        if self.role is Role.INSTALLER and self.valid_until is None:
            raise PrincipalError("an installer needs a valid-until (installers are time-boxed)")

    @property
    def key_kind(self) -> str:
        """``Ed25519`` or ``P-256``."""
        return key_kind(self.key)

    @property
    def algorithms(self) -> frozenset[str]:
        """The JWS algorithms this principal's key may sign with."""
        return ALGORITHMS[self.key_kind]

    def inactive_reason(self, now: float) -> str | None:
        """Why the principal may not act at ``now`` (revoked, not yet or no longer valid)."""
        if self.revoked_at is not None:
            return "principal revoked"
        if now < self.valid_from:
            return "principal not yet valid"
        if self.valid_until is not None and now >= self.valid_until:
            return "principal expired"
        return None

    def may_open(self, door: str, station_door: str, station_flats: frozenset[str]) -> str | None:
        """Why this principal may not open ``door`` at this station, or None when it may."""
        if door != station_door:
            return "door not at this station"
        if self.role is Role.RESIDENT and not station_flats.intersection(self.flats):
            return "resident's flat not served by this station"
        if self.role is Role.MANAGER and door not in self.doors:
            return "door not listed for this manager"
        return None


def check_scope(pid: str, role: Role, flats: tuple[str, ...], doors: tuple[str, ...]) -> None:
    """Refuse a bad id, or flats/doors that do not fit the role."""
    if not ID_PATTERN.match(pid):
        raise PrincipalError(f"principal id {pid!r} must be 1-64 of A-Z a-z 0-9 _ . -")
    for name in (*flats, *doors):
        if not NAME_PATTERN.match(name):
            raise PrincipalError(f"flat or door name {name!r} must be 1-32 of A-Z a-z 0-9 _ . -")
    if role is Role.RESIDENT and (not flats or doors):
        raise PrincipalError("a resident needs --flat (and no --door)")
    if role is Role.MANAGER and (not doors or flats):
        raise PrincipalError("a manager needs --door (and no --flat)")
    if role in {Role.INSTALLER, Role.ADMIN} and (flats or doors):
        raise PrincipalError(f"an {role.value} takes neither --flat nor --door")


def key_kind(key: PublicKey) -> str:
    """``Ed25519`` or ``P-256``; PrincipalError for any other key."""
    curve = key.curve_name
    if isinstance(key, OKPKey) and curve == "Ed25519":
        return "Ed25519"
    if isinstance(key, ECKey) and curve == "P-256":
        return "P-256"
    raise PrincipalError(f"unsupported key ({key.key_type} {curve}); use Ed25519 or ECDSA P-256")


def import_public_jwk(jwk: dict[str, Any]) -> PublicKey:
    """A public key from its JWK (private members are refused)."""
    if not isinstance(jwk, dict) or "d" in jwk:
        raise PrincipalError("a principal's key must be a public JWK")
    try:
        key: PublicKey
        if jwk.get("kty") == "OKP":
            key = OKPKey.import_key(jwk)
        elif jwk.get("kty") == "EC":
            key = ECKey.import_key(jwk)
        else:
            raise PrincipalError(f"unsupported key type {jwk.get('kty')!r}")
    except (JoseError, ValueError, TypeError, KeyError) as exc:  # KeyError: a crv unknown
        raise PrincipalError(f"invalid public key: {exc!s}"[:200]) from exc  # for the kty
    key_kind(key)
    return key


def public_jwk_from_file(data: bytes) -> dict[str, Any]:
    """The public JWK of a PEM public key (or of a JWK JSON file); private parts dropped."""
    text = data.strip()
    try:
        if text.startswith(b"{"):
            loaded = json.loads(text)
            loaded = {k: v for k, v in loaded.items() if k in {"kty", "crv", "x", "y"}}
            return import_public_jwk(loaded).as_dict(private=False)
        for cls in (OKPKey, ECKey):
            try:
                key = cls.import_key(text)
            except (JoseError, ValueError, TypeError, KeyError, UnsupportedAlgorithm):
                continue  # UnsupportedAlgorithm: a key type cryptography does not know
            key_kind(key)
            return {k: v for k, v in key.as_dict(private=False).items() if k != "kid"}
    except (ValueError, AttributeError, RecursionError) as exc:
        raise PrincipalError(f"not a public key: {exc!s}"[:200]) from exc
    raise PrincipalError("not an Ed25519 or ECDSA P-256 public key (PEM or JWK)")
