"""The master key and the epoch and principal keys it wraps.

The master key (32 random bytes) comes from a systemd credential when
``$CREDENTIALS_DIRECTORY/intercom_eventlog.key`` exists (the unit's ``LoadCredential=intercom:DIR``
names ``DIR/eventlog.key`` so), else from ``STATE_DIR/keys/eventlog.key``
(mode 0600). It never encrypts a record: it wraps one random key per epoch and one per
principal, which live in the database and are deleted to shred what they encrypted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from intercom.eventlog.errors import MasterKeyError
from intercom.identity import credential, key_dir, write_secret

MASTER_KEY_FILE = "eventlog.key"
CREDENTIAL_NAME = "eventlog.key"
KEY_BYTES = 32
NONCE_BYTES = 12


@dataclass(frozen=True)
class MasterKeySource:
    """Where the master key lives and whether it is a systemd credential."""

    path: Path
    credential: bool


def master_key_source(state_dir: Path) -> MasterKeySource:
    """The systemd credential (``intercom_eventlog.key``) when present, else the state dir's."""
    path = credential(CREDENTIAL_NAME)
    if path is not None:
        return MasterKeySource(path, credential=True)
    return MasterKeySource(state_dir / "keys" / MASTER_KEY_FILE, credential=False)


def read_master_key(source: MasterKeySource) -> bytes:
    """Read the master key; raise MasterKeyError with the reason when it is unusable."""
    try:
        info = source.path.stat()
        data = source.path.read_bytes()
    except FileNotFoundError as exc:
        raise MasterKeyError(f"event log master key {source.path} is missing") from exc
    except OSError as exc:
        raise MasterKeyError(
            f"event log master key {source.path} is unreadable: {exc.strerror or exc}"
        ) from exc
    if not source.credential and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MasterKeyError(
            f"event log master key {source.path} is readable by others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); it must be 0600"
        )
    if len(data) == KEY_BYTES:
        return data
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise MasterKeyError(
            f"event log master key {source.path} is corrupt: expected {KEY_BYTES} bytes "
            "(raw or base64)"
        )
    return key


def create_master_key(state_dir: Path) -> bytes:
    """Make a new master key file atomically (never over an existing one)."""
    path = key_dir(state_dir, create=True) / MASTER_KEY_FILE
    key = os.urandom(KEY_BYTES)
    try:
        write_secret(path, key)
    except FileExistsError as exc:
        raise MasterKeyError(f"event log master key {path} appeared while creating it") from exc
    return key


def _derive(master: bytes, label: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"intercom-eventlog/" + label
    ).derive(master)


def new_key() -> bytes:
    """A fresh random 256-bit key."""
    return os.urandom(KEY_BYTES)


def seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """Encrypt with a fresh random nonce; returns (nonce, ciphertext)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, aead.encrypt(nonce, plaintext, aad)


class Keyring:
    """Keys derived from the master key, and a cache of unwrapped keys (thread-safe)."""

    def __init__(self, master: bytes) -> None:
        self._wrapper = AESGCM(_derive(master, b"wrap"))
        self._lookup = _derive(master, b"principal-lookup")
        self.check = _derive(master, b"check")
        self._aeads: dict[bytes, AESGCM] = {}
        self._lock = threading.Lock()

    def wrap(self, key: bytes, aad: bytes) -> bytes:
        """Wrap a key under the master key: nonce followed by ciphertext."""
        nonce, sealed = seal(self._wrapper, key, aad)
        return nonce + sealed

    def aead(self, wrapped: bytes, aad: bytes) -> AESGCM:
        """The cipher of a wrapped key (unwrapped once, then cached by its wrapped form)."""
        with self._lock:
            cached = self._aeads.get(wrapped)
        if cached is not None:
            return cached
        try:
            key = self._wrapper.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise MasterKeyError("a wrapped event log key does not open (altered?)") from exc
        aead = AESGCM(key)
        with self._lock:
            self._aeads[wrapped] = aead
        return aead

    def forget(self, wrapped: bytes) -> None:
        """Drop a cached key (after it was destroyed)."""
        with self._lock:
            self._aeads.pop(wrapped, None)

    def principal_lookup(self, principal_id: str) -> bytes:
        """A keyed hash of a principal id: finds its key without storing the id."""
        return hmac.new(self._lookup, principal_id.encode(), hashlib.sha256).digest()


def epoch_aad(epoch: int) -> bytes:
    """Associated data of a wrapped epoch key."""
    return b"epoch-key" + epoch.to_bytes(8, "big")


def principal_aad(key_id: bytes) -> bytes:
    """Associated data of a wrapped principal key."""
    return b"principal-key" + key_id
