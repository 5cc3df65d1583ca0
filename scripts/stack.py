"""``make up`` / ``make down``: the one-machine stack, started in the background and stopped exactly.

up: the model server on 127.0.0.1:8000 (digits version 1 stable, prediction log and masking on,
admin token in run/admin-token, mode 0600), Prometheus on 127.0.0.1:9090 scraping it every
second, the load generator replaying the validation images with feedback, and Airflow on
127.0.0.1:8080 (the components ``airflow standalone`` runs: scheduler, DAG processor, triggerer,
API server with the UI; LocalExecutor, SQLite, the simple auth manager: user admin, its password
generated once into run/airflow/admin-password, mode 0600, never printed) with this project's DAGs
and the connections to the stack. Other ports: --port, --prometheus-port, --airflow-port. What
was started is recorded in run/stack.json; ``down`` stops exactly those process ids (Airflow's by
process group, which takes its task workers with it).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.processes import (  # noqa: E402
    PYTHONPATH,
    AirflowProcesses,
    ModelServerProcess,
    alive,
    local_connections,
    start_airflow,
    start_mark,
    start_model_server,
    start_prometheus,
)
from vision_rollout.serving import ModelServerAdmin  # noqa: E402

STATE = "stack.json"


def up(run: Path, repository: Path, port: int, prometheus_port: int, airflow_port: int, rate: float) -> dict[str, Any]:
    state_file = run / STATE
    if recorded_up(run) is not None:
        raise SystemExit("the stack is already up; run `make down` first")
    ports_free(
        {
            "model server": ("SERVER_PORT", port),
            "Prometheus": ("PROMETHEUS_PORT", prometheus_port),
            "Airflow": ("AIRFLOW_PORT", airflow_port),
        }
    )
    run.mkdir(parents=True, exist_ok=True)
    token_file = run / "admin-token"
    if not token_file.exists():
        token_file.touch(mode=0o600)
        token_file.write_text(secrets.token_urlsafe(24))
    server = start_model_server(
        repository,
        run,
        "--prediction-log",
        str(run / "predictions"),
        "--state-dir",
        str(run / "state"),
        "--mask-header",
        "x-user-id",
        token=token_file.read_text().strip(),
        port=port,
        until="live",
    )
    serve_what_is_routed(server)
    server.wait_until("ready")
    prom = start_prometheus([server.url], run / "prometheus", port=prometheus_port)
    loadgen = start_loadgen(server.url, repository, rate, run / "loadgen.log")
    state: dict[str, Any] = {
        "pids": {},
        "marks": {},
        "groups": [],
        "urls": {"model_server": server.http, "prometheus": prom.url},
        "admin_token_file": str(token_file),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for name, pid in (("model_server", server.proc.pid), ("prometheus", prom.proc.pid), ("loadgen", loadgen.pid)):
        record(state, name, pid)
    state_file.write_text(json.dumps(state, indent=2))  # a failed Airflow start leaves `down` what to stop
    airflow = start_airflow(
        run / "airflow", local_connections(server, prom.url, repository, run / "predictions", run), port=airflow_port
    )
    record_airflow(state, airflow)
    state_file.write_text(json.dumps(state, indent=2))
    return state


def ports_free(ports: dict[str, tuple[str, int]], make: str = "make up (or make demo)") -> None:
    """Refuse a port another process listens on, before anything starts: the readiness checks
    would find that process's server (another user's model server or Airflow) and take it for
    this stack's, whose own then fails to bind."""
    for service, (variable, port) in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is free
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                raise SystemExit(
                    f"127.0.0.1:{port} ({service}) is in use ({exc.strerror}): stop what listens there, or pick "
                    f"another port: {make} {variable}=<port>"
                ) from None


