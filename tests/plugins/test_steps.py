"""decide: the evidence first, then (with require_approval) the reviewer's answer. One run at a
time per model in local mode (the lock file)."""

from __future__ import annotations

import json
import re
import socket
import time
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from model_server.traffic import TrafficPolicy
from rollout_airflow import steps
from rollout_airflow.steps import approval_body, decide
from tests.support import TOKEN, mirroring, one_hours_t0, png_title, put_policy, stage_evidence
from vision_rollout.mesh import routes_to

PASS = {"decision": "pass", "summary": "PASS at look 1"}
FAIL = {"decision": "fail", "summary": "FAIL: canary P99 regressed 40%"}
PARAMS = {"candidate_version": "2", "stages": [50, 100]}
ALICE = {"chosen_options": ["Promote"], "responded_by_user": {"id": "alice", "name": "Alice"}}


AGREES = {"verdict": "pass", "reasons": ["top-1 agreement 97.10% (interval 96.2-97.8%)"]}


def test_every_stage_passing_promotes_without_approval():
    assert decide(PARAMS, [PASS, PASS], AGREES) == (
        "promote",
        "every stage passed; shadow audit: top-1 agreement 97.10% (interval 96.2-97.8%)",
    )
    assert decide({**PARAMS, "mirror_percent": 0}, [PASS, PASS], None) == ("promote", "every stage passed")


@pytest.mark.parametrize(
    ("audit", "why"),
    [
        (
            {
                "verdict": "inconclusive",
                "reasons": ["top-1 agreement 62.50% (interval 30.6-86.3%) is not yet shown above 90%"],
            },
            "not yet shown above 90%",
        ),
        ({"verdict": "skip", "reasons": ["no shadow records in this range: nothing to audit"]}, "no shadow records"),
        (None, "the audit did not run"),
    ],
)
def test_with_a_mirror_promotion_needs_the_audit_to_show_agreement(audit, why):
    """The form says agreement "must be shown": 62.5% on 8 pairs, or no shadow record, promoted."""
    outcome, reason = decide(PARAMS, [PASS, PASS], audit)
    assert outcome == "rollback"
    assert reason.startswith("shadow audit did not show the candidate agrees with the primary: ")
    assert why in reason


@pytest.mark.parametrize(
    ("verdicts", "failures", "reason"),
    [
        ([PASS, FAIL], [], "the 100% stage: FAIL: canary P99 regressed 40%"),
        (
            [None, None],
            ["hard guard tripped: Canary P99 is 95 ms"],
            "the 50% stage: hard guard tripped: Canary P99",
        ),
        ([PASS, None], [], "no verdict: a step failed or was interrupted"),
    ],
)
def test_a_failed_or_missing_stage_rolls_back_and_says_why(verdicts, failures, reason):
    outcome, why = decide({**PARAMS, "require_approval": True}, verdicts, None, failures, approval=ALICE)
    assert outcome == "rollback"  # the evidence comes first: no approval promotes a failing canary
    assert reason in why


def test_a_failed_shadow_audit_rolls_back():
    audit = {"verdict": "fail", "reasons": ["top-1 agreement 71% is shown below 90%"]}
    assert decide(PARAMS, [PASS, PASS], audit) == (
        "rollback",
        "shadow audit failed: top-1 agreement 71% is shown below 90%",
    )


@pytest.mark.parametrize(
    ("approval", "outcome", "words"),
    [
        (ALICE, "promote", "approved by Alice"),
        (
            {"chosen_options": ["Roll back"], "responded_by_user": {"id": "bob", "name": "Bob"}},
            "rollback",
            "rejected by Bob",
        ),
        (
            {"chosen_options": ["Roll back"], "responded_by_user": None},
            "rollback",
            "rejected by default (no answer in time)",
        ),
        (None, "rollback", "not approved (no answer from a reviewer)"),
    ],
)
def test_with_require_approval_the_reviewer_decides(approval, outcome, words):
    result = decide({**PARAMS, "require_approval": True}, [PASS, PASS], AGREES, approval=approval)
    assert result[0] == outcome
    assert words in result[1]


def test_the_reviewer_reads_each_stage():
    body = approval_body(PARAMS, "every stage passed", [PASS, PASS])  # (the reason decide gave)
    assert "**50%**: PASS at look 1" in body
    assert "**100%**: PASS at look 1" in body
    assert "No answer in time rolls back" in body
    assert "a hard guard that trips meanwhile rolls back at once" in body


def test_integers_given_as_floats_are_the_runs_integers():
    """JSON Schema takes 25.0 for an integer, and so did the trigger's Params (a conf written by
    Python's json): the spec kept the floats, and the 25.0% stage's traffic policy was refused
    by the router once the first stage had run."""
    from airflow.sdk import Param

    conf = {"stages": [5, 25.0, 100], "looks_per_stage": 4.0, "bake_seconds": 600.0, "min_samples": 200.0}
    schema = {k: v for k, v in steps.RolloutSpec.json_schema()["properties"]["stages"].items() if k != "default"}
    assert Param(conf["stages"], **schema).resolve() == [5, 25.0, 100]  # the form takes it
    spec = steps.spec_from(conf)
    assert (spec.stages, spec.looks_per_stage, spec.bake_seconds, spec.min_samples) == ((5, 25, 100), 4, 600, 200)
    assert all(type(v) is int for v in (*spec.stages, spec.looks_per_stage, spec.bake_seconds, spec.min_samples))
    assert spec.policy_for_stage(spec.stages[1]).to_dict()["route"][1] == {"version": "2", "weight": 25}


def local_connection(monkeypatch, tmp_path, **extra) -> None:
    """The ``model_server_default`` connection of a local-mode test: the model server at a port of
    127.0.0.1 nothing listens on (any call to it fails), its run folder ``tmp_path``; ``extra``
    settings added (a ``run_dir`` in its place)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": closed_port, "extra": {"run_dir": str(tmp_path), **extra}}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))


def no_model_server(monkeypatch, tmp_path) -> None:
    """The model server's connection names a port nothing listens on (any call to it fails), its
    run folder ``tmp_path``, its repository a folder that is not there."""
    local_connection(monkeypatch, tmp_path, repository=str(tmp_path / "no-models"))


def test_in_local_mode_a_second_run_of_a_model_touches_nothing(monkeypatch, tmp_path):
    """The model server's address answers nothing: any call to it would fail these steps."""
    no_model_server(monkeypatch, tmp_path)
    lock = steps.serving().model_lock("digits", "local")
    lock.acquire("run-a")
    with pytest.raises(AirflowFailException, match=r"model 'digits' is being rolled out by run 'run-a'"):
        steps.build_image(PARAMS, "run-b")
    assert "nothing restored" in steps.ensure_stable(PARAMS, "run-b", None, None, None)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-b"})
    assert lock.holding().holder == "run-a"
    assert json.loads((tmp_path / "locks" / "digits.lock").read_text())["holder"] == "run-a"
    assert steps.serving().model_lock("mnist", "local").acquire("run-c").holder == "run-c"  # another model


def test_a_setting_found_wrong_in_the_first_step_fails_it_for_good_giving_the_model_back(monkeypatch, tmp_path):
    """Review s54-1: a build name refused once {model} is filled in (``build_for``) failed the
    first step with a SettingsError that Airflow retries: the lease was kept for the retry,
    which could only fail the same. It fails the task for good now, the model given back."""
    from vision_rollout import images
    from vision_rollout.settings import SettingsError

    no_model_server(monkeypatch, tmp_path)
    monkeypatch.setattr(steps, "start_from_steady", lambda *a: None)
    wrong = "the model_server_default extra build.namespace gives 'builds-digits_x': not a DNS label"

    def refused(*_: object) -> None:
        raise SettingsError(wrong)

    monkeypatch.setattr(images, "verify_model", refused)
    monkeypatch.setattr(steps, "send", lambda *a: None)
    with pytest.raises(AirflowFailException, match=re.escape(wrong)):
        steps.build_image(PARAMS, "run-a", retry_in_s=300)
    assert steps.serving().model_lock("digits", "local").holding() is None
    # In mesh istio, the model's own sections are read before its lease (review s54-2: a wrong
    # build name raised again in the except block, from the lease's clean-up, and kept it).
    istio = {"namespace": "models", "service": "{model}", "name": "{model}"}
    local_connection(monkeypatch, tmp_path, istio=istio, build={"namespace": "b" * 60 + "-{model}"})
    monkeypatch.setattr(steps.ModelServerHook, "model_lock", lambda *a: pytest.fail("the lease was asked for"))
    with pytest.raises(AirflowFailException, match=r"build\.namespace .*not a DNS label"):
        steps.build_image({**PARAMS, "mesh": "istio"}, "run-b", retry_in_s=300)


def test_a_run_whose_id_names_another_runs_folder_is_refused_touching_nothing(monkeypatch, tmp_path, caplog):
    """A DAG run deleted in the UI, then triggered again with its run id (the trigger form's Run
    ID, a script's id of its own), or an id that names the same folder once cleaned: the new run
    found the old one's records in its run folder and took them for its own. The old run promoted
    a version: the new one, whatever its candidate, skipped every task and showed a success
    having rolled nothing out; rolled back, it failed as "this run ended"; stopped mid-run, its
    stages would take the old tests' decisions for the new candidate's. Now the run folder keeps
    the DAG run it is (its id and when it was triggered, which a clear keeps): another's is
    refused at the first step, naming both, touching nothing (the model server's address
    answers nothing here: any call to it would fail). The same run, cleared, goes on as before."""
    no_model_server(monkeypatch, tmp_path)
    first, second = "2026-03-01T00:00:00+00:00", "2026-03-02T09:30:00.123456+00:00"
    folder = steps.serving().settings.workdir("digits", "nightly")
    with pytest.raises(AirflowFailException, match="unreachable"):  # (its first run: no model server here)
        steps.build_image(PARAMS, "nightly", run_after=first)
    end = {"holder": "nightly", "decided": "promote", "promoted": True, "done": "version 2 was promoted"}
    folder.write("ended.json", json.dumps(end).encode())  # (as its teardown writes it)
    with pytest.raises(
        AirflowFailException, match=r"holds the records of another DAG run .*'nightly'.*2026-03-01"
    ) as e:
        steps.build_image({**PARAMS, "candidate_version": "3"}, "nightly", run_after=second)
    assert "2026-03-02T09:30:00.123456" in str(e.value)
    assert "touched nothing" in str(e.value)
    assert steps.serving().model_lock("digits", "local").holding() is None
    with pytest.raises(AirflowSkipException, match="this run ended"):  # (the run itself, cleared)
        steps.build_image(PARAMS, "nightly", run_after=first)
    # A folder the mark cannot be written to (full, read-only) is the first step's to report.
    from vision_rollout.folders import Folder

    write = Folder.write

    def full(folder: Folder, name: str, data: bytes) -> str:
        if name == "run.json":
            raise OSError(28, "No space left on device")
        return write(folder, name, data)

    monkeypatch.setattr(Folder, "write", full)
    monkeypatch.setattr(Folder, "write_if", lambda folder, name, data, read: full(folder, name, data))
    with pytest.raises(AirflowFailException, match="unreachable"):
        steps.build_image(PARAMS, "another", run_after=second)
    assert "this run's mark was not written" in caplog.text


def test_of_two_dag_runs_starting_together_on_one_folder_the_second_is_refused(monkeypatch, tmp_path):
    """Two DAG runs whose ids name one folder, their first steps at once: both read no mark, and
    both wrote theirs, the last one winning: the loser then failed at the lease, and the
    winner's retries were refused as "another DAG run". Now the mark is written only where none
    is: the second finds the first's, written between its read and its write, and is refused."""
    no_model_server(monkeypatch, tmp_path)
    first, second = "2026-03-01T00:00:00+00:00", "2026-03-01T00:00:00.5+00:00"
    folder = steps.serving().settings.workdir("digits", "nightly")
    from vision_rollout.folders import Folder

    read = Folder.read_within

    def raced(self: Folder, name: str, limit: int) -> bytes:
        if name == "run.json" and not (tmp_path / "raced").exists():  # (its read, before the other's write)
            (tmp_path / "raced").touch()
            folder.write("run.json", json.dumps({"run_id": "nightly", "run_after": first}).encode())
            raise FileNotFoundError(name)
        return read(self, name, limit)

    monkeypatch.setattr(Folder, "read_within", raced)
    with pytest.raises(AirflowFailException, match=r"holds the records of another DAG run .*2026-03-01T00:00:00\+"):
        steps.build_image(PARAMS, "nightly", run_after=second)
    assert json.loads(folder.read_within("run.json", 4096)) == {"run_id": "nightly", "run_after": first}
    assert steps.serving().model_lock("digits", "local").holding() is None


def test_a_failure_callback_without_the_runs_params_touches_nothing(monkeypatch, tmp_path, caplog):
    """Airflow calls a DAG's failure callback with only the DAG and the run id when it has no
    task instance to build the context from: the spec's defaults (digits, 2 against 1) are not
    that run's, and routing its model to them could put a retired version at 100%."""
    local_connection(monkeypatch, tmp_path)
    lock = steps.serving().model_lock("digits", "local")
    lock.acquire("run-a")  # a run of digits, 3 against 2, that failed mid-stage
    steps.restore_stable_on_failure({"dag": None, "run_id": "run-a", "reason": "task_failure"})
    assert lock.holding().holder == "run-a"  # its teardown, cleared, still can
    assert "not given the run's parameters" in caplog.text


def test_the_shadow_audit_keeps_the_model_this_runs(monkeypatch, tmp_path):
    """The audit of a long run's log takes a while, and the next task's start more: the lease is
    renewed around it (it ran out there, and another run could take the model over mid-decision);
    a run that lost it stops there."""
    from datetime import UTC, datetime, timedelta

    from vision_rollout.locks import LEASE_S

    local_connection(monkeypatch, tmp_path, prediction_log=str(tmp_path / "log"))
    lock = steps.serving().model_lock("digits", "local")
    lock.acquire("run-a", seconds=5)
    since = datetime.now(UTC) - timedelta(minutes=5)
    assert steps.shadow_consistency(PARAMS, since, "run-a")["verdict"] == "skip"  # no shadow records
    assert lock.holding().seconds == LEASE_S
    with pytest.raises(AirflowFailException, match="run 'run-b' does not hold model 'digits'"):
        steps.shadow_consistency(PARAMS, since, "run-b")


def test_the_lease_held_over_the_shadow_audit_covers_its_longest_wait_and_reads(monkeypatch, tmp_path):
    """The step held the lease for ``LEASE_S`` + 600 s: the copies' wait to the range's close (120
    s then) and the audit's reads (``MAX_AUDIT_S``), 600 s written out. The close moved (186 s
    now): the wait and the reads took 666 s, and the lease, held for 900 s, left 234 s of its 300
    for the report and the next task's start. It is held for ``LEASE_S`` beyond the longest wait
    and reads (``rollout_audit_s``), derived from the close and ``MAX_AUDIT_S``."""
    from vision_rollout import engine
    from vision_rollout.audit import MAX_AUDIT_S, closes
    from vision_rollout.locks import LEASE_S

    local_connection(monkeypatch, tmp_path, prediction_log=str(tmp_path / "log"))
    lock = steps.serving().model_lock("digits", "local")
    lock.acquire("run-a", seconds=5)
    held = []
    real = engine.rollout_audit

    def audit(prediction_log, start, end, spec, mirroring):
        held.append(lock.holding().seconds)
        return real(prediction_log, start, end, spec, mirroring)

    monkeypatch.setattr(engine, "rollout_audit", audit)
    end = datetime.now(UTC)
    steps.shadow_consistency(PARAMS, end - timedelta(minutes=5), "run-a")
    longest = (closes(end) - end).total_seconds() + MAX_AUDIT_S
    (seconds,) = held
    assert seconds >= LEASE_S + longest, (seconds, longest)
    assert lock.holding().seconds == LEASE_S


def test_the_shadow_audit_waits_for_the_copies_of_the_runs_last_primaries(monkeypatch, tmp_path):
    """The step audited up to its start, when the copies of the last requests were not written
    yet (the candidate's pod flushes every few seconds, after the baseline's wrote the primaries):
    a short run's audit compared nothing, a long one's showed its last minute's primaries without
    their shadow. It waits for them (here two seconds) and audits the same range."""
    import threading
    import time
    from datetime import UTC, datetime, timedelta

    import vision_rollout.audit  # noqa: F401  (imported before the copies' clock starts)
    from tests.support import shadow_log

    local_connection(monkeypatch, tmp_path, prediction_log=str(tmp_path / "log"))
    steps.serving().model_lock("digits", "local").acquire("run-a", seconds=5)
    now = time.time()
    shadow_log(tmp_path, 40, disagree=0.0, at=now - 3, roles=("primary",))
    flush = threading.Timer(2.0, lambda: shadow_log(tmp_path, 40, disagree=0.0, at=now - 3, roles=("shadow",)))
    flush.start()
    try:
        result = steps.shadow_consistency(PARAMS, datetime.now(UTC) - timedelta(minutes=5), "run-a")
    finally:
        flush.join()
    assert (result["rows"], result["primary_without_shadow"]) == (40, 0)
    # Once the stable version took 100% back the mirror is off: no copy is waited for.
    monkeypatch.setattr(
        steps, "router", lambda *a, **k: type("R", (), {"get_routes": steps.spec_from(PARAMS).stable_policy})()
    )
    (tmp_path / "b").mkdir()
    shadow_log(tmp_path / "b", 10, disagree=0.0, at=time.time() - 3, roles=("primary",))
    local_connection(monkeypatch, tmp_path, prediction_log=str(tmp_path / "b" / "log"))
    began = time.monotonic()
    assert steps.shadow_consistency(PARAMS, datetime.now(UTC) - timedelta(minutes=5), "run-a")["verdict"] == "skip"
    assert time.monotonic() - began < 30


def test_a_local_run_with_its_run_folder_in_an_object_store_fails_naming_the_extra(monkeypatch, tmp_path):
    """Mesh local keeps its lock file and the routes before a rollout on the machine's disk: a
    run folder in an object store fails the first step, touching nothing (no retry)."""
    local_connection(monkeypatch, tmp_path, run_dir="s3://bucket/run?region=eu-west-1")
    with pytest.raises(AirflowFailException, match="run_dir must be a folder there, not an object store URI"):
        steps.build_image(PARAMS, "run-a")
    with pytest.raises(AirflowFailException, match="run_dir must be a folder there"):
        steps.router(steps.spec_from(PARAMS), "run-a", steps.serving())


def connect(server: Any, monkeypatch: Any, tmp_path: Path, repository: Path) -> Any:
    """The model server connection to ``server`` (the run folder under ``tmp_path``, the
    ``repository``), set for the steps; its admin client."""
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": server.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repository)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    return steps.serving().settings.admin


@pytest.mark.integration
def test_a_local_run_starts_only_where_its_baseline_takes_all_of_the_traffic(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """The baseline is checked against what serves: a run against the form's default baseline 1
    (or a misspelt key, which Airflow keeps as a Param of its own) while version 2 serves routed
    95% to version 1 and unloaded version 2 (it served by default, no policy naming it); header rules a rollout would drop, and a mirror
    left by a rollout that did not end, are named. Each refused run touches nothing."""
    s = server_factory(repo_copy, token=TOKEN)
    s.load_versions("digits", 1, 2)  # (the highest serves)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    serving = admin.traffic("digits").to_dict()
    assert serving == {"route": [{"version": "2", "weight": 100}]}

    misspelt = {"candidate_version": "3", "baselne_version": "2"}
    with pytest.raises(AirflowFailException, match="unknown 'baselne_version'"):
        steps.build_image(misspelt, "run-a")
    steps.restore_stable_on_failure({"params": misspelt, "run_id": "run-a"})  # (logs it, no traceback)
    with pytest.raises(AirflowFailException, match=r"baseline version 1 is not what serves now \(version 2 100%\)"):
        steps.build_image({"candidate_version": "3"}, "run-a")
    # The lease given back: the teardown and the failure callback leave what serves alone (the
    # default policy routes to version 2; were it this run's candidate, they took it for its own).
    assert "nothing restored" in steps.ensure_stable({"candidate_version": "2"}, "run-a", None, None, None)
    steps.restore_stable_on_failure({"params": {"candidate_version": "2"}, "run_id": "run-a"})
    assert admin.traffic("digits").to_dict() == serving
    assert (admin.ready("digits", "1"), admin.ready("digits", "2"), admin.ready("digits", "3")) == (True, True, False)

    stable = {"candidate_version": "3", "baseline_version": "2"}
    rule = {
        "name": "acme",
        "match": {"headers": {"x-tenant": {"exact": "acme"}}},
        "route": [{"version": "2", "weight": 100}],
    }
    for policy, refused in (
        ({**serving, "rules": [rule]}, r"1 header rule\(s\) \(acme\)"),
        ({**serving, "mirror": {"version": "1", "percent": 10}}, "mirrors to version 1"),
    ):
        assert put_policy(s, policy).status_code == 200
        with pytest.raises(AirflowFailException, match=refused):
            steps.build_image(stable, "run-b")
        steps.restore_stable_on_failure({"params": stable, "run_id": "run-b"})
        assert admin.traffic("digits").to_dict() == TrafficPolicy.from_dict(policy).to_dict()
    assert put_policy(s, serving).status_code == 200
    built = steps.build_image(stable, "run-c")  # from the steady state it starts
    assert (admin.ready("digits", "2"), admin.ready("digits", "3")) == (True, True)
    steps.apply_weights(stable, 0, "run-c", built)
    assert routes_to(admin.traffic("digits"), "3")

    # run-c's worker dies mid-stage; its lease expires and run-d takes the model over: run-c's
    # routes are put back first (they were left at 95/5 and its mirror, and the false "version
    # 2 takes 100%" logged).
    lock_file = tmp_path / "run" / "locks" / "digits.lock"
    lock_file.write_text(json.dumps({**json.loads(lock_file.read_text()), "renewed": 0.0}))
    left = admin.traffic("digits").to_dict()
    # Against run-c's candidate as its baseline, its routes are not put back: the unjudged
    # version 3 would take 100% and the load would unload version 2, which served.
    with pytest.raises(AirflowFailException, match="mirrors to version 3: a rollout in progress"):
        steps.build_image({"candidate_version": "1", "baseline_version": "3"}, "run-d")
    assert admin.traffic("digits").to_dict() == left
    lock_file.write_text(json.dumps({"holder": "run-c", "renewed": 0.0, "seconds": 300, "acquired": 0.0}))
    other = {"candidate_version": "1", "baseline_version": "2"}
    steps.build_image(other, "run-d")
    assert admin.traffic("digits").to_dict() == serving
    assert (admin.ready("digits", "1"), admin.ready("digits", "2"), admin.ready("digits", "3")) == (True, True, False)


@pytest.mark.integration
def test_loading_the_candidate_leaves_the_traffic_on_the_baseline(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """A server as it starts, version 1 alone with no traffic policy (the default: the highest
    loaded version serves). build_image loaded version 2 beside it, and version 2, unjudged,
    took all of the traffic until the first stage; a retry of build_image (a load answered late)
    then found it serving, gave the lease up and left it there."""
    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    stable = {"route": [{"version": "1", "weight": 100}]}
    assert admin.traffic("digits").to_dict() == stable
    for _ in range(2):  # the task, then its retry
        steps.build_image(PARAMS, "run-a")
        assert admin.traffic("digits").to_dict() == stable
        assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, True)
    assert steps.serving().model_lock("digits", "local").holding().holder == "run-a"


@pytest.mark.integration
def test_a_stage_cleared_with_its_downstream_mid_run_goes_on_with_the_rollout(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """A stage's task group cleared with its downstream in the UI mid-run: Airflow clears the
    run's setup, build_image, with it. Run again, it found the rollout's routes, refused the run
    as "a rollout in progress? ... This run touched nothing" and gave the model up; the teardown
    then left the unjudged candidate at 50% with its mirror, held by no run. Now it verifies the
    candidate again and touches nothing: the stage re-runs from where the rollout is."""
    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    built = steps.build_image(PARAMS, "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    mid_stage = admin.traffic("digits").to_dict()
    again = steps.build_image(PARAMS, "run-a")  # the setup, cleared with stage_2 and its downstream
    assert again["sha256"] == built["sha256"]
    assert admin.traffic("digits").to_dict() == mid_stage
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, True)
    assert steps.serving().model_lock("digits", "local").holding().holder == "run-a"
    steps.apply_weights(PARAMS, 1, "run-a", {"decision": "pass"}, again["sha256"])
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "2", "weight": 100}]}
    steps.restore_stable(PARAMS, "run-a")  # and its rollback still puts the stable version back
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}


@pytest.mark.integration
def test_notify_cleared_after_a_promoted_run_ended_touches_nothing_and_says_it_is_sent_again(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """notify cleared with its downstream once a promoted run ended: build_image, cleared with it,
    refused ("baseline version 1 is not what serves now ... touched nothing") and told Slack the
    run was not started. It now takes no lease and touches nothing; notify's report says it is
    sent again; the teardown finds nothing to undo."""
    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    _, first = promoted_and_ended()
    promoted = admin.traffic("digits").to_dict()
    assert promoted == {"route": [{"version": "2", "weight": 100}]}
    again = steps.build_image(PARAMS, "run-a", report_only=True)  # decide and promote not cleared
    assert again["ended"]["decided"] == "promote"
    assert admin.traffic("digits").to_dict() == promoted
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (False, True)
    assert steps.serving().model_lock("digits", "local").holding() is None
    steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], again["preflight"], "run-a")
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "outbox").glob("*.json"))]
    assert len(reports) == 2
    assert not reports[0]["text"].startswith("Sent again")
    assert (
        reports[1]["text"]
        == f"Sent again: notify was cleared after the run ended; nothing changed since the first report. {reports[0]['text']}"
    )
    assert steps.ensure_stable(PARAMS, "run-a", None, None, first, "promote").startswith("the run had ended")
    assert admin.traffic("digits").to_dict() == promoted


