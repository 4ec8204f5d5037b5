"""Hypothesis fuzzing of the verifier's parser and checks: >= 10,000 cases, 0 grants, 0 crashes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from intercom.events import EventBus
from intercom.hardware.lock import Lock
from intercom.security.limits import Limits
from intercom.security.verifier import Verifier
from tests.test_security_kit import (
    DOOR,
    STATION,
    Clock,
    Signer,
    add_principal,
    b64,
    open_registry,
    relay_lock,
    relay_was_energised,
    sign_raw,
)

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

PER_TEST = 2_200  # five fuzz tests: 11,000 cases
FUZZ = settings(
    max_examples=PER_TEST,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
# No budget and no backoff: every case goes as deep as it can.
FUZZ_LIMITS = Limits(
    shared_rate=1e9, shared_burst=1e9, backoff_after=10**9, lockout_after=10**9,
    denied_events_per_s=1,
)
B64CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass
class Rig:
    loop: asyncio.AbstractEventLoop
    verifier: Verifier
    factory: MockFactory
    alice: Signer
    mallory: Signer
    base: str
    cases: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def submit(self, token: str | bytes) -> None:
        decision = self.loop.run_until_complete(self.verifier.submit(token, "mqtt"))
        self.cases += 1
        self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        assert not decision.granted, token
        assert decision.reason != "internal error", token


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    state: Path = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    factory = MockFactory()
    bus = EventBus()
    lock: Lock = relay_lock(factory, bus, loop)
    clock = Clock()
    registry = loop.run_until_complete(open_registry(state, bus, clock))
    alice = loop.run_until_complete(add_principal(registry, clock, "alice"))
    mallory = loop.run_until_complete(
        add_principal(registry, clock, "mallory", kind="P-256", flats=("2",))
    )
    verifier = Verifier(
        registry, _site(), bus, lock, limits=FUZZ_LIMITS, clock=clock,
    )
    loop.run_until_complete(verifier.start())
    # A valid command that is never submitted as is: the base of the mutations.
    base = alice.token(jti="fuzz-base-command")
    yield Rig(loop, verifier, factory, alice, mallory, base)
    loop.run_until_complete(verifier.stop())
    loop.run_until_complete(registry.close())
    lock.close()
    factory.close()
    loop.close()


def _site() -> Any:
    from tests.test_security_kit import SITE  # noqa: PLC0415

    return SITE


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def claim_values(rig: Rig) -> st.SearchStrategy[dict[str, Any]]:
    now = int(rig.alice.clock())
    valid_codes = {rig.alice.code(now + d) for d in (-30, 0, 30)}
    return st.fixed_dictionaries(
        {},
        optional={
            "aud": st.sampled_from([STATION, "st-2", ""]) | json_values,
            "cmd": st.sampled_from(["unlock", "lock"]) | json_values,
            "door": st.sampled_from([DOOR, "back"]) | json_values,
            "iat": st.sampled_from([now, now - 100, now + 100]) | json_values,
            "exp": st.sampled_from([now + 30, now + 61, now - 1]) | json_values,
            "jti": st.text(min_size=0, max_size=40) | json_values,
            "totp": st.text(alphabet="0123456789", min_size=0, max_size=8).filter(
                lambda c: c not in valid_codes
            ) | json_values,
            "x": json_values,
        },
    )


headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["Ed25519", "EdDSA", "ES256", "none", "HS256", "RS256"])
        | json_values,
        "kid": st.sampled_from(["alice", "mallory", "nobody"]) | json_values,
        "typ": json_values,
    },
)


@FUZZ
@given(data=st.binary(max_size=6000))
def test_fuzz_random_bytes(rig: Rig, data: bytes) -> None:
    rig.submit(data)


@FUZZ
@given(text=st.text(max_size=300) | st.lists(st.text(alphabet=B64CHARS + "=.!", max_size=120),
                                               min_size=1, max_size=5).map(".".join))
def test_fuzz_random_text_and_segments(rig: Rig, text: str) -> None:
    rig.submit(text)


@FUZZ
@given(data=st.data())
def test_fuzz_structured_commands_signed_by_the_principal(rig: Rig, data: st.DataObject) -> None:
    header = data.draw(headers)
    payload = data.draw(claim_values(rig))
    signer = data.draw(st.sampled_from([rig.alice, rig.mallory]))
    raw_header = json.dumps(header).encode()
    raw_payload = json.dumps(payload).encode()
    if data.draw(st.booleans()):
        token = sign_raw(signer, raw_header, raw_payload)
    else:
        sig = data.draw(st.binary(max_size=80))
        token = f"{b64(raw_header)}.{b64(raw_payload)}.{b64(sig)}"
    rig.submit(token)


@FUZZ
@given(data=st.data())
def test_fuzz_mutations_of_a_valid_command(rig: Rig, data: st.DataObject) -> None:
    token = rig.base
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
        op = data.draw(st.sampled_from(["replace", "delete", "insert", "swap"]))
        ch = data.draw(st.sampled_from(B64CHARS + '.=+/{}"\\\x00\xff'))
        if op == "replace":
            token = token[:i] + ch + token[i + 1:]
        elif op == "delete":
            token = token[:i] + token[i + 1:]
        elif op == "insert":
            token = token[:i] + ch + token[i:]
        else:
            j = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
            chars = list(token)
            chars[i], chars[j] = chars[j], chars[i]
            token = "".join(chars)
    if token == rig.base:
        token += "A"
    rig.submit(token)


@FUZZ
@given(data=st.data())
def test_fuzz_segments_of_valid_commands_recombined(rig: Rig, data: st.DataObject) -> None:
    n = data.draw(st.integers(min_value=0, max_value=10**6))
    pool = [
        rig.base,
        rig.alice.token(jti=f"fuzz-door-{n}", door="back"),
        rig.mallory.token(jti=f"fuzz-mallory-{n}", kid="alice"),
        rig.alice.token(jti=f"fuzz-aud-{n}", station="st-2"),
        rig.alice.token(jti=f"fuzz-totp-{n}", totp="000000"),
    ]
    parts = [data.draw(st.sampled_from(pool)).split(".")[k] for k in range(3)]
    token = ".".join(parts)
    if token == rig.base:
        token = parts[0] + "." + parts[1] + "." + parts[2][::-1]
    rig.submit(token)


def test_fuzz_totals(rig: Rig) -> None:
    print(f"fuzz: {rig.cases} cases, reasons: {rig.reasons}")  # noqa: T201
    assert rig.cases >= 10_000, rig.cases
    assert not relay_was_energised(rig.factory)
    assert rig.verifier.granted == 0
    assert "internal error" not in rig.reasons
    # The structured cases reach the deep checks, not only the parser.
    assert rig.reasons.get("bad signature", 0) > 0
    assert rig.reasons.get("wrong TOTP code", 0) > 0
    # The valid base command still works: the fuzzing did not break the verifier.
    decision = rig.loop.run_until_complete(rig.verifier.submit(rig.base, "mqtt"))
    assert decision.granted, decision.reason
