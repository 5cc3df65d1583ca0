"""The v2 request/response codec, without a server."""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
import tritonclient.http as httpclient

from model_server import protocol
from model_server.errors import InvalidInput
from model_server.protocol import decode_infer_request, encode_infer_response, serialize_bytes_tensor


def tritonclient_body(inputs, outputs=None) -> tuple[bytes, str | None]:
    """The exact bytes tritonclient would send."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    return body, (str(json_size) if json_size is not None else None)


@pytest.mark.parametrize(
    ("datatype", "dtype"),
    [
        ("FP32", np.float32),
        ("INT64", np.int64),
        ("UINT8", np.uint8),
        ("FP16", np.float16),
        ("FP64", np.float64),
        ("BOOL", np.bool_),
    ],
)
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_tensors_round_trip(datatype, dtype, binary):
    x = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    inp = httpclient.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    req = decode_infer_request(*tritonclient_body([inp]))
    assert req.inputs[0].shape == (2, 3, 4)
    np.testing.assert_array_equal(req.inputs[0].data, x)


def test_bytes_tensor_binary_and_requested_outputs():
    items = np.array([b"\x89PNG\x00\xff", b"", b"abc"], dtype=object)
    inp = httpclient.InferInput("image", [3], "BYTES")
    inp.set_data_from_numpy(items)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True)
    req = decode_infer_request(*tritonclient_body([inp], [out]))
    assert list(req.inputs[0].data) == list(items)
    assert req.outputs == {"probabilities": True}


def test_a_json_part_seen_before_is_cut_from_each_request_s_own_bytes():
    """The second request with the same JSON part takes its layout, never the first's tensors,
    dicts or errors; a binary part of another length is parsed (and refused) as any."""
    protocol.LAYOUTS.clear()
    x = httpclient.InferInput("x", [2, 3], "FP32")
    s = httpclient.InferInput("s", [2], "BYTES")
    out = [httpclient.InferRequestedOutput("y", binary_data=True)]
    bodies = []
    for k in range(3):
        x.set_data_from_numpy(np.full((2, 3), k, np.float32), binary_data=True)
        s.set_data_from_numpy(np.array([b"ab", b"c%d" % k], dtype=object), binary_data=True)
        bodies.append(tritonclient_body([x, s], out))
    assert bodies[0][1] == bodies[1][1]
    assert bodies[0][0][: int(bodies[0][1])] == bodies[1][0][: int(bodies[1][1])]
    requests = [decode_infer_request(*b) for b in bodies]
    assert len(protocol.LAYOUTS) == 1  # the JSON part kept once
    for k, req in enumerate(requests):
        np.testing.assert_array_equal(req.inputs[0].data, np.full((2, 3), k, np.float32))
        assert list(req.inputs[1].data) == [b"ab", b"c%d" % k]
        assert req.outputs == {"y": True}
    requests[0].outputs["z"] = False  # the first request's dicts (the full parse), then a kept one's
    requests[0].parameters["p"] = 1
    requests[1].parameters["q"] = 2
    for req in [requests[2], decode_infer_request(*bodies[0])]:
        assert req.outputs == {"y": True}
        assert req.parameters == {}
    body, length = bodies[0]
    with pytest.raises(InvalidInput, match="runs past the end of the binary data"):
        decode_infer_request(body[:-1], length)
    with pytest.raises(InvalidInput, match="1 bytes of binary data are not claimed"):
        decode_infer_request(body + b"\0", length)
    # The same length, the BYTES element's length lying: refused as the first parse refuses it.
    json_len = int(length)
    broken = body[:json_len] + body[json_len:].replace(struct.pack("<I", 2) + b"c0", struct.pack("<I", 9) + b"c0")
    with pytest.raises(InvalidInput, match="claims 9 bytes past the end"):
        decode_infer_request(broken, length)


def test_layouts_are_bounded_and_keep_nothing_a_request_could_share_or_never_repeat():
    protocol.LAYOUTS.clear()
    for i in range(protocol.MAX_LAYOUTS + 10):
        x = httpclient.InferInput(f"x{i}", [1], "FP32")
        x.set_data_from_numpy(np.zeros(1, np.float32), binary_data=True)
        assert decode_infer_request(*tritonclient_body([x])).inputs[0].name == f"x{i}"
        assert 0 < len(protocol.LAYOUTS) <= protocol.MAX_LAYOUTS
    protocol.LAYOUTS.clear()
    x = httpclient.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.zeros(1, np.float32), binary_data=True)
    body, length = httpclient.InferenceServerClient.generate_request_body([x], request_id="r1")
    assert decode_infer_request(body, str(length)).id == "r1"  # an id: the next request's differs
    body, length = httpclient.InferenceServerClient.generate_request_body([x], parameters={"p": {"a": [1]}})
    with pytest.raises(InvalidInput, match="parameter 'p' has invalid type"):  # (it would be shared)
        decode_infer_request(body, str(length))
    x.set_data_from_numpy(np.zeros(1, np.float32), binary_data=False)  # a tensor in the JSON
    decode_infer_request(*tritonclient_body([x]))
    assert not protocol.LAYOUTS
    x.set_data_from_numpy(np.zeros(1, np.float32), binary_data=True)
    body, length = httpclient.InferenceServerClient.generate_request_body([x], parameters={"tenant_tier": 2})
    for _ in range(2):
        assert decode_infer_request(body, str(length)).parameters["tenant_tier"] == 2
    assert len(protocol.LAYOUTS) == 1


def test_an_empty_outputs_list_asks_for_every_output_as_triton_answers_it():
    x = httpclient.InferInput("x", [1], "FP32")
    x.set_data_from_numpy(np.zeros(1, np.float32), binary_data=True)
    body, length = tritonclient_body([x])
    head = json.loads(body[: int(length)])
    head["outputs"] = []
    part = json.dumps(head).encode()
    assert decode_infer_request(part + body[int(length) :], str(len(part))).outputs is None
    assert encode_infer_response("digits", "2", []) == (
        b'{"model_name":"digits","model_version":"2","outputs":[]}',
        None,
    )


@pytest.mark.parametrize("name", ["probabilities", 'a "quoted" \\ name', "\u00e9t\u00e9", "nul\0in a name", "\0"])
def test_a_response_s_json_part_kept_as_text_carries_each_response_s_own_id_and_token(name):
    """The JSON part of binary responses is kept as text around the id and the token: every
    response still reads as if encoded whole, with its own values, whatever the names hold; a
    BYTES output's size, which its values set, is a hole too (class results vary in size)."""
    protocol.HEADS.clear()
    scores = np.arange(6, dtype=np.float32).reshape(2, 3)
    for k, rid in enumerate([None, "r-1", 'r "2" \u2603', None]):
        labels = np.array([b"a" * (k + 1), b"bc"], dtype=object)
        token = f"token-{k}" if k != 3 else f"tok\u00e9n-{k}"
        body, length = encode_infer_response(
            "digits",
            "2",
            [(name, "FP32", scores, True), ("labels", "BYTES", labels, True)],
            rid,
            {"feedback_token": token},
        )
        head = json.loads(body[:length])
        assert head.get("id") == rid
        assert head["parameters"] == {"feedback_token": token}
        assert [o["name"] for o in head["outputs"]] == [name, "labels"]
        assert head["outputs"][0] == {
            "name": name,
            "datatype": "FP32",
            "shape": [2, 3],
            "parameters": {"binary_data_size": 24},
        }
        assert body[length : length + 24] == scores.tobytes()
        assert head["outputs"][1]["parameters"] == {"binary_data_size": len(serialize_bytes_tensor(labels))}
        assert body[length + 24 :] == serialize_bytes_tensor(labels)
    assert len(protocol.HEADS) == (0 if name == protocol.HOLE else 2)  # with an id and without


