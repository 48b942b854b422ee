"""The app factory and the ASGI entry point.

``create_app(settings)`` builds an app whose lifespan owns every resource (keys, dedup,
sinks). ``app`` is resolved lazily from the environment so that ``uvicorn app.main:app``
works while importing this module stays free of side effects.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from app import __version__
from app.asymmetric import AsymmetricScheme, DTKeys
from app.dedup import MemoryDedup
from app.dedup_stores import open_dedup
from app.dedup_warm import warm
from app.delivery import Deliverer, Delivery, Route
from app.errors import ConfigError
from app.ingest import IngestContext, access, ingest, ingest_asgi, metrics_endpoint
from app.logs import configure_logging
from app.metrics import Metrics
from app.receiver import Receiver
from app.settings import Settings, load_settings
from app.signature import Scheme, SecretScheme, TokenAge, Verifier
from app.sinks import Sink, SinkConfigError, SinkError, build_sinks
from app.sinks.file import FileSink
from app.spool import Spool

log = logging.getLogger("dcon")
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """The collector settings for serving, applied once start-up is done."""
    # Everything alive now (modules, models, clients) lives as long as the process: move
    # it out of the collector's sight, so full collections stay short (measured: about a
    # fifth of the CPU per request under load, and the worst latency spikes).
    gc.freeze()
    # A young collection every 700 new container objects (CPython's default) comes every
    # few requests, each walking what the requests in flight hold; nearly all of a
    # request's objects die by reference counting anyway. Every 10,000 costs a few hundred
    # kilobytes more at most and measured +5% requests/s.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def build_verifier(settings: Settings) -> tuple[Verifier, DTKeys | None]:
    """The configured schemes, and DT's keys when the asymmetric scheme needs them."""
    age = TokenAge(settings.max_token_age, settings.token_leeway)
    schemes: list[Scheme] = []
    keys: DTKeys | None = None
    for name in settings.schemes:
        if name == "asymmetric":
            keys = DTKeys.from_settings(settings)
            schemes.append(AsymmetricScheme.from_settings(settings, age, keys))
        else:
            schemes.append(SecretScheme(settings.signature_secrets, age))
    return Verifier(schemes), keys


def startup_warnings(settings: Settings) -> list[str]:
    """What an operator must hear before the receiver starts taking events."""
    said = []
    if not settings.schemes:
        said.append(
            "SIGNATURE VERIFICATION IS OFF (DCON_VERIFY_MODE=off): anyone who can reach "
            "this endpoint can post events; they are stored marked verified=false"
        )
    if "asymmetric" in settings.schemes and not settings.dt_org_id:
        said.append(
            "DCON_DT_ORG_ID is not set: any DT organization's Data Connector can post to "
            "this endpoint; set it to your organization ID"
        )
    if all(types is not None for _, types in settings.sink_routes):
        said.append(
            "every sink in DCON_SINKS has an event-type filter: events of other types "
            "(including new DT types) are acknowledged and stored nowhere"
        )
    return said


async def _connect(sinks: Sequence[Sink], *, spool: bool = False) -> list[Sink]:
    """Connect every sink, or raise ``SinkError`` for the first that cannot.

    In spool mode a sink that cannot connect does not stop the receiver, which only
    needs its spool to answer DT: it is logged and returned, and the forwarder keeps
    trying to connect it before delivering to it.
    """
    down = []
    for sink in sinks:
        try:
            try:
                await sink.connect()
            except SinkError:
                raise
            except Exception as exc:
                raise SinkError(sink.name, f"cannot connect: {exc}") from exc
        except SinkError as exc:
            if not spool:
                raise
            log.warning("sink %s: %s; events wait in the spool meanwhile", sink.name, exc.detail)
            down.append(sink)
    return down


