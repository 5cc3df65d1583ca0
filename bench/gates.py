"""The gate under simulation: error rates over repeated looks, power and samples, and speed.

Seeded; prints tables and writes ``bench/results/gates.json``.
(a) Wrongly passing a canary exactly at the latency margin, and wrongly failing an equal
    canary, when the gate is looked at 1, 5, 10 and 20 times as samples accrue: ours
    (Lan-DeMets O'Brien-Fleming) against naive repeated tests at 0.05.
(b) Power and mean samples per arm to detect a 10% latency regression (margin 5%) and a 1 pp
    accuracy drop (margin 0.5 pp, paired validation replays), against the fixed-horizon test
    at the same alpha and power; latency also against a Flagger-style absolute threshold
    (rollback after 5 failed interval checks) and a Kayenta-style Mann-Whitney 98% interval
    with a 25% tolerance.
(c) Gate time for 10^4 to 10^6 samples per arm.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving import machine  # noqa: E402
from include.rollout.gates import (  # noqa: E402
    GateConfig,
    evaluate_gate,
    latency_check,
    nominal_alpha,
    paired_accuracy_check,
)

SIGMA = 0.3  # log-latency standard deviation of the simulated service
CFG = GateConfig(bootstrap=200)
Z_A, Z_B = stats.norm.isf(CFG.alpha), stats.norm.ppf(CFG.power)


def sequential_latency(
    rng: np.random.Generator, ratio: float, looks: int, n_max: int, level_of: Any
) -> tuple[str, int]:
    """Run one canary through the looks; returns (decision, samples per arm used)."""
    b = rng.normal(0.0, SIGMA, n_max)
    c = rng.normal(math.log(ratio), SIGMA, n_max)
    eb, ec = np.exp(b), np.exp(c)
    for k in range(1, looks + 1):
        n = round(n_max * k / looks)
        d = latency_check(eb[:n], ec[:n], CFG, level_of(k, looks)).decision
        if d != "wait":
            return d, n
    return "wait", n_max


def error_rates(sims: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for looks in (1, 5, 10, 20):
        rng = np.random.default_rng(seed + looks)
        out: dict[str, Any] = {"looks": looks}
        for name, level_of in (("ours", lambda k, K: nominal_alpha(CFG.alpha, k, K)),
                               ("naive", lambda k, K: CFG.alpha)):  # fmt: skip
            at_margin = [
                sequential_latency(rng, 1 + CFG.latency_margin, looks, 1000, level_of)[0] for _ in range(sims)
            ]
            equal = [sequential_latency(rng, 1.0, looks, 1000, level_of)[0] for _ in range(sims)]
            out[f"{name}_wrong_pass_at_margin"] = at_margin.count("pass") / sims
            out[f"{name}_wrong_fail_equal"] = equal.count("fail") / sims
        # The naive canary analysis most tools run: "fail when significantly slower than baseline".
        z = np.cumsum(rng.standard_normal((sims * 5, looks)), axis=1) / np.sqrt(np.arange(1, looks + 1))
        out["naive_vs_zero_wrong_fail_equal"] = float((z >= Z_A).any(axis=1).mean())
        out["mc_error"] = math.sqrt(CFG.alpha * (1 - CFG.alpha) / sims)
        rows.append(out)
        print(
            f"(a) K={looks:2d}: wrong pass at margin ours {out['ours_wrong_pass_at_margin']:.3f} naive "
            f"{out['naive_wrong_pass_at_margin']:.3f}; wrong fail of an equal canary ours "
            f"{out['ours_wrong_fail_equal']:.3f}, naive test vs zero {out['naive_vs_zero_wrong_fail_equal']:.3f} "
            f"(alpha {CFG.alpha}, MC error {out['mc_error']:.3f})",
            flush=True,
        )
    return rows


def flagger(rng: np.random.Generator, ratio: float, intervals: int, per_interval: int) -> tuple[bool, int]:
    """Absolute threshold on the canary's interval p99; rollback after 5 failed checks."""
    limit = math.exp(SIGMA * stats.norm.ppf(0.99)) * (1 + CFG.latency_margin)
    failed = 0
    for i in range(1, intervals + 1):
        window = np.exp(rng.normal(math.log(ratio), SIGMA, per_interval))
        failed += int(np.quantile(window, 0.99) > limit)
        if failed >= 5:
            return True, i * per_interval
    return False, intervals * per_interval


def kayenta(rng: np.random.Generator, ratio: float, n: int) -> bool:
    """Mann-Whitney 98% interval of the log shift (Hodges-Lehmann); fail beyond a 25% tolerance."""
    b = rng.normal(0.0, SIGMA, n)
    c = rng.normal(math.log(ratio), SIGMA, n)
    diffs = np.sort((c[:, None] - b[None, :]).ravel())
    k = int(n * n / 2 - stats.norm.ppf(0.99) * math.sqrt(n * n * (2 * n + 1) / 12))
    lower = diffs[max(k, 0)]
    return bool(lower > math.log(1.25))


