"""dag.test() of model_rollout with ``mesh = istio`` through the one-machine cluster.

The API server, pods as model-server processes, nginx configured from the applied
VirtualService, Prometheus discovering the pods (every 5 s here; 15 s in ``make cluster-demo``)
and the prediction log on an S3 API: version 2 built by the BuildKit stand-in, deployed, promoted
under steady load with no failed client request; then version 3 against it, with the mirror,
rolled back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack import manifests, rbac
from devstack.cluster.cluster import NAMESPACE, Cluster
from devstack.cluster.dataplane import find_nginx
from devstack.cluster.kube import WORKER_USER
from devstack.processes import S3_CREDENTIALS
from tests.dags.test_model_rollout_e2e import rollout_dag
from tests.support import files_under
from vision_rollout.folders import Folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Wiring, not the defaults (as in test_model_rollout_e2e.py): the margins leave room for a
# candidate slowed by a busy CI machine; the bake is short (a stage's last look waits for its
# samples and a whole replay round whatever the bake).
CONF = {
    "mesh": "istio",
    "stages": [50, 100],
    "bake_seconds": 6,
    "max_stage_seconds": 180,
    "looks_per_stage": 2,
    "min_samples": 100,
    "latency_margin": 1.0,
    "error_margin": 0.05,
    "accuracy_margin": 0.02,
}


def two_models(models_dir: Path, repository: Path) -> Path:
    """A repository of two models: digits, and its files again as mnist (copies: the model server
    refuses files reached through a link out of its repository)."""
    import shutil

    for model in ("digits", "mnist"):
        shutil.copytree(models_dir / "digits", repository / model)
    config = json.loads((models_dir / "digits" / "config.json").read_text())
    (repository / "mnist" / "config.json").write_text(json.dumps({**config, "name": "mnist"}))
    return repository


@pytest.fixture(scope="module")
def cluster(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if find_nginx() is None:
        pytest.fail("nginx is not installed: `make nginx` installs nginx-light")
    work = tmp_path_factory.mktemp("cluster")
    # A 2 s drain (5 s in `make cluster-demo`): each version retired waits it; the data plane
    # reloads within 0.5 s of a change.
    c = Cluster(work, two_models(models_dir, work / "repository"), scrape_interval_s=5, drain_seconds=2).start()
    try:
        c.install("digits", replicas=2)
        yield c
    finally:
        c.stop()


class SteadyLoad:
    """The load generator through the data plane, round after round, every answer counted: the
    versions that served, and every failed request by its status."""

    def __init__(self, url: str, validation: Path, model: str = "digits", rate: float = 30) -> None:
        from devstack.loadgen import LoadConfig

        self.cfg = LoadConfig(
            url=url, model=model, validation=validation, rate=rate, duration_s=1, feedback_delay_s=0.2
        )
        self.served: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._rounds, daemon=True)

    def _rounds(self) -> None:
        from devstack.loadgen import run

        while not self.stop.is_set():
            stats = run(self.cfg)
            self.served.update(stats.served)
            self.errors.update(stats.errors)
            self.failures += stats.failures[: 20 - len(self.failures)]

    def __enter__(self) -> SteadyLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def failed(self, cluster: Cluster) -> str:
        """What failed, for an assertion's message: the client's reasons, the data plane's log
        lines of answers 5xx (its own replies have no upstream_addr), the control loop's errors."""
        with (cluster.workdir / "nginx" / "access.log").open() as f:
            answered = [line.strip() for line in f if json.loads(line)["status"] >= 500]
        return "\n".join([*self.failures, *answered[:20], *cluster.errors])


@pytest.fixture
def worker(cluster: Cluster, airflow_db: Path, monkeypatch: pytest.MonkeyPatch) -> Folder:
    """An Airflow worker of this cluster: its connections, and the object store's credentials.
    Its run folder is in the object store, as a cluster's (a task's pod takes its disk with it)."""
    for conn_id, fields in cluster.connections().items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return Folder(cluster.run_dir)


def last_report(run: Folder) -> dict[str, Any]:
    """The last Slack report in the run folder's outbox (no Slack connection here)."""
    outbox = run / "outbox"
    return json.loads(outbox.read([n for n in outbox.names() if n.endswith(".json")][-1]))


