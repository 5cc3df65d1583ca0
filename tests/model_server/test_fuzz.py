"""Property-based fuzzing of a running server: headers, bodies and traffic policies that a
careless or hostile client may send. Every answer is a clear 2xx or 4xx (never a 5xx, never a
hang), and the server keeps serving: health, a normal inference and its log stay clean."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import ADMIN_TOKEN
from tests.support import infer

pytestmark = pytest.mark.integration
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLIENT_ERRORS = {400, 401, 404, 405, 408, 409, 413, 431}

# What h11 lets through: token characters in names, visible ASCII (and Latin-1) in values.
TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
KNOWN = [
    "X-Request-ID",
    "traceparent",
    "X-User-ID",
    "X-Tenant",
    "X-Device-Type",
    "X-Model-Version",
    "Inference-Header-Content-Length",
    "Content-Type",
    "Host",
    "X-Shadow-Probe",
]
ODD = [
    "-1",
    "0",
    "99999999999999999999",
    "²",
    "00-" + "0" * 32 + "-" + "0" * 16 + "-01",
    "digits-shadow",
    "13800138000",
    "alice%40example.com",
    "(a+)+$",
]
header_names = st.one_of(
    st.sampled_from(KNOWN),
    st.text(TOKEN_CHARS, min_size=1, max_size=40).map(lambda s: "X-Meta-" + s),
    st.text(TOKEN_CHARS, min_size=1, max_size=40),
)
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200).map(str.strip),
    st.sampled_from(ODD),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


def png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, format="PNG")
    return buf.getvalue()


def still_serving(server) -> None:
    assert requests.get(f"{server.http}/v2/health/live", timeout=10).status_code == 200
    assert infer(server, png()).ok


@pytest.fixture(scope="module", autouse=True)
def clean_log(server):
    yield
    still_serving(server)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "unhandled error" not in log


@FUZZ
@given(st.lists(st.tuples(header_names, header_values), max_size=8))
@example([("X-Model-Version", "13800138000"), ("Host", "digits-shadow")])  # a shadow copy naming no loaded version
def test_any_headers(server, headers):
    sent = dict(headers)
    try:
        r = infer(server, png(), sent)
    except requests.exceptions.InvalidHeader:
        return  # refused by the client library before sending
    assert r.status_code == 200 or r.status_code in CLIENT_ERRORS, (sent, r.status_code, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]


@FUZZ
@given(json_values, st.binary(max_size=64), st.one_of(st.none(), st.integers(-5, 400).map(str)))
def test_any_infer_body(server, header, tail, header_length):
    body = json.dumps(header).encode() + tail
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    r = requests.post(f"{server.http}/v2/models/digits/infer", data=body, headers=headers, timeout=10)
    assert r.status_code in CLIENT_ERRORS, (body[:200], r.status_code, r.text)
    assert r.json()["error"]


# Where a field of a valid binary request for digits may be replaced: every field the server reads.
FIELDS = [
    ("inputs",),
    ("inputs", 0),
    ("inputs", 0, "name"),
    ("inputs", 0, "datatype"),
    ("inputs", 0, "shape"),
    ("inputs", 0, "shape", 0),
    ("inputs", 0, "parameters"),
    ("inputs", 0, "parameters", "binary_data_size"),
    ("inputs", 0, "parameters", "shared_memory_region"),
    ("inputs", 0, "data"),
    ("outputs",),
    ("outputs", 0),
    ("outputs", 0, "name"),
    ("outputs", 0, "parameters"),
    ("outputs", 0, "parameters", "binary_data"),
    ("outputs", 0, "parameters", "classification"),
    ("parameters",),
    ("parameters", "binary_data_output"),
    ("parameters", "priority"),
    ("parameters", "timeout"),
    ("parameters", "sequence_id"),
    ("parameters", "sequence_start"),
    ("id",),
]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), json_values), min_size=1, max_size=3))
@example([(("inputs", 0, "datatype"), ["BYTES"])])  # (a list looked up in the datatype table: a 500)
@example([(("inputs", 0, "datatype"), {})])
def test_any_value_in_any_field_of_a_valid_request(server, changes):
    """The structure of a real request with arbitrary JSON in its fields, which whole random
    bodies (test_any_infer_body) seldom reach: a clear 200 or 4xx for each."""
    image = png()
    blob = struct.pack("<I", len(image)) + image
    header = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(blob)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": False, "classification": 3}}],
        "parameters": {"binary_data_output": False, "priority": 0, "timeout": 0, "sequence_id": 0},
    }
    for path, value in changes:  # (a field an earlier change took away is left as it is)
        where: Any = header
        for key in path[:-1]:
            where = (
                where.get(key) if isinstance(where, dict) else where[0] if isinstance(where, list) and where else None
            )
        if isinstance(where, dict) or (isinstance(where, list) and where):
            where[path[-1] if isinstance(where, dict) else 0] = value
    part = json.dumps(header).encode()
    r = requests.post(
        f"{server.http}/v2/models/digits/infer",
        data=part + blob,
        headers={"Inference-Header-Content-Length": str(len(part))},
        timeout=10,
    )
    assert r.status_code == 200 or r.status_code in CLIENT_ERRORS, (part[:300], r.status_code, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]


@FUZZ
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "route": st.lists(
                    st.fixed_dictionaries(
                        {
                            "version": st.one_of(st.sampled_from(["1", "2", 1, "²", "01", "-1"]), json_values),
                            "weight": st.one_of(st.integers(-10, 110), json_values),
                        }
                    ),
                    max_size=3,
                ),
                "rules": st.lists(st.fixed_dictionaries({"match": json_values, "route": json_values}), max_size=2),
                "mirror": st.one_of(st.none(), st.fixed_dictionaries({"version": json_values, "percent": json_values})),
            }
        ),
    )
)
def test_any_traffic_policy(server, policy):
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = requests.put(f"{server.http}/v2/models/digits/traffic", json=policy, headers=auth, timeout=10)
    assert r.status_code in (200, 400), (policy, r.status_code, r.text)
    current = requests.get(f"{server.http}/v2/models/digits/traffic", headers=auth, timeout=10)
    assert current.status_code == 200
    assert infer(server, png()).status_code == 200  # whatever was accepted routes to a loaded version
