"""The station's camera as every consumer sees it: zones masked at the source.

``station.camera`` is this wrapper whenever zones or redaction are configured, so peers,
snapshots and previews all read the same masked frames. A source of decoded frames is
masked here, before any encoder; the Pi's camera, whose frames go to the hardware
encoder, is handed the mask as its ``frame_filter`` and applies it in picamera2's
pre-callback, before the encoder sees the frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from intercom.config import PrivacyConfig
from intercom.errors import HardwareError
from intercom.media.base import CameraSource
from intercom.privacy.zones import ZoneMasks, i420_planes

log = logging.getLogger(__name__)

STILL_MAX_AGE_S = 0.5


class PrivacyCamera:
    """Wraps a camera source: every frame it gives out has the zones masked."""

    def __init__(self, inner: CameraSource, config: PrivacyConfig) -> None:
        self.inner = inner
        self.masks = ZoneMasks(config.zones)
        self.redact = config.redact_all_outputs
        self._redactor: Any = None
        self.encoded = inner.encoded
        self.name = inner.name
        self.latest: Any = None
        self._latest_at = 0.0
        self.frames = 0

    def set_zones(self, zones: list[list[tuple[float, float]]]) -> None:
        """Mask these zones from the next frame on (the config writer's change)."""
        self.masks = ZoneMasks(zones)

    async def open(self) -> None:
        """Hand the filter to a source that encodes itself, then open the source."""
        if self.redact:
            from intercom.privacy.redact import shared_redactor  # noqa: PLC0415

            self._redactor = shared_redactor()
        if self.encoded:
            if not hasattr(self.inner, "frame_filter"):  # fail closed: never unmasked video
                raise HardwareError(
                    f"media.camera: {self.name} encodes its own frames and cannot mask the "
                    "privacy zones; remove [privacy] zones or choose another source"
                )
            self.inner.frame_filter = self.filter_i420
        await self.inner.open()

    def filter_i420(self, buffer: Any, width: int, height: int, stride: int) -> None:
        """Mask (and with redact_all_outputs, redact) one I420 buffer in place."""
        mask = self.masks.for_size(width, height)
        mask.apply_i420(buffer, stride)
        if self._redactor is not None:
            planes = i420_planes(buffer, width, height, stride)
            if self._redactor.redact_planes(*planes):
                mask.apply_planes(*planes)  # a face block may reach into a zone: black again

    async def next(self) -> Any:
        """The next frame with the zones masked (or packet, masked before encoding)."""
        item = await self.inner.next()
        if not self.encoded:
            item = self.masks.apply_frame(item)
            if self._redactor is not None:
                item = await asyncio.to_thread(redacted_copy, item, self.masks, self._redactor)
            self.latest, self._latest_at = item, time.monotonic()
        self.frames += 1
        return item

    async def still(self) -> Any:
        """One masked ``av.VideoFrame`` for a snapshot or preview, as fresh as possible."""
        if self.encoded:
            return await self.inner.still()  # type: ignore[attr-defined]
        if self.latest is not None and time.monotonic() - self._latest_at < STILL_MAX_AGE_S:
            return self.latest
        return await self.next()

    def request_keyframe(self) -> None:
        """Passed on to the source."""
        self.inner.request_keyframe()

    async def close(self) -> None:
        """Close the source."""
        await self.inner.close()


def redacted_copy(frame: Any, masks: ZoneMasks, redactor: Any) -> Any:
    """A copy of a decoded frame with faces pixelated, then the zones masked again.

    The one live redaction of the station: ``redact_all_outputs`` at the source and the
    managers' live view (``intercom.privacy.live``) both call it. Masking after the
    pixelation blacks out again a face block that reached into a zone. ``frame`` itself
    is left as it is (other consumers may be encoding it).
    """
    return masks.apply_frame(redactor.redact_frame(frame))


def privacy_camera(
    inner: CameraSource, config: PrivacyConfig, *, live: bool = False
) -> CameraSource:
    """The source itself when no zone or redaction applies, else a PrivacyCamera.

    ``live``: a PrivacyCamera whenever the source can be masked (decoded frames, or a
    ``frame_filter``), so that zones drawn later apply at once (``set_zones``).
    """
    maskable = not inner.encoded or hasattr(inner, "frame_filter")
    if not config.zones and not config.redact_all_outputs and not (live and maskable):
        return inner
    return PrivacyCamera(inner, config)


async def still_frame(camera: CameraSource) -> Any:
    """One decoded, masked frame from the station's camera (any kind of source)."""
    still = getattr(camera, "still", None)
    if still is not None:
        return await still()
    if camera.encoded:
        raise HardwareError(f"camera {camera.name} gives no still frames")
    return await camera.next()
