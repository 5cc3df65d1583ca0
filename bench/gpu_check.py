"""The GPU path on a machine with an NVIDIA GPU: CUDA execution provider and NVML gauges.

Starts two model servers on loopback over the same repository, one with ``--device cuda`` and
one with ``--device cpu``, and checks through the HTTP API what only a GPU can show: the CUDA
provider is the one serving, its answers agree with the CPU's (digits top-1 over the validation
set; ResNet-18 logits), the ``nv_gpu_*`` gauges carry the GPU's uuid with sane values and move
under load, and per-request latency side by side (batch 8 of ResNet-18, binary tensors).

    python bench/gpu_check.py --repository models [--out bench/results/gpu.json]

Exits 1 when a check fails. Needs onnxruntime-gpu and CUDA 13 libraries (nvidia-* wheels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.processes import start_model_server  # noqa: E402
from vision_rollout.metrics import parse_exposition  # noqa: E402
from vision_rollout.replay import load_validation  # noqa: E402
from vision_rollout.serving import image_request  # noqa: E402

# requests asks for gzip by default, which the server honours as Triton does: answers as they are,
# as tritonclient asks them, so the latencies are of inference, not of compression.
PLAIN = {"Accept-Encoding": "identity"}


def infer_png(url: str, png: bytes) -> np.ndarray:
    r = requests.post(f"{url}/v2/models/digits/infer", json=image_request([png]), timeout=30, headers=PLAIN)
    r.raise_for_status()
    return np.array(r.json()["outputs"][0]["data"], dtype=np.float32)


def infer_tensor(url: str, x: np.ndarray) -> tuple[np.ndarray, float]:
    """ResNet-18 with binary tensors (the KServe binary extension); (logits, seconds)."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    t = time.perf_counter()
    r = requests.post(
        f"{url}/v2/models/resnet_bench/infer",
        data=header + x.tobytes(),
        timeout=60,
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
            **PLAIN,
        },
    )
    seconds = time.perf_counter() - t
    r.raise_for_status()
    n = int(r.headers["Inference-Header-Content-Length"])
    return np.frombuffer(r.content[n:], dtype=np.float32).reshape(x.shape[0], -1), seconds


def gauges(url: str) -> dict[str, dict[str, float]]:
    text = requests.get(f"{url}/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    for name, labels, value in parse_exposition(text):
        if name.startswith("nv_gpu_"):
            out.setdefault(name, {})[labels.get("gpu_uuid", "")] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    p.add_argument("--requests", type=int, default=100)
    args = p.parse_args(argv)
    checks: dict[str, Any] = {}
    failures: list[str] = []

    def check(name: str, ok: bool, detail: Any) -> None:
        checks[name] = {"ok": bool(ok), "detail": detail}
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        gpu = start_model_server(args.repository, Path(tmp) / "gpu", "--device", "cuda", wait_s=180)
        cpu = start_model_server(args.repository, Path(tmp) / "cpu", "--device", "cpu", wait_s=180)
        try:
            for model in ("digits", "resnet_bench"):
                meta = requests.get(f"{gpu.http}/v2/models/{model}", timeout=10).json()
                providers = set(meta["execution_providers"].values())
                check(f"{model}: served by the CUDA provider", providers == {"CUDAExecutionProvider"}, providers)
            labelled = load_validation(args.repository / "digits" / "validation")
            agree = correct_gpu = correct_cpu = 0
            max_diff = 0.0
            for _, png, label in labelled:
                a, b = infer_png(gpu.http, png), infer_png(cpu.http, png)
                agree += int(a.argmax() == b.argmax())
                correct_gpu += int(a.argmax() == label)
                correct_cpu += int(b.argmax() == label)
                max_diff = max(max_diff, float(np.abs(a - b).max()))
            n = len(labelled)
            check(
                "digits: CUDA and CPU agree on every validation image",
                agree == n,
                {
                    "images": n,
                    "agree": agree,
                    "accuracy_cuda": correct_gpu / n,
                    "accuracy_cpu": correct_cpu / n,
                    "max_abs_probability_diff": max_diff,
                },
            )
            before = gauges(gpu.http)
            rng = np.random.default_rng(0)
            x = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
            lg, _ = infer_tensor(gpu.http, x)
            lc, _ = infer_tensor(cpu.http, x)
            rel = float(np.abs(lg - lc).max() / np.abs(lc).max())
            check(
                "resnet_bench: CUDA logits match CPU (relative max diff < 1e-2)",
                rel < 1e-2,
                {"relative_max_diff": rel, "top1_agree": int((lg.argmax(1) == lc.argmax(1)).sum())},
            )
            times: dict[str, list[float]] = {"cuda": [], "cpu": []}
            for _ in range(args.requests):
                for arm, server in (("cuda", gpu), ("cpu", cpu)):
                    times[arm].append(infer_tensor(server.http, x)[1])
            during = gauges(gpu.http)
            p50 = {arm: statistics.median(t) * 1000 for arm, t in times.items()}
            checks["resnet_bench_batch8_p50_ms"] = {**p50, "cpu_over_cuda": p50["cpu"] / p50["cuda"]}
            print(
                f"resnet_bench batch 8 p50: cuda {p50['cuda']:.2f} ms, cpu {p50['cpu']:.2f} ms "
                f"({p50['cpu'] / p50['cuda']:.1f}x)",
                flush=True,
            )
            names = {
                "nv_gpu_utilization",
                "nv_gpu_memory_used_bytes",
                "nv_gpu_memory_total_bytes",
                "nv_gpu_power_usage",
            }
            check("nv_gpu_* gauges exported", names <= set(during), sorted(during))
            uuids = set(during.get("nv_gpu_memory_total_bytes", {}))
            check(
                "gauges labelled by GPU uuid",
                bool(uuids) and all(u.startswith("GPU-") for u in uuids),
                sorted(uuids),
            )
            used = during.get("nv_gpu_memory_used_bytes", {})
            total = during.get("nv_gpu_memory_total_bytes", {})
            check(
                "memory used within total and above zero",
                bool(used) and all(0 < used[u] <= total[u] for u in used),
                {"used": used, "total": total},
            )
            check(
                "gauges read at scrape time (utilization or memory moved under load)",
                before != during,
                {"before": before, "during": during},
            )
            cpu_gauges = gauges(cpu.http)
            checks["cpu_server_gauges"] = sorted(cpu_gauges)  # NVML sees the GPU whatever the provider
        finally:
            gpu.stop()
            cpu.stop()
    import onnxruntime as ort

    result = {
        "ok": not failures,
        "failures": failures,
        "onnxruntime": ort.__version__,
        "providers_available": ort.get_available_providers(),
        "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}: {'all checks passed' if not failures else 'FAILED: ' + ', '.join(failures)}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
