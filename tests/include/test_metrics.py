"""Metrics sources: a real Prometheus scraping a real model server, the scrape source, PromQL."""

from __future__ import annotations

import math
import shutil
import time

import pytest
import requests

from devstack.loadgen import LoadConfig, run
from devstack.processes import start_prometheus
from tests.support import POLL_INTERVAL_S, TOKEN, mirroring, put_policy
from vision_rollout.metrics import (
    MetricsError,
    MultipleValues,
    NoValuesFound,
    PrometheusSource,
    PromQL,
    ScrapeSource,
    SourceOffline,
    parse_duration,
    quantile_from_buckets,
    wait_for_value,
)


def test_quantile_from_buckets_interpolates_like_prometheus():
    buckets = [(0.005, 10.0), (0.01, 50.0), (0.02, 90.0), (0.05, 100.0), (math.inf, 100.0)]
    est, lo, hi = quantile_from_buckets(buckets, 0.5)
    assert (lo, hi) == (0.005, 0.01)
    assert est == pytest.approx(0.005 + 0.005 * (50 - 10) / 40)
    est, lo, hi = quantile_from_buckets(buckets, 0.99)
    assert (lo, hi) == (0.02, 0.05)
    assert lo <= est <= hi
    with pytest.raises(NoValuesFound):
        quantile_from_buckets([(math.inf, 0.0)], 0.5)


def test_offline_sources_say_so():
    dead = PrometheusSource("http://127.0.0.1:9", timeout_s=1)
    assert not dead.is_online()
    with pytest.raises(SourceOffline):
        dead.query("up")
    with pytest.raises(SourceOffline):
        ScrapeSource("http://127.0.0.1:9", timeout_s=1).query("up")


def test_prometheus_durations():
    assert [parse_duration(d) for d in ("15s", "1m30s", "500ms", "2h", "1d")] == [15, 90, 0.5, 7200, 86400]
    for bad in ("15", "s", "1.5s", "-1s", "1m 30s", "9" * 70 + "s"):
        with pytest.raises(MetricsError, match="not a duration"):
            parse_duration(bad)


@pytest.mark.integration
def test_guards_read_windows_from_the_scrape_interval_and_hold_without_data(server_factory, repo_copy, tmp_path):
    """At a realistic 15 s scrape interval the P99 guard's rate(...[30s]) held at most two samples:
    one missed scrape and it returned nothing, and the guard was dropped without a word. Its window
    is now 4 intervals (60 s here), and a guard with no data holds the stage."""
    from vision_rollout.engine import guard_inputs, rate_window_s
    from vision_rollout.spec import RolloutSpec

    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    prom = start_prometheus([s.url], tmp_path / "prometheus", scrape_interval_s=15)
    try:
        source = PrometheusSource(prom.url)
        assert source.scrape_interval_s() == 15
        assert rate_window_s(15) == 60
        assert rate_window_s(1) == 30  # the one-machine stack's 1 s scrapes keep the 30 s floor
        spec = RolloutSpec.from_dict({"candidate_version": "2"})
        guards = guard_inputs(source, spec)  # version 2 has served nothing: no P99 series
        assert guards.unavailable is None
        assert guards.missing is not None
        assert "the canary's P99 has no data" in guards.missing
        assert "[60s]" in guards.missing  # the query it ran, with its window
    finally:
        prom.stop()


@pytest.mark.integration
def test_a_look_waits_for_the_slowest_flush_a_model_server_reports(server_factory, repo_copy, tmp_path):
    """A server flushing its prediction log every 20 s: a look judged 5 s after its time lacked
    up to 20 s of records, and was judged again on more at the next poke (a look the sequential
    test does not count). The settle time is read from the servers' own gauge."""
    from vision_rollout.engine import SETTLE_S, WRITE_S, settle_time

    log = str(tmp_path / "log")
    s = server_factory(repo_copy, "--prediction-log", log, "--prediction-log-flush-s", "20", token=TOKEN)
    prom = start_prometheus([s.url], tmp_path / "prometheus")
    try:
        source = PrometheusSource(prom.url)
        assert wait_for_value(source, "max(prediction_log_flush_seconds)") == 20
        assert settle_time(source) == 20 + WRITE_S
    finally:
        prom.stop()
    assert settle_time(source) == SETTLE_S  # Prometheus gone: the default
    assert settle_time(None) == SETTLE_S  # no Prometheus configured


class Flush(PrometheusSource):
    def __init__(self, value: float):
        super().__init__("http://127.0.0.1:9")
        self.value = value

    def query(self, promql: str, at: float | None = None) -> float:
        return self.value


