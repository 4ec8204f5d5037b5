"""Data subject rights and the installer hand-off, through the real ``intercom`` command."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pwd
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from joserfc.jwk import OKPKey

from intercom.config import EventLogConfig, simulated_settings
from intercom.eventlog.reader import Query
from intercom.eventlog.records import Entry
from intercom.eventlog.store import open_log
from intercom.eventlog.writer import LogWriter
from intercom.events import (
    DoorbellPressed,
    EventBus,
    PrincipalAdded,
    SnapshotTaken,
    UnlockDenied,
    UnlockGranted,
)
from intercom.identity import create_identity
from intercom.mqtt.bridge import event_json
from intercom.privacy.dsr import open_reader
from intercom.privacy.snapshots import bucket_of
from intercom.security.principals import Principal, Role
from intercom.station import Station
from tests.conftest import INTERCOM
from tests.test_security_kit import STATION, Clock, Signer, add_principal, open_registry

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

ALICE = "resident-alice-7f3a"
BOB = "resident-bob-19c2"
USER = pwd.getpwuid(os.geteuid()).pw_name


def intercom(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    return subprocess.run(
        [*INTERCOM, *args, "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, env=env,
    )


async def _register(state: Path, clock: Clock, principals: dict[str, Any]) -> list[Signer]:
    registry = await open_registry(state, EventBus(), clock)
    try:
        return [await add_principal(registry, clock, pid, **kw) for pid, kw in principals.items()]
    finally:
        await registry.close()


def register(state: Path, clock: Clock, **principals: Any) -> list[Signer]:
    """Add principals while no station runs, as first boot does (keys made when missing)."""
    create_identity(state)
    return asyncio.run(_register(state, clock, principals))


async def read_principal(state: Path, pid: str) -> Principal | None:
    """A principal as the station would load it (no station runs)."""
    registry = await open_registry(state, EventBus())
    try:
        return registry.get(pid)
    finally:
        await registry.close()


def snapshot_jpeg() -> bytes:
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:] = (40, 180, 220)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return bytes(data.tobytes())


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A station's state: two residents, their events, a snapshot of flat 1's ring."""
    state = tmp_path / "state"
    clock = Clock()
    register(state, clock, **{ALICE: {"flats": ("1",)}, BOB: {"flats": ("2",)}})
    identity = create_identity(state)
    conn, keyring = open_log(state, create=True)
    writer = LogWriter(conn, keyring, identity, EventLogConfig())
    ring = DoorbellPressed(button="bell", flat="1")
    events = [
        PrincipalAdded(principal=ALICE, role="resident"),
        PrincipalAdded(principal=BOB, role="resident"),
        ring,
        SnapshotTaken(at=ring.at, button="bell", flat="1", redacted=False,
                      bucket=bucket_of(ring.at),
                      image=base64.b64encode(snapshot_jpeg()).decode()),
        UnlockGranted(door="front", principal=ALICE, via="call", jti="j-1"),
        UnlockDenied(door="front", principal=BOB, via="mqtt", reason="wrong TOTP code"),
        UnlockGranted(door="front", principal=ALICE, via="mqtt", jti="j-2"),
    ]
    writer.append([Entry.from_event(e) for e in events])
    writer.close()
    return state


