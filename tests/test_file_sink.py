"""The file sink: whole JSON lines, on disk before send returns, through crashes and rotation."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.events import parse_body
from app.received import ReceivedEvent
from app.settings import Settings
from app.signature import SchemePass, Verification
from app.sinks.base import Sink, SinkError
from app.sinks.file import TAIL_CHUNK, FileSink

pytestmark = pytest.mark.anyio

RECEIVED_AT = datetime(2026, 11, 26, 1, 2, 3, 123456, tzinfo=UTC)
SIGNED = Verification((SchemePass("secret", "secret #1"),))
ROTATED = re.compile(r"events-\d{8}T\d{6}\.\d{6}Z\.jsonl")


def touch_body(i: int) -> bytes:
    """A DT touch event as DT sends it: compact JSON, a distinct eventId per ``i``."""
    doc = {
        "event": {
            "eventId": f"c82gg9catj3vmh{i:06d}",
            "targetName": "projects/p1/devices/d1",
            "eventType": "touch",
            "data": {"touch": {"updateTime": "2022-02-10T12:42:13.313949Z"}},
            "timestamp": "2022-02-10T12:42:13.313949Z",
        },
        "labels": {"name": "Fridge 3"},
        "metadata": {
            "deviceId": "d1",
            "projectId": "p1",
            "deviceType": "touch",
            "productNumber": "102058",
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def event(i: int) -> ReceivedEvent:
    body = touch_body(i)
    return ReceivedEvent(body, parse_body(body), SIGNED, RECEIVED_AT)


def event_id(i: int) -> str:
    return f"c82gg9catj3vmh{i:06d}"


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of the file parsed; fails on a line that is not one whole JSON object."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def rotated_beside(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p != path)


def ids(path: Path) -> list[str]:
    return [r["eventId"] for r in records(path)]


async def send_all(sink: FileSink, numbers: Iterable[int]) -> None:
    await asyncio.gather(*(sink.send(event(i)) for i in numbers))


@asynccontextmanager
async def opened(path: Path, *, fsync: bool = True, max_bytes: int = 0) -> AsyncIterator[FileSink]:
    sink = FileSink(path, fsync=fsync, max_bytes=max_bytes)
    await sink.connect()
    try:
        yield sink
    finally:
        await sink.close()


def test_from_settings_builds_without_touching_the_disk(tmp_path: Path) -> None:
    """Building the sink from settings only reads them; the directory appears on connect."""
    path = tmp_path / "data" / "events.jsonl"
    sink = FileSink.from_settings(Settings(file_path=path, file_fsync=False, file_max_bytes=1234))
    assert isinstance(sink, Sink)
    assert (sink.name, sink.path, sink.fsync, sink.max_bytes) == ("file", path, False, 1234)
    assert not path.parent.exists()


async def test_line_holds_meta_and_the_exact_body(tmp_path: Path) -> None:
    """Each event is one JSON line with its metadata and DT's body byte for byte."""
    path = tmp_path / "data" / "events.jsonl"
    async with opened(path) as sink:
        await sink.send(event(1))
    (record,) = records(path)
    assert record["eventId"] == event_id(1)
    assert record["eventType"] == "touch"
    assert record["receivedAt"] == "2026-11-26T01:02:03.123456Z"
    assert record["verified"] is True
    assert record["body"] == json.loads(touch_body(1))
    assert touch_body(1) in path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("fsync", [True, False])
async def test_concurrent_sends_are_group_committed(tmp_path: Path, fsync: bool) -> None:
    """500 concurrent sends give 500 whole lines, written in far fewer batches."""
    path = tmp_path / "events.jsonl"
    async with opened(path, fsync=fsync) as sink:
        await send_all(sink, range(500))
        batches = sink.batches
    assert sorted(ids(path)) == sorted(event_id(i) for i in range(500))
    assert 1 <= batches < 10


async def test_restart_appends_to_the_existing_file(tmp_path: Path) -> None:
    """A new sink on the same path keeps the old lines and appends after them."""
    path = tmp_path / "events.jsonl"
    async with opened(path) as sink:
        await send_all(sink, range(3))
    before = path.read_bytes()
    async with opened(path) as sink:
        await send_all(sink, range(3, 5))
    assert path.read_bytes().startswith(before)
    assert ids(path) == [event_id(i) for i in range(5)]


def torn_records(path: Path) -> list[dict[str, Any]]:
    torn = path.with_name(path.name + ".torn")
    return [json.loads(line) for line in torn.read_bytes().splitlines()]


