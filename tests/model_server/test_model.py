"""The per-version cost estimate that decides inline runs and which shadow runs give way."""

from __future__ import annotations

import asyncio
import math
import struct

import numpy as np
import pytest

from model_server.config import load_config
from model_server.errors import InferenceFailed, InvalidInput
from model_server.model import Fault, LoadedVersion
from model_server.protocol import InferInput


@pytest.fixture
def version(models_dir):
    cfg = load_config(models_dir / "digits")
    lv = LoadedVersion(cfg, 2, models_dir / "digits" / "2" / "model.onnx", ["CPUExecutionProvider"])
    yield lv
    lv.close()


def one_image(digit_images) -> list[InferInput]:
    data = np.array([digit_images[0][0]], dtype=object)
    return [InferInput("image", "BYTES", (1,), data)]


def test_the_warm_up_gives_a_first_estimate_and_the_first_real_run_replaces_it(version, digit_images):
    inputs = one_image(digit_images)
    assert version.predicted_seconds(inputs) == math.inf
    version.warmup()
    assert 0 < version.predicted_seconds(inputs) < math.inf
    version._warmup_seconds = 1e6  # as if the warm-up had been very slow (first-run allocations)
    version._run(inputs, ["probabilities"], 0.0)
    assert version.predicted_seconds(inputs) < 1.0  # replaced, not averaged with the warm-up


def test_a_run_aborted_by_an_injected_fault_still_counts(version, digit_images):
    """Else a version failing every request keeps an infinite estimate, and each of its shadow
    copies counts as preemptible forever: some would be dropped instead of counted as errors."""
    inputs = one_image(digit_images)
    version.fault = Fault.from_dict({"abort": {"percent": 100}})
    with pytest.raises(InferenceFailed, match="injected fault"):
        asyncio.run(version.infer(inputs, ["probabilities"]))
    assert version.predicted_seconds(inputs) < 1.0


def test_shadow_runs_leave_the_estimate_and_the_primary_instance_alone(version, digit_images):
    """The candidate runs every mirrored copy: if those runs, slower on a contended machine,
    moved its estimate past the inline budget or held its one instance, its own primaries
    would measure slower than the baseline's and the live latency arm would be biased."""
    import threading

    import onnxruntime as ort

    inputs = one_image(digit_images)
    version.warmup()
    version._run(inputs, ["probabilities"], 0.0)
    before = version.predicted_seconds(inputs)
    version.fault = Fault.from_dict({"delay": {"ms": 50}})
    threads: list[str] = []
    real_run = version._run

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_run(*args, **kwargs)

    version._run = spy
    asyncio.run(version.infer(inputs, ["probabilities"], shadow_run=ort.RunOptions()))
    assert threads == ["digits-v2-shadow_0"]
    assert version.predicted_seconds(inputs) == before  # a 50 ms shadow run taught it nothing
    version.fault = None
    asyncio.run(version.infer(inputs, ["probabilities"]))
    assert version.predicted_seconds(inputs) != before  # a primary run does


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"delay": {"fixedDelay": "50ms"}}, "fault.delay: unknown field(s) ['fixedDelay']"),
        ({"abort": {"percent": 10, "httpStatus": 503}}, "fault.abort: unknown field(s) ['httpStatus']"),
        ({"delay": {"ms": -1}}, "fault.delay.ms must be a non-negative number"),
    ],
)
def test_a_fault_with_a_field_it_does_not_know_is_refused_by_name(raw, named):
    """A misspelt field silently read as "no fault" would make a fault-injection test pass vacuously."""
    from model_server.errors import InvalidInput

    with pytest.raises(InvalidInput) as err:
        Fault.from_dict(raw)
    assert named in err.value.message


def test_a_signature_that_passed_before_still_has_its_images_and_outputs_checked(version, digit_images):
    """Validation remembers the names, datatypes and shapes that passed, never the data: a
    request of the same signature with too many pixels, or asking an unknown output, is refused."""
    inputs = one_image(digit_images)
    assert version.validate(inputs, None) == ["probabilities"]
    assert version.validate(inputs, {"probabilities": True}) == ["probabilities"]
    assert len(version._valid) == 2
    # A PNG header claiming a huge image (nothing decoded: the header is read alone).
    huge = bytearray(digit_images[0][0])
    huge[16:24] = struct.pack(">II", 40_000, 40_000)
    with pytest.raises(InvalidInput, match="pixels per request"):
        version.validate([InferInput("image", "BYTES", (1,), np.array([bytes(huge)], dtype=object))], None)
    with pytest.raises(InvalidInput, match="unknown output"):
        version.validate(inputs, {"logits": True})
    with pytest.raises(InvalidInput, match="batch size 0"):
        version.validate([InferInput("image", "BYTES", (0,), np.array([], dtype=object))], None)
    assert len(version._valid) == 2  # what failed is not remembered
