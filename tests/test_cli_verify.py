"""`verify` judges a captured request as the receiver would, and says why in plain words."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner, Result
from jwt.utils import base64url_encode

from app.cli import main
from app.signing import sign_secret
from tests.conftest import signed_requests
from tests.dt_keys import ORG_ID, SigningKey, compact, dt_claims, jwks

DT = signed_requests()
TOUCH, TEMPERATURE = DT
SECRET = TOUCH["signature_secret"]
IAT = TOUCH["jwt_claims"]["iat"]


def verify(*args: str) -> Result:
    return CliRunner().invoke(main, ["verify", *args])


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def capture(tmp_path: Path, request: dict[str, Any], body: bytes | None = None) -> list[str]:
    """--body and --headers (a JSON object) for one of DT's real requests."""
    raw = request["body"].encode() if body is None else body
    return [
        "--body",
        write(tmp_path, "body.json", raw),
        "--headers",
        write(tmp_path, "headers.json", json.dumps(request["headers"])),
    ]


@pytest.mark.parametrize("request_", DT, ids=["2022-touch", "2024-temperature"])
def test_dts_real_requests_verify_as_of_shortly_after_they_were_signed(
    tmp_path: Path, request_: dict[str, Any]
) -> None:
    now = str(request_["jwt_claims"]["iat"] + 10)
    result = verify(*capture(tmp_path, request_), "--secret", SECRET, "--now", now)
    assert result.exit_code == 0, result.output
    assert "✓ signature matches secret #1 of 1" in result.stdout
    assert "✓ checksum_sha256 matches the SHA-256 of the body file" in result.stdout
    assert "→ the receiver accepts it (secret #1)" in result.stdout
    assert result.stdout.endswith("verdict: PASS (secret)\n")
    assert "✗" not in result.stdout


def test_headers_as_lines_from_a_request_dump(tmp_path: Path) -> None:
    """`curl -v` style lines, any spelling of the name, and the body after a blank line."""
    token = TOUCH["headers"]["X-Dt-Signature"]
    dump = f"> POST /events HTTP/1.1\n> Host: localhost\n> x-dt-signature: {token}\n>\n{{}}\n"
    headers = write(tmp_path, "dump.txt", dump)
    body = write(tmp_path, "body.json", TOUCH["body"])
    now = str(IAT + 10)
    result = verify("--body", body, "--headers", headers, "--secret", SECRET, "--now", now)
    assert result.exit_code == 0, result.output


def test_an_expired_token_says_by_how_long_and_until_when_it_was_accepted(tmp_path: Path) -> None:
    result = verify(*capture(tmp_path, TOUCH), "--secret", SECRET)
    assert result.exit_code == 1
    assert re.search(
        r"✗ age: issued 2022-02-10 12:42:13 UTC, .*; expired \d+ d( \d+ h)? ago", result.stdout
    )
    assert (
        "accepted until 2022-02-11 01:43:13 UTC = max(exp, iat + 13 h) + 60 s leeway"
        in result.stdout
    )
    assert "→ the receiver answers 401 expired_signature" in result.stdout
    assert result.stdout.endswith("verdict: FAIL (secret)\n")


def test_a_token_past_its_exp_but_within_dts_retry_window_passes_and_says_so(
    tmp_path: Path,
) -> None:
    now = str(IAT + 5 * 3600)
    result = verify(*capture(tmp_path, TOUCH), "--secret", SECRET, "--now", now)
    assert result.exit_code == 0, result.output
    assert "valid for another 8 h 1 min" in result.stdout
    assert "its exp passed 4 h ago" in result.stdout


def test_max_token_age_0_honours_exp_only(tmp_path: Path) -> None:
    now = str(IAT + 2 * 3600)
    result = verify(
        *capture(tmp_path, TOUCH), "--secret", SECRET, "--now", now, "--max-token-age", "0"
    )
    assert result.exit_code == 1
    assert (
        "expired 59 min ago (accepted until 2022-02-10 13:43:13 UTC = exp + 60 s" in result.stdout
    )


def test_now_takes_an_iso_time(tmp_path: Path) -> None:
    result = verify(*capture(tmp_path, TOUCH), "--secret", SECRET, "--now", "2022-02-10T12:43:00Z")
    assert result.exit_code == 0, result.output
    assert "as of: 2022-02-10 12:43:00 UTC (--now)" in result.stdout


def test_a_tampered_body_shows_both_digests(tmp_path: Path) -> None:
    body = TOUCH["body"].replace('"touch"}', '"touchy"}', 1).encode()
    assert body != TOUCH["body"].encode()
    result = verify(*capture(tmp_path, TOUCH, body), "--secret", SECRET, "--now", str(IAT + 10))
    assert result.exit_code == 1
    assert "✗ checksum_sha256 does not match the SHA-256 of the body file" in result.stdout
    assert f"token claims  {TOUCH['body_sha256_hex']}" in result.stdout
    assert f"body SHA-256  {hashlib.sha256(body).hexdigest()}" in result.stdout
    assert "this token was made for other bytes" in result.stdout
    assert "401 checksum_mismatch" in result.stdout


def test_a_trailing_newline_in_the_body_file_is_named_as_the_likely_mistake(
    tmp_path: Path,
) -> None:
    body = TOUCH["body"].encode() + b"\n"
    result = verify(*capture(tmp_path, TOUCH, body), "--secret", SECRET, "--now", str(IAT + 10))
    assert result.exit_code == 1
    assert "hint: the body file has a trailing newline" in result.stdout


def test_a_pretty_printed_body_file_is_named_as_the_likely_mistake(tmp_path: Path) -> None:
    body = json.dumps(json.loads(TOUCH["body"]), indent=2).encode()
    result = verify(*capture(tmp_path, TOUCH, body), "--secret", SECRET, "--now", str(IAT + 10))
    assert result.exit_code == 1
    assert "hint: the body file is re-formatted JSON" in result.stdout


def test_a_wrong_secret_matches_none(tmp_path: Path) -> None:
    wrong = "not-the-data-connectors-secret"
    result = verify(*capture(tmp_path, TOUCH), "--secret", wrong, "--now", str(IAT + 10))
    assert result.exit_code == 1
    assert "✗ signature matches none of the 1 secret(s) given" in result.stdout
    assert "401 invalid_signature" in result.stdout
    assert wrong not in result.stdout


def test_during_a_rotation_it_says_which_secret_matched_by_position(tmp_path: Path) -> None:
    args = ("--secret", "old-secret", "--secret", SECRET, "--now", str(IAT + 10))
    result = verify(*capture(tmp_path, TOUCH), *args)
    assert result.exit_code == 0, result.output
    assert "✓ signature matches secret #2 of 2" in result.stdout
    assert SECRET not in result.stdout


