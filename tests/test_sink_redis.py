"""The redis sink against the real Redis on loopback: streams, fields, trimming, outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest
from redis.asyncio import Redis

from app.received import ReceivedEvent
from app.samples import sample_body
from app.settings import Settings
from app.sinks import SinkConfigError, SinkError, build_sinks
from app.sinks.redis import RedisSink
from tests.sink_contract import SinkContract, event_id, received

HOST, PORT = "127.0.0.1", 6379
URL = f"redis://{HOST}:{PORT}/0"

pytestmark = pytest.mark.anyio


def stream_of(namespace: str) -> str:
    return f"{namespace}:events"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(URL)
    yield client
    await client.aclose()


Fields = dict[bytes | str, bytes | str]


def as_bytes(fields: Fields | None) -> dict[bytes, bytes]:
    assert fields is not None
    return {
        (k if isinstance(k, bytes) else k.encode()): (v if isinstance(v, bytes) else v.encode())
        for k, v in fields.items()
    }


async def entries(redis: Redis, stream: str, expected: int) -> list[dict[bytes, bytes]]:
    """The stream's entries, polled (bounded) until at least ``expected`` are there."""
    found: list[tuple[bytes | str | None, Fields | None]] = []
    for _ in range(50):
        found = await redis.xrange(stream) or []
        if len(found) >= expected:
            break
        await asyncio.sleep(0.1)
    return [as_bytes(fields) for _, fields in found]


async def newest(redis: Redis, stream: str) -> dict[bytes, bytes]:
    [(_, fields)] = await redis.xrevrange(stream, count=1) or []
    return as_bytes(fields)


def event_of(event_type: str, project: str) -> ReceivedEvent:
    return received(sample_body(event_type, project_id=project))


