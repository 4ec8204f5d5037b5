"""One resident device's WebRTC connection, set up when it comes online and kept open.

The station is the offerer. While nobody rings the device the connection carries a data
channel ``control``, a video section ``sendonly`` whose gate stays closed until this
device is rung (a ring only opens it: no negotiation before the first frame) and an
audio section ``inactive``. Idle, nothing crosses it but ICE consent checks: the closed
gate sends no RTP, the station's report hook no RTCP, and a device that has received no
video reports nothing. Once the ring's first frame is out, the audio is renegotiated
``sendrecv`` (the door microphone gated until this device answers; its audio reaches the
door speaker only while it is in the call), so an answer only opens gates. After a ring
the signalling session replaces the connection with a fresh idle one (``docs/calls.md``,
"Media").

Every message on the data channel gets one ``unlock-result`` answer, ``denied`` when it
is refused (binary, oversized, beyond the channel's rate) or when answering it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCRemoteInboundRtpStreamStats,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidStateError
from aiortc.rtp import RtcpSdesPacket, RtcpSrPacket

from intercom.calls.tracks import GatedTrack, MediaHub
from intercom.media.audio import LevelSink, rms_level
from intercom.media.sharedvp8 import LossRate, SharedVp8Encoder
from intercom.netaddr import Network, on_networks
from intercom.security import command
from intercom.security.limits import RefusalLog, TokenBucket

log = logging.getLogger(__name__)

MAX_CHANNEL_MESSAGE = 8192
CHANNEL_RATE = (2.0, 10.0)  # messages per second, burst: a person opens a door now and then
MAX_ANSWERS_BUFFERED = 1 << 20  # bytes queued for a device that does not read its answers
AUDIBLE = LevelSink.SILENCE
# A ring renegotiates the audio on this long after opening the video gate: after the first
# frame has gone out (the renegotiation must not delay it), long before a person answers
# (answered, the door audio then flows at once, with no round trip first).
AUDIO_AFTER_RING_S = 0.15
# How often a device's receiver reports are read for its loss (the shared VP8's rate);
# browsers send one about every second.
LOSS_POLL_S = 0.5
PLAYOUT_DELAY_URI = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay"
# The playout delay (min, max, ms) the station asks a device's receiver for. At home:
# none, a frame is shown the moment it is decoded. Away (a relay, a carrier's NAT): at
# least 200 ms. A lost packet costs the frame its detection (up to a frame interval),
# the NACK's round trip and, when the retransmission is lost too, another: about 180 and
# 290 ms at 100 ms RTT; Chromium counts a freeze from about 220 ms between frames at 15
# fps. Held that long in the buffer, a loss delays a frame there instead of freezing
# the picture. Measured at 100 ms RTT and 2 % loss over 60 s calls (docs/benchmarks.md):
# Chromium's own delay 2-4 freezes, 100 ms 0-2, 150 ms 1-2, 200 ms none; the first
# frame of a ring is still shown at once. At most 500 ms: a picture further behind the
# voice (the video has a stream of its own: no lip sync holds the audio) serves a
# conversation worse than a freeze.
HOME_PLAYOUT_MS = (0, 0)
AWAY_PLAYOUT_MS = (200, 500)
MDNS_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ \S+\.local \d+ .*$", re.MULTILINE)

Unlock = Callable[[str], Awaitable[dict[str, Any]]]


def denied(jti: str | None) -> dict[str, Any]:
    """The answer to a refused data-channel message."""
    return {"type": "unlock-result", "jti": jti, "result": "denied"}


def jti_of(token: str) -> str | None:
    """The command id of ``token`` when it has a well-formed one, for the answer."""
    try:
        return command.parse(token).jti
    except Exception:  # noqa: BLE001 - only for the answer; the refusal stands whatever this is
        return None


def with_playout_delay(sdp: str) -> str:
    """The offer with the RTP ``playout-delay`` extension on the video (an unused id).

    With it, each video packet tells the device's receiver how long to hold frames
    (``HOME_PLAYOUT_MS``, ``AWAY_PLAYOUT_MS``): at home, not at all, so the preview is
    about now (Chromium otherwise holds the first frame of a ring for its default playout
    delay, ``docs/benchmarks.md``); away, long enough for a retransmission.
    """
    lines = sdp.split("\r\n")
    out: list[str] = []
    video = False
    for line in lines:
        if line.startswith("m="):
            video = line.startswith("m=video")
        out.append(line)
        if video and line.startswith("a=mid:"):
            # bundled sections share one id space: free in every section, not just video
            used = {int(m) for m in re.findall(r"^a=extmap:(\d+)", "\n".join(lines), re.MULTILINE)}
            free = next((n for n in range(1, 15) if n not in used), None)
            if free is not None:
                out.append(f"a=extmap:{free} {PLAYOUT_DELAY_URI}")
    return "\r\n".join(out)


def _video_section(lines: list[str]) -> str:
    section: list[str] = []
    for line in lines:
        if line.startswith("m="):
            if section:
                break
            if line.startswith("m=video"):
                section.append(line)
        elif section:
            section.append(line)
    return "\n".join(section)


def playout_delay_id(sdp: str) -> int | None:
    """The extension id the answer gives ``playout-delay`` on its video, if it took it."""
    section = _video_section(sdp.replace("\r\n", "\n").split("\n"))
    extmap = rf"^a=extmap:(\d+)(?:/\w+)? {re.escape(PLAYOUT_DELAY_URI)}$"
    match = re.search(extmap, section, re.MULTILINE)
    return int(match.group(1)) if match else None


def video_ssrc(sdp: str) -> int | None:
    """The first SSRC of the video section (the primary stream; RTX follows it)."""
    section = _video_section(sdp.replace("\r\n", "\n").split("\n"))
    match = re.search(r"^a=ssrc:(\d+) ", section, re.MULTILINE)
    return int(match.group(1)) if match else None


def add_playout_delay(
    packet: bytes, ssrc: bytes, ext_id: int, min_ms: int = 0, max_ms: int = 0
) -> bytes:
    """The RTP packet of ``ssrc`` with a ``playout-delay`` element (one-byte form).

    ``min_ms`` and ``max_ms`` go in 10 ms units, 12 bits each (at most 40.95 s).

    Anything else (RTCP, another stream, a two-byte extension block, a short packet) is
    returned as it is.
    """
    offset = 12 + 4 * (packet[0] & 0x0F) if packet else 0
    rtp = len(packet) >= offset + 4 and packet[0] >> 6 == 2 and not 192 <= packet[1] <= 223
    if not rtp or packet[8:12] != ssrc:  # not RTP, RTCP on the same port, another stream
        return packet
    delays = (min(min_ms // 10, 0xFFF) << 12) | min(max_ms // 10, 0xFFF)  # 10 ms units
    element = bytes(((ext_id << 4) | 2,)) + delays.to_bytes(3, "big")  # id, length 3 - 1
    if not packet[0] & 0x10:
        first = bytes((packet[0] | 0x10,))
        return first + packet[1:offset] + struct.pack("!HH", 0xBEDE, 1) + element + packet[offset:]
    profile, words = struct.unpack_from("!HH", packet, offset)
    end = offset + 4 + 4 * words
    if profile != 0xBEDE or len(packet) < end:  # a two-byte block, or cut short
        return packet
    head = packet[:offset] + struct.pack("!HH", profile, words + 1)
    return head + packet[offset + 4 : end] + element + packet[end:]


def on_link(sdp: str, networks: Sequence[Network]) -> bool:
    """Whether the device offers a host candidate on one of the station's networks.

    Only then does the station ask for a zero playout delay: on the home network a frame
    is shown the moment it is decoded. Away (a relay, a carrier's NAT: round trips of
    100 ms, losses), a zero delay leaves Chromium's jitter buffer no time for a lost
    packet's retransmission, and the picture freezes at each loss (measured: 15 freezes
    in a 60 s call at 100 ms RTT and 2 % loss), so such a device is asked for at least
    a round trip's delay (``AWAY_PLAYOUT_MS``).
    """
    for line in sdp.splitlines():
        parts = line.split()
        host = line.startswith("a=candidate:") and len(parts) >= 8 and parts[7] == "host"
        if host and on_networks(parts[4], networks):
            return True
    return False


def without_mdns(sdp: str) -> str:
    """The SDP without ``*.local`` candidates, which aioice would spend a second each on."""
    return MDNS_CANDIDATE.sub("", sdp).replace("\r\n\r\n", "\r\n")


class DevicePeer:
    """The station's end of one device's peer connection."""

    def __init__(
        self,
        media: MediaHub,
        servers: list[RTCIceServer],
        unlock: Unlock,
        on_lost: Callable[[], None],
        send_offer: Callable[[str], None],
        *,
        relay_only: bool = False,
        networks: Sequence[Network] = (),
    ) -> None:
        self.media = media
        self._networks = networks  # the station's own: a device on one is at home
        policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers,
                                                     iceTransportPolicy=policy))
        self.video: GatedTrack = media.video_track()
        self.audio: GatedTrack = media.audio_track()
        self.to_door = False
        self.first_audio_at: float | None = None  # first audible frame at the door, this call
        self._unlock = unlock
        self._on_lost = on_lost
        self._send_offer = send_offer
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._following = False  # a _follow_loss task runs (the shared VP8's rate)
        # The video is ready for a ring (its gate closed); the audio waits for an answer.
        self._video_tx = self.pc.addTransceiver(self.video, direction="sendonly")
        self.video_sender = self._video_tx.sender
        if media.encoded:  # packets (hardware H.264, the shared VP8) go out as they are
            codecs = RTCRtpSender.getCapabilities("video").codecs
            wanted = {media.mime_type, "video/rtx"} if media.encoder else {media.mime_type}
            self._video_tx.setCodecPreferences([c for c in codecs if c.mimeType in wanted])
            self._forward_keyframe_requests()
        self._audio_tx = self.pc.addTransceiver(self.audio, direction="inactive")
        for sender, track in ((self.video_sender, self.video), (self._audio_tx.sender, self.audio)):
            _quiet_idle_reports(sender, track)
        self.media_on = False  # renegotiated for an answer: the audio section active
        self.media_at: float | None = None  # when that renegotiation's answer was applied
        self.rung = False  # its video gate has been opened (a device that got video reports)
        self._awaiting_answer = False
        self._answered = asyncio.Event()  # the first answer is applied
        self._marked = False
        self.channel: RTCDataChannel = self.pc.createDataChannel("control")
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)
        self._bucket = TokenBucket(*CHANNEL_RATE)
        self._refusals = RefusalLog(log)

    def _forward_keyframe_requests(self) -> None:
        """Send the device's PLI/FIR to the encoder of the packets (camera's or shared VP8).

        aiortc answers a keyframe request by flagging its own encoder, which packets from
        the camera or the shared VP8 encoder bypass; the sender looks the method up on the
        instance, so wrapping it here reaches that encoder too.

        This is aiortc's private ``RTCRtpSender._send_keyframe``, on purpose: aiortc (1.16
        checked) has no public way to learn of a device's PLI/FIR (no event, callback or
        public method on the sender; its RTCP handling and encoder are private), and a
        passthrough camera and the shared VP8 encoder need one. ``tests/test_contracts.py``
        pins the hook against the installed aiortc: its name and ``(self)`` signature, that
        RTCP PLI and FIR call it through the instance and that its flag drives aiortc's own
        encoder, and, over a real aiortc loopback, that a device's PLI and FIR reach the
        camera; it also fails once aiortc grows a public keyframe method, to switch to it.
        Should the hook vanish anyway, nothing breaks: nothing is wrapped, and a viewer
        waits for the camera's next periodic keyframe (``start_video`` still asks the
        camera; the shared VP8 encoder, like aiortc's own, makes keyframes only when
        asked, so a device's PLI would go unanswered as it would with aiortc's).
        """
        sender = self.video_sender
        flag = getattr(sender, "_send_keyframe", None)
        if not callable(flag):
            return

        def send_keyframe() -> None:
            flag()
            self.media.request_keyframe()

        sender._send_keyframe = send_keyframe  # type: ignore[method-assign]  # noqa: SLF001

    async def offer(self) -> str:
        """The next offer SDP (non-trickle: every candidate gathered), for its answer."""
        if self._awaiting_answer:
            raise RuntimeError("an offer already awaits its answer")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self._awaiting_answer = True
        return with_playout_delay(str(self.pc.localDescription.sdp))

    async def accept_answer(self, sdp: str) -> None:
        """Apply the device's answer; ValueError when it is not acceptable."""
        if not self._awaiting_answer:
            raise ValueError("no offer awaits an answer")
        self._awaiting_answer = False
        require_bundle(sdp)
        await self.pc.setRemoteDescription(RTCSessionDescription(without_mdns(sdp), "answer"))
        self._answered.set()
        if self.media_on and self.media_at is None:
            self.media_at = time.time()
        ext_id = playout_delay_id(sdp)
        ssrc = video_ssrc(str(self.pc.localDescription.sdp))
        if not self._marked and ext_id is not None and ssrc is not None:
            self._marked = True
            home = on_link(sdp, self._networks)
            self._mark_playout_delay(ext_id, ssrc, *(HOME_PLAYOUT_MS if home else AWAY_PLAYOUT_MS))

    def _media(self) -> None:
        """Renegotiate the audio section active, once (a ring; the rest is gates)."""
        if self.media_on:
            return
        self.media_on = True
        self._audio_tx.direction = "sendrecv"
        self._spawn(self._renegotiate(), "call-renegotiate")

    async def _renegotiate(self) -> None:
        await self._answered.wait()  # the connection's first offer has its answer
        if self.pc.signalingState == "closed":
            return  # closed while it waited (the device left, or a fault closed it)
        try:
            sdp = await self.offer()
        except InvalidStateError:
            # Closed between the check and the offer (aiortc closes a connection whose
            # transport failed in a task of its own): there is nobody to renegotiate with.
            log.info("calls: the connection closed before its audio was renegotiated")
            return
        self._send_offer(sdp)

    def _mark_playout_delay(self, ext_id: int, ssrc: int, min_ms: int, max_ms: int) -> None:
        """Put a ``playout-delay`` on every video packet the device took it for.

        aiortc (1.16) neither offers this extension nor writes it, and serialises its
        packets itself; the one place to add it is between serialising and encrypting,
        aiortc's private ``RTCDtlsTransport._send_rtp``, which every sender calls through
        its transport instance (the transport is public: ``sender.transport``). This
        wraps it on this connection's transport for the video's SSRC only.
        ``tests/test_contracts.py`` pins the name, the signature and the callers, and
        that a device receives the element; should the hook vanish, nothing breaks: the
        device presents with its own default delay.
        """
        transport = self.video_sender.transport
        send = getattr(transport, "_send_rtp", None)
        if not callable(send):
            return
        key = struct.pack("!I", ssrc)

        async def send_rtp(data: bytes) -> None:
            await send(add_playout_delay(data, key, ext_id, min_ms, max_ms))

        transport._send_rtp = send_rtp  # type: ignore[method-assign]  # noqa: SLF001

    # --- gates -------------------------------------------------------------------------------

    def start_video(self) -> None:
        """Send the camera to this device, newest frame first, from a keyframe."""
        self.rung = True
        self.video.open()
        if self.media.encoder is not None and not self._following:
            self._following = True  # one follower at a time (a gate reopened at once)
            self._spawn(self._follow_loss(self.media.encoder), "call-follow-loss")
        if not self.media_on:
            self._spawn(self._audio_after_ring(), "call-audio-after-ring")
        # aiortc's private hook (pinned: see _forward_keyframe_requests) is the only way
        # to make aiortc's own encoder send an IDR; wrapped, it reaches the camera too.
        force = getattr(self.video_sender, "_send_keyframe", None)
        if callable(force):  # the next frame a keyframe (reaches the camera's encoder too)
            force()
        else:
            self.media.request_keyframe()

    async def _follow_loss(self, encoder: SharedVp8Encoder) -> None:
        """While the video gate is open, this device's loss sets its shared VP8 rate.

        The loss comes from the device's receiver reports in aiortc's public
        ``RTCRtpSender.getStats`` (``remote-inbound-rtp``); ``MediaHub.device_rate`` runs
        the shared encoder at the lowest watching device's rate.
        """
        rate = LossRate(encoder.ceiling)
        try:
            while self.video.is_open:
                report = await self.video_sender.getStats()
                for stat in report.values():
                    if isinstance(stat, RTCRemoteInboundRtpStreamStats):
                        before = rate.rate
                        now = rate.update(stat.packetsLost, stat.packetsReceived)
                        if now != before:
                            log.debug("calls: a device lost %.1f%%: its rate %d bit/s",
                                      100 * (rate.loss or 0.0), now)
                        self.media.device_rate(self, now)
                await asyncio.sleep(LOSS_POLL_S)
        finally:
            self._following = False
            self.media.device_rate(self, None)

    async def _audio_after_ring(self) -> None:
        await asyncio.sleep(AUDIO_AFTER_RING_S)
        if self.video.is_open:  # still rung
            self._media()

    def stop_video(self) -> None:
        """Stop sending video."""
        self.video.close()

    def start_audio(self) -> None:
        """Two-way audio: door microphone to the device, the device to the door speaker."""
        self._media()
        self.audio.open()
        self.first_audio_at = None
        self.to_door = True

    def stop_audio(self) -> None:
        """No audio either way."""
        self.audio.close()
        self.to_door = False

    # --- events ------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        if self._closing:
            coro.close()  # never started: no "never awaited" warning either
            return
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_track(self, track: Any) -> None:
        if track.kind == "audio":
            consumer = self.media.consume(track, lambda: self.to_door, self._played)
            self._spawn(consumer, "call-device-audio")

    def _played(self, frame: Any) -> None:
        if self.first_audio_at is None and rms_level(frame) > AUDIBLE:
            self.first_audio_at = time.time()

    def _on_state(self) -> None:
        state = self.pc.connectionState
        log.debug("peer: connection %s", state)
        if state == "connected":
            if self.video.is_open:
                self.media.request_keyframe()
        elif state in {"failed", "closed"}:
            self._on_lost()

    def _on_message(self, message: Any) -> None:
        now = time.monotonic()
        if not isinstance(message, str) or len(message) > MAX_CHANNEL_MESSAGE:
            self._refusals.refused(now, "peer: refused a data channel message (binary or too big)")
            self._answer(denied(None))
        elif not self._bucket.take(now):
            rate = CHANNEL_RATE[0]
            self._refusals.refused(now, "peer: refused data channel messages beyond %.0f/s", rate)
            self._answer(denied(None))
        else:
            self._spawn(self._answer_unlock(message), "call-unlock")

    async def _answer_unlock(self, token: str) -> None:
        try:
            result = await self._unlock(token.strip())
        except Exception:
            log.exception("peer: answering an unlock command failed; it is denied")
            result = denied(jti_of(token))
        self._answer(result)

    def _answer(self, result: dict[str, Any]) -> None:
        channel = self.channel
        if channel.readyState == "open" and channel.bufferedAmount < MAX_ANSWERS_BUFFERED:
            channel.send(json.dumps(result))

    async def close(self) -> None:
        """Close the connection and stop the tracks."""
        self._closing = True  # nothing new is spawned on a closing connection
        self.video.stop()
        self.audio.stop()
        for task in list(self._tasks):
            task.cancel()
        # Shielded: aiortc's close, cancelled half-way (its caller cancelled: a session
        # closing while it retires a connection), leaves a connection whose next close
        # never returns.
        try:
            await asyncio.shield(self.pc.close())
        except Exception as exc:  # noqa: BLE001 - aiortc's own fault, handled below
            # A device's malformed answer can leave aiortc's connection half set up (its
            # SCTP transport without a DTLS transport), and its close then stops at the
            # first part missing, leaving the ICE and DTLS transports after it running.
            log.info("calls: closing a half-set-up connection (%r); stopping its transports",
                     exc)
            await stop_transports(self.pc)


