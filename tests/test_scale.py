"""Scale-out as an operator runs it: four workers on one port, two replicas sharing Redis,
uvicorn's own --workers, and several processes appending to one file. A DT-like sender
sprays signed events, each sent 1 to 3 times, concurrently and at random processes,
retrying non-2xx answers with backoff; afterwards every eventId is stored exactly once."""

# The SQL built with f-strings here only splices in the test's own table name, letters and
# digits made by the test; every value is a parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import ssl
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# asyncpg ships no type hints (no py.typed, no stubs package).
import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from app.cli import main as cli
from app.events import parse_body
from app.received import ReceivedEvent
from app.samples import EVENT_TYPES, sample_body
from app.signature import UNVERIFIED
from app.signing import sign_secret
from app.sinks.file import FileSink
from tests.test_serve import ROOT, base_env, ca_file, free_port, running
from tests.test_tls import CBC_SUITES, MODERN, handshake, legacy_client, trusting

pytestmark = pytest.mark.slow

SECRET = "scale-secret"
SERVE = [sys.executable, "-m", "app", "serve"]
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
# Shuffles, copy counts and pauses of the emulated sender; nothing secret depends on it.
RNG = random.Random()  # noqa: S311


# --- a DT-like sender ---------------------------------------------------------------------------


@dataclass
class Spray:
    """What the sender did and what it was told."""

    bodies: dict[str, bytes]  # eventId -> body
    copies: int = 0  # DT deliveries started (each retried until a 2xx)
    requests: int = 0  # HTTP requests, retries included
    answers: Counter[str] = field(default_factory=Counter)  # "200 accepted", "503", ...
    acknowledged: set[str] = field(default_factory=set)  # eventIds answered 2xx
    gave_up: list[str] = field(default_factory=list)


def dt_events(count: int) -> dict[str, bytes]:
    bodies = (sample_body(RNG.choice(EVENT_TYPES)) for _ in range(count))
    return {json.loads(body)["event"]["eventId"]: body for body in bodies}


async def spray(
    urls: list[str],
    bodies: dict[str, bytes],
    verify: ssl.SSLContext | bool = True,
    concurrency: int = 32,
) -> Spray:
    """Send each event 1 to 3 times to random receivers, as DT does on its bad days.

    A third of the events have their copies sent at the same moment (the race dedup must
    win); the rest are scattered over the run. Each copy is retried with a growing pause
    until it gets a 2xx, as DT retries an event.
    """
    result = Spray(bodies)
    slots = asyncio.Semaphore(concurrency)

    async def deliver(client: httpx.AsyncClient, body: bytes) -> None:
        event_id = json.loads(body)["event"]["eventId"]
        for attempt in range(12):
            async with slots:
                result.requests += 1
                try:
                    response = await client.post(
                        f"{RNG.choice(urls)}/events",
                        content=body,
                        headers={"X-Dt-Signature": sign_secret(body, SECRET)},
                    )
                except httpx.TransportError as exc:
                    result.answers[type(exc).__name__] += 1
                else:
                    if response.is_success:
                        result.answers[f"{response.status_code} {response.json()['status']}"] += 1
                        result.acknowledged.add(event_id)
                        return
                    result.answers[str(response.status_code)] += 1
            await asyncio.sleep(min(0.02 * 2**attempt, 1.0))
        result.gave_up.append(event_id)

    async def burst(client: httpx.AsyncClient, body: bytes, copies: int) -> None:
        await asyncio.gather(*(deliver(client, body) for _ in range(copies)))

    async def later(client: httpx.AsyncClient, body: bytes) -> None:
        await asyncio.sleep(RNG.random() * 1.5)
        await deliver(client, body)

    async with httpx.AsyncClient(verify=verify, timeout=30) as client:
        jobs = []
        for body in bodies.values():
            copies = RNG.randint(1, 3)
            result.copies += copies
            if RNG.random() < 1 / 3:
                jobs.append(burst(client, body, copies))
            else:
                jobs.extend(later(client, body) for _ in range(copies))
        RNG.shuffle(jobs)
        await asyncio.gather(*jobs)
    return result


# --- what the sinks hold ----------------------------------------------------------------------


def file_sink_ids(directories: list[Path]) -> list[str]:
    """The eventId of every line of every events file (rotated ones too); lines must be whole."""
    ids: list[str] = []
    for directory in directories:
        for path in sorted(directory.glob("events*.jsonl")):
            data = path.read_bytes()
            assert not data or data.endswith(b"\n"), f"{path} ends mid-line"
            ids.extend(json.loads(line)["eventId"] for line in data.splitlines())
    return ids


