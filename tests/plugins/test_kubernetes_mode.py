"""Kubernetes mode (mesh ``istio``): the Kaniko build pod the KubernetesPodOperator would run, rendered
and checked with the kubernetes client, the stage weights applied as an Istio VirtualService
through ``kubernetes_default`` (the fake API server speaks the real wire protocol), each model
its own target, and one run at a time per model (its Lease)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from rollout_airflow import steps
from tests.fakes.kube_api import FakeKubeAPI
from vision_rollout.spec import RolloutSpec

SHA = "c0ffee" * 10 + "beef"
BUILD = {
    "registry": "registry.example.com/ml/digits-server",
    "context": "s3://ml-builds/serving-context.tar.gz",
    "namespace": "ml-builds",
    "service_account": "kaniko",
    "push_secret": "registry-push",
}
ISTIO = {"namespace": "models", "service": "digits", "name": "digits", "gateways": ["mesh"]}
PARAMS = {"candidate_version": "2", "mesh": "istio", "stages": [10, 50, 100]}


@pytest.fixture
def kube(monkeypatch, tmp_path):
    fake = FakeKubeAPI().start()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": fake.url}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config": json.dumps(kubeconfig), "namespace": "models"}}
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT",
        json.dumps(
            {
                "conn_type": "http",
                "host": "digits.models.svc",
                "port": 8000,
                "extra": {"istio": ISTIO, "build": BUILD, "run_dir": str(tmp_path)},
            }
        ),
    )
    yield fake
    fake.stop()


def take(run_id: str, model: str = "digits") -> None:
    """What build_image does first: the run takes its model's Lease."""
    steps.serving().model_lock(model, "istio").acquire(run_id)


def stable_virtual_service(kube: FakeKubeAPI, params: dict) -> None:
    """The model's VirtualService as it was before the rollout: version 1 takes 100%."""
    from model_server.traffic import TrafficPolicy
    from vision_rollout.mesh import render_virtual_service

    target = steps.router(RolloutSpec.from_dict(params), "r", steps.serving()).target
    vs = render_virtual_service(target, TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    kube.objects[("virtualservices", target.namespace, target.name)] = {
        **vs,
        "metadata": {**vs["metadata"], "resourceVersion": "3"},
    }


def routes(kube: FakeKubeAPI, name: str = "digits") -> list[tuple[str, int]]:
    http = kube.objects[("virtualservices", "models", name)]["spec"]["http"][-1]["route"]
    return [(r["destination"]["subset"], r.get("weight", 100)) for r in http]


def test_the_build_pod_is_kaniko_pushing_the_digest_tag(kube):
    from kubernetes import client

    from rollout_airflow.operators import KanikoBuild

    plan = steps.kaniko_plan(RolloutSpec.from_dict(PARAMS), SHA, steps.serving().settings.build_for("digits"))
    tag = plan["image"]
    assert tag == "registry.example.com/ml/digits-server:sha-c0ffeec0ffee"
    assert json.loads(json.dumps(plan)) == plan  # it travels by XCom
    operator = KanikoBuild(task_id="kaniko_build", plan={"build": plan})
    operator.prepare(plan)
    pod = operator.build_pod_request_obj()  # what the operator would create
    api = client.ApiClient()
    rendered = api.sanitize_for_serialization(pod)
    assert api.sanitize_for_serialization(api._ApiClient__deserialize(rendered, "V1Pod")) == rendered  # valid V1Pod
    assert pod.metadata.namespace == "ml-builds"
    assert pod.metadata.name.startswith("build-digits-2-c0ffeec0")
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
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT",
        json.dumps({"conn_type": "http", "host": "digits", "extra": {"istio": ISTIO, "build": {"context": "s3://x"}}}),
    )
    with pytest.raises(AirflowFailException, match=r"model_server_default extra build\.registry"):
        steps.kaniko_plan(RolloutSpec.from_dict(PARAMS), SHA, steps.serving().settings.build_for("digits"))


def test_local_mode_has_no_image_to_build():
    from airflow.sdk.exceptions import AirflowSkipException

    from rollout_airflow.operators import KanikoBuild

    with pytest.raises(AirflowSkipException, match="no image to build"):
        KanikoBuild(task_id="kaniko_build", plan={"sha256": SHA}).execute({})  # a local-mode report


def test_stage_weights_and_rollback_go_to_the_virtual_service(kube):
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    applied = steps.apply_weights(PARAMS, 0, "run-1", {"ok": True})
    assert applied["weight"] == 10
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    assert ("destinationrules", "models", "digits") in kube.objects  # one subset per version
    assert kube.writes()[-1]["query"]["fieldManager"] == ["model-rollout"]
    steps.restore_stable({**PARAMS}, "run-1", unload_candidate=False)
    assert routes(kube) == [("v1", 100)]