def test_response_decodes_in_tritonclient():
    probs = np.random.default_rng(1).random((3, 10)).astype(np.float32)
    labels = np.array([b"seven", b"two", b"one"], dtype=object)
    for binary in (True, False):
        body, header_len = encode_infer_response(
            "digits",
            "2",
            [("probabilities", "FP32", probs, binary), ("labels", "BYTES", labels, binary)],
            "id-9",
        )
        result = httpclient.InferResult.from_response_body(body, header_length=header_len)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-6)
        decoded = [x if isinstance(x, bytes) else x.encode() for x in result.as_numpy("labels")]
        assert decoded == list(labels)  # tritonclient gives JSON BYTES back as str
        assert result.get_response()["id"] == "id-9"
        assert (header_len is not None) == binary


def test_bytes_tensor_framing_errors():
    blob = serialize_bytes_tensor(np.array([b"abc"], dtype=object)) + b"\0"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "i",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    with pytest.raises(InvalidInput, match="ends before element 1 of 2"):
        decode_infer_request(header + blob, str(len(header)))
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "i",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    with pytest.raises(InvalidInput, match="8 bytes cannot hold 3 BYTES elements"):
        decode_infer_request(header + blob, str(len(header)))
    lying = struct.pack("<I", 1000) + b"abc"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "i",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(lying)},
                }
            ]
        }
    ).encode()
    with pytest.raises(InvalidInput, match="claims 1000 bytes past the end"):
        decode_infer_request(header + lying, str(len(header)))


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (
            {"name": "x", "datatype": "INT8", "shape": [1], "data": [1000]},
            r"element 0 \(1000\) is past the range of INT8",
        ),
        (
            {"name": "x", "datatype": "UINT64", "shape": [2], "data": [1, 2**64]},
            rf"element 1 \({2**64}\) is past the range of UINT64 \(0 to {2**64 - 1}\)",
        ),
        ({"name": "x", "datatype": "UINT8", "shape": [2, 2], "data": [[1, 2], [3, -1]]}, r"element 3 \(-1\)"),
        ({"name": "x", "datatype": "INT32", "shape": [1], "data": [-(2**31) - 1]}, r"\(-2147483648 to 2147483647\)"),
        ({"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}, "must be integers"),
        ({"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}, "must be numbers"),
        ({"name": "x", "datatype": "FP32", "shape": [1], "data": [True]}, "must be numbers"),
        ({"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}, "true/false"),
        (
            {
                "name": "x",
                "datatype": "BYTES",
                "shape": [1],
                "data": ["%%"],
                "parameters": {"content_type": "base64"},
            },
            "not valid base64",
        ),
        ({"name": "x", "datatype": "FP32", "shape": [1]}, "needs 'data'"),
        ({"name": "x", "datatype": "FP32", "shape": [True], "data": [1.0]}, "non-negative integers"),
        ({"datatype": "FP32", "shape": [1], "data": [1.0]}, "needs a 'name'"),
    ],
)
def test_json_tensor_errors_name_the_problem(raw, needle):
    with pytest.raises(InvalidInput, match=needle):
        decode_infer_request(json.dumps({"inputs": [raw]}).encode(), None)


@pytest.mark.parametrize(
    ("datatype", "number", "needle"),
    [
        ("FP64", "1e400", "element 1 (1e400) is past the range of FP64"),
        ("FP64", "-1E+400", "element 1 (-1E+400) is past the range of FP64"),
        ("FP32", "1e400", "element 1 (1e400) is past the range of FP32"),
        ("FP32", "1e39", "element 1 (1e+39) is past the range of FP32"),
        ("FP16", "70000", "element 1 (70000) is past the range of FP16"),
        # From the halfway point past the largest value on, IEEE rounds to inf.
        ("FP32", "3.4028235677973366e38", "element 1 (3.4028235677973366e+38) is past the range of FP32"),
        ("FP16", "65520", "element 1 (65520) is past the range of FP16"),
        ("FP64", "1.7976931348623159e308", "element 1 (1.7976931348623159e308) is past the range of FP64"),
    ],
)
def test_a_json_number_past_its_datatype_s_range_is_refused_by_name(datatype, number, needle):
    """1e400 in a JSON FP64 (or FP32) input read as inf, 1e39 as FP32 and 70000 as FP16 too:
    the model ran on numbers the client never sent. Each is a 400 naming the input, the element
    and the number as written, as a number past an integer datatype's range is (an infinite one
    was named without its number)."""
    raw = f'{{"name": "x", "datatype": "{datatype}", "shape": [3], "data": [1.5, {number}, 0]}}'
    body = f'{{"inputs": [{raw}]}}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message.startswith("input 'x': "), refused.value.message
    assert needle in refused.value.message, refused.value.message


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("[1.5, 0x10, 0]", "input 'x': element 1 (0x10) is a hex literal"),
        ("[[1.5], [-0X1F], [0]]", "input 'x': element 1 (-0X1F) is a hex literal"),
        ("[1.5, 2, 0x1.8p3]", "input 'x': element 2 (0x1.8p3) is a hex literal"),
        ('["0x10", 0x10, "0x10"]', "input 'x': element 1 (0x10) is a hex literal"),
        # The first fault in the body is named, as json.loads names its first.
        ("[0x10, 01, 0x20]", "input 'x': element 0 (0x10) is a hex literal"),
    ],
)
def test_a_hex_literal_in_json_data_is_refused_by_name(data, needle):
    """A bare 0x10 in an input's data (no JSON number: JSON has no hex literals) was a 400
    "malformed JSON ... (char N)", where any other bad number names the input and the element:
    it names them too, and the number as written."""
    body = (
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [0.5]},'
        f' {{"name": "x", "datatype": "FP32", "shape": [3], "data": {data}}}]}}'
    )
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message.startswith(needle), refused.value.message
    assert "write it in decimal" in refused.value.message, refused.value.message


@pytest.mark.parametrize(
    ("datatype", "data", "advice"),
    [
        # Each advises only a form its datatype takes: no decimal number is a BOOL or a BYTES
        # element, and 0x1.4 is 1.25, no integer written in any base.
        ("BOOL", "[true, 0x1, false]", "BOOL data must be true/false"),
        ("BYTES", '["a", 0x1F, "b"]', "BYTES data must be JSON strings"),
        ("INT64", "[1, 0x1.4, 0]", "INT64 data must be integers"),
        ("UINT8", "[1, 0x1p-1, 0]", "UINT8 data must be integers"),
        ("INT32", "[1, -0x1F, 0]", "write it in decimal"),
        ("INT16", "[1, 0x1.8p3, 0]", "write it in decimal"),  # (12)
        (
            "INT64",
            "[1, 0x" + "f" * 300 + ", 0]",
            "it is past the range of INT64 (-9223372036854775808 to 9223372036854775807)",
        ),
        ("FP32", "[1, 0x1.4, 0]", "write it in decimal"),
        ("FP64", "[1, 0x1F, 0]", "write it in decimal"),
    ],
)
def test_a_hex_literal_is_advised_only_in_a_form_its_datatype_takes(datatype, data, advice):
    """A hex literal was told "write it in decimal" whatever its input's datatype: a BOOL input
    (true/false only), a BYTES one (strings) and 0x1.4 in an INT one (a decimal 1.25 is no
    integer either) were advised a form their datatype refuses."""
    body = f'{{"inputs": [{{"name": "x", "datatype": "{datatype}", "shape": [3], "data": {data}}}]}}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    message = refused.value.message
    assert message.startswith("input 'x': element 1 (" + data.split(", ")[1][:20]), message
    assert message.endswith(") is a hex literal, which JSON has not: " + advice), message


def test_a_hex_literal_before_its_input_s_datatype_is_advised_in_no_form():
    """Where the input's datatype comes after its data, no form is known to be taken: none is said."""
    body = '{"inputs": [{"name": "x", "shape": [2], "data": [1, 0x10], "datatype": "BOOL"}]}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message == "input 'x': element 1 (0x10) is a hex literal, which JSON has not"


HEX_OUTSIDE_DATA = [
    # Not an input's data: the place in the body is named as before.
    '{"parameters": {"p": 0x10}, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"q": [0x1]}}]}',
    # Not a hex literal: an "x" after other digits, or no digit after it.
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 10x5]}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 1.0x5]}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 0x]}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 0x1g]}]}',
    # A fault before the literal is the one named (01 before it is named by its own words).
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1e, 0x1]}]}',
]


