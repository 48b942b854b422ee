"""``redis``: each event appended to a Redis Stream with XADD.

The entry carries DT's raw body in the ``body`` field and the event's metadata in fields
beside it. ``send`` returns once Redis has answered XADD with the entry id; how durable
that is then depends on the server's persistence (``appendonly yes`` with ``appendfsync
always`` or ``everysec``). Redis Streams do not deduplicate by eventId.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from app.redis_pool import redis_client
from app.sinks.base import SinkConfigError, SinkError
from app.sinks.template import Template

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings

NAME = "redis"
# Concurrent sends each borrow a connection; past this many they queue for one.
MAX_CONNECTIONS = 16
CONNECT_TIMEOUT = 3.0
# A backstop only: the receiver's deadline (DCON_SINK_TIMEOUT) cancels a send far sooner.
SOCKET_TIMEOUT = 10.0
PING_TIMEOUT = 3.0


class RedisSink:
    """XADD every event to the stream its template names, trimmed to about ``maxlen``."""

    name = NAME

    def __init__(self, url: str, stream: str, *, maxlen: int = 0) -> None:
        try:
            parse_url(url)
        except ValueError as exc:
            # The URL is not echoed: it may carry a password.
            raise SinkConfigError(f"DCON_REDIS_URL: {exc}") from None
        if not stream:
            raise SinkConfigError("DCON_REDIS_STREAM: the stream name is empty")
        if maxlen < 0:
            raise SinkConfigError(f"DCON_REDIS_MAXLEN: must be 0 or more (got {maxlen})")
        self.url = url
        self.stream = Template(stream, "DCON_REDIS_STREAM")
        self.maxlen = maxlen
        self._client: Redis | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisSink:
        return cls(settings.redis_url, settings.redis_stream, maxlen=settings.redis_maxlen)

    async def connect(self) -> None:
        """Open the connection pool and prove the server answers."""
        if self._client is not None:
            return
        self._client = redis_client(
            self.url,
            max_connections=MAX_CONNECTIONS,
            timeout=SOCKET_TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
        )
        try:
            await self.ping()
        except BaseException:
            await self.close()
            raise

    async def send(self, event: ReceivedEvent) -> None:
        """Return once Redis has answered XADD with the new entry's id."""
        client = self._connected()
        stream = self.stream.render(event)
        try:
            await client.xadd(
                stream,
                fields(event),
                maxlen=self.maxlen or None,
                approximate=True,
            )
        except (RedisError, OSError) as exc:
            raise SinkError(NAME, f"XADD to {stream!r} failed: {exc}") from exc

    async def ping(self) -> None:
        client = self._connected()
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await client.ping()
        except TimeoutError:
            raise SinkError(NAME, f"no answer to PING within {PING_TIMEOUT:g} s") from None
        except (RedisError, OSError) as exc:
            raise SinkError(NAME, f"PING failed: {exc}") from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _connected(self) -> Redis:
        if self._client is None:
            raise SinkError(NAME, "not connected")
        return self._client


def fields(event: ReceivedEvent) -> dict[FieldT, EncodableT]:
    """The entry: every metadata value as a string (absent ones left out), then the body."""
    entry: dict[FieldT, EncodableT] = {}
    for key, value in event.meta().items():
        if value is None:
            continue
        entry[key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    entry["body"] = event.body
    return entry
