"""Kubernetes mode (mesh ``istio``): the BuildKit build pod the KubernetesPodOperator would run, rendered
and checked with the kubernetes client, the stage weights applied as an Istio VirtualService
through ``kubernetes_default`` (the fake API server speaks the real wire protocol), each model
its own target, and one run at a time per model (its Lease)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from devstack.cluster.kube import FakeKubeAPI
from rollout_airflow import steps
from vision_rollout.folders import Folder
from vision_rollout.settings import HELD, PROMOTED
from vision_rollout.spec import RolloutSpec

pytestmark = pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)

SHA = "c0ffee" * 10 + "beef"
BUILD = {
    "registry": "registry.example.com/ml/digits-server",
    "context": "s3://ml-builds/serving-context.tar.gz",
    "namespace": "ml-builds",
    "service_account": "image-builder",
    "push_secret": "registry-push",
    "drain_seconds": 0,  # no Envoy to wait for
}
ISTIO = {"namespace": "models", "service": "digits", "name": "digits", "gateways": ["mesh"]}
PARAMS = {"candidate_version": "2", "mesh": "istio", "stages": [10, 50, 100]}
SENT = {"outbox": "run/outbox/report.json"}  # notify's XCom: the report went out


def connect(monkeypatch, tmp_path, extra: dict | None = None, **build) -> None:
    """The ``model_server_default`` connection of these tests, ``extra`` and ``build`` settings added."""
    extras = {"istio": ISTIO, "build": {**BUILD, **build}, "run_dir": str(tmp_path), **(extra or {})}
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT",
        json.dumps({"conn_type": "http", "host": "digits.models.svc", "port": 8000, "extra": extras}),
    )


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
    connect(monkeypatch, tmp_path)
    yield fake
    fake.stop()


def take(run_id: str, model: str = "digits") -> None:
    """What build_image does first: the run takes its model's Lease."""
    steps.serving().model_lock(model, "istio").acquire(run_id)


def stable_virtual_service(kube: FakeKubeAPI, params: dict, serving: str = "1") -> None:
    """The model as it was before the rollout: version 1's Deployment, and its VirtualService
    sending version ``serving`` 100% and DestinationRule (the overlay's)."""
    from model_server.traffic import TrafficPolicy
    from vision_rollout.mesh import render_destination_rule, render_envoy_filter, render_virtual_service

    spec = RolloutSpec.from_dict(params)
    steps.serving().deployments(spec.model).apply("1", image("1"))
    target = steps.router(spec, "r", steps.serving()).target
    vs = render_virtual_service(target, TrafficPolicy.from_dict({"route": [{"version": serving, "weight": 100}]}))
    for plural, obj in (("virtualservices", vs), ("destinationrules", render_destination_rule(target, [serving]))):
        kube.objects[(plural, target.namespace, target.name)] = {
            **obj,
            "metadata": {**obj["metadata"], "resourceVersion": "3"},
        }
    bucket = render_envoy_filter()  # the mesh's (deploy/base/mesh.yaml), one for every model
    kube.objects[("envoyfilters", "istio-system", "rollout-bucket")] = {
        **bucket,
        "metadata": {**bucket["metadata"], "resourceVersion": "3"},
    }


def routes(kube: FakeKubeAPI, name: str = "digits", namespace: str = "models") -> list[tuple[str, int]]:
    http = kube.objects[("virtualservices", namespace, name)]["spec"]["http"][-1]["route"]
    return [(r["destination"]["subset"], r.get("weight", 100)) for r in http]


def test_the_build_pod_is_rootless_buildkit_pushing_the_digest_tag(kube):
    from kubernetes import client

    from rollout_airflow.operators import ImageBuild
    from vision_rollout.settings import BUILDKIT_IMAGE

    plan = steps.build_plan(RolloutSpec.from_dict(PARAMS), SHA, steps.serving().settings.build_for("digits"))
    tag = plan["image"]
    assert tag == "registry.example.com/ml/digits-server:sha-c0ffeec0ffee"
    assert json.loads(json.dumps(plan)) == plan  # it travels by XCom
    operator = ImageBuild(task_id="buildkit_build", plan={"build": plan})
    operator.prepare(plan)
    pod = operator.build_pod_request_obj()  # what the operator would create
    api = client.ApiClient()
    rendered = api.sanitize_for_serialization(pod)
    assert api.sanitize_for_serialization(api._ApiClient__deserialize(rendered, "V1Pod")) == rendered  # valid V1Pod
    assert pod.metadata.namespace == "ml-builds"
    assert pod.metadata.name.startswith("build-digits-2-c0ffeec0")
    assert pod.spec.service_account_name == "image-builder"
    assert pod.spec.restart_policy == "Never"
    (container,) = pod.spec.containers
    assert container.image == BUILDKIT_IMAGE  # the default builder
    assert container.command[-1] == "buildctl-daemonless.sh"  # the operator keeps the template's command
    assert container.termination_message_policy == "FallbackToLogsOnError"  # and how it reports
    assert container.termination_message_path == "/dev/termination-log"
    assert f"type=image,name={tag},push=true" in container.args
    assert f"build-arg:MODEL_SHA256={SHA}" in container.args
    assert "build-arg:MODEL_FILE=models/digits/2/model.onnx" in container.args
    assert not container.security_context.privileged
    assert container.security_context.seccomp_profile.type == "Unconfined"
    fetch, _unpack = pod.spec.init_containers  # the s3:// context, fetched before the build
    assert fetch.args[-2:] == ["s3://ml-builds/serving-context.tar.gz", "/download/context.tar.gz"]
    secret = next(v for v in pod.spec.volumes if v.secret)
    assert secret.secret.secret_name == "registry-push"
    assert next(m for m in container.volume_mounts if m.name == secret.name).read_only
    assert operator.kubernetes_conn_id == "kubernetes_default"
    assert operator.on_finish_action.value == "delete_succeeded_pod"


def test_the_builder_image_is_a_setting(kube, monkeypatch, tmp_path):
    """A mirror, or another build of BuildKit's rootless image: the same command line."""
    mirror = "mirror.example.com/moby/buildkit:v0.32.2-rootless"
    connect(monkeypatch, tmp_path, builder_image=mirror)
    plan = steps.build_plan(RolloutSpec.from_dict(PARAMS), SHA, steps.serving().settings.build_for("digits"))
    spec = plan["pod"]["spec"]
    assert spec["containers"][0]["image"] == spec["initContainers"][1]["image"] == mirror
    assert spec["containers"][0]["command"][-1] == "buildctl-daemonless.sh"


def test_kubernetes_mode_without_build_settings_fails_naming_the_setting(kube, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT",
        json.dumps({"conn_type": "http", "host": "digits", "extra": {"istio": ISTIO, "build": {"context": "s3://x"}}}),
    )
    with pytest.raises(AirflowFailException, match=r"model_server_default extra build\.registry"):
        steps.build_plan(RolloutSpec.from_dict(PARAMS), SHA, steps.serving().settings.build_for("digits"))


def test_local_mode_has_no_image_to_build():
    from airflow.sdk.exceptions import AirflowSkipException

    from rollout_airflow.operators import ImageBuild

    with pytest.raises(AirflowSkipException, match="no image to build"):
        ImageBuild(task_id="buildkit_build", plan={"sha256": SHA}).execute({})  # a local-mode report


def image(version: str) -> str:
    return f"registry.example.com/ml/digits-server:v{version}"


def pushed(built: dict) -> str:
    """What buildkit_build hands deploy_candidate for build_image's plan: its tag, by a digest."""
    return f"{built['build']['image']}@sha256:{'5' * 64}"


def calls(kube: FakeKubeAPI, since: int = 0) -> list[tuple[str, str]]:
    """The API calls since request ``since``: (verb, "<plural>/<name>"); not a dry run (it writes nothing)."""
    return [(r["method"], "/".join(r["path"].split("/")[-2:])) for r in kube.requests[since:] if not dry_run(r)]


def dry_run(request: dict) -> bool:
    return "dryRun" in (request.get("query") or {})


def test_stage_weights_and_rollback_go_to_the_virtual_service(kube):
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
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

    tag = f"registry.example.com/ml/digits-server:sha-c0ffeec0ffee@sha256:{'a' * 64}"  # by digest
    take("run-1")
    with pytest.raises(AirflowFailException, match="buildkit_build pushed no image"):
        steps.deploy_candidate(PARAMS, None, "run-1")
    assert ("deployments", "models", "digits-v2") not in kube.objects
    assert steps.deploy_candidate(PARAMS, tag, "run-1") == "digits-v2"
    obj = deployment(kube, "2")
    assert valid_deployment(obj)
    pod = obj["spec"]["template"]
    assert pod["metadata"]["labels"] == {
        "app": "digits",
        "version": "2",  # the DestinationRule subset's labels
        "app.kubernetes.io/managed-by": "model-rollout",  # what the PodMonitor selects
    }
    assert obj["spec"]["selector"]["matchLabels"] == {"app": "digits", "version": "2"}
    (container,) = pod["spec"]["containers"]
    assert container["image"] == tag
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The pod serves version 2 only, whatever its image's config.json loads, and is ready once it does.
    from model_server.__main__ import parse_args

    args = parse_args(container["args"])
    assert args.serve == ["digits:2"]  # the server's own parser takes them
    # The admin API on a port of its own, which the Service leaves out; its token a Secret's file.
    assert args.admin_port == 8001
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "admin": 8001}
    assert container["readinessProbe"]["httpGet"]["port"] == 8000
    assert str(args.admin_token_file) == "/etc/model-server/admin-token/token"
    assert {"name": "admin-token", "mountPath": "/etc/model-server/admin-token", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in pod["spec"]["volumes"]}["admin-token"] == (
        "model-server-admin"
    )
    assert kube.writes()[-1]["content_type"] == "application/apply-patch+yaml"
    assert kube.writes()[-1]["query"]["fieldManager"] == ["model-rollout"]


def test_the_candidate_takes_the_baselines_pod_template_and_scaling_keeps_each_ones(kube):
    """What a user set on the baseline's pods (node selection, a resource, an env variable, a
    flag) carries over to the candidate, as Flagger clones its target; only the version's own
    parts change. Scaling a version keeps its own template: its pods are not rolled."""
    stable_virtual_service(kube, PARAMS)

    def customise(obj: dict) -> None:
        pod = obj["spec"]["template"]["spec"]
        pod["nodeSelector"] = {"gpu": "h100"}
        (container,) = pod["containers"]
        container["resources"]["requests"]["cpu"] = "6"
        container.setdefault("env", []).append({"name": "OMP_NUM_THREADS", "value": "4"})
        container["args"] += ["--max-body-mb", "16"]

    kube.touch("deployments", "models", "digits-v1", customise)
    take("run-1")
    tag = image("2")
    steps.deploy_candidate(PARAMS, tag, "run-1")
    v1, v2 = deployment(kube, "1")["spec"]["template"], deployment(kube, "2")["spec"]["template"]
    assert v2["spec"]["nodeSelector"] == {"gpu": "h100"}
    (c1,), (c2,) = v1["spec"]["containers"], v2["spec"]["containers"]
    assert c2["resources"] == c1["resources"]
    assert c2["resources"]["requests"]["cpu"] == "6"
    assert c2["env"] == c1["env"]
    assert c2["image"] == tag
    assert c2["args"] == [a.replace("digits:1", "digits:2") for a in c1["args"]]
    assert v2["metadata"]["labels"] == {
        "app": "digits",
        "version": "2",
        "app.kubernetes.io/managed-by": "model-rollout",
    }
    since = len(kube.requests)
    steps.serving().deployments("digits").scale_to_zero("1")
    assert calls(kube, since) == [("GET", "deployments/digits-v1"), ("PATCH", "deployments/digits-v1")]  # one read
    after = deployment(kube, "1")
    assert after["spec"]["replicas"] == 0
    assert after["spec"]["template"] == v1  # the user's changes kept, nothing rolled


def test_scaling_keeps_the_model_servers_image_when_another_container_comes_first(kube):
    """A baseline with a log shipper before the model server: scaling took the first container's
    image for the model server's (the candidate and, once retired, the baseline ran it)."""
    stable_virtual_service(kube, PARAMS)

    def sidecar_first(obj: dict) -> None:
        obj["spec"]["template"]["spec"]["containers"].insert(0, {"name": "log-shipper", "image": "fluent-bit:3.0"})

    kube.touch("deployments", "models", "digits-v1", sidecar_first)
    steps.serving().deployments("digits").scale("1", 3)
    containers = {c["name"]: c["image"] for c in deployment(kube, "1")["spec"]["template"]["spec"]["containers"]}
    assert containers == {"log-shipper": "fluent-bit:3.0", "model-server": image("1")}
    assert deployment(kube, "1")["spec"]["replicas"] == 3


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
    since = len(kube.requests)
    assert steps.ensure_stable(PARAMS, "run-1", None, "1", SENT).startswith("version 1 takes 100%")  # run-1 ends
    assert ("PATCH", "deployments/digits-v2") not in calls(kube, since)  # retired once, not drained again
    deployments.apply("2", "registry.example.com/ml/digits-server:v2")
    take("run-2")
    steps.promote(PARAMS, "run-2", "promote")  # promotion: the baseline's pods go away
    assert deployment(kube, "1")["spec"]["replicas"] == 0
    assert deployment(kube, "2")["spec"]["replicas"] == 1
    assert routes(kube) == [("v2", 100)]

    # The run fails after promote (notify, say): the DAG's failure callback keeps the promotion.
    # Routing back to version 1, whose pods promote scaled to 0, would be an outage.
    def mesh_and_pods_writes() -> list[dict]:
        return [w for w in kube.writes() if "/leases" not in w["path"]]

    writes = len(mesh_and_pods_writes())
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-2"})
    assert len(mesh_and_pods_writes()) == writes
    assert routes(kube) == [("v2", 100)]
    assert steps.serving().model_lock("digits", "istio").holding() is None  # and the run's Lease is released


def test_a_retired_version_loses_its_pinned_route(fleet):
    """Requests that name a version (x-model-version, /versions/N/) have a route of their own to
    its subset while a run needs it; a version the run retires loses it (its pinned requests
    went to no pods, 503s, where the version serving answers that it does not serve it)."""

    def pinned() -> list[str]:
        http = fleet.objects[("virtualservices", "models", "digits")]["spec"]["http"]
        return [r["name"] for r in http if r["name"].startswith("pinned-")]

    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    assert pinned() == ["pinned-v1", "pinned-v2"]
    steps.restore_stable(PARAMS, "run-a")
    assert pinned() == ["pinned-v1"]
    steps.ensure_stable(PARAMS, "run-a", None, "1", SENT)
    assert pinned() == ["pinned-v1"]
    built = steps.build_image(PARAMS, "run-b")
    steps.deploy_candidate(PARAMS, pushed(built), "run-b")
    steps.apply_weights(PARAMS, 0, "run-b", built)
    steps.promote(PARAMS, "run-b", "promote")
    assert pinned() == ["pinned-v2"]
    assert routes(fleet) == [("v2", 100)]


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


@pytest.mark.parametrize(("mirror", "sizes"), [(0, [1, 2, 4]), (50, [3, 4, 4])], ids=["no-mirror", "mirror-50"])
def test_the_candidate_is_sized_per_stage_and_ready_before_its_weight_moves(kube, mirror, sizes):
    """Four baseline pods; stages 10, 50 and 100%: the candidate takes its weight's share, plus
    the mirrored copies (Istio's weighted route mirrors its own share too), before the
    VirtualService sends it any."""
    params = {**PARAMS, "mirror_percent": mirror}
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=4)
    steps.deploy_candidate(params, image("2"), "run-1")
    assert deployment(kube, "2")["spec"]["replicas"] == sizes[0]  # the first stage's size from the start
    for index, expected in enumerate(sizes):
        since = len(kube.requests)
        steps.apply_weights(params, index, "run-1", {"decision": "pass"})
        assert deployment(kube, "2")["spec"]["replicas"] == expected
        done = calls(kube, since)
        routed = max(i for i, call in enumerate(done) if call == ("PATCH", "virtualservices/digits"))  # the weights
        scaled = done.index(("PATCH", "deployments/digits-v2"))
        assert ("GET", "deployments/digits-v2") in done[scaled:routed]  # its readiness, read back between
    assert deployment(kube, "1")["spec"]["replicas"] == 4
    for write in kube.writes():  # a field another manager owns is a conflict, not taken (the mesh's are forced)
        if write["method"] == "PATCH":
            assert ("force" in write["query"]) == ("networking.istio.io" in write["path"]), write


def hpa(kube: FakeKubeAPI, version: str) -> dict:
    return kube.objects[("horizontalpodautoscalers", "models", f"digits-v{version}")]


def test_under_an_hpa_the_rollout_moves_its_floor_and_never_writes_replicas(kube, monkeypatch, tmp_path):
    """Each version's HPA applied (not forced: a field another manager owns is refused), its floor
    the stage's size; the Deployment's replicas set through its scale subresource, never by the
    apply."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=10)
    steps.deploy_candidate({**PARAMS, "mirror_percent": 0}, image("2"), "run-1")
    assert deployment(kube, "2")["spec"]["template"]["spec"]["containers"][0]["image"] == image("2")
    assert (hpa(kube, "2")["spec"]["minReplicas"], hpa(kube, "2")["spec"]["maxReplicas"]) == (1, 40)
    assert hpa(kube, "2")["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "digits-v2",
    }
    applied = next(
        w
        for w in kube.writes()
        if w["path"] == "/apis/autoscaling/v2/namespaces/models/horizontalpodautoscalers/digits-v2"
    )
    assert applied["content_type"] == "application/apply-patch+yaml"
    assert applied["query"]["fieldManager"] == ["model-rollout"]
    assert "force" not in applied["query"]  # (a Helm release's HPA of that name is refused, not taken over)
    steps.apply_weights({**PARAMS, "mirror_percent": 0}, 1, "run-1", {"decision": "pass"})
    assert (hpa(kube, "2")["spec"]["minReplicas"], deployment(kube, "2")["spec"]["replicas"]) == (5, 5)
    owners = {
        (e["manager"], e.get("subresource"))
        for e in deployment(kube, "2")["metadata"]["managedFields"]
        if "f:replicas" in e["fieldsV1"]["f:spec"]
    }
    assert owners == {("model-rollout", "scale")}  # the apply never claimed it


def test_a_promoted_candidate_keeps_the_stable_versions_autoscaling(kube, monkeypatch, tmp_path):
    """The stable version's HPA (its bounds, metrics, behavior: as it was left, edits included)
    is the promoted candidate's, as Flagger's primary HPA copies its target's. The candidate's HPA
    had the floor of the count the stable version ran at that moment (12 pods at a peak, for good),
    and none of the stable one's settings."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40, replicas=2)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=4)
    behavior = {
        "scaleDown": {
            "stabilizationWindowSeconds": 600,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        }
    }
    metrics = [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}
    ]
    kube.touch(
        "horizontalpodautoscalers",
        "models",
        "digits-v1",
        lambda h: h["spec"].update(maxReplicas=60, behavior=behavior, metrics=metrics),  # tuned by hand
    )
    kube.scale("models", "digits-v1", 12, "kube-controller-manager")  # the HPA at a peak
    steps.deploy_candidate(params, image("2"), "run-1")
    for index in range(3):
        steps.apply_weights(params, index, "run-1", {"decision": "pass"})
    since = len(kube.requests)
    steps.promote(params, "run-1", "promote")
    assert routes(kube) == [("v2", 100)]
    promoted = hpa(kube, "2")["spec"]
    assert (promoted["minReplicas"], promoted["maxReplicas"]) == (4, 60)
    assert (promoted["behavior"], promoted["metrics"]) == (behavior, metrics)
    assert promoted["scaleTargetRef"]["name"] == "digits-v2"
    assert deployment(kube, "2")["spec"]["replicas"] == 12  # the stable version's pods, before it took 100%
    done = calls(kube, since)
    assert done.index(("PATCH", "horizontalpodautoscalers/digits-v2")) < done.index(("PATCH", "virtualservices/digits"))
    assert deployment(kube, "1")["spec"]["replicas"] == 0


def test_under_an_hpa_a_versions_budget_follows_its_floor_and_keeps_its_last_pod(kube, monkeypatch, tmp_path):
    """A budget was sized once, at the count the rollout applied: a candidate promoted at the
    stable version's 6 pods kept maxUnavailable 1 under the stable version's HPA (floor 1), so once
    the HPA scaled it down to 1 pod a drain evicted that pod. The budget now follows the HPA's
    floor each time the rollout moves it: one at a time above a floor of 1, the last pod kept at 1."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=1)
    kube.scale("models", "digits-v1", 6, "kube-controller-manager")  # the HPA at a peak

    def budget(version: str) -> dict:
        spec = kube.objects[("poddisruptionbudgets", "models", f"digits-v{version}")]["spec"]
        return {k: spec[k] for k in ("maxUnavailable", "minAvailable") if k in spec}

    assert budget("1") == {"minAvailable": 1}
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    assert hpa(kube, "1")["spec"]["minReplicas"] == 6  # held for the run
    assert budget("1") == {"maxUnavailable": 1}
    for index in (1, 2):
        steps.apply_weights(params, index, "run-1", {"decision": "pass"})
    steps.promote(params, "run-1", "promote")
    assert (hpa(kube, "2")["spec"]["minReplicas"], deployment(kube, "2")["spec"]["replicas"]) == (1, 6)
    assert budget("2") == {"minAvailable": 1}  # whatever count the HPA takes it to, its last pod stays


@pytest.mark.parametrize("end", ["promote", "rollback"])
def test_a_floor_released_whose_budget_is_not_updated_does_not_fail_the_promotion_or_rollback(
    kube, monkeypatch, tmp_path, caplog, end
):
    """Under autoscaling, promote and the rollback put version 1's own floor back once the traffic
    moved: the HPA's apply served (the floor released), then its PodDisruptionBudget's calls got no
    answer. The step failed on it (BudgetNotApplied), the promotion (or the rollback) done, its
    floor released: a budget, a guard against node drains, never holds back a promotion or a
    rollback. The step succeeds and logs the floor released, the budget not updated, and what to
    set it to. It was only logged: the run's report (notify's) says it too, as the teardown's
    report of a kept promotion does."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 6)
    for index in range(1, 3 if end == "promote" else 1):
        steps.apply_weights(params, index, "run-1", {"decision": "pass"})
    assert hpa(kube, "1")["spec"]["minReplicas"] == 6  # held for the run
    budget_unanswered(kube, monkeypatch)
    if end == "promote":
        assert steps.promote(params, "run-1", "promote") == "2"
        assert routes(kube) == [("v2", 100)]
    else:
        assert steps.rollback(params, "run-1") == "1"
        assert routes(kube) == [("v1", 100)]
        assert deployment(kube, "2")["spec"]["replicas"] == 0  # (retired all the same)
    assert (hpa(kube, "1")["spec"]["minReplicas"], hpa(kube, "1")["metadata"].get("annotations") or {}) == (
        2,
        {"model-rollout/budget-pending": "2"},  # (the floor's record gone, the budget marked for the next run)
    )
    assert "the floor the run held on version 1 is released" in caplog.text
    assert "PodDisruptionBudget models/digits-v1 was not updated" in caplog.text
    assert "kubectl -n models patch poddisruptionbudget digits-v1 --type=merge" in caplog.text
    steps.notify(params, end, "every stage passed" if end == "promote" else "rejected", [], None, "run-1")
    (report,) = [p.read_text() for p in sorted((tmp_path / "outbox").glob("*.json"))]  # (its text and blocks)
    assert "the floor the run held on version 1 is released" in report
    assert "PodDisruptionBudget models/digits-v1 was not updated" in report


def test_a_runs_besides_record_is_one_plain_value_and_the_older_list_is_read(kube, monkeypatch, tmp_path):
    """What promote or the rollback left undone once the traffic moved (``besides_recorded``) was
    written as a one-item list, rewritten whole on each record: a list that never held more than
    one. Only one can exist in a run (the budget of the baseline's floor: the release that leaves
    it not updated removes the floor's record, so no later release of the run says it again):
    it is one plain value, a later record replacing it; a record of the older list form is read."""
    connect(monkeypatch, tmp_path)
    spec, hook = steps.spec_from(PARAMS), steps.ModelServerHook()
    folder = hook.settings.workdir("digits", "run-1")
    steps.besides_recorded(spec, "run-1", hook, "the budget, first")
    steps.besides_recorded(spec, "run-1", hook, "the budget, again")
    assert json.loads(folder.read(steps.BESIDES)) == {"besides": "the budget, again"}
    assert steps.besides_of(spec, "run-1") == ["the budget, again"]
    folder.write(steps.BESIDES, json.dumps({"besides": ["an older record"]}).encode())
    assert steps.besides_of(spec, "run-1") == ["an older record"]


def budget_unanswered(kube: FakeKubeAPI, monkeypatch) -> None:
    """Each floor's release (``release_floor``) served for its HPA, its PodDisruptionBudget's calls
    unanswered (BudgetNotApplied)."""
    from vision_rollout.deploy import VersionDeployments

    release = VersionDeployments.release_floor

    def unanswered_budget(self, version):
        kube.throttle, kube.throttle_status = 10**6, None
        kube.throttled_path = "/poddisruptionbudgets/digits-v1"
        try:
            return release(self, version)
        finally:
            kube.throttle = 0

    monkeypatch.setattr(VersionDeployments, "release_floor", unanswered_budget)


def test_the_teardowns_own_report_says_the_budget_its_restore_left_not_updated(kube, monkeypatch, tmp_path):
    """The teardown put version 1 back itself (the rollback did not finish), released its floor,
    and the PodDisruptionBudget's calls got no answer: the budget not updated was recorded in the
    run folder (``besides_recorded``), but the teardown's own report (``_found_report``) did not
    read that record, so nobody was told what to set the budget to. Its report says it, as
    notify's does."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 6)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 6  # held for the run
    budget_unanswered(kube, monkeypatch)
    with pytest.raises(AirflowFailException):
        steps.ensure_stable(params, "run-1", None, None, None, decided="rollback")
    assert routes(kube) == [("v1", 100)]
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2  # released
    (report,) = [p.read_text() for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert "version 1 takes 100%" in report
    assert "PodDisruptionBudget models/digits-v1 was not updated" in report
    assert "kubectl -n models patch poddisruptionbudget digits-v1 --type=merge" in report


def test_a_besides_record_is_removed_once_a_later_try_releases_the_floor_whole(kube, monkeypatch, tmp_path):
    """An earlier try left a record of the budget not updated (``besides_recorded``); a later try
    (the run's floor held again, then released with its budget updated) left it in the run
    folder, so the run's report said a budget not updated that is. A release whose budget is
    updated removes the record; a try that finds no floor to release (the earlier try's release,
    the budget still not updated) keeps it: the report still says it."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 6)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 6  # held for the run
    spec, hook = steps.spec_from(params), steps.ModelServerHook()
    steps.besides_recorded(spec, "run-1", hook, "PodDisruptionBudget models/digits-v1 was not updated (earlier)")
    assert steps.rollback(params, "run-1") == "1"
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2  # released, its budget updated
    assert steps.besides_of(spec, "run-1") == []
    steps.notify(params, "rollback", "rejected", [], None, "run-1")
    (report,) = [p.read_text() for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert "was not updated" not in report


def test_a_besides_record_is_kept_by_a_try_that_finds_the_floor_released(kube, monkeypatch, tmp_path):
    """The rollback's first try released version 1's floor, its budget not updated (recorded),
    then failed (the candidate's retirement refused); its retry finds no floor to release: the
    budget is still not updated, and the run's report says it."""
    from devstack.cluster.kube import APIError

    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 6)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 6  # held for the run
    budget_unanswered(kube, monkeypatch)
    refuse(kube, ("PATCH", "/deployments/digits-v2", APIError(403, "Forbidden", "cannot patch deployments")))
    with pytest.raises(Exception, match="the traffic is restored"):
        steps.rollback(params, "run-1")
    kube.before_write = None
    assert steps.rollback(params, "run-1") == "1"  # (the retry)
    assert deployment(kube, "2")["spec"]["replicas"] == 0
    steps.notify(params, "rollback", "rejected", [], None, "run-1")
    (report,) = [p.read_text() for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert "PodDisruptionBudget models/digits-v1 was not updated" in report


def test_a_budget_not_updated_by_a_rollback_is_applied_by_the_next_run(kube, monkeypatch, tmp_path, caplog):
    """As above, the rollback released version 1's floor (6 pods held, its own 1) and its
    PodDisruptionBudget's calls got no answer: reported, but nothing repaired it later. The floor's
    annotation was gone with the floor, so no later run knew of the budget, left at the floor held
    (maxUnavailable 1, where one pod must be kept). The release marks the budget pending on the HPA,
    the report says the next run applies it; the next run's leftover-floor release
    (``release_leftover_floors``) applies it, clears the mark and says so."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=1)
    kube.scale("models", "digits-v1", 6, "kube-controller-manager")  # the HPA at a peak
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})

    def budget() -> dict:
        spec = kube.objects[("poddisruptionbudgets", "models", "digits-v1")]["spec"]
        return {k: spec[k] for k in ("maxUnavailable", "minAvailable") if k in spec}

    with monkeypatch.context() as unanswered:
        budget_unanswered(kube, unanswered)
        assert steps.rollback(params, "run-1") == "1"
    assert hpa(kube, "1")["spec"]["minReplicas"] == 1
    assert hpa(kube, "1")["metadata"]["annotations"] == {"model-rollout/budget-pending": "1"}
    assert budget() == {"maxUnavailable": 1}  # (the floor held's)
    steps.notify(params, "rollback", "rejected", [], None, "run-1")
    (report,) = [p.read_text() for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert "PodDisruptionBudget models/digits-v1 was not updated" in report
    assert "the model's next run applies it" in report
    caplog.clear()
    steps.release_leftover_floors(steps.spec_from(params), steps.ModelServerHook(), keep="1")  # run-2's start
    assert budget() == {"minAvailable": 1}
    assert hpa(kube, "1")["spec"]["minReplicas"] == 1
    assert (hpa(kube, "1")["metadata"].get("annotations") or {}) == {}
    assert "applied the PodDisruptionBudget left not updated on version(s) 1 by a run" in caplog.text
    caplog.clear()
    steps.release_leftover_floors(steps.spec_from(params), steps.ModelServerHook(), keep="1")  # run-3's: nothing
    assert "PodDisruptionBudget" not in caplog.text


def test_a_pending_budget_whose_apply_is_refused_stays_marked_and_is_said_still_pending(
    kube, monkeypatch, tmp_path, caplog
):
    """The next run's apply of a budget a release left not updated (marked pending on the HPA),
    refused for a field another manager owns (a Helm release's minAvailable, 409): the apply was
    logged, not raised, so the mark was cleared and the log said the budget applied. The mark
    stays, and the log says the budget is still not updated, and why."""
    import copy

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=1)
    kube.scale("models", "digits-v1", 6, "kube-controller-manager")  # the HPA at a peak
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    with monkeypatch.context() as unanswered:
        budget_unanswered(kube, unanswered)
        assert steps.rollback(params, "run-1") == "1"
    assert hpa(kube, "1")["metadata"]["annotations"] == {"model-rollout/budget-pending": "1"}
    live = copy.deepcopy(kube.objects[("poddisruptionbudgets", "models", "digits-v1")])
    theirs = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "digits-v1", "namespace": "models"},
        "spec": {"minAvailable": 2, "selector": live["spec"]["selector"]},
    }
    kube.apply("poddisruptionbudgets", "models", "digits-v1", theirs, "helm", force=True)
    caplog.clear()
    steps.release_leftover_floors(steps.spec_from(params), steps.ModelServerHook(), keep="1")  # run-2's start
    assert hpa(kube, "1")["metadata"]["annotations"] == {"model-rollout/budget-pending": "1"}
    assert "applied the PodDisruptionBudget" not in caplog.text
    assert "PodDisruptionBudget models/digits-v1, left not updated by a run, is still not updated" in caplog.text
    assert '"helm" owns .spec.minAvailable' in caplog.text
    assert "the model's next run tries again" in caplog.text


def floor_held_at_6_of_own_1(kube, monkeypatch, tmp_path):
    """Version 1 applied at 1 pod under autoscaling, its HPA scaled to 6 under load, its floor held
    there (``hold_floor``): its budget the floor held's (maxUnavailable 1), its own floor's
    minAvailable 1. The deployments, and a reader of the budget's two fields."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=1)
    kube.scale("models", "digits-v1", 6, "kube-controller-manager")  # its HPA, under load
    assert deployments.hold_floor("1") == 6

    def budget() -> dict:
        spec = kube.objects[("poddisruptionbudgets", "models", "digits-v1")]["spec"]
        return {k: spec[k] for k in ("maxUnavailable", "minAvailable") if k in spec}

    assert budget() == {"maxUnavailable": 1}
    return deployments, budget


@pytest.mark.parametrize("refusal", ["403", "409"])
def test_a_floor_released_whose_budget_apply_is_refused_is_said_and_marked_pending(
    kube, monkeypatch, tmp_path, refusal
):
    """A floor's release (``release_floor``) whose PodDisruptionBudget apply was refused (403, or
    409 on a field another manager owns) returned True, a floor released whole: the refusal was
    only logged (``_apply_pdb``), so no BudgetNotApplied and no budget-pending mark, the budget
    left at the floor held for good. Only a budget whose calls got no answer was said and marked.
    A refused one is too: BudgetNotApplied, why, what to set it to, and the mark for the next run."""
    from devstack.cluster.kube import APIError
    from vision_rollout.deploy import BudgetNotApplied

    deployments, budget = floor_held_at_6_of_own_1(kube, monkeypatch, tmp_path)
    if refusal == "403":
        forbidden = APIError(403, "Forbidden", "cannot patch resource poddisruptionbudgets")
        refuse(kube, ("PATCH", "/poddisruptionbudgets/digits-v1", forbidden))
    else:
        live = kube.objects[("poddisruptionbudgets", "models", "digits-v1")]
        theirs = {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "digits-v1", "namespace": "models"},
            "spec": {"minAvailable": 2, "selector": copy.deepcopy(live["spec"]["selector"])},
        }
        kube.apply("poddisruptionbudgets", "models", "digits-v1", theirs, "helm", force=True)
    with pytest.raises(BudgetNotApplied) as failed:
        deployments.release_floor("1")
    kube.before_write = None
    assert budget() != {"minAvailable": 1}  # (not the released floor's)
    assert (hpa(kube, "1")["spec"]["minReplicas"], hpa(kube, "1")["metadata"].get("annotations") or {}) == (
        1,
        {"model-rollout/budget-pending": "1"},  # (the floor's record gone, the budget marked for the next run)
    )
    said = str(failed.value)
    assert "the floor the run held on version 1 is released" in said
    assert "PodDisruptionBudget models/digits-v1 was not updated" in said
    assert ("403" in said) if refusal == "403" else ('"helm" owns .spec.minAvailable' in said)
    assert "kubectl -n models patch poddisruptionbudget digits-v1 --type=merge" in said
    assert "the model's next run applies it" in said


@pytest.mark.parametrize("clearing", ["refused", "unanswered"])
def test_a_pending_budget_applied_whose_marks_clearing_fails_is_said_applied(
    kube, monkeypatch, tmp_path, caplog, clearing
):
    """The next run's apply of a budget a release left not updated (``apply_pending_budget``):
    the budget applied, then the HPA apply that clears its mark refused (403) or unanswered, and
    ``release_floors`` said "the budget left not updated on version 1 was not applied" though it
    was. The budget is said applied, the mark not cleared (logged): the next run applies it again,
    the same, and clears it."""
    from devstack.cluster.kube import APIError
    from vision_rollout.deploy import BudgetNotApplied, Released

    deployments, budget = floor_held_at_6_of_own_1(kube, monkeypatch, tmp_path)
    refuse(kube, ("PATCH", "/poddisruptionbudgets/digits-v1", APIError(403, "Forbidden", "cannot patch")))
    with pytest.raises(BudgetNotApplied):
        deployments.release_floor("1")
    kube.before_write = None
    assert hpa(kube, "1")["metadata"]["annotations"] == {"model-rollout/budget-pending": "1"}
    assert budget() == {"maxUnavailable": 1}  # (the floor held's)
    if clearing == "refused":
        refuse(kube, ("PATCH", "/horizontalpodautoscalers/digits-v1", APIError(403, "Forbidden", "cannot patch")))
    else:
        kube.throttle, kube.throttle_status = 10**6, None  # the clearing's calls get no answer
        kube.throttled_methods, kube.throttled_path = frozenset({"PATCH"}), "/horizontalpodautoscalers/digits-v1"
    caplog.clear()
    try:
        assert deployments.release_floors(keep=None) == Released([], ["1"])  # the next run's start
    finally:
        kube.before_write, kube.throttle = None, 0
    assert budget() == {"minAvailable": 1}  # (the released floor's)
    assert hpa(kube, "1")["metadata"]["annotations"] == {"model-rollout/budget-pending": "1"}
    assert "its HPA's mark of the budget pending is not cleared" in caplog.text
    assert deployments.release_floors(keep=None) == Released([], ["1"])  # the run after: the same, the mark cleared
    assert (hpa(kube, "1")["metadata"].get("annotations") or {}) == {}
    assert budget() == {"minAvailable": 1}


@pytest.mark.parametrize("write", [1, 2, 3])
@pytest.mark.parametrize("end", ["killed", "refused"])
def test_a_floors_release_cut_at_any_write_leaves_its_budget_to_the_next_run(kube, monkeypatch, tmp_path, end, write):
    """A floor's release (``release_floor``) wrote the HPA's release, then the PodDisruptionBudget,
    then (only where the budget failed) a second HPA apply marking it pending: a worker killed
    between the release and the budget's apply left neither the floor's record nor the budget's
    mark, the budget at the floor held for good, no run to correct it. The mark goes in the
    release's own apply and is cleared once the budget is applied: the worker killed before
    (``killed``), or the API server refusing (403, ``refused``), any of the release's writes (the
    HPA's release, the budget, the mark's clearing), the HPA still holds the floor's record or the
    budget's mark until the budget is right, and the next run's ``release_floors`` makes it so."""
    from devstack.cluster.kube import APIError
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError

    deployments, budget = floor_held_at_6_of_own_1(kube, monkeypatch, tmp_path)
    apply = VersionDeployments._server_side_apply
    sent: list[str] = []

    def killed_before(self, patch, what, body, read, **options):
        sent.append(what)
        if len(sent) == write:
            raise SystemExit("the worker is killed")
        return apply(self, patch, what, body, read, **options)

    def refused_at() -> None:
        sent.append(kube.requests[-1]["path"])
        if len(sent) == write:
            raise APIError(403, "Forbidden", "cannot patch")
        kube.before_write = refused_at

    with monkeypatch.context() as patched:
        if end == "killed":
            patched.setattr(VersionDeployments, "_server_side_apply", killed_before)
        else:
            kube.before_write = refused_at
        with contextlib.suppress(SystemExit, RouterError):
            deployments.release_floor("1")
    kube.before_write = None
    annotations = hpa(kube, "1")["metadata"].get("annotations") or {}
    recorded = {"model-rollout/own-min-replicas", "model-rollout/budget-pending"} & set(annotations)
    assert recorded or budget() == {"minAvailable": 1}, (sent, annotations, budget())
    deployments.release_floors(keep=None)  # the next run's start
    assert (hpa(kube, "1")["spec"]["minReplicas"], hpa(kube, "1")["metadata"].get("annotations") or {}) == (1, {})
    assert budget() == {"minAvailable": 1}  # (the released floor's)


def test_a_floor_not_released_once_the_routes_are_back_does_not_hold_back_the_rollback(kube, monkeypatch, tmp_path):
    """Under autoscaling, the rollback puts version 1's own floor back once the routes moved back:
    its HPA's PATCH refused (403), the failure went up before the candidate's retirement: the
    rollback failed, the candidate kept running, and the failure callback reported the routes
    not restored though they were. A floor never holds back a rollback: the candidate is retired
    all the same, the step fails saying the traffic is restored and the floor still held, which
    the model's next run releases (``release_leftover_floors``); the failure callback releases
    the lease and reports the routes restored, the floor besides."""
    from devstack.cluster.kube import APIError
    from vision_rollout.mesh import RouterError

    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 6)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 6  # held for the run
    forbidden = APIError(403, "Forbidden", "cannot patch resource horizontalpodautoscalers")
    refuse(kube, ("PATCH", "/horizontalpodautoscalers/digits-v1", forbidden))
    with pytest.raises(RouterError) as raised:
        steps.rollback(params, "run-1")
    assert "the traffic is restored" in str(raised.value)
    assert "the model's next run takes it over and releases it when it ends" in str(raised.value)
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "2")["spec"]["replicas"] == 0  # retired all the same
    assert hpa(kube, "1")["spec"]["minReplicas"] == 6  # still held
    steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    assert lease(kube, "digits") is None  # released
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert "routes not restored" not in report
    assert "version 1 takes 100%" in report
    assert "keeps the floor the run held" in report
    kube.before_write = None
    steps.release_leftover_floors(steps.spec_from(params), steps.ModelServerHook(), keep=None)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2  # the next run's start releases it


