"""Routing overhead: direct versioned infer vs routed vs routed with 100% shadow, in one run.

One real model server on loopback, tritonclient as the client, interleaved rounds:
- closed loop, one request at a time: p50/p99 and throughput per mode;
- open loop at a sustainable rate (30% of the direct closed-loop throughput, so that the
  doubled work of a 100% shadow still fits): the primary's p99 per mode.
"direct" names the version in the path; "routed" goes through a policy with three header
rules that do not match and a sticky 100% route to the same version; "shadow" adds a 100%
mirror to a second version. Prints ratios and writes ``bench/results/routing.json``.
Goals: routed/direct p50 <= 1.05; primary p99 with 100% shadow <= 1.10x direct.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.http as httpclient  # noqa: E402

from bench import write_result  # noqa: E402
from devstack.processes import ModelServerProcess, start_model_server  # noqa: E402
from model_server.traffic import TrafficPolicy  # noqa: E402
from vision_rollout.replay import load_validation  # noqa: E402

RULES = [
    {"match": {"headers": {"x-tenant": {"exact": "canary-testers"}}}, "route": [{"version": "2"}]},
    {"match": {"headers": {"x-device-type": {"prefix": "beta-"}}}, "route": [{"version": "2"}]},
    {"match": {"headers": {"x-user-id": {"regex": "qa-[0-9]+"}}}, "route": [{"version": "2"}]},
]
MODES = ("direct", "routed", "shadow")


def make_input(model: str, repository: Path) -> httpclient.InferInput:
    if model == "digits":
        [(_, image, _)] = load_validation(repository / "digits" / "validation", limit=1)
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([image], dtype=object))
    else:
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
    return inp


def call(server: ModelServerProcess, model: str, mode: str, inp: httpclient.InferInput) -> Callable[[], None]:
    client = server.client()
    output = "probabilities" if model == "digits" else "logits"
    outputs = [httpclient.InferRequestedOutput(output, binary_data=True)]
    version = "1" if mode == "direct" else ""
    counter = iter(range(10**9))

    def once() -> None:
        client.infer(
            model,
            [inp],
            model_version=version,
            outputs=outputs,
            headers={"X-User-ID": f"user-{next(counter) % 1000}", "X-Device-Type": "ios"},
        )

    return once


def closed_loop(once: Callable[[], None], seconds: float) -> dict[str, float]:
    once()
    lat = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        once()
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    lat.sort()
    return {
        "rps": len(lat) / elapsed,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def open_loop(
    make_once: Callable[[], Callable[[], None]], rate: float, seconds: float, workers: int = 4
) -> dict[str, float]:
    """Requests scheduled at ``rate``; latency counted from the scheduled time (no coordinated omission)."""
    lat: list[float] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    start = time.perf_counter() + 0.2
    n_total = int(rate * seconds)

    def worker() -> None:
        once = make_once()
        once()
        while True:
            with lock:
                i = next(counter)
            if i >= n_total:
                return
            due = start + i / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            once()
            with lock:
                lat.append(time.perf_counter() - due)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat.sort()
    return {
        "rate": rate,
        "p50_ms": 1000 * lat[len(lat) // 2],
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def set_mode(server: ModelServerProcess, model: str, mode: str) -> None:
    policy: dict[str, Any] = {"rules": RULES, "route": [{"version": "1", "weight": 100}]}
    if mode == "shadow":
        policy["mirror"] = {"version": "2", "percent": 100}
    server.api.set_traffic(model, TrafficPolicy.from_dict(policy))


def bench_model(
    server: ModelServerProcess, repository: Path, model: str, seconds: float, rounds: int
) -> dict[str, Any]:
    inp = make_input(model, repository)
    closed: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    opened: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    set_mode(server, model, "routed")
    capacity = closed_loop(call(server, model, "direct", inp), seconds)["rps"]
    rate = 0.3 * capacity
    for _ in range(rounds):
        for mode in MODES:
            set_mode(server, model, mode)
            closed[mode].append(closed_loop(call(server, model, mode, inp), seconds))
            opened[mode].append(open_loop(functools.partial(call, server, model, mode, inp), rate, seconds))
            time.sleep(0.5)  # let queued shadow copies finish before the next mode

    def med(table: dict[str, list[dict[str, float]]], mode: str, key: str) -> float:
        return statistics.median(r[key] for r in table[mode])

    out: dict[str, Any] = {"model": model, "sustainable_rate_rps": rate, "modes": {}}
    for mode in MODES:
        out["modes"][mode] = {
            "closed_rps": med(closed, mode, "rps"),
            "closed_p50_ms": med(closed, mode, "p50_ms"),
            "closed_p99_ms": med(closed, mode, "p99_ms"),
            "open_p50_ms": med(opened, mode, "p50_ms"),
            "open_p99_ms": med(opened, mode, "p99_ms"),
        }
    m = out["modes"]
    out["ratios"] = {
        "routed_over_direct_p50": m["routed"]["closed_p50_ms"] / m["direct"]["closed_p50_ms"],
        "routed_over_direct_throughput": m["routed"]["closed_rps"] / m["direct"]["closed_rps"],
        "shadow_over_direct_open_p99": m["shadow"]["open_p99_ms"] / m["direct"]["open_p99_ms"],
        "shadow_over_direct_closed_p50": m["shadow"]["closed_p50_ms"] / m["direct"]["closed_p50_ms"],
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["digits", "resnet_bench"], choices=["digits", "resnet_bench"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "routing.json")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        repo = Path(tmp) / "models"
        for model in args.models:  # a second version of each model, for the shadow
            shutil.copytree(args.repository / model, repo / model, ignore=shutil.ignore_patterns("validation"))
            shutil.copytree(repo / model / "1", repo / model / "2", dirs_exist_ok=True)
            cfg = json.loads((repo / model / "config.json").read_text())
            cfg["version_policy"] = {"specific": {"versions": [1, 2]}}
            (repo / model / "config.json").write_text(json.dumps(cfg))
        if "digits" in args.models:
            shutil.copytree(args.repository / "digits" / "validation", repo / "digits" / "validation")
        server = start_model_server(repo, Path(tmp) / "logs", token="bench")
        try:
            for model in args.models:
                r = bench_model(server, repo, model, args.seconds, args.rounds)
                results.append(r)
                for mode, v in r["modes"].items():
                    print(
                        f"{model:13s} {mode:7s} closed: {v['closed_rps']:8.1f} rps p50 {v['closed_p50_ms']:7.3f} ms "
                        f"p99 {v['closed_p99_ms']:7.3f} ms | open @{r['sustainable_rate_rps']:.0f} rps: "
                        f"p50 {v['open_p50_ms']:7.3f} ms p99 {v['open_p99_ms']:7.3f} ms",
                        flush=True,
                    )
                print(
                    f"{model:13s} ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items()),
                    flush=True,
                )
        finally:
            server.stop()
    write_result(
        args.out,
        "routing",
        {
            "settings": {"seconds": args.seconds, "rounds": args.rounds, "client": "tritonclient.http"},
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
