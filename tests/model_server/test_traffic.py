"""The traffic policy without a server: parsing, weights, stickiness, rules, mirror sampling."""

from __future__ import annotations

import json

import pytest
from scipy.stats import chisquare

from model_server.traffic import BUCKETS, PolicyError, TrafficPolicy, bucket

USERS = [f"user-{i}" for i in range(10_000)]


def policy(route, rules=None, mirror=None) -> TrafficPolicy:
    raw = {"route": [{"version": v, "weight": w} for v, w in route]}
    if rules is not None:
        raw["rules"] = rules
    if mirror is not None:
        raw["mirror"] = mirror
    return TrafficPolicy.from_dict(raw)


def test_weights_are_honoured_over_10000_users():
    p = policy([("1", 70), ("2", 20), ("3", 10)])
    counts = {"1": 0, "2": 0, "3": 0}
    for u in USERS:
        counts[p.choose({}, u)[0]] += 1
    observed = [counts["1"], counts["2"], counts["3"]]
    result = chisquare(observed, [7000, 2000, 1000])
    assert result.pvalue > 0.001, observed


def test_users_keep_the_candidate_while_its_weight_grows():
    previous: set[str] = set()
    for weight in (5, 25, 50, 75, 100):
        p = policy([("1", 100 - weight), ("2", weight)] if weight < 100 else [("2", 100)])
        on_candidate = {u for u in USERS if p.choose({}, u)[0] == "2"}
        assert previous <= on_candidate  # nobody who had version 2 is moved back
        assert abs(len(on_candidate) - weight * 100) < 400
        previous = on_candidate


def test_listing_order_does_not_change_assignment():
    a = policy([("1", 90), ("2", 10)])
    b = policy([("2", 10), ("1", 90)])
    assert all(a.choose({}, u) == b.choose({}, u) for u in USERS[:2000])


def test_bucket_is_stable_and_in_range():
    assert bucket("alice") == bucket("alice")
    assert {bucket(u) for u in USERS[:50]} <= set(range(BUCKETS))


def test_header_rules_in_order_then_route():
    p = policy(
        [("1", 100)],
        rules=[
            {
                "name": "acme",
                "match": {"headers": {"X-Tenant": {"exact": "acme"}}},
                "route": [{"version": "2", "weight": 100}],
            },
            {"match": {"headers": {"x-device-type": {"prefix": "ios"}}}, "route": [{"version": "3"}]},
            {
                "match": {"headers": {"x-user-id": {"regex": "qa-[0-9]+"}}},
                "route": [{"version": "3", "weight": 100}],
            },
        ],
        mirror=None,
    )
    assert p.choose({"x-tenant": "acme", "x-device-type": "ios-17"}, "u") == ("2", "acme")
    assert p.choose({"x-tenant": "acme-labs"}, "u") == ("1", "route")
    assert p.choose({"x-device-type": "ios-17"}, "u") == ("3", "rules[1]")
    assert p.choose({"x-user-id": "qa-42"}, "u") == ("3", "rules[2]")
    assert p.choose({"x-user-id": "qa-42x"}, "u") == ("1", "route")  # regex matches the whole value
    assert p.choose({}, "u") == ("1", "route")


def test_round_trip_and_versions():
    raw = {
        "rules": [
            {
                "match": {"headers": {"x-tenant": {"exact": "acme"}}},
                "route": [{"version": "2", "weight": 100}],
            }
        ],
        "route": [{"version": "1", "weight": 95}, {"version": "2", "weight": 5}],
        "mirror": {"version": "2", "percent": 100.0},
    }
    p = TrafficPolicy.from_dict(raw)
    assert p.to_dict() == raw
    assert TrafficPolicy.from_dict(p.to_dict()) == p
    assert p.versions() == {"1", "2"}
    with pytest.raises(PolicyError, match=r"version\(s\) \['2'\] are not loaded"):
        p.check_loaded([1])


def test_mirror_samples_its_percent_and_never_the_primary():
    p = policy([("1", 95), ("2", 5)], mirror={"version": "2", "percent": 30})
    sampled = sum(p.mirror_for("1", f"req-{i}") is not None for i in range(10_000))
    assert 2700 < sampled < 3300
    assert p.mirror_for("2", "req-1") is None  # a request served by the shadow is not mirrored to it
    full = policy([("1", 100)], mirror={"version": "2", "percent": 100})
    assert all(full.mirror_for("1", f"r{i}") == "2" for i in range(100))


