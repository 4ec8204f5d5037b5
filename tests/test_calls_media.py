"""The media path on its own: gated tracks, H.264 passthrough with a forced IDR."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import Callable
from typing import Any

import av
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRemoteInboundRtpStreamStats,
    RTCSessionDescription,
    RTCStatsReport,
)
from aiortc.mediastreams import MediaStreamError

from intercom.calls.peer import DevicePeer, on_link, without_mdns
from intercom.calls.tracks import MediaHub
from intercom.media.audio import LevelSink, ToneSource
from intercom.media.sharedvp8 import MIN_BITRATE, LossRate, bitrate_for
from intercom.media.synthetic import SyntheticCamera
from intercom.netaddr import local_networks

from .test_calls_client import H264Camera, eventually


class LocalDevice:
    """An aiortc device in this process: it answers every offer of one ``DevicePeer``.

    The first offer sets the connection up with its media inactive; ``start_video``
    (a ring) renegotiates it, and this device answers that offer too.
    """

    def __init__(self) -> None:
        self.client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.frames: list[Any] = []
        self.peer: DevicePeer | None = None
        self.answers = 0
        self.offers: list[str] = []
        self.edit_answer: Callable[[str], str] = lambda sdp: sdp
        self._tasks: set[asyncio.Task[None]] = set()
        self.client.on("track", self._on_track)

    def _on_track(self, track: Any) -> None:
        task = asyncio.ensure_future(self._consume(track))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _consume(self, track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.frames.append(frame)

    def send_offer(self, sdp: str) -> None:
        """The peer's offer callback: answered in a task, as a socket would deliver it."""
        task = asyncio.ensure_future(self.answer(sdp))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, sdp: str) -> None:
        assert self.peer is not None
        self.offers.append(sdp)
        await self.client.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await self.client.setLocalDescription(await self.client.createAnswer())
        # A socket's hop: aiortc starts this end's receivers in a task of its own, and
        # the station's first packets must not arrive before they are listening.
        await asyncio.sleep(0.02)
        await self.peer.accept_answer(self.edit_answer(self.client.localDescription.sdp))
        self.answers += 1


def local_peer(hub: MediaHub, unlock: Any = None, networks: Any = None
               ) -> tuple[DevicePeer, LocalDevice]:
    """A station ``DevicePeer`` on ``hub`` and the in-process device that answers it (on
    this machine: on the station's networks, as a phone at home, unless ``networks``)."""
    device = LocalDevice()
    peer = DevicePeer(hub, [], unlock or no_unlock, lambda: None, device.send_offer,
                      networks=local_networks() if networks is None else networks)
    device.peer = peer
    return peer, device


async def station_end(camera: Any) -> tuple[MediaHub, DevicePeer, LocalDevice]:
    """The station's end of one device's connection: the camera opened, a tone for the
    door microphone, the hub, a ``DevicePeer`` on it and the in-process device
    that answers its offers."""
    hub = await open_hub(camera)
    return (hub, *local_peer(hub))


async def open_hub(camera: Any, microphone: ToneSource | None = None, **kwargs: Any) -> MediaHub:
    """A ``MediaHub`` on ``camera`` and ``microphone`` (a tone by default), both opened."""
    microphone = microphone or ToneSource()
    await camera.open()
    await microphone.open()
    return MediaHub(camera, microphone, LevelSink(), **kwargs)


async def close_all(ends: list[Any], clients: list[Any], hub: MediaHub, camera: Any) -> None:
    """Close the station's peers and the devices' connections, then the hub and camera."""
    for (peer, _device), client in zip(ends, clients, strict=False):
        await peer.close()
        await client.close()
    hub.close()
    await camera.close()


async def connect(peer: DevicePeer, device: LocalDevice) -> tuple[RTCPeerConnection, list[Any]]:
    """The device answers the station's first offer; returns its connection and frames."""
    await device.answer(await peer.offer())
    for _ in range(500):
        if peer.pc.connectionState == "connected":
            break
        await asyncio.sleep(0.02)
    assert peer.pc.connectionState == "connected"
    return device.client, device.frames


async def no_unlock(_token: str) -> dict[str, Any]:
    return {}


