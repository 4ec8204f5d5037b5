"""The calls component: web server, pairing, signalling and the ring group, on the bus."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from intercom.calls.pairing import Pairing
from intercom.calls.peer import DevicePeer, quiet_close_races
from intercom.calls.ringgroup import RingGroup
from intercom.calls.server import WebServer
from intercom.calls.signalling import CheckCode, Session, Signalling
from intercom.calls.tls import StationCert
from intercom.calls.tracks import MediaHub
from intercom.calls.turn import IceProvider
from intercom.config import Settings
from intercom.errors import CommandRefusedError
from intercom.events import EventBus
from intercom.media import AudioSink, AudioSource, CameraSource
from intercom.media.audio import LevelSink
from intercom.netaddr import Network, local_networks
from intercom.security.registry import Registry
from intercom.security.verifier import Context, Decision

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 2.0  # expiries are noticed this often; revocations at once

Submit = Callable[[str, Context], Awaitable[Decision]]
Register = Callable[[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]], None]


@dataclass(frozen=True)
class Media:
    """The door's camera, microphone and speaker, opened by the station."""

    camera: CameraSource
    microphone: AudioSource
    speaker: AudioSink


class Calls:
    """Rings residents' devices on a press and carries the calls; serves the web client."""

    name = "calls"

    def __init__(
        self,
        settings: Settings,
        media: Media,
        bus: EventBus,
        registry: Registry,
        submit: Submit,
        register: Register,
        check_code: CheckCode | None = None,
    ) -> None:
        self.station_id = settings.station.id
        self.state_dir = settings.station.state_dir  # for the TLS certificate files
        self.web_config = settings.web
        self.door = settings.hardware.relay.door
        self.flats = frozenset(b.flat for b in settings.hardware.buttons)
        self._devices = media
        self._shared_vp8 = not settings.media.camera.vp8_per_device
        self._fps = settings.media.camera.fps
        self._bus = bus
        self._registry = registry
        self._submit = submit
        self._register = register
        self._check_code = check_code
        self.pairing = Pairing(self.state_dir, self.station_id, self.flats, bus, registry)
        self.ring_group = RingGroup(bus, settings.calls, registry.is_active)
        self.ring_group.set_labels(settings.hardware.buttons)
        self.cert: StationCert | None = None
        self.server: WebServer | None = None
        self.media: MediaHub | None = None
        self.signalling: Signalling | None = None
        self.ice: IceProvider | None = None
        self._networks: list[Network] = []  # the station's own (a device on one is at home)
        self._unsubscribe: Callable[[], None] | None = None
        self._unwatch: Callable[[], None] | None = None
        self._unquiet: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._cert_task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The URL residents open (empty until started)."""
        return self.server.url if self.server else ""

    @property
    def trust_url(self) -> str:
        """The page residents install the station's CA from (none with the owner's certificate)."""
        if not self.url or self.cert is None or self.cert.owner:
            return ""
        return f"{self.url}trust.html"

    @property
    def state(self) -> str:
        """``idle``, ``ringing`` or ``in_call``."""
        return self.ring_group.state

    @property
    def fingerprint(self) -> str:
        """What pairing links carry: SHA-256 of the station's CA (or the owner's certificate)."""
        return self.cert.fingerprint if self.cert else ""

    async def start(self) -> None:
        """Load or make the certificate, open pairing, start the media, listen."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        devices = self._devices
        self._unquiet = quiet_close_races(asyncio.get_running_loop())
        self.ice = await asyncio.to_thread(IceProvider.from_config, self.web_config)
        self._networks = await asyncio.to_thread(local_networks)
        self.cert = StationCert(self.state_dir, self.station_id, self.web_config)
        await asyncio.to_thread(self.cert.load)
        self.pairing.open()
        self.media = MediaHub(devices.camera, devices.microphone, devices.speaker,
                              shared_vp8=self._shared_vp8, fps=self._fps)
        self.signalling = Signalling(
            self.station_id,
            self.door,
            self.flats,
            self._registry.get,
            self.ring_group,
            self._make_peer,
            self.ice,
            self._check_code,
        )
        info = {"station": self.station_id, "door": self.door}
        self.server = WebServer(
            self.cert,
            self.pairing,
            info,
            self.web_config.host,
            self.web_config.port,
            self.web_config.public_url,
            trusted_proxies=self.web_config.trusted_proxies,
        )
        self.server.ws_handler = self.signalling.handle
        await self.server.start()
        self._unsubscribe = self._bus.on(self.ring_group.on_event)
        self._unwatch = self._registry.watch(self._principal_changed)
        self._register("pair", self.pair_request)
        self._register("hangup", self.hangup_request)
        self._task = asyncio.create_task(self._housekeeping(), name="calls-housekeeping")
        self._cert_task = asyncio.create_task(self.cert.keep(), name="calls-certificate")

    async def stop(self) -> None:
        """End the call, close every device, stop listening and the media."""
        for task in (self._task, self._cert_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        self.ring_group.close()
        if self.signalling is not None:
            await self.signalling.close()
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.media is not None:
            self.media.close()
        self.pairing.close()
        if self._unquiet is not None:
            self._unquiet()
            self._unquiet = None

    def status(self) -> dict[str, Any]:
        """What ``intercom status`` shows (no principal ids)."""
        sessions = self.signalling.sessions if self.signalling else {}
        info: dict[str, Any] = {
            "calls": {
                "url": self.url,
                "fingerprint": self.fingerprint,
                "state": self.state,
                "devices_online": len(sessions),
                "calls": self.ring_group.calls,
                "last_call": self.last_call_timing(),
            }
        }
        speaker = self._devices.speaker
        if isinstance(speaker, LevelSink):  # the simulated speaker: what the door heard
            info["speaker"] = {"frames": speaker.frames, "audible_frames": speaker.audible_frames}
        return info

    def last_call_timing(self) -> dict[str, Any] | None:
        """Press, ring sent and first frame released, for benchmarks (unix times).

        The first frame is released to the first and to the last of the rung devices.
        """
        call = self.ring_group.last_call
        if call is None:
            return None
        firsts = [t for d in call.rung if isinstance(d, Session) and (t := first_frame(d))]
        answerer = call.answerer
        heard = first_audio(answerer) if isinstance(answerer, Session) else None
        return {
            "call": call.id,
            "state": call.state.value,
            "devices": len(call.rung),
            "pressed_at": call.pressed_at,
            "ring_sent_at": call.ring_sent_at,
            "first_frame_at": min(firsts) if firsts else None,
            "last_first_frame_at": max(firsts) if firsts else None,  # the last device's
            "answered_at": call.answered_at,
            "first_audio_at": heard,
        }

    # --- parts handed to the others -------------------------------------------------------

    def _principal_changed(self, _pid: str) -> None:
        """A principal was revoked, erased or changed: drop every device no longer active."""
        if self.signalling is not None:
            self.signalling.revoke_check()

    def _make_peer(self, session: Session, send_offer: Callable[[str], None]) -> DevicePeer:
        if self.media is None:
            raise RuntimeError("calls: a peer connection before the media started")
        if self.ice is None:
            raise RuntimeError("calls: a peer connection before the ICE servers are known")
        servers = self.ice.station_servers(self.station_id)

        async def unlock(token: str) -> dict[str, Any]:
            return await self._unlock(session, token)

        def lost() -> None:
            if self.signalling is not None:
                self.signalling.lost(session, peer)

        peer = DevicePeer(self.media, servers, unlock, lost, send_offer,
                          relay_only=self.ice.policy == "relay", networks=self._networks)
        return peer

    async def _unlock(self, session: Session, token: str) -> dict[str, Any]:
        """An unlock command from a device's data channel, judged by the verifier.

        The call tells the verifier who the device is and whether it may unlock now
        (rung or answering); every denial, these included, is the verifier's.
        """
        refusal = "" if self.ring_group.may_unlock(session) else "device not rung or in the call"
        context = Context("call", signer=session.principal, refusal=refusal)
        decision = await self._submit(token, context)
        result = "granted" if decision.granted else "denied"
        return {"type": "unlock-result", "jti": decision.jti, "result": result}

    # --- control socket -------------------------------------------------------------------

    async def pair_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's ``pair`` request: a one-time code and the pairing link."""
        flat = request.get("flat")
        if not isinstance(flat, str):
            raise CommandRefusedError("flat must be a string")
        code, expires_at = self.pairing.new_code(flat)
        link = f"{self.url}#pair={code}&fp={self.fingerprint}"
        return {
            "ok": True,
            "code": code,
            "url": link,
            "station_url": self.url,
            "fingerprint": self.fingerprint,
            "trust_url": self.trust_url,
            "expires_at": expires_at,
        }

    async def hangup_request(self, _request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's ``hangup`` request: end the call from the door side."""
        return {"ok": True, "ended": self.ring_group.hangup_door()}

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            try:
                if self.signalling is not None:
                    self.signalling.revoke_check()  # principals whose time ran out
                    self.signalling.refresh_ice()  # TURN credentials past half their life
            except Exception:
                log.exception("calls: housekeeping failed")


def first_frame(session: Session) -> float | None:
    """When the session's last ring released its first frame (across a renewal)."""
    peer = session.peer
    return (peer.video.first_frame_at if peer else None) or session.first_frame_at


def first_audio(session: Session) -> float | None:
    """When the session's last call first played audible audio at the door."""
    peer = session.peer
    return (peer.first_audio_at if peer else None) or session.first_audio_at
