"""bench/versus.py's floor server: a stand-in model server started on a port of its own."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from bench import versus
from devstack import processes
from tests.support.hostile import answering_server


def test_the_floor_server_is_ready_on_its_own_port_not_on_one_another_process_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The floor server was taken for ready once its port took a connection: another process that
    held the port first answered the benchmark's floor arm (its canned bytes never served, the
    floor's numbers another server's). It is ready once it listens there itself; another's port
    is picked again."""
    canned = tmp_path / "canned.bin"
    canned.write_bytes(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\ncanned")
    with answering_server(lambda path: (200, b"a stranger")) as stranger:
        taken = int(stranger.rsplit(":", 1)[1])
        picks = iter([taken])
        real = processes.free_port
        for module in (processes, versus):
            monkeypatch.setattr(module, "free_port", lambda: next(picks, None) or real(), raising=False)
        floor = versus.start_canned(canned, tmp_path)
        try:
            assert floor.port != taken
            assert processes.port_holder(floor.proc.pid, floor.port) is True
            with urllib.request.urlopen(f"http://127.0.0.1:{floor.port}/", timeout=5) as r:
                assert r.read() == b"canned"
        finally:
            floor.stop()