async def transport_packets(pc: RTCPeerConnection) -> tuple[int, int]:
    """Packets sent and received over DTLS (RTP, RTCP, SCTP; not ICE's own checks)."""
    stats = await pc.getStats()
    (transport,) = [s for s in stats.values() if s.type == "transport"]
    return transport.packetsSent, transport.packetsReceived


async def test_an_idle_connection_carries_nothing_and_a_ring_turns_the_audio_on_after_the_video():
    camera = SyntheticCamera(160, 120, 15)
    hub, peer, device = await station_end(camera)
    client, frames = await connect(peer, device)
    try:
        video, audio = device.offers[0].split("m=audio")
        assert "a=sendonly" in video
        assert "a=inactive" in audio.split("m=application")[0]
        await asyncio.sleep(0.5)  # the data channel's own set-up
        before = await transport_packets(peer.pc)
        await asyncio.sleep(3.2)  # aiortc reports every 0.5-1.5 s from a running sender
        assert await transport_packets(peer.pc) == before, "an idle connection sent or got media"
        peer.start_video()  # the ring: the gate opens, no negotiation before the video
        await eventually(lambda: len(frames) >= 1, what="video after the ring")
        assert device.answers == 1
        # once the first frame is out, one renegotiation turns the audio on
        await eventually(lambda: device.answers == 2, what="the audio renegotiated")
        assert peer.media_on
        assert "a=sendrecv" in device.offers[1].split("m=audio")[1].split("m=application")[0]
        peer.start_audio()  # the answer: gates only
        await asyncio.sleep(0.3)
        assert device.answers == 2
    finally:
        await peer.close()
        await client.close()
        hub.close()
        await camera.close()


