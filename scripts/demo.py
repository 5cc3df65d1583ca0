"""``make demo``: the digits versions side by side through a real model server.

Starts the model server on loopback, loads the candidates (versions 2 and 3) beside the
baseline (1) through the admin API, replays the labelled validation images through each
version with tritonclient, and prints accuracy and latency per version next to the held-out
accuracy recorded at build time. Then version 2 takes 10% of generated traffic as a canary
with a 100% shadow: served split, live accuracy from feedback labels, and the masked shadow
log. The Airflow rollout (issue 5) grows out of this.
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
from datetime import UTC, datetime
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
    p.add_argument("--seconds", type=float, default=8.0, help="how long the canary takes traffic")
    args = p.parse_args(argv)
    samples = validation_set(args.repository)
    cfg = json.loads((args.repository / "digits" / "config.json").read_text())
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        server = start_model_server(
            args.repository,
            Path(tmp),
            "--shadow-log",
            str(Path(tmp) / "shadow"),
            "--mask-header",
            "x-user-id",
            token=token,
        )
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
            canary_with_shadow(server, args.repository, Path(tmp) / "shadow", args.seconds)
        finally:
            server.stop()
    print("\nNext (issues 4-5): statistical gates, shadow audit and the Airflow rollout.")
    return 0


def canary_with_shadow(server: Any, repository: Path, shadow_log: Path, seconds: float) -> None:
    """Version 2 as a 10% canary with a 100% shadow, under generated traffic with feedback."""
    import requests

    from model_server.loadgen import LoadConfig, run
    from model_server.shadowlog import read_shadow_log

    policy: dict[str, Any] = {"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}],
              "mirror": {"version": "2", "percent": 100}}  # fmt: skip
    requests.put(f"{server.http}/v2/models/digits/traffic", json=policy, headers=server.admin, timeout=10)
    print(f"\ntraffic policy: {json.dumps(policy)}")
    started = datetime.now(UTC)
    stats = run(LoadConfig(url=server.url, validation=repository / "digits" / "validation", rate=40,
                           duration_s=seconds, feedback_share=1.0, feedback_delay_s=0.5))  # fmt: skip
    print(f"load generator: {stats.ok} of {stats.sent} requests answered, served by {dict(stats.served)}")
    for v in ("1", "2"):
        total = server.metric("feedback_total", model="digits", version=v) or 0
        correct = server.metric("feedback_correct_total", model="digits", version=v) or 0
        shadow = server.metric("shadow_requests_total", model="digits", version=v, outcome="ok") or 0
        live = f"{correct / total:.4f}" if total else "n/a"
        print(
            f"  version {v}: live accuracy from feedback {live} ({total:g} labels), shadow copies run {shadow:g}"
        )
    time.sleep(3)  # the shadow log writer flushes every 2 s
    df = read_shadow_log(shadow_log, started, datetime.now(UTC))
    if len(df):
        agree = (df["primary_top1"] == df["shadow_top1"]).mean()
        print(
            f"shadow log: {len(df)} rows, top-1 agreement of version 1 (primary) and 2 (shadow) {agree:.4f}"
        )
        print(f"  a masked row: user {df['user_id'].iloc[0]}, meta {df['meta'].iloc[0][:110]}...")


if __name__ == "__main__":
    sys.exit(main())
