"""The KServe v2 / Triton HTTP protocol against a real server, with tritonclient as the client."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration

HEADER_LENGTH = "inference-header-content-length"


def image_input(images: list[bytes], binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary)
    return inp


def test_health_and_server_metadata(server):
    c = server.client()
    assert c.is_server_live()
    assert c.is_server_ready()
    meta = c.get_server_metadata()
    assert meta["name"] == "model-server"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])


def test_model_metadata_shows_signature_and_execution_provider(server):
    c = server.client()
    meta = c.get_model_metadata("digits")
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["execution_providers"] == {"1": "CPUExecutionProvider"}
    versioned = c.get_model_metadata("digits", model_version="1")
    assert versioned["parameters"]["versions"]["1"]["execution_provider"] == "CPUExecutionProvider"
    assert len(versioned["parameters"]["versions"]["1"]["sha256"]) == 64
    assert c.get_model_metadata("resnet_bench")["inputs"][0]["shape"] == [-1, 3, 224, 224]


def test_model_config_carries_heldout_accuracy(server):
    cfg = server.client().get_model_config("digits")
    metadata = json.loads(cfg["parameters"]["metadata"]["string_value"])
    accuracy = {v: m["heldout_accuracy"] for v, m in metadata["versions"].items()}
    assert accuracy["2"] > accuracy["1"] > accuracy["3"]
    assert cfg["version_policy"] == {"specific": {"versions": [1]}}


def test_model_config_is_triton_s_model_configuration(server):
    """GET .../config answers Triton's model configuration JSON (protobuf's JSON of ModelConfig,
    64-bit integers as numbers): a Triton tool reads the per-item dims (the batch dimension left
    out where the model batches), TYPE_ data types and the instance group from it."""
    c = server.client()
    cfg = c.get_model_config("digits")
    assert (cfg["name"], cfg["platform"], cfg["backend"], cfg["max_batch_size"]) == (
        "digits",
        "onnxruntime_onnx",
        "onnxruntime",
        64,
    )
    assert [(t["name"], t["data_type"], t["dims"]) for t in cfg["input"]] == [("image", "TYPE_STRING", [])]
    assert [(t["name"], t["data_type"], t["dims"], t["label_filename"]) for t in cfg["output"]] == [
        ("probabilities", "TYPE_FP32", [10], "labels.txt")
    ]
    assert [(g["kind"], g["count"]) for g in cfg["instance_group"]] == [("KIND_CPU", 1)]
    assert json.loads(cfg["parameters"]["preprocess"]["string_value"])["size"] == [8, 8]
    resnet = c.get_model_config("resnet_bench")
    assert [(t["data_type"], t["dims"]) for t in resnet["input"] + resnet["output"]] == [
        ("TYPE_FP32", [3, 224, 224]),
        ("TYPE_FP32", [1000]),
    ]
    assert c.get_model_config("digits", model_version="1") == cfg
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import json_format

    parsed = json_format.ParseDict(resnet, model_config_pb2.ModelConfig())  # every field is one Triton's has
    assert list(parsed.input[0].dims) == [3, 224, 224]
    assert parsed.input[0].data_type == model_config_pb2.TYPE_FP32


def test_a_load_takes_the_config_get_model_config_answers(server):
    """load_model(config=...) takes Triton's model configuration as tritonclient sends it: what
    get_model_config answered, changed where a load may change it (max_batch_size,
    version_policy, dynamic_batching, instance_group's count); a field it may not change is
    refused in Triton's wording, and this server's own override form still works."""
    c = server.client()
    cfg = c.get_model_config("digits")
    try:
        c.load_model("digits", headers=server.admin, config=json.dumps(cfg))  # the round trip
        assert c.get_model_config("digits") == cfg
        changed = {
            **cfg,
            "max_batch_size": 32,
            "version_policy": {"specific": {"versions": ["1", "2"]}},
            "instance_group": [{**cfg["instance_group"][0], "count": 2}],
            "dynamic_batching": {"preferred_batch_size": [8], "max_queue_delay_microseconds": "100"},
        }
        c.load_model("digits", headers=server.admin, config=json.dumps(changed))
        now = c.get_model_config("digits")
        assert (now["max_batch_size"], now["instance_group"][0]["count"]) == (32, 2)
        assert now["dynamic_batching"]["preferred_batch_size"] == [8]
        assert now["input"] == cfg["input"]
        assert now["output"] == cfg["output"]
        assert c.get_model_metadata("digits")["versions"] == ["1", "2"]
        c.load_model("digits", headers=server.admin, config=json.dumps({"instance_count": 1, "max_batch_size": 64}))
        assert c.get_model_config("digits")["instance_group"][0]["count"] == 1
        output = {**cfg["output"][0], "dims": [12]}
        for bad in (
            {**cfg, "output": [output]},
            {**cfg, "input": [{**cfg["input"][0], "data_type": "TYPE_FP32"}]},
            {**cfg, "max_batch_size": 0},  # the same dims would be per request, not per item
            {**cfg, "platform": "tensorrt_plan"},
            {**cfg, "instance_group": [{"kind": "KIND_GPU", "count": 1}]},
            {**cfg, "sequence_batching": {}},
        ):
            with pytest.raises(InferenceServerException, match="failed to load 'digits': ") as err:
                c.load_model("digits", headers=server.admin, config=json.dumps(bad))
            assert err.value.status() == "400"
        huge = {**cfg, "instance_group": [{**cfg["instance_group"][0], "count": 1_000_000_000}]}
        with pytest.raises(InferenceServerException, match=r"instance_group\[0\]\.count: 1000000000 is over 32") as err:
            c.load_model("digits", headers=server.admin, config=json.dumps(huge))
        assert err.value.status() == "400"
        assert c.get_model_config("digits")["instance_group"][0]["count"] == 1  # the loaded version serves on
    finally:
        c.load_model("digits", headers=server.admin)
    assert c.get_model_config("digits") == cfg


def test_a_load_reads_64_bit_numbers_written_as_text_to_their_field_s_range(server, digit_images):
    """Protobuf's JSON writes a uint64 as text, up to 20 digits: one of 19 or 20 digits was
    refused as "must be an integer >= 0"; past the field's range the load is refused naming the
    field and the range."""
    c = server.client()
    widest = "18446744073709551615"
    batching = {"default_queue_policy": {"default_timeout_microseconds": widest}, "priority_queue_policy": {}}
    try:
        c.load_model("digits", headers=server.admin, config=json.dumps({"dynamic_batching": batching}))
        queue = c.get_model_config("digits")["dynamic_batching"]["default_queue_policy"]
        assert int(queue["default_timeout_microseconds"]) == 2**64 - 1
        assert c.infer("digits", [image_input([digit_images[0][0]])]).as_numpy("probabilities").shape == (1, 10)
        past = {"default_queue_policy": {"default_timeout_microseconds": "18446744073709551616"}}
        with pytest.raises(
            InferenceServerException,
            match=r"default_timeout_microseconds: 18446744073709551616 is over 18446744073709551615, the largest Triton's uint64",
        ) as err:
            c.load_model("digits", headers=server.admin, config=json.dumps({"dynamic_batching": past}))
        assert err.value.status() == "400"
        levels = {"priority_levels": "99999999999999999999", "default_priority_level": 1}
        with pytest.raises(
            InferenceServerException, match=r"priority_levels: 99999999999999999999 is over 18446744073709551615"
        ):
            c.load_model("digits", headers=server.admin, config=json.dumps({"dynamic_batching": levels}))
    finally:
        c.load_model("digits", headers=server.admin)


def test_the_config_writes_64_bit_fields_as_numbers_as_triton_s_config_json(server):
    """Protobuf's JSON printer writes int64 and uint64 as text, but Triton's ModelConfigToJson
    (core src/model_config_utils.cc) turns each 64-bit field of ModelConfig back into a number
    ("the int64 fields fixes to be actual numbers instead of the string madness done by
    protobuf"): dims, version_policy.specific.versions, dynamic_batching's delay, levels and
    timeouts; priority_queue_policy's keys stay text (JSON's keys are). tritonclient's
    get_model_config hands that JSON over as it is."""
    c = server.client()
    batching = {
        "max_queue_delay_microseconds": "2000",
        "priority_levels": "2",
        "default_priority_level": "2",
        "default_queue_policy": {"default_timeout_microseconds": "18446744073709551615"},
        "priority_queue_policy": {"1": {"default_timeout_microseconds": "7"}},
    }
    override = {"version_policy": {"specific": {"versions": ["1"]}}, "dynamic_batching": batching}
    try:
        c.load_model("digits", headers=server.admin, config=json.dumps(override))
        cfg = c.get_model_config("digits")
        db = cfg["dynamic_batching"]
        assert (db["max_queue_delay_microseconds"], db["priority_levels"], db["default_priority_level"]) == (2000, 2, 2)
        assert db["default_queue_policy"]["default_timeout_microseconds"] == 2**64 - 1
        assert db["priority_queue_policy"] == {
            "1": {
                "max_queue_size": 0,
                "default_timeout_microseconds": 7,
                "allow_timeout_override": False,
                "timeout_action": "REJECT",
            }
        }
        assert cfg["version_policy"] == {"specific": {"versions": [1]}}
        assert cfg["output"][0]["dims"] == [10]
    finally:
        c.load_model("digits", headers=server.admin)


def test_model_readiness(server):
    c = server.client()
    assert c.is_model_ready("digits")
    assert c.is_model_ready("digits", "1")
    assert not c.is_model_ready("digits", "3")
    assert not c.is_model_ready("no_such_model")
    r = requests.get(f"{server.http}/v2/models/no_such_model/ready", timeout=5)
    assert r.status_code == 404
    assert r.json()["error"] == "Request for unknown model: 'no_such_model' is not found"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_digits_infer_classifies_validation_images(server, digit_images, binary):
    c = server.client()
    batch = digit_images[:32]
    images = [img for img, _ in batch]
    if binary:
        inputs = [image_input(images)]
    else:  # JSON tensors carry bytes as base64 strings with content_type (KServe convention)
        inputs = None
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    if inputs is not None:
        result = c.infer("digits", inputs, outputs=[out], request_id="req-1")
        probs = result.as_numpy("probabilities")
        assert result.get_response()["id"] == "req-1"
        assert result.get_response()["model_version"] == "1"
    else:
        import base64

        body = {
            "id": "req-2",
            "inputs": [
                {
                    "name": "image",
                    "shape": [len(images)],
                    "datatype": "BYTES",
                    "parameters": {"content_type": "base64"},
                    "data": [base64.b64encode(i).decode() for i in images],
                }
            ],
        }
        r = requests.post(f"{server.http}/v2/models/digits/infer", json=body, timeout=10)
        assert r.status_code == 200, r.text
        payload = r.json()
        assert payload["id"] == "req-2"
        probs = np.array(payload["outputs"][0]["data"], dtype=np.float32).reshape(payload["outputs"][0]["shape"])
    assert probs.shape == (32, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    labels = np.array([label for _, label in batch])
    assert (probs.argmax(axis=1) == labels).mean() >= 0.9


def test_any_image_size_and_jpeg_are_accepted(server, digit_images):
    img = Image.open(io.BytesIO(digit_images[0][0]))
    big = io.BytesIO()
    img.resize((96, 96), Image.Resampling.NEAREST).convert("RGB").save(big, format="JPEG", quality=95)
    result = server.client().infer("digits", [image_input([digit_images[0][0], big.getvalue()])])
    top = result.as_numpy("probabilities").argmax(axis=1)
    assert top[0] == top[1] == digit_images[0][1]


def test_versioned_infer_and_fp32_tensor_model(server):
    c = server.client()
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = c.infer("resnet_bench", [inp], model_version="1")
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 1000)
    assert np.isfinite(logits).all()
    assert not np.allclose(logits[0], logits[1])


def test_repository_index_lists_loaded_and_idle_models(server):
    index = server.client().get_model_repository_index()
    assert {"name": "digits", "version": "1", "state": "READY"} in index
    assert {"name": "resnet_bench", "version": "1", "state": "READY"} in index


def test_repository_index_s_ready_is_a_boolean(server):
    """A "ready" that is not a JSON boolean is a 400, as Triton reads it: the text "false" was
    taken for true."""
    r = requests.post(f"{server.http}/v2/repository/index", json={"ready": True}, timeout=5)
    assert r.status_code == 200
    for ready in ("false", 0, None):
        r = requests.post(f"{server.http}/v2/repository/index", json={"ready": ready}, timeout=5)
        assert r.status_code == 400
        assert r.json()["error"].startswith("'ready' must be true or false")


def test_load_and_unload_through_tritonclient(server, digit_images):
    c = server.client()
    policy = json.dumps({"version_policy": {"specific": {"versions": [1, 2, 3]}}})
    c.load_model("digits", headers=server.admin, config=policy)
    try:
        assert c.get_model_metadata("digits")["versions"] == ["1", "2", "3"]
        for version in ("1", "2", "3"):
            result = c.infer("digits", [image_input([digit_images[0][0]])], model_version=version)
            assert result.get_response()["model_version"] == version
        # Without a version, the highest loaded version serves (Triton's default).
        assert c.infer("digits", [image_input([digit_images[0][0]])]).get_response()["model_version"] == "3"
    finally:
        c.load_model("digits", headers=server.admin)  # back to config.json's policy: [1]
    assert c.get_model_metadata("digits")["versions"] == ["1"]

    c.unload_model("resnet_bench", headers=server.admin)
    assert not c.is_model_ready("resnet_bench")
    # As Triton: one entry per version, UNAVAILABLE as "unloaded".
    assert [e for e in c.get_model_repository_index() if e["name"] == "resnet_bench"] == [
        {"name": "resnet_bench", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    ]
    x = httpclient.InferInput("input", [1, 3, 224, 224], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
    with pytest.raises(InferenceServerException) as err:
        c.infer("resnet_bench", [x])
    assert err.value.status() == "503"
    assert "not loaded" in err.value.message()
    c.load_model("resnet_bench", headers=server.admin)
    assert c.is_model_ready("resnet_bench")


def test_what_is_not_loaded_answers_metadata_config_readiness_and_index_as_triton(server_factory, repo_copy):
    """Triton answers a model none of whose versions is loaded, and a version never loaded, 404
    ("Request for unknown model: ..."), a version that was loaded and is not now 503, and lists
    each version in its index (a model never loaded by its name alone). Metadata and
    configuration answered 503 "not loaded", and the index one entry per model. Inference
    still answers 503, which the mesh retries on another pod."""
    server = server_factory(repo_copy, token=ADMIN_TOKEN)
    c = server.client()
    c.load_model(
        "digits", headers=server.admin, config=json.dumps({"version_policy": {"specific": {"versions": [1, 2]}}})
    )
    c.load_model("digits", headers=server.admin, config=json.dumps({"version_policy": {"specific": {"versions": [2]}}}))

    def status(path: str) -> tuple[int, str]:
        r = requests.get(f"{server.http}{path}", timeout=10)
        return r.status_code, r.json()["error"] if r.status_code != 200 else ""

    unknown = "Request for unknown model: 'digits'"
    for suffix in ("", "/config", "/ready"):
        assert status(f"/v2/models/digits/versions/1{suffix}") == (503, f"{unknown} version 1 is not at ready state")
        assert status(f"/v2/models/digits/versions/3{suffix}") == (404, f"{unknown} version 3 is not found")
    assert c.get_model_repository_index() == [
        {"name": "digits", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
        {"name": "digits", "version": "2", "state": "READY"},
    ]
    c.unload_model("digits", headers=server.admin)
    for suffix in ("", "/config", "/ready"):
        assert status(f"/v2/models/digits{suffix}") == (404, f"{unknown} has no available versions")
    with pytest.raises(InferenceServerException) as err:
        c.get_model_metadata("digits")
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException) as err:
        c.get_model_config("digits")
    assert err.value.status() == "404"
    assert not c.is_model_ready("digits")
    assert c.get_model_repository_index() == [
        {"name": "digits", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"},
        {"name": "digits", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"},
    ]
    assert requests.post(f"{server.http}/v2/repository/index", json={"ready": True}, timeout=10).json() == []
    r = requests.post(f"{server.http}/v2/models/digits/infer", json={"inputs": []}, timeout=10)
    assert r.status_code == 503  # (the mesh retries it)
    (repo_copy / "other").mkdir()
    shutil.copy(repo_copy / "digits" / "config.json", repo_copy / "other" / "config.json")
    assert {"name": "other"} in c.get_model_repository_index()  # never loaded: its name alone
    assert status("/v2/models/other") == (404, "Request for unknown model: 'other' is not found")


def test_inference_on_a_version_loaded_before_and_not_now_is_a_503_as_triton(server_factory, repo_copy, digit_images):
    """Triton's core answers a version it loaded before (or whose load failed) and that is not
    ready now UNAVAILABLE, 503 "not at ready state", for inference as for metadata, and one never
    loaded NOT_FOUND, 404. Inference here answered 404 for the first while another version
    served; a 503 is also what the mesh retries on another pod."""
    server = server_factory(repo_copy, token=ADMIN_TOKEN)
    c = server.client()
    both = {"version_policy": {"specific": {"versions": [1, 2]}}}
    c.load_model("digits", headers=server.admin, config=json.dumps(both))
    c.load_model("digits", headers=server.admin, config=json.dumps({"version_policy": {"specific": {"versions": [2]}}}))
    inputs = [image_input([digit_images[0][0]])]
    unknown = "Request for unknown model: 'digits'"
    with pytest.raises(InferenceServerException) as err:
        c.infer("digits", inputs, model_version="1")
    assert (err.value.status(), err.value.message()) == ("503", f"{unknown} version 1 is not at ready state")
    with pytest.raises(InferenceServerException) as err:
        c.infer("digits", inputs, headers={"X-Model-Version": "1"})
    assert err.value.status() == "503"
    with pytest.raises(InferenceServerException) as err:
        c.infer("digits", inputs, model_version="3")  # never loaded
    assert err.value.status() == "404"
    (repo_copy / "digits" / "3" / "model.onnx").write_bytes(b"this is not an onnx file")
    with pytest.raises(InferenceServerException, match="failed to load 'digits'"):
        c.load_model(
            "digits", headers=server.admin, config=json.dumps({"version_policy": {"specific": {"versions": [2, 3]}}})
        )
    with pytest.raises(InferenceServerException) as err:
        c.infer("digits", inputs, model_version="3")  # its load failed: UNAVAILABLE in Triton's index
    assert (err.value.status(), err.value.message()) == ("503", f"{unknown} version 3 is not at ready state")
    assert c.infer("digits", inputs, model_version="2").get_response()["model_version"] == "2"


def test_a_version_whose_load_failed_is_in_the_index_unavailable_with_its_reason(server_factory, repo_copy):
    """As Triton: a load that fails on a version while others keep serving lists that version
    UNAVAILABLE with the reason it failed (it was not in the index at all), answers it 503 "not
    at ready state", and a later load of it that works makes it READY."""
    server = server_factory(repo_copy, token=ADMIN_TOKEN)
    c = server.client()
    onnx = repo_copy / "digits" / "3" / "model.onnx"
    good = onnx.read_bytes()
    onnx.write_bytes(b"this is not an onnx file")
    policy = {"version_policy": {"specific": {"versions": [1, 3]}}}
    with pytest.raises(InferenceServerException, match="failed to load 'digits'") as err:
        c.load_model("digits", headers=server.admin, config=json.dumps(policy))
    assert err.value.status() == "400"
    index = c.get_model_repository_index()
    assert [(e["version"], e["state"]) for e in index if e["name"] == "digits"] == [
        ("1", "READY"),
        ("3", "UNAVAILABLE"),
    ]
    assert "failed to load model 'digits' version 3" in index[1]["reason"]
    assert c.is_model_ready("digits", "1")
    r = requests.get(f"{server.http}/v2/models/digits/versions/3", timeout=10)
    assert (r.status_code, r.json()["error"]) == (
        503,
        "Request for unknown model: 'digits' version 3 is not at ready state",
    )
    onnx.write_bytes(good)
    c.load_model("digits", headers=server.admin, config=json.dumps(policy))
    assert [(e["version"], e["state"]) for e in c.get_model_repository_index() if e["name"] == "digits"] == [
        ("1", "READY"),
        ("3", "READY"),
    ]


def test_a_version_0_or_negative_in_a_path_is_answered_as_triton_answers_it(server, digit_images):
    """Triton reads a path's version as int64: 0 (or any number within int64) is a version the
    model does not have, a 404 (its statistics a 400); a negative one matches none of its
    endpoints, a 404; past int64, a 400. Each was a 400 here, and a 19-digit one too."""
    c = server.client()
    unknown = "Request for unknown model: 'digits'"
    for version in ("0", "9223372036854775807"):
        for suffix in ("", "/config", "/ready"):
            r = requests.get(f"{server.http}/v2/models/digits/versions/{version}{suffix}", timeout=10)
            assert (r.status_code, r.json()["error"]) == (404, f"{unknown} version {version} is not found")
    inputs = [image_input([digit_images[0][0]])]
    for version in ("0", "-1", "9223372036854775807"):
        with pytest.raises(InferenceServerException) as err:
            c.infer("digits", inputs, model_version=version)
        assert err.value.status() == "404"
        with pytest.raises(InferenceServerException) as err:
            c.get_model_metadata("digits", model_version=version)
        assert err.value.status() == "404"
        assert not c.is_model_ready("digits", version)
    with pytest.raises(InferenceServerException, match="requested model version is not available") as err:
        c.get_inference_statistics("digits", model_version="0")
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException) as err:
        c.get_inference_statistics("digits", model_version="-1")
    assert err.value.status() == "404"
    for version in ("9223372036854775808", "1" * 40):
        with pytest.raises(InferenceServerException, match="invalid version") as err:
            c.infer("digits", inputs, model_version=version)
        assert err.value.status() == "400"
    for version in ("1", "0" * 30 + "1"):
        assert c.infer("digits", inputs, model_version=version).get_response()["model_version"] == "1"