async def test_torn_last_line_is_moved_out_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a crash mid-line, opening moves the torn bytes to events.jsonl.torn (with their
    offset and the time) and the file ends at its last whole line, with a warning."""
    path = tmp_path / "events.jsonl"
    whole = event(0).record() + b"\n"
    torn = event(1).record()[:40]
    path.write_bytes(whole + torn)
    with caplog.at_level(logging.WARNING, logger="dcon.sinks.file"):
        async with opened(path) as sink:
            assert path.read_bytes() == whole
            await sink.send(event(2))
    assert ids(path) == [event_id(0), event_id(2)]
    (moved,) = torn_records(path)
    assert (moved["file"], moved["offset"], moved["bytes"]) == (str(path), len(whole), 40)
    assert base64.b64decode(moved["tail"]) == torn
    assert moved["text"] == torn.decode()
    assert datetime.fromisoformat(moved["movedAt"]).tzinfo is not None
    assert str(path) in caplog.text
    assert f"40 bytes from offset {len(whole)}" in caplog.text


async def test_torn_tails_accumulate_and_nothing_is_deleted(tmp_path: Path) -> None:
    """A file that is all one torn line empties; a later tear adds a second record, and a
    tail longer than one read back is found whole."""
    path = tmp_path / "events.jsonl"
    first = b'{"eventId":"half'
    path.write_bytes(first)
    async with opened(path, fsync=False):
        assert path.read_bytes() == b""
    second = b"x" * (3 * TAIL_CHUNK + 5)
    path.write_bytes(event(0).record() + b"\n" + second)
    async with opened(path, fsync=False):
        pass
    assert ids(path) == [event_id(0)]
    records_ = torn_records(path)
    assert [base64.b64decode(r["tail"]) for r in records_] == [first, second]
    assert [r["offset"] for r in records_] == [0, len(event(0).record()) + 1]


async def test_a_file_ending_with_a_whole_line_is_left_alone(tmp_path: Path) -> None:
    """No tear, no .torn file, not one byte changed."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(event(0).record() + b"\n")
    async with opened(path):
        pass
    assert ids(path) == [event_id(0)]
    assert not path.with_name("events.jsonl.torn").exists()


async def test_a_tear_by_another_process_gets_the_next_line_started_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Torn bytes appended by another writer while this one is open stay, and the next
    event starts on a line of its own (the next open moves them out)."""
    path = tmp_path / "events.jsonl"
    whole = event(0).record() + b"\n"
    torn = event(1).record()[:40]
    with caplog.at_level(logging.WARNING, logger="dcon.sinks.file"):
        async with opened(path) as sink:
            await sink.send(event(0))
            with path.open("ab") as other:
                other.write(torn)
            await sink.send(event(2))
    assert path.read_bytes() == whole + torn + b"\n" + event(2).record() + b"\n"
    assert f"fresh line at byte {len(whole + torn)}" in caplog.text


async def test_rotation_keeps_every_line_exactly_once(tmp_path: Path) -> None:
    """Rotating by size gives timestamped files that together hold every line once, in order."""
    path = tmp_path / "events.jsonl"
    line = len(event(0).record()) + 1
    max_bytes = 7 * line
    async with opened(path, max_bytes=max_bytes) as sink:
        for start in range(0, 60, 3):
            await send_all(sink, range(start, start + 3))
    rotated = rotated_beside(path)
    assert len(rotated) >= 5
    assert all(ROTATED.fullmatch(p.name) for p in rotated)
    files = [*rotated, path]
    assert [i for f in files for i in ids(f)] == [event_id(i) for i in range(60)]
    assert all(0 < f.stat().st_size <= max_bytes for f in files)


async def test_a_batch_larger_than_max_bytes_is_never_split(tmp_path: Path) -> None:
    """A batch that alone exceeds max_bytes goes whole into one file."""
    path = tmp_path / "events.jsonl"
    async with opened(path, max_bytes=100) as sink:
        await send_all(sink, range(5))
        await send_all(sink, range(5, 10))
    rotated = rotated_beside(path)
    assert len(rotated) == 1
    assert ids(rotated[0]) == [event_id(i) for i in range(5)]
    assert ids(path) == [event_id(i) for i in range(5, 10)]


async def test_unusable_directory_fails_connect(tmp_path: Path) -> None:
    """A path whose parent is a regular file cannot be opened: connect raises SinkError."""
    (tmp_path / "not-a-dir").write_text("x")
    sink = FileSink(tmp_path / "not-a-dir" / "events.jsonl", fsync=True, max_bytes=0)
    with pytest.raises(SinkError) as caught:
        await sink.connect()
    assert caught.value.sink == "file"


async def test_full_disk_fails_every_send_in_the_batch() -> None:
    """A write that fails (ENOSPC) fails every caller of the batch, never a false success."""
    async with opened(Path("/dev/full"), fsync=False) as sink:
        results = await asyncio.gather(
            *(sink.send(event(i)) for i in range(5)), return_exceptions=True
        )
    assert all(isinstance(r, SinkError) for r in results)
    assert all("No space left" in str(r) for r in results)


async def test_short_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the OS writes only part of a batch, the rest follows and the lines stay whole."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    path = tmp_path / "events.jsonl"
    async with opened(path) as sink:
        await send_all(sink, range(20))
    assert ids(path) == [event_id(i) for i in range(20)]


async def test_write_failing_midway_is_cut_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that dies half-way (disk full) fails its callers and leaves no part of a line."""
    real_write = os.write
    calls = 0

    def write_then_fail(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[:30]))
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "events.jsonl"
    async with opened(path) as sink:
        await sink.send(event(0))
        monkeypatch.setattr(os, "write", write_then_fail)
        with pytest.raises(SinkError):
            await sink.send(event(1))
        monkeypatch.undo()
        await sink.send(event(2))
    assert path.read_bytes() == event(0).record() + b"\n" + event(2).record() + b"\n"