def test_promotion_scales_the_candidate_up_routes_then_drains_then_retires_the_baseline(kube):
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=3)
    deployments.apply("2", image("2"), replicas=1)  # as the last canary stage left it
    since = len(kube.requests)
    steps.promote(PARAMS, "run-1", "promote")
    assert deployment(kube, "2")["spec"]["replicas"] == 3  # the baseline's full size
    assert deployment(kube, "1")["spec"]["replicas"] == 0
    done = calls(kube, since)
    scaled_up = done.index(("PATCH", "deployments/digits-v2"))
    routed = done.index(("PATCH", "virtualservices/digits"))
    retired = done.index(("PATCH", "deployments/digits-v1"))
    assert scaled_up < done.index(("GET", "deployments/digits-v2"), scaled_up) < routed  # ready before routed
    assert ("GET", "virtualservices/digits") in done[routed:retired]  # read back: nothing routes to v1
    assert scaled_up < routed < retired


def test_a_drain_never_evicts_a_one_pod_version_and_no_pod_has_two_budgets(kube):
    """One disruption budget over every version's pods (maxUnavailable 1) let a node drain evict
    the candidate's only pod while the stable's were all up: its share answered 503 and the run
    rolled back. A second budget over the candidate alone would select its pods twice, which the
    eviction API refuses for good. Each version now has its own budget over its own pods: none
    of a one-pod version may go, one at a time of a larger one."""
    stable_virtual_service(kube, PARAMS)
    params = {**PARAMS, "mirror_percent": 0}
    steps.serving().deployments("digits").apply("1", image("1"), replicas=4)
    take("run-1")

    def budgets_of(version: str) -> list[dict]:
        pods = deployment(kube, version)["spec"]["template"]["metadata"]["labels"]
        return [
            b
            for (plural, _, _), b in kube.objects.items()
            if plural == "poddisruptionbudgets"
            and all(pods.get(k) == v for k, v in b["spec"]["selector"]["matchLabels"].items())
        ]

    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    assert deployment(kube, "2")["spec"]["replicas"] == 1
    (candidate,), (stable,) = budgets_of("2"), budgets_of("1")
    assert candidate["spec"]["maxUnavailable"] == 0  # its only pod stays: the drain waits
    assert stable["spec"]["maxUnavailable"] == 1
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    assert deployment(kube, "2")["spec"]["replicas"] == 2
    (candidate,) = budgets_of("2")
    assert candidate["spec"]["maxUnavailable"] == 1
    # A budget the API server refuses (a Role without it) holds back no scaling, a rollback's included.
    from devstack.cluster.kube import APIError

    real = kube.apply

    def forbidden(plural, *args, **kwargs):
        if plural == "poddisruptionbudgets":
            raise APIError(403, "Forbidden", "cannot patch resource poddisruptionbudgets")
        return real(plural, *args, **kwargs)

    kube.apply = forbidden
    steps.serving().deployments("digits").scale("1", 5)
    assert deployment(kube, "1")["spec"]["replicas"] == 5


@pytest.mark.parametrize(
    "selector",
    [{"matchLabels": {"app": "digits"}}, {"matchExpressions": [{"key": "version", "operator": "In", "values": ["1"]}]}],
)
def test_a_budget_left_over_every_version_is_refused_at_the_first_stage_naming_it(kube, selector):
    """An install upgraded with its old budget over every version kept beside the per-version
    ones: each pod had two budgets, which the eviction API refuses for good, so a node drain
    blocked on the model's pods. The first stage now finds such a budget and moves no weight,
    naming the budget to delete."""
    stable_virtual_service(kube, PARAMS)
    kube.objects[("poddisruptionbudgets", "models", "digits")] = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "digits", "namespace": "models", "resourceVersion": "3"},
        "spec": {"maxUnavailable": 1, "selector": selector},
    }
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    with pytest.raises(AirflowFailException) as failed:
        steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})
    assert "PodDisruptionBudget models/digits selects version 1's pods beside their own budget digits-v1" in str(
        failed.value
    )
    assert "kubectl -n models delete pdb digits" in str(failed.value)
    assert routes(kube) == [("v1", 100)]
    kube.remove("poddisruptionbudgets", "models", "digits")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})
    assert routes(kube) == [("v1", 90), ("v2", 10)]


def test_promote_run_again_leaves_the_promoted_version_at_its_size(kube):
    """promote cleared once it had retired the baseline: the baseline's size read as 0, so the
    candidate, taking all of the traffic, was scaled down to build.replicas (1 of its 3 pods)."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=3)
    deployments.apply("2", image("2"), replicas=1)
    steps.promote(PARAMS, "run-1", "promote")
    since = len(kube.requests)
    assert steps.promote(PARAMS, "run-1", "promote") == "2"
    assert deployment(kube, "2")["spec"]["replicas"] == 3
    assert deployment(kube, "1")["spec"]["replicas"] == 0
    assert [w["path"] for w in changes(kube, since) if "/leases/" not in w["path"]] == []


def test_deploy_candidate_run_again_mid_rollout_keeps_the_pods_serving_its_share(kube):
    """deploy_candidate cleared at the 50% stage: it sized the candidate for the first stage
    again (1 pod of 5) while the VirtualService still sent it half of the traffic."""
    params = {**PARAMS, "mirror_percent": 0}
    stable_virtual_service(kube, params)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=10)
    steps.deploy_candidate(params, image("2"), "run-1")
    assert deployment(kube, "2")["spec"]["replicas"] == 1
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    assert (routes(kube), deployment(kube, "2")["spec"]["replicas"]) == ([("v1", 50), ("v2", 50)], 5)
    steps.deploy_candidate(params, image("2"), "run-1")
    assert deployment(kube, "2")["spec"]["replicas"] == 5


def baseline_at_0(kube: FakeKubeAPI, monkeypatch, tmp_path, serving: int = 2, **build):
    """A promotion cut short after it retired the baseline: the connection with ``build`` settings,
    the routes sending version 2 all of the traffic, run-1 holding the model's lease, version 1's
    Deployment at 0 pods and version 2's at ``serving``. The model's VersionDeployments."""
    connect(monkeypatch, tmp_path, **build)
    stable_virtual_service(kube, PARAMS, serving="2")  # promote had moved the routes
    take("run-1")
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=0)
    deployments.apply("2", image("2"), replicas=serving)
    return deployments


def test_rollback_brings_the_baseline_back_before_routing_to_it(kube, monkeypatch, tmp_path):
    """A run stopped after its baseline was scaled to 0 (its promotion failed halfway): the
    rollback starts the baseline's pods, waits for them, routes, drains, and only then retires
    the candidate."""
    baseline_at_0(kube, monkeypatch, tmp_path, replicas=2)
    since = len(kube.requests)
    steps.restore_stable(PARAMS, "run-1")
    assert deployment(kube, "1")["spec"]["replicas"] == 2  # build.replicas
    assert deployment(kube, "2")["spec"]["replicas"] == 0
    done = calls(kube, since)
    restored = done.index(("PATCH", "deployments/digits-v1"))
    routed = max(i for i, call in enumerate(done) if call == ("PATCH", "virtualservices/digits"))
    retired = done.index(("PATCH", "deployments/digits-v2"))
    assert ("GET", "deployments/digits-v1") in done[restored:routed]  # its readiness
    assert ("GET", "virtualservices/digits") in done[routed:retired]
    assert restored < routed < retired


@pytest.mark.parametrize("end", ["rollback", "failure-callback"])
def test_a_baseline_at_0_whose_candidates_size_is_unread_is_brought_back_at_the_builds_count(
    kube, monkeypatch, tmp_path, caplog, end
):
    """A run stopped after its baseline was scaled to 0 (its promotion failed halfway), the
    candidate serving at 5 pods: the restore brings the baseline back at the pods that serve now,
    the candidate's size, which only chooses how many. That read failing (a 500) fell back on the
    build's count (``replicas``: 2 here), logged, the traffic moved back all the same: a path no
    test ran."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError

    baseline_at_0(kube, monkeypatch, tmp_path, serving=5, replicas=2)
    replicas, unread = VersionDeployments.replicas, []

    def candidates_unread(self, version):
        if version == "2" and not unread:  # (its first read: the restore's choice of the baseline's size)
            unread.append(version)
            raise RouterError("read Deployment digits-v2: 500 Internal Server Error: etcdserver: request timed out")
        return replicas(self, version)

    monkeypatch.setattr(VersionDeployments, "replicas", candidates_unread)
    steps.restore_stable(PARAMS, "run-1", unload_candidate=end == "rollback")
    assert unread == ["2"]
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == 2  # build.replicas, not the candidate's 5
    assert "version 2's size was not read (read Deployment digits-v2: 500 Internal Server Error" in caplog.text
    assert deployment(kube, "2")["spec"]["replicas"] == (0 if end == "rollback" else 5)


def test_a_rollback_brings_back_a_baseline_another_manager_scaled_to_0(kube, caplog):
    """Without autoscaling, mid-stage, the baseline scaled to 0 by another manager (KEDA, a
    ``kubectl scale``), which owns its ``spec.replicas`` from then on: the rollback's apply of
    its Deployment at its size was refused (409, a field another manager owns), every retry the
    same, and the routes stayed 90% on a version without pods. Its pods are set through its scale
    subresource, as ``kubectl scale`` does, the apply's refusal logged, and the traffic goes back."""
    at_stage_1(kube)
    kube.scale("models", "digits-v1", 0, "keda")
    serving_now = deployment(kube, "2")["spec"]["replicas"]
    steps.restore_stable(PARAMS, "run-1")
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == serving_now  # the candidate's pods, that serve now
    assert '"keda" with subresource "scale" owns .spec.replicas' in caplog.text
    assert deployment(kube, "2")["spec"]["replicas"] == 0


@pytest.mark.parametrize("end", ["rollback", "failure-callback"])
def test_a_rollback_to_a_baseline_at_0_moves_the_traffic_once_one_of_its_pods_is_ready(kube, monkeypatch, end):
    """A baseline at 0 pods (scaled there by another manager mid-stage), on a cluster whose free
    capacity the candidate's pods use: the rollback scaled it back and waited for all of its pods
    (600 s) before the routes moved; they never came (no room until the candidate is retired),
    the rollback failed and the candidate kept its traffic (inside the failure callback's time
    limit, the wait could get it killed before it reported). The traffic goes back once one of its
    pods is ready, as under autoscaling; the candidate is retired, then the rest are waited for
    (not by the failure callback, which leaves the candidate loaded)."""
    from devstack.cluster import kube as fake_kube
    from vision_rollout.deploy import VersionDeployments

    at_stage_1(kube)
    kube.scale("models", "digits-v1", 0, "keda")
    steps.serving().deployments("digits").scale("2", 2)  # the candidate's pods, that serve now
    room = 3  # pods the cluster has room for: the candidate's 2 and one more
    all_ready, wait_ready = fake_kube._ready_status, VersionDeployments.wait_ready

    def scheduled(obj: dict) -> dict:  # (the pods there is room for run)
        others = sum(
            d["spec"].get("replicas", 1)
            for (p, _, n), d in kube.objects.items()
            if p == "deployments" and n != obj["metadata"]["name"]
        )
        status = all_ready(obj)
        status["readyReplicas"] = status["availableReplicas"] = min(status["replicas"], max(room - others, 0))
        return status

    def short_wait(self, version, replicas=1, **kwargs):  # (each wait's 600 s: 2 s here)
        if version == "1":  # the scheduler places its pods where the room is, once there is room
            kube.touch("deployments", "models", "digits-v1", lambda d: d.update(status=scheduled(d)))
        return wait_ready(self, version, replicas, **{**kwargs, "timeout_s": 2.0, "every_s": 0.2})

    monkeypatch.setattr(fake_kube, "_ready_status", scheduled)
    monkeypatch.setattr(VersionDeployments, "wait_ready", short_wait)
    since = len(kube.requests)
    steps.restore_stable(PARAMS, "run-1", unload_candidate=end == "rollback")
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == 2
    if end == "rollback":
        assert deployment(kube, "2")["spec"]["replicas"] == 0
        assert deployment(kube, "1")["status"]["readyReplicas"] == 2  # (the rest, once the candidate left room)
        done = calls(kube, since)
        routed = max(i for i, call in enumerate(done) if call == ("PATCH", "virtualservices/digits"))
        assert routed < done.index(("PATCH", "deployments/digits-v2"))
    else:
        assert deployment(kube, "2")["spec"]["replicas"] == 2  # (left loaded)


def valid_deployment(obj: dict) -> bool:
    """The kubernetes client's V1Deployment round-trips it (it writes the timestamp's Z as +00:00)."""
    from kubernetes import client

    api = client.ApiClient()
    timeless = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "creationTimestamp"}}
    return bool(api.sanitize_for_serialization(api._ApiClient__deserialize(timeless, "V1Deployment")) == timeless)


def test_a_pod_has_what_the_evidence_needs(kube, monkeypatch, tmp_path):
    """The prediction log on object storage, its credentials, and the keys every replica shares
    (feedback tokens, masking), each from a Secret mounted read-only where the server reads it."""

    from model_server.__main__ import parse_args

    log = "s3://ml-predictions/digits?region=eu-west-1"
    connect(monkeypatch, tmp_path, {"prediction_log": log}, storage_secret="predictions-s3")
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    obj = deployment(kube, "2")
    assert valid_deployment(obj)
    pod = obj["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = parse_args(container["args"])
    assert args.prediction_log == log
    assert container["envFrom"] == [{"secretRef": {"name": "predictions-s3"}}]  # AWS_* for the log's S3 client
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path, secret, key in (
        (args.feedback_key_file, "model-server-feedback", "key"),
        (args.mask_keys, "model-server-masking", "mask-keys.json"),
    ):
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        assert path.name == key
        assert volumes[mount["name"]]["secret"]["secretName"] == secret
        assert volumes[mount["name"]]["secret"]["items"] == [{"key": key, "path": key}]
    assert pod["securityContext"]["fsGroup"] == 10001  # the image's user reads the Secrets' files
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    # Without a storage Secret (credentials from the node's or the pod's identity): no envFrom.
    connect(monkeypatch, tmp_path, {"prediction_log": log})
    kube.remove("deployments", "models", "digits-v2")  # a live Deployment would keep its own template
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    assert "envFrom" not in deployment(kube, "2")["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture
def fleet(kube, monkeypatch, tmp_path, models_dir):
    """One connection for every model: {model} in the connection-wide sections; a repository of
    two models (digits, and its files again as mnist)."""
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / "digits").symlink_to(models_dir / "digits", target_is_directory=True)
    (repository / "mnist").mkdir()
    for part in ("1", "2", "3", "validation"):  # (copies: a version linked out of its folder is refused)
        shutil.copytree(models_dir / "digits" / part, repository / "mnist" / part)
    shutil.copy(models_dir / "digits" / "labels.txt", repository / "mnist")
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
    """Every call after ``since`` that is not a read, a dry run or a refused attempt to take a lease."""
    return [r for r in kube.requests[since:] if r["method"] != "GET" and r.get("status") != 409 and not dry_run(r)]


def test_a_second_run_of_a_model_is_refused_and_another_models_run_proceeds(fleet):
    built = steps.build_image(PARAMS, "run-a")
    assert built["build"]["image"].startswith("registry.example.com/ml/digits-server:")  # the model's own build
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
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
    assert "nothing restored" in steps.ensure_stable({**PARAMS, "candidate_version": "3"}, "run-b", None, None, None)
    steps.restore_stable_on_failure({"params": {**PARAMS, "candidate_version": "3"}, "run_id": "run-b"})
    assert changes(fleet, before) == []
    assert routes(fleet) == [("v1", 90), ("v2", 10)]
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-a"

    mnist = {**PARAMS, "model": "mnist"}  # another model: its own lease, VirtualService, image
    built = steps.build_image(mnist, "run-c")
    assert built["build"]["image"].startswith("registry.example.com/ml/mnist-server:")
    steps.deploy_candidate(mnist, pushed(built), "run-c")
    steps.apply_weights(mnist, 0, "run-c", built)
    assert routes(fleet, "mnist") == [("v1", 90), ("v2", 10)]
    assert lease(fleet, "mnist")["spec"]["holderIdentity"] == "run-c"

    # run-a ends: stable back, its lease released; the model is free for the next run.
    assert steps.ensure_stable(PARAMS, "run-a", None, "1", SENT).startswith("version 1 takes 100%")
    assert routes(fleet) == [("v1", 100)]
    assert lease(fleet, "digits") is None
    assert routes(fleet, "mnist") == [("v1", 90), ("v2", 10)]  # the other model's rollout goes on
    steps.build_image(PARAMS, "run-b")
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-b"


def test_a_run_whose_run_dir_ignores_conditional_writes_is_refused_before_touching_anything(fleet, s3, monkeypatch):
    """A run_dir in an S3 store that ignores ``If-Match`` and ``If-None-Match`` (an older MinIO,
    some gateways) let two writers of a stage's record both win, unseen, and the rollout ran on.
    Its first task now refuses the run naming the store and what it ignores: no lease taken,
    nothing written to the cluster."""
    from tests.support.s3proxy import s3_proxy

    connection = json.loads(os.environ["AIRFLOW_CONN_MODEL_SERVER_DEFAULT"])
    with s3_proxy(s3.port) as proxy:
        proxy.ignore_conditions = True
        connection["extra"]["run_dir"] = proxy.uri(s3.bucket, uuid.uuid4().hex[:12])
        monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(connection))
        before = len(fleet.requests)
        with pytest.raises(
            AirflowFailException,
            match=rf"run_dir: the object store at http://127.0.0.1:{proxy.port} .* ignores S3's conditional "
            r"writes.*This run touched nothing",
        ):
            steps.build_image(PARAMS, "run-a")
    assert changes(fleet, before) == []
    assert lease(fleet, "digits") is None


