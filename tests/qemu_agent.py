"""The image test's agent inside the booted image: the door's simulated hardware.

Copied into the test's copy of the image (never into the image itself) and run by two
test units, as root, with the image's own Python:

``setup``   before intercom.service: loads the kernel's simulators and makes a gpiochip
            of the Pi's header (gpio-sim through configfs: 58 lines, GPIO0-27 named as
            on a Pi 4), a V4L2 camera (vivid, one capture node) and a sound card (ALSA
            loopback, one substream per direction).
``serve``   answers the test over a virtio serial port, one JSON line in, one out: pull a
            GPIO line up or down and read it back (the pins' simulated wiring), play a
            tone into the loopback card and record what the station plays into it, show
            its streams, read the event log and the unit's start times.

Runs in the image: the standard library only (ALSA through ctypes on libasound).
"""

from __future__ import annotations

import array
import ctypes
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

GPIO_SIM = Path("/sys/kernel/config/gpio-sim/door")
MODULE = "/usr/local/lib/intercom-test/gpio-sim.ko"
HEADER_LINES = 58  # the BCM2711's bank, as a Pi 4's gpiochip0
RATE = 48_000
FRAME = 960  # 20 ms
# The loopback card's second device: what is played there comes out of device 0's
# capture (the station's microphone), what device 0 plays (the station's speaker) can be
# recorded here.
AGENT_PCM = b"plughw:Loopback,1,0"


def run(*args: str) -> str:
    """Run a command; its stdout (a failure raises with its stderr)."""
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def setup() -> None:
    """Load the simulators and make the gpiochip, before the station starts."""
    run("modprobe", "configfs")
    if not Path("/sys/kernel/config/gpio-sim").exists():
        run("insmod", MODULE)
    bank = GPIO_SIM / "bank0"
    bank.mkdir(parents=True)
    (bank / "num_lines").write_text(str(HEADER_LINES))
    (bank / "label").write_text("pinctrl-bcm2711")
    for line in range(28):
        (bank / f"line{line}").mkdir()
        (bank / f"line{line}" / "name").write_text(f"GPIO{line}")
    (GPIO_SIM / "live").write_text("1")
    run("modprobe", "vivid", "n_devs=1", "node_types=0x1")
    run("modprobe", "snd-aloop", "index=0", "id=Loopback", "pcm_substreams=1")
    run("udevadm", "settle")
    chip = (bank / "chip_name").read_text().strip()
    dev = Path("/dev")
    sys.stdout.write(f"agent: gpio-sim {chip} ({(GPIO_SIM / 'dev_name').read_text().strip()}), "
                     f"{' '.join(sorted(map(str, dev.glob('video*'))))}, "
                     f"{' '.join(sorted(map(str, dev.glob('snd/pcm*'))))}\n")
    sys.stdout.write(run("ls", "-l", f"/dev/{chip}", "/dev/video0", "/dev/snd/"))
    sys.stdout.flush()


def line_dir(pin: int) -> Path:
    """The sysfs folder of one simulated line (its pull and value)."""
    [path] = Path("/sys/devices/platform").glob(f"gpio-sim.*/gpiochip*/sim_gpio{pin}")
    return path


def pull(pin: int, level: str) -> dict[str, Any]:
    """Pull the line up or down, as a switch or a button on the pin does."""
    (line_dir(pin) / "pull").write_text(f"pull-{level}")
    return {"at": time.monotonic()}


def value(pin: int) -> dict[str, Any]:
    """The line's level: what the station drives on an output, the pull on an input."""
    return {"value": int((line_dir(pin) / "value").read_text())}


def watch(pin: int, seconds: float) -> dict[str, Any]:
    """The line's level every 10 ms for a while: its changes, as (seconds in, level)."""
    path = line_dir(pin) / "value"
    start = time.monotonic()
    changes: list[tuple[float, int]] = []
    last = -1
    while time.monotonic() - start < seconds:
        level = int(path.read_text())
        if level != last:
            changes.append((round(time.monotonic() - start, 3), level))
            last = level
        time.sleep(0.01)
    return {"changes": changes}


