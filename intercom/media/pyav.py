"""A camera read through PyAV: a V4L2 device (a USB webcam) or a video file (looped)."""

from __future__ import annotations

import asyncio
import fractions
import logging
import threading
import time
from typing import Any

from intercom.config import CameraConfig
from intercom.errors import HardwareError

log = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90_000
TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class PyAVCamera:
    """Decodes frames in a thread of its own; ``next`` returns the newest one."""

    encoded = False

    def __init__(self, device: str, v4l2: bool, config: CameraConfig) -> None:
        self.device = device
        self.v4l2 = v4l2
        self.config = config
        self.name = "v4l2" if v4l2 else "file"
        self._container: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._latest: Any = None
        self._fresh = asyncio.Event()

    def _v4l2_options(self) -> dict[str, str]:
        size = f"{self.config.width}x{self.config.height}"
        return {"video_size": size, "framerate": str(self.config.fps)}

    def _open_container(self) -> Any:
        import av  # noqa: PLC0415

        if self.v4l2:
            return av.open(self.device, format="v4l2", options=self._v4l2_options())
        return av.open(self.device)

    def _check_container(self) -> None:
        if not self._container.streams.video:
            raise HardwareError(f"media.camera.device: {self.device} has no video stream")
        self._check_stream(self._container.streams.video[0])

    def _check_stream(self, stream: Any) -> None:
        """Refuse a video stream this camera cannot use (any will do here)."""

    async def open(self) -> None:
        """Open the device or file; a missing one is a HardwareError naming it."""
        import av  # noqa: PLC0415

        self._loop = asyncio.get_running_loop()
        try:
            self._container = await self._loop.run_in_executor(None, self._open_container)
        except (av.FFmpegError, OSError) as exc:
            raise HardwareError(f"media.camera.device: cannot open {self.device}: {exc}") from exc
        try:
            self._check_container()
        except HardwareError:
            self._container.close()
            raise
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}")
        self._thread.daemon = True
        self._thread.start()

    def _run(self) -> None:
        self._decode()

    def _decode(self) -> None:
        if self._loop is None:
            return
        interval = 1 / self.config.fps
        step = round(VIDEO_CLOCK_RATE / self.config.fps)
        count = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                for frame in self._container.decode(video=0):
                    if self._stopping.is_set():
                        return
                    if not self.v4l2 or frame.pts is None:
                        # A file's timestamps start again at each loop (a raw .h264 file
                        # has none): encoders need them to rise, so they are counted here.
                        frame.pts, frame.time_base = count * step, TIME_BASE
                    count += 1
                    self._loop.call_soon_threadsafe(self._deliver, frame)
                    if not self.v4l2:  # a file plays at the configured rate
                        started += interval
                        time.sleep(max(0.0, started - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - a device fault must not kill the station
                log.warning("camera %s: decoding stopped: %s", self.device, exc)
                return
            if self.v4l2 or not self._rewind():
                return

    def _rewind(self) -> bool:
        """Back to the file's start; False when that fails (the camera then stops).

        A raw stream (an Annex-B ``.h264`` file) cannot seek: it is opened again.
        """
        try:
            self._container.seek(0)
        except Exception:  # noqa: BLE001 - av.error.* subclasses: try the other way
            try:
                self._container.close()
                self._container = self._open_container()
            except Exception as exc:  # noqa: BLE001 - a device fault must not kill the station
                log.warning("camera %s: cannot loop the file: %s", self.device, exc)
                return False
        return True

    def _deliver(self, frame: Any) -> None:
        self._latest = frame
        self._fresh.set()

    async def next(self) -> Any:
        """The newest decoded frame (waits for one newer than the last returned)."""
        await self._fresh.wait()
        self._fresh.clear()
        return self._latest

    def request_keyframe(self) -> None:
        """Frames are decoded here; the sender's encoder makes keyframes."""

    async def close(self) -> None:
        """Stop decoding and close the device."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 2)
        if self._container is not None:
            self._container.close()
