"""First boot provisioning, run as the real command over real folders."""

from __future__ import annotations

import asyncio
import hashlib
import pwd
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc.jwk import OKPKey

from intercom.calls.pairing import Pairing, PairingError
from intercom.calls.turn import read_secret
from intercom.config import parse_settings
from intercom.deploy.firstboot import wpa_psk
from intercom.events import EventBus
from intercom.security.principals import Principal, Role
from intercom.security.registry import Registry
from intercom.security.secretbox import load_key

# Fresh per run: the tests look for these bytes where they must not be.
BROKER_SECRET = secrets.token_urlsafe(12)
WIFI_PASSPHRASE = secrets.token_urlsafe(12)


def station_registry(state: Path) -> Registry:
    """The registry the station opens at its start: first boot's key and database."""
    return Registry.for_state_dir(state, load_key(state), EventBus())  # made by first boot


async def registered(state: Path) -> list[Principal]:
    registry = station_registry(state)
    await registry.open()
    try:
        return registry.principals()
    finally:
        await registry.close()


def installer_public_key() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def installer_file(station: str = "door-1", extra: str = "") -> str:
    return f"""
[station]
id = "{station}"

[hardware]
buttons = [{{ pin = 17, flat = "1" }}]
relay = {{ pin = 27 }}

[mqtt]
host = "127.0.0.1"
username = "door"
password = "{BROKER_SECRET}"

[wifi]
ssid = "Building"
psk = "{WIFI_PASSPHRASE}"
country = "DE"

[installer]
public_key = '''{installer_public_key()}'''
valid_hours = 72
{extra}"""


@pytest.fixture
def dirs(tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "config.txt").write_text("arm_64bit=1\n")
    return {
        "boot": boot,
        "etc": tmp_path / "etc/intercom",
        "state": tmp_path / "state",
        "wifi": tmp_path / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf",
    }


def firstboot(dirs, *extra):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "intercom",
            "firstboot",
            "--boot-dir",
            str(dirs["boot"]),
            "--etc-dir",
            str(dirs["etc"]),
            "--state-dir",
            str(dirs["state"]),
            "--wifi-conf",
            str(dirs["wifi"]),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def everything_under(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.rglob("*") if p.is_file())


def test_wpa_psk_matches_the_ieee_test_vector():
    # IEEE 802.11i-2004, annex H.4: passphrase "password", SSID "IEEE".
    assert wpa_psk("IEEE", "password") == (
        "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"
    )


