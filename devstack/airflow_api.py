"""A small client of Airflow's REST API (v2): log in, unpause, trigger with conf, follow a run,
answer a human-in-the-loop request.

What ``make demo``, the REST-trigger test and the rollout benchmark use to press "Trigger" the
way the UI does. Only the stable public API: ``/auth/token`` and ``/api/v2``.
"""

from __future__ import annotations

import time
from typing import Any

import requests

FINISHED = {"success", "failed"}
ENDED = {"success", "failed", "skipped", "upstream_failed", "removed"}  # a task instance's last states


class AirflowAPIError(RuntimeError):
    pass


class AirflowAPI:
    def __init__(self, url: str, username: str, password: str, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        r = self.session.post(
            f"{self.url}/auth/token", json={"username": username, "password": password}, timeout=timeout_s
        )
        if r.status_code not in (200, 201):
            raise AirflowAPIError(f"login as {username!r} refused: {r.status_code} {r.text[:300]}")
        self.session.headers["Authorization"] = f"Bearer {r.json()['access_token']}"

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.session.request(method, f"{self.url}/api/v2{path}", timeout=self.timeout_s, **kw)
        if r.status_code >= 400:
            raise AirflowAPIError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """The DAG once the DAG processor has parsed it; import errors are raised, not waited on."""
        deadline = time.monotonic() + timeout_s
        while True:
            errors = self._call("GET", "/importErrors")["import_errors"]
            if errors:
                raise AirflowAPIError("DAG import errors: " + "; ".join(e["stack_trace"][-500:] for e in errors))
            try:
                return self._call("GET", f"/dags/{dag_id}")
            except AirflowAPIError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1)

    def trigger(self, dag_id: str, conf: dict[str, Any], unpause: bool = True) -> str:
        if unpause:
            self._call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        run = self._call("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        return str(run["dag_run_id"])

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def mark_failed(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """What "Mark run as failed" in the UI does: running tasks stop, teardowns still run."""
        return self._call("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}", json={"state": "failed"})

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        tis = self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return {t["task_id"]: t for t in tis["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self._call("GET", path, params={"deserialize": True})["value"]

    def wait_for_task(
        self, dag_id: str, run_id: str, task_id: str, states: set[str], timeout_s: float = 600.0
    ) -> dict[str, Any]:
        """The task instance once it is in one of ``states`` (an error at once if it ends in another)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ti = self.task_instances(dag_id, run_id).get(task_id, {})
            if ti.get("state") in states:
                return ti
            if ti.get("state") in ENDED:
                raise AirflowAPIError(f"{task_id} ended {ti['state']}, never reached {sorted(states)}")
            if time.monotonic() > deadline:
                raise AirflowAPIError(f"{task_id} never reached {sorted(states)} (last: {ti.get('state')})")
            time.sleep(1)

    def hitl(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        """A human-in-the-loop task's request: subject, body, options, and the answer once given."""
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails")

    def respond(self, dag_id: str, run_id: str, task_id: str, *chosen: str) -> dict[str, Any]:
        """Answer a human-in-the-loop task, as a reviewer does under "Required Actions"."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails"
        return self._call("PATCH", path, json={"chosen_options": list(chosen), "params_input": {}})

    def wait(self, dag_id: str, run_id: str, timeout_s: float = 600.0, poll_s: float = 2.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.run(dag_id, run_id)
            if run["state"] in FINISHED:
                return run
            if time.monotonic() > deadline:
                raise AirflowAPIError(f"run {run_id} still {run['state']} after {timeout_s:g} s")
            time.sleep(poll_s)
