"""The managers' redacted live view over WHEP: real aiortc viewers, a real face, real log.

The camera is the station's file source playing scikit-image's astronaut; what a viewer
receives is judged by scikit-image's own face detector (not the station's OpenCV one).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import av
import cv2
import numpy as np
import pytest
from joserfc.jwk import OKPKey

from intercom.config import Settings
from intercom.security import command
from intercom.security.principals import Role
from intercom.station import Station

from . import test_calls_client as kit
from .conftest import INTERCOM
from .test_calls_client import Device, pinned
from .test_privacy_peer import consume_keeping_frames, rung_frame
from .test_remote import SECRET, loopback_coturn, secret_file
from .test_security_kit import Signer, add_principal
from .whepkit import FaceDetector, Viewer, astronaut_video, whep_settings

devices = kit.devices
pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return astronaut_video(tmp_path_factory.mktemp("camera") / "astronaut.mkv")


@pytest.fixture
async def whep_station(tmp_path: Path, video: Path) -> AsyncIterator[Station]:
    station = Station(whep_settings(tmp_path / "state", video, max_viewers=2))
    await station.start()
    yield station
    await station.stop("test finished")


@pytest.fixture
async def viewers() -> AsyncIterator[list[Viewer]]:
    made: list[Viewer] = []
    yield made
    for viewer in made:
        await viewer.close()


def bearer(signer: Signer, station: str, **kw: Any) -> str:
    assert isinstance(signer.key, OKPKey)
    kw.setdefault("scope", "whep")
    kw.setdefault("lifetime", 3600)
    return command.sign_bearer(signer.key, kid=signer.pid, station=station, **kw)


def viewer_of(station: Station, made: list[Viewer]) -> Viewer:
    assert station.calls is not None
    viewer = Viewer(station.calls.url, pinned(station))
    made.append(viewer)
    return viewer


def logged(station: Station, kind: str) -> list[dict[str, Any]]:
    """The event log's records of one type, as ``intercom log show --json`` prints them."""
    shown = subprocess.run(
        [*INTERCOM, "log", "show", "--json", "--type", kind,
         "--state-dir", str(station.state_dir)],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]


def assert_redacted(detector: FaceDetector, sent: Any, received: list[Any]) -> None:
    """Her face is in no received frame, and its box is pixelated in every one."""
    assert [i for i, frame in enumerate(received) if detector.hers(frame)] == [], (
        "her face in received frames")
    sharp = detector.detail(sent)
    blurred = [round(detector.detail(frame), 1) for frame in received]
    assert max(blurred) < sharp / 2, (sharp, blurred)


