"""Where a rollout's parts are: the model server, its files, its cluster. Built once per task.

``ServingSettings.from_connection`` reads what Airflow's ``model_server_default`` connection
holds (URL, admin token as the password, the extras) and checks it, naming the extra that is
wrong; every default is here and nowhere else. The extras:

- ``repository``: the model repository folder (``<model>/<version>/model.onnx``, ``<model>/validation``)
- ``prediction_log``: the prediction log's URI (``shadow_log`` is its old name)
- ``run_dir``: where the audits' reports and the outbox are kept (a folder, or an object store
  URI such as ``s3://bucket/run``: in Kubernetes mode a task's pod takes its disk with it), and
  in mesh ``local`` the rollouts' lock files and the routes before a rollout (a folder)
- ``shared_folders``: true when ``run_dir`` and ``prediction_log``, folders, are on a volume every
  worker mounts (``unshared``: with workers on several machines a folder is otherwise refused)
- ``istio``: ``namespace``, ``service``, ``name``, ``gateways``, ``hosts``, ``root_namespace`` (the
  mesh's, where its bucket EnvoyFilter is; default ``istio-system``), ``cluster_domain`` (the
  cluster's DNS domain; default ``cluster.local``) (kubernetes mode), and
  ``url``: where the workers reach the model's Service through the mesh (the validation replay,
  the masking probe; default the connection's own host and port)
- ``build``: ``registry``, ``context``, ``builder_image``, ``namespace``, ``service_account``,
  ``push_secret``, ``gpus``, ``cpu``, ``memory``, ``replicas``, ``min_replicas``, ``autoscaling``, ``max_replicas``,
  ``autoscaling_metrics``, ``drain_seconds``, ``revision_history_limit``, ``admin_secret``, ``storage_secret``,
  ``feedback_secret``, ``mask_secret``
  (kubernetes mode: the image build, BuildKit rootless, and the version Deployments,
  ``BuildSettings``)
- ``models``: ``{<model>: {"istio": {...}, "build": {...}}}``, a model's own sections, each
  overriding the connection-wide one field by field (``istio_for``, ``build_for``)

In any string of the ``istio`` and ``build`` sections, connection-wide or a model's, ``{model}``
stands for the model's name as a Kubernetes name (``model_name``): ``"service": "{model}",
"name": "{model}"`` gives every model its own Service, VirtualService and Deployments. No two
models may share a VirtualService (namespace and ``name``), a Service (namespace and
``service``) or a gateway's host (``hosts``: write ``{model}`` in it too): one's rollout would send
the other's requests to its own Service (refused here for what the sections name, and where it is
read: ``IstioRouter`` reads and writes no VirtualService that routes to another Service's
versions). Two models whose names are one Kubernetes name ("My_Model", "my-model") share them
too; that only the repository knows.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from vision_rollout.folders import Folder, folder_problem
from vision_rollout.mesh import CLUSTER_DOMAIN, ISTIO_ROOT_NAMESPACE, KUBERNETES_NAMES, IstioTarget, RouterError
from vision_rollout.serving import ModelServerAdmin

log = logging.getLogger(__name__)

CONNECTION = "model_server_default"
# BuildKit's rootless image (moby/buildkit, release v0.32.2): the image build's default builder.
BUILDKIT_IMAGE = "moby/buildkit:v0.32.2-rootless"
# What images.build_pod can hand to BuildKit: no git:// (unauthenticated plain text: anyone on the
# path could change the Dockerfile built), no credentials in a URL (they would be in the pod's args
# and the build log).
CONTEXT_PATTERN = r"^(s3://|dir://|https://[^/@?#\s]+(/|$))"


def _text(max_length: int = 4096) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length}


# A VirtualService's hosts and gateways: at most 255 characters each, as istiod's webhook takes them
# (``ISTIO_HOST``, ``ISTIO_GATEWAY``), not a Kubernetes name's 253.
_NAMES = {"type": "array", "items": _text(255), "maxItems": 64}
# The build section's Kubernetes names: a namespace (a DNS label), a ServiceAccount's and Secrets'
# (DNS subdomains), checked once ``{model}`` is filled in (``build_for``).
_BUILD_NAMES = (
    "namespace",
    "service_account",
    "push_secret",
    "admin_secret",
    "storage_secret",
    "feedback_secret",
    "mask_secret",
)
EXTRA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,  # a mistyped name is refused, not silently defaulted
    "properties": {
        "repository": _text(),
        "prediction_log": _text(),
        "shadow_log": _text(),
        "run_dir": _text(),
        "shared_folders": {"type": "boolean"},
        "istio": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "namespace": _text(63),
                "service": _text(63),
                "name": _text(253),
                "gateways": _NAMES,
                "hosts": _NAMES,
                # The mesh's rootNamespace, where deploy/'s bucket EnvoyFilter is (default istio-system).
                "root_namespace": {**_text(63), "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                # The cluster's DNS domain, which its Services' host names end with (default cluster.local).
                "cluster_domain": {**_text(253), "pattern": f"^{KUBERNETES_NAMES['name'][1]}$"},
                # In the mesh (the sidecar adds mTLS): a host and port, no path, no credentials.
                "url": {**_text(), "pattern": r"^http://[^/@?#\s]+/?$"},
            },
        },
        "build": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                **{name: _text() for name in ("registry", "builder_image")},
                # Kubernetes quantities (resource.Quantity's syntax, no more than 32 characters).
                **{
                    name: {
                        "type": "string",
                        "pattern": r"^[0-9]+(\.[0-9]+)?(m|[KMGTPE]i?|[eE][0-9]+)?$",
                        "maxLength": 32,
                    }
                    for name in ("cpu", "memory")
                },
                "context": {**_text(), "pattern": CONTEXT_PATTERN},
                **{name: _text(253) for name in _BUILD_NAMES},
                "gpus": {"type": "integer", "minimum": 0, "maximum": 64},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 1000},
                "min_replicas": {"type": "integer", "minimum": 1, "maximum": 1000},
                "max_replicas": {"type": "integer", "minimum": 1, "maximum": 10000},
                "autoscaling": {"type": "boolean"},
                # The HPAs' spec.metrics (autoscaling/v2 MetricSpecs; checked in full by
                # metric_problem): Kubernetes' default, 80% CPU, says little of a GPU server's load.
                "autoscaling_metrics": {
                    "type": "array",
                    "maxItems": 8,
                    "items": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {
                            "type": {"enum": ["Resource", "Pods", "Object", "External", "ContainerResource"]}
                        },
                    },
                },
                "drain_seconds": {"type": "number", "minimum": 0, "maximum": 600},
                "revision_history_limit": {"type": "integer", "minimum": 0, "maximum": 100},
            },
        },
    },
}


INTEGERS = (
    "gpus",
    "replicas",
    "min_replicas",
    "max_replicas",
    "revision_history_limit",
)  # 3.0 is an integer to JSON Schema
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # as RolloutSpec.model
# A model's own sections are checked as the connection-wide ones (whatever fields those gain).
EXTRA_SCHEMA["properties"]["models"] = {
    "type": "object",
    "maxProperties": 1000,
    "propertyNames": {"pattern": MODEL_PATTERN, "maxLength": 128},
    "additionalProperties": {
        "type": "object",
        "additionalProperties": False,
        "properties": {section: EXTRA_SCHEMA["properties"][section] for section in ("istio", "build")},
    },
}
TEMPLATE = "{model}"
URL_PATTERN = EXTRA_SCHEMA["properties"]["istio"]["properties"]["url"]["pattern"]
HINTS = {  # what a pattern asks for, in words
    CONTEXT_PATTERN: "s3://, dir:// or https://host/..., with no credentials in it",
    URL_PATTERN: "http://host:port, with no path and no credentials",
}


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[jsonschema.ValidationError]:
    """JSON Schema's ``pattern``, and no newline: Python's ``$`` also matches before a last
    newline, so "digits\n" passed ``^[A-Za-z0-9][A-Za-z0-9_.-]*$`` (a name, a URL, a quantity: a
    value with a pattern never holds one)."""
    if validator.is_type(instance, "string") and ("\n" in instance or re.search(pattern, instance) is None):
        yield jsonschema.ValidationError(f"does not match {pattern!r}")


FINITE = "must be a finite number"


def _finite(validator: Any, wanted: Any, instance: Any, schema: Any) -> Iterator[jsonschema.ValidationError]:
    """JSON Schema's ``type``, and a number is finite: Python's JSON reader takes NaN and
    Infinity, which pass every bound (each comparison with NaN is false)."""
    yield from jsonschema.Draft202012Validator.VALIDATORS["type"](validator, wanted, instance, schema)
    if isinstance(instance, float) and not math.isfinite(instance):
        yield jsonschema.ValidationError(FINITE)


_VALIDATOR = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern, "type": _finite})


def _rule(exc: jsonschema.ValidationError) -> str:
    """The rule an extra broke, never its value: jsonschema's messages quote the value, and a
    value may hold credentials (``https://user:token@...``) that would reach task logs and Slack.
    Unknown keys are named (names, not values)."""
    rule, v = exc.validator, exc.validator_value
    if rule == "additionalProperties" and isinstance(exc.instance, Mapping):
        unknown = sorted(str(k)[:64] for k in set(exc.instance) - set(exc.schema.get("properties", {})))
        return f"unknown key(s) {unknown[:10]}"
    whose = "each name " if "propertyNames" in exc.absolute_schema_path else ""
    words = {
        "type": exc.message if exc.message == FINITE else f"must be of type {v!r}",
        "pattern": f"must match {v!r}" + (f" ({HINTS[v]})" if isinstance(v, str) and v in HINTS else ""),
        "minLength": "must be non-empty" if v == 1 else f"must be at least {v} characters",
        "maxLength": f"must be at most {v} characters",
        "minimum": f"must be at least {v}",
        "maximum": f"must be at most {v}",
        "maxItems": f"must have at most {v} items",
        "maxProperties": f"must have at most {v} entries",
    }
    return (whose + words.get(str(rule), f"breaks {rule} {v!r}"))[:300]


class SettingsError(ValueError):
    """A connection's extras are missing or wrong; the message names the extra."""


@dataclass(frozen=True)
class BuildSettings:
    """Kubernetes mode: the image build (BuildKit, rootless) and the Deployment of each version."""

    registry: str | None = None  # image repository the build pushes to
    context: str | None = None  # build context: s3:// tarball, https:// URL, dir:// (images.build_pod)
    # BuildKit's rootless image, or the same from a mirror: the pod runs its buildctl-daemonless.sh
    # (and its tar, for an s3:// context).
    builder_image: str = BUILDKIT_IMAGE
    namespace: str = "ml-builds"
    service_account: str = "image-builder"
    push_secret: str = "registry-push"  # noqa: S105 (the name of a Secret with .dockerconfigjson)
    gpus: int = 1  # per model server pod
    cpu: str = "2"  # each model server pod's CPU request (a Kubernetes quantity)
    memory: str = "4Gi"  # each model server pod's memory request and limit
    replicas: int = 1  # the baseline's pods when its live Deployment does not say
    min_replicas: int = 1  # the candidate's floor at every stage
    # An HPA per version owns spec.replicas; the rollout sets its minReplicas per stage.
    autoscaling: bool = False
    max_replicas: int | None = None  # the HPAs' maxReplicas (default: 10 x their minReplicas)
    autoscaling_metrics: list[dict[str, Any]] | None = None  # the HPAs' spec.metrics (default: Kubernetes')
    # After the mesh stops routing to a version, before its pods go: Envoy's config
    # propagation and the requests in flight.
    drain_seconds: float = 10.0
    # Retired versions whose Deployment (scaled to 0, its HPA) a run's end keeps beside the
    # stable and the candidate, the newest first, for a quick manual rollback; older ones the
    # rollout made are deleted (VersionDeployments.prune), as Argo Rollouts' revisionHistoryLimit.
    revision_history_limit: int = 3
    admin_secret: str = "model-server-admin"  # noqa: S105 (the Secret whose key "token" is the admin token)
    storage_secret: str | None = None  # a Secret of AWS_* variables: the prediction log's object store
    feedback_secret: str = "model-server-feedback"  # noqa: S105 (key "key": the replicas' feedback key)
    mask_secret: str = "model-server-masking"  # noqa: S105 (key "mask-keys.json": the replicas' masking keys)

    def require(self, *names: str) -> list[str]:
        """The values of these settings, which kubernetes mode cannot do without."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            raise SettingsError(f"kubernetes mode needs the {CONNECTION} extra build.{missing[0]}")
        return [str(getattr(self, n)) for n in names]


@dataclass(frozen=True)
class ServingSettings:
    url: str = "http://127.0.0.1:8000"
    token: str | None = field(default=None, repr=False)
    repository: Path = Path("models")
    prediction_log: str = "run/predictions"
    run_dir: str = "run"
    shared_folders: bool = False  # the folders are on a volume every worker mounts
    istio_extra: Mapping[str, Any] = field(default_factory=dict)
    build: BuildSettings = field(default_factory=BuildSettings)  # connection-wide: see build_for
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # each model's own sections

    @classmethod
    def from_connection(cls, url: str, token: str | None, extra: Mapping[str, Any]) -> ServingSettings:
        try:
            # (a Mapping as the JSON object it was read from; anything else refused as no object)
            raw = dict(extra) if isinstance(extra, Mapping) else extra
            error = jsonschema.exceptions.best_match(_VALIDATOR(EXTRA_SCHEMA).iter_errors(raw))
            if error is not None:
                raise error
        except jsonschema.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path)
            raise SettingsError(f"the {CONNECTION} extra {where or '(extras)'}: {_rule(exc)}") from None
        for name in ("prediction_log", "shadow_log", "run_dir", "repository"):
            problem = folder_problem(extra.get(name) or "")
            if problem:
                raise SettingsError(f"the {CONNECTION} extra {name}: {problem}")
        defaults = cls()
        settings = cls(
            url=url,
            token=token or None,
            repository=Path(extra.get("repository") or defaults.repository),
            prediction_log=extra.get("prediction_log") or extra.get("shadow_log") or defaults.prediction_log,
            run_dir=extra.get("run_dir") or defaults.run_dir,
            shared_folders=bool(extra.get("shared_folders")),
            istio_extra=dict(extra.get("istio") or {}),
            build=BuildSettings(**_build_fields(extra.get("build") or {})),
            models={name: dict(sections) for name, sections in (extra.get("models") or {}).items()},
        )
        settings._check_targets_distinct()
        for where, build in [
            ("build", extra.get("build")),
            *(
                (f"models.{m}.build", (sections or {}).get("build"))
                for m, sections in (extra.get("models") or {}).items()
            ),
        ]:
            for i, metric in enumerate((build or {}).get("autoscaling_metrics") or []):
                problem = metric_problem(metric)
                if problem:
                    raise SettingsError(f"the {CONNECTION} extra {where}.autoscaling_metrics[{i}]: {problem}")
        return settings

    def unshared(self, executor: str) -> str | None:
        """Why these settings cannot serve workers on several machines (``executor`` runs tasks
        there): ``run_dir`` or ``prediction_log`` is a folder on one machine's disk, where a task
        on another worker would not find the outbox, the audits' marks, the locks or the model
        servers' records. None when both are object store URIs, or ``shared_folders`` says the
        folders are on a volume every worker mounts."""
        if self.shared_folders:
            return None
        for name, uri in (("run_dir", self.run_dir), ("prediction_log", self.prediction_log)):
            if Folder(uri).path is not None:
                return (
                    f"the {executor} runs tasks on several machines and the {CONNECTION} extra {name} "
                    f"({uri[:200]!r}) is a folder on one machine's disk, which a task on another worker "
                    "would not see: give an object store URI (s3://...), or a folder every worker mounts "
                    'and say so with "shared_folders": true'
                )
        return None

    @property
    def address(self) -> str:
        """host:port, as tritonclient takes it."""
        return self.url.split("://", 1)[-1]

    @property
    def admin(self) -> ModelServerAdmin:
        return ModelServerAdmin(self.url, self.token)

    @property
    def run_folder(self) -> Folder:
        return Folder(self.run_dir)

    @property
    def run_dir_argument(self) -> str:
        """The run folder as advice's ``rolloutctl ... --run-dir`` takes it, typed anywhere: a
        folder's absolute path (the default ``run`` is the worker's working directory's, not the
        reader's), shell-quoted."""
        path = self.run_folder.path
        return shlex.quote(str(path.absolute()) if path is not None else self.run_dir)

    @property
    def outbox(self) -> Folder:
        """Slack reports that could not be posted (no token, or Slack failing)."""
        return self.run_folder / "outbox"

    @property
    def stage_caches(self) -> Folder:
        """The rollout stages' prediction-log reads, kept between pokes on any worker (``logcache``)."""
        return stage_caches(self.run_folder)

    def validation(self, model: str) -> Path:
        """The model's validation set: ``labels.csv`` (``file``, ``label``) and the images it names."""
        return self.repository / model / "validation"

    def workdir(self, model: str, run_id: str) -> Folder:
        """A rollout run's folder (``workdir``)."""
        return workdir(self.run_folder, model, run_id)

    def on_disk(self, folder: Folder) -> Path:
        """``folder`` on this machine's disk (made), for what mesh ``local`` keeps there: its
        lock files and the routes before a rollout."""
        path = folder.path
        if path is None:
            raise SettingsError(
                f"mesh 'local' keeps its lock files and the routes before a rollout on this machine's "
                f"disk: the {CONNECTION} extra run_dir must be a folder there, not an object store URI"
            )
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _section(self, model: str, section: str, connection_wide: Mapping[str, Any]) -> dict[str, Any]:
        """The connection-wide section overridden by the model's own, ``{model}`` filled in."""
        merged = {**connection_wide, **(self.models.get(model, {}).get(section) or {})}
        return {k: _fill(v, model) for k, v in merged.items()}

    def istio_for(self, model: str) -> IstioTarget:
        """Kubernetes mode: the Istio objects the model's rollout drives (the extras' ``istio``,
        overridden by ``models.<model>.istio``)."""
        raw = self._section(model, "istio", self.istio_extra)
        missing = [k for k in ("namespace", "service", "name") if not raw.get(k)]
        if missing:
            raise SettingsError(
                f"mesh 'istio' needs the {CONNECTION} extra istio.{missing[0]} (or models.{model}.istio.{missing[0]})"
            )
        for key, (rule, pattern) in KUBERNETES_NAMES.items():
            if not re.fullmatch(pattern, raw[key]):
                raise SettingsError(
                    f"the {CONNECTION} extra istio.{key} (or models.{model}.istio.{key}) gives {raw[key][:80]!r} "
                    f"for model '{model}': not {rule}, which Kubernetes would refuse"
                )
        try:
            return IstioTarget(
                raw["namespace"],
                raw["service"],
                raw["name"],
                list(raw.get("gateways", [])),
                list(raw.get("hosts", [])),
                raw.get("root_namespace") or ISTIO_ROOT_NAMESPACE,
                raw.get("cluster_domain") or CLUSTER_DOMAIN,
            )
        except RouterError as exc:
            raise SettingsError(
                f"the {CONNECTION} extra istio (or models.{model}.istio) for model '{model}': {exc}"
            ) from None

    def serving_url(self, model: str, mesh: str) -> str:
        """Where the rollout's own requests (the validation replay, the masking probe) reach the
        model: its Service through the mesh (``istio.url``, or ``models.<model>.istio.url``) in
        mesh ``istio``, else, and by default, the connection's host and port."""
        if mesh == "istio":
            return str(self._section(model, "istio", self.istio_extra).get("url") or self.url)
        return self.url

    def build_for(self, model: str) -> BuildSettings:
        """Kubernetes mode: the model's image build and Deployments (the extras' ``build``,
        overridden by ``models.<model>.build``)."""
        raw = self._section(model, "build", asdict(self.build))
        for key in _BUILD_NAMES:  # (else the API server refused them after the lease and the image build)
            rule, pattern = KUBERNETES_NAMES["namespace" if key == "namespace" else "name"]
            if raw.get(key) is not None and not re.fullmatch(pattern, raw[key]):
                raise SettingsError(
                    f"the {CONNECTION} extra build.{key} (or models.{model}.build.{key}) gives {raw[key][:80]!r} "
                    f"for model '{model}': not {rule}, which Kubernetes would refuse"
                )
        return BuildSettings(**_build_fields(raw))

    def _check_targets_distinct(self) -> None:
        """Two models driving one VirtualService or one Service would fight over it (the one's
        rollout would send the other's requests to its own Service), and two VirtualServices
        claiming one host too (routes of no uri match: the gateway would send the host's requests
        to one of them): two of ``models``, one of them and every model not in ``models`` (the
        connection-wide section, its names fixed), or any two (the connection-wide section's
        ``service`` or ``name`` alone templated, or its ``name`` templated and a host not)."""
        kinds = (("VirtualService", "name"), ("Service", "service"))
        wide = {k: str(self.istio_extra.get(k) or "") for k in ("namespace", "service", "name")}
        templated = [k for k in ("service", "name") if TEMPLATE in wide[k]]
        if TEMPLATE not in wide["namespace"] and len(templated) == 1 and all(wide.values()):
            fixed, kind = ("name", "VirtualService") if templated == ["service"] else ("service", "Service")
            raise SettingsError(
                f"the {CONNECTION} extra istio: {templated[0]} holds {TEMPLATE} and {fixed} does not, so every model "
                f"would share the {kind} {wide['namespace']}/{wide[fixed]}: write {TEMPLATE} in both"
            )
        hosts = self.istio_extra.get("hosts")
        wide_hosts = [str(h) for h in hosts] if isinstance(hosts, list) else []
        shared = next((h for h in wide_hosts if TEMPLATE not in h), None) if TEMPLATE in wide["name"] else None
        if shared is not None:
            raise SettingsError(
                f"the {CONNECTION} extra istio: name holds {TEMPLATE} and the host {shared[:80]!r} does not, so every "
                f"model's VirtualService would claim it: write {TEMPLATE} in it, or give it to one model "
                "(models.<model>.istio.hosts)"
            )
        # (the objects of every model not in models, where the section's names are fixed)
        every = wide if all(wide.values()) and not any(TEMPLATE in v for v in wide.values()) else None
        every_claims: set[tuple[str, str]] = set()
        if every is not None:
            gateways = self.istio_extra.get("gateways")
            every_claims = host_claims(
                every["namespace"],
                [h for h in wide_hosts if TEMPLATE not in h] if wide_hosts else [every["service"]],
                [str(g) for g in gateways] if isinstance(gateways, list) else [],
                str(self.istio_extra.get("cluster_domain") or CLUSTER_DOMAIN),
            )
        seen: dict[tuple[str, str, str], str] = {}
        for model in self.models:
            try:
                target = self.istio_for(model)
            except SettingsError:
                continue  # incomplete: refused where it is used (mesh 'istio'), not in local mode
            own = every is None or (every["service"], every["name"]) != (target.service, target.name)
            claims = [(kind, target.namespace, getattr(target, key), key) for kind, key in kinds]
            hosts = target.hosts or [target.host]
            claims += [
                ("host", gateway, host, "hosts")
                for gateway, host in sorted(
                    host_claims(target.namespace, hosts, target.gateways, target.cluster_domain)
                )
            ]
            for kind, where, name, key in claims:
                other = seen.setdefault((kind, where, name), model)
                what = f"the {kind} {where}/{name}"
                if kind == "host":
                    what = f"the host {name[:80]!r}" + (f" on the gateway {where}" if where != "mesh" else "")
                if other != model:
                    raise SettingsError(
                        f"the {CONNECTION} extra models: '{other}' and '{model}' share {what}; give each its own "
                        f"istio.{key}"
                    )
                if (
                    own
                    and every is not None
                    and (
                        (where, name) in every_claims
                        if kind == "host"
                        else (every["namespace"], every[key]) == (where, name)
                    )
                ):
                    raise SettingsError(
                        f"the {CONNECTION} extra models.{model}: shares {what} with every model not in models (the "
                        f"connection-wide istio section); give it its own istio.{key}"
                    )


def host_claims(namespace: str, hosts: list[str], gateways: list[str], cluster_domain: str) -> set[tuple[str, str]]:
    """The (gateway, host) pairs a VirtualService in ``namespace`` claims, as Istio reads them:
    a host in lower case without a trailing dot, a short name (no dot) the Service's in the
    namespace; a gateway without a namespace the namespace's, one by its host name
    ("ext.gw.svc.cluster.local") as ``gw/ext``, none the sidecars' ("mesh")."""

    def gateway(g: str) -> str:
        if g == "mesh" or "/" in g:
            return g
        name, _, rest = g.partition(".")
        return f"{rest.partition('.')[0]}/{name}" if rest else f"{namespace}/{g}"

    names = {h.lower().rstrip(".") for h in hosts}
    names = {h if "." in h else f"{h}.{namespace}.svc.{cluster_domain}" for h in names}
    through = {gateway(g) for g in gateways} or {"mesh"}
    return {(g, h) for g in through for h in names}


def model_name(model: str) -> str:
    """A model's name as a Kubernetes name (DNS label): lower case, other characters as ``-``."""
    return re.sub(r"[^a-z0-9-]", "-", model.lower())


def _fill(value: Any, model: str) -> Any:
    """``{model}`` in a string (or in a list's or an object's strings) replaced by the model's
    Kubernetes name."""
    if isinstance(value, str):
        return value.replace(TEMPLATE, model_name(model))
    if isinstance(value, list):
        return [_fill(v, model) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, model) for k, v in value.items()}
    return value


