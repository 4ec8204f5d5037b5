"""The installer console's API over the station's real HTTPS server: who may ask, and what."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pyotp
import pytest
from aiortc import RTCSessionDescription
from joserfc.jwk import OKPKey

from intercom.config import load_settings, simulated_settings
from intercom.control import request as ask_station
from intercom.events import DoorbellPressed
from intercom.media.audio import LevelSink
from intercom.privacy.zones import rasterise
from intercom.security.command import sign, sign_request
from intercom.station import Station
from tests import test_calls_client as kit
from tests import test_push as push
from tests.mosquitto import Broker, V311OnlyProxy
from tests.test_calls_client import Device, pair, pinned
from tests.test_configwriter import CONFIG
from tests.test_privacy_peer import INSIDE, ZONE, consume_keeping_frames, rung_frame
from tests.whepkit import Viewer

STATE = "api/console/state"
devices = kit.devices
push_service = push.push_service


class Installer:
    """An installer's phone: its own key, paired with an installer code."""

    def __init__(self, station: Station) -> None:
        self.station = station
        self.key = OKPKey.generate_key("Ed25519")
        self.principal = ""
        self.totp = ""

    async def pair(self) -> None:
        answer = await ask_station(self.station.state_dir, {"request": "pair-installer"})
        assert answer["url"].endswith(f"installer.html#pair={answer['code']}&fp="
                                      f"{self.station.calls.fingerprint}")  # type: ignore[union-attr]
        status, body = await post_json(self.station, "api/pair", {
            "code": answer["code"], "jwk": self.key.as_dict(private=False)})
        assert status == 200, body
        self.principal, self.totp = body["principal"], body["totp_uri"]

    async def ask(self, method: str, path: str, data: Any = None, *, sign_as: str = "",
                  token: str | None = None) -> tuple[int, dict[str, Any]]:
        body = b"" if data is None else json.dumps(data).encode()
        if token is None:
            token = sign_request(self.key, kid=self.principal, station=self.station.id,
                                 method=method, path="/" + (sign_as or path), body=body)
        return await request(self.station, method, path, body,
                             {"Authorization": f"Intercom {token}",
                              "Content-Type": "application/json"})

    def unlock(self) -> str:
        return sign(self.key, kid=self.principal, station=self.station.id, door="front",
                    totp=pyotp.parse_uri(self.totp).now())


async def request(station: Station, method: str, path: str, body: bytes,
                  headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    assert station.calls is not None
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, station.calls.url + path, data=body, headers=headers,
                     ssl=pinned(station)) as response,
    ):
        return response.status, await response.json()


async def post_json(station: Station, path: str, data: Any) -> tuple[int, dict[str, Any]]:
    return await request(station, "POST", path, json.dumps(data).encode(),
                         {"Content-Type": "application/json"})


@pytest.fixture
async def console_station(tmp_path: Path) -> AsyncIterator[Station]:
    config = tmp_path / "intercom.toml"
    config.write_text(CONFIG + "\n[hardware.door_contact]\npin = 22\n")
    station = Station(simulated_settings(tmp_path / "state", load_settings(config)),
                      config_path=config)
    await station.start()
    try:
        yield station
    finally:
        await station.stop("test finished")


async def test_only_a_signed_request_of_an_installer_is_answered(console_station):
    station = console_station
    installer = Installer(station)
    await installer.pair()
    status, state = await installer.ask("GET", STATE)
    assert status == 200, state
    assert (state["principal"], state["role"]) == (installer.principal, "installer")
    assert state["buttons"] == [{"name": "bell", "pin": 17, "flat": "1", "label": None}]

    assert (await request(station, "GET", STATE, b"", {}))[0] == 401  # no token
    # a token for another path, replayed, or for another body: refused
    assert (await installer.ask("GET", STATE, sign_as="api/console/preview"))[0] == 401
    token = sign_request(installer.key, kid=installer.principal, station=station.id,
                         method="GET", path="/" + STATE, body=b"")
    assert (await installer.ask("GET", STATE, token=token))[0] == 200
    assert (await installer.ask("GET", STATE, token=token))[0] == 401
    forged = sign_request(installer.key, kid=installer.principal, station=station.id,
                          method="POST", path="/api/console/config", body=b"{}")
    status, body = await installer.ask("POST", "api/console/config",
                                       {"changes": {"hardware.relay.pulse_s": 5}}, token=forged)
    assert (status, body) == (401, {"error": "not authorised"})

    resident = await pair(station)  # a resident's key is no installer's
    kid = resident.principal
    as_resident = Installer(station)
    as_resident.principal = kid
    assert (await as_resident.ask("GET", STATE))[0] == 401


