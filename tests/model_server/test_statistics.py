"""Triton's statistics extension (GET /v2/models[/{m}[/versions/{v}]]/stats) through tritonclient."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from devstack.processes import parse_exposition
from tests.conftest import ADMIN_TOKEN
from tests.support import write_simple_models

pytestmark = pytest.mark.integration

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


def simple_inputs(batch: int, binary: bool = True) -> list[httpclient.InferInput]:
    inputs = []
    for name, data in (("INPUT0", np.arange(16 * batch)), ("INPUT1", np.ones(16 * batch))):
        inp = httpclient.InferInput(name, [batch, 16], "INT32")
        inp.set_data_from_numpy(data.astype(np.int32).reshape(batch, 16), binary_data=binary)
        inputs.append(inp)
    return inputs


def metrics_of(server, model: str, version: str) -> dict[str, float]:
    """Triton's counters of one version on /metrics, the failures summed over their reasons."""
    text = requests.get(f"{server.http}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for name, labels, value in parse_exposition(text):
        if name.startswith("nv_inference_") and labels.get("model") == model and labels.get("version") == version:
            out[name] = out.get(name, 0.0) + value
    return out


def test_statistics_extension_as_triton_reports_it(server_factory, repo_copy):
    write_simple_models(repo_copy, "simple")
    server = server_factory(repo_copy, "--mesh-mirror", token=ADMIN_TOKEN)
    c = server.client()
    assert "statistics" in c.get_server_metadata()["extensions"]

    # Every loaded version of every model, in name order; nothing counted yet.
    everything = c.get_inference_statistics()
    assert [(s["name"], s["version"]) for s in everything["model_stats"]] == [("digits", "1"), ("simple", "1")]
    fresh = everything["model_stats"][1]
    assert fresh["last_inference"] == fresh["inference_count"] == fresh["execution_count"] == 0
    assert fresh["inference_stats"] == {d: {"count": 0, "ns": 0} for d in DURATIONS}
    assert fresh["batch_stats"] == []
    assert fresh["memory_usage"] == []

    started_ms = time.time() * 1000
    for batch in (1, 3, 1):  # as simple_http_infer_client sends them (query parameters included)
        result = c.infer("simple", simple_inputs(batch), query_params={"test_1": 1, "test_2": 2})
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.arange(16 * batch).reshape(batch, 16) + 1)
    with pytest.raises(InferenceServerException) as err:  # a shape refused: the client's, not counted
        c.infer("simple", [simple_inputs(1)[0], simple_inputs(3)[1]])
    assert err.value.status() == "400"
    finished_ms = time.time() * 1000

    one = c.get_inference_statistics(model_name="simple")
    assert one == c.get_inference_statistics(model_name="simple", model_version="1")
    (stat,) = one["model_stats"]
    assert (stat["name"], stat["version"]) == ("simple", "1")
    assert started_ms - 1 <= stat["last_inference"] <= finished_ms + 1
    assert stat["inference_count"] == 5  # items: 1 + 3 + 1
    assert stat["execution_count"] == 3
    infer = stat["inference_stats"]
    for d in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert infer[d]["count"] == 3, d
    assert infer["success"]["ns"] > infer["compute_infer"]["ns"] > 0
    assert infer["fail"] == {"count": 0, "ns": 0}  # (the model's failures: the test below)
    assert infer["cache_hit"] == infer["cache_miss"] == {"count": 0, "ns": 0}
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in stat["batch_stats"]] == [(1, 2), (3, 1)]
    for b in stat["batch_stats"]:
        assert b["compute_input"]["count"] == b["compute_output"]["count"] == b["compute_infer"]["count"]
        assert b["compute_infer"]["ns"] > 0
    assert sum(b["compute_infer"]["ns"] for b in stat["batch_stats"]) == infer["compute_infer"]["ns"]
    # An execution's output time is its responses' encoding (it was always 0).
    assert all(b["compute_output"]["ns"] > 0 for b in stat["batch_stats"])
    assert sum(b["compute_output"]["ns"] for b in stat["batch_stats"]) == infer["compute_output"]["ns"]

    # The same events as Triton's Prometheus counters.
    prom = metrics_of(server, "simple", "1")
    assert prom["nv_inference_request_success"] == infer["success"]["count"]
    assert prom["nv_inference_request_failure"] == infer["fail"]["count"]
    assert prom["nv_inference_count"] == stat["inference_count"]
    assert prom["nv_inference_exec_count"] == stat["execution_count"]
    for counter, duration in (
        ("nv_inference_request_duration_us", "success"),
        ("nv_inference_queue_duration_us", "queue"),
        ("nv_inference_compute_input_duration_us", "compute_input"),
        ("nv_inference_compute_infer_duration_us", "compute_infer"),
        ("nv_inference_compute_output_duration_us", "compute_output"),
    ):
        assert prom[counter] == pytest.approx(infer[duration]["ns"] / 1000, abs=1), counter

    # A copy made by Istio's mirror (--mesh-mirror) is served as a shadow: never counted as the version's traffic.
    shadow = requests.post(
        f"{server.http}/v2/models/simple/infer",
        json={
            "inputs": [
                {"name": n, "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}
                for n in ("INPUT0", "INPUT1")
            ]
        },
        headers={"Host": "simple.ml.svc-shadow:8000"},
        timeout=10,
    )
    assert shadow.status_code == 200
    assert c.get_inference_statistics(model_name="simple") == one

    # The other model's counters did not move; the whole list holds both.
    assert c.get_inference_statistics()["model_stats"] == [everything["model_stats"][0], stat]


def test_statistics_of_what_is_not_loaded_answer_as_triton(server_factory, repo_copy):
    write_simple_models(repo_copy, "simple")
    server = server_factory(repo_copy, token=ADMIN_TOKEN)
    c = server.client()
    with pytest.raises(InferenceServerException) as err:  # (review s53-2: a 404 "Request for unknown model")
        c.get_inference_statistics(model_name="no_such_model")
    assert (err.value.status(), err.value.message()) == ("400", "requested model 'no_such_model' is not available")
    with pytest.raises(InferenceServerException) as err:  # (review s54-1: a name of 6,000 echoed whole)
        c.get_inference_statistics(model_name="x" * 6000)
    assert err.value.message() == f"requested model '{'x' * 64}...' is not available"
    # digits has versions 1, 2, 3 on disk; its config.json loads 1.
    with pytest.raises(InferenceServerException) as err:
        c.get_inference_statistics(model_name="digits", model_version="2")
    assert err.value.status() == "400"
    assert err.value.message() == "requested model version is not available for model 'digits'"
    with pytest.raises(InferenceServerException) as err:
        c.get_inference_statistics(model_name="digits", model_version="one")
    assert err.value.status() == "404"  # no endpoint of Triton's: its routes take a version as [0-9]+
    c.unload_model("digits", headers=server.admin)
    with pytest.raises(InferenceServerException) as err:
        c.get_inference_statistics(model_name="digits")
    assert err.value.status() == "400"
    assert err.value.message() == "requested model 'digits' is not available"
    assert [s["name"] for s in c.get_inference_statistics()["model_stats"]] == ["simple"]


def test_an_unload_ends_a_version_s_statistics_and_series_as_in_triton(server_factory, repo_copy):
    """Triton keeps a version's statistics and its nv_inference_* series with the model it
    loaded: an unload removes the series, and a load after it starts from zero. They survived
    here, so a reload read as the old version's traffic and an unloaded version kept its series."""
    write_simple_models(repo_copy, "simple")
    server = server_factory(repo_copy, token=ADMIN_TOKEN)
    c = server.client()
    for _ in range(2):
        c.infer("simple", simple_inputs(1))
    assert metrics_of(server, "simple", "1")["nv_inference_request_success"] == 2

    def own_series(model: str) -> set[str]:  # (the server's own counters of the version, beside Triton's)
        text = requests.get(f"{server.http}/metrics", timeout=5).text
        return {
            name
            for name, labels, _ in parse_exposition(text)
            if name.startswith(("model_server_routed", "model_server_request_duration", "shadow_requests"))
            and (labels.get("model"), labels.get("version")) == (model, "1")
        }

    assert {"model_server_routed_requests_total", "model_server_request_duration_seconds_count"} <= own_series("simple")
    c.unload_model("simple", headers=server.admin)
    assert metrics_of(server, "simple", "1") == {}
    assert metrics_of(server, "digits", "1")  # (another model's are kept)
    # (review s53-2: the server's own series of an unloaded version stayed, each rule name's too)
    assert own_series("simple") == set()
    assert "shadow_requests_total" in own_series("digits")

    c.load_model("simple", headers=server.admin)
    (stat,) = c.get_inference_statistics(model_name="simple")["model_stats"]
    assert stat["last_inference"] == stat["inference_count"] == stat["execution_count"] == 0
    assert stat["inference_stats"] == {d: {"count": 0, "ns": 0} for d in DURATIONS}
    assert stat["batch_stats"] == []
    assert metrics_of(server, "simple", "1")["nv_inference_request_success"] == 0
    c.infer("simple", simple_inputs(1))
    assert c.get_inference_statistics(model_name="simple")["model_stats"][0]["inference_count"] == 1
    assert metrics_of(server, "simple", "1")["nv_inference_request_success"] == 1

    # A reload that keeps the version serving (unchanged, or changed: Triton's new model shares
    # its series with the one it replaces) keeps both.
    c.load_model("simple", headers=server.admin, config=json.dumps({"max_batch_size": 4}))
    assert c.get_inference_statistics(model_name="simple")["model_stats"][0]["inference_count"] == 1
    assert metrics_of(server, "simple", "1")["nv_inference_request_success"] == 1


def test_a_request_refused_as_bad_input_is_no_failure_of_the_model_as_in_triton(server_factory, repo_copy):
    """Triton labels nv_inference_request_failure REJECTED, CANCELED, BACKEND or OTHER, each
    series at 0 from the load on, and a request its validation refuses (a shape, a datatype, an
    input the model lacks) fails before the model's statistics see it: no failure under any
    reason, none in the statistics. Here it was counted under a reason of its own,
    INVALID_INPUT, which no Triton dashboard or alert knows, and as the model's failure in its
    statistics."""
    write_simple_models(repo_copy, "simple")
    server = server_factory(repo_copy, token=ADMIN_TOKEN)
    c = server.client()

    def failures() -> dict[str, float]:
        text = requests.get(f"{server.http}/metrics", timeout=5).text
        return {
            labels["reason"]: value
            for name, labels, value in parse_exposition(text)
            if name == "nv_inference_request_failure" and labels["model"] == "simple" and labels["version"] == "1"
        }

    assert failures() == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 0}
    refused_before = (
        server.metric("model_server_http_requests_total", route="/v2/models/{model}/infer", code="400") or 0
    )
    with pytest.raises(InferenceServerException) as err:  # batch sizes that disagree
        c.infer("simple", [simple_inputs(1)[0], simple_inputs(3)[1]])
    assert err.value.status() == "400"
    bad = httpclient.InferInput("INPUT9", [1, 16], "INT32")
    bad.set_data_from_numpy(np.zeros((1, 16), np.int32))
    with pytest.raises(InferenceServerException) as err:  # an input the model lacks
        c.infer("simple", [simple_inputs(1)[0], bad])
    assert err.value.status() == "400"
    assert failures() == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 0, "OTHER": 0}
    (stat,) = c.get_inference_statistics(model_name="simple")["model_stats"]
    assert stat["inference_stats"]["fail"] == {"count": 0, "ns": 0}
    # Still seen: as the 400s they are.
    assert (
        server.metric("model_server_http_requests_total", route="/v2/models/{model}/infer", code="400")
        == refused_before + 2
    )

    # The model's own failure is BACKEND, in both.
    r = requests.put(
        f"{server.http}/v2/models/simple/versions/1/fault", json={"abort": {"percent": 100}}, headers=server.admin
    )
    assert r.status_code == 200
    with pytest.raises(InferenceServerException) as err:
        c.infer("simple", simple_inputs(1))
    assert err.value.status() == "500"
    assert failures() == {"REJECTED": 0, "CANCELED": 0, "BACKEND": 1, "OTHER": 0}
    (stat,) = c.get_inference_statistics(model_name="simple")["model_stats"]
    assert stat["inference_stats"]["fail"]["count"] == 1


def test_a_version_a_failed_load_never_served_has_no_series(server_factory, repo_copy):
    """A load that fails leaves no nv_inference_* series of the versions it made and dropped (in
    Triton they go with the model objects of that load): a version loaded before the one that
    failed, never served, kept its series at 0, as if it were loaded."""
    server = server_factory(repo_copy, token=ADMIN_TOKEN)
    c = server.client()
    (repo_copy / "digits" / "3" / "model.onnx").write_bytes(b"this is not an onnx file")
    policy = {"version_policy": {"specific": {"versions": [1, 2, 3]}}}
    with pytest.raises(InferenceServerException, match="failed to load 'digits'"):
        c.load_model("digits", headers=server.admin, config=json.dumps(policy))
    assert metrics_of(server, "digits", "1")["nv_inference_request_success"] == 0
    assert metrics_of(server, "digits", "2") == {}
    assert metrics_of(server, "digits", "3") == {}