def metric_problem(metric: Mapping[str, Any]) -> str | None:
    """What is wrong with an autoscaling/v2 MetricSpec, as the kubernetes client's model reads it:
    a required field missing, or one it does not know (misspelt, misplaced: the API server would
    drop or refuse it). None when it is whole."""
    from kubernetes import client

    class Response:  # what ApiClient.deserialize reads: a body of JSON
        data = json.dumps(metric)

    api = client.ApiClient()
    try:
        read = api.sanitize_for_serialization(api.deserialize(Response(), "V2MetricSpec"))
    except (ValueError, TypeError, AttributeError) as exc:
        return f"not an autoscaling/v2 MetricSpec: {str(exc)[:200]}"
    if read != metric:
        return (
            f"not an autoscaling/v2 MetricSpec: read as {json.dumps(read, sort_keys=True)[:300]} "
            "(a field misspelt, misplaced or of the wrong type)"
        )
    return None


def _build_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A ``build`` section's values for ``BuildSettings``: 3.0 is an integer to JSON Schema, and a count here."""
    return {k: int(v) if k in INTEGERS and v is not None else v for k, v in raw.items()}


def workdir(run_folder: Folder, model: str, run_id: str) -> Folder:
    """A rollout run's folder in ``run_folder``: its shadow audit's report, its stages' records
    (``attempts``), and in mesh ``local`` the routes before it (``Settings.on_disk``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id[:200]).lstrip(".") or "_"
    return run_folder / "rollouts" / model / safe


HELD = "lease.json"  # (a run's own record of the model's lease, in its run folder: locks.held_record)
ENDED = "ended.json"  # (what a run's teardown found it decided and carried out, in its run folder)
BESIDES = "besides.json"  # (in a run's folder: what promote or the rollback left undone once the traffic moved)
PROMOTED = "promoted.json"  # (in a run's folder: promote's record that it moved the routes, ahead of retiring)
RUN_REPORT = "report.json"  # (in a run's folder: its report's outbox name, when first written; its post)
RUN_MARK = "run.json"  # (in a run's folder: the DAG run whose folder it is, its id and when it was triggered)
ROUTES = "original-routes.json"  # (mesh local: the routes before a run, in its run folder)
ROUTES_WRITTEN = "original-routes.tmp"  # (the file LocalRouter wrote them to, then renamed: older run folders)
APPROVAL_NAME = re.compile(r"[0-9A-Za-z-]{1,64}\.json")  # (a wait's count of failed reads: its task instance's id)
MAX_PRUNED = 500  # run folders looked into, and files removed, of each kind in one pass
# The days what a run wrote is kept once unchanged: over the longest a running rollout leaves its
# run folder unchanged (an approval wait, within its lease's 7 days) and the shadow audit's
# longest catch-up window (7 days: an hour pruned within it would be audited and reported again).
RETENTION_DAYS, MIN_RETENTION_DAYS, MAX_RETENTION_DAYS = 30, 8, 3660
SEND_BUDGET_S = 120.0  # a round of sending the outbox starts no report after this long (the DAGs', rolloutctl's)


def stage_caches(run_folder: Folder) -> Folder:
    """Where the rollout stages' prediction-log reads are kept in ``run_folder`` (``logcache``)."""
    return run_folder / ".logcache"


