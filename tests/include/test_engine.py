"""The rollout engine on prediction-log records made here: looks, evidence, verdicts."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import pytest

from model_server.traffic import TrafficPolicy
from tests.support import TOKEN, one_hours_t0
from vision_rollout.audit import AuditResult
from vision_rollout.engine import (
    Rollout,
    StageState,
    StageWindow,
    final_look_time,
    judge_stage,
    preflight,
    replay_drop,
    stage_samples,
)
from vision_rollout.gates import (
    GateConfig,
    GuardInputs,
    Information,
    information,
    look_information,
    nominal_alpha,
    paired_accuracy_check,
)
from vision_rollout.spec import RolloutSpec

T0 = 1_800_000_000.0
IMAGES = {f"{i:064x}": i % 10 for i in range(500)}  # sha256 -> label


def spec(**kw) -> RolloutSpec:
    return RolloutSpec.from_dict(
        {
            "stages": [50, 100],
            "bake_seconds": 100,
            "max_stage_seconds": 400,
            "looks_per_stage": 5,
            "min_samples": 50,
            # 500 images both versions answer alike resolve a 2 pp margin, not the default 0.5 pp
            "accuracy_margin": 0.02,
            **kw,
        }
    )


def records(
    seconds: float,
    rate: float,
    weight: int,
    ratio: float = 1.0,
    errors: tuple[float, float] = (0.0, 0.0),
    accuracy: tuple[float, float] = (1.0, 1.0),
    replay_every: float | None = 10.0,
    seed: int = 0,
    start: float = T0,
) -> pd.DataFrame:
    """Primary records of versions 1 and 2: live at ``rate``/s split by ``weight``, and a replay
    of every image through both versions every ``replay_every`` seconds."""
    rng = np.random.default_rng(seed)
    rows = []
    n = int(seconds * rate)
    times = start + np.sort(rng.uniform(0, seconds, n))
    for i, t in enumerate(times):
        canary = rng.uniform(0, 100) < weight
        v = "2" if canary else "1"
        err = rng.random() < errors[int(canary)]
        rows.append(
            {
                "time": t,
                "version": v,
                "route": "route",
                "request_id": f"live-{i}",
                "latency_ms": float(np.exp(rng.normal(np.log(5 * (ratio if canary else 1)), 0.3))),
                "outcome": "BACKEND" if err else "ok",
                "top1": None if err else 1,
                "image_sha256": "x" * 64,
            }
        )
    if replay_every:
        for r, t in enumerate(np.arange(start + 0.5, start + seconds, replay_every)):
            for j, (sha, label) in enumerate(IMAGES.items()):
                for arm, v in enumerate(("1", "2")):
                    right = (j / len(IMAGES)) < accuracy[arm]
                    rows.append(
                        {
                            "time": t + 0.001 * j,
                            "version": v,
                            "route": "version",
                            "request_id": f"replay-{r}-{arm}-{j}",
                            "latency_ms": float(np.exp(rng.normal(np.log(5), 0.3))),
                            "outcome": "ok",
                            "top1": label if right else (label + 1) % 10,
                            "image_sha256": sha,
                        }
                    )
    df = pd.DataFrame(rows)
    df["model"], df["role"], df["item"], df["label"] = "digits", "primary", 0, np.nan
    df["time"] = pd.to_datetime(df["time"], unit="s", utc=True)
    return df


def labels_for(df: pd.DataFrame, truth: int) -> pd.DataFrame:
    live = df[df["route"] == "route"]
    return pd.DataFrame(
        {
            "time": live["time"],
            "model": "digits",
            "version": None,
            "role": "label",
            "route": None,
            "request_id": live["request_id"],
            "item": 0,
            "latency_ms": np.nan,
            "outcome": None,
            "top1": None,
            "image_sha256": None,
            "label": float(truth),
        }
    )


WINDOW = StageWindow(0, 50, T0)


def test_a_look_sees_only_the_records_before_its_time():
    log = records(200, 20, 50)
    early = stage_samples(log, spec(), WINDOW, T0 + 20, IMAGES)
    assert early["time"].max() < T0 + 20
    assert set(early["source"]) == {"live", "replay"}
    # Two replay rounds (0.5 s and 10.5 s) before 20 s: each image twice per version.
    assert (early["source"] == "replay").sum() == 4 * len(IMAGES)


def test_a_late_poke_judges_the_same_looks_to_the_same_verdicts():
    log = records(400, 20, 50, replay_every=20)
    s = spec()
    at_look_3 = judge_stage(s, WINDOW, log[log["time"] < pd.Timestamp(T0 + 66, unit="s", tz="UTC")], IMAGES, T0 + 66)
    later = judge_stage(s, WINDOW, log, IMAGES, T0 + 66)  # records after the poke's time are ignored too
    assert at_look_3.look == later.look == 3
    assert at_look_3.verdict.to_dict() == later.verdict.to_dict()


def test_each_look_is_judged_at_the_information_its_looks_saw():
    """A stage whose traffic rose (a quarter of it in its first 60 s): its looks were judged at the
    levels of looks holding k/K of the information each, which passed a canary at the margin more
    often than alpha. Each look's level is the boundary of the information looks 1..k saw now,
    the samples of the smaller arm of its latency evidence (``information``); the error check's,
    at every request the validation replay's included, not at the latencies."""
    s = spec()
    log = records(100, 40, 50, seed=3)
    early = (log["route"] == "route") & (log["time"] < pd.Timestamp(T0 + 60, unit="s", tz="UTC"))
    log = log[~(early & (np.random.default_rng(0).random(len(log)) < 0.7))]
    state = judge_stage(s, WINDOW, log, IMAGES, T0 + 200)
    assert state.status == "pass"
    assert 1 < state.look < s.looks_per_stage
    assert state.until == WINDOW.look_time(s, state.look)  # (the deciding look's records: the report's chart)
    seen = tuple(
        information(stage_samples(log, s, WINDOW, WINDOW.look_time(s, k), IMAGES), "live")
        for k in range(1, state.look + 1)
    )
    assert seen[0] * state.look < 0.75 * seen[-1]  # (the first look far short of its share)
    level = nominal_alpha(s.alpha, state.look, s.looks_per_stage, s.spending, seen)
    assert state.verdict.nominal_alpha == level
    assert level < nominal_alpha(s.alpha, state.look, s.looks_per_stage, s.spending)
    # The error check's at its own information: every request, the validation replay's included.
    requests = tuple(
        look_information(stage_samples(log, s, WINDOW, WINDOW.look_time(s, k), IMAGES), "live").requests
        for k in range(1, state.look + 1)
    )
    assert requests[-1] > seen[-1]
    errors = next(c for c in state.verdict.checks if c.name == "errors")
    errors_level = nominal_alpha(s.alpha, state.look, s.looks_per_stage, s.spending, requests)
    assert f"(this look's level {errors_level:.3g})" in errors.sentence
    assert f"{errors_level:.3g}" != f"{level:.3g}"


def test_an_equal_canary_passes_and_bakes_before_the_stage_passes():
    s = spec()
    log = records(400, 40, 50)
    mid = judge_stage(s, WINDOW, log, IMAGES, T0 + 85)
    assert mid.status == "waiting"
    assert mid.verdict is not None
    assert mid.verdict.decision == "pass"
    assert "baking until 100 s" in mid.reason
    end = judge_stage(s, WINDOW, log, IMAGES, T0 + 106)
    assert end.status == "pass"
    assert end.look <= 5
    assert end.served["canary"]["live"] > 1000


def test_a_slower_canary_fails_at_the_first_look_that_shows_it():
    state = judge_stage(spec(), WINDOW, records(400, 40, 50, ratio=1.3), IMAGES, T0 + 400)
    assert state.status == "fail"
    assert state.look < 5  # the late poke stopped at the first deciding look, not the last
    assert any(c.name == "latency_geomean" and c.decision == "fail" for c in state.verdict.checks)


def test_an_undecided_last_look_ends_the_stage_with_the_samples_it_needs():
    s = spec(latency_margin=0.01)  # finer than this traffic resolves
    state = judge_stage(s, WINDOW, records(400, 10, 50, replay_every=None), IMAGES, T0 + 300, replay_images=0)
    assert state.status == "undecided"
    assert state.look == 5
    assert "undecided at its last look (5 of 5" in state.reason
    assert "samples per arm would resolve it" in state.reason


@pytest.mark.parametrize("spending", ["obrien-fleming", "pocock"])
def test_the_samples_a_wait_names_resolve_it_at_the_last_looks_level_as_the_procedure_computes_it(spending):
    """A wait names the samples per arm that would resolve its estimate at the last look, whose
    boundary the procedure computes at the information of every look (``boundaries``). The need
    was reckoned at the level of equal increments (k/K): where the last look holds most of the
    stage's information (30 samples a look for 9 looks, then a busy hour), that level was more
    lenient than the last look's, and the need it named (793 per arm, O'Brien-Fleming) still
    waited there. Judged by the procedure's own gate at the need, the looks ahead at a steady
    pace: resolved, and not at 1% fewer."""
    from scipy import stats

    from vision_rollout.engine import need_n, steady_information
    from vision_rollout.gates import evaluate_gate, latency_check

    def arms(n: int) -> pd.DataFrame:  # a canary 2% slower, its latencies spread as the baseline's
        z = stats.norm.ppf((np.arange(n) + 0.5) / n)
        latency = np.r_[np.exp(np.log(5) + 0.3 * z), np.exp(np.log(5.1) + 0.3 * z[::-1])]
        return pd.DataFrame({"arm": ["baseline"] * n + ["canary"] * n, "latency_ms": latency, "error": 0})

    s = RolloutSpec.from_dict({"looks_per_stage": 10, "error_margin": 0.05, "min_samples": 10, "spending": spending})

    def info(seen: tuple[float, ...]) -> tuple[Information, ...]:  # (each request a latency, no labels)
        return tuple(Information(n, n, 0) for n in seen)

    seen = tuple(range(30, 271, 30))
    waiting = evaluate_gate(arms(seen[-1]), GateConfig.from_spec(s), 9, 10, information=info(seen))
    assert [c.name for c in waiting.checks if c.decision == "wait"] == ["latency_geomean"]
    n = need_n(waiting, s, info(seen))

    def last_look(m: int) -> str:
        return evaluate_gate(
            arms(m), GateConfig.from_spec(s), 10, 10, information=info(steady_information(seen, 10, m))
        ).decision

    assert last_look(n) == "pass", n
    assert last_look(int(0.99 * n)) == "wait", n
    # And on fresh samples of a canary truly 2% slower: at the need, the last look's check passes
    # it half the time (the estimate resolved as often as not), within Monte Carlo error; at
    # the need of equal increments, 0.35.
    rng, sims = np.random.default_rng(5), 400
    level = nominal_alpha(s.alpha, 10, 10, spending, steady_information(seen, 10, n))
    passed = np.mean(
        [
            latency_check(
                rng.lognormal(np.log(5), 0.3, n), rng.lognormal(np.log(5.1), 0.3, n), GateConfig(), level
            ).decision
            == "pass"
            for _ in range(sims)
        ]
    )
    assert abs(passed - 0.5) <= 3 * np.sqrt(0.25 / sims), passed