def test_istio_mode_without_target_settings_fails_naming_the_setting(kube, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT",
        json.dumps({"conn_type": "http", "host": "digits", "extra": {"istio": {"namespace": "models"}}}),
    )
    with pytest.raises(AirflowFailException, match=r"extra istio\.service"):
        steps.router(RolloutSpec.from_dict(PARAMS), "r", steps.serving())


def deployment(kube: FakeKubeAPI, version: str) -> dict:
    return kube.objects[("deployments", "models", f"digits-v{version}")]


def test_the_candidate_runs_as_its_own_deployment_behind_its_subset(kube):
    from kubernetes import client

    tag = "registry.example.com/ml/digits-server:sha-c0ffeec0ffee"
    take("run-1")
    assert steps.deploy_candidate(PARAMS, {"build": {"image": tag}}, "run-1") == "digits-v2"
    obj = deployment(kube, "2")
    api = client.ApiClient()
    assert api.sanitize_for_serialization(api._ApiClient__deserialize(obj, "V1Deployment")) == obj  # a valid Deployment
    pod = obj["spec"]["template"]
    assert pod["metadata"]["labels"] == {
        "app": "digits",
        "version": "2",
    }  # the DestinationRule subset's labels
    assert obj["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == tag
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The pod serves version 2 only, whatever its image's config.json loads, and is ready once it does.
    from model_server.__main__ import parse_args

    assert parse_args(container["args"]).serve == ["digits:2"]  # the server's own parser takes them
    assert kube.writes()[-1]["content_type"] == "application/apply-patch+yaml"
    assert kube.writes()[-1]["query"]["fieldManager"] == ["model-rollout"]


def test_promotion_retires_the_baseline_and_rollback_the_candidate(kube):
    stable_virtual_service(kube, PARAMS)
    deployments = steps.ModelServerHook().deployments("digits")
    for version in ("1", "2"):
        deployments.apply(version, f"registry.example.com/ml/digits-server:v{version}")
    take("run-1")
    steps.restore_stable(PARAMS, "run-1")  # rollback: the candidate's pods go away
    assert deployment(kube, "2")["spec"]["replicas"] == 0
    assert deployment(kube, "2")["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":v2")  # kept
    assert deployment(kube, "1")["spec"]["replicas"] == 1
    assert steps.ensure_stable(PARAMS, "run-1", None, "1").startswith("version 1 takes 100%")  # run-1 ends
    deployments.apply("2", "registry.example.com/ml/digits-server:v2")
    take("run-2")
    steps.promote(PARAMS, "run-2")  # promotion: the baseline's pods go away
    assert deployment(kube, "1")["spec"]["replicas"] == 0
    assert deployment(kube, "2")["spec"]["replicas"] == 1
    assert routes(kube) == [("v2", 100)]
    # The run fails after promote (notify, say): the DAG's failure callback keeps the promotion.
    # Routing back to version 1, whose pods promote scaled to 0, would be an outage.
    writes = len(kube.writes())
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-2"})
    assert len(kube.writes()) == writes
    assert routes(kube) == [("v2", 100)]
    assert steps.serving().model_lock("digits", "istio").holding() is None  # and the run's Lease is released


def test_a_deployment_the_api_server_would_refuse_is_refused_with_its_reason(kube):
    from kubernetes.client.exceptions import ApiException

    from vision_rollout.deploy import render_deployment
    from vision_rollout.mesh import IstioTarget

    bad = render_deployment(IstioTarget("models", "digits", "digits"), "digits", "2", "img:1")
    bad["spec"]["selector"]["matchLabels"]["version"] = "3"
    apps = steps.ModelServerHook().deployments("digits")._apps()
    with pytest.raises(ApiException) as refused:
        apps.patch_namespaced_deployment(
            "digits-v2", "models", bad, field_manager="model-rollout", _content_type="application/apply-patch+yaml"
        )
    assert refused.value.status == 422
    assert "`selector` does not match template `labels`" in refused.value.body
    assert ("deployments", "models", "digits-v2") not in kube.objects


@pytest.fixture
def fleet(kube, monkeypatch, tmp_path, models_dir):
    """One connection for every model: {model} in the connection-wide sections; a repository of
    two models (digits, and its files again as mnist)."""
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / "digits").symlink_to(models_dir / "digits", target_is_directory=True)
    (repository / "mnist").mkdir()
    for part in ("1", "2", "3", "validation"):
        (repository / "mnist" / part).symlink_to(models_dir / "digits" / part, target_is_directory=True)
    config = json.loads((models_dir / "digits" / "config.json").read_text())
    (repository / "mnist" / "config.json").write_text(json.dumps({**config, "name": "mnist"}))
    extra = {
        "repository": str(repository),
        "run_dir": str(tmp_path / "run"),
        "istio": {**ISTIO, "service": "{model}", "name": "{model}"},
        "build": {**BUILD, "registry": "registry.example.com/ml/{model}-server"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    for model in ("digits", "mnist"):
        stable_virtual_service(kube, {**PARAMS, "model": model})
    return kube


def lease(kube: FakeKubeAPI, model: str) -> dict | None:
    return kube.objects.get(("leases", "models", f"rollout-{model}"))


def changes(kube: FakeKubeAPI, since: int) -> list[dict]:
    """Every call after ``since`` that is not a read or a refused attempt to take a lease."""
    return [r for r in kube.requests[since:] if r["method"] != "GET" and r.get("status") != 409]


def test_a_second_run_of_a_model_is_refused_and_another_models_run_proceeds(fleet):
    built = steps.build_image(PARAMS, "run-a")
    assert built["build"]["image"].startswith("registry.example.com/ml/digits-server:")  # the model's own build
    steps.apply_weights(PARAMS, 0, "run-a", built)
    assert routes(fleet) == [("v1", 90), ("v2", 10)]
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-a"

    before = len(fleet.requests)
    with pytest.raises(
        AirflowFailException, match=r"model 'digits' is being rolled out by run 'run-a'.*touched nothing"
    ):
        steps.build_image({**PARAMS, "candidate_version": "3"}, "run-b")
    assert changes(fleet, before) == []  # refused before touching anything
    # Its teardown and the DAG's failure callback leave run-a's routes and lease alone.
    assert "nothing restored" in steps.ensure_stable({**PARAMS, "candidate_version": "3"}, "run-b", None, None)
    steps.restore_stable_on_failure({"params": {**PARAMS, "candidate_version": "3"}, "run_id": "run-b"})
    assert changes(fleet, before) == []
    assert routes(fleet) == [("v1", 90), ("v2", 10)]
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-a"

    mnist = {**PARAMS, "model": "mnist"}  # another model: its own lease, VirtualService, image
    built = steps.build_image(mnist, "run-c")
    assert built["build"]["image"].startswith("registry.example.com/ml/mnist-server:")
    steps.apply_weights(mnist, 0, "run-c", built)
    assert routes(fleet, "mnist") == [("v1", 90), ("v2", 10)]
    assert lease(fleet, "mnist")["spec"]["holderIdentity"] == "run-c"

    # run-a ends: stable back, its lease released; the model is free for the next run.
    assert steps.ensure_stable(PARAMS, "run-a", None, "1").startswith("version 1 takes 100%")
    assert routes(fleet) == [("v1", 100)]
    assert lease(fleet, "digits") is None
    assert routes(fleet, "mnist") == [("v1", 90), ("v2", 10)]  # the other model's rollout goes on
    steps.build_image(PARAMS, "run-b")
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-b"


def test_a_run_whose_lease_was_taken_over_stops_before_touching_anything(fleet):
    built = steps.build_image(PARAMS, "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    # run-a stalls past its lease (a crashed worker); run-b takes the model over.
    fleet.objects[("leases", "models", "rollout-digits")]["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"
    steps.build_image({**PARAMS, "candidate_version": "3"}, "run-b")
    steps.apply_weights({**PARAMS, "candidate_version": "3"}, 0, "run-b", built)
    assert routes(fleet) == [("v1", 90), ("v3", 10)]
    before = len(fleet.requests)
    with pytest.raises(AirflowFailException, match=r"run 'run-a' does not hold model 'digits': run 'run-b'"):
        steps.apply_weights(PARAMS, 1, "run-a", {"decision": "pass"})
    with pytest.raises(AirflowFailException, match="run 'run-a' does not hold model 'digits'"):
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-a")
    assert "nothing restored" in steps.ensure_stable(PARAMS, "run-a", None, None)
    assert changes(fleet, before) == []
    assert routes(fleet) == [("v1", 90), ("v3", 10)]


def test_an_image_build_of_a_run_without_the_model_starts_no_pod(kube):
    from rollout_airflow.operators import KanikoBuild

    plan = steps.kaniko_plan(RolloutSpec.from_dict(PARAMS), SHA, steps.serving().settings.build_for("digits"))
    take("run-a")
    before = len(kube.requests)
    with pytest.raises(AirflowFailException, match="run 'run-b' does not hold model 'digits'"):
        KanikoBuild(task_id="kaniko_build", plan={"build": plan}).execute({"params": PARAMS, "run_id": "run-b"})
    assert changes(kube, before) == []  # no pod, no lease written
    assert steps.serving().model_lock("digits", "istio").holding().holder == "run-a"
