"""Spool mode (``DCON_SPOOL=true``): answer DT once the event is durable on local disk, and
deliver it to the sinks in the background, for sinks slower or longer down than DT's 12 h.

``Spool.deliver`` takes the place of ``Delivery.deliver`` in the receiver: it appends the
event's record line to ``DCON_SPOOL_DIR/spool.jsonl`` through the file sink (fsync with
group commit, rotation, safe for several worker processes) and returns once it is fsynced,
so the 200 that follows is never early. ``app.forwarder`` delivers from there. Past
``DCON_SPOOL_MAX_BYTES`` not yet forwarded, it raises ``SpoolFull`` (503, DT retries).

How many bytes wait is measured from the files every second (other workers append too)
and kept up to date in between by this process's own appends and forwarding, so the limit
can be passed by about one second of other workers' traffic; an append under way may be
counted twice for a moment, which only refuses early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from app.delivery import Delivery
from app.errors import DeliveryFailed, SpoolFull
from app.forwarder import Forwarder
from app.received import ReceivedEvent
from app.settings import Settings
from app.sinks.base import Sink, SinkError
from app.sinks.file import FileSink
from app.spool_files import SPOOL_NAME, load_position, pending_bytes, segments

log = logging.getLogger("dcon.spool")

MEASURE_SECONDS = 1.0
REPORT_SECONDS = 10.0


class Spool:
    """The spool's intake (``deliver``) and its forwarder, opened and closed together."""

    def __init__(
        self, settings: Settings, delivery: Delivery, *, unconnected: Collection[Sink] = ()
    ) -> None:
        self.directory = Path(settings.spool_dir)
        self.max_bytes = settings.spool_max_bytes
        self.retry_after = settings.retry_after
        self.metrics = delivery.metrics
        self._file = FileSink(
            self.directory / SPOOL_NAME, fsync=True, max_bytes=settings.spool_segment_bytes
        )
        self.forwarder = Forwarder(
            self.directory,
            delivery,
            concurrency=settings.spool_concurrency,
            retry_max=settings.spool_retry_max,
            unconnected=unconnected,
            consumed=self._consumed,
        )
        self._on_disk = 0  # not yet forwarded, as last measured and kept up since
        self._reserved = 0  # appends under way
        self._accepting = False
        self._tasks: list[asyncio.Task[None]] = []
        # The backlog when an event was last refused for want of room (None: since taken).
        self._full_at: int | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes in the spool not yet forwarded (appends under way included)."""
        return self._on_disk + self._reserved

    async def open(self) -> None:
        """Open the spool file (``SinkError`` if it cannot be), then start forwarding."""
        await self._file.connect()
        self.measure()
        self._accepting = True
        self.metrics.spool_pending_bytes.set_function(lambda: self.pending_bytes)
        self.metrics.spool_lag_seconds.set_function(self.forwarder.lag_seconds)
        self._tasks = [
            asyncio.create_task(self.forwarder.run(), name="spool forwarder"),
            asyncio.create_task(self._watch(), name="spool watch"),
        ]

    async def deliver(self, event: ReceivedEvent) -> None:
        """Return once the event is fsynced in the spool; ``SpoolFull`` if there is no room."""
        size = len(event.record()) + 1
        if not self._accepting:
            raise DeliveryFailed(
                "the spool is closed (shutting down); DT should retry", ("spool",), self.retry_after
            )
        if self.pending_bytes + size > self.max_bytes:
            self._full_at = self.pending_bytes
            raise SpoolFull(
                f"the spool holds {self.pending_bytes} bytes not yet forwarded, the most "
                f"DCON_SPOOL_MAX_BYTES allows is {self.max_bytes}; DT should retry",
                self.retry_after,
            )
        self._reserved += size
        try:
            await self._file.send(event)
        except SinkError as exc:
            raise DeliveryFailed(
                f"cannot append to the spool: {exc.detail}; DT should retry",
                ("spool",),
                self.retry_after,
            ) from exc
        finally:
            self._reserved -= size
        self._on_disk += size
        self._full_at = None
        self.forwarder.wake()

    async def ping(self) -> str | None:
        """Why the spool cannot take events now, or None."""
        try:
            await self._file.ping()
        except SinkError as exc:
            return exc.detail
        if self._full_at is not None and self.pending_bytes >= self._full_at:
            return f"full: {self.pending_bytes} bytes not yet forwarded, and no room for more"
        return None

    def status(self) -> dict[str, Any]:
        """The backlog as /healthz and /readyz show it."""
        return {
            "pendingBytes": self.pending_bytes,
            "maxBytes": self.max_bytes,
            "lagSeconds": round(self.forwarder.lag_seconds(), 3),
            "forwarding": self.forwarder.forwarding,
            "failing": self.forwarder.failing,
            "lastError": self.forwarder.last_error,
        }

    async def close(self) -> None:
        """Take no more events, let the forwarder finish what is in flight and save its
        position, then close the spool file."""
        self._accepting = False
        self.forwarder.stop()
        forwarder, watch = self._tasks or (None, None)
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if forwarder is not None:
            await asyncio.wait([forwarder])
        await self._file.close()

    def measure(self) -> None:
        """Count the bytes not yet forwarded from the files themselves.

        Run on the loop, deliberately: a directory listing and a few stats, once a second,
        with no await in between, so that every append that has returned is counted once.
        """
        position = self.forwarder.position
        if not self.forwarder.forwarding:
            position = load_position(self.directory)
        self._on_disk = pending_bytes(segments(self.directory), position)

    def _consumed(self, size: int) -> None:
        self._on_disk -= size

    async def _watch(self) -> None:
        """Measure the backlog every second; say how it stands every 10 s while it lasts."""
        reported = time.monotonic()
        while True:
            await asyncio.sleep(MEASURE_SECONDS)
            self.measure()
            now = time.monotonic()
            if (
                self.forwarder.forwarding
                and self.pending_bytes
                and now - reported >= REPORT_SECONDS
            ):
                reported = now
                self._report()

    def _report(self) -> None:
        log.log(
            logging.WARNING if self.forwarder.failing else logging.INFO,
            "spool: %d bytes wait to be forwarded, the oldest event is %.0f s old; last error: %s",
            self.pending_bytes,
            self.forwarder.lag_seconds(),
            self.forwarder.last_error or "none",
        )
