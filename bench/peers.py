"""Against a peer: our model server vs KServe's Python ``ModelServer``, raw ORT as the reference.

Both servers serve the same ONNX files with the same ONNX Runtime build (onnxruntime-gpu 1.31.1)
and the same session options (log severity 3, intra-op threads that do not spin; the CPU
provider, or CUDA first with ``--device cuda``): ours as ``python -m model_server``, KServe
0.21.0 as ``bench/kserve_onnx_model.py`` (a KServe ``Model`` subclass) run by a venv of its own,
outside the project's environment (``bench/peers-requirements.txt``, every package pinned;
made once and reused while that file and the Python version stay the same). Both listen on
127.0.0.1, one process and one worker each, access and latency logging off; both are driven by
the same ``tritonclient.http`` code with binary tensors; raw ``InferenceSession.run`` in this
process (same options) is the reference. Models: ``tiny`` (64 -> 10 MatMul + Softmax, built
here) and ``resnet_bench`` from the demo repository.

Rows (model, batch, concurrent clients) are measured in interleaved rounds, raw / ours / KServe
in a rotating order, so that drift on a shared machine hits all three; ratios are the medians
of the per-round ratios of images per second. Prints a markdown table, writes
``bench/results/peers.json``. Goal: ours / KServe at least 1.5x on every row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from bench import write_result  # noqa: E402
from bench.serving import run_for, stateless  # noqa: E402
from devstack.processes import ModelServerProcess, PortTaken, on_a_free_port, start_model_server  # noqa: E402

ort.set_default_logger_severity(3)

KSERVE_VERSION = "0.21.0"
ORT_VERSION = "1.31.1"
REQUIREMENTS = ROOT / "bench" / "peers-requirements.txt"
KSERVE_MODEL = ROOT / "bench" / "kserve_onnx_model.py"
ROWS = [  # model, batch, concurrency
    ("tiny", 1, 1),
    ("tiny", 1, 4),
    ("tiny", 8, 4),
    ("resnet_bench", 1, 1),
    ("resnet_bench", 1, 4),
    ("resnet_bench", 8, 1),
    ("resnet_bench", 8, 4),
]
GOAL = 1.5  # ours / KServe, throughput, on every row
ARMS = ("raw", "ours", "kserve")


class KServeVenvError(RuntimeError):
    pass


def default_venv() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "vision-rollout" / f"kserve-{KSERVE_VERSION}"


def venv_key() -> str:
    """What the venv was made from: the pinned set and the interpreter (a change makes it anew)."""
    h = hashlib.sha256(REQUIREMENTS.read_bytes())
    h.update(f"{sys.version_info[:3]}".encode())
    return h.hexdigest()


def ensure_kserve_venv(venv: Path) -> Path:
    """The KServe venv's python: made (or made anew) with the pinned set, reused when it matches."""
    if venv.resolve() == Path(sys.prefix).resolve():
        raise KServeVenvError(f"--kserve-venv {venv} is this environment; KServe gets a venv of its own")
    python = venv / "bin" / "python"
    stamp = venv / ".bench-peers-key"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == venv_key():
        return python
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
        raise KServeVenvError(f"--kserve-venv {venv} is a folder with files and not a venv: not clearing it")
    print(f"making the KServe venv in {venv} (kserve {KSERVE_VERSION}, onnxruntime-gpu {ORT_VERSION})", flush=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
        [str(python), "-c", CHECK_VENV],
    ]
    for cmd in steps:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KServeVenvError(f"cannot make the KServe venv in {venv}: {' '.join(cmd[:4])}: {exc}") from None
        if out.returncode != 0:
            raise KServeVenvError(
                f"cannot make the KServe venv in {venv}: {' '.join(cmd[:4])} exited {out.returncode}\n"
                f"{(out.stdout + out.stderr)[-3000:]}\n"
                f"(it needs PyPI, or a pip configured with a mirror; another folder: --kserve-venv)"
            )
    stamp.write_text(venv_key() + "\n")
    return python


