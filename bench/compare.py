"""Two or more systems in rounds whose order rotates: for judging one change, not for the report.

    python bench/compare.py [--rounds 8] [--duration 5] [--warmup 2] [--rate R] SYSTEM...

A SYSTEM is a key of ``http_bench.py`` (A, A', B, C, F, N) or ``NAME=KIND[:VAR=VALUE,...]``,
where KIND is receiver, bare, floor or baseline and the VAR=VALUE pairs are set in that
server's environment, e.g.

    python bench/compare.py A N                          # fsync on against off
    python bench/compare.py A X=receiver:DCON_SINKS=file,DCON_DEDUP_MAX_ENTRIES=1000 B

The first system is the one the others are measured against. Each round runs every system
once, a fresh server each, as ``http_bench.py`` runs them (server on CPU 0, wrk on CPU 1, 64
connections, distinct signed events); round k starts at the k-th system, so that none
always runs first or straight after the same neighbour. Prints each run, then per system
its median req/s and the median and range of its per-round ratio to the first: on these
machines single rounds of one system differ by a third, so a change worth less than the
range needs more rounds, or an instruction count (``instructions.py``).

With ``--rate R`` the rounds are open-loop runs at R requests/s instead (``openloop.py``),
and the figure compared is p99 latency from when each request was due.

A code change is compared by putting it behind a temporary environment switch, or by
running this from two clones in turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import cast, get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from http_bench import (
    RECEIVER_ENV,
    SYSTEMS,
    Bench,
    Plan,
    ensure_tools,
    open_loop_bodies,
    open_loop_run,
    run_counted,
    say,
)
from signed_bodies import Signer
from systems import LOAD_CPU, Kind, System, ensure_baseline_venv

KINDS: tuple[str, ...] = get_args(Kind)


def parse_system(text: str) -> System:
    """``A`` (a key of http_bench.py) or ``NAME=KIND[:VAR=VALUE,...]``."""
    if "=" not in text:
        if text not in SYSTEMS:
            raise argparse.ArgumentTypeError(f"unknown system {text!r}: {', '.join(SYSTEMS)}")
        return SYSTEMS[text]
    name, _, spec = text.partition("=")
    kind, _, assignments = spec.partition(":")
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"{text!r}: the kind is one of {', '.join(KINDS)}")
    env = {}
    for pair in filter(None, assignments.split(",")):
        var, sep, value = pair.partition("=")
        if not sep or not var:
            raise argparse.ArgumentTypeError(f"{text!r}: {pair!r} is not VAR=VALUE")
        env[var] = value
    return System(name, text, cast(Kind, kind), env)  # one of KINDS, checked above


def rotated(systems: list[System], rnd: int) -> list[System]:
    start = rnd % len(systems)
    return systems[start:] + systems[:start]


def closed_loop(bench: Bench, system: System, rnd: int) -> float:
    """req/s of one fresh server under wrk, with bodies enough for the run."""
    plan = bench.plan
    tag = f"round{rnd}-{system.slug}"
    warm = bench.bodies(f"{tag}-warm", system, bench.needed(system, plan.warmup))
    run = bench.bodies(f"{tag}-run", system, bench.needed(system, plan.duration))
    result = run_counted(bench, system, rnd, warm, run)
    for path in bench.tmp.glob(f"{tag}-*.tsv"):
        path.unlink()
    if result.non_2xx or result.errors:
        say(f"  {system.key}: {result.non_2xx} non-2xx, {result.errors} socket errors")
    say(
        f"round {rnd} {system.key:10} {result.rps:9,.0f} req/s  p99 {result.p99_ms:6.1f} ms"
        f"  server's CPU 0 use {result.server_cpu:.0%}"
    )
    return result.rps


def open_loop(bench: Bench, system: System, rnd: int, rate: float) -> float:
    """p99 ms from due of one fresh server sent ``rate`` requests/s."""
    bodies = bench.bodies(f"o{rnd}-{system.slug}", system, open_loop_bodies(rate, bench.plan))
    workdir = bench.tmp / f"openloop-{rnd}-{system.slug}"
    result = open_loop_run(bench, system, bodies, rate, workdir)
    bodies.unlink()
    due = result["from_due"]
    assert isinstance(due, dict)
    p99 = float(due["p99_us"]) / 1000
    say(
        f"round {rnd} {system.key:10} p50 {float(due['p50_us']) / 1000:6.2f} ms"
        f"  p99 {p99:6.2f} ms  max {float(due['max_us']) / 1000:6.2f} ms"
    )
    return p99


def summary(systems: list[System], figures: dict[str, list[float]], unit: str) -> str:
    base = figures[systems[0].key]
    spelt = ",.0f" if unit == "req/s" else ".2f"
    lines = [f"| system | median {unit} | to {systems[0].key} (median) | per round |"]
    lines.append("|---|---:|---:|---|")
    for system in systems:
        mine = figures[system.key]
        ratios = [a / b for a, b in zip(mine, base, strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in ratios)
        lines.append(
            f"| {system.key} | {statistics.median(mine):{spelt}} | {statistics.median(ratios):.3f} "
            f"| {rounds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("systems", nargs="+", type=parse_system, metavar="SYSTEM")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=int, default=5, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=float, help="open loop at this many requests/s")
    args = parser.parse_args()
    systems: list[System] = args.systems
    if len(systems) < 2 or len({s.key for s in systems}) < len(systems):
        parser.error("give two or more systems with distinct names")
    ensure_tools()
    if any(s.kind == "baseline" for s in systems):
        ensure_baseline_venv()
    cpus = set(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {LOAD_CPU})  # the driver keeps off the server's CPU
    keys = tuple(s.key for s in systems)
    plan = Plan(args.rounds, args.duration, args.warmup, args.connections, args.duration,
                args.warmup, keys, False, 0)  # fmt: skip
    figures: dict[str, list[float]] = {s.key: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="dcon-compare-") as tmp:
        bench = Bench(plan, Path(tmp), Signer(), dict(RECEIVER_ENV), cpus)
        for rnd in range(args.rounds):
            for system in rotated(systems, rnd):
                if args.rate:
                    figures[system.key].append(open_loop(bench, system, rnd, args.rate))
                else:
                    figures[system.key].append(closed_loop(bench, system, rnd))
    unit = f"p99 ms at {args.rate:,.0f} req/s" if args.rate else "req/s"
    print(summary(systems, figures, unit))


if __name__ == "__main__":
    main()
