"""``log``: one JSON line per event on stdout, for eyes and for log shippers."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, BinaryIO

from app.sinks.base import SinkError, settle

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings


class LogSink:
    """Lines are written as events arrive; one flush serves every event written in the same
    turn of the event loop, and each ``send`` returns after the flush that carried its line.

    Each caller waits on a future of its own, all settled by that flush: a caller that gives
    up (cancelled) cancels only its own. One future shared through ``asyncio.shield`` did
    the same with a second future and two callbacks per event, in Python.
    """

    name = "log"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        # The callers whose lines the next flush carries; the first of a turn schedules it.
        self._waiters: list[asyncio.Future[None]] = []

    @classmethod
    def from_settings(cls, settings: Settings) -> LogSink:
        return cls()

    async def connect(self) -> None:
        if self._stream is None:
            self._stream = sys.stdout.buffer

    async def send(self, event: ReceivedEvent) -> None:
        stream = self._stream
        if stream is None:
            raise SinkError(self.name, "not connected")
        try:
            stream.write(event.record() + b"\n")
        except (OSError, ValueError) as exc:
            raise SinkError(self.name, f"cannot write to stdout: {exc}") from exc
        waiters = self._waiters
        if waiters:
            # The turn's flush is scheduled on this loop already; get_running_loop() would
            # cost a getpid system call per event.
            loop = waiters[0].get_loop()
        else:
            loop = asyncio.get_running_loop()
            loop.call_soon(self._flush, stream)
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        await waiter

    def _flush(self, stream: BinaryIO) -> None:
        waiters, self._waiters = self._waiters, []
        error = None
        try:
            # A short write to stdout, like any logging call; not worth a thread hop.
            stream.flush()
        except (OSError, ValueError) as exc:
            error = f"cannot write to stdout: {exc}"
        settle(waiters, self.name, error)

    async def ping(self) -> None:
        if self._stream is None or self._stream.closed:
            raise SinkError(self.name, "stdout is closed")

    async def close(self) -> None:
        self._stream = None
