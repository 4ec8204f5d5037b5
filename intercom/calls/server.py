"""The station's HTTPS server: the web client, /api/info, /api/pair, /ws, /metrics, /whep, /ca.crt.

Everything a resident's browser sends is hostile until verified: bodies are capped,
pairing attempts are rate limited per source address (charged when the request
arrives, before its body is read; given back when the pairing succeeds), errors carry a
short reason and never a stack trace.

There is no station-wide pairing limit on purpose: wrong codes from other addresses
must never block a resident's valid code. A code is 12 random base32 characters (60
bits) and expires in 10 minutes, so guessing from many addresses is no shortcut.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import segno
from aiohttp import web

from intercom import __version__
from intercom.calls.origin import Origins
from intercom.calls.pairing import Pairing, PairingError
from intercom.calls.tls import StationCert
from intercom.calls.trust import TrustFiles
from intercom.deploy.tlscert import machine_name
from intercom.errors import IntercomError
from intercom.netaddr import ANY_HOSTS
from intercom.security.limits import BucketTable, RefusalLog, source_key

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MAX_BODY = 16 * 1024
PAIR_RATE_PER_ADDRESS = (10 / 60, 10.0)  # attempts per second, burst; successes refunded
MAX_TRACKED_ADDRESSES = 1024  # beyond: the address seen longest ago is forgotten
CSP = (
    "default-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
    "connect-src 'self' wss:; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Server": "intercom",
}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

WsHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MetricsHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def forwarded_client(values: list[str]) -> str | None:
    """The address a trusted reverse proxy appended to ``X-Forwarded-For``, or None.

    The last one: any before it came from the client and prove nothing.
    """
    hops = [hop.strip() for value in values for hop in value.split(",")]
    if not hops:
        return None
    try:
        return str(ipaddress.ip_address(hops[-1]))
    except ValueError:
        return None


def error(status: int, reason: str) -> web.Response:
    """A JSON error answer."""
    return web.json_response({"error": reason}, status=status)


@web.middleware
async def guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Security headers on every answer; no stack trace ever reaches a client."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = error(exc.status, exc.reason)
    except Exception:
        log.exception("web: %s %s failed", request.method, request.path)
        response = error(500, "internal error")
    if not response.prepared:  # a WebSocket has sent its headers already
        response.headers.update(SECURITY_HEADERS)
    return response


class WebServer:
    """aiohttp on TLS: static client files, the info and pairing API, the signalling socket."""

    def __init__(
        self,
        cert: StationCert,
        pairing: Pairing,
        info: dict[str, Any],
        host: str,
        port: int,
        public_url: str = "",
        web_dir: Path = WEB_DIR,
        clock: Callable[[], float] = time.monotonic,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.cert = cert
        self.pairing = pairing
        self.info = info
        self.host = host
        self.port = port
        self.web_dir = web_dir
        self._public_url = public_url
        self._clock = clock
        self.origins = Origins(lambda: cert.hosts, public_url)
        self._proxies = frozenset(str(ipaddress.ip_address(p)) for p in trusted_proxies)
        self._origin_refusals = RefusalLog(log)
        self.url = ""
        self.ws_handler: WsHandler | None = None
        self.metrics_handler: MetricsHandler | None = None  # set when [monitor] metrics is on
        self.console_handler: MetricsHandler | None = None  # the installer console's API
        self.push_handler: MetricsHandler | None = None  # Web Push (intercom.push)
        self.whep_handler: MetricsHandler | None = None  # set when [whep] enabled is on
        self._runner: web.AppRunner | None = None
        self._per_address = BucketTable(*PAIR_RATE_PER_ADDRESS, size=MAX_TRACKED_ADDRESSES)
        self._pair_refusals = RefusalLog(log)

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[guard, self._front])
        app.router.add_get("/api/info", self._info)
        app.router.add_post("/api/pair", self._pair)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/whep", self._whep)
        app.router.add_route("*", r"/whep/sessions/{session:[A-Za-z0-9_-]{1,64}}", self._whep)
        app.router.add_route("*", r"/api/console/{action:[a-z][a-z-]{0,31}}", self._console)
        app.router.add_route("*", r"/api/push/{action:[a-z][a-z-]{0,31}}", self._push)
        trust = TrustFiles(self.info["station"], lambda: (self.cert.ca_der, self.cert.fingerprint))
        app.router.add_get("/ca.crt", trust.certificate)
        app.router.add_get("/ca.mobileconfig", trust.profile)
        app.router.add_get("/", self._index)
        app.router.add_get(
            r"/{path:[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*}", self._static
        )
        return app

    async def start(self) -> None:
        """Listen on the configured address (port 0: any free port)."""
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.cert.context
        )
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise IntercomError(
                f"web: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        port = self.bound_port()
        host = self.host
        if host in ANY_HOSTS:  # any address: name the machine (phones resolve .local by mDNS)
            host = machine_name()
        if ":" in host:
            host = f"[{host}]"
        self.url = self._public_url or f"https://{host}:{port}/"
        if not self.url.endswith("/"):
            self.url += "/"
        log.info("web: listening on %s:%d, residents use %s", self.host, port, self.url)

    def bound_port(self) -> int:
        """The port it listens on (the configured one, or the one port 0 gave)."""
        assert self._runner is not None  # noqa: S101 - only called after setup
        for address in self._runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                return int(address[1])
        return self.port

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _front(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Only the station's own names and pages get further (``intercom.calls.origin``).

        Behind a trusted reverse proxy, the client's address is the one it forwarded.
        """
        if self._proxies and request.remote in self._proxies:
            client = forwarded_client(request.headers.getall("X-Forwarded-For", []))
            if client is not None:
                request = request.clone(remote=client)
        reason = self.origins.refusal(request.headers.get("Host"), request.headers.get("Origin"))
        if reason is not None:
            self._origin_refusals.refused(
                self._clock(), "web: refused %s %s from %s: %s", request.method,
                request.path[:64], source_key(request.remote), reason)
            return error(403, reason)
        return await handler(request)

    # --- handlers --------------------------------------------------------------------------

    async def _info(self, _request: web.Request) -> web.Response:
        certificate = "owner" if self.cert.owner else "station-ca"
        return web.json_response({**self.info, "fingerprint": self.cert.fingerprint,
                                  "certificate": certificate, "version": __version__})

    async def _pair(self, request: web.Request) -> web.Response:
        address = source_key(request.remote)
        # Charged now, in one step with the check, before the body is awaited: attempts
        # sent concurrently (headers first) cannot all pass a check made before any paid.
        if not self._per_address.take(address, self._clock()):
            self._pair_refusals.refused(
                self._clock(), "web: pairing attempt refused, rate limit (%s)", address
            )
            return error(429, "too many pairing attempts; wait a minute")
        response = await self._pair_checked(request)
        if response.status == 200:
            self._per_address.refund(address)
        return response

    async def _pair_checked(self, request: web.Request) -> web.Response:
        address = source_key(request.remote)
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            return error(400, "body must be JSON")
        if not isinstance(body, dict):
            return error(400, "body must be a JSON object")
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > 64):
            return error(400, "name must be a string of at most 64 characters")
        try:
            paired = await self.pairing.redeem(body.get("code"), body.get("jwk"))
        except PairingError as exc:
            status = 403 if str(exc) == "pairing code invalid or expired" else 400
            refused = "web: pairing refused (%s): %s"
            self._pair_refusals.refused(self._clock(), refused, address, exc)
            return error(status, str(exc))
        qr = segno.make(paired.totp_uri, error="m").svg_inline(scale=4)
        return web.json_response(
            {
                "principal": paired.principal,
                "station": self.info["station"],
                "door": self.info["door"],
                "flat": paired.flat,
                "totp_uri": paired.totp_uri,
                "totp_qr_svg": qr,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self.ws_handler is None:
            return error(503, "signalling is not running")
        return await self.ws_handler(request)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self.metrics_handler is None:
            return error(404, "not found")
        return await self.metrics_handler(request)

    async def _whep(self, request: web.Request) -> web.StreamResponse:
        if self.whep_handler is None:
            return error(404, "not found")
        return await self.whep_handler(request)

    async def _console(self, request: web.Request) -> web.StreamResponse:
        if self.console_handler is None:
            return error(404, "not found")
        return await self.console_handler(request)

    async def _push(self, request: web.Request) -> web.StreamResponse:
        if self.push_handler is None:
            return error(404, "not found")
        return await self.push_handler(request)

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        return self._file(self.web_dir / "index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        root = self.web_dir.resolve()
        path = (root / request.match_info["path"]).resolve()
        if root not in path.parents:
            return error(404, "not found")
        return self._file(path)

    def _file(self, path: Path) -> web.StreamResponse:
        if not path.is_file():
            return error(404, "not found")
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return web.FileResponse(
            path, headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )
