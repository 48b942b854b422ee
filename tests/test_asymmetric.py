"""DT-Asymmetric-Signature: real EC P-256 keys, a real local JWKS server, no sleeps."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from app.asymmetric import (
    ASYMMETRIC_HEADER,
    AsymmetricScheme,
    DTKeys,
    KeysUnavailable,
    parse_jwks,
)
from app.errors import ConfigError, SignatureError
from app.settings import DT_ISSUER, Settings
from app.signature import SchemePass, TokenAge
from tests.dt_keys import ORG_ID, JwksServer, SigningKey, compact, dt_claims, jwks

NOW = 1_760_000_000.0
HOUR = 3600
BODY = b'{"event":{"eventId":"d1e2v3","eventType":"temperature"},"labels":{}}'
DEFAULT_MAX_AGE: int = Settings.model_fields["max_token_age"].default


class FakeClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ManualSleep:
    """The refresher's sleep: each call blocks until the test opens its gate."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def __call__(self, delay: float) -> None:
        gate = asyncio.get_running_loop().create_future()
        await self.calls.put((delay, gate))
        await gate

    async def next(self) -> tuple[float, asyncio.Future[None]]:
        with anyio.fail_after(5):
            return await self.calls.get()


class Captured(logging.Handler):
    """Records of ``dcon.asymmetric``, whatever app.logs did to propagation."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def logs() -> Iterator[Captured]:
    logger = logging.getLogger("dcon.asymmetric")
    handler, level = Captured(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def dt_key() -> SigningKey:
    return SigningKey.generate("dt-key-1")


@pytest.fixture
def server(dt_key: SigningKey) -> Iterator[JwksServer]:
    with JwksServer(keys=[dt_key]) as running:
        yield running


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def keys(server: JwksServer, clock: FakeClock) -> AsyncIterator[DTKeys]:
    loaded = DTKeys(server.oidc_url, min_interval=60, clock=clock)
    await loaded.start()
    yield loaded
    await loaded.close()


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but never listening: every connect is refused
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/.well-known/openid-configuration"


def scheme(
    keys: DTKeys,
    *,
    max_age: int = DEFAULT_MAX_AGE,
    org_id: str | None = ORG_ID,
    header: str = ASYMMETRIC_HEADER,
) -> AsymmetricScheme:
    age = TokenAge(max_age=max_age, leeway=60, clock=lambda: NOW)
    return AsymmetricScheme(keys, age, org_id=org_id, header=header)


def pinned(*signing_keys: SigningKey, org_id: str | None = ORG_ID) -> AsymmetricScheme:
    return scheme(DTKeys.from_jwks(jwks(signing_keys)), org_id=org_id)


def headers(token: str) -> dict[str, str]:
    return {"DT-Asymmetric-Signature": token}


def refusal(check: AsymmetricScheme, token: str, body: bytes = BODY) -> SignatureError:
    with pytest.raises(SignatureError) as caught:
        check.verify(body, headers(token))
    assert caught.value.scheme == "asymmetric"
    return caught.value


# --- tokens that pass ------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_token_signed_with_a_published_key_passes(keys: DTKeys, dt_key: SigningKey) -> None:
    """A DT token checked against a key fetched via discovery; the pass names kid and org."""
    passed = scheme(keys).verify(BODY, headers(dt_key.sign(BODY, iat=NOW)))
    assert passed == SchemePass("asymmetric", "kid dt-key-1", subject=ORG_ID)


def test_tokens_from_the_send_emulator_pass(dt_key: SigningKey) -> None:
    """``app.signing`` (the ``send`` emulator) and this scheme agree on the format."""
    from app.signing import sign_asymmetric

    token = sign_asymmetric(
        BODY, dt_key.private_pem(), kid=dt_key.kid, issuer=DT_ISSUER, org_id=ORG_ID, now=NOW
    )
    assert pinned(dt_key).verify(BODY, headers(token)).key == "kid dt-key-1"


@pytest.mark.parametrize(
    "name", ["dt-asymmetric-signature", "DT-ASYMMETRIC-SIGNATURE", "Dt-Asymmetric-Signature"]
)
def test_the_header_name_is_case_insensitive(dt_key: SigningKey, name: str) -> None:
    """Frameworks keep header names in different cases."""
    pinned(dt_key).verify(BODY, {name: dt_key.sign(BODY, iat=NOW)})


def test_the_header_name_is_configurable(dt_key: SigningKey) -> None:
    """A proxy may rename the header; the configured name is matched in any case."""
    check = scheme(DTKeys.from_jwks(jwks([dt_key])), header="X-Forwarded-DT-Signature")
    check.verify(BODY, {"x-forwarded-dt-signature": dt_key.sign(BODY, iat=NOW)})
    assert refusal(check, dt_key.sign(BODY, iat=NOW)).code == "missing_signature"


def test_without_an_organization_any_subject_passes(dt_key: SigningKey) -> None:
    """With DCON_DT_ORG_ID unset, sub is reported but not required."""
    passed = pinned(dt_key, org_id=None).verify(
        BODY, headers(dt_key.sign(BODY, iat=NOW, org_id="another-org"))
    )
    assert passed.subject == "another-org"


def test_a_two_hour_old_token_passes_under_the_default_policy(dt_key: SigningKey) -> None:
    """DT retries for 12 h; a retry carrying a 2 h old token is still accepted."""
    pinned(dt_key).verify(BODY, headers(dt_key.sign(BODY, iat=NOW - 2 * HOUR)))


# --- tokens that fail ------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_a_missing_header_is_refused(dt_key: SigningKey, value: str | None) -> None:
    given = {} if value is None else headers(value)
    with pytest.raises(SignatureError) as caught:
        pinned(dt_key).verify(BODY, given)
    assert caught.value.code == "missing_signature"


@pytest.mark.parametrize("token", ["not-a-token", "a.b", "a.b.c", "e30.e30.!!"])
def test_a_malformed_token_is_refused(dt_key: SigningKey, token: str) -> None:
    assert refusal(pinned(dt_key), token).code == "malformed_signature"


@pytest.mark.anyio
async def test_a_known_kid_with_another_private_key_is_refused(
    keys: DTKeys, dt_key: SigningKey
) -> None:
    """Claiming DT's kid does not help a token signed with some other key."""
    impostor = SigningKey(dt_key.kid, ec.generate_private_key(ec.SECP256R1()))
    assert refusal(scheme(keys), impostor.sign(BODY, iat=NOW)).code == "invalid_signature"


