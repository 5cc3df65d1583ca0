"""Validation replay over the serving path feeds the paired accuracy check and the drop guard."""

from __future__ import annotations

import json

import pytest

from tests.support import TOKEN
from vision_rollout.engine import replay_drop
from vision_rollout.gates import GuardInputs, evaluate_gate
from vision_rollout.replay import load_validation, replay

pytestmark = pytest.mark.integration


def test_replay_pairs_versions_and_the_gate_judges_them(server_factory, repo_copy, models_dir, tmp_path):
    s = server_factory(repo_copy, "--state-dir", str(tmp_path / "state"), token=TOKEN)
    s.load_versions("digits", 1, 2, 3)
    validation = models_dir / "digits" / "validation"
    cfg = json.loads((models_dir / "digits" / "config.json").read_text())["metadata"]["versions"]
    better = replay(s.url, "digits", {"baseline": "1", "canary": "2"}, validation)
    worse = replay(s.url, "digits", {"baseline": "1", "canary": "3"}, validation)
    assert len(better) == 900
    assert better["error"].sum() == 0
    # The same images through the server reproduce the build-time held-out accuracies.
    assert better[better["arm"] == "canary"]["correct"].mean() == pytest.approx(cfg["2"]["heldout_accuracy"], abs=1e-4)
    assert replay_drop(worse) == pytest.approx(cfg["1"]["heldout_accuracy"] - cfg["3"]["heldout_accuracy"], abs=1e-4)
    v_better = evaluate_gate(better, {"min_samples": 100}, guards=GuardInputs(validation_drop=replay_drop(better)))
    v_worse = evaluate_gate(worse, {"min_samples": 100}, guards=GuardInputs(validation_drop=replay_drop(worse)))
    assert next(c for c in v_better.checks if c.name == "accuracy_paired").decision == "pass"
    assert next(c for c in v_worse.checks if c.name == "accuracy_paired").decision == "fail"
    assert v_worse.decision == "fail"
    assert {"accuracy_paired", "guard_accuracy_drop"} <= {c.name for c in v_worse.failed}
    # A candidate that answers no image (every request an error) has no pair to compare: no drop yet.
    failing = worse.assign(correct=worse["correct"].where(worse["arm"] == "baseline"))
    assert replay_drop(failing) is None


def test_the_validation_set_is_read_in_its_order_and_bounded(tmp_path):

    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / "b.png").write_bytes(b"B")
    (tmp_path / "labels.csv").write_text("file,label\nb.png,7\na.png,3\n")
    assert load_validation(tmp_path) == [("b.png", b"B", 7), ("a.png", b"A", 3)]
    assert load_validation(tmp_path, limit=2) == load_validation(tmp_path)
    # A limit draws its rows at random, the same each time, in the file's order: a labels.csv
    # ordered by class gave its first classes alone.
    names = [f"{k:03d}.png" for k in range(200)]
    for name in names:
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{n},{k // 20}\n" for k, n in enumerate(names)))
    drawn = load_validation(tmp_path, limit=50)
    assert drawn == load_validation(tmp_path, limit=50)
    assert [row[0] for row in drawn] == sorted(row[0] for row in drawn)
    assert len({label for _, _, label in drawn}) >= 8  # (the first 50 rows hold classes 0 to 2)
    for row in ("../secret,1", "a.png,seven", "/etc/passwd,1", ",2"):
        (tmp_path / "labels.csv").write_text(f"file,label\na.png,3\n{row}\n")
        with pytest.raises(ValueError, match=r"labels\.csv line 3: expected a file name in this folder"):
            load_validation(tmp_path)


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR chunk declaring ``width`` x ``height`` grayscale pixels: what
    a decompression bomb shows before its (tiny, highly compressed) data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_an_image_of_the_set_too_large_to_serve_is_refused_naming_it(tmp_path, monkeypatch):
    """A validation image declaring 40,000 x 40,000 pixels (a decompression bomb: a few bytes
    that decode to 1.6 GB), or holding more bytes than the server takes in a request, was read
    whole into the rollout's memory and sent on (to a replay, the masking probe, the golden
    inference); it is refused now, naming the file, before anything decodes it."""
    from model_server.config import MAX_PIXELS
    from vision_rollout import replay as replay_module

    (tmp_path / "ok.png").write_bytes(png_header(28, 28))
    (tmp_path / "bomb.png").write_bytes(png_header(40_000, 40_000))
    (tmp_path / "labels.csv").write_text("file,label\nok.png,1\nbomb.png,2\n")
    with pytest.raises(ValueError, match=rf"bomb\.png: image of 40000x40000 pixels is over the limit of {MAX_PIXELS}"):
        load_validation(tmp_path)
    (tmp_path / "big.png").write_bytes(png_header(28, 28) + b"\0" * 2000)
    (tmp_path / "labels.csv").write_text("file,label\nok.png,1\nbig.png,2\n")
    monkeypatch.setattr(replay_module, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(ValueError, match=r"big\.png: over 1000 bytes"):
        load_validation(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nok.png,1\n")
    assert [name for name, _, _ in load_validation(tmp_path)] == ["ok.png"]


def test_verify_model_names_the_validation_image_too_large_to_serve(models_dir, tmp_path):
    import shutil

    from vision_rollout.images import verify_model

    digits = models_dir / "digits"
    validation = tmp_path / "validation"
    shutil.copytree(digits / "validation", validation)
    rows = (validation / "labels.csv").read_text().splitlines()[:11]  # (fewer than the 64 it draws)
    (validation / "labels.csv").write_text("\n".join(rows) + "\n")
    first = rows[1].split(",")[0]
    (validation / first).write_bytes(png_header(40_000, 40_000))
    report = verify_model(digits / "2" / "model.onnx", None, digits, validation)
    assert not report.ok
    assert f"{first}: image of 40000x40000 pixels is over the limit" in report.problems[0]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"file,label\na.png,1\n" + b"x" * 200_000 + b",2\n", "field larger than field limit"),
        (b"file,label\na.png,1\nb\0.png,2\n", "expected a file name in this folder"),
    ],
)
def test_a_labels_file_the_csv_reader_refuses_is_named_with_its_line(tmp_path, content, why):
    """A labels.csv with a field over the csv module's limit (128 KiB) raised csv.Error, which
    no caller takes (they take OSError and ValueError): verify-model and the DAG's tasks failed
    with a traceback naming no file; a file name holding a NUL failed as 'embedded null byte'.
    Each is a ValueError naming the file and its line now."""
    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / "labels.csv").write_bytes(content)
    with pytest.raises(ValueError, match=rf"labels\.csv line 3: .*{why}"):
        load_validation(tmp_path)


def test_a_validation_set_too_large_to_hold_is_refused_naming_it(tmp_path, monkeypatch):
    """The whole set is held in memory (the engine indexes every image by its hash): a folder
    of gigabytes (a training set named as the validation set) took the worker's memory until it
    was killed, saying nothing. It is refused at MAX_SET_BYTES now, naming the folder."""
    from vision_rollout import replay as replay_module

    for k in range(5):
        (tmp_path / f"{k}.png").write_bytes(png_header(28, 28) + bytes(200))
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{k}.png,{k}\n" for k in range(5)))
    monkeypatch.setattr(replay_module, "MAX_SET_BYTES", 800, raising=False)
    with pytest.raises(ValueError, match=rf"{tmp_path}: its images hold over 800 bytes"):
        load_validation(tmp_path)
    assert len(load_validation(tmp_path, limit=3)) == 3
