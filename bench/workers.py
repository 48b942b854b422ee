"""Throughput with 2 workers against 1, on this 2-core machine.

    python bench/workers.py [--rounds 3] [--duration 8]

Both receivers run the default full path (HS256 check, typed parse, dedup, file sink with
fsync) unpinned, as `dcon-receiver serve --workers N` would run on a real host; with two
workers the dedup window is the shared SQLite store (`DCON_DEDUP_STORE=auto`) and both
workers append to one file. wrk runs unpinned too, so it competes with the workers for
the same two cores: the ratio understates what 2 workers give on a machine whose load
comes from elsewhere. Rounds alternate 1, 2, 1, 2, …; every request is a distinct, validly
signed event.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from signed_bodies import SECRET, SECRET_HEADER, Signer, write_bodies
from systems import free_port, receiver_command

BENCH = Path(__file__).resolve().parent

CONNECTIONS = 64


def start(workers: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCON_", "DT_"))}
    env.update(
        DCON_HOST="127.0.0.1", DCON_TLS="false", DCON_VERIFY_MODE="secret",
        DCON_SIGNATURE_SECRETS=SECRET, DCON_SINKS="file", DCON_LOG_LEVEL="warning",
        DCON_FILE_PATH=str(workdir / "events.jsonl"), DCON_DEDUP_PATH=str(workdir / "d.db"),
        DCON_WORKERS=str(workers),
    )  # fmt: skip
    log = (workdir / "server.log").open("wb")
    proc = subprocess.Popen(receiver_command(port), env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url + "/events"
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"receiver with {workers} worker(s) did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def wrk(url: str, bodies: Path, seconds: int) -> float:
    command = [
        "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "5s",
        "-s", str(BENCH / "post.lua"), url, "--", str(bodies), SECRET_HEADER,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    found = re.search(r"^WRK_RESULT (.*)$", out, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no result from wrk:\n{out}")
    result: dict[str, float] = json.loads(found.group(1))
    if result["status_errors"]:
        raise RuntimeError(f"{result['status_errors']} non-2xx answers")
    if result["wrapped"]:
        raise RuntimeError("the bodies file ran out: events were sent twice")
    return float(result["requests"]) / (result["duration_us"] / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    args = parser.parse_args()
    signer, cpus = Signer(), {0, 1}
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            for workers in (1, 2):
                workdir = Path(tmp) / f"r{rnd}-w{workers}"
                workdir.mkdir()
                bodies = workdir / "bodies.tsv"
                write_bodies(bodies, signer, 12_000 * args.duration + 20_000, cpus)
                proc, url = start(workers, workdir)
                try:
                    rates[workers].append(wrk(url, bodies, args.duration))
                finally:
                    stop(proc)
                print(f"round {rnd}: {workers} worker(s) {rates[workers][-1]:8,.0f} req/s")
    ratios = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
    print()
    print("| workers | req/s (median) |")
    print("|---:|---:|")
    for workers in (1, 2):
        print(f"| {workers} | {statistics.median(rates[workers]):,.0f} |")
    print(
        f"\n2 workers / 1 worker: **{statistics.median(ratios):.2f}** (median of rounds: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + "); wrk shares the two cores."
    )


if __name__ == "__main__":
    main()
