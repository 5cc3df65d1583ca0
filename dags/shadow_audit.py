"""
### shadow_audit

Every hour, for each model: how the shadow (candidate) answered the previous clock hour's
mirrored requests (a run triggered by hand: the last whole hour, its report replaced), and each
earlier hour of the last `catch_up_hours` not yet audited (the scheduler was down), compared with the primary: top-1 agreement with its interval, output divergence,
the confusion matrix and anomaly samples with their image hashes. The report (Markdown, CSV,
PNG) is kept and sent to Slack. An hour without shadow data is marked audited with a note, not
failed; a report Slack did not take fails the task once every hour was tried (kept in the outbox,
which each run, and its retry, sends first: each report once). Records written after their
hour closed (a slow flush, a clock ahead) are left out of its audit and counted in it, and in
the next hour's when they came after its audit; but a copy the model server's own mirror made
is due by its hour's close: one written later is lost to its hour's audit, the first and any
retry alike, and counted late by none. Hours older than
`retention_days` lose their folder, and the stage caches of rollouts killed mid-stage go; so do
the model's rollout run folders (never that of the run its lock, file or Lease, names) and
approval waits' counts unchanged for `retention_days`, and the outbox's leftovers of killed
senders (never a report waiting).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

from vision_rollout.spec import RolloutSpec


def _rollout_schema(name: str) -> dict[str, Any]:
    """A rollout's field's JSON schema (its type, pattern and length), without its default and description."""
    return {
        k: v for k, v in RolloutSpec.json_schema()["properties"][name].items() if k not in ("default", "description")
    }


@dag(
    dag_id="shadow_audit",
    # Four minutes past each hour, the first whole minute after the hour's close (3 min 6 s:
    # closes, copy_due) and its last file's write (audited_hour): the hour's last records (the
    # last copies, stamped by a shadow pod's clock ahead, that waited for idle time) are written
    # by then, so a scheduled run waits for nothing; a run triggered by hand audits the last
    # whole hour, waiting what remains.
    schedule="4 * * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["ml", "shadow", "audit"],
    params={
        # A model once (twice, its two audits would race on its hours and report them twice),
        # named as a rollout names it; at most as many as Airflow maps ([core] max_map_length).
        "models": Param(
            ["digits"],
            type="array",
            items=_rollout_schema("model"),
            uniqueItems=True,
            maxItems=1024,
            description="Models to audit",
            section="Audit",
        ),
        "slack_channel": Param(
            "#model-rollouts", **_rollout_schema("slack_channel"), description="Where reports go", section="Audit"
        ),
        "catch_up_hours": Param(
            24,
            type="integer",
            minimum=0,
            maximum=168,
            description="Earlier hours audited when they were not (the scheduler down)",
            section="Audit",
        ),
        "retention_days": Param(
            30,
            type="integer",
            minimum=8,  # (more than the longest catch-up window: an hour pruned in it is audited again)
            maximum=3660,
            description="Days an hour's audit report, and a rollout run's folder unchanged, are kept",
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
    def audit_hours(model: str, dag_run: Any, params: dict[str, Any], ti: Any) -> list[dict[str, Any]]:
        # A retry of a failed try (not a first try, nor one cleared by hand: the first try after
        # a clear is max_tries - retries + 1, as Airflow's sensors count it).
        retry = ti.try_number > ti.max_tries - (ti.task.retries or 0) + 1
        return steps.audit_hours(
            model,
            # A run triggered without a logical date has no data interval: the hour before its trigger.
            dag_run.data_interval_end or dag_run.run_after,
            params["slack_channel"],
            params["catch_up_hours"],
            retry=retry,
            retention_days=params["retention_days"],
            run_id=dag_run.run_id,
        )

    audit_hours.expand(model=models())


shadow_audit()
