"""One owner for the station's state: the CLI beside a live daemon, revocation, restarts.

The daemon runs as a real process (``intercom run --simulate``); the CLI runs as real
processes beside it. After every step the daemon must hold no deleted file (the sign
of two processes working on different copies of a database) and must act on the change.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intercom.security import command

from .browser import SimStation
from .conftest import INTERCOM

DATABASES = ("principals.db", "eventlog.db")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``intercom ARGS`` as its own process."""
    done = subprocess.run([*INTERCOM, *args], capture_output=True, text=True, timeout=60,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"intercom {' '.join(args)}: {done.returncode} {done.stderr}")
    return done


def deleted_files(pid: int) -> list[str]:
    """The files a process holds open that no longer exist (``(deleted)`` in /proc)."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.endswith(" (deleted)") and any(db in target for db in DATABASES):
            held.append(target)
    return held


class Signer:
    """A principal's private key and TOTP, making unlock commands as a phone would."""

    def __init__(self, folder: Path, name: str) -> None:
        key = Ed25519PrivateKey.generate()
        self.private = folder / f"{name}.pem"
        self.private.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        self.public = folder / f"{name}.pub.pem"
        self.public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.id = name
        self.totp: pyotp.TOTP | None = None
        self._step = -1

    def enrol(self, output: str) -> None:
        """Take the TOTP secret from ``principals add``'s output."""
        uri = next(line for line in output.splitlines() if line.startswith("otpauth://"))
        self.totp = pyotp.parse_uri(uri)

    def token(self, station: str, door: str = "front", *, new_step: bool = True) -> str:
        """A fresh command; with ``new_step`` a TOTP code of a step not used before."""
        assert self.totp is not None
        now = time.time()
        step = int(now // 30)
        if new_step and step <= self._step:  # each step opens once: wait for the next
            time.sleep((self._step + 1) * 30 - now + 0.05)
            now, step = time.time(), self._step + 1
        self._step = step
        key = command.load_private_key(self.private.read_bytes())
        return command.sign(key, kid=self.id, station=station, door=door,
                            totp=self.totp.at(now), lifetime=60)


def unlock(state: Path, token: str) -> str:
    """``granted`` or ``denied``, as the CLI reports it."""
    done = cli("unlock", token, "--state-dir", str(state), check=False)
    return "granted" if done.returncode == 0 else "denied"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[SimStation]:
    station = SimStation(tmp_path / "state")
    # Quiet from here on: the start-up self-test (a background task) has logged its result.
    station.wait("the start-up self-test", lambda status: status.get("selftest"))
    yield station
    station.stop()


def station_id(daemon: SimStation) -> str:
    return str(daemon.status()["station"])


def assert_one_copy(daemon: SimStation) -> None:
    assert deleted_files(daemon.proc.pid) == [], "the daemon works on a deleted database"


def test_cli_beside_a_live_daemon_changes_what_the_daemon_sees(daemon: SimStation,
                                                               tmp_path: Path) -> None:
    state, sid = str(daemon.state_dir), station_id(daemon)
    alice = Signer(tmp_path, "alice")
    for round_ in range(2):  # twice: the second round runs on what the first left behind
        pid = f"alice{round_}"
        alice.id, alice._step = pid, -1  # a new principal: its own TOTP steps
        added = cli("principals", "add", "--role", "admin", "--public-key", str(alice.public),
                    "--id", pid, "--no-qr", "--state-dir", state)
        alice.enrol(added.stdout)
        assert_one_copy(daemon)
        assert pid in cli("principals", "list", "--state-dir", state).stdout
        assert unlock(daemon.state_dir, alice.token(sid)) == "granted"  # the daemon sees it
        assert_one_copy(daemon)

        cli("principals", "revoke", pid, "--state-dir", state)
        assert_one_copy(daemon)
        assert "revoked" in cli("principals", "show", pid, "--state-dir", state).stdout
        # At once, whatever the code: the revocation is checked before the signature.
        assert unlock(daemon.state_dir, alice.token(sid, new_step=False)) == "denied"

        cli("principals", "reset", pid, "--state-dir", state)
        assert_one_copy(daemon)

        paired = cli("pair", "--flat", "1", "--no-qr", "--state-dir", state)
        assert "pairing code" in paired.stdout
        assert_one_copy(daemon)

        erased = cli("privacy", "erase", "--principal", pid, "--state-dir", state)
        assert "registry entry deleted" in erased.stdout
        assert_one_copy(daemon)
        gone = cli("principals", "show", pid, "--state-dir", state, check=False)
        assert gone.returncode == 1
        assert f"no principal '{pid}'" in gone.stderr

        purged = cli("log", "purge", "--older-than", "1000", "--state-dir", state)
        assert "shredded" in purged.stdout
        assert_one_copy(daemon)

        installer = f"installer{round_}"  # the hand-off verbs: extend, then revoke
        cli("principals", "add", "--role", "installer", "--public-key", str(alice.public),
            "--id", installer, "--no-qr", "--state-dir", state)
        assert_one_copy(daemon)
        before = cli("principals", "show", installer, "--state-dir", state).stdout
        cli("privacy", "installer", "extend", installer, "--hours", "1", "--state-dir", state)
        assert_one_copy(daemon)
        assert cli("principals", "show", installer, "--state-dir", state).stdout != before
        cli("privacy", "installer", "revoke", installer, "--state-dir", state)
        assert_one_copy(daemon)
        assert "revoked" in cli("principals", "show", installer, "--state-dir", state).stdout
    # The audit trail of every change is in the daemon's one log, with the local actor.
    shown = cli("log", "show", "--json", "--type", "PrivilegedAction", "--state-dir", state)
    actions = [json.loads(line)["details"]["action"] for line in shown.stdout.splitlines()]
    expected = {"principal-add": 4, "principal-revoke": 2, "principal-reset": 2, "erase": 2,
                "installer-extend": 2, "revoke": 2}  # 'revoke': an installer's, at hand-off
    for action, count in expected.items():
        assert actions.count(action) == count, (action, actions)


def test_a_token_granted_before_kill_9_is_denied_after_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = SimStation(state)
    try:
        sid = station_id(first)
        bob = Signer(tmp_path, "bob")
        bob.enrol(cli("principals", "add", "--role", "admin", "--public-key", str(bob.public),
                      "--id", "bob", "--no-qr", "--state-dir", str(state)).stdout)
        token = bob.token(sid)
        assert unlock(state, token) == "granted"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    second = SimStation(state)
    try:
        assert unlock(state, token) == "denied"  # the spent id survived the kill
        assert "bob" in cli("principals", "list", "--state-dir", str(state)).stdout
        assert_one_copy(second)
    finally:
        second.stop()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Name to (size, mtime) of every file under ``folder`` but the live log files."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(("eventlog.db", "principals.db"))
    }