# Run by the KServe venv's python: the versions the comparison claims, and no plain onnxruntime.
CHECK_VENV = f"""
from importlib import metadata
assert metadata.version("kserve") == "{KSERVE_VERSION}", metadata.version("kserve")
assert metadata.version("onnxruntime-gpu") == "{ORT_VERSION}", metadata.version("onnxruntime-gpu")
try:
    metadata.version("onnxruntime")
except metadata.PackageNotFoundError:
    pass
else:
    raise AssertionError("plain onnxruntime is installed beside onnxruntime-gpu")
import kserve, onnxruntime
"""


def build_tiny(path: Path) -> None:
    """64 -> 10 MatMul + Softmax, FP32, any batch: a model whose inference costs next to nothing."""
    w = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor("w", TensorProto.FLOAT, list(w.shape), w.flatten().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench-peers")
    model.ir_version = 10  # onnxruntime 1.31 refuses onnx 1.23's default IR
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


TINY_CONFIG = {
    "name": "tiny",
    "platform": "onnxruntime_onnx",
    "max_batch_size": 16,
    "input": [{"name": "input", "datatype": "FP32", "dims": [-1, 64]}],
    "output": [{"name": "probabilities", "datatype": "FP32", "dims": [-1, 10]}],
    "version_policy": {"latest": {"num_versions": 1}},
    "instance_count": 1,
}


def make_repository(repo: Path, source: Path) -> dict[str, Path]:
    """``tiny`` built, ``resnet_bench`` copied from ``source``; the ONNX file of each."""
    build_tiny(repo / "tiny" / "1" / "model.onnx")
    (repo / "tiny" / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2) + "\n")
    shutil.copytree(source / "resnet_bench", repo / "resnet_bench", ignore=shutil.ignore_patterns(".*"))
    return {m: repo / m / "1" / "model.onnx" for m in ("tiny", "resnet_bench")}


def session_providers(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def raw_session(path: Path, device: str) -> ort.InferenceSession:
    options = ort.SessionOptions()  # as model_server/model.py makes its sessions
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=session_providers(device))


