"""The nats sink against the real NATS server with JetStream on 127.0.0.1:4222."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import RawStreamMsg, StreamConfig
from nats.js.client import JetStreamContext

from app.events import parse_body
from app.received import ReceivedEvent
from app.samples import sample_body
from app.settings import Settings
from app.signature import SchemePass, Verification
from app.sinks.base import PermanentSinkError, SinkConfigError, SinkError
from app.sinks.nats import NatsSink, clean_token, covers, subject_filter
from tests.sink_contract import SinkContract, event_id, received
from tests.tcp_proxy import TcpProxy

SERVER = ("127.0.0.1", 4222)
URL = "nats://127.0.0.1:4222"
READ_BACK_SECONDS = 5.0


def stream_name(namespace: str) -> str:
    return namespace.upper()


def template(namespace: str) -> str:
    return namespace + ".{projectId}.{deviceType}.{eventType}"


def settings_for(namespace: str, url: str = URL, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": url,
        "nats_stream": stream_name(namespace),
        "nats_subject": template(namespace),
        "nats_duplicate_window": 120,
        "sink_timeout": 3,
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.asynccontextmanager
async def jetstream() -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(URL)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def stored(stream: str, expected: int) -> list[RawStreamMsg]:
    """Every message in ``stream``, once it holds at least ``expected`` (bounded wait)."""
    async with jetstream() as js:
        deadline = time.monotonic() + READ_BACK_SECONDS
        while True:
            try:
                state = (await js.stream_info(stream)).state
            except nats.js.errors.NotFoundError:
                return []
            if state.messages >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return [await js.get_msg(stream, seq) for seq in range(state.first_seq, state.last_seq + 1)]


async def delete_stream(name: str) -> None:
    async with jetstream() as js:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)


class TestNatsContract(SinkContract):
    target = SERVER
    dedups = True

    @pytest.fixture(autouse=True)
    async def _drop_stream(self, namespace: str) -> AsyncIterator[None]:
        yield
        await delete_stream(stream_name(namespace))

    def make_sink(self, host: str, port: int, namespace: str) -> NatsSink:
        return NatsSink.from_settings(settings_for(namespace, f"nats://{host}:{port}"))

    async def read_back(self, namespace: str, expected: int) -> list[tuple[str, bytes]]:
        messages = await stored(stream_name(namespace), expected)
        return [(m.headers["Nats-Msg-Id"] if m.headers else "", m.data or b"") for m in messages]


# --- names -------------------------------------------------------------------------------


def event(body: bytes) -> ReceivedEvent:
    signed = Verification((SchemePass("secret", "secret #1"),))
    return ReceivedEvent(body, parse_body(body), signed, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


def test_values_are_cleaned_so_that_each_stays_one_subject_token() -> None:
    sink = NatsSink.from_settings(settings_for("t1"))
    body = sample_body("touch", project_id="p.1 *>\tx", device_id="d1")
    assert sink.subject.render(event(body), clean_token) == "t1.p_1____x.touch.touch"


def test_the_stream_filter_has_a_wildcard_per_placeholder_token() -> None:
    assert subject_filter("dt.{projectId}.{deviceType}.{eventType}") == "dt.*.*.*"
    assert subject_filter("dt.p-{projectId}.all") == "dt.*.all"
    assert subject_filter("dt.events") == "dt.events"


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("dt.>", "dt.*.*.*", True),
        ("dt.*.*.*", "dt.*.*.*", True),
        (">", "dt.*", True),
        ("dt.*.*", "dt.*.*.*", False),
        ("dt.*.*.*.*", "dt.*.*.*", False),
        ("other.>", "dt.*.*.*", False),
        ("dt.p1.*.*", "dt.*.*.*", False),
        ("dt.>", "dt", False),
    ],
)
def test_stream_subject_coverage(pattern: str, subject: str, expected: bool) -> None:
    assert covers(pattern, subject) is expected


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"nats_subject": "dt.{nope}"}, "DCON_NATS_SUBJECT"),
        ({"nats_subject": "dt..{eventType}"}, "DCON_NATS_SUBJECT"),
        ({"nats_subject": "dt.*.{eventType}"}, "DCON_NATS_SUBJECT"),
        ({"nats_subject": "dt.{eventType}.>"}, "DCON_NATS_SUBJECT"),
        ({"nats_subject": "dt events.{eventType}"}, "DCON_NATS_SUBJECT"),
        ({"nats_url": "http://127.0.0.1:4222"}, "DCON_NATS_URL"),
        ({"nats_url": "nats://:4222"}, "DCON_NATS_URL"),
        ({"nats_url": "nats://127.0.0.1:port"}, "DCON_NATS_URL"),
        ({"nats_url": " , "}, "DCON_NATS_URL"),
        ({"nats_stream": "DT.EVENTS"}, "DCON_NATS_STREAM"),
        ({"nats_stream": "DT EVENTS"}, "DCON_NATS_STREAM"),
    ],
)
def test_bad_settings_fail_at_build_time_naming_the_setting(
    overrides: dict[str, Any], setting: str
) -> None:
    with pytest.raises(SinkConfigError, match=setting):
        NatsSink.from_settings(settings_for("t1", **overrides))


def test_several_servers_are_accepted() -> None:
    sink = NatsSink.from_settings(settings_for("t1", "nats://a:4222, tls://user:pw@b:4443"))
    assert sink.servers == ["nats://a:4222", "tls://user:pw@b:4443"]


# --- against the server --------------------------------------------------------------------


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    return "n" + format(abs(hash((request.node.nodeid, time.time_ns()))), "x")[:12]


@pytest.fixture
async def sink(namespace: str) -> AsyncIterator[NatsSink]:
    sink = NatsSink.from_settings(settings_for(namespace))
    await sink.connect()
    yield sink
    await sink.close()
    await delete_stream(stream_name(namespace))


@pytest.mark.anyio
async def test_connect_creates_the_stream_with_the_duplicate_window(
    sink: NatsSink, namespace: str
) -> None:
    async with jetstream() as js:
        config = (await js.stream_info(stream_name(namespace))).config
    assert config.subjects == [f"{namespace}.*.*.*"]
    assert config.duplicate_window == 120


@pytest.mark.anyio
async def test_an_existing_stream_that_covers_the_subjects_is_used_as_it_is(namespace: str) -> None:
    name = stream_name(namespace)
    async with jetstream() as js:
        await js.add_stream(StreamConfig(name=name, subjects=[f"{namespace}.>"]))
    sink = NatsSink.from_settings(settings_for(namespace))
    try:
        await sink.connect()
        body = sample_body("co2")
        await sink.send(event(body))
        async with jetstream() as js:
            config = (await js.stream_info(name)).config
        assert config.subjects == [f"{namespace}.>"]
        assert [m.data for m in await stored(name, 1)] == [body]
    finally:
        await sink.close()
        await delete_stream(name)


@pytest.mark.anyio
async def test_an_existing_stream_with_other_subjects_fails_connect_clearly(
    namespace: str,
) -> None:
    name = stream_name(namespace)
    async with jetstream() as js:
        await js.add_stream(StreamConfig(name=name, subjects=[f"{namespace}.other.>"]))
    sink = NatsSink.from_settings(settings_for(namespace))
    try:
        with pytest.raises(SinkError, match=r"do not cover .*DCON_NATS_SUBJECT"):
            await sink.connect()
        with pytest.raises(SinkError, match="not connected"):
            await sink.send(event(sample_body()))
    finally:
        await sink.close()
        await delete_stream(name)


@pytest.mark.anyio
async def test_a_repeated_event_id_is_acknowledged_as_duplicate_and_stored_once(
    sink: NatsSink, namespace: str
) -> None:
    body = sample_body("temperature")
    await sink.send(event(body))
    await sink.send(event(body))
    assert sink.duplicates == 1
    messages = await stored(stream_name(namespace), 1)
    assert [m.headers["Nats-Msg-Id"] for m in messages if m.headers] == [event_id(body)]


@pytest.mark.anyio
async def test_an_event_over_the_server_max_payload_is_refused_for_good(
    sink: NatsSink, namespace: str
) -> None:
    """No retry can shrink it (spool mode dead-letters it); the next event goes through."""
    nc = await nats.connect(URL)
    limit = nc.max_payload
    await nc.close()
    huge = sample_body("touch").replace(b'"labels":{', b'"labels":{"x":"' + b"a" * limit + b'",')
    with pytest.raises(PermanentSinkError, match="max_payload"):
        await sink.send(event(huge))
    body = sample_body("touch")
    await sink.send(event(body))
    assert [m.data for m in await stored(stream_name(namespace), 1)] == [body]


@pytest.mark.anyio
async def test_a_body_without_event_id_deduplicates_by_its_hash(
    sink: NatsSink, namespace: str
) -> None:
    body = b'{"event":{"eventType":"touch"},"labels":{},"metadata":{}}'
    await sink.send(event(body))
    await sink.send(event(body))
    messages = await stored(stream_name(namespace), 1)
    assert [m.data for m in messages] == [body]
    assert messages[0].headers is not None
    assert messages[0].headers["Nats-Msg-Id"].startswith("sha256:")
    assert messages[0].headers["Dcon-Outcome"] == "invalid"


@pytest.mark.anyio
async def test_metadata_travels_in_headers_and_the_body_unchanged(
    sink: NatsSink, namespace: str
) -> None:
    body = sample_body("touch", project_id="proj.1", device_id="dev1")
    await sink.send(event(body))
    [message] = await stored(stream_name(namespace), 1)
    assert message.subject == f"{namespace}.proj_1.touch.touch"
    assert message.data == body
    assert message.headers == {
        "Nats-Msg-Id": event_id(body),
        "Nats-Expected-Stream": stream_name(namespace),
        "Dcon-Event-Id": event_id(body),
        "Dcon-Event-Type": "touch",
        "Dcon-Project-Id": "proj.1",
        "Dcon-Device-Id": "dev1",
        "Dcon-Received-At": "2026-01-02T03:04:05Z",
        "Dcon-Verified": "true",
        "Dcon-Verification": "secret",
        "Dcon-Outcome": "typed",
    }


@pytest.mark.anyio
async def test_a_deleted_stream_fails_one_send_then_is_recreated(
    sink: NatsSink, namespace: str
) -> None:
    await delete_stream(stream_name(namespace))
    with pytest.raises(SinkError, match="no JetStream stream"):
        await sink.send(event(sample_body("touch")))
    body = sample_body("co2")
    await sink.send(event(body))
    assert [m.data for m in await stored(stream_name(namespace), 1)] == [body]


@pytest.mark.anyio
async def test_connect_to_nothing_fails_within_its_timeout() -> None:
    async with TcpProxy(*SERVER) as proxy:
        port = proxy.port
    sink = NatsSink(
        f"nats://127.0.0.1:{port}",
        stream="UNUSED",
        subject="unused.{eventType}",
        duplicate_window=60,
        timeout=1,
        connect_timeout=1,
    )
    with pytest.raises(SinkError, match="cannot connect"):
        await asyncio.wait_for(sink.connect(), 5)
    await sink.close()


@pytest.mark.anyio
async def test_a_send_during_an_outage_fails_fast_and_a_cancelled_one_leaves_the_sink_usable(
    namespace: str,
) -> None:
    async with TcpProxy(*SERVER) as proxy:
        sink = NatsSink.from_settings(settings_for(namespace, f"nats://127.0.0.1:{proxy.port}"))
        await sink.connect()
        try:
            await proxy.cut()
            with pytest.raises(SinkError):
                await asyncio.wait_for(sink.send(event(sample_body("touch"))), sink.timeout + 1)
            cancelled = asyncio.ensure_future(sink.send(event(sample_body("co2"))))
            await asyncio.sleep(0)
            cancelled.cancel()
            with contextlib.suppress(asyncio.CancelledError, SinkError):
                await cancelled
            await proxy.restore()
            body = sample_body("motion")
            await _send_until_stored(sink, event(body))
            assert body in [m.data for m in await stored(stream_name(namespace), 1)]
        finally:
            await sink.close()
            await delete_stream(stream_name(namespace))


async def _send_until_stored(sink: NatsSink, item: ReceivedEvent) -> None:
    for _ in range(40):
        try:
            await sink.send(item)
        except SinkError:
            await asyncio.sleep(0.25)
        else:
            return
    await sink.send(item)


@pytest.mark.anyio
async def test_close_is_idempotent_and_a_closed_sink_refuses(sink: NatsSink) -> None:
    await sink.close()
    await sink.close()
    with pytest.raises(SinkError, match="closed"):
        await sink.send(received(sample_body()))
    with pytest.raises(SinkError, match="closed"):
        await sink.ping()
    with pytest.raises(SinkError, match="closed"):
        await sink.connect()
