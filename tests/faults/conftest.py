"""Every fault test's report line, printed when the test ends and again in the summary."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.ledger import Report
from tests.faults.processes import Receiver, RedisServer

REPORTS: list[str] = []


@pytest.fixture
def report() -> Callable[[Report], None]:
    """Record a test's figures, then fail it if any event was lost."""

    def record(figures: Report) -> None:
        REPORTS.append(figures.line())
        print(f"\n{figures.line()}")
        assert figures.lost_after_200 == 0, f"answered 200 but not stored: {figures.line()}"
        assert figures.lost == 0, f"never stored: {figures.line()}"

    return record


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    """Make receivers that are stopped (SIGTERM, then kill -9) when the test ends."""
    made: list[Receiver] = []

    def make(workdir: Path, **kwargs: object) -> Receiver:
        receiver = Receiver(workdir, **kwargs)  # type: ignore[arg-type]
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("fault reports (lost must be 0)")
        for line in REPORTS:
            terminalreporter.write_line(line)