HEX_HOSTILE = {  # 1 MB each: a scan that backtracks over the run (quadratic or worse) runs far past pytest's timeout
    "hex digits then a letter": ("0x" + "1" * 1_000_000 + "g", None),
    "hex digits, a point, hex digits then a letter": ("0x" + "1" * 500_000 + "." + "1" * 500_000 + "g", None),
    "a point, hex digits then a letter": ("0x." + "1" * 1_000_000 + "g", None),
    "an exponent's digits then a letter": ("0x1p" + "1" * 1_000_000 + "g", None),
    "hex digits, each then a point": ("0x" + "1." * 500_000 + "g", None),
    "hex digits then a point and a letter": ("-0X" + "f" * 1_000_000 + ".g", None),
    "a literal of a million hex digits": ("0x" + "1" * 1_000_000, "input 'x': element 1 (0x" + "1" * 62 + "...)"),
    # The JSON before a literal is read again once, closed after a stand-in: linear too.
    "a literal after 300,000 elements": ("1, " * 300_000 + "0x10", "input 'x': element 300001 (0x10)"),
    "a literal after a string of a million escapes": (
        '"' + "\\\\" * 500_000 + '", 0x10',
        "input 'x': element 2 (0x10)",
    ),
}


@pytest.mark.parametrize("shape", sorted(HEX_HOSTILE))
def test_a_hostile_hex_literal_is_read_in_linear_time(shape):
    """16 KB of 0x111...1g in an input's data held the event loop 17 s (the hex literal's pattern
    tried every split of the run between its two digit runs, each to the end): a refusal's
    reading of a literal is linear in the body, as malformed JSON where it is no literal."""
    literal, needle = HEX_HOSTILE[shape]
    body = f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, {literal}]}}]}}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    message = refused.value.message
    assert message.startswith(needle or "malformed JSON in request body: "), message[:200]
    assert len(message) < 300, message[:200]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("[1.5, 01, 0]", "element 1 (01) is a number with a leading zero, which JSON has not: write it as 1"),
        (
            "[1.5, -007.25, 0]",
            "element 1 (-007.25) is a number with a leading zero, which JSON has not: write it as -7.25",
        ),
        ("[1.5, 00, 0]", "element 1 (00) is a number with a leading zero, which JSON has not: write it as 0"),
        ("[[1.5], [+1], [0]]", "element 1 (+1) is a number with a leading plus, which JSON has not: write it as 1"),
        (
            "[1.5, +2.5E3, 0]",
            "element 1 (+2.5E3) is a number with a leading plus, which JSON has not: write it as 2.5E3",
        ),
        (
            "[1.5, .5, 0]",
            "element 1 (.5) is a number with no digit before its point, which JSON has not: write it as 0.5",
        ),
        (
            "[1.5, -.5e-3, 0]",
            "element 1 (-.5e-3) is a number with no digit before its point, which JSON has not: write it as -0.5e-3",
        ),
        (
            "[1.5, 2, 1.]",
            "element 2 (1.) is a number with no digit after its point, which JSON has not: write it as 1.0",
        ),
        (
            "[1.5, -1.e5, 0]",
            "element 1 (-1.e5) is a number with no digit after its point, which JSON has not: write it as -1.0e5",
        ),
        ('["01", 01, "+1"]', "element 1 (01) is a number with a leading zero"),
        # The first fault in the body is named, as json.loads names its first.
        ("[01, 0x10, 0]", "element 0 (01) is a number with a leading zero"),
        ("[+.5, 01, 0]", "element 0 (+.5) is a number with a leading plus, which JSON has not: write it as 0.5"),
        ("[0x10, +1, 0]", "element 0 (0x10) is a hex literal, which JSON has not: write it in decimal"),
    ],
)
def test_a_number_in_a_form_json_has_not_is_refused_by_name(data, needle):
    """01, +1, .5 and 1. in an input's data (C's and JavaScript's numbers, no JSON ones) were a 400
    "malformed JSON ... (char N)", where a hex literal names the input, the element and the
    literal: each names them too, and the number as JSON writes it."""
    body = (
        '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [0.5]},'
        f' {{"name": "x", "datatype": "FP32", "shape": [3], "data": {data}}}]}}'
    )
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message.startswith("input 'x': " + needle), refused.value.message


