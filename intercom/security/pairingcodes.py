"""Pairing codes: how they are made and hashed, and the spool first boot leaves them in.

Shared by the station's pairing (``intercom.calls.pairing``), which redeems them, and
first boot (``intercom.deploy.firstboot``), which makes the first one before the
station runs.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from intercom.safefiles import replace_atomically

CODE_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no 0/O, 1/I: read aloud, typed
CODE_LENGTH = 12  # 60 bits
CODE_TTL_S = 600.0
SPOOL = "pairing-spool.json"


def digest(code: str) -> str:
    """The SHA-256 a code is kept as (dashes, spaces and case do not matter)."""
    normal = code.strip().upper().replace("-", "").replace(" ", "")
    return hashlib.sha256(normal.encode()).hexdigest()


def new_code() -> str:
    """A fresh random code."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def spooled(state_dir: Path, now: float) -> list[dict[str, object]]:
    """The spool's entries that have not expired (none when there is no spool)."""
    path = state_dir / SPOOL
    entries: list[dict[str, object]] = json.loads(path.read_text()) if path.exists() else []
    return [e for e in entries if float(str(e.get("expires_at", 0))) > now]


def spool_code(
    state_dir: Path, flat: str, now: float, installer_hours: float = 0.0
) -> tuple[str, float]:
    """A code made while no station runs (first boot, ``pair``); taken at the start.

    Only the code's hash, its flat (empty for an installer's code, which carries the
    hours the installer stays valid) and its expiry are written (``pairing-spool.json``,
    0600); the code itself is shown once, to whoever made it.
    """
    code = new_code()
    expires_at = now + CODE_TTL_S
    path = state_dir / SPOOL
    entries = spooled(state_dir, now)  # the expired ones are dropped as it is written
    entry: dict[str, object] = {"digest": digest(code), "flat": flat, "expires_at": expires_at}
    if installer_hours > 0:
        entry["installer_hours"] = installer_hours
    entries.append(entry)
    replace_atomically(path, json.dumps(entries).encode(), 0o600)
    return code, expires_at
