"""Mesh routers: Istio manifests valid against Istio's CRDs, applied to a Kubernetes API fake; the local router."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from devstack.cluster.kube import FakeKubeAPI
from model_server.traffic import PolicyError, TrafficPolicy
from tests.support import TOKEN
from vision_rollout.mesh import (
    SCHEMAS,
    IstioRouter,
    IstioTarget,
    LocalRouter,
    RouterError,
    make_router,
    policy_from_virtual_service,
    render_destination_rule,
    render_virtual_service,
    routes_to,
    validate_istio,
    wait_unrouted,
)

GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
ISTIO_CRDS = Path(__file__).resolve().parents[2] / "deploy" / "istio" / "crds.yaml"  # Istio's own, verbatim
TARGET = IstioTarget(namespace="models", service="digits", name="digits")
CANARY = TrafficPolicy.from_dict(
    {
        "rules": [
            {
                "name": "acme",
                "match": {"headers": {"x-tenant": {"exact": "acme"}}},
                "route": [{"version": "2", "weight": 100}],
            }
        ],
        "route": [{"version": "1", "weight": 95}, {"version": "2", "weight": 5}],
        "mirror": {"version": "2", "percent": 100},
    }
)


def test_vendored_schemas_are_istios_own():
    meta = json.loads(SCHEMAS.read_text())
    raw = ISTIO_CRDS.read_bytes()
    assert f"bundle\n# sha256 {meta['sha256_of_bundle']}.".encode() in raw  # both from the same bundle
    docs = {d["spec"]["names"]["kind"]: d for d in yaml.load_all(raw, Loader=yaml.CSafeLoader) if d}
    for kind in ("VirtualService", "DestinationRule"):
        v1 = next(v for v in docs[kind]["spec"]["versions"] if v["name"] == "v1")
        assert meta["schemas"][kind]["openAPIV3Schema"] == v1["schema"]["openAPIV3Schema"]


def test_rendered_objects_validate_and_read_back():
    vs = render_virtual_service(TARGET, CANARY)
    validate_istio(vs)
    validate_istio(render_destination_rule(TARGET, ["1", "2", "3"]))
    assert policy_from_virtual_service(vs) == CANARY
    default = vs["spec"]["http"][-1]
    assert default["mirror"] == {"host": "digits.models.svc.cluster.local", "subset": "v2"}
    assert default["mirrorPercentage"] == {"value": 100.0}
    assert "mirror" not in vs["spec"]["http"][0]  # the rule routes to v2 itself
    bad = copy.deepcopy(vs)
    bad["spec"]["http"][0]["match"][0]["headers"]["x-tenant"] = {"exact": 3}
    with pytest.raises(RouterError, match="invalid at spec/http/0/match/0/headers/x-tenant"):
        validate_istio(bad)


@pytest.mark.parametrize(
    ("header", "match", "words"),
    [
        ("x.team", {"exact": "a"}, "x.team: Istio takes header names of letters, digits, '-' and '_' only"),
        ("x~team", {"exact": "a"}, "x~team: Istio takes header names"),
        ("x-team", {"prefix": ""}, "x-team: Istio refuses an empty prefix"),
        ("x-team", {"regex": ""}, "x-team: Istio refuses an empty regex"),
    ],
)
def test_a_rule_istios_admission_webhook_refuses_is_refused_before_the_apply(header, match, words):
    """Istio's CRD schema takes any header name and an empty prefix or regex; istiod's validating
    webhook refuses them, so the apply would fail at the API server. The traffic policy refuses
    them itself; a VirtualService that holds one anyway (an overlay's, by hand) is refused before
    the apply, naming the match."""
    with pytest.raises(PolicyError):
        TrafficPolicy.from_dict(
            {
                "rules": [{"match": {"headers": {header: match}}, "route": [{"version": "2", "weight": 100}]}],
                "route": [{"version": "1", "weight": 100}],
            }
        )
    vs = render_virtual_service(TARGET, CANARY)
    vs["spec"]["http"][0]["match"][0]["headers"] = {header: match}
    with pytest.raises(
        RouterError, match=rf"VirtualService digits: invalid at spec/http/0/match/0/headers/{re.escape(words)}"
    ):
        validate_istio(vs)
    empty_exact = {"rules": [{"match": {"headers": {"x-team": {"exact": ""}}}, "route": [{"version": "2"}]}]}
    validate_istio(
        render_virtual_service(TARGET, TrafficPolicy.from_dict({**empty_exact, "route": [{"version": "1"}]}))
    )


def overlay(fake: FakeKubeAPI) -> None:
    """The model's mesh objects as deploy/'s overlay applies them: version 1 takes it all."""
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    for plural, obj in (
        ("virtualservices", render_virtual_service(TARGET, stable)),
        ("destinationrules", render_destination_rule(TARGET, ["1"])),
    ):
        fake.objects[(plural, "models", "digits")] = {**obj, "metadata": {**obj["metadata"], "resourceVersion": "1"}}


@pytest.fixture
def kube():
    fake = FakeKubeAPI().start()
    overlay(fake)
    cfg = client.Configuration()
    cfg.host = fake.url
    yield fake, client.ApiClient(cfg)
    fake.stop()


@pytest.mark.parametrize("missing", ["virtualservices", "destinationrules"])
def test_istio_router_never_creates_the_meshs_objects(kube, missing):
    """They are the platform's: the workers' Role may get and patch them, not create them. A
    missing one is named, not a 403 from the API server's RBAC, and nothing is written."""
    fake, api = kube
    del fake.objects[(missing, "models", "digits")]
    kind = {"virtualservices": "VirtualService", "destinationrules": "DestinationRule"}[missing]
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    with pytest.raises(RouterError, match=f"{kind} models/digits does not exist: the rollout changes"):
        router.reconcile()
    if missing == "virtualservices":
        with pytest.raises(RouterError, match=f"{kind} models/digits does not exist"):
            router.set_routes(CANARY)
    assert fake.writes() == []
    assert (missing, "models", "digits") not in fake.objects


def test_istio_router_applies_diffs_and_restores(kube):
    fake, api = kube
    original = render_virtual_service(TARGET, TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    fake.objects[("virtualservices", "models", "digits")] = {
        **original,
        "metadata": {**original["metadata"], "resourceVersion": "7"},
    }
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    assert ("destinationrules", "models", "digits") in fake.objects
    writes = len(fake.writes())
    assert router.set_routes(CANARY) is True
    assert router.get_routes() == CANARY
    applied = fake.objects[("virtualservices", "models", "digits")]["spec"]["http"]
    assert [r["name"] for r in applied[:2]] == ["pinned-v1", "pinned-v2"]  # every subset's version
    assert router.set_routes(CANARY) is False  # diff before write: nothing sent
    assert len(fake.writes()) == writes + 1
    w = fake.writes()[-1]
    assert w["content_type"] == "application/apply-patch+yaml"
    assert w["query"]["fieldManager"] == ["model-rollout"]
    assert w["query"]["force"][0] in GO_TRUE  # the API server parses it with Go's strconv.ParseBool
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    assert router.set_routes(stable) is True  # a rollback
    assert router.get_routes() == stable


def test_the_platforms_route_settings_outlive_a_rollout_and_its_rollback(kube):
    """The rollout wrote the VirtualService's routes whole: a timeout, retries or a fault the
    platform set on the default route (and the spec's gateways) were gone from the first stage
    on, also after the rollback. They are kept: on the routes of the same name, and a route new
    to the VirtualService (a rule's, the candidate's pinned route) takes the default route's."""
    fake, api = kube
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    original = render_virtual_service(TARGET, stable, ["1"])
    platform = {"timeout": "7s", "retries": {"attempts": 2, "perTryTimeout": "3s", "retryOn": "5xx"}}
    original["spec"]["http"][-1].update(platform)
    original["spec"]["http"][0]["timeout"] = "30s"  # pinned-v1: the replay's long requests
    original["spec"]["gateways"] = ["mesh", "ml/edge"]
    original["spec"]["exportTo"] = ["."]
    validate_istio(original)
    fake.objects[("virtualservices", "models", "digits")] = {
        **original,
        "metadata": {**original["metadata"], "resourceVersion": "7"},
    }
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    assert router.set_routes(CANARY) is True
    live = fake.objects[("virtualservices", "models", "digits")]["spec"]
    routes = {r["name"]: r for r in live["http"]}
    assert {k: routes["default"][k] for k in platform} == platform
    assert {k: routes["acme"][k] for k in platform} == platform  # the rule's, new: the default's
    assert routes["pinned-v1"]["timeout"] == "30s"
    assert routes["pinned-v2"]["timeout"] == "7s"
    assert routes["default"]["mirror"]["subset"] == "v2"  # the policy's fields are the policy's
    assert (live["gateways"], live["exportTo"]) == (["mesh", "ml/edge"], ["."])
    assert router.get_routes() == CANARY
    assert router.set_routes(CANARY) is False  # kept fields are no change
    assert router.set_routes(stable) is True
    live = fake.objects[("virtualservices", "models", "digits")]["spec"]
    assert {k: live["http"][-1][k] for k in platform} == platform
    assert "mirror" not in live["http"][-1]
    assert router.get_routes() == stable


def test_the_platforms_destination_rule_settings_outlive_a_rollout(kube):
    """The rollout wrote the DestinationRule's spec whole: the platform's traffic policy (its
    connection pool, outlier detection, TLS mode), a subset's own policy and the spec's exportTo
    were gone at the first reconcile, and again when a subset was added. They are kept; the
    rollout sets the host and the subsets' names and labels only."""
    fake, api = kube
    original = render_destination_rule(TARGET, ["1"])
    platform = {
        "connectionPool": {"http": {"idleTimeout": "60s"}},
        "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s"},
        "tls": {"mode": "ISTIO_MUTUAL"},
    }
    original["spec"]["trafficPolicy"] = platform
    original["spec"]["exportTo"] = ["."]
    original["spec"]["subsets"][0]["trafficPolicy"] = {"loadBalancer": {"simple": "LEAST_REQUEST"}}
    validate_istio(original)
    fake.objects[("destinationrules", "models", "digits")] = {
        **original,
        "metadata": {**original["metadata"], "resourceVersion": "7"},
    }
    IstioRouter(TARGET, ["1", "2"], api_client=api).reconcile()
    live = fake.objects[("destinationrules", "models", "digits")]["spec"]
    assert [s["name"] for s in live["subsets"]] == ["v1", "v2"]
    assert (live["trafficPolicy"], live["exportTo"]) == (platform, ["."])
    assert live["subsets"][0]["trafficPolicy"] == {"loadBalancer": {"simple": "LEAST_REQUEST"}}
    IstioRouter(TARGET, ["3"], api_client=api).set_routes(TrafficPolicy.from_dict({"route": [{"version": "3"}]}))
    live = fake.objects[("destinationrules", "models", "digits")]["spec"]
    assert [s["name"] for s in live["subsets"]] == ["v1", "v2", "v3"]  # a subset added
    assert (live["trafficPolicy"], live["exportTo"]) == (platform, ["."])
    assert live["subsets"][0]["trafficPolicy"] == {"loadBalancer": {"simple": "LEAST_REQUEST"}}
    validate_istio(fake.objects[("destinationrules", "models", "digits")])


def test_istio_router_retries_when_the_object_changes_underneath(kube):
    fake, api = kube
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.set_routes(TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    original_get = router._get
    calls = {"n": 0}

    def racing_get(plural):  # another writer bumps the object between the read and the write, once
        live = original_get(plural)
        if plural == "virtualservices":
            calls["n"] += 1
            if calls["n"] == 2:  # the read inside the apply
                fake.touch("virtualservices", "models", "digits", lambda o: o["metadata"].setdefault("labels", {}))
        return live

    router._get = racing_get  # type: ignore[method-assign]
    before = len(fake.writes())
    assert router.set_routes(CANARY) is True
    assert [w["status"] for w in fake.writes()[before:]] == [
        409,
        200,
    ]  # stale resourceVersion, then the retry
    assert router.get_routes() == CANARY


def test_make_router_rejects_unknown_backends():
    with pytest.raises(ValueError, match="unknown mesh backend 'linkerd'"):
        make_router("linkerd")


@pytest.mark.integration
def test_local_router_drives_the_model_server(server_factory, repo_copy, tmp_path):
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    s.load_versions("digits", 1, 2)
    router = make_router("local", url=s.http, model="digits", token=TOKEN, state_file=tmp_path / "original.json")
    router.reconcile()
    assert router.set_routes(CANARY) is True
    assert router.set_routes(CANARY) is False
    assert router.get_routes() == CANARY
    found = TrafficPolicy.from_dict(json.loads((tmp_path / "original.json").read_text()))
    assert found == TrafficPolicy.from_dict({"route": [{"version": "2", "weight": 100}]})  # as reconcile found them
    with pytest.raises(RouterError, match="HTTP 401"):
        LocalRouter(s.http, "digits", token="wrong").get_routes()
    with pytest.raises(RouterError, match="not loaded"):
        router.set_routes(TrafficPolicy.from_dict({"route": [{"version": "5", "weight": 100}]}))


def test_requests_that_name_their_version_reach_that_versions_pods():
    """The weighted route alone sent the replay's /versions/2/infer calls to baseline pods too
    (404, or the wrong version's answer): requests naming a version go to its subset first."""
    import re

    vs = render_virtual_service(TARGET, CANARY, ["2", "1"])
    validate_istio(vs)
    pinned, rest = vs["spec"]["http"][:2], vs["spec"]["http"][2:]
    assert [r["name"] for r in pinned] == ["pinned-v1", "pinned-v2"]
    for route, version in zip(pinned, ("1", "2"), strict=True):
        header, uri = route["match"]
        assert header == {"headers": {"x-model-version": {"exact": version}}}
        assert route["route"] == [{"destination": {"host": TARGET.host, "subset": f"v{version}"}}]
        assert "mirror" not in route  # targeted requests are not traffic: never mirrored
        pattern = re.compile(uri["uri"]["regex"])  # Envoy matches the whole path (no query string)
        assert pattern.fullmatch(f"/v2/models/digits/versions/{version}/infer")
        assert not pattern.fullmatch(f"/v2/models/digits/versions/{version}0/infer")
        assert not pattern.fullmatch("/v2/models/digits/infer")
    assert rest == render_virtual_service(TARGET, CANARY)["spec"]["http"]  # then the policy, as before
    assert policy_from_virtual_service(vs) == CANARY  # read back: the policy only
    raw = {
        "rules": [{"name": "pinned-v9", "match": {"headers": {"x": {"exact": "1"}}}, "route": [{"version": "1"}]}],
        "route": [{"version": "1", "weight": 100}],
    }
    # The server refuses the name too: a policy it served would else be one Istio cannot take.
    with pytest.raises(PolicyError, match=r"rules\[0\]\.name 'pinned-v9': names starting with 'pinned-v' are reserved"):
        TrafficPolicy.from_dict(raw)
    rule = TrafficPolicy.from_dict({**raw, "rules": [{**raw["rules"][0], "name": "x"}]}).rules[0]
    reserved = TrafficPolicy(route=CANARY.route, rules=(dataclasses.replace(rule, name="pinned-v9"),))
    with pytest.raises(RouterError, match="'pinned-v9': names starting with 'pinned-v' are reserved"):
        render_virtual_service(TARGET, reserved, ["1"])


def test_a_versions_metadata_reaches_that_versions_pods():
    """GET /v2/models/m/versions/2 (KServe v2 version metadata, tritonclient's
    get_model_metadata(m, "2")) matched no pinned route, the path having nothing after the
    version: the weighted route sent it to baseline pods, which answered that version 2 is not
    available, while the model server on one machine answered version 2's metadata."""
    import re

    vs = render_virtual_service(TARGET, CANARY, ["1", "2"])
    [uri] = [m["uri"]["regex"] for m in vs["spec"]["http"][1]["match"] if "uri" in m]
    for path in ("/v2/models/digits/versions/2", "/v2/models/digits/versions/2/", "/v2/models/digits/versions/2/ready"):
        assert re.fullmatch(uri, path), path  # Envoy's safe_regex matches the whole path
    for path in ("/v2/models/digits/versions/20", "/v2/models/digits/versions/2x/infer", "/v2/models/digits"):
        assert not re.fullmatch(uri, path), path


def test_what_routes_to_a_version_weights_rules_and_the_mirror():
    assert routes_to(CANARY, "2")  # by its rule
    assert routes_to(TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}), "1")
    only_mirrored = TrafficPolicy.from_dict(
        {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 5}}
    )
    assert routes_to(only_mirrored, "2")
    zero = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}, {"version": "2", "weight": 0}]})
    assert not routes_to(zero, "2")
    assert not routes_to(zero, "3")