NINES = "0" + "9" * 5000  # as JSON writes it, an integer past Python's 4300 digits (refused)


@pytest.mark.parametrize(
    ("datatype", "data", "needle", "written"),
    [
        # An integer datatype: the point dropped, as its data must be integers.
        ("INT64", "[1, 2, 1.]", "element 2 (1.) is a number with no digit after its point", "1"),
        ("INT32", "[1, -007, 0]", "element 1 (-007) is a number with a leading zero", "-7"),
        ("UINT8", "[1, +3.000, 0]", "element 1 (+3.000) is a number with a leading plus", "3"),
        ("FP32", "[1, 2, 1.]", "element 2 (1.) is a number with no digit after its point", "1.0"),
        # No form its datatype takes: nothing suggested (1.0E+1 and 1.5 are no integers, -1 no
        # UINT8, 300 no INT8, 5000 digits past the limit, 1e400 past FP32's range, a number no BOOL).
        ("INT64", "[1, +1.E+1, 0]", "element 1 (+1.E+1) is a number with a leading plus", None),
        ("INT64", "[1, 01.5, 0]", "element 1 (01.5) is a number with a leading zero", None),
        ("UINT8", "[1, -01, 0]", "element 1 (-01) is a number with a leading zero", None),
        ("INT8", "[1, 0300, 0]", "element 1 (0300) is a number with a leading zero", None),
        ("INT64", f"[1, {NINES}, 0]", "element 1 (0999", None),
        ("FP64", f"[1, {NINES}, 0]", "element 1 (0999", None),
        ("FP32", "[1, 01e400, 0]", "element 1 (01e400) is a number with a leading zero", None),
        ("BOOL", "[true, 01, false]", "element 1 (01) is a number with a leading zero", None),
    ],
)
def test_a_number_json_has_not_is_suggested_only_in_a_form_its_datatype_takes(datatype, data, needle, written):
    """The form a refusal suggests was itself refused ("write it as 1.0" for an INT64 input's
    1., then "INT64 data must be integers"): it is suggested only where the input's datatype
    takes it, and the body with it in the number's place is then accepted."""
    body = f'{{"inputs": [{{"name": "x", "datatype": "{datatype}", "shape": [3], "data": {data}}}]}}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    message = refused.value.message
    assert message.startswith("input 'x': " + needle), message[:200]
    if written is None:
        assert "write it" not in message, message[:200]
        assert message.endswith("which JSON has not"), message[:200]
        return
    assert message.endswith(f"which JSON has not: write it as {written}"), message
    literal = needle.split("(", 1)[1].split(")", 1)[0]
    decode_infer_request(body.replace(literal, written, 1).encode(), None)  # accepted


def test_a_number_json_has_not_before_its_input_s_datatype_is_suggested_in_no_form():
    """Where the input's datatype comes after its data, no form is known to be taken: none is said."""
    body = '{"inputs": [{"name": "x", "shape": [3], "data": [1, 1., 0], "datatype": "INT64"}]}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    message = refused.value.message
    assert message == "input 'x': element 1 (1.) is a number with no digit after its point, which JSON has not", message


@pytest.mark.parametrize(
    "data",
    [
        # Not a number JSON has not: something else after it, or no digit in it.
        "[1, 01x]",
        "[1, +]",
        "[1, +x]",
        "[1, .]",
        "[1, -.]",
        "[1, 1.x]",
        "[1, 1.5.]",
        "[1, 1e5.]",
        "[1 .5]",
        "[1, 10 01]",
        "[1, +Infinity]",
    ],
)
def test_a_malformed_number_that_is_no_number_json_has_not_is_malformed_json(data):
    """Where the text is no number in one of those forms, the refusal names the place in the body."""
    body = f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [2], "data": {data}}}]}}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message.startswith("malformed JSON in request body: "), refused.value.message


NUMBER_OUTSIDE_DATA = [
    '{"parameters": {"p": 01}, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"q": [+1]}}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [.5], "data": [1]}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1.], "data": [1]}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "x": .5}]}',
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": {"a": 01}}]}',
]


@pytest.mark.parametrize("body", HEX_OUTSIDE_DATA + NUMBER_OUTSIDE_DATA)
def test_a_hex_literal_or_a_number_json_has_not_outside_an_input_s_data_is_malformed_json(body):
    """Elsewhere than an input's data, or where the text is no hex literal nor a number in a form
    JSON has not (01, +1, .5, 1.), the refusal names the place in the body."""
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message.startswith("malformed JSON in request body: "), refused.value.message


NUMBER_HOSTILE = {  # 1 MB each: a scan that backtracks over a run (quadratic or worse) runs far past pytest's timeout
    "a leading zero, then a million digits": ("0" + "1" * 1_000_000, "element 1 (0" + "1" * 63 + "...)"),
    "a leading zero, a million digits, then a letter": ("0" + "1" * 1_000_000 + "g", None),
    "a leading zero, digits, a point, digits, then a letter": ("0" + "1" * 500_000 + "." + "1" * 500_000 + "g", None),
    "a plus, then a million digits": ("+" + "1" * 1_000_000, "element 1 (+" + "1" * 63 + "...)"),
    "a plus, a million digits, then a letter": ("+" + "1" * 1_000_000 + "e", None),
    "a point, then a million digits": ("." + "1" * 1_000_000, "element 1 (." + "1" * 63 + "...)"),
    "a point, a million digits, then a point": ("." + "1" * 1_000_000 + ".", None),
    "a point after a digit, then an exponent of a million digits": (
        "1.e" + "1" * 1_000_000,
        "element 1 (1.e" + "1" * 61 + "...)",
    ),
    "a point after a digit, an exponent's digits, then a letter": ("1.e" + "1" * 1_000_000 + "x", None),
    "a digit and a point a million times": ("1." * 500_000, None),
    "a minus and a point a million times": ("-." * 500_000, None),
    # The JSON before a number is read again once, closed after a stand-in: linear too.
    "a number after 300,000 elements": ("1, " * 300_000 + "01", "element 300001 (01)"),
    "a number after a string of a million escapes": ('"' + "\\\\" * 500_000 + '", .5', "element 2 (.5)"),
}


