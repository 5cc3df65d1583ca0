"""The live feedback-label accuracy check (``live_accuracy_check``) as the rollout procedure runs
it, with labels sent by several tenants, some of them hostile.

Seeded; prints a table and writes ``bench/results/live-tenants.json``.

Each rollout is judged as the engine judges it (include/vision_rollout/engine.py, as
``engine_rollout`` of bench/gates.py section (p)): per stage, the prediction-log records of the
stage are given to ``judge_stage``, which judges its looks in order on the records before each
look's time (evidence accumulating, the last look waiting for ``min_samples``), and stops at the
first that decides; promotion when every stage passes. Default ``RolloutSpec`` (bake 600 s, 10
looks a stage, min 200 samples per arm, max stage 3600 s), stages [50, 100].

The records of a stage:
- live requests at ``--rate`` requests per second into the model, each of ``--batch`` images (8:
  one request id, items 0..7), routed by the policy (route "route") to the canary at the stage's
  weight, sent by tenants "t0", "t1", ... in their shares. The canary is as fast as the baseline
  (the same log-normal latency, log-sd ``SIGMA``), so the latency checks pass on live arms of
  about 3,000 requests each at 50%. Arrivals come at a steady pace and the arms, the labelled
  requests and each label's delay alternate by a fixed rule (not drawn): every rollout's looks
  see the same counts, so their group-sequential levels are reckoned once and taken from the
  stage record's cache (``judge_stage(..., reckoned=)``) as the DAG's pokes take them; what is
  drawn is each request's tenant, latency and answers, and whether its items are right.
- feedback labels: a ``--labelled`` share of each arm's requests (0.15: about 450 requests, 3,600
  images, per arm at 50%) is labelled, a label record (role "label": model, request id, item,
  tenant, label) per item 1 to 5 s after the answer. An honest tenant's label is the truth: the
  items of one request right or wrong together to an extent (each request's accuracy drawn from a
  beta of intra-request correlation ``--rho`` 0.3: ``batch_labels`` of bench/gates.py), the
  baseline right on ``BASE_ACCURACY`` (0.96) of the live images, the canary on that less the
  scenario's drop. An attacker tenant's label is the answer's top-1 for one version's answers
  (all "right") and another class for the other's (all "wrong"), whatever the images.
  Unlabelled requests are logged by their first item only: the other items of a request without
  a label carry no evidence (no latency, error or label: ``stage_samples`` gives them NaN), so
  the verdicts are those of the whole log (``--all-items`` logs them all, to check).
- the validation replay sent at every poke (look interval) through both versions by name (route
  "version"), ``--images`` images (1,000: 450 cannot show the 0.5 pp paired margin for a canary
  that answers them as the baseline does), the canary answering each as the baseline does.

The live accuracy check is the only check that can tell the canaries apart: it can fail a stage,
or hold it where one tenant's labels decide (a live accuracy within the margin does not pass it), and at 100% the baseline
takes no live traffic, so it judges the stages below 100% only. Per scenario, the share of
rollouts promoted and rolled back, the mean seconds to the decision (promotion: the stages'
bakes; rollback: the time of the look that failed or left the stage undecided), and the share
of rollouts in which the live accuracy check failed a look, ended "wait" at the last look judged,
or ended shown within the margin ("info"). Once per scenario the program asserts that
``stage_samples`` gives the live rows of the labelled requests their ``correct`` and the tenant
that labelled them (``labelled_by``), split across the scenario's tenants.

Scenarios (the canary's live accuracy only differs; the attacker's labels are as described):
  a2, a5  equal canary, 2 or 5 honest tenants of equal shares
  b       canary 2 pp worse, 2 honest tenants and 1 attacker (1/3) labelling every baseline answer
          wrong and every canary answer right: hiding a worse canary
  c1, c2, c5  canary 2 pp worse, 1, 2 or 5 honest tenants of equal shares
  d, d5   equal canary, 2 (4) honest tenants and 1 attacker (1/3, 1/5) labelling every canary
          answer wrong and every baseline answer right: one tenant vetoing a good canary
  e       canary 5 pp worse on tenant t0's images only (share 1/2), equal on t1's: a real
          regression for one customer
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from bench.gates import BASE_ACCURACY, SIGMA, batch_labels  # noqa: E402
from vision_rollout.engine import StageWindow, judge_stage, stage_samples  # noqa: E402
from vision_rollout.gates import GateConfig  # noqa: E402
from vision_rollout.spec import RolloutSpec  # noqa: E402

RATE = 10.0  # live requests per second into the model (both arms)
LABELLED = 0.15  # share of each arm's live requests whose images get feedback labels
RHO = 0.3  # intra-request correlation of the items' correctness
BATCH = 8  # images per live request
IMAGES = 1000  # validation images replayed at every poke
STAGES = (50, 100)
CLASSES = 10


@dataclass(frozen=True)
class Tenant:
    name: str
    share: float
    drop: float = 0.0  # the canary's accuracy drop on this tenant's images
    favours: str | None = None  # an attacker: the version whose answers its labels call right


def honest(n: int, drop: float, share: float = 1.0) -> list[Tenant]:
    return [Tenant(f"t{i}", share / n, drop) for i in range(n)]


def attacked(n: int, drop: float, favours: str) -> list[Tenant]:
    """``n`` honest tenants and one attacker, all of equal shares."""
    return [*honest(n, drop, n / (n + 1)), Tenant(f"t{n}", 1 / (n + 1), drop, favours)]


SCENARIOS: dict[str, tuple[str, list[Tenant]]] = {
    "a2": ("equal canary, 2 honest tenants", honest(2, 0.0)),
    "a5": ("equal canary, 5 honest tenants", honest(5, 0.0)),
    "b": ("canary 2 pp worse, 2 honest + 1 attacker for the canary (1/3)", attacked(2, 0.02, "canary")),
    "c2": ("canary 2 pp worse, 2 honest tenants", honest(2, 0.02)),
    "c5": ("canary 2 pp worse, 5 honest tenants", honest(5, 0.02)),
    "c1": ("canary 2 pp worse, 1 tenant", honest(1, 0.02)),
    "d": ("equal canary, 2 honest + 1 attacker against the canary (1/3)", attacked(2, 0.0, "baseline")),
    "d5": ("equal canary, 4 honest + 1 attacker against the canary (1/5)", attacked(4, 0.0, "baseline")),
    "e": ("canary 5 pp worse on t0's images only (1/2), 2 honest", [Tenant("t0", 0.5, 0.05), Tenant("t1", 0.5)]),
}


def steady(n: int, share: float) -> np.ndarray:
    """Which of ``n`` items in a row are chosen at a steady ``share`` (the same ones every time)."""
    i = np.arange(n)
    return np.floor((i + 1) * share + 1e-9) > np.floor(i * share + 1e-9)


def stage_records(
    rng: np.random.Generator,
    spec: RolloutSpec,
    index: int,
    weight: int,
    tenants: list[Tenant],
    replay_correct: np.ndarray,
    batch: int = BATCH,
    all_items: bool = False,
) -> pd.DataFrame:
    """Prediction-log records of stage ``index`` (weight ``weight``) starting at t=0: the live
    requests and their labels over the bake, and the validation replay sent at every poke."""
    horizon = spec.bake_seconds * 1.02
    n = int(RATE * horizon)
    t = (np.arange(n) + 0.5) / RATE
    canary = steady(n, weight / 100)
    labelled = np.zeros(n, dtype=bool)
    for arm in (canary, ~canary):
        labelled[arm] = steady(int(arm.sum()), LABELLED)
    who = rng.choice(len(tenants), n, p=[x.share for x in tenants])
    accuracy = BASE_ACCURACY - np.where(canary, np.array([x.drop for x in tenants])[who], 0.0)
    right = np.empty((n, batch), dtype=bool)
    for a in np.unique(accuracy):
        rows = accuracy == a
        right[rows] = batch_labels(rng, int(rows.sum()), batch, RHO, float(a)).reshape(-1, batch) > 0
    top1 = rng.integers(0, CLASSES, (n, batch))
    other = (top1 + rng.integers(1, CLASSES, (n, batch))) % CLASSES
    label = np.where(right, top1, other)
    for i, x in enumerate(tenants):
        if x.favours is not None:
            mine = who == i
            favoured = canary[mine] == (x.favours == "canary")
            label[mine] = np.where(favoured[:, None], top1[mine], (top1[mine] + 1) % CLASSES)
    latency = np.exp(rng.normal(math.log(5.0), SIGMA, n))  # (canary as fast: its ratio 1)
    names = np.array([x.name for x in tenants], dtype=object)[who]
    ids = np.array([f"s{index}-{j}" for j in range(n)], dtype=object)

    # Live primaries: every item of a labelled request, the first of the others (see the docstring).
    rows_of = np.where(labelled | all_items, batch, 1)
    req = np.repeat(np.arange(n), rows_of)
    item = np.arange(len(req)) - np.repeat(np.cumsum(rows_of) - rows_of, rows_of)
    # Labels: a record per item of a labelled request, 1 to 5 s after its answer.
    lab = np.flatnonzero(labelled)
    delay = 1.0 + np.arange(len(lab)) % 5
    lreq, litem = np.repeat(lab, batch), np.tile(np.arange(batch), len(lab))

    pokes = np.arange(0.5, horizon, spec.bake_seconds / spec.looks_per_stage)
    images = replay_correct.shape[1]
    r_t = np.repeat(pokes, 2 * images) + np.tile(np.arange(2 * images) * 1e-3, len(pokes))
    r_canary = np.tile(np.repeat([False, True], images), len(pokes))
    r_image = np.tile(np.tile(np.arange(images), 2), len(pokes))
    r_lat = np.exp(rng.normal(math.log(5.0), SIGMA, len(r_t)))
    m, k, r = len(req), len(lreq), len(r_t)
    return pd.DataFrame(
        {
            "time": np.concatenate([t[req], t[lreq] + np.repeat(delay, batch), r_t]),
            "model": spec.model,
            "version": np.concatenate(
                [
                    np.where(canary[req], spec.candidate_version, spec.baseline_version),
                    np.full(k, None),
                    np.where(r_canary, spec.candidate_version, spec.baseline_version),
                ]
            ),
            "role": np.concatenate([np.full(m, "primary"), np.full(k, "label"), np.full(r, "primary")]),
            "route": np.concatenate([np.full(m, "route"), np.full(k, None), np.full(r, "version")]),
            "request_id": np.concatenate([ids[req], ids[lreq], np.full(r, "", dtype=object)]),
            "item": np.concatenate([item, litem, np.zeros(r, dtype=int)]),
            "tenant": np.concatenate([names[req], names[lreq], np.full(r, None)]),
            "latency_ms": np.concatenate([latency[req], np.full(k, np.nan), r_lat]),
            "outcome": np.concatenate([np.full(m, "ok"), np.full(k, None), np.full(r, "ok")]),
            "top1": np.concatenate(
                [top1[req, item], np.full(k, -1), np.where(replay_correct[r_canary.astype(int), r_image], 0, 1)]
            ),
            "image_sha256": np.concatenate([np.full(m, "live"), np.full(k, None), r_image.astype(str)]),
            "label": np.concatenate([np.full(m, np.nan), label[lreq, litem].astype(float), np.full(r, np.nan)]),
        }
    )


def check_records(
    records: pd.DataFrame, spec: RolloutSpec, window: StageWindow, labels: dict[str, int], tenants: list[Tenant]
) -> dict[str, Any]:
    """Assert that ``stage_samples`` reads the labelled live rows as intended: their correctness
    and the tenant that labelled them, split across ``tenants`` in their shares, an attacker's
    all right for the version it favours and all wrong for the other. Returns what it saw."""
    samples = stage_samples(records, spec, window, spec.bake_seconds, labels)
    live = samples[samples["source"] == "live"]
    rows = live[live["correct"].notna()]
    assert len(rows) > 0, "no live row has a label"
    assert rows["labelled_by"].notna().all(), "a labelled live row names no tenant"
    assert rows["cluster"].notna().all(), "a labelled live row has no request"
    names = {x.name for x in tenants}
    assert set(rows["labelled_by"]) == names, f"labels from {set(rows['labelled_by'])}, not {names}"
    assert set(rows["arm"]) == {"baseline", "canary"}, "labels of one arm only"
    seen: dict[str, Any] = {}
    for x in tenants:
        mine = rows[rows["labelled_by"] == x.name]
        share = len(mine) / len(rows)
        assert abs(share - x.share) < 0.1, f"tenant {x.name}: {share:.2f} of the labels, share {x.share:.2f}"
        acc = mine.groupby("arm")["correct"].mean()
        if x.favours is not None:
            other = "baseline" if x.favours == "canary" else "canary"
            assert acc[x.favours] == 1.0, f"attacker {x.name}: {acc.to_dict()}"
            assert acc[other] == 0.0, f"attacker {x.name}: {acc.to_dict()}"
        seen[x.name] = {"labelled_rows": len(mine), **{f"accuracy_{a}": round(float(v), 4) for a, v in acc.items()}}
    per_arm = rows.groupby("arm").agg(rows=("correct", "size"), requests=("cluster", "nunique"))
    seen["labelled_per_arm"] = {a: {k: int(v) for k, v in r.items()} for a, r in per_arm.iterrows()}
    return seen


# What the stage's judgements reckoned (group-sequential levels), kept across the rollouts a
# worker judges: the DAG keeps it in the stage's record for its next poke; the looks of every
# rollout here see the same counts, so the levels of one are those of the next.
RECKONED: dict[str, Any] = {}


def judge(spec: RolloutSpec, window: StageWindow, records: pd.DataFrame, labels: dict[str, int], cfg: GateConfig):
    now = spec.max_stage_seconds + 10
    known = dict(RECKONED)
    state = judge_stage(spec, window, records, labels, now, config=cfg, reckoned=known)
    RECKONED.update(known)
    return state


def rollout(
    rng: np.random.Generator,
    spec: RolloutSpec,
    tenants: list[Tenant],
    batch: int,
    images: int,
    all_items: bool,
    check: bool,
) -> dict[str, Any]:
    """One rollout as the engine judges it: promoted, seconds to the decision, and the live
    accuracy check's decisions (``live``: fail if any look failed on it, else its last one)."""
    cfg = GateConfig.from_spec(spec)
    base = rng.random(images) < BASE_ACCURACY
    replay_correct = np.stack([base, base])  # the canary answers the validation images as the baseline
    labels = {str(i): 0 for i in range(images)}
    elapsed, live, sentence, reason, seen = 0.0, "absent", None, "", None
    for index, weight in enumerate(spec.stages):
        window = StageWindow(index, weight, 0.0)
        records = stage_records(rng, spec, index, weight, tenants, replay_correct, batch, all_items)
        if check and weight < 100 and seen is None:
            seen = check_records(records, spec, window, labels, tenants)
        state = judge(spec, window, records, labels, cfg)
        acc = next((c for c in state.verdict.checks if c.name == "accuracy_live"), None) if state.verdict else None
        if acc is not None and live != "fail":
            live, sentence = acc.decision, acc.sentence
        until = state.until - window.started if state.until is not None else spec.max_stage_seconds
        if state.status == "pass":
            elapsed += max(spec.bake_seconds, until)
            continue
        return {
            "promoted": False,
            "seconds": elapsed + until,
            "live": live,
            "sentence": sentence,
            "reason": state.reason,
            "seen": seen,
        }
    return {"promoted": True, "seconds": elapsed, "live": live, "sentence": sentence, "reason": reason, "seen": seen}


