"""DAG integrity: every file imports, the rollout DAG reads as its steps, policy holds."""

from __future__ import annotations

import pytest

from devstack.processes import PYTHONPATH
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_model_rollout_has_the_seven_steps(dagbag):
    dag = dagbag.dags["model_rollout"]
    ids = set(dag.task_ids)
    for step in (
        "build_image",
        "stage_1.apply_mesh_weights",
        "stage_1.enable_shadow",
        "stage_1.wait_for_metrics",
        "stage_1.statistical_gate",
        "shadow_consistency",
        "decide",
        "promote",
        "rollback",
        "notify",
    ):
        assert step in ids, step
    assert {f"stage_{i}.statistical_gate" for i in (2, 3, 4)} <= ids
    assert dag.max_active_runs > 1  # one run at a time per model (its lease), not per DAG
    assert dag.get_task("ensure_stable").upstream_task_ids >= {"build_image"}  # the lease's taker is the setup
    assert dag.get_task("outcome").upstream_task_ids == {"notify"}  # a rollback fails the run once reported
    assert dag.schedule is None
    assert set(dag.tags) >= {"rollout"}


def test_the_hourly_audit_runs_once_its_hour_is_written(dagbag):
    """@hourly ran at the hour's end, while the writers still held its last minute of records:
    each run waited minutes in a worker slot. Runs come four minutes past the hour, the first
    whole minute after the previous clock hour's close (``closes``: 3 min 6 s, ``copy_due``) and
    its last file's write, when its records (its last copies too, a shadow pod's clock ahead, a
    copy's wait for idle time) are all written: they wait for nothing; a minute earlier, they
    would wait for the close."""
    from datetime import UTC, datetime, timedelta

    from vision_rollout.audit import audited_hour

    dag = dagbag.dags["shadow_audit"]
    assert dag.schedule == "4 * * * *"
    run_at = datetime(2026, 12, 2, 10, 4, tzinfo=UTC)
    assert audited_hour(run_at, run_at) == (
        datetime(2026, 12, 2, 9, tzinfo=UTC),
        datetime(2026, 12, 2, 10, tzinfo=UTC),
        0.0,
    )
    earlier = run_at - timedelta(minutes=1)
    assert audited_hour(earlier, earlier)[2] > 0


def test_the_wait_reschedules_and_promotion_can_ask_a_reviewer(dagbag):
    from airflow.providers.standard.operators.hitl import HITLOperator

    from rollout_airflow.sensors import StageMetricsSensor

    dag = dagbag.dags["model_rollout"]
    waits = [dag.get_task(f"stage_{i}.wait_for_metrics") for i in (1, 2, 3, 4)]
    assert all(isinstance(w, StageMetricsSensor) and w.mode == "reschedule" for w in waits)
    approval = dag.get_task("approve_promotion")
    assert isinstance(approval, HITLOperator)
    assert approval.options == ["Promote", "Roll back"]
    assert approval.defaults == ["Roll back"]  # no answer in time rolls back
    assert approval.upstream_task_ids == {"shadow_consistency"}
    assert approval.downstream_task_ids == {"decide"}


def test_params_come_from_the_spec_schema(dagbag):
    from vision_rollout.spec import RolloutSpec

    params = dagbag.dags["model_rollout"].params
    schema = RolloutSpec.json_schema()["properties"]
    assert set(params.keys()) == set(schema)
    assert params["stages"] == [5, 25, 50, 100]
    assert params.get_param("alpha").schema["maximum"] == 0.2
    assert params.get_param("mesh").schema["enum"] == ["local", "istio"]
    assert all(params.get_param(k).schema.get("section") for k in schema)


def test_the_form_carries_every_range_of_the_spec(dagbag):
    """The trigger form (and the REST API, which checks a conf against the same Params) refuses a
    number out of its range before the run, as the spec does for rolloutctl; stages are the DAG's
    stage groups at most."""
    from vision_rollout.spec import RolloutSpec

    dag = dagbag.dags["model_rollout"]
    params, groups = dag.params, [t for t in dag.task_ids if t.endswith(".apply_mesh_weights")]
    bounds = ("minimum", "maximum", "exclusiveMinimum", "items", "minItems")
    for name, prop in RolloutSpec.json_schema()["properties"].items():
        schema = params.get_param(name).schema
        assert {k: schema.get(k) for k in bounds} == {k: prop.get(k) for k in bounds}, name
    assert params.get_param("stages").schema["maxItems"] == len(groups) == 4
    assert len(groups) <= RolloutSpec.json_schema()["properties"]["stages"]["maxItems"]


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        ({"bake_seconds": 3_000_000}, "bake_seconds"),
        ({"max_stage_seconds": 10**9}, "max_stage_seconds"),
        ({"looks_per_stage": 10**6}, "looks_per_stage"),
        ({"min_samples": 10**12}, "min_samples"),
        ({"p99_ms_max": 1e300}, "p99_ms_max"),
        ({"p99_breach_seconds": 10**9}, "p99_breach_seconds"),
        ({"alpha": 5e-324}, "alpha"),
        ({"stages": [10, 20, 30, 50, 100]}, "stages"),
        ({"bake_seconds": "600"}, "bake_seconds"),
        ({"require_approval": "false"}, "require_approval"),
        ({"bake_seconds": 600.5}, "bake_seconds"),
    ],
)
def test_the_form_refuses_a_number_out_of_range_naming_it(dagbag, conf, field):
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dagbag.dags["model_rollout"].params)
    with pytest.raises(ParamValidationError, match=f"param {field}:"):  # noqa: PT012 (checked as it is set)
        params.update(conf)
        params.validate()


