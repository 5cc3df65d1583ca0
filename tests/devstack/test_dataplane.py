"""The one-machine cluster's data plane: Istio objects rendered for nginx, checked through the
real nginx and real upstream "pods" (tiny HTTP servers on loopback that answer who they are,
the Host they were sent and the path), as Envoy would route them."""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from devstack.cluster.dataplane import (
    MAX_HEADERS,
    MAX_ROUTES,
    DataPlaneError,
    NginxDataPlane,
    find_nginx,
    render_accepted,
    render_nginx,
)
from devstack.processes import free_port
from model_server.app import is_shadow_host
from model_server.traffic import BUCKETS, PolicyError, TrafficPolicy
from tests.support import POLL_INTERVAL_S
from vision_rollout.mesh import (
    BUCKET_SPAN,
    IstioTarget,
    murmur_hash2,
    render_destination_rule,
    render_virtual_service,
    user_bucket,
    user_key,
)

NGINX = find_nginx()
TARGET = IstioTarget(namespace="ml", service="digits", name="digits")
INFER = "/v2/models/digits/infer"
DEADLINE_S = 30.0


# -- pods and the cluster's view of them -------------------------------------------------


@dataclass
class Pod:
    """An HTTP server standing for a pod: records every request, answers JSON naming itself.
    While ``hold`` is clear it keeps requests (under ``hold_prefix``) waiting before answering,
    as a slow model would."""

    name: str
    labels: dict[str, str]
    ready: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    hold: threading.Event = field(default_factory=threading.Event)
    hold_prefix: str = ""  # the paths that wait for ``hold`` ("": all)

    def __post_init__(self) -> None:
        self.hold.set()
        pod = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keepalive, as the model server
            disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK stall

            def answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen = {
                    "pod": pod.name,
                    "method": self.command,
                    "path": self.path,
                    "host": self.headers.get("Host"),
                    "request_id": self.headers.get("X-Request-ID"),
                    "bucket": self.headers.get("X-Rollout-Bucket"),
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                }
                pod.requests.append(seen)
                if self.path.startswith(pod.hold_prefix):
                    pod.hold.wait(DEADLINE_S)
                out = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S}, daemon=True
        ).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def kill(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class FakePods:
    """The pods of namespace ml, and the endpoints view the data plane reads: the ready pods
    whose labels include the asked ones."""

    pods: list[Pod] = field(default_factory=list)

    def add(self, name: str, version: str, ready: bool = True, app: str = "digits") -> Pod:
        pod = Pod(name, {"app": app, "version": version}, ready)
        self.pods.append(pod)
        return pod

    def endpoints(self, namespace: str, labels: dict[str, str]) -> list[str]:
        return [p.address for p in self.pods if p.ready and namespace == "ml" and labels.items() <= p.labels.items()]


@pytest.fixture
def pods() -> Iterator[FakePods]:
    cluster = FakePods()
    yield cluster
    for pod in cluster.pods:
        pod.kill()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[NginxDataPlane]:
    if NGINX is None:
        pytest.fail("nginx is not installed (on PATH or in /usr/sbin): `make nginx` installs nginx-light")
    plane = NginxDataPlane(tmp_path / "nginx")
    yield plane
    plane.stop()


@dataclass
class Answer:
    status: int
    body: bytes

    @property
    def pod(self) -> str:
        return str(json.loads(self.body)["pod"])

    @property
    def seen(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


def call(port: int, path: str = INFER, headers: dict[str, str] | None = None, body: bytes = b"{}") -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Answer(r.status, r.read())
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE_S:g} s: {what}")
        time.sleep(0.02)


def log_lines(plane: NginxDataPlane) -> list[dict[str, Any]]:
    if not plane.access_log.exists():
        return []
    return [json.loads(line) for line in plane.access_log.read_text().splitlines()]


def policy(raw: dict[str, Any]) -> TrafficPolicy:
    return TrafficPolicy.from_dict(raw)


def istio(raw_policy: dict[str, Any], versions: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The VirtualService and DestinationRule the rollout applies for this policy."""
    return render_virtual_service(TARGET, policy(raw_policy), versions), render_destination_rule(TARGET, versions)


def serve(
    plane: NginxDataPlane, pods: FakePods, vs: dict[str, Any], dr: dict[str, Any], port: int | None = None
) -> tuple[int, str]:
    """Render and start (or apply); the port the VirtualService is served on, and the conf."""
    port = port or free_port()
    conf = render_nginx([vs], [dr], pods.endpoints, {("ml", vs["metadata"]["name"]): port}, plane.workdir.resolve())
    if plane.pid is None:
        plane.start(conf)
    else:
        plane.apply(conf)
    return port, conf


def raw_vs(http: list[dict[str, Any]], name: str = "digits") -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"hosts": [TARGET.host], "http": http},
    }


def dest(version: str, weight: int | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"destination": {"host": TARGET.host, "subset": f"v{version}"}}
    if weight is not None:
        d["weight"] = weight
    return d


# -- routing -----------------------------------------------------------------------------


@pytest.mark.integration
def test_weights_split_requests_at_random_in_proportion(nginx, pods):
    """A weighted route (what a split policy falls back to without the user's bucket)."""
    pods.add("v1-a", "1")
    pods.add("v2-a", "2")
    vs = raw_vs([{"name": "default", "route": [dest("1", 80), dest("2", 20)]}])
    port, _ = serve(nginx, pods, vs, render_destination_rule(TARGET, ["1", "2"]))
    served = Counter(call(port).pod for _ in range(400))
    assert set(served) == {"v1-a", "v2-a"}
    assert 280 <= served["v1-a"] <= 360  # 320 expected; 5 binomial standard deviations (8) either side

    wait_for(lambda: len(log_lines(nginx)) == 400, "an access-log line per request")
    logged = Counter(line["subset"] for line in log_lines(nginx))
    assert logged == {"v1": served["v1-a"], "v2": served["v2-a"]}  # the log counts which version served what


@pytest.mark.integration
def test_users_keep_their_version_by_the_meshs_bucket_as_the_envoy_filter_computes_it(nginx, pods):
    """The stand-in split requests by weight at random, as Envoy's weighted route: a user's
    requests went to both versions. It now writes the mesh filter's bucket (MurmurHash2 of
    X-User-ID, else of the client's address: nginx's split_clients), so the rollout's routes of
    a split send every user to the version of its bucket's range, the same one request after
    request, and the pods are sent the bucket."""
    pods.add("v1-a", "1")
    pods.add("v2-a", "2")
    port, _ = serve(
        nginx, pods, *istio({"route": [{"version": "1", "weight": 80}, {"version": "2", "weight": 20}]}, ["1", "2"])
    )
    rng = random.Random(5)
    keys = [f"user-{i}".encode() for i in range(1000)]
    keys += [bytes(rng.randrange(0x21, 0x7F) for _ in range(rng.randrange(1, 60))) for _ in range(1000)]
    keys += ["ünïcode-user".encode(), b"\xff\xfe"]
    for i, key in enumerate(keys):
        call(port, headers={"X-User-ID": key, "X-Request-ID": str(i), "X-Rollout-Bucket": "0"})  # type: ignore[dict-item]
    call(port, headers={"X-Request-ID": "no-user"})
    call(port, headers={"X-Request-ID": "empty-user", "X-User-ID": ""})
    wait_for(lambda: len(log_lines(nginx)) == len(keys) + 2, "an access-log line per request")
    logged = {line["request_id"]: line for line in log_lines(nginx)}
    for i, key in enumerate(keys):
        user = key.split(b",", 1)[0] or b"127.0.0.1"  # its first element (mesh.user_key; no blanks here)
        expected = min(murmur_hash2(user) // BUCKET_SPAN, BUCKETS - 1)
        line = logged[str(i)]
        assert int(line["bucket"]) == expected, key
        assert (line["route"], line["subset"]) == (("default:v2", "v2") if expected >= 8000 else ("default:v1", "v1"))
    for rid in ("no-user", "empty-user"):  # the client's address
        assert int(logged[rid]["bucket"]) == user_bucket("127.0.0.1")
    share = sum(logged[str(i)]["subset"] == "v2" for i in range(len(keys))) / len(keys)
    assert 0.17 <= share <= 0.23  # 20% of the users
    again = [call(port, headers={"X-User-ID": "user-7"}).pod for _ in range(20)]
    assert again == [again[0]] * 20
    seen = next(r for p in pods.pods for r in p.requests if r["request_id"] == "no-user")
    assert seen["pod"] == f"v{1 if user_bucket('127.0.0.1') < 8000 else 2}-a"
    assert seen["bucket"] == str(user_bucket("127.0.0.1"))


def call_raw(port: int, headers: list[tuple[str, str]]) -> None:
    """A request with ``headers`` as given, a name repeated if it is (``call`` sends a dict)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        conn.putrequest("POST", INFER)
        for name, value in [*headers, ("Content-Length", "2")]:
            conn.putheader(name, value)
        conn.endheaders(b"{}")
        conn.getresponse().read()
    finally:
        conn.close()


@pytest.mark.integration
def test_a_repeated_or_listed_user_id_is_bucketed_by_its_first_value_as_envoy_is(nginx, pods):
    """X-User-ID sent twice, or as a list in one header: nginx hashed the first header's value
    whole ("a, b" as such), Envoy's Lua the values joined by "," ("a,b"), so the one-machine
    cluster and production put the same request on different versions. Both now hash the
    first element of the list (what an HTTP list of one header or of several reads first),
    spaces and tabs around it trimmed; an empty one is no user id (the client's address)."""
    pods.add("v1-a", "1")
    pods.add("v2-a", "2")
    port, _ = serve(
        nginx, pods, *istio({"route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]}, ["1", "2"])
    )
    sent = {
        "twice": [("X-User-ID", "user-7"), ("X-User-ID", "user-9")],
        "listed": [("X-User-ID", "user-7, user-9")],
        "listed-tight": [("X-User-ID", "user-7,user-9")],
        "spaced": [("X-User-ID", "user-7 \t, user-9")],
        "empty-first": [("X-User-ID", ", user-9")],
        "empty-then": [("X-User-ID", ""), ("X-User-ID", "user-9")],
    }
    for rid, headers in sent.items():
        call_raw(port, [("X-Request-ID", rid), *headers])
    wait_for(lambda: len(log_lines(nginx)) == len(sent), "an access-log line per request")
    logged = {line["request_id"]: int(line["bucket"]) for line in log_lines(nginx)}
    for rid in ("twice", "listed", "listed-tight", "spaced"):
        assert logged[rid] == user_bucket("user-7"), rid
    assert logged["empty-first"] == user_bucket("127.0.0.1")
    assert logged["empty-then"] == user_bucket("127.0.0.1")  # the first header's value is empty
    for rid, headers in sent.items():  # what the EnvoyFilter's Lua hashes (mesh.user_key)
        assert user_bucket(user_key(",".join(v for _, v in headers)) or "127.0.0.1") == logged[rid], rid


@pytest.mark.integration
def test_a_virtual_service_of_the_most_routes_it_takes_is_served(nginx, pods):
    """nginx reads a parameter of at most 4 KB: the one map that concatenated every route's match
    flag to find the first that matches was refused for a VirtualService of about 270 routes, under
    the MAX_ROUTES the data plane takes (and a policy of 256 rules renders)."""
    pods.add("v1-a", "1")
    pods.add("v2-a", "2")
    http = [
        {"name": f"r{k}", "match": [{"headers": {"x-tenant": {"exact": f"t{k}"}}}], "route": [dest("1")]}
        for k in range(MAX_ROUTES - 2)
    ]
    http.append({"name": "last", "match": [{"headers": {"x-tenant": {"exact": "last"}}}], "route": [dest("2")]})
    http.append({"name": "default", "route": [dest("1")]})
    port, _ = serve(nginx, pods, raw_vs(http), render_destination_rule(TARGET, ["1", "2"]))
    assert call(port, headers={"X-Tenant": "last"}).pod == "v2-a"
    assert call(port, headers={"X-Tenant": "t0"}).pod == "v1-a"
    assert call(port).pod == "v1-a"
    wait_for(lambda: len(log_lines(nginx)) == 3, "an access-log line per request")
    assert [line["route"] for line in log_lines(nginx)] == ["last", "r0", "default"]


@pytest.mark.integration
def test_a_zero_weight_destination_gets_nothing(nginx, pods):
    pods.add("v1-a", "1")
    pods.add("v2-a", "2")
    vs = raw_vs([{"name": "default", "route": [dest("1", 100), dest("2", 0)]}])
    port, _ = serve(nginx, pods, vs, render_destination_rule(TARGET, ["1", "2"]))
    assert Counter(call(port).pod for _ in range(100)) == {"v1-a": 100}


@pytest.mark.integration
def test_header_rules_match_exactly_by_prefix_or_by_full_regex(nginx, pods):
    for v in "12345":
        pods.add(f"v{v}", v)
    rules = [
        {"name": "exact", "match": {"headers": {"x-user": {"exact": "a.b"}}}, "route": [{"version": "2"}]},
        {"name": "prefix", "match": {"headers": {"x-user": {"prefix": "be"}}}, "route": [{"version": "3"}]},
        {"name": "regex", "match": {"headers": {"x-user": {"regex": "c[0-9]+"}}}, "route": [{"version": "4"}]},
        {"name": "quoted", "match": {"headers": {"x-user": {"exact": 'q"};{'}}}, "route": [{"version": "5"}]},
    ]
    port, _ = serve(nginx, pods, *istio({"rules": rules, "route": [{"version": "1"}]}, ["1", "2", "3", "4", "5"]))
    expected = {
        "a.b": "v2",
        "axb": "v1",  # the dot is a literal, not "any character"
        "A.B": "v1",  # values compare with case
        "a.bc": "v1",  # exact is not a prefix
        "beta": "v3",
        "Beta": "v1",
        "c12": "v4",
        "c12x": "v1",  # the regex matches the whole value
        "xc12": "v1",
        'q"};{': "v5",  # quotes and braces are literals, not configuration
        "q": "v1",
    }
    got = {value: call(port, headers={"X-User": value}).pod for value in expected}
    assert got == expected
    assert call(port, headers={"x-USER": "a.b"}).pod == "v2"  # header names compare without case
    assert call(port).pod == "v1"  # no header: no rule matches
    routes = [line["route"] for line in log_lines(nginx)[:3]]  # logged when finalized: in order here
    assert routes == ["exact", "default", "default"]


@pytest.mark.integration
def test_a_regex_rule_matches_characters_as_envoys_re2_does(nginx, pods):
    """Envoy's RE2 reads a header as UTF-8, so "caf." matches "café" (as the model server's RE2);
    nginx's PCRE read bytes, the "é" two of them, and sent the request to the default route."""
    for name, version in (("v1", "1"), ("v2", "2")):
        pods.add(name, version)
    rules = [{"name": "dot", "match": {"headers": {"x-user": {"regex": "caf.[0-9]"}}}, "route": [{"version": "2"}]}]
    raw = {"rules": rules, "route": [{"version": "1"}]}
    port, _ = serve(nginx, pods, *istio(raw, ["1", "2"]))
    for value in ("café7", "cafe7", "caf\u65e57"):
        assert policy(raw).choose({"x-user": value}, "u")[0] == "2"
        assert call(port, headers={"X-User": value.encode()}).pod == "v2", value
    assert call(port, headers={"X-User": "café77".encode()}).pod == "v1"
    assert call(port, headers={"X-User": b"caf\xe97"}).status == 200  # not UTF-8: still answered


@pytest.mark.integration
def test_pinned_routes_send_a_request_naming_its_version_to_that_version(nginx, pods):
    pods.add("v1", "1")
    pods.add("v2", "2")
    port, _ = serve(nginx, pods, *istio({"route": [{"version": "1"}]}, ["1", "2"]))
    assert call(port, "/v2/models/digits/versions/2/infer").pod == "v2"
    assert call(port, "/v2/models/digits/versions/2/infer?probe=1").pod == "v2"  # the query is not the path
    assert call(port, "/v2/models/digits/versions/22/infer").pod == "v1"
    assert call(port, "/v2/models/digits/versions/2").pod == "v2"  # the version's metadata
    assert call(port, "/x/v2/models/digits/versions/2/infer").pod == "v1"  # the regex matches the whole path
    assert call(port, headers={"X-Model-Version": "2"}).pod == "v2"
    assert call(port, headers={"X-Model-Version": "3"}).pod == "v1"  # not deployed: no pinned route
    assert call(port, headers={"X-Model-Version": "02"}).pod == "v2"  # version 2 to the server too
    assert call(port, "/v2/models/digits/versions/002/infer").pod == "v2"
    assert call(port, headers={"X-Model-Version": "20"}).pod == "v1"
    assert call(port).pod == "v1"
    answer = call(port, "/v2/models/digits/versions/2/infer?probe=1")
    assert answer.seen["path"] == "/v2/models/digits/versions/2/infer?probe=1"  # passed on as sent
    assert answer.seen["host"] == f"127.0.0.1:{port}"  # the client's Host


@pytest.mark.integration
def test_the_first_matching_route_wins_entries_or_conditions_and(nginx, pods):
    for v in "123":
        pods.add(f"v{v}", v)
    vs = raw_vs(
        [
            {
                "name": "both",
                "match": [{"headers": {"x-a": {"exact": "1"}, "x-b": {"exact": "1"}}}],
                "route": [dest("1")],
            },
            {
                "name": "either",
                "match": [{"headers": {"x-a": {"exact": "1"}}}, {"uri": {"prefix": "/either/"}}],
                "route": [dest("2")],
            },
            {"name": "rest", "route": [dest("3")]},
            {"name": "unreachable", "match": [{"uri": {"exact": INFER}}], "route": [dest("1")]},
        ]
    )
    port, _ = serve(nginx, pods, vs, render_destination_rule(TARGET, ["1", "2", "3"]))
    assert call(port, headers={"x-a": "1", "x-b": "1"}).pod == "v1"  # "either" matches too: the first wins
    assert call(port, headers={"x-a": "1"}).pod == "v2"  # one condition of two: not "both"
    assert call(port, "/either/x").pod == "v2"  # either entry
    assert call(port, headers={"x-b": "1"}).pod == "v3"
    assert call(port).pod == "v3"  # the catch-all comes before "unreachable"


@pytest.mark.integration
def test_requests_nothing_can_serve_get_envoys_answers_never_another_subset(nginx, pods):
    v1 = pods.add("v1", "1")
    pods.add("v2-starting", "2", ready=False)
    vs = raw_vs(
        [
            {"name": "starting", "match": [{"headers": {"x-to": {"exact": "v2"}}}], "route": [dest("2")]},
            {"name": "undeclared", "match": [{"headers": {"x-to": {"exact": "v9"}}}], "route": [dest("9")]},
            {"name": "stable", "match": [{"headers": {"x-to": {"exact": "v1"}}}], "route": [dest("1")]},
        ]
    )
    port, _ = serve(nginx, pods, vs, render_destination_rule(TARGET, ["1", "2"]))
    assert call(port, headers={"x-to": "v2"}) == Answer(503, b"no healthy upstream")
    assert call(port, headers={"x-to": "v9"}) == Answer(503, b"")  # Envoy: cluster not found
    assert call(port) == Answer(404, b"")  # Envoy: no route matched
    assert v1.requests == []
    assert call(port, headers={"x-to": "v1"}).pod == "v1"
    wait_for(lambda: len(log_lines(nginx)) == 4, "an access-log line per request")
    assert [(line["status"], line["route"], line["subset"]) for line in log_lines(nginx)] == [
        (503, "starting", "v2"),
        (503, "undeclared", "v9"),
        (404, "", ""),
        (200, "stable", "v1"),
    ]


@pytest.mark.integration
def test_a_pod_that_refuses_connections_is_retried_on_another_of_its_subset(nginx, pods):
    dead, alive = pods.add("v1-dead", "1"), pods.add("v1-alive", "1")
    pods.add("v2", "2")
    dead.kill()  # still listed as ready: the endpoints have not caught up yet
    port, _ = serve(nginx, pods, *istio({"route": [{"version": "1"}]}, ["1", "2"]))
    answers = [call(port, body=b'{"n": %d}' % i) for i in range(10)]
    assert [(a.status, a.pod) for a in answers] == [(200, "v1-alive")] * 10  # POSTs, none lost, none to v2
    wait_for(lambda: len(log_lines(nginx)) == 10, "an access-log line per request")
    tried = [line["upstream_addr"] for line in log_lines(nginx)]
    assert f"{dead.address}, {alive.address}" in tried  # the refused pod, then the other one
    assert len(alive.requests) == 10


# -- mirroring ---------------------------------------------------------------------------


@pytest.mark.integration
def test_a_mirrored_request_is_copied_to_the_shadow_with_its_body_and_never_awaited(nginx, pods):
    primary, shadow = pods.add("v1", "1"), pods.add("v2", "2")
    port, _ = serve(nginx, pods, *istio({"route": [{"version": "1"}], "mirror": {"version": "2"}}, ["1", "2"]))
    shadow.hold.clear()  # the shadow is slow: it answers the copy only when the test says
    body = os.urandom(2 << 20)  # larger than nginx's body buffer: the copy comes from its temp file
    answer = call(port, body=body, headers={"Content-Type": "application/octet-stream"})
    assert answer.status == 200
    assert answer.pod == "v1"  # the client got the primary's answer while the copy still waits
    wait_for(lambda: len(shadow.requests) == 1, "the copy at the shadow")
    copy_, original = shadow.requests[0], primary.requests[0]
    assert copy_["host"] == f"127.0.0.1-shadow:{port}"
    assert is_shadow_host(copy_["host"])
    assert original["host"] == f"127.0.0.1:{port}"
    assert copy_["body_sha256"] == original["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert (copy_["method"], copy_["path"]) == ("POST", INFER)
    assert copy_["request_id"] == original["request_id"]  # a request id added and passed to both
    assert len(original["request_id"]) == 32
    shadow.hold.set()
    wait_for(lambda: len(log_lines(nginx)) == 1, "the request's log line")
    line = log_lines(nginx)[0]
    assert (line["mirrored"], line["subset"], line["upstream_addr"]) == ("yes", "v1", primary.address)
    assert call(port, headers={"X-Request-ID": "client-id"}).seen["request_id"] == "client-id"  # the client's kept


@pytest.mark.integration
def test_a_mirror_percentage_copies_that_share_of_requests(nginx, pods):
    pods.add("v1", "1")
    shadow = pods.add("v2", "2")
    raw = {"route": [{"version": "1"}], "mirror": {"version": "2", "percent": 25}}
    port, _ = serve(nginx, pods, *istio(raw, ["1", "2"]))
    assert Counter(call(port).pod for _ in range(400)) == {"v1": 400}
    wait_for(lambda: len(log_lines(nginx)) == 400, "every request finalized (after its copy, if any)")
    mirrored = sum(line["mirrored"] == "yes" for line in log_lines(nginx))
    assert 60 <= mirrored <= 140  # 100 expected; more than 4.5 binomial standard deviations (8.7) either side
    assert len(shadow.requests) == mirrored
    assert all(is_shadow_host(r["host"]) for r in shadow.requests)


@pytest.mark.integration
def test_routes_that_name_their_version_are_not_mirrored(nginx, pods):
    pods.add("v1", "1")
    shadow = pods.add("v2", "2")
    port, _ = serve(nginx, pods, *istio({"route": [{"version": "1"}], "mirror": {"version": "2"}}, ["1", "2"]))
    assert call(port, headers={"X-Model-Version": "1"}).pod == "v1"
    wait_for(lambda: len(log_lines(nginx)) == 1, "the request's log line")
    assert log_lines(nginx)[0]["mirrored"] == "no"
    assert shadow.requests == []


# -- reloads -----------------------------------------------------------------------------


@pytest.mark.integration
def test_changed_weights_are_applied_without_failing_a_request(nginx, pods):
    v1, _ = pods.add("v1", "1"), pods.add("v2", "2")
    port, conf = serve(nginx, pods, *istio({"route": [{"version": "1"}]}, ["1", "2"]))
    v1.hold_prefix = "/slow"
    v1.hold.clear()
    in_flight: list[Answer] = []
    slow = threading.Thread(target=lambda: in_flight.append(call(port, "/slow")))
    slow.start()
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                a = call(port)
            except OSError as exc:  # refused or reset: a failed request, counted
                answers.append((0, repr(exc)))
                continue
            answers.append((a.status, a.pod if a.status == 200 else a.body.decode()))

    client = threading.Thread(target=loop)
    client.start()
    try:
        wait_for(
            lambda: len(v1.requests) > 5 and any(r["path"] == "/slow" for r in v1.requests), "traffic, one request held"
        )
        _, flipped = serve(nginx, pods, *istio({"route": [{"version": "2"}]}, ["1", "2"]), port=port)
        assert nginx.apply(flipped) is False  # unchanged: no reload
        seen = len(answers)
        wait_for(lambda: [p for _, p in answers[seen:]][-20:] == ["v2"] * 20, "20 answers in a row from v2")
    finally:
        v1.hold.set()
        stop.set()
        client.join()
        slow.join(DEADLINE_S)
    assert {status for status, _ in answers} == {200}, Counter(answers)
    assert answers[0] == (200, "v1")
    assert [(a.status, a.pod) for a in in_flight] == [(200, "v1")]  # in flight across the reload: not dropped
    assert nginx.conf_path.read_text() == flipped != conf


@pytest.mark.integration
def test_a_reload_returns_once_no_old_worker_accepts_connections(nginx, pods):
    """New workers serve the new configuration while the old ones, until they take the reload,
    still accept connections by the old one: a model's first request right after its install
    was answered 503 (no healthy upstream) by an old worker. An old worker held stopped keeps
    the reload from returning; once it runs again it closes its listening sockets, and every
    connection from then on is the new configuration's."""
    import signal

    from devstack.processes import children

    pods.add("v1", "1"), pods.add("v2", "2")
    port, _ = serve(nginx, pods, *istio({"route": [{"version": "1"}]}, ["1", "2"]))
    assert call(port).pod == "v1"
    assert nginx.pid is not None
    [old] = children(nginx.pid)
    flipped = render_nginx(
        *([x] for x in istio({"route": [{"version": "2"}]}, ["1", "2"])),
        pods.endpoints,
        {("ml", TARGET.name): port},
        nginx.workdir,
    )
    os.kill(old, signal.SIGSTOP)  # as an old worker the scheduler has not run yet
    applied = threading.Thread(target=nginx.apply, args=(flipped,))
    try:
        applied.start()
        wait_for(lambda: children(nginx.pid) - {old}, "the new workers")
        applied.join(1.0)
        assert applied.is_alive()  # the stopped worker still listens: not returned
    finally:
        os.kill(old, signal.SIGCONT)
    applied.join(DEADLINE_S)
    assert not applied.is_alive()
    assert [call(port).pod for _ in range(20)] == ["v2"] * 20


@pytest.mark.integration
def test_clients_that_keep_their_connection_lose_no_request_to_a_reload(nginx, pods):
    """tritonclient keeps its connections open; a reload's old workers close their idle ones.
    Four such clients through 30 reloads: every request answered (each response says
    Connection: close, so no idle connection is left to race the close)."""
    pods.add("v1", "1"), pods.add("v2", "2")
    port, _ = serve(nginx, pods, *istio({"route": [{"version": "1"}]}, ["1", "2"]))
    failures: list[str] = []
    answered: Counter[str] = Counter()
    stop = threading.Event()

    def keepalive_client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
        while not stop.is_set():
            try:
                conn.request("POST", INFER, body=b"{}")
                r = conn.getresponse()
                body = r.read()
                answered[str(r.status)] += 1
                if r.status != 200:
                    failures.append(f"{r.status} {body[:100]!r}")
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
                conn.close()
        conn.close()

    clients = [threading.Thread(target=keepalive_client) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        for i in range(30):
            serve(nginx, pods, *istio({"route": [{"version": "2" if i % 2 == 0 else "1"}]}, ["1", "2"]), port=port)
            time.sleep(0.05)
    finally:
        stop.set()
        for c in clients:
            c.join(DEADLINE_S)
    assert failures == [], (failures[:5], answered)
    assert answered["200"] > 30


@pytest.mark.integration
def test_a_configuration_nginx_refuses_is_not_installed_and_the_old_one_serves(nginx, pods):
    pods.add("v1", "1")
    port, conf = serve(nginx, pods, *istio({"route": [{"version": "1"}]}, ["1"]))
    broken = conf.replace("keepalive 16;", "keepalive sixteen;", 1)
    with pytest.raises(DataPlaneError, match=r"nginx refused the configuration.*keepalive"):
        nginx.apply(broken)
    assert nginx.conf_path.read_text() == conf
    assert call(port).pod == "v1"


@pytest.mark.integration
def test_a_configuration_nginx_cannot_load_is_rolled_back_and_the_old_one_serves(nginx, pods):
    pods.add("v1", "1")
    vs, dr = istio({"route": [{"version": "1"}]}, ["1"])
    port, conf = serve(nginx, pods, vs, dr)
    other = copy.deepcopy(vs)
    other["metadata"]["name"] = "other"
    with socket.create_server(("127.0.0.1", 0)) as taken:  # nginx -t does not bind: only the reload finds out
        listen = {("ml", "digits"): port, ("ml", "other"): taken.getsockname()[1]}
        with pytest.raises(DataPlaneError, match=r"did not take the new configuration.*\[emerg\].*bind"):
            nginx.apply(render_nginx([vs, other], [dr], pods.endpoints, listen, nginx.workdir))
    assert nginx.conf_path.read_text() == conf
    assert call(port).pod == "v1"


@pytest.mark.integration
def test_an_object_the_data_plane_cannot_reproduce_is_refused_while_the_old_one_serves(nginx, pods):
    pods.add("v1", "1")
    vs, dr = istio({"route": [{"version": "1"}]}, ["1"])
    port, conf = serve(nginx, pods, vs, dr)
    bad = copy.deepcopy(vs)
    bad["spec"]["http"][-1]["fault"] = {"abort": {"httpStatus": 500, "percentage": {"value": 100}}}
    with pytest.raises(
        ValueError, match=r"VirtualService ml/digits route 'default' \(spec.http\[1\]\): fault not supported"
    ):
        render_nginx([bad], [dr], pods.endpoints, {("ml", "digits"): port}, nginx.workdir)
    assert nginx.conf_path.read_text() == conf
    assert call(port).pod == "v1"


@pytest.mark.integration
def test_a_request_no_rule_matches_takes_the_default_route_behind_many_rules(nginx, pods):
    """The first matching route was a chain of maps, each asking the next: nginx evaluates
    variables at most 100 deep ("cycle while evaluating variable"), so behind about 95 rules a
    request that matched none of them got 404 (no route) instead of the default route's version."""
    pods.add("v1", "1")
    pods.add("v2", "2")
    rules = [{"match": {"headers": {"x-tenant": {"exact": f"t{i}"}}}, "route": [{"version": "2"}]} for i in range(200)]
    port, _ = serve(nginx, pods, *istio({"rules": rules, "route": [{"version": "1"}]}, ["1", "2"]))
    assert call(port, headers={"X-Tenant": "t0"}).pod == "v2"
    assert call(port, headers={"X-Tenant": "t199"}).pod == "v2"
    assert call(port, headers={"X-Tenant": "other"}).pod == "v1"
    assert call(port).pod == "v1"
    assert "cycle while evaluating" not in nginx.error_log.read_text()


@pytest.mark.integration
def test_a_policy_at_the_policys_limits_is_served(nginx, pods):
    """The model server and Istio take 256 rules, 64 headers a rule and a route over 20 versions;
    nginx refused more than 256 routes (the pinned routes and the default come with the rules), 16
    headers and 16 destinations: a policy that routed in both was refused on the one-machine
    cluster. The policy now bounds an exact or prefix value as it bounds a regex (1,024)."""
    from model_server.traffic import MAX_RULE_HEADERS, MAX_RULES, MAX_VALUE_CHARS

    versions = [str(v) for v in range(1, 21)]
    for v in versions:
        pods.add(f"v{v}", v)
    value = "v" * MAX_VALUE_CHARS
    rules = [
        {"match": {"headers": {"x-tenant": {"exact": f"t{i}"}}}, "route": [{"version": "2"}]}
        for i in range(MAX_RULES - 1)
    ]
    many = {f"x-h{i}": {"prefix": "a"} for i in range(MAX_RULE_HEADERS - 1)}
    rules.append({"match": {"headers": {"x-long": {"exact": value}, **many}}, "route": [{"version": "3"}]})
    raw = {"rules": rules, "route": [{"version": v, "weight": 5} for v in versions]}
    port, _ = serve(nginx, pods, *istio(raw, versions))
    assert call(port, headers={"X-Tenant": "t254"}).pod == "v2"
    headers = {"X-Long": value, **{f"X-H{i}": "ab" for i in range(MAX_RULE_HEADERS - 1)}}
    assert call(port, headers=headers).pod == "v3"
    assert {call(port).pod for _ in range(60)} <= {f"v{v}" for v in versions}
    too_long = {**rules[-1], "match": {"headers": {"x-long": {"exact": value + "v"}}}}
    with pytest.raises(PolicyError, match=r"x-long\.exact is 1025 characters long; at most 1024"):
        policy({"rules": [too_long], "route": raw["route"]})


# -- what is refused (no nginx needed) ---------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda vs: vs["spec"]["http"][1]["match"][0].update(queryParams={"a": {"exact": "1"}}),
            r"route 'beta' .*match\[0\]: queryParams not supported",
        ),
        (lambda vs: vs["spec"]["http"][1].update(retries={"attempts": 3}), r"route 'beta' .*: retries not supported"),
        (
            lambda vs: vs["spec"]["http"][1]["match"][0]["headers"].update(x={"regex": r"(a)\1"}),
            r"route 'beta' .*headers\.x\.regex .*RE2",
        ),
        (lambda vs: vs["spec"]["http"][1]["match"][0]["headers"].update(x={"regex": "(?P<n>a)"}), r"named groups"),
        (
            lambda vs: vs["spec"]["http"][1]["match"][0]["headers"].update(x={"regex": "a*"}),
            r"headers\.x\.regex .*matches an empty value",
        ),
        (
            lambda vs: vs["spec"]["http"][1]["match"][0]["headers"].update(x={"exact": ""}),
            r"headers\.x\.exact is empty",
        ),
        (
            lambda vs: vs["spec"]["http"][1]["match"][0]["headers"].update(x={"suffix": "a"}),
            r"headers\.x: suffix not supported",
        ),
        (
            lambda vs: vs["spec"]["http"][1]["match"][0]["headers"].update(x_y={"exact": "a"}),
            r"'x_y' is not a header name",
        ),
        (
            lambda vs: vs["spec"]["http"][1]["match"][0]["headers"].update(
                {f"h{i}": {"exact": "a"} for i in range(MAX_HEADERS)}
            ),
            rf"at most {MAX_HEADERS} headers",
        ),
        (
            lambda vs: vs["spec"]["http"][1]["match"].extend([{"uri": {"prefix": "/"}}] * 64),
            r"match must be a list of 1 to 64",
        ),
        (
            lambda vs: vs["spec"]["http"].extend([vs["spec"]["http"][1]] * MAX_ROUTES),
            rf"spec.http must be a list of 1 to {MAX_ROUTES} routes",
        ),
        (lambda vs: vs["spec"]["http"][1].update(name="a$b"), r"route 'a\$b' .*name must be"),
        (
            lambda vs: vs["spec"]["http"][1]["route"][0]["destination"].update(host="api.example.com"),
            r"'api.example.com' is not a Service of this cluster",
        ),
        (
            lambda vs: vs["spec"]["http"][1].update(route=[dest("1", 0), dest("2", 0)]),
            r"route 'beta' .*every weight is 0",
        ),
        (
            lambda vs: vs["spec"]["http"][1].update(
                mirror={"host": "digits", "subset": "v1"}, mirrorPercentage={"value": 150}
            ),
            r"mirrorPercentage.value must be a number from 0 to 100",
        ),
        (lambda vs: vs["spec"].update(tcp=[]), r"VirtualService ml/digits spec: tcp not supported"),
        (lambda vs: vs["metadata"].update(name="other"), r"VirtualService ml/other: no loopback port"),
    ],
)
def test_what_the_data_plane_cannot_reproduce_is_refused_by_name(mutate, expected):
    rule = {"name": "beta", "match": {"headers": {"x-user": {"exact": "b"}}}, "route": [{"version": "1"}]}
    vs, dr = istio({"rules": [rule], "route": [{"version": "1"}]}, ["1"])  # http: pinned-v1, beta, default
    mutate(vs)
    with pytest.raises(ValueError, match=expected):
        render_nginx([vs], [dr], lambda ns, labels: ["127.0.0.1:9"], {("ml", "digits"): 8000}, Path("/tmp/w"))


def test_destination_rules_for_one_service_twice_are_refused():
    vs, dr = istio({"route": [{"version": "1"}]}, ["1"])
    other = copy.deepcopy(dr)
    other["metadata"]["name"] = "digits-2"
    other["spec"]["host"] = "digits"  # the same Service, by its short name
    with pytest.raises(
        ValueError, match=r"DestinationRule ml/digits-2: another DestinationRule already covers digits.ml"
    ):
        render_nginx([vs], [dr, other], lambda ns, labels: [], {("ml", "digits"): 8000}, Path("/tmp/w"))


def test_one_object_the_data_plane_cannot_take_does_not_hold_back_the_others():
    """As istiod: a VirtualService it cannot push is reported and keeps its last accepted
    version; another VirtualService's change goes through in the same push."""
    digits, dr = istio({"route": [{"version": "1"}]}, ["1", "2"])
    mnist = raw_vs([{"name": "default", "route": [dest("1")]}], name="mnist")
    listen = {("ml", "digits"): 8000, ("ml", "mnist"): 8001}
    accepted: dict = {}

    def render(*vss: dict) -> tuple[str, list[str]]:
        return render_accepted(list(vss), [dr], lambda ns, labels: ["127.0.0.1:9"], listen, Path("/tmp/w"), accepted)

    first, refused = render(digits, mnist)
    assert refused == []
    bad = copy.deepcopy(digits)
    bad["spec"]["http"][-1]["fault"] = {"abort": {"httpStatus": 500}}
    moved = copy.deepcopy(mnist)
    moved["spec"]["http"][-1]["route"] = [dest("2")]
    conf, refused = render(bad, moved)
    assert len(refused) == 1
    assert "VirtualService ml/digits route 'default'" in refused[0]
    assert "fault not supported" in refused[0]
    assert refused[0].endswith("; its last accepted version stays in effect")
    assert conf == render_nginx([digits, moved], [dr], lambda ns, labels: ["127.0.0.1:9"], listen, Path("/tmp/w"))
    assert conf != first  # mnist's change went through
    unknown = raw_vs([{"name": "default", "route": [dest("1")]}], name="other")  # no port, never accepted
    conf, refused = render(digits, moved, unknown)
    assert refused == ["VirtualService ml/other: no loopback port to serve it on (listen: None)"]
    assert conf == render_nginx([digits, moved], [dr], lambda ns, labels: ["127.0.0.1:9"], listen, Path("/tmp/w"))


def test_short_and_full_service_hosts_name_the_same_pods():
    asked: list[tuple[str, dict[str, str]]] = []

    def endpoints(namespace: str, labels: dict[str, str]) -> list[str]:
        asked.append((namespace, labels))
        return ["127.0.0.1:9"]

    vs = raw_vs(
        [
            {
                "route": [
                    {"destination": {"host": "digits", "subset": "v1"}, "weight": 50},
                    {"destination": {"host": "digits.ml", "subset": "v2"}, "weight": 50},
                ]
            }
        ]
    )
    dr = render_destination_rule(TARGET, ["1", "2"])
    conf = render_nginx([vs], [dr], endpoints, {("ml", "digits"): 8000}, Path("/tmp/w"))
    assert sorted(asked, key=str) == [
        ("ml", {"app": "digits", "version": "1"}),
        ("ml", {"app": "digits", "version": "2"}),
    ]
    assert "50.00% v1.digits.ml;" in conf
    assert "* v2.digits.ml;" in conf
    assert "listen 127.0.0.1:8000;" in conf


def test_a_deprecated_mirror_percent_is_taken_as_istio_takes_it():
    """Istio's deprecated integer ``mirrorPercent`` (a VirtualService written before Istio 1.9),
    which the rollout reads as the route's mirror share (``mesh.mirror_share``), was refused by
    the data plane as a field it does not support. It is the mirror's share, ``mirrorPercentage``
    winning where both are set (as in istiod); istiod's refusals are the data plane's: over 100,
    and (as for ``mirrorPercentage``) without a mirror."""
    vs, dr = istio({"route": [{"version": "1"}]}, ["1", "2"])
    route = vs["spec"]["http"][-1]

    def conf(**fields: Any) -> str:
        route.pop("mirrorPercentage", None)
        route.update(mirror={"host": TARGET.host, "subset": "v2"}, **fields)
        return render_nginx([vs], [dr], lambda ns, labels: ["127.0.0.1:9"], {("ml", "digits"): 8000}, Path("/tmp/w"))

    assert "25.00% v2" in conf(mirrorPercent=25)
    said = conf(mirrorPercent=25, mirrorPercentage={"value": 5})
    assert "5.00% v2" in said
    assert "25.00%" not in said
    with pytest.raises(ValueError, match=r"mirrorPercent must be an integer from 0 to 100, got 150"):
        conf(mirrorPercent=150)
    del route["mirror"]
    route["mirrorPercent"] = 25
    with pytest.raises(ValueError, match=r"mirrorPercent without mirror"):
        render_nginx([vs], [dr], lambda ns, labels: ["127.0.0.1:9"], {("ml", "digits"): 8000}, Path("/tmp/w"))
