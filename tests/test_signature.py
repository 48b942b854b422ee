"""The secret scheme (X-Dt-Signature, HS256) against DT's real tokens and forgeries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest

from app.errors import SignatureError
from app.signature import SecretScheme, TokenAge, Verifier
from app.signing import sign_secret
from tests.conftest import signed_requests

REAL = signed_requests()
HOUR = 3600


def frozen(at: float) -> TokenAge:
    return TokenAge(max_age=13 * HOUR, leeway=60, clock=lambda: at)


def scheme_at(at: float, *secrets: str) -> SecretScheme:
    return SecretScheme(list(secrets or ["test-secret"]), frozen(at))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: bytes, digest: Any) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(sig)}"


def reason(scheme: SecretScheme, body: bytes, headers: dict[str, str]) -> str:
    with pytest.raises(SignatureError) as caught:
        scheme.verify(body, headers)
    return caught.value.code


@pytest.mark.parametrize("request_", REAL, ids=["touch-2022", "temperature-2024"])
def test_real_dt_requests_verify(request_: dict[str, Any]) -> None:
    """Both real DT-signed requests pass with the clock set inside their lifetime."""
    scheme = scheme_at(request_["jwt_claims"]["iat"] + 10)
    result = scheme.verify(request_["body"].encode(), request_["headers"])
    assert result.scheme == "secret"
    assert result.key == "secret #1"


@pytest.mark.parametrize("request_", REAL, ids=["touch-2022", "temperature-2024"])
def test_any_changed_body_byte_fails(request_: dict[str, Any]) -> None:
    """Flipping any single byte of the body breaks the checksum."""
    body = request_["body"].encode()
    scheme = scheme_at(request_["jwt_claims"]["iat"] + 10)
    for i in range(len(body)):
        tampered = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        assert reason(scheme, tampered, request_["headers"]) == "checksum_mismatch"


@pytest.mark.parametrize("request_", REAL, ids=["touch-2022", "temperature-2024"])
def test_any_changed_token_character_fails(request_: dict[str, Any]) -> None:
    """Changing any single character of the token is rejected, including padding bits."""
    body = request_["body"].encode()
    token = request_["headers"]["X-Dt-Signature"]
    scheme = scheme_at(request_["jwt_claims"]["iat"] + 10)
    for i, char in enumerate(token):
        for replacement in {"A", "B", "_", "."} - {char}:
            tampered = token[:i] + replacement + token[i + 1 :]
            reason(scheme, body, {"X-Dt-Signature": tampered})


def test_header_lookup_is_case_insensitive() -> None:
    """DT's header is found whatever casing the framework hands over."""
    real = REAL[0]
    scheme = scheme_at(real["jwt_claims"]["iat"])
    token = real["headers"]["X-Dt-Signature"]
    for name in ("x-dt-signature", "X-DT-SIGNATURE", "X-Dt-Signature"):
        assert scheme.verify(real["body"].encode(), {name: token}).scheme == "secret"


def test_rotation_accepts_any_configured_secret_and_reports_its_position() -> None:
    """During a rotation old and new secrets both work; the match is named by position."""
    real = REAL[1]
    scheme = scheme_at(real["jwt_claims"]["iat"], "new-secret", "test-secret")
    assert scheme.verify(real["body"].encode(), real["headers"]).key == "secret #2"


def test_wrong_secret_is_invalid_signature() -> None:
    real = REAL[1]
    scheme = scheme_at(real["jwt_claims"]["iat"], "not-the-secret")
    assert reason(scheme, real["body"].encode(), real["headers"]) == "invalid_signature"


def test_missing_and_empty_header() -> None:
    """No token at all is missing_signature, never a crash."""
    scheme = scheme_at(0)
    assert reason(scheme, b"{}", {}) == "missing_signature"
    assert reason(scheme, b"{}", {"X-Dt-Signature": ""}) == "missing_signature"


@pytest.mark.parametrize(
    "token", ["abc", "a.b", "a.b.c.d", "!!.??.##", "e30.e30.@@@@", "W10.e30.e30"]
)
def test_malformed_tokens(token: str) -> None:
    assert reason(scheme_at(0), b"{}", {"X-Dt-Signature": token}) == "malformed_signature"


ALG_CONFUSION = [
    ({"alg": "none", "typ": "JWT"}, None),
    ({"alg": "HS384", "typ": "JWT"}, hashlib.sha384),
    ({"alg": "RS256", "typ": "JWT"}, hashlib.sha256),
    ({"typ": "JWT"}, hashlib.sha256),
]


@pytest.mark.parametrize(
    ("header", "digest"), ALG_CONFUSION, ids=["none", "HS384", "RS256", "no-alg"]
)
def test_algorithm_comes_from_us_not_the_token(header: dict[str, Any], digest: Any) -> None:
    """A token naming another algorithm fails even when correctly signed for it."""
    body = b'{"event":{}}'
    claims = {"checksum_sha256": hashlib.sha256(body).hexdigest(), "iat": 1000, "exp": 4600}
    if digest is None:
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        token = signing_input + "."
    else:
        token = forge(header, claims, b"test-secret", digest)
    code = reason(scheme_at(1000), body, {"X-Dt-Signature": token})
    assert code in {"invalid_signature", "malformed_signature"}
    if digest is not None:
        assert code == "invalid_signature"


