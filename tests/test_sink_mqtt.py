"""The mqtt sink against the real Mosquitto on 127.0.0.1:1883 (and private brokers)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import pytest

from app.events import parse_body
from app.received import ReceivedEvent
from app.samples import sample_body
from app.settings import Settings
from app.signature import SchemePass, Verification
from app.sinks.base import SinkConfigError, SinkError
from app.sinks.mqtt import Broker, MqttSink, clean_level, parse_url
from tests.mqtt_broker import MqttV311Broker, mosquitto
from tests.sink_contract import SinkContract, event_id, received
from tests.tcp_proxy import TcpProxy

SERVER = ("127.0.0.1", 1883)
READ_BACK_SECONDS = 5.0


def template(namespace: str) -> str:
    return namespace + "/{projectId}/{deviceId}/{eventType}"


def settings_for(namespace: str, url: str = "mqtt://127.0.0.1:1883", **overrides: Any) -> Settings:
    values: dict[str, Any] = {"mqtt_url": url, "mqtt_topic": template(namespace), "sink_timeout": 3}
    values.update(overrides)
    return Settings(**values)


def event(body: bytes) -> ReceivedEvent:
    signed = Verification((SchemePass("secret", "secret #1"),))
    return ReceivedEvent(body, parse_body(body), signed, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))


def properties(message: aiomqtt.Message) -> dict[str, str]:
    pairs = getattr(message.properties, "UserProperty", [])
    return dict(pairs)


def payload(message: aiomqtt.Message) -> bytes:
    assert isinstance(message.payload, bytes)
    return message.payload


class Subscriber:
    """A client subscribed at QoS 1 to ``topic_filter``, collecting what arrives."""

    def __init__(self, topic_filter: str, port: int = SERVER[1]) -> None:
        self.topic_filter = topic_filter
        self.port = port
        self.messages: list[aiomqtt.Message] = []
        self._arrived = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Subscriber]:
        client = aiomqtt.Client("127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5)
        async with client:
            await client.subscribe(self.topic_filter, qos=1)
            task = asyncio.create_task(self._collect(client))
            try:
                yield self
            finally:
                task.cancel()
                await asyncio.wait([task])

    async def _collect(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self.messages.append(message)
            self._arrived.set()

    async def wait_for(self, count: int) -> list[aiomqtt.Message]:
        """The messages so far, once there are ``count`` of them (bounded wait)."""
        deadline = time.monotonic() + READ_BACK_SECONDS
        while len(self.messages) < count:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        return list(self.messages)


class TestMqttContract(SinkContract):
    """The contract reads back after sending, and MQTT delivers only to subscriptions that
    exist at publish time: so a subscriber to the test's namespace starts before the sink
    (an autouse fixture runs before the contract's ``sink`` fixture and test body)."""

    target = SERVER
    dedups = False

    @pytest.fixture(autouse=True)
    async def subscriber(self, namespace: str) -> AsyncIterator[Subscriber]:
        async with Subscriber(f"{namespace}/#").running() as subscriber:
            self._subscriber = subscriber
            yield subscriber

    def make_sink(self, host: str, port: int, namespace: str) -> MqttSink:
        return MqttSink.from_settings(settings_for(namespace, f"mqtt://{host}:{port}"))

    async def read_back(self, namespace: str, expected: int) -> list[tuple[str, bytes]]:
        messages = await self._subscriber.wait_for(expected)
        return [(properties(m).get("eventId", ""), payload(m)) for m in messages]


# --- settings ------------------------------------------------------------------------------


def test_values_are_cleaned_so_that_each_stays_one_topic_level() -> None:
    sink = MqttSink.from_settings(settings_for("t1"))
    body = sample_body("touch", project_id="p+1#\x00", device_id="d1")
    assert sink.topic.render(event(body), clean_level) == "t1/p_1__/d1/touch"
    assert clean_level("new/type") == "new_type"


@pytest.mark.parametrize(
    ("url", "broker"),
    [
        ("mqtt://127.0.0.1", Broker("127.0.0.1", 1883, tls=False)),
        ("mqtts://broker.example", Broker("broker.example", 8883, tls=True)),
        (
            "mqtts://us%40r:p%3Ass@h:1234/?client_id=dcon-1",
            Broker("h", 1234, tls=True, username="us@r", password="p:ss", client_id="dcon-1"),
        ),
        ("mqtt://user@h:1", Broker("h", 1, tls=False, username="user")),
    ],
)
def test_broker_urls(url: str, broker: Broker) -> None:
    assert parse_url(url, "DCON_MQTT_URL") == broker


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1883",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://h:port",
        "mqtt://h:99999",
        "mqtt://h/some/path",
        "mqtt://h?clientid=x",
        "mqtt://h?client_id=",
        "mqtt://h?client_id=a&client_id=b",
        "127.0.0.1:1883",
    ],
)
def test_a_bad_url_fails_at_build_time_naming_dcon_mqtt_url(url: str) -> None:
    with pytest.raises(SinkConfigError, match="DCON_MQTT_URL"):
        MqttSink.from_settings(settings_for("t1", url))


