"""Prometheus metrics, declared once. Triton's names where Triton has one; beside them, the
counters of Triton's statistics extension (``InferenceStatistics``), fed by the same calls.

Labels stay small and fixed: ``model`` and ``version`` (Triton's), plus ``reason`` on
failures. GPU gauges exist only for the GPUs the server runs on: absent, not zero, on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from model_server.traffic import TrafficPolicy

log = logging.getLogger(__name__)

disable_created_metrics()

ML = ("model", "version")


class TritonCounter:
    """A counter exposed under its exact Triton name.

    prometheus_client appends ``_total`` to every counter; Triton's (and so the dashboards'
    and alerts' written for Triton) have none, so these render themselves.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._values: dict[tuple[str, ...], list[float]] = {}
        self._lock = threading.Lock()
        TRITON_COUNTERS.append(self)

    def labels(self, *values: str) -> _CounterChild:
        with self._lock:
            cell = self._values.setdefault(tuple(values), [0.0])
        return _CounterChild(cell, self._lock)

    def remove_prefix(self, *values: str) -> None:
        """Drop every series whose first labels are ``values``."""
        with self._lock:
            for key in [k for k in self._values if k[: len(values)] == values]:
                del self._values[key]

    def value(self, *values: str) -> float:
        return self._values.get(tuple(values), [0.0])[0]

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.documentation}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        for values, (v,) in items:
            labels = ",".join(f'{k}="{_escape(x)}"' for k, x in zip(self.labelnames, values, strict=True))
            lines.append(f"{self.name}{{{labels}}} {floatToGoString(v)}")
        return "\n".join(lines) + "\n"


class _CounterChild:
    __slots__ = ("_cell", "_lock")

    def __init__(self, cell: list[float], lock: threading.Lock):
        self._cell, self._lock = cell, lock

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._cell[0] += amount


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


TRITON_COUNTERS: list[TritonCounter] = []

REQUEST_FAILURE = TritonCounter(
    "nv_inference_request_failure",
    "Number of failed inference requests, all batch sizes",
    (*ML, "reason"),
)
# Triton's reasons, each series at 0 from a version's load on (core's MetricModelReporter); OOM is
# this server's own, on a CUDA out-of-memory error. A request refused as the client's (bad input)
# is no failure of the model's: Triton's validation refuses it before the model's statistics.
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
OOM_ERRORS = Counter("model_server_oom_errors_total", "CUDA out-of-memory errors during inference", (*ML, "path"))
SHADOW_REQUESTS = Counter(
    "shadow_requests_total",
    "Mirrored requests by shadow version and outcome (ok, error, rejected: the client's request, dropped: queue full)",
    (*ML, "outcome"),
)
SHADOW_OUTCOMES = ("ok", "error", "rejected", "dropped")
SHADOW_DROPPED = Counter(
    "shadow_dropped",
    "Mirrored requests dropped, by reason (queue_full, no_idle_time, too_old: a copy that waited past its "
    "age bound, left_service, shutting_down, given_up: a copy from Istio's mirror whose stream ended first)",
    (*ML, "reason"),
)

# Fine around the 60 ms guard so that p95/p99 interpolate within a few ms below 100 ms.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0065,
    0.008,
    0.01,
    0.0125,
    0.015,
    0.0175,
    0.02,
    0.025,
    0.03,
    0.035,
    0.04,
    0.045,
    0.05,
    0.055,
    0.06,
    0.065,
    0.07,
    0.08,
    0.09,
    0.1,
    0.125,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
