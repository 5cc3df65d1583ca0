"""`make up` starts the whole local stack, Airflow included; a rollout triggered through the REST
API with conf runs to promotion; the UI shows the run (headless Chromium); `make down` stops
exactly what `make up` started."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from devstack.airflow_api import AirflowAPI, AirflowAPIError
from devstack.processes import alive, free_port
from scripts import stack
from vision_rollout.metrics import PrometheusSource, ScrapeSource, wait_for_value

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# Wiring, not the defaults; no mirror: a candidate that also runs every mirrored copy measures
# tens of percent slower than the baseline on a busy 2-core machine.
CONF = {
    "candidate_version": "2",
    "stages": [50, 100],
    "bake_seconds": 6,
    "looks_per_stage": 2,
    "min_samples": 100,
    "latency_margin": 1.0,
    "error_margin": 0.05,
    "accuracy_margin": 0.02,
    "mirror_percent": 0,
}


@pytest.fixture(scope="module")
def up(models_dir, tmp_path_factory):
    """`make up` (the same command line, on free ports)."""
    import contextlib
    import io

    run = tmp_path_factory.mktemp("stack") / "run"
    ports = [str(free_port()) for _ in range(3)]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = stack.main(
                [
                    "up",
                    "--run",
                    str(run),
                    "--repository",
                    str(models_dir),
                    "--port",
                    ports[0],
                    "--prometheus-port",
                    ports[1],
                    "--airflow-port",
                    ports[2],
                ]
            )
        assert code == 0
        state = json.loads((run / stack.STATE).read_text())
        state["printed"] = out.getvalue()
        yield run, state
    finally:
        stack.down(run)  # idempotent: test_down checks it


@pytest.fixture(scope="module")
def api(up):
    _, state = up
    return AirflowAPI(
        state["urls"]["airflow"], state["airflow_user"], Path(state["airflow_password_file"]).read_text().strip()
    )


def wait_until_the_scheduler_saw_the_pause(scheduler_log: Path, run_id: str) -> None:
    """Airflow 3.3.2 fails a HITL task answered before the scheduler has seen its first process
    exit ("executor reported success, but the task instance's state is queued"). A reviewer takes
    longer than that; a test waits until the scheduler has logged the pause."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        "TaskInstance Finished" in line
        and "task_id=approve_promotion" in line
        and run_id in line
        and "state=deferred" in line
        for line in scheduler_log.read_text().splitlines()
    ):
        time.sleep(0.5)


@pytest.fixture(scope="module")
def promoted_run(up, api):
    """Version 2 with require_approval: the run waits for a reviewer, who answers Promote."""
    scheduler_log = up[0] / "airflow" / "logs" / "scheduler.log"
    api.wait_for_dag("model_rollout")
    run_id = api.trigger("model_rollout", {**CONF, "require_approval": True})
    waiting = api.wait_for_task("model_rollout", run_id, "approve_promotion", {"deferred"}, timeout_s=240)
    wait_until_the_scheduler_saw_the_pause(scheduler_log, run_id)
    request = api.hitl("model_rollout", run_id, "approve_promotion")
    answer = api.respond("model_rollout", run_id, "approve_promotion", "Promote")
    return run_id, api.wait("model_rollout", run_id, timeout_s=120), waiting, request, answer