def test_a_version_not_loaded_is_named_by_its_number_not_echoed_as_sent(server, digit_images):
    """A version with leading zeros is the number they lead (Triton's std::stoll), so any
    number of them was a version: the 404 for one not loaded quoted it as sent, a 50 kB path or
    X-Model-Version header answered with a 50 kB error. It names the number, as the metadata's
    404 does."""
    c = server.client()
    inputs = [image_input([digit_images[0][0]])]
    padded = "0" * 50_000 + "7"
    for call in (
        lambda: c.infer("digits", inputs, model_version=padded),
        lambda: c.infer("digits", inputs, headers={"X-Model-Version": padded}),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == "404"
        assert err.value.message() == "model 'digits' version 7 is not loaded (loaded: [1])"


def test_a_version_in_a_path_that_is_not_digits_matches_no_endpoint_as_in_triton(server, digit_images):
    """Triton's routes take a path's version as ``/versions/([0-9]+)``: any other text matches
    none of its endpoints, a 404. Each was a 400 "invalid version" here."""
    c = server.client()
    inputs = [image_input([digit_images[0][0]])]
    for version in ("abc", "1a", "+1", "1.0"):
        with pytest.raises(InferenceServerException) as err:
            c.infer("digits", inputs, model_version=version)
        assert err.value.status() == "404", version
        for call in (c.get_model_metadata, c.get_model_config, c.get_inference_statistics):
            with pytest.raises(InferenceServerException) as err:
                call("digits", model_version=version)
            assert err.value.status() == "404", (call, version)
        r = requests.get(f"{server.http}/v2/models/digits/versions/{version}/ready", timeout=10)
        assert (r.status_code, r.json()["error"]) == (
            404,
            f"no such endpoint: GET /v2/models/digits/versions/{version}/ready",
        )
    digit = "\u0661"  # an Arabic-Indic 1: a digit to str.isdigit and int(), not to [0-9]
    r = requests.post(f"{server.http}/v2/models/digits/versions/{digit}/infer", json={"inputs": []}, timeout=10)
    assert r.status_code == 404
    fault = requests.put(
        f"{server.http}/v2/models/digits/versions/abc/fault", json={}, headers=server.admin, timeout=10
    )
    assert fault.status_code == 404
    # The version named by X-Model-Version is no path: text there is still a client's 400.
    with pytest.raises(InferenceServerException, match="invalid version") as err:
        c.infer("digits", inputs, headers={"X-Model-Version": "abc"})
    assert err.value.status() == "400"


def test_request_parameters_triton_refuses_are_refused_for_every_model(server, digit_images):
    """Triton's HTTP frontend reads priority and timeout as uint64 and refuses the "triton_"
    keys, whatever the model; a model without dynamic batching answered them 200, and one with
    it took a priority past uint64 as its default level."""
    c = server.client()
    image = image_input([digit_images[0][0]])
    for asked in ({"priority": 2**64}, {"timeout": 2**64}):
        with pytest.raises(InferenceServerException) as err:
            c.infer("digits", [image], **asked)
        assert err.value.status() == "400"
        assert f"parameters.{next(iter(asked))} must be" in err.value.message()
    assert c.infer("digits", [image], priority=2**64 - 1, timeout=2**64 - 1).as_numpy("probabilities").shape == (1, 10)
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(digit_images[0][0]).decode()],
                "parameters": {"content_type": "base64"},
            }
        ],
    }
    for parameters in (
        {"priority": "1"},
        {"timeout": -1},
        {"sequence_id": 1.5},
        {"sequence_start": 1},
        {"sequence_end": "true"},
        {"triton_x": 1},
    ):
        r = requests.post(f"{server.http}/v2/models/digits/infer", json={**body, "parameters": parameters}, timeout=30)
        assert r.status_code == 400, parameters
    assert "reserved for Triton usage" in r.json()["error"]
    # What a model without sequence batching ignores, as Triton does once it parses.
    assert c.infer("digits", [image], sequence_id="s-1", sequence_start=True, sequence_end=True).get_response()


