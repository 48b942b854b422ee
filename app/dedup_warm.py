"""Warm start of the in-memory dedup window from what the file sink stored last.

The in-memory window is empty after a restart. Without a warm start, the events a crash
caught between their write and their 200 are stored twice: DT never saw an answer, so it
sends them again. Reading the eventIds of the newest records back at start-up closes that
gap, and any other duplicate DT sends within what was read. The read is bounded in bytes
(``DCON_DEDUP_WARM_BYTES``), so start-up time stays bounded however big the files are.

A record line begins with its metadata (``ReceivedEvent.meta``): ``eventId`` first and
``receivedAt`` a little later, so both are read with one match on the line's head instead
of parsing the line.
"""

from __future__ import annotations

import logging
import re
import stat
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from app.dedup import MemoryDedup

log = logging.getLogger("dcon.dedup")

_HEAD = re.compile(rb'\{"eventId":"([^"\\]+)"[^\n]*?"receivedAt":"([^"]+)"')


def event_files(path: Path) -> list[Path]:
    """The file sink's files, oldest first: rotated ones by name, then the live file."""
    rotated = sorted(path.parent.glob(f"{path.stem}-*{path.suffix}"))
    return [*rotated, path] if path.exists() else rotated


def newest_records(path: Path, max_bytes: int) -> Iterator[bytes]:
    """Whole lines from the newest ``max_bytes`` of the sink's files, oldest first.

    Only regular files are read, and each only up to the size it had when looked at: a
    device (``/dev/full``) or a file still growing cannot make the read endless.
    """
    chosen: list[tuple[Path, int, int]] = []  # (file, where to start, where to stop)
    budget = max_bytes
    for file in reversed(event_files(path)):
        info = file.stat()
        if not stat.S_ISREG(info.st_mode):
            continue
        size = info.st_size
        if size >= budget:
            chosen.append((file, size - budget, size))
            break
        chosen.append((file, 0, size))
        budget -= size
    for file, start, stop in reversed(chosen):
        with file.open("rb") as handle:
            if start:
                handle.seek(start - 1)
                handle.readline()  # the rest of a line cut by the budget
            while handle.tell() < stop:
                line = handle.readline(stop - handle.tell())
                if not line:
                    break
                yield line


def warm(dedup: MemoryDedup, path: Path, max_bytes: int) -> int:
    """Remember the eventIds of the newest records still within the window; how many."""
    if max_bytes <= 0:
        return 0
    started = time.perf_counter()
    now = time.time()
    remembered = 0
    try:
        for line in newest_records(path, max_bytes):
            match = _HEAD.match(line)
            if match is None:
                continue  # no eventId, or not a record
            try:
                received = datetime.fromisoformat(match[2].decode()).timestamp()
            except ValueError:
                continue
            age = now - received
            if age <= dedup.window:
                dedup.remember(match[1].decode(), max(age, 0.0))
                remembered += 1
    except OSError as exc:
        # A warm start is an optimisation: without it, duplicates are possible, not loss.
        log.warning("dedup warm start from %s stopped: %s", path, exc)
    if remembered:
        log.info(
            "dedup window warmed with %d eventIds from the newest %s MiB of %s in %.2f s",
            remembered,
            f"{max_bytes / 2**20:g}",
            path,
            time.perf_counter() - started,
        )
    return remembered
