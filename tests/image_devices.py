"""The booted image meets the kernel's simulated devices: the pieces of that slow test.

- ``pi_dtb``: QEMU's own ``virt`` device tree, told it is a Raspberry Pi 4 the way the
  Pi's firmware tells Linux (``/system/linux,revision``, read by gpiozero), and without
  the machine's PL061 GPIO controller, so that the simulated header is ``gpiochip0``
  as on a Pi 4;
- ``install_test_parts``: the agent (``tests/qemu_agent.py``), the gpio-sim module and
  the test units, written into the test's copy of the image with debugfs;
- ``Agent``: the host's end of the agent's virtio serial port;
- ``RemoteStation`` / ``RemoteDevice``: the aiortc resident of ``test_calls_client``,
  aimed at a station that runs elsewhere (its URL, its CA pinned by the pairing link's
  fingerprint).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp

from tests.test_calls_client import Device, DeviceKey

HERE = Path(__file__).resolve().parent
PI4_REVISION = 0xC03111  # Raspberry Pi 4 Model B 1.1, 4 GB (gpiozero's table)

DEVICES_UNIT = """\
[Unit]
Description=Simulated door hardware: gpio-sim, vivid, snd-aloop (image test)
Before=intercom.service
After=systemd-udevd.service sys-kernel-config.mount
Wants=sys-kernel-config.mount

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/python3 /usr/local/lib/intercom-test/agent.py setup
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

AGENT_UNIT = """\
[Unit]
Description=The image test's agent on a virtio serial port
After=intercom-test-devices.service dev-virtio\\x2dports-org.intercom.agent.device
Requires=dev-virtio\\x2dports-org.intercom.agent.device

[Service]
ExecStart=/usr/bin/python3 /usr/local/lib/intercom-test/agent.py serve \
/dev/virtio-ports/org.intercom.agent
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

# The door's sound card as ALSA's default, as an installer sets a USB card up.
ASOUND_CONF = """\
pcm.!default {
    type asym
    playback.pcm "plughw:Loopback,0,0"
    capture.pcm "plughw:Loopback,0,0"
}
ctl.!default {
    type hw
    card Loopback
}
"""

QEMU_CPU = ["-cpu", "cortex-a53", "-smp", "2", "-m", "1536"]


def drop_node(dts: str, name: str) -> str:
    """The source without the top-level node whose name starts with ``name``."""
    match = re.search(rf"\n\t{re.escape(name)}[^\n]*\{{\n", dts)
    assert match, f"no node {name} in QEMU's device tree"
    end = dts.index("\n\t};\n", match.end()) + len("\n\t};")
    return dts[: match.start()] + dts[end:]


def pi_dtb(folder: Path) -> Path:
    """QEMU's virt device tree as a Pi 4 presents itself to gpiozero, without PL061."""
    raw = folder / "virt.dtb"
    subprocess.run(["qemu-system-aarch64", "-M", f"virt,dumpdtb={raw}", *QEMU_CPU,
                    "-nographic", "-net", "none"], check=True, capture_output=True)
    dts = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(raw)], check=True,
                         capture_output=True, text=True).stdout
    dts = drop_node(drop_node(dts, "gpio-keys"), "pl061@")
    system = f"\n\tsystem {{\n\t\tlinux,revision = <{PI4_REVISION:#x}>;\n\t}};\n"
    dts = dts.replace("\n\tchosen {", system + "\n\tchosen {", 1)
    source = folder / "pi.dts"
    source.write_text(dts)
    out = folder / "pi.dtb"
    subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", str(out), str(source)],
                   check=True)
    return out


def debugfs(disk: str, *commands: str) -> None:
    """Run debugfs write commands on the ext4 file system at ``disk``."""
    script = "\n".join(commands) + "\n"
    result = subprocess.run(["debugfs", "-w", "-f", "-", disk], input=script,
                            capture_output=True, text=True, check=True)
    assert "Could not" not in result.stderr, result.stderr