REQUEST_LATENCY = Histogram(
    "model_server_request_duration_seconds",
    "Inference latency in the server per path (primary: body read to response encoded; shadow: queued copy to outputs)",
    (*ML, "path"),
    buckets=LATENCY_BUCKETS,
)
MODEL_INFO = Gauge(
    "model_server_model_info",
    "1 for each loaded model version, with the execution provider it runs on",
    (*ML, "execution_provider"),
)
OPEN_SESSIONS = Gauge(
    "model_server_open_sessions",
    "ONNX Runtime sessions alive per model, serving or draining in-flight requests",
    ("model",),
)
PENDING_REQUESTS = Gauge(
    "nv_inference_pending_request_count",
    "Instantaneous number of pending requests awaiting execution per-model.",
    ML,
)
MODEL_LOADS = Counter("model_server_model_loads_total", "Model load requests by outcome", ("model", "outcome"))
ROUTED = Counter(
    "model_server_routed_requests_total",
    "Successful inference requests by the version that served and what chose it "
    "(route, a rule, or version: the client named it)",
    ("model", "version", "decided_by"),
)
TRAFFIC_WEIGHT = Gauge("model_server_traffic_weight", "Weight (percent) of each version in the default route", ML)
MIRROR_PERCENT = Gauge("model_server_mirror_percent", "Percent of requests mirrored to the shadow version", ML)
TRAFFIC_FILE_ERRORS = Counter(
    "model_server_traffic_file_errors_total", "Traffic policy file changes that were not applied"
)
HTTP_REQUESTS = Counter("model_server_http_requests_total", "HTTP requests by route and status code", ("route", "code"))
HTTP_REFUSALS = Counter(
    "model_server_http_refusals_total",
    "Requests and connections the HTTP server refused by its limits, by reason (over_limit: 503 past "
    "--max-connections; pipelined: 429 past the requests pipelined unanswered; at_accept: a connection "
    "closed as it was accepted, past twice the limit not admitted; body_budget: 503 to a body past "
    "--max-bodies-mb of bodies being received)",
    ("reason",),
)
for _reason in ("over_limit", "pipelined", "at_accept", "body_budget"):
    HTTP_REFUSALS.labels(_reason)  # (each at 0 from the start: an alert's rate sees the first)
_KEPT = (
    "counted when the prediction log has written all its rows (without a log: when taken); one "
    "the log could not take (its buffer full) or lost at its flush (its tenant's masking key "
    "unusable, its table or file not written: "
    'prediction_log_records_total{outcome="mask_unavailable|error"}; a row of it lost is enough) '
    "is not counted, and may be sent again: counted once written (its rows written before are "
    "repeated; readers keep the earliest)"
)
FEEDBACK = Counter(
    "feedback_total",
    f"Labels of predictions served here, by the version that served them: {_KEPT}",
    ("model", "version"),
)
FEEDBACK_CORRECT = Counter(
    "feedback_correct_total",
    f"Labels of feedback_total that matched the served top-1 prediction: {_KEPT}",
    ("model", "version"),
)
FEEDBACK_UNMATCHED = Counter(
    "feedback_unmatched_total",
    "Labels for a prediction this replica does not hold (unknown: served by another replica, "
    "before a restart or never; expired; evicted: over --feedback-capacity), for the log reader's "
    f"join; not in feedback_total: {_KEPT}",
    ("model", "reason"),
)
PREDICTION_LOG_RECORDS = Counter(
    "prediction_log_records_total",
    "Prediction log rows by outcome (written; dropped: writer backlog full; mask_unavailable: no "
    "usable key for the tenant; error: the write failed)",
    ("outcome",),
)
PREDICTION_LOG_NOT_FINITE = Counter(
    "prediction_log_not_finite_total",
    "Prediction log rows whose output was no finite distribution (NaN or Inf: a client's NaN or "
    "Inf input, or a model's overflow): written without a prediction, left out of the statistics",
)
PREDICTION_LOG_FILES = Counter("prediction_log_files_total", "Prediction log Parquet files written")
PREDICTION_LOG_HELD = Gauge(
    "prediction_log_held_records",
    "Prediction log records the writer holds: appended, not yet written or dropped (a flush in progress included; "
    "at max_pending, records are dropped)",
)
PREDICTION_LOG_FLUSH_SECONDS = Gauge(
    "prediction_log_flush_seconds",
    "Seconds between the prediction log's flushes: a record is in the log this long after it is made, and its write",
)


def forget_version(model: str, version: str) -> None:
    """A version gone from service: the server's own series of it (requests routed to it and by
    what, its latency, its shadow copies) go too, as Triton's do with it (review s53-2: every
    version a server ever served, and every rule name that routed to one, stayed in /metrics)."""
    for metric in (ROUTED, REQUEST_LATENCY, SHADOW_REQUESTS):
        names = metric._labelnames
        for family in metric.collect():
            held = {tuple(s.labels[n] for n in names) for s in family.samples if s.labels.get("version") == version}
            for labels in held:
                if labels[0] == model:
                    with contextlib.suppress(KeyError):  # (a request's gone already)
                        metric.remove(*labels)


