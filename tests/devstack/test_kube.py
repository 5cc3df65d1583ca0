"""The cluster's API server refuses what the real one refuses, through the official client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from devstack.cluster.kube import parse_label_selector

APPLY = {"field_manager": "test", "_content_type": "application/apply-patch+yaml"}


@pytest.fixture
def core(kube_api):
    fake, api_client = kube_api
    return fake, client.CoreV1Api(api_client)


def pod(name: str, **labels: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "img:1"}]},
    }


def test_label_selectors_as_the_real_server_reads_them():
    labels = {"app": "digits", "version": "2", "already_checked": "True"}
    assert parse_label_selector("app=digits,version in (1, 2),already_checked!=False,!airflow-worker")(labels)
    assert not parse_label_selector("app==digits,version notin (2)")(labels)
    assert not parse_label_selector("missing")(labels)
    with pytest.raises(ValueError, match="invalid label key"):
        parse_label_selector("bad key=1")


def test_pods_are_created_listed_by_selector_and_validated(core):
    fake, api = core
    api.create_namespaced_pod("ml", pod("a", app="x"))
    api.create_namespaced_pod("ml", pod("b", app="y"))
    api.create_namespaced_pod("other", pod("c", app="x"))
    assert [p.metadata.name for p in api.list_namespaced_pod("ml", label_selector="app=x").items] == ["a"]
    assert [p.metadata.name for p in api.list_pod_for_all_namespaces(label_selector="app=x").items] == ["a", "c"]
    assert api.read_namespaced_pod("a", "ml").status.phase == "Pending"  # no kubelet takes it
    with pytest.raises(ApiException) as exists:
        api.create_namespaced_pod("ml", pod("a"))
    assert exists.value.status == 409
    bad = pod("d")
    bad["spec"]["containers"][0]["name"] = "Not_A_Label"
    with pytest.raises(ApiException) as invalid:
        api.create_namespaced_pod("ml", bad)
    assert invalid.value.status == 422
    assert "must be a DNS-1123 label" in invalid.value.body
    with pytest.raises(ApiException) as selector:
        api.list_namespaced_pod("ml", field_selector="spec.foo=1")
    assert selector.value.status == 400
    assert "field label not supported: spec.foo" in selector.value.body
    api.patch_namespaced_pod("a", "ml", {"metadata": {"labels": {"checked": "True"}}})
    assert api.read_namespaced_pod("a", "ml").metadata.labels == {"app": "x", "checked": "True"}
    with pytest.raises(ApiException) as immutable:
        api.patch_namespaced_pod("a", "ml", {"spec": {"containers": []}})
    assert immutable.value.status == 422
    api.delete_namespaced_pod("a", "ml")
    assert ("pods", "ml", "a") not in fake.objects  # without a kubelet, gone at once
    assert api.list_namespaced_event("ml", field_selector="involvedObject.name=b").items == []


def test_a_waiting_container_has_no_log_yet(core):
    _, api = core
    api.create_namespaced_pod("ml", pod("a"))
    with pytest.raises(ApiException) as waiting:
        api.read_namespaced_pod_log("a", "ml")
    assert waiting.value.status == 400
    assert (
        json.loads(waiting.value.body)["message"]
        == 'container "main" in pod "a" is waiting to start: ContainerCreating'
    )
    with pytest.raises(ApiException) as unknown:
        api.read_namespaced_pod_log("a", "ml", container="other")
    assert "container other is not valid for pod a" in unknown.value.body


def test_secrets_and_services_are_applied_and_checked(core):
    fake, api = core
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "ml"}, "data": {"k": "!!"}}
    with pytest.raises(ApiException) as invalid:
        api.patch_namespaced_secret("s", "ml", secret, **APPLY)
    assert invalid.value.status == 422
    assert "illegal base64 data" in invalid.value.body
    secret["data"] = {"k": "dg=="}
    api.patch_namespaced_secret("s", "ml", secret, **APPLY)
    assert api.read_namespaced_secret("s", "ml").type == "Opaque"
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "digits", "namespace": "ml"}, "spec": {}}
    with pytest.raises(ApiException) as no_ports:
        api.patch_namespaced_service("digits", "ml", service, **APPLY)
    assert "spec.ports: Required value" in no_ports.value.body
    service["spec"] = {"selector": {"app": "digits"}, "ports": [{"name": "http", "port": 8000}]}
    api.patch_namespaced_service("digits", "ml", service, **APPLY)
    assert [s.metadata.name for s in api.list_namespaced_service("ml").items] == ["digits"]
    assert fake.writes()[-1]["query"]["fieldManager"] == ["test"]


def test_deploys_overlay_applies_as_kubectl_apply_server_side_would(core):
    """Every object of deploy/overlays/local-cluster applied server-side (the README's command),
    each stored where the real server keeps it (a Namespace cluster-scoped); an object its kind's
    schema refuses is a 422 naming the field, and nothing of it is stored."""
    import copy

    from devstack import manifests
    from devstack.cluster.install import apply_object

    fake, api = core
    objects = manifests.render("local-cluster")
    for obj in objects:
        apply_object(api.api_client, obj)
    assert {(plural, ns, name) for plural, ns, name in fake.objects} >= {
        ("namespaces", "", "ml"),
        ("namespaces", "", "ml-builds"),
        ("deployments", "ml", "digits-v1"),
        ("podmonitors", "ml", "model-server"),
        ("authorizationpolicies", "ml", "digits-admin"),
        ("roles", "ml-builds", "model-rollout-builds"),
        ("poddisruptionbudgets", "ml", "digits-v1"),
        ("envoyfilters", "istio-system", "rollout-bucket"),  # networking.istio.io/v1alpha3
    }
    assert "namespace" not in fake.objects[("namespaces", "", "ml")]["metadata"]
    assert api.read_namespace("ml").metadata.labels["istio-injection"] == "enabled"
    assert fake.writes()[-1]["query"]["fieldManager"] == ["model-rollout"]
    bad = copy.deepcopy(next(o for o in objects if o["kind"] == "PodMonitor"))
    bad["metadata"]["name"] = "broken"
    bad["spec"]["podMetricsEndpoints"][0]["interval"] = "often"
    with pytest.raises(ApiException) as refused:
        apply_object(api.api_client, bad)
    assert refused.value.status == 422
    assert "interval" in json.loads(refused.value.body)["message"]
    assert ("podmonitors", "ml", "broken") not in fake.objects


def test_apply_object_names_resources_as_the_servers_table_does():
    """``install.plural`` reads the resource name from ``RESOURCES``; a kind the server does not
    serve is an error naming it, not a guessed path."""
    from devstack.cluster.install import plural

    assert plural("AuthorizationPolicy") == "authorizationpolicies"
    assert plural("Namespace") == "namespaces"
    assert plural("HorizontalPodAutoscaler") == "horizontalpodautoscalers"
    with pytest.raises(ValueError, match="'StatefulSet'"):
        plural("StatefulSet")


def test_an_istio_object_its_crd_refuses_is_invalid_by_path(core):
    """VirtualServices and DestinationRules are checked against Istio's CRD (deploy/istio/crds.yaml)
    as every other kind deploy/ applies is: a 422 naming where, and nothing stored."""
    from devstack.cluster.install import apply_object
    from model_server.traffic import TrafficPolicy
    from vision_rollout.mesh import IstioTarget, render_destination_rule, render_virtual_service

    fake, api = core
    target = IstioTarget(namespace="ml", service="digits", name="digits")
    vs = render_virtual_service(target, TrafficPolicy.from_dict({"route": [{"version": "1"}]}))
    apply_object(api.api_client, vs)
    apply_object(api.api_client, render_destination_rule(target, ["1"]))
    bad = {**vs, "metadata": {**vs["metadata"], "name": "broken"}, "spec": {**vs["spec"], "hosts": "digits"}}
    with pytest.raises(ApiException) as refused:
        apply_object(api.api_client, bad)
    assert refused.value.status == 422
    message = json.loads(refused.value.body)["message"]
    assert message.startswith('VirtualService.networking.istio.io "broken" is invalid: invalid at spec/hosts: ')
    assert ("virtualservices", "ml", "broken") not in fake.objects
    assert ("destinationrules", "ml", "digits") in fake.objects


def test_hpas_and_a_deployments_scale_speak_the_real_wire_format(core):
    """autoscaling/v2 HPAs are applied and read (bounds checked: 422), a Deployment's Scale read
    and patched (merge patch; a JSON patch must be a list: an object is a 400, as the real
    server's decoder says), and the scale writer owns spec.replicas from then on: an apply that
    changes it is a 409 Conflict naming that manager, unless forced; one that leaves it out keeps
    the writer's count."""
    from vision_rollout.deploy import render_deployment, render_hpa
    from vision_rollout.mesh import IstioTarget

    fake, api = core
    apps, autoscaling = client.AppsV1Api(api.api_client), client.AutoscalingV2Api(api.api_client)
    target = IstioTarget("ml", "digits", "digits")
    bad = render_hpa(target, "1", 1, 3)
    bad["spec"]["minReplicas"] = 0
    with pytest.raises(ApiException) as invalid:
        autoscaling.patch_namespaced_horizontal_pod_autoscaler("digits-v1", "ml", bad, **APPLY)
    assert invalid.value.status == 422
    assert "spec.minReplicas" in json.loads(invalid.value.body)["message"]
    autoscaling.patch_namespaced_horizontal_pod_autoscaler("digits-v1", "ml", render_hpa(target, "1", 2, 8), **APPLY)
    read = autoscaling.read_namespaced_horizontal_pod_autoscaler("digits-v1", "ml")
    assert (read.spec.min_replicas, read.spec.max_replicas, read.spec.scale_target_ref.name) == (2, 8, "digits-v1")

    apps.patch_namespaced_deployment("digits-v1", "ml", render_deployment(target, "digits", "1", "img:1", 3), **APPLY)
    scale = apps.read_namespaced_deployment_scale("digits-v1", "ml")
    assert (scale.kind, scale.spec.replicas, scale.status.selector) == ("Scale", 3, "app=digits,version=1")
    # (the client sends a dict as a strategic merge patch, whatever it is told: a raw request)
    request = urllib.request.Request(
        f"{fake.url}/apis/apps/v1/namespaces/ml/deployments/digits-v1/scale",
        data=json.dumps({"spec": {"replicas": 5}}).encode(),
        headers={"Content-Type": "application/json-patch+json"},
        method="PATCH",
    )
    with pytest.raises(urllib.error.HTTPError) as not_a_list:
        urllib.request.urlopen(request, timeout=10)
    assert not_a_list.value.code == 400
    assert json.loads(not_a_list.value.read())["message"] == (
        "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
    )
    apps.patch_namespaced_deployment_scale("digits-v1", "ml", {"spec": {"replicas": 5}}, field_manager="hpa")
    assert apps.read_namespaced_deployment("digits-v1", "ml").spec.replicas == 5

    with pytest.raises(ApiException) as conflict:
        apps.patch_namespaced_deployment(
            "digits-v1", "ml", render_deployment(target, "digits", "1", "img:1", 3), **APPLY
        )
    assert conflict.value.status == 409
    assert json.loads(conflict.value.body)["message"] == (
        'Apply failed with 1 conflict: conflict with "hpa" with subresource "scale" using apps/v1: .spec.replicas'
    )
    apps.patch_namespaced_deployment("digits-v1", "ml", render_deployment(target, "digits", "1", "img:2", 5), **APPLY)
    apps.patch_namespaced_deployment(
        "digits-v1", "ml", render_deployment(target, "digits", "1", "img:2", None), **APPLY
    )
    assert apps.read_namespaced_deployment("digits-v1", "ml").spec.replicas == 5  # the scale writer's, kept
    apps.patch_namespaced_deployment(
        "digits-v1", "ml", render_deployment(target, "digits", "1", "img:2", 2), force=True, **APPLY
    )
    assert apps.read_namespaced_deployment("digits-v1", "ml").spec.replicas == 2
    with pytest.raises(ApiException) as missing:
        apps.read_namespaced_deployment_scale("digits-v9", "ml")
    assert missing.value.status == 404


def test_a_delete_whose_preconditions_do_not_hold_is_a_conflict(core):
    """DeleteOptions' preconditions, as the real server checks them: a uid or resourceVersion that
    is not the object's (changed or replaced since it was read) is a 409 Conflict, the object
    kept; a missing object a 404."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import IstioTarget
    from vision_rollout.settings import BuildSettings

    fake, core_api = core
    api = core_api.api_client
    versions = VersionDeployments(IstioTarget("models", "digits", "digits"), "digits", api, BuildSettings(gpus=0))
    live = versions.apply("2", "img:1", 1)["metadata"]
    apps = client.AppsV1Api(api)

    def delete(uid=None, resource_version=None):
        options = client.V1DeleteOptions(
            preconditions=client.V1Preconditions(uid=uid, resource_version=resource_version)
        )
        return apps.delete_namespaced_deployment("digits-v2", "models", body=options)

    versions.scale("2", 2)  # changed since it was read
    for stale in ({"resource_version": live["resourceVersion"]}, {"uid": "not-its-uid"}):
        with pytest.raises(ApiException) as refused:
            delete(**stale)
        assert refused.value.status == 409
        message = json.loads(refused.value.body)["message"]
        assert message.startswith('Operation cannot be fulfilled on deployments.apps "digits-v2": ')
        assert "Precondition failed" in message
    assert ("deployments", "models", "digits-v2") in fake.objects
    now = fake.objects[("deployments", "models", "digits-v2")]["metadata"]
    delete(uid=now["uid"], resource_version=now["resourceVersion"])
    assert ("deployments", "models", "digits-v2") not in fake.objects
    with pytest.raises(ApiException) as missing:
        delete()
    assert missing.value.status == 404


def test_a_delete_of_an_object_with_finalizers_marks_it_and_keeps_it(core):
    """As the real server: an object holding finalizers is not removed by a delete but marked
    (``deletionTimestamp``, a new resourceVersion), answered 200 with the object as marked; it
    stays until its finalizers' controllers are done, so a delete sent again on the
    resourceVersion it was read at is a 409."""
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import IstioTarget
    from vision_rollout.settings import BuildSettings

    fake, core_api = core
    api = core_api.api_client
    versions = VersionDeployments(IstioTarget("models", "digits", "digits"), "digits", api, BuildSettings(gpus=0))
    versions.apply("2", "img:1", 1)
    fake.touch("deployments", "models", "digits-v2", lambda o: o["metadata"].update(finalizers=["example.com/keep"]))
    read = fake.get("deployments", "models", "digits-v2")["metadata"]
    options = client.V1DeleteOptions(
        preconditions=client.V1Preconditions(uid=read["uid"], resource_version=read["resourceVersion"])
    )
    apps = client.AppsV1Api(api)
    answer = apps.delete_namespaced_deployment("digits-v2", "models", body=options, _preload_content=False)
    marked = json.loads(answer.data)
    assert (answer.status, marked["kind"]) == (200, "Deployment")
    assert marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["resourceVersion"] != read["resourceVersion"]
    assert fake.objects[("deployments", "models", "digits-v2")]["metadata"]["deletionTimestamp"]
    with pytest.raises(ApiException) as again:
        apps.delete_namespaced_deployment("digits-v2", "models", body=options)
    assert again.value.status == 409


def test_an_apply_changing_a_field_another_manager_applied_is_a_conflict(core):
    """Server-side apply tracks each field's managers: an apply (not forced) that changes a field
    another manager applied is a 409 naming the manager and the field's path, as the real server
    answers; the same value is shared without a conflict; force takes the field over; the other
    manager keeps the fields it alone set. Only spec.replicas was tracked: the rollout's apply
    of an image someone else had applied went through here, and failed on a real cluster."""
    from vision_rollout.deploy import render_deployment
    from vision_rollout.mesh import IstioTarget

    fake, api = core
    apps = client.AppsV1Api(api.api_client)
    target = IstioTarget("ml", "digits", "digits")
    theirs = render_deployment(target, "digits", "2", "img:theirs", 1)
    theirs["metadata"]["labels"]["team"] = "vision"
    apps.patch_namespaced_deployment(
        "digits-v2", "ml", theirs, field_manager="argocd-controller", _content_type=APPLY["_content_type"]
    )
    same = render_deployment(target, "digits", "2", "img:theirs", 1)
    apps.patch_namespaced_deployment("digits-v2", "ml", same, **APPLY)  # the same values: shared
    mine = render_deployment(target, "digits", "2", "img:mine", 1)
    with pytest.raises(ApiException) as conflict:
        apps.patch_namespaced_deployment("digits-v2", "ml", mine, **APPLY)
    assert conflict.value.status == 409
    assert json.loads(conflict.value.body)["message"] == (
        'Apply failed with 1 conflict: conflict with "argocd-controller" using apps/v1: '
        '.spec.template.spec.containers[name="model-server"].image'
    )
    live = fake.objects[("deployments", "ml", "digits-v2")]
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "img:theirs"
    apps.patch_namespaced_deployment("digits-v2", "ml", mine, force=True, **APPLY)
    live = fake.objects[("deployments", "ml", "digits-v2")]
    assert live["spec"]["template"]["spec"]["containers"][0]["image"] == "img:mine"
    owners = {e["manager"]: e["fieldsV1"] for e in live["metadata"]["managedFields"]}
    image = owners["test"]["f:spec"]["f:template"]["f:spec"]["f:containers"]['k:{"name":"model-server"}']
    assert "f:image" in image
    theirs_now = owners["argocd-controller"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
    assert "f:image" not in theirs_now['k:{"name":"model-server"}']  # taken over
    assert "f:team" in owners["argocd-controller"]["f:metadata"]["f:labels"]
    assert live["metadata"]["labels"]["team"] == "vision"  # (argocd-controller's alone: kept)


def test_an_apply_conflict_is_a_status_whose_details_list_each_field_and_its_manager(core):
    """The real API server's 409 for an apply's conflicts is a Status of reason Conflict whose
    ``details.causes`` list each field (``FieldManagerConflict``: the manager as the message names
    it, the field's path); the fake's had no details, so what the rollout reads of them (its
    ``FieldsOwned``: each manager with its fields) was never met here. They are given, each field
    once, its manager as the message says it; the rollout's refusal names them."""
    from vision_rollout.deploy import FieldsOwned, VersionDeployments, render_deployment
    from vision_rollout.mesh import IstioTarget

    _fake, api = core
    apps = client.AppsV1Api(api.api_client)
    target = IstioTarget("ml", "digits", "digits")
    theirs = render_deployment(target, "digits", "2", "img:theirs", 1)
    apps.patch_namespaced_deployment(
        "digits-v2", "ml", theirs, field_manager="argocd-controller", _content_type=APPLY["_content_type"]
    )
    apps.patch_namespaced_deployment_scale("digits-v2", "ml", {"spec": {"replicas": 4}}, field_manager="hpa")
    mine = render_deployment(target, "digits", "2", "img:mine", 2)
    with pytest.raises(ApiException) as conflict:
        apps.patch_namespaced_deployment("digits-v2", "ml", mine, **APPLY)
    answer = json.loads(conflict.value.body)
    image = '.spec.template.spec.containers[name="model-server"].image'
    assert (answer["kind"], answer["status"], answer["reason"], answer["code"]) == (
        "Status",
        "Failure",
        "Conflict",
        409,
    )
    assert answer["message"] == (
        "Apply failed with 2 conflicts: "
        f'conflicts with "argocd-controller" using apps/v1:\n- {image}\n'
        'conflicts with "hpa" with subresource "scale" using apps/v1:\n- .spec.replicas'
    )
    assert sorted(answer["details"]["causes"], key=lambda c: c["field"]) == [
        {
            "reason": "FieldManagerConflict",
            "message": 'conflict with "hpa" with subresource "scale" using apps/v1',
            "field": ".spec.replicas",
        },
        {
            "reason": "FieldManagerConflict",
            "message": 'conflict with "argocd-controller" using apps/v1',
            "field": image,
        },
    ]
    versions = VersionDeployments(target, "digits", api.api_client)
    read = apps.read_namespaced_deployment("digits-v2", "ml").metadata.resource_version
    with pytest.raises(FieldsOwned) as refused:
        versions._server_side_apply(apps.patch_namespaced_deployment, "apply Deployment digits-v2", mine, read)
    assert refused.value.owned == {'"argocd-controller"': [image], '"hpa" with subresource "scale"': [".spec.replicas"]}
    assert f'"argocd-controller" owns {image}' in str(refused.value)
    assert '"hpa" with subresource "scale" owns .spec.replicas' in str(refused.value)


def test_the_managers_of_an_istio_objects_and_a_budgets_fields_are_recorded_as_a_real_server_does(core):
    """Only a Deployment's fields had managers here: a VirtualService's, DestinationRule's or
    PodDisruptionBudget's apply took every field, so what the rollout did to another manager's
    label or setting could not be seen. Their managers are recorded (FieldsV1, in GET answers):
    a change of another's field is a 409 naming it unless forced, force takes it over, a label
    a manager alone owns goes when its apply leaves it out, another's stays, a list is atomic."""
    fake, api = core
    crd = client.CustomObjectsApi(api.api_client)
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "digits", "namespace": "ml", "labels": {"team": "vision"}, "annotations": {"a": "1"}},
        "spec": {
            "hosts": ["digits"],
            "exportTo": ["."],
            "http": [{"name": "default", "timeout": "7s", "route": [{"destination": {"host": "digits"}}]}],
        },
    }

    def apply(body, manager, **kw):
        return crd.patch_namespaced_custom_object(
            "networking.istio.io",
            "v1",
            "ml",
            "virtualservices",
            "digits",
            body,
            field_manager=manager,
            _content_type=APPLY["_content_type"],
            **kw,
        )

    apply(vs, "argocd-controller")
    mine = json.loads(json.dumps(vs))
    mine["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "model-rollout"}
    del mine["metadata"]["annotations"]
    mine["spec"]["exportTo"] = ["*"]
    with pytest.raises(ApiException) as conflict:
        apply(mine, "model-rollout")
    assert conflict.value.status == 409
    assert json.loads(conflict.value.body)["message"] == (
        'Apply failed with 1 conflict: conflict with "argocd-controller" using networking.istio.io/v1: .spec.exportTo'
    )
    apply(mine, "model-rollout", force=True)
    got = crd.get_namespaced_custom_object("networking.istio.io", "v1", "ml", "virtualservices", "digits")
    owners = {e["manager"]: e["fieldsV1"] for e in got["metadata"]["managedFields"]}
    assert "f:exportTo" in owners["model-rollout"]["f:spec"]
    assert "f:exportTo" not in owners["argocd-controller"]["f:spec"]
    assert owners["model-rollout"]["f:spec"]["f:http"] == {}  # atomic: owned whole
    assert "f:http" in owners["argocd-controller"]["f:spec"]  # the same value: shared
    assert got["metadata"]["labels"] == {"team": "vision", "app.kubernetes.io/managed-by": "model-rollout"}
    assert got["metadata"]["annotations"] == {"a": "1"}  # argocd-controller's: kept
    platform = {"apiVersion": vs["apiVersion"], "kind": vs["kind"], "metadata": {"name": "digits", "namespace": "ml"}}
    apply({**platform, "spec": {"hosts": ["digits"]}}, "argocd-controller")  # its label and annotation left out
    meta = fake.objects[("virtualservices", "ml", "digits")]["metadata"]
    assert meta["labels"] == {"app.kubernetes.io/managed-by": "model-rollout"}
    assert "annotations" not in meta
    assert fake.objects[("virtualservices", "ml", "digits")]["spec"]["exportTo"] == ["*"]  # model-rollout's
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "digits-v1", "namespace": "ml", "labels": {"team": "vision"}},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "digits"}}},
    }
    policy = client.PolicyV1Api(api.api_client)
    policy.patch_namespaced_pod_disruption_budget(
        "digits-v1", "ml", pdb, field_manager="argocd-controller", _content_type=APPLY["_content_type"]
    )
    with pytest.raises(ApiException) as conflict:
        policy.patch_namespaced_pod_disruption_budget(
            "digits-v1", "ml", {**pdb, "spec": {**pdb["spec"], "maxUnavailable": 0}}, **APPLY
        )
    assert json.loads(conflict.value.body)["message"].endswith(": .spec.maxUnavailable")


