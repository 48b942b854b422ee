"""``file``: events as JSON Lines, on disk before ``send`` returns.

Concurrent ``send`` calls are group-committed: one writer task takes every pending line,
appends the whole batch with one ``os.write`` (and one ``fsync``) on the sink's own worker
thread, then wakes each caller. Rotation happens between batches, so that no line is
split across files.

Several processes (``dcon-receiver serve --workers N``) append to the same file safely.
Each batch is written under an exclusive ``flock`` on the file, and under that lock the
writer checks that the file at the path is still the one it holds open: if another worker
rotated it, it follows to the new file before writing, so that nobody appends to a
rotated file for ever. The size that decides rotation and the last byte that tells a torn
line are read from the file itself under the lock, not remembered, because other
processes write too. One file rather than one per worker keeps ``DCON_FILE_PATH`` the
single file its readers know, across restarts and changes of the worker count; the lock
is held only for the write, and each worker's ``fsync`` runs outside it.

Crash safety: a line is answered 200 only after the write and fsync that hold it, so the
bytes after the file's last newline never got a 200. A write that fails part-way (a full
disk) is cut back off under the lock. A tail torn by a crash is moved, on the next open,
into ``<name>.torn`` beside the file (with its offset and the time), and the file is
truncated to its last whole line: readers always see whole lines, and nothing is
silently deleted.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import fcntl
import json
import logging
import os
import stat
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from app.sinks.base import SinkError, settle

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings

# Under "dcon", so that its lines take the format and level the receiver configures.
log = logging.getLogger("dcon.sinks.file")

NAME = "file"
GATHER_TURNS = 3
FILE_MODE = 0o640
# Read too: the last byte tells whether the file ends mid-line.
OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
TORN_SUFFIX = ".torn"
# How far back each read looks for the last newline of a file with a torn tail.
TAIL_CHUNK = 64 * 1024

Pending = tuple[bytes, asyncio.Future[None]]


def rotated_path(path: Path, now: datetime) -> Path:
    """``events.jsonl`` → ``events-20261126T010203.123456Z.jsonl``, never an existing name.

    On a clash the stamp moves on by a microsecond rather than taking a counter suffix,
    so that rotated files still sort by name in the order they were written.
    """
    while True:
        candidate = path.with_name(f"{path.stem}-{now:%Y%m%dT%H%M%S.%fZ}{path.suffix}")
        if not candidate.exists():
            return candidate
        now += timedelta(microseconds=1)


class LineFile:
    """The file itself, driven from one thread at a time: open, append, rotate, close.

    Other processes may append to and rotate the same path; every append holds an
    exclusive ``flock`` on the file at the path (see the module docstring).
    """

    def __init__(self, path: Path, *, fsync: bool, max_bytes: int) -> None:
        self.path = path
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.fd: int | None = None
        # Where our own last whole write ended the file (with a newline): while the file
        # still ends there, nobody wrote after us and its last byte need not be read.
        self._clean_end: int | None = None

    def open(self) -> None:
        """Create the directory, open the file for appending, and move out a torn tail."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, OPEN_FLAGS, FILE_MODE)
        try:
            self._repair_torn_tail()
            if self.fsync:
                # Makes a newly created (or freshly rotated) file's directory entry durable.
                self._sync_directory()
        except OSError:
            self.close()  # a failed connect must not leak the descriptor
            raise

    def append(self, lines: bytes) -> None:
        """Append whole lines with one write (and one fsync), rotating first if due."""
        self.write(lines)
        if self.fsync:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._fd())

    def write(self, lines: bytes) -> None:
        """Append whole lines with one write, rotating first if due (no fsync)."""
        size = self._lock_current()
        try:
            while self._rotation_due(size, len(lines)):
                self._rotate()
                # The fresh file; a faster worker may have created it and written to it
                # already, so it is checked like any other.
                size = self._lock_current()
            data = self._line_start(size) + lines
            try:
                self._write_all(data)
            except OSError:
                self._cut_back(size)
                raise
            self._clean_end = size + len(data)
        finally:
            self._unlock()

    def check(self) -> None:
        """Raise ``OSError`` unless the file is still at ``path`` and its directory writable.

        A file moved aside (rotated by another worker) is followed to the new one; a file
        deleted under us is an error, since events written to it would be invisible.
        """
        if not os.access(self.path.parent, os.W_OK):
            raise PermissionError(errno.EACCES, "directory is not writable", str(self.path))
        if self._size_if_current() is not None:
            return
        if os.fstat(self._fd()).st_nlink == 0 and not self.path.exists():
            raise FileNotFoundError(errno.ENOENT, "file was replaced or removed", str(self.path))
        self._lock_current()
        self._unlock()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        self._clean_end = None
        if fd is not None:
            os.close(fd)  # also drops a lock we held on it

    def _lock_current(self) -> int:
        """Lock the file now at ``path``, following rotations by other workers; its size."""
        while True:
            if self.fd is None:
                self.open()
            fcntl.flock(self._fd(), fcntl.LOCK_EX)
            size = self._size_if_current()
            if size is not None:
                return size
            # Rotated or removed while we waited: closing drops that lock; open the path anew.
            self.close()

    def _unlock(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _size_if_current(self) -> int | None:
        """The open file's size if it is still the file at ``path``, else None."""
        here = os.fstat(self._fd())
        try:
            if not os.path.samestat(here, os.stat(self.path)):
                return None
        except FileNotFoundError:
            return None
        # Devices and pipes (e.g. /dev/full) have no size worth checking.
        return here.st_size if stat.S_ISREG(here.st_mode) else 0

    def _rotate(self) -> None:
        """Move the current file aside under a UTC timestamp (the lock is held)."""
        os.rename(self.path, rotated_path(self.path, datetime.now(UTC)))
        self.close()

    def _line_start(self, size: int) -> bytes:
        """A newline if the file ends mid-line, torn by another process since it opened.

        The torn bytes stay as they are (the next open moves them out) and the next event
        starts on a line of its own.
        """
        if size in (0, self._clean_end) or os.pread(self._fd(), 1, size - 1) == b"\n":
            return b""
        log.warning(
            "%s does not end with a newline (torn last line); the next event starts on a "
            "fresh line at byte %d",
            self.path,
            size,
        )
        return b"\n"

    def _cut_back(self, size: int) -> None:
        """Remove what a failed write left past ``size`` (the lock is held): none of it
        gets a 200, and a part of a line must not stay for readers to trip on."""
        try:
            os.ftruncate(self._fd(), size)
        except OSError as exc:
            # The next write starts on a fresh line (_line_start); a restart moves it out.
            log.error("%s: cannot cut a failed write back to byte %d: %s", self.path, size, exc)

    def _repair_torn_tail(self) -> None:
        """Under the lock: if the file ends mid-line, move the bytes after its last
        newline to ``<name>.torn`` and truncate the file there."""
        fcntl.flock(self._fd(), fcntl.LOCK_EX)
        try:
            size = self._size_if_current()
            if not size or os.pread(self._fd(), 1, size - 1) == b"\n":
                return
            cut = self._after_last_newline(size)
            tail = os.pread(self._fd(), size - cut, cut)
            torn = self.path.with_name(self.path.name + TORN_SUFFIX)
            _append_durably(torn, self._torn_record(cut, tail))
            os.ftruncate(self._fd(), cut)
            os.fsync(self._fd())
            log.warning(
                "%s ended with a torn line (a crash mid-write; it was never acknowledged): "
                "moved its %d bytes from offset %d to %s",
                self.path,
                len(tail),
                cut,
                torn,
            )
        finally:
            self._unlock()

    def _after_last_newline(self, size: int) -> int:
        """The offset just after the file's last newline (0 if it has none)."""
        end = size
        while end > 0:
            start = max(0, end - TAIL_CHUNK)
            found = os.pread(self._fd(), end - start, start).rfind(b"\n")
            if found >= 0:
                return start + found + 1
            end = start
        return 0

    def _torn_record(self, offset: int, tail: bytes) -> bytes:
        record = {
            "file": str(self.path),
            "offset": offset,
            "bytes": len(tail),
            "movedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "tail": base64.b64encode(tail).decode("ascii"),  # exact bytes
            "text": tail.decode("utf-8", "replace"),  # for a reader's eyes
        }
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    def _fd(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, "file is not open", str(self.path))
        return self.fd

    def _rotation_due(self, size: int, incoming: int) -> bool:
        return self.max_bytes > 0 and size > 0 and size + incoming > self.max_bytes

    def _write_all(self, data: bytes) -> None:
        # os.write may write less than asked (signals, quotas, a nearly full disk); with
        # O_APPEND each continuation still lands at the end, right after the previous part,
        # since the lock keeps other workers out until the whole batch is in.
        view = memoryview(data)
        while view:
            written = os.write(self._fd(), view)
            if written == 0:
                raise OSError(errno.EIO, "write made no progress", str(self.path))
            view = view[written:]

    def _sync_directory(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FileSink:
    """Append each event to a JSON Lines file; ``send`` returns once its line is written.

    With ``fsync`` on, the line is also fsynced before ``send`` returns. With
    ``max_bytes`` > 0 the file is rotated before a batch that would take it past that
    size. An instance is connected once and closed once.
    """

    name = NAME

    def __init__(self, path: Path, *, fsync: bool, max_bytes: int) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.batches = 0  # group commits done, each one write (and one fsync)
        self._file = LineFile(self.path, fsync=fsync, max_bytes=max_bytes)
        # One dedicated thread: file operations run in order, and one left running by a
        # cancelled await can never overlap the next one.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-sink")
        self._pending: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    def from_settings(cls, settings: Settings) -> FileSink:
        return cls(settings.file_path, fsync=settings.file_fsync, max_bytes=settings.file_max_bytes)

    async def connect(self) -> None:
        """Open the file (creating its directory) and start the writer."""
        if self._closing:
            raise SinkError(NAME, f"{self.path}: sink is closed")
        if self._writer is not None:
            return
        try:
            await self._in_thread(self._file.open)
        except OSError as exc:
            raise SinkError(NAME, f"cannot open {self.path}: {exc}") from exc
        self._writer = asyncio.create_task(self._write_batches(), name=f"file-sink {self.path}")

    async def send(self, event: ReceivedEvent) -> None:
        """Return once the event's line is in the file (and fsynced when fsync is on)."""
        if self._writer is None or self._writer.done() or self._closing:
            raise SinkError(NAME, f"{self.path}: {'closed' if self._closing else 'not open'}")
        # The writer's loop, which is this one: get_running_loop() is a getpid system call.
        done: asyncio.Future[None] = self._writer.get_loop().create_future()
        self._pending.append((event.record() + b"\n", done))
        self._wake.set()
        await done

    async def ping(self) -> None:
        """Raise ``SinkError`` unless the file is open, still in place, and writable."""
        if self._writer is None or self._writer.done():
            raise SinkError(NAME, f"{self.path}: not open")
        try:
            await self._in_thread(self._file.check)
        except OSError as exc:
            raise SinkError(NAME, f"{self.path}: {exc}") from exc

    async def close(self) -> None:
        """Write every line already sent, stop the writer and close the file."""
        self._closing = True
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._wake.set()
        # wait() rather than await: a cancelled close must not cancel the writer mid-batch.
        await asyncio.wait([writer])
        try:
            await self._in_thread(self._file.close)
        finally:
            self._thread.shutdown(wait=False)

    async def _in_thread(self, func: Callable[..., None], *args: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, func, *args)

    async def _write_batches(self) -> None:
        try:
            while self._pending or not self._closing:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                # Let the loop go round a few times before cutting the batch: requests read
                # meanwhile reach send() and join it, so under load each fsync carries more
                # events (measured: +6% requests/s and a third of the thread switches with
                # 3 turns; more gained nothing). Idle, it adds three empty turns, microseconds.
                for _ in range(GATHER_TURNS):
                    await asyncio.sleep(0)
                await self._commit(self._take_batch())
        finally:
            _settle(list(self._pending), "the writer stopped")
            self._pending.clear()

    def _take_batch(self) -> list[Pending]:
        # A caller cancelled before its turn gave up on its line: leave it out.
        batch = [item for item in self._pending if not item[1].done()]
        self._pending.clear()
        return batch

    async def _commit(self, batch: list[Pending]) -> None:
        if not batch:
            return
        self.batches += 1
        try:
            # The write goes to the page cache: microseconds, done here on the loop, since
            # a hand-off to the thread per batch cost more than the write itself. Only
            # fsync, which waits for the disk, goes to the thread.
            self._file.write(b"".join(line for line, _ in batch))
            if self._file.fsync:
                await self._in_thread(self._file.sync)
        except Exception as exc:
            _settle(batch, f"cannot write {self.path}: {exc}")
            return
        except BaseException:
            # Cancelled mid-batch: the lines may or may not be written, so no success.
            _settle(batch, "the write was interrupted")
            raise
        _settle(batch, None)


def _append_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(batch: list[Pending], error: str | None) -> None:
    settle((done for _, done in batch), NAME, error)
