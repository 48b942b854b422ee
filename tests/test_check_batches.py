"""Requests that arrive together are checked together, and still answered one by one.

The receiver verifies, parses and records every request of one event-loop turn as a batch,
a stage at a time (``Receiver._check_arrivals``). A batch must never mix requests up: each
keeps its own outcome, a failure or a cancellation touches only its own request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

import app.receiver
from app.errors import MalformedBody, SignatureError
from app.events import ParsedBody, parse_body
from app.receiver import Ack, Receiver
from app.samples import sample_body
from app.settings import Settings
from app.signature import Verification, Verifier
from app.signing import sign_secret
from app.sinks.memory import QueueSink
from tests.conftest import serve_app

pytestmark = pytest.mark.anyio

SECRET = "test-secret"


def settings() -> Settings:
    return Settings(verify_mode="secret", signature_secrets=[SECRET])


def request(kind: str = "temperature", secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    body = sample_body(kind)
    return body, {"x-dt-signature": sign_secret(body, secret)}


def event_id(body: bytes) -> str:
    value: str = json.loads(body)["event"]["eventId"]
    return value


def stored(sink: QueueSink) -> list[str]:
    ids = []
    while not sink.queue.empty():
        ids.append(sink.queue.get_nowait().event_id or "")
    return ids


async def test_one_batch_answers_each_request_by_its_own_merits() -> None:
    good = [request(kind) for kind in ("temperature", "touch", "co2", "waterPresent")]
    wrong_secret = request(secret="not-the-secret")
    not_json = b"not json at all"
    malformed = (not_json, {"x-dt-signature": sign_secret(not_json, SECRET)})
    tampered_body, tampered_headers = request()
    tampered = (tampered_body.replace(b'"temperature"', b'"Temperature"', 1), tampered_headers)
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (fastapi_app, _):
        receiver: Receiver = fastapi_app.state.receiver
        batch = [good[0], wrong_secret, good[1], malformed, good[2], tampered, good[3]]
        outcomes = await asyncio.gather(
            *(receiver.receive(body, headers) for body, headers in batch),
            return_exceptions=True,
        )
    accepted = [outcomes[i] for i in (0, 2, 4, 6)]
    assert [o.status if isinstance(o, Ack) else o for o in accepted] == ["accepted"] * 4
    assert [o.event.event_id for o in accepted if isinstance(o, Ack)] == [
        event_id(body) for body, _ in good
    ]
    assert isinstance(outcomes[1], SignatureError)
    assert outcomes[1].code == "invalid_signature"
    assert isinstance(outcomes[3], MalformedBody)
    assert isinstance(outcomes[5], SignatureError)
    assert outcomes[5].code == "checksum_mismatch"
    assert sorted(stored(sink)) == sorted(event_id(body) for body, _ in good)


async def test_a_batch_is_checked_stage_by_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every signature of the batch, then every parse: what keeps each stage's code in the
    CPU's caches. Checking the requests one by one would interleave the two."""
    calls: list[str] = []

    class Recording:
        def __init__(self, inner: Verifier) -> None:
            self.inner = inner

        def verify(self, body: bytes, headers: Mapping[str, str]) -> Verification:
            calls.append("verify")
            return self.inner.verify(body, headers)

    def recording_parse(body: bytes) -> ParsedBody:
        calls.append("parse")
        return parse_body(body)

    monkeypatch.setattr(app.receiver, "parse_body", recording_parse)
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (fastapi_app, _):
        receiver: Receiver = fastapi_app.state.receiver
        monkeypatch.setattr(receiver, "verifier", Recording(receiver.verifier))
        requests = [request(kind) for kind in ("temperature", "touch", "humidity", "motion")]
        acks = await asyncio.gather(*(receiver.receive(b, h) for b, h in requests))
    assert [ack.status for ack in acks] == ["accepted"] * 4
    assert calls == ["verify"] * 4 + ["parse"] * 4
    assert len(stored(sink)) == 4


async def test_a_request_cancelled_while_its_batch_waits_leaves_the_rest_alone() -> None:
    """A client gone before its batch ran: its event is not delivered (so not remembered as
    delivered either: DT's retry of it goes through), and the others are answered."""
    requests = [request(kind) for kind in ("temperature", "touch", "contact", "co2")]
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (fastapi_app, _):
        receiver: Receiver = fastapi_app.state.receiver
        tasks = [asyncio.create_task(receiver.receive(b, h)) for b, h in requests]
        await asyncio.sleep(0)  # every task is now waiting for the batch, which has not run
        tasks[1].cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[1], asyncio.CancelledError)
        assert [o.status for o in outcomes if isinstance(o, Ack)] == ["accepted"] * 3
        assert sorted(stored(sink)) == sorted(event_id(requests[i][0]) for i in (0, 2, 3))
        retry = await receiver.receive(*requests[1])
    assert retry.status == "accepted"
    assert stored(sink) == [event_id(requests[1][0])]


async def test_an_unexpected_error_fails_only_its_own_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = sample_body("touch")

    def parse_or_break(body: bytes) -> ParsedBody:
        if body == broken:
            raise RuntimeError("a bug in parsing")
        return parse_body(body)

    monkeypatch.setattr(app.receiver, "parse_body", parse_or_break)
    requests = [request("temperature"), (broken, {"x-dt-signature": sign_secret(broken, SECRET)})]
    requests.append(request("co2"))
    sink = QueueSink()
    async with serve_app(settings(), [sink]) as (fastapi_app, client):
        receiver: Receiver = fastapi_app.state.receiver
        outcomes: list[Any] = await asyncio.gather(
            *(receiver.receive(b, h) for b, h in requests), return_exceptions=True
        )
        assert isinstance(outcomes[1], RuntimeError)
        assert [outcomes[0].status, outcomes[2].status] == ["accepted", "accepted"]
        # Over HTTP the same request is a 500 in JSON, and the app keeps serving.
        response = await client.post("/events", content=broken, headers=requests[1][1])
        assert response.status_code == 500
        assert response.json() == {"error": "internal_error"}
        after = request("humidity")
        assert (await client.post("/events", content=after[0], headers=after[1])).status_code == 200
    assert sorted(stored(sink)) == sorted(
        event_id(body) for body in (requests[0][0], requests[2][0], after[0])
    )
