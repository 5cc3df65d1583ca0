"""Metrics sources: what the gate and the sensor read about each arm.

One protocol (Flagger's ``pkg/metrics/providers``): ``query(promql) -> float`` and
``is_online()``, with distinct errors for no data, several series and an offline source.
No data is never a pass: callers hold (wait) on ``NoValuesFound``.

- ``PrometheusSource``: Prometheus' HTTP API, instant and range queries.
- ``ScrapeSource``: reads a model server's ``/metrics`` directly (no Prometheus): instant
  selectors only, summed over matching series.
- ``PromQL``: the queries per model and version, in one place.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from vision_rollout.serving import read_body, redact

T = TypeVar("T")


class MetricsError(Exception):
    """A metrics query could not give one number."""


class NoValuesFound(MetricsError):
    """The query matched nothing (or gave NaN): hold, never pass."""


class MultipleValues(MetricsError):
    """The query gave several series where one number was needed."""


class SourceOffline(MetricsError):
    """The metrics source did not answer."""


class MetricsSource(Protocol):
    """What the gate's guards read: one number per PromQL query (``NoValuesFound`` when there is
    none, ``SourceOffline`` when the source cannot be reached)."""

    def query(self, promql: str) -> float: ...
    def is_online(self) -> bool: ...


MAX_ANSWER = 64 * 2**20  # a query's answer here is one series; a range of a day at 1 s is ~3 MiB


def _get_json(url: str, timeout: float, headers: dict[str, str] | None = None) -> dict[str, Any]:
    where = redact(url.split("?")[0])
    try:
        request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (configured source URL)
        with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310
            raw = read_body(r, MAX_ANSWER, timeout)
    except urllib.error.HTTPError as exc:
        body = exc.read(64 * 1024).decode(errors="replace")
        try:
            message = json.loads(body).get("error", body)
        except (ValueError, AttributeError):
            message = body
        raise MetricsError(f"{where}: HTTP {exc.code}: {str(message)[:1000]}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceOffline(f"{where}: {exc}") from None
    if len(raw) > MAX_ANSWER:
        raise MetricsError(f"{where}: an answer over {MAX_ANSWER} bytes")
    try:
        data = json.loads(raw)
    except ValueError:
        raise MetricsError(f"{where}: the answer is not JSON: {raw[:80]!r}") from None
    if not isinstance(data, dict):
        raise MetricsError(f"{where}: the answer is not a JSON object: {raw[:80]!r}")
    return data


def _shape_checked(method: Callable[..., T]) -> Callable[..., T]:
    """An answer of another shape than Prometheus' API (a proxy's page, a wrong port's JSON)
    is a MetricsError naming the call, not a KeyError or IndexError out of the guards."""

    @functools.wraps(method)
    def checked(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise MetricsError(
                f"prometheus: {method.__name__}: an answer not shaped as Prometheus' API: {type(exc).__name__}: "
                f"{str(exc)[:200]}"
            ) from None

    return checked


@dataclass
class PrometheusSource:
    """Prometheus's HTTP API: instant and range queries, each answer checked to be one series."""

    url: str  # http://host:port
    timeout_s: float = 10.0
    # The Authorization header's value where Prometheus sits behind one (basic or bearer): out of logs.
    authorization: str | None = field(default=None, repr=False)
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)  # this machine's

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": self.authorization} if self.authorization else {}

    def is_online(self) -> bool:
        try:
            ready = urllib.request.Request(f"{self.url}/-/ready", headers=self.headers)  # noqa: S310
            with urllib.request.urlopen(ready, timeout=self.timeout_s) as r:  # noqa: S310
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _api(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        data = _get_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", self.timeout_s, self.headers)
        if data.get("status") == "error":  # its error, as long as an HTTP error's (the stage's reason)
            raise MetricsError(f"prometheus: {str(data.get('errorType'))[:100]}: {str(data.get('error'))[:1000]}")
        if data.get("status") != "success":  # another API's JSON (the model server's port, a proxy's)
            raise MetricsError(
                f"prometheus: {path}: an answer not shaped as Prometheus' API (no status success or error): "
                f"{json.dumps(data)[:80]}"
            )
        return data["data"]

    @_shape_checked
    def query(self, promql: str, at: float | None = None) -> float:
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", params)
        if data["resultType"] == "scalar":
            value = float(data["result"][1])
        else:
            result = data["result"]
            if not result:
                raise NoValuesFound(f"no data for {promql}")
            if len(result) > 1:
                labels = [r["metric"] for r in result[:3]]
                raise MultipleValues(f"{len(result)} series for {promql} (first: {labels}); aggregate it")
            value = float(result[0]["value"][1])
        if math.isnan(value):
            raise NoValuesFound(f"NaN for {promql} (no traffic in the window?)")
        return value

    @_shape_checked
    def clock_offset_s(self) -> float:
        """Prometheus' clock less this machine's (``clock``), from its ``time()``: a range asked
        for on a worker's clock ahead of Prometheus' lies in its future, where no sample is, and
        one behind ends before its last samples. Off by half the query's round trip at most."""
        before = self.clock()
        data = self._api("query", {"query": "time()"})
        after = self.clock()
        if data["resultType"] != "scalar":
            raise MetricsError(f"prometheus: time() answered a {str(data['resultType'])[:40]}, not a scalar")
        return float(data["result"][1]) - (before + after) / 2

    @_shape_checked
    def scrape_interval_s(self) -> float:
        """The longest scrape interval among the model servers' active targets (Prometheus' own
        configuration, as its targets API reports it): a rate needs at least two samples in its
        window, and a window of 4 intervals keeps one missed scrape from emptying it. Other jobs
        (a blackbox probe every 5 minutes) say nothing of the model servers' series; where no job
        is the model servers' (a scrape config of one's own naming it otherwise), every target's
        is taken, the longest (as before). MetricsError without any."""
        targets = (self._api("targets", {"state": "active"}).get("activeTargets") or [])[:10_000]
        timed = [t for t in targets if t.get("scrapeInterval")]
        ours = [t for t in timed if _model_server_target(t)]
        if not timed:
            raise MetricsError("prometheus: no active target reports a scrapeInterval")
        return max(parse_duration(t["scrapeInterval"]) for t in ours or timed)

    @_shape_checked
    def query_range(self, promql: str, start: float, end: float, step_s: float) -> list[tuple[float, float]]:
        data = self._api(
            "query_range", {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        )
        result = data["result"]
        if not result:
            raise NoValuesFound(f"no data for {promql} between {start:.0f} and {end:.0f}")
        if len(result) > 1:
            raise MultipleValues(f"{len(result)} series for {promql}; aggregate it")
        # NaN points (a quantile of no requests in the rate window: 0/0) are no data, not values.
        points = [(float(t), float(v)) for t, v in result[0]["values"] if not math.isnan(float(v))]
        if not points:
            raise NoValuesFound(f"only NaN for {promql} between {start:.0f} and {end:.0f} (no traffic in the window?)")
        return points


# The model servers' scrape job: deploy/prometheus/scrape-config.yaml's job_name (the one-machine
# stacks' too); the PodMonitor of deploy/base/monitoring.yaml, of the same name, gives its targets
# the job <namespace>/model-server and the scrape pool podMonitor/<namespace>/model-server/<n>.
MODEL_SERVER_JOB = "model-server"
POD_MONITOR_POOL_RE = re.compile(rf"podMonitor/[^/]+/{MODEL_SERVER_JOB}/[0-9]+")


def _model_server_target(target: dict[str, Any]) -> bool:
    """Whether a target of Prometheus' targets API is a model server's (by its job or scrape pool)."""
    job = str((target.get("labels") or {}).get("job", ""))
    pool = str(target.get("scrapePool", ""))
    return (
        MODEL_SERVER_JOB in (job, pool)
        or job.endswith(f"/{MODEL_SERVER_JOB}")
        or POD_MONITOR_POOL_RE.fullmatch(pool) is not None
    )


DURATION_RE = re.compile(r"(?:([0-9]{1,9})(ms|s|m|h|d|w|y))")
DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> float:
    """A Prometheus duration ("15s", "1m30s", "500ms") in seconds; MetricsError for anything else."""
    if len(text) > 64 or not re.fullmatch(r"(?:[0-9]{1,9}(?:ms|s|m|h|d|w|y))+", text):
        raise MetricsError(f"prometheus: not a duration: {text[:64]!r}")
    return sum(int(n) * DURATION_UNITS[unit] for n, unit in DURATION_RE.findall(text))


SELECTOR_RE = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*$")
MATCHER_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format 0.0.4 samples with names as written (no ``_total`` munging)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if m is None:
            raise ValueError(f"unparseable exposition line: {line!r}")
        out.append((m.group(1), dict(LABEL_RE.findall(m.group(2) or "")), float(m.group(3))))
    return out


@dataclass
class ScrapeSource:
    """A model server's /metrics, without Prometheus: ``name{label="value",...}``, summed."""

    url: str  # http://host:port of the model server
    timeout_s: float = 10.0

    def is_online(self) -> bool:
        try:
            self._scrape()
        except SourceOffline:
            return False
        return True

    def _scrape(self) -> list[tuple[str, dict[str, str], float]]:
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=self.timeout_s) as r:  # noqa: S310
                return parse_exposition(r.read().decode())
        except (urllib.error.URLError, OSError) as exc:
            raise SourceOffline(f"{self.url}/metrics: {exc}") from None

    def query(self, promql: str) -> float:
        m = SELECTOR_RE.match(promql)
        if m is None:
            raise MetricsError(f'ScrapeSource reads plain selectors like name{{label="v"}}, not {promql!r}')
        name, matchers = m.group(1), dict(MATCHER_RE.findall(m.group(2) or ""))
        values = [
            v for n, labels, v in self._scrape() if n == name and all(labels.get(k) == x for k, x in matchers.items())
        ]
        if not values:
            raise NoValuesFound(f"no sample matches {promql}")
        return float(sum(values))

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """Cumulative (le, count) pairs of a histogram since the server started."""
        found: dict[float, float] = {}
        for n, lab, v in self._scrape():
            if n == f"{name}_bucket" and all(lab.get(k) == x for k, x in labels.items()):
                le = float(lab["le"])
                found[le] = found.get(le, 0.0) + v
        if not found:
            raise NoValuesFound(f"no buckets for {name}{labels}")
        return sorted(found.items())


def quantile_from_buckets(buckets: list[tuple[float, float]], q: float) -> tuple[float, float, float]:
    """Prometheus' ``histogram_quantile``: linear within the bucket holding the quantile.

    Returns (estimate, bucket lower edge, bucket upper edge): the true quantile of the
    observations lies within the bucket, so the error is at most the bucket's width.
    """
    if not buckets or buckets[-1][1] == 0:
        raise NoValuesFound("empty histogram")
    total = buckets[-1][1]
    rank = q * total
    lower_edge, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower_edge, lower_edge, math.inf
            if count == lower_count:
                return le, lower_edge, le
            return (
                lower_edge + (le - lower_edge) * (rank - lower_count) / (count - lower_count),
                lower_edge,
                le,
            )
        lower_edge, lower_count = le, count
    return buckets[-1][0], lower_edge, buckets[-1][0]


def _sel(model: str, version: str, **extra: str) -> str:
    labels = {"model": model, "version": version, **extra}
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


class PromQL:
    """The queries the rollout asks, per model and version (window like "1m").

    Error counters that never fired have no series: their side of a ratio falls back to 0
    (``or vector(0)``), while a missing denominator (no traffic) stays no data.
    """

    @staticmethod
    def latency_quantile_ms(model: str, version: str, q: float, window: str = "1m", path: str = "primary") -> str:
        return (
            f"1000 * histogram_quantile({q}, sum by (le) (rate(model_server_request_duration_seconds_bucket"
            f"{{{_sel(model, version, path=path)}}}[{window}])))"
        )

    @staticmethod
    def loaded(model: str, version: str) -> str:
        """How many scraped model servers report the version loaded (no data: none does)."""
        return f"count(model_server_model_info{{{_sel(model, version)}}})"

    @staticmethod
    def requests(model: str, version: str, window: str = "1m") -> str:
        return f"sum(increase(nv_inference_request_success{{{_sel(model, version)}}}[{window}]))"

    @staticmethod
    def error_rate(model: str, version: str, window: str = "1m") -> str:
        sel = _sel(model, version)
        # Server failures only: a client's own queue timeouts (CANCELED) say nothing of the
        # version. A malformed request is no failure (as in Triton); pods of this server before
        # that change counted it as INVALID_INPUT, left out too while they still serve.
        failures = f'(sum(rate(nv_inference_request_failure{{{sel},reason!~"INVALID_INPUT|CANCELED"}}[{window}])) or vector(0))'
        return f"{failures} / (sum(rate(nv_inference_request_success{{{sel}}}[{window}])) + {failures})"

    @staticmethod
    def oom_rate(model: str, version: str, window: str = "1m") -> str:
        sel = _sel(model, version)
        return (
            f'(sum(rate(model_server_oom_errors_total{{{sel},path="primary"}}[{window}])) or vector(0)) / '
            f"sum(rate(nv_inference_request_success{{{sel}}}[{window}]))"
        )

    @staticmethod
    def live_accuracy(model: str, version: str, window: str = "5m") -> str:
        sel = _sel(model, version)
        return f"sum(increase(feedback_correct_total{{{sel}}}[{window}])) / sum(increase(feedback_total{{{sel}}}[{window}]))"

    @staticmethod
    def shadow_error_rate(model: str, version: str, window: str = "5m") -> str:
        sel = _sel(model, version)
        return (
            f'(sum(rate(shadow_requests_total{{{sel},outcome="error"}}[{window}])) or vector(0)) / '
            f'sum(rate(shadow_requests_total{{{sel},outcome=~"ok|error"}}[{window}]))'
        )

    @staticmethod
    def restarts(model: str, version: str, window: str, lookback: str | None = None) -> str:
        """Restarts in the window of the processes that served the version in it: changes of their
        start time (the client library's ``process_start_time_seconds``), summed over the servers
        reporting the version loaded, pod by pod (a restarted container keeps its pod's address).
        A new pod is a new series, no restart; no data where no such server reports a start time.
        ``lookback`` (a rate window: two scrapes at least): a change counts where its new value's
        sample lies in the window, its old value's up to ``lookback`` before it (a restart in the
        window's first scrape interval had its old value's sample before it, and changes() over
        the window alone saw one value). The servers counted are those reporting the version loaded
        up to ``lookback`` before the window too: a window shorter than a scrape interval (a stage
        just begun) holds no sample of them, and its start alone would read as no data."""
        if lookback is None:
            loaded = f"max_over_time(model_server_model_info{{{_sel(model, version)}}}[{window}])"
            return f"sum(changes(process_start_time_seconds[{window}]) and on(instance) {loaded})"
        span = f"{parse_duration(window) + parse_duration(lookback):g}s"
        loaded = f"max_over_time(model_server_model_info{{{_sel(model, version)}}}[{span}])"
        longer = f"changes(process_start_time_seconds[{span}])"
        before = f"changes(process_start_time_seconds[{lookback}] offset {window})"
        return f"sum((({longer} - {before}) or {longer}) and on(instance) {loaded})"

    @staticmethod
    def gpu_peak(gauge: str, model: str, version: str, window: str) -> str:
        """A GPU gauge's peak over the window, over the GPUs of the servers that serve the version
        (those exporting its inference count), not every GPU the Prometheus sees."""
        return f"max(max_over_time({gauge}[{window}]) and on(instance) nv_inference_count{{{_sel(model, version)}}})"


def wait_for_value(source: MetricsSource, promql: str, timeout_s: float = 30.0, every_s: float = 0.5) -> float:
    """Poll until the query gives a number (tests and the local stack's first scrapes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return source.query(promql)
        except NoValuesFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(every_s)