async def test_config_change_refused_with_its_key_then_taken(console_station):
    station = console_station
    installer = Installer(station)
    await installer.pair()
    status, body = await installer.ask("POST", "api/console/config",
                                       {"changes": {"hardware.buttons[0].pin": 27}})
    assert status == 422
    assert body["refused"] == [{"key": "hardware.buttons[0].pin",
                                "reason": "pin 27 is already used by hardware.relay.pin"}]
    status, body = await installer.ask("POST", "api/console/config",
                                       {"changes": {"hardware.buttons[0].flat": "2"}})
    assert status == 200, body
    assert body["at_restart"] == ["hardware.buttons[0].flat"]
    status, state = await installer.ask("GET", STATE)
    assert state["buttons"][0]["flat"] == "2"


async def test_the_public_url_is_set_refused_and_cleared_from_the_console(console_station):
    """The console's network section: the residents' URL, through the one config writer."""
    station = console_station
    installer = Installer(station)
    await installer.pair()

    async def public_url() -> object:
        answer = await ask_station(station.state_dir, {"request": "config-get"})
        return answer["config"].get("web", {}).get("public_url")

    status, body = await installer.ask("POST", "api/console/config",
                                       {"changes": {"web.public_url": "http://door.example"}})
    assert status == 422
    assert [r["key"] for r in body["refused"]] == ["web.public_url"]
    url = "https://door.example.org/"
    status, body = await installer.ask("POST", "api/console/config",
                                       {"changes": {"web.public_url": url}})
    assert status == 200, body
    assert await public_url() == url
    status, body = await installer.ask("POST", "api/console/config",  # the field emptied
                                       {"changes": {"web.public_url": None}})
    assert status == 200, body
    assert await public_url() in (None, "")


async def test_relay_test_goes_through_the_verifier_and_waits_for_the_door(console_station):
    station = console_station
    installer = Installer(station)
    await installer.pair()
    assert station.lock is not None
    assert station.simulator is not None
    pin = station.lock.device.pin
    task = asyncio.create_task(installer.ask("POST", "api/console/relay-test",
                                             {"token": installer.unlock()}))
    for _ in range(200):
        if pin.state:
            break
        await asyncio.sleep(0.01)
    assert pin.state  # the mock relay is energised by the verifier's pulse
    await station.simulator.act("open-door")
    status, body = await task
    assert (status, body) == (200, {"result": "granted", "door": "opened"})
    granted = [e for e in station.bus.recent if e.type == "UnlockGranted"]
    assert granted[-1].details()["via"] == "console"
    # someone else's unlock handed in by this installer is denied (signer bound)
    other = Installer(station)
    await other.pair()
    status, body = await installer.ask("POST", "api/console/relay-test",
                                       {"token": other.unlock()})
    assert body["result"] == "denied"


async def test_handoff_ends_installer_access_at_once_and_is_logged(console_station):
    station = console_station
    installer = Installer(station)
    await installer.pair()
    status, body = await installer.ask("POST", "api/console/handoff",
                                       {"checklist": {"zones": True, "relay": True}})
    assert status == 200, body
    assert body["ended"] is True
    assert body["missing"] == ["buttons", "clock", "sheets"]
    assert (await installer.ask("GET", STATE))[0] == 401
    assert station.eventlog is not None
    await station.eventlog.flush()
    actions = [e.details["action"] for e in station.eventlog.read_after(0, 500)
               if e.type == "PrivilegedAction"]
    assert "installer-handoff" in actions
    assert "revoke" in actions