def account(name: str, sent: Spray, stored: list[str]) -> dict[str, int]:
    """The figures of one run; lost and duplicates stored must both be 0."""
    figures = {
        "sent": len(sent.bodies),
        "duplicates sent": sent.copies - len(sent.bodies),
        "requests": sent.requests,
        "stored": len(stored),
        "duplicates stored": len(stored) - len(set(stored)),
        "lost": len(sent.acknowledged - set(stored)),
    }
    print(f"\n{name}: {figures}; answers {dict(sent.answers)}")
    assert not sent.gave_up, f"never acknowledged: {sent.gave_up}"
    assert sent.acknowledged == set(sent.bodies)
    assert set(stored) <= set(sent.bodies)
    assert figures["lost"] == 0
    assert figures["duplicates stored"] == 0
    assert figures["duplicates sent"] > 0
    return figures


# --- running receivers ------------------------------------------------------------------------


def log_lines(log: Path, text: str) -> int:
    return sum(text in line for line in log.read_text().splitlines())


def wait_for_log(log: Path, text: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while log_lines(log, text) < count:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@contextmanager
def postgres_table() -> Iterator[str]:
    """A table name no other run uses; dropped afterwards."""
    table = f"scale_{uuid.uuid4().hex[:12]}"
    yield table

    async def drop() -> None:
        conn = await asyncpg.connect(POSTGRES_DSN)
        try:
            await conn.execute(f'DROP TABLE IF EXISTS "{table}"')
        finally:
            await conn.close()

    asyncio.run(drop())


async def table_ids(table: str) -> list[str]:
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        return [row["event_id"] for row in await conn.fetch(f'SELECT event_id FROM "{table}"')]
    finally:
        await conn.close()


async def drop_redis_keys(prefix: str) -> int:
    redis = Redis()
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await redis.delete(*keys)
        return len(keys)
    finally:
        await redis.aclose()


# --- the runs -----------------------------------------------------------------------------------


def test_four_workers_on_one_port_store_each_event_once(tmp_path: Path) -> None:
    """`serve --workers 4` over TLS: shared SQLite dedup, one file rotated by all four."""
    port = free_port()
    env = base_env(
        tmp_path,
        DCON_PORT=str(port),
        DCON_VERIFY_MODE="secret",
        DCON_SIGNATURE_SECRETS=SECRET,
        DCON_SINKS="file",
        DCON_FILE_MAX_BYTES=str(64 * 1024),  # rotations while four workers append
        DCON_DEDUP_PATH=str(tmp_path / "data" / "dedup.sqlite3"),
    )
    log = tmp_path / "server.log"
    bodies = dt_events(400)
    with running([*SERVE, "--workers", "4"], env, port) as url:
        wait_for_log(log, "Application startup complete", 4)
        ca = Path(ca_file(env))
        sent = asyncio.run(spray([url], bodies, verify=trusting(ca)))
        workers_seen = distinct_worker_counts(url, trusting(ca))
        # Each worker hardened its own TLS context: TLS 1.1 and CBC suites are refused by
        # whichever worker takes the connection, a modern client is served.
        for _ in range(8):
            for client in (
                legacy_client(ca, ssl.TLSVersion.TLSv1_2, CBC_SUITES),
                legacy_client(ca, ssl.TLSVersion.TLSv1_1, "DEFAULT"),
            ):
                with pytest.raises(ssl.SSLError):
                    handshake(port, client)
            assert handshake(port, trusting(ca))[0] in MODERN
    assert log_lines(log, "Started server process") == 4
    assert (tmp_path / "data" / "dedup.sqlite3").exists()
    stored = file_sink_ids([tmp_path / "data"])
    account("4 workers, one port", sent, stored)
    assert len(list((tmp_path / "data").glob("events-*.jsonl"))) >= 2  # it did rotate
    assert workers_seen >= 2


def distinct_worker_counts(url: str, verify: ssl.SSLContext) -> int:
    """How many workers answered /healthz on fresh connections (told apart by their counts)."""
    seen = set()
    for _ in range(40):
        with httpx.Client(verify=verify, timeout=10) as client:
            counts = client.get(f"{url}/healthz").json()["counts"]
        seen.add(tuple(sorted(counts.items())))
    return len(seen)


def test_two_replicas_sharing_redis_store_each_event_once(tmp_path: Path) -> None:
    """Two receivers on two ports (two hosts' worth), dedup in Redis, each its own file,
    both into one PostgreSQL table: the files together hold each eventId once."""
    prefix = f"dcon:test:scale:{uuid.uuid4().hex}:"
    bodies = dt_events(300)
    with postgres_table() as table, ExitStack() as replicas:
        urls = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            port = free_port()
            env = base_env(
                tmp_path / name,
                DCON_PORT=str(port),
                DCON_TLS="false",
                DCON_VERIFY_MODE="secret",
                DCON_SIGNATURE_SECRETS=SECRET,
                DCON_SINKS="file,postgres",
                DCON_POSTGRES_DSN=POSTGRES_DSN,
                DCON_POSTGRES_TABLE=table,
                DCON_DEDUP_STORE="redis",
                DCON_DEDUP_REDIS_PREFIX=prefix,
            )
            urls.append(replicas.enter_context(running(SERVE, env, port)))
        sent = asyncio.run(spray(urls, bodies))
        replicas.close()
        stored = file_sink_ids([tmp_path / name / "data" for name in ("a", "b")])
        rows = asyncio.run(table_ids(table))
    per_replica = [len(file_sink_ids([tmp_path / n / "data"])) for n in ("a", "b")]
    account("2 replicas, Redis dedup", sent, stored)
    assert all(per_replica), per_replica  # both replicas took events
    assert sorted(rows) == sorted(stored)
    assert asyncio.run(drop_redis_keys(prefix)) == len(bodies)  # one key per eventId


def test_uvicorns_own_workers_share_the_sqlite_store(tmp_path: Path) -> None:
    """`uvicorn app.main:app --workers 2`: each worker sees uvicorn's count and uses SQLite."""
    port = free_port()
    env = base_env(
        tmp_path,
        DCON_TLS="false",
        DCON_VERIFY_MODE="secret",
        DCON_SIGNATURE_SECRETS=SECRET,
        DCON_SINKS="file",
        DCON_DEDUP_PATH=str(tmp_path / "data" / "dedup.sqlite3"),
    )
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)]
    bodies = dt_events(100)
    with running([*command, "--workers", "2"], env, port) as url:
        wait_for_log(tmp_path / "server.log", "Application startup complete", 2)
        sent = asyncio.run(spray([url], bodies))
    assert (tmp_path / "data" / "dedup.sqlite3").exists()
    account("uvicorn --workers 2", sent, file_sink_ids([tmp_path / "data"]))


