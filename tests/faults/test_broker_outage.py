"""A broker outage under load: a private Redis (every write in its append-only file before
it answers) is killed for a few seconds, then started again on the same files.

Direct mode answers 503 while Redis is away and DT's retries fill the gap once it is back.
Spool mode keeps answering 200 from its local spool and forwards the backlog afterwards.
Either way nothing is lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.ledger import Report, account, redis_stream_ids
from tests.faults.processes import Receiver, RedisServer, wait_until
from tests.faults.sender import DTSender, dt_events

pytestmark = [pytest.mark.faults, pytest.mark.slow]

EVENTS = 2000
CONNECTIONS = 32
OUTAGE = 3.0  # seconds Redis stays down
STREAM = "dt:events"


@pytest.mark.parametrize("mode", ["direct", "spool"])
def test_redis_outage_under_load_loses_nothing(
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    private_redis: RedisServer,
    report: Callable[[Report], None],
    mode: str,
) -> None:
    """kill -9 of Redis mid-stream, back after a few seconds: every event in the stream."""
    env = {"DCON_SINKS": "redis", "DCON_REDIS_URL": private_redis.url, "DCON_SINK_TIMEOUT": "2"}
    if mode == "spool":
        env |= {
            "DCON_SPOOL": "true",
            "DCON_SPOOL_DIR": str(tmp_path / "data" / "spool"),
            # At most this many XADDs in flight when Redis dies: the bound on duplicates.
            "DCON_SPOOL_CONCURRENCY": str(CONNECTIONS),
        }
    receiver = receivers(tmp_path, **env)
    receiver.start()
    # Paced, so that events keep arriving through the whole outage however fast the
    # receiver is: 2,000 events over 5 s, the outage from about 1.25 s to 4.25 s.
    sender = DTSender(receiver.url, connections=CONNECTIONS, rate=EVENTS / 5)
    sender.start(dt_events(EVENTS))
    sender.wait_acknowledged(EVENTS // 4)
    private_redis.kill()
    down = time.monotonic()
    time.sleep(OUTAGE)  # the outage itself
    private_redis.start()
    up = time.monotonic()
    sender.finish()

    with private_redis.client() as client:
        # The spool forwards what it answered 200 for in the background: wait for it.
        everything = set(sender.deliveries)
        wait_until(
            lambda: set(redis_stream_ids(client, STREAM)) >= everything,
            60,
            "the backlog to reach Redis",
        )
        receiver.stop()
        stored = redis_stream_ids(client, STREAM)
    figures = account(f"Redis outage ({mode})", sender, stored)
    report(figures)
    during = [a.outcome for a in sender.attempts() if down + 0.5 < a.ended < up]
    if mode == "direct":
        assert "503" in during  # DT was told to come back later
    else:
        assert "200" in during  # the spool kept taking events
        assert figures.answers.get("503", 0) == 0
    # An XADD Redis had written when it died never got its reply, so it is sent again, and
    # Redis streams do not deduplicate: at most one per event in flight.
    assert figures.dup_stored <= CONNECTIONS