def test_a_waiting_looks_need_is_reckoned_once_and_kept_for_its_other_pokes(monkeypatch, tmp_path):
    """``need_n`` took about a second of CPU per waiting poke (the boundaries of every look ahead,
    a few rounds, per information measure), reckoned again at every poke of a look from the same
    inputs: the DAG's pokes each run in a process of their own, on any worker, so nothing in a
    process's memory keeps it. The stage's needs are kept with its record in the run folder
    (``Attempt.reckoned``) and given to the judge: a need of the same inputs is taken from there,
    not reckoned; one of other inputs (the next look's) is reckoned and replaces it. Kept or
    reckoned, the same need."""
    import json

    from vision_rollout import attempts, engine
    from vision_rollout.folders import Folder

    def need(state: StageState) -> str:  # (the rest of the reason moves with the poke's time: the rate)
        return state.reason.split(" would resolve it")[0]

    def need_of(reckoned: dict) -> dict:  # (the looks' levels are floats)
        return {k: v for k, v in reckoned.items() if not isinstance(v, float)}

    reckoned = []
    reckon = engine._reckoned_need
    monkeypatch.setattr(engine, "_reckoned_need", lambda *a: reckoned.append(a[2]) or reckon(*a))
    s = spec(latency_margin=0.01)  # finer than this traffic resolves: every look waits
    log = records(400, 10, 50, replay_every=None)
    at = T0 + 45  # look 2 of 5 judged
    fresh = judge_stage(s, WINDOW, log, IMAGES, at, replay_images=0)
    assert (fresh.status, fresh.look) == ("waiting", 2)
    assert "samples per arm would resolve it" in fresh.reason
    assert len(reckoned) == 1
    # The first poke of the look reckons it and the stage's record keeps it (the run folder).
    folder = Folder(str(tmp_path))
    record, attempt = attempts.judged(folder, "run", 0, WINDOW.started, "try-1")
    needs = dict(attempt.reckoned)
    first = judge_stage(s, WINDOW, log, IMAGES, at + 1, replay_images=0, reckoned=needs)
    assert len(reckoned) == 2
    attempts.looked(folder, record, attempt, first.look, needs)
    kept = attempts.load(folder, "run", 0).attempt(WINDOW.started).reckoned
    assert kept == needs
    assert len(need_of(kept)) == 1  # (beside the looks' levels)
    assert json.loads(json.dumps(kept)) == kept
    # Its other pokes, on any worker: taken from the record, not reckoned.
    for poke in (at + 2, at + 8):
        again = judge_stage(s, WINDOW, log, IMAGES, poke, replay_images=0, reckoned=dict(kept))
        assert need(again) == need(first) == need(fresh)
    assert len(reckoned) == 2
    # The next look: reckoned on its own information, and its need takes the earlier one's place.
    later = dict(kept)
    nxt = judge_stage(s, WINDOW, log, IMAGES, at + 20, replay_images=0, reckoned=later)
    assert nxt.look == 3
    assert len(reckoned) == 3
    assert len(reckoned[-1]) == 3
    assert len(need_of(later)) == 1
    assert need_of(later).keys() != need_of(kept).keys()
    assert nxt.reason == judge_stage(s, WINDOW, log, IMAGES, at + 20, replay_images=0).reason
    assert need(nxt) != need(first)


def test_a_waiting_looks_need_is_kept_while_a_hard_guard_holds_and_its_p99_moves(monkeypatch):
    """The need's key digested every waiting check's numbers, a holding P99 guard's too, whose
    effect (the canary's current P99) moves at every poke, though the need reads no check
    without an estimate: while the guard held, every poke missed the kept need, reckoned it
    again (about a second of CPU) and rewrote the stage's record. Two pokes of the same look
    whose only difference is the guard's P99 now reckon it once, and name the same need."""
    from vision_rollout import engine

    reckoned = []
    reckon = engine._reckoned_need
    monkeypatch.setattr(engine, "_reckoned_need", lambda *a: reckoned.append(a[2]) or reckon(*a))
    s = spec(latency_margin=0.01)  # finer than this traffic resolves: every look waits
    log = records(400, 10, 50, replay_every=None)
    limit = GateConfig.from_spec(s).p99_ms_max

    def guards(p99: float) -> GuardInputs:  # (above the limit at its last point only: held, not breached)
        return GuardInputs(p99_series_ms=(*((T0 + t, limit / 2) for t in range(0, 40, 10)), (T0 + 40, p99)))

    kept: dict = {}
    states = [
        judge_stage(s, WINDOW, log, IMAGES, T0 + 45, guards(p99), replay_images=0, reckoned=kept)
        for p99 in (limit + 10, limit + 12.5)
    ]
    guard = [next(c for c in state.verdict.checks if c.name == "guard_p99") for state in states]
    assert [(c.decision, c.effect) for c in guard] == [("wait", limit + 10), ("wait", limit + 12.5)]
    assert [(state.status, state.look) for state in states] == [("waiting", 2)] * 2
    assert len(reckoned) == 1
    fresh = judge_stage(s, WINDOW, log, IMAGES, T0 + 45, guards(limit + 12.5), replay_images=0)  # (nothing kept)
    need = [state.reason.split(" would resolve it")[0] for state in (*states, fresh)]
    assert need[0] == need[1] == need[2]
    assert need[0].endswith(" samples per arm")


def test_a_looks_levels_are_reckoned_once_and_kept_for_the_stages_next_pokes(monkeypatch, tmp_path):
    """Each poke judges every look so far again, each at the level of its boundary, for each
    information measure (``nominal_alpha``: the group-sequential recursion over looks 1..k, a
    grid x grid step per look): about 1 s of CPU a poke at look 10 of 12 beside a stored need,
    reckoned again at every poke (each a process of its own, on any worker: ``boundaries``'
    lru_cache never holds it). The stage's record keeps the levels (``Attempt.reckoned``, by a
    digest of their inputs): each is reckoned once, at its look's first poke, and the verdicts
    are the same, kept or reckoned afresh."""
    from vision_rollout import attempts, gates
    from vision_rollout.folders import Folder

    reckoned: list[tuple] = []
    uncached = gates.boundaries.__wrapped__
    monkeypatch.setattr(gates, "boundaries", lru_cache(maxsize=256)(lambda *a: reckoned.append(a) or uncached(*a)))
    s = spec(latency_margin=0.01)  # finer than this traffic resolves: every look waits
    log = records(400, 10, 50, errors=(0.01, 0.01), replay_every=None)
    log = pd.concat([log, labels_for(log, 1).iloc[::3]], ignore_index=True)  # (three measures apart)
    folder = Folder(str(tmp_path))
    record, attempt = attempts.judged(folder, "run", 0, WINDOW.started, "try-1")

    def poke(now: float) -> StageState:  # (as the DAG's: the stage's record read, judged, written)
        gates.boundaries.cache_clear()  # (a process of its own)
        kept = dict(attempts.load(folder, "run", 0).attempt(WINDOW.started).reckoned)
        state = judge_stage(s, WINDOW, log, IMAGES, now, replay_images=0, reckoned=kept)
        attempts.looked(folder, record, attempt, state.look, kept)
        return state

    def levels(calls: list[tuple]) -> list[tuple]:  # (the need's are of all K looks)
        return [a[3] for a in calls if a[3] is not None and len(a[3]) < s.looks_per_stage]

    poked: list[tuple] = []
    for at, look in ((T0 + 45, 2), (T0 + 50, 2), (T0 + 58, 2), (T0 + 65, 3), (T0 + 70, 3)):
        before = len(reckoned)
        state = poke(at)
        calls = reckoned[before:]
        poked += calls
        assert (state.status, state.look) == ("waiting", look)
        if at == T0 + 45:  # the first poke: every look's, each measure's own
            assert {len(seen) for seen in levels(calls)} == {1, 2}
            assert len({seen[-1] for seen in levels(calls) if len(seen) == 2}) == 3
        elif at == T0 + 65:  # a new look's first poke: its own levels only
            assert {len(seen) for seen in levels(calls)} == {3}
        else:  # the look's other pokes: none
            assert calls == []
        fresh_state = judge_stage(s, WINDOW, log, IMAGES, at, replay_images=0)  # (nothing kept)
        assert state.verdict.to_dict() == fresh_state.verdict.to_dict()
        assert state.reason == fresh_state.reason
    assert len(set(levels(poked))) == len(levels(poked))  # each reckoned once
    kept = attempts.load(folder, "run", 0).attempt(WINDOW.started).reckoned
    assert len(kept) <= 3 * 3 + 1  # the levels of the looks judged and one need


def test_a_kept_value_not_of_its_keys_kind_is_reckoned_again(tmp_path):
    """A stage's record keeps levels (floats) and a need (a whole number or None) by digests, so
    the record's check takes either under any key: a damaged record's level of None, 7 or 1 (a
    need's type) was taken as a look's level (TypeError in the judgement, a NaN level, a look
    judged at level 1), every poke failing alike. ``Reckoning`` takes a kept value only of its
    key's kind (a level: a float in [0, 1); a need: a whole number or None), else reckons it
    again: the same judgement as with nothing kept."""
    from vision_rollout import attempts
    from vision_rollout.folders import Folder

    s = spec(latency_margin=0.01)  # (every look waits: its levels and a need kept)
    log = records(400, 10, 50, errors=(0.01, 0.01), replay_every=None)
    now = T0 + 45
    fresh = judge_stage(s, WINDOW, log, IMAGES, now, replay_images=0)
    kept: dict = {}
    judge_stage(s, WINDOW, log, IMAGES, now, replay_images=0, reckoned=kept)
    assert any(isinstance(v, float) for v in kept.values())
    assert any(isinstance(v, int) for v in kept.values())
    for bad_level, bad_need in ((None, 0.5), (7, 1.0), (1, 0.0), (0, 0.25)):
        folder = Folder(str(tmp_path / repr(bad_level)))
        record, attempt = attempts.judged(folder, "run", 0, WINDOW.started, "try-1")
        damaged = {k: bad_level if isinstance(v, float) else bad_need for k, v in kept.items()}
        attempts.looked(folder, record, attempt, 1, damaged)
        loaded = dict(attempts.load(folder, "run", 0).attempt(WINDOW.started).reckoned)  # (the record's check takes it)
        state = judge_stage(s, WINDOW, log, IMAGES, now, replay_images=0, reckoned=loaded)
        assert (state.status, state.look, state.reason) == (fresh.status, fresh.look, fresh.reason)
        assert state.verdict.to_dict() == fresh.verdict.to_dict()
        assert loaded == kept  # (reckoned again, and kept in their place)


def test_a_stage_left_undecided_by_latency_alone_carries_it_to_the_next_stage_below_100():
    """The 5% stage's live arm is too small to show the latency margin in its time under load,
    and an equal candidate was rolled back there as undecided in about half of the rollouts
    (bench/gates.py --load 0.3). A stage held at its last look by the latency comparison alone,
    the next stage judging latency on live arms too, passes and carries the comparison there;
    the last stage below 100% must still show it (the promise: a candidate at the margin
    promoted in at most alpha), and a slower candidate still fails where its arm shows it."""
    # A latency margin finer than this traffic resolves; an error margin its replay resolves.
    s = spec(stages=[25, 50, 100], latency_margin=0.01, error_margin=0.005)
    log = records(310, 10, 25, replay_every=50)
    first = judge_stage(s, StageWindow(0, 25, T0), log, IMAGES, T0 + 300)
    assert first.status == "pass"
    assert first.look == 5
    latency = next(c for c in first.verdict.checks if c.name == "latency_geomean")
    assert latency.decision == "info"
    assert not latency.blocks_pass
    assert "Carried to the 50% stage, whose live arms must show it" in latency.sentence
    assert first.verdict.summary.startswith("PASS at look 5 of 5")
    assert "Carried to the 50% stage" in first.verdict.summary
    earlier = judge_stage(s, StageWindow(0, 25, T0), log, IMAGES, T0 + 75)
    assert earlier.status == "waiting"  # only its last look carries it
    assert "carried to the 50% stage" in earlier.reason
    last = judge_stage(s, StageWindow(1, 50, T0), log, IMAGES, T0 + 300)
    assert last.status == "undecided"  # the last stage below 100% must show it
    assert (
        judge_stage(spec(latency_margin=0.01, error_margin=0.005), WINDOW, log, IMAGES, T0 + 300).status == "undecided"
    )
    slow = judge_stage(s, StageWindow(0, 25, T0), records(310, 10, 25, ratio=1.3, replay_every=50), IMAGES, T0 + 300)
    assert slow.status == "fail"
    # Another check holding the stage too (a validation set too small for a finer accuracy
    # margin): nothing is carried, the stage is undecided.
    fine = spec(stages=[25, 50, 100], latency_margin=0.01, error_margin=0.005, accuracy_margin=0.001)
    assert judge_stage(fine, StageWindow(0, 25, T0), log, IMAGES, T0 + 300).status == "undecided"


def test_a_validation_set_too_small_for_the_accuracy_margin_is_named_before_any_traffic():
    """450 validation images cannot show a candidate that answers them as the baseline does
    within the 0.5 pp margin (it takes about z^2 (1 - m) / m = 642 at the last look's level):
    such a candidate was rolled back at the end of its first stage's bake, and only the check's
    sentence there said why. The plan is judged before any traffic moves: a warning with the size
    needed, no refusal (a candidate that gets more images right still passes with 450)."""
    s = RolloutSpec()
    (warning,) = preflight(s, 450)
    assert warning.startswith("the validation set has 450 images, too few to show a candidate that answers")
    assert "within the 0.5 pp accuracy margin: that needs at least 642" in warning
    assert "ends the 5% stage undecided and is rolled back" in warning
    assert "traffic at a steady pace through the stage; rising traffic lowers it" in warning  # (what 642 assumes)
    assert preflight(s, 642) == []
    assert preflight(s, 5000) == []
    assert preflight(RolloutSpec.from_dict({"accuracy_margin": 0.02}), 450) == []
    (zero,) = preflight(RolloutSpec.from_dict({"accuracy_margin": 0}), 450)
    assert "only one that gets more of them right than the baseline can pass" in zero
    # The size named is the check's own: an identical candidate on 641 images waits at the
    # last look, on 642 it passes.
    level = nominal_alpha(s.alpha, s.looks_per_stage, s.looks_per_stage, s.spending)
    for n, decision in ((641, "wait"), (642, "pass")):
        same = (np.arange(n) % 25 != 0).astype(float)
        pairs = pd.DataFrame({"baseline": same, "canary": same})
        assert paired_accuracy_check(pairs, GateConfig.from_spec(s), level).decision == decision