def test_export_writes_registry_entry_events_and_snapshots(state, tmp_path):
    out = tmp_path / "export"
    done = intercom(state, "privacy", "export", "--principal", ALICE, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o700
    entry = json.loads((out / "principal.json").read_text())
    assert entry["id"] == ALICE
    assert entry["role"] == "resident"
    assert entry["flats"] == ["1"]
    assert "secret" not in json.dumps(entry["public_key"])
    events = json.loads((out / "events.json").read_text())
    assert [e["type"] for e in events] == ["PrincipalAdded", "UnlockGranted", "UnlockGranted"]
    assert all(e["details"]["principal"] == ALICE for e in events)
    assert BOB not in (out / "events.json").read_text()
    (snap,) = json.loads((out / "snapshots.json").read_text())
    assert snap["flat"] == "1"
    assert (out / snap["file"]).read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    shown = intercom(state, "log", "show", "--json")
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    (export,) = [e for e in lines if e["type"] == "PrivilegedAction"]
    assert export["details"]["action"] == "export"
    assert export["details"]["actor"] == f"local:{USER}"
    assert export["details"]["target"] == ALICE


def test_erase_leaves_nothing_readable_and_the_log_verifies(state, tmp_path):
    done = intercom(state, "privacy", "erase", "--principal", ALICE)
    assert done.returncode == 0, done.stderr
    assert "event-log key destroyed" in done.stdout

    out = tmp_path / "after"
    done = intercom(state, "privacy", "export", "--principal", ALICE, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "nothing is held" in done.stdout
    assert json.loads((out / "principal.json").read_text()) is None
    assert json.loads((out / "events.json").read_text()) == []
    assert json.loads((out / "snapshots.json").read_text()) == []

    shown = intercom(state, "log", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    assert ALICE not in shown.stdout
    lines = [json.loads(line) for line in shown.stdout.splitlines()]
    granted = [e for e in lines if e["type"] == "UnlockGranted"]
    assert len(granted) == 2
    assert all(e["details"]["principal"] is None for e in granted)  # erased, record kept
    assert any(e["details"].get("principal") == BOB for e in lines), "others stay readable"
    erase = [e for e in lines if e["type"] == "PrivilegedAction"
             and e["details"]["action"] == "erase"]
    assert erase[0]["details"]["actor"] == f"local:{USER}"
    assert erase[0]["details"]["target"] == ""

    verify = intercom(state, "log", "verify", "--deep")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("ok:")
    # Nothing about her is left in the files at rest either.
    for name in ("principals.db", "eventlog.db"):
        assert ALICE.encode() not in (state / name).read_bytes()

    again = intercom(state, "privacy", "erase", "--principal", ALICE)
    assert again.returncode == 1
    assert "nothing is held" in again.stderr


async def test_expired_installer_cannot_unlock_until_extended_and_not_after_revoke(
    tmp_path,
):
    settings = simulated_settings(tmp_path / "state")
    settings = settings.model_copy(
        update={"station": settings.station.model_copy(update={"id": STATION})}
    )
    state = settings.station.state_dir
    clock = Clock()
    station = Station(settings)
    await station.start()
    try:
        assert station.registry is not None
        verifier = station.verifier
        assert verifier is not None
        installer = await add_principal(
            station.registry, clock, "installer-x", role=Role.INSTALLER,
            valid_from=clock() - 80 * 3600, valid_until=clock() - 8 * 3600,
        )

        def token() -> str:
            clock.now = time.time()  # the station's verifier reads the real clock
            return installer.token()

        assert verifier.decide(token())[0].reason == "principal expired"

        # The commands ask the running station (its control socket): the station's
        # loop must keep running while they do.
        done = await asyncio.to_thread(
            intercom, state, "privacy", "installer", "extend", "installer-x", "--hours", "2"
        )
        assert done.returncode == 0, done.stderr
        decision, _ = verifier.decide(token())
        assert decision.granted, decision.reason

        done = await asyncio.to_thread(
            intercom, state, "privacy", "installer", "revoke", "installer-x"
        )
        assert done.returncode == 0, done.stderr
        assert verifier.decide(token())[0].reason == "principal revoked"
    finally:
        await station.stop("test finished")
    refused = intercom(state, "privacy", "installer", "extend", "installer-x", "--hours", "9999")
    assert refused.returncode == 1
    shown = intercom(state, "log", "show", "--json")
    actions = [json.loads(line)["details"] for line in shown.stdout.splitlines()
               if json.loads(line)["type"] == "PrivilegedAction"]
    assert [(a["action"], a["actor"], a["target"]) for a in actions] == [
        ("config-first-use", "local:config-file", ""),  # the station's first start
        ("installer-extend", f"local:{USER}", "installer-x"),
        ("revoke", f"local:{USER}", "installer-x"),
    ]


def test_a_resident_is_not_an_installer(state):
    done = intercom(state, "privacy", "installer", "extend", ALICE)
    assert done.returncode == 1
    assert "not an installer" in done.stderr


def test_snapshots_command_gives_managers_redacted_images_and_residents_their_flat(
    state, tmp_path
):
    manager = intercom(state, "privacy", "snapshots", "--out", str(tmp_path / "m"))
    assert manager.returncode == 0, manager.stderr
    assert "(redacted)" in manager.stdout
    assert "1 snapshots written for a manager" in manager.stdout
    (image,) = (tmp_path / "m").glob("*.jpg")
    assert cv2.imread(str(image)).shape == (48, 64, 3)
    other = intercom(state, "privacy", "snapshots", "--for", "resident", "--flat", "2",
                     "--out", str(tmp_path / "r2"))
    assert "0 snapshots written" in other.stdout
    own = intercom(state, "privacy", "snapshots", "--for", "resident", "--flat", "1",
                   "--out", str(tmp_path / "r1"))
    assert "1 snapshots written" in own.stdout
    assert "(redacted)" not in own.stdout
    refused = intercom(state, "privacy", "snapshots", "--for", "resident", "--out",
                       str(tmp_path / "x"))
    assert refused.returncode == 1


async def test_pairing_and_config_changes_are_logged_with_their_actor(tmp_path):
    settings = simulated_settings(tmp_path / "state")
    station = Station(settings)
    await station.start()
    try:
        assert station.calls is not None
        code, _ = station.calls.pairing.new_code("1")
        jwk = {k: v for k, v in OKPKey.generate_key("Ed25519").as_dict(private=False).items()
               if k != "kid"}
        paired = await station.calls.pairing.redeem(code, jwk)
        for _ in range(100):
            if [e for e in station.bus.recent if e.type == "PrivilegedAction"][1:]:
                break
            await asyncio.sleep(0.01)
    finally:
        await station.stop("test finished")
    restarted = Station(settings.model_copy(update={
        "privacy": settings.privacy.model_copy(update={"snapshots": True})}))
    await restarted.start()
    await restarted.stop("test finished")
    shown = intercom(settings.station.state_dir, "log", "show", "--json")
    actions = [json.loads(line)["details"] for line in shown.stdout.splitlines()
               if json.loads(line)["type"] == "PrivilegedAction"]
    assert [(a["action"], a["actor"], a["target"]) for a in actions] == [
        ("config-first-use", "local:config-file", ""),
        ("pair", "local:control-socket", paired.principal),
        ("config-change", "local:config-file", ""),
    ]


def test_managers_broker_gets_no_image_no_actor_and_no_target(state):
    done = intercom(state, "privacy", "export", "--principal", BOB, "--out",
                    str(state.parent / "bob"))
    assert done.returncode == 0, done.stderr
    reader = open_reader(state)
    assert reader is not None
    published = [json.loads(event_json(e)) for e in reader.query(Query())]
    reader.conn.close()
    snap = next(e for e in published if e["type"] == "SnapshotTaken")
    assert snap["details"] == {"button": "bell", "flat": "1", "redacted": False}
    action = next(e for e in published if e["type"] == "PrivilegedAction")
    assert action["details"] == {"action": "export"}  # the detail is for the log only


def test_installer_extension_defaults_to_the_configured_validity(tmp_path):
    state = tmp_path / "state"
    clock = Clock()
    register(state, clock, **{"installer-y": {"role": Role.INSTALLER}})
    config = tmp_path / "intercom.toml"
    config.write_text(
        '[station]\nid = "door"\n[hardware]\nbuttons = [{pin = 17, flat = "1"}]\n'
        "relay = {pin = 27}\n[privacy]\ninstaller_valid_hours = 5\n"
    )
    done = intercom(state, "privacy", "installer", "extend", "installer-y", "--config",
                    str(config))
    assert done.returncode == 0, done.stderr
    installer = asyncio.run(read_principal(state, "installer-y"))
    assert installer is not None
    assert installer.valid_until == pytest.approx(clock() + 5 * 3600, abs=60)


def test_commands_on_a_state_dir_without_data_create_nothing_there(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert intercom(empty, "privacy", "erase", "--principal", ALICE).returncode == 1
    # No station has made its keys here: the export refuses, naming why, and writes
    # nothing (commands no longer make a station's state or keys).
    done = intercom(empty, "privacy", "export", "--principal", ALICE, "--out",
                    str(tmp_path / "out"))
    assert done.returncode == 1
    assert "no station state" in done.stderr
    assert not (tmp_path / "out").exists()
    assert intercom(empty, "privacy", "installer", "revoke", "x").returncode == 1
    assert list(empty.iterdir()) == []