class ReceiverApp(FastAPI):
    """FastAPI, with a straight path for the one URL that carries DT's traffic.

    ``POST <path>`` goes to ``ingest_asgi`` directly: FastAPI's routing, dependency
    solving and middleware stack cost more per request than verifying, parsing and storing
    the event (see ``make bench``). The route stays registered, so it is documented in
    the OpenAPI schema and behaves the same through any other door.
    """

    ingest_path = "/events"
    # Set once the lifespan has the receiver up; None before start-up.
    ingest_context: IngestContext | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = self.ingest_context
        if (
            context is not None
            and scope["type"] == "http"
            and scope["path"] == self.ingest_path
            and scope["method"] == "POST"
        ):
            await ingest_asgi(context, scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(settings: Settings, *, sinks: Sequence[Sink] | None = None) -> FastAPI:
    """Build the receiver. ``sinks`` overrides ``settings.sinks`` (embedding and tests)."""
    if sinks is not None:
        routes = [Route(sink) for sink in sinks]
    else:
        built = build_sinks(settings)
        routes = [
            Route(s, types) for s, (_, types) in zip(built, settings.sink_routes, strict=True)
        ]
    chosen = [route.sink for route in routes]
    verifier, keys = build_verifier(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for warning in startup_warnings(settings):
            log.warning("%s", warning)
        if keys is not None:
            await keys.start()
        down = await _connect(chosen, spool=settings.spool)
        app.state.sinks = chosen
        app.state.keys = keys
        dedup = await open_dedup(settings)
        if isinstance(dedup, MemoryDedup):
            for sink in chosen:
                if isinstance(sink, FileSink):
                    warm(dedup, sink.path, settings.dedup_warm_bytes)
        delivery = Delivery(routes, settings.sink_timeout, settings.retry_after, metrics)
        deliverer: Deliverer = delivery
        if settings.spool:
            deliverer = app.state.spool = Spool(settings, delivery, unconnected=down)
            await app.state.spool.open()
        receiver = app.state.receiver = Receiver(verifier, dedup, deliverer, metrics)
        # This lifespan belongs to the ReceiverApp that create_app builds below.
        cast(ReceiverApp, app).ingest_context = IngestContext(
            receiver, metrics, settings.max_body_bytes
        )
        log.info(
            "receiving on POST %s; signatures: %s; sinks: %s",
            settings.path,
            "+".join(settings.schemes) or "off",
            ", ".join(s.name for s in chosen),
        )
        tune_gc()
        try:
            yield
        finally:
            if app.state.spool is not None:
                await app.state.spool.close()
            await app.state.receiver.dedup.close()
            for sink in reversed(chosen):
                await sink.close()
            if keys is not None:
                await keys.close()
            access.flush()  # the last requests' access lines, should the loop stop first

    app = ReceiverApp(title="dcon-receiver", version=__version__, lifespan=lifespan)
    app.ingest_path = settings.path
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.spool = None
    app.add_api_route(
        settings.path,
        ingest,
        methods=["POST"],
        summary="Receive one DT Data Connector event",
        responses={
            200: {"description": "Stored in every sink (or a duplicate of a stored event)"},
            400: {"description": "Body is not a JSON object"},
            401: {"description": "Signature missing or invalid; the JSON body names why"},
            413: {"description": "Body over the size limit"},
            503: {"description": "A sink did not take the event; DT will retry"},
        },
    )
    app.add_api_route("/healthz", healthz, methods=["GET"], summary="The process is alive")
    app.add_api_route("/readyz", readyz, methods=["GET"], summary="Every sink is reachable")
    app.add_api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        summary="Prometheus metrics",
        response_class=Response,
    )
    return app


async def healthz(request: Request) -> dict[str, Any]:
    receiver: Receiver = request.app.state.receiver
    spool: Spool | None = request.app.state.spool
    body: dict[str, Any] = {"status": "ok", "counts": dict(receiver.counts)}
    if spool is not None:
        body["spool"] = spool.status()
    return body


async def readyz(request: Request) -> JSONResponse:
    """503 naming what is not ready: a sink that fails its ping, or DT's keys not loaded.

    In spool mode a sink that is down does not make the receiver unready (events wait in
    the spool; it is listed under ``spool.sinksDown``); a spool that is full or cannot be
    written does.
    """
    sinks: Sequence[Sink] = request.app.state.sinks
    keys: DTKeys | None = request.app.state.keys
    spool: Spool | None = request.app.state.spool
    results = await asyncio.gather(*(s.ping() for s in sinks), return_exceptions=True)
    failing = {s.name: str(r) for s, r in zip(sinks, results, strict=True) if r is not None}
    body: dict[str, Any] = {}
    if spool is not None:
        body["spool"] = spool.status() | {"sinksDown": failing}
        failing = {}
        problem = await spool.ping()
        if problem is not None:
            failing["spool"] = problem
    if keys is not None and not keys.ready:
        failing["dt_keys"] = keys.status().last_error or "DT's signing keys are not loaded"
    body = {"status": "unready" if failing else "ready", "failing": failing} | body
    return JSONResponse(body, status_code=503 if failing else 200)


@functools.cache
def _app_from_environment() -> FastAPI:
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        return create_app(settings)
    except (ConfigError, SinkConfigError) as exc:
        raise SystemExit(f"dcon-receiver: {exc}") from None


def __getattr__(name: str) -> Any:
    # `uvicorn app.main:app`: build from the environment on first access, not on import.
    if name == "app":
        return _app_from_environment()
    raise AttributeError(name)
