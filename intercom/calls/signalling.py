"""The signalling WebSocket: challenge authentication, then the SDP exchange and call control.

Until a socket has signed the station's challenge with a registered device key, it
gets nothing but the challenge. Messages are JSON objects with a ``type``; a malformed
one closes that socket only (4400), a failed authentication closes it with 4401.

Sockets not yet signed in are a scarce resource: at most ``MAX_UNAUTHENTICATED`` of
them, at most ``MAX_UNAUTHENTICATED_PER_ADDRESS`` from one source address (an IPv6
/64), each for at most ``AUTH_TIMEOUT_S`` from the upgrade, a deadline that no frame
(a PING included) extends.

Besides the call, a signed-in device may ask whether a TOTP code is its current one
(``totp-check``, the enrolment's confirm step): the station's verifier answers, which
rate-limits and counts the guesses (``intercom.security.codecheck``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from intercom.calls.peer import DevicePeer
from intercom.calls.ringgroup import RingGroup
from intercom.calls.turn import IceProvider
from intercom.security.limits import RefusalLog, TokenBucket, source_key
from intercom.security.principals import ID_PATTERN, Principal, Role

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024
MAX_SDP = 60 * 1024
AUTH_TIMEOUT_S = 10.0  # from the upgrade to a signed challenge, whatever frames arrive
HEARTBEAT_S = 10.0
MAX_UNAUTHENTICATED = 32
MAX_UNAUTHENTICATED_PER_ADDRESS = 4
MAX_CONTAINERS = 256  # "[" and "{" in one message (strings included); real ones have a few
MESSAGES_PER_S = (20.0, 40.0)  # rate, burst
CLOSE_NORMAL = 1000
CLOSE_INTERNAL = 1011
CLOSE_TOO_BIG = 1009
CLOSE_MALFORMED = 4400
CLOSE_AUTH = 4401
CLOSE_REPLACED = 4409
CLOSE_LOST = 4410
CLOSE_BUSY = 4429
SIGNATURE_BYTES = 64
CALL_TYPES = frozenset({"accept", "decline", "hangup"})
MAX_CODE = 16  # characters of a totp-check's code (a real one has 6)


class Refused(Exception):  # noqa: N818 - a control-flow signal, not a fault of ours
    """Close the socket with ``code``; ``reason`` goes to the log (and the close frame)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; ValueError when malformed."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("malformed base64url") from exc


def auth_message(station: str, nonce: str) -> bytes:
    """The bytes a device signs to authenticate."""
    return f"intercom-auth:{station}:{nonce}".encode()