def test_a_version_is_drained_only_once_the_mesh_routes_nothing_to_it(kube):
    fake, api = kube
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.set_routes(
        TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]})
    )
    with pytest.raises(RouterError, match=r"the mesh still routes to version 1 after 0\.2 s"):
        wait_unrouted(router, "1", drain_s=0, timeout_s=0.2, every_s=0.05)
    router.set_routes(TrafficPolicy.from_dict({"route": [{"version": "2", "weight": 100}]}))
    gets = sum(r["method"] == "GET" for r in fake.requests)
    wait_unrouted(router, "1", drain_s=0)
    assert sum(r["method"] == "GET" for r in fake.requests) == gets + 1  # read back once, from the mesh


def test_a_version_gets_its_subset_before_the_virtual_service_routes_to_it(kube):
    """set_routes alone (``rolloutctl mesh apply --backend istio``, a step that did not reconcile)
    wrote a VirtualService sending 10% to subset v2 of a DestinationRule that had only v1: Envoy
    answers 503 for that share. The subset is added first; none is taken away."""
    fake, api = kube
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    before = len(fake.writes())
    router.set_routes(
        TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]})
    )
    writes = [w["path"].rsplit("/", 2)[-2] for w in fake.writes()[before:]]
    assert writes == ["destinationrules", "virtualservices"]  # the subset, then the route to it
    subsets = fake.objects[("destinationrules", "models", "digits")]["spec"]["subsets"]
    assert [s["name"] for s in subsets] == ["v1", "v2"]
    router = IstioRouter(TARGET, ["2"], api_client=api)  # a promotion: v1's subset stays
    router.set_routes(TrafficPolicy.from_dict({"route": [{"version": "2", "weight": 100}]}))
    assert [s["name"] for s in fake.objects[("destinationrules", "models", "digits")]["spec"]["subsets"]] == [
        "v1",
        "v2",
    ]
    assert fake.writes()[-1]["path"].endswith("/virtualservices/digits")


