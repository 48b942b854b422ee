"""POST /events through the real ASGI app: what DT sees for every kind of request."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.events import ParseOutcome, parse_body
from app.ingest import _ENCODE, _accepted_answer
from app.received import ReceivedEvent
from app.receiver import Ack
from app.samples import sample_body
from app.settings import Settings
from app.signature import UNVERIFIED
from app.signing import sign_secret
from app.sinks.memory import QueueSink
from tests.conftest import payload_files, serve_app, signed_requests
from tests.sinks_doubles import FlakySink, GatedSink, SelfCancellingSink, StuckSink

pytestmark = pytest.mark.anyio

SECRET = "test-secret"


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"verify_mode": "secret", "signature_secrets": [SECRET]}
    base.update(overrides)
    return Settings(**base)


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-Dt-Signature": sign_secret(body, secret)}


def drain(sink: QueueSink) -> list[ReceivedEvent]:
    events = []
    while not sink.queue.empty():
        events.append(sink.queue.get_nowait())
    return events


@pytest.mark.parametrize("path", payload_files(), ids=lambda p: p.stem)
async def test_every_dt_payload_signed_is_accepted_typed_and_delivered(path: Path) -> None:
    body = path.read_bytes()  # noqa: ASYNC240 - a tiny fixture file
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (_, client):
        response = await client.post("/events", content=body, headers=signed(body))
    event_id = json.loads(body)["event"]["eventId"]
    assert response.status_code == 200
    assert response.json() == {"status": "accepted", "eventId": event_id}
    [event] = drain(sink)
    assert event.body == body
    assert event.verified
    assert event.parsed.outcome is ParseOutcome.TYPED, event.parsed.error


async def test_real_dt_request_is_accepted_as_dt_sent_it() -> None:
    """DT's real 2024 request, replayed byte for byte, is accepted under the default age."""
    real = signed_requests()[1]
    sink = QueueSink()
    # Its token is from 2024; a wide max age stands in for a frozen clock here.
    s = settings(max_token_age=20 * 365 * 86400)
    async with serve_app(s, [sink]) as (_, client):
        response = await client.post("/events", content=real["body"], headers=real["headers"])
    assert response.status_code == 200
    assert drain(sink)[0].verification.label == "secret"