def test_a_run_whose_lease_was_taken_over_stops_before_touching_anything(fleet):
    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    # run-a stalls past its lease (a crashed worker); run-b takes the model over.
    fleet.objects[("leases", "models", "rollout-digits")]["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"
    steps.deploy_candidate(
        {**PARAMS, "candidate_version": "3"},
        pushed(steps.build_image({**PARAMS, "candidate_version": "3"}, "run-b")),
        "run-b",
    )
    steps.apply_weights({**PARAMS, "candidate_version": "3"}, 0, "run-b", built)
    assert routes(fleet) == [("v1", 90), ("v3", 10)]
    before = len(fleet.requests)
    with pytest.raises(AirflowFailException, match=r"run 'run-a' does not hold model 'digits': run 'run-b'"):
        steps.apply_weights(PARAMS, 1, "run-a", {"decision": "pass"})
    with pytest.raises(AirflowFailException, match="run 'run-a' does not hold model 'digits'"):
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-a")
    assert "nothing restored" in steps.ensure_stable(PARAMS, "run-a", None, None, None)
    assert changes(fleet, before) == []
    assert routes(fleet) == [("v1", 90), ("v3", 10)]


def test_a_run_whose_lease_was_deleted_mid_run_takes_it_again_and_puts_the_stable_version_back(fleet, caplog):
    """The Lease deleted mid-run (an operator's cleanup): the next step failed with LockLost, and
    the teardown and the failure callback restored nothing, the canary keeping its 10% with
    nobody left to restore it. Now the run takes the lease again (nobody holds it, and its run
    folder says it held it and had not released it), marked aborted: the step fails, the
    teardown puts version 1 back and releases it; the failure callback after it touches nothing."""
    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    del fleet.objects[("leases", "models", "rollout-digits")]
    with pytest.raises(
        AirflowFailException, match=r"aborted: the model's lease \(Lease models/rollout-digits\) was removed"
    ):
        steps.apply_weights(PARAMS, 1, "run-a", {"decision": "pass"})
    assert routes(fleet) == [("v1", 90), ("v2", 10)]
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-a"
    with pytest.raises(AirflowFailException, match="version 1 takes 100%"):
        steps.ensure_stable(PARAMS, "run-a", None, None, None)
    assert routes(fleet) == [("v1", 100)]
    assert lease(fleet, "digits") is None
    before = len(fleet.requests)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-a"})  # released: not taken again
    assert changes(fleet, before) == []
    assert lease(fleet, "digits") is None


def test_a_run_whose_lapsed_lease_another_run_took_over_and_ended_does_not_take_it_again(fleet):
    """run-a stalls past its lease; run-b takes the model over, promotes and ends, its lease
    released: run-a finds nobody holding it, but its own last renewal has run out (another run
    may have had it meanwhile), so it touches nothing: run-b's promotion stays."""
    from vision_rollout.locks import held_record

    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    expire(fleet)
    lapsed = steps.serving().model_lock("digits", "istio").holding()
    steps.serving().settings.workdir("digits", "run-a").write(HELD, held_record("run-a", lapsed))
    b = {**PARAMS, "candidate_version": "3"}
    steps.deploy_candidate(b, pushed(steps.build_image(b, "run-b")), "run-b")
    fleet.objects[("virtualservices", "models", "digits")]["spec"]["http"][-1]["route"] = [
        {"destination": {"host": "digits", "subset": "v3"}, "weight": 100}
    ]  # (run-b promoted)
    steps.finish(b, "run-b", promoted=True)
    assert lease(fleet, "digits") is None
    before = len(fleet.requests)
    with pytest.raises(AirflowFailException, match="run 'run-a' does not hold model 'digits': nobody holds it"):
        steps.apply_weights(PARAMS, 1, "run-a", {"decision": "pass"})
    assert "nothing restored" in steps.ensure_stable(PARAMS, "run-a", None, None, None)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-a"})
    assert changes(fleet, before) == []
    assert routes(fleet) == [("v3", 100)]


def expire(kube: FakeKubeAPI, model: str = "digits") -> None:
    """The model's lease not renewed for longer than it lasts (a scheduler restart, pods Pending)."""
    kube.objects[("leases", "models", f"rollout-{model}")]["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"


def test_a_refused_takeover_gives_the_lease_back_to_the_run_it_took_it_from(fleet):
    """run-a at 50% while its lease lapsed; run-b takes it over, finds routes it may not restore
    (50%: which was the baseline cannot be told) and is refused, touching nothing: the lease goes
    back to run-a as it was (it was deleted: run-a could neither promote nor roll back, and the
    routes stayed at 50% with nobody holding the model)."""
    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    steps.apply_weights(PARAMS, 1, "run-a", {"decision": "pass"})
    assert routes(fleet) == [("v1", 50), ("v2", 50)]
    expire(fleet)
    before = len(fleet.requests)
    with pytest.raises(AirflowFailException, match="touched nothing"):
        steps.build_image({**PARAMS, "candidate_version": "3"}, "run-b")
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-a"
    assert [c for c in changes(fleet, before) if "/leases/" not in c["path"]] == []
    steps.restore_stable(PARAMS, "run-a")  # run-a, late, rolls back
    assert routes(fleet) == [("v1", 100)]
    steps.ensure_stable(PARAMS, "run-a", None, "1", SENT)
    assert lease(fleet, "digits") is None


def test_a_takeover_retires_the_candidate_of_the_run_it_took_over(fleet):
    """run-b takes over run-a's lapsed lease at 10%: the routes back to the baseline, then run-a's
    candidate drained and scaled to 0 (its pods were left running for good: nobody's run)."""
    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    assert deployment(fleet, "2")["spec"]["replicas"] > 0
    expire(fleet)
    b = {**PARAMS, "candidate_version": "3"}
    steps.build_image(b, "run-b")
    assert routes(fleet) == [("v1", 100)]
    assert deployment(fleet, "2")["spec"]["replicas"] == 0
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-b"
    assert "nothing restored" in steps.ensure_stable(PARAMS, "run-a", None, None, None)  # run-a's teardown


def lapsed_at_stage_1_with_the_baseline_at_0(fleet: FakeKubeAPI) -> int:
    """run-a at 10% while its lease lapsed, version 1 at 0 pods (another writer's scale, or a
    restore whose scale from 0 failed): the pods version 2, its candidate, runs."""
    from kubernetes import client

    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    apps = client.AppsV1Api(steps.serving().deployments("digits")._apps().api_client)
    apps.patch_namespaced_deployment_scale(
        "digits-v1", "models", {"spec": {"replicas": 0}}, field_manager="model-rollout"
    )
    assert routes(fleet) == [("v1", 90), ("v2", 10)]
    expire(fleet)
    return int(deployment(fleet, "2")["spec"]["replicas"])


def test_a_takeover_scales_a_baseline_at_0_back_before_it_moves_the_routes_to_it(fleet):
    """run-b takes over run-a's lapsed lease at 10%, version 1 at 0 pods: it moved 100% to version
    1 at once, with no pods to serve it (what the failure callback refuses, as Argo Rollouts'
    dynamicStableScale scales the stable version up before it shifts traffic). It scales version 1
    back first, as a restore does (to the pods that serve now, the build's count at least), waits
    for its pods, then moves the routes and retires run-a's candidate."""
    serving = lapsed_at_stage_1_with_the_baseline_at_0(fleet)
    before = len(fleet.requests)
    steps.build_image({**PARAMS, "candidate_version": "3"}, "run-b")
    assert routes(fleet) == [("v1", 100)]
    pods = max(steps.serving().deployments("digits").build.replicas, serving)
    assert deployment(fleet, "1")["spec"]["replicas"] == pods
    assert deployment(fleet, "1")["status"]["readyReplicas"] == pods
    written = [c for c in calls(fleet, before) if c[0] in ("PATCH", "PUT") and "leases/" not in c[1]]
    scaled = written.index(("PATCH", "deployments/digits-v1"))
    assert scaled < written.index(("PATCH", "virtualservices/digits"))  # (its pods first, then the traffic)
    assert deployment(fleet, "2")["spec"]["replicas"] == 0  # (run-a's candidate retired)
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-b"


def test_a_takeover_whose_scale_of_a_baseline_at_0_is_refused_leaves_the_routes_and_says_what_to_do(fleet):
    """As above, version 1's scale refused (403): the routes stay as they are (version 2 keeps its
    10%, no traffic moved to a version with no pods), run-b fails saying why and what to do by hand,
    and gives the lease back to run-a, touching nothing else."""
    from devstack.cluster.kube import APIError

    lapsed_at_stage_1_with_the_baseline_at_0(fleet)
    forbidden = APIError(403, "Forbidden", "cannot patch deployments")  # (its Role: neither apply nor scale)
    refuse(fleet, ("PATCH", "/deployments/digits-v1", forbidden), ("PATCH", "/deployments/digits-v1/scale", forbidden))
    with pytest.raises(AirflowFailException) as failed:
        steps.build_image({**PARAMS, "candidate_version": "3"}, "run-b")
    fleet.before_write = None
    said = str(failed.value)
    assert "403" in said
    assert "the routes are left as they are: version 2" in said
    assert "version 1, the baseline, has no pods and was not scaled back to 2 pods from 0" in said
    assert "no traffic is moved to a version with no pods" in said
    assert steps.serving().deployments("digits").scale_by_hand("1", 2) in said
    assert "then trigger the run again" in said
    assert routes(fleet) == [("v1", 90), ("v2", 10)]
    assert deployment(fleet, "1")["spec"]["replicas"] == 0
    assert deployment(fleet, "2")["spec"]["replicas"] > 0  # (not retired)
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-a"


def no_pod_of_version_1_ready(kube: FakeKubeAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 1's pods never ready (crash-looping, Pending), however many it runs; each wait for
    them ends at once (deploy's clock moved on by each of its sleeps)."""
    import time
    from types import SimpleNamespace

    from devstack.cluster import kube as fake_kube
    from vision_rollout import deploy

    all_ready = fake_kube._ready_status

    def never_ready(obj: dict) -> dict:
        status = all_ready(obj)
        if obj["metadata"]["name"] == "digits-v1":
            status["readyReplicas"] = status["availableReplicas"] = 0
        return status

    monkeypatch.setattr(fake_kube, "_ready_status", never_ready)
    kube.touch("deployments", "models", "digits-v1", lambda d: d.update(status=never_ready(d)))
    now = [0.0]
    clock = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    clock.monotonic, clock.sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    monkeypatch.setattr(deploy, "time", clock)


def takeover_left(fleet: FakeKubeAPI, run_id: str, kind: type[Exception] = AirflowFailException, **kwargs) -> str:
    """``run_id`` takes run-a's lapsed lease over at 10% and is refused: the routes left as they
    were, run-a's candidate not retired, the lease given back to run-a. What it said."""
    expire(fleet)
    with pytest.raises(kind) as failed:
        steps.build_image({**PARAMS, "candidate_version": "3"}, run_id, **kwargs)
    assert routes(fleet) == [("v1", 90), ("v2", 10)]
    assert deployment(fleet, "2")["spec"]["replicas"] > 0  # (not retired)
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-a"
    said = str(failed.value)
    assert "the routes are left as they are: version 2" in said
    return said


def test_a_takeover_moves_no_traffic_to_a_baseline_whose_pods_are_not_ready(fleet, monkeypatch):
    """run-b takes over run-a's lapsed lease at 10%, version 1 running pods none of which is
    ready: it moved 100% to version 1 at once (its count not 0, nothing waited for), then retired
    run-a's candidate, the only version serving. As a restore, it waits for one of version 1's
    pods; none ready, the routes stay, and it says so, without advice to scale what runs pods."""
    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    no_pod_of_version_1_ready(fleet, monkeypatch)
    said = takeover_left(fleet, "run-b")
    assert "version 1, the baseline, has no ready pod: it runs 1 pod, not ready" in said
    assert "0 of 1 pod ready" in said
    assert "scale version 1 up" not in said
    assert "once one of its pods is ready, trigger the run again" in said
    assert deployment(fleet, "1")["spec"]["replicas"] == 1  # (not scaled)


def test_a_takeover_tried_again_after_its_baseline_was_scaled_back_waits_for_its_pods_again(fleet, monkeypatch):
    """run-b's takeover scales version 1 back from 0, none of its pods ready: refused, the routes
    left. Triggered again (run-c), version 1's count is not 0: it moved 100% there without a wait.
    It waits again, and is refused again; neither says to scale what was scaled."""
    lapsed_at_stage_1_with_the_baseline_at_0(fleet)
    no_pod_of_version_1_ready(fleet, monkeypatch)
    said = takeover_left(fleet, "run-b")
    assert "has no ready pod: it was scaled back to 2 pods from 0, none of them ready" in said
    assert "scale version 1 up" not in said
    assert deployment(fleet, "1")["spec"]["replicas"] == 2
    said = takeover_left(fleet, "run-c")
    assert "has no ready pod: it runs 2 pods, none of them ready" in said
    assert "scale version 1 up" not in said


def test_a_takeover_to_a_baseline_without_a_deployment_leaves_the_routes(fleet):
    """Version 1's Deployment deleted while run-a's lease lapsed at 10%: run-b moved 100% to
    no pods. It is refused as a restore is, the routes left as they are."""
    lapsed_at_stage_1_with_the_baseline_at_0(fleet)
    del fleet.objects[("deployments", "models", "digits-v1")]
    said = takeover_left(fleet, "run-b")
    assert "version 1 has no Deployment: the routes stay as they are rather than sending traffic to no pods" in said


def test_a_takeover_whose_lease_is_taken_during_its_gate_fails_as_a_lost_lease(fleet, monkeypatch):
    """run-b takes over run-a's lapsed lease at 10%, version 1 at 0 pods; before its renewal for
    the wait for version 1's pods, run-c takes the lease. The lost lease (AirflowFailException,
    as every step says it) was caught as the gate's refusal of a baseline without a Deployment:
    "the routes are left as they are: version 2 (the candidate of the run whose lease this run took
    over) keeps its share: run 'run-b' does not hold model 'digits' ...". It passes through as it
    is; nothing is scaled or routed, and run-c keeps the lease."""
    from vision_rollout.deploy import VersionDeployments

    lapsed_at_stage_1_with_the_baseline_at_0(fleet)
    read = VersionDeployments.deployment

    def taken_meanwhile(self, version):  # (the gate's read of version 1, just before its renewal)
        fleet.touch("leases", "models", "rollout-digits", lambda obj: obj["spec"].update(holderIdentity="run-c"))
        return read(self, version)

    monkeypatch.setattr(VersionDeployments, "deployment", taken_meanwhile)
    with pytest.raises(AirflowFailException) as failed:
        steps.build_image({**PARAMS, "candidate_version": "3"}, "run-b")
    said = str(failed.value)
    assert said.startswith("run 'run-b' does not hold model 'digits'"), said
    assert "the routes are left as they are" not in said
    assert routes(fleet) == [("v1", 90), ("v2", 10)]
    assert deployment(fleet, "1")["spec"]["replicas"] == 0
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-c"


def test_a_takeover_whose_read_of_the_baseline_is_refused_says_so_not_the_routes(fleet, monkeypatch):
    """The read of version 1's Deployment refused (403): it was said to be the routes that could
    not be read or set."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError

    lapsed_at_stage_1_with_the_baseline_at_0(fleet)

    def refused(self, version):
        raise RouterError(f"get deployments/digits-v{version}: 403 Forbidden")

    monkeypatch.setattr(VersionDeployments, "deployment", refused)
    said = takeover_left(fleet, "run-b")
    assert "cannot be read or set" not in said
    assert "version 1, the baseline, could not be read" in said
    assert "get deployments/digits-v1: 403 Forbidden" in said


def test_a_takeover_whose_wait_got_no_answer_is_retried_and_waits_again(fleet, monkeypatch):
    """run-b's wait for version 1's pods, scaled back from 0, got no answer: its kind kept for
    Airflow's retry, saying so. The retry found version 1's count not 0 and moved 100% to it,
    none of its pods ready, without a wait. It waits again, and the routes stay."""
    from vision_rollout import deploy, mesh

    lapsed_at_stage_1_with_the_baseline_at_0(fleet)
    no_pod_of_version_1_ready(fleet, monkeypatch)
    wait_ready, waits = deploy.VersionDeployments.wait_ready, []

    def unanswered_once(self, version, *args, **kwargs):
        waits.append(version)
        if len(waits) == 1:
            raise mesh.ApiUnreachable("the Kubernetes API server did not answer GET deployments/digits-v1")
        return wait_ready(self, version, *args, **kwargs)

    monkeypatch.setattr(deploy.VersionDeployments, "wait_ready", unanswered_once)
    said = takeover_left(fleet, "run-b", mesh.ApiUnreachable, retry_in_s=60)
    assert "did not answer" in said
    assert "Airflow retries this step" in said
    assert "scale version 1 up" not in said
    said = takeover_left(fleet, "run-b", AirflowFailException, retry_in_s=60)  # (Airflow's retry)
    assert waits == ["1", "1"]
    assert "has no ready pod: it runs 2 pods, none of them ready" in said


def promotion_cut_short(
    fleet: FakeKubeAPI,
    monkeypatch: pytest.MonkeyPatch,
    params: dict,
    raise_replicas: Callable[[], object] | None = None,
    floor: int | None = None,
) -> None:
    """Under autoscaling (the connection's ``build`` settings), version 1 applied at 2 pods, then
    ``raise_replicas`` (its HPA under load, another writer), run-a through its three stages (with
    ``floor``, version 1's HPA checked to hold it), and promote's worker killed where it would put
    version 1's floor back (``release_floor``): version 1 retired, its floor left held."""
    from vision_rollout.deploy import VersionDeployments

    conn = json.loads(os.environ["AIRFLOW_CONN_MODEL_SERVER_DEFAULT"])
    conn["extra"]["build"].update(autoscaling=True, max_replicas=40)
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    steps.serving().deployments("digits").apply("1", image("1"), replicas=2)
    if raise_replicas is not None:
        raise_replicas()
    built = steps.build_image(params, "run-a")
    steps.deploy_candidate(params, pushed(built), "run-a")
    for index in range(3):
        steps.apply_weights(params, index, "run-a", {"decision": "pass"})
    if floor is not None:
        assert hpa(fleet, "1")["spec"]["minReplicas"] == floor

    def killed(self, version):
        raise SystemExit("the worker is killed")

    with monkeypatch.context() as patched:
        patched.setattr(VersionDeployments, "release_floor", killed)
        with pytest.raises(SystemExit):
            steps.promote(params, "run-a", "promote")


def promotion_cut_short_at_4_pods(fleet: FakeKubeAPI, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``promotion_cut_short`` (no mirror) with version 1 touched to 4 pods (another writer) before
    the run: its floor held at them, checked. The params."""
    params = {**PARAMS, "mirror_percent": 0}
    promotion_cut_short(
        fleet,
        monkeypatch,
        params,
        lambda: fleet.touch("deployments", "models", "digits-v1", lambda d: d["spec"].update(replicas=4)),
    )
    assert hpa(fleet, "1")["metadata"].get("annotations")  # (the floor held)
    return params


def promotion_kept_by(end: str, params: dict, caplog: pytest.LogCaptureFixture) -> str:
    """Run-a's promotion (``promotion_cut_short``) kept by its teardown (``end`` "teardown":
    ensure_stable, which fails) or its failure callback (any other ``end``): what it said (the
    teardown's AirflowFailException, the callback's log)."""
    if end == "teardown":
        with pytest.raises(AirflowFailException) as failed:
            steps.ensure_stable(params, "run-a", None, None, None, decided="promote")
        return str(failed.value)
    steps.restore_stable_on_failure({"params": params, "run_id": "run-a"})
    return caplog.text


def promotion_kept_told(end: str, params: dict, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> tuple[str, str]:
    """``promotion_kept_by``, and the one report it left in the run's outbox: ``(report, said)``."""
    said = promotion_kept_by(end, params, caplog)
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "run" / "outbox").glob("*.json"))]
    return report, said


def test_a_floor_left_held_by_a_promotion_cut_short_is_released_by_the_run_that_takes_over(fleet, monkeypatch):
    """Under autoscaling, run-a's promotion retired version 1 and its worker died before it put
    version 1's HPA floor back; run-b took the lapsed lease over against version 2 and run-a's
    teardown, no longer holding the model, touched nothing: version 1's HPA kept the floor held
    (10 pods, not its own 2) for good, so a scale by hand brought back 10 GPU pods. The run that
    takes the model puts back every floor held on a version other than its baseline."""
    params = {**PARAMS, "mirror_percent": 0}
    promotion_cut_short(
        fleet,
        monkeypatch,
        params,
        lambda: fleet.scale("models", "digits-v1", 10, "kube-controller-manager"),  # its HPA, under load
        floor=10,
    )
    assert routes(fleet) == [("v2", 100)]
    assert deployment(fleet, "1")["spec"]["replicas"] == 0
    expire(fleet)
    b = {**params, "baseline_version": "2", "candidate_version": "3"}
    steps.build_image(b, "run-b")
    assert "nothing restored" in steps.ensure_stable(params, "run-a", "2", None, SENT)  # run-a's teardown
    assert (hpa(fleet, "1")["spec"]["minReplicas"], hpa(fleet, "1")["metadata"].get("annotations") or {}) == (2, {})
    assert deployment(fleet, "1")["spec"]["replicas"] == 0
    assert lease(fleet, "digits")["spec"]["holderIdentity"] == "run-b"


def test_a_floor_left_held_released_but_its_budget_not_updated_is_logged_as_released(fleet, monkeypatch, caplog):
    """As above, run-b releases the floor run-a's promotion left held on version 1: the HPA's apply
    is served (the floor released, its annotation gone), then its PodDisruptionBudget's calls get
    no answer. build_image logged "the HPA floors left held by runs that did not end were not
    released", though the floor was. It logs what happened: the floor released, the budget not
    updated, and what to set it to."""
    params = {**PARAMS, "mirror_percent": 0}
    promotion_cut_short(
        fleet,
        monkeypatch,
        params,
        lambda: fleet.scale("models", "digits-v1", 10, "kube-controller-manager"),  # its HPA, under load
    )
    expire(fleet)
    fleet.throttle, fleet.throttle_status = 10**6, None  # the budget's calls get no answer
    fleet.throttled_path = "/poddisruptionbudgets/digits-v1"
    steps.build_image({**params, "baseline_version": "2", "candidate_version": "3"}, "run-b")
    fleet.throttle = 0
    assert (hpa(fleet, "1")["spec"]["minReplicas"], hpa(fleet, "1")["metadata"].get("annotations") or {}) == (
        2,
        {"model-rollout/budget-pending": "2"},  # (the floor's record gone, the budget marked for the next run)
    )
    assert "were not released" not in caplog.text
    assert "the floor the run held on version 1 is released" in caplog.text
    assert "PodDisruptionBudget models/digits-v1 was not updated" in caplog.text
    assert "kubectl -n models patch poddisruptionbudget digits-v1 --type=merge" in caplog.text


@pytest.mark.parametrize("unanswered", [("1",), ("1", "2")])
def test_floors_left_held_are_all_released_though_a_budget_is_not_updated(kube, monkeypatch, tmp_path, unanswered):
    """Floors left held on versions 1 and 2 (runs that did not end), released by the next run
    (release_floors): version 1's PodDisruptionBudget's calls got no answer, and the
    BudgetNotApplied that release_floor raised stopped the loop, version 2's floor held (its
    HPA at 10 pods, not its own 2) until another run. Every floor is released, then one error
    names each budget not updated."""
    from vision_rollout.deploy import BudgetNotApplied, VersionDeployments
    from vision_rollout.mesh import RouterError

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    for version in ("1", "2"):
        deployments.apply(version, image(version), replicas=2)
        kube.scale("models", f"digits-v{version}", 10, "kube-controller-manager")  # its HPA, under load
        assert deployments.hold_floor(version) == 10
    apply_pdb = VersionDeployments._apply_pdb

    def unanswered_budget(self, version, replicas, **options):
        if version in unanswered:
            raise RouterError(f"apply PodDisruptionBudget digits-v{version}: the Kubernetes API server did not answer")
        apply_pdb(self, version, replicas, **options)

    monkeypatch.setattr(VersionDeployments, "_apply_pdb", unanswered_budget)
    with pytest.raises(BudgetNotApplied) as failed:
        deployments.release_floors(keep=None)
    for version in ("1", "2"):
        assert (hpa(kube, version)["spec"]["minReplicas"], hpa(kube, version)["metadata"].get("annotations") or {}) == (
            2,
            {"model-rollout/budget-pending": "2"} if version in unanswered else {},  # (marked for the next run)
        )
    said = str(failed.value)
    for version in ("1", "2"):
        named = f"PodDisruptionBudget models/digits-v{version} was not updated" in said
        assert named == (version in unanswered)
        assert (f"the floor the run held on version {version} is released" in said) == (version in unanswered)


@pytest.mark.parametrize("budget", ["updated", "unanswered"])
def test_floors_left_held_are_all_released_though_one_hpa_apply_is_refused(kube, monkeypatch, tmp_path, budget):
    """Floors left held on versions 1, 2 and 3, released by the next run (release_floors): version
    1's HPA apply was refused (403, a plain error, not a budget's), and the loop stopped there,
    versions 2 and 3 held until another run. Each version's release is tried; the errors are raised
    together, each naming its version (with version 2's budget not updated, where it is not)."""
    from devstack.cluster.kube import APIError
    from vision_rollout.deploy import BudgetNotApplied, VersionDeployments
    from vision_rollout.mesh import RouterError

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    for version in ("1", "2", "3"):
        deployments.apply(version, image(version), replicas=2)
        kube.scale("models", f"digits-v{version}", 10, "kube-controller-manager")  # its HPA, under load
        assert deployments.hold_floor(version) == 10
    apply_pdb = VersionDeployments._apply_pdb

    def unanswered_budget(self, version, replicas, **options):
        if version == "2" and budget == "unanswered":
            raise RouterError("apply PodDisruptionBudget digits-v2: the Kubernetes API server did not answer")
        apply_pdb(self, version, replicas, **options)

    monkeypatch.setattr(VersionDeployments, "_apply_pdb", unanswered_budget)
    forbidden = APIError(403, "Forbidden", "cannot patch resource horizontalpodautoscalers")
    refuse(kube, ("PATCH", "/horizontalpodautoscalers/digits-v1", forbidden))
    with pytest.raises(RouterError) as failed:
        deployments.release_floors(keep=None)
    kube.before_write = None
    assert not isinstance(failed.value, BudgetNotApplied)  # (a floor still held: not only a budget)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 10  # still held
    for version in ("2", "3"):
        assert hpa(kube, version)["spec"]["minReplicas"] == 2
    said = str(failed.value)
    assert "the floor on version 1 was not released" in said
    assert "403" in said
    assert "kubectl -n models patch horizontalpodautoscaler digits-v1 --type=merge" in said
    assert ("PodDisruptionBudget models/digits-v2 was not updated" in said) == (budget == "unanswered")
    assert "the floor on version 2 was not released" not in said
    assert "the floor on version(s) 2, 3" in said if budget == "updated" else "the floor on version(s) 3" in said


def test_release_floors_stops_at_an_api_outage_and_names_each_version_not_released(kube, monkeypatch, tmp_path):
    """Floors left held on versions 1, 2 and 3, released by the next run (release_floors): the API
    server stopped answering as version 2's release began, and the loop went on to version 3 (and
    any budget pending besides), each paying its client's full retries against a server gone. After
    a call unanswered (``ApiUnreachable``) nothing more is tried: one ApiUnreachable names version 2
    and version 3 as not released, and version 1 as released; the next run releases the others."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import ApiUnreachable

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    for version in ("1", "2", "3"):
        deployments.apply(version, image(version), replicas=2)
        kube.scale("models", f"digits-v{version}", 10, "kube-controller-manager")  # its HPA, under load
        assert deployments.hold_floor(version) == 10
    release = VersionDeployments.release_floor
    began: list[int] = []

    def outage_from_version_2(self, version):
        if version == "2":
            began.append(len(kube.requests))
            kube.throttle, kube.throttle_status, kube.throttled_path = 10**6, None, None  # no answer to anything
        return release(self, version)

    monkeypatch.setattr(VersionDeployments, "release_floor", outage_from_version_2)
    with pytest.raises(ApiUnreachable) as failed:
        deployments.release_floors(keep=None)
    kube.throttle = 0
    (start,) = began
    assert [r["path"] for r in kube.requests[start:] if "digits-v3" in r["path"]] == []  # (not tried)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2
    for version in ("2", "3"):
        assert hpa(kube, version)["spec"]["minReplicas"] == 10  # still held
    said = str(failed.value)
    assert "the floor on version 2 was not released" in said
    assert "the floor on version(s) 3 not tried" in said
    assert "released whole: the floor on version(s) 1" in said
    monkeypatch.setattr(VersionDeployments, "release_floor", release)
    assert deployments.release_floors(keep=None).floors == ["2", "3"]  # the next run's


def test_release_floors_stops_where_a_budget_marks_clearing_got_no_answer(kube, monkeypatch, tmp_path):
    """Floors left held on versions 1, 2 and 3, released by the next run (release_floors): the API
    server stopped answering as version 2's HPA was to be cleared of its budget-pending mark (its
    floor released, its budget updated). ``_clear_budget_mark`` only logged it, and the loop went on
    to version 3, each call paying its client's full retries against a server gone. It stops there
    now, as after any call unanswered: one ApiUnreachable names version 3 as not tried and version
    2's mark as not cleared (it stays: the next run applies the pending budget and clears it)."""
    from vision_rollout.deploy import Released, VersionDeployments
    from vision_rollout.mesh import ApiUnreachable

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    for version in ("1", "2", "3"):
        deployments.apply(version, image(version), replicas=2)
        kube.scale("models", f"digits-v{version}", 10, "kube-controller-manager")  # its HPA, under load
        assert deployments.hold_floor(version) == 10
    clear = VersionDeployments._clear_budget_mark
    began: list[int] = []

    def outage_at_version_2s_mark(self, version, spec, done):
        if version == "2":
            began.append(len(kube.requests))
            kube.throttle, kube.throttle_status, kube.throttled_path = 10**6, None, None  # no answer to anything
        return clear(self, version, spec, done)

    monkeypatch.setattr(VersionDeployments, "_clear_budget_mark", outage_at_version_2s_mark)
    with pytest.raises(ApiUnreachable) as failed:
        deployments.release_floors(keep=None)
    kube.throttle = 0
    (start,) = began
    assert [r["path"] for r in kube.requests[start:] if "digits-v3" in r["path"]] == []  # (not tried)
    assert hpa(kube, "3")["spec"]["minReplicas"] == 10  # still held
    assert (hpa(kube, "2")["spec"]["minReplicas"], hpa(kube, "2")["metadata"].get("annotations") or {}) == (
        2,
        {"model-rollout/budget-pending": "2"},  # (the mark kept: safe, the next run applies the budget again)
    )
    said = str(failed.value)
    assert "the floor on version(s) 3 not tried" in said
    assert "version 2's HPA's mark of the budget pending is not cleared" in said
    assert "released whole: the floor on version(s) 1, 2" in said
    monkeypatch.setattr(VersionDeployments, "_clear_budget_mark", clear)
    assert deployments.release_floors(keep=None) == Released(["3"], ["2"])  # the next run's
    assert (hpa(kube, "2")["metadata"].get("annotations") or {}) == {}


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_kept_promotion_whose_floor_release_fails_is_reported_as_kept(fleet, monkeypatch, tmp_path, caplog, end):
    """Under autoscaling, promote's worker was killed after it retired version 1, before it put
    version 1's HPA floor back; the end keeps the promotion and releases that floor, and the
    release failed (the API server refused the HPA's apply): the teardown reported that it "could
    not put version 1 back", the routes not restored, and so did the failure callback, though
    version 2 was promoted and serves. The promotion is reported as kept, the floor's failure
    besides, the lease released. The failure callback only logged it: it reports it to Slack too,
    with what releases the floor and the HPA's name, as the teardown does."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError

    params = {**PARAMS, "mirror_percent": 0}
    promotion_cut_short(fleet, monkeypatch, params)

    def refused(self, version):
        raise RouterError("apply HorizontalPodAutoscaler digits-v1: 403 Forbidden: cannot patch")

    assert routes(fleet) == [("v2", 100)]
    monkeypatch.setattr(VersionDeployments, "release_floor", refused)
    said = promotion_kept_by(end, params, caplog)
    # (the teardown's of what it found; the callback's too: the floor held is a human's, review)
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "run" / "outbox").glob("*.json"))]
    assert report.startswith("digits v2 against v1 promoted: version 2 takes 100%")
    if end == "failure-callback":
        assert "its promotion is kept" in report
    for text in (report, said):
        assert "routes not restored" not in text
        assert "could not put version 1 back" not in text
        assert "version 2 was promoted" in text
        assert "403 Forbidden: cannot patch" in text
        # what releases the floor (clearing ensure_stable did nothing: the run had ended, review), and where it is
        assert "clear the run's ensure_stable" not in text
        assert "the model's next run releases it as it starts" in text
        assert "HorizontalPodAutoscaler models/digits-v1" in text
        assert "model-rollout/own-min-replicas" in text
        # (under the rollout's field manager: kubectl edit's would own minReplicas, the next hold refused)
        assert "remove the annotation" not in text
        assert "--field-manager=model-rollout" in text
    assert routes(fleet) == [("v2", 100)]
    assert lease(fleet, "digits") is None  # (released)


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_kept_promotion_whose_floor_is_released_but_its_budget_not_updated_is_reported_so(
    fleet, monkeypatch, tmp_path, caplog, end
):
    """As above, the end keeps the promotion and releases version 1's floor: the HPA's apply is
    served (the floor released, its annotation gone), then its PodDisruptionBudget's read and apply
    get no answer. That failure was reported as the HPA that "keeps the floor the run held", with
    the advice to remove an annotation already removed. It is reported as it is: the floor
    released, the budget not updated, named, with what it should be set to."""
    params = promotion_cut_short_at_4_pods(fleet, monkeypatch)
    fleet.throttle, fleet.throttle_status = 10**6, None  # the budget's calls get no answer
    fleet.throttled_path = "/poddisruptionbudgets/digits-v1"
    said = promotion_kept_by(end, params, caplog)
    fleet.throttle = 0
    # (the floor released, its record gone; the budget marked for the next run)
    assert hpa(fleet, "1")["metadata"].get("annotations") == {"model-rollout/budget-pending": "2"}
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "run" / "outbox").glob("*.json"))]
    assert report.startswith("digits v2 against v1 promoted: version 2 takes 100%")
    for text in (report, said):
        assert "version 2 was promoted" in text
        assert "keeps the floor the run held" not in text
        assert "remove the annotation" not in text
        assert "the floor the run held on version 1 is released" in text
        assert "PodDisruptionBudget models/digits-v1 was not updated" in text
        assert "kubectl -n models patch poddisruptionbudget digits-v1 --type=merge" in text
    assert routes(fleet) == [("v2", 100)]
    assert lease(fleet, "digits") is None  # (released)


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_kept_promotion_whose_floor_release_could_not_read_the_hpa_says_it_may_hold_the_floor(
    fleet, monkeypatch, tmp_path, caplog, end
):
    """As above, the end keeps the promotion and releases version 1's floor: the HPA's own read gets
    no answer. The report said the HPA "keeps the floor the run held", though nothing read it: it
    says the HPA may hold a floor the run held (the model's next run releases it), not that it does."""
    params = promotion_cut_short_at_4_pods(fleet, monkeypatch)
    fleet.throttle, fleet.throttle_status = 10**6, None  # the HPA's reads get no answer
    fleet.throttled_methods, fleet.throttled_path = frozenset({"GET"}), "/horizontalpodautoscalers/digits-v1"
    report, said = promotion_kept_told(end, params, caplog, tmp_path)
    fleet.throttle = 0
    assert hpa(fleet, "1")["spec"]["minReplicas"] == 4  # (still held: not read, not written)
    for text in (report, said):
        assert "version 2 was promoted" in text
        assert "keeps the floor the run held (" not in text
        assert "may hold a floor the run held (not read" in text
        assert "the model's next run releases it as it starts" in text
    assert routes(fleet) == [("v2", 100)]
    assert lease(fleet, "digits") is None  # (released)


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_kept_promotion_whose_floor_apply_is_refused_says_the_hpa_keeps_the_floor(
    fleet, monkeypatch, tmp_path, caplog, end
):
    """As above, the HPA read and its apply (the floor's release) refused by a policy webhook: the
    HPA was read, so the report says it keeps the floor the run held, with the command that
    releases it by hand, not that it may hold one. Told from a failed read by the error's own mark
    (``RouterError.release_by_hand``), not by matching its text."""

    params = promotion_cut_short_at_4_pods(fleet, monkeypatch)
    denied = webhook_denial()
    refuse(fleet, ("PATCH", "/horizontalpodautoscalers/digits-v1", denied))
    report, said = promotion_kept_told(end, params, caplog, tmp_path)
    fleet.before_write = None
    assert hpa(fleet, "1")["spec"]["minReplicas"] == 4  # (still held)
    for text in (report, said):
        assert "version 2 was promoted" in text
        assert "the HPA of version 1 (HorizontalPodAutoscaler models/digits-v1) keeps the floor the run held (" in text
        assert "(not read" not in text
        assert 'admission webhook "policy.example.com" denied the request' in text
        assert "the model's next run releases it as it starts" in text
        assert "--field-manager=model-rollout" in text
    assert routes(fleet) == [("v2", 100)]
    assert lease(fleet, "digits") is None  # (released)


def test_a_besides_record_is_removed_once_the_teardown_of_a_kept_promotion_releases_the_floor_whole(
    fleet, monkeypatch, tmp_path
):
    """As in promote (``floor_released``), an earlier try's record of a budget not updated
    (``besides_recorded``) is removed where the floor is released whole: the teardown of a kept
    promotion released version 1's floor itself (``release_floor``, its budget updated) and left
    the record, so the run's report said a budget not updated that is."""
    params = promotion_cut_short_at_4_pods(fleet, monkeypatch)
    spec, hook = steps.spec_from(params), steps.ModelServerHook()
    steps.besides_recorded(spec, "run-a", hook, "PodDisruptionBudget models/digits-v1 was not updated (earlier)")
    with pytest.raises(AirflowFailException, match="version 2 was promoted"):  # (promote did not finish)
        steps.ensure_stable(params, "run-a", None, None, None, decided="promote")
    assert not hpa(fleet, "1")["metadata"].get("annotations")  # (the floor released, its budget updated)
    assert steps.besides_of(spec, "run-a") == []
    reports = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "run" / "outbox").glob("*.json"))]
    assert not any("was not updated" in report for report in reports)
    assert routes(fleet) == [("v2", 100)]


def test_a_takeover_refused_after_it_put_the_routes_back_releases_the_floor_it_found_held(fleet, monkeypatch):
    """Under autoscaling, run-a held version 1's HPA floor at 10% when its lease lapsed; run-b
    took the model over, put the routes back to version 1 and retired run-a's candidate, then was
    refused (its artifact missing) and let the model go: version 1's floor stayed held (10 pods,
    not its own 2) with nobody's run to put it back. The rollback run-b finished ends as any
    rollback: the floor released."""
    conn = json.loads(os.environ["AIRFLOW_CONN_MODEL_SERVER_DEFAULT"])
    conn["extra"]["build"].update(autoscaling=True, max_replicas=40)
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps(conn))
    steps.serving().deployments("digits").apply("1", image("1"), replicas=2)
    fleet.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load
    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    assert hpa(fleet, "1")["spec"]["minReplicas"] == 10
    expire(fleet)
    with pytest.raises(AirflowFailException, match="candidate artifact refused"):
        steps.build_image({**PARAMS, "candidate_version": "9"}, "run-b")
    assert routes(fleet) == [("v1", 100)]
    assert deployment(fleet, "2")["spec"]["replicas"] == 0
    assert lease(fleet, "digits") is None
    assert (hpa(fleet, "1")["spec"]["minReplicas"], hpa(fleet, "1")["metadata"].get("annotations") or {}) == (2, {})


@pytest.mark.real_pauses  # (the Retry-After waited)
def test_a_rollback_goes_through_an_api_server_that_throttles(fleet):
    """API Priority and Fairness refuses what it has no seat for (429, Retry-After): a rollback
    under that load is sent again after the wait, reads and writes alike (it failed at the
    first 429, and its teardown's and callback's tries seconds later met the same load)."""
    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    before = len(fleet.requests)
    fleet.throttle = 3
    steps.restore_stable(PARAMS, "run-a")  # its first reads refused
    refused = [r for r in fleet.requests[before:] if r.get("status") == 429]
    assert len(refused) == 3
    assert fleet.requests[before + 3]["path"] == refused[0]["path"]  # the same request, once more
    assert routes(fleet) == [("v1", 100)]
    assert deployment(fleet, "2")["spec"]["replicas"] == 0
    steps.apply_weights(PARAMS, 0, "run-a", built)  # again, its writes refused this time
    before = len(fleet.requests)
    fleet.throttle, fleet.throttled_methods = 2, frozenset({"PATCH"})
    steps.restore_stable(PARAMS, "run-a")
    writes = [(r["path"], r["status"]) for r in fleet.requests[before:] if r["method"] == "PATCH"]
    assert [status for _, status in writes[:3]] == [429, 429, 200]
    assert len({path for path, _ in writes[:3]}) == 1
    assert routes(fleet) == [("v1", 100)]


def test_a_read_the_api_server_failed_is_sent_again_and_a_write_is_read_back_first(fleet):
    """A 500 (etcd timing out under the API server) on a read failed the rollback at once; a read
    is now sent again after a backoff. A write that may have been served is not sent again as it
    was: the object is read back, and the write made again from what was read (here, not served:
    the rollback goes through)."""
    built = steps.build_image(PARAMS, "run-a")
    steps.deploy_candidate(PARAMS, pushed(built), "run-a")
    steps.apply_weights(PARAMS, 0, "run-a", built)
    before = len(fleet.requests)
    fleet.throttle, fleet.throttle_status, fleet.throttled_methods = 2, 500, frozenset({"GET"})
    steps.restore_stable(PARAMS, "run-a")
    failed = [r for r in fleet.requests[before:] if r.get("status") == 500]
    assert len(failed) == 2
    assert fleet.requests[before + 2]["path"] == failed[0]["path"]  # the same read, once more
    assert routes(fleet) == [("v1", 100)]
    steps.apply_weights(PARAMS, 0, "run-a", built)
    before = len(fleet.requests)
    fleet.throttle, fleet.throttled_methods = 1, frozenset({"PATCH"})
    steps.restore_stable(PARAMS, "run-a")
    calls = [
        (r["method"], r["status"]) for r in fleet.requests[before:] if r["path"].endswith("/virtualservices/digits")
    ]
    assert calls[calls.index(("PATCH", 500)) :][:3] == [("PATCH", 500), ("GET", 200), ("PATCH", 200)]
    assert routes(fleet) == [("v1", 100)]


VS_PATH = "/virtualservices/digits"


