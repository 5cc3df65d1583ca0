"""The data plane without HTTP: routing, inference, the shadow copy, the prediction log record,
feedback and readiness, driven through DataPlane (and Admin) on a real repository."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from prometheus_client import REGISTRY

from model_server import metrics, predictionlog
from model_server.admin import Admin
from model_server.dataplane import DataPlane, InferResult, RequestContext, Route, shadow_record
from model_server.errors import (
    Conflict,
    InferenceFailed,
    InjectedFault,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    Preempted,
    Unauthorized,
)
from model_server.feedback import FeedbackSigner, FeedbackStore, LabelRules
from model_server.masking import KeyRing, Masker
from model_server.predictionlog import PredictionLog, read
from model_server.protocol import InferInput
from model_server.repository import ModelRepository
from model_server.shadow import ShadowJob, ShadowMirror, ShadowResult
from model_server.trace import TraceContext
from model_server.traffic import PolicyStore, TrafficPolicy
from tests.conftest import ROOT

SPLIT = {"route": [{"version": "1", "weight": 10}, {"version": "2", "weight": 90}]}
MIRROR = {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}


@pytest.fixture
def repo(models_dir):
    """digits versions 1 and 2 loaded (nothing persisted: no state folder)."""
    repo = ModelRepository(models_dir, ["CPUExecutionProvider"])
    repo.load("digits", {"version_policy": {"specific": {"versions": [1, 2]}}})
    yield repo
    repo.close_all()


def data_plane(repo, prediction_log=None, state_dir=None) -> DataPlane:
    policies = PolicyStore(state_dir, on_change=metrics.show_traffic_policy)
    feedback = FeedbackStore(FeedbackSigner(b"data-plane-test-key"))
    return DataPlane(repo, policies, feedback, ShadowMirror(repo), prediction_log)


@pytest.fixture
def dp(repo) -> DataPlane:
    return data_plane(repo)


def apply(dp: DataPlane, policy: dict) -> None:
    dp.policies.apply("digits", TrafficPolicy.from_dict(policy))


def request(image: bytes) -> tuple[bytes, str]:
    """A KServe v2 request body with one image as binary data, and its JSON part's length."""
    blob = struct.pack("<I", len(image)) + image
    head = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}
            ]
        }
    ).encode()
    return head + blob, str(len(head))


def infer(dp: DataPlane, image: bytes, ctx: RequestContext, version: str | None = None) -> InferResult:
    body, json_length = request(image)
    result = asyncio.run(dp.infer("digits", version, body, ctx, json_length))
    result.settle(True)  # as the transport does once the answer is written
    return result


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- routing ------------------------------------------------------------------------------------


def test_route_splits_users_by_weight_and_keeps_each_on_one_version(dp):
    apply(dp, SPLIT)
    routes = {u: dp.route("digits", None, RequestContext("r", headers={"x-user-id": f"user-{u}"})) for u in range(2000)}
    shares = Counter(r.version for r in routes.values())
    assert set(shares) == {"1", "2"}
    assert 0.85 < shares["2"] / 2000 < 0.95
    assert {r.decided_by for r in routes.values()} == {"route"}
    again = dp.route("digits", None, RequestContext("other", headers={"x-user-id": "user-7"}))
    assert again.version == routes[7].version  # sticky: the user's bucket, not the request's


def test_without_x_user_id_the_client_address_is_the_sticky_key(dp):
    apply(dp, SPLIT)
    versions = {c: dp.route("digits", None, RequestContext("r", client=f"10.0.0.{c}")).version for c in range(200)}
    assert set(versions.values()) == {"1", "2"}
    assert all(
        dp.route("digits", None, RequestContext("x", client=f"10.0.0.{c}")).version == v for c, v in versions.items()
    )


def test_a_named_version_overrides_rules_and_weights(dp):
    apply(
        dp,
        {
            **SPLIT,
            "rules": [
                {"name": "acme", "match": {"headers": {"x-tenant": {"exact": "acme"}}}, "route": [{"version": "1"}]}
            ],
        },
    )
    acme = RequestContext("r", headers={"x-tenant": "acme", "x-user-id": "u"})
    assert dp.route("digits", None, acme) == Route("1", "acme", dp.policies.get("digits"))
    header = RequestContext("r", headers={"x-tenant": "acme", "x-model-version": "2"})
    assert dp.route("digits", None, header)[:2] == ("2", "version")
    assert dp.route("digits", "1", header)[:2] == ("1", "version")  # the path's version before the header


def test_without_a_policy_the_highest_loaded_version_serves(dp, digit_images):
    assert dp.route("digits", None, RequestContext("r"))[:2] == (None, "route")
    result = infer(dp, digit_images[0][0], RequestContext("r"))
    assert result.version == "2"
    assert result.shadow is None


# -- inference ----------------------------------------------------------------------------------


