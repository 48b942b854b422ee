"""/metrics and the access log after a known sequence of requests."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import logs
from app.ingest import access
from app.logs import JsonFormatter, TextFormatter, configure_logging, logging_config
from app.samples import sample_body
from app.settings import Settings
from app.signing import sign_secret
from app.sinks.memory import QueueSink
from tests.conftest import serve_app
from tests.sinks_doubles import FlakySink

pytestmark = pytest.mark.anyio

SECRET = "metrics-secret-value"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_counters_follow_a_known_sequence_of_requests() -> None:
    """2 accepted, 1 duplicate, 1 bad signature, 1 sink failure: each is counted once."""
    s = Settings(verify_mode="secret", signature_secrets=[SECRET])
    flaky = FlakySink(failures=0)
    async with serve_app(s, [QueueSink(), flaky]) as (_, client):
        first, second = sample_body("temperature"), sample_body("touch")
        for body in (first, second, first):
            await client.post(
                "/events", content=body, headers={"X-Dt-Signature": sign_secret(body, SECRET)}
            )
        await client.post(
            "/events", content=first, headers={"X-Dt-Signature": sign_secret(first, "x")}
        )
        flaky.failures = 1
        third = sample_body("co2")
        await client.post(
            "/events", content=third, headers={"X-Dt-Signature": sign_secret(third, SECRET)}
        )
        text = (await client.get("/metrics")).text
    got = samples(text)
    assert got[("dcon_requests_total", (("status", "200"),))] == 3
    assert got[("dcon_requests_total", (("status", "401"),))] == 1
    assert got[("dcon_requests_total", (("status", "503"),))] == 1
    assert got[("dcon_duplicates_total", ())] == 1
    typed = (("event_type", "temperature"), ("outcome", "typed"), ("verification", "secret"))
    assert got[("dcon_events_total", typed)] == 1
    assert (
        got[
            (
                "dcon_signature_failures_total",
                (("reason", "invalid_signature"), ("scheme", "secret")),
            )
        ]
        == 1
    )
    assert got[("dcon_sink_failures_total", (("reason", "error"), ("sink", "flaky")))] == 1
    assert got[("dcon_sink_deliveries_total", (("sink", "queue"),))] == 3
    assert got[("dcon_request_duration_seconds_count", ())] == 5
    assert "process_resident_memory_bytes" in text


async def test_made_up_event_types_share_one_label() -> None:
    """A flood of invented types cannot explode the number of series."""
    async with serve_app(Settings(verify_mode="off"), [QueueSink()]) as (_, client):
        for i in range(5):
            doc = json.loads(sample_body("touch"))
            doc["event"]["eventType"] = f"madeUp{i}"
            await client.post("/events", content=json.dumps(doc).encode())
        text = (await client.get("/metrics")).text
    got = samples(text)
    other = (("event_type", "other"), ("outcome", "unknown"), ("verification", "unverified"))
    assert got[("dcon_events_total", other)] == 5


async def test_access_log_has_one_line_per_request_and_never_a_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Settings(verify_mode="secret", signature_secrets=[SECRET])
    body = sample_body("touch")
    token = sign_secret(body, SECRET)
    with caplog.at_level(logging.INFO, logger="dcon"):
        async with serve_app(s, [QueueSink()]) as (_, client):
            ok = await client.post(
                "/events", content=body, headers={"X-Dt-Signature": token, "X-Request-Id": "req-42"}
            )
            bad = await client.post("/events", content=body, headers={"X-Dt-Signature": "x.y.z"})
    access = [r for r in caplog.records if r.name == "dcon.access"]
    assert len(access) == 2
    lines = [json.loads(JsonFormatter().format(r)) for r in access]
    event_id = json.loads(body)["event"]["eventId"]
    assert lines[0]["requestId"] == "req-42" == ok.headers["X-Request-Id"]
    assert lines[0]["status"] == 200
    assert lines[0]["eventId"] == event_id
    assert lines[0]["eventType"] == "touch"
    assert lines[0]["verification"] == "secret"
    assert lines[0]["deviceId"]
    assert lines[0]["durationMs"] >= 0
    assert lines[1]["status"] == 401 == bad.status_code
    assert lines[1]["error"] == "malformed_signature"
    everything = caplog.text + "".join(JsonFormatter().format(r) for r in caplog.records)
    assert SECRET not in everything
    assert token not in everything
    assert token.split(".")[2] not in everything


@pytest.fixture
def json_logging() -> Iterator[logging.StreamHandler[Any]]:
    """Logging as ``serve`` sets it up (JSON on one stream handler), into a buffer; the
    loggers it touched are put back afterwards."""
    touched = [logging.getLogger(name) for name in logging_config("info", "json")["loggers"]]
    saved = [(lg, lg.handlers[:], lg.filters[:], lg.level, lg.propagate) for lg in touched]
    switches = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    srcfile = logging._srcfile
    configure_logging("info", "json")
    handler = logging.getLogger("dcon").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(io.StringIO())
    try:
        yield handler
    finally:
        for logger, handlers, filters, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.filters[:] = filters
            logger.setLevel(level)
            logger.propagate = propagate
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = switches
        logging._srcfile = srcfile


def _odd(body: bytes) -> bytes:
    """The same event under another id and an unknown type, both with quotes and non-ASCII."""
    doc = json.loads(body)
    doc["event"]["eventId"] = 'odd-ïd "1"'
    doc["event"]["eventType"] = 'töuch \u2028"x"'
    return json.dumps(doc).encode()


async def _access_lines(handler: logging.StreamHandler[Any], body: bytes) -> list[dict[str, Any]]:
    s = Settings(verify_mode="secret", signature_secrets=[SECRET])
    headers = {"X-Dt-Signature": sign_secret(body, SECRET), "X-Request-Id": "req-7"}
    async with serve_app(s, [QueueSink()]) as (_, client):
        for sent in (body, body, _odd(body)):
            signed = {**headers, "X-Dt-Signature": sign_secret(sent, SECRET)}
            await client.post("/events", content=sent, headers=signed)
        await client.post("/events", content=body, headers={**headers, "X-Dt-Signature": "x.y"})
    stream = handler.setStream(io.StringIO())
    assert isinstance(stream, io.StringIO)
    lines = [json.loads(line) for line in stream.getvalue().split("\n") if line]
    return [line for line in lines if line["logger"] == "dcon.access"]


async def test_access_lines_written_directly_match_the_formatter(
    json_logging: logging.StreamHandler[Any],
) -> None:
    """The access log's direct write (logging as serve sets it up) gives the lines that a
    logging call through JsonFormatter gives, key for key and in the same order."""
    body = sample_body("touch")
    # pytest hangs its capture handler on every non-propagating logger as a test starts:
    # take it off, for logging as serve has it.
    logging.getLogger("dcon").handlers[:] = [json_logging]
    assert access._direct_handler() is json_logging  # the direct write applies
    direct = await _access_lines(json_logging, body)
    # Any filter on the logger means the direct write no longer applies.
    logging.getLogger("dcon").addFilter(lambda record: True)
    assert access._direct_handler() is None
    through_logging = await _access_lines(json_logging, body)
    assert len(direct) == len(through_logging) == 4
    assert [line["status"] for line in direct] == [200, 200, 200, 401]
    assert [line["outcome"] for line in direct[:3]] == ["accepted", "duplicate", "accepted"]
    for ours, theirs in zip(direct, through_logging, strict=True):
        assert list(ours) == list(theirs)
        varying = {"ts", "durationMs"}
        assert {k: v for k, v in ours.items() if k not in varying} == {
            k: v for k, v in theirs.items() if k not in varying
        }
        assert datetime.fromisoformat(ours["ts"]).tzinfo is not None
        assert ours["ts"].endswith("Z")
        assert ours["msg"].startswith("POST /events ")


class CountingStream(io.StringIO):
    """A stream that keeps each write it gets (each one a system call on a real stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def access_writes(self) -> list[str]:
        return [text for text in self.writes if '"logger": "dcon.access"' in text]


async def test_access_lines_of_one_loop_turn_go_out_in_one_write(
    json_logging: logging.StreamHandler[Any],
) -> None:
    """Requests answered together (as a group commit releases them) cost one write for
    all their access lines, made by the end of that loop turn; none is lost or cut."""
    logging.getLogger("dcon").handlers[:] = [json_logging]
    stream = CountingStream()
    json_logging.setStream(stream)
    s = Settings(verify_mode="secret", signature_secrets=[SECRET])
    bodies = [sample_body(kind) for kind in ("touch", "temperature", "co2", "contact", "motion")]
    async with serve_app(s, [QueueSink()]) as (_, client):
        answers = await asyncio.gather(
            *(
                client.post("/events", content=b, headers={"X-Dt-Signature": signature})
                for b, signature in zip(bodies, map(sign_secret, bodies, [SECRET] * 5), strict=True)
            )
        )
        assert [a.status_code for a in answers] == [200] * 5
        await asyncio.sleep(0)  # the turn after the answers: their lines are out
        written = stream.access_writes()
    lines = [json.loads(line) for text in written for line in text.splitlines()]
    assert sorted(line["eventId"] for line in lines) == sorted(
        json.loads(b)["event"]["eventId"] for b in bodies
    )
    assert len(written) == 1  # the five were answered in the same turn


def test_an_access_line_written_outside_a_loop_is_written_at_once(
    json_logging: logging.StreamHandler[Any],
) -> None:
    logging.getLogger("dcon").handlers[:] = [json_logging]
    stream = CountingStream()
    json_logging.setStream(stream)
    access.write("POST /events 200", {"requestId": "r-1"})
    [text] = stream.access_writes()
    assert json.loads(text)["requestId"] == "r-1"


def test_lines_left_by_a_stopped_loop_are_written_with_the_next_loop_s(
    json_logging: logging.StreamHandler[Any],
) -> None:
    """A loop closed before its turn's write ran must not leave lines behind for good,
    nor hold back the lines of the loop that comes after it."""
    logging.getLogger("dcon").handlers[:] = [json_logging]
    stream = CountingStream()
    json_logging.setStream(stream)

    def one_line(request_id: str) -> None:
        access.write("POST /events 200", {"requestId": request_id})

    first = asyncio.new_event_loop()
    first.call_soon(one_line, "r-1")
    first.call_soon(first.stop)  # the loop stops before the turn's write comes round
    first.run_forever()
    first.close()
    assert stream.access_writes() == []

    async def later() -> None:
        one_line("r-2")

    asyncio.run(later())
    written = stream.access_writes()
    ids = [json.loads(line)["requestId"] for text in written for line in text.splitlines()]
    assert ids == ["r-1", "r-2"]


def test_uvicorn_s_coloured_copy_of_its_message_is_not_a_field() -> None:
    """uvicorn's records carry their message again with colour codes ("color_message");
    neither format repeats it, while other extra fields stay."""
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, "", 0, "Uvicorn running on %s", ("x",), None
    )
    record.color_message = "Uvicorn running on \x1b[1m%s\x1b[0m"
    record.port = 8443
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "Uvicorn running on x"
    assert "color_message" not in line
    assert line["port"] == 8443
    text = TextFormatter().format(record)
    assert "color_message" not in text
    assert "\x1b" not in text
    assert text.endswith("Uvicorn running on x port=8443")