async def test_the_live_picture_is_an_installers_and_ends_with_the_handoff(console_station):
    """A session of the redacted live view for the console's own principal; logged."""
    station = console_station
    installer = Installer(station)
    await installer.pair()
    resident = await pair(station)
    as_resident = Installer(station)
    as_resident.principal = resident.principal
    viewer = Viewer(station.calls.url, pinned(station))  # type: ignore[union-attr]
    try:
        offer = await viewer.offer()
        assert (await as_resident.ask("POST", "api/console/live", {"sdp": offer}))[0] == 401
        status, body = await installer.ask("POST", "api/console/live", {"sdp": "v=0"})
        assert (status, body["error"]) == (400, "offer must receive video (audio optional)")
        status, body = await installer.ask("POST", "api/console/live", {"sdp": offer})
        assert status == 200, body
        await viewer.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
        await viewer.wait_frames(5)
        [session] = station.status()["whep"]["sessions"]
        assert (session["via"], session["principal"]) == ("console", installer.principal)
        # Only its own principal may end it (another installer's request changes nothing).
        other = Installer(station)
        await other.pair()
        status, ended = await other.ask("POST", "api/console/live-end",
                                        {"session": body["session"]})
        assert (status, ended) == (200, {"ended": False})
        status, _ = await installer.ask("POST", "api/console/handoff", {"checklist": {}})
        assert status == 200
        await kit.eventually(lambda: station.status()["whep"]["sessions"] == [],
                             what="the live picture ended by the hand-off")
        assert (await installer.ask("POST", "api/console/live", {"sdp": offer}))[0] == 401
    finally:
        await viewer.close()
    assert station.eventlog is not None
    await station.eventlog.flush()
    records = [e for e in station.eventlog.read_after(0, 500)
               if e.type in {"LiveViewStarted", "LiveViewEnded"}]
    assert [(e.type, e.details.get("via"), e.details.get("reason")) for e in records] == [
        ("LiveViewStarted", "console", None), ("LiveViewEnded", None, "principal revoked")]


async def test_zones_saved_from_the_console_mask_a_resident_call(console_station, devices,
                                                                  monkeypatch):
    monkeypatch.setattr(Device, "_consume", consume_keeping_frames)
    station = console_station
    installer = Installer(station)
    await installer.pair()
    status, body = await installer.ask("POST", "api/console/config",
                                       {"changes": {"privacy.zones": [ZONE]}})
    assert (status, body["applied"]) == (200, ["privacy.zones"])
    phone, frame = await rung_frame(station, devices, "bell")
    assert len(phone.video_frames) >= 5
    luma = frame.to_ndarray(format="yuv420p")[: frame.height]
    assert luma[rasterise([INSIDE], frame.width, frame.height)].max() < 40
    assert luma[~rasterise([ZONE], frame.width, frame.height)].mean() > 60


