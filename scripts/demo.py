"""``make demo``: press "Trigger" twice, through Airflow's REST API, and read the evidence.

Brings the local stack up (``make up``: model server, Prometheus, load generator, Airflow) unless
it is up, then triggers ``model_rollout`` for digits version 2 against the stable version and
follows the run task by task: the stage verdicts, the decision and the Slack report (the outbox,
without a Slack token). Then the same for version 3 against version 2, now stable, which is
rolled back. Each demo starts from version 1 alone at 100%. Every threshold and margin is the
DAG's default; only the times are short: a 300 s bake (``--bake-seconds``) where the default is
600 s, and at most 900 s a stage where the default is an hour.
The stack stays up for the UI (the URL and login are printed); ``make down`` stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.airflow_api import FINISHED, AirflowAPI  # noqa: E402
from scripts import stack  # noqa: E402
from vision_rollout.folders import Folder  # noqa: E402

# Every threshold and margin at RolloutSpec's default; only the times are short (minutes, not hours).
DEMO_CONF = {"stages": [20, 50, 100], "max_stage_seconds": 900}


def start_from_version_1(state: dict[str, Any]) -> None:
    """The demo's starting point, also after an earlier demo: version 1 alone, at 100%."""
    route = stack.admin(state).traffic("digits").to_dict()["route"]
    if route != [{"version": "1", "weight": 100}]:
        print(f"resetting digits to version 1 at 100% (was {route})")
        stack.admin(state).serve_only("digits", "1")


def roll_out(api: AirflowAPI, outbox: Folder, conf: dict[str, Any], timeout_s: float = 3600) -> dict[str, Any]:
    """Trigger one rollout, print each task as it ends, then the verdicts and the report."""
    run_id = api.trigger("model_rollout", conf)
    print(
        f"\n=== model_rollout: digits v{conf['candidate_version']} against v{conf['baseline_version']} (run {run_id})",
        flush=True,
    )
    started, seen = time.monotonic(), set()
    while True:
        run = api.run("model_rollout", run_id)
        tis = api.task_instances("model_rollout", run_id)
        for task_id, ti in sorted(tis.items(), key=lambda kv: kv[1].get("start_date") or "~"):
            if ti["state"] in ("success", "failed", "skipped", "upstream_failed") and task_id not in seen:
                seen.add(task_id)
                if ti["state"] != "skipped" or not task_id.startswith("stage_"):
                    print(f"  {time.monotonic() - started:6.1f} s  {task_id:28s} {ti['state']}", flush=True)
        if run["state"] in FINISHED or time.monotonic() - started > timeout_s:
            break
        time.sleep(2)
    outcome = api.xcom("model_rollout", run_id, "decide", "outcome")
    reason = api.xcom("model_rollout", run_id, "decide", "reason")
    print(f"\nrun {run['state']}; decision: {str(outcome).upper()}: {reason}")
    for i in range(1, len(conf["stages"]) + 1):
        verdict = stage_verdict(api, run_id, i)
        if verdict is None:
            continue
        print(f"  stage {i} ({conf['stages'][i - 1]}%): {verdict['summary']}")
        for check in verdict["checks"]:
            if check["decision"] in ("pass", "fail", "wait"):
                print(f"      [{check['decision']}] {check['name']}: {check['sentence']}")
    reports = [name for name in outbox.names() if name.endswith(".json")]
    if reports:
        message = json.loads(outbox.read(reports[-1]))
        print(f"\nSlack report ({message['channel']}, saved in {outbox}/{reports[-1]}):\n  {message['text']}")
    print(f"\nthe run in the UI: {api.url}/dags/model_rollout/runs/{run_id}")
    return {
        "candidate": conf["candidate_version"],
        "run_id": run_id,
        "state": run["state"],
        "outcome": outcome,
        "reason": reason,
        "carried_out": carried_out(run["state"], outcome, tis),
    }


def carried_out(state: str, outcome: Any, tis: dict[str, Any]) -> bool:
    """Whether a run carried out its decision and nothing else failed: a promotion ends success;
    a rollback ends failed by its ``outcome`` task (it fails a rolled-back run on purpose), beside
    the stage's tasks that condemned the candidate (a stage that did not pass fails its wait)."""
    if state == "success":
        return outcome == "promote"
    failed = {task_id for task_id, ti in tis.items() if ti["state"] == "failed"}
    others = {task_id for task_id in failed - {"outcome"} if not task_id.startswith("stage_")}
    rolled_back = tis.get("rollback", {}).get("state") == "success"
    return state == "failed" and outcome == "rollback" and rolled_back and "outcome" in failed and not others


def stage_verdict(api: Any, run_id: str, stage: int) -> dict[str, Any] | None:
    """A stage's verdict: statistical_gate's, or (a stage that failed its test or ended undecided
    fails its wait) the wait's XCom ``verdict``; None for a stage that gave none."""
    for task_id, key in (
        (f"stage_{stage}.statistical_gate", "return_value"),
        (f"stage_{stage}.wait_for_metrics", "verdict"),
    ):
        try:
            return api.xcom("model_rollout", run_id, task_id, key)
        except RuntimeError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "run")
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--bake-seconds", type=int, default=300)
    p.add_argument("--port", type=int, default=8000, help="the model server's, when the stack is started")
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--airflow-port", type=int, default=8080)
    args = p.parse_args(argv)
    state = stack.recorded_up(args.run)
    if state is not None and "airflow" in state["urls"]:
        print(f"the stack is up (started {state['started']})")
    else:
        print("make up: model server, Prometheus, load generator, Airflow ...", flush=True)
        state = stack.up(args.run, args.repository, args.port, args.prometheus_port, args.airflow_port, rate=50)
    password = Path(state["airflow_password_file"]).read_text().strip()
    api = AirflowAPI(state["urls"]["airflow"], state["airflow_user"], password)
    api.wait_for_dag("model_rollout")
    start_from_version_1(state)
    results = []
    for candidate, baseline in (("2", "1"), ("3", "2")):  # v3 against the version v2's rollout left stable
        conf = {
            **DEMO_CONF,
            "bake_seconds": args.bake_seconds,
            "candidate_version": candidate,
            "baseline_version": baseline,
        }
        results.append(roll_out(api, Folder(str(args.run)) / "outbox", conf))
        if results[-1]["outcome"] != "promote" and candidate == "2":
            break  # v2 was not promoted: v3 has no v2 baseline to go against
    print(
        f"\nAirflow UI: {api.url} (login {state['airflow_user']}, password in {state['airflow_password_file']}); "
        "stop everything with: make down"
    )
    print("summary: " + "; ".join(f"v{r['candidate']}: {r['outcome']}" for r in results))
    return 0 if all(r["carried_out"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
