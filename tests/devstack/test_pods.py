"""The one-machine cluster's pod runner: Deployments run as model-server processes behind the
fake API server, seen through the official kubernetes client, ``VersionDeployments`` and the
cncf provider's KubernetesPodOperator (a BuildKit build pod run by the build stand-in)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client

from devstack import manifests, rbac
from devstack.cluster.install import apply_secret, pod_secrets
from devstack.cluster.kube import WORKER_USER, FakeKubeAPI
from devstack.cluster.pods import PodRunner, copy_build_sources, kill_orphans
from devstack.processes import alive
from model_server.__main__ import parser as server_parser
from vision_rollout.deploy import VersionDeployments, render_deployment
from vision_rollout.locks import FileLock
from vision_rollout.mesh import IstioTarget
from vision_rollout.settings import BUILDKIT_IMAGE, BuildSettings

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example.com/ml/digits-server:sha-0123456789ab"
TARGET = IstioTarget(namespace="models", service="digits", name="digits")
CPU = BuildSettings(gpus=0)


def with_secrets(api: FakeKubeAPI) -> FakeKubeAPI:
    """The Secrets every model-server pod of ``render_deployment`` mounts (admin token, keys)."""
    cfg = client.Configuration()
    cfg.host = api.url
    for name, data in pod_secrets(CPU, "admin-token").items():
        apply_secret(client.ApiClient(cfg), "models", name, data)
    return api


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    """``check()``'s first truthy value; fails naming ``what`` past a generous deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


@pytest.fixture
def cluster(tmp_path: Path, models_dir: Path) -> Iterator[tuple[FakeKubeAPI, PodRunner, client.ApiClient]]:
    api = with_secrets(FakeKubeAPI(kubelet=True).start())
    runner = PodRunner(api, tmp_path / "cluster", {IMAGE: models_dir}, gpu=False)
    stop = threading.Event()
    loop = threading.Thread(target=runner.run_forever, args=(stop, 0.2), daemon=True)
    loop.start()
    cfg = client.Configuration()
    cfg.host = api.url
    yield api, runner, client.ApiClient(cfg)
    stop.set()
    loop.join(timeout=30)
    runner.stop()
    api.stop()


def pods(api_client: client.ApiClient, selector: str = "app=digits") -> list[Any]:
    return client.CoreV1Api(api_client).list_namespaced_pod("models", label_selector=selector).items


def test_a_deployment_runs_ready_pods_that_restart_and_scale_to_zero(cluster, tmp_path):
    _api, runner, api_client = cluster
    versions = VersionDeployments(
        TARGET, "digits", api_client, BuildSettings(gpus=1)
    )  # asks for cuda: runs on CPU here
    versions.apply("2", IMAGE, replicas=2)
    versions.wait_ready("2", replicas=2, timeout_s=120, every_s=0.2)

    live = client.AppsV1Api(api_client).read_namespaced_deployment("digits-v2", "models")
    assert (live.status.ready_replicas, live.status.updated_replicas) == (2, 2)
    assert live.status.observed_generation == live.metadata.generation == 1
    addresses = runner.endpoints("models", {"app": "digits", "version": "2"})
    assert len(addresses) == 2
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    assert runner.endpoints("models", {"app": "digits", "version": "1"}) == []
    listed = pods(api_client, "app=digits,version=2")
    assert all(
        p.metadata.name.startswith("digits-v2-") and len(p.metadata.name) == len("digits-v2-") + 5 for p in listed
    )
    assert all(p.status.phase == "Running" and p.status.container_statuses[0].ready for p in listed)
    sd = tmp_path / "sd" / "pods.json"
    runner.write_file_sd(sd)
    groups = json.loads(sd.read_text())  # a target per declared port, with kubernetes_sd's labels
    data = [g for g in groups if g["labels"]["__meta_kubernetes_pod_container_port_name"] == "http"]
    assert sorted(g["targets"][0] for g in data) == addresses
    assert len(groups) == 2 * len(data)  # and the admin ports
    assert not set(addresses) & {g["targets"][0] for g in groups if g not in data}
    labels = [g["labels"] for g in data]
    assert {(x["__meta_kubernetes_pod_label_app"], x["__meta_kubernetes_pod_label_version"]) for x in labels} == {
        ("digits", "2")
    }
    assert {x["__meta_kubernetes_namespace"] for x in labels} == {"models"}
    assert {x["__meta_kubernetes_pod_name"] for x in labels} == {p.metadata.name for p in listed}
    assert all(x["__meta_kubernetes_pod_label_pod_template_hash"] for x in labels)
    assert all(x["__meta_kubernetes_pod_labelpresent_version"] == "true" for x in labels)

    victim = runner.pods[("models", listed[0].metadata.name)]
    pid = victim.proc.pid
    os.kill(pid, signal.SIGKILL)
    wait_for("the killed pod restarted", lambda: victim.restarts == 1 and victim.running)

    def restarted_and_ready() -> Any:  # (the status the round before wrote still says ready, restarted 0 times)
        status = next(p for p in pods(api_client) if p.metadata.name == victim.name).status.container_statuses[0]
        return status if status.restart_count and status.ready else None

    status = wait_for("the restarted pod ready again", restarted_and_ready)
    assert status.restart_count == 1
    assert status.last_state.terminated.exit_code == 128 + signal.SIGKILL  # as kubelet reports it
    assert len(runner.endpoints("models", {"version": "2"})) == 2

    pids = [p.proc.pid for p in runner.pods.values()]
    assert versions.scale_to_zero("2") is True
    wait_for("the pods gone after scaling to zero", lambda: not pods(api_client))
    assert not any(alive(p) for p in pids)
    assert runner.endpoints("models", {"app": "digits"}) == []
    live = client.AppsV1Api(api_client).read_namespaced_deployment("digits-v2", "models")
    assert live.metadata.generation == 2
    assert not live.status.ready_replicas


