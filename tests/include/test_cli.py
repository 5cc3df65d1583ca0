"""rolloutctl: each command and its exit codes."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from devstack.processes import free_port
from model_server.traffic import TrafficPolicy
from tests.support import TOKEN, samples, shadow_log
from vision_rollout.cli import main
from vision_rollout.locks import FileLock
from vision_rollout.mesh import validate_istio


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("ratio", "n", "code"), [(1.0, 3000, 0), (1.3, 3000, 1), (1.0, 30, 3)])
def test_gate_exit_codes(tmp_path, capsys, ratio, n, code):
    path = tmp_path / "samples.csv"
    samples(n, ratio=ratio).to_csv(path, index=False)
    assert run(capsys, "gate", "--samples", str(path))[0] == code


def test_gate_reads_parquet_takes_config_and_prints_json(tmp_path, capsys):
    path = tmp_path / "samples.parquet"
    samples(3000).to_parquet(path)
    code, out, _ = run(
        capsys, "gate", "--samples", str(path), "--look", "2", "--looks", "5", "--set", "alpha=0.01", "--json"
    )
    verdict = json.loads(out)
    assert (verdict["look"], verdict["looks"], verdict["alpha"]) == (2, 5, 0.01)
    assert code == {"pass": 0, "fail": 1, "wait": 3}[verdict["decision"]]


def test_gate_judges_a_look_at_the_information_of_the_looks_before_it_as_the_dag_does(tmp_path, capsys):
    """The DAG computes look k's boundary at the information looks 1..k saw (``judge_stage``);
    ``gate --look --looks`` could only judge at k/K, equal increments, and answered another level
    than the DAG's for the same samples under rising traffic. ``--information`` takes the earlier
    looks' per check (the smaller arm's latency samples, requests and live labels at each); this
    look's is counted in the samples."""
    from vision_rollout.gates import nominal_alpha

    path = tmp_path / "samples.csv"
    samples(3000).to_csv(path, index=False)
    argv = ("gate", "--samples", str(path), "--look", "3", "--looks", "10", "--set", "spending=pocock", "--json")
    code, out, err = run(capsys, *argv, "--information", "100/100/0, 1000/1000/0")
    assert code in (0, 1, 3), err
    level = json.loads(out)["nominal_alpha"]
    assert level == pytest.approx(nominal_alpha(0.05, 3, 10, "pocock", (100, 1000, 3000)), rel=1e-9)
    _, out, _ = run(capsys, *argv)
    assert json.loads(out)["nominal_alpha"] == pytest.approx(nominal_alpha(0.05, 3, 10, "pocock"), rel=1e-9)
    assert json.loads(out)["nominal_alpha"] != pytest.approx(level, rel=1e-3)  # what the DAG's look 3 is not
    code, out, err = run(capsys, "gate", "--samples", str(path), "--information", "", "--json")
    assert (code, json.loads(out)["nominal_alpha"]) == (0, pytest.approx(0.05)), err  # look 1: none before it


def test_gate_reads_the_latencies_of_the_source_the_dags_stage_judged(tmp_path, capsys):
    """The DAG's stage judges latency on one source of its samples (``StageWindow.latency_from``:
    the live arms below 100%, the validation replay at 100%), and its verdict's latency
    sentences name it; ``gate`` had no way to say which and read every row, so a reviewer
    re-running a 25% stage's look from its samples (live arms alike, the loaded candidate's
    replay 30% slower) got a failure where the DAG passed, and ``--information`` counted this
    look's latency information over every row. ``--latency-from`` reads the rows the DAG read,
    for the latency checks, the sample minimum and ``--information``."""
    import pandas as pd

    from vision_rollout.gates import evaluate_gate, look_information, nominal_alpha

    live = samples(3000).assign(source="live")
    replay = samples(1000, ratio=1.3, seed=1).assign(source="replay")
    both = pd.concat([live, replay], ignore_index=True)
    path = tmp_path / "samples.csv"
    both.to_csv(path, index=False)
    argv = ("gate", "--samples", str(path), "--json")
    code, out, err = run(capsys, *argv, "--latency-from", "live")
    verdict = json.loads(out)
    assert verdict == json.loads(json.dumps(evaluate_gate(both, latency_from="live").to_dict())), err
    assert (code, verdict["decision"]) == (0, "pass")
    latency = next(c for c in verdict["checks"] if c["name"] == "latency_geomean")
    assert latency["sentence"].startswith("Live A/B arms: ")
    assert (latency["n_baseline"], latency["n_canary"]) == (3000, 3000)
    code, out, _ = run(capsys, *argv, "--latency-from", "replay")
    assert (code, json.loads(out)["decision"]) == (1, "fail")
    # The boundaries at the information the DAG counts: this look's live latencies, not every row's.
    code, out, err = run(
        capsys, *argv, "--latency-from", "live", "--look", "2", "--looks", "5", "--information", "500/900/0"
    )
    assert code in (0, 1, 3), err
    seen = (500, look_information(both, "live").latency)
    assert seen[1] == 3000
    assert json.loads(out)["nominal_alpha"] == pytest.approx(nominal_alpha(0.05, 2, 5, information=seen), rel=1e-9)


@pytest.mark.parametrize(
    ("source", "rows", "said"),
    [
        ("Live", ["live"], "--latency-from takes live or replay, not 'Live'"),
        ("live", None, "--latency-from live: the samples have no source column (live or replay on each row"),
        (
            "replay",
            ["live", "Replay"],
            "--latency-from replay: a sample's source must be live or replay (or empty), found 'Replay'",
        ),
    ],
)
def test_gate_latency_from_refused_with_what_is_wrong(tmp_path, capsys, source, rows, said):
    data = samples(300)
    if rows is not None:
        data["source"] = [rows[i % len(rows)] for i in range(len(data))]
    path = tmp_path / "samples.csv"
    data.to_csv(path, index=False)
    code, out, err = run(capsys, "gate", "--samples", str(path), "--latency-from", source)
    assert (code, out) == (2, "")
    assert said in err


def _dags_look(monkeypatch, tmp_path, s, window, log, now, judged_as=None, guards=None) -> tuple:
    """``judge_stage``'s poke at ``window`` of ``log`` at ``now`` (under the spec ``judged_as``, else
    ``s``; the guards read from Prometheus ``guards``), as the DAG's sensor takes it: its stage's state (its verdict the last look's judged,
    None before one, as at a hard guard's breach), ``gate``'s argv on the stage's samples as that
    poke read them (those before ``now`` less the settle time) with ``s`` as the spec file, its look
    (the first before one) and the earlier looks' information, and the arguments that judge it as
    the DAG's stage (its number and start, a validation round's images, no Prometheus)."""
    from tests.include.test_engine import IMAGES
    from vision_rollout import engine
    from vision_rollout.engine import SETTLE_S, judge_stage, stage_samples

    judged = engine.evaluate_gate
    seen: list = []

    def evaluate_gate(samples, *args, **kwargs):  # (the information of the DAG's looks)
        seen[:] = kwargs["information"]
        return judged(samples, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate_gate", evaluate_gate)
    if window.started > time.time():  # (T0 lies ahead of the present until 2027: the present then, after the poke)
        monkeypatch.setattr(time, "time", lambda: now + 3600)
    state = judge_stage(judged_as or s, window, log, IMAGES, now, guards)
    path, spec_file = tmp_path / "samples.parquet", tmp_path / "spec.json"
    stage_samples(log, s, window, now - SETTLE_S, IMAGES).to_parquet(path)
    spec_file.write_text(json.dumps(s.to_dict()))
    earlier = ",".join(f"{i.latency}/{i.requests}/{i.labels}" for i in seen[:-1])
    argv = ("gate", "--samples", str(path), "--spec", str(spec_file), "--look", str(max(state.look, 1)))
    stage = ("--stage", str(window.index + 1), "--started", repr(window.started), "--replay-images", str(len(IMAGES)))
    return state, (*argv, f"--information={earlier}"), (*stage, "--no-hard-guards")


UNGUARDED = "without the P99, shadow-error and restart guards: --no-hard-guards"


def _said(verdict) -> dict:
    """A verdict as ``gate --stage --no-hard-guards --json`` prints it: which guards it did not judge."""
    return {**json.loads(json.dumps(verdict.to_dict())), "unguarded": UNGUARDED}


@pytest.mark.parametrize("stage", ["100% after 50%", "25% before 50%"])
def test_gate_judges_a_stage_of_the_spec_as_the_dag_did(tmp_path, capsys, monkeypatch, stage):
    """Two settings of the DAG's stages ``gate`` could not give: at 100% after an earlier stage the
    latency comparison (the loaded candidate's replay against an idle baseline's) is reported, not
    judged, and a stage's last look left undecided by latency alone carries it to the next stage
    below 100% (``StageWindow``). Re-run offline on the look's samples with --latency-from replay,
    the 100% stage failed where the DAG passed it, and the 25% stage waited where the DAG passed.
    ``--spec FILE --stage N`` judges the look as the DAG judged that stage of the spec (its config,
    looks and latency source from there too): the same verdict on the same samples."""
    from tests.include.test_engine import T0, queued, records, spec
    from vision_rollout.engine import StageWindow

    if stage == "100% after 50%":  # the candidate as fast as the baseline, its replay queued under load
        s, window, log, now, alone = spec(), StageWindow(1, 100, T0), queued(records(400, 40, 100)), T0 + 106, "fail"
    else:  # a latency margin finer than the 25% arm resolves by the last look
        s = spec(stages=[25, 50, 100], latency_margin=0.01, error_margin=0.005)
        window, log, now, alone = StageWindow(0, 25, T0), records(310, 10, 25, replay_every=50), T0 + 300, "wait"
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, window, log, now)
    assert state.status == "pass"
    argv += ("--json",)
    code, out, _ = run(capsys, *argv, *stage)
    assert (code, json.loads(out)) == (0, _said(state.verdict))
    code, out, _ = run(capsys, *argv, "--latency-from", window.latency_from)  # (no stage: latency judged)
    assert json.loads(out)["decision"] == alone


def test_gate_judges_a_stage_whose_window_moved_at_its_level_as_the_dag_did(tmp_path, capsys, monkeypatch):
    """A stage whose window moved (its weights applied again long after its looks began) is
    judged by the DAG at the share of alpha its earlier windows left (``Attempt.level``: the spec's
    alpha times it); ``gate --spec --stage`` judged it at the spec's alpha, more lenient than the
    DAG. ``--level L`` judges it at that share, as the DAG did: the same verdict."""
    from tests.include.test_engine import T0, records, spec
    from vision_rollout.engine import StageWindow

    s = spec(stages=[25, 50, 100], latency_margin=0.01, error_margin=0.005)
    window, log, now = StageWindow(0, 25, T0), records(310, 10, 25, replay_every=50), T0 + 300
    at_half = replace(s, alpha=s.alpha * 0.5)  # (as steps.wait_for_stage at level 0.5)
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, window, log, now, judged_as=at_half)
    argv += (*stage, "--json")
    _, out, _ = run(capsys, *argv, "--level", "0.5")
    assert json.loads(out) == _said(state.verdict)
    _, out, _ = run(capsys, *argv)  # (the spec's alpha: the window's first level)
    assert json.loads(out)["alpha"] == s.alpha


def test_gate_judges_a_look_before_the_first_whole_validation_round_as_the_dag_did(tmp_path, capsys, monkeypatch):
    """The DAG's stage judges the paired accuracy check on a whole validation round only (its
    validation set's images, ``judge_stage``'s ``replay_images``), and until one is in that check
    waits and holds the look; ``gate`` had no way to say a round's size and judged the pairs it
    was given: offline PASS for a look the DAG held (450 of its 500 images answered by both
    versions). ``--replay-images N`` judges it as the DAG did, and ``--stage`` takes it (the
    DAG's stages always replay)."""
    from tests.include.test_engine import T0, WINDOW, records, spec

    s = spec(error_margin=0.02)
    log = records(400, 40, 50, replay_every=50)
    log = log[~log["request_id"].str.match(r"replay-0-1-4[5-9]\d$")]  # (the candidate's last 50 of round 1 late)
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, log, T0 + 45)
    verdict = state.verdict
    assert (state.status, verdict.look, verdict.decision) == ("waiting", 2, "wait")
    held = [c for c in verdict.checks if c.decision == "wait" and c.blocks_pass]
    assert [c.name for c in held] == ["accuracy_paired"]
    assert held[0].sentence.startswith("Validation replay: 450 of 500 images answered by both versions")
    code, out, _ = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)) == (3, _said(verdict))
    code, out, err = run(capsys, *argv, "--latency-from", "live", "--json")  # (no round's size: the pairs judged)
    assert (code, json.loads(out)["decision"]) == (0, "pass"), err


def test_gate_judges_a_stage_under_its_hard_guards_as_the_dag_did(tmp_path, capsys, monkeypatch):
    """The DAG's poke checks the stage's hard guards before its looks (``judge_stage``) and rolls
    back on one that trips: the replay's accuracy drop over its 0.5 pp limit (the demo's version
    3: +5.33 pp). ``gate --stage`` judged the statistics alone and said PASS for the look the DAG
    rolled back on (a 0.6 pp drop, within the paired check's 2 pp margin). It judges the guards as
    the DAG did: the accuracy drop from the samples, those on Prometheus with --prometheus, and
    with --no-hard-guards says which it did not judge."""
    from tests.include.test_engine import T0, WINDOW, records, spec

    s = spec(error_margin=0.02, looks_per_stage=1)
    log = records(106, 40, 50, accuracy=(1.0, 0.994))
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, log, T0 + 106)  # (its look due at 100 s)
    assert (state.status, state.look) == ("breach", 0)
    assert state.reason == "hard guard tripped: Accuracy drop on the validation batch is +0.60 pp (limit 0.5 pp)."
    code, out, err = run(capsys, *argv, *stage)
    unguarded = " (without the P99, shadow-error and restart guards: --no-hard-guards)"
    assert (code, out.splitlines()[0]) == (1, state.reason + unguarded)
    assert "  [fail] guard_accuracy_drop: Accuracy drop on the validation batch is +0.60 pp" in out
    assert err == f"rolloutctl gate: warning: no Prometheus{unguarded}\n"
    code, out, _ = run(capsys, *argv, *stage, "--json")  # (stdout alone says the guards it did not judge)
    said = json.loads(out)
    assert (code, said["decision"], said["summary"], said["unguarded"]) == (1, "fail", state.reason, UNGUARDED)
    code, out, _ = run(capsys, *argv, "--latency-from", "live", "--replay-images", "500")  # (statistics alone)
    assert (code, out.split(" (")[0]) == (0, "PASS at look 1 of 1")


def test_gate_reads_the_hard_guards_on_prometheus_over_the_stage_as_the_dag_did(tmp_path, capsys, monkeypatch):
    """``gate --stage --prometheus URL`` reads the guards on Prometheus as the DAG's poke that first
    judged the look did (``engine.guard_inputs`` over the stage from its start to the look's time
    and the settle time), and fails the look on a sustained P99 breach as the DAG rolled back; one
    it cannot read is an error (exit 4), nothing judged, as the DAG's stage holds."""
    from tests.include.test_engine import T0, WINDOW, records, spec
    from vision_rollout import engine
    from vision_rollout.engine import SETTLE_S
    from vision_rollout.gates import GuardInputs

    s = spec(error_margin=0.02, looks_per_stage=1)
    breach = GuardInputs(p99_series_ms=tuple((T0 + t, 80.0) for t in range(0, 200, 10)), restarts=0)
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, records(106, 40, 50), T0 + 106, guards=breach)
    assert state.status == "breach"
    assert state.reason.startswith("hard guard tripped: Canary P99 is 80.0 ms (limit 60 ms)")
    read: list = []

    def guard_inputs(source, spec, now=None, since=None, past=False):
        read.append((source.url, spec, now, since, past))
        return breach

    monkeypatch.setattr(engine, "guard_inputs", guard_inputs)
    url = f"http://127.0.0.1:{free_port()}"
    stage = (*stage[:-1], "--prometheus", url)
    code, out, err = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)["summary"], err) == (1, state.reason, "")
    assert read == [(url, s, pytest.approx(T0 + s.bake_seconds + SETTLE_S), T0, True)]  # (its look at the bake's end)
    monkeypatch.setattr(engine, "guard_inputs", lambda *a, **k: GuardInputs(unavailable="Prometheus is down"))
    code, out, err = run(capsys, *argv, *stage)
    assert (code, out) == (4, "")
    assert (
        f"--prometheus {url}: the hard guards cannot be read, Prometheus cannot be used there (Prometheus is down)"
        in err
    )


def test_gate_fails_a_look_the_dag_failed_with_prometheus_read_in_part(tmp_path, capsys, monkeypatch):
    """The DAG's poke reading the hard guards in part (Prometheus down, one guard without data)
    still rolls the stage back on a guard it read tripped, or on a look that fails (a failure
    needs no guard: ``judge_stage``), and holds it otherwise. ``gate --stage --prometheus`` read
    in part ended every look with exit 4, "nothing judged", the failures too. It fails those as
    the DAG did (exit 1, saying which guards it could not read), and judges nothing else: a look
    that does not fail passes or trips there on the guards not read, saying so, and that the samples
    end well before the look's time where they do (that warning was lost with nothing judged)."""
    from tests.include.test_engine import T0, WINDOW, records, spec
    from vision_rollout import engine
    from vision_rollout.gates import GuardInputs

    s = spec(error_margin=0.02, looks_per_stage=1)
    no_starts = "the start times of the candidate's serving processes have no data in Prometheus"
    p99 = GuardInputs(p99_series_ms=tuple((T0 + t, 80.0) for t in range(0, 200, 10)), missing=no_starts)
    down = GuardInputs(unavailable="Prometheus is down")
    url = f"http://127.0.0.1:{free_port()}"
    for guards, log, status in [(p99, records(106, 40, 50), "breach"), (down, records(106, 40, 50, 1.3), "fail")]:
        state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, log, T0 + 106, guards=guards)
        assert state.status == status
        monkeypatch.setattr(engine, "guard_inputs", lambda *a, guards=guards, **k: guards)
        code, out, err = run(capsys, *argv, *stage[:-1], "--prometheus", url, "--json")
        said = json.loads(out)
        assert (code, said["summary"]) == (1, state.reason), err
        unread = guards.unavailable or guards.missing
        assert f"the hard guards could not all be read ({unread})" in said["warning"]
        assert f"rolloutctl gate: warning: the hard guards could not all be read ({unread})" in err
    code, out, err = run(capsys, *argv, *stage[:-1], "--prometheus", url)  # (no --json)
    assert (code, out.splitlines()[0]) == (1, state.reason)
    monkeypatch.setattr(engine, "guard_inputs", lambda *a, **k: replace(p99, p99_series_ms=((T0, 8.0),)))
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, records(106, 40, 50), T0 + 106, guards=down)
    assert state.status == "waiting"  # (the DAG holds it)
    code, out, err = run(capsys, *argv, *stage[:-1], "--prometheus", url)
    assert (code, out) == (4, "")
    said = f"--prometheus {url}: the hard guards cannot be read, Prometheus answers there but a guard has no data ({no_starts})"
    assert said in err
    # Samples that end well before the look's time: said with nothing judged too (it was lost).
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, records(60, 40, 50), T0 + 106, guards=down)
    assert state.status == "waiting"
    code, out, err = run(capsys, *argv, *stage[:-1], "--prometheus", url, "--json")
    assert (code, json.loads(out)["exit"]) == (4, 4)
    assert "nothing judged" in err
    assert "; warning: the samples end 40 s before look 1's time (100 s into the stage)" in err


def test_gate_tells_a_prometheus_it_cannot_use_from_a_guard_without_data(tmp_path, capsys, monkeypatch):
    """``gate --stage --prometheus URL`` with a mistyped URL (nothing answers there) and with a
    Prometheus that answers but has no data for a guard both ended "the hard guards cannot be
    read (...); nothing judged", exit 4, the one told from the other only by the words inside the
    parentheses. Both stay exit 4 (the exit-code contract: a server that could not be used,
    nothing decided), their messages distinct: a URL to check, or a guard without data (on which
    the DAG's poke holds the stage too)."""
    from tests.include.test_engine import T0, WINDOW, records, spec
    from vision_rollout import engine
    from vision_rollout.gates import GuardInputs

    s = spec(error_margin=0.02, looks_per_stage=1)
    down = GuardInputs(unavailable="Prometheus is down")
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, records(106, 40, 50), T0 + 106, guards=down)
    assert state.status == "waiting"
    url = f"http://127.0.0.1:{free_port()}"  # (nothing listens there)
    code, out, err = run(capsys, *argv, *stage[:-1], "--prometheus", url)
    assert (code, out) == (4, "")
    assert f"--prometheus {url}: the hard guards cannot be read, Prometheus cannot be used there (" in err, err
    assert "): a mistyped URL, or Prometheus down; nothing judged" in err
    no_data = "the canary's P99 has no data in Prometheus (no series)"
    monkeypatch.setattr(engine, "guard_inputs", lambda *a, **k: GuardInputs(missing=no_data, restarts=0))
    code, out, err = run(capsys, *argv, *stage[:-1], "--prometheus", url)
    assert (code, out) == (4, "")
    said = f"--prometheus {url}: the hard guards cannot be read, Prometheus answers there but a guard has no data ({no_data})"
    assert said in err, err
    assert "mistyped" not in err


def test_gate_judges_the_replays_accuracy_drop_on_all_the_samples_its_poke_read(tmp_path, capsys, monkeypatch):
    """The DAG's poke judges the replay's accuracy-drop guard on every sample it read
    (``judge_stage``'s ``current``), and looks on those before their time: at 27 s into the stage
    its first whole validation round (answered at 20.5 s, after look 1's time) showed a 1 pp drop
    and it rolled back. ``gate --stage`` judged the guard on the samples cut at look 1's time, no
    whole round there, and said WAIT. It judges the guard on all the samples given: the breach."""
    from tests.include.test_engine import T0, WINDOW, records, spec

    s = spec(error_margin=0.02)  # (5 looks: the first at 20 s)
    log = records(60, 40, 50, accuracy=(1.0, 0.99), replay_every=20)
    log = log[~log["request_id"].str.startswith("replay-0-")]  # (the first whole round at 20.5 s)
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, log, T0 + 27)
    assert (state.status, state.look) == ("breach", 0)
    assert state.reason == "hard guard tripped: Accuracy drop on the validation batch is +1.00 pp (limit 0.5 pp)."
    code, out, _ = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)["summary"]) == (1, state.reason)


@pytest.mark.parametrize(
    ("scale", "shift", "said"),  # (--started: T0 times scale, plus shift)
    [
        (1, 50, "--started {started}: 7,047 of the 15,049 samples lie before it"),  # (a start 50 s late)
        (1000, 0, "--started {started}: in the future"),  # (milliseconds)
        (1, 0, "--started {started}: in the future"),  # (the samples' clock as far ahead)
        (1, -1000, "--started {started}: no sample lies between it and look 1's time"),  # (an earlier stage's)
    ],
)
def test_gate_refuses_a_stage_start_its_samples_do_not_fit(tmp_path, capsys, monkeypatch, scale, shift, said):
    """``--started`` in milliseconds, in the future, or later than the stage's start: gate cut the
    samples at a look's time they all lay before and said PASS on samples that were never the
    stage's, or at a start earlier than the samples' stage judged its look on none of them. The DAG
    takes a stage's samples from its start on (``engine.stage_samples``), before the present: a
    start the samples do not fit is a usage error naming --started, nothing judged."""
    from tests.include.test_engine import T0, WINDOW, records, spec

    s = spec(error_margin=0.02, looks_per_stage=1)
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, records(106, 40, 50), T0 + 106)
    assert state.status == "pass"
    if (scale, shift) == (1, 0):  # (the present an hour before the samples' clock, whatever the calendar)
        monkeypatch.setattr(time, "time", lambda: T0 - 3600)
    given = repr(T0 * scale + shift)
    stage = (*stage[:2], "--started", given, *stage[4:])
    code, out, err = run(capsys, *argv, *stage)
    assert (code, out) == (2, ""), out
    assert said.format(started=given) in err


