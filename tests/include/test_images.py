"""The image step's pieces: the artifact check before any traffic, the BuildKit build pod, the
model server's Dockerfile."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from kubernetes import client

from tests.conftest import ROOT
from vision_rollout.images import (
    AWS_CLI_IMAGE,
    BUILD_SCRIPT,
    METADATA_FILE,
    TERMINATION_LOG,
    build_pod,
    image_tag,
    pushed_image,
    verify_model,
)
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
    assert build.command == ["sh", "-c", BUILD_SCRIPT, "buildctl-daemonless.sh"]
    args = build.args
    assert args[-2:] == ["--metadata-file", METADATA_FILE]  # the pushed digest, copied to:
    assert (build.termination_message_path, build.termination_message_policy) == (
        TERMINATION_LOG,
        "FallbackToLogsOnError",
    )
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


def test_the_build_script_passes_its_args_and_reports_the_metadata_only_after_a_build(tmp_path):
    """The wrapper as sh runs it, around a buildctl-daemonless.sh that records its argv and
    writes --metadata-file: every arg passed as it is (spaces, quotes, globs), the metadata
    copied to the termination log after a build that succeeded, nothing after one that failed."""
    metadata, log = tmp_path / "metadata.json", tmp_path / "termination-log"
    script = BUILD_SCRIPT.replace(METADATA_FILE, str(metadata)).replace(TERMINATION_LOG, str(log))
    builder = tmp_path / "bin" / "buildctl-daemonless.sh"
    builder.parent.mkdir()
    builder.write_text(
        "#!/bin/sh\n"
        'printf "%s\\n" "$@" > "$ARGV"\n'
        'while [ $# -gt 0 ]; do [ "$1" = --metadata-file ] && printf "%s" "$METADATA" > "$2"; shift; done\n'
        'exit "$STATUS"\n'
    )
    builder.chmod(0o755)
    args = ["build", "--opt", "build-arg:NOTE=a b  'c' *", "--metadata-file", str(metadata)]
    env = {**os.environ, "PATH": f"{builder.parent}:{os.environ['PATH']}", "ARGV": str(tmp_path / "argv")}
    built = json.dumps({"containerimage.digest": "sha256:" + "c" * 64})
    for status in ("1", "0"):
        ran = subprocess.run(
            ["sh", "-c", script, "buildctl-daemonless.sh", *args],
            env={**env, "STATUS": status, "METADATA": built},
            check=False,
        )
        assert ran.returncode == int(status)
        assert (tmp_path / "argv").read_text().splitlines() == args
        assert log.exists() == (status == "0")
    assert log.read_text() == built


def test_the_pushed_image_is_the_tag_by_the_digest_the_build_reports():
    tag = "registry.example.com:5000/ml/digits-server:sha-abababababab"
    digest = "sha256:" + "0123456789abcdef" * 4
    metadata = {  # buildctl's --metadata-file for an image export
        "containerimage.config.digest": "sha256:" + "e" * 64,
        "containerimage.descriptor": {"digest": digest, "mediaType": "application/vnd.oci.image.manifest.v1+json"},
        "containerimage.digest": digest,
        "image.name": tag,
    }
    assert pushed_image(tag, json.dumps(metadata, indent=2)) == f"{tag}@{digest}"
    assert pushed_image(tag, json.dumps({**metadata, "image.name": f"{tag},other:1"})) == f"{tag}@{digest}"
    for message, reason in [
        (None, "termination message is empty"),
        ("", "termination message is empty"),
        ("error: failed to solve: exit code: 1\n" * 200, "not JSON: 'error: failed to solve"),
        ("[]", "names no sha256 digest"),
        (json.dumps({**metadata, "containerimage.digest": "sha256:abc"}), "names no sha256 digest"),
        (json.dumps({**metadata, "containerimage.digest": digest.upper()}), "names no sha256 digest"),
        (json.dumps({**metadata, "containerimage.digest": None}), "names no sha256 digest"),
        (json.dumps({**metadata, "image.name": "registry.example.com/ml/other:1"}), "pushed 'registry.example.com/ml/"),
    ]:
        with pytest.raises(ValueError, match=re.escape(reason)) as refused:
            pushed_image(tag, message)
        assert len(str(refused.value)) < 400  # a log's tail is cut, not echoed whole


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


def test_a_model_file_larger_than_one_onnx_file_holds_is_refused_unread(models_dir, tmp_path, monkeypatch):
    """verify_model read the whole file into memory whatever its size (a 30 GB file stopped the
    worker); the model server's load too. Over the bound, refused by its size alone."""
    import model_server.model

    monkeypatch.setattr(model_server.model, "MAX_MODEL_BYTES", 100_000)  # digits is 78 KB
    huge = tmp_path / "model.onnx"
    with huge.open("wb") as f:
        f.truncate(100_001)
    report = verify_model(huge, None, models_dir / "digits")
    assert report.problems == ["model.onnx is 100001 bytes, over the 100000 bytes one ONNX file can hold"]
    assert report.sha256 == ""
    baseline = verify_model(models_dir / "digits" / "2" / "model.onnx", huge, models_dir / "digits")
    assert baseline.problems == [
        f"the baseline {huge}: model.onnx is 100001 bytes, over the 100000 bytes one ONNX file can hold"
    ]