@pytest.mark.parametrize("shape", sorted(NUMBER_HOSTILE))
def test_a_hostile_number_json_has_not_is_read_in_linear_time(shape, monkeypatch):
    """A refusal's reading of 01, +1, .5 or 1. is linear in the body, as a hex literal's, and
    reads the body once more at most."""
    literal, needle = NUMBER_HOSTILE[shape]
    body = f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, {literal}]}}]}}'
    parses: list[int] = []
    raw_decode = json.JSONDecoder.raw_decode

    def counting(self, s, idx=0):
        parses.append(len(s))
        return raw_decode(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counting)
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), str(len(body)))
    message = refused.value.message
    assert message.startswith(f"input 'x': {needle}" if needle else "malformed JSON in request body: "), message[:200]
    assert len(message) < 400, message[:200]
    assert len(parses) <= 2, parses


REFUSED_PARSES = {  # body, its header length, how the refusal starts, the JSON parses it takes
    "a hex literal": (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 0x10]}]}',
        None,
        "input 'x': element 1 (0x10) is a hex literal",
        2,
    ),
    "a hex literal, the header length given": (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 0x10]}]}',
        "auto",
        "input 'x': element 1 (0x10) is a hex literal",
        2,
    ),
    "an integer past the digit limit": (
        '{"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": [1, ' + "7" * 5000 + "]}]}",
        None,
        "malformed JSON in request body: an integer of 5000 digits: at most 4300 digits are read",
        2,
    ),
    "malformed JSON": ('{"inputs": [{"name": "x", "data": [1, }]}', None, "malformed JSON in request body: ", 1),
    "JSON then other text": (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]} and more',
        None,
        "the body is JSON followed by other bytes (binary data?)",
        1,
    ),
    "JSON then whitespace and a form feed": ('{"inputs": []} \f', None, "malformed JSON in request body: ", 1),
    "JSON then binary bytes": (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}\udcff\udcfe',
        None,
        "the body is JSON followed by other bytes (binary data?)",
        1,
    ),
    # NaN is read where it is and refused once the parse is done: no parse again to see what follows it.
    "NaN, then other text": (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]} more',
        None,
        "the body is JSON followed by other bytes (binary data?)",
        1,
    ),
    "NaN": (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
        None,
        "malformed JSON in request body: NaN is not a JSON value",
        1,
    ),
    "NaN, then malformed JSON": (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [-Infinity, 01]}, }]}',
        None,
        "malformed JSON in request body: -Infinity is not a JSON value",
        1,
    ),
    "NaN, then an integer past the digit limit": (
        '{"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": [NaN, ' + "7" * 5000 + "]}]}",
        None,
        "malformed JSON in request body: NaN is not a JSON value",
        1,
    ),
    "a form feed before JSON then other text": (
        '\f{"inputs": []} more',
        None,
        "the body is JSON followed by other bytes (binary data?)",
        2,
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_PARSES))
def test_a_refused_body_is_parsed_once_and_explained_in_one_pass_at_most(case, monkeypatch):
    """A refused JSON part was parsed up to three times: once for the verdict, again to explain
    it (a hex literal's element, an integer's digits), and again whole to see whether it was
    JSON followed by binary data (no header length). It is parsed once for the verdict and at
    most once more to explain it, with the words it had."""
    text, header, start, parses = REFUSED_PARSES[case]
    body = text.encode("utf-8", "surrogateescape")
    counted: list[int] = []
    raw_decode = json.JSONDecoder.raw_decode

    def counting(self, s, idx=0):
        counted.append(len(s))
        return raw_decode(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counting)
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body, str(len(body)) if header else None)
    assert refused.value.message.startswith(start), refused.value.message[:200]
    assert len(counted) == parses, counted


LONG_DATA = {  # an input's data before a number JSON has not, as written: the element _flatten makes it
    "flat": ("1.5, " * 3000, 3000),
    "nested": ("[1.5, 2], [[3]], " * 1000 + "[4, ", 3001),
    "nested, empty lists": ("[[], [1.5]], [ ], [true, null], " * 1000 + "[[], ", 3000),
    "flat, spaced and broken": ("1.5 ,\n\t" * 3000, 3000),
    # Strings (a BYTES input's, or one a client slipped in), what they hold no element or list.
    "flat, a string first": ('"s", ' + "1.5, " * 3000, 3001),
    "nested, strings holding commas and brackets": ('[1.5, "x,]"], [":[", "{"], ' * 1000 + "[4, ", 4001),
}


@pytest.mark.parametrize("shape", sorted(LONG_DATA))
def test_a_number_json_has_not_after_long_data_reads_again_only_the_json_before_the_data(shape, monkeypatch):
    """A number JSON has not near the end of a 4 MiB input's data cost about 3 parses of the body:
    the JSON before it parsed again, closed after a stand-in, and its brackets read from it whole.
    Where the data before it is lists and numbers alone, the elements before it are counted, and
    only the JSON before the data is read again."""
    data, element = LONG_DATA[shape]
    head = '{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [0.5]}, {"name": "x", '
    body = head + f'"datatype": "FP32", "shape": [{element + 1}], "data": [{data}01]}}]}}'
    counted: list[int] = []
    raw_decode = json.JSONDecoder.raw_decode

    def counting(self, s, idx=0):
        counted.append(len(s))
        return raw_decode(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counting)
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message == (
        f"input 'x': element {element} (01) is a number with a leading zero, which JSON has not: write it as 1"
    )
    assert counted[0] == len(body), counted
    assert len(counted) == 2, counted
    assert counted[1] < len(head) + 100, counted


EARLIER_DATA = {  # an earlier input's data, as written, and its shape
    "flat": (", ".join(["1.5"] * 3000), [3000]),
    "nested": (", ".join(["[[1.5, 2], [true, null]]"] * 1000), [1000, 2, 2]),
    "nested, empty lists and spaces": (", ".join(["[ [], [1e3 ,-2]\n]"] * 1000), [1000, 2]),
}


