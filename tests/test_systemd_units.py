"""The systemd units: they verify cleanly and stay locked down (exposure <= 2.0)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("intercom.service", "intercom-firstboot.service")
MAX_EXPOSURE = 2.0


@pytest.fixture
def root(tmp_path):
    """A root folder with the system's units and stand-ins for the daemon's binary."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD / unit, unit_dir / unit)
    binary = root / "opt/intercom/current/bin/intercom"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return root


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies_without_a_warning(root, unit):
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", unit],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_catches_a_broken_unit(root):
    # The check above is only worth something if verify complains about a bad line.
    unit = root / "etc/systemd/system/intercom.service"
    unit.write_text(unit.read_text().replace("@system-service", "@system-servic"))
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", "intercom.service"],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert "Unknown system call group" in result.stderr


def exposure(unit: Path) -> tuple[float, str]:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, check=False, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_exposure_is_at_most_two(unit):
    level, report = exposure(SYSTEMD / unit)
    assert level <= MAX_EXPOSURE, report


def test_exposure_check_notices_a_loosened_unit(tmp_path):
    loose = tmp_path / "intercom.service"
    text = (SYSTEMD / "intercom.service").read_text()
    for line in ("CapabilityBoundingSet=", "ProtectSystem=strict", "SystemCallFilter=",
                 "DevicePolicy=closed", "RestrictAddressFamilies=", "NoNewPrivileges=yes"):
        text = "\n".join(x for x in text.splitlines() if not x.startswith(line))
    loose.write_text(text)
    level, _ = exposure(loose)
    assert level > MAX_EXPOSURE


def test_service_is_notify_with_watchdog_and_own_user():
    text = (SYSTEMD / "intercom.service").read_text()
    for line in ("Type=notify", "User=intercom", "StateDirectory=intercom",
                 "ConfigurationDirectory=intercom", "Restart=on-failure", "DevicePolicy=closed",
                 "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert re.search(rf"^{re.escape(line)}$", text, re.MULTILINE), line
    assert re.search(r"^WatchdogSec=\d+s$", text, re.MULTILINE)
    assert re.search(r"^CapabilityBoundingSet=$", text, re.MULTILINE)
    allowed = re.findall(r"^DeviceAllow=char-(\S+) rw$", text, re.MULTILINE)
    assert set(allowed) == {"gpiochip", "video4linux", "media", "dma_heap", "alsa"}


def test_sysusers_and_tmpfiles_make_the_user_and_folders(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text("")
    (root / "etc/group").write_text("video:x:44:\naudio:x:29:\n")
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(SYSTEMD / "sysusers.d/intercom.conf")],
        check=True, capture_output=True, timeout=60,
    )
    passwd = (root / "etc/passwd").read_text()
    user = next(line for line in passwd.splitlines() if line.startswith("intercom:"))
    assert user.endswith(":/var/lib/intercom:/usr/sbin/nologin")
    groups = (root / "etc/group").read_text()
    for group in ("gpio", "video", "audio"):
        assert re.search(rf"^{group}:x:\d+:.*intercom", groups, re.MULTILINE), groups
    # No password: the shadow entry is locked.
    shadow = (root / "etc/shadow").read_text()
    assert re.search(r"^intercom:!\*?:", shadow, re.MULTILINE), shadow

    # A station provisioned before the config folder was the daemon's to write: its
    # config belongs to root, and tmpfiles hands it over at boot.
    (root / "etc/intercom").mkdir(mode=0o755)
    (root / "etc/intercom/intercom.toml").write_text("[station]\n")
    result = subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create",
         str(SYSTEMD / "tmpfiles.d/intercom.conf")],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (root / "var/lib/intercom").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/intercom/credentials").stat().st_mode & 0o777 == 0o700
    assert (root / "etc/intercom/credentials").stat().st_uid == 0
    assert (root / "var/lib/intercom-update").is_dir()
    # The config folder: root's, the daemon's group may write (the config writer renames
    # a new file in), others nothing; sticky, so root's credentials/ stays put.
    gid = int(re.search(r"^intercom:x:(\d+):", groups, re.MULTILINE)[1])
    uid = int(user.split(":")[2])
    etc = (root / "etc/intercom").stat()
    assert (etc.st_uid, etc.st_gid, etc.st_mode & 0o7777) == (0, gid, 0o1770)
    config = (root / "etc/intercom/intercom.toml").stat()
    assert (config.st_uid, config.st_gid, config.st_mode & 0o777) == (uid, gid, 0o640)


def test_service_may_write_its_config_folder_only():
    text = (SYSTEMD / "intercom.service").read_text()
    assert re.findall(r"^ReadWritePaths=(.*)$", text, re.MULTILINE) == ["/etc/intercom"]
    assert re.search(r"^ConfigurationDirectoryMode=1770$", text, re.MULTILINE)
