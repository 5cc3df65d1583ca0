"""``make cluster-up`` / ``make cluster-down`` / ``make cluster-demo``: Kubernetes mode on one machine.

up: the one-machine cluster (``python -m devstack.cluster``: the API server, the pod runner, the
nginx data plane, Prometheus scraping the pods every 15 s, the S3 API holding the prediction log;
digits version 1 on 2 pods at 100%), the load generator through the data plane, and Airflow with
the connections of a worker in that cluster (``mesh = istio``). What was started is recorded in
run/cluster.json; ``down`` stops exactly those process ids (the cluster's and Airflow's by
process group, which takes their children with them).

demo: triggers ``model_rollout`` with ``mesh = istio`` for digits version 2 (promoted), then version
3 against it (rolled back), printing as ``make demo`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.airflow_api import AirflowAPI  # noqa: E402
from devstack.cluster.pods import kill_orphans  # noqa: E402
from devstack.processes import PYTHONPATH, S3_CREDENTIALS, start_airflow  # noqa: E402
from scripts import demo, stack  # noqa: E402
from vision_rollout.folders import Folder  # noqa: E402

STATE = "cluster.json"


def up(run: Path, repository: Path, airflow_port: int, rate: float, scrape_interval_s: float) -> dict[str, Any]:
    state_file = run / STATE
    if stack.recorded_up(run, STATE, stop="make cluster-down") is not None:
        raise SystemExit(f"the cluster is already up ({state_file}); run `make cluster-down` first")
    stack.ports_free({"Airflow": ("CLUSTER_AIRFLOW_PORT", airflow_port)}, "make cluster-up (or make cluster-demo)")
    run.mkdir(parents=True, exist_ok=True)
    workdir, cluster_state = run / "cluster", run / "cluster" / "state.json"
    workdir.mkdir(exist_ok=True)
    cluster_state.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "ORT_DISABLE_TELEMETRY": "1"}
    with (workdir / "cluster.log").open("ab") as log:
        cluster = subprocess.Popen(
            [
                *(sys.executable, "-m", "devstack.cluster", "--workdir", str(workdir)),
                *("--repository", str(repository), "--state", str(cluster_state)),
                *("--scrape-interval", f"{scrape_interval_s:g}"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    state: dict[str, Any] = {
        "pids": {},
        "marks": {},
        "groups": [],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    stack.record(state, "cluster", cluster.pid, group=True)
    state_file.write_text(json.dumps(state, indent=2))  # a failed start leaves `down` what to stop
    deadline = time.monotonic() + 300
    while not cluster_state.exists():
        if cluster.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the cluster did not come up; see {workdir / 'cluster.log'}")
        time.sleep(0.5)
    inside = json.loads(cluster_state.read_text())
    connections = inside["connections"]
    service = f"127.0.0.1:{inside['services']['ml/digits']}"  # the Service's ClusterIP stand-in
    loadgen = stack.start_loadgen(service, repository, rate, run / "cluster-loadgen.log")
    stack.record(state, "loadgen", loadgen.pid)
    state["urls"] = {"digits": f"http://{service}", "prometheus": inside["prometheus"], "kubernetes": inside["api"]}
    state["run_dir"] = connections["model_server_default"]["extra"]["run_dir"]
    state_file.write_text(json.dumps(state, indent=2))
    airflow = start_airflow(run / "airflow-cluster", connections, port=airflow_port, extra_env=S3_CREDENTIALS)
    stack.record_airflow(state, airflow)
    state_file.write_text(json.dumps(state, indent=2))
    return state


def run_demo(run: Path, state: dict[str, Any], bake_seconds: int) -> int:
    password = Path(state["airflow_password_file"]).read_text().strip()
    api = AirflowAPI(state["urls"]["airflow"], state["airflow_user"], password)
    api.wait_for_dag("model_rollout")
    os.environ.update(S3_CREDENTIALS)  # the run folder is in the cluster's object store
    outbox = Folder(state["run_dir"]) / "outbox"
    results = []
    for candidate, baseline in (("2", "1"), ("3", "2")):
        conf = {
            **demo.DEMO_CONF,
            "mesh": "istio",
            "bake_seconds": bake_seconds,
            "candidate_version": candidate,
            "baseline_version": baseline,
        }
        results.append(demo.roll_out(api, outbox, conf))
        if results[-1]["outcome"] != "promote" and candidate == "2":
            break
    print("summary: " + "; ".join(f"v{r['candidate']}: {r['outcome']}" for r in results))
    return 0 if all(r["carried_out"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "demo"])
    p.add_argument("--run", type=Path, default=ROOT / "run")
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--airflow-port", type=int, default=8081)
    p.add_argument("--rate", type=float, default=50.0, help="load generator requests per second")
    p.add_argument("--scrape-interval", type=float, default=15.0)
    p.add_argument("--bake-seconds", type=int, default=300)
    args = p.parse_args(argv)
    if args.command == "down":
        stopped = stack.down(args.run, STATE, grace_s=120)  # the cluster stops its pods, each in its grace period
        # Those it could not (killed past the wait): every pod process left, by its pid file.
        stopped += [f"pod {name}" for name in kill_orphans(args.run / "cluster" / "pods")]
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    recorded = stack.recorded_up(args.run, STATE, stop="make cluster-down") if args.command == "demo" else None
    if recorded is not None:
        state = recorded
    else:
        state = up(args.run, args.repository.resolve(), args.airflow_port, args.rate, args.scrape_interval)
    for name, url in state["urls"].items():
        print(f"{name:12s} {url}")
    if args.command == "demo":
        return run_demo(args.run, state, args.bake_seconds)
    print(
        f"airflow login {state['airflow_user']}, password in {state['airflow_password_file']}; stop with: make cluster-down"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
