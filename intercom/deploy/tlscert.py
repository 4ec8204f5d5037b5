"""The station's TLS files: its own CA and the leaf it issues, or the owner's certificate.

By default the station is its own small certificate authority (``stationca.py``):

- ``STATE_DIR/keys/ca.key`` (PKCS#8, 0600) and ``ca.crt``: the root residents install,
  made once, never replaced; its SHA-256 is the fingerprint pairing links carry;
- ``STATE_DIR/keys/tls.key`` (0600) and ``tls.crt`` (the leaf, then the root): what the
  web server presents, re-issued by the station before it expires or when its names
  change (the key stays).

An install from before the CA has a self-signed ``tls.crt``: its key is kept and a leaf
issued by the new CA replaces it (the caller logs it: old pairing links no longer match).

Keys are made only by first boot and the daemon's start (``load_or_create_tls``).

Instead, the owner may name a certificate and key of their own (``[web] tls_cert_file``,
``tls_key_file``, e.g. from ACME): ``load_owner_pair`` reads and checks them.
"""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from intercom.config import WebConfig
from intercom.deploy.stationca import (
    RENEW_DAYS,
    StationNames,
    fingerprint,
    issue_leaf,
    issued_by,
    leaf_names,
    make_ca,
    split_covered,
    station_names,
)
from intercom.errors import ConfigError, IntercomError
from intercom.identity import key_dir, write_secret
from intercom.netaddr import ANY_HOSTS, machine_addresses
from intercom.safefiles import replace_atomically

TLS_KEY = "tls.key"
TLS_CERT = "tls.crt"
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
PEM = serialization.Encoding.PEM
CERT_KEY, KEY_KEY = "web.tls_cert_file", "web.tls_key_file"  # named in every refusal


@dataclass(frozen=True)
class TlsIdentity:
    """The station's root and leaf, where they are, and what this start changed."""

    cert_path: Path  # the leaf, then the root (PEM)
    key_path: Path
    ca_path: Path
    ca: x509.Certificate
    leaf: x509.Certificate
    made: tuple[str, ...] = ()  # what was made or re-issued now, for the log
    uncovered: tuple[str, ...] = ()  # the station's names its root may not vouch for

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the root (DER), lowercase hex: what pairing links carry."""
        return fingerprint(self.ca)

    @property
    def leaf_fingerprint(self) -> str:
        """SHA-256 of the leaf (DER), lowercase hex."""
        return fingerprint(self.leaf)


def machine_name() -> str:
    """The machine's name as a phone resolves it: the FQDN, else ``<hostname>.local``."""
    name = socket.gethostname()
    return name if "." in name else f"{name}.local"


def station_url(web: WebConfig) -> str:
    """The address residents and the installer open (public_url, else this machine)."""
    host = machine_name() if web.host in ANY_HOSTS else web.host  # any address: the name
    return (web.public_url or f"https://{host}:{web.port}/").rstrip("/") + "/"


def names_for(station_id: str, web: WebConfig) -> StationNames:
    """The names the station's certificate should carry with this ``[web]`` config."""
    addresses = machine_addresses() if web.host in ANY_HOSTS else []
    return station_names(station_id, web.host, web.public_url, machine_name(), addresses)


def load_or_create_tls(
    state_dir: Path, station_id: str, names: StationNames, now: dt.datetime | None = None
) -> TlsIdentity:
    """The root and a current leaf for ``names``, making what is missing or due.

    The root is made once, permitting the names of that moment; a leaf is (re-)issued
    when missing, not the root's, within ``RENEW_DAYS`` of expiry, or for other names.
    Names the root may not vouch for are left out of the leaf (``uncovered``).
    """
    now = now or dt.datetime.now(dt.UTC)
    keys = key_dir(state_dir, create=True)
    made: list[str] = []
    ca_key = _ec_key(keys / CA_KEY, made, "CA key made")
    if "CA key made" in made:
        (keys / CA_CERT).unlink(missing_ok=True)  # a root without its key is worthless
    ca_path = keys / CA_CERT
    if not ca_path.exists():
        _write(ca_path, make_ca(ca_key, station_id, names, now).public_bytes(PEM))
        made.append("CA certificate made")
    ca = _read_cert(ca_path)
    if ca.public_key() != ca_key.public_key():
        raise IntercomError(f"CA certificate {ca_path} does not belong to {keys / CA_KEY}")
    key_path, cert_path = keys / TLS_KEY, keys / TLS_CERT
    key = _ec_key(key_path, made, "TLS key made")
    covered, uncovered = split_covered(names, ca)
    reason = _reissue_reason(cert_path, ca, key, covered, now)
    if reason:
        leaf = issue_leaf(ca_key, ca, key.public_key(), covered, now)
        _write(cert_path, leaf.public_bytes(PEM) + ca.public_bytes(PEM))
        made.append(f"certificate issued ({reason}), valid until "
                    f"{leaf.not_valid_after_utc:%Y-%m-%d}")
    leaf = _read_cert(cert_path)
    return TlsIdentity(cert_path, key_path, ca_path, ca, leaf, tuple(made), tuple(uncovered))