def approvals(run_folder: Folder, model: str) -> Folder:
    """Where the approval waits of ``model``'s runs keep their counts of failed reads, one file
    per task instance."""
    return run_folder / "approvals" / model


def prune_runs(
    run_folder: Folder,
    models: list[str],
    before: float,
    now: float,
    limit: int = MAX_PRUNED,
    dry_run: bool = False,
    lease_holder: Callable[[str], str | None] | None = None,
) -> dict[str, list[str]]:
    """What nobody reads any more in ``run_folder`` removed, by kind, the names of what went
    (``dry_run``: of what would go, nothing removed): the ``models``' rollout run folders
    (``workdir``: stage records, routes, shadow reports) in which nothing changed since
    ``before`` (unix seconds; ``Folder.prune``: a running rollout writes its stage's record at
    each look, and waits at most its lease's 7 days for an approval), ``limit`` of a model's
    looked into, in turns by the hour of ``now``, never the folder of the run holding the
    model's lock (a run going on, or stopped and not ended, however long ago): the run mesh
    local's lock file names, and the run ``lease_holder`` gives (kubernetes mode: the model's
    Lease's holder; None, nobody); where ``lease_holder`` raises (the API server refusing or
    unreachable), none of the model's run folders, logged; the counts of failed reads that approval
    waits ended without removing (their task killed), and the guard files of removals of them
    killed under their lock (``with_leftovers``), unchanged since ``before`` (a wait going
    on is at most 7 days old); in the outbox what senders and writers killed mid-way left
    (``prune_outbox``), never a report; and at its root the conditional-PUT probe objects that
    probers killed mid-probe left (``objects.require_conditions``), over ``PROBE_AGE_S`` old."""
    from vision_rollout import attempts, objects
    from vision_rollout.audit import REPORT_NAMES
    from vision_rollout.folders import with_leftovers
    from vision_rollout.notify import prune_outbox

    def of_a_run(name: str) -> bool:
        record = re.sub(r"\.damaged-\d+$", "", name)  # (a damaged record set aside by restart-stage)
        return (
            bool(attempts.RECORD_NAME.fullmatch(record))
            or name in (ROUTES, ROUTES_WRITTEN, HELD, ENDED, PROMOTED, RUN_REPORT, RUN_MARK)
            or name in REPORT_NAMES
        )

    pruned: dict[str, list[str]] = {"run folders": [], "approval counts": []}
    for model in models:
        holders = [_lock_holder(run_folder, model)]
        try:
            holders.append(lease_holder(model) if lease_holder is not None else None)
        except Exception as exc:  # (whatever failed, who holds the model is not known: keep all)
            log.warning("no run folder of '%s' pruned: its lock's holder is not known: %s", model, str(exc)[:300])
        else:
            going = {workdir(run_folder, model, h).parts[-1] for h in holders if h}
            runs = (run_folder / "rollouts" / model).prune(before, of_a_run, limit, int(now // 3600), dry_run, going)
            pruned["run folders"] += [f"{model}/{name}" for name in runs]
        count = with_leftovers(APPROVAL_NAME.fullmatch)  # (its temporaries and guard files too)
        counts = approvals(run_folder, model).remove_older(before, count, limit, dry_run)
        pruned["approval counts"] += [f"{model}/{name}" for name in counts]
    pruned["outbox leftovers"] = prune_outbox(run_folder / "outbox", now, limit, dry_run)
    pruned["conditional-put probes"] = run_folder.remove_older(
        now - objects.PROBE_AGE_S, lambda n: n.startswith(objects.PROBE_PREFIX), limit, dry_run
    )
    return pruned


def _lock_holder(run_folder: Folder, model: str) -> str | None:
    """The run that mesh local's lock file of ``model`` (``locks/<model>.lock``) names; None
    without one, or where it cannot be read."""
    from vision_rollout.locks import MAX_LOCK_BYTES

    try:
        holder = json.loads((run_folder / "locks").read_within(f"{model}.lock", MAX_LOCK_BYTES))["holder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return holder if isinstance(holder, str) else None