def promoted_and_ended(run_id: str = "run-a") -> tuple[dict, dict]:
    """A run of PARAMS whose every stage passed, promoted, its report sent and its teardown done:
    its ``ended.json`` written. Its build_image's answer and its report."""
    built = steps.build_image(PARAMS, run_id)
    steps.apply_weights(PARAMS, 0, run_id, built)
    steps.apply_weights(PARAMS, 1, run_id, PASS, built["sha256"])
    steps.promote(PARAMS, run_id, "promote", built["sha256"])
    first = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, run_id)
    steps.ensure_stable(PARAMS, run_id, "2", None, first, "promote")
    return built, first


def rolled_back_and_ended(admin: Any, run_id: str = "run-a") -> dict:
    """A run of PARAMS whose every stage passed, rolled back all the same (the shadow audit, a
    reviewer), its report sent and its teardown done: its ``ended.json`` written. Its report."""
    built = steps.build_image(PARAMS, run_id)
    steps.apply_weights(PARAMS, 0, run_id, built)
    steps.apply_weights(PARAMS, 1, run_id, PASS, built["sha256"])
    steps.restore_stable(PARAMS, run_id)  # (rollback)
    first = steps.notify(PARAMS, "rollback", "rejected by Alice", [PASS, PASS], None, run_id)
    steps.ensure_stable(PARAMS, run_id, None, "1", first, "rollback")
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, False)
    return first


@pytest.mark.integration
def test_a_stage_cleared_after_a_run_rolled_back_is_refused_unless_a_restart_was_asked_for(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """A rolled-back run's stage cleared with its downstream once the run ended (a reviewer
    "looking again"): build_image, cleared with it, took the model's lease and loaded version 2
    again, and the stage, its test passed, put it back on 50% of the traffic. The run ended:
    build_image refuses it now, naming what to do instead, and touches nothing. A fresh test asked
    for with rolloutctl restart-stage (the documented retry) still starts the run again."""
    from vision_rollout.cli import main

    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    rolled_back_and_ended(admin)
    stable = admin.traffic("digits").to_dict()
    with pytest.raises(AirflowFailException, match=r"this run ended .*rolled back.*trigger a new run.*restart-stage"):
        steps.build_image(PARAMS, "run-a")  # decide cleared: the decision does not stand
    assert admin.traffic("digits").to_dict() == stable
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, False)
    assert steps.serving().model_lock("digits", "local").holding() is None
    assert steps.ensure_stable(PARAMS, "run-a", None, None, None).startswith("the run had ended")  # (its teardown)
    args = ["restart-stage", "--run-dir", str(tmp_path / "run"), "--model", "digits", "--run-id", "run-a"]
    assert main([*args, "--stage", "1", "--reason", "look again"]) == 0
    steps.build_image(PARAMS, "run-a")  # asked for: it starts again
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, True)
    assert steps.serving().model_lock("digits", "local").holding().holder == "run-a"
    assert steps.run_ended(steps.spec_from(PARAMS), "run-a") is None


@pytest.mark.integration
def test_a_run_started_again_after_it_ended_reports_its_new_outcome(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path, slack
):
    """A run that ended (rolled back, reported), started again with rolloutctl restart-stage:
    its run folder kept the first pass's post (report.json), so the second pass's notify took it
    for its own and posted nothing, and its teardown, notify lost, took it for notify's: Slack
    kept saying "Rolled back" whatever the second pass did. Starting again forgets the first
    pass's report with its end: the second pass posts its own."""
    from vision_rollout.cli import main

    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    first = rolled_back_and_ended(admin)
    assert "ts" in first
    assert [m["text"][:11] for m in slack.messages()] == ["Rolled back"]
    args = ["restart-stage", "--run-dir", str(tmp_path / "run"), "--model", "digits", "--run-id", "run-a"]
    assert main([*args, "--stage", "1", "--reason", "look again"]) == 0
    steps.build_image(PARAMS, "run-a")
    assert steps.run_report(steps.serving().settings.workdir("digits", "run-a")) == {}
    second = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")
    assert "posted_before" not in second
    assert second["ts"] != first["ts"]
    assert [m["text"][:8] for m in slack.messages()] == ["Rolled b", "Promoted"]


class EndedRunTask:
    """A task instance of run ``run_id`` cleared (with its downstream) after the run ended: the
    states of the run's tasks as Airflow keeps them (``cleared``: none), its XComs those of
    ``xcoms`` (task id to its return value; decide's outcome under ``decide.outcome``)."""

    dag_id, try_number, max_tries = "model_rollout", 2, 1  # (its last try)

    def __init__(self, run_id: str, decided: str, cleared: list[str], xcoms: dict | None = None) -> None:
        self.run_id, self.cleared, self.xcoms = run_id, cleared, {"decide.outcome": decided, **(xcoms or {})}
        ended = {"decide": "success", "promote": "skipped", "rollback": "skipped", decided: "success"}
        self.states = {t: s for t, s in ended.items() if t not in cleared}

    def get_task_states(self, dag_id, task_ids, run_ids):
        return {self.run_id: {t: self.states.get(t) for t in task_ids}}

    def xcom_pull(self, task_ids, key="return_value"):
        return self.xcoms.get(task_ids if key == "return_value" else f"{task_ids}.{key}")


@pytest.mark.integration
def test_promote_or_rollback_cleared_after_the_run_ended_re_verify_and_touch_nothing(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """rollback cleared (with its downstream) after a rolled-back run ended: build_image, cleared
    with it, took the model's lease and loaded version 2 again, and rollback unloaded it; promote
    cleared after a promotion: build_image refused ("baseline version 1 is not what serves now")
    and told Slack the run was not rolled out. Neither undoes nor redoes what the run carried
    out now: build_image starts nothing, each re-verifies what serves and says so, touching
    nothing; one that finds it changed since (another run) fails saying what serves."""
    from tests.dags.test_model_rollout_e2e import rollout_dag

    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    dag = rollout_dag()
    lease = steps.serving().model_lock("digits", "local")

    def cleared(run_id: str, decided: str, xcoms: dict | None = None) -> str:
        ti = EndedRunTask(run_id, decided, [decided, "notify", "outcome", "ensure_stable", "build_image"], xcoms)
        run = types.SimpleNamespace(run_after=datetime(2026, 1, 1, tzinfo=UTC))  # (the same DAG run: a clear keeps it)
        built = dag.get_task("build_image").python_callable(params=PARAMS, run_id=run_id, ti=ti, dag_run=run)
        assert built["ended"]["decided"] == decided
        task = dag.get_task(decided)
        return task.python_callable(**task.determine_kwargs({"params": PARAMS, "run_id": run_id, "ti": ti}))

    rolled_back_and_ended(admin)
    stable = admin.traffic("digits").to_dict()
    assert cleared("run-a", "rollback") == "1"
    assert admin.traffic("digits").to_dict() == stable
    assert (admin.ready("digits", "1"), admin.ready("digits", "2"), lease.holding()) == (True, False, None)

    built, _ = promoted_and_ended("run-b")  # version 2 again, promoted this time
    promoted = admin.traffic("digits").to_dict()
    assert cleared("run-b", "promote", {"build_image": built}) == "2"
    assert admin.traffic("digits").to_dict() == promoted
    assert (admin.ready("digits", "1"), admin.ready("digits", "2"), lease.holding()) == (False, True, None)
    # run-a's rollback cleared again: version 2 serves now (run-b promoted it), which it says.
    with pytest.raises(AirflowFailException, match=r"ended rolled back .* version 2 .* nothing touched"):
        cleared("run-a", "rollback")
    assert admin.traffic("digits").to_dict() == promoted
    assert (admin.ready("digits", "1"), admin.ready("digits", "2"), lease.holding()) == (False, True, None)


@pytest.mark.integration
def test_a_report_sent_again_after_the_run_ended_is_threaded_under_the_first(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path, slack
):
    """notify cleared after a promoted run ended: the report sent again ("Sent again: ...") was a
    new message in the channel, apart from the run's first report. It is a reply in that
    report's thread now (its channel and ts kept in ended.json by the teardown), and waits in the
    outbox with its thread where Slack does not take it."""
    s = server_factory(repo_copy, token=TOKEN)
    connect(s, monkeypatch, tmp_path, models_dir)
    _, first = promoted_and_ended()
    again = steps.build_image(PARAMS, "run-a", report_only=True)
    resent = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], again["preflight"], "run-a")
    original, reply = slack.messages()
    assert "thread_ts" not in original
    assert reply["text"].startswith("Sent again")
    assert reply["thread_ts"] == first["ts"]
    assert resent["channel"] == first["channel"]
    slack.outage = 503
    waiting = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], again["preflight"], "run-a")
    slack.outage = None
    assert json.loads(Path(waiting["outbox"]).read_text())["thread_ts"] == first["ts"]
    (sent,) = steps.send_outbox()
    assert sent["sent"]
    assert slack.messages()[-1]["thread_ts"] == first["ts"]


