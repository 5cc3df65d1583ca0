"""Live feedback: delayed ground-truth labels joined to the predictions that were served.

Every successful primary inference of a classifier leaves (model, version, top-1 per item,
tenant) under its request id in a bounded store with expiry; ``POST /v2/models/{m}/feedback``
joins a label to it and counts ``feedback_total`` and ``feedback_correct_total`` per version,
so live top-1 accuracy per version is one PromQL ratio: the live view of this replica. With a
prediction log a label is counted once the writer has written all its rows (the labels the gates
read); one dropped or lost (a row of it is enough) is never counted, and its resend, once
written, is counted once. Without a log, when taken.

With a prediction log, every valid label is also appended to the log, matched here or not: a
request may have been served by another replica (or expired here), and the log's reader joins
labels to predictions by request id across replicas (the earliest label of an item wins there).

One label per request (request id and tenant) and replica: a replica remembers the requests
labelled on it (within the feedback TTL and capacity), matched or not, and answers a second label
409, so that no client can flood the prediction log with labels of one id and crowd the gates'
records out of it.

A label needs the feedback token its inference response carried (``parameters.feedback_token``
in the response, and the ``X-Feedback-Token`` header): an HMAC of the model, request id and
tenant (X-Tenant) under a key every replica shares (``--feedback-key-file``, a Kubernetes
Secret). Only a client that received the prediction can label it, and one request takes one
label: a re-sent inference with the same id keeps the first prediction and its label; another
tenant's request under the id is another request, with another token. A replica that did not
serve the request takes the tenant from the label (its ``tenant``, else X-Tenant): the token
holds it to the inference's, whose key masks the request id in the log (under another key the
label would join nothing).
Predictions are kept by (model, request id, tenant), up to ``MAX_TENANTS_PER_ID`` tenants an id:
a caller that forwards one X-Request-ID to two models labels each.
"""

from __future__ import annotations

import base64
import hmac
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from model_server import metrics
from model_server.errors import Conflict, InvalidInput, ModelNotFound, Unauthorized, shown
from model_server.trace import REQUEST_ID_RE


def read_key(path: Path, create: bool = False) -> bytes:
    """The feedback key in ``path`` (its text, stripped); with ``create``, a new random one is
    written there first (mode 0600, exclusively) when the file does not exist."""
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    key = path.read_text().strip().encode()
    if len(key) < 16:
        raise ValueError("a feedback key needs at least 16 bytes")
    return key


class FeedbackSigner:
    """Issues and checks feedback tokens: HMAC-SHA256 of (model, request id, tenant), 144 bits.
    The tenant (the inference's X-Tenant) is whose key masks the request id in the log: a label
    under another tenant's key would join no prediction."""

    def __init__(self, key: bytes):
        self._keyed = hmac.new(key, digestmod="sha256")  # copied per token: the key is set up once

    def _digest(self, model: str, request_id: str, tenant: str | None) -> bytes:
        mac = self._keyed.copy()
        mac.update(f"{model}\n{request_id}".encode() + (f"\n{tenant}".encode() if tenant else b""))
        return mac.digest()

    def token(self, model: str, request_id: str, tenant: str | None = None) -> str:
        return base64.urlsafe_b64encode(self._digest(model, request_id, tenant)[:18]).decode()

    def tag(self, model: str, request_id: str, tenant: str | None = None) -> int:
        """The prediction log's ``tenant_tag`` of (model, request id, tenant): 53 bits of the
        token's HMAC that are not the token (no credential; 53: exact as a reader's float64,
        which a column with nulls becomes), equal wherever the feedback key is (every replica,
        either version's pods), across masking keys and their rotations."""
        return int.from_bytes(self._digest(model, request_id, tenant)[18:25], "big") >> 3

    def valid(self, model: str, request_id: str, token: object, tenant: str | None = None) -> bool:
        """Whether ``token`` is the one of (model, request id, tenant)."""
        # (compare_digest takes ASCII text only: any other token, a lone surrogate too, matches none)
        return (
            isinstance(token, str)
            and token.isascii()
            and hmac.compare_digest(token, self.token(model, request_id, tenant))
        )

    def check(self, model: str, request_id: str, token: object, tenant: str | None = None) -> None:
        if not isinstance(token, str) or not token:
            raise Unauthorized(
                "feedback needs the 'token' its inference response carried (parameters.feedback_token, "
                "or the X-Feedback-Token header)"
            )
        if not self.valid(model, request_id, token, tenant):
            raise Unauthorized(
                f"feedback token does not match request {shown(request_id)!r} of model '{model}' "
                "(a label carries the tenant of its inference: its X-Tenant, as the label's 'tenant' "
                "or the X-Tenant header)"
            )


