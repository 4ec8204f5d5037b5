"""The station in a real Home Assistant (2024.3.3), over a real Mosquitto: slow suite.

Home Assistant runs from its own venv (``scripts/ha-venv``) with a config directory
written here and our custom integration in ``custom_components/``; its MQTT integration
and ours are set up through their config flows over the REST API, as a person does in
the UI. A simulated station (two buttons, door contact, tamper switch, the astronaut's
face on camera behind two privacy zones, the ring image on) shares the broker. Nothing is
mocked: what Home Assistant shows is what it made of our discovery and topics.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections.abc import AsyncIterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from intercom.cli import main
from intercom.config import PrivacyConfig, Settings
from intercom.privacy.component import Privacy
from intercom.privacy.redact import FaceRedactor
from intercom.security import totp
from intercom.station import Station
from tests.conftest import Recorder
from tests.homeassistant import HomeAssistant, Websocket, venv
from tests.mosquitto import Broker
from tests.test_mqtt_broker import PREFIX, bridge_of
from tests.test_mqtt_commands import connected_station, energised
from tests.test_mqtt_homeassistant import two_button_settings
from tests.test_mqtt_ring_image import is_blank
from tests.test_principals_cli import URI
from tests.test_privacy import ZONES, assert_zone_dark, face_video, with_face_camera
from tests.test_security_kit import DOOR, STATION

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.filterwarnings("ignore:EdDSA is deprecated")]

NODE = "intercom_" + re.sub(r"[^A-Za-z0-9]", "_", STATION)
PRINCIPAL = "home-assistant"
LOCK = f"lock.intercom_{STATION.replace('-', '_')}_door_{DOOR}"
# The only warnings and errors Home Assistant may log: what it says of every run of this
# setup (pip skipped, Python 3.11 deprecated in 2024.3, a custom integration loaded), and
# the one denial the test provokes (a service call's error, logged by the websocket API).
EXPECTED = (
    r"\[homeassistant\.bootstrap\] Skipping pip installation of required modules",
    r"\[homeassistant\.bootstrap\] Support for the running Python version 3\.11",
    r"\[homeassistant\.loader\] We found a custom integration intercom which has not been",
    (r"\[homeassistant\.components\.websocket_api\.http\.connection\] \[\d+\] The station "
     r"denied the unlock command: check the code and try again$"),
)


@pytest.fixture(scope="session")
def ha_venv() -> Path:
    return venv()


def station_settings(sim_settings: Settings, port: int, tmp_path: Path) -> Settings:
    settings = two_button_settings(sim_settings, port)
    mqtt = settings.mqtt
    assert mqtt is not None
    settings = settings.model_copy(update={
        "mqtt": mqtt.model_copy(update={"ring_image": True}),
        "privacy": PrivacyConfig(zones=ZONES),
    })
    return with_face_camera(settings, face_video(tmp_path / "face.y4m"))


@pytest.fixture
async def home_assistant(tmp_path: Path, ha_venv: Path) -> AsyncIterator[HomeAssistant]:
    hass = HomeAssistant(tmp_path / "ha", ha_venv)
    try:
        await hass.start()
        yield hass
    finally:
        await hass.stop()


def warnings(log: str) -> list[str]:
    """Home Assistant's warnings and errors (their first lines), in order."""
    level = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")
    return [line for line in log.splitlines() if level.match(line)]


def unexpected(log: str) -> list[str]:
    """The warnings and errors that are none of ``EXPECTED``: about MQTT, discovery, ours."""
    return [line for line in warnings(log) if not any(re.search(p, line) for p in EXPECTED)]


