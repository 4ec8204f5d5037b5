"""One VP8 encoder for every device that is sent video, instead of one per device.

aiortc encodes a frame source separately for each peer connection: a ring of a flat with
ten devices starts ten VP8 encoders at once, each making its own keyframe of the same
frame. This encoder makes the packets once (libvpx with aiortc's own real-time settings)
and every device's sender only packetises them (aiortc's ``Vp8Encoder.pack``, its public
way in for encoded frames). It encodes only while at least one video gate is open
(``watch``); while none is, it keeps the newest frame and encodes nothing, so an idle
station costs what it did. ``request_keyframe`` makes the next packet a keyframe, made at
once from the newest frame (one tick after it when that frame was sent already), so a
device that joins does not wait for the camera's next frame.

The cost: no per-device bitrate. aiortc adapts each sender's encoder to the device's
congestion feedback (REMB, 250 kbit/s to 1.5 Mbit/s); one encoder for all has one
bitrate. It starts at ``bitrate_for`` (800 kbit/s for 640x480 at 15 fps, its ceiling) and
follows the worst watching device: each device's receiver reports (``LossRate``, fed by
``DevicePeer`` from aiortc's public ``RTCRtpSender.getStats``) lower its own rate on
loss, and ``limit`` sets the encoder to the lowest of them, so a device on a link slower
than the encoder's rate is sent less rather than losing packets (and so are the others
watching with it). As aiortc's own encoder does, a change of more than 10 % opens a new
libvpx encoder, whose first packet is a keyframe. On a link without loss nothing changes.
``docs/calls.md`` and ``docs/benchmarks.md`` have the measurements.
"""

from __future__ import annotations

import asyncio
import fractions
import threading
from collections.abc import Awaitable, Callable
from typing import Any

TIME_BASE = fractions.Fraction(1, 90_000)
# 800 kbit/s for 640x480 at 15 fps, in proportion for other sizes and rates, within the
# range aiortc's own VP8 encoder adapts over.
BITS_PER_PIXEL = 800_000 / (640 * 480 * 15)
MIN_BITRATE, MAX_BITRATE = 250_000, 1_500_000


# The classic loss-based controller (RFC 3550 receiver reports, as in early WebRTC): above
# 10 % loss cut the rate by half the loss, below 2 % raise it by 5 %, else hold it.
HIGH_LOSS, LOW_LOSS, RAISE = 0.10, 0.02, 1.05
RECREATE_CHANGE = 0.10  # a new libvpx encoder only for a change above this (aiortc's rule)


def bitrate_for(width: int, height: int, fps: int) -> int:
    """The one bitrate of the shared encoder for frames of this size and rate."""
    return max(MIN_BITRATE, min(MAX_BITRATE, round(width * height * fps * BITS_PER_PIXEL)))


class LossRate:
    """One device's rate from its receiver reports' cumulative counts.

    ``update`` takes a report's cumulative ``packetsLost`` and ``packetsReceived`` (a
    ``remote-inbound-rtp`` stat); the loss between two reports moves the rate, within
    ``MIN_BITRATE`` and ``ceiling``. A report with nothing new (the same counts) changes
    nothing.
    """

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.rate = ceiling
        self.loss: float | None = None  # the newest interval's share lost
        self._counts: tuple[int, int] | None = None

    def update(self, lost: int, received: int) -> int:
        """The rate after a report with these cumulative counts."""
        previous, self._counts = self._counts, (lost, received)
        if previous is None:
            return self.rate
        new_lost, new_received = lost - previous[0], received - previous[1]
        expected = new_lost + new_received
        if expected <= 0:
            return self.rate  # the same report again, or nothing sent since
        self.loss = loss = min(1.0, max(0.0, new_lost / expected))
        if loss > HIGH_LOSS:
            self.rate = round(self.rate * (1 - 0.5 * loss))
        elif loss < LOW_LOSS:
            self.rate = round(self.rate * RAISE)
        self.rate = max(MIN_BITRATE, min(self.ceiling, self.rate))
        return self.rate


