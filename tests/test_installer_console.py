"""The installer console in Debian's Chromium against a real simulated station process.

The installer's phone pairs with an installer code, draws a privacy zone with pointer
events on the still picture, gets a wrong value (a pin already used) refused next to its
field, pulses the mock relay through the verifier with its authenticator code, and ends
its own access at hand-off; the strict CSP holds throughout.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pyotp
import pytest
from playwright.sync_api import Page

from intercom.privacy.zones import rasterise
from tests.browser import SimStation, chromium, new_device, pair_device, wait_call_state
from tests.mosquitto import Broker
from tests.test_configwriter import CONFIG

QUARTER = [(0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (0.0, 1.0)]  # the lower-left quarter


@pytest.fixture
def station(tmp_path: Path) -> Iterator[SimStation]:
    config = tmp_path / "intercom.toml"
    config.write_text(CONFIG + "\n[hardware.door_contact]\npin = 22\n")
    sim = SimStation(tmp_path / "state", ("--config", str(config)))
    try:
        yield sim
    finally:
        sim.stop()


def pair_installer(page: Page, station: SimStation) -> str:
    """Open an installer pairing link, pair, enrol; the TOTP URI the page showed."""
    answer = station.request({"request": "pair-installer"})
    assert answer.get("ok"), answer
    page.goto(answer["url"])
    page.wait_for_selector("#screen-pair:not([hidden])")
    page.click("#pair-go")
    page.wait_for_selector("#screen-enrol:not([hidden])")
    uri = page.text_content("#enrol-uri") or ""
    assert uri.startswith("otpauth://totp/")
    page.click("#enrol-done")
    page.wait_for_selector("body[data-console='ready']", timeout=15000)
    page.wait_for_selector("#zone-picture[data-zones]", timeout=15000)
    return uri


def draw(page: Page, zone: list[tuple[float, float]]) -> None:
    """Tap each corner on the picture (pointer events), then close the zone."""
    page.locator("#zone-stage").scroll_into_view_if_needed()
    box = page.locator("#zone-canvas").bounding_box()
    assert box is not None
    for x, y in zone:
        page.mouse.click(box["x"] + min(x * box["width"], box["width"] - 0.5),
                         box["y"] + min(y * box["height"], box["height"] - 0.5))
    page.wait_for_selector(f"#zone-canvas[data-points='{len(zone)}']")
    page.click("#zone-close")


def zone_is_drawn_and_masked(page: Page, station: SimStation, tmp_path: Path) -> None:
    """A zone drawn by pointer, saved through the config writer, masked at once."""
    draw(page, QUARTER)
    page.click("#zone-save")
    page.wait_for_selector("#zones-result:has-text('Saved')")
    page.wait_for_selector("#zone-picture[data-zones='1']")
    png = tmp_path / "preview.png"
    done = subprocess.run(
        [sys.executable, "-m", "intercom", "privacy", "preview", "--out", str(png),
         "--state-dir", str(station.state_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    image = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2GRAY)
    h, w = image.shape
    inner = rasterise([[(0.03, 0.53), (0.47, 0.53), (0.47, 0.97), (0.03, 0.97)]], w, h)
    assert image[inner].max() < 40, "the drawn zone is masked in the preview"
    assert image[~rasterise([QUARTER], w, h)].mean() > 60


def saved_zones(station: SimStation) -> list[list[list[float]]]:
    """The zones in the station's config file, as the config writer reads it."""
    answer = station.request({"request": "config-get"})
    assert answer.get("ok"), answer
    zones: list[list[list[float]]] = answer["config"]["privacy"]["zones"]
    return zones


def corner_is_moved_then_removed(page: Page, station: SimStation) -> None:
    """Drag a saved zone's corner elsewhere; then tap it and remove it."""
    box = page.locator("#zone-canvas").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.5 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.4 * box["height"], steps=5)
    page.mouse.up()
    assert page.get_attribute("#zone-canvas", "data-selected") == "0:1"
    page.click("#zone-save")
    page.wait_for_function("() => document.querySelector('#zones-result').textContent"
                           ".startsWith('Saved')")
    moved = saved_zones(station)[0]
    assert moved[1] == pytest.approx([0.6, 0.4], abs=0.01)
    page.mouse.click(box["x"] + 0.6 * box["width"], box["y"] + 0.4 * box["height"])
    page.click("#zone-undo")
    page.click("#zone-save")
    page.wait_for_function("() => document.querySelector('#zone-picture').dataset.zones === '1'"
                           " && document.querySelector('#zones-result').textContent"
                           ".startsWith('Saved')")
    for _ in range(50):
        if len(saved_zones(station)[0]) == 3:
            break
        time.sleep(0.05)
    assert saved_zones(station)[0] == [moved[0], moved[2], moved[3]]


