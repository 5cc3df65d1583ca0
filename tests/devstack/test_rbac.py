"""RBAC as the API server evaluates it: the request attributes of a recorded call, the second
check of an apply that creates its object, the rule match, the grants no call needed, and the
Roles deploy/ binds to the Airflow workers, against what a rollout calls."""

from __future__ import annotations

from typing import Any

import pytest

from devstack import manifests, rbac
from devstack.cluster.kube import WORKER_USER, FakeKubeAPI

APPLY = "application/apply-patch+yaml"


def call(method: str, path: str, **query: str) -> rbac.Attributes:
    return rbac.attributes({"method": method, "path": path, "query": {k: [v] for k, v in query.items()}})


def record(method: str, path: str, content_type: str = "", **seen: Any) -> dict[str, Any]:
    """A call as the fake API server records it (``seen``: what it adds, ``existed`` for an apply)."""
    return {"method": method, "path": path, "query": {}, "content_type": content_type, **seen}


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/b/pods/p", {}, ("get", "", "pods", "b", "p")),
        ("GET", "/api/v1/namespaces/b/pods", {}, ("list", "", "pods", "b", "")),
        ("GET", "/api/v1/namespaces/b/pods", {"watch": "true"}, ("watch", "", "pods", "b", "")),
        ("GET", "/api/v1/namespaces/b/pods/p/log", {}, ("get", "", "pods/log", "b", "p")),
        ("POST", "/api/v1/namespaces/b/pods", {}, ("create", "", "pods", "b", "")),
        ("PATCH", "/apis/apps/v1/namespaces/ml/deployments/d", {}, ("patch", "apps", "deployments", "ml", "d")),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/ml/deployments/d/scale",
            {},
            ("patch", "apps", "deployments/scale", "ml", "d"),
        ),
        (
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/ml/leases/l",
            {},
            ("update", "coordination.k8s.io", "leases", "ml", "l"),
        ),
        ("DELETE", "/api/v1/namespaces/b/pods/p", {}, ("delete", "", "pods", "b", "p")),
        ("DELETE", "/api/v1/namespaces/b/pods", {}, ("deletecollection", "", "pods", "b", "")),
        ("GET", "/api/v1/nodes", {}, ("list", "", "nodes", "", "")),
    ],
)
def test_request_attributes_as_the_api_server_derives_them(method, path, query, expected):
    attrs = call(method, path, **query)
    assert (attrs.verb, attrs.group, attrs.resource, attrs.namespace, attrs.name) == expected


def test_a_path_that_is_no_resource_is_refused():
    with pytest.raises(ValueError, match="not a resource path: /healthz"):
        call("GET", "/healthz")


def test_the_rule_match():
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["patch"], "resourceNames": ["d"]},
        {"apiGroups": ["*"], "resources": ["*/log"], "verbs": ["*"]},
    ]
    assert rbac.allowed(rules, call("GET", "/api/v1/namespaces/b/pods/p"))
    assert not rbac.allowed(rules, call("DELETE", "/api/v1/namespaces/b/pods/p"))
    assert not rbac.allowed(rules, call("GET", "/apis/apps/v1/namespaces/b/deployments/d"))  # another group's pods
    assert rbac.allowed(rules, call("PATCH", "/apis/apps/v1/namespaces/b/deployments/d"))
    assert not rbac.allowed(rules, call("PATCH", "/apis/apps/v1/namespaces/b/deployments/e"))  # resourceNames
    assert not rbac.allowed(rules, call("PATCH", "/apis/apps/v1/namespaces/b/deployments/d/scale"))  # a subresource
    assert rbac.allowed(rules, call("GET", "/api/v1/namespaces/b/pods/p/log"))  # */log
    assert not rbac.allowed([], call("GET", "/api/v1/namespaces/b/pods/p"))


def test_the_grants_no_call_needed():
    rules = [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "delete"]}]
    calls = [call("GET", "/api/v1/namespaces/b/pods/p"), call("GET", "/api/v1/namespaces/b/pods/p/log")]
    assert rbac.unused(rules, calls) == [("", "pods", "delete"), ("", "pods/log", "delete")]