@pytest.mark.parametrize(("flush", "settle"), [(2.0, 5.0), (0.2, 5.0), (30.0, 33.0), (3600.0, 63.0), (math.inf, 5.0)])
def test_the_settle_time_is_the_default_or_the_slowest_flush_and_its_write(flush, settle):
    """2 s (the servers' default) keeps the 5 s of before; a flush longer than a server may take
    (60 s), or not a number, is not believed."""
    from vision_rollout.engine import settle_time

    assert settle_time(Flush(flush)) == settle


class History(PrometheusSource):
    """Prometheus as the guards see it: a P99 history answered for the range asked for."""

    def __init__(self, points: list[tuple[float, float]]):
        super().__init__("http://127.0.0.1:9")
        self.points = points
        self.ranges: list[tuple[float, float]] = []

    def scrape_interval_s(self) -> float:
        return 1.0

    def clock_offset_s(self) -> float:
        return 0.0

    def query_range(self, promql: str, start: float, end: float, step_s: float) -> list[tuple[float, float]]:
        self.ranges.append((start, end))
        points = [(t, v) for t, v in self.points if start <= t <= end]
        if not points:
            raise NoValuesFound(f"no data for {promql}")
        return points

    def query(self, promql: str) -> float:
        raise NoValuesFound(promql)


def test_the_p99_guard_counts_no_breach_from_before_its_stage():
    """The same candidate breached in an earlier rollout of it, up to the moment this stage began
    (a rollout retried at once after a rollback): that breach is not this stage's, and 30 s of
    this stage above the limit are not the 120 s the guard waits for (the stage holds, as under
    any breach under way); 120 s within it are."""
    from vision_rollout.engine import guard_inputs
    from vision_rollout.gates import GateConfig, guard_checks
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"candidate_version": "2", "p99_ms_max": 60, "p99_breach_seconds": 120})
    now = 100_000.0
    source = History([(t, 200.0) for t in range(int(now) - 300, int(now) + 1, 5)])  # above 60 ms throughout
    cfg = GateConfig.from_spec(spec)

    def p99_check(since: float | None):
        (check,) = [c for c in guard_checks(guard_inputs(source, spec, now, since=since), cfg) if c.name == "guard_p99"]
        return check

    assert p99_check(None).decision == "fail"  # no stage: the last 125 s, as before
    recent = p99_check(now - 30)
    assert source.ranges[-1] == (now - 30, now)
    assert recent.decision == "wait"
    assert "above the limit for the last 30 s" in recent.sentence
    assert p99_check(now - 200).decision == "fail"
    assert source.ranges[-1] == (now - 200, now)  # the whole stage


class Canned(PrometheusSource):
    """Prometheus' API answering from canned ``data`` per endpoint (no server)."""

    def __init__(self, **answers: dict):
        super().__init__("http://127.0.0.1:9")
        self.answers = answers

    def _api(self, path: str, params: dict[str, str]) -> dict:
        if params.get("query") == "time()":  # Prometheus' clock: this machine's
            return {"resultType": "scalar", "result": [self.clock(), str(self.clock())]}
        return self.answers[path]


def test_a_p99_series_of_nan_points_is_no_data():
    """The canary had no request in the rate window: histogram_quantile gave NaN at every point.
    query_range returned an empty series, and the P99 guard passed on it ("Canary P99 is nan ms")
    while the stage went on judging looks; it is now no data, and the stage holds."""
    from vision_rollout.engine import guard_inputs
    from vision_rollout.gates import GateConfig, guard_checks
    from vision_rollout.spec import RolloutSpec

    nan = {"resultType": "matrix", "result": [{"metric": {}, "values": [[100.0, "NaN"], [101.0, "NaN"]]}]}
    source = Canned(
        query_range=nan,
        targets={"activeTargets": [{"labels": {"job": "model-server"}, "scrapeInterval": "1s"}]},
        query={"resultType": "vector", "result": []},
    )
    with pytest.raises(NoValuesFound, match="only NaN"):
        source.query_range("p99", 90, 101, 1)
    spec = RolloutSpec.from_dict({"candidate_version": "2"})
    guards = guard_inputs(source, spec, now=101.0)
    assert guards.p99_series_ms is None
    assert guards.missing is not None
    assert "the canary's P99 has no data in Prometheus (only NaN" in guards.missing
    assert not [c for c in guard_checks(guards, GateConfig.from_spec(spec)) if c.decision == "pass"]


