"""The station tests its parts, at start and when asked (component ``selftest``).

Camera (frames at the configured rate), microphone (audio arrives), door contact and
tamper switch (their pins read), relay (its pin reads back the level it is driven to;
the self-test never energises it: a lock moves only for the verifier), clock, free disk,
certificates and MQTT link (the monitor's own checks, read from a fresh sample, so each
check lives in one place) and the event log (chain and checkpoints verified, the tail
authenticated). Each part is ``ok``, ``failed`` with what is wrong, or ``skipped`` with
why (not wired, not configured, cannot be asked, in use by a call).

The result is published as ``SelfTestCompleted``, shown by ``intercom status`` and
handed to the listeners (the MQTT bridge's ``<p>/state/selftest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from intercom.errors import CommandRefusedError, IntercomError
from intercom.eventlog.verify import Verdict
from intercom.events import EventBus, SelfTestCompleted
from intercom.media import AudioSource, CameraSource
from intercom.monitor import CERTIFICATE_EXPIRY, CLOCK_UNSYNCHRONISED, DISK_LOW, Monitor

log = logging.getLogger(__name__)

PARTS = ("camera", "microphone", "door_contact", "tamper", "relay", "clock", "disk",
         "eventlog", "certificate", "mqtt")
CAMERA_WINDOW_S = 1.0  # frames are counted over this long
STALL_S = 3.0  # no frame (or audio) within this long: stalled
MIN_RATE = 0.5  # below this share of the configured frame rate: too slow


class Outcome(enum.Enum):
    """What the self-test found of one part."""

    OK = "ok"  # the part did what it should
    FAILED = "failed"  # it did not; the detail says what is wrong
    SKIPPED = "skipped"  # not wired, not configured, cannot be asked or busy; the detail says


@dataclass(frozen=True)
class Check:
    """One part's result."""

    part: str
    outcome: Outcome
    detail: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"part": self.part, "outcome": self.outcome.value, "detail": self.detail}


@dataclass
class Parts:
    """What the self-test may read: each part as the station hands it, None when absent.

    ``door_contact``, ``tamper`` and ``relay`` read their pin now and describe it
    (raising when it cannot be read); ``busy`` says a call uses the camera and microphone.
    """

    camera: CameraSource | None = None
    fps: int = 15
    microphone: AudioSource | None = None
    door_contact: Callable[[], str] | None = None
    tamper: Callable[[], str] | None = None
    relay: Callable[[], str] | None = None
    eventlog: Callable[[], Awaitable[Verdict]] | None = None
    busy: Callable[[], bool] = lambda: False


@dataclass
class Report:
    """A whole self-test."""

    at: float
    trigger: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """The parts that failed."""
        return [c.part for c in self.checks if c.outcome is Outcome.FAILED]

    @property
    def passed(self) -> bool:
        """True when no part failed."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for ``status``, the control socket and MQTT."""
        return {"at": round(self.at, 3), "trigger": self.trigger, "passed": self.passed,
                "failed": self.failed, "parts": {c.part: c.outcome.value for c in self.checks},
                "checks": [c.to_dict() for c in self.checks]}


