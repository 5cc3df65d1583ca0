"""The per-version cost estimate that decides inline runs and which shadow runs give way."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import json
import math
import platform
import random
import struct
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from model_server.config import load_config, parse_config
from model_server.errors import InferenceFailed, InvalidInput, failure_reason
from model_server.model import Fault, LoadedVersion, unreadable
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


def test_a_small_file_of_many_pixels_is_decoded_off_the_event_loop(version, digit_images):
    """Whether a request ran on the event loop went by its bytes: a 16 KB PNG of 4096x4096
    decoded there, holding every endpoint about 75 ms a request. Its pixels count too."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buf, format="PNG", optimize=True)
    big = [InferInput("image", "BYTES", (1,), np.array([buf.getvalue()], dtype=object))]
    assert big[0].nbytes <= 16 * 1024  # small enough by its bytes
    version.validate(big, None)
    assert big[0].pixels == 4096 * 4096
    small = one_image(digit_images)
    version.validate(small, None)
    assert 0 < small[0].pixels <= 64 * 64
    version._warmup_seconds = 0.0  # as cheap as a model gets
    assert version.runs_inline(small[0].nbytes, 1, small[0].pixels)
    assert not version.runs_inline(big[0].nbytes, 1, big[0].pixels)


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


def _table_lookup(tmp_path: Path, name: str, nodes: list, initializers: list) -> LoadedVersion:
    """Version 1 of model ``name`` (in ``tmp_path``), a graph of ``nodes`` and ``initializers``
    from ``x`` (FP32 [batch, 64]) to ``probabilities`` (FP32 [batch, 10]), loaded on the CPU."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])
    model = helper.make_model(
        helper.make_graph(nodes, name, [x], [y], initializers), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 10
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(model.SerializeToString())
    raw = {
        "max_batch_size": 8,
        "input": [{"name": "x", "datatype": "FP32", "dims": [-1, 64]}],
        "output": [{"name": "probabilities", "datatype": "FP32", "dims": [-1, 10]}],
    }
    return LoadedVersion(parse_config(name, raw), 1, tmp_path / "1" / "model.onnx", ["CPUExecutionProvider"])


def test_an_input_the_graph_itself_refuses_is_a_400_and_the_version_s_failure(tmp_path):
    """The server's checks pass (names, datatypes, shapes) and the graph refuses some data (a
    Gather index computed from it, out of range): Triton answers 400, and the failure is the
    version's (BACKEND), which the rollout's error check counts; it was the client's
    (INVALID_INPUT), so a candidate failing 10% of its requests so passed its stage."""
    table = helper.make_tensor(
        "table", TensorProto.FLOAT, [40, 10], np.tile(np.eye(10, dtype=np.float32), (4, 1)).ravel()
    )
    nodes = [
        helper.make_node("ArgMax", ["x"], ["index"], axis=1, keepdims=0),
        helper.make_node("Gather", ["table", "index"], ["probabilities"], axis=0),
    ]
    lv = _table_lookup(tmp_path, "gather", nodes, [table])
    try:
        good, bad = np.zeros((2, 1, 64), np.float32)
        good[0, 3] = bad[0, 50] = 1.0
        [probabilities], _, _ = asyncio.run(lv.infer([InferInput("x", "FP32", (1, 64), good)], ["probabilities"]))
        assert probabilities.argmax() == 3
        with pytest.raises(InvalidInput, match="model 'gather' rejected the input") as refused:
            asyncio.run(lv.infer([InferInput("x", "FP32", (1, 64), bad)], ["probabilities"]))
        assert refused.value.status == 400
        assert failure_reason(refused.value) == "BACKEND"
        assert failure_reason(InvalidInput("a client's malformed request")) == "INVALID_INPUT"
    finally:
        lv.close()


@pytest.mark.parametrize(
    ("output_dims", "loads"),
    [([-1, 10], True), ([4, 10], True), ([-1, -1], True), ([-1, 1000], False), ([10], False), ([-1, 10, 1], False)],
)
def test_a_config_shape_the_graph_contradicts_is_refused_at_load(models_dir, output_dims, loads):
    """A config whose output has another rank or another fixed size than the graph's loaded and
    answered metadata that lied (and label checks by its class count): refused at load, as Triton
    refuses it; a symbolic dimension of the graph takes any size the config fixes."""
    raw = json.loads((models_dir / "digits" / "config.json").read_text())
    raw["output"][0]["dims"] = output_dims
    cfg = parse_config("digits", raw)
    model = models_dir / "digits" / "1" / "model.onnx"
    if loads:
        LoadedVersion(cfg, 1, model, ["CPUExecutionProvider"]).close()
        return
    with pytest.raises(
        InvalidInput, match=r"output 'probabilities' has shape \[-1, 10\] in the graph, dims .* in config"
    ):
        LoadedVersion(cfg, 1, model, ["CPUExecutionProvider"])


def test_dims_written_as_triton_writes_them_are_refused_saying_what_dims_mean_here(models_dir):
    """Triton's dims leave the batch dimension out when max_batch_size > 0; here they are the
    whole shape. A config written for Triton ([10] for a [batch, 10] output) was refused naming
    only the two shapes: the refusal says what dims mean here and how to write them."""
    raw = json.loads((models_dir / "digits" / "config.json").read_text())
    raw["output"][0]["dims"] = [10]
    model = models_dir / "digits" / "1" / "model.onnx"
    with pytest.raises(
        InvalidInput,
        match=r"dims \[10\] in config\.json \(dims here are the whole shape, the batch dimension included, "
        r"unlike Triton's config\.pbtxt: write \[-1, 10\]\)",
    ):
        LoadedVersion(parse_config("digits", raw), 1, model, ["CPUExecutionProvider"])
    raw["max_batch_size"] = 0  # without batching, Triton's dims are the whole shape too: no hint
    with pytest.raises(InvalidInput, match=r"dims \[10\] in config\.json$"):
        LoadedVersion(parse_config("digits", raw), 1, model, ["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("fault", "field"),
    [
        ({"delay": {"ms": math.nan}}, "delay.ms"),
        ({"delay": {"ms": 5, "percent": math.nan}}, "delay.percent"),
        ({"abort": {"percent": math.nan}}, "abort.percent"),
        ({"delay": {"ms": math.inf}}, "delay.ms"),
        ({"abort": {"percent": -math.inf}}, "abort.percent"),
    ],
)
def test_a_fault_of_nan_or_infinity_is_refused(fault, field):
    """NaN passed every range check: the fault was set, its answer (JSON has no NaN) was a 500,
    and a delay of NaN ms failed every request of the version until it was cleared."""
    with pytest.raises(InvalidInput, match=rf"fault\.{field} must be a non-negative number, got -?(nan|inf)"):
        Fault.from_dict(fault)


def test_a_warm_up_that_fails_is_the_load_s_error_and_nothing_on_stderr(tmp_path, capfd):
    """A version whose warm-up inference failed had ONNX Runtime write its error to the server's
    stderr ("[E:onnxruntime:, sequential_executor.cc ...]"), outside Python logging and its
    masking, as requests' runs did before they were quieted: the warm-up's runs are quiet too,
    and the failure is the load's error, raised and logged by the server."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [40, 10], np.zeros(400, np.float32))
    past = helper.make_tensor("past", TensorProto.INT64, [], [100])
    nodes = [
        helper.make_node("ArgMax", ["x"], ["first"], axis=1, keepdims=0),
        helper.make_node("Add", ["first", "past"], ["index"]),  # out of the table's rows, whatever x is
        helper.make_node("Gather", ["table", "index"], ["probabilities"], axis=0),
    ]
    lv = _table_lookup(tmp_path, "broken", nodes, [table, past])
    try:
        capfd.readouterr()
        with pytest.raises(InvalidInput, match=r"model 'broken' version 1 failed its warm-up inference: .*Gather"):
            lv.warmup()
        assert "onnxruntime" not in capfd.readouterr().err
    finally:
        lv.close()


