"""Mesh routers: Istio manifests valid against Istio's CRDs, applied to a Kubernetes API fake; the local router."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import random
import re
from pathlib import Path

import pytest
import re2
import yaml
from kubernetes import client

from devstack.cluster.kube import FakeKubeAPI
from model_server.traffic import BUCKETS, PolicyError, TrafficPolicy
from tests.support import TOKEN
from vision_rollout.mesh import (
    BUCKET_LUA,
    BUCKET_SPAN,
    SCHEMAS,
    IstioRouter,
    IstioTarget,
    LocalRouter,
    RouterError,
    bucket_range_regex,
    make_router,
    murmur_hash2,
    policy_from_virtual_service,
    render_destination_rule,
    render_envoy_filter,
    render_virtual_service,
    routes_to,
    user_bucket,
    user_key,
    validate_istio,
    wait_unrouted,
)

pytestmark = pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)

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
    for kind, version in (("VirtualService", "v1"), ("DestinationRule", "v1"), ("EnvoyFilter", "v1alpha3")):
        served = next(v for v in docs[kind]["spec"]["versions"] if v["name"] == version)
        assert meta["schemas"][kind]["openAPIV3Schema"] == served["schema"]["openAPIV3Schema"]
        assert meta["schemas"][kind].get("version", "v1") == version


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
    bucket = render_envoy_filter()  # the mesh's, in Istio's root namespace
    fake.objects[("envoyfilters", "istio-system", "rollout-bucket")] = {
        **bucket,
        "metadata": {**bucket["metadata"], "resourceVersion": "1"},
    }


@pytest.fixture
def kube(kube_api):
    overlay(kube_api[0])
    return kube_api


@pytest.mark.parametrize("broken", ["missing", "another lua", "gateways only", "before authentication"])
def test_a_split_is_refused_without_the_meshs_bucket_filter_and_nothing_is_written(kube, broken):
    """Without deploy/'s EnvoyFilter (or with one of another Lua) no proxy writes the user's
    bucket, and Istio silently split the candidate's share per request: users switched versions
    at every request. A policy that splits is now refused naming the object and how to install
    it, before any write; one that sends each route to one version needs no bucket."""
    fake, api = kube
    key = ("envoyfilters", "istio-system", "rollout-bucket")
    if broken == "missing":
        del fake.objects[key]
    elif broken == "another lua":
        fake.touch(
            *key,
            lambda f: [
                p["patch"]["value"]["typed_config"]["default_source_code"].update(inline_string="-- an older hash")
                for p in f["spec"]["configPatches"]
            ],
        )
    elif broken == "before authentication":  # the filter as an earlier version rendered it
        fake.touch(*key, lambda f: f["spec"]["configPatches"][1]["patch"].update(operation="INSERT_FIRST"))
    else:
        fake.touch(*key, lambda f: f["spec"]["configPatches"].pop(0))
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    words = {
        "missing": "does not exist",
        "another lua": "is not this rollout's",
        "gateways only": "SIDECAR_OUTBOUND",
        "before authentication": "GATEWAY",
    }
    with pytest.raises(RouterError) as refused:
        router.set_routes(CANARY)
    assert str(refused.value).startswith("EnvoyFilter istio-system/rollout-bucket ")
    assert words[broken] in str(refused.value)
    assert "-k deploy/overlays/<yours>" in str(refused.value)
    assert str(refused.value).endswith("No traffic was moved")
    assert fake.writes() == []
    one_version = TrafficPolicy.from_dict({"route": [{"version": "2", "weight": 100}]})  # a promotion, a rollback
    assert router.set_routes(one_version) is True
    assert router.get_routes() == one_version


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


def test_the_platforms_hosts_outlive_a_rollout_and_its_rollback(kube):
    """The rollout wrote the spec's hosts as the target's (the Service's cluster name, without
    the connection's istio.hosts): a host the platform added for its ingress gateway
    (``digits.example.com`` on ``ml/edge``) was gone from the first stage on, and the gateway
    answered 404 to every outside request. The live hosts are kept, the Service's added where
    missing; a target that names its hosts (istio.hosts) sets them."""
    fake, api = kube
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    original = render_virtual_service(TARGET, stable, ["1"])
    original["spec"]["hosts"] = ["digits.example.com", TARGET.host]
    original["spec"]["gateways"] = ["ml/edge", "mesh"]
    fake.objects[("virtualservices", "models", "digits")] = {
        **original,
        "metadata": {**original["metadata"], "resourceVersion": "7"},
    }
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    assert router.set_routes(CANARY) is True
    assert fake.objects[("virtualservices", "models", "digits")]["spec"]["hosts"] == ["digits.example.com", TARGET.host]
    assert router.set_routes(stable) is True
    assert fake.objects[("virtualservices", "models", "digits")]["spec"]["hosts"] == ["digits.example.com", TARGET.host]
    fake.touch("virtualservices", "models", "digits", lambda vs: vs["spec"].update(hosts=["digits.example.com"]))
    router.set_routes(CANARY)
    assert fake.objects[("virtualservices", "models", "digits")]["spec"]["hosts"] == ["digits.example.com", TARGET.host]
    named = IstioRouter(dataclasses.replace(TARGET, hosts=["digits.internal"]), ["1", "2"], api_client=api)
    named.set_routes(stable)
    assert fake.objects[("virtualservices", "models", "digits")]["spec"]["hosts"] == ["digits.internal"]


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

    def racing_get(plural, *where):  # another writer bumps the object between the read and the write, once
        live = original_get(plural, *where)
        if plural == "virtualservices":
            calls["n"] += 1
            if calls["n"] == 1:  # the read the apply writes from (set_routes', not read again)
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


@pytest.mark.parametrize("kind", ["VirtualService", "DestinationRule"])
def test_what_the_platform_changes_while_the_rollout_writes_is_kept(kube, kind):
    """A 409 on a stale resourceVersion was retried with the body rendered from the object as read
    before it: the very change that made it conflict (a `kubectl edit` of a route's timeout, a
    host the ingress team added, the DestinationRule's outlier detection) was overwritten by the
    retry. Each try renders from the object whose resourceVersion it sends: the change is kept."""
    fake, api = kube
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    plural = {"VirtualService": "virtualservices", "DestinationRule": "destinationrules"}[kind]
    outlier = {"outlierDetection": {"consecutive5xxErrors": 3}}

    def edit(obj):  # another writer's, between the rollout's read and its write
        if kind == "VirtualService":
            obj["spec"]["http"][-1]["timeout"] = "9s"
            obj["spec"]["hosts"].insert(0, "digits.example.com")
        else:
            obj["spec"]["trafficPolicy"] = outlier

    if kind == "VirtualService":
        router.reconcile()
    before = len(fake.writes())
    fake.before_write = lambda: fake.touch(plural, "models", "digits", edit)
    if kind == "VirtualService":
        assert router.set_routes(CANARY) is True
        assert router.get_routes() == CANARY
    else:
        router.reconcile()
    assert [w["status"] for w in fake.writes()[before:]] == [409, 200]  # stale, then the retry
    live = fake.objects[(plural, "models", "digits")]["spec"]
    if kind == "VirtualService":
        assert live["hosts"] == ["digits.example.com", TARGET.host]
        assert {r["name"]: r.get("timeout") for r in live["http"]}["default"] == "9s"
    else:
        assert live["trafficPolicy"] == outlier
        assert [s["name"] for s in live["subsets"]] == ["v1", "v2"]


def test_the_labels_and_annotations_the_overlay_applied_outlive_a_rollout(kube):
    """deploy/'s overlay is applied with the rollout's field manager, so its commonLabels and
    commonAnnotations on the VirtualService and the DestinationRule (a team or cost label that an
    admission policy may require, a GitOps tool's tracking label) are the rollout's fields to the
    API server: its applies, which sent only its own label, removed them at the first stage. They
    are sent as they are, the rollout's own label beside them."""
    fake, api = kube
    labels = {"app.kubernetes.io/managed-by": "model-rollout", "team": "vision", "app.kubernetes.io/part-of": "ml"}
    annotations = {"owner": "vision@example.com"}
    for plural in ("virtualservices", "destinationrules"):
        fake.touch(plural, "models", "digits", lambda o: o["metadata"].update(labels=labels, annotations=annotations))
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    assert router.set_routes(CANARY) is True
    for plural in ("virtualservices", "destinationrules"):
        meta = fake.objects[(plural, "models", "digits")]["metadata"]
        assert (meta["labels"], meta["annotations"]) == (labels, annotations), plural


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
        assert re.fullmatch(header["headers"]["x-model-version"]["regex"], f"00{version}")  # version N to the server
        assert not re.fullmatch(header["headers"]["x-model-version"]["regex"], f"{version}0")
        assert route["route"] == [{"destination": {"host": TARGET.host, "subset": f"v{version}"}}]
        assert "mirror" not in route  # targeted requests are not traffic: never mirrored
        pattern = re.compile(uri["uri"]["regex"])  # Envoy matches the whole path (no query string)
        assert pattern.fullmatch(f"/v2/models/digits/versions/{version}/infer")
        assert pattern.fullmatch(f"/v2/models/digits/versions/0{version}/infer")
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


def test_route_names_are_unique_stable_and_read_back_as_the_policys():
    """An unnamed rule was rendered ``rule-<its index>``, and every name starting ``rule-`` was
    read back as unnamed: a rule named ``rule-0`` came back nameless (the mesh "changed outside
    the rollout" at every look), an unnamed rule's route changed name when a rule was added
    before it (the platform's timeout and retries, kept by name, went to another rule), and a
    rule named ``default`` or a name taken twice gave two routes one name. An unnamed rule's
    route is now named by its match (``rule-`` and 8 hex digits of it): the same whatever the
    rules around it; a name the VirtualService would hold twice is refused, naming it."""

    def rule(headers: dict[str, str], name: str | None = None, version: str = "2") -> dict:
        out = {"match": {"headers": {h: {"exact": v} for h, v in headers.items()}}, "route": [{"version": version}]}
        return {**out, "name": name} if name else out

    split = [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]
    unnamed = rule({"x-tenant": "acme"})
    before = TrafficPolicy.from_dict({"rules": [unnamed], "route": split})
    after = TrafficPolicy.from_dict({"rules": [rule({"x-team": "a"}, "rule-0"), unnamed], "route": split})
    names = [r["name"] for r in render_virtual_service(TARGET, after, ["1", "2"])["spec"]["http"]]
    assert len(names) == len(set(names)), names
    auto = [r["name"] for r in render_virtual_service(TARGET, before, ["1", "2"])["spec"]["http"]][2]
    assert re.fullmatch(r"rule-[0-9a-f]{8}", auto), auto
    assert names[2:] == ["rule-0", auto, "default:v1", "default:v2", "default"]  # the same name, one rule later
    for policy in (before, after):
        assert policy_from_virtual_service(render_virtual_service(TARGET, policy, ["1", "2"])) == policy

    for rules, words in (
        ([rule({"x-team": "a"}, "default")], "'default' is the name of the policy's default route"),
        ([rule({"x-team": "a"}, "acme"), rule({"x-team": "b"}, "acme")], "rules 0 and 1 are both named 'acme'"),
        ([unnamed, rule({"x-tenant": "acme"}, version="1")], "rules 0 and 1 match the same headers"),
        ([rule({"x-team": "b"}, auto), unnamed], f"rules 0 and 1 are both named {auto!r}"),
    ):
        policy = TrafficPolicy.from_dict({"rules": rules, "route": split})
        with pytest.raises(RouterError, match=re.escape(words)):
            render_virtual_service(TARGET, policy, ["1", "2"])


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
    ("destination", "words"),
    [({"host": "digits"}, "KeyError 'subset'"), ({"host": "digits", "subset": "stable"}, "PolicyError")],
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


@pytest.mark.parametrize("where", ["route", "destination rule"])
def test_the_mesh_objects_of_another_service_are_neither_read_nor_written(kube, where):
    """Review s53-1: two models given one VirtualService (a model of ``models`` with a Service of
    its own and the connection-wide VirtualService's name) - the second's rollout read the
    first's routes as its own steady ones and sent the first's requests to its own Service, the
    DestinationRule's host too. A VirtualService that routes or mirrors HTTP requests to another
    Service, or a DestinationRule for one, is refused naming it, and nothing is written."""
    fake, api = kube
    target, other = TARGET, "digits.models.svc.cluster.local"
    if where == "route":  # (letters' target, digits' VirtualService)
        target = IstioTarget(namespace="models", service="letters", name="digits")
    else:
        other = "letters"
        fake.touch("destinationrules", "models", "digits", lambda o: o["spec"].update(host=other))
    kind = "DestinationRule" if where == "destination rule" else "VirtualService"
    router = IstioRouter(target, ["1", "2"], api_client=api)
    before = len(fake.writes())
    with pytest.raises(RouterError, match=re.escape(f"{kind} models/digits is {other}'s, not Service {target.host}'s")):
        router.set_routes(CANARY)
    assert len(fake.writes()) == before
    if where != "destination rule":
        with pytest.raises(RouterError, match="the rollout reads and writes no other Service's routes"):
            router.get_routes()


@pytest.mark.parametrize("kind", ["http", "http with a subset", "tcp", "mirror", "named like the rollout's"])
def test_a_platforms_route_to_another_service_never_holds_back_a_rollback(kube, kind):
    """Review s54-1, s54-2 (HIGH): a route the platform added mid-rollout to another Service (a
    debug route during an incident, its subset "v1" as Istio's examples name them, or a TCP
    route) was read as another model's VirtualService: the rollback was refused and the
    candidate kept its traffic. Only the rollout's own routes (pinned, default) sending to
    another Service's versions are another model's."""
    fake, api = kube
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.set_routes(CANARY)
    debug = {
        "destination": {"host": "reviews.models.svc.cluster.local", **({"subset": "v1"} if "subset" in kind else {})}
    }
    if kind == "tcp":
        fake.touch("virtualservices", "models", "digits", lambda o: o["spec"].update(tcp=[{"route": [debug]}]))
    elif kind == "mirror":
        mirror = {"host": "audit.models.svc.cluster.local", "subset": "v1"}
        fake.touch("virtualservices", "models", "digits", lambda o: o["spec"]["http"][-1].update(mirror=mirror))
    else:
        added = {
            "name": "default:debug" if "named" in kind else "debug",
            "match": [{"headers": {"x-debug": {"exact": "1"}}}],
            "route": [debug],
        }
        fake.touch("virtualservices", "models", "digits", lambda o: o["spec"]["http"].insert(0, added))
    router.set_routes(TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    assert router.get_routes().to_dict()["route"] == [{"version": "1", "weight": 100}]
    if kind == "tcp":  # (an HTTP route of its own the rollout's routes replace, as Flagger's do)
        assert fake.objects[("virtualservices", "models", "digits")]["spec"]["tcp"] == [{"route": [debug]}]
    other = {"destination": {"host": "letters.models.svc.cluster.local", "subset": "v7"}}
    fake.touch("virtualservices", "models", "digits", lambda o: o["spec"]["http"][-1]["route"].append(other))
    with pytest.raises(RouterError, match=re.escape("is letters.models.svc.cluster.local's, not Service")):
        router.set_routes(CANARY)


def test_a_route_to_the_services_short_name_is_its_own():
    """Istio reads a route's host in the VirtualService's namespace: "digits" and "digits.models"
    are the Service digits.models.svc.cluster.local."""
    for host in ("digits", "digits.models", "Digits.models.svc", TARGET.host):
        assert TARGET.is_own(host)
    for host in ("letters", "digits.other", "digits.models.svc.example.org", None, 7):
        assert not TARGET.is_own(host)


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


@pytest.mark.real_pauses  # (its bound: the timeouts and the backoff between them)
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
        with pytest.raises(mesh.ApiUnreachable) as timed_out:
            apps.read_namespaced_deployment("digits-v1", "models")
        assert isinstance(timed_out.value.__context__, MaxRetryError)
        assert isinstance(timed_out.value.__context__.reason, ReadTimeoutError)
        assert len(accepted) == 3  # the read, and twice more
        with pytest.raises(mesh.ApiUnreachable) as write_timed_out:
            apps.patch_namespaced_deployment("digits-v1", "models", {}, field_manager="model-rollout")
        assert isinstance(write_timed_out.value.__context__, ReadTimeoutError)
        assert len(accepted) == 4  # the write once
        assert time.monotonic() - started < 20
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_a_call_the_api_server_never_answers_is_named_with_what_to_check(kube):
    """Connections the API server (or a proxy before it) closed without an answer reached the
    caller, once the client's retries were spent, as urllib3's MaxRetryError or ProtocolError: a
    task failed on a traceback naming neither the call nor the cluster. Each is now an
    ApiUnreachable (a RouterError) naming the call, why, and what to check."""
    from kubernetes.client.exceptions import ApiException

    from vision_rollout.deploy import VersionDeployments
    from vision_rollout.locks import LeaseLock
    from vision_rollout.mesh import ApiUnreachable, with_retries
    from vision_rollout.settings import BuildSettings

    fake, api = kube
    api = with_retries(api)
    api.configuration.retries.backoff_factor = 0
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    reads = [
        (router.get_routes, "GET /apis/networking.istio.io/v1/namespaces/models/virtualservices/digits"),
        (
            lambda: VersionDeployments(TARGET, "digits", api, BuildSettings(gpus=0)).replicas("1"),
            "GET /apis/apps/v1/namespaces/models/deployments/digits-v1",
        ),
        (LeaseLock("digits", "models", api).holding, "GET /apis/coordination.k8s.io/v1/namespaces/models/leases/"),
    ]
    for call, named in reads:
        before = len(fake.requests)
        fake.drop = 3
        with pytest.raises(ApiUnreachable) as failed:
            call()
        assert len(fake.requests) - before == 3  # the read, and twice more
        message = str(failed.value)
        assert message.startswith(f"the Kubernetes API server did not answer {named}")
        assert "after the client's retries: ProtocolError" in message
        assert f"Check that {fake.url} is up and reachable from here" in message
    fake.drop = 1
    with pytest.raises(
        ApiUnreachable,
        match=r"PATCH /apis/apps/v1/namespaces/models/deployments/digits-v1 \(the client does not send a write again",
    ):
        client.AppsV1Api(api).patch_namespaced_deployment("digits-v1", "models", {}, field_manager="model-rollout")
    assert router.get_routes() == TrafficPolicy.from_dict(
        {"route": [{"version": "1", "weight": 100}]}
    )  # answered again
    with pytest.raises(ApiException):  # an answer, a refusal: as it was
        client.AppsV1Api(api).read_namespaced_deployment("digits-v9", "models")


def test_a_call_cut_short_by_the_api_budgets_cap_names_the_budget_not_the_server():
    """A call the failure callback's ``api_budget`` cut short (its time limit what the cap had left,
    spent before the answer) was reported as "the Kubernetes API server did not answer ... Check
    that ... is up and reachable": the server blamed for the step's own time budget. It says the
    step's API time budget ran out, naming the call."""
    import socket

    from kubernetes import client

    from vision_rollout import mesh

    silent = socket.create_server(("127.0.0.1", 0))  # (connections queued, never answered)
    try:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        api = mesh.with_retries(client.ApiClient(cfg))
        with mesh.api_budget(30, 10, cap_s=0.3) as budget:
            with pytest.raises(mesh.ApiUnreachable) as failed:
                client.AppsV1Api(api).read_namespaced_deployment("digits-v1", "models")
            assert budget.capped()
    finally:
        silent.close()
    message = str(failed.value)
    assert "did not answer" not in message
    assert "is up and reachable" not in message
    assert "GET /apis/apps/v1/namespaces/models/deployments/digits-v1" in message
    assert "the step's Kubernetes API time budget ran out" in message


def test_a_call_not_sent_for_a_spent_cap_says_what_a_call_cut_short_by_it_says():
    """A call not sent once the ``api_budget``'s cap was spent said "the calls here took the 0.3 s
    they are allowed in all", one cut short by the same cap "the step's Kubernetes API time budget
    ran out (its calls are allowed 0.3 s in all, whatever they take)": two wordings of one cause.
    Both say it in the same words."""
    import socket

    from kubernetes import client

    from vision_rollout import mesh

    silent = socket.create_server(("127.0.0.1", 0))  # (connections queued, never answered)
    said = []
    try:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        api = mesh.with_retries(client.ApiClient(cfg))
        with mesh.api_budget(30, 10, cap_s=0.3) as budget:
            for name in ("digits-v1", "digits-v2"):  # (cut short, then not sent)
                with pytest.raises(mesh.ApiUnreachable) as failed:
                    client.AppsV1Api(api).read_namespaced_deployment(name, "models")
                said.append(str(failed.value))
            assert budget.capped()
    finally:
        silent.close()
    cut, unsent = said
    assert "digits-v1 was cut short" in cut
    assert "digits-v2 was not sent" in unsent
    cause = "the step's Kubernetes API time budget ran out (its calls are allowed 0.3 s in all, whatever they take)"
    assert cause in cut
    assert cause in unsent


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_a_virtualservice_write_left_unanswered_is_read_back_then_done_or_written_again(kube, served):
    """The VirtualService's apply left without an answer (a connection dropped: served or not,
    nothing says; the client does not send a write again) raised ApiUnreachable and failed the
    stage. The object is read back: the routes in place (served), done; else applied again from
    what was read, once."""
    from vision_rollout.mesh import with_retries

    fake, api = kube
    api = with_retries(api)
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    fake.throttle, fake.throttle_status, fake.throttled_methods = 1, None, frozenset({"PATCH"})
    fake.throttled_path, fake.throttle_served = "/virtualservices/digits", served
    before = len(fake.requests)
    assert router.set_routes(CANARY) is True
    assert router.get_routes() == CANARY
    calls = [
        (r["method"], r["status"]) for r in fake.requests[before:] if r["path"].endswith("/virtualservices/digits")
    ]
    dropped = calls.index(("PATCH", None))
    assert calls[dropped + 1 :] == [("GET", 200)] + ([] if served else [("PATCH", 200)]) + [("GET", 200)]


def test_a_virtualservice_apply_refused_409_and_left_in_doubt_spends_one_budget_of_tries(kube, monkeypatch):
    """The apply's loop of 5 reads, each write refused (409) by another's meanwhile, ran inside
    ``settled``'s 4 tries of a write in doubt: up to 20 PATCHes and 20 GETs, a retry loop inside
    another's (the project's rule: none). A 409 and a write in doubt spend the same tries
    (``mesh.WRITE_TRIES``), and the last error names both."""
    from vision_rollout import mesh
    from vision_rollout.mesh import WRITE_TRIES, RouterError, with_retries

    fake, api = kube
    router = IstioRouter(TARGET, ["1", "2"], api_client=with_retries(api))
    router.set_routes(TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    patches = itertools.count(1)

    def each_write() -> None:  # odd PATCHes refused (another's write first), even ones answered 500 unserved
        if next(patches) % 2:
            fake.touch("virtualservices", "models", "digits", lambda o: None)
        else:
            fake.throttle, fake.throttle_status, fake.throttle_served = 1, 500, False
            fake.throttled_methods, fake.throttled_path = frozenset({"PATCH"}), "/virtualservices/digits"
        fake.before_write = each_write

    before = len(fake.requests)
    fake.before_write = each_write
    try:
        with pytest.raises(RouterError) as failed:
            router.set_routes(CANARY)
    finally:
        fake.before_write, fake.throttle, fake.throttled_path = None, 0, None
        fake.throttled_methods = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
    assert [r["method"] for r in fake.requests[before:] if r["path"].endswith("/virtualservices/digits")].count(
        "PATCH"
    ) == WRITE_TRIES
    said = str(failed.value)
    assert f"(tried {WRITE_TRIES} times: 2 refused (409), the object written by another between its read" in said
    assert "2 answers left unknown whether the write was served" in said


class Pauses:
    """``settled``'s pauses on a clock of their own (no test waits): each drawn at its longest."""

    def __init__(self) -> None:
        self.now, self.taken, self.drawn = 0.0, [], []

    def sleep(self, seconds: float) -> None:
        self.taken.append(seconds)
        self.now += seconds

    def uniform(self, low: float, high: float) -> float:
        self.drawn.append((low, high))
        return high


@pytest.mark.parametrize("burst_s", [0.3, None], ids=["a-burst", "for-good"])
def test_a_virtualservice_a_controller_keeps_rewriting_is_written_after_a_jittered_pause_or_raised_as_retryable(
    kube, monkeypatch, burst_s
):
    """A controller rewriting the VirtualService every few milliseconds (between each read and
    write of the apply: a 409 each time) spent ``settled``'s tries in about 1.5 ms, read again at
    once, and the rollback's write failed as a plain RouterError: final for the step (not
    ``TRANSIENT``), the candidate left with its share. A 409 is read again after a pause drawn
    between 50 and 250 ms (writers that collided do not collide again in step): a burst of
    rewrites is waited out; one that never stops is raised as retryable (Airflow's retry and the
    failure callback try again)."""
    from vision_rollout import mesh

    fake, api = kube
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    pauses = Pauses()
    monkeypatch.setattr(mesh.time, "sleep", pauses.sleep)
    monkeypatch.setattr(random, "uniform", pauses.uniform)

    def controller() -> None:  # before each write, while its burst lasts
        if burst_s is None or pauses.now < burst_s:
            fake.touch("virtualservices", "models", "digits", lambda o: None)
        fake.before_write = controller

    before = len(fake.writes())
    fake.before_write = controller
    try:
        if burst_s is None:
            with pytest.raises(mesh.TRANSIENT) as failed:
                router.set_routes(CANARY)
            assert f"tried {mesh.WRITE_TRIES} times: each refused (409)" in str(failed.value)
        else:
            assert router.set_routes(CANARY) is True
            assert router.get_routes() == CANARY
    finally:
        fake.before_write = None
    statuses = [w["status"] for w in fake.writes()[before:]]
    assert statuses == ([409] * mesh.WRITE_TRIES if burst_s is None else [409, 409, 200])
    assert pauses.drawn == [(0.05, 0.25)] * (len(statuses) - 1)  # a pause before each try again
    assert pauses.taken == [0.25] * (len(statuses) - 1)


def test_settled_pauses_after_a_conflict_by_a_draw_and_after_a_write_in_doubt_by_the_backoff(monkeypatch):
    """After a 409 the next try waits a pause drawn between 50 and 250 ms (at most
    ``WRITE_TRIES - 1`` of them: 0.75 s in all); after a write in doubt, the client's backoff."""
    from vision_rollout import mesh

    pauses = Pauses()
    monkeypatch.setattr(mesh.time, "sleep", pauses.sleep)
    monkeypatch.setattr(random, "uniform", pauses.uniform)
    failures = iter(
        [mesh.Conflicted(RouterError("a")), mesh.Unsettled(RouterError("b")), mesh.Conflicted(RouterError("c"))]
    )

    def attempt(doubted: int) -> int:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return doubted

    assert mesh.settled(attempt) == 1
    assert pauses.taken == [0.25, mesh.BACKOFF_S * 2, 0.25]
    assert pauses.drawn == [(0.05, 0.25)] * 2


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


# -- sticky assignment in the mesh -------------------------------------------------------------


compiled = functools.lru_cache(maxsize=None)(re2.compile)


def envoy_route(vs: dict, headers: dict[str, str], path: str = "/v2/models/digits/infer") -> tuple[str, str]:
    """(route name, subset) as Envoy picks them: the first route with a match entry whose every
    condition holds (headers' exact, prefix or RE2 full-match regex; the uri's), or none; the
    route's one destination (a weighted route raises: Envoy would pick per request)."""

    def holds(cond: dict, value: str | None) -> bool:
        if value is None:
            return False
        kind, want = next(iter(cond.items()))
        if kind == "regex":
            return compiled(want).fullmatch(value) is not None
        return value == want if kind == "exact" else value.startswith(want)

    lower = {k.lower(): v for k, v in headers.items()}
    for route in vs["spec"]["http"]:
        entries = route.get("match") or [{}]
        if any(
            all(holds(c, lower.get(h)) for h, c in e.get("headers", {}).items())
            and ("uri" not in e or holds(e["uri"], path))
            for e in entries
        ):
            (dest,) = route["route"]
            return route["name"], dest["destination"]["subset"]
    raise AssertionError("no route matched")


def test_a_user_keeps_its_version_while_the_weight_grows_and_moves_once():
    """Envoy picked a weighted destination per request, so a user flipped between versions
    request by request. Each version of a split route is now its own route on the user's bucket
    (the EnvoyFilter's header), as the model server's router ranges them: a user stays on the
    baseline at every weight under its bucket's threshold and on the candidate from there on."""
    keys = [f"user-{i}" for i in range(200)] + ["10.0.0.7", "", "ü-ser"]
    chosen: dict[str, list[str]] = {key: [] for key in keys}
    for weight in range(0, 101):
        raw = [{"version": "1", "weight": 100 - weight}, {"version": "2", "weight": weight}]
        vs = render_virtual_service(TARGET, TrafficPolicy.from_dict({"route": raw}), ["1", "2"])
        for key in keys:
            chosen[key].append(envoy_route(vs, {"x-user-id": key, "x-rollout-bucket": str(user_bucket(key))})[1])
        # The version named by the client still wins, before any bucket.
        assert envoy_route(vs, {"x-rollout-bucket": "0", "x-model-version": "2"})[1] == "v2"
        assert envoy_route(vs, {"x-rollout-bucket": "9999", "x-model-version": "1"})[1] == "v1"
    for key, versions in chosen.items():
        threshold = -(-(BUCKETS - user_bucket(key)) // 100)  # the first weight whose candidate range holds it
        assert versions == ["v1"] * threshold + ["v2"] * (101 - threshold), key


def test_a_split_rule_keeps_its_match_and_only_the_others_users_are_mirrored():
    policy = TrafficPolicy.from_dict(
        {
            "rules": [
                {
                    "name": "acme",
                    "match": {"headers": {"x-tenant": {"exact": "acme"}}},
                    "route": [{"version": "1", "weight": 30}, {"version": "2", "weight": 70}],
                }
            ],
            "route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}],
            "mirror": {"version": "2", "percent": 50},
        }
    )
    vs = render_virtual_service(TARGET, policy, ["1", "2"])
    validate_istio(vs)
    assert policy_from_virtual_service(vs) == policy
    routes = {r["name"]: r for r in vs["spec"]["http"]}
    assert [r["name"] for r in vs["spec"]["http"]] == [
        "pinned-v1",
        "pinned-v2",
        "acme:v1",
        "acme:v2",
        "acme",
        "default:v1",
        "default:v2",
        "default",
    ]
    assert envoy_route(vs, {"x-tenant": "acme", "x-rollout-bucket": "2999"}) == ("acme:v1", "v1")
    assert envoy_route(vs, {"x-tenant": "acme", "x-rollout-bucket": "3000"}) == ("acme:v2", "v2")
    assert envoy_route(vs, {"x-tenant": "other", "x-rollout-bucket": "8999"}) == ("default:v1", "v1")
    assert envoy_route(vs, {"x-rollout-bucket": "9000"}) == ("default:v2", "v2")
    # The candidate's own users are not copied to it; the baseline's are, at the policy's share.
    assert "mirror" not in routes["acme:v2"]
    assert "mirror" not in routes["default:v2"]
    assert routes["default:v1"]["mirrorPercentage"] == {"value": 50.0}
    assert routes["default:v1"]["mirror"]["subset"] == "v2"
    # Without the header (a proxy without the EnvoyFilter): the weighted route, as before.
    assert [d["weight"] for d in routes["default"]["route"]] == [90, 10]
    assert routes["default"]["mirror"]["subset"] == "v2"
    with pytest.raises(PolicyError, match="X-Rollout-Bucket: the mesh's proxies write it"):
        TrafficPolicy.from_dict(
            {
                "rules": [{"match": {"headers": {"X-Rollout-Bucket": {"regex": "1.*"}}}, "route": [{"version": "2"}]}],
                "route": [{"version": "1"}],
            }
        )


def test_the_bucket_ranges_regexes_match_exactly_their_numbers():
    """Exhaustive over every bucket: each range a weight can give (whole percents: multiples of
    100), from either end, and arbitrary ranges besides; RE2 takes them well within Istio's
    program size."""
    text = "\n".join(str(b) for b in range(BUCKETS))
    pairs = [(0, hi) for hi in range(100, BUCKETS + 1, 100)] + [(lo, BUCKETS) for lo in range(0, BUCKETS, 100)]
    rng = random.Random(7)
    pairs += [(lo, rng.randrange(lo + 1, BUCKETS + 1)) for lo in (rng.randrange(BUCKETS) for _ in range(300))]
    pairs += [(0, 1), (9999, 10000), (10, 100), (99, 101), (1, 9999)]
    for lo, hi in pairs:
        rx = bucket_range_regex(lo, hi)
        assert [int(x) for x in re.findall(f"^(?:{rx})$", text, re.M)] == list(range(lo, hi)), (lo, hi, rx)
        assert re2.compile(rx).programsize < 1000
        for outside in ("-1", "01", "00", "10000", " 1", "1 ", "", "1\n", "0" + str(lo)):  # Lua writes no 0 first
            assert re2.fullmatch(rx, outside) is None, (rx, outside)
    with pytest.raises(ValueError, match=r"bucket range \[5, 5\): not within"):
        bucket_range_regex(5, 5)


def lua_bucket(key: bytes) -> int:
    """BUCKET_LUA's arithmetic transcribed line by line on doubles (LuaJIT's numbers) and its
    ``bit`` module's 32-bit operations: no Lua runs on the test machines."""

    def u32(x: float) -> float:
        return x % 4294967296.0

    def bxor(a: float, b: float) -> float:
        r = (int(a) ^ int(b)) & 0xFFFFFFFF
        return float(r - (1 << 32) if r >= 1 << 31 else r)  # bit.bxor answers a signed int32

    def rshift(a: float, n: int) -> float:
        return float((int(a) & 0xFFFFFFFF) >> n)

    def mul(a: float, b: float) -> float:
        lo = a % 65536.0
        return (lo * b + ((a - lo) / 65536.0 * b % 65536.0) * 65536.0) % 4294967296.0

    m = float(0x5BD1E995)
    n = len(key)
    h = float(n)
    i = 0
    while n >= 4:
        b1, b2, b3, b4 = key[i : i + 4]
        k = mul(b1 + b2 * 256.0 + b3 * 65536.0 + b4 * 16777216.0, m)
        k = mul(u32(bxor(k, rshift(k, 24))), m)
        h = u32(bxor(mul(h, m), k))
        i, n = i + 4, n - 4
    if n == 3:
        h = u32(bxor(h, key[i + 2] * 65536.0))
    if n >= 2:
        h = u32(bxor(h, key[i + 1] * 256.0))
    if n >= 1:
        h = mul(u32(bxor(h, key[i])), m)
    h = mul(u32(bxor(h, rshift(h, 13))), m)
    h = u32(bxor(h, rshift(h, 15)))
    return min(int(h // BUCKET_SPAN), BUCKETS - 1)


def test_the_envoy_filters_lua_computes_nginxs_murmur_hash2_bucket():
    for line in (
        "return (lo * b + ((a - lo) / 65536 * b % 65536) * 65536) % 4294967296",
        "local k = mul(b1 + b2 * 256 + b3 * 65536 + b4 * 16777216, M)",
        "k = mul(u32(bit.bxor(k, bit.rshift(k, 24))), M)",
        "h = u32(bit.bxor(mul(h, M), k))",
        "if n == 3 then h = u32(bit.bxor(h, s:byte(i + 2) * 65536)) end",
        "if n >= 2 then h = u32(bit.bxor(h, s:byte(i + 1) * 256)) end",
        "if n >= 1 then h = mul(u32(bit.bxor(h, s:byte(i))), M) end",
        "h = mul(u32(bit.bxor(h, bit.rshift(h, 13))), M)",
        "return u32(bit.bxor(h, bit.rshift(h, 15)))",
        f"local b = math.floor(murmur2(key) / {BUCKET_SPAN})",
        'local key = (handle:headers():get("x-user-id") or ""):match("^[^,]*"):match("^[ \\t]*(.-)[ \\t]*$")',
        'handle:headers():replace("x-rollout-bucket", string.format("%d", b))',
    ):
        assert line in BUCKET_LUA, line
    rng = random.Random(3)
    keys = [b"", b"a", b"ab", b"abc", b"abcd", b"\xff" * 7, "ü-ser".encode()]
    keys += [rng.randbytes(rng.randrange(1, 80)) for _ in range(3000)]
    for key in keys:
        assert lua_bucket(key) == min(murmur_hash2(key) // BUCKET_SPAN, BUCKETS - 1), key
    assert murmur_hash2(b"") == 0
    assert user_bucket("user-1") == min(murmur_hash2(b"user-1") // BUCKET_SPAN, BUCKETS - 1)
    counts = [0] * 10
    for i in range(20000):
        counts[user_bucket(f"user-{i}") * 10 // BUCKETS] += 1
    assert all(1800 <= c <= 2200 for c in counts), counts  # even: 2000 a tenth


def test_the_bucket_filter_is_read_in_the_meshs_root_namespace_as_configured(kube):
    """The README told a mesh whose root namespace is not istio-system to move deploy/'s
    EnvoyFilter there, but the rollout read it in istio-system only: every split was then
    refused, the filter "does not exist". The target now names the root namespace
    (``root_namespace``, the connection's istio.root_namespace), where the filter is read."""
    fake, api = kube
    moved = fake.objects.pop(("envoyfilters", "istio-system", "rollout-bucket"))
    fake.objects[("envoyfilters", "mesh-root", "rollout-bucket")] = {
        **moved,
        "metadata": {**moved["metadata"], "namespace": "mesh-root"},
    }
    with pytest.raises(RouterError, match="EnvoyFilter istio-system/rollout-bucket does not exist"):
        IstioRouter(TARGET, ["1", "2"], api_client=api).set_routes(CANARY)
    router = IstioRouter(dataclasses.replace(TARGET, root_namespace="mesh-root"), ["1", "2"], api_client=api)
    assert router.set_routes(CANARY)
    assert router.serving_problem(CANARY) is None
    fake.objects.pop(("envoyfilters", "mesh-root", "rollout-bucket"))
    assert "EnvoyFilter mesh-root/rollout-bucket does not exist" in str(router.serving_problem(CANARY))
    with pytest.raises(RouterError, match="istio root_namespace 'Mesh_Root': not a DNS label"):
        dataclasses.replace(TARGET, root_namespace="Mesh_Root")


def test_the_user_key_is_the_first_element_of_x_user_id_trimmed_as_the_lua_reads_it():
    """Envoy's Lua reads a repeated X-User-ID joined by ","; it hashed that whole, nginx the
    first header's value whole: a user's request landed on different versions in the
    one-machine cluster and in production. Both now hash the list's first element, trimmed of
    spaces and tabs (Lua: ``match("^[^,]*")``, then ``match("^[ \\t]*(.-)[ \\t]*$")``)."""
    cases = {
        "user-7": "user-7",
        "user-7,user-9": "user-7",
        "user-7, user-9": "user-7",
        " \tuser 7 \t, user-9": "user 7",
        ",user-9": "",
        "": "",
        None: "",
    }
    for value, key in cases.items():
        assert user_key(value) == key, value
    # Lua's patterns on these: "^[^,]*" is everything before the first comma; "(.-)" between the
    # trimmed runs is the shortest, so trailing blanks go with "[ \t]*$".
    for value, key in cases.items():
        first = re.match(r"[^,]*", value or "").group(0)  # type: ignore[union-attr]
        assert re.fullmatch(r"[ \t]*(.*?)[ \t]*", first).group(1) == key  # type: ignore[union-attr]


def test_the_envoy_filter_validates_and_runs_after_authentication_on_every_outbound_and_gateway_proxy():
    """It ran first in the chain (INSERT_FIRST), before a gateway's jwt_authn and RBAC: a
    request with an invalid token was bucketed, and the X-User-ID read was the client's, not
    the one a RequestAuthentication's outputClaimToHeaders writes from the verified token. It
    now runs last before the router, which every HTTP chain ends with (no match on a filter
    that may be absent, such as jwt_authn, which would leave the patch unapplied)."""
    ef = render_envoy_filter()
    validate_istio(ef)
    assert ef["metadata"]["namespace"] == "istio-system"
    assert "workloadSelector" not in ef["spec"]
    patches = ef["spec"]["configPatches"]
    assert [p["match"]["context"] for p in patches] == ["SIDECAR_OUTBOUND", "GATEWAY"]
    for p in patches:
        assert p["applyTo"] == "HTTP_FILTER"
        assert p["patch"]["operation"] == "INSERT_BEFORE"
        assert p["match"]["listener"]["filterChain"]["filter"] == {
            "name": "envoy.filters.network.http_connection_manager",
            "subFilter": {"name": "envoy.filters.http.router"},
        }
        lua = p["patch"]["value"]["typed_config"]
        assert lua["@type"] == "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
        assert lua["default_source_code"]["inline_string"] == BUCKET_LUA
    bad = copy.deepcopy(ef)
    bad["spec"]["configPatches"][0]["applyTo"] = "HTTP_FILTERS"
    with pytest.raises(RouterError, match="EnvoyFilter rollout-bucket: invalid at spec/configPatches/0/applyTo"):
        validate_istio(bad)


def test_a_versions_route_takes_the_platform_settings_of_the_route_it_splits(kube):
    fake, api = kube
    live = fake.objects[("virtualservices", "models", "digits")]
    live["spec"]["http"][-1]["timeout"] = "7s"
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    router.set_routes(
        TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]})
    )
    routes = {r["name"]: r for r in fake.objects[("virtualservices", "models", "digits")]["spec"]["http"]}
    assert routes["default:v1"]["timeout"] == routes["default:v2"]["timeout"] == "7s"
    routes["default"]["timeout"] = "9s"
    routes["default:v2"]["timeout"] = "5s"
    router.set_routes(
        TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 80}, {"version": "2", "weight": 20}]})
    )
    routes = {r["name"]: r for r in fake.objects[("virtualservices", "models", "digits")]["spec"]["http"]}
    assert (routes["default:v1"]["timeout"], routes["default:v2"]["timeout"]) == ("7s", "5s")
    assert router.get_routes().to_dict()["route"] == [{"version": "1", "weight": 80}, {"version": "2", "weight": 20}]


@pytest.mark.parametrize("weights", [(0, 100), (100, 0)])
def test_a_route_one_version_takes_whole_is_mirrored_only_to_another(weights):
    """A route whose versions but one are at weight 0 sends everything to that one: copying its
    requests to the mirror is right when the mirror is another version, but when it is that same
    version the model server's router copies nothing (the primary is the mirror's own), and so
    must Istio: a route to v2 mirroring 50% to v2 would add half of v2's load again, as copies of itself."""
    rule = {
        "name": "acme",
        "match": {"headers": {"x-tenant": {"exact": "acme"}}},
        "route": [{"version": "1", "weight": weights[0]}, {"version": "2", "weight": weights[1]}],
    }
    raw = {"rules": [rule], "route": rule["route"], "mirror": {"version": "2", "percent": 50}}
    policy = TrafficPolicy.from_dict(raw)
    vs = render_virtual_service(TARGET, policy, ["1", "2"])
    validate_istio(vs)
    routes = {r["name"]: r for r in vs["spec"]["http"]}
    assert set(routes) == {"pinned-v1", "pinned-v2", "acme", "default"}
    serving = "2" if weights[1] else "1"
    copied = serving != "2"
    for name in ("acme", "default"):
        assert [d["destination"]["subset"] for d in routes[name]["route"]] == [f"v{serving}"]
        assert ("mirror" in routes[name]) == copied, name
    if copied:
        assert routes["default"]["mirrorPercentage"] == {"value": 50.0}
    else:  # the model server's router: the mirror's own version is never copied to itself
        assert all(policy.mirror_for("2", f"request-{i}") is None for i in range(100))


def test_a_virtual_service_too_large_to_store_is_refused_before_anything_is_written(kube):
    """A policy the model server takes (256 rules of 64 headers of 1,024 characters) renders a
    VirtualService of up to 60 MB, each split rule three times over; etcd stores 1.5 MiB an
    object. The apply failed at the API server (a 413 over 3 MiB, etcd's error under it) after
    the DestinationRule was written; it is refused first, naming its size and what to cut."""
    fake, api = kube
    rules = [
        {
            "name": f"tenant-{i}",
            "match": {"headers": {f"x-h{j}": {"exact": f"{i}-{j}-" + "v" * 1000} for j in range(10)}},
            "route": [{"version": "1", "weight": 50}, {"version": "3", "weight": 50}],
        }
        for i in range(40)
    ]
    policy = TrafficPolicy.from_dict({"rules": rules, "route": [{"version": "1", "weight": 100}]})
    vs = render_virtual_service(TARGET, policy, ["1", "3"])
    assert 1024 * 1024 < len(json.dumps(vs)) < 3 * 1024 * 1024  # under the API server's own request limit
    with pytest.raises(RouterError, match=r"VirtualService digits: [0-9]+ bytes as JSON, over the 1048576"):
        validate_istio(vs)
    router = IstioRouter(TARGET, ["1", "3"], api_client=api)
    with pytest.raises(RouterError, match="fewer header rules or versions, or shorter match values"):
        router.set_routes(policy)
    assert fake.writes() == []
    fits = TrafficPolicy.from_dict({"rules": rules[:10], "route": [{"version": "1"}]})
    validate_istio(render_virtual_service(TARGET, fits))
    # Counted as the API server stores it, UTF-8: 720 KB of "é" (2.2 MB written as \u00e9) fits.
    accented = [
        {**rule, "match": {"headers": {h: {"exact": "é" * 1000} for h in rule["match"]["headers"]}}}
        for rule in rules[:12]
    ]
    validate_istio(
        render_virtual_service(TARGET, TrafficPolicy.from_dict({"rules": accented, "route": [{"version": "1"}]}))
    )


def test_a_rollout_refused_by_the_routes_it_finds_names_the_command_that_clears_them():
    """A rollout refused because of header rules said "remove them first", and one refused because
    another version served said "end the rollout in progress first", without saying how: the
    user was left to find the command. Each names it."""
    from vision_rollout.mesh import not_steady

    ruled = TrafficPolicy.from_dict(
        {
            "route": [{"version": "1", "weight": 100}],
            "rules": [
                {
                    "name": "beta",
                    "match": {"headers": {"x-beta": {"exact": "1"}}},
                    "route": [{"version": "2", "weight": 100}],
                }
            ],
        }
    )
    said = not_steady(ruled, "1")
    assert said is not None
    assert "rolloutctl mesh apply" in said
    assert "rolloutctl mesh get" in said
    mid = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]})
    said = not_steady(mid, "1")
    assert said is not None
    assert "rolloutctl status --model" in said
    assert "rolloutctl abort --spec" in said


def _route(name: str | None, version: str, **more: object) -> dict:
    entry: dict = {"route": [{"destination": {"host": "digits", "subset": f"v{version}"}}], **more}
    return {"name": name, **entry} if name else entry


def test_routes_are_read_as_istio_evaluates_them_first_match_wins():
    """Only a route's first match was read, and the last route without one was taken for the
    default: a header route a user put after the catch-all (never reached by Istio) was read as
    a rule, which the next stage then wrote before the default, and a second catch-all added for
    a test replaced the one Envoy takes. Routes are now read in order, as Envoy matches them; a
    route after the first catch-all is never reached and is not read."""
    vs = {
        "spec": {
            "http": [
                _route("testers", "2", match=[{"headers": {"x-tester": {"exact": "yes"}}}]),
                {"name": "default", "route": [{"destination": {"host": "h", "subset": "v1"}, "weight": 100}]},
                _route("late", "3", match=[{"headers": {"x-late": {"exact": "1"}}}]),  # never reached
                _route("other", "3"),  # never reached
            ]
        }
    }
    assert policy_from_virtual_service(vs).to_dict() == {
        "rules": [
            {
                "name": "testers",
                "match": {"headers": {"x-tester": {"exact": "yes"}}},
                "route": [{"version": "2", "weight": 100}],
            }
        ],
        "route": [{"version": "1", "weight": 100}],
    }


@pytest.mark.parametrize(
    ("match", "words"),
    [
        (
            [{"headers": {"x-tester": {"exact": "yes"}}}, {"headers": {"x-qa": {"exact": "yes"}}}],
            "route 'testers' has 2 alternative matches",
        ),
        ([{"headers": {"x-tester": {"exact": "yes"}}, "uri": {"prefix": "/v2"}}], "route 'testers' matches on uri"),
        ([{"withoutHeaders": {"x-tester": {"exact": "no"}}}], "route 'testers' matches on withoutHeaders"),
        ([{"queryParams": {"tester": {"exact": "yes"}}}], "route 'testers' matches on queryParams"),
    ],
)
def test_a_route_the_traffic_policy_cannot_represent_is_refused_naming_it(match, words):
    """A route's second match was dropped and a uri or query match beside (or instead of) its
    headers ignored: the rule read matched more than Istio's, or nothing at all."""
    vs = {
        "spec": {
            "http": [
                _route("testers", "2", match=match),
                {"name": "default", "route": [{"destination": {"host": "h", "subset": "v1"}, "weight": 100}]},
            ]
        }
    }
    with pytest.raises(ValueError, match=words):
        policy_from_virtual_service(vs)


def test_routes_without_a_catch_all_or_mirroring_differently_are_refused():
    """Without a route that matches everything Istio answers 404 to what no rule matches, which
    no traffic policy says; a mirror on one route only was read as the policy's (every route's)."""
    header = [{"headers": {"x-tester": {"exact": "yes"}}}]
    with pytest.raises(ValueError, match="no route without a match"):
        policy_from_virtual_service({"spec": {"http": [_route("testers", "2", match=header)]}})
    mirror = {"mirror": {"host": "h", "subset": "v2"}, "mirrorPercentage": {"value": 10.0}}
    one_mirrors = {"spec": {"http": [_route("testers", "3", match=header, **mirror), _route("default", "1")]}}
    with pytest.raises(ValueError, match="route 'default' mirrors nothing, route 'testers' 10% to version 2"):
        policy_from_virtual_service(one_mirrors)
    both = copy.deepcopy(one_mirrors)
    both["spec"]["http"][1].update(copy.deepcopy(mirror))
    assert policy_from_virtual_service(both).to_dict()["mirror"] == {"version": "2", "percent": 10.0}
    own = copy.deepcopy(both)  # a route to the mirror's own version is not mirrored (as rendered)
    own["spec"]["http"][0] = _route("testers", "2", match=header)
    assert policy_from_virtual_service(own).to_dict()["mirror"] == {"version": "2", "percent": 10.0}


def test_a_route_after_the_catch_all_neither_blocks_a_rollout_nor_comes_alive(kube):
    """A header route a user appended after the default route (Envoy never reaches it) was read
    as a rule: the rollout refused to start ("the traffic policy has 1 header rule(s)"), and a
    policy read back wrote it before the default, where it took its users' requests."""
    from vision_rollout.mesh import not_steady

    fake, api = kube
    late = _route("testers", "2", match=[{"headers": {"x-tester": {"exact": "yes"}}}])
    fake.touch("virtualservices", "models", "digits", lambda o: o["spec"]["http"].append(late))
    router = IstioRouter(TARGET, ["1"], api_client=api)
    assert router.get_routes() == TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    assert not_steady(router.get_routes(), "1") is None


def test_what_another_manager_set_on_the_mesh_objects_stays_its_own_after_a_rollout(kube):
    """The rollout copied the live labels, annotations and the spec's other settings (exportTo,
    gateways, the DestinationRule's traffic policy) into its forced applies: whatever the platform
    had applied with its own field manager (Argo CD's) became the rollout's too, so the platform
    could never remove it (its next apply left it out, and it stayed) and got a 409 changing it.
    What another manager owns (managedFields) is left out of the rollout's applies: it stays the
    platform's, which removes it or changes it with its own apply."""
    fake, api = kube
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    vs = render_virtual_service(TARGET, stable, ["1"])
    vs["metadata"]["labels"]["team"] = "vision"
    vs["metadata"]["annotations"] = {"argocd.argoproj.io/tracking-id": "digits"}
    vs["spec"].update(exportTo=["."], gateways=["mesh", "ml/edge"])
    dr = render_destination_rule(TARGET, ["1"])
    dr["metadata"]["labels"]["team"] = "vision"
    dr["spec"]["trafficPolicy"] = {"outlierDetection": {"consecutive5xxErrors": 5}}
    for plural, obj in (("virtualservices", vs), ("destinationrules", dr)):
        fake.objects.pop((plural, "models", "digits"))
        fake.apply(plural, "models", "digits", obj, "argocd-controller")
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    assert router.set_routes(CANARY) is True
    live = fake.objects[("virtualservices", "models", "digits")]
    assert live["metadata"]["labels"]["team"] == "vision"  # kept, the platform's
    assert (live["spec"]["exportTo"], live["spec"]["gateways"]) == (["."], ["mesh", "ml/edge"])
    assert (
        fake.objects[("destinationrules", "models", "digits")]["spec"]["trafficPolicy"] == dr["spec"]["trafficPolicy"]
    )
    assert router.set_routes(CANARY) is False  # what the platform owns is no change to apply
    for plural, obj in (("virtualservices", vs), ("destinationrules", dr)):  # the platform drops its settings
        head = {"apiVersion": obj["apiVersion"], "kind": obj["kind"]}
        spec = {"hosts": obj["spec"]["hosts"]} if plural == "virtualservices" else {"host": obj["spec"]["host"]}
        meta = {"name": "digits", "namespace": "models", "labels": {"team": "ml"}}
        fake.apply(plural, "models", "digits", {**head, "metadata": meta, "spec": spec}, "argocd-controller")
    live = fake.objects[("virtualservices", "models", "digits")]
    # (the platform applied the rollout's label too, so it was the platform's alone: gone with its apply)
    assert live["metadata"]["labels"] == {"team": "ml"}
    assert "annotations" not in live["metadata"]
    assert "exportTo" not in live["spec"]
    assert "gateways" not in live["spec"]
    assert "trafficPolicy" not in fake.objects[("destinationrules", "models", "digits")]["spec"]
    assert router.set_routes(stable) is True
    assert router.get_routes() == stable
    assert "exportTo" not in fake.objects[("virtualservices", "models", "digits")]["spec"]
    labels = fake.objects[("virtualservices", "models", "digits")]["metadata"]["labels"]
    assert labels == {"app.kubernetes.io/managed-by": "model-rollout", "team": "ml"}  # the rollout's again


@pytest.mark.parametrize("labels", [{"version": "v1"}, {"version": "2"}, {"track": "stable"}])
def test_a_subset_relabelled_by_hand_is_put_back_and_named(kube, labels):
    """A DestinationRule subset v1 edited by hand to select other pods (``version: v1``, which no
    pod carries, or version 2's) kept its name, so set_routes (a rollback, ``mesh apply``) took it
    for version 1's and wrote nothing to it, and serving_problem found nothing wrong: the share
    routed to v1 went to no pod (503) or to version 2. A version's subset that does not select
    its version is now named, and set_routes puts its labels back before routing to it."""
    fake, api = kube
    key = ("destinationrules", "models", "digits")
    fake.touch(
        *key, lambda o: o["spec"]["subsets"][0].update(labels=labels, trafficPolicy={"tls": {"mode": "DISABLE"}})
    )
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    router = IstioRouter(TARGET, ["1"], api_client=api)
    problem = router.serving_problem(stable)
    assert problem is not None
    assert "DestinationRule models/digits's subset v1 selects " in problem
    assert "not version 1's pods" in problem
    router.set_routes(stable)
    (v1,) = fake.objects[key]["spec"]["subsets"]
    assert v1 == {"name": "v1", "labels": {"version": "1"}, "trafficPolicy": {"tls": {"mode": "DISABLE"}}}
    assert router.serving_problem(stable) is None


def test_a_route_the_platform_mirrors_with_mirrors_is_refused_a_mirror_before_any_write(kube):
    """A route's ``mirrors`` (Istio's list of mirrors) set by the platform on the default route
    was carried onto every rendered route, beside the stage's ``mirror``: the schema takes both,
    istiod's webhook refuses them ("HTTP route cannot contain both mirror and mirrors"), so the
    mirror stage failed at the API server after the DestinationRule was written. It is refused
    before any write, naming the route."""
    fake, api = kube
    key = ("virtualservices", "models", "digits")
    fake.touch(
        *key,
        lambda o: o["spec"]["http"][-1].update(mirrors=[{"destination": {"host": "audit.models.svc.cluster.local"}}]),
    )
    before = len(fake.writes())
    with pytest.raises(
        RouterError, match=r"invalid at spec/http/\d+: Istio refuses a route with both mirror and mirrors"
    ):
        IstioRouter(TARGET, ["1", "2"], api_client=api).set_routes(CANARY)
    assert fake.writes()[before:] == []
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    IstioRouter(TARGET, ["1"], api_client=api).set_routes(stable)  # no mirror of its own: the platform's kept
    assert fake.objects[key]["spec"]["http"][-1]["mirrors"] == [
        {"destination": {"host": "audit.models.svc.cluster.local"}}
    ]


@pytest.mark.real_pauses  # (the Retry-After waited)
def test_a_long_retry_after_is_waited_at_most_max_retry_after_s(kube, monkeypatch):
    """A 429 whose Retry-After asks for an hour (a proxy or gateway before the API server; API
    Priority and Fairness itself asks for 1 s) was waited out in full: urllib3 takes up to 6 hours,
    5 times, and the task, its rollback too, hung meanwhile with the routes mid-rollout. The
    client waits ``MAX_RETRY_AFTER_S`` at most before it asks again."""
    import threading
    import time

    from vision_rollout import mesh

    fake, api = kube
    monkeypatch.setattr(mesh, "MAX_RETRY_AFTER_S", 1)
    fake.throttle, fake.retry_after = 1, "3600"
    router = IstioRouter(TARGET, ["1"], api_client=mesh.with_retries(api))
    read: list[TrafficPolicy] = []
    started = time.monotonic()
    reader = threading.Thread(target=lambda: read.append(router.get_routes()), daemon=True)
    reader.start()
    reader.join(timeout=15)
    assert read == [TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})]
    assert time.monotonic() - started < 15
    assert [r["status"] for r in fake.requests[-2:]] == [429, 200]
    assert mesh.api_retries().parse_retry_after("3600") == 1


