"""RolloutSpec: its defaults, validation, JSON schema, stage policies."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from vision_rollout.spec import RolloutSpec, SpecError


def test_default_guards():
    s = RolloutSpec()
    assert s.stages == (5, 25, 50, 100)
    assert (s.p99_ms_max, s.p99_breach_seconds, s.accuracy_drop_max, s.shadow_error_rate_max, s.restarts_max) == (
        60.0,
        120,
        0.005,
        0.001,
        0,
    )


def test_the_gate_and_the_audit_take_every_threshold_from_the_spec():
    from dataclasses import fields

    from vision_rollout.audit import AuditConfig
    from vision_rollout.gates import GateConfig

    assert GateConfig() == GateConfig.from_spec(RolloutSpec())  # one set of defaults
    assert AuditConfig() == AuditConfig.from_spec(RolloutSpec())
    spec = RolloutSpec.from_dict(
        {
            "alpha": 0.01,
            "min_samples": 500,
            "tail_margin": 0.5,
            "shadow_error_rate_max": 0.02,
            "restarts_max": 3,
            "shadow_agreement_min": 0.8,
            "shadow_anomaly_rate_max": 0.3,
        }
    )
    gate, audit = GateConfig.from_spec(spec), AuditConfig.from_spec(spec)
    shared = [f.name for f in fields(GateConfig) if hasattr(spec, f.name)]
    assert len(shared) == len(fields(GateConfig)) - 1  # all but the power of the reported MDE
    assert all(getattr(gate, name) == getattr(spec, name) for name in shared)
    assert (audit.min_agreement, audit.max_shadow_error_rate, audit.max_anomaly_rate) == (0.8, 0.02, 0.3)
    assert GateConfig.from_spec(spec, min_samples=50).min_samples == 50  # a study's override


def test_json_schema_is_valid_and_carries_descriptions():
    schema = RolloutSpec.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["stages"]["default"] == [5, 25, 50, 100]
    assert all(p["description"] for p in schema["properties"].values())


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"alpha": 0.5}, "alpha"),
        ({"stages": [50, 25, 100]}, "increase strictly"),
        ({"stages": [5, 50]}, "last stage must be 100"),
        ({"candidate_version": "1"}, "must differ"),
        ({"mesh": "linkerd"}, "mesh"),
        ({"colour": "blue"}, "Additional properties"),
        ({"bake_seconds": 600, "max_stage_seconds": 60}, "max_stage_seconds"),
        # 200 looks took 23 s of boundaries a poke, and 18 or more crashed the gate at look 1.
        ({"looks_per_stage": 13}, "looks_per_stage: 13 is greater than the maximum of 12"),
        # Long names ended in a raw ValueError from the lock, long versions in OSError (file name
        # too long) or int()'s limit: refused here, naming the field.
        ({"model": "m" * 129}, "model: 'mmmm"),
        ({"candidate_version": "2" * 20}, "candidate_version: '22222222222222222222' is too long"),
        # Past int64, no version folder the model server (as Triton) loads.
        ({"candidate_version": str(2**63)}, "candidate_version: 9223372036854775808 is over 9223372036854775807"),
        ({"baseline_version": "1" * 5000}, "baseline_version: '1111"),
        # The schema's pattern is searched, and "$" matches before a last newline: these passed,
        # and failed the run later (a version no traffic policy takes, a model no lock takes).
        ({"candidate_version": "2\n"}, r"candidate_version: '2\\n' does not match"),
        ({"model": "digits\n"}, r"model: 'digits\\n' does not match"),
        # A channel Slack cannot have failed the report after the decision (empty, 5,000 characters).
        ({"slack_channel": ""}, "slack_channel: '' does not match"),
        ({"slack_channel": "#" + "c" * 5000}, "slack_channel: '#ccc"),
        ({"slack_channel": "#model rollouts"}, "slack_channel: '#model rollouts' does not match"),
        # A 100% stage mirrors nothing: enable_shadow could never see the mirror and failed every run.
        ({"stages": [100]}, r"stages \[100\] mirror nothing: set mirror_percent to 0"),
        # An agreement of 100% is never shown (a Wilson interval's lower end is below 1 on any
        # sample): the shadow audit stayed inconclusive and every such rollout rolled back at its
        # end, its stages baked on the candidate for nothing.
        ({"shadow_agreement_min": 1}, r"shadow_agreement_min: 1 can never be shown .* mirror_percent to 0"),
    ],
)
def test_invalid_specs_name_the_field(raw, needle):
    with pytest.raises(SpecError, match=needle):
        RolloutSpec.from_dict(raw)


# A typo in a number held traffic on a candidate for a month (bake_seconds 3000000), switched a
# guard off (p99_ms_max 1e300, p99_breach_seconds 10**9: a Prometheus range query of 31 years)
# or planned a rollout of 100 stages; each is refused naming the field, the value and its range.
@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (
            {"bake_seconds": 3_000_000},
            r"bake_seconds: 3000000 is greater than the maximum of 86400 \(allowed 0 to 86400\)",
        ),
        ({"bake_seconds": -1}, r"bake_seconds: -1 is less than the minimum of 0 \(allowed 0 to 86400\)"),
        (
            {"max_stage_seconds": 10**30},
            r"max_stage_seconds: 1000000000000000000000000000000 .* \(allowed 1 to 86400\)",
        ),
        ({"min_samples": 10**12}, r"min_samples: 1000000000000 .* \(allowed 10 to 1000000\)"),
        ({"p99_ms_max": 1e300}, r"p99_ms_max: 1e\+300 .* \(allowed above 0 to 60000\)"),
        ({"p99_ms_max": 0}, r"p99_ms_max: 0 is less than or equal to the minimum of 0 \(allowed above 0 to 60000\)"),
        ({"p99_breach_seconds": 10**9}, r"p99_breach_seconds: 1000000000 .* \(allowed 0 to 3600\)"),
        ({"alpha": 5e-324}, r"alpha: 5e-324 is less than the minimum of 1e-06 \(allowed 1e-06 to 0.2\)"),
        ({"looks_per_stage": 10**6}, r"looks_per_stage: 1000000 .* \(allowed 1 to 12\)"),
        ({"stages": list(range(1, 101))}, r"stages: 100 items, allowed 1 to 10 items"),
        ({"stages": []}, r"stages: \[\] should be non-empty \(allowed 1 to 10 items\)"),
        ({"stages": [0, 100]}, r"stages.0: 0 is less than the minimum of 1 \(allowed 1 to 100\)"),
        ({"latency_margin": -0.1}, r"latency_margin: -0.1 is less than the minimum of 0 \(allowed 0 to 1\)"),
        ({"accuracy_margin": 2}, r"accuracy_margin: 2 is greater than the maximum of 0.1 \(allowed 0 to 0.1\)"),
        ({"mirror_percent": 101}, r"mirror_percent: 101 .* \(allowed 0 to 100\)"),
        ({"restarts_max": -1}, r"restarts_max: -1 is less than the minimum of 0 \(allowed 0 to 1000\)"),
    ],
)
def test_numbers_out_of_their_range_are_refused_naming_field_value_and_range(raw, needle):
    with pytest.raises(SpecError, match=needle):
        RolloutSpec.from_dict(raw)


def test_every_number_and_list_of_the_spec_has_a_range():
    schema = RolloutSpec.json_schema()["properties"]
    for name, prop in schema.items():
        if prop["type"] in ("integer", "number"):
            assert "maximum" in prop, name
            assert "minimum" in prop or "exclusiveMinimum" in prop, name
        if prop["type"] == "array":
            assert "maxItems" in prop, name
            assert "maximum" in prop["items"], name


def test_a_list_of_a_million_stages_is_refused_at_once():
    import time

    started = time.monotonic()
    with pytest.raises(SpecError) as refused:
        RolloutSpec.from_dict({"stages": [50] * 1_000_000 + [100]})
    assert time.monotonic() - started < 1
    assert str(refused.value) == "stages: 1000001 items, allowed 1 to 10 items"


def test_the_ranges_take_real_rollouts():
    """A day's bake, ten stages, a million samples per arm, a P99 limit of a minute held for an hour."""
    s = RolloutSpec.from_dict(
        {
            "stages": [1, 2, 5, 10, 20, 30, 50, 70, 90, 100],
            "bake_seconds": 86_400,
            "max_stage_seconds": 86_400,
            "min_samples": 1_000_000,
            "looks_per_stage": 12,
            "alpha": 1e-6,
            "p99_ms_max": 60_000,
            "p99_breach_seconds": 3_600,
        }
    )
    assert (len(s.stages), s.bake_seconds, s.min_samples, s.p99_breach_seconds) == (10, 86_400, 1_000_000, 3_600)


