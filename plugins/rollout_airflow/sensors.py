"""``wait_for_metrics``: a deferrable sensor (the provider pattern: ``deferrable=False`` pokes).

Deferred, the wait costs no worker slot: ``StageMetricsTrigger`` polls Prometheus in the
triggerer until the stage is baked (or a hard guard trips), then the sensor resumes, runs the
statistical gate and returns its verdict (XCom). A gate that wants more evidence defers again
until the next look. A retry looks once itself before deferring: a stage already over is
judged in the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from rollout_airflow.triggers import StageMetricsTrigger


class StageMetricsSensor(BaseSensorOperator):
    template_fields = ("applied",)
    ui_color = "#e8f4fd"

    def __init__(self, *, stage_index: int, applied: Any, deferrable: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("poke_interval", 2.0)
        super().__init__(**kwargs)
        self.stage_index, self.applied, self.deferrable = stage_index, applied, deferrable

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            return super().execute(context)
        if context["ti"].try_number > 1:
            from rollout_airflow.steps import stage_event

            # A retry looks before deferring: its stage has usually baked already, and a trigger
            # firing at once is the window where Airflow 3.3 can fail the resumed task
            # (apache/airflow#72716, the reason for the retry). Judged here instead.
            event = stage_event(context["params"], self.stage_index, self.applied)
            if event is not None:
                return self.execute_complete(context, event)
        self._defer(context, not_before=0.0)

    def _defer(self, context: Any, not_before: float) -> None:
        from rollout_airflow.steps import stage_plan

        plan = stage_plan(context["params"], self.stage_index, self.applied)
        self.defer(
            trigger=StageMetricsTrigger(
                **plan, not_before=not_before, poll_seconds=float(self.poke_interval)
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=plan["params"]["max_stage_seconds"] + 300),
        )

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        from rollout_airflow.steps import judge_stage

        self.log.info("stage %d: %s after %.0f s; served %s; GPU %s", self.stage_index + 1, event["status"],
                      event["elapsed_s"], event["served"], event["gpu"] or "none")  # fmt: skip
        with _reason_kept(context):
            verdict = judge_stage(context["params"], self.stage_index, event, context["run_id"])
        if verdict is None:  # the gate wants more evidence: look again later
            spec = context["params"]
            self._defer(context, event["elapsed_s"] + max(float(self.poke_interval),
                                                          spec["bake_seconds"] / spec["looks_per_stage"]))  # fmt: skip
        return verdict  # type: ignore[return-value]

    def poke(self, context: Any) -> PokeReturnValue:
        from rollout_airflow.steps import wait_for_metrics

        with _reason_kept(context):
            done, verdict = wait_for_metrics(
                context["params"], self.stage_index, self.applied, context["run_id"]
            )
        return PokeReturnValue(is_done=done, xcom_value=verdict)


@contextmanager
def _reason_kept(context: Any) -> Iterator[None]:
    """A failing wait leaves its reason in XCom (key ``failure``): the rollback report names it."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except AirflowFailException as exc:
        context["ti"].xcom_push(key="failure", value=str(exc))
        raise
