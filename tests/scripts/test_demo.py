"""scripts/demo.py's reading of a run: each stage's verdict, wherever the run left it."""

from __future__ import annotations

from devstack.airflow_api import AirflowAPIError


class XComs:
    """The REST API's XCom entries of one run: a missing one answers 404 (AirflowAPIError)."""

    def __init__(self, entries: dict[tuple[str, str], object]) -> None:
        self.entries = entries

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> object:
        if (task_id, key) not in self.entries:
            raise AirflowAPIError(f"404: no XCom {key} of {task_id}")
        return self.entries[task_id, key]


def test_the_demo_prints_the_verdict_of_a_stage_whose_wait_failed_its_test():
    """A stage that failed its test fails its wait (its verdict in the wait's XCom ``verdict``,
    statistical_gate upstream_failed): the demo printed no verdict for it, only the decision."""
    from scripts.demo import stage_verdict

    passed = {"decision": "pass", "summary": "PASS at look 3", "checks": []}
    failed = {"decision": "fail", "summary": "FAIL: accuracy", "checks": []}
    api = XComs(
        {
            ("stage_1.statistical_gate", "return_value"): passed,
            ("stage_2.wait_for_metrics", "verdict"): failed,
        }
    )
    assert [stage_verdict(api, "run", i) for i in (1, 2, 3)] == [passed, failed, None]


def test_the_demo_counts_a_rollback_that_failed_its_run_by_its_outcome_task_as_carried_out():
    """A rolled-back run ends failed (its ``outcome`` task, beside the stage that condemned the
    candidate): the demo's exit status counts it as carried out, and a run failed by anything else
    (its teardown, say) as not."""
    from scripts.demo import carried_out

    def tis(**states: str) -> dict:
        return {task_id: {"state": state} for task_id, state in states.items()}

    assert carried_out("success", "promote", tis(promote="success", outcome="success"))
    assert carried_out("failed", "rollback", tis(rollback="success", outcome="failed"))
    # (the stage that did not pass fails its wait, and its gate is upstream_failed)
    condemned = {"stage_2.wait_for_metrics": "failed", "stage_2.statistical_gate": "upstream_failed"}
    assert carried_out("failed", "rollback", tis(rollback="success", outcome="failed", **condemned))
    assert not carried_out("failed", "rollback", tis(rollback="failed", outcome="failed", **condemned))
    assert not carried_out("failed", "rollback", tis(rollback="success", outcome="failed", ensure_stable="failed"))
    assert not carried_out("failed", "promote", tis(promote="success", notify="failed"))
    assert not carried_out("success", None, tis(decide="success"))