async def wait_until(check: Any, what: str, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        await asyncio.sleep(0.05)


async def test_whep_is_off_unless_configured(station: Station, viewers: list[Viewer]):
    assert station.registry is not None
    manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
    status, _, _ = await viewer_of(station, viewers).post(bearer(manager, station.id))
    assert status == 404
    assert "whep" not in station.status()


async def test_a_manager_sees_the_door_redacted_while_a_resident_sees_it_as_it_is(
    whep_station: Station, viewers: list[Viewer], devices: list[Device], monkeypatch,
):
    station = whep_station
    assert station.registry is not None
    assert station.masked is not None
    detector = FaceDetector()
    # The sender's frames (what the station's camera gives every output): her face is there.
    sent = [await station.masked.next() for _ in range(3)]
    assert all(len(detector.hers(frame)) == 1 for frame in sent)

    manager = await add_principal(station.registry, time.time, "mgr-1", Role.MANAGER)
    viewer = viewer_of(station, viewers)
    status, headers, answer = await viewer.post(bearer(manager, station.id))
    assert status == 201, answer
    assert headers["Content-Type"].startswith("application/sdp")
    assert headers["Location"].startswith("/whep/sessions/")
    assert "a=candidate:" in answer, "the answer carries the station's candidates (no trickle)"
    # A resident rung beside the viewer gets the door as it is: her face, unredacted.
    monkeypatch.setattr(Device, "_consume", consume_keeping_frames)
    _phone, rung = await rung_frame(station, devices, "bell")
    assert len(detector.hers(rung)) == 1, "the resident sees the visitor's face"

    await viewer.wait_frames(30)
    received = list(viewer.frames)
    assert len(received) >= 30
    assert (received[-1].width, received[-1].height) == (640, 480)
    centre = received[-1].to_ndarray(format="gray")[:, 80:560]
    assert centre.mean() > 60, "the picture arrives (only the face is pixelated)"
    assert_redacted(detector, sent[0], received)

    (session,) = station.status()["whep"]["sessions"]
    assert session["principal"] == "mgr-1"
    assert session["connected"] is True
    assert headers["Location"].removeprefix("/whep/sessions/") not in json.dumps(
        station.status()), "the session's URL is its capability: not in status"
    assert await viewer.request("PATCH", headers["Location"]) == 405
    assert await viewer.request("DELETE", headers["Location"]) == 200
    assert await viewer.request("DELETE", headers["Location"]) == 404
    assert station.status()["whep"]["sessions"] == []

    assert station.eventlog is not None
    await station.eventlog.flush()
    (started,) = logged(station, "LiveViewStarted")
    (ended,) = logged(station, "LiveViewEnded")
    assert started["details"]["principal"] == ended["details"]["principal"] == "mgr-1"
    assert started["details"]["view"] == ended["details"]["view"] == session["view"]
    assert ended["details"]["reason"] == "ended by the viewer"
    # in order in the log, and the end names the session's own start (as status showed it)
    assert started["seq"] < ended["seq"]
    assert ended["details"]["started_at"] == session["since"]


async def test_an_h264_camera_is_decoded_redacted_and_seen(
    tmp_path: Path, video: Path, viewers: list[Viewer]
):
    """The camera hands out H.264 (encode-once here; picamera2 and passthrough on a Pi):
    the live view decodes it before redacting, and the viewer sees the door."""
    data = whep_settings(tmp_path / "state", video).model_dump(mode="json")
    data["media"]["camera"]["encode_once"] = True
    station = Station(Settings.model_validate(data))
    await station.start()
    try:
        assert station.registry is not None
        manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
        viewer = viewer_of(station, viewers)
        status, _, answer = await viewer.post(bearer(manager, station.id))
        assert status == 201, answer
        await viewer.wait_frames(20)
        received = list(viewer.frames)
        assert (received[-1].width, received[-1].height) == (640, 480)
        assert received[-1].to_ndarray(format="gray")[:, 80:560].mean() > 60
        with av.open(str(video)) as played:  # the picture the camera encodes
            sent = next(played.decode(video=0))
        assert len(FaceDetector().hers(sent)) == 1
        assert_redacted(FaceDetector(), sent, received)
    finally:
        await station.stop("test finished")


async def test_only_an_active_manager_bearer_for_whep_gets_an_answer(
    whep_station: Station, viewers: list[Viewer],
):
    station = whep_station
    registry = station.registry
    assert registry is not None
    manager = await add_principal(registry, time.time, "mgr", Role.MANAGER)
    resident = await add_principal(registry, time.time, "res", Role.RESIDENT)
    gone = await add_principal(registry, time.time, "mgr-gone", Role.MANAGER)
    revoked = bearer(gone, station.id)
    await registry.revoke("mgr-gone", "test")
    good = bearer(manager, station.id)
    unauthorised = {
        "no header": None,
        "garbled": "not-a-token",
        "signed by someone else": bearer(manager, station.id)[:-8] + "AAAAAAAA",
        "a metrics bearer": bearer(manager, station.id, scope="metrics"),
        "another station's": bearer(manager, "elsewhere"),
        "longer than max_bearer_hours": bearer(manager, station.id, lifetime=25 * 3600),
        "expired": bearer(manager, station.id, lifetime=60, now=time.time() - 3600),
        "an unlock command": manager.token(station=station.id),
    }
    for what, token in unauthorised.items():
        status, headers, _ = await viewer_of(station, viewers).post(token)
        assert status == 401, what
        assert headers["WWW-Authenticate"].startswith("Bearer"), what
    for what, token in {"a resident's": bearer(resident, station.id),
                        "a revoked manager's": revoked}.items():
        status, _, _ = await viewer_of(station, viewers).post(token)
        assert status == 403, what
    status, _, _ = await viewer_of(station, viewers).post(good, content_type="text/plain")
    assert status == 415
    status, _, _ = await viewer_of(station, viewers).post(good, body="v=0\r\nm=application 9")
    assert status == 400
    # The token goes in the header only, unless [whep] query_token is switched on.
    status, _, _ = await viewer_of(station, viewers).post(None, query=f"?access_token={good}")
    assert status == 401
    assert station.status()["whep"]["sessions_started"] == 0
    # max_viewers = 2: a third is turned away while two watch.
    for _ in range(2):
        assert (await viewer_of(station, viewers).post(good))[0] == 201
    status, headers, _ = await viewer_of(station, viewers).post(good)
    assert status == 503
    assert "Retry-After" in headers
    assert station.status()["whep"]["viewers"] == 2


async def test_revoking_the_manager_ends_the_session_at_once(
    whep_station: Station, viewers: list[Viewer],
):
    station = whep_station
    assert station.registry is not None
    assert station.liveview is not None
    manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
    other = await add_principal(station.registry, time.time, "mgr-2", Role.MANAGER)
    watching = viewer_of(station, viewers)
    assert (await watching.post(bearer(manager, station.id)))[0] == 201
    staying = viewer_of(station, viewers)
    assert (await staying.post(bearer(other, station.id)))[0] == 201
    await watching.wait_frames(5)
    await station.registry.revoke("mgr", "test")
    await wait_until(lambda: station.status()["whep"]["viewers"] == 1, "session ended")
    (session,) = station.status()["whep"]["sessions"]
    assert session["principal"] == "mgr-2"
    await wait_until(lambda: watching.pc.connectionState in {"closed", "failed"},
                     "the revoked viewer's connection closed", timeout=40)
    before = staying.count
    await staying.wait_frames(before + 10)  # the other manager still watches
    assert station.eventlog is not None
    await station.eventlog.flush()
    (ended,) = logged(station, "LiveViewEnded")
    assert ended["details"]["principal"] == "mgr"
    assert ended["details"]["reason"] == "principal revoked"


async def test_a_bearer_in_the_query_when_allowed_and_sessions_end_with_the_station(
    tmp_path: Path, video: Path, viewers: list[Viewer],
):
    station = Station(whep_settings(tmp_path / "state", video, query_token=True))
    await station.start()
    try:
        assert station.registry is not None
        manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
        viewer = viewer_of(station, viewers)
        status, _, _ = await viewer.post(None, query=f"?access_token={bearer(manager, station.id)}")
        assert status == 201
        await viewer.wait_frames(5)
    finally:
        await station.stop("test finished")
    (ended,) = logged(station, "LiveViewEnded")
    assert ended["details"]["reason"] == "station stopping"


async def test_the_session_ends_when_its_bearer_expires(
    whep_station: Station, viewers: list[Viewer],
):
    station = whep_station
    assert station.registry is not None
    assert station.liveview is not None
    manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
    # Issued 3600 s minus 2 s ago for an hour: valid now, expired 2 s from now (+ skew).
    issued = int(time.time()) - 3598
    token = bearer(manager, station.id, lifetime=3600, now=issued)
    viewer = viewer_of(station, viewers)
    assert (await viewer.post(token))[0] == 201
    (session,) = station.status()["whep"]["sessions"]
    assert session["bearer_expires"] == issued + 3600  # the token's own exp
    await wait_until(lambda: station.status()["whep"]["viewers"] == 0, "expiry", timeout=10)
    assert station.eventlog is not None
    await station.eventlog.flush()
    (ended,) = logged(station, "LiveViewEnded")
    assert ended["details"]["reason"] == "bearer expired"


async def test_a_session_that_never_connects_is_not_kept(
    whep_station: Station, monkeypatch,
):
    """An offer whose client goes away at once: the slot comes back, logged."""
    from intercom.calls import whep  # noqa: PLC0415

    monkeypatch.setattr(whep, "CONNECT_TIMEOUT_S", 0.5)
    station = whep_station
    assert station.registry is not None
    assert station.calls is not None
    manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
    viewer = Viewer(station.calls.url, pinned(station))
    offer = await viewer.offer()
    await viewer.close()  # nobody will answer the station's checks
    async with (
        aiohttp.ClientSession() as http,
        http.post(station.calls.url + "whep", data=offer.encode(), ssl=pinned(station),
                  headers={"Content-Type": "application/sdp",
                           "Authorization": f"Bearer {bearer(manager, station.id)}"}) as r,
    ):
        assert r.status == 201
    await wait_until(lambda: station.status()["whep"]["viewers"] == 0, "slot back", timeout=10)
    assert station.eventlog is not None
    await station.eventlog.flush()
    (ended,) = logged(station, "LiveViewEnded")
    assert ended["details"]["reason"] in {"never connected", "connection lost"}


async def test_with_the_relay_ice_policy_the_answer_offers_only_the_relay(
    tmp_path: Path, video: Path, viewers: list[Viewer]
):
    """``web.ice_policy = "relay"``: the station's end of a viewer's connection, as of a
    resident's, offers only its TURN relay (Debian's coturn on loopback), no host address."""
    with loopback_coturn(tmp_path / "coturn", SECRET) as port:
        data = whep_settings(tmp_path / "state", video).model_dump(mode="json")
        data["web"]["turn"] = {"urls": [f"turn:127.0.0.1:{port}?transport=udp"],
                               "secret_file": str(secret_file(tmp_path)), "ttl_s": 600}
        data["web"]["ice_policy"] = "relay"
        station = Station(Settings.model_validate(data))
        await station.start()
        try:
            assert station.registry is not None
            manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
            status, _, answer = await viewer_of(station, viewers).post(
                bearer(manager, station.id))
            assert status == 201, answer
            candidates = [line for line in answer.splitlines() if line.startswith("a=candidate:")]
            assert candidates, answer
            assert all(" typ relay " in line for line in candidates), candidates
        finally:
            await station.stop("test finished")


PAGE = """<!doctype html>
<meta charset="utf-8"><title>WHEP</title>
<video autoplay muted playsinline></video>
<script>
async function watch(token) {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", {direction: "recvonly"});
  const video = document.querySelector("video");
  pc.ontrack = (e) => { video.srcObject = new MediaStream([e.track]); };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
  });
  const res = await fetch("/whep", {method: "POST", body: pc.localDescription.sdp,
    headers: {"Content-Type": "application/sdp", "Authorization": "Bearer " + token}});
  if (res.status !== 201) return res.status;
  window.session = res.headers.get("Location");
  await pc.setRemoteDescription({type: "answer", sdp: await res.text()});
  window.pc = pc;
  return res.status;
}
async function decoded() {
  let frames = 0;
  (await window.pc.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") frames = s.framesDecoded || 0;
  });
  return frames;
}
function shown() {  // the picture the page presents now, as PNG
  const video = document.querySelector("video");
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [video.videoWidth, video.videoHeight];
  canvas.getContext("2d").drawImage(video, 0, 0);
  return canvas.toDataURL("image/png");
}
</script>
"""


async def test_chromium_watches_through_a_plain_whep_page(whep_station: Station, video: Path):
    """Debian's Chromium, a page of the station's origin (served by the test) speaking WHEP."""
    from playwright.async_api import async_playwright  # noqa: PLC0415

    from .browser import CHROMIUM, CHROMIUM_ARGS, trusting_home  # noqa: PLC0415

    station = whep_station
    assert station.registry is not None
    assert station.calls is not None
    assert station.calls.cert is not None
    assert station.calls.cert.ca_der is not None
    manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
    resident = await add_principal(station.registry, time.time, "res", Role.RESIDENT)
    page_url = station.calls.url + "test-whep-viewer.html"  # only this test's route serves it
    with trusting_home(station.calls.cert.ca_der) as home:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                              env={**os.environ, "HOME": str(home)})
            try:
                page = await browser.new_page()
                await page.route(page_url, lambda route: route.fulfill(
                    status=200, content_type="text/html", body=PAGE))
                await page.goto(page_url)
                assert await page.evaluate("watch", bearer(resident, station.id)) == 403
                assert await page.evaluate("watch", bearer(manager, station.id)) == 201
                await page.wait_for_function(
                    "() => document.querySelector('video').videoWidth > 0", timeout=20000)
                assert await page.evaluate(
                    "() => document.querySelector('video').videoWidth") == 640
                await page.wait_for_function("async () => (await decoded()) >= 20",
                                             timeout=20000, polling=200)
                shown = []
                for _ in range(5):  # what the page presents: her face pixelated
                    url = await page.evaluate("shown")
                    png = base64.b64decode(url.split(",", 1)[1])
                    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
                    shown.append(av.VideoFrame.from_ndarray(bgr, format="bgr24"))
                    await asyncio.sleep(0.2)
                deleted = await page.evaluate(
                    "async () => (await fetch(window.session, {method: 'DELETE'})).status")
                assert deleted == 200
            finally:
                await browser.close()
    assert station.status()["whep"]["sessions"] == []
    assert station.status()["whep"]["sessions_started"] == 1
    with av.open(str(video)) as played:
        sent = next(played.decode(video=0))
    assert_redacted(FaceDetector(), sent, shown)
