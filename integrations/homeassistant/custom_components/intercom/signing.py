"""Signed unlock commands for an intercom station, made on the Home Assistant host.

Pure Python on ``cryptography`` (which Home Assistant ships): it imports neither Home
Assistant nor the station's ``intercom`` package, so the tests can use it without
either, and a Home Assistant host needs nothing installed.

The command is the station's: a compact JWS (RFC 7515) signed with Ed25519 (RFC 8037;
``alg`` ``Ed25519``, RFC 9864's name, which the station takes beside ``EdDSA``), header
``{"alg", "kid"}`` and exactly the claims ``aud`` (the station id), ``cmd`` (``unlock``),
``door``, ``iat``, ``exp`` (at most 60 s later), ``jti`` (a fresh id) and ``totp`` (the
code the person types). The station answers ``{"jti": ..., "result": "granted" |
"denied"}`` on ``<prefix>/command/result``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import shlex
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

ALG = "Ed25519"
LIFETIME_S = 30  # the station refuses more than 60
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a principal id, the kid
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")  # a station id, a door
CODE_PATTERN = re.compile(r"^[0-9]{6}$")  # the station's TOTP codes: six digits
TOPIC_PATTERN = re.compile(r"^[^#+\x00$][^#+\x00]{0,199}$")  # a plain topic prefix
GRANTED, DENIED = "granted", "denied"


class SigningError(ValueError):
    """A key, a code or a setting the station would not take; the message says which."""


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SigningError("not base64url") from exc


def new_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key for this Home Assistant."""
    return Ed25519PrivateKey.generate()


def public_jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    """The public JWK the station enrols (``intercom principals add --public-key``)."""
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}


def private_jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    """The private JWK (``d`` is the secret), as kept in Home Assistant's storage."""
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return {**public_jwk(key), "d": b64url(raw)}


def key_from_jwk(jwk: dict[str, Any]) -> Ed25519PrivateKey:
    """The key of a private JWK made by ``private_jwk``; SigningError when it is not one."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise SigningError("not an Ed25519 JWK")
    d = jwk.get("d")
    if not isinstance(d, str):
        raise SigningError("the JWK has no private part")
    raw = _b64url_decode(d)
    if len(raw) != 32:
        raise SigningError("an Ed25519 private key is 32 bytes")
    key = Ed25519PrivateKey.from_private_bytes(raw)
    if "x" in jwk and public_jwk(key)["x"] != jwk["x"]:
        raise SigningError("the JWK's public part does not match its private part")
    return key


def check_settings(station: str, door: str, principal: str, prefix: str) -> dict[str, str]:
    """The settings that do not fit the station, by name, with why (empty when all do)."""
    errors: dict[str, str] = {}
    if not NAME_PATTERN.match(station):
        errors["station"] = "invalid_name"
    if not NAME_PATTERN.match(door):
        errors["door"] = "invalid_name"
    if not ID_PATTERN.match(principal):
        errors["principal"] = "invalid_id"
    if prefix and not TOPIC_PATTERN.match(prefix):
        errors["topic_prefix"] = "invalid_topic"
    return errors


def enrol_command(principal: str, door: str, jwk_file: str = "ha.jwk") -> str:
    """The command the installer runs at the station, the public JWK saved as ``jwk_file``."""
    return shlex.join(["intercom", "principals", "add", "--role", "manager", "--door", door,
                       "--id", principal, "--public-key", jwk_file])


@dataclass(frozen=True)
class StationTopics:
    """The station's topics this integration uses, under its prefix."""

    prefix: str

    @classmethod
    def of(cls, station: str, prefix: str = "") -> StationTopics:
        """The topics of ``prefix``, or of the station's default ``intercom/<station>``."""
        return cls(prefix.rstrip("/") or f"intercom/{station}")

    @property
    def command(self) -> str:
        """Where signed commands go."""
        return f"{self.prefix}/command"

    @property
    def result(self) -> str:
        """Where the station answers them."""
        return f"{self.prefix}/command/result"

    @property
    def lock(self) -> str:
        """The relay's retained state."""
        return f"{self.prefix}/state/lock"

    @property
    def availability(self) -> str:
        """``online`` / ``offline``."""
        return f"{self.prefix}/availability"


def node_id(station: str) -> str:
    """The station's device id in its MQTT discovery (``intercom_<id>``)."""
    return "intercom_" + "".join(c if c.isalnum() else "_" for c in station)


@dataclass(frozen=True)
class Signer:
    """Signs unlock commands for one door of one station under one principal id."""

    key: Ed25519PrivateKey
    kid: str
    station: str
    door: str

    def unlock(self, code: str, now: float | None = None) -> tuple[str, str]:
        """A signed unlock command carrying ``code``, and its ``jti``."""
        if not CODE_PATTERN.match(code):
            raise SigningError("the code is the six digits of the authenticator app")
        issued = int(time.time() if now is None else now)
        jti = secrets.token_urlsafe(16)
        header = {"alg": ALG, "kid": self.kid}
        claims = {"aud": self.station, "cmd": "unlock", "door": self.door, "iat": issued,
                  "exp": issued + LIFETIME_S, "jti": jti, "totp": code}
        signing_input = f"{_segment(header)}.{_segment(claims)}"
        signature = self.key.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64url(signature)}", jti


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def parse_result(payload: bytes | str) -> tuple[str, str] | None:
    """``(jti, "granted" | "denied")`` of a station's answer; None for anything else."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    jti, result = body.get("jti"), body.get("result")
    if not isinstance(jti, str) or result not in {GRANTED, DENIED}:
        return None
    return jti, result


def parse_lock_state(payload: bytes | str) -> bool | None:
    """Whether ``<prefix>/state/lock`` says locked (None: not a state this knows)."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    state = body.get("state") if isinstance(body, dict) else None
    return {"locked": True, "unlocked": False}.get(state) if isinstance(state, str) else None