def test_the_rate_window_follows_the_model_servers_scrape_interval_only():
    """A blackbox probe every 5 minutes made the P99 rate window 20 minutes: a 15 s spike then
    read as a sustained breach. Only the model servers' targets count now, however Prometheus
    found them: the scrape job, or the PodMonitor of the same name; where none is, all of them."""

    def target(job: str, interval: str, pool: str | None = None) -> dict:
        return {"labels": {"job": job}, "scrapePool": pool or job, "scrapeInterval": interval}

    others = [target("blackbox", "5m"), target("node", "1h"), target("prometheus", "1s")]
    for servers in (
        [target("model-server", "15s")],
        [target("ml/model-server", "15s", pool="podMonitor/ml/model-server/0")],
    ):
        source = Canned(targets={"activeTargets": others + servers})
        assert source.scrape_interval_s() == 15
    # A scrape config of one's own naming the servers' job otherwise: every target, as before
    # (holding every stage to its end, undecided, would roll every rollout back).
    assert Canned(targets={"activeTargets": others}).scrape_interval_s() == 3600
    with pytest.raises(MetricsError, match="no active target reports a scrapeInterval"):
        Canned(targets={"activeTargets": []}).scrape_interval_s()


@pytest.mark.parametrize(("value", "counted"), [("0.9", 1), ("2.4", 2), ("+Inf", None), ("-1", None)])
def test_shadow_counts_are_rounded_and_checked(value, counted):
    """increase() extrapolates: 0.9 was truncated to 0 requests, which skipped the shadow guard;
    +Inf raised OverflowError, which crashed the poke. 0.9 is a request now, +Inf no count:
    Prometheus' answer is unusable, so the stage holds."""
    from vision_rollout.engine import guard_inputs
    from vision_rollout.spec import RolloutSpec

    p99 = {"resultType": "matrix", "result": [{"metric": {}, "values": [[100.0, "20"]]}]}
    source = Canned(
        query_range=p99,
        targets={"activeTargets": [{"labels": {"job": "model-server"}, "scrapeInterval": "1s"}]},
        query={"resultType": "vector", "result": [{"metric": {}, "value": [101.0, value]}]},
    )
    guards = guard_inputs(source, RolloutSpec.from_dict({"candidate_version": "2"}), now=101.0)
    assert guards.shadow_requests == counted
    if counted is None:
        assert guards.unavailable is not None
        assert "not a count" in guards.unavailable


@pytest.fixture
def stack(server_factory, repo_copy, tmp_path, models_dir):
    if shutil.which("prometheus") is None:
        pytest.fail("Debian's prometheus is not installed (make test installs it: see the Makefile)")
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    s.load_versions("digits", 1, 2)
    assert (
        put_policy(
            s,
            {
                "route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}],
                "mirror": {"version": "2", "percent": 100},
            },
        ).status_code
        == 200
    )
    prom = start_prometheus([s.url], tmp_path / "prometheus")
    yield s, prom, models_dir
    prom.stop()


@pytest.mark.integration
def test_prometheus_answers_the_rollout_queries(stack):
    server, prom, models_dir = stack
    source = PrometheusSource(prom.url)
    assert source.is_online()
    for _ in range(20):  # a client's garbage pinned to version 1: not the version's errors
        r = requests.post(f"{server.http}/v2/models/digits/versions/1/infer", data=b"{not json", timeout=10)
        assert r.status_code == 400
    stats = run(
        LoadConfig(
            url=server.url,
            validation=models_dir / "digits" / "validation",
            rate=60,
            duration_s=6,
            feedback_share=1.0,
            feedback_delay_s=0.2,
        )
    )
    assert stats.ok == stats.sent > 100
    # Prometheus has scraped the last request (a condition, not a guess at the clock).
    answered = 'nv_inference_request_success{model="digits"}'  # the server's count, summed over versions
    served = ScrapeSource(server.http).query(answered)
    deadline = time.monotonic() + 30
    while source.query(f"sum({answered})") < served and time.monotonic() < deadline:
        time.sleep(0.2)
    p99 = wait_for_value(source, PromQL.latency_quantile_ms("digits", "1", 0.99, "30s"))
    p95 = source.query(PromQL.latency_quantile_ms("digits", "1", 0.95, "30s"))
    assert 0 < p95 <= p99 < 1000
    requests_v2 = source.query(PromQL.requests("digits", "2", "1m"))
    assert requests_v2 == pytest.approx(stats.served["2"], rel=0.25)  # increase() extrapolates
    accuracy = wait_for_value(source, PromQL.live_accuracy("digits", "2", "1m"))
    assert 0.85 <= accuracy <= 1.0
    assert source.query(PromQL.shadow_error_rate("digits", "2", "1m")) == 0.0
    assert source.query(PromQL.error_rate("digits", "1", "1m")) == 0.0  # the 400s are not counted
    assert source.query('sum(nv_inference_request_failure{model="digits",version="1"})') == 0  # as Triton's
    assert source.query(PromQL.restarts("digits", "2", "1m")) == 0  # its process_start_time_seconds, by instance
    # Distinct failures: no such version, several series, no GPU, bad PromQL.
    with pytest.raises(NoValuesFound):
        source.query(PromQL.latency_quantile_ms("digits", "7", 0.99))
    with pytest.raises(MultipleValues):
        source.query('nv_inference_request_success{model="digits"}')
    with pytest.raises(NoValuesFound):
        source.query(PromQL.gpu_peak("nv_gpu_memory_used_bytes", "digits", "1", "1m"))
    with pytest.raises(MetricsError, match=r"HTTP 400: .*parse error"):
        source.query("sum(")
    series = source.query_range(
        PromQL.latency_quantile_ms("digits", "1", 0.99, "10s"), time.time() - 20, time.time(), 1
    )
    assert len(series) >= 5
    assert all(v > 0 for _, v in series)