def test_a_label_value_another_manager_owns_is_not_overwritten_by_the_rollout(kube):
    """The mesh objects installed by Helm (or Argo CD) carry ``app.kubernetes.io/managed-by: Helm``,
    that manager's. The rollout's forced apply sent its own value for that label
    (``model-rollout``), so server-side apply gave it the label and its value: Helm then refused
    to upgrade its release ("invalid ownership metadata"). A label or annotation another
    manager owns is left out of the rollout's applies, whatever the rollout would set."""
    fake, api = kube
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    for plural, obj in (
        ("virtualservices", render_virtual_service(TARGET, stable, ["1"])),
        ("destinationrules", render_destination_rule(TARGET, ["1"])),
    ):
        obj["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "Helm"}
        obj["metadata"]["annotations"] = {"meta.helm.sh/release-name": "digits"}
        fake.objects.pop((plural, "models", "digits"))
        fake.apply(plural, "models", "digits", obj, "helm")
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    assert router.set_routes(CANARY) is True
    for plural in ("virtualservices", "destinationrules"):
        meta = fake.objects[(plural, "models", "digits")]["metadata"]
        assert meta["labels"] == {"app.kubernetes.io/managed-by": "Helm"}
        assert meta["annotations"] == {"meta.helm.sh/release-name": "digits"}
    assert router.get_routes() == CANARY


def test_a_delegate_virtual_service_stays_a_delegate_through_a_rollout(kube):
    """A VirtualService without hosts is a delegate: a root VirtualService (the platform's, on its
    ingress gateway) hands it the requests of its path (``delegate``), and Istio takes one with
    hosts for a root of its own. The rollout added the Service's host to it at its first stage,
    so the root's delegation found no delegate and every request through the gateway went
    unrouted (404). A delegate is kept without hosts through the rollout and its rollback."""
    fake, api = kube
    key = ("virtualservices", "models", "digits")
    fake.touch(*key, lambda vs: vs["spec"].pop("hosts"))
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    assert router.set_routes(CANARY) is True
    assert "hosts" not in fake.objects[key]["spec"]
    assert router.get_routes() == CANARY
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    assert IstioRouter(TARGET, ["1"], api_client=api).set_routes(stable) is True
    assert "hosts" not in fake.objects[key]["spec"]


def test_a_version_the_platforms_tcp_route_or_mirrors_send_to_keeps_its_subset(kube):
    """The first stage's reconcile dropped every version's subset the run does not route to,
    though the VirtualService's TCP or TLS routes, or an HTTP route's ``mirrors``, sent to it:
    Envoy had no such subset from then on (the TCP connections to it refused), and the version
    no longer counted as in use, so the teardown's prune could delete its Deployment. What any
    of the VirtualService's routes sends to keeps its subset and counts as in use."""
    fake, api = kube
    vs_key, dr_key = ("virtualservices", "models", "digits"), ("destinationrules", "models", "digits")

    def platform(vs: dict) -> None:
        vs["spec"]["tcp"] = [
            {"route": [{"destination": {"host": TARGET.host, "subset": "v3", "port": {"number": 9000}}}]}
        ]
        vs["spec"]["http"][-1]["mirrors"] = [{"destination": {"host": TARGET.host, "subset": "v4"}}]

    fake.touch(*vs_key, platform)
    fake.touch(
        *dr_key,
        lambda dr: dr["spec"].update(subsets=render_destination_rule(TARGET, ["1", "3", "4", "5"])["spec"]["subsets"]),
    )
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    router.reconcile()
    assert [s["name"] for s in fake.objects[dr_key]["spec"]["subsets"]] == ["v1", "v2", "v3", "v4"]  # v5: nobody's
    fake.touch(*dr_key, lambda dr: dr["spec"].update(subsets=dr["spec"]["subsets"][:2]))
    assert router.versions_in_use() == {"1", "2", "3", "4"}


def test_a_mirror_given_by_istios_deprecated_mirror_percent_is_read_at_its_share_and_written_as_mirror_percentage(
    kube,
):
    """A route mirrored with Istio's deprecated ``mirrorPercent`` (an integer, as VirtualServices
    written before Istio 1.9 hold it) was read as a mirror of 100%: a 5% mirror taken for a full
    one, and the field carried into the rollout's writes beside its ``mirrorPercentage``. It is
    read (``mirrorPercentage`` wins where a route has both, as in Istio) and never written back."""
    mirror = {"mirror": {"host": "h", "subset": "v2"}, "mirrorPercent": 5}
    vs = {"spec": {"http": [_route("default", "1", **mirror)]}}
    assert policy_from_virtual_service(vs).to_dict()["mirror"] == {"version": "2", "percent": 5.0}
    vs["spec"]["http"][0]["mirrorPercentage"] = {"value": 20.0}
    assert policy_from_virtual_service(vs).to_dict()["mirror"] == {"version": "2", "percent": 20.0}

    fake, api = kube
    fake.touch(
        "virtualservices",
        "models",
        "digits",
        lambda o: o["spec"]["http"][-1].update(mirror={"host": TARGET.host, "subset": "v2"}, mirrorPercent=5),
    )
    router = IstioRouter(TARGET, ["1", "2"], api_client=api)
    assert router.get_routes().to_dict()["mirror"] == {"version": "2", "percent": 5.0}
    half = TrafficPolicy.from_dict(
        {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 50}}
    )
    assert router.set_routes(half) is True
    default = fake.objects[("virtualservices", "models", "digits")]["spec"]["http"][-1]
    assert (default["mirrorPercentage"], "mirrorPercent" in default) == ({"value": 50.0}, False)
    assert router.get_routes() == half
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    fake.touch("virtualservices", "models", "digits", lambda o: o["spec"]["http"][-1].update(mirrorPercent=5))
    assert router.set_routes(stable) is True
    default = fake.objects[("virtualservices", "models", "digits")]["spec"]["http"][-1]
    assert not {"mirror", "mirrorPercentage", "mirrorPercent"} & set(default)


