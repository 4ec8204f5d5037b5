"""The Home Assistant integration's signing, against the real station over a real broker.

``integrations/homeassistant/custom_components/intercom/signing.py`` is loaded from its
file, as Home Assistant would run it: with neither Home Assistant nor (on purpose) the
station's package behind it. Its key is enrolled with the documented command, and the
station's own verifier grants its command with the right code and denies a wrong one.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType

import aiomqtt
import pytest

from intercom.cli import main
from intercom.security import totp
from intercom.security.command import parse
from intercom.security.principals import public_jwk_from_file
from tests.mosquitto import Broker
from tests.test_mqtt_broker import PREFIX
from tests.test_mqtt_commands import command_settings, connected_station, energised
from tests.test_principals_cli import URI
from tests.test_security_kit import DOOR, STATION

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

ROOT = Path(__file__).resolve().parent.parent
HACS = ROOT / "integrations" / "homeassistant"
COMPONENT = HACS / "custom_components" / "intercom"


def load_signing() -> ModuleType:
    """The integration's signing module, from its file, without its package."""
    spec = importlib.util.spec_from_file_location("intercom_ha_signing", COMPONENT / "signing.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


signing = load_signing()


def imported(path: Path) -> set[str]:
    """The absolute modules a source file imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_integration_needs_nothing_of_the_station_and_signing_nothing_of_ha() -> None:
    for path in COMPONENT.glob("*.py"):
        assert not {m for m in imported(path) if m.split(".")[0] == "intercom"}, path
    assert not {m for m in imported(COMPONENT / "signing.py")
                if m.split(".")[0] == "homeassistant"}
    manifest = json.loads((COMPONENT / "manifest.json").read_text())
    assert manifest["domain"] == COMPONENT.name == "intercom"
    assert manifest["dependencies"] == ["mqtt"]
    assert manifest["requirements"] == []  # cryptography comes with Home Assistant
    assert json.loads((COMPONENT / "translations" / "en.json").read_text()) == json.loads(
        (COMPONENT / "strings.json").read_text())
    assert json.loads((HACS / "hacs.json").read_text())["homeassistant"] == "2024.3.0"


def test_keys_round_trip_and_the_station_reads_the_public_jwk() -> None:
    key = signing.new_key()
    public = signing.public_jwk(key)
    # What the config flow shows is what `intercom principals add --public-key` reads.
    assert public_jwk_from_file(json.dumps(public).encode()) == public
    stored = signing.private_jwk(key)
    again = signing.key_from_jwk(json.loads(json.dumps(stored)))
    assert signing.public_jwk(again) == public
    other = signing.public_jwk(signing.new_key())
    with pytest.raises(signing.SigningError):
        signing.key_from_jwk({**stored, "x": other["x"]})
    with pytest.raises(signing.SigningError):
        signing.key_from_jwk(public)  # no private part
    signer = signing.Signer(key=key, kid="home-assistant", station=STATION, door=DOOR)
    for code in ("12345", "1234567", "12a456", ""):
        with pytest.raises(signing.SigningError):
            signer.unlock(code)
    token, jti = signer.unlock("123456", now=1_700_000_000)
    command = parse(token)  # the station's strict parser takes it whole
    assert (command.kid, command.aud, command.door, command.totp, command.jti) == (
        "home-assistant", STATION, DOOR, "123456", jti)
    assert command.exp - command.iat == signing.LIFETIME_S
    assert signing.check_settings(STATION, DOOR, "home-assistant", "") == {}
    assert signing.check_settings("a b", DOOR, "-x", "a/#") == {
        "station": "invalid_name", "principal": "invalid_id", "topic_prefix": "invalid_topic"}


def test_answers_are_read_strictly() -> None:
    assert signing.parse_result(b'{"jti": "j-1", "result": "granted"}') == ("j-1", "granted")
    assert signing.parse_result('{"jti": "j-2", "result": "denied"}') == ("j-2", "denied")
    for junk in (b"", b"\xff", b"[]", b'{"jti": null, "result": "denied"}',
                 b'{"jti": "j", "result": "maybe"}'):
        assert signing.parse_result(junk) is None
    assert signing.parse_lock_state(b'{"state": "locked", "door": "front"}') is True
    assert signing.parse_lock_state(b'{"state": "unlocked"}') is False
    assert signing.parse_lock_state(b'{"state": "jammed"}') is None
    assert signing.StationTopics.of("door-1").command == "intercom/door-1/command"
    assert signing.StationTopics.of("door-1", f"{PREFIX}/").result == f"{PREFIX}/command/result"
    assert signing.node_id("door-1") == "intercom_door_1"


async def answer(client: aiomqtt.Client, jti: str) -> str:
    """The station's answer to the command ``jti``, read as the lock entity reads it."""
    async with asyncio.timeout(10):
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            parsed = signing.parse_result(payload)
            if parsed is not None and parsed[0] == jti:
                return str(parsed[1])
    raise AssertionError("no answer")


async def test_the_station_grants_the_integrations_command_with_the_right_code_only(
    broker: Broker, sim_settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = signing.new_key()
    jwk_file = tmp_path / "ha.jwk"
    jwk_file.write_text(json.dumps(signing.public_jwk(key)))  # as the config flow shows it
    topics = signing.StationTopics.of(STATION, PREFIX)
    async with connected_station(command_settings(sim_settings, broker.port)) as station, \
            aiomqtt.Client("127.0.0.1", broker.port) as ha:
        # The installer runs the command the config flow prints, at the station.
        command = shlex.split(signing.enrol_command("home-assistant", DOOR, str(jwk_file)))
        assert command[:2] == ["intercom", "principals"]
        args = [*command[1:], "--no-qr", "--state-dir", str(station.state_dir)]
        assert await asyncio.to_thread(main, args) == 0
        uri = URI.search(capsys.readouterr().out)
        assert uri is not None
        secret = uri.group(0).split("secret=")[1].split("&")[0]
        signer = signing.Signer(key=key, kid="home-assistant", station=STATION, door=DOOR)
        await ha.subscribe(topics.result, qos=1)

        right = totp.code_at(secret, time.time())
        token, jti = signer.unlock(right)
        await ha.publish(topics.command, token, qos=1)
        assert await answer(ha, jti) == "granted"
        assert energised(station) == 1

        wrong = f"{(int(right) + 1) % 10**6:06d}"
        token, jti = signer.unlock(wrong)
        await ha.publish(topics.command, token, qos=1)
        assert await answer(ha, jti) == "denied"
        # A right code is single use: typed again, it is denied too.
        token, jti = signer.unlock(right)
        await ha.publish(topics.command, token, qos=1)
        assert await answer(ha, jti) == "denied"
        assert energised(station) == 1
