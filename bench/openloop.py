"""Open-loop load at a fixed request rate, for latency at a given load (wrk2-style).

    python bench/openloop.py URL BODIES_FILE --header X-Dt-Signature --rate 700 \\
        --duration 10 --warmup 2 [--connections 64]

Request *i* is due ``i / rate`` seconds after the start, whatever the server does, so a
stall delays every request due during it and shows in the latency (no coordinated
omission, as in wrk2). Latency is counted from when a request was due; the time from when
it was actually written ("service") is reported too, and so is how late the sender was.
Connections open on first use and are reopened when the server closes them (gunicorn's
sync worker does after every answer), the reconnect counting in the latency. Pin this
process to a CPU of its own (``taskset``). Prints one line: ``OPENLOOP_RESULT {json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # pragma: no cover - plain asyncio then; its sleeps round up to 1 ms
    uvloop = None  # type: ignore[assignment]


@dataclass
class Timeline:
    due: list[float]
    sent: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self) -> None:
        n = len(self.due)
        self.sent, self.done, self.status = [0.0] * n, [0.0] * n, [0] * n


def read_requests(path: Path) -> list[tuple[str, bytes]]:
    """The (token, body) pairs of a bodies file (``bench/signed_bodies.py``), in order."""
    pairs = []
    with path.open("rb") as f:
        for line in f:
            token, _, body = line.rstrip(b"\n").partition(b"\t")
            pairs.append((token.decode("ascii"), body))
    return pairs


def build_requests(url: str, header: str, pairs: list[tuple[str, bytes]]) -> list[bytes]:
    parts = urlsplit(url)
    head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
    return [
        f"{head}{header}: {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
        for token, body in pairs
    ]


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """Send one request and read its answer: (status, whether the server keeps the line)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    length = 0
    keep = True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and b"close" in value:
            keep = False
    if length:
        await reader.readexactly(length)
    return int(head[9:12]), keep


async def _worker(
    host: str, port: int, requests: list[bytes], queue: asyncio.Queue[int | None], t: Timeline
) -> None:
    line: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while (i := await queue.get()) is not None:
        try:
            if line is None:
                line = await asyncio.open_connection(host, port)
            t.sent[i] = time.perf_counter()
            status, keep = await _exchange(*line, requests[i])
            t.done[i] = time.perf_counter()
            t.status[i] = status
        except (OSError, asyncio.IncompleteReadError):
            t.errors += 1
            keep = False
        if not keep and line is not None:
            line[1].close()
            line = None
    if line is not None:
        line[1].close()


async def drive(url: str, requests: list[bytes], rate: float, connections: int) -> Timeline:
    """Send every request on its schedule; return when all are answered."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    start = time.perf_counter() + 0.05
    timeline = Timeline([start + i / rate for i in range(len(requests))])
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    workers = [
        asyncio.create_task(_worker(host, port, requests, queue, timeline))
        for _ in range(connections)
    ]
    for i, due in enumerate(timeline.due):
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(i)
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*workers), timeout=60)
    return timeline


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50/p90/p99/p99.9/max, in µs."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return {
        "p50_us": rank(0.50),
        "p90_us": rank(0.90),
        "p99_us": rank(0.99),
        "p999_us": rank(0.999),
        "max_us": ordered[-1] * 1e6,
    }


def summarise(t: Timeline, rate: float, warmup: float) -> dict[str, object]:
    first = int(rate * warmup)
    measured = range(first, len(t.due))
    answered = [i for i in measured if t.done[i]]
    span = max((t.done[i] for i in answered), default=0.0) - t.due[first] if answered else 0.0
    return {
        "target_rate": rate,
        "scheduled": len(measured),
        "answered": len(answered),
        "achieved_rate": len(answered) / span if span else 0.0,
        "non_200": sum(1 for i in answered if t.status[i] != 200),
        "errors": t.errors,
        "from_due": percentiles([t.done[i] - t.due[i] for i in answered]),
        "service": percentiles([t.done[i] - t.sent[i] for i in answered]),
        "send_lag": percentiles([t.sent[i] - t.due[i] for i in answered]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("bodies", type=Path)
    parser.add_argument("--header", default="X-Dt-Signature")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2, help="seconds sent, not counted")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    total = int(args.rate * (args.warmup + args.duration))
    pairs = read_requests(args.bodies)
    if len(pairs) < total:
        raise SystemExit(f"{args.bodies}: {len(pairs)} requests, {total} needed")
    requests = build_requests(args.url, args.header, pairs[:total])
    coroutine = drive(args.url, requests, args.rate, args.connections)
    # uvloop's timers let a sub-millisecond sleep return on the next loop pass, where plain
    # asyncio rounds every sleep up to a whole millisecond.
    timeline = uvloop.run(coroutine) if uvloop is not None else asyncio.run(coroutine)
    result = summarise(timeline, args.rate, args.warmup)
    print("OPENLOOP_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