def test_a_mirror_share_under_its_sampling_step_is_refused():
    """0.0001% mirrored 0.01% (a hundred times the share asked): the mirror samples request ids
    one bucket in 10,000 at a time. Under a step is refused, in the policy and in the spec."""
    from vision_rollout.spec import RolloutSpec, SpecError

    for percent in (0.0001, 0.005):
        with pytest.raises(PolicyError, match=f"mirror percent {percent:g} is under 0.01: .* give 0 or at least 0.01"):
            policy([("1", 95), ("2", 5)], mirror={"version": "2", "percent": percent})
        with pytest.raises(SpecError, match=f"mirror percent {percent:g} is under 0.01"):
            RolloutSpec.from_dict({"candidate_version": "2", "mirror_percent": percent})
    smallest = policy([("1", 95), ("2", 5)], mirror={"version": "2", "percent": 0.01})
    assert 5 <= sum(smallest.mirror_for("1", f"r{i}") is not None for i in range(100_000)) <= 20
    assert RolloutSpec.from_dict({"candidate_version": "2", "mirror_percent": 0}).mirror_percent == 0


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (
            {"route": [{"version": "1", "weight": 90}, {"version": "2", "weight": 5}]},
            "weights sum to 95, not 100",
        ),
        ({"route": []}, "non-empty list"),
        ({"route": [{"version": "1", "weight": 50}, {"version": "1", "weight": 50}]}, "more than once"),
        ({"route": [{"version": "v1", "weight": 100}]}, "positive integer"),
        ({"route": [{"version": "1", "weight": 101}]}, "0..100"),
        (
            {"route": [{"version": "1", "weight": 100}], "mirror": {"version": "1", "percent": 100}},
            "is the primary",
        ),
        ({"route": [{"version": "1", "weight": 100}], "mirror": {"version": "2", "percent": 150}}, "0..100"),
        (
            {
                "route": [{"version": "1"}],
                "rules": [{"match": {"headers": {"x": {"regex": "(["}}}, "route": [{"version": "2"}]}],
            },
            "not a regular expression Istio accepts",
        ),
        (  # look-ahead and back-references are Python's, not RE2's: Envoy would refuse them
            {
                "route": [{"version": "1"}],
                "rules": [{"match": {"headers": {"x": {"regex": "(?=a)a"}}}, "route": [{"version": "2"}]}],
            },
            r"\(RE2 syntax\): invalid perl operator: \(\?=",
        ),
        (
            {
                "route": [{"version": "1"}],
                "rules": [{"match": {"headers": {"x": {"regex": r"(a)\1"}}}, "route": [{"version": "2"}]}],
            },
            "invalid escape sequence",
        ),
        (
            {
                "route": [{"version": "1"}],
                "rules": [{"match": {"headers": {"x": {"regex": "a{1000}{1000}"}}}, "route": [{"version": "2"}]}],
            },
            "RE2 syntax",
        ),
        (
            {
                "route": [{"version": "1"}],
                "rules": [{"match": {"headers": {"x": {"regex": "[a-z]" * 400}}}, "route": [{"version": "2"}]}],
            },
            "at most 1024",
        ),
        (
            {
                "route": [{"version": "1"}],
                "rules": [{"match": {"headers": {"x": {"glob": "a*"}}}, "route": [{"version": "2"}]}],
            },
            "exact|prefix|regex",
        ),
        (
            {"route": [{"version": "1"}], "rules": [{"match": {"headers": {}}, "route": [{"version": "2"}]}]},
            "must match something",
        ),
        (
            {
                "route": [{"version": "1"}],
                "rules": [{"match": {"headers": {"x": {"exact": "a"}}}, "route": [{"version": "2"}]}] * 257,
            },
            "rules: 257 rules; at most 256 a policy",
        ),
        *(
            (  # a name no request carries, or one Istio's webhook refuses (HTTP allows '.', '~', ...)
                {
                    "route": [{"version": "1"}],
                    "rules": [{"match": {"headers": {name: {"exact": "a"}}}, "route": [{"version": "2"}]}],
                },
                "is not a header name a rule may match",
            )
            for name in ("", "x user", "x-user\n", "x:user", "é", "x" * 257, "x.team", "x~team", "x'team")
        ),
        (
            {
                "route": [{"version": "1"}],
                "rules": [
                    {"match": {"headers": {f"x-{i}": {"exact": "a"} for i in range(65)}}, "route": [{"version": "2"}]}
                ],
            },
            "65 headers; at most 64 a rule",
        ),
        *(
            (  # a name the log and the metrics give a request of the server's own routes
                {
                    "route": [{"version": "1"}],
                    "rules": [{"name": name, "match": {"headers": {"x": {"exact": "a"}}}, "route": [{"version": "2"}]}],
                },
                needle,
            )
            for name, needle in (
                ("probe", "'probe' is reserved"),
                ("version", "'version' is reserved"),
                ("", "must be 1 to 63 letters"),
                ("x" * 64, "must be 1 to 63 letters"),
                ("a b", "must be 1 to 63 letters"),
                (7, "must be 1 to 63 letters"),
            )
        ),
        ({"route": [{"version": "1"}], "weights": {}}, "unknown policy field"),
        ([1, 2], "JSON object"),
    ],
)
def test_invalid_policies_name_the_reason(raw, needle):
    with pytest.raises(PolicyError, match=needle):
        TrafficPolicy.from_dict(raw)