@pytest.mark.parametrize(
    ("destination", "words"), [({"host": "h"}, "KeyError 'subset'"), ({"host": "h", "subset": "stable"}, "PolicyError")]
)
def test_a_virtual_service_edited_by_hand_is_named_not_a_traceback(kube, destination, words):
    """A route without a subset was a KeyError out of get_routes (the first step, start_from_steady,
    catches RouterError only: a traceback and retries), a subset named 'stable' a PolicyError."""
    fake, api = kube
    fake.touch(
        "virtualservices",
        "models",
        "digits",
        lambda o: o["spec"]["http"][-1].update(route=[{"destination": destination}]),
    )
    with pytest.raises(RouterError, match="VirtualService models/digits is not one the rollout reads") as exc:
        IstioRouter(TARGET, ["1"], api_client=api).get_routes()
    assert words in str(exc.value)


def test_a_header_route_without_a_name_reads_back_as_an_unnamed_rule():
    """Istio's route names are optional: a header route added by hand without one was a KeyError
    (the rollout refused the VirtualService as one it does not read)."""
    from vision_rollout.mesh import policy_from_virtual_service

    vs = {
        "spec": {
            "http": [
                {
                    "match": [{"headers": {"x-tenant": {"exact": "acme"}}}],
                    "route": [{"destination": {"host": "h", "subset": "v2"}}],
                },
                {"name": "default", "route": [{"destination": {"host": "h", "subset": "v1"}, "weight": 100}]},
            ]
        }
    }
    policy = policy_from_virtual_service(vs)
    assert policy.to_dict()["rules"] == [
        {"match": {"headers": {"x-tenant": {"exact": "acme"}}}, "route": [{"version": "2", "weight": 100}]}
    ]


