"""Counters and histograms kept in plain Python numbers, handed to Prometheus when it reads them.

prometheus-client takes a lock per `inc()` and per `observe()` (and with `--workers` writes to a
shared file each time): a request paid for a dozen of those. Here a request adds to a number in an
object found by its label values, and a histogram's bucket is found by bisection over its bounds.
`Tally`, a collector in the registry, turns the numbers into metric families when `/metrics` is read:
the same names, types, labels and values prometheus-client's own Counter and Histogram export.
No lock: every count, and every scrape, runs on the event loop's thread.

With `--workers N` (prometheus-client's multiprocess mode) the supervisor reads each worker's numbers
from its files, not from this process; `Tally.fold` copies what changed into them, once a second and
when the worker stops (`Metrics.sample`), so the merged `/metrics` is at most a second behind.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Generic, TypeVar

from prometheus_client import values
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import INF, floatToGoString


class Count:
    """One series of a counter (or of a gauge moved up and down)."""

    __slots__ = ("folded", "value")

    def __init__(self) -> None:
        self.value: float = 0
        self.folded: tuple[float, ...] = ()

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def numbers(self) -> tuple[float, ...]:
        return (self.value,)


class Observations:
    """One series of a histogram: the observations that fell in each bucket (not cumulative; the last
    bucket is `+Inf`), and their sum."""

    __slots__ = ("bounds", "counts", "folded", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.folded: tuple[float, ...] = ()

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound is >= amount
        self.sum += amount

    def numbers(self) -> tuple[float, ...]:
        return (*self.counts, self.sum)


S = TypeVar("S", Count, Observations)


class Family(Generic[S]):
    """A metric and its series by label values. `labels()` is a dict lookup; a series is made on first use
    and kept (label values come from bounded sets: route names, methods, statuses)."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._series: dict[tuple[str, ...], S] = {}
        """By label values as exported (strings)."""
        self._lookup: dict[tuple[object, ...], S] = {}
        """By label values as callers pass them."""
        self._files: dict[tuple[str, ...], list[values.ValueClass]] = {}
        if not labelnames:
            self._only = self.labels()

    def labels(self, *labelvalues: object, **by_name: object) -> S:
        if by_name:
            labelvalues = tuple(by_name[name] for name in self.labelnames)
        series = self._lookup.get(labelvalues)
        if series is None:
            if len(labelvalues) != len(self.labelnames):
                raise ValueError(f"{self.name} has labels {self.labelnames}, given {labelvalues}")
            series = self._series.setdefault(tuple(str(value) for value in labelvalues), self._new())
            self._lookup[labelvalues] = series
        return series

    def collect(self, samples: bool = True) -> Metric:
        family = self._empty()
        for key, series in list(self._series.items()) if samples else ():
            self._add(family, key, series)
        return family

    def fold(self) -> None:
        """Copy each series that changed since the last fold into this process's multiprocess files."""
        for key, series in list(self._series.items()):
            numbers = series.numbers()
            if numbers != series.folded:
                series.folded = numbers
                files = self._files.get(key) or self._files.setdefault(key, self._values(key))
                for value, number in zip(files, numbers):
                    value.set(number)

    def _new(self) -> S:
        raise NotImplementedError

    def _empty(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Metric, key: tuple[str, ...], series: S) -> None:
        family.add_metric(key, series.value)  # type: ignore[attr-defined,union-attr]

    def _values(self, key: tuple[str, ...]) -> list[values.ValueClass]:
        """The file entries of one series, made as prometheus-client's own metric makes them."""
        raise NotImplementedError


class CounterFamily(Family[Count]):
    def inc(self, amount: float = 1) -> None:
        """For a counter without labels."""
        self._only.value += amount

    def _new(self) -> Count:
        return Count()

    def _empty(self) -> Metric:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _values(self, key: tuple[str, ...]) -> list[values.ValueClass]:
        return [values.ValueClass("counter", self.name, self.name + "_total", self.labelnames, key, self.documentation)]


class GaugeFamily(Family[Count]):
    """A gauge moved up and down (`inc`/`dec`) as requests come and go; with workers, their sum."""

    def inc(self, amount: float = 1) -> None:
        self._only.value += amount

    def dec(self, amount: float = 1) -> None:
        self._only.value -= amount

    def _new(self) -> Count:
        return Count()

    def _empty(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _values(self, key: tuple[str, ...]) -> list[values.ValueClass]:
        return [values.ValueClass("gauge", self.name, self.name, self.labelnames, key, self.documentation,
                                  multiprocess_mode="livesum")]


class HistogramFamily(Family[Observations]):
    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = (), *, buckets: tuple[float, ...]):
        self.bounds = tuple(sorted(float(bound) for bound in buckets))
        self.les = [floatToGoString(bound) for bound in (*self.bounds, INF)]
        super().__init__(name, documentation, labelnames)

    def observe(self, amount: float) -> None:
        """For a histogram without labels."""
        self._only.observe(amount)

    def _new(self) -> Observations:
        return Observations(self.bounds)

    def _empty(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family: Metric, key: tuple[str, ...], series: Observations) -> None:
        cumulative, buckets = 0, []
        for le, count in zip(self.les, series.counts):
            cumulative += count
            buckets.append((le, cumulative))
        family.add_metric(key, buckets, series.sum)  # type: ignore[attr-defined]

    def _values(self, key: tuple[str, ...]) -> list[values.ValueClass]:
        buckets = [values.ValueClass("histogram", self.name, self.name + "_bucket", (*self.labelnames, "le"),
                                     (*key, le), self.documentation) for le in self.les]
        return [*buckets, values.ValueClass("histogram", self.name, self.name + "_sum", self.labelnames, key,
                                            self.documentation)]


F = TypeVar("F", bound=Family)  # type: ignore[type-arg]


class Tally:
    """The families, as one collector in the registry; with workers, folded into the shared files."""

    def __init__(self) -> None:
        self.families: list[Family[Count] | Family[Observations]] = []
        self.shared = bool(values.ValueClass._multiprocess)
        """Multiprocess mode: the supervisor reads the files `fold` writes, not this collector."""

    def add(self, family: F) -> F:
        self.families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()

    def describe(self) -> Iterator[Metric]:
        """The names, so that the registry refuses another metric of the same name."""
        for family in self.families:
            yield family.collect(samples=False)

    def fold(self) -> None:
        if self.shared:
            for family in self.families:
                family.fold()
