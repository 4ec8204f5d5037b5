"""TOTP (RFC 6238) through pyotp: secrets, enrolment URIs and step matching.

The verifier needs more than "is this code valid": it needs *which* time step matched,
so that each step is accepted once per principal (RFC 6238 section 5.2).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyotp

SECRET_BYTES = 20  # 160 bits, the RFC 4226 recommendation
DIGESTS: dict[str, Callable[..., Any]] = {
    "SHA1": hashlib.sha1,
    "SHA256": hashlib.sha256,
    "SHA512": hashlib.sha512,
}


@dataclass(frozen=True)
class TotpParams:
    """How codes are made: digits, step length and hash."""

    digits: int = 6
    period: int = 30
    algorithm: str = "SHA1"

    def totp(self, secret_b32: str) -> pyotp.TOTP:
        """A pyotp generator for ``secret_b32`` with these parameters."""
        return pyotp.TOTP(
            secret_b32, digits=self.digits, interval=self.period, digest=DIGESTS[self.algorithm]
        )


DEFAULT = TotpParams()


def new_secret() -> str:
    """A fresh random secret of 160 bits, base32 (32 characters, no padding)."""
    return pyotp.random_base32(length=32)


def secret_bits(secret_b32: str) -> int:
    """How many bits a base32 secret holds."""
    return len(pyotp.TOTP(secret_b32).byte_secret()) * 8


def enrolment_uri(secret_b32: str, account: str, issuer: str, params: TotpParams = DEFAULT) -> str:
    """The ``otpauth://totp/...`` URI authenticator apps enrol from."""
    return params.totp(secret_b32).provisioning_uri(name=account, issuer_name=issuer)


def code_at(secret_b32: str, unix_time: float, params: TotpParams = DEFAULT) -> str:
    """The code of the step that contains ``unix_time``."""
    return str(params.totp(secret_b32).at(int(unix_time)))


def step_of(unix_time: float, params: TotpParams = DEFAULT) -> int:
    """The RFC 6238 time step counter T of ``unix_time``."""
    return int(unix_time) // params.period


def match_step(
    secret_b32: str,
    code: str,
    unix_time: float,
    window: int = 1,
    params: TotpParams = DEFAULT,
) -> int | None:
    """The step within +-``window`` of ``unix_time`` whose code is ``code``, else None.

    Every candidate is compared in constant time, and all of them are computed, so the
    time taken does not say which step (if any) matched.
    """
    if len(code) != params.digits or not code.isascii() or not code.isdigit():
        return None
    generator = params.totp(secret_b32)
    now = step_of(unix_time, params)
    found: int | None = None
    for step in range(now - window, now + window + 1):
        candidate = generator.generate_otp(step)
        if hmac.compare_digest(candidate.encode(), code.encode()) and found is None:
            found = step
    return found