def test_pod_processes_left_by_a_killed_runner_are_found_and_killed(cluster, tmp_path):
    """`make cluster-down` kills the cluster's process past its wait: the pods (each in its own
    session) would outlive it. Their pid files find them; a pid file naming a process that runs
    elsewhere (its number reused) is left alone."""
    _api, runner, api_client = cluster
    VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0)).apply("2", IMAGE, replicas=1)
    wait_for("a pod running", lambda: any(p.running for p in runner.pods.values()))
    (pod,) = runner.pods.values()
    process = pod.proc  # the runner, alive here, starts another after the kill
    stranger = tmp_path / "cluster" / "pods" / "models" / "not-a-pod"
    stranger.mkdir(parents=True)
    (stranger / "container.pid").write_text(str(os.getpid()))  # this test's process: not in that folder
    assert kill_orphans(tmp_path / "cluster") == [pod.name]
    assert process.wait(timeout=30) == -signal.SIGKILL


def test_a_missing_secret_keeps_the_pod_waiting_with_the_reason(cluster):
    _api, runner, api_client = cluster
    body = render_deployment(TARGET, "digits", "2", IMAGE, replicas=1, build=CPU)
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "model-admin", "key": "token"}}}
    ]
    client.AppsV1Api(api_client).patch_namespaced_deployment(
        "digits-v2", "models", body, field_manager="test", _content_type="application/apply-patch+yaml"
    )
    waiting = wait_for(
        "the pod waiting for its Secret",
        lambda: [p.status.container_statuses[0].state.waiting for p in pods(api_client) if p.status.container_statuses],
    )[0]
    assert waiting.reason == "CreateContainerConfigError"
    assert waiting.message == 'secret "model-admin" not found'
    assert not any(p.proc for p in runner.pods.values())
    assert runner.endpoints("models", {"app": "digits"}) == []
    # Once the Secret exists (server-side apply), kubelet starts the container with its value.
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "model-admin", "namespace": "models"},
        "stringData": {"token": "s3cret"},
    }
    client.CoreV1Api(api_client).patch_namespaced_secret(
        "model-admin", "models", secret, field_manager="test", _content_type="application/apply-patch+yaml"
    )
    assert client.CoreV1Api(api_client).read_namespaced_secret("model-admin", "models").data == {"token": "czNjcmV0"}
    pod = wait_for("the container started", lambda: [p for p in runner.pods.values() if p.proc])[0]
    assert pod.container["env"][0]["name"] == "ADMIN_TOKEN"
    assert (pod.dir / "volumes" / "state").is_dir()  # the emptyDir behind --state-dir /state


def test_replicas_beyond_the_limit_are_reported_in_the_deployment_status(tmp_path, models_dir):
    api = with_secrets(FakeKubeAPI(kubelet=True).start())
    runner = PodRunner(api, tmp_path, {}, gpu=False, max_pods=1)  # no image: nothing starts
    try:
        body = render_deployment(TARGET, "digits", "2", IMAGE, replicas=3, build=CPU)
        api.apply("deployments", "models", "digits-v2", body, "test")
        runner.reconcile()
        status = api.get("deployments", "models", "digits-v2")["status"]
        (failure,) = [c for c in status["conditions"] if c["type"] == "ReplicaFailure"]
        assert "spec.replicas 3 is more than the 1 pods per Deployment" in failure["message"]
        (pod,) = api.list("pods", "models", "app=digits")
        assert pod["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
    finally:
        runner.stop()
        api.stop()


# -- the BuildKit build pod through the cncf provider's KubernetesPodOperator ---------------------


@pytest.fixture
def build_context(tmp_path: Path, models_dir: Path) -> Path:
    """A build context like the production one: what the Dockerfile copies, the candidate's model."""
    context = tmp_path / "context"
    copy_build_sources(context)
    (context / "models" / "digits" / "2").mkdir(parents=True)
    shutil.copy(models_dir / "digits" / "config.json", context / "models" / "digits")
    shutil.copy(models_dir / "digits" / "2" / "model.onnx", context / "models" / "digits" / "2")
    return context


def digits_build_pod(name: str, context: str, sha256: str) -> dict:
    """The build pod of digits' version 2 in ml-builds, pushing ``IMAGE``."""
    from vision_rollout.images import build_pod

    return build_pod(
        name,
        "ml-builds",
        context,
        IMAGE,
        "models/digits/2/model.onnx",
        sha256,
        builder_image=BUILDKIT_IMAGE,
        docker_config_secret="registry-push",
        service_account="image-builder",
    )


def sha256_of(context: Path) -> str:
    return hashlib.sha256((context / "models" / "digits" / "2" / "model.onnx").read_bytes()).hexdigest()


def run_build(
    api: FakeKubeAPI,
    context: str,
    sha256: str,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    pod_names: list[str],
    run_dir: Path,
) -> str:
    """``buildkit_build`` as the DAG runs it: the pod of ``build_pod`` created, followed and ended by
    the real KubernetesPodOperator through ``kubernetes_default``. Returns its XCom ``image``."""
    from rollout_airflow.operators import ImageBuild

    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": json.dumps(api.kubeconfig("ml-builds"))}}),
    )
    pod = digits_build_pod(name, context, sha256)
    plan = {"build": {"pod": pod, "name": name, "namespace": "ml-builds", "image": IMAGE}}
    operator = ImageBuild(
        task_id="buildkit_build", plan=plan, startup_timeout_seconds=60, startup_check_interval_seconds=1
    )
    ti = SimpleNamespace(dag_id="model_rollout", task_id="buildkit_build", map_index=-1, try_number=1, xcom={})
    ti.xcom_push = lambda key, value: ti.xcom.__setitem__(key, value)
    # The build runs for a run that holds its model (build_image took the lock; here a lock file).
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": {"run_dir": str(run_dir)}})
    )
    FileLock("digits", run_dir / "locks").acquire("manual__1")
    params = {"model": "digits", "mesh": "local"}
    try:
        image = operator.execute(
            {"ti": ti, "params": params, "run_id": "manual__1", "dag": SimpleNamespace(dag_id="model_rollout")}
        )
    finally:
        pod_names.append(ti.xcom["pod_name"])  # the operator adds a random suffix
    assert image == ti.xcom["image"]
    return image


@pytest.fixture
def push_secret(cluster):
    return apply_push_secret(cluster[2])