def at_stage_1(kube) -> None:
    """The stable routes, run-1 holding the model, the candidate's Deployment, stage 1's weights."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})


def at_stage_1_autoscaled(kube, monkeypatch, tmp_path, peak: int) -> dict:
    """Under autoscaling, the stable routes, run-1 holding the model, version 1 at 2 pods scaled by
    its HPA to ``peak``, the candidate deployed, stage 1's weights (its floor held at the peak):
    the params (no mirror)."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=2)
    kube.scale("models", "digits-v1", peak, "kube-controller-manager")  # the HPA at a peak
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    return params


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_a_stages_lease_renewal_answered_500_once_is_read_back_not_a_failed_step(kube, served):
    """Stage 2's renewal of the run's lease (a replace carrying the resourceVersion read) answered
    500 once failed the step (LockError), and the run rolled back; its first body sent again would
    have been refused (409), the run's own renewal taken for another run's. The lease is read
    back (still this run's) and renewed again from what was read; the stage's weights move."""
    at_stage_1(kube)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 1, 500, frozenset({"PUT"})
    kube.throttled_path, kube.throttle_served = "/leases/rollout-digits", served
    before = len(kube.requests)
    steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    puts = [(r["status"], r.get("served")) for r in kube.requests[before:] if r["method"] == "PUT"]
    assert puts[:2] == [(500, 500 if served else None), (200, None)]
    assert routes(kube) == [("v1", 50), ("v2", 50)]
    assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-1"


def test_a_lease_renewal_in_doubt_that_commits_late_is_renewed_again_not_taken_for_lost(kube):
    """Stage 2's renewal answered 504 (a proxy's timeout) and committed late, after the read-back
    read the lease: the retry's replace, carrying the resourceVersion read, was refused (409) and
    taken for the lease lost, and the healthy run failed for good ("run 'run-1' does not hold
    model 'digits': run 'run-1' (...) holds it"). A refused swap reads the lease again: still this
    run's, it is renewed from that read; the stage's weights move."""
    at_stage_1(kube)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 1, 504, frozenset({"PUT"})
    kube.throttled_path = "/leases/rollout-digits"
    puts = []

    def late_commit() -> None:  # before each write until the renewal's second replace
        if kube.requests[-1]["method"] == "PUT" and kube.requests[-1]["path"].endswith("/leases/rollout-digits"):
            puts.append(kube.requests[-1])
            if len(puts) == 2:  # the first one's commit lands first, the holder as it was
                kube.touch("leases", "models", "rollout-digits", lambda lease: None)
                return
        kube.before_write = late_commit

    kube.before_write = late_commit
    before = len(kube.requests)
    steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    kube.before_write = None
    lease_puts = [r["status"] for r in kube.requests[before:] if r["method"] == "PUT" and "/leases/" in r["path"]]
    assert lease_puts[:3] == [504, 409, 200]
    assert routes(kube) == [("v1", 50), ("v2", 50)]
    assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-1"


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_a_stages_candidate_scaling_answered_500_once_is_read_back_not_rolled_back(kube, served):
    """Stage 2's apply of the candidate's Deployment at the stage's size answered 500 once (served
    or not: the answer does not say) failed the step, and the run rolled back. It is read back
    and applied again from what was read (the rollout's own fields: the same again where it was
    served); the stage's weights move."""
    from vision_rollout.deploy import IMAGE_ANNOTATION

    at_stage_1(kube)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 1, 500, frozenset({"PATCH"})
    kube.throttled_path, kube.throttle_served = "/deployments/digits-v2", served
    before = len(kube.requests)
    steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    failed = [r for r in kube.requests[before:] if r["status"] == 500]
    assert [(r["path"].rpartition("/")[2], r["query"].get("dryRun"), r.get("served")) for r in failed] == [
        ("digits-v2", None, 500 if served else None)  # the apply itself, not its dry run
    ]
    assert routes(kube) == [("v1", 50), ("v2", 50)]
    sized = steps.candidate_size(RolloutSpec.from_dict(PARAMS), 50, steps.ModelServerHook().deployments("digits"))
    assert deployment(kube, "2")["spec"]["replicas"] == sized
    assert deployment(kube, "2")["metadata"]["annotations"][IMAGE_ANNOTATION] == image("2")


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_a_stages_virtualservice_write_answered_500_once_is_read_back_not_rolled_back(kube, served):
    """Stage 2's VirtualService apply answered 500 once (etcd timing out: served or not, the
    answer does not say; the client does not send a write again) failed the step, and the run
    rolled back a healthy candidate. The VirtualService is read back: the stage's weights in
    place (served), done; else applied again from what was read. The stage goes on."""
    at_stage_1(kube)
    before = len(kube.requests)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 1, 500, frozenset({"PATCH"})
    kube.throttled_path, kube.throttle_served = VS_PATH, served
    applied = steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    assert applied["weight"] == 50
    assert routes(kube) == [("v1", 50), ("v2", 50)]
    calls = [(r["method"], r["status"], r.get("served")) for r in kube.requests[before:] if r["path"].endswith(VS_PATH)]
    failed = calls.index(("PATCH", 500, 500 if served else None))
    assert calls[failed + 1][:2] == ("GET", 200)  # read back
    assert calls[failed + 2 :] == ([] if served else [("PATCH", 200, None)])  # written again only when not in place


def test_a_stages_virtualservice_write_answered_500_each_time_fails_naming_the_call(kube):
    """The API server failing the VirtualService's apply at each try: the step fails, as before,
    naming the call, the answer and the tries, the weights not moved."""
    from vision_rollout.mesh import WRITE_TRIES, ApiFailed

    at_stage_1(kube)
    before = len(kube.requests)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 100, 500, frozenset({"PATCH"})
    kube.throttled_path = VS_PATH
    with pytest.raises(ApiFailed) as failed:
        steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    said = str(failed.value)
    assert said.startswith(
        "apply virtualservices/digits: 500 Internal Server Error: Internal error occurred: etcdserver: request timed out"
    )
    assert f"(tried {WRITE_TRIES} times: each answer left unknown whether the write was served" in said
    patches = [r for r in kube.requests[before:] if r["method"] == "PATCH" and r["path"].endswith(VS_PATH)]
    assert len(patches) == WRITE_TRIES
    assert routes(kube) == [("v1", 90), ("v2", 10)]


def test_a_rollbacks_routes_read_the_api_server_failed_is_raised_not_taken_for_a_hand_edit(kube, monkeypatch):
    """``restore_stable`` reads the routes to know whether the candidate was routed. The API server
    failing that read (500 each time, the client's retries spent: ApiFailed) was taken for a
    VirtualService edited by hand ("put back to the stable version all the same"): version 1
    written at 100% over routes that sent the candidate nothing (the operator's version 3, a run
    refused before its first stage). It is raised as it came, as the other reads' failures
    (``TRANSIENT``) once read ``ROUTES_READ_TRIES`` times; only routes read and not the rollout's
    count as edited by hand."""
    from vision_rollout import mesh

    stable_virtual_service(kube, PARAMS, serving="3")
    take("run-1")
    monkeypatch.setattr(mesh, "BACKOFF_S", 0.01)  # (the client's backoff between its retries)
    monkeypatch.setattr(mesh, "BACKOFF_MAX_S", 0.01)  # (and routes_read's between its reads)
    sends = steps.ROUTES_READ_TRIES * (1 + mesh.api_retries().total)  # each read and the client's retries of it
    kube.throttle, kube.throttle_status, kube.throttled_methods = sends, 500, frozenset({"GET"})
    kube.throttled_path = VS_PATH
    with pytest.raises(mesh.ApiFailed, match=r"^GET virtualservices/digits: 500 "):
        steps.restore_stable(PARAMS, "run-1")
    assert kube.throttle == 0
    assert routes(kube) == [("v3", 100)]
    steps.restore_stable(PARAMS, "run-1")  # answered: the candidate not routed, the routes left as they are
    assert routes(kube) == [("v3", 100)]


@pytest.mark.parametrize("step", ["rollback", "teardown"])
def test_a_burst_of_500s_on_the_routes_read_is_ridden_out_by_the_rollback_and_the_teardown(kube, monkeypatch, step):
    """The VirtualService's GET answered 500 at the client's 6 sends (about 15 s), then fine: the
    rollback and the teardown (no retries of their own, dags/model_rollout.py) failed on that
    burst, which they rode out before 511f514, the candidate left its share, though their
    docstrings said a retry reads again. ``routes_read`` reads again, ``ROUTES_READ_TRIES`` in
    all, before it raises."""
    from vision_rollout import mesh

    at_stage_1(kube)
    monkeypatch.setattr(mesh, "BACKOFF_S", 0.01)  # (the client's backoff between its retries)
    monkeypatch.setattr(mesh, "BACKOFF_MAX_S", 0.01)  # (and routes_read's between its reads)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 1 + mesh.api_retries().total, 500, frozenset({"GET"})
    kube.throttled_path = VS_PATH
    if step == "rollback":
        steps.rollback(PARAMS, "run-1")
    else:
        with pytest.raises(AirflowFailException, match=r"^the run was stopped before it decided; version 1 takes 100%"):
            steps.ensure_stable(PARAMS, "run-1", None, None, SENT)
    assert kube.throttle == 0
    assert routes(kube) == [("v1", 100)]


def test_a_stages_virtualservice_write_that_conflicts_reads_again_and_applies_as_before(kube):
    """A 409 (another writer changed the VirtualService between the read and the apply): read
    again and applied from the new object, that writer's change kept, unchanged by the above."""
    at_stage_1(kube)

    def timeout(vs):
        for route in vs["spec"]["http"]:
            route["timeout"] = "7s"

    def race():  # on the VirtualService's write
        if kube.requests[-1]["path"].endswith(VS_PATH):
            kube.touch("virtualservices", "models", "digits", timeout)
        else:
            kube.before_write = race

    before = len(kube.requests)
    kube.before_write = race
    steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    assert routes(kube) == [("v1", 50), ("v2", 50)]
    patched = [r["status"] for r in kube.requests[before:] if r["method"] == "PATCH" and r["path"].endswith(VS_PATH)]
    assert patched[-2:] == [409, 200]
    vs = kube.get("virtualservices", "models", "digits")
    assert {r.get("timeout") for r in vs["spec"]["http"] if r["name"] == "default"} == {"7s"}


def test_an_image_build_of_a_run_without_the_model_starts_no_pod(kube):
    from rollout_airflow.operators import ImageBuild

    plan = steps.build_plan(RolloutSpec.from_dict(PARAMS), SHA, steps.serving().settings.build_for("digits"))
    take("run-a")
    before = len(kube.requests)
    with pytest.raises(AirflowFailException, match="run 'run-b' does not hold model 'digits'"):
        ImageBuild(task_id="buildkit_build", plan={"build": plan}).execute({"params": PARAMS, "run_id": "run-b"})
    assert changes(kube, before) == []  # no pod, no lease written
    assert steps.serving().model_lock("digits", "istio").holding().holder == "run-a"


def test_a_rollout_against_a_baseline_without_pods_moves_no_weight(kube):
    """Stage 1 against a version already retired (or never deployed) would route its share to
    nothing: refused before the VirtualService is touched."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=0)
    deployments.apply("2", image("2"))
    before = len(kube.requests)
    with pytest.raises(AirflowFailException, match="baseline version 1 has no pods"):
        steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})
    assert not [w for w in changes(kube, before) if "/virtualservices/" in w["path"]]
    assert routes(kube) == [("v1", 100)]


def test_a_rollback_to_a_version_without_a_deployment_leaves_the_routes(kube):
    at_stage_1(kube)
    del kube.objects[("deployments", "models", "digits-v1")]  # deleted by hand meanwhile
    with pytest.raises(AirflowFailException, match="version 1 has no Deployment: the routes stay"):
        steps.restore_stable(PARAMS, "run-1")
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    assert deployment(kube, "2")["spec"]["replicas"] == 2  # the candidate still serves its share (and copies)


def test_a_promotion_whose_record_was_lost_is_kept_by_the_teardown(kube):
    """promote's worker killed after the routes moved (its XCom never written): the teardown reads
    the VirtualService, sees the candidate at 100%, and does not route back to a retired baseline;
    it fails the run, whose promote did not finish."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    steps.promote(PARAMS, "run-1", "promote")
    with pytest.raises(AirflowFailException, match="version 2 was promoted: nothing to restore"):
        steps.ensure_stable(PARAMS, "run-1", None, None, SENT)
    assert routes(kube) == [("v2", 100)]
    assert steps.serving().model_lock("digits", "istio").holding() is None


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_promotion_whose_record_was_lost_is_kept_with_its_routes_edited_unreadable(kube, end):
    """promote ran (version 2 at 100%, version 1 retired to 0 pods), its record lost (a killed
    worker; the failure callback never has it), then an operator edited the VirtualService into
    one the rollout cannot read (a header rule without a subset): the routes unread, the teardown
    (or the failure callback) put version 1 back, bringing a retired baseline back and undoing a
    completed promotion. The routes unread, the baseline retired and the candidate serving, the
    promotion is kept, the VirtualService left as edited, and said so; a baseline still running
    is rolled back to (``test_the_teardown_rolls_back_a_virtual_service_edited_by_hand_...``)."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    steps.promote(PARAMS, "run-1", "promote")
    replicas = deployment(kube, "2")["spec"]["replicas"]

    def debug_rule(obj: dict) -> None:
        debug = {"name": "debug", "match": [{"headers": {"x-debug": {"exact": "1"}}}]}
        obj["spec"]["http"].insert(0, {**debug, "route": [{"destination": {"host": "digits"}}]})

    kube.touch("virtualservices", "models", "digits", debug_rule)
    said = "version 2 was promoted (version 1 retired, version 2 serving): nothing to restore; the VirtualService"
    if end == "teardown":
        with pytest.raises(AirflowFailException, match=re.escape(said)):
            steps.ensure_stable(PARAMS, "run-1", None, None, SENT)
    else:
        steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    http = kube.objects[("virtualservices", "models", "digits")]["spec"]["http"]
    assert http[0]["name"] == "debug"
    assert [(d["destination"]["subset"], d["weight"]) for d in http[-1]["route"]] == [("v2", 100)]
    assert (deployment(kube, "1")["spec"]["replicas"], deployment(kube, "2")["spec"]["replicas"]) == (0, replicas)
    assert steps.serving().model_lock("digits", "istio").holding() is None


def test_a_rollback_decided_with_its_baseline_scaled_to_0_and_its_routes_unreadable_is_carried_out(kube):
    """Mid-stage, the baseline scaled to 0 by another manager (KEDA, ``kubectl scale``) and the
    VirtualService edited into one the rollout cannot read: the teardown of a run that decided to
    roll back took the retired-looking baseline for a promotion, kept it, reported "version 2 was
    promoted", and left 90% of the traffic on a version without pods. A run that decided to roll
    back never promoted: the baseline is brought back and takes 100%."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})
    kube.touch("deployments", "models", "digits-v1", lambda obj: obj["spec"].update(replicas=0))

    def debug_rule(obj: dict) -> None:
        debug = {"name": "debug", "match": [{"headers": {"x-debug": {"exact": "1"}}}]}
        obj["spec"]["http"].insert(0, {**debug, "route": [{"destination": {"host": "digits"}}]})

    kube.touch("virtualservices", "models", "digits", debug_rule)
    with pytest.raises(AirflowFailException, match="version 1 takes 100%; version 2 is unloaded"):
        steps.ensure_stable(PARAMS, "run-1", None, None, SENT, decided="rollback")
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] > 0
    assert deployment(kube, "2")["spec"]["replicas"] == 0


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_run_stopped_before_it_decided_with_its_baseline_scaled_to_0_and_its_routes_unreadable_is_rolled_back(
    kube, end
):
    """Mid-stage, the baseline scaled to 0 by another manager (KEDA, ``kubectl scale``) and the
    VirtualService edited into one the rollout cannot read, the run stopped before it decided
    (marked failed in the UI): the teardown (decided None) and the failure callback (never given
    decide's outcome) judged by the pods alone, took the retired-looking baseline for a
    promotion and left 90% of the traffic on a version without pods and an unjudged candidate.
    Only a promotion promote recorded (``PROMOTED``, in the run's folder, before it retired the
    baseline) is kept: here the baseline is brought back and takes 100%."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})
    kube.touch("deployments", "models", "digits-v1", lambda obj: obj["spec"].update(replicas=0))

    def debug_rule(obj: dict) -> None:
        debug = {"name": "debug", "match": [{"headers": {"x-debug": {"exact": "1"}}}]}
        obj["spec"]["http"].insert(0, {**debug, "route": [{"destination": {"host": "digits"}}]})

    kube.touch("virtualservices", "models", "digits", debug_rule)
    if end == "teardown":
        with pytest.raises(AirflowFailException, match="version 1 takes 100%; version 2 is unloaded"):
            steps.ensure_stable(PARAMS, "run-1", None, None, None)
    else:
        steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] > 0


def test_a_rollback_removes_the_record_of_the_promotion_it_undoes(kube):
    """promote ran and recorded its promotion (``PROMOTED``); decide, cleared, ran again and chose
    rollback, which moved the routes back to the stable version: the record stayed, so a teardown
    or failure callback after a rollback that then failed could still take the run's state for
    promote's. Once the routes are back the record is removed."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    steps.promote(PARAMS, "run-1", "promote")
    folder = steps.serving().settings.workdir("digits", "run-1")
    assert json.loads(folder.read_within(PROMOTED, 4096))["holder"] == "run-1"
    steps.restore_stable(PARAMS, "run-1")
    assert routes(kube) == [("v1", 100)]
    with pytest.raises(FileNotFoundError):
        folder.read_within(PROMOTED, 4096)


@pytest.mark.parametrize(
    "record",
    [{"holder": "run-0", "version": "2", "baseline": "1"}, {"holder": "run-1", "version": "2", "baseline": "0"}],
)
def test_a_promotion_record_of_another_run_or_baseline_is_no_promotion(kube, record):
    """The last stage at 100%, its idle baseline scaled to 0 by another manager, the run stopped
    before it decided, and in its folder a record of a promotion that is not this run's: another
    run's (a folder restored from a copy) or one over another baseline. Only the record's
    version was compared, so the candidate was kept at 100%, unjudged. The record's holder and
    baseline must be the run's too: here the baseline is brought back and takes 100%."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    for index in range(3):
        steps.apply_weights(PARAMS, index, "run-1", {"decision": "pass"})
    kube.touch("deployments", "models", "digits-v1", lambda obj: obj["spec"].update(replicas=0))
    steps.serving().settings.workdir("digits", "run-1").write(PROMOTED, json.dumps(record).encode())
    with pytest.raises(AirflowFailException, match="version 1 takes 100%; version 2 is unloaded"):
        steps.ensure_stable(PARAMS, "run-1", None, None, None)
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] > 0


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_promotion_whose_record_cannot_be_read_is_not_undone(kube, monkeypatch, tmp_path, end):
    """promote finished (its XCom lost: the teardown is given none, the failure callback never)
    and its record of the promotion (``PROMOTED``) cannot be read: the run folder's store answers
    503 or 403, or the DAG processor lacks the folder's access. The unread record counted as no
    record: the baseline was scaled back up and took 100%, the candidate scaled to 0, a finished
    and approved promotion undone. Whether promote ran is then not known: the teardown fails and
    the failure callback reports, touching nothing; a missing record still means no promotion."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    steps.promote(PARAMS, "run-1", "promote")
    replicas = deployment(kube, "2")["spec"]["replicas"]
    read_within = Folder.read_within

    def unreadable(folder: Folder, name: str, limit: int) -> bytes:
        if name == PROMOTED:
            raise OSError("503 Service Unavailable")
        return read_within(folder, name, limit)

    monkeypatch.setattr(Folder, "read_within", unreadable)
    if end == "teardown":
        with pytest.raises(OSError, match="record of its promotion cannot be read"):
            steps.ensure_stable(PARAMS, "run-1", None, None, SENT)
    else:
        steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
        (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
        assert "record of its promotion cannot be read" in report["text"]
    assert routes(kube) == [("v2", 100)]
    assert (deployment(kube, "1")["spec"]["replicas"], deployment(kube, "2")["spec"]["replicas"]) == (0, replicas)
    assert steps.serving().model_lock("digits", "istio").holding() is not None  # (held: a clear tries again)


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_run_mid_stage_whose_promotion_record_cannot_be_read_is_rolled_back(kube, monkeypatch, end):
    """The run stopped mid-stage (marked failed in the UI: the teardown is given no decision, the
    failure callback never is one) with the candidate at 10%, and its run folder unreadable (its
    store answering 503, or the DAG processor without the folder's access). The record of a
    promotion (``PROMOTED``) was read before the routes were: its OSError stopped the restore, and
    90% stayed on the baseline and 10% on an unjudged candidate, where no promotion can be in
    effect. The routes, not promote's, decide it without the record: the stable version takes 100%."""
    at_stage_1(kube)
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    read_within = Folder.read_within

    def unreadable(folder: Folder, name: str, limit: int) -> bytes:
        if name == PROMOTED:
            raise OSError("503 Service Unavailable")
        return read_within(folder, name, limit)

    monkeypatch.setattr(Folder, "read_within", unreadable)
    if end == "teardown":
        with pytest.raises(AirflowFailException, match="version 1 takes 100%; version 2 is unloaded"):
            steps.ensure_stable(PARAMS, "run-1", None, None, None)
    else:
        steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] > 0


@pytest.mark.parametrize("record", ["folder", "oversized"])
def test_a_promotion_record_no_read_will_take_says_what_to_do(kube, record):
    """promote finished (its XCom lost) and at its record's place (``PROMOTED``) sits what no read
    takes, ever: a folder, or a file over the size of any record promote writes. The teardown
    said to clear it once the run folder reads, which it never will. Nothing is touched, and the
    error says to replace it with promote's record to keep the promotion or remove it to put the
    stable version back."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    steps.promote(PARAMS, "run-1", "promote")
    folder = steps.serving().settings.workdir("digits", "run-1")
    assert folder.path is not None
    (folder.path / PROMOTED).unlink()
    if record == "folder":
        (folder.path / PROMOTED).mkdir()
    else:
        (folder.path / PROMOTED).write_bytes(b" " * 1_000_000)
    with pytest.raises(OSError, match="to keep version 2 promoted, put there the record promote writes") as raised:
        steps.ensure_stable(PARAMS, "run-1", None, None, SENT)
    assert '{"holder": "run-1", "version": "2", "baseline": "1"}' in str(raised.value)
    assert "or remove it to put version 1 back" in str(raised.value)
    assert routes(kube) == [("v2", 100)]
    assert steps.serving().model_lock("digits", "istio").holding() is not None


@pytest.mark.parametrize("decided", [None, "rollback"])
def test_a_last_stage_at_100_with_its_baseline_scaled_to_0_is_no_promotion(kube, decided):
    """The last stage sends the candidate 100% (promote's routes) and the baseline, sent nothing,
    is scaled to 0 by another manager (KEDA scaling an idle Deployment to zero); the run stopped
    before its rollback finished (or before it decided): the teardown read promote's routes and a
    retired baseline, took that for a promotion whose record was lost, and kept the candidate,
    unjudged or rejected, at 100%. Without promote's record of its promotion the baseline is
    brought back and takes 100%."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    for index in range(3):
        steps.apply_weights(PARAMS, index, "run-1", {"decision": "pass"})
    assert routes(kube) == [("v2", 100)]
    kube.touch("deployments", "models", "digits-v1", lambda obj: obj["spec"].update(replicas=0))
    with pytest.raises(AirflowFailException, match="version 1 takes 100%; version 2 is unloaded"):
        steps.ensure_stable(PARAMS, "run-1", None, None, SENT if decided else None, decided=decided)
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] > 0
    assert deployment(kube, "2")["spec"]["replicas"] == 0


def test_a_model_sent_to_another_models_target_is_refused_before_any_write(kube):
    """The single-model setup (one connection-wide target, no {model}) used for a second model:
    its rollout would take over digits' Deployments and VirtualService. The runs take turns on
    the VirtualService's Lease, and mnist's is refused before it writes anything."""
    stable_virtual_service(kube, PARAMS)  # digits-v1 serves digits
    take("run-a", "digits")
    assert kube.objects[("leases", "models", "rollout-digits")]["spec"]["holderIdentity"] == "run-a"
    mnist = {**PARAMS, "model": "mnist"}
    with pytest.raises(AirflowFailException, match="being rolled out by run 'run-a'"):
        steps.build_image(mnist, "run-b")
    steps.serving().model_lock("digits", "istio").release("run-a")
    take("run-b", "mnist")
    before = len(kube.requests)
    with pytest.raises(AirflowFailException, match=r"models/digits-v1 serves model 'digits', not 'mnist'"):
        steps.deploy_candidate(mnist, image("2"), "run-b")
    assert [w for w in changes(kube, before) if "/leases" not in w["path"]] == []


def test_a_promotion_whose_report_was_not_sent_is_kept_and_the_run_fails(kube):
    """notify failed after promote: the teardown keeps the promoted version and releases the
    Lease, sends the report notify did not, then fails, so the run ends failed (a teardown's
    upstream failing would not fail it)."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    steps.promote(PARAMS, "run-1", "promote")
    with pytest.raises(
        AirflowFailException,
        match="version 2 was promoted: nothing to restore; but notify did not send the run's report: the teardown sent it",
    ):
        steps.ensure_stable(PARAMS, "run-1", "2", None, None)
    assert routes(kube) == [("v2", 100)]
    assert steps.serving().model_lock("digits", "istio").holding() is None


def test_a_rollback_after_a_refused_first_stage_leaves_the_version_serving_now(kube, monkeypatch, tmp_path):
    """v2 serves (v1 retired by its promotion); a v3 rollout left on the form's baseline 1 is
    refused at stage 1, and the rollback that follows scales v3 down without touching the
    routes or bringing v1 back: production stays on v2."""
    params = {**PARAMS, "candidate_version": "3"}
    baseline_at_0(kube, monkeypatch, tmp_path).apply("3", image("3"), replicas=1)
    with pytest.raises(AirflowFailException, match="baseline version 1 has no pods"):
        steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    steps.restore_stable(params, "run-1")
    assert routes(kube) == [("v2", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == 0
    assert deployment(kube, "3")["spec"]["replicas"] == 0


def test_a_run_failing_in_its_last_stage_at_100_percent_is_rolled_back_not_kept(kube):
    """The last stage routes the candidate 100%, as a promotion does, but the baseline still
    serves: the teardown restores stable (promote never ran)."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    for index in range(3):
        steps.apply_weights(PARAMS, index, "run-1", {"decision": "pass"})
    assert routes(kube) == [("v2", 100)]
    with pytest.raises(AirflowFailException, match="stopped before it decided; version 1 takes 100%"):
        steps.ensure_stable(PARAMS, "run-1", None, None, None)
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "2")["spec"]["replicas"] == 0


def test_the_failure_callback_calls_only_what_the_dag_processors_roles_allow(kube, monkeypatch, tmp_path):
    """Airflow 3 runs the DAG's on_failure_callback in the DAG processor, whose kubernetes_default
    is in-cluster: its calls carry the DAG processor's own ServiceAccount (deploy/helm/values.yaml),
    not the workers'. A run that failed mid-stage is restored by the callback with calls that the
    Roles deploy/ binds to that ServiceAccount allow."""
    from devstack import manifests, rbac
    from model_server.traffic import TrafficPolicy
    from vision_rollout.mesh import render_destination_rule, render_virtual_service

    def as_user(user: str) -> None:
        kubeconfig = json.dumps(kube.kubeconfig("ml", user=user))
        monkeypatch.setenv(
            "AIRFLOW_CONN_KUBERNETES_DEFAULT",
            json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig, "namespace": "ml"}}),
        )

    connect(monkeypatch, tmp_path, extra={"istio": {**ISTIO, "namespace": "ml"}})  # deploy/'s namespace
    as_user(manifests.airflow_user("workers"))
    deployments = steps.ModelServerHook().deployments("digits")
    for version in ("1", "2"):
        deployments.apply(version, image(version))
    target = steps.router(RolloutSpec.from_dict(PARAMS), "r", steps.serving()).target
    mid_stage = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]})
    vs = render_virtual_service(target, mid_stage, ["1", "2"])
    dr = render_destination_rule(target, ["1", "2"])
    kube.objects[("virtualservices", "ml", "digits")] = {**vs, "metadata": {**vs["metadata"], "resourceVersion": "3"}}
    kube.objects[("destinationrules", "ml", "digits")] = {**dr, "metadata": {**dr["metadata"], "resourceVersion": "3"}}
    take("run-1")
    processor = manifests.airflow_user("dagProcessor")
    as_user(processor)
    since = len(kube.requests)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert routes(kube, namespace="ml") == [("v1", 100)]
    assert steps.serving().model_lock("digits", "istio").holding() is None  # the Lease released
    made = [r for r in kube.requests[since:] if r["user"] == processor]
    assert {(r["method"], r["path"].split("/")[-2]) for r in made} >= {
        ("PUT", "leases"),
        ("GET", "virtualservices"),
        ("PATCH", "virtualservices"),
        ("GET", "deployments"),
    }
    rules = rbac.bound_rules(manifests.render("production"), processor)
    refused = {str(c) for r in made for c in rbac.checks(r) if not rbac.allowed(rules.get(c.namespace, []), c)}
    assert refused == set()


@pytest.mark.parametrize("who", ["workers", "dagProcessor"])
def test_a_rollback_scaling_a_baseline_another_manager_owns_calls_only_what_production_roles_allow(
    kube, monkeypatch, tmp_path, who
):
    """Without autoscaling, mid-stage, the baseline's ``spec.replicas`` owned at 0 by another
    manager (KEDA, ``kubectl scale``): the rollback (the workers) and the failure callback (the DAG
    processor) scale it back through the scale subresource (PATCH deployments/<n>/scale). Only the
    autoscaling component's Role granted that patch: under production's Roles (deploy/base alone)
    both were refused (403) and 90% of the traffic stayed on a version without pods. The base Roles
    allow it."""
    from devstack import manifests, rbac
    from model_server.traffic import TrafficPolicy
    from vision_rollout.mesh import render_destination_rule, render_virtual_service

    def as_user(user: str) -> None:
        kubeconfig = json.dumps(kube.kubeconfig("ml", user=user))
        monkeypatch.setenv(
            "AIRFLOW_CONN_KUBERNETES_DEFAULT",
            json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig, "namespace": "ml"}}),
        )

    connect(monkeypatch, tmp_path, extra={"istio": {**ISTIO, "namespace": "ml"}})  # deploy/'s namespace
    as_user(manifests.airflow_user("workers"))
    deployments = steps.ModelServerHook().deployments("digits")
    for version in ("1", "2"):
        deployments.apply(version, image(version))
    target = steps.router(RolloutSpec.from_dict(PARAMS), "r", steps.serving()).target
    mid_stage = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]})
    vs = render_virtual_service(target, mid_stage, ["1", "2"])
    dr = render_destination_rule(target, ["1", "2"])
    kube.objects[("virtualservices", "ml", "digits")] = {**vs, "metadata": {**vs["metadata"], "resourceVersion": "3"}}
    kube.objects[("destinationrules", "ml", "digits")] = {**dr, "metadata": {**dr["metadata"], "resourceVersion": "3"}}
    take("run-1")
    kube.scale("ml", "digits-v1", 0, "keda")  # another manager owns spec.replicas at 0
    user = manifests.airflow_user(who)
    as_user(user)
    since = len(kube.requests)
    if who == "workers":
        steps.rollback(PARAMS, "run-1")
    else:
        steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert routes(kube, namespace="ml") == [("v1", 100)]
    made = [r for r in kube.requests[since:] if r["user"] == user]
    assert ("PATCH", "/apis/apps/v1/namespaces/ml/deployments/digits-v1/scale") in {
        (r["method"], r["path"]) for r in made
    }
    rules = rbac.bound_rules(manifests.render("production"), user)
    refused = {str(c) for r in made for c in rbac.checks(r) if not rbac.allowed(rules.get(c.namespace, []), c)}
    assert refused == set()


def read_whole(df):
    """``df`` as ``predictionlog.read`` answers a read that left nothing out (its counts in attrs)."""
    df.attrs.update(unread_files=0, unlisted_folders=0, crowded_folders=0, out_of_time=False)
    return df


def test_the_masking_probe_finds_a_copy_of_envoys_mirror_at_a_small_share(fleet, monkeypatch):
    """Envoy samples its mirror per request at random, whatever the request id: at 5% one probe
    in 20 is copied. One probe every 2 s for 30 s (15 in all) found none about half of the time,
    and the stage failed over a masking that works. Here the 40th request is the first copied."""
    from types import SimpleNamespace

    import pandas as pd

    from model_server import predictionlog
    from vision_rollout import serving

    params = {**PARAMS, "mirror_percent": 5}
    built = steps.build_image(params, "run-a")
    steps.deploy_candidate(params, pushed(built), "run-a")
    steps.apply_weights(params, 0, "run-a", built)
    clock = [0.0]
    monkeypatch.setattr(
        steps,
        "time",
        SimpleNamespace(monotonic=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)),
    )
    sent: list[str] = []
    copied: list[str] = []

    def infer(self, model, body, headers=None):  # the mesh: the 40th request is mirrored
        clock[0] += 0.02
        sent.append(headers["X-Request-ID"])
        if len(sent) == 40:
            copied.append(sent[-1])
        return {}

    def read(uri, start, end, model=None, columns=None, roles=None, **kwargs):
        meta = json.dumps({"x-meta-probe": "call tok_0123456789ab"})
        df = pd.DataFrame({"request_id": copied, "role": ["shadow"] * len(copied), "meta": [meta] * len(copied)})
        return read_whole(df)

    monkeypatch.setattr(serving.ModelServerAdmin, "infer", infer)
    monkeypatch.setattr(predictionlog, "read", read)
    result = steps.enable_shadow(params, "run-a")
    assert result["probe"] == sent[39]
    assert result["masked"] == "call tok_0123456789ab"
    assert clock[0] < 30


