"""Every MQTT topic the station uses, built in one place (docs/mqtt.md quotes this module)."""

from __future__ import annotations

from dataclasses import dataclass

ONLINE = "online"
OFFLINE = "offline"

# Bytes a topic may hold (MQTT allows 65535; we keep ours and the ones we honour short).
MAX_TOPIC_BYTES = 256


def default_prefix(station_id: str) -> str:
    """The prefix used when the config names none: ``intercom/<station id>``."""
    return f"intercom/{station_id}"


@dataclass(frozen=True)
class Topics:
    """The station's topics under one prefix, and its Home Assistant discovery topics."""

    prefix: str
    station_id: str
    discovery_prefix: str = "homeassistant"

    @property
    def availability(self) -> str:
        """``online`` / ``offline``, retained; ``offline`` is the last will."""
        return f"{self.prefix}/availability"

    @property
    def state_lock(self) -> str:
        """Retained JSON: the lock relay's state."""
        return f"{self.prefix}/state/lock"

    @property
    def state_door(self) -> str:
        """Retained JSON: the door contact's state."""
        return f"{self.prefix}/state/door"

    @property
    def state_call(self) -> str:
        """Retained JSON: the call state."""
        return f"{self.prefix}/state/call"

    @property
    def state_health(self) -> str:
        """Retained JSON: the latest health sample and the active alerts."""
        return f"{self.prefix}/state/health"

    @property
    def state_selftest(self) -> str:
        """Retained JSON: the latest self-test, each part's outcome and detail."""
        return f"{self.prefix}/state/selftest"

    @property
    def state_alarms(self) -> str:
        """Retained JSON: whether the cover is tampered, the door forced or held open."""
        return f"{self.prefix}/state/alarms"

    @property
    def state_unlock(self) -> str:
        """Retained JSON: the last unlock decision, granted or denied, and when."""
        return f"{self.prefix}/state/unlock"

    @property
    def events(self) -> str:
        """Every logged event as JSON with its seq and type, QoS 1."""
        return f"{self.prefix}/events"

    @property
    def doorbell(self) -> str:
        """A press as ``{"event_type": "press", ...}``, for Home Assistant's event entity."""
        return f"{self.prefix}/doorbell"

    def doorbell_button(self, button: str) -> str:
        """One button's presses, ``{"event_type": "press", ...}`` (its event entity, trigger)."""
        return f"{self.prefix}/doorbell/{button}"

    @property
    def alarm(self) -> str:
        """An alarm as it happens, ``{"event_type": "tamper" | ...}`` (device triggers)."""
        return f"{self.prefix}/alarm"

    @property
    def ring_image(self) -> str:
        """A JPEG of the latest ring, redacted, not retained (Home Assistant's image entity)."""
        return f"{self.prefix}/ring_image"

    @property
    def command(self) -> str:
        """In: a signed command (compact JWS)."""
        return f"{self.prefix}/command"

    @property
    def command_result(self) -> str:
        """Out: ``{"jti": ..., "result": "granted" | "denied"}``."""
        return f"{self.prefix}/command/result"

    @property
    def checkpoint(self) -> str:
        """Retained JSON: the latest signed event-log checkpoint."""
        return f"{self.prefix}/log/checkpoint"

    @property
    def node_id(self) -> str:
        """The station's node id in Home Assistant discovery topics."""
        return "intercom_" + "".join(c if c.isalnum() else "_" for c in self.station_id)

    def discovery(self, component: str, object_id: str) -> str:
        """``<discovery prefix>/<component>/<node id>/<object id>/config``."""
        return f"{self.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"

    def response_topic_allowed(self, topic: str) -> bool:
        """Whether a requester's MQTT 5 response topic may be published to.

        A response topic must be a plain topic (no wildcards, not ``$``-reserved, short)
        and must not point into the station's own topics, except below
        ``<prefix>/command/result/``, nor into the discovery tree: a command may ask
        where its answer goes, never make the station overwrite its own state.
        """
        if not topic or len(topic.encode()) > MAX_TOPIC_BYTES:
            return False
        if any(c in topic for c in "#+\0") or topic.startswith("$"):
            return False
        if topic.startswith(self.command_result + "/"):
            return True
        own = (self.prefix, self.discovery_prefix)
        return not any(topic == p or topic.startswith(p + "/") for p in own)
