"""ServingSettings: the model server connection's extras, typed and checked once."""

from __future__ import annotations

from pathlib import Path

import pytest

from vision_rollout.settings import BuildSettings, ServingSettings, SettingsError


def test_defaults_and_the_old_name_of_the_prediction_log():
    s = ServingSettings.from_connection("http://h:8000", "", {})
    assert (s.repository, s.prediction_log, s.run_dir, s.token) == (
        Path("models"),
        "run/predictions",
        Path("run"),
        None,
    )
    assert s.build == BuildSettings()
    assert (
        ServingSettings.from_connection("http://h:8000", None, {"shadow_log": "s3://b/p"}).prediction_log == "s3://b/p"
    )


def test_paths_a_rollout_uses(tmp_path):
    s = ServingSettings.from_connection("http://h:8001", "t", {"run_dir": str(tmp_path), "repository": "/m"})
    assert s.address == "h:8001"
    assert s.admin.headers == {"Authorization": "Bearer t"}
    assert s.validation("digits") == Path("/m/digits/validation")
    assert s.outbox == tmp_path / "outbox"
    work = s.workdir("digits", "manual__2026-11-30T16:00:00+00:00/../x")
    assert work.parent == tmp_path / "rollouts" / "digits"  # a run id cannot climb out
    assert work.is_dir()
    assert s.workdir("digits", "..").parent == tmp_path / "rollouts" / "digits"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"predictions_log": "x"}, "unknown model_server_default extra 'predictions_log'"),  # a typo is not ignored
        ({"build": "registry"}, "extra build must be an object"),
        ({"build": {"replica": 2}}, "unknown model_server_default extra build.replica"),
        ({"build": {"replicas": "two"}}, "build.replicas must be an integer"),
        ({"build": {"replicas": 0}}, "build.replicas is out of range"),
    ],
)
def test_wrong_extras_are_named(extra, needle):
    with pytest.raises(SettingsError, match=needle.replace(".", r"\.")):
        ServingSettings.from_connection("http://h:8000", None, extra)


def test_kubernetes_settings_are_required_where_used():
    s = ServingSettings.from_connection("http://h:8000", None, {"istio": {"namespace": "models", "service": "digits"}})
    with pytest.raises(SettingsError, match=r"extra istio\.name"):
        _ = s.istio
    with pytest.raises(SettingsError, match=r"extra build\.registry"):
        s.build.require("registry")
    full = ServingSettings.from_connection(
        "http://h:8000",
        None,
        {
            "istio": {"namespace": "models", "service": "digits", "name": "digits", "gateways": ["mesh"]},
            "build": {"registry": "r.example/x", "replicas": "3"},
        },
    )
    assert (full.istio.host, full.istio.gateways) == ("digits.models.svc.cluster.local", ["mesh"])
    assert full.build.replicas == 3
