"""Every kind of bad input gets a 4xx JSON error naming what was wrong, never a 500 or a hang."""

from __future__ import annotations

import fcntl
import http.client
import json
import re
import socket
import struct
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.integration


def post(server, path: str, body: bytes | str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{server.http}{path}", data=body, headers=headers or {}, timeout=30)


def image_body(images: list[bytes], datatype: str = "BYTES", shape: list[int] | None = None) -> tuple[bytes, dict]:
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": datatype,
                    "shape": shape or [len(images)],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"inputs": []}', "non-empty 'inputs'"),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "TEXT", "data": ["x"]}]}',
            "datatype 'TEXT'",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": ["BYTES"], "data": ["x"]}]}',
            "datatype ['BYTES'] is not one of",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": {"a": 1}, "data": ["x"]}]}',
            "datatype {'a': 1} is not one of",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["x"]}]}',
            "needs 2 elements",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [-1], "datatype": "BYTES", "data": ["x"]}]}',
            "non-negative",
        ),
        (
            b'{"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}',
            "unknown input",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}',
            "does not match the model's BYTES",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [["x"]]}]}',
            "shape [1, 1]",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not a png"]}]}',
            "not a decodable PNG or JPEG",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [7]}]}',
            "must be a string",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "outputs": [{"name": "logits"}]}',
            "unknown output",
        ),
    ],
    ids=[
        "malformed-json",
        "not-object",
        "no-inputs",
        "bad-datatype",
        "datatype-a-list",
        "datatype-an-object",
        "count-mismatch",
        "negative-dim",
        "unknown-input",
        "wrong-datatype",
        "wrong-rank",
        "not-an-image",
        "bytes-not-string",
        "unknown-output",
    ],
)
def test_bad_json_requests_get_400_naming_the_problem(server, body, needle):
    r = post(server, "/v2/models/digits/infer", body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    assert " at 0x" not in r.json()["error"]  # (Pillow's message named its buffer's address)


@pytest.mark.parametrize(
    ("number", "needle"),
    [
        ("0x10", "element 1 (0x10) is a hex literal, which JSON has not: write it in decimal"),
        ("01", "element 1 (01) is a number with a leading zero, which JSON has not: write it as 1"),
        ("+1", "element 1 (+1) is a number with a leading plus, which JSON has not: write it as 1"),
        (".5", "element 1 (.5) is a number with no digit before its point, which JSON has not: write it as 0.5"),
        ("1.", "element 1 (1.) is a number with no digit after its point, which JSON has not: write it as 1.0"),
    ],
)
def test_a_number_json_has_not_in_an_input_s_data_is_a_400_naming_it(server, number, needle):
    """01, +1, .5 and 1. (C's numbers, no JSON ones) in an input's data were a 400 "malformed
    JSON ... (char N)"; each names the input, the element and the number as JSON writes it, as
    a hex literal does."""
    body = f'{{"inputs": [{{"name": "image", "shape": [2], "datatype": "FP32", "data": [1, {number}]}}]}}'
    r = post(server, "/v2/models/digits/infer", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"input 'image': {needle}"


FP16_PAST = "is past the range of FP16 (its largest magnitude is 65504)"


LONGER = "(its exact decimal is longer than any double's)"


@pytest.mark.parametrize(
    ("datatype", "number", "advice"),
    [
        # Out of the datatype's range: written in decimal it would be refused too (as 70000 in FP16).
        ("FP16", "0x1p16", f"it {FP16_PAST}"),  # 65536
        ("FP16", "0x1.ffep15", f"it {FP16_PAST}"),  # 65520, which FP16 rounds to inf
        ("FP16", "0x1.ffcp15", "write it in decimal"),  # 65504, its largest
        ("FP32", "-0x1p128", "it is past the range of FP32 (its largest magnitude is 3.40282e+38)"),
        ("FP64", "0x1p1024", "it is past the range of FP64 (its largest magnitude is 1.79769e+308)"),
        ("FP64", "0x1p" + "9" * 30, "it is past the range of FP64 (its largest magnitude is 1.79769e+308)"),
        ("INT8", "0x100", "it is past the range of INT8 (-128 to 127)"),
        ("INT8", "-0x81", "it is past the range of INT8 (-128 to 127)"),
        ("INT8", "-0x80", "write it in decimal"),
        ("UINT8", "-0x1", "it is past the range of UINT8 (0 to 255)"),
        ("INT64", "0x8000000000000000", "it is past the range of INT64 (-9223372036854775808 to 9223372036854775807)"),
        ("UINT64", "0x1p64", "it is past the range of UINT64 (0 to 18446744073709551615)"),
        ("UINT64", "0x1p" + "9" * 30, "it is past the range of UINT64 (0 to 18446744073709551615)"),
        # More precision than the datatype holds: what it rounds to (float.fromhex's rounding too).
        ("FP32", "0x1.000001p0", "write it in decimal (FP32 rounds it to 1.0)"),
        ("FP32", "0x1.000003p0", "write it in decimal (FP32 rounds it to 1.000000238418579)"),
        ("FP16", "0x1.001p0", "write it in decimal (FP16 rounds it to 1.0)"),
        ("FP16", "-0x1p-30", "write it in decimal (FP16 rounds it to -0.0)"),
        # (an exact decimal longer than any double's, 10**30 digits: the value it rounds to instead)
        ("FP32", "0x1p-" + "9" * 30, f"write it as 0.0, the value FP32 rounds it to {LONGER}"),
        ("FP64", "-0x1.8p-2000", f"write it as -0.0, the value FP64 rounds it to {LONGER}"),
        ("FP32", "0x1.000001p-1051", f"write it as 0.0, the value FP32 rounds it to {LONGER}"),
        ("FP64", "0x1.00000000000001p0", "write it in decimal (FP64 rounds it to 1.0)"),
        ("FP16", "0x1p-24", "write it in decimal"),  # (FP16's least subnormal: exact)
        # 1 + 2**-56, which float.fromhex rounds to 1.0: no integer.
        ("INT64", "0x1.00000000000001p0", "INT64 data must be integers"),
    ],
)
def test_a_hex_literal_is_told_its_datatype_s_range_and_rounding(server, datatype, number, advice):
    """A hex literal was told "write it in decimal" whatever its value: 0x100 in INT8 and 0x1p16
    (65536) in FP16, whose decimals are refused as past the datatype's range; a hex float with
    more precision than FP32 or FP16 holds, which the datatype rounds; and 0x1.00000000000001p0
    in INT64, 1 + 2**-56, which float.fromhex rounded to 1.0 and took for an integer. A value
    past the range is told it, in the words the server refuses its decimal with; one the
    datatype rounds is told what it rounds to; one whose exact decimal is longer than any
    double's (0x1p-999...9: was "write it in decimal") is told to write what it rounds to."""
    body = f'{{"inputs": [{{"name": "image", "shape": [2], "datatype": "{datatype}", "data": [1, {number}]}}]}}'
    r = post(server, "/v2/models/digits/infer", body)
    assert r.status_code == 400, r.text
    shown = number if len(number) <= 64 else number[:64] + "..."
    assert r.json()["error"] == f"input 'image': element 1 ({shown}) is a hex literal, which JSON has not: {advice}"


def test_a_decimal_past_fp16_s_range_is_refused_in_the_words_its_hex_literal_is_told(server):
    """The words a hex literal past FP16's range is told are those its decimal is refused with."""
    body = '{"inputs": [{"name": "image", "shape": [2], "datatype": "FP16", "data": [1, 65536]}]}'
    r = post(server, "/v2/models/digits/infer", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == f"input 'image': element 1 (65536) {FP16_PAST}"


def test_bad_binary_framing(server, digit_images):
    img = digit_images[0][0]
    body, headers = image_body([img])
    r = post(server, "/v2/models/digits/infer", body + b"extra", headers)
    assert r.status_code == 400
    assert "not claimed" in r.json()["error"]
    r = post(server, "/v2/models/digits/infer", body, {"Inference-Header-Content-Length": "99999"})
    assert r.status_code == 400
    assert "Inference-Header-Content-Length" in r.json()["error"]
    r = post(server, "/v2/models/digits/infer", body, {"Inference-Header-Content-Length": "abc"})
    assert r.status_code == 400
    truncated = body[:-10]
    r = post(server, "/v2/models/digits/infer", truncated, headers)
    assert r.status_code == 400
    assert "past the end" in r.json()["error"]


@pytest.mark.parametrize("blob", [b"\x89PNG\xff\xfe binary", b"  ", b""])
def test_binary_data_without_its_header_length_is_a_400_naming_the_header(server, digit_images, blob):
    """A body of JSON and binary tensors sent without Inference-Header-Content-Length was read
    as JSON whole: "malformed JSON: Extra data" (or "not UTF-8"), or, binary data that happened
    to be whitespace or none, "runs past the end of the binary data (0 bytes left)". Each now
    names the missing header."""
    body, _ = image_body([digit_images[0][0]])
    header = body[: body.index(b"}]}") + 3]
    r = post(server, "/v2/models/digits/infer", header + blob)
    assert r.status_code == 400, r.text
    assert "Inference-Header-Content-Length" in r.json()["error"]


def test_hostile_sizes_are_refused_before_allocating(server):
    r = post(server, "/v2/models/digits/infer", b"[" * 200_000)
    assert r.status_code == 400
    assert "malformed JSON" in r.json()["error"]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [10**12],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    r = post(
        server,
        "/v2/models/digits/infer",
        header + b"\0" * 8,
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400
    assert "cannot hold 1000000000000 BYTES elements" in r.json()["error"]
    assert server.client().is_server_live()


def test_binary_bytes_elements_are_bounded_per_request_before_any_is_made(server):
    """A 64 MiB body of 16 M empty BYTES elements held every endpoint 9 s while each was cut into
    an object, before the model's batch limit refused it: a request carries at most 65536."""

    def strings(*counts: int) -> tuple[bytes, dict[str, str]]:
        tensors = [
            {"name": f"s{i}", "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": 4 * n}}
            for i, n in enumerate(counts)
        ]
        header = json.dumps({"inputs": tensors}).encode()
        return header + bytes(4 * sum(counts)), {"Inference-Header-Content-Length": str(len(header))}

    r = post(server, "/v2/models/digits/infer", *strings(65537))
    assert r.status_code == 400
    assert r.json()["error"] == (
        "input 's0': 65537 binary BYTES elements (65537 in the request with the inputs before it), "
        "over the limit of 65536 per request"
    )
    r = post(server, "/v2/models/digits/infer", *strings(40000, 30000))
    assert r.status_code == 400
    assert "input 's1': 30000 binary BYTES elements (70000 in the request" in r.json()["error"]
    r = post(server, "/v2/models/digits/infer", *strings(65536))  # at the limit: read, then the model's checks
    assert r.status_code == 400
    assert "unknown input" in r.json()["error"]


def test_out_of_bounds_shapes_counts_and_flags_are_400s_naming_them(server, digit_images):
    """Shapes numpy cannot hold, text that is not Unicode, counts and flags out of their types:
    each a 400 with a short message (they were 500s, each with a traceback in the log)."""

    def binary(shape: list[int], blob: bytes, **extra) -> tuple[bytes, dict[str, str]]:
        tensor = {"name": "image", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(blob)}}
        header = json.dumps({"inputs": [tensor], **extra}).encode()
        return header + blob, {"Inference-Header-Content-Length": str(len(header))}

    def as_json(shape: list[int], data: object, **extra) -> tuple[bytes, dict[str, str]]:
        return json.dumps(
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": shape, "data": data}], **extra}
        ).encode(), {}

    image = digit_images[0][0]
    one = struct.pack("<I", len(image)) + image
    cases = [
        (binary([0, 2**63], b""), "at most 32 dimensions and 2**60-1 elements"),
        (binary([0, 2**62], b""), "at most 32 dimensions"),  # 2**65 bytes of objects, none held
        (as_json([2**61, 0], []), "at most 32 dimensions"),
        (binary([2**32, 2**32, 0], b""), "at most 32 dimensions"),
        (binary([1] * 70, one), "at most 32 dimensions"),
        (as_json([0, 2**62, 8], []), "at most 32 dimensions"),
        (as_json([1], ["\ud800"]), "not valid Unicode"),
        (as_json([1], "x"), "Unable to parse 'data': attempt to access JSON non-array as array"),  # (as Triton)
        (
            binary([1], one, outputs=[{"name": "probabilities", "parameters": {"binary_data": "false"}}]),
            "true or false",
        ),
        (binary([1], one, parameters={"binary_data_output": "no"}), "true or false"),
        (as_json([1], ["x"], outputs=[{"name": f"o{i}"} for i in range(1025)]), "over the limit of 1024"),
    ]
    many = [{"name": f"x{i}", "datatype": "BYTES", "shape": [0], "data": []} for i in range(1025)]
    cases.append(((json.dumps({"inputs": many}).encode(), {}), "1025 inputs, over the limit of 1024"))
    unknown = [{"name": f"{i:04d}" + "n" * 2000} for i in range(1000)]
    cases.append((as_json([1], [image.decode("latin-1")], outputs=unknown), "and 990 more"))
    for header_length in (b"+210", b"2_1_0", "\u0661\u0662\u0663".encode()):  # int() takes each
        body, _ = binary([1], one)
        cases.append(((body, {"Inference-Header-Content-Length": header_length}), "must be an integer"))
    for (body, headers), needle in cases:
        r = post(server, "/v2/models/digits/infer", body, headers)
        assert r.status_code == 400, (needle, r.status_code, r.text[:300])
        assert needle in r.json()["error"]
        assert len(r.content) < 2000  # names cut short, a thousand of them counted
    assert server.client().is_server_live()


def test_truncated_and_corrupt_images(server, digit_images):
    img = digit_images[0][0]
    for bad in (img[: len(img) // 2], img[:8] + bytes(len(img) - 8), b""):
        body, headers = image_body([img, bad])
        r = post(server, "/v2/models/digits/infer", body, headers)
        assert r.status_code == 400, r.text
        assert "element 1" in r.json()["error"]


def test_decompression_bomb_is_refused(server):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")  # ~400 MPixel, tiny file
    body, headers = image_body([buf.getvalue()])
    r = post(server, "/v2/models/digits/infer", body, headers)
    assert r.status_code == 400
    assert "element 0" in r.json()["error"]


def test_images_whose_structure_costs_more_than_their_pixels_are_refused_before_opening(server):
    """Pillow walks a JPEG's header markers, the bytes between them and a PNG's chunks in Python,
    and libjpeg goes over the whole image once per scan: 16 MB of empty JPEG comments held the
    event loop 6.6 s, a 16 kB JPEG of 478 scans a model 4.5 s. Each is a 400 naming it."""
    import io
    import zlib

    from PIL import Image

    from model_server.config import ImagePreprocess
    from model_server.errors import InvalidInput
    from model_server.preprocess import decode_image

    def encoded(image: Image.Image, fmt: str, **options) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **options)
        return buf.getvalue()

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    progressive = encoded(Image.fromarray(pixels), "JPEG", progressive=True)
    last_scan = progressive.rindex(b"\xff\xda")
    empty_chunk = b"\0\0\0\0abCd" + zlib.crc32(b"abCd").to_bytes(4, "big")
    png = encoded(Image.fromarray(pixels), "PNG")
    cases = [
        (progressive[:-2] + progressive[last_scan:-2] * 100 + b"\xff\xd9", "a JPEG of 110 scans, over the limit of 64"),
        (
            progressive[:2] + b"\xff\xfe\x00\x02" * 2000 + progressive[2:],
            "a JPEG of over 1024 markers before its first scan",
        ),
        (
            progressive[:2] + b"\xff\xfe\x00\x02" + bytes(5000) + progressive[2:],
            "a JPEG with over 4096 stray bytes between its header's markers",
        ),
        (png[:33] + empty_chunk * 20000 + png[33:], "a PNG of over 16384 chunks"),
    ]
    spec = ImagePreprocess("input", 8, 8, 16.0)
    for image, needle in cases:
        assert Image.open(io.BytesIO(image)).convert("L").size == (64, 64)  # Pillow takes each, slowly
        r = post(server, "/v2/models/digits/infer", *image_body([png, image]))
        assert r.status_code == 400, (needle, r.text[:300])
        assert r.json()["error"] == f"input 'image' element 1: {needle}"
        with pytest.raises(InvalidInput, match=re.escape(needle)):
            decode_image(image, spec, "element")
    for fine in (
        progressive,
        encoded(Image.fromarray(pixels).convert("CMYK"), "JPEG", progressive=True),  # 18 scans
        encoded(Image.fromarray(pixels), "JPEG", icc_profile=b"\xff\xda" * 30000),  # markers in a payload
    ):
        assert post(server, "/v2/models/digits/infer", *image_body([fine])).status_code == 200


def test_many_large_images_in_one_request_are_refused_before_decoding(server, digit_images):
    """64 large PNGs in one request held the model 4.2 s: each image was under the per-image
    limit. The request's pixels together are bounded too, read from the headers alone."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buf, format="PNG")  # at the per-image limit, a small file
    body, headers = image_body([buf.getvalue()] * 3)
    r = post(server, "/v2/models/digits/infer", body, headers)
    assert r.status_code == 400
    assert "pixels per request" in r.json()["error"]
    body, headers = image_body([digit_images[0][0]] * 64)  # many small ones are fine
    assert post(server, "/v2/models/digits/infer", body, headers).status_code == 200


def test_json_over_its_limit_gets_413_before_parsing(server):
    """A 64 MB JSON body froze every endpoint 2.5 s while it was parsed: JSON (an infer request's
    JSON part, any other JSON body) is bounded at 4 MiB; large tensors go as binary data."""
    big = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x" * (5 << 20)]}]})
    r = post(server, "/v2/models/digits/infer", big, {"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "JSON part of the request" in r.json()["error"]
    assert "binary" in r.json()["error"]
    r = post(server, "/v2/models/digits/feedback", json.dumps([{"request_id": "x" * (5 << 20), "label": 1}]))
    assert r.status_code == 413


def test_a_feedback_list_over_the_limit_gets_413(server):
    """A feedback list of 1M items froze the server 4.1 s and answered 98 MB."""
    items = [{"request_id": f"r{i}", "label": 1} for i in range(1001)]
    r = post(server, "/v2/models/digits/feedback", json.dumps(items))
    assert r.status_code == 413
    assert "1001 items is over the limit of 1000" in r.json()["error"]
    r = post(server, "/v2/models/digits/feedback", json.dumps(items[:1000]))
    assert r.status_code == 200
    assert len(r.json()["results"]) == 1000


def test_batch_over_max_batch_size(server, digit_images):
    body, headers = image_body([digit_images[0][0]] * 65)
    r = post(server, "/v2/models/digits/infer", body, headers)
    assert r.status_code == 400
    assert "batch size 65 is outside 1..64" in r.json()["error"]


def test_wrong_binary_size_for_fp32(server):
    x = np.zeros((1, 3, 224, 224), np.float32).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 3, 224, 224],
                    "parameters": {"binary_data_size": len(x) - 4},
                }
            ]
        }
    ).encode()
    r = post(
        server,
        "/v2/models/resnet_bench/infer",
        header + x[:-4],
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400
    assert "needs 602112 bytes" in r.json()["error"]


def test_body_over_limit_gets_413(server_factory, repo_copy):
    s = server_factory(repo_copy, "--max-body-mb", "0.01")
    big = b"x" * 20000
    r = post(s, "/v2/models/digits/infer", big)
    assert r.status_code == 413
    assert "over the limit of 10485 bytes" in r.json()["error"]
    # tritonclient sees the same error as an exception, and the server keeps serving.
    c = s.client()
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([big], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        c.infer("digits", [inp])
    assert err.value.status() == "413"
    assert c.is_server_live()


def test_bodies_being_received_together_are_bounded_503_to_retry_and_the_budget_comes_back(server_factory, repo_copy):
    """Twenty clients each holding a 60 MB body one byte short held 1.3 GB: the bodies being
    received share --max-bodies-mb, on both of the server's ways (a body by its Content-Length,
    buffered by the protocol; a chunked one, read by the handler), given back when a client leaves."""
    s = server_factory(repo_copy, "--max-body-mb", "0.1", "--max-bodies-mb", "0.1")
    head = "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
    holder = socket.create_connection(("127.0.0.1", s.port), timeout=20)
    holder.sendall(f"{head}Content-Length: 90000\r\n\r\n".encode() + b"x" * 89999)
    # The server holds those bytes once it read them: another body past the rest is refused.
    deadline = time.monotonic() + 20
    while True:
        r = requests.post(f"{s.http}/v2/models/digits/infer", data=iter([b"y" * 30000]), timeout=20)
        if r.status_code != 400 or time.monotonic() > deadline:
            break
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "1"
    assert "--max-bodies-mb" in r.json()["error"]
    holder.close()
    with socket.create_connection(("127.0.0.1", s.port), timeout=20) as quitter:  # chunked, left mid-body
        quitter.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n15f90\r\n".encode() + b"z" * 89999)
    while True:  # both given back, once the server hears the clients leave
        r = post(s, "/v2/models/digits/infer", b"{" * 100000)
        if r.status_code != 503 or time.monotonic() > deadline:
            break
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    ("method", "path", "name", "values"),
    [
        ("POST", "/v2/models/digits/infer", "inference-header-content-length", ["2", "5"]),
        ("POST", "/v2/models/digits/infer", "content-encoding", ["gzip", "identity"]),
        ("GET", "/v2/models/digits/traffic", "authorization", [f"Bearer {ADMIN_TOKEN}", "Bearer wrong"]),
        ("POST", "/v2/repository/index", "content-encoding", ["identity", "gzip"]),
    ],
)
def test_a_header_that_says_one_thing_sent_twice_is_a_400_naming_it(server, method, path, name, values):
    """The first was taken: a proxy in front that acts on the last would frame, decode or
    authorize the request otherwise than the server."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
    head += "".join(f"{name.title()}: {value}\r\n" for value in values)
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(head.encode() + b"\r\n{}")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 400
        assert json.loads(response.read())["error"] == f"the {name} header is sent more than once: send it once"


def test_chunked_body_over_limit_gets_413(server_factory, repo_copy):
    s = server_factory(repo_copy, "--max-body-mb", "0.01")

    def chunks():
        for _ in range(10):
            yield b"y" * 4096

    r = requests.post(f"{s.http}/v2/models/digits/infer", data=chunks(), timeout=30)
    assert r.status_code == 413


def answered(port: int, request: bytes) -> http.client.HTTPResponse:
    """``request``'s bytes sent to the server on ``port`` on a connection of their own: its
    answer, the status and headers read (its body left to read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
    return response


def test_a_declared_length_over_the_limit_is_a_413_without_waiting_for_the_body(server_factory, repo_copy):
    """Without Expect: 100-continue it was drained (so that its client reads the answer, not a
    reset): one declared far past what is drained, or whose body never came, held the connection
    until the body timeout, then got a 408 that said nothing of its length."""
    s = server_factory(repo_copy, "--max-body-mb", "0.01", "--request-timeout", "60")
    for length in (10**10, 4 * 10485 + 1):
        head = f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{"
        response = answered(s.port, head.encode())
        assert response.status == 413
        assert f"request body of {length} bytes is over the limit of 10485 bytes" in response.read().decode()
    s = server_factory(repo_copy, "--max-body-mb", "0.01", "--request-timeout", "1")
    # (drained, but it never came)
    response = answered(s.port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n{")
    assert response.status == 413


def test_slow_body_times_out_with_408_not_a_hang(server_factory, repo_copy):
    s = server_factory(repo_copy, "--request-timeout", "1")
    with socket.create_connection(("127.0.0.1", s.port), timeout=20) as sock:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        response = http.client.HTTPResponse(sock)
        response.begin()
        reply = f"HTTP/1.1 {response.status}\r\n" + response.read().decode()
    assert reply.startswith("HTTP/1.1 408")
    assert "not received within 1 s" in reply


@pytest.mark.parametrize(
    ("path", "status", "needle"),
    [
        ("/v2/models/no_such_model/infer", 404, "Request for unknown model: 'no_such_model' is not found"),
        ("/v2/models/digits/versions/7/infer", 404, "version 7 is not loaded"),
        ("/v2/models/digits/versions/one/infer", 404, "no such endpoint"),  # as Triton's routes: [0-9]+
        ("/v2/models/digits/versions/%C2%B2/infer", 404, "no such endpoint"),  # "²": was a 500
        ("/v2/models/digits/versions/%D9%A1/infer", 404, "no such endpoint"),  # Arabic-Indic 1
        ("/v2/models/digits/versions/" + "9" * 5000 + "/infer", 400, "invalid version"),
        ("/v2/models/..%2F..%2Fetc/infer", 400, "invalid model name"),  # (routed as sent, as Triton)
        ("/v2/models/.../infer", 400, "invalid model name"),
    ],
)
def test_unknown_model_or_version(server, digit_images, path, status, needle):
    body, headers = image_body([digit_images[0][0]])
    r = post(server, path, body, headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/digits/versions/%31/infer"),
        ("POST", "/v2/models/digits/versions/%31/infer/"),
        ("GET", "/v2/models/digits/versions/%31/ready"),
        ("GET", "/v2/models/digits/versions/%31"),
        ("GET", "/v2/models/digit%73/versions/1/ready"),
        ("GET", "/v2/models/%64igits"),
    ],
)
def test_a_percent_encoded_path_is_routed_as_sent_as_triton_does(server, digit_images, method, path):
    """``/v2/models/digits/versions/%31/infer`` was served as version 1: the routes matched the
    percent-decoded path. Triton matches its routes (``/versions/([0-9]+)``, a model name
    ``[^/]+``) on the path as sent (evhtp's ``uri->path->full``, never decoded): ``%31`` is no
    version, a 404 there, and ``digit%73`` names no model. So here, over a raw connection."""
    import http.client

    body, headers = image_body([digit_images[0][0]])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        response = conn.getresponse()
        status, answer = response.status, response.read()
    finally:
        conn.close()
    assert status in (400, 404), answer[:200]
    assert json.loads(answer)["error"]


def test_unknown_model_through_tritonclient(server):
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"x"], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        server.client().infer("no_such_model", [inp])
    assert err.value.status() == "404"
    assert "no_such_model" in err.value.message()


def test_unknown_endpoint_and_method_are_json(server):
    r = requests.get(f"{server.http}/v3/anything", timeout=5)
    assert r.status_code == 404
    assert "no such endpoint" in r.json()["error"]
    r = requests.get(f"{server.http}/v2/models/digits/infer", timeout=5)
    assert r.status_code == 405
    assert "not allowed" in r.json()["error"]
    # The path is quoted shortened: one of 50 kB (a request's head holds 60 KiB) was quoted whole.
    long = "/v2/models/" + "a" * 50_000
    for method, path, status in (("GET", "/v3/" + "a" * 50_000, 404), ("GET", f"{long}/infer", 405)):
        r = requests.request(method, f"{server.http}{path}", timeout=5)
        assert r.status_code == status
        assert len(r.content) < 1000
    # A refused inference still names its request, as an answered one does (a trailing slash too).
    r = requests.post(f"{server.http}/v2/models/digits/versions/1/infer/", data=b"{", headers={"X-Request-ID": "bad-1"})
    assert r.status_code == 400
    assert r.headers["x-request-id"] == "bad-1"
    assert r.headers["content-type"] == "application/json"
    assert "malformed JSON" in r.json()["error"]


def test_a_malformed_request_is_counted_a_400_and_no_failure_of_the_model(server):
    route = "/v2/models/{model}/infer"
    before = server.metric("model_server_http_requests_total", route=route, code="400") or 0
    failures = server.metric("nv_inference_request_failure", model="digits", version="1", reason="BACKEND")
    post(server, "/v2/models/digits/infer", b"{broken")
    assert server.metric("model_server_http_requests_total", route=route, code="400") == before + 1
    assert server.metric("nv_inference_request_failure", model="digits", version="1", reason="BACKEND") == failures
    assert server.metric("nv_inference_request_failure", model="digits", version="1", reason="INVALID_INPUT") is None
    assert server.proc.poll() is None


def raw_exchange(port: int, request: bytes, timeout: float = 30) -> tuple[int, str]:
    """Send raw bytes (clients refuse to send such headers) and read the status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all: the answer is still there
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read().decode()


@pytest.mark.parametrize(
    ("headers", "status", "needle"),
    [
        (b"X-Meta-Session: " + b"a" * 16 * 1024 * 1024 + b"\r\n", 431, "request headers exceed 61440 bytes"),
        (b"X-Meta-Session: " + b"a" * 70_000 + b"\r\n", 431, "request headers exceed 61440 bytes"),
        (b"".join(b"X-Meta-%d: v\r\n" % i for i in range(101)), 431, "more than 100 request headers"),
    ],
)
def test_headers_over_envoys_limits_get_431_and_the_server_keeps_serving(server, headers, status, needle):
    """A 16 MB header was parsed, kept and masked on the shadow path; Envoy refuses more than
    60 KiB of headers or more than 100 of them, and so does the server now."""
    got, body = raw_exchange(server.port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert got == status
    assert needle in json.loads(body)["error"]
    assert requests.get(f"{server.http}/v2/health/ready", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("version", "request_line"),
    [("0.9", b"GET /v2/health/ready\r\n\r\n"), ("2.0", b"GET /v2/health/ready HTTP/2.0\r\nHost: x\r\n\r\n")],
)
def test_http_versions_other_than_1_0_and_1_1_get_505_and_the_connection_closed(server, version, request_line):
    """llhttp parses an HTTP/0.9 request (no version) and an HTTP/2.0 request line, and they
    were answered over HTTP/1.1 as if they were one; nginx refuses them, and so does the server."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request_line + b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):  # to the end: the connection is closed after the refusal
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 "), received
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {"error": f"HTTP version {version} is not supported: only 1.0 and 1.1"}
    assert requests.get(f"{server.http}/v2/health/ready", timeout=10).status_code == 200


def test_headers_just_under_the_limits_are_served(server, digit_images):
    body, headers = image_body([digit_images[0][0]])
    meta = {f"X-Meta-K{i}": "v" * 500 for i in range(90)}  # 90 headers, about 46 KiB
    r = post(server, "/v2/models/digits/infer", body, {**headers, **meta})
    assert r.status_code == 200, r.text


def test_headers_trickled_in_time_out_with_408(server_factory, repo_copy):
    """One header byte at a time kept the connection open forever: the keep-alive timer stops
    at the first byte. Now the headers must all arrive within --request-timeout."""
    s = server_factory(repo_copy, "--request-timeout", "1")
    with socket.create_connection(("127.0.0.1", s.port), timeout=20) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        response = http.client.HTTPResponse(sock)
        response.begin()
        status, body = response.status, response.read().decode()
    assert status == 408
    assert "request headers not complete within 1 s" in json.loads(body)["error"]


def write_tile_model(repository: Path, repeats: int) -> None:
    """A model ``tile``: INT32 ``x`` [batch, 16] to ``y`` [batch, 16 * repeats], its rows repeated."""
    import onnx
    from onnx import TensorProto, helper

    from scripts.build_models import IR_VERSION, OPSET

    times = helper.make_tensor("times", TensorProto.INT64, [2], [1, repeats])
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "times"], ["y"])],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.INT32, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["batch", 16 * repeats])],
        [times],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = IR_VERSION
    (repository / "tile" / "1").mkdir(parents=True)
    onnx.save(model, repository / "tile" / "1" / "model.onnx")
    config = {
        "name": "tile",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "input": [{"name": "x", "datatype": "INT32", "dims": [-1, 16]}],
        "output": [{"name": "y", "datatype": "INT32", "dims": [-1, 16 * repeats]}],
    }
    (repository / "tile" / "config.json").write_text(json.dumps(config))


def test_a_load_error_naming_int32_limits_is_logged_unmasked(server_factory, repo_copy):
    """The phone detector took 2147483647 and 4294967295 (bare NANP numbers by their digits)
    for phone numbers: the load error that named them was logged masked."""
    write_tile_model(repo_copy, 2)
    config = json.loads((repo_copy / "tile" / "config.json").read_text())
    config["output"][0]["dims"] = [-1, 4294967295]
    config["input"][0]["dims"] = [-1, 2147483647]
    (repo_copy / "tile" / "config.json").write_text(json.dumps(config))
    s = server_factory(repo_copy, "--no-exit-on-error", until="live")
    for _ in range(300):
        if "load of model 'tile' failed" in s.log.read_text():
            break
        time.sleep(0.1)
    assert "dims [-1, 2147483647]" in s.log.read_text()


@pytest.mark.parametrize("coding", [None, "identity"])  # the protocol's own way, the ASGI way
def test_an_answer_its_client_does_not_read_closes_the_connection_after_the_request_timeout(
    server_factory, repo_copy, coding
):
    """A client that sent a request and never read its answer held the connection, the answer's
    bytes, and on the ASGI way the request's task, forever: nothing bounded writing. An answer
    that does not drain within --request-timeout (64 KiB of it at least each time) is given up
    and the connection closed."""
    write_tile_model(repo_copy, 2**18)  # an answer of 16 MiB: more than the kernel's buffers take
    s = server_factory(repo_copy, "--request-timeout", "1")
    body = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    extra = "" if coding is None else f"Content-Encoding: {coding}\r\n"
    head = f"POST /v2/models/tile/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", s.port))
        sock.sendall(head.encode() + body)
        received = read_once_cut_off(s, sock)  # (not read meanwhile)
    assert received < 16 * 2**20  # cut off: the rest was not sent
    assert "did not read its answer within 1 s" in s.log.read_text()
    assert requests.get(f"{s.http}/v2/health/ready", timeout=30).status_code == 200


def read_once_cut_off(s, sock: socket.socket) -> int:
    """The bytes ``sock`` receives once the server ``s`` logged that its client did not read its
    answer within the request timeout (cut off, the connection closed), waited for up to 30 s."""
    for _ in range(300):
        if "did not read its answer within 1 s" in s.log.read_text():
            break
        time.sleep(0.1)
    received = 0
    try:
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    return received


def _queued(server_port: int, sock: socket.socket) -> int:
    """Bytes the kernel holds between the server and ``sock``: unread by it, and in the
    server's socket unacknowledged (its tx_queue in /proc/net/tcp)."""
    unread = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]
    local = f":{server_port:04X}"
    remote = f":{sock.getsockname()[1]:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(local) and fields[2].endswith(remote):
            return unread + int(fields[4].split(":")[0], 16)
    return unread


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "3601", "x"])
def test_the_keep_alive_timeout_is_bounded(value, capsys):
    from model_server.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--repository", ".", "--keep-alive-timeout", value])
    assert "--keep-alive-timeout: must be seconds above 0 and at most 3600" in capsys.readouterr().err
    assert parse_args(["--repository", ".", "--keep-alive-timeout", "3600"]).keep_alive_timeout == 3600


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-body-mb", "-1"),
        ("--max-body-mb", "0"),
        ("--max-body-mb", "nan"),
        ("--max-body-mb", "inf"),
        ("--max-json-mb", "-1"),
        ("--max-json-mb", "nan"),
        ("--max-json-mb", "inf"),
        ("--prediction-log-topk", "-1"),
        ("--prediction-log-topk", "0"),
        ("--prediction-log-full-max", "-1"),
        ("--prediction-log-sample", "nan"),
        ("--prediction-log-sample", "1.5"),
        ("--prediction-log-flush-s", "0"),
        ("--prediction-log-flush-s", "inf"),
        ("--shadow-log-flush-s", "nan"),
        ("--feedback-max-items", "-5"),
        ("--feedback-max-items", "0"),
        ("--feedback-capacity", "-1"),
        ("--feedback-ttl-s", "nan"),
        ("--feedback-ttl-s", "-1"),
        ("--request-timeout", "-1"),
        ("--request-timeout", "nan"),
        ("--request-timeout", "inf"),
    ],
)
def test_a_numeric_flag_out_of_range_or_not_finite_is_refused_by_name(flag, value, capsys):
    """--max-body-mb -1 made every body a 413 and nan disabled the start's check of
    --max-bodies-mb; a negative --prediction-log-topk or --feedback-max-items was taken as given.
    Every numeric flag is read to its range, finite: argparse's error names the flag."""
    from model_server.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--repository", ".", flag, value])
    err = capsys.readouterr().err
    assert f"argument {flag}" in err or f"/{flag}: " in err
    assert ": must be " in err