def test_first_boot_provisions_and_scrubs_the_boot_partition(dirs):
    (dirs["boot"] / "intercom.toml").write_text(installer_file())
    started = time.time()
    result = firstboot(dirs)
    assert result.returncode == 0, result.stderr

    # Nothing secret stays on the FAT partition.
    assert not (dirs["boot"] / "intercom.toml").exists()
    boot = everything_under(dirs["boot"])
    assert BROKER_SECRET.encode() not in boot
    assert WIFI_PASSPHRASE.encode() not in boot

    # The config is valid, readable by the daemon's group only, and holds no password.
    config = dirs["etc"] / "intercom.toml"
    assert config.stat().st_mode & 0o777 == 0o640
    text = config.read_text()
    assert BROKER_SECRET not in text
    assert 'password_credential = "intercom_mqtt-password"' in text
    check = subprocess.run(
        [sys.executable, "-m", "intercom", "check-config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr

    # Secrets went to root-only files; the Wi-Fi passphrase only as its derived PSK.
    secret = dirs["etc"] / "credentials/mqtt-password"
    assert secret.read_text() == BROKER_SECRET + "\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    wifi = dirs["wifi"].read_text()
    assert dirs["wifi"].stat().st_mode & 0o777 == 0o600
    assert WIFI_PASSPHRASE not in wifi
    assert f"psk={wpa_psk('Building', WIFI_PASSPHRASE)}" in wifi
    assert f"ssid={b'Building'.hex()}" in wifi

    # Keys exist, private, and the printed fingerprint is the station CA's, which
    # issued the certificate the station presents.
    keys = dirs["state"] / "keys"
    for name in ("station.key", "tls.key", "ca.key", "eventlog.key", "principals.key"):
        assert (keys / name).stat().st_mode & 0o777 == 0o600
    leaf, ca = x509.load_pem_x509_certificates((keys / "tls.crt").read_bytes())
    assert ca.subject.rfc4514_string() == "O=intercom door station,CN=door-1 door station CA"
    leaf.verify_directly_issued_by(ca)
    assert (keys / "ca.crt").read_bytes() == ca.public_bytes(serialization.Encoding.PEM)
    digest = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    assert ":".join(digest[i : i + 2] for i in range(0, 64, 2)) in result.stdout
    assert "trust.html" in result.stdout

    # A time-boxed installer principal, its TOTP enrolment printed once.
    [installer] = asyncio.run(registered(dirs["state"]))
    assert installer.role is Role.INSTALLER
    assert installer.valid_until is not None
    assert abs(installer.valid_until - (started + 72 * 3600)) < 60  # privacy default
    assert "otpauth://totp/" in result.stdout
    assert BROKER_SECRET not in result.stdout + result.stderr


def test_running_again_never_replaces_a_key(dirs):
    (dirs["boot"] / "intercom.toml").write_text(installer_file())
    assert firstboot(dirs).returncode == 0
    keys = dirs["state"] / "keys"
    before = {p.name: p.read_bytes() for p in keys.iterdir()}

    again = firstboot(dirs)  # no installer file now
    assert again.returncode == 0, again.stderr
    assert "otpauth" not in again.stdout

    # A new installer file re-provisions the config, never the keys or the principal.
    (dirs["boot"] / "intercom.toml").write_text(installer_file(station="door-2"))
    third = firstboot(dirs)
    assert third.returncode == 0, third.stderr
    assert 'id = "door-2"' in (dirs["etc"] / "intercom.toml").read_text()
    after = {p.name: p.read_bytes() for p in keys.iterdir()}
    # the certificate the station presents follows its names (re-issued for the same key
    # by the same CA, which cannot vouch for the new id: said so); every key stays
    assert after.pop("tls.crt") != before.pop("tls.crt")
    assert after == before
    assert "exists already" in third.stdout
    assert "TLS: the CA may not vouch for door-2, door-2.local" in third.stdout


def test_a_bad_installer_file_is_refused_and_still_scrubbed(dirs):
    (dirs["boot"] / "intercom.toml").write_text(installer_file(extra="\n[surprise]\nx = 1\n"))
    result = firstboot(dirs)
    assert result.returncode == 2
    assert "surprise: unknown key" in result.stderr
    assert not (dirs["boot"] / "intercom.toml").exists()
    error = (dirs["boot"] / "intercom-error.txt").read_text()
    assert "surprise: unknown key" in error
    boot = everything_under(dirs["boot"])
    assert BROKER_SECRET.encode() not in boot
    assert WIFI_PASSPHRASE.encode() not in boot
    rejected = dirs["etc"] / "installer-rejected.toml"
    assert rejected.stat().st_mode & 0o777 == 0o600
    assert not (dirs["state"] / "keys").exists()


def test_the_turn_secret_leaves_the_card_for_a_credential_the_daemon_reads(dirs):
    turn_secret = secrets.token_urlsafe(24)
    extra = f'\n[web.turn]\nurls = ["turn:turn.example.test:3478"]\nsecret = "{turn_secret}"\n'
    (dirs["boot"] / "intercom.toml").write_text(installer_file(extra=extra))
    result = firstboot(dirs)
    assert result.returncode == 0, result.stderr
    assert "TURN secret moved to a root-only credential" in result.stdout
    assert turn_secret.encode() not in everything_under(dirs["boot"])
    text = (dirs["etc"] / "intercom.toml").read_text()
    assert turn_secret not in text
    assert 'secret_credential = "intercom_turn-secret"' in text
    credential = dirs["etc"] / "credentials/turn-secret"
    assert credential.stat().st_mode & 0o777 == 0o600
    # as systemd hands it over (LoadCredential=intercom:DIR: intercom_FILE), the daemon
    # reads it and mints credentials with it
    handed = dirs["etc"] / "handed"
    handed.mkdir()
    (handed / "intercom_turn-secret").write_bytes(credential.read_bytes())
    settings = parse_settings(text)
    assert settings.web.turn is not None
    assert read_secret(settings.web.turn, {"CREDENTIALS_DIRECTORY": str(handed)}) == (
        turn_secret.encode())


def test_short_wifi_passphrase_is_refused(dirs):
    text = installer_file().replace(WIFI_PASSPHRASE, "short")
    (dirs["boot"] / "intercom.toml").write_text(text)
    result = firstboot(dirs)
    assert result.returncode == 2
    assert "wifi.psk: a WPA passphrase has 8 to 63 characters" in result.stderr


def test_nothing_to_provision_from_is_an_error(dirs):
    result = firstboot(dirs)
    assert result.returncode == 1
    assert "nothing to provision from" in result.stderr


def test_state_is_handed_to_the_daemon_user(dirs):
    (dirs["boot"] / "intercom.toml").write_text(installer_file())
    result = firstboot(dirs, "--owner", "daemon")
    assert result.returncode == 0, result.stderr
    uid = pwd.getpwnam("daemon").pw_uid
    assert all(p.stat().st_uid == uid for p in [dirs["state"], *dirs["state"].rglob("*")])
    config = (dirs["etc"] / "intercom.toml").stat()
    # The config writer renames a new file over it: only its owner may, in /etc/intercom.
    assert config.st_uid == uid
    assert config.st_mode & 0o777 == 0o640


def test_first_boot_spools_the_first_pairing_code(dirs):
    (dirs["boot"] / "intercom.toml").write_text(installer_file())
    result = firstboot(dirs)
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((dirs["state"] / "keys" / "ca.crt").read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    # The first pairing code, for the first button's flat, spooled for the station:
    # only its hash is on disk; the station takes it at start and it pairs a device.
    link = re.search(r"pairing link: (https://\S+)#pair=(\w+)&fp=([0-9a-f]{64})", result.stdout)
    assert link is not None, result.stdout
    assert link.group(3) == digest.lower()
    code = link.group(2)
    spool = (dirs["state"] / "pairing-spool.json").read_text()
    assert code not in spool
    assert (dirs["state"] / "pairing-spool.json").stat().st_mode & 0o777 == 0o600

    async def redeem() -> None:  # as the station does at its start
        registry = station_registry(dirs["state"])
        await registry.open()
        pairing = Pairing(dirs["state"], "door-1", frozenset({"1"}), EventBus(), registry)
        pairing.open()
        try:
            assert not (dirs["state"] / "pairing-spool.json").exists()
            device = Ed25519PrivateKey.generate().public_key()
            jwk = OKPKey.import_key(device).as_dict(private=False)
            paired = await pairing.redeem(code, jwk)
            assert paired.flat == "1"
            resident = registry.get(paired.principal)
            assert resident is not None
            assert (resident.role, resident.flats) == (Role.RESIDENT, ("1",))
            with pytest.raises(PairingError):
                await pairing.redeem(code, jwk)  # single use
        finally:
            pairing.close()
            await registry.close()

    asyncio.run(redeem())

    again = firstboot(dirs)  # no new installer file: no new code
    assert again.returncode == 0, again.stderr
    assert "pairing link" not in again.stdout
