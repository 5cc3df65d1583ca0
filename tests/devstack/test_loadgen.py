"""The load generator outlives its server: a refused, reset or closed connection is counted, and
every worker goes on until the run's end (a server restarted mid-stage must find load again)."""

from __future__ import annotations

import socket
import threading

from devstack.loadgen import LoadConfig, run


def test_connections_closed_without_an_answer_are_counted_not_fatal(models_dir):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = 0

    def serve() -> None:  # reads a request's first bytes, then hangs up without an answer
        nonlocal accepted
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted += 1
            with conn:
                conn.recv(65536)

    threading.Thread(target=serve, daemon=True).start()
    try:
        cfg = LoadConfig(
            url=f"127.0.0.1:{port}",
            validation=models_dir / "digits" / "validation",
            rate=0,
            max_requests=40,
            concurrency=2,
            feedback_share=0,
        )
        stats = run(cfg)
    finally:
        listener.close()
    assert stats.sent == 40  # every request went out: no worker died on the first closed connection
    assert stats.ok == 0
    assert sum(stats.errors.values()) == 40
    assert len(stats.failures) == 20  # the first ones, each with its reason
    assert all(f.startswith("request ") and ": " in f for f in stats.failures), stats.failures
    assert accepted >= 2
