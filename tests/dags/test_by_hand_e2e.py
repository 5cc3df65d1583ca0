"""dag.test() of model_rollout with what a user does by hand in the UI: a task marked success,
cleared, or failed."""

from __future__ import annotations

import json

import pytest

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