@pytest.mark.parametrize("closed_by", ["keep-alive timeout", "connection: close"])
def test_a_connection_closed_with_a_little_left_unread_is_closed_after_the_request_timeout(
    server_factory, repo_copy, closed_by
):
    """A connection closed (its keep-alive timeout, an answer with connection: close) with under
    64 KiB of answers left to send, to a client whose kernel buffers are full, waited forever
    for the client to read them: no pause_writing came, so nothing bounded it, a file descriptor
    each. The client must read them within --request-timeout, or the connection is aborted."""
    write_tile_model(repo_copy, 256)  # answers of 16 KiB and their headers
    args = ["--request-timeout", "1"] + (["--keep-alive-timeout", "10"] if closed_by == "keep-alive timeout" else [])
    s = server_factory(repo_copy, *args)
    body = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))}],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    request = f"POST /v2/models/tile/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    close = b"Connection: close\r\n"
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:  # one answer's length, read
        sock.sendall(request.replace(b"\r\n\r\n", b"\r\n" + close + b"\r\n", 1))
        size = -len(close.lower())
        while chunk := sock.recv(1 << 20):
            size += len(chunk)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (before connecting: a small window)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", s.port))
        sent = 0
        while True:  # answers until the kernel's buffers take no more (and answers wait in the server's)
            sock.sendall(request)
            sent += size
            queued, still = -1, time.monotonic() + 1
            while (now := _queued(s.port, sock)) < sent and time.monotonic() < still:  # (not read meanwhile)
                if now != queued:
                    queued, still = now, time.monotonic() + 1
                time.sleep(0.01)
            if now < sent:
                break
        assert 0 < sent - queued < 64 * 1024  # the server holds a little of the answers
        if closed_by == "connection: close":
            sock.sendall(request.replace(b"\r\n\r\n", b"\r\n" + close + b"\r\n", 1))
        received = read_once_cut_off(s, sock)
    assert received < sent  # cut off: the rest was not sent
    assert "did not read its answer within 1 s" in s.log.read_text()
    assert requests.get(f"{s.http}/v2/health/ready", timeout=30).status_code == 200


