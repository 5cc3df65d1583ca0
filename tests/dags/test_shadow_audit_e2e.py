"""dag.test() of shadow_audit: an hour with shadow records gets a report, sent to the channel the
run names; an empty hour is skipped."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import ROOT
from tests.support import shadow_log

pytestmark = pytest.mark.integration


def test_hourly_audit_reports_and_skips_empty_hours(airflow_db, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    log = shadow_log(tmp_path, 120, disagree=0.02)  # records written just now
    extra = {"shadow_log": str(log), "run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    dag = DagBag(dag_folder=str(ROOT / "dags" / "shadow_audit.py")).dags["shadow_audit"]
    now = datetime.now(UTC)
    # a manual run audits the hour before it
    run = dag.test(logical_date=now + timedelta(minutes=1), run_conf={"slack_channel": "#vision-audit"})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["audit_previous_hour"] == "success"
    reports = list((tmp_path / "run" / "audits" / "digits").glob("*/report.md"))
    assert len(reports) == 1
    assert "Top-1 agreement" in reports[0].read_text()
    assert list((tmp_path / "run" / "outbox").glob("*.png"))  # the chart went with the Slack report
    [sent] = [json.loads(p.read_text()) for p in (tmp_path / "run" / "outbox").glob("*.json")]
    assert sent["channel"] == "#vision-audit"  # the run's Param, not the default
    time.sleep(0.01)
    empty = dag.test(logical_date=now - timedelta(days=2))
    assert {ti.task_id: ti.state for ti in empty.get_task_instances()}["audit_previous_hour"] == "skipped"
