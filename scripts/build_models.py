"""Build the demo model repository: ``models/<model>/<version>/model.onnx`` + config.json.

Idempotent and seeded: a stamp of this file's hash skips a rebuild that would write the same.

- ``digits``: classifiers trained on scikit-learn's bundled 8x8 digits (no download). Version 1
  is the baseline (a 256-unit MLP trained on half of the training split), version 2 is its
  retrain on all of it (the same network, so the same cost, and more accurate: the common
  rollout), version 3 is worse and slower (an under-trained wide MLP: a rollback candidate). The held-out split is saved as PNG
  files plus labels.csv under ``models/digits/validation/``; the accuracy of every version is
  measured on those PNGs through the server's own preprocessing.
- ``resnet_bench``: a ResNet-18 (random He-initialised weights, FP32, 3x224x224), about
  1.8 G multiply-adds per image, for performance work.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime 1.31 refuses onnx 1.23's default IR 14
OPSET = 17
SEED = 0
DIGIT_VERSIONS = {
    1: "256-unit MLP on half the training data (baseline)",
    2: "256-unit MLP on all of it (better, same cost)",
    3: "under-trained 3x2048 MLP (worse and slower)",
}


def save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    onnx.save(model, tmp)
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# -- digits -------------------------------------------------------------------------------------


def digits_estimators() -> dict:
    """version -> (estimator, share of the training split it learns from)."""
    from sklearn.neural_network import MLPClassifier

    return {
        1: (MLPClassifier(hidden_layer_sizes=(256,), max_iter=1000, random_state=SEED), 0.5),
        2: (MLPClassifier(hidden_layer_sizes=(256,), max_iter=1000, random_state=SEED), 1.0),
        3: (
            MLPClassifier(
                hidden_layer_sizes=(2048, 2048, 2048),
                max_iter=1,
                learning_rate_init=1e-4,
                random_state=SEED,
            ),
            1.0,
        ),
    }


def to_png(features: np.ndarray, path: Path, upscale: int = 4) -> None:
    """An 8x8 sample (values 0..16, ink bright) -> a 32x32 grayscale PNG."""
    from PIL import Image

    pixels = np.rint(features.reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8)
    img = Image.fromarray(pixels, mode="L").resize((8 * upscale, 8 * upscale), Image.Resampling.NEAREST)
    img.save(path, format="PNG")


def build_digits(out: Path) -> dict:
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split

    from model_server.config import parse_config
    from model_server.preprocess import decode_image

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y, random_state=SEED)
    model_dir = out / "digits"
    val_dir = model_dir / "validation"
    if val_dir.exists():
        shutil.rmtree(val_dir)
    val_dir.mkdir(parents=True)
    with (val_dir / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for i, (features, label) in enumerate(zip(X_te, y_te, strict=True)):
            name = f"{i:04d}.png"
            to_png(features, val_dir / name)
            w.writerow([name, int(label)])

    config: dict[str, Any] = {
        "name": "digits",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 64,
        "input": [{"name": "image", "datatype": "BYTES", "dims": [-1]}],
        # Triton's label_filename: the classification extension answers "value:index:label".
        "output": [{"name": "probabilities", "datatype": "FP32", "dims": [-1, 10], "label_filename": "labels.txt"}],
        "preprocess": {
            "kind": "image",
            "size": [8, 8],
            "scale": 16.0,
            "onnx_input": "input",
            "flatten": True,
        },
        "version_policy": {"specific": {"versions": [1]}},
        "instance_count": 1,
        "metadata": {
            "description": "8x8 handwritten digits (scikit-learn load_digits); input: PNG/JPEG of a "
            "bright digit on a dark background, any size",
            "validation": {"folder": "validation", "labels": "validation/labels.csv", "n": len(y_te)},
            "versions": {},
        },
    }
    parsed = parse_config("digits", config)
    assert parsed.preprocess is not None
    # The validation PNGs through the server's own preprocessing: what the server will see.
    features = np.stack(
        [
            decode_image((val_dir / f"{i:04d}.png").read_bytes(), parsed.preprocess, "validation").reshape(64)
            for i in range(len(y_te))
        ]
    )
    for version, (est, share) in digits_estimators().items():
        n = int(len(y_tr) * share)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X_tr[:n], y_tr[:n])
        onx = to_onnx(
            est,
            initial_types=[("input", FloatTensorType([None, 64]))],
            options={id(est): {"zipmap": False}},
            target_opset={"": OPSET, "ai.onnx.ml": 3},
        )
        path = model_dir / str(version) / "model.onnx"
        save(onx, path)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs = sess.run(["probabilities"], {"input": features})[0]
        accuracy = float((probs.argmax(axis=1) == y_te).mean())
        start = time.perf_counter()
        for row in features[:200]:
            sess.run(["probabilities"], {"input": row[None, :]})
        per_image_ms = (time.perf_counter() - start) / 200 * 1000
        config["metadata"]["versions"][str(version)] = {
            "algorithm": DIGIT_VERSIONS[version],
            "heldout_accuracy": round(accuracy, 4),
            "heldout_n": len(y_te),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        print(
            f"digits v{version}: {DIGIT_VERSIONS[version]}: held-out accuracy {accuracy:.4f}, "
            f"{per_image_ms:.3f} ms/image (raw ORT, batch 1)"
        )
    (model_dir / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    write_json(model_dir / "config.json", config)
    acc = {v: m["heldout_accuracy"] for v, m in config["metadata"]["versions"].items()}
    if not acc["2"] > acc["1"] > acc["3"]:
        raise SystemExit(f"digits accuracies not ordered v2 > v1 > v3: {acc}")
    return acc


# -- resnet_bench -------------------------------------------------------------------------------


class GraphBuilder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool = True) -> str:
        w = self.name("w")
        b = self.name("b")
        fan_in = cin * k * k
        self.inits.append(
            numpy_helper.from_array(
                (self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32), w
            )
        )
        self.inits.append(numpy_helper.from_array(np.zeros(cout, dtype=np.float32), b))
        y = self.name("conv")
        self.nodes.append(
            helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        )
        return self.relu(y) if relu else y

    def relu(self, x: str) -> str:
        y = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [y]))
        return y

    def block(self, x: str, cin: int, cout: int, stride: int) -> str:
        h = self.conv(x, cin, cout, 3, stride)
        h = self.conv(h, cout, cout, 3, 1, relu=False)
        shortcut = x if stride == 1 and cin == cout else self.conv(x, cin, cout, 1, stride, relu=False)
        y = self.name("add")
        self.nodes.append(helper.make_node("Add", [h, shortcut], [y]))
        return self.relu(y)


def build_resnet(out: Path) -> None:
    g = GraphBuilder(SEED)
    x = g.conv("input", 3, 64, 7, 2)
    pooled = g.name("pool")
    g.nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = pooled, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        x = g.block(x, cin, cout, stride)
        x = g.block(x, cout, cout, 1)
        cin = cout
    gap = g.name("gap")
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], [gap]))
    flat = g.name("flat")
    g.nodes.append(helper.make_node("Flatten", [gap], [flat], axis=1))
    g.inits.append(
        numpy_helper.from_array((g.rng.standard_normal((512, 1000)) * np.sqrt(1.0 / 512)).astype(np.float32), "fc_w")
    )
    g.inits.append(numpy_helper.from_array(np.zeros(1000, dtype=np.float32), "fc_b"))
    g.nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"]))
    graph = helper.make_graph(
        g.nodes,
        "resnet18_bench",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="build_models")
    model_dir = out / "resnet_bench"
    save(model, model_dir / "1" / "model.onnx")
    write_json(
        model_dir / "config.json",
        {
            "name": "resnet_bench",
            "platform": "onnxruntime_onnx",
            "max_batch_size": 16,
            "input": [{"name": "input", "datatype": "FP32", "dims": [-1, 3, 224, 224]}],
            "output": [{"name": "logits", "datatype": "FP32", "dims": [-1, 1000]}],
            "version_policy": {"latest": {"num_versions": 1}},
            "instance_count": 1,
            "metadata": {"description": "ResNet-18 with random weights, about 1.8 G multiply-adds per image"},
        },
    )
    print(f"resnet_bench v1: ResNet-18, {sum(t.ByteSize() for t in g.inits) / 1e6:.0f} MB of weights")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models"))
    p.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    args = p.parse_args(argv)
    stamp = args.out / ".build-stamp"
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    if not args.force and stamp.is_file() and stamp.read_text().strip() == digest:
        print(f"{args.out}: up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    build_digits(args.out)
    build_resnet(args.out)
    stamp.write_text(digest + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