@pytest.mark.parametrize(("status", "reason"), [(502, "Bad Gateway"), (504, "Gateway Timeout")])
def test_a_write_throttled_with_a_proxys_502_or_504_is_answered_so(core, status, reason):
    """``throttle_status`` 502 or 504 (a proxy before the API server: a bad gateway, a gateway
    timing out) failed the fake itself (a KeyError of ``REFUSALS``): the write is answered so,
    a status the rollout reads back as any other it may have been served under (``MAYBE_SERVED``)."""
    from devstack.cluster.kube import REFUSALS
    from vision_rollout.mesh import MAYBE_SERVED

    fake, core_api = core
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "1"}}
    fake.throttle, fake.throttle_status, fake.throttled_methods = 1, status, frozenset({"PATCH"})
    with pytest.raises(ApiException) as failed:
        core_api.patch_namespaced_secret("s", "default", secret, **APPLY)
    assert (failed.value.status, failed.value.reason) == (status, reason)
    assert fake.requests[-1]["status"] == status
    assert ("secrets", "default", "s") not in fake.objects
    assert MAYBE_SERVED <= set(REFUSALS)


def test_a_write_throttled_after_it_was_served_is_stored_and_answered_as_refused(core):
    """``throttle_served``: the write throttled (of ``throttled_path``'s object only) is served,
    then answered ``throttle_status``, as a 500 of etcd timing out after its commit; without it,
    as before, it is answered so unserved."""
    fake, core_api = core
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "1"}}
    core_api.patch_namespaced_secret("s", "default", secret, **APPLY)
    fake.throttle, fake.throttle_status, fake.throttled_methods = 2, 500, frozenset({"PATCH"})
    fake.throttled_path = "/secrets/t"
    core_api.patch_namespaced_secret("s", "default", {**secret, "stringData": {"k": "2"}}, **APPLY)  # not its path
    fake.throttle_served = True
    for name, value in (("t", "3"), ("t", "4")):
        with pytest.raises(ApiException) as failed:
            core_api.patch_namespaced_secret(
                name, "default", {**secret, "metadata": {"name": name}, "stringData": {"k": value}}, **APPLY
            )
        assert failed.value.status == 500
        fake.throttle_served = False  # the second one refused unserved
    assert fake.throttle == 0
    assert [(r["path"].rpartition("/")[2], r["status"], r.get("served")) for r in fake.requests[-3:]] == [
        ("s", 200, None),
        ("t", 500, 500),
        ("t", 500, None),
    ]
    assert fake.objects[("secrets", "default", "s")]["data"]["k"] == "Mg=="  # "2"
    assert fake.objects[("secrets", "default", "t")]["data"]["k"] == "Mw=="  # "3": the first only
    fake.throttle, fake.throttle_status, fake.throttle_served = 1, None, True  # served, then no answer
    with pytest.raises(HTTPError):  # (urllib3's: the connection closed, no answer)
        core_api.patch_namespaced_secret("t", "default", {**secret, "metadata": {"name": "t"}}, **APPLY)
    assert (fake.requests[-1]["status"], fake.requests[-1]["served"]) == (None, "dropped")
    assert fake.objects[("secrets", "default", "t")]["data"]["k"] == "MQ=="  # "1": served


