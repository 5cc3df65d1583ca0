"""config.json parsing and Triton's version policies."""

from __future__ import annotations

import json
import os

import pytest

from model_server import config
from model_server.config import load_config, parse_config
from model_server.errors import InvalidInput
from model_server.model import is_out_of_memory

BASE = {
    "input": [{"name": "x", "datatype": "FP32", "dims": [-1, 4]}],
    "output": [{"name": "y", "datatype": "FP32", "dims": [-1, 2]}],
}


@pytest.mark.parametrize(
    ("policy", "available", "expected"),
    [
        (None, [1, 2, 3], [3]),
        ({"latest": {"num_versions": 2}}, [3, 1, 2], [2, 3]),
        ({"all": {}}, [1, 5], [1, 5]),
        ({"specific": {"versions": [2, 1]}}, [1, 2, 3], [1, 2]),
    ],
)
def test_version_policies(policy, available, expected):
    raw = {**BASE, **({"version_policy": policy} if policy else {})}
    assert parse_config("m", raw).select_versions(available) == expected


def test_specific_policy_with_a_missing_version_names_it():
    cfg = parse_config("m", {**BASE, "version_policy": {"specific": {"versions": [4]}}})
    with pytest.raises(InvalidInput, match=r"version\(s\) \[4\] that are not in the repository"):
        cfg.select_versions([1, 2])


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"name": "other"}, "does not match the folder name"),
        ({"platform": "tensorflow_savedmodel"}, "not supported"),
        ({"input": []}, "non-empty list"),
        ({"input": [{"name": "x", "datatype": "FLOAT", "dims": [1]}]}, "datatype"),
        # A list or an object raised TypeError (unhashable): a load, a start and a feedback call 500.
        ({"input": [{"name": "x", "datatype": ["FP32"], "dims": [1]}]}, r"input\[0\]\.datatype: \['FP32'\] is not"),
        ({"output": [{"name": "y", "datatype": {}, "dims": [1]}]}, r"output\[0\]\.datatype: \{\} is not"),
        ({"input": [{"name": "x", "datatype": "FP32", "dims": [0]}]}, "dims"),
        ({"input": [{"name": "x", "datatype": "FP32", "dims": [True]}]}, "dims"),  # was [1], shown as [true]
        (
            {
                "input": [{"name": "x", "datatype": "BYTES", "dims": [1]}],
                "preprocess": {"kind": "image", "size": [True, 28], "onnx_input": "x"},
            },
            "preprocess.size",
        ),
        (
            {
                "input": [{"name": "x", "datatype": "BYTES", "dims": [1]}],
                "preprocess": {"kind": "image", "size": [28, 28], "onnx_input": "x", "invert": "false"},
            },
            "preprocess.invert: must be true or false",
        ),
        (
            {
                "input": [{"name": "x", "datatype": "BYTES", "dims": [1]}],
                "preprocess": {"kind": "image", "size": [28, 28], "onnx_input": "x", "exif_orientaton": False},
            },
            r"unsupported field\(s\) \['exif_orientaton'\]",
        ),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"instance_count": 0}, "instance_count"),
        ({"version_policy": {"latest": {"num_versions": 0}}}, "num_versions"),
        ({"version_policy": {"newest": {}}}, "unknown or malformed"),
        ({"preprocess": {"kind": "audio"}}, "only {'kind': 'image'"),
        ({"output": [{"name": "y", "datatype": "FP32", "dims": [2], "label_filename": "../x"}]}, "label_filename"),
        ({"output": [{"name": "y", "datatype": "FP32", "dims": [2], "label_filename": ".."}]}, "label_filename"),
        ({"output": [{"name": "y", "datatype": "FP32", "dims": [2], "label_filename": 3}]}, "label_filename"),
        ({"output": [{"name": "y", "datatype": "FP32", "dims": [2], "label_filename": "a\0b"}]}, "label_filename"),
        ({"input": [{"name": "x", "datatype": "FP32", "dims": [2], "label_filename": "a"}]}, "only an output has"),
    ],
)
def test_invalid_configs_name_the_field(change, needle):
    with pytest.raises(InvalidInput, match=needle):
        parse_config("m", {**BASE, **change})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"instance_group": [{"count": 4, "kind": "KIND_CPU"}]}, "instance_group"),
        ({"sequence_batching": {}}, "sequence_batching"),
        ({"input": [{"name": "x", "datatype": "FP32", "dims": [-1, 4], "reshape": {"shape": [4]}}]}, "reshape"),
        ({"version_policy": {"latest": {"num_versions": 2, "num_version": 3}}}, "num_version"),
        ({"version_policy": {"specific": {"versions": [1], "version": [2]}}}, "version"),
        (
            {
                "input": [{"name": "x", "datatype": "BYTES", "dims": [-1]}],
                "preprocess": {"kind": "image", "size": [8, 8], "onnx_input": "x", "invrt": True},
            },
            "invrt",
        ),
    ],
)
def test_a_field_the_server_does_not_implement_is_refused_by_name_not_ignored(change, field):
    """As Triton refuses a field its config does not have: ignored, a Triton instance_group or
    a misspelt invert loaded and served otherwise than the config said."""
    with pytest.raises(InvalidInput, match=f"unsupported field\\(s\\) \\['{field}'\\]"):
        parse_config("m", {**BASE, **change})
    assert parse_config("m", {**BASE, "name": "m", "platform": "onnxruntime_onnx", "metadata": {"any": 1}})


