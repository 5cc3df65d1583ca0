"""What `make up` records of the processes it started, and what `make down` and `make demo` make
of a record that outlived them (a reboot, a killed process): only the very processes started
are stopped or trusted, never a later process given the same id."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.processes import alive, start_mark
from scripts import stack


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def recorded(run: Path, procs: dict[str, int], marks: dict[str, str | None]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    state = {"pids": procs, "marks": marks, "groups": [], "urls": {}, "started": "then"}
    (run / stack.STATE).write_text(json.dumps(state))
    return run / stack.STATE


def test_a_process_is_told_from_a_later_one_given_its_id(sleepers) -> None:
    first = start_mark(sleepers[0].pid)
    assert first is not None
    assert first == start_mark(sleepers[0].pid)
    assert first.split(":")[0] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    sleepers[0].kill()
    sleepers[0].wait()
    assert start_mark(sleepers[0].pid) is None


def test_down_stops_only_the_processes_it_started_not_others_with_their_ids(sleepers, tmp_path) -> None:
    ours, other = sleepers
    state_file = recorded(
        tmp_path / "run",
        {"server": ours.pid, "prometheus": other.pid},
        # `other` has the id a process recorded before a reboot had: another boot's mark.
        {"server": start_mark(ours.pid), "prometheus": "another-boot:1234"},
    )
    assert stack.running(json.loads(state_file.read_text())) == {"server": ours.pid}
    assert stack.down(tmp_path / "run", grace_s=10) == ["server"]
    assert ours.wait(timeout=10) is not None
    assert alive(other.pid)
    assert other.poll() is None
    assert not state_file.exists()


def test_a_stale_record_is_started_over_and_a_stack_partly_up_is_refused(sleepers, tmp_path) -> None:
    run = tmp_path / "run"
    assert stack.recorded_up(run) is None
    pids = {"server": sleepers[0].pid, "loadgen": sleepers[1].pid}
    recorded(run, pids, {"server": "another-boot:1", "loadgen": "another-boot:2"})
    assert stack.recorded_up(run) is None  # after a reboot: `make demo` starts the stack again
    recorded(run, pids, {"server": start_mark(sleepers[0].pid), "loadgen": start_mark(sleepers[1].pid)})
    state = stack.recorded_up(run)
    assert state is not None
    assert state["pids"] == pids
    recorded(run, pids, {"server": start_mark(sleepers[0].pid), "loadgen": "another-boot:2"})
    with pytest.raises(SystemExit, match=r"partly up \(server running, loadgen not\); run `make down` first"):
        stack.recorded_up(run)
    with pytest.raises(SystemExit, match="run `make down` first"):
        stack.up(run, tmp_path / "models", 1, 2, 3, rate=1.0)


@pytest.mark.parametrize("taken", ["model server", "Prometheus", "Airflow"])
def test_up_refuses_a_port_another_process_listens_on_before_starting_anything(tmp_path, taken) -> None:
    """Another user's model server on :8000 answered `make up`'s readiness check in place of its
    own (which then failed to bind): `up` ended on a traceback blaming the admin token, and on
    :8080 another user's Airflow would have passed for its own. The port is named, with the make
    variable that picks another, and nothing is started."""
    import socket

    from devstack.processes import free_port

    ports = {"model server": free_port(), "Prometheus": free_port(), "Airflow": free_port()}
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        held.bind(("127.0.0.1", ports[taken]))
        held.listen()
        variable = {"model server": "SERVER_PORT", "Prometheus": "PROMETHEUS_PORT", "Airflow": "AIRFLOW_PORT"}[taken]
        with pytest.raises(
            SystemExit,
            match=rf"127\.0\.0\.1:{ports[taken]} \({taken}\) is in use.*make up \(or make demo\) {variable}=",
        ):
            stack.up(tmp_path / "run", tmp_path / "models", *ports.values(), rate=1.0)
    assert not (tmp_path / "run").exists()


def test_cluster_up_refuses_an_airflow_port_another_process_listens_on(tmp_path) -> None:
    """`make cluster-up` hard-coded Airflow on :8081: with that port taken, the cluster started
    and Airflow's health check could find another process's Airflow. The port is named, with
    the make variable that picks another, and nothing is started."""
    import socket

    from devstack.processes import free_port
    from scripts import cluster

    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", port := free_port()))
        held.listen()
        with pytest.raises(SystemExit, match=rf"127\.0\.0\.1:{port} \(Airflow\) is in use.*CLUSTER_AIRFLOW_PORT="):
            cluster.up(tmp_path / "run", tmp_path / "models", port, rate=1.0, scrape_interval_s=15.0)
    assert not (tmp_path / "run").exists()
