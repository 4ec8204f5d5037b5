"""Real parts for the web client tests: a simulated station process and Debian's Chromium.

Chromium comes from the Debian package (``/usr/bin/chromium``) and is driven through the
``playwright`` Python package; ``playwright install`` is never needed. Chromium trusts the
station as a resident's device does once its root is installed: the station's CA goes
into the NSS database of a fresh ``$HOME`` (``certutil``, Debian's libnss3-tools), and no
``--ignore-certificate-errors*`` flag is given, so the certificate is verified for real
(name constraints included) and the service worker may run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyotp
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from intercom.control import SOCKET_NAME

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
]
COALESCE_S = 3.5  # hardware.buttons[].coalesce_s (3 s) and a margin for a loaded machine
PHONE = {"width": 390, "height": 844}


def tone_wav(path: Path, frequency: float = 440.0, seconds: float = 1.0) -> Path:
    """A mono 48 kHz 16-bit sine WAV: a steady voice for Chromium's fake microphone."""
    rate = 48000
    samples = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * frequency * n / rate)))
        for n in range(int(rate * seconds))
    )
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(samples),
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        rate,
        rate * 2,
        2,
        16,
        b"data",
        len(samples),
    )
    path.write_bytes(header + samples)
    return path


def station_ca(url: str) -> bytes:
    """The station's root (DER) as ``/ca.crt`` serves it, fetched without verification.

    Trust on first use, as a resident who then compares its fingerprint with the
    pairing link's (``ca_fingerprint``) does; the tests compare it too.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(url + "ca.crt", context=context, timeout=10) as response:  # noqa: S310
        der: bytes = response.read()
    return der


def ca_fingerprint(url: str) -> str:
    """SHA-256 of the station's root (DER) served at ``url``, lowercase hex."""
    return hashlib.sha256(station_ca(url)).hexdigest()


@contextmanager
def trusting_home(ca_der: bytes) -> Iterator[Path]:
    """A fresh ``$HOME`` whose NSS database (what Chromium reads) trusts ``ca_der``."""
    with tempfile.TemporaryDirectory(prefix="intercom-home-") as folder:
        home = Path(folder)
        nssdb = home / ".pki" / "nssdb"
        nssdb.mkdir(parents=True)
        ca = home / "station-ca.der"
        ca.write_bytes(ca_der)
        certutil = ["certutil", "-d", f"sql:{nssdb}"]
        subprocess.run([*certutil, "-N", "--empty-password"], check=True, capture_output=True)
        subprocess.run([*certutil, "-A", "-n", "intercom station", "-t", "C,,", "-i", str(ca)],
                       check=True, capture_output=True)
        yield home