@pytest.mark.integration
def test_a_step_cleared_alone_after_the_run_ended_skips_saying_so(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """A stage's step cleared alone (its downstream unticked) after the run promoted: it failed on
    the model's lease ("run 'run-a' does not hold model 'digits': nobody holds it"), and the run,
    whose promotion stands, turned failed. It skips now, saying the run ended, touching nothing."""
    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    built, _ = promoted_and_ended()
    promoted = admin.traffic("digits").to_dict()
    ended = r"this run ended \(promoted: .*\): its steps are not run again, nothing touched; trigger a new run"
    with pytest.raises(AirflowSkipException, match=ended):
        steps.apply_weights(PARAMS, 1, "run-a", PASS, built["sha256"])
    with pytest.raises(AirflowSkipException, match=ended):
        steps.look_at_stage(PARAMS, 1, {"weight": 100, "started": 0.0}, "run-a")
    assert admin.traffic("digits").to_dict() == promoted
    assert steps.serving().model_lock("digits", "local").holding() is None


@pytest.mark.integration
def test_a_local_run_whose_lock_file_was_removed_mid_run_puts_the_stable_version_back(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """The lock file removed mid-run (a cleanup of the locks folder): the next step failed with
    LockLost and the teardown restored nothing, version 2 keeping its 50% with nobody left to put
    version 1 back. The run takes its lock again (nobody holds it; its run folder says it held
    it and had not released it), the step fails as aborted and the teardown puts version 1 back."""
    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    built = steps.build_image(PARAMS, "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    assert routes_to(admin.traffic("digits"), "2")
    (tmp_path / "run" / "locks" / "digits.lock").unlink()
    with pytest.raises(AirflowFailException, match=r"aborted: the model's lease \(.*digits\.lock\) was removed"):
        steps.apply_weights(PARAMS, 1, "run-a", PASS)
    assert steps.serving().model_lock("digits", "local").holding().holder == "run-a"
    with pytest.raises(AirflowFailException, match="version 1 takes 100%"):
        steps.ensure_stable(PARAMS, "run-a", None, None, None)
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert steps.serving().model_lock("digits", "local").holding() is None
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-a"})  # released: not taken again
    assert steps.serving().model_lock("digits", "local").holding() is None


@pytest.mark.integration
def test_promote_after_a_decide_marked_success_by_hand_touches_nothing(
    server_factory, repo_copy, monkeypatch, tmp_path
):
    """decide marked success in the UI (failed, or to hurry the run) decided nothing and skipped
    neither branch: promote put the candidate at 100% and unloaded the baseline, whatever the
    stages said. It refuses now; the teardown puts the baseline back."""
    from tests.dags.test_model_rollout_e2e import rollout_dag

    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    s.load_versions("digits", 1, 2)
    mid_stage = steps.spec_from(PARAMS).policy_for_stage(50)
    assert put_policy(s, mid_stage.to_dict()).status_code == 200
    steps.serving().model_lock("digits", "local").acquire("run-a")

    class DecideMarkedSuccess:
        def xcom_pull(self, task_ids, key="return_value"):
            return None  # (decide never ran: no outcome)

    task = rollout_dag().get_task("promote")
    kwargs = task.determine_kwargs({"params": PARAMS, "run_id": "run-a", "ti": DecideMarkedSuccess()})
    with pytest.raises(AirflowFailException, match=r"decide chose nothing .*version 2 is not promoted"):
        task.python_callable(**kwargs)
    admin = steps.serving().settings.admin
    assert admin.traffic("digits") == mid_stage
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, True)


class XComs:
    """What the DAG's tasks use of their task instance: XCom pushes and pulls, one store per run."""

    def __init__(self, task_id: str = "", store: dict | None = None) -> None:
        self.task_id, self.store = task_id, {} if store is None else store

    def of(self, task_id: str) -> XComs:
        return XComs(task_id, self.store)

    def xcom_push(self, key, value):
        self.store[self.task_id, key] = value

    def xcom_pull(self, task_ids, key="return_value"):
        return self.store.get((task_ids, key))


@pytest.mark.integration
def test_the_rollback_report_names_why_a_stages_step_failed(server_factory, repo_copy, monkeypatch, tmp_path):
    """enable_shadow failing (the mirror not in effect, the masking check) rolled back with
    "the 50% stage produced no verdict: a step failed or was interrupted": only the metrics
    wait kept its reason. Each step of a stage keeps it now, and the decision names it."""
    from tests.dags.test_model_rollout_e2e import rollout_dag

    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    s.load_versions("digits", 1, 2)
    no_mirror = {"route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]}
    assert put_policy(s, no_mirror).status_code == 200
    steps.serving().model_lock("digits", "local").acquire("run-a")
    run = XComs()
    task = rollout_dag().get_task("stage_1.enable_shadow")
    ti = run.of(task.task_id)
    with pytest.raises(AirflowFailException, match="the mirror to version 2 is not in effect"):
        task.python_callable(**task.determine_kwargs({"params": PARAMS, "run_id": "run-a", "ti": ti}))
    outcome, reason = decide(PARAMS, *steps.evidence(run, 4))
    assert outcome == "rollback"
    assert reason.startswith("the 50% stage: the mirror to version 2 is not in effect")


@pytest.mark.integration
def test_a_teardown_after_a_failed_promotion_says_so(server_factory, repo_copy, monkeypatch, tmp_path):
    """decide chose promote and promote failed (here: the baseline's unload refused, the routes
    already promoted): the teardown put the baseline back and failed the run with "the run was
    stopped before it decided", which it had."""
    from tests.dags.test_model_rollout_e2e import rollout_dag

    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    s.load_versions("digits", 1, 2)
    assert put_policy(s, {"route": [{"version": "2", "weight": 100}]}).status_code == 200  # promote's first write
    steps.serving().model_lock("digits", "local").acquire("run-a")
    run = XComs()
    run.of("decide").xcom_push("outcome", "promote")
    task = rollout_dag().get_task("ensure_stable")
    kwargs = task.determine_kwargs({"params": PARAMS, "run_id": "run-a", "ti": run.of(task.task_id)})
    with pytest.raises(
        AirflowFailException, match=r"decide chose promote, which did not finish .*version 1 takes 100%"
    ):
        task.python_callable(**kwargs)
    assert steps.serving().settings.admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    # notify never ran (promote failed): the teardown's report says what happened, in Slack (here its outbox)
    [report] = [json.loads(p.read_text()) for p in (tmp_path / "run" / "outbox").glob("*.json")]
    assert report["text"].startswith("Rolled back digits v2: decide chose promote, which did not finish")
    assert "version 1 takes 100%" in report["text"]


@pytest.mark.integration
def test_promote_marked_success_by_hand_is_not_left_reported_as_a_promotion(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """promote marked success in the UI (to hurry the run) before it ran: notify reported
    "Promoted", the teardown found no promotion in effect and put version 1 back, failing the
    run, and Slack was never told: its last word on the run was a promotion that did not happen.
    The teardown now reports what it did after notify's report."""
    s = server_factory(repo_copy, token=TOKEN)
    admin = connect(s, monkeypatch, tmp_path, models_dir)
    built = steps.build_image(PARAMS, "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    steps.apply_weights(PARAMS, 1, "run-a", PASS, built["sha256"])
    report = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")
    with pytest.raises(
        AirflowFailException, match=r"decide chose promote, which did not finish .*version 1 takes 100%"
    ):
        steps.ensure_stable(PARAMS, "run-a", None, None, report, "promote")
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "outbox").glob("*.json"))]
    assert [r["text"][:11] for r in reports] == ["Promoted di", "Rolled back"]
    assert reports[-1]["text"].startswith("Rolled back digits v2: decide chose promote, which did not finish")


def outbox_reports(monkeypatch, tmp_path) -> list[dict]:
    """The connection's outbox (no Slack connection: reports land there), read back."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT",
        json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": 9, "extra": {"run_dir": str(tmp_path)}}),
    )
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]


def test_the_first_steps_warning_of_a_validation_set_too_small_reaches_the_report(
    monkeypatch, tmp_path, models_dir, capsys
):
    """The demo's 450 validation images cannot show an equal candidate within the 0.5 pp margin:
    build_image says so in its log and its XCom, with the size needed, and the final report to
    Slack carries it; an unreadable set is said too. The rollout goes on (a warning)."""
    spec = steps.spec_from(PARAMS)
    (warning,) = steps.preflight(spec, models_dir / "digits" / "validation")
    assert "the validation set has 450 images" in warning
    assert "needs at least 642" in warning
    assert f"pre-flight warning: {warning}" in capsys.readouterr().out
    (unread,) = steps.preflight(spec, tmp_path / "nowhere")
    assert unread.startswith(f"the validation set {tmp_path / 'nowhere'} cannot be read")
    outbox_reports(monkeypatch, tmp_path)
    full = {"checks": [], "look": 1, "looks": 5, "alpha": 0.05, "nominal_alpha": 1e-4, "spending": "pocock"}
    steps.notify(PARAMS, "promote", "every stage passed", [{**PASS, **full}] * 2, [warning])
    steps.notify(PARAMS, "rollback", "the 50% stage: undecided", [{**FAIL, **full}, None], [warning])
    for report in outbox_reports(monkeypatch, tmp_path):
        (note,) = [b for b in report["blocks"] if "Pre-flight" in json.dumps(b)]
        assert note["elements"][0]["text"].endswith(
            "*Pre-flight:* the validation set has 450 images, too few to show a candidate that answers them "
            "as the baseline does within the 0.5 pp accuracy margin: that needs at least 642 (at the last "
            "look's one-sided level 0.0363, traffic at a steady pace through the stage; rising traffic lowers "
            "it). Such a candidate ends the 50% stage undecided and is rolled "
            "back; only one that gets more of them right than the baseline can pass. Add images to the "
            "validation set, or widen accuracy_margin."
        )


def test_a_stage_that_ended_undecided_without_a_look_is_reported(monkeypatch, tmp_path):
    """Prometheus down until max_stage_seconds: the stage's XCom had no look, notify failed on
    Verdict.from_dict (KeyError 'look') and the rollback report was never sent nor kept."""
    outbox_reports(monkeypatch, tmp_path)
    undecided = {
        "decision": "wait",
        "checks": [],
        "summary": "undecided: the stage ended (3600 s) while its hard guards could not be read",
        "status": "undecided",
        "bake": {"elapsed_s": 3600.0, "served": {}, "gpu": {}, "look": 0, "looks": 10},
    }
    reason = f"the 50% stage: {undecided['summary']}"
    sent = steps.notify(PARAMS, "rollback", reason, [undecided, None])
    assert "outbox" in sent
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert "could not be read" in json.dumps(report["blocks"])


def test_a_teardown_never_reports_the_stable_version_back_where_it_is_not(monkeypatch, tmp_path):
    """A run stopped before it decided, whose routes an operator had changed meanwhile, reported
    "Version 1 takes 100% of traffic again" beside a reason saying the routes were left as the
    operator set them; and a teardown whose restore failed (rollback and notify never ran)
    reported nothing at all: the run failed with traffic on the candidate and Slack was not told."""
    outbox_reports(monkeypatch, tmp_path)
    theirs = 'the routes were not this run\'s and are left as they are: {"route": [{"version": "4", "weight": 100}]}'
    monkeypatch.setattr(steps, "finish", lambda *a, **k: (False, theirs))
    with pytest.raises(AirflowFailException, match="left as they are"):
        steps.ensure_stable(PARAMS, "run-a", None, None, None)

    def unreachable(*args, **kwargs):
        raise AirflowFailException("version 1 has no Deployment: the routes stay as they are")

    monkeypatch.setattr(steps, "finish", unreachable)
    with pytest.raises(AirflowFailException, match="no Deployment"):
        steps.ensure_stable(PARAMS, "run-a", None, None, None, decided="rollback")
    operator, failed = outbox_reports(monkeypatch, tmp_path)
    for report in (operator, failed):
        assert report["text"].startswith("Stopped digits v2, routes not restored: ")
        assert "takes 100% of traffic again" not in json.dumps(report["blocks"])
        assert "is not shown to take 100% of traffic again" in report["blocks"][1]["text"]["text"]
    assert "left as they are" in operator["text"]
    assert failed["text"].endswith(
        "decide chose rollback, which did not finish; its teardown could not put version 1 back (the run's "
        "failure callback tries again, the routes only): "
        "version 1 has no Deployment: the routes stay as they are"
    )
    # A rollback carried out and reported: nothing more is sent.
    with pytest.raises(AirflowFailException, match="no Deployment"):
        steps.ensure_stable(PARAMS, "run-a", None, "1", {"channel": "C1", "ts": "1"}, decided="rollback")
    assert len(outbox_reports(monkeypatch, tmp_path)) == 2


def test_a_rollback_after_decide_marked_success_by_hand_is_reported(monkeypatch, tmp_path):
    """decide marked success in the UI: it chose nothing, so neither branch was skipped; promote
    refused (failed), rollback put the stable version back, and notify, downstream of the failed
    promote, never ran. The teardown failed the run "its report was not sent (see notify's log)",
    a log that does not exist, and Slack was never told the candidate was rolled back. The
    teardown now sends the report itself, then fails the run saying so."""
    outbox_reports(monkeypatch, tmp_path)
    done = "version 1 takes 100%; version 2 is unloaded"
    monkeypatch.setattr(steps, "finish", lambda *a, **k: (False, done))
    with pytest.raises(AirflowFailException, match="notify did not send the run's report: the teardown sent it"):
        steps.ensure_stable(PARAMS, "run-a", None, done, None, decided=None)
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert report["text"].startswith("Rolled back digits v2: decide chose nothing (marked success by hand?)")
    assert "version 1 takes 100%" in report["text"]


@pytest.mark.parametrize("second", [FAIL, None])
def test_a_rollback_report_names_the_stage_that_rolled_it_back(monkeypatch, tmp_path, second):
    """The DAG's rollback report said "was rolled back." where rolloutctl run's says at which
    stage: one whose verdict failed, or one that ended on a tripped guard (no verdict)."""
    outbox_reports(monkeypatch, tmp_path)
    full = {"checks": [], "look": 1, "looks": 5, "alpha": 0.05, "nominal_alpha": 1e-4, "spending": "pocock"}
    verdicts = [{**PASS, **full}, second and {**second, **full}, None, None]
    steps.notify(PARAMS, "rollback", "the 100% stage: hard guard tripped", verdicts)
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert "was rolled back at the 100% stage. Version 1 takes 100%" in report["blocks"][1]["text"]["text"]


def test_a_promotion_in_effect_whose_promote_did_not_finish_is_reported(monkeypatch, tmp_path):
    """promote's routes and the baseline's retirement in effect, promote itself not finished (its
    worker killed after its last write): the teardown kept the promotion, as it must, and failed
    the run with "its report was not sent (see notify's log)"; notify had not run, and Slack
    never heard the candidate took all of the traffic."""
    outbox_reports(monkeypatch, tmp_path)
    monkeypatch.setattr(steps, "finish", lambda *a, **k: (True, "version 2 was promoted: nothing to restore"))
    with pytest.raises(AirflowFailException, match="decide chose promote, which did not finish"):
        steps.ensure_stable(PARAMS, "run-a", None, None, None, decided="promote")
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert report["text"] == (
        "digits v2 against v1 promoted: version 2 takes 100%. Reason: decide chose promote, which did not "
        "finish; version 2 was promoted: nothing to restore"
    )
    # promote finished and notify reported it: the teardown sends nothing more.
    assert steps.ensure_stable(PARAMS, "run-a", "2", None, {"channel": "C1", "ts": "1"}, decided="promote")
    assert len(outbox_reports(monkeypatch, tmp_path)) == 1


def test_a_report_links_to_its_airflow_run_and_says_where_the_rollout_acted(monkeypatch, tmp_path):
    """A report in Slack named neither the run nor what it changed: a reviewer searched Airflow
    for the run to read its logs. With Airflow's base URL set it links the run's page; without
    one it links nothing (no localhost guess)."""
    import types

    import airflow.sdk

    outbox_reports(monkeypatch, tmp_path)
    run = types.SimpleNamespace(dag_id="model_rollout", run_id="manual__2026-01-01T00:00:00+00:00")
    monkeypatch.setattr(airflow.sdk, "get_current_context", lambda: {"dag_run": run})
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/ml/")
    steps.notify(PARAMS, "rollback", "the 50% stage: hard guard tripped", [None])
    monkeypatch.delenv("AIRFLOW__API__BASE_URL")
    steps.notify(PARAMS, "rollback", "the 50% stage: hard guard tripped", [None])
    linked, unlinked = (
        [f["text"] for b in r["blocks"] for f in b.get("fields", [])] for r in outbox_reports(monkeypatch, tmp_path)
    )
    assert linked == [
        "*Airflow run*\n<https://airflow.example.com/ml/dags/model_rollout/runs/"
        "manual__2026-01-01T00%3A00%3A00%2B00%3A00|manual__2026-01-01T00:00:00+00:00>",
        "*Where*\nmodel digits, version 2 against 1, mesh local, model server http://127.0.0.1:9",
    ]
    assert unlinked == linked[1:]


def test_a_report_masks_what_airflow_masks_in_task_logs(monkeypatch, tmp_path):
    """A report quoting an error that quotes a connection's password (a server echoing its
    Authorization, a client's message) sent it to Slack: Airflow masks it in the task log only."""
    from airflow.sdk.log import mask_secret

    outbox_reports(monkeypatch, tmp_path)
    mask_secret("admin-T0ken-from-the-connection")
    reason = "the 50% stage: the server answered 401: token admin-T0ken-from-the-connection refused"
    steps.notify(PARAMS, "rollback", reason, [None])
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert "admin-T0ken" not in json.dumps(report)
    assert report["text"].endswith("the server answered 401: token *** refused")


def test_a_masked_secret_holding_amp_lt_or_gt_is_masked_in_the_reports_blocks(monkeypatch, tmp_path):
    """A password with ``&``, ``<`` or ``>`` reached Slack in the report's blocks: they carry it
    escaped for mrkdwn (``&amp;``), a form Airflow's masker does not know; only the fallback
    text, escaped later, was masked."""
    from airflow.sdk.log import mask_secret

    outbox_reports(monkeypatch, tmp_path)
    mask_secret("pa&ss<w0rd>from-the-connection")
    reason = "the 50% stage: the server answered 401: password pa&ss<w0rd>from-the-connection refused"
    steps.notify(PARAMS, "rollback", reason, [None])
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert "w0rd" not in json.dumps(report)
    assert report["blocks"][1]["text"]["text"].endswith("password *** refused")


def test_a_report_that_cannot_be_built_goes_out_in_plain_words(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("a verdict this code cannot read")

    monkeypatch.setattr("vision_rollout.notify.rollback_message", broken)
    outbox_reports(monkeypatch, tmp_path)
    verdict = {**FAIL, "checks": [], "look": 1, "looks": 5, "alpha": 0.05, "nominal_alpha": 1e-4, "spending": "pocock"}
    reason = "the 50% stage: FAIL: canary P99 regressed 40%\n<!channel> *Verdict:* PASS"
    sent = steps.notify(PARAMS, "rollback", reason, [verdict])
    assert "outbox" in sent
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert report["text"] == (
        "digits v2 against v1 rolled back: version 1 takes 100% again. "
        "Reason: the 50% stage: FAIL: canary P99 regressed 40% <!channel> *Verdict:* PASS"
    )
    # (the reason on one line; in Slack's mrkdwn, escaped)
    assert report["blocks"][0]["text"]["text"].endswith("40% &lt;!channel&gt; *Verdict:* PASS")


def test_a_promotion_report_says_who_approved_it_and_what_the_shadow_audit_showed(monkeypatch, tmp_path):
    """The promotion report left out the decision's reason: the approver and the shadow audit's
    agreement never reached Slack, only "passed every stage"."""
    outbox_reports(monkeypatch, tmp_path)
    params = {**PARAMS, "require_approval": True}
    verdict = {**PASS, "checks": [], "look": 1, "looks": 5, "alpha": 0.05, "nominal_alpha": 1e-4, "spending": "pocock"}
    outcome, reason = decide(params, [verdict, verdict], AGREES, approval=ALICE)
    assert outcome == "promote"
    steps.notify(params, outcome, reason, [verdict, verdict])
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert report["blocks"][1]["text"]["text"].endswith(
        "*Decision:* every stage passed; shadow audit: top-1 agreement 97.10% (interval 96.2-97.8%); approved by Alice"
    )


def test_a_promotion_awaiting_approval_is_announced_in_slack(monkeypatch, tmp_path):
    """With require_approval the question waited in Airflow's Required Actions alone: nobody was
    told in Slack, and 24 hours without an answer rolled the candidate back. Once the request is
    written, Slack (here the outbox) is told, with the evidence and where to answer."""
    import types

    from airflow.providers.standard.operators import hitl

    from rollout_airflow.operators import PromotionApproval

    outbox_reports(monkeypatch, tmp_path)
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kwargs: None)
    monkeypatch.setattr(steps, "hold", lambda *args, **kwargs: None)
    params = {**PARAMS, "require_approval": True, "mirror_percent": 0}
    verdict = {**PASS, "checks": [], "look": 1, "looks": 5, "alpha": 0.05, "nominal_alpha": 1e-4, "spending": "pocock"}
    run = XComs()
    for i in (1, 2):
        run.of(f"stage_{i}.statistical_gate").xcom_push("return_value", verdict)
    task = PromotionApproval(task_id="approve_promotion", max_stages=4)
    context = {"params": params, "ti": run, "run_id": "manual__1", "task_instance": types.SimpleNamespace(id="ti-1")}
    from airflow.sdk.exceptions import TaskDeferred

    from rollout_airflow.triggers import GuardedApprovalTrigger

    run.of("stage_2.apply_mesh_weights").xcom_push("return_value", {"weight": 100, "started": 1000.0})
    with pytest.raises(TaskDeferred) as deferred:  # (the task waits for the answer, the guards read on)
        task.execute(context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, GuardedApprovalTrigger)
    assert (trigger.since, trigger.rollout, trigger.defaults) == (1000.0, params, ["Roll back"])
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert report["text"] == "Approval needed: promote digits v2 to 100%?"
    text = report["blocks"][1]["text"]["text"]
    assert "Required Actions (run manual__1, task approve_promotion); no answer within 24 h rolls back." in text
    assert text.endswith("*Evidence:* every stage passed")
    assert "*100%*: PASS at look 1 of 5." in json.dumps(report["blocks"])


def test_a_mirror_that_samples_no_probe_id_fails_with_a_reason(monkeypatch, tmp_path, models_dir):
    """A tiny mirror_percent (0.01: one id in 10,000) left the probe's search of 10,000 random ids
    empty about a third of the time, and enable_shadow failed with a bare StopIteration. Here the
    mirror samples no id at all: the search ends in a failure that says why."""
    from model_server import traffic

    real_bucket = traffic.bucket
    monkeypatch.setattr(
        traffic, "bucket", lambda key: traffic.BUCKETS - 1 if key.startswith("mirror:") else real_bucket(key)
    )
    local_connection(monkeypatch, tmp_path, repository=str(models_dir))
    params = {**PARAMS, "mirror_percent": 0.01}
    spec = steps.spec_from(params)

    class Routes:
        def get_routes(self):
            return spec.policy_for_stage(50)

    monkeypatch.setattr(steps, "router", lambda *args: Routes())
    steps.serving().model_lock("digits", "local").acquire("run-a")
    with pytest.raises(AirflowFailException, match=r"sampled by the mirror \(0.01% to version 2\)"):
        steps.enable_shadow(params, "run-a")


@pytest.fixture
def slack(monkeypatch):
    """The fake Slack API, as the Slack connection."""
    from tests.fakes.slack_api import FakeSlack

    fake = FakeSlack().start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_API_DEFAULT",
        json.dumps({"conn_type": "slack", "password": fake.token, "extra": {"base_url": fake.base_url}}),
    )
    yield fake
    fake.stop()


@pytest.mark.parametrize("stop", ["killed", "stopped"])
def test_notify_stopped_once_slack_took_its_post_and_retried_posts_the_report_once(monkeypatch, tmp_path, slack, stop):
    """notify killed (a worker lost) or stopped (Airflow's SIGTERM, its timeout) right after Slack
    answered its post: nothing was in the outbox, and its retry posted the report a second time.
    The report goes to the outbox first and is sent by the outbox's own sender: the retry finds
    the post (its mark, or the channel's history) and posts nothing more; a third try neither."""
    from slack_sdk import WebClient

    class Killed(BaseException):
        pass

    extra = {"run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    real_post = WebClient.chat_postMessage

    def posted_then_stopped(self, **kwargs):
        real_post(self, **kwargs)
        raise Killed if stop == "killed" else KeyboardInterrupt

    from vision_rollout.folders import Folder

    real_delete = Folder.delete
    with monkeypatch.context() as m:
        m.setattr(WebClient, "chat_postMessage", posted_then_stopped)
        if stop == "killed":  # (a killed process removes nothing: its claim stays)
            m.setattr(Folder, "delete", lambda self, n: None if ".claim-" in n else real_delete(self, n))
        with pytest.raises((Killed, KeyboardInterrupt)):
            steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")
    assert len(slack.messages()) == 1
    again = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")
    assert "slack_error" not in again
    assert again["posted_before"] is True
    (posted,) = slack.messages()
    assert posted["text"].startswith("Promoted digits v2 to 100%")
    assert steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")["ts"] == again["ts"]
    assert len(slack.messages()) == 1
    assert not list((tmp_path / "run" / "outbox").glob("*.json"))


def run_folder_conn(monkeypatch, tmp_path) -> None:
    """The model server's connection: its run folder in ``tmp_path``, no server behind it."""
    extra = {"run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))


def finished_with(monkeypatch, kept: bool, done: str) -> dict:
    """``steps.finish`` replaced by one that found ``kept`` and did ``done``: what it was given."""
    given: dict = {}

    def finish(*args, **kwargs):
        given.update(kwargs)
        return kept, done

    monkeypatch.setattr(steps, "finish", finish)
    return given


@pytest.mark.parametrize("recorded", [True, False])
def test_a_teardown_whose_notify_was_lost_once_slack_took_its_report_posts_nothing_more(
    monkeypatch, tmp_path, slack, recorded
):
    """notify's worker killed once Slack took its post (after it kept the post in the run
    folder, or before: ``recorded``): no XCom, so the teardown sent a second report, unthreaded,
    saying notify sent none. It takes notify's post now (kept, or found in the channel's
    history), for the run's end as well, and posts nothing more."""
    run_folder_conn(monkeypatch, tmp_path)
    first = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")  # (its XCom lost)
    record = tmp_path / "run" / "rollouts" / "digits" / "run-a" / steps.RUN_REPORT
    if not recorded:
        record.write_text(json.dumps({"report": json.loads(record.read_text())["report"], "queued": time.time() - 5}))
    done = "version 2 was promoted: nothing to restore"
    given = finished_with(monkeypatch, True, done)
    assert steps.ensure_stable(PARAMS, "run-a", "2", None, None, "promote") == done
    (posted,) = slack.messages()
    assert posted["text"].startswith("Promoted digits v2 to 100%")
    if recorded:  # (the run's end keeps it: notify cleared afterwards replies in its thread)
        assert (given["report"]["channel"], given["report"]["ts"]) == (first["channel"], first["ts"])


def test_a_teardown_does_not_say_a_report_another_sender_holds_did_not_reach_slack(monkeypatch, tmp_path):
    """notify's report held by another sender past notify's budget (the shadow audit's round
    posting it): the teardown failed the run saying the report did not reach Slack, which that
    sender may have made it do. It says what is known: not known to have reached Slack."""
    run_folder_conn(monkeypatch, tmp_path)
    finished_with(monkeypatch, False, "version 1 takes 100%; version 2 is unloaded")
    held = "another sender is sending it: not known within the budget whether Slack took it"
    report = {"outbox": str(tmp_path / "r.json"), "slack_error": held, "maybe_posted": True}  # (notify's answer)
    with pytest.raises(AirflowFailException) as failed:
        steps.ensure_stable(PARAMS, "run-a", None, "1", report, "rollback")
    assert "did not reach Slack" not in str(failed.value)
    assert f"its report is not known to have reached Slack ({held}): it is in the outbox" in str(failed.value)


def test_a_report_another_sender_posted_its_post_not_found_is_not_posted_again(monkeypatch, tmp_path, slack):
    """notify's report posted by another sender (the shadow audit's round), its post not found in
    the channel (made without its metadata, say): notify answered maybe_posted, and the run folder
    kept nothing of it, so the teardown, notify's answer lost, posted the report a second time.
    The run folder keeps that answer, which stands for notify's."""
    from vision_rollout import notify

    run_folder_conn(monkeypatch, tmp_path)
    with monkeypatch.context() as m:  # (as send_report answers it)
        m.setattr(notify, "send_report", lambda notifier, *args: {"channel": notifier.channel, "maybe_posted": True})
        sent = steps.notify(PARAMS, "rollback", "the 50% stage: FAIL", [FAIL, None], None, "run-a")
    assert sent["maybe_posted"] is True
    done = "version 1 takes 100%; version 2 is unloaded"
    finished_with(monkeypatch, False, done)
    assert steps.ensure_stable(PARAMS, "run-a", None, "1", None, "rollback") == done  # (notify's answer lost)
    assert slack.messages() == []
    assert steps.notify(PARAMS, "rollback", "the 50% stage: FAIL", [FAIL, None], None, "run-a") == sent
    assert slack.messages() == []


def test_the_run_s_end_keeps_the_post_of_notify_s_report_the_teardown_found_in_the_channel(
    monkeypatch, tmp_path, slack
):
    """notify's worker killed once Slack took its post, before the run folder kept it: the
    teardown found that post in the channel only after it wrote the run's end (``ENDED``), which
    kept no post, so notify cleared afterwards sent its report again outside that post's thread.
    The end keeps the post the teardown found."""
    run_folder_conn(monkeypatch, tmp_path)
    first = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")  # (its XCom lost)
    record = tmp_path / "run" / "rollouts" / "digits" / "run-a" / steps.RUN_REPORT
    record.write_text(json.dumps({"report": json.loads(record.read_text())["report"], "queued": time.time() - 5}))
    done = "version 2 was promoted: nothing to restore"

    def finish(params, run_id, promoted, **kwargs):  # (as finish writes the end: notify's post not known)
        assert kwargs["report"] is None
        end = {"holder": run_id, "decided": "promote", "promoted": True, "done": done}
        (record.parent / steps.ENDED).write_text(json.dumps(end))
        return True, done

    monkeypatch.setattr(steps, "finish", finish)
    assert steps.ensure_stable(PARAMS, "run-a", "2", None, None, "promote") == done
    end = steps.run_ended(steps.spec_from(PARAMS), "run-a")
    assert end["report"] == {"channel": first["channel"], "ts": first["ts"]}
    assert len(slack.messages()) == 1


def test_a_teardown_whose_notify_was_killed_mid_send_leaves_its_report_to_the_outbox(monkeypatch, tmp_path, slack):
    """notify's worker killed right after Slack answered its post, before its mark: the report
    and the sender's claim stay in the outbox, and the teardown posted a second report. It posts
    nothing now and fails the run as for a report not known to have reached Slack (not saying it
    did not: Slack took it): the outbox's round looks for the post before sending it."""
    from slack_sdk import WebClient

    from vision_rollout.folders import Folder

    class Killed(BaseException):
        pass

    run_folder_conn(monkeypatch, tmp_path)
    real_post, real_delete = WebClient.chat_postMessage, Folder.delete

    def posted_then_killed(self, **kwargs):
        real_post(self, **kwargs)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(WebClient, "chat_postMessage", posted_then_killed)
        m.setattr(Folder, "delete", lambda self, n: None if ".claim-" in n else real_delete(self, n))
        with pytest.raises(Killed):
            steps.notify(PARAMS, "rollback", "the 50% stage: FAIL", [FAIL, None], None, "run-a")
    finished_with(monkeypatch, False, "version 1 takes 100%; version 2 is unloaded")
    with pytest.raises(
        AirflowFailException, match=r"is not known to have reached Slack \(its sender stopped .*it is in the outbox"
    ):
        steps.ensure_stable(PARAMS, "run-a", None, "1", None, "rollback")
    assert len(slack.messages()) == 1
    assert len(list((tmp_path / "run" / "outbox").glob("*.json"))) == 1


def test_a_teardown_waits_for_the_report_another_sender_is_posting(monkeypatch, tmp_path, slack):
    """notify's worker killed once it wrote its report, while another sender (the shadow audit's
    round, a try on another worker) held a live claim on it, posting it: the teardown took the
    report for one its sender left, and failed the run saying it did not reach Slack. It waits
    for that sender now (once the stable version is back), and takes its post."""
    import uuid

    from slack_sdk import WebClient

    from vision_rollout import notify
    from vision_rollout.folders import Folder

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    run_folder_conn(monkeypatch, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(notify, "_send_round", killed)  # (killed once it wrote its report, before its round)
        with pytest.raises(Killed):
            steps.notify(PARAMS, "rollback", "the 50% stage: FAIL", [FAIL, None], None, "run-a")
    outbox = Folder(str(tmp_path / "run" / "outbox"))
    (name,) = outbox.names()
    theirs = f"{name.removesuffix('.json')}.claim-{time.time_ns()}-{uuid.uuid4().hex[:12]}"
    outbox.write(theirs, b"")  # (another sender's, posting it now)
    real_sleep = time.sleep

    def their_post(seconds):  # (the other sender done while the teardown waits for it)
        if outbox.exists(theirs):
            outbox.delete(theirs)
            notify.send_waiting(outbox, WebClient(token=slack.token, base_url=slack.base_url))
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", their_post)
    done = "version 1 takes 100%; version 2 is unloaded"
    finished_with(monkeypatch, False, done)
    assert steps.ensure_stable(PARAMS, "run-a", None, "1", None, "rollback") == done
    (posted,) = slack.messages()
    assert posted["text"].startswith("Rolled back digits v2")
    assert outbox.names() == []


@pytest.mark.parametrize("recorded", [True, False])
def test_a_teardown_that_undid_the_decision_notify_posted_reports_it_though_notify_was_lost(
    monkeypatch, tmp_path, slack, recorded
):
    """notify posted "Promoted", its XCom lost with its worker, and the teardown found no
    promotion in effect (promote marked success by hand) and put version 1 back: Slack is told,
    in a report of its own, whether or not the run folder kept notify's post."""
    run_folder_conn(monkeypatch, tmp_path)
    steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")
    record = tmp_path / "run" / "rollouts" / "digits" / "run-a" / steps.RUN_REPORT
    if not recorded:
        record.write_text(json.dumps({"report": json.loads(record.read_text())["report"], "queued": time.time() - 5}))
    finished_with(monkeypatch, False, "version 1 takes 100%; version 2 is unloaded")
    with pytest.raises(AirflowFailException, match="decide chose promote, which did not finish"):
        steps.ensure_stable(PARAMS, "run-a", None, None, None, "promote")
    assert [m["text"][:11] for m in slack.messages()] == ["Promoted di", "Rolled back"]


def test_a_teardown_whose_notify_could_not_write_its_report_sends_one(monkeypatch, tmp_path, slack):
    """notify's outbox write failing (a full disk) after it named its report in the run folder:
    nothing reached Slack. The teardown looks for that report in the channel, finds none, and
    posts its own (straight, the outbox taking nothing still), failing the run saying so."""
    import errno

    from vision_rollout.folders import Folder

    run_folder_conn(monkeypatch, tmp_path)
    real_write = Folder.write

    def full(self, name, data):
        if str(self).endswith("outbox"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, data)

    with monkeypatch.context() as m:
        m.setattr(Folder, "write", full)
        with pytest.raises(OSError, match="No space left"):
            steps.notify(PARAMS, "rollback", "the 50% stage: FAIL", [FAIL, None], None, "run-a")
        assert slack.messages() == []
        finished_with(monkeypatch, False, "version 1 takes 100%; version 2 is unloaded")
        with pytest.raises(AirflowFailException, match="notify did not send the run's report: the teardown sent it"):
            steps.ensure_stable(PARAMS, "run-a", None, "1", None, "rollback")
    (posted,) = slack.messages()
    assert posted["text"].startswith("Rolled back digits v2: decide chose rollback; version 1 takes 100%")


@pytest.mark.parametrize(("step", "failing"), [("delete", ".posted"), ("delete", ".claim-"), ("write", ".posted")])
def test_a_teardown_whose_report_slack_took_posts_no_second_one_when_the_outbox_fails_after(
    monkeypatch, tmp_path, slack, caplog, step, failing
):
    """The teardown posting the run's report under notify's name (notify's outbox write failed),
    the outbox failing once Slack took it (the write of its mark, the removal of its mark or its
    claim): the report gone from the outbox, the teardown took the error for the outbox refusing
    its write and posted the report a second time, straight; then it raised the error, and the
    run's end (``ENDED``) kept no post: a reviewer could not find it, nor notify cleared
    afterwards reply in its thread. It posts once, the run's end keeps the post, the outbox's
    error is logged, and the run fails as for a report notify did not send; a report whose mark
    was not written waits with its sender's claim, for a later round to look for its post."""
    import errno
    import logging

    from vision_rollout.folders import Folder
    from vision_rollout.notify import report_name

    run_folder_conn(monkeypatch, tmp_path)
    record = tmp_path / "run" / "rollouts" / "digits" / "run-a" / steps.RUN_REPORT
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"report": report_name(), "queued": time.time() - 5}))  # (its outbox write failed)
    real = getattr(Folder, step)

    def failing_step(self, name, *args):
        if failing in name:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, name, *args)

    monkeypatch.setattr(Folder, step, failing_step)
    done = "version 1 takes 100%; version 2 is unloaded"

    def finish(params, run_id, promoted, **kwargs):  # (as finish writes the end: no report known yet)
        end = {"holder": run_id, "decided": "rollback", "promoted": False, "done": done}
        (record.parent / steps.ENDED).write_text(json.dumps(end))
        return False, done

    monkeypatch.setattr(steps, "finish", finish)
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(AirflowFailException, match="notify did not send the run's report: the teardown sent it"),
    ):
        steps.ensure_stable(PARAMS, "run-a", None, "1", None, "rollback")
    (posted,) = slack.messages()
    assert posted["text"].startswith("Rolled back digits v2")
    end = steps.run_ended(steps.spec_from(PARAMS), "run-a")
    assert end["report"] == {"channel": "C0ROLLOUT", "ts": slack.history["C0ROLLOUT"][0]["ts"]}
    assert "but the outbox failed after: [Errno 5] Input/output error" in caplog.text
    if step == "write":  # (left for a later round, which looks for its post first)
        left = sorted(p.name.split(".", 1)[1][:5] for p in (tmp_path / "run" / "outbox").iterdir())
        assert left == ["claim", "json"]


def test_a_teardown_that_cannot_look_for_notifys_post_nor_keep_its_report_posts_nothing(monkeypatch, tmp_path, slack):
    """Notify posted, its answer lost before its post was kept (the run folder names its report
    only); at the teardown Slack does not answer the look-up for that post and the outbox is full:
    the report, which may have been posted, could not be kept to be looked for again, and the
    teardown took that for an outbox refusing a report never sent and posted a second one. It
    posts nothing, the run failed saying the report is not known to have reached Slack."""
    import errno

    from vision_rollout.folders import Folder

    run_folder_conn(monkeypatch, tmp_path)
    steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")
    record = tmp_path / "run" / "rollouts" / "digits" / "run-a" / steps.RUN_REPORT
    record.write_text(json.dumps({"report": json.loads(record.read_text())["report"], "queued": time.time() - 5}))
    slack.lose = {"conversations.history": 50}  # (no answer to the look-up for a while)
    real_write = Folder.write

    def full(self, name, data):
        if str(self).endswith("outbox"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, data)

    monkeypatch.setattr(Folder, "write", full)
    finished_with(monkeypatch, True, "version 2 was promoted: nothing to restore")
    with pytest.raises(
        AirflowFailException, match=r"not known to have reached Slack .*cannot be kept in the outbox"
    ) as e:
        steps.ensure_stable(PARAMS, "run-a", "2", None, None, "promote")
    assert "nothing will send it or look for it: look for it in #model-rollouts and post it by hand" in str(e.value)
    assert "in the outbox, None" not in str(e.value)
    assert [m["text"] for m in slack.messages()] == ["Promoted digits v2 to 100%"]


def test_a_report_slack_took_is_posted_once_though_its_post_cannot_be_kept(monkeypatch, tmp_path, slack):
    """A full disk once Slack took notify's post: the run folder's record of that post could not
    be written, notify failed, and the teardown, meeting the same full disk when it found the post,
    posted a report of its own (a second, unthreaded) and failed the run. Slack has the post: it
    is the answer (a later try finds it in the channel), nothing more is posted."""
    import errno

    from vision_rollout.folders import Folder

    run_folder_conn(monkeypatch, tmp_path)
    real_write = Folder.write

    def full(self, name, data):
        if name == steps.RUN_REPORT and b'"ts"' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, data)

    with monkeypatch.context() as m:
        m.setattr(Folder, "write", full)
        sent = steps.notify(PARAMS, "rollback", "the 50% stage: FAIL", [FAIL, None], None, "run-a")
        assert "ts" in sent
        finished_with(monkeypatch, False, "version 1 takes 100%; version 2 is unloaded")
        # (notify's answer lost with its worker: the teardown finds its post in the channel)
        assert steps.ensure_stable(PARAMS, "run-a", None, "1", None, "rollback").startswith("version 1 takes 100%")
    assert len(slack.messages()) == 1


