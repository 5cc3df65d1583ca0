"""rolloutctl: each command, its exit codes, and the image step's pieces."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes import client

from tests.support import TOKEN, samples, shadow_log
from vision_rollout.cli import main
from vision_rollout.images import image_tag, kaniko_pod, verify_model
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


@pytest.mark.parametrize(
    "argv",
    [
        ["gate", "--samples", "nope.csv"],
        ["gate"],
        ["audit", "--shadow-log", "x", "--since", "yesterday"],
        ["gate", "--samples", "{csv}", "--set", "alfa=1"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, argv):
    path = tmp_path / "s.csv"
    samples(200).to_csv(path, index=False)
    argv = [a.replace("{csv}", str(path)) for a in argv]
    assert run(capsys, *argv)[0] == 2


def test_audit_command(tmp_path, capsys):
    log = shadow_log(tmp_path, 200, disagree=0.0)
    code, out, _ = run(
        capsys, "audit", "--prediction-log", str(log), "--since", "1h", "--out", str(tmp_path / "report")
    )
    assert code == 0
    assert out.startswith("PASS")
    assert (tmp_path / "report" / "report.md").exists()
    code, out, _ = run(capsys, "audit", "--shadow-log", str(tmp_path / "empty"), "--since", "1h")
    assert code == 0
    assert out.startswith("SKIP")


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
    assert code == 1
    assert "HTTP 401" in err


def test_verify_model(models_dir, tmp_path, capsys):
    digits = models_dir / "digits"
    good = verify_model(digits / "2" / "model.onnx", digits / "1" / "model.onnx", digits, digits / "validation")
    assert good.ok
    assert good.golden_images == 64
    assert good.golden_accuracy > 0.9
    assert len(good.sha256) == 64
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not onnx")
    assert "does not load" in verify_model(broken).problems[0]
    wrong = verify_model(models_dir / "resnet_bench" / "1" / "model.onnx", digits / "1" / "model.onnx", digits)
    assert any("inputs differ" in p for p in wrong.problems)
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


def test_kaniko_pod_is_a_valid_v1_pod_tagged_by_digest():
    sha = "ab" * 32
    tag = image_tag("registry.example.com/ml/digits-server", sha)
    assert tag == "registry.example.com/ml/digits-server:sha-abababababab"
    pod = kaniko_pod(
        "build-digits-2",
        "ml-builds",
        "git://example.com/ml/serving.git",
        tag,
        "models/digits/2/model.onnx",
        sha,
    )
    api = client.ApiClient()
    v1 = api._ApiClient__deserialize(pod, "V1Pod")  # the client's own model: unknown fields would be dropped
    assert api.sanitize_for_serialization(v1) == pod
    args = v1.spec.containers[0].args
    assert f"--destination={tag}" in args
    assert f"--build-arg=MODEL_SHA256={sha}" in args
    assert v1.spec.restart_policy == "Never"


def test_dockerfile_is_multi_stage_non_root_and_checks_the_baked_model():
    from tests.conftest import ROOT

    text = (ROOT / "docker" / "Dockerfile.model-server").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2
    assert "slim" in stages[-1]
    assert "USER 10001:10001" in text
    assert "sha256sum -c" in text
    assert "ARG MODEL_SHA256" in text
