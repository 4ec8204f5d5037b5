"""The SD image: built for real by image-build/build, then taken apart and checked.

The image is read without mounting it: sfdisk for the partition table, mtools for the
FAT boot partition, debugfs for the ext4 root. The root tree then runs under
qemu-user (binfmt_misc): the package imports, first boot provisions, and the daemon
reaches READY=1 on arm64. Set INTERCOM_IMAGE to an image built before to skip the
build step (the checks are the same).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.image_devices import (
    QEMU_CPU,
    Agent,
    RemoteStation,
    fetch_ca,
    free_port,
    install_test_parts,
    kernel_of,
    pair_remote,
    pi_dtb,
)
from tests.test_calls_client import eventually

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "image-build" / "build"
MIB = 1 << 20
# A PEM private key with its body (code that only names the marker does not match).
PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]{40,}-----END"
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    if given := os.environ.get("INTERCOM_IMAGE"):
        return Path(given)
    out = tmp_path_factory.mktemp("image")
    result = subprocess.run(
        [str(BUILD), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=5000,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^\[10/10\] partitions and image", result.stdout, re.MULTILINE)
    [img] = out.glob("intercom-*-arm64.img")
    return img


@pytest.fixture(scope="module")
def table(image):
    out = subprocess.run(
        ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)["partitiontable"]


def extract(image: Path, part: dict, dest: Path) -> Path:
    with image.open("rb") as src, dest.open("wb") as dst:
        src.seek(part["start"] * 512)
        left = part["size"] * 512
        while left:
            chunk = src.read(min(left, 16 * MIB))
            dst.write(chunk)
            left -= len(chunk)
    return dest


@pytest.fixture(scope="module")
def boot_img(image, table, tmp_path_factory):
    return extract(image, table["partitions"][0], tmp_path_factory.mktemp("boot") / "boot.img")


@pytest.fixture(scope="module")
def rootfs(image, table, tmp_path_factory):
    work = tmp_path_factory.mktemp("root")
    img = extract(image, table["partitions"][1], work / "root.img")
    tree = work / "tree"
    tree.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(img)], capture_output=True, check=True)
    img.unlink()
    return tree


def test_partition_table_is_boot_fat_then_root_ext4(table, image):
    assert table["label"] == "dos"
    boot, root = table["partitions"]
    assert boot["type"] == "c"
    assert boot.get("bootable") is True
    assert boot["start"] * 512 == 4 * MIB
    assert root["type"] == "83"
    assert (root["start"] + root["size"]) * 512 <= image.stat().st_size


def test_boot_partition_has_firmware_kernel_and_no_installer_file(boot_img):
    listing = subprocess.run(
        ["mdir", "-b", "-i", str(boot_img), "::/"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    )
    names = {Path(line).name for line in listing.stdout.split()}
    for name in (
        "config.txt",
        "cmdline.txt",
        "start4.elf",
        "fixup4.dat",
        "bootcode.bin",
        "bcm2711-rpi-4-b.dtb",
        "bcm2837-rpi-3-b.dtb",
    ):
        assert name in names, sorted(names)
    assert any(n.startswith("vmlinuz-") for n in names)
    assert any(n.startswith("initrd.img-") for n in names)
    assert "intercom.toml" not in names
    cmdline = subprocess.run(
        ["mtype", "-i", str(boot_img), "::/cmdline.txt"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout
    assert "root=LABEL=RASPIROOT" in cmdline
    label = subprocess.run(
        ["mlabel", "-s", "-i", str(boot_img), "::"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    )
    assert "RASPIFIRM" in label.stdout


def test_units_are_enabled(rootfs):
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    enabled = {p.name for p in wants.iterdir()}
    for unit in (
        "intercom.service",
        "intercom-firstboot.service",
        "systemd-networkd.service",
    ):
        assert unit in enabled, sorted(enabled)
    wlan = rootfs / "etc/systemd/system/sys-subsystem-net-devices-wlan0.device.wants"
    assert (wlan / "wpa_supplicant@wlan0.service").is_symlink()
    assert "wpa_supplicant@wlan0.service" not in enabled  # no 90 s wait without wlan0
    assert (rootfs / "usr/lib/systemd/system/intercom.service").read_text() == (
        REPO / "systemd/intercom.service"
    ).read_text()
    passwd = (rootfs / "etc/passwd").read_text()
    assert re.search(r"^intercom:x:\d+:\d+:.*:/usr/sbin/nologin$", passwd, re.MULTILINE)


def test_no_password_hash_and_no_ssh(rootfs):
    for line in (rootfs / "etc/shadow").read_text().splitlines():
        user, field = line.split(":")[:2]
        assert "$" not in field, f"{user} has a password hash"
        assert field.startswith(("*", "!")), f"{user} can log in with an empty password"
    assert not (rootfs / "usr/sbin/sshd").exists()
    assert not list((rootfs / "etc").glob("ssh/ssh_host_*"))
    enabled = {p.name for p in (rootfs / "etc/systemd/system").rglob("*ssh*")}
    assert not enabled


def test_no_key_or_secret_inside(rootfs, boot_img):
    assert (rootfs / "etc/machine-id").read_text() == ""
    assert not list((rootfs / "var/lib/intercom").iterdir())
    assert not (rootfs / "etc/intercom/intercom.toml").exists()
    assert not list((rootfs / "etc/intercom/credentials").iterdir())
    assert not (rootfs / "var/lib/systemd/random-seed").exists()
    for top in ("etc", "var", "root", "home", "opt/intercom", "usr/share/intercom"):
        for path in (rootfs / top).rglob("*"):
            # Shared libraries in wheels carry their own self-test keys (GnuTLS in PyAV's).
            if path.is_file() and not path.is_symlink() and ".so" not in path.name:
                assert not PEM_PRIVATE_KEY.search(path.read_bytes()), path
            assert path.suffix not in {".key", ".p12", ".pfx"}, path
    assert not PEM_PRIVATE_KEY.search(boot_img.read_bytes())
    release = (rootfs / "usr/share/intercom/release-keys/release.pem").read_text()
    assert release.startswith("-----BEGIN PUBLIC KEY-----")


@pytest.fixture(scope="module")
def arm64_root(rootfs):
    """The root tree with /dev and /proc, to run its arm64 programs under qemu-user."""
    # Device nodes of its own rather than a bind mount of /dev: a mount left behind by a
    # killed run must never let a clean-up of the tree reach the host's devices.
    dev = rootfs / "dev"
    dev.mkdir(exist_ok=True)
    (dev / "shm").mkdir(exist_ok=True)
    for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
        if not (dev / name).exists():
            os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
            (dev / name).chmod(0o666)
    proc = rootfs / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    yield rootfs
    subprocess.run(["umount", "-l", str(proc)], check=False)


def in_root(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), "/usr/bin/env", "-i", "PATH=/usr/bin:/bin", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_package_imports_on_arm64(arm64_root):
    result = in_root(
        arm64_root,
        "/opt/intercom/current/bin/python",
        "-c",
        "import platform, intercom, intercom.station, intercom.deploy.firstboot; "
        "print(platform.machine(), intercom.__version__)",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "aarch64"


def test_first_boot_and_ready_on_arm64(arm64_root):
    root = arm64_root
    boot = root / "boot/firmware"
    (boot / "intercom.toml").write_text(
        '[station]\nid = "door-img"\n\n[hardware]\nbuttons = [{ pin = 17, flat = "1" }]\n'
        "relay = { pin = 27 }\n"
    )
    provision = in_root(
        root, "/opt/intercom/current/bin/intercom", "firstboot", "--owner", "intercom"
    )
    assert provision.returncode == 0, provision.stderr
    assert "TLS certificate SHA-256" in provision.stdout
    assert not (boot / "intercom.toml").exists()
    assert (root / "var/lib/intercom/keys/station.key").exists()

    # The daemon itself, simulated pins, started under qemu, must say READY=1.
    notify = root / "run/intercom-test-notify"
    notify.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        proc = subprocess.Popen(
            [
                "chroot",
                str(root),
                "/usr/bin/env",
                "-i",
                "PATH=/usr/bin:/bin",
                "NOTIFY_SOCKET=/run/intercom-test-notify",
                "/opt/intercom/current/bin/intercom",
                "run",
                "--simulate",
                "--config",
                "/etc/intercom/intercom.toml",
                "--state-dir",
                "/tmp/sim-state",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 240
            ready = False
            while not ready and time.monotonic() < deadline and proc.poll() is None:
                if select.select([sock], [], [], 1)[0]:
                    ready = "READY=1" in sock.recv(4096).decode().splitlines()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    notify.unlink(missing_ok=True)
    shutil.rmtree(root / "tmp/sim-state", ignore_errors=True)
    assert ready, proc.stderr.read().decode()[-2000:] if proc.stderr else ""


BOOT_CONFIG = """\
[station]
id = "door-qemu"