def _reissue_reason(  # noqa: PLR0911 - one answer per reason
    path: Path, ca: x509.Certificate, key: ec.EllipticCurvePrivateKey, names: StationNames,
    now: dt.datetime,
) -> str:
    """Why the leaf at ``path`` must be issued anew; empty when it is current."""
    if not path.exists():
        return "none yet"
    try:
        leaf = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return f"{path.name} unreadable"
    if not issued_by(leaf, ca):
        return (f"replaces the self-signed certificate SHA-256 {fingerprint(leaf)}: pairing "
                "links made before carry that fingerprint and no longer match")
    if leaf.public_key() != key.public_key():
        return f"{path.name} was not for {TLS_KEY}"
    if leaf.not_valid_after_utc - now < dt.timedelta(days=RENEW_DAYS):
        return f"the last one expires {leaf.not_valid_after_utc:%Y-%m-%d}"
    if not leaf_names(leaf).same(names):
        return "names changed: " + ", ".join(names.describe())
    return ""


def _ec_key(path: Path, made: list[str], note: str) -> ec.EllipticCurvePrivateKey:
    """The P-256 key at ``path``, made (0600) when there is none; never replaced."""
    if not path.exists():
        new = ec.generate_private_key(ec.SECP256R1())
        write_secret(path, new.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        made.append(note)
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IntercomError(f"TLS key {path} is unreadable or corrupt: {exc}") from exc
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise IntercomError(f"TLS key {path} is not an ECDSA key")
    return loaded


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IntercomError(f"TLS certificate {path} is unreadable: {exc}") from exc


def _write(path: Path, data: bytes) -> None:
    """A certificate file, written whole or not at all."""
    if path.exists():
        replace_atomically(path, data)
    else:
        write_secret(path, data)


# --- the owner's certificate ----------------------------------------------------------------


@dataclass(frozen=True)
class OwnerPair:
    """The owner's certificate chain and key, read and checked."""

    pem: bytes  # the chain as given, then the key: what the web server loads
    leaf: x509.Certificate

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf (DER), lowercase hex: what pairing links carry."""
        return fingerprint(self.leaf)


def load_owner_pair(cert_file: Path, key_file: Path, now: dt.datetime | None = None) -> OwnerPair:
    """Read ``[web] tls_cert_file`` and ``tls_key_file``; ConfigError naming the bad key.

    Refused: a file that cannot be read, no PEM certificate (the leaf first) or no
    unencrypted PEM key, a key that is not the certificate's, a certificate expired or
    not valid yet.
    """
    now = now or dt.datetime.now(dt.UTC)
    chain = _owner_file(CERT_KEY, cert_file)
    key_pem = _owner_file(KEY_KEY, key_file)
    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError:
        certs = []
    if not certs:
        raise _refused(CERT_KEY, f"{cert_file} holds no PEM certificate")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: encrypted, and no password given
        reason = "the key is encrypted" if isinstance(exc, TypeError) else "no PEM private key"
        raise _refused(KEY_KEY, f"{key_file}: {reason} (unencrypted PEM needed)") from None
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise _refused(KEY_KEY, f"{key_file} is not the key of the certificate in "
                       f"{CERT_KEY} ({cert_file}, its first certificate)")
    if leaf.not_valid_after_utc <= now:
        raise _refused(CERT_KEY, f"{cert_file} expired on "
                       f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now + dt.timedelta(minutes=5):
        raise _refused(CERT_KEY, f"{cert_file} is valid only from "
                       f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return OwnerPair(chain.rstrip(b"\n") + b"\n" + key_pem, leaf)


def _owner_file(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _refused(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _refused(key: str, reason: str) -> ConfigError:
    return ConfigError([f"{key}: {reason}"])