def _labelled_after_the_look(monkeypatch, tmp_path) -> tuple:
    """``_dags_look``'s poke at 160 s into a stage whose one look is at 100 s, clients labelling each
    answer 50 s after it, the canary's live answers wrong from 50 s on (labelled after the look):
    the DAG passes the look on the labels received before its time."""
    import pandas as pd

    from tests.include.test_engine import T0, WINDOW, labels_for, records, spec

    s = spec(error_margin=0.02, looks_per_stage=1)
    log = records(106, 40, 50)
    labels = labels_for(log, 1)
    labels["time"] += pd.Timedelta(seconds=50)
    late = (
        (log["version"] == "2") & (log["route"] == "route") & (log["time"] >= pd.Timestamp(T0 + 50, unit="s", tz="UTC"))
    )
    log.loc[late, "top1"] = 0
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, pd.concat([log, labels]), T0 + 160)
    assert (state.status, state.look) == ("pass", 1)
    return state, argv, stage


def test_gate_judges_a_look_on_the_live_labels_received_before_its_time_as_the_dag_did(tmp_path, capsys, monkeypatch):
    """Clients label each answer 50 s after it, the canary's answers wrong; the stage's one look at
    100 s counts the labels received before then (``engine._live_labels``: a look's evidence is what
    was logged before its time), and the poke that exported the samples at 155 s had more. ``gate
    --stage`` cut the samples' requests at the look's time but kept their labels received after it
    (the samples carried no label time): a live accuracy check on 2.5 times the DAG's labels, and
    another verdict. The samples carry each label's time (``labelled_at``), and gate cuts the labels
    there as the DAG did: the same verdict."""
    import pandas as pd

    state, argv, stage = _labelled_after_the_look(monkeypatch, tmp_path)
    live = next(c for c in state.verdict.checks if c.name == "accuracy_live")
    exported = pd.read_parquet(argv[2])
    assert (exported["source"].eq("live") & exported["correct"].notna()).sum() > 2 * (live.n_baseline + live.n_canary)
    code, out, _ = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)) == (0, _said(state.verdict))
    exported.assign(labelled_at=exported["labelled_at"].astype(str)).to_parquet(argv[2])
    code, _, err = run(capsys, *argv, *stage)
    assert (code, "--stage 1: the samples' labelled_at must be unix seconds" in err) == (2, True)


def test_gate_warns_of_samples_without_label_times_and_refuses_a_label_without_one(tmp_path, capsys, monkeypatch):
    """Samples exported before ``labelled_at`` was keep every label they hold (as --help says), and
    gate judged them silently: a look the DAG passed on the labels received before its time failed
    on those after it too. It judges them so, and warns (on stderr, and in --json) that the verdict
    may differ from the DAG's. With the column, a live label without its time (never in the DAG's
    stage samples) was kept as received before every look: it is refused (exit 2)."""
    import numpy as np
    import pandas as pd

    _, argv, stage = _labelled_after_the_look(monkeypatch, tmp_path)
    data = pd.read_parquet(argv[2])
    data.drop(columns="labelled_at").to_parquet(argv[2])
    warned = (
        "the samples have no labelled_at (exported before it was): each live label they hold is judged, those "
        "received after look 1's time too, where the DAG's look judged those received before it alone: the verdict "
        "may differ from the DAG's"
    )
    code, out, err = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)["decision"], json.loads(out)["warning"]) == (1, "fail", warned)
    assert f"rolloutctl gate: warning: {warned}" in err
    unlabelled = data.assign(correct=data["correct"].where(data["source"] == "replay"))  # (no live label: no warning)
    unlabelled.drop(columns="labelled_at").to_parquet(argv[2])
    code, out, err = run(capsys, *argv, *stage, "--json")
    assert "warning" not in json.loads(out)
    assert "labelled_at" not in err
    untold = data["labelled_at"].notna() & (data.index % 2 == 0)
    data.assign(labelled_at=data["labelled_at"].mask(untold, np.nan)).to_parquet(argv[2])
    code, out, err = run(capsys, *argv, *stage)
    assert (code, out) == (2, "")
    n = int(data["labelled_at"].notna().sum())
    assert f"--stage 1: {int(untold.sum()):,} of the samples' {n:,} live labels have no labelled_at" in err


def test_gate_help_says_the_columns_a_stage_needs_and_what_an_unread_prometheus_warns(capsys):
    """``gate --help`` read as if --stage needed labelled_at (it is optional: without it every
    live label is judged, with a warning) and did not name source, pair_id and correct, which it
    refuses samples without; and --prometheus promised a warning naming the guards not read,
    where Prometheus down names none (it says Prometheus could not be read). It says what gate
    does."""
    code, out, _ = run(capsys, "gate", "--help")
    said = " ".join(out.split())
    assert code == 0
    assert "with --stage (as engine.stage_samples exports them), time, source, pair_id, correct required too" in said
    assert "labelled_at optional (when each live label is evidence: without it every live label is judged" in said
    assert "with a warning saying what could not be read: Prometheus, or the guards without data" in said


@pytest.mark.parametrize("change", ["Float64", "replay labelled"])
def test_gate_cuts_the_live_labels_alone_as_the_dag_did(tmp_path, capsys, monkeypatch, change):
    """The look's labels cut at its time: with a nullable labelled_at (Float64, as a file converted
    with convert_dtypes reads) the replay's rows compared <NA> and had their correct emptied, the
    paired check judged on no pairs; and a replay row carrying a labelled_at after the look lost
    its label, which the DAG never cuts (its validation set's). The live labels alone are cut, by
    their time as numbers: the DAG's verdict."""
    import pandas as pd

    from tests.include.test_engine import T0

    state, argv, stage = _labelled_after_the_look(monkeypatch, tmp_path)
    data = pd.read_parquet(argv[2])
    if change == "Float64":
        data["labelled_at"] = data["labelled_at"].astype("Float64")
    else:
        data.loc[data["source"] == "replay", "labelled_at"] = T0 + 1000
    data.to_parquet(argv[2])
    code, out, err = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)) == (0, _said(state.verdict)), err


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("ms", "the samples' labelled_at reach {latest!r}, in the future, {ahead} s ahead of this machine's clock"),
        ("inf", "{n:,} of the samples' {n:,} labels have no time in labelled_at (inf)"),
        ("-inf", "{n:,} of the samples' {n:,} labels have no time in labelled_at (-inf)"),
        ("-5", "{n:,} of the samples' {n:,} labels have no time in labelled_at (-5.0)"),
        ("bool", "the samples' labelled_at must be unix seconds"),
    ],
)
def test_gate_refuses_label_times_that_are_no_time(tmp_path, capsys, monkeypatch, bad, said):
    """``labelled_at`` in milliseconds, infinite, negative or True/False was taken as numbers:
    each live label at or after the look's time dropped, every other kept, silently, and a canary
    the DAG judged on its labels received before the look judged on all or none of them. Such
    label times are refused (exit 2), as ``time``'s and ``--started``'s: one in the future by more
    than the workers' clocks may be apart, or no time at all."""
    import numpy as np
    import pandas as pd

    from vision_rollout.locks import CLOCK_SKEW_S

    _, argv, stage = _labelled_after_the_look(monkeypatch, tmp_path)
    data = pd.read_parquet(argv[2])
    labelled = data["labelled_at"].notna()
    if bad == "ms":
        data["labelled_at"] *= 1000
    elif bad == "bool":
        data["labelled_at"] = labelled
    else:
        data.loc[labelled, "labelled_at"] = float(bad)
    for suffix in (".parquet", ".csv"):
        path = tmp_path / f"bad{suffix}"
        data.to_parquet(path) if suffix == ".parquet" else data.to_csv(path, index=False)
        code, out, err = run(capsys, "gate", "--samples", str(path), *argv[3:], *stage)
        assert (code, out) == (2, "")
        latest = float(data["labelled_at"].max())
        ahead = math.ceil(latest - time.time()) if bad == "ms" else None
        assert f"--stage 1: {said.format(n=int(labelled.sum()), latest=latest, ahead=ahead)}" in err
    near = time.time() + CLOCK_SKEW_S - 1  # (labels ahead of this clock within the workers' skew: judged)
    data.assign(labelled_at=np.where(labelled, near, np.nan)).to_parquet(argv[2])
    code, _, err = run(capsys, *argv, *stage)
    assert code != 2, err


@pytest.mark.parametrize("bad", [1000.0, math.inf, -5.0, -math.inf])
def test_gate_reads_the_label_times_of_the_live_rows_alone_as_its_cut(tmp_path, capsys, monkeypatch, bad):
    """The look's cut reads ``labelled_at`` on the live rows alone (a replayed image's label is its
    validation set's, never cut), but the checks that refuse a label time in milliseconds, infinite
    or negative read the replay's rows too: samples the cut judges as the DAG did were refused
    (exit 2) for a value in a row it never reads. The checks read the rows the cut reads: the
    DAG's verdict."""
    import pandas as pd

    from tests.include.test_engine import T0

    state, argv, stage = _labelled_after_the_look(monkeypatch, tmp_path)
    data = pd.read_parquet(argv[2])
    data.loc[data["source"] == "replay", "labelled_at"] = T0 * bad if bad == 1000.0 else bad  # (milliseconds)
    data.to_parquet(argv[2])
    code, out, err = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)) == (0, _said(state.verdict)), err


@pytest.mark.parametrize("before", [None, 1.0])  # (0, the epoch; or a second before the stage's start)
def test_gate_refuses_label_times_before_the_stage_start(tmp_path, capsys, monkeypatch, before):
    """A ``labelled_at`` of 0 (or any time before the stage's start) is before every look's time:
    the cut kept each such label, silently, where the DAG never has one (its poke reads the log
    from the stage's start on, so each label's time is at or after it; a re-sent id's label from
    before the stage is none of the stage's). Refused (exit 2), naming the column and --started."""
    import pandas as pd

    from tests.include.test_engine import T0

    _, argv, stage = _labelled_after_the_look(monkeypatch, tmp_path)
    data = pd.read_parquet(argv[2])
    labelled = data["labelled_at"].notna()
    first = labelled.idxmax()
    data.loc[first, "labelled_at"] = 0.0 if before is None else T0 - before
    data.to_parquet(argv[2])
    code, out, err = run(capsys, *argv, *stage)
    assert (code, out) == (2, ""), out
    said = f"--stage 1: 1 of the samples' {int(labelled.sum()):,} live labels lie before --started {T0!r}"
    assert said in err, err


def test_gate_refuses_sample_times_in_milliseconds_naming_the_column(tmp_path, capsys, monkeypatch):
    """Samples whose ``time`` is in milliseconds were caught only by what followed from it (no
    sample between --started and the look's time, or a look in the future), a message naming
    --started, not the column. They are refused (exit 2) naming ``time`` and the likely unit, as
    ``labelled_at``'s are: a time in the future by more than the workers' clocks may be apart."""
    import pandas as pd

    _, argv, stage = _labelled_after_the_look(monkeypatch, tmp_path)
    data = pd.read_parquet(argv[2])
    data["time"] *= 1000
    data.to_parquet(argv[2])
    code, out, err = run(capsys, *argv, *stage)
    assert (code, out) == (2, ""), out
    latest = float(data["time"].max())
    assert f"--stage 1: the samples' time reach {latest!r}, in the future" in err, err
    assert "unix seconds, not milliseconds" in err


def _first_look_at_20_s(monkeypatch, tmp_path) -> tuple:
    """``_dags_look``'s poke at 26 s into a stage of five looks, the first at 20 s: judged."""
    from tests.include.test_engine import T0, WINDOW, records, spec

    state, argv, stage = _dags_look(
        monkeypatch, tmp_path, spec(error_margin=0.02), WINDOW, records(26, 40, 50), T0 + 26
    )
    assert (state.look, state.verdict is not None) == (1, True)
    return state, argv, stage


@pytest.mark.parametrize("ahead", [1.0, 10.0, 40.0, 0.4])
def test_gate_judges_a_stage_start_ahead_of_this_clock_within_the_workers_skew(tmp_path, capsys, monkeypatch, ahead):
    """A stage's start is stamped on the DAG worker's clock, ``gate`` compares it with its own
    machine's: a worker clock ahead by a few seconds (within the ``locks.CLOCK_SKEW_S`` the
    workers' clocks may be apart) had ``--started`` refused as "in the future". It is judged as
    the DAG did (a look 20 s in, judged by the worker at its time, within the skew here too); a
    start further ahead than that is refused, naming the skew allowed and how far ahead it is
    rounded up (60.4 s read "60 s ahead ... more than 60 s"), an absurd one in three digits
    (1e300 was printed in its 301)."""
    from tests.include.test_engine import T0
    from vision_rollout.cli import EXIT
    from vision_rollout.locks import CLOCK_SKEW_S

    state, argv, stage = _first_look_at_20_s(monkeypatch, tmp_path)
    monkeypatch.setattr(time, "time", lambda: T0 - ahead)  # (this machine's clock behind the worker's)
    code, out, _ = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)) == (EXIT[state.verdict.decision], _said(state.verdict))
    monkeypatch.setattr(time, "time", lambda: T0 - CLOCK_SKEW_S - ahead)
    code, out, err = run(capsys, *argv, *stage)
    assert (code, out) == (2, "")
    assert f"--started {T0!r}: in the future, {math.ceil(CLOCK_SKEW_S + ahead)} s ahead of this machine's clock" in err
    assert f"more than the {CLOCK_SKEW_S} s two machines' clocks may be apart" in err
    code, out, err = run(capsys, *argv, *stage[:3], "1e300", *stage[4:])
    assert (code, out) == (2, "")
    assert "--started 1e+300: in the future, 1e+300 s ahead of this machine's clock" in err


def test_gate_refuses_a_look_whose_time_has_not_come(tmp_path, capsys, monkeypatch):
    """A look whose time lies ahead of this machine's clock by more than the workers' clocks may
    be apart (``locks.CLOCK_SKEW_S``) no DAG poke can have judged (its poke judges it at or after
    that time, on the samples before it): gate judged it on the samples given, as if it had been.
    It is refused (exit 2), naming the look's time; within the skew, judged as the DAG did."""
    from tests.include.test_engine import T0
    from vision_rollout.cli import EXIT
    from vision_rollout.locks import CLOCK_SKEW_S

    state, argv, stage = _first_look_at_20_s(monkeypatch, tmp_path)
    monkeypatch.setattr(time, "time", lambda: T0 + 20 - CLOCK_SKEW_S)
    code, out, _ = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)) == (EXIT[state.verdict.decision], _said(state.verdict))
    monkeypatch.setattr(time, "time", lambda: T0 + 20 - CLOCK_SKEW_S - 0.4)
    code, out, err = run(capsys, *argv, *stage)
    assert (code, out) == (2, "")
    assert (
        f"--look 1: its time ({T0 + 20:.3f}, 20 s into the stage) is in the future, {CLOCK_SKEW_S + 1} s ahead of "
        "this machine's clock"
    ) in err
    assert "no DAG poke can have judged it" in err


def test_gate_judges_samples_that_end_well_before_the_looks_time_and_warns(tmp_path, capsys, monkeypatch):
    """Clients gone quiet 60 s into the stage, its one look due at 100 s, the second validation
    round answered after the poke's cut: the DAG's poke at 106 s judged the look on samples ending
    40 s before its time, PASS, and ``gate --stage`` refused them (exit 2) as a poke's before that
    time (samples ending before it by more than any gap between them and a poke interval), which
    they cannot be told from. It judges the look as the DAG did, and warns (on stderr, and in
    --json) that they end that long before the look's time: an early export judges as that look,
    not as the poke that read them (waiting). A hard guard that tripped on them fails it."""
    import pandas as pd

    from tests.include.test_engine import T0, WINDOW, records, spec

    s = spec(error_margin=0.02, looks_per_stage=1)
    log = records(106, 40, 50, replay_every=100)
    quiet = pd.Timestamp(T0 + 60, unit="s", tz="UTC")
    log = log[(log["route"] == "version") | (log["time"] < quiet)].copy()  # (live traffic stops at 60 s)
    second = log["request_id"].str.startswith("replay-1-")
    log.loc[second, "time"] += pd.Timedelta(seconds=2)  # (the second round answered at 102.5 s: after the cut)
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, log, T0 + 106)
    assert (state.status, state.look) == ("pass", 1)
    warned = "the samples end 40 s before look 1's time (100 s into the stage), longer than any gap between them"
    code, out, err = run(capsys, *argv, *stage, "--json")
    said = json.loads(out)
    assert (code, {k: v for k, v in said.items() if k != "warning"}) == (0, _said(state.verdict))
    assert said["warning"].startswith(warned)
    assert f"rolloutctl gate: warning: {warned}" in err
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, records(300, 40, 50), T0 + 40)
    assert (state.status, state.look, state.reason) == ("waiting", 0, "first look at 100 s into the stage")
    code, out, err = run(capsys, *argv, *stage)
    assert "rolloutctl gate: warning: the samples end 65 s before look 1's time (100 s into the stage)" in err
    log = records(300, 40, 50, accuracy=(1.0, 0.99))
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, log, T0 + 40)
    assert (state.status, state.look) == ("breach", 0)
    code, out, _ = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)["summary"]) == (1, state.reason)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gate_refuses_samples_without_a_time(tmp_path, capsys, monkeypatch, bad):
    """A sample whose time is no time (NaN, infinite) lies neither before a look's time nor after
    it: gate dropped it silently and judged the rest. The DAG's stage samples all have one: such
    samples are a usage error, naming how many."""
    import pandas as pd

    from tests.include.test_engine import T0, WINDOW, records, spec

    s = spec(error_margin=0.02, looks_per_stage=1)
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, records(106, 40, 50), T0 + 106)
    assert state.status == "pass"
    path = Path(argv[2])
    data = pd.read_parquet(path)
    data.loc[data.index[::7], "time"] = bad
    data.to_parquet(path)
    code, out, err = run(capsys, *argv, *stage)
    assert (code, out) == (2, "")
    assert f"--stage 1: 2,150 of the 15,049 samples have no time ({bad}): the DAG's stage samples each have one" in err


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_gate_stage_says_its_samples_are_none(tmp_path, capsys, monkeypatch, suffix):
    """The DAG's stage samples of a poke before any record (a header alone in CSV): gate said "the
    samples' time must be unix seconds" of the CSV's empty column, and of the Parquet file that no
    sample lay between --started and the look's time ("nan to nan"). It says there are none."""
    import pandas as pd

    from tests.include.test_engine import T0, WINDOW, records, spec

    s = spec(error_margin=0.02, looks_per_stage=1)
    _, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, records(106, 40, 50), T0 + 106)
    path = tmp_path / f"none{suffix}"
    none = pd.read_parquet(argv[2]).iloc[:0]
    none.to_csv(path, index=False) if suffix == ".csv" else none.to_parquet(path)
    code, out, err = run(capsys, "gate", "--samples", str(path), *argv[3:], *stage)
    assert (code, out) == (2, "")
    assert f"--samples {path}: no samples (its columns alone): a poke that read none judged no look" in err


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_gate_says_its_samples_are_none_without_a_stage_too(tmp_path, capsys, suffix):
    """Samples with their columns and no row: ``gate --stage`` says there are none (exit 2), and
    ``gate`` without it said WAIT (exit 3, "Too few samples: baseline 0, canary 0"), as if some
    evidence were on its way in the file. No evidence at all is no look: it says so, as --stage."""
    path = tmp_path / f"none{suffix}"
    none = samples(10).iloc[:0]
    none.to_csv(path, index=False) if suffix == ".csv" else none.to_parquet(path)
    code, out, err = run(capsys, "gate", "--samples", str(path))
    assert (code, out) == (2, "")
    assert f"--samples {path}: no samples (its columns alone): a poke that read none judged no look" in err
    code, out, _ = run(capsys, "gate", "--samples", str(path), "--json")
    assert (code, json.loads(out)["exit"]) == (2, 2)


