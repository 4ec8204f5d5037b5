"""The station's own Ed25519 identity key, made on first start and never shipped.

It signs event-log checkpoints and other statements the station makes. The private key
is kept in ``STATE_DIR/keys/station.key`` (PEM, PKCS#8, mode 0600).

Keys are made in one place: first boot and the daemon's start call the ``create_*``
functions; every other process only reads keys (``load_identity``) and fails clearly
when they are absent. Secrets that systemd hands over come from
``$CREDENTIALS_DIRECTORY``, named as the unit's ``LoadCredential=intercom:DIR`` names
them (``credential``).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from intercom.errors import ConfigError, IntercomError

KEY_DIR = "keys"
STATION_KEY = "station.key"
# systemd/intercom.service: LoadCredential=intercom:/etc/intercom/credentials loads each
# file FILE of that folder as the credential "intercom_FILE".
CREDENTIAL_ID = "intercom"


class MissingKeyError(IntercomError, FileNotFoundError):
    """A key the station makes at its first start is not there (yet)."""


def key_dir(state_dir: Path, *, create: bool = False) -> Path:
    """The folder of the station's secrets (mode 0700); made only with ``create``."""
    path = state_dir / KEY_DIR
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def credential_name(file: str) -> str:
    """The credential name systemd gives ``file`` of the unit's credential folder."""
    return f"{CREDENTIAL_ID}_{file}"


def credential(file: str, environ: dict[str, str] | None = None) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/intercom_FILE`` when systemd passed it, else None."""
    env = os.environ if environ is None else environ
    folder = env.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    path = Path(folder) / credential_name(file)
    return path if path.is_file() else None


def secret_line(
    file: tuple[str, Path | None],
    credential: tuple[str, str | None],
    environ: dict[str, str] | None = None,
) -> str | None:
    """The first line of a secret given as a file or as a systemd credential's name.

    ``file`` and ``credential`` are (config key, value); the credential wins when given.
    None when neither is; ConfigError naming the key when it cannot be read or is empty.
    """
    env = os.environ if environ is None else environ
    key, path = file
    if credential[1] is not None:
        key = credential[0]
        folder = env.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise ConfigError(
                [f"{key}: $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)"]
            )
        path = Path(folder) / credential[1]
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError([f"{key}: cannot read {path}: {reason}"]) from None
    line = text.splitlines()[0] if text else ""
    if not line:
        raise ConfigError([f"{key}: {path} is empty"])
    return line


def fsync_dir(path: Path) -> None:
    """Make a change to a folder's entries (a new or removed file) durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_secret(path: Path, data: bytes) -> None:
    """Write a new secret file with mode 0600, atomically and durably; never replace one.

    The data goes to a temporary file first and is linked into place only once synced,
    so a power cut leaves either no file or the whole secret, never half of it.
    """
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by an earlier power cut
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # raises FileExistsError rather than replace a secret
    finally:
        tmp.unlink()
    fsync_dir(path.parent)


@dataclass(frozen=True)
class StationIdentity:
    """The station's signing key and its public half."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The public half, for verifiers."""
        return self.private_key.public_key()

    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the raw public key, base64url without padding."""
        digest = hashlib.sha256(self.public_bytes()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self.private_key.sign(data)


def create_identity(state_dir: Path) -> StationIdentity:
    """The station key, made when missing: for first boot and the daemon's start only."""
    path = key_dir(state_dir, create=True) / STATION_KEY
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_secret(path, pem)
        return StationIdentity(key)
    return load_identity(state_dir)


def load_identity(state_dir: Path) -> StationIdentity:
    """Load the station key; MissingKeyError when absent, IntercomError when corrupt."""
    path = key_dir(state_dir) / STATION_KEY
    if not path.is_file():
        raise MissingKeyError(
            f"no station key {path}: the station makes it at its first start "
            "(or first boot); is the state directory right?"
        )
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise IntercomError(f"station key {path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise IntercomError(f"station key {path} is not an Ed25519 key")
    return StationIdentity(loaded)