def test_the_masking_probe_is_sent_as_a_user_the_meshs_buckets_route_to_the_baseline(fleet, monkeypatch):
    """Istio's routes of a split send a user by the mesh's bucket (the EnvoyFilter's MurmurHash2),
    and only the baseline's users are mirrored: the probe's user, chosen by the model server's
    hash, was the candidate's in the mesh at a 90% stage, and no probe was ever copied."""
    import pandas as pd

    from model_server import predictionlog
    from vision_rollout import serving
    from vision_rollout.mesh import user_bucket

    params = {**PARAMS, "stages": [90, 100]}
    built = steps.build_image(params, "run-a")
    steps.deploy_candidate(params, pushed(built), "run-a")
    steps.apply_weights(params, 0, "run-a", built)
    sent: list[tuple[str, str]] = []  # (request id, user)

    def infer(self, model, body, headers=None):
        sent.append((headers["X-Request-ID"], headers["X-User-ID"]))
        return {}

    def read(uri, start, end, model=None, columns=None, roles=None, **kwargs):  # every probe copied
        meta = json.dumps({"x-meta-probe": "call tok_0123456789ab"})
        return read_whole(pd.DataFrame({"request_id": [r for r, _ in sent], "role": "shadow", "meta": meta}))

    monkeypatch.setattr(serving.ModelServerAdmin, "infer", infer)
    monkeypatch.setattr(predictionlog, "read", read)
    steps.enable_shadow(params, "run-a")
    users = {u for _, u in sent}
    assert len(users) == 1
    assert user_bucket(users.pop()) < 1000  # the baseline's range at 90% to the candidate


def test_a_read_the_workers_roles_deny_says_who_was_denied_what(kube, monkeypatch):
    """The API server's 403 names the user, the verb and the resource: a read of the routes that
    RBAC refused said only "403 Forbidden", not whose Role lacks what."""
    from kubernetes.client.exceptions import ApiException

    from vision_rollout.mesh import IstioRouter

    denied = (
        'virtualservices.networking.istio.io "digits" is forbidden: User "system:serviceaccount:airflow:'
        'airflow-worker" cannot get resource "virtualservices" in API group "networking.istio.io" in the '
        'namespace "models"'
    )

    class Denying:
        def get_namespaced_custom_object(self, *args, **kwargs):
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = json.dumps({"kind": "Status", "message": denied, "reason": "Forbidden", "code": 403})
            raise exc

    stable_virtual_service(kube, PARAMS)
    monkeypatch.setattr(IstioRouter, "_api", lambda self: Denying())
    with pytest.raises(AirflowFailException) as failed:
        steps.build_image(PARAMS, "run-1")
    assert "403 Forbidden" in str(failed.value)
    assert 'cannot get resource "virtualservices"' in str(failed.value)


def test_a_candidate_left_without_a_ready_pod_mid_stage_is_rolled_back(kube, monkeypatch):
    """Its pods crash-looping or evicted mid-stage: Envoy answered its 10% 503 while the stage held
    on guards without data (the model server's metrics and log, which no pod wrote) to its end."""
    at_stage_1(kube)
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    kube.touch("deployments", "models", "digits-v2", lambda d: d["status"].update(readyReplicas=0))
    monkeypatch.setattr(steps, "NO_READY_POD_S", 0)
    with pytest.raises(AirflowFailException, match=r"version 2 has no ready pod.*Version 1 takes 100% again"):
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    assert routes(kube) == [("v1", 100)]


def test_a_candidates_deployment_read_answered_500_is_retried_not_rolled_back_as_without_pods(kube, monkeypatch):
    """The API server failing the candidate's Deployment GET mid-stage (500 once the client's
    retries were spent: an ApiFailed) was taken for the candidate without a ready pod: the
    healthy candidate was rolled back, the run failed for good saying its share answered 503.
    Nothing says its pods are gone: the failure is raised as it came (Airflow's retry looks
    again), the stage's weights kept."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import ApiFailed

    at_stage_1(kube)
    monkeypatch.setattr(VersionDeployments, "changed", lambda self, version: None)  # (the read under test: the wait's)
    monkeypatch.setattr(steps, "NO_READY_POD_S", 0)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 100, 500, frozenset({"GET"})
    kube.throttled_path = "/deployments/digits-v2"
    with pytest.raises(ApiFailed, match=r"digits-v2: 500 "):
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    kube.throttle = 0
    assert routes(kube) == [("v1", 90), ("v2", 10)]


def test_a_stages_routes_read_answered_500_is_retried_not_rolled_back_as_edited_by_hand(kube, monkeypatch):
    """A stage's poke checks that the mesh serves the stage's split (``serving_problem``): its
    VirtualService GET failed by the API server (500 each time, the client's retries spent: an
    ApiFailed) was taken for the VirtualService changed outside the rollout: the healthy
    candidate rolled back, the run failed for good naming the 500 as the mesh's problem. Nothing
    says the routes changed: the failure is raised as it came (Airflow's retry looks again), the
    stage's weights kept."""
    from vision_rollout import mesh

    at_stage_1(kube)
    monkeypatch.setattr(steps, "NO_READY_POD_S", 0)
    monkeypatch.setattr(mesh, "BACKOFF_S", 0.01)  # (the client's backoff between its retries)
    sends = 1 + mesh.api_retries().total  # the read and the client's retries of it, each answered 500
    kube.throttle, kube.throttle_status, kube.throttled_methods = sends, 500, frozenset({"GET"})
    kube.throttled_path = VS_PATH
    with pytest.raises(mesh.ApiFailed, match=r"^GET virtualservices/digits: 500 "):
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    assert kube.throttle == 0
    assert routes(kube) == [("v1", 90), ("v2", 10)]


def test_the_routes_read_answered_500_before_a_retirement_is_retried_not_final(kube):
    """``retire`` reads the routes until they send the version nothing: that read answered 500
    once the client's retries were spent (an ApiFailed) failed the step for good ("version 2
    keeps its pods"), as if the routes were refused. It is raised as it came (Airflow's retry
    reads again); the pods kept meanwhile."""
    from vision_rollout.mesh import ApiFailed

    stable_virtual_service(kube, PARAMS)
    take("run-1")
    hook = steps.serving()
    hook.deployments("digits").apply("2", image("2"))
    kube.throttle, kube.throttle_status, kube.throttled_methods = 100, 500, frozenset({"GET"})
    kube.throttled_path = VS_PATH
    with pytest.raises(ApiFailed, match=r"virtualservices/digits: 500 "):
        steps.retire(steps.router(RolloutSpec.from_dict(PARAMS), "run-1", hook), hook.deployments("digits"), "2")
    kube.throttle = 0
    assert deployment(kube, "2")["spec"]["replicas"] == 1


def test_the_routes_read_answered_500_at_the_start_is_retried_not_final(kube):
    """The run's first read of the routes (``start_from_steady``) answered 500 once the client's
    retries were spent (an ApiFailed) failed the run for good ("the routes of 'digits' cannot be
    read or set"), as a refusal. It is raised as it came: Airflow's retry reads again."""
    from vision_rollout.mesh import ApiFailed

    stable_virtual_service(kube, PARAMS)
    take("run-1")
    kube.throttle, kube.throttle_status, kube.throttled_methods = 100, 500, frozenset({"GET"})
    kube.throttled_path = VS_PATH
    with pytest.raises(ApiFailed, match=r"virtualservices/digits: 500 "):
        steps.start_from_steady(RolloutSpec.from_dict(PARAMS), "run-1", steps.serving(), None)
    kube.throttle = 0
    assert routes(kube) == [("v1", 100)]


def edit_lua(obj: dict) -> None:
    obj["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["default_source_code"]["inline_string"] = "--"


def drop_candidate_subset(obj: dict) -> None:
    obj["spec"]["subsets"] = [s for s in obj["spec"]["subsets"] if s["name"] != "v2"]


def hand_route(obj: dict) -> None:
    for dest in obj["spec"]["http"][-1]["route"]:
        dest["weight"] = 50


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda kube: kube.remove("envoyfilters", "istio-system", "rollout-bucket"),
            "EnvoyFilter istio-system/rollout-bucket does not exist",
        ),
        (
            lambda kube: kube.touch("envoyfilters", "istio-system", "rollout-bucket", edit_lua),
            "EnvoyFilter istio-system/rollout-bucket is not this rollout's",
        ),
        (
            lambda kube: kube.touch("destinationrules", "models", "digits", drop_candidate_subset),
            "DestinationRule models/digits has no subset v2",
        ),
        (
            lambda kube: kube.touch("virtualservices", "models", "digits", hand_route),
            "VirtualService models/digits routes",
        ),
    ],
    ids=["filter-deleted", "filter-changed", "subset-removed", "routes-edited"],
)
def test_a_mesh_changed_mid_stage_fails_the_stage_naming_the_object_and_moves_no_traffic_forward(kube, change, named):
    """The bucket EnvoyFilter was checked only before a split was written: deleted or changed
    mid-stage, Istio split the candidate's share per request while the stage kept judging it as a
    sticky split; a VirtualService edited by hand or a subset removed (its share answered 503 by
    Envoy, which no guard of the model server sees) went on unjudged as well. Each poke now checks
    the mesh serves the stage's split; else the stable version takes 100% again."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})
    spec = RolloutSpec.from_dict(PARAMS)
    assert steps.router(spec, "run-1", steps.serving()).serving_problem(spec.policy_for_stage(10)) is None
    change(kube)
    with pytest.raises(AirflowFailException) as failed:
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    assert named in str(failed.value)
    assert str(failed.value).endswith("Version 1 takes 100% again.")
    assert routes(kube) == [("v1", 100)]


def test_a_virtual_service_edited_by_hand_into_one_the_rollout_cannot_read_is_still_rolled_back(kube):
    """Its candidate given 100% by hand mid-stage, the stage's mirror left to it: the rollout
    could not read it (a mirror to the primary), and the rollback, reading the routes first to
    see whether the candidate had a share, failed there, leaving the candidate all the traffic."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})

    def all_to_candidate(obj: dict) -> None:
        obj["spec"]["http"][-1]["route"] = [{"destination": {"host": "digits", "subset": "v2"}, "weight": 100}]

    kube.touch("virtualservices", "models", "digits", all_to_candidate)
    with pytest.raises(AirflowFailException, match=r"is not one the rollout reads.*Version 1 takes 100% again"):
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    assert routes(kube) == [("v1", 100)]
    steps.restore_stable(PARAMS, "run-1")
    assert deployment(kube, "2")["spec"]["replicas"] == 0


def test_the_teardown_rolls_back_a_virtual_service_edited_by_hand_into_one_the_rollout_cannot_read(kube):
    """Its candidate given 100% by hand mid-stage (the stage's mirror left to it: a VirtualService
    the rollout cannot read), and the run failing before a poke saw it: the teardown read the
    routes first, for its report, and failed there ("is not one the rollout reads"), as did the
    failure callback after it, leaving the candidate all the traffic. The routes unread, the
    teardown rolls back as ``restore_stable`` does (the stable version put back all the same)."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})

    def all_to_candidate(obj: dict) -> None:
        obj["spec"]["http"][-1]["route"] = [{"destination": {"host": "digits", "subset": "v2"}, "weight": 100}]

    kube.touch("virtualservices", "models", "digits", all_to_candidate)
    assert steps.ensure_stable(PARAMS, "run-1", None, "1", SENT).startswith("version 1 takes 100%")
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "2")["spec"]["replicas"] == 0


def test_a_candidate_whose_image_was_changed_by_hand_is_rolled_back_and_not_promoted(kube):
    """A ``kubectl set image`` on the candidate mid-rollout: its share went on to be served by an
    image no guard judged from the start, and scaling re-applied it as the rollout's own, so a
    promotion carried it to 100%. Each poke of a stage now finds the change and puts the stable
    version back; no weight moves to it, and it is not promoted."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})  # (scaled: the record kept)
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    hotfix = "registry.example.com/ml/digits-server:hotfix"

    def set_image(obj: dict) -> None:
        obj["spec"]["template"]["spec"]["containers"][0]["image"] = hotfix

    kube.touch("deployments", "models", "digits-v2", set_image)
    with pytest.raises(AirflowFailException) as failed:
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    assert "digits-v2 was changed outside the rollout" in str(failed.value)
    assert f"image is {hotfix}, not {image('2')}" in str(failed.value)
    assert str(failed.value).endswith("Version 1 takes 100% again.")
    assert routes(kube) == [("v1", 100)]
    before = len(kube.requests)
    with pytest.raises(AirflowFailException, match=r"changed outside the rollout.*no more weight moves to it"):
        steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    with pytest.raises(AirflowFailException, match=r"changed outside the rollout.*version 2 is not promoted"):
        steps.promote(PARAMS, "run-1", "promote")
    assert [w for w in changes(kube, before) if "/leases/" not in w["path"]] == []
    assert routes(kube) == [("v1", 100)]
    steps.restore_stable(PARAMS, "run-1")  # the teardown's rollback retires it all the same
    assert deployment(kube, "2")["spec"]["replicas"] == 0


def test_a_candidate_whose_pod_template_was_edited_by_hand_is_rolled_back_and_not_promoted(kube):
    """A ``kubectl edit`` of the candidate's env or resources mid-rollout (its image unchanged):
    its pods were replaced by ones no guard judged from the start, scaling re-applied the edit as
    the rollout's own, and a promotion carried it to 100%. A restart runs the same template."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})  # (scaled: the record kept)
    assert routes(kube) == [("v1", 90), ("v2", 10)]

    def restart(obj: dict) -> None:
        meta = obj["spec"]["template"].setdefault("metadata", {})
        meta.setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = "2026-12-03T08:00:00Z"

    deployments = steps.ModelServerHook().deployments("digits")
    kube.touch("deployments", "models", "digits-v2", restart)
    assert deployments.changed("2") is None

    def edit(obj: dict) -> None:
        container = obj["spec"]["template"]["spec"]["containers"][0]
        container.setdefault("env", []).append({"name": "OMP_NUM_THREADS", "value": "1"})

    kube.touch("deployments", "models", "digits-v2", edit)
    with pytest.raises(AirflowFailException) as failed:
        steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    assert "digits-v2 was changed outside the rollout: its pod template is not the one" in str(failed.value)
    assert str(failed.value).endswith("Version 1 takes 100% again.")
    assert routes(kube) == [("v1", 100)]
    deployments.scale("2", 2)  # (re-applied as it is: still not the rollout's)
    with pytest.raises(AirflowFailException, match=r"its pod template is not the one.*no more weight moves to it"):
        steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    with pytest.raises(AirflowFailException, match=r"its pod template is not the one.*version 2 is not promoted"):
        steps.promote(PARAMS, "run-1", "promote")
    assert routes(kube) == [("v1", 100)]


@pytest.mark.parametrize("refused", [1, 2])
def test_an_apply_refused_midway_leaves_the_deployment_and_its_record_consistent(kube, monkeypatch, refused):
    """The candidate's Deployment re-applied with a new image (its build run again): the new
    template was written under the old template's digest, and the digest in a second write; that
    second write refused (a conflict, the API server unreachable), the next poke took the
    rollout's own template for a hand edit and rolled a sound candidate back. Whichever write is
    refused, the Deployment is as it was or as applied, its record with it."""
    from devstack.cluster.kube import APIError
    from vision_rollout.mesh import RouterError

    stable_virtual_service(kube, PARAMS)
    deployments = steps.serving().deployments("digits")
    deployments.apply("2", image("2"))
    rebuilt = f"{image('2')}@sha256:{'7' * 64}"
    real, writes = kube.apply, []

    def refuse(plural, *args, dry_run=False, **kwargs):
        if plural == "deployments" and not dry_run:
            writes.append(plural)
            if len(writes) == refused:
                raise APIError(409, "Conflict", 'Apply failed with 1 conflict: conflict with "kubectl"')
        return real(plural, *args, dry_run=dry_run, **kwargs)

    monkeypatch.setattr(kube, "apply", refuse)
    with contextlib.suppress(RouterError):  # (refused, or not: either way it is retried below)
        deployments.apply("2", rebuilt)
    assert deployments.changed("2") is None
    image_now = deployment(kube, "2")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image_now in (image("2"), rebuilt)
    monkeypatch.setattr(kube, "apply", real)
    deployments.apply("2", rebuilt)  # tried again
    assert deployment(kube, "2")["spec"]["template"]["spec"]["containers"][0]["image"] == rebuilt
    assert deployments.changed("2") is None


def test_a_baseline_whose_replicas_another_manager_owns_is_refused_before_it_is_promoted_away(kube):
    """Without build.autoscaling, an HPA of the platform's on the stable version (or a kubectl
    scale): the rollout went through every stage, routed 100% to the candidate, was refused
    scaling the baseline to 0 (409) and rolled back. It is now refused before the candidate is
    deployed, and before a promotion moves anything, naming the owner and what to do."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=4)
    kube.scale("models", "digits-v1", 6, "kube-controller-manager")  # the platform's HPA at work
    before = len(kube.requests)
    with pytest.raises(AirflowFailException) as refused:
        steps.deploy_candidate(PARAMS, image("2"), "run-1")
    assert "digits-v1 is also managed by kube-controller-manager (scale)" in str(refused.value)
    assert "build.autoscaling" in str(refused.value)
    assert [w for w in changes(kube, before) if "/leases/" not in w["path"]] == []
    # (the message warns against a forced apply of spec.replicas alone: it drops the rollout's other fields)
    live = deployment(kube, "1")  # the field given back: the whole Deployment, forced
    meta = {k: live["metadata"][k] for k in ("name", "namespace", "labels")}
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {**live["spec"], "replicas": 4}}
    kube.apply("deployments", "models", "digits-v1", body, "model-rollout", force=True)
    # Scaled by hand while the rollout ran: its promotion moves nothing.
    steps.deploy_candidate(PARAMS, image("2"), "run-1")
    steps.apply_weights(PARAMS, 0, "run-1", {"decision": "pass"})
    kube.scale("models", "digits-v1", 8, "kubectl")
    before = len(kube.requests)
    with pytest.raises(AirflowFailException, match=r"digits-v1 is also managed by kubectl \(scale\)"):
        steps.promote(PARAMS, "run-1", "promote")
    assert [w for w in changes(kube, before) if "/leases/" not in w["path"]] == []
    assert routes(kube) == [("v1", 90), ("v2", 10)]


def test_the_advice_for_a_baselines_replicas_another_manager_owns_never_drops_its_other_fields(kube):
    """A baseline whose spec.replicas another manager owns (without build.autoscaling) was refused
    with the advice ``kubectl apply --server-side --field-manager=model-rollout --force-conflicts``:
    sent with spec.replicas alone, that apply removes the Deployment's other fields the rollout
    applied (its manager no longer sends them). The advice scales it under the rollout's field
    manager through its scale subresource (kubectl 1.24 or later), up by one pod and back (a
    write takes a field from its manager where it changes its value; down would cut the capacity
    of a version that may serve all of the traffic), and warns against that apply."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=4)
    kube.scale("models", "digits-v1", 6, "kubectl")  # scaled by hand
    with pytest.raises(AirflowFailException) as refused:
        steps.deploy_candidate(PARAMS, image("2"), "run-1")
    said = str(refused.value)
    assert "digits-v1 is also managed by kubectl (scale)" in said
    assert "--force-conflicts" not in said
    assert "kubectl patch deployment --subresource=scale --type=merge --field-manager=model-rollout" in said
    assert "kubectl 1.24 or later" in said
    assert "up by one pod and back" in said  # (down would cut the capacity of a version serving 100%)
    assert "another count" not in said
    assert "not kubectl apply --server-side" in said
    # (that applier drops it once the rollout took it: while it alone owns it, its apply without it resets it)
    said = said[said.index("up by one pod and back") :]
    assert "then, where that manager is a server-side applier, it stops sending spec.replicas, not before" in said


def test_the_command_that_scales_a_version_by_hand_leaves_its_next_deploy_free(kube):
    """The command a report gives to scale the candidate to 0 (``scale_by_hand``) was ``kubectl
    scale``: kubectl's field manager then owned ``spec.replicas``, and the next deploy of that
    version (the rollout's apply, its count) was refused, 409, "also managed by kubectl (scale)".
    It is a patch of the scale subresource under the rollout's own field manager, as the rollout
    scales it itself; the rollout's apply takes the count back from its own manager's entries."""
    import shlex

    from kubernetes import client

    at_stage_1(kube)
    deployments = steps.serving().deployments("digits")
    words = shlex.split(deployments.scale_by_hand("2", 0))
    assert words[:6] == ["kubectl", "-n", "models", "patch", "deployment", "digits-v2"]
    options = dict(w.split("=", 1) for w in words[6:] if w.startswith("--"))
    assert options == {"--subresource": "scale", "--type": "merge", "--field-manager": "model-rollout"}
    patch = json.loads(words[words.index("-p") + 1])
    apps = client.AppsV1Api(deployments._apps().api_client)  # (what kubectl sends)
    apps.patch_namespaced_deployment_scale("digits-v2", "models", patch, field_manager=options["--field-manager"])
    assert deployment(kube, "2")["spec"]["replicas"] == 0
    assert deployments.replicas_owners("2") == []
    deployments.apply("2", image("2"), replicas=3)  # the version deployed again
    assert deployment(kube, "2")["spec"]["replicas"] == 3


def test_a_field_changed_before_the_forced_apply_of_the_rollouts_own_fields_fails_it_naming_the_object(kube):
    """An apply refused only for the rollout's own field manager's other writes (a scale by hand
    under its name) is sent again with force, which took every field it sets, also one another
    manager changed between the refusal and the forced retry (argocd's image): taken silently.
    The forced retry carries the resourceVersion read: a change meanwhile fails it (409), the
    error naming the Deployment, nothing applied (the other manager's image, the count as was)."""
    from kubernetes import client

    from vision_rollout.deploy import render_deployment
    from vision_rollout.mesh import RouterError

    at_stage_1(kube)
    deployments = steps.serving().deployments("digits")
    apps = client.AppsV1Api(deployments._apps().api_client)
    apps.patch_namespaced_deployment_scale(
        "digits-v2", "models", {"spec": {"replicas": 0}}, field_manager="model-rollout"
    )
    theirs = render_deployment(deployments.target, "digits", "2", "img:theirs", None)

    def changed() -> None:  # (another writer's apply, once the rollout's own forced one arrives)
        if kube.requests[-1]["query"].get("force", ["false"])[0].lower() != "true":
            kube.before_write = changed
            return
        kube.apply("deployments", "models", "digits-v2", theirs, "argocd-controller", force=True)

    kube.before_write = changed
    with pytest.raises(RouterError) as refused:
        deployments.apply("2", image("2"), replicas=3)
    kube.before_write = None
    assert "apply Deployment digits-v2" in str(refused.value)
    assert "changed since" in str(refused.value)
    live = deployment(kube, "2")
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "img:theirs"  # not taken over
    assert live["spec"]["replicas"] == 0


def status_written_before_a_forced_apply(kube, version: str, replicas: int, every: bool = True):
    """At stage 1, version ``version``'s Deployment scaled to ``replicas`` by the rollout (its scale
    subresource), and the controller's status write (observedGeneration) before the rollout's forced
    apply of it: before each one (``every``), or the first only. The target's deployments."""
    from kubernetes import client

    at_stage_1(kube)
    deployments = steps.serving().deployments("digits")
    apps = client.AppsV1Api(deployments._apps().api_client)
    apps.patch_namespaced_deployment_scale(
        f"digits-v{version}", "models", {"spec": {"replicas": replicas}}, field_manager="model-rollout"
    )

    def changed() -> None:
        forced = kube.requests[-1]["query"].get("force", ["false"])[0].lower() == "true"
        if every or not forced:
            kube.before_write = changed
        if forced:
            kube.touch(
                "deployments",
                "models",
                f"digits-v{version}",
                lambda o: o.setdefault("status", {}).update(observedGeneration=99),
            )

    kube.before_write = changed
    return deployments


def test_a_status_change_before_the_forced_apply_of_the_rollouts_own_fields_is_read_again_and_applied(kube):
    """A status-only write (the Deployment controller's observedGeneration, readyReplicas) between
    the read and the forced retry of an apply refused only for the rollout's own field manager's
    other writes: the forced apply, at the resourceVersion read, is refused (409); nothing another
    manager owns changed, so the Deployment is read again and applied again (``Conflicted``), and
    the apply succeeds, the count as asked."""
    deployments = status_written_before_a_forced_apply(kube, "2", 0, every=False)
    deployments.apply("2", image("2"), replicas=3)
    kube.before_write = None
    live = deployment(kube, "2")
    assert live["spec"]["replicas"] == 3
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == image("2")
    forced = [
        r
        for r in kube.writes()
        if r["path"].endswith("/deployments/digits-v2") and r["query"].get("force", ["false"])[0].lower() == "true"
    ]
    assert len(forced) == 2  # (the first refused at the resourceVersion read, the second after a read)


def test_a_rollbacks_scale_whose_forced_apply_is_refused_at_each_try_sets_its_count_through_the_scale_subresource(
    kube,
):
    """A rollback's scale whose apply is refused only for the rollout's own writes and whose forced
    retry is refused (409) at each try (a controller writing the Deployment's status between each
    read and write): ``Contended``, and the rollback's count is set through the scale subresource
    all the same (its fallback), not the rollback failed before its routes move back."""
    deployments = status_written_before_a_forced_apply(kube, "1", 1)
    assert deployments.scale("1", 4, rolling_back=True)
    kube.before_write = None
    assert deployment(kube, "1")["spec"]["replicas"] == 4


@pytest.mark.real_pauses  # (the pauses on the fake clock)
@pytest.mark.parametrize("answer_s", [2.0, 2.5])
def test_the_failure_callbacks_scale_of_a_baseline_at_0_read_again_keeps_the_routes_write_its_time(
    kube, monkeypatch, tmp_path, caplog, answer_s
):
    """The failure callback's restore of a baseline at 0 pods (a promotion cut short, no
    autoscaling): its apply refused only for the rollout's own scale subresource's write, its
    forced apply refused (409) at each try (a status write before each), so it read the Deployment
    again and applied again (``Conflicted``), then fell back on the scale subresource and its
    budget, unheld to the calls after it: at 2 s a call the routes write was cut at the cap (10% of
    the traffic left on the candidate). The scale's tries again keep the routes write and the
    lease's release their time."""
    deployments = status_written_before_a_forced_apply(kube, "1", 0)
    now, tries = fake_api_time(monkeypatch, answer_s)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    kube.before_write = None
    assert now[0] <= steps.CALLBACK_CAP_S
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits") is None
    assert tries[-1][:2] == ("DELETE", "/apis/coordination.k8s.io/v1/namespaces/models/leases/rollout-digits")
    # (the time allows its scale: version 1 back at the pods that serve now, through its fallback)
    assert deployment(kube, "1")["spec"]["replicas"] == max(
        deployments.build.replicas, deployment(kube, "2")["spec"]["replicas"]
    )
    assert deployment(kube, "1")["spec"]["replicas"] > 0


@pytest.mark.real_pauses  # (the pauses on the fake clock)
@pytest.mark.parametrize("answer_s", [2.0, 2.5])
def test_the_failure_callbacks_scale_of_a_baseline_at_0_answered_500_is_given_up_for_the_reserve_and_said_so(
    kube, monkeypatch, tmp_path, caplog, answer_s
):
    """As above, the baseline's scale from 0 answered 500 three times (a write whose outcome is
    unknown, ``Unsettled``): ``reserved`` held back only the read again after a 409, so the
    backoff and the reads back after each 500 used up the callback's time: the routes' read was
    cut at the cap, and the report blamed the time budget, not the scale. The tries after a write
    in doubt keep the calls after them their time too: the scale is given up in time and said so
    (its 500, not read back, the calls after it keep their time). The routes stay on the candidate
    (the chosen policy: no traffic to a version with no pods, as Argo Rollouts' dynamicStableScale
    scales the stable version up before it shifts any), which the report said only as "nothing
    tries again": it says why they stay, that the run keeps the lease, and that the model's next
    run takes it over once it runs out."""
    from kubernetes import client

    at_stage_1(kube)
    deployments = steps.serving().deployments("digits")
    apps = client.AppsV1Api(deployments._apps().api_client)
    apps.patch_namespaced_deployment_scale(
        "digits-v1", "models", {"spec": {"replicas": 0}}, field_manager="model-rollout"
    )
    kube.throttle, kube.throttle_status, kube.throttled_methods = 3, 500, frozenset({"PATCH"})
    kube.throttled_path, kube.throttle_served = "/deployments/digits-v1", False
    now, _ = fake_api_time(monkeypatch, answer_s)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    kube.throttle = 0
    assert now[0] <= steps.CALLBACK_CAP_S
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    for text in (report, caplog.text):
        assert "apply Deployment digits-v1: 500 Internal Server Error" in text
        assert "the last may have been served: not read back, the calls after it keep their time" in text
        assert "time budget ran out" not in text
        # (its last 500 not read back, for the reserve: it may have landed, never said "not scaled")
        assert "version 1 may have been scaled back to 2 pods from 0 or not" in text
        assert "was not scaled back" not in text
        assert "the traffic on version 2, the candidate, stays there rather than go to a version with no pods" in text
        assert "this run keeps the model's lease" in text
        assert "once the lease runs out the model's next run takes the model over" in text
        assert "nothing tries again" not in text
    assert routes(kube) == [("v1", 90), ("v2", 10)]  # (as they were)
    assert lease(kube, "digits") is not None  # (kept)


@pytest.mark.real_pauses  # (the pauses on the fake clock)
def test_a_baseline_scaled_back_from_0_whose_budget_got_no_answer_takes_the_traffic_back(
    kube, monkeypatch, tmp_path, caplog
):
    """The failure callback's restore of a baseline at 0 pods (a promotion cut short, no
    autoscaling): its Deployment scaled back to 2 pods, then its PodDisruptionBudget's apply got no
    answer (ApiUnreachable). That failure was taken for the scale's: the report said "version 1 was
    not scaled back to 2 pods from 0, so the routes are not moved" while it ran 2 pods, and the
    traffic stayed on the candidate. A budget never holds back a rollback: the routes go back to
    version 1, and the report says the budget was not applied and what to set it to, by hand."""
    from kubernetes import client

    at_stage_1(kube)
    deployments = steps.serving().deployments("digits")
    apps = client.AppsV1Api(deployments._apps().api_client)
    apps.patch_namespaced_deployment_scale(
        "digits-v1", "models", {"spec": {"replicas": 0}}, field_manager="model-rollout"
    )
    kube.throttle, kube.throttle_status, kube.throttled_methods = 50, None, frozenset({"PATCH"})
    kube.throttled_path, kube.throttle_served = "/poddisruptionbudgets/digits-v1", False
    now, _ = fake_api_time(monkeypatch, 0.2)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    kube.throttle = 0
    assert now[0] <= steps.CALLBACK_CAP_S
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert deployment(kube, "1")["spec"]["replicas"] == 2
    assert routes(kube) == [("v1", 100)]
    assert "was not scaled back" not in report
    assert "the routes are not moved" not in report
    assert "version 1 takes 100%" in report
    assert "PodDisruptionBudget models/digits-v1 was not applied" in report
    (command,) = re.findall(
        r"kubectl -n models patch poddisruptionbudget digits-v1 .*?--field-manager=model-rollout", report
    )
    assert by_hand(command, "poddisruptionbudget", "digits-v1") == {"spec": {"minAvailable": None, "maxUnavailable": 1}}


@pytest.mark.real_pauses  # (the pauses on the fake clock)
def test_a_promotion_cut_short_whose_baseline_is_not_scaled_back_says_the_next_run_refuses_and_what_to_do(
    kube, monkeypatch, tmp_path, caplog
):
    """As above, a promotion cut short (version 2 at 100%, version 1 at 0 pods), the failure
    callback's scale of version 1 answered 500: the routes stay, and the report said "once the
    lease runs out the model's next run takes the model over and moves the routes back to version
    1". A next run takes over only routes a rollout against its baseline leaves mid-stage (the
    baseline the larger share: ``mesh.mid_rollout_against``); these it refuses ("baseline version 1
    is not what serves now ... This run touched nothing"). The report says so, and how to put
    version 1 back by hand: scale it up, then send it all of the traffic with ``rolloutctl mesh
    apply``."""
    import shlex

    from kubernetes import client

    at_stage_1(kube)
    stable_virtual_service(kube, PARAMS, serving="2")
    deployments = steps.serving().deployments("digits")
    apps = client.AppsV1Api(deployments._apps().api_client)
    apps.patch_namespaced_deployment_scale(
        "digits-v1", "models", {"spec": {"replicas": 0}}, field_manager="model-rollout"
    )
    kube.throttle, kube.throttle_status, kube.throttled_methods = 3, 500, frozenset({"PATCH"})
    kube.throttled_path, kube.throttle_served = "/deployments/digits-v1", False
    with pytest.MonkeyPatch.context() as clock:
        fake_api_time(clock, 2.0)
        steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    kube.throttle = 0
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert routes(kube) == [("v2", 100)]
    assert lease(kube, "digits") is not None
    assert "takes the model over" not in report
    assert "once the lease runs out the model's next run refuses to start" in report
    (scale,) = re.findall(r"kubectl -n models patch deployment digits-v1 .*?--field-manager=model-rollout", report)
    assert by_hand(scale.replace(" --subresource=scale", ""), "deployment", "digits-v1") == {"spec": {"replicas": 2}}
    (apply,) = re.findall(r"echo [^;]*; rolloutctl mesh apply [^:)]*", report)
    echo, words = (shlex.split(part) for part in apply.split(";"))
    assert echo[0] == "echo"
    assert echo[2:] == [">", "digits-stable.json"]
    assert json.loads(echo[1]) == {"route": [{"version": "1", "weight": 100}]}
    assert words[words.index("--policy") + 1] == "digits-stable.json"
    options = {
        w: words[i + 1] for i, w in enumerate(words) if w in ("--namespace", "--service", "--name", "--versions")
    }
    assert options == {"--namespace": "models", "--service": "digits", "--name": "digits", "--versions": "1"}
    assert "--force" in words
    expire(kube)  # (what the report says: the next run refuses, touching nothing)
    with pytest.raises(AirflowFailException, match="This run touched nothing"):
        steps.build_image(PARAMS, "run-2")
    assert routes(kube) == [("v2", 100)]


@pytest.mark.real_pauses  # (the pauses on the fake clock)
def test_the_by_hand_routes_of_a_baseline_not_scaled_back_apply_as_written_though_a_mirror_is_left(
    kube, monkeypatch, tmp_path
):
    """Stage 2 at 60% with the mirror on, the baseline scaled to 0 meanwhile, the failure
    callback's scale of it answered 500: the report gave, to send version 1 all of the traffic by
    hand, "rolloutctl mesh apply --backend istio --policy digits-stable.json --namespace models
    --service digits --name digits --versions 1 --force", which rolloutctl refused ("the policy
    changes the mirror (50% to version 2, now none): give --run-dir ... nothing changed"), and
    without --model would record the mirror under the VirtualService's name, not the model's.
    The command gives the connection's run folder and the model, and the mesh's root namespace
    and cluster domain: run as written (the CLI's own parser, against the API server), it puts
    version 1 back at 100%, the mirror off and recorded off for model digits."""
    import shlex

    from kubernetes import client
    from kubernetes.config import kube_config

    from vision_rollout import cli
    from vision_rollout.mirrors import mirror_log

    params = {**PARAMS, "stages": [10, 60, 100], "mirror_percent": 50}
    stable_virtual_service(kube, params)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    assert routes(kube) == [("v1", 40), ("v2", 60)]
    apps = client.AppsV1Api(steps.serving().deployments("digits")._apps().api_client)
    apps.patch_namespaced_deployment_scale(
        "digits-v1", "models", {"spec": {"replicas": 0}}, field_manager="model-rollout"
    )
    kube.throttle, kube.throttle_status, kube.throttled_methods = 3, 500, frozenset({"PATCH"})
    kube.throttled_path, kube.throttle_served = "/deployments/digits-v1", False
    with pytest.MonkeyPatch.context() as clock:
        fake_api_time(clock, 2.0)
        steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    kube.throttle = 0
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert routes(kube) == [("v1", 40), ("v2", 60)]  # (as they were: no pods to send them to)
    (apply,) = re.findall(r"echo [^;]*; (rolloutctl mesh apply .*?): --force while", report)
    (echo,) = re.findall(r"(echo [^;]*);", report)
    _, policy, into, file = shlex.split(echo)
    assert into == ">"
    words = shlex.split(apply)
    assert words[:3] == ["rolloutctl", "mesh", "apply"]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(kube.kubeconfig("models")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)  # loading sets it
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    (tmp_path / "operator").mkdir()
    monkeypatch.chdir(tmp_path / "operator")
    Path(file).write_text(policy + "\n")  # (what the echo writes)
    assert cli.main(words[1:]) == 0  # (rolloutctl's own parser and command, against the API server)
    assert routes(kube) == [("v1", 100)]
    assert "mirror" not in kube.objects[("virtualservices", "models", "digits")]["spec"]["http"][-1]
    last = mirror_log(Folder(str(tmp_path)), "digits").last()  # (recorded for the model, in the run folder)
    assert last is not None
    assert last.percent == 0
    args = cli.parser().parse_args(words[1:])
    assert (args.root_namespace, args.cluster_domain) == ("istio-system", "cluster.local")  # (the target's)


def by_hand(command: str, kind: str, name: str) -> dict:
    """A command a report gives to change an object by hand (``shlex.split``): a merge patch of
    ``kind`` ``name`` in models under the rollout's field manager. Its patch."""
    import shlex

    words = shlex.split(command)
    assert words[:6] == ["kubectl", "-n", "models", "patch", kind, name]
    options = dict(w.split("=", 1) for w in words[6:] if w.startswith("--"))
    assert options == {"--type": "merge", "--field-manager": "model-rollout"}
    return json.loads(words[words.index("-p") + 1])


def test_the_commands_that_release_a_floor_or_set_a_budget_by_hand_keep_the_rollouts_field_manager(
    kube, monkeypatch, tmp_path
):
    """The advice for a floor not released (set minReplicas by hand and remove the annotation)
    and for a budget not updated (``kubectl edit poddisruptionbudget``) had kubectl's field
    manager take the fields from the rollout's: the next hold of that floor, or apply of that
    budget, refused (409, "also managed by kubectl-edit"). Each is a merge patch under the
    rollout's field manager, with the values to set. (Their shape and values are checked here; the
    next test sends them to the fake API server.)"""
    import re

    from devstack.cluster.kube import APIError
    from vision_rollout.mesh import RouterError

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=2)
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load
    assert deployments.hold_floor("1") == 10
    refuse(kube, ("PATCH", "/horizontalpodautoscalers/digits-v1", APIError(403, "Forbidden", "cannot patch")))
    with pytest.raises(RouterError) as failed:
        deployments.release_floor("1")
    kube.before_write = None
    said = str(failed.value)
    assert "403" in said
    (command,) = re.findall(
        r"kubectl -n models patch horizontalpodautoscaler \S+ .*--field-manager=model-rollout", said
    )
    patch = by_hand(command, "horizontalpodautoscaler", "digits-v1")
    annotations = {"model-rollout/own-min-replicas": None, "model-rollout/held-min-replicas": None}
    assert patch == {"spec": {"minReplicas": 2}, "metadata": {"annotations": annotations}}
    kube.throttle, kube.throttle_status = 10**6, None  # the budget's calls get no answer
    kube.throttled_path = "/poddisruptionbudgets/digits-v1"
    with pytest.raises(RouterError) as failed:
        deployments.release_floor("1")
    kube.throttle = 0
    said = str(failed.value)
    assert "edit poddisruptionbudget" not in said
    (command,) = re.findall(r"kubectl -n models patch poddisruptionbudget \S+ .*--field-manager=model-rollout", said)
    # (a floor of 2, autoscaled: one pod may go, minAvailable removed)
    assert by_hand(command, "poddisruptionbudget", "digits-v1") == {"spec": {"minAvailable": None, "maxUnavailable": 1}}


def test_the_advice_to_release_a_floor_by_hand_applied_releases_it_and_the_next_apply_takes_it_on(
    kube, monkeypatch, tmp_path
):
    """The commands a refused floor release prints (a merge patch of the version's
    PodDisruptionBudget, then of its HPA, under the rollout's field manager) were checked only for
    their shape: the fake API server answered 415 to a merge patch of either, where a real one
    takes a JSON merge patch of any object. Sent as kubectl sends them, they release the floor (the
    HPA at its own minReplicas, no floor annotation, the budget at the floor's), the fields owned by
    the rollout's manager's Update; the rollout then reads no floor held, and its next apply of the
    HPA (the floor held again) is not refused for those fields."""
    import re
    import shlex

    from kubernetes import client

    from devstack.cluster.kube import APIError
    from vision_rollout.deploy import Released
    from vision_rollout.mesh import RouterError

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=2)
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load
    assert deployments.hold_floor("1") == 10
    refuse(kube, ("PATCH", "/horizontalpodautoscalers/digits-v1", APIError(403, "Forbidden", "cannot patch")))
    with pytest.raises(RouterError) as failed:
        deployments.release_floor("1")
    kube.before_write = None
    said = str(failed.value)
    budget_command, hpa_command = re.findall(
        r"kubectl -n models patch (?:poddisruptionbudget|horizontalpodautoscaler) \S+ \S+ -p '[^']*' "
        r"--field-manager=model-rollout",
        said,
    )
    api = deployments.api_client
    for command, kind, send in (
        (budget_command, "poddisruptionbudget", client.PolicyV1Api(api).patch_namespaced_pod_disruption_budget),
        (
            hpa_command,
            "horizontalpodautoscaler",
            client.AutoscalingV2Api(api).patch_namespaced_horizontal_pod_autoscaler,
        ),
    ):
        assert shlex.split(command)[4] == kind
        send(
            "digits-v1",
            "models",
            by_hand(command, kind, "digits-v1"),
            field_manager="model-rollout",
            _content_type="application/merge-patch+json",  # (kubectl's --type=merge)
        )
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2
    assert (hpa(kube, "1")["metadata"].get("annotations") or {}) == {}
    budget = kube.objects[("poddisruptionbudgets", "models", "digits-v1")]
    assert {k: budget["spec"][k] for k in ("maxUnavailable", "minAvailable") if k in budget["spec"]} == {
        "maxUnavailable": 1
    }
    updates = [e for e in hpa(kube, "1")["metadata"]["managedFields"] if e["operation"] == "Update"]
    assert [(e["manager"], "f:minReplicas" in e["fieldsV1"]["f:spec"]) for e in updates] == [("model-rollout", True)]
    assert deployments.held_floor("1") is None
    assert deployments.release_floors(keep=None) == Released([], [])  # (the next run's start: nothing held)
    assert deployments.hold_floor("1") == 10  # (the rollout's next apply: its own manager's fields, taken back)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 10


def test_the_advice_to_release_a_floor_by_hand_sets_its_budget_too(kube, monkeypatch, tmp_path):
    """A floor's release whose HPA apply was refused gave the command that releases the floor by
    hand (minReplicas back, the floor's annotations removed) and said nothing of the version's
    PodDisruptionBudget: followed, it left the budget at the floor held (maxUnavailable 1 at 10
    pods, where a floor of 1 keeps its last pod: minAvailable 1), with neither the floor's record
    nor a budget-pending mark for a later run to correct it. The advice gives the budget's command
    too, before the HPA's (a budget of the floor released is no harm while the floor is held), with
    the budget at the floor released."""
    import re

    from devstack.cluster.kube import APIError
    from vision_rollout.mesh import RouterError

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=1)
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load
    assert deployments.hold_floor("1") == 10
    budget = kube.objects[("poddisruptionbudgets", "models", "digits-v1")]["spec"]
    assert (budget.get("minAvailable"), budget.get("maxUnavailable")) == (None, 1)  # the floor held's
    refuse(kube, ("PATCH", "/horizontalpodautoscalers/digits-v1", APIError(403, "Forbidden", "cannot patch")))
    with pytest.raises(RouterError) as failed:
        deployments.release_floor("1")
    kube.before_write = None
    said = str(failed.value)
    (floor,) = re.findall(r"kubectl -n models patch horizontalpodautoscaler \S+ .*?--field-manager=model-rollout", said)
    (budget_command,) = re.findall(
        r"kubectl -n models patch poddisruptionbudget \S+ .*?--field-manager=model-rollout", said
    )
    assert said.index(budget_command) < said.index(floor)
    assert by_hand(floor, "horizontalpodautoscaler", "digits-v1")["spec"] == {"minReplicas": 1}
    assert by_hand(budget_command, "poddisruptionbudget", "digits-v1") == {
        "spec": {"minAvailable": 1, "maxUnavailable": None}
    }