class CountedTone(ToneSource):
    """The simulated door microphone, counting its reads."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def next(self) -> Any:
        self.reads += 1
        return await super().next()


async def test_the_door_microphone_is_read_only_while_a_device_listens():
    camera = SyntheticCamera(160, 120, 15)
    microphone = CountedTone()
    hub = await open_hub(camera, microphone)
    ends = [local_peer(hub), local_peer(hub)]
    clients = [(await connect(*end))[0] for end in ends]
    (first, _), (second, _) = ends
    try:
        await asyncio.sleep(0.5)  # 25 frames' time, two devices connected and idle
        assert microphone.reads == 0, "the microphone was read while nobody listened"
        first.start_video()  # a ring: video only
        await eventually(lambda: first.media_on, what="the audio renegotiated")
        await asyncio.sleep(0.2)
        assert microphone.reads == 0, "a ring alone read the microphone"
        first.start_audio()  # the answer
        await eventually(lambda: first.audio.frames >= 5, what="door audio to the device")
        assert microphone.reads >= 5
        assert second.audio.frames == 0, "the device not in the call got door audio"
        first.stop_audio()
        first.stop_video()  # the hang-up
        await asyncio.sleep(0.1)  # a read in flight may finish
        reads = microphone.reads
        await asyncio.sleep(0.4)
        assert microphone.reads == reads, "the microphone was read after the call"
        second.start_video()
        await eventually(lambda: second.media_on, what="the second device's audio on")
        second.start_audio()
        await eventually(lambda: second.audio.frames >= 1, what="door audio to the second")
        assert microphone.reads > reads
    finally:
        await close_all(ends, clients, hub, camera)


async def test_an_audio_gate_skips_the_frame_kept_from_the_last_call():
    camera = SyntheticCamera(160, 120, 15)
    microphone = CountedTone()
    hub = await open_hub(camera, microphone)
    first, second = hub.audio_track(), hub.audio_track()
    try:
        first.open()
        heard = [await first.recv() for _ in range(3)]
        first.close()
        await asyncio.sleep(0.2)  # the relay keeps the last frame for the second gate
        second.open()
        frame = await second.recv()
        assert frame.opaque >= second.opened_at, "a frame from before the call was passed"
        assert frame.pts > heard[-1].pts
    finally:
        first.stop()
        second.stop()
        hub.close()
        await camera.close()


async def test_h264_packets_pass_through_with_an_idr_at_each_ring():
    camera = H264Camera()
    hub, peer, device = await station_end(camera)
    client, frames = await connect(peer, device)
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
        (receiver,) = [r for r in client.getReceivers() if r.track and r.track.kind == "video"]
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
    hub = await open_hub(camera)
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
    hub = await open_hub(camera)
    tracks = [hub.video_track(), hub.video_track()]
    try:
        await asyncio.sleep(0.3)  # nobody watches: the newest packet is an IDR
        assert camera._last_was_idr
        step = 90_000 // 15  # the synthetic camera's frames are this many ticks apart
        for ring in range(2):
            for track in tracks:  # what a ring does for each device: open, ask for an IDR
                track.open()
                hub.request_keyframe()
            assert hub.watching == 2
            firsts = [await asyncio.wait_for(t.recv(), 2) for t in tracks]
            assert all(p.is_keyframe for p in firsts), f"ring {ring}"
            # both start from one packet kept ready: no IDR was encoded at the ring, which
            # would repeat the newest frame one tick later (a time between two frames'),
            # and P-frames follow
            (start,) = {p.pts for p in firsts}
            assert start % step == 0, f"ring {ring}: an IDR made at the ring ({start})"
            assert not (await asyncio.wait_for(tracks[0].recv(), 2)).is_keyframe
            # a later request (a device's picture loss indication) gets a new IDR at once
            hub.request_keyframe()
            assert (await asyncio.wait_for(tracks[0].recv(), 2)).is_keyframe
            for track in tracks:
                track.close()
            assert hub.watching == 0
            await asyncio.sleep(0.5)  # frames again, each an IDR: a captured one is newest
        tracks[0].open()
        tracks[0].stop()  # a device gone while rung no longer counts as watching
        assert hub.watching == 0
    finally:
        for track in tracks:
            track.stop()
        assert hub.watching == 0
        hub.close()
        await camera.close()


async def test_a_connection_closed_under_a_ring_renegotiates_nothing_and_logs_no_fault(caplog):
    """aiortc closes a connection itself (a transport that failed in a task of its own);
    the ring's audio renegotiation then has nobody to offer to: it gives up quietly, and a
    connection the station closed starts nothing new. (Found by the data channel fuzz: an
    offer on a closed connection raised in a task nobody awaited.)"""
    camera = SyntheticCamera(160, 120, 15)
    hub, peer, device = await station_end(camera)
    client, _frames = await connect(peer, device)
    try:
        await peer.pc.close()  # as aiortc does on its own
        peer.start_audio()  # the answer arrives: audio would be renegotiated
        await asyncio.sleep(0.3)
        assert device.offers == device.offers[:1], "an offer was made on a closed connection"
        await peer.close()
        peer.start_video()  # a ring reaching a connection already closed
        await asyncio.sleep(0.3)
        assert not peer._tasks, "a closed connection started a task"
        faults = [r for r in caplog.records if r.levelno >= 40]
        assert not faults, [r.getMessage() for r in faults]
    finally:
        await peer.close()
        await client.close()
        hub.close()
        await camera.close()


def test_only_a_device_on_the_stations_own_network_is_a_device_at_home():
    """A zero playout delay only at home: a host candidate on one of the station's
    networks. Away (relay, srflx, or host candidates of another network) Chromium keeps
    its jitter buffer for retransmissions."""
    home = [ipaddress.ip_network("192.168.77.0/24"), ipaddress.ip_network("fd00:77::/64")]

    def answer(*candidates: str) -> str:
        return "v=0\r\n" + "".join(f"a=candidate:{c}\r\n" for c in candidates)

    assert on_link(answer("1 1 udp 2122 192.168.77.9 5000 typ host"), home)
    assert on_link(answer("1 1 udp 2122 fd00:77::9 5000 typ host"), home)
    assert not on_link(answer("1 1 udp 2122 10.77.0.2 5000 typ host",
                              "2 1 udp 1686 198.51.100.2 6000 typ srflx raddr 10.77.0.2 rport 5000",
                              "3 1 udp 41 203.0.113.1 7000 typ relay raddr 0.0.0.0 rport 0"), home)
    # a relayed candidate whose relay sits on the home network is still not the device
    assert not on_link(answer("3 1 udp 41 192.168.77.1 7000 typ relay raddr 0.0.0.0 rport 0"),
                       home)
    assert not on_link(answer("1 1 udp 2122 x.local 5000 typ host"), home)
    assert not on_link(answer("1 1 udp 2122 192.168.77.9 5000 typ host"), [])


def video_section(sdp: str) -> str:
    return sdp.split("m=video")[1].split("m=audio", maxsplit=1)[0]


async def test_devices_rung_at_once_get_decodable_vp8_from_one_shared_encoder():
    camera = SyntheticCamera(160, 120, 15)
    hub, *first = await station_end(camera)
    ends = [tuple(first), local_peer(hub), local_peer(hub)]
    clients = []
    try:
        assert hub.encoder is not None
        for peer, device in ends:
            clients.append((await connect(peer, device))[0])
            video = video_section(device.offers[0])
            assert "VP8/90000" in video
            assert "H264" not in video
        await asyncio.sleep(0.3)
        assert hub.encoder.codecs_made == 0, "nothing is encoded before a ring"
        for peer, _device in ends:  # a ring of the flat: every gate opens in one turn
            peer.start_video()
        for index, (_peer, device) in enumerate(ends):
            await eventually(lambda d=device: len(d.frames) >= 5, what=f"device {index}")
            assert (device.frames[0].width, device.frames[0].height) == (160, 120)
        assert hub.encoder.codecs_made == 1
        # one keyframe for the three devices (the gates and their requests came together)
        assert hub.encoder.keyframes == 1
        for peer, _device in ends:
            # aiortc's own VP8 encoder only packetised the shared packets: never opened
            encoder = peer.video_sender._RTCRtpSender__encoder
            assert type(encoder).__name__ == "Vp8Encoder"
            assert encoder.codec is None
        for peer, _device in ends:
            peer.stop_video()
        assert hub.watching == 0
    finally:
        await close_all(ends, clients, hub, camera)


async def test_a_device_joining_a_running_shared_encoder_gets_a_keyframe_at_once():
    """The shared encoder makes keyframes only when asked (no periodic ones): a device
    that joins while another already receives decodes nothing until it gets one."""
    camera = SyntheticCamera(160, 120, 15)
    hub, *first = await station_end(camera)
    ends = [tuple(first), local_peer(hub)]
    clients = []
    try:
        assert hub.encoder is not None
        for peer, device in ends:
            clients.append((await connect(peer, device))[0])
        (early, early_device), (late, late_device) = ends
        early.start_video()
        await eventually(lambda: len(early_device.frames) >= 10, what="the first device")
        keyframes = hub.encoder.keyframes
        late.start_video()
        await eventually(lambda: len(late_device.frames) >= 3, what="the late device")
        assert hub.encoder.keyframes == keyframes + 1
        assert hub.encoder.codecs_made == 1
        # a device's picture loss indication (RTCP PLI) reaches the shared encoder too
        (receiver,) = [r for r in clients[1].getReceivers() if r.track and r.track.kind == "video"]
        await receiver._send_rtcp_pli(late.video_sender._ssrc)
        await eventually(lambda: hub.encoder.keyframes == keyframes + 2, what="PLI forwarded")
        count = len(early_device.frames)
        await eventually(lambda: len(early_device.frames) >= count + 5, what="the first goes on")
    finally:
        await close_all(ends, clients, hub, camera)


async def test_vp8_per_device_is_still_there_when_asked_for():
    camera = SyntheticCamera(160, 120, 15)
    hub = await open_hub(camera, shared_vp8=False)
    peer, device = local_peer(hub)
    client, frames = await connect(peer, device)
    try:
        assert hub.encoder is None
        assert not hub.encoded
        peer.start_video()
        await eventually(lambda: len(frames) >= 5, what="frames decoded")
        encoder = peer.video_sender._RTCRtpSender__encoder
        assert encoder.codec is not None, "aiortc encoded for this device itself"
    finally:
        await peer.close()
        await client.close()
        hub.close()
        await camera.close()


async def test_the_live_views_gate_reads_the_camera_not_the_devices_encoder():
    camera = SyntheticCamera(160, 120, 15)
    hub = await open_hub(camera)
    view = hub.camera_track()
    try:
        view.open()
        frame = await asyncio.wait_for(view.recv(), 2)
        assert isinstance(frame, av.VideoFrame)  # frames, for the redaction
        assert hub.watching == 0
        assert hub.encoder is not None
        assert hub.encoder.codecs_made == 0, "a live view alone starts no VP8 encoder"
    finally:
        view.stop()
        hub.close()
        await camera.close()


def remote_inbound(lost: int, received: int) -> Any:
    """A receiver report's statistics as aiortc's ``RTCRtpSender.getStats`` gives them."""
    return RTCRemoteInboundRtpStreamStats(
        timestamp=dt.datetime.now(dt.UTC), type="remote-inbound-rtp",
        id="remote-inbound-rtp_test", ssrc=1, kind="video", transportId="t",
        packetsReceived=received, packetsLost=lost, jitter=0, roundTripTime=0.1,
        fractionLost=0.0)


class ScriptedReports:
    """A device's receiver reports, in place of its sender's: ``share`` of the packets
    lost in each (cumulative counts, as a browser sends them)."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.lost = self.received = 0

    async def __call__(self) -> Any:
        self.lost += round(100 * self.share)
        self.received += 100 - round(100 * self.share)
        return RTCStatsReport({"r": remote_inbound(self.lost, self.received)})