def test_headers_under_the_limit_sent_in_three_writes_are_served(server, digit_images):
    """The bytes of a header are counted once, whether it arrives in one read or several."""
    body, headers = image_body([digit_images[0][0]])
    head = (
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-Meta-K%d: %s\r\n" % (i, b"v" * 560) for i in range(90))  # about 51 KiB
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        for part in (head[:20_000], head[20_000:40_000]):
            sock.sendall(part)
            time.sleep(0.5)  # the server reads each part alone
        sock.sendall(head[40_000:] + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200, response.read()


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ("Content-Encoding: br", "unsupported Content-Encoding"),
        ("X-Shadow-Probe: 1", "admin call"),
    ],
)
def test_a_request_refused_for_its_headers_is_answered_before_its_body_is_sent(server, header, needle):
    """The client learns at once, not after uploading up to --max-body-mb for nothing."""
    head = f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n{header}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode())  # and nothing of the body
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer: {answer!r}"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ") or answer.startswith(b"HTTP/1.1 401 "), answer
    assert needle in answer.decode()


def test_a_content_length_with_whitespace_after_it_is_read_as_the_parser_frames_it(server, digit_images):
    """llhttp frames the body by "N  " (trailing whitespace is not part of a field's value): the
    server reads it as N too, either way a request goes (it answered 400 "invalid Content-Length")."""
    body, headers = image_body([digit_images[0][0]])
    for extra in (b"", b"Content-Encoding: identity\r\n"):  # the protocol's own way, and the ASGI way
        head = (
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            + b"Inference-Header-Content-Length: %s\r\n" % headers["Inference-Header-Content-Length"].encode()
            + extra
            + b"Content-Length: %d \t \r\n\r\n" % len(body)
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + body)
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 200, response.read()


