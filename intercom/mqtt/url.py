"""``mqtt://HOST:PORT`` and ``mqtts://HOST:PORT`` broker addresses given on the command line."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from intercom.config import MqttConfig
from intercom.errors import ConfigError

SCHEMES = {"mqtt": False, "mqtts": True}


def config_from_url(url: str, base: MqttConfig | None = None) -> MqttConfig:
    """The MQTT settings for a broker URL, keeping everything else from ``base``.

    User names and passwords are not taken from URLs (they would show in ``ps``): put
    them in the config file, a password file or a systemd credential.
    """
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ConfigError([f"--mqtt: {url!r}: the scheme must be mqtt:// or mqtts://"])
    if parts.username or parts.password:
        raise ConfigError(["--mqtt: no credentials in the URL; use the config file"])
    if parts.path not in {"", "/"} or parts.query or parts.fragment:
        raise ConfigError([f"--mqtt: {url!r}: give only mqtt://HOST[:PORT]"])
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError([f"--mqtt: {url!r}: {exc}"]) from exc
    if not parts.hostname:
        raise ConfigError([f"--mqtt: {url!r}: the host is missing"])
    data: dict[str, Any] = base.model_dump() if base is not None else {}
    data.update(host=parts.hostname, port=port, tls=SCHEMES[parts.scheme] or data.get("tls", False))
    try:
        return MqttConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"--mqtt: {e['msg']}" for e in exc.errors()]) from exc