def test_every_dag_has_an_owner_tags_and_its_retries(dagbag):
    """Retries where a retry computes the same thing again (the image build, the stage waits, the
    hourly audit); none on the steps that change traffic or decide: a failure there is handled
    by the teardown and the failure callback, not repeated."""
    for dag in dagbag.dags.values():
        assert dag.tags
        assert {t.owner for t in dag.tasks} == {"ml-platform"}
    retries = {t.task_id: t.retries for t in dagbag.dags["model_rollout"].tasks}
    for task_id, n in retries.items():
        repeatable = ("build_image", "buildkit_build", "deploy_candidate")  # verify, load, build, apply: idempotent
        expected = 2 if task_id.endswith(".wait_for_metrics") else 1 if task_id in repeatable else 0
        assert n == expected, (task_id, n)
    assert {t.retries for t in dagbag.dags["shadow_audit"].tasks} == {1}


def test_the_readme_tells_notify_s_retries_as_the_dag_sets_them(dagbag):
    """The README said a notify killed once Slack took its post "is run again", its retry finding
    the post: notify has no retries (a failure there is the teardown's to handle)."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert dagbag.dags["model_rollout"].get_task("notify").retries == 0
    assert "is run again without posting it twice" not in readme
    assert "It is not retried (the DAG's `retries` is 0): a `notify` killed or stopped" in readme


def test_the_image_build_is_its_own_pod_task_between_verification_and_the_first_stage(dagbag):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk import conf

    dag = dagbag.dags["model_rollout"]
    build = dag.get_task("buildkit_build")
    assert isinstance(build, KubernetesPodOperator)
    assert build.deferrable == conf.getboolean("operators", "default_deferrable")  # Airflow's setting
    assert build.upstream_task_ids == {"build_image"}
    deploy = dag.get_task("deploy_candidate")
    assert deploy.upstream_task_ids == {"buildkit_build"}
    assert deploy.trigger_rule == "none_failed"  # runs after local mode's skipped build, not a failed one
    assert {"build_image", "deploy_candidate"} <= dag.get_task("stage_1.apply_mesh_weights").upstream_task_ids


def test_the_metrics_waits_retry(dagbag):
    """A retried wait judges the same looks again (the engine keeps no state in the task)."""
    waits = [t for t in dagbag.dags["model_rollout"].tasks if t.task_id.endswith(".wait_for_metrics")]
    assert len(waits) == 4
    assert all(t.retries >= 1 for t in waits)


def last_line(code: str) -> str:
    """What ``code`` prints last, run in a fresh interpreter (a parse starts with no module)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_parsing_imports_nothing_heavy():
    """The numerical and serving libraries load in the tasks, never at parse time. The kubernetes
    client does: the image build is the cncf provider's KubernetesPodOperator, its own task."""
    code = (
        "import runpy, sys\n"
        "for f in ('dags/model_rollout.py', 'dags/shadow_audit.py'): runpy.run_path(f)\n"
        "print(sorted(m for m in ('pandas', 'scipy', 'numpy', 'onnxruntime', 'matplotlib', 'tritonclient')"
        " if m in sys.modules))"
    )
    assert last_line(code) == "[]"


def test_the_pod_operator_is_imported_once_before_the_dag_processor_forks():
    """Airflow's dag processor imports the ``airflow.*`` modules a DAG file names before it forks
    the process that parses it (``[dag_processor] parsing_pre_import_modules``): the DAG file
    names the pod operator the image build is, so it and the kubernetes clients (1.2 s of the
    1.4 s a parse took) are not imported again at every parse."""
    code = (
        "import runpy, sys, structlog\n"
        "from airflow.dag_processing.processor import _pre_import_airflow_modules\n"
        "files = ('dags/model_rollout.py', 'dags/shadow_audit.py')\n"
        "for f in files: _pre_import_airflow_modules(f, structlog.get_logger())\n"
        "before = set(sys.modules)\n"
        "for f in files: runpy.run_path(f)\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(('airflow.providers.cncf', 'kubernetes'))))"
    )
    assert last_line(code) == "[]"


def test_shadow_audit_dag(dagbag):
    dag = dagbag.dags["shadow_audit"]
    assert dag.max_active_runs == 1
    assert not dag.catchup
    assert dag.params["models"] == ["digits"]


@pytest.mark.parametrize(
    "conf",
    [
        {"models": ["digits", "digits"]},
        {"models": ["../digits"]},
        {"models": [f"m{i}" for i in range(1025)]},
        {"slack_channel": "#" + "x" * 100_000},
        {"slack_channel": "<!channel>"},
    ],
)
def test_the_audit_form_takes_models_and_a_channel_as_a_rollout_does(dagbag, conf):
    """Each model once (twice, its two mapped audits raced on the same hours and reported each
    twice), named as a rollout names it, and a Slack channel's name."""
    import copy

    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dagbag.dags["shadow_audit"].params)  # (its Params take the values given)
    assert params.validate()["models"] == ["digits"]
    with pytest.raises(ParamValidationError):  # noqa: PT012 (a value is checked as it is set)
        params.update(conf)
        params.validate()
