"""The daemon's one config writer: every change of the config file goes through here.

A change is a set of key paths (``privacy.zones``, ``hardware.buttons[1].flat``) with
their new values (None removes the key). The writer applies them to the file as it is
now, validates the result with the very models of ``intercom check-config``
(``parse_settings``), refuses it naming each bad key and the reason, or writes the file
atomically (``safefiles.replace_atomically``) and logs a ``PrivilegedAction`` with the
actor and the keys changed (never their values). Parts that can take a change at once
register an applier for a key prefix; every other change takes effect at the next start,
and the answer says which keys wait for it.

The file is written back with tomli-w: values and tables are kept, comments are not.
Keys that are set at installation (``station.id``, ``station.state_dir``) and secrets
(``mqtt.password``, ICE credentials: give ``password_file`` or ``password_credential``)
are refused here.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from intercom.config import Settings, parse_settings, wiring_warnings
from intercom.errors import ConfigError, IntercomError
from intercom.events import EventBus, PrivilegedAction
from intercom.safefiles import replace_atomically

log = logging.getLogger(__name__)

MAX_CHANGES = 64
_SEGMENT = re.compile(r"([a-z_][a-z0-9_]{0,40})((?:\[\d{1,3}\])*)")
_INDEX = re.compile(r"\[(\d{1,3})\]")
_PROBLEM = re.compile(r"^(?:line \d+: )?(?P<key>[\w.\[\]<>]+): (?P<reason>.+)$")
FIXED = {
    "station.id": "set at installation (it names the station in commands and topics)",
    "station.state_dir": "set at installation (the keys and the log live there)",
    "simulated": "set by `intercom run --simulate`, not in the file",
}
SECRETS = {
    "mqtt.password": "a secret is not written into the config; give mqtt.password_file "
    "or mqtt.password_credential",
}
_BY = re.compile(r"^(?P<what>.+) by (?P<other>[\w.\[\]]+)$")
_SECRET_PATTERN = re.compile(r"^web\.ice_servers\[\d+\]\.credential$")


@dataclass(frozen=True)
class Problem:
    """One refused key and why."""

    key: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {"key": self.key, "reason": self.reason}


class ConfigRefusedError(ConfigError):
    """A change was refused; ``refused`` names each key and the reason."""

    def __init__(self, refused: list[Problem]) -> None:
        super().__init__([f"{p.key}: {p.reason}" for p in refused])
        self.refused = refused


@dataclass(frozen=True)
class Written:
    """What a change did: the new settings, the keys applied now and those at restart."""

    settings: Settings
    changed: list[str]
    applied: list[str]
    at_restart: list[str]
    warnings: list[str]
    digest: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the values are not repeated: they may be long, or personal)."""
        return {"changed": self.changed, "applied": self.applied,
                "at_restart": self.at_restart, "warnings": self.warnings}


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise IntercomError(f"cannot read {path}: {exc.strerror or exc}") from exc


Applier = Callable[[Settings], None]
# A key prefix (``privacy.zones``), or a pattern the whole key must match.
KeyMatch = str | re.Pattern[str]


def _matches(key: str, match: KeyMatch) -> bool:
    return key.startswith(match) if isinstance(match, str) else match.fullmatch(key) is not None


def parse_key(key: str) -> list[str | int]:
    """``hardware.buttons[1].flat`` as ``["hardware", "buttons", 1, "flat"]``."""
    if not isinstance(key, str) or not key or len(key) > 200:
        raise ConfigRefusedError([Problem(str(key)[:60], "not a config key path")])
    parts: list[str | int] = []
    for segment in key.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            raise ConfigRefusedError([Problem(key, "not a config key path (like "
                                                   "hardware.buttons[0].flat)")])
        parts.append(match.group(1))
        parts.extend(int(i) for i in _INDEX.findall(match.group(2)))
    return parts


def apply_change(data: dict[str, Any], key: str, value: Any) -> None:
    """Set (or with None remove) ``key`` in the parsed TOML ``data``."""
    path = parse_key(key)
    node: Any = data
    for part, nxt in itertools.pairwise(path):
        node = _step(node, part, nxt, key)
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last > len(node):
            raise ConfigRefusedError([Problem(key, "no such item (append at the end only)")])
        if value is None:
            if last < len(node):
                del node[last]
        elif last == len(node):
            node.append(value)
        else:
            node[last] = value
        return
    if not isinstance(node, dict):
        raise ConfigRefusedError([Problem(key, "its parent is not a table")])
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


def _step(node: Any, part: str | int, nxt: str | int, key: str) -> Any:
    if isinstance(part, int):
        if not isinstance(node, list) or part > len(node):
            raise ConfigRefusedError([Problem(key, "no such item (append at the end only)")])
        if part == len(node):
            node.append({} if isinstance(nxt, str) else [])
        return node[part]
    if not isinstance(node, dict):
        raise ConfigRefusedError([Problem(key, "its parent is not a table")])
    return node.setdefault(part, {} if isinstance(nxt, str) else [])


