"""After a restart, the in-memory window knows what the file sink stored last."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.dedup import MemoryDedup
from app.dedup_warm import warm
from app.events import parse_body
from app.received import ReceivedEvent
from app.samples import sample_body
from app.settings import Settings
from app.signature import UNVERIFIED
from app.signing import sign_secret
from tests.conftest import serve_app

SECRET = "warm-secret"


def settings(path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "verify_mode": "secret",
        "signature_secrets": [SECRET],
        "sinks": ["file"],
        "file_path": path,
    }
    return Settings(**(values | overrides))


async def post_all(s: Settings, bodies: list[bytes]) -> list[str]:
    async with serve_app(s) as (_, client):
        answers = []
        for body in bodies:
            response = await client.post(
                "/events", content=body, headers={"X-Dt-Signature": sign_secret(body, SECRET)}
            )
            assert response.status_code == 200
            answers.append(response.json()["status"])
        return answers


def record(event_id: str, received: datetime) -> bytes:
    doc = json.loads(sample_body("touch"))
    doc["event"]["eventId"] = event_id
    body = json.dumps(doc, separators=(",", ":")).encode()
    return ReceivedEvent(body, parse_body(body), UNVERIFIED, received).record() + b"\n"


@pytest.mark.anyio
async def test_an_event_stored_before_a_restart_is_a_duplicate_after_it(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first, second = sample_body("temperature"), sample_body("co2")
    assert await post_all(settings(path), [first]) == ["accepted"]
    assert await post_all(settings(path), [first, second]) == ["duplicate", "accepted"]
    assert len(path.read_bytes().splitlines()) == 2


@pytest.mark.anyio
async def test_with_the_warm_start_off_a_restart_forgets(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    body = sample_body("touch")
    await post_all(settings(path), [body])
    assert await post_all(settings(path, dedup_warm_bytes=0), [body]) == ["accepted"]


def test_rotated_files_are_read_oldest_first_within_the_byte_budget(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    now = datetime.now(UTC)
    (tmp_path / "events-20261126T010000.000000Z.jsonl").write_bytes(
        record("c0000000000000000001", now - timedelta(hours=2))
        + record("c0000000000000000002", now - timedelta(hours=1))
    )
    newest = record("c0000000000000000003", now)
    path.write_bytes(newest)
    dedup = MemoryDedup(window=3600 * 13, max_entries=100)
    assert warm(dedup, path, max_bytes=10**6) == 3
    assert len(dedup) == 3

    # A budget just over the newest line: the line cut by it and everything older is left.
    small = MemoryDedup(window=3600 * 13, max_entries=100)
    assert warm(small, path, max_bytes=len(newest) + 10) == 1


@pytest.mark.anyio
async def test_only_ids_within_the_window_are_remembered(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    now = datetime.now(UTC)
    path.write_bytes(
        record("c0000000000000000001", now - timedelta(hours=20))
        + b"not a record\n"
        + b'{"eventId":null,"eventType":null,"receivedAt":"2026-11-26T00:00:00Z"}\n'
        + record("c0000000000000000002", now - timedelta(minutes=5))
    )
    dedup = MemoryDedup(window=3600 * 13, max_entries=100)
    assert warm(dedup, path, max_bytes=10**6) == 1
    assert not await dedup.claim("c0000000000000000002")  # known: a duplicate
    assert await dedup.claim("c0000000000000000001")  # too old to matter


def test_no_file_yet_is_nothing_to_warm(tmp_path: Path) -> None:
    dedup = MemoryDedup(window=60, max_entries=10)
    assert warm(dedup, tmp_path / "events.jsonl", max_bytes=10**6) == 0


def test_a_device_at_the_path_is_not_read(tmp_path: Path) -> None:
    """/dev/full reads as endless zeros: the warm start must not try to read it."""
    path = tmp_path / "events.jsonl"
    path.symlink_to("/dev/full")
    dedup = MemoryDedup(window=60, max_entries=10)
    assert warm(dedup, path, max_bytes=10**6) == 0
