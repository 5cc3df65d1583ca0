"""Kubernetes mode (mesh ``istio``): the Kaniko build pod the KubernetesPodOperator would run, rendered
and checked with the kubernetes client, and the stage weights applied as an Istio VirtualService
through ``kubernetes_default`` (the fake API server speaks the real wire protocol)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from include.rollout.spec import RolloutSpec
from rollout_airflow import steps
from tests.fakes.kube_api import FakeKubeAPI

SHA = "c0ffee" * 10 + "beef"
BUILD = {"registry": "registry.example.com/ml/digits-server", "context": "s3://ml-builds/serving-context.tar.gz",
         "namespace": "ml-builds", "service_account": "kaniko", "push_secret": "registry-push"}  # fmt: skip
ISTIO = {"namespace": "models", "service": "digits", "name": "digits", "gateways": ["mesh"]}
PARAMS = {"candidate_version": "2", "mesh": "istio", "stages": [10, 50, 100]}


@pytest.fixture
def kube(monkeypatch, tmp_path):
    fake = FakeKubeAPI().start()
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": fake.url}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
    }  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps(
        {"conn_type": "kubernetes", "extra": {"kube_config": json.dumps(kubeconfig), "namespace": "models"}}))  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(
        {"conn_type": "http", "host": "digits.models.svc", "port": 8000,
         "extra": {"istio": ISTIO, "build": BUILD, "run_dir": str(tmp_path)}}))  # fmt: skip
    yield fake
    fake.stop()


def test_the_build_pod_is_kaniko_pushing_the_digest_tag(kube):
    from kubernetes import client

    operator, tag = steps.kaniko_operator(RolloutSpec.from_dict(PARAMS), SHA)
    assert tag == "registry.example.com/ml/digits-server:sha-c0ffeec0ffee"
    pod = operator.build_pod_request_obj()  # what the operator would create
    api = client.ApiClient()
    rendered = api.sanitize_for_serialization(pod)
    assert (
        api.sanitize_for_serialization(api._ApiClient__deserialize(rendered, "V1Pod")) == rendered
    )  # valid V1Pod
    assert pod.metadata.namespace == "ml-builds"
    assert pod.spec.service_account_name == "kaniko"
    assert pod.spec.restart_policy == "Never"
    (container,) = pod.spec.containers
    assert container.image.startswith("gcr.io/kaniko-project/executor:")
    assert f"--destination={tag}" in container.args
    assert "--context=s3://ml-builds/serving-context.tar.gz" in container.args
    assert f"--build-arg=MODEL_SHA256={SHA}" in container.args
    assert "--build-arg=MODEL_FILE=models/digits/2/model.onnx" in container.args
    assert pod.spec.volumes[0].secret.secret_name == "registry-push"
    assert operator.kubernetes_conn_id == "kubernetes_default"
    assert operator.on_finish_action.value == "delete_succeeded_pod"


def test_kubernetes_mode_without_build_settings_fails_naming_the_setting(kube, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(
        {"conn_type": "http", "host": "digits", "extra": {"istio": ISTIO, "build": {"context": "s3://x"}}}))  # fmt: skip
    with pytest.raises(AirflowFailException, match=r"model_server_default extra build\.registry"):
        steps.kaniko_operator(RolloutSpec.from_dict(PARAMS), SHA)


def test_stage_weights_and_rollback_go_to_the_virtual_service(kube):
    from include.rollout.mesh import render_virtual_service
    from model_server.traffic import TrafficPolicy

    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    kube.objects[("virtualservices", "models", "digits")] = {
        **(vs := render_virtual_service(steps.router(RolloutSpec.from_dict(PARAMS), "r").target, stable)),
        "metadata": {**vs["metadata"], "resourceVersion": "3"},
    }
    applied = steps.apply_weights(PARAMS, 0, "run-1", {"ok": True})
    assert applied["weight"] == 10
    routes = kube.objects[("virtualservices", "models", "digits")]["spec"]["http"][-1]["route"]
    assert [(r["destination"]["subset"], r["weight"]) for r in routes] == [("v1", 90), ("v2", 10)]
    assert ("destinationrules", "models", "digits") in kube.objects  # one subset per version
    assert kube.writes()[-1]["query"]["fieldManager"] == ["model-rollout"]
    steps.restore_stable({**PARAMS}, "run-1", unload_candidate=False)
    routes = kube.objects[("virtualservices", "models", "digits")]["spec"]["http"][-1]["route"]
    assert [(r["destination"]["subset"], r["weight"]) for r in routes] == [("v1", 100)]


def test_istio_mode_without_target_settings_fails_naming_the_setting(kube, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(
        {"conn_type": "http", "host": "digits", "extra": {"istio": {"namespace": "models"}}}))  # fmt: skip
    with pytest.raises(ValueError, match=r"extra istio\.service"):
        steps.router(RolloutSpec.from_dict(PARAMS), "r")
