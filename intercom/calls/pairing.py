"""One-time pairing codes and the resident principals they create.

A code is single use, expires after ten minutes and is kept only as its SHA-256 hash.
Redeeming it with a device's public key registers a resident principal of the code's
flat with a fresh TOTP secret; the device keeps its private key.
"""

from __future__ import annotations

import asyncio
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
from intercom.safefiles import replace_atomically
from intercom.security import totp
from intercom.security.pairingcodes import CODE_TTL_S, SPOOL
from intercom.security.pairingcodes import digest as _digest
from intercom.security.pairingcodes import new_code as _new_code
from intercom.security.principals import Principal, PrincipalError, Role, import_public_jwk
from intercom.security.registry import Registry

log = logging.getLogger(__name__)

MAX_PENDING = 64
MAX_SHEET_CODES = 1024  # printed sheets' codes, counted apart so they never block `pair`
SHEET_CODE_TTL_S = 14 * 86_400  # a printed sheet's code: single use, for two weeks
SHEETS_FILE = "pairing-sheets.json"  # their hashes, kept across restarts (0600)
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
    """A code waiting to be redeemed: a resident's of ``flat``, or an installer's."""

    flat: str
    expires_at: float
    installer_hours: float = 0.0  # > 0: an installer code, valid this long once redeemed
    sheet: bool = False  # a printed sheet's long-lived code


@dataclass(frozen=True)
class Paired:
    """What a redeemed code made."""

    principal: str
    flat: str
    totp_uri: str


class Pairing:
    """Makes pairing codes and redeems them into resident principals."""

    def __init__(
        self,
        state_dir: Path,
        station: str,
        flats: frozenset[str],
        bus: EventBus,
        registry: Registry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = state_dir
        self.station = station
        self.flats = flats
        self._bus = bus
        self._registry = registry
        self._clock = clock
        self._codes: dict[str, Pending] = {}

    def open(self) -> None:
        """Take the codes spooled while the station was stopped (first boot's)."""
        self._load_sheets()
        path = self.state_dir / SPOOL
        if not path.exists():
            return
        try:
            entries = json.loads(path.read_text())
            for entry in entries:
                hours = float(entry.get("installer_hours", 0))
                if entry["flat"] in self.flats or hours > 0:  # an installer's has no flat
                    self._codes[str(entry["digest"])] = Pending(
                        str(entry["flat"]), float(entry["expires_at"]), hours
                    )
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("pairing: ignored an unreadable %s: %s", SPOOL, exc)
        path.unlink()
        self._purge(self._clock())
        log.info("pairing: %d spooled code(s) pending", len(self._codes))

    def _load_sheets(self) -> None:
        """The printed sheets' codes (hashes) of earlier runs, still valid."""
        path = self.state_dir / SHEETS_FILE
        if not path.exists():
            return
        try:
            for entry in json.loads(path.read_text()):
                if entry["flat"] in self.flats:
                    self._codes[str(entry["digest"])] = Pending(
                        str(entry["flat"]), float(entry["expires_at"]), sheet=True)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("pairing: ignored an unreadable %s: %s", SHEETS_FILE, exc)

    def _save_sheets(self) -> None:
        """Write the printed sheets' pending codes (hashes only), replacing the file."""
        entries = [{"digest": d, "flat": p.flat, "expires_at": p.expires_at}
                   for d, p in self._codes.items() if p.sheet]
        replace_atomically(self.state_dir / SHEETS_FILE, json.dumps(entries).encode(), 0o600)

    async def sheet_codes(self, flats: list[str]) -> list[tuple[str, str, float]]:
        """A long-lived code for each flat, for printed sheets: (flat, code, expires at)."""
        made = [(flat, *self.new_code(flat, SHEET_CODE_TTL_S)) for flat in flats]
        await asyncio.to_thread(self._save_sheets)
        return made

    def close(self) -> None:
        """Forget every pending code."""
        self._codes.clear()

    def _purge(self, now: float) -> None:
        for digest in [d for d, p in self._codes.items() if p.expires_at <= now]:
            del self._codes[digest]

    def new_code(self, flat: str, ttl_s: float = CODE_TTL_S) -> tuple[str, float]:
        """A fresh code for ``flat`` and the time it expires (``ttl_s``: a printed sheet's)."""
        if flat not in self.flats:
            raise PairingError(f"flat {flat!r} is not served by this station")
        now = self._clock()
        self._purge(now)
        sheet = ttl_s > CODE_TTL_S
        same = sum(1 for p in self._codes.values() if p.sheet == sheet)
        if same >= (MAX_SHEET_CODES if sheet else MAX_PENDING):
            raise PairingError("too many pairing codes pending; wait for some to expire")
        code = _new_code()
        expires_at = now + min(ttl_s, SHEET_CODE_TTL_S)
        self._codes[_digest(code)] = Pending(flat, expires_at, sheet=sheet)
        log.info("pairing code made for flat %s, expires in %.0f s", flat, CODE_TTL_S)
        return code, expires_at

    def new_installer_code(self, valid_hours: float) -> tuple[str, float]:
        """A fresh code that pairs an installer's phone, time-boxed to ``valid_hours``."""
        now = self._clock()
        self._purge(now)
        if len(self._codes) >= MAX_PENDING:
            raise PairingError("too many pairing codes pending; wait for some to expire")
        code = _new_code()
        expires_at = now + CODE_TTL_S
        self._codes[_digest(code)] = Pending("", expires_at, valid_hours)
        log.info("installer pairing code made, expires in %.0f s", CODE_TTL_S)
        return code, expires_at

    async def redeem(self, code: Any, jwk: Any) -> Paired:
        """Register the device key under ``code``; the code is spent either way once valid."""
        if not isinstance(jwk, dict):
            raise PairingError("jwk must be a public key (JWK object)")
        try:
            key = import_public_jwk({k: v for k, v in jwk.items() if k in JWK_MEMBERS})
        except PrincipalError as exc:
            raise PairingError(str(exc)) from exc
        if not isinstance(code, str) or len(code) > 64 or not code.isascii():
            raise BadCodeError
        now = self._clock()
        self._purge(now)
        pending = self._codes.pop(_digest(code), None)
        if pending is None:
            log.warning("pairing refused: unknown, used or expired code")
            raise BadCodeError
        if pending.sheet:  # spent: gone from the file too
            await asyncio.to_thread(self._save_sheets)
        public = {k: v for k, v in key.as_dict(private=False).items() if k in JWK_MEMBERS}
        secret = totp.new_secret()
        if pending.installer_hours > 0:  # the installer's phone: every door, time-boxed
            pid = f"inst-{secrets.token_hex(8)}"
            principal = Principal(id=pid, role=Role.INSTALLER, jwk=public, valid_from=now,
                                  valid_until=now + pending.installer_hours * 3600,
                                  created_at=now)
        else:
            pid = f"res-{secrets.token_hex(8)}"
            principal = Principal(
                id=pid,
                role=Role.RESIDENT,
                jwk=public,
                valid_from=now,
                flats=(pending.flat,),
                created_at=now,
            )
        await self._registry.add(principal, secret)
        uri = totp.enrolment_uri(secret, account=pid, issuer=f"intercom {self.station}")
        self._bus.publish(PrincipalPaired(principal=pid, flat=pending.flat))
        return Paired(pid, pending.flat, uri)
