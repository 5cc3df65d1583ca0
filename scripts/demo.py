"""``make demo``: the digits versions side by side through a real model server.

Starts the model server on loopback, loads the candidates (versions 2 and 3) beside the
baseline (1) through the admin API, replays the labelled validation images through each
version with tritonclient, and prints accuracy and latency per version next to the held-out
accuracy recorded at build time. The Airflow rollout (issue 5) grows out of this.
"""

from __future__ import annotations

import argparse
import csv
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from include.rollout.local import start_model_server  # noqa: E402


def validation_set(repository: Path, model: str = "digits") -> list[tuple[bytes, int]]:
    folder = repository / model / "validation"
    with (folder / "labels.csv").open() as f:
        return [((folder / r["file"]).read_bytes(), int(r["label"])) for r in csv.DictReader(f)]


def replay(client: Any, model: str, version: str, samples: list[tuple[bytes, int]]) -> dict[str, Any]:
    """Send each image alone (as live traffic would) and score the top-1 answer."""
    import tritonclient.http as httpclient

    output = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    latencies, correct = [], 0
    for image, label in samples:
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([image], dtype=object))
        start = time.perf_counter()
        result = client.infer(model, [inp], model_version=version, outputs=output)
        latencies.append((time.perf_counter() - start) * 1000)
        correct += int(result.as_numpy("probabilities")[0].argmax() == label)
    latencies.sort()
    return {
        "version": version,
        "n": len(samples),
        "accuracy": correct / len(samples),
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    args = p.parse_args(argv)
    samples = validation_set(args.repository)
    cfg = json.loads((args.repository / "digits" / "config.json").read_text())
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        server = start_model_server(args.repository, Path(tmp), token=token)
        try:
            client = server.client()
            print(
                f"model server on http://{server.url} (KServe v2); execution provider: "
                f"{client.get_model_metadata('digits')['execution_providers']['1']}"
            )
            client.load_model(
                "digits",
                headers=server.admin,
                config=json.dumps({"version_policy": {"specific": {"versions": [1, 2, 3]}}}),
            )
            print(
                f"loaded digits versions {client.get_model_metadata('digits')['versions']}; "
                f"replaying {len(samples)} validation images through each\n"
            )
            print(
                f"{'version':8s} {'algorithm':46s} {'accuracy':>9s} {'built':>7s} {'p50 ms':>7s} {'p99 ms':>7s}"
            )
            for version in ("1", "2", "3"):
                r = replay(client, "digits", version, samples)
                meta = cfg["metadata"]["versions"][version]
                print(
                    f"{version:8s} {meta['algorithm']:46s} {r['accuracy']:9.4f} "
                    f"{meta['heldout_accuracy']:7.4f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f}"
                )
            ok = server.metric("nv_inference_request_success", model="digits", version="3")
            print(f'\n/metrics: nv_inference_request_success{{model="digits",version="3"}} {ok:g}')
        finally:
            server.stop()
    print("\nNext (issues 3-5): traffic split, shadow audit, statistical gates and the Airflow rollout.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
