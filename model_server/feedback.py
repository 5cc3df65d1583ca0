"""Live feedback: delayed ground-truth labels joined to the predictions that were served.

Every successful primary inference of a classifier leaves (model, version, top-1 per item,
tenant) under its request id in a bounded store with expiry; ``POST /v2/models/{m}/feedback``
joins a label to it and counts ``feedback_total`` and ``feedback_correct_total`` per version,
so live top-1 accuracy per version is one PromQL ratio: the live view of this replica.

With a prediction log, every valid label is also appended to the log, matched here or not: a
request may have been served by another replica (or expired here), and the log's reader joins
labels to predictions by request id across replicas.

A label needs the feedback token its inference response carried (``parameters.feedback_token``
in the response, and the ``X-Feedback-Token`` header): an HMAC of the model and request id
under a key every replica shares (``--feedback-key-file``, a Kubernetes Secret). Only a client
that received the prediction can label it, and one request id takes one label: a re-sent
inference with the same id keeps the first prediction and its label.
"""

from __future__ import annotations

import base64
import hmac
import math
import os
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
    """Issues and checks feedback tokens: HMAC-SHA256 of (model, request id), 144 bits."""

    def __init__(self, key: bytes):
        self._keyed = hmac.new(key, digestmod="sha256")  # copied per token: the key is set up once

    def token(self, model: str, request_id: str) -> str:
        mac = self._keyed.copy()
        mac.update(f"{model}\n{request_id}".encode())
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def check(self, model: str, request_id: str, token: object) -> None:
        if not isinstance(token, str) or not token:
            raise Unauthorized(
                "feedback needs the 'token' its inference response carried (parameters.feedback_token, "
                "or the X-Feedback-Token header)"
            )
        if not hmac.compare_digest(token.encode(), self.token(model, request_id).encode()):
            raise Unauthorized(f"feedback token does not match request {shown(request_id)!r} of model '{model}'")


MAX_CLASS_INDEX = 2**31 - 1  # the prediction log's label column is int32
MAX_LABELS = 1024  # a request's labels when the model does not batch (nor say how many items)


class LabelRules(NamedTuple):
    """What a label for one model may be: a class index below ``classes`` (as many as a row of
    its output has elements, as the prediction log ranks them, else as its names, else as the
    log's int32 allows), or one of its ``names``; at most ``max_items`` labels a request (its
    largest batch)."""

    names: dict[str, int] | None
    classes: int
    max_items: int

    @classmethod
    def of(cls, names: list[Any] | tuple[str, ...] | None, dims: tuple[int, ...], max_batch_size: int) -> LabelRules:
        """``dims``: the output's, the batch's -1 among them or not (``[-1, 1000, 1, 1]``,
        ``[1000]``: 1000 classes; a dimension unknown beyond the first: not known)."""
        index = None if names is None else class_index(names)
        known = [d for d in dims if d > 0]
        classes = math.prod(known) if known and -1 not in dims[1:] else 0
        if classes <= 0:
            classes = len(names) if names else MAX_CLASS_INDEX
        return cls(index, min(classes, MAX_CLASS_INDEX), max_batch_size if max_batch_size > 0 else MAX_LABELS)


@dataclass
class Served:
    model: str
    version: str
    top1: list[int]
    at: float
    tenant: str | None = None
    labelled: bool = False


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


class FeedbackStore:
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
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._gone: OrderedDict[str, str] = OrderedDict()  # recently evicted id -> why
        self._lock = threading.Lock()

    def _evict(self, now: float) -> None:
        while self._served:
            rid, oldest = next(iter(self._served.items()))
            if now - oldest.at > self.ttl_s:
                why = f"expired: served {now - oldest.at:.0f} s ago, feedback is kept {self.ttl_s:g} s"
            elif len(self._served) > self.capacity:
                why = f"expired: evicted to keep the last {self.capacity} predictions"
            else:
                return
            self._served.popitem(last=False)
            self._gone[rid] = why
            if len(self._gone) > self.capacity:
                self._gone.popitem(last=False)

    def record(self, request_id: str, model: str, version: str, top1: list[int], tenant: str | None = None) -> None:
        now = self.clock()
        with self._lock:
            self._evict(now)
            if request_id in self._served:  # a re-sent id keeps its first prediction and label
                return
            self._served[request_id] = Served(model, version, top1, now, tenant)
            self._evict(now)

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
        tenant is the item's ``tenant``, else ``tenant`` (the feedback request's X-Tenant).
        """
        if not isinstance(item, dict) or not isinstance(item.get("request_id"), str):
            raise InvalidInput("feedback needs {'request_id': str, 'label': int | str | [..], 'token': str}")
        rid = item["request_id"]
        self.signer.check(model, rid, item.get("token"))
        if "tenant" in item and not isinstance(item["tenant"], str):
            raise InvalidInput("feedback 'tenant' must be a string")
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
        now = self.clock()
        with self._lock:
            self._evict(now)
            served = self._served.get(rid)
            if served is None:
                why = self._gone.get(rid, "unknown request id: no prediction was served under it here")
                if not accept_unmatched:
                    raise ModelNotFound(f"request {shown(rid)!r}: {why}")
                return Feedback(rid, truth, item.get("tenant", tenant), matched=False, reason=why)
            if served.model != model:
                raise ModelNotFound(f"request {shown(rid)!r} was served by model '{served.model}', not '{model}'")
            if len(truth) != len(served.top1):
                raise InvalidInput(
                    f"request {shown(rid)!r} had {len(served.top1)} prediction(s); got {len(truth)} label(s)"
                )
            if served.labelled:
                raise Conflict(f"request {shown(rid)!r} already has feedback")
            served.labelled = True
        correct = sum(int(t == p) for t, p in zip(truth, served.top1, strict=True))
        metrics.FEEDBACK.labels(model, served.version).inc(len(truth))
        metrics.FEEDBACK_CORRECT.labels(model, served.version).inc(correct)
        return Feedback(rid, truth, served.tenant, matched=True, version=served.version, correct=correct)


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
