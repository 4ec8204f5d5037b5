"""Where things are (one resolver), whose they are (the instance lock), the credentials."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from intercom.config import DEFAULT_STATE_DIR
from intercom.deploy.firstboot import MQTT_CRED_FILE, MQTT_CREDENTIAL
from intercom.eventlog.keys import master_key_source
from intercom.events import CallRinging, DoorbellPressed, Event, EventBus
from intercom.mqtt.link import read_password
from intercom.security.secretbox import key_path
from intercom.statedir import (
    SIM_STATE_DIR,
    InstanceLock,
    InstanceLockedError,
    NoStationStateError,
    resolve,
)

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "intercom.service"
CONFIG = """
[station]
id = "door"
{state}
[hardware]
buttons = [{{ pin = 17, flat = "1" }}]
relay = {{ pin = 27 }}
"""


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTERCOM_STATE_DIR", raising=False)
    monkeypatch.delenv("INTERCOM_CONFIG", raising=False)


def config(tmp_path: Path, state: Path | None) -> Path:
    path = tmp_path / "intercom.toml"
    line = f'state_dir = "{state}"' if state else ""
    path.write_text(CONFIG.format(state=line))
    return path


def test_flag_beats_env_beats_config_beats_default(tmp_path, monkeypatch):
    conf = config(tmp_path, tmp_path / "from-config")
    assert resolve(tmp_path / "flag", conf).state_dir == tmp_path / "flag"
    monkeypatch.setenv("INTERCOM_STATE_DIR", str(tmp_path / "env"))
    assert resolve(None, conf).state_dir == tmp_path / "env"
    assert resolve(tmp_path / "flag", conf).state_dir == tmp_path / "flag"
    monkeypatch.delenv("INTERCOM_STATE_DIR")
    assert resolve(None, conf).state_dir == tmp_path / "from-config"
    monkeypatch.setenv("INTERCOM_CONFIG", str(conf))
    assert resolve(None).state_dir == tmp_path / "from-config"  # the config from the env


def test_the_default_is_the_station_s_and_the_simulation_only_when_asked(tmp_path):
    plain = config(tmp_path, None)  # a config that names no state dir
    assert resolve(None, plain).state_dir == DEFAULT_STATE_DIR
    assert resolve(None, plain, simulate=True).state_dir == SIM_STATE_DIR


def test_no_station_state_says_where_it_looked_and_how_to_point_elsewhere(tmp_path):
    where = resolve(tmp_path / "empty")
    with pytest.raises(NoStationStateError) as caught:
        where.require_station()
    text = str(caught.value)
    assert str(tmp_path / "empty") in text
    assert "--state-dir" in text
    assert "INTERCOM_STATE_DIR" in text
    assert not (tmp_path / "empty").exists()


def test_the_instance_lock_names_its_holder(tmp_path):
    first = InstanceLock(tmp_path, "run")
    first.acquire()
    try:
        with pytest.raises(InstanceLockedError, match=r"a station \(pid \d+\) holds"):
            InstanceLock(tmp_path, "run").acquire()
        with pytest.raises(InstanceLockedError):
            InstanceLock(tmp_path, "cli").acquire(wait_for_cli_s=0.2)  # a station: no wait
    finally:
        first.release()
    with InstanceLock(tmp_path, "cli"):  # free again once released
        pass


def systemd_credentials(source: Path, target: Path) -> Path:
    """Lay out $CREDENTIALS_DIRECTORY as systemd does for the unit's LoadCredential=."""
    lines = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("LoadCredential=")]
    assert len(lines) == 1, lines
    cred_id, _, _path = lines[0].removeprefix("LoadCredential=").partition(":")
    target.mkdir()
    for file in source.iterdir():  # a directory source: each file is ID_FILENAME
        (target / f"{cred_id}_{file.name}").write_bytes(file.read_bytes())
    return target


def test_credential_names_of_the_unit_are_the_names_the_code_reads(tmp_path, monkeypatch):
    etc = tmp_path / "etc-credentials"  # what /etc/intercom/credentials holds
    etc.mkdir()
    (etc / "principals.key").write_bytes(b"p" * 32)
    (etc / "eventlog.key").write_bytes(b"e" * 32)
    (etc / MQTT_CRED_FILE).write_text("broker-password\n")
    creds = systemd_credentials(etc, tmp_path / "creds")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    state = tmp_path / "state"
    assert key_path(state).read_bytes() == b"p" * 32
    source = master_key_source(state)
    assert source.credential
    assert source.path.read_bytes() == b"e" * 32
    from intercom.config import MqttConfig  # noqa: PLC0415

    mqtt = MqttConfig(host="127.0.0.1", username="door", password_credential=MQTT_CREDENTIAL)
    assert read_password(mqtt) == "broker-password"


def test_the_unit_loads_the_credential_folder_first_boot_writes():
    text = UNIT.read_text()
    assert re.search(r"^LoadCredential=intercom:/etc/intercom/credentials$", text, re.MULTILINE)


async def test_events_reach_every_subscriber_in_publication_order():
    bus = EventBus()
    seen_by_handler: list[str] = []
    queue = bus.subscribe()
    first = asyncio.ensure_future(queue.__anext__())
    await asyncio.sleep(0)

    def ring_on_press(event: Event) -> None:  # as the ring group does
        if isinstance(event, DoorbellPressed):
            bus.publish(CallRinging(call="c1", flat=event.flat, devices=0))

    bus.on(ring_on_press)
    bus.on(lambda e: seen_by_handler.append(e.type))
    bus.publish(DoorbellPressed(button="bell", flat="1"))
    got = [await first, await queue.__anext__()]
    assert [e.type for e in got] == ["DoorbellPressed", "CallRinging"]
    assert seen_by_handler == ["DoorbellPressed", "CallRinging"]
    await queue.aclose()
