"""Remembering which eventIds were delivered, so a DT retry or duplicate is not delivered twice.

An id is *claimed* before delivery and *committed* only after every sink took the event.
A failed delivery *releases* the claim, so DT's retry goes through. A second request for
an id that is still in flight waits for the first one's outcome instead of guessing: if
the first succeeds it is a duplicate, if it fails the second one delivers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Protocol

_XID = re.compile(r"[0-9a-v]{20}")


class DedupStore(Protocol):
    """Where delivered eventIds are remembered.

    ``claim`` answers True when the caller must deliver, False for a duplicate. A store
    shared by several processes raises ``app.errors.DedupBusy`` when another process
    still holds the claim after a short wait; the receiver answers 503 and DT's retry
    finds the outcome. ``connect`` opens the store before the first request; stores
    shared by processes are in ``app.dedup_sqlite`` and ``app.dedup_redis``, chosen by
    ``app.dedup_stores.build_dedup``.
    """

    async def connect(self) -> None: ...

    async def claim(self, event_id: str) -> bool: ...

    async def commit(self, event_id: str) -> None: ...

    async def release(self, event_id: str) -> None: ...

    async def close(self) -> None: ...


class MemoryDedup:
    """An in-process window of delivered ids, bounded in time and in count.

    Ids live in two generations of at most ``max_entries / 2`` each: when the current one
    is full, or the previous one has expired, it becomes the previous one and the old
    previous one is dropped whole. So at least half of ``max_entries`` of the newest ids
    are always remembered, and memory never grows past what ``max_entries`` ids take:
    deleting single entries from one big dict would leave it sparse, and CPython doubles
    the table when it compacts it.
    """

    def __init__(
        self, window: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self._clock = clock
        self._generation = max(1, max_entries // 2)
        self._current: dict[str | int, float] = {}
        self._previous: dict[str | int, float] = {}
        # Ids being delivered: each one's key, and a future once a duplicate waits for the
        # outcome (None until then).
        self._in_flight: dict[str, tuple[str | int, asyncio.Future[bool] | None]] = {}
        self._stamp = -1.0
        self._checked = -1.0  # the stamp at which _window_passed last answered

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    async def connect(self) -> None:
        """Nothing to open: the window lives in this process."""

    async def claim(self, event_id: str) -> bool:
        """True if the caller must deliver ``event_id``; False if it was already delivered."""
        key = self._key(event_id)
        while True:
            if self._seen(key):
                return False
            flight = self._in_flight.get(event_id)
            if flight is None:
                self._in_flight[event_id] = (key, None)
                return True
            # Another request is delivering this id right now; its outcome decides.
            pending = flight[1]
            if pending is None:
                pending = asyncio.get_running_loop().create_future()
                self._in_flight[event_id] = (key, pending)
            await asyncio.shield(pending)

    async def commit(self, event_id: str) -> None:
        """Every sink took the event: remember it and wake any waiting duplicate."""
        flight = self._in_flight.pop(event_id, None)
        self._insert(self._key(event_id) if flight is None else flight[0], self._second())
        _wake(flight, delivered=True)

    def remember(self, event_id: str, age: float) -> None:
        """Take an id delivered ``age`` seconds ago (a warm start after a restart).

        Ids must come oldest first, as they were delivered: the generations rely on it.
        """
        self._insert(self._key(event_id), float(int(self._clock() - age)))

    def _insert(self, key: str | int, stamp: float) -> None:
        # Stamps are whole seconds and the answer of _window_passed changes only with
        # them, so it is asked once per stamp rather than once per event.
        if len(self._current) >= self._generation or (
            stamp != self._checked and self._window_passed(stamp)
        ):
            self._previous, self._current = self._current, {}
        self._checked = stamp
        self._current[key] = stamp

    async def release(self, event_id: str) -> None:
        """Delivery failed: forget the claim so the next attempt delivers."""
        self._settle(event_id, delivered=False)

    async def close(self) -> None:
        for event_id in list(self._in_flight):
            self._settle(event_id, delivered=False)

    def _settle(self, event_id: str, *, delivered: bool) -> None:
        _wake(self._in_flight.pop(event_id, None), delivered=delivered)

    def _window_passed(self, now: float) -> bool:
        """True once the previous generation has wholly expired and the current one has
        begun to: then memory follows the window even when the count never fills a
        generation. Entries go in in time order, so first and last are oldest and newest."""
        if not self._current:
            return False
        if self._previous and now - self._previous[next(reversed(self._previous))] <= self.window:
            return False
        return now - self._current[next(iter(self._current))] > self.window

    def _seen(self, key: str | int) -> bool:
        stamp = self._current.get(key)
        if stamp is None:
            stamp = self._previous.get(key)
        return stamp is not None and self._clock() - stamp <= self.window

    @staticmethod
    def _key(event_id: str) -> str | int:
        # DT's ids are 20 base32hex characters (rs/xid): as an int they take 40 bytes
        # instead of 69. Only that exact shape is converted, so no two ids share a key
        # (int() would also accept upper case, "_" and spaces); anything else stays a str.
        if _XID.fullmatch(event_id):
            return int(event_id, 32)
        return event_id

    def _second(self) -> float:
        # One float object per second, shared by every id delivered in it: a window of a
        # million ids then costs a million dict slots and keys, not also a million floats.
        now = float(int(self._clock()))
        if now != self._stamp:
            self._stamp = now
        return self._stamp


def _wake(flight: tuple[str | int, asyncio.Future[bool] | None] | None, *, delivered: bool) -> None:
    """Tell a duplicate waiting on a finished claim (if one waits) how it ended."""
    pending = None if flight is None else flight[1]
    if pending is not None and not pending.done():
        pending.set_result(delivered)
