"""Home Assistant MQTT discovery: the entities a station shows up as, by themselves."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from intercom import __version__
from intercom.mqtt.topics import OFFLINE, ONLINE, Topics

CALL_STATES = ["idle", "ringing", "in_call"]
UNLOCK_RESULTS = ["granted", "denied"]
# The alarms: <p>/state/alarms holds whether each is on, <p>/alarm carries each as it happens.
TAMPER, FORCED_OPEN, HELD_OPEN = "tamper", "forced_open", "held_open"
ALARMS = (TAMPER, FORCED_OPEN, HELD_OPEN)
# Device triggers: a press is Home Assistant's "button_short_press" (shown '"<button>"
# pressed'); an alarm is of type "alarm" with a subtype Home Assistant shows as it is.
PRESS_TRIGGER = "button_short_press"
ALARM_TRIGGER = "alarm"
# Binary sensor of each alarm: (name, device class, trigger subtype).
ALARM_ENTITIES = {
    TAMPER: ("Tamper", "tamper", "tamper"),
    FORCED_OPEN: ("Door forced open", "safety", "door forced open"),
    HELD_OPEN: ("Door held open", "problem", "door held open"),
}
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

Messages = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Wiring:
    """What Home Assistant is told of the station's hardware: door, buttons, sensors."""

    door: str
    buttons: tuple[str, ...] = ()
    door_contact: bool = False
    tamper: bool = False
    ring_image: bool = False  # [mqtt] ring_image: the image entity of the latest ring


def entity_slug(text: str) -> str:
    """``text`` as Home Assistant takes it in an entity id: ``[a-z0-9]`` runs joined by ``_``."""
    return "_".join(part for part in re.split(r"[^a-z0-9]+", text.lower()) if part)


def button_ids(buttons: Sequence[str]) -> dict[str, str]:
    """A distinct discovery object id (``[A-Za-z0-9_-]``) and entity slug per button name."""
    out: dict[str, str] = {}
    for name in buttons:
        base = entity_slug(name) or "button"
        slug, n = base, 2
        while slug in out.values():
            slug, n = f"{base}_{n}", n + 1
        out[name] = slug
    return out


class _Builder:
    """Discovery configs of one station: its device, and the fields every entity shares."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.node = topics.node_id
        self.device = {
            "identifiers": [self.node],
            "name": f"Intercom {topics.station_id}",
            "manufacturer": "intercom",
            "model": "door station",
            "sw_version": __version__,
        }
        self.origin = {"name": "intercom", "sw_version": __version__}

    def entity(self, component: str, object_id: str, *, available: bool = True,
               **fields: Any) -> tuple[str, dict[str, Any]]:
        """An entity's discovery topic and config; it follows ``<p>/availability``."""
        ids = f"{self.node}_{object_id}"
        config: dict[str, Any] = {
            # object_id for Home Assistant before 2025.10, default_entity_id from then on.
            "unique_id": ids, "object_id": ids,
            "default_entity_id": f"{component}.{entity_slug(ids)}",
            "device": self.device, "origin": self.origin,
        }
        if available:
            config |= {"availability_topic": self.topics.availability,
                       "payload_available": ONLINE, "payload_not_available": OFFLINE}
        return self.topics.discovery(component, object_id), config | fields

    def trigger(self, object_id: str, kind: str, subtype: str, topic: str,
                payload: str) -> tuple[str, dict[str, Any]]:
        """A device trigger: fires on a message of ``topic`` whose ``event_type`` is ``payload``."""
        return self.topics.discovery("device_automation", object_id), {
            "automation_type": "trigger", "type": kind, "subtype": subtype, "topic": topic,
            "value_template": "{{ value_json.event_type }}", "payload": payload, "qos": 1,
            "device": self.device, "origin": self.origin,
        }


