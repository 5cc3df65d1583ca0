"""A local HTTP server speaking the Kubernetes API: the one-machine cluster's API server.

No API server can run on these machines, so this one checks what the real one checks for the
calls the product makes (the IstioRouter, the version Deployments, the cncf provider's
KubernetesPodOperator, a ``kubectl get``): paths and verbs, the server-side-apply content type
and field manager, that the body names the object of the path, Istio's CRD schema and the
required fields of Deployments, Pods, Secrets and Services (422 Invalid), optimistic concurrency
on ``metadata.resourceVersion`` (409 Conflict), label and field selectors on lists, bounded
bodies (413). Answers are Kubernetes ``Status`` objects, as the real server's.

Resources: Istio VirtualService and DestinationRule and apps/v1 Deployment (apply, get, list;
a Deployment's ``scale`` subresource got and patched, whose writer owns ``spec.replicas``; each
field's of these and of a PodDisruptionBudget and an autoscaling/v2 HorizontalPodAutoscaler
(apply, get, list) managers recorded as server-side apply records them: an apply that changes a
field another manager applied or scaled is a 409 naming that manager and the field unless
forced, and a field another manager owns outlives an apply that leaves it out), core/v1 Secret
and Service (apply, get, list), Pod (create, get, list, patch of labels and annotations, delete, log with
``follow``), Event (list and watch: always empty, nothing records events).

Without a kubelet (``FakeKubeAPI(kubelet=False)``, the unit tests) a Deployment reports its
pods ready as soon as it is applied and a deleted Pod is gone at once. With one
(``kubelet=True`` and a ``devstack.cluster.pods.PodRunner`` attached) the runner writes the
status of Deployments and Pods, finishes a Pod's deletion once its process is stopped, and
serves container logs (``log_source``); ``metadata.generation`` counts spec changes, as the
real server's does, so ``status.observedGeneration`` says whether the status is current.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

from devstack import rbac

# The Airflow workers' ServiceAccount (deploy/base/rbac.yaml binds the rollout's Roles to it).
WORKER_USER = "system:serviceaccount:airflow:airflow-worker"
MAX_BODY_BYTES = 3 * 1024 * 1024  # the real API server's request size limit
MAX_OBJECTS = 5000  # all kinds together: a runaway creator meets a quota, not an out-of-memory
MAX_SELECTOR_TERMS = 64
# How often the server's loop looks whether it is stopped: stop() waits for its next look
# (socketserver's 0.5 s made each stop, each test's fixture's end, half a second).
POLL_INTERVAL_S = 0.01
MAX_SECRET_BYTES = 1024 * 1024  # the real server's limit on a Secret's data
PATH_RE = re.compile(
    r"^/(?:api/(v1)|apis/([a-z0-9.-]{1,253}/v[1-9](?:(?:alpha|beta)[1-9])?))(?:/namespaces/([a-z0-9-]{1,63}))?/([a-z]{1,63})"
    r"(?:/([a-z0-9.-]{1,253}))?(?:/(log|scale))?$"
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
SET_TERM = re.compile(r"^([^\s!=(),]+)\s+(in|notin)\s+\(([^()]*)\)$")
GO_BOOLS = {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}


def now_rfc3339(nanos: bool = False) -> str:
    """The time as the API server writes it (RFC 3339; with nanoseconds in log timestamps)."""
    t = time.time_ns()
    seconds = datetime.fromtimestamp(t // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{seconds}.{t % 1_000_000_000:09d}Z" if nanos else f"{seconds}Z"


def parse_log_time(stamp: str) -> float | None:
    """Seconds since the epoch of a log line's RFC 3339 nanosecond timestamp (None when not one)."""
    try:
        whole, _, frac = stamp.rstrip("Z").partition(".")
        return datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp() + float(f"0.{frac or 0}")
    except ValueError:
        return None


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        **({"details": details} if details is not None else {}),
        "code": code,
    }


class APIError(Exception):
    """An answer other than success: its code, Kubernetes reason and message (a Status body),
    and its ``details`` where the real server gives some (an apply's conflicts: ``causes``)."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details


class Dropped(Exception):
    """A request the server reads and never answers (``FakeKubeAPI.drop``)."""


def _split_terms(text: str) -> list[str]:
    """Terms of a selector: commas outside parentheses separate them (one pass)."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            terms.append(text[start:i].strip())
            start = i + 1
    terms.append(text[start:].strip())
    return [t for t in terms if t]


@dataclass(frozen=True)
class Requirement:
    """One term of a selector: ``op`` is ``in`` (``=``, ``==``, ``in``), ``notin`` (``!=``,
    ``notin``), ``exists`` (``key``) or ``!exists`` (``!key``)."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        return (labels.get(self.key) in self.values) == (self.op == "in")


def parse_label_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """A label selector's predicate (``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (b,c)``,
    ``a notin (b)``); ValueError names the term the real server would refuse."""
    if len(text) > 4096:
        raise ValueError("label selector longer than 4096 characters")
    terms = _split_terms(text)
    if len(terms) > MAX_SELECTOR_TERMS:
        raise ValueError(f"label selector has {len(terms)} terms, at most {MAX_SELECTOR_TERMS}")
    requirements = []
    for term in terms:
        if m := SET_TERM.match(term):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            if not values or any(not LABEL_VALUE.match(v) for v in values):
                raise ValueError(f"unable to parse requirement: {term!r}: values must be valid label values")
            req = Requirement(m.group(1), m.group(2), values)
        elif term.startswith("!"):
            req = Requirement(term[1:].strip(), "!exists")
        elif "!=" in term:
            key, value = term.split("!=", 1)
            req = Requirement(key.strip(), "notin", frozenset([value.strip()]))
        elif "=" in term:
            key, value = term.replace("==", "=", 1).split("=", 1)
            req = Requirement(key.strip(), "in", frozenset([value.strip()]))
        else:
            req = Requirement(term, "exists")
        if len(req.key) > 317 or not LABEL_NAME.match(req.key):
            raise ValueError(f"unable to parse requirement: {term!r}: invalid label key {req.key!r}")
        if any(not LABEL_VALUE.match(v) for v in req.values):
            raise ValueError(f"unable to parse requirement: {term!r}: invalid label value")
        requirements.append(req)
    return lambda labels: all(r.matches(labels) for r in requirements)


def _dotted(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def parse_field_selector(text: str, plural: str) -> Callable[[dict[str, Any]], bool]:
    """A field selector's predicate (``f=v``, ``f==v``, ``f!=v``) over the fields the real server
    indexes for the kind; ValueError for any other field ("field label not supported")."""
    allowed = ("metadata.name", "metadata.namespace", *FIELDS.get(plural, ()))
    terms = _split_terms(text)
    if len(terms) > MAX_SELECTOR_TERMS:
        raise ValueError(f"field selector has {len(terms)} terms, at most {MAX_SELECTOR_TERMS}")
    requirements = []
    for term in terms:
        op = "notin" if "!=" in term else "in"
        field, sep, value = term.replace("!=", "=", 1).replace("==", "=", 1).partition("=")
        if not sep:
            raise ValueError(f"invalid selector: {term!r}")
        if field.strip() not in allowed:
            raise ValueError(f"field label not supported: {field.strip()}")
        requirements.append(Requirement(field.strip(), op, frozenset([value.strip()])))
    return lambda obj: all(r.matches({r.key: _dotted(obj, r.key)}) for r in requirements)


def invalid_labels(meta: dict[str, Any]) -> str | None:
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        return "metadata.labels: Invalid value: must be a map of strings"
    for key, value in labels.items():
        if not isinstance(value, str) or len(key) > 317 or not LABEL_NAME.match(key):
            return f"metadata.labels: Invalid value: {key!r}: a label key must be a qualified name"
        if len(value) > 63 or not LABEL_VALUE.match(value):
            return f"metadata.labels: Invalid value: {value!r}: a label value must be 63 characters or less, alphanumeric, '-', '_' or '.'"
    return None


def invalid_pod_spec(spec: dict[str, Any], where: str) -> str | None:
    """What the API server's validation says of a pod spec (the fields these pods set)."""
    containers = spec.get("containers") or []
    if not isinstance(containers, list) or not containers:
        return f"{where}.containers: Required value"
    names = set()
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name") or not c.get("image"):
            return f"{where}.containers[{i}]: Required value: a name and an image each"
        if not DNS_LABEL.match(str(c["name"])):
            return f"{where}.containers[{i}].name: Invalid value: {c['name']!r}: must be a DNS-1123 label"
        if c["name"] in names:
            return f"{where}.containers[{i}].name: Duplicate value: {c['name']!r}"
        names.add(c["name"])
        for field in ("args", "command"):
            if not isinstance(c.get(field, []), list) or not all(isinstance(a, str) for a in c.get(field, [])):
                return f"{where}.containers[{i}].{field}: Invalid value: a list of strings"
    if spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
        return f"{where}.restartPolicy: Unsupported value: {spec['restartPolicy']!r}"
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not isinstance(grace, int) or grace < 0:
        return f"{where}.terminationGracePeriodSeconds: Invalid value: must be a non-negative integer"
    return None


