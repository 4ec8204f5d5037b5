"""Camera and audio at the door: one small interface, several real implementations.

A camera yields either decoded frames (``av.VideoFrame``: synthetic pattern, V4L2 device,
video file) or already-encoded H.264 packets (``av.Packet``: the Pi's hardware encoder),
which aiortc sends without re-encoding. Sources are opened at start-up, so a missing
device stops the station with a clear error before anything else runs.
"""

from __future__ import annotations

from intercom.config import AudioConfig, CameraConfig
from intercom.media.base import AudioSink, AudioSource, CameraSource

__all__ = ["AudioSink", "AudioSource", "CameraSource", "open_audio", "open_camera"]


def open_camera(config: CameraConfig) -> CameraSource:
    """The camera source the config names (not yet opened)."""
    if config.source == "synthetic":
        from intercom.media.synthetic import SyntheticCamera  # noqa: PLC0415

        return SyntheticCamera(config.width, config.height, config.fps)
    if config.source in {"v4l2", "file"} and config.passthrough:
        from intercom.media.passthrough import H264PassthroughCamera  # noqa: PLC0415

        return H264PassthroughCamera(config.device or "", config.source == "v4l2", config)
    if config.source in {"v4l2", "file"}:
        from intercom.media.pyav import PyAVCamera  # noqa: PLC0415

        return PyAVCamera(config.device or "", config.source == "v4l2", config)
    from intercom.media.picamera import Picamera2Camera  # noqa: PLC0415

    return Picamera2Camera(config)


def open_audio(config: AudioConfig) -> tuple[AudioSource, AudioSink]:
    """The door microphone and speaker the config names (not yet opened)."""
    from intercom.media import audio  # noqa: PLC0415

    source: AudioSource
    sink: AudioSink
    if config.input == "synthetic":
        source = audio.ToneSource()
    else:
        source = audio.PyAudioSource(config.input_device)
    if config.output == "levels":
        sink = audio.LevelSink()
    else:
        sink = audio.PyAudioSink(config.output_device)
    return source, sink
