"""The principals, sign-command and unlock commands, against a running station."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intercom.cli import main
from intercom.identity import create_identity
from intercom.security.secretbox import create_key
from intercom.station import Station
from tests.conftest import INTERCOM, Recorder

URI = re.compile(r"otpauth://totp/\S+")


def write_keypair(folder: Path, name: str, kind: str = "Ed25519") -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate() if kind == "Ed25519" else ec.generate_private_key(
        ec.SECP256R1()
    )
    private = folder / f"{name}.pem"
    public = folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    return private, public


def first_boot(state: Path) -> Path:
    """The station's keys, as its first start (or first boot) makes them; commands don't."""
    create_identity(state)
    create_key(state)
    return state


def add(state: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``intercom principals add`` with no station running (it runs the change itself)."""
    code = main(["principals", "add", *args, "--state-dir", str(state)])
    return code, capsys.readouterr().out


async def add_async(
    state: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    """``add`` from an async test: the command (it uses asyncio.run) runs in a thread."""
    code = await asyncio.to_thread(main, ["principals", "add", *args, "--state-dir", str(state)])
    return code, capsys.readouterr().out


def test_add_prints_uri_and_qr_and_list_show_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = first_boot(tmp_path / "state")
    _, pub = write_keypair(tmp_path, "a")
    _, pub2 = write_keypair(tmp_path, "b", "P-256")
    code, out = add(state, capsys, "--role", "resident", "--flat", "1", "--public-key", str(pub),
                    "--id", "alice")
    assert code == 0
    uri = URI.search(out)
    assert uri is not None
    assert "secret=" in uri.group(0)
    assert "\u2588" in out or "\u2580" in out  # the terminal QR code
    code, out = add(state, capsys, "--role", "installer", "--public-key", str(pub2), "--no-qr")
    assert code == 0
    assert "installer-" in out
    assert re.search(r"\.\. \d{4}-", out)  # installers get a valid-until by default
    assert main(["principals", "list", "--state-dir", str(state)]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing
    assert "P-256" in listing
    assert main(["principals", "show", "alice", "--state-dir", str(state)]) == 0
    shown = capsys.readouterr().out
    assert "Ed25519" in shown
    secret = uri.group(0).split("secret=")[1].split("&")[0]
    assert secret not in shown
    assert secret not in listing
    assert main(["principals", "revoke", "alice", "--state-dir", str(state)]) == 0
    assert main(["principals", "list", "--state-dir", str(state)]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["principals", "reset", "alice", "--state-dir", str(state)]) == 0
    assert main(["principals", "show", "nobody", "--state-dir", str(state)]) == 1
    assert (state / "keys" / "principals.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "args",
    [
        ["--role", "resident"],  # no flat
        ["--role", "resident", "--flat", "1", "--door", "front"],
        ["--role", "manager", "--flat", "1"],
        ["--role", "admin", "--door", "front"],
        ["--role", "admin", "--id", "bad id"],
        ["--role", "admin", "--valid-until", "yesterday"],
        ["--role", "admin", "--valid-from", "+2d", "--valid-until", "+1d"],
    ],
)
def test_add_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    _, pub = write_keypair(tmp_path, "a")
    state = first_boot(tmp_path / "state")
    code, _ = add(state, capsys, *args, "--public-key", str(pub))
    assert code == 1
    assert "no station state" not in capsys.readouterr().err  # refused for the input
    assert main(["principals", "list", "--state-dir", str(state)]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # the header: nothing was added


def test_add_refuses_unsupported_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    pub = tmp_path / "p384.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))
    state = first_boot(tmp_path / "state")
    code, _ = add(state, capsys, "--role", "admin", "--public-key", str(pub))
    assert code == 1
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    code, _ = add(state, capsys, "--role", "admin", "--public-key", str(junk))
    assert code == 1


async def run(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = await asyncio.create_subprocess_exec(
        *INTERCOM, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("kind", ["Ed25519", "P-256"])
async def test_sign_command_and_unlock_against_a_running_station(
    station: Station, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    recorder = Recorder(station.bus)
    state = station.state_dir
    private, public = write_keypair(tmp_path, "k", kind)
    flat = station.settings.hardware.buttons[0].flat
    code, out = await add_async(state, capsys, "--role", "resident", "--flat", flat,
                                "--public-key", str(public), "--id", "res1", "--no-qr")
    assert code == 0
    uri = URI.search(out)
    assert uri is not None
    secret_file = tmp_path / "totp.uri"
    secret_file.write_text(uri.group(0))
    code, token, err = await run(
        "sign-command", "--key", str(private), "--kid", "res1", "--station", station.id,
        "--door", station.settings.hardware.relay.door, "--totp-secret-file", str(secret_file),
    )
    assert code == 0, err
    token = token.strip()
    code, out, err = await run("unlock", token, "--state-dir", str(state))
    assert (code, out.strip()) == (0, "granted"), err
    assert station.lock is not None
    assert station.lock.state.value == "unlocked"
    assert [e.details()["via"] for e in recorder.of("UnlockGranted")] == ["cli"]
    # The same command again (here from stdin): denied, exit 1, no reason told.
    code, out, err = await run("unlock", "-", "--state-dir", str(state), stdin=token.encode())
    assert (code, out.strip()) == (1, "denied")
    assert "replay" not in out + err
    assert recorder.of("UnlockDenied")[-1].details()["reason"] == "replayed command id"


async def test_unlock_without_a_station_fails(tmp_path: Path) -> None:
    code, _, err = await run("unlock", "x.y.z", "--state-dir", str(tmp_path))
    assert code == 1
    assert "no station" in err


async def test_sign_command_refuses_a_public_key_and_a_bad_alg(tmp_path: Path) -> None:
    private, public = write_keypair(tmp_path, "k")
    common = ["sign-command", "--kid", "a", "--station", "s", "--door", "front",
              "--totp", "123456"]
    code, _, err = await run(*common, "--key", str(public))
    assert code == 1
    assert "private" in err
    code, _, err = await run(*common, "--key", str(private), "--alg", "ES256")
    assert code == 1
    code, _, _ = await run(*common[:-2], "--key", str(private))  # neither --totp nor a file
    assert code == 2


def test_list_of_an_empty_state_dir_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["principals", "list", "--state-dir", str(tmp_path / "none")]) == 1
    assert not (tmp_path / "none").exists()


async def test_principal_changes_are_logged_with_their_actor(
    tmp_path: Path, sim_settings, capsys: pytest.CaptureFixture[str]
) -> None:
    station = Station(sim_settings)  # makes the station key and the event log
    await station.start()
    await station.stop("test")
    state = sim_settings.station.state_dir
    _, pub = write_keypair(tmp_path, "inst")
    code, out = await add_async(state, capsys, "--role", "installer", "--public-key", str(pub),
                                "--id", "fitter", "--no-qr")
    assert code == 0
    valid = re.search(r"valid +(\S+) \.\. (\S+)", out)
    assert valid is not None
    span = dt.datetime.fromisoformat(valid.group(2)) - dt.datetime.fromisoformat(valid.group(1))
    assert span == dt.timedelta(hours=72)  # installers default to privacy.installer_valid_hours
    # No station runs: the commands make the change themselves (asyncio.run: a thread).
    assert await asyncio.to_thread(
        main, ["principals", "revoke", "fitter", "--state-dir", str(state)]
    ) == 0
    capsys.readouterr()
    assert main(["log", "show", "--json", "--state-dir", str(state)]) == 0
    actions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    actions = [
        a for a in actions
        if a["type"] == "PrivilegedAction" and a["details"]["action"].startswith("principal")
    ]
    assert [(a["details"]["action"], a["details"]["target"]) for a in actions] == [
        ("principal-add", "fitter"),
        ("principal-revoke", "fitter"),
    ]
    assert all(a["details"]["actor"].startswith("local:") for a in actions)
