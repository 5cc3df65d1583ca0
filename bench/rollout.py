"""The rollout end to end through a real Airflow: orchestration overhead and breach-to-stable time.

Brings up the whole local stack in a temporary folder (model server, Prometheus scraping every
second, load generator at 20 requests/s, Airflow's scheduler, DAG processor, triggerer and API
server on loopback) and drives ``model_rollout`` through the REST API, as a user would:

1. Orchestration overhead: digits v2 through stages 50% and 100% with bake times B seconds
   (min_samples low enough that the bake time, not the sample count, ends each stage). The
   run's wall time against the sum of configured bake times (the overhead ratio), and the
   overhead in seconds, for each B.
2. Breach to stable: digits v2 at 50% with a long bake; once the wait is deferred, 90 ms of
   delay is injected into the canary (the mesh's fault injection) and the traffic policy is
   polled until version 1 takes 100% again. Compared with Flagger's default detection time:
   an analysis interval of 1 min times a failure threshold (60 s for one failed check).

    python bench/rollout.py [--bakes 10 30] [--breach-seconds 5] [--out bench/results/rollout.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from devstack.airflow_api import AirflowAPI  # noqa: E402
from devstack.processes import free_port  # noqa: E402
from scripts import stack  # noqa: E402

FLAGGER_DEFAULT_S = 60.0  # analysis interval 1m x threshold (one failed check)
BASE = {
    "candidate_version": "2",
    "baseline_version": "1",
    "looks_per_stage": 1,
    "min_samples": 30,
    "latency_margin": 0.5,
    "error_margin": 0.05,
    "accuracy_margin": 0.02,
}


def seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def overhead(api: AirflowAPI, state: dict[str, Any], bake: int) -> dict[str, Any]:
    stack.admin(state).serve_only("digits", "1")  # version 1 alone at 100%, no fault
    stages = [50, 100]
    run_id = api.trigger("model_rollout", {**BASE, "stages": stages, "bake_seconds": bake})
    run = api.wait("model_rollout", run_id, timeout_s=600)
    wall = seconds(run["end_date"]) - seconds(run["start_date"])
    outcome = api.xcom("model_rollout", run_id, "decide", "outcome")
    tis = api.task_instances("model_rollout", run_id)
    busy = {t: round(ti["duration"] or 0.0, 2) for t, ti in tis.items() if ti["state"] == "success"}
    total_bake = bake * len(stages)
    row = {
        "bake_seconds": bake,
        "stages": stages,
        "outcome": outcome,
        "run_state": run["state"],
        "wall_s": round(wall, 1),
        "sum_of_bakes_s": total_bake,
        "overhead_ratio": round(wall / total_bake, 2),
        "overhead_s": round(wall - total_bake, 1),
        "task_seconds": busy,
    }
    print(
        f"bake {bake:3d} s x {len(stages)} stages: run {wall:6.1f} s, sum of bakes {total_bake} s, "
        f"ratio {wall / total_bake:.2f}, overhead {wall - total_bake:.1f} s ({outcome})",
        flush=True,
    )
    return row


def breach(api: AirflowAPI, state: dict[str, Any], breach_seconds: int) -> dict[str, Any]:
    stack.admin(state).serve_only("digits", "1")  # version 1 alone at 100%, no fault
    conf = {
        **BASE,
        "stages": [50, 100],
        "bake_seconds": 600,
        "max_stage_seconds": 900,
        "p99_ms_max": 60,
        "p99_breach_seconds": breach_seconds,
    }
    run_id = api.trigger("model_rollout", conf)
    api.wait_for_task("model_rollout", run_id, "stage_1.wait_for_metrics", {"up_for_reschedule"}, timeout_s=300)
    time.sleep(5)  # some healthy canary traffic first
    stack.admin(state).call("PUT", "/v2/models/digits/versions/2/fault", {"delay": {"ms": 90}})
    injected = time.time()
    while True:
        route = stack.admin(state).traffic("digits").to_dict()["route"]
        if route == [{"version": "1", "weight": 100}]:
            restored = time.time()
            break
        if time.time() - injected > 600:
            raise RuntimeError(f"stable not restored 600 s after the breach: {route}")
        time.sleep(0.2)
    run = api.wait("model_rollout", run_id, timeout_s=600)  # the rollback unloads v2, its fault with it
    took = restored - injected
    reason = api.xcom("model_rollout", run_id, "decide", "reason")
    row = {
        "p99_ms_max": 60,
        "p99_breach_seconds": breach_seconds,
        "injected_delay_ms": 90,
        "breach_to_stable_s": round(took, 1),
        "flagger_default_s": FLAGGER_DEFAULT_S,
        "vs_flagger": round(took / FLAGGER_DEFAULT_S, 2),
        "run_state": run["state"],
        "decision": api.xcom("model_rollout", run_id, "decide", "outcome"),
        "reason": reason,
    }
    print(
        f"breach to stable: {took:.1f} s with a {breach_seconds} s sustained-breach window "
        f"({took / FLAGGER_DEFAULT_S:.2f}x Flagger's default {FLAGGER_DEFAULT_S:g} s); {reason}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--bakes", type=int, nargs="+", default=[10, 30])
    p.add_argument("--breach-seconds", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollout.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        run_dir = Path(tmp) / "run"
        state = stack.up(run_dir, args.repository, free_port(), free_port(), free_port(), rate=20)
        try:
            api = AirflowAPI(
                state["urls"]["airflow"],
                state["airflow_user"],
                Path(state["airflow_password_file"]).read_text().strip(),
            )
            api.wait_for_dag("model_rollout")
            rows = [overhead(api, state, bake) for bake in args.bakes]
            breach_row = breach(api, state, args.breach_seconds)
        finally:
            stack.down(run_dir)
    result = {
        "setup": "local stack on loopback: Airflow LocalExecutor (parallelism 4, SQLite), Prometheus "
        "scrape 1 s, load generator 20 requests/s, reschedule-mode wait (a poke every look interval, 2-10 s)",
        "overhead": rows,
        "breach": breach_row,
    }
    write_result(args.out, "rollout", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
