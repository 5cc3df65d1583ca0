"""The statistical gate: boundaries, decisions, error rates under repeated looks."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tests.support import samples
from vision_rollout.gates import (
    Check,
    GateConfig,
    GuardInputs,
    boundaries,
    check_information,
    evaluate_gate,
    guard_checks,
    latency_check,
    live_accuracy_check,
    look_information,
    nominal_alpha,
    paired_accuracy_check,
    proportion_check,
    spent,
    sustained_breach,
    tail_check,
)
from vision_rollout.spec import MAX_LOOKS


def test_boundaries_match_published_lan_demets_values():
    # gsDesign, one-sided alpha 0.025, K=5 equally spaced looks.
    obf = boundaries(0.025, 5, "obrien-fleming")
    assert np.allclose(obf, [4.877, 3.357, 2.680, 2.290, 2.031], atol=0.002)
    pocock = boundaries(0.025, 5, "pocock")
    assert np.allclose(pocock, [2.438, 2.427, 2.410, 2.397, 2.386], atol=0.004)
    assert boundaries(0.05, 1)[0] == pytest.approx(1.6449, abs=1e-4)
    assert nominal_alpha(0.05, 1, 1) == pytest.approx(0.05, rel=1e-6)


def test_a_level_kept_by_other_code_than_this_is_reckoned_again(monkeypatch):
    """A stage's record keeps its looks' levels and need by a digest of their inputs
    (``Reckoning``), and nothing in the key said which code reckoned them: a deploy mid-stage that
    changed how (``boundaries``' recursion or grid, ``NO_GAIN``, ``engine.need_n``'s method) took
    the old code's values for the stage's later pokes. ``RECKONED_VERSION`` is in every key: a
    value kept under another is not taken, reckoned again, and the record holds the new one."""
    from vision_rollout import gates
    from vision_rollout.gates import Reckoning

    seen = (100.0, 250.0)
    level = nominal_alpha(0.05, 2, 5, "pocock", seen)
    known: dict = {}
    assert nominal_alpha(0.05, 2, 5, "pocock", seen, Reckoning(known)) == level
    (key,) = known
    known[key] = 0.5  # (what the code before reckoned, told apart)
    assert nominal_alpha(0.05, 2, 5, "pocock", seen, Reckoning(known)) == 0.5  # the same code's: taken
    monkeypatch.setattr(gates, "RECKONED_VERSION", gates.RECKONED_VERSION + 1)
    assert nominal_alpha(0.05, 2, 5, "pocock", seen, Reckoning(known)) == level  # another's: reckoned
    assert list(known.values()) == [level]
    assert key not in known


@pytest.mark.parametrize("looks", [10, MAX_LOOKS])
def test_error_rate_holds_over_repeated_looks(looks):
    # Monte Carlo of the score process under H0: crossing at any of the looks <= alpha.
    rng = np.random.default_rng(7)
    sims, alpha = 40_000, 0.05
    c = np.array(boundaries(alpha, looks))
    z = np.cumsum(rng.standard_normal((sims, looks)), axis=1) / np.sqrt(np.arange(1, looks + 1))
    crossed = (z >= c).any(axis=1).mean()
    assert crossed < alpha + 3 * math.sqrt(alpha * (1 - alpha) / sims)
    naive = (z >= 1.6449).any(axis=1).mean()
    assert naive > 0.15  # the trap the spending avoids (Armitage, McPherson and Rowe)


@pytest.mark.parametrize("looks", [18, 40])
def test_early_looks_of_many_keep_a_level_above_zero(looks):
    """O'Brien-Fleming's spending was 2 * (1 - cdf(z)): exactly 0 at look 1 of 18 or more, so the
    look's level was 0, the p99 interval's lower bound 0, and the tail check divided by it."""
    assert spent(0.05, 1 / looks, "obrien-fleming") > 0
    level = nominal_alpha(0.05, 1, looks)
    assert 0 < level < 1e-15
    v = evaluate_gate(samples(3000), look=1, looks=looks)
    assert v.decision == "wait"  # nothing is shown at such a level; no ZeroDivisionError either
    p99 = next(c for c in v.checks if c.name == "latency_p99")
    assert p99.ci[1] == math.inf


def test_a_tail_check_without_a_lower_bound_has_no_upper_one():
    rng = np.random.default_rng(5)
    base, canary = np.exp(rng.normal(1, 0.3, 300)), np.exp(rng.normal(1, 0.3, 300))
    check = tail_check(base, canary, 0.99, GateConfig(), 0.0)
    assert check.ci[1] == math.inf
    assert check.decision == "info"


def test_a_tail_check_carries_its_level_and_the_p_value_of_its_rule():
    """A p95/p99 check fails when its ratio's lower bound (each arm's quantile bound at half the
    look's level) is above the tail margin, so a canary whose quantile lies at the margin fails
    it at most at that level; but it carried neither level nor p-value, and its sentence named
    neither: a reviewer saw an interval, not what the check promised. Each now carries the
    look's level (the latency checks': it reads their samples) and the p-value that inverts its
    rule as it runs, the same at every level and below it exactly when the check fails."""
    rng = np.random.default_rng(11)
    cases = [(1.5, 400, 120, 0.95), (1.3, 3000, 3000, 0.99), (1.25, 800, 800, 0.95), (2.0, 60, 60, 0.99)]
    for ratio, nb, nc, q in [*cases, (1.0, 2000, 500, 0.95)]:
        base, canary = np.exp(rng.normal(1, 0.5, nb)), ratio * np.exp(rng.normal(1, 0.5, nc))
        check = tail_check(base, canary, q, GateConfig(), 0.05)
        assert check.level == 0.05
        p = check.p_value
        assert p is not None
        assert 0 < p <= 1
        # (down to 1e-99: below about 1e-17 scipy's isf leaves the baseline without an upper bound)
        for level in [*np.geomspace(1e-99, 0.5, 60), p * (1 - 1e-9), p * (1 + 1e-9)]:
            if not 0 < level < 1:
                continue
            check = tail_check(base, canary, q, GateConfig(), float(level))
            assert (check.p_value, check.level) == (p, level)
            assert (check.decision == "fail") == (p < level), (ratio, nb, nc, q, level, p, check.ci)
    verdict = evaluate_gate(samples(3000, ratio=1.4))
    for name in ("latency_p95", "latency_p99"):
        check = next(c for c in verdict.checks if c.name == name)
        assert check.decision == "fail"
        assert check.level == verdict.nominal_alpha
        assert (
            f"worse than the +25% tail margin; one-sided p that the canary's {name[8:]} is worse than the margin: "
            f"{check.p_value:.3g} (this look's level {check.level:.3g}, each quantile's bound at half of it)."
        ) in check.sentence


def test_equal_canary_passes_slow_canary_fails_few_samples_wait():
    assert evaluate_gate(samples(4000)).decision == "pass"
    slow = evaluate_gate(samples(4000, ratio=1.2))
    assert slow.decision == "fail"
    assert slow.failed[0].name == "latency_geomean"
    assert "worse than the +5% margin" in slow.failed[0].sentence
    few = evaluate_gate(samples(40))
    assert few.decision == "wait"
    assert "Too few samples" in few.summary


def test_a_latency_comparison_not_judged_is_reported_and_decides_nothing():
    why = "its arms were not under equal load."
    slow = evaluate_gate(samples(4000, ratio=1.5), latency_unjudged=why)
    timed = [c for c in slow.checks if c.name.startswith("latency")]
    assert {c.name for c in timed} == {"latency_geomean", "latency_rank", "latency_p95", "latency_p99"}
    assert all(c.decision == "info" and not c.blocks_pass and c.sentence.endswith(f"Not judged: {why}") for c in timed)
    assert slow.decision == "pass"  # errors and the rest decide
    assert evaluate_gate(samples(40), latency_unjudged=why).decision == "wait"  # still too few samples
    assert evaluate_gate(samples(4000, ratio=1.5)).failed[0].name == "latency_geomean"


def test_a_latency_comparison_carried_passes_only_when_it_alone_holds_the_gate():
    df = samples(150)
    df.loc[df["arm"] == "canary", "latency_ms"] = df.loc[df["arm"] == "baseline", "latency_ms"].to_numpy()[::-1]
    cfg = {"latency_margin": 0.01, "min_samples": 100, "error_margin": 0.05}  # a margin finer than 150 resolve
    carried = evaluate_gate(df, cfg, latency_carried_to=25)
    assert carried.decision == "pass"
    check = next(c for c in carried.checks if c.name == "latency_geomean")
    assert check.decision == "info"
    assert not check.blocks_pass
    assert check.sentence.endswith(
        "Carried to the 25% stage, whose live arms must show it before anything is promoted."
    )
    assert "Carried to the 25% stage" in carried.summary
    assert evaluate_gate(df, cfg).decision == "wait"
    # The error rate not yet shown either, too few samples, a P99 breach under way, a slower
    # canary: nothing is carried.
    assert evaluate_gate(df, {**cfg, "error_margin": 0.001}, latency_carried_to=25).decision == "wait"
    assert evaluate_gate(samples(40), latency_carried_to=25).decision == "wait"
    under_way = GuardInputs(p99_series_ms=tuple((float(t), 20.0 if t < 60 else 90.0) for t in range(0, 105, 5)))
    assert evaluate_gate(df, cfg, guards=under_way, latency_carried_to=25).decision == "wait"
    assert evaluate_gate(samples(4000, ratio=1.2), latency_carried_to=25).decision == "fail"


def test_too_few_samples_for_the_margin_waits_with_the_mde():
    df = samples(150)
    df.loc[df["arm"] == "canary", "latency_ms"] = df.loc[df["arm"] == "baseline", "latency_ms"].to_numpy()[::-1]
    v = evaluate_gate(df, {"latency_margin": 0.01, "min_samples": 100})  # a margin finer than 150 resolve
    check = next(c for c in v.checks if c.name == "latency_geomean")
    assert v.decision == "wait"
    assert check.decision == "wait"
    assert check.mde > 0.01
    assert "resolve differences of about" in check.sentence


def test_error_rates_are_judged_against_their_margin():
    v = evaluate_gate(samples(3000, errors=(0.0, 0.05)))
    errors = next(c for c in v.checks if c.name == "errors")
    assert errors.decision == "fail"
    assert v.decision == "fail"
    clean = next(c for c in evaluate_gate(samples(3000)).checks if c.name == "errors")
    assert clean.decision == "pass"
    assert clean.p_value > 0.5  # zero errors: not worse than the margin (the margin's own test)


def paired(n: int, acc_b: float, acc_c: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = np.arange(n)
    cb = (rng.random(n) < acc_b).astype(int)
    cc = (rng.random(n) < acc_c).astype(int)
    lat = np.full(2 * n, 5.0) * np.exp(rng.normal(0, 0.1, 2 * n))
    return pd.DataFrame(
        {
            "arm": ["baseline"] * n + ["canary"] * n,
            "latency_ms": lat,
            "error": 0,
            "correct": np.r_[cb, cc],
            "pair_id": np.r_[ids, ids],
        }
    )


def test_paired_accuracy_uses_exact_mcnemar():
    worse = evaluate_gate(paired(2000, 0.96, 0.90))
    check = next(c for c in worse.checks if c.name == "accuracy_paired")
    assert check.decision == "fail"
    assert check.p_value < 1e-6
    assert "McNemar" in check.method
    better = next(c for c in evaluate_gate(paired(2000, 0.96, 0.99)).checks if c.name == "accuracy_paired")
    assert better.decision == "pass"


@pytest.mark.parametrize("n", [450, 3000])
def test_paired_accuracy_holds_its_level_for_a_canary_that_only_loses(n):
    """A candidate exactly at the margin that loses images and gains none (a quantized model):
    p10 = margin, p01 = 0. With 450 images no discordant pair at all happens 10% of the time,
    which must not read as shown within the margin; nor may a few of them at 3000 images."""
    cfg, level = GateConfig(), nominal_alpha(0.05, 10, 10)
    rng = np.random.default_rng(11)
    sims = 2000
    passed = 0
    for _ in range(sims):
        lost = rng.random(n) < cfg.accuracy_margin
        pairs = pd.DataFrame({"baseline": np.ones(n, dtype=int), "canary": (~lost).astype(int)})
        passed += paired_accuracy_check(pairs, cfg, level).decision == "pass"
    assert passed / sims <= level + 3 * math.sqrt(level * (1 - level) / sims)


def test_paired_accuracy_needs_enough_images_to_show_the_margin():
    """No discordant pair in 450 images cannot show a 0.5 pp margin at 5% (a Poisson count of
    mean 2.25 is 0 with probability 0.105); in 2000 it can. The interval says the same."""
    same = pd.DataFrame({"baseline": np.ones(450, dtype=int), "canary": np.ones(450, dtype=int)})
    check = paired_accuracy_check(same, GateConfig(), 0.05)
    assert check.decision == "wait"
    assert check.ci[0] < 0 < GateConfig().accuracy_margin < check.ci[1]
    # The sentence says why no wait resolves it, and what would (z = 1.645: 539 images).
    assert "450 images cannot show the margin at this look's level" in check.sentence
    assert "an equal canary needs at least 539" in check.sentence
    equal_at_539 = pd.DataFrame({"baseline": np.ones(539, dtype=int), "canary": np.ones(539, dtype=int)})
    assert paired_accuracy_check(equal_at_539, GateConfig(), 0.05).decision == "pass"
    assert paired_accuracy_check(equal_at_539.iloc[:538], GateConfig(), 0.05).decision == "wait"
    more = pd.DataFrame({"baseline": np.ones(2000, dtype=int), "canary": np.ones(2000, dtype=int)})
    check = paired_accuracy_check(more, GateConfig(), 0.05)
    assert check.decision == "pass"
    assert check.ci[1] < GateConfig().accuracy_margin


def test_live_feedback_accuracy_can_fail_but_not_block():
    df = samples(3000)
    rng = np.random.default_rng(3)
    df["correct"] = np.r_[rng.random(3000) < 0.97, rng.random(3000) < 0.80].astype(int)
    v = evaluate_gate(df)
    live = next(c for c in v.checks if c.name == "accuracy_live")
    assert live.decision == "fail"
    assert v.decision == "fail"


def test_hard_guards():
    series = tuple((float(t), 75.0) for t in range(0, 130, 10))
    assert sustained_breach(series, 60, 120) == (True, 120.0, 120.0)
    assert sustained_breach(series[:-2], 60, 120)[0] is False
    recovered = (*series, (130.0, 40.0))
    assert sustained_breach(recovered, 60, 120) == (True, 120.0, 0.0)  # it ended: a breach all the same
    assert sustained_breach((*series[:-2], (110.0, 40.0)), 60, 120)[0] is False
    assert sustained_breach(((0.0, 75.0),), 60, 0) == (True, 0.0, 0.0)  # (no time above allowed)
    v = evaluate_gate(
        samples(3000),
        guards=GuardInputs(p99_series_ms=series, validation_drop=0.001, shadow_errors=0, shadow_requests=5000),
    )
    assert v.decision == "fail"
    assert [c.name for c in v.failed] == ["guard_p99"]
    v = evaluate_gate(samples(3000), guards=GuardInputs(validation_drop=0.02, shadow_errors=9, shadow_requests=5000))
    assert {c.name for c in v.failed} == {"guard_accuracy_drop", "guard_shadow_errors"}


def test_a_restart_of_the_candidates_serving_processes_fails_the_stage():
    """A candidate whose process crashed on some inputs and restarted lost those requests (the
    mesh answered them 503), its counters and its unwritten log records: every other check read
    what the crashes left, and the stage passed. Any restart beyond ``restarts_max`` (0 by
    default) fails it now; none is a pass of the guard, and no data is no check (the stage holds)."""
    healthy = evaluate_gate(samples(3000), guards=GuardInputs(restarts=0, validation_drop=0.0))
    (check,) = [c for c in healthy.checks if c.name == "guard_restarts"]
    assert (check.decision, check.effect, check.margin) == ("pass", 0, 0)
    crashed = evaluate_gate(samples(3000), guards=GuardInputs(restarts=2, validation_drop=0.0))
    assert crashed.decision == "fail"
    assert [c.name for c in crashed.failed] == ["guard_restarts"]
    assert "The candidate's serving processes restarted 2 times in this stage (limit 0)." in crashed.summary
    (once,) = guard_checks(GuardInputs(restarts=1), GateConfig(restarts_max=1))
    assert once.decision == "pass"
    assert "restarted 1 time in this stage (limit 1)" in once.sentence
    assert guard_checks(GuardInputs(restarts=2), GateConfig(restarts_max=1))[0].decision == "fail"
    assert not [c for c in guard_checks(GuardInputs(), GateConfig()) if c.name == "guard_restarts"]


def test_a_p99_breach_that_ended_between_two_pokes_fails_the_stage():
    """The guard looked at the last ``p99_breach_seconds + 5`` s at each poke and asked whether
    the series ended above the limit for that long: a breach of 125 s that ended before the next
    poke (10 s later, or minutes when Airflow's slots are busy) was never seen. It reads the
    stage's series and fails on any run above the limit that long; a missing point (no traffic
    or no scrape) ends a run."""
    above = [(float(t), 90.0) for t in range(0, 130, 5)]
    below = [(float(t), 20.0) for t in range(130, 300, 5)]
    breach, longest, current = sustained_breach((*above, *below), 60, 120)
    assert (breach, longest, current) == (True, 125.0, 0.0)
    gapped = (*above[:13], *above[15:])  # no point at 65 and 70 s: runs of 60 and 50 s
    assert sustained_breach(gapped, 60, 120) == (False, 60.0, 50.0)
    (check,) = guard_checks(GuardInputs(p99_series_ms=(*above, *below)), GateConfig(p99_ms_max=60))[:1]
    assert check.decision == "fail"
    assert "for 125 s at most at a time in this stage (rollback after 120 s)" in check.sentence


def test_bounds_beside_a_margin_are_never_shown_on_or_across_it():
    """An upper bound a hair below its margin read "+5.00 pp" beside "the 5.00 pp margin", with the
    verdict "shown within": the bounds now take the decimals their side of the margin needs, and
    the margin reads as it was set."""
    import re

    cfg, level = GateConfig(), 0.05
    upper = proportion_check("errors", "Error rate", True, 10, 1000, 12, 1000, 0.05, cfg, level).ci[1]
    for margin, decision in ((upper + 1e-7, "pass"), (upper - 1e-7, "wait")):
        check = proportion_check("errors", "Error rate", True, 10, 1000, 12, 1000, margin, cfg, level)
        assert check.decision == decision
        shown = re.search(r"to ([-+][0-9.]+) pp\): .* the ([0-9.]+) pp margin", check.sentence)
        assert shown, check.sentence
        bound, limit = float(shown[1]), float(shown[2])
        assert limit == pytest.approx(100 * margin, rel=1e-9)  # as set, not rounded to 2 decimals
        assert (bound < limit) == (decision == "pass"), check.sentence
    drop = guard_checks(GuardInputs(validation_drop=0.0050001), GateConfig(accuracy_drop_max=0.005))[0]
    assert drop.decision == "fail"
    assert "+0.50001 pp (limit 0.5 pp)" in drop.sentence, drop.sentence


def test_a_p99_series_without_a_point_holds_the_gate():
    """An empty P99 series read as "no breach": the guard passed ("Canary P99 is nan ms") with no
    evidence. It is no data now, as no series is: the guard waits and nothing passes."""
    empty = GuardInputs(p99_series_ms=())
    assert empty.missing == "the canary's P99 series has no point"
    (check,) = guard_checks(empty, GateConfig())
    assert check.name == "guard_p99"
    assert check.decision == "wait"
    assert "no data" in check.sentence
    assert evaluate_gate(samples(3000), guards=empty).decision == "wait"
    assert GuardInputs(p99_series_ms=(), missing="no series").missing == "no series"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="lack column"):
        evaluate_gate(pd.DataFrame({"arm": ["canary"], "latency_ms": [1.0]}))
    with pytest.raises(ValueError, match="arm must be"):
        evaluate_gate(pd.DataFrame({"arm": ["blue"], "latency_ms": [1.0], "error": [0]}))
    with pytest.raises(ValueError, match="unknown gate config"):
        evaluate_gate(samples(10), {"alfa": 0.1})
    with pytest.raises(ValueError, match="gate config alpha: 'abc' is not of type 'number'"):
        evaluate_gate(samples(10), {"alpha": "abc"})  # the spec's limits, not a TypeError deep inside
    with pytest.raises(ValueError, match="gate config min_samples: -3 is less than the minimum of 10"):
        evaluate_gate(samples(10), {"min_samples": -3})
    with pytest.raises(ValueError, match="look must be in"):
        evaluate_gate(samples(10), look=3, looks=2)


def test_verdict_serialises():
    d = evaluate_gate(samples(500)).to_dict()
    assert d["decision"] in {"pass", "fail", "wait"}
    assert {"name", "decision", "sentence", "p_value", "ci", "mde", "n_baseline"} <= set(d["checks"][0])


def test_margin_canary_is_rarely_passed_over_looks():
    # A canary exactly at the margin, judged at 5 looks as samples accrue: wrong passes <= alpha.
    cfg = GateConfig()
    rng = np.random.default_rng(11)
    sims, looks, per_look, wrong = 400, 5, 60, 0
    for _ in range(sims):
        b = np.exp(rng.normal(0, 0.3, looks * per_look))
        c = np.exp(rng.normal(math.log1p(cfg.latency_margin), 0.3, looks * per_look))
        for k in range(1, looks + 1):
            n = k * per_look
            if latency_check(b[:n], c[:n], cfg, nominal_alpha(cfg.alpha, k, looks)).decision == "pass":
                wrong += 1
                break
    assert wrong / sims < cfg.alpha + 3 * math.sqrt(cfg.alpha * (1 - cfg.alpha) / sims)


def _tailed_log_latency(rng: np.random.Generator, n: int) -> np.ndarray:
    # Log latency with a heavy right tail: 5% of requests slowed by 1 + Exp(1.5) in log space
    # (GC pauses, cold caches), as real services show.
    slow = rng.random(n) < 0.05
    return rng.normal(0, 0.3, n) + np.where(slow, rng.exponential(1.5, n) + 1.0, 0.0)


def _latency_rates(nb: int, nc: int, shift: float, sims: int, seed: int) -> dict[str, float]:
    """Share of runs of the whole 10-look procedure ending in each decision (samples accrue look by look)."""
    cfg, looks = GateConfig(), 10
    rng = np.random.default_rng(seed)
    ends = {"pass": 0, "fail": 0, "wait": 0}
    for _ in range(sims):
        b = np.exp(_tailed_log_latency(rng, nb))
        c = np.exp(_tailed_log_latency(rng, nc) + shift)
        decision = "wait"
        for k in range(1, looks + 1):
            decision = latency_check(
                b[: nb * k // looks], c[: nc * k // looks], cfg, nominal_alpha(cfg.alpha, k, looks)
            ).decision
            if decision != "wait":
                break
        ends[decision] += 1
    return {k: v / sims for k, v in ends.items()}


def test_a_margin_canary_on_the_small_arm_with_skewed_latency_is_rarely_passed():
    # Welch t on log latency passed a canary exactly at the margin 13-14% of the time (alpha 5%)
    # when the canary arm was the small one and log latency had a heavy right tail: the small
    # arm's mean is skewed, so its t is too, and the lower tail the pass test reads is too heavy.
    cfg, sims = GateConfig(), 400
    rate = _latency_rates(2000, 100, math.log1p(cfg.latency_margin), sims, seed=5)["pass"]
    assert rate < cfg.alpha + 3 * math.sqrt(cfg.alpha * (1 - cfg.alpha) / sims), rate


def test_an_equal_canary_with_skewed_latency_passes():
    # The same tails, no slowdown, a quarter of the traffic: shown within the margin by the last look.
    rates = _latency_rates(3000, 1000, 0.0, 200, seed=6)
    assert rates["pass"] > 0.9, rates


def test_histogram_bucket_quantiles_are_reported_with_their_error_bound():
    base = [(0.005, 50.0), (0.01, 95.0), (0.02, 100.0), (math.inf, 100.0)]
    canary = [(0.005, 10.0), (0.01, 60.0), (0.02, 98.0), (0.05, 100.0), (math.inf, 100.0)]
    v = evaluate_gate(samples(500), buckets={"baseline": base, "canary": canary})
    check = next(c for c in v.checks if c.name == "latency_p99_buckets")
    assert check.decision == "info"
    lo, hi = check.ci
    assert lo <= check.effect <= hi
    assert "error at most the width" in check.method


def test_a_verdict_with_an_unbounded_interval_survives_json():
    import json

    from vision_rollout.gates import Verdict

    v = evaluate_gate(samples(60), {"min_samples": 50})  # too few for a p99 upper bound: +inf
    p99 = next(c for c in v.checks if c.name == "latency_p99")
    assert p99.ci[1] == float("inf")
    back = Verdict.from_dict(json.loads(json.dumps(v.to_dict(), allow_nan=False)))
    assert next(c for c in back.checks if c.name == "latency_p99").ci == p99.ci


@pytest.mark.parametrize(("n", "ratio"), [(60, 1.0), (4000, 1.0), (4000, 1.3), (20_000, 1.0)])
def test_every_sentence_is_formatted(n, ratio):
    # A string that lost its f prefix shows its placeholder to the reviewer: "{cfg.x}".
    v = evaluate_gate(samples(n, ratio=ratio), {"min_samples": 50})
    for text in [v.summary, *(c.sentence for c in v.checks), *(c.method for c in v.checks)]:
        assert "{" not in text, text
        assert "}" not in text, text


def test_a_p99_breach_under_way_holds_the_stage():
    """A stage whose bake time is shorter than the breach the guard allows passed with its P99
    above the limit (40 s of a 120 s allowance): the breach went on into the next stage, whose
    series starts afresh, or into the promotion. A breach under way holds the stage; one that
    ended short of the allowance does not."""
    cfg = GateConfig(p99_ms_max=60, p99_breach_seconds=120)
    under_way = tuple((float(t), 20.0 if t < 60 else 90.0) for t in range(0, 105, 5))
    (check,) = guard_checks(GuardInputs(p99_series_ms=under_way), cfg)
    assert check.decision == "wait"
    assert "above the limit for the last 40 s" in check.sentence
    assert "nothing passes while it is above" in check.sentence
    assert evaluate_gate(samples(3000), guards=GuardInputs(p99_series_ms=under_way), config=cfg).decision == "wait"
    ended = (*under_way, (105.0, 30.0))
    (check,) = guard_checks(GuardInputs(p99_series_ms=ended), cfg)
    assert check.decision == "pass"


def clustered_labels(requests: int, batch: int, wrong: tuple[int, int]) -> pd.DataFrame:
    """Live labels of ``requests`` requests of ``batch`` images per arm, the items of a request
    all right or all wrong (one client's images of one kind): ``wrong`` requests per arm."""
    request = np.tile(np.repeat(np.arange(requests), batch), 2)
    arm = np.repeat(["baseline", "canary"], requests * batch)
    first = np.tile(np.arange(batch) == 0, 2 * requests)
    return pd.DataFrame(
        {
            "arm": arm,
            "latency_ms": np.where(first, 5.0, np.nan),
            "error": np.where(first, 0.0, np.nan),
            "correct": (request >= np.where(arm == "baseline", *wrong)).astype(float),
            "cluster": np.char.add(arm.astype(str), request.astype(str)),
        }
    )


def test_live_labels_of_one_request_are_one_unit_of_evidence():
    """The items of a batch request were counted as independent labels: 40 against 55 wrong
    requests of 1000 (one-sided p 0.057 of a difference at all) read as 320 against
    440 wrong images of 8000, and failed the canary with a 1.5 pp drop shown above the 0.5 pp
    margin. Each arm's counts are divided by the design effect of its requests now."""
    v = evaluate_gate(clustered_labels(1000, 8, (40, 55)))
    live = next(c for c in v.checks if c.name == "accuracy_live")
    assert live.decision == "wait", live.sentence
    assert live.ci[0] < GateConfig().accuracy_margin
    assert "design effects 8.00 and 8.00" in live.sentence
    assert (live.n_baseline, live.n_canary) == (8000, 8000)
    # Independent items (a request each) keep the binomial test: the same counts fail.
    independent = clustered_labels(8000, 1, (320, 440))
    assert next(c for c in evaluate_gate(independent).checks if c.name == "accuracy_live").decision == "fail"


def test_an_equal_canary_with_batch_labels_fails_at_most_alpha_over_the_looks():
    """An equal canary, live labels from requests of 8 images whose items are alike (the same
    image 8 times, or one client's): counted as independent, the live accuracy check failed it in
    a third of the rollouts at the form's defaults (10 looks, alpha 0.05)."""
    rng = np.random.default_rng(11)
    cfg, looks, requests, sims = GateConfig(), 10, 50, 150
    fails = 0
    for _ in range(sims):
        right = rng.random((2, requests)) < 0.96
        for k in range(1, looks + 1):
            r = requests * k // looks
            df = clustered_labels(r, 8, (0, 0))
            df["correct"] = np.repeat(np.r_[right[0, :r], right[1, :r]], 8).astype(float)
            if evaluate_gate(df, cfg, k, looks).decision == "fail":
                fails += 1
                break
    assert fails / sims < cfg.alpha + 3 * math.sqrt(cfg.alpha * (1 - cfg.alpha) / sims)


def tenant_labels(tenant: str | None, n: int, right: tuple[int, int], arms=("baseline", "canary")) -> pd.DataFrame:
    """``n`` live labels per arm in ``arms`` sent by ``tenant``, ``right`` of them right (baseline,
    canary), each its own request."""
    return pd.concat(
        [
            pd.DataFrame(
                {
                    "arm": arm,
                    "latency_ms": 5.0,
                    "error": 0.0,
                    "correct": (np.arange(n) < r).astype(float),
                    "labelled_by": tenant,
                }
            )
            for arm, r in zip(("baseline", "canary"), right, strict=True)
            if arm in arms
        ],
        ignore_index=True,
    )


def live(df: pd.DataFrame) -> tuple[str, Check]:
    """The gate's decision on ``df`` and its live accuracy check."""
    v = evaluate_gate(df)
    return v.decision, next(c for c in v.checks if c.name == "accuracy_live")


def test_a_decision_one_tenants_labels_change_holds_the_stage():
    """The live check failed only where it failed without each tenant's labels in turn, and never
    held: two honest tenants of a canary 2 pp worse, each too few alone to show it, promoted it
    (7 of 12 rollouts of the procedure). A decision one tenant's labels change now holds the
    stage (nothing passes; undecided at its end, the run rolls back), naming the tenant; one
    that stands without each tenant's labels is taken."""
    acme, globex = tenant_labels("acme", 800, (768, 752)), tenant_labels("globex", 800, (768, 752))
    assert live(acme)[1].decision == live(globex)[1].decision == "wait"  # neither alone shows it
    assert live(pd.concat([acme, globex]).assign(labelled_by=None))[1].decision == "fail"  # one source
    decision, check = live(pd.concat([acme, globex]))
    assert (decision, check.decision, check.blocks_pass) == ("wait", "wait", True), check.sentence
    assert "held, nothing passes: tenant 'acme' (50% of the labels) saw a drop of +2.00 pp where the " in (
        check.sentence
    )
    assert "other saw +2.00 pp, and without its labels the canary is not shown worse" in check.sentence
    assert check.ci is None  # no estimate more labels resolve
    assert check.p_value is None  # no test decided it: a p below the level no longer means a failure
    assert "Check that tenant's labels (its feedback key or gateway identity can be revoked)" in check.sentence
    five = pd.concat([tenant_labels(f"t{i}", 600, (576, 564)) for i in range(5)])
    decision, check = live(five)  # each four of them show it: it stands
    assert (decision, check.decision, check.blocks_pass) == ("fail", "fail", False), check.sentence


def test_a_held_tenants_share_of_the_labels_is_never_rounded_to_all_of_them():
    """A tenant of 99.8% of the labels read "100% of the canary's labels": all of them, while another
    tenant's labels are what holds it. Its share is of both arms' labels (one arm's only may decide)."""
    decision, check = live(
        pd.concat([tenant_labels("acme", 4990, (4790, 4540)), tenant_labels("globex", 10, (10, 10))])
    )
    assert (decision, check.blocks_pass) == ("wait", True), check.sentence
    assert "tenant 'acme' (over 99% of the labels) saw a drop of +5.01 pp where the other saw +0.00 pp" in (
        check.sentence
    )


def test_a_hold_leads_the_gates_reason_whatever_else_waits():
    """The verdict's summary keeps three waiting checks' sentences, in check order: with latency,
    errors and OOM waiting, the live check's hold (the tenant it names) was cut from the reason
    a rollback reports. A hold leads it."""
    rng = np.random.default_rng(1)
    df = pd.concat([tenant_labels("acme", 800, (768, 752)), tenant_labels("globex", 800, (768, 752))])
    df = df.assign(latency_ms=rng.lognormal(1.5, 1.0, len(df)), error=(rng.random(len(df)) < 0.01) * 1.0, oom=0.0)
    v = evaluate_gate(df)
    waiting = [c.name for c in v.checks if c.decision == "wait" and c.blocks_pass]
    assert waiting == ["latency_geomean", "errors", "oom", "accuracy_live"], waiting
    assert v.summary.startswith("WAIT at look 1 of 1 (latency's one-sided level 0.05): Live accuracy from feedback:")
    assert "held, nothing passes: tenant 'acme'" in v.summary


def test_one_tenants_labels_neither_fail_a_canary_nor_hide_its_drop():
    """A client holds the feedback token of each answer it got: one tenant labelling the canary's
    answers wrong must not roll back an equal canary, and one labelling the baseline's answers
    wrong (the canary's right) must not hide a canary the others show worse: on main it did (no
    fail; the check left a tenant out only where it failed). A moderate lie is no outlier (it
    reads as a canary worse on that tenant's images), so either holds the stage, named."""
    equal = pd.concat([tenant_labels("acme", 2000, (1920, 1920)), tenant_labels("globex", 2000, (1920, 1920))])
    for mallory, said in [
        (tenant_labels("mallory", 300, (0, 0), arms=("canary",)), "labelled only the canary's answers"),
        (tenant_labels("mallory", 300, (300, 0)), "saw a drop of +100.00 pp where the others saw +0.00 pp"),
        (tenant_labels("mallory", 1500, (1440, 1350)), "saw a drop of +6.00 pp where the others saw +0.00 pp"),
    ]:
        assert live(pd.concat([equal, mallory]).assign(labelled_by=None))[1].decision == "fail"  # one source
        decision, check = live(pd.concat([equal, mallory]))
        assert (decision, check.decision, check.blocks_pass) == ("wait", "wait", True), check.sentence
        assert "held, nothing passes: tenant 'mallory' (" in check.sentence
        assert f"of the labels) {said}, and without its labels the canary is not shown worse" in (check.sentence)
    worse = pd.concat([tenant_labels("acme", 800, (768, 752)), tenant_labels("globex", 800, (768, 752))])
    worse = pd.concat([worse, tenant_labels("initech", 800, (768, 752))])
    hiding = tenant_labels("mallory", 600, (0, 600))
    assert live(worse)[1].decision == "fail"
    assert live(pd.concat([worse, hiding]).assign(labelled_by=None))[1].decision != "fail"  # hidden as one source
    decision, check = live(pd.concat([worse, hiding]))
    assert (decision, check.decision, check.blocks_pass) == ("wait", "wait", True), check.sentence
    assert "tenant 'mallory' (20% of the labels) saw a drop of -100.00 pp where the others saw +2.00 pp, and " in (
        check.sentence
    )
    assert "without its labels the canary is shown worse" in check.sentence


def test_labels_of_no_tenant_are_one_source_apart_from_any_tenants_name():
    """Labels naming no tenant are one source; a tenant named "(no tenant)" (what main called them)
    or 1 and "1" are no others' labels."""
    unnamed = tenant_labels(None, 800, (768, 752))
    named = tenant_labels("(no tenant)", 800, (768, 752))
    decision, check = live(pd.concat([unnamed, named]))
    assert (decision, check.blocks_pass) == ("wait", True), check.sentence  # two sources, each too few alone
    assert "labels of no tenant (50% of the labels)" in check.sentence or (
        "tenant '(no tenant)' (50% of the labels)" in check.sentence
    )
    as_int = tenant_labels("1", 800, (768, 752)).assign(labelled_by=1)
    assert live(pd.concat([as_int, tenant_labels("1", 800, (768, 752))]))[1].decision == "fail"  # one tenant


def test_the_live_check_keeps_its_error_rate_with_tenants_and_their_power():
    """Over 10 looks of clustered labels (requests of 8 images), honest tenants: a canary exactly
    at the margin fails at most alpha with 2 and 5 tenants, and an equal one is held at its last
    look in few rollouts; a canary 2 pp worse is failed or held (a rollback either way) about as
    often as one source fails it (on main, 2 tenants failed it in 3% of these rollouts where one
    source failed it in 33%, and held none)."""
    cfg, looks, requests, batch = GateConfig(), 10, 300, 8
    rng = np.random.default_rng(3)
    counts = {}
    for drop, tenants, sims in [
        (cfg.accuracy_margin, 2, 200),
        (cfg.accuracy_margin, 5, 200),
        (0.0, 2, 100),
        (0.02, 2, 80),
    ]:
        ended = {"tenants": [], "one source": []} if drop > cfg.accuracy_margin else {"tenants": []}
        for _ in range(sims):
            y = [batch_requests(rng, requests, batch, 0.3, 0.96 - d) for d in (0.0, drop)]
            by = [rng.integers(tenants, size=requests).astype(str) for _ in range(2)]
            for how, out in ended.items():
                for k in range(1, looks + 1):
                    r = requests * k // looks
                    df = pd.DataFrame(
                        {
                            "arm": np.repeat(["baseline", "canary"], r * batch),
                            "correct": np.r_[y[0][:r].ravel(), y[1][:r].ravel()],
                            "cluster": np.r_[np.repeat(np.arange(r), batch), np.repeat(np.arange(r) + requests, batch)],
                            "labelled_by": np.r_[np.repeat(by[0][:r], batch), np.repeat(by[1][:r], batch)]
                            if how == "tenants"
                            else None,
                        }
                    )
                    check = live_accuracy_check(df, cfg, nominal_alpha(cfg.alpha, k, looks))
                    if check.decision == "fail":
                        break
                out.append("fail" if check.decision == "fail" else "held" if check.blocks_pass else "not")
        counts[(drop, tenants)] = {
            how: {d: out.count(d) / sims for d in ("fail", "held")} for how, out in ended.items()
        }
    bound = cfg.alpha + 3 * math.sqrt(cfg.alpha * (1 - cfg.alpha) / 200)
    assert counts[(cfg.accuracy_margin, 2)]["tenants"]["fail"] < bound, counts
    assert counts[(cfg.accuracy_margin, 5)]["tenants"]["fail"] < bound, counts
    equal = counts[(0.0, 2)]["tenants"]  # (held in about 3% of such rollouts: BENCHMARKS.md)
    assert equal["fail"] + equal["held"] < cfg.alpha + 3 * math.sqrt(cfg.alpha * (1 - cfg.alpha) / 100), counts
    worse = counts[(0.02, 2)]
    assert worse["tenants"]["fail"] + worse["tenants"]["held"] >= 0.8 * worse["one source"]["fail"] > 0.15, counts


def batch_requests(rng: np.random.Generator, requests: int, batch: int, rho: float, accuracy: float) -> np.ndarray:
    """[requests, batch] correctness, a request's items sharing a beta effect of correlation ``rho``."""
    s = (1 - rho) / rho
    p = rng.beta(accuracy * s, (1 - accuracy) * s, requests)
    return (rng.random((requests, batch)) < p[:, None]).astype(float)


@pytest.mark.parametrize(
    ("column", "value", "said"),
    [
        ("latency_ms", math.inf, "latency_ms must be positive and finite"),
        ("latency_ms", -3.0, "latency_ms must be positive and finite"),
        ("latency_ms", 0.0, "latency_ms must be positive and finite"),
        ("error", math.inf, "error must be 0 or 1"),
        ("error", 5.0, "error must be 0 or 1"),
        ("error", -1.0, "error must be 0 or 1"),
        ("oom", 2.0, "oom must be 0 or 1"),
        ("correct", 3.0, "correct must be 0 or 1"),
        ("correct", -math.inf, "correct must be 0 or 1"),
    ],
)
def test_values_no_check_can_read_are_refused_with_their_column(column, value, said):
    """An Inf latency made every latency interval NaN, a wait that no sample resolves; an error
    of 5 counted five errors, an Inf one raised OverflowError, a negative one 'math domain
    error'. Each is refused, naming the column (rolloutctl gate's usage error)."""
    df = samples(3000).astype({"error": float}).assign(oom=0.0, correct=1.0)
    df.loc[7, column] = value
    with pytest.raises(ValueError, match=said):
        evaluate_gate(df)
    df.loc[7, column] = np.nan  # none: no answer, no request of its own, no label
    assert evaluate_gate(df).decision == "pass"


@pytest.mark.parametrize(
    ("xb", "nb", "xc", "nc", "look"),
    [(0, 300, 5, 300, 9), (0, 300, 6, 300, 7), (0, 2000, 8, 2000, 6), (1, 1000, 9, 1000, 7), (30, 3000, 45, 3000, 10)],
)
def test_a_proportion_checks_p_value_is_the_test_it_decided_on(xb, nb, xc, nc, look):
    """The error check's p-value was Fisher's exact (or a z) test of any excess at all, against 0,
    while the check decides on Newcombe's interval against the margin: a check failed at look 9
    (level 0.029) reported p 0.031 on the rollback's "p-value" field, and one that waited at look 6
    (level 0.0096) p 0.0039. It is the margin's test now, the interval's own: below the look's
    level exactly when the check fails."""
    level = nominal_alpha(0.05, look, 10)
    for margin in (0.001, 0.005, 0.01):
        check = proportion_check("errors", "Error rate", True, xb, nb, xc, nc, margin, GateConfig(), level)
        assert (check.p_value < level) == (check.decision == "fail"), (margin, check.p_value, check.sentence)
        assert f"one-sided p that the canary is worse than the {margin * 100:g} pp margin" in check.sentence
    lost = proportion_check("accuracy_live", "Live accuracy", False, xc, nc, xb, nb, 0.001, GateConfig(), level)
    assert (lost.p_value < level) == (lost.decision == "fail"), lost.sentence


@pytest.mark.parametrize(("b", "c"), [(12, 0), (25, 5), (40, 2), (3, 3)])
def test_the_paired_accuracy_checks_p_value_is_the_test_it_decided_on(b, c):
    """The paired check reported the exact McNemar p of any drop at all (12 images lost of 2000:
    p 0.00024, beside a check that waited: a 0.6 pp drop is not shown beyond the 0.5 pp margin).
    Its p-value is Tango's score test against the margin now, the test that decides; McNemar's
    stays in the sentence, named for what it tests."""
    n = 2000
    pairs = pd.DataFrame(
        {
            "baseline": np.r_[np.ones(b), np.zeros(c), np.ones(n - b - c)].astype(int),
            "canary": np.r_[np.zeros(b), np.ones(c), np.ones(n - b - c)].astype(int),
        }
    )
    for look in (1, 5, 10):
        level = nominal_alpha(0.05, look, 10)
        check = paired_accuracy_check(pairs, GateConfig(), level)
        assert (check.p_value < level) == (check.decision == "fail"), (look, check.p_value, check.sentence)
        assert "exact McNemar one-sided p of any drop" in check.sentence


def crossings(rng: np.random.Generator, c: np.ndarray, looks: int, sims: int) -> np.ndarray:
    """Per simulated window, whether the score process of a canary at the margin (Brownian motion
    under H0, at information fractions k/K) crossed the first ``looks`` of the boundaries ``c``."""
    z = np.cumsum(rng.standard_normal((sims, len(c))), axis=1) / np.sqrt(np.arange(1, len(c) + 1))
    return (z[:, :looks] >= c[:looks]).any(axis=1)


@pytest.mark.parametrize("spending", ["obrien-fleming", "pocock"])
def test_windows_moved_and_restarts_keep_the_wrong_pass_rate_where_the_report_says(spending):
    """A stage applied again long after its window started (its run cleared), its test undecided,
    judges further looks on a window from then at the alpha its earlier looks left
    (``Attempt.move_window``): the chance that any window passes a candidate at the margin stays
    within alpha, here with windows moved after 9 of 10 looks, twice. Judged at the full alpha
    again, it would not (the simulation can tell: 0.087). A restart asked for
    (``rolloutctl restart-stage``) is a fresh test: n attempts pass it with at most
    ``attempts.chance(alpha, n)``, the probability the stage's report names."""
    from vision_rollout.attempts import Attempt, chance

    rng = np.random.default_rng(23)
    sims, alpha, K, j = 40_000, 0.05, 10, 9
    mc = 3 * math.sqrt(alpha * (1 - alpha) / sims)
    attempt = Attempt(0.0)
    passed = np.zeros(sims, dtype=bool)
    for window in range(3):
        c = np.array(boundaries(alpha * attempt.level, K, spending))
        passed |= crossings(rng, c, K if window == 2 else j, sims)
        attempt.look = j
        attempt.move_window(float(window + 1), alpha, K, spending)
    assert passed.mean() <= alpha + mc
    assert 0 < attempt.level < 1
    full = np.array(boundaries(alpha, K, spending))
    unspent = crossings(rng, full, j, sims) | crossings(rng, full, K, sims)
    assert unspent.mean() > alpha + 2 * mc  # what moving at the full alpha again would do
    for n in (2, 3):
        fresh = np.zeros(sims, dtype=bool)
        for _ in range(n):
            fresh |= crossings(rng, full, K, sims)
        bound = chance(alpha, n)
        assert fresh.mean() <= bound + 3 * math.sqrt(bound * (1 - bound) / sims)


@pytest.mark.parametrize("spending", ["obrien-fleming", "pocock"])
def test_looks_judged_at_the_information_seen_keep_the_wrong_pass_rate_whatever_the_traffic(spending):
    """The boundaries took look k of K to hold k/K of the stage's information: traffic rising from
    1x at the first look to 3x at the last passed a canary at the margin in 0.056 of the stages
    (Pocock 0.057) at alpha 0.05, the looks' statistics less correlated than the boundaries
    assumed. Each look's level is computed from the information its looks 1..k saw now
    (``nominal_alpha(..., information)``, as ``judge_stage`` passes it): within alpha under
    rising, steady and falling traffic, and with a look interval without any."""
    rng = np.random.default_rng(31)
    sims, alpha, K = 200_000, 0.05, 10
    mc = 3 * math.sqrt(alpha * (1 - alpha) / sims)

    def wrong_passes(seen: np.ndarray, levels: list[float]) -> float:
        """Per simulated stage, whether the score of a canary at the margin (Brownian motion in the
        samples per arm ``seen`` at each look) crossed a look's boundary."""
        gained = np.diff(seen, prepend=0)
        z = np.cumsum(rng.standard_normal((sims, K)) * np.sqrt(gained), axis=1) / np.sqrt(seen)
        return float((z >= stats.norm.isf(levels)).any(axis=1).mean())

    rising = np.cumsum(np.round(100 * np.linspace(1, 3, K)))
    for rate in (np.linspace(1, 3, K), np.ones(K), np.linspace(3, 1, K), np.r_[np.ones(4), 0, np.ones(5)]):
        seen = np.cumsum(np.round(100 * rate))
        levels = [nominal_alpha(alpha, k, K, spending, tuple(seen[:k])) for k in range(1, K + 1)]
        passed = wrong_passes(seen, levels)
        assert passed <= alpha + mc, (rate, passed)
        if rate.min() > 0:  # the boundaries are exact: not conservative either
            assert passed >= alpha - mc, (rate, passed)
    calendar = [nominal_alpha(alpha, k, K, spending) for k in range(1, K + 1)]
    assert wrong_passes(rising, calendar) > alpha + 2 * mc  # what the looks at k/K did under rising traffic


def test_each_check_is_judged_at_its_own_information_and_keeps_the_wrong_pass_rate():
    """Every check's boundary was computed at the latency checks' information (the smaller arm's
    live latencies), while the error and OOM checks also count the validation replay's rows,
    whose rounds come at a steady pace: with live traffic falling from 3x to 1x through the
    stage beside them, the error check passed a canary at the margin in 0.054 of the stages at
    alpha 0.05. Each check's level is now computed at the information it counts
    (``look_information``, ``check_information``), as ``evaluate_gate`` judges it."""
    rng = np.random.default_rng(11)
    sims, alpha, K = 200_000, 0.05, 10
    mc = 3 * math.sqrt(alpha * (1 - alpha) / sims)
    live = np.round(100 * np.linspace(3, 1, K)).astype(int)  # per look and arm; the replay 400 a look

    def look(k: int) -> pd.DataFrame:
        n, r = int(live[:k].sum()), 400 * k
        rows = {"source": ["live"] * n + ["replay"] * r, "latency_ms": 5.0, "error": 0.0}
        return pd.concat([pd.DataFrame({**rows, "arm": arm}) for arm in ("baseline", "canary")])

    seen = tuple(look_information(look(k), "live") for k in range(1, K + 1))
    requests = np.array(check_information("errors", seen), dtype=float)
    assert requests.tolist() == (np.cumsum(live) + 400 * np.arange(1, K + 1)).tolist()
    verdict = evaluate_gate(look(4), {"error_margin": 0.01}, 4, K, latency_from="live", information=seen[:4])
    errors = next(c for c in verdict.checks if c.name == "errors")
    level = nominal_alpha(alpha, 4, K, "obrien-fleming", check_information("errors", seen[:4]))
    assert f"(this look's level {level:.3g})" in errors.sentence
    assert verdict.nominal_alpha == nominal_alpha(alpha, 4, K, "obrien-fleming", tuple(s.latency for s in seen[:4]))

    gained = np.diff(requests, prepend=0)  # the error check's score: Brownian motion in its requests
    z = np.cumsum(rng.standard_normal((sims, K)) * np.sqrt(gained), axis=1) / np.sqrt(requests)

    def wrong_passes(measure: str) -> float:
        levels = [
            nominal_alpha(alpha, k, K, "obrien-fleming", check_information(measure, seen[:k])) for k in range(1, K + 1)
        ]
        return float((z >= stats.norm.isf(levels)).any(axis=1).mean())

    assert abs(wrong_passes("errors") - alpha) <= mc
    assert wrong_passes("latency_geomean") > alpha + 2 * mc  # the latency checks' information: 0.054


@pytest.mark.parametrize("spending", ["obrien-fleming", "pocock"])
def test_each_looks_boundary_is_the_one_the_later_looks_assume(spending):
    """A look's boundary is solved at that look, on the information of looks 1..k; the later looks'
    recursions take it as given. A look without new traffic counted as adding ``NO_GAIN`` of the
    k-th look's mean, which moved with k: the stalled looks' times, so their boundaries, were not
    the ones judged (Pocock, looks 2 to 5 stalled at 100 then 5,000 a look: 0.26 apart), and
    the procedure the recursion held within alpha was not the one run. Now each look's time
    rests on its own looks alone, looks without any information before the first with some too."""
    K = 10
    for seen in (
        (100, 100, 100, 100, 100, 5000, 10000, 15000, 20000, 25000),
        (50, 50, 50, 50, 1000, 2000, 3000, 4000, 5000, 6000),
        (1, 1, 1, 1, 1, 1, 1, 1, 1, 10000),
        (0, 0, 300, 300, 900, 1200, 1200, 1500, 1800, 2100),
    ):
        whole = boundaries(0.05, K, spending, seen)
        for k in range(1, K + 1):
            judged = boundaries(0.05, K, spending, seen[:k])[-1]
            assert judged == pytest.approx(whole[k - 1], abs=1e-6), (seen, k)


def test_latencies_tied_in_their_middle_still_have_a_spread():
    """Yuen's winsorized variance is 0 when the middle 60% of an arm's latencies tie (a coarse
    clock, a constant-time path), not only when all do: the check then decided at once on a
    zero-width interval, a canary 3% slower on its slow fifth passed with "resolve differences of
    about +0%". An arm whose winsorized variance is 0 but whose values differ keeps the spread of
    its plain mean, so the interval has a width and such a check waits for evidence."""
    rng = np.random.default_rng(7)
    base = np.where(rng.random(400) < 0.7, 2.0, rng.uniform(1.0, 3.0, 400))
    canary = np.where(rng.random(400) < 0.7, 2.0, rng.uniform(1.0, 3.6, 400))
    check = latency_check(base, canary, GateConfig(), nominal_alpha(0.05, 1, 10))
    assert check.ci[1] > check.ci[0]
    assert check.statistic is not None
    assert check.decision == "wait"
