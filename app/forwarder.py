"""Spool mode's forwarder: delivers what the spool holds to the sinks, in spool order.

Several events are in flight at once (``DCON_SPOOL_CONCURRENCY``); the saved position only
moves over a run of events that are done, so a restart never skips one. An event a sink
fails on is retried, for that sink only, with a backoff that doubles from half a second up
to ``DCON_SPOOL_RETRY_MAX``; while any event waits for a retry no new ones start, so that
once the sink is back the backlog reaches it in order. An event a sink refuses for good
(``PermanentSinkError``), and a spool line that cannot be read, go to the dead-letter file
with the reason.

With several worker processes only the one holding an ``flock`` on ``forwarder.lock``
forwards; the others try to take it every few seconds.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from app.delivery import Delivery
from app.errors import DeliveryFailed
from app.received import ReceivedEvent
from app.sinks.base import Sink
from app.sinks.file import LineFile
from app.spool_files import (
    FileEnd,
    Line,
    Position,
    SpoolReader,
    load_position,
    save_position,
)

log = logging.getLogger("dcon.spool")

LOCK_NAME = "forwarder.lock"
DEAD_LETTER_NAME = "dead-letter.jsonl"
FIRST_RETRY = 0.5
LOCK_RETRY_SECONDS = 5.0
# How often the forwarder looks for lines that other worker processes appended (lines
# appended in this process wake it at once).
POLL_SECONDS = 0.25
# The position is saved at least this often while it moves (and whenever forwarding stops,
# and before a forwarded file is deleted); a crash re-sends at most this much.
SAVE_SECONDS = 1.0
SPOOL_SINK = "spool"  # the "sink" of a dead letter for a line that could not be read


@dataclass(eq=False)
class Item:
    """One spool line on its way, or the end of a file, in the forwarder's window."""

    entry: Line | FileEnd
    event: ReceivedEvent | None = None
    problem: str | None = None  # why the line could not be read
    pending: list[int] = field(default_factory=list)  # routes still to deliver to
    failed_at: float = -1.0
    first: asyncio.Task[None] | None = None