def test_infer_serves_the_routed_version_and_counts_it_by_what_decided(dp, digit_images):
    apply(dp, SPLIT)
    ctx = RequestContext("req-1", headers={"x-user-id": "user-7"})
    chosen = dp.route("digits", None, ctx).version
    before = sample("model_server_routed_requests_total", model="digits", version=chosen, decided_by="route")
    result = infer(dp, digit_images[0][0], ctx)
    assert result.version == chosen
    assert result.json_length is None  # outputs as JSON: nothing asked for binary
    answer = json.loads(result.payload)
    assert answer["model_version"] == chosen
    assert np.asarray(answer["outputs"][0]["data"]).shape == (10,)
    assert result.feedback_token == dp.feedback_store.signer.token("digits", "req-1")
    after = sample("model_server_routed_requests_total", model="digits", version=chosen, decided_by="route")
    assert after == before + 1


def test_a_request_the_model_cannot_decode_is_no_failure_of_the_chosen_version(dp):
    failures = dp.repo.loaded("digits")[1][1].metrics.statistics()["inference_stats"]["fail"]
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        asyncio.run(dp.infer("digits", "1", b"{}", RequestContext("bad"), "99"))
    assert dp.repo.loaded("digits")[1][1].metrics.statistics()["inference_stats"]["fail"] == failures
    assert metrics.REQUEST_FAILURE.value("digits", "1", "INVALID_INPUT") == 0


def test_a_routed_version_that_is_not_loaded_is_503_and_a_named_one_404(dp, digit_images):
    apply(dp, {"route": [{"version": "3", "weight": 100}]})
    with pytest.raises(ModelUnavailable, match="chosen by the traffic policy's route"):
        infer(dp, digit_images[0][0], RequestContext("r"))
    with pytest.raises(ModelNotFound, match="version 3 is not loaded"):
        infer(dp, digit_images[0][0], RequestContext("r"), version="3")


def test_an_injected_abort_fails_the_request_as_a_backend_failure(repo, dp, digit_images):
    admin = Admin(repo, dp.policies)
    admin.set_fault("digits", "1", {"abort": {"percent": 100}})
    assert admin.fault("digits", "1").abort_percent == 100
    failures = metrics.REQUEST_FAILURE.value("digits", "1", "BACKEND")
    with pytest.raises(InjectedFault):
        infer(dp, digit_images[0][0], RequestContext("r"), version="1")
    assert metrics.REQUEST_FAILURE.value("digits", "1", "BACKEND") == failures + 1
    assert admin.set_fault("digits", "1", {}).abort_percent == 0  # cleared
    assert infer(dp, digit_images[0][0], RequestContext("r"), version="1").version == "1"


def test_an_injected_fault_stays_its_versions_across_a_reload_and_a_race_with_one(repo, dp):
    """Review s53-2: a load that made a new copy of a version (a changed config) dropped its
    injected fault without a word, and a fault PUT racing the load landed on the copy being
    retired, answered 200 and lost. The fault is the version's: carried to its new copy, and
    written to the copy serving when it is set."""
    admin = Admin(repo, dp.policies)
    admin.set_fault("digits", "1", {"abort": {"percent": 100}})
    with repo.use("digits", "1") as before:
        pass
    repo.load("digits", {"max_batch_size": 4}, persist=False)  # (a new copy of version 1)
    with repo.use("digits", "1") as after:
        assert after is not before
    assert admin.fault("digits", "1").abort_percent == 100
    # A fault set through the copy a reload retired meanwhile (the PUT's ``use`` before the swap):
    assert repo.set_fault(before, None) is after
    assert admin.fault("digits", "1").abort_percent == 0


# -- the shadow ---------------------------------------------------------------------------------


def test_a_mirrored_request_carries_a_copy_that_the_mirror_runs_on_the_shadow(dp, digit_images):
    apply(dp, MIRROR)
    ok = sample("shadow_requests_total", model="digits", version="2", outcome="ok")
    body, json_length = request(digit_images[0][0])

    async def scenario() -> InferResult:
        dp.mirror.start()
        result = await dp.infer("digits", None, body, RequestContext("mirrored-1"), json_length)
        assert result.shadow is not None  # the policy mirrors every request to version 2
        dp.mirror.submit(result.shadow)
        await asyncio.wait_for(dp.mirror.queue.join(), 60)  # the copy ran
        await dp.mirror.stop()
        return result

    result = asyncio.run(scenario())
    assert result.version == "1"
    assert (result.shadow.primary_version, result.shadow.shadow_version) == ("1", "2")
    assert result.shadow.request_id == "mirrored-1"
    assert sample("shadow_requests_total", model="digits", version="2", outcome="ok") == ok + 1


def test_requests_that_name_their_version_are_not_mirrored(dp, digit_images):
    apply(dp, MIRROR)
    assert infer(dp, digit_images[0][0], RequestContext("replay"), version="1").shadow is None


