"""Serving overhead: raw ``InferenceSession.run`` vs the model server through tritonclient.

Side by side in one run, interleaved in rounds so that drift on a shared machine hits both:
``resnet_bench`` and ``digits``, batch 1 and 8, concurrency 1 and 4. The server is a real
``python -m model_server`` process on loopback; the client sends binary tensors. Raw digits
includes the same PNG decoding the server does (``images_to_features``), so that the
difference is the server's own cost (HTTP, codec, scheduling, metrics); session.run alone is
reported beside it.

Prints a table of ratios and writes ``bench/results/serving.json``. Goals from the issue:
throughput >= 0.85x raw on resnet_bench batch 8; added p50 <= 1 ms per request on digits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from model_server.config import load_config  # noqa: E402
from model_server.preprocess import images_to_features  # noqa: E402
from include.rollout.local import start_model_server  # noqa: E402

ort.set_default_logger_severity(3)


def run_for(seconds: float, concurrency: int, call) -> dict:  # type: ignore[no-untyped-def]
    """Run ``call(worker_state)`` from ``concurrency`` threads for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(concurrency + 1)

    def worker(i: int) -> None:
        state: dict = {}
        call(state)  # warm: connections, first-run allocations
        barrier.wait()
        out = latencies[i]
        while time.perf_counter() < stop:
            t = time.perf_counter()
            call(state)
            out.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    flat = sorted(x for lst in latencies for x in lst)
    return {
        "requests": len(flat),
        "requests_per_s": len(flat) / elapsed,
        "p50_ms": 1000 * flat[len(flat) // 2],
        "p99_ms": 1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))],
    }


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "execution_provider": "CPUExecutionProvider",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement window")
    p.add_argument("--rounds", type=int, default=3, help="interleaved raw/server rounds (median taken)")
    p.add_argument("--models", nargs="+", default=["resnet_bench", "digits"], choices=["resnet_bench", "digits"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    digits_cfg = load_config(args.repository / "digits")
    assert digits_cfg.preprocess is not None
    val = sorted((args.repository / "digits" / "validation").glob("*.png"))
    pngs = [f.read_bytes() for f in val[:8]]
    resnet_x = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    sessions = {
        "digits": ort.InferenceSession(str(args.repository / "digits" / "1" / "model.onnx")),
        "resnet_bench": ort.InferenceSession(str(args.repository / "resnet_bench" / "1" / "model.onnx")),
    }
    log_dir = ROOT / "bench" / ".logs"
    log_dir.mkdir(exist_ok=True)
    server = start_model_server(args.repository, log_dir, "--load-model", "digits", "--load-model", "resnet_bench")
    results = []
    try:
        for model in args.models:
            for batch in (1, 8):
                for concurrency in (1, 4):
                    if model == "digits":
                        images = np.array(pngs[:batch], dtype=object)

                        def raw(state: dict, images=images) -> None:
                            feats = images_to_features(images, digits_cfg.preprocess, "image")
                            sessions["digits"].run(["probabilities"], {"input": feats})

                        feats_only = images_to_features(images, digits_cfg.preprocess, "image")

                        def raw_run_only(state: dict, feats=feats_only) -> None:
                            sessions["digits"].run(["probabilities"], {"input": feats})

                        def make_input(images=images) -> httpclient.InferInput:
                            inp = httpclient.InferInput("image", [len(images)], "BYTES")
                            inp.set_data_from_numpy(images, binary_data=True)
                            return inp

                        output = "probabilities"
                    else:
                        x = resnet_x[:batch]

                        def raw(state: dict, x=x) -> None:
                            sessions["resnet_bench"].run(["logits"], {"input": x})

                        raw_run_only = None

                        def make_input(x=x) -> httpclient.InferInput:
                            inp = httpclient.InferInput("input", list(x.shape), "FP32")
                            inp.set_data_from_numpy(x, binary_data=True)
                            return inp

                        output = "logits"

                    def served(state: dict, model=model, make_input=make_input, output=output) -> None:
                        if "client" not in state:
                            state["client"] = server.client()
                            state["inputs"] = [make_input()]
                            state["outputs"] = [httpclient.InferRequestedOutput(output, binary_data=True)]
                        state["client"].infer(model, state["inputs"], outputs=state["outputs"])

                    rounds: dict[str, list[dict]] = {"raw": [], "server": [], "raw_run_only": []}
                    for _ in range(args.rounds):
                        rounds["raw"].append(run_for(args.seconds, concurrency, raw))
                        rounds["server"].append(run_for(args.seconds, concurrency, served))
                        if raw_run_only is not None:
                            rounds["raw_run_only"].append(run_for(args.seconds / 2, concurrency, raw_run_only))

                    def med(kind: str, key: str, rounds=rounds) -> float:
                        return statistics.median(r[key] for r in rounds[kind])

                    row = {
                        "model": model, "batch": batch, "concurrency": concurrency,
                        "raw_images_per_s": med("raw", "requests_per_s") * batch,
                        "server_images_per_s": med("server", "requests_per_s") * batch,
                        "raw_p50_ms": med("raw", "p50_ms"), "server_p50_ms": med("server", "p50_ms"),
                        "raw_p99_ms": med("raw", "p99_ms"), "server_p99_ms": med("server", "p99_ms"),
                    }
                    if rounds["raw_run_only"]:
                        row["raw_run_only_p50_ms"] = med("raw_run_only", "p50_ms")
                    row["throughput_ratio"] = row["server_images_per_s"] / row["raw_images_per_s"]
                    row["added_p50_ms"] = row["server_p50_ms"] - row["raw_p50_ms"]
                    results.append(row)
                    print(f"{model:13s} batch {batch} conc {concurrency}: raw {row['raw_images_per_s']:8.1f} img/s, "
                          f"server {row['server_images_per_s']:8.1f} img/s, ratio {row['throughput_ratio']:.3f}; "
                          f"p50 raw {row['raw_p50_ms']:.3f} ms, server {row['server_p50_ms']:.3f} ms, "
                          f"added {row['added_p50_ms']:+.3f} ms", flush=True)
    finally:
        server.stop()

    goals = {
        "resnet_bench_batch8_throughput_ratio_min": min(
            r["throughput_ratio"] for r in results if r["model"] == "resnet_bench" and r["batch"] == 8),
        "digits_added_p50_ms_max": max(r["added_p50_ms"] for r in results if r["model"] == "digits"),
        "digits_added_p50_ms_concurrency1_max": max(
            r["added_p50_ms"] for r in results if r["model"] == "digits" and r["concurrency"] == 1),
    }
    print(json.dumps(goals, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "serving",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "client": "tritonclient.http, binary data"},
        "results": results,
        "goals": goals,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
