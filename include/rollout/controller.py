"""A rollout from start to verdict: stages, gate looks, promote or roll back.

The Airflow DAG runs these pieces as its tasks (apply weights, wait, judge, decide); the
``Rollout`` loop runs them in one process for ``rolloutctl run`` and the benchmarks. Every
path out of a failed or interrupted rollout puts the stable version back at 100%.

Evidence per look: a paired validation replay through both versions over the serving path
(latency, errors and top-1 correctness on the same images), plus the hard guards read from
Prometheus (canary P99 over the breach window, the shadow error rate).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from include.rollout.gates import GateConfig, GuardInputs, Verdict, evaluate_gate, guard_checks
from include.rollout.mesh import Router
from include.rollout.metrics import MetricsError, MetricsSource, PrometheusSource, PromQL
from include.rollout.replay import accuracy_drop, replay
from include.rollout.spec import RolloutSpec
from model_server.traffic import TrafficPolicy

log = logging.getLogger(__name__)


def gate_config(spec: RolloutSpec, **overrides: Any) -> GateConfig:
    return GateConfig.from_any({
        "alpha": spec.alpha, "latency_margin": spec.latency_margin, "error_margin": spec.error_margin,
        "accuracy_margin": spec.accuracy_margin, "min_samples": spec.min_samples, "spending": spec.spending,
        "p99_ms_max": spec.p99_ms_max, "p99_breach_seconds": float(spec.p99_breach_seconds),
        "accuracy_drop_max": spec.accuracy_drop_max, "shadow_error_rate_max": spec.shadow_error_rate_max,
        **overrides,
    })  # fmt: skip


def guard_inputs(
    source: MetricsSource | None,
    spec: RolloutSpec,
    samples: pd.DataFrame | None = None,
    now: float | None = None,
) -> GuardInputs:
    """The hard guards' inputs; a source without data leaves that guard out (hold, not pass)."""
    drop = accuracy_drop(samples) if samples is not None and "pair_id" in samples else None
    if not isinstance(source, PrometheusSource):
        return GuardInputs(validation_drop=drop)
    now = now or time.time()
    series = None
    try:
        window = max(spec.p99_breach_seconds, 10)
        points = source.query_range(PromQL.latency_quantile_ms(spec.model, spec.candidate_version, 0.99, "30s"),
                                    now - window - 5, now, step_s=max(1.0, window / 60))  # fmt: skip
        series = tuple(points)
    except MetricsError as exc:
        log.info("no canary P99 series yet: %s", exc)
    errors = requests = None
    sel = f'model="{spec.model}",version="{spec.candidate_version}"'
    try:
        requests = int(
            source.query(f'sum(increase(shadow_requests_total{{{sel},outcome=~"ok|error"}}[10m]))')
        )
        errors = int(
            source.query(f'sum(increase(shadow_requests_total{{{sel},outcome="error"}}[10m])) or vector(0)')
        )
    except MetricsError as exc:
        log.info("no shadow counts yet: %s", exc)
    return GuardInputs(
        p99_series_ms=series, validation_drop=drop, shadow_errors=errors, shadow_requests=requests
    )


@dataclass
class BakeStatus:
    """Where a stage stands while it bakes, read from Prometheus: what the wait step polls."""

    elapsed_s: float
    served: dict[str, int | None]  # live requests per arm with weight since the stage started
    needed: int  # min_samples per arm
    gpu: dict[str, float]  # max over GPUs: utilization, memory used/total bytes (empty without GPUs)
    failed_guards: list[str]  # sentences of the hard guards that tripped

    def state(self, spec: RolloutSpec, not_before: float = 0.0) -> str:
        """breach (a guard tripped), ready (baked, enough samples, not before ``not_before``
        seconds into the stage), timeout (past max_stage_seconds) or waiting."""
        if self.failed_guards:
            return "breach"
        enough = all(n is not None and n >= self.needed for n in self.served.values())
        if enough and self.elapsed_s >= max(spec.bake_seconds, not_before):
            return "ready"
        return "timeout" if self.elapsed_s >= spec.max_stage_seconds else "waiting"

    def to_dict(self) -> dict[str, Any]:
        return {"elapsed_s": round(self.elapsed_s, 1), "served": self.served, "needed": self.needed,
                "gpu": self.gpu, "failed_guards": self.failed_guards}  # fmt: skip

    def describe(self) -> str:
        served = ", ".join(f"v{v}: {'no data' if n is None else n}" for v, n in self.served.items())
        gpu = "".join(f", GPU {k} {v:g}" for k, v in self.gpu.items())
        return f"{self.elapsed_s:.0f} s in; requests served {served} (need {self.needed} each){gpu}"


