"""Where a station's state is, and the lock that makes one process its owner.

One resolver decides the state directory for every command: the ``--state-dir`` flag,
else ``$INTERCOM_STATE_DIR``, else the config's ``station.state_dir`` (the config from
``--config``, else ``$INTERCOM_CONFIG``, else ``/etc/intercom/intercom.toml`` when it
exists), else the default: ``/var/lib/intercom``, or the simulation folder for
``run --simulate`` and ``sim``.

The instance lock is an exclusive ``flock`` on ``STATE_DIR/instance.lock``. The daemon
takes it before it opens anything else and holds it while it runs; a command run with
no daemon takes it for the time it changes the state itself. ``flock`` locks belong to
the open file description, so they are independent of SQLite's POSIX locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from intercom.config import DEFAULT_CONFIG, DEFAULT_STATE_DIR, Settings, load_settings
from intercom.errors import IntercomError
from intercom.identity import KEY_DIR, STATION_KEY

SIM_STATE_DIR = (
    Path(os.environ.get("XDG_STATE_HOME", str(Path.home() / ".local" / "state"))) / "intercom-sim"
)
LOCK_FILE = "instance.lock"
STATE_ENV = "INTERCOM_STATE_DIR"
CONFIG_ENV = "INTERCOM_CONFIG"
CLI_WAIT_S = 10.0  # how long a starting daemon waits for a command that holds the lock


class NoStationStateError(IntercomError, FileNotFoundError):
    """The resolved state directory holds no station (no keys): nothing to act on."""


class InstanceLockedError(IntercomError, BlockingIOError):
    """Another process holds the state directory's instance lock."""

    def __init__(self, state_dir: Path, pid: int | None, role: str) -> None:
        who = f"pid {pid}" if pid else "another process"
        what = "a station" if role == "run" else "a command" if role else "a process"
        super().__init__(f"{what} ({who}) holds the state directory {state_dir}")
        self.pid = pid
        self.role = role


@dataclass(frozen=True)
class Resolved:
    """A state directory, the config it came with, and how it was chosen."""

    state_dir: Path
    config: Path | None
    reason: str
    looked: tuple[str, ...] = field(default=())

    def require_station(self) -> Path:
        """The state directory, when a station has made its keys there; else why not."""
        if (self.state_dir / KEY_DIR / STATION_KEY).is_file():
            return self.state_dir
        why = "; ".join((self.reason, *self.looked))
        raise NoStationStateError(
            f"no station state in {self.state_dir} ({why}). A station "
            "makes its state at its first start; point elsewhere with --state-dir DIR, "
            f"${STATE_ENV} or --config FILE (whose station.state_dir is used)"
        )


def config_path(flag: Path | None) -> tuple[Path | None, str]:
    """The config file a command reads, and how it was chosen (None: no config)."""
    if flag is not None:
        return flag, f"--config {flag}"
    if env := os.environ.get(CONFIG_ENV):
        return Path(env), f"${CONFIG_ENV}={env}"
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG, f"{DEFAULT_CONFIG}"
    return None, f"no config ({DEFAULT_CONFIG} absent, ${CONFIG_ENV} unset)"


def resolve(
    flag: Path | None,
    config_flag: Path | None = None,
    *,
    simulate: bool = False,
    settings: Settings | None = None,
) -> Resolved:
    """The state directory: flag > env > the config's ``state_dir`` > the default."""
    config, config_reason = config_path(config_flag)
    looked: list[str] = []
    if flag is not None:
        return Resolved(Path(flag), config, f"from --state-dir {flag}")
    looked.append("--state-dir not given")
    if env := os.environ.get(STATE_ENV):
        return Resolved(Path(env), config, f"from ${STATE_ENV}")
    looked.append(f"${STATE_ENV} unset")
    if settings is None and config is not None:
        settings = load_settings(config)
    if settings is not None and "state_dir" in settings.station.model_fields_set:
        return Resolved(
            settings.station.state_dir, config, f"from station.state_dir in {config_reason}"
        )
    looked.append(config_reason if config is None else f"{config_reason} names no state_dir")
    if simulate:
        return Resolved(SIM_STATE_DIR, config, "the simulation default", tuple(looked))
    return Resolved(DEFAULT_STATE_DIR, config, "the default", tuple(looked))


class InstanceLock:
    """The exclusive lock on ``STATE_DIR/instance.lock``; ``role`` is ``run`` or ``cli``."""

    def __init__(self, state_dir: Path, role: str) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self.role = role
        self._fd: int | None = None

    def acquire(self, wait_for_cli_s: float = 0.0) -> None:
        """Take the lock or raise InstanceLockedError naming the holder.

        A holder that is a command (role ``cli``) is waited for up to
        ``wait_for_cli_s``; a holder that is a station never is.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + wait_for_cli_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pid, role = _holder(fd)
                    if role == "cli" and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    raise InstanceLockedError(self.state_dir, pid, role) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it would race a new holder)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def _holder(fd: int) -> tuple[int | None, str]:
    """The pid and role written by the lock's holder (None, "" when unreadable)."""
    try:
        words = os.pread(fd, 64, 0).decode("ascii", "replace").split()
        return int(words[0]), words[1] if len(words) > 1 else ""
    except (OSError, ValueError, IndexError):
        return None, ""
