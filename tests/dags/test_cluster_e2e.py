"""dag.test() of model_rollout with ``mesh = istio`` through the one-machine cluster.

The API server, pods as model-server processes, nginx configured from the applied
VirtualService, Prometheus discovering the pods (every 5 s here; 15 s in ``make cluster-demo``)
and the prediction log on an S3 API: version 2 built by the Kaniko stand-in, deployed, promoted
under steady load with no failed client request; then version 3 against it, with the mirror,
rolled back.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.cluster.cluster import NAMESPACE, Cluster
from devstack.cluster.dataplane import find_nginx
from devstack.processes import S3_CREDENTIALS
from tests.dags.test_model_rollout_e2e import rollout_dag

pytestmark = pytest.mark.integration

# Wiring, not the defaults (as in test_model_rollout_e2e.py): the margins leave room for a
# candidate slowed by a busy CI machine.
CONF = {
    "mesh": "istio",
    "stages": [50, 100],
    "bake_seconds": 10,
    "max_stage_seconds": 180,
    "looks_per_stage": 2,
    "min_samples": 100,
    "latency_margin": 1.0,
    "error_margin": 0.05,
    "accuracy_margin": 0.02,
}


@pytest.fixture(scope="module")
def cluster(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if find_nginx() is None:
        pytest.skip("nginx is not installed (make test installs nginx-light)")
    c = Cluster(tmp_path_factory.mktemp("cluster"), models_dir, scrape_interval_s=5).start()
    try:
        c.install("digits", replicas=2)
        yield c
    finally:
        c.stop()


class SteadyLoad:
    """The load generator through the data plane, round after round, every answer counted: the
    versions that served, and every failed request by its status."""

    def __init__(self, url: str, validation: Path) -> None:
        from devstack.loadgen import LoadConfig

        self.cfg = LoadConfig(url=url, validation=validation, rate=30, duration_s=1, feedback_delay_s=0.2)
        self.served: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._rounds, daemon=True)

    def _rounds(self) -> None:
        from devstack.loadgen import run

        while not self.stop.is_set():
            stats = run(self.cfg)
            self.served.update(stats.served)
            self.errors.update(stats.errors)

    def __enter__(self) -> SteadyLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.fixture
def worker(cluster: Cluster, airflow_db: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An Airflow worker of this cluster: its connections, and the object store's credentials."""
    for conn_id, fields in cluster.connections("digits", tmp_path / "run").items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return tmp_path / "run"


def routes(cluster: Cluster) -> list[dict[str, Any]]:
    """The default route of the applied VirtualService, as subsets and weights."""
    vs = cluster.api.get("virtualservices", NAMESPACE, "digits")
    assert vs is not None
    return [
        {"subset": d["destination"]["subset"], "weight": d.get("weight", 100)} for d in vs["spec"]["http"][-1]["route"]
    ]


def replicas(cluster: Cluster, version: str) -> int:
    deployment = cluster.api.get("deployments", NAMESPACE, f"digits-v{version}")
    assert deployment is not None
    return int(deployment["spec"]["replicas"])


def test_v2_is_promoted_with_no_failed_request_then_v3_rolled_back(cluster, worker, models_dir):
    dag = rollout_dag()
    validation = models_dir / "digits" / "validation"
    with SteadyLoad(cluster.service_url("digits").removeprefix("http://"), validation) as load:
        run = dag.test(run_conf={**CONF, "candidate_version": "2", "mirror_percent": 0})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["kaniko_build"] == "success"  # the Kaniko stand-in built and pushed its image
    assert states["promote"] == "success", states
    assert routes(cluster) == [{"subset": "v2", "weight": 100}]
    assert replicas(cluster, "1") == 0
    assert cluster.pods.endpoints(NAMESPACE, {"app": "digits", "version": "1"}) == []
    assert len(cluster.pods.endpoints(NAMESPACE, {"app": "digits", "version": "2"})) == 2
    assert load.errors == Counter(), load.errors  # zero failed client requests across the promotion
    assert load.served["1"] > 0
    assert load.served["2"] > 0

    run = dag.test(run_conf={**CONF, "candidate_version": "3", "baseline_version": "2", "mirror_percent": 100})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["stage_1.enable_shadow"] == "success"  # the probe's copy through nginx's mirror, masked
    assert states["rollback"] == "success", states
    assert routes(cluster) == [{"subset": "v2", "weight": 100}]
    assert replicas(cluster, "3") == 0
    reports = sorted((worker / "outbox").glob("*.json"))
    assert "rolled back" in json.loads(reports[-1].read_text())["text"].lower()
