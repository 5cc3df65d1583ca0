"""What an install of the model server puts in a namespace before any rollout: the Secrets its
pods read, and deploy/'s manifests applied as its README says (server-side, the rollout's field
manager). Shared by the one-machine cluster and the tests that run pods."""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

from devstack.cluster.kube import RESOURCES


def pod_secrets(build: Any, admin_token: str, storage: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """The Secrets a model-server pod of ``render_deployment`` reads (``BuildSettings`` names them):
    the admin token, the feedback key and the masking keys every replica shares, and the object
    store's credentials when ``build.storage_secret`` is set."""
    from vision_rollout.deploy import ADMIN_TOKEN_KEY, FEEDBACK_KEY, MASK_KEYS

    mask_keys = {"default": base64.b64encode(secrets.token_bytes(32)).decode(), "tenants": {}}
    out = {
        build.admin_secret: {ADMIN_TOKEN_KEY: admin_token},
        build.feedback_secret: {FEEDBACK_KEY: secrets.token_urlsafe(32)},
        build.mask_secret: {MASK_KEYS: json.dumps(mask_keys)},
    }
    if build.storage_secret:
        out[build.storage_secret] = dict(storage or {})
    return out


def apply_secret(api_client: Any, namespace: str, name: str, data: dict[str, str]) -> None:
    """A Secret applied server-side (its ``stringData``), as ``kubectl apply`` would."""
    from kubernetes import client as k8s

    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": data,
    }
    k8s.CoreV1Api(api_client).patch_namespaced_secret(
        name, namespace, body, field_manager="install", force=True, _content_type="application/apply-patch+yaml"
    )


def plural(kind: str) -> str:
    """A kind's resource name, from the one-machine API server's table (``kube.RESOURCES``);
    ValueError for a kind that server does not serve."""
    found = next((name for name, resource in RESOURCES.items() if resource.kind == kind), None)
    if found is None:
        raise ValueError(f"kind {kind!r}: not one the one-machine API server serves (devstack.cluster.kube.RESOURCES)")
    return found


def apply_object(api_client: Any, obj: dict[str, Any], manager: str = "model-rollout") -> None:
    """``kubectl apply --server-side --field-manager=<manager>`` of one object: a PATCH of type
    application/apply-patch+yaml to its path (the API server refuses what it refuses)."""
    group_version = obj["apiVersion"]
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    namespace = obj["metadata"].get("namespace")
    where = f"/namespaces/{namespace}" if namespace else ""
    path = f"{prefix}{where}/{plural(obj['kind'])}/{obj['metadata']['name']}"
    api_client.call_api(
        path,
        "PATCH",
        query_params=[("fieldManager", manager)],
        header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
        body=obj,
        auth_settings=["BearerToken"],
        response_types_map={},
        _preload_content=False,
    )
