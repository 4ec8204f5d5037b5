"""Door microphone and speaker: pyaudio on a Pi; a tone and a level recorder elsewhere."""

from __future__ import annotations

import array
import asyncio
import fractions
import math
import time
from collections import deque
from typing import Any

from intercom.errors import HardwareError

SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960  # 20 ms
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
STALE_S = 0.1  # a microphone not read for this long starts again from the present


def rms_level(frame: Any) -> float:
    """The RMS level of an s16 frame, from 0.0 (silence) to 1.0 (full scale)."""
    size = frame.samples * 2 * len(frame.layout.channels)
    samples = array.array("h", bytes(frame.planes[0])[:size])
    if not samples:
        return 0.0
    return math.sqrt(sum(s * s for s in samples) / len(samples)) / 32768


def make_frame(pcm: bytes, pts: int) -> Any:
    """An ``av.AudioFrame`` from 20 ms of s16 mono PCM."""
    import av  # noqa: PLC0415

    frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
    frame.planes[0].update(pcm)
    frame.sample_rate = SAMPLE_RATE
    frame.pts = pts
    frame.time_base = TIME_BASE
    return frame


class ToneSource:
    """A 440 Hz tone at -12 dBFS, paced in real time, as the simulated microphone."""

    def __init__(self, frequency: float = 440.0) -> None:
        amplitude = 0.25 * 32767
        period = [
            int(amplitude * math.sin(2 * math.pi * frequency * i / SAMPLE_RATE))
            for i in range(FRAME_SAMPLES)
        ]
        self._pcm = array.array("h", period).tobytes()
        self._start = 0.0
        self.frames = 0

    async def open(self) -> None:
        """Start the clock."""
        self._start = time.monotonic()

    async def next(self) -> Any:
        """The next 20 ms of tone."""
        due = self._start + self.frames * FRAME_SAMPLES / SAMPLE_RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -STALE_S:
            # Nobody listened for a while: skip ahead rather than burst stale audio.
            self.frames = int((time.monotonic() - self._start) * SAMPLE_RATE / FRAME_SAMPLES)
        frame = make_frame(self._pcm, self.frames * FRAME_SAMPLES)
        self.frames += 1
        return frame

    async def close(self) -> None:
        """Nothing to release."""


class LevelSink:
    """The simulated speaker: keeps the level of every frame it is given."""

    SILENCE = 1e-4

    def __init__(self, history: int = 500) -> None:
        self.levels: deque[float] = deque(maxlen=history)
        self.frames = 0
        self.audible_frames = 0

    async def open(self) -> None:
        """Nothing to open."""

    async def play(self, frame: Any) -> None:
        """Record the frame's level."""
        level = rms_level(frame)
        self.levels.append(level)
        self.frames += 1
        if level > self.SILENCE:
            self.audible_frames += 1

    async def close(self) -> None:
        """Nothing to release."""


def _pyaudio() -> Any:
    try:
        import pyaudio  # noqa: PLC0415
    except ImportError as exc:
        raise HardwareError(
            "media.audio: pyaudio is not installed; install the 'pi' extra, or choose "
            'input = "synthetic" and output = "levels"'
        ) from exc
    return pyaudio


class PyAudioSource:
    """The door microphone through pyaudio (blocking reads in a worker thread)."""

    def __init__(self, device: int | None) -> None:
        self.device = device
        self._audio: Any = None
        self._stream: Any = None
        self.frames = 0
        self._read_at = 0.0  # time.monotonic() of the last read

    async def open(self) -> None:
        """Open the input device."""
        pyaudio = _pyaudio()
        try:
            self._audio = pyaudio.PyAudio()
            self._stream = self._audio.open(
                format=pyaudio.paInt16,
                channels=1,
                rate=SAMPLE_RATE,
                input=True,
                frames_per_buffer=FRAME_SAMPLES,
                input_device_index=self.device,
            )
        except (OSError, ValueError) as exc:
            raise HardwareError(f"media.audio.input_device: cannot open: {exc}") from exc

    async def next(self) -> Any:
        """The next 20 ms from the microphone (what it kept while nobody read is dropped)."""
        pcm = await asyncio.get_running_loop().run_in_executor(None, self._read)
        frame = make_frame(pcm, self.frames * FRAME_SAMPLES)
        self.frames += 1
        return frame

    def _read(self) -> bytes:
        stream = self._stream
        if time.monotonic() - self._read_at > STALE_S:
            # Nobody read for a while (no call): the sound card's buffer holds old audio
            # (or overflowed); start from the present, as ToneSource does.
            kept = stream.get_read_available()
            if kept > 0:
                stream.read(kept, exception_on_overflow=False)
        pcm: bytes = stream.read(FRAME_SAMPLES, exception_on_overflow=False)
        self._read_at = time.monotonic()
        return pcm

    async def close(self) -> None:
        """Close the device."""
        if self._stream is not None:
            self._stream.close()
        if self._audio is not None:
            self._audio.terminate()


class PyAudioSink:
    """The door speaker through pyaudio."""

    def __init__(self, device: int | None) -> None:
        self.device = device
        self._audio: Any = None
        self._stream: Any = None

    async def open(self) -> None:
        """Open the output device."""
        pyaudio = _pyaudio()
        try:
            self._audio = pyaudio.PyAudio()
            self._stream = self._audio.open(
                format=pyaudio.paInt16,
                channels=1,
                rate=SAMPLE_RATE,
                output=True,
                frames_per_buffer=FRAME_SAMPLES,
                output_device_index=self.device,
            )
        except (OSError, ValueError) as exc:
            raise HardwareError(f"media.audio.output_device: cannot open: {exc}") from exc

    async def play(self, frame: Any) -> None:
        """Play one frame (resampled to s16 mono 48 kHz by the caller's resampler)."""
        pcm = bytes(frame.planes[0])[: frame.samples * 2]
        await asyncio.get_running_loop().run_in_executor(None, self._stream.write, pcm)

    async def close(self) -> None:
        """Close the device."""
        if self._stream is not None:
            self._stream.close()
        if self._audio is not None:
            self._audio.terminate()