def test_uvicorns_own_workers_refuse_the_memory_store(tmp_path: Path) -> None:
    """DCON_DEDUP_STORE=memory under `uvicorn --workers 2`: the workers refuse to start
    naming the setting, and uvicorn stops instead of restarting them for ever."""
    env = base_env(tmp_path, DCON_TLS="false", DCON_DEDUP_STORE="memory", DCON_SINKS="file")
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())]
    done = subprocess.run(
        [*command, "--workers", "2"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "DCON_DEDUP_STORE=memory" in done.stderr
    assert "failed to start, stopping the parent process" in done.stderr


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"DCON_DEDUP_STORE": "memory"}, "DCON_DEDUP_STORE=memory"),
        ({"DCON_SINKS": "queue,file"}, "DCON_SINKS: the queue sink"),
    ],
    ids=["memory-dedup", "queue-sink"],
)
def test_serve_refuses_what_several_workers_cannot_share(
    tmp_path: Path, environ: dict[str, str], named: str
) -> None:
    """Refused before the port opens, with the setting named and no traceback."""
    env = {"DCON_TLS": "false", "DCON_FILE_PATH": str(tmp_path / "events.jsonl"), **environ}
    done = CliRunner().invoke(cli, ["serve", "--workers", "2"], env=env)
    assert done.exit_code == 1
    assert named in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)


# --- one file, several writers --------------------------------------------------------------------


def append_events(path: str, first: int, count: int, max_bytes: int) -> None:
    """One worker's file sink: ``count`` events in bursts of 1 to 8 concurrent sends."""

    async def run() -> None:
        sink = FileSink(Path(path), fsync=False, max_bytes=max_bytes)
        await sink.connect()
        numbers = iter(range(first, first + count))
        while burst := [n for _, n in zip(range(RNG.randint(1, 8)), numbers, strict=False)]:
            await asyncio.gather(*(sink.send(numbered_event(n)) for n in burst))
        await sink.close()

    asyncio.run(run())


def numbered_event(n: int) -> ReceivedEvent:
    body = sample_body("touch", event_id=f"file{n:016d}")
    return ReceivedEvent(body, parse_body(body), UNVERIFIED, datetime.now(UTC))


def test_several_processes_append_to_one_file_and_rotate_it_safely(tmp_path: Path) -> None:
    """Three processes, one path, rotation every few lines: every line whole and once, and
    no file past max_bytes, because each rotation is decided on the real shared size."""
    path = tmp_path / "events.jsonl"
    line = len(numbered_event(0).record()) + 1
    max_bytes = 12 * line  # a burst is at most 8 lines, so it always fits a fresh file
    spawn = multiprocessing.get_context("spawn")
    writers = [
        spawn.Process(target=append_events, args=(str(path), i * 1000, 300, max_bytes))
        for i in range(3)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    files = sorted(tmp_path.glob("events*.jsonl"))
    ids = file_sink_ids([tmp_path])
    expected = {f"file{n:016d}" for i in range(3) for n in range(i * 1000, i * 1000 + 300)}
    assert len(ids) == len(expected)
    assert set(ids) == expected
    assert len(files) >= 3 * 300 // 12
    assert all(f.stat().st_size <= max_bytes for f in files)
