"""Prometheus metrics of one service instance, in their own registry (names: docs/metrics.md)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from app.api.protocol import REASONS
from app.bundle.format import Bundle

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
# Calibration quantiles that become the anomaly_score buckets: a dashboard reads the live share
# of scores above each and compares it with 1 - q.
SCORE_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999)


def score_buckets(bundle: Bundle, method: str) -> tuple[float, ...]:
    scores = bundle.calibration[method]
    # a quantile needs at least one calibration score above it to mean anything
    edges = np.quantile(scores, [q for q in SCORE_QUANTILES if (1 - q) * scores.size >= 1])
    return tuple(float(e) for e in np.unique(edges))


class ScoreHistogram(Collector):
    """anomaly_score as a histogram filled a whole batch at a time (one searchsorted per request,
    not one Python call per row)."""

    def __init__(self, edges: tuple[float, ...]) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.counts = np.zeros(self.edges.size + 1, dtype=np.int64)  # last: above every edge
        self.total = 0.0
        self.lock = threading.Lock()

    def observe(self, scores: NDArray[np.float64]) -> None:
        # Prometheus buckets are "less than or equal to the edge".
        counts = np.bincount(np.searchsorted(self.edges, scores, side="left"), minlength=self.counts.size)
        with self.lock:
            self.counts += counts
            self.total += float(scores.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self.lock:
            cumulative = np.cumsum(self.counts).tolist()
            total = self.total
        buckets = [(repr(float(e)), c) for e, c in zip(self.edges, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        family = HistogramMetricFamily(
            "anomaly_score", "Scores of the default method; buckets are its calibration quantiles"
        )
        family.add_metric([], buckets, total)
        yield family


class Metrics:
    """Process-wide metrics exist from the start; the model's own appear once it is loaded."""

    def __init__(self) -> None:
        disable_created_metrics()  # *_created series only double the exposition; dashboards never use them
        self.registry = CollectorRegistry()
        r = self.registry
        # The process itself (process_*: resident memory, CPU seconds, open and maximum file descriptors,
        # start time; read from /proc, so Linux only) and the interpreter (python_info, python_gc_*),
        # as the default registry would have them: this registry is the only one /metrics serves.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "anomaly_requests_total",
            "Requests by endpoint and status code (health and metrics excluded)",
            ["endpoint", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "anomaly_request_duration_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rows = Counter(
            "anomaly_rows_scored_total", "Rows scored", ["model", "version", "method"], registry=r
        )
        self.batch_rows = Histogram(
            "anomaly_batch_rows", "Rows per scoring request", buckets=BATCH_BUCKETS, registry=r
        )
        self.flagged = Counter(
            "anomaly_flagged_total",
            "Rows flagged, by threshold and method",
            ["threshold", "method"],
            registry=r,
        )
        self.threshold = Gauge(
            "anomaly_threshold", "Threshold values of the default method", ["threshold"], registry=r
        )
        self.threshold_fpr = Gauge(
            "anomaly_threshold_fpr",
            "Calibrated false-positive rate of each threshold",
            ["threshold"],
            registry=r,
        )
        self.model_info = Gauge(
            "anomaly_model_info", "The model being served (value 1)", ["name", "version"], registry=r
        )
        self.queue_seconds = Histogram(
            "anomaly_coalesce_queue_seconds",
            "Time a request waited to be merged",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.merged_rows = Histogram(
            "anomaly_coalesced_batch_rows", "Rows per merged scoring batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue = Gauge(
            "anomaly_queue_depth", "Scoring requests admitted and not yet answered", registry=r
        )
        self.body_bytes = Gauge(
            "anomaly_request_body_bytes",
            "Bytes of request bodies being read, parsed or scored (limit: ANOMALY_MAX_INFLIGHT_BODY_BYTES)",
            registry=r,
        )
        self.rejections = Counter(
            "anomaly_rejected_total",
            "Scoring requests refused with 503 because the queue was full",
            registry=r,
        )
        self.body_rejections = Counter(
            "anomaly_body_budget_rejected_total",
            "Requests refused with 503 because the bodies in flight would exceed "
            "ANOMALY_MAX_INFLIGHT_BODY_BYTES",
            registry=r,
        )
        self.timeouts = Counter(
            "anomaly_timeouts_total", "Scoring requests that exceeded the time limit", registry=r
        )
        self.refused = Counter(
            "anomaly_http_refused_total",
            "Requests the HTTP layer refused before the app saw them, by status and reason",
            ["code", "reason"],
            registry=r,
        )
        for code, reason in REASONS.items():
            self.refused.labels(str(code), reason)  # at 0 from the start, as the reloads below
        self.reloads = Counter("anomaly_reloads_total", "Model reloads by result", ["result"], registry=r)
        for result in ("success", "failure"):
            # Both series exist at 0 from the start: increase() cannot see a counter's first sample as
            # an increase, so a failure series born at 1 would never fire the ReloadFailed alert.
            self.reloads.labels(result)
        self.score: ScoreHistogram | None = None
        self.default_method = ""
        self.lock = threading.Lock()

    # app.engine.events.Events: what the scheduler and the model host report

    def model_ready(self, bundle: Bundle, method: str) -> None:
        with self.lock:  # a reload and the first load must not interleave their updates
            self._attach_model(bundle, method)

    def reload_finished(self, succeeded: bool) -> None:
        self.reloads.labels("success" if succeeded else "failure").inc()

    def queue_depth(self, admitted: int) -> None:
        self.queue.set(admitted)

    def rejected(self) -> None:
        self.rejections.inc()

    def timed_out(self) -> None:
        self.timeouts.inc()

    def merged(self, rows: int, waited: list[float]) -> None:
        self.merged_rows.observe(rows)
        for seconds in waited:
            self.queue_seconds.observe(seconds)

    def http_refused(self, code: int, reason: str) -> None:
        """app.api.protocol's report of a request it refused itself (its REFUSED callable)."""
        self.refused.labels(str(code), reason).inc()

    def _attach_model(self, bundle: Bundle, method: str) -> None:
        self.model_info.clear()
        self.model_info.labels(bundle.name, bundle.version).set(1)
        self.default_method = method
        self.threshold.clear()
        self.threshold_fpr.clear()
        for fpr in bundle.fprs:
            t = bundle.threshold(method, fpr)
            self.threshold.labels(t.name).set(t.value)
            self.threshold_fpr.labels(t.name).set(fpr)
        if self.score is not None:
            self.registry.unregister(self.score)
        self.score = ScoreHistogram(score_buckets(bundle, method))
        self.registry.register(self.score)

    def observe_scores(
        self, bundle: Bundle, method: str, threshold: str, scores: NDArray[np.float64], flagged: int
    ) -> None:
        self.rows.labels(bundle.name, bundle.version, method).inc(scores.size)
        self.batch_rows.observe(scores.size)
        self.flagged.labels(threshold, method).inc(flagged)
        if method == self.default_method and self.score is not None:
            self.score.observe(scores)
