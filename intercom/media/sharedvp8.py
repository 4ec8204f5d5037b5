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
bitrate: ``bitrate_for`` (800 kbit/s for 640x480 at 15 fps, ``docs/calls.md``).
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


def bitrate_for(width: int, height: int, fps: int) -> int:
    """The one bitrate of the shared encoder for frames of this size and rate."""
    return max(MIN_BITRATE, min(MAX_BITRATE, round(width * height * fps * BITS_PER_PIXEL)))


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

    def watch(self, viewers: int) -> None:
        """How many gates are open now; with none, nothing is encoded."""
        if viewers > 0 and self._viewers == 0:
            self._keyframe = True  # the first packet after idling: the newest frame, whole
        self._viewers = viewers
        self._wake.set()

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
            if keyframe:
                self.keyframes += 1
            return packet

    def _make_codec(self, frame: Any) -> Any:
        import av  # noqa: PLC0415

        bitrate = bitrate_for(frame.width, frame.height, self.fps)
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
        return codec

    def _encode(self, frame: Any, keyframe: bool) -> Any:
        """In a worker thread: one frame to one packet (None if the encoder gave none)."""
        import av  # noqa: PLC0415

        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        with self._codec_lock:
            size = (frame.width, frame.height)
            if self._codec is not None and (self._codec.width, self._codec.height) != size:
                self._codec, keyframe = None, True
            if self._codec is None:
                self._codec = self._make_codec(frame)
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
