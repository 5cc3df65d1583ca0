"""Airflow's metadata database (SQLite in the temporary AIRFLOW_HOME), migrated once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    db = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"  # set by tests/conftest.py
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env={**os.environ}
    )
    return db


@pytest.fixture(autouse=True)
def _quick_dag_test() -> Iterator[None]:
    """Every dag.test() here pauses briefly when idle instead of Airflow's 1 s (idle_pause.py)."""
    from tests.dags.idle_pause import quick_idle_pause  # imports Airflow: only where a test runs

    with quick_idle_pause():
        yield