def _cell(job: tuple[str, int, int, int, int, bool, bool]) -> list[dict[str, Any]]:
    scenario, sims, seed, batch, images, all_items, check = job
    rng = np.random.default_rng(seed)
    spec = RolloutSpec.from_dict({"stages": list(STAGES)})
    tenants = SCENARIOS[scenario][1]
    return [rollout(rng, spec, tenants, batch, images, all_items, check and i == 0) for i in range(sims)]


def summarise(scenario: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(runs)
    promoted = sum(r["promoted"] for r in runs) / n
    live = {d: sum(r["live"] == d for r in runs) / n for d in ("fail", "wait", "info", "absent")}
    # The rule before 2026-12-07 let a failure go without one tenant's labels ("Not failed: without the
    # labels of tenant ..."); now one tenant's labels that change the decision hold the stage ("Held").
    exempt = [r for r in runs if r["sentence"] and "not failed:" in r["sentence"].lower()]
    held = [r for r in runs if r["sentence"] and "held, nothing passes" in r["sentence"]]
    failed = next((r for r in runs if r["live"] == "fail"), None)
    waited = next((r for r in runs if r["live"] == "wait"), None)
    rolled = [r for r in runs if not r["promoted"]]
    return {
        "scenario": scenario,
        "description": SCENARIOS[scenario][0],
        "tenants": [x.__dict__ for x in SCENARIOS[scenario][1]],
        "sims": n,
        "promoted": promoted,
        "rolled_back": 1 - promoted,
        "mean_seconds": float(np.mean([r["seconds"] for r in runs])),
        "live_fail": live["fail"],
        "live_wait": live["wait"],
        "live_within_margin": live["info"],
        "live_absent": live["absent"],
        "live_tenant_left_out": len(exempt) / n,
        "live_held_by_two_tenants": len(held) / n,
        "rolled_back_not_by_live": sum(r["live"] != "fail" for r in rolled) / n,
        "labelled_seen": next((r["seen"] for r in runs if r["seen"]), None),
        "example_live_sentences": {
            "first_rollout": runs[0]["sentence"],
            "first_fail": failed["sentence"] if failed else None,
            "first_wait": waited["sentence"] if waited else None,
            "first_tenant_left_out": exempt[0]["sentence"] if exempt else None,
            "first_held": held[0]["sentence"] if held else None,
        },
        "example_rollback_reason": rolled[0]["reason"][:2000] if rolled else None,
    }


def main(argv: list[str] | None = None) -> int:
    global RATE, LABELLED, RHO, STAGES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sims", type=int, default=40, help="rollouts per scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=BATCH, help="images per live request")
    p.add_argument("--rate", type=float, default=RATE, help="live requests per second (both arms)")
    p.add_argument("--labelled", type=float, default=LABELLED, help="share of live requests labelled")
    p.add_argument("--rho", type=float, default=RHO, help="intra-request correlation of correctness")
    p.add_argument("--images", type=int, default=IMAGES, help="validation images replayed at every poke")
    p.add_argument("--stages", nargs="+", type=int, default=list(STAGES))
    p.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--all-items", action="store_true", help="log every item of unlabelled requests too")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "live-tenants.json")
    args = p.parse_args(argv)
    RATE, LABELLED, RHO, STAGES = args.rate, args.labelled, args.rho, tuple(args.stages)  # (forked workers see them)
    start = time.perf_counter()
    chunks = max(1, args.workers)
    jobs = []
    for scenario in args.scenarios:
        sizes = [args.sims // chunks + (c < args.sims % chunks) for c in range(chunks)]
        for c, size in enumerate(s for s in sizes if s):
            seed = args.seed + 1000 * list(SCENARIOS).index(scenario) + c
            jobs.append((scenario, size, seed, args.batch, args.images, args.all_items, c == 0))
    rows = []
    with ProcessPoolExecutor(args.workers) as pool:
        done = list(pool.map(_cell, jobs))
    for scenario in args.scenarios:
        runs = [r for job, out in zip(jobs, done, strict=True) if job[0] == scenario for r in out]
        row = summarise(scenario, runs)
        rows.append(row)
        print(
            f"{scenario:3s} {row['description']:62s} promoted {row['promoted']:.3f} rolled back "
            f"{row['rolled_back']:.3f} mean {row['mean_seconds']:5.0f} s | live check failed "
            f"{row['live_fail']:.3f} ended wait {row['live_wait']:.3f} within margin "
            f"{row['live_within_margin']:.3f} (a tenant left out {row['live_tenant_left_out']:.3f}, held {row['live_held_by_two_tenants']:.3f})",
            flush=True,
        )
    seconds = time.perf_counter() - start
    print(f"{len(args.scenarios)} scenarios x {args.sims} rollouts in {seconds:.0f} s", flush=True)
    result = {
        "settings": {
            "sims": args.sims,
            "seed": args.seed,
            "workers": args.workers,
            "stages": list(STAGES),
            "spec": "RolloutSpec defaults (bake 600 s, max stage 3600 s, 10 looks a stage, min 200 samples, "
            "alpha 0.05, accuracy margin 0.5 pp)",
            "live_rate_requests_per_s": RATE,
            "batch": args.batch,
            "labelled_share": LABELLED,
            "intra_request_correlation": RHO,
            "base_accuracy": BASE_ACCURACY,
            "validation_images": args.images,
            "sigma_log_latency": SIGMA,
            "all_items_logged": args.all_items,
            "command": " ".join(["bench/live_tenants.py", *(argv if argv is not None else sys.argv[1:])]),
        },
        "run_seconds": round(seconds, 1),
        "scenarios": rows,
    }
    write_result(args.out, "live-tenants", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
