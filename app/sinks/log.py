"""``log``: one JSON line per event on stdout, for eyes and for log shippers."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, BinaryIO

from app.sinks.base import SinkError

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings


class LogSink:
    """Lines are written as events arrive; one flush serves every event written in the
    same turn of the event loop, and each ``send`` returns after the flush that carried
    its line."""

    name = "log"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self._flushed: asyncio.Future[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LogSink:
        return cls()

    async def connect(self) -> None:
        if self._stream is None:
            self._stream = sys.stdout.buffer

    async def send(self, event: ReceivedEvent) -> None:
        if self._stream is None:
            raise SinkError(self.name, "not connected")
        try:
            self._stream.write(event.record() + b"\n")
        except (OSError, ValueError) as exc:
            raise SinkError(self.name, f"cannot write to stdout: {exc}") from exc
        if self._flushed is None:
            loop = asyncio.get_running_loop()
            self._flushed = loop.create_future()
            loop.call_soon(self._flush, self._stream, self._flushed)
        # Shielded: one caller giving up must not fail the flush the others wait for.
        await asyncio.shield(self._flushed)

    def _flush(self, stream: BinaryIO, done: asyncio.Future[None]) -> None:
        self._flushed = None
        try:
            # A short write to stdout, like any logging call; not worth a thread hop.
            stream.flush()
        except (OSError, ValueError) as exc:
            done.set_exception(SinkError(self.name, f"cannot write to stdout: {exc}"))
        else:
            done.set_result(None)

    async def ping(self) -> None:
        if self._stream is None or self._stream.closed:
            raise SinkError(self.name, "stdout is closed")

    async def close(self) -> None:
        self._stream = None
