"""The gate under simulation: the whole decision procedure, error rates over repeated looks,
power and samples, and speed.

Seeded; prints tables and writes ``bench/results/gates.json``.
(p) The rollout procedure as the engine runs it (include/vision_rollout/engine.py), for 1, 2 and 4
    stages: per stage, prediction-log records of the live A/B arms at the stage's weight and of
    the validation replay sent at every poke, judged by ``judge_stage`` look by look (stages x
    looks, evidence accumulating, the last look waiting for min_samples); promotion when every
    stage passes. Wrong promotion of a canary exactly at the latency margin and at the accuracy
    margin; power and mean time to a decision for a 10% latency regression, a 1 pp accuracy
    drop and an equal canary. Next to it, the procedure on main before this engine: a fresh
    replay of the validation set judged at look "stage of len(stages)" again after every
    "wait" until max_stage_seconds. ``--load``: the service's utilisation (queueing waits added
    to every request of an arm under live load; at 100% the baseline takes only the replay, so
    its requests wait for nothing), judged by the engine ("engine") and by the engine that judged
    the 100% stage's latency on that replay comparison after earlier stages too ("engine_before"),
    or that rolled back a stage below the last whose latency alone was undecided at its last
    look instead of carrying it to the next stage ("engine_uncarried").
(a) Wrongly passing a canary exactly at the latency margin, and wrongly failing an equal
    canary, when the gate is looked at 1, 5, 10 and 20 times as samples accrue: ours
    (Lan-DeMets O'Brien-Fleming) against naive repeated tests at 0.05.
(b) Power and mean samples per arm to detect a 10% latency regression (margin 5%) and a 1 pp
    accuracy drop (margin 0.5 pp, paired validation replays), against the fixed-horizon test
    at the same alpha and power; latency also against a Flagger-style absolute threshold
    (rollback after 5 failed interval checks) and a Kayenta-style Mann-Whitney 98% interval
    with a 25% tolerance.
(c) Gate time for 10^4 to 10^6 samples per arm.
(l) Live feedback labels from batch requests of 8 images whose items share a request-level
    effect (intra-request correlation 0, 0.3 and 1: one client's images of one kind, the same
    image 8 times): wrong rollbacks of an equal canary by the live accuracy check over 10 looks
    (``live_accuracy_check``, the items of a request one unit), next to the same labels counted
    as independent; and its power for a 3 pp drop.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from vision_rollout.engine import StageWindow, judge_stage  # noqa: E402
from vision_rollout.gates import (  # noqa: E402
    GateConfig,
    GuardInputs,
    evaluate_gate,
    latency_check,
    live_accuracy_check,
    nominal_alpha,
    paired_accuracy_check,
)
from vision_rollout.spec import RolloutSpec  # noqa: E402

SIGMA = 0.3  # log-latency standard deviation of the simulated service
CFG = GateConfig()
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
        for name, level_of in (
            ("ours", lambda k, K: nominal_alpha(CFG.alpha, k, K)),
            ("naive", lambda k, K: CFG.alpha),
        ):
            at_margin = [sequential_latency(rng, 1 + CFG.latency_margin, looks, 1000, level_of)[0] for _ in range(sims)]
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
        runs = [
            sequential_latency(rng, regression, looks, n_max, lambda k, K: nominal_alpha(CFG.alpha, k, K))
            for _ in range(sims)
        ]
        out[f"ours_K{looks}"] = {
            "n_max": n_max,
            "power": sum(d == "fail" for d, _ in runs) / sims,
            "mean_n": float(np.mean([n for _, n in runs])),
            "mean_n_over_fixed": float(np.mean([n for _, n in runs])) / n_fixed,
        }
    fl = [flagger(rng, regression, 10, max(1, n_fixed // 5)) for _ in range(sims)]
    fl_equal = [flagger(rng, 1.0, 10, max(1, n_fixed // 5)) for _ in range(sims)]
    out["flagger"] = {
        "power": sum(f for f, _ in fl) / sims,
        "false_rollback_equal": sum(f for f, _ in fl_equal) / sims,
        "mean_n": float(np.mean([n for _, n in fl])),
    }
    out["kayenta"] = {
        "power": sum(kayenta(rng, regression, n_fixed) for _ in range(min(sims, 300))) / min(sims, 300),
        "n": n_fixed,
    }
    print(
        f"(b) latency +10% (margin 5%): fixed horizon {n_fixed}/arm at power {CFG.power}; "
        + "; ".join(
            f"ours K={k}: power {out[f'ours_K{k}']['power']:.3f}, mean n {out[f'ours_K{k}']['mean_n']:.0f} "
            f"({out[f'ours_K{k}']['mean_n_over_fixed']:.2f}x)"
            for k in (5, 10)
        )
        + f"; Flagger-style power {out['flagger']['power']:.3f} (false rollbacks {out['flagger']['false_rollback_equal']:.3f})"
        f"; Kayenta-style power {out['kayenta']['power']:.3f}",
        flush=True,
    )
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
    out["ours_K5"] = {
        "n_max": n_max,
        "power": decisions.count("fail") / sims,
        "mean_n": float(np.mean(used)),
        "mean_n_over_fixed": float(np.mean(used)) / n_fixed,
    }
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
        df = pd.DataFrame(
            {
                "arm": np.repeat(["baseline", "canary"], n),
                "latency_ms": np.exp(rng.normal(1.6, SIGMA, 2 * n)),
                "error": (rng.random(2 * n) < 0.001).astype(int),
                "correct": (rng.random(2 * n) < 0.96).astype(int),
            }
        )
        start = time.perf_counter()
        evaluate_gate(df, GateConfig())
        seconds = time.perf_counter() - start
        rows.append({"n_per_arm": n, "seconds": seconds})
        print(f"(c) {n:>9,d} samples per arm: {seconds:.2f} s", flush=True)
    for r in rows[1:]:
        r["time_ratio_vs_10x_fewer"] = r["seconds"] / rows[rows.index(r) - 1]["seconds"]
    return rows


def batch_labels(rng: np.random.Generator, requests: int, batch: int, rho: float, accuracy: float) -> np.ndarray:
    """Correctness of ``requests`` x ``batch`` labelled items whose requests share an effect: each
    request's accuracy drawn from a beta of mean ``accuracy`` and intra-request correlation
    ``rho`` (1: a request's items all right or all wrong)."""
    if rho >= 1:
        p = (rng.random(requests) < accuracy).astype(float)
    elif rho <= 0:
        p = np.full(requests, accuracy)
    else:
        s = (1 - rho) / rho
        p = rng.beta(accuracy * s, (1 - accuracy) * s, requests)
    return (rng.random((requests, batch)) < p[:, None]).astype(float).ravel()


def live_labels(sims: int, seed: int, looks: int = 10, batch: int = 8) -> list[dict[str, Any]]:
    rows = []
    for rho, requests, drop in [(r, n, 0.0) for r in (0.0, 0.3, 1.0) for n in (50, 200)] + [(0.3, 200, 0.03)]:
        rng = np.random.default_rng(seed)
        failed = {"clustered": 0, "independent": 0}
        for _ in range(sims):
            yb = batch_labels(rng, requests, batch, rho, BASE_ACCURACY)
            yc = batch_labels(rng, requests, batch, rho, BASE_ACCURACY - drop)
            request = np.repeat(np.arange(requests), batch)
            for how in failed:
                for k in range(1, looks + 1):
                    n = requests * k // looks * batch
                    df = pd.DataFrame(
                        {
                            "arm": np.repeat(["baseline", "canary"], n),
                            "correct": np.r_[yb[:n], yc[:n]],
                            "cluster": np.r_[request[:n], request[:n] + requests] if how == "clustered" else np.nan,
                        }
                    )
                    if live_accuracy_check(df, CFG, nominal_alpha(CFG.alpha, k, looks)).decision == "fail":
                        failed[how] += 1
                        break
        row = {"rho": rho, "requests_per_arm": requests, "batch": batch, "drop": drop, "sims": sims}
        row |= {f"{how}_failed": n / sims for how, n in failed.items()}
        rows.append(row)
        print(
            f"(l) batch {batch}, correlation {rho}, {requests} requests per arm, canary {100 * drop:g} pp worse: "
            f"failed {row['clustered_failed']:.3f} (items counted as independent: {row['independent_failed']:.3f})",
            flush=True,
        )
    return rows


# -- (p) the whole procedure ------------------------------------------------------------------

STAGES = {1: [100], 2: [50, 100], 4: [5, 25, 50, 100]}
IMAGES = 450  # the digits validation set
RATE = 10.0  # live requests per second into the model (both arms)
LOAD = 0.0  # utilisation of the pods under live load (M/M/1 waits added to their requests)
BASE_ACCURACY = 0.96
# canary latency ratio, and the shares of images only the baseline / only the canary gets right
SCENARIOS = {
    "at_latency_margin": (1.05, 0.0, 0.0),
    "at_accuracy_margin": (1.0, 0.01, 0.005),
    "at_accuracy_margin_losses_only": (1.0, 0.005, 0.0),  # loses images, gains none (quantized)
    "latency_plus_10pct": (1.10, 0.0, 0.0),
    "accuracy_minus_1pp": (1.0, 0.015, 0.005),
    "equal": (1.0, 0.0, 0.0),
}


def stage_records(
    rng: np.random.Generator, spec: RolloutSpec, weight: int, ratio: float, correct: np.ndarray
) -> pd.DataFrame:
    """Prediction-log records of one stage starting at t=0: live arms at ``weight`` over the
    bake (and the wait for min_samples), and the replay sent at every poke (look interval)."""
    horizon = (
        spec.max_stage_seconds
        if RATE * min(weight, 100 - weight or 100) / 100 * spec.bake_seconds < spec.min_samples
        else spec.bake_seconds * 1.02
    )
    n = rng.poisson(RATE * horizon)
    canary = rng.random(n) < weight / 100
    live_t = rng.uniform(0, horizon, n)
    pokes = np.arange(0.5, horizon, spec.bake_seconds / spec.looks_per_stage)
    r_t = np.repeat(pokes, 2 * IMAGES) + np.tile(np.arange(2 * IMAGES) * 1e-3, len(pokes))
    r_canary = np.tile(np.repeat([False, True], IMAGES), len(pokes))
    r_image = np.tile(np.tile(np.arange(IMAGES), 2), len(pokes))
    is_c = np.concatenate([canary, r_canary])
    m = len(is_c)
    lat = np.exp(rng.normal(math.log(5.0), SIGMA, m) + np.where(is_c, math.log(ratio), 0.0))
    if LOAD > 0:
        # Pods sized for their share of the live traffic all run at LOAD below 100%; at 100% the
        # baseline's pods take only the replay. A request of a loaded pod waits behind others
        # (M/M/1: with probability LOAD, an exponential wait of mean 5 ms / (1 - LOAD)), and a
        # slower candidate's whole latency is ``ratio`` times: at equal load its geometric mean is.
        loaded = is_c | (weight < 100)
        wait = np.where(rng.random(m) < LOAD, rng.exponential(5.0 / (1 - LOAD), m), 0.0)
        lat = lat + np.where(loaded, wait * np.where(is_c, ratio, 1.0), 0.0)
    top1 = np.concatenate([np.zeros(n, dtype=int), np.where(correct[r_canary.astype(int), r_image], 0, 1)])
    return pd.DataFrame(
        {
            "time": np.concatenate([live_t, r_t]),
            "model": "digits",
            "version": np.where(is_c, "2", "1"),
            "role": "primary",
            "route": np.concatenate([np.full(n, "route"), np.full(len(r_t), "version")]),
            "request_id": "",
            "item": 0,
            "latency_ms": lat,
            "outcome": "ok",
            "top1": top1,
            "image_sha256": np.concatenate([np.full(n, "live"), r_image.astype(str)]),
            "label": np.nan,
        }
    )


def correctness(rng: np.random.Generator, only_base: float, only_canary: float) -> np.ndarray:
    """[2, IMAGES] top-1 correctness of baseline and canary on the validation images."""
    u = rng.random(IMAGES)
    base = u < BASE_ACCURACY
    canary = base.copy()
    flip_down = base & (rng.random(IMAGES) < only_base / BASE_ACCURACY)
    flip_up = ~base & (rng.random(IMAGES) < only_canary / (1 - BASE_ACCURACY))
    canary[flip_down], canary[flip_up] = False, True
    return np.stack([base, canary])


@dataclass(frozen=True)
class JudgedAt100(StageWindow):
    """The engine before: the 100% stage's replay latency comparison decided after earlier stages too."""

    @property
    def latency_unjudged(self) -> str | None:
        return None


@dataclass(frozen=True)
class Uncarried(StageWindow):
    """The engine before: a stage left undecided by its latency comparison alone rolled back."""

    def latency_carried_to(self, spec: RolloutSpec) -> int | None:
        return None


WINDOWS = {"engine": StageWindow, "engine_before": JudgedAt100, "engine_uncarried": Uncarried}


def engine_rollout(
    rng: np.random.Generator, spec: RolloutSpec, scenario: str, which: str = "engine"
) -> tuple[bool, float]:
    """One rollout as the engine judges it: (promoted, seconds to the decision). ``which``: the
    engine's windows (``WINDOWS``), or one of the engine before a change."""
    ratio, only_base, only_canary = SCENARIOS[scenario]
    correct = correctness(rng, only_base, only_canary)
    labels = {str(i): 0 for i in range(IMAGES)}
    cfg = GateConfig.from_spec(spec)
    elapsed = 0.0
    for index, weight in enumerate(spec.stages):
        window = WINDOWS[which](index, weight, 0.0)
        records = stage_records(rng, spec, weight, ratio, correct)
        state = judge_stage(spec, window, records, labels, spec.max_stage_seconds + 10, config=cfg)
        if state.status == "pass":
            elapsed += spec.bake_seconds
            continue
        look_t = window.look_time(spec, max(state.look, 1)) if state.status == "fail" else spec.bake_seconds
        return False, elapsed + look_t
    return True, elapsed


LOOSE = {"error_margin": 0.05, "accuracy_margin": 0.02}  # what make demo loosened on main (latency kept)


def main_rollout(rng: np.random.Generator, spec: RolloutSpec, scenario: str, loose: bool = False) -> tuple[bool, float]:
    """The procedure before this engine: every judgement a fresh replay of the validation set
    (latency fresh, correctness the same images), judged at look (stage of len(stages)); a
    "wait" judged again every bake/looks seconds until max_stage_seconds. ``loose``: with the
    error and accuracy margins make demo used on main, so the latency check decides."""
    ratio, only_base, only_canary = SCENARIOS[scenario]
    correct = correctness(rng, only_base, only_canary)
    cfg = GateConfig.from_spec(spec, **(LOOSE if loose else {}))
    interval = spec.bake_seconds / spec.looks_per_stage
    tries = 1 + int((spec.max_stage_seconds - spec.bake_seconds) // interval)
    elapsed = 0.0
    for index, _ in enumerate(spec.stages):
        decision = "wait"
        for attempt in range(tries):  # noqa: B007 (read after the loop: the judgements it took)
            lat = np.exp(rng.normal(math.log(5.0), SIGMA, 2 * IMAGES) + np.repeat([0.0, math.log(ratio)], IMAGES))
            df = pd.DataFrame(
                {
                    "arm": np.repeat(["baseline", "canary"], IMAGES),
                    "latency_ms": lat,
                    "error": 0,
                    "correct": np.concatenate([correct[0], correct[1]]).astype(float),
                    "pair_id": np.tile(np.arange(IMAGES), 2),
                }
            )
            drop = float(correct[0].mean() - correct[1].mean())
            decision = evaluate_gate(df, cfg, index + 1, len(spec.stages), GuardInputs(validation_drop=drop)).decision
            if decision != "wait":
                break
        elapsed += spec.bake_seconds + attempt * interval
        if decision != "pass":
            return False, elapsed
    return True, elapsed


def procedure(
    sims: int,
    seed: int,
    workers: int,
    procedures: tuple[str, ...] = ("engine", "main", "main_loose"),
    stage_sets: tuple[int, ...] = tuple(STAGES),
    scenarios: tuple[str, ...] = tuple(SCENARIOS),
) -> list[dict[str, Any]]:
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (n_stages, scenario, which, sims, seed + 1000 * n_stages + 17 * i)
        for n_stages in stage_sets
        for i, scenario in enumerate(SCENARIOS)
        if scenario in scenarios
        for which in procedures
    ]
    with ProcessPoolExecutor(workers) as pool:
        cells = list(pool.map(_cell, jobs))
    rows = []
    for n_stages in stage_sets:
        for scenario in scenarios:
            row: dict[str, Any] = {"stages": STAGES[n_stages], "scenario": scenario, "load": LOAD}
            for c in cells:
                if c["n_stages"] == n_stages and c["scenario"] == scenario:
                    row[c["which"]] = {k: c[k] for k in ("promoted", "rolled_back", "mean_seconds", "sims")}
            rows.append(row)
            print(
                f"(p) {n_stages} stage(s) {scenario:30s}: promoted "
                + ", ".join(f"{w} {row[w]['promoted']:.3f} ({row[w]['mean_seconds']:.0f} s)" for w in procedures),
                flush=True,
            )
    return rows


def _cell(job: tuple[int, str, str, int, int]) -> dict[str, Any]:
    n_stages, scenario, which, sims, seed = job
    rng = np.random.default_rng(seed)
    stages = STAGES[n_stages]
    spec = RolloutSpec.from_dict({"stages": stages, **({"mirror_percent": 0} if stages == [100] else {})})
    if which in WINDOWS:
        results = [engine_rollout(rng, spec, scenario, which) for _ in range(sims)]
    else:
        results = [main_rollout(rng, spec, scenario, loose=which == "main_loose") for _ in range(sims)]
    promoted = sum(p for p, _ in results) / sims
    return {
        "n_stages": n_stages,
        "scenario": scenario,
        "which": which,
        "sims": sims,
        "promoted": promoted,
        "rolled_back": 1 - promoted,
        "mean_seconds": float(np.mean([t for _, t in results])),
    }


SECTIONS = ("procedure", "error_rates", "power_latency", "power_accuracy", "timing", "live_labels")


def main(argv: list[str] | None = None) -> int:
    global IMAGES, LOAD
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sims", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procedure-sims", type=int, default=400)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=450, help="validation images the procedure replays")
    p.add_argument("--load", type=float, default=0.0, help="utilisation of the pods under live load, 0 to 0.95")
    p.add_argument("--stage-sets", nargs="+", type=int, choices=tuple(STAGES), default=list(STAGES))
    p.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS))
    p.add_argument(
        "--procedures",
        nargs="+",
        choices=(*WINDOWS, "main", "main_loose"),
        default=["engine", "main", "main_loose"],
        help="the procedures simulated: the engine's, and main's before it",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="run these; the others are kept from --out, with the date they ran",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gates.json")
    args = p.parse_args(argv)
    IMAGES, LOAD = args.images, args.load  # (the procedure's workers are forked: they see them)
    runs = {
        "procedure": lambda: procedure(
            args.procedure_sims,
            args.seed,
            args.workers,
            tuple(args.procedures),
            tuple(args.stage_sets),
            tuple(args.scenarios),
        ),
        "error_rates": lambda: error_rates(args.sims, args.seed),
        "power_latency": lambda: power_latency(args.sims // 2, args.seed),
        "power_accuracy": lambda: power_accuracy(args.sims // 4, args.seed),
        "timing": lambda: timing(args.seed),
        "live_labels": lambda: live_labels(args.sims // 4, args.seed),
    }
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    today = time.strftime("%Y-%m-%d")
    result.setdefault("dates", {})
    result["settings"] = {
        "sims": args.sims,
        "procedure_sims": args.procedure_sims,
        "seed": args.seed,
        "alpha": CFG.alpha,
        "sigma_log_latency": SIGMA,
        "live_rate": RATE,
        "validation_images": IMAGES,
        "load": LOAD,
        "procedure_spec": "RolloutSpec defaults (bake 600 s, "
        "max stage 3600 s, 10 looks a stage, min 200 samples), stages as named",
    }
    for name in args.sections:
        result[name] = runs[name]()
        result["dates"][name] = today
    write_result(args.out, "gates", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