def test_a_wait_says_how_many_samples_and_how_long():
    s = spec(latency_margin=0.01)
    state = judge_stage(s, WINDOW, records(400, 10, 50, replay_every=None), IMAGES, T0 + 50)
    assert state.status == "waiting"
    assert "samples per arm" in state.reason
    assert "requests/s" in state.reason


def test_the_last_look_waits_for_min_samples_but_not_past_max_stage_seconds():
    s = spec(min_samples=500)
    log = records(400, 4, 50, replay_every=None)  # about 2 requests/s per arm
    short = judge_stage(s, WINDOW, log, IMAGES, T0 + 150)
    assert short.status == "waiting"
    assert short.look == 4
    assert judge_stage(s, WINDOW, log, IMAGES, T0 + 410).look == 5  # max_stage_seconds: judged anyway


def test_a_stage_short_of_traffic_is_rolled_back_saying_so_not_as_a_failing_candidate():
    """At a low-traffic hour the live arms did not reach ``min_samples`` by ``max_stage_seconds``:
    the stage was rolled back with "undecided ... about 500 samples per arm would resolve it" and
    the samples check's sentence behind it, which a reviewer read as a candidate the statistics
    could not clear. Its reason now starts with the cause (not enough traffic, the counts against
    the minimum, the rate and the time it would take), and the Slack report's headline carries it."""
    from vision_rollout.engine import judge_evidence
    from vision_rollout.notify import rollback_message

    s = spec(min_samples=500)
    log = records(400, 1, 50, replay_every=10)  # about 0.5 requests/s per arm: 200 each by 400 s
    state = judge_stage(s, WINDOW, log, IMAGES, T0 + 410)
    assert state.status == "undecided"
    samples = next(c for c in state.verdict.checks if c.name == "samples")
    counts = f"baseline {samples.n_baseline}, canary {samples.n_canary} of the 500 live requests per arm"
    assert state.reason.startswith(f"not enough traffic: {counts} the test needs before anything can pass")
    assert "in 410 s (max_stage_seconds 400)" in state.reason
    assert "No check failed: the candidate was not shown worse" in state.reason
    assert "requests/s into the slower arm" in state.reason
    _, why = judge_evidence(s, [{"decision": "wait", "summary": state.reason}], None)
    assert rollback_message(s, why, state.verdict, 50).text.startswith(
        "Rolled back digits v2: the 50% stage: not enough traffic: "
    )
    # A candidate the traffic did judge, still undecided, is not said to lack traffic.
    fine = judge_stage(
        spec(latency_margin=0.01), WINDOW, records(400, 10, 50, replay_every=None), IMAGES, T0 + 300, replay_images=0
    )
    assert fine.status == "undecided"
    assert "not enough traffic" not in fine.reason


def test_the_last_look_waits_for_the_replay_to_be_answered_by_both_versions():
    """On a loaded machine a last look came when a replay round was sent but 8 of its images had
    been answered by the canary: accuracy judged on 8 pairs could not resolve, and the stage ended
    undecided. The last look now waits until the round's images are all paired (the paired check
    judges whole rounds), then gives the same time to every later poke."""
    s = spec(min_samples=50)
    log = records(300, 20, 50, replay_every=None)
    replay = records(300, 0, 50, replay_every=1000)  # one round at 0.5 s, of all 500 images
    late = replay["version"] == "2"
    lagging = T0 + 150 + np.arange(int(late.sum())) * 0.1  # the canary's answers lag
    replay.loc[late, "time"] = pd.to_datetime(lagging, unit="s", utc=True)
    both = pd.concat([log, replay], ignore_index=True)
    at = T0 + 150 + 499 * 0.1  # the canary's 500th answer: the round paired
    current = stage_samples(both, s, WINDOW, T0 + 250, IMAGES)
    assert final_look_time(s, WINDOW, current, len(IMAGES)) == pytest.approx(at, abs=1e-3)
    later = stage_samples(both, s, WINDOW, T0 + 299, IMAGES)  # a late poke: the same last look
    assert final_look_time(s, WINDOW, later, len(IMAGES)) == pytest.approx(at, abs=1e-3)
    assert final_look_time(s, WINDOW, current, 0) < T0 + 110  # without the replay: the bake's end
    # None of the replay logged yet (its first records still within the write lag): the last
    # look waits as for a part of a round. It came at the bake's end, and the paired check,
    # waiting for its round, left the stage undecided there.
    live_only = stage_samples(log, s, WINDOW, T0 + 250, IMAGES)
    assert final_look_time(s, WINDOW, live_only, len(IMAGES)) == WINDOW.started + s.max_stage_seconds
    waiting = judge_stage(s, WINDOW, both, IMAGES, T0 + 140)
    assert waiting.status == "waiting"  # past the bake, but no image answered by both versions yet
    assert waiting.look == s.looks_per_stage - 1


def test_replayed_images_count_once_for_accuracy():
    log = records(100, 0, 50, accuracy=(1.0, 0.99))  # 10 replay rounds of the same images
    state = judge_stage(spec(accuracy_drop_max=0.05), WINDOW, log, IMAGES, T0 + 106)
    paired = next(c for c in state.verdict.checks if c.name == "accuracy_paired")
    assert paired.n_baseline == len(IMAGES)


def test_live_labels_join_by_request_id():
    log = records(100, 20, 50, replay_every=None)
    samples = stage_samples(pd.concat([log, labels_for(log, 1)]), spec(), WINDOW, T0 + 200, IMAGES)
    live = samples[samples["source"] == "live"]
    assert live["correct"].notna().all()
    assert live["correct"].eq(1.0).all()


def test_a_clients_malformed_requests_are_not_the_versions_errors():
    """A client can pin its requests to the canary (a user id in its bucket range) and send
    garbage, or tiny queue timeouts of its own: 400s and CANCELED say nothing of the version
    and must not move the error check; 5xx (a full queue's REJECTED too) do."""
    log = records(100, 20, 50, replay_every=None)
    canary = log.index[log["version"] == "2"]
    log.loc[canary[:50], "outcome"] = "INVALID_INPUT"
    log.loc[canary[50:55], "outcome"] = "BACKEND"
    log.loc[canary[55:65], "outcome"] = "CANCELED"
    log.loc[canary[65:67], "outcome"] = "REJECTED"
    samples = stage_samples(log, spec(), WINDOW, T0 + 200, IMAGES)
    assert samples.loc[samples["arm"] == "canary", "error"].sum() == 7
    assert samples.loc[samples["arm"] == "baseline", "error"].sum() == 0
    # Nor do failures' latencies say how fast the version answers (the client's 400s, answered
    # at once, made the arm look faster); a request given up waiting keeps its wait.
    canary = samples[samples["arm"] == "canary"]
    assert canary["latency_ms"].isna().sum() == 50 + 5 + 2
    assert canary["latency_ms"].notna().sum() == len(canary) - 57  # the CANCELED ones among them
    assert samples.loc[samples["arm"] == "baseline", "latency_ms"].notna().all()


def test_the_masking_probe_is_no_evidence_of_the_baseline():
    """The rollout's probe runs its shadow copy at once, in the primary's time: a slow request
    the baseline's clients never sent."""
    log = records(100, 20, 50, replay_every=None)
    baseline = log.index[log["version"] == "1"]
    log.loc[baseline[:3], ["route", "latency_ms"]] = ["probe", 900.0]
    samples = stage_samples(log, spec(), WINDOW, T0 + 200, IMAGES)
    assert (samples["arm"] == "baseline").sum() == len(baseline) - 3
    assert samples["latency_ms"].max() < 900


def test_the_replay_guard_reads_a_round_only_once_both_versions_answered_all_of_it():
    """An equally accurate candidate: 5 images only the baseline gets right and 5 only the
    candidate, among 500. A part of a round logged (a slow candidate, pods flushing at different
    times) with the baseline's 5 first read as a drop over the 0.5 pp limit."""
    log = records(100, 20, 50, replay_every=None)
    rows = []
    for j, sha in enumerate(IMAGES):
        for arm, v in enumerate(("1", "2")):
            wrong = (arm == 1 and j < 5) or (arm == 0 and 495 <= j)
            label = IMAGES[sha]
            rows.append(
                {
                    "time": T0 + 1 + 0.001 * j,
                    "version": v,
                    "route": "version",
                    "request_id": f"replay-0-{arm}-{j}",
                    "latency_ms": 5.0,
                    "outcome": "ok",
                    "top1": (label + 1) % 10 if wrong else label,
                    "image_sha256": sha,
                }
            )
    replay = pd.DataFrame(rows)
    replay = replay.assign(
        role="primary", model="digits", item=0, label=np.nan, time=pd.to_datetime(replay["time"], unit="s", utc=True)
    )
    part = pd.concat([log, replay.iloc[:80]], ignore_index=True)  # the first 40 images logged
    samples = stage_samples(part, spec(), WINDOW, T0 + 50, IMAGES)
    assert replay_drop(samples) == pytest.approx(5 / 40)  # what the guard read
    assert replay_drop(samples, len(IMAGES)) is None
    assert judge_stage(spec(), WINDOW, part, IMAGES, T0 + 50).status != "breach"
    whole = stage_samples(pd.concat([log, replay], ignore_index=True), spec(), WINDOW, T0 + 50, IMAGES)
    assert replay_drop(whole, len(IMAGES)) == pytest.approx(0.0)


def test_a_replay_request_given_up_or_refused_is_no_answer_of_its_version():
    """A replay request its client gave up (CANCELED: the replay's timeout, a worker stopped
    mid-request) or refused as the client's (INVALID_INPUT) has no top-1: it was read as a wrong
    answer, and three such among 500 images were a 0.6 pp drop: the hard guard tripped on an
    equal candidate. It is no answer: the image's next answer in a later round is its evidence."""
    log = records(100, 20, 50, replay_every=50)  # two rounds: 0.5 s and 50.5 s
    first_round = log["request_id"].str.startswith("replay-0-1-")  # the candidate's, round 0
    given_up = log.index[first_round][:3]
    log.loc[given_up[:2], "outcome"] = "CANCELED"
    log.loc[given_up[2:], "outcome"] = "INVALID_INPUT"
    log.loc[given_up, "top1"] = None
    samples = stage_samples(log, spec(), WINDOW, T0 + 90, IMAGES)
    replayed = samples[samples["source"] == "replay"]
    assert replayed["correct"].isna().sum() == 3
    assert replay_drop(samples, len(IMAGES)) == pytest.approx(0.0)
    assert judge_stage(spec(), WINDOW, log, IMAGES, T0 + 90).status != "breach"


def test_an_accuracy_drop_in_the_replay_trips_the_guard():
    log = records(100, 20, 50, accuracy=(1.0, 0.95))
    assert replay_drop(stage_samples(log, spec(), WINDOW, T0 + 50, IMAGES)) == pytest.approx(0.05)
    state = judge_stage(spec(), WINDOW, log, IMAGES, T0 + 50)
    assert state.status == "breach"
    assert "Accuracy drop" in state.reason


def test_a_p99_breach_from_prometheus_trips_the_guard():
    guards = GuardInputs(p99_series_ms=tuple((T0 + t, 90.0) for t in range(0, 200, 10)))
    state = judge_stage(spec(), WINDOW, records(100, 20, 50), IMAGES, T0 + 50, guards)
    assert state.status == "breach"
    assert "P99" in state.reason


def test_a_restart_of_the_candidates_process_trips_the_guard():
    """The same stage passes with no restart, and one restart of the candidate's serving process
    (its lost requests in no sample) ends it at once."""
    s = spec()
    log = records(400, 40, 50)
    assert judge_stage(s, WINDOW, log, IMAGES, T0 + 106, GuardInputs(restarts=0)).status == "pass"
    state = judge_stage(s, WINDOW, log, IMAGES, T0 + 106, GuardInputs(restarts=1))
    assert state.status == "breach"
    assert state.reason == (
        "hard guard tripped: The candidate's serving processes restarted 1 time in this stage (limit 0)."
    )


