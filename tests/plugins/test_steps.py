"""decide: the evidence first, then (with require_approval) the reviewer's answer. One run at a
time per model in local mode (the lock file)."""

from __future__ import annotations

import json
import socket

import pytest
from airflow.sdk.exceptions import AirflowFailException

from rollout_airflow import steps
from rollout_airflow.steps import approval_body, decide

PASS = {"decision": "pass", "summary": "PASS at look 1"}
FAIL = {"decision": "fail", "summary": "FAIL: canary P99 regressed 40%"}
PARAMS = {"candidate_version": "2", "stages": [50, 100]}
ALICE = {"chosen_options": ["Promote"], "responded_by_user": {"id": "alice", "name": "Alice"}}


def test_every_stage_passing_promotes_without_approval():
    assert decide(PARAMS, [PASS, PASS], None) == ("promote", "every stage passed")


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
    result = decide({**PARAMS, "require_approval": True}, [PASS, PASS], None, approval=approval)
    assert result[0] == outcome
    assert words in result[1]


def test_the_reviewer_reads_each_stage():
    body = approval_body(PARAMS, "every stage passed", [PASS, PASS])
    assert "**50%**: PASS at look 1" in body
    assert "**100%**: PASS at look 1" in body
    assert "No answer in time rolls back" in body


def test_in_local_mode_a_second_run_of_a_model_touches_nothing(monkeypatch, tmp_path):
    """The model server's address answers nothing: any call to it would fail these steps."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    extra = {"run_dir": str(tmp_path), "repository": str(tmp_path / "no-models")}
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT",
        json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": closed_port, "extra": extra}),
    )
    lock = steps.serving().model_lock("digits", "local")
    lock.acquire("run-a")
    with pytest.raises(AirflowFailException, match=r"model 'digits' is being rolled out by run 'run-a'"):
        steps.build_image(PARAMS, "run-b")
    assert "nothing restored" in steps.ensure_stable(PARAMS, "run-b", None, None, None)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-b"})
    assert lock.holding().holder == "run-a"
    assert json.loads((tmp_path / "locks" / "digits.lock").read_text())["holder"] == "run-a"
    assert steps.serving().model_lock("mnist", "local").acquire("run-c").holder == "run-c"  # another model