@pytest.mark.parametrize(
    "host",
    [
        "digits example.com",
        "https://digits.example.com",
        "digits.example.com/v2",
        "foo.*.example.com",
        "a..example.com",
        "-digits.example.com",
        "digits_1.example.com",
        "digits.example.123",
        "a" * 64 + ".example.com",
        ".".join(["a" * 63] * 4 + ["com"]),  # 260 characters
        "",
        "*",  # every host, on the mesh's sidecars (no gateways): Istio refuses it there
    ],
)
def test_a_host_istio_would_refuse_is_refused_naming_it(host):
    """The VirtualService's hosts (the connection's istio.hosts, models.<m>.istio.hosts) were taken
    as any text: a URL, a host with a space or a wildcard inside failed the first stage's write
    (istiod's webhook), after the image build. They are refused where the target is made, naming
    the host, as istiod's validation takes them: DNS names (a short one too), a wildcard first
    label only, an IP address, 64 of them at most."""
    from vision_rollout.settings import ServingSettings, SettingsError

    with pytest.raises(RouterError, match=re.escape(f"istio host {host[:80]!r}: ")):
        IstioTarget("models", "digits", "digits", hosts=["digits.example.com", host])
    istio = {"namespace": "models", "service": "digits", "name": "digits", "hosts": [host]}
    with pytest.raises(SettingsError, match=r"extra istio.*host"):  # (the connection's schema, or the target's)
        ServingSettings.from_connection("http://h:8000", None, {"istio": istio}).istio_for("digits")