def test_load_configs_and_errors_as_triton_writes_them(server):
    """Protobuf's JSON mapping lets 64-bit integers be strings (Triton writes its configs so);
    scripts written for Triton match its wording for an unknown model and a refused load."""
    c = server.client()
    as_triton = json.dumps({"max_batch_size": "16", "version_policy": {"specific": {"versions": ["1", "2"]}}})
    c.load_model("digits", headers=server.admin, config=as_triton)
    try:
        assert c.get_model_metadata("digits")["versions"] == ["1", "2"]
        assert c.get_model_config("digits")["max_batch_size"] == 16
    finally:
        c.load_model("digits", headers=server.admin)
    with pytest.raises(InferenceServerException, match="Request for unknown model: 'no_such_model' is not found"):
        c.get_model_metadata("no_such_model")
    with pytest.raises(InferenceServerException, match="failed to load 'no_such_model'"):
        c.load_model("no_such_model", headers=server.admin)
    for bad in ({"max_batch_size": "sixteen"}, {"max_batch_size": True}, {"max_batch_size": 1.5}):
        with pytest.raises(InferenceServerException, match=r"failed to load 'digits': .*max_batch_size") as err:
            c.load_model("digits", headers=server.admin, config=json.dumps(bad))
        assert err.value.status() == "400"
    assert c.get_model_metadata("digits")["versions"] == ["1"]  # a refused load changed nothing


