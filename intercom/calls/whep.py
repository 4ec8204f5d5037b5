"""The managers' redacted live view over WHEP (RFC 9725), at ``/whep`` on the HTTPS server.

Off unless ``[whep] enabled``. A viewer POSTs an SDP offer (``application/sdp``) with
``Authorization: Bearer <JWS>``, a manager's bearer of scope ``whep`` (``intercom
sign-bearer --scope whep``), checked by the one verifier (``Verifier.check_bearer``) with
the lifetime ``[whep] max_bearer_hours`` allows. Anything else is refused and logged
(never the token): 401 without a valid token, 403 when the token is authentic but its
signer is no manager or no longer active, 503 beyond ``max_viewers``. The answer (201
Created) is the station's SDP after ICE gathering (no trickle: PATCH is 405) and a
``Location`` with the session's own unguessable URL; DELETE on it ends the session.

A session ends when the viewer deletes it, its connection fails or never comes up,
its bearer expires, its signer is revoked, erased or expires (the registry's ``watch``:
at once), or the station stops. Each session is logged as ``LiveViewStarted`` and
``LiveViewEnded`` (who, from when, until when) and listed in ``intercom status``.

The installer console's live picture is a session of this same view (``console_view``):
the console verified the request (an installer or admin, its signed request token), the
session is logged with ``via = console``, counts towards ``max_viewers``, lasts at most
``CONSOLE_VIEW_S`` and ends like any other when its principal is revoked (the hand-off)
or expires. It works with ``[whep] enabled = false`` too: only the public ``/whep``
endpoint is off then, and the face model is loaded at the first console view.

The video is ``intercom.privacy.live.RedactedTrack``: faces pixelated, zones masked, one
redaction per frame for every viewer, one encoder per viewer (aiortc's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaRelay

from intercom.calls.peer import without_mdns
from intercom.config import WhepConfig
from intercom.events import EventBus, LiveViewEnded, LiveViewStarted
from intercom.privacy.live import RedactedTrack
from intercom.privacy.zones import ZoneMasks
from intercom.security.limits import RefusalLog, source_key
from intercom.security.verifier import Decision

log = logging.getLogger(__name__)

SCOPE = "whep"
SDP = "application/sdp"
PATH = "/whep"
SESSIONS = "/whep/sessions/"
CONNECT_TIMEOUT_S = 20.0  # a session whose connection is not up by then is ended
CONSOLE_VIEW_S = 1800.0  # an installer's live picture: at most half an hour, then again
MAX_OFFER = 64 * 1024  # an SDP offer is a few KiB
HOUSEKEEPING_S = 1.0  # bearer and principal expiries are noticed this often
CHALLENGE = 'Bearer realm="intercom"'
MEDIA_LINE = re.compile(r"^m=(\w+) ", re.MULTILINE)

CheckBearer = Callable[[str, str, float | None], Decision]


class ViewRefusedError(Exception):
    """A viewing session refused: the HTTP status and the reason (for the log)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class ViewSession:
    """One viewer: its peer connection and who it is."""

    view: str  # the public name, in events and status
    secret: str  # the session URL's last segment: whoever holds it may end the session
    principal: str
    started_at: float
    expires_at: float
    pc: RTCPeerConnection
    track: MediaStreamTrack
    opened: float  # monotonic
    via: str = "whep"  # or "console": the installer console's live picture
    connected: bool = False
    ended: bool = field(default=False)


@dataclass(frozen=True)
class Camera:
    """What the live view reads: a gate on the shared camera, and how to redact it."""

    gate: Callable[[], MediaStreamTrack]  # an open gate on the calls' shared camera
    masks: Callable[[], ZoneMasks]  # the zones as they are now
    redactor: Callable[[], Any]  # the live face redactor (loaded at start: fail closed)
    keyframe: Callable[[], None] = lambda: None  # ask an H.264 camera for an IDR


