"""Names the integration's modules share."""

from __future__ import annotations

DOMAIN = "intercom"
PLATFORMS = ["lock"]

CONF_STATION = "station"  # the station id: the commands' audience, in its topics
CONF_DOOR = "door"  # the door the commands open
CONF_PRINCIPAL = "principal"  # this Home Assistant's principal id at the station (kid)
CONF_TOPIC_PREFIX = "topic_prefix"  # the station's topic prefix; empty: intercom/<station>

DEFAULT_DOOR = "front"
DEFAULT_PRINCIPAL = "home-assistant"

STORAGE_VERSION = 1
RESULT_TIMEOUT_S = 10.0  # how long the lock waits for the station's answer


def storage_key(station: str, principal: str) -> str:
    """The private storage (``.storage/<key>``) of the key signing for ``principal``."""
    return f"{DOMAIN}.key.{station}.{principal}"
