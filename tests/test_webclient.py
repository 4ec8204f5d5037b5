"""The resident web client in Debian's Chromium against a real simulated station process."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from playwright.sync_api import Browser, Page

from .browser import (
    PHONE,
    SimStation,
    ca_fingerprint,
    chromium,
    new_device,
    pair_device,
    tone_wav,
    wait_call_state,
)
from .conftest import INTERCOM

WEB = Path(__file__).resolve().parent.parent / "intercom" / "web"


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimStation]:
    st = SimStation(tmp_path_factory.mktemp("webclient") / "state")
    yield st
    st.stop()


@pytest.fixture(scope="module")
def browser(station: SimStation) -> Iterator[Browser]:
    tone = tone_wav(station.state_dir.parent / "voice.wav")  # a steady fake microphone
    with chromium(station.url, (f"--use-file-for-fake-audio-capture={tone}",)) as b:
        yield b


@pytest.fixture(scope="module")
def resident(station: SimStation, browser: Browser) -> Iterator[dict[str, Any]]:
    """One paired device of flat 1: its page, its TOTP generator and what pairing showed."""
    context, page = new_device(browser, station.url)
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    link = station.pair_link("1")
    enrolment = pair_device(page, link)
    yield {
        "page": page,
        "link": link,
        "totp": pyotp.parse_uri(enrolment["totp_uri"]),
        "enrolment": enrolment,
        "errors": errors,
    }
    context.close()


STORED_KEY = """() => new Promise((resolve) => {
    const open = indexedDB.open('intercom', 1);
    open.onsuccess = () => {
      const get = open.result.transaction('device').objectStore('device').get('device');
      get.onsuccess = () => resolve({
        type: get.result.privateKey.type,
        extractable: get.result.privateKey.extractable,
        alg: get.result.alg,
      });
    };
  })"""


def stored_key(page: Page) -> dict[str, Any]:
    """What IndexedDB holds about the device key (never the key bytes: it cannot)."""
    result: dict[str, Any] = page.evaluate(STORED_KEY)
    return result


def stats(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = page.evaluate("window.intercom.stats()")
    return result


def wait_stats(page: Page, check: Any, what: str, timeout: float = 20) -> dict[str, Any]:
    """The page's call statistics once ``check`` holds for them (bounded)."""
    deadline = time.monotonic() + timeout
    while not check(current := stats(page)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {current}"
        page.wait_for_timeout(100)
    return current


def speaker(station: SimStation) -> dict[str, int]:
    return dict(station.status()["speaker"])


def wait_idle_station(station: SimStation) -> None:
    station.wait("idle station", lambda s: s["call"] == "idle")


def ring_and_answer(station: SimStation, page: Page) -> None:
    """Press the bell and answer on ``page``: the call is on."""
    wait_idle_station(station)
    station.press()
    wait_call_state(page, "ringing")
    page.click("#btn-answer")
    wait_call_state(page, "in_call")


def wrong_code(totp: pyotp.TOTP) -> str:
    now = time.time()
    near = {totp.at(now + step * 30) for step in (-2, -1, 0, 1, 2)}
    return next(c for c in (f"{n:06d}" for n in range(0, 10**6, 111_111)) if c not in near)


def test_pairing_shows_the_fingerprint_and_the_enrolment_once(station, resident):
    page, enrolment = resident["page"], resident["enrolment"]
    expected = ca_fingerprint(station.url)
    assert enrolment["fingerprint"].replace(":", "").lower() == expected
    assert enrolment["totp_uri"].startswith("otpauth://totp/")
    assert resident["totp"].secret  # the URI is a real enrolment
    assert enrolment["qr_src"].startswith("data:image/svg+xml;base64,")
    # the code is spent and not kept in the address; the enrolment is gone from the page
    assert "#pair=" not in page.url
    assert page.text_content("#enrol-uri") == ""
    assert page.is_visible("#screen-home")


def test_a_used_pairing_link_is_refused(station, browser, resident):
    context, page = new_device(browser, station.url)
    try:
        page.goto(resident["link"])
        page.wait_for_selector("#screen-pair:not([hidden])")
        page.click("#pair-go")
        page.wait_for_function("() => document.querySelector('#pair-error').textContent.length > 0")
        error = page.text_content("#pair-error") or ""
        assert error.startswith("pairing code invalid or expired")
        # what to do next, and why the link failed
        assert "Ask your installer or building manager for a new pairing link" in error
        assert "works once, and for 10 minutes" in error
        assert page.is_visible("#screen-pair")
        assert page.text_content("#link-state") == "not paired"
        assert not page.is_visible("#pair-home")  # this device was never paired
    finally:
        context.close()


def test_a_paired_device_opening_its_spent_link_is_shown_the_way_home(station, resident):
    page = resident["page"]
    wait_idle_station(station)
    page.goto(resident["link"])
    page.wait_for_selector("#screen-pair:not([hidden])")
    page.click("#pair-go")
    page.wait_for_selector("#pair-home:not([hidden])")
    assert "new pairing link" in (page.text_content("#pair-error") or "")
    page.click("#pair-home a")
    page.wait_for_selector("body[data-link='online']", timeout=20000)
    assert page.is_visible("#screen-home")


def test_ring_preview_answer_audio_and_unlock(station, resident, tmp_path: Path):
    page, totp = resident["page"], resident["totp"]
    wait_idle_station(station)
    # The standing connection is up before the ring (a test before this one may have
    # just made the page sign in again: its fresh connection may still be connecting).
    before = wait_stats(page, lambda s: s["dtlsState"] == "connected", "DTLS connected")
    # idle: the video's gate is closed and the audio section inactive: nothing received
    assert set(before["streams"]) == {"video"}, before
    assert before["framesDecoded"] == 0
    heard_before = speaker(station)["audible_frames"]

    station.press()
    wait_call_state(page, "ringing")
    # the preview plays before anyone answers: frames decoded and presented
    page.wait_for_function(
        "() => window.intercom.stats().then(s => s.framesDecoded > 3)", timeout=5000
    )
    ring = page.evaluate("window.intercom.rings.at(-1)")
    assert page.evaluate(f"window.intercom.frames.some(t => t >= {ring['at']} - 1000)")
    assert page.is_visible("#btn-answer")
    assert speaker(station)["audible_frames"] == heard_before  # no audio until answered
    # and nothing at all leaves the page for the door before that, not even the silence
    # of a disabled microphone (a building's idle devices would flood the station)
    assert (stats(page).get("audioBytesSent") or 0) == 0
    page.screenshot(path=str(tmp_path / "ringing.png"))

    page.click("#btn-answer")
    wait_call_state(page, "in_call")
    # two-way audio: the door's microphone reaches the page, the fake mic reaches the door
    page.wait_for_function(
        "() => window.intercom.stats().then(s => (s.audioBytesReceived ?? 0) > 2000)", timeout=5000
    )
    station.wait(
        "resident audio at the door",
        lambda s: s["speaker"]["audible_frames"] > heard_before + 5,
    )
    during = stats(page)
    assert during["dtlsState"] == "connected"
    # the ring renegotiated the audio on; the preview is not held back for lip sync
    # with the door audio: its own stream
    streams = during["streams"]
    assert streams["video"], streams
    assert streams["audio"], streams
    assert streams["video"] != streams["audio"]
    assert during["srtpCipher"].startswith(("SRTP_AEAD_AES", "AES_CM_128"))

    # a wrong code is refused and the relay stays off
    page.click("#btn-open")
    page.fill("#unlock-code", wrong_code(totp))
    page.click("#unlock-send")
    page.wait_for_selector("#unlock-result[data-result='denied']", timeout=10000)
    assert station.status()["lock"] == "locked"
    assert not station.events("LockStateChanged")

    # the right code pulses the relay
    page.click("#btn-open")
    page.fill("#unlock-code", totp.now())
    page.click("#unlock-send")
    page.wait_for_selector("#unlock-result[data-result='granted']", timeout=10000)
    assert page.text_content("#unlock-result") == "Door opened"
    pulse = station.wait("relay pulse", lambda _s: station.events("LockStateChanged"))
    assert pulse[0]["state"] == "unlocked"
    assert pulse[0]["reason"] == "unlock via call"

    page.click("#btn-hangup")
    wait_call_state(page, "idle")
    wait_idle_station(station)
    # the call over, the station replaces the connection by a fresh idle one
    page.wait_for_function(
        "() => window.intercom.stats().then(s => s.connection === 'connected'"
        " && s.framesDecoded === 0 && !('audio' in s.streams))",
        timeout=10000,
    )
    assert "ended" in page.text_content("#history")
    assert page.text_content("#unlock-result") == ""  # the call's result went with it
    assert not [e for e in resident["errors"] if "Content Security Policy" in e]


def test_mute_stops_audio_to_the_door(station, resident):
    page = resident["page"]
    ring_and_answer(station, page)
    start = speaker(station)["audible_frames"]
    station.wait("audio at the door", lambda s: s["speaker"]["audible_frames"] > start + 5)
    page.click("#btn-mute")
    assert page.get_attribute("#btn-mute", "aria-pressed") == "true"
    time.sleep(0.5)  # frames already on the way
    muted = speaker(station)["audible_frames"]
    time.sleep(1.5)
    assert speaker(station)["audible_frames"] == muted
    page.click("#btn-mute")
    station.wait("audio again", lambda s: s["speaker"]["audible_frames"] > muted + 5)
    page.click("#btn-hangup")
    wait_call_state(page, "idle")


def test_decline_ends_the_ring_as_missed(station, resident):
    page = resident["page"]
    wait_idle_station(station)
    missed_before = len(station.events("CallMissed"))
    station.press()
    wait_call_state(page, "ringing")
    page.click("#btn-decline")
    wait_call_state(page, "idle")
    station.wait("missed call", lambda _s: len(station.events("CallMissed")) > missed_before)
    assert page.text_content("#history").count("declined") == 1


def test_the_device_key_survives_a_reload(station, resident):
    page = resident["page"]
    wait_idle_station(station)
    page.reload()
    page.wait_for_selector("body[data-link='online']", timeout=20000)
    stored = stored_key(page)
    assert stored == {"type": "private", "extractable": False, "alg": "EdDSA"}
    station.press()
    wait_call_state(page, "ringing")
    page.click("#btn-decline")
    wait_call_state(page, "idle")


def test_the_shell_is_served_as_is_with_its_security_headers(station, resident):
    page = resident["page"]
    served = page.evaluate(
        """async () => {
            const out = {};
            for (const name of ['app.js', 'sw.js', 'manifest.webmanifest']) {
              const r = await fetch(name, {cache: 'no-store'});
              out[name] = {type: r.headers.get('content-type'),
                           csp: r.headers.get('content-security-policy'),
                           body: await r.text()};
            }
            return out;
          }"""
    )
    for name, got in served.items():
        assert got["body"] == (WEB / name).read_text(), name
        assert "default-src 'self'" in got["csp"]
    assert served["app.js"]["type"].startswith("text/javascript")
    assert served["manifest.webmanifest"]["type"] == "application/manifest+json"
    # the page is an installable PWA: its service worker runs (the station's CA is
    # installed, which a browser demands before it runs a service worker)
    worker = page.evaluate("() => navigator.serviceWorker.ready.then(r => r.active.scriptURL)")
    assert worker == station.url + "sw.js"


def test_a_revoked_device_is_refused_and_told_so(station, browser):
    context, page = new_device(browser, station.url)
    try:
        pair_device(page, station.pair_link("1"))
        principal = page.text_content("#info-principal") or ""
        revoke = subprocess.run(
            [*INTERCOM, "principals", "revoke", principal, "--state-dir", str(station.state_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert revoke.returncode == 0, revoke.stderr
        page.reload()
        page.wait_for_selector("body[data-link='refused']", timeout=20000)
        assert "refused this device" in (page.text_content("#call-state") or "")
    finally:
        context.close()


def test_a_call_cut_by_a_silent_network_ends_in_the_history_and_reconnects(station, resident):
    """The network goes quiet in a call: the page notices, ends the call in its history
    with its length (up to when the door was last seen) and why, and signs in again."""
    page = resident["page"]
    ring_and_answer(station, page)
    assert (page.text_content("#history li") or "").endswith(": answered")
    time.sleep(1.5)
    station.proc.send_signal(signal.SIGSTOP)  # no packet, no socket closes
    try:
        # coming back on screen makes the page ping; no pong within 10 s: the link is lost
        page.evaluate("() => document.dispatchEvent(new Event('visibilitychange'))")
        wait_call_state(page, "idle", timeout=15)
        assert page.text_content("#call-state") == "Call cut: connection lost"
    finally:
        station.proc.send_signal(signal.SIGCONT)
    latest = page.text_content("#history li") or ""  # newest first
    ended = re.search(r": ended \((\d+) s, connection lost\)$", latest)
    assert ended, latest
    assert 1 <= int(ended.group(1)) <= 5  # the 1.5 s it lasted, not the 10 s to notice
    page.wait_for_selector("body[data-link='online']", timeout=30000)
    wait_idle_station(station)
    station.press()
    wait_call_state(page, "ringing")
    page.click("#btn-decline")
    wait_call_state(page, "idle")


def test_a_call_left_open_by_a_reload_is_closed_at_the_next_start(station, resident):
    page = resident["page"]
    ring_and_answer(station, page)
    time.sleep(2.5)
    page.reload()  # the page goes away in the call (a crash would too)
    page.wait_for_selector("body[data-link='online']", timeout=20000)
    latest = page.text_content("#history li") or ""
    ended = re.search(r": ended \((\d+) s, interrupted\)$", latest)
    assert ended, latest
    assert 2 <= int(ended.group(1)) <= 4
    wait_idle_station(station)


NO_ED25519 = """
const generateKey = crypto.subtle.generateKey.bind(crypto.subtle);
crypto.subtle.generateKey = (algorithm, ...rest) =>
  (algorithm?.name ?? algorithm) === "Ed25519"
    ? Promise.reject(new DOMException("Ed25519 is not supported", "NotSupportedError"))
    : generateKey(algorithm, ...rest);
"""


def test_a_browser_without_ed25519_pairs_and_opens_with_p256(station, browser):
    context, page = new_device(browser, station.url)
    context.add_init_script(NO_ED25519)  # an older browser
    try:
        enrolment = pair_device(page, station.pair_link("1"))
        assert stored_key(page) == {"type": "private", "extractable": False, "alg": "ES256"}
        totp = pyotp.parse_uri(enrolment["totp_uri"])
        wait_idle_station(station)
        station.press()
        wait_call_state(page, "ringing", timeout=15)
        page.click("#btn-answer")
        wait_call_state(page, "in_call")
        page.click("#btn-open")
        page.fill("#unlock-code", totp.now())
        page.click("#unlock-send")
        page.wait_for_selector("#unlock-result[data-result='granted']", timeout=10000)
        page.click("#btn-hangup")
        wait_call_state(page, "idle")
    finally:
        context.close()


def test_the_other_device_stops_ringing_when_one_answers(station, browser, resident):
    page = resident["page"]
    context, other = new_device(browser, station.url)
    try:
        pair_device(other, station.pair_link("1"))
        wait_idle_station(station)
        station.press()
        wait_call_state(page, "ringing")
        wait_call_state(other, "ringing")
        other.click("#btn-answer")
        wait_call_state(other, "in_call")
        wait_call_state(page, "idle")
        assert page.text_content("#call-state") == "Answered on another device"
        assert "taken" in (page.text_content("#history") or "")
        other.click("#btn-hangup")
        wait_call_state(other, "idle")
    finally:
        context.close()


def test_the_ring_screen_comes_first_and_the_history_notes_the_ring_after(station, resident):
    page = resident["page"]
    wait_idle_station(station)
    station.press()
    wait_call_state(page, "ringing")
    page.wait_for_function("() => window.intercom.rings.at(-1).painted !== undefined")
    ring = page.evaluate("window.intercom.rings.at(-1)")
    assert ring["call"] == page.evaluate("window.intercom.call")
    assert ring["pressed"] <= ring["at"] <= ring["shown"] <= ring["painted"]
    # The history is noted once the ring screen had its chance to be painted.
    page.wait_for_function(
        "() => document.querySelector('#history').textContent.includes('ringing')"
    )
    station.request({"request": "hangup"})
    wait_call_state(page, "idle")
    assert (page.text_content("#history li") or "").endswith(": missed")  # the newest call


HEADER_TEXTS = """
window.__header = [];
document.addEventListener("DOMContentLoaded", () => {
  const pill = document.getElementById("link-state");
  const note = () => window.__header.push(pill.textContent);
  note();
  new MutationObserver(note).observe(pill, {childList: true, characterData: true, subtree: true});
});
"""


def test_enrolment_says_so_and_the_station_checks_the_typed_code(station, browser):
    """The header says pairing, then enrolling; the station, not the page, checks the
    code the resident types from the authenticator app, and says what to do if wrong."""
    context, page = new_device(browser, station.url)
    context.add_init_script(HEADER_TEXTS)
    try:
        page.goto(station.pair_link("1"))
        page.wait_for_selector("#screen-pair:not([hidden])")
        assert page.text_content("#link-state") == "not paired"
        page.wait_for_function(
            "() => document.querySelector('#pair-fp-check').textContent.length > 0"
        )
        page.click("#pair-go")
        page.wait_for_selector("#screen-enrol:not([hidden])")
        assert page.text_content("#link-state") == "enrolling"
        assert "pairing…" in page.evaluate("window.__header")
        totp = pyotp.parse_uri(page.text_content("#enrol-uri") or "")
        # skipping warns first, and stays on the enrolment
        page.click("#enrol-skip")
        assert page.is_visible("#enrol-skip-warning")
        assert page.text_content("#enrol-skip") == "Skip anyway"
        assert page.is_visible("#screen-enrol")
        # a failed scan: the station refuses the code, the page says what to do
        page.fill("#enrol-code", wrong_code(totp))
        page.click("#enrol-done")
        page.wait_for_selector("#enrol-error[data-result='wrong']", timeout=20000)
        advice = page.text_content("#enrol-error") or ""
        assert "Scan the QR code again" in advice
        assert "clock" in advice
        assert page.is_visible("#screen-enrol")
        assert page.text_content("#link-state") == "enrolling"
        # the code the authenticator shows now: the station says right, enrolment ends
        page.fill("#enrol-code", totp.now())
        page.click("#enrol-done")
        page.wait_for_selector("body[data-link='online']", timeout=20000)
        assert page.is_visible("#screen-home")
        assert page.text_content("#enrol-uri") == ""
        assert page.get_attribute("#enrol-qr", "src") is None
        assert page.evaluate("window.__header").index("enrolling") < page.evaluate(
            "window.__header"
        ).index("online")
    finally:
        context.close()


LAYOUT = """() => {
  const box = (el) => {
    const r = el.getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: r.height};
  };
  const lines = (el) => {
    const range = document.createRange();
    range.selectNodeContents(el);
    return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
  };
  const buttons = [...document.querySelectorAll('.actions button')]
    .filter((b) => b.offsetParent !== null)
    .map((b) => ({text: b.textContent, lines: lines(b), fits: b.scrollWidth <= b.clientWidth,
                  right: b.getBoundingClientRect().right}));
  return {video: box(document.getElementById('preview')),
          label: box(document.getElementById('call-state')),
          text: document.getElementById('call-state').textContent,
          width: document.documentElement.clientWidth, buttons};
}"""
DESKTOP = {"width": 1366, "height": 768}


def check_layout(page: Page, text: str, buttons: set[str]) -> None:
    """The state line is outside the picture; each visible button's label is one line."""
    for size in (PHONE, DESKTOP):
        page.set_viewport_size(size)
        got = page.evaluate(LAYOUT)
        video, label = got["video"], got["label"]
        assert got["text"] == text
        assert video["height"] > 100, got
        assert label["bottom"] <= video["top"] or label["top"] >= video["bottom"], (size, got)
        assert {b["text"] for b in got["buttons"]} == buttons, got
        for button in got["buttons"]:
            assert button["lines"] == 1, (size, button)
            assert button["fits"], (size, button)
            assert button["right"] <= got["width"], (size, button)
    page.set_viewport_size(PHONE)


def test_the_state_line_leaves_the_picture_and_the_buttons_fit_a_390_px_phone(
    station, resident
):
    page = resident["page"]
    wait_idle_station(station)
    station.press()
    wait_call_state(page, "ringing")
    try:
        check_layout(page, "Someone is at the door", {"Answer", "Decline"})
        page.click("#btn-answer")
        wait_call_state(page, "in_call")
        check_layout(page, "In call", {"Mute", "Open door", "Hang up"})
        page.click("#btn-mute")  # the longer label too
        check_layout(page, "In call", {"Unmute", "Open door", "Hang up"})
        page.click("#btn-mute")
    finally:
        page.set_viewport_size(PHONE)
    page.click("#btn-hangup")
    wait_call_state(page, "idle")


def test_a_refusal_goes_with_its_call(station, resident):
    page, totp = resident["page"], resident["totp"]
    ring_and_answer(station, page)
    page.click("#btn-open")
    page.fill("#unlock-code", wrong_code(totp))
    page.click("#unlock-send")
    page.wait_for_selector("#unlock-result[data-result='denied']", timeout=10000)
    assert (page.text_content("#unlock-result") or "").startswith("Refused")
    # the station ends the call: the refusal goes with it
    station.request({"request": "hangup"})
    wait_call_state(page, "idle")
    assert page.text_content("#unlock-result") == ""
    # a code sent as the call is hung up: its late answer is not shown after the call
    wait_idle_station(station)
    station.press()
    wait_call_state(page, "ringing")
    assert page.text_content("#unlock-result") == ""
    page.click("#btn-answer")
    wait_call_state(page, "in_call")
    page.click("#btn-open")
    page.fill("#unlock-code", wrong_code(totp))
    page.evaluate(
        "() => { document.getElementById('unlock-send').click();"
        " document.getElementById('btn-hangup').click(); }"
    )
    wait_call_state(page, "idle")
    time.sleep(1.5)  # a verdict would have come back by now
    assert page.text_content("#unlock-result") == ""
    assert page.get_attribute("#unlock-result", "data-result") is None
    wait_idle_station(station)
