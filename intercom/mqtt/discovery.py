"""Home Assistant MQTT discovery: the entities a station shows up as, by themselves."""

from __future__ import annotations

from typing import Any

from intercom import __version__
from intercom.mqtt.topics import OFFLINE, ONLINE, Topics

CALL_STATES = ["idle", "ringing", "in_call"]
# The self-test's parts (intercom.selftest.PARTS; not imported: mqtt stays below selftest).
SELFTEST_PARTS = ("camera", "microphone", "door_contact", "tamper", "relay", "clock", "disk",
                  "eventlog", "certificate", "mqtt")

# Diagnostic sensors read from <p>/state/health: (object id, name, key, extra fields).
HEALTH_SENSORS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("uptime", "Uptime", "uptime_s",
     {"device_class": "duration", "unit_of_measurement": "s", "state_class": "measurement"}),
    ("load", "CPU load (1 min)", "load_1m", {"state_class": "measurement"}),
    ("cpu_temperature", "CPU temperature", "cpu_temp_c",
     {"device_class": "temperature", "unit_of_measurement": "°C",
      "state_class": "measurement"}),
    ("memory", "Memory (RSS)", "rss_bytes",
     {"device_class": "data_size", "unit_of_measurement": "B", "state_class": "measurement"}),
    ("open_files", "Open descriptors", "open_fds", {"state_class": "measurement"}),
    ("disk_free", "Disk free", "disk_free_percent",
     {"unit_of_measurement": "%", "state_class": "measurement"}),
    ("writes_per_day", "Bytes written per day", "write_bytes_per_day",
     {"device_class": "data_size", "unit_of_measurement": "B", "state_class": "measurement"}),
    ("eventlog_size", "Event log size", "eventlog_bytes",
     {"device_class": "data_size", "unit_of_measurement": "B", "state_class": "measurement"}),
    ("checkpoint_age", "Log checkpoint age", "checkpoint_age_s",
     {"device_class": "duration", "unit_of_measurement": "s", "state_class": "measurement"}),
    ("camera_fps", "Camera frames per second", "camera_fps",
     {"unit_of_measurement": "fps", "state_class": "measurement"}),
    ("calls_per_day", "Calls in 24 h", "calls_24h", {"state_class": "measurement"}),
    ("web", "Web server", "web", {"device_class": "enum", "options": ["listening", "down"]}),
]


def discovery_messages(topics: Topics, door: str) -> dict[str, dict[str, Any]]:
    """Retained discovery config per topic: doorbell, door, lock, call, availability, health."""
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

    health: dict[str, dict[str, Any]] = {}
    for object_id, name, key, extra in HEALTH_SENSORS:
        health[topics.discovery("sensor", object_id)] = entity(
            object_id, name=name, entity_category="diagnostic",
            state_topic=topics.state_health,
            value_template=f"{{{{ value_json.{key} }}}}", **extra,
        )
    health[topics.discovery("binary_sensor", "clock_synchronized")] = entity(
        "clock_synchronized", name="Clock synchronised", entity_category="diagnostic",
        state_topic=topics.state_health,
        # None (unknown: timesyncd cannot be asked) is Home Assistant's "unknown".
        value_template="{% set s = value_json.clock_synchronized %}"
        "{{ 'None' if s is none else ('ON' if s else 'OFF') }}",
    )
    health[topics.discovery("binary_sensor", "problem")] = entity(
        "problem", name="Problem", device_class="problem", entity_category="diagnostic",
        state_topic=topics.state_health,
        value_template="{{ 'ON' if value_json.alerts else 'OFF' }}",
        json_attributes_topic=topics.state_health,
        json_attributes_template="{{ {'alerts': value_json.alerts} | tojson }}",
    )
    health[topics.discovery("binary_sensor", "selftest")] = entity(
        "selftest", name="Self-test", device_class="problem", entity_category="diagnostic",
        state_topic=topics.state_selftest,
        value_template="{{ 'OFF' if value_json.passed else 'ON' }}",
        json_attributes_topic=topics.state_selftest,
        json_attributes_template="{{ {'failed': value_json.failed, 'at': value_json.at} "
        "| tojson }}",
    )
    for part in SELFTEST_PARTS:  # one problem sensor a part: which one failed, at a glance
        health[topics.discovery("binary_sensor", f"selftest_{part}")] = entity(
            f"selftest_{part}", name=f"Self-test {part.replace('_', ' ')}",
            device_class="problem", entity_category="diagnostic",
            state_topic=topics.state_selftest,
            value_template=f"{{% set o = value_json.parts.{part} %}}"
            "{{ 'None' if o == 'skipped' else ('ON' if o == 'failed' else 'OFF') }}",
        )
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
        **health,
    }
