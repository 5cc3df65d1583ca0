"""The shadow log: one row per mirrored image, masked, as Parquet partitioned by hour.

``<root>/dt=YYYY-MM-DD/hour=HH/part-<time>-<id>.parquet``. Rows are queued by the event
loop (a list append: logging never blocks serving) and masked, encoded and written by a
writer thread; each file is written to a hidden temporary name and renamed, so a file is
complete or absent. Records whose tenant has no usable key are dropped and counted; no
plaintext fallback exists.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import Counter

from model_server.masking import Masker, MaskingUnavailable
from model_server.shadow import ShadowResult
from model_server.trace import item_hashes

log = logging.getLogger(__name__)

RECORDS = Counter(
    "shadow_log_records_total",
    "Shadow log rows by outcome (written; dropped: writer backlog full; mask_unavailable: no "
    "usable key for the tenant; error: the write failed)",
    ("outcome",),
)
FILES = Counter("shadow_log_files_total", "Shadow log Parquet files written")

SCHEMA = pa.schema([
    ("time", pa.timestamp("us", tz="UTC")),
    ("request_id", pa.string()),
    ("item", pa.int32()),
    ("trace_id", pa.string()),
    ("span_id", pa.string()),
    ("model", pa.string()),
    ("primary_version", pa.string()),
    ("shadow_version", pa.string()),
    ("image_sha256", pa.string()),
    ("primary_top1", pa.int32()),
    ("shadow_top1", pa.int32()),
    ("primary_probs", pa.list_(pa.float32())),
    ("shadow_probs", pa.list_(pa.float32())),
    ("primary_latency_ms", pa.float64()),
    ("shadow_latency_ms", pa.float64()),
    ("shadow_error", pa.string()),
    ("user_id", pa.string()),
    ("device_type", pa.string()),
    ("tenant", pa.string()),
    ("meta", pa.string()),  # JSON object of the X-Meta-* headers
])  # fmt: skip


def _items(result: ShadowResult) -> list[dict[str, Any]]:
    """Unmasked rows, one per image (or batch item), for one shadow result."""
    job = result.job
    first = job.outputs[0]
    primary = np.asarray(job.primary_outputs[first])
    shadow = None if result.outputs is None else np.asarray(result.outputs[first])
    n = primary.shape[0] if primary.ndim > 1 else 1
    hashes = item_hashes(job.inputs[0].data, batched=n > 1 or primary.ndim > 1)
    rows = []
    for i in range(n):
        p = (primary[i] if n > 1 else primary).ravel().astype(np.float32)
        s = None if shadow is None else (shadow[i] if n > 1 else shadow).ravel().astype(np.float32)
        rows.append(
            {
                "time": datetime.fromtimestamp(job.received_at, UTC),
                "request_id": job.request_id,
                "item": i,
                "trace_id": job.trace.trace_id,
                "span_id": job.trace.span_id,
                "model": job.model,
                "primary_version": job.primary_version,
                "shadow_version": job.shadow_version,
                "image_sha256": hashes[i],
                "primary_top1": int(p.argmax()),
                "shadow_top1": None if s is None else int(s.argmax()),
                "primary_probs": p.tolist(),
                "shadow_probs": None if s is None else s.tolist(),
                "primary_latency_ms": job.primary_latency_ms,
                "shadow_latency_ms": result.latency_ms,
                "shadow_error": result.error,
            }
        )
    return rows


class ShadowLogWriter:
    """The shadow mirror's sink: ``writer(result)`` queues; a thread masks and writes."""

    def __init__(
        self,
        root: Path,
        masker: Masker,
        flush_s: float = 2.0,
        max_pending: int = 50_000,
        compression: str | None = "zstd",
    ):
        self.root = root
        self.masker = masker
        self.flush_s = flush_s
        self.max_pending = max_pending
        self.compression = compression
        self._pending: deque[ShadowResult] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shadow-log", daemon=True)
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self._thread.start()

    def __call__(self, result: ShadowResult) -> None:
        if len(self._pending) >= self.max_pending:
            RECORDS.labels("dropped").inc()
            return
        self._pending.append(result)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # keep the writer alive; the rows of this flush are counted lost
                log.exception("shadow log flush failed")

    def _masked_rows(self, result: ShadowResult) -> list[dict[str, Any]]:
        meta = result.job.metadata
        tenant = meta.get("x-tenant")
        masked = self.masker.mask_fields({"request_id": result.job.request_id, **meta}, tenant)
        extra = {k: v for k, v in masked.items() if k.startswith("x-meta-")}
        rows = _items(result)
        for row in rows:
            row["request_id"] = masked["request_id"]
            row["user_id"] = masked.get("x-user-id")
            row["device_type"] = masked.get("x-device-type")
            row["tenant"] = masked.get("x-tenant")
            row["meta"] = json.dumps(extra, sort_keys=True) if extra else None
        return rows

    def flush(self) -> int:
        """Write what is queued; returns the number of rows written."""
        batch = []
        while self._pending:
            batch.append(self._pending.popleft())
        if not batch:
            return 0
        by_hour: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for result in batch:
            try:
                rows = self._masked_rows(result)
            except MaskingUnavailable as exc:
                RECORDS.labels("mask_unavailable").inc()
                log.error("shadow record %s not logged: %s", result.job.request_id, exc)
                continue
            for row in rows:
                t = row["time"]
                by_hour.setdefault((t.strftime("%Y-%m-%d"), t.strftime("%H")), []).append(row)
        written = 0
        for (day, hour), rows in sorted(by_hour.items()):
            try:
                self._write(self.root / f"dt={day}" / f"hour={hour}", rows)
            except OSError as exc:
                RECORDS.labels("error").inc(len(rows))
                log.error("shadow log write failed in %s: %s", self.root, exc)
                continue
            RECORDS.labels("written").inc(len(rows))
            written += len(rows)
        return written

    def _write(self, folder: Path, rows: list[dict[str, Any]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = folder / f".{name}.tmp"
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        try:
            pq.write_table(table, tmp, compression=self.compression)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            tmp.replace(folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        FILES.inc()


def _hours(start: datetime, end: datetime) -> list[tuple[str, str]]:
    t = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    out = []
    while t < end:
        out.append((t.strftime("%Y-%m-%d"), t.strftime("%H")))
        t += timedelta(hours=1)
    return out


def read_shadow_log(root: Path, start: datetime, end: datetime, model: str | None = None) -> pd.DataFrame:
    """Every complete row with ``start <= time < end`` (UTC-aware datetimes), as one DataFrame."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware (UTC)")
    files = [
        f
        for day, hour in _hours(start, end)
        for f in sorted((root / f"dt={day}" / f"hour={hour}").glob("part-*.parquet"))
    ]
    if not files:
        return SCHEMA.empty_table().to_pandas()
    table = pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])
    df = table.to_pandas()
    mask = (df["time"] >= pd.Timestamp(start)) & (df["time"] < pd.Timestamp(end))
    if model is not None:
        mask &= df["model"] == model
    return df[mask].reset_index(drop=True)
