"""Counters and histograms for the per-request path, kept as plain numbers.

``prometheus_client`` takes a lock for every increment, and a histogram observation is
two of them plus a walk over the buckets: on the ingest path that came to about ten
locked updates per request, a noticeable share of the whole request (see ``make bench``).
The receiver updates these from the event loop's thread only, so no lock is needed; a
collector turns them into ordinary Prometheus families when ``/metrics`` is scraped,
with the names, labels and buckets the ``prometheus_client`` objects had.

Only for metrics updated on every request; everything else stays a ``prometheus_client``
object. Not safe to update from other threads.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # bisect_left: a value equal to a bound falls in that bound's bucket (le="…").
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1
        self.sum += amount


Child = TypeVar("Child", CounterChild, HistogramChild)


class _Family(Collector, Generic[Child]):
    """One metric family: a child per combination of label values, made on first use."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        if not self.labelnames:
            self._unlabelled: Child = self.labels()
        if registry is not None:
            registry.register(self)

    def _child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: str) -> Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._child()
        return child

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no name clash checks at registration: the names are ours


class TallyCounter(_Family[CounterChild]):
    def _child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled.inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        yield family


class TallyHistogram(_Family[HistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        *,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, amount: float) -> None:
        self._unlabelled.observe(amount)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [*(repr(b) for b in self.bounds), "+Inf"]  # 0.005, 1.0: as Go prints them
        for values, child in self._children.items():
            running, cumulative = 0, []
            for edge, count in zip(edges, child.counts, strict=True):
                running += count
                cumulative.append((edge, float(running)))
            family.add_metric(values, cumulative, child.sum)
        yield family
