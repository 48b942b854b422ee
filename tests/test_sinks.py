"""The small sinks and the registry that finds sinks by name, including plug-ins."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.events import parse_body
from app.received import ReceivedEvent
from app.samples import sample_body
from app.settings import Settings
from app.signature import UNVERIFIED
from app.sinks import BUILTIN, SinkConfigError, SinkError, build_sinks
from app.sinks.log import LogSink
from app.sinks.memory import QueueSink


def received(body: bytes) -> ReceivedEvent:
    return ReceivedEvent(body, parse_body(body), UNVERIFIED, datetime.now(UTC))


@pytest.mark.anyio
async def test_log_sink_writes_one_json_line_per_event() -> None:
    stream = io.BytesIO()
    sink = LogSink(stream)
    await sink.connect()
    bodies = [sample_body("touch"), sample_body("co2")]
    for body in bodies:
        await sink.send(received(body))
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["body"] for line in lines] == [json.loads(b) for b in bodies]
    assert json.loads(lines[1])["eventType"] == "co2"
    await sink.close()
    with pytest.raises(SinkError):
        await sink.send(received(bodies[0]))


@pytest.mark.anyio
async def test_full_queue_refuses_rather_than_drops() -> None:
    sink = QueueSink(maxsize=1)
    await sink.connect()
    await sink.send(received(sample_body()))
    with pytest.raises(SinkError, match="full"):
        await sink.send(received(sample_body()))
    assert sink.queue.qsize() == 1


def test_body_with_line_breaks_stays_on_one_line_and_loses_nothing() -> None:
    """Pretty-printed JSON is legal; the record keeps it parsed plus its exact bytes."""
    body = json.dumps(json.loads(sample_body("touch")), indent=2).encode()
    record = received(body).record()
    assert b"\n" not in record
    line = json.loads(record)
    assert line["body"] == json.loads(body)
    assert base64.b64decode(line["bodyBase64"]) == body


def test_compact_body_is_stored_byte_for_byte() -> None:
    body = sample_body("temperature")
    record = received(body).record()
    assert record.endswith(b',"body":' + body + b"}")


def test_missing_driver_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BUILTIN, "ghost", ("app.sinks.ghost_driver:GhostSink", "ghost"))
    with pytest.raises(SinkConfigError, match=r'pip install "dcon-receiver\[ghost\]"'):
        build_sinks(Settings(sinks=["ghost"]))


def test_third_party_sink_plugs_in_through_an_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package declaring a `dcon_receiver.sinks` entry point is found by name."""
    (tmp_path / "acme_sink.py").write_text(
        textwrap.dedent(
            """
            from app.sinks.memory import QueueSink

            class AcmeSink(QueueSink):
                name = "acme"
            """
        )
    )
    dist = tmp_path / "acme_sink-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-sink\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dcon_receiver.sinks]\nacme = acme_sink:AcmeSink\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [sink] = build_sinks(Settings(sinks=["acme"]))
    assert sink.name == "acme"


def test_object_that_is_not_a_sink_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BUILTIN, "broken", ("app.settings:Settings", None))
    with pytest.raises(SinkConfigError, match="Sink interface"):
        build_sinks(Settings(sinks=["broken"]))


class CountingStream(io.BytesIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.mark.anyio
async def test_log_sink_shares_one_flush_among_concurrent_events() -> None:
    """50 events at once: 50 whole lines, far fewer flushes, every send after its flush."""
    stream = CountingStream()
    sink = LogSink(stream)
    await sink.connect()
    await asyncio.gather(*(sink.send(received(sample_body())) for _ in range(50)))
    assert len(stream.getvalue().splitlines()) == 50
    assert 1 <= stream.flushes < 5


@pytest.mark.anyio
async def test_a_log_sink_caller_giving_up_leaves_the_others_their_flush() -> None:
    """Three events in one turn, the second's caller cancelled before the flush: the other
    two still return once flushed, and all three lines are written."""
    stream = CountingStream()
    sink = LogSink(stream)
    await sink.connect()
    sends = [asyncio.ensure_future(sink.send(received(sample_body()))) for _ in range(3)]
    await asyncio.sleep(0)  # each has written its line and waits for the turn's flush
    assert stream.flushes == 0
    sends[1].cancel()
    await asyncio.wait(sends)
    assert sends[1].cancelled()
    assert [sends[0].result(), sends[2].result()] == [None, None]
    assert stream.flushes == 1
    assert len(stream.getvalue().splitlines()) == 3


class FailingFlush(io.BytesIO):
    def flush(self) -> None:
        raise OSError(32, "Broken pipe")


@pytest.mark.anyio
async def test_a_failed_log_flush_fails_every_event_it_carried() -> None:
    """stdout gone (a closed pipe): each event of the turn gets its own SinkError, so the
    receiver answers 503 for all of them and DT retries; none is reported stored."""
    sink = LogSink(FailingFlush())
    await sink.connect()
    results = await asyncio.gather(
        *(sink.send(received(sample_body())) for _ in range(3)), return_exceptions=True
    )
    assert [type(r) for r in results] == [SinkError] * 3
    assert all("Broken pipe" in str(r) for r in results)
    assert len({id(r) for r in results}) == 3  # not one exception object shared