def fake_prometheus(restarted: float, calls: list, present: list):
    """Prometheus' HTTP API over a stage past, as ``answering_server``'s answer: its clock at
    ``present[0]`` (None: this machine's clock, going on), the model servers scraped every 5 s, the candidate's P99 8 ms throughout, no
    shadow copies, and the candidate's process restarted at ``restarted``, counted by an instant
    query whose window (its ``time``, now without one) holds it. Each API call is put in ``calls``."""
    import re
    from urllib.parse import parse_qsl, urlsplit

    def answer(path: str, params: dict) -> dict:
        q = params.get("query", "")
        if path == "targets":
            return {"activeTargets": [{"scrapeInterval": "5s", "labels": {"job": "model-server"}}]}
        if path == "query_range":
            start, end, step = (float(params[k]) for k in ("start", "end", "step"))
            points = [[start + k * step, "8.0"] for k in range(int((end - start) // step) + 1)]
            return {"resultType": "matrix", "result": [{"metric": {}, "values": points}]}
        at = float(params.get("time", time.time() if present[0] is None else present[0]))
        if q == "time()":
            return {"resultType": "scalar", "result": [at, str(at)]}
        if span := re.search(r"changes\(process_start_time_seconds\[([0-9.]+)s\]\)", q):
            n = int(at - float(span.group(1)) <= restarted <= at)
            return {"resultType": "vector", "result": [{"metric": {}, "value": [at, str(n)]}]}
        return {"resultType": "vector", "result": []}  # (no flush interval reported, no shadow copies)

    def answered(target: str) -> tuple[int, bytes]:
        url = urlsplit(target)
        path, params = url.path.removeprefix("/api/v1/"), dict(parse_qsl(url.query))
        calls.append((path, params))
        return 200, json.dumps({"status": "success", "data": answer(path, params)}).encode()

    return answered


def test_gate_reads_the_hard_guards_on_prometheus_at_the_looks_time_not_now(tmp_path, capsys, monkeypatch):
    """The candidate's process restarted 30 s into a stage two hours ago, and the DAG's poke rolled
    the stage back on it. ``gate --stage --prometheus`` asked for the restarts and the shadow's
    counts over windows of the stage's length without a time, so Prometheus counted them over the
    windows ending now: no restart, and PASS. It asks for them at the look's poke (on Prometheus'
    clock), as that poke read them at its present: the same breach."""
    from tests.include.test_engine import records, spec
    from tests.support.hostile import answering_server
    from vision_rollout.engine import SETTLE_S, StageWindow, guard_inputs
    from vision_rollout.metrics import PrometheusSource

    started = time.time() - 7200
    poke = started + 100 + SETTLE_S  # (its one look at the bake's end)
    calls: list = []
    present = [poke]  # (Prometheus' clock)
    with answering_server(fake_prometheus(started + 30, calls, present)) as url:
        s = spec(error_margin=0.02, looks_per_stage=1)
        window = StageWindow(0, 50, started)
        guards = guard_inputs(PrometheusSource(url, clock=lambda: poke), s, poke, since=started)  # (its present)
        assert guards.restarts == 1
        log = records(106, 40, 50, start=started)
        state, argv, stage = _dags_look(monkeypatch, tmp_path, s, window, log, poke, guards=guards)
        assert state.status == "breach"
        assert "The candidate's serving processes restarted 1 time in this stage" in state.reason
        calls.clear()
        present[0] = None  # (two hours on, its clock going on as gate's does: a loaded machine's
        # second between setting a fixed clock and gate's reading of it moved every time by 1 s)
        code, out, err = run(capsys, *argv, *stage[:-1], "--prometheus", url, "--json")
    assert (code, json.loads(out)["summary"]) == (1, state.reason), err
    assert "unguarded" not in json.loads(out)
    instant = [p for path, p in calls if path == "query" and p["query"] != "time()"]
    # (the flush interval at the look's time, the guards at its poke's: the look's and the settle time)
    assert [round(float(p["time"]) - started) for p in instant] == [100, 105, 105]


def test_gate_judges_a_stages_last_look_at_its_time_as_the_dag_did(tmp_path, capsys, monkeypatch):
    """The DAG's last look of a stage is at the bake's end or once a whole validation round and
    each arm's min_samples are in (``engine.final_look_time``), on the samples before it; ``gate``
    judged every sample it was given, so the stage's samples as the poke read them (a poke late,
    the log since grown) passed offline a stage the DAG ended undecided at its last look. With
    --stage and --started it cuts them where the DAG did: the same verdict."""
    from tests.include.test_engine import T0, WINDOW, records, spec

    s = spec(latency_margin=0.03)
    log = records(300, 5, 50)  # (too few at 100 s to show the latency margin; enough by 295 s)
    state, argv, stage = _dags_look(monkeypatch, tmp_path, s, WINDOW, log, T0 + 300)
    assert (state.status, state.look) == ("undecided", 5)
    code, out, _ = run(capsys, *argv, *stage, "--json")
    assert (code, json.loads(out)) == (3, _said(state.verdict))
    code, out, _ = run(capsys, *argv, "--latency-from", "live", "--replay-images", "500", "--json")  # (all of them)
    assert (code, json.loads(out)["decision"]) == (0, "pass")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--replay-images", "0"], "--replay-images takes 1 or more (the images of a validation round), not 0"),
        (
            ["--replay-images", "2"],
            "--replay-images 2: the samples hold 3 validation images (pair_id), more than a round's 2",
        ),
        (
            ["--spec", "{spec}", "--stage", "1"],
            "--stage 1: give --replay-images, the images of a validation round (the stage's validation set's: its "
            "labels.csv's images)",
        ),
    ],
)
def test_gate_replay_images_refused_with_what_is_wrong(tmp_path, capsys, argv, said):
    files = {"{csv}": tmp_path / "s.csv", "{spec}": tmp_path / "spec.json"}
    data = samples(300).assign(source="live")
    data["pair_id"] = [f"image-{i % 3}" if i < 6 else None for i in range(len(data))]
    data.to_csv(files["{csv}"], index=False)
    files["{spec}"].write_text(json.dumps({"stages": [50, 100], "looks_per_stage": 5}))
    argv = [str(files.get(a, a)) for a in argv]
    code, out, err = run(capsys, "gate", "--samples", str(files["{csv}"]), *argv)
    assert (code, out) == (2, "")
    assert said in err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--stage", "2"], "--stage 2: give the rollout's --spec, whose stages it counts"),
        (["--spec", "{spec}", "--stage", "3"], "--stage takes 1 to 2 (the spec's stages 50%, 100%), not 3"),
        (["--spec", "{spec}", "--stage", "0"], "--stage takes 1 to 2"),
        (
            ["--spec", "{spec}", "--stage", "2", "--latency-from", "live"],
            "--latency-from live: stage 2 (100%) judges latency on replay samples, as the DAG does",
        ),
        (["--spec", "{spec}", "--looks", "3"], "--looks 3: the spec's stages plan 5 looks (its looks_per_stage)"),
        (["--spec", "{spec}", "--look", "6"], "--look takes 1 to --looks (5), not 6"),
        (["--spec", "{spec}", "--set", "alfa=1"], "unknown gate config key(s) ['alfa']"),
        (["--spec", "{csv}"], "--spec {csv}: "),
        (["--spec", "{bad}"], "--spec {bad}: invalid spec: the last stage must be 100"),
        (
            ["--spec", "{spec}", "--stage", "1", "--replay-images", "3", "--look", "2"],
            "--stage 1 --look 2: give --information, the information of looks 1 to 1 (the DAG judges a look at "
            "the information its looks saw, not at equal increments)",
        ),
        (["--level", "0.5"], "--level 0.5: give --spec and --stage, the stage whose window it is the level of"),
        (["--spec", "{spec}", "--stage", "1", "--replay-images", "3", "--level", "0"], "--level takes 0 < L <= 1"),
        (["--spec", "{spec}", "--stage", "1", "--replay-images", "3", "--level", "nan"], "not nan"),
        (
            ["--spec", "{spec}", "--stage", "1", "--replay-images", "3"],
            "--stage 1: give --started, the stage's start in unix seconds (its stage record's window start, its "
            "verdict's bake.window)",
        ),
        (
            ["--spec", "{spec}", "--stage", "1", "--replay-images", "3", "--started", "nan", "--no-hard-guards"],
            "--started takes the stage's start in unix seconds, not nan",
        ),
        (
            ["--spec", "{spec}", "--stage", "1", "--replay-images", "3", "--started", "1800000000"],
            "--stage 1: the P99, shadow-error and restart guards read Prometheus: give --prometheus URL, or "
            "--no-hard-guards to judge the look guarded by the replay's accuracy drop only",
        ),
        (
            ["--spec", "{spec}", "--stage", "1", "--replay-images", "3", "--started", "1", "--no-hard-guards"],
            "--stage 1: the samples lack column(s) ['correct', 'pair_id', 'time'] (the DAG's stage samples have them",
        ),
        (["--started", "1800000000"], "--started: give --spec and --stage, the stage it judges as the DAG did"),
        (["--no-hard-guards"], "--no-hard-guards: give --spec and --stage, the stage it judges as the DAG did"),
        (["--prometheus", "http://127.0.0.1:9"], "--prometheus: give --spec and --stage"),
    ],
)
def test_gate_stage_refused_with_what_is_wrong(tmp_path, capsys, argv, said):
    files = {"{csv}": tmp_path / "s.csv", "{spec}": tmp_path / "spec.json", "{bad}": tmp_path / "bad.json"}
    samples(300).assign(source="live").to_csv(files["{csv}"], index=False)
    files["{spec}"].write_text(json.dumps({"stages": [50, 100], "looks_per_stage": 5}))
    files["{bad}"].write_text(json.dumps({"stages": [50, 90]}))
    argv = [str(files.get(a, a)) for a in argv]
    code, out, err = run(capsys, "gate", "--samples", str(files["{csv}"]), *argv)
    assert (code, out) == (2, "")
    for name, f in files.items():
        said = said.replace(name, str(f))
    assert said in err


@pytest.mark.parametrize(
    ("information", "said"),
    [
        ("100/100/0", "2 value(s) (this look's is counted in --samples), not 1"),
        ("1/1/0,2/2/0,3/3/0", "not 3"),
        ("100/100/0,many", "latency samples/requests/live labels of each look, e.g. 120/150/0,250/300/0, not 'many'"),
        ("100/100/0,2.5e3/2500/0", "not '2.5e3/2500/0'"),
        ("-1/1/0,100/100/0", "not '-1/1/0'"),
        ("100/100/0,", "not ''"),
        ("100/100/0,200", "not '200'"),
        (
            "100/300/0,200/200/0",
            "must not decrease from look to look (each look's samples hold the earlier ones'): look 1 saw 300 "
            "requests, look 2 200",
        ),
        ("100/100/0,5000/100/0", "look 2 saw 5000 latency, this look's samples (--samples) 3000"),
    ],
)
def test_gate_information_refused_with_what_is_wrong(tmp_path, capsys, information, said):
    path = tmp_path / "samples.csv"
    samples(3000).to_csv(path, index=False)
    argv = ("gate", "--samples", str(path), "--look", "3", "--looks", "5", f"--information={information}")
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert said in err


@pytest.mark.parametrize(
    "argv",
    [
        ["gate", "--samples", "nope.csv"],
        ["gate"],
        ["audit", "--shadow-log", "x", "--since", "yesterday"],
        ["audit", "--shadow-log", "x", "--since", "999999999999d"],  # was an OverflowError's traceback
        ["audit", "--shadow-log", "x", "--since", "3661d"],
        ["audit", "--shadow-log", "x", "--since", "9" * 40 + "s"],
        ["gate", "--samples", "{csv}", "--set", "alfa=1"],
        ["gate", "--samples", "{csv}", "--looks", "3000"],  # was minutes of boundaries
        ["gate", "--samples", "{csv}", "--looks", "0"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, argv):
    path = tmp_path / "s.csv"
    samples(200).to_csv(path, index=False)
    argv = [a.replace("{csv}", str(path)) for a in argv]
    assert run(capsys, *argv)[0] == 2


def test_status_on_a_lock_folder_not_made_yet_says_why_it_is_missing(tmp_path, capsys):
    """On a fresh `make up` stack, `status --lock-dir run/locks` (the DAG's lock folder) said only
    "no such folder": the folder is made by a rollout's first lock, which the message now says."""
    argv = ["status", "--model", "digits", "--lock-dir", str(tmp_path / "locks")]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert "no such folder" in err
    assert "made when a rollout first takes a lock in it" in err


def test_help_shows_every_command(capsys):
    """``rolloutctl --help`` showed the usage of each command but restart-stage."""
    import argparse

    from vision_rollout.cli import parser

    code, text, _ = run(capsys, "--help")
    assert code == 0
    [commands] = [a.choices for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert [c for c in commands if f"rolloutctl {c} " not in text] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["gate", "--samples", "s.csv"],
        ["audit", "--prediction-log", "{tmp}"],
        ["mesh", "render", "--backend", "local"],
        ["verify-model", "{tmp}/m.onnx"],
        ["run", "--spec", "s.json", "--url", "http://127.0.0.1:9", "--validation", "v", "--prediction-log", "{tmp}"],
        ["outbox", "list", "--outbox", "{tmp}"],
        ["outbox", "send", "--outbox", "{tmp}", "--token-file", "t"],
        ["outbox", "drop", "--outbox", "{tmp}", "a.json"],
        ["status", "--model", "digits", "--lock-dir", "{tmp}"],
        ["abort", "--spec", "s.json", "--lock-dir", "{tmp}"],
        ["prune", "--run-dir", "{tmp}"],
        ["restart-stage", "--run-dir", "{tmp}", "--model", "m", "--run-id", "r", "--stage", "1", "--reason", "x"],
    ],
)
def test_an_unknown_option_is_argparses_usage_error_naming_only_it(tmp_path, capsys, argv):
    """Options were read with ``parse_known_args`` and what was left over taken for outbox's
    report names: ``outbox drop --outbox D a.json --bogus`` said "unrecognized arguments: a.json
    --bogus", blaming the report's name. Each command now refuses an unknown option as argparse
    does, naming it alone, exit 2, and with --json as one JSON object."""
    from vision_rollout.cli import parser

    (tmp_path / "m.onnx").write_bytes(b"")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if hasattr(parser().parse_args(argv), "json"):
        code, out, err = run(capsys, *argv, "--bogus", "--json")
        assert json.loads(out) == {"error": "unrecognized arguments: --bogus", "exit": 2}
    else:
        code, out, err = run(capsys, *argv, "--bogus")
        assert out == ""
    assert code == 2, err
    assert err.startswith("usage: rolloutctl ")
    assert err.strip().splitlines()[-1] == "rolloutctl: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize("flag", ["--json", "--js", "--j"])
def test_json_abbreviated_as_argparse_takes_it_answers_a_usage_error_in_json(capsys, flag):
    """argparse takes ``--js`` for ``--json``, and the command printed JSON when it ran, but a
    usage error looked for ``--json`` spelled out: a script got nothing on stdout."""
    code, out, err = run(capsys, "gate", "--samples", "x.csv", "--looks", "many", flag)
    assert (code, json.loads(out)) == (2, {"error": "argument --looks: invalid int value: 'many'", "exit": 2}), err
    code, out, _ = run(capsys, "outbox", "drop", "--outbox", "x", "--", flag)  # (a report's name, not the flag)
    assert (code, out) == (2, "")


def test_outbox_report_names_are_taken_where_the_documented_command_lines_put_them(tmp_path, capsys):
    """``outbox drop NAME ... --outbox DIR`` and ``--outbox DIR NAME ...``, a name that starts with
    a dash after ``--``; ``send --retry-refused [NAME ...]``; a name given to list refused."""
    from vision_rollout.notify import REFUSED

    outbox = tmp_path / "outbox"
    (outbox / REFUSED).mkdir(parents=True)
    for name in ("a.json", "b.json", "-c.json"):
        (outbox / REFUSED / name).write_text(json.dumps({"channel": "#c", "text": name}))
    code, out, err = run(capsys, "outbox", "drop", "a.json", "--outbox", str(outbox))
    assert (code, out) == (0, f"dropped {REFUSED}/a.json\n"), err
    code, out, err = run(capsys, "outbox", "drop", "--outbox", str(outbox), "--", "b.json", "-c.json")
    assert (code, out) == (0, f"dropped {REFUSED}/b.json\ndropped {REFUSED}/-c.json\n"), err
    code, _, err = run(capsys, "outbox", "drop", "--outbox", str(outbox))
    assert code == 2
    assert "the following arguments are required: NAME" in err
    code, _, err = run(capsys, "outbox", "list", "--outbox", str(outbox), "x.json")
    assert code == 2
    assert "unrecognized arguments: x.json" in err
    code, _, err = run(capsys, "outbox", "send", "--outbox", str(outbox), "--retry-refused", "x.json", "y.json")
    assert code == 2
    assert "the following arguments are required: --token-file" in err


def test_run_without_prometheus_must_say_it_runs_unguarded(tmp_path, capsys):
    """Without --prometheus a rollout ran with no P99 and no shadow-error guard, and nothing said
    so. It is refused now unless --no-hard-guards says it is meant; the model server (nothing
    listens on port 9) is never reached."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"stages": [50, 100]}))
    (tmp_path / "log").mkdir()
    argv = ["run", "--spec", str(spec), "--url", "http://127.0.0.1:9", "--validation", str(tmp_path)]
    argv += ["--prediction-log", str(tmp_path / "log")]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "give --prometheus URL, or --no-hard-guards" in err
    assert run(capsys, *argv, "--prometheus", "http://127.0.0.1:9", "--no-hard-guards")[0] == 2


def test_audit_command(tmp_path, capsys):
    log = shadow_log(tmp_path, 200, disagree=0.0)
    code, out, _ = run(
        capsys, "audit", "--prediction-log", str(log), "--since", "1h", "--out", str(tmp_path / "report")
    )
    assert code == 0
    assert out.startswith("PASS")
    assert (tmp_path / "report" / "report.md").exists()
    (tmp_path / "empty").mkdir()
    code, out, _ = run(capsys, "audit", "--shadow-log", str(tmp_path / "empty"), "--since", "1h")
    assert code == 0
    assert out.startswith("SKIP")
    # Into the folder of the earlier report: refused (a SKIP's report.md was written beside the
    # PASS's chart and anomalies); with --overwrite the earlier report's other files go.
    again = ["audit", "--shadow-log", str(tmp_path / "empty"), "--out", str(tmp_path / "report")]
    before = sorted(p.name for p in (tmp_path / "report").iterdir())
    code, _, err = run(capsys, *again)
    assert code == 2
    assert "holds a report already" in err
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == before
    assert run(capsys, *again, "--overwrite")[0] == 0
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.md", "summary.json"]
    assert "SKIP" in (tmp_path / "report" / "report.md").read_text()
    # A mistyped folder is not an empty log: it said SKIP and exited 0.
    code, _, err = run(capsys, "audit", "--shadow-log", str(tmp_path / "emtpy"), "--since", "1h")
    assert code == 2
    assert "no such folder" in err
    # --out naming a file or a device: the audit was read whole, then "cannot be written", exit 4.
    for out_at in (str(tmp_path / "report" / "report.md"), "/dev/null"):
        code, out, err = run(capsys, "audit", "--shadow-log", str(log), "--out", out_at, "--json")
        assert (code, json.loads(out)) == (2, {"error": f"--out {out_at}: not a folder", "exit": 2}), err


def test_the_audit_command_judges_coverage_against_the_mirror_share_it_is_given(tmp_path, capsys):
    """rolloutctl audit judged no coverage: an hour the mirror copied at 100% without a shadow
    record written said SKIP and exited 0, as an hour without a mirror, where the hourly DAG
    warns; and the copies dropped were in no line of it. With --mirror-percent (the share the
    mirror was configured at) it judges them as the DAG does: a WARNING (exit 3) where the
    requests make no copy at all unlikely, the coverage. An idle log, or a model of a few requests
    none of which the share would likely have sampled (``silence_unlikely``), asked with or
    without ``--model``, is no sign of copies lost: a SKIP (exit 0), not a WARNING every quiet hour."""
    (tmp_path / "empty").mkdir()
    code, out, _ = run(capsys, "audit", "--prediction-log", str(tmp_path / "empty"), "--mirror-percent", "100")
    assert (code, out.startswith("SKIP: ")) == (0, True), out
    (tmp_path / "quiet").mkdir()
    quiet = shadow_log(tmp_path / "quiet", 5, disagree=0.0, roles=("primary",))
    (tmp_path / "busy").mkdir()
    busy = shadow_log(tmp_path / "busy", 200, disagree=0.0, roles=("primary",))
    for model in ((), ("--model", "digits")):
        code, out, _ = run(capsys, "audit", "--prediction-log", str(quiet), "--mirror-percent", "10", *model)
        assert (code, out.startswith("SKIP: ")) == (0, True), out
        code, out, _ = run(capsys, "audit", "--prediction-log", str(busy), "--mirror-percent", "10", *model)
        assert code == 3
        assert out.startswith("WARNING: a mirror of 10% was configured during this range"), out
    log = shadow_log(tmp_path, 200, disagree=0.0, dropped=20)
    code, out, _ = run(capsys, "audit", "--prediction-log", str(log), "--mirror-percent", "100")
    assert "coverage 90.9%: 200 shadow copies ran, 20 dropped" in out
    for bad in ("-1", "101", "nan"):
        code, out, err = run(capsys, "audit", "--prediction-log", str(log), "--mirror-percent", bad)
        assert (code, out) == (2, ""), bad
        assert "--mirror-percent" in err


def test_the_audit_command_waits_for_the_copies_still_in_a_writers_buffer(tmp_path, capsys):
    """``rolloutctl audit --since 1h`` audits up to now: the copies of the primaries of the last
    flush interval, sampled by the server's own mirror (``mirrored``), still in the candidate's
    writer's buffer, were counted lost. It waits for them as the rollout's audit does
    (``audit.await_copies``: until they are written, or past their close): none lost."""
    import threading

    now = time.time()
    log = shadow_log(tmp_path, 30, disagree=0.0, at=now - 5, mirrored=True, roles=("primary",))
    flush = threading.Timer(3.0, lambda: shadow_log(tmp_path, 30, disagree=0.0, at=now - 5, roles=("shadow",)))
    flush.start()
    try:
        _, out, err = run(capsys, "audit", "--prediction-log", str(log), "--since", "1h", "--json")
    finally:
        flush.join()
    said = json.loads(out)
    assert (said["rows"], said["copies_lost"], said["primary_without_shadow"]) == (30, 0, 0), err


def test_the_audits_reading_time_is_the_users_to_set_and_a_budget_spent_is_said(tmp_path, capsys):
    """The audit's reads stop beginning after MAX_AUDIT_S (480 s), which a user could not change:
    a week of a busy log ended inconclusive naming a constant. ``--budget-s`` sets it (default
    480 s); one spent leaves the audit inconclusive (exit 3), its reason and a line on stderr
    saying so and what to give. A budget that is no number of seconds is a usage error."""
    log = shadow_log(tmp_path, 200, disagree=0.0)
    code, out, err = run(capsys, "audit", "--prediction-log", str(log), "--budget-s", "0")
    assert code == 3
    assert out.startswith("INCONCLUSIVE")
    assert "at most 0 s" in out
    assert "--budget-s" in err
    code, out, err = run(capsys, "audit", "--prediction-log", str(log), "--budget-s", "60")
    assert (code, err) == (0, "")
    assert out.startswith("PASS")
    for bad in ("-1", "nan", "inf", "86401"):
        code, out, err = run(capsys, "audit", "--prediction-log", str(log), "--budget-s", bad)
        assert (code, out) == (2, ""), bad
        assert "--budget-s" in err


def test_an_overwritten_report_cut_short_leaves_no_earlier_report_md_beside_it(tmp_path, capsys, monkeypatch):
    """report.md is written last; with --overwrite the earlier one stayed until then, so a write
    that failed (a full disk, a kill) left the earlier audit's report.md beside this one's
    summary, read as this audit's. It goes first."""
    from vision_rollout.folders import Folder

    log = shadow_log(tmp_path, 200, disagree=0.0)
    out = tmp_path / "report"
    assert run(capsys, "audit", "--prediction-log", str(log), "--out", str(out))[0] == 0
    (tmp_path / "empty").mkdir()
    write = Folder.write

    def full_disk(self, name, data):
        if name == "report.md":
            raise OSError(28, "No space left on device")
        return write(self, name, data)

    monkeypatch.setattr(Folder, "write", full_disk)
    code, _, err = run(capsys, "audit", "--prediction-log", str(tmp_path / "empty"), "--out", str(out), "--overwrite")
    assert code == 4
    assert "No space left on device" in err
    assert json.loads((out / "summary.json").read_text())["verdict"] == "skip"
    assert not (out / "report.md").exists()


@pytest.mark.parametrize(
    ("flag", "uri"),
    [
        ("--out", "s3:///reports"),  # no bucket
        ("--out", "s3://bucket/reports?regoin=eu-west-1"),  # a misspelt option
        ("--prediction-log", "gs://bucket/predictions?regoin=eu"),
    ],
)
def test_an_object_store_uri_pyarrow_does_not_read_is_a_usage_error(tmp_path, capsys, flag, uri):
    """pyarrow's ArrowInvalid (a ValueError) was a traceback, exit 4."""
    argv = {"--prediction-log": str(tmp_path), "--out": None, flag: uri}
    code, out, err = run(capsys, "audit", *(a for k, v in argv.items() if v is not None for a in (k, v)))
    assert (code, out) == (2, "")
    assert "Traceback" not in err
    assert err.count("\n") == 1
    assert f"rolloutctl audit: {flag}" in err


def test_mesh_render_istio_is_valid_yaml(tmp_path, capsys):
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "route": [{"version": "1", "weight": 75}, {"version": "2", "weight": 25}],
                "mirror": {"version": "2", "percent": 50},
            }
        )
    )
    code, out, _ = run(
        capsys,
        "mesh",
        "render",
        "--backend",
        "istio",
        "--policy",
        str(policy),
        "--namespace",
        "models",
        "--service",
        "digits",
        "--name",
        "digits",
    )
    assert code == 0
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["DestinationRule", "VirtualService"]
    for d in docs:
        validate_istio(d)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"route": [{"version": "1", "weight": 50}]}))
    assert run(capsys, "mesh", "render", "--backend", "local", "--policy", str(bad))[0] == 2


@pytest.mark.integration
def test_mesh_apply_local(server_factory, repo_copy, tmp_path, capsys):
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    s.load_versions("digits", 1, 2)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]}))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    args = [
        "mesh",
        "apply",
        "--backend",
        "local",
        "--url",
        s.http,
        "--model",
        "digits",
        "--policy",
        str(policy),
        "--token-file",
        str(token),
    ]
    assert run(capsys, *args)[1].strip() == "applied"
    assert run(capsys, *args)[1].strip() == "unchanged: already in effect"
    token.write_text("wrong")
    code, _, err = run(capsys, *args)
    assert code == 4  # an error, not a verdict: 1 is "fail"
    assert "HTTP 401" in err
    assert "the admin token given (--token-file" in err
    assert "wrong" not in err
    # Without a token the server's "send 'Authorization: Bearer <admin token>'" told a CLI user
    # nothing of --token-file.
    code, _, err = run(capsys, *args[:-2])
    assert code == 4
    assert "no admin token was given: pass --token-file" in err


def test_verify_model_command(models_dir, tmp_path, capsys):
    digits = models_dir / "digits"
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not onnx")
    assert run(capsys, "verify-model", str(broken))[0] == 1
    code, out, _ = run(
        capsys,
        "verify-model",
        str(digits / "3" / "model.onnx"),
        "--baseline",
        str(digits / "1" / "model.onnx"),
        "--model-dir",
        str(digits),
        "--json",
    )
    assert code == 0
    assert json.loads(out)["ok"] is True
    # A bare path said "OK" as if checked against the config and by a golden inference: neither ran.
    code, out, _ = run(capsys, "verify-model", str(digits / "2" / "model.onnx"))
    assert code == 0
    assert "not checked: no --model-dir (config, golden inference) nor --baseline (signature)" in out