@pytest.mark.parametrize("path", ["/v2/models/digits/infer", "/v2/models/digits/feedback"])
def test_a_body_declared_over_the_limit_is_refused_before_100_continue(server, path):
    """A client that waits for 100 Continue is told 413 instead, and the connection closes
    (it was told to send the body, which was then read and thrown away)."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {10**12}\r\n\r\n"
    response = answered(server.port, head.encode())
    assert response.status == 413
    assert "over the limit" in json.loads(response.read())["error"]
    assert response.getheader("connection") == "close"


def test_requests_pipelined_before_a_malformed_one_are_answered_before_its_400(server, digit_images):
    """Each request before the malformed one is answered, in order, then the 400 and the close
    (the 400 was written at once and the earlier answers lost with the connection)."""
    body, headers = image_body([digit_images[0][0]])
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n".encode()
    asgi_way = b"Content-Encoding: identity\r\n"  # (a header the protocol's own way leaves to the app)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request + b"\r\n" + body + request + asgi_way + b"\r\n" + body + b"\x00 not HTTP\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):  # until the server closes
            received += chunk
    answers = []
    while received:
        head, received = received.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
        answers.append((int(head.split()[1]), received[:length]))
        received = received[length:]
    assert [status for status, _ in answers] == [200, 200, 400]
    assert json.loads(answers[0][1])["outputs"] == json.loads(answers[1][1])["outputs"]
    assert json.loads(answers[2][1]) == {"error": "invalid HTTP request"}


@pytest.mark.parametrize(
    "args",
    [["--max-bodies-mb", "1"], ["--max-body-mb", "8", "--max-bodies-mb", "4"]],
)
def test_a_bodies_budget_below_one_body_is_refused_at_start_naming_both_flags(args, capsys):
    """--max-bodies-mb below --max-body-mb (64 by default) left every body between the two
    refused 503 'retry shortly' forever: no retry could ever fit. The start is refused."""
    from model_server.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--repository", ".", *args])
    err = capsys.readouterr().err
    assert "--max-bodies-mb" in err
    assert "--max-body-mb" in err
    assert parse_args(["--repository", ".", "--max-body-mb", "4", "--max-bodies-mb", "4"]).max_bodies_mb == 4


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request on ``sock`` and read its answer (by its Content-Length)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_connections_over_the_limit_get_503_to_retry_on_both_ways_and_probes_are_answered(
    server_factory, repo_copy, digit_images
):
    """No limit bounded the connections, nor so the requests in flight (uvicorn's limit_concurrency
    was unset, and the protocol's own way for inference bypassed it anyway). Past
    --max-connections a connection's requests are refused 503 with Retry-After (inference on
    either way, and the rest), and it is closed; a health or metrics probe is still answered
    (then closed), so a busy server is not taken for a dead one. The connections before it
    serve on, and one that closes makes room."""
    s = server_factory(repo_copy, "--max-connections", "2")
    body, headers = image_body([digit_images[0][0]])
    fields = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    infer = f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n{fields}Content-Length: {len(body)}\r\n\r\n"
    infer_request = infer.encode() + body
    live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    first, second = (socket.create_connection(("127.0.0.1", s.port), timeout=30) for _ in range(2))
    with first, second:
        assert _exchange(first, live)[0] == 200  # (both accepted and counted)
        assert _exchange(second, infer_request)[0] == 200
        asgi_way = infer_request.replace(b"Host: x\r\n", b"Host: x\r\nTransfer-Encoding: chunked\r\n", 1)
        asgi_way = asgi_way.replace(f"Content-Length: {len(body)}\r\n".encode(), b"", 1)
        asgi_way = asgi_way.replace(b"\r\n\r\n", b"\r\n\r\n%x\r\n" % len(body), 1) + b"\r\n0\r\n\r\n"
        for request in (infer_request, asgi_way, b"GET /v2/models/digits HTTP/1.1\r\nHost: x\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as third:
                status, answer, text = _exchange(third, request)
                assert status == 503, text
                assert answer["retry-after"] == "1"
                assert answer["connection"] == "close"
                assert "--max-connections" in json.loads(text)["error"]
                assert third.recv(1) == b""
        for probe in ("/v2/health/live", "/v2/health/ready", "/metrics"):
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as third:
                status, answer, _ = _exchange(third, f"GET {probe} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert status == 200, probe
                assert answer["connection"] == "close"
        assert _exchange(second, infer_request)[0] == 200  # the connections within the limit serve on
        _exchange(first, live.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        assert first.recv(1) == b""  # (the server closed it: gone from its connections)
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as third:
            assert _exchange(third, infer_request)[0] == 200


def test_requests_pipelined_past_a_bound_are_refused_and_the_connection_closed(server):
    """Each request pipelined behind one in flight was parsed and kept (uvicorn's request cycle,
    ~2.4 KB each), and every answer resumed the parsing of what the client sent meanwhile: one
    connection that pipelined 8 MB of small requests without reading held 180 MB, more the longer
    it sent. Past MAX_PIPELINED waiting, a request is refused 429 after the answers to those
    before it, and the connection closed: nothing more is parsed."""
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request * 5000)  # (in one read or a few: thousands each, all waiting)
        data = b""
        while chunk := sock.recv(1 << 20):
            data += chunk
    statuses = re.findall(rb"HTTP/1.1 (\d+) ", data)
    assert statuses[-1] == b"429", statuses[-3:]
    assert set(statuses[:-1]) == {b"200"}
    from model_server.httpserver import MAX_PIPELINED

    assert MAX_PIPELINED < len(statuses) < 5000
    assert b"pipelined" in data.rsplit(b"\r\n\r\n", 1)[-1]
