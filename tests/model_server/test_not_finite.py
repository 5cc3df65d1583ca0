"""NaN and Inf in a float tensor's binary data (tritonclient's binary_data=True): answered, as
Triton answers them, and never a prediction in the log, the audit, the gates or the feedback
counters. JSON bodies are read as Triton reads them: UTF-8 without a BOM, no NaN."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import requests

from devstack.processes import ModelServerProcess, start_model_server
from model_server.predictionlog import GATE_COLUMNS, SHADOW_PAIR_COLUMNS, read, shadow_pairs
from tests.support import settled
from vision_rollout.audit import audit
from vision_rollout.engine import StageWindow, stage_samples
from vision_rollout.spec import RolloutSpec

pytestmark = pytest.mark.integration

TOKEN = "not-finite-token"
CLASSES = 10


def write_classifier(repository: Path) -> None:
    """``tiny``: FP32 [batch, 4] to the softmax of x @ W ([batch, 10]), versions 1 and 2 (W a
    little apart): a NaN or Inf in x is a NaN answer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from scripts.build_models import IR_VERSION, OPSET

    rng = np.random.default_rng(0)
    w = (10 * rng.normal(size=(4, CLASSES))).astype(np.float32)
    for version, weights in (("1", w), ("2", w + rng.normal(scale=0.1, size=w.shape).astype(np.float32))):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
        y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])
        nodes = [
            helper.make_node("MatMul", ["x", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ]
        graph = helper.make_graph(nodes, "tiny", [x], [y], [numpy_helper.from_array(weights, "W")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        (repository / "tiny" / version).mkdir(parents=True)
        onnx.save(model, repository / "tiny" / version / "model.onnx")
    config = {
        "name": "tiny",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "input": [{"name": "x", "datatype": "FP32", "dims": [-1, 4]}],
        "output": [{"name": "probabilities", "datatype": "FP32", "dims": [-1, CLASSES]}],
        "version_policy": {"specific": {"versions": [1, 2]}},
    }
    (repository / "tiny" / "config.json").write_text(json.dumps(config))


def infer(client, x: np.ndarray, rid: str):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True)
    return client.infer("tiny", [inp], outputs=[out], headers={"X-Request-ID": rid})


def test_binary_nan_and_inf_are_answered_and_kept_out_of_every_statistic(tmp_path):
    """10 of 200 requests with a NaN or an Inf in their binary FP32 data: each answered 200 with
    the model's NaN, as Triton answers; logged without a prediction (top1 null, top1_prob NaN);
    left out of the shadow audit's comparisons and counted; a wrong prediction for the gates; and
    a label for one is never counted correct (argmax of a NaN row was class 0)."""
    repo, log = tmp_path / "repo", tmp_path / "log"
    write_classifier(repo)
    s = start_model_server(repo, tmp_path, "--prediction-log", str(log), token=TOKEN)
    try:
        policy = {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 100}}
        r = requests.put(f"{s.http}/v2/models/tiny/traffic", json=policy, headers=s.admin, timeout=10)
        assert r.status_code == 200, r.text
        client = s.client()
        rng = np.random.default_rng(1)
        tokens = {}
        for i in range(200):
            x = rng.normal(size=(1, 4)).astype(np.float32)
            bad = i % 20 == 7
            if bad:
                x[0, i % 4] = (np.nan, np.inf, -np.inf, np.nan)[(i // 20) % 4]
            res = infer(client, x, f"{'bad' if bad else 'ok'}-{i}")
            out = res.as_numpy("probabilities")
            assert out.shape == (1, CLASSES)
            assert np.isnan(out).all() if bad else np.isfinite(out).all()
            tokens[f"{'bad' if bad else 'ok'}-{i}"] = res.get_response()["parameters"]["feedback_token"]
        # A label of class 0 for every NaN answer: none of them is a correct prediction.
        for rid, token in tokens.items():
            if rid.startswith("bad"):
                body = {"request_id": rid, "label": 0, "token": token}
                r = requests.post(f"{s.http}/v2/models/tiny/feedback", json=body, timeout=10)
                assert r.status_code == 200, r.text
                assert r.json()["correct"] == 0
        assert settled(s, "feedback_total", 10, model="tiny", version="1") == 10
        assert (s.metric("feedback_correct_total", model="tiny", version="1") or 0) == 0
    finally:
        s.stop()  # a clean stop flushes the log
    start, end = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1)
    records = read(log, start, end, "tiny")
    bad = records[records["request_id"].str.startswith("bad") & (records["role"] != "label")]
    assert len(bad) == 20  # 10 primaries, 10 shadow copies
    assert bad["top1"].isna().all()
    assert bad["top1_prob"].isna().all()
    assert bad["topk_index"].isna().all()
    assert bad["probs"].isna().all()
    assert (bad["outcome"] == "ok").all()
    good = records[records["request_id"].str.startswith("ok") & (records["role"] != "label")]
    assert good["top1"].notna().all()
    assert np.isfinite(good["top1_prob"]).all()

    pairs = shadow_pairs(read(log, start, end, "tiny", columns=SHADOW_PAIR_COLUMNS, roles=("primary", "shadow")))
    assert len(pairs) == 190
    assert pairs.attrs["primary_not_finite"] == 10
    result = audit(log, start, end, "tiny")
    assert result.rows == 190
    assert result.primary_not_finite == 10
    assert result.shadow_not_finite == 0
    assert np.isfinite(result.kl_of_means)
    assert all(np.isfinite(v) for v in result.divergence_quantiles.values())

    spec = RolloutSpec.from_dict(
        {"model": "tiny", "baseline_version": "1", "candidate_version": "2", "stages": [50, 100]}
    )
    samples = stage_samples(
        read(log, start, end, "tiny", columns=GATE_COLUMNS), spec, StageWindow(0, 50, 0.0), end.timestamp(), {}
    )
    labelled = samples.dropna(subset=["correct"])
    assert len(labelled) == 10
    assert (labelled["correct"] == 0).all()


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    """One server on ``tiny`` for the tests that send it requests it refuses (they change nothing)."""
    folder = tmp_path_factory.mktemp("tiny")
    write_classifier(folder / "repo")
    s = start_model_server(folder / "repo", folder, token=TOKEN)
    yield s
    s.stop()


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda b: codecs.BOM_UTF8 + b.encode(), id="utf-8 BOM"),
        pytest.param(lambda b: b.encode("utf-16"), id="utf-16"),
        pytest.param(lambda b: b.encode("utf-16-le"), id="utf-16-le"),
        pytest.param(lambda b: b.encode("utf-32"), id="utf-32"),
        pytest.param(lambda b: b.replace("0.5", "NaN").encode(), id="NaN constant"),
        pytest.param(lambda b: b.replace("0.5", "-Infinity").encode(), id="Infinity constant"),
    ],
)
def test_json_bodies_are_utf8_without_bom_or_nan(tiny_server, encode):
    """Python's json.loads takes a UTF-8 BOM, UTF-16 and UTF-32 bodies and NaN; RapidJSON
    (Triton) and RFC 8259 do not: each is a 400 naming what is wrong, on the infer path and the
    other JSON endpoints; the same body in UTF-8 is answered."""
    s = tiny_server
    body = '{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[0.5,1,2,3]}]}'
    assert requests.post(f"{s.http}/v2/models/tiny/infer", data=body.encode(), timeout=10).status_code == 200
    r = requests.post(f"{s.http}/v2/models/tiny/infer", data=encode(body), timeout=10)
    assert r.status_code == 400, r.text
    assert "malformed JSON" in r.json()["error"]
    feedback = '{"request_id":"x","label":0.5,"token":"t"}'
    r = requests.post(f"{s.http}/v2/models/tiny/feedback", data=encode(feedback), timeout=10)
    assert r.status_code == 400, r.text
    assert "malformed JSON" in r.json()["error"]