class SelfTest:
    """Tests the station's parts (component ``selftest``, control request ``selftest``)."""

    name = "selftest"

    def __init__(self, parts: Parts, monitor: Monitor, bus: EventBus, *,
                 at_start: bool = True, stall_s: float = STALL_S,
                 window_s: float = CAMERA_WINDOW_S) -> None:
        self._parts = parts
        self._monitor = monitor
        self._bus = bus
        self._at_start = at_start
        self._stall_s = stall_s
        self._window_s = window_s
        self.last: Report | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[Report] | None = None

    async def start(self) -> None:
        """Run the first self-test in the background (start-up does not wait for it)."""
        if self._at_start:
            self._task = asyncio.create_task(self.run("start"), name="selftest-start")
            self._task.add_done_callback(_log_failure)

    async def stop(self) -> None:
        """Cancel a self-test under way."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def status(self) -> dict[str, Any]:
        """The latest self-test, None before the first."""
        return {"selftest": None if self.last is None else self.last.to_dict()}

    async def control_request(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Control request ``selftest``: run one now and answer with it."""
        report = await self.run("request")
        return {"ok": True, "selftest": report.to_dict()}

    async def run(self, trigger: str) -> Report:
        """Test every part (one self-test at a time), publish and keep the result."""
        if self._lock.locked():
            raise CommandRefusedError("a self-test is already running")
        async with self._lock:
            report = Report(at=time.time(), trigger=trigger)
            checks = await asyncio.gather(
                self._camera(), self._microphone(), self._eventlog(), self._monitored())
            p = self._parts
            pins = [("door_contact", p.door_contact, "not wired ([hardware.door_contact])"),
                    ("tamper", p.tamper, "not wired ([hardware.tamper])"),
                    ("relay", p.relay, "no relay")]
            found = {c.part: c for group in checks for c in group}
            found.update({part: _read_pin(part, read, absent) for part, read, absent in pins})
            report.checks = [found[part] for part in PARTS]
        self.last = report
        failed = ", ".join(report.failed)
        if failed:
            log.warning("self-test (%s) failed: %s", trigger, "; ".join(
                f"{c.part}: {c.detail}" for c in report.checks if c.outcome is Outcome.FAILED))
        else:
            log.info("self-test (%s) passed", trigger)
        self._bus.publish(SelfTestCompleted(passed=report.passed, failed=failed, trigger=trigger))
        shown = report.to_dict()
        for listener in list(self.listeners):
            listener(shown)
        return report

    # --- the parts ------------------------------------------------------------------

    async def _camera(self) -> list[Check]:
        camera = self._parts.camera
        if camera is None:
            return [Check("camera", Outcome.SKIPPED, "no camera")]
        if self._parts.busy():
            return [Check("camera", Outcome.SKIPPED, "in use by a call (not measured)")]
        try:
            return [await self._measure(camera)]
        except Exception as exc:  # noqa: BLE001 - a device fault is the finding
            return [Check("camera", Outcome.FAILED, f"cannot be read: {exc}")]

    async def _measure(self, camera: CameraSource) -> Check:
        """Frames counted over ``window_s`` after the first, against the configured rate."""
        loop, fps = asyncio.get_running_loop(), self._parts.fps
        try:
            await asyncio.wait_for(camera.next(), self._stall_s)
        except TimeoutError:
            return Check("camera", Outcome.FAILED, f"stalled: no frame within {self._stall_s:g} s")
        started, frames = loop.time(), 0
        deadline = started + self._window_s
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(camera.next(), left)
            except TimeoutError:
                break
            frames += 1
        rate = frames / max(loop.time() - started, 1e-6)
        detail = f"{rate:.1f} fps (configured {fps})"
        if frames == 0:
            return Check("camera", Outcome.FAILED,
                         f"stalled: no frame for {self._window_s:g} s after the first")
        if rate < MIN_RATE * fps:
            return Check("camera", Outcome.FAILED, f"too slow: {detail}")
        return Check("camera", Outcome.OK, detail)

    async def _microphone(self) -> list[Check]:
        microphone = self._parts.microphone
        if microphone is None:
            return [Check("microphone", Outcome.SKIPPED, "no microphone")]
        if self._parts.busy():
            return [Check("microphone", Outcome.SKIPPED, "in use by a call (not read)")]
        try:
            frame = await asyncio.wait_for(microphone.next(), self._stall_s)
        except TimeoutError:
            return [Check("microphone", Outcome.FAILED,
                          f"stalled: no audio within {self._stall_s:g} s")]
        except Exception as exc:  # noqa: BLE001 - a device fault is the finding
            return [Check("microphone", Outcome.FAILED, f"cannot be read: {exc}")]
        from intercom.media.audio import rms_level  # noqa: PLC0415

        return [Check("microphone", Outcome.OK,
                      f"audio arrives (level {rms_level(frame):.3f} RMS)")]

    async def _eventlog(self) -> list[Check]:
        verify = self._parts.eventlog
        if verify is None:
            return [Check("eventlog", Outcome.SKIPPED, "no event log")]
        try:
            verdict = await verify()
        except sqlite3.DatabaseError as exc:
            return [Check("eventlog", Outcome.FAILED, f"the database is damaged: {exc}")]
        except (IntercomError, OSError) as exc:
            return [Check("eventlog", Outcome.FAILED, f"cannot be verified: {exc}")]
        if not verdict.ok:
            where = f"first bad seq {verdict.bad_seq}: " if verdict.bad_seq is not None else ""
            return [Check("eventlog", Outcome.FAILED, f"{where}{verdict.problem}")]
        return [Check("eventlog", Outcome.OK,
                      f"{verdict.records} records verify, {verdict.authenticated} after the "
                      f"last checkpoint authenticated")]

    async def _monitored(self) -> list[Check]:
        """Clock, disk, certificates, MQTT: the monitor's checks on a fresh sample."""
        health = await self._monitor.sample()
        verdicts = self._monitor.verdicts
        config = self._monitor.config
        synced = health.get("clock_synchronized")
        if synced is None:
            clock = Check("clock", Outcome.SKIPPED,
                          "timesyncd cannot be asked" if config.clock_check
                          else "not checked ([monitor] clock_check = false)")
        elif verdicts.get(CLOCK_UNSYNCHRONISED):
            clock = Check("clock", Outcome.FAILED, verdicts[CLOCK_UNSYNCHRONISED])
        else:
            clock = Check("clock", Outcome.OK, "synchronised (NTPSynchronized=yes)")
        percent = health.get("disk_free_percent")
        if verdicts.get(DISK_LOW):
            disk = Check("disk", Outcome.FAILED, verdicts[DISK_LOW])
        elif percent is None:
            disk = Check("disk", Outcome.FAILED, "free space cannot be read")
        else:
            disk = Check("disk", Outcome.OK, f"{percent}% free")
        if verdicts.get(CERTIFICATE_EXPIRY):
            cert = Check("certificate", Outcome.FAILED, verdicts[CERTIFICATE_EXPIRY])
        else:
            cert = Check("certificate", Outcome.OK,
                         f"valid for more than {config.cert_expiry_days:g} days")
        link = health.get("mqtt")
        if link is None:
            mqtt = Check("mqtt", Outcome.SKIPPED, "not configured ([mqtt])")
        elif link == "connected":
            mqtt = Check("mqtt", Outcome.OK, "connected to the broker")
        else:
            mqtt = Check("mqtt", Outcome.FAILED, f"the link is {link}")
        return [clock, disk, cert, mqtt]


def _read_pin(part: str, read: Callable[[], str] | None, absent: str) -> Check:
    if read is None:
        return Check(part, Outcome.SKIPPED, absent)
    try:
        return Check(part, Outcome.OK, read())
    except IntercomError as exc:
        return Check(part, Outcome.FAILED, str(exc))
    except Exception as exc:  # noqa: BLE001 - gpiozero's errors are the finding
        return Check(part, Outcome.FAILED, f"cannot be read: {exc}")


def _log_failure(task: asyncio.Task[Report]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("self-test at start failed to run: %s", task.exception())
