"""The sink contract: a tiny plug-in interface with a lifecycle.

Building a sink only parses its configuration. ``connect()`` does the I/O, ``send()``
returns only once the event is safe in the sink (that is when the receiver may answer
200), ``ping()`` proves the sink is reachable, and ``close()`` flushes and releases.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import asyncio

    from app.received import ReceivedEvent
    from app.settings import Settings


class SinkError(Exception):
    """A sink could not take an event or answer a ping; the receiver answers 503."""

    def __init__(self, sink: str, detail: str) -> None:
        super().__init__(f"{sink}: {detail}")
        self.sink = sink
        self.detail = detail


class PermanentSinkError(SinkError):
    """The sink refused this event for good: sent again, it would be refused again (a value
    the store cannot hold, a message over the broker's size limit).

    Answering DT directly it is a 503 like any ``SinkError``; the spool's forwarder puts
    the event in its dead-letter file instead of retrying it for ever.
    """


def settle(
    waiters: Iterable[asyncio.Future[None]], sink: str, error: str | None, *, refused: bool = False
) -> None:
    """Wake every caller still waiting for a write that ended: success when ``error`` is
    None, else each its own ``SinkError`` (``PermanentSinkError`` if the store ``refused``
    the event itself). A caller that gave up (cancelled) is skipped."""
    for waiter in waiters:
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception((PermanentSinkError if refused else SinkError)(sink, error))


class SinkConfigError(Exception):
    """A sink's settings are invalid or its optional extra is missing (raised at start-up)."""


@runtime_checkable
class Sink(Protocol):
    name: str

    async def connect(self) -> None: ...

    async def send(self, event: ReceivedEvent) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class SinkFactory(Protocol):
    """What the registry resolves a name to: a class (or callable) built from settings."""

    def from_settings(self, settings: Settings) -> Sink: ...