async def test_the_shared_encoder_follows_the_worst_watching_devices_loss():
    """A device losing 40 % of its packets brings the shared encoder's bitrate down
    (a new libvpx encoder, from a keyframe) for everyone watching; the devices still
    decode; once it stops watching, the rate returns to the ceiling."""
    camera = SyntheticCamera(640, 480, 15)
    hub, *first = await station_end(camera)
    ends = [tuple(first), local_peer(hub)]
    clients = []
    try:
        encoder = hub.encoder
        assert encoder is not None
        for peer, device in ends:
            clients.append((await connect(peer, device))[0])
        (good, good_device), (bad, bad_device) = ends
        good.video_sender.getStats = ScriptedReports(0.0)  # type: ignore[method-assign]
        bad.video_sender.getStats = ScriptedReports(0.4)  # type: ignore[method-assign]
        good.start_video()
        await eventually(lambda: len(good_device.frames) >= 3, what="the good device")
        ceiling = bitrate_for(640, 480, 15)
        assert encoder.bitrate == ceiling  # a loss-free device leaves it where it starts
        assert encoder.codecs_made == 1
        bad.start_video()
        # down by a fifth a report to the floor (the last step within 10 % of it: kept)
        await eventually(lambda: encoder.bitrate <= MIN_BITRATE * 1.1, timeout=20,
                         what="the lossy device's rate down to the floor")
        assert encoder.codecs_made > 1
        count = len(good_device.frames), len(bad_device.frames)
        await eventually(lambda: len(good_device.frames) >= count[0] + 5
                         and len(bad_device.frames) >= count[1] + 5, what="both still decode")
        assert good_device.frames[-1].width == 640
        bad.stop_video()
        await eventually(lambda: encoder.bitrate == ceiling, timeout=10,
                         what="the ceiling again without the lossy device")
        count = len(good_device.frames), 0
        await eventually(lambda: len(good_device.frames) >= count[0] + 5, what="still decodes")
    finally:
        await close_all(ends, clients, hub, camera)


def test_a_devices_rate_falls_by_half_its_loss_and_climbs_back_without_loss():
    rate = LossRate(800_000)
    assert rate.update(0, 0) == 800_000  # the first report: nothing to compare with yet
    assert rate.update(30, 70) == 680_000  # 30 % lost: x (1 - 0.15)
    assert rate.update(30, 70) == 680_000  # the same report again: nothing new
    assert rate.update(35, 165) == 680_000  # 5 % lost: held
    assert rate.update(35, 265) == 714_000  # none lost: + 5 %
    for lost in range(1, 30):  # 100 % lost, report after report: the floor
        rate.update(35 + 100 * lost, 265)
    assert rate.rate == MIN_BITRATE
    for received in range(1, 60):
        rate.update(35 + 100 * 29, 265 + 100 * received)
    assert rate.rate == 800_000  # and never above the ceiling