def test_a_second_station_exits_2_naming_the_first_and_touches_nothing(
    daemon: SimStation,
) -> None:
    before = snapshot(daemon.state_dir)
    records = len(cli("log", "show", "--json", "--state-dir", str(daemon.state_dir))
                  .stdout.splitlines())
    second = cli("run", "--simulate", "--state-dir", str(daemon.state_dir), check=False)
    assert second.returncode == 2
    assert f"pid {daemon.proc.pid}" in second.stderr
    assert snapshot(daemon.state_dir) == before  # no config hash, no socket, no key
    after = cli("log", "show", "--json", "--state-dir", str(daemon.state_dir)).stdout
    assert len(after.splitlines()) == records  # no audit record, no StationStarted
    assert daemon.status()["pid"] == daemon.proc.pid  # the first still answers


def test_commands_without_a_daemon_use_the_same_registry_under_the_lock(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    first = SimStation(state)  # a station makes its keys at its first start
    first.stop()
    carol = Signer(tmp_path, "carol")
    cli("principals", "add", "--role", "admin", "--public-key", str(carol.public),
        "--id", "carol", "--no-qr", "--state-dir", str(state))
    cli("principals", "revoke", "carol", "--state-dir", str(state))
    again = SimStation(state)
    try:
        shown = cli("principals", "show", "carol", "--state-dir", str(state)).stdout
        assert "revoked" in shown
        actions = cli("log", "show", "--json", "--type", "PrivilegedAction", "--state-dir",
                      str(state)).stdout
        assert '"principal-revoke"' in actions  # logged by the command, in the one log
    finally:
        again.stop()


def test_a_command_finds_no_station_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for args in (("principals", "list"), ("principals", "revoke", "x"), ("log", "show"),
                 ("privacy", "erase", "--principal", "x"), ("log", "purge", "--older-than", "1")):
        done = cli(*args, "--state-dir", str(missing), check=False)
        assert done.returncode == 1, args
        assert f"no station state in {missing}" in done.stderr
        assert "--state-dir" in done.stderr  # says how to point elsewhere
        assert not missing.exists(), args  # no state dir, no key as a side effect


def test_status_names_the_running_station(daemon: SimStation) -> None:
    status: dict[str, Any] = daemon.status()
    assert status["pid"] == daemon.proc.pid


def test_without_a_station_only_the_state_dir_s_owner_may_change_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = SimStation(state)
    first.stop()
    os.chown(state, 65534, 65534)  # the station's user (here: nobody), not this root
    done = cli("principals", "list", "--state-dir", str(state), check=False)
    assert done.returncode == 1
    assert "belongs to nobody" in done.stderr
    assert "sudo -u nobody" in done.stderr
    assert not (state / "instance.lock").read_text()  # nobody took the lock


def test_pair_without_a_daemon_spools_a_code_the_station_takes_at_start(
    tmp_path: Path,
) -> None:
    """``intercom pair`` with no station: made from the config under the lock, spooled."""
    import ssl  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    import tomli_w  # noqa: PLC0415

    from intercom.config import simulated_settings  # noqa: PLC0415

    from .mosquitto import free_port  # noqa: PLC0415
    from .test_calls_client import DeviceKey  # noqa: PLC0415

    state = tmp_path / "state"
    settings = simulated_settings(state).model_dump(mode="json", exclude_none=True)
    del settings["simulated"]
    settings["web"]["port"] = port = free_port()
    config = tmp_path / "intercom.toml"
    config.write_text(tomli_w.dumps(settings))
    SimStation(state, ("--config", str(config))).stop()  # its keys and CA, made at start

    lost = cli("pair", "--flat", "1", "--no-qr", "--state-dir", str(state), check=False)
    assert lost.returncode == 1
    assert "pass --config FILE" in lost.stderr  # no config: flats and address unknown
    wrong = cli("pair", "--flat", "9", "--no-qr", "--config", str(config), check=False)
    assert wrong.returncode == 1
    assert "flat '9' is not served by this station (its flats: 1" in wrong.stderr
    made = cli("pair", "--flat", "1", "--no-qr", "--config", str(config)).stdout
    assert "no station is running: it takes this code when it starts" in made
    link = next(line.split()[-1] for line in made.splitlines() if line.startswith("link:"))
    assert link.startswith(f"https://127.0.0.1:{port}/#pair=")
    code = link.split("#pair=")[1].split("&")[0]
    assert code not in (state / "pairing-spool.json").read_text()  # only its hash
    installer = cli("pair", "--installer", "--no-qr", "--config", str(config)).stdout
    assert f"https://127.0.0.1:{port}/installer.html#pair=" in installer
    assert "pairing code for an installer, valid 72 h once paired" in installer

    station = SimStation(state, ("--config", str(config)))
    try:
        online = station.request({"request": "pair", "flat": "1"})
        assert link.endswith("&fp=" + online["fingerprint"])  # the CA the station serves
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # loopback, this test's
        body = json.dumps({"code": code, "jwk": DeviceKey().jwk()}).encode()
        redeem = urllib.request.Request(f"https://127.0.0.1:{port}/api/pair", data=body,
                                        headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(redeem, context=tls, timeout=10) as answer:  # noqa: S310 - https, a literal URL
            assert answer.status == 200
            assert json.loads(answer.read())["flat"] == "1"
    finally:
        station.stop()
    assert not (state / "pairing-spool.json").exists()  # taken at the start
