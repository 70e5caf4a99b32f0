"""Prometheus metrics without a dependency: counters, gauges and histograms rendered in the text format.

The text exposition format (version 0.0.4) is small enough to write by hand: per metric a ``# HELP`` and a
``# TYPE`` line, then one ``name{label="value",...} number`` sample per line; a histogram ``h`` writes the
cumulative ``h_bucket{le="..."}`` samples (the last one ``le="+Inf"``), ``h_sum`` and ``h_count``.  Every
metric is thread-safe (the batch worker thread and the event loop both record).

:class:`ServeMetrics` holds what ``redrec serve`` exposes at ``GET /metrics`` (units in the names: seconds,
items, requests).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: request latency buckets, seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: batch size buckets, requests per batch
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}",
                f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down per label set; or, unlabelled, read from a function at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = (), fn: Callable[[], float] | None = None):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._fn = fn

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def value(self, **labels: str) -> float:
        if self._fn is not None:
            return float(self._fn())
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        if self._fn is not None:
            items = [((), float(self._fn()))]
        else:
            with self._lock:
                items = sorted(self._values.items())
            if not items and not self.labelnames:
                items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_number(v)}" for k, v in items]


class Histogram(_Metric):
    """Observations counted in cumulative ``le`` buckets (upper bounds, in the metric's unit), plus sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float], labelnames: Sequence[str] = ()):
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if not self.buckets:
            raise ValueError("a histogram needs at least one bucket")
        self._values: dict[tuple[str, ...], list[float]] = {}  # per label set: bucket counts..., sum, count

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        v = float(value)
        with self._lock:
            row = self._values.get(key)
            if row is None:
                row = self._values[key] = [0.0] * (len(self.buckets) + 2)
            for i, b in enumerate(self.buckets):
                if v <= b:
                    row[i] += 1
                    break
            row[-2] += v
            row[-1] += 1

    def count(self, **labels: str) -> float:
        with self._lock:
            row = self._values.get(self._key(labels))
            return row[-1] if row else 0.0

    def total(self, **labels: str) -> float:
        """Sum of the observations."""
        with self._lock:
            row = self._values.get(self._key(labels))
            return row[-2] if row else 0.0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._values.items())
        if not items and not self.labelnames:
            items = [((), [0.0] * (len(self.buckets) + 2))]
        out = self.header()
        for key, row in items:
            cum = 0.0
            for b, c in zip(self.buckets, row, strict=False):
                cum += c
                le = 'le="' + _number(b) + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_number(cum)}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.labelnames, key, inf)} {_number(row[-1])}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_number(row[-2])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {_number(row[-1])}")
        return out


class Registry:
    """An ordered collection of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


class ServeMetrics:
    """The metrics of ``redrec serve``.

    Attributes:
        requests: ``redrec_requests_total{endpoint, status}`` HTTP requests answered.
        latency: ``redrec_request_duration_seconds{endpoint}`` time from the request's arrival to its response.
        batch_size: ``redrec_batch_size`` requests per micro-batch (one user-tower forward each).
        queue_wait: ``redrec_queue_wait_seconds`` time a request waited before its batch started.
        user_tower: ``redrec_user_tower_seconds`` time per batch building inputs and running the user tower.
        index_search: ``redrec_index_seconds`` time per batch searching the candidate pools (FAISS index or exact
            engine) and scoring the winners' interests.
        history_fetch: ``redrec_history_fetch_seconds`` time per batch reading stored histories.
        queue_depth: ``redrec_queue_depth`` requests waiting for a batch (read from the batcher at scrape time).
        inflight: ``redrec_inflight_requests`` requests being handled.
        rejected: ``redrec_rejected_total{reason}`` requests refused by the batcher (``queue_full``, ``shutting_down``).
        index_items: ``redrec_index_items{pool}`` items searchable per pool (``all`` and each scenario).
        events: ``redrec_events_appended_total`` events written to the history store.
        reloads: ``redrec_reloads_total{result}`` hot reloads (``ok`` / ``error``).
        model_info: ``redrec_model_info{model_version, retrieval}`` 1 for the model being served.
    """

    def __init__(self, queue_depth: Callable[[], float] | None = None):
        r = self.registry = Registry()
        self.requests = r.add(Counter("redrec_requests_total", "HTTP requests answered, by endpoint and status code.",
                                      ("endpoint", "status")))
        self.latency = r.add(Histogram("redrec_request_duration_seconds", "Request latency in seconds, by endpoint.",
                                       LATENCY_BUCKETS, ("endpoint",)))
        self.batch_size = r.add(Histogram("redrec_batch_size", "Requests per micro-batch (one user-tower forward).",
                                          BATCH_BUCKETS))
        self.queue_wait = r.add(Histogram("redrec_queue_wait_seconds", "Seconds a request waited for its batch to start.",
                                          LATENCY_BUCKETS))
        self.user_tower = r.add(Histogram("redrec_user_tower_seconds", "Seconds per batch building inputs and running "
                                          "the user tower.", LATENCY_BUCKETS))
        self.index_search = r.add(Histogram("redrec_index_seconds", "Seconds per batch searching the candidate pools "
                                            "(FAISS index or exact engine).", LATENCY_BUCKETS))
        self.history_fetch = r.add(Histogram("redrec_history_fetch_seconds", "Seconds per batch reading stored "
                                             "histories.", LATENCY_BUCKETS))
        self.queue_depth = r.add(Gauge("redrec_queue_depth", "Requests waiting for a micro-batch.",
                                       fn=queue_depth or (lambda: 0.0)))
        self.inflight = r.add(Gauge("redrec_inflight_requests", "Requests being handled."))
        self.rejected = r.add(Counter("redrec_rejected_total", "Requests refused by the batcher, by reason.", ("reason",)))
        self.index_items = r.add(Gauge("redrec_index_items", "Searchable items per candidate pool.", ("pool",)))
        self.events = r.add(Counter("redrec_events_appended_total", "Events appended to the history store."))
        self.reloads = r.add(Counter("redrec_reloads_total", "Hot reloads, by result.", ("result",)))
        self.model_info = r.add(Gauge("redrec_model_info", "1 for the model being served.", ("model_version", "retrieval")))

    def render(self) -> str:
        return self.registry.render()