class LiveView:
    """Component ``whep``: the WHEP endpoint and its viewing sessions."""

    name = "whep"

    def __init__(
        self,
        config: WhepConfig,
        camera: Camera,
        check_bearer: CheckBearer,
        signer_refusal: Callable[[str], str | None],
        watch: Callable[[Callable[[str], None]], Callable[[], None]],
        bus: EventBus,
        ice_servers: Callable[[], list[RTCIceServer]],
        relay_only: bool = False,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._camera = camera
        self._check = check_bearer
        self._signer_refusal = signer_refusal  # the registry's view of a principal now
        self._watch = watch
        self._bus = bus
        self._ice_servers = ice_servers
        # web.ice_policy = "relay": the station's end offers only its TURN relay, as to residents
        self._policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        self._clock = clock
        self._monotonic = monotonic
        self._refusals = RefusalLog(log)
        self.sessions: dict[str, ViewSession] = {}  # by secret
        self._pending = 0  # offers being answered (slots taken)
        self._redactor: Any = None
        self._feed: RedactedTrack | None = None
        self._relay: MediaRelay | None = None
        self._unwatch: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.started = 0  # sessions started since the station started

    # --- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the face model now when ``/whep`` is on; for the console, at its first view.

        A station that cannot redact refuses to start with ``[whep] enabled``.
        """
        if self.config.enabled:
            self._redactor = await asyncio.to_thread(self._camera.redactor)
        self._unwatch = self._watch(self._principal_changed)
        self._task = asyncio.create_task(self._housekeeping(), name="whep-housekeeping")

    async def stop(self) -> None:
        """End every session (logged), stop reading the camera."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for session in list(self.sessions.values()):
            await self._end(session, "station stopping")

    def status(self) -> dict[str, Any]:
        """The current viewing sessions, for ``intercom status`` (the local owner).

        Nothing while ``/whep`` is off and the console never watched.
        """
        if not self.config.enabled and not self.started:
            return {}
        return {
            "whep": {
                "max_viewers": self.config.max_viewers,
                "viewers": len(self.sessions),
                "sessions_started": self.started,
                "frames_redacted": self._feed.frames if self._feed is not None else 0,
                "sessions": [
                    {"view": s.view, "principal": s.principal, "via": s.via,
                     "since": s.started_at, "bearer_expires": s.expires_at,
                     "connected": s.connected}
                    for s in self.sessions.values()
                ],
            }
        }

    # --- HTTP -------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``/whep`` and ``/whep/sessions/{id}``, every method."""
        if request.path == PATH:
            if request.method == "POST":
                return await self._offer(request)
            if request.method == "OPTIONS":
                return web.Response(status=204, headers={"Accept-Post": SDP,
                                                         "Allow": "OPTIONS, POST"})
            return _error(405, "use POST with an SDP offer", {"Allow": "OPTIONS, POST"})
        secret = request.path.removeprefix(SESSIONS)
        session = self.sessions.get(secret) if request.path.startswith(SESSIONS) else None
        if session is None:
            return _error(404, "no such session")
        if request.method == "DELETE":
            await self._end(session, "ended by the viewer")
            return web.Response(status=200)
        return _error(405, "only DELETE ends a session (no trickle ICE)", {"Allow": "DELETE"})

    async def _offer(self, request: web.Request) -> web.StreamResponse:
        token = self._token(request)
        if not token:
            return self._refuse(request, 401, "no bearer token", CHALLENGE)
        limit = self.config.max_bearer_hours * 3600
        decision = self._check(token, SCOPE, limit)
        if not decision.granted or decision.principal is None:
            status = 403 if decision.forbidden else 401
            error = "insufficient_scope" if status == 403 else "invalid_token"
            challenge = f'{CHALLENGE}, error="{error}"'
            return self._refuse(request, status, decision.reason, challenge)
        try:
            offer = await _read_offer(request)
            session = await self._open(offer, str(decision.principal),
                                       float(decision.expires_at or self._clock()), "whep")
        except ViewRefusedError as exc:
            refused = self._refuse(request, exc.status, exc.reason)
            if exc.status == 503:
                return _error(503, "too many viewers", {"Retry-After": "10"})
            return refused
        return web.Response(
            status=201, text=session.pc.localDescription.sdp, content_type=SDP,
            headers={"Location": SESSIONS + session.secret, "Cache-Control": "no-store"},
        )

    def _token(self, request: web.Request) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if self.config.query_token:
            return request.query.get("access_token", "").strip()
        return ""

    # --- the installer console ----------------------------------------------------------

    async def console_view(self, principal: str, offer: str) -> dict[str, Any]:
        """An installer's live picture: ``{"sdp": answer, "session": id}``.

        The console verified the request and its principal (installer or admin); refused
        with ``ViewRefusedError``.
        """
        session = await self._open(offer, principal, self._clock() + CONSOLE_VIEW_S,
                                   "console")
        return {"sdp": session.pc.localDescription.sdp, "session": session.secret,
                "view": session.view, "until": session.expires_at}

    async def end_console_view(self, principal: str, secret: str) -> bool:
        """End the principal's own console view ``secret``; False when there is none."""
        session = self.sessions.get(secret)
        if session is None or session.via != "console" or session.principal != principal:
            return False
        await self._end(session, "ended by the viewer")
        return True

    # --- one session, for either ----------------------------------------------------------

    async def _open(self, offer: str, principal: str, expires_at: float,
                    via: str) -> ViewSession:
        """Answer ``offer`` with the redacted feed; the session, or ViewRefusedError."""
        if len(offer) > MAX_OFFER:
            raise ViewRefusedError(400, "offer too large")
        kinds = MEDIA_LINE.findall(offer)
        if "video" not in kinds or not set(kinds) <= {"video", "audio"}:
            raise ViewRefusedError(400, "offer must receive video (audio optional)")
        if len(self.sessions) + self._pending >= self.config.max_viewers:
            raise ViewRefusedError(503, "viewers at the limit")
        self._pending += 1
        try:
            return await self._answer(offer, principal, expires_at, via)
        finally:
            self._pending -= 1

    async def _answer(self, offer: str, principal: str, expires_at: float,
                      via: str) -> ViewSession:
        if self._redactor is None:  # the console's first view with /whep off
            try:
                self._redactor = await asyncio.to_thread(self._camera.redactor)
            except Exception as exc:
                log.exception("live view: the face model cannot be loaded")
                raise ViewRefusedError(503, "cannot redact") from exc
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers(),
                                                iceTransportPolicy=self._policy))
        track = self._subscribe()
        try:
            # A browser's mDNS host names cost aioice a second each; its checks reach us anyway.
            remote = RTCSessionDescription(sdp=without_mdns(offer), type="offer")
            await pc.setRemoteDescription(remote)
            pc.addTrack(track)
            await pc.setLocalDescription(await pc.createAnswer())  # waits for ICE gathering
        except Exception as exc:  # noqa: BLE001 - aiortc raises many kinds on a bad offer
            await self._discard(pc, track)
            raise ViewRefusedError(400, f"offer refused: {type(exc).__name__}") from None
        refusal = self._signer_refusal(principal)  # revoked while the answer was made?
        if refusal is not None or not self._camera_running():
            await self._discard(pc, track)
            raise ViewRefusedError(403, refusal or "stopping")
        session = ViewSession(
            view=f"view-{secrets.token_hex(4)}", secret=secrets.token_urlsafe(32),
            principal=principal, started_at=self._clock(), expires_at=expires_at, pc=pc,
            track=track, opened=self._monotonic(), via=via,
        )
        self.sessions[session.secret] = session
        self.started += 1
        pc.on("connectionstatechange", lambda: self._state_changed(session))
        self._bus.publish(LiveViewStarted(view=session.view, principal=principal, via=via))
        log.info("live view (%s): %s started (%d of %d viewers)", via, session.view,
                 len(self.sessions), self.config.max_viewers)
        return session

    def _refuse(
        self, request: web.Request, status: int, reason: str, challenge: str = ""
    ) -> web.Response:
        self._refusals.refused(self._monotonic(), "whep: refused %s (%s): %s", status,
                               source_key(request.remote), reason)
        headers = {"WWW-Authenticate": challenge} if challenge else {}
        text = {401: "a manager's bearer token is required", 403: "not allowed",
                415: "the offer must be application/sdp"}.get(status, "offer refused")
        return _error(status, text, headers)

    # --- the video ----------------------------------------------------------------------

    def _subscribe(self) -> MediaStreamTrack:
        """A viewer's track on the one redacted feed (started for the first viewer)."""
        if self._feed is None or self._relay is None:
            self._feed = RedactedTrack(self._camera.gate(), self._camera.masks, self._redactor,
                                       self._camera.keyframe)
            self._relay = MediaRelay()
        return self._relay.subscribe(self._feed, buffered=False)

    def _camera_running(self) -> bool:
        return self._task is not None

    def _release_feed(self) -> None:
        """Stop redacting (and close the camera gate) once nobody watches."""
        if not self.sessions and not self._pending and self._feed is not None:
            self._feed.stop()
            self._feed, self._relay = None, None

    async def _discard(self, pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
        track.stop()
        await pc.close()
        self._release_feed()

    # --- ending sessions ----------------------------------------------------------------

    async def _end(self, session: ViewSession, reason: str) -> None:
        if session.ended:
            return
        session.ended = True
        self.sessions.pop(session.secret, None)
        session.track.stop()
        ended = self._clock()
        self._bus.publish(LiveViewEnded(
            view=session.view, principal=session.principal, started_at=session.started_at,
            duration_s=round(max(0.0, ended - session.started_at), 3), reason=reason,
        ))
        log.info("live view (%s): %s ended: %s", session.via, session.view, reason)
        self._release_feed()
        await session.pc.close()

    def _end_soon(self, session: ViewSession, reason: str) -> None:
        if not session.ended:
            asyncio.get_running_loop().create_task(self._end(session, reason),
                                                   name=f"whep-end-{session.view}")

    def _state_changed(self, session: ViewSession) -> None:
        state = session.pc.connectionState
        if state == "connected":
            session.connected = True
        elif state in {"failed", "closed"}:
            self._end_soon(session, "connection lost")

    def _principal_changed(self, pid: str) -> None:
        """The registry changed a principal: end its sessions if it may no longer watch."""
        for session in list(self.sessions.values()):
            if session.principal == pid and (reason := self._signer_refusal(pid)):
                self._end_soon(session, reason)

    def check_sessions(self) -> None:
        """End sessions whose bearer or signer expired, or that never connected."""
        now, mono = self._clock(), self._monotonic()
        for session in list(self.sessions.values()):
            if now >= session.expires_at:
                self._end_soon(session, "bearer expired" if session.via == "whep"
                               else "time up")
            elif reason := self._signer_refusal(session.principal):
                self._end_soon(session, reason)
            elif not session.connected and mono - session.opened > CONNECT_TIMEOUT_S:
                self._end_soon(session, "never connected")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                self.check_sessions()
            except Exception:
                log.exception("whep: housekeeping failed")


async def _read_offer(request: web.Request) -> str:
    if request.content_type != SDP:
        raise ViewRefusedError(415, "offer not application/sdp")
    try:
        return (await request.read()).decode()
    except UnicodeDecodeError:
        raise ViewRefusedError(400, "offer not UTF-8") from None


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)