# -- what a hostile or careless user gives it ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://admin:hunter2@127.0.0.1:9", "credentials in the URL are refused"),
        ("notaurl", "not an http(s)://host:port URL"),
        ("http://[::1", "not a URL"),
        ("ftp://127.0.0.1:9", "not an http(s)://host:port URL"),
        ("file:///etc/passwd", "not an http(s)://host:port URL"),
        ("http://127.0.0.1:9/v2/models", "without a path"),
        ("http://127.0.0.1:9/?access_token=hunter2", "without a path"),
        ("http://127.0.0.1:9#hunter2", "without a path"),
        ("http://127.0.0.1:99999", "not a URL"),
        # (an argument in no encoding, as Python hands it over: exit 4, a server "it cannot reach")
        ("http://\udcff\udcfe:9", "not a host name"),
    ],
)
def test_server_urls_are_checked_and_their_credentials_never_printed(tmp_path, capsys, url, words):
    """A URL with a password went through to every error message (the password printed, and in
    run's stage reasons and Slack reports); garbage ended in a ValueError's traceback."""
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 100}]}))
    code, out, err = run(
        capsys, "mesh", "apply", "--backend", "local", "--url", url, "--model", "digits", "--policy", str(policy)
    )
    assert (code, out) == (2, "")
    assert words in err
    assert "hunter2" not in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://admin:hunter2@slack.example/api/", "credentials in the URL are refused"),
        ("https://slack.example/api/?token=xoxb-hunter2", "without a query"),
        ("https://slack.example/api/#hunter2", "without a query"),
        ("https://\udcff.example/api/", "not a host name"),
        ("ftp://slack.example/api/", "not an http(s)://host/api/ URL"),
    ],
)
def test_a_slack_url_is_checked_and_its_credentials_never_printed(tmp_path, capsys, url, words):
    """`outbox send --slack-url` with a password or a token in it was refused quoting the whole
    URL: the secret on stderr, in a CI log."""
    (tmp_path / "outbox").mkdir()
    token = tmp_path / "token"
    token.write_text("xoxb-1")
    argv = ["outbox", "send", "--outbox", str(tmp_path / "outbox"), "--token-file", str(token)]
    code, out, err = run(capsys, *argv, "--slack-url", url)
    assert (code, out) == (2, "")
    assert words in err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot be read: No such file"),
        (b"\xff\xfe", "cannot be read"),
        (b"  \n", "is empty"),
        (b"t" * (64 * 1024 + 1), "cannot be read: larger than 65536 bytes"),  # was read whole: /dev/zero filled memory
    ],
)
def test_a_token_file_that_cannot_be_used_is_a_usage_error(tmp_path, capsys, content, words):
    token = tmp_path / "token"
    if content is not None:
        token.write_bytes(content)
    argv = ["mesh", "get", "--backend", "local", "--url", "http://127.0.0.1:9", "--model", "digits"]
    code, _, err = run(capsys, *argv, "--token-file", str(token))
    assert code == 2
    assert words in err


@pytest.mark.parametrize("token", ["\ufeffs3cret", "s3cret\u2019"])
def test_a_token_no_header_can_carry_is_not_blamed_on_the_url(tmp_path, capsys, token):
    """A token file saved with a byte-order mark, or a token pasted with a typographic quote, was
    "model server at http://...: not a URL it can reach": the operator looked at the URL. The
    error names the token, without quoting it, before any request."""
    path = tmp_path / "token"
    path.write_text(token, encoding="utf-8")
    argv = ["mesh", "get", "--backend", "local", "--url", f"http://127.0.0.1:{free_port()}", "--model", "digits"]
    code, out, err = run(capsys, *argv, "--token-file", str(path))
    assert (code, out) == (4, "")
    assert "the admin token holds" in err
    assert "not a URL" not in err
    assert "s3cret" not in err
    (tmp_path / "outbox").mkdir()
    argv = ["outbox", "send", "--outbox", str(tmp_path / "outbox"), "--slack-url", f"http://127.0.0.1:{free_port()}/"]
    code, out, err = run(capsys, *argv, "--token-file", str(path))
    assert (code, out) == (2, "")
    assert "the token holds" in err
    assert "s3cret" not in err


def test_a_policy_or_spec_file_too_large_to_be_one_is_a_usage_error(tmp_path, capsys):
    big = tmp_path / "policy.json"
    big.write_text("[" + " " * (4 * 1024 * 1024) + "]")
    code, out, err = run(capsys, "mesh", "render", "--backend", "local", "--policy", str(big))
    assert (code, out) == (2, "")
    assert "larger than 4194304 bytes" in err


def test_a_spec_or_policy_giving_a_key_twice_is_a_usage_error(tmp_path, capsys):
    """JSON as Python reads it keeps the last of a key given twice: this spec rolled out version 3."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"stages": [50, 100], "candidate_version": "2", "candidate_version": "3"}')
    argv = ["run", "--spec", str(spec), "--url", "http://127.0.0.1:9", "--validation", str(tmp_path)]
    code, out, err = run(capsys, *argv, "--prediction-log", str(tmp_path), "--no-hard-guards")
    assert (code, out) == (2, "")
    assert f"{spec}: key(s) given more than once: 'candidate_version'" in err
    policy = tmp_path / "policy.json"
    policy.write_text('{"route": [{"version": "1", "weight": 100, "weight": 0}]}')
    code, out, err = run(capsys, "mesh", "render", "--backend", "local", "--policy", str(policy))
    assert (code, out) == (2, "")
    assert "key(s) given more than once: 'weight'" in err


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\x00\xff not json {{{", "the answer is not JSON"),
        (b"<html>a proxy</html>", "the answer is not JSON"),
        (b'{"route": "x"}', "the answer is not a traffic policy"),
        (b"null", "the answer is not a traffic policy"),
    ],
)
def test_a_server_answering_garbage_is_an_error_in_one_line(tmp_path, capsys, body, words):
    """Garbage from the --url (a wrong port, a proxy) ended in UnicodeDecodeError, JSONDecodeError
    or PolicyError tracebacks, exit 1: the code of a failed gate or a rollback."""
    from tests.support.hostile import hostile_server

    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 100}]}))
    with hostile_server(body) as url:
        for argv in (["get"], ["apply", "--policy", str(policy)]):
            code, out, err = run(capsys, "mesh", *argv, "--backend", "local", "--url", url, "--model", "digits")
            assert (code, out) == (4, "")
            assert words in err
            assert "Traceback" not in err
            assert len(err.strip().splitlines()) == 1


def test_a_server_error_with_line_breaks_and_terminal_escapes_is_printed_on_one_plain_line(tmp_path, capsys):
    """The reason a server (or a proxy before it) gives in its error answer went to stderr as
    sent: a line break started a second line that read as the command's own ("applied"), and
    terminal escapes cleared the screen or retitled the window of whoever ran it."""
    from tests.support.hostile import answering_server

    reason = "bad gateway\nrolloutctl mesh: applied\x1b[2J\x1b]0;title\x07\u202e"
    with answering_server(lambda path: (502, json.dumps({"error": reason}).encode())) as url:
        code, out, err = run(capsys, "mesh", "get", "--backend", "local", "--url", url, "--model", "digits")
    assert (code, out) == (4, "")
    assert err.count("\n") == 1
    assert err.startswith("rolloutctl mesh: error: model server GET /v2/models/digits/traffic: HTTP 502: bad gateway ")
    assert all(c.isprintable() for c in err.rstrip("\n"))


def test_a_server_answering_a_byte_at_a_time_times_out():
    """The socket's timeout is per read: a body sent a byte every 0.2 s held the admin client
    (mesh apply, every step of run) for as long as the server kept at it."""
    import time

    from tests.support.hostile import hostile_server
    from vision_rollout.serving import AdminError, ModelServerAdmin

    with hostile_server(trickle_s=0.2, trickle_for_s=10) as url:
        started = time.monotonic()
        with pytest.raises(AdminError, match="no answer within 1 s"):
            ModelServerAdmin(url, timeout_s=1).traffic("digits")
        assert time.monotonic() - started < 4


def test_mesh_render_declares_every_version_the_policy_routes_to(tmp_path, capsys):
    """``--versions 3`` for a policy routing to 1 and 2 rendered a VirtualService whose subsets
    v1 and v2 the DestinationRule did not declare (Envoy answers 503); letters were a traceback."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 75}, {"version": "2", "weight": 25}]}))
    base = ["mesh", "render", "--backend", "istio", "--policy", str(policy)]
    base += ["--namespace", "models", "--service", "digits", "--name", "digits"]
    for versions, words in [("3", "version(s) 1, 2, which would have no subset"), ("a,b", "version numbers")]:
        code, out, err = run(capsys, *base, "--versions", versions)
        assert (code, out) == (2, "")
        assert words in err
    many = ",".join(str(v) for v in range(3, 20_003))  # (review s53-1: echoed whole, one 130 KB line)
    code, _, err = run(capsys, *base, "--versions", many)
    assert code == 2
    assert "which would have no subset" in err
    assert len(err) < 400
    code, out, _ = run(capsys, *base, "--versions", "1,2,3")
    assert code == 0
    assert [d["kind"] for d in yaml.safe_load_all(out)] == ["DestinationRule", "VirtualService"]
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    code, _, err = run(capsys, "mesh", "render", "--backend", "local", "--policy", str(deep))
    assert (code, err.strip()) == (2, f"rolloutctl mesh: --policy {deep}: nested too deep to read")


def test_mesh_render_takes_the_gateways_and_hosts_the_connection_names(tmp_path, capsys):
    """The DAG's VirtualService has the connection's istio.gateways and istio.hosts (an ingress
    gateway and a public host name); ``mesh render`` had no way to name them, so what it rendered
    for review differed from what a rollout applies (the Service's cluster name alone, the
    sidecars alone). ``--gateways`` and ``--hosts`` take them, checked as the connection's are:
    a host Istio would refuse, or more than 64 names, is a usage error naming it."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 75}, {"version": "2", "weight": 25}]}))
    base = ["mesh", "render", "--backend", "istio", "--policy", str(policy)]
    base += ["--namespace", "models", "--service", "digits", "--name", "digits"]
    code, out, _ = run(capsys, *base, "--gateways", "istio-ingress/models, mesh", "--hosts", "digits.example.com")
    assert code == 0
    _, service = list(yaml.safe_load_all(out))
    validate_istio(service)
    assert service["spec"]["gateways"] == ["istio-ingress/models", "mesh"]
    assert service["spec"]["hosts"] == ["digits.example.com"]
    for option, value, words in [
        ("--hosts", "digits.example.com,", "not up to 64 names"),
        ("--hosts", ",".join(["h.example.com"] * 65), "not up to 64 names"),
        ("--gateways", "no_such gateway", "istio gateway 'no_such gateway'"),
        ("--hosts", "a..example.com", "istio host 'a..example.com'"),
    ]:
        code, out, err = run(capsys, *base, option, value)
        assert (code, out) == (2, "")
        assert words in err, (option, value, err)


def test_mesh_render_takes_versions_of_up_to_19_digits_as_the_model_server_does(tmp_path, capsys):
    """``--versions`` took 9 digits at most, while the model server (as Triton) serves version
    folders up to int64's largest: a 10-digit version's subsets could not be declared. Each
    version up to 9223372036854775807 is a subset now, and one past int64 is refused."""
    top = str(2**63 - 1)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"route": [{"version": "1234567890", "weight": 75}, {"version": top, "weight": 25}]}))
    base = ["mesh", "render", "--backend", "istio", "--policy", str(policy)]
    base += ["--namespace", "models", "--service", "digits", "--name", "digits"]
    code, out, err = run(capsys, *base, "--versions", f"1234567890,{top}")
    assert code == 0, err
    rule, service = yaml.safe_load_all(out)
    assert [s["name"] for s in rule["spec"]["subsets"]] == ["v1234567890", f"v{top}"]
    pinned = [r for r in service["spec"]["http"] if r["name"].startswith("pinned-v")]
    assert [r["match"][0]["headers"]["x-model-version"] for r in pinned][-1] == {"regex": f"0*{top}"}
    code, out, err = run(capsys, *base, "--versions", f"1234567890,{top},{2**63}")
    assert (code, out) == (2, "")
    assert "--versions takes version numbers" in err


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--namespace", "Models", "istio namespace 'Models': not a DNS label"),
        ("--service", "my_svc", "istio service 'my_svc': not a Service name"),
        ("--service", "d" * 64, "not a Service name (a-z first, then a-z, 0-9, '-' inside, at most 63)"),
        ("--name", "Digits.V2", "istio name 'Digits.V2': not a DNS subdomain"),
        ("--root-namespace", "Mesh_Root", "istio root_namespace 'Mesh_Root': not a DNS label"),
    ],
)
def test_mesh_refuses_names_kubernetes_would_refuse(tmp_path, capsys, flag, value, words):
    """``--namespace Models --service my_svc`` rendered manifests (exit 0) that no API server
    takes, and a host ``my_svc.Models.svc.cluster.local`` no Service has; ``apply`` sent them."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 100}]}))
    names = {"--namespace": "models", "--service": "digits", "--name": "digits", flag: value}
    for action in ("render", "apply"):
        argv = ["mesh", action, "--backend", "istio", "--policy", str(policy), "--versions", "1"]
        code, out, err = run(capsys, *argv, *(x for item in names.items() for x in item))
        assert (code, out) == (2, "")
        assert words in err
        assert "Traceback" not in err


@pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)
def test_mesh_apply_istio_without_a_cluster_says_so(tmp_path, capsys, monkeypatch):
    """No kubeconfig, or an API server that does not answer: a traceback of the kubernetes
    client's (ConfigException, MaxRetryError), not the command's error line."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 100}]}))
    argv = ["mesh", "apply", "--backend", "istio", "--policy", str(policy), "--versions", "1"]
    argv += ["--namespace", "models", "--service", "digits", "--name", "digits"]
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    from kubernetes import client
    from kubernetes.config import kube_config

    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)  # loading sets it
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "none"))  # $KUBECONFIG
    code, out, err = run(capsys, *argv)
    assert (code, out) == (4, "")
    assert "no cluster to reach: no in-cluster service account, and no kubeconfig" in err
    assert "Traceback" not in err
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],  # nothing listens
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
    }
    (tmp_path / "kubeconfig").write_text(json.dumps(kubeconfig))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
    code, out, err = run(capsys, *argv)
    assert (code, out) == (4, "")
    assert "rolloutctl mesh: error: the Kubernetes API server did not answer" in err
    assert "Traceback" not in err


def test_verify_model_with_a_mistyped_or_broken_baseline(models_dir, tmp_path, capsys):
    """A mistyped --baseline skipped the comparison and said OK (exit 0); a baseline that does
    not load was an onnxruntime traceback."""
    candidate = str(models_dir / "digits" / "2" / "model.onnx")
    code, out, err = run(capsys, "verify-model", candidate, "--baseline", str(tmp_path / "typo.onnx"))
    assert (code, out) == (2, "")
    assert "no such file" in err
    # A mistyped candidate, or a folder, likewise: it was "FAILED: ... sha256  (0 bytes) on ", exit 1.
    for mistyped, why in ((tmp_path / "typo.onnx", "no such file"), (tmp_path, "not a file (a folder)")):
        code, out, err = run(capsys, "verify-model", str(mistyped))
        assert (code, out) == (2, "")
        assert f"{why}: {str(mistyped)!r}" in err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    code, out, _ = run(capsys, "verify-model", candidate, "--baseline", str(broken))
    assert code == 1
    assert out.startswith("FAILED")
    assert "the baseline" in out
    assert "does not load in ONNX Runtime" in out


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["gate", "--samples", "{tmp}/none.csv"], 2, "no such file"),
        (["gate", "--samples", "{tmp}/s.csv", "--set", "alpha=NaN"], 2, "is not a finite number"),
        (["gate", "--samples", "{tmp}/s.csv", "--looks", "many"], 2, "argument --looks: invalid int value: 'many'"),
        (["gate"], 2, "the following arguments are required: --samples"),
        (["audit", "--prediction-log", "{tmp}/none"], 2, "no such folder"),
        (["audit", "--prediction-log", "{tmp}", "--out", "{tmp}/report"], 2, "holds a report already"),
        (["verify-model", "{tmp}/none.onnx"], 2, "no such file"),
        (["outbox", "list", "--outbox", "{tmp}/none"], 2, "--outbox: no such folder"),
        (["outbox", "list", "--outbox", "{tmp}/s.csv"], 2, "--outbox: not a folder"),  # (was "no such folder")
        (["audit", "--prediction-log", "{tmp}/s.csv"], 2, "not a folder"),
        (["outbox", "send", "--outbox", "{tmp}"], 2, "the following arguments are required: --token-file"),
        (["status", "--model", "digits", "--lock-dir", "{tmp}/locks"], 4, "unreadable lock file"),
        (["status", "--model", "no model!", "--lock-dir", "{tmp}"], 2, "not a model name"),
        (["prune", "--run-dir", "{tmp}/none"], 2, "--run-dir: no such folder"),
        (["prune", "--run-dir", "{tmp}", "--limit", "0"], 2, "--limit: 1 to 100000, not 0"),
    ],
)
def test_every_command_with_json_answers_a_refusal_with_one_json_object(tmp_path, capsys, argv, code, words):
    """A script reading ``--json`` from stdout got nothing on an error (the line was on stderr
    alone), then failed parsing an empty string. stdout has one JSON object naming the error
    and the exit code, as ``kubectl -o json`` answers; the error stays on stderr in one line."""
    samples(300).to_csv(tmp_path / "s.csv", index=False)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("an earlier audit")
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "digits.lock").write_text("{not json")
    code_, out, err = run(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv), "--json")
    answer = json.loads(out)
    assert (code_, answer["exit"]) == (code, code), err
    assert words in answer["error"]
    assert err.strip().splitlines()[-1].startswith("rolloutctl ")
    assert words in err.strip().splitlines()[-1]


def test_status_with_json_whose_routes_cannot_be_read_prints_the_lease_with_the_error(tmp_path, capsys):
    """``status --json`` with a model server that does not answer printed the lock's part, then
    main's error: stdout held one object and stderr the error. Now one object holds both, exit 4."""
    code, out, err = run(
        capsys, "status", "--model", "digits", "--lock-dir", str(tmp_path), "--url", "http://127.0.0.1:9", "--json"
    )
    answer = json.loads(out)
    assert (code, answer["exit"], answer["state"], answer["routes"]) == (4, 4, "none", None)
    assert "unreachable" in answer["error"]
    assert answer["routes_error"] == answer["error"]
    assert "unreachable" in err


