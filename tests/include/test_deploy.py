"""Kubernetes mode's pure parts: the candidate's size per stage, the HPA, the refusals' wording."""

from __future__ import annotations

import copy
import json
from functools import partial
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vision_rollout.deploy import (
    FieldsOwned,
    VersionDeployments,
    beyond_history,
    candidate_replicas,
    refused,
    render_deployment,
    render_hpa,
    render_pdb,
    render_service,
)
from vision_rollout.mesh import IstioTarget

pytestmark = pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)

TARGET = IstioTarget("models", "digits", "digits")


def round_trips(obj: dict, kind: str) -> bool:
    """Whether the kubernetes client's model of ``kind`` keeps every field (a misspelt or
    misplaced one is dropped)."""
    api = client.ApiClient()
    return api.sanitize_for_serialization(api._ApiClient__deserialize(obj, kind)) == obj


@pytest.mark.parametrize(
    ("baseline", "weight", "mirror", "floor", "expected"),
    [
        (4, 100, 100, 1, 4),  # all the traffic: the baseline's size, mirror or not
        (4, 100, 0, 1, 4),
        (10, 10, 0, 1, 1),  # no mirror: the weight's share
        (10, 25, 0, 1, 3),  # rounded up: 2.5 pods are 3
        (100, 7, 0, 1, 7),  # 7% of 100 is 7 (binary floating point says 7.000000000000001)
        (4, 10, 50, 1, 3),  # 10% routed + half of all the requests mirrored: 60% of 4 pods
        # Istio mirrors the whole weighted route: the candidate's own share is copied to it too
        (4, 10, 100, 1, 5),  # a full mirror: every request's copy, and its own 10% besides
        (10, 5, 100, 1, 11),
        (20, 25, 100, 1, 25),
        (4, 50, 100, 1, 6),
        (10, 50, 50, 1, 10),  # 50% routed + 50% mirrored, not 50% + 25%
        (1, 10, 0, 1, 1),  # one baseline pod: the floor
        (1, 0, 0, 1, 1),
        (10, 10, 0, 3, 3),  # the floor (build.min_replicas) when the share is smaller
        (0, 50, 0, 0, 0),  # nothing to serve, no floor: nothing
        (8, 12.5, 0, 1, 1),
        (10, 12.5, 33.3, 1, 5),  # 0.125 + 0.333 = 0.458 of 10
    ],
)
def test_the_candidate_is_sized_by_its_share_of_the_baselines_traffic(baseline, weight, mirror, floor, expected):
    assert candidate_replicas(baseline, weight, mirror, floor) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((4, 101, 0, 1), "weight 101: a percentage, 0 to 100"),
        ((4, -1, 0, 1), "weight -1"),
        ((4, 10, 100.5, 1), "mirror_percent 100.5"),
        ((-1, 10, 0, 1), "baseline replicas -1"),
        ((4, 10, 0, 10_001), "floor replicas 10001"),
    ],
)
def test_sizes_out_of_range_are_refused_naming_them(args, message):
    with pytest.raises(ValueError, match=message):
        candidate_replicas(*args)


def test_an_autoscaled_deployment_leaves_its_replicas_to_the_hpa():
    owned = render_deployment(TARGET, "digits", "2", "img:1", replicas=3)
    autoscaled = render_deployment(TARGET, "digits", "2", "img:1", replicas=None)
    assert owned["spec"]["replicas"] == 3
    assert "replicas" not in autoscaled["spec"]  # applied without it: the HPA's field is not claimed
    assert round_trips(autoscaled, "V1Deployment")
    hpa = render_hpa(TARGET, "2", 3, 30)
    assert round_trips(hpa, "V2HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits-v2"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 30)
    assert "metrics" not in hpa["spec"]  # the user's to choose; the rollout moves the floor only
    for low, high in ((0, 3), (4, 3)):
        with pytest.raises(ValueError, match=rf"HPA bounds {low}\.\.{high}"):
            render_hpa(TARGET, "2", low, high)


def test_a_versions_disruption_budget_selects_its_pods_only_and_keeps_a_lone_pod():
    lone, many = render_pdb(TARGET, "2", 1), render_pdb(TARGET, "2", 5)
    assert lone["spec"]["selector"]["matchLabels"] == {"app": "digits", "version": "2"}
    assert (lone["spec"]["maxUnavailable"], many["spec"]["maxUnavailable"]) == (0, 1)
    assert lone["metadata"]["name"] == "digits-v2"
    autoscaled = render_pdb(TARGET, "2", 1, autoscaled=True)["spec"]  # a floor of 1: any count above it
    assert (autoscaled["minAvailable"], "maxUnavailable" in autoscaled) == (1, False)
    assert render_pdb(TARGET, "2", 5, autoscaled=True)["spec"]["maxUnavailable"] == 1
    assert round_trips(many, "V1PodDisruptionBudget")


def test_a_field_owned_by_another_manager_is_reported_not_taken():
    exc = ApiException(status=409, reason="Conflict")
    exc.body = json.dumps(
        {
            "kind": "Status",
            "code": 409,
            "reason": "Conflict",
            "message": 'Apply failed with 1 conflict: conflict with "kubectl" using apps/v1: .spec.replicas',
        }
    )
    message = str(refused("apply Deployment digits-v2", exc))
    assert message.startswith("apply Deployment digits-v2: fields another field manager owns")
    assert '"kubectl" owns .spec.replicas.' in message
    assert "build.autoscaling" in message
    assert "Helm" not in message
    exc.body = json.dumps(  # as a real API server words an Update's manager: its time too
        {
            "message": 'Apply failed with 3 conflicts: conflicts with "helm" using apps/v1 at 2026-12-04T10:00:00Z:\n'
            "- .metadata.labels.app.kubernetes.io/managed-by\n- .spec.replicas\n"
            'conflicts with "kube-controller-manager" with subresource "scale" using autoscaling/v1 at '
            "2026-12-04T10:05:00Z:\n- .spec.replicas"
        }
    )
    message = str(refused("apply Deployment digits-v1", exc))
    assert (
        '"helm" owns .metadata.labels.app.kubernetes.io/managed-by, .spec.replicas; "kube-controller-manager" with '
        'subresource "scale" owns .spec.replicas. It is a Helm release\'s object'
    ) in message
    exc.body = json.dumps({"message": "the object has been modified"})  # (not an apply's conflict: as said)
    assert str(refused("x", exc)).startswith("x: 409 Conflict: the object has been modified.")
    other = ApiException(status=422, reason="Invalid")
    other.body = "not json"
    assert str(refused("apply Deployment digits-v2", other)) == "apply Deployment digits-v2: 422 Invalid: not json"


def test_the_advice_for_fields_another_manager_owns_never_drops_the_rollouts_other_fields():
    """A 409 for fields another manager owns advised ``kubectl apply --server-side
    --field-manager=model-rollout --force-conflicts``. Sent with a manifest of those fields alone
    (what an operator writes to give one field back), a server-side apply under the rollout's
    manager removes every field that manager applied before and no longer sends (the Deployment's
    labels, its records, its pod template): the object broken. The advice is a merge patch of
    those fields alone under the rollout's field manager, set to what the rollout applies (a write
    takes a field from its manager where it changes its value), and warns against that apply."""
    exc = ApiException(status=409, reason="Conflict")
    exc.body = json.dumps(
        {"message": 'Apply failed with 1 conflict: conflict with "kubectl" using apps/v1: .spec.replicas'}
    )
    message = str(refused("apply Deployment digits-v2", exc))
    assert "--force-conflicts" not in message
    assert "kubectl patch --type=strategic --field-manager=model-rollout" in message
    assert "--type=merge" not in message
    assert "where it changes its value" in message
    assert "not kubectl apply --server-side" in message
    assert "would remove the rollout's other fields" in message
    assert "build.autoscaling" in message


def test_the_advice_for_a_field_in_a_keyed_list_patches_its_item_by_key_and_hands_over_in_order():
    """The advice for fields another manager owns was ``kubectl patch --type=merge``: a JSON merge
    patch (RFC 7386) replaces a list whole, so a patch of a container's image sends a containers
    list of that container's name and image alone, and the Deployment loses the container's
    args, ports, probes and env. It is a strategic merge patch (kubectl's default for a
    Deployment, an HPA, a PodDisruptionBudget), which merges a containers list by name, and a field
    inside a keyed list is shown inside its item, with its key. The alternative it gave, that
    manager's server-side apply without the fields, deletes a field it alone owns (spec.replicas
    reset to 1): the handover is the rollout taking the fields first, then that manager dropping
    them."""
    exc = ApiException(status=409, reason="Conflict")
    exc.body = json.dumps(
        {
            "message": "Apply failed with 2 conflicts",
            "details": {
                "causes": [
                    {
                        "reason": "FieldManagerConflict",
                        "message": 'conflict with "argocd-controller" using apps/v1',
                        "field": '.spec.template.spec.containers[name="model-server"].image',
                    },
                    {
                        "reason": "FieldManagerConflict",
                        "message": 'conflict with "argocd-controller" using apps/v1',
                        "field": '.spec.template.spec.containers[name="model-server"].ports[containerPort=8080,'
                        'protocol="TCP"].name',
                    },
                ]
            },
        }
    )
    message = str(refused("apply Deployment digits-v2", exc))
    assert "--type=merge" not in message
    assert "kubectl patch --type=strategic --field-manager=model-rollout" in message
    patch, _ = json.JSONDecoder().raw_decode(message.split("inside its list item, with its key: ", 1)[1])
    assert patch == {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "model-server",
                            "image": "<as the rollout applies>",
                            "ports": [{"containerPort": 8080, "protocol": "TCP", "name": "<as the rollout applies>"}],
                        }
                    ]
                }
            }
        }
    }
    assert "its server-side apply without them)" not in message  # (first: it deletes a field it alone owns)
    taken, dropped = message.index("kubectl patch --type=strategic"), message.index("then have that manager")
    assert taken < dropped
    assert "not before" in message[dropped:]


