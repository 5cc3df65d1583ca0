"""The rollout's own operators.

``buildkit_build``: the candidate's serving image built by BuildKit (rootless) in a pod, the cncf
provider's KubernetesPodOperator fed by ``build_image``'s plan (XCom): its own task in the UI,
with its retries, its log streamed from the pod and deferrable mode from Airflow's configuration
(``[operators] default_deferrable``). Its XCom ``image`` is the tag pinned to the digest the
registry stored (``<tag>@sha256:...``), read from the finished pod's status. Skipped when the
plan is empty (mesh ``local``).

``approve_promotion``: a reviewer's go before promotion (Airflow 3's human-in-the-loop).
Asks only when the run was triggered with ``require_approval`` and the evidence says promote;
otherwise it skips. The reviewer sees the stage verdicts and the shadow audit in the UI's
"Required Actions" and answers Promote or Roll back; no answer within ``response_timeout``
takes the default, Roll back. Slack is told an answer is awaited, with the evidence.
Meanwhile the last stage's hard guards are read every look interval (``triggers``): one that
trips puts the stable version back at once, tells Slack, and answers Roll back in the
approver's stead; a Promote reads them once more before it counts, with the accuracy-drop guard
on a validation replay round sent then (``steps.replay_while_waiting``). ``decide`` reads the
answer, and the breach (``guard_breach``) whatever the answer. Where no triggerer runs the
trigger (or it fails), the scheduler ends the wait ``NO_TRIGGERER_GRACE_S`` past the deadline,
and that is taken as a breach is.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk.exceptions import TaskAwaitingInput

PROMOTE, ROLL_BACK = "Promote", "Roll back"
BUILD_LEASE_S = 2 * 3600  # the model's lease while its image builds (a pod start and a build)
# Past the answer's deadline, how long the approval's wait may go without an event from its
# trigger before the scheduler ends it (no triggerer ran the trigger): within the lease's margin.
NO_TRIGGERER_GRACE_S = 120


class ImageBuild(KubernetesPodOperator):
    """``buildkit_build``: runs the build pod of ``plan``, ``build_image``'s output (its ``build``,
    from ``steps.build_plan``: ``pod``, a V1Pod as a dict, its ``name`` and ``namespace``),
    streams its log and deletes it once it succeeded (a failed one stays for inspection), and
    pushes XCom ``image``: the pushed tag by digest, from the build container's termination
    message (``images.pushed_image``). Skipped when the output has no ``build`` (mesh ``local``)."""

    template_fields = (*KubernetesPodOperator.template_fields, "plan")

    def __init__(self, *, plan: Any, **kwargs: Any) -> None:
        kwargs.setdefault("kubernetes_conn_id", "kubernetes_default")
        kwargs.setdefault("startup_timeout_seconds", 600)
        super().__init__(
            get_logs=True,
            on_finish_action="delete_succeeded_pod",
            # The operator's own setting wins over the pod's: as build_pod sets it.
            termination_message_policy="FallbackToLogsOnError",
            **kwargs,
        )
        self.plan = plan
        self.metadata: str | None = None

    def post_complete_action(self, *, pod: Any, remote_pod: Any, context: Any, result: Any, **kwargs: Any) -> None:
        """The finished pod, before it is deleted: its build container's termination message."""
        from airflow.providers.cncf.kubernetes.utils.container import get_container_termination_message

        if remote_pod is not None:
            self.metadata = get_container_termination_message(remote_pod, self.base_container_name)
        super().post_complete_action(pod=pod, remote_pod=remote_pod, context=context, result=result, **kwargs)

    def push_image(self, context: Any) -> str:
        """XCom ``image``: the tag the build pushed, by the digest the registry stored."""
        from airflow.exceptions import AirflowException

        from vision_rollout.images import pushed_image

        plan = self.plan["build"]
        try:
            image = pushed_image(plan["image"], self.metadata)
        except ValueError as exc:  # a retry builds again (cached) and reads a pod of its own
            raise AirflowException(f"build pod {plan['namespace']}/{plan['name']}: {exc}") from None
        context["ti"].xcom_push(key="image", value=image)
        self.log.info("pushed %s", image)
        return image

    def prepare(self, plan: dict[str, Any]) -> None:
        """The pod of this build: its template, name and namespace from the plan."""
        self.pod_template_dict = plan["pod"]
        self.name, self.namespace = plan["name"], plan["namespace"]

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        plan = (self.plan or {}).get("build")
        if not plan:
            raise AirflowSkipException("mesh 'local': the candidate is loaded beside the baseline, no image to build")
        from rollout_airflow import steps

        steps.hold(steps.spec_from(context["params"]), context["run_id"], seconds=BUILD_LEASE_S)
        self.prepare(plan)
        super().execute(context)  # deferrable: raises TaskDeferred, and resumes in trigger_reentry
        return self.push_image(context)

    def trigger_reentry(self, context: Any, event: dict[str, Any]) -> Any:
        super().trigger_reentry(context, event)
        return self.push_image(context)


