"""A Web Push service stand-in on loopback (RFC 8030), and the browser's side of RFC 8291.

The station encrypts with the ``http_ece`` library and signs its VAPID JWT with
``joserfc``; everything here is written anew from the RFCs with ``cryptography``'s
primitives, so that a fault in either library, or in how the station uses it, shows as
a push this stand-in rejects or cannot decrypt. ``decrypt`` is checked against the
worked example of RFC 8291 (Appendix A) in tests/test_push.py.

The stand-in checks each request as a push service does (``Authorization: vapid``
with aud, exp at most 24 h ahead and sub; ``TTL``; ``Content-Encoding: aes128gcm``)
and records it with the time it arrived. ``gone`` (``not_found``) makes it answer 410
Gone (404 Not Found) for an endpoint once, as for a subscription the browser dropped.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC

STATION_CONFIG = """
[station]
id = "{station}"

[[hardware.buttons]]
name = "bell"
pin = 17
flat = "1"

[hardware.relay]
pin = 27
door = "front"

[web]
host = "127.0.0.1"
port = 0

[calls]
ring_timeout_s = {ring_timeout_s}

[push]
allowed_hosts = ["127.0.0.1"]
ca_file = "{ca}"
contact = "mailto:building@example.org"
"""


def station_config(ca: Path, station: str = "door-push", ring_timeout_s: float = 20) -> str:
    """A simulated station's config (flat 1, door front) pushing to the stand-in."""
    return STATION_CONFIG.format(station=station, ca=ca, ring_timeout_s=ring_timeout_s)


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with SHA-256, for one block (every length here is at most 32)."""
    prk = _hmac(salt, ikm)
    return _hmac(prk, info + b"\x01")[:length]


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


@dataclass
class Browser:
    """A browser's push subscription keys: its ECDH key pair and auth secret."""

    endpoint: str
    private_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    def subscription(self) -> dict[str, Any]:
        """What ``PushSubscription.toJSON()`` gives."""
        return {
            "endpoint": self.endpoint,
            "expirationTime": None,
            "keys": {"p256dh": b64e(_point(self.private_key.public_key())),
                     "auth": b64e(self.auth)},
        }

    def decrypt(self, body: bytes) -> bytes:
        return decrypt(body, self.private_key, self.auth)


def decrypt(body: bytes, ua_private: ec.EllipticCurvePrivateKey, auth: bytes) -> bytes:
    """RFC 8291 section 3 and RFC 8188: the plaintext of an ``aes128gcm`` push body."""
    salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
    as_public_bytes = body[21:21 + idlen]
    records = body[21 + idlen:]
    assert idlen == 65, "the keyid must be the sender's public key"
    assert len(records) <= rs, "one record expected"
    as_public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), as_public_bytes)
    shared = ua_private.exchange(ec.ECDH(), as_public)
    key_info = b"WebPush: info\x00" + _point(ua_private.public_key()) + as_public_bytes
    ikm = _hkdf(auth, shared, key_info, 32)
    cek = _hkdf(salt, ikm, b"Content-Encoding: aes128gcm\x00", 16)
    nonce = _hkdf(salt, ikm, b"Content-Encoding: nonce\x00", 12)
    padded = AESGCM(cek).decrypt(nonce, records, None)  # record 0: the nonce as it is
    text = padded.rstrip(b"\x00")
    assert text.endswith(b"\x02"), "the last record's delimiter is 2"
    return text[:-1]


def check_vapid(header: str, audience: str, now: float) -> dict[str, Any]:
    """RFC 8292: verify ``vapid t=JWT, k=KEY``; the JWT's claims, or AssertionError."""
    assert header.startswith("vapid "), header[:20]
    params = dict(part.strip().split("=", 1) for part in header[6:].split(","))
    token, key = params["t"], b64d(params["k"])
    head_b64, claims_b64, signature_b64 = token.split(".")
    head = json.loads(b64d(head_b64))
    assert head["alg"] == "ES256", head
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key)
    signature = b64d(signature_b64)
    assert len(signature) == 64
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                               int.from_bytes(signature[32:], "big"))
    public.verify(der, f"{head_b64}.{claims_b64}".encode(), ec.ECDSA(hashes.SHA256()))
    claims: dict[str, Any] = json.loads(b64d(claims_b64))
    assert claims["aud"] == audience, claims
    assert now < claims["exp"] <= now + 24 * 3600, claims
    assert str(claims["sub"]).startswith(("mailto:", "https://")), claims
    claims["k"] = params["k"]
    return claims


@dataclass
class Push:
    """One request the stand-in accepted."""

    endpoint: str
    arrived: float  # time.time() when the request arrived
    headers: dict[str, str]
    body: bytes
    claims: dict[str, Any]


class PushService:
    """An aiohttp server on 127.0.0.1 with TLS, speaking RFC 8030 to the station."""

    def __init__(self, cert: Path, key: Path) -> None:
        self._cert, self._key = cert, key
        self.pushes: list[Push] = []
        self.refused: list[str] = []
        self.gone: set[str] = set()  # endpoints answered 410 once
        self.not_found: set[str] = set()  # endpoints answered 404 once
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def endpoint(self) -> str:
        return f"{self.origin}/push/{secrets.token_urlsafe(16)}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/push/{id}", self._push)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self._cert, self._key)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _push(self, request: web.Request) -> web.Response:
        arrived = time.time()
        endpoint = f"{self.origin}{request.path}"
        try:
            claims = check_vapid(request.headers.get("Authorization", ""), self.origin, arrived)
            assert request.headers.get("Content-Encoding") == "aes128gcm"
            assert request.headers.get("TTL", "").isdigit(), "TTL is required (RFC 8030 5.2)"
        except (AssertionError, KeyError, ValueError, Exception) as exc:  # noqa: BLE001
            self.refused.append(f"{type(exc).__name__}: {exc}")
            return web.Response(status=400, text="bad push request")
        if endpoint in self.gone:
            self.gone.discard(endpoint)
            return web.Response(status=410, text="subscription gone")
        if endpoint in self.not_found:
            self.not_found.discard(endpoint)
            return web.Response(status=404, text="no such subscription")
        self.pushes.append(Push(endpoint, arrived, dict(request.headers), await request.read(),
                                claims))
        return web.Response(status=201, headers={"Location": f"{endpoint}/m/{len(self.pushes)}"})
