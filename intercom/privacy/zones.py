"""Privacy zones: polygons of the picture that are blacked out in every frame at the source.

A zone is a polygon in normalised coordinates (0..1 across, 0..1 down). The mask for a
frame size is rasterised once (pixel centres, even-odd rule) and then applied to each
frame's Y, U and V planes with numpy, in place: a masked pixel is black (Y 16, U and V
128, BT.601 limited range). A chroma sample is masked when any of its four luma pixels
is, so no colour of a hidden area leaks through the subsampled planes.

numpy is imported when a mask is made, never at station start-up without zones.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy.typing as npt
    from numpy import bool_

Point = tuple[float, float]
Polygon = Sequence[Point]

BLACK_Y = 16
BLACK_UV = 128


def _numpy() -> Any:
    import numpy as np  # noqa: PLC0415 - costs memory on a Pi; only when zones are used

    return np


def rasterise(polygons: Sequence[Polygon], width: int, height: int) -> npt.NDArray[bool_]:
    """A height x width boolean mask: True where a pixel centre lies inside any polygon."""
    np = _numpy()
    mask = np.zeros((height, width), dtype=bool)
    xs = (np.arange(width, dtype=np.float64) + 0.5) / width
    ys = (np.arange(height, dtype=np.float64) + 0.5) / height
    for polygon in polygons:
        if len(polygon) < 3:
            continue
        inside = np.zeros((height, width), dtype=bool)
        points = list(polygon)
        for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1], strict=True):
            if y1 == y2:
                continue  # a horizontal edge never crosses a row's centre line
            rows = (ys >= min(y1, y2)) & (ys < max(y1, y2))
            if not rows.any():
                continue
            # Where each such row's centre line crosses the edge; pixels left of it flip.
            cross = x1 + (ys[rows] - y1) * (x2 - x1) / (y2 - y1)
            inside[rows] ^= xs[np.newaxis, :] < cross[:, np.newaxis]
        mask |= inside
    result: npt.NDArray[bool_] = mask
    return result


class ZoneMask:
    """The zones of one frame size, rasterised once, applied to I420 frames in place."""

    def __init__(self, polygons: Sequence[Polygon], width: int, height: int) -> None:
        np = _numpy()
        self.width = width
        self.height = height
        self.luma = rasterise(polygons, width, height)
        # A chroma sample covers 2x2 luma pixels: masked when any of them is.
        padded = np.zeros(((height + 1) // 2 * 2, (width + 1) // 2 * 2), dtype=bool)
        padded[:height, :width] = self.luma
        cw, ch = padded.shape[1] // 2, padded.shape[0] // 2
        self.chroma = padded.reshape(ch, 2, cw, 2).any(axis=(1, 3))
        self.empty = not bool(self.luma.any())

    @property
    def fraction(self) -> float:
        """The share of the picture that is masked (0..1)."""
        return float(self.luma.mean())

    def apply_planes(self, y: Any, u: Any, v: Any) -> None:
        """Black out the zones in three 2-D uint8 arrays (views of a frame's planes)."""
        if self.empty:
            return
        np = _numpy()
        np.copyto(y, BLACK_Y, where=self.luma)
        np.copyto(u, BLACK_UV, where=self.chroma)
        np.copyto(v, BLACK_UV, where=self.chroma)

    def apply_i420(self, buffer: Any, stride: int | None = None) -> None:
        """Mask one contiguous I420 buffer in place (e.g. picamera2's ``MappedArray``)."""
        self.apply_planes(*i420_planes(buffer, self.width, self.height, stride or self.width))

    def apply_frame(self, frame: Any) -> Any:
        """Mask an ``av.VideoFrame`` (yuv420p; other formats are converted first)."""
        if self.empty:
            return frame
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        np = _numpy()
        planes = []
        for index, plane in enumerate(frame.planes):
            rows = self.height if index == 0 else self.chroma.shape[0]
            cols = self.width if index == 0 else self.chroma.shape[1]
            array = np.frombuffer(plane, dtype=np.uint8)
            planes.append(array[: rows * plane.line_size].reshape(rows, plane.line_size)[:, :cols])
        self.apply_planes(*planes)
        return frame


def i420_planes(buffer: Any, width: int, height: int, stride: int) -> tuple[Any, Any, Any]:
    """Y, U and V views of a contiguous I420 (YUV420 planar) buffer with a row stride.

    The buffer holds ``height`` rows of ``stride`` bytes, then each chroma plane's
    ``height / 2`` rows of ``stride / 2`` bytes, as picamera2's YUV420 streams do.
    """
    np = _numpy()
    flat = np.asarray(buffer).reshape(-1)
    cstride, ch, cw = stride // 2, height // 2, width // 2
    y = flat[: height * stride].reshape(height, stride)[:, :width]
    u0 = height * stride
    u = flat[u0 : u0 + ch * cstride].reshape(ch, cstride)[:, :cw]
    v = flat[u0 + ch * cstride : u0 + 2 * ch * cstride].reshape(ch, cstride)[:, :cw]
    return y, u, v


class ZoneMasks:
    """Masks per frame size, made on first use (thread-safe: the Pi's callback thread)."""

    def __init__(self, polygons: Sequence[Polygon]) -> None:
        self.polygons = [list(p) for p in polygons]
        self._masks: dict[tuple[int, int], ZoneMask] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.polygons)

    def for_size(self, width: int, height: int) -> ZoneMask:
        """The mask of a frame size."""
        key = (width, height)
        with self._lock:
            mask = self._masks.get(key)
            if mask is None:
                mask = ZoneMask(self.polygons, width, height)
                self._masks[key] = mask
            return mask

    def apply_frame(self, frame: Any) -> Any:
        """Mask an ``av.VideoFrame`` in place (a converted copy if not yuv420p)."""
        if not self.polygons:
            return frame
        return self.for_size(frame.width, frame.height).apply_frame(frame)
