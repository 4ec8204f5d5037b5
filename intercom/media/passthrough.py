"""H.264 straight from a V4L2 camera or a file, as packets: no decoding, no re-encoding.

The packets are Annex-B with SPS/PPS in band (an MP4's AVCC packets go through FFmpeg's
``h264_mp4toannexb`` filter), which is what aiortc sends as it is. A file loops with
timestamps that keep rising. Neither source can be asked for an IDR: a new viewer waits
for the source's next keyframe (keep its keyframe interval short).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from intercom.config import CameraConfig
from intercom.errors import HardwareError
from intercom.media.pyav import PyAVCamera

log = logging.getLogger(__name__)


class H264PassthroughCamera(PyAVCamera):
    """Annex-B H.264 packets read in a thread of their own."""

    encoded = True

    def __init__(self, device: str, v4l2: bool, config: CameraConfig) -> None:
        super().__init__(device, v4l2, config)
        self.name = "v4l2-h264" if v4l2 else "file-h264"
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=60)
        self.keyframe_requests = 0

    def _v4l2_options(self) -> dict[str, str]:
        return {**super()._v4l2_options(), "input_format": "h264"}

    def _check_stream(self, stream: Any) -> None:
        """Refuse a stream that is not H.264: it cannot pass through."""
        if stream.codec_context.name != "h264":
            raise HardwareError(
                f"media.camera.passthrough: {self.device} carries "
                f"{stream.codec_context.name}, not H.264"
            )

    def _run(self) -> None:
        self._read()

    def _read(self) -> None:
        from av.bitstream import BitStreamFilterContext  # noqa: PLC0415

        interval = 1 / self.config.fps
        offset = 0  # added to a looping file's timestamps
        due = time.monotonic()
        while not self._stopping.is_set():
            stream = self._container.streams.video[0]
            annexb = BitStreamFilterContext("h264_mp4toannexb", stream)
            step = round(1 / (self.config.fps * stream.time_base))  # a frame in stream ticks
            last, count = 0, 0
            try:
                for packet in self._container.demux(stream):
                    if packet.size == 0:
                        continue
                    for out in annexb.filter(packet):
                        if self._stopping.is_set():
                            return
                        # A raw .h264 file (Annex-B, as a camera gives it) has no
                        # timestamps: number its frames at the configured rate.
                        pts = out.pts if out.pts is not None else count * step
                        count += 1
                        last = max(last, pts)
                        out.pts = pts + offset
                        out.dts = out.pts
                        self._hand_over(out)
                        if not self.v4l2:
                            due += interval
                            time.sleep(max(0.0, due - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - a device fault must not kill the station
                log.warning("camera %s: reading stopped: %s", self.device, exc)
                return
            if self.v4l2:
                return
            offset += last + step
            if not self._rewind():
                return

    def _hand_over(self, packet: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._put, packet)

    def _put(self, packet: Any) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # a live view wants the newest
        self._queue.put_nowait(packet)

    async def next(self) -> Any:
        """The next packet."""
        return await self._queue.get()

    def request_keyframe(self) -> None:
        """Not possible with these sources: the viewer waits for the next keyframe."""
        self.keyframe_requests += 1
