"""A local HTTP server speaking the Kubernetes API for Istio's VirtualService and DestinationRule
and apps/v1 Deployments.

No API server can run on these machines, so this fake checks what the real one checks for
the calls the IstioRouter and the version deployments make: paths and verbs, the
server-side-apply content type and field manager, that the body names the object of the path,
Istio's CRD schema and a Deployment's required fields and selector (422 Invalid), and optimistic
concurrency on ``metadata.resourceVersion`` (409 Conflict). Answers are Kubernetes ``Status``
objects, as the real server's. A Deployment's pods are reported ready at once (no kubelet).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

from vision_rollout.mesh import istio_schemas

PATH_RE = re.compile(
    r"^/apis/(?:networking\.istio\.io|apps)/v1/namespaces/([a-z0-9-]+)/(virtualservices|destinationrules|deployments)/"
    r"([a-z0-9.-]+)$"
)
GO_BOOLS = {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
KINDS = {
    "virtualservices": "VirtualService",
    "destinationrules": "DestinationRule",
    "deployments": "Deployment",
}
API_VERSIONS = {
    "virtualservices": "networking.istio.io/v1",
    "destinationrules": "networking.istio.io/v1",
    "deployments": "apps/v1",
}


def invalid_deployment(body: dict[str, Any]) -> str | None:
    """What the API server's validation says of a Deployment (the fields these calls set)."""
    spec = body.get("spec") or {}
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    if not selector:
        return "spec.selector: Required value"
    if any(labels.get(k) != v for k, v in selector.items()):
        return "spec.template.metadata.labels: Invalid value: `selector` does not match template `labels`"
    if not containers or any(not c.get("name") or not c.get("image") for c in containers):
        return "spec.template.spec.containers: Required value: a name and an image each"
    if not isinstance(spec.get("replicas", 1), int) or spec.get("replicas", 1) < 0:
        return "spec.replicas: Invalid value: must be greater than or equal to 0"
    return None


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKubeAPI:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.version = 100
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeKubeAPI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def touch(self, plural: str, namespace: str, name: str, mutate) -> None:  # type: ignore[no-untyped-def]
        """Another writer changes the object (bumps resourceVersion)."""
        with self.lock:
            obj = self.objects[(plural, namespace, name)]
            mutate(obj)
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)

    def writes(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "PATCH"]

    def _handler(self):  # type: ignore[no-untyped-def]
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                if api.requests:
                    api.requests[-1]["status"] = code  # requests are handled one at a time in these tests
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self) -> tuple[str, str, str] | None:
                m = PATH_RE.match(urlparse(self.path).path)
                if m is None:
                    self._send(
                        404,
                        status(404, "NotFound", f"the server could not find the requested resource {self.path}"),
                    )
                    return None
                return m.group(2), m.group(1), m.group(3)

            def _lease(self, method: str) -> bool:
                """A coordination.k8s.io Lease call answered (the block below); False for other paths."""
                path = urlparse(self.path).path
                if not LEASE_RE.match(path):
                    return False
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                api.requests.append({"method": method, "path": path})
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError as exc:
                    self._send(400, status(400, "BadRequest", f"error decoding JSON: {exc}"))
                    return True
                self._send(*lease_call(api, method, path, body))
                return True

            def _refuse(self, method: str) -> None:
                api.requests.append({"method": method, "path": self.path})
                self._send(405, status(405, "MethodNotAllowed", f"{method} is not supported on {self.path}"))

            def do_POST(self) -> None:
                if not self._lease("POST"):
                    self._refuse("POST")

            def do_PUT(self) -> None:
                if not self._lease("PUT"):
                    self._refuse("PUT")

            def do_DELETE(self) -> None:
                if not self._lease("DELETE"):
                    self._refuse("DELETE")

            def do_GET(self) -> None:
                if self._lease("GET"):
                    return
                api.requests.append({"method": "GET", "path": self.path})
                key = self._route()
                if key is None:
                    return
                with api.lock:
                    obj = copy.deepcopy(api.objects.get(key))
                if obj is None:
                    self._send(404, status(404, "NotFound", f'{key[0]} "{key[2]}" not found'))
                else:
                    self._send(200, obj)

            def do_PATCH(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                ctype = self.headers.get("Content-Type", "")
                api.requests.append({"method": "PATCH", "path": url.path, "query": query, "content_type": ctype})
                key = self._route()
                if key is None:
                    return
                plural, namespace, name = key
                if ctype != "application/apply-patch+yaml":
                    return self._send(415, status(415, "UnsupportedMediaType", f"unsupported patch type {ctype!r}"))
                if query.get("force", ["false"])[0] not in GO_BOOLS:
                    return self._send(400, status(400, "BadRequest", f"invalid force {query['force'][0]!r}"))
                if not query.get("fieldManager"):
                    return self._send(422, status(422, "Invalid", "fieldManager is required for apply requests"))
                try:
                    body = yaml.safe_load(raw)
                except yaml.YAMLError as exc:
                    return self._send(400, status(400, "BadRequest", f"error decoding YAML: {exc}"))
                meta = body.get("metadata") or {}
                if body.get("apiVersion") != API_VERSIONS[plural] or body.get("kind") != KINDS[plural]:
                    return self._send(400, status(400, "BadRequest", "apiVersion/kind do not match the path"))
                if meta.get("name") != name or meta.get("namespace", namespace) != namespace:
                    return self._send(400, status(400, "BadRequest", "metadata.name/namespace do not match the path"))
                if plural == "deployments":
                    problem = invalid_deployment(body)
                    if problem:
                        return self._send(
                            422, status(422, "Invalid", f'Deployment.apps "{name}" is invalid: {problem}')
                        )
                else:
                    try:
                        jsonschema.validate(body, istio_schemas()[KINDS[plural]]["openAPIV3Schema"])
                    except jsonschema.ValidationError as exc:
                        where = ".".join(str(p) for p in exc.absolute_path)
                        return self._send(
                            422,
                            status(
                                422,
                                "Invalid",
                                f'{KINDS[plural]}.networking.istio.io "{name}" is invalid: {where}: {exc.message}',
                            ),
                        )
                with api.lock:
                    live = api.objects.get(key)
                    wanted = meta.get("resourceVersion")
                    if wanted is not None and (live is None or live["metadata"]["resourceVersion"] != wanted):
                        return self._send(
                            409,
                            status(
                                409,
                                "Conflict",
                                "the object has been modified; please apply "
                                "your changes to the latest version and try again",
                            ),
                        )
                    obj = (
                        copy.deepcopy(live)
                        if live
                        else {
                            "apiVersion": body["apiVersion"],
                            "kind": body["kind"],
                            "metadata": {"name": name, "namespace": namespace},
                        }
                    )
                    obj["spec"] = body["spec"]
                    if plural == "deployments":  # what the controllers would report once the pods run
                        replicas = body["spec"].get("replicas", 1)
                        obj["status"] = {
                            "replicas": replicas,
                            "readyReplicas": replicas,
                            "updatedReplicas": replicas,
                        }
                    for field in ("labels", "annotations"):
                        if field in meta:
                            obj["metadata"][field] = {k: v for k, v in meta[field].items()}
                    api.version += 1
                    obj["metadata"]["resourceVersion"] = str(api.version)
                    obj["metadata"]["managedFields"] = [{"manager": query["fieldManager"][0], "operation": "Apply"}]
                    api.objects[key] = obj
                    reply = copy.deepcopy(obj)
                self._send(201 if live is None else 200, reply)

        return Handler


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
        meta = {**{k: v for k, v in body["metadata"].items() if k in ("name", "labels")}, "namespace": namespace}
        obj = {**body, "metadata": {**meta, "resourceVersion": str(api.version)}}
        api.objects[key] = obj
        return (201 if live is None else 200), copy.deepcopy(obj)