def test_a_copy_from_istios_mirror_is_served_as_shadow_and_not_counted_as_traffic(dp, digit_images):
    apply(dp, MIRROR)
    ctx = RequestContext("copy-1", shadow_copy=True)
    assert dp.route("digits", None, ctx)[:2] == ("2", "mirror")
    routed = sample("model_server_routed_requests_total", model="digits", version="2", decided_by="mirror")
    ok = sample("shadow_requests_total", model="digits", version="2", outcome="ok")
    result = infer(dp, digit_images[0][0], ctx)
    assert result.version == "2"
    assert result.shadow is None  # never mirrored again
    assert result.feedback_token is None  # nor remembered for feedback
    assert sample("shadow_requests_total", model="digits", version="2", outcome="ok") == ok + 1
    assert sample("model_server_routed_requests_total", model="digits", version="2", decided_by="mirror") == routed


# -- the prediction log -------------------------------------------------------------------------


def test_every_request_while_a_mirror_runs_is_logged_with_its_route(repo, digit_images, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    plog = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)), replica="dp-1", sample=0.0)
    dp = data_plane(repo, plog)
    infer(dp, digit_images[0][0], RequestContext("unsampled"))  # no mirror, sampling 0: not logged
    apply(dp, MIRROR)
    served = infer(dp, digit_images[0][0], RequestContext("mirrored", headers={"x-tenant": "acme"}))
    with pytest.raises(InvalidInput):
        asyncio.run(dp.infer("digits", "2", b"{", RequestContext("broken")))
    assert plog.flush() == 2
    now = datetime.now(UTC)
    rows = read(tmp_path / "log", now - timedelta(hours=1), now + timedelta(hours=1)).sort_values("version")
    assert list(rows["version"]) == ["1", "2"]
    assert list(rows["role"]) == ["primary", "primary"]
    assert list(rows["route"]) == ["route", "version"]
    assert list(rows["outcome"]) == ["ok", "INVALID_INPUT"]
    assert rows["tenant"].iloc[0] == "acme"
    top1 = int(np.argmax(json.loads(served.payload)["outputs"][0]["data"]))
    assert rows["top1"].iloc[0] == top1


def test_copies_from_istios_mirror_wait_for_idle_time_within_the_shadow_queue_s_bounds(repo, digit_images):
    """A copy Istio's mirror sends waits for an idle moment; while primaries kept the candidate
    busy, every copy waited, holding its body, without bound. Past the shadow queue's count the
    rest are dropped at once (503, counted and logged as dropped), as the in-process mirror's are."""
    policies = PolicyStore(None, on_change=metrics.show_traffic_policy)
    feedback = FeedbackStore(FeedbackSigner(b"data-plane-test-key"))
    dp = DataPlane(repo, policies, feedback, ShadowMirror(repo, queue_size=2))
    apply(dp, MIRROR)
    body, json_length = request(digit_images[0][0])
    dropped = sample("shadow_requests_total", model="digits", version="2", outcome="dropped")

    async def scenario() -> list[InferResult]:
        with dp.mirror.gate:  # a primary in flight all along
            copies = [
                asyncio.create_task(
                    dp.infer("digits", None, body, RequestContext(f"copy-{i}", shadow_copy=True), json_length)
                )
                for i in range(5)
            ]
            await asyncio.sleep(0.5)
            refused = [t for t in copies if t.done()]
            assert len(refused) == 3
            assert all(isinstance(t.exception(), Preempted) for t in refused)
        waited = [t for t in copies if t not in refused]
        return await asyncio.wait_for(asyncio.gather(*waited), 60)  # once idle, the two that waited run

    assert [r.version for r in asyncio.run(scenario())] == ["2", "2"]
    assert sample("shadow_requests_total", model="digits", version="2", outcome="dropped") == dropped + 3
    assert (dp.mirror.waiting, dp.mirror.waiting_bytes) == (0, 0)


def test_a_copy_from_istios_mirror_waits_for_idle_time_no_longer_than_its_age_bound(repo, digit_images):
    """A copy waiting for idle time had no age bound: one Envoy had long given up on (its mirror's
    stream timed out) still waited, took one of the queue's slots, and ran minutes later, its
    record's latency holding the shadow's watermark back. Past ``max_copy_age_s`` it is dropped
    (503), counted as dropped with its reason, and its slot freed."""
    policies = PolicyStore(None, on_change=metrics.show_traffic_policy)
    feedback = FeedbackStore(FeedbackSigner(b"data-plane-test-key"))
    dp = DataPlane(repo, policies, feedback, ShadowMirror(repo, queue_size=2, max_copy_age_s=0.2))
    apply(dp, MIRROR)
    body, json_length = request(digit_images[0][0])
    labels = {"model": "digits", "version": "2"}
    dropped = sample("shadow_requests_total", **labels, outcome="dropped")
    too_old = sample("shadow_dropped_total", **labels, reason="too_old")

    async def scenario() -> None:
        with dp.mirror.gate:  # a primary in flight all along
            copy = asyncio.create_task(
                dp.infer("digits", None, body, RequestContext("old-copy", shadow_copy=True), json_length)
            )
            await asyncio.wait([copy], timeout=30)
            assert copy.done()  # given up on while the primary still runs
            assert isinstance(copy.exception(), Preempted)
            assert "0.2" in copy.exception().message
            assert (dp.mirror.waiting, dp.mirror.waiting_bytes) == (0, 0)

    asyncio.run(scenario())
    assert sample("shadow_requests_total", **labels, outcome="dropped") == dropped + 1
    assert sample("shadow_dropped_total", **labels, reason="too_old") == too_old + 1


