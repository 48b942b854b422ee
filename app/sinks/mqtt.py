"""``mqtt``: each event published at QoS 1; ``send`` returns on the broker's PUBACK.

The payload is DT's raw body; the metadata rides along as MQTT 5 user properties (a broker
that only speaks 3.1.1 gets the payload alone). QoS 1 is at-least-once and MQTT has no
dedup by id: a subscriber may see an event twice and deduplicates on ``eventId``.

With MQTT 5 the PUBACK carries a reason code, which aiomqtt drops; this sink reads it, so
that a refusal (not authorized, quota exceeded, …) is a failure rather than a false
success. "No matching subscribers" is a failure too unless the message is retained: the
broker then discards the event at once, which is not "held" by any measure (consumers
that must not miss events keep a persistent session subscribed at QoS 1, which counts).

aiomqtt does not reconnect, so a background task owns the connection: it connects, waits
for the connection to drop (or ``close``), and connects again every second. ``send``
never waits for a connection: while there is none it fails at once and DT retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from app.sinks.base import SinkConfigError, SinkError
from app.sinks.template import Template

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings

log = logging.getLogger(__name__)

NAME = "mqtt"
PORTS = {"mqtt": 1883, "mqtts": 8883}
KEEPALIVE = 15  # seconds; a silently dead connection is noticed within ~1.5x this
RECONNECT_WAIT = 1.0
CLOSE_TIMEOUT = 10.0
PING_TOPIC = "dcon-receiver/ping"  # only ever unsubscribed from, never used
# Fail a non-retained publish nobody is subscribed to: the broker drops it on the spot.
REQUIRE_SUBSCRIBER = True
NO_MATCHING_SUBSCRIBERS = 0x10
UNSUPPORTED_PROTOCOL = 0x84
# Not allowed inside a topic level: the separator, the wildcards, NUL.
UNSAFE = re.compile(r"[/+#\x00]")
PLACEHOLDER = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    client_id: str | None = None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(url: str, setting: str) -> Broker:
    """``mqtt[s]://[user[:password]@]host[:port][?client_id=ID]``."""
    usage = f"{setting}: expected mqtt[s]://[user[:password]@]host[:port][?client_id=ID]"
    try:
        parts = urlsplit(url)
        port = parts.port
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise SinkConfigError(f"{usage} ({exc})") from None
    if parts.scheme not in PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise SinkConfigError(f"{usage}; got scheme {parts.scheme!r}, host {parts.hostname!r}")
    unknown = sorted(set(query) - {"client_id"})
    ids = query.get("client_id", [])
    if unknown or len(ids) > 1 or (ids and not ids[0]):
        raise SinkConfigError(f"{usage}; unknown or repeated parameter in {parts.query!r}")
    return Broker(
        host=parts.hostname,
        port=port or PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        client_id=ids[0] if ids else None,
    )


def clean_level(value: str) -> str:
    """A template value made safe as (part of) one topic level."""
    return UNSAFE.sub("_", value)


def check_topic(text: str, setting: str) -> Template:
    template = Template(text, setting)
    static = PLACEHOLDER.sub("", text)
    if not text or text.startswith("$") or UNSAFE.search(static.replace("/", "")):
        raise SinkConfigError(
            f"{setting}: {text!r} is not an MQTT topic template: not empty, not starting "
            "with '$', no '+', '#' or NUL"
        )
    return template


def user_properties(event: ReceivedEvent) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho
    properties.ContentType = "application/json"
    pairs = []
    for key, value in event.meta().items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        pairs.append((key, text.replace("\x00", "")))
    properties.UserProperty = pairs
    return properties