def discovery_messages(topics: Topics, wiring: Wiring) -> Messages:
    """Retained discovery config per topic: every entity and device trigger of the station."""
    make = _Builder(topics)
    entity, trigger = make.entity, make.trigger
    pairs = [
        entity("event", "doorbell", name="Doorbell", device_class="doorbell",
               state_topic=topics.doorbell, event_types=["press"]),
        entity("binary_sensor", "door", name=f"Door {wiring.door}", device_class="door",
               state_topic=topics.state_door, value_template="{{ value_json.state }}",
               payload_on="open", payload_off="closed"),
        # device_class lock: "on" means unlocked in Home Assistant.
        entity("binary_sensor", "lock", name=f"Lock {wiring.door}", device_class="lock",
               state_topic=topics.state_lock, value_template="{{ value_json.state }}",
               payload_on="unlocked", payload_off="locked"),
        entity("sensor", "call", name="Call", device_class="enum", options=CALL_STATES,
               state_topic=topics.state_call, value_template="{{ value_json.state }}"),
        entity("sensor", "unlock", name="Last unlock", device_class="enum",
               options=UNLOCK_RESULTS, state_topic=topics.state_unlock,
               value_template="{{ value_json.state }}",
               json_attributes_topic=topics.state_unlock,
               json_attributes_template="{{ {'at': value_json.at} | tojson }}"),
        # Availability itself, as a connectivity sensor that needs no availability topic.
        entity("binary_sensor", "online", available=False, name="Online",
               device_class="connectivity", entity_category="diagnostic",
               state_topic=topics.availability, payload_on=ONLINE, payload_off=OFFLINE),
    ]
    for button, slug in button_ids(wiring.buttons).items():
        pairs.append(entity("event", f"doorbell_{slug}", name=f"Doorbell {button}",
                            device_class="doorbell", state_topic=topics.doorbell_button(button),
                            event_types=["press"]))
        pairs.append(trigger(f"press_{slug}", PRESS_TRIGGER, button,
                             topics.doorbell_button(button), "press"))
    present = {TAMPER: wiring.tamper, FORCED_OPEN: wiring.door_contact,
               HELD_OPEN: wiring.door_contact}
    for alarm in ALARMS:
        if not present[alarm]:
            continue
        name, device_class, subtype = ALARM_ENTITIES[alarm]
        pairs.append(entity("binary_sensor", alarm, name=name, device_class=device_class,
                            state_topic=topics.state_alarms,
                            value_template=f"{{{{ 'ON' if value_json.{alarm} else 'OFF' }}}}"))
        pairs.append(trigger(alarm, ALARM_TRIGGER, subtype, topics.alarm, alarm))
    if wiring.ring_image:
        pairs.append(entity("image", "ring_image", name="Last ring",
                            image_topic=topics.ring_image, content_type="image/jpeg"))
    return dict(pairs) | _diagnostics(make)


def _diagnostics(make: _Builder) -> Messages:
    """The monitor's health figures and the self-test, all diagnostic."""
    entity, topics = make.entity, make.topics
    pairs = [
        entity("sensor", object_id, name=name, entity_category="diagnostic",
               state_topic=topics.state_health,
               value_template=f"{{{{ value_json.{key} }}}}", **extra)
        for object_id, name, key, extra in HEALTH_SENSORS
    ]
    pairs.append(entity(
        "binary_sensor", "clock_synchronized", name="Clock synchronised",
        entity_category="diagnostic", state_topic=topics.state_health,
        # None (unknown: timesyncd cannot be asked) is Home Assistant's "unknown".
        value_template="{% set s = value_json.clock_synchronized %}"
        "{{ 'None' if s is none else ('ON' if s else 'OFF') }}",
    ))
    pairs.append(entity(
        "binary_sensor", "problem", name="Problem", device_class="problem",
        entity_category="diagnostic", state_topic=topics.state_health,
        value_template="{{ 'ON' if value_json.alerts else 'OFF' }}",
        json_attributes_topic=topics.state_health,
        json_attributes_template="{{ {'alerts': value_json.alerts} | tojson }}",
    ))
    pairs.append(entity(
        "binary_sensor", "selftest", name="Self-test", device_class="problem",
        entity_category="diagnostic", state_topic=topics.state_selftest,
        value_template="{{ 'OFF' if value_json.passed else 'ON' }}",
        json_attributes_topic=topics.state_selftest,
        json_attributes_template="{{ {'failed': value_json.failed, 'at': value_json.at} "
        "| tojson }}",
    ))
    pairs.extend(  # one problem sensor a part: which one failed, at a glance
        entity("binary_sensor", f"selftest_{part}", name=f"Self-test {part.replace('_', ' ')}",
               device_class="problem", entity_category="diagnostic",
               state_topic=topics.state_selftest,
               value_template=f"{{% set o = value_json.parts.{part} %}}"
               "{{ 'None' if o == 'skipped' else ('ON' if o == 'failed' else 'OFF') }}")
        for part in SELFTEST_PARTS
    )
    return dict(pairs)