class TestRedisSink(SinkContract):
    target: ClassVar[tuple[str, int]] = (HOST, PORT)
    dedups: ClassVar[bool] = False  # XADD always appends; there is no id to dedup on

    def make_sink(self, host: str, port: int, namespace: str) -> RedisSink:
        return RedisSink(f"redis://{host}:{port}/0", stream_of(namespace))

    async def read_back(self, namespace: str, expected: int) -> list[tuple[str, bytes]]:
        client = Redis.from_url(URL)
        try:
            found = await entries(client, stream_of(namespace), expected)
        finally:
            await client.aclose()
        return [(fields[b"eventId"].decode(), fields[b"body"]) for fields in found]

    @pytest.fixture(autouse=True)
    async def _drop_streams(self, namespace: str, redis: Redis) -> AsyncIterator[None]:
        """Every key a test makes starts with its namespace; remove them all afterwards."""
        yield
        keys = [key async for key in redis.scan_iter(match=f"{namespace}*")]
        if keys:
            await redis.delete(*keys)

    async def test_metadata_travels_in_fields_beside_the_raw_body(
        self, namespace: str, redis: Redis
    ) -> None:
        sink = RedisSink(URL, stream_of(namespace))
        await sink.connect()
        event = event_of("temperature", "p1")
        await sink.send(event)
        await sink.close()
        [fields] = await entries(redis, stream_of(namespace), 1)
        assert fields[b"body"] == event.body
        assert fields[b"eventId"].decode() == event_id(event.body)
        assert fields[b"eventType"] == b"temperature"
        assert fields[b"projectId"] == b"p1"
        assert fields[b"verified"] == b"false"
        assert fields[b"verification"] == b"unverified"
        assert fields[b"outcome"] == b"typed"
        assert fields[b"receivedAt"].decode() == event.meta()["receivedAt"]

    async def test_stream_name_template_renders_per_event(
        self, namespace: str, redis: Redis
    ) -> None:
        sink = RedisSink(URL, namespace + ":{projectId}:{eventType}")
        await sink.connect()
        sent = [event_of(t, p) for p in ("pa", "pb") for t in ("touch", "co2", "touch")]
        for event in sent:
            await sink.send(event)
        await sink.close()
        for project in ("pa", "pb"):
            for event_type, count in (("touch", 2), ("co2", 1)):
                got = await entries(redis, f"{namespace}:{project}:{event_type}", count)
                assert [f[b"eventType"].decode() for f in got] == [event_type] * count
                assert {f[b"projectId"] for f in got} == {project.encode()}
        made = sorted([key async for key in redis.scan_iter(match=f"{namespace}*")])
        assert made == sorted(
            f"{namespace}:{p}:{t}".encode() for p in ("pa", "pb") for t in ("touch", "co2")
        )

    async def test_maxlen_keeps_the_stream_near_the_cap(self, namespace: str, redis: Redis) -> None:
        """Trimming is approximate (~): whole nodes go, so the length stays within one node."""
        cap, sent = 100, 1000
        sink = RedisSink(URL, stream_of(namespace), maxlen=cap)
        await sink.connect()
        events = [event_of("touch", "p1") for _ in range(sent)]
        for event in events:
            await sink.send(event)
        await sink.close()
        config = await redis.config_get("stream-node-max-entries")
        node = int(config["stream-node-max-entries"] or 0)
        length = await redis.xlen(stream_of(namespace))
        assert cap <= length <= cap + node < sent
        assert (await newest(redis, stream_of(namespace)))[b"body"] == events[-1].body

    async def test_zero_maxlen_never_trims(self, namespace: str, redis: Redis) -> None:
        sink = RedisSink(URL, stream_of(namespace), maxlen=0)
        await sink.connect()
        for _ in range(300):
            await sink.send(event_of("touch", "p1"))
        await sink.close()
        assert await redis.xlen(stream_of(namespace)) == 300

    async def test_connect_fails_with_sink_error_when_redis_is_unreachable(self) -> None:
        sink = RedisSink("redis://127.0.0.1:9/0", "dt:events")
        with pytest.raises(SinkError, match="PING failed"):
            await sink.connect()
        with pytest.raises(SinkError, match="not connected"):
            await sink.send(event_of("touch", "p1"))

    async def test_send_after_close_is_refused_and_close_is_idempotent(
        self, namespace: str
    ) -> None:
        sink = RedisSink(URL, stream_of(namespace))
        await sink.connect()
        await sink.close()
        await sink.close()
        with pytest.raises(SinkError, match="not connected"):
            await sink.send(event_of("touch", "p1"))
        with pytest.raises(SinkError):
            await sink.ping()

    async def test_a_cancelled_send_leaves_the_sink_usable(
        self, namespace: str, redis: Redis
    ) -> None:
        """The receiver cancels sends at its deadline; the next send must still work."""
        sink = RedisSink(URL, stream_of(namespace))
        await sink.connect()
        for turns in range(20):  # cancel at different points of the round trip
            task = asyncio.ensure_future(sink.send(event_of("touch", "p1")))
            for _ in range(turns % 10):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        last = event_of("co2", "p1")
        await sink.send(last)
        await sink.ping()
        await sink.close()
        assert (await newest(redis, stream_of(namespace)))[b"body"] == last.body


def test_bad_stream_template_fails_at_start_up_naming_the_setting() -> None:
    settings = Settings(verify_mode="off", sinks=["redis"], redis_stream="dt:{project}")
    with pytest.raises(SinkConfigError, match=r"DCON_REDIS_STREAM: unknown placeholder"):
        RedisSink.from_settings(settings)
    with pytest.raises(SinkConfigError, match="DCON_REDIS_STREAM"):
        build_sinks(settings)


@pytest.mark.parametrize("stream", ["", "dt:{projectId"])
def test_empty_or_malformed_stream_fails_naming_the_setting(stream: str) -> None:
    with pytest.raises(SinkConfigError, match="DCON_REDIS_STREAM"):
        RedisSink.from_settings(Settings(redis_stream=stream))


def test_bad_url_fails_at_start_up_naming_the_setting_not_the_password() -> None:
    with pytest.raises(SinkConfigError, match="DCON_REDIS_URL") as raised:
        RedisSink.from_settings(Settings(redis_url="http://user:s3cr3t@127.0.0.1:6379"))
    assert "s3cr3t" not in str(raised.value)


def test_registry_builds_it_from_settings_without_io() -> None:
    """Port 9 has nothing listening: building must not notice, only connect would."""
    settings = Settings(sinks=["redis"], redis_url="redis://127.0.0.1:9/0", redis_maxlen=5)
    [sink] = build_sinks(settings)
    assert isinstance(sink, RedisSink)
    assert (sink.url, sink.stream.text, sink.maxlen) == (
        "redis://127.0.0.1:9/0",
        "dt:events",
        5,
    )
