"""The rabbitmq sink against the real RabbitMQ on loopback: confirmed, mandatory, persistent
publishing to a durable topic exchange, routing keys, and outages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import ChannelPreconditionFailed

from app.samples import sample_body
from app.settings import Settings
from app.sinks import SinkConfigError, SinkError, build_sinks
from app.sinks.rabbitmq import RabbitMQSink, clean_word
from tests.conftest import serve_app
from tests.sink_contract import SinkContract, event_id, received
from tests.tcp_proxy import TcpProxy

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"
# A queue a crashed test leaves behind disappears after ten idle minutes.
QUEUE_ARGUMENTS: dict[str, Any] = {"x-expires": 600_000}

pytestmark = pytest.mark.anyio


def exchange_of(namespace: str) -> str:
    return f"{namespace}.dt.events"


def body_with(**metadata: str) -> bytes:
    """A touch body whose metadata fields are replaced (projectId also in targetName)."""
    doc = json.loads(sample_body("touch"))
    doc["metadata"].update(metadata)
    if "projectId" in metadata:
        device = doc["metadata"]["deviceId"]
        doc["event"]["targetName"] = f"projects/{metadata['projectId']}/devices/{device}"
    return json.dumps(doc, separators=(",", ":")).encode()


class Broker:
    """The test's own plain connection: declares what a consumer would, reads, cleans up."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    async def exchange(self, name: str) -> None:
        """Declare the exchange as the sink does (durable topic); deleted afterwards."""
        self.exchanges.append(name)
        await self.channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)

    async def queue(
        self,
        name: str,
        exchange: str,
        binding: str = "#",
        arguments: dict[str, Any] | None = None,
    ) -> None:
        """A queue bound to ``exchange``, as a consumer would set one up."""
        self.queues.append(name)
        queue = await self.channel.declare_queue(
            name, durable=True, arguments={**QUEUE_ARGUMENTS, **(arguments or {})}
        )
        await queue.bind(exchange, binding)

    async def messages(self, queue: str, expected: int) -> list[AbstractIncomingMessage]:
        """Everything in ``queue``, polled (bounded) until at least ``expected`` are there."""
        found: list[AbstractIncomingMessage] = []
        source = await self.channel.get_queue(queue)
        for _ in range(100):
            while (message := await source.get(no_ack=True, fail=False)) is not None:
                found.append(message)
            if len(found) >= expected:
                break
            await asyncio.sleep(0.05)
        return found

    async def cleanup(self) -> None:
        channel = await self.connection.channel()
        for queue in self.queues:
            await channel.queue_delete(queue)
        for exchange in self.exchanges:
            await channel.exchange_delete(exchange)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(URL)
    broker = Broker(connection, await connection.channel())
    try:
        yield broker
    finally:
        await broker.cleanup()
        await connection.close()