def problems_of(exc: ConfigError) -> list[Problem]:
    """check-config's lines as key and reason (``line 3: relay.pin: ...``)."""
    found = []
    for line in exc.problems:
        match = _PROBLEM.match(line)
        found.append(Problem(match["key"], match["reason"]) if match else Problem("<file>", line))
    return found


def _blame(problem: Problem, changed: list[str]) -> Problem:
    """A clash named at the key that was changed (``... already used by buttons[0].pin``).

    The models name the second of two clashing keys; when the first is the one changed
    now, the problem is shown at that key, naming the other.
    """
    match = _BY.match(problem.reason)
    if problem.key in changed or match is None:
        return problem
    section = problem.key.split(".")[0]
    other = f"{section}.{match['other']}"
    if other not in changed:
        return problem
    return Problem(other, f"{match['what']} by {problem.key}")


def refuse_fixed(key: str) -> Problem | None:
    """A key this writer never changes, with why; None for the others."""
    if key in FIXED:
        return Problem(key, FIXED[key])
    if key in SECRETS:
        return Problem(key, SECRETS[key])
    if _SECRET_PATTERN.match(key):
        return Problem(key, "a secret is not written into the config through the writer")
    return None


class ConfigWriter:
    """Owns the config file of a running station: validate, write atomically, log, apply."""

    def __init__(self, path: Path | None, bus: EventBus) -> None:
        self.path = path
        self._bus = bus
        self._lock = asyncio.Lock()
        self._appliers: list[tuple[KeyMatch, Applier]] = []

    def on_change(self, match: KeyMatch, applier: Applier) -> None:
        """Call ``applier`` with the new settings when a key under ``match`` changes.

        ``match`` is a key prefix, or a compiled pattern that the whole key must match.
        """
        self._appliers.append((match, applier))

    def writable(self) -> bool:
        """Whether the file can be replaced now (its folder writable, not a read-only mount)."""
        if self.path is None:
            return False
        folder = self.path.parent
        try:
            return os.access(folder, os.W_OK) and not os.statvfs(folder).f_flag & os.ST_RDONLY
        except OSError:
            return False

    def read(self) -> Settings:
        """The settings as the file says now (validated)."""
        path = self._file()
        return parse_settings(_read(path), str(path))

    def _file(self) -> Path:
        if self.path is None:
            raise IntercomError("this station runs without a config file (intercom run "
                                "--simulate without --config): there is nothing to write")
        return self.path

    async def change(self, changes: dict[str, Any], actor: str) -> Written:
        """Apply ``changes`` (key path to value, None removes) for ``actor``, or refuse."""
        if not isinstance(changes, dict) or not changes:
            raise ConfigRefusedError([Problem("<changes>", "give at least one key and value")])
        if len(changes) > MAX_CHANGES:
            raise ConfigRefusedError([Problem("<changes>", f"at most {MAX_CHANGES} keys at once")])
        refused = [p for key in changes if (p := refuse_fixed(str(key))) is not None]
        if refused:
            raise ConfigRefusedError(refused)
        async with self._lock:
            written = await asyncio.to_thread(self._write, changes)
            self._bus.publish(PrivilegedAction(
                actor=actor, action="config-set",
                detail=f"{self.path}: {', '.join(written.changed)}; sha256 {written.digest}"))
            log.info("config: %s changed by %s", ", ".join(written.changed), actor)
        applied: list[str] = []
        later: list[str] = []
        for key in written.changed:
            appliers = [a for match, a in self._appliers if _matches(key, match)]
            for applier in appliers:
                applier(written.settings)
            (applied if appliers else later).append(key)
        return Written(written.settings, written.changed, applied, later, written.warnings,
                       written.digest)

    def _write(self, changes: dict[str, Any]) -> Written:
        path = self._file()
        text = _read(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigRefusedError([Problem("<file>", f"{path} is not valid TOML: "
                                                        f"{exc}; fix it by hand")]) from exc
        for key, value in changes.items():
            apply_change(data, key, value)
        try:
            new_text = tomli_w.dumps(data)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigRefusedError([Problem(next(iter(changes)),
                                              f"not a TOML value: {exc}")]) from exc
        try:
            settings = parse_settings(new_text, str(self.path))
        except ConfigError as exc:
            raise ConfigRefusedError([_blame(p, list(changes)) for p in problems_of(exc)]) from exc
        replace_atomically(path, new_text.encode())
        digest = hashlib.sha256(new_text.encode()).hexdigest()[:16]
        return Written(settings, list(changes), [], [], wiring_warnings(settings), digest)

    async def control_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Control request ``config-set``: ``{"changes": {key: value}}``."""
        try:
            written = await self.change(request.get("changes"),  # type: ignore[arg-type]
                                        str(request.get("actor", "local:?")))
        except ConfigRefusedError as exc:
            return {"ok": False, "error": "; ".join(exc.problems),
                    "refused": [p.to_dict() for p in exc.refused]}
        return {"ok": True, **written.to_dict()}

    async def get_request(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Control request ``config-get``: the file's settings, secrets masked."""
        return {"ok": True, "path": str(self.path),
                "config": self.read().model_dump(mode="json", exclude={"simulated"})}
