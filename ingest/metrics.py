"""A small Prometheus registry with text exposition (format 0.0.4), and merging across workers.

Worker processes sharing one port each hold their own registry. So that a scrape, which reaches one
worker at random, still sees the whole host, each worker writes a snapshot of its registry every few
seconds (``write_snapshot``) and ``/metrics`` adds up its own values and the fresh snapshots of its
siblings (counters and histograms are summed, gauges combined as each gauge says).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec

LabelValues = tuple[str, ...]
MergeMode = Literal["sum", "min", "max"]

DEFAULT_LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Metric:
    kind: str = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)

    def _key(self, labels: Sequence[str]) -> LabelValues:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(v) for v in labels)

    def samples(self) -> dict[LabelValues, Any]:
        raise NotImplementedError

    def render(self, samples: dict[LabelValues, Any]) -> list[str]:
        raise NotImplementedError


class Counter(Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        # label values -> [total]: a mutable cell, so that hot paths can hold it (see ``cell``).
        self._cells: dict[LabelValues, list[float]] = {}
        if not self.labelnames:
            self._cells[()] = [0.0]

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        cell = self._cells.get(labels)
        if cell is None:
            cell = self.cell(*labels)
        cell[0] += amount

    def cell(self, *labels: str) -> list[float]:
        """The total of these label values as a one-element list, for a hot path to add to directly
        (``cell[0] += n``, never a negative n); the series exists from now on, at 0."""
        key = self._key(labels)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = [0.0]
        return cell

    def value(self, *labels: str) -> float:
        cell = self._cells.get(self._key(labels))
        return cell[0] if cell else 0.0

    def samples(self) -> dict[LabelValues, Any]:
        return {key: cell[0] for key, cell in self._cells.items()}

    def render(self, samples: dict[LabelValues, Any]) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, key)} {_format_value(value)}"
            for key, value in sorted(samples.items())
        ]


class Gauge(Metric):
    kind = "gauge"

    def __init__(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), merge: MergeMode = "sum"
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.merge: MergeMode = merge
        self._values: dict[LabelValues, float] = {}
        self._function: Callable[[], Iterable[tuple[LabelValues, float]]] | None = None

    def set(self, value: float, *labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def set_function(self, function: Callable[[], Iterable[tuple[LabelValues, float]]]) -> None:
        """Compute the samples at scrape time: an iterable of (label values, value)."""
        self._function = function

    def value(self, *labels: str) -> float:
        value: float = self.samples().get(self._key(labels), 0.0)
        return value

    def samples(self) -> dict[LabelValues, Any]:
        if self._function is not None:
            return {self._key(labels): float(value) for labels, value in self._function()}
        return dict(self._values)

    def render(self, samples: dict[LabelValues, Any]) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, key)} {_format_value(value)}"
            for key, value in sorted(samples.items())
        ]


def observe_row(row: list[float], buckets: Sequence[float], value: float) -> None:
    """Add ``value`` to a histogram ``row`` (see ``Histogram.row``) with these bucket bounds."""
    # The first bucket whose bound is >= value (len(buckets): the +Inf bucket).
    row[bisect.bisect_left(buckets, value)] += 1
    row[-1] += value


class Histogram(Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))
        # label values -> [count per bucket (non-cumulative) ..., +Inf bucket, sum]
        self._values: dict[LabelValues, list[float]] = {}

    def observe(self, value: float, *labels: str) -> None:
        row = self._values.get(labels)
        if row is None:
            row = self.row(*labels)
        observe_row(row, self.buckets, value)

    def row(self, *labels: str) -> list[float]:
        """The counts of these label values (count per bucket, +Inf, sum), for a hot path to observe
        into directly with ``observe_row``."""
        key = self._key(labels)
        row = self._values.get(key)
        if row is None:
            row = self._values[key] = [0.0] * (len(self.buckets) + 2)
        return row

    def count(self, *labels: str) -> float:
        row = self._values.get(self._key(labels))
        return sum(row[:-1]) if row else 0.0

    def samples(self) -> dict[LabelValues, Any]:
        return {key: list(row) for key, row in self._values.items()}

    def render(self, samples: dict[LabelValues, Any]) -> list[str]:
        lines: list[str] = []
        for key, row in sorted(samples.items()):
            cumulative = 0.0
            for bound, count in zip((*self.buckets, math.inf), row[:-1], strict=True):
                cumulative += count
                le = 'le="' + _format_value(bound) + '"'
                labels = _labels(self.labelnames, key, le)
                lines.append(f"{self.name}_bucket{labels} {_format_value(cumulative)}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_format_value(row[-1])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {_format_value(cumulative)}")
        return lines


class _Snapshot(msgspec.Struct):
    written_at: float
    metrics: dict[str, list[tuple[list[str], Any]]]


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def _add(self, metric: Metric) -> Any:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        result: Counter = self._add(Counter(name, help_text, labelnames))
        return result

    def gauge(
        self, name: str, help_text: str, labelnames: Sequence[str] = (), merge: MergeMode = "sum"
    ) -> Gauge:
        result: Gauge = self._add(Gauge(name, help_text, labelnames, merge))
        return result

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS,
    ) -> Histogram:
        result: Histogram = self._add(Histogram(name, help_text, labelnames, buckets))
        return result

    def snapshot(self) -> dict[str, dict[LabelValues, Any]]:
        return {name: metric.samples() for name, metric in self._metrics.items()}

    def render(self, others: Iterable[dict[str, dict[LabelValues, Any]]] = ()) -> str:
        """Text exposition of this registry, merged with other workers' snapshots."""
        merged = self.snapshot()
        for other in others:
            for name, samples in other.items():
                metric = self._metrics.get(name)
                if metric is None:
                    continue
                target = merged[name]
                for key, value in samples.items():
                    if key not in target:
                        target[key] = value
                    elif isinstance(metric, Histogram):
                        target[key] = [a + b for a, b in zip(target[key], value, strict=True)]
                    elif isinstance(metric, Gauge) and metric.merge == "min":
                        target[key] = min(target[key], value)
                    elif isinstance(metric, Gauge) and metric.merge == "max":
                        target[key] = max(target[key], value)
                    else:
                        target[key] = target[key] + value
        lines: list[str] = []
        for name, metric in self._metrics.items():
            lines.append(f"# HELP {name} {metric.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
            lines.append(f"# TYPE {name} {metric.kind}")
            lines.extend(metric.render(merged[name]))
        return "\n".join(lines) + "\n"

    # -- sharing between workers ---------------------------------------------------------------------

    def write_snapshot(self, path: Path) -> None:
        snapshot = _Snapshot(
            written_at=time.time(),
            metrics={
                name: [(list(key), value) for key, value in samples.items()]
                for name, samples in self.snapshot().items()
            },
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(snapshot))
        os.replace(tmp, path)

    @staticmethod
    def read_snapshots(
        directory: Path, exclude: str, max_age_s: float
    ) -> list[dict[str, dict[LabelValues, Any]]]:
        """Fresh snapshots of the other workers (``<slot>.json`` files, except ``exclude``)."""
        result: list[dict[str, dict[LabelValues, Any]]] = []
        now = time.time()
        with contextlib.suppress(FileNotFoundError):
            for path in directory.glob("*.json"):
                if path.stem == exclude:
                    continue
                try:
                    snapshot = msgspec.json.decode(path.read_bytes(), type=_Snapshot)
                except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                    continue
                if now - snapshot.written_at > max_age_s:
                    continue
                result.append(
                    {
                        name: {tuple(key): value for key, value in samples}
                        for name, samples in snapshot.metrics.items()
                    }
                )
        return result


class IngestMetrics:
    """The metrics of one ingest worker."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        p = "falco_gitlab_ingest_"
        self.requests = r.counter(
            p + "requests_total",
            "HTTP requests on the webhook endpoint, by destination and status code.",
            ("destination", "status"),
        )
        self.events_received = r.counter(
            p + "events_received_total", "Events in authenticated, well-formed requests.", ("destination",)
        )
        self.events_published = r.counter(
            p + "events_published_total",
            "Records acknowledged by Kafka, by topic and path (direct: within the request; spool: by the "
            "spool drainer; late: a send that timed out in the request path and completed afterwards).",
            ("topic", "path"),
        )
        self.events_spooled = r.counter(
            p + "events_spooled_total", "Records written to the local spool instead of Kafka.", ("topic",)
        )
        self.duplicates = r.counter(
            p + "duplicates_dropped_total", "Events dropped as duplicate deliveries.", ("destination",)
        )
        self.dead_letters = r.counter(
            p + "dead_letters_total",
            "Bodies sent to the dead-letter topic, by cause.",
            ("destination", "cause"),
        )
        self.spool_full = r.counter(
            p + "spool_full_total", "Requests answered 503 because the spool was full (or failed)."
        )
        self.spool_rejected = r.counter(
            p + "spool_rejected_total", "Spooled records Kafka refused for good (kept in rejected.spool)."
        )
        self.spool_depth = r.gauge(p + "spool_depth", "Records in the spool not yet acknowledged by Kafka.")
        self.spool_bytes = r.gauge(p + "spool_bytes", "Bytes of spool segment files.")
        self.kafka_up = r.gauge(
            p + "kafka_up", "1 when the last exchange with Kafka succeeded, else 0.", merge="min"
        )
        self.publish_latency = r.histogram(
            p + "publish_latency_seconds",
            "Time from handing a request's records to the producer until Kafka acknowledged all of them.",
        )
        self.request_duration = r.histogram(
            p + "request_duration_seconds", "Time to answer a webhook request.", ("status",)
        )