def test_a_stage_whose_guards_cannot_be_read_holds_and_never_passes():
    """Prometheus down mid-stage left the P99 and shadow-error guards out, silently: the stage
    could pass unguarded. It now holds (no look judged) and, down to the end, is undecided."""
    s = spec()
    log = records(400, 40, 50)
    assert judge_stage(s, WINDOW, log, IMAGES, T0 + 106).status == "pass"  # the same stage, guarded
    down = GuardInputs(unavailable="http://127.0.0.1:9090/api/v1/query: connection refused")
    held = judge_stage(s, WINDOW, log, IMAGES, T0 + 106, down)
    assert held.status == "waiting"
    assert held.verdict is None
    assert "holding: the hard guards cannot be read (http://127.0.0.1:9090" in held.reason
    ended = judge_stage(s, WINDOW, log, IMAGES, T0 + s.max_stage_seconds, down)
    assert ended.status == "undecided"
    assert "could not be read" in ended.reason
    assert judge_stage(s, WINDOW, log, IMAGES, T0 + 106, GuardInputs()).status == "pass"  # back: resumes


def test_a_guard_without_data_holds_the_stage_never_passes_it():
    """No P99 series for the canary (nothing scraped yet, or a window too short for the scrape
    interval) left the guard out and the stage passed unguarded; it now holds, then is undecided."""
    s = spec()
    log = records(400, 40, 50)
    blind = GuardInputs(missing="the canary's P99 has no data in Prometheus (no data for 1000 * ...)")
    held = judge_stage(s, WINDOW, log, IMAGES, T0 + 106, blind)
    assert held.status == "waiting"
    assert held.verdict is None
    assert held.reason.startswith("holding: a hard guard has no data: the canary's P99")
    ended = judge_stage(s, WINDOW, log, IMAGES, T0 + s.max_stage_seconds, blind)
    assert ended.status == "undecided"
    assert "while a hard guard had no data" in ended.reason


def test_a_p99_series_without_a_point_holds_the_stage():
    """Every point of the canary's P99 was NaN (no request in the rate window): the empty series
    passed the guard and the stage was judged without it. It holds now, as without a series."""
    s = spec()
    log = records(400, 40, 50)
    held = judge_stage(s, WINDOW, log, IMAGES, T0 + 106, GuardInputs(p99_series_ms=()))
    assert held.status == "waiting"
    assert held.verdict is None
    assert held.reason.startswith("holding: a hard guard has no data: the canary's P99 series has no point")


def test_a_stage_bakes_again_the_time_its_guards_were_blind():
    """Prometheus lost 60 s of the stage (restarted without its storage): a breach or a restart
    then is in no guard's numbers. The stage passed at its bake's end all the same; it now bakes
    those 60 s longer under the guards, and one whose max_stage_seconds comes first ends
    undecided, saying why."""
    s = spec()
    log = records(400, 40, 50)
    blind = GuardInputs(unwatched=((T0 + 10, T0 + 70),))
    baking = judge_stage(s, WINDOW, log, IMAGES, T0 + 106, guards=blind)
    assert baking.status == "waiting"
    assert baking.verdict.decision == "pass"
    assert "baking until 160 s under the hard guards (60 s longer: Prometheus holds no sample" in baking.reason
    history = next(c for c in baking.verdict.checks if c.name == "guard_history")
    assert history.sentence.startswith("Prometheus holds no sample of a server serving the candidate for 60 s")
    assert judge_stage(s, WINDOW, log, IMAGES, T0 + 166, guards=blind).status == "pass"
    short = spec(max_stage_seconds=120)
    ended = judge_stage(short, WINDOW, log, IMAGES, T0 + 125, guards=blind)
    assert ended.status == "undecided"
    assert ended.reason.startswith("undecided: the hard guards watched 65 s of the stage's 125 s, not the 100 s bake")
    assert judge_stage(s, WINDOW, log, IMAGES, T0 + 106).status == "pass"  # guards that saw it all


def test_a_canary_failing_every_request_fails_at_its_first_look_with_no_p99():
    """A failure has no latency (it is not an answer) and no P99 (the server observes none): the
    errors check waited on too few latencies and the stage held on the missing P99 for its
    whole max_stage_seconds. Errors count rows, and a look that fails needs no guard."""
    s = spec()
    for errors in (0.3, 1.0):
        log = records(400, 40, 50, errors=(0.0, errors))
        for guards in (None, GuardInputs(p99_series_ms=()), GuardInputs(unavailable="connection refused")):
            state = judge_stage(s, WINDOW, log, IMAGES, T0 + 30, guards)
            assert (state.status, state.look) == ("fail", 1), (errors, guards)
            assert "Error rate" in state.reason


def test_a_stage_whose_log_files_cannot_be_read_holds_and_never_passes(tmp_path):
    """A prediction log file of the stage the reader skipped (truncated, another writer's schema,
    not readable by the worker's user) had its records left out of the evidence silently: one
    canary pod's errors unread, the stage passed on the others. It holds, names the file, and
    is undecided at the end; a failure shown by the records read still fails it."""
    from datetime import UTC, datetime

    from model_server.predictionlog import GATE_COLUMNS, read

    s = spec()
    log = records(400, 40, 50)
    assert judge_stage(s, WINDOW, log, IMAGES, T0 + 106).status == "pass"
    part = tmp_path / "log" / "model=digits" / "dt=2027-01-15" / "hour=08" / "part-pod-b-1.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"PAR1 cut short\n")
    read_back = read(
        str(tmp_path / "log"),
        datetime.fromtimestamp(T0, UTC),
        datetime.fromtimestamp(T0 + 400, UTC),
        "digits",
        GATE_COLUMNS,
        written=True,
    )
    log.attrs = read_back.attrs
    held = judge_stage(s, WINDOW, log, IMAGES, T0 + 106)
    assert (held.status, held.verdict) == ("waiting", None)
    assert held.reason.startswith("holding: 1 prediction log file of the stage cannot be read (first: ")
    assert "part-pod-b-1.parquet: unreadable" in held.reason
    assert "\n" not in held.reason
    ended = judge_stage(s, WINDOW, log, IMAGES, T0 + s.max_stage_seconds)
    assert ended.status == "undecided"
    assert "while 1 prediction log file of the stage could not be read" in ended.reason
    failing = records(400, 40, 50, errors=(0.0, 1.0))
    failing.attrs = read_back.attrs
    assert judge_stage(s, WINDOW, failing, IMAGES, T0 + 30).status == "fail"


def test_no_look_passes_before_the_replay_guard_has_read_a_whole_round():
    s = spec()
    log = records(400, 40, 50)
    assert judge_stage(s, WINDOW, log, IMAGES, T0 + 106).status == "pass"
    every_round_but_one_image = log[log["image_sha256"] != next(iter(IMAGES))]
    held = judge_stage(s, WINDOW, every_round_but_one_image, IMAGES, T0 + 106)
    assert held.status == "waiting"
    assert "waits for a whole validation round" in held.reason
    paired = next(c for c in held.verdict.checks if c.name == "accuracy_paired")
    assert (paired.decision, paired.n_baseline) == ("wait", len(IMAGES) - 1)
    assert (
        judge_stage(s, WINDOW, every_round_but_one_image, IMAGES, T0 + s.max_stage_seconds + 10).status == "undecided"
    )
    assert (
        judge_stage(s, WINDOW, every_round_but_one_image, IMAGES, T0 + 106, replay_images=len(IMAGES) - 1).status
        == "pass"
    )


def test_the_full_stage_judges_latency_on_the_replay():
    window = StageWindow(1, 100, T0)
    log = records(400, 40, 100)
    state = judge_stage(spec(), window, log, IMAGES, T0 + 106)
    latency = next(c for c in state.verdict.checks if c.name == "latency_geomean")
    assert (
        latency.n_baseline
        == (
            log[(log["version"] == "1") & (log["route"] == "version")]["time"]
            < pd.Timestamp(T0 + 100, unit="s", tz="UTC")
        ).sum()
        or latency.n_baseline > 0
    )
    assert state.served["baseline"].get("live", 0) == 0


def queued(log: pd.DataFrame, utilisation: float = 0.7, seed: int = 1) -> pd.DataFrame:
    """The candidate's replay requests queued behind its live ones (M/M/1 waits at
    ``utilisation``, 5 ms service): a candidate as fast as the baseline, under load."""
    rng = np.random.default_rng(seed)
    mine = ((log["route"] == "version") & (log["version"] == "2")).to_numpy()
    n = int(mine.sum())
    wait = np.where(rng.random(n) < utilisation, rng.exponential(5 / (1 - utilisation), n), 0.0)
    out = log.copy()
    out.loc[mine, "latency_ms"] = out.loc[mine, "latency_ms"].to_numpy() + wait
    return out


def test_the_full_stage_does_not_judge_a_loaded_candidate_against_an_idle_baseline():
    log = queued(records(400, 40, 100))
    state = judge_stage(spec(), StageWindow(1, 100, T0), log, IMAGES, T0 + 106)
    timed = {c.name: c for c in state.verdict.checks if c.name.startswith("latency")}
    assert timed["latency_p95"].effect > 0.25  # beyond the tail margin, from load alone
    assert {c.decision for c in timed.values()} == {"info"}
    assert all("Not judged: at 100% the candidate takes all live traffic" in c.sentence for c in timed.values())
    assert state.status == "pass"
    # A slower candidate is stopped by the stage before, on live arms at equal footing.
    slow = judge_stage(spec(), WINDOW, records(400, 40, 50, ratio=1.3), IMAGES, T0 + 106)
    assert (slow.status, slow.verdict.failed[0].name) == ("fail", "latency_geomean")
    # A rollout whose only stage is 100% has no other comparison: the replay's decides.
    only = spec(stages=[100], mirror_percent=0)
    alone = judge_stage(only, StageWindow(0, 100, T0), log, IMAGES, T0 + 106)
    assert alone.status == "fail"
    assert {c.name for c in alone.verdict.failed} >= {"latency_geomean", "latency_p95"}


class RecordingRouter:
    def __init__(self) -> None:
        self.history: list[dict] = []

    def reconcile(self) -> None:
        pass

    def set_routes(self, policy: TrafficPolicy) -> bool:
        self.history.append(policy.to_dict())
        return True

    def get_routes(self) -> TrafficPolicy:
        return TrafficPolicy.from_dict(self.history[-1])


def scripted(statuses: list[str]):
    answers = iter(statuses)
    return lambda window: StageState(next(answers), 1, 5, None, "scripted")


def audited(verdict: str, reason: str = "top-1 agreement 97%"):
    """A shadow audit that answers ``verdict``, recording the window it was asked for."""

    def audit(start: float, end: float) -> AuditResult:
        audit.windows.append((start, end))
        return AuditResult("digits", str(start), str(end), verdict, [reason])

    audit.windows = []
    return audit


def test_every_stage_passes_then_promotion():
    router = RecordingRouter()
    audit = audited("pass")
    result = Rollout(
        spec(stages=[10, 100]), router, scripted(["waiting", "pass", "pass"]), sleep=lambda _: None, audit=audit
    ).run()
    assert result.promoted
    assert result.reason == "every stage passed; shadow audit: top-1 agreement 97%"
    assert len(audit.windows) == 1
    assert router.history[0]["route"] == [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]
    assert router.history[-1] == {"route": [{"version": "2", "weight": 100}]}


@pytest.mark.parametrize(
    ("audit", "mirror", "promoted", "words"),
    [
        (audited("fail", "top-1 agreement 71% is shown below 90%"), 100, False, "shadow audit failed: top-1"),
        (audited("inconclusive", "not yet shown above 90%"), 100, False, "not yet shown above 90%"),
        (audited("skip", "no shadow records"), 100, False, "no shadow records"),
        (None, 100, False, "the audit did not run"),
        (None, 0, True, "every stage passed"),
        (audited("fail", "top-1 agreement 71%"), 0, False, "shadow audit failed"),
    ],
)
def test_after_every_stage_passed_the_decision_is_the_dags(audit, mirror, promoted, words):
    """rolloutctl run promoted once every stage passed, where the DAG's decide rolled back a
    rollout whose shadow audit did not show agreement: both take ``judge_evidence`` now."""
    from rollout_airflow.steps import judge_evidence as dags

    router = RecordingRouter()
    s = spec(stages=[10, 100], mirror_percent=mirror)
    result = Rollout(s, router, scripted(["pass", "pass"]), sleep=lambda _: None, audit=audit).run()
    assert result.promoted is promoted
    assert words in result.reason
    stable, promoted_routes = s.stable_policy().to_dict(), s.promoted_policy().to_dict()
    assert router.history[-1] == (promoted_routes if promoted else stable)
    verdicts = [{"decision": "pass", "summary": "PASS"}] * 2
    report = audit(0.0, 1.0).to_dict() if audit else None
    assert dags(s.to_dict(), verdicts, report) == ("promote" if promoted else "rollback", result.reason)


def test_an_audit_that_raises_rolls_back_as_one_that_did_not_run():
    def broken(start, end):
        raise OSError("prediction log unreachable")

    router = RecordingRouter()
    result = Rollout(
        spec(stages=[10, 100]), router, scripted(["pass", "pass"]), sleep=lambda _: None, audit=broken
    ).run()
    assert not result.promoted
    assert "the audit did not run" in result.reason
    assert router.history[-1] == {"route": [{"version": "1", "weight": 100}]}


