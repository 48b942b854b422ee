"""The HTTP edge: read the raw body under a cap, hand it to the receiver, answer.

This is the one place where errors become HTTP answers.
"""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.errors import BodyTooLarge, DedupBusy, DeliveryFailed, ReceiverError, SignatureError
from app.metrics import CONTENT_TYPE, Metrics
from app.receiver import Receiver, access_fields

access = logging.getLogger("dcon.access")


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
    if isinstance(exc, DeliveryFailed | DedupBusy):
        headers["Retry-After"] = str(exc.retry_after)
    return JSONResponse(content, status_code=exc.status, headers=headers)


async def ingest(request: Request) -> Response:
    """Receive one DT Data Connector event (any Content-Type; the body is read raw)."""
    started = time.perf_counter()
    state = request.app.state
    receiver: Receiver = state.receiver
    metrics: Metrics = state.metrics
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
    size = 0
    try:
        body = await read_body(request, state.settings.max_body_bytes)
        size = len(body)
        ack = await receiver.receive(body, request.headers)
    except ReceiverError as exc:
        response = error_response(exc)
        fields = exc.context | {"error": exc.code}
    else:
        response = JSONResponse({"status": ack.status, "eventId": ack.event.event_id})
        fields = access_fields(ack.event) | {"outcome": ack.status}
    elapsed = time.perf_counter() - started
    status = response.status_code
    metrics.requests.labels(str(status)).inc()
    metrics.request_seconds.observe(elapsed)
    metrics.body_bytes.observe(size)
    response.headers["X-Request-Id"] = request_id
    access.info(
        "%s %s %d",
        request.method,
        request.url.path,
        status,
        extra={
            "requestId": request_id,
            "client": request.client.host if request.client else None,
            "status": status,
            **fields,
            "durationMs": round(elapsed * 1000, 2),
        },
    )
    return response


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus metrics of this process."""
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)