def invalid_deployment(body: dict[str, Any]) -> str | None:
    """What the API server's validation says of a Deployment (the fields these calls set)."""
    spec = body.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    template_meta = (spec.get("template") or {}).get("metadata") or {}
    labels = template_meta.get("labels") or {}
    if not selector:
        return "spec.selector: Required value"
    if any(labels.get(k) != v for k, v in selector.items()):
        return "spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`"
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 2**31 - 1:
        return "spec.replicas: Invalid value: must be greater than or equal to 0"
    problem = invalid_labels(template_meta)
    if problem:
        return f"spec.template.{problem}"
    return invalid_pod_spec((spec.get("template") or {}).get("spec") or {}, "spec.template.spec")


def invalid_secret(body: dict[str, Any]) -> str | None:
    data = body.get("data") or {}
    string_data = body.get("stringData") or {}
    if not isinstance(data, dict) or not isinstance(string_data, dict):
        return "data: Invalid value: must be a map of strings"
    size = 0
    for key, value in [*data.items(), *string_data.items()]:
        if not SECRET_KEY.match(str(key)):
            return f"data[{key}]: Invalid value: {key!r}: a valid config key must consist of alphanumeric characters, '-', '_' or '.'"
        if not isinstance(value, str):
            return f"data[{key}]: Invalid value: must be a string"
        size += len(value)
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return f"data[{key}]: Invalid value: illegal base64 data"
    if size > MAX_SECRET_BYTES:
        return f"data: Too long: must have at most {MAX_SECRET_BYTES} bytes"
    return None


def invalid_service(body: dict[str, Any]) -> str | None:
    ports = (body.get("spec") or {}).get("ports")
    if not isinstance(ports, list) or not ports:
        return "spec.ports: Required value"
    for i, p in enumerate(ports):
        port = p.get("port") if isinstance(p, dict) else None
        if not isinstance(port, int) or not 1 <= port <= 65535:
            return f"spec.ports[{i}].port: Invalid value: {port!r}: must be between 1 and 65535, inclusive"
    return None


def invalid_hpa(body: dict[str, Any]) -> str | None:
    """What the API server's validation says of an autoscaling/v2 HorizontalPodAutoscaler: its
    schema (``invalid_manifest``), then the bounds and target it checks besides."""
    problem = invalid_manifest(body)
    if problem:
        return problem
    spec = body.get("spec") or {}
    target = spec.get("scaleTargetRef") or {}
    for field in ("kind", "name"):
        if not target.get(field):
            return f"spec.scaleTargetRef.{field}: Required value"
    low, high = spec.get("minReplicas", 1), spec.get("maxReplicas")
    if not isinstance(low, int) or low < 1:
        return f"spec.minReplicas: Invalid value: {low!r}: must be greater than or equal to 1"
    if not isinstance(high, int) or high < low:
        return f"spec.maxReplicas: Invalid value: {high!r}: must be greater than or equal to `minReplicas`"
    return None


def invalid_manifest(body: dict[str, Any]) -> str | None:
    """What ``devstack.manifests`` finds wrong with an object (its kind's schema: Kubernetes', or
    the v1 ``openAPIV3Schema`` of Istio's own CRD), None if nothing."""
    from devstack import manifests

    found = manifests.problems([body], admitted=False)  # (what the real one admits, it admits)
    return found[0].partition(": ")[2] if found else None


def invalid_pod(body: dict[str, Any]) -> str | None:
    return invalid_pod_spec(body.get("spec") or {}, "spec")


@dataclass(frozen=True)
class Resource:
    """A resource the server serves; ``validate`` says what its validation finds wrong with a
    body that is applied or created (None: nothing), and every resource written has one."""

    api_version: str
    kind: str
    validate: Callable[[dict[str, Any]], str | None] | None = None
    apply: bool = False  # server-side apply (PATCH application/apply-patch+yaml)
    create: bool = False  # POST to the collection
    cluster_scoped: bool = False  # no namespace (stored under "")

    def __post_init__(self) -> None:
        if (self.apply or self.create) and self.validate is None:
            raise ValueError(f"{self.kind}: a resource that is written needs a validator")

    def invalid(self, body: dict[str, Any]) -> str | None:
        return self.validate(body) if self.validate is not None else None


RESOURCES = {
    "virtualservices": Resource("networking.istio.io/v1", "VirtualService", invalid_manifest, apply=True),
    "destinationrules": Resource("networking.istio.io/v1", "DestinationRule", invalid_manifest, apply=True),
    "envoyfilters": Resource("networking.istio.io/v1alpha3", "EnvoyFilter", invalid_manifest, apply=True),
    "deployments": Resource("apps/v1", "Deployment", invalid_deployment, apply=True),
    "secrets": Resource("v1", "Secret", invalid_secret, apply=True),
    "services": Resource("v1", "Service", invalid_service, apply=True),
    "pods": Resource("v1", "Pod", invalid_pod, create=True),
    "events": Resource("v1", "Event"),
    "leases": Resource("coordination.k8s.io/v1", "Lease"),  # the per-model rollout lock: lease_call
    # The rest of what deploy/ applies: stored as applied, validated as the real server would
    # (devstack.manifests: Kubernetes' schema, Istio's CRD, the prometheus-operator's types).
    "namespaces": Resource("v1", "Namespace", invalid_manifest, apply=True, cluster_scoped=True),
    "serviceaccounts": Resource("v1", "ServiceAccount", invalid_manifest, apply=True),
    "poddisruptionbudgets": Resource("policy/v1", "PodDisruptionBudget", invalid_manifest, apply=True),
    "roles": Resource("rbac.authorization.k8s.io/v1", "Role", invalid_manifest, apply=True),
    "rolebindings": Resource("rbac.authorization.k8s.io/v1", "RoleBinding", invalid_manifest, apply=True),
    "authorizationpolicies": Resource("security.istio.io/v1", "AuthorizationPolicy", invalid_manifest, apply=True),
    "podmonitors": Resource("monitoring.coreos.com/v1", "PodMonitor", invalid_manifest, apply=True),
    # With build.autoscaling: an HPA per version (applied), and a Deployment's scale subresource.
    "horizontalpodautoscalers": Resource("autoscaling/v2", "HorizontalPodAutoscaler", invalid_hpa, apply=True),
}
# The kinds whose fields' managers are recorded (``_fields``): the Deployments and what the rollout
# applies beside them with ``force`` (the mesh's objects, a version's PodDisruptionBudget).
TRACKED = frozenset(
    {"deployments", "virtualservices", "destinationrules", "poddisruptionbudgets", "horizontalpodautoscalers"}
)
# Those a JSON merge patch changes (``FakeKubeAPI.merge_patch``: an operator's ``kubectl patch --type=merge``).
MERGE_PATCHED = frozenset({"poddisruptionbudgets", "horizontalpodautoscalers"})
SUBRESOURCES = {"log": "pods", "scale": "deployments"}  # a subresource and the resource that has it
# What the real server (or a proxy before it: 502, 504) answers when it cannot serve a request:
# (reason, message) by status.
REFUSALS = {
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: etcdserver: request timed out"),
    502: ("BadGateway", "the proxy before the API server got no valid answer from it"),  # (a load balancer's)
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
    504: ("Timeout", "Timeout: request did not complete within requested timeout - context deadline exceeded"),
}
FIELDS = {"pods": ("status.phase", "spec.nodeName"), "events": ("involvedObject.name", "involvedObject.kind")}


