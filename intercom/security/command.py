"""The unlock command: a compact JWS (RFC 7515), made and strictly parsed.

Parsing here refuses, before any key is touched: oversized tokens, anything but three
canonical base64url segments, JSON that is not an object or repeats a key, unknown
header parameters or claims, and claims of the wrong type. Signature checking is left
to joserfc with an allow-list of one algorithm (see ``verify_signature``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import ECKey, OKPKey

from intercom.security.principals import (
    ALGORITHMS,
    ALL_ALGORITHMS,
    ID_PATTERN,
    PublicKey,
    key_kind,
)

MAX_TOKEN_BYTES = 4096
MAX_LIFETIME_S = 60
MAX_BEARER_LIFETIME_S = 366 * 86_400  # a read-only bearer (/metrics) lives up to a year
# What each bearer scope may read, and the longest it may live: a scraper's metrics bearer
# up to a year; a bearer for the redacted live view (WHEP) is short-lived, at most 31 days
# (the station's [whep] max_bearer_hours is usually far less).
BEARER_LIFETIMES_S = {"metrics": MAX_BEARER_LIFETIME_S, "whep": 31 * 86_400}
BEARER_SCOPES = frozenset(BEARER_LIFETIMES_S)
MAX_TIME = 2**53  # |iat|, |exp| in seconds: every such integer is exact as a float
HEADER_KEYS = frozenset({"alg", "kid", "typ"})
CLAIM_KEYS = frozenset({"aud", "cmd", "door", "iat", "exp", "jti", "totp"})
BEARER_CLAIM_KEYS = frozenset({"aud", "cmd", "iat", "exp", "jti"})
# A console request (the installer console's HTTPS requests): bound to one method, path
# and body (its SHA-256, base64url), short-lived and used once.
REQUEST_CLAIM_KEYS = frozenset({"aud", "cmd", "iat", "exp", "jti", "htm", "htu", "bh"})
MAX_REQUEST_LIFETIME_S = 120
JTI_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{8,128}$")
B64URL = re.compile(rb"^[A-Za-z0-9_-]*$")

# We accept "EdDSA" on purpose (browsers' and older libraries' name); RFC 9864 prefers
# "Ed25519", and joserfc warns on every use of the older name.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)


class CommandFormatError(ValueError):
    """The token is not a well-formed unlock command; the message is the log reason."""


@dataclass(frozen=True)
class UnverifiedCommand:
    """A parsed command whose signature has not been checked yet."""

    token: bytes
    alg: str
    kid: str
    aud: str
    door: str
    iat: float
    exp: float
    jti: str
    totp: str


def b64url_decode(segment: bytes) -> bytes:
    """Strict base64url without padding: only canonical encodings are accepted."""
    if not B64URL.match(segment) or len(segment) % 4 == 1:
        raise CommandFormatError("malformed base64url")
    try:
        data = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise CommandFormatError("malformed base64url") from exc
    if base64.urlsafe_b64encode(data).rstrip(b"=") != segment:
        raise CommandFormatError("non-canonical base64url")
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CommandFormatError(f"duplicate JSON member {key[:32]!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise CommandFormatError(f"JSON constant {name} not allowed")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant
        )
    except CommandFormatError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CommandFormatError(f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise CommandFormatError(f"{what} is not a JSON object")
    return value


def _number(claims: dict[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CommandFormatError(f"claim {name} must be a number")
    # Compared before any conversion: float() of a 400-digit integer raises OverflowError.
    if isinstance(value, float) and not math.isfinite(value):
        raise CommandFormatError(f"claim {name} must be a number")
    if not -MAX_TIME <= value <= MAX_TIME:
        raise CommandFormatError("iat/exp out of range")
    return float(value)


def _string(mapping: dict[str, Any], name: str, where: str) -> str:
    value = mapping.get(name)
    if not isinstance(value, str):
        raise CommandFormatError(f"{where} {name} must be a string")
    return value


def _segments(token: str | bytes) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """The token's bytes, header and claims of a size-checked, canonical compact JWS."""
    raw = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else bytes(token)
    if len(raw) > MAX_TOKEN_BYTES:
        raise CommandFormatError("oversized")
    raw = raw.strip(b" \t\r\n")
    parts = raw.split(b".")
    if len(parts) != 3:
        raise CommandFormatError("not a compact JWS (three segments)")
    header = _json_object(b64url_decode(parts[0]), "header")
    claims = _json_object(b64url_decode(parts[1]), "payload")
    b64url_decode(parts[2])
    return raw, header, claims