def test_the_workers_roles_in_deploy():
    rules = rbac.bound_rules(manifests.render("production"), WORKER_USER)
    assert set(rules) == {"ml", "ml-builds", "istio-system"}
    assert rbac.allowed(rules["ml"], call("PATCH", "/apis/networking.istio.io/v1/namespaces/ml/virtualservices/digits"))
    filters = "/apis/networking.istio.io/v1alpha3/namespaces/istio-system/envoyfilters/"
    assert rbac.allowed(rules["istio-system"], call("GET", filters + "rollout-bucket"))  # the bucket filter, read only
    assert not rbac.allowed(rules["istio-system"], call("PATCH", filters + "rollout-bucket"))
    assert not rbac.allowed(rules["istio-system"], call("GET", filters + "another"))
    assert not rbac.allowed(rules["ml"], call("GET", "/api/v1/namespaces/ml/secrets/model-server-admin"))
    assert not rbac.allowed(rules["ml-builds"], call("PATCH", "/apis/apps/v1/namespaces/ml-builds/deployments/x"))
    assert rbac.bound_rules(manifests.render("production"), "system:serviceaccount:airflow:someone-else") == {}


def test_every_binding_of_the_workers_counts_however_it_names_them():
    """A RoleBinding of a ClusterRole, a ClusterRoleBinding (every namespace) and a binding of a
    group the API server puts the ServiceAccount in grant it as a Role's RoleBinding does: none
    is left out of what the least-privilege checks see, and a binding whose role is not among the
    objects is refused rather than read as granting nothing."""

    def binding(kind: str, role: tuple[str, str], subject: dict[str, str], namespace: str = "") -> dict[str, Any]:
        meta = {"name": f"b-{len(subject['name'])}-{role[1]}", **({"namespace": namespace} if namespace else {})}
        ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": role[0], "name": role[1]}
        return {"kind": kind, "metadata": meta, "roleRef": ref, "subjects": [subject]}

    def role(kind: str, name: str, verb: str, namespace: str = "") -> dict[str, Any]:
        meta = {"name": name, **({"namespace": namespace} if namespace else {})}
        return {
            "kind": kind,
            "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": [verb]}],
        }

    account = {"kind": "ServiceAccount", "name": "airflow-worker", "namespace": "airflow"}
    group = {"kind": "Group", "name": "system:serviceaccounts:airflow"}
    objects = [
        role("ClusterRole", "edit", "get"),
        role("ClusterRole", "lister", "list"),
        role("Role", "deleter", "delete", "ml"),
        binding("RoleBinding", ("ClusterRole", "edit"), account, "ml"),
        binding("ClusterRoleBinding", ("ClusterRole", "lister"), account),
        binding("RoleBinding", ("Role", "deleter"), group, "ml"),
    ]
    rules = rbac.bound_rules(objects, WORKER_USER)
    assert set(rules) == {"ml", "*"}
    assert rbac.allowed(rules["ml"], call("GET", "/api/v1/namespaces/ml/secrets/s"))
    assert rbac.allowed(rules["ml"], call("DELETE", "/api/v1/namespaces/ml/secrets/s"))
    assert rbac.allowed(rules["*"], call("GET", "/api/v1/namespaces/other/secrets"))
    assert rbac.bound_rules(objects, "system:serviceaccount:ml:other") == {}
    with pytest.raises(ValueError, match="RoleBinding b-14-admin binds ClusterRole admin, which is not among"):
        rbac.bound_rules([binding("RoleBinding", ("ClusterRole", "admin"), account, "ml")], WORKER_USER)


DEPLOYMENT = "/apis/apps/v1/namespaces/ml/deployments/digits-v2"


