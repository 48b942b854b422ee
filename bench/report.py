"""The Markdown report of ``bench/http_bench.py``: medians first, every run after."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

NOISY = 0.10  # share of CPU 0 taken by other processes during a run that makes it suspect


@dataclass(frozen=True)
class RunResult:
    key: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    non_2xx: int
    wrapped: int
    startup_s: float
    peak_rss_mib: float
    server_cpu: float
    other_cpu0: float
    other_cpu1: float
    answered: int
    stored: int | None

    @property
    def lost_or_duplicated(self) -> bool:
        return self.stored is not None and self.stored < self.answered


def _median(runs: Sequence[RunResult], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


def _by_key(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    grouped: dict[str, list[RunResult]] = {}
    for run in runs:
        grouped.setdefault(run.key, []).append(run)
    return grouped


def _ratios(runs: Sequence[RunResult], top: str, bottom: str) -> list[float]:
    rps = {(r.key, r.round): r.rps for r in runs}
    rounds = sorted({r.round for r in runs})
    return [rps[top, n] / rps[bottom, n] for n in rounds if (top, n) in rps and (bottom, n) in rps]


def _ms(us: object) -> str:
    return f"{float(us) / 1000:.2f}" if isinstance(us, int | float) else "-"


def throughput_table(runs: Sequence[RunResult], labels: Mapping[str, str]) -> list[str]:
    lines = [
        "| | system | req/s | p50 ms | p99 ms | start-up to first 200 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, group in _by_key(runs).items():
        lines.append(
            f"| {key} | {labels[key]} | {_median(group, 'rps'):,.0f} "
            f"| {_median(group, 'p50_ms'):.1f} | {_median(group, 'p99_ms'):.1f} "
            f"| {_median(group, 'startup_s'):.2f} s |"
        )
    return lines


def ratio_table(runs: Sequence[RunResult]) -> list[str]:
    lines = ["| ratio of req/s | median | per round |", "|---|---:|---|"]
    named = (
        ("receiver / ceiling (A/B)", "A", "B"),
        ("receiver / dtintegrations (A/C)", "A", "C"),
        ("default sinks and logging / file sink only (A'/A)", "A'", "A"),
        ("dtintegrations / ceiling (C/B)", "C", "B"),
        ("floor / ceiling (F/B)", "F", "B"),
        ("floor / receiver (F/A)", "F", "A"),
        ("receiver, fsync off / ceiling (N/B)", "N", "B"),
        ("receiver, fsync off / receiver (N/A)", "N", "A"),
    )
    for name, top, bottom in named:
        values = _ratios(runs, top, bottom)
        if values:
            each = ", ".join(f"{v:.3f}" for v in values)
            lines.append(f"| {name} | **{statistics.median(values):.3f}** | {each} |")
    return lines


def memory_lines(runs: Sequence[RunResult]) -> list[str]:
    lines = []
    for key in ("A", "A'"):
        group = _by_key(runs).get(key)
        if group:
            lines.append(
                f"- {key}: peak RSS (VmHWM) median {_median(group, 'peak_rss_mib'):.1f} MiB, "
                f"max {max(r.peak_rss_mib for r in group):.1f} MiB, each process after "
                f"{min(r.answered for r in group):,} to {max(r.answered for r in group):,} events."
            )
    return lines


def open_loop_table(
    results: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]
) -> list[str]:
    lines = [
        "| | system | achieved req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms "
        "| p99 service ms | p99 send lag ms | non-200 + errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        due, service, lag = r["from_due"], r["service"], r["send_lag"]
        lines.append(
            f"| {key} | {labels[key]} | {r['achieved_rate']:,.0f} | {_ms(due.get('p50_us'))} "
            f"| {_ms(due.get('p90_us'))} | {_ms(due.get('p99_us'))} | {_ms(due.get('p999_us'))} "
            f"| {_ms(due.get('max_us'))} | {_ms(service.get('p99_us'))} "
            f"| {_ms(lag.get('p99_us'))} | {r['non_200'] + r['errors']} |"
        )
        if r["achieved_rate"] < 0.95 * r["target_rate"]:
            lines[-1] = lines[-1].replace(f"| {key} |", f"| {key} ⚠ overloaded |", 1)
    return lines


def runs_table(runs: Sequence[RunResult]) -> list[str]:
    lines = [
        "| round | | req/s | p50 ms | p99 ms | non-2xx | socket errors | stored / answered "
        "| server's CPU 0 use | other load on CPU 0, 1 | start-up s | peak RSS MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        stored = "-" if r.stored is None else f"{r.stored:,} / {r.answered:,}"
        if r.lost_or_duplicated:
            stored += " ⚠"
        lines.append(
            f"| {r.round} | {r.key} | {r.rps:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
            f"| {r.non_2xx} | {r.errors} | {stored} | {r.server_cpu:.0%} "
            f"| {r.other_cpu0:.0%}, {r.other_cpu1:.0%} "
            f"| {r.startup_s:.2f} | {r.peak_rss_mib:.1f} |"
        )
    return lines


def warnings(runs: Sequence[RunResult], results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    found = []
    for r in runs:
        where = f"round {r.round} {r.key}"
        if r.non_2xx or r.errors:
            found.append(f"{where}: {r.non_2xx} non-2xx answers, {r.errors} socket errors")
        if r.wrapped:
            found.append(f"{where}: ran out of distinct events ({r.wrapped} times); dedup answered")
        if r.lost_or_duplicated:
            found.append(f"{where}: stored {r.stored} events for {r.answered} answered 200")
        if max(r.other_cpu0, r.other_cpu1) > NOISY:
            found.append(
                f"{where}: other processes took {r.other_cpu0:.0%} of CPU 0 (server) and "
                f"{r.other_cpu1:.0%} of CPU 1 (load)"
            )
    for key, result in results.items():
        if result["non_200"] or result["errors"]:
            found.append(f"open loop {key}: {result['non_200']} non-200, {result['errors']} errors")
    return found


def filesystem(path: Path) -> str:
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return f"{kind} (mounted at {best})"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def render(
    *,
    started: datetime,
    plan: Mapping[str, Any],
    runs: Sequence[RunResult],
    open_loop: Mapping[str, Mapping[str, Any]],
    open_loop_rate: float,
    labels: Mapping[str, str],
    versions: Mapping[str, str],
    baseline: Mapping[str, str],
    tmp: Path,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    receiver_env: Mapping[str, str],
    code: str,
) -> str:
    loop = "uvloop" if versions.get("uvloop", "-") != "-" else "asyncio"
    parser = "httptools" if versions.get("httptools", "-") != "-" else "h11"
    scheme = (
        "DT-Asymmetric-Signature (ES256, local pinned JWKS)"
        if plan["asymmetric"]
        else "X-Dt-Signature (HS256 secret)"
    )
    settings = " ".join(
        f"{k}={'***' if 'SECRET' in k else v}" for k, v in sorted(receiver_env.items())
    )
    lines = [
        f"# dcon-receiver over HTTP, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"One server process per system and round, pinned to CPU 0; wrk (1 thread, "
        f"{plan['connections']} connections, `bench/post.lua`) pinned to CPU 1. Every request "
        "carries a distinct eventId of one of DT's 19 event types with its own valid token, "
        f"made before the round. {plan['rounds']} round(s) of {plan['duration']} s, each after "
        f"a {plan['warmup']} s warm-up that is not counted; the systems alternate within "
        f"each round ({' '.join(plan['keys'])}).",
        "",
        f"The receiver (A) runs the default full path: {scheme}, typed parse, dedup, file "
        "sink with fsync (group commit), over plain HTTP (DCON_TLS=false: TLS is not what is "
        "compared). **Its log sink is off (DCON_SINKS=file) and DCON_LOG_LEVEL=warning**, so "
        "that writes to stdout and stderr do not dominate; A' is the same with the defaults "
        "DCON_SINKS=log,file and DCON_LOG_LEVEL=info, stdout and stderr going to files. "
        "C appends each event with write + flush and **no fsync**.",
        "",
        "## Throughput at saturation (median over rounds)",
        "",
        *throughput_table(runs, labels),
        "",
        f"p50 and p99 here are closed-loop figures: with {plan['connections']} connections "
        "always busy they are mostly queueing (connections ÷ throughput). Start-up is the "
        "time from spawning the process to the first 200 on a signed POST.",
        "",
        "## Ratios (median of the per-round ratios)",
        "",
        *ratio_table(runs),
        "",
        "## Receiver memory",
        "",
        *memory_lines(runs),
        "",
        f"## Latency at half the receiver's peak rate ({open_loop_rate:,.0f} req/s, open loop)",
        "",
        *open_loop_table(open_loop, labels),
        "",
        f"`bench/openloop.py` (asyncio + uvloop, pinned to CPU 1) sends on a fixed schedule for "
        f"{plan['half_duration']} s after a {plan['half_warmup']} s warm-up, one fresh server "
        "each; latency counts from when each request was due (no coordinated omission, as in "
        "wrk2), 'service' from when it was written. It includes the client's own overhead; "
        "B shows that floor. ⚠ overloaded: the system answered under 95% of the target rate, "
        "so its latencies grow with the length of the run and only say that it falls behind.",
        "",
        "## Every run",
        "",
        *runs_table(runs),
        "",
        "Stored / answered: lines in the JSON Lines file against 200s given (probe, warm-up, "
        "run); a few more stored than answered are requests in flight when wrk stopped. "
        "Server's CPU 0 use: the CPU time the server (all its threads) used during the "
        "measured run, as a share of that CPU; well under 100% means it waited, e.g. on fsync. "
        "Other load: the share of each CPU that processes other than the server (CPU 0) or "
        "wrk and this driver (CPU 1) took during the measured run, from /proc/stat; a run "
        f"above {NOISY:.0%} is listed under Warnings, and ratios within a round hold better "
        "than absolute figures when the machine is shared.",
        "",
        "## Setup",
        "",
        f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}; "
        f"load average {load[0][0]:.2f} before, {load[1][0]:.2f} after; servers and load "
        + (f"at nice {plan['nice']}." if plan["nice"] else "at normal priority."),
        f"- Event files in a temporary directory on {filesystem(tmp)}: fsync costs what "
        "this disk makes it cost.",
        f"- Receiver: Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; uvicorn loop {loop}, http {parser} (both 'auto', as `serve` leaves them; B is "
        "given the same).",
        f"- Code: {code}.",
        "- Receiver settings: " + settings + "; everything else default.",
        "- Baseline (bench/.venv-baseline): " + ", ".join(f"{k} {v}" for k, v in baseline.items()),
        "",
    ]
    found = warnings(runs, open_loop)
    if found:
        lines += ["## Warnings", "", *(f"- {w}" for w in found), ""]
    return "\n".join(lines)