def test_an_api_server_that_never_answers_fails_the_call_in_bounded_time(monkeypatch):
    """A connection the API server accepted and never answered (a hung server, a half-open
    connection) blocked the call for good: the kubernetes client sends no timeout of its own, so
    the task, its teardown too, hung with the routes mid-rollout. Each call now has one; a read
    that timed out is sent again (twice), a write is not: it may have been served."""
    import socket
    import threading
    import time

    from urllib3.exceptions import MaxRetryError, ReadTimeoutError

    from vision_rollout import mesh

    monkeypatch.setattr(mesh, "API_TIMEOUT_S", (1.0, 0.3))
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])  # read nothing, answer nothing
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    config = client.Configuration()
    config.host = f"http://127.0.0.1:{listener.getsockname()[1]}"
    apps = client.AppsV1Api(mesh.with_retries(client.ApiClient(config)))
    try:
        started = time.monotonic()
        with pytest.raises(MaxRetryError) as timed_out:
            apps.read_namespaced_deployment("digits-v1", "models")
        assert isinstance(timed_out.value.reason, ReadTimeoutError)
        assert len(accepted) == 3  # the read, and twice more
        with pytest.raises(ReadTimeoutError):
            apps.patch_namespaced_deployment("digits-v1", "models", {}, field_manager="model-rollout")
        assert len(accepted) == 4  # the write once
        assert time.monotonic() - started < 20
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_a_subset_of_the_platforms_own_outlives_a_rollout(kube):
    """A DestinationRule subset the platform defined beside the versions' (another VirtualService
    routes to it: pods labelled track=debug, say) was dropped at every first stage, and what
    routed to it was answered 503 by Envoy. Only a version's subset the run does not route to
    is dropped."""
    fake, api = kube
    original = render_destination_rule(TARGET, ["1", "7"])
    original["spec"]["subsets"].append({"name": "debug", "labels": {"track": "debug"}})
    fake.objects[("destinationrules", "models", "digits")] = {
        **original,
        "metadata": {**original["metadata"], "resourceVersion": "7"},
    }
    IstioRouter(TARGET, ["1", "2"], api_client=api).reconcile()
    live = fake.objects[("destinationrules", "models", "digits")]
    assert [(s["name"], s["labels"]) for s in live["spec"]["subsets"]] == [
        ("v1", {"version": "1"}),
        ("v2", {"version": "2"}),
        ("debug", {"track": "debug"}),
    ]
    validate_istio(live)
