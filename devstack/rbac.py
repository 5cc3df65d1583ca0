"""Kubernetes RBAC, evaluated here: what a request is to the authorizer, and whether Roles allow it.

``attributes(request)`` turns a call the fake API server recorded (``FakeKubeAPI.requests``) into
the request attributes the API server's authorizer sees (as ``RequestInfo`` derives them from
the method and path): verb, API group, resource, subresource, namespace, name. ``checks(request)``
is every decision the authorizer is asked for one call: that one, and for a server-side apply
that creates its object a second one, verb ``create`` (below). ``allowed(rules, attrs)`` is RBAC's
rule match (verbs, apiGroups, resources with ``resource/subresource`` and ``*``, resourceNames).
``unused(rules, calls)`` lists each grant (group, resource, verb) that no call needed: what a
least-privilege Role must not hold.

An apply that creates, as the real API server authorizes it (k8s.io/apiserver,
pkg/endpoints/handlers/patch.go and pkg/registry/generic/registry/store.go): every PATCH is first
authorized as ``patch`` (the authorization filter, from ``RequestInfo``). Only the apply patch
types (``application/apply-patch+yaml``, and ``+cbor`` where that is served; the content type
up to its first ``;``) may create: they set ``forceAllowCreate``, while a JSON, merge or
strategic merge patch of a missing object is a 404. When the store finds no object to patch,
the body (decoded, defaulted and validated for create) is checked by ``createValidation``, which
asks the authorizer, once per request, for the same request with verb ``create`` (same group,
resource, subresource, namespace and name) and answers 403 unless it is allowed. So an apply
needs ``patch`` always, and ``create`` as well exactly when the object did not exist; the fake API
server records which it was (``existed``, set where it takes the create path).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[a-z0-9.-]+)/[a-z0-9]+)(?:/namespaces/(?P<namespace>[a-z0-9-]+))?"
    r"/(?P<resource>[a-z0-9]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?$"
)
# The patch types that create a missing object (the API server's ApplyYAMLPatchType and
# ApplyCBORPatchType, for which its patcher sets forceAllowCreate).
APPLY_PATCH_TYPES = ("application/apply-patch+yaml", "application/apply-patch+cbor")


@dataclass(frozen=True)
class Attributes:
    verb: str
    group: str
    resource: str  # with its subresource: "pods/log"
    namespace: str
    name: str

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.verb} {self.group or 'core'}/{self.resource}{where}"


def attributes(request: dict[str, Any]) -> Attributes:
    """The authorizer's view of one recorded call (``method``, ``path``, ``query``)."""
    m = PATH.match(request["path"])
    if m is None:
        raise ValueError(f"not a resource path: {request['path']}")
    name = m.group("name") or ""
    watch = request.get("query", {}).get("watch", ["false"])[0] in ("1", "true", "True")
    verb = {
        "GET": ("watch" if watch else "get") if name else ("watch" if watch else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }[request["method"]]
    resource = m.group("resource") + (f"/{m.group('sub')}" if m.group("sub") else "")
    return Attributes(verb, m.group("group") or "", resource, m.group("namespace") or "", name)


def creates(request: dict[str, Any]) -> bool:
    """Whether the call is a server-side apply that found no object, so created it (or tried to:
    the create check comes before admission, quota included): the recorded ``existed`` is False.
    A call the server refused before it looked for the object has no ``existed``."""
    content_type = request.get("content_type", "").partition(";")[0]  # as the server cuts "; charset=..."
    return request["method"] == "PATCH" and content_type in APPLY_PATCH_TYPES and request.get("existed") is False


def checks(request: dict[str, Any]) -> list[Attributes]:
    """Each authorization decision the API server makes for one recorded call, in its order: the
    call's own attributes, then, for an apply that creates its object, the same with verb
    ``create``. The call is allowed when every one of them is."""
    attrs = attributes(request)
    return [attrs, replace(attrs, verb="create")] if creates(request) else [attrs]


def _grants(rule: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for g in rule.get("apiGroups", []) for r in rule.get("resources", []) for v in rule["verbs"]}


def allowed(rules: list[dict[str, Any]], attrs: Attributes) -> bool:
    """Whether any rule allows the request (RBAC's match; nonResourceURLs are not requests here)."""
    for rule in rules:
        names = rule.get("resourceNames")
        for group, resource, verb in _grants(rule):
            if (
                group in ("*", attrs.group)
                and resource in ("*", attrs.resource, f"*/{attrs.resource.partition('/')[2]}")
                and verb in ("*", attrs.verb)
                and (not names or attrs.name in names)
            ):
                return True
    return False


def unused(rules: list[dict[str, Any]], calls: list[Attributes]) -> list[tuple[str, str, str]]:
    """Each (apiGroup, resource, verb) the rules grant that none of the calls needed."""
    return sorted(
        grant
        for rule in rules
        for grant in _grants(rule)
        if not any(allowed([{**rule, **_only(grant)}], call) for call in calls)
    )


def bound_rules(objects: list[dict[str, Any]], user: str) -> dict[str, list[dict[str, Any]]]:
    """namespace -> the rules that the bindings among ``objects`` give ``user`` (a ServiceAccount's
    user name, ``system:serviceaccount:<namespace>:<name>``), by name or through a group the API
    server puts it in (``system:serviceaccounts``, ``system:serviceaccounts:<namespace>``,
    ``system:authenticated``): a RoleBinding's Role or ClusterRole in its namespace, a
    ClusterRoleBinding's ClusterRole under ``"*"`` (every namespace). ValueError for a binding of
    the user whose role is not among ``objects``: what it grants cannot be known here."""
    account_namespace = user.split(":")[2] if user.startswith("system:serviceaccount:") else ""
    groups = {"system:authenticated", "system:serviceaccounts", f"system:serviceaccounts:{account_namespace}"}
    roles = {
        (o["kind"], o["metadata"].get("namespace", "") if o["kind"] == "Role" else "", o["metadata"]["name"]): o
        for o in objects
        if o["kind"] in ("Role", "ClusterRole")
    }
    out: dict[str, list[dict[str, Any]]] = {}
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        namespace = binding["metadata"].get("namespace", "") if binding["kind"] == "RoleBinding" else "*"

        def names(subject: dict[str, Any], namespace: str = namespace) -> bool:
            if subject["kind"] == "ServiceAccount":
                return f"system:serviceaccount:{subject.get('namespace', namespace)}:{subject['name']}" == user
            return subject["name"] == user if subject["kind"] == "User" else subject["name"] in groups

        if not any(names(s) for s in binding.get("subjects") or []):
            continue
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], namespace if ref["kind"] == "Role" else "", ref["name"]))
        if role is None:
            raise ValueError(
                f"{binding['kind']} {binding['metadata']['name']} binds {ref['kind']} {ref['name']}, which is "
                "not among the objects: what it grants cannot be checked"
            )
        out.setdefault(namespace, []).extend(role.get("rules") or [])
    return out


def _only(grant: tuple[str, str, str]) -> dict[str, Any]:
    group, resource, verb = grant
    return {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
