"""`replay` gives the events of spool, dead-letter and file-sink files back to the sinks, or
to another receiver signed afresh, and reports every line it could not use."""

from __future__ import annotations

import importlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from app.cli import main
from app.events import parse_body
from app.received import ReceivedEvent
from app.samples import sample_body
from app.signature import SchemePass, Verification
from tests.test_cli_send import SECRET, secret_receiver, summary
from tests.test_serve import free_port

AT = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SECRET_PASS = Verification((SchemePass("secret", "secret #1"),))


def event(kind: str = "temperature", at: datetime = AT) -> ReceivedEvent:
    body = sample_body(kind)
    return ReceivedEvent(body, parse_body(body), SECRET_PASS, at)


def write(path: Path, *lines: bytes | ReceivedEvent) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = (line.record() if isinstance(line, ReceivedEvent) else line for line in lines)
    path.write_bytes(b"".join(line + b"\n" for line in raw))
    return path


def dead_letter(e: ReceivedEvent, sink: str = "redis") -> bytes:
    note = {"sink": sink, "reason": "connection refused", "at": "2026-03-01T12:00:01Z"}
    record = e.record()
    head = json.dumps(note, separators=(",", ":")).encode()
    # The note among the metadata, before the body, as the spool writes it.
    cut = record.index(b',"body":')
    return record[:cut] + b',"deadLetter":' + head + record[cut:]


def replay(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["replay", *map(str, args)], env=env)


def to_file(out: Path) -> dict[str, str]:
    return {"DCON_SINKS": "file", "DCON_FILE_PATH": str(out), "DCON_FILE_FSYNC": "false"}


def stored(out: Path) -> list[ReceivedEvent]:
    return [ReceivedEvent.from_record(line) for line in out.read_bytes().splitlines()]


def as_json(result: Result) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(result.stdout)
    return document


# --- to the configured sinks --------------------------------------------------------------


def test_events_reach_the_file_sink_with_their_bodies_byte_for_byte(tmp_path: Path) -> None:
    events = [event("touch"), event("temperature"), event("co2")]
    source = write(tmp_path / "events-20260301T120000Z.jsonl", *events)
    out = tmp_path / "out" / "events.jsonl"
    result = replay(source, "--concurrency", "1", env=to_file(out))
    assert result.exit_code == 0, result.output
    said = summary(result)
    assert said["delivered"] == "3 to sinks file"
    assert said["failed"] == "0"
    back = stored(out)
    assert [e.body for e in back] == [e.body for e in events]
    assert [e.received_at for e in back] == [AT] * 3
    assert {e.verification.label for e in back} == {"secret"}


def test_a_body_with_line_breaks_comes_back_exact(tmp_path: Path) -> None:
    body = b'{\n "event": {"eventId": "c1", "eventType": "touch",\r\n "data": {}}}'
    multiline = ReceivedEvent(body, parse_body(body), SECRET_PASS, AT)
    out = tmp_path / "out.jsonl"
    result = replay(write(tmp_path / "in.jsonl", multiline), env=to_file(out))
    assert result.exit_code == 0, result.output
    [back] = stored(out)
    assert back.body == body


def test_dead_letter_lines_are_replayed_by_their_body(tmp_path: Path) -> None:
    events = [event("touch"), event("humidity")]
    source = write(tmp_path / "dead-letter.jsonl", *(dead_letter(e) for e in events))
    out = tmp_path / "out.jsonl"
    result = replay(source, env=to_file(out))
    assert result.exit_code == 0, result.output
    assert sorted(e.body for e in stored(out)) == sorted(e.body for e in events)


def test_dead_letters_of_one_sink_can_be_given_back_to_that_sink_only(tmp_path: Path) -> None:
    for_redis, for_nats = event("touch"), event("co2")
    source = write(
        tmp_path / "dead-letter.jsonl",
        dead_letter(for_redis, "redis"),
        dead_letter(for_nats, "nats"),
    )
    out = tmp_path / "out.jsonl"
    result = replay(source, "--dead-letter-sink", "redis", "--json", env=to_file(out))
    assert result.exit_code == 0, result.output
    assert as_json(result)["skippedBy"] == {"not a dead letter of that sink": 1}
    assert [e.body for e in stored(out)] == [for_redis.body]


def test_unreadable_lines_are_named_and_the_rest_still_delivered(tmp_path: Path) -> None:
    good = [event("touch"), event("co2"), event("temperature")]
    torn = good[0].record()[:40]
    unreadable_spool_line = json.dumps(
        {"deadLetter": {"sink": "spool", "reason": "torn line", "at": "2026-03-01T12:00:00Z"},
         "rawBase64": "eyJldmVudElk"}
    ).encode()  # fmt: skip
    source = write(
        tmp_path / "spool.jsonl",
        good[0], torn, good[1], b'{"hello": "world"}', unreadable_spool_line, good[2], b"",
    )  # fmt: skip
    out = tmp_path / "out.jsonl"
    result = replay(source, env=to_file(out))
    assert result.exit_code == 3, result.output
    said = summary(result)
    assert said["unreadable"] == "3"
    assert said["delivered"] == "3 to sinks file"
    assert f"{source}:2: not a JSON line (torn or corrupt)" in result.stdout
    assert f"{source}:4: not an event record" in result.stdout
    assert f"{source}:5: dead letter of an unreadable line, no event in it: torn line" in (
        result.stdout
    )
    assert sorted(e.body for e in stored(out)) == sorted(e.body for e in good)


