"""``redis``: the dedup window in Redis, shared by every replica that uses the same prefix.

One key per eventId, ``<prefix><eventId>``. A claim is ``SET key <token> NX PX <lease>``,
atomic on the server, inside a tiny Lua script that also says, when the key exists,
whether it is delivered or still in flight. A commit overwrites the key with
``delivered`` and the window as its expiry; a release deletes it only while it still
holds our token. An in-flight key expires by itself after the lease, so a replica that
died mid-delivery blocks nobody for longer than that. Operations that arrive together go
in one pipeline: one round trip for the lot (see ``app.dedup_shared``).

The window bounds memory: every key expires. ``DCON_DEDUP_MAX_ENTRIES`` does not apply
(Redis has no cheap way to drop the oldest N keys); size Redis for the ids of one window.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from app.dedup_shared import Action, Claim, Op, Result, SharedDedup
from app.errors import ConfigError, DedupUnavailable
from app.redis_pool import redis_client

DELIVERED = "delivered"  # a token is hex, so it can never read as this
MAX_CONNECTIONS = 32
# A claim that cannot reach Redis must fail well inside DT's 10 s, as a 503.
TIMEOUT = 2.0
# One immediate retry on a lost connection: after an outage a pooled one may be dead.
# Every operation is idempotent, so a retried pipeline changes nothing twice.
RETRIES = 1

# 1: ours (also when a retry finds our own token), 0: delivered, 2: held by another.
TAKE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return 1 end
if held == ARGV[3] then return 0 end
return 2
"""
GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
ANSWERS = {1: Claim.OURS, 0: Claim.DELIVERED, 2: Claim.HELD}


def milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisDedup(SharedDedup):
    """Delivered and in-flight eventIds as expiring Redis keys, for every replica.

    Raises ``ConfigError`` for an unusable URL at construction; does no I/O until
    ``connect``.
    """

    store = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        window: float,
        lease: float,
        wait: float,
        retry_after: int,
    ) -> None:
        super().__init__(wait=wait, retry_after=retry_after)
        try:
            parse_url(url)
        except ValueError as exc:
            # The URL is not echoed: it may carry a password.
            raise ConfigError(f"DCON_DEDUP_REDIS_URL: {exc}") from None
        self.url = url
        self.prefix = prefix
        self.window_ms = milliseconds(window)
        self.lease_ms = milliseconds(lease)
        self._client: Redis | None = None

    async def connect(self) -> None:
        """Open the connection pool and prove the server answers."""
        if self._client is not None:
            return
        self._client = redis_client(
            self.url, max_connections=MAX_CONNECTIONS, timeout=TIMEOUT, connect_timeout=TIMEOUT
        )
        try:
            await self._ask(self._client.ping())
        except BaseException:
            await self._close_store()
            raise

    def key(self, event_id: str) -> str:
        return f"{self.prefix}{event_id}"

    async def _run_batch(self, ops: list[Op]) -> list[Result]:
        if self._client is None:
            raise DedupUnavailable("redis dedup store is not connected", self.retry_after)
        pipe = self._client.pipeline(transaction=False)
        for op in ops:
            key = self.key(op.event_id)
            if op.action is Action.TAKE:
                pipe.eval(TAKE, 1, key, op.token, self.lease_ms, DELIVERED)
            elif op.action is Action.DELIVER:
                # Unconditional: the event is in every sink, whoever holds the claim by now.
                pipe.set(key, DELIVERED, px=self.window_ms)
            else:
                pipe.eval(GIVE_BACK, 1, key, op.token)
        answers = await self._ask(pipe.execute(raise_on_error=False))
        return [self._result(op, answer) for op, answer in zip(ops, answers, strict=True)]

    def _result(self, op: Op, answer: Any) -> Result:
        if isinstance(answer, Exception):
            return DedupUnavailable(f"redis dedup store: {answer}", self.retry_after)
        return ANSWERS[int(answer)] if op.action is Action.TAKE else None

    async def _close_store(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _ask(self, command: Any) -> Any:
        """Await Redis; an unreachable or failing server is ``DedupUnavailable``."""
        try:
            async with asyncio.timeout(TIMEOUT * (RETRIES + 1)):
                return await command
        except (RedisError, OSError, TimeoutError) as exc:
            detail = f"redis dedup store unavailable: {exc or type(exc).__name__}"
            raise DedupUnavailable(detail, self.retry_after) from exc