@pytest.mark.parametrize(
    ("alg", "why"),
    [
        ("none", "an unsigned token proves nothing; only HS256 is accepted"),
        ("HS384", "this scheme is HS256 only"),
        ("RS256", "this scheme is HS256 only"),
    ],
)
def test_other_algorithms_are_refused_and_say_so(tmp_path: Path, alg: str, why: str) -> None:
    body = TOUCH["body"].encode()
    token = compact({"alg": alg, "typ": "JWT"}, TOUCH["jwt_claims"])
    result = verify(
        "--body", write(tmp_path, "body.json", body), "--token", token,
        "--secret", SECRET, "--now", str(IAT + 10),
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"✗ algorithm {alg!r} refused: {why}" in result.stdout
    assert "- signature: not checked, the algorithm is refused" in result.stdout
    assert "401 invalid_signature" in result.stdout


def test_a_legacy_sha1_only_token_passes_the_secret_scheme(tmp_path: Path) -> None:
    body = TOUCH["body"].encode()
    claims = {k: v for k, v in TOUCH["jwt_claims"].items() if k != "checksum_sha256"}
    token = jwt.encode(claims, "a-legacy-secret-long-enough-for-hs256", algorithm="HS256")
    result = verify(
        "--body", write(tmp_path, "body.json", body), "--token", token,
        "--secret", "a-legacy-secret-long-enough-for-hs256", "--now", str(IAT + 10),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "✓ checksum matches the SHA-1 of the body file (a legacy token" in result.stdout


def test_a_token_from_the_future_blames_the_clock(tmp_path: Path) -> None:
    result = verify(*capture(tmp_path, TOUCH), "--secret", SECRET, "--now", str(IAT - 600))
    assert result.exit_code == 1
    assert "issued 10 min in the future" in result.stdout


def test_a_token_without_its_secret_is_explained_but_not_judged(tmp_path: Path) -> None:
    result = verify(*capture(tmp_path, TOUCH), "--now", str(IAT + 10))
    assert result.exit_code == 1
    assert "- signature: not checked, no --secret given" in result.stdout
    assert "verdict: NOT VERIFIED" in result.stdout


def test_a_capture_without_any_signature_is_a_usage_error(tmp_path: Path) -> None:
    body = write(tmp_path, "body.json", TOUCH["body"])
    headers = write(tmp_path, "h.txt", "X-Other: 1\n")
    result = verify("--body", body, "--headers", headers, "--secret", SECRET)
    assert result.exit_code == 2
    assert "no signature to check" in result.output


# --- the asymmetric scheme -----------------------------------------------------------------


@pytest.fixture
def dt_key() -> SigningKey:
    return SigningKey.generate("dt-key-1")


def asymmetric(tmp_path: Path, key: SigningKey, token: str, *args: str) -> Result:
    body = write(tmp_path, "body.json", TOUCH["body"])
    keys = write(tmp_path, "jwks.json", json.dumps(jwks([key])))
    return verify("--body", body, "--asymmetric-token", token, "--jwks", keys, *args)


def test_an_asymmetric_token_passes_with_the_jwks_and_org(
    tmp_path: Path, dt_key: SigningKey
) -> None:
    token = dt_key.sign(TOUCH["body"].encode())
    result = asymmetric(tmp_path, dt_key, token, "--org-id", ORG_ID)
    assert result.exit_code == 0, result.output
    assert "✓ kid 'dt-key-1' found in the JWKS" in result.stdout
    assert "✓ signature matches key 'dt-key-1'" in result.stdout
    assert f"✓ organization (sub) {ORG_ID!r} is --org-id" in result.stdout
    assert "→ the receiver accepts it (kid dt-key-1)" in result.stdout
    assert result.stdout.endswith("verdict: PASS (asymmetric)\n")


def test_another_organizations_token_fails(tmp_path: Path, dt_key: SigningKey) -> None:
    token = dt_key.sign(TOUCH["body"].encode(), org_id="someone-else")
    result = asymmetric(tmp_path, dt_key, token, "--org-id", ORG_ID)
    assert result.exit_code == 1
    assert f"✗ organization (sub) 'someone-else' is not --org-id {ORG_ID!r}" in result.stdout
    assert "401 wrong_organization" in result.stdout


def test_an_unknown_kid_lists_the_kids_the_jwks_holds(tmp_path: Path, dt_key: SigningKey) -> None:
    token = SigningKey.generate("rotated").sign(TOUCH["body"].encode())
    result = asymmetric(tmp_path, dt_key, token)
    assert result.exit_code == 1
    assert "✗ kid 'rotated' is not in the JWKS (it holds 'dt-key-1')" in result.stdout
    assert "401 unknown_key" in result.stdout


def test_hmac_with_the_public_key_is_named_as_algorithm_confusion(
    tmp_path: Path, dt_key: SigningKey
) -> None:
    claims = dt_claims(TOUCH["body"].encode())
    token = compact({"alg": "HS256", "kid": "dt-key-1"}, claims, lambda data: b"forged")
    result = asymmetric(tmp_path, dt_key, token)
    assert result.exit_code == 1
    assert "algorithm-confusion" in result.stdout


def test_without_a_jwks_the_asymmetric_token_is_not_judged(
    tmp_path: Path, dt_key: SigningKey
) -> None:
    body = write(tmp_path, "body.json", TOUCH["body"])
    token = dt_key.sign(TOUCH["body"].encode())
    result = verify("--body", body, "--asymmetric-token", token)
    assert result.exit_code == 1
    assert "- kid 'dt-key-1': signature not checked, no --jwks given" in result.stdout
    assert "verdict: NOT VERIFIED" in result.stdout


def test_both_schemes_from_one_headers_file(tmp_path: Path, dt_key: SigningKey) -> None:
    body = TOUCH["body"].encode()
    headers = {
        "DT-Asymmetric-Signature": dt_key.sign(body),
        "X-Dt-Signature": sign_secret(body, "a-test-secret-long-enough-for-hs256"),
    }
    result = verify(
        "--body", write(tmp_path, "body.json", body),
        "--headers", write(tmp_path, "h.json", json.dumps(headers)),
        "--secret", "a-test-secret-long-enough-for-hs256",
        "--jwks", write(tmp_path, "jwks.json", json.dumps(jwks([dt_key]))),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("verdict: PASS (secret, asymmetric)\n")


def test_a_secret_given_for_a_capture_without_x_dt_signature_fails_as_the_receiver_would(
    tmp_path: Path, dt_key: SigningKey
) -> None:
    token = dt_key.sign(TOUCH["body"].encode())
    result = asymmetric(tmp_path, dt_key, token, "--secret", SECRET)
    assert result.exit_code == 1
    assert "✗ X-Dt-Signature: no such header in the capture" in result.stdout
    assert "401 missing_signature" in result.stdout
    assert result.stdout.endswith("verdict: FAIL (secret)\n")


def test_a_malformed_token_says_why(tmp_path: Path) -> None:
    body = write(tmp_path, "body.json", TOUCH["body"])
    bad = base64url_encode(b"{}").decode() + ".x"
    result = verify("--body", body, "--token", bad, "--secret", SECRET)
    assert result.exit_code == 1
    assert "✗ token: token has 2 parts, expected 3" in result.stdout
    assert "401 malformed_signature" in result.stdout
