"""Events/s through FileSink with N concurrent senders, fsync on vs off.

    python bench/file_sink.py [--events 2000] [--rounds 5] [--dir DIR]

Both settings run in the same invocation, in alternating order each round, so that drift
in the machine hits both alike; the table shows the median round. ``--dir`` picks the
filesystem to measure (fsync cost is a property of the disk, not of the code).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# Run as a plain script from anywhere: the repository root holds the `app` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.events import parse_body
from app.received import ReceivedEvent
from app.signature import UNVERIFIED
from app.sinks.file import FileSink

SENDERS = (1, 16, 64)
BODY = (
    '{"event":{"eventId":"%s","targetName":"projects/p1/devices/d1","eventType":"touch",'
    '"data":{"touch":{"updateTime":"2022-02-10T12:42:13.313949Z"}},'
    '"timestamp":"2022-02-10T12:42:13.313949Z"},"labels":{"name":"bench"},'
    '"metadata":{"deviceId":"d1","projectId":"p1","deviceType":"touch","productNumber":""}}'
)


def make_events(count: int) -> list[ReceivedEvent]:
    now = datetime.now(UTC)
    bodies = [(BODY % f"bench{i:015d}").encode() for i in range(count)]
    return [ReceivedEvent(b, parse_body(b), UNVERIFIED, now) for b in bodies]


async def one_round(path: Path, events: list[ReceivedEvent], senders: int, fsync: bool) -> float:
    """Events/s for ``senders`` tasks sharing ``events`` through one fresh sink."""
    sink = FileSink(path, fsync=fsync, max_bytes=0)
    await sink.connect()
    queue = iter(events)

    async def sender() -> None:
        for event in queue:
            await sink.send(event)

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(senders)))
    elapsed = time.perf_counter() - start
    await sink.close()
    return len(events) / elapsed


async def main(events_per_round: int, rounds: int, directory: str | None) -> None:
    events = make_events(events_per_round)
    rates: dict[tuple[int, bool], list[float]] = {}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for r in range(rounds):
            for senders in SENDERS:
                for fsync in (True, False) if r % 2 == 0 else (False, True):
                    path = Path(tmp) / f"round{r}-{senders}-{fsync}.jsonl"
                    rate = await one_round(path, events, senders, fsync)
                    rates.setdefault((senders, fsync), []).append(rate)
    print(f"{events_per_round} events/round, {rounds} rounds, median events/s, dir={tmp}")
    print(f"{'senders':>8} {'fsync on':>12} {'fsync off':>12} {'on/off':>8}")
    for senders in SENDERS:
        on = statistics.median(rates[senders, True])
        off = statistics.median(rates[senders, False])
        print(f"{senders:>8} {on:>12,.0f} {off:>12,.0f} {on / off:>8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory (filesystem) to write in")
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds, args.dir))
