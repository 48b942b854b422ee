"""Delivery to several sinks at once, and the sink deadlines shared by many concurrent
deliveries (``app.delivery.Deadlines``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from app.delivery import Deadlines, Delivery, Route
from app.errors import DeliveryFailed
from app.events import parse_body
from app.metrics import Metrics
from app.received import ReceivedEvent
from app.samples import sample_body
from app.signature import UNVERIFIED
from app.sinks import Sink
from app.sinks.memory import QueueSink
from tests.sinks_doubles import FlakySink, GatedSink, StuckSink
from tests.test_ingest import drain

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


def _event() -> ReceivedEvent:
    body = sample_body("touch")
    return ReceivedEvent(body, parse_body(body), UNVERIFIED, datetime.now(UTC))


async def _delivery(sinks: list[Sink]) -> Delivery:
    for sink in sinks:
        await sink.connect()
    return Delivery([Route(sink) for sink in sinks], 5, 7, Metrics())


@pytest.mark.parametrize("failing_first", [True, False])
async def test_a_failing_sink_fails_the_delivery_wherever_it_stands(failing_first: bool) -> None:
    good, bad = QueueSink(), FlakySink(failures=1)
    sinks: list[Sink] = [bad, good] if failing_first else [good, bad]
    event = _event()
    with pytest.raises(DeliveryFailed) as failed:
        await (await _delivery(sinks)).deliver(event)
    assert failed.value.sinks == ("flaky",)
    assert [e.event_id for e in drain(good)] == [event.event_id]
    await (await _delivery(sinks)).deliver(event)  # the retry
    assert len(drain(bad)) == 1


@pytest.mark.parametrize(
    "make_sinks",
    [
        lambda: [GatedSink(), StuckSink(), StuckSink()],  # cancelled in the first sink
        lambda: [QueueSink(), StuckSink(), QueueSink()],  # cancelled awaiting the others
    ],
)
async def test_a_cancelled_delivery_leaves_no_send_running(
    make_sinks: Callable[[], list[Sink]],
) -> None:
    """Cancelling the request cancels every sink's send, as asyncio.gather would."""
    delivery = await _delivery(make_sinks())
    before = asyncio.all_tasks()
    delivering = asyncio.create_task(delivery.deliver(_event()))
    for _ in range(5):
        await asyncio.sleep(0)
    sends = asyncio.all_tasks() - before - {delivering}
    assert sends  # sends to other sinks, running in tasks of their own
    assert not delivering.done()
    delivering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delivering
    await asyncio.sleep(0)
    assert all(task.cancelled() for task in sends)
    assert asyncio.all_tasks() == before
