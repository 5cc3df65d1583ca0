"""BYTES tensors that are ONNX string tensors, and INT32 tensors, as Triton's client examples use
them: ``simple`` (simple_http_infer_client.py) and ``simple_string``
(simple_http_string_infer_client.py), through tritonclient unmodified."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from devstack.processes import ModelServerProcess, start_model_server
from tests.support import write_simple_models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def simple_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    """A server on a repository of Triton's simple and simple_string models."""
    repository: Path = tmp_path_factory.mktemp("simple-models")
    write_simple_models(repository)
    server = start_model_server(repository, tmp_path_factory.mktemp("simple-server"))
    yield server
    server.stop()


def operands(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The examples' data: INPUT0 unique integers, INPUT1 all ones (batch rows of 16)."""
    in0 = np.arange(16 * batch, dtype=np.int32).reshape(batch, 16)
    return in0, np.ones((batch, 16), dtype=np.int32)


def as_text(values: np.ndarray) -> np.ndarray:
    """As simple_http_string_infer_client builds its inputs: each integer's UTF-8 text."""
    return np.array([str(x).encode("utf-8") for x in values.reshape(-1)], dtype=np.object_).reshape(values.shape)


def infer(client, model: str, datatype: str, data: tuple[np.ndarray, np.ndarray], binary: tuple[bool, bool]):
    inputs = []
    for name, values, as_binary in zip(("INPUT0", "INPUT1"), data, binary, strict=True):
        inp = httpclient.InferInput(name, list(values.shape), datatype)
        inp.set_data_from_numpy(values, binary_data=as_binary)
        inputs.append(inp)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary[0]),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=binary[1]),
    ]
    return client.infer(model, inputs, outputs=outputs, query_params={"test_1": 1, "test_2": 2})


BINARY = [(False, True), (True, False), (True, True), (False, False)]  # the examples' mix first


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("binary", BINARY, ids=lambda b: "-".join("binary" if x else "json" for x in b))
def test_simple_as_simple_http_infer_client(simple_server, batch, binary):
    c = simple_server.client()
    in0, in1 = operands(batch)
    in1 = -in1  # simple_http_infer_client's INPUT1 is all -1
    result = infer(c, "simple", "INT32", (in0, in1), binary)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), in0 + in1)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), in0 - in1)
    assert result.as_numpy("OUTPUT0").dtype == np.int32
    assert len(c.get_inference_statistics(model_name="simple")["model_stats"]) == 1


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("binary", BINARY, ids=lambda b: "-".join("binary" if x else "json" for x in b))
def test_simple_string_as_simple_http_string_infer_client(simple_server, batch, binary):
    c = simple_server.client()
    assert [i["datatype"] for i in c.get_model_metadata("simple_string")["inputs"]] == ["BYTES", "BYTES"]
    in0, in1 = operands(batch)
    result = infer(c, "simple_string", "BYTES", (as_text(in0), as_text(in1)), binary)
    out0, out1 = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert out0.shape == out1.shape == (batch, 16)
    # Binary BYTES come back as bytes, JSON ones as str: int() reads either, as the example does.
    assert {type(x) for x in out0.reshape(-1)} == {bytes if binary[0] else str}
    np.testing.assert_array_equal(np.vectorize(int)(out0), in0 + in1)
    np.testing.assert_array_equal(np.vectorize(int)(out1), in0 - in1)


def test_a_string_model_refuses_bad_text_with_a_400(simple_server):
    c = simple_server.client()
    in0, in1 = operands(1)
    words = as_text(in0)
    words[0, 3] = b"three"
    for binary in ((True, True), (False, False)):
        with pytest.raises(InferenceServerException) as err:
            infer(c, "simple_string", "BYTES", (words, as_text(in1)), binary)
        assert err.value.status() == "400"
        assert "could not read a string input as a number" in err.value.message()
    not_utf8 = as_text(in0)
    not_utf8[0, 5] = b"\xff\xfe"
    with pytest.raises(InferenceServerException) as err:
        infer(c, "simple_string", "BYTES", (as_text(in1), not_utf8), (True, True))
    assert err.value.status() == "400"
    assert err.value.message() == "input 'INPUT1': BYTES element 5 is not UTF-8 text (the model takes strings)"
    # A refused input is the client's: never the model's failure.
    assert simple_server.metric("nv_inference_request_failure", model="simple_string", reason="BACKEND") == 0
    assert simple_server.metric("nv_inference_request_failure", model="simple_string", reason="INVALID_INPUT") is None
    # The model still serves.
    result = infer(c, "simple_string", "BYTES", (as_text(in0), as_text(in1)), (True, True))
    np.testing.assert_array_equal(np.vectorize(int)(result.as_numpy("OUTPUT0")), in0 + in1)


@pytest.mark.parametrize(
    ("text", "element"),
    [(b"sensitive-words", 3), (b"", 3), (b" -", 3)],
)
def test_a_string_the_model_cannot_read_is_a_400_naming_it_and_nothing_on_stderr(simple_server, text, element):
    """ONNX Runtime wrote "[E:onnxruntime:, sequential_executor.cc ...] ... Status Message: stoll"
    to the server's stderr for each string a model's Cast could not read: a line outside Python
    logging and its masking, one a request; and the 400 did not say which input was at fault.
    The 400 names the input and its element, and ORT writes nothing."""
    before = simple_server.log.read_bytes()
    c = simple_server.client()
    in0, in1 = operands(1)
    words = as_text(in1)
    words[0, element] = text
    with pytest.raises(InferenceServerException) as err:
        infer(c, "simple_string", "BYTES", (as_text(in0), words), (True, True))
    assert err.value.status() == "400"
    assert f"input 'INPUT1': BYTES element {element} " in err.value.message()
    assert "could not read a string input as a number" in err.value.message()
    assert c.is_server_live()  # (the log is written before the next answer)
    written = simple_server.log.read_bytes()[len(before) :]
    assert b"onnxruntime" not in written
    assert b"stoll" not in written