@pytest.mark.parametrize(
    ("num", "named"),
    [
        ("1e-400", "input 'NUM': BYTES element 0 is out of range; "),
        ("-1e-310", "input 'NUM': BYTES element 0 is out of range; "),
        ("1e400", "input 'NUM': BYTES element 0 is out of range; "),
        ("abc", "input 'NUM': BYTES element 0 is not a number; "),
        ("0x1p2000", "input 'NUM': BYTES element 0 is out of range; "),  # hex: strtod reads it
        ("-0x1p-1080", "input 'NUM': BYTES element 0 is out of range; "),
    ],
)
def test_a_string_a_float_cast_cannot_read_is_named_underflow_too(tmp_path, num, named):
    """ONNX Runtime's Cast reads a string as std::stod does: a number too small for a double
    (1e-400, or a subnormal it cannot hold exactly: 1e-310) fails as out of range, as one too
    large does. The 400 named the input for 1e400 but no input for 1e-400."""
    num_in = helper.make_tensor_value_info("NUM", TensorProto.STRING, ["batch", 1])
    num_out = helper.make_tensor_value_info("NUM_OUT", TensorProto.FLOAT, ["batch", 1])
    cast = helper.make_node("Cast", ["NUM"], ["NUM_OUT"], to=TensorProto.FLOAT)
    model = helper.make_model(
        helper.make_graph([cast], "cast", [num_in], [num_out]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 10
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(model.SerializeToString())
    raw = {
        "max_batch_size": 8,
        "input": [{"name": "NUM", "datatype": "BYTES", "dims": [-1, 1]}],
        "output": [{"name": "NUM_OUT", "datatype": "FP32", "dims": [-1, 1]}],
    }
    lv = LoadedVersion(parse_config("cast", raw), 1, tmp_path / "1" / "model.onnx", ["CPUExecutionProvider"])
    try:
        inputs = [InferInput("NUM", "BYTES", (1, 1), np.array([[num.encode()]], dtype=object))]
        with pytest.raises(InvalidInput) as refused:
            asyncio.run(lv.infer(inputs, ["NUM_OUT"]))
        assert refused.value.message.startswith(named), refused.value.message
    finally:
        lv.close()


@pytest.mark.parametrize(
    ("tag", "num", "named"),
    [
        ("7", "abc", "input 'NUM': BYTES element 0 is not a number; "),
        ("7", "99999999999999999999999", "input 'NUM': BYTES element 0 is out of range; "),
        ("7", "9" * 5000, "input 'NUM': BYTES element 0 is out of range; "),
        ("alice@example.com", "abc", "inputs ['NUM', 'TAG']: one holds a string that is not a number; "),
        ("alice@example.com", "99999999999999999999999", "inputs ['NUM', 'TAG']: one holds a string"),
    ],
)
def test_a_string_a_cast_cannot_read_blames_an_input_only_when_it_is_unambiguous(tmp_path, tag, num, named):
    """The 400 blamed the first string input with an element not starting like a number,
    whether a Cast read it or not: TAG passed through as text ("alice@example.com") was named
    for NUM's "abc", and for NUM's out-of-range integer. An input is named only when it alone
    holds an element the conversion fails on (out of range counted); else the candidates."""
    tag_in = helper.make_tensor_value_info("TAG", TensorProto.STRING, ["batch", 1])
    num_in = helper.make_tensor_value_info("NUM", TensorProto.STRING, ["batch", 1])
    tag_out = helper.make_tensor_value_info("TAG_OUT", TensorProto.STRING, ["batch", 1])
    num_out = helper.make_tensor_value_info("NUM_OUT", TensorProto.INT64, ["batch", 1])
    nodes = [
        helper.make_node("Identity", ["TAG"], ["TAG_OUT"]),
        helper.make_node("Cast", ["NUM"], ["NUM_OUT"], to=TensorProto.INT64),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "tagged", [tag_in, num_in], [tag_out, num_out]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 10
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(model.SerializeToString())
    raw = {
        "max_batch_size": 8,
        "input": [{"name": n, "datatype": "BYTES", "dims": [-1, 1]} for n in ("TAG", "NUM")],
        "output": [
            {"name": "TAG_OUT", "datatype": "BYTES", "dims": [-1, 1]},
            {"name": "NUM_OUT", "datatype": "INT64", "dims": [-1, 1]},
        ],
    }
    lv = LoadedVersion(parse_config("tagged", raw), 1, tmp_path / "1" / "model.onnx", ["CPUExecutionProvider"])
    try:
        inputs = [
            InferInput(name, "BYTES", (1, 1), np.array([[text.encode()]], dtype=object))
            for name, text in (("TAG", tag), ("NUM", num))
        ]
        with pytest.raises(InvalidInput) as refused:
            asyncio.run(lv.infer(inputs, ["TAG_OUT", "NUM_OUT"]))
        assert refused.value.message.startswith(named), refused.value.message
        assert "could not read a string input as a number" in refused.value.message
    finally:
        lv.close()


# 2**-1000 written exactly: a double holds it, a float (least subnormal 2**-149) does not.
TWO_TO_MINUS_1000 = format(Decimal(2.0**-1000), "E")


@pytest.mark.parametrize(
    ("conversion", "number", "fails"),
    [
        ("f", "3.4028234663852886e38", False),  # FLT_MAX
        ("f", "3.40282350001e38", False),  # past FLT_MAX, rounded to it: strtof reads it
        ("f", "340282356779733661637539395458142568447", False),  # just under the halfway point
        ("f", "340282356779733661637539395458142568448", True),  # halfway to 2**128: rounds to inf
        ("f", "1e39", True),
        ("f", "1e-45", True),  # a float's subnormal, not exactly: ERANGE
        ("f", TWO_TO_MINUS_1000, True),  # a double holds it exactly, a float does not
        ("f", format(Decimal(2.0**-149), "E"), False),  # a float's least subnormal, exactly
        ("d", "1.7976931348623158e308", False),
        ("d", "1.7976931348623159e308", True),
        ("d", TWO_TO_MINUS_1000, False),
        ("ld", "1e400", False),  # a long double's range is past a double's
        ("ld", "1e5000", True),
    ],
)
def test_a_float_conversion_s_range_is_the_one_of_its_type(conversion, number, fails):
    """Which string element a failed std::sto<f|d|ld> could not read: a float past FLT_MAX was
    called out of range from 3.4028235e38 on, though strtof rounds anything under the halfway
    point to 2**128 to FLT_MAX (the 400 then named an element it read, not the one it failed
    on), a float's underflow was judged by a double's subnormals, and std::stold's range was a
    double's (1e400 named)."""
    feeds = {"NUM": np.array([number, "abc"], dtype=object)}
    expected = "BYTES element 0 is out of range" if fails else "BYTES element 1 is not a number"
    assert unreadable(feeds, {"NUM"}, conversion) == f"input 'NUM': {expected}; "


@pytest.mark.parametrize(
    ("conversion", "number", "fails"),
    [
        ("d", "0x1p2000", True),  # strtod reads hex: 2**2000, past a double's range
        ("f", "0x1p200", True),
        ("d", "0x1p200", False),
        ("ld", "0x1p2000", False),
        ("ld", "0x1p16384", True),
        ("d", "  -0X1.FFFFFFFFFFFFF8P1023", True),  # halfway to 2**1024: rounds to inf
        ("d", "0x1.fffffffffffff7p1023", False),
        ("d", "0x1p-1074", False),  # a double's least subnormal, exactly
        ("d", "0x3p-1075", True),  # a subnormal it cannot hold exactly
        ("f", "0x1p-150", True),
        ("d", "0x1.ffffffffffffffp-1023", False),  # rounds to DBL_MIN
        ("d", "0x1p+99999999999999999999999", True),
        ("d", "0x0p99999999999999999999", False),
        ("d", "0x" + "0" * 5000 + "1p2000", True),
        ("d", "0x1p-" + "0" * 5000 + "1080", True),
        ("d", "0x10", False),
        ("d", "0x", False),  # strtod reads its "0"
        ("d", "0x1p", False),  # and "0x1" here
        ("ll", "0x1p2000", False),  # strtoll (base 10) reads its "0"
        # glibc 2.36 drops the first bit past the type's precision when it makes a tiny hex
        # float subnormal: where that bit (2**-152 here, 2**-1079 below) is its only part
        # under the least subnormal, strtod reads it with no ERANGE.
        ("f", "0x1000001p-152", False),
        ("f", "0x1000003p-152", True),  # 2**-151 too: inexact
        ("d", "0x8aaf09e26e2c04p-1079", False),
        ("d", "0x8aaf09e26e2c06p-1079", True),
    ],
)
def test_a_hex_float_is_judged_as_strtod_reads_it(conversion, number, fails):
    """strtod reads a hex float ("0x1p2000" is 2**2000): the judge read only decimal numbers,
    so "0x1p2000" was its "0", in range, and the 400 named the element after it (or no input),
    not the one std::stod failed on."""
    feeds = {"NUM": np.array([number, "abc"], dtype=object)}
    expected = "BYTES element 0 is out of range" if fails else "BYTES element 1 is not a number"
    assert unreadable(feeds, {"NUM"}, conversion) == f"input 'NUM': {expected}; "


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _glibc_fails(conversion: str, text: str) -> bool:
    """Whether this machine's glibc strtof, strtod or strtold (what std::sto<f|d|ld> calls) sets
    ERANGE on ``text``: std::sto<conversion> throws out_of_range there."""
    libc = _libc()
    read = {"f": (libc.strtof, ctypes.c_float), "d": (libc.strtod, ctypes.c_double)}
    function, result = read.get(conversion, (libc.strtold, ctypes.c_longdouble))
    function.restype, function.argtypes = result, [ctypes.c_char_p, ctypes.c_void_p]
    ctypes.set_errno(0)
    function(text.encode(), None)
    return ctypes.get_errno() != 0


def _tiny_decimals(conversion: str, count: int, seed: int) -> list[str]:
    """Decimal numbers under the least normal, written exactly: a subnormal of the type (a
    multiple of its least, 2**-k, in any binade under 2**low) with nothing more, or with one bit
    or two under it (the first bit past its precision, 2**(high - bits), 2**-(k+1), 2**-(k+2),
    lower), as digits and an exponent or as a fraction of leading zeros."""
    bits, low = {"f": (24, -126), "d": (53, -1022), "ld": (64, -16382)}[conversion]
    k = bits - 1 - low
    rng = random.Random(seed)
    numbers = []
    for _ in range(count):
        length = rng.randrange(1, bits)
        steps = rng.randrange(2 ** (length - 1), 2**length)
        high = length - 1 - k  # 2**high <= the subnormal < 2**(high + 1)
        below = rng.randrange(1, 20)
        extra = rng.choice(
            [(), (high - bits,), (-k - 1,), (-k - 2,), (high - bits, high - bits - below), (-k - 1 - below,)]
        )
        scale = k + 2 + 20 + bits  # every bit above is a multiple of 2**-scale
        value = steps * 2 ** (scale - k) + sum(2 ** (scale + e) for e in extra)
        digits = Decimal(value * 5**scale)  # value * 2**-scale is digits * 10**-scale
        sign = rng.choice(["", "-"])
        if rng.random() < 0.5:
            numbers.append(f"{sign}{digits}e-{scale}")
        else:
            written = str(digits).rjust(scale + 1, "0")
            numbers.append(f"{sign}{written[:-scale]}.{written[-scale:]}")
    return numbers


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the server image's C library is glibc")
@pytest.mark.parametrize(("conversion", "count"), [("f", 20_000), ("d", 10_000), ("ld", 100)])
def test_a_tiny_decimal_is_judged_as_glibc_reads_it(conversion, count):
    """A decimal number under the least normal in the top subnormal binade whose only part under
    the least subnormal is the first bit past its type's precision ("...e-1076" for std::stod)
    was judged out of range, where glibc reads it with no ERANGE (its round bit is written over
    when the number is shifted to a subnormal, as in the hex path): the 400 named it, not the
    element the conversion failed on. Generated numbers are judged as this machine's glibc reads them."""
    wrong = [
        number
        for number in _tiny_decimals(conversion, count, seed=36)
        if (unreadable({"NUM": np.array([number], dtype=object)}, {"NUM"}, conversion) != "")
        != _glibc_fails(conversion, number)
    ]
    mismatches = len(wrong)
    assert mismatches == 0, f"judged otherwise than glibc, such as {[f'{Decimal(n):.12e}' for n in wrong[:3]]}"


@pytest.mark.parametrize("number", ["\u0131nf", "\u0130NF", "-\u0131nfinity", "+\u0130nf"])
def test_a_dotless_or_dotted_i_is_not_read_as_inf_or_nan(number):
    """Under re.IGNORECASE a str pattern's "i" matched "\u0131" and "\u0130" (Turkish dotless and
    dotted I), so the judge read "\u0131nf" as inf, in range, where strtod reads no number: the
    400 named the element after it, not the one std::stod failed on."""
    feeds = {"NUM": np.array([number, "abc"], dtype=object)}
    assert unreadable(feeds, {"NUM"}, "d") == "input 'NUM': BYTES element 0 is not a number; "


@pytest.mark.parametrize(
    ("conversion", "number", "fails"),
    [
        ("d", "1e-" + "0" * 5000 + "310", True),  # 1e-310: a double's subnormal, inexactly
        ("d", "1e+" + "0" * 5000 + "300", False),
        ("d", "1e" + "0" * 5000 + "400", True),
        ("i", "0" * 5000 + "5", False),
        ("i", "-" + "0" * 5000 + "5", False),
        ("ll", "0" * 5000 + "9" * 20, True),
    ],
)
def test_a_number_written_with_thousands_of_leading_zeros_is_judged(conversion, number, fails):
    """int() reads at most 4300 digits: an exponent ("1e-000...0310") or an integer
    ("000...05") written with more leading zeros raised ValueError, a 500 naming nothing. Its
    leading zeros are no digits of its value."""
    feeds = {"NUM": np.array([number, "abc"], dtype=object)}
    expected = "BYTES element 0 is out of range" if fails else "BYTES element 1 is not a number"
    assert unreadable(feeds, {"NUM"}, conversion) == f"input 'NUM': {expected}; "


def _rounds_up_to_least_normal_from(conversion: str) -> Decimal:
    """Halfway between a type's least normal and the number of its precision under it, exactly:
    from there (round to nearest, ties to even) a number rounds to its least normal."""
    bits, low = {"f": (24, -126), "d": (53, -1022), "ld": (64, -16382)}[conversion]
    with localcontext(prec=20_000):
        return Decimal(2) ** low - Decimal(2) ** (low - bits - 1)


@pytest.mark.parametrize(
    ("conversion", "number", "fails"),
    [
        ("f", "1.17549435e-38", False),  # strtof rounds it to FLT_MIN: np.float32("1.17549435e-38") too
        ("f", "-1.17549435e-38", False),
        ("f", "1.1754943e-38", True),  # under the halfway point, inexactly: ERANGE
        ("d", "2.22507385850720138e-308", False),  # rounds to DBL_MIN
        ("d", "2.2250738585072011e-308", True),
    ]
    + [(c, "halfway", False) for c in ("f", "d", "ld")]
    + [(c, "under halfway", True) for c in ("f", "d", "ld")],
)
def test_a_number_that_rounds_to_a_float_s_least_normal_is_in_range(conversion, number, fails):
    """Tininess was judged before rounding: a number under a type's least normal that rounds to
    it (a normal number: strtof reads "1.17549435e-38" as FLT_MIN, without ERANGE) was called out
    of range, and the 400 named it rather than the element the conversion failed on."""
    if number.endswith("halfway"):
        with localcontext(prec=20_000):
            edge = _rounds_up_to_least_normal_from(conversion)
            number = format(edge - Decimal("1e-20000") if number == "under halfway" else edge, "f")
    feeds = {"NUM": np.array([number, "abc"], dtype=object)}
    expected = "BYTES element 0 is out of range" if fails else "BYTES element 1 is not a number"
    assert unreadable(feeds, {"NUM"}, conversion) == f"input 'NUM': {expected}; "


@pytest.mark.parametrize("conversion", ["f", "d", "ld"])
def test_a_long_number_under_a_float_s_least_normal_is_judged_in_linear_time(conversion):
    """Whether a number under a type's least normal is one of its subnormals exactly was read
    as a Fraction, whose cost grows as the square of the digits: 400,000 digits took 15 s (this
    test's 2,000,000, minutes: its bound is the pytest timeout). A subnormal of a type whose
    least is 2**-k has k decimals at most: a number with more is none, at once; one with
    trailing zeros is still read whole."""
    n = 2_000_000
    exponent = {"f": 40, "d": 310, "ld": 4940}[conversion] + n
    feeds = {"NUM": np.array(["1" * n + f"e-{exponent}", "abc"], dtype=object)}
    assert unreadable(feeds, {"NUM"}, conversion) == "input 'NUM': BYTES element 0 is out of range; "
    with localcontext(prec=20_000):  # (2**-k exactly: k digits)
        step = format(Decimal(2) ** -{"f": 149, "d": 1074, "ld": 16445}[conversion], "f") + "0" * n
    feeds = {"NUM": np.array([step, "abc"], dtype=object)}
    assert unreadable(feeds, {"NUM"}, conversion) == "input 'NUM': BYTES element 1 is not a number; "