@pytest.mark.parametrize("kind", ["HorizontalPodAutoscaler", "PodDisruptionBudget"])
def test_the_advice_for_an_hpas_or_a_budgets_fields_another_manager_owns_is_a_merge_patch(kind):
    """The advice for fields another manager owns said ``kubectl patch --type=strategic`` for every
    kind, while the commands the rollout gives for an HPA or a PodDisruptionBudget by hand
    (``_by_hand``: a floor's release, a budget) are ``--type=merge``. Neither kind holds a list
    merged by key: for them the advice is the same JSON merge patch as those commands; a
    Deployment's stays a strategic merge patch (its containers merged by name)."""
    from devstack.cluster.kube import FakeKubeAPI
    from vision_rollout.settings import BuildSettings

    api = FakeKubeAPI(kubelet=True).start()
    try:
        cfg = client.Configuration()
        cfg.host = api.url
        versions = VersionDeployments(
            TARGET, "digits", client.ApiClient(cfg), BuildSettings(gpus=0, autoscaling=True, max_replicas=40)
        )
        versions.apply("2", "img:a", 2)
        if kind == "HorizontalPodAutoscaler":
            theirs = render_hpa(TARGET, "2", 3, 40)
            api.apply("horizontalpodautoscalers", "models", "digits-v2", theirs, "argocd-controller", force=True)
            with pytest.raises(FieldsOwned) as failed:
                versions._apply_hpa("2", {"minReplicas": 5, "maxReplicas": 40})
        else:
            theirs = render_pdb(TARGET, "2", 5, autoscaled=True)
            theirs["spec"]["maxUnavailable"] = 2
            api.apply("poddisruptionbudgets", "models", "digits-v2", theirs, "argocd-controller", force=True)
            with pytest.raises(FieldsOwned) as failed:
                versions._apply_pdb("2", 5, refusal_raised=True)
    finally:
        api.stop()
    message = str(failed.value)
    assert f"apply {kind} digits-v2: fields another field manager owns" in message
    assert '"argocd-controller" owns .spec.' in message
    assert "kubectl patch --type=merge --field-manager=model-rollout" in message
    assert "--type=strategic" not in message
    assert "strategic merge patch" not in message
    assert message.index("kubectl patch --type=merge") < message.index("then have that manager")


def test_the_service_exposes_the_data_port_only():
    service = render_service(TARGET)
    assert round_trips(service, "V1Service")
    assert service["spec"]["selector"] == {"app": "digits"}  # every version's pods; Istio splits by subset
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", 8000, "http")]
    pod = render_deployment(TARGET, "digits", "2", "img:1")["spec"]["template"]
    assert pod["metadata"]["labels"]["app"] == "digits"
    (container,) = pod["spec"]["containers"]
    admin = next(p for p in container["ports"] if p["name"] == "admin")
    assert admin["containerPort"] not in [p["port"] for p in service["spec"]["ports"]]


def test_wait_ready_counts_no_pod_of_an_older_template():
    """A new image rolling out: the old pod ready, the new one surged and not yet ready. The
    version is not ready (as `kubectl rollout status`) until only new pods are left, all ready."""
    from kubernetes import client

    from devstack.cluster.kube import FakeKubeAPI
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import IstioTarget, RouterError
    from vision_rollout.settings import BuildSettings

    api = FakeKubeAPI(kubelet=True).start()
    try:
        cfg = client.Configuration()
        cfg.host = api.url
        versions = VersionDeployments(
            IstioTarget("models", "digits", "digits"), "digits", client.ApiClient(cfg), BuildSettings(gpus=0)
        )
        versions.apply("2", "img:a", 1)
        versions.apply("2", "img:b", 1)  # generation 2
        status = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1, "readyReplicas": 1}
        api.set_status("deployments", "models", "digits-v2", status)
        with pytest.raises(
            RouterError, match="1 of 1 pod ready after 0 s \\(1 on its current template, 1 older one left\\)"
        ):
            versions.wait_ready("2", 1, timeout_s=0, every_s=0)
        versions.wait_ready("2", 1, timeout_s=0, every_s=0, strict=False)  # a rollback: any ready pod serves
        api.set_status("deployments", "models", "digits-v2", {**status, "replicas": 1})  # the old pod gone
        versions.wait_ready("2", 1, timeout_s=0, every_s=0)
    finally:
        api.stop()