@pytest.mark.integration
def test_scrape_source_reads_the_server_without_prometheus(server_factory, repo_copy, tmp_path, digit_images):
    from tests.support import infer

    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"))
    for image, _ in digit_images[:7]:
        infer(s, image)
    source = ScrapeSource(s.http)
    assert source.is_online()
    assert source.query('nv_inference_request_success{model="digits",version="1"}') == 7
    assert source.query("nv_inference_request_success") == 7
    buckets = source.buckets("model_server_request_duration_seconds", model="digits", version="1", path="primary")
    est, lo, hi = quantile_from_buckets(buckets, 0.99)
    assert lo <= est <= hi
    with pytest.raises(NoValuesFound):
        source.query('nv_inference_request_success{version="9"}')
    with pytest.raises(MetricsError, match="plain selectors"):
        source.query("rate(nv_inference_count[1m])")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"<html>a proxy's page</html>", "the answer is not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"status": "success"}', "an answer not shaped as Prometheus' API: KeyError"),
        (b'{"status": "success", "data": {"resultType": "vector", "result": [{"value": ["x"]}]}}', "IndexError"),
        (
            b'{"status": "success", "data": {"resultType": "matrix", "result": [{"values": 7}]}}',
            "not shaped as Prometheus",
        ),
    ],
)
def test_an_answer_that_is_not_prometheus_is_a_metrics_error(body, words):
    """A wrong port or a proxy answering: an IndexError or KeyError came out of the guards and
    ended rolloutctl run in a traceback; a MetricsError holds the stage as Prometheus down does."""
    from tests.support.hostile import hostile_server

    with hostile_server(body) as url:
        source = PrometheusSource(url, timeout_s=5)
        with pytest.raises(MetricsError, match=words):
            source.query("up")
        with pytest.raises(MetricsError):
            source.query_range("up", 0, 10, 1)
        with pytest.raises(MetricsError):
            source.scrape_interval_s()


def test_a_huge_or_endless_answer_is_cut_short(monkeypatch):
    """Prometheus' answers were read whole: a 2 GiB body took 4.3 GB of memory, and one sent a
    byte at a time held the read past any timeout (a socket's timeout is per read)."""
    from tests.support.hostile import hostile_server
    from vision_rollout import metrics

    monkeypatch.setattr(metrics, "MAX_ANSWER", 1000)
    with hostile_server(b'{"status": "success", "data": "' + b"A" * 2000 + b'"}') as url:
        with pytest.raises(MetricsError, match="an answer over 1000 bytes"):
            PrometheusSource(url, timeout_s=5).query("up")
    # Under the limit, an error of Prometheus' shape: its text was the stage's reason, whole.
    monkeypatch.setattr(metrics, "MAX_ANSWER", 10**6)
    error = b'{"status": "error", "errorType": "' + b"T" * 5000 + b'", "error": "' + b"E" * 500_000 + b'"}'
    with hostile_server(error) as url:
        with pytest.raises(MetricsError) as raised:
            PrometheusSource(url, timeout_s=5).query("up")
        assert "prometheus: TTT" in str(raised.value)
        assert len(str(raised.value)) < 1200
    with hostile_server(trickle_s=0.2, trickle_for_s=10) as url:
        started = time.monotonic()
        with pytest.raises(SourceOffline, match="the answer took more than 1 s"):
            PrometheusSource(url, timeout_s=1).query("up")
        assert time.monotonic() - started < 4