class PromotionApproval(HITLOperator):
    """``approve_promotion``: with ``require_approval``, a reviewer answers Promote or Roll back
    in Airflow's Required Actions (Roll back when no answer comes in ``response_timeout``), while
    the last stage's hard guards are read on (``GuardedApprovalTrigger``); skipped otherwise, and
    when the evidence says roll back."""

    def __init__(self, *, max_stages: int, response_timeout: timedelta = timedelta(hours=24), **kwargs: Any):
        super().__init__(
            subject="Promote {{ params.model }} v{{ params.candidate_version }} to 100%?",
            options=[PROMOTE, ROLL_BACK],
            defaults=ROLL_BACK,
            response_timeout=response_timeout,
            **kwargs,
        )
        self.max_stages = max_stages

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from rollout_airflow import steps
        from vision_rollout.locks import LEASE_S, MAX_LEASE_S

        params = context["params"]
        if not params.get("require_approval"):
            raise AirflowSkipException("require_approval is off: promotion needs no reviewer")
        evidence = steps.evidence(context["ti"], self.max_stages)
        outcome, reason = steps.judge_evidence(params, *evidence)
        if outcome != "promote":
            raise AirflowSkipException(f"nothing to approve, the evidence says roll back: {reason}")
        self.body = steps.approval_body(params, reason, evidence[0])
        wait = int(self.response_timeout.total_seconds()) if self.response_timeout else MAX_LEASE_S
        steps.hold(steps.spec_from(params), context["run_id"], seconds=min(wait + LEASE_S, MAX_LEASE_S))
        where = f"run {context['run_id']}, task {self.task_id}"

        def ask(context: Any) -> None:  # (once the request is written: a notifier of the operator's)
            steps.ask_approval(params, reason, evidence[0], where, wait / 3600)

        self.notifiers = [*self.notifiers, ask]  # type: ignore[list-item]
        try:
            return super().execute(context)  # the request written and announced; then it parks the task
        except TaskAwaitingInput:  # parked, nothing would read the guards: the trigger waits instead
            pass
        from airflow.sdk.timezone import utcnow

        from rollout_airflow.triggers import GuardedApprovalTrigger
        from vision_rollout.engine import poke_interval

        self.defer(
            trigger=GuardedApprovalTrigger(
                ti_id=context["task_instance"].id,
                options=self.options,
                defaults=self.defaults,
                params=self.serialized_params,
                multiple=self.multiple,
                timeout_datetime=utcnow() + self.response_timeout if self.response_timeout else None,
                rollout=dict(params),
                since=steps.last_stage_start(params, context["ti"]),
                look_s=poke_interval(steps.spec_from(params)),
            ),
            method_name="execute_complete",
            # No triggerer running: nothing reads the guards or applies the deadline, and the task
            # would stay deferred for good. The scheduler ends the wait here (resume_execution).
            timeout=timedelta(seconds=wait + NO_TRIGGERER_GRACE_S),
        )

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Any) -> Any:
        """The wait ended without its trigger's event (the scheduler's timeout: no triggerer ran it;
        or the trigger failed): Roll back is recorded as the answer and taken as a guard breach
        is (``execute_complete``): the stable version back at once, Slack told, ``decide`` rolls
        back saying why."""
        from airflow.sdk.bases.operator import TRIGGER_FAIL_REPR, TriggerFailureReason

        if next_method != TRIGGER_FAIL_REPR:
            return super().resume_execution(next_method, next_kwargs, context)
        from airflow.sdk.execution_time import hitl
        from airflow.sdk.timezone import utcnow

        error = (next_kwargs or {}).get("error")
        if traceback := (next_kwargs or {}).get("traceback"):
            self.log.error("the approval's trigger failed:\n%s", "\n".join(traceback))
        if error == TriggerFailureReason.TRIGGER_TIMEOUT:
            why = (
                "its wait ended without an answer or an event from its trigger "
                f"{NO_TRIGGERER_GRACE_S} s past the answer's deadline: no triggerer ran it (is one running?)"
            )
        else:
            why = f"its trigger failed ({error})"
        try:  # the question leaves Required Actions
            hitl.update_hitl_detail_response(
                ti_id=context["task_instance"].id, chosen_options=[ROLL_BACK], params_input={}
            )
        except Exception:
            self.log.exception("Roll back could not be recorded as the answer")
        event = {
            "chosen_options": [ROLL_BACK],
            "params_input": {},
            "responded_at": utcnow(),
            "responded_by_user": None,
            "guard_breach": f"{why}, and no hard guard was read",
        }
        return self.execute_complete(context, event)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """The answer, and the guards: a breach the trigger saw, or (for Promote) one read now
        (Prometheus' guards, and the replay's accuracy on a round sent now), puts the stable
        version back and is kept in the XCom's ``guard_breach`` for ``decide``."""
        from rollout_airflow import steps

        params = context["params"]
        try:
            answer = super().execute_complete(context, event)
        finally:  # the wait ended (its trigger's event, an answer in the UI, resume_execution; refused)
            try:
                steps.keep_failed_reads(params, str(context["ti"].id), 0)
            except Exception as exc:
                self.log.warning("the wait's count of failed reads stays in the run folder: %s", str(exc)[:300])
        breach = event.get("guard_breach")
        if breach is None and answer["chosen_options"] == [PROMOTE]:
            since = steps.last_stage_start(params, context["ti"])
            breach = steps.guards_while_waiting(params, since)[0]
            breach = breach or steps.replay_while_waiting(params)
            if not breach and (blind := steps.blind_while_waiting(params, since)):
                return {**answer, "guards_blind": blind}  # (said in the decision's report)
        if breach:
            steps.breach_while_waiting(params, context["run_id"], breach)
            return {**answer, "guard_breach": breach}
        return answer
