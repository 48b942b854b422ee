"""Fan one event out to every sink, under one deadline; all of them or it did not happen."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.errors import DeliveryFailed
from app.metrics import Metrics
from app.received import ReceivedEvent
from app.sinks.base import PermanentSinkError, Sink
from app.tally import CounterChild, HistogramChild

log = logging.getLogger("dcon.delivery")


@dataclass(frozen=True, slots=True)
class Route:
    """A sink and the event types it takes (None: every event, unknown types included)."""

    sink: Sink
    event_types: frozenset[str] | None = None

    def takes(self, event: ReceivedEvent) -> bool:
        return self.event_types is None or event.event_type in self.event_types


class Deadlines:
    """Deadlines ``seconds`` away for many concurrent awaits, each due at most ``slot`` late.

    ``asyncio.timeout`` costs a timeout object entered and left, and a loop timer, per
    await: about 7% of the receiver's throughput at one per event. Here the awaits whose
    deadlines fall in the same ``slot`` share one timer, which cancels each task still
    waiting; ``Watch.overdue`` then tells that cancellation from any other, with the same
    ``uncancel`` bookkeeping as ``asyncio.timeout``.
    """

    def __init__(self, seconds: float, slot: float = 0.05) -> None:
        self.seconds = seconds
        self.slot = slot
        self._due: dict[int, set[Watch]] = {}

    def watch(self) -> Watch:
        """Start the deadline of the current task's next await; ``end`` it in a finally."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a task")
        loop = task.get_loop()  # not get_running_loop() again: a getpid system call each
        slot = math.ceil((loop.time() + self.seconds) / self.slot)
        due = self._due.get(slot)
        if due is None:
            due = self._due[slot] = set()
            loop.call_at(slot * self.slot, self._fire, slot)
        watch = Watch(task, due)
        due.add(watch)
        return watch

    def _fire(self, slot: int) -> None:
        for watch in self._due.pop(slot, ()):
            watch.fired = True
            watch.task.cancel()


class Watch:
    """One await under a ``Deadlines`` deadline."""

    __slots__ = ("_due", "_settled", "cancelling", "fired", "task")

    def __init__(self, task: asyncio.Task[Any], due: set[Watch]) -> None:
        self.task = task
        self.cancelling = task.cancelling()
        self.fired = False
        self._settled = False
        self._due = due

    def overdue(self) -> bool:
        """On ``CancelledError``: True if it came from the deadline alone (then it is
        taken back, and the await has timed out), False if the task is being cancelled."""
        if not self.fired or self._settled:
            return False
        self._settled = True
        return self.task.uncancel() <= self.cancelling

    def end(self) -> None:
        """The await is over: drop it from its slot, and take back a cancellation the
        deadline made but the await never saw as one (it ended some other way)."""
        self._due.discard(self)
        if self.fired and not self._settled:
            self._settled = True
            self.task.uncancel()


class Deliverer(Protocol):
    """What the receiver hands an accepted event to: ``Delivery`` (straight to the sinks)
    or ``app.spool.Spool`` (a durable local append, forwarded later)."""

    async def deliver(self, event: ReceivedEvent) -> None: ...


class Delivery:
    def __init__(
        self, routes: Sequence[Route], timeout: float, retry_after: int, metrics: Metrics
    ) -> None:
        self.routes = tuple(routes)
        self.timeout = timeout
        self._deadlines = Deadlines(timeout)
        # No route filters by type (the usual case): every event goes to every sink.
        self._every_sink = (
            [route.sink for route in self.routes]
            if all(route.event_types is None for route in self.routes)
            else None
        )
        self.retry_after = retry_after
        self.metrics = metrics

    async def _attempt(self, sink: Sink, event: ReceivedEvent) -> str | PermanentSinkError | None:
        """Send to one sink under the deadline; the failure reason (the error itself when
        the sink refused the event for good), or None once stored."""
        started = time.perf_counter()
        watch = self._deadlines.watch()
        try:
            await sink.send(event)
        except asyncio.CancelledError:
            if watch.overdue():
                log.error("sink %s missed the %.1f s deadline", sink.name, self.timeout)
                reason = "timeout"
            elif watch.task.cancelling():
                raise  # the request itself is being cancelled
            else:
                log.error("sink %s failed: its send ended cancelled", sink.name)
                reason = "error"
        except PermanentSinkError as exc:
            log.error("sink %s refused event %s for good: %s", sink.name, event.event_id, exc)
            self.metrics.sink_failures.labels(sink.name, "rejected").inc()
            return exc
        except Exception as exc:
            log.error("sink %s failed: %s", sink.name, exc)
            reason = "error"
        else:
            seconds, deliveries = self._sink_metrics(sink.name)
            seconds.observe(time.perf_counter() - started)
            deliveries.inc()
            return None
        finally:
            watch.end()
        self.metrics.sink_failures.labels(sink.name, reason).inc()
        return reason

    # Bound once per sink: labels() looks the child up on every call.
    @functools.cache  # noqa: B019 - one Delivery per app, living as long as the app
    def _sink_metrics(self, name: str) -> tuple[HistogramChild, CounterChild]:
        return self.metrics.sink_seconds.labels(name), self.metrics.sink_deliveries.labels(name)

    async def _attempt_all(
        self, sinks: Sequence[Sink], event: ReceivedEvent
    ) -> list[str | PermanentSinkError | None]:
        """Send to every sink at once; each one's failure reason, or None, in order.

        The first sink is sent to in this task and the others each in a task of its own:
        ``asyncio.gather`` would add a task for the first one too, and its own bookkeeping
        in Python, about 450 interpreted opcodes per event with two sinks (a seventh of the
        request). ``_attempt`` only ever raises ``CancelledError``, and then the tasks still
        running are cancelled with this one, as gather would.
        """
        loop = asyncio.get_running_loop()
        others = [loop.create_task(self._attempt(sink, event)) for sink in sinks[1:]]
        try:
            first = await self._attempt(sinks[0], event)
            return [first, *[await task for task in others]]
        except BaseException:
            for task in others:
                task.cancel()
            raise

    async def deliver(self, event: ReceivedEvent) -> None:
        """Return once every sink has the event; otherwise raise ``DeliveryFailed``.

        A sink that fails or misses the deadline fails the whole delivery, even if the
        others succeeded: the receiver then answers 503 and DT sends the event again, so
        a sink may see it twice but never zero times.
        """
        if self._every_sink is not None:
            sinks = self._every_sink
        else:
            sinks = [route.sink for route in self.routes if route.takes(event)]
        if not sinks:
            log.warning(
                "event %s of type %r matches no sink route; acknowledged without storing",
                event.event_id,
                event.event_type,
            )
            return
        if len(sinks) == 1:
            # The common case needs no task of its own.
            reason = await self._attempt(sinks[0], event)
            if reason is None:
                return
            reasons: Sequence[str | PermanentSinkError | None] = [reason]
        else:
            reasons = await self._attempt_all(sinks, event)
        failed = [sink.name for sink, reason in zip(sinks, reasons, strict=True) if reason]
        if failed:
            rejected = {
                sink.name: reason.detail
                for sink, reason in zip(sinks, reasons, strict=True)
                if isinstance(reason, PermanentSinkError)
            }
            raise DeliveryFailed(
                f"not stored by {', '.join(failed)}; DT should retry",
                tuple(failed),
                self.retry_after,
                rejected,
            )