def test_a_copy_from_istios_mirror_given_up_before_it_ran_is_dropped_not_the_shadows_error(
    repo, digit_images, tmp_path
):
    """A copy waiting for idle time whose stream ended (Envoy's mirror gave up on it, the server
    stopping) was logged CANCELED: the audit read it as the shadow's error beside an ``ok``
    primary, and a candidate whose pod was stopped under load with copies waiting failed the
    shadow error-rate check. It is dropped, not run: DROPPED in the log, counted as dropped."""
    from model_server.predictionlog import shadow_pairs

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    plog = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)), replica="dp-1")
    dp = data_plane(repo, plog)
    apply(dp, MIRROR)
    infer(dp, digit_images[0][0], RequestContext("given-up"))  # the primary, answered
    body, json_length = request(digit_images[0][0])
    labels = {"model": "digits", "version": "2"}
    before = {o: sample("shadow_requests_total", **labels, outcome=o) for o in ("ok", "error", "rejected", "dropped")}
    given_up = sample("shadow_dropped_total", **labels, reason="given_up")

    async def scenario() -> None:
        with dp.mirror.gate:  # a primary in flight: the copy waits
            copy = asyncio.create_task(
                dp.infer("digits", None, body, RequestContext("given-up", shadow_copy=True), json_length)
            )
            await asyncio.sleep(0.2)
            copy.cancel()  # (as the transport cancels a request whose stream ended)
            with pytest.raises(asyncio.CancelledError):
                await copy

    asyncio.run(scenario())
    assert plog.flush() == 2
    now = datetime.now(UTC)
    rows = read(tmp_path / "log", now - timedelta(hours=1), now + timedelta(hours=1))
    assert sorted(zip(rows["role"], rows["outcome"], strict=True)) == [("primary", "ok"), ("shadow", "DROPPED")]
    pairs = shadow_pairs(rows)
    assert (len(pairs), pairs.attrs["shadow_dropped"]) == (0, 1)
    after = {o: sample("shadow_requests_total", **labels, outcome=o) - n for o, n in before.items()}
    assert after == {"ok": 0, "error": 0, "rejected": 0, "dropped": 1}
    assert sample("shadow_dropped_total", **labels, reason="given_up") == given_up + 1