def apply_push_secret(api_client: client.ApiClient) -> str:
    """The build pods' registry credentials, Secret registry-push in ml-builds (its config)."""
    config = json.dumps({"auths": {"registry.example.com": {"auth": "dXNlcjpwYXNz"}}})
    client.CoreV1Api(api_client).patch_namespaced_secret(
        "registry-push",
        "ml-builds",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "registry-push", "namespace": "ml-builds"},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": config},
        },
        field_manager="test",
        _content_type="application/apply-patch+yaml",
    )
    return config


def test_the_build_pod_builds_and_pushes_the_checked_model(cluster, build_context, push_secret, monkeypatch, capsys):
    api, runner, _api_client = cluster
    runner.pushed.clear()
    runner.images = {}  # the tag resolves only once the build pushed it
    names: list[str] = []
    image = run_build(
        api,
        f"dir://{build_context}",
        sha256_of(build_context),
        monkeypatch,
        "build-digits-2-good",
        names,
        build_context.parent / "run",
    )
    # What deploy_candidate runs: the tag by the digest the build reported in its pod's status.
    assert re.fullmatch(re.escape(IMAGE) + "@sha256:[0-9a-f]{64}", image)
    folder = runner.resolve(IMAGE)
    assert folder is not None
    assert runner.resolve(image) == folder
    assert runner.resolve(image.replace(IMAGE, IMAGE.replace("sha-", "other-"))) == folder  # a registry pulls by digest
    assert (folder / "digits" / "2" / "model.onnx").read_bytes() == (
        build_context / "models" / "digits" / "2" / "model.onnx"
    ).read_bytes()
    streamed = capsys.readouterr().out  # the build log, followed by the operator
    assert f"pushing manifest for {IMAGE}" in streamed
    assert "/models/digits/2/model.onnx: OK" in streamed
    assert names[0].startswith("build-digits-2-good")
    wait_for("the succeeded pod deleted", lambda: api.get("pods", "ml-builds", names[0]) is None)
    created = [r for r in api.writes() if r["method"] == "POST"]
    assert created
    assert created[-1]["path"] == "/api/v1/namespaces/ml-builds/pods"


def test_an_s3_context_is_fetched_and_unpacked_before_the_build(
    cluster, build_context, push_secret, monkeypatch, capsys
):
    api, runner, _api_client = cluster
    runner.pushed.clear()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(build_context, arcname=".")
    uri = "s3://ml-builds/serving-context.tar.gz"
    runner.objects = {uri: archive.getvalue()}.get
    names: list[str] = []
    run_build(api, uri, sha256_of(build_context), monkeypatch, "build-digits-2-s3", names, build_context.parent / "run")
    folder = runner.resolve(IMAGE)
    assert folder is not None
    assert (folder / "digits" / "2" / "model.onnx").read_bytes() == (
        build_context / "models" / "digits" / "2" / "model.onnx"
    ).read_bytes()
    streamed = capsys.readouterr().out
    assert f"download: {uri} to /download/context.tar.gz" in streamed
    assert "/models/digits/2/model.onnx: OK" in streamed


def test_the_build_pod_fails_on_a_wrong_sha256_saying_why(cluster, build_context, push_secret, monkeypatch):
    from airflow.exceptions import AirflowException

    api, runner, api_client = cluster
    runner.pushed.clear()
    names: list[str] = []
    with pytest.raises(AirflowException, match="Failed"):
        run_build(
            api,
            f"dir://{build_context}",
            "0" * 64,
            monkeypatch,
            "build-digits-2-bad",
            names,
            build_context.parent / "run",
        )
    assert runner.pushed == {}
    pod = client.CoreV1Api(api_client).read_namespaced_pod(names[0], "ml-builds")  # kept to inspect
    assert pod.status.phase == "Failed"
    assert pod.spec.containers[0].image == BUILDKIT_IMAGE  # as the operator created it
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1
    assert "not MODEL_SHA256" in terminated.message
    log = client.CoreV1Api(api_client).read_namespaced_pod_log(names[0], "ml-builds")
    assert "sha256sum: WARNING: 1 computed checksum did NOT match" in log
    # The operator labelled the failed pod already_checked (a retry must not reattach to it), with
    # a call the workers' Role in deploy/ allows (the cluster e2e counts on this test for it).
    assert pod.metadata.labels["already_checked"] == "True"
    calls = [c for r in api.requests if r["user"] == WORKER_USER for c in rbac.checks(r)]
    patch = rbac.Attributes("patch", "", "pods", "ml-builds", names[0])
    assert patch in calls
    rules = rbac.bound_rules(manifests.render("local-cluster"), WORKER_USER)["ml-builds"]
    assert [str(c) for c in calls if not rbac.allowed(rules, c)] == []


