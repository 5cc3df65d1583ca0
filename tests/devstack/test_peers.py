"""bench/peers.py's KServe peer: started on a port of its own (KServe's venv is not needed here)."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import peers
from devstack import processes
from tests.support.hostile import answering_server

# Run where start_kserve runs the KServe venv's python (with bench/kserve_onnx_model.py and its
# arguments): a server of the standard library answering KServe's readiness on --port; where the
# port is bound already, it exits as uvicorn (KServe's server) does, naming the port.
FAKE_KSERVE = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

port = int(sys.argv[sys.argv.index("--port") + 1])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/v2/health/ready" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


try:
    server = HTTPServer(("127.0.0.1", port), Handler)
except OSError as exc:
    print(f"[Errno {exc.errno}] error while attempting to bind on address ('127.0.0.1', {port}): address already in use")
    raise SystemExit(1) from None
server.serve_forever()
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    python = tmp_path / "kserve-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!{sys.executable}\n{FAKE_KSERVE}")
    python.chmod(0o755)
    return python


def _answering_ready(path: str) -> tuple[int, bytes]:
    return 200, b"{}"  # (another process's server: ready too)


@contextlib.contextmanager
def stranger(listens: bool) -> Iterator[int]:
    """Another process's port (this one's, not the server's): a server answering ready on it, or
    a socket bound there that does not listen (between another's bind and its listen)."""
    if listens:
        with answering_server(_answering_ready) as url:
            yield int(url.rsplit(":", 1)[1])
        return
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@pytest.mark.parametrize("listens", [True, False], ids=["listening", "bound"])
def test_kserve_whose_port_another_process_took_first_is_started_on_another(
    fake_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, listens: bool
) -> None:
    """start_kserve picked a free port once: another process that bound it before KServe did
    failed the whole comparison (PortTaken). A port picked free and taken first is picked again,
    as the project's other servers' are (on_a_free_port)."""
    with stranger(listens) as taken:
        picks = iter([taken])
        real = processes.free_port
        for module in (processes, peers):
            monkeypatch.setattr(module, "free_port", lambda: next(picks, None) or real(), raising=False)
        server = peers.start_kserve(fake_python, {}, tmp_path / "logs", "cpu")
        try:
            assert server.port != taken
            assert processes.port_holder(server.proc.pid, server.port) is True
        finally:
            server.stop()
        assert server.proc.returncode is not None
        # The given-up try's log is removed, as start_model_server removes its files; the server's stays.
        assert sorted(p.name for p in (tmp_path / "logs").glob("kserve-*.log")) == [f"kserve-{server.port}.log"]


def test_kserve_whose_every_port_was_taken_names_the_ports_tried(
    fake_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with contextlib.ExitStack() as strangers:
        taken = [int(strangers.enter_context(answering_server(_answering_ready)).rsplit(":", 1)[1]) for _ in range(3)]
        picks = iter(taken)
        for module in (processes, peers):
            monkeypatch.setattr(module, "free_port", lambda: next(picks), raising=False)
        tried = ", ".join(map(str, taken))
        last = taken[-1]  # (its stand-in seen listening on it by another, or exited on it first: a race, either said)
        said = rf"(port {last} is held by another|\('127\.0\.0\.1', {last}\): address already in use)"
        with pytest.raises(processes.PortTaken, match=rf"ports {tried} tried: (?s:.*){said}"):
            peers.start_kserve(fake_python, {}, tmp_path / "logs", "cpu")
    assert not list((tmp_path / "logs").glob("kserve-*.log"))  # no given-up try's log left behind


def test_kserve_that_exits_is_named_in_the_error_not_the_model_server(tmp_path: Path) -> None:
    """start_kserve's server is started through ModelServerProcess, whose errors said "model
    server exited with 3": the project's own server, which was never started. They name KServe's."""
    python = tmp_path / "kserve-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        f"#!{sys.executable}\nprint('ModuleNotFoundError: no module named kserve')\nraise SystemExit(3)\n"
    )
    python.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"^KServe's server exited with 3:\nModuleNotFoundError") as raised:
        peers.start_kserve(python, {}, tmp_path / "logs", "cpu")
    assert "model server" not in str(raised.value)