def test_an_apply_that_creates_its_object_is_checked_for_create_as_well():
    """As the API server's patch handler: every PATCH is authorized as patch; an apply (and only
    an apply: the other patch types never create) that finds no object is also authorized as
    create, with the same resource and name, before the object is created."""
    patch = rbac.Attributes("patch", "apps", "deployments", "ml", "digits-v2")
    create = rbac.Attributes("create", "apps", "deployments", "ml", "digits-v2")
    assert rbac.checks(record("PATCH", DEPLOYMENT, APPLY, existed=False)) == [patch, create]
    assert rbac.checks(record("PATCH", DEPLOYMENT, APPLY, existed=True)) == [patch]
    assert rbac.checks(record("PATCH", DEPLOYMENT, f"{APPLY}; charset=utf-8", existed=False)) == [patch, create]
    assert rbac.checks(record("PATCH", DEPLOYMENT, "application/apply-patch+cbor", existed=False)) == [patch, create]
    assert rbac.checks(record("PATCH", DEPLOYMENT, APPLY)) == [patch]  # refused before the store looked
    for other in (
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
    ):
        assert rbac.checks(record("PATCH", DEPLOYMENT, other, existed=False)) == [patch]  # a 404, never a create
    scale = record("PATCH", f"{DEPLOYMENT}/scale", APPLY, existed=False)
    assert rbac.checks(scale)[1] == rbac.Attributes("create", "apps", "deployments/scale", "ml", "digits-v2")
    assert rbac.checks(record("GET", DEPLOYMENT)) == [rbac.Attributes("get", "apps", "deployments", "ml", "digits-v2")]


def test_patch_alone_applies_to_an_existing_object_and_refuses_a_new_one():
    """Through the fake API server and the kubernetes client: the first apply of a Deployment
    created it, the second patched it; with patch alone only the second is allowed."""
    from kubernetes import client, config

    from vision_rollout.deploy import render_deployment
    from vision_rollout.mesh import IstioTarget

    api = FakeKubeAPI().start()
    try:
        apps = client.AppsV1Api(config.new_client_from_config_dict(api.kubeconfig("ml")))
        body = render_deployment(IstioTarget("ml", "digits", "digits"), "digits", "2", "img:2", 1)
        for _ in range(2):
            apps.patch_namespaced_deployment("digits-v2", "ml", body, field_manager="t", _content_type=APPLY)
    finally:
        api.stop()
    first, second = (r for r in api.requests if r["method"] == "PATCH")
    assert (first["status"], first["existed"], second["status"], second["existed"]) == (201, False, 200, True)
    patch_only = [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["patch"]}]
    assert [rbac.allowed(patch_only, c) for c in rbac.checks(first)] == [True, False]
    assert [rbac.allowed(patch_only, c) for c in rbac.checks(second)] == [True]
    with_create = [{**patch_only[0], "verbs": ["create", "patch"]}]
    assert all(rbac.allowed(with_create, c) for c in rbac.checks(first))
    assert rbac.unused(with_create, rbac.checks(second)) == [("apps", "deployments", "create")]


def test_the_workers_roles_allow_a_rollouts_calls_creating_the_candidates_deployment(tmp_path):
    """deploy/ installed (its production overlay, as kubectl apply --server-side would), then what
    a rollout does with the workers' credentials: the Lease, the mesh read and reconciled, the
    candidate's Deployment applied into being, the weights, the baseline retired, the Lease
    released. Every authorization decision those calls need, the create of the candidate's
    Deployment included, is allowed by the Roles deploy/ binds to the workers."""
    from kubernetes import client, config

    from devstack.cluster.install import apply_object
    from model_server.traffic import TrafficPolicy
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.locks import LeaseLock
    from vision_rollout.mesh import IstioRouter, IstioTarget

    api = FakeKubeAPI().start()
    try:
        cfg = client.Configuration()
        cfg.host = api.url
        objects = manifests.render("production")
        for obj in objects:
            apply_object(client.ApiClient(cfg), obj)
        worker = config.new_client_from_config_dict(api.kubeconfig("ml"))
        target = IstioTarget("ml", "digits", "digits")
        lock = LeaseLock("digits", "ml", worker, key="digits")
        lock.acquire("run-1")
        router = IstioRouter(target, ["1", "2"], api_client=worker)
        router.get_routes()
        router.reconcile()
        deployments = VersionDeployments(target, "digits", worker)
        deployments.apply("2", "registry.example.com/ml/model-server:digits-2", 1, like="1")
        router.set_routes(
            TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]})
        )
        router.set_routes(TrafficPolicy.from_dict({"route": [{"version": "2", "weight": 100}]}))
        deployments.scale_to_zero("1")
        lock.release("run-1")
    finally:
        api.stop()
    calls = [c for r in api.requests if r["user"] == WORKER_USER for c in rbac.checks(r)]
    assert rbac.Attributes("create", "apps", "deployments", "ml", "digits-v2") in calls  # applied into being
    assert rbac.Attributes("create", "apps", "deployments", "ml", "digits-v1") not in calls  # patched
    rules = rbac.bound_rules(objects, WORKER_USER)
    assert sorted({str(c) for c in calls if not rbac.allowed(rules.get(c.namespace, []), c)}) == []