def test_legacy_sha1_only_token_verifies_and_checks_the_body() -> None:
    """Tokens from before 2022 carry only the SHA-1 checksum; they still verify."""
    body = b'{"event":{"eventId":"legacy"},"labels":{}}'
    claims = {"checksum": hashlib.sha1(body).hexdigest(), "iat": 1000, "exp": 4600}
    token = forge({"alg": "HS256", "typ": "JWT"}, claims, b"test-secret", hashlib.sha256)
    scheme = scheme_at(1000)
    assert scheme.verify(body, {"X-Dt-Signature": token}).scheme == "secret"
    assert reason(scheme, body + b" ", {"X-Dt-Signature": token}) == "checksum_mismatch"


def test_sha256_wins_over_sha1_when_both_present() -> None:
    """A correct SHA-1 cannot rescue a wrong SHA-256."""
    body = b'{"event":{}}'
    claims = {
        "checksum": hashlib.sha1(body).hexdigest(),
        "checksum_sha256": hashlib.sha256(b"other").hexdigest(),
        "iat": 1000,
        "exp": 4600,
    }
    token = forge({"alg": "HS256", "typ": "JWT"}, claims, b"test-secret", hashlib.sha256)
    assert reason(scheme_at(1000), body, {"X-Dt-Signature": token}) == "checksum_mismatch"


def test_token_without_checksum_is_rejected() -> None:
    token = forge({"alg": "HS256"}, {"iat": 1000}, b"test-secret", hashlib.sha256)
    assert reason(scheme_at(1000), b"{}", {"X-Dt-Signature": token}) == "malformed_signature"


def test_default_age_accepts_a_dt_retry_hours_after_signing() -> None:
    """A retry of a token signed 11 hours ago (past its 1 h exp) is still accepted."""
    body = b'{"event":{}}'
    token = sign_secret(body, "test-secret", now=1_000_000)
    scheme = scheme_at(1_000_000 + 11 * HOUR, "test-secret")
    assert scheme.verify(body, {"X-Dt-Signature": token}).scheme == "secret"


def test_token_older_than_max_age_is_expired() -> None:
    body = b'{"event":{}}'
    token = sign_secret(body, "test-secret", now=1_000_000)
    scheme = scheme_at(1_000_000 + 14 * HOUR, "test-secret")
    assert reason(scheme, body, {"X-Dt-Signature": token}) == "expired_signature"


def test_max_age_zero_means_plain_jwt_expiry() -> None:
    body = b"{}"
    token = sign_secret(body, "s", now=1_000_000)
    strict = SecretScheme(["s"], TokenAge(max_age=0, leeway=0, clock=lambda: 1_000_000 + HOUR))
    assert strict.verify(body, {"X-Dt-Signature": token}).scheme == "secret"
    late = SecretScheme(["s"], TokenAge(max_age=0, leeway=0, clock=lambda: 1_000_001 + HOUR))
    assert reason(late, body, {"X-Dt-Signature": token}) == "expired_signature"


def test_token_from_the_future_beyond_leeway_is_rejected() -> None:
    body = b"{}"
    token = sign_secret(body, "s", now=1_000_000 + 600)
    code = reason(scheme_at(1_000_000, "s"), body, {"X-Dt-Signature": token})
    assert code == "invalid_signature"


def test_verifier_requires_every_scheme_and_reports_unverified_when_none() -> None:
    """With no scheme configured events pass but are marked unverified."""
    off = Verifier([])
    assert not off.enabled
    assert off.verify(b"{}", {}).label == "unverified"
    real = REAL[0]
    on = Verifier([scheme_at(real["jwt_claims"]["iat"])])
    assert on.verify(real["body"].encode(), real["headers"]).label == "secret"


def _signed_token(body: bytes) -> str:
    claims = {"checksum_sha256": hashlib.sha256(body).hexdigest(), "iat": 1000, "exp": 4600}
    return forge({"alg": "HS256", "typ": "JWT"}, claims, b"test-secret", hashlib.sha256)


def test_correct_signature_in_a_non_canonical_spelling_is_refused() -> None:
    """The same signature bytes spelled with padding, or with stray bits in its last
    character, must not pass: only the one canonical base64url spelling does."""
    body = b'{"event":{}}'
    token = _signed_token(body)
    head, payload, sig = token.split(".")
    assert scheme_at(1000).verify(body, {"X-Dt-Signature": token}).key == "secret #1"
    # 32 bytes take 43 characters whose last carries 2 unused bits; "=" pads it to 44.
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(sig[-1])
    stray = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last | 1]
    assert stray != sig[-1]
    for spelling in (sig + "=", sig[:-1] + stray):
        assert base64.urlsafe_b64decode(spelling + "=" * (-len(spelling) % 4)) == (
            base64.urlsafe_b64decode(sig + "=")
        )
        forged = f"{head}.{payload}.{spelling}"
        assert reason(scheme_at(1000), body, {"X-Dt-Signature": forged}) == ("malformed_signature")


def test_token_around_whitespace_and_non_ascii_are_judged_the_same_way() -> None:
    body = b'{"event":{}}'
    token = _signed_token(body)
    assert scheme_at(1000).verify(body, {"X-Dt-Signature": f"  {token}\t"}).scheme == "secret"
    assert reason(scheme_at(1000), body, {"X-Dt-Signature": token + "é"}) == ("malformed_signature")
    assert reason(scheme_at(1000), body, {"X-Dt-Signature": token + ".x"}) == (
        "malformed_signature"
    )
