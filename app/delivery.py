"""Fan one event out to every sink, under one deadline; all of them or it did not happen."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from app.errors import DeliveryFailed
from app.received import ReceivedEvent
from app.sinks.base import Sink

log = logging.getLogger("dcon.delivery")


class Delivery:
    def __init__(self, sinks: Sequence[Sink], timeout: float, retry_after: int) -> None:
        self.sinks = tuple(sinks)
        self.timeout = timeout
        self.retry_after = retry_after

    async def deliver(self, event: ReceivedEvent) -> None:
        """Return once every sink has the event; otherwise raise ``DeliveryFailed``.

        A sink that fails or misses the deadline fails the whole delivery, even if the
        others succeeded: the receiver then answers 503 and DT sends the event again, so
        a sink may see it twice but never zero times.
        """
        tasks = {asyncio.ensure_future(sink.send(event)): sink.name for sink in self.sinks}
        try:
            _, pending = await asyncio.wait(tasks, timeout=self.timeout)
        finally:
            for task in tasks:
                task.cancel()
        failed: list[str] = []
        for task, name in tasks.items():
            if task in pending:
                log.error("sink %s missed the %.1f s deadline", name, self.timeout)
                failed.append(name)
            elif (exc := task.exception()) is not None:
                log.error("sink %s failed: %s", name, exc)
                failed.append(name)
        if failed:
            raise DeliveryFailed(
                f"not stored by {', '.join(failed)}; DT should retry",
                tuple(failed),
                self.retry_after,
            )
