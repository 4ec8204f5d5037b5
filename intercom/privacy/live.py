"""The redacted live view: the door camera with faces pixelated and zones masked.

Managers may watch the door (``intercom.calls.whep``), but never see it as residents
answering a call do: every frame they get has gone through ``redacted_copy``, the
station's one live redaction (``intercom.privacy.camera``). One ``RedactedTrack`` reads
the shared camera through a gate of the calls' ``MediaHub`` on the camera itself
(``camera_track``: the same relay the residents' peers read, so the camera is read once,
but its frames, not the VP8 the residents' devices share) and redacts each frame once, in a
worker thread, for every viewer; an aiortc ``MediaRelay`` hands the result to each
viewer's encoder. A camera that gives H.264 packets (the Pi's hardware encoder,
``encode_once``, passthrough) is decoded here first: redaction needs pixels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from intercom.privacy.camera import redacted_copy
from intercom.privacy.zones import ZoneMasks

log = logging.getLogger(__name__)

KEYFRAME_ASK_S = 1.0  # at most one IDR asked for a second while packets do not decode


class RedactedTrack(MediaStreamTrack):
    """A video track of redacted frames made from ``source`` (frames or H.264 packets)."""

    kind = "video"

    def __init__(
        self,
        source: MediaStreamTrack,
        masks: Callable[[], ZoneMasks],
        redactor: Any,
        keyframe: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__()
        self._source = source
        self._masks = masks  # called per frame: zones drawn later apply at once
        self._redactor = redactor
        self._keyframe = keyframe  # asks an H.264 camera for an IDR
        self._asked_at = -KEYFRAME_ASK_S
        self._decoder: Any = None
        self.frames = 0  # frames handed out, redacted

    async def recv(self) -> Any:
        """The next redacted frame."""
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            item = await self._source.recv()
            frame = await asyncio.to_thread(self._redact, item)
            if frame is not None:
                self.frames += 1
                return frame
            # A packet that did not decode (no keyframe yet, or a reference lost): ask the
            # camera for an IDR, as a device's picture loss indication does, once a second.
            now = time.monotonic()
            if _is_packet(item) and now - self._asked_at >= KEYFRAME_ASK_S:
                self._asked_at = now
                self._keyframe()

    def _redact(self, item: Any) -> Any:
        """In a worker thread: decode when needed, then redact the newest frame."""
        frame = self._decode(item) if _is_packet(item) else item
        if frame is None:
            return None
        return redacted_copy(frame, self._masks(), self._redactor)

    def _decode(self, packet: Any) -> Any:
        import av  # noqa: PLC0415

        if self._decoder is None:
            self._decoder = av.CodecContext.create("h264", "r")
        try:
            frames = self._decoder.decode(packet)
        except av.FFmpegError as exc:  # a lost reference: wait for the next keyframe
            log.debug("live view: cannot decode a packet: %s", exc)
            return None
        if not frames:
            return None
        frame = frames[-1]
        frame.pts, frame.time_base = packet.pts, packet.time_base
        return frame

    def stop(self) -> None:
        """Stop, and leave the camera's relay."""
        super().stop()
        self._source.stop()


def _is_packet(item: Any) -> bool:
    import av  # noqa: PLC0415

    return isinstance(item, av.Packet)
