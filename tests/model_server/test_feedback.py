"""Live feedback and the load generator against a real server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests

from devstack.loadgen import LoadConfig, run
from model_server.feedback import FeedbackSigner, read_key
from model_server.predictionlog import joined, read, unmatched_labels
from tests.support import TOKEN, infer, put_policy, settled

pytestmark = pytest.mark.integration


def signer(tmp_path) -> FeedbackSigner:
    """The tokens of the server started with --state-dir tmp_path/state, or of another replica
    given the same key: made as the inference responses carry them."""
    return FeedbackSigner(read_key(tmp_path / "state" / "feedback-key"))


def logging_server(server_factory, repo_copy, tmp_path):
    """A server with its state in ``tmp_path / "state"`` and its prediction log in
    ``tmp_path / "predictions"``, its admin API behind ``TOKEN``."""
    return server_factory(
        repo_copy,
        "--state-dir",
        str(tmp_path / "state"),
        "--prediction-log",
        str(tmp_path / "predictions"),
        token=TOKEN,
    )


def feedback(server, body, sign: FeedbackSigner | None = None) -> requests.Response:
    """Post labels; with ``sign``, each item carries the token of its request id."""
    if sign is not None:
        items = body if isinstance(body, list) else [body]
        for item in items:
            if isinstance(item.get("request_id"), str):
                item.setdefault("token", sign.token("digits", item["request_id"]))
    return requests.post(f"{server.http}/v2/models/digits/feedback", json=body, timeout=10)


def test_feedback_accuracy_equals_the_accuracy_of_what_was_served(server_factory, repo_copy, models_dir, tmp_path):
    log = tmp_path / "predictions"
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), "--prediction-log", str(log), token=TOKEN)
    s.load_versions("digits", 1, 3)
    assert put_policy(s, {"route": [{"version": "1", "weight": 50}, {"version": "3", "weight": 50}]}).status_code == 200
    stats = run(
        LoadConfig(
            url=s.url,
            validation=models_dir / "digits" / "validation",
            rate=0,
            max_requests=400,
            duration_s=120,
            concurrency=4,
            feedback_share=1.0,
            feedback_delay_s=0.2,
            seed=3,
        )
    )
    assert stats.ok == 400
    assert stats.feedback_accepted == 400
    for version in ("1", "3"):
        total = settled(s, "feedback_total", stats.served[version], model="digits", version=version)
        correct = settled(s, "feedback_correct_total", stats.correct[version], model="digits", version=version)
        assert total == stats.served[version]
        assert correct == stats.correct[version]  # live accuracy == true accuracy of served answers
    # Wrong answers were served and labelled (v3 is 92% accurate: all of ~200 right has odds 1e-7),
    # so the equalities above compared real disagreements, not only agreements.
    assert stats.correct["3"] < stats.served["3"]
    s.stop()
    # The log's reader joins the same labels to the same answers: the same counts per version.
    j = joined(read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)))
    assert j.attrs["unmatched_labels"] == 0
    for version in ("1", "3"):
        arm = j[j["version"] == version]
        assert len(arm) == stats.served[version]
        assert arm["label"].notna().all()
        assert int((arm["label"] == arm["top1"]).sum()) == stats.correct[version]


def test_without_a_prediction_log_an_unknown_request_id_is_404(server_factory, repo_copy, tmp_path):
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    r = feedback(s, {"request_id": "never-served", "label": 3}, signer(tmp_path))
    assert r.status_code == 404  # nowhere to keep it for a reader's join
    assert "unknown request id" in r.json()["error"]


def test_unknown_expired_duplicate_and_bad_feedback(server_factory, repo_copy, tmp_path, digit_images):
    log = tmp_path / "predictions"
    s = server_factory(
        repo_copy,
        "--state-dir",
        str(tmp_path / "state"),
        "--feedback-capacity",
        "2",
        "--prediction-log",
        str(log),
        token=TOKEN,
    )
    sign = signer(tmp_path)
    # Another replica may have served it: accepted into the log, reported as not matched here.
    r = feedback(s, {"request_id": "never-served", "label": 3}, sign)
    assert r.status_code == 200
    assert r.json()["matched_locally"] is False
    assert r.json()["logged"] is True
    assert "unknown request id" in r.json()["reason"]

    image, label = digit_images[0]
    infer(s, image, {"X-Request-ID": "req-a"})
    infer(s, image, {"X-Request-ID": "req-b"})
    answer = feedback(s, {"request_id": "req-a", "label": label}, sign).json()
    assert answer["correct"] == 1
    assert answer["matched_locally"] is True
    r = feedback(s, {"request_id": "req-a", "label": label}, sign)
    assert r.status_code == 409
    r = feedback(s, {"request_id": "req-b", "label": "eleven"}, sign)
    assert r.status_code == 400
    assert "not a class index or a known label" in r.json()["error"]
    r = feedback(s, {"request_id": "req-b", "label": [1, 2]}, sign)
    assert r.status_code == 400
    assert "had 1 prediction(s); got 2 label(s)" in r.json()["error"]
    r = requests.post(f"{s.http}/v2/models/digits/feedback", data=b"{not json", timeout=10)
    assert r.status_code == 400
    assert "malformed JSON" in r.json()["error"]
    r = feedback(s, {"request_id": "never-served-2", "label": "eleven"}, sign)
    assert r.status_code == 400  # validated even when not matched here
    infer(s, image, {"X-Request-ID": "req-c"})
    infer(s, image, {"X-Request-ID": "req-d"})  # req-b forgotten here: the store keeps the last 2
    r = feedback(s, {"request_id": "req-b", "label": str(label)}, sign)
    assert r.status_code == 200
    assert r.json()["matched_locally"] is False  # still logged: the reader joins it
    assert "expired: evicted to keep the last 2 predicted items" in r.json()["reason"]
    assert settled(s, "feedback_total", 1, model="digits", version="1") == 1  # the live view: req-a only
    s.stop()
    df = read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    labels = df[df["role"] == "label"]
    assert sorted(labels["request_id"]) == ["never-served", "req-a", "req-b"]  # no bad or second label
    j = joined(df)
    j = j[j["label"].notna()]
    assert sorted(zip(j["request_id"], j["label"], strict=True)) == [("req-a", label), ("req-b", label)]
    assert list(unmatched_labels(df)["request_id"]) == ["never-served"]


def test_feedback_lists_are_answered_item_by_item(server_factory, repo_copy, tmp_path, digit_images):
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    image, label = digit_images[1]
    infer(s, image, {"X-Request-ID": "one"})
    r = feedback(s, [{"request_id": "one", "label": str(label)}, {"request_id": "two", "label": 1}], signer(tmp_path))
    assert r.status_code == 200
    assert [x["status"] for x in r.json()["results"]] == [200, 404]
    assert settled(s, "feedback_total", 1, model="digits", version="1") == 1


def test_feedback_lists_with_a_prediction_log_accept_unmatched_items(server_factory, repo_copy, tmp_path, digit_images):
    s = logging_server(server_factory, repo_copy, tmp_path)
    image, label = digit_images[1]
    infer(s, image, {"X-Request-ID": "one"})
    body = [{"request_id": "one", "label": str(label)}, {"request_id": "two", "label": 1}, {"label": 1}]
    results = feedback(s, body, signer(tmp_path)).json()["results"]
    assert [x["status"] for x in results] == [200, 200, 400]
    assert [x.get("matched_locally") for x in results[:2]] == [True, False]
    assert settled(s, "feedback_total", 1, model="digits", version="1") == 1


def test_labels_need_the_token_of_their_response(server_factory, repo_copy, tmp_path, digit_images):
    """Feedback needed no credentials: any client could label any request id and move the
    rollout's live accuracy. A label now needs the token its inference response carried."""
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    image, label = digit_images[0]
    r = infer(s, image, {"X-Request-ID": "mine"})
    token = r.headers["X-Feedback-Token"]
    assert r.json()["parameters"] == {"feedback_token": token}  # where tritonclient reads it
    infer(s, image, {"X-Request-ID": "theirs"})
    for item, needle in [
        ({"request_id": "mine", "label": label}, "needs the 'token'"),
        ({"request_id": "mine", "label": label, "token": token[:-2] + "AA"}, "does not match"),
        ({"request_id": "theirs", "label": label, "token": token}, "does not match"),  # another's id
    ]:
        r = feedback(s, item)
        assert r.status_code == 401
        assert needle in r.json()["error"]
    assert feedback(s, {"request_id": "mine", "label": label, "token": token}).status_code == 200
    assert settled(s, "feedback_total", 1, model="digits", version="1") == 1  # (the 401s: none of it)


