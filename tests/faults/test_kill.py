"""kill -9 under load: thousands of events, the receiver killed mid-stream and restarted,
the sender retrying until every event is answered 200."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.ledger import Report, account, file_contents
from tests.faults.processes import Receiver
from tests.faults.sender import DTSender, dt_events

pytestmark = [pytest.mark.faults, pytest.mark.slow]

EVENTS = 3000
CONNECTIONS = 32


def test_kill_9_under_load_loses_nothing(
    tmp_path: Path, receivers: Callable[..., Receiver], report: Callable[[Report], None]
) -> None:
    """File sink with fsync: nothing answered 200 is lost; a tail torn by the crash is moved
    out on restart, with a warning, and every line left is whole. Events stored but not yet
    answered when killed come back from the sender; the restarted receiver warmed its
    dedup window from the file, so they are answered as duplicates and stored once."""
    receiver = receivers(tmp_path)
    receiver.start()
    # Paced, so that events still arrive while it is down however fast it answers.
    sender = DTSender(receiver.url, connections=CONNECTIONS, rate=EVENTS / 5)
    sender.start(dt_events(EVENTS))
    sender.wait_acknowledged(EVENTS // 3)
    receiver.kill()
    # What a crash in the middle of a write leaves: part of a line no one was answered for.
    events = receiver.data / "events.jsonl"
    with events.open("ab") as file:
        file.write(b'{"eventId":"torn-by-the-crash","receivedAt":"2026-')
    receiver.start()
    sender.finish()
    receiver.stop()

    stored = file_contents(receiver.data)
    assert stored.bad_lines == []
    torn = events.with_name("events.jsonl.torn")
    assert b"torn-by-the-crash" in torn.read_bytes()
    assert receiver.logged("ended with a torn line") == 1
    notes = "torn tail moved to events.jsonl.torn on restart"
    figures = account("kill -9 under load", sender, stored.ids, notes)
    report(figures)
    assert figures.answers.get("ConnectionRefusedError", 0) > 0  # it was down while events came
    assert receiver.logged("dedup window warmed") == 1
    assert figures.dup_stored == 0