def parse(token: str | bytes) -> UnverifiedCommand:
    """Parse a compact JWS into an unverified command; CommandFormatError says why not."""
    raw, header, claims = _segments(token)
    alg, kid = _check_header(header)
    _check_claim_names(claims)
    jti = _jti(claims)
    return UnverifiedCommand(
        token=raw,
        alg=alg,
        kid=kid,
        aud=_string(claims, "aud", "claim"),
        door=_string(claims, "door", "claim"),
        iat=_number(claims, "iat"),
        exp=_number(claims, "exp"),
        jti=jti,
        totp=_string(claims, "totp", "claim"),
    )


@dataclass(frozen=True)
class UnverifiedBearer:
    """A parsed read-only bearer (a JWS naming a scope, ``cmd``), signature not checked."""

    token: bytes
    alg: str
    kid: str
    aud: str
    scope: str
    iat: float
    exp: float
    jti: str


def parse_bearer(token: str | bytes) -> UnverifiedBearer:
    """Parse a bearer token as strictly as a command; CommandFormatError says why not.

    A bearer has the command's header and claims less ``door`` and ``totp``, and a
    ``cmd`` naming what it may read (``metrics``). It opens nothing.
    """
    raw, header, claims = _segments(token)
    alg, kid = _check_header(header)
    _exact_claims(claims, BEARER_CLAIM_KEYS)
    scope = _string(claims, "cmd", "claim")
    if scope not in BEARER_SCOPES:
        raise CommandFormatError("cmd is not a bearer scope")
    return UnverifiedBearer(
        token=raw,
        alg=alg,
        kid=kid,
        aud=_string(claims, "aud", "claim"),
        scope=scope,
        iat=_number(claims, "iat"),
        exp=_number(claims, "exp"),
        jti=_jti(claims),
    )


@dataclass(frozen=True)
class UnverifiedRequest:
    """A parsed console request token (``cmd`` ``console``), signature not checked."""

    token: bytes
    alg: str
    kid: str
    aud: str
    iat: float
    exp: float
    jti: str
    method: str
    path: str
    body_hash: str


def parse_request(token: str | bytes) -> UnverifiedRequest:
    """Parse a console request token as strictly as a command; CommandFormatError says why.

    Its claims are the bearer's (``cmd`` is ``console``) and the request it signs:
    ``htm`` (method), ``htu`` (path) and ``bh`` (base64url SHA-256 of the body).
    """
    raw, header, claims = _segments(token)
    alg, kid = _check_header(header)
    _exact_claims(claims, REQUEST_CLAIM_KEYS)
    if _string(claims, "cmd", "claim") != "console":
        raise CommandFormatError("cmd is not 'console'")
    return UnverifiedRequest(
        token=raw, alg=alg, kid=kid, aud=_string(claims, "aud", "claim"),
        iat=_number(claims, "iat"), exp=_number(claims, "exp"), jti=_jti(claims),
        method=_string(claims, "htm", "claim"), path=_string(claims, "htu", "claim"),
        body_hash=_string(claims, "bh", "claim"),
    )


def sign_request(key: OKPKey | ECKey, *, kid: str, station: str, method: str, path: str,
                 body: bytes, now: float | None = None, lifetime: int = 60) -> str:
    """A console request token for one request (what installer.js makes in the browser)."""
    alg = "Ed25519" if key_kind(key) == "Ed25519" else "ES256"
    issued = int(time.time() if now is None else now)
    digest = base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
    claims = {"aud": station, "cmd": "console", "iat": issued, "exp": issued + lifetime,
              "jti": secrets.token_urlsafe(16), "htm": method, "htu": path, "bh": digest}
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return jws.serialize_compact({"alg": alg, "kid": kid}, payload, key, algorithms=[alg])


def _jti(claims: dict[str, Any]) -> str:
    jti = _string(claims, "jti", "claim")
    if not JTI_PATTERN.match(jti):
        raise CommandFormatError("malformed jti")
    return jti


