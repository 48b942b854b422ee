"""The spool's files on disk, and reading them back in the order they were written.

The directory holds ``spool.jsonl`` (the live file, appended to by the file sink's
group-committed writer), ``spool-<UTC time>.jsonl`` (files it rotated aside, named so that
they sort in write order), ``forwarded.json`` (the forwarder's position) and
``dead-letter.jsonl``.

A file is known by its inode, not its name: the writer renames the live file aside when it
rotates, and a position taken in ``spool.jsonl`` must still hold once that file is
``spool-<time>.jsonl``. Every function here is plain blocking file I/O, for a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dcon.spool")

SPOOL_NAME = "spool.jsonl"
ROTATED_GLOB = "spool-*.jsonl"
POSITION_NAME = "forwarded.json"
READ_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Segment:
    """One spool file: its name when listed, its inode and size."""

    name: str
    inode: int
    size: int


@dataclass(frozen=True, slots=True)
class Position:
    """Everything before ``offset`` in the file ``inode`` (and every file written before it)
    has been forwarded. ``name`` is what the file was called when reading began."""

    name: str
    inode: int
    offset: int


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a spool file, without its newline; ``torn`` if it never got one."""

    name: str
    inode: int
    start: int
    end: int
    data: bytes
    torn: bool = False


@dataclass(frozen=True, slots=True)
class FileEnd:
    """Every line of ``name`` (a rotated file) has been read; reading goes on in ``next``."""

    name: str
    next: Position


def segments(directory: Path) -> list[Segment]:
    """The spool files, oldest first: the rotated ones by name, then the live one.

    Listed twice around the look at the live file, until both listings agree, so that a
    rotation in between cannot hide a file.
    """
    while True:
        rotated = sorted(p.name for p in directory.glob(ROTATED_GLOB))
        live = _segment(directory, SPOOL_NAME)
        if sorted(p.name for p in directory.glob(ROTATED_GLOB)) != rotated:
            continue
        found = [s for s in (_segment(directory, name) for name in rotated) if s is not None]
        return found + ([live] if live is not None else [])


def _segment(directory: Path, name: str) -> Segment | None:
    try:
        st = os.stat(directory / name)
    except FileNotFoundError:
        return None  # forwarded and deleted, or the live file mid-rotation
    return Segment(name, st.st_ino, st.st_size)


def pending_bytes(files: list[Segment], position: Position | None) -> int:
    """Bytes not yet forwarded: from the position to the end of the newest file."""
    for i, segment in enumerate(files):
        if position is not None and segment.inode == position.inode:
            return sum(s.size for s in files[i:]) - position.offset
    return sum(s.size for s in files)