def show_traffic_policy(model: str, policy: TrafficPolicy | None) -> None:
    """Set a model's traffic gauges to its policy (None: it has none), dropping the series of
    versions the policy no longer names."""
    for gauge in (TRAFFIC_WEIGHT, MIRROR_PERCENT):
        for family in gauge.collect():
            for sample in family.samples:
                if sample.labels["model"] == model:
                    gauge.remove(model, sample.labels["version"])
    if policy is None:
        return
    for d in policy.route:
        TRAFFIC_WEIGHT.labels(model, d.version).set(d.weight)
    if policy.mirror is not None:
        MIRROR_PERCENT.labels(model, policy.mirror.version).set(policy.mirror.percent)


class NvmlCollector(Collector):
    """GPU gauges read at scrape time (Triton's nv_gpu_* names), one series per GPU."""

    def __init__(self, nvml: Any, handles: list[tuple[str, Any]]):
        self.nvml = nvml
        self.handles = handles

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory (bytes)", labels=["gpu_uuid"])
        total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory (bytes)", labels=["gpu_uuid"])
        util = GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0]", labels=["gpu_uuid"])
        power = GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage (watts)", labels=["gpu_uuid"])
        for uuid, handle in self.handles:
            try:
                mem = self.nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([uuid], float(mem.used))
                total.add_metric([uuid], float(mem.total))
                util.add_metric([uuid], self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                power.add_metric([uuid], self.nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            except self.nvml.NVMLError as exc:  # a GPU that fell off the bus: skip its series
                log.warning("NVML read failed for %s: %s", uuid, exc)
        yield from (used, total, util, power)


def cuda_visible(gpus: list[tuple[str, Any]], setting: str | None) -> list[tuple[str, Any]]:
    """The GPUs of ``gpus`` (NVML's order: every GPU of the machine) that CUDA shows a process
    under ``CUDA_VISIBLE_DEVICES`` = ``setting``: its entries in order, each an index or a UUID's
    prefix, up to the first that names none or names one again (as CUDA reads it); all of them
    when it is unset, none when it is empty."""
    if setting is None:
        return list(gpus)
    shown: list[tuple[str, Any]] = []
    for entry in setting.split(",")[:64]:
        entry = entry.strip()
        if entry.isascii() and entry.isdigit():
            found = [gpus[int(entry)]] if int(entry) < len(gpus) else []
        else:
            found = [g for g in gpus if entry and g[0].startswith(entry)]
        if len(found) != 1 or found[0][0] in {uuid for uuid, _ in shown}:
            break
        shown.append(found[0])
    return shown


def visible_gpus() -> list[tuple[str, Any]]:
    """The GPUs this process's CUDA can run on, as (UUID, NVML handle): NVML sees every GPU of
    the machine, ``CUDA_VISIBLE_DEVICES`` picks among them. None without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            gpus.append((uuid.decode() if isinstance(uuid, bytes) else str(uuid), h))
    except Exception as exc:  # no driver, no library: the normal case on a CPU machine
        log.info("NVML unavailable (%s): no GPU metrics", exc)
        return []
    return cuda_visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))


def gpu_count() -> int:
    """GPUs this process's CUDA can run on (0 without a driver)."""
    return len(visible_gpus())


def export_gpu_gauges(gpus: list[tuple[str, Any]]) -> None:
    """Register the GPU gauges of ``gpus`` (``visible_gpus``) once: a server that runs on them,
    not one on the CPU of a machine that has some (their gauges are another's)."""
    if gpus and not getattr(export_gpu_gauges, "registered", False):
        import pynvml

        REGISTRY.register(NvmlCollector(pynvml, gpus))
        export_gpu_gauges.registered = True  # type: ignore[attr-defined]


class InferenceStatistics:
    """Triton's statistics extension for one model version (``GET /v2/models/{m}/versions/{v}/stats``):
    the same events as Triton's counters above, kept as Triton keeps them (counts, durations in
    nanoseconds, one entry per executed batch size), from the version's load on.

    One object per (model, version), shared by the copies of it a reload keeps or replaces, as
    Triton's reporter is shared by its models of one version, and dropped with its Prometheus
    series when its last copy closes (``forget``), so the two always agree. Requests finish on the event loop and executions on worker
    threads: every update takes the one lock.
    """

    _all: ClassVar[dict[tuple[str, str], InferenceStatistics]] = {}
    _all_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.success = [0, 0]  # count, ns
        self.fail = [0, 0]
        self.queue_ns = 0
        self.compute_ns = [0, 0, 0]  # input, infer, output: per request
        self.batches: dict[int, list[int]] = {}  # batch size -> [executions, input, infer, output ns]

    @classmethod
    def every(cls) -> list[tuple[tuple[str, str], InferenceStatistics]]:
        with cls._all_lock:
            return list(cls._all.items())

    @classmethod
    def of(cls, model: str, version: str) -> InferenceStatistics:
        with cls._all_lock:
            stats = cls._all.get((model, version))
            if stats is None:
                stats = cls._all[(model, version)] = cls()
            return stats

    @classmethod
    def forget(cls, model: str, version: str) -> None:
        """A version out of service, its last copy closed: its statistics and Triton's series
        of it go (as Triton's reporter goes with its last model); a later load starts at zero."""
        with cls._all_lock:
            cls._all.pop((model, version), None)
        REQUEST_FAILURE.remove_prefix(model, version)

    def snapshot(self, model: str, version: str) -> dict[str, Any]:
        """Triton's ``$model_stat`` object."""

        def duration(count: int, ns: int) -> dict[str, int]:
            return {"count": count, "ns": ns}

        with self.lock:
            success, fail = self.success[0], self.fail[0]
            compute = [duration(success, ns) for ns in self.compute_ns]
            batches = [
                {
                    "batch_size": size,
                    "compute_input": duration(n, input_ns),
                    "compute_infer": duration(n, infer_ns),
                    "compute_output": duration(n, output_ns),
                }
                for size, (n, input_ns, infer_ns, output_ns) in sorted(self.batches.items())
            ]
            return {
                "name": model,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": duration(success, self.success[1]),
                    "fail": duration(fail, self.fail[1]),
                    "queue": duration(success, self.queue_ns),
                    "compute_input": compute[0],
                    "compute_infer": compute[1],
                    "compute_output": compute[2],
                    "cache_hit": duration(0, 0),  # no response cache
                    "cache_miss": duration(0, 0),
                },
                "response_stats": {},  # per-response statistics of decoupled models: none here
                "batch_stats": batches,
                "memory_usage": [],
            }


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


# Triton's per-version counters: rendered from each version's InferenceStatistics (one update
# per request, not one per counter); name, help, and the value from a statistics object.
STATISTICS_COUNTERS: tuple[tuple[str, str, Callable[[InferenceStatistics], float]], ...] = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        lambda s: s.success[0],
    ),
    ("nv_inference_count", "Number of inferences performed (a batch of n counts n)", lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed", lambda s: s.execution_count),
    (
        "nv_inference_request_duration_us",
        "Cumulative inference request duration in microseconds",
        lambda s: s.success[1] / 1000,
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative inference queuing duration in microseconds",
        lambda s: s.queue_ns / 1000,
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input duration in microseconds",
        lambda s: s.compute_ns[0] / 1000,
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference duration in microseconds",
        lambda s: s.compute_ns[1] / 1000,
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative inference compute output duration in microseconds",
        lambda s: s.compute_ns[2] / 1000,
    ),
)


