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


async def test_an_opened_gate_on_packets_starts_at_a_keyframe():
    camera = H264Camera()
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
