"""
### shadow_audit

Every hour, for each model: how the shadow (candidate) answered the previous clock hour's
mirrored requests (a run triggered by hand: the last whole hour, its report replaced), and each
earlier hour of the last `catch_up_hours` not yet audited (the scheduler was down, or Slack did
not take its report), compared with the primary: top-1 agreement with its interval, output divergence,
the confusion matrix and anomaly samples with their image hashes. The report (Markdown, CSV,
PNG) is kept and sent to Slack. An hour without shadow data is marked audited with a note, not
failed; a report Slack did not take fails the task once every hour was tried (kept in the outbox;
the retry, or the next run, sends it again).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import Param, dag, task


@dag(
    dag_id="shadow_audit",
    # Two minutes past each hour: the hour's last records are written by then (audited_hour), so
    # a scheduled run waits for nothing; a run triggered by hand audits the last whole hour.
    schedule="2 * * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["ml", "shadow", "audit"],
    params={
        "models": Param(
            ["digits"], type="array", items={"type": "string"}, description="Models to audit", section="Audit"
        ),
        "slack_channel": Param("#model-rollouts", type="string", description="Where reports go", section="Audit"),
        "catch_up_hours": Param(
            24,
            type="integer",
            minimum=0,
            maximum=168,
            description="Earlier hours audited when they were not (the scheduler down, a report not sent)",
            section="Audit",
        ),
    },
    default_args={"owner": "ml-platform", "retries": 1},
)
def shadow_audit() -> None:
    from rollout_airflow import steps

    @task
    def models(params: dict[str, Any]) -> list[str]:
        return list(params["models"])

    @task
    def audit_hours(model: str, data_interval_end: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        return steps.audit_hours(model, data_interval_end, params["slack_channel"], params["catch_up_hours"])

    audit_hours.expand(model=models())


shadow_audit()