@pytest.mark.parametrize("shape", sorted(EARLIER_DATA))
def test_a_number_json_has_not_after_a_long_earlier_input_reads_again_only_its_own_input(shape, monkeypatch):
    """A number JSON has not in an input after a 4 MiB one had the earlier input's data parsed
    again (and its brackets read), 2 to 3 times the body's parse: an earlier input's data of
    numbers and lists alone is read again as an empty list (it is none of the refusal's words)."""
    data, dims = EARLIER_DATA[shape]
    earlier = f'{{"name": "a", "datatype": "FP32", "shape": {dims}, "data": [{data}], "parameters": {{"p": "]"}}}}'
    body = f'{{"inputs": [{earlier}, {{"name": "x", "datatype": "INT8", "shape": [3], "data": [1, 2, +3]}}]}}'
    counted: list[int] = []
    raw_decode = json.JSONDecoder.raw_decode

    def counting(self, s, idx=0):
        counted.append(len(s))
        return raw_decode(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counting)
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message == (
        "input 'x': element 2 (+3) is a number with a leading plus, which JSON has not: write it as 3"
    )
    assert counted[0] == len(body), counted
    assert len(counted) == 2, counted
    assert counted[1] < 300, counted


@pytest.mark.parametrize("escape", ['"\\n", ', ""], ids=["an-escape-first", "none"])
def test_the_data_list_before_a_number_json_has_not_is_found_in_one_pass(escape, monkeypatch):
    """The "data" list that holds the number was looked for back from it one "data" at a time:
    each string "data" in the data (``["\\n", "data", "data", ..., 01]``) was matched as a key
    and refused, a pass each (600,000 in a 4 MiB body: twice the body's parse), and the list
    was then given up on for the escape in it. It is found in one search."""
    tried: list[int] = []

    class Spy:
        def match(self, text, pos):
            tried.append(pos)
            return DATA_LIST.match(text, pos)

    DATA_LIST = protocol.DATA_LIST
    monkeypatch.setattr(protocol, "DATA_LIST", Spy())
    data = escape + '"data", ' * 1000
    body = f'{{"inputs": [{{"name": "b", "datatype": "BYTES", "shape": [1002], "data": [{data}01]}}]}}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    element = 1001 if escape else 1000
    assert refused.value.message == (
        f"input 'b': element {element} (01) is a number with a leading zero, which JSON has not"
    ), refused.value.message
    assert len(tried) <= 1, len(tried)


def test_an_early_nan_in_a_json_part_of_given_length_ends_its_parse(monkeypatch):
    """A NaN early in a JSON part whose length the header gives was read on to the part's end
    and refused then (a 4 MiB part: a whole parse), where nothing after it can change the
    refusal (no "JSON then other bytes" to tell): the parse ends at the NaN."""
    body = '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3001], "data": [NaN, ' + "1.5, " * 3000 + "2]}]}"
    ended: list[str] = []
    raw_decode = json.JSONDecoder.raw_decode

    def watching(self, s, idx=0):
        try:
            return raw_decode(self, s, idx)
        except ValueError as exc:
            ended.append(str(exc))
            raise

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", watching)
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), str(len(body)))
    assert refused.value.message == "malformed JSON in request body: NaN is not a JSON value"
    assert ended == ["NaN is not a JSON value"], ended


@pytest.mark.parametrize(
    ("data", "element"),
    [
        # Data of other values than lists and numbers: the JSON before the number read again whole.
        ('["a", "b,[", ', 2),
        ('[1], {"b": [2, 3]}, ', 2),
        ("1, [2, 3], ", 2),  # (_flatten leaves data whose first element is no list as it is)
        ("[1, 2], 3, [4, ", 4),
        ("", 0),
        # Strings a "data" key or a list seems to open in, and an escape in one (read again whole).
        ('"a:[", "data", ', 2),
        ('"\\"data\\": [", "b", ', 2),
        ('"q\\\\", [1, 2], ', 2),
    ],
)
def test_a_number_json_has_not_after_other_data_is_named_by_its_element(data, element):
    body = f'{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [9], "data": [{data}01]}}]}}'
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message.startswith(f"input 'x': element {element} (01) "), refused.value.message


def test_an_infinite_number_is_named_in_its_own_input():
    """The number named is the one of the input refused, not another input's or a parameter's."""
    body = (
        '{"parameters": {"p": 1e999}, "inputs": [{"name": "a", "datatype": "FP64", "shape": [1], "data": [2e400]},'
        ' {"name": "b", "datatype": "FP32", "shape": [2], "data": [[1], [3e500]]}]}'
    )
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.replace("2e400", "2").encode(), None)
    assert refused.value.message.startswith("input 'b': element 1 (3e500) is past the range of FP32")
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message.startswith("input 'a': element 0 (2e400) is past the range of FP64")


def test_an_infinite_number_after_an_input_nested_as_deep_as_read_is_named():
    """Naming an infinite number as written reads the JSON part again whole, a few frames
    deeper than it was first read: an input
    before it nested as deep as the body could be read at all was a RecursionError there, a
    500. The number is named as read then ("inf"), still a 400."""

    def decoded(levels: int) -> str:
        deep = "[" * levels + "1" + "]" * levels
        body = (
            f'{{"inputs": [{{"name": "\\u0061", "datatype": "FP32", "shape": [1], "data": {deep}}},'
            ' {"name": "b", "datatype": "FP32", "shape": [1], "data": [1e400]}]}'
        )
        with pytest.raises(InvalidInput) as refused:
            decode_infer_request(body.encode(), None)
        return refused.value.message

    low, high = 1, sys.getrecursionlimit()  # the deepest input 'a' read, from here
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (low, middle - 1) if "nested too deep" in decoded(middle) else (middle, high)
    for levels in (low, low - 1, low - 2, low - 5):
        message = decoded(levels)
        assert message.startswith("input 'b': element 0 ("), (levels, message)
        assert "is past the range of FP32" in message, (levels, message)


@pytest.mark.parametrize(
    "body",
    [
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2], "data": [1, 2e400]}]}',
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1], "data": [1, 2e400]}]}',
        '{"inputs": [], "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2e400]}]}',
        '{"inputs": [{"name": "y"}], "inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2e400]}]}',
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 3e400]}], "inputs": '
        '[{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2e400]}]}',
    ],
)
def test_an_infinite_number_of_a_member_given_twice_is_the_one_read(body):
    """A member given twice is read as its last (json.loads's way): the number named is that one's."""
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert refused.value.message.startswith("input 'x': element 1 (2e400) is past the range of FP32")