def verify_device_signature(principal: Principal, data: bytes, signature: bytes) -> bool:
    """Ed25519, or ECDSA P-256/SHA-256 in WebCrypto's raw r||s form."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    key: Any = principal.key.get_op_key("verify")
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, data)
            return True
        if isinstance(key, ec.EllipticCurvePublicKey):
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
            return True
    except InvalidSignature:
        return False
    return False


PeerFactory = Callable[["Session", Callable[[str], None]], DevicePeer]
# A further message type a signed-in device may send, handled by another part.
Handler = Callable[["Session", dict[str, Any]], Awaitable[None]]
CheckCode = Callable[[str, str], Awaitable[str]]  # (principal, code) -> a CodeCheck value


class Session:
    """One authenticated device: its socket, its peer connection, its place in the ring.

    The peer connection is numbered (``peer`` in the ``offer`` messages and their
    answers): after a call the session replaces it by a fresh idle one (``renew``), and
    an answer to a replaced connection's offer is then ignored, not refused.
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        principal: str,
        flats: frozenset[str],
        peer_factory: PeerFactory | None = None,
    ) -> None:
        self.id = secrets.token_hex(6)
        self.ws = ws
        self.principal = principal
        self.flats = flats
        self.peer: DevicePeer | None = None
        self.number = 0  # of the current peer connection
        self.first_frame_at: float | None = None  # of the last call, kept across a renewal
        self.first_audio_at: float | None = None
        self.ice_renew_at: float | None = None  # fresh TURN credentials due (None: no TURN)
        self._peer_factory = peer_factory
        self._retired: DevicePeer | None = None  # replaced, closed once the new one answers
        self._tasks: set[asyncio.Task[Any]] = set()
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write(), name=f"call-ws-writer-{self.id}")

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message; they go out in order."""
        self._outbox.put_nowait(message)

    async def _write(self) -> None:
        while (message := await self._outbox.get()) is not None:
            if self.ws.closed:
                return
            try:
                await self.ws.send_str(json.dumps(message))
            except (ConnectionError, RuntimeError) as exc:
                log.debug("signalling: send failed: %s", exc)
                return

    # --- the peer connection ------------------------------------------------------------

    async def connect(self) -> None:
        """A fresh idle peer connection: its offer goes out now."""
        if self._peer_factory is None:
            raise RuntimeError("signalling: a session without a peer factory")
        number = self.number + 1
        peer = self._peer_factory(self, lambda sdp: self._offer(number, sdp))
        self.peer, self.number = peer, number
        sdp = await peer.offer()
        if self.peer is not peer:  # replaced while making its offer: never used
            await peer.close()
            return
        self._offer(number, sdp)

    def _offer(self, number: int, sdp: str) -> None:
        if number == self.number:
            self.send({"type": "offer", "sdp": sdp, "peer": number})

    async def accept_answer(self, sdp: str, number: int) -> None:
        """Apply an answer; one to a replaced connection is ignored."""
        if self.peer is None or number != self.number:
            log.debug("signalling: session %s: answer for connection %d ignored", self.id, number)
            return
        await self.peer.accept_answer(sdp)
        if self._retired is not None:  # the device took the new connection: the old goes
            retired, self._retired = self._retired, None
            await retired.close()

    def renew(self) -> None:
        """After a call: replace the connection by a fresh idle one.

        Once rung, a connection would report for ever: a device that has received video
        sends receiver reports, and once answered the audio's sender and receiver run (aiortc
        stops neither when a section goes inactive again); a fresh one costs the station
        only consent checks again. The old
        one is closed once the device answers the new offer (closing it first could make
        the device see a failed connection and sign in again).
        """
        old = self.peer
        if old is None or self._peer_factory is None or old is self._retired:
            return  # nothing to replace, or its replacement is on the way already
        self.first_frame_at = old.video.first_frame_at or self.first_frame_at
        self.first_audio_at = old.first_audio_at or self.first_audio_at
        if self._retired is not None:
            self._spawn(self._retired.close(), "call-peer-close")
        self._retired = old
        self._spawn(self.connect(), "call-peer-renew")

    def lost_peer(self, peer: DevicePeer) -> bool:
        """Whether ``peer`` failing means the device is gone (not a retired connection)."""
        return peer is self.peer

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_consume)

    # --- what the ring group asks ----------------------------------------------------------

    def start_video(self) -> None:
        """Show the door."""
        if self.peer is not None:
            self.first_frame_at = None
            self.peer.start_video()

    def stop_video(self) -> None:
        """Stop showing the door; once the device is out of the call, a fresh connection."""
        peer = self.peer
        if peer is not None:
            peer.stop_video()
            if peer.rung and not peer.audio.is_open:
                self.renew()

    def start_audio(self) -> None:
        """Two-way audio."""
        if self.peer is not None:
            self.first_audio_at = None
            self.peer.start_audio()

    def stop_audio(self) -> None:
        """No audio."""
        if self.peer is not None:
            self.peer.stop_audio()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Stop writing, close the socket and the peer connection."""
        self._outbox.put_nowait(None)
        try:
            await asyncio.wait_for(self._writer, 1)
        except (TimeoutError, asyncio.CancelledError):
            self._writer.cancel()
        if not self.ws.closed:
            await self.ws.close(code=code, message=reason.encode()[:120])
        for task in list(self._tasks):
            task.cancel()
        for peer in (self.peer, self._retired):
            if peer is not None:
                await peer.close()