def test_metrics_use_triton_names_and_report_latency_histograms(server, digit_images):
    c = server.client()
    before = server.metric("nv_inference_count", model="digits", version="1") or 0.0
    c.infer("digits", [image_input([img for img, _ in digit_images[:5]])])
    assert server.metric("nv_inference_count", model="digits", version="1") == before + 5
    assert server.metric("nv_inference_request_success", model="digits", version="1") >= 1
    assert server.metric("nv_inference_exec_count", model="digits", version="1") >= 1
    assert server.metric("nv_inference_request_duration_us", model="digits", version="1") > 0
    assert (
        server.metric("model_server_model_info", model="digits", version="1", execution_provider="CPUExecutionProvider")
        == 1
    )
    primary = {"model": "digits", "version": "1", "path": "primary"}
    count = server.metric("model_server_request_duration_seconds_count", **primary)
    assert count >= 1
    assert server.metric("model_server_request_duration_seconds_bucket", le="+Inf", **primary) == count
    text = requests.get(f"{server.http}/metrics", timeout=5).text
    assert "# TYPE nv_inference_request_success counter" in text
    assert "nv_inference_request_success_total" not in text
    buckets = {
        float(line.split('le="')[1].split('"')[0])
        for line in text.splitlines()
        if line.startswith("model_server_request_duration_seconds_bucket") and 'le="+Inf"' not in line
    }
    assert len([b for b in buckets if b <= 0.1]) >= 20  # fine enough for p95/p99 below 100 ms