def test_a_shadow_record_counts_the_bytes_its_copy_holds_against_the_log_s_budget(tmp_path):
    """A shadow record (a dropped copy's too) keeps its copy's input until it is written, but
    counted none of it against the prediction log's byte budget: under a burst of large requests
    the copies' records held their inputs past the budget that refuses their primaries'."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    plog = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)), max_pending_bytes=1024 * 1024)
    image = np.array([b"x" * (1024 * 1024)], dtype=object)
    job = ShadowJob(
        "digits",
        "1",
        "2",
        [InferInput("image", "BYTES", (1,), image)],
        ["probabilities"],
        "big",
        TraceContext.from_header(None),
        0.0,
        None,
        1.0,
    )
    record = shadow_record(ShadowResult(job, None, None, "shadow queue full", "DROPPED"))
    assert record.size == 1024 * 1024
    assert plog.append(record)
    assert not plog.append(record)  # the budget holds one such input


# -- feedback -----------------------------------------------------------------------------------


def test_feedback_joins_the_label_to_the_served_prediction(dp, digit_images):
    image, label = digit_images[0]
    result = infer(dp, image, RequestContext("fb-1"))
    top1 = int(np.argmax(json.loads(result.payload)["outputs"][0]["data"]))
    item = {"request_id": "fb-1", "label": str(label), "token": result.feedback_token}
    answer = dp.feedback("digits", item, dp.label_rules("digits"))
    assert answer == {
        "request_id": "fb-1",
        "labels": 1,
        "matched_locally": True,
        "version": "2",
        "correct": int(top1 == label),
        "logged": False,
    }
    with pytest.raises(Conflict, match="already has feedback"):
        dp.feedback("digits", item, dp.label_rules("digits"))


def test_feedback_for_an_unknown_request_id_is_refused_without_a_prediction_log(dp):
    token = dp.feedback_store.signer.token("digits", "never-served")
    item = {"request_id": "never-served", "label": 1, "token": token}
    with pytest.raises(ModelNotFound, match="unknown request id"):
        dp.feedback("digits", item, dp.label_rules("digits"))
    with pytest.raises(Unauthorized):
        dp.feedback("digits", {**item, "token": "forged"}, dp.label_rules("digits"))
    answers = dp.feedback("digits", [item, {**item, "token": "forged"}], dp.label_rules("digits"))["results"]
    assert [a["status"] for a in answers] == [404, 401]


def test_what_a_label_may_be_is_made_once_a_config_and_named_boundedly_in_errors(repo_copy):
    """A label given by name is looked up in a map made once per loaded config (it was a list
    copied per call and searched per label), and a wrong one names ten of the classes, not all
    of them (a 1000-class model's list in every item of a 1000-item call)."""
    names = [f"class-{i}" for i in range(1000)] + ["class-7", "x" * 300]  # (a name twice: its first index)
    (repo_copy / "digits" / "labels.txt").write_text("\n".join(names))
    repo = ModelRepository(repo_copy, ["CPUExecutionProvider"])
    repo.load("digits", {"version_policy": {"specific": {"versions": [1]}}})
    try:
        dp = data_plane(repo)
        rules = dp.label_rules("digits")
        assert rules is dp.label_rules("digits")  # made once
        assert rules.names is not None
        assert rules.names["class-7"] == 7
        assert rules.names["class-999"] == 999  # (names beyond the output's 10 classes are the config's error)
        assert rules.names["x" * 300] == 1001
        assert (rules.classes, rules.max_items) == (10, 64)  # the output's [-1, 10]; max_batch_size
        token = dp.feedback_store.signer.token("digits", "r")
        answer = dp.feedback("digits", [{"request_id": "r", "label": "nope" * 1000, "token": token}] * 3, rules)
        errors = [item["error"] for item in answer["results"]]
        assert errors[0] == errors[2]
        assert "classes are 0 to 9, or their names: class-0, class-1, class-2" in errors[0]
        assert "class-9, ... (1001 in all)" in errors[0]
        assert "class-10," not in errors[0]
        assert len(errors[0]) < 300  # the label cut too
        config = json.loads((repo_copy / "digits" / "config.json").read_text())
        config["metadata"]["labels"] = ["a", "b"]
        (repo_copy / "digits" / "config.json").write_text(json.dumps(config))
        repo.load("digits", {"version_policy": {"specific": {"versions": [1]}}})
        assert dp.label_rules("digits").names == {"a": 0, "b": 1}  # a new config: made again
    finally:
        repo.close_all()


@pytest.mark.parametrize("matched", [True, False], ids=["matched", "unmatched"])
def test_a_label_the_log_could_not_take_may_be_sent_again_and_counts_once(tmp_path, repo, matched):
    """A label matched here while the prediction log's buffer was full was answered logged:
    false and counted in feedback_total; its resend, once the buffer had room, was a 409: the
    gate, which reads the log, never saw it, and the live view had counted it. It is not marked
    nor counted until kept now: the resend is logged and counted once. A label not matched here
    was counted in feedback_unmatched_total when refused and again when its resend was kept (2
    for 1 in the log). Either is counted once its file is written now."""
    from model_server import metrics

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    plog = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)), max_pending=1)
    dp = data_plane(repo, plog)
    rules = dp.label_rules("digits")
    dp.feedback_store.record("req-2", "digits", "1", [4])
    if matched:
        dp.feedback_store.record("req-1", "digits", "1", [3])
        counter = metrics.FEEDBACK.labels("digits", "1")
    else:  # served by another replica: unknown here
        counter = metrics.FEEDBACK_UNMATCHED.labels("digits", "unknown")
    counted = lambda: counter._value.get()  # noqa: E731
    before = counted()
    signer = dp.feedback_store.signer
    first = dp.feedback("digits", {"request_id": "req-2", "label": 4, "token": signer.token("digits", "req-2")}, rules)
    assert first["logged"] is True  # (the buffer's one place taken)
    item = {"request_id": "req-1", "label": 3, "token": signer.token("digits", "req-1")}
    full = dp.feedback("digits", item, rules)
    assert (full["matched_locally"], full["logged"]) == (matched, False)
    assert counted() == before  # nothing written yet
    assert plog.flush() == 1
    assert counted() == before + int(matched)  # req-2's only, matched, once written
    again = dp.feedback("digits", item, rules)
    assert (again["matched_locally"], again["logged"], again.get("correct", 1)) == (matched, True, 1)
    assert counted() == before + int(matched)  # queued, not written yet
    with pytest.raises(Conflict):
        dp.feedback("digits", item, rules)
    assert plog.flush() == 1
    assert counted() == before + 1 + int(matched)