def test_numbers_past_triton_s_field_widths_are_refused_at_load_not_failed_per_request():
    """A default_timeout_microseconds past a float's range loaded, and then every request to the
    model failed with a 500 (an OverflowError dividing it). Numbers wider than Triton's
    model_config.proto fields are no config Triton reads: refused by field, at load."""
    batched = {**BASE, "max_batch_size": 8}
    for change, message in [
        ({"dynamic_batching": {"default_queue_policy": {"default_timeout_microseconds": 10**400}}}, "uint64"),
        ({"dynamic_batching": {"default_queue_policy": {"default_timeout_microseconds": 2**64}}}, "uint64"),
        ({"dynamic_batching": {"default_queue_policy": {"max_queue_size": 2**32}}}, "max_queue_size: 4294967296 is"),
        ({"dynamic_batching": {"priority_levels": 1e300, "default_priority_level": 1}}, "priority_levels: 1e"),
        ({"max_batch_size": 2**31}, "max_batch_size: 2147483648 is over 2147483647, the largest Triton's int32"),
        ({"instance_count": "99999999999"}, "instance_count: 99999999999 is over 2147483647"),
        ({"instance_count": 1_000_000_000}, "instance_count: 1000000000 is over 32, the most instances"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            parse_config("m", {**batched, **change})
    widest = {"default_timeout_microseconds": 2**64 - 1, "max_queue_size": 2**32 - 1}
    cfg = parse_config("m", {**batched, "dynamic_batching": {"default_queue_policy": widest}})
    assert cfg.dynamic_batching is not None
    assert cfg.dynamic_batching.default_timeout_microseconds / 1e6 > 0  # a float: no overflow


def test_64_bit_numbers_written_as_text_are_read_to_their_field_s_range():
    """Protobuf's JSON writes 64-bit integers as text of up to 20 digits: such text of 19 or 20
    digits was refused as "must be an integer >= 0"; each field takes its own range and names it
    when a number is past it."""
    batched = {**BASE, "max_batch_size": 8}
    widest = {"default_timeout_microseconds": str(2**64 - 1), "max_queue_size": str(2**32 - 1)}
    per_level = {str(2**64 - 1): {"max_queue_size": 1}}  # (not read without priority levels)
    cfg = parse_config(
        "m",
        {
            **batched,
            "dynamic_batching": {"default_queue_policy": widest, "priority_queue_policy": per_level},
            "version_policy": {"specific": {"versions": [str(2**63 - 1), "1"]}},
        },
    )
    assert cfg.dynamic_batching is not None
    assert cfg.dynamic_batching.default_timeout_microseconds == 2**64 - 1
    assert cfg.version_policy == {"specific": {"versions": [1, 2**63 - 1]}}
    for change, message in [
        ({"dynamic_batching": {"default_queue_policy": {"default_timeout_microseconds": str(2**64)}}}, "uint64"),
        ({"dynamic_batching": {"default_queue_policy": {"default_timeout_microseconds": "9" * 60}}}, "uint64"),
        ({"dynamic_batching": {"default_queue_policy": {"default_timeout_microseconds": "-1"}}}, ">= 0, got '-1'"),
        ({"dynamic_batching": {"priority_queue_policy": {str(2**64): {}}}}, r"in range \[0, 18446744073709551615\]"),
        (
            {"version_policy": {"specific": {"versions": [str(2**63)]}}},
            "versions: a version is over 9223372036854775807",
        ),
        ({"version_policy": {"latest": {"num_versions": str(2**32)}}}, "num_versions: 4294967296 is over 4294967295"),
        ({"instance_count": "99999999999999999999"}, "instance_count: 99999999999999999999 is over 2147483647"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            parse_config("m", {**batched, **change})


def test_a_preprocess_size_no_image_may_have_is_refused_before_its_warm_up_allocates_it():
    """A size over the pixels an image may have failed the load only once the warm-up had made a
    blank image of it (W x H bytes: a typo of 100000 x 100000 took 10 GB, the whole server's)."""
    image = {"input": [{"name": "x", "datatype": "BYTES", "dims": [-1]}], "max_batch_size": 8}
    pre = {"kind": "image", "size": [4097, 4096], "onnx_input": "x"}
    with pytest.raises(InvalidInput, match=r"preprocess\.size: 4097x4096 is over the limit of 16777216 pixels"):
        parse_config("m", {**BASE, **image, "preprocess": pre})
    assert parse_config("m", {**BASE, **image, "preprocess": {**pre, "size": [4096, 4096]}}).preprocess


def test_dims_no_request_could_match_are_refused():
    """A config's dims were any number of any size: past a request's 32 dimensions or Triton's
    int64 no request can match them (a preprocessed input's dims meet no graph at load)."""
    batched = {**BASE, "max_batch_size": 8}
    for dims in ([-1] + [1] * 32, [-1, 2**63], [-1, 10**4000]):
        with pytest.raises(InvalidInput, match=r"input\[0\]\.dims: has at most 32 dimensions"):
            parse_config("m", {**batched, "input": [{"name": "x", "datatype": "FP32", "dims": dims}]})
    assert parse_config("m", {**batched, "input": [{"name": "x", "datatype": "FP32", "dims": [-1] + [1] * 31}]})


@pytest.mark.parametrize(
    ("message", "oom"),
    [
        ("CUDA failure 2: out of memory ; GPU=0 ; hostname=x ; file=cuda_allocator.cc", True),
        (
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 1",
            True,
        ),
        ("CUDNN failure 4: CUDNN_STATUS_ALLOC_FAILED", True),
        ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input", False),
    ],
)
def test_out_of_memory_messages_are_recognised(message, oom):
    assert is_out_of_memory(message) is oom


def test_an_output_s_labels_are_read_from_its_folder_bounded_and_confined(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    output = {"name": "y", "datatype": "FP32", "dims": [3], "label_filename": "labels.txt"}
    (model / "config.json").write_text(json.dumps({**BASE, "output": [output]}))
    with pytest.raises(InvalidInput, match=r"label_filename 'labels\.txt': cannot read it"):
        load_config(model)
    (model / "labels.txt").write_text("cat\ndog\n\u00e9t\u00e9\n")
    assert load_config(model).labels == {"y": ("cat", "dog", "\u00e9t\u00e9")}
    (model / "labels.txt").write_text("a\x0cb\nc\u2028d\r\n\ne")  # lines end at "\n" only, as in Triton
    assert load_config(model).labels == {"y": ("a\x0cb", "c\u2028d\r", "", "e")}
    (model / "labels.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidInput, match="is not UTF-8 text"):
        load_config(model)
    monkeypatch.setattr(config, "MAX_LABELS_BYTES", 8)
    (model / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    with pytest.raises(InvalidInput, match="is over"):
        load_config(model)
    (model / "labels.txt").unlink()
    (tmp_path / "outside.txt").write_text("x\n")
    (model / "labels.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(InvalidInput, match="is a link out of the model's folder"):
        load_config(model)
    (model / "labels.txt").unlink()
    (model / "labels.txt").symlink_to(model / "labels.txt")  # a loop
    with pytest.raises(InvalidInput, match="cannot read it"):
        load_config(model)
    (model / "labels.txt").unlink()
    long_name = {**output, "label_filename": "l" * 300}  # the file system refuses the name
    (model / "config.json").write_text(json.dumps({**BASE, "output": [long_name]}))
    with pytest.raises(InvalidInput, match="cannot read it: File name too long"):
        load_config(model)
    (model / "config.json").write_text(json.dumps({**BASE, "output": [output]}))
    os.mkfifo(model / "labels.txt")  # would wait for a writer
    with pytest.raises(InvalidInput, match="is not a regular file"):
        load_config(model)
    os.rename(model / "config.json", model / "c")
    os.mkfifo(model / "config.json")
    with pytest.raises(InvalidInput, match=r"config\.json is not a regular file"):
        load_config(model)


DEEP = ("[" * 100_000, '{"a": ' * 100_000)  # JSON nested deeper than Python's parser goes


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ('"metadata": {"heldout_accuracy": NaN}', "NaN is not a JSON value"),
        ('"metadata": {"heldout_accuracy": -Infinity}', "-Infinity is not a JSON value"),
        ('"preprocess": {"kind": "image", "size": [8, 8], "onnx_input": "x", "scale": 1e400}', "preprocess.scale"),
        ('"preprocess": {"kind": "image", "size": [8, 8], "onnx_input": "x", "scale": Infinity}', "Infinity is not"),
    ],
)
def test_a_config_with_a_number_json_has_not_is_refused(tmp_path, change, needle):
    """Python's json took NaN and Infinity in config.json, which JSON has not: a preprocess.scale
    of Infinity (or 1e400, read as one) loaded and made every answer NaN, and a NaN in metadata
    made the model's config and metadata answers 500s."""
    (tmp_path / "m").mkdir()
    image = '"input": [{"name": "x", "datatype": "BYTES", "dims": [-1]}], "max_batch_size": 8'
    output = '"output": [{"name": "y", "datatype": "FP32", "dims": [-1, 2]}]'
    (tmp_path / "m" / "config.json").write_text(f"{{{image}, {output}, {change}}}")
    with pytest.raises(InvalidInput, match=needle):
        load_config(tmp_path / "m")


def test_a_config_nested_too_deep_or_too_large_is_the_model_s_load_error(tmp_path, monkeypatch):
    """config.json nested 100,000 deep raised RecursionError, which nothing caught: the server's
    start ended (with --no-exit-on-error too, and every other model with it), and a load or a
    feedback call answered 500."""
    model = tmp_path / "m"
    model.mkdir()
    for deep in DEEP:
        (model / "config.json").write_text(deep)
        with pytest.raises(InvalidInput, match=r"model 'm': cannot read m/config\.json: JSON nested too deep"):
            load_config(model)
    (model / "config.json").write_text(json.dumps(BASE))
    assert load_config(model).inputs[0].name == "x"
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 64)
    with pytest.raises(InvalidInput, match=r"model 'm': m/config\.json is over 0 MiB"):
        load_config(model)


def test_state_and_key_files_nested_too_deep_are_refused_by_name(tmp_path, caplog):
    """The persisted load state, a persisted traffic policy, the traffic file and the masking key
    file raised RecursionError where a malformed file is refused, logged or counted."""
    from model_server.errors import MaskingUnavailable, PolicyError
    from model_server.masking import KeyRing
    from model_server.repository import ModelRepository
    from model_server.traffic import PolicyStore, read_traffic_file

    for deep in DEEP:
        for folder in ("repo", "loads", "traffic"):
            (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / "loads" / "m.json").write_text(deep)
        assert ModelRepository(tmp_path / "repo", [], tmp_path / "loads").persisted("m") == (True, None)
        assert "ignoring persisted load state" in caplog.text
        (tmp_path / "traffic" / "m.json").write_text(deep)
        assert PolicyStore(tmp_path / "traffic", lambda *_: None).restore() == []
        assert "its persisted traffic policy could not be read back" in caplog.text
        assert "traffic/m.json); its routed requests are refused" in caplog.text  # (the log names the file)
        with pytest.raises(PolicyError, match="JSON nested too deep"):
            read_traffic_file(tmp_path / "traffic" / "m.json")
        with pytest.raises(MaskingUnavailable, match="is not valid: JSON nested too deep"):
            KeyRing(tmp_path / "traffic" / "m.json").key_for(None)
        assert "recursion" not in caplog.text  # (the logged reasons too, in the server's words)


def test_a_load_override_in_triton_s_form_reads_as_protobuf_s_json_does(tmp_path):
    """Triton's model configuration as a load sends it: 64-bit integers as text, enums in any
    case, fields left out kept; the GPU kind where the server runs on one."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**BASE, "max_batch_size": 8}))
    mine = load_config(tmp_path / "m").as_triton("KIND_GPU", (0,))
    assert [t["dims"] for t in mine["input"] + mine["output"]] == [[4], [2]]
    sent = {
        "name": "m",
        "input": [{"name": "x", "data_type": "type_fp32", "dims": ["4"]}],
        "output": [{"name": "y", "dims": [2]}],
        "instance_group": [{"kind": "kind_gpu", "count": "3", "gpus": [0]}],
        "dynamic_batching": {"max_queue_delay_microseconds": "100", "priority_queue_policy": {}},
    }
    cfg = load_config(tmp_path / "m", sent, ("KIND_GPU", (0,)))
    assert cfg.instance_count == 3
    assert cfg.dynamic_batching is not None
    assert cfg.dynamic_batching.preferred_batch_size == (8,)
    with pytest.raises(InvalidInput, match=r'instance_group\[0\]\.kind: "kind_gpu" is not KIND_CPU'):
        load_config(tmp_path / "m", sent)
    with pytest.raises(InvalidInput, match=r"unsupported key\(s\) \['input'\]: not the model's own .*batch dimension"):
        load_config(tmp_path / "m", {**sent, "input": [{"name": "x", "dims": [-1, 4]}]}, ("KIND_GPU", (0,)))
    for name in (["x"], {"x": 1}, None):  # (a name that is no string was a TypeError, a 500)
        with pytest.raises(InvalidInput, match=r"unsupported key\(s\) \['input'\]"):
            load_config(tmp_path / "m", {"input": [{"name": name}]})


def test_a_whole_triton_config_without_dynamic_batching_turns_it_off(tmp_path):
    """Triton's load takes a whole model configuration: one without dynamic_batching (a model
    analyzer's variant, get_model_config's answer with it deleted) does not batch; a partial
    override leaves config.json's batching as it is."""
    (tmp_path / "m").mkdir()
    batching = {"preferred_batch_size": [4], "max_queue_delay_microseconds": 100}
    (tmp_path / "m" / "config.json").write_text(json.dumps({**BASE, "max_batch_size": 8, "dynamic_batching": batching}))
    whole = load_config(tmp_path / "m").as_triton()
    assert load_config(tmp_path / "m", whole).dynamic_batching is not None
    del whole["dynamic_batching"]
    assert load_config(tmp_path / "m", whole).dynamic_batching is None
    assert load_config(tmp_path / "m", {"max_batch_size": 16}).dynamic_batching is not None
    assert load_config(tmp_path / "m", {"instance_group": [{"count": 2}]}).dynamic_batching is not None


@pytest.mark.parametrize(
    ("action", "read"),
    [("REJECT", "REJECT"), ("reject", "REJECT"), ("Delay", "DELAY"), ("delay", "DELAY")],
)
def test_a_queue_policy_s_timeout_action_is_read_as_protobuf_reads_an_enum(action, read):
    """Triton reads a config's enum names in any case."""
    raw = {**BASE, "max_batch_size": 8, "dynamic_batching": {"default_queue_policy": {"timeout_action": action}}}
    batching = parse_config("m", raw).dynamic_batching
    assert batching is not None
    assert batching.timeout_action == read
    for bad in ("DROP", "REJECTS", True):
        with pytest.raises(InvalidInput, match="must be REJECT or DELAY"):
            parse_config("m", {**raw, "dynamic_batching": {"default_queue_policy": {"timeout_action": bad}}})


def test_an_integer_past_python_s_digit_limit_is_refused_in_words_naming_where(tmp_path):
    """A JSON integer over 4,300 digits was refused with Python's own words ("use
    sys.set_int_max_str_digits() to increase the limit"), advice to no client: the request body
    and a config.json (a load's parameters.config too) now say what is wrong and the limit."""
    from model_server.protocol import parse_json

    big = "7" * 5000
    with pytest.raises(InvalidInput) as refused:
        parse_json(f'{{"inputs": [{{"data": [1, {big}]}}]}}'.encode())
    message = refused.value.message
    assert message == "malformed JSON in request body: an integer of 5000 digits: at most 4300 digits are read"
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**BASE, "max_batch_size": 1}).replace("1}", big + "}", 1))
    with pytest.raises(InvalidInput, match=r"cannot read m/config\.json: an integer of 5000 digits") as refused:
        load_config(model)
    assert "sys." not in refused.value.message
