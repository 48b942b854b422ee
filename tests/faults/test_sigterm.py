"""SIGTERM (and SIGINT): the receiver stops accepting, lets every request in flight end with
a definite answer, then closes its sinks; a request that outlasts DCON_SHUTDOWN_TIMEOUT is
cut off rather than holding the process for ever."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.ledger import Report, account, file_contents, redis_stream_ids
from tests.faults.processes import Receiver, RedisServer, pause, resume, wait_until
from tests.faults.sender import DTSender, dt_events

pytestmark = [pytest.mark.faults, pytest.mark.slow]

EVENTS = 3000
CONNECTIONS = 32
SHUTDOWN_WAIT = 30  # far beyond the receiver's own bound (sink timeout + 5 s)


def test_sigterm_under_load_answers_every_request_in_flight(
    tmp_path: Path, receivers: Callable[..., Receiver], report: Callable[[Report], None]
) -> None:
    """Every request the receiver had taken when SIGTERM came is answered (its access log
    and what the sender received agree), none is cancelled, every 200 is stored, and after
    a restart the sender finishes with nothing lost and nothing stored twice."""
    receiver = receivers(tmp_path)
    receiver.start()
    sender = DTSender(receiver.url, connections=CONNECTIONS)
    sender.start(dt_events(EVENTS))
    sender.wait_acknowledged(EVENTS // 3)
    signalled = time.monotonic()
    code = receiver.terminate(SHUTDOWN_WAIT)
    stopped = time.monotonic()

    assert code in (0, -signal.SIGTERM), receiver.log_tail()
    assert receiver.logged("Application shutdown complete") == 1
    assert receiver.logged("timeout graceful shutdown exceeded") == 0
    received = {a.request_id: a.outcome for a in sender.attempts()}
    answered = {
        line["requestId"]: str(line["status"])
        for line in receiver.log_lines()
        if line.get("logger") == "dcon.access"
    }
    unanswered = {r: s for r, s in answered.items() if received.get(r) != s}
    assert unanswered == {}, "the receiver answered these, the sender never got the answer"
    in_flight = [
        a
        for a in sender.attempts()
        if a.started < signalled and a.ended > signalled and a.outcome.isdigit()
    ]
    assert in_flight, "no request was in flight when SIGTERM came"
    stored_before_restart = set(file_contents(receiver.data).ids)
    acked_so_far = {a.request_id.partition(".")[0] for a in sender.attempts() if a.outcome == "200"}
    assert acked_so_far <= stored_before_restart

    receiver.start()
    sender.finish()
    receiver.stop()
    stored = file_contents(receiver.data)
    assert stored.bad_lines == []
    outcomes = ", ".join(sorted({a.outcome for a in in_flight}))
    notes = (
        f"{len(in_flight)} requests in flight at SIGTERM, all answered ({outcomes}); "
        f"stopped {stopped - signalled:.1f} s after the signal"
    )
    figures = account("SIGTERM under load", sender, stored.ids, notes)
    report(figures)
    assert figures.dup_stored == 0


def waiting_at(port: int) -> int:
    """Connections to local ``port`` holding bytes its (stopped) server has not read."""
    waiting = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rpartition(":")[2], 16)
        rx_queue = int(fields[4].partition(":")[2], 16)
        waiting += local_port == port and rx_queue > 0
    return waiting


# The status each stop ends with once the shutdown is done: one uvicorn server raises the
# signal it caught again, so SIGTERM ends the process as that signal would (-15) and SIGINT
# as KeyboardInterrupt, which `serve` turns into an interrupt's status, 130; uvicorn's
# supervisor of several workers returns normally.
@pytest.mark.parametrize(
    ("sig", "workers", "status"),
    [(signal.SIGTERM, 1, -signal.SIGTERM), (signal.SIGINT, 1, 130), (signal.SIGTERM, 2, 0)],
    ids=["sigterm", "sigint", "sigterm-2-workers"],
)
def test_requests_stuck_in_a_sink_finish_before_the_sinks_close(
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    private_redis: RedisServer,
    sig: int,
    workers: int,
    status: int,
) -> None:
    """Redis frozen, so that every request sits in the sink when the signal comes: the
    receiver waits, Redis comes back, each request is answered 200 and is in the stream,
    and only then do the sinks close."""
    requests = 6
    receiver = receivers(
        tmp_path,
        args=("--workers", str(workers)),
        DCON_SINKS="redis",
        DCON_REDIS_URL=private_redis.url,
        DCON_SINK_TIMEOUT="8",
        DCON_DEDUP_PATH=str(tmp_path / "data" / "dedup.sqlite3"),
    )
    receiver.start()
    pause(private_redis.proc)
    try:
        sender = DTSender(receiver.url, connections=requests, give_up_after=15)
        sender.start(dt_events(requests))
        wait_until(lambda: waiting_at(private_redis.port) >= requests, 10, "XADDs to wait")
        assert receiver.proc is not None
        receiver.proc.send_signal(sig)
        wait_until(
            lambda: receiver.logged("Waiting for connections to close") >= 1,
            10,
            "the receiver to wait for its connections",
        )
    finally:
        resume(private_redis.proc)
    assert receiver.proc.wait(SHUTDOWN_WAIT) == status
    sender.finish()
    first_answers = [d.attempts[0].outcome for d in sender.deliveries.values()]
    assert first_answers == ["200"] * requests
    with private_redis.client() as client:
        assert sorted(redis_stream_ids(client, "dt:events")) == sorted(sender.deliveries)
    assert receiver.logged("Application shutdown complete") == workers


def test_a_request_that_outlasts_the_shutdown_timeout_is_cut_off(
    tmp_path: Path, receivers: Callable[..., Receiver]
) -> None:
    """A client that sends its headers and never its body cannot hold the receiver: after
    DCON_SHUTDOWN_TIMEOUT its request is cancelled and answered 500 (DT retries it), and
    the process stops."""
    receiver = receivers(tmp_path, DCON_SINK_TIMEOUT="1", DCON_SHUTDOWN_TIMEOUT="2")
    receiver.start()
    with socket.create_connection(("127.0.0.1", receiver.port)) as client:
        client.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.5)  # the receiver reads the headers and starts the request
        try:
            code = receiver.terminate(SHUTDOWN_WAIT)
        except subprocess.TimeoutExpired:
            pytest.fail("the receiver waited for the stalled request past its shutdown timeout")
        assert client.recv(100).startswith(b"HTTP/1.1 500 ")
    assert code in (0, -signal.SIGTERM)
    assert receiver.logged("Cancel 1 running task(s)") == 1
    assert receiver.logged("Application shutdown complete") == 1
    assert file_contents(receiver.data).ids == []
