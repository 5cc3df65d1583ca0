"""The rollout's steps as Airflow sees them: Params in, the library called, small results out.

Each function is the body of one task of ``dags/model_rollout.py``; all logic lives in
include/vision_rollout. Secrets come only from the connections the hooks read.

One run at a time per model (``vision_rollout.locks``): ``build_image`` takes the model's lease
(a second run of the model fails there, touching nothing), every step that touches the model
renews it (``hold``), and the teardown ``ensure_stable`` releases it. The teardown and the
failure callback restore stable only while this run holds the lease: a run that never held it,
or lost it, leaves another run's routes alone. A lease removed while this run held it (nobody
holds it) is taken again when the run's record of it allows (``lease_kept``).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from rollout_airflow.hooks import ModelServerHook, PrometheusHook, slack_notifier
from vision_rollout.deploy import (
    FIELD_MANAGER,
    FLOOR_ANNOTATION,
    HELD_ANNOTATION,
    MAX_REPLICAS,
    SCALE_BY_HAND_KUBECTL,
    BudgetNotApplied,
    candidate_replicas,
    deployment_name,
    pod_count,
    replicas_of,
)
from vision_rollout.folders import WriteConflict
from vision_rollout.locks import (
    LEASE_S,
    MAX_LEASE_S,
    MAX_LOCK_BYTES,
    Holding,
    LockError,
    LockLost,
    ModelBusy,
    held_record,
)
from vision_rollout.objects import ConditionsIgnored
from vision_rollout.settings import (
    BESIDES,
    ENDED,
    HELD,
    MAX_PRUNED,
    MAX_RETENTION_DAYS,
    MIN_RETENTION_DAYS,
    PROMOTED,
    RETENTION_DAYS,
    ROUTES,
    RUN_MARK,
    RUN_REPORT,
    SEND_BUDGET_S,
    BuildSettings,
    SettingsError,
)
from vision_rollout.spec import RolloutSpec, SpecError

if TYPE_CHECKING:
    from pathlib import Path

    from model_server.traffic import TrafficPolicy
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.engine import Reckoned, StageJudge
    from vision_rollout.folders import Folder
    from vision_rollout.mesh import Router
    from vision_rollout.metrics import MetricsSource
    from vision_rollout.mirrors import MirrorLog
    from vision_rollout.notify import Message

log = logging.getLogger(__name__)

# The earlier hours a shadow audit run looks for unaudited ones (their days under MIN_RETENTION_DAYS).
CATCH_UP_HOURS, MAX_CATCH_UP_HOURS = 24, 168
# An audit run begins no hour's audit after this long (the first always): each reads for up to
# MAX_AUDIT_S, and 24 hours of catch-up on a slow store held the hourly runs (one at a time) for
# hours. The hours left are audited by the next run.
AUDIT_RUN_S = 2400.0
MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # as RolloutSpec.model
PROBE_VALUE = "13800138000"  # a synthetic phone number: must reach the shadow log only masked
PROBE_TRIES = 400_000  # request ids tried for one the mirror samples (under 26**4: each is distinct)
PROBE_WINDOW_S, PROBE_EVERY_S = 30, 2  # mesh istio: a round of probes every 2 s, for 30 s
MAX_COUNT_BYTES = 64 << 10  # an approval wait's kept count of failed reads: a few bytes of JSON
MAX_PROBES_PER_ROUND = 100  # (50 requests a second at most, on the model's Service)
ROUTES_READ_TRIES = 3  # routes_read: reads of the routes the API server failed, in all, before it raises
# What puts the stable version back against an API server that does not answer (``mesh.api_budget``):
# each call's time limit, and how long its calls may go without an answer in all. The teardown: a
# hung server took 181 s a call (60 s, read again twice), minutes before it failed and reported.
# The failure callback runs under the DAG processor's time limit (dag_file_processor_timeout, 50 s).
# A call's limit leaves a slow but healthy call its time (an admission webhook may take 10 s, its
# default timeout): a call that times out counts its whole limit, so 15 s cut a server answering
# in 16 s short and spent the teardown's budget in 3 calls. Each try's limit is also what the
# budget has left at most.
TEARDOWN_API_S, TEARDOWN_CALL_S = 120.0, 30.0
CALLBACK_API_S, CALLBACK_CALL_S = 30.0, 15.0
# The failure callback's calls, and the waits between them, end within CALLBACK_CAP_S of its start
# whatever the API server does (``api_budget``'s cap: no call sent, no wait begun, each try's limit
# what is left): its served calls spent nothing of CALLBACK_API_S, and a slow server (14 s a call)
# or one answering 429s (their Retry-After waited) took it 100 s, past the DAG processor's 50 s
# (dag_file_processor_timeout), killed before it reported. Bound: 40 s of calls, and the report
# (Slack's own timeout) and the DAG file's parse in the 10 s left. The routes write is its 7th call
# (``quick``: the lease renewed once, GET and PUT, the routes read, the baseline's Deployment read
# once for its size and its readiness, the routes read, the DestinationRule's subsets, the routes
# written from that read): a server answering each in 5 s still gets it (35 s); slower, the
# callback reports the routes not restored rather than being killed. (A wait for the baseline's
# pod may end one 1 s poll past it.) Under autoscaling the baseline's HPA is read before it too
# (its held floor, to scale the baseline up to), only where that leaves the calls after the wait
# (AFTER_WAIT_CALLS) their time: at 4.5 s a call the routes write was its 8th call, the lease's
# release past the cap; unread, the baseline keeps the pods it runs, its HPA the floor held.
CALLBACK_CAP_S = 40.0
# The failure callback's wait for the baseline's pod keeps the calls after it their time (each as
# long as the last served call took to answer, no Retry-After or backoff wait counted:
# ``mesh.budget_left``; the longest call yet left no wait after one slow early answer): the
# wait's last look at the pods (begun up to a 1 s poll past its time), the lease's check
# (``still_held``), the routes and the DestinationRule read, the routes written, the lease's release
# (RELEASE_CALLS). It took all the time left: a pod never ready, its polls ran to the cap and the
# callback reported the API server (a poll not sent), not the pods.
# The lease's release is one call (its delete at the version the callback's renewal left:
# ``CompareAndSwapLock._release``), and the callback's optional read before it (the candidate's
# Deployment, for its report's wording) is made only where it leaves the release its time: an API
# server answering in 4.5 s cut the release (read, then delete) at the cap, the lease left to run out.
RELEASE_CALLS = 1
# Under autoscaling the callback reads the baseline's HPA before its routes write where it has the
# time (its held floor: the routes write then its 8th call), and releases that floor after it (the
# HPA read, read and patched, its PodDisruptionBudget read and patched, its HPA read and patched again,
# the budget's pending mark cleared: FLOOR_CALLS) before the
# lease's release: at 3 s a call those cut the release at the cap. The floor's release is left
# where it would leave the lease's release no time (``stable_back``): held, said so; the model's
# next run takes it over and releases it when it ends (``floor_released_later``).
FLOOR_CALLS = 7
# Under autoscaling the callback scales the baseline up before its routes write (to the floor held,
# else to its pods and the candidate's, which it reads first) only where the calls of that scale
# leave the calls after the wait (AFTER_WAIT_CALLS) their time: the Deployment read, its apply
# (a dry run of it first where its template changes), the scale subresource patched, then the HPA
# read for its bounds, read and applied, the PodDisruptionBudget read and applied. Unguarded,
# at 3 s a call they cut the routes write at the cap (10% of the traffic left on the candidate),
# at 2.5 s the lease's release. Not scaled, its HPA scales it as the traffic comes back (said so).
SCALE_CALLS = 9
# What ``finish`` says of a candidate it did not retire whose pods run (the failure callback's: no
# time to drain it), with the command that scales it to 0; the callback reports it, not only logs it.
LEFT_RUNNING = "is left loaded, its pods running"
# What it says of one whose Deployment it did not read (``candidate_idle``: no time left, or
# the read failed): it may never have been deployed; the command given all the same.
UNCHECKED_RUNNING = "may be left running (not checked)"
AFTER_WAIT_CALLS, WAIT_POLL_S = 5 + RELEASE_CALLS, 1.0
# The failure callback's scale of a baseline at 0 pods (a promotion cut short) whose forced apply is
# refused for a write since its read (``Conflicted``: a status write before each) reads it again and
# applies again only where that (its read, apply and forced apply) and the scale's fallback after
# it (the scale subresource patched, the PodDisruptionBudget read and applied) leave the calls after
# the wait (AFTER_WAIT_CALLS) their time (``mesh.reserved``): read again unheld, at 2 s a call the
# budget's apply was cut at the cap, the routes never written (10% of the traffic on the candidate).
RESTORE_RETRY_CALLS = 6


def spec_from(params: dict[str, Any]) -> RolloutSpec:
    """The run's spec from its Params. A key the spec does not have is refused, naming it: Airflow
    adds a trigger's unknown conf keys to the Params, so a misspelt ``baselne_version`` would
    otherwise run against the default baseline."""
    unknown = sorted(set(params) - {f.name for f in fields(RolloutSpec)})
    if unknown:
        named = ", ".join(repr(k[:64]) for k in unknown[:10]) + (
            f" ({len(unknown)} in all)" if len(unknown) > 10 else ""
        )
        raise AirflowFailException(f"invalid rollout parameters: unknown {named}; see the trigger form for the names")
    try:
        return RolloutSpec.from_dict(params)
    except SpecError as exc:
        raise AirflowFailException(f"invalid rollout parameters: {exc}") from None


def serving() -> ModelServerHook:
    """The model server's hook, its connection read and checked (``hook.settings``): one per task;
    a wrong extra fails the task (no retry)."""
    hook = ModelServerHook()
    try:
        _ = hook.settings
    except SettingsError as exc:
        raise AirflowFailException(str(exc)) from None
    return hook


def router(spec: RolloutSpec, run_id: str, hook: ModelServerHook, only: str | None = None) -> Any:
    """The mesh the run names: the model server's own router, or Istio through ``kubernetes_default``,
    its VirtualService with a pinned route for the baseline and the candidate, or ``only`` for
    the one version a run leaves serving (the retired one's would send the requests that name
    it to no pods, 503s, where the version serving answers that it does not serve it)."""
    if spec.mesh == "istio":
        versions = [only] if only else [spec.baseline_version, spec.candidate_version]
        return hook.istio_router(spec.model, versions)
    return hook.router(spec.model, hook.on_disk(hook.settings.workdir(spec.model, run_id)) / ROUTES)


# A step that waits for pods and drains (wait_ready's 600 s, wait_unrouted's 120 s, a drain of up
# to 600 s) holds the lease for all of it: no other run may take the model over meanwhile.
WAITING_STEP_S = LEASE_S + 600 + 120 + 600


def hold(
    spec: RolloutSpec,
    run_id: str,
    hook: ModelServerHook | None = None,
    seconds: int = LEASE_S,
    rolling_back: bool = False,
    judging: bool = False,
) -> Holding:
    """Renew this run's lease on its model for ``seconds`` (every step and poke that touches the
    model). A run that lost it (it expired and another run took it over) fails here, without
    retrying and before touching anything; so does one aborted (``rolloutctl abort``) in a step
    that goes on with the rollout (not ``rolling_back``): its teardown puts the stable version back.
    ``rolling_back`` and a stage's poke (``judging``, which acts on a breach) go on where the lease
    reads as this run's but cannot be written (``renewed``; the poke passes a stage only while the
    lease returned runs on other workers' clocks: ``lease_runs``). A step of a run that ended
    (``run_ended``: cleared alone in the UI afterwards) skips, saying so, touching nothing: the
    run keeps the state its end gave it."""
    hook = hook or serving()
    lock = hook.model_lock(spec.model, spec.mesh)
    try:
        folder = hook.settings.workdir(spec.model, run_id)
        held = lease_kept(lock, run_id, folder, seconds, rolling_back or judging)
    except LockLost as exc:
        if (end := run_ended(spec, run_id)) is not None:
            what = "promoted" if end.get("promoted") else "rolled back"
            raise AirflowSkipException(
                f"this run ended ({what}: {str(end.get('done', ''))[:300]}): its steps are not run again, nothing "
                "touched; trigger a new run"
            ) from None
        raise AirflowFailException(str(exc)) from None
    if held.aborted and not rolling_back:
        raise AirflowFailException(f"the rollout was aborted: {held.aborted}")
    return held


def lease_runs(spec: RolloutSpec, held: Holding) -> None:
    """A stage's pass recorded or returned only while ``held`` (the lease as its poke's ``hold``
    left it: read back where its renewals failed) runs on every worker's clock: from
    ``CLOCK_SKEW_S`` before its expiry on this one (``time.time``, the clock the hook's locks
    judge a lease on), a worker whose clock is that much ahead takes it for dead, and another run
    may take the model over at any moment. LockError then: the poke holds the stage (a later one
    renews again). A breach is acted on all the same: putting the stable version back reads the
    lease again before writing (``restore_stable``)."""
    from vision_rollout.locks import CLOCK_SKEW_S

    if held.expires - CLOCK_SKEW_S > time.time():
        return
    raise LockError(
        f"the lease of {spec.model!r} cannot be renewed, and it runs out on the clocks of other workers "
        f"({held.describe()}; workers' clocks may be {CLOCK_SKEW_S} s apart): another run may take the model "
        "over, so the stage's pass is not kept; a later poke renews it again"
    )


def lease_kept(lock: Any, run_id: str, folder: Folder, seconds: int = LEASE_S, lenient: bool = True) -> Holding:
    """The lease renewed (``lenient``: as ``renewed``; else ``renew``), and this run's record of
    it in its run folder (``HELD``) brought up to date. A lease removed while this run held it
    (nobody holds it now: an operator's cleanup, a wiped folder) is taken again, marked aborted,
    when the record allows it (``retake``): the stable version goes back, as after an abort.
    LockLost otherwise (another run holds it, or this run released it or never held it)."""
    try:
        held = cast("Holding", renewed(lock, run_id, seconds) if lenient else lock.renew(run_id, seconds))
    except LockLost:
        try:
            record: bytes | None = folder.read_within(HELD, MAX_LOCK_BYTES)
        except FileNotFoundError:  # (this run never held it, or its folder was wiped too)
            record = None
        except OSError as exc:  # (over MAX_LOCK_BYTES, not a file: not a record this run wrote)
            log.warning("this run's record of its lease cannot be read: %s", str(exc)[:300])
            record = None
        why = f"the model's lease ({lock.where}) was removed while this run held it: taken again to put the stable version back"
        retaken = lock.retake(run_id, record, why)
        if retaken is None:
            raise
        log.warning("%s", why)
        held = cast("Holding", retaken)
    recorded(folder, run_id, held)
    return held


def recorded(folder: Folder, run_id: str, holding: Holding | None) -> None:
    """This run's record of its lease (``held_record``: None, released) written; one that cannot
    be written is logged: the record left as it was only keeps ``retake`` from taking it again."""
    try:
        folder.write(HELD, held_record(run_id, holding))
    except OSError as exc:
        log.warning("this run's record of its lease was not written (%s): %s", folder, str(exc)[:300])


def renewed(lock: Any, run_id: str, seconds: int = LEASE_S) -> Holding:
    """The lease renewed for what puts the stable version back or acts on a breach (a stage's
    poke); as it reads, when it reads as this run's but cannot be written (its
    run folder full or read-only: OSError; another writer's write beating each of the renewal's,
    or the API server failing it: a LockError but LockLost; or leaving it unanswered:
    ``TRANSIENT``), which stops no rollback: the lease only keeps other runs off the model, and
    this run holds it. Nor a poke's look at a breach, whatever the lease's age: the stable
    version's return reads the lease again before it writes; only its pass waits for a lease
    that runs on every worker's clock (``lease_runs``). LockLost as ``renew``, and when it then
    reads as another run's or nobody's."""
    from vision_rollout.locks import CLOCK_SKEW_S
    from vision_rollout.mesh import TRANSIENT

    try:
        return cast("Holding", lock.renew(run_id, seconds))
    except LockLost:
        raise
    except (OSError, LockError, *TRANSIENT) as exc:
        current = lock.holding()
        if current is None or current.holder != run_id:
            raise LockLost(f"the lease of {lock.model!r} is not this run's ({exc})") from None
        left = current.expires - CLOCK_SKEW_S - lock.clock()
        runs = (
            f"for {left:.0f} s more on every worker's clock" if left > 0 else "but it runs out on other workers' clocks"
        )
        log.warning(
            "the lease of %r cannot be renewed (%s); this run holds it %s: a rollback goes on (the stable version "
            "goes back all the same), a stage's poke looks for a breach and passes only on a lease that runs on "
            "every worker's clock",
            lock.model,
            exc,
            runs,
        )
        return cast("Holding", current)


def build_image(
    params: dict[str, Any],
    run_id: str,
    retry_in_s: int | None = None,
    report_only: bool = False,
    run_after: str | None = None,
) -> dict[str, Any]:
    """``first_step`` (below), and a run it fails for good (a refusal, or its last try: no
    ``retry_in_s``, the delay before Airflow's retry) reported to Slack: in Airflow nothing else
    of the run runs once its setup failed, notify and the teardown neither, so whoever triggered
    it would hear nothing. A run that ended (``run_ended``) cleared with its decision standing
    (``report_only``: decide not cleared) starts nothing again: see ``after_the_end``; cleared
    further up (a stage, decide, the whole run) it is refused (``ended_refusal``), unless a
    stage's fresh test was asked for (``rolloutctl restart-stage``). With ``run_after`` (the
    DAG run's), a run folder of another DAG run is refused first (``own_folder``)."""
    spec = spec_from(params)
    if run_after is not None:
        own_folder(spec, run_id, run_after)
    end = run_ended(spec, run_id)
    if end is not None and report_only:
        return after_the_end(spec, end)
    if end is not None:
        ended_refusal(spec, run_id, end)
    try:
        return first_step(spec, params, run_id, retry_in_s)
    except Exception as exc:
        if retry_in_s is None or isinstance(exc, AirflowFailException):
            from vision_rollout.notify import not_started_message

            try:
                send(spec, not_started_message(spec, str(exc) or type(exc).__name__))
            except Exception:
                log.exception("the report of the refused run was not sent")
        raise


def first_step(spec: RolloutSpec, params: dict[str, Any], run_id: str, retry_in_s: int | None = None) -> dict[str, Any]:
    """Check that the run folder's store keeps the stage records' conditional writes
    (``Folder.check_conditional``: an S3 store that ignores them refused, nothing touched); take
    the model's lease (one rollout of a model at a time); check where the run starts
    (``start_from_steady``); verify the candidate before any traffic; then, in local mode, load it
    beside the baseline; in kubernetes mode (mesh ``istio``), plan its image build (``build``: run
    by ``buildkit_build``). It fails giving the model back, whatever failed it (a refusal, a bug, a
    disk or the model server failing): in Airflow nothing else of the run runs once its setup
    failed, the teardown neither. Refused before its load, it changed nothing its teardown or
    failure callback should undo (they would take what serves for its own); after, the candidate
    is unloaded first (``given_back``). An error Airflow retries in ``retry_in_s`` keeps the model
    this run's until then (``kept_for_retry``): given back, another run of the model could take
    it in the delay, and the retry would fail for good; the retry takes the lease again."""
    from vision_rollout.images import verify_model

    hook = serving()
    # The model's own sections, {model} filled in, read before its lease: no retry mends them (a
    # run cleared mid-way is its failure callback's to end).
    if spec.mesh == "istio":
        try:
            hook.settings.istio_for(spec.model)
            hook.settings.build_for(spec.model)
        except SettingsError as exc:
            raise AirflowFailException(str(exc)) from None
    lock = hook.model_lock(spec.model, spec.mesh)
    try:
        hook.settings.workdir(spec.model, run_id).check_conditional()
    except ConditionsIgnored as exc:
        raise AirflowFailException(f"run_dir: {exc}. This run touched nothing.") from None
    before = lock.holding()
    try:
        taken = lock.acquire(run_id)
    except ModelBusy as exc:
        raise AirflowFailException(f"{exc}. This run touched nothing; trigger it again once that one ends.") from None
    settings = hook.settings
    recorded(settings.workdir(spec.model, run_id), run_id, taken)
    resuming = cleared_mid_run(spec, run_id, hook, before)
    left: str | None = None
    try:
        left = None if resuming else start_from_steady(spec, run_id, hook, before)
        if not resuming:  # (a run that ended, cleared whole or a stage: it starts again, to report anew)
            settings.workdir(spec.model, run_id).delete(RUN_REPORT)
            settings.workdir(spec.model, run_id).delete(ENDED)
        if left is not None and spec.mesh == "istio" and left != spec.candidate_version:
            hold(spec, run_id, hook, WAITING_STEP_S)  # for the drain
            retire(router(spec, run_id, hook), hook.deployments(spec.model), left)  # unrouted now
        model_dir = settings.repository / spec.model
        report = verify_model(
            model_dir / spec.candidate_version / "model.onnx",
            model_dir / spec.baseline_version / "model.onnx",
            model_dir,
            settings.validation(spec.model),
        )
        if not report.ok:
            raise AirflowFailException("candidate artifact refused: " + "; ".join(report.problems))
        warned = {"preflight": preflight(spec, settings.validation(spec.model))}
        if resuming:
            log.warning("the rollout is under way (this run's routes): the candidate verified again, nothing else done")
            plan = (
                {"build": build_plan(spec, report.sha256, settings.build_for(spec.model))}
                if spec.mesh == "istio"
                else {}
            )
            return {**report.to_dict(), **warned, **plan}
        if spec.mesh == "istio":
            release_leftover_floors(spec, hook, keep=spec.baseline_version)
            return {
                **report.to_dict(),
                **warned,
                "build": build_plan(spec, report.sha256, settings.build_for(spec.model)),
            }
    except Exception as exc:
        # (a setting found wrong here, a build name once {model} is filled in: no retry mends it)
        failed = AirflowFailException(str(exc)) if isinstance(exc, SettingsError) else exc
        if not resuming:  # (resuming, the model stays this run's: its teardown or failure callback puts stable back)
            # A lease taken over from a run that did not end, and nothing touched: back to that run,
            # which may be late rather than dead (a scheduler restart) and would else find it gone.
            # Once that run's routes were put back, its rollback is finished here: its floor too.
            if left is not None and spec.mesh == "istio":
                release_leftover_floors(spec, hook, keep=None)
            to = before if left is None else None
            keep = kept_for_retry(failed, retry_in_s, run_id, to)
            given_back(params, run_id, lock, settings.workdir(spec.model, run_id), to=to, keep_s=keep)
        if failed is not exc:
            raise failed from None
        raise
    try:
        # The stable routes pinned first: without a policy the model server routes everything to
        # the highest loaded version, the candidate (unjudged) from the moment it loads, and a
        # retry of this task would find it serving and give the lease up, leaving it there.
        settings.admin.set_traffic(spec.model, spec.stable_policy())
        settings.admin.load(spec.model, [spec.baseline_version, spec.candidate_version])
        # The server loads the file as it is now: replaced since it was verified, it is not the
        # artifact this report describes (nothing routes to it).
        changed = unverified(spec, hook, report.sha256)
        if changed:
            raise AirflowFailException(f"candidate artifact refused: {changed}; no traffic was moved to it")
    except Exception as exc:
        keep = kept_for_retry(exc, retry_in_s, run_id, None)
        given_back(params, run_id, lock, settings.workdir(spec.model, run_id), loaded=True, keep_s=keep)
        raise
    return {**report.to_dict(), **warned}


def own_folder(spec: RolloutSpec, run_id: str, run_after: str) -> None:
    """The run folder (``workdir``) this DAG run's: ``RUN_MARK`` names the DAG run whose it is,
    by its id and ``run_after`` (when it was triggered, which a clear keeps), written by its first
    step. Another DAG run's (one deleted and triggered again with its id, or an id that names the
    same folder once cleaned) is refused touching nothing: its records (its end, its stages'
    tests, its report's post) would be taken for this run's. A folder without it (a run's from
    before it was kept) is taken as this run's, as it was; one that cannot be read or written
    (full, read-only, unreachable) too, with a warning: the first step then meets the same folder
    and fails saying so, the run reported. The mark is written only where none is (``write_if``):
    of two DAG runs starting together on one folder, the second finds the first's and is refused."""
    folder = serving().settings.workdir(spec.model, run_id)
    mark = {"run_id": run_id, "run_after": run_after}
    found: Any = None
    for _ in range(2):  # (a second read where another DAG run wrote its mark first)
        try:
            found = json.loads(folder.read_within(RUN_MARK, MAX_LOCK_BYTES))
        except FileNotFoundError:
            try:
                folder.write_if(RUN_MARK, json.dumps(mark).encode(), None)
                return
            except WriteConflict:
                continue
            except OSError as exc:
                log.warning("this run's mark was not written (%s): %s", folder, str(exc)[:300])
                return
        except OSError as exc:
            log.warning("the run folder's mark cannot be read (%s): %s", folder, str(exc)[:300])
            return
        except ValueError:  # (not a mark this step wrote)
            found = None
        break
    if found == mark:
        return
    theirs = found if isinstance(found, dict) else {}
    raise AirflowFailException(
        f"the run folder {folder} holds the records of another DAG run (run id {str(theirs.get('run_id'))[:250]!r}, "
        f"triggered {str(theirs.get('run_after'))[:40]}), not this one's (run id {run_id!r}, triggered {run_after}): "
        "a run deleted and triggered again with its id, or a run id that names the same folder. This run touched "
        "nothing; trigger it with another run id, or move that folder away"
    )


def run_ended(spec: RolloutSpec, run_id: str) -> dict[str, Any] | None:
    """What this run's teardown found it decided and carried out (``ENDED`` in its run folder,
    written before it released the model: ``finish``), None for a run that has not ended so."""
    try:
        raw = serving().settings.workdir(spec.model, run_id).read_within(ENDED, MAX_LOCK_BYTES)
        record = json.loads(raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # (not a record this run wrote)
        log.warning("this run's record of its end cannot be read: %s", str(exc)[:300])
        return None
    return record if isinstance(record, dict) and record.get("holder") == run_id else None


def ended_refusal(spec: RolloutSpec, run_id: str, end: dict[str, Any]) -> None:
    """A run that ended, cleared above its decision, is not started again: its stages would load
    the candidate and (a stage that passed) put it back on traffic, the version a rollback took
    off, or one a promotion made stable taken for a candidate. As Flagger and Argo Rollouts, which
    never roll a failed revision out again by themselves (Argo's ``retry``, Flagger's new
    revision): a new run is triggered. Refused touching nothing (no lease, no load), the run
    keeping the state its end gave it: a rolled-back run fails (AirflowFailException), a promoted
    one skips (AirflowSkipException: every task after skips, the run stays a success, as its
    promotion stands). Unless a stage's fresh test was asked for (``rolloutctl restart-stage``):
    then the run starts again from the steady state, as documented."""
    from vision_rollout import attempts

    folder = serving().settings.workdir(spec.model, run_id)
    try:
        asked = attempts.restart_asked(folder, run_id, len(spec.stages))
    except OSError as exc:
        raise AirflowFailException(f"this run ended, and its stages' records cannot be read: {exc}") from None
    if asked is not None:
        log.warning("this run ended; a fresh test was asked for (%s): it starts again", asked[:300])
        return
    what = "promoted" if end.get("promoted") else "rolled back"
    refused = AirflowSkipException if end.get("promoted") else AirflowFailException
    raise refused(
        f"this run ended ({what}: {str(end.get('done', ''))[:300]}); cleared tasks do not roll version "
        f"{spec.candidate_version} out again. This run touched nothing. To roll it out again, trigger a new run; "
        "to send the report again, clear notify alone (with its downstream); to test a stage afresh in this run, "
        f"rolloutctl restart-stage --run-dir {serving().settings.run_dir_argument} --model {spec.model} --run-id "
        f"{run_id!r} --stage N --reason '...', then clear the run again"
    )


def decision_stands(ti: Any) -> bool:
    """Whether this run's decide is done in Airflow (not cleared): only what carries the decision
    out (promote or rollback, which then re-verify it: ``carried_out``) and reports the run
    (notify, outcome, the teardown) runs again. False where the states cannot be read."""
    try:
        states = ti.get_task_states(dag_id=ti.dag_id, task_ids=["decide"], run_ids=[ti.run_id])
    except Exception as exc:
        log.warning("this run's task states cannot be read: %s", str(exc)[:300])
        return False
    return bool(states.get(ti.run_id, {}).get("decide") == "success")


def after_the_end(spec: RolloutSpec, end: dict[str, Any]) -> dict[str, Any]:
    """``build_image`` run again once its run ended, its decision standing (Airflow clears a
    run's setup with any task cleared with its downstream: notify, to send the report again;
    promote or rollback, which re-verify, ``carried_out``): it touches nothing (lease, loads, routes: another run may hold the model now), and notify sends
    the run's report once more, the outcome decide chose, marked as sent again. Its XCom holds
    the end and the warnings the report carries (``preflight``)."""
    log.warning("this run ended (%s): nothing is started again", str(end.get("done", ""))[:500])
    return {"ended": end, "preflight": preflight(spec, serving().settings.validation(spec.model))}


def cleared_mid_run(spec: RolloutSpec, run_id: str, hook: ModelServerHook, before: Holding | None) -> bool:
    """Whether ``build_image`` runs again while its own run holds the model and the routes are not
    where a rollout starts (a stage's weights, or the promotion): Airflow clears a run's setup with
    any of its tasks cleared with their downstream (a stage's task group, say). Refused as a run
    that finds a rollout in progress, it gave the model up and its teardown left the unjudged
    candidate serving; the rollout goes on instead, its routes and loads untouched."""
    from vision_rollout.mesh import not_steady

    if before is None or before.holder != run_id:
        return False
    routes = router(spec, run_id, hook, only=spec.baseline_version).get_routes()
    return not_steady(routes, spec.baseline_version) is not None


def kept_for_retry(exc: Exception, retry_in_s: int | None, run_id: str, to: Holding | None) -> int | None:
    """How long a failing first step keeps the model's lease for its retry: the retry's delay and
    a lease's time for the retry to start (``LEASE_S``; no retry then, it runs out, and the run's
    failure callback releases it before). None, given back at once: no retry follows (the last
    try, or a refusal: ``AirflowFailException`` is not retried), or the lease was taken over from
    another run (``to``), which gets it back."""
    if retry_in_s is None or isinstance(exc, AirflowFailException):
        return None
    if to is not None and to.holder not in ("", run_id):
        return None
    return min(int(retry_in_s) + LEASE_S, MAX_LEASE_S)


def given_back(
    params: dict[str, Any],
    run_id: str,
    lock: Any,
    folder: Folder,
    to: Holding | None = None,
    loaded: bool = False,
    keep_s: int | None = None,
) -> None:
    """A failing ``build_image``'s model given back: ``loaded``, the candidate unloaded first
    (``restore_stable``); then the lease released (to ``to``, the holding it took over), or, with
    ``keep_s``, kept this run's for that long (its retry takes it again). Should that fail, it is
    logged and the lease stays: the run's failure callback (``finish``) tries again, or it
    expires; the task fails on its own error."""
    try:
        if loaded:
            restore_stable(params, run_id)
        if keep_s is not None:
            recorded(folder, run_id, lock.renew(run_id, keep_s, note="build_image failed; its retry takes it again"))
            return
        recorded(folder, run_id, None)
        lock.release(run_id, to=to)
    except Exception as exc:
        log.warning("the model is not given back (the failure callback tries again): %s", str(exc)[:500])


def preflight(spec: RolloutSpec, validation: Path) -> list[str]:
    """What the plan cannot show (``engine.preflight``), printed in the task's log; the final
    report carries it. Warnings: the rollout goes on."""
    from vision_rollout.engine import preflight as plan_warnings
    from vision_rollout.engine import validation_labels

    try:
        images = len(validation_labels(validation))
    except (OSError, ValueError) as exc:
        return [f"the validation set {validation} cannot be read: {str(exc)[:300]}"]
    warnings = plan_warnings(spec, images)
    for warning in warnings:
        print(f"pre-flight warning: {warning}")
    return warnings


def release_leftover_floors(spec: RolloutSpec, hook: ModelServerHook, keep: str | None) -> None:
    """The HPA floors a run that did not end left held on versions other than ``keep`` (this run's
    baseline; None: on any version) put back (``VersionDeployments.release_floors``), and the
    PodDisruptionBudgets such a release left not updated applied (on any version).
    Housekeeping: a failure is logged; a floor released whose PodDisruptionBudget was not updated
    (``BudgetNotApplied``) as that, with what to set the budget to, not as a floor still held."""
    from vision_rollout.mesh import RouterError

    try:
        released = hook.deployments(spec.model).release_floors(keep=keep)
    except BudgetNotApplied as exc:  # (its message names the budget and its spec: kept whole)
        log.warning("the HPA floors left held by runs that did not end were released, not every budget: %s", exc)
        return
    except RouterError as exc:
        log.warning("the HPA floors left held by runs that did not end were not released: %s", str(exc)[:1000])
        return
    if released.floors:
        log.warning(
            "released the HPA floor left held on version(s) %s by a run that did not end", ", ".join(released.floors)
        )
    if released.budgets:
        log.warning(
            "applied the PodDisruptionBudget left not updated on version(s) %s by a run that released its floor",
            ", ".join(released.budgets),
        )


def unverified(spec: RolloutSpec, hook: ModelServerHook, verified: str | None, on_disk: bool = False) -> str | None:
    """Local mode: why the candidate the model server serves is not the file ``build_image``
    verified (``verified``, its sha256; ``serving.not_as_verified``), None when it is (or nothing
    was verified: kubernetes mode, whose image ``VersionDeployments.changed`` checks).
    ``on_disk``: the file in the repository too, which the next load serves."""
    from vision_rollout.serving import not_as_verified

    if verified is None or spec.mesh != "local":
        return None
    path = hook.settings.repository / spec.model / spec.candidate_version / "model.onnx"
    return not_as_verified(hook.settings.admin, spec.model, spec.candidate_version, verified, path if on_disk else None)


def start_from_steady(spec: RolloutSpec, run_id: str, hook: ModelServerHook, before: Holding | None) -> str | None:
    """The baseline takes all of the traffic, with no mirror or header rules (``mesh.not_steady``),
    else the run fails naming what serves. A run that took the lease over from one that did not
    end (``before``: the holding it found) puts that run's routes back to the baseline first, when
    they are what a rollout against this baseline leaves mid-stage (``mesh.mid_rollout_against``:
    against another baseline, the unjudged candidate of that run would be put at 100%), and
    returns the version that run had routed (its candidate, to retire); else None. In kubernetes
    mode the baseline passes a restore's gate first (``baseline_back``): its Deployment there, a
    count of 0 scaled back, one of its pods ready whatever its count: should that fail, the
    routes stay as they are and the run fails saying so and what comes next."""
    from vision_rollout.mesh import TRANSIENT, RouterError, mid_rollout_against, not_steady

    try:
        r = router(spec, run_id, hook, only=spec.baseline_version)
        routes = r.get_routes()
        problem = not_steady(routes, spec.baseline_version)
        took_over = before if before is not None and before.holder not in ("", run_id) else None
        if problem and took_over and mid_rollout_against(routes, spec.baseline_version):
            # Its lease expired while it held the model (a worker killed mid-stage).
            log.warning(
                "%s did not end (%s): version %s takes 100%% again",
                took_over.describe(),
                problem,
                spec.baseline_version,
            )
            routed = next(d.version for d in routes.route if d.weight > 0 and d.version != spec.baseline_version)
            if spec.mesh != "local":  # (local: the model server is the mesh, and serves every version it loaded)
                baseline_back(spec, run_id, hook, routed)
            r.set_routes(spec.stable_policy())
            return routed
    except TRANSIENT:
        raise  # no answer, or a failure rather than a refusal: a retry may get one
    except RouterError as exc:
        raise AirflowFailException(f"the routes of '{spec.model}' cannot be read or set: {exc}") from None
    if problem:
        raise AirflowFailException(f"{problem}. This run touched nothing.")
    return None


def baseline_back(spec: RolloutSpec, run_id: str, hook: ModelServerHook, routed: str) -> None:
    """Before a run that took the model over moves the traffic of ``routed`` (the candidate of
    the run it took it from) back to the baseline (``start_from_steady``): the gate a restore
    passes (``baseline_ready``): a baseline without a Deployment refused, one at 0 pods scaled
    back, and, whatever its count (a try before this one may have scaled it back, its pods may
    crash-loop or wait to be placed), one of its pods ready. Should any of it
    fail, the routes are left as they are, none moved to a version without a ready pod, and the
    error says so, with what comes next: AirflowFailException, with what to do by hand (a scale
    only where the scale failed); a transient failure (``TRANSIENT``) raised as its own kind,
    saying that Airflow retries the step, which takes the model over again (the lease goes back
    to that run: ``first_step``)."""
    from vision_rollout.mesh import TRANSIENT, RouterError

    deployments = hook.deployments(spec.model)
    scaling = 0  # (the count a failed scale from 0 chose)

    def unscaled_from(pods: int, maybe: bool) -> str:
        nonlocal scaling
        scaling = pods
        return f"has no pods and {unscaled(pods, maybe)}: no traffic is moved to a version with no pods"

    try:
        baseline_ready(
            spec,
            deployments,
            routed,
            unscaled_from,
            taken=lambda: hold(spec, run_id, hook, WAITING_STEP_S),  # for the wait
            unready=lambda why: f"{why}: no traffic is moved to a version without a ready pod",
        )
    except RouterError as exc:  # (the read's, the scale's or the wait's, its routes_kept set)
        again = f"takes the lapsed lease over again and moves the routes back to version {spec.baseline_version}"
        if isinstance(exc, TRANSIENT):
            then = f"Airflow retries this step (after its last try: trigger the run again): it {again}, once one of its pods is ready"
        elif scaling:
            then = (
                f"By hand: scale version {spec.baseline_version} up "
                f"({deployments.scale_by_hand(spec.baseline_version, scaling)}: {SCALE_BY_HAND_KUBECTL}), wait for its "
                f"pods to be ready, then trigger the run again: it {again}"
            )
        else:
            then = f"By hand: once one of its pods is ready, trigger the run again: it {again}"
        said = (
            f"the routes are left as they are: version {routed} (the candidate of the run whose lease this run took "
            f"over) keeps its share, for version {spec.baseline_version}, the baseline, "
            f"{exc.routes_kept or 'was not made ready'}. {then} ({type(exc).__name__}: {str(exc)[:1000]})"
        )
        if isinstance(exc, TRANSIENT):
            exc.args = (said,)
            raise
        raise AirflowFailException(said) from None
    except NoDeployment as exc:  # (a lost lease, ``hold``'s AirflowFailException, passes as it is)
        raise AirflowFailException(
            f"the routes are left as they are: version {routed} (the candidate of the run whose lease this run took "
            f"over) keeps its share: {exc}"
        ) from None


def build_plan(spec: RolloutSpec, sha256: str, build: BuildSettings) -> dict[str, Any]:
    """The BuildKit pod that builds the candidate's image (``pod``, a V1Pod as a dict, its ``name``
    and ``namespace``) and the ``image`` tag, from the artifact's digest, that it pushes.

    Settings from the ``model_server_default`` extras' ``build`` section (``BuildSettings``).
    """
    from vision_rollout.images import build_pod, image_tag

    try:
        registry, context = build.require("registry", "context")
    except SettingsError as exc:
        raise AirflowFailException(str(exc)) from None
    tag = image_tag(registry, sha256)
    name = f"build-{spec.model}-{spec.candidate_version}-{sha256[:8]}".lower().replace("_", "-").replace(".", "-")
    namespace = build.namespace
    pod = build_pod(
        name,
        namespace,
        context,
        tag,
        f"models/{spec.model}/{spec.candidate_version}/model.onnx",
        sha256,
        builder_image=build.builder_image,
        service_account=build.service_account,
        docker_config_secret=build.push_secret,
    )
    return {"pod": pod, "name": name, "namespace": namespace, "image": tag}


def deploy_candidate(params: dict[str, Any], image: str | None, run_id: str) -> str:
    """Kubernetes mode, once ``buildkit_build`` pushed ``image`` (its tag by digest): the
    candidate's Deployment (that image, its subset's labels, the rest of its pod template the
    baseline's), its pods ready. Local mode: ``build_image`` loaded it already."""
    spec = spec_from(params)
    if spec.mesh == "local":
        return f"version {spec.candidate_version} is loaded beside {spec.baseline_version} on the model server"
    if not image:
        raise AirflowFailException("buildkit_build pushed no image: clear it to build again")
    hook = serving()
    hold(spec, run_id, hook, seconds=LEASE_S + 600)  # and wait_ready's 600 s
    deployments = hook.deployments(spec.model)
    for version in (spec.baseline_version, spec.candidate_version):
        owner = deployments.model_of(version)
        if owner not in (None, spec.model):  # one target configured for two models: refused, untouched
            raise AirflowFailException(
                f"Deployment {deployments.target.namespace}/{deployments.target.service}-v{version} serves model "
                f"{owner!r}, not {spec.model!r}: give each model its own target ({{model}} in the istio "
                f"section, or models.{spec.model}.istio)"
            )
    retirable(spec, deployments)
    floor_holdable(spec, deployments)
    # Never fewer pods than it runs: run again mid-rollout (cleared), it serves a later stage's share.
    replicas = max(candidate_size(spec, spec.stages[0], deployments), deployments.replicas(spec.candidate_version) or 0)
    deployments.apply(spec.candidate_version, image, replicas, like=spec.baseline_version)
    deployments.wait_ready(spec.candidate_version, replicas)
    return f"{deployments.target.service}-v{spec.candidate_version}"


def retirable(spec: RolloutSpec, deployments: VersionDeployments) -> None:
    """Without autoscaling, nobody but the rollout owns the baseline's ``spec.replicas``
    (``VersionDeployments.replicas_owners``): else its promotion would route all of the
    traffic to the candidate, then be refused scaling the baseline to 0 (409) and be rolled
    back, after every stage; and an HPA of the platform's would be left on the retired version,
    the promoted one not autoscaled. Nor does another manager own a field of the baseline's
    Deployment that its retirement would change (a Helm release's label
    ``app.kubernetes.io/managed-by: Helm``): the retirement's apply is sent as a dry run, which
    the API server refuses as it would the apply. Checked before the candidate is deployed, and
    before a promotion moves anything. The API server failing the dry run rather than refusing it
    (429 or 5xx once the client's retries were spent, no answer: ``TRANSIENT``) is raised as it
    came, not as a refusal: Airflow's retry asks again."""
    from vision_rollout.mesh import TRANSIENT, RouterError

    owners = [] if deployments.build.autoscaling else deployments.replicas_owners(spec.baseline_version)
    if owners:
        raise AirflowFailException(
            f"spec.replicas of Deployment {deployments.target.namespace}/{deployments.target.service}-v"
            f"{spec.baseline_version} is also managed by {', '.join(owners)[:300]} (an HPA, kubectl scale, a "
            "client-side kubectl apply): the rollout could not retire it once promoted. Under an HPA of your own, "
            "set the model_server_default extra build.autoscaling (the rollout then makes an HPA per version); "
            "else give the field to the rollout: scale the version up by one pod and back under its field manager "
            "(kubectl patch deployment --subresource=scale --type=merge --field-manager=model-rollout, "
            f"{SCALE_BY_HAND_KUBECTL}; a write takes a field from its manager where it changes its value; up, not "
            "down, which would cut the capacity of a version that may serve all of the traffic), not kubectl apply "
            "--server-side of spec.replicas alone under that manager, which would remove the Deployment's other "
            "fields the rollout applied; then, where that manager is a server-side applier, it stops sending "
            "spec.replicas, not before (while it alone owns it, its apply without it resets it to 1)"
        )
    try:
        deployments.scale(spec.baseline_version, 0, dry_run=True)
    except TRANSIENT:
        raise  # (nothing refused: the step's retry asks again)
    except RouterError as exc:
        raise AirflowFailException(
            f"{exc}. The rollout could not retire version {spec.baseline_version} once promoted"
        ) from None


def floor_holdable(spec: RolloutSpec, deployments: VersionDeployments, dry_run: bool = True) -> None:
    """Under autoscaling, no other manager owns a field of the baseline's HPA that stage 1's
    ``hold_floor`` would change (a Helm release's HPA, a ``minReplicas`` set by ``kubectl edit``):
    that apply is sent as a dry run before the candidate is deployed, else it was refused (409)
    at stage 1, the candidate's pods already up. Not ``dry_run``: stage 1's hold itself, which
    the dry run cannot promise: at its HPA's floor then, the baseline had no floor to hold, and
    its HPA may scale it up before stage 1. Its ``minReplicas`` another manager's (``FloorOwned``),
    the step fails before any weight moves, naming the HPA, its floor and the pods it runs
    (``hold_floor``); the dry run refused otherwise too. Stage 1's hold refused otherwise (RBAC),
    its error is raised as it came, as the step's other writes: Airflow's retry tries again, no
    weight moved. The API server failing the call rather than refusing it (429 or 5xx once the
    client's retries were spent, no answer: ``TRANSIENT``) is raised as it came, the dry run's too."""
    from vision_rollout.deploy import FloorOwned
    from vision_rollout.mesh import TRANSIENT, RouterError

    try:
        deployments.hold_floor(spec.baseline_version, dry_run=dry_run)
    except TRANSIENT:
        raise  # (nothing refused: the step's retry asks again)
    except RouterError as exc:
        could_not = f"The rollout could not hold version {spec.baseline_version}'s floor"
        if dry_run:
            raise AirflowFailException(f"{exc}. {could_not} while the candidate takes a share of its traffic") from None
        if not isinstance(exc, FloorOwned):
            raise
        raise AirflowFailException(
            f"{exc}, since the check made before the candidate was deployed. {could_not} while the candidate "
            "takes a share of its traffic: clear this task once its HPA is back at its floor, or once the rollout "
            "owns its minReplicas. No weight moved"
        ) from None


def baseline_size(spec: RolloutSpec, deployments: VersionDeployments) -> int:
    """The baseline's pods: its live Deployment's ``spec.replicas`` (an HPA's choice under
    autoscaling), else (no Deployment, or at 0) the extras' ``build.replicas``."""
    return deployments.replicas(spec.baseline_version) or deployments.build.replicas


def candidate_size(spec: RolloutSpec, weight: int, deployments: VersionDeployments) -> int:
    """The candidate's pods at a stage of ``weight`` percent (``candidate_replicas``)."""
    return candidate_replicas(
        baseline_size(spec, deployments), weight, spec.mirror_percent, deployments.build.min_replicas
    )


def scale_ready(
    deployments: VersionDeployments,
    version: str,
    replicas: int,
    autoscaling_of: str | None = None,
    rolling_back: bool = False,
) -> None:
    """Version ``version`` at ``replicas`` pods, that many ready: before any traffic moves to it
    (under autoscaling, its HPA that of ``autoscaling_of``, when given: ``VersionDeployments.scale``;
    ``rolling_back``: that HPA's apply refused is logged, the pods scaled all the same)."""
    if not deployments.scale(version, replicas, autoscaling_of, rolling_back=rolling_back):
        raise AirflowFailException(f"version {version} has no Deployment {deployments.target.service}-v{version}")
    deployments.wait_ready(version, replicas)


def baseline_serving(spec: RolloutSpec, deployments: VersionDeployments) -> None:
    """The baseline runs pods (a rollout against a version already retired would route its share
    to nothing), one of them ready."""
    if not deployments.replicas(spec.baseline_version):
        raise AirflowFailException(
            f"baseline version {spec.baseline_version} has no pods ({deployments.target.service}-v"
            f"{spec.baseline_version} is missing or at 0): roll out against the version serving now"
        )
    deployments.wait_ready(spec.baseline_version, 1)


@contextmanager
def stage_record_readable(spec: RolloutSpec, run_id: str, index: int, hook: ModelServerHook) -> Iterator[None]:
    """A stage record that cannot be read (``attempts.RecordError``) fails the step (no retry:
    it reads the same file) in one line: the file, what is wrong with it, and what to do."""
    from vision_rollout.attempts import RecordError

    try:
        yield
    except RecordError as exc:
        raise AirflowFailException(
            f"{exc}. The file is left as it is, for inspection; to test stage {index + 1} afresh: rolloutctl "
            f"restart-stage --run-dir {hook.settings.run_dir_argument} --model {spec.model} --run-id {run_id!r} --stage "
            f"{index + 1} --reason '...' (it keeps the file aside), then clear the stage's apply_mesh_weights"
        ) from None


def apply_weights(
    params: dict[str, Any], index: int, run_id: str, previous: dict[str, Any] | None, verified: str | None = None
) -> dict[str, Any]:
    """Stage ``index``'s weights (and mirror) into effect; in kubernetes mode the candidate first
    scaled to the stage's size, its pods ready. ``previous``: the build report (first stage) or
    the previous stage's verdict. ``verified``: the sha256 of the candidate's file as
    ``build_image`` verified it; in local mode no weight moves to a candidate served from other
    bytes (``unverified``), and the stage's wait checks it at each poke."""
    spec = spec_from(params)
    if index >= len(spec.stages):
        raise AirflowSkipException(f"this rollout has {len(spec.stages)} stages")
    if previous is None or previous.get("decision", "pass") != "pass":
        raise AirflowSkipException("the previous step did not pass")
    from vision_rollout import attempts

    hook = serving()
    hold(spec, run_id, hook, WAITING_STEP_S)
    record = hook.settings.workdir(spec.model, run_id)
    with stage_record_readable(spec, run_id, index, hook):
        resumed = attempts.resumed(record, run_id, index)
    if resumed is not None and resumed.outcome is not None and resumed.outcome.get("status") != "pass":
        # Its test decided against the candidate: no traffic goes to it again; the wait reports it.
        with stage_record_readable(spec, run_id, index, hook):
            started, outcome = attempts.applied(record, run_id, index, time.time())
        print(f"stage {index + 1}: its test decided already ({outcome and outcome.get('status')}); weights not applied")
        return {"weight": spec.stages[index], "started": started}
    if (
        resumed is not None
        and resumed.outcome is not None
        and (later := later_stage_applied(spec, run_id, index, hook))
    ):
        # Cleared alone (its downstream unticked) after a later stage took effect: its weights
        # again would move traffic back under that stage's wait. Its wait reports its decision.
        with stage_record_readable(spec, run_id, index, hook):
            started, _ = attempts.applied(record, run_id, index, time.time())
        print(f"stage {index + 1}: its test passed and {later} took effect since; weights left as they are")
        kept = {"weight": spec.stages[index], "started": started}
        return kept if verified is None else {**kept, "sha256": verified}
    r = router(spec, run_id, hook)
    if spec.mesh == "istio":  # both versions ready before any weight moves: no route to missing pods
        deployments = hook.deployments(spec.model)
        changed = deployments.changed(spec.candidate_version)
        if changed:
            raise AirflowFailException(f"{changed}; no more weight moves to it")
        if index == 0:
            baseline_serving(spec, deployments)
            shared = deployments.shared_budgets([spec.baseline_version, spec.candidate_version])
            if shared:
                raise AirflowFailException(f"{'; '.join(shared)}. No weight moved")
            # Under autoscaling, the stable version kept at its size for the whole run: its HPA
            # would shrink it as the candidate takes a share (put back by promote or restore_stable).
            floor_holdable(spec, deployments, dry_run=False)
            r.reconcile()  # the subsets, before anything (a rollback included) routes to one
        scale_ready(deployments, spec.candidate_version, candidate_size(spec, spec.stages[index], deployments))
    elif index == 0:
        r.reconcile()
    changed = unverified(spec, hook, verified)
    if changed:
        restore_stable(params, run_id, unload_candidate=False)
        raise AirflowFailException(f"{changed}; no more weight moves to it, version {spec.baseline_version} takes 100%")
    hold(spec, run_id, hook)  # still this run's, after the wait
    # Recorded before the traffic moves (a re-run resumes the stage's test, its window, its looks,
    # its alpha spent: ``attempts``): a worker killed between the two leaves a record of a move
    # that may not have happened, never a move no record names (``later_stage_applied``).
    with stage_record_readable(spec, run_id, index, hook):
        started, _ = attempts.applied(record, run_id, index, time.time(), spec)
    r.set_routes(spec.policy_for_stage(spec.stages[index]))
    applied = {"weight": spec.stages[index], "started": started}
    return applied if verified is None else {**applied, "sha256": verified}


def later_stage_applied(spec: RolloutSpec, run_id: str, index: int, hook: ModelServerHook) -> str | None:
    """The last stage after ``index`` whose weights this run applied (its record in the run
    folder holds an attempt), as "stage N (W%)"; None when none was."""
    from vision_rollout import attempts

    folder = hook.settings.workdir(spec.model, run_id)
    for later in range(len(spec.stages) - 1, index, -1):
        with stage_record_readable(spec, run_id, later, hook):
            if attempts.load(folder, run_id, later).attempts:
                return f"stage {later + 1} ({spec.stages[later]}%)"
    return None


def enable_shadow(params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Mirror on, and masking proven end to end with a probe carrying a synthetic phone number:
    its shadow copy must reach the prediction log, its metadata only masked."""
    import secrets
    import string

    from model_server.predictionlog import read
    from vision_rollout.engine import log_elsewhere
    from vision_rollout.mesh import mesh_route_version, mirror_probes
    from vision_rollout.replay import load_validation
    from vision_rollout.serving import AdminError, ModelServerAdmin, image_request

    spec = spec_from(params)
    hook = serving()
    hold(spec, run_id, hook)
    settings = hook.settings
    policy = router(spec, run_id, hook).get_routes()
    if spec.mirror_percent == 0:
        return {"mirror": None}
    routed = [d.version for d in policy.route if d.weight > 0]
    if policy.mirror is None and not policy.rules and routed == [spec.candidate_version]:
        # Cleared alone once a stage at 100% (or the promotion) took effect: no baseline request
        # is left to mirror, and the masking check was done when the mirror was on.
        why = f"version {spec.candidate_version} takes all of the traffic now: there is nothing to mirror"
        print(f"{why}; the masking check is not run again")
        return {"mirror": None, "not_checked": why}
    if policy.mirror is None or policy.mirror.version != spec.candidate_version or policy.mirror.percent <= 0:
        raise AirflowFailException(
            f"the mirror to version {spec.candidate_version} is not in effect: {policy.to_dict()}"
        )
    # A request the policy routes to the baseline and samples for the mirror. Its id is letters
    # only: no detector may take part of it for a phone or card number and mask it. Envoy (mesh
    # istio) splits and samples on its own, per request and at random: a round of probes goes
    # every 2 s until a copy lands, as many as make missing the mirror all along unlikely.
    istio = spec.mesh == "istio"
    per_round = (
        min(MAX_PROBES_PER_ROUND, -(-mirror_probes(policy.mirror.percent) // (PROBE_WINDOW_S // PROBE_EVERY_S)))
        if istio
        else 1
    )
    # The user's version by the mesh's assignment: under Istio its bucket from the EnvoyFilter's
    # hash, and a request of the candidate's users is not mirrored.
    user = next(
        f"probe-user-{i}"
        for i in range(10_000)
        if (mesh_route_version(policy, f"probe-user-{i}") if istio else policy.choose({}, f"probe-user-{i}")[0])
        == spec.baseline_version
    )

    def probe_id() -> str:
        # A random stem, then letters counted up: the mirror samples one id in 10,000 at its
        # smallest share, and 400,000 tries all miss it with probability e^-40. (Envoy's
        # sampling does not look at the id: any will do.)
        stem = "probe-" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(16))
        if istio:
            return stem
        for i in range(PROBE_TRIES):
            rid = stem + "".join(string.ascii_lowercase[(i // 26**k) % 26] for k in range(4))
            if policy.mirror_for(spec.baseline_version, rid) is not None:
                return rid
        raise AirflowFailException(
            f"no request id of {PROBE_TRIES} is sampled by the mirror ({policy.mirror.percent:g}% to version "
            f"{policy.mirror.version}): the masking probe cannot be sent"
        )

    try:
        [(_, image, _)] = load_validation(settings.validation(spec.model), limit=1)
    except (OSError, ValueError) as exc:  # an empty set fails the unpacking
        raise AirflowFailException(f"no probe image in {settings.validation(spec.model)}: {exc}") from None
    body = image_request([image])
    serving_url = settings.serving_url(spec.model, spec.mesh)
    if elsewhere := log_elsewhere(serving_url.split("://", 1)[-1], settings.prediction_log, settings.token):
        raise AirflowFailException(f"{elsewhere}: the masking probe's shadow copy would never be found there")
    through_mesh = ModelServerAdmin(serving_url, settings.token)
    started = datetime.now(UTC)
    sent: list[str] = []
    deadline, next_probe, unread = time.monotonic() + PROBE_WINDOW_S, 0.0, 0
    while time.monotonic() < deadline:
        if not sent or (istio and time.monotonic() >= next_probe):
            next_probe = time.monotonic() + PROBE_EVERY_S
            for _ in range(per_round):
                sent.append(probe_id())
                # X-Shadow-Probe (with the admin token): the copy runs at once, not in the candidate's
                # idle time, which a loaded or slow candidate may not have for minutes.
                probe_headers = {
                    "X-Request-ID": sent[-1],
                    "X-User-ID": user,
                    "X-Meta-Probe": f"call {PROBE_VALUE}",
                    "X-Shadow-Probe": "1",
                }
                try:
                    through_mesh.infer(spec.model, body, probe_headers)
                except AdminError as exc:
                    raise AirflowFailException(f"probe request failed: {exc}") from None
        df = read(
            settings.prediction_log,
            started - timedelta(minutes=1),
            datetime.now(UTC) + timedelta(minutes=1),
            model=spec.model,
            columns=["request_id", "role", "meta"],
            roles=["shadow"],
            deadline=deadline,  # (a slow store: no file begun past the window, by the window's clock)
            clock=time.monotonic,
        )
        unread = df.attrs["unread_files"] + df.attrs["unlisted_folders"]
        rows = df[df["request_id"].isin(sent)]
        if len(rows):
            meta = rows["meta"].iloc[0] or ""
            if PROBE_VALUE in meta or "tok_" not in meta:
                raise AirflowFailException(f"masking check failed: the probe's metadata reached the log as {meta!r}")
            rid = str(rows["request_id"].iloc[0])
            return {"mirror": policy.mirror.version, "probe": rid, "masked": json.loads(meta)["x-meta-probe"]}
        time.sleep(0.5)
    named = ", ".join(sent[:5]) + (f" and {len(sent) - 5} more" if len(sent) > 5 else "")
    in_part = (
        f" (read in part: {unread} of its files or hour folders not read within the probe's {PROBE_WINDOW_S} s, "
        "a slow store or very many files)"
        if unread
        else ""
    )
    raise AirflowFailException(
        f"no shadow copy of the {len(sent)} probe(s) ({named}, mirrored {policy.mirror.percent:g}%) reached the "
        f"prediction log {settings.prediction_log} in {PROBE_WINDOW_S} s{in_part}"
    )


def look_at_stage(
    params: dict[str, Any], index: int, applied: dict[str, Any] | None, run_id: str, wait: str | None = None
) -> dict[str, Any] | None:
    """One poke of ``wait_for_metrics``: a replay round, then the engine judges the looks due.

    None while the stage goes on; its verdict (XCom) once it passed, failed or ended undecided.
    A tripped guard puts the stable version back at once, then fails the task (no retry), as does,
    in kubernetes mode, a candidate left with no ready pod (``candidate_serving``).

    The stage's test is kept in the run folder (``attempts``): each decision is written there
    before it is acted on, and a stage whose test decided already (a task cleared, a run
    cleared) reports that decision again, judging nothing: a breach restores the stable version
    and fails again. A run folder that cannot be read or written holds the stage (no decision is
    given that is not kept), as a log that cannot be listed does; a breach acts all the same.
    ``wait``: the id of the wait's try (its task instance's), counted in the report.
    """
    from vision_rollout import attempts
    from vision_rollout.engine import StageState, StageWindow, gpu_gauges
    from vision_rollout.gates import Verdict
    from vision_rollout.spec import MIN_ALPHA

    spec = spec_from(params)
    if applied is None or index >= len(spec.stages):
        raise AirflowSkipException("stage not applied")
    hook = serving()
    held = hold(spec, run_id, hook, judging=True)
    folder = hook.settings.workdir(spec.model, run_id)
    try:
        with stage_record_readable(spec, run_id, index, hook):
            record, attempt = attempts.judged(folder, run_id, index, float(applied["started"]), wait)
    except attempts.RestartPending as exc:
        raise AirflowFailException(str(exc)) from None
    except OSError as exc:
        print(f"stage {index + 1}: holding: its record in the run folder cannot be read ({str(exc)[:300]})")
        return None
    if attempt.outcome is not None:
        print(
            f"stage {index + 1} ({spec.stages[index]}%): its test decided at look {attempt.look} "
            f"({attempt.outcome.get('status')}); reported again, nothing judged"
        )
        if attempt.outcome.get("status") == "breach":
            restore_stable(params, run_id, unload_candidate=False)
            raise AirflowFailException(
                f"{attempt.outcome['summary']} Version {spec.baseline_version} takes 100% again."
            )
        if attempt.outcome.get("status") == "pass":
            lease_runs(spec, held)
        return with_runs(spec, attempt.outcome, record)
    if spec.mesh == "istio":
        candidate_serving(params, spec, run_id, hook)
        mesh_serving(params, spec, run_id, hook, index)
    elif changed := unverified(spec, hook, applied.get("sha256")):
        # Its share was served by bytes no check saw: what the looks judged is not the candidate's.
        reason = f"{changed}; the stage's evidence is not of the file verified"
        try:
            attempts.decided(folder, record, attempt, 0, {"status": "breach", "summary": reason})
        except (OSError, attempts.RecordError) as exc:  # (the stable version goes back all the same)
            log.warning("the stage's breach is not kept in the run folder: %s", str(exc)[:300])
        restore_stable(params, run_id, unload_candidate=False)
        raise AirflowFailException(f"{reason}. Version {spec.baseline_version} takes 100% again.")
    source = PrometheusHook().source()
    window = StageWindow(index, spec.stages[index], attempt.window_start)  # (``attempts.applied`` may move it)
    reckoned = dict(attempt.reckoned)  # (its looks' levels and need, reckoned by an earlier poke on any worker)
    if spec.alpha * attempt.level < MIN_ALPHA:
        state = StageState(
            "undecided",
            0,
            spec.looks_per_stage,
            None,
            f"undecided: its looks before its window moved spent its alpha ({attempt.moves} move(s))",
            {},
            time.time() - window.started,
        )
    else:
        judged_at = spec if attempt.level >= 1 else replace(spec, alpha=spec.alpha * attempt.level)
        state = stage_judge(judged_at, hook, source, reckoned)(window)
    print(
        f"stage {index + 1} ({window.weight}%): {state.status}, look {state.look} of {state.looks}, "
        f"{state.elapsed_s:.0f} s in, served {state.served}: {state.reason}"
    )
    if state.status == "breach":
        try:
            attempts.decided(folder, record, attempt, state.look, {"status": "breach", "summary": state.reason})
        except (OSError, attempts.RecordError) as exc:  # (the stable version goes back all the same)
            log.warning("the stage's breach is not kept in the run folder: %s", str(exc)[:300])
        restore_stable(params, run_id, unload_candidate=False)
        raise AirflowFailException(f"{state.reason} Version {spec.baseline_version} takes 100% again.")
    if not state.done:
        try:
            with stage_record_readable(spec, run_id, index, hook):
                attempts.looked(folder, record, attempt, state.look, reckoned)
        except OSError as exc:
            log.warning("the stage's last look is not kept in the run folder: %s", str(exc)[:300])
        return None
    # Ended without a look judged (its guards never read): a verdict all the same, no look, level 0.
    verdict = (state.verdict or Verdict("wait", (), 0, state.looks, spec.alpha, 0.0, spec.spending)).to_dict()
    if state.status == "undecided":
        verdict["summary"] = state.reason
    bake = {
        "elapsed_s": round(state.elapsed_s, 1),
        "served": state.served,
        "gpu": gpu_gauges(source, spec.model, spec.candidate_version, state.elapsed_s),
        "look": state.look,
        "looks": state.looks,
        # (the deciding look's evidence, its records from ``window`` to ``until``: the report's chart)
        "window": window.started,
        "until": state.until,
    }
    outcome = {**verdict, "status": state.status, "bake": bake}
    if state.status == "pass":
        lease_runs(spec, held)
    try:
        with stage_record_readable(spec, run_id, index, hook):
            attempts.decided(folder, record, attempt, state.look, outcome)
    except OSError as exc:  # (the next poke judges the same looks to the same decision)
        print(f"stage {index + 1}: holding: its decision cannot be kept in the run folder ({str(exc)[:300]})")
        return None
    return with_runs(spec, outcome, record)


def poke_stage(
    params: dict[str, Any],
    index: int,
    applied: dict[str, Any] | None,
    run_id: str,
    wait: str | None = None,
    ti_id: str | None = None,
) -> dict[str, Any] | None:
    """``look_at_stage`` with its errors counted, as the approval's wait counts its failed reads
    (``engine.FailedReads``): a poke that raises other than Airflow's own exceptions (a breach,
    a lost lease, a skip), say the serving path refusing while a model server restarts or the
    Kubernetes API unreachable, holds the stage (None). Its count in a row is kept in the run
    folder per try of the wait (``keep_failed_reads`` by ``ti_id``: the next poke may run on another worker)
    and set back to 0 by a poke that succeeds; the ``guard_error_limit``-th in a row fails the
    stage naming the error. Airflow's retries are not reset by the pokes that succeed between
    errors: counted by them, three passing outages over a stage rolled it back. Where the count
    cannot be kept (no try id, the run folder failing) the error fails the try as it is."""
    from vision_rollout.engine import FailedReads

    try:
        verdict = look_at_stage(params, index, applied, run_id, wait)
    except AirflowException:
        raise
    except Exception as exc:
        if not ti_id:
            raise
        error = f"{type(exc).__name__}: {exc}"[:500]
        try:
            reads = FailedReads(spec_from(params).guard_error_limit, failed_reads_kept(params, ti_id))
            ended = reads.judge(None, error) is not None
            keep_failed_reads(params, ti_id, 0 if ended else reads.count)
        except OSError as kept:
            log.warning("the poke's error is not counted in the run folder: %s", str(kept)[:300])
            raise exc from None
        if ended:
            raise AirflowFailException(
                f"stage {index + 1}: its pokes failed {reads.count} times in a row (guard_error_limit), "
                f"the last time: {error}"
            ) from exc
        log.warning(
            "stage %d: holding: the poke failed (%d of %d in a row): %s", index + 1, reads.count, reads.limit, error
        )
        return None
    try:
        if ti_id and failed_reads_kept(params, ti_id):
            keep_failed_reads(params, ti_id, 0)
    except OSError as exc:
        log.warning("the count of the poke's errors stays in the run folder: %s", str(exc)[:300])
    return verdict


def unpassed_fails(params: dict[str, Any], index: int, verdict: dict[str, Any], ti: Any) -> None:
    """A stage's verdict other than a pass fails its wait, saying which (a test failed, or
    undecided: inconclusive): a wait shown green in the grid reads as "the metrics passed". The
    verdict stays in XCom ``verdict`` for ``decide`` and the report (``evidence``); the failed
    wait leaves ``statistical_gate`` and the later stages upstream-failed, and decide rolls back."""
    status = verdict.get("status") or verdict.get("decision")
    if status == "pass":
        return
    ti.xcom_push(key="verdict", value=verdict)
    weight = spec_from(params).stages[index]
    ended = "ended undecided (inconclusive)" if status == "undecided" else "failed its test"
    raise AirflowFailException(f"stage {index + 1} ({weight}%) {ended}; the run rolls back: {verdict.get('summary')}")


def gate_verdict(params: dict[str, Any], index: int, verdict: dict[str, Any] | None) -> dict[str, Any]:
    """``statistical_gate``: the verdict of the stage its wait passed. None when no poke judged
    the stage (its wait marked success by hand in the UI): it fails saying so, and the run rolls
    back, its report naming that instead of "a step failed"."""
    if verdict is None:
        weight = spec_from(params).stages[index]
        raise AirflowFailException(
            f"stage {index + 1} ({weight}%): its wait_for_metrics was marked success by hand before it reached a "
            "verdict: the stage was not judged, the run rolls back"
        )
    log.info("%s", verdict["summary"])
    return verdict


def with_runs(spec: RolloutSpec, outcome: dict[str, Any], record: Any) -> dict[str, Any]:
    """The stage's verdict as its report shows it: with a check ``runs`` when the stage ran
    more than once (``attempts.runs_sentence``), and, when its test was restarted, its summary
    saying so and what that cost."""
    from vision_rollout.attempts import chance, runs_sentence
    from vision_rollout.gates import Check

    sentence = runs_sentence(record, spec.alpha)
    if sentence is None:
        return outcome
    runs = Check("runs", "info", sentence, "the stage's record in the run folder", blocks_pass=False)
    out = {**outcome, "checks": [*(outcome.get("checks") or []), runs.to_dict()], "attempts": record.tests}
    if record.tests > 1:
        n = record.tests
        out["summary"] = (
            f"{outcome.get('summary', '')} (attempt {n}: the stage's test was restarted {n - 1} time(s) on "
            f"request; a candidate at the margin passes one of {n} with probability up to "
            f"{100 * chance(spec.alpha, n):.3g}%)"
        )
    return out


def stage_judge(
    spec: RolloutSpec, hook: ModelServerHook, source: MetricsSource | None = None, reckoned: Reckoned | None = None
) -> StageJudge:
    """The engine's judge of a stage, sending its replay through the serving path; ``reckoned``:
    what the stage's judgements reckoned (``engine.judge_stage``), kept in its record, where this
    judge puts its own."""
    from vision_rollout.engine import StageJudge

    settings = hook.settings
    address = settings.serving_url(spec.model, spec.mesh).split("://", 1)[-1]  # host:port, as tritonclient takes it
    return StageJudge(
        spec,
        address,
        settings.validation(spec.model),
        settings.prediction_log,
        source,
        cache=settings.stage_caches,
        token=settings.token,
        reckoned={} if reckoned is None else reckoned,
    )


NO_READY_POD_S = 60  # a candidate without a ready pod for this long in a stage is rolled back


def candidate_serving(params: dict[str, Any], spec: RolloutSpec, run_id: str, hook: ModelServerHook) -> None:
    """Kubernetes mode, each poke of a stage: the candidate runs the image the rollout deployed
    (``VersionDeployments.changed``: not one set by hand since, which no guard judged from the
    start and a promotion would carry to 100%), and has a ready pod, or gets one within
    ``NO_READY_POD_S`` (a container restarting); else (crash-looping, evicted, its Deployment gone)
    the stable version takes 100% again and the task fails. Envoy answers the candidate's share
    503 then, and no guard sees it: the guards and the log are the model server's, which a
    version without pods does not write, so the stage would hold on missing data to its end.
    The pods not read (no answer, the API server failing the call: ``TRANSIENT``), the error is
    raised as it came: nothing says they are gone, the poke's retry reads again."""
    from vision_rollout.mesh import TRANSIENT, RouterError

    deployments = hook.deployments(spec.model)
    changed = deployments.changed(spec.candidate_version)
    if changed:  # its share is served by what no guard of this run judged from the start
        restore_stable(params, run_id, unload_candidate=False)
        raise AirflowFailException(f"{changed}. Version {spec.baseline_version} takes 100% again.")
    try:
        deployments.wait_ready(spec.candidate_version, 1, timeout_s=NO_READY_POD_S, every_s=2.0, strict=False)
    except TRANSIENT:
        raise  # the pods were not read: nothing says they are gone
    except RouterError as exc:
        restore_stable(params, run_id, unload_candidate=False)
        raise AirflowFailException(
            f"version {spec.candidate_version} has no ready pod, its share answered 503 by the mesh ({exc}). "
            f"Version {spec.baseline_version} takes 100% again."
        ) from None