def _qualified(plural: str) -> str:
    """How the server names a resource in messages (``deployments.apps``, ``pods``)."""
    return f"{plural}{_group_suffix(plural)}"


def _group_suffix(plural: str) -> str:
    group = RESOURCES[plural].api_version.rpartition("/")[0]
    return f".{group}" if group else ""


LogSource = Callable[[str, str, str, bool], "Path | None"]


class FakeKubeAPI:
    """The API server on 127.0.0.1 (a free port): ``start()``, ``url``, ``stop()``.

    ``objects`` maps ``(plural, namespace, name)`` to the stored object and ``requests`` logs
    every call (method, path, query, content type, status, ``user``: whose bearer token it
    carried, as ``kubeconfig`` issues them, None without one; and for an apply that reached the
    store, ``existed``: whether it patched an object or created one), for tests to assert on
    writes and on what each user did (``devstack.rbac``); with ``enforce_rbac`` each call with a
    user is also refused (403) where the Roles stored here do not allow it (``authorize``). The
    pod runner uses the Python side (``get``, ``list``, ``create``, ``set_status``, ``remove``)
    under the same lock as the HTTP handlers.
    """

    def __init__(self, kubelet: bool = False, enforce_rbac: bool = False) -> None:
        self.kubelet = kubelet
        # Each call with a user authorized by the Roles and RoleBindings stored (``authorize``).
        self.enforce_rbac = enforce_rbac
        self.log_source: LogSource | None = None  # set by the pod runner: (ns, pod, container, previous) -> file
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.users: dict[str, str] = {}  # bearer token -> user name (kubeconfig issues them)
        self.version = 100
        # The next ``throttle`` requests (of ``throttled_methods``) are refused as API Priority
        # and Fairness refuses one it has no seat for (a server under load): 429, Retry-After 1;
        # or answered ``throttle_status`` (``REFUSALS``: a 500 of etcd timing out, a proxy's 502 or 504, a 503; None: their
        # connection closed without an answer).
        self.throttle = 0
        self.throttle_status: int | None = 429
        self.retry_after = "1"  # what a 429 says to wait (a proxy before the API server may say more)
        self.throttled_methods = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
        self.throttled_path: str | None = None  # only requests whose path ends with it (None: any)
        # A throttled request served first, then answered ``throttle_status`` (a 500 of etcd timing out
        # after the commit, a proxy's error): the client cannot tell it from one not served.
        self.throttle_served = False
        # The next ``drop`` requests are read and their connection closed without an answer (a
        # load balancer or proxy resetting it, the server restarting): no status at all.
        self.drop = 0
        # Run once, on the next write (PATCH, POST, PUT, DELETE) as it arrives, before it is served:
        # another writer's change landing between a client's read and its write.
        self.before_write: Callable[[], None] | None = None
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeKubeAPI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()  # ends followed log streams
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, namespace: str = "default", user: str = WORKER_USER) -> dict[str, Any]:
        """A kubeconfig whose cluster is this server (for a ``kubernetes_default`` connection),
        with a token of its own for ``user`` (by default the Airflow workers' ServiceAccount)."""
        token = next((t for t, u in self.users.items() if u == user), None) or secrets.token_urlsafe(16)
        self.users[token] = user
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "one-machine",
            "clusters": [{"name": "one-machine", "cluster": {"server": self.url}}],
            "contexts": [
                {"name": "one-machine", "context": {"cluster": "one-machine", "user": "dev", "namespace": namespace}}
            ],
            "users": [{"name": "dev", "user": {"token": token}}],
        }

    def authorize(self, record: dict[str, Any], verb: str | None = None) -> None:
        """With ``enforce_rbac``: APIError 403, worded as the API server's, unless the Roles and
        RoleBindings stored here allow the recorded call to its user (``devstack.rbac``; ``verb``:
        the same call asked for another verb, the ``create`` of an apply that finds no object).
        A call with no user (no token: a test's own client, as the cluster's admin) is not checked."""
        user = record.get("user")
        if not self.enforce_rbac or user is None:
            return
        attrs = rbac.attributes(record)
        attrs = replace(attrs, verb=verb) if verb else attrs
        with self.lock:
            objects = [o for (p, _, _), o in self.objects.items() if p in ("roles", "rolebindings")]
        rules = rbac.bound_rules(objects, user)
        if rbac.allowed([*rules.get(attrs.namespace, []), *rules.get("*", [])], attrs):
            return
        plural, _, _ = attrs.resource.partition("/")
        named = f' "{attrs.name}"' if attrs.name else ""
        where = f' in the namespace "{attrs.namespace}"' if attrs.namespace else " at the cluster scope"
        raise APIError(
            403,
            "Forbidden",
            f'{plural}{named} is forbidden: User "{user}" cannot {attrs.verb} resource "{attrs.resource}" '
            f'in API group "{attrs.group}"{where}',
        )

    def _bump(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)

    def touch(self, plural: str, namespace: str, name: str, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Another writer changes the object (bumps resourceVersion)."""
        with self.lock:
            obj = self.objects[(plural, namespace, name)]
            mutate(obj)
            self._bump(obj)

    def writes(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] in ("PATCH", "POST", "DELETE")]

    # -- the Python side, for the pod runner (the controllers and the kubelet) ---------------

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def list(
        self, plural: str, namespace: str | None = None, labels: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        """Objects of a kind (in a namespace, or all), filtered by label and field selectors."""
        match_labels = parse_label_selector(labels) if labels else None
        match_fields = parse_field_selector(fields, plural) if fields else None
        with self.lock:
            found = [
                copy.deepcopy(obj)
                for (p, ns, _), obj in sorted(self.objects.items())
                if p == plural and namespace in (None, ns)
            ]
        return [
            obj
            for obj in found
            if (match_labels is None or match_labels(obj["metadata"].get("labels") or {}))
            and (match_fields is None or match_fields(obj))
        ]

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create an object as POST does (validated; ``generateName`` honoured); APIError if refused."""
        resource = RESOURCES[plural]
        if not resource.create:
            raise APIError(405, "MethodNotAllowed", f"the server does not allow this method on {plural}")
        meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
        if body.get("apiVersion") != resource.api_version or body.get("kind") != resource.kind or meta is None:
            raise APIError(400, "BadRequest", f"the body is not a {resource.api_version} {resource.kind}")
        if meta.get("namespace", namespace) != namespace:
            raise APIError(400, "BadRequest", "the namespace of the object does not match the namespace of the request")
        with self.lock:
            name = meta.get("name") or ""
            if not name and meta.get("generateName"):
                name = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
            if not DNS_SUBDOMAIN.match(name):
                raise APIError(
                    422, "Invalid", f'{resource.kind} "{name}" is invalid: metadata.name: Invalid value: {name!r}'
                )
            problem = invalid_labels(meta) or resource.invalid(body)
            if problem:
                raise APIError(422, "Invalid", f'{resource.kind} "{name}" is invalid: {problem}')
            if (plural, namespace, name) in self.objects:
                raise APIError(409, "AlreadyExists", f'{_qualified(plural)} "{name}" already exists')
            if len(self.objects) >= MAX_OBJECTS:
                raise APIError(403, "Forbidden", f"exceeded quota: at most {MAX_OBJECTS} objects in this cluster")
            obj = copy.deepcopy(body)
            obj["metadata"] = {
                **{k: v for k, v in meta.items() if k != "generateName"},
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now_rfc3339(),
            }
            obj["status"] = {"phase": "Pending"}  # until a kubelet takes it
            self._bump(obj)
            self.objects[(plural, namespace, name)] = obj
            return copy.deepcopy(obj)

    def set_status(self, plural: str, namespace: str, name: str, new: dict[str, Any]) -> bool:
        """Write an object's status (the controllers' and kubelet's write); False when it is gone.
        An unchanged status is not written (no resourceVersion churn)."""
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            if obj is None:
                return False
            if obj.get("status") != new:
                obj["status"] = copy.deepcopy(new)
                self._bump(obj)
            return True

    def remove(self, plural: str, namespace: str, name: str) -> None:
        """The object is gone (a kubelet confirms a pod's deletion once its process stopped)."""
        with self.lock:
            self.objects.pop((plural, namespace, name), None)

    def delete(
        self, plural: str, namespace: str, name: str, preconditions: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """DELETE: a pod run by a kubelet is marked (``deletionTimestamp``) for the kubelet to stop;
        an object with ``metadata.finalizers`` is marked too (a new resourceVersion), as the real
        server marks it, and stays until its finalizers are gone (``remove``: their controllers
        done); anything else is gone at once. The object is returned, as marked or as it was;
        APIError 404 when absent, 409 Conflict when it is not the one DeleteOptions'
        ``preconditions`` name (its ``uid``, its ``resourceVersion``: changed since it was read),
        as the real server answers."""
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            if obj is None:
                raise APIError(404, "NotFound", f'{_qualified(plural)} "{name}" not found')
            meta, wanted = obj["metadata"], preconditions or {}
            failed = next(
                (
                    f"{label} in precondition: {wanted[field]}, {label} in object meta: {meta.get(field)}"
                    for field, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion"))
                    if wanted.get(field) is not None and wanted[field] != meta.get(field)
                ),
                None,
            )
            if failed:
                raise APIError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {_qualified(plural)} "{name}": StorageError: invalid object, '
                    f"Code: 4, Key: /registry/{plural}/{namespace}/{name}, AdditionalErrorMsg: Precondition failed: {failed}",
                )
            if plural == "pods" and self.kubelet:
                if "deletionTimestamp" not in obj["metadata"]:
                    obj["metadata"]["deletionTimestamp"] = now_rfc3339()
                    obj["metadata"]["deletionGracePeriodSeconds"] = obj["spec"].get("terminationGracePeriodSeconds", 30)
                    self._bump(obj)
            elif obj["metadata"].get("finalizers"):
                if "deletionTimestamp" not in obj["metadata"]:
                    obj["metadata"]["deletionTimestamp"] = now_rfc3339()
                    obj["metadata"]["deletionGracePeriodSeconds"] = 0
                    self._bump(obj)
            else:
                del self.objects[(plural, namespace, name)]
            return copy.deepcopy(obj)

    def apply(
        self,
        plural: str,
        namespace: str,
        name: str,
        body: dict[str, Any],
        manager: str,
        record: dict[str, Any] | None = None,
        force: bool = False,
        dry_run: bool = False,
    ) -> tuple[int, Any]:
        """Server-side apply of a whole object by one field manager: (201 or 200, the object);
        ``dry_run`` (``dryRun=All``): the object as it would be, checked the same, nothing stored.
        ``record`` (the call's entry in ``requests``) gets ``existed``: whether there was an
        object to patch, set where the real server asks its authorizer for ``create`` when there
        was none (after the body's validation, before its quota: ``devstack.rbac.checks``).
        A Deployment's fields are owned as the real server owns them (``_fields``): a 409
        Conflict for an apply that changes one, not ``force``d, while another manager owns it
        (another applier, an HPA or ``kubectl scale``: a write of the scale subresource)."""
        resource = RESOURCES[plural]
        if not resource.apply:
            raise APIError(405, "MethodNotAllowed", f"apply is not supported for {plural} here")
        meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
        if body.get("apiVersion") != resource.api_version or body.get("kind") != resource.kind or meta is None:
            raise APIError(400, "BadRequest", "apiVersion/kind do not match the path")
        if meta.get("name") != name or meta.get("namespace", namespace) != namespace:
            raise APIError(400, "BadRequest", "metadata.name/namespace do not match the path")
        if resource.cluster_scoped:
            body = {**body, "metadata": {k: v for k, v in meta.items() if k != "namespace"}}
        problem = invalid_labels(meta) or resource.invalid(body)
        if problem:
            raise APIError(422, "Invalid", f'{resource.kind}{_group_suffix(plural)} "{name}" is invalid: {problem}')
        with self.lock:
            live = self.objects.get((plural, namespace, name))
            wanted = meta.get("resourceVersion")
            if wanted is not None and (live is None or live["metadata"]["resourceVersion"] != wanted):
                raise APIError(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                )
            if record is not None:
                record["existed"] = live is not None
                if live is None:
                    self.authorize(record, "create")
            if live is None and len(self.objects) >= MAX_OBJECTS:
                raise APIError(403, "Forbidden", f"exceeded quota: at most {MAX_OBJECTS} objects in this cluster")
            obj = _applied(live, body, name, namespace)
            managed = [{"manager": manager, "operation": "Apply", "apiVersion": body["apiVersion"]}]
            if plural in TRACKED:
                managed = _fields(live, obj, body, manager, force)
            if plural == "deployments":
                obj["metadata"]["generation"] = live["metadata"]["generation"] if live else 1
                if live is not None and live.get("spec") != obj["spec"]:
                    obj["metadata"]["generation"] += 1
                if not self.kubelet:  # what the controllers would report once the pods run
                    obj["status"] = _ready_status(obj)
            obj["metadata"]["managedFields"] = managed
            if dry_run:
                return (201 if live is None else 200), copy.deepcopy(obj)
            self._bump(obj)
            self.objects[(plural, namespace, name)] = obj
            return (201 if live is None else 200), copy.deepcopy(obj)

    def scale(self, namespace: str, name: str, replicas: int | None = None, manager: str = "") -> dict[str, Any]:
        """A Deployment's ``autoscaling/v1`` Scale (GET ``.../deployments/<name>/scale``); with
        ``replicas``, that count written first as a write of the subresource does (an HPA's, a
        ``kubectl scale``): ``manager`` owns ``spec.replicas`` from then on, alone. APIError 404
        when there is no such Deployment."""
        with self.lock:
            obj = self.objects.get(("deployments", namespace, name))
            if obj is None:
                raise APIError(404, "NotFound", f'deployments.apps "{name}" not found')
            if replicas is not None and replicas != obj["spec"].get("replicas"):
                obj["spec"]["replicas"] = replicas
                obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
                if not self.kubelet:
                    obj["status"] = _ready_status(obj)
                self._bump(obj)
            if replicas is not None:
                entry = {"manager": manager, "operation": "Update", "apiVersion": "apps/v1", "subresource": "scale"}
                kept = [
                    _owning(e, _owned(e) - {REPLICAS})
                    for e in obj["metadata"].get("managedFields") or []
                    if _key(e) != _key(entry)
                ]
                obj["metadata"]["managedFields"] = [*kept, _owning(entry, {REPLICAS})]
            labels = (obj["spec"].get("selector") or {}).get("matchLabels") or {}
            return {
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {
                    k: obj["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                },
                "spec": {"replicas": obj["spec"].get("replicas", 1)},
                "status": {
                    "replicas": (obj.get("status") or {}).get("replicas", 0),
                    "selector": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
                },
            }

    def patch_pod(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A merge patch of a pod: only its labels and annotations may change (as the real server:
        a pod's spec is immutable but for a few fields these callers never touch)."""
        if set(patch) - {"metadata"} or set(patch.get("metadata") or {}) - {"labels", "annotations"}:
            raise APIError(
                422, "Invalid", f'Pod "{name}" is invalid: spec: Forbidden: pod updates may not change these fields'
            )
        with self.lock:
            obj = self.objects.get(("pods", namespace, name))
            if obj is None:
                raise APIError(404, "NotFound", f'pods "{name}" not found')
            meta = copy.deepcopy(obj["metadata"])
            for field, changes in (patch.get("metadata") or {}).items():
                merged = dict(meta.get(field) or {})
                for key, value in (changes or {}).items():
                    if value is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = value
                meta[field] = merged
            problem = invalid_labels(meta)
            if problem:
                raise APIError(422, "Invalid", f'Pod "{name}" is invalid: {problem}')
            obj["metadata"] = meta
            self._bump(obj)
            return copy.deepcopy(obj)

    def merge_patch(
        self, plural: str, namespace: str, name: str, patch: dict[str, Any], manager: str, strategic: bool = False
    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386: a map merged key by key, a null removes its key, any other
        value replaces) of an object of ``MERGE_PATCHED``, as an Update by ``manager``: it owns
        each field the patch changed (taken from any other owner, with no conflict), fields removed
        are no one's, and its entry keeps what it owned before (``managedFields``, as the real
        server keeps them). Its name, namespace, kind and apiVersion stay; 404 when there is none;
        400 for a patch not a JSON object; 409 for a metadata.resourceVersion not the live one (the
        real server's precondition). A patch that changes nothing changes nothing: no new
        resourceVersion, no managedFields entry. ``strategic`` (a strategic merge patch: these kinds
        have no list merged by key): a map's ``$patch`` directive, ``replace`` (the map is the rest
        of it) or ``delete`` (the map removed), is carried out, not stored; another directive, 400."""
        resource = RESOURCES[plural]
        if not isinstance(patch, dict):
            raise APIError(400, "BadRequest", "the patch must be a JSON object")
        with self.lock:
            live = self.objects.get((plural, namespace, name))
            if live is None:
                raise APIError(404, "NotFound", f'{_qualified(plural)} "{name}" not found')
            wanted = (
                (patch.get("metadata") or {}).get("resourceVersion")
                if isinstance(patch.get("metadata"), dict)
                else None
            )
            if wanted is not None and wanted != live["metadata"].get("resourceVersion"):
                raise APIError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {_qualified(plural)} "{name}": the object has been modified; '
                    "please apply your changes to the latest version and try again",
                )
            obj = _merged(live, _directed(patch) if strategic else patch)
            for field in ("apiVersion", "kind", "status"):  # (status: its subresource's, not the object's)
                obj.pop(field, None)
                if field in live:
                    obj[field] = copy.deepcopy(live[field])
            meta = obj["metadata"] = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            for field in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion", "managedFields"):
                meta.pop(field, None)
                if field in live["metadata"]:
                    meta[field] = copy.deepcopy(live["metadata"][field])
            problem = invalid_labels(meta) or resource.invalid(obj)
            if problem:
                raise APIError(422, "Invalid", f'{resource.kind}{_group_suffix(plural)} "{name}" is invalid: {problem}')
            if obj == live:  # (a no-op: the real server writes nothing)
                return copy.deepcopy(live)
            was, now = _leaves(live), _leaves(obj)
            changed = {path for path, value in now.items() if path not in was or was[path] != value}
            gone = set(was) - set(now)
            mine = {"manager": manager, "operation": "Update", "apiVersion": resource.api_version}
            entries = live["metadata"].get("managedFields") or []
            before = next((_owned(e) for e in entries if _key(e) == _key(mine)), set())
            others = [_owning(e, _owned(e) - changed - gone) for e in entries if _key(e) != _key(mine)]
            meta["managedFields"] = [*others, {**_owning(mine, (before - gone) | changed), "time": now_rfc3339()}]
            self._bump(obj)
            self.objects[(plural, namespace, name)] = obj
            return copy.deepcopy(obj)

    def read_log(self, namespace: str, name: str, container: str | None, previous: bool) -> tuple[str, Path | None]:
        """Which container's log file a log request reads; APIError as the real server answers."""
        pod = self.get("pods", namespace, name)
        if pod is None:
            raise APIError(404, "NotFound", f'pods "{name}" not found')
        names = [c["name"] for c in pod["spec"]["containers"]]
        if container is None:
            if len(names) != 1:
                raise APIError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]",
                )
            container = names[0]
        if container not in names:
            raise APIError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        state = _container_state(pod, container)
        if state is None or "waiting" in state:
            reason = (state or {}).get("waiting", {}).get("reason", "ContainerCreating")
            raise APIError(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        source = self.log_source
        return container, source(namespace, name, container, previous) if source else None

    def follow_lines(
        self, namespace: str, name: str, container: str, path: Path | None, follow: bool
    ) -> Iterator[bytes]:
        """The log file's lines (``<RFC 3339 timestamp> <message>\\n``), and with ``follow`` the
        new ones as they come until the container terminates, the pod is gone or the server stops."""
        offset = 0
        pending = b""
        while True:
            running = follow and not self.stopping.is_set() and self._running(namespace, name, container)
            if path is not None and path.is_file():
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read(1024 * 1024)
                    offset += len(chunk)
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    yield line + b"\n"
                if len(chunk) == 1024 * 1024:
                    continue
            if not running:
                return
            time.sleep(0.1)

    def _running(self, namespace: str, name: str, container: str) -> bool:
        pod = self.get("pods", namespace, name)
        return pod is not None and "running" in (_container_state(pod, container) or {})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            record: dict[str, Any]

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                self.record["status"] = code
                data = json.dumps(body).encode()
                self.send_response(code)
                if code == 429:
                    self.send_header("Retry-After", api.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _start(self, method: str) -> tuple[str, str | None, str | None, str | None, dict[str, list[str]]]:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
                self.record = {
                    "method": method,
                    "path": url.path,
                    "query": query,
                    "content_type": self.headers.get("Content-Type", ""),
                    "user": api.users.get(token) if scheme.lower() == "bearer" else None,
                }
                with api.lock:
                    api.requests.append(self.record)
                    if method in ("PATCH", "POST", "PUT", "DELETE") and api.before_write is not None:
                        race, api.before_write = api.before_write, None
                        race()
                    dropped = api.drop > 0
                    api.drop -= dropped
                    throttled = (
                        not dropped
                        and api.throttle > 0
                        and method in api.throttled_methods
                        and url.path.endswith(api.throttled_path or "")
                    )
                    api.throttle -= throttled
                if dropped:
                    self._body()  # read, never answered
                    raise Dropped
                if throttled and api.throttle_served:
                    self.record["served"] = api.throttle_status or "dropped"  # (``_answer`` answers it once served)
                elif throttled:
                    self._body()  # read, not served
                    if api.throttle_status is None:
                        raise Dropped
                    raise APIError(api.throttle_status, *REFUSALS[api.throttle_status])
                m = PATH_RE.match(url.path)
                plural = m.group(4) if m else ""
                if m is None or plural not in RESOURCES or RESOURCES[plural].api_version != (m.group(1) or m.group(2)):
                    raise APIError(404, "NotFound", f"the server could not find the requested resource {url.path}")
                namespace, name, sub = m.group(3), m.group(5), m.group(6)
                scoped = not RESOURCES[plural].cluster_scoped
                if (
                    (scoped and namespace is None and name is not None)
                    or (not scoped and namespace is not None)
                    or (sub is not None and SUBRESOURCES[sub] != plural)
                ):
                    raise APIError(404, "NotFound", f"the server could not find the requested resource {url.path}")
                if not scoped:
                    namespace = ""  # how cluster-scoped objects are stored
                api.authorize(self.record)
                return plural, namespace, name, sub, query

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY_BYTES:
                    raise APIError(413, "RequestEntityTooLarge", f"request entity too large: limit is {MAX_BODY_BYTES}")
                return self.rfile.read(length)

            def _json(self) -> dict[str, Any]:
                try:
                    body = json.loads(self._body())
                except ValueError as exc:
                    raise APIError(400, "BadRequest", f"error decoding JSON: {exc}") from None
                if not isinstance(body, dict):
                    raise APIError(400, "BadRequest", "the body must be a JSON object")
                return body

            def _answer(self, method: str, handle: Callable[..., tuple[int, Any] | None]) -> None:
                try:
                    answer = handle(*self._start(method))
                    if self.record.get("served") == "dropped":
                        raise Dropped
                    if self.record.get("served"):
                        raise APIError(self.record["served"], *REFUSALS[self.record["served"]])
                except Dropped:
                    self.record["status"] = None
                    self.close_connection = True
                    return
                except APIError as exc:
                    self._send(exc.code, status(exc.code, exc.reason, exc.message, exc.details))
                    return
                if answer is not None:
                    self._send(*answer)

            def do_GET(self) -> None:
                self._answer("GET", self._get)

            def do_POST(self) -> None:
                self._answer("POST", self._post)

            def do_PATCH(self) -> None:
                self._answer("PATCH", self._patch)

            def do_DELETE(self) -> None:
                self._answer("DELETE", self._delete)

            def do_PUT(self) -> None:
                self._answer("PUT", self._put)

            def _lease(self, method: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
                return lease_call(api, method, self.record["path"], body or {})

            def _put(
                self, plural: str, namespace: str | None, name: str | None, sub: str | None, query: dict[str, list[str]]
            ) -> tuple[int, Any]:
                if plural != "leases":
                    raise APIError(405, "MethodNotAllowed", f"PUT is not supported on {plural} here: use apply")
                return self._lease("PUT", self._json())

            def _get(
                self, plural: str, namespace: str | None, name: str | None, sub: str | None, query: dict[str, list[str]]
            ) -> tuple[int, Any] | None:
                if sub == "log":
                    self._log(namespace or "", name or "", query)
                    return None
                if sub == "scale":
                    return 200, api.scale(namespace or "", name or "")
                if plural == "leases":
                    return self._lease("GET")
                if name is None and plural == "events" and query.get("watch", ["false"])[0] in GO_TRUE:
                    self._watch_nothing(query)
                    return None
                if name is None:
                    try:
                        items = api.list(
                            plural, namespace, query.get("labelSelector", [""])[0], query.get("fieldSelector", [""])[0]
                        )
                    except ValueError as exc:
                        raise APIError(400, "BadRequest", str(exc)) from None
                    if plural == "events":
                        items = []  # nothing records events here
                    resource = RESOURCES[plural]
                    for item in items:
                        item.pop("apiVersion", None)
                        item.pop("kind", None)
                    return 200, {
                        "apiVersion": resource.api_version,
                        "kind": f"{resource.kind}List",
                        "metadata": {"resourceVersion": str(api.version)},
                        "items": items,
                    }
                obj = api.get(plural, namespace or "", name)
                if obj is None:
                    raise APIError(404, "NotFound", f'{_qualified(plural)} "{name}" not found')
                return 200, obj

            def _watch_nothing(self, query: dict[str, list[str]]) -> None:
                """A watch of events (KubernetesPodTrigger's, while its pod starts): nothing records
                events here, so the stream carries none and ends after its ``timeoutSeconds`` (at
                most a minute) or when the server stops, as a real watch ends."""
                value = query.get("timeoutSeconds", [""])[0]
                if value and (not value.isdigit() or len(value) > 12):
                    raise APIError(
                        400, "BadRequest", f"invalid timeoutSeconds {value!r}: must be a non-negative integer"
                    )
                self.record["status"] = 200
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                api.stopping.wait(min(int(value) if value else 60, 60))

            def _log(self, namespace: str, name: str, query: dict[str, list[str]]) -> None:
                flags = {}
                for flag in ("follow", "timestamps", "previous"):
                    value = query.get(flag, ["false"])[0]
                    if value not in GO_BOOLS:
                        raise APIError(400, "BadRequest", f"invalid {flag} {value!r}")
                    flags[flag] = value in GO_TRUE
                numbers = {}
                for field in ("sinceSeconds", "tailLines", "limitBytes"):
                    value = query.get(field, [""])[0]
                    if value and (not value.isdigit() or len(value) > 12):
                        raise APIError(400, "BadRequest", f"invalid {field} {value!r}: must be a non-negative integer")
                    numbers[field] = int(value) if value else None
                container, path = api.read_log(namespace, name, query.get("container", [None])[0], flags["previous"])
                self.record["status"] = 200
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                lines = api.follow_lines(namespace, name, container, path, flags["follow"])
                since = time.time() - numbers["sinceSeconds"] if numbers["sinceSeconds"] is not None else None
                tail = numbers["tailLines"]
                if tail is not None:  # the last N lines there are now, then (following) the new ones
                    lines = _tail(lines, tail, path)
                sent, limit = 0, numbers["limitBytes"]
                try:
                    for line in lines:
                        stamp, _, message = line.partition(b" ")
                        if since is not None and (parse_log_time(stamp.decode()) or 0) < since:
                            continue
                        out = line if flags["timestamps"] else message
                        if limit is not None and sent + len(out) > limit:
                            self.wfile.write(out[: limit - sent])
                            return
                        self.wfile.write(out)
                        self.wfile.flush()
                        sent += len(out)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def _post(
                self, plural: str, namespace: str | None, name: str | None, sub: str | None, query: dict[str, list[str]]
            ) -> tuple[int, Any]:
                if name is not None or namespace is None:
                    raise APIError(405, "MethodNotAllowed", "POST creates in a namespace's collection")
                if plural == "leases":
                    return self._lease("POST", self._json())
                return 201, api.create(plural, namespace, self._json())

            def _patch(
                self, plural: str, namespace: str | None, name: str | None, sub: str | None, query: dict[str, list[str]]
            ) -> tuple[int, Any]:
                if name is None or namespace is None:
                    raise APIError(405, "MethodNotAllowed", "PATCH names an object")
                ctype = self.record["content_type"]
                if sub == "scale":
                    return 200, self._scale(namespace, name, ctype, query)
                if plural == "pods" and ctype in (
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",
                ):
                    return 200, api.patch_pod(namespace, name, self._json())
                if plural in MERGE_PATCHED and ctype in (
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",  # (neither kind has a list merged by key)
                ):
                    manager = query.get("fieldManager", [self.headers.get("User-Agent", "unknown").split("/")[0]])[0]
                    strategic = ctype == "application/strategic-merge-patch+json"
                    return 200, api.merge_patch(plural, namespace, name, self._json(), manager, strategic)
                if ctype != "application/apply-patch+yaml":
                    raise APIError(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r}")
                if query.get("force", ["false"])[0] not in GO_BOOLS:
                    raise APIError(400, "BadRequest", f"invalid force {query['force'][0]!r}")
                if not query.get("fieldManager"):
                    raise APIError(422, "Invalid", "fieldManager is required for apply requests")
                dry_run = query.get("dryRun", [])
                if dry_run not in ([], ["All"]):
                    raise APIError(400, "BadRequest", f"unsupported dryRun {dry_run!r}: only 'All'")
                try:
                    body = yaml.safe_load(self._body())
                except yaml.YAMLError as exc:
                    raise APIError(400, "BadRequest", f"error decoding YAML: {exc}") from None
                if not isinstance(body, dict):
                    raise APIError(400, "BadRequest", "the body must be an object")
                return api.apply(
                    plural,
                    namespace,
                    name,
                    body,
                    query["fieldManager"][0],
                    record=self.record,
                    force=query.get("force", ["false"])[0] in GO_TRUE,
                    dry_run=bool(dry_run),
                )

            def _scale(self, namespace: str, name: str, ctype: str, query: dict[str, list[str]]) -> dict[str, Any]:
                """A patch of a Deployment's Scale: a merge patch (an object) or a JSON patch (a
                list of operations, as the real server decodes it: an object is a 400); only
                ``spec.replicas`` is taken."""
                try:
                    patch = json.loads(self._body())
                except ValueError as exc:
                    raise APIError(400, "BadRequest", f"error decoding JSON: {exc}") from None
                replicas: Any = None
                if ctype == "application/json-patch+json":
                    if not isinstance(patch, list):
                        raise APIError(
                            400,
                            "BadRequest",
                            f"json: cannot unmarshal {_json_type(patch)} into Go value of type jsonpatch.Patch",
                        )
                    for op in patch:
                        if (
                            isinstance(op, dict)
                            and op.get("op") in ("add", "replace")
                            and op.get("path") == "/spec/replicas"
                        ):
                            replicas = op.get("value")
                elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    if not isinstance(patch, dict):
                        raise APIError(400, "BadRequest", "the patch must be a JSON object")
                    replicas = (patch.get("spec") or {}).get("replicas")
                else:
                    raise APIError(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r} for a Scale here")
                if replicas is None:
                    return api.scale(namespace, name)
                if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 2**31 - 1:
                    raise APIError(
                        422,
                        "Invalid",
                        f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: {replicas!r}',
                    )
                manager = query.get("fieldManager", [self.headers.get("User-Agent", "unknown").split("/")[0]])[0]
                return api.scale(namespace, name, replicas, manager)

            def _delete(
                self, plural: str, namespace: str | None, name: str | None, sub: str | None, query: dict[str, list[str]]
            ) -> tuple[int, Any]:
                if name is None or namespace is None:
                    raise APIError(405, "MethodNotAllowed", "DELETE names an object")
                if plural == "leases":  # DeleteOptions' preconditions.resourceVersion
                    raw = self._body()
                    try:
                        options = json.loads(raw) if raw else {}
                    except ValueError as exc:
                        raise APIError(400, "BadRequest", f"error decoding JSON: {exc}") from None
                    return self._lease("DELETE", options if isinstance(options, dict) else {})
                raw = self._body()
                try:
                    options = json.loads(raw) if raw else {}
                except ValueError as exc:
                    raise APIError(400, "BadRequest", f"error decoding JSON: {exc}") from None
                preconditions = (options.get("preconditions") if isinstance(options, dict) else None) or {}
                return 200, api.delete(plural, namespace, name, preconditions)

        return Handler


def _applied(live: dict[str, Any] | None, body: dict[str, Any], name: str, namespace: str) -> dict[str, Any]:
    """The object after one field manager applied ``body``: every field it owns (all but
    metadata and status) as applied; its labels and annotations as applied; status kept."""
    meta = body["metadata"]
    obj: dict[str, Any] = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": copy.deepcopy(live["metadata"])
        if live
        else {
            "name": name,
            **({"namespace": namespace} if namespace else {}),  # none for a cluster-scoped object
            "uid": str(uuid.uuid4()),
            "creationTimestamp": now_rfc3339(),
        },
    }
    for field, value in body.items():
        if field not in ("apiVersion", "kind", "metadata", "status"):
            obj[field] = copy.deepcopy(value)
    if body["kind"] == "Secret":  # stringData is write-only: the server stores it in data
        obj.setdefault("type", "Opaque")
        data = dict(obj.get("data") or {})
        for key, value in (obj.pop("stringData", None) or {}).items():
            data[key] = base64.b64encode(value.encode()).decode()
        obj["data"] = data
    for field in ("labels", "annotations"):
        if field in meta:
            obj["metadata"][field] = dict(meta[field])
    if live is not None and "status" in live:
        obj["status"] = live["status"]
    return obj


def _ready_status(deployment: dict[str, Any]) -> dict[str, Any]:
    """A Deployment's status once all of its pods run (no kubelet: what the controllers report)."""
    replicas = deployment["spec"].get("replicas", 1)
    return {
        "observedGeneration": deployment["metadata"]["generation"],
        "replicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
        "updatedReplicas": replicas,
    }


def _merged(target: Any, patch: Any) -> Any:
    """``target`` with the JSON merge ``patch`` applied (RFC 7386's MergePatch), a new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) and not isinstance(patch, _Replace) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


def _directed(patch: Any) -> Any:
    """A strategic merge ``patch`` of a kind with no list merged by key as the JSON merge patch it
    amounts to: a map's ``$patch: replace`` makes it the rest of it, whole (its other keys removed:
    null each), ``$patch: delete`` removes it (null), ``$patch: merge`` is the default; another
    directive (``$retainKeys``, ``$setElementOrder/...``, ``$deleteFromPrimitiveList/...``, another
    ``$patch``) is refused, 400, not stored as a key. A list is replaced whole, as it is."""
    if not isinstance(patch, dict):
        return patch
    directive = patch.get("$patch", "merge")
    others = sorted(k for k in patch if k.startswith("$") and k != "$patch")
    if others or directive not in ("merge", "replace", "delete"):
        what = others[0] if others else f"$patch: {json.dumps(directive)}"
        raise APIError(400, "BadRequest", f"strategic merge patch directive {what} is not supported here")
    if directive == "delete":
        return None
    rest = {k: _directed(v) for k, v in patch.items() if k != "$patch"}
    return _Replace(rest) if directive == "replace" else rest


class _Replace(dict[str, Any]):
    """A map a strategic merge patch's ``$patch: replace`` gives whole (``_merged``: not merged)."""


def _json_type(value: Any) -> str:
    """A decoded JSON value's type as Go's decoder names it in its errors."""
    names = {dict: "object", str: "string", bool: "bool", int: "number", float: "number"}
    return names.get(type(value), "null" if value is None else "array")


def _key(entry: dict[str, Any]) -> tuple[str, str, str]:
    """A managedFields entry's identity: its manager, operation and subresource."""
    return entry.get("manager", ""), entry.get("operation", ""), entry.get("subresource", "")


FieldPath = tuple[str, ...]  # a field as FieldsV1 names it: ("f:spec", "f:template", ..., 'k:{"name":"x"}', "f:image")
REPLICAS: FieldPath = ("f:spec", "f:replicas")


def _owns(entry: dict[str, Any]) -> bool:
    return REPLICAS in _owned(entry)


def _leaves(obj: dict[str, Any]) -> dict[FieldPath, Any]:
    """The fields an apply of ``obj`` sets, with their values, as server-side apply tracks them:
    its labels and annotations, and under ``spec`` each key of a map, in a Deployment each item of
    a list of maps with a ``name`` by that name (a keyed list: containers, env, ports, volumes),
    any other list whole (atomic: every list of Istio's CRDs, which mark none a map)."""
    keyed = obj.get("kind") == "Deployment"
    out: dict[FieldPath, Any] = {}

    def walk(value: Any, path: FieldPath) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, (*path, f"f:{k}"))
        elif (
            keyed
            and isinstance(value, list)
            and value
            and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in value)
        ):
            for item in value:
                walk(item, (*path, "k:" + json.dumps({"name": item["name"]}, separators=(",", ":"))))
        else:
            out[path] = value

    meta = obj.get("metadata") or {}
    for key in ("labels", "annotations"):
        for k, v in (meta.get(key) or {}).items():
            out[("f:metadata", f"f:{key}", f"f:{k}")] = v
    walk(obj.get("spec") or {}, ("f:spec",))
    return out


def _owned(entry: dict[str, Any]) -> set[FieldPath]:
    """The fields a managedFields entry owns (its ``fieldsV1``)."""
    out: set[FieldPath] = set()

    def walk(node: dict[str, Any], path: FieldPath) -> None:
        for key, child in node.items():
            if child:
                walk(child, (*path, key))
            elif path or key not in ("f:spec", "f:metadata"):  # (an entry owning nothing has {"f:spec": {}})
                out.add((*path, key))

    walk(entry.get("fieldsV1") or {}, ())
    return out


def _owning(entry: dict[str, Any], fields: set[FieldPath]) -> dict[str, Any]:
    """``entry`` owning ``fields``, as FieldsV1."""
    root: dict[str, Any] = {"f:spec": {}}
    for path in sorted(fields):
        node = root
        for key in path:
            node = node.setdefault(key, {})
    return {**entry, "fieldsType": "FieldsV1", "fieldsV1": root}


def _path_text(path: FieldPath) -> str:
    """A field's path as the API server writes it in a conflict: ``.spec.template.spec.containers[name="x"].image``."""
    return "".join(f".{k[2:]}" if k.startswith("f:") else f'[name="{json.loads(k[2:])["name"]}"]' for k in path)


def _put(obj: dict[str, Any], path: FieldPath, value: Any) -> None:
    """``value`` at ``path`` in ``obj`` (a keyed list's item found by its name, or added)."""
    node: Any = obj
    for i, key in enumerate(path):
        last = i == len(path) - 1
        if key.startswith("f:"):
            if last:
                node[key[2:]] = copy.deepcopy(value)
                return
            nxt = path[i + 1]
            node = node.setdefault(key[2:], [] if nxt.startswith("k:") else {})
        else:
            name = json.loads(key[2:])["name"]
            item = next((x for x in node if isinstance(x, dict) and x.get("name") == name), None)
            if item is None:
                item = {"name": name}
                node.append(item)
            node = item


def _manager(entry: dict[str, Any]) -> str:
    """A field manager as a conflict names it."""
    sub = f' with subresource "{entry["subresource"]}"' if entry.get("subresource") else ""
    return f'"{entry["manager"]}"{sub} using {entry.get("apiVersion", "apps/v1")}'


def _fields(
    live: dict[str, Any] | None, obj: dict[str, Any], body: dict[str, Any], manager: str, force: bool
) -> list[dict[str, Any]]:
    """An object (of ``TRACKED``) after ``manager`` applied ``body`` (``obj``, set in place) and
    its managedFields, as server-side apply decides them: the applier owns every field it applied
    (shared with the other owners of the same value); a field it changes while another manager
    owns it is a conflict (APIError 409 naming each manager and field) unless ``force`` takes it
    over; a field another manager owns that the body leaves out keeps that manager's value, a
    label or annotation no manager owns stays, one the applier alone owned and leaves out is
    removed (a Deployment's ``spec.replicas`` with no other owner: its default, 1)."""
    mine = {"manager": manager, "operation": "Apply", "apiVersion": body["apiVersion"]}
    entries = (live or {}).get("metadata", {}).get("managedFields") or []
    before = next((_owned(e) for e in entries if _key(e) == _key(mine)), set())
    others = [e for e in entries if _key(e) != _key(mine)]
    applied, was = _leaves(body), _leaves(live or {})
    deployment = body["kind"] == "Deployment"
    if deployment:
        was.setdefault(REPLICAS, 1)
    conflicts = [
        (e, path)
        for e in others
        for path in sorted(_owned(e) & applied.keys())
        if was.get(path, applied[path]) != applied[path]
    ]
    if conflicts and not force:
        if len(conflicts) == 1:
            said = f"conflict with {_manager(conflicts[0][0])}: {_path_text(conflicts[0][1])}"
        else:
            said = "\n".join(
                f"conflicts with {_manager(e)}:\n" + "\n".join(f"- {_path_text(p)}" for x, p in conflicts if x is e)
                for e in others
                if any(x is e for x, _ in conflicts)
            )
        s = "s" if len(conflicts) > 1 else ""
        # (the real server's Status: each field a cause, its manager as the message names it)
        causes = [
            {"reason": "FieldManagerConflict", "message": f"conflict with {_manager(e)}", "field": _path_text(p)}
            for e, p in conflicts
        ]
        raise APIError(409, "Conflict", f"Apply failed with {len(conflicts)} conflict{s}: {said}", {"causes": causes})
    others = [_owning(e, _owned(e) - {p for x, p in conflicts if x is e}) for e in others]
    theirs = set().union(*(_owned(e) for e in others))
    for key in ("labels", "annotations"):  # a map of its keys: the ones no one else owns or applies go
        kept = {
            k: v
            for k, v in (((live or {}).get("metadata") or {}).get(key) or {}).items()
            if ("f:metadata", f"f:{key}", f"f:{k}") not in before - theirs
        }
        kept.update((body["metadata"].get(key)) or {})
        obj["metadata"].pop(key, None)
        if kept:
            obj["metadata"][key] = kept
    for e in others:
        for path in sorted(_owned(e) - applied.keys()):
            if path in was and path != REPLICAS:
                _put(obj, path, was[path])
    if deployment and REPLICAS not in applied:
        obj["spec"]["replicas"] = was[REPLICAS] if any(_owns(e) for e in others) else 1
    return [*others, _owning(mine, set(applied))]


def _container_state(pod: dict[str, Any], container: str) -> dict[str, Any] | None:
    for s in (pod.get("status") or {}).get("containerStatuses") or []:
        if s.get("name") == container:
            return dict(s.get("state") or {})
    return None


def _tail(lines: Iterator[bytes], n: int, path: Path | None) -> Iterator[bytes]:
    """The last ``n`` of the lines the file holds now, then every later one."""
    existing = path.read_bytes().count(b"\n") if path is not None and path.is_file() else 0
    for i, line in enumerate(lines):
        if i >= existing - n:
            yield line


# --- coordination.k8s.io/v1 Leases (the per-model rollout lock, vision_rollout.locks.LeaseLock) ---
# POST creates (409 AlreadyExists), GET reads, PUT replaces (404 when absent: Leases are not
# created on update; 409 Conflict on a stale metadata.resourceVersion), DELETE honours
# preconditions.resourceVersion (409 Conflict). Bodies must name the path's object, and times
# are MicroTime with exactly six fractional digits, as the real API server parses them.
LEASE_RE = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([a-z0-9-]{1,63})/leases(?:/([a-z0-9.-]{1,253}))?$")
MICRO_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(?:Z|[+-]\d\d:\d\d)$")


def invalid_lease(body: dict[str, Any], namespace: str, name: str | None) -> tuple[int, dict[str, Any]] | None:
    """What the API server says of a Lease body (None: acceptable)."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    if body.get("apiVersion") != "coordination.k8s.io/v1" or body.get("kind") != "Lease":
        return 400, status(400, "BadRequest", "apiVersion/kind do not match the path")
    if (
        not meta.get("name")
        or (name is not None and meta["name"] != name)
        or meta.get("namespace", namespace) != namespace
    ):
        return 400, status(400, "BadRequest", "metadata.name/namespace do not match the path")
    for field in ("acquireTime", "renewTime"):
        if field in spec and not MICRO_TIME_RE.match(str(spec[field])):
            return 400, status(400, "BadRequest", f'parsing time "{spec[field]}" as "2006-01-02T15:04:05.000000Z07:00"')
    seconds = spec.get("leaseDurationSeconds")
    if seconds is not None and (not isinstance(seconds, int) or seconds <= 0):
        return 422, status(
            422, "Invalid", f"spec.leaseDurationSeconds: Invalid value: {seconds}: must be greater than 0"
        )
    return None


def lease_call(api: FakeKubeAPI, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    namespace, name = LEASE_RE.match(path).groups()  # type: ignore[union-attr]
    if (method == "POST") != (name is None):
        return 405, status(405, "MethodNotAllowed", f"{method} is not supported on {path}")
    if method in ("POST", "PUT") and (problem := invalid_lease(body, namespace, name)):
        return problem
    key = ("leases", namespace, name or body["metadata"]["name"])
    with api.lock:
        live = api.objects.get(key)
        if method == "GET" or (method in ("PUT", "DELETE") and live is None):
            return (
                (200, copy.deepcopy(live)) if live else (404, status(404, "NotFound", f'leases "{key[2]}" not found'))
            )
        if method == "POST" and live is not None:
            return 409, status(409, "AlreadyExists", f'leases.coordination.k8s.io "{key[2]}" already exists')
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if method == "DELETE":
            wanted = (body.get("preconditions") or {}).get("resourceVersion")
        if live is not None and wanted is not None and wanted != live["metadata"]["resourceVersion"]:
            return 409, status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on leases.coordination.k8s.io "{key[2]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        if method == "DELETE":
            del api.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        api.version += 1
        meta = {
            **{k: v for k, v in body["metadata"].items() if k in ("name", "labels", "annotations")},
            "namespace": namespace,
        }
        obj = {**body, "metadata": {**meta, "resourceVersion": str(api.version)}}
        api.objects[key] = obj
        return (201 if live is None else 200), copy.deepcopy(obj)
