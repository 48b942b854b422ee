"""Spool mode: 200 once the event is fsynced locally, then forwarded to the sinks in order,
through sink outages, restarts, a full spool, refusals and torn lines."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.received import ReceivedEvent
from app.samples import sample_body
from app.settings import Settings
from app.signing import sign_secret
from app.sinks import PermanentSinkError, SinkError
from app.sinks.memory import QueueSink
from app.spool import Spool
from tests.conftest import serve_app
from tests.tcp_proxy import TcpProxy
from tests.test_metrics import samples

pytestmark = pytest.mark.anyio

SECRET = "spool-secret"


class SwitchSink(QueueSink):
    """A queue sink that can be down, and that refuses some eventIds for good."""

    def __init__(self, name: str = "switch", *, down: bool = False) -> None:
        super().__init__()
        self.name = name
        self.down = down
        self.refused: set[str] = set()
        self.connect_failures = 0

    async def connect(self) -> None:
        if self.connect_failures:
            self.connect_failures -= 1
            raise SinkError(self.name, "connection refused")
        await super().connect()

    async def send(self, event: ReceivedEvent) -> None:
        if self.down:
            raise SinkError(self.name, "broker unreachable")
        if event.event_id in self.refused:
            raise PermanentSinkError(self.name, "message larger than the broker allows")
        await super().send(event)

    def ids(self) -> list[str | None]:
        return [event.event_id for event in self.queue._queue]  # type: ignore[attr-defined]


def settings(directory: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "verify_mode": "secret",
        "signature_secrets": [SECRET],
        "spool": True,
        "spool_dir": directory,
        "spool_retry_max": 0.05,
    }
    return Settings(**(base | overrides))


async def post(client: httpx.AsyncClient, body: bytes) -> httpx.Response:
    headers = {"X-Dt-Signature": sign_secret(body, SECRET)}
    return await client.post("/events", content=body, headers=headers)


async def post_new(client: httpx.AsyncClient, count: int) -> list[str]:
    """Post ``count`` fresh events, each answered 200; their eventIds in order."""
    ids = []
    for _ in range(count):
        body = sample_body("temperature")
        response = await post(client, body)
        assert response.status_code == 200, response.text
        ids.append(json.loads(body)["event"]["eventId"])
    return ids


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for the background forwarder; a generous deadline, not a timing assertion."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still not {what}")


def spool_of(app: FastAPI) -> Spool:
    spool: Spool = app.state.spool
    return spool


def drained(app: FastAPI) -> Callable[[], bool]:
    return lambda: spool_of(app).pending_bytes == 0


def rotated(directory: Path) -> list[Path]:
    return sorted(directory.glob("spool-*.jsonl"))


def dead_letters(directory: Path) -> list[bytes]:
    path = directory / "dead-letter.jsonl"
    return path.read_bytes().splitlines() if path.exists() else []


async def test_answers_200_only_once_the_line_is_fsynced_in_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the 200 arrives, the spool file was fsynced while holding the event's line."""
    synced: list[bytes] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("spool.jsonl"):
            synced.append(os.pread(fd, 1 << 20, 0))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sink = SwitchSink(down=True)  # nothing leaves the spool: only the append is seen
    async with serve_app(settings(tmp_path), [sink]) as (_, client):
        [event_id] = await post_new(client, 1)
        assert any(event_id.encode() in content for content in synced)


async def test_spooled_events_reach_every_sink_byte_for_byte_in_order(tmp_path: Path) -> None:
    first, second = SwitchSink("first"), SwitchSink("second")
    async with serve_app(settings(tmp_path), [first, second]) as (app, client):
        bodies = [sample_body("temperature") for _ in range(5)]
        for body in bodies:
            assert (await post(client, body)).json()["status"] == "accepted"
        await until(lambda: first.queue.qsize() == second.queue.qsize() == 5, "forwarded")
        await until(drained(app), "drained")
    assert [event.body for event in first.queue._queue] == bodies  # type: ignore[attr-defined]
    assert [event.verified for event in second.queue._queue] == [True] * 5  # type: ignore[attr-defined]


