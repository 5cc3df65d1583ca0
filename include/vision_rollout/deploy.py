"""Kubernetes mode: one Deployment per model version, the pods behind each Istio subset.

``render_deployment`` gives version N's Deployment: the serving image built for it (tagged by
the artifact's digest, ``docker/Dockerfile.model-server``), serving that version only (``--serve
MODEL:VERSION``: ready once it is loaded and warmed up), pod labels ``app=<service>`` (the
Service's selector) and ``version=<N>`` (the DestinationRule subset's), a GPU per pod and the
server's readiness probe, the admin API on a port of its own (8001, ``--admin-port``) that
``render_service``'s Service leaves out, its token a Secret's file. ``VersionDeployments``
applies it server-side (field manager ``model-rollout``), sizes it (``candidate_replicas`` per
stage), waits for its pods to be ready, and scales a version to zero on rollback or retirement.

Who owns ``spec.replicas``: without autoscaling the rollout does (it re-applies its own
Deployment with the new count, so one field manager keeps the whole object); with
``build.autoscaling`` an HPA per version does (``render_hpa``), as with Flagger: the applied
Deployment leaves ``spec.replicas`` out and the rollout moves the HPA's ``minReplicas`` instead.
Deployments, HPAs and PodDisruptionBudgets are applied without ``force``: a field another manager
owns (a ``kubectl scale``, an HPA the rollout did not make, a same-named HPA or budget of a Helm
release) is a 409 the task reports (``refused``), never silently taken over.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from typing import Any, NamedTuple

from vision_rollout.mesh import (
    FIELD_MANAGER,
    TRANSIENT,
    ApiUnreachable,
    Conflicted,
    Contended,
    IstioTarget,
    RouterError,
    api_error,
    api_message,
    reading_back,
    rollouts_view,
    settled,
    unsettled,
    with_live_metadata,
)
from vision_rollout.settings import BuildSettings

log = logging.getLogger(__name__)

HTTP_PORT = 8000  # the data port: inference, metadata, health, metrics, feedback
ADMIN_PORT = 8001  # the admin API (--admin-port), kept out of the Service
ADMIN_TOKEN_KEY = "token"  # noqa: S105 (the key of the admin token in its Secret, build.admin_secret)
SECRETS_DIR = "/etc/model-server"  # each Secret a folder of its own under it
FEEDBACK_KEY = "key"  # the key of the feedback key in build.feedback_secret
MASK_KEYS = "mask-keys.json"  # the key of the masking key file in build.mask_secret
SERVER_UID = 10001  # the user docker/Dockerfile.model-server runs the server as
GPU_RESOURCE = "nvidia.com/gpu"  # NVIDIA's device plugin's resource, and the taint GPU nodes usually carry
MAX_REPLICAS = 10_000  # as build.max_replicas: a count beyond it is a mistake, not a plan
# Istio injects its proxy as a Kubernetes sidecar container (an init container that keeps running):
# it is up before the server starts and stops only after the server has exited. Injected as a
# plain container (Istio's default before 1.27), the proxy is sent SIGTERM with the server and
# exits after its own 5 s drain, while the server still takes requests for build.drain_seconds and
# then writes its last prediction-log records to the object store: those requests and records
# would be lost at every scale-down.
NATIVE_SIDECAR = {"sidecar.istio.io/nativeSidecar": "true"}


def candidate_replicas(baseline: int, weight: float, mirror_percent: float, floor: int = 1) -> int:
    """The candidate's pods at a stage: ``max(floor, ceil(baseline * load))``.

    ``load`` is the candidate's share of the baseline's traffic: its weight, plus the mirrored
    copies (``weight/100 + mirror/100``), since a copy costs the candidate an inference as a
    routed request does. Istio's weighted route (requests without the user's bucket,
    ``render_virtual_service``) mirrors every request, those it sends to the candidate too, so
    the candidate may get a copy of its own share besides the baseline's: with a 100% mirror it needs more than the baseline's size from
    the first stage (1.05 times at 5%, 1.5 times at 50%). At 100% weight the stage has no mirror
    (``RolloutSpec.policy_for_stage``): the baseline's size. ``baseline``: the baseline's pods.
    Percentages are taken as written (``str``), so 7% of 100 pods is 7, not the 8 that binary
    floating point would give.
    """
    for name, value, top in (("weight", weight, 100), ("mirror_percent", mirror_percent, 100)):
        if not 0 <= value <= top:
            raise ValueError(f"{name} {value!r}: a percentage, 0 to 100")
    for name, count in (("baseline", baseline), ("floor", floor)):
        if not 0 <= count <= MAX_REPLICAS:
            raise ValueError(f"{name} replicas {count!r}: 0 to {MAX_REPLICAS}")
    w = Fraction(str(weight)) / 100
    load = w + Fraction(str(mirror_percent)) / 100 if w < 1 else w
    return max(floor, math.ceil(baseline * load))


def pod_count(pods: int) -> str:
    """``pods`` said with its noun: "1 pod", "2 pods", "0 pods"."""
    return f"{pods} pod" if pods == 1 else f"{pods} pods"


def render_deployment(
    target: IstioTarget,
    model: str,
    version: str,
    image: str,
    replicas: int | None = 1,
    build: BuildSettings | None = None,
    prediction_log: str | None = None,
    like: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Version ``version``'s Deployment; ``replicas`` None leaves ``spec.replicas`` out (an HPA
    owns it).

    ``like``: a live pod template to take instead of this rendering (Flagger's way: the
    baseline's, so that what a user set on its pods — resources, tolerations, node selection,
    env, probes, the prediction log — carries over to the candidate; or the version's own, so that
    re-applying it to scale changes nothing else). Only what makes it this version changes: the
    ``version`` label, the model annotation, and the ``model-server`` container's image and
    ``--serve`` (``like``'s first container when none has that name).

    What a pod needs for the rollout's evidence: ``--prediction-log`` (the settings' URI, in
    production ``s3://...``, which the Airflow workers read too), the object store's
    credentials as ``AWS_*`` variables from ``build.storage_secret`` (when set), the admin token
    (``build.admin_secret``, key ``token``: a file, as the keys, not a variable that every child
    process and ``/proc/<pid>/environ`` would hold), and two keys every replica must share, from
    Secrets mounted read-only: the feedback key (a label's token issued by one pod is checked by
    another: ``build.feedback_secret``, key ``key``) and the masking keys (the same value masks
    to the same token in every pod's records, and a log on object storage needs them:
    ``build.mask_secret``, key ``mask-keys.json``).

    What a production pod needs besides (``deploy/base`` holds version 1's Deployment as this
    renders it): no Kubernetes API token, a non-root user with no privilege escalation, no
    capabilities, the runtime's seccomp profile and a read-only root filesystem (``/tmp`` and
    ``/state`` are emptyDirs: Pod Security's "restricted"); requests for CPU and memory (``build.cpu``, ``build.memory``) and
    the GPU with its usual taint tolerated; a liveness probe (the process answers), held off by a
    startup probe while the version loads, beside the readiness one (the version is loaded and
    warmed up); and a ``preStop`` wait of ``build.drain_seconds`` before SIGTERM, so that the
    mesh stops sending a terminating pod requests before it stops taking them (within a grace
    period that leaves the server 30 s more to finish what it holds); Istio's proxy as a native sidecar (``NATIVE_SIDECAR``), so
    that it outlives that drain and the server's last writes.
    """
    build = build or BuildSettings()
    gpus = build.gpus
    gpu = {GPU_RESOURCE: str(gpus)} if gpus else {}  # a quantity
    drain = math.ceil(build.drain_seconds)
    labels = {"app": target.service, "version": version}
    secrets = [  # (volume, Secret, key, flag): read-only files the server is pointed at
        ("admin-token", build.admin_secret, ADMIN_TOKEN_KEY, "--admin-token-file"),
        ("feedback-key", build.feedback_secret, FEEDBACK_KEY, "--feedback-key-file"),
        ("mask-keys", build.mask_secret, MASK_KEYS, "--mask-keys"),
    ]
    container: dict[str, Any] = {
        "name": "model-server",
        "image": image,
        # The pod serves this version only, and is ready once it is loaded and warmed up.
        "args": [
            *("--repository", "/models", "--state-dir", "/state", "--device", "cuda" if gpus else "cpu"),
            *("--serve", f"{model}:{version}"),
            *("--admin-port", str(ADMIN_PORT)),
            "--mesh-mirror",  # (Istio's mirror: a copy's Host ends in -shadow)
            *(("--prediction-log", prediction_log) if prediction_log else ()),
            *(arg for volume, _, key, flag in secrets for arg in (flag, f"{SECRETS_DIR}/{volume}/{key}")),
        ],
        "volumeMounts": [
            {"name": "state", "mountPath": "/state"},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 (an emptyDir: the root filesystem is read-only)
            *({"name": volume, "mountPath": f"{SECRETS_DIR}/{volume}", "readOnly": True} for volume, *_ in secrets),
        ],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT},
            {"name": "admin", "containerPort": ADMIN_PORT},
        ],
        # As long as liveness waits: Kubernetes' 1 s default took a busy server out of its Service.
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
        },
        # The server loads and warms its version up before it listens at all (on a GPU, minutes
        # for a large model): the liveness probe alone would kill it a minute in. Liveness
        # counts from the first answer, within wait_ready's 10 minutes.
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": HTTP_PORT},
            "periodSeconds": 5,
            "failureThreshold": 120,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": HTTP_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", f"{drain:d}"]}}},
        "resources": {
            "requests": {"cpu": build.cpu, "memory": build.memory, **gpu},
            "limits": {"memory": build.memory, **gpu},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if build.storage_secret:
        container["envFrom"] = [{"secretRef": {"name": build.storage_secret}}]
    volumes = [
        {"name": "state", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        *(
            {"name": volume, "secret": {"secretName": name, "items": [{"key": key, "path": key}], "defaultMode": 0o440}}
            for volume, name, key, _ in secrets
        ),
    ]
    pod_labels = {**labels, "app.kubernetes.io/managed-by": FIELD_MANAGER}
    template = {
        # (the Deployment's managed-by on its pods too: what the PodMonitor selects them by)
        "metadata": {"labels": pod_labels, "annotations": {"model-rollout/model": model, **NATIVE_SIDECAR}},
        "spec": {
            "containers": [container],
            "volumes": volumes,
            # The server never calls the Kubernetes API: no ServiceAccount token in its pods.
            "automountServiceAccountToken": False,
            # fsGroup: the Secrets' files are the image's user's group (it runs as 10001, not root).
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": SERVER_UID,
                "runAsGroup": SERVER_UID,
                "fsGroup": SERVER_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "terminationGracePeriodSeconds": drain + 30,
            **({"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]} if gpus else {}),
        },
    }
    spec: dict[str, Any] = {
        "selector": {"matchLabels": dict(labels)},
        "template": template if like is None else _as_version(like, model, version, image, pod_labels),
    }
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(target, version),
            "namespace": target.namespace,
            "labels": {**labels, "app.kubernetes.io/managed-by": FIELD_MANAGER},
        },
        "spec": spec,
    }


VERSION = re.compile(r"[1-9][0-9]*")  # a version's number: its Deployment <service>-v<N>, its label version=<N>
COUNT = re.compile(r"[1-9][0-9]{0,4}")  # a count of pods, 1 to 99999, as an annotation records it

# A Deployment's own settings beside its pod template, which the platform may set (a GPU
# cluster's maxSurge 0, say) and the rollout carries from the live Deployment it applies.
CARRIED_SPEC = ("strategy", "minReadySeconds", "revisionHistoryLimit", "progressDeadlineSeconds")
# A live Deployment's annotations that are not the platform's, so not carried: the rollout's own
# record of a version (set per version), the Deployment controller's revision, kubectl's
# last-applied configuration (of that Deployment, not another version's).
NOT_CARRIED = ("model-rollout/", "deployment.kubernetes.io/", "kubectl.kubernetes.io/last-applied-configuration")
# A GitOps tool's tracking of the Deployment it applied (Argo CD's label, its default before 3.0,
# and its annotation): not another version's, which Argo CD would take for an extra resource of
# its application and prune.
TRACKING_LABELS = ("app.kubernetes.io/instance",)
TRACKING_ANNOTATIONS = ("argocd.argoproj.io/tracking-id",)


def with_live_settings(body: dict[str, Any], live: dict[str, Any], own: bool = True) -> dict[str, Any]:
    """``body`` (``render_deployment``'s, made like ``live``'s pod template) with what ``live``
    (the Deployment it is made like: its own, or the baseline's for a new candidate) holds beside
    the template: ``CARRIED_SPEC``, its labels, its annotations but ``NOT_CARRIED``'s (kustomize's
    commonAnnotations, Reloader's), and its selector's labels beside ``app`` and ``version``
    (kustomize's commonLabels adds some; a selector cannot change). Applied by the field manager
    that installed them (deploy/'s overlay is applied with the rollout's), a field left out of
    the body would be removed. ``own`` (the Deployment applied): only what the rollout owns there
    (``rollouts_view``): a field another manager owns (a GitOps tool's label) sent along became
    the rollout's too, which that manager could then never remove; left out, it stays as its
    owner has it. Not ``own`` (another version's Deployment): without a GitOps tool's tracking of
    it (``TRACKING_LABELS``, ``TRACKING_ANNOTATIONS``)."""
    spec, meta = body["spec"], body["metadata"]
    selector = (((live.get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
    live = rollouts_view(live) if own else live
    live_spec, live_meta = live.get("spec") or {}, live.get("metadata") or {}
    carried = {k: live_spec[k] for k in CARRIED_SPEC if live_spec.get(k) is not None}
    matched = {**selector, **spec["selector"]["matchLabels"]}
    not_labels, not_annotations = ((), ()) if own else (TRACKING_LABELS, TRACKING_ANNOTATIONS)
    labels = {
        **{k: v for k, v in (live_meta.get("labels") or {}).items() if k not in not_labels},
        **meta["labels"],
    }
    annotations = {
        **{
            k: v
            for k, v in (live_meta.get("annotations") or {}).items()
            if not k.startswith(NOT_CARRIED) and k not in not_annotations
        },
        **(meta.get("annotations") or {}),
    }
    return {
        **body,
        "metadata": {**meta, "labels": labels, **({"annotations": annotations} if annotations else {})},
        "spec": {**spec, **carried, "selector": {**spec["selector"], "matchLabels": matched}},
    }


def _as_version(like: dict[str, Any], model: str, version: str, image: str, labels: dict[str, str]) -> dict[str, Any]:
    """``like`` (a pod template) as version ``version``'s (``render_deployment``'s ``like``)."""
    template = copy.deepcopy(like)
    meta = template.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    meta["annotations"] = {**(meta.get("annotations") or {}), "model-rollout/model": model}
    container = _server_container(template["spec"]["containers"])
    container["image"] = image
    args = [str(a) for a in container.get("args") or []]
    serve = [i + 1 for i, a in enumerate(args[:-1]) if a == "--serve"]
    for i in serve:
        args[i] = f"{model}:{version}"
    joined = [i for i, a in enumerate(args) if a.startswith("--serve=")]  # (one argument, as argparse takes it)
    for i in joined:
        args[i] = f"--serve={model}:{version}"
    container["args"] = args + ([] if serve or joined else ["--serve", f"{model}:{version}"])
    return template


def _rollouts_template(live: dict[str, Any]) -> dict[str, Any]:
    """A live Deployment's pod template without what another field manager owns there
    (``rollouts_view``: its pods' labels and annotations, a field of a container, a sidecar it
    added), to re-apply as the version's own; its model server (``_server_container``) kept, with
    the image and arguments ``_as_version`` sets from it."""
    template = copy.deepcopy(rollouts_view(live)["spec"].get("template") or {})
    server = _server_container(live["spec"]["template"]["spec"]["containers"])
    containers = template.setdefault("spec", {}).setdefault("containers", [])
    mine = next((c for c in containers if c.get("name") == server["name"]), None)
    if mine is None:
        mine = {"name": server["name"]}
        containers.insert(0, mine)
    mine.update({k: server[k] for k in ("image", "args") if k in server})
    return template


def _server_container(containers: list[Any]) -> Any:
    """A pod template's model server: its container named ``model-server``, else its first (as
    dicts, or the Kubernetes client's objects)."""

    def name(c: Any) -> Any:
        return c.get("name") if isinstance(c, dict) else c.name

    return next((c for c in containers if name(c) == "model-server"), containers[0])


def deployment_name(target: IstioTarget, version: str) -> str:
    return f"{target.service}-v{version}"


def render_service(target: IstioTarget) -> dict[str, Any]:
    """The Service in front of every version's pods (``app=<service>``; Istio's subsets split
    it by ``version``): the data port only. The admin port (traffic, load/unload, fault
    injection) is not in it, so nothing reaches it through the Service's name; the server
    answers admin calls on the data port 404. An Istio AuthorizationPolicy admitting only the
    Airflow workers' service account to port 8001 would also close it to pod-IP traffic
    inside the mesh; it is not rendered here (the rollout does not call the admin API in
    Kubernetes mode: Istio routes, and the probe is a data-port call with the token)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": target.service,
            "namespace": target.namespace,
            "labels": {"app": target.service, "app.kubernetes.io/managed-by": FIELD_MANAGER},
        },
        "spec": {
            "selector": {"app": target.service},
            # appProtocol: Istio takes it as HTTP without sniffing (the port name would do too).
            "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "appProtocol": "http"}],
        },
    }


def render_hpa(
    target: IstioTarget,
    version: str,
    min_replicas: int,
    max_replicas: int,
    metrics: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``autoscaling/v2`` HorizontalPodAutoscaler of version ``version``'s Deployment: the
    stage's size as its floor, and ``metrics`` (``build.autoscaling_metrics``, checked by
    ``settings.metric_problem``) when given, else Kubernetes' default (80% CPU)."""
    if not 1 <= min_replicas <= max_replicas <= MAX_REPLICAS:
        raise ValueError(f"HPA bounds {min_replicas}..{max_replicas}: need 1 <= min <= max <= {MAX_REPLICAS}")
    name = deployment_name(target, version)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {
            "name": name,
            "namespace": target.namespace,
            "labels": {"app": target.service, "version": version, "app.kubernetes.io/managed-by": FIELD_MANAGER},
            # Every annotation the rollout sets, none by default: an apply without one it set
            # before (FLOOR_ANNOTATION) removes it, as server-side apply removes a field its
            # manager no longer applies.
            "annotations": {},
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            **({"metrics": metrics} if metrics else {}),
        },
    }


def render_pdb(target: IstioTarget, version: str, replicas: int, autoscaled: bool = False) -> dict[str, Any]:
    """Version ``version``'s PodDisruptionBudget at ``replicas`` pods: its pods only (``app`` and
    ``version``: no two versions' budgets select the same pod, which the eviction API refuses to
    evict), so a node drain takes one pod of a version at a time and never the only pod of a
    version (``maxUnavailable`` 0 at one pod: a one-pod candidate evicted is a share answered 503
    and a rollback; the drain waits until the stage grows it or the run ends). A budget over every
    version let a drain evict a one-pod candidate whole while the stable's pods were all up. A pod
    that is not ready may always go (it serves nothing). ``autoscaled``: ``replicas`` is the floor
    of the version's HPA (the least it may scale the version to); at a floor of one pod the budget
    is ``minAvailable`` 1, which keeps the last pod whatever count the HPA chose (a
    ``maxUnavailable`` 1 set at a larger count let a drain evict the only pod once the HPA scaled
    the version down) and lets a drain take the others."""
    labels = {"app": target.service, "version": version}
    budget = {"maxUnavailable": 1} if replicas > 1 else {"minAvailable": 1} if autoscaled else {"maxUnavailable": 0}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": deployment_name(target, version),
            "namespace": target.namespace,
            "labels": {**labels, "app.kubernetes.io/managed-by": FIELD_MANAGER},
        },
        "spec": {
            **budget,
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
            "selector": {"matchLabels": labels},
        },
    }


def selects(selector: Any, labels: dict[str, str]) -> bool:
    """Whether a policy/v1 label selector (``matchLabels``, ``matchExpressions``) selects an object
    labelled ``labels``: an empty one selects every pod of its namespace, none (null) no pod."""
    if not isinstance(selector, dict):
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for term in selector.get("matchExpressions") or []:
        key, op, values = term.get("key"), term.get("operator"), term.get("values") or []
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op, False)
        if not ok:
            return False
    return True


def beyond_history(replicas: dict[str, int], in_use: set[str], limit: int) -> list[str]:
    """The versions whose Deployment (and HPA) go once a run ends, as Argo Rollouts' revision
    history limit: of ``replicas`` (each version the rollout deployed -> its Deployment's
    ``spec.replicas``), those retired (at 0) beyond the ``limit`` newest retired ones (by version
    number, the ``in_use`` ones counted), never one ``in_use`` (the run's two versions, those the
    VirtualService or DestinationRule names) nor one running pods. Oldest first."""
    if limit < 0:
        raise ValueError(f"revision history limit {limit!r}: 0 or more")
    retired = sorted((v for v, n in replicas.items() if n == 0), key=int, reverse=True)
    return sorted((v for v in retired[limit:] if v not in in_use), key=int)


# The Deployment's annotations recording the image the rollout deployed and the digest of the pod
# template it applied (``VersionDeployments.changed``).
IMAGE_ANNOTATION = "model-rollout/image"
TEMPLATE_ANNOTATION = "model-rollout/pod-template-sha256"
# Set by ``kubectl rollout restart``: the same template run again, not another.
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"


def template_digest(template: dict[str, Any]) -> str:
    """sha256 of a pod template as the API server holds it (JSON, its defaults filled in), a
    restart's mark left out: what ``changed`` compares, as Flagger hashes its target's template."""
    meta = dict(template.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != RESTARTED_AT}
    meta["annotations"] = annotations or None
    canonical = {**template, "metadata": {k: v for k, v in meta.items() if v is not None}}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# What a version's HPA takes from another's (``VersionDeployments.scale``'s ``autoscaling_of``).
HPA_CARRIED = ("minReplicas", "maxReplicas", "metrics", "behavior")
# What the API server sets as an HPA's metrics where it is given none (80% CPU).
DEFAULT_HPA_METRICS = [
    {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}
]
# The stable version's HPA while a rollout holds its floor (``VersionDeployments.hold_floor``):
# its own minReplicas, which ``release_floor`` puts back, and the floor held. On the object, so that
# a rollout whose worker died is put back by its teardown or failure callback on another.
FLOOR_ANNOTATION = "model-rollout/own-min-replicas"
HELD_ANNOTATION = "model-rollout/held-min-replicas"
# An HPA whose floor ``release_floor`` released but whose PodDisruptionBudget it has not updated
# (yet, or ``BudgetNotApplied``): the floor the budget is to follow, for the next run's
# ``release_floors`` to apply it (the floor's own annotation is gone with the floor). Written by the
# release's own apply, cleared once the budget is applied: a worker killed between leaves it.
BUDGET_ANNOTATION = "model-rollout/budget-pending"
OWN_HPA_ANNOTATIONS = (FLOOR_ANNOTATION, HELD_ANNOTATION, BUDGET_ANNOTATION)


# A server-side apply's conflicts as the API server words them (one: 'conflict with M: PATH';
# several: 'conflicts with M:', then '- PATH' a line, for each manager M): M a quoted field manager,
# then maybe 'with subresource "S"', 'using VERSION' and 'at TIME' (an Update's).
APPLY_CONFLICT = re.compile(
    r'conflicts? with "(?P<manager>[^"]*)"(?P<sub> with subresource "[^"]*")?(?: using \S+(?: at \S+)?)?:'
    r"(?P<paths>[^\n]*(?:\n- [^\n]*)*)"
)
# What ``scale_by_hand``'s command needs: kubectl's --subresource came in 1.24 (alpha; beta 1.27, GA 1.33).
SCALE_BY_HAND_KUBECTL = "kubectl 1.24 or later, the first with --subresource"
HELM_MANAGER = "helm"  # Helm's field manager (its objects' label app.kubernetes.io/managed-by: Helm)


def apply_conflicts(message: str) -> dict[str, list[str]]:
    """The fields each other field manager owns that a refused apply would have changed, from the
    API server's 409 ``message`` (``APPLY_CONFLICT``): ``{'"helm"': ['.spec.replicas']}``."""
    owned: dict[str, list[str]] = {}
    for m in APPLY_CONFLICT.finditer(message):
        paths = [p.strip().removeprefix("- ") for p in m["paths"].split("\n")]
        owned.setdefault(f'"{m["manager"]}"{m["sub"] or ""}', []).extend(p for p in paths if p)
    return {k: v for k, v in owned.items() if v}


CAUSE_MANAGER = re.compile(r'conflict with "(?P<manager>[^"]*)"(?P<sub> with subresource "[^"]*")?')


def conflicts_of(exc: Any) -> dict[str, list[str]]:
    """The fields each other field manager owns that a refused apply (a 409, ``exc``: an
    ApiException) would have changed: from its Status's ``details.causes`` (``FieldManagerConflict``,
    one a field) where the API server gives them, else from its whole ``message``
    (``apply_conflicts``), never ``api_message``'s cut: a long list of one manager's fields hid
    another's after it."""
    try:
        status = json.loads(exc.body)
    except (TypeError, ValueError, AttributeError):
        return apply_conflicts(str(exc.body))
    if not isinstance(status, dict):
        return apply_conflicts(str(exc.body))
    owned: dict[str, list[str]] = {}
    details = status.get("details")
    for cause in (details.get("causes") if isinstance(details, dict) else None) or []:
        if not isinstance(cause, dict) or cause.get("reason") != "FieldManagerConflict" or not cause.get("field"):
            continue
        m = CAUSE_MANAGER.match(str(cause.get("message") or ""))
        if m:
            owned.setdefault(f'"{m["manager"]}"{m["sub"] or ""}', []).append(str(cause["field"]))
    return owned or apply_conflicts(str(status.get("message") or ""))


FIELD_STEP = re.compile(r'\.(?P<field>[^.\[]+)|\[(?P<keys>(?:[^\]"]|"(?:[^"\\]|\\.)*")*)\]')
LIST_KEY = re.compile(r'(?P<key>[^=,]+)=(?P<value>"(?:[^"\\]|\\.)*"|[^,]*)')
AS_APPLIED = "<as the rollout applies>"


def keyed_patch(paths: list[str]) -> dict[str, Any] | None:
    """A strategic merge patch's shape for the fields of ``paths`` (a 409's field paths) inside a
    keyed list (``.spec.template.spec.containers[name="model-server"].image``): each list item
    with its key, the field's value ``AS_APPLIED``; None where none is in a keyed list. Others are
    left out: a map key with dots (a label's) cannot be told from a path's steps."""
    patch: dict[str, Any] = {}
    for path in paths:
        steps = list(FIELD_STEP.finditer(path))
        if "".join(m[0] for m in steps) != path or not any(m["keys"] is not None for m in steps) or steps[-1]["keys"]:
            continue
        here: Any = patch
        for step, after in zip(steps, [*steps[1:], None], strict=True):
            if step["keys"] is not None:
                keys = {k["key"]: _key_value(k["value"]) for k in LIST_KEY.finditer(step["keys"])}
                item = next((i for i in here if all(i.get(k) == v for k, v in keys.items())), None)
                if item is None:
                    item = dict(keys)
                    here.append(item)
                here = item
            elif after is None:
                here[step["field"]] = AS_APPLIED
            else:
                here = here.setdefault(step["field"], [] if after["keys"] is not None else {})
    return patch or None


def _key_value(said: str) -> Any:
    """A list key's value as a 409's path says it (``"model-server"``, ``8080``), as JSON."""
    try:
        return json.loads(said)
    except ValueError:
        return said


class FieldsOwned(RouterError):
    """An apply refused (409) for fields other field managers own (``refused``): ``owned``, the
    fields each of them owns (``apply_conflicts``)."""

    def __init__(self, message: str, owned: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.owned = owned


class FloorOwned(FieldsOwned):
    """``hold_floor``'s apply refused for an HPA's ``minReplicas`` another field manager owns."""


class BudgetNotApplied(RouterError):
    """``release_floor``: the version's HPA applied, its floor released, but its
    PodDisruptionBudget not updated to match (``_apply_pdb``'s failure: no answer, or a refusal); or a
    rollback's ``scale``: the Deployment scaled, its budget not applied (``_budget_after_scale``). The
    message says so, names the budget and what to set it to, with the apply's error whole (what
    ``settled`` found of it: "it may still land"), and ``maybe_written`` is the apply's."""

    def __init__(self, message: str, failed: RouterError | None = None) -> None:
        super().__init__(message)
        self.maybe_written = bool(failed and failed.maybe_written)


class AutoscalingNotApplied(BudgetNotApplied):
    """A rollback's ``scale`` under autoscaling: the Deployment scaled (its count set first,
    through its scale subresource), then its HPA not read or not applied (a 500, a 403, no
    answer: ``_autoscale``). Reported beside the rollback as a budget not applied is (the traffic
    moves back all the same); ``maybe_written``, the HPA apply's."""


MERGE_PATCHED = frozenset({"HorizontalPodAutoscaler", "PodDisruptionBudget"})  # (no list merged by key)


def refused(what: str, exc: Any, kind: str | None = None) -> RouterError:
    """The API server's refusal (an ApiException) as a RouterError saying what to do; a 409 on
    apply is a field another manager owns, said in one sentence, each manager with the fields it
    owns (``apply_conflicts``), and a Helm release's object named as such. The fields given back
    by a patch under the rollout's field manager: of a ``kind`` in ``MERGE_PATCHED`` (an HPA, a
    PodDisruptionBudget), a JSON merge patch, as the rollout's own commands by hand
    (``_by_hand``); else (a Deployment's) a strategic merge patch, which merges its containers
    by name."""
    message = api_message(exc)
    owned = conflicts_of(exc) if exc.status == 409 else {}
    if owned:
        others_first = sorted(owned.items(), key=lambda item: item[0].startswith(f'"{FIELD_MANAGER}"'))
        said = "; ".join(f"{manager} owns {', '.join(paths)}" for manager, paths in others_first)
        helm = any(manager.startswith(f'"{HELM_MANAGER}"') for manager in owned)
        keyed = keyed_patch([path for paths in owned.values() for path in paths])
        shape = json.dumps(keyed, separators=(",", ":")) if keyed else ""
        shape = shape if len(shape) <= 600 else ""  # (a long one cut would be no patch)
        return FieldsOwned(
            f"{what}: fields another field manager owns, which the rollout does not take over: {said[:1000]}. "
            + (
                "It is a Helm release's object, which Helm takes back at its next upgrade: take it out of the "
                "release (or install the model's versions with deploy/'s overlay), then "
                if helm
                else ""
            )
            + "give the fields to the rollout: set those fields alone to what the rollout applies, under its "
            + (
                f"field manager (kubectl patch --type=merge --field-manager={FIELD_MANAGER}, a JSON merge patch: "
                f"a {kind}'s fields hold no list merged by key; a write takes a field from its manager where it "
                "changes its value"
                if kind in MERGE_PATCHED
                else f"field manager (kubectl patch --type=strategic --field-manager={FIELD_MANAGER}, a strategic "
                "merge patch, kubectl's default for a Deployment: it merges a list such as containers item by item "
                "by its key, where a JSON merge patch would replace the whole list with the items sent; a write "
                "takes a field from its manager where it changes its value"
                + (f"; a field in a list sent inside its list item, with its key: {shape}" if shape else "")
            )
            + "), not kubectl apply --server-side of those fields alone under that manager, which would remove the "
            "rollout's other fields (an apply drops the fields its manager applied before and no longer sends); "
            "then have that manager stop sending them (its configuration without them), not before: an apply "
            "without a field its manager alone owns deletes it or resets it to its default (spec.replicas to 1); "
            "or, for spec.replicas under your own HPA, set the model_server_default extra build.autoscaling",
            owned,
        )
    if exc.status == 409:
        return RouterError(
            f"{what}: 409 Conflict: {message}. The rollout does not take over fields another "
            "manager owns: give the field back (or, for spec.replicas under your own HPA, set the "
            "model_server_default extra build.autoscaling)"
        )
    return api_error(what, exc)


class Released(NamedTuple):
    """``VersionDeployments.release_floors``'s work: the versions whose floor left held it released,
    and those whose budget a release left not updated it applied."""

    floors: list[str]
    budgets: list[str]


@dataclass
class VersionDeployments:
    target: IstioTarget
    model: str
    api_client: Any = None  # kubernetes.client.ApiClient (the Airflow hook's)
    build: BuildSettings = field(default_factory=BuildSettings)
    prediction_log: str | None = None  # the pods' --prediction-log (the settings')
    # (the last ``_clear_budget_mark`` that got no answer: for ``release_floors`` to stop there)
    mark_unanswered: ApiUnreachable | None = field(default=None, init=False, repr=False, compare=False)

    def _apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api_client)

    def _name(self, version: str) -> str:
        return deployment_name(self.target, version)

    def apply(self, version: str, image: str, replicas: int = 1, like: str | None = None) -> dict[str, Any]:
        """Apply version ``version``'s Deployment with ``replicas`` pods (under autoscaling: its
        HPA's floor). Its pod template: its own live one when it has a Deployment (scaling changes
        nothing else; without what another manager owns in it, ``_rollouts_template``: pod labels
        and annotations, a container's field, a sidecar it added, which sent along would become the
        rollout's too), else version ``like``'s (the baseline's: what the user set on its pods
        carries over), else ``render_deployment``'s. No ``force``: unlike the Istio objects,
        which only the rollout writes, a Deployment's fields may have other owners (an HPA,
        ``kubectl scale``); fighting them would undo their changes at every stage, so a conflict
        is reported instead. An apply whose answer left unknown whether it was served is read
        back (``settled``): in place (``_apply``'s ``in_doubt``), done; else applied again from
        what was read; then its size (``_sized``)."""

        def attempt(doubted: int) -> Any:
            source = self._live(version) or (self._live(like) if like is not None else None)
            return self._apply(version, image, replicas, source, deployed=image, in_doubt=doubted > 0)

        return self._sized(version, replicas, settled(self.changes_noted(attempt)))

    def _apply(
        self,
        version: str,
        image: str,
        replicas: int,
        source: Any,
        deployed: str | None = None,
        dry_run: bool = False,
        in_doubt: bool = False,
    ) -> Any:
        """``apply``'s write of the Deployment (its answer, a V1Deployment; its size, ``_sized``,
        after it) with its pod template and its own settings from ``source`` (a V1Deployment
        already read, ``with_live_settings``; None: ``render_deployment``'s); ``deployed``: the image the rollout deployed for the
        version, recorded on the Deployment (``IMAGE_ANNOTATION``, which ``changed`` reads), with
        the digest of the pod template the API server holds after the apply
        (``TEMPLATE_ANNOTATION``). A template changed by hand since the last record keeps that
        record: re-applying it here (a scale) does not make the change the rollout's. ``dry_run``:
        the Deployment's apply sent as a dry run (``dryRun=All``: refused as it would be, nothing
        stored), nothing else. ``in_doubt``: after an apply whose answer left unknown whether it
        was served (``settled``), ``source`` (the version's own Deployment) answered as it is, no
        apply sent, where it holds what the apply sets: the pod template the server would hold
        after it (a dry run's, unless the body's is the live one), the annotations it sends, and
        without autoscaling ``replicas`` pods; under autoscaling the count is not checked (the HPA
        may have moved it since; ``_sized`` sets its floor after).

        One write carries the template and its digest, so that a refused or unanswered apply
        leaves the Deployment and its record as they were (two writes, the first applied and the
        second refused, left a new template under the old digest: a hand edit to ``changed``).
        The digest is of the live template when the apply leaves it as it is (a scale), else of
        the template a dry run of the apply (``dryRun=All``) says the server would hold."""

        autoscaled = self.build.autoscaling
        live = None if source is None else self._apps().api_client.sanitize_for_serialization(source)
        meta = (live or {}).get("metadata") or {}
        recorded = (
            (meta.get("annotations") or {}).get(TEMPLATE_ANNOTATION)
            if meta.get("name") == self._name(version)
            else None
        )
        intact = recorded is None or live is None or recorded == template_digest(live["spec"]["template"])
        own = meta.get("name") == self._name(version)
        like = None if live is None else live["spec"]["template"]
        if live is not None and own:  # (what another manager owns in its pod template stays its own)
            like = _rollouts_template(live)
        body = render_deployment(
            self.target,
            self.model,
            version,
            image,
            None if autoscaled else replicas,
            self.build,
            self.prediction_log,
            like=like,
        )
        if live is not None:
            body = with_live_settings(body, live, own=own)
        if deployed is not None:
            body["metadata"]["annotations"] = {
                **(body["metadata"].get("annotations") or {}),
                IMAGE_ANNOTATION: deployed,
            }
            if recorded is not None:
                body["metadata"]["annotations"][TEMPLATE_ANNOTATION] = recorded

        read = meta.get("resourceVersion") if own else None  # (the version its forced apply holds to)

        def applied(**dry_run: str) -> Any:
            patch = self._apps().patch_namespaced_deployment
            return self._server_side_apply(patch, f"apply Deployment {self._name(version)}", body, read, **dry_run)

        def held() -> Any:  # (the template the rollout applies, with the server's defaults)
            now = None if live is None else live["spec"]["template"]
            return now if now == body["spec"]["template"] else self._template(applied(dry_run="All"))

        template = None
        if deployed is not None and intact:
            template = held()
            body["metadata"]["annotations"][TEMPLATE_ANNOTATION] = template_digest(template)
        if in_doubt and live is not None and own and not dry_run:  # (the apply in doubt read back: ``settled``)
            sets = body["metadata"].get("annotations") or {}
            if (
                template_digest(live["spec"]["template"]) == template_digest(template or held())
                and all((meta.get("annotations") or {}).get(k) == v for k, v in sets.items())
                and (autoscaled or replicas_of(source) == replicas)
            ):
                return source
        return applied(**({"dry_run": "All"} if dry_run else {}))

    def _server_side_apply(
        self, patch: Callable[..., Any], what: str, body: dict[str, Any], read: str | None, **options: str
    ) -> Any:
        """``body`` applied by ``patch`` (a client's ``patch_namespaced_<kind>``) server-side, with the
        rollout's field manager and no ``force`` (a field another manager owns is refused); its
        answer. A refusal as ``refused`` says it, naming ``what``; an answer that left unknown
        whether it was served, ``Unsettled`` (``unsettled``: for the caller's ``settled``). Fields
        refused only for the rollout's own field manager's other writes (its scale subresource's,
        ``_scale_subresource``, or an operator's under its name, ``scale_by_hand``) are its own:
        the apply is sent again with ``force``, which takes them from those writes, at ``read``
        (the object's ``resourceVersion`` as the caller read it; None: none read, nothing forced):
        a write since (a controller's status, or another manager's field) refuses the forced apply
        (409), nothing applied: ``Conflicted``, for the caller's ``settled`` to read the object and
        apply again, whose unforced apply says whether another manager took a field meanwhile
        (``FieldsOwned``, which ``changes_noted`` says followed a change); refused to the last,
        ``Contended``."""
        from kubernetes.client.exceptions import ApiException

        def sent(body: dict[str, Any], **force: bool) -> Any:
            with unsettled(dry_run=bool(options.get("dry_run"))):
                try:
                    return patch(
                        body["metadata"]["name"],
                        self.target.namespace,
                        body,
                        field_manager=FIELD_MANAGER,
                        _content_type="application/apply-patch+yaml",
                        **options,
                        **force,
                    )
                except ApiException as exc:
                    if force and exc.status == 409:  # (force takes any field: only the resourceVersion refuses it)
                        raise Conflicted(
                            Contended(
                                f"{what}: not sent again with force to take back the rollout's own fields: the object "
                                f"changed since it was read (resourceVersion {read}; 409 Conflict: "
                                f"{api_message(exc)}), and another manager's change is not taken over; nothing applied"
                            )
                        ) from None
                    raise refused(what, exc, str(body.get("kind") or "")) from None

        try:
            return sent(body)
        except FieldsOwned as exc:
            if read is None or not all(manager.startswith(f'"{FIELD_MANAGER}"') for manager in exc.owned):
                raise
            log.info("%s: the rollout's own (its field manager's other writes), taken back", str(exc)[:300])
            return sent({**body, "metadata": {**body["metadata"], "resourceVersion": read}}, force=True)

    @staticmethod
    def changes_noted(attempt: Callable[[int], Any]) -> Callable[[int], Any]:
        """``attempt`` (a ``settled`` one, around ``_server_side_apply``) whose ``FieldsOwned`` after a
        forced apply refused for a change since its read (``Conflicted``) says so: another manager
        changed the object between the read and the forced apply, and its fields are not taken."""
        conflicts: list[Conflicted] = []

        def noted(doubted: int) -> Any:
            try:
                return attempt(doubted)
            except Conflicted as exc:
                conflicts.append(exc)
                raise
            except FieldsOwned as exc:
                if conflicts:
                    exc.args = (
                        f"{exc} (the object changed since it was read before the rollout's forced apply of its "
                        "own fields; read again, another manager's change is not taken over)",
                    )
                raise

        return noted

    def _sized(
        self,
        version: str,
        replicas: int,
        applied: Any,
        autoscaling_of: str | None = None,
        rolling_back: bool = False,
    ) -> dict[str, Any]:
        """After the Deployment's apply (``applied``: its answer), settled: under autoscaling, its
        HPA and its count (``_autoscale``: ``autoscaling_of``, the version whose HPA spec to take;
        ``rolling_back``, the count first, the HPA's failure after it reported); else its budget.
        The Deployment as applied, as a dict. Each
        write settled on its own, none inside another's retry: the HPA's apply (itself settled)
        inside the Deployment's, sent round again by the scale patch's failure, made 16 HPA
        applies of a rollback's scale answered 500 each time."""
        if self.build.autoscaling:
            self._autoscale(version, replicas, applied.spec.replicas or 0, autoscaling_of, rolling_back)
        elif replicas > 0:  # (under an HPA, ``_apply_hpa`` sizes it by the HPA's floor)
            self._budget_after_scale(version, replicas, rolling_back)
        return dict(self._apps().api_client.sanitize_for_serialization(applied))

    def _budget_after_scale(self, version: str, replicas: int, rolling_back: bool, floor: int | None = None) -> None:
        """The version's PodDisruptionBudget (``_apply_pdb``) once its Deployment is at ``replicas``
        pods, for ``floor`` pods where given (under autoscaling, its HPA's floor), else ``replicas``.
        ``rolling_back``: its failure (no answer) raised as ``BudgetNotApplied``, saying the
        Deployment is scaled and what to set the budget to by hand: a rollback's caller tells it from
        the scale's own failure (the routes move back all the same: a budget never holds back a
        rollback)."""
        pods = replicas if floor is None else floor
        try:
            self._apply_pdb(version, pods)
        except RouterError as exc:
            if not rolling_back:
                raise
            name = f"{self.target.namespace}/{self._name(version)}"
            raise BudgetNotApplied(
                f"version {version}'s Deployment is scaled to {pod_count(replicas)}, but its PodDisruptionBudget "
                f"{name} was not applied ({exc}): {self._budget_advice(version, pods)}; until then a node "
                "drain follows the budget it had",
                exc,
            ) from exc

    def _apply_pdb(self, version: str, replicas: int, refusal_raised: bool = False) -> None:
        """The version's PodDisruptionBudget (``render_pdb``) for ``replicas`` pods (no ``force``: a
        field another manager owns, a Helm release's budget of that name, is refused), with the
        labels and annotations the live one holds beside the rollout's (``with_live_metadata``:
        deploy/'s overlay installs version 1's with the rollout's field manager). A refusal is
        logged (``refused``: each field and its manager), not raised: the pods are applied
        already, and a budget (a guard against node drains) must not hold back a rollback; a
        budget that cannot be read is applied as rendered (its size matters more than its labels).
        An apply whose answer left unknown whether it was served is read back (``settled``): the
        spec as rendered, that apply's, served; else applied again from what was read.
        ``refusal_raised``: a refusal raised, not logged (``apply_pending_budget``: the budget is
        still pending, its mark kept)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        name = self._name(version)
        policy = client.PolicyV1Api(self.api_client)
        what = f"apply PodDisruptionBudget {name}"

        def attempt(doubted: int) -> None:
            body = render_pdb(self.target, version, replicas, bool(self.build.autoscaling))
            read = None
            try:
                live = policy.api_client.sanitize_for_serialization(
                    policy.read_namespaced_pod_disruption_budget(name, self.target.namespace)
                )
                if doubted and live.get("spec") == body["spec"]:
                    return  # (the apply in doubt, served)
                body = with_live_metadata(body, live)  # another manager's labels stay its own
                read = (live.get("metadata") or {}).get("resourceVersion")
            except ApiException as exc:
                if exc.status != 404 and reading_back():  # (no read: the read back failed, not "not in place")
                    raise refused(f"GET PodDisruptionBudget {name}", exc) from None
                if exc.status != 404:
                    log.warning(
                        "%s; applied without its labels and annotations",
                        refused(f"GET PodDisruptionBudget {name}", exc),
                    )
            self._server_side_apply(policy.patch_namespaced_pod_disruption_budget, what, body, read)

        try:
            settled(self.changes_noted(attempt))
        except ApiUnreachable:
            raise
        except RouterError as exc:
            if refusal_raised:
                raise
            log.warning("%s; a drain may take its pods", exc)

    def shared_budgets(self, versions: Iterable[str]) -> list[str]:
        """The PodDisruptionBudgets of the namespace that select the pods of one of ``versions``
        (its Deployment's pod template labels) beside the version's own (``render_pdb``): a pod
        two budgets select is one the eviction API refuses to evict (a node drain blocks on it),
        as with a budget over every version left from an earlier install. One sentence each."""
        from kubernetes import client

        namespace = self.target.namespace
        listed = self._call(
            "list PodDisruptionBudgets",
            lambda: client.PolicyV1Api(self.api_client).list_namespaced_pod_disruption_budget(namespace),
        )
        budgets = [self._apps().api_client.sanitize_for_serialization(b) for b in listed.items]
        found = []
        for version in versions:
            live = self._live(version)
            if live is None:
                continue
            pods = dict(live.spec.template.metadata.labels or {})
            for budget in budgets:
                name = budget["metadata"]["name"]
                if name != self._name(version) and selects((budget.get("spec") or {}).get("selector"), pods):
                    found.append(
                        f"PodDisruptionBudget {namespace}/{name} selects version {version}'s pods beside their own "
                        f"budget {self._name(version)}: the eviction API refuses to evict a pod two budgets select, "
                        f"so a node drain blocks on them (delete it: kubectl -n {namespace} delete pdb {name})"
                    )
        return found

    def _template(self, deployment: Any) -> dict[str, Any]:
        """A V1Deployment's pod template as JSON (what ``template_digest`` takes)."""
        return dict(self._apps().api_client.sanitize_for_serialization(deployment.spec.template))

    def _autoscale(
        self, version: str, replicas: int, live: int, autoscaling_of: str | None = None, rolling_back: bool = False
    ) -> None:
        """Under an HPA: its floor is the stage's size (``_apply_hpa``); or, given ``autoscaling_of``
        (a version), that version's HPA's bounds, metrics and behavior (``_hpa_spec``). An HPA does
        nothing for a Deployment at 0 (Kubernetes disables it there), and needs a sync period to
        reach a new floor, so the count is also set through the scale subresource, as ``kubectl
        scale`` does, when it has to grow from below ``replicas`` or go to 0; the HPA owns it from
        there. ``rolling_back`` (to ``replicas`` > 0): the count first, then the HPA read and
        applied, so that no failure of the HPA's holds back the pods a rollback's traffic waits on
        (its scale failed, raised before the HPA is touched); the HPA's apply refused for fields
        another manager owns (another manager's HPA, a Helm release's: its fields stay its own) is
        logged, any other failure of its read or its apply (a 500, a 403, no answer) raised as
        ``AutoscalingNotApplied``, its budget's no answer as ``BudgetNotApplied`` (``_budget_after_scale``):
        the pods scaled, the caller moves the traffic and reports it beside. A scale whose answer
        left unknown whether it was served is settled by reading the Deployment's ``spec.replicas`` back."""
        if rolling_back and replicas > 0:
            if live < replicas:
                self._scale_subresource(version, replicas)
            try:
                spec = self._hpa_spec(version, replicas, autoscaling_of)
                self._apply_hpa(version, spec, budget=False)
            except FieldsOwned as exc:
                log.warning("%s; its pods are scaled to %d all the same, for the rollback", exc, replicas)
                return
            except RouterError as exc:
                name = f"{self.target.namespace}/{self._name(version)}"
                raise AutoscalingNotApplied(
                    f"version {version}'s Deployment is scaled to {pod_count(replicas)}, but its "
                    f"HorizontalPodAutoscaler {name} was not applied ({exc}): the HPA keeps the spec the API server holds, and scales the "
                    "version from the pods it runs",
                    exc,
                ) from exc
            self._budget_after_scale(version, replicas, rolling_back, int(spec.get("minReplicas") or 1))
            return
        if replicas > 0:
            self._apply_hpa(version, self._hpa_spec(version, replicas, autoscaling_of))
        if replicas > 0 and live >= replicas:
            return
        self._scale_subresource(version, replicas)

    def _hpa_spec(self, version: str, replicas: int, autoscaling_of: str | None) -> dict[str, Any]:
        """The spec of the version's HPA for ``replicas`` pods (``render_hpa``: its floor); given
        ``autoscaling_of`` (a version), that version's HPA's bounds, metrics and behavior
        (``autoscaling``, read here; none live: the rendered one)."""
        top = max(self.build.max_replicas or min(10 * replicas, MAX_REPLICAS), replicas)
        spec = render_hpa(self.target, version, replicas, top, self.build.autoscaling_metrics)["spec"]
        like = self.autoscaling(autoscaling_of) if autoscaling_of is not None else None
        if like is not None:
            taken = {k: like[k] for k in HPA_CARRIED if like.get(k) is not None}
            spec = {**{k: v for k, v in spec.items() if k != "metrics"}, **taken}
        return spec

    def _scale_subresource(self, version: str, replicas: int) -> None:
        """The Deployment's count set through its scale subresource, as ``kubectl scale`` does
        (which a field another manager owns does not block); a scale whose answer left unknown
        whether it was served is settled by reading its ``spec.replicas`` back."""
        from kubernetes.client.exceptions import ApiException

        name = self._name(version)

        def attempt(tried: int) -> None:
            now = self.replicas(version) if tried else None  # (a try in doubt: read back)
            if now is not None and (now >= replicas > 0 or now == replicas == 0):
                return
            with unsettled():
                try:
                    self._apps().patch_namespaced_deployment_scale(
                        name, self.target.namespace, {"spec": {"replicas": replicas}}, field_manager=FIELD_MANAGER
                    )
                except ApiException as exc:
                    raise refused(f"scale Deployment {name}", exc) from None

        settled(attempt)

    def autoscaling(self, version: str) -> dict[str, Any] | None:
        """The spec of the version's live HPA (``render_hpa``'s name) as the API server gives it,
        its own ``minReplicas`` in place of a floor a rollout holds (``hold_floor``); None
        without autoscaling or without one."""
        hpa = self._hpa(version)
        if hpa is None:
            return None
        own = _own_min(hpa)
        return {**hpa["spec"], **({"minReplicas": own} if own is not None and not _set_by_hand(hpa) else {})}

    def _hpa(self, version: str) -> dict[str, Any] | None:
        """The version's live HPA as a dict; None without autoscaling or without one."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        if not self.build.autoscaling:
            return None
        name = self._name(version)
        try:
            hpa = client.AutoscalingV2Api(self.api_client).read_namespaced_horizontal_pod_autoscaler(
                name, self.target.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise refused(f"GET HorizontalPodAutoscaler {name}", exc) from None
        return dict(self._apps().api_client.sanitize_for_serialization(hpa))

    def held_floor(self, version: str) -> int | None:
        """The floor a rollout holds the version's HPA at (``hold_floor``: its pods when the run
        began), None when none is held."""
        hpa = self._hpa(version)
        return None if hpa is None or _own_min(hpa) is None else int(hpa["spec"].get("minReplicas") or 1)

    def hold_floor(self, version: str, dry_run: bool = False) -> int | None:
        """Under autoscaling, the stable version's HPA kept from shrinking it while the candidate
        takes a share of its traffic (Argo Rollouts keeps the stable at full scale for the whole
        run): its ``minReplicas`` raised to the pods it runs now (within its ``maxReplicas``), its
        own recorded on it (``FLOOR_ANNOTATION``) for ``release_floor``, with the floor held
        (``HELD_ANNOTATION``: a ``minReplicas`` set by hand since is not put back). A rollback then hands
        all of the traffic back to as many pods as served it before, and each stage's candidate is
        sized from them. Once held, held: a step run again keeps the first floor and the own
        record. The floor held, None when there is nothing to hold (no autoscaling, no HPA, no
        more pods than its own floor). ``dry_run``: only whether the API server would take the
        HPA's apply, nothing written. Refused for its ``minReplicas``, another manager's (a 409,
        ``FieldsOwned`` naming that field): FloorOwned, naming besides what the server refuses the
        HPA, its own floor and the pods it runs now; any other error as it came."""
        hpa = self._hpa(version)
        if hpa is None:
            return None
        spec = hpa["spec"]
        if _own_min(hpa) is not None:
            return int(spec.get("minReplicas") or 1)
        own = int(spec.get("minReplicas") or 1)
        pods = self.replicas(version) or 0
        floor = min(max(pods, own), int(spec["maxReplicas"]))
        if floor <= own:
            return None
        try:
            self._apply_hpa(
                version,
                {**spec, "minReplicas": floor},
                {FLOOR_ANNOTATION: str(own), HELD_ANNOTATION: str(floor)},
                dry_run,
            )
        except FieldsOwned as exc:
            if not any(".spec.minReplicas" in paths for paths in exc.owned.values()):
                raise
            raise FloorOwned(
                f"{exc}. HorizontalPodAutoscaler {self.target.namespace}/{self._name(version)} scaled version "
                f"{version} above its floor (minReplicas {own}) to {pods} pods",
                exc.owned,
            ) from None
        return floor

    def release_floor(self, version: str) -> bool:
        """The version's HPA back at its own ``minReplicas`` when a rollout holds its floor
        (``hold_floor``), the record removed; a ``minReplicas`` set by hand since the floor was held
        stays as set. False when none is held (nothing written). The floor released but the
        version's PodDisruptionBudget not updated (no answer, or its apply refused: a 403, a field
        another manager owns, ``Contended``): ``BudgetNotApplied`` (not a floor still held), the
        budget marked pending for the next run (``BUDGET_ANNOTATION``). The mark is written in the
        floor's release itself and cleared once the budget is applied: a worker killed between two
        of these writes leaves the floor's record or the mark until the budget is right, for the
        next run's ``release_floors``."""
        hpa = self._hpa(version)
        own = None if hpa is None else _own_min(hpa)
        if hpa is None or own is None:
            return False
        spec = hpa["spec"]
        kept = int(spec.get("minReplicas") or 1) if _set_by_hand(hpa) else min(own, int(spec["maxReplicas"]))
        released = {**spec, "minReplicas": kept}
        try:  # (the budget marked pending in the same write: never the floor's record and the mark both gone)
            self._apply_hpa(version, released, {BUDGET_ANNOTATION: str(kept)}, budget=False)
        except RouterError as exc:  # (its kind kept: the command that releases it by hand said besides)
            annotations = {FLOOR_ANNOTATION: None, HELD_ANNOTATION: None}
            command = self._by_hand(
                "horizontalpodautoscaler",
                version,
                {"spec": {"minReplicas": kept}, "metadata": {"annotations": annotations}},
            )
            exc.args = (  # (its budget too: released by hand, neither the floor's record nor a mark is left)
                f"{exc}; to release the floor by hand, its PodDisruptionBudget first: "
                f"{self._budget_advice(version, kept)}; then its HorizontalPodAutoscaler: {command}",
            )
            exc.release_by_hand = command  # (its apply's failure, not its read's: ``floor_unread``)
            raise
        try:  # (a refusal raised too: a budget refused is no more updated than one unanswered)
            self._apply_pdb(version, kept, refusal_raised=True)
        except RouterError as exc:  # (the mark stays, for the next run's release_floors)
            name = self._name(version)
            raise BudgetNotApplied(
                f"the floor the run held on version {version} is released (HorizontalPodAutoscaler "
                f"{self.target.namespace}/{name} at minReplicas {kept}); PodDisruptionBudget "
                f"{self.target.namespace}/{name} was not updated to match ({exc}): "
                f"{self._budget_advice(version, kept)}; until then a node drain follows the budget of the floor "
                "held; the model's next run applies it",
                exc,
            ) from exc
        self._clear_budget_mark(version, released, f"the floor on version {version} is released and its")
        return True

    def _clear_budget_mark(self, version: str, spec: dict[str, Any], done: str) -> None:
        """The version's HPA applied with ``spec`` without its budget-pending mark, once its
        PodDisruptionBudget is updated. A clearing that fails (refused, or no answer) is logged, not
        raised: the budget is right, and the next run applies it again, the same, and clears it. One
        unanswered (``ApiUnreachable``) is kept in ``mark_unanswered`` besides: ``release_floors``
        tries no more versions after it."""
        try:
            self._apply_hpa(version, spec, budget=False)
        except RouterError as exc:
            if isinstance(exc, ApiUnreachable):
                self.mark_unanswered = exc
            log.warning(
                "%s PodDisruptionBudget updated; its HPA's mark of the budget pending is not cleared (%s): the "
                "model's next run applies the budget again, the same, and clears it",
                done,
                str(exc)[:300],
            )

    def _budget_advice(self, version: str, floor: int) -> str:
        """What to set the version's PodDisruptionBudget to at its HPA's ``floor``, and the command."""
        budget = render_pdb(self.target, version, floor, bool(self.build.autoscaling))["spec"]
        fields = {k: budget.get(k) for k in ("minAvailable", "maxUnavailable")}  # (None: removed)
        return (
            f"set its spec to {json.dumps({k: v for k, v in fields.items() if v is not None})}, no other of the "
            f"two ({self._by_hand('poddisruptionbudget', version, {'spec': fields})})"
        )

    def apply_pending_budget(self, version: str) -> bool:
        """The version's PodDisruptionBudget that a floor's release left not updated (its HPA marked,
        ``BUDGET_ANNOTATION``) applied at the HPA's floor now, then the mark cleared; False where none
        is marked (or a floor is held again: its own release updates the budget). Still not updated
        (no answer, or its apply refused: a field another manager owns): ``BudgetNotApplied``, why,
        the mark kept. The budget applied but its mark not cleared: True, logged
        (``_clear_budget_mark``)."""
        hpa = self._hpa(version)
        annotations = _metadata(hpa, "annotations") if hpa is not None else {}
        if hpa is None or BUDGET_ANNOTATION not in annotations or _own_min(hpa) is not None:
            return False
        floor = int(hpa["spec"].get("minReplicas") or 1)
        try:
            self._apply_pdb(version, floor, refusal_raised=True)
        except RouterError as exc:
            name = self._name(version)
            raise BudgetNotApplied(
                f"PodDisruptionBudget {self.target.namespace}/{name}, left not updated by a run, is still not "
                f"updated to version {version}'s floor (minReplicas {floor}) ({exc}): "
                f"{self._budget_advice(version, floor)}; the model's next run tries again",
                exc,
            ) from exc
        self._clear_budget_mark(version, hpa["spec"], f"version {version}'s")
        return True

    def release_floors(self, keep: str | None) -> Released:
        """Every floor held (``hold_floor``) on a version of this target but ``keep`` (None: on
        every version) released (``release_floor``), oldest version first: left by a run that did
        not end (a worker killed between a promotion's retirement of its baseline and the release,
        its lease then taken over by another run, whose teardown is not that run's). A run starts
        holding the model alone, so a floor held on any version but its baseline is nobody's.
        Under autoscaling only: the versions released (``Released``), and the versions, ``keep``'s too,
        whose budget a release left not updated (``BUDGET_ANNOTATION``) applied now
        (``apply_pending_budget``). A floor released whose PodDisruptionBudget
        was not updated (``BudgetNotApplied``) does not stop the others' release: once every floor
        is released, one BudgetNotApplied names each budget not updated (and the versions whose
        release was whole). A floor not released (its HPA's apply refused, say) does not stop the
        others' either: once each is tried, one RouterError names each version not released (and
        each budget not updated). But a call unanswered (``ApiUnreachable``, a budget's too, or the
        clearing of a budget's mark once it is applied: ``mark_unanswered``, the mark kept) stops
        them: none after it is tried (each would pay its client's retries against a server gone),
        one ApiUnreachable names each version not released or not tried, for the next run."""
        from kubernetes import client

        if not self.build.autoscaling:
            return Released([], [])
        selector = f"app={self.target.service},app.kubernetes.io/managed-by={FIELD_MANAGER},version"
        autoscaling = client.AutoscalingV2Api(self.api_client)
        hpas = self._call(
            f"list HorizontalPodAutoscalers {selector}",
            lambda: autoscaling.list_namespaced_horizontal_pod_autoscaler(
                self.target.namespace, label_selector=selector
            ),
        )
        held, pending = [], []
        for hpa in hpas.items:
            version = str((hpa.metadata.labels or {}).get("version", ""))
            if VERSION.fullmatch(version) and hpa.metadata.name == self._name(version):
                annotations = hpa.metadata.annotations or {}
                if FLOOR_ANNOTATION in annotations and version != keep:
                    held.append(version)
                elif BUDGET_ANNOTATION in annotations and FLOOR_ANNOTATION not in annotations:
                    pending.append(version)
        released: list[str] = []
        applied: list[str] = []
        unapplied: list[str] = []
        failed: list[str] = []
        uncleared: list[str] = []  # (said with the rest; alone, only logged: nothing left undone but the mark)
        untried: dict[str, list[str]] = {"floor": [], "budget": []}
        unreachable = False
        for kind, versions in (("floor", held), ("budget", pending)):
            for version in sorted(versions, key=int):
                if unreachable:  # (after a call unanswered: none tried more, each its client's retries)
                    untried[kind].append(version)
                    continue
                self.mark_unanswered = None
                try:
                    if self.release_floor(version) if kind == "floor" else self.apply_pending_budget(version):
                        (released if kind == "floor" else applied).append(version)
                    if self.mark_unanswered is not None:  # (done but its mark, kept: the next run clears it)
                        uncleared.append(
                            f"version {version}'s HPA's mark of the budget pending is not cleared "
                            f"({str(self.mark_unanswered)[:300]}): the model's next run applies the budget "
                            "again, the same, and clears it"
                        )
                        unreachable = True
                except BudgetNotApplied as exc:
                    unapplied.append(str(exc))
                    unreachable = isinstance(exc.__cause__, ApiUnreachable)
                except RouterError as exc:  # (the others tried all the same, unless it got no answer)
                    what = (
                        f"floor on version {version} was not released"
                        if kind == "floor"
                        else f"budget left not updated on version {version} was not applied"
                    )
                    failed.append(f"the {what}: {exc}")
                    unreachable = isinstance(exc, ApiUnreachable)
        left = [
            f"the {kind} on version(s) {', '.join(versions)} not tried (the API server gave no answer): the model's "
            "next run tries again"
            for kind, versions in untried.items()
            if versions
        ]
        if unapplied or failed or left:
            whole = f" (released whole: the floor on version(s) {', '.join(released)})" if released else ""
            said = "; ".join(failed + unapplied + uncleared + left) + whole
            if left:
                raise ApiUnreachable(said)
            raise RouterError(said) if failed else BudgetNotApplied(said)
        return Released(released, applied)

    def _apply_hpa(
        self,
        version: str,
        spec: dict[str, Any],
        annotations: dict[str, str] | None = None,
        dry_run: bool = False,
        budget: bool = True,
    ) -> None:
        """The version's HPA applied with ``spec`` (``HPA_CARRIED`` of it) and ``annotations``
        (no ``force``: a field another manager owns, a Helm release's HPA of that name, is refused,
        ``refused``) unless the live one holds them already (``_hpa_holds``:
        a stage at the same size, a step run again; an apply whose answer left unknown whether it
        was served, read back: ``settled``), then the version's budget at the HPA's floor
        (the least it may scale the version to: ``render_pdb``). ``dry_run``: the HPA's apply sent
        as a dry run (``dryRun=All``), nothing else; ``budget`` False: the HPA alone (the caller
        applies the budget: ``release_floor``)."""
        from kubernetes import client

        name = self._name(version)
        hpa = render_hpa(self.target, version, int(spec.get("minReplicas") or 1), int(spec["maxReplicas"]))
        hpa["spec"] = {**hpa["spec"], **{k: spec[k] for k in HPA_CARRIED if spec.get(k) is not None}}
        hpa["metadata"]["annotations"] = dict(annotations or {})
        what = f"apply HorizontalPodAutoscaler {name}"

        def attempt(_: int) -> None:
            live = self._hpa(version)
            if live is not None and _hpa_holds(live, hpa):
                return
            patch = client.AutoscalingV2Api(self.api_client).patch_namespaced_horizontal_pod_autoscaler
            read = None if live is None else live["metadata"].get("resourceVersion")
            self._server_side_apply(patch, what, hpa, read, **({"dry_run": "All"} if dry_run else {}))

        settled(self.changes_noted(attempt))
        if dry_run or not budget:
            return
        self._apply_pdb(version, int(hpa["spec"].get("minReplicas") or 1))  # (also where a try stopped before it)

    def _live(self, version: str) -> Any:
        """The live Deployment (a V1Deployment), None when there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._apps().read_namespaced_deployment(self._name(version), self.target.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise refused(f"GET Deployment {self._name(version)}", exc) from None

    def model_of(self, version: str) -> str | None:
        """The model the version's live Deployment serves (its pods' ``model-rollout/model``
        annotation, which ``render_deployment`` writes); None without a Deployment or the
        annotation (one installed by other means)."""
        live = self._live(version)
        annotations = (live.spec.template.metadata.annotations or {}) if live is not None else {}
        return annotations.get("model-rollout/model")

    def replicas(self, version: str) -> int | None:
        """The live Deployment's ``spec.replicas`` (an HPA's choice under autoscaling); None
        when the version has no Deployment."""
        return replicas_of(self._live(version))

    def deployment(self, version: str) -> Any:
        """The version's live Deployment (a V1Deployment), None when there is none: its size
        (``replicas_of``), and ``wait_ready``'s first look at its pods (``live``), one GET for both."""
        return self._live(version)

    def scale(
        self,
        version: str,
        replicas: int,
        autoscaling_of: str | None = None,
        dry_run: bool = False,
        rolling_back: bool = False,
    ) -> bool:
        """Re-apply the version's own Deployment (its live image) with ``replicas`` pods; False
        when it has no Deployment (nothing to scale). One GET: the live Deployment gives both.
        ``autoscaling_of``: under autoscaling, the version whose HPA (its bounds, metrics and
        behavior) this version's HPA takes, as Flagger's primary HPA copies its target's: a
        promoted candidate keeps the stable version's autoscaling, not a floor at the count
        that version ran at that moment; ``replicas`` pods are set all the same, for the HPA to
        scale from. Without that HPA, the stage's floor as ever. ``dry_run``: only whether the API
        server would take the Deployment's apply (RouterError naming what it refuses), nothing written.
        ``rolling_back``: its HPA's apply refused is logged, the pods scaled all the same (``_autoscale``);
        the Deployment's apply refused (fields another manager owns, such as a ``spec.replicas`` KEDA
        or a ``kubectl scale`` set; a policy webhook added since that denies it; its forced apply
        refused at each try, ``Contended``) is logged and the count set through the scale
        subresource (``_scale_subresource``), as ``kubectl scale`` does, then its HPA or its budget as
        after an apply: a rollback's traffic waits on those pods, which run the pod template the API
        server holds, the version's own; that scale's failure is raised as its own kind, its message
        the apply's refusal and its own. An apply that got no answer is raised as it came (the scale
        subresource is the same server's). An apply whose answer left unknown whether it was served:
        as ``apply``'s (``settled``; ``_apply``'s ``in_doubt``: under autoscaling its count is not what
        is checked)."""
        read: list[Any] = []  # (the last live Deployment read: its count, for a rollback's fallback)

        def attempt(doubted: int) -> Any:
            live = self._live(version)
            if live is None:
                return None
            read[:] = [live]
            image = str(_server_container(live.spec.template.spec.containers).image)
            deployed = (live.metadata.annotations or {}).get(IMAGE_ANNOTATION)
            return self._apply(version, image, replicas, live, deployed, dry_run, in_doubt=doubted > 0)

        try:  # (a dry run's attempts check nothing: ``_apply``'s ``in_doubt`` is a write's)
            applied = settled(self.changes_noted(attempt), checks=not dry_run)
        except RouterError as exc:  # (Contended: its forced apply refused at each try)
            if (
                not rolling_back
                or dry_run
                or not read
                or (isinstance(exc, TRANSIENT) and not isinstance(exc, Contended))
            ):
                raise  # (no answer: the scale subresource is the same server's)
            log.warning(
                "%s; its pods are scaled to %d through its scale subresource instead, for the rollback (they run the "
                "pod template the API server holds)",
                exc,
                replicas,
            )
            try:
                if self.build.autoscaling:
                    self._autoscale(version, replicas, read[0].spec.replicas or 0, autoscaling_of, rolling_back)
                    return True
                self._scale_subresource(version, replicas)
            except BudgetNotApplied:  # (scaled: its HPA or its budget said beside the rollback, as ever)
                raise
            except RouterError as failed:  # (its own kind kept: a transient failure retried as ever)
                failed.args = (f"{exc}; then through its scale subresource: {failed}",)
                raise
            if replicas > 0:
                self._budget_after_scale(version, replicas, rolling_back)
            return True
        if applied is None:
            return False
        if not dry_run:
            self._sized(version, replicas, applied, autoscaling_of, rolling_back)
        return True

    def replicas_owners(self, version: str) -> list[str]:
        """The field managers besides the rollout's own that own the version's ``spec.replicas``
        (its live managedFields): an HPA (``kube-controller-manager``, through the scale
        subresource), a ``kubectl scale``, a client-side ``kubectl apply``. Without autoscaling
        the rollout's apply of another count is refused (409) while they do. [] without a
        Deployment."""
        live = self._live(version)
        owners = []
        for entry in (live.metadata.managed_fields or []) if live is not None else []:
            if entry.manager == FIELD_MANAGER:  # (its scale subresource's too: its apply takes them back)
                continue
            if "f:replicas" in ((entry.fields_v1 or {}).get("f:spec") or {}):
                owners.append(f"{entry.manager}" + (f" ({entry.subresource})" if entry.subresource else ""))
        return owners

    def changed(self, version: str) -> str | None:
        """Why the version's pods no longer run what the rollout deployed (its model server's
        image is not the one ``apply`` recorded: a ``kubectl set image`` meanwhile; or its pod
        template is not the one it applied: an edit of the env, resources, args...), None when
        they do, or when there is no record (a Deployment installed by other means) or no
        Deployment. What the guards judged would not be what a promotion carries forward."""
        live = self._live(version)
        annotations = (live.metadata.annotations or {}) if live is not None else {}
        deployed = annotations.get(IMAGE_ANNOTATION)
        if deployed is None:
            return None
        running = str(_server_container(live.spec.template.spec.containers).image)
        if running != deployed:
            return (
                f"Deployment {self._name(version)} was changed outside the rollout: its model server's image is "
                f"{running[:300]}, not {deployed[:300]}, the image the rollout built and deployed for version {version}"
            )
        recorded = annotations.get(TEMPLATE_ANNOTATION)
        template = self._apps().api_client.sanitize_for_serialization(live.spec.template)
        if recorded is None or template_digest(template) == recorded:
            return None
        return (
            f"Deployment {self._name(version)} was changed outside the rollout: its pod template is not the one "
            f"the rollout applied for version {version} (an edit of its containers, env, resources or volumes; "
            f"kubectl rollout history deployment/{self._name(version)} shows it)"
        )

    def prune(self, in_use: set[str]) -> list[str]:
        """Delete the Deployments of the versions ``beyond_history`` keeps (``build.revision_history_limit``
        retired ones, never one ``in_use`` or running pods), their PodDisruptionBudgets and under
        autoscaling their HPAs (each read by its name: one whose labels another manager changed
        goes too), and those of versions left without a Deployment, not ``in_use`` (their delete
        refused or failed at an earlier prune: a budget whose status the disruption controller
        wrote as its last pods went, a new resourceVersion, was left for good). Only what the
        rollout made for this model: listed by its labels (``app=<service>``,
        ``app.kubernetes.io/managed-by=model-rollout``, a ``version``), named as it names them, a
        Deployment serving this model (``model_of``'s annotation). Each is deleted on condition
        that it is as listed or read (its uid and resourceVersion: one scaled up meanwhile
        stays). The versions whose Deployment went, oldest first."""
        from kubernetes import client

        selector = f"app={self.target.service},app.kubernetes.io/managed-by={FIELD_MANAGER},version"
        namespace = self.target.namespace
        listed = self._call(
            f"list Deployments {selector}",
            lambda: self._apps().list_namespaced_deployment(namespace, label_selector=selector),
        )
        ours: dict[str, Any] = {}
        for item in listed.items:
            version = str((item.metadata.labels or {}).get("version", ""))
            template = item.spec.template.metadata
            model = ((template.annotations or {}) if template is not None else {}).get("model-rollout/model")
            if VERSION.fullmatch(version) and item.metadata.name == self._name(version) and model == self.model:
                ours[version] = item
        counts = {v: 1 if d.spec.replicas is None else int(d.spec.replicas) for v, d in ours.items()}
        gone = [
            v
            for v in beyond_history(counts, in_use, self.build.revision_history_limit)
            if self._delete("deployments", ours[v])
        ]
        kinds = [("PodDisruptionBudgets", client.PolicyV1Api(self.api_client).list_namespaced_pod_disruption_budget)]
        if self.build.autoscaling:
            autoscaling = client.AutoscalingV2Api(self.api_client)
            kinds.append(("HorizontalPodAutoscalers", autoscaling.list_namespaced_horizontal_pod_autoscaler))
        for kind, list_kind in kinds:
            for version in gone:
                self._delete_named(kind.lower(), version)
            listed = self._call(f"list {kind} {selector}", partial(list_kind, namespace, label_selector=selector))
            for item in listed.items:
                version = str((item.metadata.labels or {}).get("version", ""))
                if item.metadata.name != self._name(version) or version in ours or version in in_use:
                    continue
                if self._live(version) is None:  # (an orphan)
                    self._delete(kind.lower(), item)
        return gone

    def _delete(self, plural: str, obj: Any) -> bool:
        """Delete ``obj`` (a listed Deployment, PodDisruptionBudget or HPA) unless it
        changed since it was listed (a budget: unless made again, a new uid; the disruption
        controller writes its status as the version's last pods go) or is gone already (False). A delete whose answer left unknown
        whether it was served is sent again on the same preconditions (``settled``: it deletes
        nothing but the object as listed): a 404 then is that delete's, done. A 409 is read back:
        the object as listed (its uid) marked for deletion (``deletionTimestamp``: a delete
        served, by the one in doubt or another's, its finalizers pending, which gave it a new
        resourceVersion) is being deleted, done."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        meta = obj.metadata
        # (a budget on its uid alone: the disruption controller writes its status as the last pods go)
        version = None if plural == "poddisruptionbudgets" else meta.resource_version
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=meta.uid, resource_version=version))
        kind, delete, read = self._calls(plural)

        def attempt(doubted: int) -> bool:
            with unsettled():
                try:
                    delete(meta.name, self.target.namespace, body=options)
                except ApiException as exc:
                    if exc.status == 404:  # gone: already (left), or by the delete in doubt before (done)
                        return doubted > 0
                    if exc.status != 409:
                        raise refused(f"delete {kind} {meta.name}", exc) from None
                else:
                    return True
            try:  # 409: changed since it was listed (left), unless it is being deleted
                live = read(meta.name, self.target.namespace).metadata
            except ApiException as exc:
                if exc.status == 404:  # (gone since: as a 404 above)
                    return doubted > 0
                raise refused(f"GET {kind} {meta.name}", exc) from None
            return live.uid == meta.uid and live.deletion_timestamp is not None

        return settled(attempt, checks=False)

    def _delete_named(self, plural: str, version: str) -> None:
        """The version's object of ``plural`` (its Deployment was deleted) read by its name, then
        deleted as it was read (``_delete``: one made again or changed since is left); none, done."""
        from kubernetes.client.exceptions import ApiException

        kind, _, read = self._calls(plural)
        name = self._name(version)
        try:
            obj = read(name, self.target.namespace)
        except ApiException as exc:
            if exc.status == 404:  # (none left)
                return
            raise refused(f"GET {kind} {name}", exc) from None
        self._delete(plural, obj)

    def _calls(self, plural: str) -> tuple[str, Any, Any]:
        """The kind of ``plural`` (a Deployment, HPA or PodDisruptionBudget), its delete and its read."""
        from kubernetes import client

        autoscaling, policy = client.AutoscalingV2Api(self.api_client), client.PolicyV1Api(self.api_client)
        return {
            "deployments": (
                "Deployment",
                self._apps().delete_namespaced_deployment,
                self._apps().read_namespaced_deployment,
            ),
            "horizontalpodautoscalers": (
                "HorizontalPodAutoscaler",
                autoscaling.delete_namespaced_horizontal_pod_autoscaler,
                autoscaling.read_namespaced_horizontal_pod_autoscaler,
            ),
            "poddisruptionbudgets": (
                "PodDisruptionBudget",
                policy.delete_namespaced_pod_disruption_budget,
                policy.read_namespaced_pod_disruption_budget,
            ),
        }[plural]

    def _call(self, what: str, call: Any) -> Any:
        """``call()``, an API server's refusal as ``refused`` says it."""
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:
            raise refused(what, exc) from None

    def scale_by_hand(self, version: str, replicas: int) -> str:
        """The command that scales the version's Deployment to ``replicas`` pods, for an operator:
        through its scale subresource under the rollout's field manager, as ``_scale_subresource``
        writes it (``kubectl -n models patch deployment digits-v2 --subresource=scale --type=merge
        -p '{"spec":{"replicas":0}}' --field-manager=model-rollout``). Not ``kubectl scale``: its
        own field manager then owned ``spec.replicas`` and the version's next deploy was refused
        (409); the rollout's apply takes the count back from its own manager (``_server_side_apply``).
        It needs kubectl 1.24 or later (``SCALE_BY_HAND_KUBECTL``: a report says so beside it)."""
        return self._by_hand("deployment", version, {"spec": {"replicas": replicas}}, "--subresource=scale")

    def _by_hand(self, kind: str, version: str, patch: dict[str, Any], *options: str) -> str:
        """The command that merge-patches the version's ``kind`` (kubectl's name for it) with
        ``patch`` (a None removes a field) under the rollout's field manager, for an operator:
        not ``kubectl edit`` nor ``kubectl scale``, whose own field managers would then own the
        fields, the rollout's next apply of them refused (409); its own manager's are its own
        (``_server_side_apply``)."""
        namespace, name = shlex.quote(self.target.namespace), shlex.quote(self._name(version))
        body = shlex.quote(json.dumps(patch, separators=(",", ":")))
        words = ["kubectl", "-n", namespace, "patch", kind, name, *options, "--type=merge", "-p", body]
        return " ".join([*words, f"--field-manager={FIELD_MANAGER}"])

    def scale_to_zero(self, version: str) -> bool:
        """False when the version has no Deployment (nothing to scale)."""
        return self.scale(version, 0)

    def wait_ready(
        self,
        version: str,
        replicas: int = 1,
        timeout_s: float = 600.0,
        every_s: float = 1.0,
        strict: bool = True,
        live: Any = None,
    ) -> None:
        """Until at least ``replicas`` of the version's pods run its current template and are ready
        (the controller has seen the last spec, ``observedGeneration``, counts them in
        ``updatedReplicas``, and no pod of an older template is left: while a new image rolls out,
        the old pods' readiness does not count); RouterError after ``timeout_s``, or at once when
        the controller says the current spec is past its progress deadline. Not ``strict``:
        ready pods of any template count (the mesh routes to them all: what a rollback needs of a
        version that serves already, whose own update may be stuck). ``live``: the Deployment as
        read just before (``deployment``), its first look, not read again."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = live if live is not None else self._live(version)
            if live is None:
                raise RouterError(f"Deployment {self._name(version)} does not exist")
            status = live.status
            ready = (status.ready_replicas or 0) if status else 0
            current = status is not None and (status.observed_generation or 0) >= (live.metadata.generation or 0)
            updated = (status.updated_replicas or 0) if status else 0
            total = (status.replicas or 0) if status else 0
            # As `kubectl rollout status`: no pod of an older template left, so every ready pod is a new one.
            if ready >= replicas and (not strict or (current and updated >= replicas and total <= updated)):
                return
            # As `kubectl rollout status` too: the controller gave up on the current spec's pods.
            gave_up = strict and current and _past_deadline(status)
            if gave_up or time.monotonic() > deadline:
                when = (
                    "past its progress deadline (the Deployment controller gave up)"
                    if gave_up
                    else f"after {timeout_s:g} s"
                )
                raise RouterError(
                    f"Deployment {self._name(version)}: {ready} of {pod_count(replicas)} ready {when} "
                    f"({updated} on its current template, {total - updated} older "
                    f"{'one' if total - updated == 1 else 'ones'} left)"
                    + "".join(f"; {c}" for c in self._not_ready(version, status))
                )
            time.sleep(every_s)
            live = None

    def _not_ready(self, version: str, status: Any) -> list[str]:
        """Why the version's pods are not ready: what the Deployment's conditions say stops them
        (``_stuck``), then what its pods' status says (``_pod_problems``: a container waiting in
        ImagePullBackOff or CrashLoopBackOff, a pod the scheduler cannot place). Where the pods
        cannot be read (a Role without deploy/base/rbac.yaml's list on pods: a 403) or say nothing, every condition
        of the Deployment that is not met (``Available`` False too), and why the pods are not named."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        selector = f"app={self.target.service},version={version}"
        try:
            pods = client.CoreV1Api(self.api_client).list_namespaced_pod(self.target.namespace, label_selector=selector)
        except (ApiException, RouterError) as exc:  # (a refusal, or no answer: ApiUnreachable)
            why = refused(f"list pods {selector}", exc) if isinstance(exc, ApiException) else exc
            return [*_stuck(status, every=True), f"its pods not read ({why})"]
        problems = [p for pod in pods.items for p in _pod_problems(pod)]
        return [*_stuck(status), *problems[:3]] if problems else _stuck(status, every=True)


def replicas_of(live: Any) -> int | None:
    """A live Deployment's ``spec.replicas`` (``VersionDeployments.deployment``); None for none."""
    return None if live is None else int(live.spec.replicas or 0)


def _own_min(hpa: dict[str, Any]) -> int | None:
    """The own ``minReplicas`` recorded on an HPA whose floor a rollout holds (``FLOOR_ANNOTATION``),
    None when none is held (or the record is not a count)."""
    own = str(((hpa.get("metadata") or {}).get("annotations") or {}).get(FLOOR_ANNOTATION, ""))
    # (ASCII digits only, few of them: int() refuses "²", and strings of more than 4300 digits)
    return int(own) if COUNT.fullmatch(own) and int(own) <= MAX_REPLICAS else None


def _hpa_holds(live: dict[str, Any], hpa: dict[str, Any]) -> bool:
    """Whether the live HPA is ``hpa`` as ``_apply_hpa`` renders it, so that applying it would
    change nothing: its spec's target, bounds, metrics (``DEFAULT_HPA_METRICS`` as none) and
    behavior, its labels, and the rollout's records of a floor held and of a budget pending
    (``OWN_HPA_ANNOTATIONS``; none where ``hpa`` has none)."""

    def view(obj: dict[str, Any]) -> tuple[Any, ...]:
        spec = obj.get("spec") or {}
        metrics = spec.get("metrics") or None
        return (
            *(spec.get(k) for k in ("scaleTargetRef", "minReplicas", "maxReplicas", "behavior")),
            None if metrics == DEFAULT_HPA_METRICS else metrics,
            {k: v for k, v in _metadata(obj, "annotations").items() if k in OWN_HPA_ANNOTATIONS},
        )

    labels = _metadata(live, "labels")
    return view(live) == view(hpa) and all(labels.get(k) == v for k, v in _metadata(hpa, "labels").items())


def _metadata(obj: dict[str, Any], key: str) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get(key) or {})


