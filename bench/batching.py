"""The dynamic batcher's gain: many clients sending batch 1, with and without the batcher, against
one client sending whole batches.

One real ``python -m model_server`` on loopback serves the same ONNX file as two models: the
plain one and one whose config adds ``dynamic_batching`` (preferred size = the batch, a short
queue delay). Three arms, interleaved in rounds so that drift on a shared machine hits each:

- ``one_client_batch``: one client sending batch ``--batch`` (what batching on the client gives);
- ``clients_batch1_batcher``: ``--clients`` clients sending batch 1 to the batched model;
- ``clients_batch1_alone``: the same clients to the plain model (one execution per request).

Prints images/s per arm and the ratios, and writes ``bench/results/batching[-<device>].json``.
Goals: batcher / one client >= 0.95 on a CPU; batcher / alone >= 3 on a GPU.

    python bench/batching.py [--device cpu|cuda] [--model resnet_bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tritonclient.http as httpclient  # noqa: E402

from bench import write_result  # noqa: E402
from bench.serving import run_for  # noqa: E402
from devstack.processes import ModelServerProcess, start_model_server  # noqa: E402


def batched_copy(repository: Path, model: str, batch: int, delay_us: int, into: Path) -> None:
    """``model`` twice in ``into``: as it is, and as ``<model>_batched`` with the dynamic batcher."""
    shutil.copytree(repository / model, into / model)
    config = json.loads((repository / model / "config.json").read_text())
    config["name"] = f"{model}_batched"
    config["dynamic_batching"] = {"preferred_batch_size": [batch], "max_queue_delay_microseconds": delay_us}
    shutil.copytree(repository / model, into / f"{model}_batched")
    (into / f"{model}_batched" / "config.json").write_text(json.dumps(config, indent=2))


def sender(server: ModelServerProcess, model: str, x: np.ndarray, output: str):
    def call(state: dict) -> None:
        if "client" not in state:
            state["client"] = server.client()
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            state["inputs"] = [inp]
            state["outputs"] = [httpclient.InferRequestedOutput(output, binary_data=True)]
        state["client"].infer(model, state["inputs"], outputs=state["outputs"])

    return call


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="resnet_bench")
    p.add_argument("--output", default="logits")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--delay-us", type=int, default=2000, help="the batcher's max_queue_delay_microseconds")
    p.add_argument("--seconds", type=float, default=5.0, help="per measurement window")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians taken)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / ("batching.json" if args.device == "cpu" else "batching-gpu.json")

    rng = np.random.default_rng(0)
    shape = json.loads((args.repository / args.model / "config.json").read_text())["input"][0]["dims"][1:]
    single = rng.standard_normal((1, *shape)).astype(np.float32)
    whole = rng.standard_normal((args.batch, *shape)).astype(np.float32)
    batched = f"{args.model}_batched"
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        repo.mkdir()
        batched_copy(args.repository, args.model, args.batch, args.delay_us, repo)
        server = start_model_server(
            repo,
            ROOT / "bench" / ".logs",
            "--device",
            args.device,
            "--load-model",
            args.model,
            "--load-model",
            batched,
        )
        try:
            provider = server.client().get_model_metadata(args.model)["execution_providers"]["1"]
            arms = {
                "one_client_batch": (1, sender(server, args.model, whole, args.output), args.batch),
                "clients_batch1_batcher": (args.clients, sender(server, batched, single, args.output), 1),
                "clients_batch1_alone": (args.clients, sender(server, args.model, single, args.output), 1),
            }
            runs: dict[str, list[dict]] = {arm: [] for arm in arms}
            for r in range(args.rounds):
                for arm, (clients, call, items) in arms.items():
                    result = run_for(args.seconds, clients, call)
                    result["images_per_s"] = result["requests_per_s"] * items
                    runs[arm].append(result)
                    print(f"round {r + 1} {arm:24s} {result['images_per_s']:9.1f} img/s", flush=True)
            executions = server.metric("nv_inference_exec_count", model=batched, version="1") or 0
            successes = server.metric("nv_inference_request_success", model=batched, version="1") or 1
        finally:
            server.stop()

    def med(arm: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[arm])

    rows = {
        arm: {k: med(arm, k) for k in ("images_per_s", "p50_ms", "p99_ms")} | {"clients": arms[arm][0]} for arm in arms
    }
    ratios = {
        "batcher_over_one_client_batch": rows["clients_batch1_batcher"]["images_per_s"]
        / rows["one_client_batch"]["images_per_s"],
        "batcher_over_alone": rows["clients_batch1_batcher"]["images_per_s"]
        / rows["clients_batch1_alone"]["images_per_s"],
        "mean_batch_formed": successes / executions if executions else None,
    }
    print(f"\nprovider {provider}, {args.model}, {args.clients} clients, batch {args.batch}")
    print("| arm | clients | images/s | p50 ms | p99 ms |\n| --- | --- | --- | --- | --- |")
    for arm, row in rows.items():
        print(f"| {arm} | {row['clients']} | {row['images_per_s']:.1f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
    print(json.dumps(ratios, indent=2))
    write_result(
        out,
        "batching",
        {
            "settings": {
                "model": args.model,
                "device": args.device,
                "provider": provider,
                "batch": args.batch,
                "clients": args.clients,
                "max_queue_delay_microseconds": args.delay_us,
                "seconds": args.seconds,
                "rounds": args.rounds,
                "client": "tritonclient.http, binary data",
            },
            "arms": rows,
            "ratios": ratios,
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
