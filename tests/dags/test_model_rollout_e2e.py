"""dag.test() of model_rollout against the real local stack: promote version 2, roll back version 3."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from devstack.processes import free_port, local_connections, start_prometheus
from model_server.traffic import TrafficPolicy
from tests.conftest import ROOT
from tests.model_server.test_prediction_log import logging_server
from vision_rollout.mesh import LocalRouter

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TOKEN = "dag-test-token"


@pytest.fixture
def stack(airflow_db, server_factory, live_traffic, repo_copy, models_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(models_dir / "digits" / "validation", repo_copy / "digits" / "validation")
    port = free_port()
    # Prometheus first: the 5 s before its first scrape run beside the server's start.
    prom = start_prometheus([f"127.0.0.1:{port}"], tmp_path / "prometheus", wait=False)
    try:
        s = logging_server(server_factory, repo_copy, tmp_path, token=TOKEN, port=port)
        prom.wait_scraped()
    except BaseException:
        prom.stop()
        raise
    conns = local_connections(s, prom.url, repo_copy, tmp_path / "predictions", tmp_path / "run")
    for conn_id, fields in conns.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
    live_traffic(s.url, repo_copy / "digits" / "validation")
    yield s, tmp_path
    prom.stop()


def rollout_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "model_rollout.py"))
    assert bag.import_errors == {}
    return bag.dags["model_rollout"]


# Wiring, not the defaults (bench/gates.py and make demo are): under CI load the candidate, which
# also runs every mirrored copy, can be tens of percent slower than the baseline. A short bake: a
# stage's last look waits for min_samples and a whole replay round whatever the bake (the stage
# holds for them up to max_stage_seconds), so the bake only sets the least a passed stage lasts.
CONF = {
    "stages": [50, 100],
    "bake_seconds": 6,
    "max_stage_seconds": 120,
    "looks_per_stage": 2,
    "min_samples": 100,
    "latency_margin": 1.0,
    "error_margin": 0.05,
    "accuracy_margin": 0.02,
}


@pytest.mark.parametrize(("candidate", "final"), [("2", "2"), ("3", "1")])
def test_rollout_promotes_or_rolls_back(stack, candidate, final):
    server, tmp = stack
    dag = rollout_dag()
    # v2's promotion is judged without the mirror (its copies load the candidate's session and
    # slow it on a busy machine); v3's rollback runs the mirror and the masking probe.
    dagrun = dag.test(
        run_conf={**CONF, "candidate_version": candidate, "mirror_percent": 0 if final == candidate else 100}
    )
    routes = LocalRouter(server.http, "digits", TOKEN).get_routes().to_dict()
    assert routes == {"route": [{"version": final, "weight": 100}]}
    assert server.client().get_model_metadata("digits")["versions"] == [final]
    states = {ti.task_id: ti.state for ti in dagrun.get_task_instances()}
    assert states["stage_1.enable_shadow"] == "success"
    # The grid tells a stage that passed from one that failed its test: green only when it passed.
    assert states["stage_1.wait_for_metrics"] == ("success" if final == candidate else "failed")
    assert states["stage_1.statistical_gate"] == ("success" if final == candidate else "upstream_failed")
    assert states["notify"] == "success"
    assert states["promote" if final == candidate else "rollback"] == "success"
    assert states["ensure_stable"] == "success"  # the teardown found the decision carried out
    assert not (tmp / "run" / "locks" / "digits.lock").exists()  # and released the model
    # The list of runs tells a rollback from a promotion: a rolled-back run ends failed (outcome).
    assert (states["outcome"], dagrun.state) == (("success",) * 2 if final == candidate else ("failed",) * 2)
    reports = sorted((tmp / "run" / "outbox").glob("*.json"))
    text = json.loads(reports[-1].read_text())["text"]
    assert text.startswith("Promoted" if final == candidate else "Rolled back")


def test_a_hard_guard_breach_fails_fast_and_restores_stable(stack):
    import requests

    server, tmp = stack
    server.load_versions("digits", 1, 2)
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    LocalRouter(server.http, "digits", TOKEN).set_routes(stable)  # (loaded beside it, 2 would serve)
    r = requests.put(
        f"{server.http}/v2/models/digits/versions/2/fault",
        json={"delay": {"ms": 90, "percent": 10}},
        headers=server.admin,
        timeout=10,
    )
    assert r.status_code == 200
    conf = {**CONF, "candidate_version": "2", "bake_seconds": 60, "p99_breach_seconds": 3}
    dagrun = rollout_dag().test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in dagrun.get_task_instances()}
    assert states["stage_1.wait_for_metrics"] == "failed"  # the guard tripped before the bake time ended
    assert states["rollback"] == "success"
    assert LocalRouter(server.http, "digits", TOKEN).get_routes().to_dict() == {
        "route": [{"version": "1", "weight": 100}]
    }
    text = json.loads(sorted((tmp / "run" / "outbox").glob("*.json"))[-1].read_text())["text"]
    assert "stage: hard guard tripped: Canary P99" in text  # the report names the guard


def test_a_stage_ended_undecided_shows_its_wait_failed_and_rolls_back(stack):
    """A stage held to max_stage_seconds without the samples to decide rolls back as inconclusive:
    its wait_for_metrics showed success (green in the grid: "the metrics passed"); it fails,
    saying the stage ended undecided, and the rollback and the report go on with the verdict."""
    server, tmp = stack
    conf = {
        **CONF,
        "candidate_version": "2",
        "mirror_percent": 0,
        "bake_seconds": 6,
        "max_stage_seconds": 12,
        "min_samples": 1_000_000,  # more than the stage's traffic: its last look cannot decide
    }
    dagrun = rollout_dag().test(run_conf=conf)
    tis = {ti.task_id: ti for ti in dagrun.get_task_instances()}
    states = {task_id: ti.state for task_id, ti in tis.items()}
    assert states["stage_1.wait_for_metrics"] == "failed"
    assert states["stage_1.statistical_gate"] == "upstream_failed"
    assert states["stage_2.apply_mesh_weights"] in ("upstream_failed", "skipped")  # no weight moved on
    assert (states["rollback"], states["promote"], states["notify"]) == ("success", "skipped", "success")
    assert states["ensure_stable"] == "success"
    why = tis["stage_1.wait_for_metrics"].xcom_pull(task_ids="stage_1.wait_for_metrics", key="failure")
    assert why.startswith("stage 1 (50%) ended undecided (inconclusive); the run rolls back: not enough traffic")
    assert LocalRouter(server.http, "digits", TOKEN).get_routes().to_dict() == {
        "route": [{"version": "1", "weight": 100}]
    }
    report = json.loads(sorted((tmp / "run" / "outbox").glob("*.json"))[-1].read_text())
    assert report["text"].startswith("Rolled back")
    assert "the 50% stage: not enough traffic" in json.dumps(report)  # the stage's own verdict, as before


def test_the_failure_callback_restores_stable(stack):
    from types import SimpleNamespace

    from rollout_airflow.hooks import ModelServerHook
    from rollout_airflow.steps import restore_stable_on_failure

    server, _ = stack
    server.load_versions("digits", 1, 2)
    router = LocalRouter(server.http, "digits", TOKEN)
    router.set_routes(
        TrafficPolicy.from_dict(
            {
                "route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}],
                "mirror": {"version": "2", "percent": 100},
            }
        )
    )
    mid_stage = router.get_routes()
    # What Airflow hands the DAG's on_failure_callback when a run fails or is marked failed mid-stage.
    # A run that never held the model (another run's) leaves its routes alone.
    restore_stable_on_failure({"params": {"candidate_version": "2"}, "dag_run": SimpleNamespace(run_id="other-run")})
    assert router.get_routes() == mid_stage
    lock = ModelServerHook().model_lock("digits", "local")
    lock.acquire("killed-run")  # as its build_image did
    restore_stable_on_failure({"params": {"candidate_version": "2"}, "dag_run": SimpleNamespace(run_id="killed-run")})
    assert router.get_routes().to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert lock.holding() is None  # released: the model is free for the next run
    assert server.api.ready("digits", "2")  # left loaded: a callback has no time for the drain

    # A run failing in its last stage (100% candidate, the baseline still loaded): stable again.
    promoted = {"route": [{"version": "2", "weight": 100}]}
    router.set_routes(TrafficPolicy.from_dict(promoted))
    lock.acquire("last-stage")
    restore_stable_on_failure({"params": {"candidate_version": "2"}, "dag_run": SimpleNamespace(run_id="last-stage")})
    assert router.get_routes().to_dict() == {"route": [{"version": "1", "weight": 100}]}

    # A run that fails after promote (notify, say) keeps the promoted version: promote retired the
    # baseline, and routing back to it would answer every request 503.
    router.set_routes(TrafficPolicy.from_dict(promoted))
    server.load_versions("digits", 2)  # as promote leaves it: the baseline unloaded
    lock.acquire("late-fail")
    restore_stable_on_failure({"params": {"candidate_version": "2"}, "dag_run": SimpleNamespace(run_id="late-fail")})
    assert router.get_routes().to_dict() == promoted
    assert not server.api.ready("digits", "1")


def test_with_slack_failing_the_report_lands_in_the_outbox_and_the_decision_stands(stack, monkeypatch):
    """The Slack provider's connection points at a Slack API answering 503 to every call: the
    rollback is carried out, notify puts the report in the outbox with Slack's error, and the
    run ends failed (the teardown names the undelivered report): the reviewers were not told."""
    from tests.fakes.slack_api import FakeSlack

    server, tmp = stack
    slack = FakeSlack().start()
    slack.outage = 503
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_API_DEFAULT",
        json.dumps({"conn_type": "slack", "password": slack.token, "extra": {"base_url": slack.base_url}}),
    )
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com")
    try:
        dagrun = rollout_dag().test(run_conf={**CONF, "candidate_version": "3", "mirror_percent": 0})
        # Slack back: what waits in the outbox is sent, and leaves it.
        from slack_sdk import WebClient

        from vision_rollout.folders import Folder
        from vision_rollout.notify import send_waiting

        slack.outage = None
        report = json.loads(sorted((tmp / "run" / "outbox").glob("*.json"))[-1].read_text())
        waiting = sorted(p.name for p in (tmp / "run" / "outbox").glob("*.json"))
        sent = send_waiting(Folder(str(tmp / "run" / "outbox")), WebClient(token=slack.token, base_url=slack.base_url))
        assert [r["name"] for r in sent if r.get("sent")] == waiting
        assert not list((tmp / "run" / "outbox").glob("*.json"))
    finally:
        slack.stop()
    states = {ti.task_id: ti.state for ti in dagrun.get_task_instances()}
    assert states["rollback"] == "success"
    assert states["notify"] == "success"
    assert states["ensure_stable"] == "failed"
    assert dagrun.state == "failed"
    assert [c["method"] for c in slack.calls][:1] == ["chat.postMessage"]  # Slack was tried first
    assert LocalRouter(server.http, "digits", TOKEN).get_routes().to_dict() == {
        "route": [{"version": "1", "weight": 100}]
    }
    assert report["text"].startswith("Rolled back")
    assert "upstream connect error" in report["slack_error"]
    assert slack.messages()[-1]["text"] == report["text"]
    # The run's page in Airflow's UI, from the task's own context.
    run = quote(dagrun.run_id, safe="")
    assert f"<https://airflow.example.com/dags/model_rollout/runs/{run}|{dagrun.run_id}>" in json.dumps(report)


def test_a_run_cleared_after_it_rolled_back_is_refused_touching_nothing(stack):
    """Version 2 failing a third of its requests failed its first stage and rolled back; the run
    cleared and run again (the same run id, its XComs gone) once the fault was gone started a
    fresh test of the stage, which passed, and version 2 was promoted; later, it reloaded the
    candidate and ran it again. The run ended: cleared, it is refused at build_image, naming what
    to do instead (a new run), and touches nothing."""
    import pendulum
    import requests

    server, tmp = stack
    router = LocalRouter(server.http, "digits", TOKEN)
    when = pendulum.now("UTC")  # (the run's id: a run of the same logical date and time is the same run)
    conf = {**CONF, "candidate_version": "2", "mirror_percent": 0}

    def fault(percent: int) -> None:
        r = requests.put(
            f"{server.http}/v2/models/digits/versions/2/fault",
            json={"abort": {"percent": percent}},
            headers=server.admin,
            timeout=10,
        )
        assert r.status_code == 200

    server.load_versions("digits", 1, 2)
    router.set_routes(TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    fault(33)
    first = rollout_dag().test(run_conf=conf, logical_date=when, run_after=when)
    assert {ti.task_id: ti.state for ti in first.get_task_instances()}["rollback"] == "success"
    (failed,) = (tmp / "run" / "outbox").glob("*.json")
    assert "was rolled back at the 50% stage" in json.dumps(json.loads(failed.read_text())["blocks"])
    assert router.get_routes().to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert server.client().get_model_metadata("digits")["versions"] == ["1"]
    again = rollout_dag().test(run_conf=conf, logical_date=when, run_after=when)
    assert again.run_id == first.run_id
    assert router.get_routes().to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert server.client().get_model_metadata("digits")["versions"] == ["1"]  # not loaded again
    assert not (tmp / "run" / "locks" / "digits.lock").exists()
    states = {ti.task_id: ti.state for ti in again.get_task_instances()}
    assert (states["build_image"], again.state) == ("failed", "failed")  # the error names what to do
    assert states["rollback"] == states["promote"] == states["ensure_stable"] == "upstream_failed"
