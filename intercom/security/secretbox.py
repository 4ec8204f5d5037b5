"""AES-256-GCM encryption of secrets at rest (the principals' TOTP secrets).

The 32-byte key comes from a systemd credential (``intercom_principals.key``, the name
``LoadCredential=intercom:/etc/intercom/credentials`` gives ``principals.key``) when the
service has one, else from ``STATE_DIR/keys/principals.key`` (mode 0600), made at the
station's first start (``create_key``) and only read (``load_key``) everywhere else.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from intercom.errors import IntercomError
from intercom.identity import MissingKeyError, credential, key_dir, write_secret

KEY_NAME = "principals.key"
KEY_BYTES = 32
NONCE_BYTES = 12


class SecretBoxError(IntercomError):
    """A key file is unusable or a sealed secret does not open."""


def key_path(state_dir: Path) -> Path:
    """Where the key is read from: the systemd credential if present, else the state dir."""
    return credential(KEY_NAME) or key_dir(state_dir) / KEY_NAME


def create_key(state_dir: Path) -> bytes:
    """The 32-byte key, made (0600) in ``STATE_DIR/keys`` when none exists yet."""
    path = key_path(state_dir)
    if not path.exists():
        key_dir(state_dir, create=True)
        # FileExistsError: another process made it in the meantime.
        with contextlib.suppress(FileExistsError):
            write_secret(path, secrets.token_bytes(KEY_BYTES))
    return load_key(state_dir)


def load_key(state_dir: Path) -> bytes:
    """The 32-byte key; MissingKeyError when the station has not made it."""
    path = key_path(state_dir)
    if not path.exists():
        raise MissingKeyError(f"no principals key {path}: the station makes it at its first start")
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise SecretBoxError(f"cannot read the principals key {path}: {exc}") from exc
    if len(key) != KEY_BYTES:
        raise SecretBoxError(f"the principals key {path} must hold exactly {KEY_BYTES} bytes")
    return key


class SecretBox:
    """Seals and opens small secrets; ``context`` binds a secret to its owner (AAD)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, secret: bytes, context: str) -> bytes:
        """Nonce followed by ciphertext and tag."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        """The secret, or SecretBoxError when the key or the context is wrong."""
        nonce, body = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, body, context.encode())
        except (InvalidTag, ValueError) as exc:
            raise SecretBoxError(f"the sealed secret of {context!r} does not open") from exc