def test_a_samples_or_model_path_that_is_no_readable_file_is_named_as_such(tmp_path, capsys):
    """gate and verify-model said "no such file" of a folder or a device that is there, and gate
    quoted a CSV reader's error without the file (a decoding error, "No columns to parse")."""
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "empty.csv").write_text("")
    for argv, words in (
        (["gate", "--samples", str(tmp_path / "dir.csv")], f"{tmp_path / 'dir.csv'}: not a file (a folder"),
        (["gate", "--samples", "/dev/zero"], "/dev/zero: not a file (a device)"),
        (["gate", "--samples", str(tmp_path / "bin.csv")], f"{tmp_path / 'bin.csv'}: cannot be read as samples"),
        (["gate", "--samples", str(tmp_path / "empty.csv")], f"{tmp_path / 'empty.csv'}: cannot be read as samples"),
        (["verify-model", "/dev/null"], "not a file (a device): '/dev/null'"),
    ):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, ""), err
        assert words in err
        assert "no such file" not in err


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_a_file_argument_that_is_a_fifo_a_folder_or_a_device_is_refused_naming_it(tmp_path, capsys, kind):
    """A spec, a policy or a token file that was a FIFO (a shell's process substitution, a named
    pipe nobody writes) hung the command in its open for ever; a folder or a device (/dev/null)
    was read as an empty file, or said "Is a directory" without the argument. Each file argument
    now refuses what is not a regular file at once, naming the argument and what the path is."""
    import os
    import threading

    bad = tmp_path / "bad"
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "folder":
        bad.mkdir()
    else:
        bad.symlink_to("/dev/null")
    valid = tmp_path / "valid"
    (valid / "labels.csv").parent.mkdir()
    (valid / "labels.csv").write_text("file,label\n")
    no_labels = tmp_path / "validation"
    no_labels.mkdir()
    (no_labels / "labels.csv").symlink_to(bad)
    (tmp_path / "log").mkdir()
    (tmp_path / "locks").mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 100}]}))
    url = "http://127.0.0.1:9"
    run_args = ["--url", url, "--prediction-log", str(tmp_path / "log"), "--no-hard-guards"]
    cases = [
        (["run", "--spec", "{bad}", "--validation", str(valid), *run_args], "--spec"),
        (["run", "--spec", str(spec), "--validation", str(valid), *run_args, "--token-file", "{bad}"], "--token-file"),
        (["run", "--spec", str(spec), "--validation", str(no_labels), *run_args], "--validation"),
        (["abort", "--spec", "{bad}", "--lock-dir", str(tmp_path / "locks"), "--url", url], "--spec"),
        (["mesh", "render", "--backend", "local", "--policy", "{bad}"], "--policy"),
        (
            ["mesh", "get", "--backend", "local", "--url", url, "--model", "digits", "--token-file", "{bad}"],
            "--token-file",
        ),
        (
            [
                "status",
                "--model",
                "digits",
                "--lock-dir",
                str(tmp_path / "locks"),
                "--url",
                url,
                "--token-file",
                "{bad}",
            ],
            "--token-file",
        ),
        (["outbox", "send", "--outbox", str(tmp_path), "--token-file", "{bad}"], "--token-file"),
        (["gate", "--samples", "{bad}"], "--samples"),
        (["verify-model", "{bad}"], "argument path"),
        (["verify-model", str(spec), "--baseline", "{bad}"], "--baseline"),
    ]
    for argv, flag in cases:
        answer: dict = {}
        argv = [a.replace("{bad}", str(bad)) for a in argv]
        worker = threading.Thread(target=lambda a=argv, into=answer: into.update(code=main(a)), daemon=True)
        worker.start()
        worker.join(30)
        hung = worker.is_alive()
        if hung:  # blocked opening the FIFO: a writer lets it go, then the test fails
            os.close(os.open(bad, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(30)
        out = capsys.readouterr()
        assert not hung, argv
        assert (answer["code"], out.out) == (2, ""), (argv, out.err)
        last = out.err.strip().splitlines()[-1]
        assert flag in last, (argv, last)
        what = {"fifo": "a FIFO", "folder": "a folder", "device": "a device"}[kind]
        assert f"not a file ({what})" in last, (argv, last)
        assert "Traceback" not in out.err


def test_a_gate_setting_nested_too_deep_is_a_usage_error(tmp_path, capsys):
    """``--set alpha=[[[...`` (a few thousand brackets) was a RecursionError's traceback and exit 4
    (an error of a server or a store); it is the argument's fault: exit 2, naming it."""
    path = tmp_path / "s.csv"
    samples(200).to_csv(path, index=False)
    for deep in ("[" * 100_000, "[" * 5000 + "]" * 5000):
        code, out, err = run(capsys, "gate", "--samples", str(path), "--set", f"alpha={deep}", "--json")
        assert (code, json.loads(out)) == (2, {"error": "--set alpha: nested too deep to read", "exit": 2}), err
        assert "Traceback" not in err


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_threshold_that_is_not_a_number_is_refused(tmp_path, capsys, value):
    """``--set p99_ms_max=NaN`` (or NaN in run's spec file) passed every bound and turned the guard off."""
    path = tmp_path / "s.csv"
    samples(3000).to_csv(path, index=False)
    code, out, err = run(capsys, "gate", "--samples", str(path), "--set", f"p99_ms_max={value}", "--json")
    assert (code, json.loads(out)["exit"]) == (2, 2)
    assert "is not a finite number" in err
    spec = tmp_path / "spec.json"
    spec.write_text(f'{{"stages": [50, 100], "p99_ms_max": {value}}}')
    (tmp_path / "log").mkdir()
    code, _, err = run(
        capsys,
        *("run", "--spec", str(spec), "--url", "http://127.0.0.1:9", "--validation", str(tmp_path)),
        *("--prediction-log", str(tmp_path / "log"), "--no-hard-guards"),
    )
    assert code == 2
    assert "invalid spec: p99_ms_max: " in err
    assert "is not a finite number" in err


# -- rolloutctl run against a real model server ---------------------------------------------------


def kubeconfig_of(api, tmp_path, monkeypatch):
    """The CLI's kubeconfig ($KUBECONFIG's default place) pointed at the fake API server ``api``
    (namespace ``ml``); a client of it for the test's own writes."""
    from kubernetes import client
    from kubernetes.config import kube_config

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(api.kubeconfig("ml")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)  # loading sets it
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    cfg = client.Configuration()
    cfg.host = api.url
    return client.ApiClient(cfg)


def istio_objects_of(api, target) -> None:
    """``target``'s VirtualService (version 1 taking all of the traffic) and DestinationRule and
    the mesh's EnvoyFilter, as deploy/ leaves them, in the fake API server ``api``."""
    from vision_rollout.mesh import render_destination_rule, render_envoy_filter, render_virtual_service

    stable = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
    for plural, ns, obj in (
        ("virtualservices", "ml", render_virtual_service(target, stable, ["1"])),
        ("destinationrules", "ml", render_destination_rule(target, ["1"])),
        ("envoyfilters", "istio-system", render_envoy_filter()),
    ):
        api.objects[(plural, ns, obj["metadata"]["name"])] = {
            **obj,
            "metadata": {**obj["metadata"], "resourceVersion": "1"},
        }


def logging_args(tmp_path) -> tuple[str, str]:
    """A model server's arguments writing the prediction log ``run_argv`` reads (a run checks,
    at its first look, that it reads the log the server writes)."""
    return ("--prediction-log", str(tmp_path / "predictions"))


def run_argv(s, tmp_path, models_dir, spec: dict, *more: str) -> list[str]:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    (tmp_path / "predictions").mkdir(exist_ok=True)
    return [
        *("run", "--spec", str(spec_file), "--url", s.http, "--token-file", str(token)),
        *("--validation", str(models_dir / "digits" / "validation")),
        *("--prediction-log", str(tmp_path / "predictions")),
        *more,
    ]


def wait_for_stable_weight(s, proc, weight: int) -> None:
    """Until the run ``proc`` has put version 1 (the first route) at ``weight``%: 60 s at most,
    and fails where the run ended first."""
    deadline = time.monotonic() + 60
    while s.api.traffic("digits").to_dict()["route"][0]["weight"] != weight:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.integration
def test_run_checks_where_it_starts_and_changes_nothing_when_it_cannot(
    server_factory, repo_copy, models_dir, tmp_path, capsys
):
    """Two runs at once each drove the routes and both said PROMOTED; a candidate not loaded was
    a traceback; a mistyped --prometheus held the first stage, the canary taking its share, for
    max_stage_seconds (an hour by default) before rolling back. Each is refused before any
    route changes, exit 4; and no state file is left in the working folder."""
    from tests.support import put_policy

    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    s.load_versions("digits", 1, 2)
    stable = {"route": [{"version": "1", "weight": 100}]}
    spec = {"stages": [50, 100], "bake_seconds": 60, "max_stage_seconds": 60}

    def routes() -> dict:
        argv = ["mesh", "get", "--backend", "local", "--url", s.http, "--model", "digits"]
        return json.loads(run(capsys, *argv, "--token-file", str(tmp_path / "token"))[1])

    cases = [
        (
            {"route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]},
            spec,
            "not where a rollout starts",
        ),
        ({**stable, "mirror": {"version": "2", "percent": 100}}, spec, "mirrors to version 2"),
        (stable, {**spec, "candidate_version": "3"}, "version 3 of 'digits' is not loaded"),
        # "load it beside version 1 first" named no way to: rolloutctl has no load command.
        (
            stable,
            {**spec, "candidate_version": "3"},
            'POST /v2/repository/models/digits/load with {"parameters": {"config": '
            '"{\\"version_policy\\": {\\"specific\\": {\\"versions\\": [1, 3]}}}"}}',
        ),
    ]
    for policy, this_spec, words in cases:
        assert put_policy(s, policy).status_code == 200
        code, out, err = run(capsys, *run_argv(s, tmp_path, models_dir, this_spec, "--no-hard-guards"))
        assert (code, out) == (4, ""), err
        assert words in err
        assert "nothing changed" in err
        assert routes() == policy
    # The model's lock, as the DAG holds it in local mode: held by a live run, refused; taken over
    # from a run that did not end and then refused by the checks, given back as it was.
    locks = tmp_path / "locks"
    dag = FileLock("digits", locks).acquire("manual__2026-12-02 (a DAG run)")
    code, out, err = run(capsys, *run_argv(s, tmp_path, models_dir, spec, "--no-hard-guards", "--lock-dir", str(locks)))
    assert (code, out) == (4, ""), err
    assert "nothing changed: model 'digits' is being rolled out by run 'manual__2026-12-02 (a DAG run)'" in err
    assert FileLock("digits", locks).holding() == dag
    FileLock("digits", locks).release(dag.holder)
    crashed = FileLock("digits", locks, clock=lambda: time.time() - 3600).acquire("a run that died")
    halfway = {"route": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]}
    assert put_policy(s, halfway).status_code == 200
    code, out, err = run(capsys, *run_argv(s, tmp_path, models_dir, spec, "--no-hard-guards", "--lock-dir", str(locks)))
    assert (code, out) == (4, ""), err
    assert "not where a rollout starts" in err
    assert FileLock("digits", locks).holding() == replace(crashed, transitions=crashed.transitions + 2)
    assert routes() == halfway
    assert put_policy(s, stable).status_code == 200
    code, out, err = run(capsys, *run_argv(s, tmp_path, models_dir, spec, "--prometheus", "http://127.0.0.1:9"))
    assert (code, out) == (4, "")
    assert "Prometheus cannot be read, nothing changed" in err
    assert routes() == stable
    argv = run_argv(s, tmp_path, models_dir, spec, "--no-hard-guards")
    argv[argv.index("--validation") + 1] = str(tmp_path)  # no labels.csv there
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "labels.csv" in err
    assert not list(tmp_path.glob(".rollout-*"))
    assert not list(Path.cwd().glob(".rollout-*"))


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_stopped_by_a_signal_puts_the_stable_version_back(server_factory, repo_copy, models_dir, tmp_path, sig):
    """A cancelled CI job (SIGTERM) killed run mid-stage: the canary kept its 50% and the mirror
    stayed on, silently, exit 143. Now the stable version is put back first, the last line says
    so, the outbox has the rollback report, and the exit is 128 + the signal's number."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), *logging_args(tmp_path), token=TOKEN)
    s.load_versions("digits", 1, 2)
    s.api.set_traffic("digits", TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    spec = {"stages": [50, 100], "bake_seconds": 120, "max_stage_seconds": 120}
    argv = run_argv(s, tmp_path, models_dir, spec, "--no-hard-guards", "--outbox", str(tmp_path / "outbox"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("", "include", "plugins"))}
    # As from a terminal: a background job (a CI runner's, nohup's) inherits SIGINT ignored,
    # which the CLI keeps ignored; the signals this test sends are taken again first.
    terminal = (
        "import runpy, signal, sys\n"
        "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP): signal.signal(sig, signal.SIG_DFL)\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "sys.argv[0] = 'rolloutctl'\n"
        "runpy.run_module('vision_rollout.cli', run_name='__main__')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", terminal, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_stable_weight(s, proc, 50)
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert out.strip().splitlines()[-1] == f"INTERRUPTED by {name}: version 1 takes 100% again"
    assert "Traceback" not in err
    assert s.api.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    [report] = (tmp_path / "outbox").glob("*.json")
    assert json.loads(report.read_text())["text"].startswith(
        f"Rolled back digits v2: rolloutctl run was stopped by {name}"
    )


def test_a_signal_the_replays_client_turned_into_an_error_ends_the_run_as_that_signal(tmp_path, monkeypatch, capsys):
    """CI (session 40's landing): SIGTERM sent while the validation replay was sending landed in
    gevent's hub, and the replay came out with "[Errno 9] Bad file descriptor", not with the
    signal: the stable version was put back, but the run exited 4, "the rollout failed", its
    report saying so. A run that a signal stopped ends as stopped by it: exit 128 + its number,
    the last line and the report saying so, the error on stderr."""
    import argparse
    import errno
    import signal

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.folders import Folder
    from vision_rollout.spec import RolloutSpec

    def judge(window):
        try:
            signal.raise_signal(signal.SIGTERM)
        except cli.Interrupted:  # (as the replay's client lost it)
            pass
        raise OSError(errno.EBADF, "Bad file descriptor")

    spec = RolloutSpec.from_dict({"stages": [50, 100], "mirror_percent": 0})
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: judge)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path))
    args.outbox = Folder(str(tmp_path / "outbox"))
    router = RecordingRouter()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with cli._stopped_by_signals():
            code = cli._run(args, spec, router, None, {}, cli._Lease(None, spec.model), "")
        ignored = signal.getsignal(signal.SIGTERM)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    assert code == 128 + signal.SIGTERM, err
    assert out.strip().splitlines()[-1] == "INTERRUPTED by SIGTERM: version 1 takes 100% again"
    assert "Bad file descriptor" in err
    assert router.history[-1] == spec.stable_policy().to_dict()
    [report] = (tmp_path / "outbox").glob("*.json")
    assert json.loads(report.read_text())["text"].startswith(
        "Rolled back digits v2: rolloutctl run was stopped by SIGTERM"
    )
    assert ignored is signal.SIG_IGN  # (a second kill waits for the restore, as before)
    assert cli._HELD["received"] is None


@pytest.mark.parametrize("restore_fails", [False, True])
def test_run_cut_short_by_an_error_reports_what_serves(tmp_path, monkeypatch, restore_fails):
    """A rollout that failed on an error (a route not written, a lost lease) wrote no report to
    the outbox: its stage reports said the first stage passed, and then nothing. The outbox now
    has the end, and where the stable version could not be put back, says so (a report never
    says the stable version takes the traffic again unless it was read back so)."""
    import argparse

    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.folders import Folder
    from vision_rollout.mesh import RouterError
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 0})
    first_stage = spec.policy_for_stage(10).to_dict()

    class FailingRouter:
        history = [spec.stable_policy().to_dict()]

        def reconcile(self) -> None:
            pass

        def set_routes(self, policy: TrafficPolicy) -> bool:
            if policy.to_dict() != first_stage and (restore_fails or policy != spec.stable_policy()):
                raise RouterError("the model server answered 503")
            self.history.append(policy.to_dict())
            return True

        def get_routes(self) -> TrafficPolicy:
            return TrafficPolicy.from_dict(self.history[-1])

    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda window: StageState("pass", 1, 1, None, "passed"))
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path))
    args.outbox = Folder(str(tmp_path / "outbox"))
    with pytest.raises(cli.CommandError, match="the model server answered 503") as raised:
        cli._run(args, spec, FailingRouter(), None, {}, cli._Lease(None, spec.model), "")
    [report] = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert "rolloutctl run: the rollout failed: the model server answered 503" in report["text"]
    if restore_fails:
        assert "the routes are NOT back to version 1" in str(raised.value)
        assert report["text"].startswith("Stopped digits v2, routes not restored: ")
        assert "takes 100% of traffic again" not in json.dumps(report["blocks"])
    else:
        assert str(raised.value).endswith("version 1 takes 100% again")
        assert report["text"].startswith("Rolled back digits v2: ")


def test_run_goes_by_the_evidence_when_the_outbox_cannot_be_written(tmp_path, monkeypatch, caplog):
    """An outbox write failing (an object store's hiccup) raised out of the first stage's report:
    the rollout put the stable version back and exited 4, "nothing was decided", for a canary
    that passed; and after a promotion carried out, the final report's failure exited 4 too.
    The rollout goes on, its exit code says what it did, and the lost report is a warning."""
    import argparse
    import logging

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.folders import Folder
    from vision_rollout.gates import evaluate_gate
    from vision_rollout.spec import RolloutSpec

    def unwritable(self, name, data):
        raise OSError("the object store answered 503")

    spec = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 0})
    verdict = evaluate_gate(samples(200))
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda window: StageState("pass", 1, 1, verdict, "ok"))
    monkeypatch.setattr(Folder, "write", unwritable)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path))
    args.outbox = Folder(str(tmp_path / "outbox"))
    router = RecordingRouter()
    with caplog.at_level(logging.WARNING, logger="vision_rollout.cli"):
        assert cli._run(args, spec, router, None, {}, cli._Lease(None, spec.model), "") == 0
    assert router.history[-1] == spec.promoted_policy().to_dict()
    lost = [r.getMessage() for r in caplog.records if r.name == "vision_rollout.cli"]
    assert len(lost) == 3  # two stages' reports and the promotion's
    assert all("the object store answered 503" in m for m in lost)
    assert "Promoted digits v2" in lost[-1]


@pytest.mark.parametrize(
    "stop", ["signal after the stages", "signal, not restored", "abort in the 100% stage", "error in the 50% stage"]
)
def test_a_run_cut_short_reports_with_the_chart_the_dags_teardown_would(tmp_path, monkeypatch, stop):
    """rolloutctl run stopped by a signal, an abort or an error: its report went to the outbox
    without a chart, where the DAG's teardown reports a run stopped with the chart of the stage
    that decided of its verdicts (the last judged, once every stage passed), or the line saying
    why there is none (the stage it was in has no verdict); nothing where no stage was judged.
    It does too now, the chart drawn within a bound after an abort or an error; where the stable
    version is not back, not drawn, the report going at once, as the teardown's. After a signal,
    not drawn either: docker stop's kill follows its SIGTERM in 10 s, the chart's bound, and the
    report written after the chart was lost with the process."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from tests.support import stage_evidence
    from vision_rollout import cli, engine, notify
    from vision_rollout.engine import StageState
    from vision_rollout.folders import Folder
    from vision_rollout.gates import evaluate_gate
    from vision_rollout.locks import Aborted
    from vision_rollout.mesh import RouterError
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [50, 100], "mirror_percent": 0})
    passing = replace(evaluate_gate(samples(200)), decision="pass")
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{i}.png,{i % 10}\n" for i in range(20)))
    for i in range(20):  # (the validation set the passing stages' chart reads its labels from)
        (tmp_path / f"{i}.png").write_bytes(b"image-%d" % i)

    def look(window):
        stage_evidence(tmp_path, window.started, replay=True)  # (a pass: its paired check's records too)
        if stop == "abort in the 100% stage" and window.index == 1:
            raise Aborted("aborted by an operator")
        if stop == "error in the 50% stage":
            raise RuntimeError("the judge broke")
        return StageState("pass", 2, 3, passing, "passed", until=window.started + 100)

    def audit(*args, **kwargs):
        raise cli.Interrupted(signal.SIGTERM)

    budgets = []
    real_chart = notify.report_chart
    monkeypatch.setattr(
        notify, "report_chart", lambda *a, **k: budgets.append(k.get("budget_s")) or real_chart(*a, **k)
    )
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: look)
    monkeypatch.setattr(engine, "poke_interval", lambda spec: 0.0)
    monkeypatch.setattr(engine, "rollout_audit", audit)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path / "log"))
    args.outbox = Folder(str(tmp_path / "outbox"))
    router = RecordingRouter()
    if stop == "signal, not restored":  # (the routes not read back: the stable version is not shown back)

        def unread():
            raise RouterError("the mesh does not answer")

        router.get_routes = unread
    run = lambda: cli._run(args, spec, router, None, {}, cli._Lease(None, spec.model), "")  # noqa: E731
    if stop == "error in the 50% stage":
        with pytest.raises(cli.CommandError, match="the judge broke"):
            run()
    else:
        assert run() == (143 if stop.startswith("signal") else 1)
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    final = reports[-1]
    assert final["text"].startswith("Stopped digits v2" if "not restored" in stop else "Rolled back digits v2")
    lines = [e["text"] for b in final["blocks"] if b["type"] == "context" for e in b["elements"]]
    said = [t for t in lines if "No chart" in t]
    if stop == "signal after the stages":  # (not drawn: docker stop's kill follows its signal in 10 s)
        (line,) = said
        assert "not drawn: a signal stopped the run" in line
        assert "chart" not in final
        assert budgets == []
    elif stop == "signal, not restored":
        (line,) = said
        assert "not drawn while version 1 may not be back: this report goes at once" in line
        assert "chart" not in final
        assert budgets == []
    elif stop == "abort in the 100% stage":
        (line,) = said
        assert "the 100% stage has no verdict" in line
        assert "chart" not in final
    else:  # (no stage judged: nothing to chart)
        assert not said
        assert "chart" not in final


def test_run_holds_the_models_lease_over_the_shadow_audits_longest_wait_and_reads(tmp_path, monkeypatch):
    """rolloutctl run renewed its lease (``LEASE_S``, 300 s) at its last stage's end, and the
    shadow audit then waited for the copies to the range's close (186 s) and read the log (up to
    ``MAX_AUDIT_S``, 480 s): the lease ran out mid-audit, another run could take the model over,
    and this one promoted on its routes. It is renewed before the audit for ``LEASE_S`` beyond
    the longest wait and reads (``rollout_audit_s``, as the DAG's shadow_consistency holds it);
    a lease lost meanwhile stops the run there, no route touched (the audit's failure is none of
    it)."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.audit import MAX_AUDIT_S, AuditResult, closes
    from vision_rollout.engine import StageState
    from vision_rollout.gates import evaluate_gate
    from vision_rollout.locks import LEASE_S
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [50, 100], "mirror_percent": 0})
    passing = replace(evaluate_gate(samples(200)), decision="pass")
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda w: StageState("pass", 2, 3, passing, "passed"))
    monkeypatch.setattr(engine, "poke_interval", lambda spec: 0.0)
    locks = tmp_path / "locks"
    held = []

    def audit(prediction_log, start, end, spec, mirroring):
        held.append((FileLock("digits", locks).holding().seconds, (closes(end) - end).total_seconds()))
        return AuditResult(spec.model, start.isoformat(), end.isoformat(), "skip", ["no records"])

    monkeypatch.setattr(engine, "rollout_audit", audit)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path / "log"))
    args.outbox = None
    with cli._Lease(locks, spec.model) as lease:
        assert cli._run(args, spec, RecordingRouter(), None, {}, lease, "") == 0
    ((seconds, wait),) = held
    assert seconds >= LEASE_S + wait + MAX_AUDIT_S, (seconds, wait)
    # (lost before the audit: the run stops, the routes left to the run that holds the model)
    router = RecordingRouter()
    with cli._Lease(locks, spec.model) as lease:
        real = lease.renew

        def renew(note=None, seconds=LEASE_S):
            if seconds > LEASE_S:
                FileLock("digits", locks).release(lease.holder)
                FileLock("digits", locks).acquire("another run")
            return real(note) if seconds == LEASE_S else real(note, seconds)

        monkeypatch.setattr(lease, "renew", renew)
        with pytest.raises(cli.CommandError, match="another run"):
            cli._run(args, spec, router, None, {}, lease, "")
    assert router.history == [spec.policy_for_stage(w).to_dict() for w in (50, 100)]


def _errors_report_signalled(tmp_path, monkeypatch, chart, send=None) -> tuple:
    """rolloutctl run cut short by an error once every stage passed (the admin API stopped
    answering before the promotion), its report's chart drawn by ``chart`` and, with ``send``,
    the report sent through it (the signal sent from either): the error is raised, no Interrupted.
    (the spec, the router, the reports in the outbox)."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from tests.support import stage_evidence
    from vision_rollout import cli, engine, notify, serving
    from vision_rollout.engine import StageState
    from vision_rollout.folders import Folder
    from vision_rollout.gates import evaluate_gate
    from vision_rollout.serving import AdminError
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [50, 100], "mirror_percent": 0})
    passing = replace(evaluate_gate(samples(200)), decision="pass")
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{i}.png,{i % 10}\n" for i in range(20)))
    for i in range(20):  # (the validation set the passing stages' chart reads its labels from)
        (tmp_path / f"{i}.png").write_bytes(b"image-%d" % i)
    looked = []

    def look(window):
        stage_evidence(tmp_path, window.started, replay=True)
        looked.append(window.index)
        return StageState("pass", 2, 3, passing, "passed", until=window.started + 100)

    def unverified(*args, **kwargs):  # (the check before promoting, every stage ended)
        if looked[-1:] == [1]:
            raise AdminError("the model server's admin API does not answer")

    monkeypatch.setattr(notify, "latency_accuracy_chart", chart)
    if send is not None:
        monkeypatch.setattr(notify.SlackNotifier, "send", send)
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: look)
    monkeypatch.setattr(engine, "poke_interval", lambda spec: 0.0)
    monkeypatch.setattr(engine, "rollout_audit", lambda *a, **k: None)
    monkeypatch.setattr(serving, "not_as_verified", unverified)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path / "log"))
    args.outbox = Folder(str(tmp_path / "outbox"))
    router = RecordingRouter()
    router.admin = None
    with cli._stopped_by_signals():
        try:
            with pytest.raises(cli.CommandError, match="admin API does not answer"):
                cli._run(args, spec, router, None, {}, cli._Lease(None, spec.model), "", verified="ab" * 32)
        except cli.Interrupted as exc:  # (a KeyboardInterrupt: pytest would stop the session)
            pytest.fail(f"{exc!r} went up, the error not raised")
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    return spec, router, reports


def test_a_signal_while_an_errors_report_is_charted_still_reports_and_names_the_error(tmp_path, monkeypatch):
    """rolloutctl run cut short by an error once every stage passed (the admin API stopped
    answering before the promotion): its report's chart is drawn, and a SIGTERM came meanwhile
    (a CI job cancelled). The signal's Interrupted, a KeyboardInterrupt, went past the chart's
    ``except Exception``: no report was written, and the error naming the failure was never
    raised. Now the report goes without the chart, saying why, and the error is raised."""

    def drawer(samples, title, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # (the signal, while the chart is drawn)
        time.sleep(2)
        return b"png"

    spec, router, reports = _errors_report_signalled(tmp_path, monkeypatch, drawer)
    final = reports[-1]
    assert final["text"].startswith("Rolled back digits v2")
    assert "admin API does not answer" in final["text"]
    lines = [e["text"] for b in final["blocks"] if b["type"] == "context" for e in b["elements"]]
    (line,) = [t for t in lines if "No chart" in t]
    assert "not drawn: a signal stopped the run" in line
    assert "chart" not in final
    assert router.get_routes() == spec.stable_policy()


def test_a_signal_while_an_errors_report_is_written_still_writes_it_and_names_the_error(tmp_path, monkeypatch):
    """rolloutctl run cut short by an error once every stage passed, its report's chart drawn: a
    SIGTERM once ``charted`` returned, while the report was written to the outbox, raised its
    Interrupted there: the report was not written, and the error naming the failure was never
    raised. The signal is held until the report is written; then the error is raised."""
    from vision_rollout import notify

    real_send = notify.SlackNotifier.send

    def send(self, message, *args, **kwargs):
        if message.text.startswith("Rolled back"):  # (the signal, as the final report is written)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        return real_send(self, message, *args, **kwargs)

    spec, router, reports = _errors_report_signalled(tmp_path, monkeypatch, lambda *a, **k: b"png", send)
    finals = [r for r in reports if r["text"].startswith("Rolled back digits v2")]
    assert len(finals) == 1  # (written once, whole)
    assert "admin API does not answer" in finals[0]["text"]
    assert router.get_routes() == spec.stable_policy()


@pytest.mark.parametrize("ended", ["judged", "breach", "changed", "chart raised"])
def test_runs_final_report_carries_the_chart_the_dags_would(tmp_path, monkeypatch, ended):
    """rolloutctl run's final report went to the outbox without a chart, where the DAG's carries
    the chart of the stage that decided, read again from the prediction log. It carries the same
    one now (the samples of that stage's last look, from the log the run judged), or the same line
    saying why there is none (a stage ended on a hard guard: no look judged; the chart's code
    raising, its thread not started: the report was lost). A stage failed on the candidate's
    file changing once its looks were judged has no verdict: its line said it "ended before a
    look was judged"; it says it has no verdict now. A first stage ended on a hard guard (no
    stage has a verdict) had no line at all, where a later stage's had one: it says so too."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from tests.support import png_title, stage_evidence
    from vision_rollout import cli, engine, notify, serving
    from vision_rollout.engine import StageState
    from vision_rollout.folders import Folder
    from vision_rollout.gates import evaluate_gate
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [50, 100], "mirror_percent": 0})
    verdict = evaluate_gate(samples(200, ratio=1.5))

    looked = []

    def look(window):
        stage_evidence(tmp_path, window.started, replay=False)
        looked.append(window.index)
        if ended == "breach":
            return StageState("breach", 0, 3, None, "hard guard tripped")
        if ended == "changed":  # (the first stage passes; the second is judged at look 1, then changed)
            passing = replace(evaluate_gate(samples(200)), decision="pass")
            if window.index == 0:
                return StageState("pass", 2, 3, passing, "passed", until=window.started + 100)
            return StageState("waiting", 1, 3, passing, "waiting", until=window.started + 100)
        return StageState("fail", 2, 3, verdict, "failed", until=window.started + 100)

    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: look)
    monkeypatch.setattr(engine, "poke_interval", lambda spec: 0.0)
    monkeypatch.setattr(serving, "not_as_verified", lambda *a: "version 2's file changed" if 1 in looked else None)
    router = RecordingRouter()
    router.admin = None  # (not_as_verified's, here the test's)
    if ended == "chart raised":

        def cannot(*args, **kwargs):
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(notify, "report_chart", cannot)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path / "log"))
    args.outbox = Folder(str(tmp_path / "outbox"))
    assert cli._run(args, spec, router, None, {}, cli._Lease(None, spec.model), "", verified="ab12") == 1
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    final = reports[-1]
    assert final["text"].startswith("Rolled back digits v2")
    lines = [e["text"] for b in final["blocks"] if b["type"] == "context" for e in b["elements"]]
    if ended == "chart raised":
        (line,) = [t for t in lines if "No chart" in t]
        assert "could not be drawn" in line
        assert "can't start new thread" in line
        assert "chart" not in final
        return
    if ended == "breach":  # (no stage has a verdict: the report names the first, which has none)
        (line,) = [t for t in lines if "No chart" in t]
        assert "the 50% stage has no verdict" in line
        assert not list((tmp_path / "outbox").glob("*.png"))
        return
    if ended == "changed":
        (line,) = [t for t in lines if "No chart" in t]
        assert "the 100% stage has no verdict" in line
        assert not list((tmp_path / "outbox").glob("*.png"))
        return
    assert not [t for t in lines if "No chart" in t]
    png = tmp_path / "outbox" / final["chart"]  # (its look as the verdict names it: evaluate_gate's)
    assert png_title(png.read_bytes()) == "digits v2 vs v1: 50% stage, look 1 of 1, live A/B arms"


def test_runs_shadow_audit_judges_the_copies_against_the_mirror_share_as_the_dag_does(tmp_path, monkeypatch, capsys):
    """rolloutctl run's audit passed no mirror share (the DAG's shadow_consistency passes the
    spec's): behind a mirror that samples on its own (Istio's), a shadow sent none of 200 copies
    at 100% was no warning from the CLI. Its audit is the DAG's now (``rollout_audit``)."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [50, 100], "mirror_percent": 100})

    def look(window):
        """The stage's traffic, written as the pods would: pairs, then 200 primaries whose copies
        never came, then pairs again (the shadow's pods wrote copies past them)."""
        if window.index:
            return StageState("pass", 1, 1, None, "passed")
        t = time.time()
        time.sleep(2.0)  # (every record stamped before the audit's end)
        shadow_log(tmp_path, 50, disagree=0.0, at=t + 0.1)
        shadow_log(tmp_path, 200, disagree=0.0, at=t + 0.3, versions=("1", "4"), roles=("primary",))
        shadow_log(tmp_path, 5, disagree=0.0, at=t + 1.6, versions=("1", "3"))
        return StageState("pass", 1, 1, None, "passed")

    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: look)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path / "log"))
    args.outbox = None
    cli._run(args, spec, RecordingRouter(), None, {}, cli._Lease(None, spec.model), "")
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("shadow audit: ")]
    assert "the shadow received 0 copies of 200 requests behind a mirror of 100%" in line