def start_kserve(python: Path, onnx_files: dict[str, Path], log_dir: Path, device: str) -> ModelServerProcess:
    """KServe (``python``, its venv's) serving ``onnx_files``, ready, on a free port: picked again
    where another process binds it first (on_a_free_port, as the project's other servers)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["ORT_DISABLE_TELEMETRY"] = "1"

    def start(port: int) -> ModelServerProcess:
        log = log_dir / f"kserve-{port}.log"
        made = not log.exists()  # removed if the port is given up, as start_model_server's files
        cmd = [str(python), str(KSERVE_MODEL), "--host", "127.0.0.1", "--port", str(port), "--device", device]
        for name, path in onnx_files.items():
            cmd += ["--serve", f"{name}={path}"]
        with log.open("wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log_dir)
        server = ModelServerProcess(proc, port, log, name="KServe's server")
        try:
            server.wait_until("ready", 120.0)
        except RuntimeError as exc:  # (PortTaken too: another process bound the port first)
            server.stop(timeout_s=5)
            if isinstance(exc, PortTaken) and made:
                log.unlink(missing_ok=True)
            raise
        return server

    return on_a_free_port(start, None)


@dataclass
class Case:
    model: str
    input: str
    output: str
    batch: int
    x: np.ndarray

    def make_input(self) -> httpclient.InferInput:
        inp = httpclient.InferInput(self.input, list(self.x.shape), "FP32")
        inp.set_data_from_numpy(self.x, binary_data=True)
        return inp


def make_case(model: str, batch: int) -> Case:
    rng = np.random.default_rng(batch)
    if model == "tiny":
        return Case(model, "input", "probabilities", batch, rng.standard_normal((batch, 64)).astype(np.float32))
    return Case(model, "input", "logits", batch, rng.standard_normal((batch, 3, 224, 224)).astype(np.float32))


def served(case: Case, server: ModelServerProcess) -> Any:
    """One request as every client thread sends it: its own client, the input encoded once."""

    def call(state: dict) -> Any:
        if "client" not in state:
            state["client"] = server.client()
            state["inputs"] = [case.make_input()]
            state["outputs"] = [httpclient.InferRequestedOutput(case.output, binary_data=True)]
        return state["client"].infer(case.model, state["inputs"], outputs=state["outputs"])

    return call


def check_answers(case: Case, session: ort.InferenceSession, servers: dict[str, ModelServerProcess]) -> float:
    """Both servers answer what raw ORT answers (largest absolute difference); else RuntimeError."""
    [want] = session.run([case.output], {case.input: case.x})
    worst = 0.0
    for arm, server in servers.items():
        got = served(case, server)({}).as_numpy(case.output)
        if got is None or got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"{arm} answers {case.model} batch {case.batch} differently from raw ORT")
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(call: Any, concurrency: int, seconds: float, server: ModelServerProcess | None) -> dict:
    """``run_for``, and for a server the CPU it spent per request (warm-up calls counted)."""
    before = process_cpu_s(server.proc.pid) if server else 0.0
    result = run_for(seconds, concurrency, call)
    if server:
        spent = process_cpu_s(server.proc.pid) - before
        result["cpu_ms_per_request"] = 1000 * spent / (result["requests"] + concurrency)
    return result


def measure(
    case: Case,
    session: ort.InferenceSession,
    servers: dict[str, ModelServerProcess],
    concurrency: int,
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    calls = {
        "raw": stateless(lambda: session.run([case.output], {case.input: case.x})),
        "ours": served(case, servers["ours"]),
        "kserve": served(case, servers["kserve"]),
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        for arm in ARMS[r % 3 :] + ARMS[: r % 3]:  # a rotating order: none always first after the other
            runs[arm].append(timed(calls[arm], concurrency, seconds, servers.get(arm)))

    def per_round(a: str, b: str, key: str = "requests_per_s") -> float:
        return statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True))

    row: dict[str, Any] = {"model": case.model, "batch": case.batch, "concurrency": concurrency}
    for arm in ARMS:
        row[f"{arm}_images_per_s"] = statistics.median(x["requests_per_s"] for x in runs[arm]) * case.batch
        row[f"{arm}_p50_ms"] = statistics.median(x["p50_ms"] for x in runs[arm])
        row[f"{arm}_p99_ms"] = statistics.median(x["p99_ms"] for x in runs[arm])
        row[f"{arm}_requests"] = [x["requests"] for x in runs[arm]]
    for arm in ("ours", "kserve"):
        row[f"{arm}_cpu_ms_per_request"] = statistics.median(x["cpu_ms_per_request"] for x in runs[arm])
    row["kserve_over_ours_cpu_per_request"] = per_round("kserve", "ours", "cpu_ms_per_request")
    row["ours_over_raw"] = per_round("ours", "raw")
    row["kserve_over_raw"] = per_round("kserve", "raw")
    row["ours_over_kserve"] = per_round("ours", "kserve")
    row["ours_over_kserve_rounds"] = [
        x["requests_per_s"] / y["requests_per_s"] for x, y in zip(runs["ours"], runs["kserve"], strict=True)
    ]
    row["goal_met"] = row["ours_over_kserve"] >= GOAL
    return row


def ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.4f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | concurrency | ours / raw ORT | KServe / raw ORT | ours / KServe | p50 ours | p50 KServe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['concurrency']} | {ratio(r['ours_over_raw'])} | "
            f"{ratio(r['kserve_over_raw'])} | **{ratio(r['ours_over_kserve'])}** | {r['ours_p50_ms']:.3f} ms | "
            f"{r['kserve_p50_ms']:.3f} ms |"
        )
    return "\n".join(lines)


def cpu_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | concurrency | server CPU per request, ours | KServe | KServe / ours |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['concurrency']} | {r['ours_cpu_ms_per_request']:.3f} ms | "
            f"{r['kserve_cpu_ms_per_request']:.3f} ms | {ratio(r['kserve_over_ours_cpu_per_request'])} |"
        )
    return "\n".join(lines)


def parse_row(text: str) -> tuple[str, int, int]:
    """``resnet_bench:1:1``: a row of ROWS."""
    model, _, rest = text.partition(":")
    batch, _, concurrency = rest.partition(":")
    if not (batch.isdigit() and concurrency.isdigit()) or (model, int(batch), int(concurrency)) not in ROWS:
        rows = ", ".join(":".join(map(str, r)) for r in ROWS)
        raise argparse.ArgumentTypeError(f"{text!r} is not a row of the table ({rows})")
    return model, int(batch), int(concurrency)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models", help="where resnet_bench is")
    p.add_argument("--kserve-venv", type=Path, default=default_venv(), help="KServe's venv (made when missing)")
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement window")
    p.add_argument("--rounds", type=int, default=3, help="interleaved raw/ours/KServe rounds (medians taken)")
    p.add_argument("--quick", action="store_true", help="one round of 1 s windows, written to bench/.logs/peers/")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--rows",
        nargs="+",
        type=parse_row,
        metavar="MODEL:BATCH:CONCURRENCY",
        help="only these rows of the table (longer windows on one goal's row), written to bench/.logs/peers/",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 1.0, 1
    log_dir = ROOT / "bench" / ".logs" / "peers"
    partial = args.quick or args.rows
    out = args.out or (log_dir / "peers-partial.json" if partial else ROOT / "bench" / "results" / "peers.json")
    if not (args.repository / "resnet_bench" / "1" / "model.onnx").is_file():
        print(f"peers: no resnet_bench in {args.repository} (make models)", file=sys.stderr)
        return 2
    try:
        kserve_python = ensure_kserve_venv(args.kserve_venv)
    except KServeVenvError as exc:
        print(f"peers: {exc}", file=sys.stderr)
        return 2

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        onnx_files = make_repository(Path(tmp) / "models", args.repository)
        sessions = {m: raw_session(path, args.device) for m, path in onnx_files.items()}
        servers: dict[str, ModelServerProcess] = {}
        try:
            servers["ours"] = start_model_server(Path(tmp) / "models", log_dir, "--device", args.device)
            servers["kserve"] = start_kserve(kserve_python, onnx_files, log_dir, args.device)
            for model, batch, concurrency in args.rows or ROWS:
                case = make_case(model, batch)
                diff = check_answers(case, sessions[model], servers)
                row = measure(case, sessions[model], servers, concurrency, args.seconds, args.rounds)
                row["max_abs_difference_from_raw"] = diff
                rows.append(row)
                print(
                    f"{model:13s} batch {batch} conc {concurrency}: img/s raw {row['raw_images_per_s']:9.1f} "
                    f"ours {row['ours_images_per_s']:9.1f} KServe {row['kserve_images_per_s']:9.1f}; "
                    f"ours/KServe {row['ours_over_kserve']:.2f}; p50 ours {row['ours_p50_ms']:.3f} ms "
                    f"KServe {row['kserve_p50_ms']:.3f} ms; server CPU/request KServe/ours "
                    f"{row['kserve_over_ours_cpu_per_request']:.2f}",
                    flush=True,
                )
        finally:
            for server in servers.values():
                server.stop(timeout_s=10)
    print()
    print(table(rows))
    print()
    print(cpu_table(rows))
    met = [f"{r['model']} b{r['batch']} c{r['concurrency']}" for r in rows if r["goal_met"]]
    print(f"\nours / KServe >= {GOAL}: met on {len(met)} of {len(rows)} rows")
    write_result(
        out,
        "peers",
        {
            "settings": {
                "seconds": args.seconds,
                "rounds": args.rounds,
                "device": args.device,
                "client": "tritonclient.http, binary data, one client per thread",
                "kserve": f"kserve {KSERVE_VERSION}, onnxruntime-gpu {ORT_VERSION} (bench/peers-requirements.txt); "
                "one uvicorn worker, gRPC off, access and latency logs off, synchronous predict",
                "ours": "python -m model_server, its defaults (no access log)",
                "raw": "InferenceSession.run in the bench process, the servers' session options",
                "ratios": "medians of per-round ratios of images per second; rounds interleave the three arms",
                "server_cpu": "user + system CPU of the server process over a window / its requests (warm-ups included)",
            },
            "goal": f"ours / KServe at least {GOAL}x on every row",
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
