"""What one record holds, how it is encrypted, and the hash that chains records.

A record's clear columns are seq, epoch, nonce, ciphertext and chain hash. The
ciphertext (AES-256-GCM under the epoch key, seq and epoch as associated data) holds
the type, time and details; details named in the event's ``personal_fields`` are
encrypted once more under the key of the principal they identify.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from intercom.eventlog.keys import NONCE_BYTES, seal
from intercom.events import Event

ZERO_HASH = bytes(32)
RECORD_AAD = b"intercom-eventlog/1 record"
PERSONAL_AAD = b"intercom-eventlog/1 personal"
UNREADABLE = "LogRecordUnreadable"


def chain_hash(prev: bytes, seq: int, epoch: int, nonce: bytes, ciphertext: bytes) -> bytes:
    """h_n = SHA-256(h_{n-1} || seq || epoch || nonce || ciphertext); needs no key."""
    return hashlib.sha256(
        prev + seq.to_bytes(8, "big") + epoch.to_bytes(8, "big") + nonce + ciphertext
    ).digest()


def record_aad(seq: int, epoch: int) -> bytes:
    """Associated data that binds a ciphertext to its seq and epoch."""
    return RECORD_AAD + seq.to_bytes(8, "big") + epoch.to_bytes(8, "big")


@dataclass(frozen=True)
class Entry:
    """An event as the log takes it: type, time, details, and which are personal."""

    type: str
    at: float
    details: dict[str, Any]
    personal: tuple[str, ...] = ()

    @classmethod
    def from_event(cls, event: Event) -> Entry:
        """The entry of a domain event."""
        return cls(event.type, event.at, event.details(), tuple(event.personal_fields))

    def owner(self) -> str | None:
        """The principal the personal fields identify (``principal`` first), if any."""
        fields = sorted(self.personal, key=lambda name: name != "principal")
        for name in fields:
            value = self.details.get(name)
            if value not in (None, ""):
                return str(value)
        return None


@dataclass(frozen=True)
class LoggedEvent:
    """A decrypted record; personal fields are None once their person was erased."""

    seq: int
    type: str
    at: float
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Seq, type, time and details as one JSON-able mapping."""
        return {"seq": self.seq, "type": self.type, "at": self.at, "details": self.details}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(entry: Entry, seq: int, principal: tuple[bytes, AESGCM] | None) -> bytes:
    """The plaintext of a record; ``principal`` is the owner's (key id, cipher)."""
    public = {k: v for k, v in entry.details.items() if k not in entry.personal}
    body: dict[str, Any] = {"t": entry.type, "a": entry.at, "d": public}
    personal = {k: entry.details.get(k) for k in entry.personal if k in entry.details}
    if personal:
        if principal is None:
            body["d"].update(personal)  # nothing identifying: every value is empty
        else:
            key_id, aead = principal
            plain = json.dumps(personal, separators=(",", ":"), default=str).encode()
            nonce, sealed = seal(aead, plain, PERSONAL_AAD + seq.to_bytes(8, "big") + key_id)
            body["p"] = [_b64(key_id), _b64(nonce + sealed), sorted(personal)]
    return json.dumps(body, separators=(",", ":"), default=str).encode()


PrincipalLookup = Callable[[bytes], AESGCM | None]


def decode(seq: int, plaintext: bytes, principal: PrincipalLookup) -> tuple[LoggedEvent, bytes]:
    """A record's event and the key id of its personal fields (empty if none)."""
    body = json.loads(plaintext)
    details: dict[str, Any] = dict(body["d"])
    key_id = b""
    if "p" in body:
        key_b64, sealed_b64, names = body["p"]
        key_id = base64.b64decode(key_b64)
        sealed = base64.b64decode(sealed_b64)
        values: dict[str, Any] = dict.fromkeys(names)
        aead = principal(key_id)
        if aead is not None:
            try:
                plain = aead.decrypt(
                    sealed[:NONCE_BYTES],
                    sealed[NONCE_BYTES:],
                    PERSONAL_AAD + seq.to_bytes(8, "big") + key_id,
                )
                values.update(json.loads(plain))
            except InvalidTag:
                pass  # altered: shown as erased, and verify --deep names it
        details.update(values)
    return LoggedEvent(seq, str(body["t"]), float(body["a"]), details), key_id


def unreadable(seq: int, reason: str) -> LoggedEvent:
    """A placeholder for a record that cannot be decrypted."""
    return LoggedEvent(seq, UNREADABLE, 0.0, {"reason": reason})