[hardware]
pin_factory = "mock"
buttons = [{ pin = 17, flat = "1" }]
# A long pulse: the relay is still energised when the watchdog test freezes the daemon.
relay = { pin = 27, pulse_s = 30, max_open_s = 30 }

[media.camera]
source = "synthetic"

[media.audio]
input = "synthetic"
output = "levels"
"""

# Run once the daemon is READY (only in the test's copy of the image), as root, from
# outside the daemon: a resident's signed unlock energises the relay, then SIGSTOP
# freezes the daemon's main process, its event loop with it, so that no WATCHDOG=1
# comes. systemd must kill it (WatchdogSignal=, SIGABRT) and restart it
# (Restart=on-failure); the script waits for the new process to be READY (active) and
# prints the relay's state as the new daemon reports it. The daemon has no code for this.
WATCHDOG_SCRIPT = """\
#!/bin/sh
set -eu
bin=/opt/intercom/current/bin
work=$(mktemp -d)
openssl genpkey -algorithm ed25519 -out "$work/key.pem"
openssl pkey -in "$work/key.pem" -pubout -out "$work/pub.pem"
"$bin/intercom" principals add --role resident --flat 1 --id resident-watchdog \\
  --public-key "$work/pub.pem" --no-qr > "$work/enrolment"