def test_a_header_named_twice_in_a_rule_is_refused():
    """Header names compare without case: {"X-Tenant": ..., "x-tenant": ...} made the server
    require both values (the rule never matched) while the VirtualService, a map by name, kept
    one condition (the rule matched the second value): one policy, two routings."""
    from vision_rollout.mesh import IstioTarget, render_virtual_service

    raw = {
        "route": [{"version": "1", "weight": 100}],
        "rules": [
            {
                "match": {"headers": {"X-Tenant": {"exact": "acme"}, "x-tenant": {"prefix": "beta"}}},
                "route": [{"version": "2", "weight": 100}],
            }
        ],
    }
    with pytest.raises(PolicyError, match=r"rules\[0\]\.match\.headers\.x-tenant: the header 'X-Tenant' is named"):
        TrafficPolicy.from_dict(raw)
    raw["rules"][0]["match"]["headers"].pop("X-Tenant")
    p = TrafficPolicy.from_dict(raw)
    vs = render_virtual_service(IstioTarget("ns", "digits", "digits"), p)
    assert vs["spec"]["http"][0]["match"] == [{"headers": {"x-tenant": {"prefix": "beta"}}}]
    assert p.choose({"x-tenant": "beta-1"}, "u") == ("2", "rules[0]")


@pytest.mark.parametrize("kind", ["prefix", "regex"])
def test_an_empty_prefix_or_regex_is_refused_as_istio_refuses_it(kind):
    """The server took {"prefix": ""} and {"regex": ""} (a header present; a header present and
    empty) while Istio refuses both ("prefix string match should not be empty", "regex string
    match should not be empty"; Envoy NACKs an empty prefix): a rule tried on one machine was
    refused, or its whole route table rejected, in the cluster. Refused up front, naming the field;
    the JSON schema says it too."""
    import jsonschema

    raw = {
        "route": [{"version": "1", "weight": 100}],
        "rules": [{"match": {"headers": {"x-tenant": {kind: ""}}}, "route": [{"version": "2", "weight": 100}]}],
    }
    with pytest.raises(
        PolicyError, match=rf"rules\[0\]\.match\.headers\.x-tenant\.{kind} is empty, which Istio refuses"
    ):
        TrafficPolicy.from_dict(raw)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, TrafficPolicy.json_schema())
    raw["rules"][0]["match"]["headers"]["x-tenant"] = {"exact": ""}  # Istio takes an empty exact value
    assert TrafficPolicy.from_dict(raw).choose({"x-tenant": ""}, "u") == ("2", "rules[0]")


def test_a_rule_on_the_host_header_is_refused():
    """The server matched a rule on Host against the Host header; Envoy holds that header as the
    :authority pseudo-header, so the same rule in a VirtualService never matches (istio#23083):
    the canary of the rule on one machine was no canary in the cluster."""
    raw = {
        "route": [{"version": "1", "weight": 100}],
        "rules": [{"match": {"headers": {"Host": {"prefix": "beta."}}}, "route": [{"version": "2", "weight": 100}]}],
    }
    with pytest.raises(
        PolicyError, match=r"rules\[0\]\.match\.headers\.Host: Envoy holds the Host header as :authority"
    ):
        TrafficPolicy.from_dict(raw)