def mirroring(spec: RolloutSpec, run_id: str, hook: ModelServerHook) -> bool:
    """Whether the routes mirror to the candidate now (True where they cannot be read)."""
    from vision_rollout.engine import mirrors_candidate

    return mirrors_candidate(spec, router(spec, run_id, hook))


def mesh_serving(params: dict[str, Any], spec: RolloutSpec, run_id: str, hook: ModelServerHook, index: int) -> None:
    """Kubernetes mode, each poke of a stage, before its looks are judged: the mesh serves the
    stage's policy as it was applied (``IstioRouter.serving_problem``: its VirtualService not
    edited by hand, a DestinationRule subset for each version it routes to, and, with a split,
    the bucket EnvoyFilter that makes it per user). Else what the looks would judge is not the
    stage's split: the stable version takes 100% again (no weight moves forward) and the task
    fails naming the object. The decision is not kept as the stage's breach: it is the mesh's,
    not the candidate's. A read the API server failed or left unanswered (``TRANSIENT``) is
    raised as it came: nothing read says the mesh changed."""
    problem = router(spec, run_id, hook).serving_problem(spec.policy_for_stage(spec.stages[index]))
    if problem:
        restore_stable(params, run_id, unload_candidate=False)
        raise AirflowFailException(
            f"stage {index + 1} ({spec.stages[index]}%): {problem}; the stage's evidence is not of the split it "
            f"applied. Version {spec.baseline_version} takes 100% again."
        )


