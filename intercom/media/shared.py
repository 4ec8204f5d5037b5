"""A source read by one reader at a time, whoever asks for its next item.

Sources are not made for concurrent ``next()`` calls (a PyAudio stream read from two
threads at once, an encoder fed twice). The calls keep the door microphone read all the
time; the self-test and the installer console's level meter read it too. Through
``OneReader`` a ``next()`` while a read is in flight waits for that same item: every
reader gets every item and none is taken from another (``MeteredCamera`` does the same
for the camera).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from intercom.media.base import AudioSource

log = logging.getLogger(__name__)


class OneReader:
    """Wraps an audio source so that concurrent readers share each frame."""

    def __init__(self, inner: AudioSource) -> None:
        self.inner = inner
        self._reading: asyncio.Future[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def open(self) -> None:
        """Open the source."""
        await self.inner.open()

    async def next(self) -> Any:
        """The source's next frame; the one being read if a read is in flight."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self.inner.next())
            self._reading.add_done_callback(_ignore_result)  # every awaiter may be gone
        # shielded: a reader giving up (a timeout) does not cut the others' frame
        return await asyncio.shield(self._reading)

    async def close(self) -> None:
        """Close the source."""
        await self.inner.close()


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("audio read failed: %s", future.exception())