def test_a_deferred_build_is_followed_by_the_triggerer_with_its_own_credentials(cluster, build_context, monkeypatch):
    """deploy/helm/values.yaml makes the pod operator defer (default_deferrable): a worker creates
    the build pod and defers; KubernetesPodTrigger follows it in the triggerer, in-cluster, so with
    the triggerer's ServiceAccount (here its token, in place of the worker's in the trigger's
    connection): it reads the pod, and watches its events while it waits (here for its registry
    Secret, made once the watch is seen); the worker resumes, reads the log and deletes the pod. A
    user's kill of a deferred build has the triggerer delete the pod. Each side's calls are allowed
    by what deploy/ binds to its ServiceAccount, and the triggerer's Role holds nothing its calls
    did not need."""
    import asyncio

    from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger
    from airflow.sdk.exceptions import TaskDeferred

    from rollout_airflow.operators import ImageBuild

    api, runner, api_client = cluster
    runner.pushed.clear()
    runner.images = {}
    triggerer = manifests.airflow_user("triggerer")
    monkeypatch.setenv(
        "AIRFLOW_CONN_KUBERNETES_DEFAULT",
        json.dumps({"conn_type": "kubernetes", "extra": {"kube_config": json.dumps(api.kubeconfig("ml-builds"))}}),
    )
    pod = digits_build_pod("build-digits-2-deferred", f"dir://{build_context}", sha256_of(build_context))
    plan = {"build": {"pod": pod, "name": "build-digits-2-deferred", "namespace": "ml-builds", "image": IMAGE}}
    operator = ImageBuild(
        task_id="buildkit_build",
        plan=plan,
        deferrable=True,
        startup_timeout_seconds=60,
        startup_check_interval_seconds=1,
        poll_interval=1,
    )
    ti = SimpleNamespace(dag_id="model_rollout", task_id="buildkit_build", map_index=-1, try_number=1, xcom={})
    ti.xcom_push = lambda key, value: ti.xcom.__setitem__(key, value)
    run_dir = build_context.parent / "run"
    monkeypatch.setenv(
        "AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": {"run_dir": str(run_dir)}})
    )
    FileLock("digits", run_dir / "locks").acquire("manual__1")
    context = {
        "ti": ti,
        "params": {"model": "digits", "mesh": "local"},
        "run_id": "manual__1",
        "dag": SimpleNamespace(dag_id="model_rollout"),
    }
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, KubernetesPodTrigger)
    as_triggerer = {"kube_config": json.dumps(api.kubeconfig("ml-builds", user=triggerer))}
    trigger.connection_extras = as_triggerer  # in-cluster: the triggerer pod's own token

    def watched() -> bool:
        return any(r["user"] == triggerer and r["path"].endswith("/events") for r in api.requests)

    async def first_event() -> Any:
        async def secret_once_watched() -> None:
            while not watched():
                await asyncio.sleep(0.1)
            await asyncio.to_thread(apply_push_secret, api_client)

        made = asyncio.create_task(secret_once_watched())
        try:
            async for event in trigger.run():
                return event
            return None
        finally:
            made.cancel()

    event = asyncio.run(asyncio.wait_for(first_event(), 120))
    assert event.payload["status"] == "success", event.payload
    image = operator.trigger_reentry(context, event.payload)
    assert runner.resolve(IMAGE) is not None  # built and pushed
    assert image == ti.xcom["image"]  # by digest, read from the pod before the worker deleted it
    assert re.fullmatch(re.escape(IMAGE) + "@sha256:[0-9a-f]{64}", image)
    assert runner.resolve(image) == runner.resolve(IMAGE)
    name = ti.xcom["pod_name"]
    wait_for("the succeeded pod deleted", lambda: api.get("pods", "ml-builds", name) is None)
    # A user kills a deferred build: the triggerer deletes its pod (here gone already: the call counts).
    _classpath, kwargs = trigger.serialize()
    asyncio.run(KubernetesPodTrigger(**kwargs).on_kill())

    objects = manifests.render("local-cluster")
    by = {
        user: [c for r in api.requests if r["user"] == user for c in rbac.checks(r)]
        for user in (WORKER_USER, triggerer)
    }
    assert {str(c) for c in by[triggerer]} == {
        "get core/pods in ml-builds",
        "watch core/events in ml-builds",
        "delete core/pods in ml-builds",
    }
    for user, calls in by.items():
        rules = rbac.bound_rules(objects, user)["ml-builds"]
        assert [str(c) for c in calls if not rbac.allowed(rules, c)] == [], user
    triggerers = rbac.bound_rules(objects, triggerer)
    assert set(triggerers) == {"ml", "ml-builds"}  # (in ml: the approval's wait reads the Lease, test_manifests)
    assert rbac.unused(triggerers["ml-builds"], by[triggerer]) == []


def test_a_build_of_an_s3_context_the_store_lacks_fails_naming_it(cluster, build_context, push_secret, monkeypatch):
    from airflow.exceptions import AirflowException

    api, runner, api_client = cluster
    runner.pushed.clear()
    runner.objects = {}.get
    names: list[str] = []
    with pytest.raises(AirflowException, match="Failed"):
        run_build(
            api,
            "s3://ml-builds/missing.tar.gz",
            "0" * 64,
            monkeypatch,
            "build-digits-2-none",
            names,
            build_context.parent / "run",
        )
    assert runner.pushed == {}
    pod = client.CoreV1Api(api_client).read_namespaced_pod(names[0], "ml-builds")
    assert [c.name for c in pod.spec.init_containers] == ["fetch-context", "unpack-context"]
    assert "Key 'missing.tar.gz' does not exist" in pod.status.container_statuses[0].state.terminated.message


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda a: [*a, "--secret", "id=token"], "flag --secret: this stand-in of buildctl build understands"),
        (lambda a: [*a, "--opt", "context=https://example.com/ctx.tar.gz"], "no git or https context"),
        (lambda a: [*a, "--opt", "target=build"], "--opt target: this stand-in takes filename and build-arg:NAME"),
        (lambda a: [x.replace(",push=true", "") for x in a], "a build here pushes: type=image,name=TAG,push=true"),
        (lambda a: [x.replace("dockerfile.v0", "gateway.v0") for x in a], "only dockerfile.v0 builds here"),
        (lambda a: [*a, "--export-cache", "type=local,dest=/cache"], "only type=registry here"),
        (lambda a: ["prune", *a[1:]], "a build here is `buildctl-daemonless.sh build ...`"),
    ],
)
def test_the_build_stand_in_refuses_what_it_does_not_understand(build_context, tmp_path, change, reason):
    from devstack.cluster.pods import BuildError, build_model_image

    pod = digits_build_pod("b", f"dir://{build_context}", sha256_of(build_context))
    container = pod["spec"]["containers"][0]
    lines: list[str] = []
    pushed, _, message = build_model_image(
        container["command"], container["args"], {}, tmp_path / "images", lines.append
    )
    assert pushed == [IMAGE, f"{IMAGE.rpartition(':')[0]}@{json.loads(message)['containerimage.digest']}"]  # it builds
    with pytest.raises(BuildError, match=re.escape(reason)):
        build_model_image(container["command"], change(container["args"]), {}, tmp_path / "images", lines.append)