grep '^otpauth://' "$work/enrolment" > "$work/totp"
token=$("$bin/intercom" sign-command --key "$work/key.pem" --kid resident-watchdog \\
  --station door-qemu --door front --totp-secret-file "$work/totp")
echo "watchdog-test: unlock $("$bin/intercom" unlock "$token")"
pid=$(systemctl show -P MainPID intercom.service)
kill -STOP "$pid"
echo "watchdog-test: froze pid $pid"
while :; do
  now=$(systemctl show -P MainPID intercom.service)
  state=$(systemctl is-active intercom.service || true)
  if [ "$state" = active ] && [ "$now" != 0 ] && [ "$now" != "$pid" ]; then break; fi
  sleep 1
done
echo "watchdog-test: pid $now ready, restarts $(systemctl show -P NRestarts intercom.service)"
echo "watchdog-test: $("$bin/intercom" status | grep '^lock ')"
"""

WATCHDOG_UNIT = """\
[Unit]
Description=Intercom frozen past WatchdogSec (image test)
Wants=intercom.service
After=intercom.service

[Service]
Type=oneshot
ExecStart=/bin/sh /usr/local/sbin/intercom-watchdog-test
TimeoutStartSec=10min
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

# Then (also test-only): a change through the daemon's one config writer, as root over
# the control socket like an installer's `intercom config set`, then a clean power-off
# so that the file can be read back.
CONFIG_SET_UNIT = """\
[Unit]
Description=Intercom config set through the daemon's writer (image test)
Requires=intercom.service
After=intercom.service intercom-watchdog-test.service

[Service]
Type=oneshot
ExecStart=/opt/intercom/current/bin/intercom config set --state-dir /var/lib/intercom \\
  hardware.buttons[0].name porch
ExecStopPost=/usr/bin/systemctl --no-block poweroff
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""


def debugfs(disk: str, command: str, *, write: bool = False) -> str:
    """Run one debugfs command on the ext4 file system at ``disk`` (``file?offset=N``)."""
    result = subprocess.run(["debugfs", *(["-w"] if write else []), "-R", command, disk],
                            capture_output=True, text=True, check=True)
    return result.stdout


def write_into(root: str, local: Path, path: str, mode: int) -> None:
    """Copy ``local`` to ``path`` on the ext4 root (debugfs keeps the local file's mode)."""
    local.chmod(mode)
    debugfs(root, f"write {local} {path}", write=True)


def boot_files(boot: str, work: Path, config: str) -> tuple[str, str]:
    """The boot partition's kernel and initrd copied to ``work``; the installer file in.

    ``boot`` is the FAT partition as mtools names it (``disk@@offset``); ``config`` is
    written there as ``intercom.toml``, as an installer does.
    """
    mtools = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    names = subprocess.run(["mdir", "-b", "-i", boot, "::/"], capture_output=True, text=True,
                           check=True, env=mtools).stdout.split()
    kernel = next(Path(n).name for n in names if Path(n).name.startswith("vmlinuz-"))
    initrd = next(Path(n).name for n in names if Path(n).name.startswith("initrd.img-"))
    for name in (kernel, initrd):
        subprocess.run(["mcopy", "-i", boot, f"::/{name}", str(work / name)], check=True,
                       env=mtools)
    (work / "intercom.toml").write_text(config)
    subprocess.run(["mcopy", "-i", boot, str(work / "intercom.toml"), "::/intercom.toml"],
                   check=True, env=mtools)
    return kernel, initrd


@pytest.fixture(scope="module")
def qemu_boot(image, table, tmp_path_factory) -> dict[str, str]:
    """One boot of a copy of the image with the test units; the serial console and disks.

    The image's own kernel and initrd, systemd as PID 1: first boot provisions,
    intercom.service becomes READY, the watchdog test unit freezes the daemon and waits
    for it to come back, the config test unit changes the config and powers off.
    """
    work = tmp_path_factory.mktemp("qemu")
    disk = work / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    boot = f"{disk}@@{table['partitions'][0]['start'] * 512}"
    root = f"{disk}?offset={table['partitions'][1]['start'] * 512}"
    (work / "watchdog-test.sh").write_text(WATCHDOG_SCRIPT)
    write_into(root, work / "watchdog-test.sh", "/usr/local/sbin/intercom-watchdog-test", 0o755)
    for name, text in (("intercom-watchdog-test.service", WATCHDOG_UNIT),
                       ("intercom-config-test.service", CONFIG_SET_UNIT)):
        (work / name).write_text(text)
        write_into(root, work / name, f"/etc/systemd/system/{name}", 0o644)
        debugfs(root, f"symlink /etc/systemd/system/multi-user.target.wants/{name} "
                      f"/etc/systemd/system/{name}", write=True)
    kernel, initrd = boot_files(boot, work, BOOT_CONFIG)
    serial = work / "serial.log"
    with serial.open("wb") as out:
        qemu = subprocess.Popen(
            ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a53", "-smp", "2",
             "-m", "1536", "-nographic", "-no-reboot",
             "-kernel", str(work / kernel), "-initrd", str(work / initrd),
             "-append", ("root=LABEL=RASPIROOT rw console=ttyAMA0 rootwait "
             "systemd.journald.forward_to_console=1"),
             "-drive", f"file={disk},if=virtio,format=raw",
             "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0,romfile="],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            # The config test unit powers the machine off once it ran (or failed): qemu exits.
            qemu.wait(timeout=1500)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", serial.read_bytes().decode(errors="replace"))
    return {"text": text, "boot": boot, "root": root}


def test_image_boots_under_qemu_to_first_boot_and_ready(qemu_boot):
    """The image's own kernel and systemd: first boot provisions, intercom.service READY.

    Then the daemon, under its unit's ProtectSystem=strict, changes its config file
    through its writer, and the changed file is read back from the powered-off disk.
    """
    text, boot, root = qemu_boot["text"], qemu_boot["boot"], qemu_boot["root"]
    assert "Finished intercom-firstboot.service" in text, text[-3000:]
    assert "TLS certificate SHA-256" in text
    assert "Started intercom.service" in text, text[-3000:]
    assert "station door-qemu ready" in text
    assert "sys-subsystem-net-devices-wlan0.device" not in text  # nothing waits for Wi-Fi
    mtools = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    after = subprocess.run(["mdir", "-b", "-i", boot, "::/"], capture_output=True, text=True,
                           check=True, env=mtools).stdout
    assert "intercom.toml" not in after

    # The writer's answer, then the file itself as the powered-off disk holds it.
    assert "written; takes effect at the next start: hardware.buttons[0].name" in text, (
        text[-3000:])
    # A oneshot whose stop starts the power-off is "Deactivated", not "Finished".
    assert "intercom-config-test.service: Deactivated successfully" in text, text[-3000:]
    assert "reboot: Power down" in text, text[-2000:]
    written = tomllib.loads(debugfs(root, "cat /etc/intercom/intercom.toml"))
    assert written["hardware"]["buttons"][0] == {"pin": 17, "flat": "1", "name": "porch"}
    assert written["station"]["id"] == "door-qemu"
    passwd = debugfs(root, "cat /etc/passwd")
    uid, gid = re.search(r"^intercom:x:(\d+):(\d+):", passwd, re.MULTILINE).groups()
    stat_out = debugfs(root, "stat /etc/intercom/intercom.toml")
    assert re.search(rf"User:\s+{uid}\s+Group:\s+{gid}\b", stat_out), stat_out
    assert re.search(r"Mode:\s+0640\b", stat_out), stat_out
    folder = debugfs(root, "stat /etc/intercom")
    assert re.search(rf"User:\s+0\s+Group:\s+{gid}\b", folder), folder
    assert re.search(r"Mode:\s+01770\b", folder), folder
    # Only the daemon's writer wrote there: no temporary file left behind.
    assert ".tmp" not in debugfs(root, "ls -l /etc/intercom")


def test_a_station_frozen_past_watchdogsec_is_killed_and_comes_back_ready_relay_off(qemu_boot):
    """Its loop stopped with the relay energised: systemd kills it, restarts it, READY again.

    What the serial console shows, in this order: the relay energised by a granted
    unlock, the freeze, systemd's watchdog timeout and its kill of the frozen process,
    the restart, the second ``ready``, and the new daemon's lock ``locked``.
    """
    text = qemu_boot["text"]
    assert "watchdog-test: unlock granted" in text, text[-3000:]
    froze = re.search(r"watchdog-test: froze pid (\d+)", text)
    assert froze, text[-3000:]
    pid = froze.group(1)
    unit = r"intercom\.service: "
    expected = [
        r"lock front: relay energised \(unlock via \w+\)",
        rf"watchdog-test: froze pid {pid}\b",
        rf"{unit}Watchdog timeout \(limit 30s\)!",
        rf"{unit}Killing process {pid} \(\S+\) with signal SIGABRT\.",
        rf"{unit}Failed with result 'watchdog'\.",
        rf"{unit}Scheduled restart job, restart counter is at 1\.",
        r"station door-qemu ready",
        r"watchdog-test: pid (\d+) ready, restarts 1\b",
        r"watchdog-test: lock +locked",
    ]
    at = 0
    spans = []
    for pattern in expected:
        match = re.compile(pattern).search(text, at)
        assert match, f"no {pattern!r} after offset {at}:\n{text[at:][-4000:]}"
        spans.append(match)
        at = match.end()
    # The frozen daemon never released the relay: the one that says locked is a new one.
    frozen = text[spans[0].end():spans[2].start()]
    assert "relay released" not in frozen, frozen[-3000:]
    assert spans[7].group(1) != pid
    assert text.count("station door-qemu ready") == 2, text[-3000:]


# The station as a Pi runs it, on the kernel's simulated devices: lgpio on a gpio-sim chip
# wired as hw/wiring.md (the relay from a pin map of hw/pinmaps/), the V4L2 camera on
# vivid, pyaudio on the ALSA loopback card.
PIN_MAP = REPO / "hw/pinmaps/generic-1ch-active-high.toml"
BUTTON, DOOR, TAMPER = 17, 22, 23
SEQUENCE = ("DoorbellPressed", "CallRinging", "CallAnswered", "UnlockGranted", "DoorOpened",
            "DoorClosed", "TamperDetected", "TamperCleared")


def devices_config(station_id: str, relay: dict[str, object], *, simulated: bool) -> str:
    """The station's config: real pins and media in the image, mock ones on the host."""
    hardware = "mock" if simulated else "lgpio"
    media = ('[media.camera]\nsource = "synthetic"\n\n[media.audio]\ninput = "synthetic"\n'
             'output = "levels"\n') if simulated else (
             '[media.camera]\nsource = "v4l2"\ndevice = "/dev/video0"\nwidth = 320\n'
             'height = 180\nfps = 10\n\n[media.audio]\ninput = "pyaudio"\noutput = "pyaudio"\n')
    return (f'[station]\nid = "{station_id}"\n\n[hardware]\npin_factory = "{hardware}"\n'
            f'buttons = [{{ pin = {BUTTON}, flat = "1" }}]\n'
            f'relay = {{ pin = {relay["pin"]}, active_high = '
            f'{str(relay["active_high"]).lower()} }}\n'
            f"door_contact = {{ pin = {DOOR}, grant_window_s = 120 }}\n"
            f"tamper = {{ pin = {TAMPER} }}\n\n{media}")


@pytest.fixture(scope="module")
def gpio_sim_module(rootfs) -> Path:
    """gpio-sim.ko for the image's kernel (Debian's has none; scripts/gpio-sim-module)."""
    return gpio_sim_for(*kernel_of(rootfs))


def gpio_sim_for(release: str, version: str) -> Path:
    """gpio-sim.ko built for this kernel release and Debian version (made once, cached)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intercom/gpio-sim"
    out = subprocess.run([str(REPO / "scripts/gpio-sim-module"), release, version, str(cache)],
                         capture_output=True, text=True, timeout=1800, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(out.stdout.strip().splitlines()[-1])


def serial_text(path: Path) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", path.read_bytes().decode(errors="replace"))


def wait_serial(path: Path, pattern: str, qemu: subprocess.Popen[bytes], timeout: float) -> str:
    """The first match of ``pattern`` on the serial console, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if match := re.search(pattern, serial_text(path)):
            return match.group(0)
        assert qemu.poll() is None, serial_text(path)[-3000:]
        time.sleep(1)
    raise AssertionError(f"no {pattern!r} on the console: {serial_text(path)[-3000:]}")


def prepare_disk(image: Path, table: dict, module: Path, relay: dict[str, object],
                 tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of the image with the test's parts and the installer file; kernel, initrd."""
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
    boot = f"{disk}@@{table['partitions'][0]['start'] * 512}"
    root = f"{disk}?offset={table['partitions'][1]['start'] * 512}"
    install_test_parts(root, module, tmp_path)
    kernel, initrd = boot_files(boot, tmp_path, devices_config("door-pi", relay, simulated=False))
    return disk, kernel, initrd


def test_image_meets_simulated_devices_under_qemu(image, table, rootfs, gpio_sim_module, tmp_path):
    """The image's station on gpio-sim, vivid and snd-aloop, rung and opened from the host.

    A resident on this machine (aiortc) pairs with the first-boot code through QEMU's
    port forward, is rung by the button line pulled low through gpio-sim, answers, sees
    vivid's frames, hears the tone played into the loopback card, is heard out of it,
    and opens the door with a TOTP code: the relay line rises and falls. The door
    contact and tamper lines raise their events. (``scripts/bench image-devices`` runs
    the same session for its figures.)
    """
    devices_session(image, table, gpio_sim_module, tmp_path)


def devices_session(image: Path, table: dict, module: Path, tmp_path: Path) -> dict[str, Any]:
    """Boot a copy of the image on the simulated devices and go through the resident's
    session, asserting each step; the stamps a benchmark needs (systemd's start and
    READY on the guest's clock, the press and the ring on this machine's)."""
    relay = tomllib.loads(PIN_MAP.read_text())["hardware"]["relay"]
    disk, kernel, initrd = prepare_disk(image, table, module, relay, tmp_path)
    port = free_port()
    agent_sock = tmp_path / "agent.sock"
    serial = tmp_path / "serial.log"
    # User networking without restrict=on: the station's media (UDP) reaches the host's
    # resident through slirp, which learns the path as a peer-reflexive candidate.
    qemu_args = [
        "qemu-system-aarch64", "-M", "virt", *QEMU_CPU, "-nographic", "-no-reboot",
        "-dtb", str(pi_dtb(tmp_path)),
        "-kernel", str(tmp_path / kernel), "-initrd", str(tmp_path / initrd),
        "-append", ("root=LABEL=RASPIROOT rw console=ttyAMA0 rootwait "
                    "systemd.journald.forward_to_console=1"),
        "-drive", f"file={disk},if=virtio,format=raw",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8443",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={agent_sock},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=org.intercom.agent",
    ]
    agent = Agent(agent_sock)
    stamps: dict[str, Any] = {}
    with serial.open("wb") as out:
        qemu = subprocess.Popen(qemu_args, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            agent.connect()
            link = wait_serial(serial, r"pairing link: \S+#pair=\S+&fp=[0-9a-f]+", qemu, 1500)
            code, fingerprint = re.search(r"#pair=([^&\s]+)&fp=([0-9a-f]+)", link).groups()
            hello = agent.line(timeout=900)
            assert hello == {"hello": True}
            started = agent.ask("started", timeout=600)
            assert started["NRestarts"] == 0
            stamps["started"] = started
            text = serial_text(serial)
            assert "station door-pi ready" in text, text[-3000:]
            assert re.search(r"agent: gpio-sim gpiochip0 .*/dev/video0.*pcm", text), text[-3000:]
            # The wiring at rest: the magnet closes the reed switch, the cover is on.
            for pin in (DOOR, TAMPER):
                agent.ask("pull", pin=pin, level="down")
            assert agent.ask("value", pin=BUTTON)["value"] == 1  # the lgpio pull-up
            assert agent.ask("value", pin=relay["pin"])["value"] == 0
            stamps |= asyncio.run(resident_session(agent, port, code, fingerprint, relay))
            events = [e["type"] for e in agent.ask("events")["events"]]
            # In the order the test made them happen (what the lines did at start-up, when
            # lgpio's pull-ups lifted the contact and tamper lines, is before them).
            happened = [e for e in events[events.index("DoorbellPressed"):] if e in SEQUENCE]
            assert happened == list(SEQUENCE), events
            agent.ask("poweroff")
            qemu.wait(timeout=300)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
    return stamps


async def resident_session(agent, port: int, code: str, fingerprint: str,
                           relay: dict[str, object]) -> dict[str, Any]:
    """Pair, be rung by the button line, answer, see, hear, be heard, open the door."""

    url = f"https://127.0.0.1:{port}/"
    station = RemoteStation(url, await fetch_ca(url, fingerprint), "door-pi")
    phone = await pair_remote(station, code)
    try:
        await phone.connect()
        await phone.wait_connected(120)
        pressed = time.time()
        await agent.ask_async("pull", pin=BUTTON, level="down")
        ring = await phone.expect("ring", timeout=60)
        await agent.ask_async("pull", pin=BUTTON, level="up")
        await phone.send({"type": "accept", "call": ring["call"]})
        await phone.expect("call", timeout=30, state="answered")
        # vivid's frames, through the station's V4L2 source, to the resident.
        await eventually(lambda: len(phone.video_frames) >= 15, 120, "video frames")
        # Silence from the loopback card until the tone is played into it.
        await eventually(lambda: phone.audio_frames >= 50, 120, "audio frames")
        quiet = phone.audible_frames
        assert quiet < 10, quiet
        await agent.ask_async("tone", seconds=60, frequency=1000)
        await eventually(lambda: phone.audible_frames >= quiet + 50, 120, "the tone")
        # The resident's microphone (its 660 Hz tone) out of the station's speaker, into
        # the loopback card: most 20 ms frames audible (the speaker's short buffer
        # underruns under emulation), at the resident's pitch.
        heard = await agent.ask_async("listen", timeout=180, seconds=6)
        levels = heard["levels"]
        assert len(levels) >= 200, heard
        assert sum(level > 0.01 for level in levels) >= len(levels) // 2, heard
        assert 600 <= heard["hz"] <= 720, heard
        # Open with a TOTP code: the relay line rises, then falls after the pulse.
        agent.send("watch", pin=relay["pin"], seconds=15)
        phone.channel.send(phone.unlock_token())
        result = await asyncio.wait_for(phone.channel_messages.get(), 60)
        assert (result["type"], result["result"]) == ("unlock-result", "granted"), result
        changes = (await asyncio.get_running_loop().run_in_executor(
            None, agent.line, 30))["changes"]
        assert [level for _, level in changes] == [0, 1, 0], changes
        # The visitor walks in: door open, then shut; the cover is lifted, then put back.
        for pin in (DOOR, TAMPER):
            await agent.ask_async("pull", pin=pin, level="up")
            await asyncio.sleep(1)
            await agent.ask_async("pull", pin=pin, level="down")
        await asyncio.sleep(2)
        return {"pressed": pressed, "rung": ring["received_at"]}
    finally:
        await phone.close()