def test_run_with_a_lock_folder_it_cannot_use_names_it_and_changes_nothing(tmp_path, capsys, models_dir):
    """--lock-dir under a file (or on a disk that refuses it) ended on "error: NotADirectoryError:
    [Errno 20] Not a directory: ...", naming neither the flag nor that nothing changed."""
    (tmp_path / "file").write_text("")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"stages": [50, 100]}))
    (tmp_path / "log").mkdir()
    code, out, err = run(
        capsys,
        *("run", "--spec", str(spec), "--url", "http://127.0.0.1:9", "--no-hard-guards"),
        *("--validation", str(models_dir / "digits" / "validation"), "--prediction-log", str(tmp_path / "log")),
        *("--lock-dir", str(tmp_path / "file" / "locks")),
    )
    assert (code, out) == (4, "")
    assert f"--lock-dir {tmp_path / 'file' / 'locks'}: the model's lock cannot be taken" in err
    assert err.rstrip().endswith("; nothing changed")
    assert "NotADirectoryError" not in err


def test_two_runs_on_one_host_with_one_pid_do_not_both_hold_the_model(tmp_path):
    """rolloutctl's holder was its host name and pid: two containers sharing the host's network
    (so its name), each rolloutctl their pid 1, named one holder, and the second run took the
    lock as the first's own retry. Each run holds it under a name of its own."""
    from vision_rollout import cli

    with cli._Lease(tmp_path, "digits") as first:
        with pytest.raises(cli.CommandError, match="nothing changed: model 'digits' is being rolled out by"):
            cli._Lease(tmp_path, "digits").__enter__()
        assert FileLock("digits", tmp_path).holding().holder == first.holder
    assert FileLock("digits", tmp_path).holding() is None


def test_run_stopped_by_sigterm_while_taking_the_lock_exits_143(tmp_path, capsys, monkeypatch):
    """A SIGTERM that landed before the start checks (taking the model's lock on a slow shared
    disk) exited 130, Ctrl-C's code; a run stopped by a signal exits 128 + its number."""
    from vision_rollout import cli

    def stopped(self):
        raise cli.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli._Lease, "__enter__", stopped)
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    argv = ["run", "--spec", str(spec), "--url", "http://127.0.0.1:9", "--validation", str(tmp_path)]
    argv += ["--prediction-log", str(tmp_path), "--no-hard-guards", "--lock-dir", str(tmp_path / "locks")]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (143, "")
    assert "interrupted" in err


@pytest.mark.parametrize("flag", ["--prediction-log", "--outbox"])
def test_run_refuses_an_object_store_without_its_bucket_before_any_route_changes(
    s3, tmp_path, models_dir, capsys, flag
):
    """A mistyped bucket for the prediction log was an empty log: the first stage waited for
    records, the canary taking its share, until max_stage_seconds; for the outbox every report
    was lost. Both are checked first."""
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    store = s3.uri("x").replace(f"s3://{s3.bucket}/", "s3://no-such-bucket/")
    argv = {"--prediction-log": str(tmp_path), "--outbox": str(tmp_path / "outbox"), flag: store}
    code, out, err = run(
        capsys,
        *("run", "--spec", str(spec), "--url", "http://127.0.0.1:9"),
        *("--validation", str(models_dir / "digits" / "validation")),
        *(a for kv in argv.items() for a in kv),
        "--no-hard-guards",
    )
    assert (code, out) == (4, "")
    assert f"{flag} s3://no-such-bucket/x cannot be read, nothing changed" in err


@pytest.mark.parametrize("where", ["a file", "a file/outbox"])
def test_run_refuses_an_outbox_on_this_disk_that_cannot_be_a_folder(tmp_path, models_dir, capsys, where):
    """--outbox naming a file (or a folder under one) ran the whole rollout, each report lost
    with a warning; it is refused before any route changes (the model server, nothing listening
    on port 9, is never reached)."""
    (tmp_path / "a file").write_text("")
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    code, out, err = run(
        capsys,
        *("run", "--spec", str(spec), "--url", "http://127.0.0.1:9", "--no-hard-guards"),
        *("--validation", str(models_dir / "digits" / "validation"), "--prediction-log", str(tmp_path)),
        *("--outbox", str(tmp_path / where)),
    )
    assert (code, out) == (2, "")
    assert err == f"rolloutctl run: --outbox {tmp_path / where}: {tmp_path / 'a file'} is not a folder\n"


def test_a_run_stopped_while_taking_the_lock_gives_it_back(tmp_path):
    """A signal landing as the lock was taken left it held for its whole lease: the next run was
    refused as a rollout in progress by the run just stopped."""
    from vision_rollout import cli

    class StoppedOnceTaken(FileLock):
        def acquire(self, holder, seconds=300):
            super().acquire(holder, seconds)
            raise cli.Interrupted(signal.SIGTERM)

    lease = cli._Lease(tmp_path, "digits")
    lease.lock = StoppedOnceTaken("digits", tmp_path)
    with pytest.raises(cli.Interrupted):
        lease.__enter__()
    assert FileLock("digits", tmp_path).holding() is None


def test_outbox_list_shows_names_and_texts_from_the_folder_without_their_escapes(tmp_path, capsys):
    """A file's name and a report's text are the folder's, not the tool's: a terminal escape in
    either reached the operator's terminal, and a line break split a report's line in two."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    report = {"channel": "#c", "text": "a\nb\x1b[2Jc", "blocks": []}
    (outbox / "\x1b]0;title\x07x.json").write_text(json.dumps(report))
    code, out, _ = run(capsys, "outbox", "list", "--outbox", str(outbox))
    assert code == 0
    assert "\x1b" not in out
    assert out.splitlines()[0] == "\\x1b]0;title\\x07x.json  #c  a b [2Jc  (no token then)"


def test_outbox_lists_the_waiting_reports_and_sends_them(tmp_path, capsys):
    from tests.fakes.slack_api import FakeSlack
    from vision_rollout.folders import Folder
    from vision_rollout.notify import SlackNotifier, rollback_message
    from vision_rollout.spec import RolloutSpec

    outbox = tmp_path / "outbox"
    for reason in ("first", "second"):
        SlackNotifier("#model-rollouts", outbox=Folder(str(outbox))).send(
            rollback_message(RolloutSpec.from_dict({}), reason)
        )
    code, out, _ = run(capsys, "outbox", "list", "--outbox", str(outbox))
    assert code == 0
    assert out.count("#model-rollouts  Rolled back digits v2: ") == 2
    assert out.endswith(f"2 report(s) waiting in {outbox}\n")
    assert run(capsys, "outbox", "send", "--outbox", str(outbox))[0] == 2  # (no token)
    code, _, err = run(capsys, "outbox", "list", "--outbox", str(tmp_path / "outbx"))
    assert (code, err) == (2, f"rolloutctl outbox: --outbox: no such folder: {str(tmp_path / 'outbx')!r}\n")
    slack = FakeSlack().start()
    try:
        token = tmp_path / "token"
        token.write_text("xoxb-wrong\n")
        args = ("outbox", "send", "--outbox", str(outbox), "--token-file", str(token), "--slack-url", slack.base_url)
        code, out, _ = run(capsys, *args)
        assert (code, out.count("error: SlackApiError"), out.count("invalid_auth")) == (4, 2, 2)
        assert len(list(outbox.glob("*.json"))) == 2  # (kept)
        token.write_text(slack.token + "\n")
        code, out, _ = run(capsys, *args, "--json")
        assert code == 0
        assert [r["sent"] for r in json.loads(out)] == [True, True]
        assert [m["text"] for m in slack.messages()] == [
            "Rolled back digits v2: first",
            "Rolled back digits v2: second",
        ]
        assert not list(outbox.iterdir())
        code, out, _ = run(capsys, *args)
        assert (code, out) == (0, f"0 of 0 report(s) sent from {outbox}\n")
    finally:
        slack.stop()


def test_outbox_send_starts_no_report_past_its_budget_and_names_those_left(tmp_path, capsys, monkeypatch):
    """Slack unreachable: each report waited out its own timeout, a full outbox for as long as
    its reports took together. The round starts none after --budget-s (as the DAGs' sender
    does); those it did not start are named, left waiting, exit 4."""
    import time

    from vision_rollout import notify
    from vision_rollout.folders import Folder
    from vision_rollout.notify import SlackNotifier, rollback_message
    from vision_rollout.spec import RolloutSpec

    outbox = tmp_path / "outbox"
    for reason in ("first", "second", "third", "fourth"):
        SlackNotifier("#model-rollouts", outbox=Folder(str(outbox))).send(
            rollback_message(RolloutSpec.from_dict({}), reason)
        )

    def timed_out(outbox, name, claim, client, *_):
        time.sleep(1.0)
        return {"name": name, "error": "TimeoutError: The read operation timed out"}

    monkeypatch.setattr(notify, "_send_claimed", timed_out)
    token = tmp_path / "token"
    token.write_text("xoxb-1\n")
    args = ("outbox", "send", "--outbox", str(outbox), "--token-file", str(token), "--budget-s", "1.5")
    code, out, _ = run(capsys, *args)
    assert code == 4
    assert out.count("error: TimeoutError") == 2
    assert out.count("left waiting: not started: the round's 1.5 s were spent (send again)") == 2
    assert out.endswith(f"0 of 4 report(s) sent from {outbox}\n")
    assert len(list(outbox.glob("*.json"))) == 4
    assert run(capsys, *args[:-2], "--budget-s", "-1")[0] == 2


# -- rolloutctl status and abort --------------------------------------------------------------


def rolloutctl(argv: list[str], **popen: object) -> object:
    """``rolloutctl`` in a process of its own, as from a terminal."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("", "include", "plugins"))}
    code = (
        "import runpy, sys\nsys.argv[0] = 'rolloutctl'\nrunpy.run_module('vision_rollout.cli', run_name='__main__')\n"
    )
    return subprocess.Popen([sys.executable, "-c", code, *argv], text=True, env=env, **popen)


@pytest.mark.integration
def test_run_rolls_back_a_candidate_served_from_other_bytes_than_it_started_with(
    server_factory, repo_copy, models_dir, tmp_path, capsys
):
    """The DAG checks at each stage, poke and promotion that the model server serves the bytes
    verified; ``run`` did not: version 2's file written over mid-stage and loaded again (another's
    load, a server restart), the looks judged bytes nobody verified, and a promotion carried them
    to 100%. The next look rolls back, naming both digests (exit 1); ``--sha256`` (verify-model's)
    that the server does not serve is refused at the start, nothing changed."""
    import hashlib
    import subprocess

    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), *logging_args(tmp_path), token=TOKEN)
    s.load_versions("digits", 1, 2)
    stable = {"route": [{"version": "1", "weight": 100}]}
    s.api.set_traffic("digits", TrafficPolicy.from_dict(stable))
    v2, v3 = (repo_copy / "digits" / v / "model.onnx" for v in ("2", "3"))
    spec = {"stages": [50, 100], "bake_seconds": 120, "max_stage_seconds": 120}
    served_bytes = v2.read_bytes()
    served = hashlib.sha256(served_bytes).hexdigest()
    argv = run_argv(s, tmp_path, models_dir, spec, "--no-hard-guards", "--outbox", str(tmp_path / "outbox"))
    proc = rolloutctl(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_stable_weight(s, proc, 50)
        v2.write_bytes(v3.read_bytes())
        s.api.load("digits", [1, 2])  # read again
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("ROLLED BACK: stage 50%: version 2 as the model server loaded it (sha256 "), out
    assert f"is not the file verified (sha256 {served[:16]}" in last
    assert "the stage's evidence is not of the file verified" in last
    assert "Traceback" not in err
    assert s.api.traffic("digits").to_dict() == stable
    v2.write_bytes(served_bytes)
    s.api.load("digits", [1, 2])
    other = hashlib.sha256(v3.read_bytes()).hexdigest()
    code, out, err = run(capsys, *argv, "--sha256", other)
    assert (code, out) == (4, ""), err
    assert f"is not the file verified (sha256 {other[:16]})" in err
    assert "nothing changed" in err
    assert s.api.traffic("digits").to_dict() == stable
    code, _, err = run(capsys, *argv, "--sha256", "not-a-digest")
    assert code == 2
    assert "a sha256 is 64 hexadecimal digits" in err


@pytest.mark.integration
def test_status_and_abort_of_a_running_rollout(server_factory, repo_copy, models_dir, tmp_path, capsys):
    """``rolloutctl status`` names the run holding the model, its lease, its last word and the
    routes in effect (exit 3 while it runs, 0 once none does); ``rolloutctl abort`` puts the
    stable version back at once and marks the run's lease, so the ``run`` process rolls back at
    its next look (exit 1, its last line and the outbox say so) and releases the lease itself;
    a second abort while it is still marked is the same abort; once no rollout holds the model,
    abort is refused (exit 4), nothing changed."""
    import subprocess

    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), *logging_args(tmp_path), token=TOKEN)
    s.load_versions("digits", 1, 2)
    s.api.set_traffic("digits", TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    locks, token = tmp_path / "locks", str(tmp_path / "token")
    spec = {"stages": [25, 100], "bake_seconds": 60, "max_stage_seconds": 120, "looks_per_stage": 12}
    argv = run_argv(s, tmp_path, models_dir, spec, "--no-hard-guards", "--outbox", str(tmp_path / "outbox"))
    proc = rolloutctl([*argv, "--lock-dir", str(locks)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    status = ["status", "--model", "digits", "--lock-dir", str(locks), "--url", s.http, "--token-file", token]
    abort = ["abort", "--spec", str(tmp_path / "spec.json"), "--url", s.http, "--lock-dir", str(locks)]
    abort += ["--token-file", token]
    try:
        wait_for_stable_weight(s, proc, 75)
        code, out, _ = run(capsys, *status)
        assert code == 3
        assert out.startswith("model 'digits': held by run 'rolloutctl on ")
        assert "  routes: version 1 75%, version 2 25%; mirror to version 2 at 100%" in out
        code, out, _ = run(capsys, *status, "--json")
        held = json.loads(out)
        assert (code, held["state"], held["holding"]["aborted"]) == (3, "running", "")
        assert 0 < held["holding"]["expires_in_s"] <= 300
        assert held["routes"]["route"] == [{"version": "1", "weight": 75}, {"version": "2", "weight": 25}]
        code, out, err = run(capsys, *abort, "--reason", "dashboards look wrong")
        assert code == 0, err
        assert out.startswith("ABORTED (dashboards look wrong): run 'rolloutctl on ")
        assert out.rstrip().endswith("version 1 takes 100% again")
        assert s.api.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
        assert FileLock("digits", locks).holding().holder == held["holding"]["holder"]  # still the run's
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert out.strip().splitlines()[-1] == ("ROLLED BACK: aborted: dashboards look wrong; version 1 takes 100% again")
    assert "Traceback" not in err
    [report] = (tmp_path / "outbox").glob("*.json")
    assert "rolloutctl run was aborted: dashboards look wrong" in json.loads(report.read_text())["text"]
    assert FileLock("digits", locks).holding() is None  # released by the run, at its end
    assert s.api.traffic("digits").to_dict() == {"route": [{"version": "1", "weight": 100}]}
    code, out, _ = run(capsys, *status)
    assert (code, out.splitlines()[0]) == (0, f"model 'digits': no rollout holds it ({locks / 'digits.lock'})")
    code, out, err = run(capsys, *abort)
    assert (code, out) == (4, "")
    assert "no rollout of 'digits' holds" in err
    assert "nothing changed" in err


def test_status_reads_the_lock_as_the_lease_rules_judge_it(tmp_path, capsys):
    """Exit 3 while a run holds the model, 1 once its lease ran out (its run did not end), 0 when
    none holds it; a lock folder that does not exist is a usage error, not "no rollout" (and
    is not created)."""
    from vision_rollout.locks import CLOCK_SKEW_S, LEASE_S

    locks = tmp_path / "locks"
    code, _, err = run(capsys, "status", "--model", "digits", "--lock-dir", str(locks))
    assert code == 2
    assert "no such folder" in err
    assert not locks.exists()
    locks.mkdir()
    status = ["status", "--model", "digits", "--lock-dir", str(locks)]
    assert run(capsys, *status)[0] == 0
    lock = FileLock("digits", locks, clock=lambda: time.time() - LEASE_S - 10)
    lock.acquire("manual__2026-12-03 (a DAG run)")
    code, out, _ = run(capsys, *status)
    assert code == 3  # past its expiry, within the clocks' margin: not taken for dead yet
    assert "overdue: taken for dead in" in out
    code, out, err = run(capsys, *status, "--url", f"http://127.0.0.1:{free_port()}")  # the server down
    assert code == 4
    assert out.startswith("model 'digits': held by run 'manual__2026-12-03 (a DAG run)'")
    assert out.splitlines()[-1] == "  routes: cannot be read"
    assert err.startswith("rolloutctl status: error: model server at http://127.0.0.1:")
    FileLock("digits", locks).release("manual__2026-12-03 (a DAG run)")
    FileLock("digits", locks, clock=lambda: time.time() - LEASE_S - CLOCK_SKEW_S).acquire("a run that died")
    code, out, _ = run(capsys, *status, "--json")
    assert (code, json.loads(out)["state"], json.loads(out)["routes"]) == (1, "expired", None)
    code, out, _ = run(capsys, *status)
    assert "EXPIRED: its run did not end" in out


class _ServerRoutes:
    """The model server's routes as ``LocalRouter`` reads and writes them, without a server:
    version 1 at 100% until written; ``fail`` makes each write fail as a server answering 503 does."""

    def __init__(self, monkeypatch) -> None:
        from vision_rollout.mesh import LocalRouter, RouterError
        from vision_rollout.serving import ModelServerAdmin

        self.routes = TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]})
        self.fail = False

        def set_routes(router, policy: TrafficPolicy) -> bool:
            if self.fail:
                raise RouterError("model server PUT /v2/models/digits/traffic: HTTP 503: unavailable")
            changed, self.routes = policy != self.routes, policy
            return changed

        monkeypatch.setattr(LocalRouter, "get_routes", lambda router: self.routes)
        monkeypatch.setattr(LocalRouter, "set_routes", set_routes)
        monkeypatch.setattr(ModelServerAdmin, "ready", lambda admin, model, version: True)
        monkeypatch.setattr(ModelServerAdmin, "served_sha256", lambda admin, model, version: "0" * 64)


def test_an_abort_reason_and_a_runs_last_word_reach_the_terminal_as_plain_text(tmp_path, capsys, monkeypatch):
    """An abort's --reason went into the lease as typed, and a run's note (a stage reason quoting
    a server) as it came: ``status`` printed their line breaks and terminal escapes, for whoever
    looked at the rollout next, to run."""
    from vision_rollout.spec import RolloutSpec

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"stages": [50, 100]}))
    routes = _ServerRoutes(monkeypatch)
    routes.routes = RolloutSpec.from_dict({"stages": [50, 100]}).policy_for_stage(50)
    lock = FileLock("digits", tmp_path)
    lock.acquire("a run")
    lock.renew("a run", note="stage 50%: look 1 of 12: HTTP 502: \x1b]0;title\x07waiting\nfor samples")
    argv = ["--lock-dir", str(tmp_path), "--url", "http://127.0.0.1:9"]
    code, out, _ = run(capsys, "abort", "--spec", str(spec_file), *argv, "--reason", "dashboards\x1b[2J look\nwrong")
    assert code == 0
    assert FileLock("digits", tmp_path).holding().aborted == "dashboards [2J look wrong"
    assert out.startswith("ABORTED (dashboards [2J look wrong): run 'a run' rolls back")
    code, out, _ = run(capsys, "status", "--model", "digits", *argv)
    assert code == 3
    assert "  last: stage 50%: look 1 of 12: HTTP 502: ]0;title waiting for samples\n" in out
    assert all(c.isprintable() for line in out.splitlines() for c in line)


def test_an_abort_whose_rollback_fails_says_the_run_was_aborted_all_the_same(tmp_path, capsys, monkeypatch):
    """The mark is set before the routes are written: a write that failed ended in the server's
    error alone, exit 4 read as "nothing changed", while the run had been aborted and would roll
    back at its next look. The error line says both."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"stages": [50, 100]}))
    from vision_rollout.spec import RolloutSpec

    routes = _ServerRoutes(monkeypatch)
    routes.routes = RolloutSpec.from_dict({"stages": [50, 100]}).policy_for_stage(50)
    FileLock("digits", tmp_path).acquire("a run")
    routes.fail = True
    argv = ["abort", "--spec", str(spec_file), "--lock-dir", str(tmp_path), "--url", "http://127.0.0.1:9"]
    code, out, err = run(capsys, *argv, "--reason", "dashboards look wrong")
    assert (code, out) == (4, "")
    assert FileLock("digits", tmp_path).holding().aborted == "dashboards look wrong"
    assert err.startswith(
        "rolloutctl abort: error: aborted (dashboards look wrong): run 'a run' rolls back at its next look "
        "(a DAG run: its next step), but version 1 was not put back: model server PUT /v2/models/digits/traffic: "
        "HTTP 503: unavailable"
    )


def test_an_abort_interrupted_once_marked_says_the_run_rolls_back_all_the_same(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the mark was set, before the routes were written: the line said only
    "interrupted", read as nothing done, while the run had been aborted and would roll back at
    its next look. It says so, and that the stable version is perhaps not back yet."""
    from vision_rollout.mesh import LocalRouter
    from vision_rollout.spec import RolloutSpec

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"stages": [50, 100]}))
    routes = _ServerRoutes(monkeypatch)
    routes.routes = RolloutSpec.from_dict({"stages": [50, 100]}).policy_for_stage(50)
    FileLock("digits", tmp_path).acquire("a run")

    def ctrl_c(router, policy):
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalRouter, "set_routes", ctrl_c)
    argv = ["abort", "--spec", str(spec_file), "--lock-dir", str(tmp_path), "--url", "http://127.0.0.1:9"]
    code, out, err = run(capsys, *argv, "--reason", "dashboards look wrong")
    assert (code, out) == (130, "")
    assert FileLock("digits", tmp_path).holding().aborted == "dashboards look wrong"
    assert err == (
        "rolloutctl abort: interrupted once the abort was marked (dashboards look wrong): run 'a run' rolls back "
        "at its next look (a DAG run: its next step); version 1 perhaps not put back yet (rolloutctl status --url "
        "shows the routes)\n"
    )


