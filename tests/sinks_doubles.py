"""Sinks that misbehave on purpose, implementing our own Sink interface."""

from __future__ import annotations

import asyncio

from app.received import ReceivedEvent
from app.settings import Settings
from app.sinks import SinkError
from app.sinks.memory import QueueSink


class FlakySink(QueueSink):
    """Fails the next ``failures`` sends, then behaves like the queue sink."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    @classmethod
    def from_settings(cls, settings: Settings) -> FlakySink:
        return cls(0)

    async def send(self, event: ReceivedEvent) -> None:
        if self.failures:
            self.failures -= 1
            raise SinkError(self.name, "broker unreachable")
        await super().send(event)


class StuckSink(QueueSink):
    """Never finishes a send until released (a hung broker)."""

    name = "stuck"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def send(self, event: ReceivedEvent) -> None:
        await self.release.wait()
        await super().send(event)


class GatedSink(QueueSink):
    """Holds every send until the gate opens, to line up concurrent requests."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.first_entered = asyncio.Event()
        self.entered = 0

    async def send(self, event: ReceivedEvent) -> None:
        self.entered += 1
        self.first_entered.set()
        await self.gate.wait()
        await super().send(event)


class SelfCancellingSink(QueueSink):
    """A driver that ends a send cancelled although nobody cancelled it."""

    name = "self-cancelling"

    async def send(self, event: ReceivedEvent) -> None:
        raise asyncio.CancelledError
