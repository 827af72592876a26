"""Every Prometheus metric gansentry exports, in one place, so the API, the workers, the
Grafana dashboard and the alert rules agree on names and labels.

Scores differ in scale between models, so the drift histogram records score / threshold:
1.0 is the decision boundary for every model.

Under `gansentry serve --processes N` prometheus-client keeps every counter, histogram and
gauge in the multiprocess files (`PROMETHEUS_MULTIPROC_DIR`) and `/metrics` reports their
sum over the processes (`exposition()`); each gauge says how its processes' values
combine (`multiprocess_mode`, ignored in one process)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector


class _KeptChildren:
    """`labels(...)` answered from a dict once a label set has been seen. prometheus-client
    converts and checks the values and takes a lock on every call, and a scoring request
    makes several such calls with the same few label sets. `remove` and `clear` (rare:
    reloads) empty the dict, so it never holds a child the metric no longer exports."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kept: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str, **by_name: str) -> Any:
        if by_name:
            return super().labels(*values, **by_name)  # type: ignore[misc]
        child = self._kept.get(values)
        if child is None:
            child = self._kept[values] = super().labels(*values)  # type: ignore[misc]
        return child

    def remove(self, *values: str) -> None:
        self._kept.clear()
        super().remove(*values)  # type: ignore[misc]

    def clear(self) -> None:
        self._kept.clear()
        super().clear()  # type: ignore[misc]


class Counter(_KeptChildren, prometheus_client.Counter):
    pass


class Gauge(_KeptChildren, prometheus_client.Gauge):
    pass


class Histogram(_KeptChildren, prometheus_client.Histogram):
    pass


LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RATIO_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)

# --- API: requests
REQUESTS = Counter(
    "gansentry_requests_total", "Scoring requests by model and HTTP status", ["model", "status"]
)
REQUEST_LATENCY = Histogram(
    "gansentry_request_duration_seconds",
    "End-to-end latency of scoring requests",
    ["model", "status"],
    buckets=LATENCY_BUCKETS,
)
INPUTS = Counter("gansentry_inputs_total", "Inputs scored", ["model"])
IN_FLIGHT = Gauge(
    "gansentry_requests_in_flight", "Scoring requests being handled", multiprocess_mode="livesum"
)

# --- batching (embedded batcher in the API, or a worker)
BATCH_SIZE = Histogram(
    "gansentry_batch_size", "Items per ONNX Runtime call", ["model"], buckets=BATCH_BUCKETS
)
QUEUE_WAIT = Histogram(
    "gansentry_queue_wait_seconds",
    "Time from a request's arrival in the queue to the start of its batch",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_LATENCY = Histogram(
    "gansentry_inference_duration_seconds",
    "ONNX Runtime time per batch",
    ["model", "provider"],
    buckets=LATENCY_BUCKETS,
)
# Through Redis every process reads the same stream, so the processes' values are one value
# (max); embedded, each process has its own queue, and the deepest one is reported.
QUEUE_DEPTH = Gauge(
    "gansentry_queue_depth", "Items waiting to be batched", ["model"], multiprocess_mode="livemax"
)
QUEUE_PENDING = Gauge(
    "gansentry_queue_pending",
    "Redis entries delivered to a worker and not yet acked",
    ["model"],
    multiprocess_mode="livemax",
)
REJECTED = Counter(
    "gansentry_rejected_total", "Requests refused before inference", ["model", "reason"]
)

# --- model outputs, for drift
SCORE_RATIO = Histogram(
    "gansentry_score_ratio",
    "Anomaly score divided by the model's threshold (above 1 = anomaly)",
    ["model"],
    buckets=RATIO_BUCKETS,
)
NONFINITE_SCORES = Counter(
    "gansentry_nonfinite_scores_total",
    "Inputs whose score (or reconstruction) came out NaN or Inf: refused with 422, never "
    "answered as normal",
    ["model"],
)
ANOMALIES = Counter("gansentry_anomalies_total", "Inputs flagged as anomalies", ["model"])
UNEXPECTED_VALUES = Counter(
    "gansentry_unexpected_values_total",
    "Record values the model does not know, refused or flagged by its unknown_policy "
    "(kind: unknown_category, wrong_type, out_of_range)",
    ["model", "field", "kind"],
)


class ModelInfo(Collector):
    """`gansentry_model_info`, answered from this process's list of loaded versions rather
    than kept in a gauge: a version reloaded away must vanish from /metrics, which a
    gauge's multiprocess file cannot do, and every serving process loads the same
    repository, so the process that answers /metrics speaks for all."""

    LABELS = ("model", "version", "architecture", "provider")

    def __init__(self) -> None:
        self._series: list[tuple[str, str, str, str]] = []

    def set(self, series: Iterable[tuple[str, str, str, str]]) -> None:
        self._series = list(series)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gansentry_model_info",
            "1 for each loaded model version, with what serves it",
            labels=self.LABELS,
        )
        for labels in self._series:
            family.add_metric(labels, 1)
        yield family


MODEL_INFO = ModelInfo()
prometheus_client.REGISTRY.register(MODEL_INFO)

# --- workers (Redis mode)
WORKERS_ALIVE = Gauge(
    "gansentry_workers_alive", "Workers with a live heartbeat in Redis", multiprocess_mode="livemax"
)
WORKER_HEARTBEAT = Gauge(
    "gansentry_worker_heartbeat_timestamp_seconds",
    "Unix time of this worker's last heartbeat",
    multiprocess_mode="max",
)
RECLAIMED = Counter(
    "gansentry_reclaimed_total", "Queue entries taken over from a dead or stuck worker", ["model"]
)
WORKER_ERRORS = Counter(
    "gansentry_worker_errors_total", "Worker failures by kind", ["model", "kind"]
)
EXPIRED = Counter(
    "gansentry_expired_total", "Requests dropped because their deadline had passed", ["model"]
)
DUPLICATES = Counter(
    "gansentry_duplicates_skipped_total",
    "Redelivered entries whose answer had already been delivered (acked, not recomputed)",
    ["model"],
)


def exposition() -> bytes:
    """The /metrics body: this process's metrics, or under several serving processes the
    sum of all of theirs (read from the multiprocess files at each scrape, as
    prometheus-client prescribes)."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return prometheus_client.generate_latest()
    registry = prometheus_client.CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(MODEL_INFO)
    return prometheus_client.generate_latest(registry)