def test_a_rule_on_x_model_version_is_refused():
    """X-Model-Version names the version a request wants: the server serves it ahead of every rule
    (a value that is no version is a 400), while Istio pins only the deployed versions' exact
    numbers and lets any other value reach the rules. A rule on it routed {"prefix": "canary"} in
    the cluster and answered 400 on one machine."""
    raw = {
        "route": [{"version": "1", "weight": 100}],
        "rules": [
            {
                "match": {"headers": {"X-Model-Version": {"prefix": "canary"}}},
                "route": [{"version": "2", "weight": 100}],
            }
        ],
    }
    with pytest.raises(PolicyError, match=r"rules\[0\]\.match\.headers\.X-Model-Version: it names the version"):
        TrafficPolicy.from_dict(raw)


@pytest.mark.parametrize(
    ("rule", "needle"),
    [
        ({"headers": {"x": {"exact": "a\x00b"}}}, r"headers\.x\.exact holds a control character"),
        ({"headers": {"x": {"prefix": "a\nb"}}}, r"headers\.x\.prefix holds a control character"),
        ({"headers": {"x": {"regex": "a\x7f"}}}, r"headers\.x\.regex holds a control character"),
        ({"headers": {"x": {"regex": "a\ud800"}}}, r"headers\.x\.regex is not Unicode text"),
        ({"headers": {"x": {"exact": "\udfff"}}}, r"headers\.x\.exact is not Unicode text"),
    ],
)
def test_a_value_no_request_can_carry_is_refused(rule, needle):
    """A lone surrogate (JSON's "\\ud800") in a regex was a UnicodeEncodeError out of the parser
    (a 500 on the admin API); in an exact value, or a control character in any value, it made a
    rule no request can match, which the one-machine cluster's nginx refuses and Istio takes."""
    raw = {"route": [{"version": "1"}], "rules": [{"match": rule, "route": [{"version": "2"}]}]}
    with pytest.raises(PolicyError, match=needle):
        TrafficPolicy.from_dict(raw)
    raw["rules"][0]["match"] = {"headers": {"x": {"exact": "a"}}}
    raw["rules"][0]["name"] = "a\ud800"
    with pytest.raises(PolicyError, match=r"rules\[0\]\.name must be 1 to 63 letters"):
        TrafficPolicy.from_dict(raw)


