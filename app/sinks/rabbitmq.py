"""``rabbitmq``: each event published to a durable topic exchange, confirmed by the broker.

The message body is DT's raw body; ``message_id`` is the eventId and the headers carry the
rest of the metadata. ``send`` returns only once the broker has confirmed the message
(publisher confirms), and the message is published *mandatory*: RabbitMQ confirms a
message that no queue is bound to receive and then drops it, so an unroutable message comes
back as a return and counts as a failure. Until some queue is bound, every event is
refused with 503 and DT keeps retrying, rather than answered 200 and lost.

The connection is a robust one: after an outage it reconnects in the background every
``reconnect_interval`` seconds and re-declares the exchange. A send while it is down fails
at once.
"""

from __future__ import annotations

import asyncio
import re
import string
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aio_pika
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    HeadersType,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

from app.sinks.base import SinkConfigError, SinkError
from app.sinks.template import Template

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings

NAME = "rabbitmq"
CONNECT_TIMEOUT = 10.0
# Seconds between reconnection attempts while the broker is away, unless the URL sets
# ?reconnect_interval=. Short enough that DT's next retry after an outage goes through.
RECONNECT_INTERVAL = 2.0
MAX_KEY_BYTES = 255  # AMQP shortstr
# Exchange names RabbitMQ accepts; "amq." is reserved for its own exchanges.
EXCHANGE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,255}")
# A '.' would split a value into two words; '*' and '#' are wildcards in binding keys.
UNSAFE_IN_WORD = re.compile(r"[.*#\s]")


def clean_word(value: str) -> str:
    """One value as one routing-key word: ``.``, ``*``, ``#`` and spaces become ``_``."""
    return UNSAFE_IN_WORD.sub("_", value)


