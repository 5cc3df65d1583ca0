"""The one-machine cluster: what Kubernetes mode (mesh ``istio``) drives, from real parts.

No Kubernetes API server, kubelet or Envoy can run here, so each is stood in for by the smallest
faithful piece, all on 127.0.0.1:

- the API server: ``kube.FakeKubeAPI`` (apps/v1, core/v1, the Istio CRDs; the real wire
  protocol, server-side apply, CRD schema validation, optimistic concurrency);
- kubelet and the ReplicaSet controller: ``pods.PodRunner`` (each Deployment's pods as
  model-server processes with the pod template's args, env and Secrets; readiness from the
  probe into the Deployment's status; a killed pod restarted; a BuildKit build pod run as the
  build's Dockerfile would);
- Envoy configured by Istio: Debian's ``nginx``, rendered from the applied VirtualServices and
  DestinationRules and the ready pods (``dataplane``), reloaded on every change as xDS would push
  it; one loopback port per Service stands for its ClusterIP;
- Prometheus running deploy/'s scrape job (``deploy/prometheus/scrape-config.yaml``: its
  relabelling, at a production interval, 15 s), the pods found through file-based discovery with
  the labels kubernetes_sd would give them (written by the pod runner);
- object storage: an S3 API (moto) holding the prediction log every pod appends to.

``Cluster.start`` runs the control loop in a thread (reconcile pods, write the scrape targets,
render and reload the data plane, every half second); ``install`` puts a model in as a
production install would have it (its Service, Secrets, version 1's Deployment, 100% to v1).
``python -m devstack.cluster`` runs one in the foreground (``make cluster-up`` starts it).
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devstack import manifests
from devstack.cluster.dataplane import NginxDataPlane, render_accepted
from devstack.cluster.install import apply_object, apply_secret, pod_secrets
from devstack.cluster.kube import FakeKubeAPI
from devstack.cluster.pods import PodRunner, copy_build_sources
from devstack.processes import (
    S3_CREDENTIALS,
    PrometheusProcess,
    S3Process,
    _get,
    free_port,
    start_prometheus,
    start_s3,
)
from model_server.traffic import PINNED_PREFIX

log = logging.getLogger(__name__)

NAMESPACE = "ml"
BOOTSTRAP_TAG = "registry.cluster.local/vision-rollout/{model}:v{version}"
# The models deploy/ holds, by namespace and name: installed from these overlays (deploy/overlays).
OVERLAYS = {("ml", "digits"): "local-cluster"}
REGISTRY = "registry.cluster.local/vision-rollout/model-server"


@dataclass
class Cluster:
    """The cluster's parts, started by ``start`` and stopped (every process by its pid) by ``stop``."""

    workdir: Path
    repository: Path  # what the images bake in: the model repository (the registry's stand-in)
    scrape_interval_s: float = 15.0
    # The rollout's build.drain_seconds (its connection): the wait before a version's pods go,
    # and their preStop sleep.
    drain_seconds: float = 5.0
    api: FakeKubeAPI = field(init=False)
    s3: S3Process = field(init=False)
    prometheus: PrometheusProcess = field(init=False)
    pods: PodRunner = field(init=False)
    dataplane: NginxDataPlane = field(init=False)
    admin_token: str = field(init=False, repr=False)
    service_ports: dict[tuple[str, str], int] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)  # the registry: tag -> the models it bakes in
    errors: list[str] = field(default_factory=list)  # what the control loop could not do, newest last
    # (namespace/VirtualService, subset) -> when the data plane stopped sending it anything
    unrouted: dict[tuple[str, str], float] = field(default_factory=dict)
    _routed: set[tuple[str, str]] = field(default_factory=set)
    _accepted: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # the data plane's
    _stop: threading.Event = field(default_factory=threading.Event)
    _loop: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_token = secrets.token_urlsafe(24)
        self.api = FakeKubeAPI(kubelet=True).start()
        try:
            self.s3 = start_s3(self.workdir / "s3")
            self.pods = PodRunner(self.api, self.workdir / "pods", self.images)
            self.pods.write_file_sd(self.file_sd)
            self.prometheus = start_prometheus(
                [],
                self.workdir / "prometheus",
                scrape_interval_s=self.scrape_interval_s,
                jobs=(manifests.scrape_job(self.file_sd, self.scrape_interval_s),),
            )
            self.dataplane = NginxDataPlane(self.workdir / "nginx")
            self.dataplane.start(self._render())
            self._loop = threading.Thread(target=self._control_loop, name="cluster-control", daemon=True)
            self._loop.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=30)
        for part in ("dataplane", "pods", "prometheus", "s3"):
            obj = getattr(self, part, None)
            if obj is not None:
                try:
                    obj.stop()
                except Exception:  # stop the rest whatever one part does
                    log.exception("stopping the cluster's %s", part)
        if getattr(self, "api", None) is not None:
            self.api.stop()

    @property
    def file_sd(self) -> Path:
        return self.workdir / "prometheus" / "targets.json"

    # -- the control loop ----------------------------------------------------------------------

    def _render(self) -> str:
        """The data plane's config; an object it cannot take is reported and keeps its last
        accepted version, the others' changes go through (as istiod)."""
        conf, refused = render_accepted(
            self.api.list("virtualservices"),
            self.api.list("destinationrules"),
            self.pods.endpoints,
            self._listen(),
            self.workdir / "nginx",
            self._accepted,
        )
        for message in refused:
            self._report(message)
        return conf

    def _listen(self) -> dict[tuple[str, str], int]:
        """Each VirtualService on the port of the Service its first host names (its ClusterIP)."""
        out = {}
        for vs in self.api.list("virtualservices"):
            meta = vs["metadata"]
            host = (vs["spec"].get("hosts") or [""])[0]
            service, _, rest = host.partition(".")
            namespace = rest.partition(".")[0] or meta["namespace"]
            port = self.service_ports.get((namespace, service))
            if port is not None:
                out[(meta["namespace"], meta["name"])] = port
        return out

    def _control_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.pods.reconcile()
                self.pods.write_file_sd(self.file_sd)
                if self.dataplane.apply(self._render()):
                    self._note_routes(time.time())
            except Exception as exc:  # reported, and tried again: a controller does not die of one error
                self._report(f"{type(exc).__name__}: {exc}")

    def _report(self, message: str) -> None:
        if message not in self.errors[-5:]:
            log.warning("cluster control loop: %s", message)
            self.errors.append(message)
            del self.errors[:-20]

    def _note_routes(self, now: float) -> None:
        """After a reload: which subsets each VirtualService's policy now sends requests or copies to."""
        routed = set()
        for vs in self.api.list("virtualservices"):
            key = f"{vs['metadata']['namespace']}/{vs['metadata']['name']}"
            for route in vs["spec"].get("http", []):
                if route.get("name", "").startswith(PINNED_PREFIX):
                    continue  # requests that name their version: not traffic the policy sends it
                dests = route.get("route", [])
                routed |= {
                    (key, d["destination"]["subset"]) for d in dests if d.get("weight", 100) > 0 or len(dests) == 1
                }
                if "mirror" in route:
                    routed.add((key, route["mirror"]["subset"]))
        for gone in self._routed - routed:
            self.unrouted[gone] = now
        for back in routed:
            self.unrouted.pop(back, None)
        self._routed = routed

    def late_requests(self, namespace: str, name: str, version: str) -> int | None:
        """Requests the data plane sent to ``version`` by the policy's routes (not those naming
        their version) after the VirtualService stopped routing to it (the access log's start
        times after that reload): what reached a retired version.
        None while the mesh still routes to it."""
        since = self.unrouted.get((f"{namespace}/{name}", f"v{version}"))
        if since is None:
            return None
        late = 0
        with (self.workdir / "nginx" / "access.log").open() as f:
            for line in f:
                entry = json.loads(line)
                if (
                    entry["virtual_service"] == f"{namespace}/{name}"
                    and not entry["route"].startswith(PINNED_PREFIX)  # the replay names its version
                    and entry["subset"] == f"v{version}"
                    and entry["msec"] - entry["request_time"] > since
                ):
                    late += 1
        return late

    # -- what a production install would have -------------------------------------------------

    def service_url(self, model: str, namespace: str = NAMESPACE) -> str:
        """The data plane's address of the model's Service (its ClusterIP stand-in)."""
        return f"http://127.0.0.1:{self.service_ports[(namespace, model)]}"

    def wait_until(self, check: Any, what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster: {what} not within {timeout_s:g} s; control loop: {self.errors[-3:]}")
            time.sleep(0.2)

    def install(self, model: str, replicas: int = 2, namespace: str = NAMESPACE) -> None:
        """The model as a production install has it before any rollout: its Service, the Secrets its
        pods read (admin token, feedback key, object-storage credentials), version 1's Deployment
        (its image baked from the repository) with its pods ready, and the mesh routing 100% to v1.

        A model deploy/ holds (``OVERLAYS``) is installed from its overlay, as a user would:
        every object ``kubectl kustomize`` renders, applied server-side with the rollout's field
        manager (README, "Deploy to a cluster"), the Secrets it names made here. Another is
        installed from the rollout's own rendering of those objects."""
        from kubernetes import client as k8s

        from model_server.traffic import TrafficPolicy
        from vision_rollout.deploy import VersionDeployments, render_service
        from vision_rollout.mesh import IstioTarget, render_destination_rule, render_virtual_service

        target = IstioTarget(namespace, model, model)
        build = self.build_settings(replicas)
        self.service_ports.setdefault((namespace, model), free_port())
        api = self.api_client()
        storage = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{self.s3.endpoint}"}
        for name, data in pod_secrets(build, self.admin_token, storage).items():
            apply_secret(api, namespace, name, data)
        # The build pods' registry credentials (this registry takes any).
        apply_secret(api, build.namespace, build.push_secret, {".dockerconfigjson": json.dumps({"auths": {}})})
        # The build context the rollout's build pod reads: what the Dockerfile copies, the model's folder.
        shutil.copytree(self.repository / model, self.context / "models" / model, dirs_exist_ok=True)
        copy_build_sources(self.context)
        image = BOOTSTRAP_TAG.format(model=model, version=1)
        self.images[image] = self.repository
        deployments = VersionDeployments(target, model, api, build=build, prediction_log=self.prediction_log)
        overlay = OVERLAYS.get((namespace, model))
        if overlay is not None:
            objects = manifests.render(overlay)
            if not any(o["kind"] == "Deployment" and o["metadata"]["name"] == f"{model}-v1" for o in objects):
                raise ValueError(f"deploy/overlays/{overlay} has no Deployment {model}-v1")
            for obj in objects:
                apply_object(api, obj)
            if deployments.replicas("1") != replicas:
                deployments.scale("1", replicas)
        else:
            k8s.CoreV1Api(api).patch_namespaced_service(
                model,
                namespace,
                render_service(target),
                field_manager="install",
                force=True,
                _content_type="application/apply-patch+yaml",
            )
            deployments.apply("1", image, replicas)
        deployments.wait_ready("1", replicas, timeout_s=180, every_s=0.5)
        if overlay is None:  # the mesh's objects, as an overlay would apply them (the rollout creates none)
            stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
            # The subset before the route to it (Istio's make-before-break): a VirtualService
            # naming a subset no DestinationRule declares is answered 503 meanwhile.
            for obj in (render_destination_rule(target, ["1"]), render_virtual_service(target, stable)):
                apply_object(api, obj)
        self.wait_until(lambda: self._serves(model, namespace), f"{model}'s Service answering through the data plane")

    def _serves(self, model: str, namespace: str) -> bool:
        try:
            return _get(f"{self.service_url(model, namespace)}/v2/models/{model}/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def api_client(self) -> Any:
        from kubernetes import client as k8s

        config = k8s.Configuration(host=self.api.url)
        return k8s.ApiClient(config)

    @property
    def context(self) -> Path:
        return self.workdir / "context"

    @property
    def prediction_log(self) -> str:
        return self.s3.uri("predictions")

    def build_settings(self, replicas: int = 2) -> Any:
        """Kubernetes mode's build settings here: the BuildKit stand-in reads a context folder (the
        Dockerfile and the installed models' folders); no GPU (pods run the CPU provider)."""
        from vision_rollout.settings import BuildSettings

        return BuildSettings(
            registry=REGISTRY,
            context=f"dir://{self.context.resolve()}",
            namespace="ml-builds",
            gpus=0,
            replicas=replicas,
            storage_secret="model-server-storage",  # noqa: S106 (a Secret's name, deploy/'s)
            drain_seconds=self.drain_seconds,
        )

    @property
    def run_dir(self) -> str:
        """The rollouts' run folder in the object store, as a cluster's workers keep it (each
        task's pod takes its own disk with it)."""
        return self.s3.uri("run")

    def connections(self, namespace: str = NAMESPACE, run_dir: str | None = None) -> dict[str, dict[str, Any]]:
        """The Airflow connections a worker of this cluster would have (``mesh = istio``): one
        for every model installed, each its own Service, VirtualService and Deployments
        (``{model}``), reached on its Service's loopback port (``models.<model>.istio.url``);
        the run folder ``run_dir`` (default the cluster's, in its object store)."""
        from dataclasses import asdict

        build = {k: v for k, v in asdict(self.build_settings()).items() if v is not None}
        prom_port = int(self.prometheus.url.rsplit(":", 1)[1])
        installed = sorted(name for ns, name in self.service_ports if ns == namespace)
        return {
            "model_server_default": {
                "conn_type": "http",
                "host": "127.0.0.1",
                "port": self.service_ports[(namespace, installed[0])],
                "password": self.admin_token,
                "extra": {
                    "repository": str(self.repository),
                    "prediction_log": self.prediction_log,
                    "run_dir": run_dir or self.run_dir,
                    "istio": {"namespace": namespace, "service": "{model}", "name": "{model}"},
                    "build": build,
                    "models": {m: {"istio": {"url": self.service_url(m, namespace)}} for m in installed},
                },
            },
            "kubernetes_default": {
                "conn_type": "kubernetes",
                "extra": {"kube_config": json.dumps(self.api.kubeconfig(namespace)), "namespace": namespace},
            },
            "prometheus_default": {"conn_type": "http", "host": "127.0.0.1", "port": prom_port},
        }

    def dump(self) -> dict[str, Any]:
        """What a client of the cluster needs (``make cluster-up`` writes it to state.json)."""
        return {
            "api": self.api.url,
            "prometheus": self.prometheus.url,
            "s3": self.s3.endpoint,
            "services": {f"{ns}/{name}": port for (ns, name), port in self.service_ports.items()},
            "scrape_interval_s": self.scrape_interval_s,
        }


__all__ = ["NAMESPACE", "Cluster"]
