"""The media path on its own: gated tracks, H.264 passthrough with a forced IDR."""

from __future__ import annotations

import asyncio
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from intercom.calls.peer import DevicePeer, without_mdns
from intercom.calls.tracks import MediaHub
from intercom.media.audio import LevelSink, ToneSource

from .test_calls_client import H264Camera, eventually


async def connect(peer: DevicePeer) -> tuple[RTCPeerConnection, list[Any]]:
    """An aiortc device answering the station's offer; returns it and its video frames."""
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    frames: list[Any] = []

    async def consume(track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                frames.append(frame)

    client.on("track", lambda track: asyncio.ensure_future(consume(track)))
    await client.setRemoteDescription(RTCSessionDescription(await peer.offer(), "offer"))
    await client.setLocalDescription(await client.createAnswer())
    await peer.accept_answer(client.localDescription.sdp)
    for _ in range(500):
        if peer.pc.connectionState == "connected":
            break
        await asyncio.sleep(0.02)
    assert peer.pc.connectionState == "connected"
    return client, frames


async def no_unlock(_token: str) -> dict[str, Any]:
    return {}


async def test_h264_packets_pass_through_with_an_idr_at_each_ring():
    camera = H264Camera()
    await camera.open()
    microphone = ToneSource()
    await microphone.open()
    hub = MediaHub(camera, microphone, LevelSink())
    hub.start()
    peer = DevicePeer(hub, [], no_unlock, lambda: None)
    client, frames = await connect(peer)
    try:
        assert "H264" in peer.pc.localDescription.sdp
        assert "VP8" not in peer.pc.localDescription.sdp.split("m=audio")[0]
        await asyncio.sleep(0.5)
        assert frames == [], "nothing flows before the ring"
        for ring in range(2):
            requested = camera.keyframes_requested
            peer.start_video()
            assert camera.keyframes_requested == requested + 1
            await eventually(lambda: len(frames) >= 5, what=f"ring {ring}: frames decoded")
            assert (frames[0].width, frames[0].height) == (320, 240)
            peer.stop_video()
            await asyncio.sleep(0.2)
            count = len(frames)
            await asyncio.sleep(0.4)
            assert len(frames) == count, "the gate stops the video"
            frames.clear()
        # a device's picture loss indication (RTCP PLI) reaches the camera's encoder
        peer.start_video()
        requested = camera.keyframes_requested
        (receiver,) = [r for r in client.getReceivers() if r.track.kind == "video"]
        await receiver._send_rtcp_pli(peer.video_sender._ssrc)
        await eventually(lambda: camera.keyframes_requested > requested, what="PLI forwarded")
        # aiortc never re-encoded: its H.264 encoder only packetised our packets
        encoder = peer.video_sender._RTCRtpSender__encoder
        assert type(encoder).__name__ == "H264Encoder"
        assert encoder.codec is None
    finally:
        await peer.close()
        await client.close()
        hub.close()
        await camera.close()


def test_mdns_candidates_are_dropped_from_answers():
    sdp = (
        "v=0\r\n"
        "a=candidate:1 1 udp 2122260223 1f4712db-ea17-4bcf.local 54400 typ host\r\n"
        "a=candidate:2 1 udp 2122260223 192.0.2.2 54401 typ host\r\n"
        "a=end-of-candidates\r\n"
    )
    cleaned = without_mdns(sdp)
    assert ".local" not in cleaned
    assert "192.0.2.2 54401" in cleaned
    assert cleaned.endswith("a=end-of-candidates\r\n")


class KeepsNoKeyframe:
    """An encoding camera that keeps no keyframe ready (like a V4L2 or file passthrough)."""

    encoded = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name

    async def open(self) -> None:
        await self.inner.open()

    async def next(self) -> Any:
        return await self.inner.next()

    def request_keyframe(self) -> None:
        self.inner.request_keyframe()

    async def close(self) -> None:
        await self.inner.close()


async def test_an_opened_gate_on_packets_starts_at_a_keyframe():
    camera = KeepsNoKeyframe(H264Camera())
    await camera.open()
    microphone = ToneSource()
    await microphone.open()
    hub = MediaHub(camera, microphone, LevelSink())
    track = hub.video_track()
    try:
        await asyncio.sleep(0.3)  # the relay runs; the newest packet is a P-frame
        for _ in range(2):
            track.open()
            hub.request_keyframe()
            first = await asyncio.wait_for(track.recv(), 2)
            assert first.is_keyframe
            assert not (await asyncio.wait_for(track.recv(), 2)).is_keyframe
            track.close()
            await asyncio.sleep(0.2)
        # a camera that does not deliver the keyframe is not waited for forever
        track.open()
        opened = asyncio.get_running_loop().time()
        first = await asyncio.wait_for(track.recv(), 3)
        assert not first.is_keyframe
        assert asyncio.get_running_loop().time() - opened >= 0.9
    finally:
        track.stop()
        hub.close()
        await camera.close()


async def test_a_ring_starts_from_the_keyframe_kept_ready_without_encoding_one():
    camera = H264Camera()
    await camera.open()
    microphone = ToneSource()
    await microphone.open()
    hub = MediaHub(camera, microphone, LevelSink())
    tracks = [hub.video_track(), hub.video_track()]
    try:
        await asyncio.sleep(0.3)  # nobody watches: the newest packet is an IDR
        assert camera._last_was_idr
        for ring in range(2):
            newest = camera._last  # the frame of the newest packet
            for track in tracks:  # what a ring does for each device: open, ask for an IDR
                track.open()
                hub.request_keyframe()
            assert hub.watching == 2
            firsts = [await asyncio.wait_for(t.recv(), 2) for t in tracks]
            assert all(p.is_keyframe for p in firsts), f"ring {ring}"
            # the packet kept ready (no IDR was encoded at the ring: that would repeat
            # the newest frame one tick later), and P-frames follow
            assert {p.pts for p in firsts} == {newest.pts}
            assert not (await asyncio.wait_for(tracks[0].recv(), 2)).is_keyframe
            # a later request (a device's picture loss indication) gets a new IDR at once
            hub.request_keyframe()
            assert (await asyncio.wait_for(tracks[0].recv(), 2)).is_keyframe
            for track in tracks:
                track.close()
            assert hub.watching == 0
            await asyncio.sleep(0.2)
        tracks[0].open()
        tracks[0].stop()  # a device gone while rung no longer counts as watching
        assert hub.watching == 0
    finally:
        for track in tracks:
            track.stop()
        assert hub.watching == 0
        hub.close()
        await camera.close()
