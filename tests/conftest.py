from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.settings import Settings
from app.sinks import Sink

# DT's sample bodies and its two real signed requests (see tests/payloads/README.md).
PAYLOADS = Path(__file__).resolve().parent / "payloads"


def payload_files() -> list[Path]:
    return sorted(p for p in PAYLOADS.glob("*.json") if p.name != "signed-requests.json")


def signed_requests() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((PAYLOADS / "signed-requests.json").read_text())
    return data


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never depend on the developer's shell: no DCON_* or DT_* variables leak in."""
    for name in list(os.environ):
        if name.startswith(("DCON_", "DT_")) and name != "DCON_SHARED_DIR":
            monkeypatch.delenv(name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def serve_app(
    settings: Settings, sinks: list[Sink] | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real ASGI app with its lifespan running, and a client talking to it."""
    app = create_app(settings, sinks=sinks)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dt.test") as client:
            yield app, client