def test_the_signature_is_checked_before_any_claim(dt_key: SigningKey) -> None:
    """Every claim of a forged token is wrong, and the answer is still about the signature."""
    impostor = SigningKey(dt_key.kid, ec.generate_private_key(ec.SECP256R1()))
    token = impostor.sign(b"x", iat=NOW - 30 * HOUR, issuer="https://evil.example", org_id="o")
    assert refusal(pinned(dt_key), token).code == "invalid_signature"


def test_a_token_without_kid_is_refused(dt_key: SigningKey) -> None:
    token = jwt.encode(dt_claims(BODY, iat=NOW), dt_key.private, algorithm="ES256")
    assert refusal(pinned(dt_key), token).code == "unknown_key"


def test_a_wrong_issuer_is_refused(dt_key: SigningKey) -> None:
    token = dt_key.sign(BODY, iat=NOW, issuer="https://identity.example/data-connector")
    assert refusal(pinned(dt_key), token).code == "wrong_issuer"


def test_another_organization_is_refused(dt_key: SigningKey) -> None:
    """The same DT key signs for every organization; sub is what makes a token ours."""
    token = dt_key.sign(BODY, iat=NOW, org_id="someone-elses-org")
    assert refusal(pinned(dt_key), token).code == "wrong_organization"


def test_a_token_older_than_max_token_age_is_refused(dt_key: SigningKey) -> None:
    check = scheme(DTKeys.from_jwks(jwks([dt_key])), max_age=13 * HOUR)
    token = dt_key.sign(BODY, iat=NOW - 14 * HOUR)
    assert refusal(check, token).code == "expired_signature"


def test_a_body_changed_by_one_byte_is_refused(dt_key: SigningKey) -> None:
    tampered = BODY.replace(b"temperature", b"temperaturE")
    assert refusal(pinned(dt_key), dt_key.sign(BODY, iat=NOW), tampered).code == "checksum_mismatch"


def test_a_sha1_checksum_is_not_enough(dt_key: SigningKey) -> None:
    """Unlike the secret scheme, there is no legacy SHA-1 fallback here."""
    claims = dt_claims(BODY, iat=NOW)
    del claims["checksum_sha256"]
    claims["checksum"] = hashlib.sha1(BODY, usedforsecurity=False).hexdigest()
    token = jwt.encode(claims, dt_key.private, algorithm="ES256", headers={"kid": dt_key.kid})
    assert refusal(pinned(dt_key), token).code == "malformed_signature"


