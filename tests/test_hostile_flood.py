"""A flood of commands naming no registered signer costs the station nothing it needs.

A real Mosquitto and a running station: forged commands naming made-up ids (and plain
junk) are dropped as the station reads them, before the verifier, the fair queue or a
task sees them; a genuine command in the middle of the flood is granted. Speed under
floods is measured by ``scripts/bench unlock --flood-rates``, not here.
"""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from intercom.mqtt.link import LinkState
from intercom.security.principals import Role
from tests.test_mqtt_broker import PREFIX, bridge_of, until
from tests.test_mqtt_commands import (
    RESULT,
    clock,
    command_settings,
    connected_station,
    energised,
    flood_around,
    principals,
    results,
)

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

FLOOD = 3000
__all__ = ["clock"]  # the fixture, shared with the other command tests


async def test_unknown_ids_and_junk_are_dropped_on_reading(broker, sim_settings, clock):
    """3,000 forged commands naming nobody registered, junk among them, and one genuine.

    Before the admission check every one of them was parsed and denied by the verifier
    (3,000 denials, each a task's worth of work and a queue slot); now none reaches it.
    """
    async with connected_station(command_settings(sim_settings, broker.port)) as station, \
            aiomqtt.Client("127.0.0.1", broker.port) as watcher:
        (mallory,) = await principals(station, clock, "mallory")
        (manager,) = await principals(station, clock, "manager", role=Role.MANAGER)
        bridge = bridge_of(station)
        assert bridge.link.state is LinkState.CONNECTED
        forged = [mallory.token(kid=f"nobody-{i}") for i in range(50)]
        junk = ["", "not a token", "a.b.c", "e30.e30.", "x" * 600]
        flood = [(forged + junk)[i % (len(forged) + len(junk))] for i in range(FLOOD)]
        await watcher.subscribe(f"{PREFIX}/state/lock", qos=1)
        async with asyncio.timeout(10):
            await anext(watcher.messages)
        await watcher.unsubscribe(f"{PREFIX}/state/lock")
        await watcher.subscribe(RESULT, qos=1)
        verifier = station.verifier
        assert verifier is not None
        flood_around(broker.port, flood, manager.token(), before=FLOOD // 2)
        async with asyncio.timeout(20):  # a guard against hanging, not a speed goal
            while (await results(watcher, 1))[0]["result"] != "granted":
                pass
            await until(lambda: bridge.refused == FLOOD, what="the whole flood read")
        assert energised(station) == 1
        assert verifier.granted == 1
        assert verifier.denied == 0  # the verifier never saw one of them
        assert station.status()["mqtt"]["commands_dropped_unknown"] == FLOOD