def shadow_consistency(params: dict[str, Any], since: datetime, run_id: str) -> dict[str, Any]:
    """The shadow audit of the run's records up to the step's start, once the shadow copies of
    its last primaries are written (``await_copies``: until the range closes at most), where the
    mirror is still on (a run whose stable version took 100% back makes no more copies). The model
    stays this run's meanwhile (``rollout_audit_s``: the longest wait and reads), and for the time
    the next task takes to start (the lease runs out 300 s after its last renewal)."""
    from vision_rollout.audit import report_files, write_report
    from vision_rollout.engine import rollout_audit, rollout_audit_s

    spec = spec_from(params)
    hook = serving()
    hold(spec, run_id, hook, LEASE_S + rollout_audit_s())  # the copies' wait and the log's reads take a while
    settings = hook.settings
    end = datetime.now(UTC)
    result = rollout_audit(
        settings.prediction_log, since, end, spec, bool(spec.mirror_percent) and mirroring(spec, run_id, hook)
    )
    write_report(report_files(result), settings.workdir(spec.model, "audit-" + since.strftime("%Y%m%dT%H%M%S")))
    hold(spec, run_id, hook)
    return result.to_dict()


# In order: the first failure is the cause.
STAGE_STEPS = ("apply_mesh_weights", "enable_shadow", "wait_for_metrics", "statistical_gate")


