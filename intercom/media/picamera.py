"""The Raspberry Pi camera through picamera2, with the hardware H.264 encoder.

Packets go to the peers as they are (no re-encoding on the Pi). ``request_keyframe``
asks the V4L2 encoder for an IDR when a peer joins. picamera2 exists only on Raspberry
Pi OS; it is imported here, lazily, and only when the config selects it.
"""

from __future__ import annotations

import asyncio
import fcntl
import fractions
import logging
import struct
from collections.abc import Callable
from typing import Any

from intercom.config import CameraConfig
from intercom.errors import HardwareError

log = logging.getLogger(__name__)

V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME = 0x009909E5
VIDIOC_S_CTRL = 0xC008561C
TIME_BASE = fractions.Fraction(1, 1_000_000)


class Picamera2Camera:
    """Annex-B H.264 packets from the Pi's camera and hardware encoder."""

    encoded = True
    name = "picamera2"

    def __init__(self, config: CameraConfig) -> None:
        self.config = config
        self._camera: Any = None
        self._encoder: Any = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=30)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called on every YUV420 frame (buffer, width, height, stride) before the encoder
        # sees it: the privacy zones are burnt in here (intercom.privacy.camera).
        self.frame_filter: Callable[[Any, int, int, int], None] | None = None
        self._still: asyncio.Future[Any] | None = None
        self._stride = 0

    async def open(self) -> None:
        """Start the camera and the encoder."""
        try:
            from picamera2 import Picamera2  # noqa: PLC0415
            from picamera2.encoders import H264Encoder  # noqa: PLC0415
            from picamera2.outputs import Output  # noqa: PLC0415
        except ImportError as exc:
            raise HardwareError(
                "media.camera.source: picamera2 is not installed or cannot load libcamera "
                f"({exc}); install the 'pi' extra on Raspberry Pi OS, or choose v4l2/file/synthetic"
            ) from exc
        self._loop = asyncio.get_running_loop()
        camera = self

        class _ToQueue(Output):  # type: ignore[misc]
            def outputframe(
                self,
                frame: bytes,
                keyframe: bool = True,
                timestamp: Any = None,
                *_args: Any,
                **_kwargs: Any,
            ) -> None:
                if camera._loop is not None:
                    camera._loop.call_soon_threadsafe(camera._put, frame, keyframe, timestamp)

        try:
            self._camera = Picamera2()
            size = (self.config.width, self.config.height)
            video = self._camera.create_video_configuration(
                main={"size": size, "format": "YUV420"}, controls={"FrameRate": self.config.fps}
            )
            self._camera.configure(video)
            self._stride = int(self._camera.stream_configuration("main")["stride"])
            # Runs in picamera2's thread on each request before the encoder gets it.
            # This cannot run here (no Pi camera): tests exercise the filter itself.
            self._camera.pre_callback = self._pre_callback
            self._encoder = H264Encoder(bitrate=1_500_000, repeat=True, iperiod=self.config.fps * 4)
            self._camera.start_recording(self._encoder, _ToQueue())
        except Exception as exc:
            raise HardwareError(f"media.camera: cannot start the Pi camera: {exc}") from exc

    def _pre_callback(self, request: Any) -> None:
        from picamera2 import MappedArray  # noqa: PLC0415

        width, height = self.config.width, self.config.height
        with MappedArray(request, "main") as mapped:
            if self.frame_filter is not None:
                self.frame_filter(mapped.array, width, height, self._stride)
            if self._still is not None and self._loop is not None:
                copy = mapped.array.copy()
                self._loop.call_soon_threadsafe(self._give_still, copy)

    def _give_still(self, buffer: Any) -> None:
        import av  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415

        future, self._still = self._still, None
        if future is None or future.done():
            return
        width, height, stride = self.config.width, self.config.height, self._stride
        flat = np.asarray(buffer).reshape(-1)
        y = flat[: height * stride].reshape(height, stride)[:, :width]
        chroma = flat[height * stride :].reshape(height, stride // 2)[:, : width // 2]
        i420 = np.concatenate([y, chroma.reshape(height // 2, width)])
        future.set_result(av.VideoFrame.from_ndarray(np.ascontiguousarray(i420), "yuv420p"))

    async def still(self) -> Any:
        """The next frame as it went to the encoder (zones masked), decoded."""
        if self._loop is None:
            raise HardwareError("media.camera: the Pi camera is not open")
        if self._still is None:
            self._still = self._loop.create_future()
        return await asyncio.wait_for(asyncio.shield(self._still), 5)

    def _put(self, data: bytes, keyframe: bool, timestamp: Any) -> None:
        import av  # noqa: PLC0415

        packet = av.Packet(data)
        packet.pts = int(timestamp or 0)
        packet.time_base = TIME_BASE
        packet.is_keyframe = bool(keyframe)
        if self._queue.full():
            self._queue.get_nowait()  # drop the oldest: a live view wants the newest
        self._queue.put_nowait(packet)

    async def next(self) -> Any:
        """The next encoded packet."""
        return await self._queue.get()

    def request_keyframe(self) -> None:
        """Ask the hardware encoder for an IDR now (V4L2 FORCE_KEY_FRAME)."""
        fd: Any = getattr(self._encoder, "vd", None)
        fileno = fd.fileno() if hasattr(fd, "fileno") else fd
        if not isinstance(fileno, int):
            log.debug("camera: encoder not running, no keyframe forced")
            return
        try:
            control = struct.pack("Ii", V4L2_CID_MPEG_VIDEO_FORCE_KEY_FRAME, 1)
            fcntl.ioctl(fileno, VIDIOC_S_CTRL, control)
        except OSError as exc:
            log.warning("camera: cannot force a keyframe: %s", exc)

    async def close(self) -> None:
        """Stop recording and release the camera."""
        if self._camera is not None:
            try:
                self._camera.stop_recording()
            finally:
                self._camera.close()
