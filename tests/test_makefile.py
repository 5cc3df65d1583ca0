"""The Makefile's targets for the system parts the tests need: each installs its part (as root)
or stops `make test` saying what to install; none lets the suite run without it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("target", ["prometheus", "chromium"])
def test_a_missing_part_stops_make_test_when_it_cannot_be_installed(target, tmp_path):
    """Not root, and the part not on PATH: the target fails naming what to install. chromium's
    printed its advice and succeeded, and the UI test then skipped (make test passed without it)."""
    make = shutil.which("make")
    assert make is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")  # not root: nothing is installed
    (bin_dir / "id").chmod(0o755)
    done = subprocess.run(
        [make, "-s", "-C", str(ROOT), target],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert f"{target} is missing: sudo apt-get install --no-install-recommends {target}" in done.stderr