def _check_header(header: dict[str, Any]) -> tuple[str, str]:
    if extra := set(header) - HEADER_KEYS:
        raise CommandFormatError(f"header parameter not allowed: {min(extra)[:32]!r}")
    alg = _string(header, "alg", "header")
    if alg not in ALL_ALGORITHMS:
        raise CommandFormatError(f"algorithm not allowed: {alg[:16]!r}")
    kid = _string(header, "kid", "header")
    if not ID_PATTERN.match(kid):
        raise CommandFormatError("malformed kid")
    if "typ" in header:
        _string(header, "typ", "header")
    return alg, kid


def _exact_claims(claims: dict[str, Any], keys: frozenset[str]) -> None:
    """Refuse a claim missing from ``keys`` or one not among them."""
    if missing := keys - set(claims):
        raise CommandFormatError(f"claim missing: {min(missing)}")
    if extra := set(claims) - keys:
        raise CommandFormatError(f"claim not allowed: {min(extra)[:32]!r}")


def _check_claim_names(claims: dict[str, Any]) -> None:
    _exact_claims(claims, CLAIM_KEYS)
    if claims["cmd"] != "unlock":
        raise CommandFormatError("cmd is not 'unlock'")


def verify_signature(
    command: UnverifiedCommand | UnverifiedBearer | UnverifiedRequest, key: PublicKey
) -> bool:
    """Whether the command's signature is valid for ``key`` under its (allowed) algorithm."""
    try:
        jws.deserialize_compact(command.token, key, algorithms=[command.alg])
    except (JoseError, ValueError, TypeError):
        return False
    return True


def load_private_key(pem: bytes) -> OKPKey | ECKey:
    """An Ed25519 or P-256 private key from PEM (PKCS#8 or SEC1)."""
    for cls in (OKPKey, ECKey):
        try:
            key = cls.import_key(pem)
        except (JoseError, ValueError, TypeError):
            continue
        if not key.is_private:
            raise CommandFormatError("the key file holds a public key; signing needs the private")
        key_kind(key)
        return key
    raise CommandFormatError("not an Ed25519 or ECDSA P-256 private key (PEM)")


def sign(
    key: OKPKey | ECKey,
    *,
    kid: str,
    station: str,
    door: str,
    totp: str,
    lifetime: float = 30,
    alg: str | None = None,
    now: float | None = None,
    jti: str | None = None,
) -> str:
    """A signed unlock command for ``station``'s ``door``."""
    if not 0 < lifetime <= MAX_LIFETIME_S:
        raise CommandFormatError(f"lifetime must be 1-{MAX_LIFETIME_S} s")
    kind = key_kind(key)
    alg = alg or ("Ed25519" if kind == "Ed25519" else "ES256")
    if alg not in ALGORITHMS[kind]:
        raise CommandFormatError(f"algorithm {alg} does not fit the {kind} key")
    issued = int(time.time() if now is None else now)
    claims = {
        "aud": station,
        "cmd": "unlock",
        "door": door,
        "iat": issued,
        "exp": issued + int(lifetime),
        "jti": jti or secrets.token_urlsafe(16),
        "totp": totp,
    }
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return jws.serialize_compact({"alg": alg, "kid": kid}, payload, key, algorithms=[alg])


def sign_bearer(
    key: OKPKey | ECKey,
    *,
    kid: str,
    station: str,
    scope: str = "metrics",
    lifetime: float = 365 * 86_400,
    now: float | None = None,
) -> str:
    """A signed read-only bearer for ``station`` (``scope``: what it may read)."""
    if scope not in BEARER_SCOPES:
        raise CommandFormatError(f"scope must be one of {', '.join(sorted(BEARER_SCOPES))}")
    longest = BEARER_LIFETIMES_S[scope]
    if not 0 < lifetime <= longest:
        raise CommandFormatError(f"lifetime must be 1 s to {longest // 86_400} days")
    kind = key_kind(key)
    alg = "Ed25519" if kind == "Ed25519" else "ES256"
    issued = int(time.time() if now is None else now)
    claims = {
        "aud": station,
        "cmd": scope,
        "iat": issued,
        "exp": issued + int(lifetime),
        "jti": secrets.token_urlsafe(16),
    }
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return jws.serialize_compact({"alg": alg, "kid": kid}, payload, key, algorithms=[alg])
