"""The prediction log: one record per inference (primary or shadow) and per feedback label.

Every serving process appends to the same log, a local folder or object storage (``s3://``
through ``pyarrow.fs``), in the layout
``<root>/model=<model>/dt=YYYY-MM-DD/hour=HH/part-<replica>-<YYYYmmddTHHMMSS>Z-<uuid12>.parquet``
(the folder by the UTC hour the request was received, the name by the UTC second the file was
written), so replicas write side by side and never to the same file.

Writing: the request path only appends a tuple to a bounded buffer (a full buffer drops the
record and counts it); a writer thread, every ``flush_s`` and at shutdown, masks, hashes the
images, takes the top-k, encodes Parquet and writes one file per partition. A local file is
written under a hidden temporary name in its folder, fsynced and renamed; an object is sent in
one PUT of a complete file (files stay under the multipart threshold), so a file is complete or
absent. A tenant whose masking key cannot be loaded loses its records (counted), never to
plaintext.

Reading: ``read`` selects a time range with partition pruning and column projection, skipping
and counting unreadable files and malformed records; ``joined`` pairs primary, shadow and label
records by ``(model, request_id, item)``; ``shadow_pairs`` gives the shadow audit its rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import re2

from model_server import metrics
from model_server.config import MAX_FLUSH_S, MIN_FLUSH_S
from model_server.errors import MaskingUnavailable
from model_server.files import filesystem, list_folder, store_errors, write_private
from model_server.masking import SUSPECT, SUSPECT_PARTS, Key, Masker
from model_server.trace import item_hashes

if TYPE_CHECKING:  # imported where a frame is made: the server's start does without it (about 1 s)
    import pandas as pd

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("us", tz="UTC")),  # when the request (or label) was received
        ("model", pa.string()),
        ("version", pa.string()),
        ("role", pa.string()),  # primary | shadow | label
        ("route", pa.string()),  # route | <rule name> | version | mirror | probe
        ("replica", pa.string()),
        ("request_id", pa.string()),  # masked
        ("trace_id", pa.string()),
        ("span_id", pa.string()),
        ("item", pa.int32()),
        ("latency_ms", pa.float64()),
        ("outcome", pa.string()),  # ok | INVALID_INPUT | BACKEND | OOM | REJECTED | CANCELED | FAULT | DROPPED
        # An answer (outcome ok) whose output row is no finite distribution (a NaN or Inf input's
        # NaN) has no top-1, top-k or probs; its top1_prob is NaN (null: no output at all).
        ("top1", pa.int32()),
        ("top1_prob", pa.float32()),
        ("topk_index", pa.list_(pa.int32())),
        ("topk_prob", pa.list_(pa.float32())),
        ("probs", pa.list_(pa.float32())),  # the whole vector when it is short enough
        ("image_sha256", pa.string()),
        ("label", pa.int32()),
        ("user_id", pa.string()),
        ("device_type", pa.string()),
        ("tenant", pa.string()),
        ("meta", pa.string()),  # masked JSON object of the X-Meta-* headers
        # A primary the serving process sampled for its mirror (true: its copy's record will
        # come) or not (false); null where it cannot know (a route Istio's mirror samples, a
        # shadow or label record, an older writer's file).
        ("mirrored", pa.bool_()),
        # The first output as the model answered it: its datatype and the shape of an item
        # (``output_kind``: FP32[10]); the audit's pairs of another dtype or shape compare nothing.
        ("output", pa.string()),
        # Whose request a record is where its tenant is masked (a token of its masking key, that
        # changes with the key), comparable across masking keys, their rotations and pods
        # (``FeedbackSigner.tag``: 53 bits of the HMAC of model, request id and tenant under the
        # feedback key every replica shares; its label's record carries the same). Null for a
        # tenant written as it came or none, from a writer not told how (``PredictionLog.tag``)
        # and in an older writer's file.
        ("tenant_tag", pa.int64()),
    ]
)
# Columns added after the log's first files: a file without one is read with it null (as its
# writer could not say), not skipped as of a wrong schema.
LATER_COLUMNS = frozenset({"mirrored", "output", "tenant_tag"})
ROLES = ("primary", "shadow", "label")
REPLICA_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY = ["model", "request_id", "item"]
# What the shadow audit reads (shadow_pairs) and what a gate reads: column projections.
SHADOW_PAIR_COLUMNS = [
    "time",
    "model",
    "version",
    "role",
    "route",
    "request_id",
    "item",
    "trace_id",
    "span_id",
    "image_sha256",
    "top1",
    "probs",
    "topk_index",
    "topk_prob",
    "latency_ms",
    "outcome",
    "user_id",
    "device_type",
    "tenant",
    "tenant_tag",
    "meta",
    "output",
]
# What the shadow audit reads: the pairs and what counts the copies against the mirror's
# sampling (``vision_rollout.audit.copy_check``).
AUDIT_COLUMNS = [*SHADOW_PAIR_COLUMNS, "replica", "mirrored"]
# What the rollout's gate reads: the arms (role, route, version), latency and outcome, top-1 and
# the image hash (the replay's truth) or the label joined by request id, and the label's tenant.
GATE_COLUMNS = [
    "time",
    "model",
    "version",
    "role",
    "route",
    "request_id",
    "item",
    "latency_ms",
    "outcome",
    "top1",
    "image_sha256",
    "label",
    "tenant",
    "tenant_tag",
]
PAIR_COLUMNS = [
    "time",
    "request_id",
    "item",
    "trace_id",
    "span_id",
    "model",
    "primary_version",
    "shadow_version",
    "image_sha256",
    "primary_top1",
    "shadow_top1",
    "primary_probs",
    "shadow_probs",
    "primary_latency_ms",
    "shadow_latency_ms",
    "shadow_error",
    "shadow_finite",
    "output_differs",
    "primary_output",
    "shadow_output",
    "user_id",
    "device_type",
    "tenant",
    "meta",
]

_OUTPUT_COLUMNS = ("top1", "top1_prob", "topk_index", "topk_prob", "probs")
MAX_FILE_BYTES = 8 * 1024 * 1024  # below pyarrow's S3 part size (10 MiB): one PUT per object
# What one file's columns may take in a reader's memory: a larger one is skipped, unread (a
# 500 KB file of repeated 1 KB ids held 7 GB). The writer's tables stay far below it.
MAX_READ_BYTES = 1024 * 1024 * 1024
MAX_TABLE_BYTES = 64 * 1024 * 1024  # a written file's table in memory (split by rows when larger)
# A file's footer a read takes (a writer's file, a row group or two, has a few KB of it): each
# is parsed in Python (``_Footer``, about 1 s a MB), so a file of a row group a record held a
# read's thread past its deadline for minutes.
MAX_FOOTER_BYTES = 1024 * 1024
_MASK_CACHE_MAX = 100_000
# Classes an answer may have (a top-k index below it, a whole vector no longer): a record beyond
# it is malformed (a damaged file's index of 2**31 made each rebuilt vector 8 GB; one of this
# many classes takes 64 MB, a chunk of rebuilt vectors one row).
MAX_CLASSES = 2**24


class _MaskCache(dict[Any, Any]):
    """Masked values by what they were masked from, bounded in entries and in characters (a
    long header kept per entry held ~100 MB in a soak; not kept at all, re-masking it on every
    flush cost the well-behaved clients' p99): cleared whole when either bound is reached."""

    MAX_CHARS = 16 * 1024 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.chars = 0

    def put(self, key: Any, value: Any, chars: int) -> None:
        if len(self) >= _MASK_CACHE_MAX or self.chars + chars > self.MAX_CHARS:
            self.clear()
            self.chars = 0
        self[key] = value
        self.chars += chars


# pc.match_substring_regex compiles its pattern on every call: about 1 ms for SUSPECT's parts
# however few the texts. Fewer than FEW_TEXTS are searched one by one with SUSPECT compiled once
# (a few us each). Measured side by side (request ids, uuid or client-chosen), one by one was
# the cheaper up to 256-320 texts (at 64: 0.1-0.2 of the Arrow pass' time), the Arrow pass
# from 384-512 on (at 1000: 0.15-0.3 of one by one's).
FEW_TEXTS = 256
_SUSPECT = re2.compile(SUSPECT)


def suspects(texts: list[str]) -> np.ndarray:
    """Which of ``texts`` a detector may match (``masking.SUSPECT``, or beyond ASCII: not
    ``_plain``): in one vectorised pass for each of SUSPECT's parts, or for a few texts one
    search each."""
    if len(texts) < FEW_TEXTS:
        return np.array([not t.isascii() or _SUSPECT.search(t) is not None for t in texts], dtype=bool)
    arr = pa.array(texts, pa.string())
    found = pc.invert(pc.string_is_ascii(arr))
    for part in SUSPECT_PARTS:
        found = pc.or_(found, pc.match_substring_regex(arr, part))
    return found.to_numpy(zero_copy_only=False)


class Inference(NamedTuple):
    """One inference as the request path hands it over: references only, nothing computed."""

    received_at: float  # time.time()
    model: str
    version: str
    role: str  # primary | shadow
    route: str | None
    request_id: str
    trace_id: str
    span_id: str
    latency_ms: float | None
    outcome: str
    scores: np.ndarray | None  # the first output: [batch, classes] (or [classes])
    data: np.ndarray | None  # the first input: image bytes or a tensor, hashed by the writer
    batched: bool
    metadata: Mapping[str, str]  # user, device, tenant and X-Meta-* headers, unmasked
    items: int = 1  # rows this record becomes
    size: int = 0  # bytes its input holds (the request body), for the buffer's byte budget
    mirrored: bool | None = None  # a primary its process sampled for its mirror (None: unknown)

    @property
    def held(self) -> int:
        """The bytes it holds, its output's too (a detector's [1, 25200, 85] is 8.5 MB beside a
        50 KB image), for the buffer's byte budget."""
        return self.size + (self.scores.nbytes if self.scores is not None else 0)


class Label(NamedTuple):
    received_at: float
    model: str
    version: str | None  # the version that served it, when this replica knows
    request_id: str
    labels: Sequence[int]  # one per item
    tenant: str | None  # whose key masks the request id (the request's tenant)
    # For the live view, counted once its rows are written (``on_label_written``), never written
    # to the log: its items right against the top-1 served here (matched: with ``version``),
    # else why it was not matched here (feedback_unmatched_total's reason).
    correct: int | None = None
    why: str | None = None

    @property
    def held(self) -> int:
        """About the bytes it holds, for the buffer's byte budget."""
        return 64 + len(self.request_id) + 8 * len(self.labels)


def default_replica() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:50] or "host"
    return f"{name}-{os.getpid()}"


def _is_distribution(rows: np.ndarray) -> np.ndarray:
    return (rows >= 0).all(axis=1) & (np.abs(rows.sum(axis=1) - 1.0) < 1e-3)


def output_probabilities(rows: np.ndarray) -> np.ndarray:
    """Rows as they are when each is a probability distribution, else their softmax (logits).
    A row with a NaN, a +Inf or nothing but -Inf has no softmax: its row here holds a NaN (see
    ``finite_rows``)."""
    rows = rows.astype(np.float32, copy=False)
    ok = _is_distribution(rows)
    if ok.all():
        return rows
    out = rows.copy()
    with np.errstate(invalid="ignore"):  # inf - inf: the NaN that marks the row
        z = rows[~ok] - rows[~ok].max(axis=1, keepdims=True)
        e = np.exp(z)
        out[~ok] = e / e.sum(axis=1, keepdims=True)
    return out


def finite_rows(probs: np.ndarray) -> np.ndarray:
    """Which rows of ``output_probabilities`` are a distribution (every value finite). The
    others are no prediction: a client may send NaN or Inf in a float tensor (the binary tensor
    extension carries any bit pattern; Triton runs it, as this server does), and the model's
    answer to it is NaN; neither is a class."""
    return np.isfinite(probs).all(axis=1)


def score_rows(scores: np.ndarray) -> np.ndarray:
    """A first output as the log ranks it: a row per item of its first dimension (the rest
    flattened: [batch, 1000, 1, 1] is 1000 classes), a one-dimensional output one row (a model
    that does not batch)."""
    arr = np.asarray(scores)
    # (the count, not -1: an output of no rows, a detector's when it found nothing, has any)
    return arr.reshape(arr.shape[0], math.prod(arr.shape[1:])) if arr.ndim >= 2 else arr.reshape(1, -1)


_DATATYPES = {
    np.dtype(t): name
    for name, t in (
        ("BOOL", "?"),
        ("UINT8", "u1"),
        ("UINT16", "u2"),
        ("UINT32", "u4"),
        ("UINT64", "u8"),
        ("INT8", "i1"),
        ("INT16", "i2"),
        ("INT32", "i4"),
        ("INT64", "i8"),
        ("FP16", "f2"),
        ("FP32", "f4"),
        ("FP64", "f8"),
    )
}


def output_kind(scores: np.ndarray | None) -> str | None:
    """A first output's datatype (KServe v2's name; BYTES for strings) and the shape of one of
    its rows (``score_rows``' items: the dimensions after the first), as ``FP32[10]``; None
    without an output."""
    if scores is None:
        return None
    arr = np.asarray(scores)
    return _kind(arr.dtype, arr.shape[1:] if arr.ndim >= 2 else arr.shape)


@lru_cache(maxsize=256)  # (a model's outputs have one or a few: the writer named each record's, 1.4 us, anew)
def _kind(dtype: np.dtype[Any], row: tuple[int, ...]) -> str:
    name = "BYTES" if dtype.kind in "OSU" else _DATATYPES.get(dtype.newbyteorder("="), dtype.str)
    return f"{name}[{','.join(map(str, row))}]"


def predicted_classes(scores: np.ndarray) -> np.ndarray:
    """The top-1 class of each of a classifier's rows (``score_rows``), as the log writes it (the
    first of the highest probabilities); -1 where the row is no distribution."""
    probs = output_probabilities(score_rows(scores))
    if probs.shape[1] == 0:
        return np.full(len(probs), -1, np.int64)
    return np.where(finite_rows(probs), probs.argmax(axis=1), -1)


# The masked request metadata repeats per user and device: read as categoricals, they take a
# fraction of the memory of one string per record.
_CATEGORICAL = ("user_id", "device_type", "tenant", "meta")
_MaskedMeta = tuple[str | None, str | None, str | None, str | None]  # user, device, tenant, meta