def test_a_helm_releases_baseline_is_refused_before_anything_moves_not_at_its_retirement(kube, monkeypatch, tmp_path):
    """Under autoscaling (spec.replicas the HPA's), a baseline Helm installed (its label
    app.kubernetes.io/managed-by: Helm, Helm's field): the rollout went through every stage, routed
    100% to the candidate, and its apply retiring the baseline was refused (409 on that label), the
    promotion rolled back. The retirement's apply is now sent as a dry run before the candidate is
    deployed (and before a promotion moves anything): refused there, naming the field and Helm."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import render_deployment

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    versions = steps.ModelServerHook().deployments("digits")
    helm = render_deployment(versions.target, "digits", "1", image("1"), None, versions.build)
    helm["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    kube.objects.pop(("deployments", "models", "digits-v1"), None)  # (Helm's, not the overlay's)
    apply_object(versions.api_client, helm, manager="helm")
    before = len(kube.requests)
    with pytest.raises(AirflowFailException) as refused:
        steps.deploy_candidate(PARAMS, image("2"), "run-1")
    said = str(refused.value)
    assert '"helm" owns .metadata.labels.app.kubernetes.io/managed-by' in said
    assert "a Helm release's object" in said
    assert said.endswith("The rollout could not retire version 1 once promoted")
    assert [w["path"] for w in changes(kube, before) if "/leases/" not in w["path"]] == []
    assert ("deployments", "models", "digits-v2") not in kube.objects
    assert deployment(kube, "1")["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("manager", ["helm", "kubectl-edit"])
def test_a_baseline_floor_another_manager_owns_is_refused_before_the_candidate_is_deployed(
    kube, monkeypatch, tmp_path, manager
):
    """Under autoscaling, the baseline's HPA a Helm release installed, or its minReplicas set by
    ``kubectl edit``: stage 1's hold_floor (its minReplicas raised to the pods it runs) was
    refused (409) after the candidate was deployed. The floor's apply is now sent as a dry run
    before the candidate is deployed: refused there, naming the field and its manager, no
    candidate made."""
    from vision_rollout.deploy import render_hpa

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    versions = steps.ModelServerHook().deployments("digits")
    theirs = render_hpa(versions.target, "1", 3, 40)
    if manager == "helm":
        theirs["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
        kube.objects.pop(("horizontalpodautoscalers", "models", "digits-v1"))  # (Helm's, not the rollout's)
    kube.apply("horizontalpodautoscalers", "models", "digits-v1", theirs, manager, force=True)  # (an edit's Update)
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load
    take("run-1")
    before = len(kube.requests)
    with pytest.raises(AirflowFailException) as refused:
        steps.deploy_candidate(PARAMS, image("2"), "run-1")
    said = str(refused.value)
    assert said.startswith("apply HorizontalPodAutoscaler digits-v1: fields another field manager owns")
    assert f'"{manager}" owns ' in said
    assert ".spec.minReplicas" in said
    assert said.endswith("could not hold version 1's floor while the candidate takes a share of its traffic")
    assert [w["path"] for w in changes(kube, before) if "/leases/" not in w["path"]] == []
    assert ("deployments", "models", "digits-v2") not in kube.objects
    assert hpa(kube, "1")["spec"]["minReplicas"] == 3


@pytest.mark.parametrize("check", ["floor", "retirement"])
def test_a_failed_not_refused_dry_run_before_the_candidate_is_retried_not_final(kube, monkeypatch, tmp_path, check):
    """Under autoscaling, the baseline's HPA the rollout's own, scaled past its floor: the dry runs
    of its floor's hold and of its retirement, answered 500 by the API server (etcd timing out),
    failed deploy_candidate for good (AirflowFailException: no retry), saying the rollout could
    not hold the floor or retire the baseline. A failure of the API server is not a refusal: it
    is raised as it came (Airflow's retry asks again), and the retry deploys the candidate."""
    from vision_rollout.mesh import WRITE_TRIES, ApiFailed

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load: a floor to hold
    own = hpa(kube, "1")["spec"]["minReplicas"]
    kube.throttle, kube.throttle_status, kube.throttled_methods = WRITE_TRIES, 500, frozenset({"PATCH"})
    kube.throttled_path = "/horizontalpodautoscalers/digits-v1" if check == "floor" else "/deployments/digits-v1"
    with pytest.raises(ApiFailed) as failed:
        steps.deploy_candidate(PARAMS, image("2"), "run-1")
    assert str(failed.value).startswith(
        f"apply {'HorizontalPodAutoscaler' if check == 'floor' else 'Deployment'} digits-v1: 500 Internal Server Error"
    )
    assert "could not" not in str(failed.value)
    # (an HPA's read back finds its apply in place or not; a Deployment's is applied again whatever it finds)
    assert ("each read back found it not in place" in str(failed.value)) == (check == "floor")
    assert ("deployments", "models", "digits-v2") not in kube.objects
    kube.throttle = 0
    steps.deploy_candidate(PARAMS, image("2"), "run-1")  # Airflow's retry
    assert deployment(kube, "2")["spec"]["template"]["spec"]["containers"][0]["image"] == image("2")
    assert hpa(kube, "1")["spec"]["minReplicas"] == own < 10  # (a dry run: held at stage 1)


def helms_hpa(kube, versions, floor: int) -> None:
    """Version 1's HPA (``floor`` to 40 pods) as a Helm release installed it: Helm's, not the
    rollout's."""
    from vision_rollout.deploy import render_hpa

    theirs = render_hpa(versions.target, "1", floor, 40)
    theirs["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    kube.objects.pop(("horizontalpodautoscalers", "models", "digits-v1"), None)
    kube.apply("horizontalpodautoscalers", "models", "digits-v1", theirs, "helm", force=True)


def test_a_baseline_floor_another_manager_owns_refused_at_stage_1_after_its_hpa_scaled_it_up(
    kube, monkeypatch, tmp_path
):
    """Under autoscaling, the baseline's HPA a Helm release's, the baseline at that HPA's floor
    when the candidate was deployed (nothing to hold then: the dry run had nothing to send), its
    HPA scaling it up (3 pods to 10) before stage 1: stage 1's hold_floor was refused (409) with
    the API server's words alone, as if the check before the candidate had not been made. It
    fails before any weight moves, naming the HPA, its own floor and the pods it runs now, and
    that it scaled since that check; the HPA stays Helm's."""

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    versions = steps.ModelServerHook().deployments("digits")
    helms_hpa(kube, versions, 3)
    kube.scale("models", "digits-v1", 3, "kube-controller-manager")  # at its floor: a quiet hour
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.deploy_candidate(params, image("2"), "run-1")
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # then its HPA, under load
    with pytest.raises(AirflowFailException) as refused:
        steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    said = str(refused.value)
    assert said.startswith("apply HorizontalPodAutoscaler digits-v1: fields another field manager owns")
    assert '"helm" owns ' in said
    assert (
        "HorizontalPodAutoscaler models/digits-v1 scaled version 1 above its floor (minReplicas 3) to 10 pods" in said
    )
    assert said.endswith("No weight moved")
    assert routes(kube) == [("v1", 100)]
    assert hpa(kube, "1")["spec"]["minReplicas"] == 3


def test_a_transient_refusal_of_stage_1_floor_is_retried_not_blamed_on_the_hpa(kube, monkeypatch, tmp_path):
    """Under autoscaling, the baseline's HPA the rollout's own, scaled up past its floor after the
    candidate was deployed: stage 1's hold of that floor answered 500 (etcd timing out; a write
    is not sent again by the client) failed the step for good, saying the HPA had scaled the
    baseline above its floor and to clear the task once it was back at it. Answered 500 at each
    of its tries (each read back), the API server's failure is raised as it came (a RouterError:
    Airflow's retry tries again), naming the HPA apply refused, no weight moved; the step run
    again holds the floor and moves the weights."""
    from vision_rollout.mesh import WRITE_TRIES, RouterError

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.deploy_candidate(params, image("2"), "run-1")
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load: a floor to hold
    kube.throttle, kube.throttle_status, kube.throttled_methods = WRITE_TRIES, 500, frozenset({"PATCH"})
    with pytest.raises(RouterError) as refused:
        steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    said = str(refused.value)
    assert said.startswith("apply HorizontalPodAutoscaler digits-v1: 500 Internal Server Error: ")
    assert "above its floor" not in said
    assert "clear this task" not in said
    assert routes(kube) == [("v1", 100)]
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})  # Airflow's retry
    assert hpa(kube, "1")["spec"]["minReplicas"] == 10
    assert routes(kube) == [("v1", 90), ("v2", 10)]


def test_under_autoscaling_a_rollback_scales_the_stable_version_back_before_it_takes_the_traffic(
    kube, monkeypatch, tmp_path
):
    """The stable version's HPA shrank it as the candidate took half of the traffic (10 pods to
    5); a rollback sent all of the traffic back to its 5 pods, until its HPA saw the load.
    It is now scaled to the pods serving now (both versions') before the routes move back."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 10)
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    assert deployment(kube, "2")["spec"]["replicas"] == 5
    kube.scale("models", "digits-v1", 5, "kube-controller-manager")  # half of the traffic, half of the pods
    since = len(kube.requests)
    steps.restore_stable(params, "run-1")
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == 10
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2  # its own floor kept
    done = calls(kube, since)
    assert done.index(("PATCH", "digits-v1/scale")) < done.index(("PATCH", "virtualservices/digits"))
    assert deployment(kube, "2")["spec"]["replicas"] == 0


def test_under_autoscaling_a_rollback_moves_the_traffic_back_though_the_stable_versions_apply_is_refused(
    kube, monkeypatch, tmp_path, caplog
):
    """Under autoscaling, the rollback scales the stable version back ahead of the traffic; its
    Deployment's apply refused (a policy webhook added since, denying it): the rollback stopped
    before the routes moved, every retry the same, and the candidate kept half of the traffic
    though the stable version had 5 ready pods. Its count is set through its scale subresource
    instead (which the webhook does not match), as the apply would have set it, the refusal logged,
    and the traffic goes back; the HPA keeps its own floor."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 10)
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    kube.scale("models", "digits-v1", 5, "kube-controller-manager")
    restored_past_a_denial(kube, params, 10, caplog)
    assert 'apply Deployment digits-v1: 400 Bad Request: admission webhook "policy.example.com"' in caplog.text
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2  # its own floor kept


@pytest.mark.parametrize("autoscaling", [False, True], ids=["replicas", "autoscaling"])
def test_a_rollback_to_a_baseline_at_0_whose_apply_a_webhook_denies_scales_it_back_through_its_scale_subresource(
    kube, monkeypatch, tmp_path, caplog, autoscaling
):
    """The stable version retired (at 0: a promotion cut short), and a policy webhook added since
    denies its Deployment's apply (the template the rollout re-applies with its count): the
    rollback raised the refusal with no pod started, and the routes stayed on the candidate, every
    retry the same. Its count is set through its scale subresource (the pods run the template the
    API server holds), its HPA or its budget applied after it as ever, and the traffic goes back
    once a pod is ready; the webhook's refusal is logged. Where the scale subresource is denied
    too, the error says both, and the routes stay (no traffic to a version with no pods)."""
    from vision_rollout.mesh import RouterError

    build = {"autoscaling": True, "max_replicas": 40} if autoscaling else {}
    versions = baseline_at_0(kube, monkeypatch, tmp_path, serving=3, replicas=2, **build)
    after = restored_past_a_denial(kube, PARAMS, 3, caplog)  # (the candidate's pods, that served the traffic)
    assert ("PATCH", "poddisruptionbudgets/digits-v1") in after  # (its budget after the count, as ever)
    # (its HPA read after the count and applied unless it holds the spec already)
    assert (("GET", "horizontalpodautoscalers/digits-v1") in after) == autoscaling

    versions.scale_to_zero("1")  # (retired again; the scale subresource denied as well now)
    denied = webhook_denial()
    refuse(kube, ("PATCH", "/deployments/digits-v1", denied), ("PATCH", "/deployments/digits-v1/scale", denied))
    with pytest.raises(RouterError) as failed:
        versions.scale("1", 3, "1", rolling_back=True)
    kube.before_write = None
    assert str(failed.value).startswith("apply Deployment digits-v1: 400")
    assert "; then through its scale subresource: scale Deployment digits-v1: 400" in str(failed.value)
    assert deployment(kube, "1")["spec"]["replicas"] == 0


def webhook_denial() -> Exception:
    """A policy webhook's denial of a write, as the API server answers it (an ``APIError``)."""
    from devstack.cluster.kube import APIError

    return APIError(400, "BadRequest", 'admission webhook "policy.example.com" denied the request')


def restored_past_a_denial(kube: FakeKubeAPI, params: dict, pods: int, caplog: pytest.LogCaptureFixture) -> list:
    """Run-1's rollback with every apply of version 1's Deployment denied (``webhook_denial``):
    version 1 scaled to ``pods`` through its scale subresource before the routes move back to it,
    said in the log, the candidate retired. The calls after that scale."""
    refuse(kube, ("PATCH", "/deployments/digits-v1", webhook_denial()))
    since = len(kube.requests)
    steps.restore_stable(params, "run-1")
    kube.before_write = None
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == pods
    assert f"its pods are scaled to {pods} through its scale subresource instead, for the rollback" in caplog.text
    assert 'admission webhook "policy.example.com" denied the request' in caplog.text
    done = calls(kube, since)
    scaled = done.index(("PATCH", "digits-v1/scale"))
    assert scaled < done.index(("PATCH", "virtualservices/digits"))
    assert deployment(kube, "2")["spec"]["replicas"] == 0
    return done[scaled:]


def refuse(kube: FakeKubeAPI, *rules: tuple[str, str, Exception]) -> None:
    """Every write (``kube.before_write``) whose method is a rule's and whose path ends with its
    path end refused with that rule's error (an ``APIError``), first rule first, until the test
    sets ``kube.before_write = None``."""

    def refused() -> None:
        kube.before_write = refused
        request = kube.requests[-1]
        for method, path_end, error in rules:
            if request["method"] == method and request["path"].endswith(path_end):
                raise error

    kube.before_write = refused


def ended(end: str, params: dict, caplog: pytest.LogCaptureFixture) -> str:
    """Run-1 ended by its teardown (``end`` "teardown": ensure_stable, which fails) or its failure
    callback (any other ``end``): what it said (the teardown's AirflowFailException, the callback's log)."""
    if end == "teardown":
        with pytest.raises(AirflowFailException) as failed:
            steps.ensure_stable(params, "run-1", None, None, None)
        return str(failed.value)
    steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    return caplog.text


def rollback_scale_refused(kube, monkeypatch, tmp_path) -> dict:
    """Under autoscaling, run-1 at its last stage with version 1 at 5 pods (its floor held at 10),
    and every apply of version 1's Deployment and every patch of its scale subresource refused (a
    policy webhook on both): a rollback's scale of it to 10 fails, after which its ready pods take
    the traffic back. The run's params."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 10)
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    kube.scale("models", "digits-v1", 5, "kube-controller-manager")
    denied = webhook_denial()
    refuse(kube, ("PATCH", "/deployments/digits-v1", denied), ("PATCH", "/deployments/digits-v1/scale", denied))
    return params


@pytest.mark.parametrize("end", ["teardown", "rollback"])
def test_a_lease_taken_over_before_the_candidates_retirement_stops_it_and_says_who_holds_the_model(
    kube, monkeypatch, tmp_path, end
):
    """The stable version's scale refused once the traffic is back on it; then, before the
    candidate's retirement (``retired_besides``), another run takes the model over. That LockLost
    was caught as any failure of the retirement: the report gave the command that scales to 0 the
    Deployment of a model another run holds now. The retirement stops, the report says another run
    holds the model and gives no scale command."""
    from vision_rollout.mesh import RouterError

    params = rollback_scale_refused(kube, monkeypatch, tmp_path)
    undone = steps.promotion_undone

    def taken(*args, **kwargs):
        undone(*args, **kwargs)
        kube.touch("leases", "models", "rollout-digits", lambda lease: lease["spec"].update(holderIdentity="run-2"))

    monkeypatch.setattr(steps, "promotion_undone", taken)
    if end == "teardown":
        with pytest.raises(AirflowFailException, match="version 1 was not scaled to 10 pods") as failed:
            steps.ensure_stable(params, "run-1", None, None, None)
    else:
        with pytest.raises(RouterError, match="apply Deployment digits-v1: 400") as failed:
            steps.restore_stable(params, "run-1")
    kube.before_write = None
    reports = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    for text in [str(failed.value), *reports]:
        assert "deployment digits-v2 --subresource=scale" not in text
    if end == "teardown":
        (report,) = reports
        assert "version 2 is left to run 'run-2', which holds model 'digits' now" in report
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-2"
    assert deployment(kube, "2")["spec"]["replicas"] == 5  # (not retired: run-2's to decide)


def test_a_failure_callback_before_the_candidate_was_deployed_gives_no_command_to_scale_it(kube, caplog):
    """The run took the model (build_image) and failed before deploy_candidate: no Deployment
    digits-v2. The failure callback said version 2 "is left loaded, its pods running: scale it to 0
    (kubectl -n models scale deployment digits-v2 --replicas=0)", a command for a Deployment that
    does not exist. It says the candidate has none: nothing to unload."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert ("deployments", "models", "digits-v2") not in kube.objects
    assert "deployment digits-v2 --subresource=scale" not in caplog.text
    assert "left loaded" not in caplog.text
    assert "version 2 has no Deployment: nothing to unload" in caplog.text
    assert routes(kube) == [("v1", 100)]


def test_a_failure_callback_before_the_candidate_was_deployed_gives_no_command_for_one_at_0_pods(kube, caplog):
    """As above, but an earlier run retired version 2 (its Deployment kept, at 0 replicas): the
    failure callback counted a Deployment as running pods and said version 2 "is left loaded, its
    pods running: scale it to 0", for a version that runs none. Running means pods asked for
    (``spec.replicas`` above 0): it says the candidate runs none, nothing to unload."""
    stable_virtual_service(kube, PARAMS)
    steps.ModelServerHook().deployments("digits").apply("2", image("2"), replicas=0)
    take("run-1")
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert deployment(kube, "2")["spec"]["replicas"] == 0
    assert "left loaded" not in caplog.text
    assert "deployment digits-v2 --subresource=scale" not in caplog.text
    assert "version 2 has its Deployment at 0 pods: nothing to unload" in caplog.text
    assert routes(kube) == [("v1", 100)]


@pytest.mark.real_pauses  # (the pauses on the fake clock)
def test_a_failure_callback_with_no_time_to_read_the_candidate_says_it_may_be_left_running(
    kube, monkeypatch, tmp_path, caplog
):
    """The run failed before deploy_candidate, the API server answering in 9 s: the callback had no
    time to read version 2's Deployment (``candidate_idle``) and reported "version 2 is left
    loaded, its pods running: scale it to 0" for a version it may never have deployed. Not read,
    it says the candidate may be left running (not checked), with the command all the same."""
    stable_virtual_service(kube, PARAMS)
    steps.ModelServerHook().deployments("digits").apply("1", image("1"))
    take("run-1")
    fake_api_time(monkeypatch, 9.0)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert ("deployments", "models", "digits-v2") not in kube.objects
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert "its pods running" not in report
    assert "version 2 may be left running (not checked): scale it to 0" in report
    assert "deployment digits-v2 --subresource=scale" in report


def test_a_failure_callback_mid_stage_reads_the_candidates_deployment_no_more_after_its_routes_write(kube, caplog):
    """Mid-stage (the routes sent version 2 a share: deploy_candidate had run), the failure
    callback put version 1 back, then read version 2's Deployment once more (``candidate_idle``)
    only to give the command that scales it to 0: one more call against its time budget, before
    the lease's release. The routes it read say the candidate was deployed: no call after the
    routes write reads it, and the command is given."""
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=2)
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    since = len(kube.requests)
    steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    done = calls(kube, since)
    routed = done.index(("PATCH", "virtualservices/digits"))
    assert ("GET", "deployments/digits-v2") not in done[routed:]
    assert "version 2 is left loaded, its pods running: scale it to 0" in caplog.text
    assert steps.serving().deployments("digits").scale_by_hand("2", 0) in caplog.text
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits") is None


def test_a_failure_callback_that_leaves_the_candidate_running_reports_it_in_slack(kube, tmp_path, caplog):
    """The failure callback put version 1 back at 100% and released the lease, but left version 2's
    pods running (no time to drain it under the DAG processor's limit: ``drain_seconds`` up to 600 s),
    and said so only in its log: nobody was told of pods (GPUs) that serve nothing, nor given the
    command that scales them to 0. It reports the rollback with that command (Slack, else the outbox)."""
    at_stage_1(kube)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits") is None
    assert kube.objects[("deployments", "models", "digits-v2")]["spec"]["replicas"] > 0
    (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert report["text"].startswith("Rolled back digits v2")
    said = report["text"]
    assert "version 2 is left loaded, its pods running: scale it to 0" in said
    assert steps.serving().deployments("digits").scale_by_hand("2", 0) in said


def test_the_command_that_scales_the_candidate_by_hand_says_the_kubectl_it_needs(kube, tmp_path):
    """A report that leaves the candidate running gives the command that scales it to 0
    (``scale_by_hand``: ``kubectl patch --subresource=scale``), which kubectl before 1.24 refuses
    (no ``--subresource`` flag): the operator tried it and got "unknown flag". The report says
    the command needs kubectl 1.24 or later, the command itself as it was."""
    at_stage_1(kube)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    command = steps.serving().deployments("digits").scale_by_hand("2", 0)
    assert f"({command}: kubectl 1.24 or later" in report["text"]


def test_a_failure_callback_whose_scale_fails_once_the_traffic_is_back_reports_it_back(
    kube, monkeypatch, tmp_path, caplog
):
    """The failure callback scaled the stable version back ahead of the traffic, the scale was
    refused, its ready pods took the traffic back, then the scale's failure was raised: the
    callback logged and reported that it "could not put version 1 back" (routes not restored),
    though version 1 took 100% of the traffic, and kept the lease, which nothing released until it
    ran out. It reports the traffic back and the scale that failed, and releases the lease."""
    params = rollback_scale_refused(kube, monkeypatch, tmp_path)
    steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    kube.before_write = None
    assert routes(kube) == [("v1", 100)]
    assert "could not put version 1 back" not in caplog.text
    assert "version 1 takes 100%" in caplog.text
    assert "version 1 was not scaled to 10 pods" in caplog.text
    assert lease(kube, "digits") is None
    (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert report["text"].startswith("Rolled back digits v2: run run-1 failed")
    assert "version 1 was not scaled to 10 pods" in report["text"]
    assert "admission webhook" in report["text"]


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_scale_that_fails_once_the_traffic_is_back_says_the_floor_stays_held_and_who_releases_it(
    kube, monkeypatch, tmp_path, caplog, end
):
    """As above, the stable version's scale to its floor (10 pods) refused once the traffic is back:
    its floor stays held on purpose (its HPA scales it up there as it takes 100% of the traffic
    again), but the report said nothing of it, so nobody knew that the floor was left held, nor
    who releases it. It says the floor stays held, that the model's next run takes it over and
    releases it when it ends (its start leaves its baseline's floor held: the report said it
    released it as it starts), and how to release it by hand."""
    params = rollback_scale_refused(kube, monkeypatch, tmp_path)
    said = ended(end, params, caplog)
    kube.before_write = None
    assert routes(kube) == [("v1", 100)]
    assert hpa(kube, "1")["spec"]["minReplicas"] == 10  # (still held)
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    for text in (report, said, caplog.text):
        assert "version 1 was not scaled to 10 pods" in text
        assert "its floor stays held (HorizontalPodAutoscaler models/digits-v1 at minReplicas 10)" in text
        assert "the model's next run takes it over and releases it when it ends" in text
        assert "--field-manager=model-rollout" in text
    # (as said: the next run's start leaves the floor on its baseline held, for that run to take over)
    spec = steps.spec_from(params)
    steps.release_leftover_floors(spec, steps.serving(), keep=spec.baseline_version)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 10


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_stable_floor_read_unanswered_before_the_routes_write_still_puts_the_traffic_back(
    kube, monkeypatch, tmp_path, caplog, end
):
    """Under autoscaling, the teardown's (and the failure callback's) read of version 1's HPA for
    the floor it holds, made only to choose the size it is scaled to before the routes' write, got
    no answer (ApiUnreachable): it was raised before the routes were written, and the traffic stayed
    on the candidate (v1 50 / v2 50). The read chooses the size alone: version 1 keeps the pods it
    runs (its HPA scales it), said so, and the routes are written."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 10)
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    assert routes(kube) == [("v1", 50), ("v2", 50)]
    kube.throttle, kube.throttle_status = 10**6, None  # the HPA's reads get no answer
    kube.throttled_methods, kube.throttled_path = frozenset({"GET"}), "/horizontalpodautoscalers/digits-v1"
    said = ended(end, params, caplog)
    kube.throttle = 0
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits") is None
    assert "version 1 was not scaled up: its HPA's floor could not be read (" in said
    assert "it serves with the pods it runs" in said


@pytest.mark.parametrize("end", ["rollback", "teardown"])
def test_a_candidate_retirement_refused_once_the_traffic_is_back_is_not_a_failed_restore(kube, tmp_path, end):
    """Mid-stage, the rollback (and the teardown) put version 1 back at 100%, then the scale of
    version 2 to 0 was refused: the rollback failed with the refusal alone, and the teardown
    reported that it "could not put version 1 back", though the traffic was back on it. Both
    say the traffic restored, and the candidate's retirement that failed."""
    from devstack.cluster.kube import APIError
    from vision_rollout.mesh import RouterError

    stable_virtual_service(kube, PARAMS)
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=2)
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    assert routes(kube) == [("v1", 90), ("v2", 10)]

    def refused() -> None:
        kube.before_write = refused
        request = kube.requests[-1]
        if request["method"] == "PATCH" and "/deployments/digits-v2" in request["path"]:
            raise APIError(403, "Forbidden", 'deployments.apps "digits-v2" is forbidden')

    kube.before_write = refused
    if end == "rollback":
        with pytest.raises(RouterError) as failed:  # (its own kind: the step's retries as for the refusal)
            steps.restore_stable(params, "run-1")
        said = [str(failed.value)]
    else:
        with pytest.raises(AirflowFailException) as failed:
            steps.ensure_stable(params, "run-1", None, None, None)
        said = [str(failed.value), *[json.loads(p.read_text())["text"] for p in (tmp_path / "outbox").glob("*.json")]]
        assert len(said) == 2
        assert lease(kube, "digits") is None  # (released: the traffic is back)
    kube.before_write = None
    for text in said:
        assert "could not put version 1 back" not in text
        assert "the retirement of version 2 failed" in text
        assert 'deployments.apps "digits-v2" is forbidden' in text
    if end == "rollback":
        assert said[0].startswith("the traffic is restored (version 1 takes 100% of it)")
    else:
        assert all("version 1 takes 100%" in text for text in said)
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "2")["spec"]["replicas"] == 1  # (not retired)