def refusal_of(page: Page, key: str) -> str:
    """The text shown next to the field of ``key``, once there is one."""
    selector = f'[data-error-for="{key}"]'
    page.wait_for_function(f"() => document.querySelector('{selector}').textContent.length")
    return page.text_content(selector) or ""


def relay_is_pulsed(page: Page, station: SimStation, uri: str) -> None:
    """The installer's signed unlock energises the mock relay; the door contact confirms."""
    page.fill("#relay-totp", pyotp.parse_uri(uri).now())
    page.click("#relay-go")
    station.wait("the relay energised", lambda s: s["lock"] == "unlocked")
    station.request({"request": "sim", "action": "open-door"})
    page.wait_for_selector("#relay-result[data-result='granted']")
    assert page.text_content("#relay-result") == "Relay granted; door: opened."
    assert station.events("UnlockGranted")[-1]["via"] == "console"


def broker_is_tested(page: Page, tmp_path: Path) -> None:
    """The broker connection test against a real Mosquitto, then a bad port refused."""
    broker = Broker(tmp_path / "broker")
    broker.start()
    try:
        page.fill("#mqtt-host", "127.0.0.1")
        page.fill("#mqtt-port", str(broker.port))
        page.click("#mqtt-test")
        page.wait_for_selector("#mqtt-result[data-ok='true']")
    finally:
        broker.kill()
    page.fill("#mqtt-port", "not a port")
    page.click("#mqtt-test")
    assert refusal_of(page, "mqtt.port")


def test_installer_sets_up_the_door_from_a_phone(station: SimStation, tmp_path: Path):
    violations: list[str] = []
    with chromium(station.url) as browser:
        context, page = new_device(browser, station.url)
        page.on("console", lambda m: violations.append(m.text)
                if "Content Security Policy" in m.text else None)
        page.on("pageerror", lambda exc: violations.append(str(exc)))
        uri = pair_installer(page, station)
        station.press()  # at the door: the console shows the press and ticks the button
        page.wait_for_selector("[data-pressed-for='bell'][data-pressed='true']", timeout=10000)
        assert page.is_checked("#check-buttons")
        zone_is_drawn_and_masked(page, station, tmp_path)
        corner_is_moved_then_removed(page, station)
        page.check("#redact")  # face redaction for every output, from the next start
        page.wait_for_selector("#zones-result:has-text('takes effect when the station restarts')")
        config = station.request({"request": "config-get"})["config"]
        assert config["privacy"]["redact_all_outputs"] is True

        # A wrong value is refused next to its field.
        page.fill("#button-0-pin", "27")
        page.click("#buttons-save")
        assert refusal_of(page, "hardware.buttons[0].pin") == (
            "pin 27 is already used by hardware.relay.pin")

        relay_is_pulsed(page, station, uri)

        # The audio check: the door microphone's level moves the meter; a tone plays.
        page.click("#mic-go")
        page.wait_for_selector("#mic-result[data-peak]")
        assert float(page.get_attribute("#mic-result", "data-peak") or 0) > 0.1
        page.click("#mic-go")
        page.click("#tone-go")
        page.wait_for_selector("#tone-result[data-played='true']")
        broker_is_tested(page, tmp_path)

        # The residents' pairing sheets, as a PDF the phone can open and print.
        page.click("#sheets-go")
        page.wait_for_selector("#sheets-result[data-flats='1']")
        assert (page.get_attribute("#sheets-link", "href") or "").startswith("blob:")
        assert page.get_attribute("#sheets-link", "download") == "pairing-sheets.pdf"
        assert page.is_visible("#sheets-link")

        # Hand-off ends installer access at once: the phone's next request is refused.
        for item in ("zones", "buttons", "relay", "clock", "sheets"):
            page.check(f"#check-{item}")
        page.click("#handoff-go")
        page.wait_for_selector("body[data-handoff='confirmed']", timeout=10000)
        assert "refuses this phone now" in (page.text_content("#none-why") or "")
        context.close()
    assert violations == []
    time.sleep(0.1)
    assert station.events("PrincipalRevoked")


