"""Where a request's time goes inside the receiver: its ASGI app called in a loop, no server.

    python bench/profile_ingest.py [--requests 20000] [--concurrency 64] [--top 15]
                                   [--no-fsync] [--profiler cprofile|py-spy]

Builds the app exactly as receiver A of ``bench/http_bench.py`` (secret scheme, typed parse,
dedup, file sink with fsync, log level warning) and POSTs distinct signed events straight
into it, ``--concurrency`` at a time, on uvloop as uvicorn does. Prints

1. the cost per request of each stage timed alone (no profiler), from the signature check
   up to the whole ASGI app, next to the bare ASGI app of ``bench/bare_asgi.py``;
2. the functions with the most self time over the whole app, from cProfile (exact call
   counts, but it inflates small calls) or py-spy (sampling, barely perturbs; looked up on
   PATH and in ``bench/.venv-baseline``, ``pip install py-spy`` there).

Pin it to one CPU (``taskset -c 0``) for steadier figures.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop
from bare_asgi import app as bare_app
from inprocess import (
    ASGIApp,
    in_batches,
    lifespan,
    post,
    post_scope,
    receiver_settings,
    signed_headers,
)
from signed_bodies import SECRET_HEADER, Signer, signed_line
from starlette.datastructures import Headers

from app.events import parse_body
from app.logs import configure_logging
from app.main import create_app
from app.received import ReceivedEvent
from app.receiver import Receiver

BENCH = Path(__file__).resolve().parent
Headerlist = tuple[tuple[bytes, bytes], ...]
Request = tuple[Headerlist, bytes]


def make_requests(count: int, start: int) -> list[Request]:
    """Distinct signed requests, as tuples: once collected, the GC stops tracking them, so
    the load itself does not slow down the collections being measured."""
    signer = Signer()
    requests = []
    for n in range(start, start + count):
        token, body = signed_line(signer, n).rstrip("\n").split("\t", 1)
        raw = body.encode()
        requests.append((tuple(signed_headers(SECRET_HEADER, token, raw)), raw))
    return requests


async def timed(work: Awaitable[object], n: int) -> tuple[float, float]:
    """(wall, main-thread CPU) µs per item of one run."""
    wall, cpu = time.perf_counter(), time.thread_time()
    await work
    return (time.perf_counter() - wall) / n * 1e6, (time.thread_time() - cpu) / n * 1e6


class GcWatch:
    """Counts and times (wall) the garbage collector's passes, by generation."""

    def __init__(self) -> None:
        self.passes: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.passes[info["generation"]].append(time.perf_counter() - self._started)

    @contextmanager
    def watching(self) -> Iterator[None]:
        gc.callbacks.append(self)
        try:
            yield
        finally:
            gc.callbacks.remove(self)


def ask(app: Any, state: dict[str, Any]) -> Callable[[Request], Awaitable[None]]:
    async def one(request: Request) -> None:
        status = await post(app, post_scope("/events", list(request[0]), state), request[1])
        if status != 200:
            raise RuntimeError(f"answered {status}")

    return one


Row = tuple[str, tuple[float, float]]


