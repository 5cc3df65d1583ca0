"""The one-machine cluster's kubelet and ReplicaSet controller: each Deployment's pods run as
model-server processes on loopback, and a BuildKit build pod as a build stand-in.

``PodRunner(api, workdir, images).reconcile()``, called in a loop (``run_forever``), makes the
pods of every Deployment in ``api`` (a ``FakeKubeAPI(kubelet=True)``) match ``spec.replicas``,
and writes the status of the pods and the Deployments back, as the controllers and kubelets of
a cluster do. What a pod is here:

- a process ``sys.executable -m model_server`` (the serving image's entrypoint) with the
  container's ``args``; paths in them are translated: the image's ``/models`` is the repository
  folder the image tag names (``images``, a mapping or callable tag -> folder, or a tag a build
  pod pushed), each ``emptyDir`` and ``secret`` volume's ``mountPath`` a fresh folder of the pod,
  ``/tmp`` the pod's own; ``--host``/``--port`` are replaced by ``127.0.0.1`` and a free port,
  the pod's own "pod IP" (``--admin-port`` by another free port) (``status.podIP`` is 127.0.0.1; the address is in the pod's annotation
  ``cluster.devstack/address``; every ``containerPort`` and probe port means that one port);
  ``--device cuda`` becomes ``--device cpu`` where no GPU is found (the server refuses cuda
  without one), so GPU Deployments run here unchanged;
- its environment: the container's ``envFrom`` Secrets and ``env`` (``value``,
  ``valueFrom.secretKeyRef`` read from the API server's Secrets, ``fieldRef`` of the pod's name,
  namespace or IP) plus ``PATH``,
  ``PYTHONPATH`` and ``ORT_DISABLE_TELEMETRY=1``, nothing else of this process's environment. A
  missing Secret (or key) keeps the container waiting with ``CreateContainerConfigError`` and
  the reason, as kubelet does, until it exists; an unknown image waits with ``ErrImagePull``;
- readiness from the container's ``readinessProbe.httpGet`` (every ``periodSeconds`` but at
  most 1 s here, ``timeoutSeconds`` at most 1 s, ``failureThreshold`` consecutive failures make
  it not ready; ``initialDelaySeconds`` is not waited); no probe: ready once started. Liveness
  and startup probes are not run;
- restartPolicy Always: an exited process is started again (``restartCount`` + 1) after
  kubelet's back-off (none the first time, then 10 s doubling to 300 s, never reset);
- scaling down stops the newest pods first; a pod being stopped is not ready (out of
  ``endpoints``), then runs its ``preStop`` hook (``sleep N`` only), then gets SIGTERM, and
  SIGKILL once ``terminationGracePeriodSeconds`` (default 30, counted from the start) is over;
  a pod deleted through the API is stopped the same way and the ReplicaSet controller
  replaces it;
- a template change rolls the pods, simplified from maxSurge/maxUnavailable 25 %: all the new
  pods are started at once (surge), the old ones stopped when as many new ones are ready;
- at most ``max_pods`` (16) pods per Deployment: beyond that the Deployment's status has a
  ``ReplicaFailure`` condition saying so.

Pods created through the API (not by a Deployment) whose image is BuildKit's (``moby/buildkit``,
or any image in ``builders``) are builds. The stand-in runs their init containers in order as
their images would, into the pod's volume folders: the AWS CLI's ``s3 cp s3://... PATH`` (the
object from ``objects``, an s3:// URI -> bytes or None) and the builder's ``tar -xzf ARCHIVE -C
DIR``; then what ``buildctl-daemonless.sh build`` does with ``docker/Dockerfile.model-server``
and the ``--local`` context (a volume of the container, else a folder of this machine: a
``dir://`` context): ``COPY ${MODEL_DIR} /models`` and, with ``MODEL_FILE``, ``sha256sum -c`` of
that file against ``MODEL_SHA256``; then it "pushes" the ``--output`` image's name (the tag, and
the repository at the digest the build reports, name a copy of the context's models folder, so
``images`` resolves them for Deployments afterwards); a build wrapped to copy its
``--metadata-file`` to the termination log ends with buildctl's metadata as that message;
writes the build log (read through the pod log endpoint; an init container's lines in it too)
and ends the pod Succeeded, or Failed with the reason in the log and the container's terminated
state. A command, flag or option it does not understand fails the build, saying which; the cache
flags are taken and nothing cached. Other bare pods fail at once, saying why.

Container logs are files of lines stamped as the container runtime stamps them (one file per
container start, rotated at 10 MiB), served by the API server's log endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

from devstack.cluster.kube import FakeKubeAPI, now_rfc3339
from devstack.processes import PORT_TRIES, PYTHONPATH, ROOT, free_port, port_holder, port_in_use, whose_port
from model_server.__main__ import admin_port_problem
from model_server.__main__ import parser as server_parser

log = logging.getLogger(__name__)

BUILDKIT_IMAGE_PREFIX = "moby/buildkit"
AWS_CLI_IMAGE_PREFIX = "amazon/aws-cli"
ADDRESS_ANNOTATION = "cluster.devstack/address"
ADMIN_ANNOTATION = "cluster.devstack/admin-address"  # the pod's --admin-port, when its args have one
IMAGE_CMD = ["--repository", "/models", "--state-dir", "/tmp/model-server-state"]  # noqa: S108 (the serving image CMD, a path in the container)
MAX_PODS_PER_DEPLOYMENT = 16
MAX_PODS = 64  # all Deployments together: each pod is a model-server process
MAX_ARGS = 128
MAX_ARG_CHARS = 4096
MAX_ENV = 128
MAX_LINE_BYTES = 64 * 1024
LOG_MAX_BYTES = 10 * 1024 * 1024  # kubelet's containerLogMaxSize default
MAX_CONTEXT_BYTES = 4 * 1024**3
MAX_CONTEXT_FILES = 100_000
BACKOFF_S, MAX_BACKOFF_S = 10.0, 300.0
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what the ReplicaSet controller draws pod suffixes from

ImageSource = Mapping[str, Path] | Callable[[str], "Path | None"]
ObjectSource = Callable[[str], "bytes | None"]


class ContainerError(Exception):
    """Why a container cannot start (kubelet's waiting reason and message)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class ContainerLog:
    """A container's log, as the container runtime keeps it: each line stamped with the time it
    was written (RFC 3339, nanoseconds), rotated (one old file kept) past ``LOG_MAX_BYTES``."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = threading.Lock()
        self.file = path.open("ab")

    def write(self, line: bytes | str) -> None:
        data = line.encode() if isinstance(line, str) else line
        with self.lock:
            if self.file.closed:
                return
            if self.file.tell() > LOG_MAX_BYTES:
                self.file.close()
                self.path.replace(self.path.with_suffix(".log.1"))
                self.file = self.path.open("ab")
            self.file.write(now_rfc3339(nanos=True).encode() + b" " + data.rstrip(b"\n") + b"\n")
            self.file.flush()

    def pump(self, stream: IO[bytes]) -> threading.Thread:
        """Copy a process's output here, line by line, until it closes (a daemon thread)."""

        def run() -> None:
            with stream:
                while line := stream.readline(MAX_LINE_BYTES):
                    self.write(line)
            self.close()

        thread = threading.Thread(target=run, daemon=True, name=f"log-{self.path.name}")
        thread.start()
        return thread

    def close(self) -> None:
        with self.lock:
            self.file.close()


@dataclass
class Pod:
    namespace: str
    name: str
    owner: str | None  # the Deployment's name; None for a pod created through the API (a build)
    template_hash: str
    labels: dict[str, str]
    spec: dict[str, Any]
    dir: Path
    port: int = 0
    admin_port: int = 0  # its --admin-port's, 0 without one
    created: float = field(default_factory=time.monotonic)
    proc: subprocess.Popen[bytes] | None = None
    log: ContainerLog | None = None
    restarts: int = 0
    started_at: str = ""
    ready: bool = False
    owns_port: bool = False  # its process listens on its port: not asked again until it is started again
    port_taken: bool = False  # another process holds its port (its probe, or its exit, said so): picked again
    admin_port_taken: bool = False  # another process holds its admin port (its exit said so): picked again
    ports_tried: list[int] = field(default_factory=list)  # the ports given up on since it last held one
    port_collisions: int = 0  # its restarts for a port taken (one or both at one exit) since it last held them
    pump: threading.Thread | None = None  # the copy of its process's output into its log
    probe_failures: int = 0
    next_probe: float = 0.0
    restart_at: float = 0.0
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    terminated: dict[str, Any] | None = None  # the container's end (builds, bare pods)
    last_state: dict[str, Any] = field(default_factory=dict)
    terminating: bool = False
    term_at: float = 0.0  # when SIGTERM goes, once its preStop hook ran (0: sent)
    kill_at: float = 0.0
    # its container's --admin-port as its server reads it (``_admin_arg``): read once, here
    admin_arg: int | str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.admin_arg = _admin_arg((self.spec.get("containers") or [{}])[0].get("args") or [])

    @property
    def container(self) -> dict[str, Any]:
        return dict(self.spec["containers"][0])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_path(self, restarts: int | None = None) -> Path:
        return self.dir / "logs" / f"{self.container['name']}-{self.restarts if restarts is None else restarts}.log"


PID_FILE = "container.pid"


def kill_orphans(workdir: Path) -> list[str]:
    """Kill (SIGKILL, its process group) every pod process a pod runner over ``workdir`` left
    behind: for when the runner's process was killed before it could stop its pods. A pid counts
    only while its process still runs in the pod's folder (no other process that took the number
    over is touched). The pods' names."""
    killed = []
    for pid_file in sorted(workdir.glob(f"pods/*/*/{PID_FILE}")):
        try:
            pid = int(pid_file.read_text())
            if Path(f"/proc/{pid}/cwd").resolve() != pid_file.parent.resolve():
                continue
            os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone meanwhile, or never a number
        killed.append(pid_file.parent.name)
    return killed


class PodRunner:
    """The kubelet and ReplicaSet controller of the one-machine cluster (see the module's doc)."""

    def __init__(
        self,
        api: FakeKubeAPI,
        workdir: Path,
        images: ImageSource,
        builders: Iterable[str] = (),
        gpu: bool | None = None,
        max_pods: int = MAX_PODS_PER_DEPLOYMENT,
        objects: ObjectSource | None = None,
    ):
        if not api.kubelet:
            raise ValueError(
                "the pod runner needs FakeKubeAPI(kubelet=True): without it Deployments report ready at once"
            )
        if gpu is None:
            from model_server.metrics import gpu_count

            gpu = gpu_count() > 0
        self.api, self.workdir, self.images, self.gpu = api, workdir, images, gpu
        self.builders = frozenset(builders)
        self.objects = objects  # where the build pods' s3:// contexts are
        self.max_pods = min(max_pods, MAX_PODS)
        self.pushed: dict[str, Path] = {}  # image tags the builds pushed
        self.pods: dict[tuple[str, str], Pod] = {}
        self.failures: dict[tuple[str, str], str] = {}  # a Deployment's ReplicaFailure message
        self.lock = threading.RLock()
        self.reconciling = threading.Lock()
        workdir.mkdir(parents=True, exist_ok=True)
        api.log_source = self.log_source

    # -- the loop ---------------------------------------------------------------------------

    def run_forever(self, stop: threading.Event, every_s: float = 0.5) -> None:
        """``reconcile()`` every ``every_s`` until ``stop`` is set; a failing round is logged and
        the next one tried (a cluster's controllers do not stop on one error)."""
        while not stop.is_set():
            try:
                self.reconcile()
            except Exception:
                log.exception("pod runner: reconcile failed")
            stop.wait(every_s)

    def reconcile(self) -> None:
        """One round: pods to match Deployments, builds started, processes tended, probes run,
        status written. Probes run outside the lock, so ``endpoints`` never waits on a slow pod."""
        with self.reconciling:
            with self.lock:
                deployments = self.api.list("deployments")
                live = {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in deployments}
                for key, deployment in live.items():
                    self._scale(key, deployment)
                for pod in self.pods.values():
                    if pod.owner is not None and (pod.namespace, pod.owner) not in live and not pod.terminating:
                        self._terminate(pod)  # its Deployment is gone
                self._adopt_created_pods()
                for pod in list(self.pods.values()):
                    self._tend(pod)
                due = [
                    p
                    for p in self.pods.values()
                    if p.running and not p.terminating and time.monotonic() >= p.next_probe
                ]
            results = {(p.namespace, p.name): self._probe(p) for p in due}
            with self.lock:
                for key, ok in results.items():
                    probed = self.pods.get(key)
                    if probed is not None and probed.running and not probed.terminating:
                        self._record_probe(probed, ok)
                for pod in self.pods.values():
                    self.api.set_status("pods", pod.namespace, pod.name, self._pod_status(pod))
                for (namespace, name), deployment in live.items():
                    self.api.set_status("deployments", namespace, name, self._deployment_status(deployment))

    def stop(self) -> None:
        """Every pod process stopped by its pid: SIGTERM, then SIGKILL past its grace period."""
        with self.lock:
            pods = list(self.pods.values())
            for pod in pods:
                pod.ready = False
                if pod.running:
                    assert pod.proc is not None
                    pod.proc.send_signal(signal.SIGTERM)
                    pod.kill_at = time.monotonic() + self._grace(pod)
        for pod in pods:
            if pod.proc is not None:
                try:
                    pod.proc.wait(timeout=max(0.0, pod.kill_at - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pod.proc.kill()
                    pod.proc.wait(timeout=10)
            if pod.log is not None:
                pod.log.close()

    # -- what others read ---------------------------------------------------------------------

    def endpoints(self, namespace: str, labels: Mapping[str, str], admin: bool = False) -> list[str]:
        """``127.0.0.1:port`` of the ready pods, not being stopped, whose labels include ``labels``
        (a Service's endpoints, for the data plane); with ``admin``, their admin ports' (a pod's
        IP with its admin port, which no Service exposes: fault injection in tests)."""
        with self.lock:
            return sorted(
                f"127.0.0.1:{p.admin_port}" if admin else p.address
                for p in self.pods.values()
                if p.namespace == namespace
                and p.ready
                and not p.terminating
                and all(p.labels.get(k) == v for k, v in labels.items())
            )

    def write_file_sd(self, path: Path) -> None:
        """Prometheus file-based service discovery of the model-server pods, written atomically
        (a temporary file renamed over ``path``), as ``kubernetes_sd_configs`` role ``pod`` finds
        them: every pod whose process runs, ready or not, one target per container port, with the
        ``__meta_kubernetes_*`` labels that role gives (namespace, pod name, IP and readiness, the
        container and port, each pod label as ``__meta_kubernetes_pod_label_<name>`` with
        characters other than ``[a-zA-Z0-9_]`` as ``_``, and ``..._labelpresent_<name>``). The
        scrape job's own relabelling (``deploy/prometheus/scrape-config.yaml``) makes the labels."""
        with self.lock:
            groups = [
                {
                    "targets": [f"127.0.0.1:{port}"],
                    "labels": {
                        "__meta_kubernetes_namespace": p.namespace,
                        "__meta_kubernetes_pod_name": p.name,
                        "__meta_kubernetes_pod_ip": "127.0.0.1",
                        "__meta_kubernetes_pod_ready": str(p.ready).lower(),
                        "__meta_kubernetes_pod_container_name": p.container["name"],
                        "__meta_kubernetes_pod_container_port_name": port_name,
                        "__meta_kubernetes_pod_container_port_number": str(port),
                        **{
                            f"__meta_kubernetes_pod_label_{_prometheus_name(k)}": v for k, v in sorted(p.labels.items())
                        },
                        **{f"__meta_kubernetes_pod_labelpresent_{_prometheus_name(k)}": "true" for k in p.labels},
                    },
                }
                for p in sorted(self.pods.values(), key=lambda p: (p.namespace, p.name))
                if p.owner is not None and p.running
                for port_name, port in _ports(p)
            ]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(groups, indent=1))
        tmp.replace(path)

    def log_source(self, namespace: str, name: str, container: str, previous: bool) -> Path | None:
        """The file the API server's log endpoint reads for a container (its previous start's
        with ``previous``)."""
        with self.lock:
            pod = self.pods.get((namespace, name))
            if pod is None or pod.container["name"] != container:
                return None
            if previous:
                return pod.log_path(pod.restarts - 1) if pod.restarts else None
            return pod.log_path()

    def resolve(self, image: str) -> Path | None:
        """The repository folder of an image: one a build pushed (by tag, or by digest whatever
        the tag beside it says, as a registry pulls), else the runner's ``images``."""
        name, at, digest = image.partition("@")
        if at and f"{_repository(name)}@{digest}" in self.pushed:
            return self.pushed[f"{_repository(name)}@{digest}"]
        if image in self.pushed:
            return self.pushed[image]
        if callable(self.images):
            return self.images(image)
        return self.images.get(image)

    # -- the ReplicaSet controller ----------------------------------------------------------------

    def _scale(self, key: tuple[str, str], deployment: dict[str, Any]) -> None:
        spec = deployment["spec"]
        wanted = spec.get("replicas", 1)
        if wanted > self.max_pods:
            self.failures[key] = (
                f"spec.replicas {wanted} is more than the {self.max_pods} pods per Deployment this "
                f"one-machine cluster runs; {self.max_pods} run"
            )
            wanted = self.max_pods
        else:
            self.failures.pop(key, None)
        template_hash = _template_hash(spec["template"])
        mine = [p for p in self.pods.values() if (p.namespace, p.owner) == key and not p.terminating]
        current = sorted((p for p in mine if p.template_hash == template_hash), key=lambda p: p.created)
        for pod in current[wanted:][::-1]:  # the newest first
            self._terminate(pod)
        for _ in range(wanted - len(current)):
            if sum(1 for p in self.pods.values() if p.owner is not None) >= MAX_PODS:
                self.failures[key] = f"this one-machine cluster runs at most {MAX_PODS} pods in all"
                break
            self._create(deployment, template_hash)
        if wanted == 0 or sum(p.ready for p in current[:wanted]) >= wanted:
            for pod in mine:
                if pod.template_hash != template_hash:
                    self._terminate(pod)  # the rollout's old pods, once the new ones are ready

    def _create(self, owner: dict[str, Any], template_hash: str) -> None:
        namespace, deployment = owner["metadata"]["namespace"], owner["metadata"]["name"]
        template = owner["spec"]["template"]
        replica_set = f"{deployment}-{template_hash}"  # not stored: the pods' owner in name only
        replica_set_uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{owner['metadata'].get('uid')}/{template_hash}"))
        labels = {**(template.get("metadata") or {}).get("labels", {}), "pod-template-hash": template_hash}
        port = free_port()
        name = f"{deployment}-{''.join(secrets.choice(NAME_CHARS) for _ in range(5))}"
        spec = {**template["spec"], "nodeName": "one-machine"}
        pod = Pod(
            namespace, name, deployment, template_hash, labels, spec, self.workdir / "pods" / namespace / name, port
        )
        # (none where the server refuses its value: its container refused at its start)
        admin_port = pod.admin_port = _port_besides(port) if isinstance(pod.admin_arg, int) else 0
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {
                    **(template.get("metadata") or {}).get("annotations", {}),
                    ADDRESS_ANNOTATION: f"127.0.0.1:{port}",
                    **({ADMIN_ANNOTATION: f"127.0.0.1:{admin_port}"} if admin_port else {}),
                },
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": replica_set,
                        "uid": replica_set_uid,
                        "controller": True,
                    }
                ],
            },
            "spec": spec,
        }
        pod.spec = self.api.create("pods", namespace, body)["spec"]  # (the API's copy: the same args)
        self.pods[(namespace, name)] = pod

    def _adopt_created_pods(self) -> None:
        """Pods created through the API (the KubernetesPodOperator's): builds, or refused."""
        for obj in self.api.list("pods"):
            meta = obj["metadata"]
            key = (meta["namespace"], meta["name"])
            if key in self.pods or "deletionTimestamp" in meta or (obj.get("status") or {}).get("phase") != "Pending":
                continue
            pod = Pod(*key, None, "", meta.get("labels") or {}, obj["spec"], self.workdir / "pods" / key[0] / key[1])
            self.pods[key] = pod
            image = pod.container["image"]
            if not self._builder(image):
                pod.waiting = None
                pod.terminated = _terminated(
                    128,
                    "ContainerCannotRun",
                    f"image {image!r}: this one-machine cluster runs a pod created by itself only for a build "
                    f"({BUILDKIT_IMAGE_PREFIX} or {sorted(self.builders)}); model servers run from Deployments",
                )

    def _builder(self, image: str) -> bool:
        return image.startswith(BUILDKIT_IMAGE_PREFIX) or image in self.builders

    # -- the kubelet --------------------------------------------------------------------------------

    def _tend(self, pod: Pod) -> None:
        obj = self.api.get("pods", pod.namespace, pod.name)
        if not pod.terminating and (obj is None or "deletionTimestamp" in obj["metadata"]):
            self._terminate(pod)
        if pod.terminating:
            if pod.term_at and time.monotonic() >= pod.term_at:
                pod.term_at = 0.0
                if pod.running:
                    assert pod.proc is not None
                    pod.proc.send_signal(signal.SIGTERM)
            if pod.running and time.monotonic() >= pod.kill_at:
                assert pod.proc is not None
                pod.proc.kill()
            if not pod.running:
                if pod.proc is not None:
                    pod.proc.wait()
                if pod.log is not None:
                    pod.log.close()
                self.api.remove("pods", pod.namespace, pod.name)
                del self.pods[(pod.namespace, pod.name)]
            return
        if pod.terminated is not None:
            return
        if pod.owner is None:
            if pod.waiting is not None:
                self._start_build(pod)
            return
        if pod.proc is not None and not pod.running:
            self._exited(pod)
        if pod.port_taken or pod.admin_port_taken:
            self._port_again(pod)
        if pod.proc is None and time.monotonic() >= pod.restart_at:
            self._start(pod)

    def _exited(self, pod: Pod) -> None:
        assert pod.proc is not None
        code = pod.proc.returncode if pod.proc.returncode >= 0 else 128 - pod.proc.returncode  # 137: SIGKILL
        pod.last_state = {
            "terminated": {
                **_terminated(code, "Error" if code else "Completed", "")["terminated"],
                "startedAt": pod.started_at,
            }
        }
        if pod.pump is not None:  # (its last lines, which may say why it exited)
            pod.pump.join(timeout=2)
        with contextlib.suppress(OSError), pod.log_path().open("rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 3000, 0))
            text = f.read().decode(errors="replace")
            pod.port_taken |= port_in_use(text, pod.port)
            pod.admin_port_taken |= bool(pod.admin_port) and port_in_use(text, pod.admin_port)
        pod.proc, pod.ready, pod.owns_port, pod.probe_failures = None, False, False, 0
        delay = min(BACKOFF_S * 2 ** (pod.restarts - 1), MAX_BACKOFF_S) if pod.restarts else 0.0
        pod.restart_at = time.monotonic() + delay
        if delay:
            message = f"back-off {delay:g}s restarting failed container={pod.container['name']} pod={pod.name}"
            pod.waiting = ("CrashLoopBackOff", message)

    def _port_again(self, pod: Pod) -> None:
        """Another process holds the pod's port or its admin port (one the cluster picked free when
        it made the pod, bound by another before its server did): its process stopped and started
        on that port picked again (no back-off), with its address (or admin address) annotation;
        PORT_TRIES tries in all, as on_a_free_port, each a restart whether one port or both were
        taken at its exit, counted since its process last listened on ports of its own (its probe
        saw it)."""
        taken = [
            port
            for port, by_another in ((pod.port, pod.port_taken), (pod.admin_port, pod.admin_port_taken))
            if by_another
        ]
        pod.port_taken = pod.admin_port_taken = False
        if pod.proc is not None:
            pod.proc.kill()
            pod.proc.wait()
            pod.proc, pod.ready, pod.owns_port, pod.probe_failures = None, False, False, 0
        pod.ports_tried += taken
        pod.port_collisions += 1  # (a restart, not a port: both taken at one exit count one try)
        if pod.port_collisions >= PORT_TRIES:
            tried = ", ".join(map(str, pod.ports_tried))
            pod.waiting = ("PortTaken", f"ports {tried} tried: each held by another process on this machine")
            pod.restart_at = math.inf
            return
        annotations = {}
        if pod.port in taken:  # (never its other port: free while its process is down)
            pod.port = _port_besides(pod.admin_port)
            annotations[ADDRESS_ANNOTATION] = pod.address
        if pod.admin_port in taken:
            pod.admin_port = _port_besides(pod.port)
            annotations[ADMIN_ANNOTATION] = f"127.0.0.1:{pod.admin_port}"
        self.api.patch_pod(pod.namespace, pod.name, {"metadata": {"annotations": annotations}})
        pod.waiting, pod.restart_at = ("ContainerCreating", ""), time.monotonic()

    def _start(self, pod: Pod) -> None:
        try:
            argv, env = self._command(pod)
        except ContainerError as exc:
            pod.waiting = (exc.reason, exc.message)
            return
        if pod.last_state:
            pod.restarts += 1
        pod.log = ContainerLog(pod.log_path())
        (pod.dir / "tmp").mkdir(parents=True, exist_ok=True)
        pod.owns_port = False
        pod.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=pod.dir, start_new_session=True
        )
        (pod.dir / PID_FILE).write_text(str(pod.proc.pid))  # for kill_orphans, should this process die first
        assert pod.proc.stdout is not None
        pod.pump = pod.log.pump(pod.proc.stdout)
        pod.started_at, pod.waiting, pod.next_probe = now_rfc3339(), None, 0.0

    def _command(self, pod: Pod) -> tuple[list[str], dict[str, str]]:
        """The model-server command line and environment of the pod's container; ContainerError
        when kubelet could not start it (no image, no Secret, a command it cannot run)."""
        container = pod.container
        if container.get("command"):
            raise ContainerError(
                "CreateContainerError",
                "command is not supported here: the serving image's entrypoint (the model server) runs, with args",
            )
        image = container["image"]
        repository = self.resolve(image)
        if repository is None or not repository.is_dir():
            raise ContainerError(
                "ErrImagePull", f'image "{image}" is not in this cluster: push it with a build pod or name it in images'
            )
        args = list(container.get("args") or IMAGE_CMD)
        if len(args) > MAX_ARGS or any(len(a) > MAX_ARG_CHARS for a in args):
            raise ContainerError(
                "CreateContainerError", f"at most {MAX_ARGS} args of at most {MAX_ARG_CHARS} characters each"
            )
        if isinstance(refused := pod.admin_arg, str):  # (as the model server's own parse of its args exits)
            raise ContainerError(
                "CreateContainerError",
                f"pod {pod.namespace}/{pod.name}: its container's args are refused by the model server: {refused}",
            )
        paths = {"/models": repository, "/tmp": pod.dir / "tmp", **self._volumes(pod)}  # noqa: S108 (the container path)
        argv = [*_translate(args, paths, self.gpu), "--host", "127.0.0.1", "--port", str(pod.port)]
        if pod.admin_port:  # the pod's own, as its IP is
            argv += ["--admin-port", str(pod.admin_port)]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(pod.dir / "tmp"),
            "HOSTNAME": pod.name,
            "PYTHONPATH": PYTHONPATH,
            "ORT_DISABLE_TELEMETRY": "1",
            **self._env(pod),
        }
        return [sys.executable, "-m", "model_server", *argv], env

    def _volumes(self, pod: Pod, container: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Each volume the container (the pod's first by default) mounts, by its ``mountPath``:
        ``emptyDir`` a folder of the pod (shared by its containers), ``secret`` with its keys as
        files. ContainerError (kubelet's mount failure) when a Secret is missing."""
        volumes = {v.get("name"): v for v in pod.spec.get("volumes") or []}
        paths = {}
        for mount in (container or pod.container).get("volumeMounts") or []:
            volume = volumes.get(mount.get("name"))
            if volume is None:
                raise ContainerError("CreateContainerConfigError", f"volume {mount.get('name')!r} is not in the pod")
            folder = pod.dir / "volumes" / volume["name"]
            if "secret" in volume:
                secret_name = volume["secret"].get("secretName", "")
                data = self._secret(pod.namespace, secret_name)
                if data is None:
                    if volume["secret"].get("optional"):
                        data = {}
                    else:
                        raise ContainerError(
                            "ContainerCreating",
                            f'MountVolume.SetUp failed for volume "{volume["name"]}" : secret "{secret_name}" not found',
                        )
                items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    target = (folder / item["path"]).resolve()
                    if not target.is_relative_to(folder.resolve()) or item["key"] not in data:
                        raise ContainerError(
                            "ContainerCreating", f'secret "{secret_name}" has no key {item["key"]!r} or a bad path'
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data[item["key"]])
            elif "emptyDir" not in volume:
                raise ContainerError(
                    "CreateContainerConfigError", f"volume {volume['name']!r}: only emptyDir and secret volumes here"
                )
            folder.mkdir(parents=True, exist_ok=True)
            paths[str(mount["mountPath"]).rstrip("/")] = folder
        return paths

    def _secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        import base64

        obj = self.api.get("secrets", namespace, name)
        if obj is None:
            return None
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def _env(self, pod: Pod) -> dict[str, str]:
        entries = pod.container.get("env") or []
        sources = pod.container.get("envFrom") or []
        if len(entries) + len(sources) > MAX_ENV:
            raise ContainerError("CreateContainerConfigError", f"{len(entries)} env entries, at most {MAX_ENV}")
        env = {}
        for source in sources:  # every key of a Secret, then env entries over them (kubelet's order)
            ref = source.get("secretRef")
            if ref is None:
                raise ContainerError("CreateContainerConfigError", "envFrom: only secretRef here")
            data = self._secret(pod.namespace, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ContainerError("CreateContainerConfigError", f'secret "{ref.get("name")}" not found')
            env.update({source.get("prefix", "") + k: v.decode(errors="replace") for k, v in data.items()})
        for entry in entries:
            name, source = entry.get("name", ""), entry.get("valueFrom")
            if source is None:
                env[name] = str(entry.get("value", ""))
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self._secret(pod.namespace, ref.get("name", ""))
                if data is None or ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    if data is None:
                        raise ContainerError("CreateContainerConfigError", f'secret "{ref.get("name")}" not found')
                    raise ContainerError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref.get('key')} in Secret {pod.namespace}/{ref.get('name')}",
                    )
                env[name] = data[ref["key"]].decode(errors="replace")
            elif "fieldRef" in source:
                path = source["fieldRef"].get("fieldPath")
                fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "status.podIP": "127.0.0.1"}
                if path not in fields:
                    raise ContainerError(
                        "CreateContainerConfigError", f"env {name}: fieldRef {path!r} is not supported here"
                    )
                env[name] = fields[path]
            else:
                raise ContainerError(
                    "CreateContainerConfigError", f"env {name}: only value, secretKeyRef and fieldRef here"
                )
        return env

    def _terminate(self, pod: Pod) -> None:
        """Stop a pod: out of the endpoints (not ready, status written) first, then its
        ``preStop`` hook (``sleep N``, as an exec command or the ``sleep`` action), then SIGTERM;
        SIGKILL once the grace period, counted from the start, is over (kubelet's order)."""
        pod.terminating, pod.ready = True, False
        self.api.set_status("pods", pod.namespace, pod.name, self._pod_status(pod))
        obj = self.api.get("pods", pod.namespace, pod.name)
        if obj is not None and "deletionTimestamp" not in obj["metadata"]:
            self.api.delete("pods", pod.namespace, pod.name)
        now = time.monotonic()
        pod.kill_at = now + self._grace(pod)
        pod.term_at = now + min(_pre_stop_sleep(pod.container), self._grace(pod))
        if pod.term_at <= now:  # no hook: SIGTERM now
            pod.term_at = 0.0
            if pod.running:
                assert pod.proc is not None
                pod.proc.send_signal(signal.SIGTERM)

    @staticmethod
    def _grace(pod: Pod) -> float:
        return float(pod.spec.get("terminationGracePeriodSeconds", 30))

    def _probe(self, pod: Pod) -> bool:
        """The pod's readiness probe: whose its port is asked first, until its process holds it
        (then its tries of ports are cleared); a pod without a readinessProbe is ready once
        started, its port asked after all the same. False where another process holds its port."""
        probe = pod.container.get("readinessProbe")
        proc = pod.proc
        if proc is None:
            return not probe
        if not pod.owns_port:  # (what answers on its port is another process's until it listens there)
            holder = whose_port(proc, pod.port)
            if holder == "another":
                pod.port_taken = True
                return False
            if not holder:  # ("unknown": asked, as before)
                return not probe
            # Its own once it holds its admin port too (bound just after: until then, asked again).
            pod.owns_port = holder is True and (not pod.admin_port or port_holder(proc.pid, pod.admin_port) is True)
            if pod.owns_port:  # (on ports of its own: a later collision has its tries anew)
                pod.ports_tried.clear()
                pod.port_collisions = 0
        if not probe:
            return True
        path = (probe.get("httpGet") or {}).get("path", "/")
        timeout = min(float(probe.get("timeoutSeconds", 1)), 1.0)
        try:
            with urllib.request.urlopen(f"http://{pod.address}{path}", timeout=timeout) as r:
                return 200 <= r.status < 400
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _record_probe(self, pod: Pod, ok: bool) -> None:
        probe = pod.container.get("readinessProbe") or {}
        pod.next_probe = time.monotonic() + min(float(probe.get("periodSeconds", 10)), 1.0)
        pod.probe_failures = 0 if ok else pod.probe_failures + 1
        if ok:
            pod.ready = True
        elif pod.probe_failures >= int(probe.get("failureThreshold", 3)) or not pod.ready:
            pod.ready = False

    # -- status -----------------------------------------------------------------------------------

    def _pod_status(self, pod: Pod) -> dict[str, Any]:
        container = pod.container
        if pod.terminated is not None:
            state: dict[str, Any] = pod.terminated
            phase = "Succeeded" if pod.terminated["terminated"]["exitCode"] == 0 else "Failed"
        elif pod.running or (pod.owner is None and pod.waiting is None):
            state, phase = {"running": {"startedAt": pod.started_at}}, "Running"
        else:
            reason, message = pod.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
            phase = "Running" if pod.last_state else "Pending"
        ready = "True" if pod.ready and not pod.terminating else "False"
        return {
            "phase": phase,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": ready},
                {"type": "Ready", "status": ready},
            ],
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": ready == "True",
                    "started": "running" in state,
                    "restartCount": pod.restarts,
                    "state": state,
                    "lastState": pod.last_state,
                }
            ],
        }

    def _deployment_status(self, deployment: dict[str, Any]) -> dict[str, Any]:
        meta, spec = deployment["metadata"], deployment["spec"]
        key = (meta["namespace"], meta["name"])
        wanted = spec.get("replicas", 1)
        template_hash = _template_hash(spec["template"])
        pods = [p for p in self.pods.values() if (p.namespace, p.owner) == key and not p.terminating]
        ready = sum(p.ready for p in pods)
        counts = {
            "replicas": len(pods),
            "updatedReplicas": sum(p.template_hash == template_hash for p in pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(0, wanted - ready),
        }
        available = ready >= wanted
        conditions = [
            {
                "type": "Available",
                "status": "True" if available else "False",
                "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable",
                "message": "Deployment has minimum availability."
                if available
                else "Deployment does not have minimum availability.",
            },
            {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated", "message": ""},
        ]
        if key in self.failures:
            conditions.append(
                {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": self.failures[key]}
            )
        # As the real server, zero counts are left out.
        return {
            "observedGeneration": meta.get("generation", 1),
            **{k: v for k, v in counts.items() if v},
            "conditions": conditions,
        }

    # -- the build stand-in -------------------------------------------------------------------------

    def _containers(self, pod: Pod) -> list[dict[str, Any]]:
        """The pod's init containers, in order, then its build container."""
        return [*(pod.spec.get("initContainers") or []), pod.container]

    def _start_build(self, pod: Pod) -> None:
        try:  # every container's volumes mounted first, as kubelet does: the push Secret must be there
            steps = [(container, self._volumes(pod, container)) for container in self._containers(pod)]
        except ContainerError as exc:
            pod.waiting = (exc.reason, exc.message)
            return
        pod.log = ContainerLog(pod.log_path())
        pod.started_at, pod.waiting = now_rfc3339(), None
        threading.Thread(target=self._build, args=(pod, steps), daemon=True, name=f"build-{pod.name}").start()

    def _build(self, pod: Pod, steps: list[tuple[dict[str, Any], dict[str, Path]]]) -> None:
        assert pod.log is not None
        say = pod.log.write
        *inits, (build, mounts) = steps
        try:
            for init, init_mounts in inits:
                self._run_init(init, init_mounts, say)
            pushed, folder, message = build_model_image(
                build.get("command") or [],
                build.get("args") or [],
                mounts,
                self.workdir / "images",
                say,
                build.get("terminationMessagePath") or TERMINATION_LOG,
            )
        except BuildError as exc:
            say(f"error: {exc}")
            end = _terminated(1, "Error", str(exc))
        else:
            with self.lock:
                for reference in pushed:
                    self.pushed[reference] = folder
            end = _terminated(0, "Completed", message)
        end["terminated"]["startedAt"] = pod.started_at
        pod.log.close()
        with self.lock:
            pod.terminated = end

    def _run_init(self, container: Mapping[str, Any], mounts: Mapping[str, Path], say: Callable[[str], None]) -> None:
        """An init container of a build pod, as its image would run it (see the module's doc)."""
        name, image = container.get("name", ""), str(container.get("image", ""))
        argv = [*(container.get("command") or []), *(container.get("args") or [])]

        def on_volume(path: str) -> Path:
            local = _on_volume(path, mounts)
            if local is None:
                raise BuildError(f"init container {name}: {path} is on no volume: it ends with the container")
            return local

        if image.startswith(AWS_CLI_IMAGE_PREFIX) and not container.get("command"):
            options, (source, target) = argv[2:-2], argv[-2:] if len(argv) >= 4 else ("", "")
            if argv[:2] != ["s3", "cp"] or not source.startswith("s3://") or set(options) - AWS_CP_OPTIONS:
                raise BuildError(
                    f"init container {name}: aws {' '.join(argv)}: only `s3 cp [--no-progress] s3://... PATH` here"
                )
            if self.objects is None:
                raise BuildError(f"init container {name}: this cluster has no object store for {source}")
            data = self.objects(source)
            if data is None:
                raise BuildError(
                    f"init container {name}: fatal error: An error occurred (404) when calling the HeadObject "
                    f"operation: Key {source.removeprefix('s3://').partition('/')[2]!r} does not exist"
                )
            local = on_volume(target)
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
            say(f"download: {source} to {target}")
        elif self._builder(image) and len(argv) == 5 and argv[:2] == ["tar", "-xzf"] and argv[3] == "-C":
            archive, folder = on_volume(argv[2]), on_volume(argv[4])
            if not folder.is_dir():
                raise BuildError(f"init container {name}: tar: can't change directory to '{argv[4]}'")
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    members = tar.getmembers()
                    if len(members) > MAX_CONTEXT_FILES or sum(m.size for m in members) > MAX_CONTEXT_BYTES:
                        raise BuildError(f"init container {name}: {argv[2]}: more than this cluster unpacks")
                    tar.extractall(folder, filter="data")
            except (OSError, tarfile.TarError) as exc:
                raise BuildError(f"init container {name}: tar: {argv[2]}: {exc}") from None
        else:
            raise BuildError(
                f"init container {name} ({image}: {' '.join(argv)}): this cluster runs only the AWS CLI's "
                "`s3 cp s3://... PATH` and the builder's `tar -xzf ARCHIVE -C DIR` before a build"
            )


class BuildError(Exception):
    """Why a build failed (the last words of its log)."""


AWS_CP_OPTIONS = {"--no-progress", "--only-show-errors", "--quiet"}
BUILDCTL_FLAGS = {"progress", "frontend", "local", "opt", "output", "import-cache", "export-cache", "metadata-file"}
TERMINATION_LOG = "/dev/termination-log"  # a container's terminationMessagePath by default
# The one wrapper taken: buildctl-daemonless.sh with the container's args, then its metadata file
# copied to the termination log (the pushed digest, for the pod's status).
REPORTING_BUILD = re.compile(r'buildctl-daemonless\.sh "\$@" && cat (\S+) > (\S+)')
SHA256_CHECK = (
    'RUN if [ -n "$MODEL_FILE" ]; then echo "$MODEL_SHA256  /models/${MODEL_FILE#"${MODEL_DIR}"/}" | sha256sum -c -; fi'
)


def copy_build_sources(context: Path) -> None:
    """What a build context of ``docker/Dockerfile.model-server`` holds beside the models (the
    files its COPY instructions read): the Dockerfile, the model server and the constraints."""
    (context / "docker").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "docker" / "Dockerfile.model-server", context / "docker")
    shutil.copy2(ROOT / "constraints.txt", context)
    shutil.copytree(
        ROOT / "model_server",
        context / "model_server",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__"),
    )


def build_model_image(
    command: list[str],
    args: list[str],
    mounts: Mapping[str, Path],
    images: Path,
    say: Callable[[str], None],
    termination_log: str = TERMINATION_LOG,
) -> tuple[list[str], Path, str]:
    """What ``buildctl-daemonless.sh build`` (the ``dockerfile.v0`` frontend) does with
    ``docker/Dockerfile.model-server`` and these ``args``, on this machine: the ``--local``
    context (``mounts``: the container's volumes by mount path; any other path is this machine's)
    read, its models folder copied (``COPY ${MODEL_DIR} /models``), the baked candidate's sha256
    checked (``sha256sum -c``), the result kept as a folder under ``images`` for the ``--output``
    image's name. Returns (what was pushed: the tag and ``<repository>@<digest>``, the folder,
    the termination message: buildctl's ``--metadata-file`` where the command copies it to
    ``termination_log``, else empty); BuildError says why not.

    The command is ``buildctl-daemonless.sh``, or ``sh -c 'buildctl-daemonless.sh "$@" && cat
    METADATA > TERMINATION_LOG' NAME`` where METADATA is the ``--metadata-file`` and
    TERMINATION_LOG the container's ``terminationMessagePath``."""
    if len(args) > MAX_ARGS or any(len(a) > MAX_ARG_CHARS for a in args):
        raise BuildError(f"at most {MAX_ARGS} args of at most {MAX_ARG_CHARS} characters each")
    reporting = REPORTING_BUILD.fullmatch(command[2]) if len(command) == 4 and command[:2] == ["sh", "-c"] else None
    if (command != ["buildctl-daemonless.sh"] and reporting is None) or args[:1] != ["build"]:
        raise BuildError(
            f"{' '.join([*command, *args[:1]])!r}: a build here is `buildctl-daemonless.sh build ...`, or that "
            "in `sh -c 'buildctl-daemonless.sh \"$@\" && cat METADATA > TERMINATION_LOG' NAME build ...`"
        )
    flags: dict[str, list[str]] = {}
    rest = iter(args[1:])
    for arg in rest:
        if not arg.startswith("--"):
            raise BuildError(f"unexpected argument {arg!r}")
        name, sep, value = arg[2:].partition("=")
        if name not in BUILDCTL_FLAGS:
            raise BuildError(
                f"flag --{name}: this stand-in of buildctl build understands --{', --'.join(sorted(BUILDCTL_FLAGS))}"
            )
        flags.setdefault(name, []).append(value if sep else next(rest, ""))
    if flags.get("frontend") != ["dockerfile.v0"]:
        raise BuildError(f"--frontend {flags.get('frontend')}: only dockerfile.v0 builds here")
    opts: dict[str, str] = {}
    for opt in flags.get("opt") or []:
        key, _, value = opt.partition("=")
        if key == "context":
            raise BuildError(f"--opt context={value}: no git or https context can be reached from this machine")
        if key != "filename" and not key.startswith("build-arg:"):
            raise BuildError(f"--opt {key}: this stand-in takes filename and build-arg:NAME")
        opts[key] = value
    local = dict(entry.partition("=")[::2] for entry in flags.get("local") or [])
    if set(local) - {"context", "dockerfile"} or "context" not in local:
        raise BuildError(f"--local {sorted(local)}: a build here reads --local context=DIR (and dockerfile=DIR)")
    context = _on_volume(local["context"], mounts) or Path(local["context"])  # dir://: this machine's
    if not context.is_dir():
        raise BuildError(f"--local context={local['context']}: no such folder")
    metadata_file = (flags.get("metadata-file") or [""])[-1]
    if reporting is not None and reporting.groups() != (metadata_file, termination_log):
        raise BuildError(
            f"sh -c {command[2]!r}: copies {reporting[1]} to {reporting[2]}, not --metadata-file "
            f"{metadata_file or '(none)'} to the terminationMessagePath {termination_log}"
        )
    output = dict(field.partition("=")[::2] for field in (flags.get("output") or [""])[-1].split(","))
    if output.get("type") != "image" or output.get("push") != "true" or not output.get("name"):
        raise BuildError(f"--output {flags.get('output')}: a build here pushes: type=image,name=TAG,push=true")
    for ref in [*(flags.get("import-cache") or []), *(flags.get("export-cache") or [])]:
        if "type=registry" not in ref.split(","):
            raise BuildError(f"cache {ref!r}: only type=registry here")
    filename = opts.get("filename", "Dockerfile")
    folder = local.get("dockerfile", local["context"])
    dockerfile = (_on_volume(folder, mounts) or Path(folder)) / filename
    say(f"#1 [internal] load build definition from {filename}")
    if not dockerfile.is_file():
        raise BuildError(f"failed to solve: failed to read dockerfile: open {filename}: no such file or directory")
    if dockerfile.name != "Dockerfile.model-server":
        raise BuildError(f"--opt filename={filename}: this stand-in builds only docker/Dockerfile.model-server")
    build_args = {k.removeprefix("build-arg:"): v for k, v in opts.items() if k.startswith("build-arg:")}
    model_dir = build_args.get("MODEL_DIR") or "models"
    # Every COPY from the context needs its sources there, as BuildKit computes their cache keys.
    for line in re.findall(r"^COPY (.+)$", re.sub(r"\\\n", " ", dockerfile.read_text()), re.M):
        if "--from=" in line:
            continue
        for src in [a for a in line.split() if not a.startswith("--")][:-1]:
            path = src.replace("${MODEL_DIR}", model_dir).strip("/")
            if not (context / path).resolve().is_relative_to(context.resolve()) or not (context / path).exists():
                raise BuildError(f'failed to solve: failed to compute cache key: "/{path}": not found')
    source = (context / model_dir).resolve()
    say(f"#2 [models 1/2] COPY {model_dir} /models")
    if not source.is_relative_to(context.resolve()) or not source.is_dir():
        raise BuildError(f'failed to solve: failed to compute cache key: "/{model_dir}": not found')
    files = [p for p in source.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if len(files) > MAX_CONTEXT_FILES or size > MAX_CONTEXT_BYTES:
        raise BuildError(f"COPY {model_dir}: {len(files)} files, {size} bytes: more than this cluster copies")
    model_file = build_args.get("MODEL_FILE", "")
    if model_file:
        inside = model_file.removeprefix(f"{model_dir}/")
        candidate = (source / inside).resolve()
        say(f"#3 [models 2/2] {SHA256_CHECK}")
        if not candidate.is_relative_to(source) or not candidate.is_file():
            say(f"#3 0.012 sha256sum: /models/{inside}: No such file or directory")
            raise BuildError(f"failed to solve: /models/{inside} does not exist: exit code: 1")
        digest = hashlib.sha256()
        with candidate.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        if digest.hexdigest() != build_args.get("MODEL_SHA256", ""):
            say(f"#3 0.012 /models/{inside}: FAILED")
            say("#3 0.012 sha256sum: WARNING: 1 computed checksum did NOT match")
            raise BuildError(
                f"failed to solve: the sha256 of {model_file} is {digest.hexdigest()}, not MODEL_SHA256 "
                f"{build_args.get('MODEL_SHA256', '')!r}: exit code: 1"
            )
        say(f"#3 0.012 /models/{inside}: OK")
    images.mkdir(parents=True, exist_ok=True)
    tag = output["name"]
    image = images / f"{hashlib.sha256(tag.encode()).hexdigest()[:12]}-{secrets.token_hex(4)}"
    shutil.copytree(source, image)
    manifest = hashlib.sha256(f"{tag}\n{image.name}".encode())  # each build its own, as layers' timestamps make it
    pushed = f"sha256:{manifest.hexdigest()}"
    say("#4 exporting to image")
    say(f"#4 exporting manifest {pushed} done")
    say(f"#4 pushing manifest for {tag}@{pushed}")
    say("#4 DONE")
    metadata = {  # what buildctl writes with --metadata-file for an image export (keys sorted, indented)
        "containerimage.config.digest": f"sha256:{hashlib.sha256(manifest.digest()).hexdigest()}",
        "containerimage.descriptor": {
            "digest": pushed,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "size": 1062,
        },
        "containerimage.digest": pushed,
        "image.name": tag,
    }
    message = json.dumps(metadata, indent=2, sort_keys=True) if reporting is not None else ""
    return [tag, f"{_repository(tag)}@{pushed}"], image, message


def _repository(name: str) -> str:
    """An image name without its tag (``host:5000/ml/server:v1`` -> ``host:5000/ml/server``)."""
    head, colon, tag = name.rpartition(":")
    return head if colon and "/" not in tag else name


def _on_volume(path: str, mounts: Mapping[str, Path]) -> Path | None:
    """A container's path as this machine's, when it is on one of the container's volumes."""
    for mount in sorted(mounts, key=len, reverse=True):
        if path == mount or path.startswith(f"{mount}/"):
            local = (mounts[mount] / path[len(mount) :].lstrip("/")).resolve()
            return local if local.is_relative_to(mounts[mount].resolve()) else None  # no way out by ".."
    return None


def _translate(args: list[str], paths: Mapping[str, Path], gpu: bool) -> list[str]:
    """The container's args for a process here: container paths to the pod's folders, the
    address flags dropped (the runner gives its own), ``cuda`` to ``cpu`` without a GPU."""
    out: list[str] = []
    for arg in _without(args, ("--host", "--port", "--admin-port")):
        flag, sep, value = arg.partition("=")
        if sep and flag.startswith("--"):
            out.append(f"{flag}={_arg_value(flag, value, paths, gpu)}")
        else:
            out.append(_arg_value(out[-1] if out else "", arg, paths, gpu))
    return out


def _without(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """The args without each of ``flags`` (``--port 8000`` or ``--port=8000``) and its value."""
    out: list[str] = []
    rest = iter(args)
    for arg in rest:
        flag, sep, _ = arg.partition("=")
        if flag not in flags:
            out.append(arg)
        elif not sep:
            next(rest, None)
    return out


def _arg_value(flag: str, value: str, paths: Mapping[str, Path], gpu: bool) -> str:
    if flag == "--device" and value == "cuda" and not gpu:
        return "cpu"
    for mount in sorted(paths, key=len, reverse=True):
        if value == mount or value.startswith(f"{mount}/"):
            return str(paths[mount]) + value[len(mount) :]
    return value


def _terminated(code: int, reason: str, message: str) -> dict[str, Any]:
    now = now_rfc3339()
    return {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            **({"message": message[-4096:]} if message else {}),
            "startedAt": now,
            "finishedAt": now,
        }
    }


def _template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _pre_stop_sleep(container: Mapping[str, Any]) -> float:
    """The seconds a container's ``preStop`` hook sleeps: ``exec`` of ``sleep N`` or the
    ``sleep`` action; 0 without a hook. Another hook is not run here, and logged as such."""
    hook = (container.get("lifecycle") or {}).get("preStop")
    if not hook:
        return 0.0
    command = [str(c) for c in (hook.get("exec") or {}).get("command") or []]
    try:
        if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
            return max(0.0, float(command[1]))
        if "sleep" in hook:
            return max(0.0, float(hook["sleep"]["seconds"]))
    except (TypeError, ValueError, KeyError):
        pass
    log.warning("preStop hook %s is not run here (only sleep N)", json.dumps(hook)[:200])
    return 0.0


def _port_besides(other: int) -> int:
    """A port free now (``free_port``) that is not ``other``: a pod's other port, which is free too
    while its process is down or before it starts, and which its server refuses as both
    ("--admin-port N is --port")."""
    while (port := free_port()) == other:
        pass
    return port


class _ArgsRefused(Exception):
    """The model server's parser would exit here (a refusal other than a flag's, or its help)."""


class _ServerArgs(argparse.ArgumentParser):
    """The model server's parser, raising where it would exit: at a flag's refusal (argparse's
    ArgumentError, naming the flag), at another (printing its usage) or after its help (``-h``:
    printed by the server, not here; the runner is not to exit)."""

    def __init__(self, prog: str, description: str | None) -> None:
        super().__init__(prog=prog, description=description, exit_on_error=False)

    def error(self, message: str) -> NoReturn:
        raise _ArgsRefused

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _ArgsRefused

    def print_help(self, file: Any = None) -> None:
        pass


def _admin_arg(args: list[Any]) -> int | str | None:
    """A container's ``--admin-port`` as its model server reads it: read by the server's own
    parser (``model_server.__main__.parser``), so the last one given, an abbreviation
    (``--admin-po 9000``) and either form (``--admin-port=9000``) as the server reads them, in
    the args the server is given (``--host`` and ``--port`` dropped: the runner gives its own,
    and ``--port $(PORT)``, unexpanded here, is never read). The port (int); the parser's words
    (str) where it refuses the flag's value (none: the last arg, ``--admin-port=``, a flag after
    it; or no integer), its container refused at its start, no admin port; None without one (or
    where the parser stops at another arg before it, its server exiting at its start). A port
    the server refuses at its start (0, 70000) is refused in its words (``admin_port_problem``).
    Read once for a pod (``Pod.admin_arg``), for ``_create``, ``_ports`` and ``_command``."""
    read = argparse.Namespace()
    try:  # (what is read before a refusal stays in ``read``: --repository missing is refused last)
        server_parser(_ServerArgs).parse_known_args(_without([str(a) for a in args], ("--host", "--port")), read)
    except argparse.ArgumentError as refused:
        if refused.argument_name == "--admin-port":
            return str(refused)
    except _ArgsRefused:
        pass
    admin = getattr(read, "admin_port", None)
    if not isinstance(admin, int):
        return None
    return admin_port_problem(admin) or admin  # (a port the server refuses: 0, 70000)


def _ports(pod: Pod) -> list[tuple[str, int]]:
    """The container's declared ports as this pod has them: its ``--admin-port``'s (``_admin_arg``)
    is the pod's admin port, every other the data port (no ``ports``: the data port, unnamed)."""
    admin = pod.admin_arg
    declared = pod.container.get("ports") or [{}]
    return [
        (
            str(d.get("name", "")),
            pod.admin_port if isinstance(admin, int) and str(d.get("containerPort")) == str(admin) else pod.port,
        )
        for d in declared
    ]


def _prometheus_name(label: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in label)
