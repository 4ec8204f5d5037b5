"""The station's VAPID key (RFC 8292): who a push service is told the pushes come from.

An ECDSA P-256 key in ``STATE_DIR/keys/vapid.key`` (PKCS#8 PEM, mode 0600), made at the
station's first start like its other keys (``create_vapid_key``, called by the daemon's
start only: first boot makes the other keys, not this one) and read everywhere else.
Its public half is the ``applicationServerKey`` a browser subscribes with; the push
service then accepts for that subscription only requests carrying a JWT signed with
this key.
"""

from __future__ import annotations

import base64
import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey

from intercom.errors import IntercomError
from intercom.identity import MissingKeyError, key_dir, write_secret

KEY_NAME = "vapid.key"
TOKEN_LIFETIME_S = 12 * 3600  # RFC 8292: at most 24 hours


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class VapidKey:
    """The station's VAPID signing key."""

    private_key: ec.EllipticCurvePrivateKey

    @property
    def application_server_key(self) -> str:
        """The public key as browsers take it: the uncompressed point, base64url."""
        point = self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return b64url(point)

    def authorization(self, endpoint: str, contact: str, now: float) -> str:
        """The ``Authorization`` header for a push to ``endpoint`` (``vapid t=..., k=...``)."""
        parts = urlsplit(endpoint)
        claims = {
            "aud": f"{parts.scheme}://{parts.netloc}",
            "exp": int(now) + TOKEN_LIFETIME_S,
            "sub": contact,
        }
        token = jwt.encode({"alg": "ES256", "typ": "JWT"}, claims, self._signing_key)
        return f"vapid t={token}, k={self.application_server_key}"

    @functools.cached_property
    def _signing_key(self) -> ECKey:
        """The key as joserfc signs with it (converted once, not at every push)."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return ECKey.import_key(pem)


def _path(state_dir: Path) -> Path:
    return key_dir(state_dir) / KEY_NAME


def create_vapid_key(state_dir: Path) -> VapidKey:
    """The VAPID key, made when missing: for first boot and the daemon's start only."""
    path = _path(state_dir)
    if not path.exists():
        key_dir(state_dir, create=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with contextlib.suppress(FileExistsError):  # another maker was first
            write_secret(path, pem)
    return load_vapid_key(state_dir)


def load_vapid_key(state_dir: Path) -> VapidKey:
    """Load the VAPID key; MissingKeyError when absent, IntercomError when corrupt."""
    path = _path(state_dir)
    if not path.is_file():
        raise MissingKeyError(f"no VAPID key {path}: the station makes it at its first start")
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IntercomError(f"VAPID key {path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
        raise IntercomError(f"VAPID key {path} is not an ECDSA P-256 key")
    return VapidKey(loaded)