class PredictionLog:
    """The writer: ``append`` on the request path, a thread that masks, encodes and writes."""

    def __init__(
        self,
        uri: str | Path,
        masker: Masker,
        replica: str | None = None,
        flush_s: float = 2.0,
        sample: float = 1.0,
        topk: int = 5,
        full_max: int = 32,
        max_pending: int = 100_000,
        max_pending_bytes: int = 256 * 1024 * 1024,
        compression: str | None = "zstd",
    ):
        replica = default_replica() if replica is None else replica
        if not REPLICA_RE.fullmatch(replica):
            raise ValueError(f"invalid replica id {replica!r}: 1 to 64 of A-Z a-z 0-9 _ . -")
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample must be within 0..1, got {sample}")
        if topk < 1 or full_max < 0:
            raise ValueError("topk must be at least 1 and full_max at least 0")
        if not MIN_FLUSH_S <= flush_s <= MAX_FLUSH_S:  # (NaN too) 0 spun the writer; a rollout waits for it
            raise ValueError(f"the flush interval must be within {MIN_FLUSH_S:g}..{MAX_FLUSH_S:g} s, got {flush_s}")
        self.uri = str(uri)
        self.fs, self.root = filesystem(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.masker = masker
        self.replica = replica
        self.flush_s = flush_s
        metrics.PREDICTION_LOG_FLUSH_SECONDS.set(flush_s)
        self.sample = sample
        self.topk = topk
        self.full_max = full_max
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self.compression = compression
        self._pending: list[Inference | Label] = []
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prediction-log", daemon=True)
        self._mask_cache = _MaskCache()  # (key id, whole, value) -> masked
        # Told of each label lost at a flush (its tenant's key unusable, its table or file not
        # written), from the writer's thread: the data plane takes back its mark, so that it may
        # be sent again.
        self.on_label_dropped: Callable[[Label], None] | None = None
        # Told of each label whose rows are all in files written (after the write or upload of the
        # last of them), from the writer's thread, once: the data plane counts it in the live view.
        self.on_label_written: Callable[[Label], None] | None = None
        # Each record's ``tenant_tag`` from its model, request id and tenant (the data plane's
        # ``FeedbackSigner.tag``); None: the column is null.
        self.tag: Callable[[str, str, str | None], int] | None = None
        self._meta_cache = _MaskCache()  # (key id, metadata items) -> _MaskedMeta
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # -- the request path: cheap ------------------------------------------------------------

    def sampled(self, request_id: str) -> bool:
        """Whether a primary request is kept: a stable hash of its id (the same on every replica)."""
        if self.sample >= 1.0:
            return True
        return zlib.crc32(request_id.encode()) < self.sample * 4294967296.0

    def append(self, record: Inference | Label) -> bool:
        """Queue one record; False (and counted) when the buffer is full. Never blocks on I/O."""
        size = record.held
        with self._lock:
            if len(self._pending) < self.max_pending and self._pending_bytes + size <= self.max_pending_bytes:
                self._pending.append(record)
                self._pending_bytes += size
                metrics.PREDICTION_LOG_HELD.inc()
                return True
        rows = record.items if isinstance(record, Inference) else len(record.labels)
        metrics.PREDICTION_LOG_RECORDS.labels("dropped").inc(rows)
        return False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception:  # keep the writer alive (each step of a flush counts its own failures)
                log.exception("prediction log flush failed")

    # -- the writer thread ------------------------------------------------------------------------

    def _key(self, tenant: str | None, keys: dict[str | None, Key | MaskingUnavailable]) -> Key:
        if tenant not in keys:
            try:
                keys[tenant] = self.masker.keys.key_for(tenant)
            except MaskingUnavailable as exc:
                keys[tenant] = exc
        key = keys[tenant]
        if isinstance(key, MaskingUnavailable):
            raise key
        return key

    def _mask(self, name: str, value: str, key: Key) -> str:
        """As ``Masker.mask_fields``: configured names whole, other values by the detectors."""
        whole = self.masker.masks_whole(name)
        k = (key.kid, whole, value)
        out = self._mask_cache.get(k)
        if out is None:
            out = self.masker.token(value, key) if whole else self.masker.mask_text(value, key)
            self._mask_cache.put(k, out, len(value) + len(out))
        return out

    def _masked_meta(self, metadata: Mapping[str, str], key: Key) -> _MaskedMeta:
        """(user_id, device_type, tenant, meta JSON) masked under ``key``, cached by the values
        (headers repeat per user and device)."""
        items = tuple(metadata.items())
        cached = self._meta_cache.get((key.kid, items))
        if cached is None:
            masked = {name: self._mask(name, value, key) for name, value in items}
            # a header's name is written too: "X-Meta-13800138000: 1" leaks like a value
            extra = {self._mask("", k, key): v for k, v in masked.items() if k.startswith("x-meta-")}
            cached = (
                masked.get("x-user-id"),
                masked.get("x-device-type"),
                masked.get("x-tenant"),
                json.dumps(extra, sort_keys=True) if extra else None,
            )
            self._meta_cache.put(
                (key.kid, items), cached, sum(len(n) + len(v) for n, v in items) + len(cached[3] or "")
            )
        return cached

    def _mask_ids(self, ids: list[str], keys: list[Key]) -> list[str]:
        """Request ids masked as ``Masker.mask_fields`` masks them. Only the ids a detector could
        match (found in one vectorised pass) go through the detectors; the others are unchanged."""
        if "request_id" in self.masker.header_names:
            return [self.masker.token(rid, key) for rid, key in zip(ids, keys, strict=True)]
        if not ids:
            return ids
        out = list(ids)
        for i in np.flatnonzero(suspects(ids)):
            out[i] = self.masker.mask_text(ids[i], keys[i])
        return out

    def _with_keys(
        self, records: list[Any], tenants: list[str | None], keys: dict[str | None, Key | MaskingUnavailable]
    ) -> tuple[list[Any], list[Key], list[str | None]]:
        """The records whose tenant has a usable key, with the keys; the others counted, dropped."""
        for t in set(tenants) - keys.keys():
            try:
                keys[t] = self.masker.keys.key_for(t)
            except MaskingUnavailable as exc:
                keys[t] = exc
        if all(isinstance(keys[t], Key) for t in set(tenants)):
            return records, [keys[t] for t in tenants], tenants  # type: ignore[misc]
        kept, kept_keys, kept_tenants = [], [], []
        dropped: dict[str | None, list[Any]] = {}
        for rec, t in zip(records, tenants, strict=True):
            key = keys[t]
            if isinstance(key, Key):
                kept.append(rec)
                kept_keys.append(key)
                kept_tenants.append(t)
                continue
            dropped.setdefault(t, []).append(rec)
            metrics.PREDICTION_LOG_RECORDS.labels("mask_unavailable").inc(
                len(rec.labels) if isinstance(rec, Label) else rec.items
            )
        for t, recs in dropped.items():  # a line per tenant and flush, not per request: the error is the key's
            more = f" and {len(recs) - 1} more" if len(recs) > 1 else ""
            log.error("prediction log records of request %s%s dropped: %s", recs[0].request_id, more, keys[t])
        return kept, kept_keys, kept_tenants

    def _inference_table(
        self, recs: list[Inference], keys: dict[str | None, Key | MaskingUnavailable]
    ) -> pa.Table | None:
        """The records' rows as a table: per-record work in comprehensions, per-row work in numpy
        and Arrow, so that the writer holds the GIL as little as it can."""
        tenants = [r.metadata.get("x-tenant") for r in recs]
        recs, rec_keys, tenants = self._with_keys(recs, tenants, keys)
        n = len(recs)
        if n == 0:
            return None
        meta = [self._masked_meta(r.metadata, k) for r, k in zip(recs, rec_keys, strict=True)]
        rids = self._mask_ids([r.request_id for r in recs], rec_keys)
        outputs: list[np.ndarray | None] = []
        for r in recs:
            out = None
            # An output of strings (a BYTES tensor: labels, text) is no score: its record has no
            # top-1 or top-k, as one without an output (its conversion failed the whole table).
            if r.scores is not None and np.asarray(r.scores).dtype.kind in "biuf":
                out = score_rows(r.scores)
                if out.size == 0:  # (no class, or no row: a detector's output when it found nothing)
                    out = None
            outputs.append(out)
        counts = np.array(
            [o.shape[0] if o is not None else max(r.items, 1) for r, o in zip(recs, outputs, strict=True)],
            np.int64,
        )
        rows = int(counts.sum())
        single = rows == n  # one row per record: the usual case, nothing to repeat
        rep = None if single else np.repeat(np.arange(n), counts)
        starts = np.cumsum(counts) - counts
        hashes: list[str | None] = []
        for r, c in zip(recs, counts, strict=True):
            h = _hashes(r.data, r.batched)
            hashes.extend(h if len(h) == c else (h + [None] * int(c))[: int(c)])

        def column(values: list[Any], name: str) -> pa.Array:
            return _column(values, name, rep)

        us = np.array([int(r.received_at * 1_000_000) for r in recs], np.int64)
        cols: dict[str, pa.Array] = {
            "time": pa.array(us if rep is None else us[rep]).cast(SCHEMA.field("time").type),
            "model": column([r.model for r in recs], "model"),
            "version": column([r.version for r in recs], "version"),
            "role": column([r.role for r in recs], "role"),
            "route": column([r.route for r in recs], "route"),
            "replica": pa.array([self.replica] * rows, pa.string()),
            "request_id": column(rids, "request_id"),
            "trace_id": column([r.trace_id for r in recs], "trace_id"),
            "span_id": column([r.span_id for r in recs], "span_id"),
            "item": pa.array(np.zeros(rows, np.int32) if single else _within(counts).astype(np.int32)),
            "latency_ms": column([r.latency_ms for r in recs], "latency_ms"),
            "outcome": column([r.outcome for r in recs], "outcome"),
            "image_sha256": pa.array(hashes, pa.string()),
            "label": pa.nulls(rows, pa.int32()),
            "user_id": column([m[0] for m in meta], "user_id"),
            "device_type": column([m[1] for m in meta], "device_type"),
            "tenant": column([m[2] for m in meta], "tenant"),
            "meta": column([m[3] for m in meta], "meta"),
            "mirrored": column([r.mirrored for r in recs], "mirrored"),
            "output": column([output_kind(r.scores) for r in recs], "output"),
            "tenant_tag": self._tags(recs, tenants, [m[2] for m in meta], rep),
        }
        cols.update(self._output_columns(outputs, counts, starts, rows))
        return pa.table([cols[name] for name in SCHEMA.names], schema=SCHEMA)

    def _tags(
        self,
        recs: Sequence[Inference | Label],
        tenants: list[str | None],
        masked: list[str | None],
        rep: np.ndarray | None,
    ) -> pa.Array:
        """``tenant_tag`` where the tenant was written masked (a token of its key, that changes
        with it); null where it was written as it came, or none (the same on every pod)."""
        tag = self.tag
        values = [
            None if tag is None or m == t else tag(r.model, r.request_id, t)
            for r, t, m in zip(recs, tenants, masked, strict=True)
        ]
        return _column(values, "tenant_tag", rep)

    def _output_columns(
        self, outputs: list[np.ndarray | None], counts: np.ndarray, starts: np.ndarray, rows: int
    ) -> dict[str, pa.Array]:
        """top1, top1_prob, topk_index, topk_prob and probs of every row, per class count."""
        top1 = np.zeros(rows, np.int32)
        top1_prob = np.zeros(rows, np.float32)
        k_of = np.zeros(rows, np.int32)
        full_of = np.zeros(rows, np.int32)
        not_finite = np.zeros(rows, bool)
        groups: dict[int, list[int]] = {}
        for i, o in enumerate(outputs):
            if o is not None:
                groups.setdefault(o.shape[1], []).append(i)
        computed: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        for classes, members in groups.items():
            m = np.asarray(members)
            blocks = [outputs[i] for i in members]
            probs = output_probabilities(np.concatenate(blocks) if len(blocks) > 1 else blocks[0])  # type: ignore[arg-type]
            c = counts[m]
            at = np.repeat(starts[m], c) + _within(c)
            finite = finite_rows(probs)
            if not finite.all():  # no prediction: kept, marked (no top-1, a NaN top-1 probability)
                not_finite[at[~finite]] = True
                at, probs = at[finite], probs[finite]
            k = min(self.topk, classes)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            best = np.take_along_axis(probs, order, axis=1)
            top1[at] = order[:, 0]
            top1_prob[at] = best[:, 0]
            k_of[at] = k
            keep_full = classes <= self.full_max
            if keep_full:
                full_of[at] = classes
            computed.append((at, order, best, probs if keep_full else None))
        if not_finite.any():
            top1_prob[not_finite] = np.nan
            metrics.PREDICTION_LOG_NOT_FINITE.inc(int(not_finite.sum()))
        absent = k_of == 0
        topk_off, full_off = _offsets(k_of), _offsets(full_of)
        topk_index = np.empty(topk_off[-1], np.int32)
        topk_prob = np.empty(topk_off[-1], np.float32)
        full = np.empty(full_off[-1], np.float32)
        for at, order, best, kept in computed:  # scatter each group's rows to their places
            pos = topk_off[at][:, None] + np.arange(order.shape[1])
            topk_index[pos] = order
            topk_prob[pos] = best
            if kept is not None:
                full[full_off[at][:, None] + np.arange(kept.shape[1])] = kept
        return {
            "top1": pa.array(top1, mask=absent),
            "top1_prob": pa.array(top1_prob, mask=absent & ~not_finite),
            "topk_index": pa.ListArray.from_arrays(topk_off, topk_index, mask=pa.array(absent)),
            "topk_prob": pa.ListArray.from_arrays(topk_off, topk_prob, mask=pa.array(absent)),
            "probs": pa.ListArray.from_arrays(full_off, full, mask=pa.array(full_of == 0)),
        }

    def _label_table(self, recs: list[Label], keys: dict[str | None, Key | MaskingUnavailable]) -> pa.Table | None:
        recs, rec_keys, tenants = self._with_keys(recs, [r.tenant for r in recs], keys)
        if not recs:
            return None
        rids = self._mask_ids([r.request_id for r in recs], rec_keys)
        counts = np.array([len(r.labels) for r in recs], np.int64)
        rows = int(counts.sum())
        rep = np.repeat(np.arange(len(recs)), counts)

        def column(values: list[Any], name: str) -> pa.Array:
            return _column(values, name, rep)

        us = np.array([int(r.received_at * 1_000_000) for r in recs], np.int64)
        labels = np.fromiter((label for r in recs for label in r.labels), np.int64, rows)
        tenant = [None if t is None else self._mask("x-tenant", t, k) for t, k in zip(tenants, rec_keys, strict=True)]
        cols: dict[str, pa.Array] = {
            "time": pa.array(np.repeat(us, counts)).cast(SCHEMA.field("time").type),
            "model": column([r.model for r in recs], "model"),
            "version": column([r.version for r in recs], "version"),
            "role": pa.array(["label"] * rows, pa.string()),
            "replica": pa.array([self.replica] * rows, pa.string()),
            "request_id": column(rids, "request_id"),
            "item": pa.array(_within(counts).astype(np.int32)),
            "outcome": pa.array(["ok"] * rows, pa.string()),
            "label": pa.array(labels, pa.int32()),  # (safe: a value over int32 raises, never wraps)
            "tenant": column(tenant, "tenant"),
            "tenant_tag": self._tags(recs, tenants, tenant, rep),
        }
        return pa.table(
            [cols.get(name, pa.nulls(rows, SCHEMA.field(name).type)) for name in SCHEMA.names], schema=SCHEMA
        )

    def flush(self) -> int:
        """Write what is queued; returns the number of rows written."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, []
                self._pending_bytes = 0
            if not batch:
                return 0
            try:
                return self._write_batch(batch)
            finally:  # (written or dropped: no longer held)
                metrics.PREDICTION_LOG_HELD.dec(len(batch))

    def _write_batch(self, batch: list[Inference | Label]) -> int:
        """Write ``batch`` (``flush``'s, taken from the queue), a file an hour and model."""
        groups: dict[tuple[str, int], list[Any]] = {}
        for rec in batch:
            # The hour of the microsecond the record stores, so the file's folder and its times agree.
            groups.setdefault((rec.model, int(rec.received_at * 1_000_000) // 3_600_000_000), []).append(rec)
        keys: dict[str | None, Key | MaskingUnavailable] = {}
        written = 0
        for (model, hour), recs in sorted(groups.items()):
            t = datetime.fromtimestamp(hour * 3600, UTC)
            folder = f"{self.root}/model={model}/dt={t:%Y-%m-%d}/hour={t:%H}"
            inferences = [r for r in recs if type(r) is Inference]
            labels = [r for r in recs if type(r) is Label]
            answers = self._part(inferences, partial(self._inference_table, inferences, keys), folder)
            labelled = self._part(labels, partial(self._label_table, labels, keys), folder)
            parts = [part for part in (answers, labelled) if part is not None]
            # (the labels its keys kept, in their rows' order after the answers' rows; the others,
            # or all where its table failed, told lost: each once a flush, and may be sent again)
            kept = [labelled is not None and isinstance(keys[r.tenant], Key) for r in labels]
            self._lost(r for r, k in zip(labels, kept, strict=True) if not k)
            labels = [r for r, k in zip(labels, kept, strict=True) if k]
            if not parts:
                continue
            spans, row = [], 0 if answers is None else answers.num_rows
            for r in labels:
                spans.append((row, row + len(r.labels), r))
                row += len(r.labels)
            try:
                table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            except Exception as exc:  # (its rows counted lost, its labels told: they may be sent again)
                rows = sum(part.num_rows for part in parts)
                metrics.PREDICTION_LOG_RECORDS.labels("error").inc(rows)
                log.error("prediction log: %d rows for %s not joined in one table: %s", rows, folder, exc)
                self._lost(labels)
                continue
            written += self._write(folder, table, spans)
        return written

    def _lost(self, labels: Iterable[Label]) -> None:
        """Tell the data plane of labels queued and not written (``on_label_dropped``)."""
        self._tell(self.on_label_dropped, labels)

    @staticmethod
    def _tell(hook: Callable[[Label], None] | None, labels: Iterable[Label]) -> None:
        """``hook`` of each label; one that raises is logged and the others told all the same (the
        writer's flush goes on: a hook's failure must not lose the files after it)."""
        if hook is None:
            return
        for label in labels:
            try:
                hook(label)
            except Exception:  # (no request id in the line: the log masks them)
                log.exception("prediction log: the data plane's hook for a label failed")

    @staticmethod
    def _part(
        recs: Sequence[Inference | Label], table_of: Callable[[], pa.Table | None], folder: str
    ) -> pa.Table | None:
        """The records' table; records it cannot hold lose their own rows, counted, not the others'."""
        try:
            return table_of() if recs else None
        except Exception as exc:
            metrics.PREDICTION_LOG_RECORDS.labels("error").inc(sum(_rows_of(r) for r in recs))
            log.error("prediction log: %d records for %s not written: %s", len(recs), folder, exc)
            return None

    def _encode(self, table: pa.Table, start: int = 0) -> list[tuple[pa.Buffer, pa.Table, int]]:
        """Parquet files of the table, each under MAX_FILE_BYTES and of a table under
        MAX_TABLE_BYTES (split by rows when larger), each with its first row's place."""
        if table.nbytes <= MAX_TABLE_BYTES or table.num_rows < 2:
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression=self.compression)
            buf = sink.getvalue()
            if buf.size <= MAX_FILE_BYTES or table.num_rows < 2:
                return [(buf, table, start)]
        half = table.num_rows // 2
        return self._encode(table.slice(0, half), start) + self._encode(table.slice(half), start + half)

    def _write(self, folder: str, table: pa.Table, labels: Sequence[tuple[int, int, Label]] = ()) -> int:
        """The table's files in ``folder``; the rows written. A file that cannot be written loses
        its own rows, counted; the others are written (and counted written: readers see them).
        ``labels``: the rows (start, end) of each label; one that lost a row is ``_lost``, one
        whose rows are all written is told written (``on_label_written``)."""
        try:
            files = self._encode(table)
        except Exception as exc:
            metrics.PREDICTION_LOG_RECORDS.labels("error").inc(table.num_rows)
            log.error("prediction log: %d rows for %s not encoded: %s", table.num_rows, folder, exc)
            self._lost(label for _, _, label in labels)
            return 0
        written, lost = 0, set[int]()
        for buf, part, start in files:
            # The UTC second of the write: every record in the file was received before it (read
            # prunes by it), by the clock that stamped them: never before the last of them, should
            # the clock have stepped back since (a file named earlier would be pruned from a range
            # that holds its records).
            last = pc.max(part["time"]).value / 1_000_000
            second = time.gmtime(max(time.time(), last))
            name = f"part-{self.replica}-{time.strftime('%Y%m%dT%H%M%SZ', second)}-{uuid.uuid4().hex[:12]}.parquet"
            try:
                if self.local:
                    write_private(Path(folder) / name, memoryview(buf))
                else:  # an object store: the object appears whole when its single PUT completes
                    with self.fs.open_output_stream(f"{folder}/{name}") as out:
                        out.write(buf)
            except Exception as exc:
                metrics.PREDICTION_LOG_RECORDS.labels("error").inc(part.num_rows)
                log.error("prediction log write of %d rows in %s failed: %s", part.num_rows, folder, exc)
                lost.update(
                    i for i, (first, end, _) in enumerate(labels) if first < start + part.num_rows and end > start
                )
                continue
            metrics.PREDICTION_LOG_FILES.inc()
            metrics.PREDICTION_LOG_RECORDS.labels("written").inc(part.num_rows)
            written += part.num_rows
        self._lost(labels[i][2] for i in sorted(lost))  # (once each, whatever the files it had rows in)
        self._tell(self.on_label_written, (r for i, (_, _, r) in enumerate(labels) if i not in lost))  # (the others)
        return written


def _rows_of(rec: Inference | Label) -> int:
    return len(rec.labels) if isinstance(rec, Label) else max(rec.items, 1)


def _hashes(data: np.ndarray | None, batched: bool) -> list[str]:
    """``trace.item_hashes`` (without its detours for the usual array of images); [] when the
    input cannot be hashed item by item."""
    if data is None:
        return []
    try:
        if data.dtype == object and data.ndim == 1:
            return [hashlib.sha256(x).hexdigest() for x in data]
        return item_hashes(data, batched=batched)
    except (TypeError, ValueError):
        return []


def _within(counts: np.ndarray) -> np.ndarray:
    """Each row's index within its group, for groups of ``counts`` rows laid end to end."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _column(values: list[Any], name: str, rep: np.ndarray | None) -> pa.Array:
    """A column of one value a record, each repeated to its record's rows (``rep``: the record of
    each row; None: one row a record)."""
    arr = pa.array(values, type=SCHEMA.field(name).type)
    return arr if rep is None else arr.take(pa.array(rep))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


# -- reading ----------------------------------------------------------------------------------


@dataclass
class FileRead:
    path: str
    table: pa.Table | None
    reason: str | None = None
    malformed: int = 0
    unread: bool = False  # left unread: the read's budget (``max_bytes``, ``deadline``) was spent (``UNREAD``)
    stored: int = 0  # its bytes in storage, as listed
    unlisted: bool = False  # a folder (``path``) left unlisted: the read's time was spent (``UNLISTED``)


UNREAD = "not read: the read's budget (max_bytes) was spent"
OUT_OF_TIME = "not read: the read's time (deadline) was spent"
UNLISTED = "not listed: the read's time (deadline) was spent"


def _list(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    with store_errors():
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))


# The files of one hour folder a read lists, at most (an hour of 10 pods flushing every 2 s is
# 18,000; one flushing every 10 ms, 360,000): a folder holding more is listed in part (``CROWDED``),
# never whole into memory. On a disk and in S3 the listing stops there (S3's by pages of
# ``LIST_PAGE`` keys, the time checked between pages); elsewhere (GCS) pyarrow lists it whole first.
MAX_LISTED_FILES = 100_000
LIST_PAGE = 1000
CROWDED = "listed in part: more than MAX_LISTED_FILES files"
LOGGED_SKIPS = 10  # the files a read skipped that it names in its log (the others counted in one line)


def _log_files(
    fs: pafs.FileSystem,
    uri: str | Path,
    path: str,
    keep: Callable[[str, Callable[[], float | None]], bool],
    budget: _Budget | None,
) -> tuple[dict[str, int], str | None]:
    """The files of the folder ``path`` (not below it) that ``keep`` takes, by their name and
    (asked only where the name does not decide) the time the store says each was written (unix
    seconds, None where it gives none; on a disk the later of its mtime and ctime), and their sizes, at most ``MAX_LISTED_FILES``; and why
    not all (``CROWDED``, or ``UNLISTED``: the read's time spent between two pages), None when all."""
    found: dict[str, int] = {}

    def full() -> bool:
        return len(found) >= MAX_LISTED_FILES

    def stored(entry: os.DirEntry[str]) -> float | None:
        # The later of its mtime and ctime: cp -p, rsync -a and mv from a spool keep a file's old
        # mtime (and anyone may set it back with utime), but the kernel sets ctime to now on each
        # write, rename or utime, and user space cannot set it back.
        try:
            status = entry.stat()
        except OSError:  # (removed meanwhile)
            return None
        return max(status.st_mtime, status.st_ctime)

    if isinstance(fs, pafs.LocalFileSystem):
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if keep(entry.name, partial(stored, entry)) and entry.is_file():
                        if full():
                            return found, CROWDED
                        with contextlib.suppress(FileNotFoundError):  # (removed meanwhile)
                            found[f"{path}/{entry.name}"] = entry.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            pass
        return found, None
    listed, why = list_folder(
        fs,
        str(uri),
        path,
        lambda e: not e.folder and keep(e.name, lambda: e.mtime),
        MAX_LISTED_FILES,
        LIST_PAGE,
        None if budget is None else budget.expired,
    )
    found = {f"{path}/{e.name}": e.size for e in listed}
    return found, {"crowded": CROWDED, "unlisted": UNLISTED}.get(why or "")


BLIND_HOURS = 48  # a range of more hours lists the days and hours that exist, not each of its hours


def _hour_folders(fs: pafs.FileSystem, base: str, start: datetime, end: datetime, pool: Executor) -> list[str]:
    """The ``dt=``/``hour=`` folders under a model's folder ``base`` that may hold records of the
    range: each of its hours, or for a long range (a year: 8,760 listings) the ones that exist."""
    first_hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    count = math.ceil((end.timestamp() - first_hour.timestamp()) / 3600)  # (Airflow's dates divide by no timedelta)
    if count <= BLIND_HOURS:
        hours = (first_hour + timedelta(hours=k) for k in range(count))
        return [f"{base}/dt={t:%Y-%m-%d}/hour={t:%H}" for t in hours]
    first, last = (
        (t.strftime("%Y-%m-%d"), t.strftime("%H")) for t in (first_hour, first_hour + timedelta(hours=count - 1))
    )

    def subfolders(path: str, prefix: str) -> list[str]:
        return [
            info.base_name.removeprefix(prefix)
            for info in _list(fs, path)
            if info.type == pafs.FileType.Directory and info.base_name.startswith(prefix)
        ]

    days = sorted(day for day in subfolders(base, "dt=") if first[0] <= day <= last[0])
    listed = pool.map(lambda day: subfolders(f"{base}/dt={day}", "hour="), days)
    return [
        f"{base}/dt={day}/hour={hour}"
        for day, day_hours in zip(days, listed, strict=True)
        for hour in sorted(day_hours)
        if first <= (day, hour) <= last
    ]


# A file's write time in its name (UTC: the "Z"); names without it (older writers) are always read.
WRITTEN = re.compile(r"-(\d{8}T\d{6})Z-[0-9a-f]{12}\.parquet$")
WRITTEN_TYPE = pa.timestamp("us", tz="UTC")
CLOCK_STEP_S = 60  # how far a writer's clock may step back between receiving a record and writing it


def _written_at(name: str) -> datetime | None:
    """The UTC second a file of this name was written (by its writer's clock), None for a name
    without it or with no such second in it (a foreign file's ``-20261399T999999Z-``): read."""
    m = WRITTEN.search(name)
    if m is None:
        return None
    try:
        written = datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return written if written.year < 9999 else None  # (the year 9999 leaves no room to add to it)


# How far a file's written second may lie ahead of both the reader's clock and its newest record
# (a writer names a file at its clock's second, or its newest record's where its clock stepped
# back): the writers' and the reader's clocks apart (as the audit's CLOCK_SKEW_S).
NAMED_AHEAD_S = 60


def _name_refused(name: str, times: pa.ChunkedArray, start: datetime, end: datetime) -> str | None:
    """Why the written second in a file's name cannot be taken (``read(..., written=True)``
    decides by it whether the file's records came late): no such second in it (a foreign file's
    ``-20261399T999999Z-``), one further ahead than ``NAMED_AHEAD_S`` of both this clock and
    the newest of its records ``times``, or one before its records of the range (``start`` to
    ``end``) by more than ``CLOCK_STEP_S`` (a writer names a file at or after its newest record:
    ``_written_before`` would hide them from a range starting later), their count said; None
    where it can be, or where the name has none (an older writer's: read as always)."""
    m = WRITTEN.search(name)
    if m is None:
        return None
    written = _written_at(name)
    if written is None:
        return f"refused: its name's written second {m.group(1)} is no time"
    # (its integer, not a datetime: a malformed row's time past the year 9999 is dropped later)
    stamps = times.cast(pa.int64())  # (microseconds: the table is cast to the schema)
    newest = pc.max(stamps).as_py()
    ahead = written.timestamp() - max(time.time(), newest / 1e6 if newest is not None else 0.0)
    if ahead > NAMED_AHEAD_S:
        return f"refused: its name's written second {m.group(1)} lies {ahead:.0f} s ahead of this clock and its records"
    since, until = (pa.scalar(t, WRITTEN_TYPE).value for t in (start, end))
    after = int((written.timestamp() + 1 + CLOCK_STEP_S) * 1_000_000)  # (received by then, named honestly)
    behind = pc.and_(pc.greater_equal(stamps, max(since, after)), pc.less(stamps, until))
    if hidden := pc.sum(pc.cast(pc.fill_null(behind, False), pa.int64())).as_py():
        return (
            f"refused: its name's written second {m.group(1)} lies before its records (a writer names a file at or "
            f"after them): its {hidden} records of this range would be taken as written then, or hidden"
        )
    return None


def _written_before(name: str, start: datetime) -> bool:
    """Whether a file of this name was written (so all its records received) before ``start``."""
    written = _written_at(name)
    return written is not None and written + timedelta(seconds=1 + CLOCK_STEP_S) <= start


def _stored_before(stored: float | None, start: datetime) -> bool:
    """Whether a file the store says was written at ``stored`` (unix seconds, its clock) was written
    before ``start``, as ``_written_before`` judges a name (a store that gives no time: taken so)."""
    return stored is None or stored + 1 + CLOCK_STEP_S <= start.timestamp()


def _folder_hour(folder: str) -> datetime | None:
    """The hour an hour folder (``.../dt=YYYY-MM-DD/hour=HH``) holds the records of, None for another path."""
    m = re.search(r"/dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})$", folder)
    try:
        return datetime.strptime(f"{m.group(1)} {m.group(2)}", "%Y-%m-%d %H").replace(tzinfo=UTC) if m else None
    except ValueError:
        return None


class _Footer:
    """A Parquet footer's Thrift (compact protocol), read here for what a memory bound and the
    pruning of row groups by time need: pyarrow's own accessor of a column chunk's metadata
    aborts the process (a C++ exception it does not catch) on a footer whose size statistics it
    refuses, as a damaged file's or another writer's (a level histogram left out) are. Anything
    malformed raises ValueError."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("the footer ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 63:
                raise ValueError("a varint over 64 bits")

    def signed(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def fields(self) -> Iterator[tuple[int, int]]:
        """(field id, type) of each field of a struct, up to its stop; the caller reads or skips each."""
        last = 0
        while (head := self.byte()) & 0x0F:
            last = last + (head >> 4) if head >> 4 else self.signed()
            yield last, head & 0x0F

    def items(self) -> tuple[int, int]:
        """A list's (size, element type)."""
        head = self.byte()
        size = head >> 4 if head >> 4 != 15 else self.varint()
        return size, head & 0x0F

    def binary(self) -> bytes:
        n = self.varint()
        if self.pos + n > len(self.data):
            raise ValueError("the footer ends early")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def skip(self, kind: int, depth: int = 0) -> None:
        if depth > 64:
            raise ValueError("nested too deep")
        if kind in (1, 2):  # true, false (the type is the value)
            return
        if kind == 3:
            self.byte()
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.pos += 8
        elif kind == 8:
            self.binary()
        elif kind in (9, 10):
            size, element = self.items()
            for _ in range(size):
                self.element(element, depth + 1)
        elif kind == 11:
            size = self.varint()
            types = self.byte() if size else 0
            for _ in range(size):
                self.element(types >> 4, depth + 1)
                self.element(types & 0x0F, depth + 1)
        elif kind == 12:
            for _, field in self.fields():
                self.skip(field, depth + 1)
        else:
            raise ValueError(f"no Thrift type {kind}")

    def element(self, kind: int, depth: int) -> None:
        """Past a list's or map's element (a boolean there is a byte)."""
        if kind in (1, 2):
            self.byte()
        else:
            self.skip(kind, depth)

    def structs(self) -> Iterator[None]:
        """Each element of a list of structs, read by the caller (``fields``)."""
        size, element = self.items()
        if element != 12:
            raise ValueError("a list of something else than structs")
        for _ in range(size):
            yield

    def row_groups(self) -> list[_RowGroup]:
        """The row groups of a FileMetaData: each one's rows and column chunks."""
        groups = []
        for fid, kind in self.fields():
            if (fid, kind) != (4, 9):  # row_groups
                self.skip(kind)
                continue
            for _ in self.structs():
                rows, chunks = 0, []
                for gid, gkind in self.fields():
                    if (gid, gkind) == (3, 6):  # num_rows
                        rows = self.signed()
                    elif (gid, gkind) == (1, 9):  # columns
                        chunks = [chunk for _ in self.structs() for chunk in self.column_chunk()]
                    else:
                        self.skip(gkind)
                groups.append(_RowGroup(rows, chunks))
        return groups

    def column_chunk(self) -> Iterator[_Chunk]:
        """A ColumnChunk's metadata, where it has some."""
        for cid, ckind in self.fields():
            if (cid, ckind) != (3, 12):  # meta_data
                self.skip(ckind)
                continue
            name, values, size = "", 0, 0
            statistics: tuple[bytes | None, bytes | None, int | None] = (None, None, None)
            for mid, mkind in self.fields():
                if (mid, mkind) == (3, 9):  # path_in_schema
                    n, element = self.items()
                    for i in range(n):
                        if element != 8:
                            self.skip(element)
                        elif i == 0:
                            name = self.binary().decode(errors="replace")
                        else:
                            self.binary()
                elif (mid, mkind) == (5, 6):
                    values = self.signed()
                elif (mid, mkind) == (6, 6):
                    size = self.signed()
                elif (mid, mkind) == (12, 12):
                    statistics = self.statistics()
                else:
                    self.skip(mkind)
            yield _Chunk(name, values, size, *statistics)

    def statistics(self) -> tuple[bytes | None, bytes | None, int | None]:
        """A Statistics struct's (min, max, null count): min_value and max_value, else the
        deprecated min and max (of a signed type's order, as an INT64's)."""
        found: dict[int, bytes | int] = {}
        for sid, skind in self.fields():
            if (sid, skind) in ((1, 8), (2, 8), (5, 8), (6, 8)):
                found[sid] = self.binary()
            elif (sid, skind) == (3, 6):
                found[sid] = self.signed()
            else:
                self.skip(skind)
        low, high, nulls = found.get(6, found.get(2)), found.get(5, found.get(1)), found.get(3)
        return (
            low if isinstance(low, bytes) else None,
            high if isinstance(high, bytes) else None,
            nulls if isinstance(nulls, int) else None,
        )


class _Chunk(NamedTuple):
    name: str  # the top-level column
    values: int
    size: int  # uncompressed bytes
    low: bytes | None  # its statistics' min and max (plain encoded), and null count, when written
    high: bytes | None
    nulls: int | None


class _RowGroup(NamedTuple):
    rows: int
    chunks: list[_Chunk]


def _stored_bytes(groups: Sequence[_RowGroup], columns: Sequence[str]) -> int:
    """An upper bound of what ``columns`` of the row groups take once read, but for the strings'
    repeats: their pages uncompressed, and 8 bytes a value (a value, offset, index or validity; a
    run-length encoded page of a billion values is a few bytes)."""
    wanted = set(columns)
    total = 8 * sum(max(g.rows, 0) for g in groups) * len(wanted)
    for g in groups:
        for c in g.chunks:
            if c.name in wanted:
                total += max(c.size, 0) + 8 * max(c.values, 0)
    return total


def _times_known(metadata: pq.FileMetaData) -> bool:
    """Whether the file's ``time`` is stored as the writer stores it (INT64 microseconds), so that
    its row groups' statistics are microseconds too."""
    for i in range(len(metadata.schema)):
        column = metadata.schema.column(i)
        if column.path == "time":
            unit = json.loads(column.logical_type.to_json()).get("timeUnit")
            return column.physical_type == "INT64" and unit == "microseconds"
    return False


def _may_hold(group: _RowGroup, start: int, end: int) -> bool:
    """Whether a row group may hold a record received within ``start <= time < end`` (in
    microseconds): all but those whose ``time`` statistics show every record has a time, outside
    the range (a group of records without a time is read: they are counted malformed)."""
    for c in group.chunks:
        if c.name == "time":
            if c.nulls != 0 or c.low is None or c.high is None or len(c.low) != 8 or len(c.high) != 8:
                return True
            low = int.from_bytes(c.low, "little", signed=True)
            high = int.from_bytes(c.high, "little", signed=True)
            return low > high or (low < end and high >= start)
    return True


class _Budget:
    """What the tables of one read may hold together (bytes; None: no bound), shared by its
    threads: a file is read while what it may take fits in what is left; once one did not, no
    other is begun. And until when (``deadline``, a ``clock()``) a listing or a file's read may
    begin: once it passed, none is (``late``)."""

    def __init__(self, limit: int | None, deadline: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.limit, self.held, self.spent = limit, 0, False
        self.deadline, self.clock, self.late = deadline, clock, False
        self._lock = threading.Lock()

    def expired(self) -> bool:
        """Whether the deadline passed (once it did, for the rest of the read)."""
        with self._lock:
            if not self.late and self.deadline is not None and self.clock() >= self.deadline:
                self.late = True
            return self.late

    def take(self, n: int) -> bool:
        if self.limit is None:
            return True
        with self._lock:
            if self.held + n > self.limit:
                self.spent = True
                return False
            self.held += n
            return True

    def give(self, n: int) -> None:
        if self.limit is None:
            return
        with self._lock:
            self.held -= n


class _Hold:
    """What one file's read reserved from a budget (none: no bound): given back when the read
    ends, but for what its table keeps."""

    def __init__(self, budget: _Budget | None):
        self.budget, self.reserved = budget, 0

    def take(self, n: int) -> bool:
        if self.budget is None:
            return True
        if not self.budget.take(n):
            return False
        self.reserved += n
        return True

    def keep(self, n: int) -> None:
        """Hold ``n`` bytes (a table's, filtered: within what was reserved) past the read."""
        if self.budget is not None:
            self.reserved -= n

    def release(self) -> None:
        if self.budget is not None:
            self.budget.give(self.reserved)
            self.reserved = 0


def _string_bytes(column: pa.ChunkedArray) -> int:
    """The characters a dictionary-encoded string column holds once decoded."""
    return sum(
        pc.sum(pc.take(pc.binary_length(chunk.dictionary), chunk.indices)).as_py() or 0 for chunk in column.chunks
    )


def _footer(f: pa.NativeFile) -> bytes:
    """The file's footer (its Thrift, length and magic), read in one request when under 64 KiB."""
    size = f.size()
    tail = f.read_at(min(size, 64 * 1024), max(size - 64 * 1024, 0))
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ValueError("not a Parquet file: no footer")
    length = int.from_bytes(tail[-8:-4], "little")
    if length + 12 > size:
        raise ValueError("not a Parquet file: its footer's length is longer than the file")
    if length > MAX_FOOTER_BYTES:
        raise ValueError(f"its footer takes over {MAX_FOOTER_BYTES} bytes ({length}): no writer of the log's")
    if length + 8 > len(tail):
        tail = f.read_at(length + 8, size - length - 8)
    return bytes(tail[-(length + 8) :])


def _read_one(
    fs: pafs.FileSystem,
    path: str,
    columns: list[str],
    start: datetime,
    end: datetime,
    roles: Sequence[str] | None,
    written: bool = False,
    budget: _Budget | None = None,
) -> FileRead:
    """One file's records of the range, or why not. With a ``budget``, what the file may take
    is reserved from it before it is read (left unread when that does not fit), and what its
    table holds once filtered is kept from it."""
    if budget is not None and budget.spent:
        return FileRead(path, None, UNREAD, unread=True)
    if budget is not None and budget.expired():
        return FileRead(path, None, OUT_OF_TIME, unread=True)
    hold = _Hold(budget)
    try:
        return _read_file(fs, path, columns, start, end, roles, written, hold)
    finally:
        hold.release()


def _read_file(
    fs: pafs.FileSystem,
    path: str,
    columns: list[str],
    start: datetime,
    end: datetime,
    roles: Sequence[str] | None,
    written: bool,
    hold: _Hold,
) -> FileRead:
    # Every string column is read as a dictionary (each value once) and decoded only when what
    # it decodes to fits: a file's repeats are not a reader's memory.
    strings = [c for c in columns if SCHEMA.field(c).type == pa.string()]
    try:
        with fs.open_input_file(path) as f:
            footer = _footer(f)
            # The schema is checked before the strings are asked for as dictionaries: asking for
            # a column the file lacks (an older writer's, a foreign file) raised a KeyError.
            metadata = pq.read_metadata(pa.BufferReader(footer))
            schema = metadata.schema.to_arrow_schema()
            later = [c for c in columns if c in LATER_COLUMNS and schema.get_field_index(c) < 0]
            columns = [c for c in columns if c not in later]
            for name in columns:
                i = schema.get_field_index(name)
                got = None if i < 0 else schema.field(i).type
                if got is not None and pa.types.is_dictionary(got):
                    got = got.value_type
                if got is None or not got.equals(SCHEMA.field(name).type):
                    return FileRead(path, None, f"wrong schema: column {name} is {got or 'missing'}")
            groups = _Footer(footer[:-8]).row_groups()
            if len(groups) != metadata.num_row_groups:
                raise ValueError(f"the footer's {len(groups)} row groups are {metadata.num_row_groups} to pyarrow")
            # The row groups whose time statistics show no record of the range are not read: an
            # hour's audit reads a minute of the next hour's folder, not its files whole.
            if _times_known(metadata):
                since, until = (pa.scalar(t, pa.timestamp("us", tz="UTC")).value for t in (start, end))
                wanted = [i for i, g in enumerate(groups) if _may_hold(g, since, until)]
            else:
                wanted = list(range(len(groups)))
            size = _stored_bytes([groups[i] for i in wanted], columns)
            if size > MAX_READ_BYTES:
                return FileRead(path, None, f"too large: its columns take over {MAX_READ_BYTES} bytes read")
            if not hold.take(size):
                return FileRead(path, None, UNREAD, unread=True)
            parquet = pq.ParquetFile(f, metadata=metadata, read_dictionary=strings)
            if len(wanted) == len(groups):
                table = parquet.read(columns=columns)
            else:
                table = parquet.read_row_groups(wanted, columns=columns)
        plain = [c for c in strings if c not in _CATEGORICAL and pa.types.is_dictionary(table[c].type)]
        decoded = sum(_string_bytes(table[c]) for c in plain)
        if size + decoded > MAX_READ_BYTES:
            return FileRead(path, None, f"too large: its columns take over {MAX_READ_BYTES} bytes read")
        if not hold.take(decoded):
            return FileRead(path, None, UNREAD, unread=True)
        for name in plain:
            table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.string()))
        for name in later:  # (an older writer's file: what it could not say)
            table = table.append_column(name, pa.nulls(table.num_rows, SCHEMA.field(name).type))
        columns = [*columns, *later]
        table = table.select(columns)
        # As every file's table is (a field another writer declared not null, its metadata):
        # the tables of a read are concatenated, which refuses two schemas.
        table = table.cast(pa.schema([_read_field(c) for c in columns]))
        # A text column holding bytes that are no UTF-8 (a damaged or foreign file) is read
        # unchecked; converted for a frame, it raised out of read, every audit's and gate's.
        table.validate(full=True)
    except (OSError, pa.ArrowException, ValueError) as exc:  # (ValueError: a damaged footer, a name in it)
        return FileRead(path, None, f"unreadable: {exc}")
    # (its written second decides whether its records came late: not one anyone may choose;
    # without ``written``, a name written before the range was listed only as one before the hour
    # its folder holds, ``read_files``: refused where it hides records of the range, as with it)
    name = path.rsplit("/", 1)[-1]
    if (written or _written_before(name, start)) and (refused := _name_refused(name, table["time"], start, end)):
        return FileRead(path, None, refused)
    n = table.num_rows
    valid = pc.is_valid(table["time"])
    for name in ("model", "request_id", "item", "role", "outcome"):  # (every writer's record has each)
        if name in columns:
            valid = pc.and_(valid, pc.is_valid(table[name]))
    if "role" in columns:
        valid = pc.and_(valid, pc.is_in(table["role"], value_set=pa.array(ROLES)))
    if "item" in columns:
        valid = pc.and_(valid, pc.greater_equal(table["item"], 0))
    valid = pc.and_(valid, _outputs_valid(table, columns))
    valid = pc.fill_null(valid, False)
    table = table.filter(valid)
    malformed = n - table.num_rows
    t = table["time"]
    keep = pc.and_(
        pc.greater_equal(t, pa.scalar(start, pa.timestamp("us", tz="UTC"))),
        pc.less(t, pa.scalar(end, pa.timestamp("us", tz="UTC"))),
    )
    if roles is not None:
        keep = pc.and_(keep, pc.is_in(table["role"], value_set=pa.array(list(roles), pa.string())))
    table = table.filter(keep)
    if written:
        stamp = pa.scalar(_written_at(path.rsplit("/", 1)[-1]), WRITTEN_TYPE)
        table = table.append_column("written", pa.repeat(stamp, table.num_rows))
    hold.keep(table.nbytes)
    return FileRead(path, table, malformed=malformed)


def _outputs_valid(table: pa.Table, columns: Sequence[str]) -> pa.Array:
    """Which rows' outputs can be read as an answer of at most ``MAX_CLASSES`` classes: each
    top-k index within it, as many top-k probabilities as indexes, a whole vector no longer."""
    valid = pa.array(np.ones(table.num_rows, bool))
    if "topk_index" in columns:
        index = table["topk_index"].combine_chunks()
        flat = pc.list_flatten(index)
        out = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, MAX_CLASSES)).to_numpy(zero_copy_only=False)
        bad = np.zeros(table.num_rows, bool)
        bad[pc.list_parent_indices(index).to_numpy()[out]] = True
        if "topk_prob" in columns:
            lengths = [pc.fill_null(pc.list_value_length(table[c]), 0) for c in ("topk_index", "topk_prob")]
            bad |= pc.not_equal(*lengths).to_numpy()
        valid = pa.array(~bad)
    if "probs" in columns:
        valid = pc.and_(valid, pc.fill_null(pc.less_equal(pc.list_value_length(table["probs"]), MAX_CLASSES), True))
    return valid


