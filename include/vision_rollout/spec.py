"""RolloutSpec: what one rollout does, typed and validated, exportable as JSON schema.

The Airflow trigger form, the ``rolloutctl`` CLI and the tests build it from a dict; every
threshold is a field with its default, declared here only: the gate's and the audit's
configurations take their defaults from ``DEFAULTS`` and are built from a spec by
``GateConfig.from_spec`` and ``AuditConfig.from_spec``. ``TrafficPolicy`` is the model
server's (``model_server.traffic``): one type for who gets which version, on both backends.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from model_server.config import INT64_MAX
from model_server.traffic import (
    MIN_MIRROR_PERCENT,
    Destination,
    Mirror,
    PolicyError,
    TrafficPolicy,
    mirror_percent_problem,
)

__all__ = [
    "DEFAULTS",
    "MAX_LOOKS",
    "MAX_STAGES",
    "Destination",
    "Mirror",
    "PolicyError",
    "RolloutSpec",
    "SpecError",
    "TrafficPolicy",
    "non_finite",
]


# The most looks a stage may plan: their group-sequential boundaries take about 0.4 s to compute
# (``gates.boundaries``, grid x grid per look), once per poke, and far more looks add little power.
MAX_LOOKS = 12
# Every number has a range, generous for real rollouts and refusing a typo that would hold traffic
# on a candidate for weeks (bake_seconds 3000000) or switch a guard off (p99_ms_max 1e300).
MAX_STAGES = 10  # canary weights of a rollout (the DAG runs at most its own MAX_STAGES of them)
MAX_STAGE_SECONDS = 86_400  # a stage bakes and decides within a day
MAX_SAMPLES = 1_000_000  # requests per arm before a stage can pass
MIN_ALPHA = 1e-6  # below it the alpha spending boundaries are infinite or lose precision
MAX_P99_MS = 60_000  # a P99 limit of a minute
MAX_BREACH_SECONDS = 3_600  # a P99 breach lasting an hour


VERSION_PATTERN = r"^[1-9][0-9]*$"  # (and at most INT64_MAX: ``RolloutSpec`` checks)


class SpecError(ValueError):
    """An invalid rollout spec; the message names the field."""


def non_finite(raw: dict[str, Any]) -> str | None:
    """The first key whose value is a number that is not finite (NaN, Infinity), or None.

    Python's JSON reader (a spec file, ``--set``, a trigger's conf) takes ``NaN`` and ``Infinity``,
    and JSON schema's bounds do not catch them: every comparison with NaN is false, so
    ``p99_ms_max: NaN`` passed ``exclusiveMinimum: 0`` and then no P99 was ever "above the
    limit" (the guard silently off), as no drop was above ``accuracy_drop_max: NaN``."""
    for key, value in raw.items():
        if isinstance(value, float) and not math.isfinite(value):
            return key
    return None


def _f(default: Any, description: str, **schema: Any) -> Any:
    kw: dict[str, Any] = {"metadata": {"description": description, "schema": schema}}
    if isinstance(default, (list, dict, tuple)):
        kw["default_factory"] = lambda d=default: type(d)(d)
    else:
        kw["default"] = default
    return field(**kw)


