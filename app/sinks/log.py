"""``log``: one JSON line per event on stdout, for eyes and for log shippers."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, BinaryIO

from app.sinks.base import SinkError

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings


class LogSink:
    name = "log"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream

    @classmethod
    def from_settings(cls, settings: Settings) -> LogSink:
        return cls()

    async def connect(self) -> None:
        if self._stream is None:
            self._stream = sys.stdout.buffer

    async def send(self, event: ReceivedEvent) -> None:
        if self._stream is None:
            raise SinkError(self.name, "not connected")
        # A short write to stdout, like any logging call; not worth a thread hop.
        try:
            self._stream.write(event.record() + b"\n")
            self._stream.flush()
        except (OSError, ValueError) as exc:
            raise SinkError(self.name, f"cannot write to stdout: {exc}") from exc

    async def ping(self) -> None:
        if self._stream is None or self._stream.closed:
            raise SinkError(self.name, "stdout is closed")

    async def close(self) -> None:
        self._stream = None