def render_statistics_counters() -> str:
    """Triton's per-version counters, from the statistics every version keeps."""
    snapshots = []
    for (model, version), stats in InferenceStatistics.every():
        with stats.lock:
            snapshots.append(((model, version), [value(stats) for _, _, value in STATISTICS_COUNTERS]))
    lines = []
    for i, (name, documentation, _) in enumerate(STATISTICS_COUNTERS):
        lines += [f"# HELP {name} {documentation}", f"# TYPE {name} counter"]
        for (model, version), values in sorted(snapshots):
            lines.append(
                f'{name}{{model="{_escape(model)}",version="{_escape(version)}"}} {floatToGoString(values[i])}'
            )
    return "\n".join(lines) + "\n"


class VersionMetrics:
    """The metric children of one model version on one path, bound once instead of per request.

    The primary path feeds Triton's counters and its statistics extension; the shadow path only
    its own latency histogram and ``shadow_requests_total``, so mirrored copies never count as
    the version's traffic.
    """

    def __init__(self, model: str, version: str, path: str = "primary"):
        self.model, self.version, self.path = model, version, path
        self.latency = REQUEST_LATENCY.labels(model, version, path)
        self.primary = path == "primary"
        self._routed: dict[str, Any] = {}  # how the version was chosen -> its counter child
        if self.primary:
            self.stats = InferenceStatistics()  # its own until the version serves (``bind``)

    def bind(self) -> None:
        """The version serves from this copy: count into its statistics (those a copy it
        replaces has, else new ones) and show them, Triton's failure series with them; its
        series taken again from the registry (review s54-1: the copy it replaces, closing while
        this one warmed up, took the version's series with it, ``forget_version``, and this
        copy's latency went to a child no scrape shows). Never called for a copy a failed load
        made and dropped: it shows no failure series."""
        self.latency = REQUEST_LATENCY.labels(self.model, self.version, self.path)
        self._routed = {}
        if self.primary:
            self.stats = InferenceStatistics.of(self.model, self.version)
            for reason in FAILURE_REASONS:
                REQUEST_FAILURE.labels(self.model, self.version, reason)
        else:
            # Every outcome's series exists at 0 from the version's service on: a counter's first
            # sample in Prometheus is its base, so the errors before a series' first scrape were
            # never counted by increase() (a burst of shadow errors read as none).
            for outcome in SHADOW_OUTCOMES:
                SHADOW_REQUESTS.labels(self.model, self.version, outcome)

    def routed(self, decided_by: str) -> None:
        """One primary request routed here by ``decided_by`` (route, version, header, ...)."""
        child = self._routed.get(decided_by)
        if child is None:
            child = self._routed[decided_by] = ROUTED.labels(self.model, self.version, decided_by)
        child.inc()

    def succeeded(self, batch: int, seconds: float, timing: dict[str, float], output_seconds: float) -> None:
        """One request answered: ``batch`` items in ``seconds``; ``timing`` holds the queue, input
        and infer seconds of the execution it was part of (Triton gives each request of a batched
        execution that execution's compute durations) and its batch size (``executed``).
        ``output_seconds``, the time its outputs took to encode, counts in the request's
        compute_output and in its execution's batch size's: an execution's output time is the
        encoding of all its requests' outputs."""
        self.latency.observe(seconds)
        if not self.primary:
            return
        stats = self.stats
        with stats.lock:
            stats.inference_count += batch
            stats.success[0] += 1
            stats.success[1] += _ns(seconds)
            stats.queue_ns += _ns(timing["queue"])
            compute = stats.compute_ns
            compute[0] += _ns(timing["input"])
            compute[1] += _ns(timing["infer"])
            compute[2] += _ns(output_seconds)
            entry = stats.batches.get(int(timing.get("executed", batch)))
            if entry is not None:  # (counted by ``executed`` as the execution ended)
                entry[3] += _ns(output_seconds)

    def executed(self, batch_size: int, input_s: float, infer_s: float) -> None:
        """One model execution of ``batch_size`` items (however many requests it served): the
        execution count and the batch statistics of that size (its output time is added as its
        requests' outputs are encoded: ``succeeded``). The primary path only."""
        if not self.primary:
            return
        now_ms = int(time.time() * 1000)
        stats = self.stats
        with stats.lock:
            stats.execution_count += 1
            stats.last_inference_ms = max(stats.last_inference_ms, now_ms)
            entry = stats.batches.get(batch_size)
            if entry is None:
                entry = stats.batches[batch_size] = [0, 0, 0, 0]
            entry[0] += 1
            entry[1] += _ns(input_s)
            entry[2] += _ns(infer_s)

    def statistics(self) -> dict[str, Any]:
        """This version's ``$model_stat`` of Triton's statistics extension (the primary path's)."""
        return self.stats.snapshot(self.model, self.version)

    def failure(self, reason: str, seconds: float = 0.0) -> None:
        """One request failed after ``seconds`` (``reason``: ``errors.failure_reason``); one the
        server refused as the client's (INVALID_INPUT) counts in neither, as in Triton."""
        if self.primary and reason != "INVALID_INPUT":
            REQUEST_FAILURE.labels(self.model, self.version, reason).inc()
            stats = self.stats
            with stats.lock:
                stats.fail[0] += 1
                stats.fail[1] += _ns(seconds)
        if reason == "OOM":
            OOM_ERRORS.labels(self.model, self.version, self.path).inc()


def exposition() -> bytes:
    """The /metrics body: Triton's counters, then everything in the default registry."""
    triton = render_statistics_counters() + "".join(c.render() for c in TRITON_COUNTERS)
    return triton.encode() + generate_latest()