class Pcm:
    """One ALSA PCM of the loopback card through libasound (s16 mono 48 kHz)."""

    def __init__(self, capture: bool, channels: int = 1, rate: int = RATE, *,
                 nonblock: bool = False, latency_us: int = 100_000) -> None:
        self.lib = ctypes.CDLL("libasound.so.2")
        for name in ("snd_pcm_readi", "snd_pcm_writei"):
            function = getattr(self.lib, name)
            function.restype = ctypes.c_long
            function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong]
        self.lib.snd_strerror.restype = ctypes.c_char_p
        self.errors: list[str] = []
        self.handle = ctypes.c_void_p()
        mode = 1 if nonblock else 0  # SND_PCM_NONBLOCK
        err = self.lib.snd_pcm_open(ctypes.byref(self.handle), AGENT_PCM, int(capture), mode)
        if err < 0:
            raise OSError(f"snd_pcm_open: {err}")
        # S16_LE = 2, RW_INTERLEAVED = 3, 1 channel, 48 kHz, resampling allowed, 100 ms.
        self.channels = channels
        err = self.lib.snd_pcm_set_params(self.handle, 2, 3, channels, rate, 1, latency_us)
        if err < 0:
            raise OSError(f"snd_pcm_set_params: {err}")

    def write(self, pcm: bytes) -> None:
        """Play 20 ms, recovering from an underrun."""
        done = self.lib.snd_pcm_writei(self.handle, pcm, FRAME)
        if done < 0:
            self.lib.snd_pcm_recover(self.handle, int(done), 1)

    def read(self) -> bytes:
        """Record 20 ms, recovering from an overrun."""
        buf = ctypes.create_string_buffer(FRAME * 2 * self.channels)
        done = self.lib.snd_pcm_readi(self.handle, buf, FRAME)
        if done < 0:
            self.errors.append(self.lib.snd_strerror(int(done)).decode())
            self.lib.snd_pcm_recover(self.handle, int(done), 1)
            time.sleep(0.02)
            return b""
        return buf.raw[: done * 2 * self.channels]

    def close(self) -> None:
        """Close the PCM."""
        self.lib.snd_pcm_close(self.handle)


def tone(seconds: float, frequency: float) -> dict[str, Any]:
    """Play a tone (-12 dBFS) into the loopback card, in the background."""

    def play() -> None:
        pcm = Pcm(capture=False)
        period = array.array("h", (
            int(0.25 * 32767 * math.sin(2 * math.pi * frequency * i / RATE))
            for i in range(FRAME)
        )).tobytes()
        for _ in range(int(seconds * RATE / FRAME)):
            pcm.write(period)
        pcm.close()

    threading.Thread(target=play, daemon=True).start()
    return {"at": time.monotonic()}