def test_the_hosts_istio_takes_are_taken_and_bounded():
    fine = [
        "digits",
        "digits.models",
        "Digits.Example.COM",
        "digits.example.com.",
        "*.example.com",
        "*-api.example.com",
        "10.0.0.7",
        "fd00::7",
        ".".join(["a" * 63] * 3 + ["a" * 61]),  # 253 characters
    ]
    assert IstioTarget("models", "digits", "digits", hosts=fine).hosts == fine
    assert IstioTarget("models", "digits", "digits", gateways=["ml/edge"], hosts=["*"]).hosts == ["*"]
    with pytest.raises(RouterError, match="istio hosts: 65 of them, more than the 64"):
        IstioTarget("models", "digits", "digits", hosts=[f"h{i}.example.com" for i in range(65)])
    validate_istio(render_virtual_service(IstioTarget("models", "digits", "digits", hosts=fine), CANARY))


@pytest.mark.real_pauses  # (the waits spend the budget)
def test_throttled_answers_use_the_api_budget_up(kube, monkeypatch):
    """A throttling API server answering 429 with Retry-After 10 gave each call its client's
    retries, the Retry-After waited between them, and spent nothing of the ``api_budget`` (only a
    call left without an answer counted): the failure callback's next call had its whole budget
    again, and took 60 s where it had 30. A call whose last answer is unserved (429, 503, or a 5xx
    that leaves unknown whether it was served) now counts its time too: once the budget is spent
    the next call is not sent."""
    import urllib3.connectionpool
    from urllib3.util.retry import Retry

    from vision_rollout import mesh

    fake, api = kube
    now = [0.0]
    sent = urllib3.connectionpool.HTTPConnectionPool._make_request

    def sleep(self: Retry, response: object = None) -> None:  # (urllib3's wait between tries, on the fake clock)
        now[0] += (self.get_retry_after(response) if response is not None else None) or self.get_backoff_time()

    def answered(self: object, *args: object, **kwargs: object) -> object:  # (each answer takes 1 s)
        now[0] += 1
        return sent(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Retry, "sleep", sleep)
    monkeypatch.setattr(urllib3.connectionpool.HTTPConnectionPool, "_make_request", answered)
    fake.throttle, fake.retry_after = 10**6, "10"
    router = IstioRouter(TARGET, ["1"], api_client=mesh.with_retries(api))
    refused: list[str] = []

    def calls() -> int:  # (calls made until one is not sent)
        for made in range(1, 30):
            try:
                router.get_routes()
            except mesh.ApiUnreachable as exc:
                refused.append(str(exc))
                return made
            except mesh.ApiFailed:
                continue
        return 30

    with mesh.api_budget(30, 10) as budget:
        budget.clock = lambda: now[0]
        assert calls() < 30
    assert "was not sent" in refused[0]
    assert now[0] <= 30 + 1  # (the last try's answer)