def _digits_like(path, classes: int, batch_of_one: bool = False) -> None:
    """A model taking digits' 64 features to ``classes`` probabilities, where no shape inference
    can tell the class count (a Slice to a computed end: the graph's output is [N, ?]); with
    ``batch_of_one``, a Reshape to a computed [1, -1] that only a batch of one survives."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    const = [
        numpy_helper.from_array(np.full((64, 16), 0.01, dtype=np.float32), "w"),
        numpy_helper.from_array(np.array(0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([classes], dtype=np.int64), "classes"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "rest"),
    ]
    nodes = [  # one: 1 for any image (features >= 0), computed from the input
        helper.make_node("ReduceMin", ["input"], ["low"], keepdims=0),
        helper.make_node("GreaterOrEqual", ["low", "zero"], ["ok"]),
        helper.make_node("Cast", ["ok"], ["one0"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["one0", "start"], ["one"]),
    ]
    source = "input"
    if batch_of_one:
        nodes += [
            helper.make_node("Concat", ["one", "rest"], ["flat"], axis=0),
            helper.make_node("Reshape", ["input", "flat"], ["flattened"]),
        ]
        source = "flattened"
    nodes += [
        helper.make_node("MatMul", [source, "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["wide"], axis=1),
        helper.make_node("Mul", ["classes", "one"], ["end"]),
        helper.make_node("Slice", ["wide", "start", "end", "axis"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_like",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", "C"])],
        const,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


@pytest.mark.parametrize(
    ("classes", "batch_of_one", "config_classes", "refused"),
    [
        (11, False, 10, "version 2: output 'probabilities' came out with shape [1, 11], dims [-1, 10] in config.json"),
        (
            11,
            False,
            -1,
            "output 'probabilities' came out with shape [64, 11] at a batch of 64, the baseline's [64, 10]: "
            "clients of the baseline read another shape",
        ),
        (10, True, 10, "fails at a batch of 64 (the config's max_batch_size): "),
    ],
    ids=["class-count-vs-config", "class-count-vs-baseline", "fails-above-one-item"],
)
def test_a_candidate_whose_outputs_only_running_it_shows_is_refused(
    models_dir, tmp_path, classes, batch_of_one, config_classes, refused
):
    """A class count the graph leaves symbolic passed the signature checks (the graph's [N, ?]
    takes config.json's [-1, 10]), and the warm-up runs one item: a candidate answering 11
    classes, or failing on any batch of more than one image, was verified, loaded and staged."""
    model = tmp_path / "digits"
    model.mkdir()
    config = json.loads((models_dir / "digits" / "config.json").read_text())
    config["output"][0]["dims"] = [-1, config_classes]
    (model / "config.json").write_text(json.dumps(config))
    (model / "labels.txt").write_bytes((models_dir / "digits" / "labels.txt").read_bytes())
    _digits_like(model / "1" / "model.onnx", 10)
    baseline = verify_model(model / "1" / "model.onnx", None, model)
    assert baseline.ok, baseline.problems
    _digits_like(model / "2" / "model.onnx", classes, batch_of_one)
    report = verify_model(model / "2" / "model.onnx", model / "1" / "model.onnx", model)
    assert [p for p in report.problems if refused in p], report.problems


def test_the_largest_batch_is_run_within_the_memory_bound(models_dir, tmp_path, monkeypatch):
    """A max_batch_size is any int32 (Triton's field): its zeros were built whole, 2**31 items of
    64 floats (512 GiB) in the verifying worker. The run is at the largest batch that fits."""
    import vision_rollout.images as images

    model = tmp_path / "digits"
    model.mkdir()
    config = json.loads((models_dir / "digits" / "config.json").read_text())
    (model / "labels.txt").write_bytes((models_dir / "digits" / "labels.txt").read_bytes())
    _digits_like(model / "1" / "model.onnx", 10)
    monkeypatch.setattr(images, "CHECK_BATCH_BYTES", 64 * 4 * 100)
    for max_batch_size, ran in ((2**31 - 1, 100), (100, 100), (8, 8)):
        config["max_batch_size"] = max_batch_size
        (model / "config.json").write_text(json.dumps(config))
        report = verify_model(model / "1" / "model.onnx", None, model)
        assert report.ok, report.problems
        assert report.batch_checked == ran
        assert report.to_dict()["batch_checked"] == ran


def test_a_version_linked_out_of_the_model_folder_is_refused(models_dir, tmp_path):
    """models/digits/2/model.onnx a link to a file elsewhere (or 2/ a link to a folder elsewhere)
    passed verify_model; the model server does not load it, so the run failed at its load."""
    model = tmp_path / "repo" / "digits"
    model.mkdir(parents=True)
    for name in ("config.json", "labels.txt"):
        (model / name).write_bytes((models_dir / "digits" / name).read_bytes())
    (model / "1").mkdir()
    (model / "1" / "model.onnx").write_bytes((models_dir / "digits" / "1" / "model.onnx").read_bytes())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.onnx").write_bytes((models_dir / "digits" / "2" / "model.onnx").read_bytes())
    (model / "2").mkdir()
    (model / "2" / "model.onnx").symlink_to(elsewhere / "model.onnx")
    (model / "3").symlink_to(elsewhere)
    for version in ("2", "3"):
        report = verify_model(model / version / "model.onnx", model / "1" / "model.onnx", model)
        assert report.problems == [
            f"{model / version / 'model.onnx'} is a link out of the model's folder {model}: not loaded from there"
        ]
    (model / "2" / "model.onnx").unlink()
    (model / "2" / "model.onnx").symlink_to(model / "1" / "model.onnx")  # a link inside it is loaded
    assert verify_model(model / "2" / "model.onnx", model / "1" / "model.onnx", model).ok


def test_a_candidate_of_19_digits_is_named_by_its_version(models_dir, tmp_path):
    """A version folder of 19 digits (the model server loads up to int64's largest) was read as no
    number, and the candidate's problems named it version 1."""
    top = str(2**63 - 1)
    model = tmp_path / "digits"
    model.mkdir()
    config = json.loads((models_dir / "digits" / "config.json").read_text())
    config["output"][0]["dims"] = [-1, 10]
    (model / "config.json").write_text(json.dumps(config))
    (model / "labels.txt").write_bytes((models_dir / "digits" / "labels.txt").read_bytes())
    _digits_like(model / top / "model.onnx", 11)
    report = verify_model(model / top / "model.onnx", None, model)
    assert [p for p in report.problems if f"version {top}: output 'probabilities' came out with shape" in p], (
        report.problems
    )