def test_an_answer_is_counted_and_can_be_labelled_the_moment_it_arrives_either_way(
    server_factory, repo_copy, tmp_path, digit_images
):
    """The counters, the routed count and the prediction kept for its label are settled after the
    answer is written (the client has it sooner), and before the connection's next request: a
    label sent at once on the same connection finds its prediction, a scrape counts it. Both
    ways a request arrives: with a Content-Length (the protocol answers it) and chunked (ASGI)."""
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    image, label = digit_images[0]
    plain = infer(s, image).request.body
    header_length = str(len(plain) - len(image) - 4)
    session = requests.Session()
    for n, body in enumerate([plain, iter([plain[:7], plain[7:]])], start=1):  # Content-Length, then chunked
        rid = f"either-way-{n}"
        r = session.post(
            f"{s.http}/v2/models/digits/infer",
            data=body,
            headers={"Inference-Header-Content-Length": header_length, "X-Request-ID": rid},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        item = {"request_id": rid, "label": label, "token": r.headers["X-Feedback-Token"]}
        assert session.post(f"{s.http}/v2/models/digits/feedback", json=item, timeout=10).status_code == 200
        assert s.metric("nv_inference_request_success", model="digits", version="1") == n + 1  # and the first infer
        assert s.metric("model_server_routed_requests_total", model="digits", version="1", decided_by="route") == n + 1
    assert settled(s, "feedback_total", 2, model="digits", version="1") == 2


def test_a_re_sent_request_id_keeps_its_first_prediction_and_one_label(
    server_factory, repo_copy, tmp_path, digit_images
):
    """Re-sending an inference with the same X-Request-ID reset the stored prediction: one id was
    labelled and counted 5 times. The first prediction stays, with at most one label, in the
    live view and in the log's join."""
    log = tmp_path / "predictions"
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), "--prediction-log", str(log), token=TOKEN)
    image, label = digit_images[0]
    statuses = []
    for _ in range(5):
        token = infer(s, image, {"X-Request-ID": "again"}).headers["X-Feedback-Token"]
        statuses.append(feedback(s, {"request_id": "again", "label": label, "token": token}).status_code)
    assert statuses == [200, 409, 409, 409, 409]
    assert settled(s, "feedback_total", 1, model="digits", version="1") == 1
    s.stop()
    df = read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    assert (df["role"] == "primary").sum() == 5  # every answer is on record
    j = joined(df)
    assert len(j) == 1  # but one prediction per request id is evidence, with its one label
    assert j["label"].tolist() == [label]
    assert j.attrs["duplicate_primaries"] == 4


