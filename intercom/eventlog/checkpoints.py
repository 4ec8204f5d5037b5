"""Signed checkpoints: the station's Ed25519 signature over the chain hash at a seq."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from intercom.eventlog.errors import EventLogError
from intercom.events import LogCheckpoint
from intercom.identity import StationIdentity

DOMAIN = "intercom-eventlog-checkpoint/1"


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, base64url without padding (as StationIdentity)."""
    raw = public_key.public_bytes_raw()
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class Checkpoint:
    """The chain hash at ``seq``, signed at ``signed_at`` by the key ``key``."""

    seq: int
    hash: bytes
    signed_at: int
    key: str
    signature: bytes

    def message(self) -> bytes:
        """The exact bytes that are signed."""
        return f"{DOMAIN} {self.key} {self.seq} {self.hash.hex()} {self.signed_at}".encode()

    def valid_for(self, public_key: Ed25519PublicKey) -> bool:
        """Whether the signature is the given key's over this checkpoint."""
        if self.key != fingerprint(public_key):
            return False
        try:
            public_key.verify(self.signature, self.message())
        except InvalidSignature:
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as JSON (the same fields as the LogCheckpoint event)."""
        return {
            "seq": self.seq,
            "hash": self.hash.hex(),
            "signed_at": self.signed_at,
            "key": self.key,
            "signature": base64.b64encode(self.signature).decode(),
        }

    def to_event(self) -> LogCheckpoint:
        """The event that announces it on the bus."""
        d = self.to_dict()
        return LogCheckpoint(
            seq=self.seq, hash=d["hash"], signed_at=self.signed_at, key=self.key,
            signature=d["signature"],
        )

    @classmethod
    def from_dict(cls, data: Any) -> Checkpoint:
        """Parse the JSON form (extra keys such as ``type`` are ignored)."""
        try:
            return cls(
                seq=int(data["seq"]),
                hash=bytes.fromhex(str(data["hash"])),
                signed_at=int(data["signed_at"]),
                key=str(data["key"]),
                signature=base64.b64decode(str(data["signature"]), validate=True),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise EventLogError(f"not a checkpoint: {exc!r}") from exc

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Checkpoint:
        """From a row of the checkpoints table."""
        seq, digest, signed_at, key, signature = row
        return cls(int(seq), bytes(digest), int(signed_at), str(key), bytes(signature))


def sign(identity: StationIdentity, seq: int, digest: bytes, now: float) -> Checkpoint:
    """Sign the chain hash ``digest`` at ``seq``."""
    unsigned = Checkpoint(seq, digest, int(now), identity.fingerprint, b"")
    signature = identity.sign(unsigned.message())
    return Checkpoint(seq, digest, int(now), identity.fingerprint, signature)


def store(conn: sqlite3.Connection, checkpoint: Checkpoint) -> None:
    """Insert (or replace) a checkpoint row."""
    conn.execute(
        "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
        (checkpoint.seq, checkpoint.hash, checkpoint.signed_at, checkpoint.key,
         checkpoint.signature),
    )


def latest(conn: sqlite3.Connection) -> Checkpoint | None:
    """The checkpoint with the highest seq."""
    row = conn.execute(
        "SELECT seq, hash, signed_at, key, signature FROM checkpoints ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    return None if row is None else Checkpoint.from_row(row)


def load_file(path: Path) -> Checkpoint:
    """Read a checkpoint kept as a witness (JSON, e.g. from MQTT)."""
    try:
        return Checkpoint.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except OSError as exc:
        raise EventLogError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise EventLogError(f"{path}: not JSON: {exc}") from exc
