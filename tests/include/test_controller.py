"""The rollout loop: stages in order, promote on passes, stable restored on any way out."""

from __future__ import annotations

import json

import pytest

from include.rollout.controller import Judge, Rollout
from include.rollout.gates import Verdict
from include.rollout.mesh import make_router
from include.rollout.spec import RolloutSpec
from model_server.traffic import TrafficPolicy
from tests.model_server.test_routing import TOKEN


class RecordingRouter:
    def __init__(self) -> None:
        self.history: list[dict] = []
        self.reconciled = False

    def reconcile(self) -> None:
        self.reconciled = True

    def set_routes(self, policy: TrafficPolicy) -> bool:
        self.history.append(policy.to_dict())
        return True

    def get_routes(self) -> TrafficPolicy:
        return TrafficPolicy.from_dict(self.history[-1])

    def finalize(self) -> None:
        pass


def verdict(decision: str) -> Verdict:
    return Verdict(decision, (), 1, 1, 0.05, 0.05, "obrien-fleming", summary=f"{decision.upper()} (test)")


def make(decisions: list[str], **spec) -> tuple[Rollout, RecordingRouter, list[tuple[int, int]]]:
    router = RecordingRouter()
    looks: list[tuple[int, int]] = []
    answers = iter(decisions)

    def judge(look: int, total: int) -> Verdict:
        looks.append((look, total))
        return verdict(next(answers))

    clock = iter(range(10_000))
    s = RolloutSpec.from_dict({"bake_seconds": 2, "max_stage_seconds": 10, "looks_per_stage": 3, **spec})
    return Rollout(s, router, judge, clock=lambda: float(next(clock)), sleep=lambda _: None), router, looks


def test_every_stage_passes_then_promotion():
    rollout, router, looks = make(["pass"] * 20, stages=[10, 100])
    result = rollout.run()
    assert result.promoted
    assert router.reconciled
    assert [s.weight for s in result.stages] == [10, 100]
    assert router.history[0]["route"] == [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]
    assert router.history[-1] == {"route": [{"version": "2", "weight": 100}]}
    assert looks[0] == (1, 6)
    assert looks[-1][0] > 3  # the second stage continues the look count


def test_a_failing_stage_restores_stable():
    rollout, router, _ = make(["pass", "pass", "fail"], stages=[5, 50, 100])
    result = rollout.run()
    assert not result.promoted
    assert [s.decision for s in result.stages] == ["pass", "fail"]
    assert result.reason.startswith("stage 50%")
    assert router.history[-1] == {"route": [{"version": "1", "weight": 100}]}


def test_an_undecided_stage_fails_when_its_looks_run_out():
    rollout, router, _ = make(["wait"] * 10, stages=[5, 100])
    result = rollout.run()
    assert not result.promoted
    assert "undecided" in result.stages[0].reason
    assert router.history[-1] == {"route": [{"version": "1", "weight": 100}]}


def test_an_interrupted_rollout_restores_stable():
    rollout, router, _ = make([], stages=[5, 100])  # the judge raises StopIteration at once
    with pytest.raises(StopIteration):
        rollout.run()
    assert router.history[-1] == {"route": [{"version": "1", "weight": 100}]}


@pytest.mark.integration
@pytest.mark.parametrize(("candidate", "promoted"), [("2", True), ("3", False)])
def test_end_to_end_on_the_model_server(server_factory, repo_copy, models_dir, tmp_path, candidate, promoted):
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    s.load_versions("digits", 1, int(candidate))
    spec = RolloutSpec.from_dict({"candidate_version": candidate, "stages": [50, 100], "bake_seconds": 0,
                                  "max_stage_seconds": 60, "looks_per_stage": 2, "min_samples": 100,
                                  "latency_margin": 0.5, "error_margin": 0.05, "accuracy_margin": 0.02})  # fmt: skip
    router = make_router(
        "local", url=s.http, model="digits", token=TOKEN, state_file=tmp_path / "original.json"
    )
    judge = Judge(spec, s.url, models_dir / "digits" / "validation")
    result = Rollout(spec, router, judge).run()
    assert result.promoted is promoted
    final = router.get_routes().to_dict()
    if promoted:
        assert final == {"route": [{"version": "2", "weight": 100}]}
    else:
        assert final == {"route": [{"version": "1", "weight": 100}]}
        failed = {c.name for c in result.stages[-1].verdict.failed}
        assert "accuracy_paired" in failed or "guard_accuracy_drop" in failed


@pytest.mark.integration
def test_rolloutctl_run_rolls_back_version_3(server_factory, repo_copy, models_dir, tmp_path, capsys):
    from include.rollout.cli import main

    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    s.load_versions("digits", 1, 3)
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "candidate_version": "3",
                "stages": [25, 100],
                "bake_seconds": 0,
                "looks_per_stage": 2,
                "min_samples": 100,
            }
        )
    )
    token = tmp_path / "token"
    token.write_text(TOKEN)
    code = main(["run", "--spec", str(spec), "--url", s.http, "--validation", str(models_dir / "digits" / "validation"),
                 "--token-file", str(token), "--state-file", str(tmp_path / "orig.json"),
                 "--outbox", str(tmp_path / "outbox")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "ROLLED BACK: stage 25%" in out
    reports = sorted((tmp_path / "outbox").glob("*.json"))
    assert json.loads(reports[-1].read_text())["text"].startswith("Rolled back digits v3")
    routes = make_router("local", url=s.http, model="digits", token=TOKEN).get_routes()
    assert routes.to_dict() == {"route": [{"version": "1", "weight": 100}]}