def install_test_parts(root: str, module: Path, work: Path) -> None:
    """Agent, gpio-sim module, units and ALSA default into the test's copy of the root."""
    files = {
        "agent.py": (HERE / "qemu_agent.py").read_text(),
        "intercom-test-devices.service": DEVICES_UNIT,
        "intercom-test-agent.service": AGENT_UNIT,
        "asound.conf": ASOUND_CONF,
    }
    for name, text in files.items():
        (work / name).write_text(text)
        (work / name).chmod(0o644)
    wants = "/etc/systemd/system/multi-user.target.wants"
    debugfs(
        root,
        "mkdir /usr/local/lib/intercom-test",
        f"write {work / 'agent.py'} /usr/local/lib/intercom-test/agent.py",
        f"write {module} /usr/local/lib/intercom-test/gpio-sim.ko",
        f"write {work / 'asound.conf'} /etc/asound.conf",
        *(f"write {work / unit} /etc/systemd/system/{unit}"
          for unit in ("intercom-test-devices.service", "intercom-test-agent.service")),
        *(f"symlink {wants}/{unit} /etc/systemd/system/{unit}"
          for unit in ("intercom-test-devices.service", "intercom-test-agent.service")),
    )


def kernel_of(rootfs: Path) -> tuple[str, str]:
    """The image's kernel release and the Debian version of its package."""
    [config] = rootfs.glob("boot/config-*")
    release = config.name.removeprefix("config-")
    status = (rootfs / "var/lib/dpkg/status").read_text()
    match = re.search(rf"^Package: linux-image-{re.escape(release)}\n(?:.+\n)*?Version: (\S+)",
                      status, re.MULTILINE)
    assert match, release
    return release, match.group(1)


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Agent:
    """The host's end of the agent's virtio serial port: one request, one answer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buffer = b""

    def connect(self, timeout: float = 30) -> None:
        """Connect to QEMU's socket as soon as it is there."""
        for _ in range(max(1, round(timeout / 0.2))):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except OSError:
                sock.close()
                time.sleep(0.2)
                continue
            self.sock = sock
            return
        raise AssertionError("no agent socket from QEMU")

    def line(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from the agent."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the agent's port closed"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return dict(json.loads(line))

    def send(self, cmd: str, **args: Any) -> None:
        """Send one request (read its answer with ``line``)."""
        assert self.sock is not None
        self.sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")

    def ask(self, cmd: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        """One request and its answer, which must be ok."""
        self.send(cmd, **args)
        answer = self.line(timeout)
        assert answer.get("ok"), answer
        return answer

    async def ask_async(self, cmd: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        """``ask`` from a coroutine, without blocking the loop the resident runs on."""
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.ask(cmd, timeout, **args))


@dataclass
class RemoteStation:
    """What a resident's device knows of a station: its URL, pinned CA, id and door."""

    url: str
    ca_der: bytes
    id: str
    door: str = "front"
    settings: Any = field(init=False)
    calls: Any = field(init=False)

    def __post_init__(self) -> None:
        # The names test_calls_client.Device reads from a Station.
        self.settings = SimpleNamespace(hardware=SimpleNamespace(relay=SimpleNamespace(
            door=self.door)))
        self.calls = SimpleNamespace(url=self.url)

    def tls(self) -> ssl.SSLContext:
        """TLS trusting only the pinned CA (the name the test dials, 127.0.0.1 through
        QEMU's forward, is not the station's own, so the chain alone is checked)."""
        context = ssl.create_default_context(cadata=self.ca_der)
        context.check_hostname = False
        return context


async def fetch_ca(url: str, fingerprint: str) -> bytes:
    """The station's CA, accepted only when its SHA-256 is the pairing link's."""
    async with aiohttp.ClientSession() as http, http.get(url + "ca.crt", ssl=False) as reply:
        assert reply.status == 200, await reply.text()
        pem = await reply.read()
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import Encoding  # noqa: PLC0415

    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER) \
        if pem.startswith(b"-----") else pem
    assert hashlib.sha256(der).hexdigest() == fingerprint.replace(":", "").lower()
    return der


class RemoteDevice(Device):
    """test_calls_client's resident device, for a station elsewhere."""

    def __init__(self, station: RemoteStation, key: DeviceKey, principal: str,
                 totp_uri: str) -> None:
        super().__init__(station, key, principal, totp_uri)  # type: ignore[arg-type]
        self.remote = station
        self.patience = 12.0

    async def open_socket(self) -> aiohttp.ClientWebSocketResponse:
        if self.http is not None:
            await self.http.close()
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.remote.url + "ws", ssl=self.remote.tls())
        return self.ws


async def pair_remote(station: RemoteStation, code: str) -> RemoteDevice:
    """Pair a new device with a one-time code, as the pairing link's page does."""
    key = DeviceKey()
    async with aiohttp.ClientSession() as http, http.post(
        station.url + "api/pair", json={"code": code, "jwk": key.jwk(), "name": "host phone"},
        ssl=station.tls(),
    ) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return RemoteDevice(station, key, body["principal"], body["totp_uri"])
