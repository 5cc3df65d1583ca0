"""Local processes of the one-machine setup: start a model server on loopback, scrape it, stop it.

Used by the tests, the benchmarks and ``make demo``; services listen on 127.0.0.1 only, on a
free port, and are stopped by whoever started them, by process id.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format 0.0.4 samples with names as written (no ``_total`` munging)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        if m is None:
            raise ValueError(f"unparseable exposition line: {line!r}")
        out.append((m.group(1), dict(LABEL_RE.findall(m.group(2) or "")), float(m.group(3))))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback URL we built)
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class ManagedProcess:
    """A service this code started: stopped by its process id, SIGTERM then SIGKILL."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@dataclass
class ModelServerProcess(ManagedProcess):
    token: str | None = None
    url: str = field(init=False)  # host:port, as tritonclient takes it

    def __post_init__(self) -> None:
        self.url = f"127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.url}"

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def client(self, **kw: Any) -> Any:
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.url, **kw)

    def load_versions(self, model: str, *versions: int | str) -> None:
        """Serve exactly these versions (Triton's load API with a specific version policy)."""
        policy = {"version_policy": {"specific": {"versions": sorted({int(v) for v in versions})}}}
        self.client().load_model(model, headers=self.admin, config=json.dumps(policy))

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value from /metrics as Prometheus reads it; None when absent."""
        _, body = _get(f"{self.http}/metrics")
        for sample, sample_labels, value in parse_exposition(body.decode()):
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()):
                return value
        return None


def start_model_server(
    repository: Path,
    log_dir: Path,
    *args: str,
    token: str | None = None,
    port: int | None = None,
    wait_s: float = 60.0,
) -> ModelServerProcess:
    """Start ``python -m model_server`` on 127.0.0.1 and wait until it is ready.

    Traffic policies persist under ``log_dir`` unless ``--state-dir`` is among ``args``.

    The admin token travels in a 0600 file, never on the command line (visible in ``ps``).
    """
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    if "--state-dir" not in args:  # never leave policies behind in a shared repository
        args = (*args, "--state-dir", str(log_dir / f"state-{port}"))
    log = log_dir / f"model-server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "model_server",
        "--repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    if token:
        token_file = log_dir / f"admin-token-{port}"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        cmd += ["--admin-token-file", str(token_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = ModelServerProcess(proc, port, log, token)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"model server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if _get(f"{server.http}/v2/health/ready", timeout=1)[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"model server not ready within {wait_s:g} s:\n{log.read_text()}")


@dataclass
class PrometheusProcess(ManagedProcess):
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_prometheus(
    targets: list[str],
    work_dir: Path,
    scrape_interval_s: float = 1.0,
    port: int | None = None,
    wait_s: float = 30.0,
) -> PrometheusProcess:
    """Debian's ``prometheus`` on 127.0.0.1 with its own config and data folder, scraping ``targets``.

    Returns once every target has been scraped successfully.
    """
    import shutil

    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed: apt-get install --no-install-recommends prometheus")
    port = port or free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "prometheus.yml"
    config.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval_s:g}s\n"
        f"  evaluation_interval: {scrape_interval_s:g}s\n"
        "scrape_configs:\n"
        "  - job_name: model-server\n"
        f"    static_configs:\n      - targets: {json.dumps(targets)}\n"
    )
    log = work_dir / "prometheus.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={work_dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    prom = PrometheusProcess(proc, port, log)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            # Ready is not enough: target discovery starts scraping up to 5 s later.
            status, body = _get(f"{prom.url}/api/v1/targets?state=active", timeout=1)
            if status == 200:
                active = json.loads(body)["data"]["activeTargets"]
                if len(active) == len(targets) and all(t["health"] == "up" for t in active):
                    return prom
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    prom.stop()
    raise RuntimeError(f"prometheus not ready within {wait_s:g} s:\n{log.read_text()[-3000:]}")
