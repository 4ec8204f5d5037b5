"""The SD image on the kernel's simulated devices, emulated, against the same on this machine.

Boots a copy of the image under ``qemu-system-aarch64`` on gpio-sim, vivid and snd-aloop
and goes through the slow test's whole resident session (``devices_session`` in
``tests/test_image_build.py``: pair through QEMU's port forward, rung by the button line,
answer, see, hear, be heard, open), then runs ``intercom run --simulate`` on this machine
with the same config (mock pins, synthetic media) and the same resident. Figures, as
ratios only (emulated time is not a Pi's):
  - start -> READY: in the image, systemd's ``ExecMainStartTimestampMonotonic`` to
    ``ActiveEnterTimestampMonotonic`` (exec to ``READY=1``, the guest's clock); on this
    machine, the exec to the ``READY=1`` datagram's arrival;
  - press -> ring: just before the press (the button line pulled through gpio-sim; here
    ``sim press`` over the control socket) to the resident's receipt of ``ring``, both
    on this machine's clock.

Usage: scripts/bench image-devices --image IMG [--work DIR]
(IMG from ``image-build/build``; as root, with QEMU, debugfs, mtools and dtc installed,
as ``scripts/setup-dev`` installs them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from intercom.control import request  # noqa: E402
from tests.image_devices import (  # noqa: E402
    RemoteStation,
    fetch_ca,
    free_port,
    kernel_of,
    pair_remote,
)
from tests.test_image_build import (  # noqa: E402
    PIN_MAP,
    devices_config,
    devices_session,
    gpio_sim_for,
)


def image_kernel(image: Path, table: dict, work: Path) -> tuple[str, str]:
    """The image's kernel release and Debian version, read from its root with debugfs."""
    root = f"{image}?offset={table['partitions'][1]['start'] * 512}"
    tree = work / "root"
    (tree / "var/lib/dpkg").mkdir(parents=True)
    subprocess.run(["debugfs", "-R", f"rdump /boot {tree}", root], check=True, capture_output=True)
    subprocess.run(
        ["debugfs", "-R", f"dump /var/lib/dpkg/status {tree}/var/lib/dpkg/status", root],
        check=True,
        capture_output=True,
    )
    return kernel_of(tree)


def host_figures(tmp: Path, relay: dict[str, object]) -> dict[str, float]:
    """start -> READY and press -> ring on this machine, same config, simulated parts."""
    config = tmp / "host.toml"
    config.write_text(
        devices_config("door-host", relay, simulated=True)
        + f'\n[web]\nhost = "127.0.0.1"\nport = {free_port()}\n'
    )
    state = tmp / "host-state"
    notify = tmp / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        started = time.monotonic()
        proc = subprocess.Popen(
            [
                str(ROOT / ".venv/bin/intercom"),
                "run",
                "--simulate",
                "--config",
                str(config),
                "--state-dir",
                str(state),
            ],
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            ready = None
            while ready is None and proc.poll() is None:
                if select.select([sock], [], [], 1)[0] and "READY=1" in sock.recv(4096).decode():
                    ready = time.monotonic() - started
            if ready is None:
                sys.exit(
                    "the host's station never became READY: "
                    + (proc.stderr.read().decode()[-2000:] if proc.stderr else "")
                )
            press_ring = asyncio.run(host_press_ring(state))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    return {"ready_s": ready, "press_ring_s": press_ring}


async def host_press_ring(state: Path) -> float:
    """Seconds from a simulated press to the ring at a paired resident, on this machine."""
    paired = await request(state, {"request": "pair", "flat": "1"})
    url = paired["station_url"]
    ca = await fetch_ca(url, paired["fingerprint"])
    phone = await pair_remote(RemoteStation(url, ca, "door-host"), paired["code"])
    try:
        await phone.connect()
        await phone.wait_connected(30)
        pressed = time.time()
        await request(state, {"request": "sim", "action": "press", "button": None})
        ring = await phone.expect("ring", timeout=30)
    finally:
        await phone.close()
    return float(ring["received_at"] - pressed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="the SD image to boot")
    parser.add_argument(
        "--work",
        type=Path,
        help="a folder for the copy of the image (default: a temporary one, removed afterwards)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-image-") as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        table = json.loads(
            subprocess.run(
                ["sfdisk", "--json", str(args.image)], capture_output=True, text=True, check=True
            ).stdout
        )["partitiontable"]
        module = gpio_sim_for(*image_kernel(args.image, table, work))
        stamps = devices_session(args.image, table, module, work)
        started = stamps["started"]
        emulated = {
            "ready_s": (
                started["ActiveEnterTimestampMonotonic"]
                - started["ExecMainStartTimestampMonotonic"]
            )
            / 1e6,
            "press_ring_s": stamps["rung"] - stamps["pressed"],
        }
        relay = tomllib.loads(PIN_MAP.read_text())["hardware"]["relay"]
        host = host_figures(work, relay)
    print(
        f"emulated arm64 image / host ({os.cpu_count()} cores): "
        f"start->READY {emulated['ready_s']:.2f} s / {host['ready_s']:.2f} s = "
        f"{emulated['ready_s'] / host['ready_s']:.1f}x; "
        f"press->ring {emulated['press_ring_s']:.3f} s / {host['press_ring_s']:.3f} s = "
        f"{emulated['press_ring_s'] / host['press_ring_s']:.1f}x"
    )


if __name__ == "__main__":
    main()
