"""/healthz: the process is alive. /readyz: every sink is reachable, or which is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.sinks import SinkError
from app.sinks.memory import QueueSink
from tests.conftest import serve_app
from tests.test_serve import ROOT, base_env, free_port, running

SECRET = "health-secret"


class PingedSink(QueueSink):
    """A queue sink that counts its pings and can be taken down (a broker gone away)."""

    name = "pinged"

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0
        self.down = False

    async def ping(self) -> None:
        self.pings += 1
        if self.down:
            raise SinkError(self.name, "broker unreachable")


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"verify_mode": "secret", "signature_secrets": [SECRET]}
    base.update(overrides)
    return Settings(**base)


@pytest.mark.anyio
async def test_healthz_answers_without_touching_a_sink_that_is_down() -> None:
    """/healthz is 200 with the sink down and never pings it; /readyz does, and says 503."""
    sink = PingedSink()
    async with serve_app(settings(), [sink]) as (_, client):
        sink.down = True
        health = await client.get("/healthz")
        pings_for_health = sink.pings
        ready = await client.get("/readyz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert pings_for_health == 0
    assert ready.status_code == 503
    assert sink.pings == 1


@pytest.mark.anyio
async def test_readyz_is_200_when_every_sink_pings(tmp_path: Path) -> None:
    """File and queue sinks built from the settings both answer: ready, nothing failing."""
    configured = settings(sinks=["file", "queue"], file_path=tmp_path / "events.jsonl")
    async with serve_app(configured) as (_, client):
        ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "failing": {}}


@pytest.mark.anyio
async def test_readyz_names_the_file_sink_whose_file_was_deleted(tmp_path: Path) -> None:
    """The events file removed underneath: 503 naming only the file sink, and why."""
    events = tmp_path / "events.jsonl"
    configured = settings(sinks=["file", "queue"], file_path=events)
    async with serve_app(configured) as (_, client):
        events.unlink()
        unready = await client.get("/readyz")
        health = await client.get("/healthz")
    assert unready.status_code == 503
    body = unready.json()
    assert body["status"] == "unready"
    assert list(body["failing"]) == ["file"]
    assert "removed" in body["failing"]["file"]
    assert health.status_code == 200


@pytest.mark.anyio
async def test_readyz_names_a_closed_queue_sink_beside_a_healthy_one() -> None:
    """One of two sinks closed: 503, and the failing map holds that one sink's own message."""
    queue, pinged = QueueSink(), PingedSink()
    async with serve_app(settings(), [queue, pinged]) as (_, client):
        await queue.close()
        unready = await client.get("/readyz")
    assert unready.status_code == 503
    assert unready.json()["failing"] == {"queue": "queue: closed"}


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "app", "healthcheck"]
    return subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_healthcheck_command_exits_0_against_a_running_https_receiver(tmp_path: Path) -> None:
    """`dcon-receiver healthcheck`, with the receiver's own settings, says ok over HTTPS."""
    port = free_port()
    env = base_env(
        tmp_path, DCON_PORT=str(port), DCON_VERIFY_MODE="secret", DCON_SIGNATURE_SECRETS=SECRET
    )
    with running([sys.executable, "-m", "app", "serve"], env, port) as url:
        assert url.startswith("https://")
        result = healthcheck(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.slow
def test_healthcheck_command_fails_when_nothing_listens(tmp_path: Path) -> None:
    """No receiver on the port: a non-zero exit and a message saying there was no answer."""
    env = base_env(tmp_path, DCON_PORT=str(free_port()))
    result = healthcheck(env)
    assert result.returncode != 0
    assert "no answer" in result.stderr
    assert "Traceback" not in result.stderr
