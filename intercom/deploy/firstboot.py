"""First boot: provision a station from the installer file on the boot partition.

The installer writes ``intercom.toml`` to the FAT boot partition: a station config
(``intercom check-config`` rules) plus two sections only first boot reads::

    [wifi]        ssid, psk, country        -> wpa_supplicant (root-only), PSK hashed
    [installer]   public_key, valid_hours   -> a time-boxed installer principal
                  phone = true              -> or a code pairing the installer's phone
    [pairing]     flat                      -> the first pairing code (default: first button's)

Secrets leave the FAT partition: the Wi-Fi passphrase becomes a wpa_supplicant PSK,
an ``mqtt.password`` becomes the root-only file ``credentials/mqtt-password`` (a
``web.turn.secret`` ``credentials/turn-secret``) that systemd hands to the daemon
(``LoadCredential=``), and the installer file is
overwritten and removed. Keys are made only when missing: running again never
replaces one.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import json
import os
import pwd
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import tomli_w

from intercom import __version__
from intercom.config import Settings, parse_settings
from intercom.deploy.stationca import grouped
from intercom.deploy.tlscert import (
    load_or_create_tls,
    load_owner_pair,
    names_for,
    station_url,
)
from intercom.errors import ConfigError, IntercomError
from intercom.eventlog.keys import create_master_key, master_key_source
from intercom.events import EventBus
from intercom.identity import create_identity
from intercom.safefiles import replace_atomically
from intercom.security.pairingcodes import spool_code
from intercom.security.principals import Principal, Role, public_jwk_from_file
from intercom.security.registry import Registry
from intercom.security.secretbox import create_key
from intercom.security.totp import enrolment_uri, new_secret
from intercom.statedir import InstanceLock

INSTALLER_FILE = "intercom.toml"
ERROR_FILE = "intercom-error.txt"
CONFIG_FILE = "intercom.toml"
CREDENTIALS = "credentials"
MQTT_CRED_FILE = "mqtt-password"
# LoadCredential=intercom:/etc/intercom/credentials names each file intercom_FILE.
MQTT_CREDENTIAL = f"intercom_{MQTT_CRED_FILE}"
TURN_CRED_FILE = "turn-secret"
# Secrets an installer file may hold, each moved to a root-only credential file: (the
# table's keys, the secret's key, the key naming the credential, the file, what it is).
MOVED_SECRETS = (
    (("mqtt",), "password", "password_credential", MQTT_CRED_FILE, "broker password"),
    (("web", "turn"), "secret", "secret_credential", TURN_CRED_FILE, "TURN secret"),
)
DEFAULT_WIFI_CONF = Path("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf")
MARKER = "provisioned.json"
MAX_INSTALLER_HOURS = 30 * 24


@dataclass
class Report:
    """What one first-boot run did, for the console."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        """Add a line."""
        self.lines.append(line)


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically with a file of ``mode``, durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, data, mode)


def _scrub(path: Path) -> None:
    """Overwrite a file with zeros, flush it, then remove it."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.write(b"\0" * size)
        handle.flush()
        os.fsync(handle.fileno())
    path.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def keys_only(problems: list[str]) -> list[str]:
    """Config problems without the values they echo: first boot's output names keys only.

    Its error file lands on the FAT boot partition and its messages in the journal; a
    secret given with the wrong type (a TURN credential as a number) must not follow.
    """
    return [line.split(", got ", 1)[0] for line in problems]


def wpa_psk(ssid: str, passphrase: str) -> str:
    """The WPA2 pre-shared key wpa_supplicant derives from a passphrase (hex)."""
    if not 8 <= len(passphrase) <= 63:
        raise ConfigError(["wifi.psk: a WPA passphrase has 8 to 63 characters"])
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32).hex()


