"""Prometheus text at /metrics: off by default, served only to a manager's bearer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import OKPKey
from prometheus_client.parser import text_string_to_metric_families

from intercom.config import Settings
from intercom.metrics import prometheus_text
from intercom.monitor import ALERTS
from intercom.security import command
from intercom.security.principals import Role
from intercom.security.verifier import Verifier
from intercom.station import Station

from .conftest import INTERCOM
from .test_calls_client import pinned
from .test_security_kit import SITE, Signer, add_principal, open_registry

DAY = 86_400


def with_metrics(settings: Settings, *, on: bool) -> Settings:
    monitor = settings.monitor.model_copy(update={"metrics": on})
    return settings.model_copy(update={"monitor": monitor})


@pytest.fixture
async def metrics_station(sim_settings: Settings) -> AsyncIterator[Station]:
    station = Station(with_metrics(sim_settings, on=True))
    await station.start()
    yield station
    await station.stop("test finished")


async def get_metrics(station: Station, token: str | None) -> tuple[int, dict[str, str], str]:
    assert station.calls is not None
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    pin = pinned(station)
    async with (
        aiohttp.ClientSession() as http,
        http.get(station.calls.url + "metrics", headers=headers, ssl=pin) as response,
    ):
        return response.status, dict(response.headers), await response.text()


def bearer(signer: Signer, station: str, **kw: Any) -> str:
    assert isinstance(signer.key, OKPKey)
    return command.sign_bearer(signer.key, kid=signer.pid, station=station, **kw)


async def test_metrics_are_off_by_default(station: Station):
    assert station.registry is not None
    manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
    status, _, _ = await get_metrics(station, bearer(manager, station.id))
    assert status == 404


async def test_a_manager_bearer_from_the_cli_reads_prometheus_text(
    metrics_station: Station, tmp_path: Path
):
    station = metrics_station
    assert station.registry is not None
    manager = await add_principal(station.registry, time.time, "mgr", Role.MANAGER)
    pem = tmp_path / "mgr.pem"
    pem.write_bytes(manager.key.get_op_key("sign").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    made = await asyncio.create_subprocess_exec(
        *INTERCOM, "sign-bearer", "--key", str(pem), "--kid", "mgr", "--station", station.id,
        "--days", "30", stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await made.communicate()
    assert made.returncode == 0
    status, headers, text = await get_metrics(station, out.decode().strip())
    assert status == 200, text
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(text)}
    rss = families["process_resident_memory_bytes"].samples[0].value
    assert 10 * 2**20 < rss < 2**31
    assert families["process_open_fds"].samples[0].value > 3
    assert families["intercom_uptime_seconds"].samples[0].value >= 0
    assert families["intercom_web_listening"].samples[0].value == 1
    assert families["intercom_camera_frames"].type == "counter"
    alerts = {s.labels["alert"]: s.value for s in families["intercom_alert_active"].samples}
    assert set(alerts) == set(ALERTS)
    assert "mgr" not in text


async def test_everything_but_a_valid_manager_bearer_is_refused(metrics_station: Station):
    station = metrics_station
    registry = station.registry
    assert registry is not None
    manager = await add_principal(registry, time.time, "mgr", Role.MANAGER)
    resident = await add_principal(registry, time.time, "res", Role.RESIDENT)
    admin = await add_principal(registry, time.time, "adm", Role.ADMIN)
    unlock = manager.token(station=station.id)
    refused = {
        "no header": None,
        "junk": "not a token",
        "a resident's bearer": bearer(resident, station.id),
        "an admin's bearer": bearer(admin, station.id),
        "another station's": bearer(manager, "elsewhere"),
        "expired": bearer(manager, station.id, lifetime=60, now=time.time() - 3600),
        "an unlock command": unlock,
    }
    for what, token in refused.items():
        status, headers, text = await get_metrics(station, token)
        assert status == 401, what
        assert headers["WWW-Authenticate"].startswith("Bearer"), what
        assert "process_resident_memory_bytes" not in text, what
    good = bearer(manager, station.id)
    assert (await get_metrics(station, good))[0] == 200
    await registry.revoke("mgr", "test")
    assert (await get_metrics(station, good))[0] == 401


async def test_the_verifier_checks_a_bearer_as_it_checks_a_command(tmp_path: Path, bus):
    registry = await open_registry(tmp_path, bus)
    now = time.time()
    verifier = Verifier(registry, SITE, bus, lock=None)
    await verifier.start()
    try:
        manager = await add_principal(registry, time.time, "mgr", Role.MANAGER)
        other = await add_principal(registry, time.time, "other", Role.MANAGER)
        ok = bearer(manager, SITE.station)
        assert verifier.check_bearer(ok, "metrics").granted
        assert verifier.check_bearer(ok, "metrics").granted  # not single use: a scraper's
        head, claims, _sig = ok.split(".")
        forged = f"{head}.{claims}.{bearer(other, SITE.station).split('.')[2]}"
        cases = {
            forged: "bad signature",
            bearer(manager, SITE.station, now=now + 3600): "issued in the future",
            bearer(manager, SITE.station, lifetime=60, now=now - 600): "expired",
        }
        for token, reason in cases.items():
            decision = verifier.check_bearer(token, "metrics")
            assert (decision.granted, decision.reason) == (False, reason)
        with pytest.raises(command.CommandFormatError, match="lifetime must be"):
            bearer(manager, SITE.station, lifetime=400 * DAY)
        assert verifier.granted == verifier.denied == 0  # a bearer is no unlock
    finally:
        await verifier.stop()
        await registry.close()


def test_prometheus_text_leaves_out_what_is_unknown():
    text = prometheus_text({"rss_bytes": 5, "cpu_temp_c": None, "disk_free_percent": 12.5,
                            "mqtt": "refused", "clock_synchronized": None,
                            "alerts": {"disk_low": {}}})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "intercom_cpu_temperature_celsius" not in families
    assert "intercom_clock_synchronized" not in families
    assert families["intercom_disk_free_ratio"].samples[0].value == 0.125
    assert families["intercom_mqtt_connected"].samples[0].value == 0
    alerts = {s.labels["alert"]: s.value for s in families["intercom_alert_active"].samples}
    assert alerts["disk_low"] == 1
    assert alerts["camera_stalled"] == 0
