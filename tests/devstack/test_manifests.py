"""deploy/: every overlay renders with kubectl kustomize, every object validates against Kubernetes'
schema (pinned version), Istio's CRDs and the prometheus-operator's types, a broken object of each
kind is refused, and what the rollout also renders (version 1's Deployment, the Service, the
mesh's objects) is exactly what it renders, so that its first apply changes nothing."""

from __future__ import annotations

import copy
import json
import os
import re
import time
import urllib.request
from typing import Any

import pytest
import yaml

from devstack import manifests, rbac
from devstack.cluster.cluster import BOOTSTRAP_TAG
from devstack.cluster.kube import WORKER_USER
from devstack.processes import start_prometheus
from model_server.traffic import TrafficPolicy
from vision_rollout.deploy import ADMIN_PORT, render_deployment, render_pdb, render_service
from vision_rollout.mesh import IstioTarget, render_destination_rule, render_envoy_filter, render_virtual_service
from vision_rollout.settings import BuildSettings

OVERLAYS = sorted(p.name for p in (manifests.DEPLOY / "overlays").iterdir())
TARGET = IstioTarget("ml", "digits", "digits")
KINDS = {
    "Namespace",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "DestinationRule",
    "VirtualService",
    "EnvoyFilter",
    "AuthorizationPolicy",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "PodMonitor",
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: manifests.render(overlay) for overlay in OVERLAYS}


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def test_the_overlays_are_the_ones_the_docs_name():
    assert OVERLAYS == ["local-cluster", "production"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_every_overlay_validates(rendered, overlay):
    objects = rendered[overlay]
    assert {o["kind"] for o in objects} == KINDS
    assert manifests.problems(objects) == []


# A mistake of each kind's own, as a hand edit would make it: (path, value).
MISTAKES = {
    "Namespace": ("spec", {"finalizers": "kubernetes"}),  # a list
    "Service": ("spec.ports.0.port", "http"),  # a number
    "Deployment": ("spec.template.spec.containers.0.resources.requests", ["cpu"]),  # a map
    "PodDisruptionBudget": ("spec.maxUnavailabel", 1),  # a misspelt field (strict)
    "DestinationRule": ("spec.subsets.0.labels", "version=1"),  # a map
    "VirtualService": ("spec.http.1.route.0.weight", "100%"),  # an integer
    "EnvoyFilter": ("spec.configPatches.0.patch.operation", "INSERT_FRIST"),  # an enum
    "AuthorizationPolicy": ("spec.action", "REFUSE"),  # ALLOW, DENY, AUDIT or CUSTOM
    "ServiceAccount": ("automountServiceAccountToken", "no"),  # a boolean
    "Role": ("rules.0.verbs", "get"),  # a list
    "RoleBinding": ("subjects.0.nmae", "airflow-worker"),  # a misspelt field (strict)
    "PodMonitor": ("spec.podMetricsEndpoints.0.interval", "every 15 s"),  # a duration
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_broken_object_of_each_kind_is_refused_by_name(rendered, kind):
    objects = copy.deepcopy(rendered["production"])
    target = next(o for o in objects if o["kind"] == kind)
    path, value = MISTAKES[kind]
    *parents, last = path.split(".")
    node: Any = target
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    found = manifests.problems(objects)
    assert len(found) == 1, found
    assert found[0].startswith(manifests.name(target) + ": ")


def test_a_virtual_service_istios_webhook_refuses_is_refused_though_its_schema_takes_it(rendered):
    """istiod's validating webhook checks more than the CRD's schema: a match on a header name
    outside [-_A-Za-z0-9]+, or on an empty regex, is refused at apply time."""
    for header, match in (("x.team", {"exact": "a"}), ("x-team", {"regex": ""})):
        objects = copy.deepcopy(rendered["production"])
        vs = one(objects, "VirtualService")
        vs["spec"]["http"][0]["match"][0]["headers"] = {header: match}
        found = manifests.problems(objects)
        assert len(found) == 1, found
        assert found[0].startswith(f"VirtualService ml/digits: invalid at spec/http/0/match/0/headers/{header}: Istio ")


def test_a_peer_authentication_an_overlay_adds_is_checked_as_istio_would():
    """Under STRICT mTLS an overlay sets the model's pods' mTLS mode (a PeerAuthentication, as
    deploy/prometheus/scrape-config.yaml says): deploy-check validates it against Istio's CRD
    instead of refusing it as a kind it has no schema for."""
    peer: dict[str, Any] = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "digits", "namespace": "ml"},
        "spec": {
            "selector": {"matchLabels": {"app": "digits"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"8000": {"mode": "PERMISSIVE"}},
        },
    }
    assert manifests.problems([peer]) == []
    peer["spec"]["mtls"]["mode"] = "STRICTER"
    (found,) = manifests.problems([peer])
    assert found.startswith("PeerAuthentication ml/digits: invalid at spec/mtls/mode: 'STRICTER' is not one of")


def test_an_unknown_kind_is_refused_not_skipped():
    found = manifests.problems([{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}])
    assert found == ["Widget w: no schema for example.com/v1 Widget in Kubernetes " + manifests.K8S_VERSION]


def test_version_1_is_deployed_as_the_rollout_renders_a_version(rendered):
    """The rollout re-applies version 1's Deployment (scaling it, retiring it) with its own
    rendering: the pod template a user applied from deploy/ must be that rendering, or the
    first re-apply would roll every baseline pod."""
    production = one(rendered["production"], "Deployment")
    build = BuildSettings(storage_secret="model-server-storage")
    image = "registry.example.com/ml/model-server@sha256:" + "0" * 64  # a placeholder the user replaces
    assert production == render_deployment(TARGET, "digits", "1", image, 3, build, "s3://model-rollout/predictions")
    local = one(rendered["local-cluster"], "Deployment")
    build = BuildSettings(gpus=0, drain_seconds=5, storage_secret="model-server-storage")
    image = BOOTSTRAP_TAG.format(model="digits", version=1)
    assert local == render_deployment(TARGET, "digits", "1", image, 2, build, "s3://predictions/predictions")
    # Its disruption budget as the rollout renders a version's: its own pods only, one at a time.
    assert one(rendered["production"], "PodDisruptionBudget") == render_pdb(TARGET, "1", 3)
    assert one(rendered["local-cluster"], "PodDisruptionBudget") == render_pdb(TARGET, "1", 2)


def test_the_hardening_a_production_pod_needs(rendered):
    pod = one(rendered["production"], "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # By digest, as the rollout runs the versions it deploys: a tag pushed again would give the
    # pods started later (a scale-up, a node replaced) other bits than the version that passed.
    assert re.fullmatch(r"[^@:]+(:[^@]+)?@sha256:[0-9a-f]{64}", container["image"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/state", "/tmp"}
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Kubernetes' default of 1 s took a server busy for a second (a burst of large JSON requests)
    # out of its Service: readiness waits as long as liveness does.
    assert container["readinessProbe"]["timeoutSeconds"] == container["livenessProbe"]["timeoutSeconds"] == 5
    # The server listens only once its version is loaded and warmed up (model_server/__main__.py):
    # liveness (6 misses, 10 s apart) waits for a startup probe that allows wait_ready's 10 minutes.
    startup = container["startupProbe"]
    assert startup["httpGet"] == container["livenessProbe"]["httpGet"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    drain = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > drain == BuildSettings().drain_seconds
    assert container["args"][container["args"].index("--serve") + 1] == "digits:1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_istios_proxy_outlives_the_servers_drain(rendered, overlay):
    """Injected as a plain container, Istio's proxy gets SIGTERM with the server and exits after
    its own 5 s drain: the rest of the preStop wait's requests and the server's last
    prediction-log writes (to the object store, through the proxy) would fail. As a native
    sidecar it starts before the server and stops after it."""
    template = one(rendered[overlay], "Deployment")["spec"]["template"]
    assert template["metadata"]["annotations"]["sidecar.istio.io/nativeSidecar"] == "true"
    rendered_now = render_deployment(TARGET, "digits", "2", "image", 1)["spec"]["template"]
    assert rendered_now["metadata"]["annotations"]["sidecar.istio.io/nativeSidecar"] == "true"


def test_the_service_and_the_mesh_are_the_rollouts_own_rendering(rendered):
    objects = rendered["production"]
    service = one(objects, "Service")
    assert service == render_service(TARGET)
    assert ADMIN_PORT not in {p["port"] for p in service["spec"]["ports"]}
    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    assert one(objects, "VirtualService") == render_virtual_service(TARGET, stable, ["1"])
    assert one(objects, "DestinationRule") == render_destination_rule(TARGET, ["1"])
    # The mesh's user buckets, which the routes of a split match on: on every proxy of the mesh.
    assert one(objects, "EnvoyFilter") == render_envoy_filter()
    policy = one(objects, "AuthorizationPolicy")["spec"]
    assert policy["action"] == "DENY"
    assert policy["rules"] == [
        {
            "from": [{"source": {"notPrincipals": ["cluster.local/ns/airflow/sa/airflow-worker"]}}],
            "to": [{"operation": {"ports": [str(ADMIN_PORT)]}}],
        }
    ]


def with_autoscaling(tmp_path) -> list[dict[str, Any]]:
    """The production overlay with the autoscaling component, as a user adds it."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    production, component = (
        os.path.relpath(manifests.DEPLOY / p, overlay) for p in ("overlays/production", "components/autoscaling")
    )  # kustomize takes relative paths only
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{production}]\ncomponents: [{component}]\n"
    )
    return manifests.render(overlay)


def test_the_autoscaling_component_renders_and_validates(tmp_path):
    objects = with_autoscaling(tmp_path)
    assert one(objects, "Role", "model-rollout-autoscaling")["rules"][0]["resources"] == ["horizontalpodautoscalers"]
    assert manifests.problems(objects) == []


def test_a_broken_kustomization_is_reported_with_kustomizes_words(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(manifests.ManifestError, match=r"missing\.yaml"):
        manifests.render(tmp_path)


SERVER = {"app_kubernetes_io_managed_by": "model-rollout"}  # (the label's name as kubernetes_sd gives it)


def test_the_scrape_job_keeps_each_versions_data_port_with_its_labels(tmp_path):
    """deploy/'s Prometheus job, run by a real Prometheus on targets labelled as kubernetes_sd
    labels pods: a model-server pod's data port is scraped as {app, version, pod, namespace};
    its admin port, a pod without a version label, and another app's pod with a version label
    and a port named http (Istio's label conventions) are dropped: only the pods of the model
    server's Deployments (``app.kubernetes.io/managed-by: model-rollout``) are scraped."""

    def target(port: int, port_name: str, **labels: str) -> dict[str, Any]:
        return {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {
                "__meta_kubernetes_namespace": "ml",
                "__meta_kubernetes_pod_name": f"pod-{port}",
                "__meta_kubernetes_pod_container_port_name": port_name,
                **{f"__meta_kubernetes_pod_label_{k}": v for k, v in labels.items()},
                **{f"__meta_kubernetes_pod_labelpresent_{k}": "true" for k in labels},
            },
        }

    file_sd = tmp_path / "targets.json"
    file_sd.write_text(
        json.dumps(
            [
                target(9101, "http", app="digits", version="2", pod_template_hash="abc", **SERVER),
                target(9102, "admin", app="digits", version="2", **SERVER),
                target(9103, "http", app="other", **SERVER),
                target(9104, "http", app="reviews", version="v1"),
            ]
        )
    )
    prom = start_prometheus([], tmp_path / "prometheus", jobs=(manifests.scrape_job(file_sd, 15),))
    try:
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(f"{prom.url}/api/v1/targets", timeout=5) as answer:
                data = json.load(answer)["data"]
            if len(data["activeTargets"]) + len(data["droppedTargets"]) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        prom.stop()
    (active,) = data["activeTargets"]
    assert active["scrapeUrl"] == "http://127.0.0.1:9101/metrics"
    assert active["labels"] == {
        "app": "digits",
        "version": "2",
        "pod_template_hash": "abc",
        "pod": "pod-9101",
        "namespace": "ml",
        "instance": "127.0.0.1:9101",
        "job": "model-server",
    }
    assert active["scrapeInterval"] == "15s"
    assert sorted(t["discoveredLabels"]["__address__"] for t in data["droppedTargets"]) == [
        "127.0.0.1:9102",
        "127.0.0.1:9103",
        "127.0.0.1:9104",
    ]


def test_the_pod_monitor_selects_the_model_servers_pods_only(rendered):
    """The PodMonitor selected every pod of the namespace with a version label; it selects the
    pods of the model server's Deployments, whose pod template carries the label, as the
    rollout renders a candidate's."""
    for overlay in ("production", "local-cluster"):
        monitor = one(rendered[overlay], "PodMonitor")
        assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "model-rollout"}
        template = one(rendered[overlay], "Deployment")["spec"]["template"]
        assert template["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "model-rollout"


def test_the_helm_values_name_the_roles_account_and_every_connection():
    """deploy/helm/values.yaml (the official Airflow chart's values): KubernetesExecutor with the
    workers' ServiceAccount that deploy/'s Roles are bound to, the triggerer on (the stage waits
    defer), and each connection the project uses (airflow_settings.yaml) from a Secret."""
    values = yaml.safe_load((manifests.DEPLOY / "helm" / "values.yaml").read_text())
    assert values["executor"] == "KubernetesExecutor"
    assert values["triggerer"]["enabled"] is True
    account = values["workers"]["serviceAccount"]["name"]
    rules = rbac.bound_rules(manifests.render("production"), f"system:serviceaccount:airflow:{account}")
    assert set(rules) == NAMESPACES["workers"]
    local = yaml.safe_load((manifests.ROOT / "airflow_settings.yaml").read_text())
    connections = {c["conn_id"] for c in local["airflow"]["connections"]}
    assert {s["envName"] for s in values["secret"]} == {f"AIRFLOW_CONN_{c.upper()}" for c in connections}
    assert all(s["secretName"] and s["secretKey"] for s in values["secret"])
    assert values["airflowVersion"] == values["defaultAirflowTag"] == "3.3.2"


def test_the_workers_pods_are_in_the_mesh_and_still_end():
    """The replay (pinned to a version by its path) and the masking probe (Envoy's mirror) go to
    the model's Service from the task's pod: the VirtualService routes them only from a sidecar.
    The worker pods (the chart's pod template takes workers.labels and workers.podAnnotations)
    opt into injection, as Kubernetes' native sidecar so that a task's pod still ends; as label
    values, strings (a YAML true would be refused by the API server)."""
    workers = manifests.helm_values()["workers"]
    assert workers["labels"]["sidecar.istio.io/inject"] == "true"
    assert workers["podAnnotations"]["sidecar.istio.io/nativeSidecar"] == "true"
    objects = manifests.render("production")
    principals = one(objects, "AuthorizationPolicy")["spec"]["rules"][0]["from"][0]["source"]["notPrincipals"]
    account = manifests.airflow_user("workers").removeprefix("system:serviceaccount:").split(":")
    assert principals == ["cluster.local/ns/{}/sa/{}".format(*account)]


APPLY = "application/apply-patch+yaml"
ML, BUILDS = "/apis/{}/namespaces/ml/{}", "/api/v1/namespaces/ml-builds/{}"


def request(method: str, path: str, content_type: str = "", **seen: Any) -> dict[str, Any]:
    """A call as the fake API server records it (an apply with ``existed``)."""
    query = {"watch": ["true"]} if seen.pop("watch", False) else {}
    return {"method": method, "path": path, "query": query, "content_type": content_type, **seen}


# The calls each Airflow component's part of a rollout makes, in the namespaces it makes them in
# (the workers' are also checked, both ways, against every call of the cluster end-to-end tests).
# What a teardown calls, the tasks too: the mesh's objects read and applied (they exist: deploy/
# installs them), the Lease renewed and released, a version's Deployment read and scaled (through its scale
# subresource where another manager owns its count), and its
# pods listed where they do not become ready (restore_stable's wait).
TEARDOWN = [
    request("GET", ML.format("networking.istio.io/v1", "virtualservices/digits")),
    request("PATCH", ML.format("networking.istio.io/v1", "virtualservices/digits"), APPLY, existed=True),
    request("GET", ML.format("networking.istio.io/v1", "destinationrules/digits")),
    request("PATCH", ML.format("networking.istio.io/v1", "destinationrules/digits"), APPLY, existed=True),
    request("GET", ML.format("coordination.k8s.io/v1", "leases/rollout-digits")),
    request("PUT", ML.format("coordination.k8s.io/v1", "leases/rollout-digits")),
    request("DELETE", ML.format("coordination.k8s.io/v1", "leases/rollout-digits")),
    request("GET", ML.format("apps/v1", "deployments/digits-v1")),
    request("PATCH", ML.format("apps/v1", "deployments/digits-v1"), APPLY, existed=True),  # scaled
    # (its spec.replicas another manager's, KEDA's or a kubectl scale's: scaled through its scale subresource)
    request("PATCH", ML.format("apps/v1", "deployments/digits-v1/scale"), "application/strategic-merge-patch+json"),
    request("GET", ML.format("policy/v1", "poddisruptionbudgets/digits-v1")),  # its labels, kept
    request("PATCH", ML.format("policy/v1", "poddisruptionbudgets/digits-v1"), APPLY, existed=True),
    request("GET", "/api/v1/namespaces/ml/pods"),  # the stable version's pods not ready: why (wait_ready)
]
CALLS = {
    # The tasks: the Lease taken, the mesh's EnvoyFilter read (a stage that splits a route), the
    # candidate's Deployment applied into being (patch and create), the budgets listed (the first stage),
    # the build pod created, followed, labelled when it failed, deleted; the teardown's retired
    # versions beyond the history limit listed and deleted; under autoscaling each version's HPA
    # applied into being and its scale set, and a deleted version's HPA listed and deleted.
    "workers": [
        *TEARDOWN,
        request("POST", ML.format("coordination.k8s.io/v1", "leases")),
        request("GET", "/apis/networking.istio.io/v1alpha3/namespaces/istio-system/envoyfilters/rollout-bucket"),
        request("PATCH", ML.format("apps/v1", "deployments/digits-v2"), APPLY, existed=False),
        request("PATCH", ML.format("policy/v1", "poddisruptionbudgets/digits-v2"), APPLY, existed=False),
        request("GET", ML.format("policy/v1", "poddisruptionbudgets")),  # one selecting a version's pods twice
        request("GET", ML.format("apps/v1", "deployments")),
        request("DELETE", ML.format("apps/v1", "deployments/digits-v1")),
        request("DELETE", ML.format("policy/v1", "poddisruptionbudgets/digits-v1")),
        request("POST", BUILDS.format("pods")),
        request("GET", BUILDS.format("pods")),  # found by its labels
        request("GET", BUILDS.format("pods/build-digits-2")),
        request("GET", BUILDS.format("pods/build-digits-2/log")),
        request("GET", BUILDS.format("events")),
        request("PATCH", BUILDS.format("pods/build-digits-2"), "application/strategic-merge-patch+json"),
        request("DELETE", BUILDS.format("pods/build-digits-2")),
    ],
    "workers+autoscaling": [
        request("GET", ML.format("autoscaling/v2", "horizontalpodautoscalers/digits-v1")),  # promote: its settings
        request("PATCH", ML.format("autoscaling/v2", "horizontalpodautoscalers/digits-v2"), APPLY, existed=False),
        request("PATCH", ML.format("apps/v1", "deployments/digits-v2/scale"), "application/strategic-merge-patch+json"),
        request("GET", ML.format("autoscaling/v2", "horizontalpodautoscalers")),
        request("DELETE", ML.format("autoscaling/v2", "horizontalpodautoscalers/digits-v1")),
    ],
    # KubernetesPodTrigger (the deferred build, in the triggerer): the pod read until it ends, its
    # events watched while it starts, the pod deleted when a user kills the task (test_pods.py
    # runs it so, with the triggerer's credentials).
    # The approval's wait (GuardedApprovalTrigger): the Lease read for an abort's mark.
    "triggerer": [
        request("GET", ML.format("coordination.k8s.io/v1", "leases/rollout-digits")),
        request("GET", BUILDS.format("pods/build-digits-2")),
        request("GET", BUILDS.format("events"), watch=True),
        request("DELETE", BUILDS.format("pods/build-digits-2")),
    ],
    # The DAG's on_failure_callback (in the DAG processor): a teardown's routes and Lease, a
    # retired baseline scaled back first; under autoscaling, the baseline's HPA read (its settings
    # kept) and applied (into being, where it has none) and its scale set.
    "dagProcessor": TEARDOWN,
    "dagProcessor+autoscaling": [
        request("GET", ML.format("autoscaling/v2", "horizontalpodautoscalers/digits-v1")),  # its own, kept
        request("PATCH", ML.format("autoscaling/v2", "horizontalpodautoscalers/digits-v1"), APPLY, existed=False),
        request("PATCH", ML.format("apps/v1", "deployments/digits-v1/scale"), "application/strategic-merge-patch+json"),
    ],
}
NAMESPACES = {"workers": {"ml", "ml-builds", "istio-system"}, "triggerer": {"ml", "ml-builds"}, "dagProcessor": {"ml"}}


@pytest.mark.parametrize("section", sorted(NAMESPACES))
def test_each_airflow_component_that_calls_the_api_is_bound_to_what_it_calls(tmp_path, section):
    """The workers run the rollout's tasks, the triggerer polls the deferred image build's pod
    (KubernetesPodTrigger, in-cluster: as the triggerer's own ServiceAccount), and Airflow 3 runs
    the DAG's on_failure_callback in the DAG processor: each as the ServiceAccount the Helm values
    give it, which deploy/'s Roles must allow every call of its part (each decision the API server
    makes: an apply that creates needs create too), with and without autoscaling, and bind in
    no other namespace."""
    user = manifests.airflow_user(section)
    for objects, calls in (
        (manifests.render("production"), CALLS[section]),
        (with_autoscaling(tmp_path), CALLS[section] + CALLS.get(f"{section}+autoscaling", [])),
    ):
        rules = rbac.bound_rules(objects, user)
        assert set(rules) == NAMESPACES[section]
        needed = [c for r in calls for c in rbac.checks(r)]
        assert sorted({str(c) for c in needed if not rbac.allowed(rules.get(c.namespace, []), c)}) == []


@pytest.mark.parametrize("section", sorted(NAMESPACES))
def test_no_airflow_component_holds_a_grant_its_part_does_not_call(tmp_path, section):
    """The other way round: every verb on every resource the Roles give a component is one its
    calls need, with and without autoscaling (the DAG processor's failure callback creates
    nothing, so it holds no create)."""
    user = manifests.airflow_user(section)
    for objects, calls in (
        (manifests.render("production"), CALLS[section]),
        (with_autoscaling(tmp_path), CALLS[section] + CALLS.get(f"{section}+autoscaling", [])),
    ):
        needed = [c for r in calls for c in rbac.checks(r)]
        unused = {
            namespace: rbac.unused(rules, [c for c in needed if c.namespace == namespace])
            for namespace, rules in rbac.bound_rules(objects, user).items()
        }
        assert unused == {namespace: [] for namespace in NAMESPACES[section]}


def test_the_components_service_accounts_are_their_own():
    """One ServiceAccount per component, the workers' the one the one-machine cluster's API server
    issues the workers' token for: the triggerer holds exactly its part (it creates no build pod
    and only reads Leases in the models' namespace), the DAG processor nothing in the builds'."""
    users = {section: manifests.airflow_user(section) for section in NAMESPACES}
    assert len(set(users.values())) == len(users)
    assert users["workers"] == WORKER_USER
    objects = manifests.render("production")
    triggerer = rbac.bound_rules(objects, users["triggerer"])["ml-builds"]
    assert not rbac.allowed(triggerer, rbac.attributes(request("POST", BUILDS.format("pods"))))
    assert rbac.unused(triggerer, [c for r in CALLS["triggerer"] for c in rbac.checks(r)]) == []
    assert set(rbac.bound_rules(objects, users["triggerer"])) == {"ml", "ml-builds"}
    in_models = rbac.bound_rules(objects, users["triggerer"])["ml"]
    assert not rbac.allowed(in_models, rbac.attributes(request("PUT", ML.format("coordination.k8s.io/v1", "leases/l"))))
    assert set(rbac.bound_rules(objects, users["dagProcessor"])) == {"ml"}


def test_deploy_check_names_each_problem_of_a_users_overlay(tmp_path, capsys):
    """``make deploy-check OVERLAYS=...`` on an overlay of one's own: a patch that breaks the
    Deployment is named, exit status 1; deploy/'s own overlays pass."""
    overlay = tmp_path / "mine"
    overlay.mkdir()
    base = os.path.relpath(manifests.DEPLOY / "overlays" / "production", overlay)
    (overlay / "kustomization.yaml").write_text(f"resources: [{base}]\npatches: [{{path: replicas.yaml}}]\n")
    (overlay / "replicas.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: digits-v1, namespace: ml}\nspec: {replicas: three}\n"
    )
    assert manifests.main([str(overlay)]) == 1
    assert "Deployment ml/digits-v1: invalid at spec/replicas" in capsys.readouterr().out
    assert manifests.main(["local-cluster", "production"]) == 0


def test_the_local_connections_name_what_deploy_applies(rendered):
    """airflow_settings.yaml's Kubernetes-mode sections named namespace `models` while deploy/
    puts digits in `ml`: a run with mesh = istio from those connections looked for a
    VirtualService, Lease and Deployments where there are none."""
    local = yaml.safe_load((manifests.ROOT / "airflow_settings.yaml").read_text())
    connections = {c["conn_id"]: c for c in local["airflow"]["connections"]}
    extra = connections["model_server_default"]["conn_extra"]
    objects = rendered["production"]
    virtual_service = one(objects, "VirtualService", extra["istio"]["name"])
    service = one(objects, "Service", extra["istio"]["service"])
    assert extra["istio"]["namespace"] == virtual_service["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert connections["kubernetes_default"]["conn_extra"]["namespace"] == extra["istio"]["namespace"]
    builder = one(objects, "ServiceAccount", extra["build"]["service_account"])
    assert extra["build"]["namespace"] == builder["metadata"]["namespace"]


@pytest.mark.parametrize(
    ("principal", "words"),
    [
        ("spiffe://cluster.local/ns/airflow/sa/airflow-worker", "without the spiffe:// prefix"),
        ("airflow/airflow-worker", "not <trust domain>/ns/<namespace>/sa/<service account>"),
        ("cluster.local/ns/airflow/sa/", "not <trust domain>/ns/<namespace>/sa/<service account>"),
    ],
)
def test_an_authorization_policy_principal_istio_never_matches_is_named(rendered, principal, words):
    """Istio matches a principal only as ``<trust domain>/ns/<namespace>/sa/<service account>``
    (``cluster.local`` standing for the mesh's own trust domain and its aliases, whatever it is);
    one of another form (a SPIFFE id with its ``spiffe://``, a namespace/account pair) is kept as
    written and never matches, so the admin API's DENY refused the Airflow workers as well, and
    ``make deploy-check`` passed the overlay. It is named, with the form Istio takes."""
    objects = copy.deepcopy(rendered["production"])
    assert manifests.problems(objects) == []
    policy = one(objects, "AuthorizationPolicy")
    policy["spec"]["rules"][0]["from"][0]["source"]["notPrincipals"] = [principal]
    found = manifests.problems(objects)
    assert len(found) == 1
    assert found[0].startswith(
        "AuthorizationPolicy ml/digits-admin: invalid at spec/rules/0/from/0/source/notPrincipals/0"
    )
    assert words in found[0]
