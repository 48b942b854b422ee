"""`send` behaves like a Data Connector: parallel, retrying, signing afresh, and it tallies."""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner, Result

from app.cli import main
from app.cli.send import Backoff, percentile
from app.samples import EVENT_TYPES
from tests.conftest import PAYLOADS
from tests.test_serve import base_env, ca_file, free_port, running

SECRET = "a-test-secret-long-enough-for-hs256"


def send(*args: str) -> Result:
    return CliRunner().invoke(main, ["send", *args])


def summary(result: Result) -> dict[str, str]:
    """The summary's ``name: value`` lines."""
    lines = (line.strip() for line in result.stdout.splitlines())
    pairs = (re.match(r"^([a-z0-9 -]+):\s+(.*)$", line) for line in lines)
    return {m[1]: m[2] for m in pairs if m}


# --- a tiny HTTP server on loopback that plays the receiver -------------------------------


@dataclass
class Script:
    """Answers in order (the last one repeats) and remembers every request."""

    answers: list[int] = field(default_factory=lambda: [200])
    barrier: threading.Barrier | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_status(self, headers: dict[str, str]) -> int:
        with self.lock:
            self.requests.append(headers)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            index = min(len(self.requests), len(self.answers)) - 1
        if self.barrier is not None:
            self.barrier.wait()  # only passes once enough requests are in flight together
        return self.answers[index]

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1


@contextmanager
def scripted(script: Script) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            status = script.next_status(dict(self.headers.items()))
            script.done()
            answer = {"status": "accepted"} if status < 300 else {"error": "sink_unavailable"}
            body = json.dumps(answer, separators=(",", ":")).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/events"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_retries_every_non_2xx_until_a_2xx_with_a_fresh_token_each_time() -> None:
    """503, 503, 200: three attempts, two retried 503s, exit 0, every token new."""
    script = Script(answers=[503, 503, 200])
    with scripted(script) as url:
        result = send("--url", url, "--secret", SECRET, "--retries", "3", "--backoff", "0.01")
    assert result.exit_code == 0, result.output
    said = summary(result)
    assert said["events sent"] == "1"
    assert said["attempts"] == "3"
    assert said["non-2xx retried"] == "503 x2"
    assert said["non-2xx final"] == "none"
    tokens = [r["X-Dt-Signature"] for r in script.requests]
    claims = [jwt.decode(t, SECRET, algorithms=["HS256"]) for t in tokens]
    assert len({c["jti"] for c in claims}) == 3


def test_gives_up_after_the_retries_and_exits_1() -> None:
    """Always 503: 1 + 2 attempts per event, the last counted as final."""
    with scripted(Script(answers=[503])) as url:
        result = send("--url", url, "--count", "2", "--retries", "2", "--backoff", "0.01")
    assert result.exit_code == 1
    said = summary(result)
    assert said["attempts"] == "6"
    assert said["non-2xx final"] == "503 x2"
    assert said["non-2xx retried"] == "503 x4"
    assert said["2xx"] == "0 (duplicates: 0)"


def test_connection_errors_are_retried_and_counted() -> None:
    """Nobody listening: a connection error per attempt, exit 1."""
    url = f"http://127.0.0.1:{free_port()}/events"
    result = send("--url", url, "--retries", "1", "--backoff", "0.01", "-q")
    assert result.exit_code == 1
    said = summary(result)
    assert said["attempts"] == "2"
    assert said["non-2xx final"] == "ConnectError x1"


def test_custom_headers_reach_the_receiver_next_to_the_signature() -> None:
    """-H works like httpConfig.headers; the signature header is still DT's."""
    script = Script()
    with scripted(script) as url:
        result = send(
            "--url", url, "--secret", SECRET, "-H", "X-Tenant: acme", "-H", "Authorization:Bearer t"
        )
    assert result.exit_code == 0, result.output
    [headers] = script.requests
    assert headers["X-Tenant"] == "acme"
    assert headers["Authorization"] == "Bearer t"
    assert "X-Dt-Signature" in headers


def test_a_malformed_header_is_a_usage_error() -> None:
    result = send("-H", "no colon here")
    assert result.exit_code == 2
    assert "'Name: value'" in result.output


