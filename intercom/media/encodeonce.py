"""Encode once for every peer: a frame camera turned into H.264 packets by one encoder.

aiortc encodes a frame source separately for each peer; with four residents rung that is
four encoders. This wrapper encodes once (libx264, ultrafast, zero latency, SPS/PPS
repeated in band) and hands the same Annex-B packets to every peer, as the Pi's hardware
encoder does. ``request_keyframe`` makes the next packet an IDR. Encoding runs in a
worker thread, off the event loop. The cost: no per-peer bitrate adaptation.

A keyframe is kept ready: while nobody receives the packets (the call hub says so through
``watch``), every frame is encoded as an IDR, about as cheap as a P-frame with x264
(about 1 ms for 640x480 here) and, under the same bitrate, smaller than an IDR made amid
P-frames. A peer that joins starts from the newest packet at once, and the keyframe
request that comes with the joining is already answered by it: a press only sends.
Once someone receives, P-frames follow and the quality rises to the bitrate's.
"""

from __future__ import annotations

import asyncio
import fractions
import threading
from typing import Any

from intercom.media.base import CameraSource

TIME_BASE = fractions.Fraction(1, 90_000)


class EncodeOnceCamera:
    """H.264 packets from a frame source, one encoder for all consumers."""

    encoded = True

    def __init__(self, inner: CameraSource, fps: int, bitrate: int = 1_000_000) -> None:
        self.inner = inner
        self.name = f"{inner.name}+x264"
        self.fps = fps
        self.bitrate = bitrate
        self._codec: Any = None
        self._keyframe = True
        self.keyframes_requested = 0
        self._pending: asyncio.Future[Any] | None = None
        self._codec_lock = threading.Lock()  # x264's context: one thread at a time
        self._last: Any = None
        self._wake = asyncio.Event()
        self._viewers: int | None = None  # None: not told, so never all-IDR
        self._last_was_idr = False  # the newest packet handed out is an IDR
        self._ready = False  # a viewer joined this event-loop turn, the newest packet an IDR

    async def open(self) -> None:
        """Open the frame source; the encoder is made at the first frame (its size)."""
        await self.inner.open()

    def _make_codec(self, frame: Any) -> Any:
        import av  # noqa: PLC0415

        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height = frame.width, frame.height
        codec.pix_fmt = "yuv420p"
        codec.framerate = fractions.Fraction(self.fps, 1)
        codec.time_base = TIME_BASE
        codec.bit_rate = self.bitrate
        codec.options = {
            "preset": "ultrafast",
            "tune": "zerolatency",
            "x264-params": "repeat-headers=1:keyint=600:min-keyint=600:scenecut=0",
        }
        return codec

    def _encode(self, frame: Any, keyframe: bool) -> list[Any]:
        import av  # noqa: PLC0415

        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        # One encode at a time, and never while the encoder is freed: x264 crashes the
        # process (SIGABRT, SIGSEGV) when its context is used from two threads at once.
        with self._codec_lock:
            if self._codec is None:
                self._codec = self._make_codec(frame)
            # A decoded frame (a file or V4L2 source) keeps its decoder's picture type,
            # which x264 would obey: only a keyframe is forced, else x264's choice.
            picture = av.video.frame.PictureType
            frame.pict_type = picture.I if keyframe else picture.NONE
            packets: list[Any] = self._codec.encode(frame)
        return packets

    def _free_codec(self) -> None:
        with self._codec_lock:
            self._codec = None

    async def next(self) -> Any:
        """The next encoded packet; after ``request_keyframe``, an IDR at once.

        The IDR is made from the newest frame already captured (with a timestamp one
        tick later), so a peer that joins does not wait for the camera's next frame.
        """
        loop = asyncio.get_running_loop()
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self.inner.next())
            if not (self._keyframe and self._last is not None):
                self._wake.clear()
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({self._pending, woken}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
            if self._pending.done():
                frame, self._pending = self._pending.result(), None
            elif self._keyframe and self._last is not None:
                frame = self._last
                frame.pts = (frame.pts or 0) + 1  # a repeat must still move forward
            else:
                continue
            self._last = frame
            keyframe = self._keyframe or self._viewers == 0  # nobody watches: keep one ready
            self._keyframe = False
            packets = await loop.run_in_executor(None, self._encode, frame, keyframe)
            if packets:
                packet = packets[0]
                packet.time_base = TIME_BASE
                self._last_was_idr = keyframe
                return packet
            self._keyframe = self._keyframe or keyframe

    def request_keyframe(self) -> None:
        """Make the next packet an IDR, from the newest frame, now (a peer has joined).

        Not needed when a peer joined in this event-loop turn and the newest packet, the
        one it starts from, is an IDR already (see ``watch``).
        """
        self.keyframes_requested += 1
        if self._ready:
            return
        self._keyframe = True
        self._wake.set()

    def watch(self, viewers: int) -> None:
        """How many peers receive the packets now; while none do, every frame is an IDR."""
        joined = self._viewers is not None and viewers > self._viewers
        self._viewers = viewers
        if joined and self._last_was_idr and not self._ready:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            # The keyframe request that comes with this joining is answered by the newest
            # packet; a later one (a device's picture loss indication) gets a new IDR.
            self._ready = True
            loop.call_soon(self._spend_ready)

    def _spend_ready(self) -> None:
        self._ready = False

    async def close(self) -> None:
        """Close the frame source."""
        if self._pending is not None:
            self._pending.cancel()
        await self.inner.close()
        # An encode may still run in its thread (its awaiting task cancelled, the thread
        # not): the encoder is freed after it, in a thread, never under it.
        await asyncio.get_running_loop().run_in_executor(None, self._free_codec)
