"""Validation replay: the same labelled images through both versions, over the serving path.

Each image goes once to the baseline and once to the candidate (versioned requests through
tritonclient, so the traffic policy and the mirror stay out of it), in alternating order;
the result is the gate's paired samples (``arm``, ``latency_ms``, ``error``, ``correct``,
``pair_id``), which feed the exact McNemar check and the validation accuracy-drop guard.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model_server.files import open_regular

MAX_IMAGE_BYTES = 64 << 20  # the model server's request body limit (--max-body-mb 64)
MAX_SET_BYTES = 1 << 30  # the images a set holds together: all of them are held in memory


def load_validation(folder: Path, limit: int | None = None) -> list[tuple[str, bytes, int]]:
    """A model's validation set, the one reader: ``labels.csv`` (``file``, ``label``) and the
    images it names, in its order: [(file name, image bytes, label)]. With ``limit``, that many
    rows drawn at random (always the same ones), not its first: a ``labels.csv`` ordered by
    class would give the first classes alone. A row naming a file outside the folder, or
    without an integer label, is refused with its line."""
    rows: list[tuple[str, int]] = []
    # (each opened as a regular file: a FIFO among them held the rollout in its open for ever)
    with io.TextIOWrapper(open_regular(folder / "labels.csv"), newline="") as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                name, label = row.get("file") or "", row.get("label") or ""
                if Path(name).name != name or name in {"", ".", ".."} or "\0" in name or not label.strip().isdigit():
                    raise ValueError(
                        f"{folder / 'labels.csv'} line {reader.line_num}: expected a file name in this folder "
                        f"and an integer label, got {name[:80]!r}, {label[:20]!r}"
                    )
                rows.append((name, int(label)))
        except csv.Error as exc:  # (a field over the csv module's limit)
            raise ValueError(f"{folder / 'labels.csv'} line {reader.line_num + 1}: {exc}") from None
    if limit is not None and limit < len(rows):
        drawn = np.sort(np.random.default_rng(0).choice(len(rows), size=max(limit, 0), replace=False))
        rows = [rows[i] for i in drawn]
    images, held = [], 0
    for name, label in rows:
        image = _read(folder / name)
        held += len(image)
        if held > MAX_SET_BYTES:
            raise ValueError(
                f"{folder}: its images hold over {MAX_SET_BYTES} bytes, more than a validation set may "
                "(the set is held in memory): name fewer in labels.csv"
            )
        images.append((name, image, label))
    return images


def _read(path: Path) -> bytes:
    """An image of the set, refused naming it (ValueError) when it holds more than
    MAX_IMAGE_BYTES or the server would refuse it unopened (``image_problem``: a decompression
    bomb's declared pixels): nothing more read, nothing decoded."""
    from model_server.preprocess import image_problem

    with open_regular(path) as f:
        data = f.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"{path}: over {MAX_IMAGE_BYTES} bytes, more than a validation image may hold")
    problem = image_problem(data)
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    return data


def replay(
    url: str,
    model: str,
    versions: dict[str, str],
    validation: Path,
    limit: int | None = None,
    output: str = "probabilities",
    input_name: str = "image",
    headers: dict[str, str] | None = None,
    request_prefix: str = "replay",
) -> pd.DataFrame:
    """``versions`` maps arm -> version, e.g. {"baseline": "1", "canary": "2"}; request ids are
    ``<request_prefix>-<arm>-<i>``."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url, connection_timeout=30, network_timeout=60)
    outputs = [httpclient.InferRequestedOutput(output, binary_data=True)]
    rows: list[dict[str, Any]] = []
    arms = list(versions.items())
    for i, (name, image, label) in enumerate(load_validation(validation, limit)):
        inp = httpclient.InferInput(input_name, [1], "BYTES")
        inp.set_data_from_numpy(np.array([image], dtype=object))
        for arm, version in arms if i % 2 == 0 else arms[::-1]:  # alternate who goes first
            start = time.perf_counter()
            try:
                result = client.infer(
                    model,
                    [inp],
                    model_version=version,
                    outputs=outputs,
                    headers={"X-Request-ID": f"{request_prefix}-{arm}-{i}", **(headers or {})},
                )
                correct: float = float(result.as_numpy(output)[0].argmax() == label)
                error = 0
            except InferenceServerException:
                correct, error = float("nan"), 1
            rows.append(
                {
                    "arm": arm,
                    "version": version,
                    "latency_ms": (time.perf_counter() - start) * 1000,
                    "error": error,
                    "correct": correct,
                    "pair_id": name,
                }
            )
    client.close()
    return pd.DataFrame(rows)