def test_mesh_apply_local_is_refused_while_a_rollout_holds_the_model(tmp_path, capsys, monkeypatch):
    """An operator's routes applied while a rollout ran were written over at its next stage,
    silently. Refused while a run holds the model's lock (as kubectl argo rollouts refuses edits
    of a rollout in progress), naming the run; --force applies them, saying so; a lease taken
    for dead (its run gone) does not hold the model."""
    from vision_rollout.locks import CLOCK_SKEW_S, LEASE_S

    routes = _ServerRoutes(monkeypatch)
    before = routes.routes
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]}))
    locks = tmp_path / "locks"
    locks.mkdir()
    FileLock("digits", locks).acquire("manual__2026-12-03 (a DAG run)")
    argv = ["mesh", "apply", "--backend", "local", "--url", "http://127.0.0.1:9", "--model", "digits"]
    argv += ["--policy", str(policy), "--lock-dir", str(locks)]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (4, "")
    assert err.startswith("rolloutctl mesh: error: run 'manual__2026-12-03 (a DAG run)' (its lease runs to ")
    assert f"holds model 'digits' ({locks / 'digits.lock'}): its next stage (or its rollback) writes" in err
    assert err.endswith("abort it first (rolloutctl abort), or give --force; nothing changed\n")
    assert routes.routes == before
    code, out, err = run(capsys, *argv, "--force")
    assert (code, out) == (0, "applied\n")
    assert err.startswith("rolloutctl mesh: warning: --force: run 'manual__2026-12-03 (a DAG run)' ")
    assert routes.routes.to_dict()["route"][1] == {"version": "2", "weight": 10}
    FileLock("digits", locks).release("manual__2026-12-03 (a DAG run)")
    FileLock("digits", locks, clock=lambda: time.time() - LEASE_S - CLOCK_SKEW_S).acquire("a run that died")
    routes.routes = before
    assert run(capsys, *argv)[:2] == (0, "applied\n")
    (locks / "digits.lock").write_bytes(b"\xff")  # whose run holds it is not known
    code, _, err = run(capsys, *argv)
    assert code == 4
    assert err.endswith("remove it if no rollout runs, or give --force; nothing changed\n")
    assert run(capsys, *argv, "--force")[0] == 0


@pytest.fixture
def istio_lease_held(tmp_path, monkeypatch):
    """A fake Kubernetes API server holding the VirtualService ml/digits-vs and its Lease, taken by
    a DAG run: (the server, the kubeconfig, the ``mesh apply --backend istio`` arguments that apply
    version 2 at 10% there); the server stopped at the end."""
    from devstack.cluster.kube import FakeKubeAPI
    from vision_rollout.locks import LeaseLock
    from vision_rollout.mesh import IstioTarget

    target = IstioTarget("ml", "digits", "digits-vs")
    api = FakeKubeAPI().start()
    try:
        istio_objects_of(api, target)
        kube = kubeconfig_of(api, tmp_path, monkeypatch)
        LeaseLock("digits", "ml", kube, key="digits-vs").acquire("manual__2026-12-03 (a DAG run)")
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps({"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]}))
        argv = ["mesh", "apply", "--backend", "istio", "--policy", str(policy), "--versions", "1,2"]
        argv += ["--namespace", "ml", "--service", "digits", "--name", "digits-vs"]
        yield api, kube, argv
    finally:
        api.stop()


@pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)
def test_mesh_apply_istio_is_refused_while_a_rollout_holds_the_lease(capsys, istio_lease_held):
    """``mesh apply --backend istio`` wrote the VirtualService whatever the Lease said: a DAG run
    in kubernetes mode wrote its own routes over the operator's at its next stage, or took the
    operator's for a mesh changed under it and rolled back. Refused as the local backend is
    while a run holds the Lease rollout-<VirtualService>, naming the run; --force applies them,
    saying so; a lease taken for dead does not hold it."""
    from vision_rollout.locks import CLOCK_SKEW_S, LEASE_S, LeaseLock

    api, kube, argv = istio_lease_held
    before = copy.deepcopy(api.objects[("virtualservices", "ml", "digits-vs")])
    code, out, err = run(capsys, *argv)
    assert (code, out) == (4, "")
    assert err.startswith("rolloutctl mesh: error: run 'manual__2026-12-03 (a DAG run)' (its lease runs to ")
    assert "holds model 'digits-vs' (Lease ml/rollout-digits-vs): its next stage (or its rollback) writes" in err
    assert err.endswith("abort it first (rolloutctl abort), or give --force; nothing changed\n")
    assert api.objects[("virtualservices", "ml", "digits-vs")] == before
    code, out, err = run(capsys, *argv, "--force")
    assert (code, out) == (0, "applied\n")
    assert err.startswith("rolloutctl mesh: warning: --force: run 'manual__2026-12-03 (a DAG run)' ")
    api.objects[("virtualservices", "ml", "digits-vs")] = before
    api.objects.pop(("leases", "ml", "rollout-digits-vs"))
    dead = kube
    LeaseLock("digits", "ml", dead, clock=lambda: time.time() - LEASE_S - CLOCK_SKEW_S, key="digits-vs").acquire(
        "a run that died"
    )
    assert run(capsys, *argv)[:2] == (0, "applied\n")


@pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)
@pytest.mark.parametrize("answer", [500, 503])
def test_mesh_apply_istio_whose_lease_read_the_api_server_failed_says_try_again_not_force(
    capsys, monkeypatch, istio_lease_held, answer
):
    """The Lease's GET failed by the API server (500 or 503 each time, the client's retries
    spent) was refused as an unreadable lock, "..., or give --force": an invitation to write over
    what may be a live rollout's routes. It is said to be the API server's transient failure, to
    be tried again; nothing changed."""
    from vision_rollout import mesh

    api, _, argv = istio_lease_held
    before = copy.deepcopy(api.objects[("virtualservices", "ml", "digits-vs")])
    monkeypatch.setattr(mesh, "BACKOFF_S", 0.01)  # (the client's backoff between its retries)
    api.throttle, api.throttle_status = 1 + mesh.api_retries().total, answer
    api.throttled_methods, api.throttled_path = frozenset({"GET"}), "/leases/rollout-digits-vs"
    code, out, err = run(capsys, *argv)
    assert api.throttle == 0
    assert (code, out) == (4, "")
    assert err.startswith(f"rolloutctl mesh: error: GET Lease ml/rollout-digits-vs: {answer} ")
    assert "--force" not in err
    assert err.endswith("the API server failed to read the Lease (a transient failure): try again; nothing changed\n")
    assert api.objects[("virtualservices", "ml", "digits-vs")] == before


def test_a_lock_file_that_is_not_text_is_an_unreadable_lock(tmp_path, capsys):
    """A lock file of bytes that are not UTF-8 (a disk error, another tool's file) was a
    UnicodeDecodeError's traceback out of status, abort and run; it is the unreadable lock that
    any other garbage there is, in one line."""
    (tmp_path / "digits.lock").write_bytes(b"\xff\xfe{")
    code, out, err = run(capsys, "status", "--model", "digits", "--lock-dir", str(tmp_path))
    assert (code, out) == (4, "")
    assert (
        err
        == f"rolloutctl status: error: unreadable lock file {tmp_path / 'digits.lock'} (Expecting value: line 1 column 1 (char 0)); remove it if no rollout runs\n"
    )


@pytest.mark.parametrize("body", [b'{"route": [{"version": "1", "weight": 100}]}', b"{}"])
def test_run_names_a_prometheus_url_that_answers_another_api(tmp_path, capsys, monkeypatch, models_dir, body):
    """--prometheus given the model server's port (or any JSON API's) was refused as
    "Prometheus cannot be read, nothing changed: prometheus: None: None"."""
    from tests.support.hostile import hostile_server

    _ServerRoutes(monkeypatch)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"stages": [50, 100]}))
    with hostile_server(body) as url:
        code, out, err = run(
            capsys,
            *("run", "--spec", str(spec), "--url", "http://127.0.0.1:9", "--prometheus", url),
            *("--validation", str(models_dir / "digits" / "validation"), "--prediction-log", str(tmp_path)),
        )
    assert (code, out) == (4, "")
    assert "Prometheus cannot be read, nothing changed: prometheus: targets: an answer not shaped as" in err
    assert "None" not in err


def test_a_signal_once_the_rollout_ended_says_what_serves(tmp_path, monkeypatch, capsys):
    """A Ctrl-C landing once the candidate was promoted (its report being written to the outbox)
    ended in "interrupted", exit 130, the code of a run whose stable version was put back, and
    nothing said version 2 served. The last line says what serves."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.folders import Folder
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 0})
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda window: StageState("pass", 1, 1, None, "ok"))
    write = Folder.write

    def stopped_at_the_promotion(self, name, data):
        if b"Promoted digits v2" in data:
            raise cli.Interrupted(signal.SIGINT)
        return write(self, name, data)

    monkeypatch.setattr(Folder, "write", stopped_at_the_promotion)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path))
    args.outbox = Folder(str(tmp_path / "outbox"))
    router = RecordingRouter()
    with cli._Lease(tmp_path, spec.model) as lease:
        assert cli._run(args, spec, router, None, {}, lease, "") == 130
    assert router.history[-1] == spec.promoted_policy().to_dict()
    assert capsys.readouterr().out.splitlines()[-1] == (
        "INTERRUPTED by SIGINT: version 2 takes 100%: its promotion was decided"
    )


def _signalled_at_the_final_report(tmp_path, monkeypatch, refused: bool) -> tuple:
    """rolloutctl run (two stages, each passed), a SIGTERM arriving as its final report (the
    promotion) is written to the outbox, that write then done or, ``refused``, failing as on a full
    disk: (the exit code, the router, the spec), once the signal was seen sent."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.folders import Folder
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 0})
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda window: StageState("pass", 1, 1, None, "ok"))
    write = Folder.write
    signalled: list[str] = []

    def signalled_as_written(self, name, data):
        if name.endswith(".json") and b"Promoted digits v2" in data and not signalled:
            written = None if refused else write(self, name, data)
            signalled.append(name)
            os.kill(os.getpid(), signal.SIGTERM)  # (the signal, as the final report is written or refused)
            time.sleep(0.5)
            if refused:
                raise OSError(28, "No space left on device")
            return written
        return write(self, name, data)

    monkeypatch.setattr(Folder, "write", signalled_as_written)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path))
    args.outbox = Folder(str(tmp_path / "outbox"))
    router = RecordingRouter()
    # (a run stopped by a signal earlier in this process leaves SIGTERM ignored: not installed then)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with cli._stopped_by_signals(), cli._Lease(tmp_path, spec.model) as lease:
            try:
                code = cli._run(args, spec, router, None, {}, lease, "")
            except cli.Interrupted as exc:  # (a KeyboardInterrupt: pytest would stop the session)
                pytest.fail(f"{exc!r} went up")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert signalled
    return code, router, spec


def test_a_signal_while_the_runs_final_report_is_written_writes_no_second_report(tmp_path, monkeypatch, capsys):
    """A SIGTERM landing while rolloutctl run's final report (its promotion) was written to the
    outbox raised its Interrupted there, unheld: the report cut short where it was, and the run
    wrote a second, cut-short report of the same promotion. The signal is held until the report
    is written, as a cut-short run's report is: one report, whole; the last line says what
    serves, and that the signal came once the report was written."""
    code, router, spec = _signalled_at_the_final_report(tmp_path, monkeypatch, refused=False)
    assert code == 128 + signal.SIGTERM
    assert router.history[-1] == spec.promoted_policy().to_dict()
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert [r["text"][:18] for r in reports] == ["Promoted digits v2"], [r["text"] for r in reports]
    assert "stopped" not in reports[0]["text"]  # (written once, whole: no report cut short)
    assert capsys.readouterr().out.splitlines()[-1] == (
        "INTERRUPTED by SIGTERM once its report was written: version 2 takes 100%: its promotion was decided"
    )


def test_a_signal_once_the_rollout_ended_without_an_outbox_says_no_report_was_written(tmp_path, monkeypatch, capsys):
    """rolloutctl run without --outbox writes no report; a signal landing once the rollout had
    ended still said "INTERRUPTED by SIGTERM once its report was written", a report no one will
    find. The last line says what serves, and that no report is written without an outbox."""
    import argparse
    import builtins

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 0})
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda window: StageState("pass", 1, 1, None, "ok"))

    def signalled_as_said(*words, **kw):
        if words and str(words[0]).startswith("PROMOTED: "):  # (the signal, as the run's end is said)
            raise cli.Interrupted(signal.SIGTERM)
        builtins.print(*words, **kw)

    monkeypatch.setattr(cli, "print", signalled_as_said, raising=False)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path))
    args.outbox = None
    router = RecordingRouter()
    with cli._Lease(tmp_path, spec.model) as lease:
        assert cli._run(args, spec, router, None, {}, lease, "") == 128 + signal.SIGTERM
    assert router.history[-1] == spec.promoted_policy().to_dict()
    last = capsys.readouterr().out.splitlines()[-1]
    assert "report was written" not in last, last
    assert last == (
        "INTERRUPTED by SIGTERM once it had ended (no --outbox: no report is written): "
        "version 2 takes 100%: its promotion was decided"
    )


def test_a_signal_while_the_runs_final_report_fails_to_be_written_writes_the_cut_short_one(
    tmp_path, monkeypatch, capsys
):
    """rolloutctl run's final report that the outbox refused (a full disk: a warning) was taken
    as written: a SIGTERM meanwhile ended the run saying "once its report was written", with
    nothing in the outbox. The cut-short report is written in its place, as where none was."""
    code, _, _ = _signalled_at_the_final_report(tmp_path, monkeypatch, refused=True)
    assert code == 128 + signal.SIGTERM
    reports = [json.loads(p.read_text())["text"] for p in sorted((tmp_path / "outbox").glob("*.json"))]
    assert len(reports) == 1, reports
    assert "rolloutctl run was stopped by SIGTERM once it had ended" in reports[0], reports
    assert capsys.readouterr().out.splitlines()[-1] == (
        "INTERRUPTED by SIGTERM: version 2 takes 100%: its promotion was decided"
    )


def test_an_abort_that_lands_while_promoting_is_not_reported_as_a_promotion(tmp_path, monkeypatch, capsys):
    """The last stage's look is the run's last renewal: an abort marked while it promoted put the
    stable version back, and the run still said PROMOTED and exited 0 with version 1 serving.
    The run reads its lease once promoted: aborted, it rolls back and says so (exit 1)."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 0})
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda window: StageState("pass", 1, 1, None, "ok"))

    class AbortedWhilePromoting(RecordingRouter):
        def set_routes(self, policy: TrafficPolicy) -> bool:
            changed = super().set_routes(policy)
            if policy == spec.promoted_policy() and self.history.count(policy.to_dict()) == 2:  # (1: the 100% stage)
                FileLock("digits", tmp_path).abort("dashboards look wrong")
                super().set_routes(spec.stable_policy())  # rolloutctl abort's rollback
            return changed

    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path), outbox=None)
    router = AbortedWhilePromoting()
    with cli._Lease(tmp_path, spec.model) as lease:
        assert cli._run(args, spec, router, None, {}, lease, "") == 1
    assert capsys.readouterr().out.splitlines()[-1] == (
        "ROLLED BACK: aborted: dashboards look wrong while promoting; version 1 takes 100% again"
    )
    assert router.history[-1] == spec.stable_policy().to_dict()
    assert FileLock("digits", tmp_path).holding() is None


def test_a_run_whose_lock_was_removed_mid_stage_puts_the_stable_version_back(tmp_path, monkeypatch, capsys):
    """The lock's folder removed mid-stage (a cleanup of the run folder, a tmp cleaner): the
    next renewal found nobody holding the model and the run stopped as if another run had taken
    it over, leaving the candidate its share and the mirror on, with no run left to restore
    them. Nobody else's routes are at stake: the run rolls back (exit 1), saying why."""
    import argparse
    import shutil

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [10, 100], "bake_seconds": 10, "max_stage_seconds": 60})
    locks = tmp_path / "locks"

    def judge(window):
        shutil.rmtree(locks, ignore_errors=True)
        return StageState("waiting", 0, 5, None, "waiting")

    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: judge)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path), outbox=None)
    router = RecordingRouter()
    router.history.append(spec.stable_policy().to_dict())
    with cli._Lease(locks, spec.model) as lease:
        assert cli._run(args, spec, router, None, {}, lease, "") == 1
    assert router.history[-1] == spec.stable_policy().to_dict()
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"ROLLED BACK: aborted: the model's lock {locks / 'digits.lock'} is gone, nobody holds it")
    assert last.endswith("version 1 takes 100% again")


def test_run_records_the_routes_it_found_over_an_earlier_runs_record(tmp_path, monkeypatch):
    """--state-file "also record the routes found before the rollout": the router records them
    once (a retried DAG task keeps the first record), so a second run given the same file left
    the first run's routes there, which a restore from it would put back."""
    import argparse

    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.mesh import LocalRouter
    from vision_rollout.spec import RolloutSpec

    class InMemory(LocalRouter):
        history = [{"route": [{"version": "1", "weight": 100}]}]

        def get_routes(self) -> TrafficPolicy:
            return TrafficPolicy.from_dict(self.history[-1])

        def set_routes(self, policy: TrafficPolicy) -> bool:
            self.history.append(policy.to_dict())
            return True

    spec = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 0})
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda window: StageState("fail", 1, 1, None, "slow"))
    state = tmp_path / "routes.json"
    state.write_text(json.dumps({"route": [{"version": "7", "weight": 100}]}))  # an earlier run's
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path))
    args.outbox, args.state_file = None, state
    router = InMemory("http://127.0.0.1:9", spec.model, None, state)
    assert cli._run(args, spec, router, None, {}, cli._Lease(None, spec.model), "") == 1
    assert json.loads(state.read_text()) == {"route": [{"version": "1", "weight": 100}]}


def test_a_run_aborted_during_its_start_checks_begins_no_stage(tmp_path, monkeypatch, capsys):
    """An abort while the start checks ran (the lease taken, the routes steady) was first seen
    at the first look, once the first stage had given the candidate its share."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 0})
    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: lambda window: StageState("pass", 1, 1, None, "ok"))
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path), outbox=None)
    router = RecordingRouter()
    router.history.append(spec.stable_policy().to_dict())
    with cli._Lease(tmp_path, spec.model) as lease:
        FileLock("digits", tmp_path).abort("wrong candidate")
        assert cli._run(args, spec, router, None, {}, lease, "") == 1
    assert router.history == [spec.stable_policy().to_dict()]
    assert capsys.readouterr().out.splitlines()[-1] == (
        "ROLLED BACK: aborted: wrong candidate; version 1 takes 100% again"
    )


@pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)
def test_status_and_abort_of_a_dag_run_in_kubernetes_mode(tmp_path, capsys, monkeypatch):
    """In kubernetes mode the DAG's lock is the Lease rollout-<VirtualService> in the model's
    namespace: status reads it, abort marks it (its teardown restores the pods and the routes at
    the run's next step), through the kubeconfig; an API server that does not answer is one line."""

    from devstack.cluster.kube import FakeKubeAPI
    from vision_rollout.locks import LeaseLock

    api = FakeKubeAPI().start()
    try:
        kube = kubeconfig_of(api, tmp_path, monkeypatch)
        lease = LeaseLock("digits", "ml", kube, key="digits-vs")
        status = ["status", "--model", "digits", "--namespace", "ml", "--name", "digits-vs"]
        code, out, err = run(capsys, *status)
        assert (code, out.splitlines()[0]) == (0, "model 'digits': no rollout holds it (Lease ml/rollout-digits-vs)")
        lease.acquire("manual__2026-12-03 (a DAG run)")
        code, out, _ = run(capsys, *status)
        assert code == 3
        assert out.startswith(
            "model 'digits': held by run 'manual__2026-12-03 (a DAG run)' (Lease ml/rollout-digits-vs)"
        )
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"mesh": "istio"}))
        abort = ["abort", "--spec", str(spec), "--namespace", "ml", "--name", "digits-vs", "--reason", "bad labels"]
        code, out, err = run(capsys, *abort)
        assert code == 0, err
        assert out.strip() == (
            "ABORTED (bad labels): run 'manual__2026-12-03 (a DAG run)' rolls back at its next step: its teardown "
            "puts version 1 back"
        )
        held = lease.holding()
        assert (held.holder, held.aborted) == ("manual__2026-12-03 (a DAG run)", "bad labels")
        assert "ABORTED: bad labels" in run(capsys, *status)[1]
        assert run(capsys, *abort[:-1], "other")[1].startswith("ABORTED already (bad labels)")
        assert run(capsys, "abort", "--spec", str(spec), "--lock-dir", str(tmp_path))[0] == 2  # mesh istio: a Lease
    finally:
        api.stop()
    code, out, err = run(capsys, *status)
    assert (code, out) == (4, "")
    assert err.startswith("rolloutctl status: error: the Kubernetes API server did not answer")
    assert "Traceback" not in err


@pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)
def test_an_abort_whose_mark_was_lost_with_its_run_gone_says_so(tmp_path, capsys, monkeypatch):
    """Kubernetes mode: the abort's mark served, answered 500; the run saw it, rolled back and
    released, and another run took the model before the read back. The abort marked that other
    run with the first one's reason (``locks.abort``); nor may it say "nothing changed": it says
    the answer was lost, the first run perhaps marked, the other untouched (exit 4)."""
    from devstack.cluster.kube import FakeKubeAPI
    from vision_rollout import mesh
    from vision_rollout.locks import LeaseLock

    api = FakeKubeAPI().start()
    try:
        lease = LeaseLock("digits", "ml", kubeconfig_of(api, tmp_path, monkeypatch), key="digits-vs")
        lease.acquire("run-x")

        def x_rolls_back_and_y_takes_the_model(_: float) -> None:
            lease.release("run-x")
            lease.acquire("run-y")

        monkeypatch.setattr(mesh.time, "sleep", x_rolls_back_and_y_takes_the_model)
        api.throttle, api.throttle_status, api.throttle_served = 1, 500, True
        api.throttled_methods = frozenset({"PUT"})
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"mesh": "istio"}))
        abort = ["abort", "--spec", str(spec), "--namespace", "ml", "--name", "digits-vs", "--reason", "bad labels"]
        code, out, err = run(capsys, *abort)
        assert (code, out) == (4, "")
        assert "the answer to marking run 'run-x' aborted was lost" in err
        assert "run 'run-y' holds it now, not touched" in err
        assert "nothing changed" not in err
        assert (lease.holding().holder, lease.holding().aborted) == ("run-y", "")
    finally:
        api.stop()


def test_restart_stage_keeps_a_reason_printable_and_who_asked(tmp_path, capsys):
    """The reason goes into the stage's report and its Slack message: terminal escapes and
    other control characters are not carried there, and a reason of megabytes is cut before
    who asked (it ended cut with them)."""
    from vision_rollout import attempts
    from vision_rollout.folders import Folder
    from vision_rollout.settings import workdir

    folder = workdir(Folder(str(tmp_path)), "digits", "run-a")
    attempts.applied(folder, "run-a", 0, time.time())
    args = ["restart-stage", "--run-dir", str(tmp_path), "--model", "digits", "--run-id", "run-a", "--stage", "1"]
    code, _, _ = run(capsys, *args, "--reason", "Prometheus\x1b[2J fixed\x07\x00 now\u202e")
    assert code == 0
    reason = attempts.load(folder, "run-a", 0).restart
    assert reason.startswith("Prometheus [2J fixed now (")
    assert reason.isprintable()
    code, _, _ = run(capsys, *args, "--reason", "y" * 3_000_000)
    assert code == 0
    reason = attempts.load(folder, "run-a", 0).restart
    assert len(reason) <= 500
    assert reason.endswith(")")
    assert " on " in reason  # who asked, from where