def test_a_directory_replays_segments_in_order_the_live_spool_last_and_no_dead_letters(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    first, second, live, dead = event("touch"), event("co2"), event("humidity"), event("motion")
    write(spool / "spool.jsonl", live)
    write(spool / "spool-20260301T120500Z.jsonl", second)
    write(spool / "spool-20260301T120000Z.jsonl", first)
    write(spool / "dead-letter.jsonl", dead_letter(dead))
    out = tmp_path / "out.jsonl"
    result = replay(spool, "--concurrency", "1", env=to_file(out))
    assert result.exit_code == 0, result.output
    assert [e.body for e in stored(out)] == [first.body, second.body, live.body]
    assert summary(result)["files"] == "3"


def test_filters_by_type_and_receive_time(tmp_path: Path) -> None:
    early = event("touch", AT - timedelta(hours=2))
    touch, co2, temperature = event("touch"), event("co2"), event("temperature")
    late = event("co2", AT + timedelta(hours=2))
    source = write(tmp_path / "in.jsonl", early, touch, co2, temperature, late)
    out = tmp_path / "out.jsonl"
    result = replay(
        source, "--type", "touch,co2", "--since", "2026-03-01T11:00:00",
        "--until", "2026-03-01T13:00:00+00:00", "--json", env=to_file(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    said = as_json(result)
    assert said["delivered"] == 2
    assert said["skippedBy"] == {"other type": 1, "before --since": 1, "not before --until": 1}
    assert sorted(e.body for e in stored(out)) == sorted([touch.body, co2.body])


def test_events_no_sink_route_takes_are_skipped_not_failed(tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", event("touch"), event("co2"))
    out = tmp_path / "out.jsonl"
    env = {**to_file(out), "DCON_SINKS": "file:co2"}
    result = replay(source, "--json", env=env)
    assert result.exit_code == 0, result.output
    assert as_json(result)["skippedBy"] == {"routed to no sink": 1}
    assert [e.event_type for e in stored(out)] == ["co2"]


def test_a_dry_run_counts_and_stores_nothing(tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", event("touch"), b"{torn", event("co2"))
    out = tmp_path / "out.jsonl"
    result = replay(source, "--dry-run", "--type", "touch", env=to_file(out))
    assert result.exit_code == 3, result.output
    said = summary(result)
    assert said["events"] == "1"
    assert said["dry run"] == "nothing sent; 1 would go to sinks file"
    assert said["skipped"] == "1 (other type x1)"
    assert not out.exists()


def test_failed_events_go_to_the_failed_file_and_a_second_replay_retries_just_those(
    tmp_path: Path,
) -> None:
    """The file sink writes to /dev/full (through a symlink): every write fails."""
    events = [event("touch"), event("co2")]
    source = write(tmp_path / "in.jsonl", *events)
    full = tmp_path / "full.jsonl"
    full.symlink_to("/dev/full")
    failed = tmp_path / "failed.jsonl"
    args = ("--retries", "1", "--backoff", "0", "--failed-to", failed)
    result = replay(source, *args, env=to_file(full))
    assert result.exit_code == 1, result.output
    said = summary(result)
    assert said["failed"] == "2 (file x2)"
    assert said["attempts"] == "4"
    assert "No space left on device" in result.stdout
    notes = [json.loads(line)["deadLetter"] for line in failed.read_bytes().splitlines()]
    assert [n["sink"] for n in notes] == ["file"] * 2
    assert all("No space left on device" in n["reason"] for n in notes)

    out = tmp_path / "out.jsonl"
    again = replay(failed, "--dead-letter-sink", "file", env=to_file(out))
    assert again.exit_code == 0, again.output
    assert sorted(e.body for e in stored(out)) == sorted(e.body for e in events)
    assert {e.received_at for e in stored(out)} == {AT}


def test_the_failed_file_cannot_be_one_being_read(tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", event())
    result = replay(source, "--failed-to", source, env=to_file(tmp_path / "out.jsonl"))
    assert result.exit_code == 2
    assert "is also being read" in result.output


def test_settings_that_cannot_replay_are_refused_with_exit_2(tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", event())
    queue = replay(source, "--sinks", "queue")
    assert queue.exit_code == 2
    assert "queue sink lives inside one process" in queue.output
    unknown = replay(source, "--sinks", "pigeon")
    assert unknown.exit_code == 2
    assert "unknown sink 'pigeon'" in unknown.output


def test_a_sink_that_cannot_connect_stops_the_replay_before_any_event(tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", event())
    env = {"DCON_SINKS": "redis", "DCON_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = replay(source, env=env)
    assert result.exit_code == 2
    assert "sink redis cannot connect" in result.output


def test_progress_lines_go_to_stderr_when_it_is_not_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The package's `replay` attribute is the command; the module is imported by name.
    monkeypatch.setattr(importlib.import_module("app.cli.replay"), "PROGRESS_EVERY", 0.0)
    source = write(tmp_path / "in.jsonl", event(), event())
    result = replay(source, "--json", env=to_file(tmp_path / "out.jsonl"))
    assert result.exit_code == 0, result.output
    assert "replay: 2 lines done, 2 delivered" in result.stderr
    assert as_json(result)["delivered"] == 2  # stdout holds the summary only


# --- to Redis ------------------------------------------------------------------------------


@pytest.fixture
def stream() -> Iterator[str]:
    name = f"test:replay:{uuid.uuid4().hex}"
    yield name
    client = redis.Redis(host="127.0.0.1", port=6379)
    client.delete(name)
    client.close()


def test_events_reach_a_redis_stream_with_their_bodies(tmp_path: Path, stream: str) -> None:
    events = [event("touch"), event("temperature")]
    source = write(tmp_path / "in.jsonl", *events)
    env = {"DCON_REDIS_URL": "redis://127.0.0.1:6379/0", "DCON_REDIS_STREAM": stream}
    result = replay(source, "--sinks", "redis", "--concurrency", "1", env=env)
    assert result.exit_code == 0, result.output
    client = redis.Redis(host="127.0.0.1", port=6379)
    entries = client.xrange(stream) or []
    client.close()
    assert [(fields or {}).get(b"body") for _, fields in entries] == [e.body for e in events]


# --- to another receiver -------------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real `dcon-receiver serve` over HTTPS: (events URL, CA file)."""
    with secret_receiver(tmp_path) as found:
        yield found


@pytest.mark.slow
def test_to_another_receiver_stores_each_event_once_and_repeats_are_duplicates(
    receiver: tuple[str, str], tmp_path: Path
) -> None:
    url, ca = receiver
    target_file = tmp_path / "data" / "events.jsonl"  # the receiver's file sink
    events = [event(kind) for kind in ("touch", "co2", "temperature", "humidity", "motion")]
    source = write(tmp_path / "spool" / "spool.jsonl", *events)
    args = ("--to", url, "--cacert", ca, "--secret", SECRET, "--concurrency", "3", "--json")
    first = replay(source, *args)
    assert first.exit_code == 0, first.output
    assert as_json(first)["delivered"] == 5
    assert as_json(first)["target"] == url
    again = replay(source, *args)
    assert again.exit_code == 0, again.output
    assert (as_json(again)["delivered"], as_json(again)["duplicates"]) == (0, 5)
    there = stored(target_file)
    assert sorted(e.body for e in there) == sorted(e.body for e in events)


@pytest.mark.slow
def test_a_wrong_secret_fails_every_event_and_exits_1(
    receiver: tuple[str, str], tmp_path: Path
) -> None:
    url, ca = receiver
    target_file = tmp_path / "data" / "events.jsonl"  # the receiver's file sink
    source = write(tmp_path / "in.jsonl", event("touch"), event("co2"))
    failed = tmp_path / "failed.jsonl"
    result = replay(
        source, "--to", url, "--cacert", ca, "--secret", "not-the-secret",
        "--retries", "1", "--backoff", "0", "--failed-to", failed,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    said = summary(result)
    assert said["failed"] == "2 (401 x2)"
    assert said["attempts"] == "4"
    assert "invalid_signature" in result.stdout
    notes = [json.loads(line)["deadLetter"] for line in failed.read_bytes().splitlines()]
    assert [n["sink"] for n in notes] == [url, url]
    assert all(n["reason"].startswith("401 ") for n in notes)
    assert not target_file.exists() or not target_file.read_bytes()


def test_an_unreachable_receiver_is_retried_then_counted_as_failed(tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", event())
    url = f"http://127.0.0.1:{free_port()}/events"
    result = replay(source, "--to", url, "--secret", SECRET, "--retries", "2", "--backoff", "0")
    assert result.exit_code == 1
    said = summary(result)
    assert said["failed"] == "1 (ConnectError x1)"
    assert said["attempts"] == "3"


def test_options_of_the_other_mode_are_usage_errors(tmp_path: Path) -> None:
    source = write(tmp_path / "in.jsonl", event())
    assert replay(source, "--secret", SECRET).exit_code == 2
    assert replay(source, "--to", "https://example.test/events", "--sinks", "file").exit_code == 2
    assert replay(source, "--to", "ftp://example.test/").exit_code == 2