def test_the_access_log_s_encoder_writes_what_the_formatter_s_does() -> None:
    """The encoder made once for access lines gives ``json`` text equal to the formatter's
    encoder, for every kind of value an access line holds."""
    line = {
        "ts": "2026-12-07T22:52:33.358475Z",
        "msg": 'POST /events 400 "odd" \u2028 ïd',
        "client": None,
        "status": 400,
        "durationMs": 3.75,
        "small": 1e-7,
        "flag": True,
        "error": "bad\\path\n\ttab",
    }
    assert logs._ENCODE_FLAT(line) == logs._ENCODE(line)
    assert logs._ENCODE_FLAT({}) == "{}"


@pytest.mark.parametrize(
    "created",
    [0.0, 1_800_000_000.0, 1_800_000_000.5, 1_800_000_000.9999996, 1_765_148_353.000001],
)
def test_log_timestamps_are_iso_utc_to_the_microsecond(created: float) -> None:
    text = logs._timestamp(created)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text)
    exact = datetime.fromtimestamp(created, UTC)
    assert datetime.fromisoformat(text) == exact


def test_log_timestamps_follow_the_clock_across_seconds() -> None:
    """The cached date and time of the last second is not reused for the next one."""
    first = logs._timestamp(1_800_000_000.999)
    second = logs._timestamp(1_800_000_001.001)
    assert first == "2027-01-15T08:00:00.999000Z"
    assert second == "2027-01-15T08:00:01.001000Z"