@dataclass(frozen=True)
class RolloutSpec:
    """One rollout as the trigger form asks for it: the model and versions, the stages and their
    timing, every threshold of the gate and the guards, the mirror, the mesh and the report's
    channel. Each field carries its default, its description and its JSON schema (the DAG's
    Params are built from them); ``from_dict`` validates, naming the field that is wrong."""

    # A model's name is a lock's and a folder's (128 characters at most, as the lock takes); a
    # version a folder's, as the model server (as Triton) loads it: up to int64's largest, 19 digits.
    model: str = _f(
        "digits", "Model name in the repository", type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", maxLength=128
    )
    candidate_version: str = _f(
        "2", "Version to roll out", type="string", pattern=VERSION_PATTERN, maxLength=len(str(INT64_MAX))
    )
    baseline_version: str = _f(
        "1", "Stable version now serving", type="string", pattern=VERSION_PATTERN, maxLength=len(str(INT64_MAX))
    )
    stages: tuple[int, ...] = _f(
        (5, 25, 50, 100),
        "Canary weight (percent) of each stage, ending at 100",
        type="array",
        minItems=1,
        maxItems=MAX_STAGES,
        items={"type": "integer", "minimum": 1, "maximum": 100},
    )
    bake_seconds: int = _f(
        600,
        "How long each stage takes traffic: its looks are spread over it, and a stage that passes early "
        "still bakes to its end under the hard guards",
        type="integer",
        minimum=0,
        maximum=MAX_STAGE_SECONDS,
    )
    max_stage_seconds: int = _f(
        3600,
        "Longest a stage's last look waits for min_samples per arm and a whole validation round; a stage "
        "undecided at its last look rolls back then, whatever this allows",
        type="integer",
        minimum=1,
        maximum=MAX_STAGE_SECONDS,
    )
    min_samples: int = _f(
        200, "Minimum requests per arm before a stage can pass", type="integer", minimum=10, maximum=MAX_SAMPLES
    )
    looks_per_stage: int = _f(
        10,
        "Planned gate evaluations per stage (sequential alpha spending)",
        type="integer",
        minimum=1,
        maximum=MAX_LOOKS,
    )
    mirror_percent: float = _f(
        100.0, "Share of traffic mirrored to the candidate as shadow", type="number", minimum=0, maximum=100
    )
    alpha: float = _f(
        0.05,
        "Error rate of each one-sided decision, over all looks",
        type="number",
        minimum=MIN_ALPHA,
        maximum=0.2,
    )
    spending: str = _f(
        "obrien-fleming",
        "Alpha spending function (Lan-DeMets)",
        type="string",
        enum=["obrien-fleming", "pocock"],
    )
    latency_margin: float = _f(
        0.05,
        "Non-inferiority margin: canary trimmed geometric-mean latency (20% off each end of log latency) "
        "at most this much above baseline (relative)",
        type="number",
        minimum=0,
        maximum=1,
    )
    tail_margin: float = _f(
        0.25,
        "Canary P95 and P99 latency shown more than this much above baseline (relative) fails",
        type="number",
        minimum=0,
        maximum=10,
    )
    error_margin: float = _f(
        0.001, "Non-inferiority margin on the error rate (absolute)", type="number", minimum=0, maximum=0.1
    )
    accuracy_margin: float = _f(
        0.005, "Non-inferiority margin on top-1 accuracy (absolute)", type="number", minimum=0, maximum=0.1
    )
    p99_ms_max: float = _f(
        60.0, "Hard guard: canary P99 latency limit (ms)", type="number", exclusiveMinimum=0, maximum=MAX_P99_MS
    )
    p99_breach_seconds: int = _f(
        120,
        "Hard guard: how long a P99 breach must last to roll back",
        type="integer",
        minimum=0,
        maximum=MAX_BREACH_SECONDS,
    )
    accuracy_drop_max: float = _f(
        0.005,
        "Hard guard: largest accuracy drop on the validation batch",
        type="number",
        minimum=0,
        maximum=1,
    )
    shadow_error_rate_max: float = _f(
        0.001, "Hard guard: largest shadow error rate", type="number", minimum=0, maximum=1
    )
    restarts_max: int = _f(
        0,
        "Hard guard: restarts of the candidate's serving processes a stage allows (one more rolls back)",
        type="integer",
        minimum=0,
        maximum=1000,
    )
    guard_error_limit: int = _f(
        30,
        "Hard guards: reads in a row that fail (Prometheus down, a query error, no data) before a promotion "
        "awaiting approval rolls back; a stage's pokes in a row that fail (a replay refused, an API unreachable) "
        "before it rolls back",
        type="integer",
        minimum=1,
        maximum=1000,
    )
    shadow_agreement_min: float = _f(
        0.90,
        "Shadow audit: top-1 agreement of candidate and primary must be shown at least this",
        type="number",
        minimum=0,
        maximum=1,
    )
    shadow_anomaly_rate_max: float = _f(
        0.10,
        "Shadow audit: share of low-confidence or divergent answers shown above this fails",
        type="number",
        minimum=0,
        maximum=1,
    )
    mesh: str = _f(
        "local", "Traffic backend: the model server's router or Istio", type="string", enum=["local", "istio"]
    )
    slack_channel: str = _f(
        "#model-rollouts",
        "Where reports go: a channel's name or ID",
        type="string",
        pattern=r"^#?[A-Za-z0-9][A-Za-z0-9._-]{0,79}$",  # Slack's names: at most 80 characters
        maxLength=81,
    )
    require_approval: bool = _f(False, "A reviewer approves promotion in the Airflow UI", type="boolean")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            # JSON schema's pattern is a search, where "$" also matches before a last newline:
            # "2\n" passed as a version, "digits\n" as a model, and failed the run later.
            pattern, value = f.metadata["schema"].get("pattern"), getattr(self, f.name)
            if pattern and not (isinstance(value, str) and re.fullmatch(pattern, value)):
                raise SpecError(f"{f.name}: {str(value)[:80]!r} does not match {pattern!r}")
        for name in ("candidate_version", "baseline_version"):
            if int(getattr(self, name)) > INT64_MAX:
                raise SpecError(
                    f"{name}: {getattr(self, name)} is over {INT64_MAX}, the largest version the model server loads"
                )
        if self.candidate_version == self.baseline_version:
            raise SpecError("candidate_version and baseline_version must differ")
        stages = list(self.stages)
        if any(b <= a for a, b in itertools.pairwise(stages)):
            raise SpecError(f"stages must increase strictly, got {stages}")
        if stages[-1] != 100:
            raise SpecError(f"the last stage must be 100 (full promotion), got {stages[-1]}")
        if self.max_stage_seconds < self.bake_seconds:
            raise SpecError("max_stage_seconds must be at least bake_seconds")
        if 0 < self.mirror_percent < MIN_MIRROR_PERCENT:
            raise SpecError(mirror_percent_problem(self.mirror_percent))
        if stages == [100] and self.mirror_percent > 0:
            # A stage at 100% mirrors nothing (the baseline takes no traffic to copy): the mirror
            # asked for could never be proven on, nor the shadow audit have a record.
            raise SpecError(
                "stages [100] mirror nothing: set mirror_percent to 0, or add a stage below 100 for the shadow"
            )
        if self.mirror_percent > 0 and self.shadow_agreement_min >= 1:
            # The audit's agreement must be shown at least this: an interval's lower end is below 1
            # on any sample, so the audit would stay inconclusive and the run roll back at its end.
            raise SpecError(
                f"shadow_agreement_min: {self.shadow_agreement_min:g} can never be shown (on any number of records "
                "the agreement's interval starts below 1), so every such rollout would roll back at its end: give "
                "a minimum below 1, or set mirror_percent to 0"
            )

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        props = {}
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            props[f.name] = {
                **f.metadata["schema"],
                "description": f.metadata["description"],
                "default": list(default) if isinstance(default, tuple) else default,
            }
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "RolloutSpec",
            "type": "object",
            "properties": props,
            "additionalProperties": False,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RolloutSpec:
        if isinstance(raw, dict) and (key := non_finite(raw)) is not None:
            raise SpecError(f"{str(key)[:64]}: {raw[key]} is not a finite number")
        schema = cls.json_schema()
        props = schema["properties"]
        for key, value in raw.items() if isinstance(raw, dict) else ():
            # (before the schema, which reads every item of a list of a million stages first)
            if isinstance(value, list) and len(value) > props.get(key, {}).get("maxItems", math.inf):
                raise SpecError(f"{key}: {len(value)} items, {_allowed(props[key])}")
        try:
            jsonschema.validate(raw, schema)
        except jsonschema.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path) or "spec"
            bound = exc.validator in ("minimum", "maximum", "exclusiveMinimum", "minItems", "maxItems")
            allowed = f" ({_allowed(exc.schema)})" if bound else ""
            raise SpecError(f"{where}: {exc.message[:300]}{allowed}") from None  # a long value quoted, cut
        values: dict[str, Any] = {k: _typed(v, props[k]) for k, v in raw.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def total_looks(self) -> int:
        return self.looks_per_stage * len(self.stages)

    def policy_for_stage(self, weight: int) -> TrafficPolicy:
        """The traffic policy of a stage: baseline and candidate by weight, the mirror on."""
        route = (
            [
                {"version": self.baseline_version, "weight": 100 - weight},
                {"version": self.candidate_version, "weight": weight},
            ]
            if weight < 100
            else [{"version": self.candidate_version, "weight": 100}]
        )
        raw: dict[str, Any] = {"route": route}
        if weight < 100 and self.mirror_percent > 0:
            raw["mirror"] = {"version": self.candidate_version, "percent": self.mirror_percent}
        return TrafficPolicy.from_dict(raw)

    def promoted_policy(self) -> TrafficPolicy:
        """100% candidate, mirror off."""
        return TrafficPolicy.from_dict({"route": [{"version": self.candidate_version, "weight": 100}]})

    def stable_policy(self) -> TrafficPolicy:
        return TrafficPolicy.from_dict({"route": [{"version": self.baseline_version, "weight": 100}]})


def _allowed(schema: dict[str, Any]) -> str:
    """A field's range in words: "allowed 0 to 86400", "allowed 1 to 10 items"."""
    if schema.get("type") == "array":
        return f"allowed {schema.get('minItems', 0)} to {schema['maxItems']} items"
    low = f"above {schema['exclusiveMinimum']}" if "exclusiveMinimum" in schema else str(schema["minimum"])
    return f"allowed {low} to {schema['maximum']}"


def _typed(value: Any, schema: dict[str, Any]) -> Any:
    """A valid value as its field holds it: 25.0 is an integer to JSON Schema (a conf written by
    Python's json, a YAML file), and a stage of 25.0% made a traffic policy the router refused
    mid-rollout; a list is a tuple."""
    if schema.get("type") == "integer":
        return int(value)
    if isinstance(value, list):
        return tuple(_typed(v, schema.get("items", {})) for v in value)
    return value


DEFAULTS = RolloutSpec()
