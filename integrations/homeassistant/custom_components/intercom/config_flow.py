"""Set up: which station and door, then a new key whose public half the installer enrols."""

from __future__ import annotations

import json
from typing import Any

import voluptuous as vol
from homeassistant.config_entries import ConfigFlow

try:
    from homeassistant.config_entries import ConfigFlowResult
except ImportError:  # Home Assistant before 2024.4
    from homeassistant.data_entry_flow import FlowResult as ConfigFlowResult

from . import key_store
from .const import (
    CONF_DOOR,
    CONF_PRINCIPAL,
    CONF_STATION,
    CONF_TOPIC_PREFIX,
    DEFAULT_DOOR,
    DEFAULT_PRINCIPAL,
    DOMAIN,
)
from .signing import check_settings, enrol_command, new_key, private_jwk, public_jwk


class IntercomConfigFlow(ConfigFlow, domain=DOMAIN):
    """Two steps: the station's names, then the public key to enrol and the command."""

    VERSION = 1

    def __init__(self) -> None:
        self._settings: dict[str, str] = {}
        self._key = new_key()  # kept in memory until the installer confirms the enrolment

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """The station id, the door, this Home Assistant's principal id, the topic prefix."""
        errors: dict[str, str] = {}
        if user_input is not None:
            settings = {
                CONF_STATION: str(user_input[CONF_STATION]).strip(),
                CONF_DOOR: str(user_input[CONF_DOOR]).strip(),
                CONF_PRINCIPAL: str(user_input[CONF_PRINCIPAL]).strip(),
                CONF_TOPIC_PREFIX: str(user_input.get(CONF_TOPIC_PREFIX) or "").strip(),
            }
            errors = check_settings(settings[CONF_STATION], settings[CONF_DOOR],
                                    settings[CONF_PRINCIPAL], settings[CONF_TOPIC_PREFIX])
            if not errors:
                await self.async_set_unique_id(
                    f"{settings[CONF_STATION]}.{settings[CONF_PRINCIPAL]}")
                self._abort_if_unique_id_configured()
                self._settings = settings
                return await self.async_step_enrol()
        schema = vol.Schema({
            vol.Required(CONF_STATION): str,
            vol.Required(CONF_DOOR, default=DEFAULT_DOOR): str,
            vol.Required(CONF_PRINCIPAL, default=DEFAULT_PRINCIPAL): str,
            vol.Optional(CONF_TOPIC_PREFIX, default=""): str,
        })
        return self.async_show_form(step_id="user", data_schema=schema, errors=errors)

    async def async_step_enrol(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Show the public key and the enrolment command; on confirming, keep the key."""
        settings = self._settings
        if user_input is None:
            return self.async_show_form(
                step_id="enrol",
                data_schema=vol.Schema({}),
                description_placeholders={
                    "jwk": json.dumps(public_jwk(self._key)),
                    "command": enrol_command(settings[CONF_PRINCIPAL], settings[CONF_DOOR]),
                },
            )
        store = key_store(self.hass, settings[CONF_STATION], settings[CONF_PRINCIPAL])
        await store.async_save({"jwk": private_jwk(self._key)})
        return self.async_create_entry(
            title=f"Intercom {settings[CONF_STATION]} ({settings[CONF_DOOR]})", data=settings)