@contextmanager
def failure_kept(ti: Any) -> Iterator[None]:
    """A stage's step that fails leaves its reason in XCom (key ``failure``): the rollback report
    names it (``evidence``), not just "a step failed". A retried try starts with its XCom cleared."""
    try:
        yield
    except AirflowSkipException:
        raise
    except Exception as exc:
        ti.xcom_push(key="failure", value=str(exc)[:1000] or type(exc).__name__)
        raise


def evidence(ti: Any, max_stages: int) -> tuple[list[Any], dict[str, Any] | None, list[str | None]]:
    """From XCom: each stage's verdict (``stage_verdicts``), the shadow audit, and why a stage's
    step failed."""
    failures = [
        next(
            (f for step in STAGE_STEPS if (f := ti.xcom_pull(task_ids=f"stage_{i + 1}.{step}", key="failure"))),
            None,
        )
        for i in range(max_stages)
    ]
    return stage_verdicts(ti, max_stages), ti.xcom_pull(task_ids="shadow_consistency"), failures


def stage_verdicts(ti: Any, max_stages: int) -> list[Any]:
    """From XCom: each stage's verdict (``statistical_gate``'s, or that of a wait failed by its
    test: ``unpassed_fails``), None where there is none."""
    return [
        ti.xcom_pull(task_ids=f"stage_{i + 1}.statistical_gate")
        or ti.xcom_pull(task_ids=f"stage_{i + 1}.wait_for_metrics", key="verdict")
        for i in range(max_stages)
    ]


def approval_body(params: dict[str, Any], reason: str, verdicts: list[dict[str, Any] | None]) -> str:
    """What the reviewer reads in the UI before answering (Markdown)."""
    spec = spec_from(params)
    lines = [
        f"**{spec.model}** version {spec.candidate_version} against {spec.baseline_version}: {reason}.",
        "",
    ]
    for weight, verdict in zip(spec.stages, verdicts, strict=False):
        if verdict:
            lines.append(f"- **{weight}%**: {verdict['summary']}")
    lines += [
        "",
        "Promote: the candidate takes 100%, the baseline is retired, the mirror is off. "
        "Roll back: the baseline takes 100% again. No answer in time rolls back; "
        "a hard guard that trips meanwhile rolls back at once.",
    ]
    return "\n".join(lines)


def outcome(params: dict[str, Any], decided: str | None, reason: str) -> str:
    """``outcome``: the run's result where the list of runs shows it. A promotion succeeds; a
    rollback fails it, and so the run (as Flagger marks a rolled-back canary Failed), once the
    stable version is back and the report went out: a run that rolled back and one that promoted
    both ended "success", told apart only by opening each run's grid."""
    spec = spec_from(params)
    if decided == "promote":
        return f"version {spec.candidate_version} promoted: {reason}"
    if decided == "rollback":
        raise AirflowFailException(
            f"version {spec.candidate_version} was rolled back, version {spec.baseline_version} serves: {reason}"
        )
    raise AirflowFailException(
        f"decide chose nothing (marked success by hand?): version {spec.candidate_version} was not promoted"
    )


def ask_approval(
    params: dict[str, Any], reason: str, verdicts: list[dict[str, Any] | None], where: str, hours: float
) -> None:
    """Slack (or the outbox) is told an approver's answer is awaited, with the evidence: without
    it nobody knew, and no answer rolled back once ``hours`` had passed. A report Slack did not
    take is logged; the question stands in the UI all the same."""
    from vision_rollout.gates import Verdict
    from vision_rollout.notify import approval_message

    spec = spec_from(params)
    message = approval_message(spec, [Verdict.from_dict(v) for v in verdicts if v], reason, where, hours)
    tell(spec, message, "the request for approval")


def send(spec: RolloutSpec, message: Any) -> dict[str, Any]:
    """``message`` to the run's Slack channel, or the outbox where Slack does not take it, with
    a link to the run in Airflow's UI and where the rollout acted (``with_run``)."""
    settings = serving().settings
    return slack_notifier(spec.slack_channel, settings.outbox).send(outgoing(message, acted_on(spec, settings)))


def outgoing(message: Message, where: str) -> Message:
    """``message`` as the run sends it: with a link to the run and ``where`` it acted
    (``notify.with_run``), and every secret Airflow masks in task logs (the connections'
    passwords and sensitive extras, sensitive Variables) as ``***``: a report quotes the errors
    of servers and clients, and Slack is no task log."""
    from airflow.sdk._shared.secrets_masker import redact

    from vision_rollout.notify import redacted, with_run

    return redacted(with_run(message, this_run_url(), where), lambda text: str(redact(text)))


def this_run_url() -> str | None:
    """The running task's DAG run in Airflow's UI (``notify.run_url``); None outside a task, or
    where Airflow's ``[api] base_url`` is not set."""
    from airflow.sdk import get_current_context
    from airflow.sdk.configuration import conf

    from vision_rollout.notify import run_url

    try:
        dag_run = get_current_context()["dag_run"]
    except (RuntimeError, KeyError):
        return None
    return run_url(conf.get("api", "base_url", fallback=None), dag_run.dag_id, dag_run.run_id)


def acted_on(spec: RolloutSpec, settings: Any) -> str:
    """Where a rollout of ``spec`` acts: its model and versions, and the mesh's objects (the
    VirtualService and Service in their namespace, or the model server)."""
    from vision_rollout.serving import redact

    what = f"model {spec.model}, version {spec.candidate_version} against {spec.baseline_version}, mesh {spec.mesh}"
    if spec.mesh != "istio":
        return f"{what}, model server {redact(settings.url)}"
    try:
        target = settings.istio_for(spec.model)
    except SettingsError:
        return what
    return f"{what}, namespace {target.namespace}: VirtualService {target.name}, Service {target.service}"


def tell(spec: RolloutSpec, message: Any, what: str) -> None:
    """``send``, logging where ``what`` is where Slack did not take it for sure (``_undelivered``:
    in the outbox, or kept nowhere): the run goes on."""
    sent = send(spec, message)
    if sent.get("slack_error"):
        log.warning("%s: %s", what, _undelivered(sent))


def last_stage_start(params: dict[str, Any], ti: Any) -> float:
    """When the last stage's weights took effect (``apply_mesh_weights``' XCom): where the guards
    read while a promotion awaits its approval begin."""
    applied = ti.xcom_pull(task_ids=f"stage_{len(spec_from(params).stages)}.apply_mesh_weights") or {}
    return float(applied.get("started") or time.time())


def failed_reads_folder(params: dict[str, Any]) -> Folder:
    """Where the approval waits of the run's model keep their failed reads of the guards, and its
    stages' waits the count of their pokes that raised (``poke_stage``)."""
    return approvals_folder(spec_from(params).model)


def approvals_folder(model: str) -> Folder:
    """Where the approval waits of ``model``'s runs keep their failed reads (``settings.approvals``)."""
    from vision_rollout.settings import approvals

    return approvals(serving().settings.run_folder, model)


def failed_reads_kept(params: dict[str, Any], ti_id: str) -> int:
    """The failed reads in a row of the approval wait of task instance ``ti_id`` (each try has
    its own), as its trigger kept them (``keep_failed_reads``): a triggerer that restarts, or
    another that takes the trigger over, counts on from there. 0 when none are kept, or what is
    kept is no count (not one ``keep_failed_reads`` wrote: counted afresh, saying so)."""
    folder = failed_reads_folder(params)
    try:
        count = json.loads(folder.read_within(f"{ti_id}.json", MAX_COUNT_BYTES))["count"]
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        count = f"{type(exc).__name__}: {exc}"
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    log.warning(
        "the count of failed reads %s/%s.json cannot be read (%s): counted from 0", folder, ti_id, str(count)[:200]
    )
    return 0


def keep_failed_reads(params: dict[str, Any], ti_id: str, count: int) -> None:
    """The wait's count of failed reads in a row kept in the run folder (none kept at 0)."""
    folder = failed_reads_folder(params)
    if count:
        folder.write(f"{ti_id}.json", json.dumps({"count": count}).encode())
    else:
        folder.delete(f"{ti_id}.json")


def guards_while_waiting(params: dict[str, Any], since: float) -> tuple[str | None, str | None]:
    """The last stage's hard guards, read again while its promotion awaits an approval
    (``engine.guard_breach``): the sentence of those that tripped, and why they could not be
    read (each None when there is none). A rollout aborted meanwhile (``rolloutctl abort`` marks
    the model's lease) is a breach: the wait ends with Roll back. The guards are read first: a
    lease read that hangs (an API server half-open, its retries) does not hold up a tripped
    guard."""
    from vision_rollout.engine import guard_breach

    spec = spec_from(params)
    breach, unread = guard_breach(PrometheusHook().source(), spec, since)
    if breach:
        return breach, unread
    try:
        held = serving().model_lock(spec.model, spec.mesh).holding()
    except Exception as exc:  # (the lease unreadable: the guards decide, as without it)
        log.warning("the model's lease could not be read for an abort: %s", str(exc)[:300])
        held = None
    if held is not None and held.aborted:
        return f"the rollout was aborted: {held.aborted}", None
    return breach, unread


def blind_while_waiting(params: dict[str, Any], since: float) -> str | None:
    """When the hard guards were blind over the last stage and the wait for approval
    (``engine.blind_while_waiting``), for the decision's report; None when they watched it all
    or Prometheus could not say (a warning: the guards' own reads decide)."""
    from vision_rollout.engine import blind_while_waiting as blind

    try:
        return blind(PrometheusHook().source(), spec_from(params), since)
    except Exception as exc:
        log.warning("the hard guards' coverage of the wait could not be read: %s", str(exc)[:300])
        return None


def replay_while_waiting(params: dict[str, Any]) -> str | None:
    """A validation replay round through both versions and the accuracy-drop guard on it
    (``engine.replay_breach``), where a Promote is about to retire the baseline: the candidate
    served the traffic meanwhile, and the stage's rounds are hours old. The sentence of the
    breach, None when the guard held."""
    from vision_rollout.engine import replay_breach

    spec = spec_from(params)
    judge = stage_judge(spec, serving())
    try:
        samples = judge.replay_round()
    except Exception as exc:  # (the model server unreachable): nothing shows the candidate as accurate
        log.exception("the validation replay could not be sent")
        return f"the validation replay could not be sent: {type(exc).__name__}: {str(exc)[:500]}"
    return replay_breach(spec, samples, len(judge.labels))


def breach_while_waiting(params: dict[str, Any], run_id: str, breach: str) -> None:
    """A hard guard tripped while the promotion awaited its approval: the stable version takes
    100% again at once (as a stage's breach puts it back), and Slack is told; ``decide`` rolls
    back whatever the answer."""
    from vision_rollout.notify import rollback_message

    spec = spec_from(params)
    restore_stable(params, run_id, unload_candidate=False)
    message = rollback_message(spec, f"{breach} (while the promotion awaited approval)", None, spec.stages[-1])
    tell(spec, message, "the guard breach")


def judge_evidence(
    params: dict[str, Any],
    verdicts: list[dict[str, Any] | None],
    audit: dict[str, Any] | None,
    failures: list[str | None] | None = None,
) -> tuple[str, str]:
    """What the evidence says: the library's decision (``engine.judge_evidence``), the one
    ``rolloutctl run`` takes on the same evidence."""
    from vision_rollout.engine import judge_evidence as judge

    return judge(spec_from(params), verdicts, audit, failures)