def test_residents_see_the_name_the_installer_gave_their_button(station: SimStation):
    """A label typed in the console is on the ring screen of the flat's resident."""
    with chromium(station.url) as browser:
        context, page = new_device(browser, station.url)
        pair_installer(page, station)
        page.fill("#button-0-label", "Main entrance")
        page.click("#buttons-save")
        page.wait_for_selector("#buttons-result:text-is('Saved.')")  # applied at once
        assert page.input_value("#button-0-label") == "Main entrance"  # as the station says
        resident_context, resident = new_device(browser, station.url)
        pair_device(resident, station.pair_link("1"))
        station.press()
        wait_call_state(resident, "ringing")
        assert resident.text_content("#call-state") == "Main entrance: someone is at the door"
        resident_context.close()
        context.close()
    config = station.request({"request": "config-get"})["config"]
    assert config["hardware"]["buttons"][0]["label"] == "Main entrance"


# The live picture's pixels inside the lower-left quarter (inset from its edges, where
# the video's compression blurs the mask's border): their spread and mean, 0..255.
SAMPLE_QUARTER = """() => {
  const video = document.querySelector("#zone-video");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(video, 0, 0);
  const x = Math.round(canvas.width * 0.06), y = Math.round(canvas.height * 0.56);
  const w = Math.round(canvas.width * 0.38), h = Math.round(canvas.height * 0.38);
  const data = ctx.getImageData(x, y, w, h).data;
  let low = 255, high = 0, sum = 0;
  for (let i = 0; i < data.length; i += 4) {
    for (const v of [data[i], data[i + 1], data[i + 2]]) {
      low = Math.min(low, v); high = Math.max(high, v); sum += v;
    }
  }
  return { spread: high - low, mean: sum / (data.length / 4 * 3) };
}"""
FRAMES = "() => document.querySelector('#zone-video').getVideoPlaybackQuality().totalVideoFrames"


def test_the_console_shows_the_door_live_and_a_saved_zone_masked_in_it(station: SimStation):
    """The live picture is a session of the redacted live view (WHEP off: /whep is 404)."""
    with chromium(station.url) as browser:
        context, page = new_device(browser, station.url)
        pair_installer(page, station)
        page.click("#zone-live")
        page.wait_for_selector("#zone-video[data-live='playing']", timeout=20000)
        page.wait_for_function("() => document.querySelector('#zone-video').videoWidth > 0")
        assert page.evaluate("() => document.querySelector('#zone-video').videoWidth") == 640
        assert page.is_hidden("#zone-picture")
        whep = page.evaluate("async () => (await fetch('/whep', {method: 'POST'})).status")
        assert whep == 404  # [whep] is off: the console's view is no public endpoint
        first = page.evaluate(FRAMES)
        page.wait_for_function(f"() => ({FRAMES})() >= {first + 10}", timeout=20000)
        assert page.evaluate(SAMPLE_QUARTER)["spread"] > 100  # colour bars, not masked
        [session] = station.status()["whep"]["sessions"]
        assert (session["via"], session["connected"]) == ("console", True)
        started = station.events("LiveViewStarted")
        assert [(e["via"], e["principal"]) for e in started] == [("console",
                                                                 session["principal"])]

        draw(page, QUARTER)  # on the canvas over the live video
        page.click("#zone-save")
        page.wait_for_selector("#zones-result:has-text('Saved')")
        page.wait_for_function(f"() => ({SAMPLE_QUARTER})().spread < 24", timeout=10000)
        masked = page.evaluate(SAMPLE_QUARTER)
        assert masked["mean"] < 24, masked  # uniform black (Y 16: RGB 0)
        assert page.evaluate(FRAMES) > first + 10
        assert page.is_visible("#zone-canvas")

        # The hand-off ends the installer's access, and its live picture with it.
        for item in ("zones", "buttons", "relay", "clock", "sheets"):
            page.check(f"#check-{item}")
        page.click("#handoff-go")
        page.wait_for_selector("body[data-handoff='confirmed']", timeout=10000)
        station.wait("the live view ended", lambda s: s["whep"]["sessions"] == [])
        context.close()
    ended = station.events("LiveViewEnded")
    # One session, ended once: by the page leaving it before the hand-off (its request or
    # its closed connection, whichever the station sees first), or by the revocation.
    [reason] = [e["reason"] for e in ended]
    assert reason in {"ended by the viewer", "connection lost", "principal revoked"}