def start_loadgen(url: str, repository: Path, rate: float, log: Path) -> subprocess.Popen[bytes]:
    """The load generator replaying the validation images with feedback, for a week, in its own
    session (``down`` stops it by pid)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "devstack.loadgen", "--url", url),
                *("--validation", str(repository / "digits" / "validation"), "--rate", str(rate)),
                *("--duration", str(7 * 24 * 3600), "--feedback-share", "0.5"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, "ORT_DISABLE_TELEMETRY": "1"},
            start_new_session=True,
        )


def record(state: dict[str, Any], name: str, pid: int, group: bool = False) -> None:
    """A started process in the state ``down`` reads: its id, what tells it from a later process
    given the same id, and whether it is stopped with its process group."""
    state["pids"][name] = pid
    state["marks"][name] = start_mark(pid)
    if group:
        state["groups"].append(pid)


def running(state: dict[str, Any]) -> dict[str, int]:
    """The recorded processes still running: each the very process started, not a later one
    given its id (after a reboot, say)."""
    marks = state.get("marks", {})
    return {name: pid for name, pid in state["pids"].items() if (m := start_mark(pid)) and m == marks.get(name)}


def recorded_up(run: Path, state_name: str = STATE, stop: str = "make down") -> dict[str, Any] | None:
    """The recorded stack where every process it started still runs; None where none does (never
    started, stopped, or the machine rebooted since). A stack partly up is refused, naming what runs."""
    state_file = run / state_name
    if not state_file.exists():
        return None
    state: dict[str, Any] = json.loads(state_file.read_text())
    live = running(state)
    if not live:
        return None
    if live.keys() != state["pids"].keys():
        gone = ", ".join(sorted(state["pids"].keys() - live.keys()))
        raise SystemExit(f"the stack is partly up ({', '.join(sorted(live))} running, {gone} not); run `{stop}` first")
    return state


def record_airflow(state: dict[str, Any], airflow: AirflowProcesses) -> None:
    """Airflow's components in the state ``down`` reads (stopped by process group), its URL and login."""
    for name, proc in airflow.components.items():
        record(state, f"airflow_{name}", proc.proc.pid, group=True)
    state["urls"]["airflow"] = airflow.url
    state["airflow_user"] = airflow.user
    state["airflow_password_file"] = str(airflow.home / "admin-password")


def admin(state: dict[str, Any]) -> ModelServerAdmin:
    """The stack's model server admin API, its token from the 0600 file."""
    return ModelServerAdmin(state["urls"]["model_server"], Path(state["admin_token_file"]).read_text().strip())


def serve_what_is_routed(server: ModelServerProcess, model: str = "digits") -> None:
    """Load the versions the restored traffic policy routes or mirrors to, when the server has no
    record of the load that brought them in (a state folder written before loads persisted)."""
    routed = server.api.traffic(model).versions()
    if routed - {str(v) for v in server.client().get_model_metadata(model)["versions"]}:
        server.api.load(model, routed)


def down(run: Path, state_name: str = STATE, grace_s: float = 30) -> list[str]:
    for copy in run.glob("admin-token-*"):  # left by earlier versions' model server starts
        copy.unlink(missing_ok=True)
    state_file = run / state_name
    if not state_file.exists():
        return []
    state = json.loads(state_file.read_text())
    pids, groups = running(state), set(state.get("groups", []))

    def kill(pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig) if pid in groups else os.kill(pid, sig)
        except ProcessLookupError:
            pass

    stopped = []
    for name, pid in pids.items():  # exactly what `up` started, by process id
        kill(pid, signal.SIGTERM)
        stopped.append(name)
    deadline = time.monotonic() + grace_s
    for pid in pids.values():
        while alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.1)
        if alive(pid):
            kill(pid, signal.SIGKILL)
            _reap(pid)
    state_file.unlink()
    return stopped


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down"])
    p.add_argument("--run", type=Path, default=ROOT / "run")
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prometheus-port", type=int, default=9090)
    p.add_argument("--airflow-port", type=int, default=8080)
    p.add_argument("--rate", type=float, default=50.0, help="load generator requests per second")
    args = p.parse_args(argv)
    if args.command == "down":
        stopped = down(args.run)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    state = up(args.run, args.repository, args.port, args.prometheus_port, args.airflow_port, args.rate)
    print(f"model server  {state['urls']['model_server']}  (admin token in {state['admin_token_file']})")
    print(f"prometheus    {state['urls']['prometheus']}")
    print(f"load generator: {args.rate:g} requests/s, log in {args.run / 'loadgen.log'}")
    # The password stays in its 0600 file: a terminal's scrollback or a CI log is no place for it.
    print(
        f"airflow       {state['urls']['airflow']}  (login {state['airflow_user']}, password in "
        f"{state['airflow_password_file']}; logs in {args.run / 'airflow' / 'logs'})"
    )
    print("stop with: make down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
