"""One connection attempt to a broker, to test a [mqtt] config before or after saving it.

The installer console's "network" check: the same credentials (``password_file`` or a
systemd credential, never a password typed into the page) and TLS files as the bridge,
read by ``link.read_password`` and ``link.tls_context``, one CONNECT, then a clean
DISCONNECT. With ``protocol = "auto"`` it tries MQTT 5 and, when the broker answers
that it does not speak it, MQTT 3.1.1, as the bridge does (``Link.protocols``). The
answer says what happened in plain words and which protocol connected; the password is
never in it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import aiomqtt

from intercom.config import MqttConfig
from intercom.errors import ConfigError
from intercom.mqtt.link import (
    PROTOCOL_REFUSED,
    connack_code,
    protocols_of,
    read_password,
    tls_context,
)

PROBE_TIMEOUT_S = 5.0


def _version(protocol: aiomqtt.ProtocolVersion) -> str:
    return "5" if protocol is aiomqtt.ProtocolVersion.V5 else "3.1.1"


async def probe(config: MqttConfig, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Connect once with ``config``: ``{"ok", "broker", "tls", "protocol", "detail", "ms"}``.

    ``protocol`` is the version that connected (``"5"`` or ``"3.1.1"``), else the last
    one tried.
    """
    broker = f"{config.host}:{config.effective_port}"
    answer: dict[str, Any] = {"ok": False, "broker": broker, "tls": config.uses_tls}
    try:
        password = await asyncio.to_thread(read_password, config)
        tls = await asyncio.to_thread(tls_context, config)
    except ConfigError as exc:
        return {**answer, "detail": "; ".join(exc.problems)}
    started = time.monotonic()
    protocols = protocols_of(config)
    for choice, protocol in enumerate(protocols):
        answer["protocol"] = _version(protocol)
        client = aiomqtt.Client(
            config.host, config.effective_port, username=config.username, password=password,
            identifier=f"intercom-test-{secrets.token_hex(4)}", tls_context=tls,
            timeout=timeout, protocol=protocol,
        )
        try:
            async with asyncio.timeout(timeout + 1):
                async with client:
                    pass
        except aiomqtt.MqttCodeError as exc:
            if connack_code(exc.rc) in PROTOCOL_REFUSED and choice + 1 < len(protocols):
                continue  # the broker does not speak MQTT 5: try 3.1.1
            return {**answer, "detail": f"refused by the broker: {exc}"}
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            return {**answer, "detail": f"cannot connect: {str(exc) or type(exc).__name__}"}
        ms = round((time.monotonic() - started) * 1000)
        return {**answer, "ok": True, "ms": ms,
                "detail": f"connected with MQTT {answer['protocol']} and disconnected cleanly"}
    return answer  # not reached: the last protocol returns