def test_rollback_cleared_after_the_end_reads_what_serves_once(monkeypatch, tmp_path):
    """rollback cleared once its run ended, the candidate routed again since: it read the routes
    twice, once to find them changed and again for its message (which could then name routes
    other than those it judged). One read now, named in the refusal."""
    run_folder_conn(monkeypatch, tmp_path)
    spec = steps.spec_from(PARAMS)
    reads = []

    class Routes:
        def get_routes(self):
            reads.append(1)
            return spec.policy_for_stage(50)

    monkeypatch.setattr(steps, "router", lambda *args, **kwargs: Routes())
    end = {"holder": "run-a", "decided": "rollback", "promoted": False, "done": "version 1 takes 100%"}
    with pytest.raises(AirflowFailException, match=r'it is not what serves now: \{"route".*"weight": 50'):
        steps.carried_out(spec, "run-a", end, "rollback")
    assert len(reads) == 1


def test_notify_without_a_slack_token_writes_its_report_to_the_outbox_once(monkeypatch, tmp_path):
    """No Slack token: notify's report lands in the outbox, and a retry of notify leaves one copy."""
    extra = {"run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_API_DEFAULT", raising=False)
    first = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")
    again = steps.notify(PARAMS, "promote", "every stage passed", [PASS, PASS], None, "run-a")
    assert first["outbox"] == again["outbox"]
    assert len(list((tmp_path / "run" / "outbox").glob("*.json"))) == 1