MAX_CLASS_INDEX = 2**31 - 1  # the prediction log's label column is int32
MAX_LABELS = 1024  # a request's labels when the model does not batch (nor say how many items)
MAX_TENANT = 256  # characters of a label's tenant
# A tenant names a masking key: no control characters, nothing UTF-8 cannot encode (a lone
# surrogate, "\ud800", failed the prediction log's whole flush: every label in it was lost).
TENANT_RE = re.compile(rf"[^\x00-\x1f\x7f\ud800-\udfff]{{0,{MAX_TENANT}}}")


class LabelRules(NamedTuple):
    """What a label for one model may be: a class index below ``classes`` (as many as a row of
    its output has elements, as the prediction log ranks them, else as its names, else as the
    log's int32 allows), or one of its ``names``; at most ``max_items`` labels a request (its
    largest batch; without batching, the rows of its output)."""

    names: dict[str, int] | None
    classes: int
    max_items: int

    @classmethod
    def of(cls, names: list[Any] | tuple[str, ...] | None, dims: tuple[int, ...], max_batch_size: int) -> LabelRules:
        """``dims``: the output's, the batch's -1 among them or not (``[-1, 1000, 1, 1]``,
        ``[1000]``: 1000 classes; a dimension unknown beyond the first: not known). Without
        batching (``max_batch_size`` 0) the shape is whole: as ``score_rows`` ranks it, its first
        dimension is the rows and the rest a row's classes (``[1, 1000]``: one item of 1000)."""
        index = None if names is None else class_index(names)
        items = max_batch_size
        if max_batch_size <= 0:
            rows = dims[0] if len(dims) > 1 else 1
            items = min(rows, MAX_LABELS) if rows > 0 else MAX_LABELS
            dims = (-1, *dims[1:]) if len(dims) > 1 else dims
        known = [d for d in dims if d > 0]
        classes = math.prod(known) if known and -1 not in dims[1:] else 0
        if classes <= 0:
            classes = len(names) if names else MAX_CLASS_INDEX
        return cls(index, min(classes, MAX_CLASS_INDEX), items)


@dataclass(slots=True)
class Served:
    model: str
    version: str
    top1: list[int]
    at: float
    tenant: str | None = None
    labelled: bool = False


Key = tuple[str, str, str | None]  # (model, request id, tenant): two tenants' requests under one id are two
MAX_TENANTS_PER_ID = 8  # the requests of one id kept here, each another tenant's


@dataclass(frozen=True)
class Feedback:
    """One validated label: joined to a prediction this replica served, or not (``matched``)."""

    request_id: str
    truth: list[int]
    tenant: str | None  # whose key masks the request id in the log
    matched: bool
    version: str | None = None
    correct: int | None = None
    reason: str | None = None  # why it was not matched here
    why: str | None = None  # the same, as feedback_unmatched_total's reason: unknown, expired, evicted

    def count(self, model: str) -> None:
        """Count this label in the live view (``count_label``) as taken: where the server keeps
        no prediction log (with one, the writer counts it once its file is written)."""
        count_label(model, self.version if self.matched else None, len(self.truth), self.correct, self.why)

    def answer(self, logged: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "labels": len(self.truth),
            "matched_locally": self.matched,
        }
        if self.matched:
            out.update(version=self.version, correct=self.correct)
        else:
            out["reason"] = self.reason
        out["logged"] = logged
        return out


def count_label(model: str, version: str | None, items: int, correct: int | None, why: str | None) -> None:
    """Count one label in the live view: matched here (``version``, the one that served it),
    its ``items`` in ``feedback_total`` and its ``correct`` ones in ``feedback_correct_total`` of
    that version; else 1 in ``feedback_unmatched_total`` of ``why`` it was not matched here.
    Thread-safe (the prediction log's writer counts what it wrote)."""
    if version is not None:
        metrics.FEEDBACK.labels(model, version).inc(items)
        metrics.FEEDBACK_CORRECT.labels(model, version).inc(correct or 0)
    else:
        metrics.FEEDBACK_UNMATCHED.labels(model, why or "unknown").inc()


