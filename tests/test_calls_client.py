"""An aiortc resident device for the call tests: pairs over HTTPS, signs in, answers offers.

It trusts only the station's CA, whose SHA-256 fingerprint the pairing link carries (as a
native app pins it), and speaks the signalling protocol of docs/calls.md. No tests here:
helpers only.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
import pytest
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from intercom.calls.tracks import SourceTrack
from intercom.config import Settings, simulated_settings
from intercom.media.audio import ToneSource, rms_level
from intercom.media.encodeonce import EncodeOnceCamera
from intercom.media.synthetic import SyntheticCamera
from intercom.security import command
from intercom.station import Station

RELAY_PIN = 27


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class DeviceKey:
    """A device key pair, Ed25519 or P-256, as WebCrypto would hold it."""

    def __init__(self, kind: str = "Ed25519") -> None:
        self.kind = kind
        self.private: Any = (
            Ed25519PrivateKey.generate()
            if kind == "Ed25519"
            else ec.generate_private_key(ec.SECP256R1())
        )

    def jwk(self) -> dict[str, str]:
        public = self.private.public_key()
        if self.kind == "Ed25519":
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
        numbers = public.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }

    def sign(self, data: bytes) -> bytes:
        if self.kind == "Ed25519":
            return bytes(self.private.sign(data))
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def pem(self) -> bytes:
        return bytes(
            self.private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def pinned(station: Station) -> ssl.SSLContext:
    """TLS trusting only the station's root, whose SHA-256 the pairing link carries."""
    assert station.calls is not None
    assert station.calls.cert is not None
    root = station.calls.cert.ca_der
    assert root is not None
    assert hashlib.sha256(root).hexdigest() == station.calls.fingerprint
    return ssl.create_default_context(cadata=root)  # the name is checked too: 127.0.0.1


async def pair(station: Station, flat: str = "1", kind: str = "Ed25519") -> Device:
    """Pair a new device through /api/pair with a fresh code."""
    assert station.calls is not None
    code = (await station.calls.pair_request({"flat": flat}))["code"]
    key = DeviceKey(kind)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            station.calls.url + "api/pair",
            json={"code": code, "jwk": key.jwk(), "name": "test phone"},
            ssl=pinned(station),
        ) as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
    return Device(station, key, body["principal"], body["totp_uri"])


