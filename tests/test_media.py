"""Camera and audio sources that run here: synthetic, PyAV file, level sink.

picamera2 and pyaudio cannot run on this machine (no libcamera, no sound card); the
tests check that choosing them gives a clear error rather than a half-started station.
"""

import asyncio
import itertools
from fractions import Fraction
from pathlib import Path

import av
import pytest

from intercom.config import AudioConfig, CameraConfig
from intercom.errors import HardwareError
from intercom.media import open_audio, open_camera
from intercom.media.audio import LevelSink, ToneSource, rms_level


async def test_synthetic_frames_have_size_clock_and_pace():
    camera = open_camera(CameraConfig(source="synthetic", width=320, height=240, fps=2))
    await camera.open()
    frames = [await camera.next() for _ in range(3)]
    assert all((f.width, f.height) == (320, 240) for f in frames)
    steps = {int(b.pts - a.pts) for a, b in itertools.pairwise(frames)}
    assert len(steps) == 1  # one frame per slot, 1/fps apart
    assert frames[0].pts < frames[1].pts < frames[2].pts
    lumas = [bytes(f.planes[0]) for f in frames]
    assert len(set(lumas)) == 3  # the running clock changes every frame
    # Paced, not a burst: the next frame is half a second away, so asking for it now
    # leaves the request waiting while the loop goes round (an order, not a duration).
    waiting = asyncio.ensure_future(camera.next())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not waiting.done()
    assert (await asyncio.wait_for(waiting, 5)).pts > frames[-1].pts
    await camera.close()


async def test_file_camera_plays_a_real_video(tmp_path: Path):
    path = tmp_path / "visitor.mp4"
    synth = open_camera(CameraConfig(source="synthetic", width=320, height=240, fps=30))
    await synth.open()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(15):
            frame = await synth.next()
            frame.pts = i
            frame.time_base = Fraction(1, 30)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    camera = open_camera(CameraConfig(source="file", device=str(path), fps=30))
    await camera.open()
    frames = [await asyncio.wait_for(camera.next(), 2) for _ in range(20)]  # loops past the end
    assert {(f.width, f.height) for f in frames} == {(320, 240)}
    await camera.close()


async def test_missing_camera_device_names_it():
    camera = open_camera(CameraConfig(source="v4l2", device="/dev/video-nope"))
    with pytest.raises(HardwareError, match=r"media\.camera\.device: cannot open /dev/video-nope"):
        await camera.open()


async def test_picamera2_unavailable_here_is_clear():
    camera = open_camera(CameraConfig(source="picamera2"))
    with pytest.raises(HardwareError, match="picamera2"):
        await camera.open()


async def test_tone_is_audible_and_sink_records_levels():
    source, sink = open_audio(AudioConfig(input="synthetic", output="levels"))
    assert isinstance(source, ToneSource)
    assert isinstance(sink, LevelSink)
    await source.open()
    await sink.open()
    for _ in range(5):
        frame = await source.next()
        assert frame.samples == 960
        assert frame.sample_rate == 48000
        await sink.play(frame)
    assert sink.frames == 5
    assert sink.audible_frames == 5
    assert sink.levels[0] == pytest.approx(0.25 / 2**0.5, rel=0.02)


async def test_silence_is_not_audible():
    sink = LevelSink()
    frame = av.AudioFrame(format="s16", layout="mono", samples=960)
    frame.planes[0].update(bytes(1920))
    await sink.play(frame)
    assert rms_level(frame) == 0.0
    assert sink.audible_frames == 0


async def test_pyaudio_missing_is_clear():
    source, _ = open_audio(AudioConfig(input="pyaudio", output="levels"))
    with pytest.raises(HardwareError, match="pyaudio"):
        await source.open()


async def test_tone_skips_ahead_after_a_pause():
    source = ToneSource()
    await source.open()
    await source.next()
    await asyncio.sleep(0.3)  # nobody read for 15 frames
    frames = [await source.next() for _ in range(3)]
    # No burst of stale frames: it skipped past the pause, then went on frame by frame.
    assert frames[0].pts >= 14 * 960
    assert [f.pts - frames[0].pts for f in frames] == [0, 960, 1920]