def test_an_audit_report_slack_did_not_take_fails_the_task_and_its_retry_sends_it(monkeypatch, tmp_path, slack):
    """Slack answering 503: the hourly audit's report (a FAIL here) went to the outbox, and the
    task succeeded: nobody was told, and nothing in the task said so. The task fails; its retry
    sends the report from the outbox, once: the hour is not audited again into a second copy."""
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowException, AirflowSkipException

    from tests.support import shadow_log

    now = datetime.now(UTC)
    log = shadow_log(tmp_path, 120, disagree=0.3, at=(now - timedelta(hours=2)).timestamp())
    extra = {"shadow_log": str(log), "run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    slack.outage = 503
    end = now - timedelta(hours=1)  # (the hour before it holds the records)
    with pytest.raises(AirflowException, match=r"the fail audit of 'digits' is in .*report\.md, but") as failed:
        steps.audit_hours("digits", end)
    assert not isinstance(failed.value, AirflowFailException)  # (retried)
    assert "upstream connect error" in str(failed.value)
    assert len(list((tmp_path / "run" / "outbox").glob("*.json"))) == 1
    with pytest.raises(AirflowException, match=r"\.json waits in the outbox: SlackApiError"):  # Slack still down
        steps.audit_hours("digits", end, retry=True)
    assert len(list((tmp_path / "run" / "outbox").glob("*.json"))) == 1  # (no second copy)
    slack.outage = None
    assert steps.audit_hours("digits", end, retry=True) == []  # its hour is audited: the outbox sends it
    (posted,) = slack.messages()
    assert posted["text"] == "Shadow audit digits: FAIL"
    assert not list((tmp_path / "run" / "outbox").glob("*.json"))
    with pytest.raises(AirflowSkipException):  # the next hour's run: nothing in its hour, nothing sent again
        steps.audit_hours("digits", end + timedelta(hours=1), catch_up_hours=1)
    assert len(slack.messages()) == 1


def test_an_outbox_report_slack_refuses_for_good_fails_one_audit_run_not_every_hour(monkeypatch, tmp_path, slack):
    """A report for a mistyped channel (channel_not_found) stayed in the outbox: every hourly
    shadow_audit of every model sent it again and failed, until someone deleted the file by hand.
    The run that finds it fails once, saying it is set aside; the next hour's run does not."""
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowException, AirflowSkipException

    from tests.support import shadow_log

    now = datetime.now(UTC)
    log = shadow_log(tmp_path, 120, disagree=0.3, at=(now - timedelta(hours=2)).timestamp())
    extra = {"shadow_log": str(log), "run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    slack.outage = 503
    end = now - timedelta(hours=1)
    with pytest.raises(AirflowException):
        steps.audit_hours("digits", end)
    slack.outage = None
    slack.refuse = {"chat.postMessage": "channel_not_found"}
    with pytest.raises(AirflowException, match=r"\.json set aside in the outbox's refused/.*channel_not_found"):
        steps.audit_hours("digits", end, retry=True)
    assert len(list((tmp_path / "run" / "outbox" / "refused").glob("*.json"))) == 1
    with pytest.raises(AirflowSkipException):  # the next hour's run: nothing to fail on
        steps.audit_hours("digits", end + timedelta(hours=1), catch_up_hours=1)


def test_an_outbox_round_that_cannot_use_the_slack_connection_says_why(monkeypatch, tmp_path, caplog):
    """The Slack connection unusable (a token with a space in it), the outbox's round returned
    without a word: its reports waited, and nothing in the log said why."""
    from vision_rollout.folders import Folder
    from vision_rollout.notify import SlackNotifier, rollback_message
    from vision_rollout.spec import RolloutSpec

    extra = {"run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_API_DEFAULT", json.dumps({"conn_type": "slack", "password": "xoxb-secret token"})
    )
    SlackNotifier("#c", outbox=Folder(str(tmp_path / "run" / "outbox"))).send(
        rollback_message(RolloutSpec.from_dict({}), "waiting")
    )
    caplog.set_level("INFO")
    assert steps.send_outbox() == []
    (line,) = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    assert line.startswith("the outbox's 1 report(s) are not sent: the slack_api_default connection cannot be used")
    assert "secret" not in caplog.text


def test_a_retried_audit_sends_again_only_what_slack_did_not_take(monkeypatch, tmp_path, slack):
    """A try that reported its own hour but not an earlier one failed; its retry audited and
    posted its own hour again: Slack had the same report twice."""
    from datetime import UTC, datetime, timedelta

    from tests.support import shadow_log
    from vision_rollout.audit import AUDITED

    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hour = {k: this_hour - timedelta(hours=k) for k in range(3)}
    for k in (2, 1):
        shadow_log(tmp_path, 60, disagree=0.02, seed=k, at=(hour[k] + timedelta(minutes=30)).timestamp())
    run = tmp_path / "run"
    extra = {"shadow_log": str(tmp_path / "log"), "run_dir": str(run)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    steps.audit_hours("digits", hour[0], catch_up_hours=0)  # the failed try: its own hour, hour 1, sent
    assert len(slack.messages()) == 1
    folders = run / "audits" / "digits"
    assert (folders / hour[1].strftime("%Y%m%dT%H") / AUDITED).is_file()
    (results,) = [steps.audit_hours("digits", hour[0], catch_up_hours=1, retry=True)]  # hour 2 was not sent
    assert [r["start"] for r in results] == [hour[2].isoformat()]
    assert len(slack.messages()) == 2  # hour 2's, and hour 1's once
    by_hand = steps.audit_hours("digits", hour[0], catch_up_hours=1)  # a first try: its own hour again
    assert [r["start"] for r in by_hand] == [hour[1].isoformat()]


@pytest.mark.parametrize("stop", ["refused", "killed"])
def test_an_audit_stopped_between_its_post_and_its_mark_is_not_posted_again(monkeypatch, tmp_path, slack, stop):
    """The hourly audit posted its report, then marked the hour audited: a store refusing that
    mark (the task failed) or a worker lost in between left the hour unmarked, and the retry, or
    the next run's catch-up, audited it again and posted the report a second time. The report
    is sent once whoever tries: its record in the hour's folder (``RUN_REPORT``) names it, and a
    later audit of the hour finds its post and posts nothing more; one triggered by hand, of an
    hour marked audited, posts its report anew."""
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowException

    from tests.support import shadow_log
    from vision_rollout.audit import AUDITED
    from vision_rollout.folders import Folder

    class Killed(BaseException):
        pass

    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    shadow_log(tmp_path, 60, disagree=0.02, at=(this_hour - timedelta(minutes=30)).timestamp())
    run = tmp_path / "run"
    extra = {"shadow_log": str(tmp_path / "log"), "run_dir": str(run)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    write = Folder.write

    def refused(self, name, data, *args, **kwargs):
        if name == AUDITED:
            raise OSError("the store refused") if stop == "refused" else Killed()
        return write(self, name, data, *args, **kwargs)

    monkeypatch.setattr(Folder, "write", refused)
    with pytest.raises(AirflowException if stop == "refused" else Killed):
        steps.audit_hours("digits", this_hour, catch_up_hours=0)
    assert len(slack.messages()) == 1
    monkeypatch.setattr(Folder, "write", write)
    hour = run / "audits" / "digits" / (this_hour - timedelta(hours=1)).strftime("%Y%m%dT%H")
    assert not (hour / AUDITED).exists()
    (again,) = steps.audit_hours("digits", this_hour, catch_up_hours=0, retry=True)
    assert (hour / AUDITED).is_file()
    assert len(slack.messages()) == 1  # (found, not posted again)
    assert steps.audit_hours("digits", this_hour, catch_up_hours=0, retry=True) == []
    by_hand = steps.audit_hours("digits", this_hour + timedelta(minutes=30), catch_up_hours=0)
    assert [r["start"] for r in by_hand] == [again["start"]]
    assert len(slack.messages()) == 2  # (audited again by hand: its report posted anew)


def test_an_hour_audited_again_into_a_skip_keeps_no_file_of_its_earlier_report(monkeypatch, tmp_path, slack):
    """An hour audited again by hand once its records were gone (the log's own retention) or no
    mirror was known any more was marked audited as a skip beside the earlier audit's report,
    chart and anomalies, which a reader took for this audit's. Its earlier report's files go."""
    import shutil
    from datetime import UTC, datetime, timedelta

    from tests.support import shadow_log
    from vision_rollout.audit import AUDITED, REPORT

    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    log = shadow_log(tmp_path, 60, disagree=0.3, at=(this_hour - timedelta(minutes=30)).timestamp())
    run = tmp_path / "run"
    extra = {"shadow_log": str(log), "run_dir": str(run)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    (first,) = steps.audit_hours("digits", this_hour, catch_up_hours=0)
    assert first["verdict"] == "fail"
    hour = run / "audits" / "digits" / (this_hour - timedelta(hours=1)).strftime("%Y%m%dT%H")
    assert (hour / REPORT).is_file()
    shutil.rmtree(log)
    with pytest.raises(AirflowSkipException):
        steps.audit_hours("digits", this_hour + timedelta(minutes=30), catch_up_hours=0)
    assert sorted(p.name for p in hour.iterdir()) == [AUDITED]
    assert json.loads((hour / AUDITED).read_text())["verdict"] == "skip"


def test_a_mirror_silent_hour_after_hour_on_a_quiet_model_is_warned_of(monkeypatch, tmp_path, slack):
    """A 1% mirror wholly broken on a model of 500 requests an hour: each hour alone, no copy at
    all is no sign (0.99^500: 0.7%), so every hour was a quiet skip, forever. The hours one after
    another without a shadow record behind the mirror are tested together (their marks keep the
    primaries the mirror could have sampled): the second such hour warns."""
    from datetime import UTC, datetime, timedelta

    from tests.include.test_audit import pods_log

    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    for k in (1, 2):
        at = (this_hour - timedelta(hours=k)).timestamp() + 60
        pods_log(tmp_path, {f"p{k}": ("primary", {1000 * k + i: at + 7 * i for i in range(500)})}, written=at + 3500)
    extra = {"shadow_log": str(tmp_path / "log"), "run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    monkeypatch.setattr(
        steps, "mirror_shares", lambda model, start, end: [(start.timestamp() + 60 * k, 1.0) for k in range(61)]
    )
    earlier, hour = steps.audit_hours("digits", this_hour, catch_up_hours=1)
    assert (earlier["verdict"], hour["verdict"]) == ("skip", "warning")
    assert any("the 1 hours before it" in r for r in hour["reasons"]), hour["reasons"]


def test_the_retry_of_an_audit_triggered_by_hand_audits_its_hour_again(monkeypatch, tmp_path, slack):
    """A run triggered by hand audits the last whole hour again, which the scheduled run had
    marked audited; its first try failed before reporting (the log's store refusing), and its
    retry took that mark for its own try's: it reported nothing, and succeeded. A retry skips
    the hour only where this run marked it (its id in the mark)."""
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowException

    from tests.support import shadow_log

    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    log = shadow_log(tmp_path, 60, disagree=0.3, at=(this_hour - timedelta(minutes=30)).timestamp())
    extra = {"shadow_log": str(log), "run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    steps.audit_hours("digits", this_hour, catch_up_hours=0, run_id="scheduled")
    assert len(slack.messages()) == 1
    by_hand = this_hour + timedelta(minutes=30)
    monkeypatch.setattr("vision_rollout.audit.audit", lambda *a, **kw: (_ for _ in ()).throw(OSError("refused")))
    with pytest.raises(AirflowException, match="refused"):
        steps.audit_hours("digits", by_hand, catch_up_hours=0, run_id="manual")
    monkeypatch.undo()
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    monkeypatch.setenv(
        "AIRFLOW_CONN_SLACK_API_DEFAULT",
        json.dumps({"conn_type": "slack", "password": slack.token, "extra": {"base_url": slack.base_url}}),
    )
    (again,) = steps.audit_hours("digits", by_hand, catch_up_hours=0, retry=True, run_id="manual")
    assert again["verdict"] == "fail"
    assert len(slack.messages()) == 2
    assert steps.audit_hours("digits", by_hand, catch_up_hours=0, retry=True, run_id="manual") == []
    assert len(slack.messages()) == 2


def test_an_audit_triggered_by_hand_reports_the_last_whole_hour_in_its_folder(monkeypatch, tmp_path):
    """A run triggered by hand at 10:30 (its data interval ends when it was triggered) audited
    09:30 to 10:30 and wrote that report over the scheduled run's 09:00 to 10:00 one, in its
    folder (named by the start's hour): the hour's report no longer covered the hour."""
    from datetime import UTC, datetime, timedelta

    from tests.support import shadow_log

    hour_end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    log = shadow_log(tmp_path, 60, disagree=0.02, at=(hour_end - timedelta(minutes=15)).timestamp())
    run = tmp_path / "run"
    extra = {"shadow_log": str(log), "run_dir": str(run)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    range_line = f"- Range: {(hour_end - timedelta(hours=1)).isoformat()} to {hour_end.isoformat()}"
    scheduled = steps.audit_hours("digits", hour_end)[-1]
    by_hand = steps.audit_hours("digits", hour_end + timedelta(minutes=30, seconds=7))[-1]
    assert by_hand["report"] == scheduled["report"]
    assert (by_hand["start"], by_hand["end"]) == (scheduled["start"], scheduled["end"])
    [report] = (run / "audits" / "digits").glob("*/report.md")
    assert report.parent.name == (hour_end - timedelta(hours=1)).strftime("%Y%m%dT%H")
    assert range_line in report.read_text().splitlines()


def test_an_audit_run_catches_up_the_hours_nobody_was_told_of(monkeypatch, tmp_path, slack):
    """Hours the scheduler missed (``catchup`` off: down for a night) were never audited, and an
    hour whose report Slack did not take was sent only by that task's retry. A run sends what
    waits in the outbox, then audits, oldest first, each hour of its catch-up window not marked
    audited, and marks an hour once its report reached Slack or the outbox, or when it had
    nothing to report."""
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowException

    from tests.support import shadow_log
    from vision_rollout.audit import AUDITED

    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hour = {k: this_hour - timedelta(hours=k) for k in range(7)}
    for k in (5, 3, 1):  # records in three hours
        shadow_log(tmp_path, 60, disagree=0.02, seed=k, at=(hour[k] + timedelta(minutes=30)).timestamp())
    run = tmp_path / "run"
    extra = {"shadow_log": str(tmp_path / "log"), "run_dir": str(run)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    slack.outage = 503
    with pytest.raises(AirflowException, match=r"1 of 1 hours not reported: .* did not reach Slack"):
        steps.audit_hours("digits", hour[2], catch_up_hours=0)  # the hour from hour[3], its retries spent
    slack.outage = None
    # Hour 3's report from the outbox, then hours 5 (missed), 4 and 2 (nothing in them) and this
    # run's own, hour 1; hour 6 is outside the window.
    results = steps.audit_hours("digits", hour[0], catch_up_hours=4.0)  # (as the form may give it)
    assert [(r["start"], r["verdict"] == "skip") for r in results] == [
        (hour[5].isoformat(), False),
        (hour[4].isoformat(), True),
        (hour[2].isoformat(), True),
        (hour[1].isoformat(), False),
    ]
    assert len(slack.messages()) == 3
    audits = run / "audits" / "digits"
    assert {p.parent.name for p in audits.glob(f"*/{AUDITED}")} == {hour[k].strftime("%Y%m%dT%H") for k in range(1, 6)}
    assert not (audits / hour[4].strftime("%Y%m%dT%H") / "report.md").exists()  # (nothing to report)
    # The next run finds every hour audited: its own hour alone (triggered by hand, again).
    assert [r["start"] for r in steps.audit_hours("digits", hour[0], catch_up_hours=4)] == [hour[1].isoformat()]
    assert len(slack.messages()) == 4
    with pytest.raises(AirflowFailException, match="catch_up_hours must be 0 to 168, not 169"):
        steps.audit_hours("digits", hour[0], catch_up_hours=169)
    # A channel through the API's conf, past the form's pattern (a search: '$' before a last '\n').
    with pytest.raises(AirflowFailException, match="slack_channel: '#model-rollouts\\\\n' is not a Slack channel"):
        steps.audit_hours("digits", hour[0], "#model-rollouts\n")
    assert len(slack.messages()) == 4


def test_an_hour_is_audited_once_its_last_records_can_be_written():
    """The scheduled run starts as its hour ends, while the replicas' writers still hold its last
    records (one flushes every 60 s at most, its clock up to 60 s behind; a copy waits up to 60 s
    for idle time, on a shadow pod whose clock is up to 60 s ahead; a flush's write after the
    previous one's, 3 s each: ``copy_due``, the hour's close): they were in no audit."""
    from datetime import UTC, datetime, timedelta, timezone

    import pendulum

    from vision_rollout.audit import audited_hour

    ten = datetime(2026, 3, 1, 10, tzinfo=UTC)
    nine = ten - timedelta(hours=1)
    assert audited_hour(ten, ten + timedelta(seconds=3)) == (nine, ten, 186.0)
    assert audited_hour(ten, ten + timedelta(minutes=5)) == (nine, ten, 0.0)
    assert audited_hour(ten + timedelta(minutes=30), ten + timedelta(minutes=30)) == (nine, ten, 0.0)
    paris = datetime(2026, 3, 1, 11, 59, tzinfo=timezone(timedelta(hours=1)))  # 10:59 UTC
    assert audited_hour(paris, ten + timedelta(hours=1))[:2] == (nine, ten)
    # Airflow's data interval is pendulum's
    assert audited_hour(pendulum.datetime(2026, 3, 1, 10, tz="UTC"), ten + timedelta(seconds=3)) == (nine, ten, 186.0)
    with pytest.raises(ValueError, match="timezone-aware"):
        audited_hour(datetime(2026, 3, 1, 10), ten)


@pytest.mark.integration
def test_a_candidate_replaced_after_its_check_is_refused_at_its_load(server_factory, repo_copy, monkeypatch, tmp_path):
    """build_image verified version 2's file, then the model server loaded the file as it was by
    then: one written over it in between (here version 3's bytes, a valid model of the same
    signature) loaded, took the stages, and the report named the digest of bytes never served."""
    import vision_rollout.images

    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    verify = vision_rollout.images.verify_model

    def verify_then_replace(candidate, *args, **kwargs):
        report = verify(candidate, *args, **kwargs)
        candidate.write_bytes((repo_copy / "digits" / "3" / "model.onnx").read_bytes())
        return report

    monkeypatch.setattr(vision_rollout.images, "verify_model", verify_then_replace)
    changed = r"version 2 as the model server loaded it .* is not the file verified .* it changed after its check"
    with pytest.raises(AirflowFailException, match=changed):
        steps.build_image(PARAMS, "run-a")
    admin = steps.serving().settings.admin
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    # The teardown does not run after its setup failed: build_image unloaded it and gave the model back.
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, False)
    assert steps.serving().model_lock("digits", "local").holding() is None


@pytest.mark.integration
@pytest.mark.parametrize("where", ["verify", "load"])
def test_a_first_step_failing_on_an_error_of_no_kind_it_knows_gives_the_model_back(
    server_factory, repo_copy, monkeypatch, tmp_path, where
):
    """build_image failing on an error that is not a refusal (a bug, a disk error while the
    candidate is read, the model server failing its load): the lease stayed this run's, and in
    Airflow nothing else runs after the setup failed (the teardown too is upstream_failed), so
    the model stayed locked until the failure callback or the lease's expiry, the candidate
    loaded. A retry takes it again."""
    import vision_rollout.images
    from vision_rollout.serving import AdminError, ModelServerAdmin

    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    if where == "verify":

        def unreadable(*args, **kwargs):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(vision_rollout.images, "verify_model", unreadable)
        failed = OSError
    else:
        load = ModelServerAdmin.load

        def load_then_fail(self, model, versions):
            load(self, model, versions)
            if len(versions) == 2:  # (answered late: the candidate loaded all the same)
                raise AdminError("model server POST /v2/repository/models/digits/load: timed out")

        monkeypatch.setattr(ModelServerAdmin, "load", load_then_fail)
        failed = AdminError
    outbox = tmp_path / "run" / "outbox"
    with pytest.raises(failed):  # a try Airflow retries: no report yet
        steps.build_image(PARAMS, "run-a", retry_in_s=60)
    assert not list(outbox.glob("*.json"))
    with pytest.raises(failed):  # its last: nothing else of the run runs, so it reports
        steps.build_image(PARAMS, "run-a")
    admin = steps.serving().settings.admin
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, False)
    assert steps.serving().model_lock("digits", "local").holding() is None
    [report] = [json.loads(p.read_text()) for p in outbox.glob("*.json")]
    assert report["text"].startswith("digits v2 against v1 was not rolled out: its first step failed before")
    assert ("Input/output error" if where == "verify" else "timed out") in report["text"]
    monkeypatch.undo()
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    assert steps.build_image(PARAMS, "run-a")["sha256"]  # its retry
    assert steps.serving().model_lock("digits", "local").holding().holder == "run-a"
    assert len(list(outbox.glob("*.json"))) == 1


@pytest.mark.integration
def test_a_first_step_awaiting_its_retry_keeps_the_model_from_another_run(
    server_factory, repo_copy, monkeypatch, tmp_path
):
    """build_image failing on an error its retry may not meet (the model server timing out a
    load) gave the model back, and in the retry's delay (5 minutes) a second run of the model
    took it: the first run's retry then failed for good, "being rolled out by" the second. The
    lease stays the run's until its retry (for the delay and a lease's time, after which it runs
    out if no retry comes), the candidate unloaded meanwhile; the second run is refused touching
    nothing, and the retry takes the model again. Its last try gives it back."""
    from vision_rollout.serving import AdminError, ModelServerAdmin

    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    load = ModelServerAdmin.load

    def load_then_fail(self, model, versions):
        load(self, model, versions)
        if len(versions) == 2:
            raise AdminError("model server POST /v2/repository/models/digits/load: timed out")

    monkeypatch.setattr(ModelServerAdmin, "load", load_then_fail)
    lock = steps.serving().model_lock("digits", "local")
    admin = steps.serving().settings.admin
    with pytest.raises(AdminError):
        steps.build_image(PARAMS, "run-a", retry_in_s=60)
    held = lock.holding()
    assert held.holder == "run-a"
    assert held.seconds >= 60 + 300  # the retry's delay, and a lease's time for it to start
    assert (admin.ready("digits", "1"), admin.ready("digits", "2")) == (True, False)
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    with pytest.raises(AirflowFailException, match=r"model 'digits' is being rolled out by run 'run-a'"):
        steps.build_image(PARAMS, "run-b")
    assert lock.holding().holder == "run-a"
    with pytest.raises(AdminError):  # its last try: the model given back
        steps.build_image(PARAMS, "run-a")
    assert lock.holding() is None
    monkeypatch.setattr(ModelServerAdmin, "load", load)
    assert steps.build_image(PARAMS, "run-b")["sha256"]
    assert lock.holding().holder == "run-b"


def built_and_staged(server_factory, repo_copy, monkeypatch, tmp_path) -> tuple[dict, dict]:
    """A local run past build_image and its first stage's weights: (its build report, the stage's
    apply_mesh_weights XCom)."""
    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    report = steps.build_image(PARAMS, "run-a")
    applied = steps.apply_weights(PARAMS, 0, "run-a", report, report["sha256"])
    assert steps.serving().settings.admin.traffic("digits") == steps.spec_from(PARAMS).policy_for_stage(50)
    return report, applied


@pytest.mark.integration
def test_a_candidate_swapped_for_other_bytes_mid_stage_ends_the_stage(server_factory, repo_copy, monkeypatch, tmp_path):
    """Someone wrote other bytes over version 2's file mid-stage and loaded the model (or its
    server restarted): the server served the new file at the stage's weight, the looks judged
    it as the candidate, and promote carried it to 100%, a file no check saw. The next poke
    puts the stable version back and fails, naming the digests."""
    report, applied = built_and_staged(server_factory, repo_copy, monkeypatch, tmp_path)
    admin = steps.serving().settings.admin
    (repo_copy / "digits" / "2" / "model.onnx").write_bytes((repo_copy / "digits" / "3" / "model.onnx").read_bytes())
    admin.load("digits", [1, 2])  # another's load: version 2 read again
    assert admin.served_sha256("digits", "2") != report["sha256"]
    changed = r"version 2 as the model server loaded it .* is not the file verified .*Version 1 takes 100% again"
    with pytest.raises(AirflowFailException, match=changed):
        steps.look_at_stage(PARAMS, 0, applied, "run-a")
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    with pytest.raises(AirflowFailException, match=changed):  # a cleared wait reports it again
        steps.look_at_stage(PARAMS, 0, applied, "run-a")


@pytest.mark.integration
@pytest.mark.parametrize("read", ["elsewhere", "written", "unsaid"])
def test_a_stage_whose_log_is_not_the_servers_fails_at_its_first_poke(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path, read
):
    """The connection's prediction log existed but the model server wrote elsewhere: each poke
    found no record, and the stage waited out max_stage_seconds with the candidate holding its
    share, then ended undecided; later it failed, but only once the longest flush had passed
    since the weights moved. The model server says where it writes: the first poke fails naming
    both logs, and the stable version takes 100% again. Where that cannot tell (``unsaid``: a
    folder of a server on another machine), once the longest flush has passed since the
    weights moved and a replay round the server answered left no record there."""
    import time

    from vision_rollout import engine

    validation = repo_copy / "digits" / "validation"
    validation.mkdir()
    rows = (models_dir / "digits" / "validation" / "labels.csv").read_text().splitlines()[:5]
    (validation / "labels.csv").write_text("\n".join(rows) + "\n")
    for row in rows[1:]:
        name = row.split(",")[0]
        (validation / name).write_bytes((models_dir / "digits" / "validation" / name).read_bytes())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "written").mkdir()
    s = server_factory(repo_copy, "--prediction-log", str(tmp_path / "written"), token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {
        "run_dir": str(tmp_path / "run"),
        "repository": str(repo_copy),
        "prediction_log": str(tmp_path / ("written" if read == "written" else "elsewhere")),
    }
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    monkeypatch.setenv(
        "AIRFLOW_CONN_PROMETHEUS_DEFAULT", json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": 9})
    )
    monkeypatch.setattr(engine, "MAX_FLUSH_S", 0.0)  # (the log is judged silent WRITE_S into the stage)
    report = steps.build_image(PARAMS, "run-a")
    applied = steps.apply_weights(PARAMS, 0, "run-a", report, report["sha256"])
    if read == "written":  # the log the server writes: the stage goes on at its weight
        time.sleep(max(0.0, applied["started"] + engine.WRITE_S + 0.5 - time.time()))
        assert steps.look_at_stage(PARAMS, 0, applied, "run-a") is None
        assert steps.serving().settings.admin.traffic("digits") == steps.spec_from(PARAMS).policy_for_stage(50)
        return
    if read == "unsaid":
        monkeypatch.setattr(engine, "loopback", lambda address: False)
        assert steps.look_at_stage(PARAMS, 0, applied, "run-a") is None  # (before a flush could have written)
        time.sleep(max(0.0, applied["started"] + engine.WRITE_S + 0.5 - time.time()))
        silent = rf"the prediction log {tmp_path / 'elsewhere'} holds no record of digits since the stage started"
        with pytest.raises(AirflowFailException, match=silent + r".*--prediction-log.*Version 1 takes 100% again"):
            steps.look_at_stage(PARAMS, 0, applied, "run-a")
        return
    elsewhere = rf"the prediction log {tmp_path / 'elsewhere'} is not the one the model server at 127.0.0.1:{s.port}"
    written = f"writes: it writes file://{(tmp_path / 'written').resolve()};"
    # (the masking probe's step too: it looked for the probe's copy there for 30 s)
    with pytest.raises(AirflowFailException, match=elsewhere + ".*" + written + ".*masking probe"):
        steps.enable_shadow(PARAMS, "run-a")
    with pytest.raises(AirflowFailException, match=elsewhere + ".*" + written + r".*Version 1 takes 100% again"):
        steps.look_at_stage(PARAMS, 0, applied, "run-a")
    assert steps.serving().settings.admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}


@pytest.mark.integration
def test_a_candidate_file_written_over_before_promote_is_not_promoted(server_factory, repo_copy, monkeypatch, tmp_path):
    """The candidate's file written over after its stages: promote's load (the baseline's unload)
    read it again, and 100% of the traffic went to bytes no stage judged."""
    report, _ = built_and_staged(server_factory, repo_copy, monkeypatch, tmp_path)
    admin = steps.serving().settings.admin
    (repo_copy / "digits" / "2" / "model.onnx").write_bytes((repo_copy / "digits" / "3" / "model.onnx").read_bytes())
    with pytest.raises(AirflowFailException, match=r"version 2's file .* is not the file verified .*not promoted"):
        steps.promote(PARAMS, "run-a", "promote", report["sha256"])
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert admin.served_sha256("digits", "2") == report["sha256"]  # nothing loaded it again


# -- the hard guards while a promotion awaits its approval -------------------------------------

GUARDED = {**PARAMS, "require_approval": True, "mirror_percent": 0, "p99_ms_max": 60, "p99_breach_seconds": 120}


def p99_since(monkeypatch, since: float, ms: float, loaded: bool = True, restarts: int = 0):
    """Prometheus as the guards see it: the canary's P99 at ``ms`` from ``since`` until now,
    (``loaded``) a model server that reports the candidate loaded now, and its process (serving
    the candidate since ``since``) restarted ``restarts`` times."""
    import time

    from rollout_airflow.hooks import PrometheusHook
    from tests.include.test_metrics import History
    from vision_rollout.metrics import PromQL

    class Serving(History):
        def query(self, promql: str) -> float:
            if "process_start_time_seconds" in promql:
                return float(restarts)
            return 1.0 if loaded and promql == PromQL.loaded("digits", "2") else super().query(promql)

    source = Serving([(t, ms) for t in range(int(since), int(time.time()) + 60, 5)])
    monkeypatch.setattr(PrometheusHook, "source", lambda self: source)
    return source


class Answers:
    """Airflow's record of the question, as the trigger reads and writes it."""

    def __init__(self, monkeypatch, answer_after: int | None = None):
        from airflow.providers.standard.triggers import hitl as trigger_hitl
        from airflow.sdk.execution_time import hitl

        self.reads, self.written, self.answer_after = 0, [], answer_after
        monkeypatch.setattr(trigger_hitl, "get_hitl_detail_content_detail", self.get)
        monkeypatch.setattr(hitl, "update_hitl_detail_response", self.update)

    def answered(self) -> bool:
        return self.answer_after is not None and self.reads > self.answer_after

    def get(self, ti_id):
        import types
        from datetime import UTC, datetime

        self.reads += 1
        if not self.answered():
            return types.SimpleNamespace(response_received=False, chosen_options=None, responded_at=None)
        return types.SimpleNamespace(
            response_received=True,
            chosen_options=["Promote"],
            params_input={},
            responded_at=datetime.now(UTC),
            responded_by_user=types.SimpleNamespace(id="alice", name="Alice"),
        )

    def update(self, ti_id, chosen_options, params_input):
        import types
        from datetime import UTC, datetime

        if self.answer_after is not None and self.reads >= self.answer_after:
            raise RuntimeError("409: already answered")
        self.written.append(chosen_options)
        return types.SimpleNamespace(responded_at=datetime.now(UTC))


def wait_for_answer(since: float, rollout: dict | None = None, deadline=None) -> dict:
    """The trigger as the triggerer runs it (from its serialized form), to its first event."""
    import asyncio
    import uuid

    from airflow.sdk.module_loading import import_string

    from rollout_airflow.triggers import GuardedApprovalTrigger

    trigger = GuardedApprovalTrigger(
        ti_id=uuid.uuid4(),
        options=["Promote", "Roll back"],
        defaults=["Roll back"],
        params={},
        timeout_datetime=deadline,
        poke_interval=0.01,
        rollout=rollout or GUARDED,
        since=since,
        look_s=0.01,
    )
    path, kwargs = trigger.serialize()
    assert import_string(path)(**kwargs).serialize() == (path, kwargs)  # a triggerer restarted: the same

    async def first() -> dict:
        async for event in import_string(path)(**kwargs).run():
            return event.payload
        raise AssertionError("no event")

    return asyncio.run(asyncio.wait_for(first(), 30))


def test_a_p99_breach_while_the_approval_waits_answers_roll_back(monkeypatch):
    """The candidate kept the last stage's 100% for up to 24 h while the approval waited, and no
    hard guard was read: a P99 breach went unseen. The guards are read on; one that trips ends
    the wait with Roll back recorded as the answer and the breach in the event."""
    import time

    since = time.time() - 300  # the last stage began 5 min ago; its P99 is 200 ms (limit 60) since
    source = p99_since(monkeypatch, since, 200.0)
    answers = Answers(monkeypatch)
    event = wait_for_answer(since)
    assert answers.written == [["Roll back"]]  # the question leaves Required Actions
    assert event["chosen_options"] == ["Roll back"]
    assert event["responded_by_user"] is None
    assert event["guard_breach"].startswith("hard guard tripped: Canary P99 is 200.0 ms (limit 60 ms)")
    assert source.ranges[-1][0] == since  # the whole stage, as its pokes read it


def test_a_candidate_restarted_while_the_approval_waits_answers_roll_back(monkeypatch):
    """Its P99 within the limit, the candidate's process crashed and came back: the requests it
    lost were no sample of the P99. The restart guard is read with the others, and trips."""
    import time

    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0, restarts=1)
    Answers(monkeypatch)
    event = wait_for_answer(since)
    assert event["chosen_options"] == ["Roll back"]
    assert event["guard_breach"] == (
        "hard guard tripped: The candidate's serving processes restarted 1 time in this stage (limit 0)."
    )


def test_guards_within_their_limits_keep_the_approval_waiting_for_its_answer(monkeypatch):
    import time

    since = time.time() - 300
    source = p99_since(monkeypatch, since, 20.0)
    answers = Answers(monkeypatch, answer_after=3)
    event = wait_for_answer(since)
    assert event["chosen_options"] == ["Promote"]
    assert "guard_breach" not in event
    assert answers.written == []
    assert len(source.ranges) >= 2  # read at each look (from one look in) while the answer was awaited


def test_an_answer_given_before_the_breach_was_recorded_is_the_answer(monkeypatch):
    """The approver answered between the last read of the answer and the breach: Airflow refuses
    a second answer, and the trigger ends with the approver's (the task reads the guards again)."""
    import time

    since = time.time() - 300
    p99_since(monkeypatch, since, 200.0)
    answers = Answers(monkeypatch, answer_after=1)  # (answered once the trigger read no answer)
    event = wait_for_answer(since)
    assert event["chosen_options"] == ["Promote"]
    assert event["responded_by_user"] == {"id": "alice", "name": "Alice"}
    assert answers.written == []


def test_guards_that_cannot_be_read_roll_back_after_guard_error_limit_reads_in_a_row(monkeypatch, capsys):
    """Prometheus down while the approval waited: each read failed, was logged and tripped
    nothing, and the candidate kept its 100% unmeasured until an answer came (24 h). Failed
    reads are counted; ``guard_error_limit`` of them in a row answer Roll back, as a breach."""
    import time

    from rollout_airflow.hooks import PrometheusHook
    from vision_rollout.metrics import PrometheusSource

    reads = []

    class Down(PrometheusSource):
        def scrape_interval_s(self) -> float:
            reads.append(time.time())
            return super().scrape_interval_s()

    monkeypatch.setattr(PrometheusHook, "source", lambda self: Down("http://127.0.0.1:9", timeout_s=1))
    answers = Answers(monkeypatch)
    event = wait_for_answer(time.time() - 300, {**GUARDED, "guard_error_limit": 3})
    assert answers.written == [["Roll back"]]
    assert event["chosen_options"] == ["Roll back"]
    assert event["guard_breach"].startswith("the hard guards could not be read 3 times in a row (the last time: ")
    assert len(reads) == 3
    logged = "".join(capsys.readouterr())
    assert "the hard guards could not be read (2 of 3 in a row): " in logged  # each, in the trigger's log


def test_failed_reads_are_counted_on_across_a_triggerer_restart(monkeypatch, tmp_path):
    """The count of failed reads in a row lived in the trigger's memory: a triggerer restarted
    (or another one taking the trigger over) counted from 0 again, and one restarted more often
    than guard_error_limit looks kept a candidate nobody could measure at 100% until the answer
    came. It is kept in the run folder, per task instance."""
    import asyncio
    import time
    import uuid

    from airflow.sdk.module_loading import import_string

    from rollout_airflow.hooks import PrometheusHook
    from rollout_airflow.triggers import GuardedApprovalTrigger
    from vision_rollout.metrics import PrometheusSource

    extra = {"run_dir": str(tmp_path), "repository": str(tmp_path / "no-models")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    monkeypatch.setattr(PrometheusHook, "source", lambda self: PrometheusSource("http://127.0.0.1:9", timeout_s=1))
    trigger = GuardedApprovalTrigger(
        ti_id=uuid.uuid4(),
        options=["Promote", "Roll back"],
        defaults=["Roll back"],
        params={},
        timeout_datetime=None,
        rollout={**GUARDED, "guard_error_limit": 3},
        since=time.time() - 300,
        look_s=0.01,
    )
    path, kwargs = trigger.serialize()

    def read(t: GuardedApprovalTrigger) -> str | None:
        return asyncio.run(t.read_guards())

    assert read(trigger) is None
    assert read(trigger) is None  # 2 of 3; then the triggerer restarts
    again = import_string(path)(**kwargs)
    assert (read(again) or "").startswith("the hard guards could not be read 3 times in a row")
    other = GuardedApprovalTrigger(**{**kwargs, "ti_id": uuid.uuid4()})  # another try's wait: its own count
    assert read(other) is None


@pytest.mark.parametrize("kept", [b"{", b"[]", b'{"count": "three"}', b'{"count": Infinity}', b'{"count": -40}'])
def test_a_count_of_failed_pokes_that_is_no_count_is_counted_afresh(monkeypatch, tmp_path, caplog, kept):
    """A stage's wait keeps the count of its pokes that raised in the run folder; one there that is
    not a count (written by hand, by another program, a disk's damage) raised out of every poke,
    as JSONDecodeError, KeyError or OverflowError: a poke that judged the stage lost its verdict,
    a poke that failed failed the try on it instead of holding, the file not named; a negative
    count held the stage for that many more failures. Now it is counted from 0, saying so, and
    written over by the next failure."""
    extra = {"run_dir": str(tmp_path), "repository": str(tmp_path / "no-models")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    params = {**PARAMS, "guard_error_limit": 2}
    steps.failed_reads_folder(params).write("ti-1.json", kept)
    monkeypatch.setattr(steps, "look_at_stage", lambda *a: PASS)
    assert steps.poke_stage(params, 0, {}, "run-a", "1", "ti-1") == PASS
    assert "cannot be read" in caplog.text
    assert "ti-1.json" in caplog.text

    def unreachable(*a: Any) -> None:
        raise ConnectionError("the model server is restarting")

    steps.failed_reads_folder(params).write("ti-1.json", kept)
    monkeypatch.setattr(steps, "look_at_stage", unreachable)
    assert steps.poke_stage(params, 0, {}, "run-a", "1", "ti-1") is None  # (1 of 2: held)
    assert steps.failed_reads_kept(params, "ti-1") == 1
    with pytest.raises(AirflowFailException, match="failed 2 times in a row"):
        steps.poke_stage(params, 0, {}, "run-a", "1", "ti-1")


def test_a_rollout_aborted_while_the_approval_waits_answers_roll_back(monkeypatch, tmp_path):
    """``rolloutctl abort`` during the approval's wait marked the lease, and nothing read the mark
    until the approver answered (up to 24 h later), the candidate at 100% meanwhile. The wait
    reads it with the guards: an abort ends it with Roll back, the abort's reason as the breach."""
    import time

    extra = {"run_dir": str(tmp_path), "repository": str(tmp_path / "no-models")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0)  # (guards within their limits)
    lock = steps.serving().model_lock("digits", "local")
    lock.acquire("run-a")
    lock.abort("dashboards look wrong")
    answers = Answers(monkeypatch)
    event = wait_for_answer(since)
    assert answers.written == [["Roll back"]]
    assert event["guard_breach"] == "the rollout was aborted: dashboards look wrong"


def test_a_tripped_guard_is_not_held_up_by_a_lease_read_that_hangs(monkeypatch):
    """The lease was read before the guards: an API server half-open (the read waiting out its
    timeouts and retries) held up a tripped guard's Roll back by as long, the candidate at 100%."""
    import time

    since = time.time() - 300
    p99_since(monkeypatch, since, 200.0)
    leases = []
    monkeypatch.setattr(steps, "serving", lambda: leases.append("read") or pytest.fail("the lease read first"))
    breach, unread = steps.guards_while_waiting(GUARDED, since)
    assert "P99" in breach
    assert (unread, leases) == (None, [])


def test_a_candidate_no_server_reports_loaded_while_the_approval_waits_rolls_back(monkeypatch):
    """The candidate's pods all gone while it awaited approval at 100% (crash-looping, evicted):
    the mesh answered every request 503, and the guards, read over the whole stage, held the
    data of before and tripped nothing until an answer came. No server seen serving the
    candidate is a failed read; ``guard_error_limit`` of them in a row answer Roll back."""
    import time

    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0, loaded=False)
    answers = Answers(monkeypatch)
    event = wait_for_answer(since, {**GUARDED, "guard_error_limit": 3})
    assert answers.written == [["Roll back"]]
    assert event["guard_breach"] == (
        "the hard guards could not be read 3 times in a row "
        "(the last time: no model server scraped reports version 2 of digits loaded)"
    )


def test_a_slow_read_of_the_guards_holds_up_no_other_triggers_calls(monkeypatch):
    """The guards were read in the triggerer's one shared thread (``sync_to_async``'s default),
    where every trigger's sync calls run (the human-in-the-loop trigger's reads of its answer):
    a Prometheus that did not answer held every other wait up for its timeouts, each read."""
    import asyncio
    import time
    import uuid

    from asgiref.sync import sync_to_async

    from rollout_airflow.triggers import GuardedApprovalTrigger

    monkeypatch.setattr(steps, "guards_while_waiting", lambda params, since: time.sleep(2) or (None, None))
    trigger = GuardedApprovalTrigger(
        ti_id=uuid.uuid4(), options=["Promote"], params={}, timeout_datetime=None, rollout=GUARDED, since=0, look_s=1
    )

    async def both() -> float:
        reading = asyncio.ensure_future(trigger.read_guards())
        await asyncio.sleep(0.2)
        start = time.monotonic()
        await sync_to_async(time.monotonic)()  # another trigger's call, in the shared thread
        took = time.monotonic() - start
        await reading
        return took

    assert asyncio.run(both()) < 1


def test_a_read_that_succeeds_starts_the_count_of_failed_reads_again():
    from tests.include.test_metrics import History
    from vision_rollout.engine import FailedReads, guard_breach
    from vision_rollout.spec import RolloutSpec

    breach, unread = guard_breach(History([]), RolloutSpec.from_dict(GUARDED), 1000.0, now=2000.0)
    assert breach is None
    assert unread.startswith("the canary's P99 has no data in Prometheus")  # a failed read too
    reads = FailedReads(limit=2)
    assert reads.judge(None, "prometheus: connection refused") is None
    assert reads.judge(None, None) is None  # read: the count starts again
    assert reads.judge(None, "the canary's P99 has no data") is None
    assert reads.judge(None, "the canary's P99 has no data") == (
        "the hard guards could not be read 2 times in a row (the last time: the canary's P99 has no data)"
    )
    assert FailedReads(limit=5).judge("hard guard tripped: X.", "prometheus down") == "hard guard tripped: X."


def replayed(monkeypatch, wrong: int = 0) -> list:
    """The validation replay as a round through both versions answers it: the baseline right on
    every image, the candidate wrong on its first ``wrong``; the rounds sent, recorded."""
    import pandas as pd

    from vision_rollout import replay

    rounds = []

    def one_round(url, model, versions, validation, limit=None, **kwargs):
        rounds.append(versions)
        names = [name for name, _, _ in replay.load_validation(validation, limit)]
        return pd.DataFrame(
            [
                {
                    "arm": arm,
                    "version": v,
                    "latency_ms": 5.0,
                    "error": 0,
                    "correct": float(arm == "baseline" or i >= wrong),
                    "pair_id": n,
                }
                for i, n in enumerate(names)
                for arm, v in versions.items()
            ]
        )

    monkeypatch.setattr(replay, "replay", one_round)
    return rounds


@pytest.mark.parametrize("deadline_passed", [False, True])
def test_a_breach_recorded_before_the_triggerer_restarted_is_still_the_breach(monkeypatch, deadline_passed):
    """The trigger recorded Roll back for a P99 breach, then the triggerer restarted before its
    event reached the task: the trigger run again found Roll back by nobody and took it for the
    deadline's default; stable was not put back at once, Slack was not told, and the report said
    "rejected by default (no answer in time)". An answer by nobody before the deadline is the
    wait's own: the guards read anew name the breach again."""
    import time
    import types
    from datetime import UTC, datetime, timedelta

    from airflow.providers.standard.triggers import hitl as trigger_hitl

    since = time.time() - 300
    p99_since(monkeypatch, since, 200.0)
    recorded = datetime.now(UTC) - timedelta(seconds=30)
    answer = types.SimpleNamespace(
        response_received=True,
        chosen_options=["Roll back"],
        params_input={},
        responded_at=recorded,
        responded_by_user=None,
    )
    monkeypatch.setattr(trigger_hitl, "get_hitl_detail_content_detail", lambda ti_id: answer)
    deadline = recorded + (timedelta(seconds=-1) if deadline_passed else timedelta(hours=24))
    event = wait_for_answer(since, deadline=deadline if deadline_passed else None)
    if deadline_passed:  # recorded after the deadline: the deadline's default
        assert "guard_breach" not in event
        return
    assert event["chosen_options"] == ["Roll back"]
    assert event["guard_breach"].startswith("hard guard tripped: Canary P99 is 200.0 ms")
    assert decide(GUARDED, [PASS, PASS], None, approval=event)[1].endswith(
        "but while the promotion awaited approval, " + event["guard_breach"]
    )


def approved(monkeypatch, tmp_path, option: str, since: float, wrong: int | None = 0):
    """``approve_promotion`` resumed with ``option`` as the answer (a replay round then has the
    candidate wrong on ``wrong`` images; None: the replay as it is); stable restores recorded."""
    from datetime import UTC, datetime

    from rollout_airflow.operators import PromotionApproval

    if wrong is not None:
        replayed(monkeypatch, wrong)
    outbox_reports(monkeypatch, tmp_path)
    restored = []
    monkeypatch.setattr(steps, "restore_stable", lambda *args, **kwargs: restored.append((args, kwargs)))
    run = XComs()
    run.of("stage_2.apply_mesh_weights").xcom_push("return_value", {"weight": 100, "started": since})
    task = PromotionApproval(task_id="approve_promotion", max_stages=4)
    event = {
        "chosen_options": [option],
        "params_input": {},
        "responded_at": datetime.now(UTC),
        "responded_by_user": {"id": "alice", "name": "Alice"},
    }
    context = {"params": GUARDED, "ti": run, "run_id": "manual__1"}
    return task.execute_complete(context, event), restored


def test_a_promote_answered_under_a_tripped_guard_restores_stable_and_rolls_back(monkeypatch, tmp_path):
    """The answer came between two reads of the guards, after the P99 breached: Promote acted on
    evidence the guards no longer backed. The guards are read once more before it counts."""
    import time

    since = time.time() - 300
    p99_since(monkeypatch, since, 200.0)
    answer, restored = approved(monkeypatch, tmp_path, "Promote", since)
    assert restored == [((GUARDED, "manual__1"), {"unload_candidate": False})]  # as a stage's breach
    assert answer["guard_breach"].startswith("hard guard tripped: Canary P99 is 200.0 ms")
    outcome, reason = decide(GUARDED, [PASS, PASS], None, approval=answer)
    assert outcome == "rollback"
    assert "while the promotion awaited approval, hard guard tripped: Canary P99" in reason
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert report["text"].startswith("Rolled back digits v2: hard guard tripped: Canary P99 is 200.0 ms")
    assert "(while the promotion awaited approval)" in json.dumps(report["blocks"])


def test_a_promote_whose_replay_shows_an_accuracy_drop_restores_stable_and_rolls_back(monkeypatch, tmp_path):
    """The replay's accuracy guard was read in the stages only: a candidate whose answers
    changed while it served all of the traffic awaiting approval (pods replaced, another node)
    was promoted and its baseline retired. A Promote sends a replay round through both versions
    first, and the guard on it counts as the Prometheus guards do."""
    import time

    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0)
    answer, restored = approved(monkeypatch, tmp_path, "Promote", since, wrong=45)  # 10% of 450 images
    assert restored == [((GUARDED, "manual__1"), {"unload_candidate": False})]
    assert answer["guard_breach"].startswith("hard guard tripped: Accuracy drop on the validation batch is +10.00 pp")
    assert decide(GUARDED, [PASS, PASS], None, approval=answer)[0] == "rollback"


@pytest.mark.integration
def test_a_promote_of_a_less_accurate_candidate_is_caught_by_its_replay(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """Against a real model server: version 3 (less accurate) at 100% awaiting approval against
    version 2; the Promote's replay round, pinned to each version, trips the accuracy guard and
    version 2 takes 100% again, version 3 left loaded for the rollback to unload."""
    import shutil
    import time
    from datetime import UTC, datetime

    from rollout_airflow.operators import PromotionApproval

    shutil.copytree(models_dir / "digits" / "validation", repo_copy / "digits" / "validation")
    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    s.load_versions("digits", 2, 3)
    assert put_policy(s, {"route": [{"version": "3", "weight": 100}]}).status_code == 200  # the last stage
    steps.serving().model_lock("digits", "local").acquire("run-a")
    params = {**GUARDED, "candidate_version": "3", "baseline_version": "2"}
    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0)
    run = XComs()
    run.of("stage_2.apply_mesh_weights").xcom_push("return_value", {"weight": 100, "started": since})
    event = {
        "chosen_options": ["Promote"],
        "params_input": {},
        "responded_at": datetime.now(UTC),
        "responded_by_user": {"id": "alice", "name": "Alice"},
    }
    task = PromotionApproval(task_id="approve_promotion", max_stages=4)
    answer = task.execute_complete({"params": params, "ti": run, "run_id": "run-a"}, event)
    assert answer["guard_breach"].startswith("hard guard tripped: Accuracy drop on the validation batch is +")
    admin = steps.serving().settings.admin
    assert admin.traffic("digits").to_dict() == {"route": [{"version": "2", "weight": 100}]}
    assert (admin.ready("digits", "2"), admin.ready("digits", "3")) == (True, True)


def test_a_promote_whose_replay_the_candidate_does_not_answer_rolls_back(monkeypatch, tmp_path):
    """A candidate failing every replay request has no accuracy to compare: nothing shows it as
    accurate as the baseline it would retire."""
    import time

    from vision_rollout import replay

    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0)
    replayed(monkeypatch)
    answered = replay.replay

    def failing(*args, **kwargs):
        samples = answered(*args, **kwargs)
        canary = samples["arm"] == "canary"
        samples.loc[canary, "error"], samples.loc[canary, "correct"] = 1, float("nan")
        return samples

    monkeypatch.setattr(replay, "replay", failing)
    answer, restored = approved(monkeypatch, tmp_path, "Promote", since, wrong=None)
    assert restored
    assert answer["guard_breach"] == (
        "the validation replay could not be judged: 450 of 900 requests through versions 1 and 2 failed"
    )


def test_a_promote_whose_replay_cannot_be_sent_rolls_back(monkeypatch, tmp_path):
    """The model server unreachable at the Promote: the replay's error failed the task with a
    traceback; it rolls back saying why."""
    import time

    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0)  # (the connection's model server: port 9, nothing there)
    answer, restored = approved(monkeypatch, tmp_path, "Promote", since, wrong=None)
    assert restored
    assert answer["guard_breach"].startswith("the validation replay could not be sent: ")


def test_a_promote_under_guards_within_their_limits_promotes(monkeypatch, tmp_path):
    import time

    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0)
    answer, restored = approved(monkeypatch, tmp_path, "Promote", since)
    assert restored == []
    assert "guard_breach" not in answer
    assert decide(GUARDED, [PASS, PASS], None, approval=answer)[0] == "promote"


@pytest.mark.parametrize(
    ("error", "why"),
    [
        ("Trigger timeout", "its wait ended without an answer or an event from its trigger 120 s past the answer's"),
        ("Trigger failure", "its trigger failed (Trigger failure)"),
    ],
)
def test_an_approval_no_triggerer_runs_ends_at_its_deadline_and_rolls_back(monkeypatch, tmp_path, error, why):
    """The approval's wait is a trigger: with no triggerer running, nothing read the guards or
    applied the deadline, and the task stayed deferred for good, the candidate at 100%. The
    deferral has the scheduler end it past the deadline; stable is put back, Roll back is
    recorded as the answer, and decide rolls back saying why. A failed trigger ends it the same."""
    import types

    from airflow.providers.standard.operators import hitl as operator_hitl
    from airflow.sdk.exceptions import TaskDeferred
    from airflow.sdk.execution_time import hitl

    from rollout_airflow.operators import PromotionApproval

    outbox_reports(monkeypatch, tmp_path)
    monkeypatch.setattr(operator_hitl, "upsert_hitl_detail", lambda **kwargs: None)
    monkeypatch.setattr(steps, "hold", lambda *args, **kwargs: None)
    restored, written = [], []
    monkeypatch.setattr(steps, "restore_stable", lambda *args, **kwargs: restored.append((args, kwargs)))
    monkeypatch.setattr(hitl, "update_hitl_detail_response", lambda **kwargs: written.append(kwargs))
    run = XComs()
    for i in (1, 2):
        run.of(f"stage_{i}.statistical_gate").xcom_push("return_value", PASS)
    run.of("stage_2.apply_mesh_weights").xcom_push("return_value", {"weight": 100, "started": 1000.0})
    context = {"params": GUARDED, "ti": run, "run_id": "manual__1", "task_instance": types.SimpleNamespace(id="ti-1")}
    task = PromotionApproval(task_id="approve_promotion", max_stages=4)
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context)
    assert deferred.value.timeout.total_seconds() == 24 * 3600 + 120  # the answer's deadline, and 2 minutes

    answer = task.resume_execution("__fail__", {"error": error}, context)  # as the scheduler resumes it
    assert written == [{"ti_id": "ti-1", "chosen_options": ["Roll back"], "params_input": {}}]
    assert restored == [((GUARDED, "manual__1"), {"unload_candidate": False})]
    assert answer["chosen_options"] == ["Roll back"]
    assert answer["guard_breach"].startswith(why)
    outcome, reason = decide(GUARDED, [PASS, PASS], None, approval=answer)
    assert outcome == "rollback"
    assert why in reason