class TestRabbitMQSink(SinkContract):
    target: ClassVar[tuple[str, int]] = (HOST, PORT)
    dedups: ClassVar[bool] = False  # RabbitMQ does not dedup by message_id

    def make_sink(self, host: str, port: int, namespace: str) -> RabbitMQSink:
        return RabbitMQSink(f"amqp://guest:guest@{host}:{port}/", exchange_of(namespace))

    async def read_back(self, namespace: str, expected: int) -> list[tuple[str, bytes]]:
        found = await self.broker.messages(f"{namespace}.all", expected)
        return [(str(message.message_id), message.body) for message in found]

    @pytest.fixture(autouse=True)
    async def _bound_queue(self, namespace: str, broker: Broker) -> None:
        """A queue bound with '#' before the first send: without one, nothing is stored."""
        self.broker = broker
        await broker.exchange(exchange_of(namespace))
        await broker.queue(f"{namespace}.all", exchange_of(namespace))

    async def test_an_event_no_queue_would_receive_is_refused_not_stored(
        self, namespace: str, broker: Broker
    ) -> None:
        """The broker returns an unroutable event: SinkError, and stored once a queue binds."""
        exchange = f"{namespace}.unbound"
        broker.exchanges.append(exchange)
        sink = RabbitMQSink(URL, exchange)
        await sink.connect()
        event = received(sample_body("touch"))
        try:
            with pytest.raises(SinkError, match="no queue is bound"):
                await sink.send(event)
            await broker.queue(f"{namespace}.late", exchange)
            await sink.send(event)  # DT's retry, once a consumer has bound its queue
        finally:
            await sink.close()
        [message] = await broker.messages(f"{namespace}.late", 1)
        assert message.message_id == event_id(event.body)

    async def test_an_unroutable_event_is_a_503_for_dt(
        self, namespace: str, broker: Broker
    ) -> None:
        sink = RabbitMQSink(URL, f"{namespace}.unbound")
        broker.exchanges.append(f"{namespace}.unbound")
        async with serve_app(Settings(verify_mode="off"), [sink]) as (_, client):
            answer = await client.post("/events", content=sample_body("touch"))
        assert answer.status_code == 503
        assert answer.json()["sinks"] == ["rabbitmq"]

    async def test_a_nack_is_a_failure(self, namespace: str, broker: Broker) -> None:
        """A full queue that rejects publishes makes the broker nack: SinkError."""
        exchange = f"{namespace}.full"
        await broker.exchange(exchange)
        await broker.queue(
            f"{namespace}.full",
            exchange,
            arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
        )
        sink = RabbitMQSink(URL, exchange)
        await sink.connect()
        try:
            await sink.send(received(sample_body("touch")))
            with pytest.raises(SinkError, match="refused"):
                await sink.send(received(sample_body("touch")))
        finally:
            await sink.close()

    async def test_message_is_persistent_json_with_event_id_and_metadata_headers(
        self, sink: RabbitMQSink, namespace: str
    ) -> None:
        event = received(sample_body("temperature", project_id="p1"))
        await sink.send(event)
        [message] = await self.broker.messages(f"{namespace}.all", 1)
        assert message.body == event.body
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.message_id == event_id(event.body)
        assert message.content_type == "application/json"
        assert message.type == "temperature"
        assert message.app_id == "dcon-receiver"
        assert message.timestamp is not None
        assert message.timestamp.timestamp() == int(event.received_at.timestamp())  # AMQP: s
        assert message.exchange == exchange_of(namespace)
        assert message.routing_key == "p1.temperature.temperature"
        assert message.headers == {
            "eventId": event_id(event.body),
            "eventType": "temperature",
            "projectId": "p1",
            "deviceId": event.parsed.device_id,
            "receivedAt": event.meta()["receivedAt"],
            "verified": False,
            "verification": "unverified",
            "outcome": "typed",
        }

    async def test_routing_key_words_are_cleaned_and_match_bindings(
        self, namespace: str, broker: Broker
    ) -> None:
        """'.', '*', '#' in a value never add a word: a three-word binding still matches."""
        await broker.queue(f"{namespace}.words", exchange_of(namespace), "p_1.*.touch")
        sink = self.make_sink(HOST, PORT, namespace)
        await sink.connect()
        event = received(body_with(projectId="p.1", deviceType="a#b*c"))
        try:
            await sink.send(event)
        finally:
            await sink.close()
        [message] = await broker.messages(f"{namespace}.words", 1)
        assert message.routing_key == "p_1.a_b_c.touch"

    async def test_exchange_is_declared_durable_topic(self, namespace: str, broker: Broker) -> None:
        exchange = f"{namespace}.fresh"
        broker.exchanges.append(exchange)
        sink = RabbitMQSink(URL, exchange)
        await sink.connect()
        await sink.close()
        # Re-declaring with the same type and durability is accepted; anything else is not.
        await broker.channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        for kind, durable in ((aio_pika.ExchangeType.TOPIC, False), ("direct", True)):
            channel = await broker.connection.channel()
            with pytest.raises(ChannelPreconditionFailed):
                await channel.declare_exchange(exchange, kind, durable=durable)

    async def test_an_existing_exchange_of_another_kind_fails_connect_naming_the_setting(
        self, namespace: str, broker: Broker
    ) -> None:
        exchange = f"{namespace}.direct"
        broker.exchanges.append(exchange)
        await broker.channel.declare_exchange(exchange, "direct", durable=True)
        sink = RabbitMQSink(URL, exchange)
        with pytest.raises(SinkError, match="DCON_RABBITMQ_EXCHANGE"):
            await sink.connect()
        await sink.close()

    async def test_same_event_id_in_flight_twice_never_succeeds_falsely(
        self, namespace: str, broker: Broker
    ) -> None:
        """Two copies of one eventId at once, one unroutable: exactly that one fails.

        The driver matches a returned message to its publish by message_id, so without
        the sink's guard the routed copy would fail and the unroutable one take its ack.
        """
        exchange = f"{namespace}.some"
        await broker.exchange(exchange)
        await broker.queue(f"{namespace}.some", exchange, "routed.#")
        sink = RabbitMQSink(URL, exchange)
        await sink.connect()
        try:
            for _ in range(5):
                body = sample_body("touch")
                lost = received(_same_event(body, "nobody"))
                kept = received(_same_event(body, "routed"))
                results = await asyncio.gather(
                    sink.send(lost), sink.send(kept), return_exceptions=True
                )
                assert isinstance(results[0], SinkError)
                assert results[1] is None
        finally:
            await sink.close()
        assert len(await broker.messages(f"{namespace}.some", 5)) == 5

    async def test_a_cancelled_send_leaves_the_sink_usable(
        self, sink: RabbitMQSink, namespace: str
    ) -> None:
        for delay in (0, 0.001, 0.01):
            task = asyncio.ensure_future(sink.send(received(sample_body("touch"))))
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        after = sample_body("co2")
        await sink.send(received(after))
        await sink.ping()
        got = await self.read_back(namespace, 1)
        assert (event_id(after), after) in got

    async def test_send_and_ping_fail_fast_while_the_broker_is_away(
        self, proxy: TcpProxy, namespace: str
    ) -> None:
        sink = self.make_sink("127.0.0.1", proxy.port, namespace)
        await sink.connect()
        try:
            await proxy.cut()
            async with asyncio.timeout(2):  # well inside the receiver's deadline
                with pytest.raises(SinkError):
                    await sink.send(received(sample_body("touch")))
                with pytest.raises(SinkError):
                    await sink.ping()
        finally:
            await sink.close()

    async def test_connect_to_an_unreachable_broker_is_a_sink_error(self, proxy: TcpProxy) -> None:
        await proxy.cut()
        sink = RabbitMQSink(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", "dt.events")
        with pytest.raises(SinkError, match="cannot connect"):
            await sink.connect()
        await sink.close()

    async def test_send_before_connect_and_after_close_fail_and_close_is_idempotent(
        self, namespace: str
    ) -> None:
        sink = self.make_sink(HOST, PORT, namespace)
        with pytest.raises(SinkError, match="not connected"):
            await sink.send(received(sample_body("touch")))
        await sink.connect()
        await sink.close()
        await sink.close()
        with pytest.raises(SinkError, match="closed"):
            await sink.send(received(sample_body("touch")))
        with pytest.raises(SinkError, match="closed"):
            await sink.ping()
        with pytest.raises(SinkError, match="closed"):
            await sink.connect()


def _same_event(body: bytes, project: str) -> bytes:
    doc = json.loads(body)
    doc["metadata"]["projectId"] = project
    doc["event"]["targetName"] = f"projects/{project}/devices/{doc['metadata']['deviceId']}"
    return json.dumps(doc, separators=(",", ":")).encode()


# --- no broker needed ---------------------------------------------------------------------


def test_routing_key_renders_the_template_with_one_word_per_value() -> None:
    sink = RabbitMQSink(URL, "dt.events")
    event = received(body_with(projectId="p.1", deviceType="x#y z*"))
    assert sink.routing_key(event) == "p_1.x_y_z_.touch"


def test_routing_key_uses_unknown_for_a_missing_value() -> None:
    doc = json.loads(sample_body("touch", project_id="p1"))
    del doc["metadata"]  # bodies from before 2022 have none
    sink = RabbitMQSink(URL, "dt.events", "dt.{projectId}.{deviceType}")
    assert sink.routing_key(received(json.dumps(doc).encode())) == "dt.p1.unknown"


def test_clean_word_keeps_ordinary_ids() -> None:
    assert clean_word("c14u9p094l47cdv1o3pg") == "c14u9p094l47cdv1o3pg"
    assert clean_word("a.b*c#d e") == "a_b_c_d_e"


def test_a_routing_key_over_255_bytes_is_a_sink_error() -> None:
    sink = RabbitMQSink(URL, "dt.events", "{deviceId}")
    with pytest.raises(SinkError, match="255"):
        sink.routing_key(received(sample_body("touch", device_id="d" * 256)))


def test_from_settings_builds_without_io() -> None:
    settings = Settings(
        sinks=["rabbitmq"],
        rabbitmq_url="amqp://u:p@nowhere.invalid:1/vh",
        rabbitmq_exchange="dt.x",
        rabbitmq_routing_key="{eventType}",
        sink_timeout=2,
    )
    [sink] = build_sinks(settings)
    assert isinstance(sink, RabbitMQSink)
    assert (sink.exchange_name, sink.routing_key_template.text, sink.timeout) == (
        "dt.x",
        "{eventType}",
        2,
    )
    assert "p@" not in sink.where


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/", "amqp:///", "amqp://h:99999/", "127.0.0.1:5672"]
)
def test_a_bad_url_names_the_setting(url: str) -> None:
    with pytest.raises(SinkConfigError, match="DCON_RABBITMQ_URL"):
        RabbitMQSink(url, "dt.events")


def test_a_bad_url_error_does_not_show_the_password() -> None:
    with pytest.raises(SinkConfigError) as caught:
        RabbitMQSink("http://user:s3cret@host/", "dt.events")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize("name", ["", "amq.topic", "has space", "x" * 256])
def test_a_bad_exchange_names_the_setting(name: str) -> None:
    with pytest.raises(SinkConfigError, match="DCON_RABBITMQ_EXCHANGE"):
        RabbitMQSink(URL, name)


@pytest.mark.parametrize("template", ["{projectId}.{nope}", "dt.#", "dt.*.{eventType}", "{"])
def test_a_bad_routing_key_template_names_the_setting(template: str) -> None:
    with pytest.raises(SinkConfigError, match="DCON_RABBITMQ_ROUTING_KEY"):
        RabbitMQSink(URL, "dt.events", template)
