"""Instructions per request over HTTP, counted by callgrind: a figure that load does not move.

    python bench/instructions.py [--seconds 15] [--connections 64]

On a shared VM, requests/s of two identical runs can differ by a fifth, which hides any
change smaller than that. The number of instructions the server process executes per
request does not drift so: each system here runs under ``valgrind --tool=callgrind``
(some 50 times slower), is warmed up by wrk, and is counted over one wrk run between
``callgrind_control --zero`` and ``--dump``. Same systems, settings and signed events as
``http_bench.py`` (A, A', B); the load is wrk pinned to CPU 1, 64 connections.

What is counted is user space only: Python, uvloop, httptools, pydantic-core, OpenSSL and
the C library, in every thread of the server. The kernel's part (sockets, fsync), which the
bare app pays too, is not, so B/A here runs above the throughput ratio of
``http_bench.py``. valgrind's virtual CPU has no SHA extensions, so SHA-256 counts at its
software cost. Use it to tell whether a change to the request path made it shorter.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from http_bench import RECEIVER_ENV, SYSTEMS, say, wrk
from signed_bodies import Signer, signed_line, write_bodies
from systems import Server, System, pinned

KEYS = ("A", "A'", "B")
# Under callgrind the receiver answers a few hundred requests a second at most.
BODIES = 20_000


class Counted(Server):
    """A server process run under callgrind, its counters zeroed and dumped on demand."""

    def command(self) -> list[str]:
        pin = pinned(0)
        plain = super().command()[len(pin) :]
        out = self.workdir / "callgrind.out.%p"
        return [*pin, "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *plain]

    def control(self, action: str) -> None:
        assert self.proc is not None
        subprocess.run(
            ["callgrind_control", action, str(self.proc.pid)], check=True, capture_output=True
        )

    def dumped(self) -> int:
        """Instructions in the first dump (from the last --zero to the --dump)."""
        assert self.proc is not None
        path = self.workdir / f"callgrind.out.{self.proc.pid}.1"
        found = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no total in {path}")
        return int(found.group(1))


def count(system: System, tmp: Path, bodies: Path, seconds: int, connections: int) -> float:
    """Instructions per answered request of one system."""
    workdir = tmp / system.slug
    env: dict[str, str] = {}
    if system.kind == "receiver":
        env = {**RECEIVER_ENV, "DCON_FILE_PATH": str(workdir / "events.jsonl")}
    server = Counted(system, workdir, env)
    signer = Signer()
    probe = signed_line(signer, 0).rstrip("\n").split("\t", 1)
    server.start()
    try:
        server.first_200(signer.header, probe[0], probe[1].encode(), timeout=300)
        wrk(server.url, bodies, signer.header, 3, connections)
        server.control("--zero")
        measured = wrk(server.url, bodies, signer.header, seconds, connections)
        server.control("--dump")
        instructions = server.dumped()
    finally:
        server.stop()
    requests = int(measured["requests"])
    if measured["status_errors"] or not requests:
        raise RuntimeError(f"{system.label}: {measured}")
    say(f"  {system.key:<3} {requests:,} requests, {instructions / requests:,.0f} per request")
    return instructions / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15, help="counted seconds per system")
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    missing = [tool for tool in ("valgrind", "callgrind_control", "wrk") if not shutil.which(tool)]
    if missing:
        print(f"instructions per request: skipped, needs {', '.join(missing)}")
        return
    with tempfile.TemporaryDirectory(prefix="dcon-instructions-") as name:
        tmp = Path(name)
        bodies = tmp / "bodies.tsv"
        write_bodies(bodies, Signer(), BODIES, set(os.sched_getaffinity(0)))
        say("instructions per request, under callgrind:")
        counts = {
            key: count(SYSTEMS[key], tmp, bodies, args.seconds, args.connections) for key in KEYS
        }
    print("\n## Instructions per request over HTTP (callgrind, user space)\n")
    print("| | system | instructions per request | of A |")
    print("|---|---|---:|---:|")
    for key in KEYS:
        share = counts[key] / counts["A"]
        print(f"| {key} | {SYSTEMS[key].label} | {counts[key]:,.0f} | {share:.3f} |")
    print(
        f"\nB/A = {counts['B'] / counts['A']:.3f}: the bare app's instructions per request as a "
        "share of the receiver's (the kernel's part left out; see the script's docstring)."
    )


if __name__ == "__main__":
    main()
