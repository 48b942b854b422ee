"""Whole requests over HTTP: the receiver against the stack's ceiling and DT's own receiver.

    python bench/http_bench.py [--rounds 5] [--duration 10] [--warmup 3] [--quick]
                               [--asymmetric] [--no-log-variant] [--floor] [--fsync-off]

Each system is a fresh server process per round, pinned to CPU 0; wrk (1 thread, 64
connections, ``bench/post.lua``) is pinned to CPU 1 and POSTs distinct, validly signed
events of all 19 DT types, made before each round so that dedup never short-circuits.
Rounds alternate the systems (A B C A' A B C A' ...); a warm-up run precedes each
measured run. Then an open-loop run at half the receiver's peak rate measures latency
under load (``bench/openloop.py``). Prints Markdown and writes it to
``bench/results/<UTC time>.md``.

Systems:
  A   the receiver: ``dcon-receiver serve``, one uvicorn worker, default full path
      (secret-scheme signature check, typed parse, dedup, file sink with fsync), plain HTTP,
      file sink only and log level warning;
  A'  the same with the default sinks and logging (log,file; info);
  B   the ceiling: a bare ASGI app that reads the body and answers 200, same uvicorn;
  C   Flask + dtintegrations under one gunicorn sync worker, appending JSONL (no fsync);
  F   with ``--floor``: the receiver's essential work (HS256 and checksum, typed parse, a
      dict for dedup, the file sink with fsync) as one bare ASGI function, same uvicorn;
  N   with ``--fsync-off``: the receiver A with its file sink's fsync off
      (DCON_FILE_FSYNC=false), a durability choice that is not the default: what fsync costs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import RunResult, render
from signed_bodies import SECRET, Signer, asymmetric_signer, signed_line, write_bodies
from systems import (
    BENCH,
    LOAD_CPU,
    PRIORITY,
    SERVER_CPU,
    Server,
    System,
    cpu_busy_ticks,
    ensure_baseline_venv,
    pinned,
)

RESULTS = BENCH / "results"
# Guesses for the first round only; later rounds size their bodies files from the rates
# measured so far. A run that still outlasts its file is repeated with a bigger one.
FIRST_GUESS = {"receiver": 5000.0, "baseline": 3000.0, "bare": 0.0, "floor": 7000.0}
MARGIN = 1.5

RECEIVER_ENV = {
    "DCON_HOST": "127.0.0.1",
    "DCON_TLS": "false",
    "DCON_VERIFY_MODE": "secret",
    "DCON_SIGNATURE_SECRETS": SECRET,
    "DCON_SINKS": "file",
    "DCON_LOG_LEVEL": "warning",
}
SYSTEMS = {
    "A": System("A", "receiver (file sink, log level warning)", "receiver"),
    "B": System("B", "ceiling: bare ASGI on the same uvicorn", "bare"),
    "C": System("C", "Flask + dtintegrations, gunicorn sync worker", "baseline"),
    "A'": System(
        "A'",
        "receiver, default sinks and logging (log,file; info)",
        "receiver",
        {"DCON_SINKS": "log,file", "DCON_LOG_LEVEL": "info"},
    ),
    "F": System("F", "floor: the same checks and file sink as one bare function", "floor"),
    "N": System(
        "N", "receiver A with the file sink's fsync off", "receiver", {"DCON_FILE_FSYNC": "false"}
    ),
}


@dataclass(frozen=True)
class Plan:
    rounds: int
    duration: int
    warmup: int
    connections: int
    half_duration: int
    half_warmup: int
    keys: tuple[str, ...]
    asymmetric: bool
    nice: int


@dataclass
class Bench:
    plan: Plan
    tmp: Path
    signer: Signer
    receiver_env: dict[str, str]
    cpus: set[int]
    rates: dict[str, list[float]] = field(default_factory=dict)

    def signer_for(self, system: System) -> Signer:
        # dtintegrations and the floor only know the secret scheme.
        return Signer() if system.kind in ("baseline", "floor") else self.signer

    def env_for(self, system: System, workdir: Path) -> dict[str, str]:
        if system.kind == "receiver":
            return {**self.receiver_env, "DCON_FILE_PATH": str(workdir / "events.jsonl")}
        if system.kind == "baseline":
            return {"DT_SIGNATURE_SECRET": SECRET, "BASELINE_JSONL": str(workdir / "events.jsonl")}
        if system.kind == "floor":
            return {
                "DCON_SIGNATURE_SECRETS": SECRET,
                "DCON_FILE_PATH": str(workdir / "events.jsonl"),
            }
        return {}

    def bodies(self, name: str, system: System, count: int) -> Path:
        path = self.tmp / f"{name}.tsv"
        started = time.perf_counter()
        write_bodies(path, self.signer_for(system), count, self.cpus)
        say(f"  {count:,} signed bodies for {name} in {time.perf_counter() - started:.1f} s")
        return path

    def needed(self, system: System, seconds: float) -> int:
        seen = self.rates.get(system.kind, [])
        rate = max(seen) if seen else FIRST_GUESS[system.kind]
        return int(rate * seconds * MARGIN) + 2000


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def children_cpu_ticks() -> int:
    """CPU used by this process and its finished children, in clock ticks."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        used += usage.ru_utime + usage.ru_stime
    return round(used * ticks)


