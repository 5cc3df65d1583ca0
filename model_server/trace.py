"""Request identity: ``X-Request-ID`` and W3C trace context (``traceparent``).

Both are taken from the request when valid and made when absent, then carried unchanged to
the shadow path, the logs and the shadow log, so one id finds a request everywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: str = "01"

    @classmethod
    def from_header(cls, value: str | None) -> TraceContext:
        """Continue the caller's trace with a new span of ours, or start a new trace."""
        m = TRACEPARENT_RE.match(value.strip().lower()) if value else None
        if m and m.group(1) != "ff" and set(m.group(2)) != {"0"} and set(m.group(3)) != {"0"}:
            return cls(m.group(2), os.urandom(8).hex(), m.group(4))
        ids = os.urandom(24).hex()  # one read of the system's random source, not two
        return cls(ids[:32], ids[32:])

    def child(self) -> TraceContext:
        return TraceContext(self.trace_id, os.urandom(8).hex(), self.flags)

    @property
    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def request_id(value: str | None) -> str:
    return value if value is not None and REQUEST_ID_RE.match(value) else os.urandom(16).hex()


def item_hashes(data: np.ndarray, batched: bool) -> list[str]:
    """sha256 of each image (BYTES element) or batch item: the same on every path and log."""
    if data.dtype == object:
        return [hashlib.sha256(bytes(x)).hexdigest() for x in data.reshape(-1)]
    items = data if batched else data[None]
    return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in items]


ACCESS = logging.getLogger("model_server.access")
ACCESS.setLevel(logging.WARNING)  # --access-log turns it on


def log_access(
    path: str,
    model: str,
    version: str,
    request_id: str,
    trace: TraceContext,
    status: int,
    latency_ms: float,
    data: np.ndarray | None = None,
    batched: bool = True,
    error: str | None = None,
) -> None:
    """One JSON line per inference, primary or shadow, with the ids that join them."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    record = {
        "path": path,
        "model": model,
        "version": version,
        "request_id": request_id,
        "trace_id": trace.trace_id,
        "span_id": trace.span_id,
        "status": status,
        "latency_ms": round(latency_ms, 3),
        "image_sha256": item_hashes(data, batched) if data is not None else None,
    }
    if error:
        record["error"] = error
    ACCESS.info(json.dumps(record))
