"""Nothing private on the wire: what a denial's reason or a log-only field says stays home.

A station with a real Mosquitto takes forged and denied commands and one valid one. A
subscriber on ``#`` reads every payload the station publishes; the control socket's
``status`` and ``intercom status`` are read too. None may carry a denial's reason (it
would tell a forger how far his command got) nor any field an event class marks
log-only, nor a personal field but a principal id; ``UnlockDenied`` still goes out, as
type, door, via and claimed principal.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from intercom.config import Settings
from intercom.control import request
from intercom.events import EVENT_TYPES, Event, PrivilegedAction, UnlockDenied
from intercom.security.principals import Role
from intercom.station import Station
from tests.mosquitto import Broker
from tests.test_mqtt_broker import PREFIX, bridge_of, until
from tests.test_mqtt_commands import (
    COMMAND,
    command_settings,
    connected_station,
    energised,
    results,
)
from tests.test_security_kit import Clock, add_principal, claims, new_principal, raw_token

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

INTERCOM = [sys.executable, "-m", "intercom"]
ADMIN = "local:wire-privacy-admin"  # a distinctive actor: personal, never on the wire
# What stays in the station's own logs, whatever the classes say (they must say at least
# this): a denial's reason, and a privileged action's free-text detail.
LOG_ONLY = {"UnlockDenied": {"reason"}, "PrivilegedAction": {"detail"}}


class Wiretap:
    """Every message the broker passes on under ``#``, retained ones included."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="wiretap",
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe("#", qos=1)
            self.subscribed.set()
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                self.messages.append((message.topic.value, payload))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Wiretap]:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.subscribed.wait(), 5)
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def events(self) -> dict[int, dict[str, Any]]:
        """The bodies seen on ``<p>/events``, by seq."""
        return {body["seq"]: body for topic, payload in self.messages
                if topic == f"{PREFIX}/events" for body in [json.loads(payload)]}