@pytest.mark.parametrize("status", ["fail", "undecided", "breach"])
def test_a_stage_that_does_not_pass_restores_stable(status):
    router = RecordingRouter()
    result = Rollout(spec(stages=[5, 50, 100]), router, scripted(["pass", status]), sleep=lambda _: None).run()
    assert not result.promoted
    assert [s.decision for s in result.stages] == ["pass", "fail"]
    assert router.history[-1] == {"route": [{"version": "1", "weight": 100}]}


@pytest.mark.parametrize(
    ("changed_at", "reason"),
    [
        (1, "stage 50%: version 2 is not the file verified; no more weight moves to it"),
        (2, "stage 50%: version 2 is not the file verified; the stage's evidence is not of the file verified"),
        (5, "version 2 is not the file verified; version 2 is not promoted"),
    ],
)
def test_a_candidate_served_from_other_bytes_moves_no_more_weight_and_is_not_promoted(changed_at, reason):
    """``changed`` (the served candidate checked against the bytes verified) is asked before each
    stage's weights, at each look and before the promotion: once it names a change, no more
    weight moves to the candidate and it is not promoted; the stable version takes 100% again."""
    asked = []

    def changed():
        asked.append(1)
        return "version 2 is not the file verified" if len(asked) >= changed_at else None

    router = RecordingRouter()
    s = spec(mirror_percent=0)  # (no shadow audit needed)
    result = Rollout(s, router, scripted(["pass", "pass"]), sleep=lambda _: None, changed=changed).run()
    assert (result.promoted, result.reason) == (False, reason)
    written = [s.policy_for_stage(w).to_dict() for w in s.stages][: {1: 0, 2: 1, 5: 2}[changed_at]]
    assert router.history == [*written, s.stable_policy().to_dict()]  # (the 100% stage's: no mirror)


def test_an_exception_restores_stable():
    router = RecordingRouter()

    def broken(window):
        raise RuntimeError("prediction log unreachable")

    with pytest.raises(RuntimeError):
        Rollout(spec(), router, broken, sleep=lambda _: None).run()
    assert router.history[-1] == {"route": [{"version": "1", "weight": 100}]}


def test_a_signal_while_promoting_carries_the_promotion_out():
    """Ctrl-C (or a CI job's SIGTERM) landing while the decided promotion was being applied put
    the stable version back: a rollout that passed every stage and its audit ended rolled back.
    The decision is carried out, then the signal goes on."""
    s = spec(stages=[10, 100], mirror_percent=0)

    class InterruptedRouter(RecordingRouter):
        def set_routes(self, policy):
            if len(self.history) == 2 and not getattr(self, "interrupted", False):  # after both stages
                self.interrupted = True
                raise KeyboardInterrupt  # the signal, as the promotion's routes are being set
            return super().set_routes(policy)

    router = InterruptedRouter()
    with pytest.raises(KeyboardInterrupt):
        Rollout(s, router, scripted(["pass", "pass"]), sleep=lambda _: None).run()
    assert router.history[-1] == s.promoted_policy().to_dict()
    assert s.stable_policy().to_dict() not in router.history


def test_a_lost_lease_stops_the_rollout_without_touching_the_routes():
    """A run whose lease another run took over (it stalled past the lease) must not put its
    stable version back: the routes are the other run's now."""
    from vision_rollout.locks import LockLost

    router = RecordingRouter()
    looks = iter([StageState("waiting", 1, 5, None, "scripted")])

    def look(window):
        state = next(looks, None)
        if state is None:
            raise LockLost("run 'a' does not hold model 'digits': run 'b' holds it")
        return state

    with pytest.raises(LockLost):
        Rollout(spec(stages=[10, 100]), router, look, sleep=lambda _: None).run()
    assert router.history == [spec(stages=[10, 100]).policy_for_stage(10).to_dict()]  # stage 1's, nothing after


def test_a_live_label_counts_once_the_earliest_before_the_look():
    """The gate took the last label of an id in the records' order (the replicas' files', not
    time's), whatever its time, on every record of the id. Replicas each take one label of an id,
    so a second label sent to another replica overrode the first; a late poke judged a look on
    labels received after it; and one label of an id re-sent 20 times counted 20 times. Now, as
    the log's ``joined``: the earliest label received before the look, on the earliest answer."""
    log = records(100, 20, 50, replay_every=None)
    first = log.iloc[0]
    resent = pd.concat([first.to_frame().T] * 20, ignore_index=True)
    resent["time"] = first["time"] + pd.to_timedelta(np.arange(20) * 0.1, unit="s")
    log = pd.concat([log, resent], ignore_index=True)
    truth = int(first["top1"])
    labels = labels_for(log.iloc[:1], truth)  # the first label: the answer was right
    labels["time"] = first["time"] + pd.Timedelta(seconds=5)
    relabel = labels.assign(label=float((truth + 1) % 10), time=first["time"] + pd.Timedelta(seconds=6))
    late = labels_for(log.iloc[1:2], (truth + 1) % 10).assign(time=first["time"] + pd.Timedelta(seconds=500))
    until = T0 + 100
    for frame in (pd.concat([log, relabel, labels, late]), pd.concat([late, labels, log, relabel])):
        samples = stage_samples(frame, spec(), WINDOW, until, IMAGES)
        assert samples["correct"].notna().sum() == 1  # 21 answers under one id: one is evidence
        assert samples["correct"].dropna().tolist() == [1.0]  # the first label, in either order
    judged_late = stage_samples(pd.concat([log, late]), spec(), WINDOW, until, IMAGES)
    assert judged_late["correct"].isna().all()  # received after the look: not its evidence


def logged(tmp_path, records: list, start: float) -> pd.DataFrame:
    """The records written by the real prediction-log writer (now: it names its files by the time
    it writes them), read back as a stage reads them from ``start``."""
    import base64
    import json
    import os
    from datetime import UTC, datetime

    from model_server.masking import KeyRing, Masker
    from model_server.predictionlog import GATE_COLUMNS, PredictionLog, read

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode(), "tenants": {}}))
    writer = PredictionLog(tmp_path / "log", Masker(KeyRing(keys), []), replica="pod-a", compression=None)
    for record in records:
        writer.append(record)
    writer.flush()
    return read(
        str(tmp_path / "log"),
        datetime.fromtimestamp(start, UTC),
        datetime.fromtimestamp(start + 3600, UTC),
        model="digits",
        columns=GATE_COLUMNS,
    )


def inference(t: float, version: str, rid: str, latency_ms: float, outcome: str = "ok", items: int = 1):
    """A primary record of a routed request of ``items`` images, as the data plane hands it over."""
    from model_server.predictionlog import Inference

    scores = np.eye(10, dtype=np.float32)[[1] * items] if outcome == "ok" else None
    images = np.array([b"image-%d" % i for i in range(items)], dtype=object)
    return Inference(
        t, "digits", version, "primary", "route", rid, "t", "s", latency_ms, outcome, scores, images, True, {}, items
    )


def test_a_batch_request_is_one_request_of_evidence_not_one_per_item(tmp_path):
    """A record of a batch request is a row per item, each with the request's latency and
    outcome: one failed request of 64 images counted 64 errors against the canary (64/458), and
    failed a stage whose canary failed 1 request in 601; one slow batch, 64 latencies."""
    import time

    t0 = time.time() - 300
    window = StageWindow(0, 50, t0)
    rng = np.random.default_rng(0)
    rows = [
        inference(t0 + 1 + i * 0.15, v, f"{v}-{i}", float(np.exp(rng.normal(np.log(5), 0.3))))
        for i in range(600)
        for v in ("1", "2")
    ]
    rows += [
        inference(t0 + 50, "2", "batch-1", 30.0, "BACKEND", items=64),
        inference(t0 + 60, "2", "batch-2", 900.0, items=64),
    ]
    log = logged(tmp_path, rows, t0)
    samples = stage_samples(log, spec(), window, t0 + 150, IMAGES)
    canary = samples[samples["arm"] == "canary"]
    assert len(canary) == 600 + 128  # every item is a row (its correctness, were it labelled)
    assert canary["error"].sum() == 1
    assert canary["error"].count() == 602
    assert (canary["latency_ms"] == 900.0).sum() == 1
    state = judge_stage(spec(), window, log, IMAGES, t0 + 199, replay_images=0)  # (no replay here)
    assert state.status != "fail", state.reason
    assert state.served["canary"]["live"] == 602
    errors = next(c for c in state.verdict.checks if c.name == "errors")
    assert (errors.n_baseline, errors.n_canary) == (600, 602)


def test_the_items_of_a_batch_request_are_one_unit_of_the_live_accuracy_evidence(tmp_path):
    """The gate counted each item of a batch request as an independent label; the samples name
    each live row's request (``cluster``), so the gate takes a request's items as one unit."""
    import time

    t0 = time.time() - 300
    window = StageWindow(0, 50, t0)
    rows = [inference(t0 + 1 + i, v, f"{v}-{i}", 5.0, items=8) for i in range(20) for v in ("1", "2")]
    log = logged(tmp_path, rows, t0)
    samples = stage_samples(log, spec(), window, t0 + 150, IMAGES)
    live = samples[samples["source"] == "live"]
    assert len(live) == 320
    assert live["cluster"].nunique() == 40
    assert (live.groupby("cluster")["arm"].nunique() == 1).all()
    assert live.groupby("cluster").size().eq(8).all()
    replayed = stage_samples(records(30, 0, 50), spec(), WINDOW, T0 + 30, IMAGES)
    assert replayed["cluster"].isna().all()  # the replay is paired, by image


def test_a_live_label_names_the_tenant_that_sent_it(tmp_path):
    """The gate bounds what one tenant's labels decide: each live row names its label's tenant,
    as the log keeps it; none without a label."""
    import time

    from model_server.predictionlog import Label

    t0 = time.time() - 300
    window = StageWindow(0, 50, t0)
    rows = [inference(t0 + 1 + i, v, f"{v}-{i}", 5.0) for i in range(20) for v in ("1", "2")]
    rows = [r._replace(metadata={"x-tenant": "acme"}) if r.request_id.endswith(("-1", "-2")) else r for r in rows]
    rows += [Label(t0 + 30, "digits", "2", "2-1", [1], "acme"), Label(t0 + 30, "digits", "1", "1-3", [1], None)]
    samples = stage_samples(logged(tmp_path, rows, t0), spec(), window, t0 + 150, IMAGES)
    labelled = samples.dropna(subset=["correct"])
    assert len(labelled) == 2
    by = dict(zip(labelled["arm"], labelled["labelled_by"], strict=True))
    assert by["canary"] == "acme"  # (as the log keeps it: masked where the masker masks x-tenant)
    assert by["baseline"] is None or pd.isna(by["baseline"])
    assert samples.loc[samples["correct"].isna(), "labelled_by"].isna().all()


def test_one_tenants_label_never_judges_another_tenants_answer_under_one_request_id(tmp_path):
    """acme (on the baseline) and globex (on the canary) both sent request id order-7; globex
    labelled its own answer (the canary's top-1, 1: correct). The gate joined labels by request
    id and item alone, to the id's earliest answer: acme's baseline answer was judged by globex's
    label and the canary's answer had none. Each tenant's label judges its own answer now."""
    import time

    from model_server.predictionlog import Label

    t0 = time.time() - 300
    window = StageWindow(0, 50, t0)
    rows = [inference(t0 + 1 + i, v, f"{v}-{i}", 5.0) for i in range(20) for v in ("1", "2")]
    rows += [
        inference(t0 + 25, "1", "order-7", 5.0)._replace(metadata={"x-tenant": "acme"}),
        inference(t0 + 25.05, "2", "order-7", 5.0)._replace(metadata={"x-tenant": "globex"}),
        Label(t0 + 30, "digits", "2", "order-7", [1], "globex"),
    ]
    samples = stage_samples(logged(tmp_path, rows, t0), spec(), window, t0 + 150, IMAGES)
    labelled = samples.dropna(subset=["correct"])
    assert list(labelled["arm"]) == ["canary"]
    assert list(labelled["labelled_by"]) == ["globex"]
    assert list(labelled["correct"]) == [1.0]


