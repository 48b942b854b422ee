"""A record line read back is the event that was accepted: the spool, dead letters and
``replay`` all rely on it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from app.events import ParseOutcome, parse_body
from app.received import ReceivedEvent
from app.signature import UNVERIFIED, SchemePass, Verification
from tests.conftest import payload_files

AT = datetime(2026, 11, 26, 4, 5, 6, 789000, tzinfo=UTC)
BOTH = Verification((SchemePass("asymmetric", "kid-1"), SchemePass("secret", "secret #1")))


@pytest.mark.parametrize("path", payload_files(), ids=lambda p: p.stem)
def test_every_payload_round_trips_byte_for_byte(path: Path) -> None:
    body = path.read_bytes().strip()
    event = ReceivedEvent(body, parse_body(body), BOTH, AT)
    back = ReceivedEvent.from_record(event.record() + b"\n")
    assert back.body == body
    assert back.event_id == event.event_id
    assert back.event_type == event.event_type
    assert back.parsed.outcome is event.parsed.outcome
    assert back.received_at == AT
    assert back.verification.label == "asymmetric+secret"
    assert back.record() == event.record()


def test_a_body_with_line_breaks_comes_back_exact() -> None:
    body = b'{\n  "event": {"eventId": "c0000000000000000001", "eventType": "touch"},\r\n "x": 1}'
    event = ReceivedEvent(body, parse_body(body), UNVERIFIED, AT)
    assert b"\n" not in event.record()
    back = ReceivedEvent.from_record(event.record())
    assert back.body == body
    assert not back.verified


def test_a_body_that_quotes_the_splice_marker_is_not_cut_there() -> None:
    doc = {"event": {"eventId": 'a,"body":b', "eventType": "made-up"}, "labels": {}}
    body = json.dumps(doc, separators=(",", ":")).encode()
    event = ReceivedEvent(body, parse_body(body), UNVERIFIED, AT)
    assert event.parsed.outcome is not ParseOutcome.TYPED
    assert ReceivedEvent.from_record(event.record()).body == body


@pytest.mark.parametrize("line", [b"[]", b'{"eventId": "x"}', b"not json", b'{"body": {}}'])
def test_a_line_that_is_not_a_record_is_refused(line: bytes) -> None:
    # JSONDecodeError is a ValueError too: one exception type for every bad line.
    with pytest.raises(ValueError, match=r"record|Expecting value"):
        ReceivedEvent.from_record(line)


ODD_TEXT = ['quote " and \\ backslash', "line\nbreak\ttab\x01", "ünïcødé ✓ 😀", "\u2028", ""]


@pytest.mark.parametrize("text", ODD_TEXT)
def test_the_record_head_is_exactly_meta_as_json(text: str) -> None:
    """record() writes its metadata without building meta(); the two must never differ."""
    doc = {
        "event": {
            "eventId": text,
            "eventType": text or "touch",
            "targetName": f"projects/{text}/devices/{text}",
        }
    }
    for body in [json.dumps(doc).encode(), *(p.read_bytes().strip() for p in payload_files())]:
        for verification in (UNVERIFIED, BOTH):
            event = ReceivedEvent(body, parse_body(body), verification, AT)
            head = event.record().split(b',"body":', 1)[0] + b"}"
            meta = json.dumps(event.meta(), separators=(",", ":"), ensure_ascii=False)
            assert head.decode() == meta


def test_each_record_spells_its_own_receive_time() -> None:
    """Events of one batch share a receive time and its text; any other time, even the same
    instant in another zone, is written as its own meta() gives it."""
    body = payload_files()[0].read_bytes().strip()
    parsed = parse_body(body)
    later = datetime(2026, 11, 26, 4, 5, 7, tzinfo=UTC)
    same_instant = AT.astimezone(timezone(timedelta(hours=2)))
    for at in (AT, AT, later, same_instant, AT):
        event = ReceivedEvent(body, parsed, UNVERIFIED, at)
        record = json.loads(event.record())
        assert record["receivedAt"] == event.meta()["receivedAt"]
        assert datetime.fromisoformat(record["receivedAt"]) == at
    assert json.loads(ReceivedEvent(body, parsed, UNVERIFIED, same_instant).record())[
        "receivedAt"
    ].endswith("+02:00")
