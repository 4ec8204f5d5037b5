"""The calls component: web server, pairing, signalling and the ring group, on the bus."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from intercom.calls.pairing import Pairing
from intercom.calls.server import WebServer
from intercom.calls.tls import StationCert, load_station_cert
from intercom.errors import CommandRefusedError

if TYPE_CHECKING:
    from intercom.station import Station

log = logging.getLogger(__name__)


class Calls:
    """Rings residents' devices on a press and carries the calls; serves the web client."""

    name = "calls"

    def __init__(self, station: Station) -> None:
        self.station = station
        settings = station.settings
        self.web_config = settings.web
        self.calls_config = settings.calls
        self.door = settings.hardware.relay.door
        self.flats = frozenset(b.flat for b in settings.hardware.buttons)
        self.pairing = Pairing(station.state_dir, station.id, self.flats, station.bus)
        self.cert: StationCert | None = None
        self.server: WebServer | None = None

    @property
    def url(self) -> str:
        """The URL residents open (empty until started)."""
        return self.server.url if self.server else ""

    @property
    def state(self) -> str:
        """``idle``, ``ringing`` or ``in_call``."""
        return "idle"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the station certificate, lowercase hex."""
        return self.cert.fingerprint if self.cert else ""

    async def start(self) -> None:
        """Load or make the certificate, open pairing, listen."""
        station = self.station
        self.cert = load_station_cert(station.state_dir, station.id)
        self.pairing.open()
        info = {"station": station.id, "door": self.door, "fingerprint": self.cert.fingerprint}
        self.server = WebServer(
            self.cert,
            self.pairing,
            info,
            self.web_config.host,
            self.web_config.port,
            self.web_config.public_url,
        )
        await self.server.start()
        station.control.register("pair", self.pair_request)

    async def stop(self) -> None:
        """Stop listening and close pairing."""
        if self.server is not None:
            await self.server.stop()
            self.server = None
        self.pairing.close()

    def status(self) -> dict[str, Any]:
        """What ``intercom status`` shows (no principal ids)."""
        return {"calls": {"url": self.url, "fingerprint": self.fingerprint}}

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
            "expires_at": expires_at,
        }
