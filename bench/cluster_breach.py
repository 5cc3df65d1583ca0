"""Breach to stable in Kubernetes mode, through the one-machine cluster, at a production scrape interval.

The cluster (``devstack.cluster``: API server, pods as model-server processes, nginx configured
from the VirtualService, Prometheus discovering the pods and scraping them every ``--scrape``
seconds, the prediction log on S3) with digits v1 on 2 pods and live load through the data plane.
The rollout's own steps, as the DAG's tasks call them (``build_image``, the BuildKit stand-in,
``deploy_candidate``, ``apply_weights`` at 50%), then the stage poked at the sensor's interval
(``poke_interval``). Once the stage is judged with guard data, 90 ms of delay is injected into
10% of the candidate pods' answers (their admin ports) and the time until the VirtualService
routes 100% to v1 again is measured, for each ``p99_breach_seconds`` asked (how long the breach
must last; the default is 120). Airflow's scheduling between pokes is left out (``bench/rollout.py``
measures it on the local stack). Compared with Flagger's default detection time: an analysis
interval of 1 min times a failure threshold (60 s for one failed check).

    python bench/cluster_breach.py [--scrape 15] [--breach-seconds 0 120] [--out bench/results/cluster_breach.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from devstack.cluster.cluster import NAMESPACE, Cluster  # noqa: E402
from devstack.processes import S3_CREDENTIALS  # noqa: E402

FLAGGER_DEFAULT_S = 60.0  # analysis interval 1m x threshold (one failed check)
CONF = {"mesh": "istio", "stages": [50, 100], "bake_seconds": 3600, "mirror_percent": 0, "min_samples": 30}


def stable_route(cluster: Cluster) -> list[dict[str, Any]]:
    vs = cluster.api.get("virtualservices", NAMESPACE, "digits") or {}
    return [
        {"subset": d["destination"]["subset"], "weight": d.get("weight", 100)} for d in vs["spec"]["http"][-1]["route"]
    ]


def trial(cluster: Cluster, breach_seconds: int, run_id: str) -> dict[str, Any]:
    import requests
    from airflow.sdk.exceptions import AirflowFailException

    from rollout_airflow import steps
    from rollout_airflow.hooks import PrometheusHook
    from rollout_airflow.operators import ImageBuild
    from vision_rollout.engine import guard_inputs, poke_interval, rate_window_s
    from vision_rollout.spec import RolloutSpec

    params = {**CONF, "candidate_version": "2", "p99_breach_seconds": breach_seconds}
    every = poke_interval(RolloutSpec.from_dict(params))
    built = steps.build_image(params, run_id)
    ti = SimpleNamespace(dag_id="model_rollout", task_id="buildkit_build", map_index=-1, try_number=1, xcom={})
    ti.xcom_push = lambda key, value: ti.xcom.__setitem__(key, value)
    context = {"ti": ti, "params": params, "run_id": run_id, "dag": SimpleNamespace(dag_id="model_rollout")}
    image = ImageBuild(task_id="buildkit_build", plan=built).execute(context)
    steps.deploy_candidate(params, image, run_id)
    deployed = time.time()
    applied = steps.apply_weights(params, 0, run_id, built)
    spec, source = RolloutSpec.from_dict(params), PrometheusHook().source()
    # The canary's P99 in Prometheus first, over a guard window that holds this trial's pods only:
    # the version's series carries an earlier trial's slow samples until they leave it.
    clean_s = max(breach_seconds, 10) + rate_window_s(source.scrape_interval_s()) + 5
    while guard_inputs(source, spec).missing is not None or time.time() - deployed < clean_s:
        _poke(steps, params, applied, run_id)
        time.sleep(every)
    for address in cluster.pods.endpoints(NAMESPACE, {"app": "digits", "version": "2"}, admin=True):
        r = requests.put(
            f"http://{address}/v2/models/digits/versions/2/fault",
            json={"delay": {"ms": 90, "percent": 10}},
            headers={"Authorization": f"Bearer {cluster.admin_token}"},
            timeout=10,
        )
        r.raise_for_status()
    injected = time.monotonic()
    pokes = 0
    try:
        while True:
            pokes += 1
            _poke(steps, params, applied, run_id)
            time.sleep(every)
    except AirflowFailException as exc:
        reason = str(exc)
    tripped = time.monotonic() - injected
    while stable_route(cluster) != [{"subset": "v1", "weight": 100}]:
        time.sleep(0.1)
    stable = time.monotonic() - injected
    steps.ensure_stable(params, run_id, None, "1", {"outbox": "-"})  # the candidate's pods gone, the lease released
    return {
        "p99_breach_seconds": breach_seconds,
        "poke_interval_s": every,
        "pokes_after_injection": pokes,
        "tripped_s": round(tripped, 1),
        "breach_to_stable_s": round(stable, 1),
        "reason": reason[:300],
    }


def _poke(steps: Any, params: dict[str, Any], applied: dict[str, Any], run_id: str) -> None:
    """One poke of the stage's sensor; a tripped guard raises (after stable is back)."""
    verdict = steps.look_at_stage(params, 0, applied, run_id)
    if verdict is not None:
        raise RuntimeError(f"the stage decided without the breach: {verdict['summary']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scrape", type=float, default=15.0)
    p.add_argument("--breach-seconds", type=int, nargs="+", default=[0, 120])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster_breach.json")
    args = p.parse_args(argv)
    from devstack.loadgen import LoadConfig, run

    with tempfile.TemporaryDirectory(prefix="cluster-breach-") as tmp:
        work = Path(tmp)
        os.environ["AIRFLOW_HOME"] = str(work / "airflow")
        cluster = Cluster(work / "cluster", ROOT / "models", scrape_interval_s=args.scrape).start()
        stop = threading.Event()
        try:
            cluster.install("digits", replicas=2)
            for conn_id, fields in cluster.connections().items():
                os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(fields)
            os.environ.update(S3_CREDENTIALS)
            cfg = LoadConfig(
                url=cluster.service_url("digits").removeprefix("http://"),
                validation=ROOT / "models" / "digits" / "validation",
                rate=20,
                duration_s=1,
                feedback_delay_s=0.2,
            )
            threading.Thread(target=lambda: [run(cfg) for _ in iter(stop.is_set, True)], daemon=True).start()
            trials = []
            for n, breach in enumerate(args.breach_seconds):
                trials.append(trial(cluster, breach, f"bench-{n}"))
                print(json.dumps(trials[-1]), flush=True)
        finally:
            stop.set()
            cluster.stop()
    result = {"scrape_interval_s": args.scrape, "flagger_default_s": FLAGGER_DEFAULT_S, "trials": trials}
    write_result(args.out, "cluster_breach", result)
    for t in trials:
        print(
            f"p99_breach_seconds {t['p99_breach_seconds']:>4}: breach to stable {t['breach_to_stable_s']:6.1f} s "
            f"({t['breach_to_stable_s'] / FLAGGER_DEFAULT_S:.2f}x Flagger's {FLAGGER_DEFAULT_S:g} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
