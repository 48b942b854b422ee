"""The receiver as a user runs it: a real uvicorn process, the real CLI, real files."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from app.cli import main as cli
from app.settings import Settings

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment whose files (events, certificates) all live under tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCON_", "DT_"))}
    env.update(
        DCON_FILE_PATH=str(tmp_path / "data" / "events.jsonl"),
        DCON_TLS_CERTFILE=str(tmp_path / "certs" / "server.pem"),
        DCON_TLS_KEYFILE=str(tmp_path / "certs" / "server-key.pem"),
        **extra,
    )
    return env


def base_url(env: dict[str, str], port: int) -> str:
    scheme = "http" if env.get("DCON_TLS") == "false" else "https"
    return f"{scheme}://localhost:{port}"


def ca_file(env: dict[str, str]) -> str:
    return str(Path(env["DCON_TLS_CERTFILE"]).parent / "ca.pem")


def wait_until_healthy(
    proc: subprocess.Popen[Any], env: dict[str, str], url: str, output: Callable[[], str]
) -> None:
    """Wait until the receiver at ``url`` answers /healthz 200; fail if it exits first."""
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, output()
        try:
            trust = ssl.create_default_context(cafile=ca_file(env)) if "https" in url else True
            if httpx.get(f"{url}/healthz", timeout=1, verify=trust).status_code == 200:
                return
        except (httpx.TransportError, OSError):
            pass  # not listening yet, or the certificate is still being written
        assert time.monotonic() < deadline, "receiver did not start"
        time.sleep(0.1)


@contextmanager
def running(command: Sequence[str], env: dict[str, str], port: int) -> Iterator[str]:
    """Start the receiver, wait until /healthz answers, stop it with SIGTERM afterwards."""
    log_path = Path(env["DCON_FILE_PATH"]).parent.parent / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = base_url(env, port)
    try:
        wait_until_healthy(proc, env, url, log_path.read_text)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells why.
    assert code in (0, -signal.SIGTERM), log_path.read_text()
    assert "Application shutdown complete" in log_path.read_text()


def send(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "send", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stored(tmp_path: Path) -> list[dict[str, object]]:
    lines = (tmp_path / "data" / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_ctrl_c_stops_the_receiver_gracefully_and_quietly(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) shuts the receiver down as SIGTERM does, and it ends with the status
    of an interrupt (130), not click's "Aborted!" and status 1."""
    port = free_port()
    env = base_env(tmp_path, DCON_PORT=str(port), DCON_TLS="false", DCON_SIGNATURE_SECRETS="s3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_healthy(proc, env, base_url(env, port), lambda: proc.communicate()[0])
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "Application shutdown complete" in output
    assert "Aborted" not in output


def test_serve_and_send_with_the_shared_secret(tmp_path: Path) -> None:
    """`dcon-receiver serve` + `send`: three events answered 200 and stored once each."""
    port = free_port()
    env = base_env(
        tmp_path, DCON_PORT=str(port), DCON_VERIFY_MODE="secret", DCON_SIGNATURE_SECRETS="s3"
    )
    with running([sys.executable, "-m", "app", "serve"], env, port) as url:
        assert url.startswith("https://")
        tls = ("--cacert", ca_file(env))
        ok = send("--url", f"{url}/events", *tls, "--secret", "s3", "--count", "3", "--type", "co2")
        bad = send("--url", f"{url}/events", *tls, "--secret", "wrong")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("200 ") == 3
    assert bad.returncode == 1
    assert "401" in bad.stdout
    assert "invalid_signature" in bad.stdout
    events = stored(tmp_path)
    assert len(events) == 3
    assert {e["eventType"] for e in events} == {"co2"}
    assert all(e["verified"] is True for e in events)


def test_uvicorn_deploy_line_serves_the_same_app(tmp_path: Path) -> None:
    """`uvicorn app.main:app` reads the same DCON_* settings."""
    port = free_port()
    env = base_env(tmp_path, DCON_TLS="false", DCON_VERIFY_MODE="secret", DT_SIGNATURE_SECRET="s3")
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)]
    with running(command, env, port) as url:
        ok = send("--url", f"{url}/events", "--secret", "s3")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert len(stored(tmp_path)) == 1


def test_asymmetric_rehearsal_with_a_pinned_local_key(tmp_path: Path) -> None:
    """dev-keys + a pinned JWKS + `send --key`: DT's current scheme, end to end."""
    keys = tmp_path / "keys"
    made = subprocess.run(
        [sys.executable, "-m", "app", "dev-keys", str(keys)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "jwks.json" in made.stdout
    port = free_port()
    env = base_env(
        tmp_path,
        DCON_PORT=str(port),
        DCON_VERIFY_MODE="asymmetric",
        DCON_DT_JWKS_FILE=str(keys / "jwks.json"),
        DCON_DT_ORG_ID="my-org",
    )
    key = str(keys / "private.pem")
    with running([sys.executable, "-m", "app", "serve"], env, port) as url:
        tls = ("--cacert", ca_file(env))
        ok = send("--url", f"{url}/events", *tls, "--key", key, "--org-id", "my-org")
        other_org = send("--url", f"{url}/events", *tls, "--key", key, "--org-id", "not-mine")
        trust = ssl.create_default_context(cafile=ca_file(env))
        ready = httpx.get(f"{url}/readyz", timeout=5, verify=trust)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "wrong_organization" in other_org.stdout
    assert ready.status_code == 200
    [event] = stored(tmp_path)
    assert event["verification"] == "asymmetric"


def test_a_shutdown_timeout_shorter_than_the_sink_deadline_is_refused(tmp_path: Path) -> None:
    """Requests still storing when the wait ended would be cut off: refused before the port
    opens. Unset, the wait is the sink deadline plus a margin."""
    env = {
        "DCON_TLS": "false",
        "DCON_FILE_PATH": str(tmp_path / "events.jsonl"),
        "DCON_SINK_TIMEOUT": "5",
        "DCON_SHUTDOWN_TIMEOUT": "2",
    }
    done = CliRunner().invoke(cli, ["serve"], env=env)
    assert done.exit_code == 1
    assert "DCON_SHUTDOWN_TIMEOUT=2 is shorter than DCON_SINK_TIMEOUT=5" in done.output
    assert Settings(sink_timeout=3).graceful_shutdown_seconds == 8
    assert Settings(sink_timeout=3, shutdown_timeout=3).graceful_shutdown_seconds == 3
