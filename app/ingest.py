"""The HTTP edge: read the raw body under a cap, hand it to the receiver, answer.

This is the one place where errors become HTTP answers.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.errors import BodyTooLarge, DeliveryFailed, ReceiverError, SignatureError
from app.receiver import Receiver


async def read_body(request: Request, limit: int) -> bytes:
    """The exact bytes DT sent, refusing anything over ``limit`` before buffering it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(exc: ReceiverError) -> JSONResponse:
    content: dict[str, object] = {"error": exc.code, "detail": exc.detail}
    headers = {}
    if isinstance(exc, SignatureError):
        content["scheme"] = exc.scheme
    if isinstance(exc, DeliveryFailed):
        content["sinks"] = list(exc.sinks)
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(content, status_code=exc.status, headers=headers)


async def ingest(request: Request) -> Response:
    """Receive one DT Data Connector event (any Content-Type; the body is read raw)."""
    receiver: Receiver = request.app.state.receiver
    try:
        body = await read_body(request, request.app.state.settings.max_body_bytes)
        ack = await receiver.receive(body, request.headers)
    except ReceiverError as exc:
        return error_response(exc)
    return JSONResponse({"status": ack.status, "eventId": ack.event.event_id})
