"""The claim protocol of a dedup store that several processes share (SQLite, Redis).

Every claim carries a random token and lives in the shared store in one of two states:
*in flight* (someone is delivering it, for at most a lease) or *delivered* (for the
window). Taking a claim is one atomic step in the store, so two processes never both
deliver. Inside one process, a second request for an id waits on a local future, as
``MemoryDedup`` does; a claim held by another process is polled for a bounded time, and
past that the request gets ``DedupBusy`` (503) so that DT's retry finds the outcome.

A claim whose holder died (a crashed worker, a killed replica) is not waited for forever:
once its lease has run out, the next claim takes it over. The lease is longer than the
sinks' deadline, so a holder that is alive has always committed or released by then.

Store operations that arrive together are sent together: one batch, one round trip (one
thread hop and one transaction for SQLite, one pipeline for Redis), so a busy process
pays the store's fixed cost once per batch rather than once per event.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

from app.errors import DedupBusy, DedupUnavailable

log = logging.getLogger("dcon.dedup")

# Polling a claim held elsewhere: first look after 5 ms, then ever less often.
POLL_FIRST = 0.005
POLL_MAX = 0.1


class Claim(enum.Enum):
    """What the store answered to one attempt at claiming an id."""

    OURS = "ours"  # the caller delivers
    DELIVERED = "delivered"  # a duplicate
    HELD = "held"  # another process is delivering it right now


class Action(enum.Enum):
    TAKE = "take"  # claim unless delivered or held (a take-over past the window or lease)
    DELIVER = "deliver"  # mark delivered for the window, whoever holds it now
    GIVE_BACK = "give back"  # drop the in-flight claim if it still carries our token


@dataclass(frozen=True, slots=True)
class Op:
    action: Action
    event_id: str
    token: str


# What a batch answers per op: a Claim for TAKE, None otherwise, or the op's own error.
Result = Claim | None | DedupUnavailable


class SharedDedup(ABC):
    """Claim, commit and release against a shared store; subclasses run batches of ops.

    ``wait`` bounds how long a claim held by another process is waited for before
    ``DedupBusy``; ``retry_after`` is what that 503 (and ``DedupUnavailable``'s) tells DT.
    """

    store = "shared"

    def __init__(self, *, wait: float, retry_after: int) -> None:
        self.wait = wait
        self.retry_after = retry_after
        # Ids this process is claiming or delivering right now; resolved when settled.
        self._local: dict[str, asyncio.Future[None]] = {}
        self._tokens: dict[str, str] = {}  # our claims in the store, by id
        self._queue: list[tuple[Op, asyncio.Future[Result]]] = []
        self._flushing = False
        self._background: set[asyncio.Task[None]] = set()

    # --- what a store implements ------------------------------------------------------------

    @abstractmethod
    async def connect(self) -> None:
        """Open the store (and prove it answers); raise ``DedupUnavailable`` if it cannot."""

    @abstractmethod
    async def _run_batch(self, ops: list[Op]) -> list[Result]:
        """Apply ``ops`` in order, each atomically; one result per op.

        Raise ``DedupUnavailable`` if the store could not be asked at all.
        """

    @abstractmethod
    async def _close_store(self) -> None: ...

    # --- the DedupStore protocol ----------------------------------------------------------------

    async def claim(self, event_id: str) -> bool:
        """True if the caller must deliver ``event_id``; False if it was already delivered.

        Raises ``DedupBusy`` when another process still holds it after ``wait`` seconds,
        and ``DedupUnavailable`` when the store does not answer.
        """
        deadline: float | None = None
        delay = POLL_FIRST
        while True:
            pending = self._local.get(event_id)
            if pending is not None:
                # This process is deciding or delivering it; look again once that settles.
                await asyncio.shield(pending)
                continue
            outcome = await self._attempt(event_id)
            if outcome is not Claim.HELD:
                return outcome is Claim.OURS
            now = time.monotonic()
            deadline = now + self.wait if deadline is None else deadline
            if now >= deadline:
                raise DedupBusy(
                    f"eventId {event_id} is being delivered by another process; "
                    "its outcome is not known yet",
                    self.retry_after,
                )
            await asyncio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, POLL_MAX)

    async def commit(self, event_id: str) -> None:
        """Every sink took the event: remember it as delivered and wake local waiters.

        The event is stored whatever happens here, so a store that fails now is logged,
        not raised: the answer stays 200, and at worst a later copy is delivered again.
        """
        token = self._tokens.pop(event_id, secrets.token_hex(8))
        try:
            await self._mark_delivered(event_id, token)
        except DedupUnavailable as exc:
            log.warning(
                "eventId %s is stored but not marked delivered in the %s dedup store (%s); "
                "a later copy may be delivered again",
                event_id,
                self.store,
                exc.detail,
            )
        finally:
            self._settle(event_id)

    async def release(self, event_id: str) -> None:
        """Delivery failed: drop the claim so that the next attempt delivers."""
        token = self._tokens.pop(event_id, None)
        try:
            if token is not None:
                await self._give_back_quietly(event_id, token)
        finally:
            self._settle(event_id)

    async def close(self) -> None:
        for event_id in list(self._local):
            self._settle(event_id)
        while self._background:
            await asyncio.wait(self._background)
        await self._close_store()

    # --- the three operations, batched --------------------------------------------------------

    async def _take(self, event_id: str, token: str) -> Claim:
        # A TAKE always answers a Claim (or raises).
        return cast(Claim, await self._queued(Op(Action.TAKE, event_id, token)))

    async def _mark_delivered(self, event_id: str, token: str) -> None:
        await self._queued(Op(Action.DELIVER, event_id, token))

    async def _give_back(self, event_id: str, token: str) -> None:
        await self._queued(Op(Action.GIVE_BACK, event_id, token))

    async def _queued(self, op: Op) -> Result:
        """Run ``op`` in the next batch, with whatever else is queued by then."""
        done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((op, done))
        if not self._flushing:
            self._flushing = True
            self._in_background(self._flush())
        return await done

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    results = await self._run_batch([op for op, _ in batch])
                except DedupUnavailable as exc:
                    results = [exc] * len(batch)
                for (_, done), result in zip(batch, results, strict=True):
                    if done.done():
                        continue  # its caller gave up
                    if isinstance(result, DedupUnavailable):
                        # One error object per waiter: each gets its own traceback.
                        done.set_exception(DedupUnavailable(result.detail, result.retry_after))
                    else:
                        done.set_result(result)
        finally:
            self._flushing = False

    # --- internals ------------------------------------------------------------------------------

    async def _attempt(self, event_id: str) -> Claim:
        """One claim attempt, announced locally so that this process asks the store once."""
        token = secrets.token_hex(8)
        self._local[event_id] = asyncio.get_running_loop().create_future()
        try:
            outcome = await self._take_shielded(event_id, token)
        except BaseException:
            self._settle(event_id)
            raise
        if outcome is Claim.OURS:
            self._tokens[event_id] = token  # settled by commit or release
        else:
            self._settle(event_id)
        return outcome

    async def _take_shielded(self, event_id: str, token: str) -> Claim:
        attempt = asyncio.ensure_future(self._take(event_id, token))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # The store may still grant the claim after we stopped waiting: give it back
            # then, rather than leave it to block DT's retry for a whole lease.
            attempt.add_done_callback(functools.partial(self._undo, event_id, token))
            raise

    def _undo(self, event_id: str, token: str, attempt: asyncio.Future[Claim]) -> None:
        if attempt.cancelled() or attempt.exception() is not None:
            return
        if attempt.result() is Claim.OURS:
            self._in_background(self._give_back_quietly(event_id, token))

    async def _give_back_quietly(self, event_id: str, token: str) -> None:
        try:
            await self._give_back(event_id, token)
        except DedupUnavailable as exc:
            # The lease frees it: DT's retry waits, then takes the claim over.
            log.warning(
                "could not release eventId %s in the %s dedup store: %s",
                event_id,
                self.store,
                exc.detail,
            )

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` without a caller waiting on it; ``close`` waits for it."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _settle(self, event_id: str) -> None:
        pending = self._local.pop(event_id, None)
        if pending is not None and not pending.done():
            pending.set_result(None)
