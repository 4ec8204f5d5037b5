"""Media of the calls: the shared camera and microphone, gated per device, and the speaker.

One camera and one microphone feed every peer through an aiortc ``MediaRelay`` (newest
frame only, no queue). Each device's peer connection gets a ``GatedTrack`` attached from
the start: its ``recv`` blocks while the gate is closed, so nothing is sent and nothing
is encoded, and returns the newest frame at once when the gate opens (a ring only opens
the video's; the audio section is negotiated on while the device rings). The microphone
is read only while an audio gate is open (a call), not while devices wait. Encoded camera
packets (the Pi's hardware H.264) pass through unchanged; a camera of frames is encoded
once, VP8, for every device whose gate is open (``intercom.media.sharedvp8``), unless the
hub is made with ``shared_vp8=False``: then each device's aiortc sender encodes its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

from intercom.media import AudioSink, AudioSource, CameraSource
from intercom.media.sharedvp8 import SharedVp8Encoder

log = logging.getLogger(__name__)

KEYFRAME_WAIT_S = 1.0


class SourceTrack(MediaStreamTrack):
    """A camera or microphone as an aiortc track."""

    def __init__(self, kind: str, next_frame: Callable[[], Awaitable[Any]]) -> None:
        super().__init__()
        self.kind = kind
        self._next = next_frame

    async def recv(self) -> Any:
        """The source's next frame or packet."""
        if self.readyState != "live":
            raise MediaStreamError
        try:
            return await self._next()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("media: %s source failed: %s", self.kind, exc)
            self.stop()
            raise MediaStreamError from exc


