"""dag.test() of model_rollout with what a user does by hand in the UI: a task marked success,
cleared, or failed."""

from __future__ import annotations

import json
from contextlib import contextmanager
from unittest.mock import patch

import pendulum
import pytest
from airflow.models.dagrun import DagRun
from airflow.utils.types import DagRunType
from sqlalchemy import select

from tests.dags.test_model_rollout_e2e import CONF, TOKEN, rollout_dag, stack  # noqa: F401
from vision_rollout.mesh import LocalRouter

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STABLE = {"route": [{"version": "1", "weight": 100}]}


def last_report(tmp) -> dict:
    return json.loads(sorted((tmp / "run" / "outbox").glob("*.json"))[-1].read_text())


def test_a_wait_marked_success_by_hand_rolls_back_saying_so(stack):  # noqa: F811
    """stage_1.wait_for_metrics marked success in the UI before its test decided: no verdict.
    The run said "the 50% stage produced no verdict: a step failed or was interrupted"; it says
    the wait was marked success by hand, and rolls back."""
    server, tmp = stack
    conf = {**CONF, "candidate_version": "2", "mirror_percent": 0}
    dagrun = rollout_dag().test(run_conf=conf, mark_success_pattern=r"^stage_1\.wait_for_metrics$")
    tis = {ti.task_id: ti for ti in dagrun.get_task_instances()}
    states = {task_id: ti.state for task_id, ti in tis.items()}
    assert states["stage_1.wait_for_metrics"] == "success"
    assert states["stage_1.statistical_gate"] == "failed"
    assert states["stage_2.apply_mesh_weights"] == "upstream_failed"  # no weight moved on
    assert (states["rollback"], states["promote"], states["ensure_stable"]) == ("success", "skipped", "success")
    assert (states["outcome"], dagrun.state) == ("failed", "failed")  # rolled back
    reason = tis["decide"].xcom_pull(task_ids="decide", key="reason")
    assert reason.startswith("the 50% stage: stage 1 (50%): its wait_for_metrics was marked success by hand")
    assert LocalRouter(server.http, "digits", TOKEN).get_routes().to_dict() == STABLE
    report = last_report(tmp)
    assert report["text"].startswith("Rolled back")
    assert "marked success by hand" in json.dumps(report)


WHEN = pendulum.datetime(2026, 3, 1, tz="UTC")  # one run's logical date and run_after: its run_id


PROMOTED = {"route": [{"version": "2", "weight": 100}]}


def promoted_run(tmp) -> tuple[dict, DagRun, int]:
    """The run of WHEN rolling version 2 out (no mirror), promoted: its conf, the run, and how
    many reports the outbox holds after it."""
    conf = {**CONF, "candidate_version": "2", "mirror_percent": 0}
    first = rollout_dag().test(run_conf=conf, logical_date=WHEN, run_after=WHEN)
    assert first.state == "success"
    return conf, first, len(list((tmp / "run" / "outbox").glob("*.json")))


def promotion_stands(server, tmp) -> None:
    """Version 2 takes all of the traffic and alone is loaded; no run holds the model's lease."""
    assert LocalRouter(server.http, "digits", TOKEN).get_routes().to_dict() == PROMOTED
    assert server.client().get_model_metadata("digits")["versions"] == ["2"]
    assert not (tmp / "run" / "locks" / "digits.lock").exists()