async def test_no_content_type_is_required() -> None:
    body = sample_body("touch")
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (_, client):
        for content_type in (None, "text/plain", "application/octet-stream"):
            body = sample_body("touch")
            headers = signed(body)
            if content_type:
                headers["Content-Type"] = content_type
            response = await client.post("/events", content=body, headers=headers)
            assert response.status_code == 200
    assert len(drain(sink)) == 3


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_signature"),
        ({"X-Dt-Signature": "not-a-jwt"}, "malformed_signature"),
    ],
)
async def test_signature_failures_are_401_with_a_reason(headers: dict[str, str], code: str) -> None:
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (_, client):
        response = await client.post("/events", content=sample_body(), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == code
    assert sink.queue.empty()


async def test_wrong_secret_and_tampered_body_are_401() -> None:
    body = sample_body()
    async with serve_app(settings(), [QueueSink()]) as (_, client):
        wrong = await client.post("/events", content=body, headers=signed(body, "other"))
        tampered = await client.post(
            "/events", content=body.replace(b"21.45", b"99.45"), headers=signed(body)
        )
    assert wrong.json()["error"] == "invalid_signature"
    assert tampered.status_code == 401
    assert tampered.json()["error"] == "checksum_mismatch"


async def test_duplicate_is_200_and_not_delivered_twice() -> None:
    body = sample_body()
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (_, client):
        first = await client.post("/events", content=body, headers=signed(body))
        again = await client.post("/events", content=body, headers=signed(body))
    assert first.json()["status"] == "accepted"
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert len(drain(sink)) == 1


async def test_concurrent_duplicates_reach_the_sink_exactly_once() -> None:
    """DT sends in parallel; ten copies of one event in flight at once are stored once."""
    body = sample_body()
    sink = GatedSink()
    async with serve_app(settings(), [sink]) as (_, client):
        posts = [
            asyncio.ensure_future(client.post("/events", content=body, headers=signed(body)))
            for _ in range(10)
        ]
        await sink.first_entered.wait()
        sink.gate.set()
        responses = await asyncio.gather(*posts)
    statuses = sorted(r.json()["status"] for r in responses)
    assert all(r.status_code == 200 for r in responses)
    assert statuses == ["accepted"] + ["duplicate"] * 9
    assert sink.entered == 1
    assert len(drain(sink)) == 1


async def test_failing_sink_is_503_with_retry_after_and_the_retry_delivers() -> None:
    """A failed attempt answers 503 and never blocks DT's retry of the same event."""
    body = sample_body()
    sink = FlakySink(failures=1)
    async with serve_app(settings(retry_after=17), [sink]) as (_, client):
        failed = await client.post("/events", content=body, headers=signed(body))
        retried = await client.post("/events", content=body, headers=signed(body))
    assert failed.status_code == 503
    assert failed.headers["Retry-After"] == "17"
    assert failed.json() == {
        "error": "sink_unavailable",
        "detail": "not stored by flaky; DT should retry",
        "sinks": ["flaky"],
    }
    assert retried.json()["status"] == "accepted"
    assert len(drain(sink)) == 1


async def test_half_delivered_event_is_not_a_success() -> None:
    """One sink storing the event is not enough when another fails."""
    body = sample_body()
    good, bad = QueueSink(), FlakySink(failures=1)
    async with serve_app(settings(), [good, bad]) as (_, client):
        response = await client.post("/events", content=body, headers=signed(body))
    assert response.status_code == 503
    assert response.json()["sinks"] == ["flaky"]


async def test_sink_slower_than_the_deadline_gets_503() -> None:
    body = sample_body()
    sink = StuckSink()
    async with serve_app(settings(sink_timeout=0.05), [sink]) as (_, client):
        response = await client.post("/events", content=body, headers=signed(body))
        sink.release.set()
        retry = await client.post("/events", content=body, headers=signed(body))
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    assert retry.json()["status"] == "accepted"


async def test_body_over_the_cap_is_413_before_verification() -> None:
    body = b'{"event":{"pad":"' + b"x" * 5000 + b'"}}'
    async with serve_app(settings(max_body_bytes=4096), [QueueSink()]) as (_, client):
        declared = await client.post("/events", content=body, headers=signed(body))

        async def chunks() -> Any:
            yield body[:3000]
            yield body[3000:]

        streamed = await client.post("/events", content=chunks(), headers=signed(body))
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"] == "body_too_large"


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", '{"a":1}'.encode("utf-16")])
async def test_signed_body_that_is_not_a_json_object_is_400(body: bytes) -> None:
    async with serve_app(settings(), [QueueSink()]) as (_, client):
        response = await client.post("/events", content=body, headers=signed(body))
    assert response.status_code == 400
    assert response.json()["error"] == "malformed_body"


async def test_unknown_event_type_is_accepted_delivered_and_counted() -> None:
    """A new DT event type must never cause a 12-hour retry storm."""
    doc = json.loads(sample_body("touch"))
    doc["event"]["eventType"] = "lightLevel"
    doc["event"]["data"] = {"lightLevel": {"lux": 300, "updateTime": doc["event"]["timestamp"]}}
    body = json.dumps(doc, separators=(",", ":")).encode()
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (_, client):
        response = await client.post("/events", content=body, headers=signed(body))
        health = await client.get("/healthz")
    assert response.status_code == 200
    [event] = drain(sink)
    assert event.parsed.outcome is ParseOutcome.UNKNOWN
    assert event.body == body
    assert health.json()["counts"]["unknown"] == 1


async def test_signed_json_that_does_not_fit_the_models_is_kept_and_flagged() -> None:
    doc = json.loads(sample_body("temperature"))
    doc["event"]["data"]["temperature"]["value"] = "warm"
    body = json.dumps(doc, separators=(",", ":")).encode()
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (_, client):
        response = await client.post("/events", content=body, headers=signed(body))
    assert response.status_code == 200
    [event] = drain(sink)
    assert event.parsed.outcome is ParseOutcome.INVALID
    assert event.parsed.error is not None
    assert "value" in event.parsed.error


async def test_verification_off_accepts_and_marks_unverified() -> None:
    sink = QueueSink()
    async with serve_app(Settings(verify_mode="off"), [sink]) as (_, client):
        response = await client.post("/events", content=sample_body())
    assert response.status_code == 200
    assert drain(sink)[0].verified is False


async def test_path_is_configurable() -> None:
    body = sample_body()
    async with serve_app(settings(path="/dt/hook"), [QueueSink()]) as (_, client):
        moved = await client.post("/dt/hook", content=body, headers=signed(body))
        old = await client.post("/events", content=body, headers=signed(body))
    assert moved.status_code == 200
    assert old.status_code in (404, 405)


async def test_readyz_names_a_failing_sink() -> None:
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (_, client):
        ready = await client.get("/readyz")
        await sink.close()
        unready = await client.get("/readyz")
    assert ready.status_code == 200
    assert unready.status_code == 503
    assert "queue" in unready.json()["failing"]


async def test_ingest_route_is_in_the_openapi_document() -> None:
    async with serve_app(settings(), [QueueSink()]) as (_, client):
        spec = (await client.get("/openapi.json")).json()
    assert "post" in spec["paths"]["/events"]


async def test_signed_body_without_an_event_id_is_still_stored() -> None:
    """Nothing to deduplicate on is no reason to lose a signed body."""
    body = b'{"event":{"eventType":"touch"},"labels":{}}'
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (_, client):
        first = await client.post("/events", content=body, headers=signed(body))
        second = await client.post("/events", content=body, headers=signed(body))
    assert first.json() == {"status": "accepted", "eventId": None}
    assert second.status_code == 200
    events = drain(sink)
    assert len(events) == 2
    assert events[0].parsed.outcome is ParseOutcome.INVALID


async def test_rotation_logs_which_secret_matched_never_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = sample_body()
    s = settings(signature_secrets=["brand-new-secret", SECRET])
    with caplog.at_level("INFO", logger="dcon"):
        async with serve_app(s, [QueueSink()]) as (_, client):
            response = await client.post("/events", content=body, headers=signed(body))
    assert response.status_code == 200
    assert "secret #2" in caplog.text
    assert SECRET not in caplog.text
    assert "brand-new-secret" not in caplog.text


async def test_sinks_take_only_the_event_types_routed_to_them() -> None:
    """`queue:temperature+humidity` gets those two types; an unfiltered sink gets all."""
    s = settings(sinks=["queue:temperature+humidity", "log"])
    async with serve_app(s) as (app, client):
        [queue, _] = app.state.sinks
        for event_type in ("temperature", "touch", "humidity", "co2"):
            body = sample_body(event_type)
            response = await client.post("/events", content=body, headers=signed(body))
            assert response.status_code == 200
        assert isinstance(queue, QueueSink)
        assert [e.event_type for e in drain(queue)] == ["temperature", "humidity"]


async def test_an_event_routed_nowhere_is_acknowledged_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = settings(sinks=["queue:temperature"])
    with caplog.at_level("WARNING", logger="dcon"):
        async with serve_app(s) as (_, client):
            body = sample_body("touch")
            response = await client.post("/events", content=body, headers=signed(body))
    assert response.status_code == 200
    assert "stored nowhere" in caplog.text
    assert "matches no sink route" in caplog.text


async def test_a_send_that_ends_cancelled_by_itself_is_a_503_not_a_crash() -> None:
    body = sample_body()
    async with serve_app(settings(), [SelfCancellingSink()]) as (_, client):
        response = await client.post("/events", content=body, headers=signed(body))
    assert response.status_code == 503
    assert response.json()["sinks"] == ["self-cancelling"]


async def test_documented_route_answers_like_the_fast_path() -> None:
    """The FastAPI route (in the OpenAPI schema) and the ASGI fast path agree."""
    sink = QueueSink()
    async with serve_app(settings(max_body_bytes=2048), [sink]) as (app, fast):
        plain = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=super(type(app), app).__call__),
            base_url="http://dt.test",
        )
        async with plain:
            for client in (fast, plain):
                body = sample_body()
                ok = await client.post("/events", content=body, headers=signed(body))
                dup = await client.post("/events", content=body, headers=signed(body))
                bad = await client.post("/events", content=body, headers=signed(body, "x"))
                big = await client.post("/events", content=b"{" + b" " * 4096 + b"}")
                assert (ok.status_code, ok.json()["status"]) == (200, "accepted")
                assert dup.json()["status"] == "duplicate"
                assert (bad.status_code, bad.json()["error"]) == (401, "invalid_signature")
                assert big.status_code == 413
                assert ok.headers["content-type"] == "application/json"
                ids = {r.headers["x-request-id"] for r in (ok, dup, bad, big)}
                assert len(ids) == 4  # one of its own for each request
                assert all(len(request_id) == 16 for request_id in ids)
    assert len(drain(sink)) == 2


class BrokenDedup:
    """A dedup store with a bug in it: the receiver must still answer, and in JSON."""

    async def claim(self, event_id: str) -> bool:
        raise RuntimeError("a bug in the store")

    async def close(self) -> None:
        pass


async def test_an_unexpected_error_is_answered_500_in_json_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = sample_body("touch")
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (app, client):
        app.state.receiver.dedup = BrokenDedup()
        response = await client.post("/events", content=body, headers=signed(body))
    assert response.status_code == 500
    assert response.json() == {"error": "internal_error"}
    assert "a bug in the store" in caplog.text
    assert drain(sink) == []


@pytest.mark.parametrize("event_id", ["c0000000000000000001", 'q"u\\ote', "ünï ✓ 😀", None])
def test_the_accepted_answer_is_what_the_json_encoder_writes(event_id: str | None) -> None:
    body = json.dumps({"event": {"eventId": event_id, "eventType": "touch"}}).encode()
    event = ReceivedEvent(body, parse_body(body), UNVERIFIED, datetime.now(UTC))
    for status in ("accepted", "duplicate"):
        expected = _ENCODE({"status": status, "eventId": event_id}).encode()
        assert _accepted_answer(Ack(status, event)) == expected