def test_a_merge_patch_of_an_hpa_keeps_the_real_servers_preconditions_no_ops_and_directives(core):
    """The fake's merge patch of an HPA (``FakeKubeAPI.merge_patch``) took a stale
    metadata.resourceVersion (the real server: 409 Conflict), bumped the resourceVersion and added a
    managedFields entry for a patch that changed nothing (the real server: neither), stored a
    strategic merge patch's ``$patch`` directive as a label key (refused 422 as one), and answered a
    JSON array given to it directly with a TypeError. Now: 409 for a resourceVersion not the live
    one; a no-op left as it is; a strategic ``$patch: replace`` replaces the map and ``$patch:
    delete`` removes it, another directive 400; a JSON merge patch keeps ``$patch`` a key as RFC 7386
    does (a label key refused, 422); a body not an object 400."""
    from devstack.cluster.kube import APIError
    from vision_rollout.deploy import render_hpa
    from vision_rollout.mesh import IstioTarget

    fake, api = core
    autoscaling = client.AutoscalingV2Api(api.api_client)
    target = IstioTarget("ml", "digits", "digits")
    autoscaling.patch_namespaced_horizontal_pod_autoscaler("digits-v1", "ml", render_hpa(target, "1", 2, 8), **APPLY)
    url = f"{fake.url}/apis/autoscaling/v2/namespaces/ml/horizontalpodautoscalers/digits-v1"

    def patched(body: object, kind: str = "merge", manager: str = "someone") -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{url}?fieldManager={manager}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": f"application/{kind}-patch+json"},
            method="PATCH",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def live() -> dict:
        return api.api_client.sanitize_for_serialization(
            autoscaling.read_namespaced_horizontal_pod_autoscaler("digits-v1", "ml")
        )

    before = live()
    version = before["metadata"]["resourceVersion"]
    status, answer = patched({"metadata": {"resourceVersion": "1"}, "spec": {"minReplicas": 3}})
    assert status == 409
    assert answer["reason"] == "Conflict"
    assert answer["message"] == (
        'Operation cannot be fulfilled on horizontalpodautoscalers.autoscaling "digits-v1": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )
    assert live() == before
    status, answer = patched({"metadata": {"resourceVersion": version}, "spec": {"minReplicas": 3}})
    assert status == 200
    assert answer["spec"]["minReplicas"] == 3
    after = live()
    status, answer = patched({"spec": {"minReplicas": 3}}, manager="no-op")
    assert status == 200
    assert answer["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]
    assert live() == after  # (its resourceVersion kept, no entry for "no-op")

    status, answer = patched({"metadata": {"labels": {"$patch": "replace", "team": "vision"}}}, kind="strategic-merge")
    assert status == 200
    assert live()["metadata"]["labels"] == {"team": "vision"}
    status, answer = patched({"metadata": {"labels": {"$patch": "delete"}}}, kind="strategic-merge")
    assert status == 200
    assert "labels" not in live()["metadata"]
    for directive in ({"$patch": "replicate"}, {"$retainKeys": ["team"]}):
        status, answer = patched({"metadata": {"labels": directive}}, kind="strategic-merge")
        assert status == 400, directive
        assert "$" in answer["message"]
    status, answer = patched({"metadata": {"labels": {"$patch": "replace"}}})  # (RFC 7386: a key as any other)
    assert status == 422
    assert "metadata.labels" in answer["message"]
    assert "labels" not in live()["metadata"]
    for body in ([1, 2], "spec"):
        status, answer = patched(body)
        assert status == 400
        with pytest.raises(APIError) as refused:
            fake.merge_patch("horizontalpodautoscalers", "ml", "digits-v1", body, "someone")  # type: ignore[arg-type]
        assert refused.value.code == 400
