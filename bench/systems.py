"""The servers ``bench/http_bench.py`` compares, each a fresh process pinned to CPU 0.

- ``receiver``: ``dcon-receiver serve`` with the default full path (signature check, typed
  parse, dedup, file sink with fsync) over plain HTTP.
- ``bare``: ``bench/bare_asgi.py`` under the same uvicorn, loop and HTTP implementation.
- ``floor``: ``bench/floor_asgi.py`` (the receiver's essential work alone), likewise.
- ``baseline``: Flask + ``dtintegrations`` under one gunicorn sync worker
  (``bench/baseline_flask.py``), from its own venv ``bench/.venv-baseline``.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

BENCH = Path(__file__).resolve().parent
BASELINE_VENV = BENCH / ".venv-baseline"
BASELINE_PACKAGES = ("flask", "gunicorn", "dtintegrations", "pyjwt")
SERVER_CPU = 0
LOAD_CPU = 1
# Extra scheduling priority for the measured processes (nice value; 0 = none). On a shared
# machine a negative value keeps other people's work from skewing the figures.
PRIORITY = {"nice": 0}
PATH = "/events"

Kind = Literal["receiver", "bare", "baseline", "floor"]


@dataclass(frozen=True)
class System:
    key: str
    label: str
    kind: Kind
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The key as a file name: A' → A-default."""
        return self.key.replace("'", "-default")

    @property
    def unique(self) -> bool:
        """Whether every request must carry a distinct, validly signed event."""
        return self.kind != "bare"


def ensure_baseline_venv() -> Path:
    """Create ``bench/.venv-baseline`` with Flask, gunicorn and dtintegrations, on the same
    interpreter as the receiver's venv; made again when that interpreter changes, since
    the comparison is only fair on one interpreter build."""
    marker = BASELINE_VENV / ".installed"
    base = getattr(sys, "_base_executable", sys.executable)  # the venv's own interpreter
    interpreter = f"{os.path.realpath(base)} {sys.version}"
    if not marker.exists() or marker.read_text() != interpreter:
        print(f"creating {BASELINE_VENV} ({', '.join(BASELINE_PACKAGES)})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(BASELINE_VENV)], check=True)
        pip = [str(BASELINE_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, *BASELINE_PACKAGES], check=True)
        marker.write_text(interpreter)
    return BASELINE_VENV / "bin" / "python"


def receiver_command(port: int) -> list[str]:
    script = Path(sys.executable).parent / "dcon-receiver"
    if script.exists():
        return [str(script), "serve", "--port", str(port)]
    return [sys.executable, "-m", "app", "serve", "--port", str(port)]


def _clean_environment() -> dict[str, str]:
    # The caller's own DCON_* settings must not leak into what is measured.
    dropped = ("DT_SIGNATURE_SECRET", "FASTAPI_OTEL_AUTO_CONFIGURE")
    return {k: v for k, v in os.environ.items() if not k.startswith("DCON_") and k not in dropped}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = [int(c) for c in children]
    for child in list(found):
        found.extend(_descendants(child))
    return found


class Server:
    """One server process: started, probed until it answers 200, measured, stopped."""

    def __init__(self, system: System, workdir: Path, env: Mapping[str, str]) -> None:
        self.system = system
        self.workdir = workdir
        self.port = free_port()
        self.env = {**_clean_environment(), **env, **system.env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned = 0.0
        self._logs: list[IO[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def command(self) -> list[str]:
        pin = pinned(SERVER_CPU)
        kind = self.system.kind
        if kind == "receiver":
            return [*pin, *receiver_command(self.port)]
        if kind in ("bare", "floor"):
            # The flags that `dcon-receiver serve` passes or leaves at uvicorn's defaults:
            # loop and http "auto", no access log, no proxy headers.
            module = "bare_asgi:app" if kind == "bare" else "floor_asgi:app"
            return [
                *pin, sys.executable, "-m", "uvicorn", module, "--app-dir", str(BENCH),
                "--host", "127.0.0.1", "--port", str(self.port), "--loop", "auto",
                "--http", "auto", "--no-access-log", "--no-proxy-headers",
                "--log-level", "warning", "--lifespan", "on",
            ]  # fmt: skip
        gunicorn = BASELINE_VENV / "bin" / "gunicorn"
        return [
            *pin, str(gunicorn), "--workers", "1", "--worker-class", "sync",
            "--bind", f"127.0.0.1:{self.port}", "--chdir", str(BENCH),
            "--log-level", "warning", "baseline_flask:app",
        ]  # fmt: skip

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._logs = [(self.workdir / name).open("wb") for name in ("stdout.log", "stderr.log")]
        self.spawned = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._logs[0],
            stderr=self._logs[1],
        )

    def first_200(self, header: str, token: str, body: bytes, timeout: float = 60) -> float:
        """Seconds from spawning the process to the first 200 on a signed POST."""
        assert self.proc is not None
        while time.perf_counter() - self.spawned < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.system.label} exited: {self.stderr_tail()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                headers = {header: token, "Content-Type": "application/json"}
                conn.request("POST", PATH, body, headers)
                response = conn.getresponse()
                response.read()
            except OSError:
                time.sleep(0.002)
                continue
            finally:
                conn.close()
            if response.status != 200:
                raise RuntimeError(f"{self.system.label} answered the probe {response.status}")
            return time.perf_counter() - self.spawned
        raise RuntimeError(f"{self.system.label} did not answer within {timeout} s")

    def cpu_ticks(self) -> int:
        """CPU used so far by the server and its children (gunicorn's worker), in ticks."""
        assert self.proc is not None
        pid = self.proc.pid
        return sum(_ticks(p) for p in [pid, *_descendants(pid)])

    def peak_rss_kib(self) -> int:
        """VmHWM of the server process itself (for gunicorn: of its worker)."""
        assert self.proc is not None
        pid = self.proc.pid
        pids = _descendants(pid) if self.system.kind == "baseline" else [pid]
        status = Path(f"/proc/{pids[0]}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for log in self._logs:
            log.close()

    def stored(self) -> int:
        """Lines in the JSON Lines files the server wrote (rotated files included)."""
        return sum(p.read_bytes().count(b"\n") for p in self.workdir.rglob("*.jsonl"))

    def stderr_tail(self, chars: int = 2000) -> str:
        path = self.workdir / "stderr.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def pinned(cpu: int) -> list[str]:
    """The command prefix that runs a program on one CPU (and at the chosen priority)."""
    nice = PRIORITY["nice"]
    return [*(["nice", "-n", str(nice)] if nice else []), "taskset", "-c", str(cpu)]


def cpu_busy_ticks(cpu: int) -> tuple[int, int]:
    """(user + nice + system, all) ticks of one CPU since boot, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            values = [int(v) for v in line.split()[1:]]
            return sum(values[:3]), sum(values)
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")
