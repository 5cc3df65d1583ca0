"""``python -m devstack.airflow_main COMPONENT [FLAGS]``: Airflow's command line, with the modules
the rollout's tasks run imported first.

The local stack's LocalExecutor forks its workers from the scheduler, and each task from a
worker: a task process inherits what the scheduler imported, and otherwise imports it again
itself (the DAG file's pod operator and the kubernetes clients, pandas, pyarrow and scipy for
the gates and the audit: seconds of CPU for every task, each sensor poke included). Only the
dev stack starts Airflow this way; a production worker (Celery, Kubernetes executor) is not
started from here.
"""

from __future__ import annotations

import importlib
import sys

# What build_image, the stages' pokes and gates, the audit and the report import when they run.
TASK_MODULES = (
    "airflow.providers.cncf.kubernetes.operators.pod",
    "airflow.providers.standard.operators.hitl",
    "rollout_airflow.operators",
    "rollout_airflow.sensors",
    "rollout_airflow.steps",
    "vision_rollout.audit",
    "vision_rollout.deploy",
    "vision_rollout.engine",
    "vision_rollout.gates",
    "vision_rollout.images",
    "vision_rollout.mesh",
    "vision_rollout.metrics",
    "vision_rollout.notify",
    "vision_rollout.replay",
    "matplotlib.pyplot",
)


def preload(component: str) -> None:
    """The scheduler only: its LocalExecutor's workers are its forks."""
    if component == "scheduler":
        import matplotlib

        matplotlib.use("Agg")  # (as the report's chart sets it: no display here)
        for name in TASK_MODULES:
            importlib.import_module(name)


def main() -> None:
    from airflow.__main__ import main as airflow

    preload(sys.argv[1] if len(sys.argv) > 1 else "")
    sys.argv[0] = "airflow"
    sys.exit(airflow())


if __name__ == "__main__":
    main()
