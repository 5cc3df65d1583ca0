"""Validation replay over the serving path feeds the paired accuracy check and the drop guard."""

from __future__ import annotations

import json

import pytest

from tests.support import TOKEN
from vision_rollout.gates import GuardInputs, evaluate_gate
from vision_rollout.replay import accuracy_drop, load_validation, replay

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
    assert accuracy_drop(worse) == pytest.approx(cfg["1"]["heldout_accuracy"] - cfg["3"]["heldout_accuracy"], abs=1e-4)
    v_better = evaluate_gate(better, {"min_samples": 100}, guards=GuardInputs(validation_drop=accuracy_drop(better)))
    v_worse = evaluate_gate(worse, {"min_samples": 100}, guards=GuardInputs(validation_drop=accuracy_drop(worse)))
    assert next(c for c in v_better.checks if c.name == "accuracy_paired").decision == "pass"
    assert next(c for c in v_worse.checks if c.name == "accuracy_paired").decision == "fail"
    assert v_worse.decision == "fail"
    assert {"accuracy_paired", "guard_accuracy_drop"} <= {c.name for c in v_worse.failed}


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
