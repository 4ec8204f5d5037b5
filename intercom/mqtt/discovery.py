"""Home Assistant MQTT discovery: the entities a station shows up as, by themselves."""

from __future__ import annotations

from typing import Any

from intercom import __version__
from intercom.mqtt.topics import OFFLINE, ONLINE, Topics

CALL_STATES = ["idle", "ringing", "in_call"]


def discovery_messages(topics: Topics, door: str) -> dict[str, dict[str, Any]]:
    """Retained discovery config per topic: doorbell, door, lock, call, availability."""
    node = topics.node_id
    device = {
        "identifiers": [node],
        "name": f"Intercom {topics.station_id}",
        "manufacturer": "intercom",
        "model": "door station",
        "sw_version": __version__,
    }
    common: dict[str, Any] = {
        "device": device,
        "availability_topic": topics.availability,
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "origin": {"name": "intercom", "sw_version": __version__},
    }

    def entity(object_id: str, **fields: Any) -> dict[str, Any]:
        return {"unique_id": f"{node}_{object_id}", "object_id": f"{node}_{object_id}",
                **common, **fields}

    return {
        topics.discovery("event", "doorbell"): entity(
            "doorbell",
            name="Doorbell",
            device_class="doorbell",
            state_topic=topics.doorbell,
            event_types=["press"],
        ),
        topics.discovery("binary_sensor", "door"): entity(
            "door",
            name=f"Door {door}",
            device_class="door",
            state_topic=topics.state_door,
            value_template="{{ value_json.state }}",
            payload_on="open",
            payload_off="closed",
        ),
        topics.discovery("binary_sensor", "lock"): entity(
            "lock",
            name=f"Lock {door}",
            # device_class lock: "on" means unlocked in Home Assistant.
            device_class="lock",
            state_topic=topics.state_lock,
            value_template="{{ value_json.state }}",
            payload_on="unlocked",
            payload_off="locked",
        ),
        topics.discovery("sensor", "call"): entity(
            "call",
            name="Call",
            device_class="enum",
            options=CALL_STATES,
            state_topic=topics.state_call,
            value_template="{{ value_json.state }}",
        ),
        # Availability itself, as a connectivity sensor that needs no availability topic.
        topics.discovery("binary_sensor", "online"): {
            "unique_id": f"{node}_online",
            "object_id": f"{node}_online",
            "device": device,
            "origin": common["origin"],
            "name": "Online",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": topics.availability,
            "payload_on": ONLINE,
            "payload_off": OFFLINE,
        },
    }
