"""``queue``: a bounded in-process asyncio queue that embedding code and tests consume.

This is the sink to test against: no driver, no patching, the real interface.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from app.sinks.base import SinkError

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings


class QueueSink:
    name = "queue"

    def __init__(self, maxsize: int = 10_000) -> None:
        self.queue: asyncio.Queue[ReceivedEvent] = asyncio.Queue(maxsize)
        self._open = False

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueSink:
        return cls(settings.queue_maxsize)

    async def connect(self) -> None:
        self._open = True

    async def send(self, event: ReceivedEvent) -> None:
        """Enqueue, or fail at once when full: waiting would only run into the deadline."""
        if not self._open:
            raise SinkError(self.name, "closed")
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            raise SinkError(self.name, f"full ({self.queue.maxsize} events)") from None

    async def ping(self) -> None:
        if not self._open:
            raise SinkError(self.name, "closed")

    async def close(self) -> None:
        self._open = False
