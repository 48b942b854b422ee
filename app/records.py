"""Files of record lines (spool, dead letters, the file sink), read back line by line.

Every line ``ReceivedEvent.record()`` wrote gives back the event the receiver accepted;
any other line (torn by a crash, corrupt, a dead letter of a line that was already
unreadable) is an ``Unreadable`` that says why, so a reader can report it and go on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.errors import MalformedBody
from app.received import ReceivedEvent


class Unreadable(ValueError):
    """A line that is not an event record; its text says why."""


@dataclass(frozen=True, slots=True)
class Line:
    where: str  # "path:number"
    raw: bytes


def read_lines(files: Iterable[Path], on_error: Callable[[str, str], None]) -> Iterator[Line]:
    """Every non-blank line; a file that cannot be read is reported and passed over."""
    for path in files:
        try:
            # Reads ahead in blocks from a local file between events: not worth a thread.
            with path.open("rb") as lines:
                for number, raw in enumerate(lines, 1):
                    if raw.strip():
                        yield Line(f"{path}:{number}", raw)
        except OSError as exc:
            on_error(str(path), f"cannot read: {exc.strerror or exc}")


def count_lines(files: Iterable[Path]) -> int:
    """How many lines ``read_lines`` will give, for the length of a progress bar."""
    total = 0
    for path in files:
        try:
            with path.open("rb") as lines:
                total += sum(1 for raw in lines if raw.strip())
        except OSError:
            pass  # read_lines reports it
    return total


def read_event(raw: bytes) -> ReceivedEvent:
    """The event a record line carries, or ``Unreadable`` saying why there is none."""
    try:
        return ReceivedEvent.from_record(raw)
    except (ValueError, TypeError, KeyError, AttributeError, MalformedBody) as exc:
        raise Unreadable(_why_unreadable(raw, exc)) from None


def _why_unreadable(raw: bytes, exc: Exception) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        return f"not a JSON line (torn or corrupt): {exc}"
    note = doc.get("deadLetter") if isinstance(doc, dict) else None
    if isinstance(note, dict) and "body" not in doc:
        return f"dead letter of an unreadable line, no event in it: {note.get('reason', '?')}"
    return f"not an event record: {exc}"
