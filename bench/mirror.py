"""Does the mirror bias the gate's live latency comparison? An A/A test, in one run.

One real model server with its prediction log; versions 1 and 2 are the same ONNX file (digits
version 1), split 50/50 by the router, under the load generator's traffic. Interleaved rounds
alternate "no mirror" and "mirror" (every request of both arms also mirrored to version 2, as
the rollout's default ``mirror_percent`` 100 does). For each mode the engine's own functions
(``stage_samples`` on the log, ``evaluate_gate``'s latency check) give the canary/baseline
ratio of geometric-mean latency with its interval: an unbiased A/A reads 1.0, and the default
5% latency margin needs the bias well under 5%.

    python bench/mirror.py [--rounds 4] [--seconds 30] [--rate 50] [--out bench/results/mirror.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from devstack.loadgen import LoadConfig, run  # noqa: E402
from devstack.processes import start_model_server  # noqa: E402
from model_server import predictionlog  # noqa: E402
from model_server.traffic import TrafficPolicy  # noqa: E402
from vision_rollout.engine import StageWindow, stage_samples  # noqa: E402
from vision_rollout.gates import GateConfig, evaluate_gate  # noqa: E402
from vision_rollout.mesh import make_router  # noqa: E402
from vision_rollout.spec import RolloutSpec  # noqa: E402

TOKEN = "bench-mirror"
MODES = ("no mirror", "mirror")
SETTLE_S = 2.0  # a round's first seconds are left out: the policy change settles


def policy(mode: str) -> TrafficPolicy:
    raw: dict[str, Any] = {"route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]}
    if mode == "mirror":
        raw["mirror"] = {"version": "2", "percent": 100}
    return TrafficPolicy.from_dict(raw)


def latency(samples: pd.DataFrame, spec: RolloutSpec) -> dict[str, Any]:
    verdict = evaluate_gate(samples, GateConfig.from_spec(spec), look=1, looks=1, latency_from="live")
    check = next(c for c in verdict.checks if c.name == "latency_geomean")
    lo, hi = check.ci or (float("nan"), float("nan"))
    return {
        "n_baseline": check.n_baseline,
        "n_canary": check.n_canary,
        "ratio": round(1 + (check.effect or 0.0), 4),
        "ci": [round(1 + lo, 4), round(1 + hi, 4)],
        "sentence": check.sentence,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0, help="traffic per mode per round")
    p.add_argument("--rate", type=float, default=50.0, help="requests per second (make up's load)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mirror.json")
    args = p.parse_args(argv)

    spec = RolloutSpec.from_dict({"candidate_version": "2", "stages": [50, 100]})
    with tempfile.TemporaryDirectory(prefix="bench-mirror-") as tmp:
        work = Path(tmp)
        repo = work / "models"
        shutil.copytree(ROOT / "models" / "digits", repo / "digits")
        shutil.copy(repo / "digits" / "1" / "model.onnx", repo / "digits" / "2" / "model.onnx")
        log_uri = str(work / "predictions")
        server = start_model_server(
            repo, work / "logs", "--prediction-log", log_uri, "--prediction-log-flush-s", "0.5", token=TOKEN
        )
        windows: list[tuple[str, StageWindow, float]] = []
        try:
            server.load_versions("digits", 1, 2)
            router = make_router(
                "local", url=server.http, model="digits", token=TOKEN, state_file=work / "original.json"
            )
            load = LoadConfig(
                url=server.url,
                validation=repo / "digits" / "validation",
                rate=args.rate,
                duration_s=args.seconds,
                feedback_share=0.0,
            )
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:
                    router.set_routes(policy(mode))
                    started = time.time()
                    run(load)
                    windows.append((mode, StageWindow(0, 50, started + SETTLE_S), time.time()))
                    print(f"round {r + 1}: {mode} done", flush=True)
        finally:
            server.stop()
        first = datetime.fromtimestamp(windows[0][1].started - 60, UTC)
        records = predictionlog.read(log_uri, first, datetime.now(UTC), model="digits")

    results: dict[str, Any] = {}
    for mode in MODES:
        parts = [stage_samples(records, spec, w, until, {}) for m, w, until in windows if m == mode]
        results[mode] = latency(pd.concat(parts, ignore_index=True), spec)
        print(
            f"{mode:>10}: canary/baseline geometric-mean latency {results[mode]['ratio']:.4f} "
            f"(interval {results[mode]['ci'][0]:.4f} to {results[mode]['ci'][1]:.4f}), "
            f"n = {results[mode]['n_baseline']} / {results[mode]['n_canary']}"
        )
    write_result(
        args.out, "mirror", {"rounds": args.rounds, "seconds": args.seconds, "rate": args.rate, "results": results}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
