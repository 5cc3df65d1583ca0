"""dag.test() of shadow_audit: an hour with shadow records gets a report, sent to the channel the
run names; an empty hour is skipped."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import ROOT
from tests.support import files_under, shadow_log

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("store", ["folder", "s3"])
def test_hourly_audit_reports_and_skips_empty_hours(airflow_db, tmp_path, monkeypatch, request, store):
    """The report and the Slack report's outbox in the run folder: a folder, or an object store
    (Kubernetes mode: the task's pod takes its own disk with it)."""
    from airflow.dag_processing.dagbag import DagBag

    now = datetime.now(UTC)
    log = shadow_log(tmp_path, 120, disagree=0.02, at=(now - timedelta(hours=2)).timestamp())
    run_dir = request.getfixturevalue("s3").uri() if store == "s3" else str(tmp_path / "run")
    extra = {"shadow_log": str(log), "run_dir": run_dir}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    dag = DagBag(dag_folder=str(ROOT / "dags" / "shadow_audit.py")).dags["shadow_audit"]
    # a run audits the clock hour before it (that of the records)
    run = dag.test(logical_date=now - timedelta(hours=1), run_conf={"slack_channel": "#vision-audit"})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["audit_hours"] == "success"
    files = files_under(run_dir)
    reports = [name for name in files if re.fullmatch(r"audits/digits/\d{8}T\d{2}/report\.md", name)]
    assert len(reports) == 1
    assert "Top-1 agreement" in files[reports[0]].decode()
    outbox = {name.removeprefix("outbox/"): data for name, data in files.items() if name.startswith("outbox/")}
    assert [name for name in outbox if name.endswith(".png")]  # the chart went with the Slack report
    [sent] = [json.loads(data) for name, data in outbox.items() if name.endswith(".json")]
    assert sent["channel"] == "#vision-audit"  # the run's Param, not the default
    time.sleep(0.01)
    empty = dag.test(logical_date=now - timedelta(days=2))
    assert {ti.task_id: ti.state for ti in empty.get_task_instances()}["audit_hours"] == "skipped"


def test_a_run_triggered_without_a_logical_date_audits_the_last_whole_hour(airflow_db, tmp_path, monkeypatch):
    """A run triggered through the REST API as Airflow 3 takes it (`"logical_date": null`), or
    from the UI without a date, has no data interval: every audit_hours failed at once
    ("missing 1 required positional argument: 'data_interval_end'"). It audits the last whole
    hour before the run was triggered (`run_after`), the same hour on a retry."""
    from airflow.dag_processing.dagbag import DagBag

    now = datetime.now(UTC)
    log = shadow_log(tmp_path, 120, disagree=0.02, at=(now - timedelta(hours=2)).timestamp())
    extra = {"prediction_log": str(log), "run_dir": str(tmp_path / "run")}
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DEFAULT", json.dumps({"conn_type": "http", "extra": extra}))
    dag = DagBag(dag_folder=str(ROOT / "dags" / "shadow_audit.py")).dags["shadow_audit"]
    run = dag.test(logical_date=None, run_after=now - timedelta(hours=1))
    assert {ti.task_id: ti.state for ti in run.get_task_instances()}["audit_hours"] == "success"
    hour = (now - timedelta(hours=2)).strftime("%Y%m%dT%H")
    assert "Top-1 agreement" in files_under(str(tmp_path / "run"))[f"audits/digits/{hour}/report.md"].decode()
