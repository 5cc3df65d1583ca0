"""Ports for the servers the tests and the dev stack start: two test workers never pick the same
one, and none is one the kernel hands out for connections meanwhile."""

from __future__ import annotations

import socket
from pathlib import Path

from devstack import processes
from devstack.processes import free_port, port_slice


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
