"""RSS of the receiver after 1,000,000 distinct events with the default dedup window.

    python bench/memory.py [--events 1000000] [--concurrency 64] [--target-mb 150]
                           [--set NAME=VALUE ...]

The events go in-process through the app's own ``Receiver`` (signature check, typed parse,
dedup with the default window and entry cap, file sink with fsync in a temporary
directory), after the app's real lifespan start-up: over HTTP the receiver takes about 10
minutes per million events on one core, in-process about a fifth of that, and the memory
that stays behind (the dedup window) is the same. Distinct signed events are made in
worker processes while the receiver takes them, so the measured process holds no more
than three chunks of 2,000 of them (a few MB) at a time. Prints Markdown: RSS along the
way and the verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop
from inprocess import lifespan, receiver_settings
from signed_bodies import SECRET_HEADER, Signer, signed_line

from app.dedup import MemoryDedup
from app.logs import configure_logging
from app.main import create_app
from app.receiver import Receiver

CHUNK = 2_000
Chunk = list[tuple[dict[str, str], bytes]]


def make_chunk(index: int) -> Chunk:
    signer = Signer()
    chunk = []
    for n in range(index * CHUNK, (index + 1) * CHUNK):
        token, body = signed_line(signer, n).rstrip("\n").split("\t", 1)
        chunk.append(({SECRET_HEADER.lower(): token}, body.encode()))
    return chunk


def prefetched(pool: Any, count: int, ahead: int = 2) -> Iterator[Chunk]:
    """The chunks in order, at most ``ahead`` made before they are needed (``imap`` would
    make them all at once and pile them up in this process)."""
    pending: deque[Any] = deque()
    for index in range(count):
        pending.append(pool.apply_async(make_chunk, (index,)))
        if len(pending) > ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def status_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def dedup_held(receiver: Receiver) -> tuple[int, int]:
    """Ids in the in-memory dedup window and their size at the Python level (its dicts,
    keys and timestamps), in KiB; (0, 0) for another store."""
    store = receiver.dedup
    if not isinstance(store, MemoryDedup):
        return 0, 0
    generations = (store._current, store._previous)
    stamps = {id(v): v for g in generations for v in g.values()}  # shared, counted once
    size = (
        sum(sys.getsizeof(g) for g in generations)
        + sum(sys.getsizeof(k) for g in generations for k in g)
        + sum(sys.getsizeof(v) for v in stamps.values())
    )
    return len(store), size // 1024


def mb(kib: float) -> str:
    return f"{kib * 1024 / 1e6:,.1f} MB ({kib / 1024:,.1f} MiB)"


Checkpoints = list[tuple[int, dict[str, int]]]


async def feed(
    app: Any, chunks: Any, events: int, concurrency: int
) -> tuple[Checkpoints, int, int]:
    """Every chunk through the receiver; RSS along the way, then the dedup window's size."""
    checkpoints: Checkpoints = []
    async with lifespan(app):
        receiver: Receiver = app.state.receiver
        checkpoints.append((0, status_kib()))
        done = 0
        started = time.perf_counter()
        for chunk in chunks:
            for i in range(0, len(chunk), concurrency):
                # One batch at a time, dropping the answers as a server does.
                batch = chunk[i : i + concurrency]
                acks = await asyncio.gather(*(receiver.receive(b, h) for h, b in batch))
                if any(ack.status != "accepted" for ack in acks):
                    raise RuntimeError("an event was not accepted as new")
            done += len(chunk)
            if done % 100_000 == 0 or done == events:
                checkpoints.append((done, status_kib()))
                rate = done / (time.perf_counter() - started)
                rss = mb(checkpoints[-1][1]["VmRSS"])
                print(f"  {done:,} events, RSS {rss}, {rate:,.0f}/s", file=sys.stderr)
        held = dedup_held(receiver)
    return checkpoints, *held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--target-mb", type=float, default=150)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a receiver setting to change, e.g. dedup_max_entries=500000",
    )
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    count = -(-args.events // CHUNK)
    started = time.perf_counter()
    # The workers are forked before the app exists, so they stay small and share nothing.
    with (
        multiprocessing.get_context("fork").Pool(2) as pool,
        tempfile.TemporaryDirectory(prefix="dcon-memory-") as tmp,
    ):
        settings = receiver_settings(Path(tmp), **overrides)
        configure_logging(settings.log_level, settings.log_format)
        app = create_app(settings)
        chunks = prefetched(pool, count)
        points, entries, python = uvloop.run(feed(app, chunks, count * CHUNK, args.concurrency))
    elapsed = time.perf_counter() - started
    before, after = points[0][1], points[-1][1]
    target_kib = args.target_mb * 1e6 / 1024
    verdict = "within" if after["VmRSS"] <= target_kib else "OVER"
    print(f"## Receiver memory after {points[-1][0]:,} distinct events\n")
    print(
        f"In-process through `Receiver.receive` after the app's lifespan start-up (secret scheme, "
        f"typed parse, dedup with DCON_DEDUP_WINDOW={settings.dedup_window} s and "
        f"DCON_DEDUP_MAX_ENTRIES={settings.dedup_max_entries:,}, file sink with fsync), "
        f"{args.concurrency} at a time; {elapsed:.0f} s."
        + (f" Changed: {', '.join(args.set)}." if args.set else "")
        + "\n"
    )
    print("| events | RSS |")
    print("|---:|---:|")
    for done, kib in points:
        print(f"| {done:,} | {mb(kib['VmRSS'])} |")
    print(
        f"\n- Before: {mb(before['VmRSS'])}; after: {mb(after['VmRSS'])}; peak (VmHWM): "
        f"{mb(after['VmHWM'])}."
    )
    growth = after["VmRSS"] - before["VmRSS"]
    print(
        f"- Growth: {mb(growth)}, {growth * 1024 / max(1, points[-1][0]):.0f} bytes per event; "
        f"the dedup window holds {entries:,} ids taking {mb(python)} at the Python level "
        "(dict, id strings, timestamps)."
    )
    print(f"- Target ≤ {args.target_mb:.0f} MB: **{verdict}**.")


if __name__ == "__main__":
    main()
