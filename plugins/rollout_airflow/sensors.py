"""``wait_for_metrics``: a reschedule-mode sensor over the rollout engine's stage looks.

Each poke is one short task run in a worker (the slot is freed between pokes): a replay round
through both versions, the hard guards from Prometheus, then the engine judges, in order, the
looks whose time has come, from the prediction log. The judgement is a pure function of the log
and the clock, so a poke that comes late, or a retried try, judges the same looks to the same
verdicts. The stage's test lives in the run folder, not in the task (``vision_rollout.attempts``):
its window's start, and its decision once taken, which a cleared or retried try reports again
instead of judging anew. Nothing is deferred: a stage of 10 looks does not resume
a deferred task 10 times (each resumption is exposed to Airflow 3.3's stale-event race,
apache/airflow#72716).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowSensorTimeout

GRACE_S = 300  # past max_stage_seconds, the sensor's own timeout (the engine decides before)


class StageMetricsSensor(BaseSensorOperator):
    """``wait_for_metrics`` of one stage: each poke sends a validation replay round and judges the
    looks that are due (``steps.look_at_stage``); done with the stage's verdict as its XCom when
    the stage passed; failed (no retry) when its test failed or it ended undecided, its verdict
    in XCom ``verdict`` (``steps.unpassed_fails``), and at once when a hard guard trips (after
    putting the stable version back)."""

    template_fields = ("applied",)
    ui_color = "#e8f4fd"

    def __init__(self, *, stage_index: int, applied: Any, **kwargs: Any) -> None:
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.stage_index, self.applied = stage_index, applied

    def execute(self, context: Any) -> Any:
        from rollout_airflow.steps import spec_from
        from vision_rollout.engine import poke_interval

        spec = spec_from(context["params"])
        self.poke_interval = poke_interval(spec)
        self.timeout = spec.max_stage_seconds + GRACE_S
        try:
            return super().execute(context)
        except AirflowSensorTimeout:  # its pokes held the stage to the end: why, kept for the report
            from airflow.sdk.timezone import utcnow

            first = context["ti"].get_first_reschedule_date(context)
            held = f" after {(utcnow() - first).total_seconds():.0f} s" if first else ""
            context["ti"].xcom_push(
                key="failure",
                value=f"stage {self.stage_index + 1} ({spec.stages[self.stage_index]}%): its wait timed out without a "
                f"verdict{held} (max_stage_seconds {spec.max_stage_seconds} s and {GRACE_S} s more): its pokes held "
                "the stage (their log lines say why)",
            )
            raise

    def poke(self, context: Any) -> PokeReturnValue:
        from rollout_airflow.steps import failure_kept, poke_stage, unpassed_fails

        ti = context["ti"]
        ti_id = str(getattr(ti, "id", None) or "") or None
        with failure_kept(ti):
            verdict = poke_stage(
                context["params"],
                self.stage_index,
                self.applied,
                context["run_id"],
                ti_id or str(getattr(ti, "try_number", "")) or None,
                ti_id,
            )
            if verdict is not None:
                unpassed_fails(context["params"], self.stage_index, verdict, ti)
        return PokeReturnValue(is_done=verdict is not None, xcom_value=verdict)
