"""Airflow's metadata database (SQLite in the temporary AIRFLOW_HOME), migrated once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    db = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"  # set by tests/conftest.py
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, env={**os.environ}
    )
    return db
