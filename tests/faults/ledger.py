"""What was stored, and the figures every fault test reports: sent, answered 200, stored,
duplicates stored, lost."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import redis

from tests.faults.sender import DTSender

PAGE = 5000


@dataclass(frozen=True)
class FileContents:
    ids: list[str]  # the eventId of every whole line, in every events file
    bad_lines: list[str] = field(default_factory=list)  # torn or unreadable, with their file


def file_contents(directory: Path) -> FileContents:
    """Every line of ``events.jsonl`` and the files rotated from it (``.torn`` files are
    not events: they hold what a crash tore, moved out)."""
    ids: list[str] = []
    bad: list[str] = []
    for path in sorted(directory.glob("events*.jsonl")):
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:
            bad.append(f"{path.name}: ends mid-line")
        for number, line in enumerate(lines[:-1], 1):
            try:
                ids.append(json.loads(line)["eventId"])
            except (ValueError, KeyError):
                bad.append(f"{path.name}:{number}: {line[:60]!r}")
    return FileContents(ids, bad)


def redis_stream_ids(client: redis.Redis, stream: str) -> list[str]:
    """The eventId of every entry of a Redis stream, read in pages."""
    ids: list[str] = []
    start = "-"
    while True:
        # One entry past the page: where the next page starts.
        page = client.xrange(stream, min=start, count=PAGE + 1)
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], page)
        ids.extend(fields[b"eventId"].decode() for _, fields in entries[:PAGE])
        if len(entries) <= PAGE:
            return ids
        start = entries[PAGE][0].decode()


@dataclass(frozen=True)
class Report:
    name: str
    sent: int
    answered_200: int
    stored: int  # distinct eventIds
    dup_stored: int  # entries beyond the first of an eventId
    lost: int  # sent but not stored once the sender is done (answered 200 or not)
    lost_after_200: int
    requests: int
    answers: dict[str, int]
    notes: str = ""

    def line(self) -> str:
        answers = " ".join(f"{k}={v}" for k, v in sorted(self.answers.items()))
        notes = f"; {self.notes}" if self.notes else ""
        return (
            f"{self.name}: sent={self.sent} 200={self.answered_200} stored={self.stored} "
            f"dup_stored={self.dup_stored} lost={self.lost} "
            f"(requests={self.requests}: {answers}{notes})"
        )


def account(name: str, sender: DTSender, stored: list[str], notes: str = "") -> Report:
    """The figures of one run. The sender retries until 200, so once it is done every
    event sent must be stored: lost counts those that are not, 200 or not."""
    sent = set(sender.deliveries)
    acknowledged = {i for i, d in sender.deliveries.items() if d.acknowledged}
    kept = set(stored)
    assert kept <= sent, f"stored events nobody sent: {sorted(kept - sent)[:5]}"
    return Report(
        name=name,
        sent=len(sent),
        answered_200=len(acknowledged),
        stored=len(kept),
        dup_stored=len(stored) - len(kept),
        lost=len(sent - kept),
        lost_after_200=len(acknowledged - kept),
        requests=len(sender.attempts()),
        answers=dict(sender.answers()),
        notes=notes,
    )