@pytest.mark.parametrize("key", ["p99_ms_max", "accuracy_drop_max", "shadow_error_rate_max", "alpha", "latency_margin"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_numbers_that_are_not_finite_are_refused(key, value):
    """JSON as Python reads it (a spec file, a trigger's conf, --set) takes NaN and Infinity,
    and no schema bound catches NaN: ``p99_ms_max: NaN`` turned the P99 guard off (no P99 is
    above NaN) and rolloutctl run promoted a canary that the guard at 0.01 ms rolled back."""
    from vision_rollout.gates import GateConfig

    with pytest.raises(SpecError, match=f"{key}: .* is not a finite number"):
        RolloutSpec.from_dict(json.loads(json.dumps({key: value})))
    with pytest.raises(ValueError, match=f"gate config {key}: .* is not a finite number"):
        GateConfig.from_any({key: value})


def test_a_key_that_is_no_string_is_a_spec_error():
    """Review s53-1: a spec of Python's (no JSON's: its keys are strings) with a key 1 of NaN was
    a TypeError naming nothing."""
    with pytest.raises(SpecError, match="1: nan is not a finite number"):
        RolloutSpec.from_dict({1: math.nan})
    with pytest.raises(SpecError):
        RolloutSpec.from_dict({1: 2})


def test_a_long_value_is_quoted_cut():
    with pytest.raises(SpecError) as refused:
        RolloutSpec.from_dict({"model": "m" * 5000})
    assert len(str(refused.value)) < 400


def test_the_longest_names_and_versions_are_taken():
    """Versions of 10 to 19 digits (up to int64's largest, as the model server and Triton load
    them) were refused: a model served as version 1234567890 could not be rolled out."""
    top = str(2**63 - 1)
    s = RolloutSpec.from_dict({"model": "m" * 128, "candidate_version": top, "baseline_version": "1234567890"})
    assert (len(s.model), s.candidate_version, s.baseline_version) == (128, top, "1234567890")
    assert s.policy_for_stage(10).versions() == {top, "1234567890"}
    assert RolloutSpec.json_schema()["properties"]["candidate_version"]["maxLength"] == 19


def test_a_single_full_stage_runs_without_a_mirror():
    s = RolloutSpec.from_dict({"stages": [100], "mirror_percent": 0})
    assert s.policy_for_stage(100).to_dict() == {"route": [{"version": "2", "weight": 100}]}


def test_stage_policies():
    s = RolloutSpec.from_dict({"stages": [10, 100], "mirror_percent": 50})
    assert s.policy_for_stage(10).to_dict() == {
        "route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}],
        "mirror": {"version": "2", "percent": 50.0},
    }
    assert s.policy_for_stage(100).to_dict() == {"route": [{"version": "2", "weight": 100}]}
    assert s.stable_policy().to_dict() == {"route": [{"version": "1", "weight": 100}]}
    assert RolloutSpec.from_dict(s.to_dict()) == s


def test_traffic_policy_json_schema_accepts_what_from_dict_accepts():
    from model_server.traffic import TrafficPolicy

    schema = TrafficPolicy.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    policy = {
        "rules": [
            {
                "name": "acme",
                "match": {"headers": {"x-tenant": {"exact": "acme"}}},
                "route": [{"version": "2", "weight": 100}],
            }
        ],
        "route": [{"version": "1", "weight": 95}, {"version": "2", "weight": 5}],
        "mirror": {"version": "2", "percent": 100},
    }
    jsonschema.validate(policy, schema)
    assert TrafficPolicy.from_dict(policy).to_dict() == {
        **policy,
        "mirror": {"version": "2", "percent": 100.0},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {
                "route": [{"version": "1", "weight": 100}],
                "rules": [{"match": {"headers": {"x": {"glob": "*"}}}, "route": [{"version": "2"}]}],
            },
            schema,
        )