def test_every_secret_reaches_the_server_as_a_read_only_file():
    """The admin token, as the feedback and masking keys: a file of its Secret mounted read-only,
    which the server is pointed at (--admin-token-file), never an environment variable, which
    every child process, ``/proc/<pid>/environ`` and ``kubectl exec env`` would show."""
    from model_server.__main__ import parse_args

    pod = render_deployment(TARGET, "digits", "2", "img:1")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert not [e for e in container.get("env") or [] if "valueFrom" in e]
    args = parse_args(container["args"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path, secret, key in (
        (args.admin_token_file, "model-server-admin", "token"),
        (args.feedback_key_file, "model-server-feedback", "key"),
        (args.mask_keys, "model-server-masking", "mask-keys.json"),
    ):
        mount = mounts[str(path.parent)]
        assert mount["readOnly"] is True
        source = volumes[mount["name"]]["secret"]
        assert (source["secretName"], source["items"]) == (secret, [{"key": key, "path": path.name}])
        assert source["defaultMode"] == 0o440


def test_a_model_server_pod_holds_no_kubernetes_api_token():
    """The server never calls the Kubernetes API: its pods mount no ServiceAccount token, so code
    run through the server (an image decoder's or a model's flaw) finds no credential to the API
    server. Istio's proxy has a token of its own (the injected istio-token volume)."""
    pod = render_deployment(TARGET, "digits", "2", "img:1")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert round_trips(render_deployment(TARGET, "digits", "2", "img:1"), "V1Deployment")


def test_a_deployments_own_settings_outlive_the_rollouts_applies(kube_api):
    """What the platform set on version 1's Deployment beside its pod template (its rollout
    strategy, minReadySeconds, revisionHistoryLimit, progressDeadlineSeconds, labels, and a
    selector label kustomize's commonLabels adds) was left out of the rollout's applies, which
    the overlay's field manager makes a removal: the strategy back to Kubernetes' default (a GPU
    cluster's maxSurge 0 lost), and a selector changed, which the API server refuses (immutable).
    They are kept on the version scaled, and the candidate made like it takes them."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    own = {
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
        "minReadySeconds": 10,
        "revisionHistoryLimit": 3,
        "progressDeadlineSeconds": 900,
    }
    v1 = render_deployment(TARGET, "digits", "1", "img:1", 4, BuildSettings(gpus=0))
    v1["metadata"]["labels"]["team"] = "vision"
    v1["spec"]["selector"]["matchLabels"]["team"] = "vision"
    v1["spec"]["template"]["metadata"]["labels"]["team"] = "vision"
    v1["spec"].update(own)
    api, api_client = kube_api
    apply_object(api_client, v1)
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1, like="1")
    versions.scale("1", 0)
    for version, replicas in (("1", 0), ("2", 1)):
        live = api.objects[("deployments", "models", f"digits-v{version}")]
        assert {k: live["spec"].get(k) for k in own} == own
        assert live["spec"]["replicas"] == replicas
        assert live["spec"]["selector"]["matchLabels"] == {"app": "digits", "version": version, "team": "vision"}
        assert live["metadata"]["labels"]["team"] == "vision"
        assert live["metadata"]["labels"]["version"] == version


def test_the_annotations_the_overlay_set_on_a_deployment_outlive_the_rollouts_applies(kube_api):
    """The annotations kustomize's commonAnnotations (or the overlay itself) put on version 1's
    Deployment, applied with the rollout's field manager, were left out of its applies, which
    that manager makes a removal: an owner annotation, or Reloader's, which restarts the pods
    when their Secrets rotate, gone from the version scaled and never on the candidate made like
    it. They are kept and carried over, as its labels are; the rollout's own record
    (model-rollout/*), the controller's revision and kubectl's last-applied configuration of
    the baseline are not the candidate's."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import IMAGE_ANNOTATION, VersionDeployments
    from vision_rollout.settings import BuildSettings

    own = {"owner": "vision@example.com", "reloader.stakater.com/auto": "true"}
    v1 = render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0))
    v1["metadata"]["annotations"] = {
        **own,
        IMAGE_ANNOTATION: "img:1",
        "deployment.kubernetes.io/revision": "4",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
    }
    api, api_client = kube_api
    apply_object(api_client, v1)
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1, like="1")
    versions.scale("2", 2)
    versions.scale("1", 0)
    v1_live, v2_live = (api.objects[("deployments", "models", f"digits-v{v}")]["metadata"] for v in "12")
    assert {k: v1_live["annotations"].get(k) for k in own} == own
    assert v1_live["annotations"][IMAGE_ANNOTATION] == "img:1"
    assert {k: v2_live["annotations"].get(k) for k in own} == own
    assert v2_live["annotations"][IMAGE_ANNOTATION] == "img:2"
    assert "deployment.kubernetes.io/revision" not in v2_live["annotations"]
    assert "kubectl.kubernetes.io/last-applied-configuration" not in v2_live["annotations"]


def test_a_candidate_made_like_a_baseline_with_serve_equals_serves_only_itself():
    """A baseline written by hand with ``--serve=digits:1`` (one argument, as argparse takes it):
    the candidate made like it kept that and had ``--serve digits:2`` added, so its pods loaded
    and served version 1 too, behind version 2's subset."""
    from vision_rollout.settings import BuildSettings

    like = render_deployment(TARGET, "digits", "1", "img:1", 1, BuildSettings(gpus=0))["spec"]["template"]
    args = like["spec"]["containers"][0]["args"]
    at = args.index("--serve")
    args[at : at + 2] = ["--serve=digits:1"]
    out = render_deployment(TARGET, "digits", "2", "img:2", 1, like=like)["spec"]["template"]
    served = [a for a in out["spec"]["containers"][0]["args"] if "digits:" in a]
    assert served == ["--serve=digits:2"]


def test_pods_never_ready_are_reported_with_what_the_deployment_says_stops_them(kube_api):
    """A ReplicaSet refused its pods (Pod Security admission, a quota): wait_ready waited its 10
    minutes and said only "0 of 1 pods ready", leaving the reason to be found by hand."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1)
    refusal = 'pods "digits-v2-7d4f8b9c6-abcde" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=1'
    failure = {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": refusal}
    api.touch(
        "deployments",
        "models",
        "digits-v2",
        lambda d: d["status"].update(readyReplicas=0, availableReplicas=0, conditions=[failure]),
    )
    with pytest.raises(RouterError, match="0 of 1 pod ready") as failed:
        versions.wait_ready("2", 1, timeout_s=0)
    assert f"ReplicaFailure FailedCreate: {refusal}" in str(failed.value)


@pytest.mark.parametrize(
    ("replicas", "in_use", "limit", "expected"),
    [
        ({"1": 0, "2": 0, "3": 0, "4": 3, "5": 1}, {"4", "5"}, 1, ["1", "2"]),  # the newest retired, 3, kept
        ({"1": 0, "2": 0, "3": 0, "4": 3, "5": 1}, {"4", "5"}, 3, []),
        ({"1": 0, "2": 0, "3": 0, "4": 3, "5": 1}, {"4", "5"}, 0, ["1", "2", "3"]),
        ({"1": 0, "9": 0, "10": 0, "11": 2}, {"10", "11"}, 1, ["1", "9"]),  # by number, not by text: 10 > 9
        ({"1": 0, "2": 0, "3": 0}, {"1", "3"}, 0, ["2"]),  # in use (routed, a subset): never deleted
        ({"1": 2, "2": 1, "3": 0}, {"3"}, 0, []),  # running pods: never deleted
    ],
)
def test_retired_versions_beyond_the_history_limit_are_the_oldest_unused_ones(replicas, in_use, limit, expected):
    assert beyond_history(replicas, in_use, limit) == expected


def test_a_negative_history_limit_is_refused():
    with pytest.raises(ValueError, match="revision history limit -1"):
        beyond_history({"1": 0}, set(), -1)


def test_the_labels_and_annotations_the_overlay_set_on_a_budget_outlive_the_rollouts_applies(kube_api):
    """deploy/'s overlay applies version 1's PodDisruptionBudget with the rollout's field manager,
    so the labels and annotations it set there (kustomize's commonLabels and commonAnnotations:
    a team label an admission policy requires, a GitOps tool's tracking label) were removed by
    the rollout's next apply of the budget, which left them out. They are kept, as on the
    VirtualService, the DestinationRule and the Deployments; the rollout's own labels win."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    v1 = render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0))
    pdb = render_pdb(TARGET, "1", 2)
    pdb["metadata"]["labels"].update({"team": "vision", "version": "not-1"})
    pdb["metadata"]["annotations"] = {
        "argocd.argoproj.io/tracking-id": "digits:policy/PodDisruptionBudget:ml/digits-v1"
    }
    api, api_client = kube_api
    for obj in (v1, pdb):
        apply_object(api_client, obj)
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.scale("1", 3)
    versions.apply("2", "img:2", 1, like="1")
    live = api.objects[("poddisruptionbudgets", "models", "digits-v1")]["metadata"]
    assert live["labels"]["team"] == "vision"
    assert live["labels"]["version"] == "1"
    assert live["annotations"] == pdb["metadata"]["annotations"]
    assert "team" not in api.objects[("poddisruptionbudgets", "models", "digits-v2")]["metadata"]["labels"]


def test_a_candidate_image_another_manager_applied_is_refused_naming_the_field(kube_api):
    """A candidate's Deployment whose image another manager applied (a platform's GitOps tool
    server-side, a colleague's ``kubectl apply --server-side``) is not taken over: the rollout's
    apply of its own image is refused naming that manager and the field, and the pods keep the
    other's image, as on a real cluster (the one-machine API server took the apply over)."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    apply_object(api_client, render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0)))
    theirs = render_deployment(TARGET, "digits", "2", "img:theirs", 1, BuildSettings(gpus=0))
    apply_object(api_client, theirs, manager="argocd-controller")
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    with pytest.raises(RouterError) as refused_apply:
        versions.apply("2", "img:2", 1, like="1")
    assert '"argocd-controller" owns .spec.template.spec.containers[name="model-server"].image' in str(
        refused_apply.value
    )
    assert "which the rollout does not take over" in str(refused_apply.value)
    live = api.objects[("deployments", "models", "digits-v2")]
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "img:theirs"


def test_a_candidate_made_like_the_baseline_does_not_take_a_gitops_tools_tracking_of_it(kube_api):
    """Argo CD finds an application's resources by its tracking label (app.kubernetes.io/instance,
    its default before 3.0) and prunes those not in Git: the candidate's Deployment, made like
    version 1's, took that label (and the tracking-id annotation), so an auto-syncing Argo CD
    took it for an extra resource of the application and deleted it mid-rollout. The candidate
    no longer carries the baseline's tracking; the baseline scaled keeps its own."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    v1 = render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0))
    v1["metadata"]["labels"].update({"app.kubernetes.io/instance": "digits", "team": "vision"})
    v1["metadata"]["annotations"] = {"argocd.argoproj.io/tracking-id": "digits:apps/Deployment:models/digits-v1"}
    api, api_client = kube_api
    apply_object(api_client, v1)
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1, like="1")
    versions.scale("1", 1)
    v1_live, v2_live = (api.objects[("deployments", "models", f"digits-v{v}")]["metadata"] for v in "12")
    assert "app.kubernetes.io/instance" not in v2_live["labels"]
    assert "argocd.argoproj.io/tracking-id" not in (v2_live.get("annotations") or {})
    assert v2_live["labels"]["team"] == "vision"
    assert v1_live["labels"]["app.kubernetes.io/instance"] == "digits"
    assert (
        v1_live["annotations"]["argocd.argoproj.io/tracking-id"]
        == v1["metadata"]["annotations"]["argocd.argoproj.io/tracking-id"]
    )


def test_a_label_another_manager_set_on_a_budget_stays_its_own_after_the_rollouts_applies(kube_api):
    """The rollout copied the live budget's labels and annotations into its forced apply: those
    the platform applied with its own field manager (Argo CD's) became the rollout's too, and
    the platform's next apply, which left one out, could not remove it. What another manager
    owns stays out of the rollout's apply: the platform removes it with its own."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    v1 = render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0))
    pdb = render_pdb(TARGET, "1", 2)
    pdb["metadata"]["labels"]["team"] = "vision"
    pdb["metadata"]["annotations"] = {"argocd.argoproj.io/tracking-id": "digits"}
    api, api_client = kube_api
    apply_object(api_client, v1)
    apply_object(api_client, pdb, manager="argocd-controller")
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.scale("1", 3)
    live = api.objects[("poddisruptionbudgets", "models", "digits-v1")]["metadata"]
    assert live["labels"]["team"] == "vision"
    del pdb["metadata"]["labels"]["team"]
    del pdb["metadata"]["annotations"]
    apply_object(api_client, pdb, manager="argocd-controller")
    live = api.objects[("poddisruptionbudgets", "models", "digits-v1")]["metadata"]
    assert "team" not in live["labels"]
    assert "annotations" not in live
    assert live["labels"]["app.kubernetes.io/managed-by"] == "model-rollout"


def test_a_label_value_another_manager_owns_on_a_budget_is_not_overwritten():
    """A budget Helm installed carries ``app.kubernetes.io/managed-by: Helm``, Helm's: the
    rollout's forced apply of its own value took the label over (Helm then refused to upgrade
    its release). A label another manager owns is left out of the rollout's apply."""
    from kubernetes import client

    from devstack.cluster.install import apply_object
    from devstack.cluster.kube import FakeKubeAPI
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    v1 = render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0))
    pdb = render_pdb(TARGET, "1", 2)
    pdb["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    api = FakeKubeAPI().start()
    try:
        cfg = client.Configuration()
        cfg.host = api.url
        apply_object(client.ApiClient(cfg), v1)
        apply_object(client.ApiClient(cfg), pdb, manager="helm")
        VersionDeployments(TARGET, "digits", client.ApiClient(cfg), BuildSettings(gpus=0)).scale("1", 3)
        live = api.objects[("poddisruptionbudgets", "models", "digits-v1")]
        assert live["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert live["spec"]["maxUnavailable"] == 1
        assert live["metadata"]["labels"]["version"] == "1"
    finally:
        api.stop()


def test_a_deployment_past_its_progress_deadline_fails_the_wait_at_once(kube_api):
    """The Deployment controller gave up on the version's pods (Progressing False,
    ProgressDeadlineExceeded: an image that cannot be pulled, a crash loop, past the platform's
    progressDeadlineSeconds): wait_ready polled on for its whole 10 minutes, the candidate's
    share unserved meanwhile or the stage held, where ``kubectl rollout status`` fails at once. It
    now fails as soon as the controller says so of the current spec, naming the condition; not
    for a condition of an earlier spec (a new apply restarts the deadline)."""
    import time

    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1)
    message = 'ReplicaSet "digits-v2-7d4f8b9c6" has timed out progressing.'
    stuck = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": message}

    def exceeded(d: dict) -> None:
        d["status"].update(readyReplicas=0, availableReplicas=0, conditions=[stuck])

    api.touch("deployments", "models", "digits-v2", exceeded)
    started = time.monotonic()
    with pytest.raises(RouterError, match="0 of 1 pod ready") as failed:
        versions.wait_ready("2", 1, timeout_s=60, every_s=0.05)
    assert time.monotonic() - started < 10
    assert f"Progressing ProgressDeadlineExceeded: {message}" in str(failed.value)
    assert "past its progress deadline" in str(failed.value)
    api.touch(
        "deployments", "models", "digits-v2", lambda d: d["metadata"].update(generation=d["metadata"]["generation"] + 1)
    )
    with pytest.raises(RouterError, match=r"after 0\.2 s"):  # (the controller has not seen the new spec)
        versions.wait_ready("2", 1, timeout_s=0.2, every_s=0.05)


def test_an_hpa_is_applied_only_when_it_would_change(kube_api):
    """The candidate's HPA was applied (forced) at every stage and every retry, its floor the same
    or not: a write, and an edit of another hand taken back, each time. It is applied when the live
    HPA differs from the rollout's (its floor, bounds, metrics, behavior, its record of a floor held;
    Kubernetes' default metrics are none), so also when it changed since, as on a step run again."""
    from vision_rollout.deploy import DEFAULT_HPA_METRICS, VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    key = ("horizontalpodautoscalers", "models", "digits-v2")
    versions = VersionDeployments(
        TARGET, "digits", api_client, BuildSettings(gpus=0, autoscaling=True, max_replicas=40)
    )

    def applies() -> int:
        return sum(1 for w in api.writes() if w["path"].endswith("/horizontalpodautoscalers/digits-v2"))

    versions.apply("2", "img:2", 1)
    assert (applies(), api.objects[key]["spec"]["minReplicas"]) == (1, 1)
    api.touch(*key, lambda h: h["spec"].update(metrics=DEFAULT_HPA_METRICS))  # as a real API server defaults it
    versions.apply("2", "img:2", 1)  # the next stage at the same size, or the stage run again
    versions.scale("2", 1)
    assert applies() == 1
    versions.apply("2", "img:2", 3)
    assert (applies(), api.objects[key]["spec"]["minReplicas"]) == (2, 3)
    api.touch(*key, lambda h: h["spec"].update(minReplicas=7))  # changed since
    versions.apply("2", "img:2", 3)
    assert (applies(), api.objects[key]["spec"]["minReplicas"]) == (3, 3)
    metrics = [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}
    ]
    tuned = VersionDeployments(
        TARGET,
        "digits",
        api_client,
        BuildSettings(gpus=0, autoscaling=True, max_replicas=40, autoscaling_metrics=metrics),
    )
    tuned.apply("2", "img:2", 3)
    tuned.apply("2", "img:2", 3)
    assert (applies(), api.objects[key]["spec"]["metrics"]) == (4, metrics)


def test_a_helm_releases_deployment_is_refused_naming_each_field_and_its_manager(kube_api):
    """A baseline Helm installed (its field manager ``helm``, its label app.kubernetes.io/managed-by:
    Helm): the rollout's apply over it (its retirement, a scale) was refused by the API server (409)
    and reported as the server worded it, the fields of several managers on lines of their own. It
    is said in one sentence, each manager with the fields it owns, that it is a Helm release's
    object and what to do; nothing is forced: the Deployment keeps Helm's values."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    helm = render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0))
    helm["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    apply_object(api_client, helm, manager="helm")
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    with pytest.raises(RouterError) as refused_apply:
        versions.scale("1", 0)
    said = str(refused_apply.value)
    assert said.startswith(
        "apply Deployment digits-v1: fields another field manager owns, which the rollout does not take over: "
        '"helm" owns .metadata.labels.app.kubernetes.io/managed-by, .spec.replicas.'
    )
    assert "a Helm release's object" in said
    assert "\n" not in said
    live = api.objects[("deployments", "models", "digits-v1")]
    assert (live["metadata"]["labels"]["app.kubernetes.io/managed-by"], live["spec"]["replicas"]) == ("Helm", 2)
    w = [w for w in api.writes() if w["path"].endswith("/deployments/digits-v1")][-1]
    assert "force" not in w["query"]


def test_container_fields_another_manager_owns_stay_its_own_when_the_rollout_reapplies_a_version(kube_api):
    """A platform's controller (its own field manager) added a log-shipping sidecar to a
    version's Deployment and set a CPU limit on its model server. The rollout's re-apply of that
    Deployment (a stage's scale) sent the pod template's containers whole, so it owned the
    sidecar and the limit too: the platform's later apply changing the limit was refused (409, a
    conflict with model-rollout), and its apply without the sidecar left it running. Now the
    rollout leaves out, inside the containers too (keyed by name, as managedFields key them),
    what another manager owns: the platform changes and removes its own fields, the rollout's
    image, ``--serve`` and replicas are the rollout's."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1)

    def platform(cpu: str, sidecar: bool) -> dict:
        labels = {"app": "digits", "version": "2"}
        server = {"name": "model-server", "image": "img:2", "resources": {"limits": {"cpu": cpu}}}
        shipper = {"name": "log-shipper", "image": "fluent-bit:3"}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "digits-v2", "namespace": "models"},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [server, *([shipper] if sidecar else [])]},
                },
            },
        }

    apply_object(api_client, platform("2", sidecar=True), manager="platform")
    versions.scale("2", 3)
    mine = next(
        e
        for e in api.objects[("deployments", "models", "digits-v2")]["metadata"]["managedFields"]
        if e["manager"] == "model-rollout"
    )
    containers = mine["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
    assert set(containers) == {'k:{"name":"model-server"}'}  # not the sidecar
    assert containers['k:{"name":"model-server"}']["f:resources"]["f:limits"] == {"f:memory": {}}  # not the CPU's
    apply_object(api_client, platform("4", sidecar=False), manager="platform")  # no conflict: the platform's own
    live = api.objects[("deployments", "models", "digits-v2")]
    containers = {c["name"]: c for c in live["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"model-server"}  # the sidecar removed by its manager
    assert containers["model-server"]["resources"]["limits"]["cpu"] == "4"
    assert containers["model-server"]["image"] == "img:2"
    assert "--serve" in containers["model-server"]["args"]
    assert live["spec"]["replicas"] == 3


def test_what_the_rollout_owns_of_a_pod_template_follows_keyed_lists_as_the_api_server_records_them():
    """The API server's FieldsV1 (an item's own ``.``, a port keyed by its number and protocol):
    another manager's field inside a container goes, the container and its key stay; an item left
    with its key alone (a port whose one other field is another's) goes, as another manager's
    container does; a map or list emptied goes; the rollout's own fields stay."""
    from vision_rollout.mesh import rollouts_view

    port = 'k:{"containerPort":8000,"protocol":"TCP"}'
    theirs = {
        ".": {},
        "f:name": {},
        "f:resources": {".": {}, "f:limits": {".": {}, "f:cpu": {}}},
        "f:ports": {port: {".": {}, "f:containerPort": {}, "f:protocol": {}, "f:name": {}}},
        "f:env": {'k:{"name":"TRACE"}': {".": {}, "f:name": {}, "f:value": {}}},
    }
    server = {
        "name": "model-server",
        "image": "img:2",
        "resources": {"limits": {"cpu": "2", "memory": "4Gi"}},
        "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
        "env": [{"name": "TRACE", "value": "1"}],
    }
    live = {
        "metadata": {
            "managedFields": [
                {
                    "manager": "platform",
                    "operation": "Apply",
                    "fieldsV1": {
                        "f:spec": {
                            "f:template": {
                                "f:spec": {
                                    "f:containers": {
                                        'k:{"name":"model-server"}': theirs,
                                        'k:{"name":"log-shipper"}': {".": {}, "f:name": {}, "f:image": {}},
                                    }
                                }
                            }
                        }
                    },
                }
            ]
        },
        "spec": {"template": {"spec": {"containers": [server, {"name": "log-shipper", "image": "fluent-bit:3"}]}}},
    }
    view = rollouts_view(live)["spec"]["template"]["spec"]
    assert view == {
        "containers": [{"name": "model-server", "image": "img:2", "resources": {"limits": {"memory": "4Gi"}}}]
    }
    assert live["spec"]["template"]["spec"]["containers"][0] == server  # (a copy: live as read)


@pytest.mark.parametrize(
    "containers",
    [
        {"i:0": {"f:image": {}}},  # a key server-side apply does not write
        {'k:{"name":"model-server"}': ["f:image"]},  # a child that is not a map
        {'k:{"name":"model-server"}': {"f:env": {'v:"x"': {}, "i:1": {}}}},  # a set's items beside another key
        {"k:" + "[" * 100_000: {"f:image": {}}},  # a key nested past Python's recursion limit
        None,
    ],
)
def test_a_damaged_managed_fields_entry_takes_nothing_from_the_rollouts_own_reapply(containers):
    """A managedFields entry of another manager the rollout cannot read (an ``i:0`` key, a child
    that is not a map, ``"f:template": null``) was taken as a field that manager owns whole: the
    whole containers list or pod template was left out of the rollout's re-apply of a version, and
    server-side apply removed every field of the model server only the rollout owned (its ports,
    resources, probes); a ``k:`` key nested deep raised RecursionError. Nothing is taken for what
    cannot be read (the rollout sends it on as it is); what can be read beside it still is (a
    sidecar the entry owns); a set (``v:`` items alone) is still that manager's whole."""
    from vision_rollout.mesh import others_fields, rollouts_view

    server = {"name": "model-server", "image": "img:2", "ports": [{"containerPort": 8000}], "env": [{"name": "A"}]}
    template = {"spec": {"containers": [server, {"name": "log-shipper", "image": "fluent-bit:3"}]}}
    sidecar = {'k:{"name":"log-shipper"}': {".": {}, "f:name": {}, "f:image": {}}}
    fields = {"f:spec": {"f:template": {"f:spec": {"f:containers": containers}} if containers else None}}
    entry = {"manager": "x", "operation": "Update", "fieldsV1": fields}
    live = {"metadata": {"managedFields": [entry]}, "spec": {"template": template}}
    assert rollouts_view(live)["spec"] == {"template": template}
    if containers is not None:
        containers.update(sidecar)
        assert rollouts_view(live)["spec"] == {"template": {"spec": {"containers": [server]}}}
    finalizers = {"fieldsV1": {"f:spec": {"f:finalizers": {'v:"a"': {}, 'v:"b"': {}}}}, "manager": "y"}
    assert others_fields({"metadata": {"managedFields": [finalizers]}}) == {("f:spec", "f:finalizers")}


def test_pods_never_ready_are_reported_with_why_even_where_the_pods_cannot_be_read(kube_api):
    """A candidate whose pods never became ready (an image that cannot be pulled) within the wait,
    before the progress deadline: wait_ready said "0 of 1 pods ready after 600 s" and no more, the
    Deployment's conditions it read (Available False) left out and the pods never looked at. It
    names what the pods say where it may list them, and where a Role grants no list of pods
    (a 403) every condition of the Deployment not met, and that its pods could not be read."""
    from devstack.cluster.kube import APIError
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1)
    unavailable = {
        "type": "Available",
        "status": "False",
        "reason": "MinimumReplicasUnavailable",
        "message": "Deployment does not have minimum availability.",
    }
    progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": "progressing"}
    api.touch(
        "deployments",
        "models",
        "digits-v2",
        lambda d: d["status"].update(readyReplicas=0, availableReplicas=0, conditions=[progressing, unavailable]),
    )
    pulling = 'Back-off pulling image "img:2": not found'
    api.objects[("pods", "models", "digits-v2-7d4f8b9c6-abcde")] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "digits-v2-7d4f8b9c6-abcde",
            "namespace": "models",
            "labels": {"app": "digits", "version": "2"},
            "resourceVersion": "1",
        },
        "spec": {"containers": [{"name": "model-server", "image": "img:2"}]},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "model-server",
                    "image": "img:2",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": pulling}},
                }
            ],
        },
    }
    with pytest.raises(RouterError) as failed:
        versions.wait_ready("2", 1, timeout_s=0)
    assert str(failed.value).endswith(
        f"; pod digits-v2-7d4f8b9c6-abcde: container model-server ImagePullBackOff: {pulling}"
    )
    listed = api.list

    def forbidden(plural, *args, **kwargs):
        if plural == "pods":
            raise APIError(
                403,
                "Forbidden",
                'pods is forbidden: User "system:serviceaccount:airflow:airflow-worker" '
                'cannot list resource "pods" in API group "" in the namespace "models"',
            )
        return listed(plural, *args, **kwargs)

    api.list = forbidden
    with pytest.raises(RouterError) as failed:
        versions.wait_ready("2", 1, timeout_s=0)
    said = str(failed.value)
    assert "0 of 1 pod ready after 0 s" in said
    assert "; Available MinimumReplicasUnavailable: Deployment does not have minimum availability.; " in said
    assert "its pods not read (list pods app=digits,version=2: 403 Forbidden: pods is forbidden" in said


def test_a_helm_releases_hpa_and_budget_are_refused_not_taken_over(kube_api, caplog):
    """An HPA and a PodDisruptionBudget of the version's name that a Helm release installed
    (field manager ``helm``): the rollout force-applied its own over them, taking Helm's floor,
    bounds and budget over silently. Applied without ``force``, the HPA's apply is refused naming
    each field and Helm (the task fails), the budget's is logged so (a budget never holds back a
    rollback); both keep Helm's values. The rollout's own re-applies (its field manager) go on."""
    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import RouterError
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    hpa = render_hpa(TARGET, "2", 2, 5)
    hpa["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    apply_object(api_client, hpa, manager="helm")
    pdb = render_pdb(TARGET, "3", 4)
    pdb["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    apply_object(api_client, pdb, manager="helm")
    autoscaled = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0, autoscaling=True))
    with pytest.raises(RouterError) as refused_apply:
        autoscaled.apply("2", "img:2", 3)
    said = str(refused_apply.value)
    assert said.startswith(
        "apply HorizontalPodAutoscaler digits-v2: fields another field manager owns, which the rollout does not "
        'take over: "helm" owns .metadata.labels.app.kubernetes.io/managed-by, .spec.maxReplicas, .spec.minReplicas.'
    )
    assert "a Helm release's object" in said
    live = api.objects[("horizontalpodautoscalers", "models", "digits-v2")]
    assert (live["spec"]["minReplicas"], live["spec"]["maxReplicas"]) == (2, 5)
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.apply("3", "img:3", 1)  # a budget of maxUnavailable 0, not Helm's 1
    assert "apply PodDisruptionBudget digits-v3: fields another field manager owns" in caplog.text
    assert '"helm" owns .spec.maxUnavailable' in caplog.text
    assert api.objects[("poddisruptionbudgets", "models", "digits-v3")]["spec"]["maxUnavailable"] == 1
    writes = [
        w for w in api.writes() if "/horizontalpodautoscalers/" in w["path"] or "/poddisruptionbudgets/" in w["path"]
    ]
    assert not any("force" in (w["query"] or {}) for w in writes)
    autoscaled.apply("4", "img:4", 2)  # the rollout's own, applied again at another size and run again
    autoscaled.apply("4", "img:4", 3)
    autoscaled.apply("4", "img:4", 3)
    assert api.objects[("horizontalpodautoscalers", "models", "digits-v4")]["spec"]["minReplicas"] == 3
    assert api.objects[("poddisruptionbudgets", "models", "digits-v4")]["spec"]["maxUnavailable"] == 1


def rollout_applies_after_another_manager(
    kube_api, theirs: dict, key: tuple[str, str, str]
) -> tuple[VersionDeployments, dict]:
    """Another manager (Argo CD's controller) applies ``theirs`` of version 1's Deployment; then
    the rollout scales version 1 and makes version 2 like it. The rollout's versions, and its
    managed fields entry of the Deployment at ``key``."""
    from devstack.cluster.install import apply_object
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    apply_object(api_client, theirs, manager="argocd-controller")
    versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
    versions.scale("1", 2)
    versions.apply("2", "img:2", 1, like="1")
    return versions, next(e for e in api.objects[key]["metadata"]["managedFields"] if e["manager"] == "model-rollout")


def test_a_label_another_manager_owns_on_a_deployment_stays_its_own_after_the_rollouts_applies(kube_api):
    """A label and an annotation another manager set on a version's Deployment (a GitOps tool's
    apply: a team label, its tracking of the Deployment) were copied into the rollout's every
    apply of it, which made the rollout their co-owner: that manager could no longer remove them
    (server-side apply keeps a field another manager still applies), nor change them without a
    409. What another manager owns stays out of the rollout's apply of that Deployment (its own
    is carried, as the overlay's labels); the candidate made like it still takes them."""
    from devstack.cluster.install import apply_object
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    v1 = render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0))
    v1["metadata"]["labels"]["tier"] = "gold"  # the overlay's (the rollout's field manager)
    apply_object(api_client, v1)
    theirs = copy.deepcopy(v1)
    theirs["metadata"]["labels"].update({"team": "vision", "app.kubernetes.io/instance": "digits"})
    theirs["metadata"]["annotations"] = {"argocd.argoproj.io/tracking-id": "digits:apps/Deployment:models/digits-v1"}
    key = ("deployments", "models", "digits-v1")
    _, mine = rollout_applies_after_another_manager(kube_api, theirs, key)
    assert "f:team" not in mine["fieldsV1"]["f:metadata"]["f:labels"]
    assert (
        "f:annotations" not in mine["fieldsV1"]["f:metadata"]
        or "f:argocd.argoproj.io/tracking-id" not in (mine["fieldsV1"]["f:metadata"]["f:annotations"])
    )
    theirs["metadata"]["labels"].pop("team")
    theirs["metadata"]["annotations"] = {}
    apply_object(api_client, theirs, manager="argocd-controller")
    live = api.objects[key]["metadata"]
    assert "team" not in live["labels"]
    assert "argocd.argoproj.io/tracking-id" not in (live.get("annotations") or {})
    assert (live["labels"]["tier"], live["labels"]["app.kubernetes.io/instance"]) == ("gold", "digits")
    candidate = api.objects[("deployments", "models", "digits-v2")]["metadata"]["labels"]
    assert (candidate["team"], candidate["tier"]) == ("vision", "gold")


def test_a_pod_label_another_manager_owns_stays_its_own_after_the_rollouts_applies(kube_api):
    """A pod template label and annotation another manager set on a version's Deployment (a
    GitOps tool's apply: a team label, a scrape annotation) were copied into the rollout's every
    re-apply of it with the live pod template, which made the rollout their co-owner: that
    manager could no longer remove them. Another manager's pod labels and annotations stay out of
    the rollout's re-apply of that Deployment; the candidate made like it still takes them."""
    from devstack.cluster.install import apply_object
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    v1 = render_deployment(TARGET, "digits", "1", "img:1", 2, BuildSettings(gpus=0))
    apply_object(api_client, v1)
    theirs = copy.deepcopy(v1)
    theirs["spec"]["template"]["metadata"]["labels"]["team"] = "vision"
    theirs["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] = "true"
    key = ("deployments", "models", "digits-v1")
    versions, mine = rollout_applies_after_another_manager(kube_api, theirs, key)
    pods = mine["fieldsV1"]["f:spec"]["f:template"]["f:metadata"]
    assert "f:team" not in pods.get("f:labels", {})
    assert "f:prometheus.io/scrape" not in pods.get("f:annotations", {})
    theirs["spec"]["template"]["metadata"]["labels"].pop("team")
    theirs["spec"]["template"]["metadata"]["annotations"].pop("prometheus.io/scrape")
    apply_object(api_client, theirs, manager="argocd-controller")
    live = api.objects[key]["spec"]["template"]["metadata"]
    assert "team" not in live["labels"]
    assert "prometheus.io/scrape" not in live["annotations"]
    assert (live["labels"]["version"], live["annotations"]["model-rollout/model"]) == ("1", "digits")
    candidate = api.objects[("deployments", "models", "digits-v2")]["spec"]["template"]["metadata"]
    assert (candidate["labels"]["team"], candidate["annotations"]["prometheus.io/scrape"]) == ("vision", "true")
    assert versions.changed("2") is None


def _in_doubt(api: Any, method: str, path: str, answer: int | None, served: bool) -> None:
    """The next ``method`` on ``path`` answered ``answer`` (None: its connection closed), served
    first or not: the client cannot tell which."""
    api.throttle, api.throttle_status, api.throttle_served = 1, answer, served
    api.throttled_methods, api.throttled_path = frozenset({method}), path


def _version_1_retired(api_client: Any, **build: Any) -> Any:
    """VersionDeployments (the client retrying, no old ReplicaSets kept, ``build``'s settings
    besides) that applied versions 1 and 2, two pods each, and scaled version 1 to zero: a
    prune keeping version 2 retires it."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import with_retries
    from vision_rollout.settings import BuildSettings

    versions = VersionDeployments(
        TARGET, "digits", with_retries(api_client), BuildSettings(gpus=0, revision_history_limit=0, **build)
    )
    for version in ("1", "2"):
        versions.apply(version, f"img:{version}", 2)
    versions.scale_to_zero("1")
    return versions


@pytest.mark.parametrize("answer", [500, None], ids=["500", "no-answer"])
@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
@pytest.mark.parametrize("plural", ["deployments", "poddisruptionbudgets", "horizontalpodautoscalers"])
def test_a_prunes_delete_left_in_doubt_is_settled_not_a_failed_prune(kube_api, plural, served, answer):
    """A retired version's Deployment, budget or HPA delete answered 500 (served or not) or not
    answered failed the prune; one served was, sent again, a 404 taken for "gone already", the
    version not counted gone, its budget and HPA left behind. Each delete in doubt is sent again
    (on the same preconditions): a 404 then is that delete's, done."""
    api, api_client = kube_api
    versions = _version_1_retired(api_client, autoscaling=True)
    _in_doubt(api, "DELETE", f"/{plural}/digits-v1", answer, served)
    assert versions.prune({"2"}) == ["1"]
    assert api.throttle == 0  # (the delete in doubt was sent)
    left = sorted((p, n) for p, ns, n in api.objects if ns == "models" and p != "events")
    assert left == [
        ("deployments", "digits-v2"),
        ("horizontalpodautoscalers", "digits-v2"),
        ("poddisruptionbudgets", "digits-v2"),
    ]


def test_a_budget_whose_status_moved_as_its_delete_was_sent_is_deleted_by_the_same_prune(kube_api):
    """A retired version's budget was deleted on its uid and resourceVersion as read; the disruption
    controller writes its status as the version's last pods go (a new resourceVersion), so its
    delete was refused (409) and the budget left to the next prune (which lists the rollout's
    budgets left without a Deployment). A budget is deleted on its uid alone: its status written
    meanwhile does not keep it."""
    api, api_client = kube_api
    versions = _version_1_retired(api_client)
    key = ("poddisruptionbudgets", "models", "digits-v1")

    def status_moved() -> None:  # the disruption controller's write, as the budget's delete is sent
        if api.requests[-1]["method"] == "DELETE" and api.requests[-1]["path"].endswith(
            "/poddisruptionbudgets/digits-v1"
        ):
            api.touch(*key, lambda o: o.setdefault("status", {}).update(currentHealthy=0))
            return
        api.before_write = status_moved

    api.before_write = status_moved
    try:
        assert versions.prune({"2"}) == ["1"]
    finally:
        api.before_write = None
    deletes = [r["status"] for r in api.requests if r["method"] == "DELETE" and r["path"].endswith("/digits-v1")]
    assert deletes[-1:] == [200]  # (its status written as it was sent: deleted all the same)
    assert key not in api.objects
    assert ("poddisruptionbudgets", "models", "digits-v2") in api.objects  # (its version's Deployment is there)


def test_the_budget_of_a_version_pruned_goes_with_it_whoever_manages_its_labels_now(kube_api):
    """Prune found budgets only by the rollout's labels (59fcba7): one whose managed-by label
    another manager changed (Helm adopting it) was left when its version's Deployment was
    deleted. The budget of each version whose Deployment the prune deleted is read and deleted
    by its name, as before; the labels find only those left without a Deployment."""
    api, api_client = kube_api
    versions = _version_1_retired(api_client)
    key = ("poddisruptionbudgets", "models", "digits-v1")
    api.touch(*key, lambda o: o["metadata"]["labels"].update({"app.kubernetes.io/managed-by": "Helm"}))
    assert versions.prune({"2"}) == ["1"]
    assert key not in api.objects
    assert ("poddisruptionbudgets", "models", "digits-v2") in api.objects


@pytest.mark.parametrize("answer", [500, None], ids=["500", "no-answer"])
@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_a_budgets_apply_left_in_doubt_is_settled_not_logged_as_refused(kube_api, caplog, served, answer):
    """A version's PodDisruptionBudget apply answered 500 (served or not) was logged as refused ("a
    drain may take its pods"), the version left without its budget where it was not served; not
    answered, it failed the apply of the version. It is read back and applied again, as the
    Deployment's and the HPA's applies are."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import with_retries
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    versions = VersionDeployments(TARGET, "digits", with_retries(api_client), BuildSettings(gpus=0))
    _in_doubt(api, "PATCH", "/poddisruptionbudgets/digits-v2", answer, served)
    versions.apply("2", "img:2", 3)
    assert api.throttle == 0  # (the apply in doubt was sent)
    assert api.objects[("poddisruptionbudgets", "models", "digits-v2")]["spec"] == render_pdb(TARGET, "2", 3)["spec"]
    assert "a drain may take its pods" not in caplog.text


@pytest.mark.parametrize("plural", ["deployments", "horizontalpodautoscalers"])
def test_a_prunes_delete_served_on_an_object_with_finalizers_then_answered_500_is_done(kube_api, plural):
    """A retired version's Deployment or HPA holding a finalizer (another controller's), its
    delete served then answered 500: the server marked it (deletionTimestamp, a new
    resourceVersion), and the delete sent again on the preconditions as listed got 409, taken for
    "changed since it was listed": the version not counted gone, its budget and HPA left behind.
    An object read back marked for deletion, the same uid, is being deleted: done."""
    api, api_client = kube_api
    versions = _version_1_retired(api_client, autoscaling=True)
    api.touch(plural, "models", "digits-v1", lambda o: o["metadata"].update(finalizers=["example.com/keep"]))
    uid = api.objects[(plural, "models", "digits-v1")]["metadata"]["uid"]
    _in_doubt(api, "DELETE", f"/{plural}/digits-v1", 500, served=True)
    assert versions.prune({"2"}) == ["1"]
    deletes = [
        r["status"] for r in api.requests if r["method"] == "DELETE" and r["path"].endswith(f"/{plural}/digits-v1")
    ]
    assert deletes[:2] == [500, 409]
    marked = api.objects[(plural, "models", "digits-v1")]["metadata"]
    assert (marked["uid"], "deletionTimestamp" in marked) == (uid, True)  # (until its finalizer's controller is done)
    left = sorted((p, n) for p, ns, n in api.objects if ns == "models" and p != "events")
    assert left == sorted(
        [
            (plural, "digits-v1"),
            ("deployments", "digits-v2"),
            ("horizontalpodautoscalers", "digits-v2"),
            ("poddisruptionbudgets", "digits-v2"),
        ]
    )


def test_a_budgets_apply_served_and_answered_500_each_time_is_found_in_place_not_logged_refused(
    kube_api, caplog, monkeypatch
):
    """Each apply of a version's PodDisruptionBudget served, then answered 500 (etcd slow): read
    back, it was applied again whatever the read found (``settled(checks=False)``), four times,
    then logged "a drain may take its pods" though the budget was in place each time. A read back
    whose spec is the one rendered is that apply, served: nothing sent again."""
    from vision_rollout import mesh
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), BuildSettings(gpus=0))
    path = "/poddisruptionbudgets/digits-v2"
    _in_doubt(api, "PATCH", path, 500, True)
    api.throttle = 100
    before = len(api.requests)
    try:
        versions.apply("2", "img:2", 3)
    finally:
        api.throttle, api.throttled_path = 0, None
    assert api.objects[("poddisruptionbudgets", "models", "digits-v2")]["spec"] == render_pdb(TARGET, "2", 3)["spec"]
    assert [r["method"] for r in api.requests[before:] if r["path"].endswith(path)].count("PATCH") == 1
    assert "a drain may take its pods" not in caplog.text


def test_a_budget_deleted_in_doubt_and_made_again_meanwhile_is_not_deleted_by_the_delete_sent_again(
    kube_api, monkeypatch
):
    """A retired version's budget delete served, then answered 500; before it was sent again, the
    budget was made again (a rollout of that version applying it anew). The delete, sent again
    with no precondition, deleted the new budget. It is read first and deleted on its uid and
    resourceVersion: the delete in doubt sent again deletes nothing but the budget as read (a
    404: done; a 409, another budget or one changed since: left)."""
    from devstack.cluster.install import apply_object
    from vision_rollout import mesh
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    build = BuildSettings(gpus=0, revision_history_limit=0)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), build)
    for version in ("1", "2"):
        versions.apply(version, f"img:{version}", 2)
    versions.scale_to_zero("1")
    key = ("poddisruptionbudgets", "models", "digits-v1")

    def made_again(_: float) -> None:
        assert key not in api.objects  # (the delete in doubt was served)
        apply_object(api_client, render_pdb(TARGET, "1", 2))

    monkeypatch.setattr(mesh.time, "sleep", made_again)
    _in_doubt(api, "DELETE", "/poddisruptionbudgets/digits-v1", 500, True)
    assert versions.prune({"2"}) == ["1"]
    assert api.throttle == 0
    assert key in api.objects  # (the budget made again stays)


@pytest.mark.parametrize("causes", [False, True], ids=["message", "causes"])
def test_an_apply_conflict_past_the_messages_first_1000_characters_is_not_forced_over(causes):
    """The apply's force (fields refused only for the rollout's own field manager's other writes)
    was decided from the 409's message cut at 1000 characters (``api_message``): a long list of
    the rollout's own fields hid another manager's after it (terraform's ``.spec.replicas``), which
    the forced apply took over silently. The decision reads the Status's ``details.causes`` where
    the API server gives them, else its whole message: refused, terraform named, nothing forced."""
    from types import SimpleNamespace

    paths = [f'.spec.template.spec.containers[name="server"].env[name="VAR_{i:02d}"].value' for i in range(16)]
    message = (
        'Apply failed with 17 conflicts: conflicts with "model-rollout" using apps/v1:\n'
        + "\n".join(f"- {p}" for p in paths)
        + '\nconflicts with "terraform" using apps/v1:\n- .spec.replicas'
    )
    assert message.index("terraform") > 1000
    status: dict[str, Any] = {"kind": "Status", "message": message, "reason": "Conflict", "code": 409}
    if causes:  # (as the API server gives them: one per field)
        status["details"] = {
            "causes": [
                *(
                    {
                        "reason": "FieldManagerConflict",
                        "message": 'conflict with "model-rollout" using apps/v1',
                        "field": p,
                    }
                    for p in paths
                ),
                {
                    "reason": "FieldManagerConflict",
                    "message": 'conflict with "terraform" using apps/v1',
                    "field": ".spec.replicas",
                },
            ]
        }
    forced = []

    def patch(name, namespace, body, **kwargs):
        forced.append(kwargs.get("force", False))
        error = ApiException(status=409, reason="Conflict")
        error.body = json.dumps(status)
        raise error

    stub = SimpleNamespace(target=SimpleNamespace(namespace="models"))
    with pytest.raises(FieldsOwned) as raised:
        VersionDeployments._server_side_apply(
            stub, patch, "apply Deployment digits-v2", {"metadata": {"name": "digits-v2"}}, "7"
        )
    assert raised.value.owned['"terraform"'] == [".spec.replicas"]
    assert forced == [False]


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
@pytest.mark.parametrize("plural", ["horizontalpodautoscalers", "poddisruptionbudgets"])
def test_an_hpa_or_budget_apply_whose_last_write_is_in_doubt_is_read_back_once(
    kube_api, caplog, monkeypatch, plural, served
):
    """A version's HPA or PodDisruptionBudget apply answered 500 at each of its tries, the last one
    served: its last write in doubt was never read back (only the Deployment's scale passed a
    ``read_back``): the HPA's apply failed the scale and the budget's was logged ("a drain may take
    its pods"), both saying the apply "may have been served", the object in place. The last write
    in doubt is read back once by the apply's own attempt, its write withheld: in place, done; not
    in place, said so ("read back once, not in place"), not "may have been served"."""
    from tests.support import in_doubt_each_time
    from vision_rollout import mesh
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    build = BuildSettings(gpus=0, autoscaling=True, max_replicas=40)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), build)
    versions.apply("2", "img:2", 1)
    path = f"/{plural}/digits-v2"
    before = len(api.requests)
    in_doubt_each_time(api, "PATCH", path, 500, mesh.WRITE_TRIES, served)
    try:
        if served or plural == "poddisruptionbudgets":
            versions.scale("2", 3)
        else:
            with pytest.raises(mesh.RouterError) as failed:
                versions.scale("2", 3)
    finally:
        api.throttle, api.throttle_status, api.throttle_served, api.before_write = 0, 429, False, None
        api.throttled_methods, api.throttled_path = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"}), None
    patches = [r for r in api.requests[before:] if r["method"] == "PATCH" and r["path"].endswith(path)]
    assert len([r for r in patches if "dryRun" not in r["query"]]) == mesh.WRITE_TRIES
    live = api.objects[(plural, "models", "digits-v2")]["spec"]
    if plural == "horizontalpodautoscalers":
        assert live["minReplicas"] == (3 if served else 1)
    else:
        assert live == render_pdb(TARGET, "2", 3 if served else 1, True)["spec"]
    said = caplog.text if plural == "poddisruptionbudgets" else ("" if served else str(failed.value))
    assert "may have been served" not in said
    if served:
        assert "a drain may take its pods" not in caplog.text
    else:
        assert "; the last read back once, not in place)" in said


@pytest.mark.parametrize("plural", ["deployments", "horizontalpodautoscalers"])
def test_a_dry_run_answered_500_each_time_is_not_said_to_have_been_served(kube_api, monkeypatch, plural):
    """A dry run (``dryRun=All``: nothing stored) of the baseline's scale to 0 or of a floor's hold,
    answered 500 at each try: its failure said the last "may have been served" and was marked
    ``maybe_written``, and its last dry run was sent a fifth time as a "read back". A dry run
    writes nothing: its doubt says so, it is not read back, never ``maybe_written``. (The HPA's
    attempt reads it each time and finds the dry run's apply not in place: said; the Deployment's
    checks nothing in a dry run.)"""
    from vision_rollout import mesh
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    build = BuildSettings(gpus=0, autoscaling=plural == "horizontalpodautoscalers", max_replicas=40)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), build)
    versions.apply("2", "img:2", 1)
    if plural == "horizontalpodautoscalers":
        api.touch("deployments", "models", "digits-v2", lambda o: o["spec"].update(replicas=4))  # (the HPA's)
    before = len(api.requests)
    api.throttle, api.throttle_status, api.throttle_served = 100, 500, False
    api.throttled_methods, api.throttled_path = frozenset({"PATCH"}), f"/{plural}/digits-v2"
    try:
        dry_run = (
            partial(versions.scale, "2", 0, dry_run=True)
            if plural == "deployments"
            else partial(versions.hold_floor, "2", dry_run=True)
        )
        with pytest.raises(mesh.ApiFailed) as failed:
            dry_run()
    finally:
        api.throttle, api.throttle_status, api.throttled_path = 0, 429, None
        api.throttled_methods = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
    said = str(failed.value)
    assert "may have been" not in said
    assert not failed.value.maybe_written
    found = ", and each read back found it not in place" if plural == "horizontalpodautoscalers" else ""
    assert said.endswith(
        f"(tried {mesh.WRITE_TRIES} times: each answer left unknown whether the dry run was served{found}; a dry "
        "run, nothing written)"
    )
    patches = [r for r in api.requests[before:] if r["method"] == "PATCH"]
    assert len(patches) == mesh.WRITE_TRIES
    assert all("dryRun" in r["query"] for r in patches)


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
@pytest.mark.parametrize("change", ["count", "image"])
def test_a_deployments_apply_whose_last_write_is_in_doubt_is_read_back_once(kube_api, monkeypatch, change, served):
    """A version's Deployment applied with another count (a scale) or image, each apply answered
    500, the last one served: read back once by the apply's own attempt, its write withheld, it
    holds the template the server would hold after the apply (a dry run's), the annotations the
    apply sends and the count asked: the apply's, done; not served, "read back once, not in
    place", not ``maybe_written``."""
    from tests.support import in_doubt_each_time
    from vision_rollout import mesh
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1)
    path = "/deployments/digits-v2"
    before = len(api.requests)
    in_doubt_each_time(api, "PATCH", path, 500, mesh.WRITE_TRIES, served)
    apply = partial(versions.scale, "2", 3) if change == "count" else partial(versions.apply, "2", "img:2b", 1)
    try:
        if served:
            apply()
        else:
            with pytest.raises(mesh.ApiFailed) as failed:
                apply()
    finally:
        api.throttle, api.throttle_status, api.throttle_served, api.before_write = 0, 429, False, None
        api.throttled_methods, api.throttled_path = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"}), None
    writes = [r for r in api.requests[before:] if r["method"] == "PATCH" and r["path"].endswith(path)]
    assert len([r for r in writes if "dryRun" not in r["query"]]) == mesh.WRITE_TRIES
    live = api.objects[("deployments", "models", "digits-v2")]
    image = live["spec"]["template"]["spec"]["containers"][0]["image"]
    assert (live["spec"]["replicas"], image) == (
        (3 if change == "count" and served else 1),
        ("img:2b" if change == "image" and served else "img:2"),
    )
    if not served:
        assert str(failed.value).endswith("; the last read back once, not in place)")
        assert not failed.value.maybe_written


def test_a_scale_under_autoscaling_in_doubt_is_found_in_place_whatever_count_the_hpa_set(kube_api, monkeypatch):
    """Under autoscaling a scale's apply sets no count (the HPA's): its apply answered 500 is read
    back in place where the Deployment holds the template and annotations the apply sends, at 5
    pods (the HPA's) where 3 were asked: not sent again, the scale done (its HPA's floor at 3)."""
    from tests.support import in_doubt_each_time
    from vision_rollout import mesh
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    build = BuildSettings(gpus=0, autoscaling=True, max_replicas=40)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), build)
    versions.apply("2", "img:2", 1)
    api.touch("deployments", "models", "digits-v2", lambda o: o["spec"].update(replicas=5))  # (the HPA's)
    path = "/deployments/digits-v2"
    before = len(api.requests)
    in_doubt_each_time(api, "PATCH", path, 500, 1, False)
    try:
        versions.scale("2", 3)
    finally:
        api.throttle, api.throttle_status, api.before_write = 0, 429, None
        api.throttled_methods, api.throttled_path = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"}), None
    writes = [r for r in api.requests[before:] if r["method"] == "PATCH" and r["path"].endswith(path)]
    assert len([r for r in writes if "dryRun" not in r["query"]]) == 1  # (the one in doubt: not sent again)
    assert api.objects[("deployments", "models", "digits-v2")]["spec"]["replicas"] == 5
    assert api.objects[("horizontalpodautoscalers", "models", "digits-v2")]["spec"]["minReplicas"] == 3


def _answering(api: Any) -> None:
    """The fake API server back to answering each request (``in_doubt_each_time``'s undone)."""
    api.throttle, api.throttle_status, api.throttle_served, api.before_write = 0, 429, False, None
    api.throttled_methods, api.throttled_path = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"}), None


@pytest.mark.parametrize("first", [504, 502, None], ids=["504", "502", "no-answer"])
def test_an_earlier_apply_answered_before_its_end_keeps_the_scale_maybe_written(kube_api, monkeypatch, first):
    """A rollback's scale whose first apply was answered 504 (the API server's own timeout, the
    write under way), 502 or not at all, then 500 at each try, none served: the last read back
    not in place, the scale failed "the last read back once, not in place", not
    ``maybe_written`` (only the last failure's answer was looked at), though that first apply may
    still commit. An earlier write answered before its end is remembered: said ("an earlier write
    answered before its end ... may still land"), ``maybe_written``."""
    from tests.support import in_doubt_each_time
    from vision_rollout import mesh
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1)
    path = "/deployments/digits-v2"
    in_doubt_each_time(api, "PATCH", path, 500, mesh.WRITE_TRIES, False, first=first)
    try:
        with pytest.raises(mesh.ApiFailed) as failed:
            versions.scale("2", 3, rolling_back=True)
    finally:
        _answering(api)
    said = str(failed.value)
    assert said.endswith(
        "; the last read back once, not in place; an earlier write answered before its end (a 502, a 504 or none) "
        "may still land)"
    )
    assert failed.value.maybe_written
    assert api.objects[("deployments", "models", "digits-v2")]["spec"]["replicas"] == 1


def _rollback_scale_reserved(api: Any, api_client: Any, monkeypatch: Any, cap: float) -> tuple[Exception, int, float]:
    """Version 2's Deployment (another manager's container beside the rollout's: its read back
    sends the template's dry run) scaled to 3 as a rollback's, under ``reserved(2)`` and an
    ``api_budget`` of ``cap`` s on a clock of the fake server's requests (each call 1 s), each
    apply answered 500: what failed it, the calls made, what the budget had left."""
    from types import SimpleNamespace

    from tests.support import in_doubt_each_time
    from vision_rollout import mesh
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.settings import BuildSettings

    api.objects.pop(("deployments", "models", "digits-v2"), None)
    api.objects.pop(("poddisruptionbudgets", "models", "digits-v2"), None)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1)
    labels = {"app": "digits", "version": "2"}
    containers = [{"name": "model-server", "image": "img:2"}, {"name": "log-shipper", "image": "fluent-bit:3"}]
    body = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "digits-v2", "namespace": "models"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": containers}},
        },
    }
    client.AppsV1Api(api_client).patch_namespaced_deployment(
        "digits-v2", "models", body, field_manager="platform", _content_type="application/apply-patch+yaml"
    )
    monkeypatch.setattr(mesh, "time", SimpleNamespace(monotonic=lambda: float(len(api.requests)), sleep=lambda _: None))
    in_doubt_each_time(api, "PATCH", "/deployments/digits-v2", 500, mesh.WRITE_TRIES, False)
    before = len(api.requests)
    try:
        with mesh.api_budget(1000, 10, cap_s=cap) as budget, mesh.reserved(2):
            with pytest.raises(mesh.RouterError) as failed:
                versions.scale("2", 3, rolling_back=True)
            assert budget.answer_s == 1.0
            left = budget.left()
    finally:
        _answering(api)
    return failed.value, len(api.requests) - before, left


def test_a_read_back_of_several_calls_leaves_the_reserved_calls_their_time(kube_api, monkeypatch):
    """A rollback's scale under ``reserved(2)`` (the routes write and the lease's release after
    it), each apply answered 500: its read back was let through where the budget kept the time
    of one call more than the reserve, but the Deployment's makes two (its GET, the template's
    dry run): the budget had left 1 s where the 2 calls reserved needed 2. Each call of a read
    back is sent only where the reserve keeps its time after it (``read_back_room``): the dry
    run not sent, the scale "may have been served: not read back", ``maybe_written``, 2 s left."""
    api, api_client = kube_api
    _, calls, _ = _rollback_scale_reserved(api, api_client, monkeypatch, cap=1000)  # (its read back: 2 calls)
    cap = calls - 2 + 3  # (at the read back, the time of the reserve's 2 calls and 1 more)
    failed, calls, left = _rollback_scale_reserved(api, api_client, monkeypatch, cap=cap)
    assert left >= 2
    assert "the last may have been served: not read back, no time left for the read" in str(failed)
    assert failed.maybe_written


def test_a_rollbacks_budget_apply_that_may_still_land_is_said_so_and_maybe_written(kube_api, monkeypatch):
    """A rollback's scale whose PodDisruptionBudget apply got no answer at each try, the last not
    in place when read back: its ``BudgetNotApplied`` cut the apply's error at 500 characters,
    losing "it may still land", and was not ``maybe_written``, the apply's was. It keeps the
    apply's error whole and its ``maybe_written``."""
    from tests.support import in_doubt_each_time
    from vision_rollout import mesh
    from vision_rollout.deploy import BudgetNotApplied, VersionDeployments
    from vision_rollout.settings import BuildSettings

    api, api_client = kube_api
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    versions = VersionDeployments(TARGET, "digits", mesh.with_retries(api_client), BuildSettings(gpus=0))
    versions.apply("2", "img:2", 1)
    in_doubt_each_time(api, "PATCH", "/poddisruptionbudgets/digits-v2", None, mesh.WRITE_TRIES, False)
    try:
        with pytest.raises(BudgetNotApplied) as failed:
            versions.scale("2", 3, rolling_back=True)
    finally:
        _answering(api)
    assert "; the last not in place when read back: it may still land)" in str(failed.value)
    assert failed.value.maybe_written
    assert api.objects[("deployments", "models", "digits-v2")]["spec"]["replicas"] == 3