def test_a_request_another_tenant_sends_under_an_id_later_does_not_change_a_look_judged(tmp_path):
    """A look judges what was logged before its time: acme's answer to order-7 and its label (no
    tenant named: one tenant's id joins its one answer) were the look's evidence; globex's
    request under order-7 a minute after the look split the id by tenant, and the look judged
    again had lost the label. The gate keys the records on what the look saw."""
    import time

    from model_server.predictionlog import Label

    t0 = time.time() - 300
    window = StageWindow(0, 50, t0)
    rows = [inference(t0 + 1 + i, v, f"{v}-{i}", 5.0) for i in range(20) for v in ("1", "2")]
    rows += [
        inference(t0 + 25, "2", "order-7", 5.0)._replace(metadata={"x-tenant": "acme"}),
        Label(t0 + 30, "digits", "2", "order-7", [1], None),
    ]
    look = t0 + 150
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    before = stage_samples(logged(tmp_path / "a", rows, t0), spec(), window, look, IMAGES)
    rows.append(inference(t0 + 210, "1", "order-7", 5.0)._replace(metadata={"x-tenant": "globex"}))
    after = stage_samples(logged(tmp_path / "b", rows, t0), spec(), window, look, IMAGES)
    for samples in (before, after):
        assert list(samples.dropna(subset=["correct"])["arm"]) == ["canary"]


@pytest.mark.parametrize("latency", [np.inf, -np.inf, np.nan, -4.0, 0.0])
def test_a_record_whose_latency_is_no_duration_is_no_latency_evidence(latency):
    """One record of the log with an Inf latency (a foreign or damaged file) made the stage's
    latency interval NaN, a wait until it ended undecided; a negative one raised at every poke.
    Such a latency is no evidence now; its request still counts for errors."""
    log = records(200, 20, 50, replay_every=20)
    live = log.index[(log["route"] == "route") & (log["version"] == "2")]
    log.loc[live[3], "latency_ms"] = latency
    samples = stage_samples(log, spec(), WINDOW, T0 + 200, IMAGES)
    canary = samples[(samples["arm"] == "canary") & (samples["source"] == "live")]
    assert np.isfinite(canary["latency_ms"].dropna()).all()
    assert canary["latency_ms"].notna().sum() == len(live) - 1
    assert canary["error"].count() == len(live)
    state = judge_stage(spec(), WINDOW, log, IMAGES, T0 + 400)
    assert state.status == "pass", state.reason


def flush_at(writer, records: list, written: float) -> None:
    """One flush of ``writer``, its files named as if written at ``written`` (unix seconds)."""
    import time
    from pathlib import Path

    before = set(Path(writer.root).rglob("part-*.parquet"))
    for record in records:
        writer.append(record)
    writer.flush()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(written))
    for path in set(Path(writer.root).rglob("part-*.parquet")) - before:
        path.rename(path.with_name(f"part-{writer.replica}-{stamp}-{path.name.rsplit('-', 1)[-1]}"))


def test_a_replica_flushing_late_does_not_change_a_look_already_judged(tmp_path):
    """A canary pod's writer flushed 30 s late (starved, a slow PUT, a clock behind): its records
    of 30..40 s reached the log after the look at 40 s was judged, and the next poke judged that
    look again on them (here: waiting, then failing on the same look). A record whose file was
    written later than a look's settle time allows is the evidence of the looks after it now."""
    import base64
    import json
    import os
    import time
    from datetime import UTC, datetime

    from model_server.masking import KeyRing, Masker
    from model_server.predictionlog import GATE_COLUMNS, PredictionLog, read
    from vision_rollout.engine import SETTLE_S

    t0 = time.time() - 1000
    window = StageWindow(0, 50, t0)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode(), "tenants": {}}))
    masker = Masker(KeyRing(keys), [])
    pod_a, pod_b = (PredictionLog(tmp_path / "log", masker, replica=r, compression=None) for r in ("pod-a", "pod-b"))
    rng = np.random.default_rng(1)
    for second in range(0, 200, 2):  # pod a: both versions, flushed every 2 s
        batch = [
            inference(t0 + second + j * 0.05, v, f"{v}-{second}-{j}", float(np.exp(rng.normal(np.log(5), 0.3))))
            for j in range(40)
            for v in ("1", "2")
        ]
        flush_at(pod_a, batch, t0 + second + 2)

    def log() -> pd.DataFrame:
        start, end = (datetime.fromtimestamp(t, UTC) for t in (t0, t0 + 400))
        return read(str(tmp_path / "log"), start, end, model="digits", columns=GATE_COLUMNS, written=True)

    s = spec(min_samples=50)
    look_2 = t0 + 40
    then = log()
    on_time = judge_stage(s, window, then, IMAGES, look_2 + SETTLE_S, replay_images=0)
    late = [inference(t0 + 30 + j * 0.1, "2", f"b-{j}", 5.0, "BACKEND") for j in range(100)]
    flush_at(pod_b, late, t0 + 70)
    now = log()
    again = judge_stage(s, window, now, IMAGES, look_2 + SETTLE_S, replay_images=0)  # a retried poke
    assert again.look == on_time.look == 2
    assert again.verdict.to_dict() == on_time.verdict.to_dict()
    before, after = (stage_samples(df, s, window, look_2, IMAGES) for df in (then, now))
    pd.testing.assert_frame_equal(before, after)
    assert on_time.status == "waiting"
    later = judge_stage(s, window, now, IMAGES, t0 + 100, replay_images=0)  # the late errors: a later look's
    assert (later.status, later.look) == ("fail", 4), later.reason
    assert "Error rate" in later.reason


def test_a_look_is_judged_on_the_same_records_whatever_a_pokes_settle_time(tmp_path):
    """Model servers flushing every 10 s: a poke reading that from Prometheus waits 13 s after a
    look (``settle_time``), one that cannot read it (Prometheus down or restarting, the flush gauge
    not yet scraped) 5 s. The records' evidence time was reckoned with each poke's own settle
    time, so the look at 40 s held the canary's failed requests of 30..40 s (flushed at 40 s) for
    the first and not for the second: the same look judged on two sets of records, failed by one
    poke and waiting for the other. A record's evidence time no longer depends on the poke."""
    import base64
    import json
    import os
    import time
    from datetime import UTC, datetime

    from model_server.masking import KeyRing, Masker
    from model_server.predictionlog import GATE_COLUMNS, PredictionLog, read
    from vision_rollout.engine import SETTLE_S, WRITE_S

    t0 = float(int(time.time()) - 1000)
    window = StageWindow(0, 50, t0)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode(), "tenants": {}}))
    pod = PredictionLog(tmp_path / "log", Masker(KeyRing(keys), []), replica="pod-a", compression=None)
    rng = np.random.default_rng(2)
    for second in range(0, 100, 10):  # both versions, flushed every 10 s; the canary fails from 30 s on
        batch = [
            inference(
                t0 + second + j * 0.05,
                v,
                f"{v}-{second}-{j}",
                float(np.exp(rng.normal(np.log(5), 0.3))),
                "BACKEND" if v == "2" and second >= 30 else "ok",
            )
            for j in range(200)
            for v in ("1", "2")
        ]
        flush_at(pod, batch, t0 + second + 10)
    start, end = (datetime.fromtimestamp(t, UTC) for t in (t0, t0 + 400))
    log = read(str(tmp_path / "log"), start, end, model="digits", columns=GATE_COLUMNS, written=True)
    s = spec(min_samples=50)
    look_2 = t0 + 40
    now = look_2 + 10 + WRITE_S + 1  # both pokes judge looks 1 and 2, not 3
    read_flush, default = (
        judge_stage(s, window, log, IMAGES, now, settle_s=settle, replay_images=0)
        for settle in (10 + WRITE_S, SETTLE_S)
    )
    assert read_flush.look == default.look == 2
    assert read_flush.status == default.status
    assert read_flush.verdict.to_dict() == default.verdict.to_dict()


def test_the_paired_check_judges_a_whole_round_not_its_first_images():
    """labels.csv ordered by class, a round slower than the bake (250 s: a large set, a slow
    model): the canary loses the last class's images only, a 4 pp drop against a 2 pp margin
    (the point guard set at 5 pp). Judged on the first 200 images, all right for both, the
    paired check passed the stage, and the guard's whole round then let it through."""
    s = spec(accuracy_drop_max=0.05, error_margin=0.05)
    live = records(400, 20, 50, replay_every=None)
    replay = records(400, 0, 50, accuracy=(1.0, 0.96), replay_every=1000)
    order = replay["request_id"].str.rsplit("-", n=1).str[-1].astype(int)
    replay["time"] = pd.to_datetime(T0 + 0.5 + 0.5 * order, unit="s", utc=True)  # image j at 0.5 + j/2 s
    log = pd.concat([live, replay], ignore_index=True)
    for now in (T0 + 120, T0 + 270, T0 + 410):
        state = judge_stage(s, WINDOW, log, IMAGES, now)
        assert state.status in ("waiting", "fail"), (now, state.reason)
    assert state.status == "fail"
    paired = next(c for c in state.verdict.checks if c.name == "accuracy_paired")
    assert (paired.decision, paired.n_baseline) == ("fail", len(IMAGES))


def test_a_log_that_cannot_be_listed_holds_the_stage_and_sends_no_replay(tmp_path, monkeypatch):
    """The prediction log's store refusing a poke's listing (down, throttling) raised out of the
    judge: rolloutctl run restored the stable version over one failed request. The stage holds,
    as on a file it cannot read, and is undecided at its end; no replay round goes out."""
    from model_server import predictionlog
    from vision_rollout.engine import StageJudge

    def refused(*args, **kwargs):
        raise OSError("When listing objects under key 'predictions/model=digits': AWS Error SLOW_DOWN")

    monkeypatch.setattr(predictionlog, "read", refused)
    s = spec()
    judge = StageJudge(s, "127.0.0.1:1", tmp_path, "s3://bucket/predictions?region=eu-west-1", _labels=IMAGES)
    monkeypatch.setattr(judge, "replay_round", lambda: pytest.fail("a replay round was sent"))
    held = judge(WINDOW, T0 + 106)
    assert (held.status, held.verdict) == ("waiting", None)
    assert held.reason.startswith(
        "holding: 1 prediction log file of the stage cannot be read (first: s3://bucket/predictions: not listed: "
    )
    assert "SLOW_DOWN" in held.reason
    assert "region" not in held.reason
    assert judge(WINDOW, T0 + s.max_stage_seconds).status == "undecided"


def test_a_replay_the_serving_path_refuses_fails_the_poke_naming_it(tmp_path):
    """A model server restarting mid-stage refused the poke's replay round: the wait failed, and
    the rollback report said "the 50% stage: [Errno 111] Connection refused", naming nothing."""
    import socket

    from vision_rollout.engine import StageJudge

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tmp_path / "validation"
    folder.mkdir()
    (folder / "labels.csv").write_text("file,label\na.png,1\n")
    (folder / "a.png").write_bytes(b"not an image: refused before any answer")
    judge = StageJudge(spec(), f"127.0.0.1:{port}", folder, str(tmp_path / "log"))
    with pytest.raises(OSError, match=rf"replay of digits versions 1 and 2 through 127.0.0.1:{port} could not be sent"):
        judge(WINDOW, T0 + 1)


def cached_judges(tmp_path, monkeypatch, run: str | None = None):
    """Two judges of one log: one reading it whole each poke, one through a stage cache."""
    from vision_rollout.engine import StageJudge
    from vision_rollout.folders import Folder

    s = spec(min_samples=50)
    full = StageJudge(s, "127.0.0.1:1", tmp_path, str(tmp_path / "log"), _labels=IMAGES)
    cache = Folder(run or str(tmp_path / "run"))
    cached = StageJudge(s, "127.0.0.1:1", tmp_path, str(tmp_path / "log"), _labels=IMAGES, cache=cache)
    for judge in (full, cached):
        monkeypatch.setattr(judge, "replay_round", lambda: None)
    return full, cached


def writers(tmp_path, *replicas: str):
    import base64
    import json
    import os

    from model_server.masking import KeyRing, Masker
    from model_server.predictionlog import PredictionLog

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode(), "tenants": {}}))
    masker = Masker(KeyRing(keys), [])
    return [PredictionLog(tmp_path / "log", masker, replica=r, compression=None) for r in replicas]


def traffic(t0: float, second: float, errors: str = "") -> list:
    """2 s of both versions' requests from ``second``; the canary failing them with ``errors``."""
    return [
        inference(t0 + second + j * 0.1, v, f"{v}-{second}-{j}", 5.0 + j % 3, errors if v == "2" and errors else "ok")
        for j in range(20)
        for v in ("1", "2")
    ]


def same_poke(full, cached, window, now: float) -> pd.DataFrame:
    """A poke through the cache reads the records a whole read does, and judges them alike."""
    whole, through = full.records(window, now), cached.records(window, now)
    pd.testing.assert_frame_equal(through, whole)
    assert {k: through.attrs[k] for k in whole.attrs} == whole.attrs
    a, b = full(window, now), cached(window, now)
    assert (a.status, a.look, a.reason, a.served) == (b.status, b.look, b.reason, b.served)
    assert (a.verdict and a.verdict.to_dict()) == (b.verdict and b.verdict.to_dict())
    return through


