"""The image step's pieces: the artifact check before any traffic, the Kaniko build pod, the
model server's Dockerfile."""

from __future__ import annotations

from kubernetes import client

from tests.conftest import ROOT
from vision_rollout.images import image_tag, kaniko_pod, verify_model


def test_verify_model(models_dir, tmp_path):
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
    bad = tmp_path / "validation"
    bad.mkdir()
    (bad / "labels.csv").write_text("file,label\n../../etc/passwd,1\n")
    refused = verify_model(digits / "2" / "model.onnx", None, digits, bad)  # listed, not raised
    assert not refused.ok
    assert "cannot be read: " in refused.problems[0]
    assert "expected a file name in this folder" in refused.problems[0]


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
        docker_config_secret="registry-push",
        service_account="image-builder",
    )
    api = client.ApiClient()
    v1 = api._ApiClient__deserialize(pod, "V1Pod")  # the client's own model: unknown fields would be dropped
    assert api.sanitize_for_serialization(v1) == pod
    args = v1.spec.containers[0].args
    assert f"--destination={tag}" in args
    assert f"--build-arg=MODEL_SHA256={sha}" in args
    assert v1.spec.restart_policy == "Never"


def test_dockerfile_is_multi_stage_non_root_and_checks_the_baked_model():
    text = (ROOT / "docker" / "Dockerfile.model-server").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2
    assert "slim" in stages[-1]
    assert "USER 10001:10001" in text
    assert "sha256sum -c" in text
    assert "ARG MODEL_SHA256" in text
