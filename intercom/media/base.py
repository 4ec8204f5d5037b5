"""The interfaces every camera and audio implementation provides."""

from __future__ import annotations

from typing import Any, Protocol


class CameraSource(Protocol):
    """A source of video at the door.

    ``encoded`` sources return ``av.Packet`` (Annex-B H.264 with SPS/PPS in band) from
    ``next``; the others return ``av.VideoFrame``.
    """

    encoded: bool
    name: str

    async def open(self) -> None:
        """Open the device; raise HardwareError naming it when that fails."""

    async def next(self) -> Any:
        """Wait for and return the next frame or packet (the newest, never stale)."""

    def request_keyframe(self) -> None:
        """Make the next packet an IDR (encoded sources, when a peer joins)."""

    async def close(self) -> None:
        """Release the device."""


class AudioSource(Protocol):
    """The door microphone: 20 ms ``av.AudioFrame``s, s16 mono 48 kHz."""

    async def open(self) -> None:
        """Open the device."""

    async def next(self) -> Any:
        """The next 20 ms frame."""

    async def close(self) -> None:
        """Release the device."""


class AudioSink(Protocol):
    """The door speaker: plays ``av.AudioFrame``s."""

    async def open(self) -> None:
        """Open the device."""

    async def play(self, frame: Any) -> None:
        """Play one frame."""

    async def close(self) -> None:
        """Release the device."""
