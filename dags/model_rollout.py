"""
### model_rollout

Roll a new version of a model out to production, or roll it back, with the evidence.

1. **build_image**: verify the candidate artifact (loads, signature, golden inference), and warn
   of what the plan cannot show (a validation set too small for the accuracy margin: the size
   it needs, in the log and the final report); then load it
   beside the baseline (mesh `local`), or (mesh `istio`) **buildkit_build** builds its image in a
   BuildKit pod (skipped in local mode) and **deploy_candidate** runs it as its own Deployment.
2. **apply_mesh_weights**: the stage's traffic split through the mesh router.
3. **enable_shadow**: mirror on; a probe with a synthetic phone number must reach the shadow
   log only masked.
4. **wait_for_metrics**: a sensor poking every look interval (reschedule mode: no worker slot
   between pokes): a replay of the validation images through both versions, the hard guards and
   GPU gauges from Prometheus (a breach fails at once), and the stage's looks judged from the
   prediction log (live A/B arms, replay), each once, until one decides. Green only when the
   stage passed: a stage that failed its test or ended undecided (inconclusive) fails it, saying
   which, and the run rolls back.
5. **statistical_gate**: the verdict of a stage that passed (non-inferiority, sequential alpha
   spending); upstream_failed after a wait that failed; failed, saying so, after a wait marked
   success by hand (no verdict: the run rolls back).
6. **shadow_consistency**: the shadow audit over this run.
7. **decide**: promote (100% candidate, baseline retired, mirror off) or roll back (100% stable,
   candidate unloaded, mirror off); then **notify** sends the report to Slack, with a chart of
   the stage that decided (both arms' latencies and accuracy, from the prediction log). With
   `require_approval`, **approve_promotion** first asks a reviewer (Required Actions in the UI;
   no answer in 24 h rolls back). While it waits, the last stage's hard guards are read every
   look interval: a breach (or that many reads in a row that fail, `guard_error_limit`) puts
   stable back at once, tells Slack and answers Roll back, and decide rolls back whatever the
   answer. The wait runs on Airflow's triggerer: with none running, it ends 2 minutes past its
   deadline and rolls back the same way.

Stages after the first repeat steps 2, 4 and 5. Whatever fails, decide rolls back.

**outcome** ends the run as the list of runs shows it: success when promoted; failed, naming the
reason, when rolled back (the stable version back and the report sent before it).

A stage's sequential test is kept in the run folder: a stage cleared here (or retried) resumes
it at its next look, or reports the decision it took (a failed stage stays failed). A fresh test
is asked for with `rolloutctl restart-stage`, and its report says so and what it costs. A run
that ended is not rolled out again by a clear (trigger a new run): cleared above **decide**,
**build_image** refuses it, touching nothing; **notify** cleared sends its report again. A run
whose id names another run's folder (a run deleted and triggered again with its id) is refused
by **build_image** the same way, naming both.

Runs of different models go on side by side; one model has one run at a time: **build_image**
takes the model's lease (a Kubernetes Lease `rollout-<VirtualService>`, or a lock file in local mode),
every step renews it, the teardown **ensure_stable** releases it (and fails the run when the
report was not sent, the decision kept; where notify did not run, it sends the report itself). A second run of the same
model fails its first task at once, naming the run that holds the model, and touches nothing.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

# Named here, the pod operator the image build is (with the kubernetes clients, 1.2 s) is imported
# once by the dag processor, before it forks each parse (`parsing_pre_import_modules`).
import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401
import pendulum
from airflow.sdk import Param, TriggerRule, dag, task, task_group

from rollout_airflow.operators import ImageBuild, PromotionApproval
from rollout_airflow.sensors import StageMetricsSensor
from vision_rollout.spec import RolloutSpec

MAX_STAGES = 4
SECTIONS = {
    "model": "Model",
    "candidate_version": "Model",
    "baseline_version": "Model",
    "stages": "Stages",
    "bake_seconds": "Stages",
    "max_stage_seconds": "Stages",
    "looks_per_stage": "Stages",
    "mirror_percent": "Stages",
    "min_samples": "Statistics",
    "alpha": "Statistics",
    "spending": "Statistics",
    "latency_margin": "Statistics",
    "tail_margin": "Statistics",
    "error_margin": "Statistics",
    "accuracy_margin": "Statistics",
    "p99_ms_max": "Hard guards",
    "p99_breach_seconds": "Hard guards",
    "accuracy_drop_max": "Hard guards",
    "shadow_error_rate_max": "Hard guards",
    "restarts_max": "Hard guards",
    "guard_error_limit": "Hard guards",
    "shadow_agreement_min": "Shadow audit",
    "shadow_anomaly_rate_max": "Shadow audit",
    "mesh": "Delivery",
    "slack_channel": "Delivery",
    "require_approval": "Delivery",
}


def restore_stable_on_failure(context: dict[str, Any]) -> None:
    """A failed or killed run leaves the stable version at 100%."""
    from rollout_airflow.steps import restore_stable_on_failure as restore

    restore(context)


def build_report(ti: Any, field: str) -> Any:
    """A field of build_image's report (its XCom): ``sha256``, of the candidate's file as it
    verified it; ``preflight``, its warnings. None when it has none."""
    report = ti.xcom_pull(task_ids="build_image")
    return report.get(field) if isinstance(report, dict) else None


def rollout_params() -> dict[str, Param]:
    """The trigger form from RolloutSpec's JSON schema: one source for types, limits and defaults."""
    out = {}
    for name, prop in RolloutSpec.json_schema()["properties"].items():
        schema = {k: v for k, v in prop.items() if k != "default"}
        if name == "stages":
            schema["maxItems"] = MAX_STAGES
        out[name] = Param(prop["default"], section=SECTIONS[name], **schema)
    return out


