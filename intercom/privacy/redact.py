"""Face redaction: faces found by OpenCV's Haar cascade are pixelated beyond recognition.

The face model is the frontal-face Haar cascade shipped inside the opencv-python-headless
wheel (``cv2.data.haarcascades``): nothing is downloaded, ever. Detection runs on a
downscaled grey image (the Y plane of a frame is one already), one OpenCV thread, so a
Pi core keeps up; each face box, widened by a margin, is reduced to a few blocks of its
mean colour, which no later sharpening can undo. OpenCV and numpy are imported only when
a redactor is made.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from intercom.errors import IntercomError

log = logging.getLogger(__name__)

CASCADE = "haarcascade_frontalface_default.xml"
DETECT_WIDTH = 240
MARGIN = 0.25
BLOCKS = 6
Box = tuple[int, int, int, int]


class RedactionError(IntercomError, RuntimeError):
    """OpenCV or its face model is missing, so nothing can be redacted."""


def load_cv2() -> Any:
    """The cv2 module, imported now; RedactionError when it is missing."""
    try:
        import cv2  # noqa: PLC0415 - about 30 MB of RSS on a Pi: only when redacting
    except ImportError as exc:
        raise RedactionError(
            "face redaction needs opencv-python-headless (a dependency of intercom); "
            f"it cannot be imported: {exc}"
        ) from exc
    return cv2


class FaceRedactor:
    """Finds faces and pixelates them; safe to call from several threads."""

    def __init__(self, detect_width: int = DETECT_WIDTH, min_face: int = 20) -> None:
        cv2 = load_cv2()
        cv2.setNumThreads(1)
        path = Path(cv2.data.haarcascades) / CASCADE
        if not path.exists():
            raise RedactionError(f"the face model {path} is not in the OpenCV package")
        self._cv2 = cv2
        self._path = str(path)
        self._local = threading.local()  # a CascadeClassifier is not thread-safe
        self.detect_width = detect_width
        self.min_face = min_face

    def _classifier(self) -> Any:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = self._cv2.CascadeClassifier(self._path)
            if classifier.empty():
                raise RedactionError(f"the face model {self._path} does not load")
            self._local.classifier = classifier
        return classifier

    def detect(self, grey: Any) -> list[Box]:
        """Face boxes (x, y, w, h) in ``grey``'s pixels, found on a downscaled copy."""
        cv2 = self._cv2
        height, width = grey.shape[:2]
        scale = min(1.0, self.detect_width / width)
        small = grey
        if scale < 1.0:
            size = (round(width * scale), round(height * scale))
            small = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        small = cv2.equalizeHist(small)
        found = self._classifier().detectMultiScale(
            small, scaleFactor=1.2, minNeighbors=4, minSize=(self.min_face, self.min_face)
        )
        return [
            (round(x / scale), round(y / scale), round(w / scale), round(h / scale))
            for x, y, w, h in (found if len(found) else [])
        ]

    def pixelate(self, image: Any, box: Box, scale: int = 1) -> None:
        """Reduce a box (widened by the margin) of a 2-D or 3-D array to coarse blocks."""
        cv2 = self._cv2
        x, y, w, h = (v // scale for v in box)
        dx, dy = round(w * MARGIN), round(h * MARGIN)
        x0, y0 = max(0, x - dx), max(0, y - dy)
        x1, y1 = min(image.shape[1], x + w + dx), min(image.shape[0], y + h + dy)
        if x1 <= x0 or y1 <= y0:
            return
        region = image[y0:y1, x0:x1]
        blocks = cv2.resize(region, (BLOCKS, BLOCKS), interpolation=cv2.INTER_AREA)
        region[...] = cv2.resize(blocks, (x1 - x0, y1 - y0), interpolation=cv2.INTER_NEAREST)

    def redact_planes(self, y: Any, u: Any, v: Any) -> int:
        """Pixelate every face in 2-D Y, U, V arrays (4:2:0) in place; how many were found."""
        boxes = self.detect(y)
        for box in boxes:
            self.pixelate(y, box)
            self.pixelate(u, box, scale=2)
            self.pixelate(v, box, scale=2)
        return len(boxes)

    def redact_frame(self, frame: Any) -> Any:
        """A redacted copy of an ``av.VideoFrame`` (the original is left as it is)."""
        import av  # noqa: PLC0415

        data = frame.to_ndarray(format="yuv420p").copy()
        h, w = frame.height, frame.width
        y = data[:h]
        chroma = data[h:].reshape(-1)
        half = (h // 2) * (w // 2)
        u = chroma[:half].reshape(h // 2, w // 2)
        v = chroma[half : 2 * half].reshape(h // 2, w // 2)
        found = self.redact_planes(y, u, v)
        out = av.VideoFrame.from_ndarray(data, format="yuv420p")
        out.pts = frame.pts
        if frame.time_base is not None:
            out.time_base = frame.time_base
        if found:
            log.debug("redaction: %d faces pixelated", found)
        return out

    def redact_bgr(self, image: Any) -> Any:
        """A redacted copy of a BGR image (an OpenCV array)."""
        cv2 = self._cv2
        out = image.copy()
        for box in self.detect(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)):
            self.pixelate(out, box)
        return out

    def redact_jpeg(self, data: bytes, quality: int = 85) -> bytes:
        """A redacted copy of a JPEG image."""
        np = _numpy()
        cv2 = self._cv2
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise RedactionError("not a decodable image")
        return encode_jpeg(self.redact_bgr(image), quality)


def _numpy() -> Any:
    import numpy as np  # noqa: PLC0415

    return np


def encode_jpeg(bgr: Any, quality: int = 85) -> bytes:
    """JPEG bytes of a BGR image."""
    cv2 = load_cv2()
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RedactionError("the image could not be encoded as JPEG")
    return bytes(data.tobytes())


def frame_to_jpeg(frame: Any, quality: int = 85) -> bytes:
    """JPEG bytes of an ``av.VideoFrame``."""
    return encode_jpeg(frame.to_ndarray(format="bgr24"), quality)


_shared: FaceRedactor | None = None
_shared_lock = threading.Lock()


def shared_redactor() -> FaceRedactor:
    """One redactor per process (its model loads once per thread that uses it)."""
    global _shared  # noqa: PLW0603 - a lazily made process-wide singleton
    with _shared_lock:
        if _shared is None:
            _shared = FaceRedactor()
        return _shared