def test_a_prediction_expires_after_its_ttl():
    """The TTL on an injected clock (the server test above forgets by capacity: no waiting)."""
    from model_server.feedback import FeedbackStore, LabelRules

    rules = LabelRules.of(None, (-1, 10), 64)

    now = [1000.0]
    store = FeedbackStore(FeedbackSigner(b"k" * 32), capacity=10, ttl_s=60, clock=lambda: now[0])
    store.record("r1", "digits", "1", [3])
    store.record("r2", "digits", "1", [4])
    sign = FeedbackSigner(b"k" * 32)
    assert store.label("digits", {"request_id": "r1", "label": 3, "token": sign.token("digits", "r1")}, rules).matched
    now[0] += 61
    late = store.label(
        "digits", {"request_id": "r2", "label": 4, "token": sign.token("digits", "r2")}, rules, accept_unmatched=True
    )
    assert late.matched is False
    assert late.reason == "expired: served 61 s ago, feedback is kept 60 s"


def test_a_label_counts_when_it_is_counted_not_when_it_is_judged():
    """The store judges a label and counts nothing (the prediction log's writer counts it once
    written; without a log the data plane, when taken): the label counts itself, matched in
    feedback_total and feedback_correct_total of its version (its items, the right ones), not
    matched 1 in feedback_unmatched_total of why. The store keeps no mark of what was counted."""
    from model_server import metrics
    from model_server.feedback import FeedbackStore, LabelRules

    now = [1000.0]
    store = FeedbackStore(FeedbackSigner(b"k" * 32), capacity=10, ttl_s=60, clock=lambda: now[0])
    sign = FeedbackSigner(b"k" * 32)
    store.record("r1", "counted", "2", [3, 5, 7])
    store.record("r2", "counted", "2", [4])
    total, correct = metrics.FEEDBACK.labels("counted", "2"), metrics.FEEDBACK_CORRECT.labels("counted", "2")
    unmatched = {why: metrics.FEEDBACK_UNMATCHED.labels("counted", why) for why in ("unknown", "expired")}
    values = lambda: (total._value.get(), correct._value.get(), *(c._value.get() for c in unmatched.values()))  # noqa: E731
    before = values()
    rules = LabelRules.of(None, (-1, 10), 64)
    item = lambda rid, label: {"request_id": rid, "label": label, "token": sign.token("counted", rid)}  # noqa: E731
    matched = store.label("counted", item("r1", [3, 6, 7]), rules)
    now[0] += 61
    late = store.label("counted", item("r2", 4), rules, accept_unmatched=True)
    unknown = store.label("counted", item("r3", 1), rules, accept_unmatched=True)
    assert values() == before
    matched.count("counted")
    late.count("counted")
    unknown.count("counted")
    assert [v - b for v, b in zip(values(), before, strict=True)] == [3, 2, 1, 1]
    store.forget("counted", "r3", None)  # not kept by the log, never counted: its resend counts
    store.label("counted", item("r3", 1), rules, accept_unmatched=True).count("counted")
    assert [v - b for v, b in zip(values(), before, strict=True)] == [3, 2, 2, 1]