@pytest.mark.parametrize("missing", ["model_server", "constraints.txt"])
def test_a_build_context_without_what_the_dockerfile_copies_fails_naming_it(build_context, tmp_path, missing):
    """The README's build context was "a tarball of docker/ and models/", and the cluster's and
    these tests' contexts the same: the stand-in built from them, but BuildKit fails the
    Dockerfile's `COPY model_server/requirements.txt constraints.txt /tmp/` (and `COPY
    model_server ...`) on such a context: the production build could not succeed. The stand-in
    fails it as BuildKit does, naming the path; the contexts hold what the Dockerfile copies."""
    from devstack.cluster.pods import BuildError, build_model_image

    container = digits_build_pod("b", f"dir://{build_context}", sha256_of(build_context))["spec"]["containers"][0]
    build_model_image(container["command"], container["args"], {}, tmp_path / "images", print)  # the whole one builds
    path = build_context / missing
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    wanted = "model_server/requirements.txt" if missing == "model_server" else missing
    with pytest.raises(BuildError, match=re.escape(f'failed to compute cache key: "/{wanted}": not found')):
        build_model_image(container["command"], container["args"], {}, tmp_path / "images", print)


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (lambda c: [*c[:2], c[2].replace("/tmp/", "/var/tmp/"), c[3]], "copies /var/tmp/buildkit-metadata.json to"),
        (lambda c: [*c[:2], c[2].replace("/dev/termination-log", "/tmp/log"), c[3]], "to /tmp/log, not --metadata"),
        (lambda c: [*c[:2], c[2].replace("&&", ";"), c[3]], "a build here is `buildctl-daemonless.sh build ...`"),
        (lambda c: ["bash", *c[1:]], "a build here is `buildctl-daemonless.sh build ...`"),
    ],
)
def test_the_build_stand_in_reports_a_digest_only_as_the_build_pod_copies_it(build_context, tmp_path, command, reason):
    from devstack.cluster.pods import BuildError, build_model_image

    container = digits_build_pod("b", f"dir://{build_context}", sha256_of(build_context))["spec"]["containers"][0]
    with pytest.raises(BuildError, match=re.escape(reason)):
        build_model_image(command(container["command"]), container["args"], {}, tmp_path / "images", print)
    # Without the wrapper buildctl runs alone: it pushes, and the pod's status has no digest.
    pushed, _, message = build_model_image(["buildctl-daemonless.sh"], container["args"], {}, tmp_path / "i", print)
    assert (pushed[0], message) == (IMAGE, "")


def test_a_new_image_rolls_the_pods_new_ones_first(tmp_path, models_dir):
    api = with_secrets(FakeKubeAPI(kubelet=True).start())
    new_image = IMAGE.replace("0123456789ab", "ba9876543210")
    runner = PodRunner(api, tmp_path, {IMAGE: models_dir, new_image: models_dir}, gpu=False)
    cfg = client.Configuration()
    cfg.host = api.url
    versions = VersionDeployments(TARGET, "digits", client.ApiClient(cfg), CPU)
    try:
        versions.apply("2", IMAGE)
        old = wait_for("the first pod ready", lambda: (runner.reconcile(), runner.endpoints("models", {}))[1])
        versions.apply("2", new_image)
        runner.reconcile()
        assert runner.endpoints("models", {}) == old  # the old pod serves until the new one is ready
        assert len(api.list("pods", "models")) == 2  # surge
        new = wait_for(
            "the rollout done",
            lambda: (runner.reconcile(), [e for e in runner.endpoints("models", {}) if e not in old])[1],
        )
        wait_for("the old pod gone", lambda: (runner.reconcile(), len(api.list("pods", "models")) == 1)[1])
        assert runner.endpoints("models", {}) == new
        status = api.get("deployments", "models", "digits-v2")["status"]
        assert (status["observedGeneration"], status["updatedReplicas"], status["readyReplicas"]) == (2, 1, 1)
    finally:
        runner.stop()
        api.stop()


def test_a_stopped_pod_leaves_the_endpoints_then_sleeps_its_pre_stop_then_ends_on_sigterm(cluster):
    """kubelet's order when a pod goes: out of the endpoints at once, its preStop hook (the
    rendered drain, ``sleep N``) while it still serves what it holds, then SIGTERM, before the
    grace period's SIGKILL."""
    _, runner, api_client = cluster
    drain = 10
    versions = VersionDeployments(TARGET, "digits", api_client, build=BuildSettings(gpus=0, drain_seconds=drain))
    versions.apply("2", IMAGE, replicas=1)
    versions.wait_ready("2", replicas=1, timeout_s=120, every_s=0.2)
    (pod,) = runner.pods.values()
    proc = pod.proc
    assert proc is not None
    versions.scale_to_zero("2")
    wait_for("the pod out of the endpoints", lambda: not runner.endpoints("models", {"version": "2"}))
    left = time.monotonic()
    assert proc.poll() is None  # still running: the preStop sleep comes first
    wait_for("the process ended", lambda: proc.poll() is not None, timeout_s=120)
    assert time.monotonic() - left >= drain - 1  # a lower bound: a slow machine only adds to it
    assert proc.returncode != -signal.SIGKILL  # ended by SIGTERM, within the grace period


def test_the_readiness_probe_asks_whose_the_port_is_until_it_is_the_pod_process_own(tmp_path, monkeypatch):
    """The probe read the whole TCP tables and walked /proc for every pod every second for the
    pod's whole life: once its process holds its port, no more, until the process is started
    again."""
    import subprocess
    import sys

    from devstack import processes
    from devstack.cluster.pods import Pod
    from devstack.processes import free_port, port_holder

    port = free_port()
    listens = f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", listens])  # (it never answers: not ready)
    try:
        wait_for("the pod's process to listen", lambda: port_holder(proc.pid, port) is True, 30)
        asked = []
        monkeypatch.setattr(processes, "port_holder", lambda pid, p: asked.append(pid) or port_holder(pid, p))
        runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
        spec = {"containers": [{"name": "server", "readinessProbe": {"httpGet": {"path": "/"}, "timeoutSeconds": 0.2}}]}
        pod = Pod("models", "digits-1", "digits", "h", {}, spec, tmp_path, port=port, proc=proc)
        for _ in range(3):
            assert not runner._probe(pod)
        assert len(asked) == 1
        assert pod.owns_port
    finally:
        proc.kill()
        proc.wait()
    runner._exited(pod)
    assert not pod.owns_port