@pytest.mark.parametrize("lost_at", ["write", "encode", "table"])
def test_a_label_the_log_lost_at_its_write_may_be_sent_again_and_counts_once(tmp_path, repo, monkeypatch, lost_at):
    """A label queued (answered logged: true, counted) whose file could not be written (a full
    disk, a failed PUT), encoded, or whose table could not be made was in no log, and its resend
    was refused 409 "already has feedback": the gate never saw it. The writer tells the data
    plane of every label it lost, as of one its masking key dropped: the resend is logged. The
    live view counted the lost send (no file held it), and not its resend; it counts a label once
    its file is written now: the lost send never, the resend once."""
    from model_server import predictionlog

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    plog = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)))
    dp = data_plane(repo, plog)
    rules = dp.label_rules("digits")
    dp.feedback_store.record("req-1", "digits", "1", [3])
    total, correct = metrics.FEEDBACK.labels("digits", "1"), metrics.FEEDBACK_CORRECT.labels("digits", "1")
    counted = lambda: (total._value.get(), correct._value.get())  # noqa: E731
    before = counted()
    item = {"request_id": "req-1", "label": 3, "token": dp.feedback_store.signer.token("digits", "req-1")}
    assert dp.feedback("digits", item, rules)["logged"] is True
    assert counted() == before  # queued: counted once written

    def fails(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        where = {"write": (predictionlog, "write_private"), "encode": (predictionlog.pq, "write_table")}
        m.setattr(*where.get(lost_at, (PredictionLog, "_label_table")), fails)
        assert plog.flush() == 0
    assert counted() == before  # lost: never counted
    again = dp.feedback("digits", item, rules)
    assert (again["matched_locally"], again["logged"], again["correct"]) == (True, True, 1)
    with pytest.raises(Conflict):
        dp.feedback("digits", item, rules)
    assert counted() == before
    assert plog.flush() == 1
    assert counted() == (before[0] + 1, before[1] + 1)  # the resend, written: once
    assert read(tmp_path / "log", datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1))[
        "label"
    ].tolist() == [3]


@pytest.mark.parametrize("resent_to", ["after_the_ttl", "another_replica"])
def test_a_label_lost_at_its_write_counts_once_in_all_wherever_and_whenever_it_is_resent(
    tmp_path, repo, monkeypatch, resent_to
):
    """Review s44-2 M3: a label queued (counted) and lost at the write was remembered as counted
    by its replica's store, for the feedback TTL and up to its capacity, so that its resend was
    not counted again: re-sent after the TTL (the mark gone), or to another replica (another
    store), it was counted twice, 2 for the 1 label the logs hold. Counted where its file is
    written now, it counts once in all: the resend's, wherever and whenever it is written."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    now = [1000.0]
    signer = FeedbackSigner(b"data-plane-test-key")
    store = FeedbackStore(signer, ttl_s=60, clock=lambda: now[0])
    plog = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)), replica="replica-a")
    dp = DataPlane(repo, PolicyStore(None, on_change=metrics.show_traffic_policy), store, ShadowMirror(repo), plog)
    rules = dp.label_rules("digits")
    counters = [
        metrics.FEEDBACK.labels("digits", "1"),
        metrics.FEEDBACK_CORRECT.labels("digits", "1"),
        *(metrics.FEEDBACK_UNMATCHED.labels("digits", why) for why in ("unknown", "expired", "evicted")),
    ]
    counted = lambda: [c._value.get() for c in counters]  # noqa: E731
    before = counted()
    store.record("req-m3", "digits", "1", [3])
    item = {"request_id": "req-m3", "label": 3, "token": signer.token("digits", "req-m3")}
    assert dp.feedback("digits", item, rules)["logged"] is True

    def fails(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(predictionlog, "write_private", fails)
        assert plog.flush() == 0
    assert counted() == before  # lost: never counted
    if resent_to == "after_the_ttl":
        now[0] += 61  # the prediction and every mark of its label gone
        there, log = dp, plog
    else:  # a replica that never served it
        log = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)), replica="replica-b")
        there = data_plane(repo, log)
    again = there.feedback("digits", item, rules)
    assert (again["matched_locally"], again["logged"]) == (False, True)
    assert log.flush() == 1
    expected = [0, 0, 0, 0, 0]
    expected[3 if resent_to == "after_the_ttl" else 2] = 1  # (unmatched: expired here, unknown there)
    assert [c - b for c, b in zip(counted(), before, strict=True)] == expected
    with pytest.raises(Conflict):
        there.feedback("digits", item, rules)
    assert log.flush() == 0
    assert sum(c - b for c, b in zip(counted(), before, strict=True)) == 1  # once in all
    rows = read(tmp_path / "log", datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1))
    assert rows["label"].tolist() == [3]


def test_a_label_is_a_class_of_the_model_and_a_request_has_at_most_its_largest_batch_of_them(tmp_path, repo):
    """A class index at or over the model's classes was taken, and counted as a wrong answer:
    one of 2**31 then failed the prediction log's whole flush, inferences and all (int32). A
    request id this replica did not serve took any number of labels (1.3 M from one call)."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    plog = PredictionLog(tmp_path / "log", Masker(KeyRing(keys)))
    dp = data_plane(repo, plog)
    rules = dp.label_rules("digits")
    token = dp.feedback_store.signer.token("digits", "elsewhere")
    for label in (10, 2**31, 10**20, -1, True, 1.0):
        with pytest.raises(InvalidInput, match="classes are 0 to 9"):
            dp.feedback("digits", {"request_id": "elsewhere", "label": label, "token": token}, rules)
    with pytest.raises(InvalidInput, match="has 65 labels; model 'digits' answers at most 64 items a request"):
        dp.feedback("digits", {"request_id": "elsewhere", "label": [1] * 65, "token": token}, rules)
    answer = dp.feedback("digits", {"request_id": "elsewhere", "label": [9] * 64, "token": token}, rules)
    assert answer["matched_locally"] is False
    assert answer["logged"] is True
    assert plog.flush() == 64
    # The classes of a row, as the log ranks them: an ONNX export's [N, 1000, 1, 1] has 1000.
    shapes = [(-1, 1000, 1, 1), (1000, 1, 1), (1000,), (-1, 10), (-1, -1), (10, -1)]
    assert [LabelRules.of(None, dims, 8).classes for dims in shapes] == [1000, 1000, 1000, 10, 2**31 - 1, 2**31 - 1]
    assert LabelRules.of(["a", "b", "c"], (-1, -1), 0) == ({"a": 0, "b": 1, "c": 2}, 3, 1024)


