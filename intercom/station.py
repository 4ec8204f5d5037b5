"""The station: builds every component from the config and runs them on one loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Protocol

from intercom import __version__
from intercom.admin import Admin
from intercom.calls import Calls
from intercom.calls.component import Media
from intercom.calls.whep import Camera, LiveView
from intercom.config import Settings
from intercom.configwriter import ConfigWriter
from intercom.console.wiring import ConsoleWiring
from intercom.control import ControlServer
from intercom.deploy.tlscert import TLS_CERT
from intercom.errors import CommandRefusedError, IntercomError
from intercom.eventlog import EventLog
from intercom.events import (
    CallMissed,
    CallRinging,
    DoorbellPressed,
    Event,
    EventBus,
    StationStarted,
    StationStopping,
)
from intercom.hardware.doorbell import Doorbell
from intercom.hardware.lock import Lock
from intercom.hardware.pins import make_pin_factory
from intercom.hardware.sensors import DoorContact, DoorState, TamperSwitch
from intercom.identity import StationIdentity, create_identity, key_dir
from intercom.media import AudioSink, AudioSource, CameraSource, open_audio, open_camera
from intercom.media.encodeonce import EncodeOnceCamera
from intercom.media.shared import OneReader
from intercom.metrics import MetricsEndpoint
from intercom.monitor import Links, MeteredCamera, Monitor, Probes
from intercom.mqtt.bridge import MqttBridge, mqtt_bridge
from intercom.notify import Notifier
from intercom.privacy.camera import PrivacyCamera, privacy_camera
from intercom.privacy.component import Privacy
from intercom.privacy.redact import shared_redactor
from intercom.privacy.zones import ZoneMasks
from intercom.push.component import Push
from intercom.push.vapid import create_vapid_key
from intercom.security import Registry, Site, Verifier
from intercom.security.secretbox import create_key
from intercom.selftest import Parts, SelfTest
from intercom.simulator import Simulator
from intercom.statedir import CLI_WAIT_S, InstanceLock

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 4.0
BUTTON_LABEL = re.compile(r"hardware\.buttons\[\d+\]\.label")  # applied without a restart
SIM_PRESS_WAIT_S = 1.0  # after the debounce time, how long `sim press` waits for the press


class Component(Protocol):
    """A part of the station with its own life cycle (event log, MQTT bridge, ...)."""

    name: str

    async def start(self) -> None:
        """Start; raise IntercomError to refuse start-up."""

    async def stop(self) -> None:
        """Stop and release what it holds."""

    def status(self) -> dict[str, Any]:
        """What ``intercom status`` shows of it."""


class Station:
    """One door station: hardware, media, control socket and the components on the bus.

    The station builds the parts and hands each one only what it uses (the bus, the
    media, the registry's reads, the verifier's ``submit``); none is given the station.
    Only the verifier holds the lock.
    """

    def __init__(self, settings: Settings, probes: Probes | None = None,
                 config_path: Path | None = None) -> None:
        self.settings = settings
        self.probes = probes
        self.state_dir: Path = settings.station.state_dir
        self.bus = EventBus()
        self.instance = InstanceLock(self.state_dir, "run")
        self.control = ControlServer(self.state_dir)
        self.config_writer = ConfigWriter(config_path, self.bus)  # the file's one writer
        self.started_at = time.time()
        self.components: list[Component] = []
        self.pin_factory: Any = None
        self.lock: Lock | None = None
        self.doorbells: list[Doorbell] = []
        self.contact: DoorContact | None = None
        self.tamper: TamperSwitch | None = None
        self.simulator: Simulator | None = None
        self.identity: StationIdentity | None = None
        self.verifier: Verifier | None = None
        self.registry: Registry | None = None
        self.calls: Calls | None = None
        self.liveview: LiveView | None = None  # redacted live view: /whep, the console
        self.eventlog: EventLog | None = None
        self.camera: CameraSource | None = None
        self.monitor: Monitor | None = None
        self.selftest: SelfTest | None = None
        self.metered: MeteredCamera | None = None
        self.masked: PrivacyCamera | None = None  # the camera's privacy layer, when it has one
        self.microphone: AudioSource | None = None
        self.speaker: AudioSink | None = None
        self._closers: list[Any] = []

    @property
    def id(self) -> str:
        """The station id."""
        return self.settings.station.id

    async def start(self) -> None:
        """Build and start everything; on any failure undo what was done and raise."""
        try:
            await self._start()
        except BaseException:
            await self._teardown()
            raise

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        hw = self.settings.hardware
        identity, principals_key = await self._own_state()
        self.pin_factory = make_pin_factory(hw.pin_factory)
        self._closers.append(self.pin_factory.close)
        # The relay first, so that it is driven off before anything else happens.
        self.lock = Lock(hw.relay, self.pin_factory, self.bus, loop)
        self._closers.append(self.lock.close)
        for button in hw.buttons:
            bell = Doorbell(button, self.pin_factory, self.bus)
            self._closers.append(bell.close)
            self.doorbells.append(bell)
        lock = self.lock
        if hw.door_contact:
            self.contact = DoorContact(
                hw.door_contact,
                hw.relay.door,
                self.pin_factory,
                self.bus,
                lambda: lock.last_unlocked_at,
            )
            self._closers.append(self.contact.close)
        if hw.tamper:
            self.tamper = TamperSwitch(hw.tamper, self.pin_factory, self.bus)
            self._closers.append(self.tamper.close)
        if self.settings.simulated:
            self.simulator = Simulator(self.settings, self.pin_factory)
            self.simulator.prepare()
        media, metered = await self._open_media()
        self.metered = metered  # what every reader of the camera reads through

        for bell in self.doorbells:
            bell.start(loop)
        if self.contact:
            self.contact.start(loop)
        if self.tamper:
            self.tamper.start(loop)

        self.registry = Registry.for_state_dir(self.state_dir, principals_key, self.bus,
                                               create=True)
        await self.registry.open()
        self._closers.append(self.registry.close)
        self.components.extend(self._build_components(identity, self.registry, media))
        monitor = self._build_monitor(metered)
        self.components.append(monitor)
        self.components.append(self._build_selftest(metered, monitor))
        for component in self.components:
            await component.start()
            self._closers.append(component.stop)
        self._serve_metrics()
        self._serve_console()
        if (self.settings.whep.enabled and self.liveview is not None
                and self.calls is not None and self.calls.server is not None):
            self.calls.server.whep_handler = self.liveview.handle

        self.control.register("status", self._status_request)
        self.control.register("sim", self._sim_request)
        self.control.register("config-set", self.config_writer.control_request)
        self.control.register("config-get", self.config_writer.get_request)
        await self.control.start()
        self._closers.append(self.control.stop)
        self.started_at = time.time()
        self.bus.publish(
            StationStarted(station=self.id, version=__version__, simulated=self.settings.simulated)
        )

    async def _open_media(self) -> tuple[Media, MeteredCamera]:
        """Open the camera and audio; every reader gets the camera through the meter."""
        # Zones are masked at the source: every consumer of station.camera gets them.
        camera = privacy_camera(open_camera(self.settings.media.camera), self.settings.privacy,
                                live=True)  # zones drawn later apply at once
        self.masked = camera if isinstance(camera, PrivacyCamera) else None
        if self.settings.media.camera.encode_once:  # after the mask: the encoder sees it
            camera = EncodeOnceCamera(camera, self.settings.media.camera.fps)
        self.camera = camera
        await camera.open()
        self._closers.append(camera.close)
        microphone, self.speaker = open_audio(self.settings.media.audio)
        # One read at a time: the calls, the self-test and the console's meter share frames.
        self.microphone = OneReader(microphone)
        await self.microphone.open()
        self._closers.append(self.microphone.close)
        await self.speaker.open()
        self._closers.append(self.speaker.close)
        # Frames counted for the monitor (read-only figures; the camera stays as it is).
        metered = MeteredCamera(camera)
        return Media(metered, self.microphone, self.speaker), metered

    async def _own_state(self) -> tuple[StationIdentity, bytes]:
        """Take the instance lock, then load or make the station's keys (only here)."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Before anything else is opened: a second station on this state dir stops here.
        await asyncio.to_thread(self.instance.acquire, CLI_WAIT_S)
        self._closers.append(self.instance.release)
        self.identity = create_identity(self.state_dir)  # keys: made here or by first boot
        create_vapid_key(self.state_dir)
        return self.identity, create_key(self.state_dir)

    def _build_components(
        self, identity: StationIdentity, registry: Registry, media: Media
    ) -> list[Component]:
        """The components that plug into the bus and the control socket."""
        settings, bus, register = self.settings, self.bus, self.control.register
        hw = settings.hardware
        components: list[Component] = []
        self.eventlog = EventLog(self.state_dir, identity, bus, settings.eventlog)
        components.append(self.eventlog)  # first: it records what the others do
        site = Site(self.id, hw.relay.door, frozenset(b.flat for b in hw.buttons))
        self.verifier = Verifier(registry, site, bus, self.lock)  # the lock's only holder
        register("unlock", self.verifier.control_request)
        components.append(self.verifier)
        for name, handler in Admin(registry, bus, self.eventlog).handlers().items():
            register(name, handler)
        self.calls = Calls(settings, media, bus, registry, self.verifier.submit, register,
                           self.verifier.check_code)
        components.append(self.calls)
        components.append(Push(settings, registry, self.calls))  # after calls: plugs into it
        # After calls: reads its camera hub and ICE servers. The installer console's live
        # picture is a session of it; /whep itself only with [whep] enabled.
        self.liveview = self._build_liveview(registry, self.verifier, self.calls)
        components.append(self.liveview)
        privacy = Privacy(settings, bus, media.camera, self.eventlog, register)
        components.append(privacy)
        if self.masked is not None:  # zones from the config writer apply at once
            masked = self.masked

            def set_zones(new: Settings) -> None:
                masked.set_zones(new.privacy.zones)
                privacy.set_zones(new.privacy.zones)

            self.config_writer.on_change("privacy.zones", set_zones)
        ring_group = self.calls.ring_group
        self.config_writer.on_change(  # what residents see when a button rings: at once
            BUTTON_LABEL, lambda new: ring_group.set_labels(new.hardware.buttons))
        if settings.mqtt is not None:  # last: it reads the event log, uses the verifier
            lock, contact = self.lock, self.contact

            def initial_state() -> dict[str, str]:
                door = contact.state.value if contact is not None else "unknown"
                return {"lock": lock.state.value if lock else "locked", "door": door}

            bridge = mqtt_bridge(settings, bus, self.eventlog, self.verifier.submit,
                                 initial_state, known=lambda kid: registry.get(kid) is not None)
            if settings.mqtt.ring_image:
                privacy.show_ring_images(bridge.note_ring_image)
            components.append(bridge)
        return components

    def _build_liveview(self, registry: Registry, verifier: Verifier, calls: Calls) -> LiveView:
        """The managers' redacted live view: a gate on the calls' camera, the verifier."""
        masked, fixed = self.masked, ZoneMasks(self.settings.privacy.zones)

        def gate() -> Any:
            if calls.media is None:
                raise RuntimeError("whep: a viewer before the calls' media started")
            track = calls.media.camera_track()  # the camera itself, not the devices' VP8
            track.open()
            if calls.media.camera.encoded:
                calls.media.camera.request_keyframe()
            return track

        def signer_refusal(pid: str) -> str | None:
            principal = registry.get(pid)
            if principal is None:
                return "principal erased"
            return principal.inactive_reason(time.time())

        def ice_servers() -> list[Any]:
            return calls.ice.station_servers(self.id) if calls.ice is not None else []

        def keyframe() -> None:
            if calls.media is not None and calls.media.camera.encoded:
                calls.media.camera.request_keyframe()

        camera = Camera(gate=gate, masks=lambda: masked.masks if masked is not None else fixed,
                        redactor=shared_redactor, keyframe=keyframe)
        return LiveView(self.settings.whep, camera, verifier.check_bearer, signer_refusal,
                        registry.watch, self.bus, ice_servers,
                        relay_only=self.settings.web.ice_policy == "relay")

    def _build_monitor(self, camera: MeteredCamera) -> Monitor:
        """The monitor, last: it reads the other components' states."""
        settings = self.settings
        bridge = next((c for c in self.components if isinstance(c, MqttBridge)), None)
        calls, eventlog = self.calls, self.eventlog

        def checkpoint_at() -> float | None:
            latest = eventlog.latest_checkpoint() if eventlog is not None else None
            return float(latest["signed_at"]) if latest else None

        links = Links(
            mqtt=lambda: bridge.link.state.value if bridge is not None else None,
            web=lambda: "listening" if calls is not None and calls.url else "down",
            checkpoint_at=checkpoint_at,
        )
        certificates = [settings.web.tls_cert_file or key_dir(self.state_dir) / TLS_CERT]
        if settings.mqtt is not None and settings.mqtt.client_cert is not None:
            certificates.append(settings.mqtt.client_cert)
        self.monitor = Monitor(settings.monitor, self.bus, self.state_dir, camera, links,
                               tuple(certificates), self.probes)
        if bridge is not None:
            self.monitor.listeners.append(bridge.note_health)
        return self.monitor

    def _serve_metrics(self) -> None:
        """Prometheus text at /metrics on the calls' HTTPS server, with [monitor] metrics."""
        server = self.calls.server if self.calls is not None else None
        monitor, verifier = self.monitor, self.verifier
        if not self.settings.monitor.metrics or server is None or monitor is None:
            return
        if verifier is None:
            return
        endpoint = MetricsEndpoint(lambda: monitor.status()["health"], verifier.check_bearer)
        server.metrics_handler = endpoint.handle

    def _build_selftest(self, camera: MeteredCamera, monitor: Monitor) -> SelfTest:
        """The self-test, after the monitor whose checks it reads; it runs once started."""
        calls, contact, tamper, lock, eventlog = (
            self.calls, self.contact, self.tamper, self.lock, self.eventlog)
        parts = Parts(
            camera=camera, fps=self.settings.media.camera.fps, microphone=self.microphone,
            door_contact=contact.describe if contact is not None else None,
            tamper=tamper.describe if tamper is not None else None,
            relay=lock.readback if lock is not None else None,
            eventlog=eventlog.verify_tail if eventlog is not None else None,
            busy=lambda: calls is not None and calls.state != "idle",
        )
        self.selftest = SelfTest(parts, monitor, self.bus)
        self.control.register("selftest", self.selftest.control_request)
        bridge = next((c for c in self.components if isinstance(c, MqttBridge)), None)
        if bridge is not None:
            self.selftest.listeners.append(bridge.note_selftest)
        return self.selftest

    def _serve_console(self) -> None:
        """The installer console's API on the calls' server, and installer pairing codes."""
        calls, verifier, registry = self.calls, self.verifier, self.registry
        if calls is None or calls.server is None or verifier is None or registry is None:
            return
        if self.selftest is None or self.lock is None:
            return
        lock, contact, monitor = self.lock, self.contact, self.monitor
        wiring = ConsoleWiring(
            station=self.id, settings=self.settings, bus=self.bus, calls=calls,
            verifier=verifier, registry=registry, selftest=self.selftest,
            writer=self.config_writer, camera=self.metered, microphone=self.microphone,
            speaker=self.speaker,
            lock_state=lambda: lock.state.value,
            door_state=lambda: contact.state.value if contact is not None else None,
            health=lambda: monitor.metrics if monitor is not None else {},
            liveview=self.liveview,
        )
        calls.server.console_handler = wiring.console().handle
        self.control.register("pair-installer", wiring.pair_installer)

    async def stop(self, reason: str = "stop requested") -> None:
        """Stop everything, relay de-energised first."""
        if self.lock is not None:
            self.lock.release("station stopping")
        self.bus.publish(StationStopping(reason=reason))
        await asyncio.sleep(0)  # let subscribers see the last events
        await self._teardown()

    async def _teardown(self) -> None:
        if self.lock is not None:
            self.lock.release("station stopping")
        while self._closers:
            closer = self._closers.pop()
            try:
                result = closer()
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, STOP_TIMEOUT_S / 2)
            except Exception:
                log.exception("error while stopping %r", closer)

    def status(self) -> dict[str, Any]:
        """Id, version, uptime, states and where the station listens."""
        door = self.contact.state.value if self.contact else DoorState.UNKNOWN.value
        # What MQTT would send of each event (events.public_details): no denial reasons,
        # no log-only or personal field but principal ids, and an id erased since its
        # event reads None, as the event log gives it.
        recent: list[dict[str, Any]] = []
        for event in self.bus.recent:
            shown = event.public_dict()
            pid = shown.get("principal")
            if pid and (self.registry is None or self.registry.get(str(pid)) is None):
                shown["principal"] = None
            recent.append(shown)
        info: dict[str, Any] = {
            "station": self.id,
            "version": __version__,
            "simulated": self.settings.simulated,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "lock": self.lock.state.value if self.lock else "unknown",
            "door": door,
            "call": self.calls.state if self.calls else "idle",
            "tamper": bool(self.tamper and self.tamper.tripped_at),
            "listening": {"control": str(self.control.path)},
            "recent_events": recent,
        }
        if self.calls is not None and self.calls.url:
            info["listening"]["web"] = self.calls.url
        for component in self.components:
            info.update(component.status())
        return info

    async def _status_request(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "status": self.status()}

    async def _sim_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.simulator is None:
            raise CommandRefusedError("this station is not simulated")
        button = request.get("button")
        if button is not None and not isinstance(button, str):
            raise CommandRefusedError("button must be a string")
        action = str(request.get("action"))
        if action != "press":
            await self.simulator.act(action, button)
            return {"ok": True}
        return {"ok": True, "press": await self._sim_press(self.simulator, button)}

    async def _sim_press(self, simulator: Simulator, button: str | None) -> dict[str, Any]:
        """Press, then say what became of it: the press, the call, how many devices rang."""
        seen: list[Event] = []
        pressed = asyncio.Event()

        def note(event: Event) -> None:
            if isinstance(event, DoorbellPressed | CallRinging | CallMissed):
                seen.append(event)
            if isinstance(event, DoorbellPressed):
                pressed.set()

        unsubscribe = self.bus.on(note)
        try:
            await simulator.act("press", button)
            debounce = max(b.debounce_ms for b in self.settings.hardware.buttons) / 1000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pressed.wait(), debounce + SIM_PRESS_WAIT_S)
            await asyncio.sleep(0)  # the ring group answers a press in the same turn
        finally:
            unsubscribe()
        outcome: dict[str, Any] = {"pressed": pressed.is_set(), "call": None, "devices": 0,
                                   "missed": False,
                                   "ring_timeout_s": self.settings.calls.ring_timeout_s}
        for event in seen:
            if isinstance(event, DoorbellPressed):
                outcome.update(button=event.button, flat=event.flat)
            elif isinstance(event, CallRinging):
                outcome.update(call=event.call, devices=event.devices)
            elif isinstance(event, CallMissed) and event.call == outcome["call"]:
                outcome["missed"] = True
        return outcome


async def run_station(
    settings: Settings, notifier: Notifier | None = None, station: Station | None = None,
    config_path: Path | None = None,
) -> int:
    """Run a station until SIGTERM or SIGINT; the exit code for the process."""
    notifier = notifier or Notifier()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason = "stop requested"

    def on_signal(sig: signal.Signals) -> None:
        nonlocal reason
        reason = f"signal {sig.name}"
        log.info("received %s, stopping", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    station = station or Station(settings, config_path=config_path)
    try:
        await station.start()
    except IntercomError:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        raise
    watchdog = None
    if notifier.watchdog_interval:
        watchdog = asyncio.create_task(
            _watchdog(notifier, notifier.watchdog_interval), name="systemd-watchdog"
        )
    log.info(
        "station %s ready (%s), control socket %s, web client %s",
        station.id,
        "simulated" if settings.simulated else "hardware",
        station.control.path,
        station.calls.url if station.calls else "-",
    )
    notifier.ready(f"station {station.id} ready")
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        if watchdog is not None:
            watchdog.cancel()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(station.stop(reason), STOP_TIMEOUT_S)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("station %s stopped", station.id)
    return 0


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