def load_position(directory: Path) -> Position | None:
    """The saved position, or None when there is none (a new spool) or it is unreadable."""
    path = directory / POSITION_NAME
    try:
        doc = json.loads(path.read_bytes())
        return Position(str(doc["file"]), int(doc["inode"]), int(doc["offset"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.error("%s is unreadable (%s); forwarding every spool file from its start", path, exc)
        return None


def save_position(directory: Path, position: Position) -> None:
    """Replace the saved position atomically and durably (write, fsync, rename, fsync)."""
    path = directory / POSITION_NAME
    tmp = path.with_suffix(".tmp")
    doc = {"file": position.name, "inode": position.inode, "offset": position.offset}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, json.dumps(doc).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_directory(directory)


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolReader:
    """Whole lines of the spool files, oldest file first, from a position on.

    In the live file only lines that end with a newline are taken: the writer may be
    halfway through a batch. A rotated file gets no more writes, so a last line without a
    newline there is torn (its writer died mid-write, and never answered 200 for it).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.live = directory / SPOOL_NAME
        self._fd: int | None = None
        self._name = ""
        self._inode = 0
        self._offset = 0  # where the next unread line starts

    def start(self, saved: Position | None) -> tuple[Position | None, list[str]]:
        """Open the file at ``saved``; the position reading starts from, and the names of
        files written before it (forwarded, but not deleted before a crash)."""
        while saved is not None:
            files = segments(self.directory)
            inodes = [s.inode for s in files]
            if saved.inode not in inodes:
                break
            at = inodes.index(saved.inode)
            if self._open(files[at], saved.offset):
                return self.position, [s.name for s in files[:at]]
            # Rotated between the listing and the open: list again.
        if saved is not None:
            log.warning(
                "the spool file %s of the saved position is gone; forwarding every spool "
                "file from its start",
                saved.name,
            )
        if self._open_first():
            return self.position, []
        return None, []

    @property
    def position(self) -> Position:
        return Position(self._name, self._inode, self._offset)

    def read(self, most: int) -> list[Line | FileEnd]:
        """Up to ``most`` lines (and the ends of files passed on the way)."""
        out: list[Line | FileEnd] = []
        while len(out) < most:
            if self._fd is None and not self._open_first():
                break
            # Whether the file is still live is asked before reading it: if it was
            # rotated by then, what is read is all it will ever hold.
            final = not self._is_live()
            chunk = self._read_lines()
            lines = chunk.split(b"\n")
            if len(lines) > 1:
                for data in lines[: min(len(lines) - 1, most - len(out))]:
                    end = self._offset + len(data) + 1
                    out.append(Line(self._name, self._inode, self._offset, end, data))
                    self._offset = end
                continue
            if not final:
                break  # the live file, read to its end: wait for more
            following = self._next_file()
            if following is None:
                break  # the rotated file's successor is not created yet
            if chunk:
                end = self._offset + len(chunk)
                out.append(Line(self._name, self._inode, self._offset, end, chunk, torn=True))
            out.append(FileEnd(self._current_name(), following.position))
            self._close()
            self._adopt(following)
        return out

    def close(self) -> None:
        self._close()

    def _read_lines(self) -> bytes:
        """From the offset on, up to and including the last newline in a chunk; everything
        to the end if there is no newline (a line longer than a chunk reads on)."""
        size = READ_CHUNK
        while True:
            chunk = os.pread(self._fd_(), size, self._offset)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                return chunk[: cut + 1]
            if len(chunk) < size:
                return chunk
            size *= 2

    def _is_live(self) -> bool:
        try:
            return os.path.samestat(os.fstat(self._fd_()), os.stat(self.live))
        except FileNotFoundError:
            return False  # renamed aside and the next live file not created yet

    def _current_name(self) -> str:
        for segment in segments(self.directory):
            if segment.inode == self._inode:
                return segment.name
        return self._name

    def _next_file(self) -> SpoolReader | None:
        """A reader opened at the start of the file written after this one."""
        while True:
            files = segments(self.directory)
            inodes = [s.inode for s in files]
            later = files[inodes.index(self._inode) + 1 :] if self._inode in inodes else files
            later = [s for s in later if s.inode != self._inode]
            if not later:
                return None
            following = SpoolReader(self.directory)
            if following._open(later[0], 0):
                return following
            # Rotated or removed between the listing and the open: list again.

    def _open_first(self) -> bool:
        return any(self._open(segment, 0) for segment in segments(self.directory))

    def _open(self, segment: Segment, offset: int) -> bool:
        """Open ``segment`` at ``offset``; False if the name now holds another file."""
        try:
            fd = os.open(self.directory / segment.name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        if os.fstat(fd).st_ino != segment.inode:
            os.close(fd)
            return False
        self._close()
        self._fd, self._name, self._inode, self._offset = fd, segment.name, segment.inode, offset
        return True

    def _adopt(self, other: SpoolReader) -> None:
        self._fd, self._name, self._inode, self._offset = (
            other._fd,
            other._name,
            other._inode,
            other._offset,
        )
        other._fd = None

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _fd_(self) -> int:
        if self._fd is None:
            raise OSError("no spool file is open")
        return self._fd
