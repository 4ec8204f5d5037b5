"""The installer console's HTTPS API (``/api/console/<action>`` on the calls' server).

Every request is hostile until verified: it must carry ``Authorization: Intercom <JWS>``,
a console request token signed by the device key of an installer (time-boxed) or admin
and bound to this request's method, path and body hash, used once and short-lived,
checked by the one verifier (``Verifier.check_request``). Anything else is 401 with
one short reason; refusals are logged, rate-limited.

Actions (JSON in, JSON out):

- ``GET state``: the station, its wiring and zones (as the config file says), the door
  and lock, the latest self-test, who is asking;
- ``GET preview``: one still frame as every output gets it (zones masked), JPEG base64;
- ``POST live`` ``{"sdp": <offer>}``: the live picture, a session of the redacted live
  view (``calls/whep.py``: zones masked, faces blurred; logged as ``LiveViewStarted``
  with ``via = console``; ends at the hand-off): ``{"sdp": <answer>, "session"}``;
  ``POST live-end`` ``{"session"}`` ends it;
- ``POST config`` ``{"changes": {key: value}}``: to the one config writer with the
  principal as actor; 422 with each refused key and reason;
- ``POST relay-test`` ``{"token": <unlock JWS>}``: the installer's own signed unlock
  (TOTP included) to the verifier (via ``console``, bound to this signer), then the door
  contact's confirmation;
- ``POST selftest``: run the self-test and answer it;
- ``POST sheets``: a PDF with one page per flat, each with a fresh pairing code valid
  for two weeks (its QR code, the fingerprint, short instructions); logged;
- ``POST mqtt-test`` ``{"mqtt": {key: value}}``: one connection to the broker with
  the file's ``[mqtt]`` and these keys over it (TLS, ``password_file``; never a typed
  password): connected, or what went wrong;
- ``GET audio-level``: the microphone's level over 200 ms (polled by the page's meter);
- ``POST tone``: one second of a 1 kHz test tone on the speaker;
- ``POST handoff`` ``{"checklist": {...}}``: logged, and the installer's access ends.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from intercom.calls.whep import ViewRefusedError
from intercom.console.sheets import Sheet, pairing_sheets_pdf
from intercom.errors import IntercomError
from intercom.events import Event, EventBus, PrivilegedAction
from intercom.security.limits import RefusalLog
from intercom.security.verifier import Context, Decision

log = logging.getLogger(__name__)

SCHEME = "Intercom "
MAX_BODY = 16 * 1024
DOOR_WAIT_S = 3.0  # after the pulse, how long the door contact may take to say "open"
CHECKLIST = ("zones", "buttons", "relay", "clock", "sheets")


@dataclass
class ConsolePorts:
    """What the console may use, each handed by the station (none is the station)."""

    check_request: Callable[[str, str, str, str], Decision]
    submit: Callable[[str, Context], Awaitable[Decision]]
    change_config: Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]
    state: Callable[[], dict[str, Any]]
    preview: Callable[[], Awaitable[dict[str, Any]]]
    selftest: Callable[[], Awaitable[dict[str, Any]]]
    end_installer: Callable[[str], Awaitable[bool]]
    role_of: Callable[[str], str | None]
    sheets: Callable[[], Awaitable[list[Sheet]]]
    mqtt_test: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
    audio_level: Callable[[], Awaitable[dict[str, Any]]]
    tone: Callable[[], Awaitable[dict[str, Any]]]
    live: Callable[[str, str], Awaitable[dict[str, Any]]]
    live_end: Callable[[str, str], Awaitable[bool]]
    pulse_s: float
    door_contact: bool


class Refused(Exception):  # noqa: N818 - an answer, not a fault
    """A request answered with ``status`` and a short reason."""

    def __init__(self, status: int, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status, self.reason, self.extra = status, reason, extra


class Console:
    """Answers ``/api/console/<action>`` for verified installers and admins."""

    def __init__(self, ports: ConsolePorts, bus: EventBus,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ports = ports
        self._bus = bus
        self._clock = clock
        self._refusals = RefusalLog(log)
        self._actions: dict[tuple[str, str], Callable[[str, dict[str, Any]],
                                                      Awaitable[dict[str, Any]]]] = {
            ("GET", "state"): self._state,
            ("GET", "preview"): self._preview,
            ("POST", "config"): self._config,
            ("POST", "relay-test"): self._relay_test,
            ("POST", "selftest"): self._selftest,
            ("POST", "handoff"): self._handoff,
            ("POST", "sheets"): self._sheets,
            ("POST", "mqtt-test"): self._mqtt_test,
            ("GET", "audio-level"): self._audio_level,
            ("POST", "tone"): self._tone,
            ("POST", "live"): self._live,
            ("POST", "live-end"): self._live_end,
        }

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Verify the request, then answer its action."""
        action = request.match_info.get("action", "")
        handler = self._actions.get((request.method, action))
        if handler is None:
            return _answer(404, {"error": "no such console action"})
        try:
            body = await request.read()
            principal = self._verify(request, body)
            data = _json_body(body) if request.method == "POST" else {}
            result = await handler(principal, data)
        except Refused as exc:
            return _answer(exc.status, {"error": exc.reason, **exc.extra})
        except web.HTTPRequestEntityTooLarge:
            return _answer(413, {"error": "request too large"})
        return _answer(200, result)

    def _verify(self, request: web.Request, body: bytes) -> str:
        header = request.headers.get("Authorization", "")
        if not header.startswith(SCHEME):
            self._refused(request, "no console token")
            raise Refused(401, "not authorised")
        digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        decision = self._ports.check_request(header[len(SCHEME):], request.method,
                                             request.path, digest)
        if not decision.granted or decision.principal is None:
            self._refused(request, decision.reason)
            raise Refused(401, "not authorised")
        return decision.principal

    def _refused(self, request: web.Request, reason: str) -> None:
        self._refusals.refused(self._clock(), "console: %s %s refused: %s", request.method,
                               request.path, reason)

    # --- actions ---------------------------------------------------------------------

    async def _state(self, principal: str, _data: dict[str, Any]) -> dict[str, Any]:
        return {**self._ports.state(), "principal": principal,
                "role": self._ports.role_of(principal)}

    async def _preview(self, _principal: str, _data: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._ports.preview()
        except (IntercomError, TimeoutError) as exc:
            raise Refused(503, f"no picture: {exc}") from exc

    async def _config(self, principal: str, data: dict[str, Any]) -> dict[str, Any]:
        changes = data.get("changes")
        if not isinstance(changes, dict):
            raise Refused(400, "changes must be an object of key paths and values")
        answer = await self._ports.change_config(changes, principal)
        if not answer.get("ok"):
            raise Refused(422, str(answer.get("error", "refused")),
                          refused=answer.get("refused", []))
        return answer

    async def _relay_test(self, principal: str, data: dict[str, Any]) -> dict[str, Any]:
        token = data.get("token")
        if not isinstance(token, str):
            raise Refused(400, "token must be a signed unlock command")
        opened = asyncio.Event()

        def watch(event: Event) -> None:
            if event.type == "DoorOpened":
                opened.set()

        unsubscribe = self._bus.on(watch)
        try:
            # The installer's own signed unlock, through the one verifier (which alone
            # holds the lock); only this principal may have signed it.
            decision = await self._ports.submit(token, Context("console", signer=principal))
            if not decision.granted:
                return {"result": "denied", "door": None}
            if not self._ports.door_contact:
                return {"result": "granted", "door": "no contact wired"}
            try:
                await asyncio.wait_for(opened.wait(), self._ports.pulse_s + DOOR_WAIT_S)
            except TimeoutError:
                return {"result": "granted", "door": "not opened"}
            return {"result": "granted", "door": "opened"}
        finally:
            unsubscribe()

    async def _selftest(self, _principal: str, _data: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._ports.selftest()
        except IntercomError as exc:
            raise Refused(409, str(exc)) from exc

    async def _sheets(self, principal: str, _data: dict[str, Any]) -> dict[str, Any]:
        """One printable page per flat with a fresh long-lived pairing code (PDF)."""
        try:
            sheets = await self._ports.sheets()
        except IntercomError as exc:
            raise Refused(409, str(exc)) from exc
        pdf = await asyncio.to_thread(pairing_sheets_pdf, sheets)
        self._bus.publish(PrivilegedAction(
            actor=principal, action="pairing-sheets",
            detail=f"{len(sheets)} flat(s), codes valid until "
                   f"{max((s.expires_at for s in sheets), default=0):.0f}"))
        return {"pdf": base64.b64encode(pdf).decode(), "flats": [s.flat for s in sheets]}

    async def _mqtt_test(self, _principal: str, data: dict[str, Any]) -> dict[str, Any]:
        """One connection to the broker with the [mqtt] settings given (else the file's)."""
        given = data.get("mqtt", {})
        if not isinstance(given, dict):
            raise Refused(400, "mqtt must be an object of [mqtt] keys")
        answer = await self._ports.mqtt_test(given)
        if "refused" in answer:
            raise Refused(422, "not a usable [mqtt] config", refused=answer["refused"])
        return answer

    async def _live(self, principal: str, data: dict[str, Any]) -> dict[str, Any]:
        """The live picture: the redacted live view's answer to the page's offer."""
        offer = data.get("sdp")
        if not isinstance(offer, str) or not offer:
            raise Refused(400, "sdp must be the offer's text")
        try:
            return await self._ports.live(principal, offer)
        except ViewRefusedError as exc:
            raise Refused(exc.status, exc.reason) from exc

    async def _live_end(self, principal: str, data: dict[str, Any]) -> dict[str, Any]:
        session = data.get("session")
        if not isinstance(session, str):
            raise Refused(400, "session must be the live picture's id")
        return {"ended": await self._ports.live_end(principal, session)}

    async def _audio_level(self, _principal: str, _data: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._ports.audio_level()
        except (IntercomError, TimeoutError) as exc:
            raise Refused(409, str(exc) or "no audio from the microphone") from exc

    async def _tone(self, _principal: str, _data: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._ports.tone()
        except IntercomError as exc:
            raise Refused(409, str(exc)) from exc

    async def _handoff(self, principal: str, data: dict[str, Any]) -> dict[str, Any]:
        if self._ports.role_of(principal) != "installer":
            raise Refused(409, "only an installer's access ends at hand-off")
        checklist = data.get("checklist")
        if not isinstance(checklist, dict):
            checklist = {}
        done = [item for item in CHECKLIST if checklist.get(item) is True]
        missing = [item for item in CHECKLIST if item not in done]
        self._bus.publish(PrivilegedAction(
            actor=principal, action="installer-handoff", target=principal,
            detail=f"checklist done: {', '.join(done) or 'none'}; "
                   f"not done: {', '.join(missing) or 'none'}"))
        ended = await self._ports.end_installer(principal)
        log.info("console: installer hand-off, access ended")
        return {"ended": ended, "done": done, "missing": missing}


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError) as exc:
        raise Refused(400, "body must be JSON") from exc
    if not isinstance(data, dict):
        raise Refused(400, "body must be a JSON object")
    return data


def _answer(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})