@dag(
    dag_id="model_rollout",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=16,  # one run at a time per model: build_image takes the model's lease
    doc_md=__doc__,
    tags=["ml", "rollout", "canary"],
    params=rollout_params(),
    default_args={"owner": "ml-platform", "retries": 0},
    on_failure_callback=restore_stable_on_failure,
)
def model_rollout() -> None:
    from rollout_airflow import steps

    # Its retry keeps the model this run's in the delay: no other run of it takes it meanwhile.
    @task(retries=1, retry_delay=timedelta(minutes=1))
    def build_image(params: dict[str, Any], run_id: str, ti: Any, dag_run: Any) -> dict[str, Any]:
        retry_in = None if ti.try_number > ti.max_tries else int(ti.task.retry_delay.total_seconds())
        # (cleared once the run ended: starts nothing again, lets the report be sent again)
        report_only = steps.decision_stands(ti)
        run_after = dag_run.run_after.isoformat()  # (with its id, which DAG run this is: a clear keeps it)
        return steps.build_image(params, run_id, retry_in_s=retry_in, report_only=report_only, run_after=run_after)

    @task(trigger_rule=TriggerRule.NONE_FAILED, retries=1)  # after the image build, or its skip in local mode
    def deploy_candidate(params: dict[str, Any], run_id: str, ti: Any) -> str:
        return steps.deploy_candidate(params, ti.xcom_pull(task_ids="buildkit_build", key="image"), run_id)

    @task
    def enable_shadow(params: dict[str, Any], run_id: str, ti: Any) -> dict[str, Any]:
        with steps.failure_kept(ti):
            return steps.enable_shadow(params, run_id)

    @task(trigger_rule=TriggerRule.ALL_DONE)
    def shadow_consistency(params: dict[str, Any], dag_run: Any) -> dict[str, Any]:
        return steps.shadow_consistency(params, dag_run.start_date, dag_run.run_id)

    @task.branch(trigger_rule=TriggerRule.ALL_DONE)
    def decide(params: dict[str, Any], ti: Any) -> str:
        approval = ti.xcom_pull(task_ids="approve_promotion")
        outcome, reason = steps.decide(params, *steps.evidence(ti, MAX_STAGES), approval=approval)
        ti.xcom_push(key="reason", value=reason)
        ti.xcom_push(key="outcome", value=outcome)
        return outcome

    @task
    def promote(params: dict[str, Any], run_id: str, ti: Any) -> str:
        return steps.promote(params, run_id, ti.xcom_pull(task_ids="decide", key="outcome"), build_report(ti, "sha256"))

    @task
    def rollback(params: dict[str, Any], run_id: str) -> str:
        return steps.rollback(params, run_id)

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def notify(params: dict[str, Any], run_id: str, ti: Any) -> dict[str, Any]:
        outcome, reason = (ti.xcom_pull(task_ids="decide", key=k) for k in ("outcome", "reason"))
        warned = build_report(ti, "preflight")
        return steps.notify(params, outcome, reason or "", steps.stage_verdicts(ti, MAX_STAGES), warned, run_id)

    @task
    def outcome(params: dict[str, Any], ti: Any) -> str:
        decided, reason = (ti.xcom_pull(task_ids="decide", key=k) for k in ("outcome", "reason"))
        return steps.outcome(params, decided, reason or "")

    @task
    def ensure_stable(params: dict[str, Any], run_id: str, ti: Any) -> str:
        promoted, rolled_back, report = (ti.xcom_pull(task_ids=t) for t in ("promote", "rollback", "notify"))
        decided = ti.xcom_pull(task_ids="decide", key="outcome")

        def verdicts() -> list[Any]:  # (the chart of a report the teardown sends itself: once it restored)
            return steps.stage_verdicts(ti, MAX_STAGES)

        return steps.ensure_stable(params, run_id, promoted, rolled_back, report, decided, verdicts)

    def stage(index: int, previous: Any) -> Any:
        @task_group(group_id=f"stage_{index + 1}")
        def group(previous: Any) -> Any:
            @task(trigger_rule=TriggerRule.ALL_SUCCESS if index == 0 else TriggerRule.NONE_FAILED)
            def apply_mesh_weights(
                previous: dict[str, Any] | None, params: dict[str, Any], run_id: str, ti: Any
            ) -> dict[str, Any]:
                with steps.failure_kept(ti):
                    return steps.apply_weights(params, index, run_id, previous, build_report(ti, "sha256"))

            @task
            def statistical_gate(verdict: dict[str, Any] | None, params: dict[str, Any], ti: Any) -> dict[str, Any]:
                with steps.failure_kept(ti):
                    return steps.gate_verdict(params, index, verdict)

            applied = apply_mesh_weights(previous)
            # A retry, or a re-run of the stage cleared in the UI, resumes its test (its window and
            # its decision are kept in the run folder: vision_rollout.attempts); a tripped guard
            # fails without retrying.
            waited = StageMetricsSensor(
                task_id="wait_for_metrics",
                stage_index=index,
                applied=applied,
                retries=2,
                retry_delay=timedelta(seconds=5),
            )
            if index == 0:  # after the candidate's Deployment; mirror and masking checked once
                deployed >> applied
                applied >> enable_shadow() >> waited
            return statistical_gate(waited.output)

        return group(previous)

    built = previous = build_image()
    deployed = (
        ImageBuild(task_id="buildkit_build", plan=built, retries=1, retry_delay=timedelta(minutes=1))
        >> deploy_candidate()
    )
    gates = []
    for index in range(MAX_STAGES):
        previous = stage(index, previous)
        gates.append(previous)
    approval = PromotionApproval(task_id="approve_promotion", max_stages=MAX_STAGES, trigger_rule=TriggerRule.ALL_DONE)
    reported = gates >> shadow_consistency() >> approval >> decide() >> [promote(), rollback()] >> notify()
    # Whatever ends the run (a failed task, or a run marked failed in the UI), stable is restored
    # unless the candidate was promoted: Airflow runs teardowns in both cases.
    reported >> ensure_stable().as_teardown(setups=built, on_failure_fail_dagrun=True)
    reported >> outcome()  # a rollback fails it: the run shows failed in the list of runs


model_rollout()