def test_a_stage_read_through_its_cache_judges_every_poke_as_a_whole_read(tmp_path, monkeypatch):
    """Each poke of a stage read every log file since the stage began (an hour of 10 pods: 18,000
    files a poke). Through the stage's cache in the run folder, a poke reads only the files
    written since the last, with the same records and verdicts: late files, records after the
    poke's end in a file already read, a file that cannot be read (held every poke)."""
    t0 = one_hours_t0()
    window = StageWindow(0, 50, t0)
    pod_a, pod_b = writers(tmp_path, "pod-m", "pod-b")  # (pod b's files listed first)
    full, cached = cached_judges(tmp_path, monkeypatch)
    for second in range(0, 40, 2):
        flush_at(pod_a, traffic(t0, second), t0 + second + 2)
    first = same_poke(full, cached, window, t0 + 45)
    assert first.attrs["files_opened"] == 20
    flush_at(pod_a, traffic(t0, 40) + traffic(t0, 50), t0 + 52)
    flush_at(pod_a, traffic(t0, 60), t0 + 48)  # a clock ahead: records after this poke's end
    assert same_poke(full, cached, window, t0 + 55).attrs["files_opened"] == 2
    flush_at(pod_b, traffic(t0, 30, "BACKEND"), t0 + 70)  # late: a later look's evidence
    again = same_poke(full, cached, window, t0 + 75)
    assert again.attrs["files_opened"] == 1  # only the file written since
    assert len(list((tmp_path / "run").iterdir())) == 1
    bad = next((tmp_path / "log").rglob("part-*.parquet")).with_name("part-pod-c-1.parquet")
    bad.write_bytes(b"PAR1 cut short\n")
    for now in (t0 + 78, t0 + 80):
        held = same_poke(full, cached, window, now)
        assert held.attrs["files_opened"] == 1  # tried again each poke, never covered
        assert str(bad) in held.attrs["skipped_file_reasons"]
    bad.unlink()
    for second in range(70, 90, 2):
        flush_at(pod_a, traffic(t0, second), t0 + second + 2)
    ended = same_poke(full, cached, window, t0 + 95)
    assert ended.attrs["files_opened"] == 10
    state = cached(window, t0 + 95)
    assert (state.status, state.look) == ("fail", 4), state.reason  # the late file's errors, at their look
    assert not list((tmp_path / "run").iterdir())  # the stage's cache gone with its end


def test_a_torn_or_foreign_cache_is_read_as_none(tmp_path, monkeypatch):
    t0 = one_hours_t0()
    window = StageWindow(0, 50, t0)
    (pod,) = writers(tmp_path, "pod-a")
    full, cached = cached_judges(tmp_path, monkeypatch)
    for second in range(0, 20, 2):
        flush_at(pod, traffic(t0, second), t0 + second + 2)
    same_poke(full, cached, window, t0 + 25)
    (stage,) = (tmp_path / "run").iterdir()
    (cache,) = stage.iterdir()
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])  # a write cut short
    assert same_poke(full, cached, window, t0 + 25).attrs["files_opened"] == 10
    assert same_poke(full, cached, window, t0 + 26).attrs["files_opened"] == 0  # written whole again
    assert cache.name not in [p.name for p in stage.iterdir()]  # the torn part removed
    other = StageWindow(0, 50, t0 + 10)  # another stage's cache under this one's name
    same_poke(full, cached, other, t0 + 25)
    (stage, theirs) = sorted((tmp_path / "run").iterdir(), key=lambda p: p.name)
    for part in stage.iterdir():
        part.unlink()
    for part in theirs.iterdir():
        (stage / part.name).write_bytes(part.read_bytes())
    assert same_poke(full, cached, window, t0 + 27).attrs["files_opened"] == 10


def test_two_pokes_at_once_lose_no_record_and_count_none_twice(tmp_path, monkeypatch):
    """Two pokes of a stage at once (a retried task) each read the cache, then each write what
    it read new: the last write replaced the other's, whose files the next poke read again. Each
    writes a part of its own: both stay, a file both read is taken once."""
    t0 = one_hours_t0()
    window = StageWindow(0, 50, t0)
    (pod,) = writers(tmp_path, "pod-a")
    full, cached = cached_judges(tmp_path, monkeypatch)
    for second in range(0, 20, 2):
        flush_at(pod, traffic(t0, second), t0 + second + 2)
    same_poke(full, cached, window, t0 + 25)
    (stage,) = (tmp_path / "run").iterdir()
    both_read = {p.name for p in stage.iterdir()}
    for second in range(20, 30, 2):
        flush_at(pod, traffic(t0, second), t0 + second + 2)
    assert same_poke(full, cached, window, t0 + 35).attrs["files_opened"] == 5  # poke A
    (a_wrote,) = [p for p in stage.iterdir() if p.name not in both_read]
    aside = a_wrote.rename(tmp_path / a_wrote.name)  # (poke B lists the cache before A writes)
    for second in range(30, 40, 2):
        flush_at(pod, traffic(t0, second), t0 + second + 2)
    assert same_poke(full, cached, window, t0 + 45).attrs["files_opened"] == 10  # poke B, from the cache A read
    aside.rename(a_wrote)  # A's write lands
    assert same_poke(full, cached, window, t0 + 46).attrs["files_opened"] == 0  # none lost, none twice
    assert same_poke(full, cached, window, t0 + 47).attrs["files_opened"] == 0


def test_a_poke_writes_what_it_read_new_not_the_whole_cache(tmp_path, monkeypatch):
    """Each poke that read new files wrote the stage's whole cache again (pods flush every 2 s:
    nearly every poke; 31 MB for a million records, seconds a poke). A poke writes the records
    of the files it read new, and the cache's parts are merged so that they stay few: each
    poke's bytes are those of its new files, but at a merge of parts as large as they are."""

    from vision_rollout import logcache
    from vision_rollout.folders import Folder

    t0 = one_hours_t0()
    window = StageWindow(0, 50, t0)
    (pod,) = writers(tmp_path, "pod-a")
    full, cached = cached_judges(tmp_path, monkeypatch)
    for second in range(0, 80, 2):
        flush_at(pod, traffic(t0, second), t0 + second + 2)
    same_poke(full, cached, window, t0 + 85)
    files = lambda: [p for p in (tmp_path / "run").rglob("*") if p.is_file()]  # noqa: E731
    whole = sum(p.stat().st_size for p in files())
    written: list[int] = []
    write = Folder.write
    monkeypatch.setattr(Folder, "write", lambda self, name, data: written.append(len(data)) or write(self, name, data))
    flush_at(pod, traffic(t0, 80), t0 + 86)
    assert same_poke(full, cached, window, t0 + 87).attrs["files_opened"] == 1
    assert 0 < sum(written) < whole / 5
    merges, rewrites = 0, 0
    for second in range(82, 160, 2):  # a poke each flush: the parts stay few
        flush_at(pod, traffic(t0, second), t0 + second + 2)
        written.clear()
        assert cached.records(window, t0 + second + 3).attrs["files_opened"] == 1
        assert len(written) in (1, 2)
        assert written[0] < whole / 5
        merges += sum(written[1:])
        rewrites += sum(p.stat().st_size for p in files())
        assert len(files()) <= 8 < logcache.MAX_PARTS
    assert merges < rewrites / 4, (merges, rewrites)
    assert same_poke(full, cached, window, t0 + 165).attrs["files_opened"] == 0


def four_part_stage_cache(tmp_path):
    """A stage's cache under ``tmp_path/run`` of four parts, each of an empty log file: (its
    stage's start, its columns, the log's URI, the cache's folder)."""
    from datetime import UTC, datetime

    from model_server.predictionlog import read_schema
    from vision_rollout import logcache
    from vision_rollout.folders import Folder

    start, columns, log_uri = datetime.now(UTC), ["label"], str(tmp_path / "log")
    cache = logcache.name(log_uri, "digits", start, columns)
    stage = Folder(str(tmp_path / "run")) / cache
    empty = read_schema(columns, written=True).empty_table()
    for k in range(4):
        stage.write(f"{k:032x}.parquet", logcache._encode(cache, [(f"{log_uri}/f{k}", empty, 0)]))
    return start, columns, log_uri, stage


def test_a_poke_reads_no_cache_part_once_its_deadline_passed(tmp_path, monkeypatch):
    """A poke read every part of its stage's cache whatever its deadline (a stalled object store:
    about 30 s a part, a poke of 16 parts taking minutes past its own). A part's read begins only
    before the poke's deadline; those not read are read as none, left alone."""
    from vision_rollout import logcache
    from vision_rollout.folders import Folder

    start, columns, log_uri, stage = four_part_stage_cache(tmp_path)
    now = [0.0]
    reads: list[str] = []
    read_within = Folder.read_within

    def stalled(self, name, limit):  # (each GET takes 30 s)
        reads.append(name)
        now[0] += 30
        return read_within(self, name, limit)

    monkeypatch.setattr(Folder, "read_within", stalled)
    logcache.stage_records(
        Folder(str(tmp_path / "run")), log_uri, start, start, "digits", columns, deadline=10.0, clock=lambda: now[0]
    )
    assert len(reads) == 1
    assert len(stage.names()) == 4  # (those not read: left alone)


def test_a_stage_cache_holding_more_files_than_a_listing_takes_is_not_used(tmp_path, monkeypatch):
    """A stage's cache folder was listed whole, and what was listed taken for the whole cache. One
    holding more than ``MAX_LISTED`` files (not one the cache wrote) is listed in part: not used,
    none of its parts read, the log read instead."""
    from vision_rollout import folders, logcache
    from vision_rollout.folders import Folder

    start, columns, log_uri, _ = four_part_stage_cache(tmp_path)
    reads: list[str] = []
    read_within = Folder.read_within
    monkeypatch.setattr(Folder, "read_within", lambda self, n, limit: reads.append(n) or read_within(self, n, limit))
    monkeypatch.setattr(folders, "MAX_LISTED", 3, raising=False)
    logcache.stage_records(Folder(str(tmp_path / "run")), log_uri, start, start, "digits", columns)
    assert reads == []


def test_a_stage_cache_in_an_object_store_is_read_and_removed_there(tmp_path, monkeypatch, s3):
    """In kubernetes mode the run folder is an object store: each poke on another pod."""

    from vision_rollout.folders import Folder

    t0 = one_hours_t0()
    window = StageWindow(0, 50, t0)
    (pod,) = writers(tmp_path, "pod-a")
    run = s3.uri()
    full, cached = cached_judges(tmp_path, monkeypatch, run)
    for second in range(0, 20, 2):
        flush_at(pod, traffic(t0, second), t0 + second + 2)
    assert same_poke(full, cached, window, t0 + 25).attrs["files_opened"] == 10
    flush_at(pod, traffic(t0, 20, "BACKEND"), t0 + 22)
    assert same_poke(full, cached, window, t0 + 26).attrs["files_opened"] == 1
    (stage,) = Folder(run).folders()
    assert Folder(run).names() == []
    assert len((Folder(run) / stage).names()) == 2
    assert cached(window, t0 + 45).status == "fail"
    assert Folder(run).names() == []
    assert Folder(run).folders() == []


def test_a_file_among_the_caches_no_folder_takes_does_not_stop_their_pruning(tmp_path):
    """A name with a backslash (copied in from elsewhere) sorted first and raised at every pass:
    no cache after it was removed again."""
    import time

    from vision_rollout import logcache
    from vision_rollout.folders import Folder

    caches = tmp_path / "caches"
    caches.mkdir()
    stale = f"{int(time.time()) - logcache.MAX_AGE_S - 10}-{0:024x}.parquet"
    odd = ["1-a\\b.parquet"]
    for name in [stale, *odd]:
        (caches / name).write_bytes(b"x")
    assert logcache.prune(Folder(str(caches))) == [stale]
    assert sorted(p.name for p in caches.iterdir()) == sorted(odd)
    logcache._prune(Folder(str(caches)), "2-x.parquet")
    assert sorted(p.name for p in caches.iterdir()) == sorted(odd)


