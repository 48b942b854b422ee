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


async def test_entry_count_is_bounded_and_the_newest_are_kept() -> None:
    """At most max_entries ids, at least half of them; the oldest go first."""
    clock = Clock()
    dedup = MemoryDedup(window=10_000, max_entries=4, clock=clock)
    ids = [f"id-{i}" for i in range(10)]
    for i, event_id in enumerate(ids):
        clock.now = i
        assert await dedup.claim(event_id)
        await dedup.commit(event_id)
        assert len(dedup) <= 4
    for recent in ids[-2:]:
        assert not await dedup.claim(recent)
    assert await dedup.claim(ids[0])  # long evicted, so it is new again


async def test_memory_follows_the_window_when_the_count_never_fills() -> None:
    """With few events, expired ids are dropped too, not only kept away by the clock."""
    clock = Clock()
    dedup = MemoryDedup(window=10, max_entries=1000, clock=clock)
    for i in range(100):
        clock.now = i
        assert await dedup.claim(str(i))
        await dedup.commit(str(i))
        assert len(dedup) <= 2 * 11 + 1
    assert not await dedup.claim("95")
    assert await dedup.claim("80")  # expired


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