def test_two_tenants_requests_under_one_id_served_by_one_replica_are_two_predictions():
    """acme and then globex sent request id order-7 to one replica. The store kept acme's only
    (an id re-sent keeps its first), so globex's label, its token globex's, was checked against
    acme's tenant: 401, its answer never labelled. Each tenant's request is kept and labelled
    apart now, matched by the label's tenant or by the tenant its token names; an id re-sent by
    one tenant still keeps its first, and at most MAX_TENANTS_PER_ID tenants are kept an id."""
    from model_server.errors import Conflict, Unauthorized
    from model_server.feedback import MAX_TENANTS_PER_ID, FeedbackStore, LabelRules

    sign = FeedbackSigner(b"k" * 32)
    store = FeedbackStore(sign, capacity=100)
    rules = LabelRules.of(None, (-1, 10), 64)
    store.record("order-7", "digits", "1", [1], "acme")
    store.record("order-7", "digits", "1", [4], None)  # (a request naming no tenant under the id)
    store.record("order-7", "digits", "2", [2], "globex")
    store.record("order-7", "digits", "2", [5], "acme")  # (acme re-sent it: its first is kept)
    label = lambda of, **claim: {  # noqa: E731
        "request_id": "order-7",
        "label": 2,
        "token": sign.token("digits", "order-7", of),
        **claim,
    }
    globex = store.label("digits", label("globex"), rules)  # (no tenant named: its token's)
    assert (globex.matched, globex.tenant, globex.version, globex.correct) == (True, "globex", "2", 1)
    acme = store.label("digits", label("acme", tenant="acme"), rules)
    assert (acme.matched, acme.tenant, acme.version, acme.correct) == (True, "acme", "1", 0)
    for of in ("acme", "globex"):
        with pytest.raises(Conflict):
            store.label("digits", label(of), rules)
    with pytest.raises(Unauthorized):  # a tenant that sent no order-7 here, unmatched: its word
        store.label("digits", label("initech", tenant="acme"), rules, accept_unmatched=True)
    store.forget("digits", "order-7", "globex")  # (the log could not take globex's: it may send it again)
    assert store.label("digits", label("globex"), rules).tenant == "globex"
    shared = lambda of: {"request_id": "shared", "label": 1, "token": sign.token("digits", "shared", of), "tenant": of}  # noqa: E731
    for i in range(MAX_TENANTS_PER_ID + 3):
        store.record("shared", "digits", "1", [1], f"t{i}")
    kept = [
        store.label("digits", shared(f"t{i}"), rules, accept_unmatched=True).matched
        for i in range(MAX_TENANTS_PER_ID + 3)
    ]
    assert kept == [True] * MAX_TENANTS_PER_ID + [False] * 3  # (the others' labels reach the log)


def test_the_store_holds_at_most_its_capacity_in_items_not_requests():
    """A request of batch 64 keeps 64 top-1s: counted by requests, the default 200,000 of a
    model batching 1024 held 200 million items. Counted by items, the oldest requests go first."""
    from model_server.feedback import FeedbackStore, LabelRules

    rules = LabelRules.of(None, (-1, 10), 64)
    sign = FeedbackSigner(b"k" * 32)
    store = FeedbackStore(sign, capacity=100)
    for rid in ("a", "b", "c"):
        store.record(rid, "digits", "1", [7] * 64)
    assert store._items == 64  # a and b evicted: 128 and then 192 items were above 100

    def label(rid: str) -> object:
        item = {"request_id": rid, "label": [7] * 64, "token": sign.token("digits", rid)}
        return store.label("digits", item, rules, accept_unmatched=True)

    assert label("c").matched
    evicted = label("a")
    assert (evicted.matched, evicted.reason) == (False, "expired: evicted to keep the last 100 predicted items")
    store.record("huge", "digits", "1", [1] * 101)  # one request above the capacity is not kept,
    assert store._items == 64  # nor evicts the others
    assert list(store._served) == [("digits", "c", None)]


def test_one_label_per_request_id_and_replica_matched_or_not(server_factory, repo_copy, tmp_path, digit_images):
    """An id this replica did not serve took any number of labels (only a matched one took one):
    one token put 800k label rows into the log in 20 s, the writer's buffer dropped inference
    records the gates read, and the reader took the last label of an id, not the first. Now a
    replica takes one label per id, matched or not, also once its prediction was evicted, and
    counts those it could not match by reason."""
    log = tmp_path / "predictions"
    s = server_factory(
        repo_copy,
        "--state-dir",
        str(tmp_path / "state"),
        "--prediction-log",
        str(log),
        "--feedback-capacity",
        "1",
        token=TOKEN,
    )
    sign = signer(tmp_path)
    image, label = digit_images[0]
    assert feedback(s, {"request_id": "elsewhere", "label": label}, sign).status_code == 200
    again = feedback(s, {"request_id": "elsewhere", "label": (label + 1) % 10}, sign)
    assert again.status_code == 409
    assert "already has feedback" in again.json()["error"]
    flood = feedback(s, [{"request_id": "elsewhere-2", "label": label} for _ in range(1000)], sign)
    assert [x["status"] for x in flood.json()["results"]] == [200] + [409] * 999

    codes: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: codes.append(feedback(s, {"request_id": "raced", "label": label}, sign).status_code)
        )
        for _ in range(32)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] + [409] * 31

    infer(s, image, {"X-Request-ID": "served"})
    assert feedback(s, {"request_id": "served", "label": label}, sign).json()["matched_locally"] is True
    infer(s, image, {"X-Request-ID": "evicts-served"})  # capacity 1: "served" is forgotten here
    assert feedback(s, {"request_id": "served", "label": label}, sign).status_code == 409  # but not its label
    r = feedback(s, {"request_id": "evicts-served", "label": label}, sign)
    assert r.json()["matched_locally"] is True
    infer(s, image, {"X-Request-ID": "evicted-unlabelled"})
    infer(s, image, {"X-Request-ID": "last"})
    r = feedback(s, {"request_id": "evicted-unlabelled", "label": label}, sign)
    assert r.json()["matched_locally"] is False  # taken once, for the reader's join
    assert settled(s, "feedback_unmatched_total", 3, model="digits", reason="unknown") == 3
    assert settled(s, "feedback_unmatched_total", 1, model="digits", reason="evicted") == 1
    assert settled(s, "feedback_total", 2, model="digits", version="1") == 2
    s.stop()
    df = read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    labels = df[df["role"] == "label"]
    assert sorted(labels["request_id"]) == sorted(
        ["elsewhere", "elsewhere-2", "raced", "served", "evicts-served", "evicted-unlabelled"]
    )
    assert labels.loc[labels["request_id"] == "elsewhere", "label"].tolist() == [label]