@pytest.mark.real_pauses  # (the waits spend the budget)
def test_each_try_of_a_call_waits_at_most_what_the_api_budget_has_left(kube, monkeypatch):
    """A call's time limit under ``api_budget`` was worked out once, for the call and all of the
    client's retries: a throttled call's later tries each waited the whole per-call limit
    whatever the budget had left (the failure callback took 37 s of its 30). Each try's limit is
    now what the budget has left at most, worked out when it is sent."""
    import urllib3.connectionpool
    from urllib3.util.retry import Retry

    from vision_rollout import mesh

    fake, api = kube
    now = [0.0]
    limits: list[float | None] = []

    def sleep(self: Retry, response: object = None) -> None:  # (the Retry-After, on the fake clock)
        now[0] += (self.get_retry_after(response) if response is not None else None) or self.get_backoff_time()

    sent = urllib3.connectionpool.HTTPConnectionPool._make_request

    def spied(self: object, *args: object, **kwargs: object) -> object:
        limits.append(kwargs["timeout"].read_timeout)  # type: ignore[attr-defined]
        return sent(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Retry, "sleep", sleep)
    monkeypatch.setattr(urllib3.connectionpool.HTTPConnectionPool, "_make_request", spied)
    fake.throttle, fake.retry_after = 10**6, "10"
    router = IstioRouter(TARGET, ["1"], api_client=mesh.with_retries(api))
    with mesh.api_budget(30, 15) as budget:
        budget.clock = lambda: now[0]
        with pytest.raises(RouterError):
            router.get_routes()
    assert limits == [15, 15, 10]  # (left: 30, 20, then 10)


