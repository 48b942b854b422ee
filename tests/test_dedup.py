"""The eventId window: claims, commits, releases, expiry and bounds."""

from __future__ import annotations

import asyncio

import pytest

from app.dedup import MemoryDedup

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_committed_id_is_a_duplicate_until_the_window_passes() -> None:
    clock = Clock()
    dedup = MemoryDedup(window=100, max_entries=10, clock=clock)
    assert await dedup.claim("a")
    await dedup.commit("a")
    clock.now = 100
    assert not await dedup.claim("a")
    clock.now = 101
    assert await dedup.claim("a")


async def test_released_claim_lets_the_retry_deliver() -> None:
    """A failed delivery never blocks DT's retry of the same event."""
    dedup = MemoryDedup(window=100, max_entries=10)
    assert await dedup.claim("a")
    await dedup.release("a")
    assert await dedup.claim("a")


async def test_concurrent_claim_waits_for_the_first_outcome() -> None:
    """A duplicate arriving mid-delivery is decided by the first delivery's result."""
    dedup = MemoryDedup(window=100, max_entries=10)
    assert await dedup.claim("a")
    second = asyncio.ensure_future(dedup.claim("a"))
    await asyncio.sleep(0)
    assert not second.done()
    await dedup.commit("a")
    assert await second is False

    assert await dedup.claim("b")
    third = asyncio.ensure_future(dedup.claim("b"))
    await asyncio.sleep(0)
    await dedup.release("b")
    assert await third is True  # the first failed, so this one must deliver


async def test_entry_count_is_bounded_oldest_first() -> None:
    clock = Clock()
    dedup = MemoryDedup(window=1000, max_entries=3, clock=clock)
    for i, event_id in enumerate("abcd"):
        clock.now = i
        assert await dedup.claim(event_id)
        await dedup.commit(event_id)
    assert len(dedup) == 3
    assert await dedup.claim("a")  # evicted, so it is new again
    assert not await dedup.claim("d")


async def test_expired_entries_are_dropped_on_commit() -> None:
    """Memory follows the window, not the total number of events ever seen."""
    clock = Clock()
    dedup = MemoryDedup(window=10, max_entries=1000, clock=clock)
    for i in range(100):
        clock.now = i
        assert await dedup.claim(str(i))
        await dedup.commit(str(i))
    assert len(dedup) == 11


async def test_ids_that_only_look_alike_are_never_the_same_key() -> None:
    """DT's xid-shaped ids are stored compactly; no other id may collide with them."""
    dedup = MemoryDedup(window=100, max_entries=100)
    xid = "c82gg9catj3vmh4248og"
    assert await dedup.claim(xid)
    await dedup.commit(xid)
    for other in (xid.upper(), "c82gg9catj_3vmh4248og"[:20], f" {xid[1:]}", xid[:19], "0" + xid):
        assert await dedup.claim(other), other
        await dedup.release(other)
    assert not await dedup.claim(xid)