async def test_home_assistant_shows_the_station_fires_automations_and_opens_the_door(
    broker: Broker, sim_settings: Settings, tmp_path: Path, home_assistant: HomeAssistant,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hass = home_assistant
    settings = station_settings(sim_settings, broker.port, tmp_path)
    async with connected_station(settings) as station:
        assert bridge_of(station).topics.node_id == NODE
        # MQTT, set up as in the UI: the broker step of its config flow.
        *_, done = await hass.flow("mqtt", {"broker": "127.0.0.1", "port": broker.port})
        assert done["type"] == "create_entry", done
        await hass.until_state(f"binary_sensor.{NODE}_online", "on")
        device_id = await entities_on_one_device(hass)
        await add_ring_automation(hass, device_id)
        async with hass.websocket() as ws:
            await ws.command({"type": "subscribe_events", "event_type": "state_changed"})
            await presses_and_alarms(hass, ws, station)
            await ring_image(hass, ws, station)
            jwk, command = await set_up_the_lock(hass)
            secret = await enrol(station, jwk, command, tmp_path, capsys)
            await unlock(hass, ws, station, device_id, secret)
    await hass.stop()
    log = hass.log.read_text()
    assert unexpected(log) == [], "\n".join(unexpected(log))
    assert sum("denied the unlock" in line for line in warnings(log)) == 1
    assert f"Found new component: image {NODE} ring_image" in log


async def entities_on_one_device(hass: HomeAssistant) -> str:
    """Our entities, named as the discovery said, all on one device: its id."""
    async with hass.websocket() as ws:
        registry = (await ws.command({"type": "config/entity_registry/list"}))["result"]
    ours = {e["entity_id"]: e for e in registry if e["platform"] == "mqtt"
            and str(e.get("unique_id", "")).startswith(NODE)}
    for entity in ("event.{n}_doorbell", "event.{n}_doorbell_bell",
                   "event.{n}_doorbell_flat3", "binary_sensor.{n}_door",
                   "binary_sensor.{n}_lock", "binary_sensor.{n}_tamper",
                   "binary_sensor.{n}_forced_open", "binary_sensor.{n}_held_open",
                   "sensor.{n}_call", "sensor.{n}_unlock", "image.{n}_ring_image",
                   "sensor.{n}_uptime", "binary_sensor.{n}_selftest"):
        assert entity.format(n=NODE) in ours, sorted(ours)
    device_ids = {e["device_id"] for e in ours.values()}
    assert len(device_ids) == 1
    (device_id,) = device_ids
    assert await hass.template(f"{{{{ device_id('binary_sensor.{NODE}_door') }}}}") == device_id
    assert await hass.state(f"binary_sensor.{NODE}_door") == "off"  # closed
    assert await hass.state(f"binary_sensor.{NODE}_lock") == "off"  # locked
    assert await hass.state(f"sensor.{NODE}_call") == "idle"
    return str(device_id)


async def add_ring_automation(hass: HomeAssistant, device_id: str) -> None:
    """An automation on the device trigger '"flat3" pressed', saved as the editor saves it."""
    automation = {
        "alias": "Someone rings flat 3",
        "trigger": [{"platform": "device", "domain": "mqtt", "device_id": device_id,
                     "discovery_id": f"{NODE} press_flat3",
                     "type": "button_short_press", "subtype": "flat3"}],
        "action": [{"service": "counter.increment", "target": {"entity_id": "counter.rings"}}],
    }
    answer = await hass.post("/api/config/automation/config/ring_flat3", automation)
    assert answer == {"result": "ok"}
    await hass.until_state("automation.someone_rings_flat_3", "on")
    assert await hass.state("counter.rings") == "0"


async def presses_and_alarms(hass: HomeAssistant, ws: Websocket, station: Station) -> None:
    """The automation fires on its button only; tamper on and off; forced open until closed."""
    simulator = station.simulator
    assert simulator is not None
    await simulator.act("press", "flat3")
    await hass.until_state("counter.rings", "1")
    await simulator.act("press", "bell")
    await until_seen(ws, f"event.{NODE}_doorbell_bell", 1)
    assert await hass.state("counter.rings") == "1"
    assert len(ws.seen(f"event.{NODE}_doorbell_flat3")) == 1
    assert ws.seen(f"sensor.{NODE}_call")[:2] == ["ringing", "idle"]  # nobody paired
    await simulator.act("tamper")  # the cover off for a moment, then shut again
    await until_seen(ws, f"binary_sensor.{NODE}_tamper", 2)
    assert ws.seen(f"binary_sensor.{NODE}_tamper") == ["on", "off"]
    await simulator.act("open-door")
    await hass.until_state(f"binary_sensor.{NODE}_forced_open", "on")
    assert await hass.state(f"binary_sensor.{NODE}_door") == "on"
    await simulator.act("close-door")
    await hass.until_state(f"binary_sensor.{NODE}_forced_open", "off")
    await hass.until_state(f"binary_sensor.{NODE}_door", "off")


async def ring_image(hass: HomeAssistant, ws: Websocket, station: Station) -> None:
    """The image Home Assistant serves: redacted with the zones masked; grey after expiry."""
    image = f"image.{NODE}_ring_image"
    await until_seen(ws, image, 2)  # the two rings
    jpeg = await hass.get_bytes(f"/api/image_proxy/{image}")
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert_zone_dark(bgr)
    assert not FaceRedactor(thorough=True).detect(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    ring = next(c for c in station.components if isinstance(c, Privacy)).ring_image
    assert ring is not None
    assert ring.expire(now=time.time() + (station.settings.privacy.snapshot_retention_hours
                                          + 1) * 3600)
    await until_seen(ws, image, 3)
    assert is_blank(await hass.get_bytes(f"/api/image_proxy/{image}"))


async def set_up_the_lock(hass: HomeAssistant) -> tuple[str, str]:
    """Our integration's config flow: the public key and the command it shows."""
    user, enrol_step, created = await hass.flow(
        "intercom",
        {"station": STATION, "door": DOOR, "principal": PRINCIPAL, "topic_prefix": PREFIX},
        {},
    )
    assert (user["step_id"], enrol_step["step_id"], created["type"]) == (
        "user", "enrol", "create_entry")
    shown = enrol_step["description_placeholders"]
    await hass.until_state(LOCK, "locked")
    return str(shown["jwk"]), str(shown["command"])


async def enrol(station: Station, jwk: str, command: str, tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> str:
    """The installer runs the shown command at the station; the TOTP secret it printed."""
    jwk_file = tmp_path / "ha.jwk"
    jwk_file.write_text(jwk)
    words = shlex.split(command)
    assert words[-2:] == ["--public-key", "ha.jwk"]
    args = [*words[1:-1], str(jwk_file), "--no-qr", "--state-dir", str(station.state_dir)]
    assert await asyncio.to_thread(main, args) == 0  # through the running station
    uri = URI.search(capsys.readouterr().out)
    assert uri is not None
    return uri.group(0).split("secret=")[1].split("&")[0]


async def unlock(hass: HomeAssistant, ws: Websocket, station: Station, device_id: str,
                 secret: str) -> None:
    """The lock, on the station's device, opens with the right code; a wrong one is an error."""
    recorder = Recorder(station.bus)
    async with hass.websocket() as calls:
        registry = (await calls.command({"type": "config/entity_registry/list"}))["result"]
        (entry,) = (e for e in registry if e["entity_id"] == LOCK)
        assert entry["device_id"] == device_id, "the lock is on the station's device"
        before = len(ws.seen(LOCK))  # its setting up: unavailable, then locked
        right = totp.code_at(secret, time.time())
        unlocked = await calls.command({
            "type": "call_service", "domain": "lock", "service": "unlock",
            "service_data": {"entity_id": LOCK, "code": right}})
        assert unlocked["success"], unlocked
        assert energised(station) == 1
        (granted,) = recorder.of("UnlockGranted")
        assert (granted.principal, granted.via) == (PRINCIPAL, "mqtt")
        await until_seen(ws, LOCK, before + 2)  # the relay's pulse, as the station says
        assert ws.seen(LOCK)[before:] == ["unlocked", "locked"]
        wrong = f"{(int(right) + 1) % 10**6:06d}"
        denied = await calls.command({
            "type": "call_service", "domain": "lock", "service": "unlock",
            "service_data": {"entity_id": LOCK, "code": wrong}})
    assert not denied["success"]
    assert denied["error"]["message"] == (
        "The station denied the unlock command: check the code and try again")
    assert energised(station) == 1
    assert len(recorder.of("UnlockDenied")) == 1


async def until_seen(ws: Websocket, entity_id: str, count: int, timeout: float = 20) -> None:
    """Wait until the websocket saw ``count`` state changes of ``entity_id``."""
    deadline = time.monotonic() + timeout
    while len(ws.seen(entity_id)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{entity_id}: saw {ws.seen(entity_id)}, wanted {count}")
        await asyncio.sleep(0.05)
