"""The floor for ``bench/http_bench.py --floor``: the receiver's essential work, and no more.

One ASGI function does what every accepted DT event needs: the HS256 signature and the
body's SHA-256 checked (with the standard library), the typed parse (``parse_body``), a
plain dict for dedup, and the receiver's own file sink (group commit, fsync on unless
``DCON_FILE_FSYNC=false``) before it answers 200. None of the rest of the receiver: no
metrics, deadlines, request ids, batches, dedup window, token age, key reports or record
metadata, and nothing for an error but a bare 401. It does take the receiver's garbage
collector settings (``gc.freeze()`` after start-up, young collections every 10,000
objects). Its ratio to the receiver tells how much of the receiver's time is the product
around that work; its ratio to the ceiling, how far this stack goes with the work itself.

Settings from the environment as the receiver reads them: ``DCON_SIGNATURE_SECRETS`` (the
first secret) and ``DCON_FILE_PATH``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from app.events import parse_body
from app.main import tune_gc
from app.sinks.file import FileSink

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

ACCEPTED = b'{"status":"accepted"}'
REFUSED = b'{"error":"invalid_signature"}'


class Line:
    """What ``FileSink.send`` needs of an event: its line."""

    __slots__ = ("line",)

    def __init__(self, line: bytes) -> None:
        self.line = line

    def record(self) -> bytes:
        return self.line


class Floor:
    def __init__(self) -> None:
        secret = os.environ["DCON_SIGNATURE_SECRETS"].split(",")[0].strip()
        self.mac = hmac.new(secret.encode(), digestmod="sha256")
        self.sink = FileSink(
            Path(os.environ["DCON_FILE_PATH"]),
            fsync=os.environ.get("DCON_FILE_FSYNC", "true").lower() != "false",
            max_bytes=0,
        )
        self.seen: dict[str, bool] = {}

    def verified(self, token: bytes, body: bytes) -> bool:
        head, payload, signature = [*token.split(b"."), b"", b""][:3]
        mac = self.mac.copy()
        mac.update(token[: len(head) + 1 + len(payload)])
        expected = base64.urlsafe_b64encode(mac.digest()).rstrip(b"=")
        if not hmac.compare_digest(expected, signature):
            return False
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
            claimed = str(claims["checksum_sha256"])
        except (ValueError, TypeError, KeyError, binascii.Error):
            return False
        return hmac.compare_digest(hashlib.sha256(body).hexdigest(), claimed)

    async def ingest(self, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes | None:
        token = next((v for k, v in headers if k == b"x-dt-signature"), b"")
        if not self.verified(token, body):
            return None
        parsed = parse_body(body)
        event_id = parsed.event_id or ""
        if event_id not in self.seen:
            line = b'{"eventId":%s,"body":%s}' % (json.dumps(event_id).encode(), body)
            await self.sink.send(Line(line))  # type: ignore[arg-type]
            self.seen[event_id] = True
        return ACCEPTED


floor = Floor()


async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await floor.sink.connect()
                tune_gc()  # the receiver's own: the floor differs from it in its work alone
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await floor.sink.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    parts = []
    more = True
    while more:
        message = await receive()
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    answer = await floor.ingest(scope["headers"], b"".join(parts))
    status, body = (200, answer) if answer is not None else (401, REFUSED)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