def test_a_breach_the_trigger_saw_rolls_back_whatever_the_answer(monkeypatch, tmp_path):
    """decide rolls back on the breach even where the record says Promote (the answer came first)."""
    assert decide(GUARDED, [PASS, PASS], None, approval={**ALICE, "guard_breach": "hard guard tripped: X."}) == (
        "rollback",
        "every stage passed; but while the promotion awaited approval, hard guard tripped: X.",
    )


@pytest.mark.integration
def test_an_aborted_run_stops_at_its_next_step_and_its_teardown_puts_the_stable_version_back(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path, capsys
):
    """``rolloutctl abort`` on a DAG run in local mode (its lock in the run folder's locks/):
    the stable version back at once, the run's lease marked and left to it; the run's next step
    fails on the mark rather than going on, and its teardown still puts the stable version back
    and releases the lease. A spec whose rollout does not set the routes in effect is refused,
    nothing marked."""
    from vision_rollout.cli import main
    from vision_rollout.spec import RolloutSpec

    s = server_factory(repo_copy, token=TOKEN)
    connect(s, monkeypatch, tmp_path, models_dir)
    steps.build_image(PARAMS, "run-a")
    spec = RolloutSpec.from_dict(PARAMS)
    stage = spec.policy_for_stage(50)
    assert put_policy(s, stage.to_dict()).status_code == 200
    lock = steps.serving().model_lock("digits", "local")
    (tmp_path / "token").write_text(TOKEN)
    abort = ["abort", "--url", s.http, "--lock-dir", str(lock.path.parent), "--token-file", str(tmp_path / "token")]
    (tmp_path / "wrong.json").write_text(json.dumps({"baseline_version": "2", "candidate_version": "3"}))
    assert main([*abort, "--spec", str(tmp_path / "wrong.json")]) == 4
    assert "the routes are not what this spec's rollout sets" in capsys.readouterr().err
    assert (lock.holding().aborted, steps.serving().settings.admin.traffic("digits")) == ("", stage)
    (tmp_path / "spec.json").write_text(json.dumps(PARAMS))
    assert main([*abort, "--spec", str(tmp_path / "spec.json"), "--reason", "wrong dataset"]) == 0
    assert steps.serving().settings.admin.traffic("digits") == spec.stable_policy()
    assert (lock.holding().holder, lock.holding().aborted) == ("run-a", "wrong dataset")
    with pytest.raises(AirflowFailException, match="the rollout was aborted: wrong dataset"):
        steps.hold(spec, "run-a")
    assert put_policy(s, stage.to_dict()).status_code == 200  # a write of the run's that came just before
    kept, done = steps.finish(PARAMS, "run-a", promoted=False)
    assert (kept, done) == (False, "version 1 takes 100%; version 2 is unloaded")
    assert steps.serving().settings.admin.traffic("digits") == spec.stable_policy()
    assert lock.holding() is None


def test_an_audit_run_removes_the_hours_past_their_retention_and_killed_stages_caches(monkeypatch, tmp_path):
    """Each audited hour kept a folder and each stage killed mid-way its prediction-log cache (up
    to 256 MB, and a killed write's temporary file as large), none ever removed once no stage
    wrote a cache again. An audit run removes the model's hour folders older than its retention
    (30 days by default) and the caches of stages no running stage can be (started over
    MAX_AGE_S ago), with their temporary files an hour old; nothing else."""
    import os
    import time
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowSkipException

    from vision_rollout import logcache
    from vision_rollout.audit import AUDITED

    run = tmp_path / "run"
    extra = {"shadow_log": str(tmp_path / "log"), "run_dir": str(run)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    audits = run / "audits" / "digits"
    names = {days: (this_hour - timedelta(days=days, hours=2)).strftime("%Y%m%dT%H") for days in (40, 29)}
    for name in names.values():
        (audits / name).mkdir(parents=True)
        (audits / name / AUDITED).write_text("{}")
        (audits / name / "report.md").write_text("# Shadow audit")
    caches = run / ".logcache"
    caches.mkdir()
    now = int(time.time())
    stale, live = f"{now - logcache.MAX_AGE_S - 60}-{0:024x}.parquet", f"{now - 600}-{1:024x}.parquet"
    for name in (stale, live, f".{stale}.77.tmp", f".{live}.78.tmp", "notes.txt"):
        (caches / name).write_bytes(b"x")
    os.utime(caches / f".{stale}.77.tmp", (now - 7200, now - 7200))
    with pytest.raises(AirflowSkipException):  # (no records in its hour)
        steps.audit_hours("digits", this_hour, catch_up_hours=0)
    assert sorted(p.name for p in audits.iterdir()) == sorted(
        [names[29], (this_hour - timedelta(hours=1)).strftime("%Y%m%dT%H")]
    )
    assert sorted(p.name for p in caches.iterdir()) == sorted([live, f".{live}.78.tmp", "notes.txt"])
    with pytest.raises(AirflowSkipException):
        steps.audit_hours("digits", this_hour, catch_up_hours=0, retention_days=8)
    assert names[29] not in [p.name for p in audits.iterdir()]
    with pytest.raises(AirflowFailException, match="retention_days must be 8 to 3660, not 7"):
        steps.audit_hours("digits", this_hour, catch_up_hours=0, retention_days=7)


def test_an_audit_run_removes_the_rollout_runs_folders_and_waits_counts_past_their_retention(monkeypatch, tmp_path):
    """Each rollout run kept a folder (its stages' records, its routes, its shadow report), each
    approval wait whose task was killed its count of failed reads, none ever removed. An audit
    run removes the model's run folders nothing changed in for its retention, and those counts;
    a run folder written since (a run going on), another model's, and a file of someone
    else's stay."""
    import os
    import time
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowSkipException

    from vision_rollout import attempts

    run = tmp_path / "run"
    extra = {"shadow_log": str(tmp_path / "log"), "run_dir": str(run)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    settings = steps.serving().settings
    now = time.time()
    old = now - 40 * 86400
    runs = {
        name: settings.workdir(model, name)
        for model, name in [
            ("digits", "done"),
            ("digits", "going"),
            ("digits", "audit-20260101T000000"),
            ("mnist", "other"),
        ]
    }
    for name, folder in runs.items():
        folder.write(attempts.record_name(name, 0), b"{}")
        folder.write(steps.ROUTES, b"{}")
    runs["audit-20260101T000000"].write("report.md", b"# Shadow audit")
    runs["done"].write("summary.json", b"{}")
    runs["done"].write("original-routes.tmp", b"{")  # (a routes write killed mid-way)
    approvals = steps.approvals_folder("digits")
    for name in ("0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.json", "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c.json"):
        approvals.write(name, b'{"count": 3}')
    for p in run.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    runs["going"].write(attempts.record_name("going", 1), b"{}")  # (its next stage, a look now)
    approvals.write("0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c.json", b'{"count": 4}')  # (a wait going on)
    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with pytest.raises(AirflowSkipException):  # (no records in its hour)
        steps.audit_hours("digits", this_hour, catch_up_hours=0)
    assert sorted(p.name for p in (run / "rollouts" / "digits").iterdir()) == ["going"]
    assert (run / "rollouts" / "mnist" / "other").is_dir()
    assert approvals.names() == ["0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c.json"]
    assert steps.prune_audits("digits", this_hour - timedelta(days=30)) == {
        "audit hour folders": 0,
        "stage cache files": 0,
        "mirror changes": 0,
        "run folders": 0,
        "approval counts": 0,
        "outbox leftovers": 0,
        "conditional-put probes": 0,
    }


class StageWorld:
    """A stage's steps as a run's tasks call them, on a run folder in ``tmp_path``: the routes
    they write (``set``), and a judge whose stage states come from ``states`` (a window's start
    -> the state its looks reach), each window it judged in ``judged``."""

    def __init__(self, monkeypatch, tmp_path):
        from types import SimpleNamespace

        outbox_reports(monkeypatch, tmp_path)
        self.set: list[dict] = []
        self.judged: list[float] = []
        self.states: list = []
        self.failed: list[str] = []
        world = self

        class Router:
            def reconcile(self):
                pass

            def set_routes(self, policy):
                world.set.append(policy.to_dict())
                return True

            def get_routes(self):
                return TrafficPolicy.from_dict(
                    world.set[-1] if world.set else {"route": [{"version": "1", "weight": 100}]}
                )

        def judge(window, now=None):
            world.judged.append(window.started)
            return world.states.pop(0)

        monkeypatch.setattr(steps, "router", lambda *a, **k: Router())
        monkeypatch.setattr(steps, "stage_judge", lambda *a, **k: judge)
        monkeypatch.setattr(steps, "PrometheusHook", lambda: SimpleNamespace(source=lambda: None))
        monkeypatch.setattr(steps, "restore_stable", lambda *a, **k: world.set.append({"stable": True}))
        steps.serving().model_lock("digits", "local").acquire("run-a")

    def apply(self, index: int = 0) -> dict:
        return steps.apply_weights(PARAMS, index, "run-a", {"decision": "pass"})

    def stage_2_in_effect(self) -> tuple[dict, list[dict]]:
        """Stage 1 (50%) applied and passed, stage 2 (100%) applied: stage 1's apply_weights XCom
        and the routes written so far."""
        first = self.apply(0)
        self.states = [stage_state("pass", 2, "PASS at look 2")]
        assert self.poke(first)["decision"] == "pass"
        self.apply(1)
        return first, list(self.set)

    def poke(self, applied: dict, index: int = 0, try_number: int = 1):
        """A poke of the stage's wait, in its try ``try_number`` (each try a task instance id of
        its own): its XCom, None while it waits; a verdict other than a pass fails the try, its
        verdict in XCom ``verdict`` (returned), its reason in ``failure`` (in ``self.failed``)."""
        from types import SimpleNamespace

        from rollout_airflow.sensors import StageMetricsSensor

        sensor = StageMetricsSensor(task_id="wait_for_metrics", stage_index=index, applied=applied)
        pushed: dict = {}
        ti = SimpleNamespace(
            id=f"ti-{try_number}", try_number=try_number, xcom_push=lambda key, value: pushed.__setitem__(key, value)
        )
        try:
            return sensor.poke({"params": PARAMS, "run_id": "run-a", "ti": ti}).xcom_value
        except AirflowFailException as exc:
            if "verdict" not in pushed:
                raise
            self.failed.append(str(exc))
        assert pushed["failure"] == self.failed[-1]  # (the reason the report names)
        return pushed["verdict"]


def stage_state(status: str, look: int, summary: str):
    from vision_rollout.engine import StageState
    from vision_rollout.gates import Verdict

    decision = {"waiting": "wait", "undecided": "wait"}.get(status, status)
    verdict = Verdict(decision, (), look, 10, 0.05, 1e-3, "obrien-fleming", summary) if look else None
    return StageState(status, look, 10, verdict, summary, {}, 100.0)


def test_a_stage_cleared_after_its_test_failed_reports_the_failure_and_sends_the_candidate_nothing(
    monkeypatch, tmp_path
):
    """Cleared in the UI (its task group, say) after its test failed, a stage started a fresh
    test: its weights back on the candidate, looks 1..K again with alpha spent afresh, and a
    pass by chance promoted a candidate whose test had failed. Its decision stands now."""
    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    world.states = [stage_state("fail", 3, "FAIL: canary P99 regressed 40%")]
    assert world.poke(applied)["decision"] == "fail"
    routes = len(world.set)
    again = world.apply()  # the stage cleared: its apply_mesh_weights runs again
    assert again["started"] == applied["started"]
    assert len(world.set) == routes  # no traffic back to a candidate whose test failed
    world.states = [stage_state("pass", 1, "PASS at look 1")]  # what a fresh test could find
    verdict = world.poke(again, try_number=2)
    assert verdict["decision"] == "fail"
    assert world.judged == [applied["started"]]  # judged once: the decision is reported again
    assert "its wait ran twice" in verdict["checks"][-1]["sentence"]
    assert world.failed == ["stage 1 (50%) failed its test; the run rolls back: FAIL: canary P99 regressed 40%"] * 2
    assert decide(PARAMS, [verdict, None], AGREES)[0] == "rollback"


def test_a_stage_wait_timed_out_without_a_verdict_names_why_in_the_report(monkeypatch, tmp_path):
    """A stage whose pokes held it past max_stage_seconds and the sensor's grace (a run folder
    that cannot be read, say) ended by Airflow's sensor timeout: no verdict and no reason kept,
    so the rollback said only "the 50% stage produced no verdict: a step failed or was
    interrupted". The timeout is kept as the stage's failure, and the report names it."""
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowSensorTimeout

    from rollout_airflow.sensors import StageMetricsSensor

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    world.states = [stage_state("waiting", 0, "holding: the hard guards cannot be read")]
    sensor = StageMetricsSensor(task_id="wait_for_metrics", stage_index=0, applied=applied)
    pushed: dict = {}
    ti = SimpleNamespace(
        id="ti-1",
        try_number=1,
        xcom_push=lambda key, value: pushed.__setitem__(key, value),
        get_first_reschedule_date=lambda context: datetime.now(UTC) - timedelta(hours=2),  # (its first poke)
    )
    with pytest.raises(AirflowSensorTimeout):
        sensor.execute({"params": PARAMS, "run_id": "run-a", "ti": ti})
    assert pushed["failure"].startswith("stage 1 (50%): its wait timed out without a verdict after 7200 s")
    outcome, reason = decide(PARAMS, [None, None], AGREES, [pushed["failure"], None])
    assert outcome == "rollback"
    assert "its wait timed out without a verdict" in reason


def test_an_earlier_stages_apply_cleared_alone_mid_run_moves_no_traffic_back(monkeypatch, tmp_path):
    """Stage 1 (50%) passed and stage 2 (100%) took effect; a reviewer cleared stage 1's
    apply_mesh_weights alone in the UI (its downstream unticked) and it ran again: the routes went
    back to 50% while stage 2's wait judged on as if at 100%, and nothing put them forward again
    before that wait decided. Now an earlier stage's apply after a later stage took effect leaves
    the routes as they are, saying so; the later stage's wait goes on under its own split."""
    world = StageWorld(monkeypatch, tmp_path)
    first, at_100 = world.stage_2_in_effect()
    assert at_100[-1] == {"route": [{"version": "2", "weight": 100}]}
    again = world.apply(0)  # cleared alone, mid-stage 2
    assert world.set == at_100  # no traffic moved back
    assert again["started"] == first["started"]
    assert world.poke(again, try_number=2)["decision"] == "pass"  # its decision reported again


def test_a_stages_traffic_move_is_recorded_before_it_happens(monkeypatch, tmp_path):
    """apply_weights moved the traffic, then wrote the stage's record: a worker killed between
    the two left stage 2 (100%) serving with no record of it, and stage 1's apply cleared after
    took the routes back to 50% under stage 2's split. Every move is recorded before it happens:
    the routes are written only once the stage's record names its application."""
    from vision_rollout import attempts

    class Killed(BaseException):
        """The worker gone (SIGKILL) just as the routes were written."""

    world = StageWorld(monkeypatch, tmp_path)
    folder = steps.serving().settings.workdir("digits", "run-a")
    router = steps.router
    recorded_first: list[bool] = []

    class DiesAfterTheMove:
        def __init__(self, inner):
            self.inner = inner

        def reconcile(self):
            self.inner.reconcile()

        def get_routes(self):
            return self.inner.get_routes()

        def set_routes(self, policy):
            recorded_first.append(bool(attempts.load(folder, "run-a", 1).attempts))
            self.inner.set_routes(policy)
            raise Killed

    first = world.apply(0)
    world.states = [stage_state("pass", 2, "PASS at look 2")]
    assert world.poke(first)["decision"] == "pass"
    monkeypatch.setattr(steps, "router", lambda *a, **k: DiesAfterTheMove(router(*a, **k)))
    with pytest.raises(Killed):
        world.apply(1)
    assert recorded_first == [True]  # the record named stage 2's application before its routes moved
    at_100 = list(world.set)
    assert at_100[-1] == {"route": [{"version": "2", "weight": 100}]}
    monkeypatch.setattr(steps, "router", router)
    world.apply(0)  # stage 1's apply cleared alone afterwards
    assert world.set == at_100  # stage 2's move is known: no traffic moved back


def test_enable_shadow_cleared_alone_once_the_candidate_takes_all_the_traffic_says_there_is_nothing_to_mirror(
    monkeypatch, tmp_path
):
    """Stage 2 (100%) took effect, its mirror off; stage 1's enable_shadow cleared alone in the UI
    failed ("the mirror to version 2 is not in effect"), red in the grid and its reason kept as
    the stage's failure. It succeeds now, saying the candidate takes all of the traffic, and
    moves no traffic."""
    world = StageWorld(monkeypatch, tmp_path)
    _, at_100 = world.stage_2_in_effect()
    shadow = steps.enable_shadow({**PARAMS, "mirror_percent": 100}, "run-a")
    assert shadow == {
        "mirror": None,
        "not_checked": "version 2 takes all of the traffic now: there is nothing to mirror",
    }
    assert world.set == at_100


def test_a_stage_re_run_mid_test_resumes_its_looks_and_its_alpha(monkeypatch, tmp_path):
    """A worker lost mid-stage, the stage cleared: its window (its looks' times, the alpha each
    spends) is the first run's, and the report counts the runs."""
    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    world.states = [stage_state("waiting", 4, "WAIT at look 4 of 10")]
    assert world.poke(applied) is None
    again = world.apply()
    assert again["started"] == applied["started"]
    world.states = [stage_state("pass", 6, "PASS at look 6")]
    verdict = world.poke(again, try_number=3)
    assert verdict["decision"] == "pass"
    assert world.judged == [applied["started"], applied["started"]]
    sentence = verdict["checks"][-1]["sentence"]
    assert "its weights were applied twice and its wait ran twice" in sentence
    assert "resumed its test at the next look" in sentence
    assert "RESTARTED" not in sentence
    assert verdict["summary"] == "PASS at look 6"
    promoted = steps.notify(PARAMS, "promote", "every stage passed", [verdict, verdict])
    assert "outbox" in promoted
    (report,) = outbox_reports(monkeypatch, tmp_path)
    assert "its wait ran twice" in json.dumps(report["blocks"])


def test_a_tripped_guard_stands_when_its_stage_is_cleared(monkeypatch, tmp_path):
    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    world.states = [stage_state("breach", 0, "hard guard tripped: Canary P99 is 95 ms.")]
    with pytest.raises(AirflowFailException, match="Canary P99 is 95 ms"):
        world.poke(applied)
    world.set.clear()
    again = world.apply()
    assert world.set == []  # the candidate gets no traffic again
    with pytest.raises(AirflowFailException, match=r"Canary P99 is 95 ms\. Version 1 takes 100% again"):
        world.poke(again, try_number=2)
    assert world.set == [{"stable": True}]  # the stable version put back again
    assert len(world.judged) == 1


def test_a_restart_asked_for_starts_a_fresh_test_and_the_report_says_what_it_cost(monkeypatch, tmp_path, capsys):
    """The one way to judge a stage afresh (Prometheus fixed after it ended undecided, say):
    asked for with a reason, counted, and in the report with its cost."""
    from vision_rollout.cli import main

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    world.states = [stage_state("undecided", 0, "undecided: the stage ended while its hard guards could not be read")]
    assert world.poke(applied)["status"] == "undecided"
    args = ["restart-stage", "--run-dir", str(tmp_path), "--model", "digits", "--run-id", "run-a", "--stage", "1"]
    assert main([*args, "--reason", "Prometheus fixed"]) == 0
    assert "starts attempt 2" in capsys.readouterr().out
    again = world.apply()
    assert again["started"] > applied["started"]  # a fresh window, its looks from 1
    world.states = [stage_state("pass", 2, "PASS at look 2")]
    verdict = world.poke(again, try_number=2)
    assert verdict["decision"] == "pass"
    assert "restarted 1 time(s) on request" in verdict["summary"]
    assert "up to 9.75%" in verdict["summary"]
    assert "Prometheus fixed" in verdict["checks"][-1]["sentence"]
    assert decide(PARAMS, [verdict, verdict], AGREES)[1].startswith(
        "every stage passed (its test restarted on request: 50% (2 attempts), 100% (2 attempts); "
        "each attempt a fresh test at level 0.05)"
    )
    assert "**50%**: PASS at look 2 (attempt 2: the stage's test was restarted" in approval_body(
        PARAMS, "every stage passed", [verdict, verdict]
    )
    # Never without a reason, nor for a stage that never started.
    assert main([*args, "--reason", " "]) == 2
    assert main([*args[:-1], "2", "--reason", "x"]) == 4


def full_disk(monkeypatch):
    """The run folder full from now on: no write of the lease goes through."""
    import errno

    from vision_rollout.locks import FileLock

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileLock, "_replace", full)


def test_a_breach_puts_the_stable_version_back_when_the_run_folder_is_full(monkeypatch, tmp_path):
    """The run folder (where the lease lives) full mid-stage: each poke failed renewing the lease,
    before judging, so a tripped guard never put the stable version back."""
    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    full_disk(monkeypatch)
    world.states = [stage_state("breach", 0, "hard guard tripped: Canary P99 is 95 ms.")]
    with pytest.raises(AirflowFailException, match=r"Canary P99 is 95 ms\. Version 1 takes 100% again"):
        world.poke(applied)
    assert world.set[-1] == {"stable": True}


@pytest.mark.parametrize("status", ["breach", "pass"])
def test_a_poke_on_a_full_run_folder_acts_on_a_breach_but_keeps_no_pass_on_a_lease_about_to_run_out(
    monkeypatch, tmp_path, caplog, status
):
    """The run folder full and the lease within ``CLOCK_SKEW_S`` of its expiry: the poke refused
    the lease before judging (a LockError, counted as a failed read), and for up to
    ``guard_error_limit`` pokes nothing put the stable version back after a tripped guard. A
    breach is acted on (the stable version's return reads the lease again); a pass is not kept
    (another run may take the model over meanwhile): the poke holds the stage."""
    import logging
    import time

    from vision_rollout.locks import LEASE_S

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    lock = steps.serving().model_lock("digits", "local")
    lock.clock = lambda: time.time() - LEASE_S + 30  # (renewed as long ago)
    lock.renew("run-a")
    full_disk(monkeypatch)
    if status == "breach":
        world.states = [stage_state("breach", 0, "hard guard tripped: Canary P99 is 95 ms.")]
        with pytest.raises(AirflowFailException, match=r"Canary P99 is 95 ms\. Version 1 takes 100% again"):
            world.poke(applied)
        assert world.set[-1] == {"stable": True}
    else:
        world.states = [stage_state("pass", 2, "PASS at look 2")]
        with caplog.at_level(logging.WARNING):
            assert world.poke(applied) is None
        assert "the stage's pass is not kept" in caplog.text
        assert {"stable": True} not in world.set


@pytest.mark.integration
def test_the_teardown_puts_the_stable_version_back_when_the_run_folder_is_full(
    server_factory, repo_copy, monkeypatch, tmp_path
):
    """The teardown and the failure callback renewed the lease first; the run folder full, both
    failed there, and the candidate kept its share of the traffic."""
    s = server_factory(repo_copy, token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    s.load_versions("digits", 1, 2)
    assert put_policy(s, steps.spec_from(PARAMS).policy_for_stage(50).to_dict()).status_code == 200
    steps.serving().model_lock("digits", "local").acquire("run-a")
    full_disk(monkeypatch)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-a"})
    assert steps.serving().settings.admin.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}


def test_a_stage_record_that_cannot_be_read_fails_the_step_instead_of_starting_afresh(monkeypatch, tmp_path):
    """It failed with a bare RecordError (a traceback, retried on the same file): now a task
    failure in one line naming the file, what is wrong, and the command that tests afresh."""
    from vision_rollout.attempts import record_name

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    folder = steps.serving().settings.workdir("digits", "run-a")
    (folder.path / record_name("run-a", 0)).write_text('{"run_id": "run-a", "stage": 1, "attempts": [{}]}')
    for step in (world.apply, lambda: world.poke(applied)):
        with pytest.raises(AirflowFailException) as failed:
            step()
        message = str(failed.value)
        assert "\n" not in message
        assert f"{folder.path / record_name('run-a', 0)} is not the record of stage 1: no 'started'" in message
        assert "The file is left as it is, for inspection" in message
        assert f"rolloutctl restart-stage --run-dir {tmp_path} --model digits --run-id 'run-a' --stage 1" in message
    assert world.judged == []


def test_restart_stage_sets_a_damaged_record_aside_and_the_stage_tests_afresh(monkeypatch, tmp_path, capsys):
    """restart-stage, the way out the failure names, refused a record it could not read ("nothing
    changed"): the stage could not be run again at all. It keeps the file aside and asks for a
    fresh test, reported as a restart whose earlier attempts are not counted."""
    from vision_rollout import attempts
    from vision_rollout.cli import main

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    folder = steps.serving().settings.workdir("digits", "run-a")
    name = attempts.record_name("run-a", 0)
    (folder.path / name).write_text("{half a record")
    args = ["restart-stage", "--run-dir", str(tmp_path), "--model", "digits", "--run-id", "run-a", "--stage", "1"]
    assert main([*args, "--reason", "record damaged by a full disk"]) == 0
    assert "starts attempt 2" in capsys.readouterr().out
    [aside] = [n for n in folder.names() if n.startswith(f"{name}.damaged-")]
    assert folder.read(aside) == b"{half a record"  # kept whole
    again = world.apply()
    assert again["started"] > applied["started"]
    world.states = [stage_state("pass", 2, "PASS at look 2")]
    verdict = world.poke(again, try_number=2)
    assert verdict["decision"] == "pass"
    assert "restarted 1 time(s) on request" in verdict["summary"]
    sentence = verdict["checks"][-1]["sentence"]
    assert "record damaged by a full disk" in sentence
    assert f"kept as {folder.path / aside}; the attempts before are not counted" in sentence


def test_a_run_folder_that_cannot_be_written_holds_the_stage_until_its_decision_is_kept(monkeypatch, tmp_path):
    """A decision given but not kept would be judged afresh by a re-run: the stage holds (as on
    a log it cannot list) while its record cannot be written, and decides once it can."""
    from vision_rollout import attempts

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    world.states = [stage_state("waiting", 1, "WAIT at look 1 of 10")]
    assert world.poke(applied) is None
    save = attempts.save

    def down(*args):
        raise OSError("the store answers 503")

    monkeypatch.setattr(attempts, "save", down)
    world.states = [stage_state("fail", 2, "FAIL: errors")]
    assert world.poke(applied) is None  # judged, not kept: held
    assert len(world.judged) == 2
    monkeypatch.setattr(attempts, "save", save)
    world.states = [stage_state("fail", 2, "FAIL: errors")]
    assert world.poke(applied)["decision"] == "fail"
    assert attempts.load(steps.serving().settings.workdir("digits", "run-a"), "run-a", 0).attempts[0].outcome


def test_a_restart_asked_for_while_a_poke_judges_the_stage_is_kept(monkeypatch, tmp_path):
    """A poke reads the stage's record, judges its looks (a replay round: seconds), then keeps
    its look: a restart asked for meanwhile (``rolloutctl restart-stage``) stays asked for."""
    from vision_rollout import attempts

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    folder = steps.serving().settings.workdir("digits", "run-a")
    waiting = stage_state("waiting", 2, "WAIT at look 2 of 10")

    class Restarting(list):
        def pop(self, i=-1):
            attempts.request_restart(folder, "run-a", 0, "Prometheus fixed")
            return waiting

    world.states = Restarting([waiting])
    assert world.poke(applied) is None
    record = attempts.load(folder, "run-a", 0)
    assert record.restart == "Prometheus fixed"
    assert record.attempts[0].look == 2
    assert world.apply()["started"] > applied["started"]


def test_the_count_of_failed_reads_is_removed_when_the_approval_wait_ends(monkeypatch, tmp_path):
    """Each try of the approval's wait kept its count of failed reads in the run folder, and a
    wait that ended with reads failing (Roll back at the limit, an answer given meanwhile) left
    its file there for good: one more for each such wait of every run (an answer given in the
    UI cancels the trigger: the task, resumed, removes it)."""
    import time

    from rollout_airflow.operators import PromotionApproval

    extra = {"run_dir": str(tmp_path), "repository": str(tmp_path / "no-models")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    since = time.time() - 300
    p99_since(monkeypatch, since, 20.0, loaded=False)
    answers = Answers(monkeypatch)
    event = wait_for_answer(since, {**GUARDED, "guard_error_limit": 3})
    assert answers.written == [["Roll back"]]
    assert event["guard_breach"].startswith("the hard guards could not be read 3 times in a row")
    kept = steps.failed_reads_folder(GUARDED).names()
    assert len(kept) == 1  # (the task resumes: its count removed then)
    run = XComs()
    run.id = kept[0].removesuffix(".json")
    answer = {**event, "chosen_options": ["Roll back"], "guard_breach": None}
    PromotionApproval(task_id="approve_promotion", max_stages=4).execute_complete(
        {"params": GUARDED, "ti": run, "run_id": "run-a"}, answer
    )
    assert steps.failed_reads_folder(GUARDED).names() == []


@pytest.mark.parametrize(
    "event",
    [
        {"error": "params_input not valid", "error_type": "validation"},
        {"chosen_options": ["Maybe"], "params_input": {}, "responded_at": None, "responded_by_user": None},
    ],
)
def test_the_count_of_failed_reads_is_removed_when_the_answer_is_refused(monkeypatch, tmp_path, event):
    """A wait whose event the task refuses (an error from the trigger, an option it does not
    offer) fails the try; the next try keeps a count of its own: this one's is removed too."""
    from rollout_airflow.operators import PromotionApproval

    extra = {"run_dir": str(tmp_path), "repository": str(tmp_path / "no-models")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    run = XComs()
    run.id = "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    steps.keep_failed_reads(GUARDED, run.id, 3)
    assert steps.failed_reads_folder(GUARDED).names() == [f"{run.id}.json"]
    with pytest.raises(Exception):  # noqa: PT011 (HITL's own errors, ValueError)
        PromotionApproval(task_id="approve_promotion", max_stages=4).execute_complete(
            {"params": GUARDED, "ti": run, "run_id": "run-a"}, event
        )
    assert steps.failed_reads_folder(GUARDED).names() == []


@pytest.mark.parametrize(
    "damaged",
    [
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "outcome": "fail"}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1}], "restart": {"why": 1}}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": NaN}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "tries": "abc"}]}',
        "[" * 100_000,
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "look": 1e400}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "runs": -3}]}',
        "[]",
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "outcome": {"status": "breach"}}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "outcome": {"status": "pass", "summary": ""}}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "outcome": {"status": "ok", "summary": ""}}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "reckoned": {"a": -1}}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "reckoned": {"a": 1.5}}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "reckoned": {"a": "0.1"}}]}',
        '{"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "reckoned": [1]}]}',
        json.dumps(
            {"run_id": "run-a", "stage": 1, "attempts": [{"started": 1, "reckoned": {str(i): 0.5 for i in range(99)}}]}
        ),
    ],
)
def test_a_damaged_stage_record_is_an_error_naming_it(monkeypatch, tmp_path, damaged):
    """A record damaged in its values (not only its JSON) was taken as one, and the stage then
    failed on it with an AttributeError, or looked for a window that never matched, or (nested
    deep) failed with a RecursionError."""
    from vision_rollout.attempts import record_name

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    folder = steps.serving().settings.workdir("digits", "run-a")
    (folder.path / record_name("run-a", 0)).write_text(damaged)
    with pytest.raises(AirflowFailException, match=f"{record_name('run-a', 0)} is not the record of stage 1"):
        world.apply()
    with pytest.raises(AirflowFailException, match="rolloutctl restart-stage"):
        world.poke(applied)
    assert (folder.path / record_name("run-a", 0)).read_text() == damaged  # kept as it was