@contextmanager
def cleared_with_downstream(task_id: str):
    """The next dag.test() of the same logical date runs that run again as the UI's "Clear" of
    ``task_id`` with its downstream leaves it: those tasks cleared, with the setup build_image
    (Airflow clears a teardown's setups with it), the run running; the rest as they ended.
    (dag.test() would clear every task, then delete the run and create it afresh.)"""
    import airflow.models.dagrun
    from airflow.serialization.definitions.dag import SerializedDAG
    from airflow.utils.state import DagRunState

    run_id = DagRun.generate_run_id(run_type=DagRunType.MANUAL, logical_date=WHEN, run_after=WHEN)

    def clear_dags(dags, **_):
        (dag,) = dags
        cleared = dag.partial_subset(task_ids=[task_id], include_downstream=True, include_upstream=False)
        assert "build_image" in cleared.task_dict  # (as in the UI)
        dag.clear(task_ids=list(cleared.task_dict), run_id=run_id, dag_run_state=DagRunState.RUNNING)

    def the_run(dag, session, **_):
        run = session.scalars(select(DagRun).where(DagRun.dag_id == dag.dag_id, DagRun.run_id == run_id)).one()
        run.dag = dag
        return run

    with (
        patch.object(SerializedDAG, "clear_dags", clear_dags),
        patch.object(airflow.models.dagrun, "get_or_create_dagrun", the_run),
    ):
        yield


def test_notify_cleared_after_a_promotion_sends_the_report_again_touching_nothing(stack):  # noqa: F811
    """notify cleared with its downstream once the run promoted: build_image ran again, refused
    ("baseline version 1 is not what serves now ... touched nothing") and told Slack the run was
    not started; the run turned failed, notify never ran. It now starts nothing (routes, loads,
    lease untouched) and notify sends the promotion's report again, saying it is sent again."""
    server, tmp = stack
    conf, first, reports = promoted_run(tmp)
    assert LocalRouter(server.http, "digits", TOKEN).get_routes().to_dict() == PROMOTED
    with cleared_with_downstream("notify"):
        again = rollout_dag().test(run_conf=conf, logical_date=WHEN, run_after=WHEN)
    assert again.run_id == first.run_id
    states = {ti.task_id: ti.state for ti in again.get_task_instances()}
    assert (states["build_image"], states["notify"], states["outcome"], states["ensure_stable"]) == ("success",) * 4
    assert again.state == "success"
    promotion_stands(server, tmp)
    assert len(list((tmp / "run" / "outbox").glob("*.json"))) == reports + 1  # the report, once more
    text = last_report(tmp)["text"]
    assert text.startswith("Sent again: notify was cleared after the run ended")
    assert "Promoted" in text


def test_promote_cleared_after_a_promotion_re_verifies_it_touching_nothing(stack):  # noqa: F811
    """promote cleared with its downstream once the run promoted: build_image ran again, refused
    ("baseline version 1 is not what serves now") and told Slack the run was not rolled out; the
    run turned failed. Now promote re-verifies the promotion, touching nothing, notify sends the
    report again, and the run stays a success."""
    server, tmp = stack
    conf, _, reports = promoted_run(tmp)
    with cleared_with_downstream("promote"):
        again = rollout_dag().test(run_conf=conf, logical_date=WHEN, run_after=WHEN)
    states = {ti.task_id: ti.state for ti in again.get_task_instances()}
    assert (states["build_image"], states["promote"], states["notify"], states["ensure_stable"]) == ("success",) * 4
    assert (states["outcome"], again.state) == ("success", "success")
    promotion_stands(server, tmp)
    assert len(list((tmp / "run" / "outbox").glob("*.json"))) == reports + 1
    assert last_report(tmp)["text"].startswith("Sent again")


def test_a_promoted_run_cleared_whole_is_refused_and_stays_a_success(stack):  # noqa: F811
    """The whole run cleared once it promoted: build_image refused it (the run ended) and failed,
    and the run, whose promotion stands, turned failed in the list of runs. It skips now, saying
    why, every task after it skips, nothing is touched, and the run stays a success."""
    server, tmp = stack
    conf, _, reports = promoted_run(tmp)
    again = rollout_dag().test(run_conf=conf, logical_date=WHEN, run_after=WHEN)  # (every task cleared)
    states = {ti.task_id: ti.state for ti in again.get_task_instances()}
    assert (states["build_image"], states["promote"], states["outcome"]) == ("skipped",) * 3
    assert again.state == "success"
    promotion_stands(server, tmp)
    assert len(list((tmp / "run" / "outbox").glob("*.json"))) == reports