def test_an_empty_outputs_list_is_answered_with_every_output(server, digit_images):
    """As Triton answers it (it was a 500: no output named, ORT ran them all)."""
    image = base64.b64encode(digit_images[0][0]).decode()
    request = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [image],
                "parameters": {"content_type": "base64"},
            }
        ],
        "outputs": [],
    }
    r = requests.post(f"{server.http}/v2/models/digits/infer", json=request, timeout=30)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_classification_extension_as_triton_s_image_client_asks_it(server, digit_images, binary):
    """tritonclient's ``class_count``: the top classes of each image as "value:index:label"
    strings, the values those of the plain output; more classes asked than there are: all."""
    c = server.client()
    assert "classification" in c.get_server_metadata()["extensions"]
    images = [img for img, _ in digit_images[:4]]
    probs = c.infer("digits", [image_input(images)]).as_numpy("probabilities")
    for count, expected in ((3, 3), (50, 10)):
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=count)
        result = c.infer("digits", [image_input(images)], outputs=[out])
        assert result.get_output("probabilities")["datatype"] == "BYTES"
        classes = result.as_numpy("probabilities")
        assert classes.shape == (4, expected)
        for row, p in zip(classes, probs, strict=True):
            fields = [(item.decode() if isinstance(item, bytes) else item).split(":") for item in row]
            assert [int(i) for _, i, _ in fields] == list(np.argsort(-p, kind="stable")[:expected])
            assert [v for v, _, _ in fields] == [f"{p[int(i)]:f}" for _, i, _ in fields]
            assert [label for _, _, label in fields] == [i for _, i, _ in fields]  # digits' labels.txt
    logits = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    inp = httpclient.InferInput("input", list(logits.shape), "FP32")
    inp.set_data_from_numpy(logits)
    top = c.infer("resnet_bench", [inp], outputs=[httpclient.InferRequestedOutput("logits", class_count=5)])
    assert top.as_numpy("logits").shape == (2, 5)
    assert top.as_numpy("logits")[0, 0].count(b":") == 1  # no labels: "value:index"
    for count in ("3", 2**70, -1, 2.5, 3.0):  # a uint64 or Triton's 400, never "every class"
        bad = {"name": "probabilities", "parameters": {"classification": count}}
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "outputs": [bad]}
        r = requests.post(f"{server.http}/v2/models/digits/infer", json=body, timeout=10)
        assert r.status_code == 400, count
        assert "Unable to set 'classification': attempt to access JSON non-unsigned-integer" in r.json()["error"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_gone_mid_body_is_counted_a_400_either_way_a_request_arrives(server, framing):
    """A Content-Length body is kept by the HTTP protocol itself, a chunked one goes the ASGI
    way: a client that disconnects before its body is complete is a 400 on both."""
    route = {"route": "/v2/models/{model}/infer", "code": "400"}
    before = server.metric("model_server_http_requests_total", **route) or 0.0
    head = "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
    head += (
        "Content-Length: 1000\r\n\r\nabc"
        if framing == "content-length"
        else "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head.encode())
    deadline = time.monotonic() + 10
    while server.metric("model_server_http_requests_total", **route) != before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("model_server_http_requests_total", **route) == before + 1


def test_no_gpu_means_no_gpu_series(server):
    # This machine has no GPU: the gauges are absent, not zero.
    text = requests.get(f"{server.http}/metrics", timeout=5).text
    assert "nv_gpu_memory_used_bytes" not in text
    assert "nv_gpu_utilization" not in text


# NVML as on a machine with two GPUs: a stand-in module, since this machine has none.
FAKE_NVML = """
from types import SimpleNamespace

class NVMLError(Exception):
    pass

def nvmlInit():
    pass

def nvmlDeviceGetCount():
    return 2

def nvmlDeviceGetHandleByIndex(i):
    return i

def nvmlDeviceGetUUID(h):
    return f"GPU-{h}{h}{h}-fake"

def nvmlDeviceGetMemoryInfo(h):
    return SimpleNamespace(used=2**30, total=2**34)

def nvmlDeviceGetUtilizationRates(h):
    return SimpleNamespace(gpu=97)

def nvmlDeviceGetPowerUsage(h):
    return 300_000
"""


@pytest.mark.parametrize(
    ("args", "visible"), [(("--device", "cpu"), None), (("--device", "auto"), ""), (("--device", "auto"), "-1")]
)
def test_a_server_on_the_cpu_of_a_gpu_machine_has_no_gpu_series(
    server_factory, repo_copy, tmp_path, monkeypatch, args, visible
):
    """A server forced onto the CPU, or shown no GPU by CUDA_VISIBLE_DEVICES, exported the gauges
    of every GPU NVML saw (another workload's: 97% busy), and with no GPU shown chose CUDA."""
    (tmp_path / "nvml").mkdir()
    (tmp_path / "nvml" / "pynvml.py").write_text(FAKE_NVML)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'nvml'}:{os.environ.get('PYTHONPATH', '')}")
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    s = server_factory(repo_copy, *args)
    text = requests.get(f"{s.http}/metrics", timeout=5).text
    assert "nv_gpu_" not in text
    assert 'execution_provider="CPUExecutionProvider"' in text


def test_the_gpus_cuda_shows_are_those_cuda_visible_devices_names():
    from model_server.metrics import cuda_visible

    gpus = [("GPU-aaa1", 0), ("GPU-bbb2", 1), ("GPU-ccc3", 2)]
    assert cuda_visible(gpus, None) == gpus
    assert cuda_visible(gpus, "") == []
    assert cuda_visible(gpus, "-1") == []
    assert cuda_visible(gpus, "2,0") == [gpus[2], gpus[0]]
    assert cuda_visible(gpus, "GPU-bbb") == [gpus[1]]
    assert cuda_visible(gpus, "1,7,2") == [gpus[1]]  # CUDA stops at an entry that names none
    assert cuda_visible(gpus, "1,GPU-bbb2,2") == [gpus[1]]  # or names one again
    assert cuda_visible(gpus, "GPU-") == []  # a prefix of several names none


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_as_tritonclient_sends_them(server, digit_images, algorithm):
    """Triton honours Content-Encoding on requests; Inference-Header-Content-Length counts the
    uncompressed body."""
    c = server.client()
    images = [img for img, _ in digit_images[:8]]
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True)
    plain = c.infer("digits", [image_input(images)], outputs=[out]).as_numpy("probabilities")
    packed = c.infer("digits", [image_input(images)], outputs=[out], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(packed.as_numpy("probabilities"), plain)
    tensors = httpclient.InferInput("input", [1, 3, 224, 224], "FP32")  # JSON tensors, compressed
    pixels = np.random.default_rng(5).random((1, 3, 224, 224), dtype=np.float32)  # (zeros inflate past the bound)
    tensors.set_data_from_numpy(pixels, binary_data=False)
    json_out = [
        httpclient.InferRequestedOutput(c.get_model_metadata("resnet_bench")["outputs"][0]["name"], binary_data=False)
    ]
    both = [
        c.infer("resnet_bench", [tensors], outputs=json_out, request_compression_algorithm=a) for a in (None, algorithm)
    ]
    np.testing.assert_array_equal(*(r.as_numpy(json_out[0].name()) for r in both))


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_responses_as_tritonclient_asks_them(server, digit_images, algorithm):
    """Triton compresses an inference response in the coding Accept-Encoding picks;
    Inference-Header-Content-Length still counts the JSON part uncompressed. Either way a request
    arrives (a compressed one goes the ASGI way); an answer under 1 KiB stays as it is."""
    import zlib

    c = server.client()
    images = [img for img, _ in digit_images[:40]]  # 1.6 KB of probabilities
    out = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    plain = c.infer("digits", [image_input(images)], outputs=out).as_numpy("probabilities")
    for request_algorithm in (None, algorithm):
        packed = c.infer(
            "digits",
            [image_input(images)],
            outputs=out,
            request_compression_algorithm=request_algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(packed.as_numpy("probabilities"), plain)
    pixels = httpclient.InferInput("input", [2, 3, 224, 224], "FP32")
    pixels.set_data_from_numpy(np.random.default_rng(3).random((2, 3, 224, 224), dtype=np.float32))
    logits = c.get_model_metadata("resnet_bench")["outputs"][0]["name"]
    json_out = [httpclient.InferRequestedOutput(logits, binary_data=False)]  # about 40 KB: compressed off the loop
    cases = [
        ("digits", [image_input(images)], out, plain, accept, compressed)
        for accept, compressed in [
            (algorithm, True),
            (f"identity;q=0.5, {algorithm};q=0.9", True),
            ("br", False),
            (f"{algorithm};q=0", False),
        ]
    ]
    cases.append(("digits", [image_input(images[:1])], out, plain[:1], algorithm, False))  # 40 bytes
    big = c.infer("resnet_bench", [pixels], outputs=json_out).as_numpy(logits)
    cases.append(("resnet_bench", [pixels], json_out, big, algorithm, True))
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    with conn, conn.makefile("rb") as reader:
        for model, inputs, outputs, expected, accept, compressed in cases:
            body, length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
            conn.sendall(
                f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\n".encode()
                + f"Accept-Encoding: {accept}\r\nContent-Length: {len(body)}\r\n".encode()
                + (f"Inference-Header-Content-Length: {length}\r\n" if length else "").encode()
                + b"\r\n"
                + body
            )
            assert reader.readline().startswith(b"HTTP/1.1 200")
            headers = {}
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            raw = reader.read(int(headers["content-length"]))
            if compressed:
                assert headers["content-encoding"] == algorithm
                raw = zlib.decompress(raw, 16 + zlib.MAX_WBITS if algorithm == "gzip" else zlib.MAX_WBITS)
            else:  # asked with weight 0, only codings it does not know, or too small: as it was
                assert "content-encoding" not in headers
            header_length = headers.get(HEADER_LENGTH)
            result = httpclient.InferResult.from_response_body(
                raw, header_length=None if header_length is None else int(header_length)
            )
            np.testing.assert_array_equal(result.as_numpy(outputs[0].name()), expected)


@pytest.mark.parametrize(
    ("accept", "coding"),
    [
        (None, "identity"),
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("GZip ; Q=0.5, deflate;q=0.7", "deflate"),
        ("gzip, deflate", "gzip"),  # equal weights: the first
        ("deflate;q=0.5, identity", "identity"),
        ("gzip;q=0, deflate;q=0", "identity"),
        ("gzip;q=2, deflate;q=nan, br", "identity"),  # weights out of [0, 1], codings unknown
        ("gzip;q=x, deflate;q=0.001", "deflate"),  # a malformed weight skips its entry
        (",,;, ;q=1", "identity"),
    ],
)
def test_the_response_coding_is_picked_as_triton_picks_it(accept, coding):
    from model_server.app import response_coding

    assert response_coding(accept) == coding


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_a_compressed_json_part_may_inflate_only_so_far(server, algorithm):
    """Its parsing holds the event loop: a 4 KB gzip body inflating to 4 MiB of numbers cost
    0.2 s there, and a few clients sending them stalled health probes for seconds. The same JSON
    sent as it is costs its client the bytes: served."""
    import zlib

    doc = {"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [0] * 150528}]}
    body = json.dumps(doc).encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS if algorithm == "gzip" else zlib.MAX_WBITS)
    packed = packer.compress(body) + packer.flush()
    url = f"{server.http}/v2/models/resnet_bench/infer"
    r = requests.post(url, data=packed, headers={"Content-Encoding": algorithm}, timeout=30)
    assert r.status_code == 413, r.text
    assert f"bytes once decompressed ({algorithm})" in r.json()["error"]
    assert "send it uncompressed, or its tensors as binary data" in r.json()["error"]
    # Inference-Header-Content-Length names the JSON part: binary tensors after it inflate freely.
    header = json.dumps({"inputs": [{**doc["inputs"][0], "data": None, "parameters": {"binary_data_size": 602112}}]})
    header = header.replace(', "data": null', "").encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS if algorithm == "gzip" else zlib.MAX_WBITS)
    packed = packer.compress(header + bytes(602112)) + packer.flush()
    headers = {"Content-Encoding": algorithm, "Inference-Header-Content-Length": str(len(header))}
    assert requests.post(url, data=packed, headers=headers, timeout=30).status_code == 200
    assert requests.post(url, data=body, timeout=30).status_code == 200


def test_a_compressed_body_is_bounded_and_checked(server):
    import gzip
    import zlib

    url = f"{server.http}/v2/models/digits/feedback"  # a JSON endpoint: 4 MiB once decompressed
    bomb = gzip.compress(b" " * (5 * 2**20))
    assert len(bomb) < 10_000
    r = requests.post(url, data=bomb, headers={"Content-Encoding": "gzip"}, timeout=10)
    assert r.status_code == 413
    assert "once decompressed" in r.json()["error"]
    cut = zlib.compress(b'{"request_id": "x", "label": 1}')[:-4]
    r = requests.post(url, data=cut, headers={"Content-Encoding": "deflate"}, timeout=10)
    assert r.status_code == 400
    assert "not one whole deflate stream" in r.json()["error"]
    r = requests.post(url, data=b"not gzip", headers={"Content-Encoding": "gzip"}, timeout=10)
    assert r.status_code == 400
    assert "not valid gzip data" in r.json()["error"]
    r = requests.post(url, data=b"{}", headers={"Content-Encoding": "br"}, timeout=10)
    assert r.status_code == 400
    assert "unsupported Content-Encoding 'br'" in r.json()["error"]
    assert server.client().is_server_ready()


def test_a_post_asking_for_h2c_as_java_s_httpclient_sends_it_is_served_over_http_1_1(server, digit_images):
    """Java's HttpClient asks an Upgrade to h2c with a connection's first request, body and all:
    served over HTTP/1.1 (as Triton serves it), the body read by its length, the connection closed
    after it; a request written after that body is not read."""
    c = server.client()
    images = [img for img, _ in digit_images[:2]]
    out = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    plain = c.infer("digits", [image_input(images)], outputs=out).as_numpy("probabilities")
    body, length = httpclient.InferenceServerClient.generate_request_body([image_input(images)], outputs=out)
    head = (
        "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        f"Upgrade: h2c\r\nHTTP2-Settings: AAEAAEAAAAIAAAAB\r\nInference-Header-Content-Length: {length}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body[:100])
        time.sleep(0.2)  # the rest in another read
        sock.sendall(body[100:] + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):  # until the server closes
            received += chunk
    status, _, rest = received.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK"
    headers, _, payload = rest.partition(b"\r\n\r\n")
    fields = dict(line.split(b": ", 1) for line in headers.split(b"\r\n"))
    assert fields[b"connection"] == b"close"
    assert len(payload) == int(fields[b"content-length"])  # one answer: the GET after it was not read
    result = httpclient.InferResult.from_response_body(
        payload, header_length=int(fields[b"inference-header-content-length"])
    )
    np.testing.assert_array_equal(result.as_numpy("probabilities"), plain)


def test_shared_memory_trace_and_logging_are_answered_as_triton_answers_a_feature_it_lacks(server):
    """tritonclient's shared memory, trace and logging calls get Triton's answers where nothing
    is registered (no regions; 404 for a named one) and a 501 naming what is not supported,
    never a 404 "no such endpoint" a script reads as a wrong URL."""
    c = server.client()
    assert c.get_system_shared_memory_status() == []
    assert c.get_cuda_shared_memory_status() == []
    with pytest.raises(InferenceServerException, match="Unable to find system shared memory region: 'r'") as err:
        c.get_system_shared_memory_status("r")
    assert err.value.status() == "404"
    for call in (
        lambda: c.register_system_shared_memory("r", "/key", 64),
        lambda: c.unregister_system_shared_memory(),
        lambda: c.unregister_system_shared_memory("r"),
        lambda: c.register_cuda_shared_memory("r", b"\0" * 64, 0, 64),
        lambda: c.unregister_cuda_shared_memory(),
    ):
        with pytest.raises(InferenceServerException, match="shared memory is not supported") as err:
            call()
        assert err.value.status() == "501"
    for call in (
        lambda: c.get_trace_settings(),
        lambda: c.get_trace_settings("digits"),
        lambda: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
        lambda: c.get_log_settings(),
        lambda: c.update_log_settings({"log_verbose_level": 1}),
    ):
        with pytest.raises(InferenceServerException, match="the server does not support") as err:
            call()
        assert err.value.status() == "501"


def test_a_shared_memory_region_s_percent_encoded_name_is_named_as_the_client_registered_it(server):
    """tritonclient quotes a region's name into the path: the 404 named 'my%20region', not the
    region the client asked about; a '/' sent as %2F is a region's name too, not a path."""
    c = server.client()
    for memory, status in (("system", c.get_system_shared_memory_status), ("cuda", c.get_cuda_shared_memory_status)):
        with pytest.raises(InferenceServerException) as err:
            status("my region ü")
        assert err.value.status() == "404"
        assert err.value.message() == f"Unable to find {memory} shared memory region: 'my region ü'"
        answer = requests.get(f"{server.http}/v2/{memory}sharedmemory/region/a%2Fb%25c/status", timeout=30)
        assert (answer.status_code, answer.json()) == (
            404,
            {"error": f"Unable to find {memory} shared memory region: 'a/b%c'"},
        )
        long = requests.get(f"{server.http}/v2/{memory}sharedmemory/region/{'%41' * 5000}/status", timeout=30)
        assert long.json()["error"].endswith(f"'{'A' * 64}...'")  # (as any name a message shows)
    with pytest.raises(InferenceServerException, match="shared memory is not supported") as err:
        c.unregister_system_shared_memory("my region ü")
    assert err.value.status() == "501"


def test_a_tensor_in_a_shared_memory_region_is_refused_not_answered_in_the_body(server, digit_images):
    """No region can be registered: an output asked into one was answered in the body, where
    tritonclient does not read it (as_numpy gave None), and an input in one was refused as
    having no data. As Triton answers a region not registered (its SharedMemoryManager's
    NOT_FOUND), a 404; it was a 400 here."""
    c = server.client()
    out = httpclient.InferRequestedOutput("probabilities")
    out.set_shared_memory("r", 40)
    with pytest.raises(InferenceServerException, match="Unable to find shared memory region: 'r'") as err:
        c.infer("digits", [image_input([digit_images[0][0]])], outputs=[out])
    assert err.value.status() == "404"
    x = httpclient.InferInput("input", [1, 3, 224, 224], "FP32")
    x.set_shared_memory("r", 3 * 224 * 224 * 4)
    with pytest.raises(InferenceServerException, match="Unable to find shared memory region: 'r'") as err:
        c.infer("resnet_bench", [x])
    assert err.value.status() == "404"


def test_a_raw_binary_request_is_the_model_s_one_input_as_triton_reads_it(server, digit_images):
    """Triton's raw binary request (Inference-Header-Content-Length: 0, the body the data of the
    model's one input, its shape deduced from the configuration, every output answered binary):
    a PNG posted as it is, as curl --data-binary sends it, was a 400."""
    raw = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}
    c = server.client()
    image = digit_images[0][0]
    x = np.random.default_rng(1).standard_normal((3, 224, 224)).astype(np.float32)
    for model, body, inp, output in [
        ("digits", image, image_input([image]), "probabilities"),
        ("resnet_bench", x.tobytes(), httpclient.InferInput("input", [1, 3, 224, 224], "FP32"), "logits"),
    ]:
        if model == "resnet_bench":
            inp.set_data_from_numpy(x[None])
        expected = c.infer(model, [inp]).as_numpy(output)
        r = requests.post(f"{server.http}/v2/models/{model}/infer", data=body, headers=raw, timeout=60)
        assert r.status_code == 200, r.text
        length = int(r.headers[HEADER_LENGTH])
        (out,) = json.loads(r.content[:length])["outputs"]
        assert (out["name"], out["shape"]) == (output, list(expected.shape))
        assert out["parameters"]["binary_data_size"] == expected.nbytes
        assert np.array_equal(np.frombuffer(r.content[length:], dtype="<f4").reshape(expected.shape), expected)
    r = requests.post(f"{server.http}/v2/models/resnet_bench/infer", data=x.tobytes()[:-2], headers=raw, timeout=30)
    assert r.status_code == 400
    assert (
        "raw input 'input': 602110 bytes are not the 602112 bytes of shape [1, 3, 224, 224] of FP32"
        in r.json()["error"]
    )