async def test_a_sink_outage_grows_the_backlog_and_it_drains_in_order(tmp_path: Path) -> None:
    """DT keeps getting 200s while the sink is down; once it is back it gets every event
    once, in the order they arrived."""
    sink = SwitchSink(down=True)
    async with serve_app(settings(tmp_path, spool_concurrency=4), [sink]) as (app, client):
        ids = await post_new(client, 20)
        await until(lambda: spool_of(app).forwarder.failing, "failing")
        assert spool_of(app).pending_bytes > 0
        assert sink.queue.empty()
        sink.down = False
        await until(drained(app), "drained")
        ids += await post_new(client, 3)
        await until(lambda: sink.queue.qsize() == 23, "forwarded")
    assert sink.ids() == ids


async def test_a_restart_resumes_from_the_saved_position(tmp_path: Path) -> None:
    """Forwarded events are not sent again after a restart; the backlog is, once."""
    before = SwitchSink()
    async with serve_app(settings(tmp_path), [before]) as (app, client):
        forwarded = await post_new(client, 3)
        await until(drained(app), "drained")
        before.down = True
        waiting = await post_new(client, 4)
    assert before.ids() == forwarded
    assert json.loads((tmp_path / "forwarded.json").read_text())["offset"] > 0

    after = SwitchSink()
    async with serve_app(settings(tmp_path), [after]) as (app, client):
        await until(drained(app), "drained")
        await until(lambda: after.queue.qsize() == 4, "forwarded")
    assert after.ids() == waiting


async def test_forwarded_spool_files_are_deleted_and_order_holds_across_them(
    tmp_path: Path,
) -> None:
    sink = SwitchSink(down=True)
    s = settings(tmp_path, spool_segment_bytes=4096)
    async with serve_app(s, [sink]) as (app, client):
        ids = await post_new(client, 30)
        assert len(rotated(tmp_path)) >= 3
        sink.down = False
        await until(drained(app), "drained")
        await until(lambda: not rotated(tmp_path), "deleted")
    assert sink.ids() == ids
    assert (tmp_path / "spool.jsonl").exists()


async def test_a_full_spool_answers_503_spool_full_until_it_drains(tmp_path: Path) -> None:
    sink = SwitchSink(down=True)
    s = settings(tmp_path, spool_max_bytes=4096, retry_after=17)
    async with serve_app(s, [sink]) as (app, client):
        accepted = 0
        while (response := await post(client, sample_body("temperature"))).status_code == 200:
            accepted += 1
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "17"
        assert response.json()["error"] == "spool_full"
        assert "DCON_SPOOL_MAX_BYTES" in response.json()["detail"]
        assert accepted >= 1
        assert spool_of(app).pending_bytes <= 4096
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert "full" in ready.json()["failing"]["spool"]

        sink.down = False
        await until(drained(app), "drained")
        assert (await post(client, sample_body("temperature"))).status_code == 200
        # Answered once spooled; forwarded by the forwarder after that.
        await until(drained(app), "drained")
    assert sink.queue.qsize() == accepted + 1


async def test_an_event_a_sink_refuses_for_good_goes_to_the_dead_letter_file(
    tmp_path: Path,
) -> None:
    """With the reason; the sink that took it is not sent it again; the next events flow."""
    refusing, taking = SwitchSink("refusing"), SwitchSink("taking")
    big = sample_body("temperature")
    refusing.refused.add(json.loads(big)["event"]["eventId"])
    async with serve_app(settings(tmp_path), [refusing, taking]) as (app, client):
        assert (await post(client, big)).status_code == 200
        after = await post_new(client, 2)
        await until(drained(app), "drained")
    [line] = dead_letters(tmp_path)
    assert ReceivedEvent.from_record(line).body == big
    note = json.loads(line)["deadLetter"]
    assert note["sink"] == "refusing"
    assert "larger than the broker allows" in note["reason"]
    assert refusing.ids() == after
    assert taking.ids() == [json.loads(big)["event"]["eventId"], *after]