class Device:
    """A resident's device: signalling socket, peer connection, what it received."""

    def __init__(self, station: Station, key: DeviceKey, principal: str, totp_uri: str) -> None:
        self.station = station
        self.key = key
        self.principal = principal
        self.totp_uri = totp_uri
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pc: RTCPeerConnection | None = None
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.seen: list[dict[str, Any]] = []
        self.video_frames: list[float] = []
        self.audio_frames = 0
        self.audible_frames = 0
        self.channel: Any = None
        self.channel_messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.close_code: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._mic: MediaStreamTrack | None = None
        self._audio_sender: Any = None
        self.number = 0  # the station's number of the current connection
        self.answers = True  # answer the station's offers (the renegotiations too)
        self.ready: dict[str, Any] = {}  # the station's ready message
        self.patience = 1.0  # times the sign-in's waits (a station under emulation: more)

    async def open_socket(self) -> aiohttp.ClientWebSocketResponse:
        assert self.station.calls is not None
        if self.http is not None:
            await self.http.close()
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(
            self.station.calls.url + "ws", ssl=pinned(self.station)
        )
        return self.ws

    async def connect(self, answer: bool = True) -> None:
        """Sign in and set up the peer connection the station offers."""
        ws = await self.open_socket()
        challenge = await ws.receive_json(timeout=5 * self.patience)
        assert challenge["type"] == "challenge"
        data = f"intercom-auth:{challenge['station']}:{challenge['nonce']}".encode()
        await ws.send_json(
            {"type": "auth", "principal": self.principal, "signature": b64url(self.key.sign(data))}
        )
        reply = await ws.receive(timeout=5 * self.patience)
        assert reply.type == aiohttp.WSMsgType.TEXT, f"refused: {reply.type} {ws.close_code}"
        ready = json.loads(reply.data)
        assert ready["type"] == "ready", ready
        self.ready = ready
        offer = await ws.receive_json(timeout=10 * self.patience)
        assert offer["type"] == "offer"
        self.answers = answer
        self._tasks.append(asyncio.create_task(self._read()))
        if answer:
            await self.answer_offer(offer["sdp"], offer["peer"])

    async def answer_offer(self, sdp: str, number: int) -> None:
        """Answer an offer as docs/calls.md says: a new number, a new connection."""
        assert self.ws is not None
        if self.pc is None or number != self.number:
            old, self.pc = self.pc, RTCPeerConnection(RTCConfiguration(iceServers=[]))
            if old is not None:  # shielded: aiortc's close must not be cut half-way
                await asyncio.shield(old.close())
            self.number = number
            self.channel = None
            tone = ToneSource(660.0)
            await tone.open()
            self._mic = SourceTrack("audio", tone.next)
            self.pc.on("track", self._on_track)
            self.pc.on("datachannel", self._on_channel)
        pc = self.pc
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        # As docs/calls.md asks: audio sendrecv, but no track (no RTP) until answered.
        audio = next(t for t in pc.getTransceivers() if t.kind == "audio")
        audio.direction = "sendrecv"
        self._audio_sender = audio.sender
        await pc.setLocalDescription(await pc.createAnswer())
        await self.ws.send_json({"type": "answer", "sdp": pc.localDescription.sdp, "peer": number})

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(message.data)
                data["received_at"] = time.time()
                self.seen.append(data)
                if data.get("type") == "call":  # the microphone only while in a call
                    self._talk(data.get("state") == "answered")
                elif data.get("type") == "offer" and self.answers:
                    await self.answer_offer(data["sdp"], data["peer"])
                await self.messages.put(data)
        self.close_code = self.ws.close_code

    def _talk(self, on: bool) -> None:
        if self._audio_sender is not None:
            self._audio_sender.replaceTrack(self._mic if on else None)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._consume(track)))

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        channel.on("message", lambda m: self.channel_messages.put_nowait(json.loads(m)))

    async def _consume(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame: Any = await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.video_frames.append(time.time())
            else:
                self.audio_frames += 1
                if rms_level(frame) > 1e-3:
                    self.audible_frames += 1

    async def expect(self, kind: str, timeout: float = 5, **fields: Any) -> dict[str, Any]:
        """The next message of ``kind`` (others are skipped but kept in ``seen``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no {kind} {fields} within {timeout} s; saw {self.seen}")
            try:
                message = await asyncio.wait_for(self.messages.get(), left)
            except TimeoutError:
                continue
            if message["type"] == kind and all(message.get(k) == v for k, v in fields.items()):
                return message

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_json(message)

    async def wait_connected(self, timeout: float = 10) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self.pc is None or self.pc.connectionState != "connected" or self.channel is None:
            assert asyncio.get_running_loop().time() < deadline, "peer connection not up"
            await asyncio.sleep(0.02)
        while self.channel.readyState != "open":
            assert asyncio.get_running_loop().time() < deadline, "data channel not open"
            await asyncio.sleep(0.02)

    async def wait_renewed(self, after: int, timeout: float = 10) -> None:
        """Wait for the connection the station offers after connection ``after`` (a call
        over for this device: the station replaces its connection by a fresh idle one)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.number <= after:
            assert asyncio.get_running_loop().time() < deadline, "no fresh connection offered"
            await asyncio.sleep(0.02)
        await self.wait_connected(max(0.1, deadline - asyncio.get_running_loop().time()))

    def unlock_token(self, totp_code: str | None = None) -> str:
        code = totp_code or pyotp.parse_uri(self.totp_uri).now()
        assert self.station.settings.hardware.relay.door
        return command.sign(
            command.load_private_key(self.key.pem()),
            kid=self.principal,
            station=self.station.id,
            door=self.station.settings.hardware.relay.door,
            totp=code,
            lifetime=30,
        )

    async def unlock(self, totp_code: str | None = None) -> dict[str, Any]:
        token = self.unlock_token(totp_code)
        self.channel.send(token)
        return await asyncio.wait_for(self.channel_messages.get(), 5)

    async def vanish(self) -> None:
        """Go away without a word: the socket and the connection just stop."""
        for task in self._tasks:
            task.cancel()
        if self.pc is not None:
            await asyncio.shield(self.pc.close())
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()

    async def close(self) -> None:
        await self.vanish()


async def eventually(check: Any, timeout: float = 5.0, what: str = "") -> None:
    """Wait until ``check()`` is true (bounded), for outcomes that take real media time."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, what or "condition not met in time"
        await asyncio.sleep(0.02)


def call_settings(state_dir: Path, flats: tuple[str, ...] = ("1",), **calls: float) -> Settings:
    """A simulated station with a small camera, these flats and call timings."""
    base = simulated_settings(state_dir)
    data = base.model_dump(mode="json")
    data["media"]["camera"].update({"width": 320, "height": 240, "fps": 15})
    pins = [17, 5, 6, 13]
    data["hardware"]["buttons"] = [
        {"name": f"bell{i}", "pin": pins[i], "flat": flat} for i, flat in enumerate(flats)
    ]
    data["calls"].update(calls)
    data["mqtt"] = None
    return Settings.model_validate(data)


@pytest.fixture
async def call_station(tmp_path: Path) -> AsyncIterator[Station]:
    station = Station(call_settings(tmp_path / "state", ring_timeout_s=3))
    await station.start()
    yield station
    await station.stop("test finished")


@pytest.fixture
async def devices() -> AsyncIterator[list[Device]]:
    made: list[Device] = []
    yield made
    for device in made:
        await device.close()


def H264Camera(width: int = 320, height: int = 240, fps: int = 15) -> EncodeOnceCamera:  # noqa: N802
    """Stands in for the Pi's hardware encoder: the package's encode-once camera.

    Frames of the synthetic camera are encoded once (libx264, one encoder for all peers);
    ``request_keyframe`` makes the next packet an IDR, as the V4L2 control does.
    """
    return EncodeOnceCamera(SyntheticCamera(width, height, fps), fps)
