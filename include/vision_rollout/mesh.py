"""Mesh routers: put a TrafficPolicy into effect, on the model server or on Istio.

One protocol, after Flagger's ``pkg/router``: ``reconcile`` (make the routes ready for a
rollout, before it touches them), ``set_routes`` (diff, then write) and ``get_routes``. A
rollback or a promotion is a ``set_routes`` like any stage's. ``make_router`` raises on an
unknown backend; nothing falls back silently.

- ``LocalRouter``: the model server's ``/v2/models/{m}/traffic`` admin API.
- ``IstioRouter``: renders a ``VirtualService`` and a ``DestinationRule``
  (networking.istio.io/v1; one subset per version, selected by the pod label ``version``),
  validates both against Istio's own CRD schema, and applies them with the official
  kubernetes client: server-side apply with a field manager, a diff before every write, and
  a retry when the object changed underneath (409). What the platform set on the
  VirtualService beside the routes (a route's timeout, retries, fault or CORS policy; the
  spec's other fields) is kept: the rollout moves destinations, weights and the mirror; and on
  the DestinationRule beside the subsets (its traffic policy, a subset's own). A route the
  policy splits between versions is one route per version on the user's bucket, which the
  mesh's EnvoyFilter writes (``render_envoy_filter``; "sticky assignment" below).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import ipaddress
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import jsonschema

from model_server.files import write_private
from model_server.traffic import BUCKET_HEADER, BUCKETS, PINNED_PREFIX, Destination, TrafficPolicy
from vision_rollout.serving import AdminError, ModelServerAdmin

if TYPE_CHECKING:
    from vision_rollout.mirrors import MirrorLog

log = logging.getLogger(__name__)

SCHEMAS = Path(__file__).with_name("schemas") / "istio-networking-v1.json"
ISTIO_KINDS = {"virtualservices": "VirtualService", "destinationrules": "DestinationRule"}  # what the router applies
FIELD_MANAGER = "model-rollout"


class RouterError(Exception):
    """The routes could not be read or written; the message says where and why.
    ``release_by_hand``: set where a floor's release failed at its HPA's apply, not at its read
    (``VersionDeployments.release_floor``): the command that releases the floor by hand.
    ``routes_kept``: set where a restore left the routes as they were, for a reason its message
    does not say (a baseline at 0 pods not scaled up: ``steps.unscaled_from_0``): that reason,
    and what puts the stable version back."""

    release_by_hand: str | None = None
    routes_kept: str | None = None
    maybe_written: bool = (
        False  # (``settled``'s: a write's answer left it unknown, and no read back found it not in place)
    )


class ApiUnreachable(RouterError):
    """The Kubernetes API server gave no answer to a call (no connection, a connection dropped, no
    answer in time) once the client's retries were spent (``with_retries``): the message names
    the call and what to check. Not a refusal: the call may be tried again."""


class ApiFailed(RouterError):
    """The API server failed a call rather than refused it: an answer of ``UNSERVED`` or
    ``MAYBE_SERVED`` (API Priority and Fairness under load, etcd timing out, a proxy's error)
    once the client's retries were spent (``api_error``). Not a refusal: the call may be tried
    again, as an ``ApiUnreachable``. ``status``: the answer's."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Contended(RouterError):
    """A write refused (409) at each of ``settled``'s tries, the object written by another between
    each read and write (a controller rewriting it): not a refusal of the write; the call may be
    tried again, as an ``ApiUnreachable``'s. The steps writing routes have no Airflow retry: the
    teardown (``ensure_stable``), then the failure callback, write the stable routes again."""


TRANSIENT = (ApiFailed, ApiUnreachable, Contended)  # what a retry of the call may get past, unlike a refusal


class Unsettled(Exception):
    """A write whose answer left unknown whether the server served it (``unsettled``): ``error``,
    what the call failed with; ``dry_run``: the write a dry run (nothing stored, whether served or
    not); ``late``: its answer came before the write's end (``MAY_LAND``, or none), which may
    still commit after it. Raised inside a ``settled`` attempt only."""

    def __init__(self, error: Exception, dry_run: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.dry_run = dry_run
        self.late = isinstance(error, ApiUnreachable) or getattr(error, "status", None) in MAY_LAND


class Conflicted(Exception):
    """A write whose compare-and-swap was refused (409: the object written by another between the
    attempt's read and its write): ``error``, what to raise should the tries run out. Raised
    inside a ``settled`` attempt only: read and written again, after a pause drawn at random,
    within the same tries as a write in doubt (no retry loop inside another's)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


T = TypeVar("T")


class Router(Protocol):
    """Where a rollout's traffic policy is applied: the model server's router on one machine
    (``LocalRouter``), Istio's VirtualService and DestinationRule in a cluster (``IstioRouter``).
    ``set_routes`` answers whether anything changed.
    """

    def reconcile(self) -> None: ...
    def set_routes(self, policy: TrafficPolicy) -> bool: ...
    def get_routes(self) -> TrafficPolicy: ...


# -- the model server ------------------------------------------------------------------------


@dataclass
class LocalRouter:
    """The model server as the mesh; ``reconcile`` records the routes it found in ``state_file``
    (once: a retried first stage keeps the first record)."""

    url: str  # http://host:port
    model: str
    token: str | None = field(default=None, repr=False)  # out of logs
    state_file: Path | None = None
    timeout_s: float = 30.0

    @property
    def admin(self) -> ModelServerAdmin:
        return ModelServerAdmin(self.url, self.token, self.timeout_s)

    def get_routes(self) -> TrafficPolicy:
        try:
            return self.admin.traffic(self.model)
        except AdminError as exc:
            raise RouterError(str(exc)) from None

    def reconcile(self) -> None:
        current = self.get_routes()
        if self.state_file is not None and not self.state_file.exists():
            write_private(self.state_file, json.dumps(current.to_dict()).encode())

    def set_routes(self, policy: TrafficPolicy) -> bool:
        """Write the policy unless it is already in effect; True when it wrote."""
        if self.get_routes() == policy:
            return False
        try:
            self.admin.set_traffic(self.model, policy)
        except AdminError as exc:
            raise RouterError(str(exc)) from None
        return True


# -- Istio -----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def istio_schemas() -> dict[str, Any]:
    return json.loads(SCHEMAS.read_text())["schemas"]


# etcd stores an object of at most 1.5 MiB (its --max-request-bytes), metadata and managed fields
# included: the rendered object may take 1 MiB of it as JSON.
MAX_OBJECT_BYTES = 1024 * 1024


def validate_istio(obj: dict[str, Any]) -> None:
    """Raise RouterError unless ``obj`` is valid against Istio's CRD schema for its kind (v1, an
    EnvoyFilter's v1alpha3), passes what istiod's admission webhook checks besides
    (``admission_problem``), and is small enough for the API server to store
    (``MAX_OBJECT_BYTES`` as JSON)."""
    kind = obj.get("kind")
    size = len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(errors="replace"))
    if size > MAX_OBJECT_BYTES:
        raise RouterError(
            f"{kind} {(obj.get('metadata') or {}).get('name')}: {size} bytes as JSON, over the {MAX_OBJECT_BYTES} the rollout writes (etcd stores an "
            "object of at most 1.5 MiB with its metadata): fewer header rules or versions, or shorter match values"
        )
    schemas = istio_schemas()
    if kind not in schemas or obj.get("apiVersion") != f"{schemas[kind]['group']}/{schemas[kind].get('version', 'v1')}":
        raise RouterError(
            f"not a networking.istio.io/v1 VirtualService or DestinationRule, nor a v1alpha3 EnvoyFilter: {kind}"
        )
    try:
        jsonschema.validate(obj, schemas[kind]["openAPIV3Schema"])
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise RouterError(
            f"{kind} {obj['metadata'].get('name')}: invalid at {where or '(root)'}: {exc.message}"
        ) from None
    problem = admission_problem(obj)
    if problem:
        raise RouterError(f"{kind} {obj['metadata'].get('name')}: {problem}")


# A header name in a VirtualService's match, as istiod's validating webhook takes it (its
# validHeaderRegex): narrower than HTTP's token, which the traffic policy takes.
ISTIO_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+")


def admission_problem(obj: dict[str, Any]) -> str | None:
    """What istiod's validating webhook refuses in a schema-valid VirtualService's HTTP routes
    (``invalid at <path>: <why>``), None if nothing: a header name outside ``[-_A-Za-z0-9]+``,
    an empty ``prefix`` or ``regex`` for its value (the model server's router takes
    them all, Istio does not); a route with both ``mirror`` and ``mirrors`` (the stage's mirror
    beside the platform's list of them)."""
    if obj.get("kind") != "VirtualService":
        return None
    for i, route in enumerate((obj.get("spec") or {}).get("http") or []):
        if route.get("mirror") and route.get("mirrors"):
            return (
                f"invalid at spec/http/{i}: Istio refuses a route with both mirror and mirrors (the rollout's mirror "
                f"and the platform's mirrors on route {route.get('name')!r}); move the platform's mirrors off the "
                "route, or roll out with mirror_percent 0"
            )
        for j, match in enumerate(route.get("match") or []):
            for part in ("headers", "withoutHeaders"):
                for name, value in (match.get(part) or {}).items():
                    where = f"spec/http/{i}/match/{j}/{part}/{name}"
                    if not ISTIO_HEADER_NAME.fullmatch(name):
                        return f"invalid at {where}: Istio takes header names of letters, digits, '-' and '_' only"
                    empty = [k for k in ("prefix", "regex") if (value or {}).get(k) == ""]
                    if empty:
                        return f"invalid at {where}: Istio refuses an empty {empty[0]}"
    return None


def subset(version: str) -> str:
    return f"v{version}"


VERSION_SUBSET = re.compile(r"v[1-9][0-9]*")  # a version's subset name (``subset``): the rollout's


def pinned_route(target: IstioTarget, version: str) -> dict[str, Any]:
    """Requests that name version N (``X-Model-Version: N``, or a ``/versions/N`` path, as the
    replay, the probes and clients' overrides do) go to subset vN, by a route named
    ``PINNED_PREFIX`` + N (which no rule of a policy may be named): the weighted route would
    send most of them to another version's pods, which answer 404 or the wrong version. Never
    mirrored: a request that names its version is targeted, not traffic (as the server decides).
    Leading zeros name the same version (``01`` is 1 to the server, as to Triton)."""
    return {
        "name": f"{PINNED_PREFIX}{version}",
        "match": [
            {"headers": {"x-model-version": {"regex": f"0*{version}"}}},
            # Envoy matches the whole path: the version's metadata (nothing after it) and its endpoints.
            {"uri": {"regex": f"/v2/models/[^/]+/versions/0*{version}(/.*)?"}},
        ],
        "route": [{"destination": {"host": target.host, "subset": subset(version)}}],
    }


_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
KUBERNETES_NAMES = {  # a target's names: what the API server takes (rule in words, pattern)
    "namespace": ("a DNS label (a-z, 0-9, '-' inside, at most 63)", _LABEL),
    # A Service's name starts with a letter; its Deployments are <service>-v<N>, its pods'
    # label app=<service>: 63 at most.
    "service": (
        "a Service name (a-z first, then a-z, 0-9, '-' inside, at most 63)",
        r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?",
    ),
    "name": ("a DNS subdomain (labels joined by '.', at most 253)", rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*"),
}


ISTIO_ROOT_NAMESPACE = "istio-system"  # Istio's default: an EnvoyFilter there applies to every proxy
CLUSTER_DOMAIN = "cluster.local"  # Kubernetes' default DNS domain (kubelet's clusterDomain, Istio's domainSuffix)
# A VirtualService's gateway as istiod's webhook takes it (validateGatewayNames): <namespace>/<name>,
# each a DNS label, or a host name of such labels ("mesh", the sidecars, is one).
_ISTIO_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
ISTIO_GATEWAY = re.compile(rf"{_ISTIO_LABEL}/{_ISTIO_LABEL}|(?=.{{1,255}}$){_ISTIO_LABEL}(\.{_ISTIO_LABEL})*")
# A VirtualService's host as istiod's webhook takes it (ValidateWildcardDomain): a DNS name of at
# most 255 characters, a short one too (``digits``), an absolute one (a trailing '.'), whose first
# label alone may be a wildcard ('*', '*.example.com', '*-api.example.com'); or an IP address.
ISTIO_HOST = re.compile(rf"(?=.{{1,255}}$)(?=[^.]{{1,63}}(\.|$))(\*|(\*-?)?{_ISTIO_LABEL})(\.{_ISTIO_LABEL})*\.?")
MAX_HOSTS = 64  # a target's hosts (istio.hosts): more is a mistake, not a plan


def istio_host_problem(host: Any, gateways: list[str]) -> str | None:
    """Why istiod's webhook would refuse ``host`` among a VirtualService's hosts bound to
    ``gateways`` (``ISTIO_HOST``; nor a top-level domain of digits only, nor ``*`` on the mesh's
    sidecars: no gateways, or ``mesh``), None if it takes it."""
    if not isinstance(host, str):
        return "not a host name"
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    rest = host.partition(".")[2]
    if not ISTIO_HOST.fullmatch(host) or rest.rpartition(".")[2].isdigit():
        return (
            "not a DNS name (labels of letters, digits and '-' inside, 63 at most each, 255 in all; a short name "
            "too), whose first label alone may be a wildcard ('*.example.com'), nor an IP address"
        )
    if host == "*" and (not gateways or "mesh" in gateways):
        return "every host, on the mesh's sidecars (no gateways, or 'mesh')"
    return None


@dataclass
class IstioTarget:
    """The Istio objects one model's rollout drives: its Service, and the VirtualService and
    DestinationRule named ``name`` in ``namespace``; and where the mesh's bucket EnvoyFilter is
    (``root_namespace``: the mesh's rootNamespace, one filter for every proxy). ``cluster_domain``:
    the cluster's DNS domain, which the Service's host name ends with (Istio knows it by that
    name only). RouterError for a name Kubernetes would refuse (``KUBERNETES_NAMES``): nothing
    is rendered for it."""

    namespace: str
    service: str  # the Kubernetes Service in front of the model server pods
    name: str  # VirtualService and DestinationRule name
    gateways: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # default: the service's cluster name
    root_namespace: str = ISTIO_ROOT_NAMESPACE
    cluster_domain: str = CLUSTER_DOMAIN

    def __post_init__(self) -> None:
        names = {
            **KUBERNETES_NAMES,
            "root_namespace": KUBERNETES_NAMES["namespace"],
            "cluster_domain": KUBERNETES_NAMES["name"],
        }
        for key, (rule, pattern) in names.items():
            value = getattr(self, key)
            if not isinstance(value, str) or not re.fullmatch(pattern, value):
                raise RouterError(f"istio {key} {str(value)[:80]!r}: not {rule}, which Kubernetes would refuse")
        for gateway in self.gateways:
            if not isinstance(gateway, str) or not ISTIO_GATEWAY.fullmatch(gateway):
                raise RouterError(
                    f"istio gateway {str(gateway)[:80]!r}: not <namespace>/<name> (each a DNS label) nor a host "
                    "name ('mesh' for the sidecars), which Istio would refuse"
                )
        if len(self.hosts) > MAX_HOSTS:
            raise RouterError(f"istio hosts: {len(self.hosts)} of them, more than the {MAX_HOSTS} the rollout takes")
        for host in self.hosts:
            problem = istio_host_problem(host, self.gateways)
            if problem:
                raise RouterError(f"istio host {str(host)[:80]!r}: {problem}, which Istio would refuse")

    @property
    def host(self) -> str:
        return f"{self.service}.{self.namespace}.svc.{self.cluster_domain}"

    def is_own(self, host: object) -> bool:
        """Whether ``host`` names the target's Service, as Istio reads a route's host in the
        VirtualService's namespace: a short name too ("digits", "digits.models")."""
        ns = f"{self.service}.{self.namespace}"
        return isinstance(host, str) and host.lower() in (self.service, ns, f"{ns}.svc", self.host)


# -- sticky assignment in the mesh -----------------------------------------------------------
#
# Envoy picks among a route's weighted destinations per request, and a DestinationRule's
# consistent hash picks a pod within one subset, never the subset. So the mesh assigns users
# itself: an EnvoyFilter (``render_envoy_filter``) runs a Lua filter on every sidecar's outbound
# requests and on gateways that writes the user's bucket into ``BUCKET_HEADER``, and a route
# with two or more weighted versions is rendered as one route per version matching its bucket
# range by regex (``bucket_range_regex``). The ranges are the model server router's (ascending
# versions, ``weight * 100`` buckets each), so raising the candidate's weight only moves users
# from the lower versions to it. The hash is nginx's MurmurHash2 (``murmur_hash2``) so that the
# one-machine cluster's nginx (``split_clients``) assigns each user the same bucket.

# nginx's split_clients at its resolution (0.01%): each of ``BUCKETS`` parts spans this many hash
# values (0xffffffff * 1 / 10000, truncated), the last one the rest.
BUCKET_SPAN = 0xFFFFFFFF // BUCKETS
ARM_SEPARATOR = ":"  # a version's route of a weighted route: "<route>:v<N>" (no rule name holds ":")
ENVOY_FILTER_NAME = "rollout-bucket"
ROUTER_FILTER = "envoy.filters.http.router"  # the last HTTP filter of every chain Istio writes


def murmur_hash2(data: bytes) -> int:
    """nginx's ``ngx_murmur_hash2`` (src/core/ngx_murmurhash.c): MurmurHash2, seed 0, on 32 bits."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    h = len(data) & mask
    full = len(data) - len(data) % 4
    for i in range(0, full, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    tail = data[full:]
    if tail:
        for j in reversed(range(len(tail))):
            h ^= tail[j] << (8 * j)
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)


def user_key(x_user_id: str | None) -> str:
    """The user id the mesh hashes from ``X-User-ID`` as received (several headers joined by ",",
    as Envoy's Lua ``get`` reads them): the list's first element, spaces and tabs around it
    trimmed; "" for none (the client's address is hashed then). Envoy joins repeated headers,
    nginx 1.22 reads the first one, later nginx joins them by ", ": each reads this element."""
    return (x_user_id or "").split(",", 1)[0].strip(" \t")


def user_bucket(key: str) -> int:
    """The mesh's bucket in [0, 10000) of a user key (``X-User-ID``, else the client's address):
    nginx's ``split_clients`` over 10,000 parts of 0.01%, as the EnvoyFilter's Lua computes it."""
    return min(murmur_hash2(key.encode()) // BUCKET_SPAN, BUCKETS - 1)


# The EnvoyFilter's Lua (LuaJIT: Lua 5.1 and its ``bit`` module). Numbers are doubles, so a
# product modulo 2^32 is taken in two halves of 16 bits, each exact below 2^53.
BUCKET_LUA = f"""\
-- {BUCKET_HEADER}: the user's bucket in [0, {BUCKETS}) from X-User-ID (the first element of its
-- values, joined by "," when repeated, trimmed), else the client's address (without its port):
-- nginx's MurmurHash2 of the key, as its split_clients over {BUCKETS} parts.
local bit = require("bit")
local M = 0x5bd1e995
local function u32(x) return x % 4294967296 end
local function mul(a, b)
  local lo = a % 65536
  return (lo * b + ((a - lo) / 65536 * b % 65536) * 65536) % 4294967296
end
local function murmur2(s)
  local n = #s
  local h = n
  local i = 1
  while n >= 4 do
    local b1, b2, b3, b4 = s:byte(i, i + 3)
    local k = mul(b1 + b2 * 256 + b3 * 65536 + b4 * 16777216, M)
    k = mul(u32(bit.bxor(k, bit.rshift(k, 24))), M)
    h = u32(bit.bxor(mul(h, M), k))
    i = i + 4
    n = n - 4
  end
  if n == 3 then h = u32(bit.bxor(h, s:byte(i + 2) * 65536)) end
  if n >= 2 then h = u32(bit.bxor(h, s:byte(i + 1) * 256)) end
  if n >= 1 then h = mul(u32(bit.bxor(h, s:byte(i))), M) end
  h = mul(u32(bit.bxor(h, bit.rshift(h, 13))), M)
  return u32(bit.bxor(h, bit.rshift(h, 15)))
end
function envoy_on_request(handle)
  local key = (handle:headers():get("x-user-id") or ""):match("^[^,]*"):match("^[ \\t]*(.-)[ \\t]*$")
  if key == "" then
    local address = handle:streamInfo():downstreamRemoteAddress()
    key = address:match("^%[(.*)%]:%d+$") or address:match("^(.*):%d+$") or address
  end
  local b = math.floor(murmur2(key) / {BUCKET_SPAN})
  if b > {BUCKETS - 1} then b = {BUCKETS - 1} end
  handle:headers():replace("{BUCKET_HEADER}", string.format("%d", b))
end
"""


def render_envoy_filter(namespace: str = ISTIO_ROOT_NAMESPACE) -> dict[str, Any]:
    """The EnvoyFilter that writes ``BUCKET_HEADER`` (``BUCKET_LUA``) on every request a sidecar
    sends out and every request a gateway takes, last before the router (``ROUTER_FILTER``,
    which ends every HTTP filter chain): after the authentication and authorization filters
    (jwt_authn, RBAC), so a request they refuse is never bucketed and the ``X-User-ID`` read is
    the one a RequestAuthentication's ``outputClaimToHeaders`` wrote from the verified token,
    not the client's. The router matches the route with the bucket (the Lua filter clears the
    route cache when it changes a header). In the root namespace it applies to every proxy of
    the mesh: a VirtualService routes on the client's side. One for the whole mesh, whatever the
    models."""
    patch = {
        "operation": "INSERT_BEFORE",
        "value": {
            "name": ENVOY_FILTER_NAME,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": BUCKET_LUA},
            },
        },
    }
    hcm = {
        "filterChain": {
            "filter": {"name": "envoy.filters.network.http_connection_manager", "subFilter": {"name": ROUTER_FILTER}}
        }
    }
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {
            "name": ENVOY_FILTER_NAME,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER},
        },
        "spec": {
            "configPatches": [
                {
                    "applyTo": "HTTP_FILTER",
                    "match": {"context": context, "listener": copy.deepcopy(hcm)},
                    "patch": copy.deepcopy(patch),
                }
                for context in ("SIDECAR_OUTBOUND", "GATEWAY")
            ]
        },
    }


def envoy_filter_problem(live: dict[str, Any] | None, namespace: str = ISTIO_ROOT_NAMESPACE) -> str | None:
    """Why ``live`` (the mesh's EnvoyFilter as read, None when there is none) does not write the
    bucket the split routes match (``render_envoy_filter``), None when it does: it is missing,
    or it is not this rollout's (a Lua filter of another version or in another place of the
    chain, such as an earlier version's first, before authentication, or none of ours on a
    sidecar's outbound requests or a gateway's). Without it no proxy writes ``BUCKET_HEADER`` and
    every request falls through to the weighted route: Istio splits per request, users switch
    versions."""
    where = f"EnvoyFilter {namespace}/{ENVOY_FILTER_NAME}"
    install = (
        f"install it as deploy/base/mesh.yaml has it (kubectl apply --server-side --field-manager={FIELD_MANAGER} "
        "-k deploy/overlays/<yours>; one for the whole mesh)"
    )
    if live is None:
        return (
            f"{where} does not exist: without it no proxy writes {BUCKET_HEADER}, and Istio would split the "
            f"candidate's share per request, not per user; {install}"
        )

    def digest(patch: Any) -> str:  # the patch whole: the Lua, where it goes in the chain, on what
        return hashlib.sha256(json.dumps(patch, sort_keys=True).encode()).hexdigest()

    wanted = {str(p["match"]["context"]): digest(p) for p in render_envoy_filter(namespace)["spec"]["configPatches"]}
    found: dict[str, set[str]] = {}
    for patch in _at(live, "spec", "configPatches") or []:
        if _at(patch, "patch", "value", "name") == ENVOY_FILTER_NAME:
            found.setdefault(str(_at(patch, "match", "context")), set()).add(digest(patch))
    wrong = [c for c in wanted if found.get(c) != {wanted[c]}]
    if wrong:
        seen = ", ".join(f"{c}: {', '.join(sorted(d))[:80]}" for c, d in sorted(found.items())) or "none"
        return (
            f"{where} is not this rollout's: its patch on {' and '.join(wrong)} is not the bucket filter this "
            f"version renders (its Lua, last before {ROUTER_FILTER}; sha256 "
            f"{', '.join(f'{c}: {d}' for c, d in wanted.items())}; found {seen}); {install}"
        )
    return None


def _at(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, None where a level is missing or not a mapping (an object as read)."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _any_digits(n: int) -> str:
    return "[0-9]" if n == 1 else f"[0-9]{{{n}}}"


def _digit_ranges(lo: str, hi: str) -> list[str]:
    """Regexes for the digit strings of one width from ``lo`` to ``hi`` (inclusive, lo <= hi)."""
    n = len(lo)
    if lo == hi:
        return [lo]
    if lo == "0" * n and hi == "9" * n:
        return [_any_digits(n)]
    if lo[0] == hi[0]:
        return [lo[0] + r for r in _digit_ranges(lo[1:], hi[1:])]
    rest, first, last = n - 1, int(lo[0]), int(hi[0])
    if rest == 0:
        return [f"[{first}-{last}]"]
    head: list[str] = []
    tail: list[str] = []
    if lo[1:] != "0" * rest:  # lo's first digit: from lo's rest up
        head, first = [lo[0] + r for r in _digit_ranges(lo[1:], "9" * rest)], first + 1
    if hi[1:] != "9" * rest:  # hi's first digit: up to hi's rest
        tail, last = [hi[0] + r for r in _digit_ranges("0" * rest, hi[1:])], last - 1
    middle = [] if first > last else [(str(first) if first == last else f"[{first}-{last}]") + _any_digits(rest)]
    return head + middle + tail


def bucket_range_regex(lo: int, hi: int) -> str:
    """An RE2 regex whose full match is exactly the decimal numbers (no leading zero) in
    [lo, hi), for 0 <= lo < hi <= BUCKETS: a bucket range of ``BUCKET_HEADER``."""
    if not 0 <= lo < hi <= BUCKETS:
        raise ValueError(f"bucket range [{lo}, {hi}): not within [0, {BUCKETS})")
    parts = []
    for width in range(len(str(lo)), len(str(hi - 1)) + 1):
        first = max(lo, 10 ** (width - 1) if width > 1 else 0)
        last = min(hi - 1, 10**width - 1)
        parts += _digit_ranges(str(first), str(last))
    return "|".join(parts)


def bucket_arms(dests: tuple[Destination, ...]) -> list[tuple[Destination, int, int]]:
    """Each destination with weight and its bucket range [lo, hi), as the model server's router
    assigns them (``traffic._pick``): ascending versions, ``weight * BUCKETS / 100`` each."""
    out, edge = [], 0
    for d in dests:
        lo, edge = edge, edge + d.weight * (BUCKETS // 100)
        if d.weight > 0:
            out.append((d, lo, edge))
    return out


def mesh_route_version(policy: TrafficPolicy, key: str) -> str:
    """The version the mesh's default route sends user ``key`` to (``TrafficPolicy.choose`` with
    no rule matched, by the mesh's bucket, ``user_bucket``, instead of the model server's)."""
    b = user_bucket(key)
    return next(d.version for d, lo, hi in bucket_arms(policy.route) if lo <= b < hi)


DEFAULT_ROUTE = "default"  # the VirtualService's route of the policy's default route (no match)


def rule_route_name(headers: dict[str, Any]) -> str:
    """The route name of an unnamed rule matching ``headers`` (as rendered): ``rule-`` and 8 hex
    digits of its match, the same whatever rules come before it (an index moved the name, and
    the platform's settings kept by name, to another rule when one was added), and told from
    a name given (``policy_from_virtual_service`` reads a route of this name as unnamed)."""
    digest = hashlib.sha256(json.dumps(headers, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"rule-{digest[:8]}"


def render_virtual_service(target: IstioTarget, policy: TrafficPolicy, versions: Iterable[str] = ()) -> dict[str, Any]:
    """The policy as a VirtualService, after one pinned route per deployed version (``versions``,
    the DestinationRule's subsets). A rule or the default route that splits between versions is
    one route per version, ``<name>:v<N>``, matching its range of the user's bucket
    (``BUCKET_HEADER``, written by ``render_envoy_filter``'s Lua): a user keeps its version while
    the weights move, as on the model server's router. The route itself follows them, weighted,
    for a request without the bucket (no EnvoyFilter on its proxy): split per request by Envoy.
    Routes are named ``pinned-v<N>``, the rule's name (an unnamed rule's: ``rule_route_name``)
    and ``default``, each once: RouterError for a rule named ``default``, two rules of one name
    or two unnamed rules of one match (the second never matches)."""

    def route(dests: tuple[Destination, ...]) -> list[dict[str, Any]]:
        return [
            {"destination": {"host": target.host, "subset": subset(d.version)}, "weight": d.weight}
            for d in dests
            if d.weight > 0 or len(dests) == 1
        ]

    def mirrored(entry: dict[str, Any], only: str | None) -> dict[str, Any]:
        # The mirror is a route's (Envoy's request_mirror_policies). A version's route (``only``)
        # copies its users' requests unless it is the mirror's own version, as the model
        # server's router skips those. A weighted route's copies include the share it sends to
        # the mirror's own subset; the shadow audit leaves those pairs out (shadow_pairs'
        # self_pairs) and candidate_replicas sizes the candidate for them.
        m = policy.mirror
        if m is not None and only != m.version:
            entry["mirror"] = {"host": target.host, "subset": subset(m.version)}
            entry["mirrorPercentage"] = {"value": m.percent}
        return entry

    def routes(name: str, headers: dict[str, Any] | None, dests: tuple[Destination, ...]) -> list[dict[str, Any]]:
        match = {"match": [{"headers": headers}]} if headers else {}
        weighted = {"name": name, **match, "route": route(dests)}
        arms = bucket_arms(dests)
        if len(arms) < 2:  # one version takes it all (the others at weight 0): its route only
            return [mirrored(weighted, arms[0][0].version)]
        return [
            *(
                mirrored(
                    {
                        "name": f"{name}{ARM_SEPARATOR}{subset(d.version)}",
                        "match": [
                            {
                                "headers": {
                                    **copy.deepcopy(headers or {}),
                                    BUCKET_HEADER: {"regex": bucket_range_regex(lo, hi)},
                                }
                            }
                        ],
                        "route": [{"destination": {"host": target.host, "subset": subset(d.version)}}],
                    },
                    d.version,
                )
                for d, lo, hi in arms
            ),
            mirrored(weighted, None),
        ]

    http = [pinned_route(target, v) for v in sorted(set(versions), key=int)]
    named: dict[str, int] = {}
    for i, rule in enumerate(policy.rules):
        if (rule.name or "").startswith(PINNED_PREFIX):
            raise RouterError(f"traffic rule {rule.name!r}: names starting with {PINNED_PREFIX!r} are reserved")
        if rule.name == DEFAULT_ROUTE:
            raise RouterError(
                f"traffic rule {i} {rule.name!r}: {DEFAULT_ROUTE!r} is the name of the policy's default route in the "
                "VirtualService; give the rule another name"
            )
        headers = {h: {m.kind: m.value} for h, m in rule.headers}
        name = rule.name or rule_route_name(headers)
        if name in named:
            j = named[name]
            raise RouterError(
                f"traffic rules {j} and {i} match the same headers ({json.dumps(headers, sort_keys=True)[:200]}): the "
                "second never matches; remove it"
                if rule.name is None and policy.rules[j].name is None
                else f"traffic rules {j} and {i} are both named {name!r} in the VirtualService (an unnamed rule's route "
                "is named by its match): a route's name must be one route's; rename one"
            )
        named[name] = i
        http += routes(name, headers, rule.route)
    http += routes(DEFAULT_ROUTE, None, policy.route)
    spec: dict[str, Any] = {"hosts": target.hosts or [target.host], "http": http}
    if target.gateways:
        spec["gateways"] = target.gateways
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {
            "name": target.name,
            "namespace": target.namespace,
            "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER},
        },
        "spec": spec,
    }


# An HTTP route's fields the traffic policy sets (Istio's deprecated ``mirrorPercent`` read as its
# mirror's share, ``mirror_share``, and never written); the others (timeout, retries, fault,
# corsPolicy, headers, rewrite...) are the platform's.
POLICY_ROUTE_FIELDS = frozenset({"name", "match", "route", "mirror", "mirrorPercentage", "mirrorPercent"})


def splits(vs: dict[str, Any]) -> bool:
    """Whether a rendered VirtualService splits a route by the bucket (``bucket_arms``): what the
    mesh's EnvoyFilter must write for it (``envoy_filter_problem``)."""
    return any(ARM_SEPARATOR in str(route.get("name")) for route in vs["spec"]["http"])


def with_platform_fields(rendered: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """``rendered`` (a VirtualService spec) with what the platform set beside the policy's
    routes in ``live``: the spec's other fields (``gateways``, ``exportTo``, ``tcp``...), and on
    each HTTP route the fields the policy does not set, from the live route of its name, or
    for a route new to the VirtualService (a rule's, a new version's pinned route) from the
    live ``default`` route. A rollout, its rollback and its promotion then keep a route's
    timeout and retries: the spec's ``http`` is one list, written whole."""
    routes = {r.get("name"): r for r in live.get("http") or [] if isinstance(r, dict)}

    def platform(entry: dict[str, Any]) -> dict[str, Any]:
        name = str(entry.get("name"))
        source = routes.get(name) or routes.get(name.partition(ARM_SEPARATOR)[0]) or routes.get(DEFAULT_ROUTE) or {}
        return {k: v for k, v in source.items() if k not in POLICY_ROUTE_FIELDS}

    http = [{**platform(entry), **entry} for entry in rendered["http"]]
    return {**{k: v for k, v in live.items() if k != "http"}, **rendered, "http": http}


def with_platform_subsets(rendered: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """``rendered`` (a DestinationRule spec) with what the platform set beside the subsets in
    ``live``: the spec's other fields (``trafficPolicy``, ``exportTo``...), and on each subset the
    fields the rollout does not set (its own ``trafficPolicy``), from the live subset of its name."""
    subsets = {s.get("name"): s for s in live.get("subsets") or [] if isinstance(s, dict)}
    merged = [{**subsets.get(s.get("name"), {}), **s} if isinstance(s, dict) else s for s in rendered["subsets"]]
    return {**{k: v for k, v in live.items() if k != "subsets"}, **rendered, "subsets": merged}


def with_live_metadata(body: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the labels and annotations of ``live`` (the object as read) that the rollout
    owns (``rollouts_view``) beside its own (its own win), and without those another field
    manager owns (``others_fields``), whatever the rollout would set: a forced apply of another
    value took the field and its value over (Helm's ``app.kubernetes.io/managed-by: Helm``, by
    which Helm knows its release's objects). deploy/'s overlay is applied with the rollout's field
    manager, so what it set there (kustomize's commonLabels and commonAnnotations: a team label
    an admission policy requires, a GitOps tool's tracking label) is the rollout's to the API
    server: an apply that left it out removed it."""
    meta, view, others = body["metadata"], rollouts_view(live), others_fields(live)
    for key in ("labels", "annotations"):
        merged = {**(((view.get("metadata") or {}).get(key)) or {}), **(meta.get(key) or {})}
        merged = {k: v for k, v in merged.items() if ("f:metadata", f"f:{key}", f"f:{k}") not in others}
        if merged:
            meta[key] = merged
        else:
            meta.pop(key, None)
    return body


# The fields of the mesh's objects the rollout writes whole, whoever else owns them: Istio's CRDs
# mark no list a map, so a list is one field to server-side apply (atomic), and a route's or a
# subset's own settings go with it (``with_platform_fields``, ``with_platform_subsets``).
WRITTEN_WHOLE = frozenset({("f:spec", "f:http"), ("f:spec", "f:hosts"), ("f:spec", "f:subsets")})


def others_fields(live: dict[str, Any]) -> set[tuple[str, ...]]:
    """The labels, annotations and spec fields of ``live`` that a field manager other than the
    rollout's apply owns (its ``metadata.managedFields``, FieldsV1 paths down to a field that is
    not a map: ``("f:spec", "f:trafficPolicy", "f:tls", "f:mode")``); into a keyed list's items
    (a Deployment's containers, env, ports, volumes: ``'k:{"name":"log-shipper"}'``, as server-side
    apply keys them), an atomic list or a set (``v:`` items alone) whole; none where the server
    records no managers. What cannot be read (a key server-side apply does not write there, a
    child that is not a map) is taken for nobody's: left in the rollout's applies as it is, never
    the field above it whole (a pod template's containers); a warning names the manager and path."""
    out: set[tuple[str, ...]] = set()

    def walk(node: dict[str, Any], path: tuple[str, ...], manager: Any) -> None:
        children = {k: v for k, v in node.items() if k != "."}
        if not children or all(k.startswith("v:") for k in children):  # a leaf, a set's items
            out.add(path)
            return
        for key, child in children.items():
            if key.startswith(("f:", "k:")) and isinstance(child, dict):
                walk(child, (*path, key), manager)
            else:
                log.warning(
                    "managedFields of %r: %s cannot be read, taken for nobody's", manager, ".".join((*path, key))[:300]
                )

    for entry in (live.get("metadata") or {}).get("managedFields") or []:
        if not isinstance(entry, dict) or (entry.get("manager"), entry.get("operation")) == (FIELD_MANAGER, "Apply"):
            continue
        fields: dict[str, Any] = entry["fieldsV1"] if isinstance(entry.get("fieldsV1"), dict) else {}
        meta: dict[str, Any] = fields["f:metadata"] if isinstance(fields.get("f:metadata"), dict) else {}
        for key in ("f:labels", "f:annotations"):
            if isinstance(meta.get(key), dict):
                for name in meta[key]:
                    if name.startswith("f:"):
                        out.add(("f:metadata", key, name))
        if isinstance(fields.get("f:spec"), dict):
            walk(fields["f:spec"], ("f:spec",), entry.get("manager"))
    return {p for p in out if len(p) > 1 and p[:2] not in WRITTEN_WHOLE}


def rollouts_view(live: dict[str, Any]) -> dict[str, Any]:
    """``live`` without what another field manager owns (``others_fields``): what the rollout
    carries over from the live object into its forced applies (labels and annotations, the
    spec's settings beside its routes and subsets). A field it sent along became its own too
    (a co-owner's), and the platform that set it (``kubectl``, Argo CD) could then never remove
    it and got a 409 changing it; left out, server-side apply keeps it as its owner has it. In a
    keyed list (``k:``) an item keeps its key; one left with its key alone (another manager's
    sidecar) goes. A server that records no managers: ``live`` whole, as the rollout copied it
    before."""
    view = copy.deepcopy(live)
    for path in sorted(others_fields(live), key=len, reverse=True):
        _drop(view, path)
    return view


def _drop(node: Any, path: tuple[str, ...]) -> bool:
    """The field at ``path`` (FieldsV1 keys) removed from ``node``; a map or list it leaves empty
    removed with it (never a ``spec``), as a keyed list's item it leaves with its key alone.
    Whether anything was removed."""
    key, rest = path[0], path[1:]
    if key.startswith("k:"):
        try:
            keys = json.loads(key[2:])
        except (ValueError, RecursionError):  # (a key nested past the recursion limit)
            return False
        items = node if isinstance(node, list) and isinstance(keys, dict) else []
        at = next((i for i, x in enumerate(items) if isinstance(x, dict) and keys.items() <= x.items()), None)
        if at is None or not rest or (len(rest) == 1 and rest[0][2:] in keys):  # (its key stays)
            return False
        dropped = _drop(items[at], rest)
        if dropped and set(items[at]) <= set(keys):
            items.pop(at)
        return dropped
    name = key[2:]
    if not key.startswith("f:") or not isinstance(node, dict) or name not in node:
        return False
    if not rest:
        node.pop(name)
        return True
    dropped = _drop(node[name], rest)
    if dropped and node[name] in ({}, []) and key != "f:spec":
        node.pop(name)
    return dropped


def selects_version(subset_: dict[str, Any], version: str) -> bool:
    """Whether a DestinationRule subset selects version ``version``'s pods (its label ``version``,
    as ``render_destination_rule`` writes it), whatever else it narrows them by."""
    return (subset_.get("labels") or {}).get("version") == version


def routed_versions(vs: dict[str, Any]) -> set[str]:
    """Every version a VirtualService (as read) sends anything to, by its subset ``v<N>``: a
    route's destination or a mirror (``mirror``, ``mirrors``) in any of its HTTP routes (pinned,
    the platform's, the policy's), and a destination of its TCP and TLS routes."""
    spec = vs.get("spec") or {}
    used: set[str] = set()
    for kind in ("http", "tcp", "tls"):
        for route in spec.get(kind) or []:
            if not isinstance(route, dict):
                continue
            entries = [*(route.get("route") or []), *(route.get("mirrors") or [])]
            targets = [e.get("destination") for e in entries if isinstance(e, dict)] + [route.get("mirror")]
            for target in targets:
                name = str(target.get("subset", "")) if isinstance(target, dict) else ""
                if VERSION_SUBSET.fullmatch(name):
                    used.add(name.removeprefix("v"))
    return used


_ROLLOUTS_ROUTE = re.compile(
    rf"{re.escape(PINNED_PREFIX)}[0-9]{{1,19}}|{re.escape(DEFAULT_ROUTE)}(?:{re.escape(ARM_SEPARATOR)}v[0-9]{{1,19}})?"
)


def _rollouts_route(name: Any) -> bool:
    """Whether an HTTP route's name is one the rollout gives its routes: a version's pinned
    route, the default route or one of its arms (``<route>:v<N>``)."""
    return bool(_ROLLOUTS_ROUTE.fullmatch(str(name or "")))  # (a platform's "pinned-vip", "default:debug" are none)


def render_destination_rule(target: IstioTarget, versions: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {
            "name": target.name,
            "namespace": target.namespace,
            "labels": {"app.kubernetes.io/managed-by": FIELD_MANAGER},
        },
        "spec": {
            "host": target.host,
            "subsets": [{"name": subset(v), "labels": {"version": v}} for v in sorted(set(versions), key=int)],
        },
    }


def mirror_share(route: dict[str, Any]) -> float:
    """The percent of its requests a mirrored HTTP route copies, as Envoy gets it from istiod: its
    ``mirrorPercentage``, else Istio's deprecated integer ``mirrorPercent`` (a VirtualService
    written before Istio 1.9), else all of them. The rollout writes ``mirrorPercentage`` only
    (``POLICY_ROUTE_FIELDS``: a live ``mirrorPercent`` is not carried into its writes)."""
    if route.get("mirrorPercentage") is not None:
        return float(route["mirrorPercentage"].get("value", 100.0))
    return float(route["mirrorPercent"]) if route.get("mirrorPercent") is not None else 100.0


# A match's fields that select nothing (a name for stats, a flag for a uri match it lacks): every
# other field of Istio's HTTPMatchRequest but ``headers`` is a condition no traffic policy holds.
MATCH_LABELS = frozenset({"name", "statPrefix", "ignoreUriCase"})


def policy_from_virtual_service(vs: dict[str, Any]) -> TrafficPolicy:
    """Read back what ``render_virtual_service`` wrote (routes by subset name ``v<version>``), or a
    VirtualService edited by hand, as Envoy evaluates its HTTP routes: in order, the first that
    matches wins, so the first route without a match is the default route and the routes after
    it are never reached (not read). The pinned routes and a split's version routes are the
    rendering's own. ValueError, naming the route, for what a traffic policy cannot hold: a
    route matching on more than headers (a uri, a method, query parameters, ``withoutHeaders``)
    or on one of several alternatives, no route without a match (Istio answers 404 to what no
    rule matches), a route that sends nowhere (a redirect), or routes that mirror differently
    (the policy's mirror is every route's but that to the mirror's own version)."""

    def label(entry: dict[str, Any], i: int) -> str:
        return f"route {entry['name']!r}" if entry.get("name") else f"route {i}"

    def dests(entry: dict[str, Any], i: int) -> list[dict[str, Any]]:
        if not entry.get("route"):
            raise ValueError(f"{label(entry, i)} sends to no version (no route destinations)")
        return [
            {"version": r["destination"]["subset"].removeprefix("v"), "weight": r.get("weight", 100)}
            for r in entry["route"]
        ]

    def headers_of(entry: dict[str, Any], i: int) -> dict[str, Any] | None:
        """The headers the route matches, None for a route that matches every request."""
        matches = entry.get("match") or []
        if len(matches) > 1:
            raise ValueError(
                f"{label(entry, i)} has {len(matches)} alternative matches: a traffic rule matches one set of "
                "headers; make it one route a match"
            )
        match = matches[0] if matches else {}
        others = sorted(k for k in match if k not in MATCH_LABELS | {"headers"})
        if others:
            raise ValueError(
                f"{label(entry, i)} matches on {', '.join(others)}: a traffic rule matches headers only "
                "(exact, prefix or regex)"
            )
        return match.get("headers") or None

    raw: dict[str, Any] = {"rules": []}
    mirrors: dict[str, tuple[str, float] | None] = {}  # each route's mirror (version, percent)
    routed: dict[str, set[str]] = {}  # each route's versions
    for i, entry in enumerate(vs["spec"].get("http", [])):
        name = str(entry.get("name") or "")
        if name.startswith(PINNED_PREFIX):
            continue  # not the policy's: the routes of requests that name their version
        if ARM_SEPARATOR in name:
            continue  # a version's bucket range of the weighted route that follows it
        where = label(entry, i)
        route = dests(entry, i)
        routed[where] = {d["version"] for d in route if d["weight"]}
        mirror = entry.get("mirror")
        mirrors[where] = (str(mirror["subset"]).removeprefix("v"), mirror_share(entry)) if mirror else None
        headers = headers_of(entry, i)
        if headers is None:
            raw["route"] = route
            break  # every request stops here: the routes after it are never reached
        rule = {"match": {"headers": headers}, "route": route}
        if name and name != rule_route_name(headers):
            rule["name"] = name
        raw["rules"].append(rule)
    if "route" not in raw:
        raise ValueError(
            "no route without a match (the default route): Istio answers 404 to a request no route matches, "
            "which a traffic policy does not say"
        )
    kinds = {m for m in mirrors.values() if m is not None}
    unmirrored = [w for w, m in mirrors.items() if m is None and routed[w] - {v for v, _ in kinds}]
    if len(kinds) > 1 or (kinds and unmirrored):  # (a route to the mirror's version only is not mirrored)
        said = ", ".join(
            f"{where} " + (f"{m[1]:g}% to version {m[0]}" if m else "mirrors nothing")
            for where, m in sorted(mirrors.items())
        )
        raise ValueError(f"the routes mirror differently ({said}): a traffic policy mirrors every route alike")
    if kinds:
        version, percent = kinds.pop()
        raw["mirror"] = {"version": version, "percent": percent}
    if not raw["rules"]:
        del raw["rules"]
    return TrafficPolicy.from_dict(raw)


@dataclass
class IstioRouter:
    """The traffic policy as Istio objects, applied through the Kubernetes API (server-side
    apply, retried on conflicts): one subset per version, the policy's rules and weights."""

    target: IstioTarget
    versions: list[str]  # every version that may be routed to: one subset each
    api_client: Any = None  # kubernetes.client.ApiClient; from kubeconfig / in-cluster when None
    mirrors: MirrorLog | None = None  # where each mirror change applied is recorded (the shadow audit's)

    def _api(self) -> Any:
        from kubernetes import client

        if self.api_client is None:
            self.api_client = kube_api_client()
        return client.CustomObjectsApi(self.api_client)

    def _get(self, plural: str, namespace: str | None = None, name: str | None = None) -> dict[str, Any] | None:
        """The target's object of ``plural`` (or ``name`` in ``namespace``), None when there is none."""
        from kubernetes.client.exceptions import ApiException

        own = name is None
        name = name or self.target.name
        version = "v1alpha3" if plural == "envoyfilters" else "v1"
        try:
            live = self._api().get_namespaced_custom_object(
                "networking.istio.io", version, namespace or self.target.namespace, plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise api_error(f"GET {plural}/{name}", exc) from None
        if own and (other := self._other_service(plural, live)):
            raise RouterError(
                f"{ISTIO_KINDS[plural]} {self.target.namespace}/{name} is {other}'s, not Service {self.target.host}'s "
                "(two models given one VirtualService: give each its own istio.name, in models.<model>.istio): "
                "the rollout reads and writes no other Service's routes"
            )
        return live

    def _other_service(self, plural: str, live: Any) -> str | None:
        """The host of another Service whose versions (subsets ``v<N>``) the routes of the
        target's VirtualService that the rollout names (``pinned-v<N>``, ``default`` and its
        arms ``default:v<N>``: another model's, were it another's) send HTTP requests to, or that
        its DestinationRule is for; None when none is (a shape the rollout does not read is
        refused where it is read). A route of the platform's to another Service, whatever its
        subsets (a debug route, a mirror, an audit's ``mirrors``, a TCP route), never holds back a
        rollback (review s54-1, s54-2, s54-3); the DestinationRule, of the VirtualService's name,
        names the Service it is for whatever its routes."""
        spec = live.get("spec") if isinstance(live, dict) else None
        if not isinstance(spec, dict):
            return None
        if plural == "destinationrules":
            hosts = [spec.get("host")]
        elif plural == "virtualservices":
            routes = [r for r in _listed(spec.get("http")) if isinstance(r, dict) and _rollouts_route(r.get("name"))]
            sent = [d.get("destination") for r in routes for d in _listed(r.get("route")) if isinstance(d, dict)]
            hosts = [
                to.get("host")
                for to in sent
                if isinstance(to, dict) and VERSION_SUBSET.fullmatch(str(to.get("subset", "")))
            ]
        else:
            return None
        return next((str(h)[:200] for h in hosts if h is not None and not self.target.is_own(h)), None)

    def _apply(
        self,
        plural: str,
        render: Callable[[dict[str, Any]], dict[str, Any] | None],
        read: dict[str, Any] | None = None,
    ) -> bool:
        """Server-side apply of ``render(live)`` (None: nothing to apply) when its spec differs
        from ``live``'s, sent with ``live``'s resourceVersion. ``live`` is the object as read at
        each try (the first: ``read``, the object as the caller read it, where given; its
        resourceVersion refuses the write should it have changed since): one the object changed
        under (409: ``Conflicted``, within ``settled``'s tries) reads it again and renders again, so that
        what another writer changed meanwhile (a route's timeout, a host) is kept, not
        overwritten by a body rendered from the object before it. Never creates: the mesh's
        objects are the platform's (deploy/'s overlay), and an apply that would create one is
        refused here rather than by the API server's RBAC (a 403). A write whose answer left
        unknown whether it was served (a 500, 502 or 504, or none) is settled by reading the
        object back (``settled``)."""
        from kubernetes.client.exceptions import ApiException

        what = f"apply {plural}/{self.target.name}"

        given = read  # the first try's object; later tries read it again

        def attempt(doubted: int) -> bool:  # (after a write in doubt, the object as wanted is that write's)
            nonlocal given
            live = given if given is not None else self._get(plural)
            given = None
            if live is None:
                raise RouterError(self._missing(ISTIO_KINDS[plural]))
            view = rollouts_view(live)  # what another manager owns stays out of the apply, its own
            obj = render(view)
            if obj is None:
                return doubted > 0
            body = with_live_metadata(copy.deepcopy(obj), live)
            validate_istio(body)
            if view.get("spec") == body["spec"] and _annotations(view) | _annotations(body) == _annotations(view):
                return doubted > 0  # nothing to change: no write
            body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
            with unsettled():
                try:
                    self._api().patch_namespaced_custom_object(
                        "networking.istio.io",
                        "v1",
                        self.target.namespace,
                        plural,
                        self.target.name,
                        body,
                        field_manager=FIELD_MANAGER,
                        force=True,
                        _content_type="application/apply-patch+yaml",
                    )
                    return True
                except ApiException as exc:
                    if exc.status != 409:
                        raise api_error(what, exc) from None
            raise Conflicted(Contended(f"{what}: {plural}/{self.target.name} changed while applying"))

        return settled(attempt)

    def _filter_problem(self) -> str | None:
        """``envoy_filter_problem`` of the mesh's bucket filter, read in the target's root namespace."""
        root = self.target.root_namespace
        return envoy_filter_problem(self._get("envoyfilters", root, ENVOY_FILTER_NAME), root)

    def _missing(self, kind: str) -> str:
        return (
            f"{kind} {self.target.namespace}/{self.target.name} does not exist: the rollout changes its routes and "
            "subsets, it does not create it (apply the model's manifests, deploy/overlays, first)"
        )

    def reconcile(self) -> None:
        """The DestinationRule with a subset for every version (and what the platform set beside
        them, ``with_platform_subsets``), the VirtualService there. A version's subset
        (``VERSION_SUBSET``) the run does not route to is dropped; the platform's own subsets
        (another VirtualService may route to them), and those of versions a route of the
        VirtualService sends to (``routed_versions``: the platform's TCP route, its ``mirrors``),
        are kept after the versions'."""
        vs = self._get("virtualservices")
        if vs is None:
            raise RouterError(self._missing("VirtualService"))
        routed = {subset(v) for v in routed_versions(vs)}

        def render(live: dict[str, Any]) -> dict[str, Any]:
            body = render_destination_rule(self.target, self.versions)
            ours = {s["name"] for s in body["spec"]["subsets"]}
            body["spec"]["subsets"] += [
                s
                for s in (live.get("spec") or {}).get("subsets") or []
                if isinstance(s, dict)
                and s.get("name") not in ours
                and (s.get("name") in routed or not VERSION_SUBSET.fullmatch(str(s.get("name"))))
            ]
            body["spec"] = with_platform_subsets(body["spec"], live.get("spec") or {})
            return body

        self._apply("destinationrules", render)

    def set_routes(self, policy: TrafficPolicy) -> bool:
        """The policy as the VirtualService, with what the platform set beside its routes
        (``with_platform_fields``; its hosts too, the Service's added where missing, unless the
        target names its own; none on a delegate, a VirtualService without hosts), once the DestinationRule has a subset for every version it
        names (make before break: a route to a subset Envoy does not know is a 503). One that Istio
        or the API server would refuse (``validate_istio``) is refused before anything is written."""
        vs = render_virtual_service(self.target, policy, self.versions)
        live = self._get("virtualservices")
        if live is None:
            raise RouterError(self._missing("VirtualService"))
        if splits(vs):
            problem = self._filter_problem()
            if problem:
                raise RouterError(f"{problem}. No traffic was moved")

        def render(live: dict[str, Any]) -> dict[str, Any]:
            spec = with_platform_fields(vs["spec"], live.get("spec") or {})
            if not self.target.hosts:  # the platform's (a host its gateway serves), and the Service's
                hosts = [h for h in (live.get("spec") or {}).get("hosts") or [] if isinstance(h, str)]
                if not hosts:  # a delegate (a root VirtualService hands it requests): with hosts, a root itself
                    del spec["hosts"]
                elif self.target.host not in hosts:
                    spec["hosts"] = [*hosts, self.target.host]
                else:
                    spec["hosts"] = hosts
            return {**vs, "spec": spec}

        validate_istio(render(live))  # refused before anything is written, the DestinationRule too
        self._add_subsets(policy.versions() | set(self.versions))
        recorded = self._record_mirror(policy, applied=False)
        changed = self._apply("virtualservices", render, live)  # (not read again: its resourceVersion guards it)
        if not recorded:
            self._record_mirror(policy, applied=True)
        return changed

    def _record_mirror(self, policy: TrafficPolicy, applied: bool) -> bool:
        """``policy``'s mirror recorded in ``mirrors`` when it is not the last recorded: before the
        VirtualService is written when it mirrors as much or more (a record that cannot be written
        moves no traffic: RouterError), after when less (the routes moved: a warning). A record
        never says less than Envoy mirrors, so the audit never takes a mirror for none. Whether
        it is recorded."""
        if self.mirrors is None:
            return True
        m = policy.mirror
        version, percent = (m.version, m.percent) if m is not None else (None, 0.0)
        try:
            last = self.mirrors.last()
            if last is not None and (last.version, last.percent) == (version if percent else None, percent):
                return True
            if not applied and (percent == 0 or (last is not None and percent < last.percent)):
                return False
            self.mirrors.record(version, percent)
            return True
        except OSError as exc:
            if not applied and percent > 0:
                raise RouterError(
                    f"the mirror of {percent:g}% to version {version} could not be recorded in "
                    f"{self.mirrors.folder} (the shadow audit reads it there): {str(exc)[:300]}. No traffic was moved"
                ) from None
            if applied:
                log.warning("the mirror now %g%% was not recorded in %s: %s", percent, self.mirrors.folder, exc)
                return True
            return False

    def serving_problem(self, policy: TrafficPolicy) -> str | None:
        """Why the mesh does not serve ``policy`` as ``set_routes`` applied it, None when it does:
        the VirtualService routes otherwise (edited by hand, or not one the rollout reads), the
        DestinationRule lacks a subset it routes to (Envoy answers that share 503), or, with a
        split, the bucket EnvoyFilter is gone or changed (``envoy_filter_problem``: Istio splits
        per request, not per user). Two GETs, three with a split; one the API server left without an
        answer or failed (``TRANSIENT``) is raised as it came: nothing read says the mesh changed."""
        where = f"VirtualService {self.target.namespace}/{self.target.name}"
        try:
            live = self.get_routes()
        except TRANSIENT:
            raise
        except RouterError as exc:
            return str(exc)
        if live != policy:
            return (
                f"{where} routes {json.dumps(live.to_dict(), sort_keys=True)[:300]}, not the stage's "
                f"{json.dumps(policy.to_dict(), sort_keys=True)[:300]} (changed outside the rollout)"
            )
        dr = self._get("destinationrules")
        if dr is None:
            return self._missing("DestinationRule")
        subsets = {s.get("name"): s for s in (dr.get("spec") or {}).get("subsets") or [] if isinstance(s, dict)}
        lacking = sorted(subset(v) for v in policy.versions() if subset(v) not in subsets)
        if lacking:
            return (
                f"DestinationRule {self.target.namespace}/{self.target.name} has no subset {', '.join(lacking)}, "
                f"which {where} routes to: Envoy answers that share 503"
            )
        for v in sorted(policy.versions(), key=int):
            if not selects_version(subsets[subset(v)], v):
                return (
                    f"DestinationRule {self.target.namespace}/{self.target.name}'s subset {subset(v)} selects "
                    f"{json.dumps(subsets[subset(v)].get('labels'), sort_keys=True)[:200]}, not version {v}'s pods "
                    f'(version: "{v}"), which {where} routes to (edited outside the rollout)'
                )
        if splits(render_virtual_service(self.target, policy, self.versions)):
            return self._filter_problem()
        return None

    def _add_subsets(self, versions: set[str]) -> None:
        """The DestinationRule's subsets as they are, and one for each of ``versions`` it lacks; a
        version's subset that selects other pods (``selects_version``: relabelled by hand) takes
        its version's labels back. None is removed here: only ``reconcile`` drops subsets, before
        a rollout routes to any."""

        def render(live: dict[str, Any]) -> dict[str, Any] | None:
            subsets = list((live.get("spec") or {}).get("subsets") or [])
            have = {s.get("name"): s for s in subsets if isinstance(s, dict)}
            missing = sorted((v for v in versions if subset(v) not in have), key=int)
            wrong = {subset(v): v for v in versions if subset(v) in have and not selects_version(have[subset(v)], v)}
            if not missing and not wrong:
                return None
            subsets = [
                {**s, "labels": {"version": wrong[s["name"]]}} if isinstance(s, dict) and s.get("name") in wrong else s
                for s in subsets
            ]
            body = render_destination_rule(self.target, missing)
            body["spec"]["subsets"] = subsets + body["spec"]["subsets"]
            body["spec"] = with_platform_subsets(body["spec"], live.get("spec") or {})
            return body

        self._apply("destinationrules", render)

    def versions_in_use(self) -> set[str]:
        """Every version the VirtualService sends anything to (``routed_versions``), and every version the DestinationRule's subsets select (their ``version`` label: a subset of
        the platform's another VirtualService may route to). What no retired version's deletion
        may take (``VersionDeployments.prune``)."""
        vs, dr = self._get("virtualservices"), self._get("destinationrules")
        if vs is None or dr is None:
            raise RouterError(self._missing("VirtualService" if vs is None else "DestinationRule"))
        used = routed_versions(vs)
        for s in (dr.get("spec") or {}).get("subsets") or []:
            version = (s.get("labels") or {}).get("version") if isinstance(s, dict) else None
            if version is not None:
                used.add(str(version))
        return used

    def get_routes(self) -> TrafficPolicy:
        """RouterError for a VirtualService that is not the rollout's rendering (edited by hand: a
        route without a subset, a subset not named ``v<version>``): it names no policy to read."""
        live = self._get("virtualservices")
        if live is None:
            raise RouterError(self._missing("VirtualService"))
        try:
            return policy_from_virtual_service(live)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # PolicyError is a ValueError
            raise RouterError(
                f"VirtualService {self.target.namespace}/{self.target.name} is not one the rollout reads (each route "
                f"to a subset v<version>, as deploy/base/mesh.yaml): {type(exc).__name__} {str(exc)[:200]}"
            ) from None


def _listed(value: object) -> list[Any]:
    """``value`` where it is a list, else none (a field of an object edited by hand)."""
    return value if isinstance(value, list) else []


def kube_api_client() -> Any:
    """The cluster's API client (``with_retries``): the in-cluster service account, else the
    kubeconfig (``KUBECONFIG``, ``~/.kube/config``); RouterError with neither."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise RouterError(
                f"no cluster to reach: no in-cluster service account, and no kubeconfig ({exc})"
            ) from None
    return with_retries(client.ApiClient())


def routes_to(policy: TrafficPolicy, version: str) -> bool:
    """Whether ``policy`` sends ``version`` any request (by weight, default route or rule) or any
    mirrored copy."""
    routes = [policy.route, *(rule.route for rule in policy.rules)]
    routed = any(d.version == version and d.weight > 0 for route in routes for d in route)
    return routed or (policy.mirror is not None and policy.mirror.version == version)


_EDIT_POLICY = (
    "apply the policy without it: `rolloutctl mesh apply --backend local|istio --policy FILE ...`; "
    "`rolloutctl mesh get --backend local ...` prints the one in effect"
)


def not_steady(policy: TrafficPolicy, baseline: str) -> str | None:
    """Why ``policy`` is not where a rollout against ``baseline`` starts (all of the traffic on
    the baseline, no mirror, no header rules: each stage sets the whole policy, so anything else
    would be lost, and a rollback would "restore" a baseline that did not serve), or None."""
    if policy.rules:
        names = ", ".join(rule.name or "unnamed" for rule in policy.rules[:5])
        return (
            f"the traffic policy has {len(policy.rules)} header rule(s) ({names}): a rollout sets the whole "
            f"policy and would drop them; remove them first ({_EDIT_POLICY})"
        )
    if policy.mirror is not None:
        return (
            f"the traffic policy mirrors to version {policy.mirror.version}: a rollout in progress? "
            f"A rollout sets its own mirror; remove that one first ({_EDIT_POLICY})"
        )
    serving = [d for d in policy.route if d.weight > 0]
    if [d.version for d in serving] != [baseline]:
        now = ", ".join(f"version {d.version} {d.weight}%" for d in serving) or "no version"
        return (
            f"baseline version {baseline} is not what serves now ({now}): roll out against the version that "
            "takes all of the traffic, or end the rollout in progress first (`rolloutctl status --model MODEL` "
            "names it; `rolloutctl abort --spec ITS_SPEC ...` rolls it back)"
        )
    return None


def mid_rollout_against(policy: TrafficPolicy, baseline: str) -> bool:
    """Whether ``policy`` is what a rollout against ``baseline`` leaves mid-stage: the baseline
    and one other version in the route, the baseline the larger share (a stage under 50%: at
    50% or more which was the baseline cannot be told), no header rules, any mirror to the
    other version."""
    weights = {d.version: d.weight for d in policy.route if d.weight > 0}
    others = [v for v in weights if v != baseline]
    return (
        not policy.rules
        and len(others) == 1
        and weights.get(baseline, 0) > weights[others[0]]
        and (policy.mirror is None or policy.mirror.version == others[0])
    )


def wait_unrouted(router: Router, version: str, drain_s: float, timeout_s: float = 120.0, every_s: float = 1.0) -> None:
    """Return once the routes read back from the mesh send ``version`` nothing (``routes_to``),
    and ``drain_s`` later: a written VirtualService takes seconds to reach every Envoy, and the
    requests already sent to the version must finish before its pods go. RouterError when the
    routes still send it traffic after ``timeout_s`` (another writer, a failed write)."""
    deadline = time.monotonic() + timeout_s
    while routes_to(policy := router.get_routes(), version):
        if time.monotonic() > deadline:
            raise RouterError(f"the mesh still routes to version {version} after {timeout_s:g} s: {policy.to_dict()}")
        time.sleep(every_s)
    time.sleep(drain_s)


def mirror_probes(percent: float, miss: float = 1e-6) -> int:
    """How many requests Envoy must route for one of them at least to be mirrored at ``percent``
    but with probability ``miss``: Envoy samples its mirror per request at random (the request id
    plays no part), so at 5% one request in 20 is copied, and 15 may all be missed."""
    if not 0 < percent <= 100:
        raise ValueError(f"mirror percent {percent!r}: above 0, at most 100")
    if percent == 100:
        return 1
    return math.ceil(math.log(miss) / math.log1p(-percent / 100))


# The API server's answers to a request it did not serve (API Priority and Fairness' 429, a 503):
# sent again whatever the method. Those to one it may have served (a 500 of etcd timing out, a
# proxy's 502 or 504) are sent again for a read only: the writes here are compare-and-swaps (a
# resourceVersion, a Lease's holder) or applies that a second send would take for another
# writer's: the rollout's writes settle such an answer by reading the object back (``settled``),
# and a failed rollback is tried again by the teardown, then the failure callback.
UNSERVED = frozenset({429, 503})
MAYBE_SERVED = frozenset({500, 502, 504})
# Of those, the answers sent before the write's end: the API server's own timeout (504: the
# request goes on inside it) and a proxy's error (502: its upstream perhaps mid-write). Such a
# write, like one left without an answer, may commit after it: a read back at once that finds it
# not in place does not show it was not written (``settled``).
MAY_LAND = frozenset({502, 504})
READS = frozenset({"GET", "HEAD"})
# Each call's time limit (connect, read) where the caller sets none: the kubernetes client sends
# none of its own, and a connection the API server accepted and never answered (a hung server,
# a half-open connection) blocked the task, its teardown too, for good.
API_TIMEOUT_S = (10.0, 60.0)
# The longest a 429's or a 503's Retry-After is waited before the call is sent again: API Priority
# and Fairness asks for 1 s; an hour asked by a proxy before the API server (urllib3 waits up to 6
# hours) held the task, its rollback too, with the routes mid-rollout.
MAX_RETRY_AFTER_S = 10


BACKOFF_S, BACKOFF_MAX_S = 0.5, 8  # api_retries' backoff, also between ``settled``'s tries after a write in doubt
# ``settled``: the pause before a write refused (409) is read and sent again, drawn between these
# (writers that collided do not collide again in step; 0.75 s at most in all over WRITE_TRIES).
CONFLICT_PAUSE_S = (0.05, 0.25)
WRITE_TRIES = 4  # ``settled``: a write whose outcome is unknown, read back and sent up to this many times


class Withheld(Exception):
    """A write of a ``settled`` attempt not sent: the attempt runs as its last write in doubt's
    read back (``settled``), and found the object not holding what the write sets."""


class ReadBackCut(Exception):
    """A call of ``settled``'s read back not sent: it would leave the ``api_budget`` in force less
    than the time of the calls ``reserved`` for after (``read_back_room``): the last write in doubt
    not read back, said so."""


_READING_BACK: contextvars.ContextVar[bool] = contextvars.ContextVar("settled_read_back", default=False)


def reading_back() -> bool:
    """Whether a ``settled`` attempt runs as its last write in doubt's read back (its writes
    withheld): a read it cannot do then fails the read back, not a write withheld."""
    return _READING_BACK.get()


def read_back_room() -> bool:
    """Whether the ``api_budget`` in force keeps the time of one call more than the calls
    ``reserved`` for after: each call of a read back is sent only so (``ReadBackCut``), whatever
    the attempt's reads (a Deployment's: its own, its ``like``'s, its template's dry run)."""
    return budget_left(_RESERVE.get() + 1) >= 0


def failed_call(exc: Exception) -> bool:
    """Whether ``exc`` is a call's failure or refusal (a RouterError; a LockError with the API
    server's ``status``), not what an attempt found (a lease another's now: ``LockLost``)."""
    return isinstance(exc, RouterError) or getattr(exc, "status", None) is not None


@dataclass
class _Tries:
    """What ``settled``'s tries met, its failure's message and ``maybe_written`` made from it once
    (``failure``, ``after_doubt``)."""

    checks: bool
    doubted: int = 0  # (the answers that left unknown whether a write, or a dry run, was served)
    written: int = 0  # (of those, the writes: no dry run's)
    late: int = 0  # (of those writes, the ones answered before their end, ``Unsettled.late``: each may still land)
    conflicts: int = 0  # (the writes refused, 409, for another's)
    last: Unsettled | Conflicted | None = None  # (the last try's failure)
    sent: bool = False  # (the attempt under way sent its write: its read found the writes in doubt not in place)
    kept: bool = False  # (tries left out: the calls ``reserved`` for after keep their time)
    unread: str = "not read back"  # (the last write in doubt: why it was not read back, or NOT_IN_PLACE)

    NOT_IN_PLACE = ""

    def after_doubt(self, exc: Exception) -> None:
        """``exc``, a call's failure (``failed_call``) an attempt raised after writes in doubt, said
        and marked ``maybe_written`` where one may have been served: not
        where the attempt's read found them not in place and it sent its write (refused: a 500
        settled), unless one was answered before its end (it may still land)."""
        if not self.written or not failed_call(exc) or (self.checks and self.sent and not self.late):
            return
        said = (
            "1 write whose answer left unknown whether it was served: it"
            if self.written == 1
            else f"{self.written} writes whose answers left unknown whether they were served: any"
        )
        exc.args = (f"{exc} (after {said} may have been served)",)
        exc.maybe_written = True  # type: ignore[attr-defined]

    def failure(self, tries: int) -> Exception:
        """The last try's error, saying how many tries, what failed them and what is known of the
        last write in doubt; ``maybe_written`` where a write may have been served."""
        assert self.last is not None
        last, error = self.last, self.last.error
        dry = isinstance(last, Unsettled) and last.dry_run  # (the last a dry run's: nothing to read back)
        wrote = isinstance(last, Unsettled) and not dry  # (the last a write's in doubt)
        read = wrote and self.unread == self.NOT_IN_PLACE  # (read back once, not in place)
        early = self.kept or self.unread.endswith("spent")  # (tries left out: no read after the last)
        found = self.checks and not (early and wrote)  # (each write in doubt read again after it)
        sent = "write" if self.written else "dry run"
        refused = "refused (409), the object written by another between its read and its write"
        if not self.conflicts:
            why = f"each answer left unknown whether the {sent} was served"
            why += ", and each read back found it not in place" if found else ""
        elif not self.doubted:
            why = f"each {refused}"
        else:
            why = f"{self.conflicts} {refused}; {self.doubted} answers left unknown whether the {sent} was served"
            why += ", each read back finding it not in place" if found else ""
        if dry:
            why += (
                "; the last a dry run's, nothing written by it: an earlier write may have been served"
                if self.written
                else "; a dry run, nothing written"
            )
        if read and isinstance(last, Unsettled) and last.late:
            why += "; the last not in place when read back: it may still land"
        elif read:
            why += "; the last read back once, not in place"
        elif wrote:
            why += f"; the last may have been served: {self.unread}"
        elif self.kept:
            why += "; not read again: the calls after it keep their time"
        landing = wrote and not (read and isinstance(last, Unsettled) and not last.late)  # (the last said so)
        if self.late and not landing:  # (an earlier write answered before its end: what was read since shows nothing)
            why += "; an earlier write answered before its end (a 502, a 504 or none) may still land"
        error.args = (f"{error} (tried {tries} times: {why})",)
        if hasattr(error, "maybe_written") and ((wrote and not read) or self.late or (dry and self.written)):
            error.maybe_written = True
        return error


_TRIES: contextvars.ContextVar[_Tries | None] = contextvars.ContextVar("settled_tries", default=None)


@contextlib.contextmanager
def unsettled(dry_run: bool = False) -> Iterator[None]:
    """Around one write of a ``settled`` attempt: its failure that leaves unknown whether the
    server served it (an error whose ``status`` is one of ``MAYBE_SERVED``: an ``ApiFailed``, a
    lease's ``LockError``; or no answer: ``ApiUnreachable``) raised as ``Unsettled``; anything
    else as it came. Where the attempt runs as ``settled``'s read back, the write is not sent:
    ``Withheld``, at once. ``dry_run``: a write sent as a dry run (``dryRun=All``: nothing
    stored), sent all the same; its doubt is no write's (``Unsettled.dry_run``)."""
    if _READING_BACK.get() and not dry_run:
        raise Withheld
    tried = _TRIES.get()
    if tried is not None and not dry_run:
        tried.sent = True
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, ApiUnreachable) and getattr(exc, "status", None) not in MAYBE_SERVED:
            raise
        raise Unsettled(exc, dry_run) from None


def settled(attempt: Callable[[int], T], tries: int = WRITE_TRIES, checks: bool = True) -> T:
    """``attempt(n)`` (``n``: the writes in doubt before it), one read-modify-write: it reads the
    object and writes nothing where the object holds what the write sets already, else writes
    (its write in ``unsettled``); what it answers. A write whose outcome is unknown
    (``Unsettled``: a 500, 502 or 504, or no answer, which the client does not send again) is
    settled by the next attempt, after api_retries' backoff: its read finds the write in place
    (done), or not, and it writes again from what it read (its resourceVersion, what another
    writer set meanwhile): never the first body sent twice, which the server would take for
    another writer's, its compare-and-swap refused. A write refused for another's meanwhile
    (``Conflicted``, 409) is read and written again after a pause drawn in ``CONFLICT_PAUSE_S``
    (read again at once, a controller rewriting the object every few milliseconds spent the
    tries in 1.5 ms), within the same tries; refused to the last, the mesh's write raises
    ``Contended``, which may be tried again. After ``tries`` the last failure raised (it names
    the call), with the tries and what failed them (an ``ApiUnreachable`` stays one).
    ``checks``: whether an attempt after a write in doubt (``n`` > 0) reads the object and sends
    no write where it holds what the write sets (what it answers then is the write's), said in
    that error (False: it writes again from what it read whatever it finds, a delete on
    preconditions). The read back is part of each attempt so, no option of its caller: a last
    write in doubt (given up for the calls ``reserved``, its backoff too long for them; or its
    last try's) is read back once, at once, where ``checks``, by ``attempt`` run once more with
    its writes withheld (``unsettled`` raises ``Withheld`` in place of each; a dry run's is
    sent), each of its calls sent only where the ``api_budget`` keeps the time of the calls
    ``reserved`` and one more (``read_back_room``): where it answers (its read found the write in
    place), that answer; where a write was withheld (not in place), said in the error; where it
    raises what is no call's failure (``failed_call``: a lease another's now, ``LockLost``),
    that. Of a last write in
    doubt never read back (``checks`` False, no time for it, its read failed) the error says it
    may have been served, and marks it ``maybe_written`` (a RouterError, a LockError): the caller
    does not say it was not written. So too a call's failure an attempt raises after a write in
    doubt (its read answered 500, refused): raised as it came, saying the write in doubt may have been
    served, unless the attempt's read found the write not in place and sent its own (refused,
    say). A read that finds the write not in place settles a 500 (the API server's answer for the
    write, its handling over; an etcd timeout's 500, whose write may yet commit, looks the same
    and is so taken): not written, not ``maybe_written``. After a 504, a 502 or no answer
    (``MAY_LAND``: the answer came before the write's end, which may commit after it) it shows
    nothing: said "not in place when read back: it may still land" (or, of an earlier one, "an
    earlier write ... may still land"), ``maybe_written``, whatever failed last. A dry run's doubt
    (``unsettled``'s ``dry_run``: nothing stored) is no write's: not read back, said "a dry run,
    nothing written", not ``maybe_written`` unless a write before it was in doubt."""
    tried = _Tries(checks)
    token = _TRIES.set(tried)
    try:
        for n in range(tries):
            if isinstance(tried.last, Conflicted):
                wait = random.uniform(*CONFLICT_PAUSE_S)  # noqa: S311 (a pause, no secret)
            else:
                wait = min(BACKOFF_S * 2 ** (n - 1), BACKOFF_MAX_S) if tried.last is not None else 0.0
            if tried.last is not None and _RESERVE.get() and budget_left(_RESERVE.get()) < wait:
                tries, tried.kept = n, True  # (after a 409, or a write in doubt: its backoff and read back left out)
                tried.unread = "not read back, the calls after it keep their time"
                break
            if wait and not pause(wait):  # (the api_budget spent by the pause: the last failure raised)
                tries, tried.unread = n, "not read back, the time allowed spent"
                break
            tried.sent = False
            try:
                return attempt(tried.doubted)
            except Unsettled as exc:
                tried.last, tried.doubted = exc, tried.doubted + 1
                tried.written += not exc.dry_run
                tried.late += exc.late and not exc.dry_run
                if n + 1 < tries:
                    log.warning("%s; %s", exc.error, "trying it again" if exc.dry_run else "reading it back")
            except Conflicted as exc:
                tried.last, tried.conflicts = exc, tried.conflicts + 1
                if n + 1 < tries:
                    log.info("%s; reading it again", exc.error)
            except Exception as exc:  # (a read failed after a write in doubt: that write may have landed)
                tried.after_doubt(exc)
                raise
        last = tried.last
        if isinstance(last, Unsettled) and not last.dry_run and checks and not tried.unread.endswith("spent"):
            if not read_back_room():
                tried.unread = tried.unread if tried.kept else "not read back, no time left for the read"
            else:
                tried.sent, reading = False, _READING_BACK.set(True)
                try:
                    back = attempt(tried.doubted)  # (its writes withheld: the read back)
                except Withheld:
                    tried.unread = tried.NOT_IN_PLACE
                except ReadBackCut:
                    tried.unread = tried.unread if tried.kept else "not read back, no time left for the read"
                except Exception as exc:
                    if not failed_call(exc):  # (what the read found: a lease another's now, say)
                        raise
                    log.warning("%s; its read back failed: %s", last.error, str(exc)[:300])
                    tried.unread = "its read back failed"
                else:
                    log.info("%s; read back: in place", last.error)
                    return back
                finally:
                    _READING_BACK.reset(reading)
        raise tried.failure(tries)  # (its own kind: an ApiFailed, an ApiUnreachable, a Contended, a LockError)
    finally:
        _TRIES.reset(token)


def api_error(what: str, exc: Any) -> RouterError:
    """An ApiException of ``what`` (a call) as a RouterError: the status, the reason and what the
    server said (``api_message``); an ``ApiFailed`` for a failure rather than a refusal."""
    message = f"{what}: {exc.status} {exc.reason}: {api_message(exc)}"
    return ApiFailed(message, exc.status) if exc.status in UNSERVED | MAYBE_SERVED else RouterError(message)


@dataclass
class ApiBudget:
    """What ``api_budget`` allows the calls made within it: ``per_call_s`` each (connect and
    read), and ``total_s`` without an answer in all (``spent``: the time the calls that got none,
    or none that served them, took, the client's retries and their backoff included; ``since``: when the call under way
    began, its time counted until it is answered; ``clock``: what tells the time); and, with
    ``cap_s``, that long in all from ``started``, whatever the calls took (served ones, their
    Retry-After waits, the pauses and waits between them). ``answer_s``: what the last served call
    took to be answered, its tries' own time without the client's Retry-After and backoff waits
    between them (``slept``, of the call under way): what the calls to come are reckoned at
    (``budget_left``). Not the longest call yet: one slow answer, or one Retry-After waited, early
    on left a wait for pods no time at all, though every call since was answered at once."""

    total_s: float
    per_call_s: float
    spent: float = 0.0
    since: float | None = None
    clock: Callable[[], float] = time.monotonic
    cap_s: float | None = None
    started: float = 0.0
    answer_s: float = 0.0
    slept: float = 0.0

    def left(self) -> float:
        return min(self.unanswered_left(), self.cap_left())

    def unanswered_left(self) -> float:
        """What is left of ``total_s`` (what a pause between calls does not spend)."""
        return self.total_s - self.spent - (self.clock() - self.since if self.since is not None else 0.0)

    def cap_left(self) -> float:
        """What is left of ``cap_s`` (infinity without one)."""
        return math.inf if self.cap_s is None else self.cap_s - (self.clock() - self.started)

    def capped(self) -> bool:
        """Whether ``cap_s`` is what is spent (not ``total_s``)."""
        return self.cap_left() <= 0  # (never without a cap: infinity left)


_BUDGET: contextvars.ContextVar[ApiBudget | None] = contextvars.ContextVar("api_budget", default=None)
_RESERVE: contextvars.ContextVar[int] = contextvars.ContextVar("api_reserve", default=0)


@contextlib.contextmanager
def reserved(calls: int) -> Iterator[None]:
    """Within it, ``settled`` reads and writes again after a write refused for another's meanwhile
    (``Conflicted``), or one whose outcome is unknown (``Unsettled``: after its backoff), only where
    the ``api_budget`` in force has left the time of ``calls`` calls, besides the backoff
    (``budget_left``): those that must come after (the failure callback's routes write, the lease's
    release) keep their time; else the last failure is raised as at the end of its tries. So too
    the client's own retries of a call (``api_retries``). 0: none kept (the tries as ever)."""
    token = _RESERVE.set(calls)
    try:
        yield
    finally:
        _RESERVE.reset(token)


@contextlib.contextmanager
def api_budget(total_s: float, per_call_s: float, cap_s: float | None = None) -> Iterator[ApiBudget]:
    """Within it, each try of a Kubernetes API call of a ``with_retries`` client waits
    ``per_call_s`` at most to connect and to read (not ``API_TIMEOUT_S``' 60 s), and no more than
    the budget has left when it is sent (``BudgetTimeout``), nor is a try sent after a wait that
    would spend the rest; a call slower than ``per_call_s`` is cut short and counts as one
    without an answer, however healthy the server; once calls have gone
    ``total_s`` without an answer in all (a hung server: each call its whole time limit, read
    again twice) none is sent, nor sent again by the client's retries: ``ApiUnreachable``, at
    once. A call whose last answer did not serve it counts as one without an answer (a 429 or
    503, its Retry-After waited between the client's retries; a 500, 502 or 504): a throttling
    server uses the budget up as a hung one does. Served calls (a refusal too) and the time
    between calls (a wait for pods, a drain) are not counted.
    What puts the stable version back (the teardown, the failure callback) is so bounded: a hung
    API server took 181 s a call, minutes a teardown. With ``cap_s`` (the failure callback, under
    a time limit), nothing is sent, nor waited for, ``cap_s`` after it began, whatever the calls
    took: a slow server's served calls, those served after 429s, spent nothing of ``total_s``
    (the callback took 100 s of its 30); each try's limit is what is left of it at most too.
    ``pause`` waits only within it."""
    budget = ApiBudget(total_s, per_call_s, clock=time.monotonic, cap_s=cap_s)
    budget.started = budget.clock()
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def budget_left(calls: int = 0) -> float:
    """What the ``api_budget`` in force has left (``ApiBudget.left``), less the time of ``calls``
    calls to come, each as long as the last served call took to answer (``ApiBudget.answer_s``: a
    wait's headroom for the calls after it); infinity without one."""
    budget = _BUDGET.get()
    return math.inf if budget is None else budget.left() - calls * budget.answer_s


def pause(seconds: float) -> bool:
    """Sleep ``seconds`` (a pause before a call is tried again) unless the ``api_budget`` in force
    has no more than that left of its cap, or nothing left of its ``total_s`` (a pause between
    calls spends none of that: it counts only calls left without an answer): False then,
    nothing slept (the caller raises what failed)."""
    budget = _BUDGET.get()
    if budget is not None and (budget.cap_left() <= seconds or budget.unanswered_left() <= 0):
        return False
    time.sleep(seconds)
    return True


def api_retries() -> Any:
    """The kubernetes client's retry policy (urllib3's ``Retry``): up to 5 sends more, after the
    Retry-After given (``MAX_RETRY_AFTER_S`` at most), else 0.5 s doubling up to 8 s; on ``UNSERVED`` any request, on
    ``MAYBE_SERVED`` or a read timeout (``API_TIMEOUT_S``) a read (twice at most for a
    timeout), and any request that never reached the server (no connection); none once the
    ``api_budget`` in force is spent, nor, within ``reserved``, once its wait would leave the
    calls kept for after less than their time (``budget_left``): a read answered 500 sent again
    and again ate the time kept for the lease's release."""
    from urllib3.util.retry import Retry

    class ApiRetry(Retry):
        def _is_method_retryable(self, method: str) -> bool:  # (urllib3 asks it of a read timeout)
            return method.upper() in READS

        def increment(self, *args: Any, **kwargs: Any) -> Any:
            # (within ``reserved``, what the budget has left less the time of the calls kept for after)
            budget, kept = _BUDGET.get(), _RESERVE.get()
            if budget is not None and budget_left(kept) <= 0:  # (spent: exhausted, its failure raised as ever)
                return Retry.increment(self.new(total=0), *args, **kwargs)
            retry = super().increment(*args, **kwargs)
            response = kwargs.get("response")
            wait = (response is not None and retry.get_retry_after(response)) or retry.get_backoff_time()
            if budget is not None and budget_left(kept) <= wait:  # (spent by the wait: none sent after it)
                return Retry.increment(self.new(total=0), *args, **kwargs)
            return retry

        def sleep(self, response: Any = None) -> None:  # (its time is no answer's: ApiBudget.slept)
            budget = _BUDGET.get()
            began = budget.clock() if budget is not None else 0.0
            try:
                super().sleep(response)
            finally:
                if budget is not None:
                    budget.slept += budget.clock() - began

        def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
            return status_code in UNSERVED or (status_code in MAYBE_SERVED and method.upper() in READS)

    return ApiRetry(
        total=5,
        connect=5,
        read=2,
        status=5,
        other=0,
        allowed_methods=None,  # any method: is_retry decides by status
        status_forcelist=UNSERVED | MAYBE_SERVED,
        backoff_factor=BACKOFF_S,
        backoff_max=BACKOFF_MAX_S,
        retry_after_max=MAX_RETRY_AFTER_S,
        raise_on_status=False,  # the last answer raises as the client's ApiException
        redirect=0,
    )


def with_retries(api_client: Any) -> Any:
    """``api_client`` (a kubernetes ``ApiClient``) sending its requests with ``api_retries``, each
    within ``API_TIMEOUT_S`` unless its call says otherwise; a call left without an answer
    raises ``ApiUnreachable`` (``unanswered``), not urllib3's own exception."""
    from kubernetes.client.rest import RESTClientObject
    from urllib3 import Timeout
    from urllib3.exceptions import HTTPError

    class BudgetTimeout(Timeout):
        """A call's time limits under ``budget``: ``per_call_s`` and what the budget has left at
        most, worked out again for each of the client's tries (urllib3 clones the limits for
        each), not once for the call and its retries."""

        def __init__(self, budget: ApiBudget, limits: Timeout) -> None:
            super().__init__(connect=limits.connect_timeout, read=limits.read_timeout)
            self.budget = budget

        def clone(self) -> Timeout:
            cap = min(self.budget.per_call_s, max(self.budget.left(), 0.001))
            parts = [p if isinstance(p, float | int) and p < cap else cap for p in (self._connect, self._read)]
            return Timeout(connect=parts[0], read=parts[1])

    class TimedRESTClient(RESTClientObject):
        def __init__(self, configuration: Any) -> None:
            super().__init__(configuration)
            urlopen = self.pool_manager.urlopen

            def budgeted(method: str, url: str, redirect: bool = True, **kw: Any) -> Any:
                budget, timeout = _BUDGET.get(), kw.get("timeout")
                if budget is not None and isinstance(timeout, Timeout):  # (the kubernetes client's, from ours)
                    kw["timeout"] = BudgetTimeout(budget, timeout)
                return urlopen(method, url, redirect=redirect, **kw)

            self.pool_manager.urlopen = budgeted

        def request(self, method: str, url: str, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
            timeout = _request_timeout or API_TIMEOUT_S
            if _READING_BACK.get() and not read_back_room():  # (a read back's call: the reserve keeps its time)
                raise ReadBackCut(f"{method.upper()} {urlsplit(url).path}")
            budget = _BUDGET.get()
            if budget is not None:
                left = budget.left()
                if left <= 0:
                    why = (
                        cap_spent(budget)
                        if budget.capped()
                        else f"the Kubernetes API server left calls here {budget.total_s:g} s without an answer, all "
                        "they are allowed"
                    )
                    raise ApiUnreachable(
                        f"{method.upper()} {urlsplit(url).path} was not sent: {why}; the call may be tried again"
                    )
                parts = timeout if isinstance(timeout, tuple) else (timeout, timeout)  # (each retry's: BudgetTimeout)
                timeout = tuple(min(part, budget.per_call_s, left) for part in parts)
                budget.since, budget.slept = budget.clock(), 0.0
            served = False  # (a served call spends nothing; one unanswered, or answered unserved, its time)
            try:
                response = super().request(method, url, *args, _request_timeout=timeout, **kwargs)
                served = True
                return response
            except HTTPError as exc:
                if budget is not None and budget.capped():  # (cut short by our own cap: not the server's doing)
                    raise capped(method, url, budget) from None
                raise unanswered(method, url, exc) from None
            except Exception as exc:  # (the client's ApiException for its last answer, a refusal say)
                served = getattr(exc, "status", None) not in UNSERVED | MAYBE_SERVED
                raise
            finally:
                if budget is not None and budget.since is not None:
                    took = budget.clock() - budget.since
                    if served:  # (its tries' answers alone: what the next call may take)
                        budget.answer_s = max(took - budget.slept, 0.0)
                    else:
                        budget.spent += took
                    budget.since = None

    api_client.configuration.retries = api_retries()
    api_client.rest_client = TimedRESTClient(api_client.configuration)  # its connection pools take it when made
    return api_client


def unanswered(method: str, url: str, exc: Exception) -> ApiUnreachable:
    """urllib3's exception for a call the API server left without an answer (``MaxRetryError``
    once the retries are spent; a write's dropped connection or read timeout, which is not sent
    again) as an ``ApiUnreachable`` naming the call, why, and what to check."""
    from urllib3.exceptions import MaxRetryError

    parts = urlsplit(url)
    reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
    if isinstance(exc, MaxRetryError):
        tried = " after the client's retries"
    elif method.upper() in READS:
        tried = ""
    else:
        tried = " (the client does not send a write again: the server may have served it)"
    return ApiUnreachable(
        f"the Kubernetes API server did not answer {method.upper()} {parts.path}{tried}: "
        f"{type(reason).__name__}: {str(reason)[:300]}. Check that {parts.scheme}://{parts.netloc} is up and "
        "reachable from here (the kubeconfig's server or the in-cluster address, a proxy or network policy "
        "between); the call may be tried again"
    )


def cap_spent(budget: ApiBudget) -> str:
    """What a call the ``api_budget``'s cap stopped says of why (``capped``; one not sent once
    it was spent): the step's time budget, in the same words."""
    return (
        f"the step's Kubernetes API time budget ran out (its calls are allowed {budget.cap_s:g} s in all, whatever "
        "they take)"
    )


def capped(method: str, url: str, budget: ApiBudget) -> ApiUnreachable:
    """A call the ``api_budget``'s cap cut short (its time limit what the cap had left, spent
    before an answer came) as an ``ApiUnreachable`` naming the call and the step's time budget
    that ran out, not the API server (``unanswered``'s advice to check it is up)."""
    served = "" if method.upper() in READS else " (a write: the server may have served it)"
    return ApiUnreachable(
        f"{method.upper()} {urlsplit(url).path} was cut short before its answer{served}: {cap_spent(budget)}; the "
        "call may be tried again"
    )


def api_message(exc: Any) -> str:
    """What the API server said of its refusal (an ApiException): its Status's ``message`` (an RBAC
    denial names the user, the verb and the resource), else the body as it came; 1000 characters."""
    try:
        message = str(json.loads(exc.body).get("message") or exc.body)
    except (TypeError, ValueError, AttributeError):
        message = str(exc.body)
    return message[:1000]


def _annotations(obj: dict[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def make_router(backend: str, **kwargs: Any) -> Router:
    if backend == "local":
        return LocalRouter(**kwargs)
    if backend == "istio":
        return IstioRouter(**kwargs)
    raise ValueError(f"unknown mesh backend {backend!r}: use 'local' or 'istio'")