def test_restart_stage_with_a_mistyped_run_folder_names_the_folder(tmp_path, capsys):
    """A --run-dir that does not exist (a typo, the wrong machine) was read as an empty run
    folder: "stage 1 of run 'run-a' has not started", exit 4, sending whoever asked to look for
    a run that is there. It is a usage error naming the folder, as for prune and outbox."""
    missing = tmp_path / "rnu"
    args = ["restart-stage", "--run-dir", str(missing), "--model", "digits", "--run-id", "run-a", "--stage", "1"]
    code, out, err = run(capsys, *args, "--reason", "fixed")
    assert (code, out) == (2, "")
    assert f"--run-dir: no such folder: {str(missing)!r}" in err
    assert not missing.exists()


def test_prune_lists_then_removes_what_the_run_folder_keeps_that_nobody_reads(tmp_path, capsys):
    """Every model's run folders (a model the hourly audit does not audit too), the approval
    waits' counts killed tasks left, the outbox's leftovers: listed with --dry-run, then removed;
    a run folder changed since its retention, a report waiting, stay."""
    import os

    from vision_rollout import attempts
    from vision_rollout.folders import Folder
    from vision_rollout.notify import Message, SlackNotifier
    from vision_rollout.settings import approvals, workdir

    store = Folder(str(tmp_path / "run"))
    for model, run_id in (("digits", "done"), ("digits", "going"), ("digits", "stalled"), ("mnist", "old")):
        attempts.applied(workdir(store, model, run_id), run_id, 0, time.time())
    # (mesh local: a run that holds the model, stopped for long while not ended, keeps its folder)
    FileLock("digits", tmp_path / "run" / "locks").acquire("stalled", 60)
    approvals(store, "digits").write("0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.json", b'{"count": 3}')
    SlackNotifier("#c", outbox=store / "outbox").send(Message("waiting", []))
    (store / "outbox").write("20260101T000000-000000001-aaaaaa.claim-1767225600000000000-abc123", b"")
    (store / "rollouts").write("not-a-model", b"")
    done = workdir(store, "digits", "done")
    (record,) = done.names()
    done.write(f"{record}.damaged-1767225600", b"{")  # (set aside by restart-stage)
    (tmp_path / "run" / "rollouts" / "digits" / "done" / f".{record}.lock").touch()  # (a write killed under its lock)
    old = time.time() - 40 * 86400
    for p in (tmp_path / "run").rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    attempts.applied(workdir(store, "digits", "going"), "going", 1, time.time())
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    code, out, _ = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--dry-run")
    assert code == 0
    assert out.splitlines() == [
        "run folders: digits/done",
        "run folders: mnist/old",
        "approval counts: digits/0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.json",
        "outbox leftovers: 20260101T000000-000000001-aaaaaa.claim-1767225600000000000-abc123",
        f"would remove 0 audit hour folders, 0 stage caches, 2 run folders, 1 approval counts, 1 outbox leftovers, "
        f"0 conditional-put probes, 0 mirror changes from {tmp_path / 'run'}",
    ]
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before
    code, out, _ = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--model", "digits", "--json")
    assert code == 0
    assert json.loads(out) == {
        "audit hour folders": [],
        "stage caches": [],
        "run folders": ["digits/done"],
        "approval counts": ["digits/0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.json"],
        "outbox leftovers": ["20260101T000000-000000001-aaaaaa.claim-1767225600000000000-abc123"],
        "conditional-put probes": [],
        "mirror changes": [],
    }
    assert (store / "rollouts" / "digits").folders() == ["going", "stalled"]
    assert (store / "rollouts" / "mnist").folders() == ["old"]
    assert len((store / "outbox").names()) == 1  # (the report waiting)
    code, _, err = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--retention-days", "7")
    assert code == 2
    assert "--retention-days: 8 to 3660, not 7" in err
    code, _, err = run(capsys, "prune", "--run-dir", str(tmp_path / "no-such"))
    assert code == 2
    assert "no such folder" in err


def test_prune_lists_then_removes_the_audit_hours_and_stage_caches_past_their_retention(tmp_path, capsys):
    """The hourly audit also removes a model's audit hour folders past the retention and the
    stage caches of stages started days ago; rolloutctl prune removed neither, nor could it
    show them before. Both are listed with --dry-run, nothing removed, then removed; an hour
    within the retention, a live stage's cache and a folder of another name stay."""
    from datetime import UTC, datetime, timedelta

    from vision_rollout import logcache
    from vision_rollout.audit import AUDITED, REPORT, hour_folder
    from vision_rollout.folders import Folder

    store = Folder(str(tmp_path / "run"))
    audits = store / "audits" / "digits"
    now = datetime.now(UTC)
    old, recent = (hour_folder(audits, now - timedelta(days=d)) for d in (40, 1))
    for hour in (old, recent):
        hour.write(REPORT, b"# Shadow audit")
        hour.write(AUDITED, b"{}")
    (audits / "scratch").write("x", b"not an hour")
    stale = f"{int(time.time()) - logcache.MAX_AGE_S - 60}-{0:024x}"
    live = f"{int(time.time()) - 600}-{1:024x}"
    for stage in (stale, live):
        (store / ".logcache" / stage).write(f"{0:032x}.parquet", b"x")
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    code, out, _ = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--dry-run")
    assert code == 0
    assert f"audit hour folders: digits/{old.parts[-1]}" in out.splitlines()
    assert f"stage caches: {stale}" in out.splitlines()
    assert "would remove 1 audit hour folders, 1 stage caches, 0 run folders" in out
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before
    code, out, _ = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--json")
    assert code == 0
    pruned = json.loads(out)
    assert (pruned["audit hour folders"], pruned["stage caches"]) == ([f"digits/{old.parts[-1]}"], [stale])
    assert audits.folders() == sorted([recent.parts[-1], "scratch"])
    assert (store / ".logcache").folders() == [live]


@pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)
def test_prune_in_kubernetes_mode_keeps_the_folder_of_the_run_holding_the_models_lease(tmp_path, capsys, monkeypatch):
    """In kubernetes mode the model's lock is its Lease: rolloutctl prune read only mesh local's
    lock file, so a run stalled past the retention lost its folder while its Lease named it.
    With --namespace (and --name, the VirtualService) the Lease's holder keeps its folder."""
    import os

    from devstack.cluster.kube import FakeKubeAPI
    from vision_rollout import attempts
    from vision_rollout.folders import Folder
    from vision_rollout.locks import LeaseLock
    from vision_rollout.settings import workdir

    store = Folder(str(tmp_path / "run"))
    for run_id in ("done", "stalled"):
        attempts.applied(workdir(store, "digits", run_id), run_id, 0, time.time())
    old = time.time() - 40 * 86400
    for p in (tmp_path / "run").rglob("*"):
        os.utime(p, (old, old))
    api = FakeKubeAPI().start()
    try:
        kube = kubeconfig_of(api, tmp_path, monkeypatch)
        LeaseLock("digits", "ml", kube, key="digits-vs").acquire("stalled")
        prune = ["prune", "--run-dir", str(tmp_path / "run"), "--model", "digits", "--json"]
        code, out, err = run(capsys, *prune, "--namespace", "ml", "--name", "digits-vs")
        assert code == 0, err
        assert json.loads(out)["run folders"] == ["digits/done"]
        assert (store / "rollouts" / "digits").folders() == ["stalled"]
        code, _, err = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--namespace", "ml", "--name", "x")
        assert code == 2
        assert "--name: the VirtualService of one --model" in err
    finally:
        api.stop()


def test_outbox_lists_reports_set_aside_sends_them_again_on_request_and_drops_one(tmp_path, capsys):
    """A report Slack refused for good (a mistyped channel) could not be seen apart, sent again
    once the channel was fixed, or removed, but by hand in the store."""
    from tests.fakes.slack_api import FakeSlack
    from vision_rollout.folders import Folder
    from vision_rollout.notify import REFUSED, SlackNotifier, rollback_message
    from vision_rollout.spec import RolloutSpec

    outbox = tmp_path / "outbox"
    slack = FakeSlack().start()
    try:
        slack.refuse = {"chat.postMessage": "channel_not_found"}
        for reason in ("first", "second"):
            SlackNotifier("#typo", token=slack.token, base_url=slack.base_url, outbox=Folder(str(outbox))).send(
                rollback_message(RolloutSpec.from_dict({}), reason)
            )
        first, second = sorted(p.name for p in (outbox / REFUSED).glob("*.json"))
        code, out, _ = run(capsys, "outbox", "list", "--outbox", str(outbox))
        assert code == 0
        assert out.count("(set aside: Slack refused it: SlackApiError") == 2
        assert out.endswith(f"0 report(s) waiting in {outbox}, 2 set aside ({REFUSED}/)\n")
        token = tmp_path / "token"
        token.write_text(slack.token + "\n")
        args = ("outbox", "send", "--outbox", str(outbox), "--token-file", str(token), "--slack-url", slack.base_url)
        assert run(capsys, *args) == (0, f"0 of 0 report(s) sent from {outbox}\n", "")  # (none tried)
        code, out, _ = run(capsys, *args, "--retry-refused")  # (still refused: set aside again)
        assert code == 4
        assert out.count("set aside again") == 2
        slack.refuse = {}
        code, out, _ = run(capsys, *args, "--retry-refused", first)
        assert (code, out) == (0, f"{first}: sent\n1 of 1 report(s) sent from {outbox}\n")
        code, out, err = run(capsys, "outbox", "drop", "--outbox", str(outbox), "x.json")
        assert code == 2
        assert "x.json: no such report" in err
        code, out, _ = run(capsys, "outbox", "drop", "--outbox", str(outbox), second)
        assert (code, out) == (0, f"dropped {REFUSED}/{second}\n")
        assert not list((outbox / REFUSED).iterdir())
        assert not list(outbox.glob("*.json"))
        assert run(capsys, "outbox", "list", "--outbox", str(outbox), "x.json")[0] == 2  # (a name: drop's)
    finally:
        slack.stop()


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_outbox_drop_of_a_report_whose_chart_is_a_folder_is_refused_naming_it_nothing_removed(
    where, tmp_path, request, capsys
):
    """``<stem>.png`` a folder (a key below it in S3): drop removed the report, then exited 4 on
    IsADirectoryError (on a disk) or 0 (in S3), the folder left behind. Refused, naming it, with
    nothing removed."""
    from vision_rollout.folders import Folder

    uri = request.getfixturevalue("s3").uri() if where == "s3" else str(tmp_path / "outbox")
    outbox = Folder(uri)
    outbox.write("a.json", json.dumps({"channel": "#c", "text": "a"}).encode())
    (outbox / "a.png").write("x", b"not a chart")
    code, out, err = run(capsys, "outbox", "drop", "--outbox", uri, "a.json")
    assert (code, out) == (2, ""), err
    assert "a.png is a folder, not a file" in err
    assert outbox.names() == ["a.json"]
    assert outbox.folders() == ["a.png"]


def test_run_says_on_stdout_when_each_stage_starts_and_how_it_is_going(tmp_path, monkeypatch, capsys):
    """A stage bakes for minutes and run printed nothing on stdout until it ended (without -v): a
    user watching could not tell a working run from a hung one. Each stage's start is a line
    (its weight, bake, longest wait, looks), then a progress line at most once a minute (look k
    of n, requests per arm, the reason); the stage's last line keeps its format."""
    import argparse

    from tests.include.test_engine import RecordingRouter
    from vision_rollout import cli, engine
    from vision_rollout.engine import StageState
    from vision_rollout.spec import RolloutSpec

    spec = RolloutSpec.from_dict(
        {"stages": [10, 100], "mirror_percent": 0, "bake_seconds": 600, "max_stage_seconds": 1200, "looks_per_stage": 3}
    )
    looks: list[int] = []

    def judge(window):
        looks.append(window.index)
        if looks.count(window.index) < 3:
            served = {"baseline": {"live": 40, "replay": 2}, "canary": {"live": 5}}
            return StageState("waiting", 1, 3, None, "waiting for\nsamples", served)
        return StageState("pass", 3, 3, None, "ok")

    monkeypatch.setattr(engine, "StageJudge", lambda *a, **k: judge)
    monkeypatch.setattr(engine, "poke_interval", lambda spec: 0.0)
    args = argparse.Namespace(url="http://127.0.0.1:9", validation=tmp_path, prediction_log=str(tmp_path), outbox=None)
    started = "stage 10%: started: bakes 600 s (at most 1200 s), 3 look(s)"
    progress = "stage 10%: look 1 of 3, requests baseline 42, candidate 5: waiting for samples"
    for every_s, lines in ((60.0, [started]), (0.0, [started, progress, progress])):
        looks.clear()
        monkeypatch.setattr(cli, "_PROGRESS_EVERY_S", every_s, raising=False)
        with cli._Lease(tmp_path, spec.model) as lease:
            assert cli._run(args, spec, RecordingRouter(), None, {}, lease, "") == 0
        out = capsys.readouterr().out.splitlines()
        assert out[: len(lines)] == lines  # (looks a moment apart: a minute has not passed)
        assert out[len(lines)].startswith("stage 10%: pass after 3 look(s), ")
        assert out[len(lines) + 1] == "stage 100%: started: bakes 600 s (at most 1200 s), 3 look(s)"
        assert out[-1].startswith("PROMOTED: every stage passed")


@pytest.mark.parametrize("down", ["connection refused", "503", "rate limited"])
def test_outbox_send_retry_refused_while_slack_is_down_leaves_them_set_aside(tmp_path, capsys, down):
    """`outbox send --retry-refused` with Slack unreachable (or answering 503, or rate limiting)
    moved the reports set aside into the outbox, failed to send them, and left them there: listed
    as waiting with their old refusal, sent (and refused again, failing that run) by the next
    hourly audit's round. They now stay set aside in refused/ as they were, each line says so and
    why, and the exit is 4; once Slack answers, the same command sends them."""
    from tests.fakes.slack_api import FakeSlack
    from vision_rollout.folders import Folder
    from vision_rollout.notify import REFUSED, SlackNotifier, rollback_message
    from vision_rollout.spec import RolloutSpec

    outbox = tmp_path / "outbox"
    slack = FakeSlack().start()
    try:
        slack.refuse = {"chat.postMessage": "channel_not_found"}
        for reason in ("first", "second"):
            SlackNotifier("#typo", token=slack.token, base_url=slack.base_url, outbox=Folder(str(outbox))).send(
                rollback_message(RolloutSpec.from_dict({}), reason, chart=b"\x89PNG")
            )
        slack.refuse = {}
        aside = sorted(p.name for p in (outbox / REFUSED).iterdir())
        records = {p.name: p.read_bytes() for p in (outbox / REFUSED).iterdir()}

        def unsure(record: bytes) -> bytes:  # (a 503 may come after Slack took the post: noted)
            return (
                record
                if not record.startswith(b"{")
                else json.dumps({k: v for k, v in json.loads(record).items() if k != "maybe_posted"}, indent=2).encode()
            )

        token = tmp_path / "token"
        token.write_text(slack.token + "\n")
        url = slack.base_url
        if down == "connection refused":
            slack.stop()
            url = f"http://127.0.0.1:{free_port()}/api/"
        elif down == "503":
            slack.outage = 503
        else:
            slack.rate_limited, slack.retry_after = 100, 120
        args = ("outbox", "send", "--outbox", str(outbox), "--token-file", str(token), "--slack-url", url)
        code, out, _ = run(capsys, *args, "--retry-refused")
        assert code == 4
        lines = out.splitlines()
        assert len(lines) == 3
        for line in lines[:2]:
            assert f": left set aside in {REFUSED}/ (send --retry-refused again): " in line
        assert lines[2] == f"0 of 2 report(s) sent from {outbox}"
        # (as they were; a note's guard file beside them, hidden: ``write_if``'s, pruned once they go)
        kept = [p for p in (outbox / REFUSED).iterdir() if not p.name.startswith(".")]
        assert sorted(p.name for p in kept) == aside
        assert {p.name: unsure(p.read_bytes()) for p in kept} == records
        assert not list(outbox.glob("*.json"))
        code, out, _ = run(capsys, "outbox", "list", "--outbox", str(outbox))
        assert out.count("(set aside: Slack refused it: SlackApiError") == 2
        if down == "connection refused":
            return
        slack.outage, slack.rate_limited = None, 0
        code, out, _ = run(capsys, *args, "--retry-refused")
        assert (code, out.splitlines()[-1]) == (0, f"2 of 2 report(s) sent from {outbox}")
        assert not [p for p in (outbox / REFUSED).iterdir() if not p.name.startswith(".")]
        assert len(slack.messages()) == 2
    finally:
        slack.stop()


@pytest.mark.parametrize("action", [["list"], ["drop", "a.json"]])
def test_outbox_takes_its_folder_before_the_action_too(tmp_path, capsys, action):
    """``outbox --outbox DIR list`` (the option before the action, as before the actions became
    subcommands) was refused: "invalid choice: DIR". It is taken there as after the action; the
    folder given nowhere is still a usage error naming --outbox."""
    from vision_rollout.notify import REFUSED

    outbox = tmp_path / "outbox"
    (outbox / REFUSED).mkdir(parents=True)
    (outbox / REFUSED / "a.json").write_text(json.dumps({"channel": "#c", "text": "a", "blocks": []}))
    code, out, err = run(capsys, "outbox", "--outbox", str(outbox), *action)
    assert code == 0, err
    assert ("0 report(s) waiting" if action == ["list"] else f"dropped {REFUSED}/a.json") in out
    code, out, err = run(capsys, "outbox", *action)
    assert code == 2
    assert err.strip().splitlines()[-1].endswith("the following arguments are required: --outbox")
    code, out, err = run(capsys, "outbox", "list", "--json")
    assert (code, json.loads(out)) == (2, {"error": "the following arguments are required: --outbox", "exit": 2})


def test_outbox_send_that_leaves_reports_unsent_answers_one_json_error_object(tmp_path, capsys):
    """``outbox send --json`` whose reports Slack did not take exited 4 printing the bare list of
    results, where every other command's error under --json is one object with ``error`` and
    ``exit``: a script reading ``.error`` got nothing. It is that object, the results in it, and
    the error's line on stderr."""
    from tests.fakes.slack_api import FakeSlack
    from vision_rollout.folders import Folder
    from vision_rollout.notify import SlackNotifier, rollback_message
    from vision_rollout.spec import RolloutSpec

    outbox = tmp_path / "outbox"
    for reason in ("first", "second"):
        SlackNotifier("#model-rollouts", outbox=Folder(str(outbox))).send(
            rollback_message(RolloutSpec.from_dict({}), reason)
        )
    slack = FakeSlack().start()
    try:
        token = tmp_path / "token"
        token.write_text("xoxb-wrong\n")
        args = ("outbox", "send", "--outbox", str(outbox), "--token-file", str(token), "--slack-url", slack.base_url)
        code, out, err = run(capsys, *args, "--json")
    finally:
        slack.stop()
    answer = json.loads(out)
    assert code == 4
    assert (answer["exit"], answer["error"]) == (4, "2 of 2 report(s) not sent: 2 wait in the outbox")
    assert [("invalid_auth" in r["error"]) for r in answer["results"]] == [True, True]
    assert err == f"rolloutctl outbox: error: {answer['error']}\n"
    assert len(list(outbox.glob("*.json"))) == 2


@pytest.mark.usefixtures("short_api_pauses")  # (the client's retries counted, not timed)
def test_mesh_apply_istio_records_each_mirror_change_where_the_audit_reads_it(tmp_path, capsys, monkeypatch):
    """In kubernetes mode the hourly audit judges each primary's copies at the mirror share
    recorded in the run folder (mirrors/<model>/): a mirror set by ``mesh apply --backend istio``
    was not recorded, so the audit judged the copies against the share before it (no mirror:
    every copy taken for a stray; a lowered one: copies counted lost). It is now recorded as the
    DAG's router records it; a mirror change without --run-dir is refused, nothing changed."""
    from devstack.cluster.kube import FakeKubeAPI
    from vision_rollout.folders import Folder
    from vision_rollout.mesh import IstioTarget
    from vision_rollout.mirrors import mirror_log

    target = IstioTarget("ml", "digits", "digits")
    api = FakeKubeAPI().start()
    try:
        istio_objects_of(api, target)
        kubeconfig_of(api, tmp_path, monkeypatch)
        mirrored = tmp_path / "mirrored.json"
        mirrored.write_text(
            json.dumps({"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 10}})
        )
        plain = tmp_path / "plain.json"
        plain.write_text(json.dumps({"route": [{"version": "1", "weight": 100}]}))
        argv = ["mesh", "apply", "--backend", "istio", "--versions", "1,2", "--namespace", "ml"]
        argv += ["--service", "digits", "--name", "digits"]
        before = copy.deepcopy(api.objects[("virtualservices", "ml", "digits")])
        code, out, err = run(capsys, *argv, "--policy", str(mirrored))
        assert (code, out) == (2, "")
        assert "the policy changes the mirror (none, now 10% to version 2)" in err
        assert "--run-dir" in err
        assert api.objects[("virtualservices", "ml", "digits")] == before
        runs = tmp_path / "run"
        runs.mkdir()
        assert run(capsys, *argv, "--policy", str(mirrored), "--run-dir", str(runs))[:2] == (0, "applied\n")
        mirrors = mirror_log(Folder(str(runs)), "digits")
        last = mirrors.last()
        assert last is not None
        assert (last.version, last.percent) == ("2", 10.0)
        assert run(capsys, *argv, "--policy", str(plain), "--run-dir", str(runs), "--model", "digits")[:2] == (
            0,
            "applied\n",
        )
        last = mirrors.last()
        assert last is not None
        assert (last.version, last.percent) == (None, 0.0)
        assert len(mirrors.folder.names()) == 2
        assert run(capsys, *argv, "--policy", str(plain))[:2] == (0, "unchanged: already in effect\n")  # no change
        del api.objects[("virtualservices", "ml", "digits")]  # (no mirror to tell: the apply says why it fails)
        code, out, err = run(capsys, *argv, "--policy", str(plain))
        assert (code, out) == (4, "")
        assert "VirtualService ml/digits does not exist" in err
    finally:
        api.stop()


def test_prune_lists_then_removes_the_mirror_changes_but_the_one_in_force(tmp_path, capsys):
    """The hourly audit prunes a model's mirror changes past the retention; rolloutctl prune
    never did, so a run folder the DAG's audit does not prune (a model no longer audited, an
    audit turned off) kept every record. Listed with --dry-run, then removed, bounded by
    --limit, the change in force at the retention's start kept."""
    from vision_rollout.folders import Folder
    from vision_rollout.mirrors import MirrorLog

    store = Folder(str(tmp_path / "run"))
    t = time.time() - 60 * 86400
    clock = iter([t, t + 10, t + 20, time.time() - 60])
    mirrors = MirrorLog(store / "mirrors" / "digits", "digits", clock=lambda: next(clock))
    for percent in (5, 10, 0, 20):
        mirrors.record("2", percent)
    names = sorted(mirrors.folder.names())
    code, out, _ = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--dry-run")
    assert code == 0
    assert f"mirror changes: digits/{names[0]}" in out.splitlines()
    assert "2 mirror changes" in out
    assert sorted(mirrors.folder.names()) == names
    code, out, _ = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--json", "--limit", "1")
    assert json.loads(out)["mirror changes"] == [f"digits/{names[0]}"]
    code, out, _ = run(capsys, "prune", "--run-dir", str(tmp_path / "run"), "--json")
    assert json.loads(out)["mirror changes"] == [f"digits/{names[1]}"]
    assert sorted(mirrors.folder.names()) == names[2:]  # (0% was in force at the retention's start)


def test_a_signal_is_held_only_by_the_main_threads_writing(tmp_path):
    """A worker thread within ``_signals_held`` (a report written from a thread) while a SIGTERM
    came: the main thread's handler held it for that thread (one global depth), the main thread
    not stopped, and the worker raised the Interrupted once it left. Only the main thread holds
    signals (where ``_stopped_by_signals`` installs them): the main thread is interrupted, the
    worker left alone."""
    import threading

    from vision_rollout import cli

    inside, done = threading.Event(), threading.Event()
    raised: list[BaseException] = []

    def worker():
        try:
            with cli._signals_held():
                inside.set()
                done.wait(10)
        except BaseException as exc:  # (Interrupted: its thread's end)
            raised.append(exc)

    thread = threading.Thread(target=worker)
    # (a run stopped by a signal earlier in this process leaves it ignored, as its end does: a
    # signal ignored is not installed, so this test's SIGTERM would be ignored too)
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with cli._stopped_by_signals():
            thread.start()
            assert inside.wait(10)
            try:
                with pytest.raises(cli.Interrupted):
                    signal.raise_signal(signal.SIGTERM)  # (its handler run before it returns)
            finally:
                done.set()
                thread.join(10)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert raised == []