@pytest.mark.parametrize("need", [1234, 10**12])
def test_a_waiting_looks_need_is_kept_in_the_stages_record_for_its_next_poke(monkeypatch, tmp_path, need):
    """Each poke of the wait runs in a process of its own, on any worker: what its judge reckoned
    (``engine.judge_stage``: its looks' levels, a waiting look's need, about a second of CPU
    each) is kept with the stage's record in the run folder (``Attempt.reckoned``), and the next
    poke's judge is given it, so the look's other pokes do not reckon it again. A need has no
    bound (an estimate next to its margin: ``engine.need_n``); one of 2**31 or more was written,
    then read back as a damaged record, which failed the stage at its next poke."""
    from vision_rollout import attempts

    world = StageWorld(monkeypatch, tmp_path)
    given: list[dict] = []

    def stage_judge(spec, hook, source=None, reckoned=None):
        given.append(dict(reckoned))

        def judge(window, now=None):
            reckoned.clear()
            reckoned.update({"the inputs of look 4": need, "of its level": 0.0123})  # (as judge_stage puts them)
            return world.states.pop(0)

        return judge

    monkeypatch.setattr(steps, "stage_judge", stage_judge)
    applied = world.apply()
    world.states = [stage_state("waiting", 4, "WAIT at look 4 of 10")] * 2
    assert world.poke(applied) is None
    folder = steps.serving().settings.workdir("digits", "run-a")
    assert attempts.load(folder, "run-a", 0).attempts[0].reckoned == {
        "the inputs of look 4": need,
        "of its level": 0.0123,
    }
    assert world.poke(applied) is None
    assert given == [{}, {"the inputs of look 4": need, "of its level": 0.0123}]


def test_a_stage_run_more_times_than_its_record_keeps_is_counted_in_full(tmp_path):
    """The record keeps the first and the last ``MAX_RUNS`` applications and runs of an attempt:
    the report counted what was kept, 100 where the stage ran 150 times."""
    from vision_rollout import attempts
    from vision_rollout.folders import Folder

    folder = Folder(str(tmp_path))
    started = 0.0
    for n in range(150):
        started, _ = attempts.applied(folder, "run-a", 0, 1000.0 + n)
        attempts.judged(folder, "run-a", 0, started, f"ti-{n}")
    record = attempts.load(folder, "run-a", 0)
    (attempt,) = record.attempts
    assert len(attempt.applied) == len(attempt.tries) == attempts.MAX_RUNS  # bounded
    assert attempt.tries[-1] == "ti-149"
    sentence = attempts.runs_sentence(record, 0.05)
    assert "its weights were applied 150 times and its wait ran 150 times" in sentence


def test_a_breach_puts_the_stable_version_back_when_the_stage_record_is_damaged_meanwhile(monkeypatch, tmp_path):
    """The breach is kept in the record as it is then (read again): a record that cannot be
    read by then does not hold up the stable version's return."""
    from vision_rollout.attempts import record_name

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    folder = steps.serving().settings.workdir("digits", "run-a")
    breach = stage_state("breach", 0, "hard guard tripped: Canary P99 is 95 ms.")

    class Damaging(list):
        def pop(self, i=-1):
            (folder.path / record_name("run-a", 0)).write_text("{")
            return breach

    world.states = Damaging([breach])
    with pytest.raises(AirflowFailException, match="Canary P99 is 95 ms"):
        world.poke(applied)
    assert world.set[-1] == {"stable": True}


def test_a_restart_asked_for_between_a_pokes_read_and_its_write_is_kept(tmp_path, monkeypatch):
    """Each writer of the stage's record (a poke, a retry, ``rolloutctl restart-stage``) read it
    whole and wrote it whole: a restart written between a poke's read and its write was lost,
    and restart-stage had said it was asked for."""
    from vision_rollout import attempts
    from vision_rollout.folders import Folder

    folder = Folder(str(tmp_path))
    started, _ = attempts.applied(folder, "run-a", 0, 1000.0)
    load = attempts.load
    raced: list[str] = []

    def racing(*args):
        record = load(*args)
        if not raced:  # another writer, once, after this read
            raced.append("restart")
            attempts.request_restart(folder, "run-a", 0, "Prometheus fixed")
        return record

    monkeypatch.setattr(attempts, "load", racing)
    attempts.judged(folder, "run-a", 0, started, "ti-2")
    record = load(folder, "run-a", 0)
    assert record.restart == "Prometheus fixed"
    assert record.attempts[0].tries == ["ti-2"]
    assert record.attempts[0].runs == 1


def _judge_many(root: str, prefix: str, n: int, errors: Path) -> None:
    """A forked worker: its runs judged into the record, each judged again after a WriteConflict
    (others won ``CHANGE_TRIES`` times in a row, nothing of it written: as the task's retry
    would; how often depends on the machine's load); what failed otherwise written to
    ``errors`` (its traceback, shown by the test: a forked process's own output is not)."""
    import traceback

    from vision_rollout import attempts
    from vision_rollout.folders import Folder, WriteConflict

    try:
        for i in range(n):
            while True:
                try:
                    attempts.judged(Folder(root), "run-a", 0, 1000.0, f"{prefix}-{i}")
                    break
                except WriteConflict:
                    continue
    except BaseException:
        errors.write_text(traceback.format_exc())
        raise


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_writers_in_several_processes_at_once_lose_no_run(tmp_path, request, where):
    """Four workers counting their runs into one stage record at once: each run is counted, on a
    disk and in an object store (where a PUT landing between another's last read and its PUT
    was overwritten, that run lost)."""
    import multiprocessing

    from vision_rollout import attempts
    from vision_rollout.folders import Folder

    root = request.getfixturevalue("s3").uri() if where == "s3" else str(tmp_path)
    attempts.applied(Folder(root), "run-a", 0, 1000.0)
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_judge_many, args=(root, f"w{w}", 12, tmp_path / f"w{w}.err")) for w in range(4)]
    for p in workers:
        p.start()
    for w, p in enumerate(workers):
        p.join(120)
        errors = tmp_path / f"w{w}.err"
        assert p.exitcode == 0, f"worker w{w} exited {p.exitcode}:\n" + (
            errors.read_text() if errors.exists() else "(no error written)"
        )
    (attempt,) = attempts.load(Folder(root), "run-a", 0).attempts
    assert attempt.runs == 48
    assert sorted(attempt.tries) == sorted(f"w{w}-{i}" for w in range(4) for i in range(12))


def test_a_stage_record_does_not_grow_without_bound(tmp_path):
    """Windows the record never saw were each added as an attempt, and a run's id kept whole,
    whatever their number and size, and a record of any size was read whole into JSON."""
    from vision_rollout import attempts
    from vision_rollout.folders import Folder

    folder = Folder(str(tmp_path))
    name = attempts.record_name("run-a", 0)
    for n in range(attempts.MAX_RECORD_ATTEMPTS):
        attempts.judged(folder, "run-a", 0, 1000.0 + n, f"ti-{n}-" + "x" * 100_000)
    with pytest.raises(attempts.RecordError, match=f"holds {attempts.MAX_RECORD_ATTEMPTS} attempts already"):
        attempts.judged(folder, "run-a", 0, 5000.0, "ti")
    assert len(folder.read(name)) < attempts.MAX_RECORD_ATTEMPTS * 1000
    assert attempts.load(folder, "run-a", 0).attempts[-1].tries == [f"ti-39-{'x' * 194}"]
    (folder.path / name).write_bytes(b" " * (attempts.MAX_BYTES + 1))
    with pytest.raises(attempts.RecordError, match=f"over {attempts.MAX_BYTES} bytes"):
        attempts.load(folder, "run-a", 0)


def test_a_stage_applied_again_long_after_its_window_started_judges_new_traffic_at_the_alpha_left(
    monkeypatch, tmp_path
):
    """A run cleared two days after its stage began, its test undecided, resumed the old
    window: every look already due, judged at once on what the candidate served then (or, its
    traffic gone meanwhile, the same records again and again at ever lower bars), and passed on
    it with no new traffic seen. Its further looks are on a window from the re-run now, at the
    alpha its four looks left: whatever the windows, alpha in all."""
    from vision_rollout import attempts
    from vision_rollout.gates import spent

    world = StageWorld(monkeypatch, tmp_path)
    alphas: list[float] = []
    judge = steps.stage_judge  # (the world's)
    monkeypatch.setattr(steps, "stage_judge", lambda spec, *a: alphas.append(spec.alpha) or judge(spec, *a))
    applied = world.apply()
    world.states = [stage_state("waiting", 4, "WAIT at look 4 of 10")]
    assert world.poke(applied) is None
    # As if applied two days ago: the record and the XCom.
    folder = steps.serving().settings.workdir("digits", "run-a")
    path = folder.path / attempts.record_name("run-a", 0)
    record = json.loads(path.read_text())
    record["attempts"][0]["started"] -= 2 * 86400
    path.write_text(json.dumps(record))
    old = {**applied, "started": applied["started"] - 2 * 86400}
    again = world.apply()
    assert again["started"] == old["started"]  # the same attempt, not a restart
    world.states = [stage_state("pass", 2, "PASS at look 2")]
    verdict = world.poke(again, try_number=2)
    assert world.judged[-1] >= applied["started"]  # a window from the re-run, not two days ago
    left = 0.05 - spent(0.05, 0.4, "obrien-fleming")
    assert alphas == [0.05, pytest.approx(left)]
    assert verdict["decision"] == "pass"
    sentence = verdict["checks"][-1]["sentence"]
    assert "its window had started over its max_stage_seconds before" in sentence
    assert f"at {100 * left / 0.05:.3g}% of its alpha" in sentence
    (attempt,) = attempts.load(folder, "run-a", 0).attempts
    assert attempt.moves == 1
    assert attempt.window_start >= applied["started"]
    assert "RESTARTED" not in sentence


def test_a_stage_whose_looks_spent_its_alpha_before_its_window_moved_ends_undecided(monkeypatch, tmp_path):
    from vision_rollout import attempts

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    world.states = [stage_state("waiting", 10, "passed at look 10 of 10; baking until 600 s")]
    assert world.poke(applied) is None
    folder = steps.serving().settings.workdir("digits", "run-a")
    path = folder.path / attempts.record_name("run-a", 0)
    record = json.loads(path.read_text())
    record["attempts"][0]["started"] -= 2 * 86400
    path.write_text(json.dumps(record))
    again = world.apply()
    verdict = world.poke(again, try_number=2)
    assert verdict["status"] == "undecided"
    assert "its looks before its window moved spent its alpha" in verdict["summary"]
    assert len(world.judged) == 1  # nothing judged on the new window


def test_a_write_of_a_stage_record_killed_mid_way_leaves_the_record_whole_and_no_file_for_good(tmp_path):
    """A worker killed while writing the record leaves it as it was, and its temporary file in
    the run folder, which nothing removed: one more for each such kill."""
    from vision_rollout import attempts
    from vision_rollout.folders import Folder

    folder = Folder(str(tmp_path))
    started, _ = attempts.applied(folder, "run-a", 0, 1000.0)
    name = attempts.record_name("run-a", 0)
    killed = tmp_path / f".{name}.4242.tmp"
    killed.write_bytes(b'{"run_id": "run-a", "sta')  # (its write cut short)
    other = tmp_path / ".other.json.4242.tmp"
    other.write_bytes(b"")
    assert attempts.load(folder, "run-a", 0).attempts[0].started == started
    attempts.judged(folder, "run-a", 0, started, "ti-1")
    assert not killed.exists()
    assert other.exists()  # (another file's)


def test_a_wait_cleared_alone_after_its_record_was_set_aside_judges_nothing(monkeypatch, tmp_path):
    """After restart-stage set a damaged record aside, the stage's wait cleared on its own (not
    its apply_mesh_weights) judged its old window as a first test, at the full alpha, never
    reported as a restart, the fresh test asked for still waiting behind it."""
    from vision_rollout import attempts
    from vision_rollout.cli import main

    world = StageWorld(monkeypatch, tmp_path)
    applied = world.apply()
    folder = steps.serving().settings.workdir("digits", "run-a")
    (folder.path / attempts.record_name("run-a", 0)).write_text("{half a record")
    args = ["restart-stage", "--run-dir", str(tmp_path), "--model", "digits", "--run-id", "run-a", "--stage", "1"]
    assert main([*args, "--reason", "record damaged"]) == 0
    world.states = [stage_state("pass", 2, "PASS at look 2")]
    with pytest.raises(AirflowFailException, match="until its apply_mesh_weights runs again"):
        world.poke(applied, try_number=2)
    assert world.judged == []
    record = attempts.load(folder, "run-a", 0)
    assert record.attempts == []
    assert record.restart is not None
    assert record.restart.startswith("record damaged")


def test_a_promote_after_a_wait_prometheus_lost_part_of_says_the_guards_were_blind(monkeypatch, tmp_path):
    """Prometheus restarted without its storage while the promotion awaited approval: the guards'
    reads over the last stage and the wait found no breach in what it still held, and the
    promotion was reported as if they had watched all along. The decision (the final report's)
    now says for how long and when they were blind; it still promotes."""
    import re
    import time

    since = time.time() - 300
    source = p99_since(monkeypatch, since, 20.0)
    every_second = [(float(t), 20.0) for t in range(int(since), int(time.time()) + 60)]
    source.points = [(t, v) for t, v in every_second if t >= since + 120]  # nothing before its restart
    answer, restored = approved(monkeypatch, tmp_path, "Promote", since)
    assert restored == []
    assert "guard_breach" not in answer
    outcome, reason = decide(GUARDED, [PASS, PASS], None, approval=answer)
    assert outcome == "promote"
    assert re.search(
        r"approved by Alice; but the hard guards were blind for 1[12]\d s of the last stage and the wait "
        r"for approval \(\d\d:\d\d:\d\d to \d\d:\d\d:\d\d UTC: ",
        reason,
    ), reason
    source.points = every_second  # they watched it all
    answer, _ = approved(monkeypatch, tmp_path, "Promote", since)
    assert "blind" not in decide(GUARDED, [PASS, PASS], None, approval=answer)[1]


