"""Counters and histograms fed without a lock, folded into plain numbers when read.

Why it exists: `prometheus_client`'s own `Counter` and `Histogram` take a lock for every
value (a histogram's `observe`, two), and every group's thread shares them. When the
interpreter switches out a thread that holds one, the threads behind it queue on the lock
and each wakes in turn: on a busy runtime that convoy cost more than the metrics' own work.
Here an observation is one `deque.append` (atomic, no lock) of `(instrument, labels,
amount)`; the numbers are brought up to date ("folded") under one lock by whoever reads
them, a scrape, and by the thread that finds `FOLD_AT` observations waiting, so a runtime
nobody scrapes keeps only that many.

A scrape folds first: everything observed before it began is in what it reads. The
families it yields are those `prometheus_client` yields for a `Counter` and a `Histogram`
of the same name, documentation, labels and buckets, sample for sample (the `_created`
times included; `tests/test_tally.py` compares them).

Example:
    >>> tally = Tally()
    >>> turns = tally.counter("sleeptime_turns", "Turns.", ["fired"], children=[("true",)])
    >>> tally.observe(turns, ("true",), 1)
    >>> registry.register(tally)
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import INF, floatToGoString

FOLD_AT = 4096
"""Observations that may wait unfolded; the thread that adds the next folds them."""

Labels = tuple[str, ...]


class TallyCounter:
    """A counter's value per label values, from when each was first seen."""

    __slots__ = ("_created", "_values", "documentation", "labels", "name")

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], children: Iterable[Labels]
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self._values: dict[Labels, float] = {}
        self._created: dict[Labels, float] = {}
        for child in children if self.labels else [()]:
            self._child(child)

    def _child(self, labels: Labels) -> None:
        if len(labels) != len(self.labels):
            raise ValueError(f"{self.name} takes the labels {self.labels}, given {labels}")
        self._values[labels] = 0.0
        self._created[labels] = time.time()

    def add(self, labels: Labels, amount: float) -> None:
        if labels not in self._values:
            self._child(labels)
        self._values[labels] += amount

    def family(self, described: bool = False) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        if not described:
            for labels, value in self._values.items():
                family.add_metric(labels, value, created=self._created[labels])
        return family


class TallyHistogram:
    """A histogram's bucket counts and sum per label values."""

    __slots__ = (
        "_bounds",
        "_counts",
        "_created",
        "_les",
        "_sums",
        "documentation",
        "labels",
        "name",
    )

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], labels: Sequence[str]
    ) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self._bounds = bounds
        self._les: list[str] = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}
        self._created: dict[Labels, float] = {}
        if not self.labels:
            self._child(())

    def _child(self, labels: Labels) -> list[int]:
        if len(labels) != len(self.labels):
            raise ValueError(f"{self.name} takes the labels {self.labels}, given {labels}")
        counts = self._counts[labels] = [0] * len(self._bounds)
        self._sums[labels] = 0.0
        self._created[labels] = time.time()
        return counts

    def add(self, labels: Labels, amount: float) -> None:
        counts = self._counts.get(labels)
        if counts is None:
            counts = self._child(labels)
        # The first bucket whose bound is at least the amount (`le`), as prometheus_client
        # counts it; an amount no bucket takes (NaN) counts in none, as there.
        index = bisect_left(self._bounds, amount)
        if index < len(counts) and amount <= self._bounds[index]:
            counts[index] += 1
        self._sums[labels] += amount

    def family(self, described: bool = False) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        if described:
            return family
        for labels, counts in self._counts.items():
            cumulative, buckets = 0, []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(labels, buckets, self._sums[labels])
            named = dict(zip(self.labels, labels, strict=True))
            family.samples.append(Sample(f"{self.name}_created", named, self._created[labels]))
        return family


Instrument = TallyCounter | TallyHistogram


class Tally(Collector):
    """Instruments fed through one queue, read as Prometheus families (a `Collector`)."""

    def __init__(self) -> None:
        self._instruments: list[Instrument] = []
        self._pending: deque[tuple[Instrument, Labels, float]] = deque()
        self._lock = threading.Lock()  # held while folding and while reading

    def counter(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        children: Iterable[Labels] = (),
    ) -> TallyCounter:
        """A counter; `children`: label values present (at 0) before anything is counted."""
        made = TallyCounter(name, documentation, labels, children)
        self._instruments.append(made)
        return made

    def histogram(
        self, name: str, documentation: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> TallyHistogram:
        made = TallyHistogram(name, documentation, buckets, labels)
        self._instruments.append(made)
        return made

    def observe(self, instrument: Instrument, labels: Labels, amount: float) -> None:
        """Count `amount` (a counter's increment, a histogram's observation): no lock."""
        pending = self._pending
        pending.append((instrument, labels, amount))
        if len(pending) >= FOLD_AT and self._lock.acquire(blocking=False):
            try:
                self._fold()
            finally:
                self._lock.release()

    def _fold(self) -> None:
        """Bring the numbers up to date with what was observed so far (lock held)."""
        pending = self._pending
        take = pending.popleft
        for _ in range(len(pending)):  # what others add meanwhile waits for the next fold
            instrument, labels, amount = take()
            instrument.add(labels, amount)

    def describe(self) -> Iterator[Metric]:
        return iter([instrument.family(described=True) for instrument in self._instruments])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            self._fold()
            families = [instrument.family() for instrument in self._instruments]
        return iter(families)
