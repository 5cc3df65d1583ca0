"""rolloutctl: each command and its exit codes."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.support import TOKEN, samples, shadow_log
from vision_rollout.cli import main
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
        ["audit", "--shadow-log", "x", "--since", "999999999999d"],  # was an OverflowError's traceback
        ["audit", "--shadow-log", "x", "--since", "3661d"],
        ["audit", "--shadow-log", "x", "--since", "9" * 40 + "s"],
        ["gate", "--samples", "{csv}", "--set", "alfa=1"],
        ["gate", "--samples", "{csv}", "--looks", "3000"],  # was minutes of boundaries
        ["gate", "--samples", "{csv}", "--looks", "0"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, argv):
    path = tmp_path / "s.csv"
    samples(200).to_csv(path, index=False)
    argv = [a.replace("{csv}", str(path)) for a in argv]
    assert run(capsys, *argv)[0] == 2


def test_run_without_prometheus_must_say_it_runs_unguarded(tmp_path, capsys):
    """Without --prometheus a rollout ran with no P99 and no shadow-error guard, and nothing said
    so. It is refused now unless --no-hard-guards says it is meant; the model server (nothing
    listens on port 9) is never reached."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"stages": [50, 100]}))
    argv = ["run", "--spec", str(spec), "--url", "http://127.0.0.1:9", "--validation", str(tmp_path)]
    argv += ["--prediction-log", str(tmp_path / "log")]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "give --prometheus URL, or --no-hard-guards" in err
    assert run(capsys, *argv, "--prometheus", "http://127.0.0.1:9", "--no-hard-guards")[0] == 2


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


def test_verify_model_command(models_dir, tmp_path, capsys):
    digits = models_dir / "digits"
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not onnx")
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
