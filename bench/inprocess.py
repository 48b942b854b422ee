"""The receiver in-process, without a server: settings as ``bench/http_bench.py`` runs it, the
ASGI lifespan, and POSTs made straight into the ASGI app."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from signed_bodies import SECRET

from app.settings import Settings

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]


def receiver_settings(directory: Path, **overrides: Any) -> Settings:
    """Receiver A of the HTTP benchmark: secret scheme, file sink only, defaults otherwise."""
    for name in [k for k in os.environ if k.startswith("DCON_")]:
        del os.environ[name]  # the caller's own settings must not leak in
    values: dict[str, Any] = {
        "tls": False,
        "verify_mode": "secret",
        "signature_secrets": [SECRET],
        "sinks": ["file"],
        "file_path": directory / "events.jsonl",
        "log_level": "warning",
    }
    return Settings(**(values | overrides))


@asynccontextmanager
async def lifespan(app: ASGIApp) -> AsyncIterator[dict[str, Any]]:
    """Run the app's lifespan startup, yield its state, and shut it down after."""
    state: dict[str, Any] = {}
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})

    async def run() -> None:
        await app(scope, inbox.get, outbox.put)

    task = asyncio.create_task(run())
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"lifespan startup failed: {started}")
    try:
        yield state
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


def post_scope(path: str, headers: list[tuple[bytes, bytes]], state: dict[str, Any]) -> Message:
    """An HTTP scope as uvicorn builds it for a POST."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": dict(state),
    }


def signed_headers(header: str, token: str, body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"127.0.0.1:8000"),
        (header.lower().encode(), token.encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]


async def post(app: ASGIApp, scope: Message, body: bytes) -> int:
    """Call the app with one request; return the status it answered."""
    delivered = False
    status = 0
    never: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            return await never  # as a server does: nothing more until the client leaves
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def in_batches(
    items: Sequence[Any], concurrency: int, call: Callable[[Any], Awaitable[object]]
) -> list[object]:
    """Call ``call`` on every item, ``concurrency`` at a time (as many connections would)."""
    results: list[object] = []
    for i in range(0, len(items), concurrency):
        results += await asyncio.gather(*(call(item) for item in items[i : i + concurrency]))
    return results
