"""The station's Web Push part: the VAPID key, the notifier, the devices' requests.

It plugs into the calls component once that listens: the ring group's ``notifier``, two
signalling messages of a signed-in device (``push-subscribe`` with the browser's
``PushSubscription.toJSON()``, ``push-unsubscribe``), the ``push_key`` in
``/api/info`` (the VAPID public key a browser subscribes with) and ``POST
/api/push/decline``: a service worker declines a ring from its notification without
opening the app, with the device key's signature over
``intercom-decline:<station>:<call>`` (the same key and forms as the signalling
challenge; a call id is random and rings once, so a replay declines nothing new).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from intercom.calls.server import error
from intercom.calls.signalling import b64url_decode, verify_device_signature
from intercom.errors import ConfigError
from intercom.push.notifier import PushNotifier
from intercom.push.vapid import load_vapid_key
from intercom.push.webpush import PushClient, SubscriptionError, parse_subscription
from intercom.security.limits import BucketTable, RefusalLog, source_key
from intercom.security.principals import ID_PATTERN, Role

if TYPE_CHECKING:
    from intercom.calls.component import Calls
    from intercom.calls.signalling import Session
    from intercom.config import Settings
    from intercom.security.registry import Registry

log = logging.getLogger(__name__)

DECLINES_PER_ADDRESS = (1.0, 10.0)  # per second, burst
MAX_TRACKED_ADDRESSES = 1024


def decline_message(station: str, call: str) -> bytes:
    """The bytes a device signs to decline ``call`` from its notification."""
    return f"intercom-decline:{station}:{call}".encode()


def client_context(settings: Settings) -> ssl.SSLContext:
    """The system's CAs, and ``[push] ca_file`` when set (ConfigError when unreadable)."""
    context = ssl.create_default_context()
    ca_file = settings.push.ca_file
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"push.ca_file: cannot load {ca_file}: {exc}"]) from exc
    return context


class Push:
    """Rings devices that are not online, by Web Push (``[push]``)."""

    name = "push"

    def __init__(self, settings: Settings, registry: Registry, calls: Calls) -> None:
        self.settings = settings
        self.config = settings.push
        self._registry = registry
        self._calls = calls
        self.notifier: PushNotifier | None = None
        self._per_address = BucketTable(*DECLINES_PER_ADDRESS, size=MAX_TRACKED_ADDRESSES)
        self._refusals = RefusalLog(log)

    async def start(self) -> None:
        """Load the VAPID key and plug into the calls component (when enabled)."""
        calls = self._calls
        if not self.config.enabled or calls.signalling is None or calls.server is None:
            return
        vapid = load_vapid_key(self.settings.station.state_dir)
        contact = self.config.contact or calls.url
        client = PushClient(vapid, contact, client_context(self.settings))
        self.notifier = PushNotifier(
            self._registry, client, self.config, calls.door,
            self.settings.calls.ring_timeout_s,
        )
        calls.ring_group.notifier = self.notifier
        calls.signalling.handlers["push-subscribe"] = self._subscribe
        calls.signalling.handlers["push-unsubscribe"] = self._unsubscribe
        calls.server.push_handler = self._http
        calls.server.info["push_key"] = vapid.application_server_key

    async def stop(self) -> None:
        """Unplug and let the pushes in flight finish."""
        calls = self._calls
        calls.ring_group.notifier = None
        if calls.signalling is not None:
            calls.signalling.handlers.pop("push-subscribe", None)
            calls.signalling.handlers.pop("push-unsubscribe", None)
        if calls.server is not None:
            calls.server.push_handler = None
        if self.notifier is not None:
            await self.notifier.close()
            self.notifier = None

    def status(self) -> dict[str, Any]:
        """Push counts for ``intercom status``."""
        if self.notifier is None:
            return {"push": {"enabled": False}}
        return {"push": {"enabled": True, **self.notifier.status()}}

    # --- a signed-in device's messages ----------------------------------------------------

    async def _subscribe(self, session: Session, data: dict[str, Any]) -> None:
        try:
            subscription = parse_subscription(data.get("subscription"), self.config.allowed_hosts)
        except SubscriptionError as exc:
            log.warning("push: session %s sent an unusable subscription: %s", session.id, exc)
            session.send({"type": "push", "subscribed": False, "error": str(exc)})
            return
        await self._registry.set_push(session.principal, subscription.to_json())
        log.info("push: session %s subscribed", session.id)
        session.send({"type": "push", "subscribed": True})

    async def _unsubscribe(self, session: Session, _data: dict[str, Any]) -> None:
        await self._registry.drop_push(session.principal)
        log.info("push: session %s unsubscribed", session.id)
        session.send({"type": "push", "subscribed": False})

    # --- HTTP: a decline from a notification ------------------------------------------------

    async def _http(self, request: web.Request) -> web.StreamResponse:
        if request.match_info.get("action") != "decline" or request.method != "POST":
            return error(404, "not found")
        address = source_key(request.remote)
        if not self._per_address.take(address, time.monotonic()):
            self._refusals.refused(time.monotonic(), "push: decline refused, rate (%s)", address)
            return error(429, "too many requests; wait a minute")
        try:
            pid, call, signature = parse_decline(await request.read())
        except ValueError as exc:
            return error(400, str(exc))
        principal = self._registry.get(pid)
        message = decline_message(self._calls.station_id, call)
        if (
            principal is None
            or principal.role is not Role.RESIDENT
            or not self._registry.is_active(pid)
            or not verify_device_signature(principal, message, signature)
        ):
            self._refusals.refused(time.monotonic(), "push: decline refused, %s (%s)",
                                   "bad signature or principal", address)
            return error(403, "not allowed")
        declined = self._calls.ring_group.decline_remote(pid, call)
        return web.json_response({"declined": declined}, headers={"Cache-Control": "no-store"})


def parse_decline(raw: bytes) -> tuple[str, str, bytes]:
    """Principal, call id and signature of a decline's body; ValueError naming the fault."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError("body must be JSON") from exc
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")  # noqa: TRY004 - a 400, not a bug
    pid, call, signature = body.get("principal"), body.get("call"), body.get("signature")
    if not isinstance(pid, str) or not ID_PATTERN.match(pid):
        raise ValueError("principal must be a principal id")
    if not isinstance(call, str) or not call or len(call) > 64:
        raise ValueError("call must be a call id")
    if not isinstance(signature, str) or len(signature) > 200:
        raise ValueError("signature must be base64url")
    return pid, call, b64url_decode(signature)  # ValueError: "malformed base64url"