def wifi_config(wifi: dict[str, Any]) -> bytes:
    """A wpa_supplicant config for one network, without the passphrase itself."""
    problems = [f"wifi.{k}: unknown key" for k in wifi if k not in {"ssid", "psk", "country"}]
    ssid, psk, country = wifi.get("ssid"), wifi.get("psk"), wifi.get("country", "")
    if not isinstance(ssid, str) or not 1 <= len(ssid.encode()) <= 32:
        problems.append("wifi.ssid: required, 1 to 32 bytes")
    if not isinstance(psk, str):
        problems.append("wifi.psk: required (the WPA passphrase)")
    if not isinstance(country, str) or (country and not re.fullmatch(r"[A-Z]{2}", country)):
        problems.append("wifi.country: a two-letter code such as DE")
    if problems or not isinstance(ssid, str) or not isinstance(psk, str):
        raise ConfigError(problems)
    lines = ["ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev", "update_config=0"]
    if country:
        lines.append(f"country={country}")
    lines += ["network={", f"    ssid={ssid.encode().hex()}", f"    psk={wpa_psk(ssid, psk)}",
              "    key_mgmt=WPA-PSK", "}"]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class FirstBoot:
    """One provisioning run over a boot partition, /etc/intercom and the state folder."""

    boot_dir: Path
    etc_dir: Path
    state_dir: Path
    owner: str | None = None
    wifi_conf: Path = DEFAULT_WIFI_CONF
    now: Callable[[], float] = time.time
    report: Report = field(default_factory=Report)

    def run(self) -> Report:
        """Provision; raise ConfigError when the installer file is unusable."""
        installer = self.boot_dir / INSTALLER_FILE
        extra: dict[str, Any] = {}
        took_file = installer.exists()
        if took_file:
            extra = self._take_installer_file(installer)
        config = self.etc_dir / CONFIG_FILE
        if not config.exists():
            raise IntercomError(
                f"no {config} and no installer file {installer}: nothing to provision from"
            )
        try:
            settings = parse_settings(config.read_text(), source=str(config))
        except ConfigError as exc:  # for the journal: keys, never values
            raise ConfigError(keys_only(exc.problems)) from None
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with InstanceLock(self.state_dir, "cli"):  # no station runs beside first boot
            return self._provision(settings, extra, took_file)

    def _provision(self, settings: Any, extra: dict[str, Any], took_file: bool) -> Report:
        """Make the keys, the installer and the first pairing code (under the lock)."""
        identity = create_identity(self.state_dir)  # first boot is one of the key makers
        create_key(self.state_dir)
        self.report.add(f"station {settings.station.id}, intercom {__version__}")
        self.report.add(f"station key fingerprint {identity.fingerprint}")
        link_fp = self._tls(settings)  # the form pairing links carry
        source = master_key_source(self.state_dir)
        if not source.credential and not source.path.exists():
            create_master_key(self.state_dir)
            self.report.add("event log master key made")
        section = extra.get("installer")
        hours = settings.privacy.installer_valid_hours
        if isinstance(section, dict) and section.get("phone") is True:
            self._installer_phone_code(settings, section, link_fp, hours)
        elif "installer" in extra:
            self._installer_principal(section, settings.station.id, hours)
        if took_file:  # a new installer file: a new first pairing code with it
            self._first_pairing_code(settings, extra.get("pairing"), link_fp)
        _write_private(
            self.state_dir / MARKER,
            json.dumps({"at": int(self.now()), "version": __version__}).encode(),
        )
        self._hand_over()
        return self.report

    def _take_installer_file(self, installer: Path) -> dict[str, Any]:
        """Move the config to /etc, its secrets to root-only files; scrub the FAT copy."""
        raw = installer.read_bytes()
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        data, extra = self._sections(installer, raw)
        moved: list[tuple[str, str, str]] = []  # (file, secret, what)
        for path, key, named, file, what in MOVED_SECRETS:
            table: Any = data
            for part in path:
                table = table.get(part) if isinstance(table, dict) else None
            secret = table.pop(key, None) if isinstance(table, dict) else None
            if secret is None:
                continue
            if not isinstance(secret, str):
                self._reject(installer, raw, [f"{'.'.join((*path, key))}: must be a string"])
            table[named] = f"intercom_{file}"
            moved.append((file, secret, what))
        try:
            text = tomli_w.dumps(data)
        except RecursionError:  # parsed, but too deep to write back (dotted keys)
            self._reject(installer, raw, [f"{installer}: not valid TOML: nested too deeply"])
        try:
            parse_settings(text, source=str(installer))
            wifi = wifi_config(extra["wifi"]) if "wifi" in extra else None
        except ConfigError as exc:
            self._reject(installer, raw, exc.problems)
        for file, secret, what in moved:
            _write_private(self.etc_dir / CREDENTIALS / file, secret.encode() + b"\n")
            (self.etc_dir / CREDENTIALS).chmod(0o700)
            self.report.add(f"{what} moved to a root-only credential")
        if wifi is not None:
            _write_private(self.wifi_conf, wifi)
            self.report.add(f"Wi-Fi {extra['wifi']['ssid']!r} configured (passphrase hashed)")
        _write_private(self.etc_dir / CONFIG_FILE, text.encode(), 0o640)
        _scrub(installer)
        self.report.add(f"config moved to {self.etc_dir / CONFIG_FILE}; installer file removed")
        return extra

    def _sections(self, installer: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
        """The installer file's config, and its first-boot tables (wifi, installer, pairing)."""
        try:
            data = tomllib.loads(raw.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            self._reject(installer, raw, [f"{installer}: not valid TOML: {exc}"])
        except RecursionError:
            self._reject(installer, raw, [f"{installer}: not valid TOML: nested too deeply"])
        extra: dict[str, Any] = {
            k: data.pop(k) for k in ("wifi", "installer", "pairing") if k in data
        }
        for key, value in extra.items():
            if not isinstance(value, dict):
                self._reject(installer, raw, [f"{key}: must be a table ([{key}])"])
        return data, extra

    def _reject(self, installer: Path, raw: bytes, problems: list[str]) -> NoReturn:
        """Keep a bad installer file root-only, leave the reasons on the boot partition."""
        problems = keys_only(problems)
        _write_private(self.etc_dir / "installer-rejected.toml", raw)
        _scrub(installer)
        (self.boot_dir / ERROR_FILE).write_text(
            "intercom first boot refused intercom.toml (moved off this partition):\n"
            + "".join(f"  {p}\n" for p in problems)
            + "Fix it and put a corrected intercom.toml here.\n"
        )
        raise ConfigError(problems) from None  # the cause would carry the values

    def _tls(self, settings: Settings) -> str:
        """Make the station's CA and certificate (or read the owner's); the link fingerprint."""
        web, station = settings.web, settings.station.id
        if web.tls_cert_file is not None and web.tls_key_file is not None:
            try:
                pair = load_owner_pair(web.tls_cert_file, web.tls_key_file)
            except ConfigError as exc:
                self.report.add(f"TLS: the owner's certificate is not usable yet ({exc}); the "
                                "station will not start until it is")
                return ""
            self.report.add(f"TLS certificate SHA-256 {grouped(pair.fingerprint)} (the owner's, "
                            "web.tls_cert_file)")
            return pair.fingerprint
        tls = load_or_create_tls(self.state_dir, station, names_for(station, web))
        new = " (new)" if "CA certificate made" in tls.made else ""
        url = station_url(settings.web)
        self.report.add(f"TLS certificate SHA-256 {grouped(tls.fingerprint)}{new}: the station's "
                        f"own CA, which residents install from {url}trust.html")
        for what in tls.made:
            if "replaces" in what:
                self.report.add(f"TLS: {what}")
        if tls.uncovered:
            self.report.add("TLS: the CA may not vouch for " + ", ".join(tls.uncovered))
        return tls.fingerprint

    def _first_pairing_code(self, settings: Settings, section: Any, fingerprint: str) -> None:
        """Spool the first pairing code for the station to take when it starts."""
        flat = settings.hardware.buttons[0].flat
        if isinstance(section, dict) and "flat" in section:
            flat = str(section["flat"])
        if flat not in {b.flat for b in settings.hardware.buttons}:
            raise ConfigError([f"pairing.flat: {flat!r} is not served by this station"])
        code, expires = spool_code(self.state_dir, flat, self.now())
        until = time.strftime("%H:%M UTC", time.gmtime(expires))
        self.report.add(f"first pairing code for flat {flat}: {code} (single use, until {until})")
        self.report.add(f"pairing link: {station_url(settings.web)}#pair={code}&fp={fingerprint}")

    def _installer_phone_code(
        self, settings: Settings, section: dict[str, Any], fingerprint: str, default_hours: float
    ) -> None:
        """Spool a code that pairs the installer's phone (the console, installer.html)."""
        if extra := set(section) - {"phone", "valid_hours"}:
            raise ConfigError([f"installer.{min(extra)}: not with phone = true"])
        hours = section.get("valid_hours", default_hours)
        if not isinstance(hours, int | float) or not 1 <= hours <= MAX_INSTALLER_HOURS:
            raise ConfigError([f"installer.valid_hours: 1 to {MAX_INSTALLER_HOURS}"])
        code, expires = spool_code(self.state_dir, "", self.now(), float(hours))
        until = time.strftime("%H:%M UTC", time.gmtime(expires))
        self.report.add(f"installer pairing code: {code} (single use, until {until}; the "
                        f"installer stays valid {hours:g} h once paired)")
        self.report.add(f"installer link: {station_url(settings.web)}installer.html#pair={code}"
                        f"&fp={fingerprint}")

    def _installer_principal(self, section: Any, station_id: str, default_hours: float) -> None:
        """Register a time-boxed installer with a fresh TOTP secret; print its enrolment."""
        if not isinstance(section, dict) or not isinstance(section.get("public_key"), str):
            raise ConfigError(["installer.public_key: required (PEM or JWK of the installer)"])
        hours = section.get("valid_hours", default_hours)
        if not isinstance(hours, int | float) or not 1 <= hours <= MAX_INSTALLER_HOURS:
            raise ConfigError([f"installer.valid_hours: 1 to {MAX_INSTALLER_HOURS}"])
        now = self.now()
        pid = f"installer-{time.strftime('%Y%m%d', time.gmtime(now))}"
        principal = Principal(
            id=pid, role=Role.INSTALLER,
            jwk=public_jwk_from_file(section["public_key"].encode()),
            valid_from=now, valid_until=now + hours * 3600, created_at=now,
        )
        secret = new_secret()
        if not asyncio.run(self._register(principal, secret)):
            self.report.add(f"installer principal {pid} exists already; unchanged")
            return
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now + hours * 3600))
        self.report.add(f"installer principal {pid}, valid until {until}")
        self.report.add(f"enrol its TOTP: {enrolment_uri(secret, pid, f'intercom {station_id}')}")

    async def _register(self, principal: Principal, secret: str) -> bool:
        """Add the installer through the registry; False when the id exists already."""
        registry = Registry.for_state_dir(
            self.state_dir, create_key(self.state_dir), EventBus(), create=True
        )
        await registry.open()
        try:
            if registry.get(principal.id) is not None:
                return False
            await registry.add(principal, secret, actor="local:first-boot")
            return True
        finally:
            await registry.close()

    def _hand_over(self) -> None:
        """Give the state folder to the daemon's user and the config to its group."""
        if self.owner is None:
            return
        try:
            user = pwd.getpwnam(self.owner)
            gid = grp.getgrnam(self.owner).gr_gid
        except KeyError as exc:
            raise IntercomError(f"user or group {self.owner!r} does not exist") from exc
        for path in [self.state_dir, *self.state_dir.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        # The daemon's config writer replaces the file by a rename in /etc/intercom
        # (sticky, group-writable: tmpfiles.d/intercom.conf), which only its owner may do.
        config = self.etc_dir / CONFIG_FILE
        if config.exists():
            os.chown(config, user.pw_uid, gid, follow_symlinks=False)