def bake_status(source: PrometheusSource, spec: RolloutSpec, weight: int, started: float,
                now: float | None = None) -> BakeStatus:  # fmt: skip
    """Hard guards, live requests per arm since ``started`` and the GPU gauges, at ``now``."""
    now = now or time.time()
    elapsed = max(0.0, now - started)
    window = f"{max(1, math.ceil(elapsed))}s"
    arms = {spec.baseline_version: 100 - weight, spec.candidate_version: weight}
    served: dict[str, int | None] = {}
    for version, share in arms.items():
        if share <= 0:
            continue  # an arm with no live share is judged on the paired replay alone
        try:
            served[version] = int(source.query(PromQL.requests(spec.model, version, window), at=now))
        except MetricsError:
            served[version] = None
    gpu = {}
    for name, promql in (("utilization", PromQL.gpu_utilization()),
                         ("memory_used_bytes", PromQL.gpu_memory_used_bytes()),
                         ("memory_total_bytes", "max(nv_gpu_memory_total_bytes)")):  # fmt: skip
        try:
            gpu[name] = source.query(promql, at=now)
        except MetricsError:
            pass  # no GPU on this server: the gauges are absent, not zero
    failed = [c.sentence for c in guard_checks(guard_inputs(source, spec, now=now), gate_config(spec))
              if c.decision == "fail"]  # fmt: skip
    return BakeStatus(elapsed, served, spec.min_samples, gpu, failed)


@dataclass
class Judge:
    """Accumulates paired replay samples over a stage's looks and judges them."""

    spec: RolloutSpec
    server_address: str  # host:port of the serving path
    validation: Path
    source: MetricsSource | None = None
    images_per_look: int | None = None  # None: the whole validation set each look
    samples: list[pd.DataFrame] = field(default_factory=list)

    def __call__(self, look: int, looks: int) -> Verdict:
        arms = {"baseline": self.spec.baseline_version, "canary": self.spec.candidate_version}
        batch = replay(self.server_address, self.spec.model, arms, self.validation, self.images_per_look)
        batch["pair_id"] = batch["pair_id"].astype(str) + f"@{look}"
        self.samples.append(batch)
        df = pd.concat(self.samples, ignore_index=True)
        return evaluate_gate(
            df, gate_config(self.spec), look, looks, guards=guard_inputs(self.source, self.spec, df)
        )


@dataclass
class StageOutcome:
    weight: int
    decision: str  # pass | fail
    reason: str
    looks: int
    seconds: float
    verdict: Verdict | None = None


@dataclass
class RolloutResult:
    promoted: bool
    stages: list[StageOutcome]
    reason: str


class Rollout:
    def __init__(
        self,
        spec: RolloutSpec,
        router: Router,
        judge: Callable[[int, int], Verdict],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_stage: Callable[[StageOutcome], None] | None = None,
    ):
        self.spec, self.router, self.judge = spec, router, judge
        self.clock, self.sleep, self.on_stage = clock, sleep, on_stage

    def promote(self) -> None:
        """100% candidate, mirror off."""
        self.router.set_routes(TrafficPolicy.from_dict({"route": [{"version": self.spec.candidate_version,
                                                                     "weight": 100}]}))  # fmt: skip

    def restore_stable(self) -> None:
        self.router.set_routes(self.spec.stable_policy())

    def stage(self, index: int, weight: int) -> StageOutcome:
        spec = self.spec
        self.router.set_routes(spec.policy_for_stage(weight))
        start = self.clock()
        interval = spec.bake_seconds / spec.looks_per_stage
        verdict = None
        for look in range(1, spec.looks_per_stage + 1):
            self.sleep(interval)
            verdict = self.judge(index * spec.looks_per_stage + look, spec.total_looks)
            elapsed = self.clock() - start
            if verdict.decision == "fail":
                return StageOutcome(weight, "fail", verdict.summary, look, elapsed, verdict)
            if verdict.decision == "pass" and elapsed >= spec.bake_seconds:
                return StageOutcome(weight, "pass", verdict.summary, look, elapsed, verdict)
            if elapsed >= spec.max_stage_seconds:
                break
        elapsed = self.clock() - start
        reason = (f"undecided after {elapsed:.0f} s and {spec.looks_per_stage} looks: "
                  + (verdict.summary if verdict else "no verdict"))  # fmt: skip
        return StageOutcome(weight, "fail", reason, spec.looks_per_stage, elapsed, verdict)

    def run(self) -> RolloutResult:
        outcomes: list[StageOutcome] = []
        self.router.reconcile()
        try:
            for index, weight in enumerate(self.spec.stages):
                outcome = self.stage(index, weight)
                outcomes.append(outcome)
                if self.on_stage is not None:
                    self.on_stage(outcome)
                if outcome.decision != "pass":
                    self.restore_stable()
                    return RolloutResult(False, outcomes, f"stage {weight}%: {outcome.reason}")
            self.promote()
            return RolloutResult(True, outcomes, "every stage passed")
        except BaseException:
            log.exception("rollout interrupted: restoring the stable version")
            self.restore_stable()
            raise