def test_a_stage_cache_folder_is_pruned_with_its_parts_and_killed_writes(tmp_path):
    """A stage's cache is a folder of parts: pruned whole once its stage started over MAX_AGE_S
    ago, or past MAX_CACHES; a live stage's part being written (a hidden temporary) is kept
    until an hour old."""
    import os
    import time

    from vision_rollout import logcache
    from vision_rollout.folders import Folder

    caches = tmp_path / "caches"
    now = int(time.time())
    stale, live = caches / f"{now - logcache.MAX_AGE_S - 60}-{0:024x}", caches / f"{now - 600}-{1:024x}"
    for stage in (stale, live):
        stage.mkdir(parents=True)
        for part in (f"{0:032x}.parquet", f".{1:032x}.parquet.77.tmp"):
            (stage / part).write_bytes(b"x")
    (live / f".{2:032x}.parquet.78.tmp").write_bytes(b"x")
    os.utime(live / f".{2:032x}.parquet.78.tmp", (now - 7200, now - 7200))
    assert logcache.prune(Folder(str(caches)), dry_run=True) == [stale.name, f"{live.name}/.{2:032x}.parquet.78.tmp"]
    assert len(list(caches.iterdir())) == 2
    assert logcache.prune(Folder(str(caches))) == [stale.name, f"{live.name}/.{2:032x}.parquet.78.tmp"]
    assert sorted(p.name for p in caches.iterdir()) == [live.name]
    assert sorted(p.name for p in live.iterdir()) == [f".{1:032x}.parquet.77.tmp", f"{0:032x}.parquet"]
    for k in range(2, 40):
        (caches / f"{now - k}-{k:024x}").mkdir()
        (caches / f"{now - k}-{k:024x}" / f"{0:032x}.parquet").write_bytes(b"x")
    logcache._prune(Folder(str(caches)), f"{now - 2}-{2:024x}")
    assert len(list(caches.iterdir())) == logcache.MAX_CACHES
    assert (caches / f"{now - 33}-{33:024x}").exists()
    assert not (caches / f"{now - 34}-{34:024x}").exists()
    assert not live.exists()  # (the oldest)


def test_the_caches_are_bounded_in_number_age_and_size(tmp_path, monkeypatch):
    import time

    from vision_rollout import logcache
    from vision_rollout.folders import Folder

    caches = tmp_path / "caches"
    caches.mkdir()
    now = int(time.time())
    for k in range(40):
        (caches / f"{now - k}-{k:024x}.parquet").write_bytes(b"x")
    (caches / f"{now - logcache.MAX_AGE_S - 10}-old.parquet").write_bytes(b"x")
    logcache._prune(Folder(str(caches)), f"{now}-{0:024x}.parquet")
    left = sorted(p.name for p in caches.iterdir())
    assert len(left) == logcache.MAX_CACHES
    assert f"{now - 31}-{31:024x}.parquet" in left
    assert f"{now - 32}-{32:024x}.parquet" not in left
    monkeypatch.setattr(logcache, "MAX_BYTES", 100)
    t0 = one_hours_t0()
    (tmp_path / "small").mkdir()
    (pod,) = writers(tmp_path / "small", "pod-a")
    flush_at(pod, traffic(t0, 0), t0 + 2)
    full, cached = cached_judges(tmp_path / "small", monkeypatch)
    assert same_poke(full, cached, StageWindow(0, 50, t0), t0 + 5).attrs["files_opened"] == 1
    assert not (tmp_path / "small" / "run").exists()  # over MAX_BYTES: not written


def test_a_wait_with_no_live_request_in_one_arm_says_the_replay_is_no_live_traffic():
    """The error-rate line counts the replay's requests per arm; the latency projection counts
    live ones: its sentence names which."""
    from vision_rollout.engine import projection

    assert projection(spec(), 500, 0.0) == (
        " No live requests have reached one arm yet (the validation replay's are no live traffic)."
    )
    assert projection(spec(), 500, 0.0, "replay") == " No replay requests have reached one arm yet."
    assert "requests/s into the slower arm" in projection(spec(), 50_000, 1.0)


def test_whether_a_log_read_is_the_one_a_server_writes_is_told_where_it_can_be(tmp_path):
    from vision_rollout.engine import loopback, other_log

    assert other_log("s3://b/predictions?region=x", "s3://b/predictions", False) is None
    assert other_log("s3://b/predictions", "s3://b/other", False) == "it writes s3://b/other"
    assert other_log("s3://b/p", None, False) == "it writes none (it was started without --prediction-log)"
    (tmp_path / "b").mkdir()
    theirs = f"file://{(tmp_path / 'b').resolve()}"
    assert other_log(str(tmp_path / "a"), theirs, True) == f"it writes {theirs}"
    assert other_log(str(tmp_path / "b"), theirs, True) is None
    assert other_log(str(tmp_path / "a"), theirs, False) is None  # (another machine: another mount)
    # (a server in a container on this machine: its folder is the container's, not here)
    assert other_log(str(tmp_path / "a"), f"file://{tmp_path / 'none'}", True) is None
    assert other_log("/mnt/bucket/p", "s3://bucket/p", True) is None  # (a FUSE mount may be either)
    assert [loopback(a) for a in ("127.0.0.1:8000", "localhost:1", "[::1]:80", "10.0.0.1:80", "svc:80")] == [
        True,
        True,
        True,
        False,
        False,
    ]


@pytest.mark.integration
def test_a_stage_reading_another_log_than_the_servers_fails_at_its_first_poke(
    server_factory, repo_copy, tmp_path, monkeypatch
):
    """A rollout reading another log than the model server writes found out only once a flush
    and a replay round had passed with no record (over a minute into the stage, the candidate
    holding its share meanwhile). The server says where it writes: the first poke fails, naming
    both, and sends no replay round; reading the log it writes, the stage goes on."""
    from vision_rollout.engine import StageJudge

    s = server_factory(repo_copy, "--prediction-log", str(tmp_path / "written"), token=TOKEN)
    address = f"127.0.0.1:{s.port}"
    judge = StageJudge(spec(), address, tmp_path, str(tmp_path / "elsewhere"), _labels=IMAGES, token=TOKEN)
    monkeypatch.setattr(judge, "replay_round", lambda: pytest.fail("a replay round was sent"))
    state = judge(WINDOW, T0 + 1)
    assert state.status == "breach"
    assert state.reason.startswith(
        f"the prediction log {tmp_path / 'elsewhere'} is not the one the model server at {address} writes: "
        f"it writes file://{(tmp_path / 'written').resolve()}; "
    )
    right = StageJudge(spec(), address, tmp_path, str(tmp_path / "written"), _labels=IMAGES)
    monkeypatch.setattr(right, "replay_round", lambda: None)
    assert not right(WINDOW, T0 + 1).done


def test_a_poke_on_a_slow_store_reads_for_its_time_and_judges_nothing_on_a_part(tmp_path, monkeypatch):
    """A poke read every file of the stage its cache did not cover, however long that took: on a
    slow store (here 10 s a file) the first poke of a long stage ran past the model's lease (300
    s). A poke begins no listing nor file after ``read_s``; it judges no look on the part it read
    (which files that is follows their names, a pod's before another's), holds naming what it
    left, and keeps what it read in the stage's cache: the next pokes go on from there, and
    once the stage's files are all read the looks are judged as a whole read judges them."""
    import time

    from model_server import predictionlog
    from tests.support import SlowStore

    t0 = one_hours_t0()
    window = StageWindow(0, 50, t0)
    [pod] = writers(tmp_path, "pod-a")
    for second in range(0, 80, 2):
        flush_at(pod, traffic(t0, second, "BACKEND" if second >= 40 else ""), t0 + second + 2)
    full, cached = cached_judges(tmp_path, monkeypatch)
    whole = full(window, t0 + 95)
    assert whole.status == "fail", whole.reason
    store = SlowStore(time.monotonic(), per_file=10.0)
    monkeypatch.setattr(predictionlog, "filesystem", store.filesystem)
    cached.read_s, cached.read_clock = 100.0, store.clock
    held = cached(window, t0 + 95)
    assert store.opened < 40
    assert (held.status, held.look) == ("waiting", 0), held.reason
    assert "prediction log files of the stage not read within the poke's" in held.reason
    assert "nothing is judged on part of them" in held.reason
    states = [held]
    while states[-1].status == "waiting" and len(states) < 6:
        states.append(cached(window, t0 + 95))
    assert (states[-1].status, states[-1].look, states[-1].reason) == (whole.status, whole.look, whole.reason)
    assert len(states) > 2  # (a poke's time each, not one read of the stage)
    assert store.opened == 40


@pytest.mark.parametrize("through", ["log", "cache"])
def test_a_poke_holds_the_stage_records_it_reads_to_its_memory_bound(tmp_path, monkeypatch, through):
    """A poke read every record of the stage into memory whatever their size (the log whole,
    or the stage's cache parts all concatenated, then the files they did not cover): a busy
    stage's hours of records ran the worker out of memory, killed and retried, poke after poke.
    Its reads are held to ``read_bytes`` (``MAX_POKE_BYTES``), the cache's parts counted in:
    the files beyond are left unread, counted, and no look is judged on the part read (the
    stage holds, naming the bound), as under a poke's time."""
    from vision_rollout import engine

    t0 = one_hours_t0()
    window = StageWindow(0, 50, t0)
    [pod] = writers(tmp_path, "pod-a")
    for second in range(0, 40, 2):
        flush_at(pod, traffic(t0, second), t0 + second + 2)
    full, cached = cached_judges(tmp_path, monkeypatch)
    judge = cached if through == "cache" else full
    whole = judge.records(window, t0 + 95)  # (through the cache: its parts written, the bound not yet in force)
    assert whole.attrs["unread_files"] == 0
    assert len(whole) > 700
    monkeypatch.setattr(judge, "read_bytes", 4096, raising=False)  # (a file's records take more)
    monkeypatch.setattr(engine, "MAX_POKE_BYTES", judge.read_bytes, raising=False)
    part = judge.records(window, t0 + 95)
    assert part.attrs["unread_files"] > 0
    assert not part.attrs["out_of_time"]
    assert len(part) < len(whole)
    held = judge(window, t0 + 95)
    assert (held.status, held.look) == ("waiting", 0), held.reason
    assert "not read within the poke's memory bound" in held.reason


def test_a_p99_excursion_under_way_at_the_last_look_holds_the_stage_not_rolls_it_back():
    """The canary's P99 above its limit for the last 20 s (a breach under way, far from the 120 s
    that roll back) at the poke that found the last look due: the guard held every look, so the
    last one read "wait", and the stage ended undecided ("the estimate sits on the margin; no
    sample size resolves it"), an equal canary rolled back by a spike the guard allows. A guard
    holding the last look holds the stage, as a guard without data does: the stage passes once
    the excursion ends, fails if it lasts the breach's time, and is undecided at max_stage_seconds."""
    s = spec()
    log = records(400, 40, 50)
    now = T0 + 120
    quiet = tuple((T0 + t, 20.0) for t in range(0, 120, 5))
    under_way = tuple((t, 90.0 if t >= now - 20 else v) for t, v in quiet)
    assert judge_stage(s, WINDOW, log, IMAGES, now, GuardInputs(p99_series_ms=quiet)).status == "pass"
    held = judge_stage(s, WINDOW, log, IMAGES, now, GuardInputs(p99_series_ms=under_way))
    assert held.status == "waiting", held.reason
    assert "Canary P99 is 90.0 ms" in held.reason
    ended = (*under_way, (now + 5, 20.0))
    assert judge_stage(s, WINDOW, log, IMAGES, now + 5, GuardInputs(p99_series_ms=ended)).status == "pass"
    late = tuple((t + s.max_stage_seconds, v) for t, v in under_way)
    over = judge_stage(s, WINDOW, log, IMAGES, now + s.max_stage_seconds, GuardInputs(p99_series_ms=late))
    assert over.status == "undecided"
    assert "Canary P99 is 90.0 ms" in over.reason
    assert "Waiting beside it" not in over.reason  # (nothing else waits)
    # A check that waits beside the guard is named too (the reason named the guard alone: the
    # excursion's end left a stage still undecided that its report had not said was).
    fine = spec(latency_margin=0.01)  # (finer than this traffic resolves)
    both = judge_stage(fine, WINDOW, log, IMAGES, now + fine.max_stage_seconds, GuardInputs(p99_series_ms=late))
    assert both.status == "undecided"
    latency = next(c for c in both.verdict.checks if c.name == "latency_geomean")
    assert latency.decision == "wait"
    assert "Canary P99 is 90.0 ms" in both.reason
    assert f"Waiting beside it: {latency.sentence}" in both.reason


def test_a_guard_file_a_killed_removal_left_does_not_keep_a_stage_cache_folder(tmp_path):
    """A removal on a disk locks ``.<name>.lock`` beside the file and removes it once done: a
    merge or prune killed after removing a part, before removing its guard, left the guard,
    and the stage's folder was never removed (not empty). The prune removes it under its lock,
    and the folder with it."""
    import time

    from vision_rollout import logcache
    from vision_rollout.folders import Folder

    caches = tmp_path / "caches"
    stale = caches / f"{int(time.time()) - logcache.MAX_AGE_S - 60}-{0:024x}"
    stale.mkdir(parents=True)
    (stale / f"{0:032x}.parquet").write_bytes(b"x")
    (stale / f".{1:032x}.parquet.lock").write_bytes(b"")  # (its part removed, the removal killed)
    assert logcache.prune(Folder(str(caches))) == [stale.name]
    assert list(caches.iterdir()) == []
