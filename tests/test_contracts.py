"""Contracts with private parts of libraries we rely on: a library change fails here, loudly.

intercom/mqtt/client.py overrides aiomqtt's private ``_on_socket_open`` (no public API
reaches the socket reads), and intercom/mqtt/fairqueue.py stands in for the
``asyncio.Queue`` aiomqtt expects as ``queue_type``. These tests pin what both rely on
against the installed aiomqtt and paho, and run the override over a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import fractions
import inspect
import logging
import re
import socket
import struct
import time
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import aiomqtt
import aiomqtt.client
import paho.mqtt.client as mqtt
import pytest
from packaging.requirements import Requirement
from paho.mqtt.enums import CallbackAPIVersion

from intercom.mqtt.client import READ_BURST, Client
from intercom.mqtt.fairqueue import PER_SIGNER, FairQueue

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pinned(name: str) -> Requirement:
    """The requirement on ``name`` in pyproject.toml."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return next(r for r in map(Requirement, project["dependencies"]) if r.name == name)


def test_installed_aiomqtt_is_in_the_range_pyproject_pins():
    requirement = pinned("aiomqtt")
    assert requirement.specifier.contains(version("aiomqtt")), (requirement, version("aiomqtt"))
    assert aiomqtt.__version__ == version("aiomqtt")
    # The pin must stop before the next major version: that is where private names move.
    assert not requirement.specifier.contains("3.0.0")


def test_the_private_socket_hook_keeps_its_name_and_signature():
    hook = inspect.signature(aiomqtt.Client._on_socket_open)
    assert list(hook.parameters) == ["self", "client", "userdata", "sock"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in hook.parameters.values())
    # aiomqtt hands it to paho as paho's public on_socket_open callback ...
    assert "on_socket_open = self._on_socket_open" in inspect.getsource(aiomqtt.Client)
    # ... and its reader reads through the paho client's public loop_read, which the
    # override replaces on that one client.
    reader = inspect.getsource(aiomqtt.Client._on_socket_open)
    assert "client.loop_read()" in reader
    assert list(inspect.signature(mqtt.Client.loop_read).parameters) == ["self", "max_packets"]
    assert list(inspect.signature(mqtt.Client.socket).parameters) == ["self"]


def test_aiomqtt_uses_only_the_queue_methods_the_fair_queue_has():
    source = inspect.getsource(aiomqtt.client)
    assert "queue_type(maxsize=" in source
    used = set(re.findall(r"\b_queue\.(\w+)", source))
    assert used == {"put_nowait", "get", "qsize"}, used  # a new one: FairQueue must have it
    assert all(callable(getattr(FairQueue, name, None)) for name in used)
    assert inspect.iscoroutinefunction(FairQueue.get)
    assert "queue_type" in inspect.signature(aiomqtt.Client).parameters


def publish_size(topic: str, payload: bytes) -> int:
    """Bytes of an MQTT 3.1.1 QoS 0 PUBLISH packet (remaining length under 128)."""
    remaining = 2 + len(topic.encode()) + len(payload)
    assert remaining < 128
    return 2 + remaining


def wait_until_buffered(sock: Any, size: int, timeout: float = 5) -> None:
    """Block until ``size`` bytes wait in ``sock``, unread (the loop is held meanwhile)."""
    deadline = time.monotonic() + timeout
    while len(sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)) < size:
        if time.monotonic() > deadline:
            raise AssertionError(f"{size} bytes did not arrive within {timeout} s")
        time.sleep(0.005)


async def test_one_wake_up_reads_every_waiting_packet_over_a_real_broker(broker):
    opened: list[mqtt.Client] = []

    class Watched(Client):
        def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
            opened.append(client)
            super()._on_socket_open(client, userdata, sock)

    payloads = [b"%03d" % i for i in range(PER_SIGNER - 1)]  # with the end: one signer's fill
    assert len(payloads) + 1 <= READ_BURST
    queue_type = cast("type[asyncio.Queue[aiomqtt.Message]]", FairQueue)
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2)
    async with Watched("127.0.0.1", broker.port, queue_type=queue_type) as station:
        await station.subscribe("burst/#")
        (paho,) = opened  # the override ran, with paho's client, when the socket opened
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        try:
            # Nothing awaits from here to the first sleep: the station's loop is held
            # while the broker delivers, so every packet waits in its socket at once.
            for payload in payloads:
                publisher.publish("burst/x", payload, qos=0)
            publisher.publish("burst/end", b"", qos=1).wait_for_publish(5)
        finally:
            publisher.disconnect()  # first: its network thread then ends at once
            publisher.loop_stop()
        wait_until_buffered(
            paho.socket(),
            sum(publish_size("burst/x", p) for p in payloads) + publish_size("burst/end", b""),
        )
        await asyncio.sleep(0)  # the loop polls the socket; the reader runs after this task
        await asyncio.sleep(0)  # ... so here it has run exactly once
        assert len(station.messages) == len(payloads) + 1  # aiomqtt alone reads 1
        got = [m.payload for m in [await anext(station.messages) for _ in payloads]]
        assert got == payloads  # through FairQueue, in order (no signer claimed: one round)