def wrk(url: str, bodies: Path, header: str, seconds: int, connections: int) -> dict[str, float]:
    command = [
        *pinned(LOAD_CPU), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
        "--timeout", "5s", "-s", str(BENCH / "post.lua"), url, "--", str(bodies), header,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = re.search(r"^WRK_RESULT (.*)$", out, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no result from wrk:\n{out}")
    result: dict[str, float] = json.loads(found.group(1))
    return result


def status_errors(result: dict[str, float]) -> int:
    return int(result["status_errors"])


def run_once(bench: Bench, system: System, rnd: int, warm: Path, run: Path) -> RunResult:
    plan = bench.plan
    workdir = bench.tmp / f"round{rnd}-{system.slug}-{time.monotonic_ns()}"
    signer = bench.signer_for(system)
    server = Server(system, workdir, bench.env_for(system, workdir))
    probe = signed_line(signer, rnd).rstrip("\n").split("\t", 1)
    server.start()
    try:
        startup = server.first_200(signer.header, probe[0], probe[1].encode())
        warmed = wrk(server.url, warm, signer.header, plan.warmup, plan.connections)
        before = (cpu_busy_ticks(SERVER_CPU), cpu_busy_ticks(LOAD_CPU))
        own = (server.cpu_ticks(), children_cpu_ticks())
        measured = wrk(server.url, run, signer.header, plan.duration, plan.connections)
        after = (cpu_busy_ticks(SERVER_CPU), cpu_busy_ticks(LOAD_CPU))
        own = (server.cpu_ticks() - own[0], children_cpu_ticks() - own[1])
        rss = server.peak_rss_kib()
    finally:
        server.stop()
    stored = server.stored() if system.kind != "bare" else None
    shutil.rmtree(workdir)  # counted; the events and logs are large
    # What other processes took of each CPU during the measured run: busy time less the
    # server's own (CPU 0) or wrk's and this driver's (CPU 1).
    other = [
        max(0, (a[0] - b[0]) - mine) / max(1, a[1] - b[1])
        for a, b, mine in zip(after, before, own, strict=True)
    ]
    answered = 1 + sum(int(r["requests"]) - status_errors(r) for r in (warmed, measured))
    return RunResult(
        key=system.key,
        round=rnd,
        rps=measured["requests"] / (measured["duration_us"] / 1e6),
        p50_ms=measured["p50_us"] / 1000,
        p99_ms=measured["p99_us"] / 1000,
        requests=int(measured["requests"]),
        errors=int(
            sum(measured[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
        ),
        non_2xx=status_errors(measured) + status_errors(warmed),
        wrapped=int(measured["wrapped"] + warmed["wrapped"]) if system.unique else 0,
        startup_s=startup,
        peak_rss_mib=rss / 1024,
        server_cpu=own[0] / max(1, after[0][1] - before[0][1]),
        other_cpu0=other[0],
        other_cpu1=other[1],
        answered=answered,
        stored=stored,
    )


def run_counted(bench: Bench, system: System, rnd: int, warm: Path, run: Path) -> RunResult:
    """``run_once``, repeated with three times as many bodies if it outran its file (each
    event must be new to the receiver); its rate is kept to size the next bodies files."""
    plan = bench.plan
    result = run_once(bench, system, rnd, warm, run)
    if result.wrapped:
        say(f"  {system.key}: outran its bodies file; repeating with three times as many")
        tag = f"round{rnd}-{system.slug}-again"
        warm = bench.bodies(f"{tag}-warm", system, 3 * bench.needed(system, plan.warmup))
        run = bench.bodies(f"{tag}-run", system, 3 * bench.needed(system, plan.duration))
        result = run_once(bench, system, rnd, warm, run)
    bench.rates.setdefault(system.kind, []).append(result.rps)
    return result


def open_loop_bodies(rate: float, plan: Plan) -> int:
    """How many bodies an open-loop run at ``rate`` sends, warm-up included, with a margin."""
    return int(rate * (plan.half_warmup + plan.half_duration) * 1.05) + 200


def run_round(bench: Bench, rnd: int) -> list[RunResult]:
    plan = bench.plan
    systems = [SYSTEMS[k] for k in plan.keys]
    files: dict[str, tuple[Path, Path]] = {}
    for system in systems:
        if system.unique:
            tag = f"round{rnd}-{system.slug}"
            files[system.key] = (
                bench.bodies(f"{tag}-warm", system, bench.needed(system, plan.warmup)),
                bench.bodies(f"{tag}-run", system, bench.needed(system, plan.duration)),
            )
    receiver_files = files["A"]
    results = []
    for system in systems:
        warm, run = files.get(system.key, receiver_files)
        result = run_counted(bench, system, rnd, warm, run)
        say(
            f"  round {rnd} {system.key:2} {result.rps:9,.0f} req/s  p50 {result.p50_ms:6.1f} ms"
            f"  p99 {result.p99_ms:6.1f} ms  start-up {result.startup_s:.2f} s"
            f"  other load on CPUs: {result.other_cpu0:.0%}, {result.other_cpu1:.0%}"
        )
        results.append(result)
    for path in bench.tmp.glob(f"round{rnd}-*.tsv"):
        path.unlink()
    return results


def open_loop(bench: Bench, rate: float) -> dict[str, dict[str, object]]:
    """Latency of A, B and C at the same fixed rate, one fresh process each."""
    plan = bench.plan
    count = open_loop_bodies(rate, plan)
    out: dict[str, dict[str, object]] = {}
    receiver_file: Path | None = None
    for key in ("A", "B", "C"):
        if key not in plan.keys:
            continue
        system = SYSTEMS[key]
        if system.unique or receiver_file is None:
            bodies = bench.bodies(f"openloop-{key}", system, count)
            receiver_file = receiver_file or bodies
        else:
            bodies = receiver_file
        out[key] = open_loop_run(bench, system, bodies, rate, bench.tmp / f"openloop-{key}")
        say(f"  open loop {key} at {rate:,.0f} req/s: {out[key]['from_due']}")
    return out


def open_loop_run(
    bench: Bench, system: System, bodies: Path, rate: float, workdir: Path
) -> dict[str, object]:
    """One fresh server of ``system`` sent ``bodies`` at ``rate`` by ``openloop.py``."""
    plan = bench.plan
    signer = bench.signer_for(system)
    server = Server(system, workdir, bench.env_for(system, workdir))
    probe = signed_line(signer, 10**6).rstrip("\n").split("\t", 1)
    server.start()
    try:
        server.first_200(signer.header, probe[0], probe[1].encode())
        command = [
            *pinned(LOAD_CPU), sys.executable, str(BENCH / "openloop.py"),
            server.url, str(bodies), "--header", signer.header, "--rate", f"{rate:.1f}",
            "--duration", str(plan.half_duration), "--warmup", str(plan.half_warmup),
        ]  # fmt: skip
        text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        server.stop()
    found = re.search(r"^OPENLOOP_RESULT (.*)$", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no result from openloop.py:\n{text}")
    result: dict[str, object] = json.loads(found.group(1))
    return result


def versions() -> dict[str, str]:
    names = ("fastapi", "starlette", "uvicorn", "pydantic", "PyJWT", "uvloop", "httptools")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def baseline_versions(python: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
        "('flask', 'gunicorn', 'dtintegrations', 'disruptive', 'PyJWT')}))"
    )
    text = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    found: dict[str, str] = json.loads(text.stdout)
    return found


def code_version() -> str:
    """The commit measured, and whether app/ differs from it (read-only git calls)."""
    root = str(BENCH.parent)
    head = subprocess.run(
        ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        return "not a git checkout"
    dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "app"])
    changed = " with uncommitted changes in app/" if dirty.returncode else ""
    return f"commit {head.stdout.strip()}{changed}"


def ensure_tools() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs: the server runs on CPU 0, the load on CPU 1")
    if shutil.which("taskset") is None:
        raise SystemExit("needs taskset (Debian package util-linux)")
    if shutil.which("wrk") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise SystemExit("needs wrk: apt-get install wrk")
        say("installing wrk (apt-get install wrk)")
        install = ["apt-get", "install", "-y", "-qq", "wrk"]
        if subprocess.run(install, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(install, check=True)


def parse_args() -> tuple[Plan, bool]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s: a smoke test")
    parser.add_argument(
        "--asymmetric",
        action="store_true",
        help="receiver checks DT-Asymmetric-Signature (ES256, local pinned JWKS) instead",
    )
    parser.add_argument(
        "--no-log-variant", action="store_true", help="skip A' (default sinks and logging)"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also run F, the receiver's essential work as one bare function (floor_asgi.py)",
    )
    parser.add_argument(
        "--fsync-off",
        action="store_true",
        help="also run N, receiver A with its file sink's fsync off (not the default)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value for the servers and the load, e.g. -10 on a shared machine (root)",
    )
    args = parser.parse_args()
    if args.nice < 0 and os.geteuid() != 0:
        parser.error("a negative --nice needs root")
    PRIORITY["nice"] = args.nice
    rounds, duration, warmup, half = args.rounds, args.duration, args.warmup, (args.duration, 2)
    if args.quick:
        rounds, duration, warmup, half = 1, 3, 1, (3, 1)
    keys: tuple[str, ...] = ("A", "B", "C") if args.no_log_variant else ("A", "B", "C", "A'")
    if args.floor:
        keys += ("F",)
    if args.fsync_off:
        keys += ("N",)
    plan = Plan(
        rounds,
        duration,
        warmup,
        args.connections,
        half[0],
        half[1],
        keys,
        args.asymmetric,
        args.nice,
    )
    return plan, not args.no_write


def main() -> None:
    plan, write = parse_args()
    ensure_tools()
    baseline_python = ensure_baseline_venv()
    cpus = set(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {LOAD_CPU})  # the driver keeps off the server's CPU
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dcon-bench-") as tmp_name:
        tmp = Path(tmp_name)
        signer, receiver_env = Signer(), dict(RECEIVER_ENV)
        if plan.asymmetric:
            signer, jwks = asymmetric_signer(tmp)
            del receiver_env["DCON_SIGNATURE_SECRETS"]
            receiver_env |= {
                "DCON_VERIFY_MODE": "asymmetric",
                "DCON_DT_JWKS_FILE": str(jwks),
                "DCON_DT_ORG_ID": "bench-org",
            }
        bench = Bench(plan, tmp, signer, receiver_env, cpus)
        runs: list[RunResult] = []
        for rnd in range(1, plan.rounds + 1):
            say(f"round {rnd} of {plan.rounds}")
            runs.extend(run_round(bench, rnd))
        peak = statistics.median(r.rps for r in runs if r.key == "A")
        say(f"open loop at half the receiver's peak ({peak / 2:,.0f} req/s)")
        loop = open_loop(bench, peak / 2)
        text = render(
            started=started,
            plan=vars(plan),
            runs=runs,
            open_loop=loop,
            open_loop_rate=peak / 2,
            labels={k: s.label for k, s in SYSTEMS.items()},
            versions=versions(),
            baseline=baseline_versions(baseline_python),
            tmp=tmp,
            load=(load_before, os.getloadavg()),
            receiver_env=receiver_env,
            code=code_version(),
        )
    print(text)
    if write:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{started:%Y%m%dT%H%M%SZ}.md"
        path.write_text(text)
        say(f"wrote {path.relative_to(BENCH.parent)}")


if __name__ == "__main__":
    main()
