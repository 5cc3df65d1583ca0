"""Shared fixtures: the built demo repository and real model servers on loopback."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format 0.0.4 samples, names as written (no suffix munging)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"unparseable exposition line: {line!r}"
        out.append((m.group(1), dict(LABEL_RE.findall(m.group(2) or "")), float(m.group(3))))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The demo repository `make models` built (make test builds it first)."""
    if not (MODELS / ".build-stamp").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build_models.py"), "--out", str(MODELS)],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return MODELS


@pytest.fixture
def repo_copy(models_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the digits model, for tests that change the repository."""
    dest = tmp_path / "models"
    dest.mkdir()
    shutil.copytree(models_dir / "digits", dest / "digits", ignore=shutil.ignore_patterns("validation"))
    return dest


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    token: str | None = None
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.url}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kw):  # type: ignore[no-untyped-def]
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.url, **kw)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value from /metrics as Prometheus reads it, None when absent."""
        text = requests.get(f"{self.http}/metrics", timeout=10).text
        for sample_name, sample_labels, value in parse_exposition(text):
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_server(repository: Path, log_dir: Path, *args: str, token: str | None = None,
                 wait: bool = True) -> RunningServer:
    port = free_port()
    log = log_dir / f"model-server-{port}.log"
    cmd = [sys.executable, "-m", "model_server", "--repository", str(repository),
           "--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if token:
        token_file = log_dir / f"token-{port}"
        token_file.write_text(token)
        cmd += ["--admin-token-file", str(token_file)]
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = RunningServer(proc, port, log, token)
    if not wait:
        return server
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"model server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(f"{server.http}/v2/health/ready", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"model server not ready in 60 s:\n{log.read_text()}")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    started: list[RunningServer] = []

    def factory(repository: Path, *args: str, token: str | None = None, wait: bool = True) -> RunningServer:
        s = start_server(repository, tmp_path, *args, token=token, wait=wait)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


ADMIN_TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server on the demo repository (digits v1, resnet_bench v1), shared by a module."""
    s = start_server(models_dir, tmp_path_factory.mktemp("server"), token=ADMIN_TOKEN)
    yield s
    s.stop()


@pytest.fixture(scope="session")
def digit_images(models_dir: Path) -> list[tuple[bytes, int]]:
    import csv

    folder = models_dir / "digits" / "validation"
    with (folder / "labels.csv").open() as f:
        return [((folder / row["file"]).read_bytes(), int(row["label"])) for row in csv.DictReader(f)]
