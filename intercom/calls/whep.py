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
HOUSEKEEPING_S = 1.0  # bearer and principal expiries are noticed this often
CHALLENGE = 'Bearer realm="intercom"'
MEDIA_LINE = re.compile(r"^m=(\w+) ", re.MULTILINE)

CheckBearer = Callable[[str, str, float | None], Decision]


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
    connected: bool = False
    ended: bool = field(default=False)


@dataclass(frozen=True)
class Camera:
    """What the live view reads: a gate on the shared camera, and how to redact it."""

    gate: Callable[[], MediaStreamTrack]  # an open gate on the calls' shared camera
    masks: Callable[[], ZoneMasks]  # the zones as they are now
    redactor: Callable[[], Any]  # the live face redactor (loaded at start: fail closed)


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
        """Load the face model now (a station that cannot redact refuses to start)."""
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
        """The current viewing sessions, for ``intercom status`` (the local owner)."""
        return {
            "whep": {
                "max_viewers": self.config.max_viewers,
                "viewers": len(self.sessions),
                "sessions_started": self.started,
                "frames_redacted": self._feed.frames if self._feed is not None else 0,
                "sessions": [
                    {"view": s.view, "principal": s.principal, "since": s.started_at,
                     "bearer_expires": s.expires_at, "connected": s.connected}
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
        if request.content_type != SDP:
            return self._refuse(request, 415, "offer not application/sdp")
        if len(self.sessions) + self._pending >= self.config.max_viewers:
            self._refuse(request, 503, "viewers at the limit")
            return _error(503, "too many viewers", {"Retry-After": "10"})
        self._pending += 1
        try:
            return await self._answer(request, decision)
        finally:
            self._pending -= 1

    def _token(self, request: web.Request) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        if self.config.query_token:
            return request.query.get("access_token", "").strip()
        return ""

    async def _answer(self, request: web.Request, decision: Decision) -> web.StreamResponse:
        try:
            offer = (await request.read()).decode()
        except UnicodeDecodeError:
            return self._refuse(request, 400, "offer not UTF-8")
        kinds = MEDIA_LINE.findall(offer)
        if "video" not in kinds or not set(kinds) <= {"video", "audio"}:
            return self._refuse(request, 400, "offer must receive video (audio optional)")
        principal = str(decision.principal)
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
            return self._refuse(request, 400, f"offer refused: {type(exc).__name__}")
        refusal = self._signer_refusal(principal)  # revoked while the answer was made?
        if refusal is not None or not self._camera_running():
            await self._discard(pc, track)
            return self._refuse(request, 403, refusal or "stopping")
        session = ViewSession(
            view=f"view-{secrets.token_hex(4)}", secret=secrets.token_urlsafe(32),
            principal=principal, started_at=self._clock(),
            expires_at=float(decision.expires_at or self._clock()), pc=pc, track=track,
            opened=self._monotonic(),
        )
        self.sessions[session.secret] = session
        self.started += 1
        pc.on("connectionstatechange", lambda: self._state_changed(session))
        self._bus.publish(LiveViewStarted(view=session.view, principal=principal, via="whep"))
        log.info("whep: %s started (%d of %d viewers)", session.view, len(self.sessions),
                 self.config.max_viewers)
        local = pc.localDescription
        return web.Response(
            status=201, text=local.sdp, content_type=SDP,
            headers={"Location": SESSIONS + session.secret, "Cache-Control": "no-store"},
        )

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
            self._feed = RedactedTrack(self._camera.gate(), self._camera.masks, self._redactor)
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
        log.info("whep: %s ended: %s", session.view, reason)
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
                self._end_soon(session, "bearer expired")
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


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)
