"""One-time pairing codes and the resident principals they create.

A code is single use, expires after ten minutes and is kept only as its SHA-256 hash.
Redeeming it with a device's public key registers a resident principal of the code's
flat with a fresh TOTP secret; the device keeps its private key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from intercom.errors import CommandRefusedError
from intercom.events import EventBus, PrincipalPaired
from intercom.security import totp
from intercom.security.principals import Principal, PrincipalError, Role, import_public_jwk
from intercom.security.store import PrincipalStore

log = logging.getLogger(__name__)

CODE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no 0/O, 1/I: read aloud, typed
CODE_LENGTH = 12  # 60 bits
CODE_TTL_S = 600.0
MAX_PENDING = 64
SPOOL = "pairing-spool.json"
INVALID_CODE = "pairing code invalid or expired"
JWK_MEMBERS = frozenset({"kty", "crv", "x", "y"})


class PairingError(CommandRefusedError):
    """A pairing request is refused; the message is safe to show the requester."""


class BadCodeError(PairingError):
    """The code is unknown, used or expired (one message for all three)."""

    def __init__(self) -> None:
        super().__init__(INVALID_CODE)


@dataclass(frozen=True)
class Pending:
    """A code waiting to be redeemed."""

    flat: str
    expires_at: float


@dataclass(frozen=True)
class Paired:
    """What a redeemed code made."""

    principal: str
    flat: str
    totp_uri: str


def _digest(code: str) -> str:
    normal = code.strip().upper().replace("-", "").replace(" ", "")
    return hashlib.sha256(normal.encode()).hexdigest()


def _new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def spool_code(state_dir: Path, flat: str, now: float) -> tuple[str, float]:
    """A code made while the station is not running (first boot); it takes it at start.

    Only the code's hash, its flat and its expiry are written (``pairing-spool.json``,
    0600); the code itself is shown once, to whoever made it.
    """
    code = _new_code()
    expires_at = now + CODE_TTL_S
    path = state_dir / SPOOL
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append({"digest": _digest(code), "flat": flat, "expires_at": expires_at})
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)
    return code, expires_at


class Pairing:
    """Makes pairing codes and redeems them into resident principals."""

    def __init__(
        self,
        state_dir: Path,
        station: str,
        flats: frozenset[str],
        bus: EventBus,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir
        self.station = station
        self.flats = flats
        self._bus = bus
        self._clock = clock
        self._codes: dict[str, Pending] = {}
        self._store: PrincipalStore | None = None

    def open(self) -> None:
        """Open the principals database; take the codes spooled while it was stopped."""
        self._store = PrincipalStore(self.state_dir)
        path = self.state_dir / SPOOL
        if not path.exists():
            return
        try:
            entries = json.loads(path.read_text())
            for entry in entries:
                if entry["flat"] in self.flats:
                    self._codes[str(entry["digest"])] = Pending(
                        str(entry["flat"]), float(entry["expires_at"])
                    )
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("pairing: ignored an unreadable %s: %s", SPOOL, exc)
        path.unlink()
        self._purge(self._clock())
        log.info("pairing: %d spooled code(s) pending", len(self._codes))

    def close(self) -> None:
        """Close the database and forget every pending code."""
        self._codes.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def store(self) -> PrincipalStore:
        """The principals database (open)."""
        if self._store is None:
            raise PairingError("pairing is not running")
        return self._store

    def _purge(self, now: float) -> None:
        for digest in [d for d, p in self._codes.items() if p.expires_at <= now]:
            del self._codes[digest]

    def new_code(self, flat: str) -> tuple[str, float]:
        """A fresh code for ``flat`` and the time it expires."""
        if flat not in self.flats:
            raise PairingError(f"flat {flat!r} is not served by this station")
        now = self._clock()
        self._purge(now)
        if len(self._codes) >= MAX_PENDING:
            raise PairingError("too many pairing codes pending; wait for some to expire")
        code = _new_code()
        expires_at = now + CODE_TTL_S
        self._codes[_digest(code)] = Pending(flat, expires_at)
        log.info("pairing code made for flat %s, expires in %.0f s", flat, CODE_TTL_S)
        return code, expires_at

    def redeem(self, code: Any, jwk: Any) -> Paired:
        """Register the device key under ``code``; the code is spent either way once valid."""
        if not isinstance(jwk, dict):
            raise PairingError("jwk must be a public key (JWK object)")
        try:
            key = import_public_jwk({k: v for k, v in jwk.items() if k in JWK_MEMBERS})
        except PrincipalError as exc:
            raise PairingError(str(exc)) from exc
        if not isinstance(code, str) or len(code) > 64:
            raise BadCodeError
        now = self._clock()
        self._purge(now)
        pending = self._codes.pop(_digest(code), None)
        if pending is None:
            log.warning("pairing refused: unknown, used or expired code")
            raise BadCodeError
        public = {k: v for k, v in key.as_dict(private=False).items() if k in JWK_MEMBERS}
        pid = f"res-{secrets.token_hex(8)}"
        secret = totp.new_secret()
        principal = Principal(
            id=pid,
            role=Role.RESIDENT,
            jwk=public,
            valid_from=now,
            flats=(pending.flat,),
            created_at=now,
        )
        self.store.add(principal, secret)
        uri = totp.enrolment_uri(secret, account=pid, issuer=f"intercom {self.station}")
        self._bus.publish(PrincipalPaired(principal=pid, flat=pending.flat))
        return Paired(pid, pending.flat, uri)
