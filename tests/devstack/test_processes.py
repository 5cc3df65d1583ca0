"""Ports for the servers the tests and the dev stack start: two test workers never pick the same
one, and none is one the kernel hands out for connections meanwhile."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devstack import processes
from devstack.processes import free_port, port_slice
from tests.support.hostile import answering_server


def test_each_test_worker_has_its_own_ports_below_the_ephemeral_range() -> None:
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    slices = [port_slice({"PYTEST_XDIST_WORKER": f"gw{i}", "PYTEST_XDIST_WORKER_COUNT": "2"}) for i in range(2)]
    assert slices[0].start == processes.PORTS_FROM
    assert slices[0].stop == slices[1].start
    assert slices[1].stop <= ephemeral
    assert len(slices[0]) > 5000
    assert port_slice({}) == range(processes.PORTS_FROM, ephemeral)


def test_ports_are_not_picked_twice_and_a_taken_one_is_passed_over() -> None:
    first = free_port()
    with socket.create_server(("127.0.0.1", first + 1)) as taken:
        picked = [free_port() for _ in range(300)]
        assert taken.getsockname()[1] not in picked
    assert len(set(picked)) == len(picked)
    assert all(p in processes._PORTS for p in [first, *picked])


def test_a_model_server_started_with_a_token_leaves_no_copy_of_it_behind(models_dir: Path, tmp_path: Path) -> None:
    """Each start wrote the admin token to ``admin-token-<port>`` in its folder and nothing removed
    it: copies piled up in ``run/``, readable after the token was rotated. The server reads the
    file once, at its start: the copy is gone once it answers, and the token still opens the
    admin API."""
    server = processes.start_model_server(models_dir, tmp_path, token="a-secret-token")
    try:
        assert list(tmp_path.glob("admin-token*")) == []
        server.load_versions("digits", 1)  # an admin call: refused without the token
        server.wait_until("ready")
    finally:
        server.stop()
    assert list(tmp_path.glob("admin-token*")) == []


def _answering_ready(path: str) -> tuple[int, bytes]:
    return 200, b"{}"  # (another suite's model server: ready, with its own token and repository)


def test_a_server_another_process_holds_on_the_port_is_not_taken_for_ours(tmp_path: Path) -> None:
    """wait_until took any server answering 200 on its port for its own: another suite's model
    server that took the port in the second before ours bound it answered the tests (their 401s
    and 404s). The listening socket must be its process's: another's is "held by another process",
    which names that process (its pid and name)."""
    log = tmp_path / "model-server.log"
    log.write_text("")
    with answering_server(_answering_ready) as stranger:
        port = int(stranger.rsplit(":", 1)[1])
        never_binds = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        server = processes.ModelServerProcess(never_binds, port, log)
        name = Path(f"/proc/{os.getpid()}/comm").read_text().strip()
        try:
            with pytest.raises(
                processes.PortTaken,
                match=rf"port {port} is held by another process \(pid {os.getpid()}, {re.escape(name)}\)",
            ):
                server.wait_until("ready", timeout_s=10)
        finally:
            server.stop()


def test_a_server_not_ready_in_time_is_named_as_what_was_started(tmp_path: Path) -> None:
    """ModelServerProcess's errors said "model server" whatever it started (KServe's server, a
    benchmark's floor server): they name what was started, "model server" where nothing else is said."""
    log = tmp_path / "floor.log"
    log.write_text("")
    for name, said in ((None, "model server"), ("the floor server", "the floor server")):
        never_binds = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        named = {} if name is None else {"name": name}
        server = processes.ModelServerProcess(never_binds, free_port(), log, **named)
        try:
            with pytest.raises(RuntimeError, match=rf"^{said} not ready within 0.3 s:\n"):
                server.wait_until("ready", timeout_s=0.3)
        finally:
            server.stop()