@pytest.mark.integration
def test_the_shadow_guard_counts_every_error_of_its_stage_and_none_before(
    server_factory, repo_copy, tmp_path, digit_images
):
    """The shadow's error series appeared on its first error: Prometheus took its first sample
    (all the burst's errors) as the counter's base, and increase() counted none of them. The
    shadow guard read 0 errors of a candidate failing every copy for a while, and passed.
    And it read the last 10 minutes whatever the stage's start: a rollout of the same version
    started again after a rollback failed at once on the errors of the one before."""
    from tests.support import infer
    from vision_rollout.engine import guard_inputs, rate_window_s
    from vision_rollout.gates import GateConfig, guard_checks
    from vision_rollout.spec import RolloutSpec

    s = mirroring(server_factory, repo_copy, tmp_path)
    prom = start_prometheus([s.url], tmp_path / "prometheus")
    try:
        source = PrometheusSource(prom.url)
        wait_for_value(source, 'model_server_model_info{model="digits",version="2"}')  # scraped since the load
        fault = f"{s.http}/v2/models/digits/versions/2/fault"
        assert requests.put(fault, json={"abort": {"percent": 100}}, headers=s.admin, timeout=10).status_code == 200
        burst = 20
        for image, _ in digit_images[:burst]:
            assert infer(s, image).status_code == 200  # the primary is untouched
        errors = 'shadow_requests_total{model="digits",version="2",outcome="error"}'
        # Prometheus holds the whole burst, and ten samples of the series besides (a condition).
        deadline = time.monotonic() + 60
        while True:
            try:
                if source.query(errors) == burst and source.query(f"count_over_time({errors}[1m])") >= 10:
                    break
            except NoValuesFound:
                pass
            assert time.monotonic() < deadline, "Prometheus never held the burst's errors"
            time.sleep(0.2)
        spec = RolloutSpec.from_dict({"candidate_version": "2"})
        guards = guard_inputs(source, spec)
        assert guards.shadow_requests is not None
        assert guards.shadow_errors is not None
        assert guards.shadow_errors >= burst
        # A stage that starts after the burst, with the shadow healthy again: none of its errors.
        assert requests.put(fault, json={"abort": {"percent": 0}}, headers=s.admin, timeout=10).status_code == 200
        since = time.time()
        window = rate_window_s(source.scrape_interval_s())
        ok = 'sum(shadow_requests_total{model="digits",version="2",outcome="ok"})'
        sent = 0
        while True:  # copies served well until Prometheus has a sample a whole rate window in
            assert infer(s, digit_images[sent % len(digit_images)][0]).status_code == 200
            sent += 1
            try:
                if source.query(f"timestamp({ok})") > since + window + 1 and source.query(ok) > 0:
                    break
            except NoValuesFound:
                pass
            assert sent < 1000, "Prometheus has no sample of the healthy shadow"
            time.sleep(0.1)
        stage = guard_inputs(source, spec, since=since)
        assert stage.shadow_errors == 0
        assert stage.shadow_requests is not None
        assert stage.shadow_requests > 0
        assert not [c for c in guard_checks(stage, GateConfig.from_spec(spec)) if c.decision == "fail"]
    finally:
        prom.stop()