class RabbitMQSink:
    """Publish each event to a durable topic exchange; ``send`` returns on the broker's ack.

    An instance is connected once and closed once.
    """

    name = NAME

    def __init__(
        self,
        url: str,
        exchange: str,
        routing_key: str = "{projectId}.{deviceType}.{eventType}",
        *,
        timeout: float = 5.0,
    ) -> None:
        self.url = _checked_url(url)
        self.exchange_name = _checked_exchange(exchange)
        self.routing_key_template = _checked_routing_key(routing_key)
        self.timeout = timeout
        parts = urlsplit(url)
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        self.where = f"{parts.hostname}:{port}{parts.path or '/'}"  # for messages: no password
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractRobustExchange | None = None
        self._closed = False
        # eventIds being published right now; see _one_at_a_time.
        self._in_flight: dict[str, asyncio.Event] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> RabbitMQSink:
        return cls(
            settings.rabbitmq_url,
            settings.rabbitmq_exchange,
            settings.rabbitmq_routing_key,
            timeout=settings.sink_timeout,
        )

    async def connect(self) -> None:
        """Connect and declare the exchange (durable, topic); raise ``SinkError`` if not."""
        if self._closed:
            raise SinkError(NAME, "closed")
        if self._connection is not None:
            return
        url = make_url(self.url)
        if "reconnect_interval" not in url.query:
            url = url.update_query(reconnect_interval=RECONNECT_INTERVAL)
        connection = aio_pika.RobustConnection(url)
        try:
            await connection.connect(timeout=CONNECT_TIMEOUT)
        except Exception as exc:
            await connection.close()
            raise SinkError(NAME, f"cannot connect to {self.where}: {_describe(exc)}") from exc
        except BaseException:
            await connection.close()  # a cancelled start must not leave a reconnect loop behind
            raise
        try:
            channel = connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.initialize(timeout=CONNECT_TIMEOUT)
            exchange = await channel.declare_exchange(
                self.exchange_name,
                aio_pika.ExchangeType.TOPIC,
                durable=True,
                timeout=CONNECT_TIMEOUT,
            )
        except BaseException as exc:
            await connection.close()
            if isinstance(exc, Exception):
                raise SinkError(
                    NAME,
                    f"cannot declare durable topic exchange {self.exchange_name!r} "
                    f"(DCON_RABBITMQ_EXCHANGE) on {self.where}: {_describe(exc)}",
                ) from exc
            raise
        self._connection, self._channel, self._exchange = connection, channel, exchange

    async def send(self, event: ReceivedEvent) -> None:
        """Publish (persistent, mandatory) and return once the broker has confirmed it."""
        exchange = self._ready()
        key = self.routing_key(event)
        message = self.message(event)
        async with self._one_at_a_time(event.event_id):
            try:
                result = await exchange.publish(message, key, mandatory=True, timeout=self.timeout)
            except PublishError as exc:
                raise SinkError(
                    NAME,
                    f"no queue is bound to exchange {self.exchange_name!r} for routing key "
                    f"{key!r}: the broker returned the event unstored (bind a queue, e.g. "
                    f"with '#'); refusing so that DT retries",
                ) from exc
            except DeliveryError as exc:
                raise SinkError(NAME, f"the broker refused the event (nack): {exc}") from exc
            except TimeoutError as exc:
                raise SinkError(
                    NAME, f"no confirm from {self.where} within {self.timeout:g} s"
                ) from exc
            except asyncio.CancelledError as exc:
                if _cancelled_by_caller():
                    raise
                # The driver cancels pending confirms when the connection drops.
                raise SinkError(
                    NAME, f"connection to {self.where} lost before the confirm"
                ) from exc
            except Exception as exc:
                raise SinkError(NAME, f"cannot publish to {self.where}: {_describe(exc)}") from exc
        if not isinstance(result, Basic.Ack):
            raise SinkError(NAME, f"the broker did not confirm the event: {result!r}")

    async def ping(self) -> None:
        """Re-declare the exchange: one round trip, and it restores a deleted exchange."""
        exchange = self._ready()
        try:
            async with asyncio.timeout(self.timeout):
                await exchange.declare()
        except TimeoutError as exc:
            raise SinkError(NAME, f"{self.where} did not answer within {self.timeout:g} s") from exc
        except Exception as exc:
            raise SinkError(NAME, f"{self.where}: {_describe(exc)}") from exc

    async def close(self) -> None:
        """Close the connection and stop reconnecting; idempotent."""
        self._closed = True
        connection = self._connection
        self._connection, self._channel, self._exchange = None, None, None
        if connection is not None:
            with suppress(Exception):  # closing a connection that is already gone
                await connection.close()

    def routing_key(self, event: ReceivedEvent) -> str:
        key = self.routing_key_template.render(event, clean_word)
        if len(key.encode()) > MAX_KEY_BYTES:
            raise SinkError(NAME, f"routing key longer than {MAX_KEY_BYTES} bytes: {key[:60]!r}…")
        return key

    def message(self, event: ReceivedEvent) -> aio_pika.Message:
        headers: HeadersType = {k: v for k, v in event.meta().items() if v is not None}
        return aio_pika.Message(
            event.body,
            headers=headers,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.event_id,
            timestamp=event.received_at,
            type=event.event_type,
            app_id="dcon-receiver",
        )

    def _ready(self) -> AbstractRobustExchange:
        connection, channel, exchange = self._connection, self._channel, self._exchange
        if connection is None or channel is None or exchange is None:
            raise SinkError(NAME, "closed" if self._closed else "not connected")
        if not connection.connected.is_set() or channel.is_closed:
            raise SinkError(NAME, f"connection to {self.where} is down; reconnecting")
        return exchange

    @asynccontextmanager
    async def _one_at_a_time(self, event_id: str | None) -> AsyncIterator[None]:
        """Never two publishes of one eventId in flight together.

        The driver matches a returned message to its publish by ``message_id``. With two
        copies of one eventId in flight, a return of the first would fail the second while
        the first took the broker's ack for itself: a false success.
        """
        if event_id is None:
            yield
            return
        while (other := self._in_flight.get(event_id)) is not None:
            await other.wait()
        done = self._in_flight[event_id] = asyncio.Event()
        try:
            yield
        finally:
            del self._in_flight[event_id]
            done.set()


def _cancelled_by_caller() -> bool:
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _checked_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as exc:
        raise SinkConfigError(f"DCON_RABBITMQ_URL: {exc}") from None
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise SinkConfigError(
            "DCON_RABBITMQ_URL: expected amqp://[user:password@]host[:port][/vhost] "
            f"(or amqps://), got scheme {parts.scheme!r} and host {parts.hostname!r}"
        )
    return url


def _checked_exchange(name: str) -> str:
    if not EXCHANGE_NAME.fullmatch(name) or name.startswith("amq."):
        raise SinkConfigError(
            f"DCON_RABBITMQ_EXCHANGE: {name!r} is not a usable exchange name (1-255 of "
            "letters, digits, '-', '_', '.', ':'; not starting with 'amq.')"
        )
    return name


def _checked_routing_key(text: str) -> Template:
    template = Template(text, "DCON_RABBITMQ_ROUTING_KEY")
    literal = "".join(part for part, *_ in string.Formatter().parse(text))
    if "*" in literal or "#" in literal:
        raise SinkConfigError(
            f"DCON_RABBITMQ_ROUTING_KEY: {text!r} contains '*' or '#', which are wildcards "
            "for binding keys, not part of a routing key"
        )
    return template
