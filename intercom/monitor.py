"""Health metrics and alerts: the station says how it is (component ``monitor``).

Every ``[monitor] interval_s`` the monitor samples the process and the machine (uptime,
load, temperature where ``/sys/class/thermal`` has one, RSS, open descriptors, free
space of the state directory's filesystem, bytes written per day from
``/proc/self/io``), the event log (size, age of its last checkpoint), the camera
(frames per second read through ``MeteredCamera``), calls per day, the MQTT and web
links and the clock's synchronisation (``timedatectl show -p NTPSynchronized``).

Conditions that need someone's attention are published as events, so they are logged,
sent on MQTT and shown by ``intercom status``: ``AlertRaised`` when a condition starts
(camera stalled, clock unsynchronised, disk low, broker unreachable, certificate near
expiry) and ``AlertCleared`` when it ends; occurrences (the relay guard fired, repeated
unlock failures of one principal) are raised once each. Every probe is injectable
(``Probes``) so that tests can make each alert happen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from intercom.config import MonitorConfig
from intercom.events import AlertCleared, AlertRaised, Event, EventBus
from intercom.media import CameraSource

log = logging.getLogger(__name__)

DAY_S = 86_400.0
MIN_RATE_S = 600.0  # a daily figure from less than this would be noise
GUARD_REASON = "maximum open time reached"  # LockStateChanged.reason of the relay's guard
TIMEDATECTL = "timedatectl"

# Alerts that are a condition (raised, later cleared) and occurrences (raised once each).
CAMERA_STALLED = "camera_stalled"
CLOCK_UNSYNCHRONISED = "clock_unsynchronised"
DISK_LOW = "disk_low"
BROKER_UNREACHABLE = "broker_unreachable"
CERTIFICATE_EXPIRY = "certificate_expiry"
RELAY_GUARD = "relay_guard"
UNLOCK_FAILURES = "unlock_failures"
ALERTS = (CAMERA_STALLED, CLOCK_UNSYNCHRONISED, DISK_LOW, BROKER_UNREACHABLE,
          CERTIFICATE_EXPIRY, RELAY_GUARD, UNLOCK_FAILURES)


def timedatectl_synchronized() -> bool | None:
    """systemd-timesyncd's verdict (``NTPSynchronized``), None when it cannot be asked."""
    exe = shutil.which(TIMEDATECTL)
    if exe is None:
        return None
    try:
        result = subprocess.run(
            [exe, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True, text=True, timeout=3, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = result.stdout.strip()
    if result.returncode != 0 or value not in {"yes", "no"}:
        return None
    return value == "yes"


def certificate_expiry(path: Path) -> float | None:
    """The unix time a PEM certificate expires, None when it cannot be read."""
    from cryptography import x509  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


@dataclass
class Probes:
    """Where the monitor reads the world; tests replace any of them."""

    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    statvfs: Callable[[str], os.statvfs_result] = os.statvfs
    synchronized: Callable[[], bool | None] = timedatectl_synchronized
    cert_expiry: Callable[[Path], float | None] = certificate_expiry
    proc: Path = Path("/proc/self")
    thermal: Path = Path("/sys/class/thermal")
    loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg


class MeteredCamera:
    """The station's camera, counting the frames its readers get (read-only figures).

    It is also what keeps the camera to one reader at a time. Besides the calls' relay,
    the monitor's probe and the self-test read frames; a camera source is not made for
    concurrent ``next()`` calls (the encode-once camera, read twice at once, failed and
    left every call without video). So a ``next()`` while another is in flight waits for
    that same frame: every reader gets every frame, none is taken from another.

    Every other attribute (``encoded``, ``watch``, ``still``, ...) is the camera's own.
    """

    def __init__(self, inner: CameraSource, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.encoded: bool = inner.encoded
        self.name: str = inner.name
        self.frames = 0
        self.last_frame_at: float | None = None
        self._clock = clock
        self._waiting: dict[int, float] = {}
        self._next_id = 0
        self._reading: asyncio.Future[Any] | None = None  # the frame being read now

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def open(self) -> None:
        """Open the camera."""
        await self.inner.open()

    async def next(self) -> Any:
        """The camera's next frame, counted; the one being read if a read is in flight."""
        ticket = self._next_id
        self._next_id += 1
        self._waiting[ticket] = self._clock()
        try:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.ensure_future(self._read())
                self._reading.add_done_callback(_ignore_result)  # every awaiter may be gone
            # shielded: a reader giving up (a timeout) does not cut the others' frame
            return await asyncio.shield(self._reading)
        finally:
            del self._waiting[ticket]

    async def _read(self) -> Any:
        frame = await self.inner.next()
        self.frames += 1
        self.last_frame_at = self._clock()
        return frame

    def request_keyframe(self) -> None:
        """Ask the camera for an IDR."""
        self.inner.request_keyframe()

    async def close(self) -> None:
        """Close the camera."""
        await self.inner.close()

    def waiting_s(self) -> float:
        """How long the longest-waiting reader has waited for a frame (0 when none waits)."""
        if not self._waiting:
            return 0.0
        return self._clock() - min(self._waiting.values())


@dataclass
class Links:
    """How the monitor asks the station's links for their state."""

    mqtt: Callable[[], str | None] = lambda: None  # the link's state, None without [mqtt]
    web: Callable[[], str] = lambda: "unknown"
    checkpoint_at: Callable[[], float | None] = lambda: None  # signed_at of the newest


@dataclass
class _Active:
    since: float
    message: str


@dataclass
class _Series:
    """(monotonic time, value) samples kept for a day."""

    samples: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)

    def add(self, at: float, value: float) -> None:
        self.samples.append((at, value))
        while len(self.samples) > 2 and self.samples[1][0] <= at - DAY_S:
            self.samples.popleft()

    def per_day(self) -> float | None:
        """The rate over the samples kept, once they span ``MIN_RATE_S`` (None before)."""
        if len(self.samples) < 2:
            return None
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        return None if t1 - t0 < MIN_RATE_S else (v1 - v0) * DAY_S / (t1 - t0)


class Monitor:
    """Samples health and raises alerts (component ``monitor``)."""

    name = "monitor"

    def __init__(
        self,
        config: MonitorConfig,
        bus: EventBus,
        state_dir: Path,
        camera: MeteredCamera | None,
        links: Links | None = None,
        certificates: tuple[Path, ...] = (),
        probes: Probes | None = None,
    ) -> None:
        self.config = config
        self._bus = bus
        self._state_dir = state_dir
        self._camera = camera
        self._links = links or Links()
        self._certificates = certificates
        self.probes = probes or Probes()
        self.started_at = self.probes.monotonic()
        self.active: dict[str, _Active] = {}
        # Each condition's verdict at the last sample: its message while it holds, "" when
        # it does not (the self-test reads these: one place for each check).
        self.verdicts: dict[str, str] = {}
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=10)
        self.metrics: dict[str, Any] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._writes = _Series()
        self._rings: collections.deque[float] = collections.deque()
        self._denials: dict[str, collections.deque[float]] = {}
        self._frames_at: tuple[float, int] | None = None
        self._broker_down_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[Any] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        """Watch the bus and sample every ``interval_s``, the first time now."""
        self._unsubscribe = self._bus.on(self._on_event)
        await self.sample()
        self._task = asyncio.create_task(self._run(), name="monitor")

    async def stop(self) -> None:
        """Stop sampling."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._probe
            self._probe = None

    def status(self) -> dict[str, Any]:
        """The latest metrics, the active alerts and the latest ones raised."""
        return {
            "health": {
                **self.metrics,
                "alerts": {k: {"since": a.since, "message": a.message}
                           for k, a in self.active.items()},
                "recent_alerts": list(self.recent),
            }
        }

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.sample()
            except Exception:
                log.exception("monitor: sampling failed")

    # --- from the bus ----------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        kind = event.type
        now = self.probes.monotonic()
        if kind == "CallRinging":
            self._rings.append(now)
        elif kind == "LockStateChanged" and getattr(event, "reason", "") == GUARD_REASON:
            self._occurred(RELAY_GUARD, f"the relay of door {getattr(event, 'door', '?')} was "
                           f"released by its guard after the maximum open time")
        elif kind == "UnlockDenied" and (principal := str(getattr(event, "principal", ""))):
            window = self._denials.setdefault(principal, collections.deque())
            window.append(now)
            while window and window[0] < now - self.config.unlock_failure_window_s:
                window.popleft()
            if len(window) >= self.config.unlock_failures:
                window.clear()
                self._occurred(
                    UNLOCK_FAILURES,
                    f"{self.config.unlock_failures} unlock commands denied within "
                    f"{self.config.unlock_failure_window_s:g} s",
                    principal=principal,
                )

    # --- sampling --------------------------------------------------------------------

    async def sample(self) -> dict[str, Any]:
        """Take one sample of every metric, raise and clear alerts, tell the listeners."""
        p = self.probes
        now, mono = p.clock(), p.monotonic()
        synced = await asyncio.to_thread(p.synchronized) if self.config.clock_check else None
        disk = self._disk()
        written = _write_bytes(p.proc)
        if written is not None:
            self._writes.add(mono, written)
        while self._rings and self._rings[0] <= mono - DAY_S:
            self._rings.popleft()
        checkpoint_at = self._links.checkpoint_at()
        mqtt = self._links.mqtt()
        metrics: dict[str, Any] = {
            "at": round(now, 3),
            "uptime_s": round(mono - self.started_at, 1),
            "load_1m": round(p.loadavg()[0], 2),
            "cpu_temp_c": _temperature(p.thermal),
            "rss_bytes": _rss(p.proc),
            "open_fds": _open_fds(p.proc),
            **disk,
            "write_bytes_per_day": _round(self._writes.per_day()),
            "eventlog_bytes": _eventlog_bytes(self._state_dir),
            "checkpoint_age_s": None if checkpoint_at is None else round(now - checkpoint_at, 1),
            **self._camera_metrics(mono),
            "calls_24h": len(self._rings),
            "mqtt": mqtt,
            "web": self._links.web(),
            "clock_synchronized": synced,
        }
        self.metrics = metrics
        self._check(metrics, now, mono, synced, mqtt)
        shown = {**metrics, "alerts": sorted(self.active)}
        for listener in list(self.listeners):
            listener(shown)
        return shown

    def _disk(self) -> dict[str, Any]:
        try:
            st = self.probes.statvfs(str(self._state_dir))
        except OSError:
            return {"disk_free_bytes": None, "disk_free_percent": None}
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        percent = round(100.0 * free / total, 1) if total else None
        return {"disk_free_bytes": free, "disk_free_percent": percent}

    def _camera_metrics(self, mono: float) -> dict[str, Any]:
        camera = self._camera
        if camera is None:
            return {"camera_fps": None, "camera_frames": None}
        fps = None
        if self._frames_at is not None and mono > self._frames_at[0]:
            fps = round((camera.frames - self._frames_at[1]) / (mono - self._frames_at[0]), 1)
        idle = self._frames_at is not None and camera.frames == self._frames_at[1]
        self._frames_at = (mono, camera.frames)
        if idle and camera.waiting_s() == 0 and (self._probe is None or self._probe.done()):
            # Nobody reads the camera: read one frame, so a dead camera is found before a
            # visitor rings (a probe that never returns is what camera_stalled sees).
            self._probe = asyncio.create_task(camera.next(), name="monitor-camera-probe")
            self._probe.add_done_callback(_ignore_result)
        return {"camera_fps": fps, "camera_frames": camera.frames}

    def _check(
        self, metrics: dict[str, Any], now: float, mono: float, synced: bool | None,
        mqtt: str | None,
    ) -> None:
        cfg = self.config
        waited = self._camera.waiting_s() if self._camera is not None else 0.0
        self._condition(CAMERA_STALLED, waited >= cfg.camera_stall_s,
                        f"no camera frame for {waited:.0f} s")
        self._condition(CLOCK_UNSYNCHRONISED, synced is False,
                        "the clock is not synchronised (NTPSynchronized=no)")
        percent = metrics.get("disk_free_percent")
        self._condition(DISK_LOW, percent is not None and percent < cfg.disk_low_percent,
                        f"{percent}% free on the state directory's filesystem "
                        f"(alert below {cfg.disk_low_percent:g}%)")
        if mqtt is None or mqtt == "connected":
            self._broker_down_since = None
        elif self._broker_down_since is None:
            self._broker_down_since = mono
        down = 0.0 if self._broker_down_since is None else mono - self._broker_down_since
        self._condition(BROKER_UNREACHABLE, down >= cfg.broker_unreachable_s,
                        f"the MQTT broker has been unreachable for {down:.1f} s")
        expiring = []
        for path in self._certificates:
            expires = self.probes.cert_expiry(path)
            if expires is None and path.exists():
                expiring.append(f"{path.name} cannot be read as a PEM certificate")
            elif expires is not None and expires - now < cfg.cert_expiry_days * DAY_S:
                when = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d")
                expiring.append(f"{path.name} expires {when}")
        self._condition(CERTIFICATE_EXPIRY, bool(expiring), "; ".join(expiring))

    def _condition(self, alert: str, holds: bool, message: str) -> None:
        self.verdicts[alert] = message if holds else ""
        if holds and alert not in self.active:
            self.active[alert] = _Active(self.probes.clock(), message)
            self._raise(alert, message)
        elif not holds and alert in self.active:
            del self.active[alert]
            log.info("alert cleared: %s", alert)
            self._bus.publish(AlertCleared(alert=alert))

    def _occurred(self, alert: str, message: str, principal: str = "") -> None:
        self._raise(alert, message, principal)

    def _raise(self, alert: str, message: str, principal: str = "") -> None:
        log.warning("alert: %s: %s", alert, message)
        self.recent.append({"alert": alert, "at": round(self.probes.clock(), 3),
                            "message": message})
        self._bus.publish(AlertRaised(alert=alert, message=message, principal=principal))


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("monitor: camera probe failed: %s", task.exception())


def _round(value: float | None) -> int | None:
    return None if value is None else round(value)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _write_bytes(proc: Path) -> int | None:
    for line in (_read(proc / "io") or "").splitlines():
        key, _, value = line.partition(":")
        if key == "write_bytes":
            return int(value)
    return None


def _rss(proc: Path) -> int | None:
    for line in (_read(proc / "status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def _open_fds(proc: Path) -> int | None:
    try:
        return sum(1 for _ in (proc / "fd").iterdir())
    except OSError:
        return None


def _temperature(thermal: Path) -> float | None:
    """The first thermal zone's temperature in °C (a Pi's SoC), None where there is none."""
    text = _read(thermal / "thermal_zone0" / "temp")
    try:
        return None if text is None else round(int(text.strip()) / 1000, 1)
    except ValueError:
        return None


def _eventlog_bytes(state_dir: Path) -> int | None:
    """The event log's size on disk: its database and write-ahead log (stat only)."""
    total, found = 0, False
    for name in ("eventlog.db", "eventlog.db-wal"):
        with contextlib.suppress(OSError):
            total += (state_dir / name).stat().st_size
            found = True
    return total if found else None
