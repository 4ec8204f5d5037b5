"""Installed releases: one virtual environment per version, ``current`` switched atomically.

Layout under a root (``/`` on a station, a folder in tests and image builds)::

    opt/intercom/releases/VERSION/      a venv with exactly the bundle's wheels
    opt/intercom/current -> releases/VERSION   what intercom.service runs
    usr/share/intercom/release-keys/*.pem      release public keys, from the image
    var/lib/intercom-update/state.json         highest version run, history

A bundle is applied by installing it beside the running release, switching
``current`` with one ``rename``, and checking that the new version reaches READY in
time; when it does not, ``current`` is switched back and the old version restarted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from intercom.deploy.bundle import (
    Manifest,
    UpdateRefusedError,
    extract_wheels,
    load_trusted_keys,
    verify_bundle,
)
from intercom.deploy.health import HealthCheck, HealthResult
from intercom.errors import IntercomError

log = logging.getLogger(__name__)

RELEASES = Path("opt/intercom/releases")
CURRENT = Path("opt/intercom/current")
KEY_DIR = Path("usr/share/intercom/release-keys")
STATE = Path("var/lib/intercom-update/state.json")
KEEP_RELEASES = 2


class UpdateFailedError(IntercomError, RuntimeError):
    """An update was installed but did not come up; the previous version runs again."""


@dataclass
class Layout:
    """Where releases, keys and update state live under ``root``."""

    root: Path
    releases: Path = field(init=False)
    current: Path = field(init=False)
    key_dir: Path = field(init=False)
    state_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.releases = self.root / RELEASES
        self.current = self.root / CURRENT
        self.key_dir = self.root / KEY_DIR
        self.state_file = self.root / STATE

    def current_version(self) -> Version | None:
        """The version ``current`` points at, or None before the first install."""
        try:
            return Version(self.current.readlink().name)
        except (OSError, InvalidVersion):
            return None

    def read_state(self) -> dict[str, Any]:
        """The update state: ``highest`` version ever run, ``history`` of attempts."""
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return {"highest": None, "history": []}
        except (OSError, ValueError) as exc:
            raise IntercomError(f"update state {self.state_file} is unreadable: {exc}") from exc
        return data if isinstance(data, dict) else {"highest": None, "history": []}

    def write_state(self, state: dict[str, Any]) -> None:
        """Write the update state durably (write, fsync, rename)."""
        self.state_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        with tmp.open("w") as handle:
            json.dump(state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.state_file)

    def switch(self, version: Version | str) -> None:
        """Point ``current`` at a release with one atomic rename."""
        tmp = self.current.with_name(f".current-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("releases") / str(version))
        tmp.replace(self.current)
        _fsync_dir(self.current.parent)


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did."""

    version: Version
    previous: Version | None
    health: HealthResult


def check_version(layout: Layout, manifest: Manifest) -> None:
    """Refuse a bundle older than (or the same as) what runs or has run here."""
    current = layout.current_version()
    state = layout.read_state()
    highest = Version(state["highest"]) if state.get("highest") else None
    new = manifest.version
    if current is not None and new == current:
        raise UpdateRefusedError(f"version {new} is already installed")
    if current is not None and new < current:
        raise UpdateRefusedError(
            f"version {new} is older than the installed {current}: downgrades are refused"
        )
    if highest is not None and new < highest:
        raise UpdateRefusedError(
            f"version {new} is older than {highest}, the newest this station has run: "
            "downgrades are refused"
        )


def verify(layout: Layout, bundle: Path) -> Manifest:
    """Check signature, key and version of a bundle without installing it."""
    manifest = verify_bundle(bundle, load_trusted_keys(layout.key_dir))
    check_version(layout, manifest)
    return manifest


def install(layout: Layout, bundle: Path, manifest: Manifest) -> Path:
    """Make the release's venv with exactly the bundle's wheels; return its folder."""
    target = layout.releases / str(manifest.version)
    if target.exists():
        shutil.rmtree(target)  # a partial install from an interrupted run
    layout.releases.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=layout.releases) as staging:
        wheels = extract_wheels(bundle, manifest, Path(staging))
        try:
            # Debian's hardware bindings (python3-pyaudio; picamera2 on Raspberry Pi OS) are
            # system packages, seen as the image's first release sees them; every signed
            # wheel is still installed into the venv (--ignore-installed), none taken from
            # the system instead.
            venv.EnvBuilder(symlinks=True, with_pip=False, system_site_packages=True).create(
                target
            )
            result = subprocess.run(
                [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"),
                 "install", "--no-index", "--no-deps", "--ignore-installed",
                 "--disable-pip-version-check",
                 "--no-input", "--quiet", *map(str, wheels)],
                capture_output=True, text=True, check=False, timeout=1800, env=_clean_env(),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise IntercomError(f"cannot install {manifest.version}: {exc}") from exc
        if result.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise IntercomError(
                f"cannot install {manifest.version}: pip failed: {result.stderr.strip()[-500:]}"
            )
    if not (target / "bin" / "intercom").exists():
        shutil.rmtree(target, ignore_errors=True)
        raise UpdateRefusedError(f"bundle {manifest.version} installs no 'intercom' command")
    return target


def apply(layout: Layout, bundle: Path, check: HealthCheck | None, timeout_s: float) -> ApplyResult:
    """Verify, install, switch, health-check; roll back when READY does not come in time."""
    manifest = verify(layout, bundle)
    previous = layout.current_version()
    target = install(layout, bundle, manifest)
    layout.switch(manifest.version)
    log.info("switched to %s (was %s); checking it", manifest.version, previous)
    health = (
        check(target, timeout_s) if check is not None
        else HealthResult(ready=True, detail="not checked", seconds=0.0)
    )
    state = layout.read_state()
    attempt = {
        "version": str(manifest.version),
        "from": str(previous) if previous else None,
        "at": int(time.time()),
        "ready": health.ready,
        "detail": health.detail,
    }
    state["history"] = [*state.get("history", []), attempt][-20:]
    if not health.ready:
        layout.write_state(state)
        if previous is None:
            raise UpdateFailedError(
                f"{manifest.version} did not reach READY ({health.detail}); "
                "there is no earlier release to roll back to"
            )
        layout.switch(previous)
        shutil.rmtree(target, ignore_errors=True)
        again = (
            check(layout.releases / str(previous), timeout_s) if check is not None else None
        )
        back = "and it is READY again" if again is None or again.ready else (
            f"but it did not come back either: {again.detail}"
        )
        raise UpdateFailedError(
            f"{manifest.version} did not reach READY within {timeout_s:g} s "
            f"({health.detail}); rolled back to {previous} {back}"
        )
    state["highest"] = str(max(manifest.version, Version(state["highest"]))
                           if state.get("highest") else manifest.version)
    layout.write_state(state)
    _prune(layout, keep={manifest.version, *([previous] if previous else [])})
    return ApplyResult(version=manifest.version, previous=previous, health=health)


def _prune(layout: Layout, keep: set[Version]) -> None:
    """Remove old releases, keeping the current one and the one before it."""
    for path in layout.releases.iterdir():
        try:
            version = Version(path.name)
        except InvalidVersion:
            continue
        if version not in keep and len(keep) >= KEEP_RELEASES:
            log.info("removing old release %s", version)
            shutil.rmtree(path, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    """The environment for pip: nothing that points it at another environment."""
    return {
        k: v for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE"} and not k.startswith("PIP_")
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