def exporter(pages: dict[str, str], name: str):
    """A /metrics page on loopback answering ``pages[name]`` as it is at each scrape."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages[name].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True).start()
    return httpd


@pytest.mark.integration
def test_gpu_gauges_are_the_peaks_of_the_gpus_that_serve_the_version(tmp_path):
    """Two servers beside each other in one Prometheus: the candidate's (one GPU, busier earlier in
    the stage) and another model's (a fuller GPU). The stage reports the candidate's GPU at its
    peak, not the busiest GPU the Prometheus sees."""
    from vision_rollout.engine import gpu_gauges

    pages = {
        "candidate": 'nv_inference_count{model="digits",version="2"} 5\n'
        'nv_gpu_utilization{gpu_uuid="GPU-a"} 0.6\n'
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 3e9\n'
        'nv_gpu_memory_total_bytes{gpu_uuid="GPU-a"} 8e10\n',
        "other": 'nv_inference_count{model="other",version="1"} 9\n'
        'nv_gpu_utilization{gpu_uuid="GPU-b"} 0.9\n'
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 7e10\n'
        'nv_gpu_memory_total_bytes{gpu_uuid="GPU-b"} 9e10\n',
    }

    servers = [exporter(pages, "candidate"), exporter(pages, "other")]
    prom = start_prometheus([f"127.0.0.1:{s.server_port}" for s in servers], tmp_path / "prometheus")
    try:
        source = PrometheusSource(prom.url)
        assert wait_for_value(source, 'nv_gpu_utilization{gpu_uuid="GPU-a"}') == 0.6
        pages["candidate"] = pages["candidate"].replace("} 0.6", "} 0.4")
        wait_for_value(source, 'nv_gpu_utilization{gpu_uuid="GPU-a"} == 0.4')
        assert source.query("max(nv_gpu_utilization)") == 0.9  # what was reported before
        assert gpu_gauges(source, "digits", "2", 300) == {
            "utilization": 0.6,
            "memory_used_bytes": 3e9,
            "memory_total_bytes": 8e10,
        }
        assert gpu_gauges(source, "digits", "3", 300) == {}  # no server serves it
    finally:
        prom.stop()
        for s in servers:
            s.shutdown()
            s.server_close()


@pytest.mark.integration
def test_the_restart_guard_counts_the_candidates_restarts_in_its_stage(tmp_path):
    """A candidate's process that crashed and came back (its start time changed: kubelet restarts
    a container in its pod, at the pod's address) lost its requests in flight, its counters and
    its unwritten log records, and no guard read restarts: the stage passed. The guard counts
    them over the stage: the candidate's, not another version's, none from before the stage;
    and holds where the servers report no start time."""
    from vision_rollout.engine import guard_inputs
    from vision_rollout.gates import GateConfig, guard_checks
    from vision_rollout.spec import RolloutSpec

    def page(start: float | None, version: str) -> str:
        info = f'model_server_model_info{{model="digits",version="{version}",execution_provider="CPU"}} 1\n'
        return info + (f"process_start_time_seconds {start}\n" if start is not None else "")

    pages = {"candidate": page(100.0, "2"), "baseline": page(200.0, "1"), "other": page(None, "3")}
    servers = [exporter(pages, name) for name in pages]
    prom = start_prometheus([f"127.0.0.1:{s.server_port}" for s in servers], tmp_path / "prometheus")
    starts = "process_start_time_seconds"

    def restart(name: str, start: float, version: str) -> str:
        """The server's start time changed, and Prometheus holds it: its series."""
        pages[name] = page(start, version)
        series = f'{starts}{{instance="127.0.0.1:{servers[list(pages).index(name)].server_port}"}}'
        wait_for_value(source, f"{series} == {start}")
        return series

    try:
        source = PrometheusSource(prom.url)
        wait_for_value(source, f"count({starts}) == 2")
        candidate_starts = restart("candidate", 150.0, "2")  # before the stage
        first = source.query(f"timestamp({candidate_starts})")
        wait_for_value(source, f"timestamp({candidate_starts}) > {first + 2}")  # the stage starts 2 s after
        since = time.time()
        candidate = RolloutSpec.from_dict({"candidate_version": "2"})
        assert guard_inputs(source, candidate, since=since).restarts == 0
        restart("candidate", 300.0, "2")  # in the stage
        restart("baseline", 310.0, "1")  # another version's server: not the candidate's
        restart("baseline", 320.0, "1")
        guards = guard_inputs(source, candidate, since=since)
        assert guards.restarts == 1
        assert guard_inputs(source, candidate, since=since - 600).restarts == 2  # with the one before
        (check,) = [c for c in guard_checks(guards, GateConfig.from_spec(candidate)) if c.name == "guard_restarts"]
        assert check.decision == "fail"
        baseline = RolloutSpec.from_dict({"candidate_version": "1", "baseline_version": "2"})
        assert guard_inputs(source, baseline, since=since).restarts == 2
        # A server of the version that reports no start time: no data, the stage holds.
        held = guard_inputs(source, RolloutSpec.from_dict({"candidate_version": "3"}), since=since)
        assert held.restarts is None
        assert held.missing is not None
        assert "the start times of the candidate's serving processes have no data in Prometheus" in held.missing
    finally:
        prom.stop()
        for s in servers:
            s.shutdown()
            s.server_close()


