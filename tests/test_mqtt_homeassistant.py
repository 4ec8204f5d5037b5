"""Home Assistant over a real Mosquitto: device triggers, per-button events, alarms, results.

A simulated station with two buttons, a door contact and a tamper switch publishes its
discovery; a subscriber reads the configs Home Assistant would, then follows the state
and trigger topics while the simulator presses buttons, trips the tamper switch, forces
and holds the door open, and a manager's commands are granted and denied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
import pytest

from intercom.config import Settings
from intercom.mqtt.discovery import Wiring, button_ids, discovery_messages, entity_slug
from intercom.mqtt.topics import Topics
from tests.mosquitto import Broker
from tests.test_mqtt_broker import PREFIX, bridge_of, retained, until
from tests.test_mqtt_commands import COMMAND, command_settings, connected_station, energised
from tests.test_security_kit import Clock, add_principal

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

# Home Assistant's own check of an entity id (homeassistant.core.valid_entity_id).
ENTITY_ID = re.compile(r"^(?!.+__)(?!_)[\da-z_]+(?<!_)\.(?!_)[\da-z_]+(?<!_)$")
BUTTONS = [{"name": "bell", "pin": 17, "flat": "1"}, {"name": "flat3", "pin": 5, "flat": "3"}]


def two_button_settings(sim_settings: Settings, port: int) -> Settings:
    """The simulated station with a second button and a door held open after 1 s."""
    settings = command_settings(sim_settings, port)
    data = settings.model_dump(mode="json")
    data["hardware"]["buttons"] = BUTTONS
    data["hardware"]["door_contact"]["held_open_s"] = 1
    data["mqtt"] = settings.mqtt
    return Settings.model_validate(data)


class Tap:
    """Every message under ``<p>/#`` after subscribing, retained ones marked."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: list[tuple[str, Any, bool]] = []

    async def run(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes)
            try:
                body = json.loads(payload)
            except ValueError:
                body = payload.decode()  # availability: online / offline
            self.messages.append((message.topic.value, body, message.retain))

    def live(self, suffix: str) -> list[Any]:
        """Bodies published on ``<p>/<suffix>`` while subscribed (not the retained copy)."""
        return [body for topic, body, kept in self.messages
                if topic == f"{PREFIX}/{suffix}" and not kept]

    async def wait(self, suffix: str, test: Callable[[list[Any]], bool], what: str) -> None:
        await until(lambda: test(self.live(suffix)), 10, what)


@contextlib.asynccontextmanager
async def tapped(port: int) -> AsyncIterator[Tap]:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"{PREFIX}/#", qos=1)
        tap = Tap(client)
        task = asyncio.create_task(tap.run())
        try:
            yield tap
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def by_kind(seen: dict[str, Any]) -> dict[str, Any]:
    """Discovery configs by ``<component>/<object id>``."""
    return {t.split("/")[1] + "/" + t.split("/")[3]: c for t, c in seen.items()
            if t.startswith("homeassistant/")}


async def test_discovery_has_a_trigger_and_an_event_per_button_and_the_alarms(
    broker: Broker, sim_settings: Settings
) -> None:
    async with connected_station(two_button_settings(sim_settings, broker.port)) as station:
        node = bridge_of(station).topics.node_id
        configs = by_kind(await retained(broker.port, "homeassistant/#"))
    for button in ("bell", "flat3"):
        trigger = configs[f"device_automation/press_{button}"]
        assert trigger["automation_type"] == "trigger"
        assert (trigger["type"], trigger["subtype"]) == ("button_short_press", button)
        assert trigger["topic"] == f"{PREFIX}/doorbell/{button}"
        assert (trigger["value_template"], trigger["payload"]) == (
            "{{ value_json.event_type }}", "press")
        assert trigger["device"]["identifiers"] == [node]
        event = configs[f"event/doorbell_{button}"]
        assert event["state_topic"] == trigger["topic"]
        assert event["event_types"] == ["press"]
        assert event["device_class"] == "doorbell"
        assert event["name"] == f"Doorbell {button}"  # as the config names the button
    for alarm, device_class in (("tamper", "tamper"), ("forced_open", "safety"),
                                ("held_open", "problem")):
        trigger = configs[f"device_automation/{alarm}"]
        assert (trigger["type"], trigger["topic"], trigger["payload"]) == (
            "alarm", f"{PREFIX}/alarm", alarm)
        sensor = configs[f"binary_sensor/{alarm}"]
        assert sensor["state_topic"] == f"{PREFIX}/state/alarms"
        assert sensor["device_class"] == device_class
    # Type and subtype make each trigger distinct on the device, as Home Assistant needs.
    triggers = [c for k, c in configs.items() if k.startswith("device_automation/")]
    assert len({(t["type"], t["subtype"]) for t in triggers}) == len(triggers) == 5
    assert configs["sensor/unlock"]["options"] == ["granted", "denied"]
    entities = {k: c for k, c in configs.items() if not k.startswith("device_automation/")}
    for kind, config in entities.items():
        component = kind.split("/")[0]
        assert config["default_entity_id"] == f"{component}.{config['object_id']}".lower()
        assert ENTITY_ID.match(config["default_entity_id"]), config["default_entity_id"]
        assert config["unique_id"] == config["object_id"]
    assert all("object_id" not in t and "unique_id" not in t for t in triggers)


