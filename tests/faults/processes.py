"""The processes a fault test starts, stops and kills: the receiver and a private Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.test_serve import ROOT, base_env, free_port

SECRET = "fault-secret"
START_TIMEOUT = 30.0


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Receiver:
    """`dcon-receiver serve` over plain HTTP on a port of its own, keeping that port and its
    data directory across restarts; its output (JSON logs) goes to ``server.log``."""

    def __init__(
        self,
        workdir: Path,
        *,
        args: tuple[str, ...] = (),
        preexec: Callable[[], None] | None = None,
        **env: str,
    ) -> None:
        self.workdir = workdir
        self.args = args
        self.port = free_port()
        self.env = base_env(
            workdir,
            DCON_TLS="false",
            DCON_PORT=str(self.port),
            DCON_VERIFY_MODE="secret",
            DCON_SIGNATURE_SECRETS=SECRET,
            DCON_SINKS="file",
            DCON_LOG_FORMAT="json",
        )
        self.env.update(env)
        self.data = Path(self.env["DCON_FILE_PATH"]).parent
        self.log_path = workdir / "server.log"
        self.preexec = preexec
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the process and return once /healthz answers."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "serve", *self.args],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self.preexec,
            )
        wait_until(self._healthy, START_TIMEOUT, f"the receiver to start:\n{self.log_tail()}")

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or ``sig``), then the exit status once it has stopped on its own."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_lines(self) -> Iterator[dict[str, Any]]:
        """Every JSON log line the receiver has written (uvicorn's and ours)."""
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                yield json.loads(line)

    def logged(self, text: str) -> int:
        return sum(text in line.get("msg", "") for line in self.log_lines())

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _healthy(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"receiver exited:\n{self.log_tail()}"
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False


class RedisServer:
    """A private redis-server (never the shared one on 6379): every write in the append-only
    file before it is answered, so a kill -9 loses nothing it acknowledged."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--dir", str(self.directory), "--save", ""),
            *("--appendonly", "yes", "--appendfsync", "always"),
        ]
        with (self.directory / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._answers, START_TIMEOUT, "redis-server to start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, "redis-server exited"
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False


def pause(proc: subprocess.Popen[bytes] | None) -> None:
    assert proc is not None
    os.kill(proc.pid, signal.SIGSTOP)


def resume(proc: subprocess.Popen[bytes] | None) -> None:
    assert proc is not None
    os.kill(proc.pid, signal.SIGCONT)
