"""The station's root for residents to install: ``/ca.crt`` and an iOS ``/ca.mobileconfig``.

Both hold the same DER certificate whose SHA-256 the pairing link carries; ``trust.html``
shows that fingerprint, computed from the very bytes offered, and each platform's steps.
With the owner's certificate there is nothing to install: both answer 404.
"""

from __future__ import annotations

import plistlib
import uuid
from collections.abc import Callable

from aiohttp import web

CA_CONTENT_TYPE = "application/x-x509-ca-cert"
PROFILE_CONTENT_TYPE = "application/x-apple-aspen-config"
NAMESPACE = uuid.UUID("6f1c7a44-0b7e-4d7c-9a55-2f3b8d1e6a10")  # this project's profiles


def mobileconfig(station: str, ca_der: bytes, fingerprint: str) -> bytes:
    """An unsigned configuration profile with one ``com.apple.security.root`` payload.

    Its identifiers and UUIDs derive from the root's fingerprint, so the same root gives
    the same profile (iOS replaces it rather than listing it twice).
    """
    ident = f"org.intercom.station.{station}.ca"
    payload = {
        "PayloadType": "com.apple.security.root",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.root",
        "PayloadUUID": str(uuid.uuid5(NAMESPACE, f"root:{fingerprint}")).upper(),
        "PayloadDisplayName": f"{station} door station CA",
        "PayloadCertificateFileName": f"{station}-ca.cer",
        "PayloadContent": ca_der,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": ident,
        "PayloadUUID": str(uuid.uuid5(NAMESPACE, f"profile:{fingerprint}")).upper(),
        "PayloadDisplayName": f"Door station {station}",
        "PayloadDescription": (
            f"The certificate authority of door station {station}. It can vouch only for "
            f"this station's own names. SHA-256 {fingerprint.upper()}"
        ),
        "PayloadOrganization": "intercom door station",
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [payload],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)


class TrustFiles:
    """The handlers of ``/ca.crt`` and ``/ca.mobileconfig``, reading the live root."""

    def __init__(self, station: str, root: Callable[[], tuple[bytes | None, str]]) -> None:
        self._station = station
        self._root = root  # (the root's DER or None with the owner's certificate, fingerprint)

    async def certificate(self, _request: web.Request) -> web.StreamResponse:
        """The root as DER, to download and install."""
        der, _fingerprint = self._root()
        if der is None:
            raise web.HTTPNotFound(reason="this station presents its owner's certificate")
        return web.Response(body=der, headers=self._headers(CA_CONTENT_TYPE, "crt"))

    async def profile(self, _request: web.Request) -> web.StreamResponse:
        """The root as an iOS configuration profile."""
        der, fingerprint = self._root()
        if der is None:
            raise web.HTTPNotFound(reason="this station presents its owner's certificate")
        body = mobileconfig(self._station, der, fingerprint)
        return web.Response(body=body, headers=self._headers(PROFILE_CONTENT_TYPE, "mobileconfig"))

    def _headers(self, content_type: str, extension: str) -> dict[str, str]:
        name = f"{self._station}-ca.{extension}"
        return {
            "Content-Type": content_type,
            "Content-Disposition": f'attachment; filename="{name}"',
            "Cache-Control": "no-cache",
        }
