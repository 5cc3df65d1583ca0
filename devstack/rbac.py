"""Kubernetes RBAC, evaluated here: what a request is to the authorizer, and whether Roles allow it.

``attributes(request)`` turns a call the fake API server recorded (``FakeKubeAPI.requests``) into
the request attributes the API server's authorizer sees (as ``RequestInfo`` derives them from
the method and path): verb, API group, resource, subresource, namespace, name. ``allowed(rules,
attrs)`` is RBAC's rule match (verbs, apiGroups, resources with ``resource/subresource`` and
``*``, resourceNames). ``unused(rules, calls)`` lists each grant (group, resource, verb) that no
call needed: what a least-privilege Role must not hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[a-z0-9.-]+)/[a-z0-9]+)(?:/namespaces/(?P<namespace>[a-z0-9-]+))?"
    r"/(?P<resource>[a-z0-9]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[a-z]+))?$"
)


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
    """namespace -> the rules of the Roles that RoleBindings among ``objects`` give ``user`` (a
    ServiceAccount's user name, ``system:serviceaccount:<namespace>:<name>``)."""
    roles = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects if o["kind"] == "Role"}
    out: dict[str, list[dict[str, Any]]] = {}
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        namespace = binding["metadata"]["namespace"]
        subjects = {
            f"system:serviceaccount:{s.get('namespace', namespace)}:{s['name']}"
            for s in binding.get("subjects", [])
            if s["kind"] == "ServiceAccount"
        }
        ref = binding["roleRef"]
        if user in subjects and ref["kind"] == "Role":
            out.setdefault(namespace, []).extend(roles[(namespace, ref["name"])]["rules"])
    return out


def _only(grant: tuple[str, str, str]) -> dict[str, Any]:
    group, resource, verb = grant
    return {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