@pytest.mark.parametrize("topic", ["", "$SYS/{eventType}", "dt/+/{eventType}", "dt/#", "dt/{x}"])
def test_a_bad_topic_template_fails_at_build_time(topic: str) -> None:
    with pytest.raises(SinkConfigError, match="DCON_MQTT_TOPIC"):
        MqttSink.from_settings(settings_for("t1", mqtt_topic=topic))


def test_the_password_never_shows_in_the_broker_name() -> None:
    sink = MqttSink.from_settings(settings_for("t1", "mqtt://u:secret@h:1"))
    assert "secret" not in str(sink.broker)


# --- against the broker --------------------------------------------------------------------


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    return "m" + format(abs(hash((request.node.nodeid, time.time_ns()))), "x")[:12]


@contextlib.asynccontextmanager
async def connected(sink: MqttSink) -> AsyncIterator[MqttSink]:
    await sink.connect()
    try:
        yield sink
    finally:
        await sink.close()


@pytest.mark.anyio
async def test_metadata_travels_as_user_properties_and_the_body_unchanged(namespace: str) -> None:
    body = sample_body("touch", project_id="proj+1", device_id="dev1")
    async with Subscriber(f"{namespace}/#").running() as subscriber:
        async with connected(MqttSink.from_settings(settings_for(namespace))) as sink:
            await sink.send(event(body))
        [message] = await subscriber.wait_for(1)
    assert message.topic.value == f"{namespace}/proj_1/dev1/touch"
    assert payload(message) == body
    assert message.qos == 1
    assert not message.retain
    assert getattr(message.properties, "ContentType", None) == "application/json"
    assert properties(message) == {
        "eventId": event_id(body),
        "eventType": "touch",
        "projectId": "proj+1",
        "deviceId": "dev1",
        "receivedAt": "2026-01-02T03:04:05Z",
        "verified": "true",
        "verification": "secret",
        "outcome": "typed",
    }


@pytest.mark.anyio
async def test_with_retain_a_late_subscriber_gets_the_latest_event_of_each_topic(
    namespace: str,
) -> None:
    older = sample_body("temperature", device_id="d1")
    latest = sample_body("temperature", device_id="d1")
    other = sample_body("temperature", device_id="d2")
    sink = MqttSink.from_settings(settings_for(namespace, mqtt_retain=True))
    async with connected(sink):
        try:
            for body in (older, latest, other):
                await sink.send(event(body))  # nobody subscribed: retained, so accepted
            async with Subscriber(f"{namespace}/#").running() as late:
                got = await late.wait_for(2)
        finally:
            await clear_retained(namespace, [older, other])
    assert all(m.retain for m in got)
    assert sorted(payload(m) for m in got) == sorted([latest, other])


