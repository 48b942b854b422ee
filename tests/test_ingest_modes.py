"""Verification modes over HTTP: DT's asymmetric scheme, the secret one, and both."""

from __future__ import annotations

from typing import Any

import pytest

from app.samples import sample_body
from app.settings import Settings
from app.signing import sign_secret
from app.sinks.memory import QueueSink
from tests.conftest import serve_app
from tests.dt_keys import ORG_ID, JwksServer, SigningKey

pytestmark = pytest.mark.anyio

SECRET = "test-secret"


def both_headers(key: SigningKey, body: bytes) -> dict[str, str]:
    return {"DT-Asymmetric-Signature": key.sign(body), "X-Dt-Signature": sign_secret(body, SECRET)}


def settings(server: JwksServer, **overrides: Any) -> Settings:
    base: dict[str, Any] = {"dt_oidc_url": server.oidc_url, "dt_org_id": ORG_ID}
    return Settings(**(base | overrides))


async def test_default_mode_verifies_dts_asymmetric_signature_over_http() -> None:
    """With nothing but DT's published keys, a DT-signed event is accepted."""
    key = SigningKey.generate("dt-key-1")
    sink = QueueSink()
    with JwksServer(keys=[key]) as server:
        async with serve_app(settings(server), [sink]) as (_, client):
            body = sample_body()
            ok = await client.post("/events", content=body, headers=both_headers(key, body))
            forged = await client.post(
                "/events", content=body, headers={"X-Dt-Signature": sign_secret(body, SECRET)}
            )
            ready = await client.get("/readyz")
    assert ok.status_code == 200
    assert sink.queue.get_nowait().verification.label == "asymmetric"
    assert forged.status_code == 401
    assert forged.json()["error"] == "missing_signature"
    assert forged.json()["scheme"] == "asymmetric"
    assert ready.status_code == 200


async def test_both_mode_requires_each_signature() -> None:
    key = SigningKey.generate("dt-key-1")
    sink = QueueSink()
    with JwksServer(keys=[key]) as server:
        s = settings(server, verify_mode="both", signature_secrets=[SECRET])
        async with serve_app(s, [sink]) as (_, client):
            body = sample_body()
            good = await client.post("/events", content=body, headers=both_headers(key, body))
            body2 = sample_body()
            no_secret = await client.post(
                "/events", content=body2, headers={"DT-Asymmetric-Signature": key.sign(body2)}
            )
            wrong_secret = await client.post(
                "/events",
                content=body2,
                headers={
                    "DT-Asymmetric-Signature": key.sign(body2),
                    "X-Dt-Signature": sign_secret(body2, "old-secret"),
                },
            )
    assert good.status_code == 200
    assert sink.queue.get_nowait().verification.label == "asymmetric+secret"
    assert (no_secret.status_code, no_secret.json()["scheme"]) == (401, "secret")
    assert wrong_secret.json()["error"] == "invalid_signature"
    assert sink.queue.empty()


async def test_auto_mode_with_a_secret_checks_both() -> None:
    key = SigningKey.generate("dt-key-1")
    with JwksServer(keys=[key]) as server:
        s = settings(server, signature_secrets=[SECRET])
        assert s.schemes == ("asymmetric", "secret")
        async with serve_app(s, [QueueSink()]) as (_, client):
            body = sample_body()
            ok = await client.post("/events", content=body, headers=both_headers(key, body))
    assert ok.status_code == 200


async def test_keys_that_cannot_load_mean_401_unknown_key_and_unready() -> None:
    """DT's identity server down at start: refuse (DT retries) and say so in /readyz."""
    key = SigningKey.generate("dt-key-1")
    with JwksServer(keys=[key], discovery_status=503) as server:
        async with serve_app(settings(server), [QueueSink()]) as (_, client):
            body = sample_body()
            refused = await client.post(
                "/events", content=body, headers={"DT-Asymmetric-Signature": key.sign(body)}
            )
            ready = await client.get("/readyz")
    assert refused.status_code == 401
    assert refused.json()["error"] == "unknown_key"
    assert ready.status_code == 503
    assert "dt_keys" in ready.json()["failing"]


async def test_wrong_organization_is_refused_over_http() -> None:
    key = SigningKey.generate("dt-key-1")
    with JwksServer(keys=[key]) as server:
        async with serve_app(settings(server), [QueueSink()]) as (_, client):
            body = sample_body()
            token = key.sign(body, org_id="someone-else")
            response = await client.post(
                "/events", content=body, headers={"DT-Asymmetric-Signature": token}
            )
    assert response.status_code == 401
    assert response.json()["error"] == "wrong_organization"
