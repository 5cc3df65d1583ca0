"""Shared fixtures: the built demo repository and real model servers on loopback."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.processes import S3_CREDENTIALS, ModelServerProcess, S3Process, start_model_server, start_s3

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
ADMIN_TOKEN = "test-admin-token"

# Airflow keeps its home (config, logs, SQLite) in a temporary folder, set before it is imported,
# one per test process: make test's workers inherit the environment of the process that started
# them, so a home made there (named in _MADE) is not taken for one the caller set. A home made
# here is removed when the session ends (pytest_sessionfinish); one the caller set is not.
_MADE = "VISION_ROLLOUT_TESTS_AIRFLOW_HOME"
_MADE_AIRFLOW_HOME: str | None = None
_inherited = os.environ.get(_MADE)
if os.environ.get("AIRFLOW_HOME") in (None, _inherited):
    _MADE_AIRFLOW_HOME = os.environ["AIRFLOW_HOME"] = os.environ[_MADE] = tempfile.mkdtemp(prefix="airflow-home-")
    if _inherited and os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") == f"sqlite:///{_inherited}/airflow.db":
        del os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{os.environ['AIRFLOW_HOME']}/airflow.db")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow modules first (a stable sort): make test's workers take a file at a time in this
    order, so the ones of minutes start at once and the many short ones fill in beside them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _MADE_AIRFLOW_HOME is not None and os.environ.get("AIRFLOW_HOME") == _MADE_AIRFLOW_HOME:
        shutil.rmtree(_MADE_AIRFLOW_HOME, ignore_errors=True)


# Airflow's secrets masker, one per process in each of its two copies (a connection read registers
# its password and extras: a test's extras of '"models"' hid the namespace in the reports of tests
# run after it in the same worker, "kubectl -n *** ...").
_AIRFLOW_MASKERS = (
    "airflow.sdk._shared.secrets_masker.secrets_masker",
    "airflow._shared.secrets_masker.secrets_masker",
)


@pytest.fixture(autouse=True)
def _airflow_masker_reset() -> Iterator[None]:
    """What a test registered with Airflow's secrets masker is forgotten when it ends (Airflow is
    not imported here: only a masker a test has made is reset)."""
    yield
    for name in _AIRFLOW_MASKERS:
        module = sys.modules.get(name)
        if module is not None and module._secrets_masker.cache_info().currsize:
            module._secrets_masker().reset_masker()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The demo repository `make models` built (built here when a test runs alone)."""
    if not (MODELS / ".build-stamp").is_file():
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_models.py"), "--out", str(MODELS)],
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return MODELS


@pytest.fixture
def repo_copy(models_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the digits model, for tests that change the repository."""
    dest = tmp_path / "models"
    dest.mkdir()
    shutil.copytree(models_dir / "digits", dest / "digits", ignore=shutil.ignore_patterns("validation"))
    return dest


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ModelServerProcess]]:
    """Start servers with custom options; each is stopped by pid when the test ends."""
    started: list[ModelServerProcess] = []

    def factory(
        repository: Path, *args: str, token: str | None = None, until: str = "ready", port: int | None = None
    ) -> ModelServerProcess:
        s = start_model_server(repository, tmp_path, *args, token=token, until=until, port=port)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture
def live_traffic() -> Iterator[Callable[..., None]]:
    """Start live traffic (the load generator, round after round) that runs until the test ends,
    as production traffic runs through a rollout."""
    from devstack.loadgen import LoadConfig, run

    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(url: str, validation: Path, rate: float = 40, feedback_share: float = 0.5) -> None:
        cfg = LoadConfig(
            url=url, validation=validation, rate=rate, duration_s=1, feedback_share=feedback_share, feedback_delay_s=0.2
        )

        def rounds() -> None:
            while not stop.is_set():
                run(cfg)

        threads.append(threading.Thread(target=rounds, daemon=True))
        threads[-1].start()

    yield start
    stop.set()
    for t in threads:
        t.join(timeout=30)


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    """One server on the demo repository (digits v1, resnet_bench v1), shared by a module."""
    s = start_model_server(models_dir, tmp_path_factory.mktemp("server"), token=ADMIN_TOKEN)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def digit_images(models_dir: Path) -> list[tuple[bytes, int]]:
    folder = models_dir / "digits" / "validation"
    with (folder / "labels.csv").open() as f:
        return [((folder / row["file"]).read_bytes(), int(row["label"])) for row in csv.DictReader(f)]


class S3Server(S3Process):
    """An S3 API on loopback (moto's server mode): object storage for the prediction log and the
    run folder."""

    def uri(self, prefix: str | None = None) -> str:
        """A fresh prefix in the bucket unless one is given."""
        return super().uri(prefix or uuid.uuid4().hex[:12])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``python -m moto.server`` on a free 127.0.0.1 port with one bucket; stopped by its pid."""
    started = start_s3(tmp_path_factory.mktemp("moto"))
    server = S3Server(started.proc, started.port, started.log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with its credentials in the environment (the model servers inherit them)."""
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def kube_api() -> Iterator[tuple[Any, Any]]:
    """The fake Kubernetes API server on loopback (devstack's FakeKubeAPI) and a kubernetes
    client's ApiClient on it; stopped when the test ends."""
    from kubernetes import client

    from devstack.cluster.kube import FakeKubeAPI

    fake = FakeKubeAPI().start()
    cfg = client.Configuration()
    cfg.host = fake.url
    try:
        yield fake, client.ApiClient(cfg)
    finally:
        fake.stop()


@pytest.fixture
def short_api_pauses(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Kubernetes API client's pauses between its tries a few milliseconds (mesh's backoff:
    the client's retries, ``settled``'s tries after a write in doubt, ``routes_read``'s reads),
    for the tests that count retries against the fake API server: 0.5 s doubling up to 8 s, a
    burst of 500s took 15 s of sleep a call, most of these modules' time. Each try and what it
    sends stay as they were. A test about the pauses' real timing is marked ``real_pauses``."""
    if request.node.get_closest_marker("real_pauses") is not None:
        return
    from vision_rollout import mesh

    monkeypatch.setattr(mesh, "BACKOFF_S", 0.001)
    monkeypatch.setattr(mesh, "BACKOFF_MAX_S", 0.004)