@pytest.mark.parametrize(
    "attack", ["hs256-public-pem", "hs256-public-jwk", "alg-none", "es384-under-known-kid"]
)
def test_algorithm_confusion_is_refused(dt_key: SigningKey, attack: str) -> None:
    """The algorithm is pinned to ES256; whatever else the header says, the token fails."""
    claims = dt_claims(BODY, iat=NOW)
    secrets = {"hs256-public-pem": dt_key.public_pem(), "hs256-public-jwk": _jwk_bytes(dt_key)}
    if attack in secrets:
        secret = secrets[attack]
        token = compact(
            {"alg": "HS256", "typ": "JWT", "kid": dt_key.kid},
            claims,
            lambda signing_input: hmac.digest(secret, signing_input, "sha256"),
        )
    elif attack == "alg-none":
        token = compact({"alg": "none", "typ": "JWT", "kid": dt_key.kid}, claims)
    else:
        token = SigningKey(dt_key.kid, ec.generate_private_key(ec.SECP384R1()), "ES384").sign(
            BODY, iat=NOW
        )
    assert refusal(pinned(dt_key), token).code == "invalid_signature"


def _jwk_bytes(key: SigningKey) -> bytes:
    return json.dumps(key.jwk()).encode()


# --- key rotation and the rate limit ---------------------------------------------------


@pytest.mark.anyio
async def test_a_new_kid_passes_once_the_scheduled_refresh_has_run(
    server: JwksServer, keys: DTKeys
) -> None:
    """DT rotates: the first request is refused and schedules a refresh; its retry passes."""
    rotated = SigningKey.generate("dt-key-2")
    check, token = scheme(keys), rotated.sign(BODY, iat=NOW)
    assert refusal(check, token).code == "unknown_key"
    # The refresh is scheduled, not run: nothing has yielded to the loop since.
    server.keys.append(rotated)
    await keys.wait_for_refresh()
    assert check.verify(BODY, headers(token)).key == "kid dt-key-2"
    assert server.jwks_fetches == 2


@pytest.mark.anyio
async def test_bogus_kids_cause_at_most_one_fetch_per_interval(
    server: JwksServer, keys: DTKeys, clock: FakeClock
) -> None:
    """A flood of unknown kids costs DT's server one fetch per dt_jwks_min_interval."""
    check, stranger = scheme(keys), SigningKey.generate("stranger")

    async def flood(tag: str) -> int:
        for n in range(20):
            assert refusal(check, stranger.sign(BODY, iat=NOW, kid=f"{tag}-{n}")).code == (
                "unknown_key"
            )
        await keys.wait_for_refresh()
        return server.jwks_fetches

    assert await flood("first") == 2  # the load at start, then one refresh
    clock.now += 59
    assert await flood("within-the-interval") == 2
    clock.now += 1
    assert await flood("next-interval") == 3


@pytest.mark.anyio
async def test_an_unknown_kid_seen_on_a_worker_thread_schedules_a_refresh(
    server: JwksServer, keys: DTKeys
) -> None:
    """verify() may run in a thread pool; the refresh still lands on the event loop."""
    rotated = SigningKey.generate("dt-key-2")
    server.keys.append(rotated)
    assert await anyio.to_thread.run_sync(keys.lookup, "dt-key-2") is None
    # The thread queued the refresh on the loop before it returned, so it exists by now.
    await keys.wait_for_refresh()
    assert keys.lookup("dt-key-2") is not None


# --- loading, pinning and failures -----------------------------------------------------