async def write_video(path: Path, codec: str, frames: int = 15) -> None:
    synth = open_camera(CameraConfig(source="synthetic", width=320, height=240, fps=30))
    await synth.open()
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        if codec == "libx264":
            stream.options = {"g": "5", "tune": "zerolatency"}
        for i in range(frames):
            frame = await synth.next()
            frame.pts = i
            frame.time_base = Fraction(1, 30)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def nal_types(data: bytes) -> set[int]:
    types, i = set(), 0
    while (i := data.find(b"\x00\x00\x01", i)) != -1:
        types.add(data[i + 3] & 0x1F)
        i += 3
    return types


async def test_h264_file_passthrough_sends_annexb_packets(tmp_path: Path):
    path = tmp_path / "door.mp4"  # MP4 stores AVCC: the camera must convert to Annex-B
    await write_video(path, "libx264")
    camera = open_camera(CameraConfig(source="file", device=str(path), fps=30, passthrough=True))
    assert camera.encoded
    await camera.open()
    packets = [await asyncio.wait_for(camera.next(), 2) for _ in range(35)]  # loops twice
    await camera.close()
    pts = [p.pts for p in packets]
    assert pts == sorted(pts)
    assert len(set(pts)) == len(pts)
    datas = [bytes(p) for p in packets]
    assert all(d.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")) for d in datas)
    keyframes = [d for d in datas if 5 in nal_types(d)]
    assert keyframes
    assert all({7, 8} <= nal_types(d) for d in keyframes)  # SPS and PPS in band
    decoder = av.CodecContext.create("h264", "r")
    decoded = [f for d in datas for f in decoder.decode(av.Packet(d))]
    assert len(decoded) >= 30
    assert {(f.width, f.height) for f in decoded} == {(320, 240)}


async def test_a_raw_h264_file_loops_and_passthrough_numbers_its_frames(tmp_path: Path):
    # A raw Annex-B .h264 file (what a camera gives) carries no timestamps at all.
    path = tmp_path / "door.h264"
    synth = open_camera(CameraConfig(source="synthetic", width=320, height=240, fps=30))
    await synth.open()
    with av.open(str(path), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"g": "5", "tune": "zerolatency"}
        for _ in range(10):
            frame = await synth.next()
            frame.pts = None
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    camera = open_camera(CameraConfig(source="file", device=str(path), fps=30, passthrough=True))
    await camera.open()
    packets = [await asyncio.wait_for(camera.next(), 2) for _ in range(25)]  # loops twice
    await camera.close()
    ticks = [p.pts * p.time_base for p in packets]
    assert ticks == [Fraction(n, 30) for n in range(25)]  # one frame apart, looping on
    assert [p.is_keyframe for p in packets[:10]] == [n % 5 == 0 for n in range(10)]
    # Decoded, it loops too (such a stream cannot seek: it is opened again).
    decoding = open_camera(CameraConfig(source="file", device=str(path), fps=30))
    await decoding.open()
    frames = [await asyncio.wait_for(decoding.next(), 2) for _ in range(25)]
    await decoding.close()
    assert {(f.width, f.height) for f in frames} == {(320, 240)}
    times = [f.pts * f.time_base for f in frames]  # rising across the loops: encoders need it
    assert times == sorted(set(times))


async def test_passthrough_refuses_a_source_that_is_not_h264(tmp_path: Path):
    path = tmp_path / "door.mp4"
    await write_video(path, "mpeg4", frames=3)
    camera = open_camera(CameraConfig(source="file", device=str(path), passthrough=True))
    with pytest.raises(HardwareError, match=r"carries mpeg4, not H\.264"):
        await camera.open()


def test_passthrough_only_for_pyav_sources():
    with pytest.raises(ValueError, match="passthrough: only for v4l2 or file"):
        CameraConfig(source="synthetic", passthrough=True)


async def test_encode_once_gives_decodable_h264_with_idr_on_request():
    from intercom.media.encodeonce import EncodeOnceCamera  # noqa: PLC0415

    inner = open_camera(CameraConfig(source="synthetic", width=320, height=240, fps=30))
    camera = EncodeOnceCamera(inner, fps=30)
    assert camera.encoded
    await camera.open()
    packets = [await camera.next() for _ in range(6)]
    camera.request_keyframe()
    packets += [await camera.next() for _ in range(2)]
    await camera.close()
    datas = [bytes(p) for p in packets]
    assert 5 in nal_types(datas[0])  # the first packet is an IDR
    assert not any(5 in nal_types(d) for d in datas[1:6])  # then P-frames only
    assert {5, 7, 8} <= nal_types(datas[6])  # IDR with SPS/PPS after the request
    decoder = av.CodecContext.create("h264", "r")
    decoded = [f for d in datas for f in decoder.decode(av.Packet(d))]
    decoded += decoder.decode(None)
    assert len(decoded) == 8


async def test_station_with_encode_once_shares_one_encoder(tmp_path: Path):
    from intercom.config import simulated_settings  # noqa: PLC0415
    from intercom.station import Station  # noqa: PLC0415

    base = simulated_settings(tmp_path / "s")
    camera = base.media.camera.model_copy(update={"encode_once": True})
    settings = base.model_copy(update={"media": base.media.model_copy(update={"camera": camera})})
    station = Station(settings)
    await station.start()
    try:
        assert station.camera is not None
        assert station.camera.encoded
        packet = await asyncio.wait_for(station.camera.next(), 5)
        assert 5 in nal_types(bytes(packet))
    finally:
        await station.stop()


async def test_encode_once_keeps_a_keyframe_ready_while_nobody_watches():
    from intercom.media.encodeonce import EncodeOnceCamera  # noqa: PLC0415

    inner = open_camera(CameraConfig(source="synthetic", width=320, height=240, fps=30))
    camera = EncodeOnceCamera(inner, fps=30)
    await camera.open()
    try:
        camera.watch(0)
        idle = [bytes(await camera.next()) for _ in range(4)]
        assert all(5 in nal_types(d) for d in idle)  # every packet an IDR
        camera.watch(1)  # a peer joins; the newest packet is its start ...
        camera.request_keyframe()  # ... so the request that comes with it needs no IDR
        assert camera.keyframes_requested == 1
        watched = [bytes(await camera.next()) for _ in range(3)]
        assert not any(5 in nal_types(d) for d in watched)
        camera.request_keyframe()  # a later request (picture loss) does
        assert 5 in nal_types(bytes(await camera.next()))
        camera.watch(0)
        await camera.next()  # (may have been encoded before)
        assert 5 in nal_types(bytes(await camera.next()))
        decoder = av.CodecContext.create("h264", "r")
        assert len([f for d in idle + watched for f in decoder.decode(av.Packet(d))]) == 7
    finally:
        await camera.close()


async def test_encode_once_ignores_a_decoded_frames_picture_type():
    from intercom.media.encodeonce import EncodeOnceCamera  # noqa: PLC0415

    inner = open_camera(CameraConfig(source="synthetic", width=320, height=240, fps=30))
    next_frame = inner.next

    async def decoded_intra() -> av.VideoFrame:  # as a file's decoder hands them out
        frame = await next_frame()
        frame.pict_type = av.video.frame.PictureType.I
        return frame

    inner.next = decoded_intra  # type: ignore[method-assign]
    camera = EncodeOnceCamera(inner, fps=30)
    await camera.open()
    datas = [bytes(await camera.next()) for _ in range(5)]
    await camera.close()
    assert [5 in nal_types(d) for d in datas] == [True, False, False, False, False]


def test_encode_once_refuses_sources_that_are_h264_already():
    with pytest.raises(ValueError, match="encode_once: the source is already H"):
        CameraConfig(source="picamera2", encode_once=True)


async def test_encode_once_makes_an_idr_at_once_on_request():
    from intercom.media.encodeonce import EncodeOnceCamera  # noqa: PLC0415

    inner = open_camera(CameraConfig(source="synthetic", width=320, height=240, fps=2))
    camera = EncodeOnceCamera(inner, fps=2)
    await camera.open()
    first = await camera.next()  # the first IDR
    waiting = asyncio.ensure_future(camera.next())  # the next frame is 0.5 s away
    for _ in range(3):
        await asyncio.sleep(0)  # let it start waiting for that frame
    assert not waiting.done()
    camera.request_keyframe()
    packet = await asyncio.wait_for(waiting, 2)
    assert 5 in nal_types(bytes(packet))
    # Made at once from the frame already captured (one tick later), not from the
    # camera's next frame, which comes half a second (45,000 ticks) after the first.
    assert packet.pts == first.pts + 1
    following = await asyncio.wait_for(camera.next(), 2)  # then the real next frame
    assert 5 not in nal_types(bytes(following))
    assert following.pts > packet.pts
    await camera.close()