def test_a_label_istio_mirrored_is_ignored(server_factory, repo_copy, tmp_path, digit_images):
    """The VirtualService mirrors every request of the default route to the candidate, a label's
    POST too: the copy was taken as a second label (logged twice; counted where the candidate
    served it). A copy (Host ``...-shadow``) is answered 202 and changes nothing."""
    log = tmp_path / "predictions"
    s = server_factory(
        repo_copy, "--state-dir", str(tmp_path / "state"), "--prediction-log", str(log), "--mesh-mirror", token=TOKEN
    )
    image, label = digit_images[0]
    token = infer(s, image, {"X-Request-ID": "mirrored"}).headers["X-Feedback-Token"]
    item = {"request_id": "mirrored", "label": label, "token": token}
    url = f"{s.http}/v2/models/digits/feedback"
    for host in ("digits.ml.svc.cluster.local-shadow", "digits.ml.svc-shadow:8000"):
        r = requests.post(url, json=item, headers={"Host": host}, timeout=10)
        assert r.status_code == 202
        assert "mirrored copy" in r.json()["ignored"]
    r = requests.post(url, json=item, timeout=10)  # the original, where it went
    assert r.json()["matched_locally"] is True
    assert settled(s, "feedback_total", 1, model="digits", version="1") == 1  # (the copies: none of it)
    s.stop()
    df = read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    assert (df["role"] == "label").sum() == 1


def test_one_request_id_for_two_models_takes_a_label_for_each(server_factory, repo_copy, tmp_path, digit_images):
    """A caller that forwards its X-Request-ID to two models (as tracing asks of services): the
    store was keyed by request id alone, so the second model's prediction was not kept and its
    label was refused (404, not logged, with a prediction log too)."""
    other = repo_copy / "digits_b"
    shutil.copytree(repo_copy / "digits", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "name": "digits_b"}))
    s = logging_server(server_factory, repo_copy, tmp_path)
    image, label = digit_images[0]
    answers = {}
    for model in ("digits", "digits_b"):
        token = infer(s, image, {"X-Request-ID": "forwarded"}, path=f"/v2/models/{model}/infer").headers[
            "X-Feedback-Token"
        ]
        r = requests.post(
            f"{s.http}/v2/models/{model}/feedback",
            json={"request_id": "forwarded", "label": label, "token": token},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        answers[model] = r.json()
    assert all(a["matched_locally"] and a["correct"] == 1 for a in answers.values())
    assert settled(s, "feedback_total", 1, model="digits_b", version="1") == 1


def test_a_tenant_or_request_id_the_log_cannot_write_is_refused(server_factory, repo_copy, tmp_path):
    """A label's ``tenant`` with a lone surrogate was accepted, and its flush failed whole: every
    label logged with it, any client's, was lost. A request id with one was a 500. Both are 400
    now, and the labels beside them are written."""
    log = tmp_path / "predictions"
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), "--prediction-log", str(log), token=TOKEN)
    sign = signer(tmp_path)
    body = (
        b'[{"request_id": "good", "label": 1, "token": "%s"},'
        b' {"request_id": "evil", "label": 1, "token": "%s", "tenant": "\\ud800"},'
        b' {"request_id": "ctl", "label": 1, "token": "%s", "tenant": "a\\nb"}]'
    ) % tuple(sign.token("digits", rid).encode() for rid in ("good", "evil", "ctl"))
    r = requests.post(f"{s.http}/v2/models/digits/feedback", data=body, timeout=10)
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 400, 400]
    assert "'tenant' must be a string" in results[1]["error"]
    r = requests.post(f"{s.http}/v2/models/digits/feedback", data=b'{"request_id": "\\ud800", "label": 1}', timeout=10)
    assert r.status_code == 400
    assert "is not a request id" in r.json()["error"]
    s.stop()  # (SIGTERM: the log flushes what it holds)
    df = read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    assert df.loc[df["role"] == "label", "request_id"].tolist() == ["good"]