def power_latency(sims: int, seed: int) -> dict[str, Any]:
    regression = 1.10
    effect = math.log(regression) - math.log1p(CFG.latency_margin)
    n_fixed = math.ceil(2 * SIGMA**2 * (Z_A + Z_B) ** 2 / effect**2)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"regression": regression, "fixed_horizon_n_per_arm": n_fixed}
    for looks in (5, 10):
        n_max = math.ceil(1.1 * n_fixed)
        runs = [sequential_latency(rng, regression, looks, n_max, lambda k, K: nominal_alpha(CFG.alpha, k, K))
                for _ in range(sims)]  # fmt: skip
        out[f"ours_K{looks}"] = {"n_max": n_max, "power": sum(d == "fail" for d, _ in runs) / sims,
                                 "mean_n": float(np.mean([n for _, n in runs])),
                                 "mean_n_over_fixed": float(np.mean([n for _, n in runs])) / n_fixed}  # fmt: skip
    fl = [flagger(rng, regression, 10, max(1, n_fixed // 5)) for _ in range(sims)]
    fl_equal = [flagger(rng, 1.0, 10, max(1, n_fixed // 5)) for _ in range(sims)]
    out["flagger"] = {"power": sum(f for f, _ in fl) / sims, "false_rollback_equal": sum(f for f, _ in fl_equal) / sims,
                      "mean_n": float(np.mean([n for _, n in fl]))}  # fmt: skip
    out["kayenta"] = {"power": sum(kayenta(rng, regression, n_fixed) for _ in range(min(sims, 300))) / min(sims, 300),
                      "n": n_fixed}  # fmt: skip
    print(f"(b) latency +10% (margin 5%): fixed horizon {n_fixed}/arm at power {CFG.power}; "
          + "; ".join(f"ours K={k}: power {out[f'ours_K{k}']['power']:.3f}, mean n {out[f'ours_K{k}']['mean_n']:.0f} "
                      f"({out[f'ours_K{k}']['mean_n_over_fixed']:.2f}x)" for k in (5, 10))
          + f"; Flagger-style power {out['flagger']['power']:.3f} (false rollbacks {out['flagger']['false_rollback_equal']:.3f})"
          f"; Kayenta-style power {out['kayenta']['power']:.3f}", flush=True)  # fmt: skip
    return out


def power_accuracy(sims: int, seed: int) -> dict[str, Any]:
    p10, p01 = 0.02, 0.01  # only-baseline-right and only-canary-right shares: a 1 pp drop
    drop = p10 - p01
    var = p10 + p01 - drop**2
    n_fixed = math.ceil((Z_A + Z_B) ** 2 * var / (drop - CFG.accuracy_margin) ** 2)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"drop": drop, "fixed_horizon_pairs": n_fixed}
    looks, n_max = 5, math.ceil(1.1 * n_fixed)
    decisions, used = [], []
    for _ in range(sims):
        u = rng.random(n_max)
        base = np.where(u < p10, 1, np.where(u < p10 + p01, 0, (u < 0.96).astype(int)))
        canary = np.where(u < p10, 0, np.where(u < p10 + p01, 1, base))
        d, n = "wait", n_max
        for k in range(1, looks + 1):
            n = round(n_max * k / looks)
            pairs = pd.DataFrame({"baseline": base[:n], "canary": canary[:n]})
            d = paired_accuracy_check(pairs, CFG, nominal_alpha(CFG.alpha, k, looks)).decision
            if d != "wait":
                break
        decisions.append(d)
        used.append(n)
    out["ours_K5"] = {"n_max": n_max, "power": decisions.count("fail") / sims, "mean_n": float(np.mean(used)),
                      "mean_n_over_fixed": float(np.mean(used)) / n_fixed}  # fmt: skip
    print(
        f"(b) accuracy -1 pp (margin 0.5 pp, paired): fixed horizon {n_fixed} pairs; ours K=5: power "
        f"{out['ours_K5']['power']:.3f}, mean n {out['ours_K5']['mean_n']:.0f} "
        f"({out['ours_K5']['mean_n_over_fixed']:.2f}x)",
        flush=True,
    )
    return out


def timing(seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in (10_000, 100_000, 1_000_000):
        df = pd.DataFrame({
            "arm": np.repeat(["baseline", "canary"], n),
            "latency_ms": np.exp(rng.normal(1.6, SIGMA, 2 * n)),
            "error": (rng.random(2 * n) < 0.001).astype(int),
            "correct": (rng.random(2 * n) < 0.96).astype(int),
        })  # fmt: skip
        start = time.perf_counter()
        evaluate_gate(df, GateConfig())
        seconds = time.perf_counter() - start
        rows.append({"n_per_arm": n, "seconds": seconds})
        print(f"(c) {n:>9,d} samples per arm: {seconds:.2f} s", flush=True)
    for r in rows[1:]:
        r["time_ratio_vs_10x_fewer"] = r["seconds"] / rows[rows.index(r) - 1]["seconds"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sims", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gates.json")
    args = p.parse_args(argv)
    result = {
        "benchmark": "gates", "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "settings": {"sims": args.sims, "seed": args.seed, "alpha": CFG.alpha, "sigma_log_latency": SIGMA},
        "error_rates": error_rates(args.sims, args.seed),
        "power_latency": power_latency(args.sims // 2, args.seed),
        "power_accuracy": power_accuracy(args.sims // 4, args.seed),
        "timing": timing(args.seed),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