@pytest.mark.parametrize("end", ["rollback", "teardown", "candidate-refused", "failure-callback"])
def test_a_restore_whose_scale_is_refused_retires_the_candidate_all_the_same(kube, monkeypatch, tmp_path, end):
    """The stable version took the traffic back, its scale refused: the rollback and the teardown
    stopped there, and version 2 kept its 5 pods (its GPUs) though it took no traffic. As
    Flagger and Argo Rollouts do on an abort, the candidate is scaled to 0 all the same, the
    traffic back on the stable version. Where that is refused too, or not done (the failure
    callback has no time for the drain), the report says so with the command that does it."""
    from devstack.cluster.kube import APIError
    from vision_rollout.mesh import RouterError

    params = rollback_scale_refused(kube, monkeypatch, tmp_path)
    assert deployment(kube, "2")["spec"]["replicas"] == 5

    if end == "candidate-refused":  # (its apply and its scale subresource's patch)
        forbidden = APIError(403, "Forbidden", 'deployments.apps "digits-v2" is forbidden')
        denied = webhook_denial()
        refuse(
            kube,
            ("PATCH", "/deployments/digits-v1", denied),
            ("PATCH", "/deployments/digits-v1/scale", denied),
            ("PATCH", "/deployments/digits-v2", forbidden),
            ("PATCH", "/deployments/digits-v2/scale", forbidden),
        )
    command = (
        "kubectl -n models patch deployment digits-v2 --subresource=scale --type=merge "
        """-p '{"spec":{"replicas":0}}' --field-manager=model-rollout"""
    )
    if end == "rollback":
        with pytest.raises(RouterError, match="apply Deployment digits-v1: 400"):
            steps.restore_stable(params, "run-1")
    elif end in ("teardown", "candidate-refused"):
        with pytest.raises(AirflowFailException) as failed:
            steps.ensure_stable(params, "run-1", None, None, None)
        (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
        for said in (report, str(failed.value)):
            assert "could not put version 1 back" not in said
            assert "version 1 takes 100%" in said
            assert "version 1 was not scaled to 10 pods" in said
            if end == "teardown":
                assert "version 2 is unloaded" in said
            else:
                assert "version 2 is left loaded" in said
                assert "apply Deployment digits-v2: 403" in said
                assert command in said
    else:
        steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
        (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
        assert "version 2 is left loaded" in report
        assert command in report
    kube.before_write = None
    assert routes(kube) == [("v1", 100)]
    left = end in ("candidate-refused", "failure-callback")  # (refused; the callback's: no time to drain)
    assert deployment(kube, "2")["spec"]["replicas"] == (5 if left else 0)


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_restore_left_short_of_pods_whose_lease_release_fails_reports_both(kube, monkeypatch, tmp_path, caplog, end):
    """The stable version took the traffic back, its scale refused (short of pods), then the
    release of the model's lease was refused too: the failure callback took it for a lease not
    released only, which it logs, and sent no report, so nobody was told that version 1 serves
    short of pods. Either end reports both: the pods, and the lease with its command."""
    from devstack.cluster.kube import APIError

    params = rollback_scale_refused(kube, monkeypatch, tmp_path)
    denied = webhook_denial()
    refuse(
        kube,
        ("PATCH", "/deployments/digits-v1", denied),
        ("PATCH", "/deployments/digits-v1/scale", denied),
        (
            "DELETE",
            "/leases/rollout-digits",
            APIError(403, "Forbidden", 'leases.coordination.k8s.io "rollout-digits" is forbidden'),
        ),
    )
    said = ended(end, params, caplog)
    kube.before_write = None
    assert routes(kube) == [("v1", 100)]
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert report.startswith("Rolled back digits v2")
    for text in (report, said):
        assert "routes not restored" not in text
        assert "could not put version 1 back" not in text
        assert "version 1 takes 100%" in text
        assert "version 1 was not scaled to 10 pods" in text
        assert "the model's lease was not released" in text
        assert "kubectl -n models delete lease rollout-digits" in text
    assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-1"


@pytest.mark.parametrize("short", ["scale-refused", "pods-short"])
def test_a_teardown_whose_restore_fails_once_the_traffic_is_back_reports_it_back(
    kube, monkeypatch, tmp_path, caplog, short
):
    """The teardown moved the traffic back to the stable version, then its scale was refused, or
    not all of the pods it was scaled back to came (no room): its report said it "could not put
    version 1 back" (routes not restored), as for a restore that failed before the traffic moved.
    It reports the traffic back, and what is still wrong: the scale, or the pods that did not come."""
    from devstack.cluster import kube as fake_kube
    from vision_rollout.deploy import VersionDeployments

    params = PARAMS
    if short == "scale-refused":
        params = rollback_scale_refused(kube, monkeypatch, tmp_path)
        wrong = "version 1 was not scaled to 10 pods"
    else:
        at_stage_1(kube)
        kube.scale("models", "digits-v1", 0, "keda")
        steps.serving().deployments("digits").scale("2", 2)
        all_ready, wait_ready = fake_kube._ready_status, VersionDeployments.wait_ready

        def one_fits(obj: dict) -> dict:  # (room for one pod of version 1 only)
            status = all_ready(obj)
            if obj["metadata"]["name"] == "digits-v1":
                status["readyReplicas"] = status["availableReplicas"] = min(status["replicas"], 1)
            return status

        def short_wait(self, version, replicas=1, **kwargs):  # (each wait's 600 s: 1 s here)
            return wait_ready(self, version, replicas, **{**kwargs, "timeout_s": 1.0, "every_s": 0.2})

        monkeypatch.setattr(fake_kube, "_ready_status", one_fits)
        monkeypatch.setattr(VersionDeployments, "wait_ready", short_wait)
        wrong = "not all of the 2 pods of version 1 came"
    with pytest.raises(AirflowFailException) as failed:
        steps.ensure_stable(params, "run-1", None, None, None)
    kube.before_write = None
    assert routes(kube) == [("v1", 100)]
    (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    for said in (report["text"], str(failed.value)):
        assert "routes not restored" not in said
        assert "could not put version 1 back" not in said
        assert "version 1 takes 100%" in said
        assert wrong in said


def test_a_rollbacks_scale_answered_500_each_time_sends_each_write_at_most_write_tries_times(
    kube, monkeypatch, tmp_path
):
    """Under autoscaling, the rollback's scale of the stable version: its HPA's apply and its
    scale subresource answered 500 at each try. The HPA's apply (settled, 4 tries) ran inside the
    scale's own settled retry, which the scale patch's failure sent round again: 16 HPA applies,
    4 scale patches and 4 Deployment applies, 17.5 s of backoff for one try of the teardown. Each
    write is now settled on its own: at most WRITE_TRIES of each, the scale's failure raised naming
    the call (Airflow's retry tries again), once the stable version's ready pods took the traffic
    back (``test_under_autoscaling_a_rollback_moves_the_traffic_back_though_...``). A rollback sets
    the count before it touches the HPA: the scale failed, the HPA is not applied (its floor held
    stays held, as the failure says); the HPA's own apply answered 500 at each try is sent
    WRITE_TRIES times (``test_a_rollback_to_a_baseline_at_0_under_autoscaling_is_not_held_back_...``)."""
    from vision_rollout.mesh import WRITE_TRIES, ApiFailed

    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 10)
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    kube.scale("models", "digits-v1", 5, "kube-controller-manager")
    since = len(kube.requests)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 10**6, 500, frozenset({"PATCH"})
    kube.throttled_path = ("/horizontalpodautoscalers/digits-v1", "/deployments/digits-v1/scale")  # (endswith)
    with pytest.raises(ApiFailed, match=r"^scale Deployment digits-v1: 500 "):
        steps.restore_stable(params, "run-1")
    kube.throttle = 0
    sent = Counter(call for call in calls(kube, since) if call[0] == "PATCH")
    assert sent[("PATCH", "horizontalpodautoscalers/digits-v1")] == 0  # (the count first: its failure raised)
    assert sent[("PATCH", "digits-v1/scale")] == WRITE_TRIES
    assert sent[("PATCH", "deployments/digits-v1")] == 1
    assert routes(kube) == [("v1", 100)]


def test_a_rollback_moves_the_traffic_back_though_the_stable_versions_hpa_is_another_managers(
    kube, monkeypatch, tmp_path, caplog
):
    """Under autoscaling, the stable version's HPA a Helm release's, the stable version at its
    floor (nothing held: no dry run before the candidate): the rollback's scale of it ahead of
    the traffic re-applies its HPA, refused (409, Helm owns its fields), and the rollback stopped
    there, every retry the same: the candidate kept its share. The HPA's refusal is logged, the
    pods scaled all the same, and the traffic goes back."""

    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    versions = steps.ModelServerHook().deployments("digits")
    helms_hpa(kube, versions, 3)
    kube.scale("models", "digits-v1", 3, "kube-controller-manager")  # at its HPA's floor: a quiet hour
    take("run-1")
    params = {**PARAMS, "mirror_percent": 0}
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    steps.restore_stable(params, "run-1")
    assert routes(kube) == [("v1", 100)]
    assert "its pods are scaled to 4 all the same, for the rollback" in caplog.text
    assert deployment(kube, "1")["spec"]["replicas"] == 4  # (ahead of the traffic: its 3 and the candidate's 1)
    assert '"helm" owns' in caplog.text
    assert hpa(kube, "1")["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"  # (left Helm's)
    assert deployment(kube, "2")["spec"]["replicas"] == 0


def test_a_rollback_brings_a_retired_stable_version_back_though_its_hpa_is_another_managers(
    kube, monkeypatch, tmp_path, caplog
):
    """Under autoscaling, the stable version retired (at 0: a promotion cut short) and its HPA a
    Helm release's: the rollback's scale of it re-applied its HPA first, refused (409, Helm owns
    its fields), and the rollback stopped there with no pod started, every retry the same: the
    candidate kept all of the traffic. Its pods are scaled back through the scale subresource,
    the HPA's refusal logged (Helm's fields left Helm's), and the traffic goes back once they are
    ready."""

    versions = baseline_at_0(kube, monkeypatch, tmp_path, serving=3, autoscaling=True, max_replicas=40, replicas=2)
    helms_hpa(kube, versions, 2)
    steps.restore_stable(PARAMS, "run-1")
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == 3  # the candidate's pods, that served the traffic
    assert "apply HorizontalPodAutoscaler digits-v1: fields another field manager owns" in caplog.text
    assert '"helm" owns' in caplog.text
    assert hpa(kube, "1")["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"  # (left Helm's)
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2
    assert deployment(kube, "2")["spec"]["replicas"] == 0


@pytest.mark.parametrize(
    ("status", "methods"),
    [(500, {"GET", "PATCH"}), (500, {"PATCH"}), (None, {"GET", "PATCH"})],
    ids=["read-500", "apply-500", "unanswered"],
)
def test_a_rollback_to_a_baseline_at_0_under_autoscaling_is_not_held_back_by_its_hpa(
    kube, monkeypatch, tmp_path, caplog, status, methods
):
    """Under autoscaling, the stable version retired (at 0: a promotion cut short, its HPA at the
    floor the run held, 6, its own 2), its HPA's read and apply answered 500 at each try (or its apply alone, or neither
    answered): the rollback's scale of it read and applied its HPA before its count, raised there
    with no pod started, and the routes stayed on the candidate, every retry the same. Its count
    is set first (the scale subresource), then its HPA; the HPA's failure is raised once its ready
    pod took the traffic back and the candidate is retired (``AutoscalingNotApplied``, as a budget
    not applied is), each write to the HPA sent at most WRITE_TRIES times (its apply answered 500
    each time: that many)."""
    from vision_rollout.deploy import BudgetNotApplied
    from vision_rollout.mesh import WRITE_TRIES, RouterError

    versions = baseline_at_0(kube, monkeypatch, tmp_path, serving=3, autoscaling=True, max_replicas=40, replicas=2)
    versions.apply("1", image("1"), replicas=2)  # its own HPA, floor 2
    kube.scale("models", "digits-v1", 6, "kube-controller-manager")  # the HPA at a peak
    assert versions.hold_floor("1") == 6  # the run's floor
    versions.scale_to_zero("1")
    assert (deployment(kube, "1")["spec"]["replicas"], hpa(kube, "1")["spec"]["minReplicas"]) == (0, 6)
    since = len(kube.requests)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 10**6, status, frozenset(methods)
    kube.throttled_path = "/horizontalpodautoscalers/digits-v1"
    with pytest.raises(RouterError) as failed:
        steps.restore_stable(PARAMS, "run-1")
    kube.throttle = 0
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == 3  # the candidate's pods, that served the traffic
    assert deployment(kube, "2")["spec"]["replicas"] == 0  # retired all the same
    said = str(failed.value)
    assert isinstance(failed.value, BudgetNotApplied)
    assert said.startswith(
        "version 1's Deployment is scaled to 3 pods, but its HorizontalPodAutoscaler models/digits-v1 was not applied ("
    )
    assert "it takes the traffic back all the same" in caplog.text
    done = calls(kube, since)
    to_hpa = [i for i, call in enumerate(done) if call[1] == "horizontalpodautoscalers/digits-v1"]
    assert done.index(("PATCH", "digits-v1/scale")) < to_hpa[0]
    applies = Counter(done)[("PATCH", "horizontalpodautoscalers/digits-v1")]
    assert applies == (WRITE_TRIES if methods == {"PATCH"} else 0)  # (its read failed: nothing to apply)


def test_an_api_server_that_drops_its_connections_fails_the_step_naming_the_call(kube, monkeypatch):
    """Connections closed without an answer reached the task as urllib3's MaxRetryError (a
    traceback naming neither the call nor what to check), and a stage's poke that could not read
    the candidate's pods took that for pods gone and rolled back. The task fails naming the call;
    the rollback that follows (the teardown's) goes through once the server answers again."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import ApiUnreachable, RouterError

    at_stage_1(kube)
    kube.drop = 100
    with pytest.raises(RouterError) as failed:
        steps.apply_weights(PARAMS, 1, "run-1", {"decision": "pass"})
    assert type(failed.value) is ApiUnreachable
    assert str(failed.value).startswith("the Kubernetes API server did not answer GET /apis/")
    assert f"Check that {kube.url} is up and reachable" in str(failed.value)
    kube.drop = 0

    def unanswered(self, *args, **kwargs):
        raise ApiUnreachable("the Kubernetes API server did not answer GET /apis/apps/v1/...")

    with monkeypatch.context() as patched:
        patched.setattr(VersionDeployments, "wait_ready", unanswered)
        with pytest.raises(ApiUnreachable):
            steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    assert routes(kube) == [("v1", 90), ("v2", 10)]  # nothing read says the candidate's pods are gone
    assert steps.ensure_stable(PARAMS, "run-1", None, "1", SENT).startswith("version 1 takes 100%")
    assert routes(kube) == [("v1", 100)]


@pytest.mark.timeout(120)  # (before the budget: 181 s a call, minutes a teardown)
@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_teardown_against_an_api_server_that_never_answers_is_bounded(kube, monkeypatch, tmp_path, end):
    """The API server accepts the teardown's connections and never answers (hung): each call
    waited its 60 s read limit, read again twice (181 s a call), and the teardown made call after
    call for minutes before it failed and reported; the failure callback, under the DAG
    processor's time limit, was killed before it said anything. Each call of theirs now waits
    ``*_CALL_S`` at most, and once calls went ``*_API_S`` without an answer none is sent:
    the teardown fails (it reported), the callback reports."""
    import socket
    import threading

    from kubernetes.client import rest

    from vision_rollout import mesh

    at_stage_1(kube)
    monkeypatch.setattr(mesh, "BACKOFF_S", 0.01)  # (the client's backoff between its retries)
    monkeypatch.setattr(mesh, "BACKOFF_MAX_S", 0.01)  # (and routes_read's between its reads)
    monkeypatch.setattr(steps, "TEARDOWN_API_S", 1.0)
    monkeypatch.setattr(steps, "TEARDOWN_CALL_S", 0.25)
    monkeypatch.setattr(steps, "CALLBACK_API_S", 1.0)
    monkeypatch.setattr(steps, "CALLBACK_CALL_S", 0.25)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])  # read nothing, answer nothing
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    hung = {**json.loads(json.loads(os.environ["AIRFLOW_CONN_KUBERNETES_DEFAULT"])["extra"]["kube_config"])}
    hung["clusters"] = [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{listener.getsockname()[1]}"}}]
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": json.dumps(hung), "namespace": "models"}}),
    )
    timeouts: list[object] = []
    sent = rest.RESTClientObject.request

    def spied(self, method, url, *args, _request_timeout=None, **kwargs):
        timeouts.append(_request_timeout)
        return sent(self, method, url, *args, _request_timeout=_request_timeout, **kwargs)

    monkeypatch.setattr(rest.RESTClientObject, "request", spied)
    try:
        if end == "teardown":
            with pytest.raises(mesh.ApiUnreachable):
                steps.ensure_stable(PARAMS, "run-1", None, None, None)
        else:
            steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    finally:
        listener.close()
        for connection in accepted:
            connection.close()
    assert timeouts
    assert all(max(t) <= 0.25 for t in timeouts)  # (each call's limit: the budget's)
    assert len(accepted) <= 1.0 / 0.25 + 1  # (no call sent once the budget is spent, nor sent again)
    (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert report["text"].startswith("Stopped digits v2, routes not restored")
    assert routes(kube) == [("v1", 90), ("v2", 10)]


def fake_api_time(
    monkeypatch, answer_s: float | Callable[[float], float]
) -> tuple[list[float], list[tuple[str, str, float, int | None]]]:
    """The API server takes ``answer_s`` to answer each try of a call (or ``answer_s(now)``, the
    fake clock's time as the try is sent), on a fake clock (the
    client's time limit cut shorter ones short: a read timeout, at its limit), which the waits
    (the client's Retry-After and backoff, mesh's and steps' pauses, a wait for pods) advance too:
    the clock and each try as (verb, path, when it ended, its status; None: no answer)."""
    import time
    from types import SimpleNamespace

    import urllib3.connectionpool
    from urllib3.exceptions import ReadTimeoutError
    from urllib3.util.retry import Retry

    from vision_rollout import deploy, mesh

    now = [0.0]
    tries: list[tuple[str, str, float, int | None]] = []
    sent = urllib3.connectionpool.HTTPConnectionPool._make_request

    def answered(self, conn, method, url, *args, **kwargs):
        took = answer_s(now[0]) if callable(answer_s) else answer_s
        limit = kwargs["timeout"].read_timeout
        if isinstance(limit, int | float) and limit < took:
            now[0] += limit
            tries.append((method, url.split("?")[0], now[0], None))
            raise ReadTimeoutError(self, url, "Read timed out.")
        now[0] += took
        response = sent(self, conn, method, url, *args, **kwargs)
        tries.append((method, url.split("?")[0], now[0], response.status))
        return response

    def sleep(seconds: float) -> None:
        now[0] += seconds

    def retry_sleep(self: Retry, response: object = None) -> None:  # (urllib3's wait between tries)
        sleep((self.get_retry_after(response) if response is not None else None) or self.get_backoff_time())

    clock = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    clock.monotonic, clock.sleep = (lambda: now[0]), sleep
    for module in (mesh, deploy, steps):
        monkeypatch.setattr(module, "time", clock)
    monkeypatch.setattr(Retry, "sleep", retry_sleep)
    monkeypatch.setattr(urllib3.connectionpool.HTTPConnectionPool, "_make_request", answered)
    return now, tries


@pytest.mark.real_pauses  # (the pauses on the fake clock)
def test_a_slow_api_server_still_gets_the_failure_callbacks_routes_write(kube, monkeypatch):
    """The routes write (100% back on stable) comes after the lease's renewal, the routes' read and
    the baseline's readiness: an API server answering each call in 2.5 s (served, its time well
    within each call's limit) gets it all the same, the routes back on version 1."""
    at_stage_1(kube)
    _now, tries = fake_api_time(monkeypatch, 2.5)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert routes(kube) == [("v1", 100)]
    assert ("PATCH", "/apis/networking.istio.io/v1/namespaces/models/virtualservices/digits") in {
        (m, p) for m, p, _, s in tries if s == 200
    }


@pytest.mark.real_pauses  # (the pauses on the fake clock)
def test_an_api_server_answering_in_5_s_still_gets_the_failure_callbacks_routes_write(kube, monkeypatch):
    """The routes write was the failure callback's 9th call: the baseline's Deployment read twice
    (its size, then its readiness) and the VirtualService read twice (by ``set_routes``, then by its
    apply), so an API server answering each call in 5 s reached the cap (40 s) before the write was
    sent, the routes left 90/10 and reported not restored. The Deployment is read once for both, and
    the apply writes from the VirtualService ``set_routes`` read: the write is its 7th call (35 s)."""
    at_stage_1(kube)
    now, tries = fake_api_time(monkeypatch, 5.0)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert now[0] <= steps.CALLBACK_CAP_S
    assert routes(kube) == [("v1", 100)]
    written = [(m, p) for m, p, _, s in tries].index(
        ("PATCH", "/apis/networking.istio.io/v1/namespaces/models/virtualservices/digits")
    )
    assert written + 1 <= 7


@pytest.mark.real_pauses  # (the pauses on the fake clock)
@pytest.mark.parametrize(
    ("answer_s", "autoscaling"), [(4.5, False), (5.0, False), (4.0, True), (4.5, True), (5.0, True)]
)
def test_an_api_server_answering_in_4_to_5_s_still_gets_the_failure_callbacks_lease_release(
    kube, monkeypatch, tmp_path, caplog, answer_s, autoscaling
):
    """After the routes write (its 7th call) the callback read the candidate's Deployment (for its
    report's wording) and then the lease, and only then deleted it: at 4.5 s or 5 s a call the
    lease's read or its delete was cut by the cap (40 s), the lease left to run out for 300 s,
    another run of the model refused meanwhile. The release is reckoned with the calls after the
    routes write: one delete of the lease as the callback's renewal left it (read again only
    should it have moved on), and no optional read that would leave it no time.
    Under autoscaling, with a floor held on version 1 (its HPA read before the routes write, its
    8th call), the floor's release (its HPA and budget read and patched: 5 calls) came between the
    routes write and the lease's delete, cut at the cap from 3 s a call: it is left where it would
    leave the release no time, said held (the model's next run releases it). At 4.5 s or 5 s a
    call the HPA's read itself made the routes write the 8th call, the lease's delete past the cap:
    it is read only where it leaves the calls after it their time."""
    params = PARAMS
    if autoscaling:
        params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 10)
    else:
        at_stage_1(kube)
    now, tries = fake_api_time(monkeypatch, answer_s)
    steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    assert now[0] <= steps.CALLBACK_CAP_S
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits") is None
    assert tries[-1][:2] == ("DELETE", "/apis/coordination.k8s.io/v1/namespaces/models/leases/rollout-digits")
    assert "was not released" not in caplog.text
    if autoscaling:
        assert hpa(kube, "1")["spec"]["minReplicas"] == 10  # still held
        (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
        assert "version 1 takes 100%" in report
        assert "keeps the floor the run held" in report
        assert "the model's next run takes it over and releases it when it ends" in report


@pytest.mark.real_pauses  # (the waits on the fake clock)
@pytest.mark.parametrize("answer_s", [3.0, 5.0])
def test_the_failure_callbacks_floor_release_left_for_the_time_says_no_floor_where_none_is_held(
    kube, monkeypatch, tmp_path, caplog, answer_s
):
    """Under autoscaling, no floor held on version 1 (no peak): the failure callback left the
    floor's release for the time and its report said the HPA "keeps the floor the run held",
    though it holds none (at 3 s a call its HPA was read: no floor on it). Where the HPA was read (no floor on it), nothing is said of a floor;
    where it was not, that a floor may be held, which the model's next run releases."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 2)  # (no peak: no floor held)
    now, tries = fake_api_time(monkeypatch, answer_s)
    steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    assert now[0] <= steps.CALLBACK_CAP_S
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits") is None
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    read = any("/horizontalpodautoscalers/digits-v1" in t[1] for t in tries)
    assert read == (answer_s == 3.0)
    if read:
        assert "floor" not in report
    else:
        assert "may hold a floor the run held (not read" in report
        assert "the model's next run takes it over and releases it when it ends" in report


@pytest.mark.real_pauses  # (the waits on the fake clock)
@pytest.mark.parametrize("answer_s", [1.0, 1.5, 2.5, 3.0, 3.5, 4.0])
def test_the_failure_callbacks_scale_up_of_a_baseline_without_a_floor_leaves_the_routes_and_the_lease_their_time(
    kube, monkeypatch, tmp_path, caplog, answer_s
):
    """Under autoscaling, no floor held on version 1 (no peak): the failure callback's guard
    reserved time for the HPA's read alone; after it the candidate's Deployment was read and the
    baseline scaled up (its Deployment, HPA and budget read and applied: 9 calls) unguarded, so at
    3 or 3.5 s a call the routes write was cut at the cap (10% of the traffic left on the
    candidate), and at 2.5 s the lease's release. The routes write and the lease's release come
    first: the scale-up is left where it would leave them no time, and the report says the HPA
    scales the baseline; where the time allows it (1 or 1.5 s a call), the baseline is scaled up."""
    params = at_stage_1_autoscaled(kube, monkeypatch, tmp_path, 2)  # (no peak: no floor held)
    now, tries = fake_api_time(monkeypatch, answer_s)
    steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    assert now[0] <= steps.CALLBACK_CAP_S
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits") is None
    assert tries[-1][:2] == ("DELETE", "/apis/coordination.k8s.io/v1/namespaces/models/leases/rollout-digits")
    assert "was not released" not in caplog.text
    scaled = [t for t in tries if t[0] == "PATCH" and "/deployments/digits-v1" in t[1]]
    (report,) = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert "version 1 takes 100%" in report
    if answer_s <= 1.5:  # (the time allows it: version 1 scaled up to the pods that serve now, both versions')
        assert scaled
        assert deployment(kube, "1")["spec"]["replicas"] == 2 + deployment(kube, "2")["spec"]["replicas"]
    if not scaled:
        assert "version 1 was not scaled up by the failure callback" in report
        assert "its HPA scales it as the traffic comes back" in report


@pytest.mark.timeout(60)  # (before: the wait without a budget had no end)
@pytest.mark.real_pauses  # (the waits on the fake clock)
@pytest.mark.parametrize("budget", ["callback", "none"])
def test_the_failure_callbacks_wait_for_a_pod_that_never_gets_ready_leaves_its_routes_write_its_time(
    kube, monkeypatch, tmp_path, budget
):
    """The baseline's pod never gets ready, the API server answers each call in 3 s: the callback's
    wait for it took all the time its budget had left, its polls up to the cap, so it reported the
    API server (its last poll not sent, "the calls here took the 40 s"), not the pods, and ended
    past the cap (41 s); without a budget (finish's quick alone) the wait had no end. The wait keeps
    the calls after it their time (its last poll, the lease's check, the routes' write: as long as
    the last served call took), CALLBACK_CAP_S at most: it ends within the cap, naming the pods not
    ready, and the routes stay as they are rather than sending the traffic to no ready pod."""
    from devstack.cluster import kube as fake_kube
    from vision_rollout.mesh import RouterError

    at_stage_1(kube)
    all_ready = fake_kube._ready_status

    def never_ready(obj: dict) -> dict:
        status = all_ready(obj)
        if obj["metadata"]["name"] == "digits-v1":
            status["readyReplicas"] = status["availableReplicas"] = 0
        return status

    monkeypatch.setattr(fake_kube, "_ready_status", never_ready)
    kube.touch("deployments", "models", "digits-v1", lambda d: d.update(status=never_ready(d)))
    if budget == "none":  # (the waits on a fake clock, the calls as they come)
        import time
        from types import SimpleNamespace

        from vision_rollout import deploy

        now = [0.0]
        clock = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
        clock.monotonic, clock.sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
        monkeypatch.setattr(deploy, "time", clock)
        with pytest.raises(RouterError, match="0 of 1 pod ready after"):
            steps.finish(PARAMS, "run-1", promoted=False, unload_candidate=False, quick=True)
    else:
        now, _tries = fake_api_time(monkeypatch, 3.0)
        steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
        assert now[0] <= steps.CALLBACK_CAP_S
        (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
        assert report["text"].startswith("Stopped digits v2, routes not restored")
        assert "Deployment digits-v1: 0 of 1 pod ready after" in report["text"]
        assert "ApiUnreachable" not in report["text"]
    assert routes(kube) == [("v1", 90), ("v2", 10)]


@pytest.mark.real_pauses  # (the waits, the Retry-After waited, on the fake clock)
@pytest.mark.parametrize(("first", "ready_at"), [("slow", 10.0), ("throttled", 12.0)])
def test_the_failure_callbacks_wait_for_a_pod_reckons_the_calls_after_it_at_their_answer_time_now(
    kube, monkeypatch, tmp_path, first, ready_at
):
    """The callback's first call answered in 6 s (slow), or 429 with Retry-After: 5 once (API
    Priority and Fairness: throttled), every other call in 0.2 s, and the baseline's pod ready at
    ``ready_at``: the wait for it kept the calls after it 5 times the longest call yet (its retry's
    wait included), 30 s or more of the 40 s, so it waited not at all and the routes stayed 90/10
    ("routes not restored"). The calls after it are reckoned at what the last served one took to
    answer (no Retry-After or backoff wait): the wait sees the pod ready and the routes go back."""
    from devstack.cluster import kube as fake_kube

    at_stage_1(kube)
    all_ready = fake_kube._ready_status
    clock: list[list[float]] = []

    def ready_late(obj: dict) -> dict:
        status = all_ready(obj)
        if obj["metadata"]["name"] == "digits-v1" and clock and clock[0][0] < ready_at:
            status["readyReplicas"] = status["availableReplicas"] = 0
        return status

    monkeypatch.setattr(fake_kube, "_ready_status", ready_late)
    sent = []

    def answer(at: float) -> float:
        sent.append(at)
        if at >= ready_at:  # (its status as the fake server keeps it: ready once the clock is past)
            kube.touch("deployments", "models", "digits-v1", lambda d: d.update(status=ready_late(d)))
        return 6.0 if first == "slow" and len(sent) == 1 else 0.2

    now, _tries = fake_api_time(monkeypatch, answer)
    clock.append(now)
    kube.touch("deployments", "models", "digits-v1", lambda d: d.update(status=ready_late(d)))
    if first == "throttled":
        kube.throttle, kube.retry_after = 1, "5"
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert now[0] <= steps.CALLBACK_CAP_S
    assert routes(kube) == [("v1", 100)]
    (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert report["text"].startswith(
        "Rolled back digits v2"
    )  # (the candidate left running, said: not "routes not restored")


@pytest.mark.real_pauses  # (the pauses, the Retry-After waited, on the fake clock)
@pytest.mark.parametrize("server", ["slow", "slower", "failing", "throttling"])
def test_the_failure_callback_ends_within_its_time_against_a_slow_or_throttling_api_server(
    kube, monkeypatch, tmp_path, server
):
    """Only calls that got no answer spent the failure callback's budget: served calls (a slow
    server's, 14 s each under a 15 s limit; those served after 429s and their Retry-After waits)
    spent nothing, and the callback took 100 s of its 30, past the DAG processor's 50 s: killed,
    the routes maybe left 90/10, nothing said. And routes_read's and settled's pauses slept on
    once the budget was spent. It ends within ``CALLBACK_CAP_S`` now, whatever the server does: a
    server answering each call in 4 s gets the routes back on version 1 before; one too slow for
    the calls before the write, or throttling, is reported (routes not restored)."""
    at_stage_1(kube)
    answer_s = {"slow": 4.0, "slower": 14.0, "failing": 1.0, "throttling": 1.0}[server]
    now, tries = fake_api_time(monkeypatch, answer_s)
    if server == "failing":  # every call answered 500 (etcd timing out), the client sending each again
        kube.throttle, kube.throttle_status = 10**6, 500
    if server == "throttling":
        kube.throttle, kube.retry_after = 10**6, "10"
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert tries
    assert now[0] <= steps.CALLBACK_CAP_S < 50  # (the DAG processor's limit: dag_file_processor_timeout)
    if server == "slow":
        assert routes(kube) == [("v1", 100)]
    else:
        assert routes(kube) == [("v1", 90), ("v2", 10)]
        (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
        assert report["text"].startswith("Stopped digits v2, routes not restored")


@pytest.mark.real_pauses  # (the waits on the fake clock)
def test_the_teardown_waits_its_whole_time_for_a_baseline_at_0_whose_pods_are_slow_to_come(kube, monkeypatch):
    """A baseline scaled to 0 (a promotion cut short) whose pods take 100 s to be ready (the image
    pulled, the model loaded): the teardown waits for one (``wait_ready``'s 600 s), not for what its
    API budget has left, and puts the routes back on it."""
    from devstack.cluster import kube as fake_kube

    at_stage_1(kube)
    kube.scale("models", "digits-v1", 0, "keda")
    now, _tries = fake_api_time(monkeypatch, 0.01)
    all_ready = fake_kube._ready_status
    scaled_at: list[float] = []

    def slow_pods(obj: dict) -> dict:
        status = all_ready(obj)
        if obj["metadata"]["name"] == "digits-v1" and status["replicas"]:
            scaled_at.append(scaled_at[0] if scaled_at else now[0])
            if now[0] < scaled_at[0] + 100:
                status["readyReplicas"] = status["availableReplicas"] = 0
        return status

    def poll(self, *args, **kwargs):  # (the pods' status brought up to date before each read)
        kube.touch("deployments", "models", "digits-v1", lambda d: d.update(status=slow_pods(d)))
        return live(self, *args, **kwargs)

    from vision_rollout.deploy import VersionDeployments

    live = VersionDeployments._live
    monkeypatch.setattr(fake_kube, "_ready_status", slow_pods)
    monkeypatch.setattr(VersionDeployments, "_live", poll)
    assert steps.ensure_stable(PARAMS, "run-1", None, "1", SENT).startswith("version 1 takes 100%")
    assert routes(kube) == [("v1", 100)]
    assert now[0] >= 100  # (it waited for them)


@pytest.mark.parametrize("end", ["teardown", "failure-callback"])
def test_a_teardown_whose_lease_release_fails_reports_the_stable_version_back(kube, tmp_path, caplog, end):
    """The teardown put version 1 back, then the release of the model's lease was refused (a Role
    without delete on leases, say): its report said it "could not put version 1 back", the routes
    not restored, though version 1 took 100% of the traffic (the failure callback logged the same).
    The restore is reported as done, and the lease's failure besides. The failure callback, which
    leaves the candidate running, logged it only: it reports it, the candidate's command with it."""
    from devstack.cluster.kube import APIError

    at_stage_1(kube)

    refuse(
        kube,
        (
            "DELETE",
            "/leases/rollout-digits",
            APIError(403, "Forbidden", 'leases.coordination.k8s.io "rollout-digits" is forbidden'),
        ),
    )
    said = ended(end, PARAMS, caplog)
    if end == "teardown":
        (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
        assert "routes not restored" not in report["text"]
        assert "could not put version 1 back" not in report["text"]
        assert "version 1 takes 100%" in report["text"]
        assert "the model's lease was not released" in report["text"]
        assert "kubectl -n models delete lease rollout-digits" in report["text"]
    else:
        # (its candidate left running, told: the release's failure with it)
        (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
        assert report["text"].startswith("Rolled back digits v2")
        assert "version 2 is left loaded, its pods running: scale it to 0" in json.dumps(report)
        assert "the model's lease was not released" in json.dumps(report)
    kube.before_write = None
    assert routes(kube) == [("v1", 100)]
    assert "could not put version 1 back" not in said
    assert "version 1 takes 100%" in said
    assert "the model's lease was not released" in said
    assert "403" in said
    # (what frees the model sooner, by hand: the release is not tried again, a 403 would be the same)
    assert "kubectl -n models delete lease rollout-digits" in said
    assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-1"


def test_a_failure_callback_that_cannot_reach_the_api_server_reports_that_the_stable_version_may_not_be_back(
    kube, monkeypatch, tmp_path, caplog
):
    """The API server down through the failure callback (the run's teardown failed before it, or
    never ran): the callback raised into the DAG processor's log, which nobody reads, and nothing
    tries again, so the routes were left mid-rollout with nobody told. It logs the error and sends
    a report (Slack, else the outbox) saying the stable version is not shown to be back, naming
    the error and what to do."""
    from vision_rollout import mesh

    at_stage_1(kube)
    monkeypatch.setattr(mesh, "BACKOFF_S", 0.01)  # (the client's backoff between its retries)
    monkeypatch.setattr(mesh, "BACKOFF_MAX_S", 0.01)  # (and routes_read's between its reads)
    kube.drop = 10**6  # every call's connection closed without an answer
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    kube.drop = 0
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    assert "its failure callback could not put version 1 back" in caplog.text
    (report,) = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert report["text"].startswith("Stopped digits v2, routes not restored: run run-1 failed")
    assert "the Kubernetes API server did not answer" in report["text"]
    assert "nothing tries again" in report["text"]


def test_under_autoscaling_the_stable_version_keeps_its_size_for_the_whole_run(kube, monkeypatch, tmp_path):
    """The stable version's HPA shrank it as the candidate took a share (10 pods to 5 at 50%), the
    later stages were sized from the 5, and a rollback handed all of the traffic back to them.
    Its floor is now held at the pods it ran before the run (as Argo Rollouts keeps the stable at
    full scale), recorded on its HPA: put back by the failure callback of a run whose worker
    died, and by a promotion, whose candidate takes the stable version's own floor, not the
    held one."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    params = {**PARAMS, "mirror_percent": 0}
    steps.ModelServerHook().deployments("digits").apply("1", image("1"), replicas=2)
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load

    def hpa_follows_the_load(pods: int) -> None:
        """What v1's HPA does with less of the traffic: fewer pods, never under its floor."""
        kube.scale("models", "digits-v1", max(pods, hpa(kube, "1")["spec"]["minReplicas"]), "kube-controller-manager")

    take("run-1")
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    assert hpa(kube, "1")["spec"]["minReplicas"] == 10
    steps.apply_weights(params, 1, "run-1", {"decision": "pass"})
    hpa_follows_the_load(5)
    assert deployment(kube, "1")["spec"]["replicas"] == 10
    steps.apply_weights(params, 2, "run-1", {"decision": "pass"})
    assert deployment(kube, "2")["spec"]["replicas"] == 10  # sized from the stable's 10, not 5
    # The worker dies; the failure callback (the DAG processor) puts the stable version back.
    steps.restore_stable_on_failure({"params": params, "run_id": "run-1"})
    assert routes(kube) == [("v1", 100)]
    assert deployment(kube, "1")["spec"]["replicas"] == 10
    assert (hpa(kube, "1")["spec"]["minReplicas"], hpa(kube, "1")["metadata"].get("annotations") or {}) == (2, {})
    steps.serving().deployments("digits").scale_to_zero("2")

    take("run-2")
    steps.deploy_candidate(params, image("2"), "run-2")
    for index in range(3):
        steps.apply_weights(params, index, "run-2", {"decision": "pass"})
    steps.promote(params, "run-2", "promote")
    assert (hpa(kube, "2")["spec"]["minReplicas"], deployment(kube, "2")["spec"]["replicas"]) == (2, 10)
    assert (hpa(kube, "1")["spec"]["minReplicas"], hpa(kube, "1")["metadata"].get("annotations") or {}) == (2, {})


def test_the_teardown_deletes_the_retired_versions_beyond_the_history_limit_and_only_those(kube, monkeypatch, tmp_path):
    """Every promotion and rollback left the retired version's Deployment (at 0) and HPA in the
    namespace for good. The teardown now keeps the stable, the candidate and the
    build.revision_history_limit newest retired versions, and deletes the older ones the rollout
    made (by its labels: never a Deployment of another maker or another model), never one the
    VirtualService or DestinationRule names nor one running pods; with calls the workers' Roles
    (deploy/, with the autoscaling component) allow."""
    from devstack import manifests, rbac
    from tests.devstack.test_manifests import with_autoscaling

    worker = manifests.airflow_user("workers")
    kubeconfig = json.dumps(kube.kubeconfig("ml", user=worker))
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": kubeconfig, "namespace": "ml"}}),
    )
    connect(monkeypatch, tmp_path, {"istio": {**ISTIO, "namespace": "ml"}}, autoscaling=True, revision_history_limit=1)
    params = {**PARAMS, "baseline_version": "5", "candidate_version": "6"}
    stable_virtual_service(kube, params, serving="5")
    deployments = steps.serving().deployments("digits")
    for version in ("1", "2", "3", "4", "5", "6"):
        deployments.apply(version, image(version), replicas=2)
    for version in ("1", "2", "3", "4"):
        deployments.scale_to_zero(version)
    deployments.scale("3", 1)  # brought back by hand: it runs pods
    kube.touch(  # the platform's own subset, of version 2's pods
        "destinationrules",
        "ml",
        "digits",
        lambda d: d["spec"]["subsets"].append({"name": "debug", "labels": {"version": "2"}}),
    )
    rendered = kube.objects[("deployments", "ml", "digits-v1")]
    for name, labels, model in (
        ("digits-v7", {"app": "digits", "version": "7"}, "digits"),  # not the rollout's (no managed-by)
        ("digits-v8", {**rendered["metadata"]["labels"], "version": "8"}, "mnist"),  # another model's
    ):
        body = {k: copy.deepcopy(rendered[k]) for k in ("apiVersion", "kind", "spec")}
        body["metadata"] = {"name": name, "namespace": "ml", "labels": labels}
        body["spec"]["replicas"] = 0
        body["spec"]["selector"]["matchLabels"]["version"] = labels["version"]
        body["spec"]["template"]["metadata"]["labels"]["version"] = labels["version"]
        body["spec"]["template"]["metadata"]["annotations"]["model-rollout/model"] = model
        kube.apply("deployments", "ml", name, body, "kubectl")
    take("run-1")
    steps.restore_stable(params, "run-1")  # v6 rolled back: at 0, as v1, v2 and v4
    since = len(kube.requests)
    assert steps.ensure_stable(params, "run-1", None, "5", SENT).startswith("version 5 takes 100%")
    left = sorted(name for plural, ns, name in kube.objects if (plural, ns) == ("deployments", "ml"))
    assert left == ["digits-v2", "digits-v3", "digits-v5", "digits-v6", "digits-v7", "digits-v8"]
    hpas = sorted(name for plural, ns, name in kube.objects if (plural, ns) == ("horizontalpodautoscalers", "ml"))
    assert hpas == ["digits-v2", "digits-v3", "digits-v5", "digits-v6"]
    deletes = [r for r in kube.requests[since:] if r["method"] == "DELETE" and "/leases/" not in r["path"]]
    assert len(deletes) == 6  # v1 and v4: each Deployment, its disruption budget, then its HPA
    budgets = sorted(name for plural, ns, name in kube.objects if (plural, ns) == ("poddisruptionbudgets", "ml"))
    assert budgets == ["digits-v2", "digits-v3", "digits-v5", "digits-v6"]
    rules = rbac.bound_rules(with_autoscaling(tmp_path), worker)
    made = [c for r in kube.requests[since:] if r["user"] == worker for c in rbac.checks(r)]
    assert [str(c) for c in made if not rbac.allowed(rules.get(c.namespace, []), c)] == []
    assert routes(kube, namespace="ml") == [("v5", 100)]


@pytest.mark.parametrize("record", ["²", "9" * 5000, "-3", "0", "abc"])
def test_a_floor_record_that_is_not_a_count_is_taken_as_none_held(kube, monkeypatch, tmp_path, record):
    """The stable version's HPA's own-floor annotation set by hand to what is not a count (a
    digit Python's int() refuses, more digits than it converts, a negative): read as no floor
    held, the rollout's steps go on; nothing is put back from it."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=2)
    kube.touch(
        "horizontalpodautoscalers",
        "models",
        "digits-v1",
        lambda h: h["metadata"].setdefault("annotations", {}).update({"model-rollout/own-min-replicas": record}),
    )
    assert deployments.held_floor("1") is None
    assert deployments.autoscaling("1")["minReplicas"] == 2
    assert deployments.release_floor("1") is False
    take("run-1")
    steps.restore_stable(PARAMS, "run-1")
    assert routes(kube) == [("v1", 100)]
    assert hpa(kube, "1")["spec"]["minReplicas"] == 2


def test_a_stable_floor_set_by_hand_during_the_run_is_kept_when_the_run_ends(kube, monkeypatch, tmp_path):
    """The stable version's HPA's minReplicas, held at its 10 pods, was set to 6 by hand during
    the run (kubectl edit, the platform's GitOps); the rollback put the own 2 back over it. The
    floor set by hand is kept, the rollout's records removed; a promotion's candidate takes it."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    stable_virtual_service(kube, PARAMS)
    params = {**PARAMS, "mirror_percent": 0}
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=2)
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")  # its HPA, under load
    take("run-1")
    steps.deploy_candidate(params, image("2"), "run-1")
    steps.apply_weights(params, 0, "run-1", {"decision": "pass"})
    assert hpa(kube, "1")["spec"]["minReplicas"] == 10
    kube.touch("horizontalpodautoscalers", "models", "digits-v1", lambda h: h["spec"].update(minReplicas=6))
    assert deployments.autoscaling("1")["minReplicas"] == 6
    steps.restore_stable(params, "run-1")
    assert routes(kube) == [("v1", 100)]
    assert (hpa(kube, "1")["spec"]["minReplicas"], hpa(kube, "1")["metadata"].get("annotations") or {}) == (6, {})


def test_a_held_floor_record_that_is_not_a_count_puts_the_own_floor_back(kube, monkeypatch, tmp_path):
    """The record of the floor held, garbled by hand: the own floor is put back, as without it."""
    connect(monkeypatch, tmp_path, autoscaling=True, max_replicas=40)
    deployments = steps.ModelServerHook().deployments("digits")
    deployments.apply("1", image("1"), replicas=2)
    kube.scale("models", "digits-v1", 10, "kube-controller-manager")
    assert deployments.hold_floor("1") == 10
    kube.touch(
        "horizontalpodautoscalers",
        "models",
        "digits-v1",
        lambda h: h["metadata"]["annotations"].update({"model-rollout/held-min-replicas": "ten"}),
    )
    assert deployments.release_floor("1") is True
    assert (hpa(kube, "1")["spec"]["minReplicas"], hpa(kube, "1")["metadata"].get("annotations") or {}) == (2, {})


def test_the_audits_pruning_keeps_the_folder_of_the_run_holding_the_models_lease(kube, tmp_path, caplog):
    """In kubernetes mode the model's lock is its Lease, not a lock file: a rollout stopped
    (its worker gone, its approval never answered) longer than the retention kept its folder
    by age only, so the hourly audit removed the stage records of the run still holding the
    model. The Lease's holder's folder now stays, as mesh local's lock file's holder's does;
    a Lease that cannot be read keeps every run folder of the model (none is known not live)."""
    import time
    from datetime import UTC, datetime, timedelta

    from vision_rollout import attempts
    from vision_rollout.locks import held_record

    settings = steps.serving().settings
    for run_id in ("done", "stalled"):
        attempts.applied(settings.workdir("digits", run_id), run_id, 0, time.time())
        settings.workdir("digits", run_id).write(HELD, held_record(run_id, None))  # (its record of its lease)
    take("stalled")
    old = time.time() - 40 * 86400
    for p in (tmp_path / "rollouts").rglob("*"):
        os.utime(p, (old, old))
    before = datetime.now(UTC) - timedelta(days=30)
    assert steps.prune_audits("digits", before)["run folders"] == 1
    assert (settings.run_folder / "rollouts" / "digits").folders() == ["stalled"]
    attempts.applied(settings.workdir("digits", "other"), "other", 0, time.time())
    for p in (tmp_path / "rollouts").rglob("*"):
        os.utime(p, (old, old))
    kube.objects[("leases", "models", "rollout-digits")]["spec"]["leaseDurationSeconds"] = -1  # (unreadable)
    assert steps.prune_audits("digits", before)["run folders"] == 0
    assert "no run folder of 'digits' pruned: its lock's holder is not known" in caplog.text
    assert (settings.run_folder / "rollouts" / "digits").folders() == ["other", "stalled"]


@pytest.fixture
def mirrored(kube, monkeypatch, tmp_path):
    """A rollout's first stage in kubernetes mode, its mirror (the default 100%) applied to the
    VirtualService, Istio's to do: the time before it was applied."""
    import time

    connect(monkeypatch, tmp_path, extra={"prediction_log": str(tmp_path / "log")})
    stable_virtual_service(kube, PARAMS)
    take("run-1")
    steps.ModelServerHook().deployments("digits").apply("2", image("2"))
    before = time.time()
    steps.apply_weights(PARAMS, 0, "run-1", {"ok": True})
    assert kube.objects[("virtualservices", "models", "digits")]["spec"]["http"][-1]["mirrorPercentage"] == {
        "value": 100.0
    }
    return before


def test_an_hour_mirrored_by_istio_without_shadow_records_is_a_warning_not_a_silent_skip(mirrored, tmp_path):
    """In kubernetes mode the pods serve without a traffic policy: no ``model_server_mirror_percent``
    gauge says Envoy mirrors. The hourly audit of an hour whose VirtualService mirrored 100% to
    the candidate, and whose prediction log holds no shadow record of its requests, was a silent
    skip; the mirror changes the rollout applied are in the run folder (shared by every worker),
    so it is a warning."""
    from datetime import UTC, datetime, timedelta

    from tests.include.test_audit import istio_log
    from vision_rollout.folders import Folder

    applied = mirrored
    istio_log(tmp_path, [applied + 2 + k for k in range(20)], {})  # (none of 20 copied at 100%)
    start = datetime.fromtimestamp(applied - 60, UTC)
    shares = steps.mirror_shares("digits", start, start + timedelta(hours=1))
    assert shares is not None
    assert {p for t, p in shares if t > applied + 1} == {100.0}
    assert all(t >= applied for t, _ in shares)  # (before the rollout applied it, nothing is known)
    folder = Folder(str(tmp_path)) / "audits" / "digits" / "hour"
    result = steps._audit_one_hour("digits", start, folder, "#model-rollouts")
    assert result["verdict"] == "warning"
    assert any("a mirror of 100% was configured" in r for r in result["reasons"])

    steps.restore_stable({**PARAMS}, "run-1", unload_candidate=False)
    shares = steps.mirror_shares("digits", start, start + timedelta(hours=1))
    assert shares is not None
    assert shares[-1][1] == 0.0  # the rollback took the mirror away


def test_copies_short_of_istios_mirror_are_named_in_the_hourly_audit(mirrored, tmp_path):
    """Behind Istio's mirror (the primaries say nothing of their sampling), a quarter of the
    copies came where the VirtualService mirrored 100%: the hourly audit tests them against the
    mirror the rollout recorded and names the shortfall (before, ``copies_short`` never ran)."""
    from datetime import UTC, datetime

    from tests.include.test_audit import istio_log
    from vision_rollout.folders import Folder

    applied = mirrored
    primaries = [applied + 2 + k for k in range(200)]
    istio_log(tmp_path, primaries, {i: t + 0.003 for i, t in enumerate(primaries) if i % 4 == 1})
    start = datetime.fromtimestamp(applied - 60, UTC)
    result = steps._audit_one_hour("digits", start, Folder(str(tmp_path)) / "audits" / "digits" / "h", "#x")
    assert result["copies_p"] is not None
    assert result["copies_p"] < 0.001
    assert any("behind a mirror of 100%" in r for r in result["reasons"])


def test_a_mirror_that_cannot_be_recorded_moves_no_traffic_and_a_rollback_still_goes_through(kube, tmp_path):
    """A mirror the audit could not know of is refused before the VirtualService is written (the
    step fails, its retry applies it again); a rollback, taking the mirror away, is never held
    back by the run folder: it is recorded after the routes moved, or warned of."""
    from rollout_airflow.hooks import ModelServerHook

    stable_virtual_service(kube, PARAMS)
    take("run-1")
    ModelServerHook().deployments("digits").apply("2", image("2"))
    (tmp_path / "mirrors").write_text("not a folder")
    with pytest.raises(Exception, match=r"mirror of 100% to version 2 could not be recorded .*No traffic was moved"):
        steps.apply_weights(PARAMS, 0, "run-1", {"ok": True})
    assert routes(kube) == [("v1", 100)]
    (tmp_path / "mirrors").unlink()
    steps.apply_weights(PARAMS, 0, "run-1", {"ok": True})
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    shutil.rmtree(tmp_path / "mirrors")
    (tmp_path / "mirrors").write_text("not a folder")
    steps.restore_stable({**PARAMS}, "run-1", unload_candidate=False)
    assert routes(kube) == [("v1", 100)]


def test_a_mirror_set_by_hand_is_recorded_by_the_hourly_audit_with_a_warning(kube, monkeypatch, tmp_path, caplog):
    """A mirror an operator set on the VirtualService by hand (kubectl edit) was never recorded:
    every later hour was judged at the share recorded before it (none: each copy a stray). The
    audit reads the VirtualService's mirror in kubernetes mode and records it when it is not the
    last recorded, saying so; a record a rollout wrote moments ago is left alone (a raised mirror
    is recorded just before the VirtualService is written)."""
    import logging
    import time
    from datetime import UTC, datetime, timedelta

    from vision_rollout.mirrors import MirrorLog, mirror_log

    connect(monkeypatch, tmp_path, extra={"prediction_log": str(tmp_path / "log")})
    stable_virtual_service(kube, PARAMS)
    settings = steps.serving().settings
    old = mirror_log(settings.run_folder, "digits")
    MirrorLog(old.folder, "digits", clock=lambda: time.time() - 7200).record(None, 0)
    by_hand = {
        "mirror": {"host": "digits.models.svc.cluster.local", "subset": "v2"},
        "mirrorPercentage": {"value": 20.0},
    }
    kube.touch("virtualservices", "models", "digits", lambda o: o["spec"]["http"][-1].update(by_hand))
    end = datetime.now(UTC)
    with caplog.at_level(logging.WARNING):
        steps.mirror_shares("digits", end - timedelta(hours=1), end)
    last = old.last()
    assert last is not None
    assert (last.version, last.percent) == ("2", 20.0)
    assert "changed outside the rollout" in caplog.text
    kube.touch(
        "virtualservices", "models", "digits", lambda o: o["spec"]["http"][-1].update(mirrorPercentage={"value": 50.0})
    )
    steps.mirror_shares("digits", end - timedelta(hours=1), end)
    last = old.last()
    assert last is not None
    assert last.percent == 20.0  # (recorded moments ago: a rollout's own, mid-write, is left alone)


@pytest.mark.parametrize("last", ["run-1", "run-2"])
def test_a_rollbacks_renewal_another_writer_beats_at_each_read_goes_on_while_the_lease_is_its_own(kube, caplog, last):
    """A rollback's renewal whose replace another writer beat at each of its reads (LockError:
    "written by another writer" at each of its tries) failed the rollback, the candidate
    left with its share of the traffic, though the lease was still this run's. The rollback goes
    on, saying why, while the lease reads as this run's; only a lease another run holds stops it."""
    import logging

    from vision_rollout.mesh import WRITE_TRIES

    at_stage_1(kube)
    beaten = []

    def another_writer() -> None:  # before each lease write, until the renewal gave up
        if kube.requests[-1]["method"] == "PUT" and kube.requests[-1]["path"].endswith("/leases/rollout-digits"):
            beaten.append(1)
            holder = last if len(beaten) == WRITE_TRIES else "run-1"
            kube.touch("leases", "models", "rollout-digits", lambda o: o["spec"].update(holderIdentity=holder))
            if len(beaten) == WRITE_TRIES:
                return
        kube.before_write = another_writer

    kube.before_write = another_writer
    with caplog.at_level(logging.WARNING):
        if last == "run-1":
            steps.restore_stable(PARAMS, "run-1")
        else:
            with pytest.raises(AirflowFailException, match=r"does not hold model 'digits'|not this run's"):
                steps.restore_stable(PARAMS, "run-1")
    assert len(beaten) == WRITE_TRIES
    if last == "run-1":
        assert routes(kube) == [("v1", 100)]
        assert "written by another writer" in caplog.text
        assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-1"
    else:
        assert routes(kube) == [("v1", 90), ("v2", 10)]
        assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-2"


def test_a_rollbacks_renewal_left_unanswered_goes_on_while_the_lease_reads_as_its_own(kube, monkeypatch, caplog):
    """A rollback's renewal whose every replace the API server left unanswered (a proxy dropping
    the connection: ApiUnreachable once its tries were spent) failed the rollback, the candidate
    left with its share of the traffic, though the lease read back as this run's. It goes on, as
    for a renewal another writer beat, saying why."""
    import logging

    from vision_rollout import mesh

    at_stage_1(kube)
    monkeypatch.setattr(mesh, "BACKOFF_S", 0.01)
    kube.throttle, kube.throttle_status, kube.throttled_methods = mesh.WRITE_TRIES, None, frozenset({"PUT"})
    kube.throttled_path = "/leases/rollout-digits"
    with caplog.at_level(logging.WARNING):
        steps.restore_stable(PARAMS, "run-1")
    assert kube.throttle == 0
    assert routes(kube) == [("v1", 100)]
    assert "did not answer PUT" in caplog.text


def failing_renewals(kube, monkeypatch, left_s: int) -> None:
    """run-1's lease last renewed to run out ``left_s`` s from now on this clock, and every
    renewal of it answered 500 by the API server."""
    import time

    from vision_rollout import mesh
    from vision_rollout.locks import micro_time

    seconds = lease(kube, "digits")["spec"]["leaseDurationSeconds"]
    renewed = micro_time(time.time() - seconds + left_s)
    kube.touch("leases", "models", "rollout-digits", lambda o: o["spec"].update(renewTime=renewed))
    monkeypatch.setattr(mesh, "BACKOFF_S", 0.01)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 1000, 500, frozenset({"PUT"})
    kube.throttled_path = "/leases/rollout-digits"


def test_a_stages_pass_judges_the_lease_on_this_workers_clock_without_another_lock(kube, monkeypatch):
    """A stage's poke that passed built the model's lock a second time (in Kubernetes mode, a
    client of the API server from the connection) only to read this worker's clock for
    ``lease_runs``: the lease it holds is judged on that clock without one; the poke builds one
    lock, its renewal's."""
    from types import SimpleNamespace

    from vision_rollout.engine import StageState
    from vision_rollout.gates import Verdict

    at_stage_1(kube)
    verdict = Verdict("pass", (), 2, 10, 0.05, 1e-3, "obrien-fleming", "PASS at look 2")
    passed = StageState("pass", 2, 10, verdict, "PASS at look 2", {}, 100.0)
    monkeypatch.setattr(steps, "stage_judge", lambda *a, **k: lambda window, now=None: passed)
    monkeypatch.setattr(steps, "PrometheusHook", lambda: SimpleNamespace(source=lambda: None))
    made, model_lock = [], steps.ModelServerHook.model_lock

    def counted(self, *args, **kwargs):
        made.append(args)
        return model_lock(self, *args, **kwargs)

    monkeypatch.setattr(steps.ModelServerHook, "model_lock", counted)
    assert steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")["status"] == "pass"
    assert made == [("digits", "istio")]
    made.clear()  # (its decision reported again: the same)
    assert steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")["status"] == "pass"
    assert made == [("digits", "istio")]


@pytest.mark.parametrize("left_s", [200, 30, -100], ids=["live", "within-the-skew", "run-out"])
def test_a_stages_poke_whose_renewals_fail_passes_no_stage_on_a_lease_about_to_run_out(kube, monkeypatch, left_s):
    """A stage's poke whose every renewal the API server failed took the lease read back as this
    run's whatever its age: one run out on this clock (or within the ``CLOCK_SKEW_S`` by which
    another worker's clock may be ahead, which takes it for dead then) may be taken over by
    another run at any moment. The poke records and returns no pass past ``renewed + seconds -
    CLOCK_SKEW_S`` (a LockError: a later poke renews again); before that it passes."""
    from types import SimpleNamespace

    from vision_rollout.engine import StageState
    from vision_rollout.gates import Verdict
    from vision_rollout.locks import CLOCK_SKEW_S, LockError

    at_stage_1(kube)
    verdict = Verdict("pass", (), 2, 10, 0.05, 1e-3, "obrien-fleming", "PASS at look 2")
    passed = StageState("pass", 2, 10, verdict, "PASS at look 2", {}, 100.0)
    monkeypatch.setattr(steps, "stage_judge", lambda *a, **k: lambda window, now=None: passed)
    monkeypatch.setattr(steps, "PrometheusHook", lambda: SimpleNamespace(source=lambda: None))
    failing_renewals(kube, monkeypatch, left_s)
    if left_s > CLOCK_SKEW_S:
        assert steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")["status"] == "pass"
    else:
        with pytest.raises(LockError, match=r"cannot be renewed.* another run may take the model over"):
            steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
        kube.throttle = 0  # (renewed again: the stage's test was left to judge)
        assert steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")["status"] == "pass"
    assert routes(kube) == [("v1", 90), ("v2", 10)]


@pytest.mark.parametrize("left_s", [200, 30, -100], ids=["live", "within-the-skew", "run-out"])
def test_a_stages_poke_whose_renewals_fail_acts_on_a_breach_all_the_same(kube, monkeypatch, caplog, left_s):
    """The poke refused the lease about to run out before judging anything (LockError, counted
    as a failed read, the stage held up to ``guard_error_limit`` pokes): for minutes nothing acted
    on the candidate left without a ready pod. A breach puts the stable version back as a
    rollback does (``restore_stable``: the lease read again as this run's before the routes are
    written), whatever the lease's age."""
    import logging

    at_stage_1(kube)
    kube.touch("deployments", "models", "digits-v2", lambda d: d["status"].update(readyReplicas=0))
    monkeypatch.setattr(steps, "NO_READY_POD_S", 0)
    failing_renewals(kube, monkeypatch, left_s)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(AirflowFailException, match=r"version 2 has no ready pod.*Version 1 takes 100% again"):
            steps.look_at_stage(PARAMS, 0, {"started": 0.0}, "run-1")
    assert routes(kube) == [("v1", 100)]
    assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-1"
    assert "the stable version goes back all the same" in caplog.text


@pytest.mark.parametrize("step", ["callback", "teardown"])
def test_a_run_whose_lease_is_taken_during_the_wait_for_the_baseline_does_not_write_the_routes(kube, monkeypatch, step):
    """The lease's renewals refused (500 on its PUT, every try: read back, still run-1's), and
    while the run waits for the baseline's ready pod another run takes the model over. The
    teardown renews the lease after the wait and stops (LockLost); the failure callback (``quick``:
    no renewal around the wait) PATCHed the VirtualService over run-2's routes. A lease it did
    not renew is read again before the routes write now: run-2's, nothing written."""
    from vision_rollout.deploy import VersionDeployments

    at_stage_1(kube)
    kube.throttle, kube.throttle_status, kube.throttled_methods = 10**6, 500, frozenset({"PUT"})
    kube.throttled_path = "/leases/rollout-digits"
    waited = VersionDeployments.wait_ready

    def taken_over(self, *args, **kwargs):
        kube.touch("leases", "models", "rollout-digits", lambda lease: lease["spec"].update(holderIdentity="run-2"))
        return waited(self, *args, **kwargs)

    monkeypatch.setattr(VersionDeployments, "wait_ready", taken_over)
    before = len(kube.requests)
    if step == "callback":
        steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    else:
        with pytest.raises(AirflowFailException, match="run 'run-2'"):
            steps.ensure_stable(PARAMS, "run-1", None, None, SENT)
    assert [r for r in kube.requests[before:] if r["method"] == "PATCH"] == []
    assert routes(kube) == [("v1", 90), ("v2", 10)]
    assert lease(kube, "digits")["spec"]["holderIdentity"] == "run-2"


def test_the_failure_callback_reads_no_lease_again_it_renewed_beyond_its_cap(kube):
    """The lease renewed at the failure callback's start (for ``LEASE_S``, beyond its cap on every
    worker's clock): no other run may take it before the callback ends, so it is not read again
    before the routes write (one GET of it before: the renewal's)."""
    at_stage_1(kube)
    before = len(kube.requests)
    steps.restore_stable_on_failure({"params": PARAMS, "run_id": "run-1"})
    assert routes(kube) == [("v1", 100)]
    calls = [(r["method"], r["path"].rsplit("/", 1)[-1]) for r in kube.requests[before:]]
    written = calls.index(("PATCH", "digits"))  # (the routes write)
    assert calls[:written].count(("GET", "rollout-digits")) == 1