async def test_the_name_set_from_the_console_is_what_the_rung_residents_see(
        tmp_path, push_service, devices):
    """A button's label, set from the console, reaches the rung devices and the push."""
    config = tmp_path / "intercom.toml"
    config.write_text(CONFIG + f"""
[[hardware.buttons]]
name = "bell2"
pin = 18
flat = "2"

[push]
allowed_hosts = ["127.0.0.1"]
ca_file = "{push_service.ca}"
""")
    station = Station(simulated_settings(tmp_path / "state", load_settings(config)),
                      config_path=config)
    await station.start()
    try:
        installer = Installer(station)
        await installer.pair()
        key = "hardware.buttons[0].label"
        status, body = await installer.ask("POST", "api/console/config",
                                           {"changes": {key: "Main\nentrance"}})
        assert (status, [p["key"] for p in body["refused"]]) == (422, [key])
        status, body = await installer.ask("POST", "api/console/config",
                                           {"changes": {key: "Main entrance"}})
        assert (status, body["applied"], body["at_restart"]) == (200, [key], []), body
        assert load_settings(config).hardware.buttons[0].label == "Main entrance"

        closed, browser = await push.subscribed(station, push_service, devices)
        online = await pair(station)
        other_flat = await pair(station, flat="2")
        devices.extend([online, other_flat])
        for device in (online, other_flat):
            await device.connect()
        station.bus.publish(DoorbellPressed(button="bell", flat="1"))
        ring = await online.expect("ring")
        assert ring["label"] == "Main entrance"
        await kit.eventually(lambda: len(push_service.pushes) == 1, what="the push")
        pushed = push.message(push_service, browser)
        assert (pushed["type"], pushed["label"]) == ("ring", "Main entrance")
        await online.send({"type": "accept", "call": ring["call"]})
        await online.expect("call", state="answered")
        await online.send({"type": "hangup", "call": ring["call"]})
        await kit.eventually(lambda: station.calls.state == "idle",  # type: ignore[union-attr]
                             what="the call ended")
        # The other flat's button has no label: its residents get the door's name only.
        station.bus.publish(DoorbellPressed(button="bell2", flat="2"))
        ring = await other_flat.expect("ring")
        assert "label" not in ring
        del closed
    finally:
        await station.stop("test finished")


async def test_pair_installer_prints_the_console_link(console_station):
    station = console_station
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "intercom", "pair", "--installer", "--no-qr", "--state-dir",
        str(station.state_dir), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("pairing code for an installer, valid 72 h once paired: ")
    assert station.calls is not None
    assert lines[-1] == (f"link:        {station.calls.url}installer.html#pair="
                         f"{lines[0].rsplit(' ', 1)[1]}&fp={station.calls.fingerprint}")


def qr_links(pdf: bytes, folder: Path) -> list[str]:
    """Every QR code on every page: rendered with pdftoppm, decoded with zbarimg."""
    (folder / "sheets.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "100", "-png", str(folder / "sheets.pdf"),
                    str(folder / "page")], check=True, timeout=60)
    links = []
    for page in sorted(folder.glob("page-*.png")):
        done = subprocess.run(["zbarimg", "-q", "--raw", str(page)], capture_output=True,
                              text=True, timeout=60, check=True)
        links.extend(done.stdout.split())
    return links


async def test_pairing_sheets_carry_a_working_link_for_each_flat(tmp_path):
    config = tmp_path / "intercom.toml"
    config.write_text(CONFIG + '\n[[hardware.buttons]]\nname = "bell2"\npin = 5\nflat = "2b"\n')
    settings = simulated_settings(tmp_path / "state", load_settings(config))
    station = Station(settings, config_path=config)
    await station.start()
    try:
        installer = Installer(station)
        await installer.pair()
        status, body = await installer.ask("POST", "api/console/sheets", {})
        assert status == 200, body
        assert body["flats"] == ["1", "2b"]
        assert station.calls is not None
        url, fp = station.calls.url, station.calls.fingerprint
        links = qr_links(base64.b64decode(body["pdf"]), tmp_path)
        assert len(links) == 2
        for link in links:
            assert link.startswith(f"{url}#pair=")
            assert link.endswith(f"&fp={fp}")
        code_1 = links[0].split("#pair=")[1].split("&")[0]
        code_2b = links[1].split("#pair=")[1].split("&")[0]
        status, paired = await post_json(station, "api/pair", {
            "code": code_1, "jwk": OKPKey.generate_key("Ed25519").as_dict(private=False)})
        assert (status, paired["flat"]) == (200, "1")
    finally:
        await station.stop("test finished")
    # A printed code outlives a restart of the station (its hash is kept, 0600).
    assert (settings.station.state_dir / "pairing-sheets.json").stat().st_mode & 0o777 == 0o600
    station = Station(settings, config_path=config)
    await station.start()
    try:
        jwk = OKPKey.generate_key("Ed25519").as_dict(private=False)
        status, paired = await post_json(station, "api/pair", {"code": code_2b, "jwk": jwk})
        assert (status, paired["flat"]) == (200, "2b")
        status, _ = await post_json(station, "api/pair", {"code": code_1, "jwk": jwk})
        assert status == 403  # used once already
    finally:
        await station.stop("test finished")