def test_a_pod_whose_port_is_taken_again_after_it_ran_on_another_is_given_new_tries(tmp_path, monkeypatch):
    """The ports a pod was given up on were counted over its whole life: three collisions, each
    after the pod had run on its port again, parked it in PortTaken for good. They are counted
    per start: once its process listens on its own port, a later collision has its tries anew."""
    import subprocess
    import sys

    from devstack.cluster.pods import Pod
    from devstack.processes import PORT_TRIES, free_port

    runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
    monkeypatch.setattr(runner.api, "patch_pod", lambda *args, **kw: None)  # (its address annotation)
    spec = {"containers": [{"name": "server", "readinessProbe": {"httpGet": {"path": "/"}, "timeoutSeconds": 0.5}}]}
    pod = Pod("models", "digits-1", "digits", "h", {}, spec, tmp_path, port=free_port())
    for _ in range(PORT_TRIES + 1):
        pod.port_taken = True  # (another process took its port: its probe, or its exit, said so)
        runner._port_again(pod)
        assert pod.waiting == ("ContainerCreating", ""), pod.waiting
        serves = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(pod.port)]
        pod.proc = subprocess.Popen(serves, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            wait_for("the pod ready on its new port", lambda: runner._probe(pod), 30)
            assert pod.owns_port
        finally:
            pod.proc.kill()
            pod.proc.wait()


def test_a_pod_without_a_readiness_probe_whose_port_is_taken_again_after_it_ran_on_another_is_given_new_tries(
    tmp_path, monkeypatch
):
    """The ports a pod was given up on are cleared once its probe sees its process listen on its
    own port; a pod without a readinessProbe (ready once started) was never asked whose its port
    was, so three collisions over its life, each after it had run on its port again, parked it in
    PortTaken for good. Its port is asked after as a probed pod's is, until its process holds it."""
    import subprocess
    import sys

    from devstack.cluster.pods import Pod
    from devstack.processes import PORT_TRIES, free_port, port_holder

    runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
    monkeypatch.setattr(runner.api, "patch_pod", lambda *args, **kw: None)  # (its address annotation)
    spec = {"containers": [{"name": "server"}]}
    pod = Pod("models", "digits-1", "digits", "h", {}, spec, tmp_path, port=free_port())
    for _ in range(PORT_TRIES + 1):
        pod.port_taken = True  # (another process took its port: its exit said so)
        runner._port_again(pod)
        assert pod.waiting == ("ContainerCreating", ""), pod.waiting
        serves = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(pod.port)]
        pod.proc = subprocess.Popen(serves, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            wait_for("the pod's process on its new port", lambda: port_holder(pod.proc.pid, pod.port) is True, 30)
            assert runner._probe(pod)  # (ready once started, as before)
        finally:
            pod.proc.kill()
            pod.proc.wait()


def test_a_pod_whose_port_another_process_took_first_is_started_again_on_another(cluster, monkeypatch):
    """A pod's port is picked free when the pod is made; another process that bound it before the
    pod's model server did kept the pod crashing ("Address already in use", backing off) or never
    ready (its probe asks whose the port is) for good. The port is picked again, as the dev
    stack's servers pick theirs (on_a_free_port), and the pod's address says the new one."""
    from devstack.cluster import pods as pods_module
    from devstack.processes import free_port, port_holder
    from tests.support.hostile import answering_server

    _api, runner, api_client = cluster
    with answering_server(lambda path: (200, b"{}")) as stranger:
        taken = int(stranger.rsplit(":", 1)[1])
        picks = iter([taken])
        monkeypatch.setattr(pods_module, "free_port", lambda: next(picks, None) or free_port())
        versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
        versions.apply("2", IMAGE, replicas=1)
        versions.wait_ready("2", replicas=1, timeout_s=60, every_s=0.2)
        (pod,) = runner.pods.values()
        assert pod.port != taken
        assert port_holder(pod.proc.pid, pod.port) is True
        assert runner.endpoints("models", {"version": "2"}) == [f"127.0.0.1:{pod.port}"]
        (listed,) = pods(api_client, "app=digits,version=2")
        assert listed.metadata.annotations["cluster.devstack/address"] == f"127.0.0.1:{pod.port}"


def test_a_pod_whose_admin_port_another_process_took_first_is_started_again_on_another(cluster, monkeypatch):
    """A pod's --admin-port is picked free when the pod is made, as its port is; another process
    that bound it before the pod's model server did kept the pod crashing ("cannot listen on
    127.0.0.1:N: Address already in use", backing off) for good: only its port was picked again.
    The admin port is picked again the same way, and the pod's admin address says the new one."""
    from devstack.cluster import pods as pods_module
    from devstack.cluster.pods import ADMIN_ANNOTATION
    from devstack.processes import free_port, port_holder
    from tests.support.hostile import answering_server

    _api, runner, api_client = cluster
    with answering_server(lambda path: (200, b"{}")) as stranger:
        taken = int(stranger.rsplit(":", 1)[1])
        picks = iter([0, taken])  # (the pod's port first, then its admin port: the stranger's)
        monkeypatch.setattr(pods_module, "free_port", lambda: next(picks, None) or free_port())
        versions = VersionDeployments(TARGET, "digits", api_client, BuildSettings(gpus=0))
        versions.apply("2", IMAGE, replicas=1)
        versions.wait_ready("2", replicas=1, timeout_s=60, every_s=0.2)
        (pod,) = runner.pods.values()
        assert pod.admin_port not in (0, taken)
        assert port_holder(pod.proc.pid, pod.admin_port) is True
        assert runner.endpoints("models", {"version": "2"}, admin=True) == [f"127.0.0.1:{pod.admin_port}"]
        (listed,) = pods(api_client, "app=digits,version=2")
        assert listed.metadata.annotations[ADMIN_ANNOTATION] == f"127.0.0.1:{pod.admin_port}"
        assert listed.metadata.annotations["cluster.devstack/address"] == f"127.0.0.1:{pod.port}"


@pytest.mark.parametrize("taken", ["port", "admin_port", "both"])
def test_a_port_picked_again_is_never_the_pods_other_port(tmp_path, monkeypatch, taken):
    """A pod's port or admin port another process took is picked again (``_port_again``) with
    free_port, which may give the pod's other port: free at that moment, its process killed. The
    server then exited "--admin-port N is --port", not "address already in use", and the pod
    stayed in CrashLoopBackOff for good. The port picked again is never the pod's other one."""
    from devstack.cluster import pods as pods_module
    from devstack.cluster.pods import Pod
    from devstack.processes import free_port

    runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
    monkeypatch.setattr(runner.api, "patch_pod", lambda *args, **kw: None)  # (its address annotations)
    spec = {"containers": [{"name": "server", "args": ["--admin-port", "9001"]}]}
    pod = Pod("models", "digits-1", "digits", "h", {}, spec, tmp_path, port=41001, admin_port=41002)
    other = {"port": pod.admin_port, "admin_port": pod.port, "both": 41003}[taken]
    picks = iter([other, other])
    monkeypatch.setattr(pods_module, "free_port", lambda: next(picks, None) or free_port())
    pod.port_taken = taken in ("port", "both")
    pod.admin_port_taken = taken in ("admin_port", "both")
    runner._port_again(pod)
    assert pod.waiting == ("ContainerCreating", ""), pod.waiting
    assert pod.port != pod.admin_port
    assert (pod.port != 41001, pod.admin_port != 41002) == (taken != "admin_port", taken != "port")


def test_a_pod_is_made_with_two_different_ports(tmp_path, monkeypatch):
    """A pod made with an ``--admin-port`` (``_create``) had its port and its admin port picked by
    two calls of free_port, the first not yet bound: both could be the same port, its server then
    exiting "--admin-port N is --port" at every start. They differ."""
    from devstack.cluster import pods as pods_module
    from devstack.processes import free_port

    runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
    same = free_port()
    picks = iter([same, same])
    monkeypatch.setattr(pods_module, "free_port", lambda: next(picks, None) or free_port())
    deployment = render_deployment(TARGET, "digits", "2", IMAGE, None, CPU)
    deployment["metadata"]["uid"] = "uid-2"
    assert any(
        str(a).startswith("--admin-port") for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    runner._create(deployment, "h")
    (pod,) = runner.pods.values()
    assert pod.port == same
    assert pod.admin_port
    assert pod.admin_port != pod.port


def test_a_pod_whose_two_ports_are_taken_at_one_exit_has_its_tries_counted_once(tmp_path, monkeypatch):
    """Both of a pod's ports taken by another process at one exit counted two of its PORT_TRIES
    (the ports, not the restarts): the pod gave up (PortTaken) at its second collision, not its
    PORT_TRIES-th. Each collision counts one try, whatever the ports picked again."""
    from devstack.cluster.pods import Pod
    from devstack.processes import PORT_TRIES

    runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
    monkeypatch.setattr(runner.api, "patch_pod", lambda *args, **kw: None)  # (its address annotations)
    spec = {"containers": [{"name": "server", "args": ["--admin-port", "9001"]}]}
    pod = Pod("models", "digits-1", "digits", "h", {}, spec, tmp_path, port=41001, admin_port=41002)
    for collision in range(1, PORT_TRIES + 1):
        pod.port_taken = pod.admin_port_taken = True
        runner._port_again(pod)
        if collision < PORT_TRIES:
            assert pod.waiting == ("ContainerCreating", ""), (collision, pod.waiting)
    assert pod.waiting is not None
    assert pod.waiting[0] == "PortTaken"
    assert "41001" in pod.waiting[1]
    assert "41002" in pod.waiting[1]


@pytest.mark.parametrize("form", ["spaced", "joined"])
def test_the_admin_container_port_is_the_pods_admin_port_in_either_form_of_the_flag(tmp_path, form):
    """``--admin-port=9001`` (the form ``_create`` and ``_translate`` accept besides
    ``--admin-port 9001``) was not seen by ``_ports``: the admin containerPort was given the pod's
    data port, and its file_sd target scraped the data port."""
    from devstack.cluster.pods import Pod, _ports

    args = ["--admin-port", "9001"] if form == "spaced" else ["--admin-port=9001"]
    ports = [{"name": "http", "containerPort": 8000}, {"name": "admin", "containerPort": 9001}]
    spec = {"containers": [{"name": "server", "args": args, "ports": ports}]}
    pod = Pod("models", "digits-1", "digits", "h", {}, spec, tmp_path, port=41001, admin_port=41002)
    assert _ports(pod) == [("http", 41001), ("admin", 41002)]


@pytest.mark.parametrize(
    ("args", "admin"),
    [
        (["--admin-port", "9001", "--admin-port", "9002"], 9002),
        (["--admin-port=9001", "--admin-port", "9002"], 9002),
        (["--admin-po", "9002"], 9002),
        (["--admin-po=9002"], 9002),
        (["--admin-port", "09002"], 9002),
        (["--port", "9001"], None),
    ],
    ids=["twice", "twice-joined-first", "abbreviated", "abbreviated-joined", "leading-zero", "none"],
)
def test_the_admin_port_is_read_as_the_model_server_reads_its_args(tmp_path, args, admin):
    """``--admin-port`` given twice was read as the first (``--admin-port 9001 --admin-port
    9002``: the containerPort 9001 taken for the admin one), where the server's argparse keeps
    the last, 9002; and argparse's abbreviation ``--admin-po 9002``, which the server reads as
    its admin port, was not seen at all: the pod got no admin port, and its server listened on
    the container's 9002. The args are read by the model server's own parser."""
    from devstack.cluster.pods import Pod, _admin_arg, _ports
    from model_server.__main__ import parse_args

    assert parse_args(["--repository", ".", *args]).admin_port == admin
    assert _admin_arg(args) == admin
    ports = [{"name": "http", "containerPort": 9001}, {"name": "admin", "containerPort": 9002}]
    spec = {"containers": [{"name": "server", "args": args, "ports": ports}]}
    pod = Pod("models", "digits-1", "digits", "h", {}, spec, tmp_path, port=41001, admin_port=41002)
    assert _ports(pod) == [("http", 41001), ("admin", 41002 if admin else 41001)]


def test_a_container_asking_the_server_for_its_help_is_read_without_ending_the_runner(capsys):
    """The server's parser prints its help and exits at ``-h`` (or ``--he``): read here, it
    neither prints nor exits; the admin port given before it is the one read."""
    from devstack.cluster.pods import _admin_arg

    assert _admin_arg(["--admin-port", "9002", "--he"]) == 9002
    assert _admin_arg(["-h", "--admin-port", "9002"]) is None
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    "given",
    [
        ["--admin-port", "9001", "--admin-port", "9002"],
        ["--admin-po", "9002"],
        ["--port", "$(PORT)", "--admin-port", "9002"],
        ["--port=", "--admin-po", "9002"],
    ],
    ids=["twice", "abbreviated", "after-an-unexpanded-port", "abbreviated-after-an-empty-port"],
)
def test_a_pod_is_given_an_admin_port_for_a_flag_the_server_reads_as_one(tmp_path, monkeypatch, given):
    """A container whose ``--admin-port`` was written abbreviated (``--admin-po``) got no admin
    port of the pod's own: its server listened on the port written, every pod of the Deployment
    on the same one. It gets one, as for ``--admin-port``, and its server is given it last.
    A ``--port`` its server never sees (the runner drops it and gives its own) does not hide the
    flag after it: ``$(PORT)`` left unexpanded (Kubernetes expands it) or ``--port=`` stopped the read
    of the args there (argparse's refusal), and the pod got no admin port."""
    runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
    monkeypatch.setattr(runner, "resolve", lambda image: tmp_path)  # (the image's repository)
    deployment = render_deployment(TARGET, "digits", "2", IMAGE, None, CPU)
    deployment["metadata"]["uid"] = "uid-2"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in container["args"]]
    at = args.index("--admin-port")
    container["args"] = [*args[:at], *args[at + 2 :], *given]
    runner._create(deployment, "h")
    (pod,) = runner.pods.values()
    assert pod.admin_port
    monkeypatch.setattr(runner, "_volumes", lambda pod: {})  # (its Secrets' volumes: none here)
    argv, _env = runner._command(pod)
    assert argv[-2:] == ["--admin-port", str(pod.admin_port)]