class FeedbackStore:
    """The predictions this replica served, for their labels: at most ``capacity`` items (a
    request of batch 64 holds 64: the memory is the items'), each for ``ttl_s``; the ids recently
    evicted (why, for the answer); the ids labelled here (matched or not, for ``ttl_s``, at most
    ``capacity``), which a second label finds taken."""

    def __init__(
        self,
        signer: FeedbackSigner,
        capacity: int = 200_000,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.signer = signer
        self.clock = clock
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._served: OrderedDict[Key, Served] = OrderedDict()
        self._tenants: dict[tuple[str, str], list[str | None]] = {}  # (model, request id) -> its tenants served
        self._items = 0  # the served predictions' items, together
        self._gone: OrderedDict[Key, tuple[str, float]] = OrderedDict()  # evicted -> (expired | evicted, served at)
        self._labelled: OrderedDict[Key, float] = OrderedDict()  # labelled here -> when
        self._lock = threading.Lock()

    def _evict(self, now: float) -> None:
        while self._served:
            key, oldest = next(iter(self._served.items()))
            if now - oldest.at > self.ttl_s:
                why = "expired"
            elif self._items > self.capacity:
                why = "evicted"
            else:
                break
            self._served.popitem(last=False)
            self._items -= len(oldest.top1)
            tenants = self._tenants[key[:2]]
            tenants.remove(key[2])
            if not tenants:
                del self._tenants[key[:2]]
            self._gone[key] = (why, oldest.at)
            if len(self._gone) > self.capacity:
                self._gone.popitem(last=False)
        ids = self._labelled
        while ids and (len(ids) > self.capacity or now - next(iter(ids.values())) > self.ttl_s):
            ids.popitem(last=False)

    def _why(self, key: Key, now: float) -> tuple[str, str]:
        """(metric label, sentence) of a request id not held here."""
        gone = self._gone.get(key)
        if gone is None:
            return "unknown", "unknown request id: no prediction was served under it here since this replica started"
        why, at = gone
        if why == "expired":
            return why, f"expired: served {now - at:.0f} s ago, feedback is kept {self.ttl_s:g} s"
        return why, f"expired: evicted to keep the last {self.capacity} predicted items"

    def record(self, request_id: str, model: str, version: str, top1: list[int], tenant: str | None = None) -> None:
        """Keep a prediction for its label, unless its tenant (its X-Tenant, up to the headers'
        60 KiB) is longer than a label's ``tenant`` may be: kept an hour each, such tenants held
        gigabytes. Its label still reaches the prediction log, under the label's X-Tenant. Two
        tenants' requests under one id are two predictions (up to ``MAX_TENANTS_PER_ID``);
        an id re-sent by its tenant keeps its first."""
        if tenant is not None and len(tenant) > MAX_TENANT:
            return
        tenant = tenant or None  # (an X-Tenant of "": none, as its token has it)
        now = self.clock()
        key = (model, request_id, tenant)
        with self._lock:
            self._evict(now)
            tenants = self._tenants.setdefault(key[:2], [])
            # a re-sent id keeps its first prediction and label; a batch above the capacity would
            # evict all and itself
            if key in self._served or len(tenants) >= MAX_TENANTS_PER_ID or len(top1) > self.capacity:
                if not tenants:
                    del self._tenants[key[:2]]
                return
            tenants.append(tenant)
            self._served[key] = Served(model, version, top1, now, tenant)
            self._items += len(top1)
            self._evict(now)

    def forget(self, model: str, request_id: str, tenant: str | None) -> None:
        """Take back the mark of a label the prediction log did not keep (its buffer was full,
        or it lost the label at its flush: its tenant's masking key unusable, its file not
        written): its sender may send it again, matched here or not (it was not counted: the
        log counts what it wrote). ``tenant``: the label's (``Feedback.tenant``)."""
        key = (model, request_id, tenant)
        with self._lock:
            self._labelled.pop(key, None)
            served = self._served.get(key)
            if served is not None:
                served.labelled = False

    def label(
        self,
        model: str,
        item: Any,
        rules: LabelRules,
        accept_unmatched: bool = False,
        tenant: str | None = None,
    ) -> Feedback:
        """Validate one ``{"request_id", "label", "token"[, "tenant"]}`` and join it to what was
        served here.

        A request this replica did not serve (or no longer remembers) raises 404, unless
        ``accept_unmatched`` (a prediction log will keep the label for the reader's join); its
        tenant is the item's ``tenant``, else ``tenant`` (the feedback request's X-Tenant), and
        the token must be that tenant's, else 401. A request served here is the one whose
        tenant its token names, whatever the label says (it need not name it). A request already
        labelled here, matched or not, raises 409.
        """
        if not isinstance(item, dict) or not isinstance(item.get("request_id"), str):
            raise InvalidInput("feedback needs {'request_id': str, 'label': int | str | [..], 'token': str}")
        rid = item["request_id"]
        if not REQUEST_ID_RE.fullmatch(rid):  # what the server takes from X-Request-ID, or makes
            raise InvalidInput(
                f"feedback 'request_id' {shown(repr(rid))} is not a request id: 1 to 128 printable ASCII"
            )
        if "tenant" in item:
            check_tenant(item["tenant"], "feedback 'tenant'")
        raw = item.get("label")
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            raise InvalidInput("feedback 'label' must not be an empty list")
        if len(values) > rules.max_items:
            raise InvalidInput(
                f"feedback for request {shown(rid)!r} has {len(values)} labels; "
                f"model '{model}' answers at most {rules.max_items} items a request"
            )
        truth = [_label_index(v, rules) for v in values]
        claimed = item.get("tenant", tenant) or None  # ("": none, as the token has it)
        token = item.get("token")
        now = self.clock()
        with self._lock:
            self._evict(now)
            # (the token names the inference's tenant: of the requests served here under the id,
            # its tenant's; else the label's word, checked below)
            mine = (t for t in self._tenants.get((model, rid), ()) if self.signer.valid(model, rid, token, t))
            served = self._served.get((model, rid, next(mine, claimed)))
            key = (model, rid, claimed if served is None else served.tenant)
            self.signer.check(model, rid, token, key[2])
            if served is None and not accept_unmatched:
                raise ModelNotFound(f"request {shown(rid)!r}: {self._why(key, now)[1]}")
            if served is not None and len(truth) != len(served.top1):
                raise InvalidInput(
                    f"request {shown(rid)!r} had {len(served.top1)} prediction(s); got {len(truth)} label(s)"
                )
            if key in self._labelled or (served is not None and served.labelled):
                raise Conflict(f"request {shown(rid)!r} already has feedback")
            if served is not None:
                served.labelled = True
            self._labelled[key] = now
            self._evict(now)
            if served is None:
                code, why = self._why(key, now)
        if served is None:
            return Feedback(rid, truth, claimed, matched=False, reason=why, why=code)
        correct = sum(int(t == p) for t, p in zip(truth, served.top1, strict=True))
        return Feedback(rid, truth, served.tenant, matched=True, version=served.version, correct=correct)


def check_tenant(tenant: object, what: str) -> None:
    """InvalidInput unless ``tenant`` is one a label may carry (``TENANT_RE``): a label's
    ``tenant``, or the feedback request's X-Tenant for the labels without one."""
    if not (isinstance(tenant, str) and TENANT_RE.fullmatch(tenant)):
        raise InvalidInput(
            f"{what} must be a string of at most {MAX_TENANT} characters, no control characters, valid Unicode"
        )


def class_index(names: list[Any] | tuple[str, ...]) -> dict[str, int]:
    """A model's class names, each to its index (the first, where one is named twice; what is
    not a string names none)."""
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if isinstance(name, str):
            index.setdefault(name, i)
    return index


def _label_index(value: Any, rules: LabelRules) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < rules.classes:
        return value
    names = rules.names
    if isinstance(value, str) and names and value in names:
        return names[value]
    known = f"; classes are 0 to {rules.classes - 1}"
    if names:
        few = ", ".join(shown(name) for name in list(names)[:10])
        known += f", or their names: {few}" + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    raise InvalidInput(f"label {shown(repr(value))} is not a class index or a known label{known}")
