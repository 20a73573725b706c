"""Per-task serving metrics, counted in plain Python; model.py publishes them on Triton's metrics endpoint.

Every metric call of Triton's python backend is one IPC round trip to the server process that holds the GIL
(50-70 us measured with Triton 2.51, several times that on a loaded machine), and its histograms observe one
value per call. So `execute` only queues each task's arg-max and top probability here, and a `Flusher`
thread, every few seconds, buckets all that was queued at once and sends one increment per series that
changed: never one per row. For the same reason the two histograms are published as their Prometheus parts
(cumulative `_bucket{le}`, `_sum` and `_count` counters), which `histogram_quantile` reads like any histogram.

Nothing here imports Triton: tests drive it with their own `send`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .text import EMPTY_TEXT as EMPTY_TEXT_PROBLEM

# Upper bounds of the top-probability histogram: the arg-max probability of K labels is at least 1/K,
# and the interesting movement of a calibrated classifier is between 0.9 and 1.
TOP_PROBABILITY_BUCKETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# Why a request was refused, from decode_texts' errors (docs/metrics.md).
EMPTY_TEXT, INVALID_UTF8, OTHER = "empty_text", "invalid_utf8", "other"
REJECTION_REASONS = (EMPTY_TEXT, INVALID_UTF8, OTHER)
# Set MTL_METRICS=off in Triton's environment to publish nothing (the benchmark's baseline).
ENV_SWITCH = "MTL_METRICS"
# Seconds between flushes (MTL_METRICS_FLUSH_S overrides): each changed series costs one GIL-holding round trip,
# and a flush changes ~50 series whatever the traffic; Prometheus scrapes every 15 s anyway.
ENV_FLUSH_INTERVAL = "MTL_METRICS_FLUSH_S"
FLUSH_INTERVAL_S = 5.0
# Requests with this id are answered but not counted: a health probe (mtl-serve's watchdog canary) is not traffic.
UNCOUNTED_REQUEST_ID = "mtl-serve-canary"
# Rows record_batch may queue before it counts them itself (a flusher that stopped draining); ~2 MB per task.
MAX_QUEUED_ROWS = 262_144


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "counter" | "gauge"
    description: str


PREDICTIONS = Family("mtl_predictions_total", "counter", "Rows scored, by task and predicted (arg-max) label")
TOP_PROBABILITY_BUCKET = Family(
    "mtl_top_probability_bucket",
    "counter",
    "Rows whose top calibrated probability is <= le, by task (histogram buckets)",
)
TOP_PROBABILITY_SUM = Family("mtl_top_probability_sum", "counter", "Sum of the top calibrated probability, by task")
TOP_PROBABILITY_COUNT = Family("mtl_top_probability_count", "counter", "Rows in the top-probability histogram, by task")
TRUNCATED_ROWS = Family("mtl_truncated_rows_total", "counter", "Rows cut to the token budget (TRUNCATED=true)")
REQUEST_ROWS_BUCKET = Family(
    "mtl_request_rows_bucket", "counter", "Accepted requests with at most le rows (histogram buckets)"
)
REQUEST_ROWS_SUM = Family("mtl_request_rows_sum", "counter", "Rows in accepted requests")
REQUEST_ROWS_COUNT = Family("mtl_request_rows_count", "counter", "Accepted requests")
REJECTED_REQUESTS = Family(
    "mtl_rejected_requests_total", "counter", "Requests refused with INVALID_ARG by the model, by reason"
)
FAILED_REQUESTS = Family(
    "mtl_failed_requests_total", "counter", "Accepted requests answered INTERNAL because inference failed"
)
EXPECTED_LABEL_SHARE = Family(
    "mtl_expected_label_share", "gauge", "Share of each predicted label on the validation split (metrics.json)"
)
EXPECTED_TOP_PROBABILITY_MEDIAN = Family(
    "mtl_expected_top_probability_median",
    "gauge",
    "Median top calibrated probability on the validation split (metrics.json)",
)
FAMILIES = (
    PREDICTIONS,
    TOP_PROBABILITY_BUCKET,
    TOP_PROBABILITY_SUM,
    TOP_PROBABILITY_COUNT,
    TRUNCATED_ROWS,
    REQUEST_ROWS_BUCKET,
    REQUEST_ROWS_SUM,
    REQUEST_ROWS_COUNT,
    REJECTED_REQUESTS,
    FAILED_REQUESTS,
    EXPECTED_LABEL_SHARE,
    EXPECTED_TOP_PROBABILITY_MEDIAN,
)


@dataclass(frozen=True)
class Series:
    family: Family
    labels: tuple[tuple[str, str], ...]

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


def enabled(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def flush_interval(environ: Mapping[str, str]) -> float:
    try:
        value = float(environ.get(ENV_FLUSH_INTERVAL, FLUSH_INTERVAL_S))
    except ValueError:
        return FLUSH_INTERVAL_S
    return value if 0.05 <= value <= 3600 else FLUSH_INTERVAL_S


def le_label(bound: float) -> str:
    """Prometheus' spelling of a bucket bound: 0.95, 1, 64, +Inf."""
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


