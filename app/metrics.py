"""Prometheus metrics of one receiver app, in a registry of its own.

DT's Data Connector page shows three figures over the last 3 hours; each can be derived
from these (see the README's PromQL): success count and error count from
``dcon_requests_total`` by status, and the 99th-percentile latency from
``dcon_request_duration_seconds``.
"""

from __future__ import annotations

import functools

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from app.events import KNOWN_EVENT_TYPES
from app.tally import CounterChild, TallyCounter, TallyHistogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SIZE_BUCKETS = (256, 512, 1024, 2048, 4096, 16384, 65536, 262144)


def type_label(event_type: str | None) -> str:
    """The event type as a label: DT's 19 types by name, anything else as ``other``.

    Bounding the label keeps a flood of made-up types from exploding the series count.
    """
    if event_type is not None and event_type in KNOWN_EVENT_TYPES:
        return event_type
    return "other"


class Metrics:
    def __init__(self) -> None:
        # A registry per app, not the global one: two apps in one process (tests, embedding)
        # must not share or double-register counters.
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        # Updated on every request: tallies (app.tally), not locked prometheus_client objects.
        self.requests = TallyCounter(
            "dcon_requests_total",
            "Ingest requests answered, by HTTP status.",
            ["status"],
            registry=registry,
        )
        self.request_seconds = TallyHistogram(
            "dcon_request_duration_seconds",
            "Time to answer an ingest request.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.body_bytes = TallyHistogram(
            "dcon_request_body_bytes",
            "Size of ingest request bodies.",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.events = TallyCounter(
            "dcon_events_total",
            "Events accepted, by type, parse outcome and verification.",
            ["event_type", "outcome", "verification"],
            registry=registry,
        )
        self.duplicates = Counter(
            "dcon_duplicates",
            "Events answered as duplicates and not delivered again.",
            registry=registry,
        )
        self.signature_failures = Counter(
            "dcon_signature_failures",
            "Requests refused by a signature check.",
            ["scheme", "reason"],
            registry=registry,
        )
        self.sink_deliveries = TallyCounter(
            "dcon_sink_deliveries_total",
            "Events a sink confirmed.",
            ["sink"],
            registry=registry,
        )
        self.sink_failures = Counter(
            "dcon_sink_failures",
            "Events a sink failed or timed out on.",
            ["sink", "reason"],
            registry=registry,
        )
        self.sink_seconds = TallyHistogram(
            "dcon_sink_duration_seconds",
            "Time a sink took to confirm an event.",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        # Spool mode (app.spool). The forwarder's failed attempts are dcon_sink_failures.
        self.spool_pending_bytes = Gauge(
            "dcon_spool_pending_bytes",
            "Bytes in the spool not yet forwarded to every sink.",
            registry=registry,
        )
        self.spool_lag_seconds = Gauge(
            "dcon_spool_lag_seconds",
            "Age of the oldest event not yet forwarded (0 when none waits; reported by the "
            "process that forwards).",
            registry=registry,
        )
        self.spool_forwarded = Counter(
            "dcon_spool_forwarded",
            "Events the forwarder took out of the spool: delivered or dead-lettered.",
            registry=registry,
        )
        self.spool_dead_letters = Counter(
            "dcon_spool_dead_letters",
            "Events written to the dead-letter file, by the sink that refused them "
            "(spool: a line that could not be read).",
            ["sink"],
            registry=registry,
        )

    def observe_request(self, status: int, seconds: float, size: int) -> None:
        self._requests(status).inc()
        self.request_seconds.observe(seconds)
        self.body_bytes.observe(size)

    def count_event(self, event_type: str | None, outcome: str, verification: str) -> None:
        self._events(type_label(event_type), outcome, verification).inc()

    # labels() looks the child up (and locks) on every call; these few combinations are
    # bound once. The label values are bounded (statuses, DT's types), so the caches are.
    @functools.cache  # noqa: B019 - one Metrics per app, living as long as the app
    def _requests(self, status: int) -> CounterChild:
        return self.requests.labels(str(status))

    @functools.cache  # noqa: B019 - as above
    def _events(self, event_type: str, outcome: str, verification: str) -> CounterChild:
        return self.events.labels(event_type, outcome, verification)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