def test_up_starts_every_service(up):
    run, state = up
    assert all(alive(p) for p in state["pids"].values())
    assert {"airflow_scheduler", "airflow_dag-processor", "airflow_triggerer", "airflow_api-server"} <= set(
        state["pids"]
    )
    for secret in (run / "admin-token", Path(state["airflow_password_file"]), run / "airflow" / "jwt-secret"):
        assert oct(secret.stat().st_mode & 0o777) == "0o600"
    server = ScrapeSource(state["urls"]["model_server"])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and server.query('nv_inference_request_success{model="digits"}') < 20:
        time.sleep(0.5)
    assert server.query('nv_inference_request_success{model="digits"}') >= 20  # the load generator runs
    assert wait_for_value(PrometheusSource(state["urls"]["prometheus"]), 'sum(up{job="model-server"})') == 1
    password = Path(state["airflow_password_file"]).read_text().strip()
    assert f"airflow       {state['urls']['airflow']}  (login admin, password in " in state["printed"]
    assert password not in state["printed"]  # the file is named, the secret is not shown
    assert "stop with: make down" in state["printed"]
    with urllib.request.urlopen(state["urls"]["airflow"] + "/api/v2/monitor/health", timeout=10) as r:
        health = json.load(r)
    assert {health[c]["status"] for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")} == {"healthy"}
    with pytest.raises(SystemExit, match="already up"):
        stack.up(run, Path("models"), free_port(), free_port(), free_port(), rate=30)


def test_every_service_listens_on_loopback_only(up):
    _, state = up
    pids = set(state["pids"].values())
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state_hex = line.split()[1], line.split()[3]
            if state_hex == "0A":  # LISTEN
                listening.add((local.split(":")[0], int(local.split(":")[1], 16), line.split()[9]))
    inodes = {}
    for pid in pids:
        for child in [pid, *_descendants(pid)]:
            for fd in Path(f"/proc/{child}/fd").glob("*"):
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = child
    ours = [(addr, port) for addr, port, inode in listening if inode in inodes]
    assert ours, "no listening sockets found for the stack"
    loopback = {"0100007F", "00000000000000000000000001000000"}
    assert all(addr in loopback for addr, _ in ours), ours


def _descendants(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            out += [child, *_descendants(child)]
    return out


def test_the_rest_api_refuses_a_wrong_password(up):
    _, state = up
    with pytest.raises(AirflowAPIError, match="refused: 401"):
        AirflowAPI(state["urls"]["airflow"], "admin", "not-the-password")


def test_a_rest_triggered_run_with_conf_promotes_version_2(up, api, promoted_run):
    run_dir, state = up
    run_id, run, waiting, request, answer = promoted_run
    assert waiting["state"] == "deferred"  # promotion waited for an answer (the guards read meanwhile)
    assert request["subject"] == "Promote digits v2 to 100%?"
    assert request["options"] == ["Promote", "Roll back"]
    assert "**50%**" in request["body"]  # the reviewer reads each stage's verdict
    assert answer["chosen_options"] == ["Promote"]
    assert run["state"] == "success"
    assert run["conf"]["candidate_version"] == "2"
    assert run["conf"]["stages"] == [50, 100]
    tis = api.task_instances("model_rollout", run_id)
    assert tis["promote"]["state"] == "success"
    assert tis["rollback"]["state"] == "skipped"
    assert api.xcom("model_rollout", run_id, "decide", "outcome") == "promote"
    assert "approved by admin" in api.xcom("model_rollout", run_id, "decide", "reason")
    gates = [api.xcom("model_rollout", run_id, f"stage_{i}.statistical_gate") for i in (1, 2)]
    assert [g["decision"] for g in gates] == ["pass", "pass"]
    # The wait poked in reschedule mode: each poke logged where the stage stood, the last its pass.
    logs = (
        run_dir / "airflow" / "logs" / "dag_id=model_rollout" / f"run_id={run_id}" / "task_id=stage_1.wait_for_metrics"
    )
    poke_log = "".join(p.read_text() for p in logs.glob("*.log"))
    assert "stage 1 (50%): pass, look " in poke_log  # the last poke's line (earlier ones waited, if any)
    assert gates[0]["bake"]["served"]["canary"]["live"] > 0  # the live arm, from the prediction log
    assert stack.admin(state).traffic("digits").to_dict()["route"] == [{"version": "2", "weight": 100}]


def test_the_ui_shows_the_run_with_its_tasks(up, promoted_run, tmp_path):
    from playwright.sync_api import sync_playwright

    if shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is not installed: `make chromium` installs it")

    _, state = up
    run_id = promoted_run[0]
    shot = tmp_path / "model_rollout-run.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(state["urls"]["airflow"] + f"/dags/model_rollout/runs/{run_id}")
            page.wait_for_url("**/auth/login**")  # the UI asks for the login first
            page.fill("input[name=username]", state["airflow_user"])
            page.fill("input[name=password]", Path(state["airflow_password_file"]).read_text().strip())
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/auth/login" not in url, timeout=30_000)
            page.goto(state["urls"]["airflow"] + f"/dags/model_rollout/runs/{run_id}")
            page.get_by_text("stage_1.statistical_gate").first.wait_for(timeout=30_000)
            page.screenshot(path=str(shot), full_page=True)
            text = page.inner_text("body")
        finally:
            browser.close()
    assert run_id in text
    for task_id in (
        "build_image",
        "stage_1.apply_mesh_weights",
        "stage_1.enable_shadow",
        "stage_1.wait_for_metrics",
        "stage_1.statistical_gate",
        "shadow_consistency",
        "approve_promotion",
        "decide",
        "promote",
        "rollback",
        "notify",
    ):
        assert task_id in text
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000


def test_a_run_marked_failed_mid_stage_leaves_stable_at_100_percent(up, api, promoted_run):
    """What a user does to stop a rollout: mark the run failed in the UI (here: the same REST call).
    The teardown restores the stable version and says so in Slack (notify never runs)."""
    run_dir, state = up

    def routes() -> dict:
        return stack.admin(state).traffic("digits").to_dict()

    run_id = api.trigger(
        "model_rollout",
        {**CONF, "candidate_version": "3", "baseline_version": "2", "bake_seconds": 600, "max_stage_seconds": 900},
    )
    api.wait_for_task("model_rollout", run_id, "stage_1.wait_for_metrics", {"up_for_reschedule"}, timeout_s=240)
    assert routes()["route"] == [{"version": "2", "weight": 50}, {"version": "3", "weight": 50}]  # mid-stage
    api.mark_failed("model_rollout", run_id)
    teardown = api.wait_for_task("model_rollout", run_id, "ensure_stable", {"success", "failed"}, timeout_s=120)
    assert teardown["state"] == "failed"  # restored, then failed on purpose: the run did not decide
    assert routes() == {"route": [{"version": "2", "weight": 100}]}  # stable back, mirror off
    assert api.wait("model_rollout", run_id, timeout_s=60)["state"] == "failed"
    reports = [json.loads(p.read_text())["text"] for p in sorted((run_dir / "outbox").glob("*.json"))]
    assert any(t.startswith("Rolled back digits v3: the run was stopped before it decided") for t in reports), reports


def test_the_demo_rolls_version_3_back_and_starts_again_from_version_1(up, api, promoted_run, capsys):
    from scripts import demo
    from vision_rollout.folders import Folder

    run_dir, state = up
    result = demo.roll_out(
        api,
        Folder(str(run_dir)) / "outbox",
        {**demo.DEMO_CONF, "bake_seconds": 2, "candidate_version": "3", "baseline_version": "2"},
    )
    out = capsys.readouterr().out
    assert result["outcome"] == "rollback"
    assert (result["state"], result["carried_out"]) == ("failed", True)  # (outcome failed it, beside v3's stage)
    assert "decision: ROLLBACK" in out
    # The accuracy that condemns v3, with its numbers: the replay's guard, or (when live labels
    # land before the replay, as on a loaded machine) the live accuracy check.
    assert re.search(
        r"hard guard tripped: Accuracy drop on the validation batch is \+[\d.]+ pp"
        r"|accuracy_live: Live accuracy from feedback: canary [\d.]+% \(\d+/\d+\)",
        out,
    ), out
    assert "Slack report (#model-rollouts" in out
    assert stack.admin(state).traffic("digits").to_dict() == {"route": [{"version": "2", "weight": 100}]}
    demo.start_from_version_1(state)
    assert stack.admin(state).traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert stack.admin(state).call("GET", "/v2/models/digits")["versions"] == ["1"]


def restart_component(run: Path, state: dict, name: str) -> None:
    """SIGKILL an Airflow component's process group (a crash: no clean shutdown, its running
    children with it) and start it again as it was started: the same command, environment and
    folder; the stack's state names the new process, so that `make down` stops it."""
    import signal
    import subprocess

    pid = state["pids"][f"airflow_{name}"]
    cmd = [part.decode() for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    env = dict(kv.decode().split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    cwd = os.readlink(f"/proc/{pid}/cwd")
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with (run / "airflow" / "logs" / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state["groups"].remove(pid)
    stack.record(state, f"airflow_{name}", proc.pid, group=True)  # (its start mark too)
    (run / stack.STATE).write_text(json.dumps({k: v for k, v in state.items() if k != "printed"}, indent=2))


@pytest.mark.timeout(600)
def test_a_four_stage_rollout_of_ten_looks_survives_its_scheduler_and_triggerer_killed(up, api, promoted_run):
    """The defaults' number of looks (4 stages x 10) in the real Airflow, its scheduler killed
    while the first stage's wait is up for reschedule and its triggerer killed while the approval
    is deferred to it (each started again): every stage's wait pokes in reschedule mode until its
    looks decide, every wait succeeds (nothing is deferred, so Airflow 3.3's stale-event race on
    resumed deferrals has nothing to hit), and the run carries on to its promotion. Airflow 3
    counts each reschedule as a try, so try numbers say nothing here."""
    run, state = up
    stack.admin(state).serve_only("digits", "1")
    conf = {
        **CONF,
        # Four stages (the defaults' 5% first gives the canary too few requests to decide in 10 s
        # when the machine is busy: 42 in one run beside another test worker and two busy loops).
        "stages": [25, 50, 75, 100],
        "looks_per_stage": 10,
        # 10 looks a stage, a look due every 0.5 s: a poke (every 2 s at the least) judges the looks
        # due since the last, in order. The first poke sends the replay round, which the last look
        # waits for, so each stage is still up for reschedule at least once.
        "bake_seconds": 5,
        "max_stage_seconds": 120,
        "min_samples": 20,
        "require_approval": True,
    }
    run_id = api.trigger("model_rollout", conf)
    api.wait_for_task("model_rollout", run_id, "stage_1.wait_for_metrics", {"up_for_reschedule"}, timeout_s=240)
    restart_component(run, state, "scheduler")
    api.wait_for_task("model_rollout", run_id, "approve_promotion", {"deferred"}, timeout_s=600)
    restart_component(run, state, "triggerer")
    wait_until_the_scheduler_saw_the_pause(run / "airflow" / "logs" / "scheduler.log", run_id)
    api.respond("model_rollout", run_id, "approve_promotion", "Promote")
    final = api.wait("model_rollout", run_id, timeout_s=300)
    tis = api.task_instances("model_rollout", run_id)
    waits = [tis[f"stage_{i}.wait_for_metrics"] for i in (1, 2, 3, 4)]
    assert [w["state"] for w in waits] == ["success"] * 4, waits
    gates = [api.xcom("model_rollout", run_id, f"stage_{i}.statistical_gate") for i in (1, 2, 3, 4)]
    assert all(g["looks"] == 10 and 1 <= g["look"] <= 10 for g in gates)
    assert all(g["bake"]["elapsed_s"] >= conf["bake_seconds"] for g in gates if g["decision"] == "pass")
    assert final["state"] == "success"
    assert api.xcom("model_rollout", run_id, "decide", "outcome") == "promote"
    assert stack.admin(state).traffic("digits").to_dict() == {"route": [{"version": "2", "weight": 100}]}
    assert all(alive(p) for p in state["pids"].values())


def test_down_stops_exactly_what_up_started(up):
    run, state = up
    stopped = stack.down(run)
    assert sorted(stopped) == sorted(state["pids"])
    assert not any(alive(p) for p in state["pids"].values())
    assert not (run / "stack.json").exists()
    assert stack.down(run) == []


def test_a_restarted_stack_serves_the_version_its_restored_policy_routes_to(server_factory, repo_copy, tmp_path):
    """After `make down` and `make up`, a promoted version is routed (the policy persists) and served:
    the server restores its last load; a state folder from before loads persisted (a policy, no
    load record) is brought to agree by the stack, and the server is ready only then."""
    state = tmp_path / "state"
    server = server_factory(repo_copy, "--state-dir", str(state), token="t")
    server.load_versions("digits", 1, 2)
    r = requests.put(
        f"{server.http}/v2/models/digits/traffic",
        json={"route": [{"version": "2", "weight": 100}]},
        headers=server.admin,
        timeout=10,
    )
    assert r.status_code == 200
    server.load_versions("digits", 2)  # promoted: the baseline retired
    server.stop()
    again = server_factory(repo_copy, "--state-dir", str(state), token="t")
    assert again.client().get_model_metadata("digits")["versions"] == ["2"]
    again.stop()
    shutil.rmtree(state / "loads")  # as an older server left it
    old = server_factory(repo_copy, "--state-dir", str(state), token="t", until="live")
    assert not old.client().is_server_ready()
    stack.serve_what_is_routed(old)
    old.wait_until("ready")
    assert old.client().get_model_metadata("digits")["versions"] == ["2"]


def test_down_removes_the_copies_of_the_admin_token_earlier_starts_left(tmp_path):
    """Each model server start left a copy of the admin token in ``run/admin-token-<port>``; they
    piled up, readable after the token was rotated. ``make down`` removes them, the stack's own
    token file (``run/admin-token``, reused by the next ``make up``) kept."""
    for name in ("admin-token-8000", "admin-token-18123"):
        (tmp_path / name).write_text("an old token")
    (tmp_path / "admin-token").write_text("the stack's token")
    assert stack.down(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin-token"]
