"""A synthetic camera: colour bars with a running clock, the simulation default.

The clock (wall time to the millisecond and a frame counter, drawn as seven-segment
digits) makes every frame different, so a viewer can see that video is live and a
test can tell frames apart.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from typing import Any

VIDEO_CLOCK_RATE = 90_000
TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)

# Colour bars in Y'CbCr (BT.601, limited range): white, yellow, cyan, green,
# magenta, red, blue, black.
BARS = [
    (180, 128, 128),
    (162, 44, 142),
    (131, 156, 44),
    (112, 72, 58),
    (84, 184, 198),
    (65, 100, 212),
    (35, 212, 114),
    (16, 128, 128),
]

# Segments a..g of a seven-segment digit, as (x, y, w, h) in a 5x9 grid.
SEGMENTS = {
    "a": (1, 0, 3, 1),
    "b": (4, 1, 1, 3),
    "c": (4, 5, 1, 3),
    "d": (1, 8, 3, 1),
    "e": (0, 5, 1, 3),
    "f": (0, 1, 1, 3),
    "g": (1, 4, 3, 1),
}
DIGITS = {
    "0": "abcdef",
    "1": "bc",
    "2": "abdeg",
    "3": "abcdg",
    "4": "bcfg",
    "5": "acdfg",
    "6": "acdefg",
    "7": "abc",
    "8": "abcdefg",
    "9": "abcdfg",
    "-": "g",
}


class SyntheticCamera:
    """Colour bars and a running clock at a fixed frame rate."""

    encoded = False
    name = "synthetic"

    def __init__(self, width: int, height: int, fps: int) -> None:
        self.width = width - width % 2
        self.height = height - height % 2
        self.fps = fps
        self.frames = 0
        self._start = 0.0
        self._planes: list[bytes] = []
        self._chroma: list[bytes] = []
        self._stride = 0
        # One grid unit of a digit: 14 characters of 7 units fit across the frame.
        self._cell = max(1, min(self.height // 60, self.width // (14 * 7 + 4)))

    async def open(self) -> None:
        """Prepare the colour bars."""
        import av  # noqa: PLC0415

        probe = av.VideoFrame(self.width, self.height, "yuv420p")
        strides = [p.line_size for p in probe.planes]
        self._stride = strides[0]
        planes = []
        for index, (stride, plane) in enumerate(zip(strides, probe.planes, strict=True)):
            width = self.width if index == 0 else self.width // 2
            row = bytearray(stride)
            for x in range(width):
                row[x] = BARS[min(x * len(BARS) // width, len(BARS) - 1)][index]
            planes.append(bytes(row) * (plane.buffer_size // stride))
        self._planes = planes
        # Grey chroma behind the clock, so that it reads well on every bar.
        u = self._cell
        rows = range((self.height - 13 * u) // 2, (self.height - u) // 2 + 1)
        self._chroma = []
        for stride, chroma in zip(strides[1:], planes[1:], strict=True):
            grey = bytearray(chroma)
            for line in rows:
                grey[line * stride : line * stride + self.width // 2] = b"\x80" * (self.width // 2)
            self._chroma.append(bytes(grey))
        self._start = time.monotonic()

    async def next(self) -> Any:
        """The next frame, paced to the frame rate."""
        import av  # noqa: PLC0415

        due = self._start + self.frames / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            # Behind (a consumer was away): skip ahead instead of bursting old frames.
            self.frames = int((time.monotonic() - self._start) * self.fps)
        frame = av.VideoFrame(self.width, self.height, "yuv420p")
        luma = bytearray(self._planes[0])
        now = time.time()
        text = time.strftime("%H%M%S", time.localtime(now)) + f"{int(now * 1000) % 1000:03d}"
        self._draw(luma, f"{text}-{self.frames % 10000:04d}")
        frame.planes[0].update(bytes(luma))
        frame.planes[1].update(self._chroma[0])
        frame.planes[2].update(self._chroma[1])
        frame.pts = int(self.frames * VIDEO_CLOCK_RATE / self.fps)
        frame.time_base = TIME_BASE
        self.frames += 1
        return frame

    def _draw(self, luma: bytearray, text: str) -> None:
        u = self._cell
        x0, y0 = 2 * u, self.height - 12 * u
        box_w = min(len(text) * 7 * u + 2 * u, self.width - x0)
        self._fill(luma, x0 - u, y0 - u, box_w, 11 * u, 16)
        for i, char in enumerate(text):
            for seg in DIGITS.get(char, ""):
                sx, sy, sw, sh = SEGMENTS[seg]
                self._fill(luma, x0 + (i * 7 + sx) * u, y0 + sy * u, sw * u, sh * u, 235)

    def _fill(self, luma: bytearray, x: int, y: int, w: int, h: int, value: int) -> None:
        w = max(0, min(w, self.width - x))
        if w == 0:
            return
        run = bytes([value]) * w
        for row in range(max(0, y), min(self.height, y + h)):
            start = row * self._stride + x
            luma[start : start + w] = run

    def request_keyframe(self) -> None:
        """Frames are not encoded here; the sender's encoder makes keyframes."""

    async def close(self) -> None:
        """Nothing to release."""