# --- aiortc: the video sender's keyframe hook (intercom/calls/peer.py) -----------------
#
# aiortc answers a device's PLI/FIR by calling ``self._send_keyframe()`` on the video
# sender, which only flags aiortc's own encoder. Packets of the camera's encoder (the
# Pi's hardware H.264, encode_once) bypass it, so DevicePeer replaces that method on its
# sender instance with one that also asks the camera for an IDR. aiortc has no public
# way to learn of a keyframe request; these tests pin the private one.


async def station_end(camera: Any) -> tuple[Any, Any, Any]:
    """The station's end of one device's connection (``tests/test_calls_media.py``)."""
    from tests.test_calls_media import station_end as made  # noqa: PLC0415

    return await made(camera)


def test_installed_aiortc_is_in_the_range_pyproject_pins():
    import aiortc  # noqa: PLC0415 - only these tests need it

    requirement = pinned("aiortc")
    assert requirement.specifier.contains(version("aiortc")), (requirement, version("aiortc"))
    assert aiortc.__version__ == version("aiortc")


def test_the_private_keyframe_hook_keeps_its_name_signature_and_caller():
    from aiortc import RTCRtpSender  # noqa: PLC0415

    hook = vars(RTCRtpSender).get("_send_keyframe")
    assert inspect.isfunction(hook), "RTCRtpSender._send_keyframe is gone: see calls/peer.py"
    assert list(inspect.signature(hook).parameters) == ["self"]
    assert "__force_keyframe = True" in inspect.getsource(hook)
    # A PLI or FIR from the device calls it through the instance, so a replacement set
    # on the instance (DevicePeer._forward_keyframe_requests) is the one called ...
    handler = inspect.getsource(RTCRtpSender._handle_rtcp_packet)
    assert "RTCP_PSFB_PLI" in handler
    assert "RTCP_PSFB_FIR" in handler
    assert "self._send_keyframe()" in handler
    # ... and the flag it sets makes aiortc's own encoder (frame cameras) send an IDR,
    # which DevicePeer.start_video relies on at each ring.
    encode = inspect.getsource(RTCRtpSender._next_encoded_frame)
    assert re.search(r"self\.__encoder\.encode,\s*data,\s*force_keyframe", encode)
    assert not hasattr(RTCRtpSender, "__slots__")  # instances take the replacement
    # No public way in yet; when one appears, peer.py should use it instead.
    public = [n for n in dir(RTCRtpSender) if "key" in n.lower() and not n.startswith("_")]
    assert public == [], f"aiortc now has {public}: use it in calls/peer.py, drop the hook"


async def test_a_device_keyframe_request_reaches_the_hook_and_the_camera_encoder():
    from aiortc.rtp import RTCP_PSFB_FIR, RtcpPsfbPacket  # noqa: PLC0415

    from tests.test_calls_client import H264Camera, eventually  # noqa: PLC0415
    from tests.test_calls_media import connect  # noqa: PLC0415

    camera = H264Camera()
    hub, peer, device = await station_end(camera)
    sender = peer.video_sender
    assert "_send_keyframe" in vars(sender), "the hook is not set on the sender instance"
    forward = sender._send_keyframe
    calls: list[float] = []

    def spy() -> None:
        calls.append(time.monotonic())
        forward()

    sender._send_keyframe = spy  # type: ignore[method-assign]
    client, frames = await connect(peer, device)
    try:
        peer.start_video()  # the ring: the hook once, and with it the camera
        assert len(calls) == 1
        await eventually(lambda: len(frames) > 0, what="video after the ring")
        (receiver,) = [r for r in client.getReceivers() if r.track and r.track.kind == "video"]
        # A picture loss indication, then a full intra request, over real RTCP.
        requested = camera.keyframes_requested
        await receiver._send_rtcp_pli(sender._ssrc)
        await eventually(lambda: len(calls) == 2, what="aiortc called the hook on a PLI")
        await eventually(lambda: camera.keyframes_requested > requested, what="PLI to camera")
        requested = camera.keyframes_requested
        fir = RtcpPsfbPacket(fmt=RTCP_PSFB_FIR, ssrc=receiver._RTCRtpReceiver__rtcp_ssrc,
                             media_ssrc=sender._ssrc)
        await receiver._send_rtcp(fir)
        await eventually(lambda: len(calls) == 3, what="aiortc called the hook on a FIR")
        await eventually(lambda: camera.keyframes_requested > requested, what="FIR to camera")
        # The replacement still called aiortc's own method: its encoder flag is set.
        assert sender._RTCRtpSender__force_keyframe is True
    finally:
        await peer.close()
        await client.close()
        hub.close()
        await camera.close()


