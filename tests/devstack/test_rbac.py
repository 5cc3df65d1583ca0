"""RBAC as the API server evaluates it: the request attributes of a recorded call, the rule match,
the grants no call needed, and the Roles deploy/ binds to the Airflow workers."""

from __future__ import annotations

import pytest

from devstack import manifests, rbac
from devstack.cluster.kube import WORKER_USER


def call(method: str, path: str, **query: str) -> rbac.Attributes:
    return rbac.attributes({"method": method, "path": path, "query": {k: [v] for k, v in query.items()}})


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
    assert set(rules) == {"ml", "ml-builds"}
    assert rbac.allowed(rules["ml"], call("PATCH", "/apis/networking.istio.io/v1/namespaces/ml/virtualservices/digits"))
    assert not rbac.allowed(rules["ml"], call("GET", "/api/v1/namespaces/ml/secrets/model-server-admin"))
    assert not rbac.allowed(rules["ml-builds"], call("PATCH", "/apis/apps/v1/namespaces/ml-builds/deployments/x"))
    assert rbac.bound_rules(manifests.render("production"), "system:serviceaccount:airflow:someone-else") == {}
