"""The Redis client both the ``redis`` sink and the Redis dedup store use."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def redis_client(
    url: str, *, max_connections: int, timeout: float, connect_timeout: float
) -> Redis:
    """A client over a bounded pool, with one immediate retry on a lost connection:
    after an outage a pooled connection may be dead, and a fresh one should take the next
    command rather than fail it."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=connect_timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
    )
    return Redis.from_pool(pool)
