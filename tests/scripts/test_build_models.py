"""The demo repository: real data, ordered versions, a validation split, idempotent builds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import onnx
from PIL import Image

from tests.conftest import ROOT


def weights(path) -> int:
    model = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_every_model_uses_ir_version_10(models_dir):
    for path in models_dir.glob("*/*/model.onnx"):
        assert onnx.load(str(path), load_external_data=False).ir_version == 10, path


def test_digits_versions_are_ordered_by_heldout_accuracy(models_dir):
    cfg = json.loads((models_dir / "digits" / "config.json").read_text())
    acc = {v: m["heldout_accuracy"] for v, m in cfg["metadata"]["versions"].items()}
    assert acc["2"] > acc["1"] > acc["3"]
    assert acc["1"] - acc["3"] > 0.005  # a clear breach of the 0.5 pp accuracy guard
    assert cfg["version_policy"] == {"specific": {"versions": [1]}}


def test_version_3_does_far_more_arithmetic(models_dir):
    # "Slower" without a timed assertion: v3 multiplies through ~100x more weights than v1.
    v1 = weights(models_dir / "digits" / "1" / "model.onnx")
    v3 = weights(models_dir / "digits" / "3" / "model.onnx")
    assert v3 > 100 * v1


def test_validation_split_is_png_with_labels(models_dir):
    folder = models_dir / "digits" / "validation"
    with (folder / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 450
    assert {int(r["label"]) for r in rows} == set(range(10))
    with Image.open(folder / rows[0]["file"]) as img:
        assert img.format == "PNG"
        assert img.mode == "L"
        assert img.size == (32, 32)


def test_resnet_bench_is_resnet18_sized(models_dir):
    n = weights(models_dir / "resnet_bench" / "1" / "model.onnx")
    assert 11_000_000 < n < 12_500_000  # ResNet-18: 11.7 M parameters, ~1.8 G MACs at 224x224


def test_build_is_idempotent(models_dir):
    before = {p: p.stat().st_mtime_ns for p in models_dir.rglob("*.onnx")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_models.py"), "--out", str(models_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert "up to date" in out.stdout
    assert before == {p: p.stat().st_mtime_ns for p in models_dir.rglob("*.onnx")}