def routes(cluster: Cluster, model: str = "digits") -> list[dict[str, Any]]:
    """The default route of the applied VirtualService, as subsets and weights."""
    vs = cluster.api.get("virtualservices", NAMESPACE, model)
    assert vs is not None
    return [
        {"subset": d["destination"]["subset"], "weight": d.get("weight", 100)} for d in vs["spec"]["http"][-1]["route"]
    ]


def replicas(cluster: Cluster, version: str, model: str = "digits") -> int:
    deployment = cluster.api.get("deployments", NAMESPACE, f"{model}-v{version}")
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


def when_serving(cluster: Cluster, version: str, then: Callable[[list[Any]], None]) -> threading.Thread:
    """In the background: once the mesh sends ``version`` a weight and its pods are ready, ``then``
    (its pods) once: what happens to a candidate in the middle of a stage."""

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            weighted = any(r["subset"] == f"v{version}" and r["weight"] > 0 for r in routes(cluster))
            pods = [p for p in cluster.pods.pods.values() if p.labels.get("version") == version and p.ready]
            if weighted and pods:
                then(pods)
                return
            time.sleep(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(600)  # two rollouts: 140 s serial, 194 s beside another test worker, both under load
def test_v2_is_promoted_with_no_failed_request_then_v3_rolled_back(cluster, worker, models_dir):
    dag = rollout_dag()
    validation = models_dir / "digits" / "validation"
    with SteadyLoad(cluster.service_url("digits").removeprefix("http://"), validation) as load:
        run = dag.test(run_conf={**CONF, "candidate_version": "2", "mirror_percent": 0})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["buildkit_build"] == "success"  # the BuildKit stand-in built and pushed its image
    assert states["promote"] == "success", states
    # The candidate ran the pushed manifest, by the digest its build pod reported.
    (server,) = cluster.api.get("deployments", NAMESPACE, "digits-v2")["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"[^@]+:sha-[0-9a-f]{12}@sha256:[0-9a-f]{64}", server["image"]), server["image"]
    assert routes(cluster) == [{"subset": "v2", "weight": 100}]
    assert replicas(cluster, "1") == 0
    assert cluster.pods.endpoints(NAMESPACE, {"app": "digits", "version": "1"}) == []
    assert len(cluster.pods.endpoints(NAMESPACE, {"app": "digits", "version": "2"})) == 2
    assert load.errors == Counter(), load.failed(cluster)  # zero failed client requests across the promotion
    late = cluster.late_requests(NAMESPACE, "digits", "1")
    assert late is not None  # the data plane stopped routing to v1 (its reload recorded)
    print(f"requests v1 took after the mesh stopped routing to it: {late}")
    assert load.served["1"] > 0
    assert load.served["2"] > 0

    # A candidate pod killed in the middle of its stage: restarted and ready again; the rollout decides.
    back: list[Any] = []

    def kill(pods: list[Any]) -> None:
        os.kill(pods[0].proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (pods[0].restarts and pods[0].ready):
            time.sleep(0.2)
        back.append((pods[0].restarts, pods[0].ready))

    watcher = when_serving(cluster, "3", kill)
    conf = {**CONF, "candidate_version": "3", "baseline_version": "2", "mirror_percent": 100, "bake_seconds": 30}
    run = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    watcher.join(timeout=150)
    assert back == [(1, True)], "the killed v3 pod was not restarted and ready again during its stage"
    assert states["stage_1.enable_shadow"] == "success"  # the probe's copy through nginx's mirror, masked
    assert states["rollback"] == "success", states
    assert routes(cluster) == [{"subset": "v2", "weight": 100}]
    assert replicas(cluster, "3") == 0
    assert "rolled back" in last_report(worker)["text"].lower()
    # The shadow audit's report in the object store, where any worker (and a reviewer) reads it.
    audits = [n for n in files_under(cluster.run_dir) if re.fullmatch(r"rollouts/digits/audit-[^/]+/report\.md", n)]
    assert audits, "the shadow audit's report is not in the run folder"


def test_a_p99_breach_in_the_candidates_pods_restores_stable(cluster, worker):
    """90 ms added to 10% of version 3's answers (fault injection on its pods' admin ports, which
    no Service exposes): the P99 guard trips through Prometheus before the bake ends, stable takes
    100% again and the report names the guard."""

    def slow(pods: list[Any]) -> None:
        for pod in pods:
            r = requests.put(
                f"http://127.0.0.1:{pod.admin_port}/v2/models/digits/versions/3/fault",
                json={"delay": {"ms": 90, "percent": 10}},
                headers={"Authorization": f"Bearer {cluster.admin_token}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text

    stable = routes(cluster)[0]["subset"].removeprefix("v")  # what the test before left stable
    with SteadyLoad(
        cluster.service_url("digits").removeprefix("http://"), cluster.repository / "digits" / "validation"
    ):
        when_serving(cluster, "3", slow)
        conf = {**CONF, "candidate_version": "3", "baseline_version": stable, "mirror_percent": 0}
        run = rollout_dag().test(run_conf={**conf, "bake_seconds": 120, "p99_breach_seconds": 3})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["stage_1.wait_for_metrics"] == "failed"  # the guard tripped before the bake ended
    assert states["rollback"] == "success"
    assert routes(cluster) == [{"subset": f"v{stable}", "weight": 100}]
    assert replicas(cluster, "3") == 0
    text = last_report(worker)["text"]
    assert "hard guard tripped: Canary P99" in text


@pytest.mark.timeout(900)
def test_two_models_roll_out_at_once_and_a_failed_report_keeps_the_promotion(cluster, airflow_db, tmp_path):
    """digits' v3 and mnist's v2 at the same time, each run by its own Airflow process (its own
    database) against the one cluster, under load on both Services: each model's run holds its
    own Lease and drives its own VirtualService and Deployments. mnist's report cannot be written
    (its outbox is a file): notify fails after the promotion, and v2 keeps serving."""
    import sqlite3
    import subprocess
    import sys

    cluster.install("mnist", replicas=1)
    stable = routes(cluster)[0]["subset"].removeprefix("v")
    confs = {
        "digits": {**CONF, "candidate_version": "3", "baseline_version": stable, "mirror_percent": 0},
        "mnist": {**CONF, "model": "mnist", "candidate_version": "2", "baseline_version": "1", "mirror_percent": 0},
    }
    both_held: list[bool] = []
    stop = threading.Event()

    def leases() -> None:
        while not stop.wait(0.5):
            held = [cluster.api.get("leases", NAMESPACE, f"rollout-{m}") for m in confs]
            if all(lease and lease["spec"].get("holderIdentity") for lease in held):
                both_held.append(True)

    processes = {}
    for model, conf in confs.items():
        home = tmp_path / model
        home.mkdir()
        run_dir = None  # the cluster's, in its object store
        if model == "mnist":  # a run folder whose outbox cannot be written
            (home / "run").mkdir()
            (home / "run" / "outbox").write_text("a file where the outbox folder should be\n")
            run_dir = str(home / "run")
        with sqlite3.connect(airflow_db) as source, sqlite3.connect(home / "airflow.db") as copy:
            source.backup(copy)
        env = {
            **os.environ,
            **S3_CREDENTIALS,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        }
        for conn_id, fields in cluster.connections(run_dir=run_dir).items():
            env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(fields)
        processes[model] = (home, env, conf)
    watcher = threading.Thread(target=leases, daemon=True)
    watcher.start()
    validation = cluster.repository / "digits" / "validation"
    with (
        SteadyLoad(cluster.service_url("digits").removeprefix("http://"), validation, rate=20) as digits_load,
        SteadyLoad(cluster.service_url("mnist").removeprefix("http://"), validation, "mnist", rate=20) as mnist_load,
    ):
        # Each process's output goes to a file, not a pipe: a pipe read only after the other
        # process ends fills (Airflow logs every task to stdout) and stops its writer mid-stage.
        started = {
            model: subprocess.Popen(
                [sys.executable, "-m", "tests.dags.dag_run", json.dumps(conf)],
                env=env,
                stdout=(home / "dag_test.out").open("wb"),
                stderr=(home / "dag_test.log").open("wb"),
                cwd=Path(__file__).resolve().parents[2],
            )
            for model, (home, env, conf) in processes.items()
        }
        outcome = {}
        for model, proc in started.items():
            proc.wait(timeout=900)
            home = processes[model][0]
            lines = (home / "dag_test.out").read_text().strip().splitlines()
            assert proc.returncode == 0, f"{model}: see {home / 'dag_test.out'} and {home / 'dag_test.log'}"
            assert lines, f"{model}: no outcome printed; see {home / 'dag_test.log'}"
            outcome[model] = json.loads(lines[-1])
    stop.set()
    watcher.join(timeout=10)
    assert both_held, "the two rollouts never held their models at the same time"

    digits, mnist = outcome["digits"]["tasks"], outcome["mnist"]["tasks"]
    assert digits["rollback"] == "success", digits
    assert routes(cluster, "digits") == [{"subset": f"v{stable}", "weight": 100}]
    assert replicas(cluster, "3") == 0
    assert mnist["promote"] == "success", mnist
    assert mnist["notify"] == "failed"  # after the promotion
    assert mnist["ensure_stable"] == "failed"  # the teardown fails the run: its report was not sent
    assert outcome["mnist"]["state"] == "failed"
    assert routes(cluster, "mnist") == [{"subset": "v2", "weight": 100}]  # the promotion kept
    assert replicas(cluster, "1", "mnist") == 0
    assert cluster.pods.endpoints(NAMESPACE, {"app": "mnist", "version": "2"})  # v2 serves
    assert digits_load.errors == Counter(), digits_load.failed(cluster)
    assert mnist_load.errors == Counter(), mnist_load.failed(cluster)
    assert mnist_load.served["2"] > 0
    for model in confs:  # each run's Lease released by its teardown
        lease = cluster.api.get("leases", NAMESPACE, f"rollout-{model}")
        assert lease is None or not lease["spec"].get("holderIdentity"), lease


# Grants that only a failure path needs, which these rollouts do not take: where they are exercised.
EXERCISED_ELSEWHERE = {
    "ml-builds": {
        ("", "pods", "patch"): "a failed build pod labelled already_checked: tests/devstack/test_pods.py, "
        "test_the_build_pod_fails_on_a_wrong_sha256_saying_why",
    },
    "ml": {
        ("apps", "deployments", "delete"): "retired versions beyond build.revision_history_limit (these rollouts "
        "retire fewer): tests/plugins/test_kubernetes_mode.py, "
        "test_the_teardown_deletes_the_retired_versions_beyond_the_history_limit_and_only_those",
        ("policy", "poddisruptionbudgets", "delete"): "the same: a deleted version's disruption budget",
        ("", "pods", "list"): "a version's pods that never become ready, listed for why: tests/devstack/"
        "test_rbac.py, test_the_workers_read_why_a_candidates_pods_never_became_ready",
        ("apps", "deployments/scale", "patch"): "a rollback's baseline whose spec.replicas another manager "
        "owns: tests/plugins/test_kubernetes_mode.py, "
        "test_a_rollback_scaling_a_baseline_another_manager_owns_calls_only_what_production_roles_allow",
    },
}


def test_the_workers_role_allows_every_call_they_made_and_nothing_more(cluster):
    """Least privilege, proven on the rollouts above: every call made with the Airflow workers'
    credentials (the fake API server records each with its bearer token's user) is allowed by
    the Roles deploy/overlays/local-cluster binds to their ServiceAccount, and every grant of
    those Roles was needed by at least one call (or, on a failure path these rollouts do not take,
    by a call of the test ``EXERCISED_ELSEWHERE`` names). Each call counts with every decision
    the API server makes for it (``rbac.checks``): an apply that created its object (a
    candidate's Deployment) needs create as well as patch."""
    calls = [c for r in cluster.api.requests if r["user"] == WORKER_USER for c in rbac.checks(r)]
    if not calls:
        pytest.skip("runs after this module's rollouts, on the calls they made")
    rules = rbac.bound_rules(manifests.render("local-cluster"), WORKER_USER)
    refused = sorted({str(c) for c in calls if not rbac.allowed(rules.get(c.namespace, []), c)})
    unused = {ns: rbac.unused(granted, [c for c in calls if c.namespace == ns]) for ns, granted in rules.items()}
    assert (refused, unused) == ([], {ns: sorted(EXERCISED_ELSEWHERE.get(ns, {})) for ns in rules})