def test_a_pods_admin_port_is_read_from_its_args_once(tmp_path, monkeypatch):
    """The container's args were read by the server's parser (a few ms to build) at ``_create``,
    again at each start (``_command``) and for every pod at each ``write_file_sd``, under the
    runner's lock: read once, at ``_create``, and kept on the pod."""
    from devstack.cluster import pods

    built = []
    monkeypatch.setattr(pods, "server_parser", lambda kind: built.append(kind) or server_parser(kind))
    runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
    monkeypatch.setattr(runner, "resolve", lambda image: tmp_path)  # (the image's repository)
    monkeypatch.setattr(runner, "_volumes", lambda pod: {})  # (its Secrets' volumes: none here)
    deployment = render_deployment(TARGET, "digits", "2", IMAGE, None, CPU)
    deployment["metadata"]["uid"] = "uid-2"
    runner._create(deployment, "h")
    (pod,) = runner.pods.values()
    runner._command(pod)
    monkeypatch.setattr(pods.Pod, "running", True)
    runner.write_file_sd(tmp_path / "sd.json")
    runner.write_file_sd(tmp_path / "sd.json")
    assert [t["targets"] for t in json.loads((tmp_path / "sd.json").read_text())] == [
        [f"127.0.0.1:{pod.port}"],
        [f"127.0.0.1:{pod.admin_port}"],
    ]
    assert len(built) == 1