def test_a_misspelt_field_of_a_destination_or_the_mirror_is_refused():
    """{"mirror": {"version": "2", "percnt": 5}} mirrored 100% (the percent's default) and a
    destination's "wieght" was dropped without a word, though the policy's JSON schema refuses
    both (additionalProperties false) and a rule's or the policy's unknown fields are refused."""
    import jsonschema

    route = [{"version": "1", "weight": 95}, {"version": "2", "weight": 5}]
    for raw, needle in (
        ({"route": route, "mirror": {"version": "2", "percnt": 5}}, r"mirror: unknown field\(s\) \['percnt'\]"),
        ({"route": [{"version": "2", "wieght": 5}]}, r"route\[0\]: unknown field\(s\) \['wieght'\]"),
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(raw, TrafficPolicy.json_schema())
        with pytest.raises(PolicyError, match=needle):
            TrafficPolicy.from_dict(raw)


def test_a_regex_rule_takes_time_linear_in_the_header():
    """Python's backtracking re takes exponential time on (a+)+$ against a run of a's ending in
    b (40 characters pinned a server at 100% CPU; on backtracking this test would not end within
    pytest's timeout); RE2, as Envoy, matches in one pass."""
    p = TrafficPolicy.from_dict(
        {
            "route": [{"version": "1"}],
            "rules": [{"match": {"headers": {"x-user-id": {"regex": "^(a+)+$"}}}, "route": [{"version": "2"}]}],
        }
    )
    assert p.choose({"x-user-id": "a" * 100_000 + "b"}, "u") == ("1", "route")
    assert p.choose({"x-user-id": "a" * 40}, "u")[0] == "2"


def test_a_persisted_policy_with_a_backtracking_regex_is_not_restored(tmp_path, caplog):
    """A policy saved by a server that accepted Python's regex syntax froze the restarted server
    again: now it is refused on restore, by name, and the others still load."""
    from model_server.traffic import PolicyStore

    evil = {
        "route": [{"version": "1", "weight": 100}],
        "rules": [{"match": {"headers": {"x": {"regex": "^(?:a+)+(?=b)"}}}, "route": [{"version": "2"}]}],
    }
    (tmp_path / "digits.json").write_text(json.dumps(evil))
    (tmp_path / "other.json").write_text(json.dumps({"route": [{"version": "1", "weight": 100}]}))
    changed: list[str] = []
    store = PolicyStore(tmp_path, lambda model, _: changed.append(model))
    assert store.restore() == ["other"]
    assert store.get("digits") is None
    assert changed == ["other"]
    assert "digits.json" in caplog.text
    assert "RE2 syntax" in caplog.text
    assert "a policy this server does not take" in store.unreadable["digits"]  # (refused, not defaulted)
    assert "RE2" not in store.unreadable["digits"]  # (the policy's values are the log's only: review s54-1)
    store.apply("digits", TrafficPolicy.from_dict({"route": [{"version": "1", "weight": 100}]}))
    assert store.unreadable == {}


def test_a_policy_whose_file_cannot_be_written_is_not_applied_and_the_file_is_named(tmp_path):
    """A full or read-only state volume answered a bare 500 'internal server error'."""
    from model_server.errors import StateNotSaved
    from model_server.traffic import PolicyStore

    (tmp_path / "traffic").write_text("")  # where the state folder should be
    store = PolicyStore(tmp_path / "traffic", lambda *_: None)
    with pytest.raises(StateNotSaved, match=r"cannot write the state file .*/traffic/digits\.json: ") as err:
        store.apply("digits", policy([("1", 100)]))
    assert err.value.status == 503
    assert store.get("digits") is None


@pytest.mark.parametrize("failing", [2, 3])  # (the unreadable model's write, the last model's)
def test_a_state_file_whose_write_failed_after_its_rename_is_put_back(tmp_path, monkeypatch, failing):
    """Review s54-2: a state file whose write failed after its rename (its folder's fsync: EIO)
    was not put back: the last model's held the file's policy (a restart applied part of the
    file), an unreadable policy's bytes were lost. Every file the apply touched is put back."""
    import errno

    from model_server import files
    from model_server.errors import StateNotSaved
    from model_server.traffic import PolicyStore

    def policy(version: int) -> TrafficPolicy:
        return TrafficPolicy.from_dict({"route": [{"version": str(version), "weight": 100}]})

    (tmp_path / "a.json").write_text(json.dumps(policy(1).to_dict()))
    (tmp_path / "b.json").write_text('{"route": [{"version": "1", "weight": 100}], "future": 1}')  # (unreadable)
    store = PolicyStore(tmp_path, lambda *_: None)
    store.restore()
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    synced, sync = [0], files.sync_folder

    def failing_sync(path: object) -> None:
        synced[0] += 1
        if synced[0] == failing:
            raise OSError(errno.EIO, "Input/output error")
        sync(path)

    monkeypatch.setattr(files, "sync_folder", failing_sync)
    with pytest.raises(StateNotSaved, match="nothing changed"):
        store.apply_all({"a": policy(2), "b": policy(2), "c": policy(2)})
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.json")} == before
    assert (store.get("a"), store.get("c"), sorted(store.unreadable)) == (policy(1), None, ["b"])


def test_a_policy_put_whose_write_failed_after_its_rename_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """Review s54-3: one model's policy (a PUT) whose state file's write failed after its rename
    (its folder's fsync) was refused, but the file held it: a restart routed by it."""
    import errno

    from model_server import files
    from model_server.errors import StateNotSaved
    from model_server.traffic import PolicyStore

    one, two = (TrafficPolicy.from_dict({"route": [{"version": v, "weight": 100}]}) for v in ("1", "2"))
    (tmp_path / "a.json").write_text(json.dumps(one.to_dict()))
    store = PolicyStore(tmp_path, lambda *_: None)
    store.restore()
    before = (tmp_path / "a.json").read_bytes()

    def failing_sync(path: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "sync_folder", failing_sync)
    with pytest.raises(StateNotSaved, match="nothing changed"):
        store.apply("a", two)
    assert (store.get("a"), (tmp_path / "a.json").read_bytes()) == (one, before)