def write_record(path: Path, body: bytes) -> None:
    event = ReceivedEvent.from_record(
        b'{"receivedAt":"2026-01-02T03:04:05Z","verification":"secret","body":' + body + b"}"
    )
    with path.open("ab") as file:
        file.write(event.record() + b"\n")


async def test_torn_lines_are_dead_lettered_and_logged_and_the_rest_forwarded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A torn line mid-file (its writer died; the next batch began on a fresh line) and a
    torn last line in a spool file: each is kept raw in the dead-letter file."""
    segment = tmp_path / "spool-20260102T030405.000000Z.jsonl"
    bodies = [sample_body("touch") for _ in range(3)]
    write_record(segment, bodies[0])
    with segment.open("ab") as file:
        file.write(b'{"eventId":"c82gg9catj3vmh\n')
    write_record(segment, bodies[1])
    with segment.open("ab") as file:
        file.write(b'{"eventId":"c82gg9catj3vm')
    sink = SwitchSink()
    with caplog.at_level(logging.ERROR, logger="dcon.spool"):
        async with serve_app(settings(tmp_path), [sink]) as (app, client):
            assert (await post(client, bodies[2])).status_code == 200
            await until(lambda: sink.queue.qsize() == 3, "forwarded")
            await until(drained(app), "drained")
    assert [event.body for event in sink.queue._queue] == bodies  # type: ignore[attr-defined]
    notes = [json.loads(line) for line in dead_letters(tmp_path)]
    assert [base64.b64decode(n["rawBase64"]) for n in notes] == [
        b'{"eventId":"c82gg9catj3vmh',
        b'{"eventId":"c82gg9catj3vm',
    ]
    assert [n["deadLetter"]["sink"] for n in notes] == ["spool", "spool"]
    assert "torn line" in notes[1]["deadLetter"]["reason"]
    assert sum(segment.name in r.getMessage() for r in caplog.records) == 2
    assert not segment.exists()


async def test_metrics_follow_a_known_sequence(tmp_path: Path) -> None:
    """3 events wait for a sink that is down, one of them is refused once it is back."""
    sink = SwitchSink(down=True)
    async with serve_app(settings(tmp_path), [sink]) as (app, client):
        ids = await post_new(client, 3)
        sink.refused.add(ids[1])
        await until(lambda: spool_of(app).forwarder.failing, "failing")
        waiting = samples((await client.get("/metrics")).text)
        sink.down = False
        await until(drained(app), "drained")
        await until(lambda: spool_of(app).forwarder.lag_seconds() == 0, "caught up")
        done = samples((await client.get("/metrics")).text)
    spooled = (tmp_path / "spool.jsonl").stat().st_size
    assert waiting[("dcon_spool_pending_bytes", ())] == spooled
    assert waiting[("dcon_spool_lag_seconds", ())] > 0
    assert waiting[("dcon_spool_forwarded_total", ())] == 0
    assert waiting[("dcon_sink_failures_total", (("reason", "error"), ("sink", "switch")))] >= 1
    assert done[("dcon_spool_pending_bytes", ())] == 0
    assert done[("dcon_spool_lag_seconds", ())] == 0
    assert done[("dcon_spool_forwarded_total", ())] == 3
    assert done[("dcon_spool_dead_letters_total", (("sink", "switch"),))] == 1
    assert done[("dcon_sink_deliveries_total", (("sink", "switch"),))] == 2


async def test_an_event_id_accepted_before_a_restart_is_a_duplicate_after_it(
    tmp_path: Path,
) -> None:
    body = sample_body("temperature")
    first = SwitchSink()
    async with serve_app(settings(tmp_path), [first]) as (app, client):
        assert (await post(client, body)).json()["status"] == "accepted"
        await until(drained(app), "drained")
    second = SwitchSink()
    async with serve_app(settings(tmp_path), [second]) as (app, client):
        again = await post(client, body)
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert second.queue.empty()
    assert (tmp_path / "dedup.db").exists()


async def test_a_sink_that_cannot_connect_at_start_does_not_stop_the_receiver(
    tmp_path: Path,
) -> None:
    """Events are spooled meanwhile; the forwarder connects it later and delivers."""
    sink = SwitchSink()
    sink.connect_failures = 3
    async with serve_app(settings(tmp_path), [sink]) as (app, client):
        ids = await post_new(client, 2)
        await until(drained(app), "drained")
    assert sink.ids() == ids


async def test_readyz_stays_ready_with_a_sink_down_and_shows_the_backlog(tmp_path: Path) -> None:
    sink = SwitchSink(down=True)
    async with serve_app(settings(tmp_path), [sink]) as (app, client):
        await post_new(client, 2)
        await until(lambda: spool_of(app).forwarder.failing, "failing")
        ready = await client.get("/readyz")
        health = await client.get("/healthz")
    assert ready.status_code == 200
    spool = ready.json()["spool"]
    assert ready.json()["failing"] == {}
    assert spool["pendingBytes"] > 0
    assert spool["failing"] is True
    assert spool["lastError"].startswith("switch:")
    assert health.json()["spool"]["pendingBytes"] == spool["pendingBytes"]


async def test_only_one_of_two_receivers_sharing_a_spool_forwards(tmp_path: Path) -> None:
    """Two workers on one spool directory: both append, one forwards everything once."""
    one, two = SwitchSink("one"), SwitchSink("two")
    async with (
        serve_app(settings(tmp_path), [one]) as (app_one, client_one),
        serve_app(settings(tmp_path), [two]) as (app_two, client_two),
    ):
        ids = await post_new(client_one, 2)
        ids += await post_new(client_two, 2)
        forwarders = [spool_of(app_one).forwarder, spool_of(app_two).forwarder]
        await until(lambda: one.queue.qsize() + two.queue.qsize() == 4, "forwarded")
        assert [f.forwarding for f in forwarders] == [True, False]
    assert one.ids() == ids
    assert two.queue.empty()


async def test_while_a_backlog_lasts_a_log_line_says_how_it_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """How many bytes wait, how old the oldest event is, the last error; a warning while
    a sink fails."""
    monkeypatch.setattr("app.spool.MEASURE_SECONDS", 0.01)
    monkeypatch.setattr("app.spool.REPORT_SECONDS", 0)
    sink = SwitchSink(down=True)

    def reports(pending: int) -> list[logging.LogRecord]:
        said = f"{pending} bytes wait to be forwarded"
        return [r for r in caplog.records if said in r.getMessage()]

    with caplog.at_level(logging.INFO, logger="dcon.spool"):
        async with serve_app(settings(tmp_path), [sink]) as (app, client):
            await post_new(client, 2)
            pending = (tmp_path / "spool.jsonl").stat().st_size
            # A report made before the first attempt has failed is rightly an info line:
            # the warning is owed from the failure on.
            await until(lambda: spool_of(app).forwarder.failing, "failing")
            caplog.clear()
            await until(lambda: bool(reports(pending)), "reported")
    [line, *_] = reports(pending)
    assert line.levelno == logging.WARNING
    assert "the oldest event is" in line.getMessage()
    assert "last error: switch:" in line.getMessage()


async def test_a_real_broker_down_at_start_gets_the_backlog_once_it_is_back(
    tmp_path: Path,
) -> None:
    """Redis unreachable when the receiver starts: it starts anyway, answers 200, and
    forwards everything in order once Redis can be reached."""
    stream = f"spool-test:{tmp_path.name}"
    async with TcpProxy("127.0.0.1", 6379) as proxy:
        await proxy.cut()
        s = settings(
            tmp_path,
            sinks=["redis"],
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            redis_stream=stream,
        )
        async with serve_app(s) as (app, client):
            ids = await post_new(client, 3)
            assert (await client.get("/readyz")).status_code == 200
            await proxy.restore()
            await until(drained(app), "drained")
    redis = Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    try:
        stored: Any = await redis.xrange(stream)
        await redis.delete(stream)
    finally:
        await redis.aclose()
    assert [fields["eventId"] for _, fields in stored] == ids