def test_an_admin_port_is_told_from_another_flag_s_refusal_by_the_flag_refused():
    """A refusal of another flag whose value is the text ``--admin-port`` was taken for the admin
    port's own (its words held "--admin-port"): the port read before it was lost."""
    from devstack.cluster.pods import _admin_arg

    assert _admin_arg(["--admin-port", "9001", "--shadow-queue=--admin-port"]) == 9001


@pytest.mark.parametrize(
    ("bare", "words"),
    [
        (["--admin-port"], "argument --admin-port: expected one argument"),
        (["--admin-port="], "argument --admin-port: invalid int value: ''"),
        (["--admin-port", "--port", "8000"], "argument --admin-port: expected one argument"),
        (["--admin-port", "9001", "--admin-port"], "argument --admin-port: expected one argument"),
        (["--admin-port", "nine"], "argument --admin-port: invalid int value: 'nine'"),
        (["--admin-port", "70000"], "--admin-port 70000 is not a TCP port (1 to 65535)"),
        (["--admin-port", "0"], "--admin-port 0 is not a TCP port (1 to 65535)"),
        (["--admin-port=-5"], "--admin-port -5 is not a TCP port (1 to 65535)"),
    ],
    ids=["last", "empty", "a-flag-next", "twice-the-last-bare", "no-integer", "past-65535", "zero", "negative"],
)
def test_an_admin_port_flag_with_no_value_is_refused_naming_the_pod_and_the_flag(tmp_path, monkeypatch, bare, words):
    """A bare ``--admin-port`` as the container's last arg: ``_create`` gave the pod an admin port
    (an arg of that name was enough) and ``_ports`` none (no value after it to match a
    containerPort), and the server ran with an admin port no target scraped. One reading of the
    args serves both: the pod has no admin port, and its container is refused at its start, the
    error naming the pod and the flag (the model server itself would exit at its args). A flag
    after it is no value either (argparse: "expected one argument"), where it was taken for one.
    Given twice, the last bare, or a value that is no integer: the server exits at its args too,
    and its container is refused in the words of the server's parser. A port the server refuses
    (70000, 0, -5: "is not a TCP port") was taken: the pod was given an admin port, and its
    server started to exit there; refused here in the server's own words."""
    from devstack.cluster.pods import ADMIN_ANNOTATION, _ports

    runner = PodRunner(FakeKubeAPI(kubelet=True), tmp_path / "cluster", {}, gpu=False)
    monkeypatch.setattr(runner, "resolve", lambda image: tmp_path)  # (the image's repository)
    deployment = render_deployment(TARGET, "digits", "2", IMAGE, None, CPU)
    deployment["metadata"]["uid"] = "uid-2"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in container["args"]]
    at = args.index("--admin-port")
    container["args"] = [*args[:at], *args[at + 2 :], *bare]
    runner._create(deployment, "h")
    (pod,) = runner.pods.values()
    assert pod.admin_port == 0
    assert [port for _, port in _ports(pod)] == [pod.port, pod.port]
    (created,) = runner.api.list("pods")
    assert ADMIN_ANNOTATION not in created["metadata"]["annotations"]
    runner._start(pod)
    assert pod.proc is None
    assert pod.waiting == (
        "CreateContainerError",
        f"pod models/{pod.name}: its container's args are refused by the model server: {words}",
    ), pod.waiting