def test_an_audit_run_leaves_the_hours_its_time_does_not_reach_to_the_next_run(monkeypatch, tmp_path, slack):
    """A run caught up to 24 hours (168 by the form), each audit reading for up to
    ``MAX_AUDIT_S``: on a slow store one run took hours, and the hourly runs (one at a time)
    queued behind it. A run begins no hour's audit after ``AUDIT_RUN_S`` (the first always): the
    hours left are not marked audited, the next run takes them up, and the run fails naming
    them (they drop out of the catch-up window otherwise, unseen)."""
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowException

    from tests.support import shadow_log
    from vision_rollout.audit import AUDITED

    this_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    hour = {k: this_hour - timedelta(hours=k) for k in range(5)}
    for k in (4, 2):
        shadow_log(tmp_path, 60, disagree=0.02, seed=k, at=(hour[k] + timedelta(minutes=30)).timestamp())
    run = tmp_path / "run"
    extra = {"shadow_log": str(tmp_path / "log"), "run_dir": str(run)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    monkeypatch.setattr(steps, "AUDIT_RUN_S", 0.0)
    left = f"3 hours not audited within the run's 0 s \\(AUDIT_RUN_S\\), left to the next run: {hour[3]:%Y-%m-%d %H:00}"
    with pytest.raises(AirflowException, match=left):
        steps.audit_hours("digits", hour[0], catch_up_hours=3)
    audits = run / "audits" / "digits"
    assert {p.parent.name for p in audits.glob(f"*/{AUDITED}")} == {hour[4].strftime("%Y%m%dT%H")}
    monkeypatch.setattr(steps, "AUDIT_RUN_S", 3600.0)
    results = steps.audit_hours("digits", hour[0], catch_up_hours=3)
    assert [r["start"] for r in results] == [hour[k].isoformat() for k in (3, 2, 1)]


@pytest.mark.integration
def test_the_hourly_audit_reads_the_mirror_share_over_time_from_a_real_prometheus(
    server_factory, repo_copy, tmp_path, monkeypatch
):
    """``mirror_shares`` asks the real Prometheus for the share a sample a minute: one series
    (the replicas' largest), the server's 100% at the samples once scraped, none where the mirror
    was not yet configured (the samples before the server started)."""
    import time

    from devstack.processes import start_prometheus

    s = mirroring(server_factory, repo_copy, tmp_path)
    prom = start_prometheus([s.url], tmp_path / "prometheus")
    try:
        monkeypatch.setenv(
            "AIRFLOW_CONN_PROMETHEUS_DEFAULT",
            json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": prom.port}),
        )
        end = datetime.now(UTC) + timedelta(seconds=3)
        time.sleep(max(0.0, end.timestamp() - time.time()) + 1.5)  # (scraped a second apart)
        shares = steps.mirror_shares("digits", end - timedelta(hours=1), end)
        assert shares is not None
        assert [p for _, p in shares] == [100.0]
        assert shares[0][0] == pytest.approx(end.timestamp(), abs=0.01)
        assert steps.mirror_shares("mnist", end - timedelta(hours=1), end) is None  # (no such series)
    finally:
        prom.stop()


@pytest.mark.integration
def test_the_masking_probe_looks_for_its_copy_no_longer_than_its_window(
    server_factory, repo_copy, models_dir, monkeypatch, tmp_path
):
    """enable_shadow read the prediction log for the probe's copy with no deadline: on a slow
    store (here 10 s a file), each look read every file of the minutes around the probe, however
    long that took, the window (30 s) checked only between reads, and the task ran on until
    Airflow's execution timeout. Its reads begin no file once the window is spent, and the
    failure says the log was read in part."""
    import time
    import types
    from datetime import UTC, datetime

    from model_server import predictionlog
    from tests.support import SlowStore

    validation = repo_copy / "digits" / "validation"
    validation.mkdir()
    rows = (models_dir / "digits" / "validation" / "labels.csv").read_text().splitlines()[:2]
    (validation / "labels.csv").write_text("\n".join(rows) + "\n")
    name = rows[1].split(",")[0]
    (validation / name).write_bytes((models_dir / "digits" / "validation" / name).read_bytes())
    log = tmp_path / "log"
    log.mkdir()
    s = server_factory(repo_copy, "--prediction-log", str(log), token=TOKEN)
    conn = {"conn_type": "http", "host": "127.0.0.1", "port": s.port, "password": TOKEN}
    conn["extra"] = {"run_dir": str(tmp_path / "run"), "repository": str(repo_copy), "prediction_log": str(log)}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    report = steps.build_image(PARAMS, "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", report, report["sha256"])
    now = datetime.now(UTC)
    hour = log / "model=digits" / f"dt={now:%Y-%m-%d}" / f"hour={now:%H}"
    hour.mkdir(parents=True)
    for i in range(40):  # (other writers' files of the probe's minutes, read before the server's by name)
        (hour / f"part-aaa-{now:%Y%m%dT%H%M%S}Z-{i:012x}.parquet").write_bytes(b"not parquet")
    store = SlowStore(time.monotonic(), per_file=10.0)
    monkeypatch.setattr(predictionlog, "filesystem", store.filesystem)
    monkeypatch.setattr(steps, "time", types.SimpleNamespace(monotonic=store.clock, sleep=store.sleep, time=time.time))
    with pytest.raises(AirflowFailException, match=r"no shadow copy .* not read within the probe's 30 s"):
        steps.enable_shadow(PARAMS, "run-a")
    assert store.opened < 40


def chart_conn(monkeypatch, tmp_path) -> None:
    """The model server's connection: its run folder, prediction log and model repository (a
    validation set of 20 images of digits) in ``tmp_path``, no server behind it."""
    validation = tmp_path / "models" / "digits" / "validation"
    validation.mkdir(parents=True)
    (validation / "labels.csv").write_text("file,label\n" + "".join(f"{i}.png,{i % 10}\n" for i in range(20)))
    for i in range(20):
        (validation / f"{i}.png").write_bytes(b"image-%d" % i)
    extra = {
        "run_dir": str(tmp_path / "run"),
        "prediction_log": str(tmp_path / "log"),
        "repository": str(tmp_path / "models"),
    }
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))


def judged(decision: str, t0: float) -> dict:
    """A stage's verdict as its wait kept it: decided at look 2 of 3, on the records from ``t0``
    to 100 s later."""
    return {
        "decision": decision,
        "status": decision,
        "summary": f"{decision.upper()} at look 2",
        "look": 2,
        "looks": 3,
        "checks": [],
        "bake": {"window": t0, "until": t0 + 100, "look": 2, "looks": 3},
    }


def _chart_in_thread(slack, posted: dict) -> tuple[dict, bytes]:
    """The one file in the thread of the report ``posted``, and its bytes."""
    (shared,) = [f for r in slack.thread_replies(posted["channel"], posted["ts"]) for f in r.get("files", [])]
    return shared, slack.uploads[shared["id"]]


@pytest.mark.parametrize("outcome", ["promote", "rollback"])
def test_the_final_report_carries_the_chart_of_the_stage_that_decided(monkeypatch, tmp_path, slack, outcome):
    """The promotion's and the rollback's report went without a chart. Now notify (on a worker of
    its own: what it charts it reads from the prediction log) uploads, into the report's thread,
    the chart of the last stage judged, of the samples its deciding look judged: the 100% stage's
    validation replay for a promotion, the 50% stage's live arms for a rollback there."""
    chart_conn(monkeypatch, tmp_path)
    t0 = time.time() - 900
    stage_evidence(tmp_path, t0, replay=False)
    stage_evidence(tmp_path, t0 + 300, replay=True)
    if outcome == "promote":
        verdicts = [judged("pass", t0), judged("pass", t0 + 300)]
        title = "digits v2 vs v1: 100% stage, look 2 of 3, validation replay"
    else:
        verdicts = [judged("fail", t0), None]
        title = "digits v2 vs v1: 50% stage, look 2 of 3, live A/B arms"
    from vision_rollout import notify

    charted = []
    draw = notify.latency_accuracy_chart
    monkeypatch.setattr(
        notify, "latency_accuracy_chart", lambda samples, t: charted.append(samples) or draw(samples, t)
    )
    sent = steps.notify(PARAMS, outcome, "the evidence", verdicts, None, "run-a")
    (samples,) = charted
    assert list(samples.columns) == ["arm", "latency_ms", "correct"]  # (no request's id, tenant, image)
    by_arm = samples.groupby("arm")
    assert by_arm["latency_ms"].count().to_dict() == {"baseline": 100, "canary": 100}
    if outcome == "promote":  # (each image's first answer per version: the paired check's evidence)
        assert by_arm["correct"].count().to_dict() == {"baseline": 20, "canary": 20}
    else:  # (the live labels joined: a fifth of the canary's answers wrong)
        assert by_arm["correct"].mean().to_dict() == {"baseline": 1.0, "canary": 0.8}
    assert sent["chart"] is True
    (posted,) = slack.messages()
    assert "No chart" not in json.dumps(posted["blocks"])
    shared, png = _chart_in_thread(slack, sent)
    assert shared["title"] == posted["text"][:100]  # (as find_chart knows it)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_title(png) == title
    assert not list((tmp_path / "run" / "outbox").glob("*.png"))


def test_a_report_whose_stage_samples_cannot_be_read_is_sent_without_a_chart_saying_so(monkeypatch, tmp_path, slack):
    """A file of the deciding stage's records that cannot be read (truncated): the chart would be
    of part of what the gate judged. The report goes all the same, without it, saying why in one
    line."""
    chart_conn(monkeypatch, tmp_path)
    t0 = one_hours_t0()  # (the one file: records in one hour)
    stage_evidence(tmp_path, t0, replay=False)
    (written,) = (tmp_path / "log").rglob("part-*.parquet")
    written.write_bytes(written.read_bytes()[:100])
    sent = steps.notify(PARAMS, "rollback", "the evidence", [judged("fail", t0), None], None, "run-a")
    assert "chart" not in sent
    assert "slack_error" not in sent
    (posted,) = slack.messages()
    assert posted["text"].startswith("Rolled back digits v2")
    lines = [e["text"] for b in posted["blocks"] if b["type"] == "context" for e in b["elements"]]
    (line,) = [t for t in lines if "No chart" in t]
    assert "the 50% stage's samples could not be read" in line
    assert slack.uploads == {}


def ended_at_look_0(t0: float) -> dict:
    """A stage's verdict as its wait kept it where the stage ended before a look was judged."""
    return {**judged("wait", t0), "status": "undecided", "look": 0, "bake": {"window": t0, "until": None}}


@pytest.mark.parametrize(
    ("stages", "said"),
    [
        ("look 0", "the 50% stage ended before a look was judged"),  # (the first stage, before its first look)
        ("breach, unreached", "the 50% stage has no verdict"),  # (the first stage's hard guard: no verdict at all)
        ("pass, breach", "the 100% stage has no verdict"),  # (a hard guard: the gate task failed, no verdict in XCom)
        ("pass, look 0", "the 100% stage ended before a look was judged"),
    ],
)
def test_a_rollback_whose_stage_had_no_look_judged_charts_no_earlier_stage(monkeypatch, tmp_path, slack, stages, said):
    """The report names the stage that rolled the candidate back. Where that stage had no look
    judged (a hard guard's breach, a stage ended at look 0), the chart was of the last earlier
    stage judged, which passed: its passing evidence under a rollback. Now no chart, and one line
    saying the named stage had no look judged, or no verdict at all; the first stage's breach
    too (no stage has a verdict): its report had no such line, a later stage's had."""
    chart_conn(monkeypatch, tmp_path)
    t0 = time.time() - 900
    stage_evidence(tmp_path, t0, replay=False)
    kinds = {"look 0": ended_at_look_0(t0 + 300), "breach": None, "unreached": None, "pass": judged("pass", t0)}
    verdicts = [kinds[k] for k in stages.split(", ")]
    sent = steps.notify(PARAMS, "rollback", "hard guard tripped", verdicts, None, "run-a")
    assert "chart" not in sent
    (posted,) = slack.messages()
    assert f"was rolled back at the {said.split()[1]} stage" in json.dumps(posted["blocks"])
    lines = [e["text"] for b in posted["blocks"] if b["type"] == "context" for e in b["elements"]]
    (line,) = [t for t in lines if "No chart" in t]
    assert said in line
    assert slack.uploads == {}


def test_a_report_sent_again_after_the_run_ended_reads_and_uploads_no_second_chart(monkeypatch, tmp_path, slack):
    """notify cleared after the run ended: its report, sent again into the first report's thread,
    read the stage's samples again and uploaded a second chart there. Now the chart is drawn only
    for the report's first sending."""
    from vision_rollout import notify

    chart_conn(monkeypatch, tmp_path)
    t0 = time.time() - 900
    stage_evidence(tmp_path, t0, replay=False)
    verdicts = [judged("fail", t0), None]
    first = steps.notify(PARAMS, "rollback", "the evidence", verdicts, None, "run-a")
    assert first["chart"] is True
    ended = {"holder": "run-a", "decided": "rollback", "report": {"channel": first["channel"], "ts": first["ts"]}}
    steps.serving().settings.workdir("digits", "run-a").write("ended.json", json.dumps(ended).encode())
    charted = []
    monkeypatch.setattr(notify, "report_chart", lambda *args, **kwargs: charted.append(args) or (b"png", None))
    again = steps.notify(PARAMS, "rollback", "the evidence", verdicts, None, "run-a")
    assert charted == []
    assert "chart" not in again
    _, reply = slack.messages()
    assert reply["text"].startswith("Sent again")
    assert reply["thread_ts"] == first["ts"]
    assert "No chart" not in json.dumps(reply["blocks"])
    assert len(slack.uploads) == 1


def test_a_final_report_left_in_the_outbox_keeps_its_chart_beside_it(monkeypatch, tmp_path):
    """No Slack token (the one-machine setup): the report and its chart wait in the outbox,
    for ``rolloutctl outbox send`` to post the one and upload the other into its thread."""
    chart_conn(monkeypatch, tmp_path)
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_API_DEFAULT", raising=False)
    t0 = time.time() - 900
    stage_evidence(tmp_path, t0, replay=False)
    sent = steps.notify(PARAMS, "rollback", "the evidence", [judged("fail", t0), None], None, "run-a")
    (report,) = (tmp_path / "run" / "outbox").glob("*.json")
    assert sent["outbox"].endswith(report.name)
    (png,) = (tmp_path / "run" / "outbox").glob("*.png")
    assert json.loads(report.read_text())["chart"] == png.name
    assert png_title(png.read_bytes()) == "digits v2 vs v1: 50% stage, look 2 of 3, live A/B arms"


@pytest.mark.parametrize("how", ["stopped", "no look judged"])
def test_the_teardowns_own_report_carries_the_chart_notifys_would(monkeypatch, tmp_path, how):
    """A run that failed in a task (marked failed, a step that failed: notify never ran) is
    reported by its teardown: that report went without a chart where notify's carries the chart
    of the stage that decided. It carries the same one now (the run's verdicts, read as notify
    reads them), or the same line saying why there is none."""
    from airflow.sdk.exceptions import AirflowFailException

    chart_conn(monkeypatch, tmp_path)
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_API_DEFAULT", raising=False)
    t0 = time.time() - 900
    stage_evidence(tmp_path, t0, replay=False)
    finished_with(monkeypatch, False, "version 1 takes 100%; version 2 is unloaded")
    verdicts = [judged("fail", t0), None]
    if how == "no look judged":
        verdicts = [judged("pass", t0), ended_at_look_0(t0 + 300)]
    with pytest.raises(AirflowFailException):
        steps.ensure_stable(PARAMS, "run-a", None, None, None, None, lambda: verdicts)
    outbox = tmp_path / "run" / "outbox"
    (report,) = outbox.glob("*.json")
    record = json.loads(report.read_text())
    lines = [e["text"] for b in record["blocks"] if b["type"] == "context" for e in b["elements"]]
    if how == "no look judged":
        (line,) = [t for t in lines if "No chart" in t]
        assert "the 100% stage ended before a look was judged" in line
        assert "chart" not in record
        assert not list(outbox.glob("*.png"))
        return
    assert not [t for t in lines if "No chart" in t]
    (png,) = outbox.glob("*.png")
    assert record["chart"] == png.name
    assert png_title(png.read_bytes()) == "digits v2 vs v1: 50% stage, look 2 of 3, live A/B arms"


def test_the_dags_teardown_restores_before_it_reads_its_charts_verdicts(monkeypatch, tmp_path):
    """The DAG's ensure_stable pulled the stages' evidence from XCom (some 25 pulls: verdicts,
    each step's failure, the audit), for its report's chart, before it put the stable version
    back: a pull that raised (the API server answering 503) failed the teardown with nothing
    restored. It restores first now; then, for its own report only, the verdicts alone are
    pulled, and a pull that raises leaves the report without a chart, saying so."""
    from tests.dags.test_model_rollout_e2e import rollout_dag

    chart_conn(monkeypatch, tmp_path)
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_API_DEFAULT", raising=False)
    order: list = []

    class Flaky:
        def xcom_pull(self, task_ids, key="return_value"):
            order.append((task_ids, key))
            if task_ids.startswith("stage_"):
                raise RuntimeError("execution API: 503 Service Unavailable")

    def finish(*args, **kwargs):
        order.append("finish")
        return False, "version 1 takes 100%; version 2 is unloaded"

    monkeypatch.setattr(steps, "finish", finish)
    monkeypatch.setattr(steps, "notify_left", lambda *args, **kwargs: (None, False))
    task = rollout_dag().get_task("ensure_stable")
    with pytest.raises(AirflowFailException, match="version 1 takes 100%"):
        task.python_callable(**task.determine_kwargs({"params": PARAMS, "run_id": "run-a", "ti": Flaky()}))
    pulled = order[order.index("finish") + 1 :]
    assert not [p for p in order[: order.index("finish")] if p[0].startswith("stage_")]
    assert pulled == [("stage_1.statistical_gate", "return_value")]  # (the first raised)
    (report,) = (tmp_path / "run" / "outbox").glob("*.json")
    record = json.loads(report.read_text())
    assert record["text"].startswith("Rolled back digits v2")
    lines = [e["text"] for b in record["blocks"] if b["type"] == "context" for e in b["elements"]]
    (line,) = [t for t in lines if "No chart" in t]
    assert "503 Service Unavailable" in line
    assert "chart" not in record


@pytest.mark.parametrize("sender", ["notify", "teardown"])
def test_a_final_report_whose_chart_raises_is_sent_without_it_saying_so(monkeypatch, tmp_path, sender):
    """The chart's code raising (its thread not started, a MemoryError) lost the run's final
    report: notify's, the teardown's own. The report goes without the chart, saying in one line
    that it could not be drawn."""
    from vision_rollout import notify

    chart_conn(monkeypatch, tmp_path)
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_API_DEFAULT", raising=False)

    def cannot(*args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(notify, "report_chart", cannot)
    verdicts = [judged("fail", time.time() - 900), None]
    if sender == "notify":
        sent = steps.notify(PARAMS, "rollback", "the evidence", verdicts, None, "run-a")
        assert sent["outbox"]
    else:
        finished_with(monkeypatch, False, "version 1 takes 100%; version 2 is unloaded")
        with pytest.raises(AirflowFailException, match="version 1 takes 100%"):
            steps.ensure_stable(PARAMS, "run-a", None, None, None, None, lambda: verdicts)
    outbox = tmp_path / "run" / "outbox"
    (report,) = outbox.glob("*.json")
    record = json.loads(report.read_text())
    assert record["text"].startswith("Rolled back digits v2")
    lines = [e["text"] for b in record["blocks"] if b["type"] == "context" for e in b["elements"]]
    (line,) = [t for t in lines if "No chart" in t]
    assert "could not be drawn" in line
    assert "can't start new thread" in line
    assert "chart" not in record


@pytest.mark.parametrize("reached", ["no stage", "a stage still waiting"])
def test_the_teardowns_report_says_no_false_word_of_a_stage_not_judged(monkeypatch, tmp_path, reached):
    """The teardown of a run that failed before any stage (no verdict at all), or while a stage's
    wait was still going (no verdict written yet), said "No chart: the 50% stage ended before a
    look was judged": of a stage never reached, or one not ended. Where no stage has a verdict
    there is no chart line (nothing to chart); where the stage that decided has none, the line
    says just that."""
    chart_conn(monkeypatch, tmp_path)
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_API_DEFAULT", raising=False)
    finished_with(monkeypatch, False, "version 1 takes 100%; version 2 is unloaded")
    t0 = time.time() - 900
    stage_evidence(tmp_path, t0, replay=False)
    verdicts = [None, None, None, None] if reached == "no stage" else [judged("pass", t0), None, None, None]
    with pytest.raises(AirflowFailException):
        steps.ensure_stable(PARAMS, "run-a", None, None, None, None, lambda: verdicts)
    (report,) = (tmp_path / "run" / "outbox").glob("*.json")
    record = json.loads(report.read_text())
    lines = [e["text"] for b in record["blocks"] if b["type"] == "context" for e in b["elements"]]
    said = [t for t in lines if "No chart" in t]
    assert "chart" not in record
    if reached == "no stage":
        assert said == []
        return
    (line,) = said
    assert "the 100% stage has no verdict" in line


@pytest.mark.parametrize("judged_stages", [True, False])
def test_a_teardown_that_could_not_restore_reports_at_once_without_a_chart(monkeypatch, tmp_path, judged_stages):
    """A teardown that could not put the stable version back drew the chart of its report (up to
    ``CHART_BUDGET_S``, 30 s) before failing, which is what sets off the failure callback's second
    try of the routes. Its report now goes at once, without a chart, and the failure goes up
    after it. It read the stages' verdicts first, to say "No chart" only where a stage was
    judged: XCom pulls, each retried by Airflow's client for minutes against a slow API server,
    before the report and the failure. It reads nothing now, and says nothing of a chart."""
    from vision_rollout import notify

    chart_conn(monkeypatch, tmp_path)
    monkeypatch.delenv("AIRFLOW_CONN_SLACK_API_DEFAULT", raising=False)
    t0 = time.time() - 900
    stage_evidence(tmp_path, t0, replay=False)
    drawn = []
    monkeypatch.setattr(notify, "report_chart", lambda *args, **kwargs: drawn.append(args) or (b"png", None))

    def unreachable(*args, **kwargs):
        raise AirflowFailException("version 1 has no Deployment: the routes stay as they are")

    monkeypatch.setattr(steps, "finish", unreachable)
    read = []

    def verdicts():  # (the DAG's stage_verdicts: XCom pulls through the API server, each retried)
        read.append(True)
        return [judged("fail", t0), None] if judged_stages else [None, None]

    with pytest.raises(AirflowFailException, match="no Deployment"):
        steps.ensure_stable(PARAMS, "run-a", None, None, None, None, verdicts)
    assert drawn == []
    assert read == []
    outbox = tmp_path / "run" / "outbox"
    (report,) = outbox.glob("*.json")
    record = json.loads(report.read_text())
    assert "could not put version 1 back" in record["text"]
    lines = [e["text"] for b in record["blocks"] if b["type"] == "context" for e in b["elements"]]
    assert not [t for t in lines if "No chart" in t]
    assert "chart" not in record
    assert not list(outbox.glob("*.png"))


@pytest.mark.parametrize(
    ("sent", "said"),
    [
        ({"outbox": "/run/outbox/r.json", "slack_error": "invalid_auth"}, "it is in the outbox, /run/outbox/r.json"),
        (
            {"channel": "#c", "maybe_posted": True, "slack_error": "cut off; it cannot be kept in the outbox"},
            "look for it in #c and post it by hand",
        ),
    ],
)
def test_a_report_told_during_the_run_logs_where_it_is(monkeypatch, caplog, sent, said):
    """A report sent during the run (the request for approval, a guard's breach) that Slack did
    not take was logged as "it is in the outbox" even where it is kept nowhere (a post Slack may
    have taken, the outbox failing): nobody looked for it. The log says what the teardown says."""
    import logging

    monkeypatch.setattr(steps, "send", lambda spec, message: sent)
    with caplog.at_level(logging.WARNING):
        steps.tell(steps.spec_from(PARAMS), None, "the request for approval")
    assert said in caplog.text
    assert ("in the outbox, " in caplog.text) == ("outbox" in sent)


def test_a_baseline_not_scaled_back_to_one_pod_says_1_pod():
    """What a restore whose scale of a baseline at 0 failed leaves (``unscaled``) said "was not
    scaled back to 1 pods from 0" for a build of one pod. A count of one is said "1 pod"."""
    assert steps.unscaled(1) == "was not scaled back to 1 pod from 0"
    assert steps.unscaled(1, maybe=True).startswith("may have been scaled back to 1 pod from 0 or not (")
    assert steps.unscaled(2) == "was not scaled back to 2 pods from 0"
    assert steps.unscaled(2, maybe=True).startswith("may have been scaled back to 2 pods from 0 or not (")