async def test_mqtt_connection_test_with_credentials_from_a_file(console_station, tmp_path):
    station = console_station
    installer = Installer(station)
    await installer.pair()
    password = secrets.token_urlsafe(12)
    broker = Broker(tmp_path / "broker", users={"station": password})
    broker.start()
    try:
        good = tmp_path / "mqtt.pass"
        good.write_text(password + "\n")
        wrong = tmp_path / "wrong.pass"
        wrong.write_text("not-the-password\n")
        given = {"host": "127.0.0.1", "port": broker.port, "username": "station"}
        test = "api/console/mqtt-test"
        status, body = await installer.ask("POST", test, {"mqtt": {**given,
                                                                  "password_file": str(good)}})
        assert (status, body["ok"], body["broker"]) == (200, True, f"127.0.0.1:{broker.port}")
        assert body["protocol"] == "5"
        status, body = await installer.ask("POST", test, {"mqtt": {**given,
                                                                  "password_file": str(wrong)}})
        assert (status, body["ok"]) == (200, False)
        assert body["detail"].startswith("refused by the broker")
        assert "not-the-password" not in json.dumps(body)
        status, body = await installer.ask("POST", test, {"mqtt": {**given, "password": "x"}})
        assert status == 422
        assert body["refused"][0]["key"] == "mqtt.password"
        status, body = await installer.ask("POST", test, {"mqtt": {**given, "port": "abc"}})
        assert (status, body["refused"][0]["key"]) == (422, "mqtt.port")
    finally:
        broker.kill()
    status, body = await installer.ask("POST", "api/console/mqtt-test", {"mqtt": given})
    assert (status, body["ok"]) == (200, False)
    assert body["detail"].startswith("cannot connect")


async def test_mqtt_connection_test_falls_back_to_311_like_the_bridge(console_station,
                                                                       tmp_path):
    """``protocol = "auto"``: a broker that refuses MQTT 5 is tested with 3.1.1."""
    installer = Installer(console_station)
    await installer.pair()
    broker = Broker(tmp_path / "broker")
    broker.start()
    proxy = V311OnlyProxy(broker.port)  # Mosquitto behind a front that refuses MQTT 5
    await proxy.start()
    test = "api/console/mqtt-test"
    try:
        given = {"host": "127.0.0.1", "port": proxy.port}
        status, body = await installer.ask("POST", test, {"mqtt": given})
        assert (status, body["ok"], body["protocol"]) == (200, True, "3.1.1"), body
        assert body["detail"] == "connected with MQTT 3.1.1 and disconnected cleanly"
        assert proxy.refused_v5 == 1
        status, body = await installer.ask("POST", test, {"mqtt": {**given, "protocol": "5"}})
        assert (status, body["ok"], body["protocol"]) == (200, False, "5"), body
        assert body["detail"].startswith("refused by the broker")
        assert proxy.refused_v5 == 2  # MQTT 5 only: no second try
        status, body = await installer.ask("POST", test, {"mqtt": {**given,
                                                                  "protocol": "3.1.1"}})
        assert (status, body["ok"], body["protocol"]) == (200, True, "3.1.1"), body
        assert proxy.refused_v5 == 2
    finally:
        await proxy.stop()
        broker.kill()


async def test_audio_check_reads_the_microphone_and_plays_a_tone(console_station):
    station = console_station
    installer = Installer(station)
    await installer.pair()
    status, level = await installer.ask("GET", "api/console/audio-level")
    assert status == 200, level
    assert 0.15 < level["peak"] < 0.2  # the simulated microphone's -12 dBFS sine
    assert level["dbfs"] == pytest.approx(-15.0, abs=0.5)
    speaker = station.speaker
    assert isinstance(speaker, LevelSink)
    before = speaker.audible_frames
    status, body = await installer.ask("POST", "api/console/tone", {})
    assert (status, body) == (200, {"played_s": 1.0, "hz": 1000.0})
    assert speaker.audible_frames - before == 50