def wrong_code(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


def log_only(event_type: str) -> set[str]:
    cls = EVENT_TYPES[event_type]
    return LOG_ONLY.get(event_type, set()) | set(getattr(cls, "log_only_fields", ()))


def log_only_values(events: list[Event]) -> set[str]:
    """Every non-empty value of a log-only field the bus carried, and the admin's id."""
    values = {ADMIN}
    for event in events:
        details = event.details()
        values |= {str(details[name]) for name in log_only(event.type) if details.get(name)}
    return values


def assert_private(text: str, hidden: list[str], where: str) -> None:
    for secret in hidden:
        assert secret not in text, f"{secret!r} leaked in {where}: {text[:400]}"


def assert_public_event(body: dict[str, Any], where: str) -> None:
    """Details of a published event: no log-only field, no personal one but principal."""
    cls = EVENT_TYPES[body["type"]]
    details = body["details"] if "details" in body else {
        k: v for k, v in body.items() if k not in {"type", "at"}}
    hidden = log_only(body["type"]) | (set(cls.personal_fields) - {"principal"})
    assert not hidden & set(details), f"{where}: {body}"


async def cli_status(state_dir: str, *extra: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = await asyncio.create_subprocess_exec(
        *INTERCOM, "status", "--state-dir", state_dir, *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def forge_and_grant(station: Station, attacker: aiomqtt.Client) -> list[Event]:
    """Principals, forged and denied commands, one grant; the events they caused."""
    clock = Clock()
    registry = station.registry
    assert registry is not None
    alice = await add_principal(registry, clock, "alice")
    bob = await add_principal(registry, clock, "bob")
    installer, installer_signer = new_principal(clock, "fitter", Role.INSTALLER)
    await registry.add(installer, installer_signer.secret)
    await registry.extend("fitter", time.time() + 7200, ADMIN, role=Role.INSTALLER)
    await registry.revoke("bob", ADMIN)
    _, mallory = new_principal(clock, "mallory")  # never registered
    forged = [
        alice.token(totp=wrong_code(alice.code())),  # good signature, wrong code
        raw_token({"alg": "none", "kid": "alice"}, claims(alice), b""),
        bob.token(),  # revoked
        mallory.token(kid="alice"),  # another key under alice's id
    ]
    valid = alice.token()
    await attacker.subscribe(f"{PREFIX}/command/result", qos=1)
    for token in [*forged, valid, valid]:  # the second 'valid' is a replay
        await attacker.publish(COMMAND, token, qos=1)
    answers = await results(attacker, len(forged) + 2)
    assert sorted(a["result"] for a in answers) == ["denied"] * 5 + ["granted"]
    assert all(set(a) == {"jti", "result"} for a in answers)
    assert energised(station) == 1
    # An unknown kid, through the control socket (the bridge may drop it unread).
    local = await request(station.state_dir, {"request": "unlock",
                                              "token": alice.token(kid="nobody")})
    assert local == {"ok": True, "result": "denied"}
    events = list(station.bus.recent)
    assert len(events) < (station.bus.recent.maxlen or 0)  # none fell out of the history
    return events


def check_mqtt(tap: Wiretap, hidden: list[str], denials: int) -> None:
    """Every payload on the wire: nothing hidden; denials still there, reason-less."""
    for topic, payload in tap.messages:
        assert_private(payload.decode("utf-8", "replace"), hidden, topic)
    published = tap.events()
    for body in published.values():
        assert_public_event(body, "MQTT")
    denied = [b for b in published.values() if b["type"] == "UnlockDenied"]
    assert len(denied) == denials  # still published, without the reason
    for body in denied:
        assert set(body["details"]) == {"door", "principal", "via"}
        assert body["details"]["door"] == "front"
    assert {b["details"]["via"] for b in denied} == {"mqtt", "cli"}
    assert {b["details"]["principal"] for b in denied} == {"", "alice", "bob"}
    audits = [b for b in published.values() if b["type"] == "PrivilegedAction"]
    assert {b["details"]["action"] for b in audits} >= {"installer-extend", "principal-revoke"}


async def check_status(station: Station, hidden: list[str]) -> None:
    """The control socket's status, and what ``intercom status`` prints."""
    answer = await request(station.state_dir, {"request": "status"})
    assert answer["ok"]
    assert_private(json.dumps(answer), hidden, "status")
    recent = answer["status"]["recent_events"]
    for body in recent:
        assert_public_event(body, "status")
    shown = [e for e in recent if e["type"] == "UnlockDenied"]
    assert shown
    assert all(set(e) == {"type", "at", "door", "principal", "via"} for e in shown)
    for extra in ((), ("--json",)):
        printed = await cli_status(str(station.state_dir), *extra)
        assert "UnlockDenied" in printed or not extra
        assert_private(printed, hidden, f"intercom status {' '.join(extra)}")


async def test_denial_reasons_and_log_only_fields_never_leave_the_station(
    broker: Broker, sim_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="intercom.events")
    settings = command_settings(sim_settings, broker.port)
    async with Wiretap(broker.port).running() as tap, \
            connected_station(settings) as station, \
            aiomqtt.Client("127.0.0.1", broker.port) as attacker:
        events = await forge_and_grant(station, attacker)
        denials = [e for e in events if isinstance(e, UnlockDenied)]
        reasons = {e.reason for e in denials}
        for expected in ("wrong TOTP code", "principal revoked", "unknown principal",
                         "algorithm not allowed: 'none'", "bad signature",
                         "replayed command id"):
            assert expected in reasons  # the station itself knows why
        actions = [e for e in events if isinstance(e, PrivilegedAction)]
        assert any(e.detail.startswith("until ") for e in actions)  # the installer's window
        hidden = sorted(reasons) + sorted(log_only_values(events) - reasons)  # reasons first
        # The station's own journal keeps the reason.
        assert any("reason=wrong TOTP code" in r.getMessage() for r in caplog.records)

        # Everything logged so far reaches the wiretap (the log commits in its own thread:
        # first every denial, then whatever the log holds by then).
        bridge = bridge_of(station)
        assert station.eventlog is not None

        def denials_seen() -> int:
            return sum(b["type"] == "UnlockDenied" for b in tap.events().values())

        await until(lambda: denials_seen() >= len(denials), 10, "every denial on the wire")
        last = station.eventlog.last_seq
        await until(lambda: bridge.cursor.seq >= last, 10, "events published")
        await until(lambda: max(tap.events(), default=0) >= last, 10, "events received")
        check_mqtt(tap, hidden, len(denials))
        await check_status(station, hidden)


def test_public_details_keeps_only_declared_public_fields() -> None:
    from intercom.events import public_details  # noqa: PLC0415 - the rest runs without it

    denied = UnlockDenied(door="front", principal="alice", via="mqtt", reason="wrong TOTP code")
    assert denied.public_dict() == {"type": "UnlockDenied", "at": denied.at, "door": "front",
                                    "principal": "alice", "via": "mqtt"}
    action = PrivilegedAction(actor=ADMIN, action="pair", target="res-1", detail="flat 12")
    assert public_details(action.type, action.details()) == {"action": "pair"}
    # Snapshots: the image and its key's name are personal; an erased id stays None.
    assert public_details("SnapshotTaken", {"button": "b", "flat": "1", "redacted": True,
                                            "bucket": "h-1", "image": "..."}) == {
        "button": "b", "flat": "1", "redacted": True}
    assert public_details("UnlockGranted", {"door": "front", "principal": None, "via": "call",
                                            "jti": "j"})["principal"] is None
    # What is not known to be public does not go out: unknown types, undeclared keys.
    assert public_details("LogRecordUnreadable", {"reason": "altered?"}) == {}
    assert public_details("DoorOpened", {"door": "front", "who": "Alice Example"}) == {
        "door": "front"}
    for name, cls in EVENT_TYPES.items():
        assert set(cls.log_only_fields) <= {f.name for f in dataclasses.fields(cls)}, name