class Backoff:
    def __init__(self, first: float, cap: float) -> None:
        self.first = min(first, cap)
        self.cap = cap
        self._delay = self.first

    def next(self) -> float:
        delay, self._delay = self._delay, min(self._delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._delay = self.first


def dead_letter_line(record: bytes, meta: Mapping[str, object]) -> bytes:
    """A record line with a ``deadLetter`` note first (as ``replay`` writes its failures):
    still a record, which ``ReceivedEvent.from_record`` and ``replay`` read."""
    head = json.dumps({"deadLetter": meta}, separators=(",", ":"), ensure_ascii=False)
    return head[:-1].encode() + b"," + record[1:]


def unreadable_line(data: bytes, meta: Mapping[str, object]) -> bytes:
    """A line that is no record, kept as base64 with why and where it was found."""
    doc = {"deadLetter": meta, "rawBase64": base64.b64encode(data).decode("ascii")}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class Forwarder:
    def __init__(
        self,
        directory: Path,
        delivery: Delivery,
        *,
        concurrency: int,
        retry_max: float,
        unconnected: Collection[Sink] = (),
        consumed: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.directory = directory
        self.routes = delivery.routes
        self.metrics = delivery.metrics
        # One Delivery per sink: each keeps the sinks' deadline and metrics, and a retry
        # goes only to the sinks that failed, not again to those that took the event.
        self._deliveries = [
            Delivery([route], delivery.timeout, delivery.retry_after, delivery.metrics)
            for route in self.routes
        ]
        self.concurrency = concurrency
        self.backoff = Backoff(FIRST_RETRY, retry_max)
        self._unconnected = {id(sink) for sink in unconnected}
        self._connecting = asyncio.Lock()
        self._consumed = consumed
        self.position: Position | None = None
        self.forwarding = False  # this process holds the lock and forwards
        self.last_error: str | None = None
        self._window: deque[Item] = deque()
        self._reader = SpoolReader(directory)
        self._dead_letters = LineFile(directory / DEAD_LETTER_NAME, fsync=True, max_bytes=0)
        self._dead_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._recovered_at = 0.0
        self._saved: Position | None = None
        self._saved_at = 0.0
        self._lock_fd: int | None = None

    def wake(self) -> None:
        """New lines are in the spool (appended by this process)."""
        self._wake.set()

    def lag_seconds(self) -> float:
        """Age of the oldest event not yet forwarded; 0 when none waits here."""
        for item in self._window:
            if item.event is not None:
                return (datetime.now(UTC) - item.event.received_at).total_seconds()
        return 0.0

    async def run(self) -> None:
        """Forward until ``stop``: once this process holds the lock, and again after an
        unexpected error (from the last position done)."""
        try:
            while not await self._take_lock():
                if await self._pause(LOCK_RETRY_SECONDS):
                    return
            self.forwarding = True
            log.info("forwarding the spool in %s", self.directory)
            while not self._stopping.is_set():
                try:
                    await self._forward()
                except Exception as exc:
                    self.last_error = f"forwarder: {exc}"
                    log.exception("spool forwarder failed; starting again from its position")
                    await self._pause(self.backoff.cap)
        finally:
            self.forwarding = False
            self._reader.close()
            self._dead_letters.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # drops the lock

    def stop(self) -> None:
        """Start nothing new, let the events in flight finish, save the position."""
        self._stopping.set()
        self._wake.set()

    async def _take_lock(self) -> bool:
        if self._lock_fd is None:
            self._lock_fd = os.open(
                self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    async def _pause(self, seconds: float) -> bool:
        """Sleep, unless stopped first; True if stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # --- the window -----------------------------------------------------------------------

    async def _forward(self) -> None:
        saved = await asyncio.to_thread(load_position, self.directory)
        if self._saved is None:
            self._saved = saved
        # After an unexpected error, from the last event done rather than the last saved.
        start = self.position or saved
        self.position, stale = await asyncio.to_thread(self._reader.start, start)
        for name in stale:
            await self._delete(name)
        window = self._window
        window.clear()
        try:
            while True:
                if not self._stopping.is_set() and not self.failing:
                    await self._fill()
                if not window:
                    if self._stopping.is_set():
                        return
                    await self._save(due=True)
                    await self._wait_for_lines()
                    continue
                if not await self._finish(window[0]):
                    return  # stopping, with the head still failing
                await self._advance(window.popleft())
        finally:
            # The first attempts already started end under the sinks' deadline.
            started = [item.first for item in window if item.first is not None]
            if started:
                await asyncio.wait(started)
            while window and _done(window[0]):
                await self._advance(window.popleft())
            window.clear()
            await self._save(due=True, force=True)

    @property
    def failing(self) -> bool:
        """Some event waits for a retry (a sink is failing)."""
        return any(item.failed_at >= 0 and not _done(item) for item in self._window)

    async def _fill(self) -> None:
        room = self.concurrency - len(self._window)
        if room < max(1, self.concurrency // 2) and self._window:
            return  # refill in batches, not one thread hop per event
        for entry in await asyncio.to_thread(self._reader.read, room):
            item = Item(entry)
            if isinstance(entry, Line):
                self._take_line(item, entry)
            self._window.append(item)

    def _take_line(self, item: Item, line: Line) -> None:
        if line.torn:
            item.problem = f"torn line at the end of {line.name}: it has no newline"
        else:
            try:
                item.event = ReceivedEvent.from_record(line.data)
            except Exception as exc:  # whatever is wrong with the line, it is set aside
                item.problem = f"not an event record: {exc!r}"
        if item.event is not None:
            item.pending = [i for i, r in enumerate(self.routes) if r.takes(item.event)]
            if not item.pending:
                log.warning(
                    "spooled event %s of type %r matches no sink route; not stored anywhere",
                    item.event.event_id,
                    item.event.event_type,
                )
                return
        item.first = asyncio.create_task(self._attempt(item))

    async def _wait_for_lines(self) -> None:
        self._wake.clear()
        if self._stopping.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    async def _finish(self, item: Item) -> bool:
        """Wait for the item's first attempt, then retry it until done; False if stopped."""
        if item.first is not None:
            await asyncio.wait([item.first])
            item.first.result()  # an unexpected error in it is the forwarder's
        while not _done(item):
            if self._stopping.is_set():
                return False
            # A failure from before the last success is stale: the sink may well be
            # back, so try at once. A fresh one waits for the backoff.
            if item.failed_at >= self._recovered_at and await self._pause(self.backoff.next()):
                return False
            await self._attempt(item)
        return True

    async def _advance(self, item: Item) -> None:
        """The head item is done: the position moves past it."""
        entry = item.entry
        if isinstance(entry, FileEnd):
            self.position = entry.next
            # Saved first: a crash between the two leaves a forwarded file behind, which
            # the next start deletes, never a position in a deleted file.
            await self._save(due=True, force=True)
            await self._delete(entry.name)
            return
        self.position = Position(entry.name, entry.inode, entry.end)
        self._consumed(entry.end - entry.start)
        self.metrics.spool_forwarded.inc()
        await self._save(due=time.monotonic() - self._saved_at >= SAVE_SECONDS)

    async def _save(self, *, due: bool, force: bool = False) -> None:
        position = self.position
        if position is None or not due or (position == self._saved and not force):
            return
        await asyncio.to_thread(save_position, self.directory, position)
        self._saved, self._saved_at = position, time.monotonic()

    async def _delete(self, name: str) -> None:
        try:
            await asyncio.to_thread((self.directory / name).unlink)
        except FileNotFoundError:
            return
        log.info("spool file %s forwarded and deleted", name)

    # --- one attempt ----------------------------------------------------------------------

    async def _attempt(self, item: Item) -> None:
        """Try once every sink the item still waits for."""
        if item.event is None:
            await self._dead_letter_unreadable(item)
            return
        event = item.event
        outcomes = await asyncio.gather(*(self._send(i, event) for i in item.pending))
        still = []
        for i, outcome in zip(item.pending, outcomes, strict=True):
            if outcome is not None:
                self.last_error = f"{self.routes[i].sink.name}: {outcome}"
                still.append(i)
        item.pending = still
        if still:
            item.failed_at = time.monotonic()
        else:
            self._recovered_at = time.monotonic()
            self.backoff.reset()

    async def _send(self, i: int, event: ReceivedEvent) -> str | None:
        """Deliver to route ``i``: None once stored or dead-lettered, else why not."""
        sink = self.routes[i].sink
        if id(sink) in self._unconnected and not await self._connect(sink):
            return "not connected"
        try:
            await self._deliveries[i].deliver(event)
        except DeliveryFailed as exc:
            if sink.name not in exc.rejected:
                return "failed or timed out (see the dcon.delivery log)"
            try:
                await self._dead_letter(event, sink.name, exc.rejected[sink.name])
            except OSError as error:
                log.error("cannot write the dead-letter file: %s", error)
                return f"refused the event, and the dead-letter file failed: {error}"
        return None

    async def _connect(self, sink: Sink) -> bool:
        async with self._connecting:
            if id(sink) not in self._unconnected:
                return True
            try:
                await sink.connect()
            except Exception as exc:
                log.warning("sink %s still cannot connect: %s", sink.name, exc)
                return False
            self._unconnected.discard(id(sink))
            log.info("sink %s connected", sink.name)
            return True

    # --- dead letters ---------------------------------------------------------------------

    async def _dead_letter(self, event: ReceivedEvent, sink: str, reason: str) -> None:
        meta = {"sink": sink, "reason": reason, "at": _now()}
        await self._append_dead_letter(dead_letter_line(event.record(), meta))
        self.metrics.spool_dead_letters.labels(sink).inc()
        log.error(
            "event %s put in %s: sink %s refused it for good: %s",
            event.event_id,
            DEAD_LETTER_NAME,
            sink,
            reason,
        )

    async def _dead_letter_unreadable(self, item: Item) -> None:
        line = item.entry
        assert isinstance(line, Line)  # noqa: S101 - only lines are unreadable
        reason = item.problem or "unreadable"
        meta = {
            "sink": SPOOL_SINK,
            "reason": reason,
            "at": _now(),
            "file": line.name,
            "offset": line.start,
        }
        try:
            await self._append_dead_letter(unreadable_line(line.data, meta))
        except OSError as exc:
            log.error("cannot write the dead-letter file: %s", exc)
            self.last_error = f"dead-letter file: {exc}"
            item.failed_at = time.monotonic()
            return
        item.problem = None
        self.metrics.spool_dead_letters.labels(SPOOL_SINK).inc()
        log.error(
            "spool line at byte %d of %s put in %s: %s",
            line.start,
            line.name,
            DEAD_LETTER_NAME,
            reason,
        )

    async def _append_dead_letter(self, line: bytes) -> None:
        # LineFile is driven from one thread at a time; dead letters are rare.
        async with self._dead_lock:
            await asyncio.to_thread(self._dead_letters.append, line + b"\n")


def _done(item: Item) -> bool:
    return not item.pending and item.problem is None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