def test_a_custom_parameter_that_is_not_a_string_number_or_boolean_is_refused_as_triton(server, digit_images):
    """Triton's HTTP frontend passes a request's own parameters to the model only as a string,
    an integer, a boolean or a double, and refuses any other (its http_server.cc); null, a list
    or an object were taken. An input's or output's own parameters Triton does not read: any
    value passes there."""
    c = server.client()
    image = image_input([digit_images[0][0]])
    for value in (None, [1], {"a": 1}):
        with pytest.raises(InferenceServerException) as err:
            c.infer("digits", [image], parameters={"tenant": "a", "custom": value})
        assert err.value.status() == "400"
        assert err.value.message() == (
            "parameter 'custom' has invalid type. It should be either 'int', 'bool', or 'string'."
        )
    for value in ("a", 1, -1, 1.5, True):
        assert c.infer("digits", [image], parameters={"custom": value}).as_numpy("probabilities").shape == (1, 10)
    # Triton's own keys given as null are read as a number or a flag, and refused.
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    for name in ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output"):
        r = requests.post(
            f"{server.http}/v2/models/digits/infer", json={**body, "parameters": {name: None}}, timeout=30
        )
        assert r.status_code == 400, name
        assert f"'{name}'" in r.json()["error"] or f"parameters.{name}" in r.json()["error"], name
    # parameters itself is an object (Triton: "failed to get request params."), whatever it is.
    for parameters in (None, [], "", 0, False):
        r = requests.post(f"{server.http}/v2/models/digits/infer", json={**body, "parameters": parameters}, timeout=30)
        assert r.status_code == 400, parameters
        assert r.json()["error"] == "'parameters' must be an object", parameters
    inputs = [{**body["inputs"][0], "parameters": {"custom": None, "other": [1]}}]
    r = requests.post(f"{server.http}/v2/models/digits/infer", json={"inputs": inputs}, timeout=30)
    assert r.status_code == 400
    assert "has invalid type" not in r.json()["error"]  # ("x" is no image: its own refusal)