def test_the_port_holder_is_the_process_or_one_it_started(tmp_path: Path) -> None:
    """Whose listening socket 127.0.0.1:port is: this process's, or a process it started (a server
    whose workers hold the socket), True; another process's, False; none yet, None."""
    with socket.create_server(("127.0.0.1", 0)) as ours:
        port = ours.getsockname()[1]
        assert processes.port_holder(os.getpid(), port) is True
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert processes.port_holder(other.pid, port) is False
        finally:
            other.kill()
            other.wait()
    assert processes.port_holder(os.getpid(), port) is None
    free = free_port()
    forks = (
        "import socket, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        f"'import socket, time; s = socket.create_server((\"127.0.0.1\", {free})); time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", forks], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while processes.port_holder(parent.pid, free) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes.port_holder(parent.pid, free) is True
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_a_model_server_whose_port_another_process_took_first_is_started_on_another(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port picked free that another process binds before our server does: the server cannot
    bind it; one started on a port of its own choosing is started again on another."""
    with answering_server(_answering_ready) as stranger:
        taken = int(stranger.rsplit(":", 1)[1])
        picks = iter([taken])
        real = processes.free_port
        monkeypatch.setattr(processes, "free_port", lambda: next(picks, None) or real())
        server = processes.start_model_server(models_dir, tmp_path, token="a-secret-token")
        try:
            assert server.port != taken
            assert processes.port_holder(server.proc.pid, server.port) is True
            server.load_versions("digits", 1)  # (the token ours)
        finally:
            server.stop()


def test_a_server_that_exits_after_binding_is_reported_with_its_exit_not_as_a_port_taken(tmp_path: Path) -> None:
    """A server that crashed right after it bound its port (a model that failed to load) was
    reported as "port N is held by another process" when it exited between the read of the
    listening sockets and the walk of its file descriptors: its exit code and log are the report."""
    port = free_port()
    crashy = subprocess.Popen(
        [sys.executable, "-c", f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)"]
    )
    log = tmp_path / "model-server.log"
    log.write_text("the model failed to load (the real reason)\n")
    server = processes.ModelServerProcess(crashy, port, log)
    try:
        deadline = time.monotonic() + 30
        while processes.port_holder(crashy.pid, port) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        real = processes.listening_sockets

        def then_crashes(ports: Any) -> set[str]:
            out = real(ports)
            if crashy.poll() is None:  # the table read, then the server exits before its fds are read
                crashy.kill()
                crashy.wait()
            return out

        processes.listening_sockets = then_crashes  # type: ignore[assignment]
        try:
            with pytest.raises(RuntimeError, match="model server exited with -9:\nthe model failed to load") as raised:
                server.wait_until("ready", timeout_s=10)
        finally:
            processes.listening_sockets = real  # type: ignore[assignment]
        assert not isinstance(raised.value, processes.PortTaken)
    finally:
        server.stop()


def test_another_holds_the_port_only_where_asked_twice_with_the_process_still_running() -> None:
    """The "asked twice" check (a port another process holds, not a server that exited between
    the reads) was written twice, in listening and in the pod runner's probe: one function,
    whose_port, serves both. "another" where another process listens there and ours runs; False
    where ours exited; True where ours listens."""
    with answering_server(_answering_ready) as stranger:
        taken = int(stranger.rsplit(":", 1)[1])
        waits = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert processes.whose_port(waits, taken) == "another"
        finally:
            waits.kill()
            waits.wait()
        assert processes.whose_port(waits, taken) is False  # (ours exited: its exit says why)
    port = free_port()
    listens = f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
    ours = subprocess.Popen([sys.executable, "-c", listens])
    try:
        deadline = time.monotonic() + 30
        while processes.whose_port(ours, port) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes.whose_port(ours, port) is True
    finally:
        ours.kill()
        ours.wait()


@pytest.mark.parametrize("table", ["missing", "header only"])
def test_where_the_tcp_tables_cannot_tell_the_port_holder_the_server_is_asked(
    tmp_path: Path, table: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where /proc/net/tcp and tcp6 are missing or list no listening socket at all (no /proc:
    macOS; WSL1; a sandbox) every start waited until its time ran out, "not ready within": whose
    the port is is "unknown" there, said once in the log, and the server is asked as before."""
    tables = [tmp_path / "tcp", tmp_path / "tcp6"]
    if table == "header only":
        for path in tables:
            path.write_text(
                "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
            )
    monkeypatch.setattr(processes, "TCP_TABLES", tuple(str(p) for p in tables))
    monkeypatch.setattr(processes, "_unknown_logged", False)
    port = free_port()
    serves = (
        "import http.server\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
        f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"
    )
    log = tmp_path / "model-server.log"
    log.write_text("")
    server = processes.ModelServerProcess(subprocess.Popen([sys.executable, "-c", serves]), port, log)
    try:
        with caplog.at_level("WARNING", logger="devstack.processes"):
            server.wait_until("ready", timeout_s=30)
            assert processes.port_holder(server.proc.pid, port) == "unknown"
        said = [r.getMessage() for r in caplog.records if "cannot tell" in r.getMessage()]
        assert len(said) == 1, said
    finally:
        server.stop()


def test_whose_port_it_is_is_asked_until_it_is_the_process_own_then_no_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each poll of a wait read the whole TCP tables and walked /proc: once a process holds its
    port, it is not asked again (another cannot take a port its process listens on)."""
    port = free_port()
    listens = f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
    server = processes.ManagedProcess(subprocess.Popen([sys.executable, "-c", listens]), port, tmp_path / "log")
    try:
        deadline = time.monotonic() + 30
        while processes.port_holder(server.proc.pid, port) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        asked = []
        real = processes.port_holder
        monkeypatch.setattr(processes, "port_holder", lambda pid, p: asked.append(pid) or real(pid, p))
        assert server.owns_port("a server") is True
        assert server.owns_port("a server") is True
        assert len(asked) == 1
    finally:
        server.stop()


def test_the_descendants_of_a_process_come_from_one_scan_of_proc() -> None:
    parents = processes.parents()
    assert parents[os.getpid()] == os.getppid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in processes.descendants(os.getpid(), processes.parents())
        assert processes.children(os.getpid()) >= {child.pid}
    finally:
        child.kill()
        child.wait()


def test_the_kin_of_a_session_leader_come_from_one_map_of_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """kin built the map of each process's children (over every process /proc lists) once for the
    leader and again for each process of its session or group: a server whose session held many
    processes read them all as many times, at each check of its port. It is built once a call."""
    leader = 100
    table = {leader: (1, leader, leader), 999: (1, 999, 999)}  # (999: a stranger's)
    for i in range(1, 21):  # 20 of the session, each daemonized (a child of init), each with a child
        table[leader + i] = (1, leader, leader)
        table[1000 + i] = (leader + i, leader, leader)
    table[2000] = (999, 999, 999)
    read: list[int] = []

    class Counted(dict[int, int]):
        def items(self) -> Any:
            read.append(len(self))
            return super().items()

    real = processes.parents
    monkeypatch.setattr(processes, "parents", lambda t=None: Counted(real(t)))
    assert processes.kin(leader, table) == {leader + i for i in range(1, 21)} | {1000 + i for i in range(1, 21)}
    assert len(read) == 1


def test_a_model_server_whose_port_another_process_bound_without_listening_is_started_on_another(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port picked free that another process bound but does not listen on (between its bind and
    its listen, or another's free-port check): no listening socket to see, our server exits,
    "Address already in use", and the start failed; on a port it picked itself it picks another."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        picks = iter([taken])
        real = processes.free_port
        monkeypatch.setattr(processes, "free_port", lambda: next(picks, None) or real())
        server = processes.start_model_server(models_dir, tmp_path)
        try:
            assert server.port != taken
            assert processes.port_holder(server.proc.pid, server.port) is True
        finally:
            server.stop()
        with pytest.raises(processes.PortTaken, match=f"cannot listen on 127.0.0.1:{taken}: Address already in use"):
            processes.start_model_server(models_dir, tmp_path, port=taken)


@pytest.mark.parametrize(
    ("log", "taken"),
    [
        ("model-server: cannot listen on 127.0.0.1:20123: Address already in use\n", True),
        ('level=error msg="listen tcp 127.0.0.1:20123: bind: address already in use"\n', True),
        ("[Errno 98] error while attempting to bind on address ('127.0.0.1', 20123): address already in use\n", True),
        ("Address already in use\nPort 20123 is in use by another program.\n", True),
        ("model-server: cannot listen on 127.0.0.1:20124: Address already in use\n", False),  # (its admin port)
        ("the model failed to load on port 20123\n", False),
    ],
)
def test_a_server_that_could_not_bind_its_port_says_so_in_its_log(tmp_path: Path, log: str, taken: bool) -> None:
    (tmp_path / "log").write_text(log)
    done = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    done.wait()
    error = processes.ManagedProcess(done, 20123, tmp_path / "log").exited("a server")
    assert isinstance(error, processes.PortTaken) is taken
    assert str(error) == f"a server exited with 2:\n{log}"


def test_the_loopback_addresses_are_written_as_the_tcp_tables_write_them_in_either_byte_order() -> None:
    """/proc/net/tcp writes an address as 32-bit words in the host's order: "0100007F" was
    written out for little-endian hosts alone."""
    v4, mapped = socket.inet_aton("127.0.0.1"), socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
    assert processes.proc_hex(v4, "little") == "0100007F"
    assert processes.proc_hex(v4, "big") == "7F000001"
    assert processes.proc_hex(mapped, "little") == "0000000000000000FFFF00000100007F"
    assert processes.proc_hex(mapped, "big") == "00000000000000000000FFFF7F000001"
    assert processes.proc_hex(v4) in processes.LOOPBACK


def test_a_start_whose_every_port_was_taken_names_the_ports_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    picks = iter([20001, 20002, 20003])
    monkeypatch.setattr(processes, "free_port", lambda: next(picks))

    def start(port: int) -> None:
        raise processes.PortTaken(f"a server: port {port} is held by another process")

    with pytest.raises(processes.PortTaken, match=r"ports 20001, 20002, 20003 tried: a server: port 20003 is held"):
        processes.on_a_free_port(start, None)


def _listener_on_any_v6(v6_only: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6_only))
    s.bind(("::", free_port()))
    s.listen()
    return s


def test_a_v6_only_listener_of_another_process_on_the_port_does_not_hold_its_loopback_address() -> None:
    """A stranger's [::] socket with IPV6_V6ONLY takes no connection to 127.0.0.1: it was counted
    as holding the port (PortTaken, a re-pick or a failed pinned start) though our server binds
    127.0.0.1:port beside it. A [::] socket that takes IPv4 too still holds it."""
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with _listener_on_any_v6(v6_only=True) as stranger:
            assert processes.port_holder(server.pid, stranger.getsockname()[1]) is None
        with _listener_on_any_v6(v6_only=False) as stranger:
            assert processes.port_holder(server.pid, stranger.getsockname()[1]) is False
    finally:
        server.kill()
        server.wait()


def test_a_server_that_binds_beside_a_v6_only_stranger_holds_its_port(tmp_path: Path) -> None:
    with _listener_on_any_v6(v6_only=True) as stranger:
        port = stranger.getsockname()[1]
        listens = f"import socket, time; time.sleep(1); s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
        server = processes.ManagedProcess(subprocess.Popen([sys.executable, "-c", listens]), port, tmp_path / "log")
        try:
            deadline = time.monotonic() + 30
            while server.owns_port("a server") is not True and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.owns_port("a server") is True
        finally:
            server.stop()


@pytest.mark.parametrize("group", ["the server's", "its own"])
def test_the_port_holder_is_found_where_the_server_forked_twice_and_its_listener_was_reparented(group: str) -> None:
    """A server that forks twice (a daemon: its child forks the listener and exits) leaves the
    listener a child of init, not a descendant: its port was "held by another process". A server
    started in a session of its own (start_new_session, as Airflow's and the pods' are) holds what
    the processes of its session or group hold, in a process group of their own too."""
    port = free_port()
    daemon = (
        "import os, socket, time\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n"
        f"        {'os.setpgrp()' if group == 'its own' else 'pass'}\n"
        f"        s = socket.create_server(('127.0.0.1', {port}))\n"
        "        print(os.getpid(), flush=True)\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "time.sleep(60)\n"
    )
    server = subprocess.Popen([sys.executable, "-c", daemon], stdout=subprocess.PIPE, start_new_session=True)
    assert server.stdout is not None
    listener = int(server.stdout.readline())
    try:
        assert listener not in processes.descendants(server.pid, processes.parents())
        assert processes.port_holder(server.pid, port) is True
        stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        try:
            assert processes.port_holder(stranger.pid, port) is False
        finally:
            stranger.kill()
            stranger.wait()
    finally:
        os.kill(listener, signal.SIGKILL)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_a_model_server_started_again_on_another_port_leaves_nothing_of_the_try_given_up(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try given up for a taken port left its log (``model-server-<port>.log``) behind in the
    folder, beside the one of the server that started: a reader took it for a server's."""
    with answering_server(_answering_ready) as stranger:
        taken = int(stranger.rsplit(":", 1)[1])
        picks = iter([taken])
        real = processes.free_port
        monkeypatch.setattr(processes, "free_port", lambda: next(picks, None) or real())
        server = processes.start_model_server(models_dir, tmp_path)
        try:
            assert server.port != taken
            assert sorted(p.name for p in tmp_path.iterdir() if str(taken) in p.name) == []
            assert server.log.exists()
        finally:
            server.stop()


FAKE_AIRFLOW = """
import http.server, json, os, sys, time
if sys.argv[1] != "api-server":
    time.sleep(60)
port = int(os.environ["AIRFLOW__API__PORT"])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        body = json.dumps({c: {"status": "healthy"} for c in parts}).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
try:
    server = http.server.HTTPServer(("127.0.0.1", port), Health)
except OSError:
    print(f"[Errno 98] error while attempting to bind on address ('127.0.0.1', {port}): address already in use")
    raise SystemExit(1)
server.serve_forever()
"""


def test_airflow_started_again_on_another_port_migrates_its_database_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try of an Airflow start on a port picked free ran ``airflow db migrate`` again (tens of
    seconds each), though the database is the same whichever port the API server takes."""
    migrations = []
    real_run, real_popen = subprocess.run, subprocess.Popen

    def run(cmd: Any, *args: Any, **kw: Any) -> Any:
        if list(cmd[1:3]) == ["db", "migrate"]:
            migrations.append(kw["env"]["AIRFLOW__API__PORT"])
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *args, **kw)

    def popen(cmd: Any, *args: Any, **kw: Any) -> Any:
        if "devstack.airflow_main" in cmd:  # (a stand-in for each component: the API server answers healthy)
            cmd = [sys.executable, "-c", FAKE_AIRFLOW, *cmd[cmd.index("devstack.airflow_main") + 1 :]]
        return real_popen(cmd, *args, **kw)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with answering_server(_answering_ready) as stranger:
        taken = int(stranger.rsplit(":", 1)[1])
        picks = iter([taken])
        real = processes.free_port
        monkeypatch.setattr(processes, "free_port", lambda: next(picks, None) or real())
        stack = processes.start_airflow(tmp_path / "airflow", {}, wait_s=60)
        try:
            assert stack.port != taken
            assert processes.port_holder(stack.components["api-server"].proc.pid, stack.port) is True
        finally:
            stack.stop()
    assert len(migrations) == 1


def test_a_bucket_not_made_for_a_reason_other_than_a_connection_is_raised_at_once_and_moto_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto's start took a ValueError from making its bucket (pyarrow's ArrowInvalid: a bad
    endpoint) for "not listening yet": it asked again until wait_s passed, then raised "does
    not listen yet", the real error lost. Only an OSError is "not yet", as before the start
    and wait were shared: another is raised from its first try, moto stopped."""
    tried: list[processes.S3Process] = []

    class Refusing:
        def __init__(self, server: processes.S3Process) -> None:
            self.server = server

        def create_dir(self, bucket: str) -> None:
            tried.append(self.server)
            raise ValueError("Invalid endpoint: a stand-in for ArrowInvalid")

    monkeypatch.setattr(processes.S3Process, "filesystem", lambda self: Refusing(self))
    with pytest.raises(ValueError, match="Invalid endpoint"):
        processes.start_s3(tmp_path, wait_s=20)
    assert len(tried) == 1
    assert tried[0].proc.poll() is not None


def test_a_model_server_s_wait_raises_an_error_other_than_a_connection_s_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its wait for health asked again past a ValueError (or a KeyError) from the health check
    as if the server were not up yet, where it had raised it at once: only an OSError is "not yet"."""
    port = free_port()
    listens = f"import socket, time; s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)"
    log = tmp_path / "model-server.log"
    server = processes.ModelServerProcess(processes.spawn([sys.executable, "-c", listens], log), port, log)
    asked: list[str] = []

    def get(url: str, timeout: float) -> tuple[int, bytes]:
        asked.append(url)
        raise ValueError("a stand-in for a URL http.client refuses")

    monkeypatch.setattr(processes, "_get", get)
    try:
        with pytest.raises(ValueError, match="stand-in"):
            server.wait_until("ready", timeout_s=10)
        assert len(asked) == 1
    finally:
        server.stop()