def test_the_workers_read_why_a_candidates_pods_never_became_ready(tmp_path):
    """Through a fake API server that authorizes each call by the Roles deploy/ installs (as the
    API server's RBAC authorizer): a candidate whose pod cannot pull its image. The workers' Role
    granted no pods, so wait_ready's list of the version's pods was refused (403) and the task
    said only what the Deployment's conditions say; it may list them, read only, in the models'
    namespace, and the error names the pod's ImagePullBackOff. What the Role does not grant is
    still refused (a Secret read, a pod deleted), and an apply that would create its object is
    asked for create as well (the failure callback's Role patches Deployments, creates none)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    from devstack.cluster.install import apply_object
    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.mesh import IstioTarget, RouterError

    api = FakeKubeAPI(enforce_rbac=True).start()
    try:
        cfg = client.Configuration()
        cfg.host = api.url
        for obj in manifests.render("production"):
            apply_object(client.ApiClient(cfg), obj)
        worker = config.new_client_from_config_dict(api.kubeconfig("ml"))
        deployments = VersionDeployments(IstioTarget("ml", "digits", "digits"), "digits", worker)
        deployments.apply("2", "img:2", 1)
        unavailable = {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable", "message": ""}
        api.touch(
            "deployments", "ml", "digits-v2", lambda d: d["status"].update(readyReplicas=0, conditions=[unavailable])
        )
        waiting = {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "img:2"'}}
        api.objects[("pods", "ml", "digits-v2-abc")] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "digits-v2-abc", "namespace": "ml", "labels": {"app": "digits", "version": "2"}},
            "spec": {"containers": [{"name": "model-server", "image": "img:2"}]},
            "status": {
                "containerStatuses": [
                    {
                        "name": "model-server",
                        "image": "img:2",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": waiting,
                    }
                ]
            },
        }
        with pytest.raises(RouterError) as failed:
            deployments.wait_ready("2", 1, timeout_s=0)
        core = client.CoreV1Api(worker)
        for refused in (
            lambda: core.read_namespaced_secret("model-server-admin", "ml"),
            lambda: core.delete_namespaced_pod("digits-v2-abc", "ml"),
        ):
            with pytest.raises(ApiException) as forbidden:
                refused()
            assert forbidden.value.status == 403
        as_callback = config.new_client_from_config_dict(api.kubeconfig("ml", manifests.airflow_user("dagProcessor")))
        callback = VersionDeployments(IstioTarget("ml", "digits", "digits"), "digits", as_callback)
        callback.scale("2", 2)  # an existing Deployment: patch
        with pytest.raises(RouterError, match="403"):
            callback.apply("3", "img:3", 1)  # a new one: patch, then create, refused
        assert ("deployments", "ml", "digits-v3") not in api.objects
    finally:
        api.stop()
    assert str(failed.value).endswith(
        '; pod digits-v2-abc: container model-server ImagePullBackOff: Back-off pulling image "img:2"'
    )
    assert "not read" not in str(failed.value)
    statuses = {(r["method"], r["path"]): r["status"] for r in api.requests if r["user"] == WORKER_USER}
    assert statuses[("GET", "/api/v1/namespaces/ml/pods")] == 200
    assert statuses[("DELETE", "/api/v1/namespaces/ml/pods/digits-v2-abc")] == 403
