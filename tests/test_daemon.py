"""The daemon as a real process: systemd notify, simulator, status, signals, bad input."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import INTERCOM

GOOD_HW = """
[station]
id = "hall"

[hardware]
pin_factory = "mock"
buttons = [{ pin = 17, flat = "1" }]
relay = { pin = 27 }

[media.camera]
source = "v4l2"
device = "/dev/video-does-not-exist"

[media.audio]
input = "synthetic"
output = "levels"
"""


class NotifyListener:
    """A service manager's notify socket, as systemd would bind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 15) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(data)
            if line in data.split("\n"):
                return time.monotonic()
        raise AssertionError(f"no {line} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INTERCOM, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def daemon(tmp_path: Path):
    listener = NotifyListener(tmp_path / "notify.sock")
    state = tmp_path / "state"
    env = {**os.environ, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [*INTERCOM, "run", "--simulate", "--state-dir", str(state)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc, listener, state
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    listener.close()


def test_simulated_station_end_to_end(daemon):
    proc, listener, state = daemon
    listener.wait_for("READY=1")
    listener.wait_for("WATCHDOG=1", timeout=2)

    press = cli("sim", "press", "--state-dir", str(state))
    assert press.returncode == 0, press.stderr
    deadline = time.monotonic() + 5
    while True:
        status = cli("status", "--json", "--state-dir", str(state))
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        if "DoorbellPressed" in [e["type"] for e in info["recent_events"]] or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.05)
    assert "DoorbellPressed" in [e["type"] for e in info["recent_events"]]
    assert info["simulated"] is True
    assert info["lock"] == "locked"
    assert info["listening"]["control"] == str(state / "control.sock")

    text = cli("status", "--state-dir", str(state))
    assert f"station  {info['station']} (simulated)" in text.stdout

    proc.send_signal(signal.SIGTERM)
    listener.wait_for("STOPPING=1", timeout=5)
    assert proc.wait(timeout=5) == 0  # by itself, cleanly; the limit only guards a hang
    notified = [line for message in listener.messages for line in message.split("\n")]
    assert notified.index("READY=1") < notified.index("STOPPING=1")
    _, err = proc.communicate()
    assert "relay off" in err
    assert not (state / "control.sock").exists()


def test_status_without_station(tmp_path: Path):
    res = cli("status", "--state-dir", str(tmp_path))
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"intercom: no station is running with state dir {tmp_path}; start it (intercom run) "
        "or point elsewhere with --state-dir DIR, $INTERCOM_STATE_DIR or --config FILE")
    assert list(tmp_path.iterdir()) == []  # nothing made on the way


def test_unknown_argument_is_one_line_exit_2():
    res = cli("run", "--simulate", "--bogus")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1
    assert "--bogus" in res.stderr


def test_bad_config_stops_startup(tmp_path: Path):
    conf = tmp_path / "bad.toml"
    conf.write_text(GOOD_HW.replace("pin = 27", "pin = 27, max_open_s = 90"))
    res = cli("run", "--config", str(conf), "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 2
    assert "hardware.relay.max_open_s: must be at most 30, got 90" in res.stderr


def test_missing_camera_is_a_clear_error_and_nothing_starts(tmp_path: Path):
    conf = tmp_path / "hall.toml"
    conf.write_text(GOOD_HW)
    state = tmp_path / "s"
    res = cli("run", "--config", str(conf), "--state-dir", str(state))
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("intercom: media.camera.device: cannot open /dev/video-does-not-exist")
    assert not (state / "control.sock").exists()


def test_lgpio_missing_is_a_clear_error(tmp_path: Path):
    conf = tmp_path / "hall.toml"
    conf.write_text(GOOD_HW.replace('pin_factory = "mock"', 'pin_factory = "lgpio"'))
    res = cli("run", "--config", str(conf), "--state-dir", str(tmp_path / "s"))
    assert res.returncode == 1
    assert "hardware.pin_factory: cannot open the lgpio backend" in res.stderr


def test_a_notify_socket_nobody_reads_never_blocks_the_station(tmp_path: Path):
    """A full notify socket (datagrams block when the reader's queue is full) is not a hang."""
    listener = NotifyListener(tmp_path / "notify.sock")  # bound, but never read
    state = tmp_path / "state"
    env = {**os.environ, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "20000"}
    proc = subprocess.Popen(
        [*INTERCOM, "run", "--simulate", "--state-dir", str(state)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            if (state / "control.sock").exists():
                break
            time.sleep(0.05)
        time.sleep(1.5)  # some 150 watchdog pings: far more than the socket queues
        res = cli("status", "--json", "--state-dir", str(state))
        assert res.returncode == 0, res.stderr
    finally:
        proc.terminate()
        proc.wait(10)
        listener.close()


def test_status_text_shows_log_web_and_mqtt_link(tmp_path: Path):
    from .mosquitto import Broker  # noqa: PLC0415

    broker = Broker(tmp_path / "broker")
    broker.start()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            *INTERCOM,
            "run",
            "--simulate",
            "--state-dir",
            str(state),
            "--mqtt",
            f"mqtt://127.0.0.1:{broker.port}",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            res = cli("status", "--state-dir", str(state))
            text = res.stdout
            if "mqtt     connected" in text:
                break
            time.sleep(0.1)
        assert f"mqtt     connected to 127.0.0.1:{broker.port}" in text
        assert "listen   web: https://127.0.0.1:" in text
        assert "log      seq " in text
    finally:
        proc.terminate()
        proc.wait(10)
        broker.kill()
