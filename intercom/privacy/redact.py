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
# Stills for managers are redacted at leisure: more models, a larger image, fewer misses.
THOROUGH_CASCADES = (
    CASCADE,
    "haarcascade_frontalface_alt2.xml",
    "haarcascade_profileface.xml",  # faces turned one way; the mirrored image the other
)
DETECT_WIDTH = 240
THOROUGH_WIDTH = 480
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
    """Finds faces and pixelates them; safe to call from several threads.

    The default suits live frames (one frontal model, 240 px wide); ``thorough`` suits
    stills a manager receives (frontal, alternative frontal and profile models both
    ways round, 480 px wide), several times slower and with fewer misses.
    """

    def __init__(
        self, detect_width: int | None = None, min_face: int = 20, *, thorough: bool = False
    ) -> None:
        cv2 = load_cv2()
        cv2.setNumThreads(1)
        names = THOROUGH_CASCADES if thorough else (CASCADE,)
        self._paths = [str(Path(cv2.data.haarcascades) / name) for name in names]
        for path in self._paths:
            if not Path(path).exists():
                raise RedactionError(f"the face model {path} is not in the OpenCV package")
        self._cv2 = cv2
        self._local = threading.local()  # a CascadeClassifier is not thread-safe
        self.thorough = thorough
        self.detect_width = detect_width or (THOROUGH_WIDTH if thorough else DETECT_WIDTH)
        self.min_face = min_face

    def _classifiers(self) -> list[Any]:
        classifiers: list[Any] | None = getattr(self._local, "classifiers", None)
        if classifiers is None:
            classifiers = []
            for path in self._paths:
                classifier = self._cv2.CascadeClassifier(path)
                if classifier.empty():
                    raise RedactionError(f"the face model {path} does not load")
                classifiers.append(classifier)
            self._local.classifiers = classifiers
        return classifiers

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
        found: list[Box] = []
        neighbours = 3 if self.thorough else 4
        for index, classifier in enumerate(self._classifiers()):
            mirrored = [False, True] if index == 2 else [False]  # the profile model
            for mirror in mirrored:
                image = cv2.flip(small, 1) if mirror else small
                boxes = classifier.detectMultiScale(
                    image, scaleFactor=1.2, minNeighbors=neighbours,
                    minSize=(self.min_face, self.min_face),
                )
                for x, y, w, h in boxes if len(boxes) else []:
                    x0 = image.shape[1] - x - w if mirror else x
                    found.append((int(x0), int(y), int(w), int(h)))
        return [
            (round(x / scale), round(y / scale), round(w / scale), round(h / scale))
            for x, y, w, h in found
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


_shared: dict[bool, FaceRedactor] = {}
_shared_lock = threading.Lock()


def shared_redactor(*, thorough: bool = False) -> FaceRedactor:
    """One redactor of each kind per process (models load once per thread using them)."""
    with _shared_lock:
        if thorough not in _shared:
            _shared[thorough] = FaceRedactor(thorough=thorough)
        return _shared[thorough]