def test_button_names_make_distinct_valid_ids() -> None:
    ids = button_ids(["Flat.3", "flat-3", "flat_3", "3"])
    assert ids == {"Flat.3": "flat_3", "flat-3": "flat_3_2", "flat_3": "flat_3_3", "3": "3"}
    assert entity_slug("intercom_Door__1-") == "intercom_door_1"
    wiring = Wiring(door="front", buttons=tuple(ids), door_contact=False, tamper=False)
    configs = by_kind(discovery_messages(Topics("p", "Door-1"), wiring))
    assert {k for k in configs if k.startswith("device_automation/")} == {
        f"device_automation/press_{slug}" for slug in ids.values()}
    # Without a contact or a tamper switch there is no such alarm to show.
    assert not {"binary_sensor/tamper", "binary_sensor/forced_open"} & set(configs)
    for config in configs.values():
        if "default_entity_id" in config:
            assert ENTITY_ID.match(config["default_entity_id"]), config["default_entity_id"]


async def test_states_and_triggers_follow_the_simulated_station(
    broker: Broker, sim_settings: Settings
) -> None:
    settings = two_button_settings(sim_settings, broker.port)
    async with connected_station(settings) as station, tapped(broker.port) as tap:
        simulator, lock = station.simulator, station.lock
        assert simulator is not None
        assert lock is not None
        # A press of flat 3, whose flat has nobody paired: its button's topic, and the
        # call rings and is missed at once; Home Assistant sees both.
        await simulator.act("press", "flat3")
        await tap.wait("state/call", lambda got: len(got) >= 2, "ringing, then idle")
        assert [b["state"] for b in tap.live("state/call")] == ["ringing", "idle"]
        await simulator.act("press", "bell")
        await tap.wait("doorbell/bell", lambda got: len(got) >= 1, "the bell's press")
        (flat3,) = tap.live("doorbell/flat3")
        assert flat3 == {"event_type": "press", "button": "flat3", "flat": "3"}
        assert tap.live("doorbell/bell") == [{"event_type": "press", "button": "bell",
                                              "flat": "1"}]
        assert [b["button"] for b in tap.live("doorbell")] == ["flat3", "bell"]

        # Tamper: an alarm as it happens, on in the state, and off once the cover is shut
        # again (the simulator puts it back after a moment).
        await simulator.act("tamper")
        await tap.wait("alarm", lambda got: len(got) >= 1, "the tamper alarm")
        assert tap.live("alarm") == [{"event_type": "tamper"}]
        await tap.wait("state/alarms", lambda got: not got[-1]["tamper"], "tamper off")
        assert [b["tamper"] for b in tap.live("state/alarms")][-2:] == [True, False]

        # Opened without an unlock: forced open, on until the door closes.
        await simulator.act("open-door")
        await tap.wait("alarm", lambda got: len(got) >= 2, "the forced alarm")
        assert tap.live("alarm")[1] == {"event_type": "forced_open"}
        await simulator.act("close-door")
        await tap.wait("state/door", lambda got: got[-1]["state"] == "closed", "closed")
        await tap.wait("state/alarms", lambda got: not got[-1]["forced_open"], "forced off")
        forced = [b["forced_open"] for b in tap.live("state/alarms")]
        assert forced[-2:] == [True, False]

        # Unlocked, opened and left open past held_open_s: held open, not forced.
        lock.pulse(0.2)
        await simulator.act("open-door")
        await tap.wait("alarm", lambda got: got[-1]["event_type"] == "held_open", "held alarm")
        await tap.wait("state/alarms", lambda got: got[-1]["held_open"], "held on")
        assert tap.live("state/alarms")[-1]["forced_open"] is False
        await simulator.act("close-door")
        await tap.wait("state/alarms", lambda got: not got[-1]["held_open"], "held off")
        assert [b["event_type"] for b in tap.live("alarm")] == ["tamper", "forced_open",
                                                                "held_open"]
    seen = await retained(broker.port, f"{PREFIX}/state/alarms")
    alarms = seen[f"{PREFIX}/state/alarms"]
    assert not any(alarms[a] for a in ("tamper", "forced_open", "held_open"))


async def test_the_last_unlock_decision_says_granted_or_denied_and_nothing_more(
    broker: Broker, sim_settings: Settings
) -> None:
    settings = command_settings(sim_settings, broker.port)
    async with connected_station(settings) as station, tapped(broker.port) as tap, \
            aiomqtt.Client("127.0.0.1", broker.port) as manager:
        assert station.registry is not None
        clock = Clock()
        alice = await add_principal(station.registry, clock, "alice-res-7")
        await manager.publish(COMMAND, alice.token(), qos=1)
        await tap.wait("state/unlock", lambda got: len(got) >= 1, "granted")
        assert energised(station) == 1
        wrong = f"{(int(alice.code()) + 1) % 10**6:06d}"
        await manager.publish(COMMAND, alice.token(totp=wrong), qos=1)
        await tap.wait("state/unlock", lambda got: len(got) >= 2, "denied")
        decisions = tap.live("state/unlock")
        assert [d["state"] for d in decisions] == ["granted", "denied"]
        assert all(set(d) == {"state", "door", "at"} for d in decisions)
        # Only <p>/events carries the (pseudonymous) principal id; no state or trigger does.
        for topic, body, _ in tap.messages:
            if topic != f"{PREFIX}/events":
                assert "alice-res-7" not in json.dumps(body), topic
    seen = await retained(broker.port, f"{PREFIX}/state/unlock")
    assert seen[f"{PREFIX}/state/unlock"]["state"] == "denied"

