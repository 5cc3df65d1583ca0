"""``make tour``: the serving and gate layers without Airflow, the digits versions side by side.

Starts the model server on loopback, loads the candidates (versions 2 and 3) beside the
baseline (1) through the admin API, replays the labelled validation images through each
version with tritonclient, and prints accuracy and latency per version next to the held-out
accuracy recorded at build time, and the statistical gate's verdict on versions 2 and 3.
Then version 2 takes 10% of generated traffic as a canary with a 100% shadow: served split,
live accuracy from feedback labels, and the shadow audit of the masked shadow log. ``make demo``
runs the same versions through the Airflow rollout.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devstack.processes import start_model_server  # noqa: E402
from vision_rollout.engine import replay_drop  # noqa: E402
from vision_rollout.gates import GuardInputs, evaluate_gate  # noqa: E402
from vision_rollout.replay import replay  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--seconds", type=float, default=8.0, help="how long the canary takes traffic")
    args = p.parse_args(argv)
    cfg = json.loads((args.repository / "digits" / "config.json").read_text())
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="demo-") as tmp:
        server = start_model_server(
            args.repository,
            Path(tmp),
            "--prediction-log",
            str(Path(tmp) / "predictions"),
            "--prediction-log-flush-s",
            "0.5",
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
            server.load_versions("digits", 1, 2, 3)
            validation = args.repository / "digits" / "validation"
            print(
                f"loaded digits versions {client.get_model_metadata('digits')['versions']}; replaying the "
                "validation images through each, over the serving path\n"
            )
            df = replay(server.url, "digits", {v: v for v in ("1", "2", "3")}, validation)
            print(f"{'version':8s} {'algorithm':46s} {'accuracy':>9s} {'built':>7s} {'p50 ms':>7s} {'p99 ms':>7s}")
            for version, g in df.groupby("arm"):
                meta = cfg["metadata"]["versions"][version]
                print(
                    f"{version:8s} {meta['algorithm']:46s} {g['correct'].mean():9.4f} {meta['heldout_accuracy']:7.4f} "
                    f"{g['latency_ms'].median():7.2f} {g['latency_ms'].quantile(0.99):7.2f}"
                )
            print("\nthe gate on each candidate against version 1 (paired replay):")
            for candidate in ("2", "3"):
                pairs = df[df["arm"].isin(["1", candidate])].replace({"arm": {"1": "baseline", candidate: "canary"}})
                verdict = evaluate_gate(
                    pairs, {"min_samples": 100}, guards=GuardInputs(validation_drop=replay_drop(pairs))
                )
                print(f"  version {candidate}: {verdict.decision.upper()}")
                for c in verdict.checks:
                    if c.decision != "info":
                        print(f"    [{c.decision}] {c.name}: {c.sentence}")
            ok = server.metric("nv_inference_request_success", model="digits", version="3")
            print(f'\n/metrics: nv_inference_request_success{{model="digits",version="3"}} {ok:g}')
            canary_with_shadow(server, args.repository, Path(tmp) / "predictions", args.seconds)
        finally:
            server.stop()
    print("\nThe Airflow rollout drives these steps from the UI: make demo")
    return 0


def canary_with_shadow(server: Any, repository: Path, prediction_log: Path, seconds: float) -> None:
    """Version 2 as a 10% canary with a 100% shadow, under generated traffic with feedback."""

    from devstack.loadgen import LoadConfig, run
    from model_server.predictionlog import SHADOW_PAIR_COLUMNS, read, shadow_pairs
    from model_server.traffic import TrafficPolicy
    from vision_rollout.audit import audit_frame

    policy: dict[str, Any] = {
        "route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}],
        "mirror": {"version": "2", "percent": 100},
    }
    server.api.set_traffic("digits", TrafficPolicy.from_dict(policy))
    print(f"\ntraffic policy: {json.dumps(policy)}")
    started = datetime.now(UTC)
    stats = run(
        LoadConfig(
            url=server.url,
            validation=repository / "digits" / "validation",
            rate=40,
            duration_s=seconds,
            feedback_share=1.0,
            feedback_delay_s=0.5,
        )
    )
    print(f"load generator: {stats.ok} of {stats.sent} requests answered, served by {dict(stats.served)}")
    time.sleep(1.5)  # the log's writer flushes every 0.5 s: the live view counts a label once written
    for v in ("1", "2"):
        total = server.metric("feedback_total", model="digits", version=v) or 0
        correct = server.metric("feedback_correct_total", model="digits", version=v) or 0
        shadow = server.metric("shadow_requests_total", model="digits", version=v, outcome="ok") or 0
        live = f"{correct / total:.4f}" if total else "n/a"
        print(f"  version {v}: live accuracy from feedback {live} ({total:g} labels), shadow copies run {shadow:g}")
    records = read(
        prediction_log, started, datetime.now(UTC), "digits", columns=SHADOW_PAIR_COLUMNS, roles=("primary", "shadow")
    )
    df = shadow_pairs(records)
    if len(df):
        result = audit_frame(df, model="digits")
        print(f"shadow audit of {len(df)} mirrored requests: {result.verdict.upper()}: " + "; ".join(result.reasons))
        print(f"  a masked row: user {df['user_id'].iloc[0]}, meta {df['meta'].iloc[0][:110]}...")


if __name__ == "__main__":
    sys.exit(main())