def listen(seconds: float) -> dict[str, Any]:
    """What comes out of the station's speaker for a while: RMS levels (0-1) per 20 ms,
    and the pitch of what it played (Hz).

    The loopback's capture of device 1 mirrors what the station plays on device 0. It is
    read without blocking: under emulation the loopback's period wake-ups come late, and
    a blocking read gives up with EIO after the kernel's wait (110 ms for this buffer),
    while the capture's position itself moves with the clock and is read when asked
    for. Half a second of buffer keeps the loop ahead of an overrun.
    """
    pcm = Pcm(capture=True, nonblock=True, latency_us=500_000)
    pcm.lib.snd_pcm_start(pcm.handle)
    buf = ctypes.create_string_buffer(RATE * 2)
    pending = array.array("h")
    levels: list[float] = []
    crossings = sounded = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        done = pcm.lib.snd_pcm_readi(pcm.handle, buf, RATE // 10)
        if done == -11:  # EAGAIN: nothing captured since the last read
            time.sleep(0.01)
            continue
        if done < 0:
            pcm.errors.append(pcm.lib.snd_strerror(int(done)).decode())
            pcm.lib.snd_pcm_recover(pcm.handle, int(done), 1)
            pcm.lib.snd_pcm_start(pcm.handle)
            continue
        pending.frombytes(buf.raw[: done * 2])
        while len(pending) >= FRAME:
            frame, pending = pending[:FRAME], pending[FRAME:]
            level = math.sqrt(sum(s * s for s in frame) / FRAME) / 32768
            levels.append(round(level, 5))
            # Its pitch: sign changes, two a cycle, over the samples played (an underrun
            # inside a frame leaves zeros, which are not counted).
            played = [sample for sample in frame if sample]
            crossings += sum((a < 0) != (b < 0) for a, b in itertools.pairwise(played))
            sounded += len(played)
    pcm.close()
    return {"levels": levels, "errors": sorted(set(pcm.errors)),
            "hz": round(crossings / 2 / (sounded / RATE), 1) if sounded else 0.0}


def alsa_state() -> dict[str, str]:
    """The loopback card's open streams and their parameters (/proc/asound)."""
    state = {}
    for path in sorted(Path("/proc/asound/card0").glob("pcm*/sub0/*_params")):
        state[str(path.relative_to("/proc/asound/card0"))] = path.read_text().strip()
    for path in sorted(Path("/proc/asound/card0").glob("pcm*/sub0/status")):
        state[str(path.relative_to("/proc/asound/card0"))] = path.read_text().strip()
    return state


def started() -> dict[str, Any]:
    """intercom.service's start and READY, on the boot's monotonic clock (microseconds)."""
    while run("systemctl", "show", "-P", "ActiveState", "intercom.service").strip() != "active":
        time.sleep(0.5)
    times = {}
    for key in ("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "NRestarts"):
        times[key] = int(run("systemctl", "show", "-P", key, "intercom.service"))
    return times


def events() -> dict[str, Any]:
    """The station's event log, decrypted (root reads the station's keys)."""
    out = run("/opt/intercom/current/bin/intercom", "log", "show", "--json",
              "--state-dir", "/var/lib/intercom")
    return {"events": [json.loads(line) for line in out.splitlines() if line.strip()]}


def journal(unit: str) -> dict[str, Any]:
    """The last lines a unit logged (for a failing test's message)."""
    return {"text": run("journalctl", "-u", unit, "-n", "60", "--no-pager")}


COMMANDS = {
    "pull": lambda a: pull(a["pin"], a["level"]),
    "value": lambda a: value(a["pin"]),
    "watch": lambda a: watch(a["pin"], a["seconds"]),
    "tone": lambda a: tone(a["seconds"], a["frequency"]),
    "listen": lambda a: listen(a["seconds"]),
    "alsa": lambda _a: {"alsa": alsa_state()},
    "started": lambda _a: started(),
    "events": lambda _a: events(),
    "journal": lambda a: journal(a["unit"]),
}


def serve(port: str) -> None:
    """Answer the test's requests on the virtio serial port until it says poweroff."""
    fd = os.open(port, os.O_RDWR)
    with os.fdopen(fd, "r+b", buffering=0) as channel:
        channel.write(b'{"hello": true}\n')
        buffer = b""
        while True:
            chunk = channel.read(4096)
            if not chunk:
                time.sleep(0.1)
                continue
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                if request["cmd"] == "poweroff":
                    channel.write(b'{"ok": true}\n')
                    subprocess.run(["systemctl", "--no-block", "poweroff"], check=False)
                    return
                try:
                    reply = {"ok": True, **COMMANDS[request["cmd"]](request)}
                except Exception as exc:  # noqa: BLE001 - every failure goes back to the test
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                channel.write(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        setup()
    else:
        serve(sys.argv[2])