def test_a_model_that_does_not_batch_takes_labels(server_factory, repo_copy, tmp_path, digit_images):
    """A classifier configured without batching (max_batch_size 0: full shapes) had its answers
    never kept for labels: every label was "unknown request id", its live accuracy never seen."""
    config_path = repo_copy / "digits" / "config.json"
    config = json.loads(config_path.read_text())
    config["max_batch_size"] = 0
    config["input"][0]["dims"] = [1]
    config["output"][0]["dims"] = [1, 10]
    config_path.write_text(json.dumps(config))
    s = logging_server(server_factory, repo_copy, tmp_path)
    image, label = digit_images[0]
    answer = infer(s, image, {"X-Request-ID": "unbatched-1"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["shape"] == [1, 10]
    r = feedback(s, {"request_id": "unbatched-1", "label": label}, signer(tmp_path))
    assert r.status_code == 200, r.text
    assert r.json()["matched_locally"] is True, r.json()
    assert r.json()["correct"] == 1
    assert settled(s, "feedback_total", 1, model="digits", version="1") == 1
    # Its answer has one row (the output's first dimension): one label a request, also for an id
    # this replica did not serve (it took 1,024, each a row of the log).
    r = feedback(s, {"request_id": "elsewhere", "label": [label, label]}, signer(tmp_path))
    assert r.status_code == 400, r.text
    assert "answers at most 1 items a request" in r.json()["error"]


def test_the_labels_of_a_model_that_does_not_batch_are_as_its_output_ranks_its_rows():
    """Without batching, an output's first dimension is its rows (the prediction log's and the
    store's items) and the rest a row's classes: ``[1, 1000]`` took 1,024 labels of 1,000
    classes a request, ``[4, 10]`` labels of 40 classes for rows of 10."""
    from model_server.feedback import LabelRules

    shapes = [(1, 1000), (1000,), (4, 10), (1, 1000, 1, 1), (-1, 10), (2, -1)]
    assert [LabelRules.of(None, dims, 0)[1:] for dims in shapes] == [
        (1000, 1),
        (1000, 1),
        (10, 4),
        (1000, 1),
        (10, 1024),  # rows not known: the bound of any request
        (2**31 - 1, 2),
    ]
    assert LabelRules.of(None, (-1, 10), 64)[1:] == (10, 64)  # batching: its largest batch


def test_a_token_that_is_not_ascii_is_refused_and_the_labels_beside_it_are_taken(server_factory, repo_copy, tmp_path):
    """A ``token`` with a lone surrogate or other non-ASCII text raised in the comparison: a 500
    with a traceback, and in a list the labels before it were taken (a retry of the list got
    409 for them). Such a token matches no response's: 401, item by item."""
    s = logging_server(server_factory, repo_copy, tmp_path)
    sign = signer(tmp_path)
    body = (
        b'[{"request_id": "before", "label": 1, "token": "%s"}, {"request_id": "bad", "label": 1, "token": "\\ud800"}]'
    )
    r = requests.post(
        f"{s.http}/v2/models/digits/feedback", data=body % sign.token("digits", "before").encode(), timeout=10
    )
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == [200, 401]
    for token in ("\\ud800", "\\u00e9" * 24):
        r = requests.post(
            f"{s.http}/v2/models/digits/feedback",
            data=b'{"request_id": "bad", "label": 1, "token": "%s"}' % token.encode(),
            timeout=10,
        )
        assert r.status_code == 401, r.text
        assert "does not match" in r.json()["error"]
    assert "Traceback" not in s.log.read_text()


def test_a_label_carries_the_tenant_of_its_inference(server_factory, repo_copy, tmp_path, digit_images):
    """With request ids masked under each tenant's key, a label sent to a replica that did not
    serve its request, without its tenant, was taken (200, logged) under the default key: it
    joined no prediction, silently, for about (N-1)/N of a tenant's labels. And a client of
    another tenant that re-sent a request id got the same token and labelled the first tenant's
    prediction. A token is its inference's tenant's too now: another tenant's, or none, is 401;
    and another tenant's token labels that tenant's own answer under the id, never the first's."""
    keys = tmp_path / "keys.json"
    key = lambda: base64.b64encode(os.urandom(32)).decode()  # noqa: E731
    keys.write_text(json.dumps({"default": key(), "tenants": {"acme": key()}}))
    shared = tmp_path / "feedback-key"
    shared.write_text("a-feedback-secret-shared-by-the-replicas")
    log = tmp_path / "predictions"
    common = ("--prediction-log", str(log), "--mask-keys", str(keys), "--feedback-key-file", str(shared))
    common += ("--mask-header", "request_id")
    a = server_factory(repo_copy, "--state-dir", str(tmp_path / "a"), *common, token=TOKEN)
    b = server_factory(repo_copy, "--state-dir", str(tmp_path / "b"), *common, token=TOKEN)
    image, label = digit_images[0]
    token = infer(a, image, {"X-Request-ID": "order-1", "X-Tenant": "acme"}).headers["X-Feedback-Token"]
    item = {"request_id": "order-1", "label": label, "token": token}
    for tenant in ({}, {"X-Tenant": "globex"}):  # b did not serve it: the tenant is the label's word
        r = requests.post(f"{b.http}/v2/models/digits/feedback", json=item, headers=tenant, timeout=10)
        assert r.status_code == 401, r.text
        assert "does not match" in r.json()["error"]
    r = requests.post(f"{b.http}/v2/models/digits/feedback", json={**item, "tenant": "acme"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["matched_locally"] is False

    # globex re-sends acme's request id to a: its answer's token labels its own answer, no answer of acme's.
    token = infer(a, image, {"X-Request-ID": "order-2", "X-Tenant": "acme"}).headers["X-Feedback-Token"]
    theirs = infer(a, image, {"X-Request-ID": "order-2", "X-Tenant": "globex"}).headers["X-Feedback-Token"]
    wrong = {"request_id": "order-2", "label": (label + 1) % 10, "token": theirs, "tenant": "globex"}
    r = requests.post(f"{a.http}/v2/models/digits/feedback", json=wrong, timeout=10)
    assert (r.status_code, r.json()["matched_locally"], r.json()["correct"]) == (200, True, 0), r.text
    r = requests.post(
        f"{a.http}/v2/models/digits/feedback",
        json={"request_id": "order-2", "label": label, "token": token},
        timeout=10,
    )
    assert r.json()["matched_locally"] is True  # the served request's tenant, whatever the label says
    assert r.json()["correct"] == 1
    a.stop()
    b.stop()
    j = joined(read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)))
    assert j.attrs["unmatched_labels"] == 0
    assert len(j) == 3  # globex's answer under its own key, labelled by globex alone
    assert sorted(j["label"].tolist()) == sorted([label, label, (label + 1) % 10])
    assert j.loc[j["label"] != label, "tenant"].tolist() == ["globex"]


def test_a_request_re_sent_to_a_pod_masking_its_tenant_under_another_key_is_one_request(
    server_factory, repo_copy, tmp_path, digit_images
):
    """Pods a and b share the feedback key; b masks acme under a key a has not yet (a Secret not
    yet synced, a rotation), with --mask-header x-tenant. acme sent order-9 to a, re-sent it to b
    and labelled it at b. acme's masked tenant is two tokens: the log read the re-send as another
    tenant's request (two answers, the label on the re-send's). Each record carries the tag of its
    feedback token (the label's is its token's), the same on both pods: one request, its first
    answer labelled, the re-send counted a duplicate."""
    key = lambda: base64.b64encode(os.urandom(32)).decode()  # noqa: E731
    shared = tmp_path / "feedback-key"
    shared.write_text("a-feedback-secret-shared-by-the-replicas")
    log, pods = tmp_path / "predictions", []
    for pod in ("a", "b"):
        keys = tmp_path / f"keys-{pod}.json"
        keys.write_text(json.dumps({"default": key(), "tenants": {"acme": key()}}))
        common = ("--prediction-log", str(log), "--mask-keys", str(keys), "--feedback-key-file", str(shared))
        pods.append(server_factory(repo_copy, "--state-dir", str(tmp_path / pod), *common, "--mask-header", "x-tenant"))
    a, b = pods
    image, label = digit_images[0]
    sent = {"X-Request-ID": "order-9", "X-Tenant": "acme"}
    token = infer(a, image, sent).headers["X-Feedback-Token"]
    assert infer(b, image, sent).headers["X-Feedback-Token"] == token
    r = requests.post(
        f"{b.http}/v2/models/digits/feedback",
        json={"request_id": "order-9", "label": label, "token": token},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    a.stop()
    b.stop()
    df = read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    assert df["tenant"].nunique() == 2  # (acme, masked under two keys)
    assert df["tenant_tag"].nunique() == 1
    j = joined(df)
    assert (len(j), j["label"].tolist(), j.attrs["duplicate_primaries"]) == (1, [label], 1)
    assert j.attrs["unmatched_labels"] == 0


def test_a_prediction_whose_tenant_is_no_labels_tenant_is_not_kept():
    """The store kept each prediction's X-Tenant for an hour, as long as the headers allow (60
    KiB): 3,000 requests held 176 MB more, the default capacity 12 GB. A prediction whose tenant
    no label could carry (over 256 characters, as a label's ``tenant``) is not kept here; with a
    prediction log its label still reaches the log under the feedback request's X-Tenant."""
    from model_server.feedback import MAX_TENANT, FeedbackStore, LabelRules

    rules = LabelRules.of(None, (-1, 10), 64)
    sign = FeedbackSigner(b"k" * 32)
    store = FeedbackStore(sign, capacity=10)
    long, short = "t" * (MAX_TENANT + 1), "t" * MAX_TENANT
    store.record("long", "digits", "1", [3], long)
    store.record("short", "digits", "1", [3], short)
    assert list(store._served) == [("digits", "short", short)]
    item = {"request_id": "long", "label": 3, "token": sign.token("digits", "long", long)}
    answer = store.label("digits", item, rules, accept_unmatched=True, tenant=long)
    assert (answer.matched, answer.tenant) == (False, long)
    item = {"request_id": "short", "label": 3, "token": sign.token("digits", "short", short)}
    assert store.label("digits", item, rules).matched


def test_a_tenant_of_no_characters_is_no_tenant():
    """A label whose ``tenant`` is "" (or whose request's X-Tenant is "") takes the token of no
    tenant (the signer leaves an empty one out), but was logged with tenant "", beside the labels
    with none: the gate, which bounds what one tenant's labels decide, counted one client that
    never named a tenant as two sources. "" is none: the label's tenant and the answer's alike."""
    from model_server.feedback import FeedbackStore, LabelRules

    rules = LabelRules.of(None, (-1, 10), 64)
    sign = FeedbackSigner(b"k" * 32)
    store = FeedbackStore(sign, capacity=10)
    for i, (served, item, header) in enumerate([(None, {"tenant": ""}, None), (None, {}, ""), ("", {}, None)]):
        rid = f"r-{i}"
        if served is not None:
            store.record(rid, "digits", "1", [3], served)
        labelled = {"request_id": rid, "label": 3, "token": sign.token("digits", rid), **item}
        answer = store.label("digits", labelled, rules, accept_unmatched=True, tenant=header)
        assert answer.tenant is None, (served, item, header)
        assert answer.matched is (served is not None)


def test_an_inference_whose_x_tenant_has_no_characters_is_logged_with_no_tenant():
    """An inference's X-Tenant of "" was kept in its record's metadata: logged as tenant "" (a
    token of "" where x-tenant is masked), while its label, its token and its feedback store have
    none. Under a request id another tenant sent too, the label of the one without a tenant then
    joined no answer. "" is none in the record too."""
    from model_server.shadow import request_metadata

    assert request_metadata({"X-Tenant": "", "X-User-Id": "u-1", "X-Meta-Note": ""}) == {
        "x-user-id": "u-1",
        "x-meta-note": "",
    }
    assert request_metadata({"x-tenant": "acme"}) == {"x-tenant": "acme"}


def test_a_feedback_requests_x_tenant_is_bounded_as_a_labels_tenant(server_factory, repo_copy, tmp_path):
    """A label's ``tenant`` is at most 256 characters, but the feedback request's X-Tenant (the
    tenant of every label in it without one) was as long as the headers allow: ten lists of
    1,000 labels under a 59 KB X-Tenant took the writer to 1.2 GB (the buffer's byte budget
    counts no tenant). It is bounded alike: 400."""
    s = logging_server(server_factory, repo_copy, tmp_path)
    sign = signer(tmp_path)
    for tenant in ("t" * 257, "a\tb"):
        items = [{"request_id": f"r{i}", "label": 1, "token": sign.token("digits", f"r{i}", tenant)} for i in range(3)]
        r = requests.post(f"{s.http}/v2/models/digits/feedback", json=items, headers={"X-Tenant": tenant}, timeout=10)
        assert r.status_code == 400, r.text
        assert "X-Tenant" in r.json()["error"]
    tenant = "t" * 256
    item = {"request_id": "r0", "label": 1, "token": sign.token("digits", "r0", tenant)}
    r = requests.post(f"{s.http}/v2/models/digits/feedback", json=item, headers={"X-Tenant": tenant}, timeout=10)
    assert r.status_code == 200, r.text


def test_a_label_the_log_dropped_at_its_flush_may_be_sent_again(server_factory, repo_copy, tmp_path, digit_images):
    """A label queued (answered logged: true) and dropped at the flush, its tenant's masking key
    unusable, was in no log, and its resend was refused 409 "already has feedback": fixed, the
    key took no label again. The writer takes a dropped label's mark back now: its resend, once
    the key is usable, is logged (once: a third send is 409). The live view counted it when it
    was queued, and its resend again: 2 for 1 label, and a client re-sending once a flush while
    the key was broken moved the live accuracy check as it liked. Then the first send stayed
    counted and its resend was not (within the TTL, on this replica): counted though no file held
    it. Now it is counted once its file is written: the dropped send never, the resend once."""
    key = lambda: base64.b64encode(os.urandom(32)).decode()  # noqa: E731
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": key(), "tenants": {"acme": "not-a-key"}}))
    log = tmp_path / "predictions"
    s = server_factory(
        repo_copy,
        *("--state-dir", str(tmp_path / "state"), "--prediction-log", str(log), "--mask-keys", str(keys)),
        *("--prediction-log-flush-s", "0.1"),
        token=TOKEN,
    )
    image, label = digit_images[0]
    token = infer(s, image, {"X-Request-ID": "order-1", "X-Tenant": "acme"}).headers["X-Feedback-Token"]
    item = {"request_id": "order-1", "label": label, "token": token}
    r = requests.post(f"{s.http}/v2/models/digits/feedback", json=item, timeout=10)
    assert r.status_code == 200, r.text
    assert (r.json()["matched_locally"], r.json()["logged"]) == (True, True)  # queued
    dropped = lambda: s.metric("prediction_log_records_total", outcome="mask_unavailable") or 0  # noqa: E731
    deadline = time.monotonic() + 20
    while dropped() < 2 and time.monotonic() < deadline:  # the inference's row and the label's
        time.sleep(0.05)
    assert dropped() == 2
    assert (s.metric("feedback_total", model="digits", version="1") or 0) == 0  # dropped: not counted
    assert (s.metric("feedback_correct_total", model="digits", version="1") or 0) == 0
    keys.write_text(json.dumps({"default": key(), "tenants": {"acme": key()}}))  # the key fixed
    time.sleep(1.5)  # (the key file is looked at again after a second)
    r = requests.post(f"{s.http}/v2/models/digits/feedback", json=item, timeout=10)
    assert r.status_code == 200, r.text
    assert (r.json()["matched_locally"], r.json()["logged"], r.json()["correct"]) == (True, True, 1)
    r = requests.post(f"{s.http}/v2/models/digits/feedback", json=item, timeout=10)
    assert r.status_code == 409, r.text
    assert settled(s, "feedback_total", 1, model="digits", version="1") == 1
    assert settled(s, "feedback_correct_total", 1, model="digits", version="1") == 1
    s.stop()
    rows = read(log, datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))
    assert rows["role"].tolist() == ["label"]  # the resend, once (the inference was dropped)
    assert rows["label"].tolist() == [label]