def require_bundle(sdp: str) -> None:
    """ValueError unless one ``a=group:BUNDLE`` holds every media section of ``sdp``.

    The station's offers bundle everything on one transport, and browsers answer so.
    aiortc takes an answer that does not, and then fails in a task of its own (a
    transceiver without a transport) with nothing to show for it but a logged error.
    """
    lines = sdp.splitlines()
    mids = [line[6:].strip() for line in lines if line.startswith("a=mid:")]
    groups = [line[len("a=group:BUNDLE"):].split() for line in lines
              if line.startswith("a=group:BUNDLE")]
    if not mids or len(groups) != 1 or sorted(groups[0]) != sorted(mids):
        raise ValueError("the answer must bundle every media section (a=group:BUNDLE)")


async def stop_transports(pc: RTCPeerConnection) -> None:
    """Stop every DTLS and ICE transport of ``pc`` that is there (public aiortc API)."""
    dtls = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None and pc.sctp.transport is not None:
        dtls.append(pc.sctp.transport)
    for transport in dtls:
        if transport is None:
            continue
        with contextlib.suppress(Exception):
            await transport.stop()
        with contextlib.suppress(Exception):
            await transport.transport.stop()


def _quiet_idle_reports(sender: RTCRtpSender, track: GatedTrack) -> None:
    """Send no RTCP sender report while the sender has sent nothing since its last one.

    aiortc sends a sender report (with its SDES) from every sender every 0.5-1.5 s, even
    from one whose gate has been closed for hours: two per idle device per second, each
    built, SRTP-protected and sent by the station, then received by the device. With a
    building's devices online these reports were most of the station's idle work and
    packets (``scripts/bench devices``). A report that says "nothing was sent" tells the
    device nothing: RFC 3550 has a participant that is not sending send none, and ICE
    consent checks keep the path alive. So while the gate is closed and no frame went
    out since the last report, a report-only compound is dropped; every other RTCP
    packet (a BYE at the end) and every report while frames flow goes out as before.

    This wraps aiortc's private ``RTCRtpSender._send_rtcp`` on the instance, which its
    report loop calls through ``self`` (aiortc 1.16 has no setting for the report
    interval). ``tests/test_contracts.py`` pins the name, the signature, the caller and
    the effect over a real aiortc connection. Should the hook vanish, nothing breaks:
    the reports are just sent as before.
    """
    send = getattr(sender, "_send_rtcp", None)
    if not callable(send):
        return
    reported = [0]  # track.frames at the last report that went out (none yet: 0)

    async def send_rtcp(packets: list[Any]) -> None:
        idle = not track.is_open and track.frames == reported[0]
        if idle and all(isinstance(p, (RtcpSrPacket, RtcpSdesPacket)) for p in packets):
            return
        reported[0] = track.frames
        await send(packets)

    sender._send_rtcp = send_rtcp  # type: ignore[method-assign]  # noqa: SLF001


def quiet_close_races(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Log aiortc's "closed while connecting" task failure at DEBUG; returns the undo.

    aiortc starts the connection of an answered offer in a task of its own that nobody
    awaits; when the device's socket closes (and with it the peer connection) while that
    task still runs, it fails with ``InvalidStateError("RTCIceTransport is closed")`` and
    asyncio logs "Task exception was never retrieved" as an ERROR with a traceback. That
    is a device leaving, not a fault of the station: it is noted at DEBUG. Every other
    unretrieved exception goes to the loop's handler as before.
    """
    previous = loop.get_exception_handler()

    def handler(current: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, InvalidStateError) and "RTCIceTransport is closed" in str(exc):
            log.debug("peer: a connection attempt ended by its close: %s", exc)
            return
        if previous is not None:
            previous(current, context)
        else:
            current.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)
