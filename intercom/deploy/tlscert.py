"""The station's TLS certificate: ECDSA P-256, self-signed, pinned by fingerprint at pairing.

There is no certificate authority: a resident's device learns the fingerprint from the
pairing QR code and pins it. Files: ``STATE_DIR/keys/tls.key`` (PKCS#8, mode 0600) and
``STATE_DIR/keys/tls.crt`` (PEM).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from intercom.errors import IntercomError
from intercom.identity import key_dir, write_secret

TLS_KEY = "tls.key"
TLS_CERT = "tls.crt"
VALID_DAYS = 20 * 365


@dataclass(frozen=True)
class TlsIdentity:
    """Where the certificate and its key are, and the fingerprint clients pin."""

    cert_path: Path
    key_path: Path
    fingerprint: str  # SHA-256 of the DER certificate, colon-separated upper-case hex


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, as browsers print it (AB:CD:...)."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def load_or_create_tls(state_dir: Path, station_id: str) -> tuple[TlsIdentity, bool]:
    """Load the certificate, making key and certificate when missing; never replace a key."""
    keys = key_dir(state_dir)
    key_path, cert_path = keys / TLS_KEY, keys / TLS_CERT
    created = False
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        write_secret(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        cert_path.unlink(missing_ok=True)  # a certificate without its key is worthless
        created = True
    try:
        loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IntercomError(f"TLS key {key_path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise IntercomError(f"TLS key {key_path} is not an ECDSA key")
    if not cert_path.exists():
        cert = _self_signed(loaded, station_id)
        tmp = cert_path.with_suffix(".tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        tmp.replace(cert_path)
        created = True
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IntercomError(f"TLS certificate {cert_path} is unreadable: {exc}") from exc
    if cert.public_key() != loaded.public_key():
        raise IntercomError(f"TLS certificate {cert_path} does not belong to {key_path}")
    return TlsIdentity(cert_path, key_path, fingerprint(cert)), created


def _self_signed(key: ec.EllipticCurvePrivateKey, station_id: str) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, station_id),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "intercom door station"),
    ])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(station_id), x509.DNSName(f"{station_id}.local")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