def test_feedback_for_a_model_the_repository_lacks_is_404(dp):
    with pytest.raises(ModelNotFound):
        dp.label_rules("nope")


# -- readiness and admin ------------------------------------------------------------------------


def test_readiness_names_the_routed_version_that_is_not_loaded(repo, tmp_path):
    """A restored policy that routes to a version the repository did not load: not ready, and why."""
    state = tmp_path / "traffic"
    state.mkdir()
    (state / "digits.json").write_text(
        json.dumps({"route": [{"version": "1", "weight": 50}, {"version": "3", "weight": 50}]})
    )
    dp = data_plane(repo, state_dir=state)
    assert dp.not_ready_reason() == "starting or stopping"
    expected = "model 'digits': the traffic policy routes to version(s) ['3'], not loaded"

    async def scenario() -> tuple[str | None, str | None]:
        await dp.start()
        reasons = dp.not_ready_reason(), dp.model_not_ready_reason("digits")
        await dp.stop()
        return reasons

    assert asyncio.run(scenario()) == (expected, expected)
    assert dp.not_ready_reason() == "starting or stopping"


def test_a_data_plane_stopped_leaves_nothing_on_its_repository(repo):
    """Each DataPlane built on a repository added its failure lines' callback to the
    repository's on_version_gone and never took it away: a process that builds its DataPlane
    again (a test run builds hundreds) kept every one, and the DataPlane it holds."""
    before = list(repo.on_version_gone)
    for _ in range(20):
        dp = data_plane(repo)
        assert len(repo.on_version_gone) == len(before) + 1
        asyncio.run(dp.stop())
        asyncio.run(dp.stop())  # (twice: as once)
    assert repo.on_version_gone == before


def test_a_callback_taken_off_on_version_gone_while_they_run_makes_none_skipped(repo):
    """DataPlane.stop() takes its callback off the repository's on_version_gone while a request
    that releases a retired version may be running them, in another thread: the list taken from
    under its loop made the loop skip the callback after it (a DataPlane's failure lines of an
    unloaded version kept). The callbacks are run from a copy of the list."""
    called = []

    def leaving(name: str, version: str) -> None:
        called.append(("leaving", version))
        repo.on_version_gone.remove(leaving)  # (as stop() does, here while they run: no thread's timing)

    def staying(name: str, version: str) -> None:
        called.append(("staying", version))

    repo.on_version_gone.extend([leaving, staying])
    repo.unload("digits")
    assert sorted(version for who, version in called if who == "staying") == ["1", "2"]
    assert [who for who, _ in called].count("leaving") == 1


def test_model_readiness_by_version(dp):
    assert dp.model_not_ready_reason("digits") is None
    assert dp.model_not_ready_reason("digits", "2") is None
    with pytest.raises(ModelNotFound, match="Request for unknown model: 'digits' version 3 is not found"):
        dp.model_not_ready_reason("digits", "3")  # never loaded: a 404, as Triton answers
    with pytest.raises(ModelNotFound):
        dp.model_not_ready_reason("nope")


def test_admin_keeps_policies_and_loads_consistent(repo, dp):
    admin = Admin(repo, dp.policies)
    assert admin.policy("digits").to_dict() == {"route": [{"version": "2", "weight": 100}]}
    with pytest.raises(InvalidInput, match=r"\['3'\] are not loaded"):
        asyncio.run(admin.set_policy("digits", {"route": [{"version": "3", "weight": 100}]}))
    asyncio.run(admin.set_policy("digits", SPLIT))
    assert admin.policy("digits").to_dict() == SPLIT
    assert sample("model_server_traffic_weight", model="digits", version="1") == 10
    with pytest.raises(Conflict, match="change the traffic policy first"):
        asyncio.run(admin.unload("digits"))
    with pytest.raises(Conflict, match=r"routes to version\(s\) \[1\]"):
        asyncio.run(admin.load("digits", {"version_policy": {"specific": {"versions": [2]}}}))
    asyncio.run(admin.remove_policy("digits"))
    assert REGISTRY.get_sample_value("model_server_traffic_weight", {"model": "digits", "version": "1"}) is None
    asyncio.run(admin.unload("digits"))
    with pytest.raises(ModelNotFound, match="Request for unknown model: 'digits' has no available versions"):
        dp.model_not_ready_reason("digits")
    with pytest.raises(ModelUnavailable, match="Request for unknown model: 'digits' version 2 is not at ready state"):
        dp.model_not_ready_reason("digits", "2")


