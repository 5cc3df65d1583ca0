"""A KServe ``Model`` that serves ONNX files with ONNX Runtime: the peer in ``bench/peers.py``.

Run by the KServe venv's python (kserve 0.21.0, ``bench/peers-requirements.txt``), never the
project's, which has no kserve: it imports nothing from this repository.

    python bench/kserve_onnx_model.py --port 8080 --serve tiny=/path/model.onnx [--serve ...]

Each model is KServe's documented custom-model shape: ``load`` makes the session, a synchronous
``predict`` takes the ``InferRequest`` that KServe's v2 REST endpoint decoded (binary tensor
extension included) and returns an ``InferResponse`` whose outputs are binary where the client
asked (tritonclient's ``binary_data=True``). The session is made as the model server makes its
own (``model_server/model.py``): log severity 3, intra-op threads that do not spin, the CPU
provider, or CUDA first with ``--device cuda``.

Set as our server is for the comparison: one uvicorn worker, no gRPC server, no access log
(uvicorn's ``access_log`` off), no per-request latency log (``enable_latency_logging`` off) and
the timing middleware's per-request trace lines silenced; listening on ``--host`` (KServe binds
0.0.0.0 and has no option for it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--serve", action="append", required=True, metavar="NAME=PATH", help="model name and ONNX file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p.parse_args(argv)


ARGS = parse_args(sys.argv[1:])
sys.argv[1:] = []  # kserve.model_server parses the command line when imported: give it none of ours
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort  # noqa: E402
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer  # noqa: E402
from kserve.protocol.rest import server as rest_server  # noqa: E402
from kserve.utils.utils import generate_uuid  # noqa: E402

ort.set_default_logger_severity(3)

ONNX_TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


def providers(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"--device cuda, but this onnxruntime has only {ort.get_available_providers()}")
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, when installed
        ort.preload_dlls()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxModel(Model):
    def __init__(self, name: str, path: Path, device: str):
        super().__init__(name)
        self.path = path
        self.device = device
        self.session: ort.InferenceSession | None = None
        self.load()

    def load(self) -> bool:
        options = ort.SessionOptions()  # as model_server/model.py makes its sessions
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=providers(self.device))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        assert self.session is not None
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        results = self.session.run(self.output_names, feeds)
        outputs = []
        for name, value in zip(self.output_names, results, strict=True):
            out = InferOutput(name=name, shape=list(value.shape), datatype=datatype(self.session, name))
            out.set_data_from_numpy(value, binary_data=payload.use_binary_outputs)
            outputs.append(out)
        return InferResponse(
            response_id=payload.id or generate_uuid(),
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


def datatype(session: ort.InferenceSession, output: str) -> str:
    [o] = [o for o in session.get_outputs() if o.name == output]
    return ONNX_TYPES[o.type]


def loopback_without_access_log(host: str) -> None:
    """KServe's RESTServer listens on 0.0.0.0 with uvicorn's access log on: neither is an option."""
    init = rest_server.RESTServer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.config.host = host
        self.config.access_log = False

    rest_server.RESTServer.__init__ = __init__


def main() -> None:
    models = []
    for item in ARGS.serve:
        name, _, path = item.partition("=")
        models.append(OnnxModel(name, Path(path), ARGS.device))
    loopback_without_access_log(ARGS.host)
    server = ModelServer(http_port=ARGS.port, workers=1, enable_grpc=False, enable_latency_logging=False)
    for logger in ("uvicorn.access", "kserve.trace"):  # the access log and the timing middleware's lines
        logging.getLogger(logger).setLevel(logging.WARNING)
    server.start(models)


if __name__ == "__main__":
    main()