class Signalling:
    """Serves ``/ws``: authenticates devices and connects them to the ring group."""

    def __init__(
        self,
        station: str,
        door: str,
        flats: frozenset[str],
        principal_of: Callable[[str], Principal | None],
        ring_group: RingGroup,
        peer_factory: PeerFactory,
        ice: IceProvider,
        check_code: CheckCode | None = None,
    ) -> None:
        self.station = station
        self.door = door
        self.flats = flats
        self._principal_of = principal_of
        self.ring_group = ring_group
        self._peer_factory = peer_factory
        self._ice = ice
        self._check_code = check_code
        self.sessions: dict[str, Session] = {}
        self.handlers: dict[str, Handler] = {}  # further message types, by type
        self._unauthenticated: dict[str, int] = {}  # source address -> sockets signing in
        self._refusals = RefusalLog(log)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """One WebSocket from challenge to close."""
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=HEARTBEAT_S)
        await ws.prepare(request)
        source = source_key(request.remote)
        held = self._unauthenticated.get(source, 0)
        if held >= MAX_UNAUTHENTICATED_PER_ADDRESS or (
            sum(self._unauthenticated.values()) >= MAX_UNAUTHENTICATED
        ):
            self._refusals.refused(
                time.monotonic(), "signalling: busy, refused a socket from %s", source
            )
            await ws.close(code=CLOSE_BUSY, message=b"busy")
            return ws
        self._unauthenticated[source] = held + 1
        outcome: Principal | Refused
        try:
            outcome = await self._sign_in(ws)
        except Refused as exc:
            outcome = exc
        except Exception:
            log.exception("signalling: sign-in failed")
            outcome = Refused(CLOSE_INTERNAL, "internal error")
        finally:  # the slot is free before the close handshake, however long that takes
            if (left := self._unauthenticated[source] - 1) > 0:
                self._unauthenticated[source] = left
            else:
                del self._unauthenticated[source]
        if isinstance(outcome, Refused):
            if outcome.code == CLOSE_NORMAL:
                log.debug("signalling: socket from %s left before signing in", source)
            elif outcome.code != CLOSE_INTERNAL:
                self._refusals.refused(
                    time.monotonic(),
                    "signalling: socket from %s refused (%d): %s",
                    source,
                    outcome.code,
                    outcome.reason,
                )
            told = "authentication failed" if outcome.code == CLOSE_AUTH else outcome.reason
            await ws.close(code=outcome.code, message=told.encode()[:120])
            return ws
        await self._serve(ws, outcome)
        return ws

    async def _sign_in(self, ws: web.WebSocketResponse) -> Principal:
        """Authenticate within one deadline, computed once: control frames never extend it."""
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                return await self._authenticate(ws)
        except TimeoutError as exc:
            raise Refused(CLOSE_AUTH, "no authentication in time") from exc

    async def _authenticate(self, ws: web.WebSocketResponse) -> Principal:
        nonce = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        await ws.send_json({"type": "challenge", "station": self.station, "nonce": nonce})
        message = await ws.receive()
        if message.type in {WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED}:
            raise Refused(CLOSE_NORMAL, "left before signing in")
        data = parse(message)
        if data.get("type") != "auth":
            raise Refused(CLOSE_AUTH, "authenticate first")
        pid, signature = data.get("principal"), data.get("signature")
        if not isinstance(pid, str) or not ID_PATTERN.match(pid):
            raise Refused(CLOSE_MALFORMED, "principal must be a principal id")
        if not isinstance(signature, str) or len(signature) > 200:
            raise Refused(CLOSE_MALFORMED, "signature must be base64url")
        try:
            raw = b64url_decode(signature)
        except ValueError as exc:
            raise Refused(CLOSE_MALFORMED, "signature must be base64url") from exc
        principal = self._principal_of(pid)
        if principal is None:
            raise Refused(CLOSE_AUTH, "unknown principal")
        if reason := principal.inactive_reason(time.time()):
            raise Refused(CLOSE_AUTH, reason)
        if principal.role is not Role.RESIDENT or not self.flats.intersection(principal.flats):
            raise Refused(CLOSE_AUTH, "not a resident of a flat served here")
        if not verify_device_signature(principal, auth_message(self.station, nonce), raw):
            raise Refused(CLOSE_AUTH, "bad signature")
        return principal

    async def _serve(self, ws: web.WebSocketResponse, principal: Principal) -> None:
        flats = self.flats.intersection(principal.flats)
        old = [s for s in self.sessions.values() if s.principal == principal.id]
        for stale in old:  # the same device again (new network, reload): the old one goes
            await self._drop(stale, CLOSE_REPLACED, "replaced by a newer connection")
        session = Session(ws, principal.id, frozenset(flats), self._peer_factory)
        self.sessions[session.id] = session
        log.info("signalling: device online (session %s, flats %s)", session.id, sorted(flats))
        code, reason = 1000, ""
        try:
            session.send(
                {
                    "type": "ready",
                    "principal": principal.id,
                    "flat": min(flats),
                    "door": self.door,
                    **self._ice_config(session),
                }
            )
            await session.connect()
            self.ring_group.add(session)
            await self._loop(ws, session)
        except Refused as exc:
            log.warning("signalling: session %s closed (%d): %s", session.id, exc.code, exc.reason)
            code, reason = exc.code, exc.reason
        except Exception:
            log.exception("signalling: session %s failed", session.id)
            code, reason = 1011, "internal error"
        finally:
            await self._drop(session, code, reason)

    async def _loop(self, ws: web.WebSocketResponse, session: Session) -> None:
        bucket = TokenBucket(*MESSAGES_PER_S)
        while not ws.closed:
            message = await ws.receive()
            if message.type in {WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED}:
                return
            if message.type is WSMsgType.ERROR:
                raise Refused(CLOSE_TOO_BIG, f"broken or oversized message: {ws.exception()}")
            if not bucket.take(time.monotonic()):
                raise Refused(CLOSE_BUSY, "too many messages")
            await self._dispatch(session, parse(message))

    async def _dispatch(self, session: Session, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "ping":
            session.send({"type": "pong"})
        elif kind == "answer":
            sdp, number = data.get("sdp"), data.get("peer", session.number)
            if not isinstance(sdp, str) or len(sdp) > MAX_SDP or session.peer is None:
                raise Refused(CLOSE_MALFORMED, "answer needs an sdp string")
            if not isinstance(number, int) or isinstance(number, bool):
                raise Refused(CLOSE_MALFORMED, "peer must be a connection number")
            try:
                await session.accept_answer(sdp, number)
            except Exception as exc:  # any fault of a device's SDP is its own
                raise Refused(CLOSE_MALFORMED, f"answer refused: {str(exc)[:80]}") from exc
        elif kind in CALL_TYPES:
            call = data.get("call")
            if not isinstance(call, str) or len(call) > 64:
                raise Refused(CLOSE_MALFORMED, f"{kind} needs a call id")
            action = {
                "accept": self.ring_group.accept,
                "decline": self.ring_group.decline,
                "hangup": self.ring_group.hangup,
            }[str(kind)]
            action(session, call)
        elif kind == "totp-check":
            await self._totp_check(session, data)
        elif isinstance(kind, str) and kind in self.handlers:  # e.g. push-subscribe (push/)
            await self.handlers[kind](session, data)
        else:
            raise Refused(CLOSE_MALFORMED, f"unknown message type {str(kind)[:20]!r}")

    async def _totp_check(self, session: Session, data: dict[str, Any]) -> None:
        """Answer whether ``code`` is the device's current TOTP code (the verifier says)."""
        code = data.get("code")
        if not isinstance(code, str) or len(code) > MAX_CODE:
            raise Refused(CLOSE_MALFORMED, "totp-check needs a code string")
        result = "unavailable"
        if self._check_code is not None:
            result = str(await self._check_code(session.principal, code))
        session.send({"type": "totp-check", "ok": result == "right", "result": result})

    def lost(self, session: Session, peer: DevicePeer) -> None:
        """The device's media connection failed: treat it as gone (not a replaced one)."""
        if session.id in self.sessions and session.lost_peer(peer):
            log.info("signalling: session %s lost its media connection", session.id)
            task = asyncio.ensure_future(self._drop(session, CLOSE_LOST, "media connection lost"))
            task.add_done_callback(_consume)

    async def _drop(self, session: Session, code: int, reason: str) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        self.ring_group.remove(session)
        log.info("signalling: device offline (session %s)", session.id)
        await session.close(code, reason)

    async def close(self) -> None:
        """Close every session (the station is stopping)."""
        for session in list(self.sessions.values()):
            await self._drop(session, 1001, "station stopping")

    def _ice_config(self, session: Session) -> dict[str, Any]:
        """The device's ICE servers (fresh TURN credentials of its own) and policy."""
        config = self._ice.ice_config(session.principal)
        ttl = self._ice.ttl_s
        session.ice_renew_at = time.time() + ttl / 2 if ttl is not None else None
        return config

    def refresh_ice(self) -> None:
        """Fresh TURN credentials for devices past half their lifetime.

        A TURN server refuses an expired credential, also when an allocation is
        refreshed: a connection outliving its credential would lose its relay. So the
        device gets new credentials (``ice``), and an idle device a new connection made
        with them (the old one is closed once the device answers); a device rung or in
        the call gets its new connection when the call ends, as after every call.
        """
        now = time.time()
        for session in list(self.sessions.values()):
            if session.ice_renew_at is None or now < session.ice_renew_at:
                continue
            session.send({"type": "ice", **self._ice_config(session)})
            if not self.ring_group.may_unlock(session):
                session.renew()
            log.info("signalling: session %s given fresh TURN credentials", session.id)

    def revoke_check(self) -> None:
        """Close the sessions of principals that are no longer active."""
        now = time.time()
        for session in list(self.sessions.values()):
            principal = self._principal_of(session.principal)
            reason = "principal removed" if principal is None else principal.inactive_reason(now)
            if reason:
                log.info("signalling: session %s closed: %s", session.id, reason)
                task = asyncio.ensure_future(self._drop(session, CLOSE_AUTH, reason))
                task.add_done_callback(_consume)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("signalling: closing a session failed: %r", exc)


def parse(message: Any) -> dict[str, Any]:
    """A text message's JSON object with a string ``type``; Refused otherwise."""
    if message.type is not WSMsgType.TEXT:
        if message.type is WSMsgType.ERROR:
            raise Refused(CLOSE_TOO_BIG, "message too big or broken")
        raise Refused(CLOSE_MALFORMED, "only JSON text messages")
    text = str(message.data)
    if text.count("[") + text.count("{") > MAX_CONTAINERS:  # cheap bound on nesting
        raise Refused(CLOSE_MALFORMED, "too many nested JSON values")
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise Refused(CLOSE_MALFORMED, "too many nested JSON values") from exc
    except ValueError as exc:
        raise Refused(CLOSE_MALFORMED, "not JSON") from exc
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise Refused(CLOSE_MALFORMED, "a JSON object with a type is required")
    return data
