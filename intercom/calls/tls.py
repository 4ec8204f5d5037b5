"""The web server's TLS: the station's own certificate and the fingerprint clients pin."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from intercom.deploy.tlscert import load_or_create_tls


@dataclass(frozen=True)
class StationCert:
    """The certificate files and the SHA-256 fingerprint of the DER certificate."""

    cert_path: Path
    key_path: Path
    fingerprint: str  # lowercase hex, no separators (64 characters)

    def server_context(self) -> ssl.SSLContext:
        """A TLS 1.2+ server context with the station's certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def load_station_cert(state_dir: Path, station_id: str) -> StationCert:
    """The station's certificate, made on first start (ECDSA P-256, self-signed)."""
    identity, _created = load_or_create_tls(state_dir, station_id)
    fingerprint = identity.fingerprint.replace(":", "").lower()
    return StationCert(identity.cert_path, identity.key_path, fingerprint)
