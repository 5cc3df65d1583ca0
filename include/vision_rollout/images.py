"""Step 1: verify the candidate artifact before any traffic, and render its image build.

``verify_model`` loads the candidate in ONNX Runtime, checks its signature against the model's
config and the baseline's graph, runs a golden inference over validation images through the
server's own preprocessing, and records size and sha256. ``build_pod`` renders the build pod
(for the KubernetesPodOperator: BuildKit, rootless) that bakes the model into the serving image,
tagged by the artifact's digest; ``pushed_image`` reads back what the registry stored, by digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The AWS CLI's image (amazon/aws-cli, tagged as the CLI's release 2.36.7) fetches an s3://
# build context; BuildKit fetches git and https contexts itself.
AWS_CLI_IMAGE = "amazon/aws-cli:2.36.7"
BUILDER_UID = 1000  # the user of BuildKit's rootless image, mapped to root in its user namespace
BUILDER_HOME = "/home/user"
CONTEXT_DIR = "/workspace/context"
# buildctl writes its metadata (the pushed manifest's digest) with a temporary file and a rename,
# which the kubelet's bind-mounted termination log does not take: written beside, then copied.
METADATA_FILE = "/tmp/buildkit-metadata.json"  # noqa: S108 (a path in the build container)
TERMINATION_LOG = "/dev/termination-log"
BUILD_SCRIPT = f'buildctl-daemonless.sh "$@" && cat {METADATA_FILE} > {TERMINATION_LOG}'
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# The inputs of the run at the largest batch are built in the verifying worker's memory: above
# this, the run is at the largest batch whose inputs fit (the report's ``batch_checked``).
CHECK_BATCH_BYTES = 1 << 30


@dataclass
class ArtifactReport:
    path: str
    sha256: str = ""
    size_bytes: int = 0
    provider: str = ""
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    batch_checked: int = 0  # the batch the candidate ran at: max_batch_size unless its inputs are too large
    golden_images: int = 0
    golden_accuracy: float | None = None
    baseline_agreement: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _signature(session: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def describe(nodes: Any) -> list[dict[str, Any]]:
        return [
            {"name": n.name, "type": n.type, "shape": [d if isinstance(d, int) else -1 for d in n.shape]} for n in nodes
        ]

    return describe(session.get_inputs()), describe(session.get_outputs())


def _golden(validation: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    from vision_rollout.replay import load_validation

    rows = load_validation(validation, n)
    if not rows:
        raise ValueError("labels.csv names no image")
    return np.array([image for _, image, _ in rows], dtype=object), np.array([label for _, _, label in rows])


def verify_model(
    candidate: Path,
    baseline: Path | None = None,
    config_dir: Path | None = None,
    validation: Path | None = None,
    golden_n: int = 64,
) -> ArtifactReport:
    """Everything that must hold before a version takes traffic; problems are listed, not raised."""
    from model_server.config import int64_version, load_config
    from model_server.errors import ServerError
    from model_server.model import LoadedVersion, ort, read_model

    report = ArtifactReport(str(candidate))
    if not candidate.is_file():
        report.problems.append(f"{candidate} does not exist")
        return report
    if (
        config_dir is not None
        and candidate.parent.parent == config_dir
        and not candidate.resolve().is_relative_to(config_dir.resolve())
    ):
        # A version of the model's folder that links out of it: the model server does not load it
        # (``ModelRepository.versions_on_disk``), and what it names can change outside the folder.
        report.problems.append(f"{candidate} is a link out of the model's folder {config_dir}: not loaded from there")
        return report
    # Read once: the digest, the checks and the loads below are of these bytes, whatever the file
    # holds later (the model server's load is checked against the digest: ``served_sha256``).
    try:
        data = read_model(candidate)
    except ServerError as exc:
        report.problems.append(exc.message)
        return report
    report.sha256 = hashlib.sha256(data).hexdigest()
    report.size_bytes = len(data)
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        report.problems.append(f"does not load in ONNX Runtime: {exc}")
        return report
    report.provider = session.get_providers()[0]
    report.inputs, report.outputs = _signature(session)
    base_session: Any = None
    base_in = report.inputs
    if baseline is not None:
        # A baseline named but missing or unloadable is a problem, not a comparison skipped: a
        # mistyped path passed a candidate whose signature was never compared.
        if not baseline.is_file():
            report.problems.append(f"the baseline {baseline} does not exist: nothing to compare the signature with")
            return report
        try:
            base_session = ort.InferenceSession(read_model(baseline), providers=["CPUExecutionProvider"])
        except ServerError as exc:
            report.problems.append(f"the baseline {baseline}: {exc.message}")
            return report
        except Exception as exc:  # ORT's own exception types
            report.problems.append(f"the baseline {baseline} does not load in ONNX Runtime: {exc}")
            return report
        base_in, base_out = _signature(base_session)
        if base_in != report.inputs:
            report.problems.append(f"inputs differ from the baseline's: {report.inputs} vs {base_in}")
        candidate_outputs = {o["name"]: o for o in report.outputs}
        for o in base_out:
            if candidate_outputs.get(o["name"]) != o:
                report.problems.append(
                    f"output {o['name']!r} differs from the baseline's: {candidate_outputs.get(o['name'])} vs {o}"
                )
    if config_dir is None:
        return report
    try:
        cfg = load_config(config_dir)
        number = int64_version(candidate.parent.name) or 1  # (models/<m>/<version>/model.onnx: its messages name it)
        version = LoadedVersion(cfg, number, candidate, ["CPUExecutionProvider"], data)  # the signature vs config
    except ServerError as exc:
        report.problems.append(exc.message)
        return report
    try:
        version.warmup()
        report.problems += _at_the_largest_batch(report, version, base_session if base_in == report.inputs else None)
        if validation is not None and cfg.preprocess is not None and (validation / "labels.csv").is_file():
            _golden_inference(report, session, base_session, cfg, validation, golden_n)
    except ServerError as exc:
        report.problems.append(exc.message)
    finally:
        version.close()
    return report


def _at_the_largest_batch(report: ArtifactReport, version: Any, base_session: Any) -> list[str]:
    """The candidate run at the config's ``max_batch_size`` (the warm-up runs one item), or at the
    largest batch whose inputs fit in ``CHECK_BATCH_BYTES`` (a max_batch_size of 2**31 is valid
    Triton, and its zeros would not fit in any worker): it runs, every output has the config's
    dims and one row an item, and every dimension after the first is the baseline's on the same
    input (a class count the graphs leave symbolic). ServerError for the candidate's own failures;
    the baseline's differences listed."""
    from model_server.errors import InvalidInput

    cfg = version.config
    one = sum(a.nbytes for a in version.synthetic_feeds(1).values())
    batch = max(1, min(cfg.max_batch_size, CHECK_BATCH_BYTES // max(one, 1)))
    report.batch_checked = batch
    feeds = version.synthetic_feeds(batch)
    names = [o.name for o in cfg.outputs]
    try:
        results = version.session.run(names, feeds)
    except Exception as exc:  # ORT's own exception types
        which = "the config's max_batch_size" if batch == max(cfg.max_batch_size, 1) else "the largest checked"
        raise InvalidInput(f"fails at a batch of {batch} ({which}): {exc}") from None
    version.check_outputs(results, batch)
    if base_session is None:
        return []
    try:
        base_results = base_session.run(names, feeds)
    except Exception as exc:  # ORT's own exception types
        return [f"the baseline fails on the input the candidate ran at a batch of {batch}: {exc}"]
    return [
        f"output {name!r} came out with shape {list(np.shape(got))} at a batch of {batch}, the baseline's "
        f"{list(np.shape(base))}: clients of the baseline read another shape"
        for name, got, base in zip(names, results, base_results, strict=True)
        if np.shape(got)[1:] != np.shape(base)[1:]
    ]


def _golden_inference(
    report: ArtifactReport, session: Any, base_session: Any, cfg: Any, validation: Path, golden_n: int
) -> None:
    """Top-1 accuracy over the validation images, through the server's preprocessing, and the
    agreement with the baseline on them; what fails is listed in ``report.problems``."""
    from model_server.errors import ServerError
    from model_server.preprocess import images_to_features

    try:
        images, labels = _golden(validation, golden_n)
        feats = images_to_features(images, cfg.preprocess, cfg.inputs[0].name)
    except (OSError, ValueError, ServerError) as exc:
        report.problems.append(f"the validation set {validation} cannot be read: {getattr(exc, 'message', exc)}")
        return
    feeds = {cfg.preprocess.onnx_input: feats}
    try:
        out = session.run([cfg.outputs[0].name], feeds)[0]
    except Exception as exc:  # ORT's own exception types
        report.problems.append(f"golden inference over {len(labels)} validation images failed: {exc}")
        return
    report.golden_images = len(labels)
    if out.shape[0] != len(labels) or not np.isfinite(out).all():
        report.problems.append(f"golden inference gave shape {out.shape} or non-finite values")
        return
    report.golden_accuracy = float((out.argmax(axis=1) == labels).mean())
    if base_session is not None:
        try:
            base_out = base_session.run([cfg.outputs[0].name], feeds)[0]
        except Exception as exc:  # ORT's own exception types
            report.problems.append(f"the baseline's inference over the validation images failed: {exc}")
            return
        if base_out.shape != out.shape:
            report.problems.append(f"golden inference gave shape {out.shape}, the baseline's {base_out.shape}")
            return
        report.baseline_agreement = float((base_out.argmax(axis=1) == out.argmax(axis=1)).mean())


def image_tag(registry_repo: str, sha256: str) -> str:
    """An immutable tag from the artifact's digest: the same model always builds the same tag."""
    return f"{registry_repo}:sha-{sha256[:12]}"


def pushed_image(tag: str, metadata: str | None) -> str:
    """``tag`` pinned to the manifest its build pushed, ``<tag>@sha256:...``, from buildctl's
    ``--metadata-file`` (the build container's termination message): what a Deployment runs, so
    every pod of a version runs the same bytes, whatever the tag names later or a node cached.
    ValueError saying what is wrong with ``metadata``."""
    if not metadata:
        raise ValueError("the build container's termination message is empty: no digest of what it pushed")
    try:
        fields = json.loads(metadata)
    except ValueError:
        raise ValueError(f"the build's metadata is not JSON: {metadata[:120]!r}") from None
    digest = fields.get("containerimage.digest") if isinstance(fields, dict) else None
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ValueError(f"the build's metadata names no sha256 digest: containerimage.digest {str(digest)[:80]!r}")
    names = fields.get("image.name")
    if isinstance(names, str) and tag not in names.split(","):
        raise ValueError(f"the build pushed {names[:200]!r}, not {tag!r}")
    return f"{tag}@{digest}"


def build_pod(
    name: str,
    namespace: str,
    context: str,
    destination: str,
    model_file: str,
    model_sha256: str,
    *,
    builder_image: str,  # BuildSettings.builder_image: BuildKit's rootless image or a mirror of it
    docker_config_secret: str,  # the Secret's name (BuildSettings.push_secret)
    service_account: str,
    dockerfile: str = "docker/Dockerfile.model-server",
) -> dict[str, Any]:
    """The BuildKit build pod (a V1Pod as a dict) for the KubernetesPodOperator: rootless BuildKit
    (``buildctl-daemonless.sh``, the daemon in the build container) as BuildKit's own
    ``examples/kubernetes/job.rootless.yaml``, pushing ``destination`` with the push Secret's
    ``config.json`` and a registry cache beside it.

    ``context``: ``s3://bucket/key.tar.gz`` (a tarball fetched by ``aws s3 cp`` with the service
    account's credentials and unpacked by init containers into an emptyDir: BuildKit reads no
    s3://), an ``https://`` URL BuildKit fetches itself (a git repository or a
    tarball; no credentials in it, the build log shows it), or ``dir://PATH``, a folder the build
    container sees. ``model_file`` is the candidate's path in the context
    (``models/<m>/<v>/model.onnx``); the Dockerfile refuses to build unless its sha256 is
    ``model_sha256``. ValueError for any other context. The pushed manifest's metadata is the
    build container's termination message (``pushed_image``).
    """
    init_containers: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    folder, filename = dockerfile.rpartition("/")[::2]
    if context.startswith("s3://"):
        local = ["--local", f"context={CONTEXT_DIR}", "--local", f"dockerfile={CONTEXT_DIR}/{folder}".rstrip("/")]
        init_containers = _context_fetch(context, builder_image)
        volumes = [{"name": "download", "emptyDir": {}}, {"name": "context", "emptyDir": {}}]
    elif context.startswith("https://"):
        local, filename = ["--opt", f"context={context}"], dockerfile  # the Dockerfile from the context
    elif context.startswith("dir://"):
        path = context.removeprefix("dir://").rstrip("/")
        local = ["--local", f"context={path}", "--local", f"dockerfile={path}/{folder}".rstrip("/")]
    else:
        raise ValueError(f"build context {context!r}: an s3://, https:// or dir:// URI")
    repository = destination.rpartition(":")[0]
    cache = f"type=registry,ref={repository}:buildcache"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "image-build", "app.kubernetes.io/managed-by": "model-rollout"},
            # What API servers before 1.30 read (they drop the appArmorProfile field below); from
            # 1.30 both are accepted when they agree.
            "annotations": {"container.apparmor.security.beta.kubernetes.io/build": "unconfined"},
        },
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": service_account,
            **({"initContainers": init_containers} if init_containers else {}),
            "containers": [
                {
                    "name": "build",
                    "image": builder_image,
                    # The pushed manifest's digest reaches the pod's status as the container's
                    # termination message (read through the API; no exec, no sidecar).
                    "command": ["sh", "-c", BUILD_SCRIPT, "buildctl-daemonless.sh"],
                    "args": [
                        "build",
                        "--progress",
                        "plain",
                        "--frontend",
                        "dockerfile.v0",
                        *local,
                        "--opt",
                        f"filename={filename}",
                        "--opt",
                        f"build-arg:MODEL_FILE={model_file}",
                        "--opt",
                        f"build-arg:MODEL_SHA256={model_sha256}",
                        "--import-cache",
                        cache,
                        "--export-cache",
                        f"{cache},mode=max",
                        "--output",
                        f"type=image,name={destination},push=true",
                        "--metadata-file",
                        METADATA_FILE,
                    ],
                    "terminationMessagePath": TERMINATION_LOG,
                    # A failed build's message is its log's tail (the reason), the operator's error.
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    # Kubernetes cannot unmask /proc (Docker's systempaths=unconfined), so the build's
                    # steps run without a process namespace of their own (BuildKit's docs/rootless.md).
                    "env": [
                        {"name": "BUILDKITD_FLAGS", "value": "--oci-worker-no-process-sandbox"},
                        {"name": "DOCKER_CONFIG", "value": f"{BUILDER_HOME}/.docker"},
                    ],
                    # Not privileged: rootlesskit maps the user 1000 of the image to root in a user
                    # namespace, which needs unshare and mount (seccomp and AppArmor unconfined) and
                    # the setuid newuidmap (no allowPrivilegeEscalation: false).
                    "securityContext": {
                        "runAsUser": BUILDER_UID,
                        "runAsGroup": BUILDER_UID,
                        "runAsNonRoot": True,
                        "seccompProfile": {"type": "Unconfined"},
                        "appArmorProfile": {"type": "Unconfined"},
                    },
                    "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
                    "volumeMounts": [
                        *([{"name": "context", "mountPath": CONTEXT_DIR, "readOnly": True}] if init_containers else []),
                        {"name": "docker-config", "mountPath": f"{BUILDER_HOME}/.docker", "readOnly": True},
                        # Not the image's VOLUME: on some nodes (Container-Optimized OS) it is nosuid.
                        {"name": "buildkitd", "mountPath": f"{BUILDER_HOME}/.local/share/buildkit"},
                    ],
                }
            ],
            "volumes": [
                *volumes,
                {
                    "name": "docker-config",
                    "secret": {
                        "secretName": docker_config_secret,
                        "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                    },
                },
                {"name": "buildkitd", "emptyDir": {}},
            ],
        },
    }


def _context_fetch(context: str, builder_image: str) -> list[dict[str, Any]]:
    """The init containers that put an s3:// context tarball, unpacked, into the ``context``
    emptyDir: ``aws s3 cp`` (credentials from the pod's service account, never in its spec), then
    the builder image's ``tar`` (the AWS CLI's image has none)."""
    unprivileged = {
        "runAsUser": BUILDER_UID,
        "runAsGroup": BUILDER_UID,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    return [
        {
            "name": "fetch-context",
            "image": AWS_CLI_IMAGE,
            "args": ["s3", "cp", "--no-progress", context, "/download/context.tar.gz"],
            "env": [{"name": "HOME", "value": "/download"}],  # the CLI's cache, not the image's /root
            "securityContext": unprivileged,
            "volumeMounts": [{"name": "download", "mountPath": "/download"}],
        },
        {
            "name": "unpack-context",
            "image": builder_image,
            "command": ["tar", "-xzf", "/download/context.tar.gz", "-C", CONTEXT_DIR],
            "securityContext": unprivileged,
            "volumeMounts": [
                {"name": "download", "mountPath": "/download", "readOnly": True},
                {"name": "context", "mountPath": CONTEXT_DIR},
            ],
        },
    ]
