"""wait_for_metrics against a real model server writing its prediction log, scraped by a real
Prometheus, under live load: pokes, verdicts, a retry, a breach."""

from __future__ import annotations

import json
import time

import pytest
import requests

from devstack.processes import local_connections, start_prometheus
from vision_rollout.spec import RolloutSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LOOSE = {"latency_margin": 1.0, "error_margin": 0.05, "accuracy_margin": 0.02}  # wiring: see test_engine_e2e


class TaskInstance:
    """What the sensor uses of its task instance: XCom pushes (and its id, when a test sets it)."""

    id: str | None = None

    def __init__(self) -> None:
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.pushed[key] = value


@pytest.fixture
def stage(server_factory, live_traffic, repo_copy, models_dir, tmp_path, monkeypatch):
    """Versions 1 and 2 split 50/50 with live traffic; the connections the sensor reads."""
    import shutil

    shutil.copytree(models_dir / "digits" / "validation", repo_copy / "digits" / "validation")
    log_dir = tmp_path / "predictions"
    server = server_factory(repo_copy, "--prediction-log", str(log_dir), "--prediction-log-flush-s", "0.5", token="t")
    server.load_versions("digits", 1, 2)
    requests.put(
        f"{server.http}/v2/models/digits/traffic",
        headers=server.admin,
        timeout=10,
        json={"route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]},
    )
    prom = start_prometheus([server.url], tmp_path / "prometheus")
    for conn_id, fields in local_connections(server, prom.url, repo_copy, log_dir, tmp_path / "run").items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
    from rollout_airflow.hooks import ModelServerHook

    ModelServerHook().model_lock("digits", "local").acquire("manual__test")  # as the run's build_image did
    started = time.time()
    live_traffic(server.url, repo_copy / "digits" / "validation", feedback_share=0)
    holder = {"prom": prom}
    yield server, log_dir, started, holder
    holder["prom"].stop()


def params(**kw) -> dict:
    return RolloutSpec.from_dict(
        {"candidate_version": "2", "stages": [50, 100], "min_samples": 40, "looks_per_stage": 2, **LOOSE, **kw}
    ).to_dict()


def poke(p: dict, started: float, ti: TaskInstance | None = None):
    from rollout_airflow.sensors import StageMetricsSensor

    sensor = StageMetricsSensor(task_id="wait_for_metrics", stage_index=0, applied={"started": started})
    return sensor.poke({"params": p, "run_id": "manual__test", "ti": ti or TaskInstance()})


def test_a_poke_mid_stage_waits_and_sends_the_replay(stage):
    from model_server.predictionlog import read

    _server, log_dir, started, _ = stage
    result = poke(params(bake_seconds=600, max_stage_seconds=900), started)
    assert result.is_done is False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        from datetime import UTC, datetime, timedelta

        now = datetime.now(UTC)
        df = read(str(log_dir), now - timedelta(minutes=5), now + timedelta(minutes=1), model="digits")
        replayed = df[(df["route"] == "version") & (df["role"] == "primary")]
        if len(replayed) >= 2 * 450:
            break
        time.sleep(0.5)
    assert set(replayed["version"]) == {"1", "2"}  # the validation replay reached both versions
    assert replayed["image_sha256"].nunique() == 450


def test_a_baked_stage_gives_its_verdict_and_a_retry_gives_the_same(stage):
    _server, _, started, _ = stage
    # (a short bake: the last look waits for min_samples per arm and a whole replay round anyway)
    p = params(bake_seconds=6, max_stage_seconds=60, min_samples=100)
    deadline = time.monotonic() + 90
    while not (result := poke(p, started)).is_done:
        assert time.monotonic() < deadline, "the stage never decided"
        time.sleep(2)
    verdict = result.xcom_value
    assert verdict["decision"] == "pass", verdict["summary"]
    assert verdict["bake"]["served"]["canary"]["live"] >= 40  # the live arm, from the log
    # (where the deciding look's records lie, for the final report's chart: ``engine.deciding_look``)
    assert verdict["bake"]["window"] <= verdict["bake"]["until"] <= time.time()
    assert verdict["checks"][0]["name"] == "evidence"
    again = poke(p, started).xcom_value  # what a retried task computes: the same looks, the same verdict
    assert (again["look"], again["decision"], again["checks"][0]["sentence"]) == (
        verdict["look"],
        verdict["decision"],
        verdict["checks"][0]["sentence"],
    )


def test_a_tripped_guard_restores_stable_and_fails_with_its_reason(stage):
    from airflow.sdk.exceptions import AirflowFailException

    server, _, started, _ = stage
    # 10% of version 2's requests 90 ms slower: its P99 over the 60 ms limit, its one instance
    # not saturated by the live traffic (all of them 90 ms slower would queue without end).
    requests.put(
        f"{server.http}/v2/models/digits/versions/2/fault",
        json={"delay": {"ms": 90, "percent": 10}},
        headers=server.admin,
        timeout=10,
    )
    p = params(bake_seconds=600, max_stage_seconds=900, p99_breach_seconds=3)
    ti = TaskInstance()
    deadline = time.monotonic() + 90
    with pytest.raises(AirflowFailException, match="hard guard tripped: Canary P99"):  # noqa: PT012
        while time.monotonic() < deadline:
            assert poke(p, started, ti).is_done is False
            time.sleep(2)
    assert "Canary P99" in str(ti.pushed["failure"])  # the rollback report names it
    routes = requests.get(f"{server.http}/v2/models/digits/traffic", headers=server.admin, timeout=10).json()
    assert routes == {"route": [{"version": "1", "weight": 100}]}


def test_prometheus_down_mid_stage_holds_it_and_the_stage_resumes_when_it_returns(stage, tmp_path, capsys):
    """The stage's hard guards read Prometheus: while it is down nothing passes (the stage holds,
    past its bake and its looks); back on the same port, the stage goes on to its verdict."""
    server, _, started, holder = stage
    p = params(bake_seconds=12, max_stage_seconds=240, min_samples=100)
    prom = holder["prom"]
    prom.stop()
    down_until = time.monotonic() + 24  # twice the bake: a guarded stage would have passed by now
    while time.monotonic() < down_until:
        assert poke(p, started).is_done is False
        time.sleep(2)
    assert "holding: the hard guards cannot be read" in capsys.readouterr().out
    holder["prom"] = start_prometheus([server.url], tmp_path / "prometheus", port=prom.port)
    deadline = time.monotonic() + 120
    while not (result := poke(p, started)).is_done:
        assert time.monotonic() < deadline, "the stage never resumed"
        time.sleep(2)
    assert result.xcom_value["decision"] == "pass", result.xcom_value["summary"]


def test_prometheus_down_to_the_end_of_a_stage_makes_it_undecided(stage):
    """Undecided, the wait fails (not green in the grid), its verdict kept for the report."""
    from airflow.sdk.exceptions import AirflowFailException

    _server, _, started, holder = stage
    holder["prom"].stop()
    p = params(bake_seconds=6, max_stage_seconds=14, min_samples=40)
    ti = TaskInstance()
    deadline = time.monotonic() + 60
    with pytest.raises(AirflowFailException, match=r"^stage 1 \(50%\) ended undecided \(inconclusive\)"):  # noqa: PT012
        while not poke(p, started, ti).is_done:
            assert time.monotonic() < deadline
            time.sleep(2)
    assert ti.pushed["verdict"]["status"] == "undecided"
    assert "could not be read" in ti.pushed["verdict"]["summary"]
    assert "could not be read" in str(ti.pushed["failure"])


def restarted(server, repo_copy, tmp_path, log_dir):
    """``server`` (killed) started again on its port with its state folder and prediction log."""
    from devstack.processes import start_model_server

    return start_model_server(
        repo_copy,
        tmp_path,
        "--prediction-log",
        str(log_dir),
        "--prediction-log-flush-s",
        "0.5",
        "--state-dir",
        str(tmp_path / f"state-{server.port}"),
        token="t",
        port=server.port,
    )


def test_the_model_server_restarted_mid_stage_the_stage_goes_on(stage, repo_copy, tmp_path):
    """Killed mid-stage (SIGKILL: no clean shutdown) and started again on its port with its state
    folder: it serves the same versions under the same policy (both persisted), the pokes in
    between wait or fail to be retried, never pass, and a stage allowing a restart reaches its
    verdict. The restart guard counted the restart: by default one trips it."""
    import signal

    from vision_rollout.engine import guard_inputs, tripped
    from vision_rollout.gates import GateConfig
    from vision_rollout.metrics import PrometheusSource

    server, log_dir, started, holder = stage
    p = params(bake_seconds=12, max_stage_seconds=240, min_samples=100, restarts_max=1)
    policy = requests.get(f"{server.http}/v2/models/digits/traffic", headers=server.admin, timeout=10).json()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=10)
    outcomes = []
    for _ in range(3):
        try:
            outcomes.append(poke(p, started).is_done)
        except Exception as exc:  # the task fails this poke and Airflow retries it
            outcomes.append(type(exc).__name__)
        time.sleep(2)
    assert True not in outcomes, outcomes  # nothing passes while the server is down
    again = restarted(server, repo_copy, tmp_path, log_dir)
    try:
        assert again.client().get_model_metadata("digits")["versions"] == ["1", "2"]
        assert requests.get(f"{again.http}/v2/models/digits/traffic", headers=again.admin, timeout=10).json() == policy
        deadline = time.monotonic() + 120
        while not (result := poke(p, started)).is_done:
            assert time.monotonic() < deadline, "the stage never decided"
            time.sleep(2)
        assert result.xcom_value["decision"] == "pass", result.xcom_value["summary"]
        # The stage may decide before Prometheus scraped the new start time (a busy machine):
        # wait for that scrape, then the count is the one restart.
        deadline = time.monotonic() + 60
        while (
            guards := guard_inputs(PrometheusSource(holder["prom"].url), RolloutSpec.from_dict(p), since=started)
        ).restarts != 1:
            assert time.monotonic() < deadline, f"Prometheus never counted the restart: {guards.restarts}"
            time.sleep(1)
        assert tripped(guards, GateConfig()) == (
            "hard guard tripped: The candidate's serving processes restarted 1 time in this stage (limit 0)."
        )
    finally:
        again.stop()


