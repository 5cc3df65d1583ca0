"""`make up` starts the stack in the background; `make down` stops exactly what it started."""

from __future__ import annotations

import os
import time

import pytest

from include.rollout.local import free_port
from include.rollout.metrics import PrometheusSource, ScrapeSource, wait_for_value
from scripts import stack

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_then_down(models_dir, tmp_path):
    run = tmp_path / "run"
    state = stack.up(run, models_dir, free_port(), free_port(), rate=30)
    try:
        pids = state["pids"]
        assert all(alive(p) for p in pids.values())
        assert oct((run / "admin-token").stat().st_mode & 0o777) == "0o600"
        server = ScrapeSource(state["urls"]["model_server"])
        deadline = time.monotonic() + 20
        while (
            time.monotonic() < deadline and server.query('nv_inference_request_success{model="digits"}') < 20
        ):
            time.sleep(0.5)
        assert server.query('nv_inference_request_success{model="digits"}') >= 20  # the load generator runs
        assert (
            wait_for_value(PrometheusSource(state["urls"]["prometheus"]), 'sum(up{job="model-server"})') == 1
        )
        with pytest.raises(SystemExit, match="already up"):
            stack.up(run, models_dir, free_port(), free_port(), rate=30)
    finally:
        stopped = stack.down(run)
    assert sorted(stopped) == ["loadgen", "model_server", "prometheus"]
    assert not any(alive(p) for p in pids.values())
    assert not (run / "stack.json").exists()
    assert stack.down(run) == []
