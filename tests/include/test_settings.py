"""ServingSettings: the model server connection's extras, typed and checked once."""

from __future__ import annotations

import re
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
        ({"predictions_log": "x"}, "extra (extras): Additional properties are not allowed ('predictions_log'"),
        ({"build": "registry"}, "extra build: 'registry' is not of type 'object'"),
        ({"build": {"replica": 2}}, "extra build: Additional properties are not allowed ('replica'"),
        ({"build": {"replicas": "two"}}, "extra build.replicas: 'two' is not of type 'integer'"),
        ({"build": {"replicas": 1.7}}, "extra build.replicas: 1.7 is not of type 'integer'"),
        ({"build": {"gpus": True}}, "extra build.gpus: True is not of type 'integer'"),
        ({"build": {"replicas": 0}}, "extra build.replicas: 0 is less than the minimum of 1"),
        ({"build": {"namespace": None}}, "extra build.namespace: None is not of type 'string'"),
        ({"repository": 5}, "extra repository: 5 is not of type 'string'"),
        ({"istio": {"gateways": "mesh"}}, "extra istio.gateways: 'mesh' is not of type 'array'"),
        ({"istio": {"namspace": "models"}}, "extra istio: Additional properties are not allowed ('namspace'"),
    ],
)
def test_wrong_extras_are_named(extra, needle):
    with pytest.raises(SettingsError, match=re.escape(needle)):
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
            "build": {"registry": "r.example/x", "replicas": 3.0},
        },
    )
    assert (full.istio.host, full.istio.gateways) == ("digits.models.svc.cluster.local", ["mesh"])
    assert full.build.replicas == 3
    assert isinstance(full.build.replicas, int)  # 3.0 is an integer to JSON Schema, and a count here


def test_the_sizing_settings_of_kubernetes_mode():
    build = ServingSettings.from_connection(
        "http://h:8000", None, {"build": {"min_replicas": 2.0, "autoscaling": True, "max_replicas": 30}}
    ).build
    assert (build.min_replicas, build.autoscaling, build.max_replicas) == (2, True, 30)
    assert isinstance(build.min_replicas, int)
    assert (BuildSettings().min_replicas, BuildSettings().autoscaling, BuildSettings().max_replicas) == (1, False, None)
    assert BuildSettings().drain_seconds == 10.0
    assert (BuildSettings().admin_secret, BuildSettings().feedback_secret, BuildSettings().mask_secret) == (
        "model-server-admin",
        "model-server-feedback",
        "model-server-masking",
    )
    assert BuildSettings().storage_secret is None
    assert ServingSettings.from_connection("h", None, {"build": {"drain_seconds": 2.5}}).build.drain_seconds == 2.5
    for extra, message in (
        ({"min_replicas": 0}, "extra build.min_replicas: 0 is less than the minimum of 1"),
        ({"autoscaling": "yes"}, "extra build.autoscaling: 'yes' is not of type 'boolean'"),
        ({"max_replicas": 10_001}, "extra build.max_replicas: 10001 is greater than the maximum of 10000"),
        ({"drain_seconds": -1}, "extra build.drain_seconds: -1 is less than the minimum of 0"),
        ({"storage_secret": ""}, "extra build.storage_secret: '' should be non-empty"),
    ):
        with pytest.raises(SettingsError, match=re.escape(message)):
            ServingSettings.from_connection("http://h:8000", None, {"build": extra})
