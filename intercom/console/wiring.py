"""The console's ports, made from the station's parts (kept out of ``station.py``).

The console itself (``api.Console``) gets only ``ConsolePorts``: callables, never a part.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from intercom.calls import Calls
from intercom.calls.whep import LiveView, ViewRefusedError
from intercom.config import MqttConfig, Settings
from intercom.configwriter import ConfigWriter, refuse_fixed
from intercom.console.api import Console, ConsolePorts
from intercom.console.sheets import Sheet
from intercom.errors import CommandRefusedError, IntercomError
from intercom.events import DoorbellPressed, Event, EventBus
from intercom.media import AudioSink, AudioSource, CameraSource
from intercom.security import Registry, Verifier
from intercom.security.principals import Role
from intercom.selftest import SelfTest

PREVIEW_TIMEOUT_S = 5.0
PREVIEW_QUALITY = 85
LEVEL_FRAMES = 10  # 200 ms of microphone
TONE_FRAMES = 50  # 1 s of test tone
TONE_HZ = 1000.0


@dataclass
class ConsoleWiring:
    """The station's parts the console's ports read, and the ports made of them."""

    station: str
    settings: Settings
    bus: EventBus
    calls: Calls
    verifier: Verifier
    registry: Registry
    selftest: SelfTest
    writer: ConfigWriter
    camera: CameraSource | None
    microphone: AudioSource | None
    speaker: AudioSink | None
    lock_state: Callable[[], str]
    door_state: Callable[[], str | None]
    health: Callable[[], dict[str, Any]]
    liveview: LiveView | None = None  # the redacted live view the console's picture is of
    pressed: dict[str, float] = field(default_factory=dict)  # button name -> last press

    def __post_init__(self) -> None:
        def note(event: Event) -> None:  # on the bus: quick
            if isinstance(event, DoorbellPressed):
                self.pressed[event.button] = event.at

        self.bus.on(note)

    def console(self) -> Console:
        """The console, handed its ports."""
        hw = self.settings.hardware
        return Console(ConsolePorts(
            check_request=self.verifier.check_request, submit=self.verifier.submit,
            change_config=self.change, state=self.state, preview=self.preview,
            selftest=self.run_selftest, end_installer=self.end_installer,
            role_of=self.role_of, sheets=self.sheets, mqtt_test=self.mqtt_test,
            audio_level=self.audio_level, tone=self.tone,
            live=self.live, live_end=self.live_end,
            pulse_s=hw.relay.pulse_s,
            door_contact=hw.door_contact is not None,
        ), self.bus)

    async def live(self, principal: str, offer: str) -> dict[str, Any]:
        """The redacted live picture for the console's principal (a WHEP view session)."""
        if self.liveview is None:
            raise ViewRefusedError(503, "no live view on this station")
        return await self.liveview.console_view(principal, offer)

    async def live_end(self, principal: str, session: str) -> bool:
        """End the principal's own live picture."""
        return self.liveview is not None and await self.liveview.end_console_view(principal,
                                                                                 session)

    async def change(self, changes: dict[str, Any], actor: str) -> dict[str, Any]:
        """A change for the one config writer, with the principal as actor."""
        return await self.writer.control_request({"changes": changes, "actor": actor})

    def file_settings(self) -> Settings:
        """The config file's settings when the station has one, else the running ones."""
        try:
            return self.writer.read()
        except IntercomError:
            return self.settings

    def state(self) -> dict[str, Any]:
        """What the console shows: wiring, zones, door, lock, self-test, clock."""
        settings = self.file_settings()
        hw = settings.hardware
        last = self.selftest.last
        return {
            "station": self.station, "door": hw.relay.door, "lock": self.lock_state(),
            "door_state": self.door_state(),
            "buttons": [b.model_dump(mode="json", include={"name", "pin", "flat", "label"})
                        for b in hw.buttons],
            "relay_pin": hw.relay.pin, "door_contact": hw.door_contact is not None,
            "zones": settings.privacy.zones,
            "redact_all_outputs": settings.privacy.redact_all_outputs,
            "pressed": dict(self.pressed),
            "clock_synchronized": self.health().get("clock_synchronized"),
            "selftest": last.to_dict() if last is not None else None,
            "writable": self.writer.writable(),
            "url": self.calls.url, "public_url": settings.web.public_url,
            "mqtt": None if settings.mqtt is None else settings.mqtt.model_dump(
                mode="json", include={"host", "port", "username", "password_file", "tls",
                                      "ca_file"}),
        }

    async def preview(self) -> dict[str, Any]:
        """One still frame as every output gets it (zones masked), JPEG, and the zones."""
        from intercom.privacy.camera import still_frame  # noqa: PLC0415
        from intercom.privacy.redact import frame_to_jpeg  # noqa: PLC0415

        if self.camera is None:
            raise IntercomError("no camera")
        frame = await asyncio.wait_for(still_frame(self.camera), PREVIEW_TIMEOUT_S)
        jpeg = await asyncio.to_thread(frame_to_jpeg, frame, PREVIEW_QUALITY)
        return {"jpeg": base64.b64encode(jpeg).decode(), "width": frame.width,
                "height": frame.height, "zones": self.file_settings().privacy.zones}

    async def run_selftest(self) -> dict[str, Any]:
        """The self-test, run now."""
        return (await self.selftest.run("request")).to_dict()

    async def end_installer(self, pid: str) -> bool:
        """Revoke the installer ``pid`` (it ends its own access)."""
        return await self.registry.revoke(pid, pid, role=Role.INSTALLER)

    def role_of(self, pid: str) -> str | None:
        """The principal's role, None when unknown."""
        principal = self.registry.get(pid)
        return principal.role.value if principal is not None else None

    async def sheets(self) -> list[Sheet]:
        """A page for each flat the buttons ring, each with a fresh long-lived code."""
        calls = self.calls
        flats = sorted({b.flat for b in self.settings.hardware.buttons})
        return [Sheet(self.station, flat, f"{calls.url}#pair={code}&fp={calls.fingerprint}",
                      calls.fingerprint, expires_at, calls.trust_url)
                for flat, code, expires_at in await calls.pairing.sheet_codes(flats)]

    async def mqtt_test(self, given: dict[str, Any]) -> dict[str, Any]:
        """Connect once with the file's [mqtt] and ``given`` over it; refused keys named."""
        from pydantic import ValidationError  # noqa: PLC0415

        from intercom.mqtt.probe import probe  # noqa: PLC0415

        refused = [refuse_fixed(f"mqtt.{key}") for key in given]
        if problems := [p.to_dict() for p in refused if p is not None]:
            return {"refused": problems}
        current = self.file_settings().mqtt
        base = current.model_dump() if current is not None else {}
        try:
            config = MqttConfig.model_validate({**base, **given})
        except ValidationError as exc:
            return {"refused": [
                {"key": "mqtt." + ".".join(str(part) for part in err["loc"]) if err["loc"]
                 else "mqtt", "reason": str(err["msg"])} for err in exc.errors()]}
        return await probe(config)

    def _audio_free(self) -> None:
        if self.calls.state != "idle":
            raise CommandRefusedError("the microphone and speaker are in a call now")

    async def audio_level(self) -> dict[str, Any]:
        """The microphone's RMS level over ``LEVEL_FRAMES`` frames: peak and mean, dBFS."""
        from intercom.media.audio import rms_level  # noqa: PLC0415

        self._audio_free()
        if self.microphone is None:
            raise IntercomError("no microphone")
        levels = [rms_level(await asyncio.wait_for(self.microphone.next(), 1.0))
                  for _ in range(LEVEL_FRAMES)]
        peak = max(levels)
        return {"peak": round(peak, 4), "mean": round(sum(levels) / len(levels), 4),
                "dbfs": round(20 * math.log10(peak), 1) if peak > 0 else None}

    async def tone(self) -> dict[str, Any]:
        """One second of a 1 kHz tone on the speaker, paced in real time."""
        from intercom.media.audio import ToneSource  # noqa: PLC0415

        self._audio_free()
        if self.speaker is None:
            raise IntercomError("no speaker")
        source = ToneSource(TONE_HZ)
        await source.open()
        for _ in range(TONE_FRAMES):
            await self.speaker.play(await source.next())
        return {"played_s": TONE_FRAMES / 50, "hz": TONE_HZ}

    async def pair_installer(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Control request ``pair-installer``: a code and link pairing an installer's phone."""
        hours = self.settings.privacy.installer_valid_hours
        code, expires_at = self.calls.pairing.new_installer_code(hours)
        url = f"{self.calls.url}installer.html#pair={code}&fp={self.calls.fingerprint}"
        return {"ok": True, "code": code, "url": url, "expires_at": expires_at,
                "valid_hours": hours, "fingerprint": self.calls.fingerprint}
