"""The door as a lock whose code is the station's TOTP: each unlock is signed here."""

from __future__ import annotations

import asyncio
from typing import Any

from homeassistant.components import mqtt
from homeassistant.components.lock import LockEntity
from homeassistant.components.mqtt.models import ReceiveMessage
from homeassistant.config_entries import ConfigEntry
from homeassistant.const import ATTR_CODE
from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from .const import CONF_STATION, CONF_TOPIC_PREFIX, DOMAIN, RESULT_TIMEOUT_S
from .signing import (
    GRANTED,
    Signer,
    SigningError,
    StationTopics,
    node_id,
    parse_lock_state,
    parse_result,
)


async def async_setup_entry(
    hass: HomeAssistant, entry: ConfigEntry, async_add_entities: AddEntitiesCallback
) -> None:
    """One lock: the entry's door."""
    signer: Signer = hass.data[DOMAIN][entry.entry_id]
    topics = StationTopics.of(entry.data[CONF_STATION], entry.data.get(CONF_TOPIC_PREFIX, ""))
    async_add_entities([IntercomLock(entry, signer, topics)])


class IntercomLock(LockEntity):
    """Unlocks with a signed command; locked and unlocked as the station's relay says."""

    _attr_has_entity_name = True
    _attr_code_format = r"^\d{6}$"
    _attr_should_poll = False

    def __init__(self, entry: ConfigEntry, signer: Signer, topics: StationTopics) -> None:
        self._signer = signer
        self._topics = topics
        self._waiting: dict[str, asyncio.Future[str]] = {}
        self._attr_name = f"Door {signer.door}"
        self._attr_unique_id = f"{entry.unique_id}.{signer.door}"
        self._attr_is_locked = None
        self._attr_available = False
        # The station's own device (from its MQTT discovery): the lock shows beside it.
        self._attr_device_info = DeviceInfo(
            identifiers={("mqtt", node_id(signer.station))},
            name=f"Intercom {signer.station}",
            manufacturer="intercom",
            model="door station",
        )

    async def async_added_to_hass(self) -> None:
        """Follow the station's answers, its relay and whether it is online."""
        for topic, handler in ((self._topics.result, self._on_result),
                               (self._topics.lock, self._on_lock),
                               (self._topics.availability, self._on_availability)):
            self.async_on_remove(await mqtt.async_subscribe(self.hass, topic, handler, qos=1))

    @callback
    def _on_result(self, message: ReceiveMessage) -> None:
        answer = parse_result(message.payload)
        if answer is None:
            return
        future = self._waiting.get(answer[0])
        if future is not None and not future.done():
            future.set_result(answer[1])

    @callback
    def _on_lock(self, message: ReceiveMessage) -> None:
        self._attr_is_locked = parse_lock_state(message.payload)
        self.async_write_ha_state()

    @callback
    def _on_availability(self, message: ReceiveMessage) -> None:
        payload = message.payload
        self._attr_available = (payload.decode() if isinstance(payload, bytes)
                                else str(payload)) == "online"
        self.async_write_ha_state()

    async def async_unlock(self, **kwargs: Any) -> None:
        """Sign a command with the typed code, publish it, and wait for the station's word."""
        code = str(kwargs.get(ATTR_CODE) or "")
        try:
            token, jti = self._signer.unlock(code)
        except SigningError as exc:
            raise HomeAssistantError(str(exc)) from exc
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[jti] = future
        try:
            await mqtt.async_publish(self.hass, self._topics.command, token, qos=1)
            async with asyncio.timeout(RESULT_TIMEOUT_S):
                result = await future
        except TimeoutError as exc:
            raise HomeAssistantError("The station did not answer the unlock command") from exc
        finally:
            self._waiting.pop(jti, None)
        if result != GRANTED:
            raise HomeAssistantError(
                "The station denied the unlock command: check the code and try again")

    async def async_lock(self, **kwargs: Any) -> None:  # noqa: ARG002 - HA passes the code
        """The station locks by itself once its pulse is over: nothing to send."""
        raise HomeAssistantError("The door locks by itself; there is nothing to lock")
