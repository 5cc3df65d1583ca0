"""ONNX Runtime model server speaking the KServe v2 / Triton HTTP protocol."""

__version__ = "0.1.0"