INPUT = '{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}'


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        # A request's own parameter, which Triton passes to the model as a double: none holds 1e400.
        (f'{{"parameters": {{"p": 1e400}}, "inputs": [{INPUT}]}}', "parameter 'p' is a number past a double's range"),
        (f'{{"parameters": {{"p": -1e400}}, "inputs": [{INPUT}]}}', "parameter 'p' is a number past a double's"),
        (
            '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"q": 1e400}}]}',
            "input 'x': parameter 'q' is a number past a double's range",
        ),
        (
            f'{{"inputs": [{INPUT}], "outputs": [{{"name": "y", "parameters": {{"r": 1e999}}}}]}}',
            "output 'y': parameter 'r' is a number past a double's range",
        ),
        # The integers Triton reads itself, given as a float, an infinite one or one read as 0.
        (f'{{"parameters": {{"priority": 1e400}}, "inputs": [{INPUT}]}}', "parameters.priority must be"),
        (f'{{"parameters": {{"timeout": 1e-400}}, "inputs": [{INPUT}]}}', "parameters.timeout must be"),
        (f'{{"parameters": {{"priority": 1e2}}, "inputs": [{INPUT}]}}', "parameters.priority must be"),
        (f'{{"parameters": {{"sequence_id": 1e400}}, "inputs": [{INPUT}]}}', "Unable to parse 'sequence_id'"),
        (
            f'{{"inputs": [{INPUT}], "outputs": [{{"name": "y", "parameters": {{"classification": 1e400}}}}]}}',
            "Unable to set 'classification'",
        ),
        (
            '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4e0}}]}',
            "input 'x': binary_data_size must be a non-negative integer",
        ),
    ],
)
def test_a_parameter_past_its_range_is_refused_by_name(body, needle):
    """1e400 in a request's own parameters (or an input's, or an output's) was taken as inf
    and answered 200: Triton's JSON parser refuses a number no double holds, and passes the
    request's own parameters to the model as doubles. Each is a 400 naming the parameter, as an
    integer parameter Triton reads given as a float, infinite or read as 0 (1e-400) is."""
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert needle in refused.value.message, refused.value.message


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"q": [1e400]}}]}',
            "input 'x': parameter 'q' holds a number past a double's range",
        ),
        (
            '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"q": {"r": -1e400}}}]}',
            "input 'x': parameter 'q' holds a number past a double's range",
        ),
        (
            f'{{"inputs": [{INPUT}], "outputs": [{{"name": "y", "parameters": {{"z": [1, {{"w": [1e400]}}]}}}}]}}',
            "output 'y': parameter 'z' holds a number past a double's range",
        ),
    ],
)
def test_a_number_past_a_doubles_range_nested_in_a_parameter_is_refused_by_name(body, needle):
    """1e400 in a list or an object a parameter holds ({"q": [1e400]}, {"q": {"r": -1e400}}) was
    taken as inf and answered 200: only a parameter's own value was looked at, and Triton's JSON
    parser refuses such a number anywhere. Each is a 400 naming the parameter that holds it."""
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(body.encode(), None)
    assert needle in refused.value.message, refused.value.message


@pytest.mark.parametrize(
    ("datatype", "number", "value"),
    [
        ("FP64", "0e-400", 0.0),
        ("FP64", "-0.0", 0.0),
        ("FP64", "0." + "0" * 400, 0.0),
        ("FP64", "5e-324", 5e-324),
        ("FP64", "1e-310", 1e-310),
        ("FP32", "1e-40", np.float32(1e-40)),
        ("FP32", "0", 0.0),
        ("FP16", "1e-7", np.float16(1e-7)),
        ("FP16", "65504", 65504.0),
        # Past the smallest magnitude: read as 0, or as the nearest subnormal, as Triton reads
        # them (RapidJSON's double, then cast to the datatype, IEEE rounding).
        ("FP64", "1e-400", 0.0),
        ("FP64", "-1e-400", 0.0),
        ("FP64", "0." + "0" * 400 + "1", 0.0),
        ("FP32", "1e-400", 0.0),
        ("FP32", "1e-50", 0.0),
        ("FP32", "1e-45", np.float32(1e-45)),
        ("FP16", "1e-10", 0.0),
        ("FP16", "5e-8", np.float16(6e-8)),
        # Past the largest value, under the halfway point to the next power of two: rounded to it.
        ("FP32", "3.4028234663852886e38", np.finfo(np.float32).max),
        ("FP32", "3.4028235677973362e38", np.finfo(np.float32).max),
        ("FP16", "65519.99", 65504.0),
        ("FP64", "1.7976931348623158e308", np.finfo(np.float64).max),
    ],
)
def test_a_json_number_its_datatype_holds_or_rounds_to_is_read(datatype, number, value):
    """A 0 written as such, and a number the datatype holds (its subnormals too), are read; a
    number too small for it is read as IEEE rounds it, as Triton reads it (it was refused)."""
    raw = f'{{"name": "x", "datatype": "{datatype}", "shape": [2], "data": [{number}, 1]}}'
    body = f'{{"inputs": [{raw}]}}'
    data = decode_infer_request(body.encode(), None).inputs[0].data
    assert data.dtype == np.dtype(protocol.DATATYPES[datatype])
    assert data[0] == value


def test_a_value_an_error_quotes_is_cut():
    """A 3 MB string in FP32 data came back whole in the 400 (and the access log)."""
    raw = {"name": "x", "datatype": "FP32", "shape": [1], "data": ["9" * 3_000_000]}
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(json.dumps({"inputs": [raw]}).encode(), None)
    assert str(refused.value).endswith("found '" + "9" * 63 + "...")


def test_duplicate_inputs_and_nested_data():
    x = {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}
    req = decode_infer_request(json.dumps({"inputs": [x]}).encode(), None)
    np.testing.assert_array_equal(req.inputs[0].data, [[1, 2], [3, 4]])
    with pytest.raises(InvalidInput, match="more than once"):
        decode_infer_request(json.dumps({"inputs": [x, x]}).encode(), None)


@pytest.mark.parametrize("deep", ["[" * 200_000, '{"inputs": ' * 100_000, '{"inputs": [' + "[" * 5_000 + "1"])
def test_a_body_nested_too_deep_is_told_in_the_server_s_words(deep):
    """JSON nested deeper than Python's parser goes was answered with Python's own words
    ("maximum recursion depth exceeded while decoding a JSON array from a unicode string"):
    the 400 says what is wrong with the body, and how deep it may go."""
    with pytest.raises(InvalidInput) as refused:
        decode_infer_request(deep.encode(), None)
    message = refused.value.message
    assert message.startswith("malformed JSON in request body: JSON nested too deep"), message
    assert f"{sys.getrecursionlimit()} levels" in message, message
    assert "recursion" not in message, message


