"""The intercom door station: unlock from Home Assistant with a key of its own.

The station's entities (doorbell, door, lock state, call, alarms) come from its MQTT
discovery; this integration adds what discovery cannot: a ``lock`` entity that signs
each unlock command with this Home Assistant's own Ed25519 key and the code the person
types (the station's TOTP), publishes it, and reports the station's answer.
"""

from __future__ import annotations

from typing import Any

from homeassistant.components import mqtt
from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ConfigEntryError, ConfigEntryNotReady
from homeassistant.helpers.storage import Store

from .const import (
    CONF_DOOR,
    CONF_PRINCIPAL,
    CONF_STATION,
    DOMAIN,
    PLATFORMS,
    STORAGE_VERSION,
    storage_key,
)
from .signing import Signer, SigningError, key_from_jwk


def key_store(hass: HomeAssistant, station: str, principal: str) -> Store[dict[str, Any]]:
    """The private storage of the signing key (file mode 0600 under ``.storage``)."""
    return Store(hass, STORAGE_VERSION, storage_key(station, principal), private=True)


async def async_setup_entry(hass: HomeAssistant, entry: ConfigEntry) -> bool:
    """Load the signing key and set up the lock."""
    if not await mqtt.async_wait_for_mqtt_client(hass):
        raise ConfigEntryNotReady("MQTT is not connected")
    station, principal = entry.data[CONF_STATION], entry.data[CONF_PRINCIPAL]
    stored = await key_store(hass, station, principal).async_load()
    try:
        key = key_from_jwk((stored or {}).get("jwk", {}))
    except SigningError as exc:
        raise ConfigEntryError(f"the signing key in storage is unusable: {exc}") from exc
    hass.data.setdefault(DOMAIN, {})[entry.entry_id] = Signer(
        key=key, kid=principal, station=station, door=entry.data[CONF_DOOR])
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    return True


async def async_unload_entry(hass: HomeAssistant, entry: ConfigEntry) -> bool:
    """Unload the lock."""
    unloaded = await hass.config_entries.async_unload_platforms(entry, PLATFORMS)
    if unloaded:
        hass.data[DOMAIN].pop(entry.entry_id, None)
    return bool(unloaded)


async def async_remove_entry(hass: HomeAssistant, entry: ConfigEntry) -> None:
    """Destroy the signing key with the entry (revoke the principal at the station too)."""
    await key_store(hass, entry.data[CONF_STATION], entry.data[CONF_PRINCIPAL]).async_remove()
