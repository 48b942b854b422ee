"""Fan one event out to every sink, under one deadline; all of them or it did not happen."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from app.errors import DeliveryFailed
from app.metrics import Metrics
from app.received import ReceivedEvent
from app.sinks.base import Sink

log = logging.getLogger("dcon.delivery")


@dataclass(frozen=True, slots=True)
class Route:
    """A sink and the event types it takes (None: every event, unknown types included)."""

    sink: Sink
    event_types: frozenset[str] | None = None

    def takes(self, event: ReceivedEvent) -> bool:
        return self.event_types is None or event.event_type in self.event_types


class Delivery:
    def __init__(
        self, routes: Sequence[Route], timeout: float, retry_after: int, metrics: Metrics
    ) -> None:
        self.routes = tuple(routes)
        self.timeout = timeout
        self.retry_after = retry_after
        self.metrics = metrics

    async def _send(self, sink: Sink, event: ReceivedEvent) -> None:
        started = time.perf_counter()
        await sink.send(event)
        self.metrics.sink_seconds.labels(sink.name).observe(time.perf_counter() - started)
        self.metrics.sink_deliveries.labels(sink.name).inc()

    async def deliver(self, event: ReceivedEvent) -> None:
        """Return once every sink has the event; otherwise raise ``DeliveryFailed``.

        A sink that fails or misses the deadline fails the whole delivery, even if the
        others succeeded: the receiver then answers 503 and DT sends the event again, so
        a sink may see it twice but never zero times.
        """
        sinks = [route.sink for route in self.routes if route.takes(event)]
        if not sinks:
            log.warning(
                "event %s of type %r matches no sink route; acknowledged without storing",
                event.event_id,
                event.event_type,
            )
            return
        tasks = {asyncio.ensure_future(self._send(sink, event)): sink.name for sink in sinks}
        try:
            _, pending = await asyncio.wait(tasks, timeout=self.timeout)
        finally:
            for task in tasks:
                task.cancel()
        failed: list[str] = []
        for task, name in tasks.items():
            if task in pending:
                log.error("sink %s missed the %.1f s deadline", name, self.timeout)
                self.metrics.sink_failures.labels(name, "timeout").inc()
                failed.append(name)
            elif task.cancelled() or (exc := task.exception()) is not None:
                log.error("sink %s failed: %s", name, "cancelled" if task.cancelled() else exc)
                self.metrics.sink_failures.labels(name, "error").inc()
                failed.append(name)
        if failed:
            raise DeliveryFailed(
                f"not stored by {', '.join(failed)}; DT should retry",
                tuple(failed),
                self.retry_after,
            )