def _writes_in_doubt(monkeypatch, error, unanswered_s=0.0, served_on=None):
    """mesh's clock and sleep faked, and a write for ``settled`` each try of which is left in
    doubt (``Unsettled(error)``) after ``unanswered_s`` on that clock, until the ``served_on``-th
    (served: "written"). The clock (``now[0]``), the pauses slept, the write, its tries' arguments."""
    from types import SimpleNamespace

    from vision_rollout import mesh

    now = [0.0]
    slept: list[float] = []
    monkeypatch.setattr(mesh, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=slept.append))
    attempts: list[int] = []

    def write(doubted: int) -> str:
        attempts.append(doubted)
        now[0] += unanswered_s
        if served_on is not None and len(attempts) >= served_on:
            return "written"
        raise mesh.Unsettled(error)

    return now, slept, write, attempts


@pytest.mark.real_pauses  # (the pauses on the fake clock)
def test_no_pause_is_slept_once_the_api_budget_is_spent(monkeypatch):
    """``settled``'s pause before a write in doubt is read back, and ``routes_read``'s before the
    routes are read again, slept on once the failure callback's budget was spent (it ended at
    45 s of its 30). A pause the ``api_budget`` in force has no time left for is not begun: the
    last failure is raised at once."""
    from vision_rollout import mesh

    unanswered = mesh.ApiUnreachable("the Kubernetes API server did not answer PATCH /x")
    # (each try left 9.5 s without an answer)
    _, slept, in_doubt, attempts = _writes_in_doubt(monkeypatch, unanswered, unanswered_s=9.5)
    with mesh.api_budget(30, 15, cap_s=20):
        assert mesh.pause(1.0)
        with pytest.raises(mesh.ApiUnreachable, match=r"tried 2 times") as raised:
            mesh.settled(in_doubt)
    assert attempts == [0, 1]  # (19 s spent: the third try's 1 s pause would leave none)
    assert slept == [1.0, 0.5]
    # The second write was never read back: it may have landed (it said each read back found it not in place, review)
    assert "not in place" not in str(raised.value)
    assert "the last may have been served: not read back" in str(raised.value)


