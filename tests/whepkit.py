"""Real parts for the WHEP tests and bench: the astronaut as the camera, an aiortc viewer.

The camera is the station's own ``file`` source playing a short lossless video of
scikit-image's astronaut (a real face). The face detector that judges what a viewer got
is scikit-image's LBP frontal-face cascade, not the OpenCV Haar cascade the station
redacts with, so the test does not grade the redaction with its own eyes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from skimage import data
from skimage.feature import Cascade

from intercom.config import Settings, simulated_settings

W, H = 640, 480
MIN_FACE = (64, 64)  # the astronaut's face is about 90 px here; smaller hits are not hers


def astronaut_frame() -> Any:
    """The astronaut, 480x480, in the middle of a black 640x480 picture (RGB)."""
    canvas = np.zeros((H, W, 3), np.uint8)
    canvas[:, 80:560] = cv2.resize(data.astronaut(), (H, H), interpolation=cv2.INTER_AREA)
    return canvas


def astronaut_video(path: Path, frames: int = 15) -> Path:
    """A lossless (FFV1) 15 fps video of the astronaut, for the station's file camera."""
    picture = astronaut_frame()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=15)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def whep_settings(state_dir: Path, video: Path, **whep: Any) -> Settings:
    """A simulated station whose camera plays ``video``, with ``[whep] enabled``."""
    dumped = simulated_settings(state_dir).model_dump(mode="json")
    dumped["media"]["camera"] = {"source": "file", "device": str(video), "fps": 15}
    dumped["whep"] = {"enabled": True, **whep}
    return Settings.model_validate(dumped)


class FaceDetector:
    """scikit-image's LBP frontal-face cascade (shipped inside scikit-image)."""

    def __init__(self) -> None:
        self._cascade = Cascade(data.lbp_frontal_face_cascade_filename())
        self._her_face: dict[str, int] | None = None

    def faces(self, frame: Any) -> list[dict[str, int]]:
        """Faces in an ``av.VideoFrame`` (boxes: r, c, width, height)."""
        grey = frame.to_ndarray(format="gray")
        found: list[dict[str, int]] = self._cascade.detect_multi_scale(
            img=grey, scale_factor=1.2, step_ratio=1, min_size=MIN_FACE, max_size=(320, 320)
        )
        return found

    def her_face(self) -> dict[str, int]:
        """Where the astronaut's face is: the detector's one box on the unredacted picture."""
        if self._her_face is None:
            picture = av.VideoFrame.from_ndarray(astronaut_frame(), format="rgb24")
            (self._her_face,) = self.faces(picture)
        return self._her_face

    def hers(self, frame: Any) -> list[dict[str, int]]:
        """The faces found in ``frame`` whose centre lies on the astronaut's face.

        A lossy frame can show the detector a "face" elsewhere (her suit's badges, once
        in a while through VP8): not hers, and not what redaction is judged by.
        """
        box = self.her_face()
        return [
            found for found in self.faces(frame)
            if box["c"] <= found["c"] + found["width"] / 2 <= box["c"] + box["width"]
            and box["r"] <= found["r"] + found["height"] / 2 <= box["r"] + box["height"]
        ]

    def detail(self, frame: Any) -> float:
        """Mean absolute difference of neighbouring pixels over her face's box (grey)."""
        box = self.her_face()
        grey = frame.to_ndarray(format="gray").astype(np.int16)
        face = grey[box["r"] : box["r"] + box["height"], box["c"] : box["c"] + box["width"]]
        across = np.abs(np.diff(face, axis=1)).mean()
        down = np.abs(np.diff(face, axis=0)).mean()
        return float(across + down)


class Viewer:
    """A WHEP client on aiortc: offers recvonly video (and audio), keeps what it gets."""

    def __init__(self, url: str, tls: ssl.SSLContext) -> None:
        self.url = url  # the station's base URL
        self.tls = tls
        self.pc = RTCPeerConnection()
        self.frames: list[Any] = []  # decoded video frames, newest last (at most `keep`)
        self.count = 0
        self.keep = 200
        self.location = ""
        self._task: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self._task = asyncio.ensure_future(self._consume(track))

    async def _consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.count += 1
            self.frames.append(frame)
            del self.frames[: -self.keep]

    async def offer(self) -> str:
        """The complete offer (after ICE gathering), as a WHEP client sends it."""
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def post(
        self, token: str | None, *, query: str = "", content_type: str = "application/sdp",
        body: str | None = None,
    ) -> tuple[int, dict[str, str], str]:
        """POST an offer to /whep; on 201 the answer is applied. Status, headers, body."""
        sdp = body if body is not None else await self.offer()
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.url + "whep" + query, data=sdp.encode(), headers=headers,
                      ssl=self.tls) as response,
        ):
            text = await response.text()
            if response.status == 201:
                self.location = response.headers["Location"]
                await self.pc.setRemoteDescription(RTCSessionDescription(text, "answer"))
            return response.status, dict(response.headers), text

    async def request(self, method: str, path: str) -> int:
        """Another request on the station (DELETE on the session, PATCH, ...): the status."""
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.url + path.lstrip("/"), ssl=self.tls) as response,
        ):
            return response.status

    async def wait_frames(self, count: int, timeout: float = 20) -> None:
        """Until ``count`` frames have arrived (AssertionError after ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.count < count:
            if loop.time() > deadline:
                raise AssertionError(f"{self.count} of {count} frames within {timeout} s")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Close the connection (no DELETE)."""
        await self.pc.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
