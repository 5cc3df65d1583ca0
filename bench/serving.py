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
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402

from bench import write_result  # noqa: E402
from devstack.processes import ModelServerProcess, start_model_server  # noqa: E402
from model_server.config import load_config  # noqa: E402
from model_server.preprocess import images_to_features  # noqa: E402
from vision_rollout.replay import load_validation  # noqa: E402

ort.set_default_logger_severity(3)


def run_for(seconds: float, concurrency: int, call: Callable[[dict], object]) -> dict:
    """Run ``call(worker_state)`` from ``concurrency`` threads for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(concurrency + 1)

    def worker(i: int) -> None:
        state: dict = {}
        call(state)  # warm: connections, first-run allocations
        barrier.wait()
        out = latencies[i]
        while True:  # at least one timed call per worker, however short the window
            t = time.perf_counter()
            call(state)
            out.append(time.perf_counter() - t)
            if t >= stop:
                break

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


@dataclass
class Case:
    """One model at one batch size: the raw call and what the client sends."""

    model: str
    output: str
    batch: int
    raw: Callable[[], object]
    make_input: Callable[[], httpclient.InferInput]
    raw_run_only: Callable[[], object] | None = None


def digits_case(repository: Path, session: ort.InferenceSession, batch: int) -> Case:
    pre = load_config(repository / "digits").preprocess
    assert pre is not None
    images = np.array(
        [image for _, image, _ in load_validation(repository / "digits" / "validation", batch)], dtype=object
    )
    features = images_to_features(images, pre, "image")

    def make_input() -> httpclient.InferInput:
        inp = httpclient.InferInput("image", [batch], "BYTES")
        inp.set_data_from_numpy(images, binary_data=True)
        return inp

    return Case(
        "digits",
        "probabilities",
        batch,
        raw=lambda: session.run(["probabilities"], {"input": images_to_features(images, pre, "image")}),
        make_input=make_input,
        raw_run_only=lambda: session.run(["probabilities"], {"input": features}),
    )


def resnet_case(session: ort.InferenceSession, batch: int) -> Case:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)

    def make_input() -> httpclient.InferInput:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        return inp

    return Case(
        "resnet_bench",
        "logits",
        batch,
        raw=lambda: session.run(["logits"], {"input": x}),
        make_input=make_input,
    )


def stateless(fn: Callable[[], object]) -> Callable[[dict], object]:
    return lambda state: fn()


def measure(case: Case, server: ModelServerProcess, concurrency: int, seconds: float, rounds: int) -> dict:
    """Raw and served, interleaved ``rounds`` times; medians of each."""

    def served(state: dict) -> None:
        if "client" not in state:
            state["client"] = server.client()
            state["inputs"] = [case.make_input()]
            state["outputs"] = [httpclient.InferRequestedOutput(case.output, binary_data=True)]
        state["client"].infer(case.model, state["inputs"], outputs=state["outputs"])

    runs: dict[str, list[dict]] = {"raw": [], "server": [], "raw_run_only": []}
    for _ in range(rounds):
        runs["raw"].append(run_for(seconds, concurrency, stateless(case.raw)))
        runs["server"].append(run_for(seconds, concurrency, served))
        if case.raw_run_only is not None:
            runs["raw_run_only"].append(run_for(seconds / 2, concurrency, stateless(case.raw_run_only)))

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    row: dict[str, Any] = {
        "model": case.model,
        "batch": case.batch,
        "concurrency": concurrency,
        "raw_images_per_s": med("raw", "requests_per_s") * case.batch,
        "server_images_per_s": med("server", "requests_per_s") * case.batch,
        "raw_p50_ms": med("raw", "p50_ms"),
        "server_p50_ms": med("server", "p50_ms"),
        "raw_p99_ms": med("raw", "p99_ms"),
        "server_p99_ms": med("server", "p99_ms"),
    }
    if runs["raw_run_only"]:
        row["raw_run_only_p50_ms"] = med("raw_run_only", "p50_ms")
    row["throughput_ratio"] = row["server_images_per_s"] / row["raw_images_per_s"]
    row["added_p50_ms"] = row["server_p50_ms"] - row["raw_p50_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement window")
    p.add_argument("--rounds", type=int, default=3, help="interleaved raw/server rounds (median taken)")
    p.add_argument("--models", nargs="+", default=["resnet_bench", "digits"], choices=["resnet_bench", "digits"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = p.parse_args(argv)

    sessions = {m: ort.InferenceSession(str(args.repository / m / "1" / "model.onnx")) for m in args.models}
    log_dir = ROOT / "bench" / ".logs"
    load = [a for m in args.models for a in ("--load-model", m)]
    server = start_model_server(args.repository, log_dir, *load)
    results = []
    try:
        for model in args.models:
            for batch in (1, 8):
                case = (
                    digits_case(args.repository, sessions[model], batch)
                    if model == "digits"
                    else resnet_case(sessions[model], batch)
                )
                for concurrency in (1, 4):
                    row = measure(case, server, concurrency, args.seconds, args.rounds)
                    results.append(row)
                    print(
                        f"{model:13s} batch {batch} conc {concurrency}: "
                        f"raw {row['raw_images_per_s']:8.1f} img/s, server {row['server_images_per_s']:8.1f} img/s, "
                        f"ratio {row['throughput_ratio']:.3f}; p50 raw {row['raw_p50_ms']:.3f} ms, "
                        f"server {row['server_p50_ms']:.3f} ms, added {row['added_p50_ms']:+.3f} ms",
                        flush=True,
                    )
    finally:
        server.stop()

    def pick(model: str, key: str, **where: int) -> list[float]:
        return [r[key] for r in results if r["model"] == model and all(r[k] == v for k, v in where.items())]

    goals = {}
    if "resnet_bench" in args.models:
        goals["resnet_bench_batch8_throughput_ratio_min"] = min(pick("resnet_bench", "throughput_ratio", batch=8))
    if "digits" in args.models:
        goals["digits_added_p50_ms_concurrency1_max"] = max(pick("digits", "added_p50_ms", concurrency=1))
        goals["digits_added_p50_ms_concurrency4_max"] = max(pick("digits", "added_p50_ms", concurrency=4))
    print(json.dumps(goals, indent=2))
    write_result(
        args.out,
        "serving",
        {
            "settings": {"seconds": args.seconds, "rounds": args.rounds, "client": "tritonclient.http, binary data"},
            "results": results,
            "goals": goals,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
