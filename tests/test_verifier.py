"""The unlock verifier against valid and adversarial commands, with a real relay pin."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from intercom.events import EventBus
from intercom.hardware.lock import Lock
from intercom.security.limits import Limits
from intercom.security.principals import Role
from intercom.security.registry import Registry
from intercom.security.secretbox import load_key
from intercom.security.store import PrincipalStore
from intercom.security.verifier import Verifier
from tests.conftest import Recorder
from tests.test_security_kit import (
    DOOR,
    STATION,
    Clock,
    Signer,
    add_principal,
    b64,
    claims,
    new_verifier,
    open_registry,
    raw_token,
    relay_lock,
    relay_was_energised,
    sign_raw,
)

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

OPEN = Limits(shared_rate=1e6, shared_burst=1e6)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def registry(tmp_path: Path, bus: EventBus, clock: Clock) -> AsyncIterator[Registry]:
    """The registry of ``tmp_path``, as a station owns it (closing twice is harmless)."""
    reg = await open_registry(tmp_path, bus, clock)
    yield reg
    await reg.close()


@pytest.fixture
async def lock(pin_factory: Any, bus: EventBus) -> AsyncIterator[Lock]:
    lk = relay_lock(pin_factory, bus, asyncio.get_running_loop())
    yield lk
    lk.close()


@pytest.fixture
async def verifier(
    registry: Registry, bus: EventBus, lock: Lock, clock: Clock
) -> AsyncIterator[Verifier]:
    v = new_verifier(registry, bus, lock, clock, OPEN)
    await v.start()
    yield v
    await v.stop()


@pytest.fixture
async def alice(registry: Registry, clock: Clock) -> Signer:
    return await add_principal(registry, clock, "alice")


@pytest.fixture
async def mallory(registry: Registry, clock: Clock) -> Signer:
    return await add_principal(registry, clock, "mallory", flats=("2",))


async def test_valid_command_is_granted_and_pulses_the_relay(
    verifier: Verifier, alice: Signer, pin_factory: Any, recorder: Recorder
) -> None:
    decision = await verifier.submit(alice.token(), "mqtt")
    assert decision.granted, decision.reason
    assert decision.principal == "alice"
    assert relay_was_energised(pin_factory)
    granted = recorder.of("UnlockGranted")
    assert len(granted) == 1
    assert granted[0].details() == {
        "door": DOOR, "principal": "alice", "via": "mqtt", "jti": decision.jti,
    }


@pytest.mark.parametrize(("kind", "alg"), [("Ed25519", "Ed25519"), ("Ed25519", "EdDSA"),
                                           ("P-256", "ES256")])
async def test_each_allowed_algorithm_is_granted(
    verifier: Verifier, registry: Registry, clock: Clock, kind: str, alg: str
) -> None:
    signer = await add_principal(registry, clock, "p1", Role.ADMIN, kind=kind)
    decision = await verifier.submit(signer.token(alg=alg), "cli")
    assert decision.granted, decision.reason


@pytest.mark.parametrize(
    ("role", "scope", "granted"),
    [
        (Role.RESIDENT, {"flats": ("2", "7")}, True),
        (Role.RESIDENT, {"flats": ("9",)}, False),
        (Role.MANAGER, {"doors": (DOOR, "back")}, True),
        (Role.MANAGER, {"doors": ("back",)}, False),
        (Role.INSTALLER, {}, True),
        (Role.ADMIN, {}, True),
    ],
)
async def test_roles_open_what_they_may(
    verifier: Verifier, registry: Registry, clock: Clock, role: Role, scope: Any, granted: bool
) -> None:
    signer = await add_principal(registry, clock, "p1", role, **scope)
    decision = await verifier.submit(signer.token(), "call")
    assert decision.granted is granted, decision.reason


def _hs256_with_public_key(a: Signer, m: Signer) -> str:
    pem = a.key.get_op_key("verify").public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    h = b64(json.dumps({"alg": "HS256", "kid": a.pid}).encode())
    p = b64(json.dumps(claims(a)).encode())
    mac = hmac.new(pem, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(mac)}"


def _noncanonical(a: Signer, m: Signer) -> str:
    token = a.token()
    last = token[-1]
    # The last character of an 86-character Ed25519 signature carries 4 unused bits.
    alphabet = "AEIMQUYcgkosw048"
    other = alphabet[(alphabet.index(last) + 1) % 16] if last in alphabet else "A"
    return token[:-1] + chr(ord(other) + 1)


def _dup_claim(a: Signer, m: Signer) -> str:
    c = claims(a)
    body = json.dumps(c)[:-1] + ', "door": "back"}'
    return sign_raw(a, {"alg": "Ed25519", "kid": a.pid}, body.encode())


def _dup_header(a: Signer, m: Signer) -> str:
    header = b'{"alg": "Ed25519", "kid": "alice", "alg": "none"}'
    return sign_raw(a, header, json.dumps(claims(a)).encode())


def _signed(**kw: Any) -> Callable[[Signer, Signer], str]:
    def make(a: Signer, m: Signer) -> str:
        return sign_raw(a, {"alg": "Ed25519", "kid": a.pid}, claims(a, **kw))
    return make


def _header(**kw: Any) -> Callable[[Signer, Signer], str]:
    def make(a: Signer, m: Signer) -> str:
        return sign_raw(a, {"alg": "Ed25519", "kid": a.pid, **kw}, claims(a))
    return make


ADVERSARIAL: dict[str, tuple[Callable[[Signer, Signer], str], str]] = {
    "alg none": (
        lambda a, _m: raw_token({"alg": "none", "kid": a.pid}, claims(a), b""),
        "algorithm not allowed",
    ),
    "alg none with a signature": (
        lambda a, _m: raw_token({"alg": "none", "kid": a.pid}, claims(a), b"x" * 64),
        "algorithm not allowed",
    ),
    "HS256 with the public key as secret": (_hs256_with_public_key, "algorithm not allowed"),
    "unknown kid": (lambda a, _m: a.token(kid="nobody"), "unknown principal"),
    "wrong key": (lambda a, m: m.token(kid=a.pid), "bad signature"),
    "signature of another command": (
        lambda a, _m: a.token().rsplit(".", 1)[0] + "." + a.token(jti="x" * 9).rsplit(".", 1)[1],
        "bad signature",
    ),
    "ES256 on an Ed25519 key": (
        lambda a, _m: raw_token({"alg": "ES256", "kid": a.pid}, claims(a), b"x" * 64),
        "algorithm does not match",
    ),
    "expired command": (_signed(iat=0, exp=30), "expired"),
    "expired long ago, just within lifetime": (
        lambda a, _m: a.token(now=a.clock() - 95, lifetime=60),
        "expired",
    ),
    "command from the future": (lambda a, _m: a.token(now=a.clock() + 120), "issued in the future"),
    "too long-lived command": (
        lambda a, _m: sign_raw(
            a, {"alg": "Ed25519", "kid": a.pid},
            claims(a, exp=int(a.clock()) + 61),
        ),
        "lifetime",
    ),
    "exp before iat": (
        lambda a, _m: sign_raw(
            a, {"alg": "Ed25519", "kid": a.pid},
            claims(a, exp=int(a.clock()) - 1),
        ),
        "lifetime",
    ),
    "wrong audience": (lambda a, _m: a.token(station="st-2"), "wrong audience"),
    "wrong door": (lambda a, _m: a.token(door="back"), "door not at this station"),
    "wrong TOTP": (
        lambda a, _m: a.token(totp=f"{(int(a.code()) + 1) % 10**6:06d}"), "wrong TOTP code"
    ),
    "old TOTP": (lambda a, _m: a.token(totp=a.code(a.clock() - 90)), "wrong TOTP code"),
    "other principal's TOTP": (lambda a, m: a.token(totp=m.code()), "wrong TOTP code"),
    "oversized": (lambda a, _m: a.token(jti="j" * 128) + "A" * 4096, "oversized"),
    "malformed base64": (lambda _a, _m: "e30!.e30.AAAA", "malformed base64url"),
    "base64 with padding": (lambda a, _m: a.token().replace(".", "=.", 1), "malformed base64url"),
    "non-canonical base64": (_noncanonical, "base64url"),
    "two segments": (lambda a, _m: a.token().rsplit(".", 1)[0], "three segments"),
    "JWS JSON serialization": (
        lambda _a, _m: json.dumps({"payload": "e30", "signatures": []}), "three segments"
    ),
    "payload not JSON": (
        lambda a, _m: sign_raw(a, {"alg": "Ed25519", "kid": a.pid}, b"unlock please"),
        "payload is not JSON",
    ),
    "payload a list": (
        lambda a, _m: sign_raw(a, {"alg": "Ed25519", "kid": a.pid}, b"[1]"),
        "not a JSON object",
    ),
    "NaN claim": (
        lambda a, _m: sign_raw(
            a, {"alg": "Ed25519", "kid": a.pid},
            json.dumps(claims(a)).replace('"iat": ', '"iat": NaN, "x": ').encode(),
        ),
        "NaN",
    ),
    "deep nesting": (
        lambda a, _m: sign_raw(a, {"alg": "Ed25519", "kid": a.pid}, b"[" * 2900 + b"]" * 2900),
        "oversized",
    ),
    "iat as string": (_signed(iat="123"), "iat must be a number"),
    "iat as boolean": (_signed(iat=True), "iat must be a number"),
    "totp as number": (_signed(totp=123456), "totp must be a string"),
    "aud as list": (_signed(aud=[STATION]), "aud must be a string"),
    "door as number": (_signed(door=1), "door must be a string"),
    "jti too short": (_signed(jti="x"), "malformed jti"),
    "cmd not unlock": (_signed(cmd="lock"), "cmd is not"),
    "claim missing": (lambda a, _m: sign_raw(a, {"alg": "Ed25519", "kid": a.pid},
                                            {k: v for k, v in claims(a).items() if k != "jti"}),
                      "claim missing: jti"),
    "extra claim": (_signed(admin=True), "claim not allowed"),
    "duplicate claim": (_dup_claim, "duplicate JSON member 'door'"),
    "duplicate header member": (_dup_header, "duplicate JSON member 'alg'"),
    "embedded jwk header": (_header(jwk={"kty": "OKP"}), "header parameter not allowed"),
    "crit header": (_header(crit=["b64"]), "header parameter not allowed"),
    "kid as number": (_header(kid=5), "kid must be a string"),
    "not UTF-8": (lambda _a, _m: "\udcff.e30.e30", "malformed base64url"),
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
async def test_adversarial_command_is_denied(
    verifier: Verifier, alice: Signer, mallory: Signer, pin_factory: Any, recorder: Recorder,
    case: str,
) -> None:
    make, reason = ADVERSARIAL[case]
    decision = await verifier.submit(make(alice, mallory), "mqtt")
    assert not decision.granted
    assert reason in decision.reason
    assert not relay_was_energised(pin_factory)
    denied = recorder.of("UnlockDenied")
    assert len(denied) == 1
    assert denied[0].details()["reason"] == decision.reason
    assert recorder.of("UnlockGranted") == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"revoked_at": 1.0}, "principal revoked"),
        ({"valid_until_offset": -10}, "principal expired"),
        ({"valid_from_offset": 100}, "principal not yet valid"),
    ],
)
async def test_inactive_principals_are_denied(
    verifier: Verifier, registry: Registry, clock: Clock, changes: dict[str, float],
    reason: str,
) -> None:
    kw: dict[str, Any] = {}
    if "revoked_at" in changes:
        kw["revoked_at"] = changes["revoked_at"]
    if "valid_until_offset" in changes:
        kw.update(valid_from=clock() - 1000, valid_until=clock() + changes["valid_until_offset"])
    if "valid_from_offset" in changes:
        kw["valid_from"] = clock() + changes["valid_from_offset"]
    signer = await add_principal(registry, clock, "p1", Role.ADMIN, **kw)
    decision = await verifier.submit(signer.token(), "mqtt")
    assert not decision.granted
    assert decision.reason == reason


async def test_installer_is_time_boxed(
    verifier: Verifier, registry: Registry, clock: Clock
) -> None:
    signer = await add_principal(registry, clock, "inst", Role.INSTALLER, valid_until=clock() + 60)
    assert (await verifier.submit(signer.token(), "cli")).granted
    clock.now += 61
    decision = await verifier.submit(signer.token(), "cli")
    assert decision.reason == "principal expired"


async def test_revocation_takes_effect_at_once(
    verifier: Verifier, alice: Signer, registry: Registry, recorder: Recorder
) -> None:
    assert (await verifier.submit(alice.token(), "mqtt")).granted
    # What `intercom principals revoke alice` has the station's registry do.
    assert await registry.revoke("alice", actor="local:test")
    # At once: no clock moves, no polling; the next command is denied.
    decision = await verifier.submit(alice.token(), "mqtt")
    assert decision.reason == "principal revoked"
    assert [e.details()["principal"] for e in recorder.of("PrincipalRevoked")] == ["alice"]


async def test_replay_is_denied(verifier: Verifier, alice: Signer) -> None:
    token = alice.token()
    assert (await verifier.submit(token, "mqtt")).granted
    decision = await verifier.submit(token, "call")
    assert decision.reason == "replayed command id"


async def test_replay_and_totp_reuse_are_denied_after_a_restart(
    tmp_path: Path, bus: EventBus, lock: Lock, clock: Clock, registry: Registry, alice: Signer
) -> None:
    token = alice.token()
    first = new_verifier(registry, bus, lock, clock, OPEN)
    await first.start()
    assert (await first.submit(token, "mqtt")).granted
    await first.stop()
    await registry.close()  # the station stops; what it spent is read back from disk
    reopened = await open_registry(tmp_path, bus, clock)
    second = new_verifier(reopened, bus, lock, clock, OPEN)
    await second.start()
    try:
        assert (await second.submit(token, "mqtt")).reason == "replayed command id"
        fresh = alice.token()  # new jti, same TOTP step
        assert (await second.submit(fresh, "mqtt")).reason == "TOTP step already used"
        clock.now += 30
        assert (await second.submit(alice.token(), "mqtt")).granted
    finally:
        await second.stop()
        await reopened.close()


async def test_totp_step_is_used_once(verifier: Verifier, alice: Signer, clock: Clock) -> None:
    assert (await verifier.submit(alice.token(), "mqtt")).granted
    decision = await verifier.submit(alice.token(), "mqtt")
    assert decision.reason == "TOTP step already used"
    # An older step within the window is not accepted either once a newer one was used.
    old = alice.token(totp=alice.code(clock() - 30))
    assert (await verifier.submit(old, "mqtt")).reason == "TOTP step already used"


async def test_totp_failures_back_off_then_lock_out_until_reset(
    verifier: Verifier, alice: Signer, clock: Clock, registry: Registry, recorder: Recorder
) -> None:
    limits = verifier.limits
    wrong = f"{(int(alice.code()) + 1) % 10**6:06d}"
    for i in range(limits.lockout_after):
        decision = await verifier.submit(alice.token(totp=wrong), "mqtt")
        assert decision.reason == "wrong TOTP code", i
        if i + 1 == limits.backoff_after:
            blocked = await verifier.submit(alice.token(), "mqtt")
            assert blocked.reason == "principal in backoff after TOTP failures"
        clock.now += limits.backoff_max_s + 1
        wrong = f"{(int(alice.code()) + 1) % 10**6:06d}"
    decision = await verifier.submit(alice.token(), "mqtt")
    assert decision.reason == "principal locked out after repeated TOTP failures"
    assert len(recorder.of("PrincipalLockedOut")) == 1
    clock.now += 86400
    assert not (await verifier.submit(alice.token(), "mqtt")).granted
    await registry.reset("alice", actor="local:test")  # `intercom principals reset alice`
    assert (await verifier.submit(alice.token(), "mqtt")).granted


async def test_lockout_survives_a_restart(
    tmp_path: Path, bus: EventBus, lock: Lock, clock: Clock, registry: Registry, alice: Signer
) -> None:
    limits = Limits(shared_rate=1e6, shared_burst=1e6, backoff_after=100, lockout_after=3)
    v = new_verifier(registry, bus, lock, clock, limits)
    await v.start()
    for _ in range(3):
        await v.submit(alice.token(totp="000000" if alice.code() != "000000" else "111111"), "x")
    await v.stop()
    await registry.close()  # the station stops; the guard is read back from disk
    reopened = await open_registry(tmp_path, bus, clock)
    v = new_verifier(reopened, bus, lock, clock, limits)
    await v.start()
    try:
        decision = await v.submit(alice.token(), "mqtt")
        assert decision.reason == "principal locked out after repeated TOTP failures"
    finally:
        await v.stop()
        await reopened.close()


async def test_forged_flood_on_one_principal_does_not_block_another(
    registry: Registry, bus: EventBus, lock: Lock, clock: Clock, alice: Signer, mallory: Signer
) -> None:
    limits = Limits(shared_rate=0.001, shared_burst=5, reserve_rate=0.001, reserve_burst=3)
    v = new_verifier(registry, bus, lock, clock, limits)
    await v.start()
    try:
        reasons = [
            (await v.submit(mallory.token(kid="alice"), "mqtt")).reason for _ in range(50)
        ]
        assert reasons.count("bad signature") == 8  # alice's reserve, then the shared pool
        assert reasons.count("signature budget exhausted") == 42
        assert (await v.submit(mallory.token(), "mqtt")).granted  # mallory's own reserve
    finally:
        await v.stop()


async def test_denial_events_are_capped_and_counted(
    registry: Registry, bus: EventBus, lock: Lock, clock: Clock, recorder: Recorder
) -> None:
    v = new_verifier(registry, bus, lock, clock, Limits(denied_events_per_s=5))
    await v.start()
    for _ in range(50):
        assert not (await v.submit("junk", "mqtt")).granted
    await v.stop()
    assert len(recorder.of("UnlockDenied")) == 5
    suppressed = recorder.of("UnlockDenialsSuppressed")
    assert sum(e.details()["count"] for e in suppressed) == 45
    assert v.denied == 50


async def test_added_principal_is_seen_without_a_restart(
    verifier: Verifier, registry: Registry, clock: Clock, recorder: Recorder
) -> None:
    signer = await add_principal(registry, clock, "late", Role.MANAGER)
    assert (await verifier.submit(signer.token(), "mqtt")).granted
    assert [e.details() for e in recorder.of("PrincipalAdded")] == [
        {"principal": "late", "role": "manager"}
    ]


async def test_control_request_answers_only_granted_or_denied(
    verifier: Verifier, alice: Signer
) -> None:
    assert await verifier.control_request({"request": "unlock", "token": alice.token()}) == {
        "ok": True, "result": "granted",
    }
    for bad in (alice.token(kid="nobody"), 5, None, "x" * 10_000, ["a"], {"token": "x"}):
        answer = await verifier.control_request({"request": "unlock", "token": bad})
        assert answer == {"ok": True, "result": "denied"}


async def test_totp_secrets_are_encrypted_at_rest(
    registry: Registry, alice: Signer, tmp_path: Path
) -> None:
    raw = (tmp_path / "principals.db").read_bytes()
    wal = tmp_path / "principals.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert alice.secret.encode() not in raw
    await registry.close()  # its owner gone, the database is read here
    store = PrincipalStore(tmp_path, load_key(tmp_path))
    try:
        assert store.totp_secret("alice") == alice.secret  # sealed, and opens with the key
    finally:
        store.close()
    assert alice.secret.encode() not in (tmp_path / "principals.db").read_bytes()
    key = tmp_path / "keys" / "principals.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "principals.db").stat().st_mode & 0o777 == 0o600


async def test_submit_of_a_non_text_object_is_denied_quietly(verifier: Verifier) -> None:
    for bad in (None, 5, 1.5, ["a.b.c"], object()):
        decision = await verifier.submit(bad, "mqtt")
        assert (decision.granted, decision.reason) == (False, "command is not text")
