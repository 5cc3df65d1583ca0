"""The one-machine cluster's data plane: Debian's nginx configured from Istio's objects.

In production Envoy sidecars route by the VirtualService and DestinationRule that the rollout
applies (``vision_rollout.mesh``). No Envoy runs here, so ``render_nginx`` translates those
objects into one nginx configuration and ``NginxDataPlane`` runs nginx and reloads it when
they change, as Istio pushes xDS to Envoy. What Envoy does, and how nginx is made to do it:

- ``spec.http`` routes are tried in order and the first that matches wins; a route matches
  when any entry of its ``match`` list does (or it has none), an entry when all its
  conditions do. No ``if`` chains: each condition is a ``map`` to 1/0 (an anchored,
  case-sensitive regex, literal values escaped: nginx compares ``map`` strings without case,
  and ``exact`` must stay exact; a ``regex`` reads UTF-8 characters, as RE2); an entry's conditions are concatenated and mapped again
  (AND); a route's entries are mapped to its one flag (OR), and one map over every route's
  flag, in order, picks the first route matched (first match). Not reproduced: a header sent
  more than once is matched here by its first value (nginx 1.22 has no variable of them all),
  by Envoy as its values joined by ",".
- A route's weighted destinations are a ``split_clients`` on the request id: random per
  request. A destination is an Envoy cluster: the Service's pods (``app=<service>``)
  narrowed to the DestinationRule subset's labels, an nginx ``upstream`` of the ready ones.
  A subset with no ready pod answers 503 ``no healthy upstream``; a subset the
  DestinationRule does not declare answers 503 with no body (Envoy: cluster not found); no
  route matched, 404 with no body (Envoy: route not found). Never another subset.
- The mesh's EnvoyFilter (``vision_rollout.mesh.render_envoy_filter``), on every proxy: the
  user's bucket, ``x-rollout-bucket``, is a ``split_clients`` over ``X-User-ID`` (its first
  element, trimmed, ``vision_rollout.mesh.user_key``: a repeated header as Envoy reads it; the
  client address when that is absent or empty) in 10,000 parts of 0.01%: MurmurHash2, as the filter's Lua
  computes it (``vision_rollout.mesh.user_bucket``). A match on that header reads the bucket
  (what the client sent is overwritten, as the filter replaces it), and the pods are sent it.
- ``mirror`` with ``mirrorPercentage`` (else Istio's deprecated integer ``mirrorPercent``, else
  100, as istiod reads them): a second ``split_clients`` decides
  per request whether nginx's ``mirror`` subrequest copies the request (method, headers,
  body) to the mirror subset, its Host suffixed ``-shadow`` before the port (Envoy's rule,
  which ``model_server.app.is_shadow_host`` recognises). The client's response does not
  wait for the copy. nginx's known limit: the request is finalized (its access-log line
  written, the next request on a keepalive connection read) only once the copy is answered.
- Clients get ``Connection: close``: a reload closes idle client connections (Envoy changes
  routes on the connections it has), and a request sent on one that instant would fail.
- Proxying as a sidecar does: HTTP/1.1 with keepalive to the pods, the client's Host and
  headers, ``X-Request-ID`` added when the client sent none, a retry on another pod of the
  same subset when a connection fails (``proxy_next_upstream error``: never after a
  non-idempotent request was sent, never on a timeout), and one JSON access-log line per
  request: the route, the subset, the pod that answered (``upstream_addr``), the user's
  bucket and whether it was mirrored, so tests and the load generator can count which
  version served what.

Each VirtualService is served on its own loopback port, which stands for its Service's
ClusterIP: Istio's ``hosts`` matching is not reproduced and the client's Host passes
unchanged. Everything not listed above is refused with a ValueError naming the object, the
route and the field, never ignored.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack.processes import children, holds_any, listening_sockets
from model_server.errors import PolicyError
from model_server.traffic import (
    BUCKET_HEADER,
    BUCKETS,
    MAX_RULE_HEADERS,
    MAX_RULES,
    MAX_VALUE_CHARS,
    compile_rule_regex,
)

# What a traffic policy may hold, rendered: its rules, a pinned route per subset and the default
# route, each split between two versions at most (a version's route each: more is refused, naming
# the limit); its headers a rule; a destination per subset.
MAX_VIRTUAL_SERVICES = 64
MAX_SUBSETS = 64  # per DestinationRule
# http routes per VirtualService: a pinned route per subset, and every rule and the default
# route split between two versions (a route each, and the weighted route).
MAX_ROUTES = MAX_SUBSETS + (MAX_RULES + 1) * 3
MAX_MATCHES = 64  # match entries per route
MAX_HEADERS = MAX_RULE_HEADERS  # header conditions per match entry
MAX_DESTINATIONS = MAX_SUBSETS  # weighted destinations per route
MAX_ENDPOINTS = 256  # ready pods per subset

Endpoints = Callable[[str, dict[str, str]], list[str]]  # (namespace, labels) -> ready pods' host:port

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,256}")  # nginx drops names with "_" (underscores_in_headers off)
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})")
_NAMED_GROUP = re.compile(r"\(\?P?[<']")  # a named group would define an nginx variable
_CLUSTER_SUFFIX = ".svc.cluster.local"
_MIRROR_URI = "/.rollout-mirror"
_EMPTY = '""'  # an empty nginx string
_FLAGS_PER_MAP = 128  # routes' match flags one map concatenates (their names: 4 KB at most)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # every one nginx creates at start


class DataPlaneError(RuntimeError):
    """nginx refused a configuration, did not start, or did not take a new one; the message
    says why (nginx's own words where it gave some)."""


# -- the Istio objects, as the data plane understands them -----------------------------------


@dataclass(frozen=True)
class Cluster:
    """An Envoy cluster: a Service's pods, narrowed to a DestinationRule subset's labels."""

    service: str
    namespace: str
    subset: str | None

    @property
    def name(self) -> str:
        """Its nginx ``upstream`` name: ``<subset>.<service>.<namespace>``."""
        return ".".join(p for p in (self.subset, self.service, self.namespace) if p)


@dataclass(frozen=True)
class Condition:
    variable: str  # $http_<name> or $rollout_path
    regex: str  # anchored, linear-time: escaped literals, or a pattern RE2 accepts


@dataclass(frozen=True)
class Route:
    name: str
    matches: tuple[tuple[Condition, ...], ...] | None  # None: matches every request
    destinations: tuple[tuple[Cluster, int], ...]  # weight > 0
    mirror: Cluster | None
    mirror_percent: float


def _fields(raw: Any, allowed: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(
            f"{where}: {', '.join(unknown)} not supported by the one-machine data plane (supported: {', '.join(allowed)})"
        )
    return raw


def _printable(text: str) -> bool:
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _name(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not _DNS_LABEL.fullmatch(raw):
        raise ValueError(f"{where} must be a DNS label (lower-case letters, digits, '-'), got {raw!r}")
    return raw


def _service(host: Any, namespace: str, where: str) -> tuple[str, str]:
    """(service, namespace) of ``<service>``, ``<service>.<namespace>`` or
    ``<service>.<namespace>.svc.cluster.local``; short names are in ``namespace``, as Istio
    resolves them in the object's own namespace."""
    if not isinstance(host, str):
        raise ValueError(f"{where} must be a string, got {host!r}")
    full = host.endswith(_CLUSTER_SUFFIX)
    parts = host.removesuffix(_CLUSTER_SUFFIX).split(".")
    if len(parts) > 2 or (full and len(parts) != 2):
        raise ValueError(
            f"{where} {host!r} is not a Service of this cluster (<service>, <service>.<namespace> or "
            f"<service>.<namespace>{_CLUSTER_SUFFIX})"
        )
    return _name(parts[0], where), _name(parts[1], where) if len(parts) == 2 else namespace


def _string_match(raw: Any, where: str, header: bool) -> str:
    """An Istio StringMatch as an anchored regex: ``exact`` and ``prefix`` escaped, ``regex``
    checked to be RE2 (linear time, as Istio's Envoy runs it) and matched in full."""
    spec = _fields(raw, ("exact", "prefix", "regex"), where)
    if len(spec) != 1:
        raise ValueError(f"{where} must have exactly one of exact, prefix, regex")
    kind, value = next(iter(spec.items()))
    if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"{where}.{kind} must be a string of at most {MAX_VALUE_CHARS} characters")
    if not _printable(value):
        raise ValueError(f"{where}.{kind} {value!r} holds control characters, which no request can carry")
    if kind == "regex":
        try:
            pattern = compile_rule_regex(value, f"{where}.regex")
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        if _NAMED_GROUP.search(value):
            raise ValueError(f"{where}.regex {value!r}: named groups are not supported (use (?:...) or (...))")
        if header and pattern.fullmatch("") is not None:
            raise ValueError(
                f"{where}.regex {value!r} matches an empty value: nginx cannot tell it from a missing header"
            )
        # PCRE reads bytes; (*UTF) reads characters, as RE2 does (a value that is not UTF-8 then
        # matches no regex, and nginx logs an alert for the request).
        return f"(*UTF)^(?:{value})$"
    if header and value == "":
        raise ValueError(f"{where}.{kind} is empty: nginx cannot tell an empty header from a missing one")
    return f"^{re.escape(value)}" + ("$" if kind == "exact" else "")


def _match(raw: Any, where: str) -> tuple[Condition, ...]:
    """One ``match`` entry's conditions (all must hold)."""
    spec = _fields(raw, ("name", "headers", "uri"), where)
    headers = spec.get("headers", {})
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise ValueError(f"{where}.headers must be an object of at most {MAX_HEADERS} headers")
    conditions = []
    for name, string_match in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{where}.headers: {name!r} is not a header name this data plane matches ([A-Za-z0-9-]+)")
        # Header names compare without case; the bucket is the mesh filter's, not the client's.
        variable = "$rollout_bucket" if name.lower() == BUCKET_HEADER else "$http_" + name.lower().replace("-", "_")
        conditions.append(Condition(variable, _string_match(string_match, f"{where}.headers.{name}", header=True)))
    if "uri" in spec:  # the path, without the query
        conditions.append(Condition("$rollout_path", _string_match(spec["uri"], f"{where}.uri", header=False)))
    return tuple(conditions)


def _destination(raw: Any, where: str, namespace: str) -> Cluster:
    spec = _fields(raw, ("host", "subset"), where)
    service, ns = _service(spec.get("host"), namespace, f"{where}.host")
    subset = _name(spec["subset"], f"{where}.subset") if "subset" in spec else None
    return Cluster(service, ns, subset)


def _weighted(raw: Any, where: str, namespace: str) -> tuple[tuple[Cluster, int], ...]:
    """Destinations with their weights: a lone destination takes everything, weight or not;
    a missing weight beside others is 0 (proto3's default); zero weights get nothing."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_DESTINATIONS:
        raise ValueError(f"{where} must be a list of 1 to {MAX_DESTINATIONS} destinations")
    out = []
    for k, item in enumerate(raw):
        spec = _fields(item, ("destination", "weight"), f"{where}[{k}]")
        weight = spec.get("weight", 0)
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise ValueError(f"{where}[{k}].weight must be a non-negative integer, got {weight!r}")
        cluster = _destination(spec.get("destination"), f"{where}[{k}].destination", namespace)
        out.append((cluster, 100 if len(raw) == 1 else weight))
    if not any(w for _, w in out):
        raise ValueError(f"{where}: every weight is 0, so no destination would get a request")
    return tuple((c, w) for c, w in out if w > 0)


def _route(raw: Any, where: str, namespace: str, index: int) -> Route:
    spec = _fields(raw, ("name", "match", "route", "mirror", "mirrorPercentage", "mirrorPercent"), where)
    name = spec.get("name", f"http[{index}]")
    if not isinstance(name, str) or len(name) > 253 or "$" in name or not _printable(name):
        raise ValueError(f"{where}.name must be a string of at most 253 characters without '$' or control characters")
    matches = None
    if "match" in spec:
        raw_matches = spec["match"]
        if not isinstance(raw_matches, list) or not 1 <= len(raw_matches) <= MAX_MATCHES:
            raise ValueError(f"{where}.match must be a list of 1 to {MAX_MATCHES} entries")
        matches = tuple(_match(m, f"{where}.match[{k}]") for k, m in enumerate(raw_matches))
        if any(not conditions for conditions in matches):
            matches = None  # an entry without conditions matches every request
    destinations = _weighted(spec.get("route"), f"{where}.route", namespace)
    mirror, percent = None, 100.0
    if "mirror" in spec:
        mirror = _destination(spec["mirror"], f"{where}.mirror", namespace)
    if spec.get("mirrorPercent") is not None:  # Istio's deprecated integer share (before 1.9)
        value = spec["mirrorPercent"]
        if mirror is None:
            raise ValueError(f"{where}.mirrorPercent without mirror")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
            raise ValueError(f"{where}.mirrorPercent must be an integer from 0 to 100, got {value!r}")
        percent = float(value)
    if "mirrorPercentage" in spec:  # (where both are set, this one, as istiod takes it)
        if mirror is None:
            raise ValueError(f"{where}.mirrorPercentage without mirror")
        value = _fields(spec["mirrorPercentage"], ("value",), f"{where}.mirrorPercentage").get("value")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 100:
            raise ValueError(f"{where}.mirrorPercentage.value must be a number from 0 to 100, got {value!r}")
        percent = float(value)
    return Route(name, matches, destinations, mirror, percent)


def _metadata(obj: Any, kind: str) -> tuple[str, str]:
    if not isinstance(obj, dict) or obj.get("kind", kind) != kind:
        raise ValueError(f"not a {kind}: {str(obj)[:200]}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"{kind} without metadata")
    return _name(meta.get("namespace"), f"{kind} metadata.namespace"), _name(meta.get("name"), f"{kind} metadata.name")


def _virtual_service(obj: Any) -> tuple[str, str, list[Route]]:
    namespace, name = _metadata(obj, "VirtualService")
    where = f"VirtualService {namespace}/{name}"
    spec = _fields(obj.get("spec"), ("hosts", "gateways", "http"), f"{where} spec")
    http = spec.get("http")
    if not isinstance(http, list) or not 1 <= len(http) <= MAX_ROUTES:
        raise ValueError(f"{where} spec.http must be a list of 1 to {MAX_ROUTES} routes")
    routes = []
    for i, raw in enumerate(http):
        label = (
            f"{where} route {raw.get('name')!r} (spec.http[{i}])"
            if isinstance(raw, dict)
            else f"{where} spec.http[{i}]"
        )
        routes.append(_route(raw, label, namespace, i))
    return namespace, name, routes


def _subsets(destination_rules: Sequence[Any]) -> dict[tuple[str, str], dict[str, dict[str, str]]]:
    """(service, namespace) -> subset name -> the subset's pod labels."""
    out: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for obj in destination_rules:
        namespace, name = _metadata(obj, "DestinationRule")
        where = f"DestinationRule {namespace}/{name}"
        spec = _fields(obj.get("spec"), ("host", "subsets"), f"{where} spec")
        service = _service(spec.get("host"), namespace, f"{where} spec.host")
        if service in out:
            raise ValueError(f"{where}: another DestinationRule already covers {service[0]}.{service[1]}")
        raw = spec.get("subsets", [])
        if not isinstance(raw, list) or len(raw) > MAX_SUBSETS:
            raise ValueError(f"{where} spec.subsets must be a list of at most {MAX_SUBSETS}")
        subsets: dict[str, dict[str, str]] = {}
        for k, s in enumerate(raw):
            s = _fields(s, ("name", "labels"), f"{where} spec.subsets[{k}]")
            subset = _name(s.get("name"), f"{where} spec.subsets[{k}].name")
            labels = s.get("labels", {})
            if not isinstance(labels, dict) or not all(isinstance(v, str) for v in (*labels, *labels.values())):
                raise ValueError(f"{where} spec.subsets[{k}].labels must map strings to strings")
            if subset in subsets:
                raise ValueError(f"{where}: subset {subset!r} is declared twice")
            subsets[subset] = labels
        out[service] = subsets
    return out


def _pods(
    cluster: Cluster, subsets: Mapping[tuple[str, str], Mapping[str, dict[str, str]]], endpoints: Endpoints
) -> list[str] | None:
    """The cluster's ready pods (host:port, sorted); None when its subset is not declared."""
    labels = {"app": cluster.service}
    if cluster.subset is not None:
        declared = subsets.get((cluster.service, cluster.namespace), {})
        if cluster.subset not in declared:
            return None
        labels |= declared[cluster.subset]
    pods = list(endpoints(cluster.namespace, labels))
    if len(pods) > MAX_ENDPOINTS:
        raise ValueError(f"cluster {cluster.name}: {len(pods)} ready pods, at most {MAX_ENDPOINTS}")
    for pod in pods:
        m = _ADDRESS.fullmatch(pod) if isinstance(pod, str) else None
        if m is None or not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"cluster {cluster.name}: pod address {pod!r} is not host:port")
    return sorted(set(pods))


# -- nginx -----------------------------------------------------------------------------------


def _q(text: str, regex: bool = False) -> str:
    """``text`` as one quoted nginx token. In a value ``$`` would name a variable and has no
    escape in nginx, so it is refused there (a ``map`` key's regex is not interpolated)."""
    if (not regex and "$" in text) or not _printable(text):
        raise ValueError(f"{text!r}: '$' and control characters cannot appear in the nginx configuration")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _split(parts: Sequence[tuple[str, float]]) -> list[str]:
    """``split_clients`` lines for values with relative weights: shares in hundredths of a
    percent (nginx's resolution), cut at cumulative edges so that they add up exactly."""
    total = sum(w for _, w in parts)
    lines, edge, cumulative = [], 0, 0.0
    for value, weight in parts[:-1]:
        cumulative += weight
        share = round(cumulative * 10000 / total) - edge
        edge += share
        if share:
            lines.append(f"{share // 100}.{share % 100:02d}% {value};")
    return [*lines, f"* {parts[-1][0]};"]


def _condition_maps(prefix: str, route: Route) -> tuple[list[str], list[str]]:
    """The maps that evaluate a route's match entries, and one variable per entry (1: matched)."""
    lines: list[str] = []
    entries = []
    for k, conditions in enumerate(route.matches or ()):
        names = []
        for c, cond in enumerate(conditions):
            var = f"${prefix}_m{k}_c{c}"
            lines.append(f"map {cond.variable} {var} {{ {_q('~' + cond.regex, regex=True)} 1; default 0; }}")
            names.append(var)
        if len(names) == 1:
            entries.append(names[0])
        else:  # all conditions: every one mapped to 1
            lines.append(f'map "{"".join(names)}" ${prefix}_m{k} {{ "{"1" * len(names)}" 1; default 0; }}')
            entries.append(f"${prefix}_m{k}")
    return lines, entries


def _render_virtual_service(
    i: int, routes: list[Route], available: Mapping[str, bool]
) -> tuple[list[str], str, list[tuple[int, str, str, str]]]:
    """One VirtualService's maps; the expression of its chosen route's index; and per route
    (index, name, primary cluster expression, mirror cluster expression)."""
    lines: list[str] = []
    flags: list[tuple[int, str]] = []  # (route index, its variable: 1 when any entry matched)
    fallback = _EMPTY  # the index of a route without conditions: it takes what none before matched
    chosen: list[tuple[int, str, str, str]] = []
    for j, route in enumerate(routes):
        prefix = f"vs{i}_r{j}"
        lines.append(f"# route {j} {route.name!r}")
        cond_lines, entries = _condition_maps(prefix, route)
        lines += cond_lines
        if len(route.destinations) == 1:
            primary = route.destinations[0][0].name
        else:
            lines.append(f'split_clients "${{request_id}}" ${prefix}_split {{')
            lines += ["    " + line for line in _split([(c.name, w) for c, w in route.destinations])]
            lines.append("}")
            primary = f"${prefix}_split"
        mirror = '""'
        if route.mirror is not None and route.mirror_percent > 0 and available.get(route.mirror.name):
            if route.mirror_percent >= 100:
                mirror = route.mirror.name
            else:  # its own hash input: independent of the primary's split
                lines.append(f'split_clients "mirror${{request_id}}" ${prefix}_mirror {{')
                lines += [
                    "    " + x
                    for x in _split([(route.mirror.name, route.mirror_percent), ('""', 100 - route.mirror_percent)])
                ]
                lines.append("}")
                mirror = f"${prefix}_mirror"
        chosen.append((j, route.name, primary, mirror))
        if route.matches is None:
            fallback = str(j)
            break  # matches everything: later routes are never reached
        if len(entries) == 1:
            flags.append((j, entries[0]))
        else:  # any entry: one of them mapped to 1
            lines.append(f'map "{"".join(entries)}" ${prefix}_any {{ "~1" 1; default 0; }}')
            flags.append((j, f"${prefix}_any"))
    if not flags:
        return lines, fallback, chosen
    # First match: a map over the flags of up to _FLAGS_PER_MAP routes, in order, answers the
    # index of the first 1, else asks the next such map (nginx reads a parameter of at most 4 KB,
    # and evaluates variables at most 100 deep: not a chain of one map per route).
    chunks = [flags[k : k + _FLAGS_PER_MAP] for k in range(0, len(flags), _FLAGS_PER_MAP)]
    lines.append("# the first route that matches")
    for c, chunk in enumerate(chunks):
        following = f"$vs{i}_route{c + 1}" if c + 1 < len(chunks) else fallback
        lines += [
            f'map "{"".join(flag for _, flag in chunk)}" $vs{i}_route{c or ""} {{',
            *(f'    "~^{f"0{{{k}}}" if k else ""}1" {j};' for k, (j, _) in enumerate(chunk)),
            f"    default {following};",
            "}",
        ]
    return lines, f"$vs{i}_route", chosen


def render_nginx(
    virtual_services: Sequence[dict[str, Any]],
    destination_rules: Sequence[dict[str, Any]],
    endpoints: Endpoints,
    listen: Mapping[tuple[str, str], int],
    workdir: Path | str,
) -> str:
    """The nginx configuration that routes as Envoy would by these objects.

    ``endpoints(namespace, labels)`` gives the ready pods (``host:port``) whose labels include
    ``labels``; ``listen[(namespace, name)]`` is the loopback port a VirtualService is served
    on. Temp files, the pid and the logs go under ``workdir`` (an absolute path). Raises
    ValueError, naming the object, route and field, for anything it cannot reproduce.
    """
    workdir = Path(workdir)
    if not workdir.is_absolute():
        raise ValueError(f"workdir must be an absolute path, got {str(workdir)!r}")
    if len(virtual_services) > MAX_VIRTUAL_SERVICES:
        raise ValueError(f"{len(virtual_services)} VirtualServices, at most {MAX_VIRTUAL_SERVICES}")
    subsets = _subsets(destination_rules)
    served: dict[int, tuple[str, str, list[Route]]] = {}  # port -> the VirtualService it serves
    for namespace, name, routes in map(_virtual_service, virtual_services):
        port = listen.get((namespace, name))
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ValueError(f"VirtualService {namespace}/{name}: no loopback port to serve it on (listen: {port!r})")
        if port in served:
            raise ValueError(
                f"VirtualService {namespace}/{name}: port {port} already serves {served[port][0]}/{served[port][1]}"
            )
        served[port] = (namespace, name, routes)
    clusters = {
        cluster
        for _, _, routes in served.values()
        for route in routes
        for cluster in (*(c for c, _ in route.destinations), route.mirror)
        if cluster is not None
    }
    pods = {c: _pods(c, subsets, endpoints) for c in sorted(clusters, key=lambda c: c.name)}

    http = _settings(workdir) + _routing(served, pods)
    for cluster, addresses in pods.items():
        if addresses:
            labels = f"app={cluster.service}" + (f", subset {cluster.subset}" if cluster.subset else "")
            http += ["", f"upstream {cluster.name} {{  # ready pods of {cluster.namespace}: {labels}"]
            http += [f"    server {a};" for a in addresses] + ["    keepalive 16;", "}"]
    if served:
        http += _server(served)
    return "\n".join(
        [
            "# Rendered by devstack.cluster.dataplane from Istio VirtualServices and DestinationRules.",
            f"pid {_q(str(workdir / 'nginx.pid'))};",
            f"error_log {_q(str(workdir / 'error.log'))} warn;",
            "worker_processes 1;",
            "events { worker_connections 1024; }",
            "http {",
            *("    " + line if line else "" for line in http),
            "}\n",
        ]
    )


def render_accepted(
    virtual_services: Sequence[dict[str, Any]],
    destination_rules: Sequence[dict[str, Any]],
    endpoints: Endpoints,
    listen: Mapping[tuple[str, str], int],
    workdir: Path | str,
    accepted: dict[tuple[str, str, str], dict[str, Any]],
) -> tuple[str, list[str]]:
    """``render_nginx`` as istiod pushes config: an object the data plane cannot take is left out
    and reported, its last accepted version (``accepted``, kept between calls by the caller) staying
    in effect, while every other object's changes go through. (conf, what was refused.)"""
    refused: list[str] = []

    def take(kind: str, objects: Sequence[dict[str, Any]], check: Callable[[dict[str, Any]], Any]) -> list[dict]:
        out = []
        for obj in objects:
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            key = (kind, str(meta.get("namespace")), str(meta.get("name"))) if isinstance(meta, dict) else None
            try:
                check(obj)
            except ValueError as exc:
                last = accepted.get(key) if key else None
                refused.append(f"{exc}" + ("; its last accepted version stays in effect" if last else ""))
                if last is not None:
                    out.append(last)
                continue
            if key:
                accepted[key] = obj
            out.append(obj)
        return out

    rules = take("DestinationRule", destination_rules, lambda dr: _subsets([dr]))
    services = take(
        "VirtualService", virtual_services, lambda vs: render_nginx([vs], rules, endpoints, listen, workdir)
    )
    return render_nginx(services, rules, endpoints, listen, workdir), refused


def _settings(workdir: Path) -> list[str]:
    """What every request shares: files under ``workdir``, limits, the log, proxying."""
    return [
        *(f"{kind}_temp_path {_q(str(workdir / (kind + '_temp')))};" for kind in _TEMP_PATHS),
        "default_type text/plain;",
        "server_tokens off;",
        "client_max_body_size 64m;  # the model server's limit",
        "client_body_buffer_size 1m;",
        "variables_hash_max_size 65536;",
        "variables_hash_bucket_size 128;",
        "map_hash_max_size 65536;",
        "map_hash_bucket_size 256;",
        'log_format rollout escape=json \'{"time":"$time_iso8601","method":"$request_method","uri":"$request_uri",'
        '"status":$status,"upstream_addr":"$upstream_addr","virtual_service":"$rollout_virtual_service",'
        '"route":"$rollout_route_name","subset":"$rollout_subset","mirrored":"$rollout_mirrored",'
        '"request_id":"$rollout_request_id","bucket":"$rollout_bucket","msec":$msec,"request_time":$request_time}\';',
        f"access_log {_q(str(workdir / 'access.log'))} rollout;",
        # Envoy applies a route change to the connections it has; nginx reloads, and its old
        # workers close their idle client connections, which a request sent that instant finds
        # gone. Answering clients with Connection: close leaves no idle connection to race.
        "keepalive_timeout 0;",
        "proxy_http_version 1.1;",
        "proxy_connect_timeout 10s;",
        "proxy_send_timeout 300s;",
        "proxy_read_timeout 300s;",
        "proxy_next_upstream error;  # Envoy's connect-failure retry; never once a POST was sent, never on a timeout",
        "proxy_next_upstream_tries 3;",
        "",
        "# Per request: the path without the query, the request id, the mirror copy's authority.",
        'map $request_uri $rollout_path { "~^(?<rollout_path_only>[^?]*)" $rollout_path_only; }',
        'map $http_x_request_id $rollout_request_id { "" $request_id; default $http_x_request_id; }',
        'map $http_host $rollout_shadow_host { "~^(?<rollout_host>.*)(?<rollout_port>:[0-9]+)$" '
        '"${rollout_host}-shadow${rollout_port}"; default "${http_host}-shadow"; }',
        "",
        "# The mesh's EnvoyFilter: the user's bucket, MurmurHash2 of X-User-ID (else the client's address):",
        "# its first element trimmed (vision_rollout.mesh.user_key), whether this nginx reads a repeated",
        '# header\'s first value (1.22) or the values joined by ", " (1.23 on).',
        'map $http_x_user_id $rollout_user_id { "~^[ \\t]*(?<rollout_user_first>[^,]*?)[ \\t]*(,|$)" $rollout_user_first; }',
        'map $rollout_user_id $rollout_user_key { "" $remote_addr; default $rollout_user_id; }',
        'split_clients "$rollout_user_key" $rollout_bucket {',
        *(f"    0.01% {b};" for b in range(BUCKETS - 1)),
        f"    * {BUCKETS - 1};",
        "}",
    ]


def _routing(served: Mapping[int, tuple[str, str, list[Route]]], pods: Mapping[Cluster, list[str] | None]) -> list[str]:
    """Each VirtualService's maps, then the maps that every request reads, keyed by the port it
    came in on (one per VirtualService): its route, that route's cluster and mirror cluster,
    and whether that cluster can answer."""
    available = {c.name: bool(p) for c, p in pods.items()}
    lines: list[str] = []
    route_of_port, names, primaries, mirrors = [], [], [], []
    for i, (port, (namespace, name, routes)) in enumerate(served.items()):
        maps, head, chosen = _render_virtual_service(i, routes, available)
        lines += ["", f"# -- VirtualService {namespace}/{name}, served on 127.0.0.1:{port}", *maps]
        route_of_port.append(f"{port} {head};")
        for j, route_name, primary, mirror in chosen:
            key = f'"{port}:{j}"'
            names.append(f"{key} {_q(route_name)};")
            primaries.append(f"{key} {primary};")
            mirrors.append(f"{key} {mirror};")
    verdicts = ['"" route_not_found;'] + [
        f"{c.name} {_EMPTY if p else 'no_healthy_upstream'};" for c, p in pods.items() if p is not None
    ]  # an undeclared subset is no cluster: the default
    lines += ["", "# -- The route each request takes, its clusters, and what answers when no pod can"]
    lines += _map("$server_port", "$rollout_route", route_of_port)
    lines += _map(
        "$server_port", "$rollout_virtual_service", [f"{p} {_q(f'{ns}/{n}')};" for p, (ns, n, _) in served.items()]
    )
    lines += _map('"$server_port:$rollout_route"', "$rollout_route_name", names)
    lines += _map('"$server_port:$rollout_route"', "$rollout_cluster", primaries)
    lines += _map('"$server_port:$rollout_route"', "$rollout_mirror_cluster", mirrors)
    lines += _map("$rollout_mirror_cluster", "$rollout_mirrored", ['"" no;'], default="yes")
    lines += _map("$rollout_cluster", "$rollout_subset", [f"{c.name} {c.subset or _EMPTY};" for c in pods])
    lines += _map("$rollout_cluster", "$rollout_unroutable", verdicts, default="cluster_not_found")
    lines += _map("$rollout_unroutable", "$rollout_reply", ['no_healthy_upstream "no healthy upstream";'])
    return lines


def _map(source: str, variable: str, entries: list[str], default: str = _EMPTY) -> list[str]:
    return [f"map {source} {variable} {{", *("    " + e for e in entries), f"    default {default};", "}"]


def _server(served: Mapping[int, tuple[str, str, list[Route]]]) -> list[str]:
    """One server on every VirtualService's port: Envoy's local replies when nothing can
    answer, else the request proxied to its cluster and, when chosen, mirrored."""
    return [
        "",
        "server {",
        *(f"    listen 127.0.0.1:{port};  # VirtualService {ns}/{name}" for port, (ns, name, _) in served.items()),
        "    location / {",
        "        # Envoy's local replies. The body is a variable: a literal empty text gets nginx's error page.",
        "        if ($rollout_unroutable = route_not_found) { return 404 $rollout_reply; }",
        "        if ($rollout_unroutable = cluster_not_found) { return 503 $rollout_reply; }",
        "        if ($rollout_unroutable = no_healthy_upstream) { return 503 $rollout_reply; }",
        f"        mirror {_MIRROR_URI};",
        "        mirror_request_body on;",
        "        proxy_pass http://$rollout_cluster$request_uri;",
        *_proxy_headers("$http_host"),
        "    }",
        f"    location = {_MIRROR_URI} {{",
        "        internal;",
        '        if ($rollout_mirror_cluster = "") { return 204; }',
        "        proxy_pass http://$rollout_mirror_cluster$request_uri;",
        *_proxy_headers("$rollout_shadow_host"),
        "    }",
        "}",
    ]


def _proxy_headers(host: str) -> list[str]:
    """A location's request headers to the pods (a location that sets any inherits none)."""
    return [
        f"        proxy_set_header Host {host};",
        "        proxy_set_header X-Request-ID $rollout_request_id;",
        f"        proxy_set_header {BUCKET_HEADER} $rollout_bucket;",
        '        proxy_set_header Connection "";  # keepalive to the pods',
    ]


# -- running nginx ---------------------------------------------------------------------------


def find_nginx() -> str | None:
    """nginx's path: on PATH, or in the sbin folders a non-root PATH often lacks."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin:/usr/local/sbin")


def _listen_ports(conf: str) -> list[int]:
    """The loopback ports a configuration listens on, as ``render_nginx`` writes them."""
    return [int(p) for p in re.findall(r"^\s*listen\s+127\.0\.0\.1:([0-9]{1,5})\b", conf, re.MULTILINE)]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


@dataclass
class NginxDataPlane:
    """nginx serving a rendered configuration from ``workdir``, reloaded when it changes.

    nginx runs in the foreground (``daemon off``): the master is this object's child process,
    stopped by its pid. A reload is nginx's graceful one (SIGHUP): new workers take new
    connections while the old ones finish the requests in flight. A configuration that
    ``nginx -t`` refuses is never installed: the running one keeps serving.
    """

    workdir: Path
    wait_s: float = 30.0
    binary: str | None = None  # default: find_nginx()
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _conf: str | None = field(default=None, init=False, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.workdir / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    @property
    def access_log(self) -> Path:
        """One JSON line per request (see ``render_nginx``)."""
        return self.workdir / "access.log"

    @property
    def pid(self) -> int | None:
        """The master's pid while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _nginx(self, conf: Path, *args: str) -> list[str]:
        binary = self.binary or find_nginx()
        if binary is None:
            raise DataPlaneError("nginx is not installed (Debian: apt-get install nginx-light)")
        # As root, workers would run as "nobody" and could not use a private workdir.
        user = " user root;" if os.geteuid() == 0 else ""
        return [
            binary,
            "-p",
            f"{self.workdir}/",
            "-e",
            str(self.error_log),
            "-c",
            str(conf),
            "-g",
            f"daemon off;{user}",
            *args,
        ]

    def _test(self, conf: str) -> Path:
        """Write ``conf`` beside the installed one and have nginx check it; its path when nginx
        accepts it, DataPlaneError with nginx's reason when not (the candidate removed)."""
        candidate = self.workdir / "nginx.conf.candidate"
        candidate.write_text(conf)
        done = subprocess.run(self._nginx(candidate, "-t", "-q"), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            candidate.unlink()
            reason = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
            raise DataPlaneError(f"nginx refused the configuration (the running one is kept): {reason}")
        return candidate

    def _wait_listening(self, conf: str) -> None:
        """Until nginx has written its pid (its sockets are bound by then) and every port of
        ``conf`` accepts connections."""
        deadline = time.monotonic() + self.wait_s
        pid_file = self.workdir / "nginx.pid"
        while not (pid_file.exists() and pid_file.read_text().strip() == str(self.pid)):
            if self.pid is None:
                raise DataPlaneError(f"nginx exited:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise DataPlaneError(f"nginx wrote no pid file within {self.wait_s:g} s")
            time.sleep(0.05)
        for port in _listen_ports(conf):
            while True:
                if self.pid is None:
                    raise DataPlaneError(f"nginx exited:\n{self._log_tail()}")
                with socket.socket() as s, contextlib.suppress(OSError):
                    s.settimeout(1)
                    s.connect(("127.0.0.1", port))
                    break
                if time.monotonic() > deadline:
                    raise DataPlaneError(f"nginx does not listen on 127.0.0.1:{port} after {self.wait_s:g} s")
                time.sleep(0.05)

    def _log_tail(self, since: int = 0) -> str:
        with contextlib.suppress(OSError), self.error_log.open("rb") as f:
            f.seek(since)
            return f.read()[-4000:].decode(errors="replace")
        return ""

    def start(self, conf: str) -> None:
        """Install ``conf`` and run nginx with it; returns once it listens on every port."""
        if self.pid is not None:
            raise DataPlaneError(f"nginx already runs (pid {self.pid}): use apply()")
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        candidate = self._test(conf)
        candidate.replace(self.conf_path)
        with (self.workdir / "nginx.out").open("ab") as out:
            self._proc = subprocess.Popen(self._nginx(self.conf_path), stdout=out, stderr=subprocess.STDOUT)
        self._conf = conf
        try:
            self._wait_listening(conf)
        except DataPlaneError:
            self.stop()
            raise

    def apply(self, conf: str) -> bool:
        """Install ``conf`` and reload nginx gracefully; False when it is already installed.
        Returns once new workers serve it and the old ones have closed their listening sockets
        (until then an old worker may still accept a connection and route it by the old
        configuration: a client that just saw the new one answer could be sent by the old one).
        A configuration nginx refuses raises DataPlaneError and leaves the running one installed
        and serving."""
        pid = self.pid
        if pid is None:
            raise DataPlaneError("nginx is not running: start() first")
        if conf == self._conf:
            return False
        previous, candidate = self._conf or "", self._test(conf)
        old_workers, log_size = children(pid), self._log_size()
        candidate.replace(self.conf_path)
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + self.wait_s
        while not children(pid) - old_workers:  # new workers: the new configuration serves
            # e.g. a port taken; not a request's alert (a header that is not UTF-8, for a regex)
            failed = re.search(r"\[(emerg|alert)\](?![^\n]*, client: )[^\n]*", self._log_tail(log_size))
            why = failed.group(0) if failed else "nginx exited" if self.pid is None else None
            if why is None and time.monotonic() > deadline:
                why = f"no new workers after {self.wait_s:g} s"
            if why is not None:
                _write_atomic(self.conf_path, previous)
                raise DataPlaneError(f"nginx did not take the new configuration (the running one is kept): {why}")
            time.sleep(0.05)
        self._conf = conf
        self._wait_listening(conf)
        listening = listening_sockets(_listen_ports(previous) + _listen_ports(conf)) or set()
        while any(holds_any(w, listening) for w in old_workers):  # each closes them as it takes the reload
            if time.monotonic() > deadline:
                raise DataPlaneError(f"old workers still accept connections {self.wait_s:g} s after the reload")
            time.sleep(0.02)
        return True

    def _log_size(self) -> int:
        try:
            return self.error_log.stat().st_size
        except FileNotFoundError:
            return 0

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful shutdown (SIGQUIT: requests in flight finish), then SIGTERM, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGQUIT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                return
