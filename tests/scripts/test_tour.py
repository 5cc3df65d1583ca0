"""`make tour` replays the validation set through every digits version over the server."""

from __future__ import annotations

import re

import pytest

from scripts import tour

pytestmark = pytest.mark.integration


def test_demo_replay_reproduces_the_heldout_accuracy(models_dir, capsys):
    assert tour.main(["--repository", str(models_dir), "--seconds", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^([123]) .*?(\d\.\d{4})\s+(\d\.\d{4})\s", out, flags=re.M)
    assert [r[0] for r in rows] == ["1", "2", "3"]
    for _, served, built in rows:
        assert served == built  # the same PNGs through the server give the build-time accuracy
    assert 'nv_inference_request_success{model="digits",version="3"} 450' in out