class GatedTrack(MediaStreamTrack):
    """A relayed track that passes frames only while its gate is open."""

    def __init__(
        self,
        kind: str,
        proxy: MediaStreamTrack,
        wait_keyframe: bool = False,
        on_gate: Callable[[bool], None] | None = None,
        fresh_only: bool = False,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._proxy = proxy
        self._gate = asyncio.Event()
        self._on_gate = on_gate  # told when the gate opens (True) and closes (False)
        self._opened = False
        self._fresh = False
        # Encoded packets: start each opening at a keyframe (a P-frame whose references
        # the device never got cannot be decoded), but never wait longer than a second.
        self._wait_keyframe = wait_keyframe
        self._need_keyframe = False
        # Frames stamped (``opaque``) before this opening are skipped: the relay keeps
        # the last frame of a source that was paused (the microphone between calls).
        self._fresh_only = fresh_only
        self.opened_at: float | None = None
        self.first_frame_at: float | None = None
        self.frames = 0
        # Subscribe now, so that the newest frame is waiting when the gate opens.
        self._warm = asyncio.ensure_future(self._proxy.recv())
        self._warm.add_done_callback(_ignore_result)

    @property
    def is_open(self) -> bool:
        """Whether frames flow."""
        return self._gate.is_set()

    def open(self) -> None:
        """Let frames flow, starting with the newest one."""
        if not self._gate.is_set():
            self.opened_at = time.time()
            self.first_frame_at = None
            self._fresh = True
            self._need_keyframe = self._wait_keyframe
            self._gate.set()
            self._tell(opened=True)

    def close(self) -> None:
        """Stop frames (the connection stays up)."""
        self._gate.clear()
        self._tell(opened=False)

    def _tell(self, opened: bool) -> None:
        if opened != self._opened:
            self._opened = opened
            if self._on_gate is not None:
                self._on_gate(opened)

    async def recv(self) -> Any:
        """The next frame, waiting while the gate is closed."""
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            await self._gate.wait()
            frame = await self._proxy.recv()
            if self._gate.is_set() and self._starts_well(frame):
                break
        if self._fresh:
            self._fresh = False
            self.first_frame_at = time.time()
        self.frames += 1
        return frame

    def _starts_well(self, frame: Any) -> bool:
        """False for a frame to skip: read before the opening, or not the keyframe.

        Packets skipped while waiting for the opening's keyframe (never longer than
        ``KEYFRAME_WAIT_S``).
        """
        stamp = getattr(frame, "opaque", None) if self._fresh_only else None
        if isinstance(stamp, float) and stamp < (self.opened_at or 0.0):
            return False
        if not self._need_keyframe:
            return True
        opened = self.opened_at or 0.0
        if getattr(frame, "is_keyframe", True) or time.time() - opened > KEYFRAME_WAIT_S:
            self._need_keyframe = False
            return True
        return False

    def stop(self) -> None:
        """Stop the track and leave the relay."""
        super().stop()
        self._warm.cancel()
        self._proxy.stop()
        self._tell(opened=False)
        self._gate.set()  # wake a waiting recv, which then raises


def _ignore_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # consumed: a relay that ended needs no report here


class MediaHub:
    """The door's camera, microphone and speaker, shared by every device's connection."""

    def __init__(
        self,
        camera: CameraSource,
        microphone: AudioSource,
        speaker: AudioSink,
        *,
        shared_vp8: bool = True,
        fps: int = 15,
    ) -> None:
        self.camera = camera
        self.speaker = speaker
        self._relay = MediaRelay()
        self._camera = SourceTrack("video", camera.next)
        self._mic = microphone
        self._microphone = SourceTrack("audio", self._heard)
        self.listening = 0  # the devices' open audio gates
        self._listened = asyncio.Event()  # set while one is open
        # A camera of frames, encoded once for every device (see intercom.media.sharedvp8),
        # reads the camera through a relay subscription of its own.
        self.encoder: SharedVp8Encoder | None = None
        self._video = self._camera
        if shared_vp8 and not camera.encoded:
            raw = self._relay.subscribe(self._camera, buffered=False)
            self.encoder = SharedVp8Encoder(raw.recv, fps, camera.name)
            self._video = SourceTrack("video", self.encoder.next)
        # What the devices' video senders get: packets (sent as they are) or frames.
        self.encoded = bool(camera.encoded) or self.encoder is not None
        self.mime_type = self.encoder.mime_type if self.encoder is not None else "video/H264"
        # An encoding camera that keeps a keyframe ready while nobody watches is told
        # how many video gates are open (see intercom.media.encodeonce).
        watch = getattr(camera, "watch", None)
        self._watch: Callable[[int], None] | None = watch if callable(watch) else None
        self.watching = 0  # the devices' open video gates
        self.viewing = 0  # the live view's open gates on the camera itself
        self._rates: dict[object, int] = {}  # each watching device's rate (shared VP8)
        self._tell_watchers()

    async def _heard(self) -> Any:
        """The microphone's next frame; while no audio gate is open, nothing is read.

        Every idle device's audio gate is subscribed to the relay, which would otherwise
        read the microphone 50 times a second and hand each frame to every gate, for
        nobody. The sources start from the present when read again (``ToneSource`` skips
        ahead, ``PyAudioSource`` drops what the sound card kept meanwhile).
        """
        await self._listened.wait()
        frame = await self._mic.next()
        frame.opaque = time.time()  # read now: the gates skip a frame kept from before
        return frame

    def video_track(self) -> GatedTrack:
        """A closed video gate for a device: the camera's packets, or the shared VP8."""
        proxy = self._relay.subscribe(self._video, buffered=False)
        return GatedTrack("video", proxy, wait_keyframe=self.encoded, on_gate=self._video_gate)

    def camera_track(self) -> GatedTrack:
        """A closed gate on the camera itself (frames, or its own packets): the live view."""
        proxy = self._relay.subscribe(self._camera, buffered=False)
        encoded = bool(self.camera.encoded)
        return GatedTrack("video", proxy, wait_keyframe=encoded, on_gate=self._camera_gate)

    def _video_gate(self, opened: bool) -> None:
        self.watching += 1 if opened else -1
        self._tell_watchers()

    def _camera_gate(self, opened: bool) -> None:
        self.viewing += 1 if opened else -1
        self._tell_watchers()

    def _tell_watchers(self) -> None:
        if self.encoder is not None:
            self.encoder.watch(self.watching)
        elif self._watch is not None:
            self._watch(self.watching + self.viewing)

    def device_rate(self, device: object, bitrate: int | None) -> None:
        """A watching device's rate from its loss (None: it no longer watches).

        The shared VP8 encoder runs at the lowest of them (``SharedVp8Encoder.limit``).
        """
        if bitrate is None:
            self._rates.pop(device, None)
        else:
            self._rates[device] = bitrate
        if self.encoder is not None:
            self.encoder.limit(min(self._rates.values()) if self._rates else None)

    def audio_track(self) -> GatedTrack:
        """A closed audio gate on the shared microphone."""
        proxy = self._relay.subscribe(self._microphone, buffered=False)
        return GatedTrack("audio", proxy, on_gate=self._audio_gate, fresh_only=True)

    def _audio_gate(self, opened: bool) -> None:
        self.listening += 1 if opened else -1
        if self.listening:
            self._listened.set()
        else:
            self._listened.clear()

    def request_keyframe(self) -> None:
        """Ask the encoder (the shared one, or an encoding camera's) for a keyframe now."""
        if self.encoder is not None:
            self.encoder.request_keyframe()
        elif self.camera.encoded:
            self.camera.request_keyframe()

    async def consume(
        self,
        track: MediaStreamTrack,
        to_door: Callable[[], bool],
        played: Callable[[Any], None] | None = None,
    ) -> None:
        """Read a device's audio; play it on the door speaker while ``to_door()`` holds."""
        import av  # noqa: PLC0415 - heavy, and only here once a device sends audio

        resampler = av.AudioResampler(format="s16", layout="mono", rate=48_000)
        while True:
            try:
                frame: Any = await track.recv()
            except MediaStreamError:
                return
            if not to_door():
                continue
            for out in resampler.resample(frame):
                await self.speaker.play(out)
                if played is not None:
                    played(out)

    def close(self) -> None:
        """Stop the shared sources."""
        if self.encoder is not None:
            self._video.stop()
            self.encoder.close()
        self._camera.stop()
        self._microphone.stop()
