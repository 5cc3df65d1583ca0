"""The house rules a reader relies on: imports flow one way, and the code points nowhere outside
the repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from devstack.processes import PYTHONPATH
from tests.conftest import ROOT

CODE = [
    "include",
    "plugins",
    "dags",
    "model_server",
    "devstack",
    "scripts",
    "bench",
    "tests",
    "docker",
    "docs",
    "Makefile",
    "README.md",
    "BENCHMARKS.md",
]


def test_imports_flow_one_way():
    """plugins -> the library -> the model server; none of them imports the one-machine stack, and
    the library and the model server never import Airflow (pyproject.toml's contracts)."""
    out = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
        cwd=ROOT,
        env={"PYTHONPATH": PYTHONPATH, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_dag_files_import_only_airflow_the_operators_and_the_spec():
    allowed = re.compile(
        r"^(__future__|datetime|typing|pendulum|airflow(\..+)?|rollout_airflow(\..+)?|vision_rollout\.spec)$"
    )
    for path in (ROOT / "dags").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                assert allowed.match(name), f"{path.name} imports {name}"


def test_the_product_imports_no_other_modules_private_names():
    """locks.py imported folders' ``_lock`` and ``_stale``: private names another module leans on,
    which folders could rename or change as its own. A name one module of the product imports
    from another is public."""
    ours = {"vision_rollout", "model_server", "rollout_airflow"}
    found = []
    for top in ("include", "plugins", "dags", "model_server"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ours:
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                    found += [f"{path.name}: {node.module}.{name}" for name in private]
    assert found == []


def test_the_code_points_nowhere_outside_the_repository():
    pattern = re.compile(r"\.\./shared|\bissue \d|the seed\b", re.IGNORECASE)
    me = Path(__file__).resolve()
    for top in CODE:
        paths = [ROOT / top] if (ROOT / top).is_file() else (ROOT / top).rglob("*")
        for path in paths:
            if path.is_file() and path.suffix in {"", ".py", ".md", ".toml", ".yaml", ".txt"} and path != me:
                for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    assert not pattern.search(line), f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