def _set_by_hand(hpa: dict[str, Any]) -> bool:
    """The HPA's ``minReplicas`` is not the floor a rollout held (``HELD_ANNOTATION``): set since
    by another hand (``kubectl edit``, the platform's GitOps), whose value wins over the own one.
    False without a record of the floor held, or one that is not a count."""
    held = str(((hpa.get("metadata") or {}).get("annotations") or {}).get(HELD_ANNOTATION, ""))
    return COUNT.fullmatch(held) is not None and int(held) != int((hpa.get("spec") or {}).get("minReplicas") or 1)


def _past_deadline(status: Any) -> bool:
    """Whether a Deployment's conditions say it is past its ``progressDeadlineSeconds``
    (Progressing False, ProgressDeadlineExceeded): the controller no longer waits for its pods."""
    return any(
        c.type == "Progressing" and c.status == "False" and c.reason == "ProgressDeadlineExceeded"
        for c in (getattr(status, "conditions", None) or [])
    )


def _stuck(status: Any, every: bool = False) -> list[str]:
    """What a Deployment's conditions say keeps its pods from coming up (its ReplicaSet refused
    pods: a quota, Pod Security admission; its progress deadline passed), as ``type reason:
    message``; 3 at most, each of 300 characters. ``every``: each condition not met besides
    (``Available`` False: fewer pods available than it needs)."""
    unmet = ("Progressing", "Available") if every else ("Progressing",)
    stuck = [
        c
        for c in (getattr(status, "conditions", None) or [])
        if (c.type == "ReplicaFailure" and c.status == "True") or (c.type in unmet and c.status == "False")
    ]
    return [f"{c.type} {c.reason}: {(c.message or '')[:300]}" for c in stuck[:3]]


def _pod_problems(pod: Any) -> list[str]:
    """What a pod's status says keeps it from being ready: the scheduler's refusal to place it
    (PodScheduled False: Unschedulable), a container waiting for other than its start
    (ImagePullBackOff, CrashLoopBackOff, CreateContainerConfigError), with its last exit when it
    crashed; each ``pod NAME: ...`` of 300 characters at most."""
    status, name = pod.status, pod.metadata.name
    found = [
        f"pod {name}: {c.reason}: {(c.message or '')[:300]}"
        for c in (getattr(status, "conditions", None) or [])
        if c.type == "PodScheduled" and c.status == "False"
    ]
    containers = [
        *(getattr(status, "init_container_statuses", None) or []),
        *(getattr(status, "container_statuses", None) or []),
    ]
    for c in containers:
        waiting = c.state.waiting if c.state is not None else None
        if waiting is None or waiting.reason in (None, "ContainerCreating", "PodInitializing"):
            continue
        last = c.last_state.terminated if c.last_state is not None else None
        exited = f" (last exit {last.exit_code}: {last.reason})" if last is not None else ""
        found.append(f"pod {name}: container {c.name} {waiting.reason}: {(waiting.message or '')[:300]}{exited}")
    return found
