"""One contract for every sink, run against the real server behind it.

A sink's test module subclasses :class:`SinkContract` and fills in four things: how to
build the sink for a server address, what the sink's server address is, how to read back
what the sink published, and whether the sink itself deduplicates by eventId. Every
sink then proves the same behaviour:

- bodies round-trip unchanged with their eventId, for every DT event type;
- ``ping`` works and fails when the server is unreachable;
- with the connection cut, the receiver answers 503 with Retry-After and nothing is
  reported stored; once it is back, delivery resumes without restarting the receiver;
- a duplicate eventId sent to the sink directly is stored once where the sink promises it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import ClassVar

import httpx
import pytest

from app.events import parse_body
from app.received import ReceivedEvent
from app.samples import EVENT_TYPES, sample_body
from app.settings import Settings
from app.signature import UNVERIFIED
from app.sinks import Sink, SinkError
from tests.conftest import serve_app
from tests.tcp_proxy import TcpProxy


def received(body: bytes) -> ReceivedEvent:
    return ReceivedEvent(body, parse_body(body), UNVERIFIED, datetime.now(UTC))


def event_id(body: bytes) -> str:
    value: str = json.loads(body)["event"]["eventId"]
    return value


class SinkContract:
    """Subclass, set ``target`` and implement the ``make_sink`` and ``read_back`` hooks."""

    # (host, port) of the real server on loopback.
    target: ClassVar[tuple[str, int]]
    # True if the sink stores a repeated eventId once (JetStream Nats-Msg-Id, ON CONFLICT).
    dedups: ClassVar[bool] = False

    def make_sink(self, host: str, port: int, namespace: str) -> Sink:
        """A sink talking to host:port, publishing under a name unique to this test."""
        raise NotImplementedError

    async def read_back(self, namespace: str, expected: int) -> list[tuple[str, bytes]]:
        """(eventId, body) of everything the sink published under ``namespace``.

        Waits (bounded) until at least ``expected`` items are there, for brokers whose
        consumers see messages asynchronously.
        """
        raise NotImplementedError

    @pytest.fixture
    def namespace(self, request: pytest.FixtureRequest) -> str:
        """A stream/subject/table/topic prefix no other test run shares."""
        return "t" + format(abs(hash((request.node.nodeid, datetime.now(UTC)))), "x")[:12]

    @pytest.fixture
    async def proxy(self) -> AsyncIterator[TcpProxy]:
        async with TcpProxy(*self.target) as proxy:
            yield proxy

    @pytest.fixture
    async def sink(self, namespace: str) -> AsyncIterator[Sink]:
        sink = self.make_sink(*self.target, namespace)
        await sink.connect()
        yield sink
        await sink.close()

    @pytest.mark.anyio
    async def test_every_event_type_round_trips_with_its_event_id(
        self, sink: Sink, namespace: str
    ) -> None:
        bodies = [sample_body(event_type) for event_type in EVENT_TYPES]
        for body in bodies:
            await sink.send(received(body))
        got = await self.read_back(namespace, len(bodies))
        assert sorted(got) == sorted((event_id(b), b) for b in bodies)

    @pytest.mark.anyio
    async def test_ping_succeeds_while_the_server_is_up(self, sink: Sink) -> None:
        await sink.ping()

    @pytest.mark.anyio
    async def test_outage_is_503_and_delivery_resumes_without_restart(
        self, proxy: TcpProxy, namespace: str
    ) -> None:
        """Cut the connection: 503, no false 200; restore it: the retry is stored."""
        sink = self.make_sink("127.0.0.1", proxy.port, namespace)
        settings = Settings(verify_mode="off", sink_timeout=3, retry_after=7)
        before, during = sample_body("touch"), sample_body("co2")
        async with serve_app(settings, [sink]) as (_, client):
            assert (await client.post("/events", content=before)).status_code == 200
            await proxy.cut()
            down = await client.post("/events", content=during)
            with pytest.raises(SinkError):
                await sink.ping()
            await proxy.restore()
            retried = await self._post_until_stored(client, during)
        assert down.status_code == 503
        assert down.headers["Retry-After"] == "7"
        assert down.json()["sinks"] == [sink.name]
        assert retried == 200
        got = await self.read_back(namespace, 2)
        assert {eid for eid, _ in got} == {event_id(before), event_id(during)}

    async def _post_until_stored(self, client: httpx.AsyncClient, body: bytes) -> int:
        """DT retries a 503 after a pause; so does this, a bounded number of times."""
        status = 0
        for _ in range(40):
            status = (await client.post("/events", content=body)).status_code
            if status == 200:
                break
            await asyncio.sleep(0.25)
        return status

    @pytest.mark.anyio
    async def test_duplicate_event_id(self, sink: Sink, namespace: str) -> None:
        """Sent twice straight to the sink: once if the sink dedups, else twice."""
        body = sample_body("touch")
        await sink.send(received(body))
        await sink.send(received(body))
        got = await self.read_back(namespace, 1 if self.dedups else 2)
        assert [eid for eid, _ in got].count(event_id(body)) == (1 if self.dedups else 2)