@pytest.mark.real_pauses  # (the pauses on the fake clock)
def test_a_pause_is_slept_where_only_the_unanswered_time_left_is_short(monkeypatch):
    """``pause`` refused whenever the budget's ``left`` was no more than the pause, but that counts
    the time calls were left without an answer, which a pause does not spend: in the teardown
    (no cap) a budget with 1.5 s of its 120 left gave up ``settled``'s retries of a write in doubt
    (and ``routes_read``'s) that landed before. Only a cap with no more than the pause left, or
    no unanswered time left at all, refuses it now."""
    from vision_rollout import mesh

    timed_out = mesh.ApiFailed("apply virtualservices/digits: 504 Gateway Timeout", 504)
    now, slept, in_doubt_then_written, attempts = _writes_in_doubt(monkeypatch, timed_out, served_on=4)
    with mesh.api_budget(120, 30) as budget:
        budget.spent = 118.5
        assert mesh.settled(in_doubt_then_written) == "written"
        assert len(attempts) == 4
        budget.spent = 120
        assert not mesh.pause(1.0)  # (no unanswered time left: nothing is sent after it)
    with mesh.api_budget(30, 15, cap_s=20) as budget:
        budget.spent = 29
        assert mesh.pause(8.0)
        now[0] = 12
        assert not mesh.pause(8.0)  # (the cap's 8 s left: none after the pause)
    assert slept == [0.5, 1.0, 2.0, 8.0]


def _read_back_once(monkeypatch, error, found):
    """mesh's clock and sleep faked, and a ``settled`` attempt whose write (in ``unsettled``) is
    left in doubt (``error``) at each try; run as the read back (``reading_back``), it finds the
    write in place (answers "written") where ``found`` is "in place", its read fails where it is
    "read fails", else reaches its write (withheld). The pauses slept, the attempt, its tries'
    arguments, the read backs."""
    from types import SimpleNamespace

    from vision_rollout import mesh

    slept: list[float] = []
    monkeypatch.setattr(mesh, "time", SimpleNamespace(monotonic=lambda: 0.0, sleep=slept.append))
    attempts: list[int] = []
    reads: list[str] = []

    def attempt(doubted: int) -> str:
        attempts.append(doubted)
        if mesh.reading_back():
            reads.append("read")
            if found == "read fails":
                raise mesh.ApiUnreachable("the Kubernetes API server did not answer GET /x")
            if found == "in place":
                return "written"
        with mesh.unsettled():
            raise error
        return "not reached"

    return slept, attempt, attempts, reads


@pytest.mark.real_pauses  # (the pauses on the fake clock)
@pytest.mark.parametrize("found", ["in place", "not in place", "no room"])
def test_a_write_in_doubt_given_up_for_the_reserve_is_read_back_once_where_it_leaves_room(monkeypatch, found):
    """``settled`` under ``reserved``: a write answered 500 (``Unsettled``, it may have landed),
    its backoff before the read back leaving the calls kept for after less than their time. It was
    given up unread, the caller told it failed though it may have been written (a restore said
    "not scaled" of a baseline scaled). Where the budget keeps one call more than the reserve (a
    read is quicker than the backoff), the object is read back once (the attempt run again, its
    write withheld): in place, the write's; not, the failure says so; no room for it, the failure
    says the write may have been written (``maybe_written``)."""
    from vision_rollout import mesh

    timed_out = mesh.ApiFailed("apply Deployment digits-v1: 500 Internal Server Error", 500)
    slept, in_doubt, attempts, reads = _read_back_once(monkeypatch, timed_out, found)

    with mesh.api_budget(30, 15, cap_s=20) as budget:
        budget.answer_s = 0.15  # (a read back: 0.15 s; the backoff before the next try: 0.5 s)
        with mesh.reserved(133 if found == "no room" else 132):  # (0.05 s left beyond the reserve, or 0.2 s)
            if found == "in place":
                assert mesh.settled(in_doubt) == "written"
            else:
                with pytest.raises(mesh.ApiFailed) as raised:
                    mesh.settled(in_doubt)
    assert attempts == ([0] if found == "no room" else [0, 1])
    assert slept == []  # (no backoff: the read back at once)
    assert reads == ([] if found == "no room" else ["read"])
    if found == "not in place":
        assert "read back once, not in place" in str(raised.value)
        assert "may have been" not in str(raised.value)
        assert not raised.value.maybe_written
    if found == "no room":
        assert "the last may have been served: not read back, the calls after it keep their time" in str(raised.value)
        assert raised.value.maybe_written


