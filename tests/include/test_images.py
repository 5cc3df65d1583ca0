"""The image step's pieces: the artifact check before any traffic, the BuildKit build pod, the
model server's Dockerfile."""

from __future__ import annotations

import json
import re

import pytest
from kubernetes import client

from tests.conftest import ROOT
from vision_rollout.images import AWS_CLI_IMAGE, build_pod, image_tag, verify_model
from vision_rollout.settings import BUILDKIT_IMAGE


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


def render(context: str, sha: str = "ab" * 32) -> dict:
    return build_pod(
        "build-digits-2",
        "ml-builds",
        context,
        image_tag("registry.example.com/ml/digits-server", sha),
        "models/digits/2/model.onnx",
        sha,
        builder_image=BUILDKIT_IMAGE,
        docker_config_secret="registry-push",
        service_account="image-builder",
    )


def test_the_build_pod_is_a_valid_v1_pod_running_rootless_buildkit_tagged_by_digest():
    sha = "ab" * 32
    tag = image_tag("registry.example.com/ml/digits-server", sha)
    assert tag == "registry.example.com/ml/digits-server:sha-abababababab"
    pod = render("s3://ml-builds/serving-context.tar.gz", sha)
    api = client.ApiClient()
    v1 = api._ApiClient__deserialize(pod, "V1Pod")  # the client's own model: unknown fields would be dropped
    assert api.sanitize_for_serialization(v1) == pod
    assert v1.spec.restart_policy == "Never"
    (build,) = v1.spec.containers
    assert build.image == BUILDKIT_IMAGE
    assert re.fullmatch(r"moby/buildkit:v\d+\.\d+\.\d+-rootless", BUILDKIT_IMAGE)  # a release, never :latest
    assert build.command == ["buildctl-daemonless.sh"]
    args = build.args
    assert args[:5] == ["build", "--progress", "plain", "--frontend", "dockerfile.v0"]
    assert f"type=image,name={tag},push=true" in args
    assert f"build-arg:MODEL_SHA256={sha}" in args
    assert "build-arg:MODEL_FILE=models/digits/2/model.onnx" in args
    assert ["--local", "context=/workspace/context", "--local", "dockerfile=/workspace/context/docker"] == args[5:9]
    assert "filename=Dockerfile.model-server" in args
    # Rootless: not privileged, user 1000 mapped to root in its own user namespace.
    security = build.security_context
    assert not security.privileged
    assert (security.run_as_user, security.run_as_group, security.run_as_non_root) == (1000, 1000, True)
    assert security.seccomp_profile.type == security.app_armor_profile.type == "Unconfined"
    # The same for API servers before 1.30, which read the annotation (from 1.30 both must agree).
    assert v1.metadata.annotations == {"container.apparmor.security.beta.kubernetes.io/build": "unconfined"}
    env = {e.name: e.value for e in build.env}
    assert env == {"BUILDKITD_FLAGS": "--oci-worker-no-process-sandbox", "DOCKER_CONFIG": "/home/user/.docker"}
    mounts = {m.name: m for m in build.volume_mounts}
    assert (mounts["docker-config"].mount_path, mounts["docker-config"].read_only) == ("/home/user/.docker", True)
    assert mounts["context"].read_only
    volumes = {v.name: v for v in v1.spec.volumes}
    assert volumes["docker-config"].secret.secret_name == "registry-push"
    assert volumes["docker-config"].secret.items[0].path == "config.json"


def test_an_s3_context_is_fetched_and_unpacked_by_init_containers_without_credentials_in_the_pod():
    pod = render("s3://ml-builds/serving-context.tar.gz")
    fetch, unpack = pod["spec"]["initContainers"]
    assert fetch["image"] == AWS_CLI_IMAGE
    assert fetch["args"] == [
        "s3",
        "cp",
        "--no-progress",
        "s3://ml-builds/serving-context.tar.gz",
        "/download/context.tar.gz",
    ]
    assert unpack["image"] == BUILDKIT_IMAGE  # its busybox tar; the AWS CLI's image has none
    assert unpack["command"] == ["tar", "-xzf", "/download/context.tar.gz", "-C", "/workspace/context"]
    for init in (fetch, unpack):
        assert init["securityContext"]["allowPrivilegeEscalation"] is False
        assert init["securityContext"]["runAsNonRoot"] is True
    text = json.dumps(pod)
    assert "secretKeyRef" not in text  # credentials are the service account's, never in the pod
    assert "envFrom" not in text
    assert [v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v] == ["download", "context", "buildkitd"]


def test_https_and_dir_contexts_need_no_init_container():
    for remote in ("https://example.com/ml/serving.git", "https://example.com/ml/serving.git#main"):
        pod = render(remote)
        assert "initContainers" not in pod["spec"]
        args = pod["spec"]["containers"][0]["args"]
        assert f"context={remote}" in args  # BuildKit's dockerfile frontend fetches it
        assert "--local" not in args
        assert "filename=docker/Dockerfile.model-server" in args  # the Dockerfile comes from that context
    args = render("dir:///srv/context/")["spec"]["containers"][0]["args"]
    assert ["--local", "context=/srv/context", "--local", "dockerfile=/srv/context/docker"] == args[5:9]
    with pytest.raises(ValueError, match="s3://, https:// or dir://"):
        render("gs://ml-builds/serving-context.tar.gz")


def test_dockerfile_is_multi_stage_non_root_and_checks_the_baked_model():
    text = (ROOT / "docker" / "Dockerfile.model-server").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2
    assert "slim" in stages[-1]
    assert "USER 10001:10001" in text
    assert "sha256sum -c" in text
    assert "ARG MODEL_SHA256" in text