def decide(
    params: dict[str, Any],
    verdicts: list[dict[str, Any] | None],
    audit: dict[str, Any] | None,
    failures: list[str | None] | None = None,
    approval: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """The evidence, and with ``require_approval`` the reviewer's answer (the approval task's XCom)."""
    outcome, reason = judge_evidence(params, verdicts, audit, failures)
    if outcome != "promote" or not spec_from(params).require_approval:
        return outcome, reason
    if approval is None:
        return "rollback", f"{reason}; but promotion was not approved (no answer from a reviewer)"
    if approval.get("guard_breach"):
        return "rollback", f"{reason}; but while the promotion awaited approval, {approval['guard_breach']}"
    who = approval.get("responded_by_user") or {}
    by = f"by {who.get('name') or who.get('id')}" if who else "by default (no answer in time)"
    if approval.get("chosen_options") == ["Promote"]:
        blind = f"; but {approval['guards_blind']}" if approval.get("guards_blind") else ""
        return "promote", f"{reason}; approved {by}{blind}"
    return "rollback", f"{reason}; rejected {by}"


def promote(params: dict[str, Any], run_id: str, decided: str | None, verified: str | None = None) -> str:
    """100% candidate, mirror off; the baseline retired (unloaded, or its Deployment scaled to 0).
    Only when ``decided`` (decide's XCom ``outcome``) is promote: a ``decide`` marked success by
    hand decided nothing, and its branch skipped neither promote nor rollback.

    Kubernetes mode, in an order that never routes to missing pods: the candidate scaled to the
    baseline's size and ready, then 100% to it, then the baseline drained (``retire``), then its
    pods gone. Run again once that is done (cleared), it changes nothing: the baseline's size
    is 0 by then, which would size the candidate serving all of the traffic.

    Local mode: ``verified``, the sha256 of the file ``build_image`` verified, is what the server
    serves and what its repository holds (the load that unloads the baseline reads the file
    again); else the stable version takes 100% again and nothing is promoted."""
    spec = spec_from(params)
    if decided != "promote":
        raise AirflowFailException(
            f"decide chose {decided or 'nothing (it did not run: marked success by hand?)'}, not promote: "
            f"version {spec.candidate_version} is not promoted"
        )
    if (end := run_ended(spec, run_id)) is not None:  # cleared after the run ended
        return carried_out(spec, run_id, end, "promote")
    hook = serving()
    hold(spec, run_id, hook, WAITING_STEP_S)
    r = router(spec, run_id, hook)
    if spec.mesh == "local":
        changed = unverified(spec, hook, verified, on_disk=True)
        if changed:
            restore_stable(params, run_id, unload_candidate=False)
            raise AirflowFailException(
                f"{changed}; version {spec.candidate_version} is not promoted, version {spec.baseline_version} "
                "takes 100% again"
            )
        r.set_routes(spec.promoted_policy())
        promotion_recorded(spec, run_id, hook)
        hook.settings.admin.load(spec.model, [spec.candidate_version])
        return spec.candidate_version
    if promotion_in_effect(spec, run_id, hook):  # run again once it retired the baseline: sized by nothing now
        promotion_recorded(spec, run_id, hook)
        return spec.candidate_version
    deployments = hook.deployments(spec.model)
    changed = deployments.changed(spec.candidate_version)
    if changed:  # the evidence is of another image than the one that would take 100%
        raise AirflowFailException(f"{changed}; version {spec.candidate_version} is not promoted")
    retirable(spec, deployments)
    # The stable version's size, and its autoscaling: the candidate takes it over with its traffic.
    scale_ready(deployments, spec.candidate_version, baseline_size(spec, deployments), spec.baseline_version)
    hold(spec, run_id, hook, WAITING_STEP_S)  # still this run's, after the wait; and for the drain
    router(spec, run_id, hook, only=spec.candidate_version).set_routes(spec.promoted_policy())
    promotion_recorded(spec, run_id, hook)  # (before the baseline is retired: the teardown keeps only what it says)
    retire(r, deployments, spec.baseline_version)
    floor_released(spec, run_id, hook, deployments)  # its own HPA, should it serve again
    return spec.candidate_version


def floor_released(spec: RolloutSpec, run_id: str, hook: ModelServerHook, deployments: VersionDeployments) -> None:
    """The baseline's floor released (``release_floor``) once the traffic moved (promote, the
    rollback); its PodDisruptionBudget not updated (``BudgetNotApplied``: the floor released all
    the same) not raised: a budget, a guard against node drains, never holds back a promotion or
    a rollback. It is logged and recorded in the run folder (``besides_recorded``), with what to
    set the budget to, for the run's report to say (``notify``), as the teardown's of a kept
    promotion does."""
    try:
        baseline_floor_released(spec, run_id, hook, deployments)
    except BudgetNotApplied as exc:
        log.warning("version %s's HPA floor is released, not its budget: %s", spec.baseline_version, exc)
        besides_recorded(spec, run_id, hook, str(exc))


def baseline_floor_released(
    spec: RolloutSpec, run_id: str, hook: ModelServerHook, deployments: VersionDeployments
) -> None:
    """The baseline's floor released (``release_floor``; its failures raised as they came), for
    promote and the rollback (``floor_released``) and the teardown of a kept promotion. A floor
    released whole (its budget updated) removes an earlier try's record of a budget not updated
    (``besides_recorded``; the run's floor held again since): it would say a budget not updated
    that is; a try that finds no floor held keeps it (the earlier release's budget is still not
    updated)."""
    if deployments.release_floor(spec.baseline_version):
        try:
            hook.settings.workdir(spec.model, run_id).delete(BESIDES)
        except OSError as exc:  # (the floor is released all the same: the report may say the budget of before)
            log.warning("an earlier try's record of a budget not updated is not removed: %s", str(exc)[:300])


def besides_recorded(spec: RolloutSpec, run_id: str, hook: ModelServerHook, what: str) -> None:
    """``what`` promote or the rollback left undone once the traffic moved, recorded in the run
    folder (``BESIDES``) for the run's report (``besides_of``). One plain value: only one can
    exist in a run, the budget of the baseline's floor (``floor_released``: the release that
    leaves it not updated removes the floor's record, so no later release of the run says it
    again); a later record replaces it. A record that cannot be written is logged: the step is
    done all the same, its log says ``what``."""
    try:
        hook.settings.workdir(spec.model, run_id).write(BESIDES, json.dumps({"besides": what}).encode())
    except OSError as exc:
        log.warning("what this run left undone is not recorded for its report: %s", str(exc)[:300])


def besides_of(spec: RolloutSpec, run_id: str) -> list[str]:
    """What promote or the rollback left undone once the traffic moved (``besides_recorded``);
    [] where nothing is recorded, or the record cannot be read (logged: the report goes out)."""
    try:
        read = json.loads(serving().settings.workdir(spec.model, run_id).read_within(BESIDES, MAX_LOCK_BYTES))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("what this run left undone cannot be read for its report: %s", str(exc)[:300])
        return []
    besides = read.get("besides") if isinstance(read, dict) else None
    if isinstance(besides, str):
        return [besides]
    return [str(what) for what in besides] if isinstance(besides, list) else []  # (the older one-item list)


def rollback(params: dict[str, Any], run_id: str) -> str:
    """``rollback``: the stable version back (``restore_stable``); cleared after the run ended,
    what the run carried out re-verified, nothing touched (``carried_out``)."""
    spec = spec_from(params)
    if (end := run_ended(spec, run_id)) is not None:
        return carried_out(spec, run_id, end, "rollback")
    return restore_stable(params, run_id)


def carried_out(spec: RolloutSpec, run_id: str, end: dict[str, Any], decided: str) -> str:
    """promote or rollback run again once their run ended (cleared in the UI, with notify say):
    what the run carried out is neither undone nor done again (its lease is released: another
    run may hold the model now). What serves is read: the version the run left serving (the
    promotion in effect; or the candidate sent nothing), logged and returned as the step's own
    result; else AirflowFailException naming what serves now, nothing touched."""
    from vision_rollout.mesh import routes_to

    hook = serving()
    routes = None
    if decided == "promote":
        version, holds = spec.candidate_version, promotion_in_effect(spec, run_id, hook)
    else:
        version = spec.baseline_version
        routes = router(spec, run_id, hook, only=version).get_routes()
        holds = not routes_to(routes, spec.candidate_version)
    ended = f"this run ended {'promoted' if end.get('promoted') else 'rolled back'} ({str(end.get('done'))[:300]})"
    if not holds:
        if routes is None:  # (what serves, as read after promotion_in_effect's look)
            routes = router(spec, run_id, hook, only=version).get_routes()
        raise AirflowFailException(
            f"{ended}, but it is not what serves now: {json.dumps(routes.to_dict())[:500]} (version "
            f"{spec.candidate_version} {'not promoted' if decided == 'promote' else 'routed'}): changed since "
            f"(another run, or by hand); {decided} cleared after the end re-verifies, nothing touched (to change "
            "what serves, trigger a new run)"
        )
    print(f"{ended}; {decided} cleared after the end re-verified it, version {version} serves: nothing touched")
    return version


def restore_stable(params: dict[str, Any], run_id: str, unload_candidate: bool = True) -> str:
    """100% baseline, mirror off; the candidate unloaded (or its Deployment scaled to 0).

    Routes that send the candidate nothing are left as they are (a run refused before its first
    stage: they serve what serves now, which may not be this run's baseline). Kubernetes mode:
    the baseline's pods first (scaled back when a cut-short promotion or another manager left it
    at 0, one ready pod taking the traffic back, as under autoscaling: the rest may need the room
    the candidate's pods take, so they are waited for once the candidate is retired, not before,
    AirflowFailException saying the traffic is back should they not come; not by the failure
    callback, ``unload_candidate`` False, which has no time to wait;
    its HPA's re-apply refused, another manager's, logged; without autoscaling, its
    ``spec.replicas`` another manager's, KEDA's or a ``kubectl scale``'s, set through its scale
    subresource, the apply's refusal logged: ``VersionDeployments.scale``;
    else one ready pod is enough: it serves already, and a rollback must not wait on a pod that
    will not start; under autoscaling, should it run fewer pods than its floor held since the
    first stage (``VersionDeployments.hold_floor``: those it ran before the run), or without
    that floor than serve now, both versions', it is scaled back for them to start while it takes
    the traffic back, ahead of its HPA: its HPA's apply refused, another manager's, is logged, its
    pods scaled all the same; the scale itself failed, its ready pod takes the traffic back all
    the same, then that failure is raised, its floor still held, once the candidate is retired
    all the same: ``retired_besides``), then 100% to it (promote's
    record of a promotion removed: ``promotion_undone``), its HPA's own floor back
    (``release_floor``; its failure never holds back the rollback: the candidate retired all the
    same, that failure raised after, the floor left to the model's next run: ``floor_kept``),
    then the candidate drained and scaled to 0 (``retire``). What fails once
    the traffic is back (the scale, the wait for the rest of its pods) is raised as it came, after
    the traffic moved (``stable_back``'s ``Shortfall``); the candidate's retirement, raised as its
    own kind, saying the traffic restored (``unretired``)."""
    short = stable_back(params, run_id, unload_candidate)
    if short is not None:
        raise short.error
    return spec_from(params).baseline_version


@dataclass(frozen=True)
class Shortfall:
    """What failed once the stable version took 100% of the traffic back (``stable_back``):
    ``error``, what ``restore_stable`` raises (the rollback step fails on it as ever); ``what``,
    that failure for a report; ``retired``, whether the candidate was retired all the same;
    ``taken``, the run that took the model over before the candidate's retirement (its to retire
    or keep: no command that scales it given), else None."""

    error: Exception
    what: str
    retired: bool
    taken: str | None = None


def unscaled(pods: int, maybe: bool = False) -> str:
    """What a failed scale of a version at 0 pods back to ``pods`` left: ``maybe``, its last
    write may have been written (``RouterError.maybe_written``), never read back."""
    if maybe:
        return f"may have been scaled back to {pod_count(pods)} from 0 or not (its last write's answer left it unknown)"
    return f"was not scaled back to {pod_count(pods)} from 0"


def unscaled_from_0(
    spec: RolloutSpec,
    deployments: VersionDeployments,
    routes: TrafficPolicy | None,
    pods: int,
    maybe: bool,
    run_dir: str,
) -> str:
    """What a restore whose scale of a baseline at 0 pods failed leaves (the routes not moved to
    no pods, as Argo Rollouts' dynamicStableScale scales the stable version up before it shifts
    any traffic), and who puts the stable version back: the lease is kept (``finish``). ``maybe``:
    the scale's last write may have been written (``RouterError.maybe_written``), never read back.
    Once the lease runs out, the model's next run takes the model over only where ``routes`` (as
    they are left; None: unread) are what a rollout against the baseline leaves mid-stage
    (``mesh.mid_rollout_against``, as ``start_from_steady``); else (a promotion cut short: the
    candidate at 100%) it refuses to start, and the report says how to put the baseline back by
    hand: its scale (``scale_by_hand``), then the routes (``rolloutctl mesh apply`` with what it
    needs to work as written: ``run_dir``, the connection's, where it records the mirror's change,
    without which it refuses routes that turn a mirror off; the model, whose record that is; the
    target's root namespace and cluster domain, with which it renders the objects)."""
    from vision_rollout.mesh import mid_rollout_against

    kept = (
        f"version {spec.baseline_version} {unscaled(pods, maybe)}, so the routes are not moved: "
        f"the traffic on version {spec.candidate_version}, the candidate, stays there rather than go to a version "
        "with no pods; this run keeps the model's lease: clearing its ensure_stable tries the restore again, and "
    )
    if routes is not None and mid_rollout_against(routes, spec.baseline_version):
        return (
            f"{kept}once the lease runs out the model's next run takes the model over and moves the routes back to "
            f"version {spec.baseline_version} as it starts, with whatever pods it runs then"
        )
    target = deployments.target
    policy = shlex.quote(json.dumps(spec.stable_policy().to_dict(), separators=(",", ":")))
    file = shlex.quote(f"{target.name}-stable.json")
    apply = " ".join(
        [
            f"echo {policy} > {file};",
            "rolloutctl mesh apply --backend istio --policy",
            file,
            *("--namespace", shlex.quote(target.namespace), "--service", shlex.quote(target.service)),
            *("--name", shlex.quote(target.name), "--versions", spec.baseline_version),
            *("--root-namespace", shlex.quote(target.root_namespace)),
            *("--cluster-domain", shlex.quote(target.cluster_domain)),
            *("--run-dir", shlex.quote(run_dir), "--model", shlex.quote(spec.model), "--force"),
        ]
    )
    return (
        f"{kept}once the lease runs out the model's next run refuses to start, touching nothing (\"baseline version "
        f'{spec.baseline_version} is not what serves now": it takes over only routes a rollout against version '
        f"{spec.baseline_version} leaves mid-stage, version {spec.baseline_version} the larger share); to put "
        f"version {spec.baseline_version} back by hand, scale it up "
        f"({deployments.scale_by_hand(spec.baseline_version, pods)}: {SCALE_BY_HAND_KUBECTL}), then, once its pods "
        f"are ready, send it all of the traffic ({apply}: --force while this run holds the lease)"
    )


class NoDeployment(AirflowFailException):
    """``baseline_ready``'s refusal of a baseline without a Deployment (the routes left as they
    are): its own kind, told from the other AirflowFailExceptions the gate lets through as they
    are (``taken``'s: the lease lost, ``hold``'s)."""


def baseline_ready(
    spec: RolloutSpec,
    deployments: VersionDeployments,
    serving: str,
    kept: Callable[[int, bool], str],
    reserve: int = 0,
    taken: Callable[[], object] = lambda: None,
    sized: Callable[[int], None] = lambda live: None,
    wait: Callable[[], dict[str, float]] = dict,
    unready: Callable[[str], str] | None = None,
) -> tuple[int, BudgetNotApplied | None]:
    """The gate before any traffic is routed back to the baseline (a restore's ``stable_back``, a
    takeover's ``baseline_back``), as Argo Rollouts' dynamicStableScale scales the stable version
    up before it shifts traffic: a baseline without a Deployment refused (``NoDeployment``, the
    routes left as they are); then ``taken`` (the lease held for the wait); one at 0 pods
    (retired by a promotion cut short, left there by a restore whose scale failed or by another
    manager) scaled back to the pods that serve the traffic now, ``serving``'s (its size not read:
    logged, the build's count), the build's count at least, its count first, then its own HPA
    kept (another manager's, a Helm release's: refused, logged, its pods back all the same; its
    read or apply failed otherwise, ``AutoscalingNotApplied``, returned as a budget's failure is:
    ``VersionDeployments.scale``'s ``rolling_back``), ``reserve`` calls kept for after it
    (``mesh.reserved``); one that runs pods
    handed to ``sized`` (its count: a restore's scale-up, not waited for); then, whatever its
    count, one of its pods ready (``wait_ready``, not strict: ready pods of any template count;
    ``wait()``, its timing, asked once the scale is done), its first look the Deployment read here
    unless it was scaled. Returns the count it was scaled back to, 0 where it was not, and the
    budget's failure where the Deployment is at its count but its PodDisruptionBudget or its HPA
    not applied (logged: neither holds back the traffic's way back). The scale's RouterError is raised
    as it came (its kind kept: a transient failure retried as ever), its ``routes_kept`` set to
    ``kept(count, maybe_written)``; one of the read or the wait, its ``routes_kept`` set to
    ``unready(why)`` (where given and the error has none): what the caller leaves, and why."""
    from vision_rollout import mesh
    from vision_rollout.mesh import RouterError

    try:
        baseline = deployments.deployment(spec.baseline_version)  # (its size, and the wait's first look at its pods)
    except RouterError as exc:
        if unready is not None and exc.routes_kept is None:
            exc.routes_kept = unready("could not be read (whether it has a ready pod is unknown)")
        raise
    live = replicas_of(baseline)
    if live is None:
        raise NoDeployment(
            f"version {spec.baseline_version} has no Deployment: the routes stay as they are rather than "
            "sending traffic to no pods"
        )
    taken()
    restoring = 0
    budget: BudgetNotApplied | None = None
    if live == 0:  # (retired by a promotion cut short, left there by a failed scale or another manager)
        try:  # (the serving version's size only chooses how many: its read failed, the build's count)
            pods = deployments.replicas(serving) or 0
        except RouterError as exc:
            pods = 0
            log.warning("version %s's size was not read (%s)", serving, str(exc)[:500])
        restoring = max(deployments.build.replicas, pods)
        try:
            with mesh.reserved(reserve):
                deployments.scale(spec.baseline_version, restoring, spec.baseline_version, rolling_back=True)
        except BudgetNotApplied as exc:  # (scaled: its budget said beside the rest)
            log.warning("%s: it takes the traffic back all the same", exc)
            budget = exc
        except RouterError as exc:
            exc.routes_kept = kept(restoring, exc.maybe_written)
            raise
    else:
        sized(live)
    try:
        deployments.wait_ready(spec.baseline_version, 1, strict=False, live=None if restoring else baseline, **wait())
    except RouterError as exc:
        if unready is not None and exc.routes_kept is None:
            pods = restoring or live
            counted = pod_count(pods)
            came = f"was scaled back to {counted} from 0" if restoring else f"runs {counted}"
            exc.routes_kept = unready(f"has no ready pod: it {came}, {'not' if pods == 1 else 'none of them'} ready")
        raise
    return restoring, budget


@dataclass(frozen=True)
class Finishing:
    """What ``finish`` read before ``stable_back``, neither done again there: ``routes``, the routes
    in effect (``routes_read``; None: not one the rollout reads), just after it renewed the lease;
    ``renewal``, that renewal (None: read back, not renewed); ``quick``, whether it is the failure
    callback's (``stable_back``)."""

    routes: TrafficPolicy | None
    renewal: Holding | None = None
    quick: bool = False


def stable_back(
    params: dict[str, Any], run_id: str, unload_candidate: bool = True, finishing: Finishing | None = None
) -> Shortfall | None:
    """``restore_stable``'s work; a failure once the traffic is back on the stable version returned
    (``Shortfall``), not raised: ``finish`` reports it as that, not as a restore that failed.
    ``finishing``: what ``finish`` read (None: the lease renewed and the routes read here).
    Its ``quick`` (the failure callback, within ``CALLBACK_CAP_S`` of finish's renewal
    of the lease for ``LEASE_S``): the lease not renewed again, and the wait for a ready pod of
    the baseline no longer than its ``api_budget`` has left less the calls after it
    (``AFTER_WAIT_CALLS``), ``CALLBACK_CAP_S`` at most: the routes write comes sooner, after
    ``still_held`` (its ``renewal``)."""
    from vision_rollout import mesh
    from vision_rollout.mesh import RouterError, routes_to

    spec = spec_from(params)
    hook = serving()
    if finishing is None:
        hold(spec, run_id, hook, rolling_back=True)
    quick = finishing is not None and finishing.quick
    r = router(spec, run_id, hook)
    routes = routes_read(spec, r) if finishing is None else finishing.routes
    rerouted = routes is None or routes_to(routes, spec.candidate_version)  # (None: what it sends is unknown)
    if spec.mesh == "local":
        if rerouted:
            r.set_routes(spec.stable_policy())
            promotion_undone(spec, run_id, hook)
        admin = hook.settings.admin
        if unload_candidate and (rerouted or admin.ready(spec.model, spec.candidate_version)):
            admin.load(spec.model, [spec.baseline_version])  # (a candidate never loaded: nothing to unload)
        return None
    deployments = hook.deployments(spec.model)
    unscaled: Shortfall | None = None
    unsized: Shortfall | None = None  # (the failure callback's scale-up left out, for the time: said beside the rest)
    restoring = 0  # (the pods a baseline at 0 is scaled back to)
    floor_read = False  # (the baseline's HPA read for its held floor, ``held``: None where none is held)
    held: int | None = None
    if rerouted:

        def sized(live: int) -> None:  # (a baseline that runs pods: scaled up where it serves with fewer)
            nonlocal held, floor_read, unsized, unscaled
            # (the failure callback's: its reads here only where they leave the calls after the wait their time)
            if deployments.build.autoscaling:
                read = not (quick and mesh.budget_left(1 + AFTER_WAIT_CALLS) < 0)
                unread = None  # (a read that only chose its size failed: never the routes held back for it)
                try:
                    held = deployments.held_floor(spec.baseline_version) if read else None  # (fewer pods than before)
                except RouterError as exc:
                    read, unread = False, f"its HPA's floor could not be read ({str(exc)[:500]})"
                floor_read = read
                reads = 0 if held else 1  # (the candidate's Deployment, for its size)
                size = live  # (unless scaled up below; not: its HPA scales it)
                if held and live >= held:
                    pass  # (nothing to scale)
                elif not read or (quick and mesh.budget_left(reads + SCALE_CALLS + AFTER_WAIT_CALLS) < 0):
                    unsized = unsized_stable(spec, unread, retired=unload_candidate)
                elif held:
                    size = held
                else:
                    try:
                        size = min(live + (deployments.replicas(spec.candidate_version) or 0), MAX_REPLICAS)
                    except RouterError as exc:
                        unread = f"version {spec.candidate_version}'s size could not be read ({str(exc)[:500]})"
                        unsized = unsized_stable(spec, unread, retired=unload_candidate)
                if live < size:  # (not waited for; its HPA another manager's: refused, logged, scaled all the same)
                    try:
                        deployments.scale(spec.baseline_version, size, spec.baseline_version, rolling_back=True)
                    except BudgetNotApplied as exc:  # (scaled, its HPA or its budget not applied: said beside the rest)
                        log.warning("%s: it takes the traffic back all the same", exc)
                        unscaled = Shortfall(exc, str(exc), retired=False)
                    except RouterError as exc:  # (it serves already: the traffic first, then the scale's failure)
                        what = f"version {spec.baseline_version} was not scaled to {size} pods ({str(exc)[:500]})"
                        # (its floor left held on purpose: its HPA scales it there as the traffic comes back)
                        kept = f"; {floor_left_held(deployments, spec.baseline_version, held)}" if held else ""
                        unscaled = Shortfall(exc, f"{what}: it serves with the pods it runs{kept}", retired=False)
                        log.warning("%s: it takes the traffic back first, with the pods it runs%s", what, kept)

        # A baseline at 0 (retired by a promotion cut short) back at the size that serves the traffic now;
        # its first ready pod takes the traffic: the rest may need the room the candidate's pods take;
        # (the failure callback's: its apply read again only where the calls after the wait keep their time;
        # its budget's cap bounds the wait: never the teardown's, whose baseline's pods may take minutes;
        # the calls after it kept their time; CALLBACK_CAP_S at most, finite without a budget too)
        restoring, budget = baseline_ready(
            spec,
            deployments,
            spec.candidate_version,
            lambda pods, maybe: unscaled_from_0(spec, deployments, routes, pods, maybe, hook.settings.run_dir),
            RESTORE_RETRY_CALLS + AFTER_WAIT_CALLS if quick else 0,
            taken=(lambda: None) if quick else lambda: hold(spec, run_id, hook, WAITING_STEP_S, rolling_back=True),
            sized=sized,
            wait=(
                (
                    lambda: {
                        "timeout_s": max(min(mesh.budget_left(AFTER_WAIT_CALLS) - WAIT_POLL_S, CALLBACK_CAP_S), 0.0),
                        "every_s": WAIT_POLL_S,
                    }
                )
                if quick
                else dict
            ),
        )
        if budget is not None:  # (scaled: a budget never holds back a rollback, said beside it)
            unscaled = Shortfall(budget, str(budget), retired=False)
        if quick:
            still_held(hook.model_lock(spec.model, spec.mesh), run_id, finishing.renewal if finishing else None)
        else:
            hold(spec, run_id, hook, rolling_back=True)  # still this run's, after the wait
        router(spec, run_id, hook, only=spec.baseline_version).set_routes(spec.stable_policy())
        promotion_undone(spec, run_id, hook)
        if unscaled is not None:  # (its floor stays held: its HPA scales it there, as the scale would have)
            return retired_besides(spec, run_id, hook, r, unscaled) if unload_candidate else unscaled
    floor: Shortfall | None = None
    left = quick and deployments.build.autoscaling and mesh.budget_left(FLOOR_CALLS + RELEASE_CALLS) < 0
    try:
        if left and not (floor_read and held is None):  # (read and none held: nothing to release, nothing to say)
            raise RouterError("not released by the failure callback: it would leave the lease's release no time")
        if not left:
            floor_released(spec, run_id, hook, deployments)
    except RouterError as exc:  # (the routes back: a floor never holds back a rollback)
        # (not read: for the time, or its release's own read failed, no floor read here before)
        maybe = (left and not floor_read) or (floor_unread(exc) and held is None)
        what = floor_kept(deployments, spec.baseline_version, exc, maybe=maybe)
        log.warning("%s", what)
        exc.args = (f"the traffic is restored (version {spec.baseline_version} takes 100% of it); but {what}",)
        floor = Shortfall(exc, what, retired=unload_candidate)
    if unsized is not None:
        floor = unsized if floor is None else replace(floor, what=f"{unsized.what}; {floor.what}")
    if unload_candidate:
        failed = unretired(spec, run_id, hook, r)
        if failed is not None:  # (the traffic back: not a restore that failed)
            cause, taken = failed
            what = f"the retirement of version {spec.candidate_version} failed ({str(cause)[:500]})"
            what = what if floor is None else f"{what}; {floor.what}"
            held_by = f": run {taken!r} holds model {spec.model!r} now" if taken else ""
            # (its own kind, the step's retries as for it: a transient failure retried, a refusal not)
            cause.args = (
                f"the traffic is restored (version {spec.baseline_version} takes 100% of it); but {what}{held_by}",
            )
            return Shortfall(cause, what, retired=False, taken=taken)
        if restoring:  # (the candidate's room free now; not the failure callback's: it has no time to wait)
            try:
                deployments.wait_ready(spec.baseline_version, restoring, strict=False)
            except RouterError as exc:
                error = AirflowFailException(
                    f"version {spec.baseline_version} takes 100% of the traffic again and version "
                    f"{spec.candidate_version} is unloaded, but not all of its pods came: {exc}"
                )
                what = f"not all of the {restoring} pods of version {spec.baseline_version} came ({str(exc)[:500]})"
                return Shortfall(error, what if floor is None else f"{what}; {floor.what}", retired=True)
    return floor


def unsized_stable(spec: RolloutSpec, unread: str | None, retired: bool) -> Shortfall:
    """The stable version left at the pods it runs before the routes' write (``stable_back``), its
    HPA to scale it as the traffic comes back: for the failure callback's time (``unread`` None),
    or a read that only chose its size failed (``unread``: which, its HPA's for its floor or the
    candidate's Deployment's, and its error), said, never the routes held back for it."""
    from vision_rollout.mesh import RouterError

    if unread is None:
        why = RouterError(
            f"version {spec.baseline_version} was not scaled up by the failure callback: it would leave "
            "the routes' write and the lease's release no time; its HPA scales it as the traffic comes back"
        )
    else:
        why = RouterError(
            f"version {spec.baseline_version} was not scaled up: {unread}; its HPA scales it as the traffic comes back"
        )
    log.warning("%s", why)
    return Shortfall(why, f"{why}: it serves with the pods it runs", retired=retired)


def floor_unread(exc: Exception) -> bool:
    """Whether ``release_floor`` failed (``exc``) at its HPA's own read, not at its apply (whose
    failure alone carries the command that releases the floor by hand, ``RouterError.release_by_hand``):
    whether a floor is held is then unknown (``floor_kept``'s ``maybe``)."""
    return getattr(exc, "release_by_hand", None) is None


def floor_kept(
    deployments: VersionDeployments, version: str, exc: Exception, maybe: bool = False, rollback: bool = True
) -> str:
    """What a floor held on ``version`` whose release failed (``release_floor``: its HPA's read or
    apply) leaves, for a report: the floor still held, which the model's next run releases
    (``floor_released_later``: ``rollback``, on the stable version still, or a promotion's kept, on
    the version it retired), or how to release it by hand. ``maybe``: the HPA not read (the
    failure callback's, for the time; its read failed, ``floor_unread``), so a floor may be held
    or not."""
    name = f"{deployments.target.namespace}/{deployment_name(deployments.target, version)}"
    keeps = "keeps the floor the run held"
    keeps = f"may hold a floor the run held (not read; where it does, it {keeps})" if maybe else keeps
    by_hand = f"where its annotation {FLOOR_ANNOTATION} is set, " if maybe else ""
    return (
        f"the HPA of version {version} (HorizontalPodAutoscaler {name}) {keeps} "
        f"({str(exc)[:1000]}): {floor_released_later(rollback, by_hand)}"
    )


def floor_left_held(deployments: VersionDeployments, version: str, floor: int) -> str:
    """What a floor held on ``version`` and left held on purpose (``stable_back``: its scale up to
    it failed once the traffic was back, so its HPA scales it there) leaves, for a report: the floor
    still held, which the model's next run takes over and releases when it ends, or how to release
    it by hand."""
    name = f"{deployments.target.namespace}/{deployment_name(deployments.target, version)}"
    return (
        f"its floor stays held (HorizontalPodAutoscaler {name} at minReplicas {floor}), for its HPA to scale it "
        f"up there as it takes 100% of the traffic again: {floor_released_later(rollback=True, errored=False)}"
    )


def floor_released_later(rollback: bool, by_hand: str = "", errored: bool = True) -> str:
    """Who releases a floor left held (``floor_kept``, ``floor_left_held``): the model's next run,
    or an operator by hand (``by_hand``: where, before the how; ``errored``: a release that failed,
    whose error may give the command). After a rollback (``rollback``) the floor is on the stable
    version, the next run's baseline, which its start leaves held (``release_leftover_floors``'
    ``keep``): that run takes it over (``hold_floor``) and releases it when it ends; after a
    promotion kept, on the version it retired: the next run releases it as it starts."""
    given = "the command its error gives, where it gives one; " if errored else ""
    who = (
        "the model's next run takes it over and releases it when it ends"
        if rollback
        else "the model's next run releases it as it starts"
    )
    return (
        f"{who}, or by hand {by_hand}its minReplicas set to "
        f"the count its annotation {FLOOR_ANNOTATION} records, that annotation and {HELD_ANNOTATION} removed, "
        f"under the rollout's field manager (kubectl patch --type=merge --field-manager={FIELD_MANAGER}: {given}not "
        "kubectl edit, whose field manager would then own minReplicas, the next run's hold of the floor refused)"
    )


def retired_besides(spec: RolloutSpec, run_id: str, hook: ModelServerHook, r: Router, short: Shortfall) -> Shortfall:
    """The candidate retired (``retire``) once the stable version took the traffic back though its
    scale failed (``short``): it takes no traffic and keeps its pods (GPUs) that the stable version
    may need, so it is scaled to 0 all the same, as Flagger and Argo Rollouts do on an abort.
    ``short``, said retired; where the retirement fails too, that failure besides, not retired
    (``finish`` then says the command that scales it to 0); where another run took the model over
    meanwhile (LockLost), the retirement stops, said so: ``taken``, that run's."""
    failed = unretired(spec, run_id, hook, r)  # (the traffic is back: the scale's failure stays what the step fails on)
    if failed is None:
        return replace(short, retired=True)
    exc, taken = failed
    if taken is not None:  # (hold's, for a lease lost: no command to scale another run's model)
        return replace(short, taken=taken)
    return replace(short, what=f"{short.what}; version {spec.candidate_version} was not retired ({str(exc)[:500]})")


def unretired(spec: RolloutSpec, run_id: str, hook: ModelServerHook, r: Router) -> tuple[Exception, str | None] | None:
    """The candidate retired (``retire``, the lease held for its drain) once the stable version
    took the traffic back: None; else that failure, logged, and the run that took the model over
    meanwhile where one did (LockLost: the retirement is that run's to do or not), else None."""
    try:
        hold(spec, run_id, hook, WAITING_STEP_S, rolling_back=True)  # for the drain
        retire(r, hook.deployments(spec.model), spec.candidate_version)
    except Exception as exc:
        log.warning("version %s was not retired: %s", spec.candidate_version, str(exc)[:500])
        taken = lease_taken(spec, run_id, hook) if isinstance(exc, LockLost | AirflowFailException) else None
        return exc, taken
    return None


def lease_taken(spec: RolloutSpec, run_id: str, hook: ModelServerHook) -> str | None:
    """The run that holds the model's lease now where it is not ``run_id``; None where none does,
    ``run_id`` does, or the lease cannot be read."""
    try:
        current = hook.model_lock(spec.model, spec.mesh).holding()
    except Exception:  # (unknown: not said taken)
        return None
    return current.holder if current is not None and current.holder != run_id else None


def still_held(lock: Any, run_id: str, renewal: Holding | None) -> None:
    """The failure callback's check before its routes write (``stable_back``'s ``quick``: the lease
    not renewed around the wait): none where ``renewal`` (its renewal at finish's start) runs on
    every worker's clock beyond what its ``api_budget`` has left (no other run may take the model
    before it ends); else the lease read (no renewal: a renewal refused may have left it to run
    out, read back as this run's): LockLost where another run holds it."""
    from vision_rollout import mesh
    from vision_rollout.locks import CLOCK_SKEW_S

    if renewal is not None and renewal.expires - CLOCK_SKEW_S - lock.clock() > mesh.budget_left():
        return
    current = lock.holding()
    if current is not None and current.holder != run_id:
        raise LockLost(f"run {run_id!r} does not hold model {lock.model!r}: {current.describe()} holds it")


def routes_read(spec: RolloutSpec, r: Router) -> TrafficPolicy | None:
    """The routes in effect; None, logged, where Istio's VirtualService is not one the rollout
    reads (edited by hand): the stable version is put back all the same (``finish``: unless
    promote's state is found). A read that got no answer or that the API server failed
    (``TRANSIENT``, the client's own retries spent) is read again, ``ROUTES_READ_TRIES`` reads in
    all, each after mesh's longest backoff (the rollback and the teardown have no retries of
    their own: a burst of 500s is ridden out here); then raised as it came, nothing read, as the
    model server's failure."""
    from vision_rollout import mesh

    tries = 1
    while True:
        try:
            return r.get_routes()
        except mesh.TRANSIENT as exc:
            if tries == ROUTES_READ_TRIES or not mesh.pause(mesh.BACKOFF_MAX_S):  # (nor past the api_budget)
                raise
            log.warning("the routes were not read (%s); reading them again", str(exc)[:300])
            tries += 1
        except mesh.RouterError as exc:
            if spec.mesh != "istio":
                raise
            log.warning("the routes are put back to the stable version all the same: %s", str(exc)[:300])
            return None


def _found_report(
    spec: RolloutSpec,
    kept: bool,
    reason: str,
    done: str,
    run_id: str | None = None,
    verdicts: Callable[[], list[dict[str, Any] | None]] | None = None,
    besides: Sequence[str] = (),
) -> dict[str, Any]:
    """The teardown's report of what it found where notify sent none: the promotion kept, or the
    rollback (``done``: what the teardown did, the stable version restored or not), with the
    chart of the stage that decided of the run's verdicts (``with_chart``, as notify's report:
    what ``verdicts`` reads, read now, once the stable version is back; None: not known, no
    chart), and what the run left undone once the traffic moved (``besides``: the run folder's
    record, ``besides_of``, as notify's report says it). ``run_id``:
    in place of the report notify wrote, gone from the outbox (``send_run_report``: where Slack
    took notify's, that post is the answer, ``posted_before``, and nothing more is posted)."""
    from vision_rollout.notify import in_outbox, plain_report, rollback_message, with_besides

    if kept:
        message = plain_report(spec, "promote", reason)
    else:
        restored = done.startswith(f"version {spec.baseline_version} takes 100%")
        message = rollback_message(spec, reason, restored=restored)
    message = with_besides(message, besides)
    if verdicts is not None:
        message = with_chart(spec, message, verdicts)
    if not run_id:
        return send(spec, message)
    try:
        return send_run_report(spec, message, run_id)
    except OSError as exc:  # (a full disk, say): sent straight, unless a sender took it up, perhaps posting it
        settings = serving().settings
        stem = run_report(settings.workdir(spec.model, run_id)).get("report")
        if stem is None or in_outbox(settings.outbox, stem):  # (its claim, or mark, stays once Slack took it)
            raise
        log.warning("the teardown's report cannot be written to the outbox, it is posted: %s", str(exc)[:300])
        return send(spec, message)


def _end_keeps_post(spec: RolloutSpec, run_id: str, report: dict[str, Any]) -> None:
    """The post of the run's report the teardown found in the channel or made (``_found_report``)
    kept in the run's end, written without one (``finish``: notify's answer lost)."""
    end = run_ended(spec, run_id)
    if end is not None and "report" not in end and isinstance(report.get("ts"), str):
        _write_end(serving().settings.workdir(spec.model, run_id), end, report)


def retire(r: Router, deployments: VersionDeployments, version: str) -> None:
    """Version ``version``'s pods to 0 once the mesh sends it nothing: the VirtualService read
    back routes and mirrors nothing to it, then ``build.drain_seconds`` (``wait_unrouted``).
    A version with no pods has nothing to drain (retired already: the teardown after a rollback)."""
    from vision_rollout.mesh import TRANSIENT, RouterError, wait_unrouted

    if not deployments.replicas(version):
        return
    try:
        wait_unrouted(r, version, deployments.build.drain_seconds)
    except TRANSIENT:
        raise  # no answer, or a failure rather than a refusal: a retry may get one
    except RouterError as exc:
        raise AirflowFailException(f"version {version} keeps its pods: {exc}") from None
    deployments.scale_to_zero(version)


def ensure_stable(
    params: dict[str, Any],
    run_id: str,
    promoted: str | None,
    rolled_back: str | None,
    report: dict[str, Any] | None,
    decided: str | None = None,
    verdicts: Callable[[], list[dict[str, Any] | None]] | None = None,
) -> str:
    """The run's teardown: unless the candidate was promoted, the stable version takes 100%; then
    the model's lease is released. ``verdicts``: what reads each stage's (``stage_verdicts``), for
    the chart of the report the teardown sends itself, as notify's (``_found_report``): read once
    the stable version is back, never before nor where its restore failed (XCom pulls that may fail or wait). A run that does not hold the lease (another run of the model
    held it, or took it over) touches nothing: the routes are that run's.

    It fails, once that is done, a run that ended before promote or rollback finished (marked
    failed in the UI, say, or one of them failed after ``decided``, decide's outcome), reporting
    what it did to Slack (notify did not run; a promotion found in effect is reported as one),
    and a run whose report (``report``, notify's XCom) was not sent, sending it itself where
    notify did not (decide marked success by hand: promote refused, notify upstream-failed): Airflow would otherwise count either a success (a teardown's upstream failing
    does not fail the run). A teardown that cannot put the stable version back (neither rollback
    nor notify ran) reports that to Slack at once, with no chart nor line of one (its failure sets
    off the failure callback's try of the routes; the verdicts are not read), then fails; a report never says the stable version
    takes the traffic where it was not read back so. One whose restore was done but whose release of
    the lease failed (``Unreleased``), or that left the stable version short of pods once the
    traffic was back (``Undersized``: its scale failed, or not all of its pods came), reports the
    restore as done, that failure besides, and fails. Where notify's XCom is lost (its worker
    killed once it wrote its report), what notify left stands for it (``notify_left``): its post,
    posted nothing more; its report waiting in the outbox, which the outbox's rounds send (the
    run fails as for a report that did not reach Slack); one gone from the outbox, looked for in
    Slack before the teardown's own is posted under its name; one another sender is posting now,
    its post waited for once the stable version is back (``send_run_report``). The post of the
    report the teardown found or made is kept in the run's end (``ENDED``), as notify's.
    """
    from vision_rollout.mesh import api_budget
    from vision_rollout.notify import rollback_message

    spec = spec_from(params)
    unfinished = decided in ("promote", "rollback")
    what = f"decide chose {decided}, which did not finish" if unfinished else "the run was stopped before it decided"
    end = run_ended(spec, run_id)
    if end is not None:  # run again after the run ended (notify cleared with its downstream): nothing to undo
        return f"the run had ended: {end.get('done')}; nothing touched"
    wrote, besides = False, False
    if report is None:  # (notify's worker killed once it wrote its report: Slack may have taken it)
        try:
            report, wrote = notify_left(spec, run_id)
        except Exception:  # (the stable version comes first: the teardown reports what it found)
            log.exception("what notify left of its report cannot be read")
    try:
        with api_budget(TEARDOWN_API_S, TEARDOWN_CALL_S):
            kept, done = finish(
                params, run_id, promoted == spec.candidate_version, prune=True, decided=decided, report=report
            )
    except LockLost as exc:
        return f"nothing restored, the routes are not this run's: {exc}"
    except (Unreleased, Undersized) as exc:  # (reported as done, what failed with it; the step fails)
        kept, done, besides = exc.kept, str(exc), True
    except Exception as exc:
        if report is None and rolled_back is None and promoted != spec.candidate_version:
            # Nobody was told, and the stable version may not be back.
            failed = (
                f"its teardown could not put version {spec.baseline_version} back (the run's failure callback "
                f"tries again, the routes only): {str(exc)[:500]}"
            )
            try:  # (at once: the failure callback's try of the routes waits on this)
                message = rollback_message(spec, f"{what}; {failed}", restored=False)
                send(spec, message)  # (no chart: the verdicts' XCom pulls, retried for minutes, would wait first)
            except Exception:
                log.exception("the teardown's report was not sent")
        raise
    # promote's routes in effect but promote not finished, or the stable version's back without rollback
    if (kept and promoted != spec.candidate_version) or (not kept and rolled_back is None):
        # notify did not run (a worker killed after its last write), or reported the decision that the
        # teardown found not carried out and undid (promote marked success by hand): the teardown reports
        contrary = unfinished and kept != (decided == "promote")  # (what notify reports is not what serves)
        if report is None or contrary:
            report = _found_report(
                spec,
                kept,
                f"{what}; {done}",
                done,
                run_id if wrote and not contrary else None,
                verdicts,
                besides_of(spec, run_id),
            )
            _end_keeps_post(spec, run_id, report)
        undelivered = f"; {_undelivered(report)}" if report.get("slack_error") else ""
        raise AirflowFailException(f"{what}{' (see its log)' if unfinished else ''}; {done}{undelivered}")
    if report is None:  # notify did not run (downstream of a promote refused after decide was marked
        # success by hand, say) or crashed: nobody was told, so the teardown reports what it found
        chose = f"decide chose {decided}" if decided else "decide chose nothing (marked success by hand?)"
        report = _found_report(
            spec, kept, f"{chose}; {done}", done, run_id if wrote else None, verdicts, besides_of(spec, run_id)
        )
        _end_keeps_post(spec, run_id, report)
        if report.get("posted_before"):  # (notify's own, found in Slack: its worker lost once it posted)
            return _ended(done, besides)
        if report.get("slack_error"):
            raise AirflowFailException(f"{done}; but notify did not send the run's report, and {_undelivered(report)}")
        raise AirflowFailException(f"{done}; but notify did not send the run's report: the teardown sent it")
    if report.get("slack_error"):
        raise AirflowFailException(f"{done}; but {_undelivered(report)}")
    return _ended(done, besides)


def _ended(done: str, besides: bool) -> str:
    """The teardown's result: ``done``; AirflowFailException saying it where ``finish`` did it
    with a failure ``besides`` (``Unreleased``, ``Undersized``: ``done`` says which)."""
    if besides:
        raise AirflowFailException(done)
    return done


def _undelivered(report: dict[str, Any]) -> str:
    """What the teardown says of the run's report Slack did not take for sure (``slack_error``):
    not known to have reached Slack where another sender has it or a post of it Slack may have
    taken is looked for first (``maybe_posted``); else that it did not."""
    where = f"it is in the outbox, {report.get('outbox')}"
    if report.get("maybe_posted") and not report.get("outbox"):  # (kept nowhere: nothing sends it or looks for it)
        reached = (
            f"is not known to have reached Slack ({report['slack_error']}), and nothing will send it or look for it: "
            f"look for it in {report.get('channel')} and post it by hand where it is not there"
        )
    elif report.get("maybe_posted"):
        reached = f"is not known to have reached Slack ({report['slack_error']}): {where}, whose rounds look for its post first"
    else:
        reached = f"did not reach Slack ({report['slack_error']}): {where}"
    return f"its report {reached}"


class Unreleased(AirflowFailException):
    """``finish`` done (``kept``, ``done`` say what: the stable version back, or the promotion
    kept), but the release of the model's lease failed (``exc``): said besides, not as a restore
    that failed, with the command that removes it by hand (``by_hand``). It is not tried again:
    the release's own tries (``settled``, the client's retries) rode out what may pass, and a
    refusal (a Role without delete on leases) would refuse again; the lease runs out by itself,
    as a Kubernetes leader election's does when its release fails. ``undersized``: ``done`` says
    besides what ``Undersized`` would have (a stable version short of pods, a floor still held),
    which a human is told of as for ``Undersized``."""

    def __init__(self, kept: bool, done: str, exc: Exception, by_hand: str, undersized: bool = False) -> None:
        super().__init__(
            f"{done}; but the model's lease was not released ({type(exc).__name__}: {str(exc)[:500]}): another run "
            "of the model takes it once it runs out (rolloutctl status shows when); to free the model sooner, remove "
            f"it by hand (this run is done with it): {by_hand}"
        )
        self.kept, self.done, self.undersized = kept, done, undersized


class Undersized(AirflowFailException):
    """``finish`` put the stable version back at 100% and released the lease, but the stable
    version runs fewer pods than it was to (its scale failed, or not all of its pods came:
    ``done`` says what); or kept a promotion, the lease released, but not its retired version's
    HPA floor (``kept``): said as that, not as a restore that failed."""

    def __init__(self, kept: bool, done: str) -> None:
        super().__init__(done)
        self.kept, self.done = kept, done


def finish(
    params: dict[str, Any],
    run_id: str,
    promoted: bool,
    unload_candidate: bool = True,
    prune: bool = False,
    decided: str | None = None,
    report: dict[str, Any] | None = None,
    quick: bool = False,
) -> tuple[bool, str]:
    """What ends a run that holds its model (the teardown, and the failure callback should the
    teardown not finish): the promotion kept when promote ran (``promoted``, or its routes in
    effect with the baseline retired: its XCom lost with a killed worker; routing back to
    retired pods would be an outage; the routes unread, edited by hand, the baseline retired and
    the candidate serving: ``promoted_unseen``; either only where promote recorded its promotion,
    ``promotion_record``, and the run did not decide to roll back: a baseline scaled to 0 by another
    manager is no promotion), else the stable version at 100%; with ``prune`` (the
    teardown), the retired versions beyond ``build.revision_history_limit`` deleted (``prune``);
    then, where the run ``decided`` (the teardown: decide's outcome), what it carried out kept in
    its run folder (``ENDED``: ``build_image`` cleared after the end starts nothing again; with
    the post of its ``report``, notify's XCom, whose thread a report sent again replies in), and
    the lease released. LockLost, touching nothing, for a run that does not hold it. Should the
    restore fail, the lease stays: the failure callback tries again; should only the release
    fail, ``Unreleased`` says what was done and that failure. Should the restore fail once the
    traffic is back (``Shortfall``: the stable version's scale, its pods), the rest is done all
    the same, the lease released, and ``Undersized`` says what was done and that failure.
    A kept promotion whose retired version's floor is not released (``release_floor``) is
    ``Undersized`` too, said as kept. ``quick``: the failure callback's (``stable_back``)."""
    from vision_rollout.mesh import RouterError, routes_to

    spec = spec_from(params)
    hook = serving()
    lock = hook.model_lock(spec.model, spec.mesh)
    folder = hook.settings.workdir(spec.model, run_id)
    start = lock.clock()
    held = lease_kept(lock, run_id, folder)
    renewal = held if held.holder == run_id and held.renewed >= start else None  # (None: read back, not renewed)
    routes = None if promoted else routes_read(spec, router(spec, run_id, hook))  # (None: edited by hand)
    unread = not promoted and routes is None
    # (a baseline without pods is no promotion unless promote recorded one: another manager, KEDA or
    # ``kubectl scale``, may have scaled it to 0; a run that decided to roll back never promoted)
    if promoted:
        kept = True
    elif decided not in (None, "promote"):
        kept = False
    else:  # (the record read only where the cluster looks promoted: mid-stage, an unreadable one stops nothing)
        looks = promoted_unseen(spec, hook) if unread else promotion_in_effect(spec, run_id, hook, routes)
        kept = looks and promotion_record(spec, run_id, folder)
    finishing = Finishing(routes, renewal, quick)
    short = stable_back(params, run_id, unload_candidate, finishing) if not kept else None
    if kept and spec.mesh == "istio":  # (promote stopped before it put the retired version's HPA back)
        deployments = hook.deployments(spec.model)
        try:
            baseline_floor_released(spec, run_id, hook, deployments)
        except BudgetNotApplied as exc:  # (the floor released: its budget is what is left, not the floor)
            short = Shortfall(exc, str(exc), retired=False)
        except RouterError as exc:  # (the promotion stands: said as kept, this failure besides, not a failed restore)
            what = floor_kept(deployments, spec.baseline_version, exc, maybe=floor_unread(exc), rollback=False)
            short = Shortfall(exc, what, retired=False)
    if prune and spec.mesh == "istio":
        prune_history(spec, run_id, hook)
    if kept and unread:
        done = (
            f"version {spec.candidate_version} was promoted (version {spec.baseline_version} retired, version "
            f"{spec.candidate_version} serving): nothing to restore; the VirtualService, edited by hand into one "
            "the rollout does not read, is left as it is"
        )
    elif kept:
        done = f"version {spec.candidate_version} was promoted: nothing to restore"
    elif routes is not None and routes != spec.stable_policy() and not routes_to(routes, spec.candidate_version):
        # (changed by someone else meanwhile, an operator say: not this run's to change back)
        done = f"the routes were not this run's and are left as they are: {json.dumps(routes.to_dict())}"
    else:
        retired = unload_candidate and (short is None or short.retired)
        # (routes that sent the candidate traffic: deploy_candidate ran, its Deployment not read again)
        sent = routes is not None and routes_to(routes, spec.candidate_version)
        if short is not None and short.taken:
            left = f"is left to run {short.taken!r}, which holds model {spec.model!r} now"
        elif spec.mesh != "istio":
            left = "is left loaded: unload it"
        elif not sent and (idle := candidate_idle(spec, hook, quick)):  # (failed before deploying it)
            left = f"{idle}: nothing to unload"
        else:
            left = (
                f"{LEFT_RUNNING if sent or idle == '' else UNCHECKED_RUNNING}: scale it to 0 "
                f"({hook.deployments(spec.model).scale_by_hand(spec.candidate_version, 0)}: {SCALE_BY_HAND_KUBECTL})"
            )
        candidate = "is unloaded" if retired else left
        done = f"version {spec.baseline_version} takes 100%; version {spec.candidate_version} {candidate}"
    if short is not None:
        done = f"{done}; but {short.what}"
    if kept == (decided == "promote") and decided in ("promote", "rollback"):  # the decision carried out
        _write_end(folder, {"holder": run_id, "decided": decided, "promoted": kept, "done": done}, report)
    recorded(folder, run_id, None)
    try:
        lock.release(run_id)
    except Exception as exc:  # (what was done is done: said so, the release's failure besides)
        raise Unreleased(kept, done, exc, lock.by_hand, undersized=short is not None) from exc
    if short is not None:  # (the traffic back, the lease released: what is left is a human's)
        raise Undersized(kept, done)
    return kept, done


def left_running(done: str) -> bool:
    """Whether ``finish``'s ``done`` says the candidate is (or may be) left running."""
    return LEFT_RUNNING in done or UNCHECKED_RUNNING in done


def candidate_idle(spec: RolloutSpec, hook: ModelServerHook, quick: bool = False) -> str | None:
    """Why the candidate runs no pods: it has no Deployment, or one at 0 replicas (a version an
    earlier run retired); "" where its Deployment asks for pods (a command to scale it to 0 is worth
    giving). None where it is not read (the failure callback's time spent, say): the command given
    all the same, the candidate said maybe running (``UNCHECKED_RUNNING``). ``quick`` (the failure
    callback): not read, None, where the read would leave the lease's release (``RELEASE_CALLS``)
    no time in its ``api_budget``."""
    from vision_rollout import mesh

    if quick and mesh.budget_left(1 + RELEASE_CALLS) < 0:
        return None
    try:
        replicas = hook.deployments(spec.model).replicas(spec.candidate_version)
    except Exception as exc:
        log.info("version %s's Deployment was not read: %s", spec.candidate_version, str(exc)[:300])
        return None
    return "has no Deployment" if replicas is None else "" if replicas > 0 else "has its Deployment at 0 pods"


def _write_end(folder: Folder, end: dict[str, Any], report: dict[str, Any] | None) -> None:
    """The run's ``end`` kept in its run folder (``ENDED``), with the post of its ``report`` where
    Slack took it (its thread is where a report sent again replies)."""
    if report and isinstance(report.get("ts"), str):  # (posted: not one waiting in the outbox)
        end = {**end, "report": {"channel": report.get("channel"), "ts": report["ts"]}}
    try:
        folder.write(ENDED, json.dumps(end).encode())
    except OSError as exc:  # (build_image cleared after the end then starts the rollout again, as before)
        log.warning("this run's record of its end was not written (%s): %s", folder, str(exc)[:300])


def prune_history(spec: RolloutSpec, run_id: str, hook: ModelServerHook) -> None:
    """The Deployments (and HPAs) the rollout made for retired versions beyond
    ``build.revision_history_limit`` deleted (``VersionDeployments.prune``), never the run's two
    versions nor one the VirtualService or DestinationRule names. Housekeeping once the run's
    outcome stands: a failure is logged, not the run's."""
    try:
        in_use = router(spec, run_id, hook).versions_in_use() | {spec.baseline_version, spec.candidate_version}
        deployments = hook.deployments(spec.model)
        gone = deployments.prune(in_use)
    except Exception as exc:
        log.warning("the retired versions beyond the history limit were not deleted: %s", str(exc)[:500])
        return
    if gone:
        log.info(
            "deleted the Deployments of retired versions %s (beyond build.revision_history_limit %d)",
            ", ".join(gone),
            deployments.build.revision_history_limit,
        )


def promotion_in_effect(
    spec: RolloutSpec, run_id: str, hook: ModelServerHook, routes: TrafficPolicy | None = None
) -> bool:
    """The candidate takes 100% and the baseline is retired: promote ran. (A last stage at 100%
    has the same routes, with the baseline still serving: not a promotion.) ``routes``: the
    routes in effect, read already (None: read here)."""
    if (routes if routes is not None else router(spec, run_id, hook).get_routes()) != spec.promoted_policy():
        return False
    if spec.mesh == "istio":
        return not hook.deployments(spec.model).replicas(spec.baseline_version)
    return not hook.settings.admin.ready(spec.model, spec.baseline_version)


def promotion_recorded(spec: RolloutSpec, run_id: str, hook: ModelServerHook) -> None:
    """promote's record, in its run folder (``PROMOTED``), that it moved the routes to the
    candidate: written before it retires the baseline, so that the teardown and the failure
    callback tell its promotion from a baseline another manager scaled to 0 (``promotion_record``).
    A record that cannot be written fails promote (OSError) with the baseline still serving: the
    teardown then puts it back."""
    hook.settings.workdir(spec.model, run_id).write(PROMOTED, json.dumps(_promotion(spec, run_id)).encode())


def promotion_undone(spec: RolloutSpec, run_id: str, hook: ModelServerHook) -> None:
    """promote's record of its promotion (``PROMOTED``) removed once ``restore_stable`` has moved
    the routes back to the stable version: a teardown or failure callback after a rollback that
    failed later on (decide cleared and run again into rollback) must not take the run's state
    for promote's. A record that cannot be removed is logged: the routes are back all the same."""
    try:
        hook.settings.workdir(spec.model, run_id).delete(PROMOTED)
    except OSError as exc:
        log.warning("this run's record of its promotion was not removed: %s", str(exc)[:300])


def _promotion(spec: RolloutSpec, run_id: str) -> dict[str, str]:
    """The record of this run's promotion (``PROMOTED``): its run, candidate and baseline."""
    return {"holder": run_id, "version": spec.candidate_version, "baseline": spec.baseline_version}


def promotion_record(spec: RolloutSpec, run_id: str, folder: Folder) -> bool:
    """Whether promote recorded, in the run's ``folder``, that this run (``run_id``) promoted its
    candidate over its baseline (``promotion_recorded``); False for none, for another run's or
    another baseline's, and, logged, for a damaged one (not JSON). Read only where the cluster
    looks promoted (``finish``). OSError for a record that cannot be read (the folder's store answering 503 or 403, say): whether
    promote ran is not known, and undoing a finished promotion is no safer than keeping an
    unjudged candidate, so nothing is touched and the teardown fails (the failure callback
    reports it) for a human, or a clear once the folder reads, to settle; one no read takes (a
    folder, or over ``MAX_LOCK_BYTES``) says what to put there or remove."""
    from vision_rollout.folders import NotAFile, TooLarge

    try:
        record = json.loads(folder.read_within(PROMOTED, MAX_LOCK_BYTES))
    except FileNotFoundError:
        return False
    except ValueError as exc:
        log.warning("this run's record of its promotion is damaged (%s): %s", folder, str(exc)[:300])
        return False
    except (TooLarge, NotAFile) as exc:  # (no read takes it, ever: not a record promote wrote)
        raise OSError(
            f"this run's record of its promotion cannot be read ({folder}): {str(exc)[:300]}; nothing restored, "
            f"for whether promote ran is not known: to keep version {spec.candidate_version} promoted, put there the "
            f"record promote writes, {json.dumps(_promotion(spec, run_id))}, or remove it to put version "
            f"{spec.baseline_version} back; then clear the run's ensure_stable"
        ) from exc
    except OSError as exc:
        raise OSError(
            f"this run's record of its promotion cannot be read ({folder}): {str(exc)[:300]}; nothing restored, "
            "for whether promote ran is not known: once the run folder reads, clear the run's ensure_stable"
        ) from exc
    return isinstance(record, dict) and all(record.get(key) == value for key, value in _promotion(spec, run_id).items())


def promoted_unseen(spec: RolloutSpec, hook: ModelServerHook) -> bool:
    """The routes unread (Istio's VirtualService edited by hand): the baseline retired (no pods)
    and the candidate serving, as promote leaves them, not a run mid-stage, whose baseline runs:
    routing back to retired pods would be an outage."""
    deployments = hook.deployments(spec.model)
    return not deployments.replicas(spec.baseline_version) and bool(deployments.replicas(spec.candidate_version))


def notify(
    params: dict[str, Any],
    outcome: str,
    reason: str,
    verdicts: list[dict[str, Any] | None],
    preflight: list[str] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """The run's report to Slack, with the chart of the stage that decided (``notify.report_chart``:
    read again from the prediction log, this task's worker being any; without it, saying why, where
    it could not be drawn in time); ``preflight``: the first step's warnings (``build_image``'s).
    Once the run ``run_id`` ended (``run_ended``: notify cleared afterwards), marked as sent again,
    without a chart (the first report's thread, where it goes, has it)."""
    from vision_rollout.engine import deciding_stage
    from vision_rollout.gates import Verdict
    from vision_rollout.notify import plain_report, promotion_message, rollback_message, sent_again, with_besides

    spec = spec_from(params)
    notes = [str(note) for note in preflight or []]
    end = None if run_id is None else run_ended(spec, run_id)
    decided = False  # (whether the report names the stage that decided: its chart's line, where it has none)
    try:
        judged = [Verdict.from_dict(v) for v in verdicts if v]
        if outcome == "promote":
            message = promotion_message(spec, judged, reason=reason, notes=notes)
        else:  # the stage that rolled it back, as judge_evidence finds it (none: every stage passed)
            index = deciding_stage(spec, verdicts)
            weight, failing = (None, None) if index is None else (spec.stages[index], verdicts[index])
            message = rollback_message(
                spec, reason, Verdict.from_dict(failing) if failing else None, weight, notes=notes
            )
            decided = weight is not None
    except Exception:  # the report goes out all the same, in plain words: the decision is made
        log.exception("the %s report could not be built from the verdicts; it is sent as plain text", outcome)
        message = plain_report(spec, outcome, reason)
    if run_id is not None:  # (what promote or the rollback left undone once the traffic moved: a budget)
        message = with_besides(message, besides_of(spec, run_id))
    if end is None:  # (sent again: the first report's thread has its chart)
        message = with_chart(spec, message, lambda: verdicts, decided=decided)
    if run_id is None:
        return send(spec, message)
    if end is not None:
        first = end.get("report")
        ts = first.get("ts") if isinstance(first, dict) else None
        return send(spec, sent_again(message, ts if isinstance(ts, str) else None))  # (in the first report's thread)
    return send_run_report(spec, message, run_id)


def with_chart(
    spec: RolloutSpec,
    message: Message,
    verdicts: Callable[[], list[dict[str, Any] | None]],
    decided: bool = False,
) -> Message:
    """``message``, a run's final report (notify's, the teardown's), with the chart of the stage
    that decided of the verdicts ``verdicts()`` reads (``notify.charted``: read again from the
    connection's prediction log, this task's worker being any), or a line saying why there is
    none: the verdicts not read too (the teardown's XCom pulls failing), the report sent all the same.
    ``decided``: the report names the stage that decided (``charted``)."""
    from vision_rollout.notify import charted, without_chart

    try:
        read = verdicts()
    except Exception as exc:
        log.exception("the stages' verdicts cannot be read for the report's chart")
        return without_chart(message, f"the stages' verdicts could not be read: {str(exc)[:300] or type(exc).__name__}")
    settings = serving().settings
    return charted(message, spec, read, settings.prediction_log, settings.validation(spec.model), decided)


def send_run_report(spec: RolloutSpec, message: Any, run_id: str) -> dict[str, Any]:
    """The run's report (``send``'s message), sent once by every try of notify: written to the
    outbox, then sent by the outbox's own sender within ``SEND_BUDGET_S`` (``notify.send_report``);
    when it was first written and, once Slack took it, its post kept in the run folder
    (``RUN_REPORT``; ``maybe_posted`` where another sender posted it, its post not found): a try
    that finds that post, or finds the report posted in the channel's history, posts nothing more."""
    settings = serving().settings
    notifier = slack_notifier(spec.slack_channel, settings.outbox)
    return send_once(settings.workdir(spec.model, run_id), notifier, outgoing(message, acted_on(spec, settings)))


def send_once(folder: Folder, notifier: Any, message: Any) -> dict[str, Any]:
    """``message`` sent once by whoever sends it with ``folder`` (a run's, an audit hour's): its
    record there (``RUN_REPORT``: its outbox name, when first written, its post once Slack took
    it, or another sender posted it) written before it is, then sent by the outbox's own sender
    (``notify.send_report``): a later sender that finds the post, in the record or the channel's
    history, posts nothing."""
    from vision_rollout.notify import report_name, send_report

    record = run_report(folder)
    if (post := _post_of(record)) is not None:
        return post
    queued = record.get("queued")
    queued = float(queued) if isinstance(queued, (int, float)) else None
    stem = record["report"] if queued is not None else report_name()
    if queued is None:  # (before the outbox's copy: a retry knows an earlier try may have sent it)
        folder.write(RUN_REPORT, json.dumps({"report": stem, "queued": time.time()}).encode())
    sent = send_report(notifier, message, stem, queued, SEND_BUDGET_S)
    if "outbox" not in sent and (post := _post_of(sent)) is not None:  # (Slack has it, or another sender posted it)
        post.pop("posted_before", None)  # (added as it is read back: _post_of)
        try:
            folder.write(RUN_REPORT, json.dumps({"report": stem, **post}).encode())
        except OSError as exc:  # (Slack has it: a later try finds it in the channel, posting nothing more)
            log.warning("the report's post is not kept in the run folder: %s", str(exc)[:300])
    return sent


def run_report(folder: Folder) -> dict[str, Any]:
    """The run's record of its report in its run folder (``RUN_REPORT``: its outbox name, when
    first written, and its post once Slack took it); {} where there is none, or none this run
    wrote (unreadable: logged)."""
    from vision_rollout.notify import is_report_name

    try:
        read = json.loads(folder.read_within(RUN_REPORT, MAX_LOCK_BYTES))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # (not a record this run wrote: sent as a first try's)
        log.warning("this run's record of its report cannot be read: %s", str(exc)[:300])
        return {}
    return read if isinstance(read, dict) and is_report_name(read.get("report")) else {}


def _post_of(record: dict[str, Any]) -> dict[str, Any] | None:
    """The post a run's record of its report (``run_report``) keeps, as an earlier try's
    (``maybe_posted``: another sender's, its ts not known); None before Slack took it."""
    if isinstance(record.get("channel"), str) and isinstance(record.get("ts"), str):
        return {"channel": record["channel"], "ts": record["ts"], "posted_before": True}
    if isinstance(record.get("channel"), str) and record.get("maybe_posted") is True:
        return {"channel": record["channel"], "maybe_posted": True}
    return None


def notify_left(spec: RolloutSpec, run_id: str) -> tuple[dict[str, Any] | None, bool]:
    """What notify left of the run's report where its XCom is lost (its worker killed once it
    wrote the report: after Slack took its post, say), as its XCom would have said it: the post
    (``channel``, ``ts``, ``posted_before``) its run folder keeps (``RUN_REPORT``), or the
    report's ``.posted`` mark in the outbox; where it waits in the outbox, ``outbox`` and
    ``slack_error`` (``notify.report_left``: the outbox's rounds send it, looking first for a
    post Slack may have taken); else None (another sender is sending it now: ``send_run_report``
    waits for that sender's post). And whether notify wrote a report at all: one gone
    from the outbox since may have been posted (``send_run_report`` looks for it before posting
    another under its name)."""
    from vision_rollout.notify import report_left

    settings = serving().settings
    record = run_report(settings.workdir(spec.model, run_id))
    if (post := _post_of(record)) is not None:
        return post, True
    if not isinstance(record.get("queued"), (int, float)):
        return None, False
    return report_left(settings.outbox, record["report"]), True


def audit_hours(
    model: str,
    end: datetime,
    channel: str = "#model-rollouts",
    catch_up_hours: int = CATCH_UP_HOURS,
    retry: bool = False,
    retention_days: int = RETENTION_DAYS,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """The hourly shadow audit of one model: the clock hour that ends at or before ``end``
    (``audited_hour``: a run triggered by hand re-audits the last whole hour, in its folder),
    once its records are all written; before it, oldest first, each of the ``catch_up_hours``
    earlier hours not yet audited (missed while the scheduler was down). First, the reports
    waiting in the outbox are sent (``send_outbox``). An hour without shadow records is marked
    audited, unreported, when no mirror was configured, or its requests were too few for no
    copy at all to be a sign (``with_coverage``: a quiet hour); a warning otherwise. A report Slack
    did not take (kept in the hour's folder and the outbox, the hour marked audited) fails the
    task once every hour was tried: an audit nobody was told of is no audit; the retry, or the
    next run, sends it from the outbox, and fails likewise while Slack does not take it.
    Skipped when no hour had anything. No hour's audit is begun after ``AUDIT_RUN_S`` (the first
    always): the hours left, not marked audited, are the next run's, and this one fails naming them.

    ``retry``: a retry of a failed try, which reports only the hours not marked audited (the
    run's own hour too, when the failed try reported it: it is not sent to Slack twice). With
    ``run_id`` (the DAG run's), the own hour's mark names the run, and a retry skips that hour
    only where this run marked it: a run triggered by hand audits an hour the scheduled run had
    marked, and its retry, after a first try that did not, audits it still.

    Last, what the audits left that nobody reads any more is removed (``prune_audits``): the
    model's hour folders older than ``retention_days``, and the stage caches of rollouts killed
    mid-stage."""
    from vision_rollout.audit import audited_hour, hour_folder, unaudited_hours

    if not MODEL_RE.fullmatch(model):
        raise AirflowFailException(f"not a model name: {model[:80]!r}")
    if not re.fullmatch(RolloutSpec.json_schema()["properties"]["slack_channel"]["pattern"], channel):
        # (the form's pattern is a search, where "$" also matches before a last newline)
        raise AirflowFailException(f"slack_channel: {channel[:82]!r} is not a Slack channel's name or ID")
    if not 0 <= catch_up_hours <= MAX_CATCH_UP_HOURS or catch_up_hours != int(catch_up_hours):
        raise AirflowFailException(f"catch_up_hours must be 0 to {MAX_CATCH_UP_HOURS}, not {catch_up_hours}")
    if not MIN_RETENTION_DAYS <= retention_days <= MAX_RETENTION_DAYS or retention_days != int(retention_days):
        raise AirflowFailException(
            f"retention_days must be {MIN_RETENTION_DAYS} to {MAX_RETENTION_DAYS}, not {retention_days}"
        )
    catch_up_hours = int(catch_up_hours)  # (24.0 is an integer to the form's JSON Schema)
    audits = serving().settings.run_folder / "audits" / model
    start, end, _ = audited_hour(end, datetime.now(UTC))
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    # (A report Slack did not take has its channel in the result; a file that is no report has none.)
    # (One Slack refused for good is set aside, failing this run only: ``notify.send_waiting``.)
    where = {True: "set aside in the outbox's refused/", False: "waits in the outbox"}
    unsent = [
        f"{r['name']} {where[bool(r.get('refused'))]}: {r['error']}"
        for r in send_outbox()
        if "error" in r and "channel" in r
    ]
    hours = unaudited_hours(audits, start, catch_up_hours)
    if not (retry and _audited_by(hour_folder(audits, start), run_id)):
        hours.append(start)
    began, left = time.monotonic(), []
    for k, hour in enumerate(hours):
        if k and time.monotonic() - began >= AUDIT_RUN_S:
            left = hours[k:]
            break
        if hour == start:  # (the hours before it took their time meanwhile)
            wait_s = audited_hour(end, datetime.now(UTC))[2]
            if wait_s:
                log.info("waiting %.0f s for the last records of %s to %s", wait_s, start, end)
                time.sleep(wait_s)
        try:
            results.append(_audit_one_hour(model, hour, hour_folder(audits, hour), channel, run_id))
        except Exception as exc:  # (the other hours are audited all the same)
            log.exception("the audit of '%s' from %s failed", model, hour)
            failed.append(f"{hour:%Y-%m-%d %H:00}: {str(exc)[:500]}")
    prune_audits(model, start - timedelta(days=int(retention_days)))
    later = [
        f"{len(left)} hours not audited within the run's {AUDIT_RUN_S:g} s (AUDIT_RUN_S), left to the next run: "
        + ", ".join(f"{h:%Y-%m-%d %H:00}" for h in left)
    ]
    if failed or unsent or left:
        hours_failed = [f"{len(failed)} of {len(results) + len(failed)} hours not reported: " + "; ".join(failed)]
        raise AirflowException("; ".join([*(hours_failed if failed else []), *unsent, *(later if left else [])]))
    if results and all(r["verdict"] == "skip" for r in results):
        raise AirflowSkipException(
            f"no shadow records for '{model}' in the {len(results)} hours to {end:%Y-%m-%d %H:%M} UTC "
            "that were audited, and no mirror (or too few requests for a copy to be missed)"
        )
    return results


def prune_audits(model: str, before: datetime) -> dict[str, int]:
    """What nobody reads any more removed from the run folder, how much of each kind (logged):
    the model's audit hour folders of the hours before ``before`` (``prune_hours``) and its
    mirror changes recorded before it but the one in force (``MirrorLog.prune``); the run
    folder's stage caches that no running stage reads (``logcache.prune``); and the model's
    rollout run folders (never the one of the run its lock names: its lock file, or in
    kubernetes mode its Lease) and approval waits' counts unchanged since ``before``, with the
    outbox's leftovers of senders killed mid-way (``settings.prune_runs``). A store refusing
    is a warning (the next run prunes again)."""
    from vision_rollout import logcache
    from vision_rollout.audit import prune_hours
    from vision_rollout.mirrors import mirror_log
    from vision_rollout.settings import prune_runs

    settings = serving().settings

    def lease_holder(model: str) -> str | None:
        """Kubernetes mode's lock: the run its Lease names (a model without an Istio target has none)."""
        try:
            settings.istio_for(model)
        except SettingsError:
            return None
        holding = serving().model_lock(model, "istio").holding()
        return holding.holder if holding is not None else None

    pruned: dict[str, int] = {}
    kinds = {
        "audit hour folders": lambda: {
            "audit hour folders": len(prune_hours(settings.run_folder / "audits" / model, before, MAX_PRUNED))
        },
        "stage cache files": lambda: {"stage cache files": len(logcache.prune(settings.stage_caches))},
        "mirror changes": lambda: {
            "mirror changes": len(mirror_log(settings.run_folder, model).prune(before.timestamp(), MAX_PRUNED))
        },
        "run folders, approval counts, outbox leftovers and conditional-put probes": lambda: {
            k: len(v)
            for k, v in prune_runs(
                settings.run_folder, [model], before.timestamp(), time.time(), lease_holder=lease_holder
            ).items()
        },
    }
    for kind, prune in kinds.items():
        try:
            pruned.update(prune())
        except (OSError, ValueError) as exc:  # (ValueError: a name there no Folder takes)
            log.warning("the %s before %s were not all pruned: %s", kind, before.isoformat(), str(exc)[:300])
    if any(pruned.values()):
        log.info("pruned before %s: %s", before.isoformat(), ", ".join(f"{n} {k}" for k, n in pruned.items()))
    return pruned


def send_outbox(budget_s: float = SEND_BUDGET_S) -> list[dict[str, Any]]:
    """The reports waiting in the run folder's outbox (Slack did not take them: a rollout's, an
    audit's), sent through the Slack connection as ``rolloutctl outbox send`` sends them (each
    once, whoever else sends); nothing without a token, or with a connection that cannot be used
    (logged, with why). Starts none after ``budget_s``."""
    from vision_rollout.notify import one_line, send_waiting

    outbox = serving().settings.outbox
    notifier = slack_notifier("#outbox", outbox)
    client = notifier.client
    if client is None:
        waiting = sum(1 for n in outbox.names() if n.endswith(".json"))
        if notifier.unusable:
            log.warning("the outbox's %d report(s) are not sent: %s", waiting, one_line(notifier.unusable)[:500])
        elif waiting:
            log.info("the outbox's %d report(s) are not sent: the Slack connection has no token", waiting)
        return []
    results = send_waiting(outbox, client, budget_s=budget_s)
    for r in results:
        if "error" in r:
            why = "is set aside in refused/, Slack refused it for good" if r.get("refused") else "still waits"
            log.warning("outbox report %s %s: %s", r["name"], why, r["error"])
    if results:
        log.info("outbox: %d of %d report(s) sent", sum(1 for r in results if r.get("sent")), len(results))
    return results


def _audited_by(folder: Folder, run_id: str | None) -> bool:
    """Whether the hour of ``folder`` is marked audited (``AUDITED``) by the run ``run_id``: by
    any run where None, or where its mark names none (an earlier version's) or cannot be read."""
    from vision_rollout.audit import AUDITED

    try:
        mark = json.loads(folder.read_within(AUDITED, MAX_LOCK_BYTES))
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    return run_id is None or not isinstance(mark, dict) or mark.get("run", run_id) == run_id


def _audit_one_hour(
    model: str, start: datetime, folder: Folder, channel: str, run_id: str | None = None
) -> dict[str, Any]:
    """The audit of the hour from ``start``, reported, then marked audited in ``folder`` (by
    ``run_id``, where given)."""
    from vision_rollout.audit import (
        AUDITED,
        CHART,
        EARLIER_HOURS,
        REPORT,
        audit,
        report_files,
        with_coverage,
        write_report,
    )
    from vision_rollout.folders import Folder
    from vision_rollout.notify import audit_message

    settings = serving().settings
    end = start + timedelta(hours=1)
    shares = mirror_shares(model, start, end)
    result = audit(settings.prediction_log, start, end, model, earlier_hours=EARLIER_HOURS, mirror_percent=shares)
    share = max(p for _, p in shares) if shares else None
    silent = (0, 0.0, 0)
    if share and result.verdict == "skip":  # (the hours before it, silent behind the mirror too)
        silent = _silent_before(Folder(folder.uri, folder.parts[:-1]), start)
    result = with_coverage(result, share, silent)
    summary: dict[str, Any] = {"start": start.isoformat(), "end": end.isoformat(), "verdict": result.verdict}
    if share and result.verdict == "skip":  # (silent behind a mirror: the next hours test it with these)
        tested = share if result.mirrorable_percent is None else result.mirrorable_percent
        summary |= {"mirrorable": result.primaries_mirrorable, "mirror_percent": tested}
    if run_id is not None:
        summary["run"] = run_id
    if result.verdict == "skip":
        log.info(
            "no shadow records for '%s' from %s to %s, and no mirror (or too few requests for a copy to be "
            "missed): nothing to report",
            model,
            start,
            end,
        )
        write_report({}, folder)  # (audited again: no file of an earlier report beside this mark)
        folder.delete(RUN_REPORT)
        folder.write(AUDITED, json.dumps(summary).encode())
        return summary
    if AUDITED in folder.names():  # (audited again, by hand: a report of its own, posted anew)
        folder.delete(RUN_REPORT)
    files = report_files(result)
    where = write_report(files, folder)
    # (sent once: an audit of the hour stopped after its post, before its mark, posted it)
    message = outgoing(audit_message(result, files.get(CHART)), f"model {model}")
    sent = send_once(folder, slack_notifier(channel, settings.outbox), message)
    if sent.get("slack_error"):  # audited: its report waits in the outbox, whose rounds send it once
        folder.write(AUDITED, json.dumps({**summary, "report": where[REPORT], "outbox": sent["outbox"]}).encode())
        raise AirflowException(
            f"the {result.verdict} audit of '{model}' is in {where[REPORT]}, but its report did not reach "
            f"Slack ({sent['slack_error']}): it is in the outbox, {sent.get('outbox')}"
        )
    folder.write(AUDITED, json.dumps({**summary, "report": where[REPORT]}).encode())
    return {**result.to_dict(), "report": where[REPORT]}


def _silent_before(audits: Folder, start: datetime) -> tuple[int, float, int]:
    """Of the hours just before ``start`` (``EARLIER_HOURS`` at most) below a model's ``audits``,
    those one after another whose audit found no shadow record behind a mirror (their marks: a
    skip with the primaries a mirror could have sampled and its share): those primaries together,
    the least share, and how many hours (``with_coverage``'s ``silent_before``)."""
    import math

    from vision_rollout.audit import AUDITED, EARLIER_HOURS, hour_folder

    mirrorable, least, hours = 0, math.inf, 0
    for k in range(1, EARLIER_HOURS + 1):
        try:
            mark = json.loads(hour_folder(audits, start - timedelta(hours=k)).read_within(AUDITED, MAX_LOCK_BYTES))
            count, share = int(mark["mirrorable"]), float(mark["mirror_percent"])
        except (OSError, ValueError, TypeError, KeyError, OverflowError):  # (no such mark, or not ours)
            break
        if mark.get("verdict") != "skip" or count < 0 or not 0 < share <= 100:
            break
        mirrorable, least, hours = mirrorable + count, min(least, share), hours + 1
    return mirrorable, least, hours


def mirror_shares(model: str, start: datetime, end: datetime) -> list[tuple[float, float]] | None:
    """The mirror share configured for ``model`` from ``start`` to ``end``, a sample every
    ``MIRROR_STEP_S``: the audit tests each primary's copies at its time's share (the hour's
    largest warned of copies lost where the mirror was raised within it). The model server's
    own mirror's, from Prometheus; where it has none (kubernetes mode: Envoy mirrors, the pods
    serve without a policy), the mirror changes the rollout recorded as it applied them in the
    run folder (``mirror_log``). None when neither knows (a warning when the run folder could
    not be read)."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    from vision_rollout.audit import MIRROR_STEP_S
    from vision_rollout.metrics import MetricsError
    from vision_rollout.mirrors import mirror_log

    try:
        source = PrometheusHook().source()
        shares = source.query_range(
            f'max(model_server_mirror_percent{{model="{model}"}})', start.timestamp(), end.timestamp(), MIRROR_STEP_S
        )
    except (AirflowNotFoundException, MetricsError):
        shares = None
    if shares:
        return shares
    try:
        folder = serving().settings.run_folder
    except AirflowNotFoundException:  # (no model server connection: no run folder, nothing recorded)
        return None
    mirrors = mirror_log(folder, model)
    observe_mirror(model, mirrors)
    try:
        return mirrors.shares(start.timestamp(), end.timestamp(), MIRROR_STEP_S)
    except OSError as exc:
        log.warning("the mirror changes of '%s' could not be read: %s", model, str(exc)[:300])
        return None


def observe_mirror(model: str, mirrors: MirrorLog) -> None:
    """Kubernetes mode: the mirror ``model``'s VirtualService carries now recorded in ``mirrors``
    when it is not the last recorded (``MirrorLog.observe``: set by hand, which no rollout
    recorded), with a warning: the audit judges copies at it from now on, and those since the
    change at the share recorded before. Nothing for a model without an Istio target; a
    VirtualService or a run folder that cannot be read is a warning."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    from vision_rollout.mesh import RouterError

    hook = serving()
    try:
        hook.settings.istio_for(model)
    except SettingsError:
        return
    try:
        live = hook.istio_router(model, []).get_routes().mirror
        version, percent = (live.version, live.percent) if live is not None else (None, 0.0)
        observed = mirrors.observe(version, percent)
    except (RouterError, OSError, AirflowNotFoundException) as exc:
        log.warning("the mirror of '%s' in its VirtualService could not be checked: %s", model, str(exc)[:300])
        return
    if observed is not None:
        log.warning(
            "the mirror of '%s' is %s in its VirtualService, not what was last recorded: changed outside the "
            "rollout (by hand); recorded now, and copies since the change are judged at the share recorded before",
            model,
            f"{percent:g}% to version {version}" if percent else "off",
        )


def restore_stable_on_failure(context: dict[str, Any]) -> None:
    """DAG failure callback: a failed or killed run that still holds its model's lease (its
    teardown did not finish) leaves the stable version at 100% and releases the lease (``finish``),
    unless promote ran: a later failure keeps the promotion. It runs where Airflow runs DAG
    callbacks, under a time limit: the routes only, no drain wait (``drain_seconds``, up to
    600 s), so the candidate is left loaded (its pods running, GPUs that serve nothing), which it
    reports (``tell``: Slack, else the outbox; not only its log) with the command that scales it
    to 0. A run that does not hold the
    lease touches nothing, nor does a context without the run's Params (Airflow gives a DAG
    callback only the DAG and the run id when it has no task instance of the run to build one
    from): every field would take its default, another model's or another version's. A callback
    that fails to put the stable version back (the API server down, a baseline without a
    Deployment) is the last try: it logs the error and reports it (``tell``: Slack, else the
    outbox), the routes not shown restored, for a human to put them back. One that put it back
    but left it short of pods (``Undersized``) reports that, the routes restored; one that kept a
    promotion but not the release of its retired version's HPA floor (``Undersized``, kept)
    reports the promotion kept, that floor besides, with what releases it; either with the
    lease's release failed too (``Unreleased``, undersized) reports both, as does a release failed
    with the candidate left running."""
    run_id = getattr(context.get("dag_run"), "run_id", None) or str(context.get("run_id", "failed-run"))
    if not context.get("params"):
        log.warning(
            "run %s failed; nothing restored: its failure callback was not given the run's parameters. "
            "Should its teardown (ensure_stable) not have finished, clear it to put the stable version back",
            run_id,
        )
        return
    from vision_rollout.mesh import api_budget
    from vision_rollout.notify import plain_report, rollback_message

    params = dict(context["params"])
    try:
        spec = spec_from(params)
    except AirflowFailException as exc:  # (parameters refused at the start: it never held the model)
        log.warning("run %s failed; nothing restored: %s", run_id, exc)
        return
    try:
        with api_budget(CALLBACK_API_S, CALLBACK_CALL_S, CALLBACK_CAP_S):
            kept, done = finish(params, run_id, promoted=False, unload_candidate=False, quick=True)
        log.warning("run %s failed: %s", run_id, done)
        if not kept and left_running(done):  # (its pods serve nothing: a human scales them to 0)
            try:
                tell(spec, rollback_message(spec, f"run {run_id} failed: {done}"), "the failure callback's report")
            except Exception:
                log.exception("the failure callback's report was not sent")
    except LockLost as exc:
        log.warning("run %s failed; its teardown is done or it never held the model: %s", run_id, exc)
    except (Unreleased, Undersized) as exc:  # (done: not a restore that failed; what is left is told)
        log.warning("run %s failed: %s", run_id, exc)
        if isinstance(exc, Unreleased) and not exc.undersized and not left_running(exc.done):
            return  # (the lease runs out by itself; a candidate left running is told, with its command)
        try:
            message = (  # (kept: its retired version's HPA floor still held, said with what releases it)
                plain_report(spec, "promote", f"run {run_id} failed; its promotion is kept: {exc}")
                if exc.kept
                else rollback_message(spec, f"run {run_id} failed: {exc}")
            )
            tell(spec, message, "the failure callback's report")
        except Exception:
            log.exception("the failure callback's report was not sent")
    except Exception as exc:  # (the API server down, say): nothing tries again, so a human is told
        # (or what the failure left, said where a baseline at 0 was not scaled up: ``unscaled_from_0``)
        left = getattr(exc, "routes_kept", None) or (
            "nothing tries again: check the routes, and clear the run's ensure_stable (or put the stable version "
            "back by hand) once the cause is fixed"
        )
        failed = (
            f"run {run_id} failed and its failure callback could not put version {spec.baseline_version} back "
            f"({type(exc).__name__}: {str(exc)[:500]}); {left}"
        )
        log.exception("%s", failed)
        try:
            tell(spec, rollback_message(spec, failed, restored=False), "the failure callback's report")
        except Exception:
            log.exception("the failure callback's report was not sent")
