"""A full disk under load: the file sink's writes fail, the receiver answers 503 (never
200 for an event it could not store), and it recovers once space returns."""

from __future__ import annotations

import resource
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.ledger import Report, account, file_contents
from tests.faults.processes import Receiver, wait_until
from tests.faults.sender import DTSender, dt_events

pytestmark = [pytest.mark.faults, pytest.mark.slow]

EVENTS = 2000  # about 1.4 MB of lines: the first MiB fits, then the disk is full
ROOM = 1024 * 1024
FAILURES_BEFORE_SPACE_RETURNS = 100


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs as the data directory (needs root and a mount-permitting sandbox)."""
    data = tmp_path / "data"
    data.mkdir()
    mounted = run("mount", "-t", "tmpfs", "-o", f"size={ROOM}", "tmpfs", str(data))
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the file-size "
            "limit variant runs instead"
        )
    try:
        yield data
    finally:
        run("umount", "--lazy", str(data))


def limit_file_size() -> None:
    """In the receiver, before exec: files it writes may not grow past ROOM (EFBIG), until
    the test raises the limit. Python ignores SIGXFSZ, so the write fails instead."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (ROOM, resource.RLIM_INFINITY))


def under_load_until_full(
    receiver: Receiver, space_returns: Callable[[], None], name: str
) -> Report:
    receiver.start()
    sender = DTSender(receiver.url)
    sender.start(dt_events(EVENTS))
    sender.wait_acknowledged(EVENTS // 4)
    wait_until(
        lambda: sender.answers()["503"] >= FAILURES_BEFORE_SPACE_RETURNS,
        60,
        f"the full disk to give {FAILURES_BEFORE_SPACE_RETURNS} answers 503",
    )
    space_returns()
    sender.finish()
    receiver.stop()
    stored = file_contents(receiver.data)
    assert stored.bad_lines == []  # a write cut short by the full disk was cut back
    return account(name, sender, stored.ids)


def test_full_tmpfs_gives_503s_and_recovers(
    tmp_path: Path,
    small_tmpfs: Path,
    receivers: Callable[..., Receiver],
    report: Callable[[Report], None],
) -> None:
    """A 1 MiB tmpfs fills up; remounted at 64 MiB, the receiver takes the rest."""
    receiver = receivers(tmp_path, DCON_LOG_LEVEL="warning")

    def grow() -> None:
        assert run("mount", "-o", "remount,size=64m", str(small_tmpfs)).returncode == 0

    figures = under_load_until_full(receiver, grow, "disk full (tmpfs)")
    report(figures)
    assert figures.answers["503"] >= FAILURES_BEFORE_SPACE_RETURNS
    assert figures.dup_stored == 0
    assert receiver.logged("No space left on device") > 0


def test_file_size_limit_gives_503s_and_recovers(
    tmp_path: Path, receivers: Callable[..., Receiver], report: Callable[[Report], None]
) -> None:
    """The same without root: a file-size limit on the receiver (EFBIG), lifted from outside
    with prlimit while it runs."""
    receiver = receivers(tmp_path, preexec=limit_file_size, DCON_LOG_LEVEL="warning")

    def lift() -> None:
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(receiver.pid, resource.RLIMIT_FSIZE, unlimited)

    figures = under_load_until_full(receiver, lift, "disk full (file size limit)")
    report(figures)
    assert figures.answers["503"] >= FAILURES_BEFORE_SPACE_RETURNS
    assert figures.dup_stored == 0
    assert receiver.logged("File too large") > 0