async def clear_retained(namespace: str, bodies: list[bytes]) -> None:
    """An empty retained message removes a topic's retained one (the broker persists them)."""
    async with aiomqtt.Client(*SERVER) as client:
        for body in bodies:
            topic = MqttSink.from_settings(settings_for(namespace)).topic.render(event(body))
            await client.publish(topic, b"", qos=1, retain=True)


@pytest.mark.anyio
async def test_without_retain_an_event_nobody_subscribes_to_is_not_reported_stored(
    namespace: str,
) -> None:
    async with connected(MqttSink.from_settings(settings_for(namespace))) as sink:
        with pytest.raises(SinkError, match="no subscriber"):
            await sink.send(event(sample_body("touch")))


@pytest.mark.anyio
async def test_a_puback_refusal_fails_the_send() -> None:
    """Mosquitto answers an ACL-denied MQTT 5 publish with PUBACK "Not authorized";
    aiomqtt alone would call that a success."""
    async with mosquitto("topic read #\ntopic write allowed/#\n") as port:
        url = f"mqtt://127.0.0.1:{port}"
        async with Subscriber("#", port).running():
            denied = MqttSink.from_settings(settings_for("t", url, mqtt_topic="denied/{eventId}"))
            async with connected(denied):
                with pytest.raises(SinkError, match="Not authorized"):
                    await denied.send(event(sample_body()))
            allowed = MqttSink.from_settings(settings_for("t", url, mqtt_topic="allowed/{eventId}"))
            async with connected(allowed):
                await allowed.send(event(sample_body()))


@pytest.mark.anyio
async def test_a_broker_without_mqtt_5_gets_the_payload_alone_over_3_1_1() -> None:
    async with MqttV311Broker() as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        sink = MqttSink.from_settings(settings_for("v3", url, mqtt_topic="v3/{eventType}"))
        body = sample_body("co2")
        async with connected(sink):
            await sink.send(event(body))
            await sink.ping()
        assert broker.protocols == [5, 4]
        assert broker.published == [("v3/co2", body)]


@pytest.mark.anyio
async def test_connect_to_nothing_fails_at_once() -> None:
    async with TcpProxy(*SERVER) as proxy:
        port = proxy.port
    sink = MqttSink.from_settings(settings_for("t1", f"mqtt://127.0.0.1:{port}"))
    with pytest.raises(SinkError, match="cannot connect"):
        await asyncio.wait_for(sink.connect(), 5)
    with pytest.raises(SinkError, match="not connected"):
        await sink.send(event(sample_body()))
    await sink.close()


@pytest.mark.anyio
async def test_a_send_during_an_outage_fails_fast_and_a_cancelled_one_leaves_the_sink_usable(
    namespace: str,
) -> None:
    async with (
        Subscriber(f"{namespace}/#").running() as subscriber,
        TcpProxy(*SERVER) as proxy,
    ):
        sink = MqttSink.from_settings(settings_for(namespace, f"mqtt://127.0.0.1:{proxy.port}"))
        async with connected(sink):
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
            await send_until_stored(sink, event(body))
            got = await subscriber.wait_for(1)
    assert body in [payload(m) for m in got]


async def send_until_stored(sink: MqttSink, item: ReceivedEvent) -> None:
    for _ in range(40):
        try:
            await sink.send(item)
        except SinkError:
            await asyncio.sleep(0.25)
        else:
            return
    await sink.send(item)


@pytest.mark.anyio
async def test_close_is_idempotent_and_a_closed_sink_refuses(namespace: str) -> None:
    sink = MqttSink.from_settings(settings_for(namespace))
    await sink.connect()
    await sink.ping()
    await sink.close()
    await sink.close()
    with pytest.raises(SinkError, match="closed"):
        await sink.send(received(sample_body()))
    with pytest.raises(SinkError, match="closed"):
        await sink.ping()
    with pytest.raises(SinkError, match="closed"):
        await sink.connect()