async def stages(app: Any, sets: Iterator[list[Request]], c: int) -> list[Row]:
    """The parts of the path timed alone, then the whole of it."""
    async with lifespan(app) as state:
        receiver: Receiver = app.state.receiver
        reqs = next(sets)
        n = len(reqs)
        headers = [Headers(raw=list(h)) for h, _ in reqs]
        bodies = [b for _, b in reqs]

        async def verify() -> None:
            for h, b in zip(headers, bodies, strict=True):
                receiver.verifier.verify(b, h)

        async def parse() -> None:
            for b in bodies:
                parse_body(b)

        verification = receiver.verifier.verify(bodies[0], headers[0])
        now = datetime.now(UTC)
        events = [ReceivedEvent(b, parse_body(b), verification, now) for b in bodies]

        async def record() -> None:
            for event in events:
                event.record()

        async def deliver() -> None:
            await in_batches(events, c, receiver.delivery.deliver)

        pairs = [(b, Headers(raw=list(h))) for h, b in next(sets)]

        async def receive() -> None:
            await in_batches(pairs, c, lambda p: receiver.receive(*p))

        whole = next(sets)
        rows = [
            ("signature check (`Verifier.verify`)", await timed(verify(), n)),
            ("typed parse (`parse_body`)", await timed(parse(), n)),
            ("JSON line (`ReceivedEvent.record`)", await timed(record(), n)),
            (f"delivery to the file sink, {c} at a time", await timed(deliver(), n)),
        ]
        # The parsed events and header objects above are many GC-tracked objects: drop
        # them, or every collection from here on walks them too.
        events.clear()
        headers.clear()
        gc.collect()
        rows.append(
            (f"`Receiver.receive` (the above + dedup), {c} at a time", await timed(receive(), n))
        )
        pairs.clear()
        gc.collect()
        whole_cost = await timed(in_batches(whole, c, ask(app, state)), n)
        return [*rows, (f"whole app (ASGI call), {c} at a time", whole_cost)]


async def bare_cost(requests: list[Request], c: int) -> Row:
    async with lifespan(bare_app) as state:
        cost = await timed(in_batches(requests, c, ask(bare_app, state)), len(requests))
    return (f"bare ASGI app, {c} at a time", cost)


async def gc_runs(
    app: Any, sets: Iterator[list[Request]], c: int, repeats: int
) -> tuple[dict[str, list[tuple[float, float]]], GcWatch, tuple[int, float]]:
    """The whole app as it is, and with gc.freeze() after start-up, alternately."""
    costs: dict[str, list[tuple[float, float]]] = {"as is": [], "gc.freeze()": []}
    watch = GcWatch()
    async with lifespan(app) as state:
        one = ask(app, state)
        tracked = len(gc.get_objects())
        started = time.perf_counter()
        gc.collect()
        full = (time.perf_counter() - started) * 1000
        for _ in range(repeats):
            plain = next(sets)
            with watch.watching():
                costs["as is"].append(await timed(in_batches(plain, c, one), len(plain)))
            frozen = next(sets)
            gc.freeze()
            try:
                costs["gc.freeze()"].append(await timed(in_batches(frozen, c, one), len(frozen)))
            finally:
                gc.unfreeze()
    return costs, watch, (tracked, full)


async def whole_app(app: ASGIApp, requests: list[Request], c: int) -> None:
    async with lifespan(app) as state:
        await in_batches(requests, c, ask(app, state))


def receiver_app(directory: Path, fsync: bool) -> Any:
    settings = receiver_settings(directory, file_fsync=fsync)
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def _where(file: str, line: int) -> str:
    path = Path(file)
    return f"{path.parent.name}/{path.name}:{line}" if line else file


def cprofile_top(app: ASGIApp, requests: list[Request], c: int, top: int) -> list[str]:
    profiler = cProfile.Profile()
    profiler.enable()
    uvloop.run(whole_app(app, requests, c))
    profiler.disable()
    raw: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    n = len(requests)
    total = sum(entry[2] for entry in raw.values())
    rows = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = [
        f"cProfile, {n:,} requests: {total / n * 1e6:.0f} µs/request under the profiler",
        "",
        "| self µs/req | share | calls/req | function |",
        "|---:|---:|---:|---|",
    ]
    for (file, line, name), (_, calls, tottime, _, _) in rows:
        lines.append(
            f"| {tottime / n * 1e6:.1f} | {tottime / total:.1%} | {calls / n:.1f} "
            f"| `{name}` ({_where(file, line)}) |"
        )
    return lines


def find_py_spy() -> str | None:
    local = BENCH / ".venv-baseline" / "bin" / "py-spy"
    return shutil.which("py-spy") or (str(local) if local.exists() else None)