async def test_close_completes_sends_already_made(tmp_path: Path) -> None:
    """close() lets every send already in flight finish and succeed."""
    path = tmp_path / "events.jsonl"
    sink = FileSink(path, fsync=True, max_bytes=0)
    await sink.connect()
    sends = [asyncio.ensure_future(sink.send(event(i))) for i in range(50)]
    await asyncio.sleep(0)  # one loop turn: every send queues its line
    await sink.close()
    await asyncio.gather(*sends)
    assert sorted(ids(path)) == sorted(event_id(i) for i in range(50))


async def test_send_after_close_fails(tmp_path: Path) -> None:
    """A closed sink refuses events with SinkError instead of dropping them."""
    async with opened(tmp_path / "events.jsonl") as sink:
        pass
    with pytest.raises(SinkError, match="closed"):
        await sink.send(event(1))


async def test_send_before_connect_fails(tmp_path: Path) -> None:
    """A sink that was never connected refuses events with SinkError."""
    sink = FileSink(tmp_path / "events.jsonl", fsync=True, max_bytes=0)
    with pytest.raises(SinkError, match="not open"):
        await sink.send(event(1))


async def test_cancelled_sends_leave_only_whole_lines(tmp_path: Path) -> None:
    """Sends cancelled before or during their write never leave a torn or doubled line."""
    path = tmp_path / "events.jsonl"
    async with opened(path) as sink:
        sends = [asyncio.ensure_future(sink.send(event(i))) for i in range(200)]
        await asyncio.sleep(0)  # every send has queued its line; the writer has not run
        for i in range(1, 200, 2):
            sends[i].cancel()
        await asyncio.sleep(0)  # the writer has taken the batch and is writing it
        for i in range(0, 200, 4):
            sends[i].cancel()
        await asyncio.gather(*sends, return_exceptions=True)
        await sink.send(event(1000))
    written = ids(path)
    kept = {event_id(i) for i in range(2, 200, 4)}
    assert len(written) == len(set(written))
    assert kept <= set(written) <= {event_id(i) for i in [*range(200), 1000]}
    assert written[-1] == event_id(1000)


async def test_ping_passes_while_the_file_is_open(tmp_path: Path) -> None:
    """ping() succeeds on an open file in a writable directory."""
    async with opened(tmp_path / "events.jsonl") as sink:
        await sink.ping()


async def test_ping_fails_when_not_open(tmp_path: Path) -> None:
    """ping() raises SinkError before connect and after close."""
    sink = FileSink(tmp_path / "events.jsonl", fsync=True, max_bytes=0)
    with pytest.raises(SinkError):
        await sink.ping()
    await sink.connect()
    await sink.close()
    with pytest.raises(SinkError):
        await sink.ping()


async def test_ping_fails_when_the_file_is_removed(tmp_path: Path) -> None:
    """ping() raises SinkError when the file was deleted under the sink (events would vanish)."""
    path = tmp_path / "events.jsonl"
    async with opened(path) as sink:
        path.unlink()
        with pytest.raises(SinkError, match="replaced or removed"):
            await sink.ping()
