"""Kubernetes mode: one Deployment per model version, the pods behind each Istio subset.

``render_deployment`` gives version N's Deployment: the serving image built for it (tagged by
the artifact's digest, ``docker/Dockerfile.model-server``), serving that version only (``--serve
MODEL:VERSION``: ready once it is loaded and warmed up), pod labels ``app=<service>`` (the
Service's selector) and ``version=<N>`` (the DestinationRule subset's), a GPU per pod and the
server's readiness probe. ``VersionDeployments`` applies it server-side (field manager
``model-rollout``), waits for its pods to be ready, and scales a version to zero on rollback or
retirement by re-applying its own Deployment with 0 replicas (so one field manager keeps the
whole object).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from vision_rollout.mesh import FIELD_MANAGER, IstioTarget, RouterError


def render_deployment(
    target: IstioTarget, model: str, version: str, image: str, replicas: int = 1, gpus: int = 1
) -> dict[str, Any]:
    labels = {"app": target.service, "version": version}
    container: dict[str, Any] = {
        "name": "model-server",
        "image": image,
        # The pod serves this version only, and is ready once it is loaded and warmed up.
        "args": [
            *("--repository", "/models", "--state-dir", "/state", "--device", "cuda" if gpus else "cpu"),
            *("--serve", f"{model}:{version}"),
        ],
        "volumeMounts": [{"name": "state", "mountPath": "/state"}],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8000}, "periodSeconds": 5},
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {},  # a quantity
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{target.service}-v{version}",
            "namespace": target.namespace,
            "labels": {**labels, "app.kubernetes.io/managed-by": FIELD_MANAGER},
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": labels, "annotations": {"model-rollout/model": model}},
                "spec": {"containers": [container], "volumes": [{"name": "state", "emptyDir": {}}]},
            },
        },
    }


@dataclass
class VersionDeployments:
    target: IstioTarget
    model: str
    api_client: Any = None  # kubernetes.client.ApiClient (the Airflow hook's)
    gpus: int = 1

    def _apps(self) -> Any:
        from kubernetes import client

        return client.AppsV1Api(self.api_client)

    def _name(self, version: str) -> str:
        return f"{self.target.service}-v{version}"

    def apply(self, version: str, image: str, replicas: int = 1) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        body = render_deployment(self.target, self.model, version, image, replicas, self.gpus)
        try:
            out = self._apps().patch_namespaced_deployment(
                self._name(version),
                self.target.namespace,
                body,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        except ApiException as exc:
            raise RouterError(
                f"apply Deployment {self._name(version)}: {exc.status} {exc.reason}: {exc.body}"
            ) from None
        return dict(self._apps().api_client.sanitize_for_serialization(out))

    def image(self, version: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            live = self._apps().read_namespaced_deployment(self._name(version), self.target.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise RouterError(f"GET Deployment {self._name(version)}: {exc.status} {exc.reason}") from None
        return str(live.spec.template.spec.containers[0].image)

    def scale_to_zero(self, version: str) -> bool:
        """False when the version has no Deployment (nothing to scale)."""
        image = self.image(version)
        if image is None:
            return False
        self.apply(version, image, replicas=0)
        return True

    def wait_ready(self, version: str, replicas: int = 1, timeout_s: float = 600.0, every_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            live = self._apps().read_namespaced_deployment(self._name(version), self.target.namespace)
            ready = (live.status.ready_replicas or 0) if live.status else 0
            if ready >= replicas:
                return
            if time.monotonic() > deadline:
                raise RouterError(
                    f"Deployment {self._name(version)}: {ready} of {replicas} pods ready after {timeout_s:g} s"
                )
            time.sleep(every_s)