class SlowCandidate(dict):
    """The /metrics page of a server serving version 2 of digits, every request since its start
    answered in 50 to 100 ms (a P99 of about 99.5 ms), 50 requests a second: a breach throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.started = time.monotonic()

    def __getitem__(self, name: str) -> str:
        n = int((time.monotonic() - self.started) * 50)
        sel = 'model="digits",version="2",path="primary"'
        return (
            'model_server_model_info{model="digits",version="2",execution_provider="CPU"} 1\n'
            f'model_server_request_duration_seconds_bucket{{{sel},le="0.05"}} 0\n'
            f'model_server_request_duration_seconds_bucket{{{sel},le="0.1"}} {n}\n'
            f'model_server_request_duration_seconds_bucket{{{sel},le="+Inf"}} {n}\n'
            f"model_server_request_duration_seconds_count{{{sel}}} {n}\n"
            "process_start_time_seconds 100\n"
        )


@pytest.mark.integration
@pytest.mark.parametrize("skew_s", [-300.0, 300.0])
def test_the_p99_guard_reads_the_stage_on_prometheus_clock_whatever_the_workers(tmp_path, skew_s):
    """The stage's window is the worker's clock; Prometheus evaluates a range on its own. A worker
    5 minutes ahead asked for a range in Prometheus' future (no samples there: no data, the stage
    held), one behind for a range before the breach: the breach Prometheus held was not seen
    either way. The guard reads Prometheus' clock (its ``time()``) and asks for the stage's range
    on it."""
    from vision_rollout.engine import guard_inputs
    from vision_rollout.gates import GateConfig, guard_checks
    from vision_rollout.spec import RolloutSpec

    server = exporter(SlowCandidate(), "candidate")
    prom = start_prometheus([f"127.0.0.1:{server.server_port}"], tmp_path / "prometheus")
    try:
        worker = PrometheusSource(prom.url, clock=lambda: time.time() + skew_s)
        assert abs(worker.clock_offset_s() + skew_s) < 1  # (the query's round trip at most)
        p99 = PromQL.latency_quantile_ms("digits", "2", 0.99, "30s")
        wait_for_value(worker, f"count_over_time(({p99} > 60)[30s:1s]) >= 8")  # 8 s of breach held
        since = worker.clock() - 20  # the stage began 20 s ago by the worker's clock
        spec = RolloutSpec.from_dict({"candidate_version": "2", "p99_ms_max": 60, "p99_breach_seconds": 5})
        guards = guard_inputs(worker, spec, worker.clock(), since=since)
        assert guards.missing is None
        assert guards.unavailable is None
        (check,) = [c for c in guard_checks(guards, GateConfig.from_spec(spec)) if c.name == "guard_p99"]
        assert check.decision == "fail"
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()


class FastCandidate(SlowCandidate):
    """The same server answering every request within 10 ms: a P99 of about 9.9 ms."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name).replace('le="0.05"', 'le="0.005"').replace('le="0.1"', 'le="0.01"')


@pytest.mark.integration
def test_a_stage_whose_history_prometheus_lost_is_said_and_baked_again(tmp_path):
    """Prometheus restarted without its storage mid-stage: the P99 guard's range from the stage's
    start held only what came after, so a breach before the restart (one that ended between two
    pokes) and a restart of the candidate then were gone, and the guards passed without a word.
    The guard now finds the part of the stage Prometheus holds no sample of a server serving the
    candidate for, says so, and the stage bakes that much longer under the guards."""
    from vision_rollout.engine import guard_inputs
    from vision_rollout.gates import GateConfig, guard_checks
    from vision_rollout.spec import RolloutSpec

    server = exporter(FastCandidate(), "candidate")
    target = [f"127.0.0.1:{server.server_port}"]
    prom = start_prometheus(target, tmp_path / "before")
    spec = RolloutSpec.from_dict({"candidate_version": "2"})
    cfg = GateConfig.from_spec(spec)
    try:
        source = PrometheusSource(prom.url)
        info = 'model_server_model_info{model="digits",version="2"}'
        since = time.time()
        wait_for_value(source, f"timestamp({info}) > {since + 6}")  # 6 s of the stage held
        whole = guard_inputs(source, spec, since=since)
        assert whole.missing is None
        assert whole.unwatched == ()
        assert not [c for c in guard_checks(whole, cfg) if c.name == "guard_history"]
        prom.stop()  # and started again on its port with an empty storage
        prom = start_prometheus(target, tmp_path / "after", port=prom.port)
        restarted = time.time()
        wait_for_value(source, f"count_over_time({info}[1m]) >= 3")
        guards = guard_inputs(source, spec, since=since)
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()
    assert guards.missing is None  # the P99 has its points since the restart
    ((start, end),) = guards.unwatched
    assert start == pytest.approx(since, abs=0.01)
    assert since + 6 < end <= restarted + 3
    assert guards.unwatched_s == pytest.approx(end - start)
    (history,) = [c for c in guard_checks(guards, cfg) if c.name == "guard_history"]
    assert history.decision == "info"
    assert history.sentence.startswith(
        f"Prometheus holds no sample of a server serving the candidate for {end - start:.0f} s of this stage"
    )
    assert "a breach, a restart or shadow errors then are not seen" in history.sentence
    (p99,) = [c for c in guard_checks(guards, cfg) if c.name == "guard_p99"]
    assert p99.decision == "pass"