@contextmanager
def sampled(py_spy: str, out: Path) -> Iterator[None]:
    """py-spy sampling this process (not its idle time) while the block runs."""
    command = [py_spy, "record", "--pid", str(os.getpid()), "--rate", "1000"]
    spy = subprocess.Popen(
        [*command, "--format", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attach before the work starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)


def py_spy_top(app: ASGIApp, requests: list[Request], c: int, top: int, py_spy: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stacks.txt"
        started = time.thread_time()
        with sampled(py_spy, out):
            uvloop.run(whole_app(app, requests, c))
        cpu = (time.thread_time() - started) / len(requests) * 1e6
        lines = out.read_text().splitlines()
    own: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, samples = line.rpartition(" ")
        leaf = re.sub(r":\d+\)$", ")", stack.rsplit(";", 1)[-1]) or "(native)"
        own[leaf] += int(samples)
        total += int(samples)
    table = [
        f"py-spy, {len(requests):,} requests, {total:,} samples of busy threads; "
        f"main-thread CPU {cpu:.0f} µs/request",
        "",
        "| share of samples | ≈ µs/req of main-thread CPU | function (self) |",
        "|---:|---:|---|",
    ]
    for frame, count in own.most_common(top):
        table.append(f"| {count / total:.1%} | {count / total * cpu:.1f} | `{frame}` |")
    return table


def print_gc(
    costs: dict[str, list[tuple[float, float]]], watch: GcWatch, full: tuple[int, float], n: int
) -> None:
    print("\n## Garbage collection\n")
    print(
        f"After start-up the GC tracks {full[0]:,} objects; one full collection: {full[1]:.1f} ms."
    )
    total = n * len(costs["as is"])
    print(f"While serving {total:,} requests, {len(costs['as is'])} runs, as the app is now:\n")
    print("| generation | passes per 1,000 requests | mean ms | max ms | µs per request |")
    print("|---:|---:|---:|---:|---:|")
    for gen, times in watch.passes.items():
        if times:
            print(
                f"| {gen} | {len(times) / total * 1000:.1f} | {statistics.mean(times) * 1e3:.2f} "
                f"| {max(times) * 1e3:.2f} | {sum(times) / total * 1e6:.1f} |"
            )
    print("\nWhole app, the same runs alternating (median of runs):\n")
    print("| | wall µs/req | main-thread CPU µs/req |")
    print("|---|---:|---:|")
    for name, values in costs.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the GC comparison")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--no-fsync", action="store_true", help="file sink without fsync")
    parser.add_argument("--profiler", choices=("cprofile", "py-spy"), default="cprofile")
    args = parser.parse_args()
    n, c, fsync = args.requests, args.concurrency, not args.no_fsync
    py_spy = find_py_spy() if args.profiler == "py-spy" else None
    if args.profiler == "py-spy" and py_spy is None:
        raise SystemExit("py-spy not found: bench/.venv-baseline/bin/pip install py-spy")
    sets = iter([make_requests(n, k * n) for k in range(5 + 2 * args.repeats)])
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="dcon-profile-") as tmp:
        directory = Path(tmp)
        rows = uvloop.run(stages(receiver_app(directory / "stages", fsync), sets, c))
        rows.append(uvloop.run(bare_cost(next(sets), c)))
        print(f"## Cost per request, in-process ({n:,} requests, fsync {fsync})\n")
        print("| stage | wall µs/req | main-thread CPU µs/req |")
        print("|---|---:|---:|")
        for name, (wall, cpu) in rows:
            print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
        app = receiver_app(directory / "gc", fsync)
        print_gc(*uvloop.run(gc_runs(app, sets, c, args.repeats)), n)
        app = receiver_app(directory / "profiled", fsync)
        requests = next(sets)
        print(f"\n## Top {args.top} functions by self time, whole app\n")
        if py_spy is None:
            print("\n".join(cprofile_top(app, requests, c, args.top)))
        else:
            print("\n".join(py_spy_top(app, requests, c, args.top, py_spy)))


if __name__ == "__main__":
    main()