def called_deeper(frames: int, call):
    """``call()`` with ``frames`` more frames on the stack."""
    return call() if frames == 0 else called_deeper(frames - 1, call)


def test_the_depth_a_too_deep_body_is_told_is_the_same_from_any_caller():
    """The figure the 400 gives is the recursion limit, an upper bound whatever the caller's
    stack (how deep a body is read does go by it: about 990 levels from here, about 490 from
    500 frames deeper), not the depth the parse happened to stop at."""
    deep = ('{"inputs": ' + "[" * 995 + "]" * 995 + "}").encode()  # past what any caller reads
    told = set()
    for frames in (0, 500):
        with pytest.raises(InvalidInput) as refused:
            called_deeper(frames, lambda: decode_infer_request(deep, None))
        told.add(refused.value.message)
    assert told == {
        "malformed JSON in request body: JSON nested too deep: arrays and objects within each other are read "
        f"to about {sys.getrecursionlimit()} levels at most"
    }


def test_non_finite_outputs_are_valid_json():
    """NaN outputs produced invalid JSON (a bare NaN), which strict clients refuse to parse."""
    body, header_len = encode_infer_response(
        "m", "1", [("y", "FP32", np.array([[0.5, np.nan, np.inf]], dtype=np.float32), False)]
    )
    assert header_len is None
    parsed = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert parsed["outputs"][0]["data"] == [0.5, None, None]


def test_classification_is_asked_per_output_and_kept_with_a_layout():
    protocol.LAYOUTS.clear()
    x = httpclient.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.zeros((1, 4), np.float32), binary_data=True)
    out = [
        httpclient.InferRequestedOutput("y", binary_data=True, class_count=3),
        httpclient.InferRequestedOutput("z", binary_data=False),
    ]
    body = tritonclient_body([x], out)
    first, again = decode_infer_request(*body), decode_infer_request(*body)  # the second from the layout
    assert first.classification == again.classification == {"y": 3}
    assert again.classification is not first.classification
    assert first.outputs == {"y": True, "z": False}
    twice = [*out, httpclient.InferRequestedOutput("y", binary_data=False, class_count=5)]
    for _ in range(2):  # an output named twice: its first entry's parameters, as Triton keeps them
        request = decode_infer_request(*tritonclient_body([x], twice))
        assert (request.outputs, request.classification) == ({"y": True, "z": False}, {"y": 3})
    for bad in (-1, "3", True, 2.5, None, 2**64, 2**70):
        head = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0]}]}
        head["outputs"] = [{"name": "y", "parameters": {"classification": bad}}]
        with pytest.raises(InvalidInput, match=r"Unable to set 'classification': attempt to access JSON non-unsigned-"):
            decode_infer_request(json.dumps(head).encode(), None)
    head["outputs"] = [{"name": "y", "parameters": {"classification": 2**64 - 1}}]  # uint64's largest: every class
    assert decode_infer_request(json.dumps(head).encode(), None).classification == {"y": 2**64 - 1}


def test_top_classes_rank_as_triton_does():
    """Highest first by the output's own type, equal values by index, "value:index" with C's %f
    for floats; a row per batch item (an empty batch: none, shape [0] as Triton answers it); at
    most as many as there are classes; NaN last."""
    probs = np.array([[0.1, 0.7, 0.2, 0.7], [1.0, 0.0, 0.0, 0.0]], np.float32)
    assert protocol.top_classes(probs, "FP32", 3, batched=True).tolist() == [
        [b"0.700000:1", b"0.700000:3", b"0.200000:2"],
        [b"1.000000:0", b"0.000000:1", b"0.000000:2"],
    ]
    big = np.array([[2**64 - 1, 5, 2**63]], np.uint64)
    assert protocol.top_classes(big, "UINT64", 9, batched=True).tolist() == [
        [b"18446744073709551615:0", b"9223372036854775808:2", b"5:1"]
    ]
    ints = np.array([[-3, 4], [2, -8]], np.int8)  # not batched: the whole tensor, as one row
    assert protocol.top_classes(ints, "INT8", 2, batched=False).tolist() == [b"4:1", b"2:2"]
    odd = np.array([[np.nan, -1.0, -np.inf, np.inf, -np.nan]], np.float64)
    assert protocol.top_classes(odd, "FP64", 5, batched=True).tolist() == [
        [b"inf:3", b"-1.000000:1", b"-inf:2", b"nan:0", b"-nan:4"]  # -nan as C++ writes a negative NaN
    ]
    assert protocol.top_classes(np.zeros((0, 10), np.float32), "FP32", 3, batched=True).shape == (0,)
    for datatype in ("BYTES", "BOOL", "FP16"):
        with pytest.raises(InvalidInput, match=f"unsupported type '{datatype}'"):
            protocol.top_classes(np.zeros((1, 2)), datatype, 1, batched=True)


def test_a_raw_binary_request_is_refused_where_triton_cannot_deduce_its_shape():
    """Triton's raw binary request: one input only, at most one variable dimension, a BYTES input
    of one element; its shape is the batch of one and the config's dims."""
    from model_server.config import TensorSpec
    from model_server.protocol import decode_raw_request

    one = TensorSpec("x", "INT32", (-1, 2, -1))
    req = decode_raw_request(np.arange(6, dtype="<i4").tobytes(), (one,), batched=True)
    assert req.inputs[0].shape == (1, 2, 3)
    assert req.binary_output_default
    assert req.outputs is None
    assert decode_raw_request(b"\x00" * 8, (TensorSpec("x", "FP32", (2,)),), batched=False).inputs[0].shape == (2,)
    strings = decode_raw_request(b"text", (TensorSpec("s", "BYTES", (-1, 1)),), batched=True).inputs[0]
    assert strings.shape == (1, 1)
    assert strings.data.tolist() == [[b"text"]]
    with pytest.raises(InvalidInput, match=r"Raw request must only have 1 input.* got 2 inputs"):
        decode_raw_request(b"", (one, TensorSpec("y", "INT32", (-1,))), batched=True)
    with pytest.raises(InvalidInput, match="more than one variable-sized dimension"):
        decode_raw_request(b"", (TensorSpec("x", "INT32", (-1, -1)),), batched=False)
    with pytest.raises(InvalidInput, match="For BYTE datatype raw input 's', the model must have input shape"):
        decode_raw_request(b"", (TensorSpec("s", "BYTES", (-1, 2)),), batched=True)
    with pytest.raises(InvalidInput, match=r"shape \[1, 0, 1099511627776, 1099511627776\] has more than"):
        decode_raw_request(b"", (TensorSpec("x", "FP32", (-1, -1, 2**40, 2**40)),), batched=True)