def _read_field(name: str) -> pa.Field:
    f = SCHEMA.field(name)
    return f.with_type(pa.dictionary(pa.int32(), f.type)) if name in _CATEGORICAL else f


def _arrow_lists(t: pa.DataType) -> pd.ArrowDtype | None:
    import pandas as pd

    return pd.ArrowDtype(t) if pa.types.is_list(t) else None


def read(
    uri: str | Path,
    start: datetime,
    end: datetime,
    model: str | None = None,
    columns: Sequence[str] | None = None,
    roles: Iterable[str] | None = None,
    threads: int = 8,
    written: bool = False,
    written_after: datetime | None = None,
    max_bytes: int | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> pd.DataFrame:
    """Every complete record with ``start <= time < end`` (timezone-aware datetimes).

    Only the ``model=``/``dt=``/``hour=`` folders of the range are listed (of a range over
    ``BLIND_HOURS``, those that exist), only files that may
    hold records of the range are opened (a file written, by its name, more than ``CLOCK_STEP_S``
    before ``start`` holds none: its records were received before it was written; unless the
    store's listing dates it within the range or after, when it is read, and refused as below
    where its name lies before its records of the range), of those only
    the row groups whose ``time`` statistics may hold one are read (the malformed records counted
    are theirs), and only ``columns`` (plus ``time``). Unreadable, truncated, wrongly typed files and files
    whose columns would take over ``MAX_READ_BYTES`` once read are skipped with a warning, as
    are malformed records (no time, model, request id, item, outcome or a known role): the counts are in ``df.attrs`` (``skipped_files``, ``skipped_file_reasons`` by path,
    ``skipped_records``, ``files_read``). Hidden and temporary files are never read. The list
    columns (``topk_index``, ``topk_prob``, ``probs``) are Arrow-backed (``pd.ArrowDtype``): an
    element is a list, a missing one ``pd.NA``; the masked metadata (``user_id``,
    ``device_type``, ``tenant``, ``meta``) are categoricals. With ``written``, a column
    ``written`` holds the second each record's file was written, by its name (NaT for a name
    without it): when the record could first be read; a file whose name holds no such second,
    one further ahead of both this clock and its records than ``NAMED_AHEAD_S``, or one before
    its records of the range by more than ``CLOCK_STEP_S`` (a name before the hour its folder
    holds is not pruned by it, but read), is skipped, its reason saying so (and how many records
    of the range it holds, for the last) (its name, anyone's to choose, would decide whether its
    records came late); without ``written``, a name before the hour its folder holds, written
    before the range too, is read and skipped so where it holds records of the range (its name
    would have hidden them). With ``written_after``, only the files
    written (by their name) after it are opened: those that came late to a range read before.
    With ``max_bytes``, the records read are held to about that many bytes (of Arrow tables;
    what a file may take is reserved while it is read): once a file did not fit, it and the
    files not yet read are left unread, counted in ``df.attrs`` (``unread_files``, and their
    bytes in storage ``unread_bytes``), the records read kept. With ``deadline`` (a ``clock()``:
    ``time.monotonic`` unless given), no hour folder is listed nor file begun once it passed: the
    files left are unread as above, the folders counted (``unlisted_folders``), and
    ``out_of_time`` is true. An hour folder holding more than ``MAX_LISTED_FILES`` files is
    listed in part, counted (``crowded_folders``): the files beyond are not read.
    """
    schema, paths, results = read_files(
        uri,
        start,
        end,
        model,
        columns,
        roles,
        threads,
        written,
        written_after=written_after,
        max_bytes=max_bytes,
        deadline=deadline,
        clock=clock,
    )
    tables, reasons, malformed = [], {}, 0
    left = Shortfall.of(results)
    for r in results:
        if r.unread:
            continue
        if r.table is None:
            reasons[r.path] = r.reason or ""
            continue
        malformed += r.malformed
        if r.table.num_rows:
            tables.append(r.table)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    del tables, results
    return to_frame(table, reasons, malformed, len(paths) - len(reasons) - left.files, str(uri), left)


def read_schema(
    columns: Sequence[str] | None = None, roles: Iterable[str] | None = None, written: bool = False
) -> pa.Schema:
    """The schema of the tables ``read_files`` returns for these arguments."""
    wanted = list(SCHEMA.names) if columns is None else list(dict.fromkeys(["time", *columns]))
    unknown = sorted(set(wanted) - set(SCHEMA.names))
    if unknown:
        raise ValueError(f"unknown prediction log column(s) {unknown}; the columns are {SCHEMA.names}")
    return pa.schema([_read_field(n) for n in wanted] + ([pa.field("written", WRITTEN_TYPE)] if written else []))


class _CallerThread(Executor):
    """An executor that runs each call at once in the thread that submits it (``read_files``'
    ``threads=1``): no worker thread for interpreter exit to wait for (concurrent.futures joins
    its pools' workers at exit, whatever the daemon flag of the thread that made the pool), so
    a read that stalls in a daemon thread never holds the process."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


def models(uri: str | Path) -> list[str]:
    """The models the log at ``uri`` has a folder of (``model=<model>``), sorted."""
    return _models(*filesystem(uri))


def _models(fs: pafs.FileSystem, root: str) -> list[str]:
    return sorted(
        info.base_name.removeprefix("model=")
        for info in _list(fs, root)
        if info.type == pafs.FileType.Directory and info.base_name.startswith("model=")
    )


def read_files(
    uri: str | Path,
    start: datetime,
    end: datetime,
    model: str | None = None,
    columns: Sequence[str] | None = None,
    roles: Iterable[str] | None = None,
    threads: int = 8,
    written: bool = False,
    done: Container[str] = (),
    listed_until: datetime | None = None,
    written_after: datetime | None = None,
    max_bytes: int | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[pa.Schema, list[str], list[FileRead]]:
    """``read``'s files one by one: (the tables' schema, every file listed, sorted, and what each
    file not in ``done`` gave, in that order: its records of the range as a table of that schema,
    or why it was skipped). The hour folders are listed up to ``listed_until`` (``end`` when
    None), the records kept up to ``end``; with ``written_after``, only the files whose name
    says they were written after it are listed (a name without its second is not). With
    ``max_bytes``, the tables are held to that budget (``read``), the files beyond it ``unread``;
    with ``deadline`` (a ``clock()``), the folders not listed by then are ``unlisted`` results
    (their ``path`` the folder's) and the files not begun by then ``unread``. With ``threads``
    1 (or less), all is read in the calling thread (``_CallerThread``)."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("start and end must be timezone-aware datetimes")
    schema = read_schema(columns, roles, written)
    wanted = [n for n in schema.names if n != "written"]
    role_list = None if roles is None else list(roles)
    read_cols = wanted + (["role"] if role_list is not None and "role" not in wanted else [])
    fs, root = filesystem(uri)
    models = [model] if model is not None else _models(fs, root)
    until = end if listed_until is None else listed_until
    budget = None if max_bytes is None and deadline is None else _Budget(max_bytes, deadline, clock)

    def keep(name: str, hour: datetime | None, stored: Callable[[], float | None]) -> bool:
        # (a name written before the hour its folder holds lies before every record in it: not
        # pruned by it, but read, and refused where it holds records of the range, whether the
        # read is the audit's, with ``written``, or not: its records are never dropped unsaid;
        # so is one inside that hour, before the range, that the store says was written within
        # it or after: the name and the store's clock disagree, the name may hide records)
        # (what the name decides first: the stored time is a stat on a disk, a name it would not keep none)
        return (
            name.startswith("part-")
            and name.endswith(".parquet")
            and (written_after is None or (_written_at(name) or written_after) > written_after)
            and (
                not _written_before(name, start)
                or (hour is not None and _written_before(name, hour))
                or not _stored_before(stored(), start)
            )
        )

    def listed(folder: str) -> tuple[dict[str, int], str | None]:
        if budget is not None and budget.expired():
            return {}, UNLISTED
        hour = _folder_hour(folder)
        return _log_files(fs, uri, folder, lambda name, stored: keep(name, hour, stored), budget)

    with ThreadPoolExecutor(threads) if threads > 1 else _CallerThread() as pool:
        folders = [f for m in models for f in _hour_folders(fs, f"{root}/model={m}", start, until, pool)]
        listings = list(pool.map(listed, folders))
        unlisted = [
            FileRead(p, None, why, unread=True, unlisted=True)
            for p, (_, why) in zip(folders, listings, strict=True)
            if why is not None
        ]
        stored = {path: size for found, _ in listings for path, size in found.items()}
        paths = sorted(stored)
        results = list(
            pool.map(
                lambda p: _read_one(fs, p, read_cols, start, end, role_list, written, budget),
                [p for p in paths if p not in done],
            )
        )
    skipped = 0
    for r in results:
        r.stored = stored[r.path]
        if r.table is not None:
            r.table = r.table.select(schema.names)
        elif not r.unread:  # (those read counts, once)
            skipped += 1
            if skipped <= LOGGED_SKIPS:
                log.warning("prediction log file %s skipped: %s", r.path, r.reason)
    if skipped > LOGGED_SKIPS:
        log.warning("and %d more prediction log files under %s skipped", skipped - LOGGED_SKIPS, uri)
    return schema, paths, results + unlisted


@dataclass(frozen=True)
class Shortfall:
    """What a read's budget left out: files unread and their bytes in storage, hour folders
    unlisted (or listed in part) by its time, hour folders listed in part as holding more than
    ``MAX_LISTED_FILES``, and whether its time (``deadline``) was spent."""

    files: int = 0
    stored: int = 0
    folders: int = 0
    crowded: int = 0
    out_of_time: bool = False

    @classmethod
    def of(cls, results: Iterable[FileRead]) -> Shortfall:
        left = [r for r in results if r.unread]
        files = [r for r in left if not r.unlisted]
        crowded = sum(r.reason == CROWDED for r in left)
        return cls(
            len(files),
            sum(r.stored for r in files),
            len(left) - len(files) - crowded,
            crowded,
            any(r.reason in (OUT_OF_TIME, UNLISTED) for r in left),
        )


def to_frame(
    table: pa.Table,
    reasons: dict[str, str],
    malformed: int,
    files_read: int,
    uri: str,
    left: Shortfall = Shortfall(),
) -> pd.DataFrame:
    """``read``'s frame of a table of records (the tables ``read_files`` returns, concatenated)
    and its counts (``df.attrs``; ``left``: what a read's budget left out: ``unread_files`` and
    their ``unread_bytes`` in storage, ``unlisted_folders``, ``out_of_time``)."""
    if malformed:
        log.warning("%d malformed prediction log records skipped under %s", malformed, uri)
    if left.files or left.folders:
        log.warning(
            "%d prediction log files under %s (%d bytes stored) not read, %d hour folders not listed: the read's %s",
            left.files,
            uri,
            left.stored,
            left.folders,
            "time was spent" if left.out_of_time else "budget of bytes was spent",
        )
    if left.crowded:
        log.warning(
            "%d hour folders under %s hold more than %d prediction log files: listed in part",
            left.crowded,
            uri,
            MAX_LISTED_FILES,
        )
    # List columns stay Arrow-backed (one buffer, not an array per row); memory freed as converted.
    df = table.to_pandas(types_mapper=_arrow_lists, self_destruct=True, split_blocks=True)
    del table
    df.attrs.update(
        skipped_files=len(reasons),
        skipped_file_reasons=reasons,
        skipped_records=malformed,
        files_read=files_read,
        unread_files=left.files,
        unread_bytes=left.stored,
        unlisted_folders=left.folders,
        crowded_folders=left.crowded,
        out_of_time=left.out_of_time,
    )
    return df


# -- joining ----------------------------------------------------------------------------------


def _need(df: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = sorted(set(columns) - set(df.columns))
    if missing:
        raise ValueError(f"the frame lacks column(s) {missing}: read them from the prediction log")


def key_codes(df: pd.DataFrame) -> np.ndarray:
    """An exact int64 code per (model, request_id, item): equal codes, equal keys. Joins run on
    these (integer arrays), not on the string columns, to keep a million records' joins small.

    Two tenants' requests under one request id (clients choosing their ids) are two requests:
    where a key's primary records carry two requesters or more, the requester is part of its
    key, so that one tenant's label or copy joins its own tenant's answer. Elsewhere a label's or
    a copy's requester does not matter: it joins the key's one request, as before. Under a split
    key, one of no primary's requester joins none and is counted unmatched (lost, not misjudged).
    A requester is a record's tenant column ("" and none are one), two values being one where a
    request's records carry both under one ``tenant_tag`` (``FeedbackSigner.tag``: the same for
    one tenant's request id on every pod sharing the feedback key): a masked tenant
    (``--mask-header x-tenant``) is a token of its masking key, and one client's re-send across
    a key rotation is still one request. Where the primaries read carry one tenant column value
    (the common case) no id is split and nothing more is done. What that cannot tell: a re-send
    masked under another key by a pod of another feedback key (or of an older writer, without
    tags) is another tenant's request; and a reader keys on what it read (a read holding one of
    two tenants' answers joins the id as that tenant's alone)."""
    import pandas as pd

    rid, _ = pd.factorize(df["request_id"], use_na_sentinel=False)
    model, _ = pd.factorize(df["model"], use_na_sentinel=False)
    item = df["item"].to_numpy(np.int64)
    items = int(item.max(initial=0)) + 1
    pair, _ = pd.factorize(rid.astype(np.int64) * items + item)  # < rows x items: no overflow
    code = pair.astype(np.int64) * (int(model.max(initial=0)) + 1) + model
    if "tenant" not in df.columns or "role" not in df.columns or len(df) == 0:
        return code
    tenant = _tenant_codes(df["tenant"])
    primary = np.flatnonzero((df["role"] == "primary").to_numpy(bool))
    if not len(primary) or (tenant[primary] == tenant[primary][0]).all():
        return code  # (one tenant, or none: the common case, no work)
    requester = _requester_codes(df, tenant)
    code = pd.factorize(code)[0].astype(np.int64)  # (< rows: the products below stay < rows x rows)
    requesters = int(requester.max()) + 2
    # (a key a requester of its primaries)
    keys = pd.unique(code[primary] * requesters + requester[primary] + 1) // requesters
    shared = np.isin(code, keys[pd.Series(keys).duplicated().to_numpy(bool)])  # (two requesters or more)
    split, _ = pd.factorize(code * requesters + np.where(shared, requester + 1, 0))
    return split.astype(np.int64)


def _tenant_codes(tenant: pd.Series) -> np.ndarray:
    """Each row's tenant, -1 for none ("" is none, as the writer has it since it is no tenant)."""
    import pandas as pd

    codes, uniques = pd.factorize(tenant)
    empty = np.flatnonzero(np.asarray(uniques, dtype=object) == "")
    return np.where(np.isin(codes, empty), -1, codes).astype(np.int64)


def _requester_codes(df: pd.DataFrame, tenant: np.ndarray) -> np.ndarray:
    """Each row's requester (``key_codes``): its tenant's code, two tenant column values one
    request's records carry under one ``tenant_tag`` being one (one tenant masked under two
    keys: a rotation, a pod's Secret not yet synced). A tag only joins tenant values, never
    parts one: a tag of another feedback key, or none (an older writer's, an unmasked
    tenant's), leaves the record its tenant's, as before tags."""
    import pandas as pd

    if "tenant_tag" not in df.columns:
        return tenant
    tags, _ = pd.factorize(df["tenant_tag"])  # (-1: none)
    has = tags >= 0
    values = int(tenant.max()) + 2  # (tenant + 1: 0 for none, 1.. for the values)
    pairs = pd.unique(tags[has].astype(np.int64) * values + tenant[has] + 1)  # (tag, tenant value)
    pairs = pairs[pd.Series(pairs // values).duplicated(keep=False).to_numpy(bool)]  # (tags of two values)
    if not len(pairs):
        return tenant
    tag_of, value_of = pd.factorize(pairs // values)[0], pairs % values
    canon = np.arange(values)
    for _ in range(64):  # (each value to the least one a tag links it to, until none moves)
        low = np.full(int(tag_of.max()) + 1, values)
        np.minimum.at(low, tag_of, canon[value_of])
        moved = canon.copy()
        np.minimum.at(moved, value_of, low[tag_of])
        moved = moved[moved]
        if (moved == canon).all():
            break
        canon = moved
    return canon[tenant + 1] - 1


def _times(df: pd.DataFrame) -> np.ndarray:
    if "time" not in df.columns:
        return np.zeros(len(df), np.int64)
    return df["time"].to_numpy("datetime64[us]").astype(np.int64)


def _first(rows: np.ndarray, code: np.ndarray, t: np.ndarray, rank: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """The earliest of ``rows`` for each key, sorted by key; and how many repeats were left out.
    With ``rank`` (one a row of the frame), the earliest of the lowest rank."""
    keys = (t[rows], code[rows]) if rank is None else (t[rows], rank[rows], code[rows])
    order = np.lexsort(keys)
    rows = rows[order]
    keep = np.ones(len(rows), bool)
    keep[1:] = code[rows][1:] != code[rows][:-1]
    return rows[keep], int((~keep).sum())


def _match(rows: np.ndarray, candidates: np.ndarray, code: np.ndarray) -> np.ndarray:
    """For each of ``rows``, the one of ``candidates`` (sorted by key, one per key) with the same
    key, or -1."""
    out = np.full(len(rows), -1, np.int64)
    if len(rows) == 0 or len(candidates) == 0:
        return out
    keys = code[candidates]
    at = np.minimum(np.searchsorted(keys, code[rows]), len(keys) - 1)
    found = keys[at] == code[rows]
    out[found] = candidates[at[found]]
    return out


def _take(series: pd.Series, rows: np.ndarray) -> pd.Series:
    """``series`` at ``rows`` (positions; -1: missing), with a fresh index."""
    if (rows >= 0).all():
        return series.take(rows).reset_index(drop=True)
    return series.reset_index(drop=True).reindex(rows).reset_index(drop=True)


def joined(df: pd.DataFrame) -> pd.DataFrame:
    """One row per served prediction (of each key's primary records the request ``copy_of``
    compares: the earliest that succeeded with a copy of its own that ran, a retry where an
    earlier attempt failed; a client that re-sends a request id gets a second answer, not a
    second piece of evidence; the repeats are counted in ``duplicate_primaries``), with its
    shadow's answer (its own copy's, ``copy_of``'s, else the key's earliest) and its label when
    present.

    Pairs by ``(model, request_id, item)``; the shadow's columns are prefixed ``shadow_``
    (version, top1, top1_prob, probs, latency_ms, outcome: those the frame has) and the label
    is ``label``. Shadow copies that were dropped are not answers and are left out. Labels and
    shadow records that match no primary are counted in ``attrs`` (``unmatched_labels``,
    ``unmatched_shadows``; get them with ``unmatched_labels(df)``), never dropped silently; a
    second label for the same item is counted in ``duplicate_labels`` and the earliest kept.
    """
    _need(df, [*KEY, "role"])
    code, t = key_codes(df), _times(df)
    role = df["role"]
    # (copy_of's pairing, on the primary and shadow records: the labels are no copies)
    served = np.flatnonzero(role.isin(["primary", "shadow"]).to_numpy(bool))
    both = df if len(served) == len(df) else df.take(served).reset_index(drop=True)
    chosen, duplicate_primaries, of, own = _pairing(both, code[served], t[served])
    primary = np.sort(served[chosen])  # in the frame's order
    is_shadow = (role == "shadow").to_numpy()
    if "outcome" in df.columns:
        is_shadow = is_shadow & (df["outcome"] != "DROPPED").to_numpy()
    shadow, _ = _first(np.flatnonzero(is_shadow), code, t)
    # (a request's shadow: its own copy, else one of its key's left to it, the earliest)
    compared = np.zeros(len(df), bool)
    compared[primary] = True
    of_served = np.full(len(df), -1, np.int64)
    of_served[served] = np.where(of >= 0, served[np.maximum(of, 0)], -1)
    theirs = np.flatnonzero(is_shadow & (of_served >= 0) & compared[np.maximum(of_served, 0)])
    rank = np.ones(len(df), np.int8)
    rank[served[own]] = 0
    labels, duplicate_labels = _first(np.flatnonzero((role == "label").to_numpy()), code, t)
    out = df.take(primary).reset_index(drop=True)
    their_shadow = _match(primary, _first(theirs, code, t, rank)[0], code)
    for c in ("version", "top1", "top1_prob", "probs", "latency_ms", "outcome"):
        if c in df.columns:
            out[f"shadow_{c}"] = _take(df[c], their_shadow)
    if "label" in df.columns:
        out["label"] = _take(df["label"], _match(primary, labels, code)).astype("Int32")
    if "shadow_top1" in out.columns:
        out["shadow_top1"] = out["shadow_top1"].astype("Int32")
    primary_codes = code[primary]
    out.attrs = {
        **df.attrs,
        "unmatched_labels": int((~np.isin(code[labels], primary_codes)).sum()),
        "unmatched_shadows": int((~np.isin(code[shadow], primary_codes)).sum()),
        "duplicate_labels": duplicate_labels,
        "duplicate_primaries": duplicate_primaries,
    }
    return out


def unmatched_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Label records whose key (``key_codes``: model, request_id, item) matches no primary record in the frame."""
    _need(df, [*KEY, "role"])
    code = key_codes(df)
    role = df["role"]
    primary = code[(role == "primary").to_numpy()]
    lost = (role == "label").to_numpy() & ~np.isin(code, primary)
    return df[lost].reset_index(drop=True)


def _arrow(series: pd.Series) -> pa.Array:
    arr = pa.array(series, from_pandas=True)
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _lists(series: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A list column as (valid, starts, lengths, values): numpy views of the Arrow buffers."""
    arr = _arrow(series)
    if not pa.types.is_list(arr.type):  # an all-null column of another type
        n = len(arr)
        return np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(0, np.float32)
    offsets = arr.offsets.to_numpy().astype(np.int64)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    values = arr.values.to_numpy(zero_copy_only=False)
    return valid, offsets[:-1], np.diff(offsets) * valid, values


def _probability_matrix(rows: pd.DataFrame, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows x classes) float32 and which rows have one: ``probs`` where the log kept the whole
    vector, else rebuilt from the top-k (the top-k probabilities at their classes, the rest of
    the mass spread evenly over the other classes)."""
    n = len(rows)
    out = np.zeros((n, classes), np.float32)
    have = np.zeros(n, bool)
    if n == 0 or classes == 0:
        return out, have
    if "probs" in rows.columns:
        valid, starts, lengths, values = _lists(rows["probs"])
        full = valid & (lengths == classes)
        out[full] = values[starts[full][:, None] + np.arange(classes)]
        have |= full
    if "topk_index" in rows.columns and "topk_prob" in rows.columns:
        valid, starts, lengths, index = _lists(rows["topk_index"])
        _, pstarts, _, prob = _lists(rows["topk_prob"])
        use = valid & (lengths > 0) & ~have
        if use.any():
            k = lengths[use]
            row = np.repeat(np.flatnonzero(use), k)
            within = _within(k)
            cls = index[np.repeat(starts[use], k) + within].astype(np.int64)
            p = prob[np.repeat(pstarts[use], k) + within].astype(np.float32)
            rest = np.clip(1.0 - np.bincount(row, weights=p, minlength=n)[use], 0.0, None)
            out[use] = (rest / np.maximum(classes - k, 1))[:, None]
            out[row, cls] = p
            have |= use
    return out, have


def _class_count(*frames: pd.DataFrame) -> int:
    n = 0
    for f in frames:
        if "probs" in f.columns and len(f):
            valid, _, lengths, _ = _lists(f["probs"])
            n = max(n, int(lengths[valid].max(initial=0)))
        if "topk_index" in f.columns and len(f):
            valid, _, lengths, index = _lists(f["topk_index"])
            if lengths.any():
                n = max(n, int(index.max()) + 1)
    return n


# How many of a copy's key's primaries on each side in time (of its input) an Istio copy is
# matched among, and how many rounds of matching are run: each round pairs one copy at least, the
# nearest pair left; a hostile id sent thousands of times in a stretch stays linear. A copy left
# unmatched is its request's primary's, as before (a duplicate where that primary has its own).
_NEAR = 4
_NEAR_ROUNDS = 8


def _nearest(
    copies: np.ndarray, primaries: np.ndarray, group: np.ndarray, t: np.ndarray, digest: np.ndarray | None = None
) -> np.ndarray:
    """For each of ``copies`` (rows), the one of ``primaries`` (rows) of its ``group`` nearest in
    time ``t`` that no nearer copy took, or -1: each copy proposes to its nearest primary left,
    each primary takes the nearest copy proposing, for ``_NEAR_ROUNDS`` rounds, among the
    ``_NEAR`` primaries on each side of a copy. With ``digest``, only a pair where either has
    none (-1) is matched."""
    out = np.full(len(copies), -1, np.int64)
    if len(copies) == 0 or len(primaries) == 0:
        return out
    primaries = primaries[np.lexsort((t[primaries], group[primaries]))]
    group_p = group[primaries]
    lo = np.searchsorted(group_p, group[copies], "left")
    hi = np.searchsorted(group_p, group[copies], "right")
    # (the common case, one copy and one primary of its group: no search)
    _, index, count = np.unique(group[copies], return_inverse=True, return_counts=True)
    alone = (hi - lo == 1) & (count[index] == 1)
    if digest is not None:
        alone &= (digest[primaries[np.minimum(lo, len(primaries) - 1)]] < 0) | (digest[copies] < 0)
    out[alone] = primaries[lo[alone]]
    some = np.flatnonzero(~alone & (hi > lo))
    if len(some) == 0:
        return out
    # (the others: a copy's candidates, the primaries of its group nearest on each side; a
    # group's primaries are sorted by time, and a copy's place among them is found on one int64
    # of group and the times' rank, both under the rows)
    mine, ours = copies[some], primaries[_spans(lo[some], hi[some])]
    _, rank = np.unique(np.concatenate([t[ours], t[mine]]), return_inverse=True)
    _, dense = np.unique(np.concatenate([group[ours], group[mine]]), return_inverse=True)
    width = int(rank.max(initial=0)) + 1  # (dense and rank under the rows: no overflow)
    key_p = dense[: len(ours)] * width + rank[: len(ours)]
    key_c = dense[len(ours) :] * width + rank[len(ours) :]
    at = np.searchsorted(key_p, key_c)
    near = at[:, None] + np.arange(-_NEAR, _NEAR)[None, :]  # (candidates: positions in ours)
    valid = (near >= 0) & (near < len(ours))
    np.clip(near, 0, len(ours) - 1, out=near)
    valid &= group[ours][near] == group[mine][:, None]
    if digest is not None:
        valid &= (digest[ours][near] < 0) | (digest[mine][:, None] < 0)
    gap = np.where(valid, np.abs(t[ours][near] - t[mine][:, None]).astype(np.float64), np.inf)
    taken = np.zeros(len(ours), bool)
    chosen = np.full(len(mine), -1, np.int64)  # (positions in ours)
    rows = np.arange(len(mine))
    for _ in range(_NEAR_ROUNDS):
        gap[taken[near]] = np.inf
        gap[chosen >= 0] = np.inf
        best = np.argmin(gap, axis=1)
        dist = gap[rows, best]
        wants = np.flatnonzero(np.isfinite(dist))
        if len(wants) == 0:
            break
        pick, dist = near[wants, best[wants]], dist[wants]
        first = np.lexsort((wants, dist, pick))  # (each primary: its nearest proposer, the earliest row)
        keep = np.ones(len(first), bool)
        keep[1:] = pick[first][1:] != pick[first][:-1]
        won = first[keep]
        chosen[wants[won]] = pick[won]
        taken[pick[won]] = True
    out[some[chosen >= 0]] = ours[chosen[chosen >= 0]]
    return out


# How far the clocks of two pods writing the log may differ (the audit's CLOCK_SKEW_S, the same
# figure): an Istio copy's pod's clock offset, as measured, is bounded by it.
CLOCK_SKEW_S = 60


# The hourly audit's ranges (clock hours, UTC), each read from CLOCK_SKEW_S before its start to its
# close, AUDIT_CLOSE_S after its end (the audit's ``copy_due``, the same figure): the windows a pod's
# clock offset is measured in (``_offset_windows``).
AUDIT_HOUR_S = 3600
AUDIT_CLOSE_S = 186
# A window's pairs a pod's offset there is measured on, at the least: with fewer (a quiet
# stretch), its offset over the whole read, as a line through it where its pairs lie on one (one
# pair, a retry's copy taken for a request of one, would set it); and a third's of the read's
# pairs that line is measured on, its outer thirds' medians DRIFT_SPAN_S apart at the least
# (``_drift_lines``).
MIN_OFFSET_PAIRS = 5
DRIFT_SPAN_S = 600


def _offset_windows(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For stamps ``t`` (microseconds), the window each is in and that window's close (the
    latest written stamp, microseconds, of the records measured in it): of each clock hour's
    end, the stretch two hours' reads both hold (``CLOCK_SKEW_S`` before it to its close,
    ``AUDIT_CLOSE_S`` after it), closing at its close; and the rest of the hour after it, which
    one hour's read alone holds, closing at that hour's close."""
    hour, skew, close = AUDIT_HOUR_S * 1_000_000, CLOCK_SKEW_S * 1_000_000, AUDIT_CLOSE_S * 1_000_000
    end = (t + skew) // hour * hour  # (the hour's end whose stretch, or the hour after whose rest, holds t)
    inner = t >= end + close
    return 2 * ((t + skew) // hour) + inner, end + close + np.where(inner, hour, 0)


def _gaps(
    copies: np.ndarray, primaries: np.ndarray, key: np.ndarray, t: np.ndarray, digest: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``copies`` are of a key (``key``, a code a row) with one of ``primaries`` and the
    copy alone, of one input (equal ``digest``), stamped no more than ``CLOCK_SKEW_S`` apart; and
    their copy less primary stamps."""
    if len(copies) == 0 or len(primaries) == 0:
        return np.zeros(len(copies), bool), np.zeros(0, np.int64)
    primaries = primaries[np.argsort(key[primaries], kind="stable")]
    keys, first, count = np.unique(key[primaries], return_index=True, return_counts=True)
    mine, many = np.unique(key[copies], return_inverse=True, return_counts=True)[1:]
    at = np.minimum(np.searchsorted(keys, key[copies]), len(keys) - 1)
    alone = (keys[at] == key[copies]) & (count[at] == 1) & (many[mine] == 1)
    alone &= digest[copies] == digest[primaries[first[at]]]
    gap = t[copies] - t[primaries[first[at]]]
    alone &= np.abs(gap) <= CLOCK_SKEW_S * 1_000_000
    return alone, gap[alone]


def _medians(g: np.ndarray, values: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group (``g``, a code of ``groups`` a value), the median of ``values`` (integers,
    rounded down), and how many."""
    median = np.zeros(groups, np.int64)
    order = np.lexsort((values, g))
    g, values = g[order], values[order]
    n = np.bincount(g, minlength=groups)
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    has = n > 0
    lower, upper = values[start[has] + (n[has] - 1) // 2], values[start[has] + n[has] // 2]
    median[has] = lower + (upper - lower) // 2
    return median, n


def _drift_lines(
    g: np.ndarray, at: np.ndarray, gap: np.ndarray, groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group (``g``, a code of ``groups`` a pair), the line of ``gap`` over ``at`` (a clock's
    drift), robust to outliers: Tukey's resistant line, through the medians of the first and the
    last third of its pairs in time; its level at ``centre``, its slope, and how far from its
    centre it is followed (``reach``: twice the span of those medians, not far past its pairs;
    flat beyond). Where the pairs are fewer than three times ``MIN_OFFSET_PAIRS``, the outer
    thirds' medians less than ``DRIFT_SPAN_S`` apart (a burst's jitter is no drift), the middle
    third's median in time outside the middle half of that span (pairs in two bursts: a step
    between them passes for a line), or its median gap further from the line than a quarter of
    its rise over the outer two (a step, or mis-pairs in one third): no line, level the median
    of all, slope 0 (review s51-1)."""
    level, n = _medians(g, gap, groups)
    slope, centre, reach = np.zeros(groups), np.zeros(groups, np.int64), np.zeros(groups, np.int64)
    many = np.flatnonzero(n >= 3 * MIN_OFFSET_PAIRS)
    if len(many) == 0:
        return level, slope, centre, reach
    order = np.lexsort((at, g))
    g, at, gap = g[order], at[order], gap[order]
    start, third = np.concatenate([[0], np.cumsum(n)[:-1]]), n // 3
    rank = np.arange(len(g)) - start[g]
    part = 3 * g + (rank >= third[g]) + (rank >= n[g] - third[g])  # (the pair's group and third)
    m1, mm, m3 = _medians(part, gap, 3 * groups)[0].reshape(groups, 3)[many].T
    t1, tm, t3 = _medians(part, at, 3 * groups)[0].reshape(groups, 3)[many].T
    span, rise = t3 - t1, m3 - m1
    line = m1 + rise * ((tm - t1) / np.maximum(span, 1))
    inner = (4 * (tm - t1) > span) & (4 * (t3 - tm) > span)
    fits = (span >= DRIFT_SPAN_S * 1_000_000) & inner & (np.abs(mm - line) <= np.abs(rise) / 4)
    k = many[fits]
    slope[k], centre[k], level[k] = rise[fits] / span[fits], (t1 + t3)[fits] // 2, (m1 + m3)[fits] // 2
    reach[k] = 2 * span[fits]
    return level, slope, centre, reach


def _clock_offsets(
    df: pd.DataFrame, copies: np.ndarray, primaries: np.ndarray, code: np.ndarray, t: np.ndarray, digest: np.ndarray
) -> np.ndarray:
    """For each of ``copies`` (Istio's, rows), how far ahead of the primaries' its pod's clock
    is, in ``t``'s units (microseconds): the median of copy stamp less primary stamp over the
    keys with one primary (of ``primaries``) and one of ``copies`` alone, of one input (equal
    ``digest``), stamped no more than ``CLOCK_SKEW_S`` apart (``_gaps``); one offset per
    candidate version and pod (``version``, ``replica``, where the records name them) and window
    of the copy's stamp (``_offset_windows``), measured on that window's records alone (both of
    a pair stamped in it, a key alone among its records and of no failed primary there, its
    retry maybe past the window's edge, those in files written by its close where the records
    say when: ``written``). An hourly audit's read is whole windows (from ``CLOCK_SKEW_S`` before
    its hour to its close), so the two hours' reads holding a copy stamped around the hour's end
    correct it alike, at the close or in a retry, and match it to the same attempt of a request
    id sent again where both read that id's attempts (an offset measured per read matched it to
    the failed attempt in one hour and to the retry in the other: the pair counted in both hours
    or in neither). A window with fewer than ``MIN_OFFSET_PAIRS`` such pairs of the pod (a quiet
    stretch, or a read that holds it in part: a rollout's range) takes the pod's offset over all
    ``df`` holds, of the files written by their window's close, as a line through the read at
    the copy's stamp where its pairs lie on one (``_drift_lines``: a clock drifting seconds over
    hours on a quiet model; the median of its pairs where they do not, 0 where it has none).
    Known limits: a clock stepped within a window is corrected by the window's one median; a
    retry's copy whose first attempt lies just before a window, with the pod's clock ahead,
    looks a pair there (enough of them, beside few real pairs, set the window's offset)."""
    import pandas as pd

    if len(copies) == 0 or len(primaries) == 0:
        return np.zeros(len(copies), np.int64)
    group = np.zeros(len(copies), np.int64)  # (the copy's model, version and pod, as one code)
    for name in ("model", "version", "replica"):  # (factorized at each step: under the rows, no overflow)
        if name in df.columns:
            codes, uniques = pd.factorize(df[name].take(copies), use_na_sentinel=False)
            group = pd.factorize(group * (len(uniques) + 1) + codes)[0]
    window, close = _offset_windows(t)
    window = pd.factorize(window)[0]  # (under the rows: the codes below do not overflow)
    cell, cells = pd.factorize(group * (int(window.max()) + 1) + window[copies])  # (the pod and window)
    within = pd.factorize(code * (int(window.max()) + 1) + window)[0]  # (the key and window)
    measured = np.ones(len(copies), bool)
    if "written" in df.columns:  # (a file written after its window's close: not in every read holding it)
        written = df["written"].to_numpy("datetime64[us]")
        due = np.isnat(written) | (written.astype(np.int64) <= close)
        measured, primaries = due[copies], primaries[due[primaries]]
    alone, gap = _gaps(copies[measured], primaries, code, t, digest)
    level, slope, centre, reach = _drift_lines(
        group[measured][alone], t[copies[measured][alone]], gap, int(group.max()) + 1
    )
    along = np.clip(t[copies] - centre[group], -reach[group], reach[group])
    whole = level[group] + np.round(slope[group] * along).astype(np.int64)
    whole = np.clip(whole, -CLOCK_SKEW_S * 1_000_000, CLOCK_SKEW_S * 1_000_000)  # (past its pairs: within the bound)
    if "outcome" in df.columns:  # (a key whose attempt failed in the window: its retry may lie past its edge)
        failed = primaries[(df["outcome"].to_numpy(object)[primaries] != "ok")]
        measured &= ~np.isin(within[copies], within[failed])
    alone, gap = _gaps(copies[measured], primaries, within, t, digest)
    local, n = _medians(cell[measured][alone], gap, len(cells))
    return np.where(n[cell] >= MIN_OFFSET_PAIRS, local[cell], whole)


def _spans(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The positions of the distinct spans ``[lo, hi)`` (one each of equal ones), in order."""
    order = np.unique(np.stack([lo, hi], axis=1), axis=0)
    lengths = order[:, 1] - order[:, 0]
    starts = np.repeat(order[:, 0] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(int(lengths.sum()))


def _stamps(
    df: pd.DataFrame, code: np.ndarray, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``_pairing``'s first part, on ``df``'s key codes and stamps: which records are primaries,
    each own mirror's copy's primary (stamped exactly as it; -1 for the others), Istio's copies
    (stamped as no primary) and the primaries they may be of (rows), each of those's input (a
    code, -1 for none and for the other records), and the stamps matched on (``MATCHED_TIME``
    where ``df`` has it)."""
    import pandas as pd

    is_primary = (df["role"] == "primary").to_numpy(bool)
    # (one int64 of key code and stamp code, both under the rows: a MultiIndex's factorize took
    # 4.3 s of 6.5 s per million records)
    at, _ = pd.factorize(t)
    stamp, _ = pd.factorize(code * (int(at.max(initial=0)) + 1) + at)  # equal codes, equal key and stamp
    rows = np.flatnonzero(is_primary)
    by_stamp = pd.Series(rows, index=stamp[rows])
    by_stamp = by_stamp[~by_stamp.index.duplicated()]
    own = ~is_primary & np.isin(stamp, stamp[rows])
    of = np.full(len(df), -1, np.int64)
    of[own] = by_stamp.reindex(stamp[own]).to_numpy(np.int64)
    istio = np.flatnonzero((df["role"] == "shadow").to_numpy(bool) & ~own)
    free = np.ones(len(df), bool)
    free[of[own]] = False
    # (the primaries such a copy may be of)
    near = rows[free[rows] & np.isin(code[rows], code[istio])] if len(istio) else rows[:0]
    digest = np.full(len(df), -1, np.int64)  # (-1: none)
    if len(istio) and len(near) and "image_sha256" in df.columns:
        some = np.concatenate([istio, near])
        digest[some] = pd.factorize(df["image_sha256"].take(some))[0]
    # (matched on the copies' stamps less their pod's clock offset, measured on the keys of one
    # primary and one copy: a pod's clock off by more than half the gap between a failed attempt
    # and its retry swapped the two's copies)
    if MATCHED_TIME in df.columns:  # (measured on the whole read a part of it was taken from)
        corrected = df[MATCHED_TIME].to_numpy(np.int64)
    else:
        corrected = t.copy()
        corrected[istio] -= _clock_offsets(df, istio, rows, code, t, digest)
    return is_primary, of, istio, near, digest, corrected


def _pairing(df: pd.DataFrame, code: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """``copy_of``'s rule, on ``df``'s key codes and stamps: each key's primary (its rows,
    sorted by key), the primaries left out as its repeats, each record's primary, and which are
    shadow records paired with their own attempt's primary (stamped exactly as it, or Istio's
    matched to it)."""
    import pandas as pd

    is_primary, of, istio, near, digest, corrected = _stamps(df, code, t)
    outcome = df["outcome"] if "outcome" in df.columns else pd.Series("ok", index=df.index)
    rows = np.flatnonzero(is_primary)
    # (Istio's copies: each its own attempt's, the primary of its input nearest in time, one copy
    # a primary, of those no own mirror's copy is stamped as; a primary without a copy is one the
    # mirror did not sample. Of the input first, then where either record has no digest)
    free = np.ones(len(df), bool)
    free[of[~is_primary & (of >= 0)]] = False
    known = digest >= 0
    both = code * (int(digest.max(initial=0)) + 1) + digest  # (key and input: < rows x rows, no overflow)
    first = istio[known[istio]]
    of[first] = _nearest(first, near[known[near]], both, corrected)
    free[of[first][of[first] >= 0]] = False
    rest = istio[of[istio] < 0]
    of[rest] = _nearest(rest, near[free[near]], code, corrected, digest)
    # (of an id's primaries the request compared: the earliest that succeeded and that a copy
    # that ran is its own attempt's (a dropped copy does not make it the request compared over a
    # retry whose copy ran), else the earliest that failed with such a copy (its pair no
    # comparison), else the earliest that succeeded, else the earliest)
    ran = ~is_primary & (of >= 0) & (outcome != "DROPPED").to_numpy(bool)
    copied = np.zeros(len(df), bool)
    copied[of[ran]] = True
    failed = (outcome != "ok").to_numpy(bool).astype(np.int8)
    chosen, repeats = _first(rows, code, t, np.where(copied, failed, 2 + failed).astype(np.int8))
    paired = ~is_primary & (of >= 0)
    left = ~is_primary & ~paired
    of[left] = _match(np.flatnonzero(left), chosen, code)
    of[rows] = rows
    return chosen, repeats, of, paired


# The column ``matched_times`` puts in a read: each record's stamp as ``copy_of`` matches it.
MATCHED_TIME = "matched_time"


def matched_times(df: pd.DataFrame) -> np.ndarray:
    """Each of ``df``'s records' stamp as ``copy_of`` matches it (microseconds: an Istio copy's
    less its pod's clock offset), measured on ``df`` whole. Put in ``df`` as ``MATCHED_TIME``, a
    part of it taken (a range's records of a read with its margins) is matched as ``df`` is:
    measured on a part, a window's offset is the part's pairs' (none there: the part's offset
    over all it holds), another where the part holds another share of the window's pairs."""
    return _stamps(df, key_codes(df), _times(df))[5]


def copy_of(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one rule pairing a copy with its primary (``shadow_pairs``, and the shadow audit's
    ranges and copies): of ``df``'s records (primary and shadow, with ``model``,
    ``request_id``, ``item`` and ``time``), which are each request's primary, and for each
    record the row (position) of its primary, -1 where ``df`` holds none (a primary's: its
    own), and which are shadow records of their own attempt's primary.

    The server's own mirror stamps its copy exactly as its primary (``shadow_record``: the
    request's ``received_at``): a shadow record stamped exactly as a primary of its model,
    request id and item is that primary's, whichever of the id's primaries it is (a client
    sending an id again: the second request's copy is the second primary's, never the first's).
    One stamped as none (Istio's, stamped by the candidate's pod on arrival, its clock apart) is
    its own attempt's too: Envoy mirrors each request as it sends it, so a copy is the primary of
    its input (``image_sha256``; else one where either record has none) nearest in time to it
    (its stamp less its pod's clock offset: the median, per candidate version and pod and window
    of the copy's stamp, of copy less primary stamp over the keys of one primary and one copy of
    one input, within ``CLOCK_SKEW_S``, ``_clock_offsets``; ``MATCHED_TIME`` where ``df`` has
    it, ``matched_times``), each primary taking one copy at most, of those no own mirror's copy is stamped as (Istio
    samples: a primary may have none, and a k-th copy is not the k-th request's). A copy no
    primary is left for is the request's primary's (a duplicate there). The request's primary:
    of an id's primaries, the earliest that succeeded (``outcome`` ok) with a copy that ran (no
    ``DROPPED`` one: the own mirror stamps a dropped copy as its primary too) of its own, else
    the earliest that failed with such a copy (its pair no comparison: ``primary_failed``), else
    the earliest that succeeded, else the earliest; the others are its repeats. A dropped copy
    is its primary's as a copy is. The third array says which shadow records are paired with
    their own attempt's primary (stamped exactly as it, or Istio's matched to it)."""
    chosen, _, of, own = _pairing(df, key_codes(df), _times(df))
    first = np.zeros(len(df), bool)
    first[chosen] = True
    return first, of, own


def shadow_pairs(df: pd.DataFrame, vectors: bool = True) -> pd.DataFrame:
    """Primary and shadow records paired by ``(model, request_id, item)``, in the columns the
    shadow audit consumes (``PAIR_COLUMNS``), one row per mirrored item whose primary succeeded
    on another version than its shadow's, in time order. Of a request id sent more than once,
    the request paired and each copy's primary are ``copy_of``'s: the own mirror's copy of the
    second request is compared with the second primary, the other primaries are ``duplicates``.

    ``primary_probs``/``shadow_probs`` are numpy vectors: ``probs`` when the log kept the whole
    vector, else rebuilt from the top-k (see ``_probability_matrix``). Without ``vectors``
    they are not built (a pair's two, rebuilt, take 8 KB of a thousand-class model): the
    records' rows are in ``primary_row``/``shadow_row`` instead, the class count in
    ``attrs["classes"]``, for ``pair_probabilities``. ``shadow_error`` is the
    shadow's outcome when it was not ``ok``. ``attrs`` counts what did not pair:
    ``shadow_without_primary``, ``primary_without_shadow``, ``shadow_dropped`` (copies the
    in-process mirror dropped: queue full or no idle time), ``primary_failed`` (pairs whose
    primary failed), ``duplicates``, ``input_mismatch`` and ``self_pairs``.

    An answer whose output was no finite distribution (a client's NaN or Inf input runs, as in
    Triton, and its output is NaN; see ``finite_rows``) is no prediction: a pair whose primary
    answered so is no comparison, left out and counted in ``primary_not_finite``; a pair whose
    shadow alone answered so is kept with ``shadow_finite`` False (no shadow top-1 or vector:
    the candidate gave no answer where the primary gave one), counted in ``shadow_not_finite``.
    ``shadow_finite`` is True otherwise (a failed shadow's too: ``shadow_error`` tells it).

    A shadow that answered another dtype or shape of output than its primary (``output``, as
    both records say: ``primary_output``, ``shadow_output``) gave another answer: such a pair has
    ``output_differs`` True, its shadow top-1 as logged but no shadow vector (none compares), and
    ``attrs["classes"]`` counts the classes of the others.

    A copy of a request that the mirror's own version served is no comparison: Istio mirrors
    every request of a route, whichever weighted subset served it, so at a canary weight the
    candidate also gets copies of its own primaries, and such a pair agrees by construction
    (the in-process mirror makes none: ``TrafficPolicy.mirror_for``). A shadow record whose
    primary has its version is never paired; the items such copies were made of are counted in
    ``self_pairs`` once each, whether the copy ran or was dropped (a dropped one is not in
    ``shadow_dropped``, which counts the comparisons lost), its repeats in ``duplicates``.

    ``primary_without_shadow`` counts the successful primaries, not named by version, without a
    shadow record to compare with, of each (model, version) that has at least one comparison as
    the primary: the baseline's requests whose copy never reached the log (an upper bound when
    the mirror samples under 100%). The requests the mirror's own version served are not among
    them: none of them is expected to have a comparison (the in-process mirror makes no copy of
    them; Istio's copies of them are self pairs), so that version has no comparison as the
    primary (unless a later version's shadow ran beside it); and a primary with a self copy is
    never counted.

    A mirrored copy carries its primary's body, so its input: a shadow record whose input
    digest (``image_sha256``) differs from its primary's is not a copy of that primary (anyone
    who reaches the data port can send a ``-shadow`` Host with any request id) and is never
    paired; such records are counted in ``input_mismatch``, not as duplicates or self pairs. Of a
    key's other shadow records, the primary's own attempt's (``copy_of``'s: of its input, else
    one where either record has no digest: no input was decoded, or it could not be hashed item
    by item, and such a record pairs by key alone, unchecked) is paired, else the earliest whose
    digest equals the primary's, else the earliest of those where either has none; the rest,
    and the copies of the key's other primaries, are ``duplicates``. Pairing works on row positions: each output column is taken from ``df`` once.
    """
    import pandas as pd

    optional = ("probs", "topk_index", "topk_prob", "route", "output", "tenant_tag")
    _need(df, [c for c in SHADOW_PAIR_COLUMNS if c not in optional])
    code, t = key_codes(df), _times(df)
    ok_rows = (df["outcome"] == "ok").to_numpy()
    dropped_rows = (df["outcome"] == "DROPPED").to_numpy()
    is_shadow = (df["role"] == "shadow").to_numpy()
    version, versions = pd.factorize(df["version"])  # -1: none
    primary, dup_p, primary_of, paired = _pairing(df, code, t)  # (each request's primary; each copy's: copy_of)
    copies = np.flatnonzero(is_shadow & ~dropped_rows)
    digest, _ = pd.factorize(df["image_sha256"])  # equal codes, equal digests; -1: none
    of = primary_of[copies]  # each copy's primary, or -1
    mine, theirs = digest[copies], np.where(of >= 0, digest[of], -1)
    compared = (mine >= 0) & (theirs >= 0)
    mismatch = compared & (mine != theirs)
    own = ~mismatch & _same_version(copies, of, version)  # a copy of the mirror target's own primary
    lost = np.flatnonzero(is_shadow & dropped_rows)
    lost_of = primary_of[lost]  # (a dropped copy's primary: copy_of's, as a copy's)
    lost_own = _same_version(lost, lost_of, version)
    self_copies, dup_self = _first(copies[own], code, t)
    # a copy's rank among its key's copies (0 first): its own attempt's (copy_of's), its input
    # checked; one of no request's (an Istio copy no primary of its input was left for) after
    unverified = np.where(paired, 0, 2).astype(np.int8)
    unverified[copies[~(compared & ~mismatch)]] += 1
    request = np.zeros(len(df), bool)
    request[primary] = True
    repeat = (of >= 0) & ~request[np.maximum(of, 0)]  # (a copy of a repeated request: no second pair)
    shadow, dup_s = _first(copies[~mismatch & ~own & ~repeat], code, t, unverified)
    dup_s += int((~mismatch & ~own & repeat).sum())
    # (an attempt that failed, its own mirror's copy run, beside a retry compared: its pair is
    # no comparison, counted in primary_failed as a pair chosen is, not as a primary repeated and
    # a copy repeated)
    failed_repeats = len(np.unique(of[~mismatch & ~own & repeat & ~ok_rows[np.maximum(of, 0)]]))
    dup_p, dup_s = dup_p - failed_repeats, dup_s - failed_repeats
    p_all = primary
    s_of = _match(primary, shadow, code)
    p_pos, s_pos = primary[s_of >= 0], s_of[s_of >= 0]
    failed = ~ok_rows[p_pos]
    p_pos, s_pos = p_pos[~failed], s_pos[~failed]
    order = np.lexsort((df["item"].to_numpy()[p_pos], t[p_pos]))
    p_pos, s_pos = p_pos[order], s_pos[order]
    mirrored_to_itself = np.zeros(len(df), bool)
    mirrored_to_itself[of[own]] = True
    mirrored_to_itself[lost_of[lost_own]] = True
    lonely = p_all[(s_of < 0) & ok_rows[p_all] & ~mirrored_to_itself[p_all]]
    if "route" in df.columns:
        lonely = lonely[(df["route"] != "version").to_numpy()[lonely]]
    model_codes, _ = pd.factorize(df["model"])
    arm = model_codes.astype(np.int64) * (len(versions) + 1) + version  # (model, version)
    attrs = {
        **df.attrs,
        "shadow_without_primary": int((~np.isin(code[shadow], code[p_all])).sum()),
        "primary_without_shadow": int(np.isin(arm[lonely], np.unique(arm[p_pos])).sum()),
        "shadow_dropped": int(len(lost) - lost_own.sum()),
        "primary_failed": int(failed.sum()) + failed_repeats,
        "duplicates": dup_p + dup_s + dup_self,
        "input_mismatch": int(mismatch.sum()),
        "self_pairs": len(np.union1d(code[self_copies], code[lost[lost_own]])),
        "primary_not_finite": 0,
        "shadow_not_finite": 0,
    }
    if len(p_pos) == 0:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in PAIR_COLUMNS})
        empty.attrs = attrs
        return empty

    def col(name: str, pos: np.ndarray) -> pd.Series:
        return _take(df[name], pos)

    p_side, s_side = _output_rows(df, p_pos), _output_rows(df, s_pos)
    classes = _class_count(p_side, s_side)
    attrs["classes"] = classes
    top1 = df["top1"].to_numpy(np.float64, na_value=np.nan)
    # An answer with no finite distribution (no top-1 and no vector, or, as older writers logged
    # it, a NaN vector and a top-1 of 0) is no prediction: its pair is no comparison when the
    # primary's is; a shadow's alone is the candidate's (kept: shadow_finite False).
    p_finite = _finite_rows(p_side, classes, top1[p_pos])
    s_finite = _finite_rows(s_side, classes, top1[s_pos])
    attrs["primary_not_finite"] = int((~p_finite).sum())
    if not p_finite.all():
        p_pos, s_pos, s_finite = p_pos[p_finite], s_pos[p_finite], s_finite[p_finite]
        p_side, s_side = p_side[p_finite].reset_index(drop=True), s_side[p_finite].reset_index(drop=True)
    shadow_top1 = top1[s_pos]
    shadow_ok = ok_rows[s_pos]
    if len(p_pos) == 0:
        attrs["shadow_not_finite"] = int((shadow_ok & ~s_finite).sum())
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in PAIR_COLUMNS})
        empty.attrs = attrs
        return empty
    # A shadow answering another dtype or shape than its primary (both said) gave another
    # answer: no vector of it compares with the primary's (a disagreement, the audit's).
    p_output, s_output = (
        (col("output", p_pos).astype(object), col("output", s_pos).astype(object))
        if "output" in df.columns
        else (pd.Series([None] * len(p_pos), dtype=object),) * 2
    )
    differs = shadow_ok & (p_output.notna() & s_output.notna() & (p_output != s_output)).to_numpy(bool)
    attrs["shadow_not_finite"] = int((shadow_ok & ~s_finite & ~differs).sum())
    s_answered = shadow_ok & s_finite & ~differs
    s_top1 = s_answered | (differs & ~np.isnan(shadow_top1))
    if differs.any():  # (the classes of the vectors that compare)
        classes = _class_count(p_side, s_side[~differs])
        attrs["classes"] = classes
    image = col("image_sha256", p_pos)
    out = pd.DataFrame(
        {
            "time": col("time", p_pos),
            "request_id": col("request_id", p_pos),
            "item": col("item", p_pos),
            "trace_id": col("trace_id", p_pos),
            "span_id": col("span_id", s_pos),
            "model": col("model", p_pos),
            "primary_version": col("version", p_pos),
            "shadow_version": col("version", s_pos),
            "image_sha256": image.fillna(col("image_sha256", s_pos)) if image.isna().any() else image,
            "primary_top1": top1[p_pos].astype(np.int32),
            "shadow_top1": shadow_top1.astype(np.int32) if s_top1.all() else np.where(s_top1, shadow_top1, np.nan),
            **(
                {
                    "primary_probs": _rows(_probability_matrix(p_side, classes)[0], np.ones(len(p_pos), bool)),
                    "shadow_probs": _rows(_shadow_matrix(s_side, classes, differs), s_answered),
                }
                if vectors
                else {"primary_row": p_pos, "shadow_row": s_pos}
            ),
            "primary_latency_ms": col("latency_ms", p_pos),
            "shadow_latency_ms": col("latency_ms", s_pos),
            "shadow_error": col("outcome", s_pos).where(~shadow_ok),
            "shadow_finite": s_finite | ~shadow_ok | differs,
            "output_differs": differs,
            "primary_output": p_output,
            "shadow_output": s_output,
            "user_id": col("user_id", p_pos),
            "device_type": col("device_type", p_pos),
            "tenant": col("tenant", p_pos),
            "meta": col("meta", p_pos),
        }
    )
    out.attrs = attrs
    return out


def _shadow_matrix(side: pd.DataFrame, classes: int, differs: np.ndarray) -> np.ndarray:
    """``_probability_matrix`` of the shadow's rows but those whose output ``differs`` (of
    another shape: zeros, their top-k perhaps past ``classes``)."""
    if not differs.any():
        return _probability_matrix(side, classes)[0]
    out = np.zeros((len(side), classes), np.float32)
    out[~differs] = _probability_matrix(side[~differs], classes)[0]
    return out


def _finite(probs: np.ndarray, have: np.ndarray, top1: np.ndarray) -> np.ndarray:
    """Which rows are a prediction: a top-1 and a vector of finite values."""
    return have & ~np.isnan(top1) & np.isfinite(probs).all(axis=1)


PROBS_CHUNK_VALUES = 4_000_000  # the probabilities a chunk of rebuilt vectors holds: 16 MB


def _chunks(n: int, classes: int) -> Iterator[slice]:
    step = max(1, PROBS_CHUNK_VALUES // max(classes, 1))
    return (slice(i, i + step) for i in range(0, n, step))


def _output_rows(df: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """The output columns (``probs``, ``topk_index``, ``topk_prob``, those ``df`` has) at ``rows``."""
    import pandas as pd

    return pd.DataFrame({c: _take(df[c], rows) for c in ("probs", "topk_index", "topk_prob") if c in df.columns})


def _finite_rows(side: pd.DataFrame, classes: int, top1: np.ndarray) -> np.ndarray:
    """``_finite`` of each row of ``side``, its vectors rebuilt a chunk at a time."""
    out = np.empty(len(side), bool)
    for part in _chunks(len(side), classes):
        probs, have = _probability_matrix(side.iloc[part], classes)
        out[part] = _finite(probs, have, top1[part])
    return out


def pair_probabilities(df: pd.DataFrame, pairs: pd.DataFrame, classes: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The primary and shadow probability vectors of ``pairs`` (``shadow_pairs(df,
    vectors=False)``, or rows of it whose shadow answered), as (rows x ``classes``) float32
    matrices, a chunk of at most ``PROBS_CHUNK_VALUES`` at a time: a thousand-class model's
    hour, rebuilt from its top-k whole, took gigabytes."""
    p_rows, s_rows = pairs["primary_row"].to_numpy(), pairs["shadow_row"].to_numpy()
    for part in _chunks(len(pairs), classes):
        yield (
            _probability_matrix(_output_rows(df, p_rows[part]), classes)[0],
            _probability_matrix(_output_rows(df, s_rows[part]), classes)[0],
        )


def _same_version(rows: np.ndarray, of: np.ndarray, version: np.ndarray) -> np.ndarray:
    """For each of ``rows``, whether its primary (``of``, -1: none) has its version."""
    served = np.where(of >= 0, version[np.maximum(of, 0)], -1)
    return (of >= 0) & (served >= 0) & (version[rows] == served)


def _rows(matrix: np.ndarray, have: np.ndarray) -> np.ndarray:
    """An object column of the matrix's row views (None where a row has no vector)."""
    out = np.empty(len(matrix), dtype=object)
    out[:] = list(matrix)
    out[~have] = None
    return out
