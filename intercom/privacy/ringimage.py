"""The ring image: a redacted frame of each ring for the building's Home Assistant.

Only with ``[mqtt] ring_image = true``. At each ring one frame of the station's camera
(zones masked at the source) is face-redacted as a manager's snapshot is
(``snapshots.manager_jpeg``) and handed to ``show``, the MQTT bridge's, which publishes it
once, not retained. Nothing is stored at the station. ``snapshot_retention_hours`` after
the latest ring, and once at every start (the station cannot know what an earlier run
left shown), a plain grey image replaces it: the entity never shows a visitor longer
than the station keeps snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from intercom.errors import IntercomError
from intercom.events import DoorbellPressed, Event, EventBus
from intercom.privacy.camera import still_frame
from intercom.privacy.snapshots import RETENTION_POLL_S, STILL_TIMEOUT_S, manager_jpeg

if TYPE_CHECKING:
    from intercom.config import PrivacyConfig
    from intercom.media import CameraSource

log = logging.getLogger(__name__)

BLANK_SIZE = (320, 240)  # width, height of the replacement
BLANK_GREY = 128

Show = Callable[[bytes], None]


def blank_jpeg() -> bytes:
    """The replacement: a plain mid-grey JPEG, no picture of anyone."""
    import numpy as np  # noqa: PLC0415 - only with the ring image switched on

    from intercom.privacy.redact import encode_jpeg  # noqa: PLC0415

    width, height = BLANK_SIZE
    return encode_jpeg(np.full((height, width, 3), BLANK_GREY, dtype=np.uint8))


class RingImage:
    """Hands a redacted frame of each ring to ``show``; a blank one when it expires."""

    def __init__(
        self, config: PrivacyConfig, bus: EventBus, camera: CameraSource, show: Show
    ) -> None:
        self.config = config
        self._bus = bus
        self._camera = camera
        self._show = show
        self.shown_at: float | None = None  # the ring whose frame is shown, if any
        self.shown = 0
        self.failed = 0
        self.expired = 0
        self._blank: bytes | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Replace whatever an earlier run left shown, then listen for rings."""
        self._blank = await asyncio.to_thread(blank_jpeg)
        self._show(self._blank)
        self._unsubscribe = self._bus.on(self._on_event)
        self._expiry = asyncio.create_task(self._expiry_loop(), name="ring-image-expiry")

    async def stop(self) -> None:
        """Stop listening; let frames being taken finish briefly."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STILL_TIMEOUT_S)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, DoorbellPressed):
            task = asyncio.create_task(self.take(event), name="ring-image")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def take(self, ring: DoorbellPressed) -> bool:
        """Show one redacted frame for a ring; whether it could be taken."""
        from intercom.privacy.redact import frame_to_jpeg  # noqa: PLC0415

        redacted = self.config.redact_all_outputs  # the camera's frames are already
        try:
            frame = await asyncio.wait_for(still_frame(self._camera), STILL_TIMEOUT_S)
            jpeg = await asyncio.to_thread(
                lambda: manager_jpeg(frame_to_jpeg(frame), redacted=redacted))
        except (TimeoutError, IntercomError, OSError) as exc:
            self.failed += 1
            log.warning("ring image: not taken: %s", exc)
            return False
        except Exception:
            self.failed += 1
            log.exception("ring image: not taken (unexpected failure)")
            return False
        if self.shown_at is not None and self.shown_at > ring.at:
            return False  # a later ring's frame is shown already
        self.shown_at = ring.at
        self.shown += 1
        self._show(jpeg)
        log.info("ring image: a redacted frame of the ring of flat %s sent", ring.flat)
        return True

    def expire(self, now: float | None = None) -> bool:
        """Replace the shown frame by the blank one once it is past retention."""
        now = time.time() if now is None else now
        keep_s = self.config.snapshot_retention_hours * 3600
        if self.shown_at is None or now - self.shown_at < keep_s or self._blank is None:
            return False
        self.shown_at = None
        self.expired += 1
        self._show(self._blank)
        log.info("ring image: past retention, replaced by a blank image")
        return True

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_POLL_S)
            self.expire()

    def counts(self) -> dict[str, int]:
        """Frames shown, failed and expired since start, for ``intercom status``."""
        return {"shown": self.shown, "failed": self.failed, "expired": self.expired}