def test_a_version_s_failure_log_entry_goes_with_the_version(repo, dp):
    """The per-version table of failure lines kept an entry for every version that ever failed,
    unloaded or not: a server loading and unloading versions grew it without end. A version's
    entry goes once the version is unloaded (by an unload, or a load that leaves it out); a
    version served on keeps its own."""
    for version in ("1", "2"):
        dp._log_failure("digits", version, InferenceFailed(f"model 'digits' version {version} failed"))
    assert set(dp.failures) == {("digits", "1"), ("digits", "2")}
    repo.load("digits", {"version_policy": {"specific": {"versions": [2]}}})
    assert set(dp.failures) == {("digits", "2")}
    asyncio.run(Admin(repo, dp.policies).unload("digits"))
    assert dp.failures == {}


def test_the_data_plane_and_admin_need_no_web_framework():
    """Transport-free: importing them (and all they import) loads no HTTP framework."""
    code = (
        "import sys, model_server.dataplane, model_server.admin; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'starlette', 'fastapi', 'uvicorn', 'httptools'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_the_config_of_a_model_not_loaded_is_read_again_only_when_its_files_change(repo_copy, monkeypatch):
    """Every feedback call for a model not loaded read and parsed its config.json and labels
    file again, on the event loop, before the body or the token was looked at: 128 ms a call
    with a 4 MiB labels file, and two clients took inference from 3 to 185 ms. Read once now,
    and again when a file of it changes."""
    from model_server import repository

    reads = Counter()
    load_config = repository.load_config

    def counted(model_dir, override=None):
        reads[model_dir.name] += 1
        return load_config(model_dir, override)

    monkeypatch.setattr(repository, "load_config", counted)
    plane = data_plane(ModelRepository(repo_copy, ["CPUExecutionProvider"]))  # nothing loaded
    first = plane.label_rules("digits")
    for _ in range(50):
        assert plane.label_rules("digits") is first
    assert reads["digits"] == 1
    labels = repo_copy / "digits" / "labels.txt"
    labels.write_text("\n".join(["zero", *labels.read_text().splitlines()[1:]]))
    assert plane.label_rules("digits").names["zero"] == 0
    config = repo_copy / "digits" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_batch_size": 8}))
    assert plane.label_rules("digits").max_items == 8
    assert reads["digits"] == 3
    with pytest.raises(ModelNotFound):
        plane.label_rules("no-such-model")


def test_a_model_failing_at_run_time_is_logged_once_a_while_through_python_logging(tmp_path, caplog):
    """Every ORT run logs nothing itself (its lines would pass by masking) and a 500 was
    answered without a line: a model bug, a CUDA error or an exhausted device left no trace in
    the server log (the access log is off by default). A version's run failure is logged
    through Python logging, at most one line a while and then how many more there were."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 4])
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "fixed", [x], [y], [shape])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 10
    (tmp_path / "fixed" / "1").mkdir(parents=True)
    (tmp_path / "fixed" / "1" / "model.onnx").write_bytes(onnx_model.SerializeToString())
    config = {
        "max_batch_size": 8,
        "input": [{"name": "x", "datatype": "FP32", "dims": [-1, 4]}],
        "output": [{"name": "y", "datatype": "FP32", "dims": [-1, 4]}],
    }
    (tmp_path / "fixed" / "config.json").write_text(json.dumps(config))
    repo = ModelRepository(tmp_path, ["CPUExecutionProvider"])
    repo.load("fixed")
    try:
        dp = data_plane(repo)
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 8}]})
        for _ in range(3):
            with caplog.at_level("ERROR", logger="model_server.dataplane"), pytest.raises(InferenceFailed) as failed:
                asyncio.run(dp.infer("fixed", None, body.encode(), RequestContext("r")))
            assert failed.value.status == 500
        lines = [r.getMessage() for r in caplog.records if r.name == "model_server.dataplane"]
        assert len(lines) == 1, lines
        assert "model 'fixed' version 1 failed" in lines[0]
        dp.failures[("fixed", "1")].next_at = 0.0  # as if the last line were long ago
        caplog.clear()
        with caplog.at_level("ERROR", logger="model_server.dataplane"), pytest.raises(InferenceFailed):
            asyncio.run(dp.infer("fixed", None, body.encode(), RequestContext("r")))
        [line] = [r.getMessage() for r in caplog.records if r.name == "model_server.dataplane"]
        assert line.endswith("(and 2 more since the last line)")
    finally:
        repo.close_all()