async def test_a_peer_closed_while_connecting_is_no_error_but_other_faults_still_are(caplog):
    """aiortc's unawaited connect task fails when a device leaves mid-connect: DEBUG only.

    Found by the SDP fuzzing: an answer accepted, the socket closed, and asyncio logged
    aiortc's ``InvalidStateError("RTCIceTransport is closed")`` as an ERROR traceback.
    """
    from aiortc.exceptions import InvalidStateError  # noqa: PLC0415

    from intercom.calls.peer import quiet_close_races  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    undo = quiet_close_races(loop)
    try:
        caplog.set_level(logging.DEBUG)
        loop.call_exception_handler({"message": "Task exception was never retrieved",
                                     "exception": InvalidStateError("RTCIceTransport is closed")})
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        loop.call_exception_handler({"message": "Task exception was never retrieved",
                                     "exception": RuntimeError("a real fault")})
        assert [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        undo()
    assert loop.get_exception_handler() is None


# --- aiortc: the senders' report hook (intercom/calls/peer.py) -----------------------
#
# aiortc sends an RTCP sender report from every sender every 0.5-1.5 s, even when it
# has sent nothing; DevicePeer wraps ``_send_rtcp`` on its senders' instances to drop
# report-only compounds while a gate is closed and nothing was sent since the last one.


def test_the_private_report_hook_keeps_its_name_signature_and_caller():
    from aiortc import RTCRtpSender  # noqa: PLC0415

    hook = vars(RTCRtpSender).get("_send_rtcp")
    assert inspect.iscoroutinefunction(hook), "RTCRtpSender._send_rtcp is gone: see peer.py"
    assert list(inspect.signature(hook).parameters) == ["self", "packets"]
    loop = inspect.getsource(RTCRtpSender._run_rtcp)
    # the periodic report is a list of RtcpSrPacket (+ RtcpSdesPacket) sent through self
    assert "RtcpSrPacket(" in loop
    assert "RtcpSdesPacket(" in loop
    assert "await self._send_rtcp(packets)" in loop
    assert "await self._send_rtcp([packet])" in loop  # the BYE, which the hook lets through
    # no public way to change the reports' interval or stop them yet
    public = [n for n in dir(RTCRtpSender) if "rtcp" in n.lower() and not n.startswith("_")]
    assert public == [], f"aiortc now has {public}: use it in calls/peer.py, drop the hook"


async def test_an_idle_sender_sends_no_reports_and_a_sending_one_does():
    from intercom.media.synthetic import SyntheticCamera  # noqa: PLC0415
    from tests.test_calls_client import eventually  # noqa: PLC0415
    from tests.test_calls_media import connect  # noqa: PLC0415

    camera = SyntheticCamera(160, 120, 15)
    hub, peer, device = await station_end(camera)
    assert "_send_rtcp" in vars(peer.video_sender), "the hook is not set on the sender"
    client, frames = await connect(peer, device)
    window = 3.2  # aiortc reports every 0.5-1.5 s: at least two would arrive in this time
    try:
        # The ring renegotiates the video on: frames flow, and reports with them.
        peer.start_video()
        await eventually(lambda: len(frames) > 0, what="video after the ring")
        (receiver,) = [r for r in client.getReceivers() if r.track and r.track.kind == "video"]

        async def last_report() -> Any:
            stats = await receiver.getStats()
            reports = [s for s in stats.values() if s.type == "remote-outbound-rtp"]
            return reports[0].timestamp if reports else None

        ringing = await last_report()
        await asyncio.sleep(window)
        during = await last_report()
        assert during is not None, "no report while sending"
        assert during != ringing, "no new report while sending"

        peer.stop_video()  # one more report after the last frame, then none
        await asyncio.sleep(2.0)
        after = await last_report()
        await asyncio.sleep(window)
        assert await last_report() == after, "reports went on after the gate closed"

        peer.start_video()  # the next ring on the same connection: reports again
        count = len(frames)
        await eventually(lambda: len(frames) > count, what="video after the second ring")
        await asyncio.sleep(window)
        assert await last_report() != after, "no report after the gate opened again"
    finally:
        await peer.close()
        await client.close()
        hub.close()
        await camera.close()


# --- aiortc: the playout-delay hook (intercom/calls/peer.py) -------------------------
#
# aiortc neither offers nor writes the RTP playout-delay extension; DevicePeer offers it
# and, when the device takes it, wraps ``_send_rtp`` on its transport instance to add a
# zero playout-delay element to each video packet between serialising and encrypting.


def test_the_private_send_hook_keeps_its_name_signature_and_callers():
    from aiortc import RTCDtlsTransport, RTCRtpSender  # noqa: PLC0415
    from aiortc.rtp import HeaderExtensionsMap  # noqa: PLC0415

    hook = vars(RTCDtlsTransport).get("_send_rtp")
    assert inspect.iscoroutinefunction(hook), "RTCDtlsTransport._send_rtp is gone: see peer.py"
    assert list(inspect.signature(hook).parameters) == ["self", "data"]
    body = inspect.getsource(hook)
    assert "protect(data)" in body  # what it is given is the plain serialised packet
    # every RTP packet of a sender goes through the transport instance
    assert "await self.transport._send_rtp(packet_bytes)" in inspect.getsource(
        RTCRtpSender._run_rtp
    )
    assert not hasattr(RTCDtlsTransport, "__slots__")
    # aiortc still knows nothing of the extension (else: use it, drop the hook)
    assert "playout" not in inspect.getsource(HeaderExtensionsMap).lower()
    assert "playout" not in inspect.getsource(RTCRtpSender).lower()


def rtp(ssrc: int, extensions: list[tuple[int, bytes]] | None = None) -> bytes:
    """A plain RTP packet (payload type 97) of ``ssrc``, with these one-byte extensions."""
    from aiortc.rtp import pack_header_extensions  # noqa: PLC0415

    first = 0x90 if extensions else 0x80
    header = bytes((first, 0x80 | 97)) + struct.pack("!HII", 7, 9000, ssrc)
    if extensions:
        profile, value = pack_header_extensions(extensions)
        header += struct.pack("!HH", profile, len(value) // 4) + value
    return header + b"\x10\x20\x30" * 20


def extension_elements(data: bytes) -> list[tuple[int, bytes]]:
    """The (id, value) elements of an RTP packet's header extension block, by aiortc."""
    from aiortc.rtp import unpack_header_extensions  # noqa: PLC0415

    if not data[0] & 0x10:
        return []
    offset = 12 + 4 * (data[0] & 0x0F)
    profile, words = struct.unpack_from("!HH", data, offset)
    value = data[offset + 4 : offset + 4 + 4 * words]
    return list(unpack_header_extensions(profile, value))


@pytest.mark.parametrize("extensions", [None, [(1, b"0")], [(1, b"0"), (3, b"\x01\x02\x03")]])
def test_the_playout_delay_element_is_added_and_the_packet_stays_whole(extensions):
    from aiortc.rtp import HeaderExtensionsMap, RtpPacket  # noqa: PLC0415

    from intercom.calls.peer import add_playout_delay  # noqa: PLC0415

    data = rtp(0x01020304, extensions)
    out = add_playout_delay(data, bytes.fromhex("01020304"), 5)
    parsed, before = RtpPacket.parse(out, HeaderExtensionsMap()), RtpPacket.parse(data)
    assert (parsed.payload, parsed.sequence_number, parsed.timestamp, parsed.marker) == (
        before.payload,
        before.sequence_number,
        before.timestamp,
        before.marker,
    )
    elements = extension_elements(out)
    assert (5, b"\x00\x00\x00") in elements  # min 0, max 0
    assert [e for e in elements if e[0] != 5] == list(extensions or [])
    # min 100 ms, max 400 ms: 10 and 40 in 10 ms units, 12 bits each
    assert (5, b"\x00\xa0\x28") in extension_elements(
        add_playout_delay(data, bytes.fromhex("01020304"), 5, 100, 400))


def test_other_streams_rtcp_and_scraps_pass_unchanged():
    from intercom.calls.peer import add_playout_delay  # noqa: PLC0415

    key = bytes.fromhex("01020304")
    other = rtp(0x0A0B0C0D, [(1, b"0")])
    assert add_playout_delay(other, key, 5) == other
    report = bytes.fromhex("80c80006") + key + bytes(20)  # an RTCP sender report
    assert add_playout_delay(report, key, 5) == report
    for scrap in (b"", b"\x80", rtp(0x01020304)[:10]):
        assert add_playout_delay(scrap, key, 5) == scrap


@pytest.mark.parametrize(("away", "element"), [(False, b"\x00\x00\x00"),
                                               (True, b"\x01\x40\x32")])
async def test_a_device_that_takes_playout_delay_gets_it_on_every_video_packet(away, element):
    """At home min = max = 0; away (not on the station's networks) min 200, max 500 ms."""
    from intercom.calls.peer import PLAYOUT_DELAY_URI, video_ssrc  # noqa: PLC0415
    from intercom.media.synthetic import SyntheticCamera  # noqa: PLC0415
    from tests.test_calls_client import eventually  # noqa: PLC0415
    from tests.test_calls_media import connect, local_peer  # noqa: PLC0415

    hub, peer, device = await station_end(SyntheticCamera(160, 120, 15))
    if away:  # the same device, seen by a station none of whose networks it is on
        await peer.close()
        peer, device = local_peer(hub, networks=[])
    # aiortc's own answer drops the extension; a browser's keeps it (id 12 here)
    device.edit_answer = lambda sdp: sdp.replace(
        "a=mid:0\r\n", f"a=mid:0\r\na=extmap:12 {PLAYOUT_DELAY_URI}\r\n", 1
    )
    client, frames = await connect(peer, device)
    (offer,) = device.offers
    assert PLAYOUT_DELAY_URI in offer.split("m=audio")[0]
    uris: dict[str, set[str]] = {}
    for ext_id, uri in re.findall(r"^a=extmap:(\d+) (\S+)", offer, re.MULTILINE):
        uris.setdefault(ext_id, set()).add(uri)
    assert all(len(u) == 1 for u in uris.values()), f"bundled: one URI an id: {uris}"
    transport = peer.video_sender.transport
    seen: list[bytes] = []
    srtp = transport._tx_srtp  # made once DTLS is up

    class Spy:  # what goes into SRTP: the packets as the hook left them
        def protect(self, data: bytes) -> bytes:
            seen.append(data)
            return bytes(srtp.protect(data))

        def protect_rtcp(self, data: bytes) -> bytes:
            return bytes(srtp.protect_rtcp(data))

    transport._tx_srtp = Spy()
    try:
        peer.start_video()  # the ring renegotiates: the device's answer takes the extension
        await eventually(lambda: len(frames) >= 3, 10, "the device decodes the video")
        assert "_send_rtp" in vars(transport), "the hook is not set on the transport"
        ssrc = video_ssrc(peer.pc.localDescription.sdp)
        video = [d for d in seen if int.from_bytes(d[8:12], "big") == ssrc]
        assert video, f"no video packet went out ({len(seen)} packets, {ssrc})"
        for data in video:
            assert (12, element) in extension_elements(data)
    finally:
        await peer.close()
        await client.close()
        hub.close()


def test_aiortc_packetises_encoded_vp8_packets_through_its_public_pack():
    """The shared VP8 encoder (intercom/media/sharedvp8.py) hands aiortc's video senders
    ``av.Packet``s; aiortc sends anything that is not a frame through the negotiated
    codec's public ``Encoder.pack``, which for VP8 only adds the payload descriptor."""
    import av  # noqa: PLC0415
    from aiortc import RTCRtpSender  # noqa: PLC0415
    from aiortc.codecs.base import Encoder  # noqa: PLC0415
    from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload  # noqa: PLC0415

    assert "pack" in vars(Encoder)
    encode = inspect.getsource(RTCRtpSender._next_encoded_frame)
    assert "isinstance(data, Frame)" in encode
    assert "self.__encoder.pack(data)" in encode
    packet = av.Packet(bytes(range(256)) * 8)
    packet.pts, packet.time_base = 9_000, fractions.Fraction(1, 90_000)
    payloads, timestamp = Vp8Encoder().pack(packet)
    assert timestamp == 9_000
    assert b"".join(vp8_depayload(p) for p in payloads) == bytes(packet)