@pytest.mark.real_pauses  # (the pauses on the fake clock)
@pytest.mark.parametrize("found", ["in place", "not in place", "no room", "no checks", "read fails"])
def test_a_write_in_doubt_at_its_last_try_is_read_back_once_or_said_maybe_written(monkeypatch, found):
    """``settled``: a write answered 500 at each of its tries (no reserve), the last one never read
    back, was raised saying "each read back found it not in place" and not ``maybe_written``: the
    caller took it for a write not made, where it may have been. The last write in doubt is read
    back once, at once (the attempt run again, its write withheld), where the ``api_budget`` keeps
    the time of one call: in place, the attempt's answer; not, said so. Not read back (an attempt
    that does not check, ``checks`` False; no time for it; its read failed), the failure says it
    may have been served and is marked ``maybe_written``."""
    from vision_rollout import mesh

    timed_out = mesh.ApiFailed("apply Deployment digits-v1: 500 Internal Server Error", 500)
    slept, in_doubt, attempts, reads = _read_back_once(monkeypatch, timed_out, found)

    with mesh.api_budget(30, 15, cap_s=20) as budget:
        budget.answer_s = 25.0 if found == "no room" else 0.15  # (no room: one call takes longer than is left)
        checks = found != "no checks"
        if found == "in place":
            assert mesh.settled(in_doubt) == "written"
        else:
            with pytest.raises(mesh.ApiFailed) as raised:
                mesh.settled(in_doubt, checks=checks)
    read = found not in ("no room", "no checks")
    assert attempts == [0, 1, 2, 3] + ([4] if read else [])
    assert slept == [0.5, 1.0, 2.0]  # (the backoff before each try again; none before the read back)
    assert reads == (["read"] if read else [])
    if found == "in place":
        return
    said = str(raised.value)
    assert f"tried {mesh.WRITE_TRIES} times: each answer left unknown whether the write was served" in said
    if found == "not in place":
        assert said.endswith("; the last read back once, not in place)")
        assert "may have been" not in said
        assert not raised.value.maybe_written
    else:
        assert "; the last may have been served: " in said
        assert "read back once" not in said
        assert raised.value.maybe_written


@pytest.mark.real_pauses  # (the backoff on the fake clock)
def test_the_clients_retries_of_a_call_keep_the_time_reserved_for_the_calls_after_it(kube, monkeypatch):
    """``reserved`` kept the calls after it (the failure callback's routes write, the lease's
    release) their time only against ``settled``'s own tries: the client's retries of a call
    (``api_retries``: a read answered 500 sent again up to 5 times, up to 8 s between)
    were bounded by what the budget had left, all of it: a read back answered 500 three times ate
    the time the lease's release was kept, which was then not sent. Within ``reserved``, a retry is
    sent only where the budget leaves the reserved calls their time after its wait (``budget_left``)."""
    import urllib3.connectionpool
    from urllib3.util.retry import Retry

    from vision_rollout import mesh

    fake, api = kube
    now = [0.0]
    sent = urllib3.connectionpool.HTTPConnectionPool._make_request

    def sleep(self: Retry, response: object = None) -> None:  # (urllib3's wait between tries, on the fake clock)
        now[0] += self.get_backoff_time()

    def answered(self: object, *args: object, **kwargs: object) -> object:  # (each answer takes 1 s)
        now[0] += 1
        return sent(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Retry, "sleep", sleep)
    monkeypatch.setattr(urllib3.connectionpool.HTTPConnectionPool, "_make_request", answered)
    fake.throttle, fake.throttle_status, fake.throttled_methods = 10**6, 500, frozenset({"GET"})
    router = IstioRouter(TARGET, ["1"], api_client=mesh.with_retries(api))
    tries = []
    for reserve in (0, 10):
        now[0] = 0.0
        with mesh.api_budget(30, 10, cap_s=30) as budget:
            budget.clock, budget.started, budget.answer_s = (lambda: now[0]), 0.0, 1.0
            before = len(fake.requests)
            with mesh.reserved(reserve), pytest.raises(mesh.ApiFailed):
                router.get_routes()
            tries.append(len(fake.requests) - before)
            if reserve:  # (the 10 calls kept, each 1 s: the 8 s wait before a 6th try would have left 8 s)
                assert mesh.budget_left(reserve) >= 0
    assert tries == [6, 5]  # (the waits between: 0, 1, 2, 4 s; the 8 s wait not begun)


@pytest.mark.parametrize("then", ["GET 500", "GET refused"])
def test_a_failure_after_a_write_in_doubt_keeps_maybe_written(then):
    """``settled``: a write answered 500 (it may have landed), then the next try's read of the
    object failed (answered 500 after the client's retries, or refused): that read's error was
    raised as it came, not ``maybe_written``, and a restore's caller said "not scaled back" of a
    baseline perhaps running its pods. A failure after any write in doubt keeps ``maybe_written``
    and says the write in doubt may have been served."""
    from vision_rollout import mesh

    doubt = mesh.ApiFailed("apply Deployment digits-v1: 500 Internal Server Error", 500)
    read = (
        mesh.ApiFailed("GET Deployment digits-v1: 500 Internal Server Error", 500)
        if then == "GET 500"
        else RouterError("GET Deployment digits-v1: 403 Forbidden")
    )
    attempts: list[int] = []

    def attempt(doubted: int) -> str:
        attempts.append(doubted)
        if not doubted:
            raise mesh.Unsettled(doubt)
        raise read

    with pytest.raises(RouterError) as raised:
        mesh.settled(attempt)
    assert attempts == [0, 1]
    assert raised.value is read
    assert raised.value.maybe_written
    assert str(raised.value).startswith("GET Deployment digits-v1: ")
    assert "after 1 write whose answer left unknown whether it was served: it may have been served" in str(raised.value)


def test_a_failure_with_no_write_in_doubt_before_it_is_not_maybe_written():
    """The first try's read failing (no write sent) is raised as it came, not ``maybe_written``."""
    from vision_rollout import mesh

    read = mesh.ApiFailed("GET Deployment digits-v1: 500 Internal Server Error", 500)

    def attempt(_: int) -> str:
        raise read

    with pytest.raises(RouterError) as raised:
        mesh.settled(attempt)
    assert not raised.value.maybe_written
    assert str(raised.value) == "GET Deployment digits-v1: 500 Internal Server Error"


@pytest.mark.real_pauses  # (the pauses on the fake clock)
@pytest.mark.parametrize("answer", [500, 502, 504, None], ids=["500", "502", "504", "no-answer"])
def test_a_last_write_timed_out_and_not_in_place_when_read_back_may_still_land(monkeypatch, answer):
    """``settled``: a write answered 504 (the API server's own timeout, the write still under way)
    or 502 (a proxy's, its upstream perhaps mid-write) or not answered at all, at each try, its
    last read back at once and not in place, was raised "read back once, not in place", not
    ``maybe_written``: the caller said it was not written, where the write may commit after the
    answer. After such an answer the read back proves nothing: "not in place when read back; it
    may still land", ``maybe_written``. A 500 (the API server's answer for the write, its handling
    over) is settled by the read back as before."""
    from vision_rollout import mesh

    error = (
        mesh.ApiUnreachable("the Kubernetes API server did not answer PATCH /x")
        if answer is None
        else mesh.ApiFailed(f"apply Deployment digits-v1: {answer} Error", answer)
    )
    _, in_doubt, attempts, reads = _read_back_once(monkeypatch, error, "not in place")
    with pytest.raises(mesh.RouterError) as raised:
        mesh.settled(in_doubt)
    assert attempts == [0, 1, 2, 3, 4]
    assert reads == ["read"]
    assert type(raised.value) is type(error)
    said = str(raised.value)
    if answer == 500:
        assert said.endswith("; the last read back once, not in place)")
        assert not raised.value.maybe_written
    else:
        assert said.endswith("; the last not in place when read back: it may still land)")
        assert "read back once, not in place" not in said
        assert raised.value.maybe_written


@pytest.mark.real_pauses  # (the pauses on the fake clock)
@pytest.mark.parametrize("ended", ["tries", "kept"])
@pytest.mark.parametrize("answer", [500, 504])
def test_a_write_answered_before_its_end_keeps_maybe_written_when_refused_409_after_it(monkeypatch, answer, ended):
    """A write answered 504 (it may commit after the answer), then each try refused (409: the
    object written between its read and its write, that very write perhaps): ``Contended`` was
    raised not ``maybe_written``, only the last failure's answer looked at; so too where the tries
    stopped for the calls ``reserved`` after. A write answered before its end is remembered: "an
    earlier write ... may still land", ``maybe_written``. After a 500, each read found the write
    not in place (settled): not ``maybe_written``, as before."""
    from types import SimpleNamespace

    from vision_rollout import mesh

    monkeypatch.setattr(mesh, "time", SimpleNamespace(monotonic=lambda: 0.0, sleep=lambda _: None))
    attempts: list[int] = []

    def attempt(doubted: int) -> None:
        attempts.append(doubted)
        if len(attempts) == 1:
            with mesh.unsettled():
                raise mesh.ApiFailed(f"apply VirtualService digits: {answer}", answer)
        if ended == "kept":
            budget.answer_s = 0.1512  # (the reserve's 132 calls: 0.04 s left, less than any pause after a 409)
        raise mesh.Conflicted(mesh.Contended("apply VirtualService digits: changed while applying"))

    with mesh.api_budget(30, 15, cap_s=20) as budget, mesh.reserved(132 if ended == "kept" else 0):
        with pytest.raises(mesh.Contended) as raised:
            mesh.settled(attempt)
    assert attempts == ([0, 1] if ended == "kept" else [0, 1, 1, 1])
    said = str(raised.value)
    assert ("not read again: the calls after it keep their time" in said) is (ended == "kept")
    assert ("an earlier write answered before its end (a 502, a 504 or none) may still land" in said) is (answer == 504)
    assert raised.value.maybe_written is (answer == 504)


@pytest.mark.parametrize("answer", [500, 504])
def test_a_write_refused_after_its_read_found_a_500s_write_not_in_place_is_not_maybe_written(answer):
    """A write answered 500, the next try's read finding it not in place (which settles a 500),
    then that try's write refused (422): raised "(after 1 write whose answer left unknown whether
    it was served: it may have been served)", ``maybe_written``, though the read had settled it.
    The refusal is raised as it came; after a 504 (the write may commit after its answer), as
    before: said may have been served, ``maybe_written``."""
    from vision_rollout import mesh

    refusal = RouterError("apply Deployment digits-v2: 422 Unprocessable Entity")

    def attempt(doubted: int) -> None:
        with mesh.unsettled():  # (after the read: the write sent)
            if doubted:
                raise refusal
            raise mesh.ApiFailed(f"apply Deployment digits-v2: {answer}", answer)

    with pytest.raises(RouterError) as raised:
        mesh.settled(attempt)
    assert raised.value is refusal
    if answer == 500:
        assert str(raised.value) == "apply Deployment digits-v2: 422 Unprocessable Entity"
        assert not raised.value.maybe_written
    else:
        assert str(raised.value).endswith(
            "(after 1 write whose answer left unknown whether it was served: it may have been served)"
        )
        assert raised.value.maybe_written
