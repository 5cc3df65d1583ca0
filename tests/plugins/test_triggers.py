"""The wait_for_metrics trigger against a real model server scraped by a real Prometheus."""

from __future__ import annotations

import asyncio
import threading
import time
from importlib import import_module

import pytest
import requests

from include.rollout.local import start_prometheus
from include.rollout.spec import RolloutSpec
from model_server.loadgen import LoadConfig, run
from rollout_airflow.triggers import StageMetricsTrigger

pytestmark = pytest.mark.integration


@pytest.fixture
def scraped(server_factory, repo_copy, models_dir, tmp_path):
    import shutil

    shutil.copytree(models_dir / "digits" / "validation", repo_copy / "digits" / "validation")
    server = server_factory(repo_copy, token="t")
    server.load_versions("digits", 1, 2)
    prom = start_prometheus([server.url], tmp_path / "prometheus")
    yield server, prom, repo_copy / "digits" / "validation"
    prom.stop()


def first_event(trigger: StageMetricsTrigger, timeout_s: float = 60.0) -> dict:
    async def go() -> dict:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(go(), timeout_s))


def roundtrip(trigger: StageMetricsTrigger) -> StageMetricsTrigger:
    """What the triggerer does: rebuild the trigger from its serialized form."""
    path, kwargs = trigger.serialize()
    module, name = path.rsplit(".", 1)
    return getattr(import_module(module), name)(**kwargs)


@pytest.fixture
def load(scraped):
    """Live traffic from the test's start to its end, in one-second runs."""
    server, _, validation = scraped
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            run(LoadConfig(url=server.url, validation=validation, rate=40, duration_s=1, feedback_share=0))

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(timeout=30)


def split(server) -> None:
    requests.put(f"{server.http}/v2/models/digits/traffic", headers=server.admin, timeout=10,
                 json={"route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]})  # fmt: skip


def spec(**kw) -> dict:
    return RolloutSpec.from_dict({"candidate_version": "2", "stages": [50, 100], "min_samples": 40,
                                  "bake_seconds": 2, "max_stage_seconds": 30, **kw}).to_dict()  # fmt: skip


def test_ready_once_baked_with_enough_requests_per_arm(scraped, load):
    server, prom, _ = scraped
    split(server)
    event = first_event(roundtrip(StageMetricsTrigger(spec(), 50, time.time(), prom.url, poll_seconds=0.5)))
    assert event["status"] == "ready"
    assert set(event["served"]) == {"1", "2"}
    assert all(n >= 40 for n in event["served"].values())  # min_samples per arm
    assert event["elapsed_s"] >= 2
    assert event["gpu"] == {}  # no GPU here: the gauges are absent, reported as such


def test_a_tripped_guard_fires_a_breach_before_the_bake_ends(scraped, load):
    server, prom, _ = scraped
    requests.put(f"{server.http}/v2/models/digits/versions/2/fault", json={"delay": {"ms": 90}},
                 headers=server.admin, timeout=10)  # fmt: skip
    split(server)
    event = first_event(StageMetricsTrigger(spec(bake_seconds=600, max_stage_seconds=900, p99_breach_seconds=3),
                                            50, time.time(), prom.url, poll_seconds=0.5))  # fmt: skip
    assert event["status"] == "breach"
    assert event["elapsed_s"] < 600
    assert "Canary P99" in event["failed_guards"][0]


def test_no_traffic_means_a_timeout_not_a_pass(scraped):
    _, prom, _ = scraped
    event = first_event(
        StageMetricsTrigger(spec(max_stage_seconds=3), 50, time.time(), prom.url, poll_seconds=0.5)
    )
    assert event["status"] == "timeout"
    assert event["served"] == {"1": None, "2": None} or all(n < 40 for n in event["served"].values())


# -- the sensor around the trigger: a first try defers, a retry looks first -----------------------


class TaskInstance:
    """What the sensor uses of its task instance: the try number and XCom pushes."""

    def __init__(self, try_number: int) -> None:
        self.try_number = try_number
        self.pushed: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.pushed[key] = value


@pytest.fixture
def connections(scraped, monkeypatch, tmp_path):
    import json

    from include.rollout.local import local_connections

    server, prom, validation = scraped
    conns = local_connections(server, prom.url, validation.parents[1], tmp_path / "shadow", tmp_path / "run")
    for conn_id, fields in conns.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
    return scraped


def sensor_run(params: dict, started: float, ti: TaskInstance):
    from rollout_airflow.sensors import StageMetricsSensor

    sensor = StageMetricsSensor(task_id="wait_for_metrics", stage_index=0, applied={"started": started},
                                poke_interval=0.5)  # fmt: skip
    return sensor.execute({"params": params, "run_id": "manual__test", "ti": ti})


def test_a_first_try_defers_and_a_retry_fails_a_stage_already_over_at_once(connections):
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    now = time.time()
    for started, try_number in ((now, 1), (now - 1000, 1), (now, 2)):  # a retry mid-bake defers too
        with pytest.raises(TaskDeferred) as deferred:
            sensor_run(spec(bake_seconds=600, max_stage_seconds=900), started, TaskInstance(try_number))
        trigger = deferred.value.trigger
        assert isinstance(trigger, StageMetricsTrigger)
        assert (trigger.started, trigger.weight, trigger.not_before) == (started, 50, 0.0)
    # A retry long after its stage ended: judged in the worker, no deferral (no TaskDeferred).
    retry = TaskInstance(2)
    with pytest.raises(AirflowFailException, match="was not ready after"):
        sensor_run(spec(max_stage_seconds=30), now - 1000, retry)
    assert "was not ready after" in str(retry.pushed["failure"])  # the rollback report names it


def test_a_retried_wait_judges_a_baked_stage_without_deferring(connections, load):
    """Deferring would fire at once, where Airflow 3.3 can fail the resumed task (#72716)."""
    from rollout_airflow.steps import stage_event

    server, _, _ = connections
    split(server)
    # Past max_stage_seconds the gate must give its verdict: "wait" is no longer an answer.
    params, started = spec(looks_per_stage=1, max_stage_seconds=10), time.time()
    deadline = time.monotonic() + 60
    while True:
        event = stage_event(params, 0, {"started": started})
        if event is not None and event["elapsed_s"] >= 10:
            break
        assert time.monotonic() < deadline, f"the stage never became ready: {event}"
        time.sleep(0.5)
    assert event["status"] == "ready", event  # baked, with enough requests per arm
    verdict = sensor_run(params, started, TaskInstance(2))  # a verdict returned, no TaskDeferred
    assert verdict["bake"]["served"]["2"] >= 40
    assert verdict["decision"] in {"pass", "fail", "wait"}