def test_pokes_that_raise_hold_the_stage_until_guard_error_limit_in_a_row(stage, repo_copy, tmp_path):
    """A poke that raises (the serving path refusing: a model server restarting) holds the stage,
    counted in the run folder (the next poke may run on another worker), not a failed try of
    Airflow's: its retries, never reset by the pokes that succeed between, failed the stage and
    rolled back on three passing outages over a whole stage. A poke that succeeds sets the
    count back to 0; the ``guard_error_limit``-th in a row fails the stage naming the error."""
    import signal

    from airflow.sdk.exceptions import AirflowFailException

    server, log_dir, started, _ = stage
    # A replay round due at each poke once 4 s passed since the last (look interval: bake / looks).
    p = params(bake_seconds=8, max_stage_seconds=900, min_samples=100_000, guard_error_limit=3, restarts_max=5)
    ti = TaskInstance()
    ti.id = "0193c1a8-5f0e-7b7e-9a51-6f2d3c4b5a69"  # one try of the wait, as Airflow's task instance

    def down() -> None:
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)

    down()
    assert [poke(p, started, ti).is_done for _ in range(2)] == [False, False]  # 2 of 3
    server = restarted(server, repo_copy, tmp_path, log_dir)
    try:
        assert poke(p, started, ti).is_done is False  # served: the count back to 0
    finally:
        down()
    time.sleep(4)  # (a look interval: the next poke's replay round is due, to the server down)
    assert [poke(p, started, ti).is_done for _ in range(2)] == [False, False]
    with pytest.raises(AirflowFailException, match="3 times in a row") as failed:
        poke(p, started, ti)
    assert ti.pushed["failure"] == str(failed.value)[:1000]
