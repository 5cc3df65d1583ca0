"""``python -m tests.dags.dag_run CONF``: one ``dag.test()`` of model_rollout in a process of its
own, as a second Airflow would run it (its own database: ``AIRFLOW_HOME`` and the SQLAlchemy
URL from the environment). The last line printed is the run's state and its tasks' as JSON."""

from __future__ import annotations

import json
import sys

from tests.dags.idle_pause import quick_idle_pause
from tests.dags.test_model_rollout_e2e import rollout_dag


def main() -> None:
    with quick_idle_pause():
        run = rollout_dag().test(run_conf=json.loads(sys.argv[1]))
    tasks = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print(json.dumps({"state": str(run.state), "tasks": tasks}))


if __name__ == "__main__":
    main()
