"""On a GPU: ``InferenceSession.run`` with host arrays against IO binding (the input copied to the
device by ONNX Runtime, the output bound on the device and copied back once), in one process,
interleaved, medians. Says whether binding outputs on the device pays for a server whose answers
must reach the host anyway.

    python bench/iobinding.py [--repository models] [--model resnet_bench]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from bench import write_result  # noqa: E402


def timed(fn, seconds: float) -> list[float]:
    fn()
    out, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--model", default="resnet_bench")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "iobinding-gpu.json")
    args = p.parse_args(argv)
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(args.repository / args.model / "1" / "model.onnx"),
        options,
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    provider = session.get_providers()[0]
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
    rows = []
    for batch in (1, 8):
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)

        def plain(x=x):
            return session.run([output], {name: x})[0]

        def bound(x=x):
            binding = session.io_binding()
            binding.bind_cpu_input(name, x)
            binding.bind_output(output, "cuda")
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

        assert np.allclose(plain(), bound(), rtol=1e-4, atol=1e-4)
        runs: dict[str, list[float]] = {"run": [], "iobinding": []}
        for _ in range(args.rounds):
            runs["run"].append(statistics.median(timed(plain, args.seconds)))
            runs["iobinding"].append(statistics.median(timed(bound, args.seconds)))
        row = {"batch": batch} | {k: 1000 * statistics.median(v) for k, v in runs.items()}
        row["run_over_iobinding"] = row["run"] / row["iobinding"]
        rows.append(row)
        print(f"batch {batch}: run {row['run']:.3f} ms, iobinding {row['iobinding']:.3f} ms", flush=True)
    write_result(args.out, "iobinding", {"provider": provider, "model": args.model, "p50_ms": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