def control_request(
    state_dir: Path, payload: dict[str, Any], timeout: float = 10
) -> tuple[float, dict[str, Any]]:
    """One blocking request to a station's control socket: when it was sent (unix
    seconds, just before the request's first byte), and the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(state_dir / SOCKET_NAME))
        sent = time.time()
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return sent, answer


class SimStation:
    """``intercom run --simulate`` as a real process, spoken to over its control socket."""

    def __init__(
        self, state_dir: Path, extra_args: tuple[str, ...] = (), command: list[str] | None = None
    ) -> None:
        self.state_dir = state_dir
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        env = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                *(command or [sys.executable, "-m", "intercom"]),
                "run",
                "--simulate",
                "--state-dir",
                str(state_dir),
                *extra_args,
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._last_press = -COALESCE_S
        self.sent_at = 0.0  # wall-clock time just before the last request was sent
        self.url = self._wait_for_web()

    def request(self, payload: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        """One control-socket request (blocking: Playwright's sync API owns this thread's loop)."""
        self.sent_at, answer = control_request(self.state_dir, payload, timeout)
        return answer

    def status(self) -> dict[str, Any]:
        """The station's status (what ``intercom status --json`` prints)."""
        answer = self.request({"request": "status"})
        if not answer.get("ok"):
            raise AssertionError(f"status failed: {answer}")
        status: dict[str, Any] = answer["status"]
        return status

    def _wait_for_web(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"station exited: {self.log()}")
            with suppress(Exception):
                web = self.status()["listening"].get("web")
                if web:
                    return str(web)
            time.sleep(0.1)
        raise AssertionError(f"station web server not up within {timeout} s: {self.log()}")

    def pair_link(self, flat: str = "1") -> str:
        """A fresh one-time pairing link for ``flat``."""
        answer = self.request({"request": "pair", "flat": flat})
        if not answer.get("ok"):
            raise AssertionError(f"pair failed: {answer}")
        return str(answer["url"])

    def press(self, button: str | None = None) -> float:
        """Press the bell (the simulator drives the real mock pin); when, in unix seconds.

        The time returned is taken just before the press request is sent to the control
        socket. Presses within the button's coalesce time (3 s by default) of the last one
        count as the same press, so this waits until that time has passed.
        """
        time.sleep(max(0.0, self._last_press + COALESCE_S - time.monotonic()))
        self._last_press = time.monotonic()
        answer = self.request({"request": "sim", "action": "press", "button": button})
        pressed = self.sent_at
        if not answer.get("ok"):
            raise AssertionError(f"press failed: {answer}")
        return pressed

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The station's recent events of one type."""
        return [e for e in self.status()["recent_events"] if e["type"] == kind]

    def wait(self, what: str, check: Any, timeout: float = 10) -> Any:
        """Poll ``check(status)`` until it gives something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            result = check(status)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; status {status}")
            time.sleep(0.05)

    def log(self) -> str:
        """What the station printed so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextmanager
def chromium(
    url: str, extra_args: tuple[str, ...] = (), ca_der: bytes | None = None
) -> Iterator[Browser]:
    """Debian's Chromium trusting the station's root (``ca_der``, else the one ``url`` serves)."""
    root = station_ca(url) if ca_der is None else ca_der
    with trusting_home(root) as home, sync_playwright() as p:
        browser = launch(p, [*CHROMIUM_ARGS, *extra_args], home)
        try:
            yield browser
        finally:
            browser.close()


def launch(p: Playwright, args: list[str], home: Path) -> Browser:
    """Launch the system Chromium with ``args``, its NSS database that of ``home``."""
    return p.chromium.launch(
        executable_path=CHROMIUM, args=args, env={**os.environ, "HOME": str(home)}
    )


def new_device(browser: Browser, url: str) -> tuple[BrowserContext, Page]:
    """A fresh browser profile (its own IndexedDB) with microphone permission, phone-sized."""
    parts = urlsplit(url)
    context = browser.new_context(
        viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    context.grant_permissions(["microphone", "camera"], origin=f"{parts.scheme}://{parts.netloc}")
    page = context.new_page()
    page.on("console", lambda msg: log.info("page %s: %s", msg.type, msg.text))
    page.on("pageerror", lambda exc: log.warning("page error: %s", exc))
    return context, page


def pair_device(page: Page, link: str) -> dict[str, Any]:
    """Open the pairing link, pair through the page, finish the enrolment; the enrolment."""
    page.goto(link)
    page.wait_for_selector("#screen-pair:not([hidden])")
    page.wait_for_function("() => document.querySelector('#pair-fp-check').textContent.length > 0")
    page.click("#pair-go")
    page.wait_for_selector("#screen-enrol:not([hidden])")
    enrolment = {
        "totp_uri": page.text_content("#enrol-uri") or "",
        "qr_src": page.get_attribute("#enrol-qr", "src") or "",
        "fingerprint": page.text_content("#pair-fp") or "",
    }
    # the enrolment's check: the code an authenticator would show now
    page.fill("#enrol-code", pyotp.parse_uri(enrolment["totp_uri"]).now())
    page.click("#enrol-done")
    page.wait_for_selector("body[data-link='online']", timeout=20000)
    return enrolment


def wait_call_state(page: Page, state: str, timeout: float = 10) -> None:
    """Wait until the page's call state is ``state`` (idle, ringing, in_call)."""
    page.wait_for_selector(f"body[data-call='{state}']", timeout=timeout * 1000)