def test_a_key_that_cannot_sign_is_a_usage_error(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key")
    result = send("--key", str(key))
    assert result.exit_code == 2
    assert "cannot sign with" in result.output


def test_concurrency_sends_without_waiting_for_earlier_answers() -> None:
    """Four requests must be in flight together to pass the barrier; never more than four."""
    script = Script(barrier=threading.Barrier(4, timeout=10))
    with scripted(script) as url:
        result = send("--url", url, "--count", "12", "--concurrency", "4", "-q")
    assert result.exit_code == 0, result.output
    assert script.most_in_flight == 4
    assert summary(result)["2xx"] == "12 (duplicates: 0)"


def test_rate_caps_events_per_second() -> None:
    """Five events at 20/s take at least the four gaps between them: 0.2 s."""
    with scripted(Script()) as url:
        result = send("--url", url, "--count", "5", "--rate", "20", "--concurrency", "5", "-q")
    assert result.exit_code == 0, result.output
    elapsed = float(summary(result)["elapsed"].split()[0])
    assert elapsed >= 0.19


def test_answers_are_printed_per_event_only_for_small_runs_or_verbose() -> None:
    with scripted(Script()) as url:
        few = send("--url", url, "--count", "2")
        many = send("--url", url, "--count", "11")
        verbose = send("--url", url, "--count", "11", "-v")
        quiet = send("--url", url, "--count", "2", "-q")
    assert few.stdout.count('200 {"status":"accepted"}') == 2
    assert "200 {" not in many.stdout
    assert verbose.stdout.count('200 {"status":"accepted"}') == 11
    assert "200 {" not in quiet.stdout
    assert summary(many)["events sent"] == "11"


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    backoff = Backoff(retries=10, first=0.5, cap=4)
    for retry, base in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        pauses = [backoff.pause(retry) for _ in range(50)]
        assert all(base / 2 <= p <= base for p in pauses)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7


# --- against the real receiver ------------------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real `dcon-receiver serve` over HTTPS: (events URL, CA file)."""
    with secret_receiver(tmp_path) as found:
        yield found


@contextmanager
def secret_receiver(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`dcon-receiver serve` checking SECRET, storing to tmp_path/data/events.jsonl."""
    port = free_port()
    env = base_env(
        tmp_path,
        DCON_PORT=str(port),
        DCON_VERIFY_MODE="secret",
        DCON_SIGNATURE_SECRETS=SECRET,
        DCON_SINKS="file",
    )
    with running([sys.executable, "-m", "app", "serve"], env, port) as url:
        yield f"{url}/events", ca_file(env)


def stored_lines(tmp_path: Path) -> list[bytes]:
    return (tmp_path / "data" / "events.jsonl").read_bytes().splitlines()


@pytest.mark.slow
def test_fifty_events_of_all_types_in_parallel(receiver: tuple[str, str], tmp_path: Path) -> None:
    url, ca = receiver
    result = send(
        "--url", url, "--cacert", ca, "--secret", SECRET,
        "--count", "50", "--concurrency", "8", "--type", "all",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    said = summary(result)
    assert said["events sent"] == "50"
    assert said["2xx"] == "50 (duplicates: 0)"
    lines = stored_lines(tmp_path)
    assert len(lines) == 50
    assert {json.loads(line)["eventType"] for line in lines} == set(EVENT_TYPES)


@pytest.mark.slow
def test_a_wrong_secret_is_counted_as_401(receiver: tuple[str, str], tmp_path: Path) -> None:
    url, ca = receiver
    result = send("--url", url, "--cacert", ca, "--secret", "wrong", "--count", "3", "-q")
    assert result.exit_code == 1
    said = summary(result)
    assert said["non-2xx final"] == "401 x3"
    assert "invalid_signature" in said["401"]
    assert not (tmp_path / "data" / "events.jsonl").read_bytes()


@pytest.mark.slow
def test_repeated_files_are_sent_byte_for_byte_and_counted_as_duplicates(
    receiver: tuple[str, str], tmp_path: Path
) -> None:
    url, ca = receiver
    touch = PAYLOADS / "touch.json"
    args = ("--url", url, "--cacert", ca, "--secret", SECRET, "--concurrency", "3")
    result = send(*args, str(touch), str(touch), str(touch))
    assert result.exit_code == 0, result.output
    assert summary(result)["2xx"] == "3 (duplicates: 2)"
    [line] = stored_lines(tmp_path)
    assert line.endswith(b',"body":' + touch.read_bytes() + b"}")


@pytest.mark.slow
def test_a_failing_sink_answers_503_and_every_retry_is_counted(tmp_path: Path) -> None:
    """The file sink writes to /dev/full (through a symlink): every write fails, so the
    real receiver answers 503 at runtime, which `send` retries."""
    events = tmp_path / "data" / "events.jsonl"
    events.parent.mkdir()
    events.symlink_to("/dev/full")
    port = free_port()
    env = base_env(
        tmp_path,
        DCON_PORT=str(port),
        DCON_VERIFY_MODE="secret",
        DCON_SIGNATURE_SECRETS=SECRET,
        DCON_SINKS="file",
    )
    with running([sys.executable, "-m", "app", "serve"], env, port) as url:
        result = send(
            "--url", f"{url}/events", "--cacert", ca_file(env), "--secret", SECRET,
            "--count", "2", "--retries", "2", "--backoff", "0.01",
        )  # fmt: skip
    assert result.exit_code == 1
    said = summary(result)
    assert said["attempts"] == "6"
    assert said["non-2xx final"] == "503 x2"
    assert said["non-2xx retried"] == "503 x4"
    assert "sink_unavailable" in said["503"]
