"""One Web Push request: a subscription checked, a payload encrypted, a POST sent.

A subscription comes from a resident's browser (``PushSubscription.toJSON()``): the
push service's endpoint and the browser's keys. It is hostile until checked: the
endpoint must be ``https`` on a host of ``[push] allowed_hosts`` (the well-known push
services; otherwise a paired device could make the station POST to any address it
names), the keys a P-256 point and a 16-byte secret.

The payload is encrypted for the browser alone (RFC 8291, ``aes128gcm``, by the
``http_ece`` library, with a fresh sender key per message), so the push service learns
the time, the size and the ``Topic`` and nothing more. The request carries ``TTL`` (a
ring is worthless after the ring time), ``Urgency: high`` and a ``Topic`` per door: a
newer message with the same topic replaces an undelivered older one (RFC 8030 5.4), so
a phone that was offline gets the "call over" message instead of a stale ring.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import http_ece  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ec

from intercom.push.vapid import VapidKey

MAX_ENDPOINT = 1024
RECORD_SIZE = 4096
TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
GONE = frozenset({404, 410})  # the subscription no longer exists (RFC 8030 7.3)
REQUEST_TIMEOUT_S = 10.0


class SubscriptionError(ValueError):
    """A subscription a device sent is unusable; the message names what is wrong."""


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > 200:
        raise SubscriptionError(f"{what} must be a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SubscriptionError(f"{what} is not base64url") from exc


@dataclass(frozen=True)
class Subscription:
    """Where to push and the browser's keys (``p256dh``: its ECDH key, ``auth``: secret)."""

    endpoint: str
    p256dh: bytes
    auth: bytes

    def to_json(self) -> dict[str, Any]:
        """The form kept in the database (as the browser gave it)."""
        return {
            "endpoint": self.endpoint,
            "keys": {
                "p256dh": base64.urlsafe_b64encode(self.p256dh).rstrip(b"=").decode(),
                "auth": base64.urlsafe_b64encode(self.auth).rstrip(b"=").decode(),
            },
        }


def parse_subscription(data: Any, allowed_hosts: list[str]) -> Subscription:
    """A checked subscription from ``PushSubscription.toJSON()``; SubscriptionError if bad."""
    if not isinstance(data, dict):
        raise SubscriptionError("subscription must be an object")
    endpoint = data.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint or len(endpoint) > MAX_ENDPOINT:
        raise SubscriptionError("endpoint must be a URL of at most 1024 characters")
    try:
        parts = urlsplit(endpoint)
        host = parts.hostname or ""
        _ = parts.port  # ValueError when malformed
    except ValueError as exc:
        raise SubscriptionError("endpoint is not a URL") from exc
    if parts.scheme != "https" or not host or parts.username or parts.password:
        raise SubscriptionError("endpoint must be an https URL without credentials")
    if not any(fnmatch.fnmatchcase(host.lower(), pattern) for pattern in allowed_hosts):
        raise SubscriptionError(f"push service {host} is not in [push] allowed_hosts")
    keys = data.get("keys")
    if not isinstance(keys, dict):
        raise SubscriptionError("keys must be an object with p256dh and auth")
    p256dh = _b64(keys.get("p256dh"), "keys.p256dh")
    auth = _b64(keys.get("auth"), "keys.auth")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    except ValueError as exc:
        raise SubscriptionError("keys.p256dh is not a P-256 public key") from exc
    if len(p256dh) != 65:
        raise SubscriptionError("keys.p256dh must be an uncompressed P-256 point")
    if len(auth) != 16:
        raise SubscriptionError("keys.auth must be 16 bytes")
    return Subscription(endpoint, p256dh, auth)


def encrypt(payload: bytes, subscription: Subscription) -> bytes:
    """The ``aes128gcm`` body for ``subscription`` (RFC 8291), with a fresh sender key."""
    sender = ec.generate_private_key(ec.SECP256R1())
    body: bytes = http_ece.encrypt(
        payload,
        private_key=sender,
        dh=subscription.p256dh,
        auth_secret=subscription.auth,
        version="aes128gcm",
        rs=RECORD_SIZE,
    )
    return body


@dataclass(frozen=True)
class Outcome:
    """What the push service answered: its status, or the error met on the way."""

    status: int | None
    error: str = ""

    @property
    def delivered(self) -> bool:
        """Accepted by the push service (201, or any 2xx)."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        """The subscription is dead: drop it."""
        return self.status in GONE


class PushClient:
    """Sends Web Push requests with one aiohttp session; never blocks the loop."""

    def __init__(
        self,
        vapid: VapidKey,
        contact: str,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.vapid = vapid
        self.contact = contact
        self._ssl = ssl_context
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        subscription: Subscription,
        message: dict[str, Any],
        *,
        ttl_s: int,
        topic: str,
        urgency: str = "high",
    ) -> Outcome:
        """Encrypt ``message`` (JSON) for the subscription and POST it to its endpoint."""
        if not TOPIC.match(topic):
            raise ValueError(f"topic {topic!r}: at most 32 base64url characters")
        body = encrypt(json.dumps(message, separators=(",", ":")).encode(), subscription)
        headers = {
            "Authorization": self.vapid.authorization(
                subscription.endpoint, self.contact, self._clock()
            ),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "TTL": str(ttl_s),
            "Urgency": urgency,
            "Topic": topic,
        }
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
            )
        try:
            async with self._session.post(
                subscription.endpoint, data=body, headers=headers, allow_redirects=False
            ) as response:
                await response.read()
                return Outcome(response.status)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return Outcome(None, type(exc).__name__)