def just_after_a_scrape(source: PrometheusSource) -> float:
    """A stage's start 1.5 s after a scrape of the exporter's start time (3.5 s before the next,
    at a 5 s interval), once Prometheus holds two of its samples."""
    starts = "process_start_time_seconds"
    wait_for_value(source, f"count_over_time({starts}[1m]) >= 2", timeout_s=30)
    last = source.query(f"timestamp({starts})")
    wait_for_value(source, f"timestamp({starts}) > {last}", every_s=0.05)  # a scrape just now
    time.sleep(1.5)
    return time.time()


@pytest.mark.integration
def test_a_restart_of_the_candidate_just_after_its_stage_began_is_counted(tmp_path):
    """A candidate that crashed on its first live requests, within a scrape interval of its
    stage's start: Prometheus' last sample of the old start time lay before the stage, the first of
    the new one in it, and changes() over the stage saw one value only: no restart, the guard
    passed. A change is counted where its new value's sample lies in the stage, its old one
    before it or not."""
    from vision_rollout.engine import guard_inputs
    from vision_rollout.spec import RolloutSpec

    def page(start: float) -> str:
        info = 'model_server_model_info{model="digits",version="2",execution_provider="CPU"} 1\n'
        return info + f"process_start_time_seconds {start}\n"

    pages = {"candidate": page(100.0)}
    server = exporter(pages, "candidate")
    prom = start_prometheus([f"127.0.0.1:{server.server_port}"], tmp_path / "prometheus", scrape_interval_s=5)
    starts = "process_start_time_seconds"
    try:
        source = PrometheusSource(prom.url)
        since = just_after_a_scrape(source)
        pages["candidate"] = page(200.0)  # and the candidate restarts at once
        wait_for_value(source, f"{starts} == 200")
        first_new = source.query(f"timestamp({starts})")
        old = source.query(f"timestamp({starts} offset 3s)")
        assert first_new >= since > old or pytest.skip("a scrape fell between the stage's start and the restart")
        spec = RolloutSpec.from_dict({"candidate_version": "2"})
        assert guard_inputs(source, spec, since=since).restarts == 1
        time.sleep(max(0.0, first_new + 8 - time.time()))  # (a scrape of the version loaded in the stage)
        assert guard_inputs(source, spec, since=first_new + 2).restarts == 0  # a stage after it
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_a_stage_just_begun_reads_the_restart_guard_from_the_candidates_last_scrapes(tmp_path):
    """At a stage's first pokes, before Prometheus scraped the candidate's servers within the
    stage (seconds, at a 15-30 s scrape interval), the restart guard found no server serving the
    version in the stage and had no data: the stage held ("a hard guard has no data: the start
    times ...") though the candidate's process was scraped a moment before, its start time
    unchanged. The servers seen serving the version up to a rate window before the stage count:
    no restart, nothing missing; a server of the version never scraped still holds the stage."""
    from vision_rollout.engine import guard_inputs
    from vision_rollout.spec import RolloutSpec

    server = exporter(
        {"candidate": 'model_server_model_info{model="digits",version="2"} 1\nprocess_start_time_seconds 100\n'},
        "candidate",
    )
    prom = start_prometheus([f"127.0.0.1:{server.server_port}"], tmp_path / "prometheus", scrape_interval_s=5)
    try:
        source = PrometheusSource(prom.url)
        since = just_after_a_scrape(source)
        guards = guard_inputs(source, RolloutSpec.from_dict({"candidate_version": "2"}), since=since)
        assert "start times" not in (guards.missing or ""), guards.missing
        assert guards.restarts == 0
        unseen = guard_inputs(source, RolloutSpec.from_dict({"candidate_version": "3"}), since=since)
        assert unseen.restarts is None
        assert "the start times of the candidate's serving processes have no data" in (unseen.missing or "")
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()