class _Client(aiomqtt.Client):
    """aiomqtt's client, plus what its ``publish`` drops: the PUBACK's reason code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acks: dict[int, asyncio.Future[ReasonCode]] = {}

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        ack = self._acks.pop(mid, None)
        if ack is not None and not ack.done():
            ack.set_result(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool,
        properties: Properties | None,
    ) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        info = self._client.publish(topic, payload, 1, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        # The PUBACK can only arrive through the event loop, so registering now is in time.
        ack: asyncio.Future[ReasonCode] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = ack
        try:
            return await ack
        finally:
            self._acks.pop(info.mid, None)

    def fail_pending(self, reason: str) -> None:
        """Wake every publish still waiting for a PUBACK that can no longer come."""
        acks, self._acks = self._acks, {}
        for ack in acks.values():
            if not ack.done():
                ack.set_exception(aiomqtt.MqttError(reason))


class MqttSink:
    """Publish each event at QoS 1 to a topic built from ``topic``; reconnects on its own.

    ``send`` returns once the broker acknowledged the event (PUBACK). With ``retain`` the
    broker keeps the latest event of each topic for subscribers that come later.
    """

    name = NAME

    def __init__(self, url: str, *, topic: str, retain: bool, timeout: float) -> None:
        self.broker = parse_url(url, "DCON_MQTT_URL")
        self.topic = check_topic(topic, "DCON_MQTT_TOPIC")
        self.retain = retain
        self.timeout = timeout
        self.protocol = aiomqtt.ProtocolVersion.V5  # 3.1.1 once a broker refuses 5
        self._client_id = self.broker.client_id or f"dcon-receiver-{secrets.token_hex(6)}"
        self._tls: ssl.SSLContext | None = None
        self._client: _Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> MqttSink:
        return cls(
            settings.mqtt_url,
            topic=settings.mqtt_topic,
            retain=settings.mqtt_retain,
            timeout=settings.sink_timeout,
        )

    async def connect(self) -> None:
        """Connect once (failing if that fails), then keep the connection up in the background."""
        if self._closed:
            raise SinkError(NAME, "sink is closed")
        if self._runner is not None:
            return
        self._stopping.clear()
        if self.broker.tls and self._tls is None:
            self._tls = ssl.create_default_context()  # reads the system's CAs: once, here
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(first), name=f"mqtt-sink {self.broker}")
        try:
            await first
        except Exception as exc:
            await self._stop()
            raise SinkError(NAME, f"cannot connect to {self.broker}: {exc}") from exc
        except BaseException:
            first.cancel()
            await self._stop()
            raise

    async def send(self, event: ReceivedEvent) -> None:
        """Return once the broker acknowledged the event at QoS 1."""
        client = self._connected()
        topic = self.topic.render(event, clean_level)
        properties = user_properties(event) if self._v5 else None
        try:
            async with asyncio.timeout(self.timeout):
                code = await client.publish_acked(
                    topic, event.body, retain=self.retain, properties=properties
                )
        except TimeoutError:
            raise SinkError(NAME, f"no PUBACK for {topic!r} within {self.timeout:g} s") from None
        except aiomqtt.MqttError as exc:
            raise SinkError(NAME, f"publish to {topic!r} failed: {exc}") from exc
        if code.is_failure:
            raise SinkError(NAME, f"broker refused {topic!r}: {code}")
        if code.value == NO_MATCHING_SUBSCRIBERS and not self.retain and REQUIRE_SUBSCRIBER:
            raise SinkError(
                NAME,
                f"no subscriber for {topic!r}: the broker dropped the event (subscribe with a "
                "persistent session at QoS 1, or set DCON_MQTT_RETAIN=true)",
            )

    async def ping(self) -> None:
        """One round trip: an UNSUBSCRIBE (of a topic never subscribed) and its UNSUBACK."""
        client = self._connected()
        try:
            await client.unsubscribe(PING_TOPIC, timeout=self.timeout)
        except aiomqtt.MqttError as exc:
            raise SinkError(NAME, f"{self.broker} unreachable: {exc}") from exc

    async def close(self) -> None:
        """Disconnect and stop reconnecting; idempotent."""
        self._closed = True
        await self._stop()

    @property
    def _v5(self) -> bool:
        return self.protocol == aiomqtt.ProtocolVersion.V5

    def _connected(self) -> _Client:
        if self._client is None:
            if self._closed or self._runner is None:
                raise SinkError(NAME, "closed" if self._closed else "not connected")
            raise SinkError(NAME, f"not connected to {self.broker} (reconnecting)")
        return self._client

    def _new_client(self) -> _Client:
        return _Client(
            self.broker.host,
            self.broker.port,
            username=self.broker.username,
            password=self.broker.password,
            identifier=self._client_id,
            protocol=self.protocol,
            clean_session=None if self._v5 else True,
            clean_start=True if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=KEEPALIVE,
            timeout=self.timeout,
            tls_context=self._tls,
            logger=log,
        )

    async def _run(self, first: asyncio.Future[None]) -> None:
        """Connect, hold the connection until it drops or the sink stops, and repeat."""
        failures = 0
        while not self._stopping.is_set():
            try:
                async with self._new_client() as client:
                    if not first.done():
                        first.set_result(None)
                    elif failures:
                        log.info("MQTT %s: reconnected", self.broker)
                    failures = 0
                    self._client = client
                    try:
                        await self._hold(client)
                    finally:
                        self._client = None
                        client.fail_pending("connection lost")
            except Exception as exc:  # a supervisor outlives every failure
                if isinstance(exc, aiomqtt.MqttError) and self._refuses_v5(exc):
                    continue  # again at once, as 3.1.1
                if not first.done():
                    first.set_exception(exc)
                    return
                failures += 1
                # One warning per outage; the attempts every second go to debug.
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "MQTT %s: %s; reconnecting every %g s",
                    self.broker,
                    exc.__cause__ or exc,
                    RECONNECT_WAIT,
                )
            if not self._stopping.is_set():
                await self._wait_stop(RECONNECT_WAIT)

    async def _hold(self, client: _Client) -> None:
        """Return when ``close`` is called; raise ``MqttError`` when the connection drops."""
        # We subscribe to nothing, so the message iterator only ever ends, with MqttError,
        # when the connection is lost: the public way to learn of a disconnection.
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not stop.done():
                lost = asyncio.ensure_future(anext(aiter(client.messages)))
                try:
                    await asyncio.wait({lost, stop}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                if lost.done() and not lost.cancelled():
                    lost.result()  # raises MqttError; a stray message is ignored
        finally:
            stop.cancel()

    def _refuses_v5(self, exc: aiomqtt.MqttError) -> bool:
        code = getattr(exc, "rc", None)
        if self._v5 and isinstance(code, ReasonCode) and code.value == UNSUPPORTED_PROTOCOL:
            log.warning(
                "MQTT %s does not speak MQTT 5: using 3.1.1, events go without their "
                "metadata (user properties) and refusals cannot be detected",
                self.broker,
            )
            self.protocol = aiomqtt.ProtocolVersion.V311
            return True
        return False

    async def _wait_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping.set()
        # wait() rather than await: a cancelled close must not leave the runner half-stopped.
        done, _ = await asyncio.wait([runner], timeout=CLOSE_TIMEOUT)
        if not done:
            runner.cancel()
            await asyncio.wait([runner])
