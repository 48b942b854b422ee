"""The per-request tallies expose exactly what prometheus_client's own objects would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from app.metrics import LATENCY_BUCKETS
from app.tally import TallyCounter, TallyHistogram

OBSERVED = [0.0004, 0.001, 0.001, 0.0031, 0.02, 0.7, 3.0, 11.0, 0.0, 2.5]


def exposition(registry: CollectorRegistry) -> list[str]:
    # prometheus_client adds *_created series; the tallies do not keep creation times.
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_histogram_matches_prometheus_client_bucket_for_bucket() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("d_seconds", "Doc.", ["sink"], buckets=LATENCY_BUCKETS, registry=theirs)
    tally = TallyHistogram("d_seconds", "Doc.", ["sink"], buckets=LATENCY_BUCKETS, registry=ours)
    for i, value in enumerate(OBSERVED):
        sink = ("file", "nats")[i % 2]
        reference.labels(sink).observe(value)
        tally.labels(sink).observe(value)
    assert exposition(ours) == exposition(theirs)
    # file saw 0.0004, 0.001, 0.02, 3.0 and 0.0: a value on a bound counts in its bucket.
    assert 'd_seconds_bucket{le="0.001",sink="file"} 3.0' in exposition(ours)


def test_counter_matches_prometheus_client() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Counter("r", "Requests.", ["status"], registry=theirs)
    tally = TallyCounter("r_total", "Requests.", ["status"], registry=ours)
    unlabelled = TallyCounter("u_total", "Plain.", registry=ours)
    for status in ("200", "200", "503", "200"):
        reference.labels(status).inc()
        tally.labels(status).inc()
    unlabelled.inc(2)
    assert exposition(ours)[: len(exposition(theirs))] == exposition(theirs)
    assert "u_total 2.0" in exposition(ours)


def test_wrong_number_of_labels_is_refused() -> None:
    tally = TallyCounter("r_total", "Requests.", ["status"])
    with pytest.raises(ValueError, match="takes labels"):
        tally.labels("200", "extra")
