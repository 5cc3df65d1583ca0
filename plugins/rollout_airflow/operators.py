"""``approve_promotion``: a reviewer's go before promotion (Airflow 3's human-in-the-loop).

Asks only when the run was triggered with ``require_approval`` and the evidence says promote;
otherwise it skips. The reviewer sees the stage verdicts and the shadow audit in the UI's
"Required Actions" and answers Promote or Roll back; no answer within ``response_timeout``
takes the default, Roll back. ``decide`` reads the answer.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator

PROMOTE, ROLL_BACK = "Promote", "Roll back"


class PromotionApproval(HITLOperator):
    """``approve_promotion``: with ``require_approval``, a reviewer answers Promote or Roll back
    in Airflow's Required Actions (Roll back when no answer comes in ``response_timeout``);
    skipped otherwise, and when the evidence says roll back."""

    def __init__(self, *, max_stages: int, response_timeout: timedelta = timedelta(hours=24), **kwargs: Any):
        super().__init__(subject="Promote {{ params.model }} v{{ params.candidate_version }} to 100%?",
                         options=[PROMOTE, ROLL_BACK], defaults=ROLL_BACK, response_timeout=response_timeout,
                         **kwargs)  # fmt: skip
        self.max_stages = max_stages

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from rollout_airflow import steps

        params = context["params"]
        if not params.get("require_approval"):
            raise AirflowSkipException("require_approval is off: promotion needs no reviewer")
        evidence = steps.evidence(context["ti"], self.max_stages)
        outcome, reason = steps.judge_evidence(params, *evidence)
        if outcome != "promote":
            raise AirflowSkipException(f"nothing to approve, the evidence says roll back: {reason}")
        self.body = steps.approval_body(params, reason, evidence[0])
        return super().execute(context)