class SharedVp8Encoder:
    """VP8 packets (``av.Packet``) from a source of frames, one encoder for all consumers."""

    mime_type = "video/VP8"

    def __init__(self, next_frame: Callable[[], Awaitable[Any]], fps: int, name: str = "") -> None:
        self._next_frame = next_frame
        self.name = f"{name}+vp8"
        self.fps = fps
        self.codecs_made = 0  # libvpx encoders opened (one, unless the frame size changes)
        self.keyframes = 0  # keyframes encoded
        self._codec: Any = None
        self._codec_lock = threading.Lock()  # libvpx's context: one thread at a time
        self._pending: asyncio.Future[Any] | None = None
        self._last: Any = None  # the newest frame
        self._last_sent = False  # ... and it has been encoded already
        self._last_pts = -1  # the newest packet's pts (ticks of TIME_BASE)
        self._keyframe = True
        self._viewers = 0
        self._wake = asyncio.Event()
        self._limit: int | None = None  # the worst watching device's rate (None: none)
        self.bitrate = 0  # the open encoder's bitrate (0 before the first)

    def watch(self, viewers: int) -> None:
        """How many gates are open now; with none, nothing is encoded."""
        if viewers > 0 and self._viewers == 0:
            self._keyframe = True  # the first packet after idling: the newest frame, whole
        self._viewers = viewers
        self._wake.set()

    @property
    def ceiling(self) -> int:
        """The most a device can be given: ``bitrate_for`` the newest frame's size.

        Before the first frame, ``MAX_BITRATE``.
        """
        if self._last is None:
            return MAX_BITRATE
        return bitrate_for(self._last.width, self._last.height, self.fps)

    def limit(self, bitrate: int | None) -> None:
        """At most this bitrate (the worst watching device's), or None: ``bitrate_for``.

        Takes effect at the next frame, with a new libvpx encoder (its first packet a
        keyframe) only when the bitrate moves by more than 10 %.
        """
        self._limit = bitrate

    def _target(self, frame: Any) -> int:
        nominal = bitrate_for(frame.width, frame.height, self.fps)
        if self._limit is None:
            return nominal
        return max(MIN_BITRATE, min(nominal, self._limit))

    def request_keyframe(self) -> None:
        """Make the next packet a keyframe, from the newest frame, now (a device joined)."""
        self._keyframe = True
        self._wake.set()

    async def next(self) -> Any:
        """The next packet: waits while nobody watches, keeping the newest frame."""
        loop = asyncio.get_running_loop()
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._next_frame())
            ready_now = self._viewers > 0 and self._keyframe and self._last is not None
            if not ready_now:
                self._wake.clear()
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({self._pending, woken}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
            if self._pending.done():
                self._last, self._pending = self._pending.result(), None
                self._last_sent = False
            if self._viewers == 0 or self._last is None:
                continue
            if self._last_sent and not self._keyframe:
                continue  # woken for nothing new: wait for the next frame
            frame, keyframe = self._last, self._keyframe
            self._keyframe = False
            self._last_sent = True
            packet = await loop.run_in_executor(None, self._encode, frame, keyframe)
            if packet is None:
                self._keyframe = self._keyframe or keyframe
                continue
            # A repeat of a frame already sent must still move forward in time.
            self._last_pts = pts = max(_ticks(frame), self._last_pts + 1)
            packet.pts, packet.dts, packet.time_base = pts, pts, TIME_BASE
            if packet.is_keyframe:  # asked for, or a new encoder's first
                self.keyframes += 1
            return packet

    def _make_codec(self, frame: Any, bitrate: int) -> Any:
        import av  # noqa: PLC0415

        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = frame.width, frame.height
        codec.pix_fmt = "yuv420p"
        codec.time_base = TIME_BASE
        codec.bit_rate = bitrate
        codec.gop_size = 3000  # keyframes only when asked for
        codec.qmin, codec.qmax = 2, 56
        codec.thread_count = 1
        # aiortc's Vp8Encoder settings (real time, no lag, constant bitrate).
        codec.options = {
            "bufsize": str(bitrate),
            "cpu-used": "-6",
            "deadline": "realtime",
            "lag-in-frames": "0",
            "minrate": str(bitrate),
            "maxrate": str(bitrate),
            "noise-sensitivity": "4",
            "overshoot-pct": "15",
            "partitions": "0",
            "static-thresh": "1",
            "undershoot-pct": "100",
        }
        self.codecs_made += 1
        self.bitrate = bitrate
        return codec

    def _encode(self, frame: Any, keyframe: bool) -> Any:
        """In a worker thread: one frame to one packet (None if the encoder gave none)."""
        import av  # noqa: PLC0415

        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        with self._codec_lock:
            size = (frame.width, frame.height)
            target = self._target(frame)
            if self._codec is not None and (
                (self._codec.width, self._codec.height) != size
                or abs(target - self.bitrate) > RECREATE_CHANGE * self.bitrate
            ):
                self._codec, keyframe = None, True
            if self._codec is None:
                self._codec = self._make_codec(frame, target)
            picture = av.video.frame.PictureType
            frame.pict_type = picture.I if keyframe else picture.NONE
            packets = self._codec.encode(frame)
        if not packets:
            return None
        if len(packets) == 1:
            return packets[0]
        joined = av.Packet(b"".join(bytes(p) for p in packets))  # not with lag-in-frames 0
        joined.is_keyframe = keyframe
        return joined

    def close(self) -> None:
        """Stop reading frames and let the encoder go.

        An encode still running in its thread holds its own reference to the encoder,
        so it is freed after that encode, never under it.
        """
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._codec = None


def _ticks(frame: Any) -> int:
    """The frame's time in ticks of TIME_BASE (0 when it has none)."""
    if frame.pts is None or frame.time_base is None:
        return 0
    return int(frame.pts * frame.time_base / TIME_BASE)
