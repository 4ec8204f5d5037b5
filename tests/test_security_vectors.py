"""Published test vectors: RFC 6238 Appendix B (TOTP) and RFC 8037 Appendix A (Ed25519 JWS)."""

from __future__ import annotations

import base64

import pytest
from joserfc.jwk import OKPKey

from intercom.security import command, totp
from intercom.security.principals import PrincipalError, import_public_jwk, public_jwk_from_file

# We accept RFC 8037's "EdDSA" on purpose; joserfc warns about it (RFC 9864).
pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated")

SEEDS = {
    "SHA1": b"12345678901234567890",
    "SHA256": b"12345678901234567890123456789012",
    "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234",
}

# RFC 6238 Appendix B: (time, algorithm, 8-digit code), all 18 rows.
RFC6238 = [
    (59, "SHA1", "94287082"), (59, "SHA256", "46119246"), (59, "SHA512", "90693936"),
    (1111111109, "SHA1", "07081804"), (1111111109, "SHA256", "68084774"),
    (1111111109, "SHA512", "25091201"),
    (1111111111, "SHA1", "14050471"), (1111111111, "SHA256", "67062674"),
    (1111111111, "SHA512", "99943326"),
    (1234567890, "SHA1", "89005924"), (1234567890, "SHA256", "91819424"),
    (1234567890, "SHA512", "93441116"),
    (2000000000, "SHA1", "69279037"), (2000000000, "SHA256", "90698825"),
    (2000000000, "SHA512", "38618901"),
    (20000000000, "SHA1", "65353130"), (20000000000, "SHA256", "77737706"),
    (20000000000, "SHA512", "47863826"),
]


@pytest.mark.parametrize(("at", "alg", "code"), RFC6238)
def test_rfc6238_appendix_b(at: int, alg: str, code: str) -> None:
    params = totp.TotpParams(digits=8, period=30, algorithm=alg)
    secret = base64.b32encode(SEEDS[alg]).decode()
    assert totp.code_at(secret, at, params) == code
    step = at // 30
    assert totp.match_step(secret, code, at, window=1, params=params) == step
    assert totp.match_step(secret, code, at + 30, window=1, params=params) == step
    assert totp.match_step(secret, code, at + 60, window=1, params=params) is None
    assert totp.match_step(secret, code, at, window=0, params=params) == step


def test_rfc6238_table_is_complete() -> None:
    assert len(RFC6238) == 18


def test_new_secrets_have_160_bits_and_differ() -> None:
    secrets = {totp.new_secret() for _ in range(50)}
    assert len(secrets) == 50
    assert all(totp.secret_bits(s) >= 160 for s in secrets)


def test_match_step_refuses_malformed_codes() -> None:
    secret = totp.new_secret()
    fullwidth = "\uff11\uff12\uff13\uff14\uff15\uff16"
    for bad in ("", "12345", "1234567", "12345a", fullwidth, " 123456"):
        assert totp.match_step(secret, bad, 1_700_000_000) is None


# RFC 8037 Appendix A.
A1_PRIVATE = {
    "kty": "OKP", "crv": "Ed25519",
    "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
    "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
}
A2_PUBLIC = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
A3_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
A4_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)


def test_rfc8037_a1_a2_public_key_of_the_private_key() -> None:
    private = OKPKey.import_key(A1_PRIVATE)
    public = {k: v for k, v in private.as_dict(private=False).items() if k != "kid"}
    assert public == A2_PUBLIC
    assert import_public_jwk(A2_PUBLIC).as_dict(private=False)["x"] == A2_PUBLIC["x"]


def test_rfc8037_a3_thumbprint() -> None:
    assert import_public_jwk(A2_PUBLIC).thumbprint() == A3_THUMBPRINT


def test_rfc8037_a4_signing_is_reproduced() -> None:
    from joserfc import jws  # noqa: PLC0415

    private = OKPKey.import_key(A1_PRIVATE)
    token = jws.serialize_compact(
        {"alg": "EdDSA"}, b"Example of Ed25519 signing", private, algorithms=["EdDSA"]
    )
    assert token == A4_JWS


def test_rfc8037_a5_verification_through_our_path() -> None:
    key = import_public_jwk(A2_PUBLIC)
    _header, payload, _sig = A4_JWS.split(".")
    assert command.b64url_decode(payload.encode()) == b"Example of Ed25519 signing"
    parsed = command.UnverifiedCommand(
        token=A4_JWS.encode(), alg="EdDSA", kid="", aud="", door="", iat=0, exp=0, jti="",
        totp="",
    )
    assert command.verify_signature(parsed, key)
    tampered = A4_JWS[:-2] + ("AA" if not A4_JWS.endswith("AA") else "AQ")
    bad = command.UnverifiedCommand(
        token=tampered.encode(), alg="EdDSA", kid="", aud="", door="", iat=0, exp=0, jti="",
        totp="",
    )
    assert not command.verify_signature(bad, key)
    # Under any other algorithm the same key and signature are refused.
    for alg in ("ES256", "HS256", "none"):
        other = command.UnverifiedCommand(
            token=A4_JWS.encode(), alg=alg, kid="", aud="", door="", iat=0, exp=0, jti="",
            totp="",
        )
        assert not command.verify_signature(other, key)


def test_pem_public_key_becomes_the_same_jwk() -> None:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    pem = OKPKey.import_key(A1_PRIVATE).get_op_key("verify").public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_jwk_from_file(pem) == A2_PUBLIC


def test_a_public_key_of_an_unknown_type_is_refused_as_not_a_key():
    """Found by the slow first-boot fuzz: an Ed25519 key whose algorithm OID was mangled
    (cryptography raises UnsupportedAlgorithm, not ValueError) failed first boot."""
    pem = (b"-----BEGIN PUBLIC KEY-----\n"
           b"MCowBQYD02VwAyEA8cGxzGIeKRQWjRwm3P05Hu0udSySXM05oK4vG/1mdNk=\n"
           b"-----END PUBLIC KEY-----\n")
    with pytest.raises(PrincipalError, match="not an Ed25519 or ECDSA P-256 public key"):
        public_jwk_from_file(pem)
