"""Sink deadlines shared by many concurrent deliveries (``app.delivery.Deadlines``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.delivery import Deadlines

pytestmark = pytest.mark.anyio


async def _wait_under(deadlines: Deadlines, seconds: float) -> str:
    watch = deadlines.watch()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if watch.overdue():
            return "timeout"
        raise
    finally:
        watch.end()
    return "done"


async def test_an_await_past_its_deadline_times_out_soon_after() -> None:
    deadlines = Deadlines(0.1, slot=0.05)
    started = time.monotonic()
    assert await _wait_under(deadlines, 5) == "timeout"
    assert 0.1 <= time.monotonic() - started < 1.0
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # the cancellation was taken back


async def test_awaits_in_time_finish_and_leave_nothing_to_fire() -> None:
    deadlines = Deadlines(0.2, slot=0.05)
    results = await asyncio.gather(*(_wait_under(deadlines, 0.01) for _ in range(50)))
    assert results == ["done"] * 50
    assert all(not due for due in deadlines._due.values())
    await asyncio.sleep(0.35)  # the shared timers fire, over empty sets
    assert deadlines._due == {}


async def test_many_concurrent_awaits_share_a_timer_and_each_times_out() -> None:
    deadlines = Deadlines(0.1, slot=0.05)
    loop = asyncio.get_running_loop()
    slow = [loop.create_task(_wait_under(deadlines, 5)) for _ in range(20)]
    fast = [loop.create_task(_wait_under(deadlines, 0.01)) for _ in range(20)]
    await asyncio.sleep(0)
    assert len(deadlines._due) <= 2  # one or two slots, not forty timers
    assert await asyncio.gather(*slow) == ["timeout"] * 20
    assert await asyncio.gather(*fast) == ["done"] * 20


async def test_cancelling_the_request_is_not_mistaken_for_a_timeout() -> None:
    deadlines = Deadlines(5, slot=0.05)
    task = asyncio.get_running_loop().create_task(_wait_under(deadlines, 5))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(not due for due in deadlines._due.values())


async def test_a_request_cancelled_as_its_deadline_fires_stays_cancelled() -> None:
    deadlines = Deadlines(0.05, slot=0.05)
    loop = asyncio.get_running_loop()
    task = loop.create_task(_wait_under(deadlines, 5))
    await asyncio.sleep(0)
    # The deadline's slot fires and the request is cancelled in the same loop turn.
    slot = next(iter(deadlines._due))
    deadlines._fire(slot)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
