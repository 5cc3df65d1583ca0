"""Live feedback: delayed ground-truth labels joined to the predictions that were served.

Every successful primary inference of a classifier leaves (model, version, top-1 per item)
under its request id in a bounded store with expiry; ``POST /v2/models/{m}/feedback`` joins
a label to it and counts ``feedback_total`` and ``feedback_correct_total`` per version, so
live top-1 accuracy per version is one PromQL ratio.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from model_server.errors import InvalidInput, ModelNotFound, ServerError

FEEDBACK = Counter("feedback_total", "Labels received for served predictions", ("model", "version"))
FEEDBACK_CORRECT = Counter(
    "feedback_correct_total", "Labels that matched the served top-1 prediction", ("model", "version")
)


class Conflict(ServerError):
    status = 409


@dataclass
class Served:
    model: str
    version: str
    top1: list[int]
    at: float
    labelled: bool = False


class FeedbackStore:
    def __init__(self, capacity: int = 200_000, ttl_s: float = 3600.0):
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

    def record(self, request_id: str, model: str, version: str, top1: list[int]) -> None:
        now = time.monotonic()
        with self._lock:
            self._served[request_id] = Served(model, version, top1, now)
            self._served.move_to_end(request_id)
            self._evict(now)

    def label(self, model: str, item: Any, labels: list[str] | None) -> dict[str, Any]:
        """Join one ``{"request_id", "label"}``; returns what was counted, raises with the reason."""
        if not isinstance(item, dict) or not isinstance(item.get("request_id"), str):
            raise InvalidInput("feedback needs {'request_id': str, 'label': int | str | [..]}")
        rid = item["request_id"]
        raw = item.get("label")
        values = raw if isinstance(raw, list) else [raw]
        truth = [_label_index(v, labels) for v in values]
        now = time.monotonic()
        with self._lock:
            self._evict(now)
            served = self._served.get(rid)
            if served is None:
                why = self._gone.get(rid, "unknown request id: no prediction was served under it")
                raise ModelNotFound(f"request {rid!r}: {why}")
            if served.model != model:
                raise ModelNotFound(f"request {rid!r} was served by model '{served.model}', not '{model}'")
            if len(truth) != len(served.top1):
                raise InvalidInput(
                    f"request {rid!r} had {len(served.top1)} prediction(s); got {len(truth)} label(s)"
                )
            if served.labelled:
                raise Conflict(f"request {rid!r} already has feedback")
            served.labelled = True
        correct = sum(int(t == p) for t, p in zip(truth, served.top1, strict=True))
        FEEDBACK.labels(model, served.version).inc(len(truth))
        FEEDBACK_CORRECT.labels(model, served.version).inc(correct)
        return {"request_id": rid, "version": served.version, "labels": len(truth), "correct": correct}


def _label_index(value: Any, labels: list[str] | None) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and labels and value in labels:
        return labels.index(value)
    known = f"; labels are {labels}" if labels else ""
    raise InvalidInput(f"label {value!r} is not a class index or a known label{known}")