def request_rows_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to the largest request the model accepts, which is always a bound itself."""
    bounds, bound = [], 1
    while bound < max_batch_size:
        bounds.append(bound)
        bound *= 2
    return (*bounds, max(1, max_batch_size))


def rejection_reason(exc: Exception) -> str:
    """The reason label of a request that decode_texts refused (a RowError has `.problem`)."""
    problem = getattr(exc, "problem", None)
    if problem is None:
        return OTHER
    if problem == EMPTY_TEXT_PROBLEM:
        return EMPTY_TEXT
    if problem.startswith("invalid UTF-8"):  # text.py words it "invalid UTF-8 at byte N"; tests pin that
        return INVALID_UTF8
    return OTHER


class ServingMetrics:
    """Counts since the last `drain`, for every counter series of one model, in one float64 vector.

    `tasks` is [(task, labels)]; `constant_labels` (model, version) go on every series, so that the series
    join Triton's own nv_inference_* ones. `record_batch` (in execute) keeps each task's arg-max and top
    probability and queues them; `drain` (in the flusher's thread) buckets everything queued at once.
    Thread-safe: execute records, the flusher drains.
    """

    def __init__(
        self, tasks: Sequence[tuple[str, Sequence[str]]], max_batch_size: int, constant_labels: Mapping[str, str]
    ):
        self.tasks = [(name, tuple(labels)) for name, labels in tasks]
        self.constant = tuple(sorted(constant_labels.items()))
        self.rows_bounds = np.array(request_rows_buckets(max_batch_size), dtype=np.float64)
        self.top_bounds = np.array(TOP_PROBABILITY_BUCKETS, dtype=np.float64)
        self._series: list[Series] = []
        # Slot layout, in the order below, so that one bincount fills each block for every task at once.
        self._labels = self._block(
            PREDICTIONS, [{"task": n, "label": label} for n, labels in self.tasks for label in labels]
        )
        self._label_offsets = np.cumsum([0] + [len(labels) for _, labels in self.tasks[:-1]])
        top_bounds = (*TOP_PROBABILITY_BUCKETS, math.inf)
        self._top = self._block(
            TOP_PROBABILITY_BUCKET, [{"task": n, "le": le_label(b)} for n, _ in self.tasks for b in top_bounds]
        )
        self._top_sum = self._block(TOP_PROBABILITY_SUM, [{"task": n} for n, _ in self.tasks])
        self._top_count = self._block(TOP_PROBABILITY_COUNT, [{"task": n} for n, _ in self.tasks])
        self._truncated = self._block(TRUNCATED_ROWS, [{}])
        self._rows = self._block(
            REQUEST_ROWS_BUCKET, [{"le": le_label(b)} for b in (*self.rows_bounds.tolist(), math.inf)]
        )
        self._rows_sum = self._block(REQUEST_ROWS_SUM, [{}])
        self._rows_count = self._block(REQUEST_ROWS_COUNT, [{}])
        rejected = self._block(REJECTED_REQUESTS, [{"reason": r} for r in REJECTION_REASONS])
        self._rejected = {reason: rejected.start + i for i, reason in enumerate(REJECTION_REASONS)}
        self._failed = self._block(FAILED_REQUESTS, [{}]).start
        self._lock = threading.Lock()
        self._pending = np.zeros(len(self._series), dtype=np.float64)
        self._queue: list[tuple[list[np.ndarray], list[np.ndarray], np.ndarray, list[int]]] = []
        self._queued_rows = 0

    def _block(self, family: Family, label_sets: list[dict[str, str]]) -> slice:
        start = len(self._series)
        for labels in label_sets:
            self._series.append(Series(family, tuple(sorted({**dict(self.constant), **labels}.items()))))
        return slice(start, len(self._series))

    def series(self) -> list[Series]:
        """Every counter series, in slot order: model.py creates each one up front, so all show 0 at start."""
        return list(self._series)

    def record_batch(
        self,
        probabilities: Mapping[str, np.ndarray],
        truncated: np.ndarray,
        rows_per_request: Sequence[int],
        counted: Sequence[bool] | None = None,
    ) -> None:
        """One execute's accepted rows: probabilities [rows, labels] per task, truncation flags, request sizes;
        `counted` (one flag per request) leaves out the rows of requests that are not traffic."""
        sizes = list(rows_per_request)
        truncated = np.asarray(truncated, dtype=bool).reshape(-1)
        if counted is not None and not all(counted):
            keep = np.repeat(np.asarray(counted, dtype=bool), np.asarray(sizes, dtype=np.int64))
            probabilities = {name: np.asarray(probs)[keep] for name, probs in probabilities.items()}
            truncated = truncated[keep]
            sizes = [size for size, flag in zip(sizes, counted, strict=True) if flag]
        if not sizes:
            return
        # The only per-execute work: two reductions per task; the arrays kept are new, whatever the runtime reuses.
        arrays = [np.asarray(probabilities[name]) for name, _ in self.tasks]
        best = [probs.argmax(axis=1) for probs in arrays]
        rows = np.arange(len(truncated))
        top = [probs[rows, picked] for probs, picked in zip(arrays, best, strict=True)]  # cheaper than max(axis=1)
        with self._lock:
            self._queue.append((best, top, truncated, sizes))
            self._queued_rows += len(truncated)
            spill = self._queued_rows >= MAX_QUEUED_ROWS
        if spill:  # nothing drained for a long while: count now rather than hold more
            self._count_queued()

    def _count_queued(self) -> None:
        with self._lock:
            queue, self._queue, self._queued_rows = self._queue, [], 0
        if not queue:
            return
        update = np.zeros_like(self._pending)
        tasks = len(self.tasks)
        rows = sum(len(entry[2]) for entry in queue)
        best = np.concatenate([entry[0][t] + offset for entry in queue for t, offset in enumerate(self._label_offsets)])
        update[self._labels] = np.bincount(best, minlength=self._labels.stop - self._labels.start)
        # [tasks, rows]: a NaN counts as no confidence and never poisons the sum; float32 rounding may pass 1.
        top = np.stack([np.concatenate([entry[1][t] for entry in queue]) for t in range(tasks)]).astype(np.float64)
        top = np.minimum(np.fmax(top, 0.0), 1.0)
        buckets = len(self.top_bounds) + 1
        index = np.searchsorted(self.top_bounds, top, side="left") + (np.arange(tasks) * buckets)[:, None]
        per_bucket = np.bincount(index.ravel(), minlength=tasks * buckets).reshape(tasks, buckets)
        update[self._top] = per_bucket.cumsum(axis=1).ravel()
        update[self._top_sum] = top.sum(axis=1)
        update[self._top_count] = rows
        update[self._truncated] = sum(int(np.count_nonzero(entry[2])) for entry in queue)
        sizes = np.array([size for entry in queue for size in entry[3]], dtype=np.float64)
        update[self._rows] = np.bincount(
            np.searchsorted(self.rows_bounds, sizes, side="left"), minlength=len(self.rows_bounds) + 1
        ).cumsum()
        update[self._rows_sum] = sizes.sum()
        update[self._rows_count] = len(sizes)
        with self._lock:
            self._pending += update

    def record_rejection(self, reason: str) -> None:
        with self._lock:
            self._pending[self._rejected.get(reason, self._rejected[OTHER])] += 1

    def record_failure(self, requests: int) -> None:
        with self._lock:
            self._pending[self._failed] += requests

    def drain(self) -> list[tuple[Series, float]]:
        """The non-zero counts since the last drain, and reset them. Never a negative or non-finite one:
        Triton 2.51 aborts the whole server on a negative counter increment."""
        self._count_queued()
        with self._lock:
            pending, self._pending = self._pending, np.zeros_like(self._pending)
        changed = np.flatnonzero((pending > 0) & np.isfinite(pending))
        return [(self._series[i], float(pending[i])) for i in changed]


class DisabledMetrics:
    """Same calls as ServingMetrics, counting nothing (MTL_METRICS=off)."""

    def series(self) -> list[Series]:
        return []

    def record_batch(self, probabilities, truncated, rows_per_request, counted=None) -> None:
        pass

    def record_rejection(self, reason: str) -> None:
        pass

    def record_failure(self, requests: int) -> None:
        pass

    def drain(self) -> list[tuple[Series, float]]:
        return []


def expected_gauges_in(
    folder: Path, tasks: Sequence[tuple[str, Sequence[str]]], constant_labels: Mapping[str, str]
) -> tuple[list[tuple[Series, float]], list[str]]:
    """expected_gauges of the version folder's metrics.json; a missing or unreadable file is one problem."""
    try:
        recorded = json.loads((Path(folder) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [], [f"metrics.json ({exc})"]
    return expected_gauges(recorded if isinstance(recorded, dict) else {}, tasks, constant_labels)


def expected_gauges(
    metrics_json: Mapping, tasks: Sequence[tuple[str, Sequence[str]]], constant_labels: Mapping[str, str]
) -> tuple[list[tuple[Series, float]], list[str]]:
    """Gauges from the build's metrics.json: ([(series, value)], [what was missing])."""
    constant = dict(constant_labels)
    gauges, missing = [], []
    shares = metrics_json.get("expected_label_share") or {}
    validation = (metrics_json.get("validation") or {}).get("tasks") or {}
    for name, labels in tasks:
        task_shares = shares.get(name)
        if task_shares is None:
            missing.append(f"expected_label_share.{name}")
        else:
            for label in labels:
                value = task_shares.get(label, 0.0)
                gauges.append(
                    (
                        Series(EXPECTED_LABEL_SHARE, tuple(sorted({**constant, "task": name, "label": label}.items()))),
                        float(value),
                    )
                )
        median = median_from_bins((validation.get(name) or {}).get("reliability") or [])
        if median is None:
            missing.append(f"validation.tasks.{name}.reliability")
        else:
            gauges.append(
                (Series(EXPECTED_TOP_PROBABILITY_MEDIAN, tuple(sorted({**constant, "task": name}.items()))), median)
            )
    return gauges, missing


def median_from_bins(bins: Iterable[Mapping]) -> float | None:
    """The median confidence of reliability bins ({low, high, rows}), interpolated inside its bin the way
    Prometheus' histogram_quantile interpolates inside a bucket, so live and expected medians compare."""
    usable = sorted(
        (float(b["low"]), float(b["high"]), int(b.get("rows") or 0)) for b in bins if "low" in b and "high" in b
    )
    total = sum(rows for _, _, rows in usable)
    if total == 0:
        return None
    target, seen = total / 2.0, 0
    for low, high, rows in usable:
        if rows and seen + rows >= target:
            return round(low + (high - low) * (target - seen) / rows, 4)
        seen += rows
    return round(usable[-1][1], 4)


class Flusher:
    """Sends what a ServingMetrics counted to `send(series, delta)` every `interval_s`, from its own thread.

    A failed send is reported to `on_error` and dropped. `stop()` sends what is left.
    """

    def __init__(
        self,
        metrics: ServingMetrics | DisabledMetrics,
        send: Callable[[Series, float], None],
        interval_s: float = FLUSH_INTERVAL_S,
        on_error: Callable[[str], None] | None = None,
    ):
        self.metrics, self.send, self.interval_s, self.on_error = metrics, send, interval_s, on_error
        self.flushes = self.sends = 0
        self.send_seconds = 0.0
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mtl-metrics-flusher", daemon=True)

    def start(self) -> Flusher:
        self._thread.start()
        return self

    def flush(self) -> int:
        """Send every pending delta now; return how many sends that took."""
        with self._flush_lock:
            deltas = self.metrics.drain()
            for series, delta in deltas:
                started = time.perf_counter()
                try:
                    self.send(series, delta)
                except Exception as exc:  # one refused update must not stop the others
                    if self.on_error is not None:
                        self.on_error(f"metric {series.family.name}{series.label_dict} +{delta}: {exc!r}")
                self.send_seconds += time.perf_counter() - started
                time.sleep(0)  # hand the GIL back: the stub's metric calls hold it for their whole round trip
            if deltas:
                self.flushes += 1
                self.sends += len(deltas)
            return len(deltas)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10 * self.interval_s + 5)
        self.flush()

    def describe(self) -> str:
        per_send = self.send_seconds / self.sends * 1e6 if self.sends else 0.0
        return (
            f"{self.flushes} flushes, {self.sends} metric updates, {self.send_seconds * 1e3:.1f} ms sending "
            f"({per_send:.0f} us per update)"
        )
