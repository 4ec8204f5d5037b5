"""Prometheus text at ``/metrics`` on the station's HTTPS server, for managers' bearers.

Off unless ``[monitor] metrics = true``. The page is the monitor's latest sample (taken
every ``[monitor] interval_s``) in the Prometheus text exposition format 0.0.4. A
request must carry ``Authorization: Bearer <JWS>`` where the JWS is a manager's read-only
bearer (``intercom sign-bearer``), checked by the one verifier
(``Verifier.check_bearer``); anything else gets 401 and the station's log says why.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from intercom.monitor import ALERTS
from intercom.security.limits import RefusalLog, source_key
from intercom.security.verifier import Decision

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCOPE = "metrics"

# health key -> (metric name, type, help, scale)
GAUGES: tuple[tuple[str, str, str, str, float], ...] = (
    ("uptime_s", "intercom_uptime_seconds", "gauge", "Seconds since the station started.", 1),
    ("load_1m", "intercom_load1", "gauge", "The machine's 1-minute load average.", 1),
    ("cpu_temp_c", "intercom_cpu_temperature_celsius", "gauge",
     "The first thermal zone's temperature (a Pi's SoC).", 1),
    ("rss_bytes", "process_resident_memory_bytes", "gauge", "The daemon's resident memory.", 1),
    ("open_fds", "process_open_fds", "gauge", "The daemon's open file descriptors.", 1),
    ("disk_free_bytes", "intercom_disk_free_bytes", "gauge",
     "Free space of the state directory's filesystem.", 1),
    ("disk_free_percent", "intercom_disk_free_ratio", "gauge",
     "Free share of the state directory's filesystem.", 0.01),
    ("write_bytes_per_day", "intercom_write_bytes_per_day", "gauge",
     "Bytes the daemon writes to storage per day.", 1),
    ("eventlog_bytes", "intercom_eventlog_bytes", "gauge",
     "The event log's size on disk (database and WAL).", 1),
    ("checkpoint_age_s", "intercom_eventlog_checkpoint_age_seconds", "gauge",
     "Age of the event log's newest signed checkpoint.", 1),
    ("camera_fps", "intercom_camera_fps", "gauge", "Camera frames per second read.", 1),
    ("camera_frames", "intercom_camera_frames_total", "counter",
     "Camera frames read since the start.", 1),
    ("calls_24h", "intercom_calls_24h", "gauge", "Rings in the last 24 hours.", 1),
)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _line(name: str, value: float, labels: str = "") -> str:
    return f"{name}{labels} {value:.17g}"


def prometheus_text(health: dict[str, Any]) -> str:
    """The monitor's sample (``Monitor.status()["health"]``) as Prometheus text."""
    lines: list[str] = []

    def metric(name: str, kind: str, helptext: str, samples: list[str]) -> None:
        if samples:
            lines.extend([f"# HELP {name} {helptext}", f"# TYPE {name} {kind}", *samples])

    for key, name, kind, helptext, scale in GAUGES:
        value = _number(health.get(key))
        metric(name, kind, helptext, [] if value is None else [_line(name, value * scale)])
    for key, name, up in (("mqtt", "intercom_mqtt_connected", "connected"),
                          ("web", "intercom_web_listening", "listening")):
        state = health.get(key)
        if isinstance(state, str):
            metric(name, "gauge", f"1 when the {key} link is {up}.",
                   [_line(name, 1.0 if state == up else 0.0)])
    synced = health.get("clock_synchronized")
    if isinstance(synced, bool):
        metric("intercom_clock_synchronized", "gauge", "1 when timesyncd says NTPSynchronized.",
               [_line("intercom_clock_synchronized", 1.0 if synced else 0.0)])
    active = health.get("alerts") or {}
    metric("intercom_alert_active", "gauge", "1 while the alert's condition holds.",
           [_line("intercom_alert_active", 1.0 if alert in active else 0.0,
                  f'{{alert="{alert}"}}') for alert in ALERTS])
    at = _number(health.get("at"))
    if at is not None:
        metric("intercom_health_sampled_timestamp_seconds", "gauge",
               "When the monitor took this sample (unix time).",
               [_line("intercom_health_sampled_timestamp_seconds", at)])
    return "\n".join(lines) + "\n"


class MetricsEndpoint:
    """The ``/metrics`` handler: a manager's bearer, checked by the verifier, or 401."""

    def __init__(
        self,
        health: Callable[[], dict[str, Any]],
        check_bearer: Callable[[str, str], Decision],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._health = health
        self._check = check_bearer
        self._clock = clock
        self._refusals = RefusalLog(log)

    async def handle(self, request: web.Request) -> web.Response:
        """Serve the text to a valid bearer; 401 with ``WWW-Authenticate`` otherwise."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._refuse(request, "no bearer token", 'Bearer realm="intercom"')
        decision = self._check(token.strip(), SCOPE)
        if not decision.granted:
            return self._refuse(request, decision.reason,
                                'Bearer realm="intercom", error="invalid_token"')
        body = prometheus_text(self._health())
        return web.Response(
            body=body.encode(), headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"}
        )

    def _refuse(self, request: web.Request, reason: str, challenge: str) -> web.Response:
        self._refusals.refused(self._clock(), "metrics: refused (%s): %s",
                               source_key(request.remote), reason)
        return web.json_response(
            {"error": "a manager's bearer token is required"}, status=401,
            headers={"WWW-Authenticate": challenge},
        )
