"""The privacy component: snapshots, the zone preview, audit of pairing and config changes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any

from intercom.events import Event, EventBus, PrincipalPaired, PrivilegedAction
from intercom.privacy.audit import CONFIG_ACTOR, PAIRING_ACTOR
from intercom.privacy.camera import still_frame
from intercom.privacy.ringimage import RingImage, Show
from intercom.privacy.snapshots import Snapshots

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from intercom.config import Settings
    from intercom.eventlog import EventLog
    from intercom.media import CameraSource

    Register = Callable[[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]], None]

log = logging.getLogger(__name__)

CONFIG_DIGEST_FILE = "config.sha256"
PREVIEW_TIMEOUT_S = 5.0
PREVIEW_QUALITY = 92


class Privacy:
    """Component ``privacy``: owns snapshots and notes each change of the config."""

    name = "privacy"

    def __init__(
        self,
        settings: Settings,
        bus: EventBus,
        camera: CameraSource,
        eventlog: EventLog,
        register: Register,
    ) -> None:
        self.settings = settings
        self.config = settings.privacy
        self._bus = bus
        self._camera = camera
        self._register = register
        # Shredding runs even with snapshots switched off: earlier ones still expire.
        self.snapshots = Snapshots(settings, bus, camera, eventlog)
        self.ring_image: RingImage | None = None
        self._unsubscribe: Any = None

    def show_ring_images(self, show: Show) -> None:
        """Hand a redacted frame of each ring to ``show`` (before start; [mqtt] ring_image)."""
        self.ring_image = RingImage(self.config, self._bus, self._camera, show)

    async def start(self) -> None:
        """Audit a changed config; start taking snapshots when they are switched on."""
        self._audit_config()
        self._unsubscribe = self._bus.on(self._on_event)
        self._register("privacy-preview", self._preview_request)
        await self.snapshots.start(take=self.config.snapshots)
        if self.ring_image is not None:
            await self.ring_image.start()

    async def stop(self) -> None:
        """Stop auditing and taking snapshots."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.ring_image is not None:
            await self.ring_image.stop()
        await self.snapshots.stop()

    def set_zones(self, zones: list[list[tuple[float, float]]]) -> None:
        """The zones the preview outlines, from the config writer's change."""
        self.config = self.config.model_copy(update={"zones": zones})

    async def _preview_request(self, _request: dict[str, Any]) -> dict[str, Any]:
        """One frame as the outputs get it (zones masked), JPEG, and the zones to outline."""
        camera = self._camera
        from intercom.privacy.redact import frame_to_jpeg  # noqa: PLC0415

        frame = await asyncio.wait_for(still_frame(camera), PREVIEW_TIMEOUT_S)
        jpeg = await asyncio.to_thread(frame_to_jpeg, frame, PREVIEW_QUALITY)
        zones = [[list(point) for point in zone] for zone in self.config.zones]
        return {"ok": True, "jpeg": base64.b64encode(jpeg).decode(), "zones": zones}

    def _on_event(self, event: Event) -> None:
        if isinstance(event, PrincipalPaired):
            # Codes are issued only through the control socket (root or the station's
            # user), so that is who let this device pair.
            action = PrivilegedAction(actor=PAIRING_ACTOR, action="pair",
                                      target=event.principal, detail=f"flat {event.flat}")
            self._bus.publish(action)  # delivered after the PrincipalPaired, in order

    def _audit_config(self) -> None:
        """Log a PrivilegedAction when the settings differ from the last start's."""
        settings = self.settings.model_copy(update={"simulated": False})
        # The JSON dump masks secrets; the digest shows that something changed, not what.
        digest = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
        path = self.settings.station.state_dir / CONFIG_DIGEST_FILE
        try:
            old = path.read_text().strip()
        except FileNotFoundError:
            old = ""
        except OSError as exc:
            log.warning("privacy: cannot read %s: %s", path, exc)
            return
        if old == digest:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(digest + "\n")
        tmp.replace(path)
        action = "config-change" if old else "config-first-use"
        detail = f"sha256 {old[:16] or '-'} -> {digest[:16]}"
        self._bus.publish(PrivilegedAction(actor=CONFIG_ACTOR, action=action,
                                                  detail=detail))

    def status(self) -> dict[str, Any]:
        """Zones, redaction and snapshot counts for ``intercom status``."""
        snapshots = {"enabled": self.config.snapshots, **self.snapshots.counts()}
        ring = self.ring_image
        ring_image = {"enabled": ring is not None, **(ring.counts() if ring else {})}
        return {
            "privacy": {
                "zones": len(self.config.zones),
                "redact_all_outputs": self.config.redact_all_outputs,
                "snapshots": snapshots,
                "ring_image": ring_image,
            }
        }