@pytest.mark.anyio
async def test_pinned_keys_never_touch_the_network(
    tmp_path: Path, server: JwksServer, dt_key: SigningKey
) -> None:
    """With DCON_DT_JWKS_FILE set, DT's discovery URL is never requested, not even on an
    unknown kid."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks([dt_key])))
    settings = Settings(dt_jwks_file=path, dt_oidc_url=server.oidc_url, dt_org_id=ORG_ID)
    check = AsymmetricScheme.from_settings(settings, TokenAge(DEFAULT_MAX_AGE, clock=lambda: NOW))
    await check.keys.start()
    try:
        assert check.verify(BODY, headers(dt_key.sign(BODY, iat=NOW))).subject == ORG_ID
        stranger = SigningKey.generate("stranger")
        assert refusal(check, stranger.sign(BODY, iat=NOW)).code == "unknown_key"
        assert await check.keys.refresh()
        await check.keys.wait_for_refresh()
    finally:
        await check.keys.close()
    assert server.total == 0
    assert check.keys.status().source == str(path)


def test_an_unreadable_pinned_file_stops_start_up(tmp_path: Path) -> None:
    """A bad pinned file is a configuration error, named, before the port opens."""
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    with pytest.raises(ConfigError, match="DCON_DT_JWKS_FILE"):
        DTKeys.from_settings(Settings(dt_jwks_file=path))
    with pytest.raises(KeysUnavailable):
        DTKeys.from_file(tmp_path / "missing.json")


@pytest.mark.anyio
@pytest.mark.parametrize("failure", ["http-500", "closed-port"])
async def test_a_failed_first_load_is_loud_but_start_goes_on(
    server: JwksServer, closed_port_url: str, dt_key: SigningKey, logs: Captured, failure: str
) -> None:
    """start() does not raise; readiness says why; every token is unknown_key meanwhile."""
    server.discovery_status = 500
    keys = DTKeys(server.oidc_url if failure == "http-500" else closed_port_url)
    await keys.start()
    try:
        status = keys.status()
        assert (status.ready, status.count, status.last_refresh) == (False, 0, None)
        assert status.last_error
        assert any("unknown_key" in message for message in logs.at(logging.ERROR))
        assert keys.lookup(dt_key.kid) is None
        refused = refusal(scheme(keys), dt_key.sign(BODY, iat=NOW))
        assert (refused.code, refused.detail) == (
            "unknown_key",
            "DT's signing keys are not loaded yet",
        )
    finally:
        await keys.close()


@pytest.mark.anyio
async def test_a_failed_refresh_keeps_the_keys_in_use(
    server: JwksServer, keys: DTKeys, dt_key: SigningKey
) -> None:
    server.keys = [SigningKey.generate("p384", ec.SECP384R1())]
    assert not await keys.refresh()
    assert "no usable EC P-256 key" in (keys.status().last_error or "")
    server.discovery_status = 503
    assert not await keys.refresh()
    assert "HTTP 503" in (keys.status().last_error or "")
    assert keys.status().kids == ("dt-key-1",)
    scheme(keys).verify(BODY, headers(dt_key.sign(BODY, iat=NOW)))


@pytest.mark.anyio
async def test_a_discovery_document_from_another_issuer_is_logged(
    server: JwksServer, logs: Captured
) -> None:
    """The keys still load (the token's iss is checked anyway), but the operator is told."""
    server.issuer = "https://identity.example/other"
    keys = DTKeys(server.oidc_url)
    await keys.load()
    await keys.close()
    assert keys.ready
    assert any("identity.example/other" in message for message in logs.at(logging.WARNING))


def test_only_ec_p256_signing_keys_are_kept(dt_key: SigningKey, logs: Captured) -> None:
    """Other key types, curves, uses and algorithms are skipped with a log line each."""
    good = dt_key.jwk()
    private = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True)
    others: list[object] = [
        {"kty": "RSA", "kid": "rsa", "n": "sXch", "e": "AQAB"},
        SigningKey.generate("p384", ec.SECP384R1()).jwk(),
        {**good, "kid": "enc", "use": "enc"},
        {**good, "kid": "es384", "alg": "ES384"},
        {key: value for key, value in good.items() if key != "kid"},
        {**good, "kid": "short-x", "x": "AAAA"},
        {**private, "kid": "private"},
        "not a key",
    ]
    assert list(parse_jwks({"keys": [*others, good]}, "test")) == ["dt-key-1"]
    assert len(logs.at(logging.WARNING)) == len(others)


@pytest.mark.parametrize("document", [{"keys": []}, {"no": "keys"}, ["keys"]])
def test_a_jwks_without_usable_keys_is_unavailable(document: object) -> None:
    with pytest.raises(KeysUnavailable):
        parse_jwks(document, "test")


# --- the background refresher ----------------------------------------------------------


@pytest.mark.anyio
async def test_the_refresher_reloads_every_refresh_interval(server: JwksServer) -> None:
    sleep = ManualSleep()
    keys = DTKeys(server.oidc_url, refresh_every=900, sleep=sleep, wall_clock=lambda: NOW)
    await keys.start()
    try:
        delay, gate = await sleep.next()
        assert (delay, server.jwks_fetches, keys.status().last_refresh) == (900, 1, NOW)
        server.keys.append(SigningKey.generate("dt-key-2"))
        gate.set_result(None)
        await sleep.next()  # the refresher sleeps again only after its refresh
        assert (server.jwks_fetches, keys.status().kids) == (2, ("dt-key-1", "dt-key-2"))
    finally:
        await keys.close()


@pytest.mark.anyio
async def test_without_keys_the_refresher_retries_at_the_on_demand_pace(
    server: JwksServer,
) -> None:
    """Until keys load every event is refused, so the refresher does not wait 15 minutes."""
    server.discovery_status = 500
    sleep = ManualSleep()
    keys = DTKeys(server.oidc_url, refresh_every=900, min_interval=60, sleep=sleep)
    await keys.start()
    try:
        delay, gate = await sleep.next()
        assert (delay, keys.ready) == (60, False)
        server.discovery_status = 200
        gate.set_result(None)
        delay, _ = await sleep.next()
        assert (delay, keys.ready, keys.status().last_error) == (900, True, None)
    finally:
        await keys.close()
