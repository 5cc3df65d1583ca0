"""Every exception class of the model server, how their messages show a client's names, and how
often a line that repeats is logged (``EveryInterval``).

``ServerError`` and its subclasses are one class per HTTP meaning, mapped to a status once (in
app.py). The body is always ``{"error": "<message>"}``: tritonclient turns exactly that into
``InferenceServerException(msg=<message>, status=<code>)``. The last three classes never reach
a client as such: each is caught by the module that raised it, or by its one caller.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model_server.shadow import ShadowJob


def shown(name: str) -> str:
    """A client's name as an error message shows it: at most 64 characters (a request's names
    are as long as its JSON part allows, and messages reach the log)."""
    return name if len(name) <= 64 else name[:64] + "..."


def shown_value(value: Any) -> str:
    """A value a client sent, as its repr, shortened as ``shown`` shortens a name."""
    return shown(repr(value)[:80])


def json_refusal(exc: Exception) -> str:
    """Why ``json.loads`` (or reading its file) failed, in words: a RecursionError, JSON nested
    deeper than Python's parser goes, in the server's words, not Python's ("maximum recursion
    depth exceeded while decoding a JSON array from a unicode string"); else its message."""
    if isinstance(exc, RecursionError):
        return (
            f"JSON nested too deep: arrays and objects within each other are read to about "
            f"{sys.getrecursionlimit()} levels at most"
        )
    return str(exc)


def shown_names(names: Iterable[Any]) -> list[str]:
    """The fields a client named that are not known, for a message: the first ten in order,
    each shortened (a JSON object may hold as many names, as long, as its body allows)."""
    return [shown(str(name)) for name in sorted(names)[:10]]


class EveryInterval:
    """A log line that may repeat as fast as its cause does (a flood of refusals, a version
    failing every request): at most one per ``interval_s``, the next one counting those left out."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.next_at = -math.inf
        self.left_out = 0

    def due(self) -> int | None:
        """Whether a line is due now: the count of those left out since the last one (then it is
        logged), or None (this one is left out, and counted)."""
        now = time.monotonic()
        if now < self.next_at:
            self.left_out += 1
            return None
        self.next_at = now + self.interval_s
        left_out, self.left_out = self.left_out, 0
        return left_out


class ServerError(Exception):
    status = 500
    # A failed inference's copy for the shadow version, mirrored all the same once the answer is
    # sent (Envoy copies a request before its primary's outcome is known); set by the data plane.
    shadow: ShadowJob | None = None
    retry_after_s: int | None = None  # answered with Retry-After: a refusal for now, not for good

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(ServerError):
    status = 400


class ModelRejectedInput(InvalidInput):
    """The model's own run refused an input the server's checks let through (ONNX Runtime's
    InvalidArgument: a data-dependent index out of range, a reshape that fits some inputs): a
    400 as Triton answers it, but the version's failure (BACKEND), which another version may
    not have."""


class Unauthorized(ServerError):
    status = 401


class ModelNotFound(ServerError):
    status = 404


class AdminOnly(ServerError):
    """An admin call on the data port of a server with an admin port: not served there."""

    status = 404


class NotSupported(ServerError):
    """A part of Triton's protocol this server does not implement (shared memory, tracing,
    dynamic logging): 501, as Triton answers a feature it lacks (UNSUPPORTED)."""

    status = 501


class RequestTimeout(ServerError):
    status = 408


class MethodNotAllowed(ServerError):
    status = 405


class Conflict(ServerError):
    """The request contradicts the server's state (a second label; unloading a routed version)."""

    status = 409


class PayloadTooLarge(ServerError):
    status = 413


class ServerBusy(ServerError):
    """Refused for now: the server holds as much of its clients' requests as it takes
    (``BodyBudget``); answered 503 with Retry-After."""

    status = 503
    retry_after_s = 1


class StateNotSaved(ServerError):
    """A change whose state file could not be written (a full or read-only state volume): the
    change is not made, so what serves is what a restart restores."""

    status = 503

    @classmethod
    def writing(cls, path: object, exc: OSError) -> StateNotSaved:
        return cls(f"cannot write the state file {path}: {exc.strerror or exc}; nothing changed")


class ModelUnavailable(ServerError):
    """The model exists but cannot serve now (not loaded, draining, out of GPU memory)."""

    status = 503


class OutOfMemory(ModelUnavailable):
    """A device allocation failed: retryable, counted apart from other failures."""


class Preempted(ModelUnavailable):
    """A run aborted through its RunOptions (a shadow run giving way to primary traffic), or a
    shadow copy dropped before it ran; ``reason``: why, as ``shadow_dropped_total`` counts it."""

    def __init__(self, message: str, reason: str = "no_idle_time"):
        super().__init__(message)
        self.reason = reason


class Rejected(ModelUnavailable):
    """Refused by the dynamic batcher's queue policy (queue full, queue timeout), as Triton does."""


class ClientTimeout(Rejected):
    """Refused when the queue timeout the client chose (``parameters.timeout``) expired: counted
    CANCELED, so that a client cannot move a version's error rate by the timeouts it sends."""


class Cancelled(ServerError):
    """A request given up before its answer: its client disconnected (the transport cancels it,
    and it leaves the batcher's queue) or the server stopped. Nothing is written to the client;
    counted CANCELED, as a client's own queue timeout is, and 499 (nginx's "client closed
    request") in the access log and the HTTP counter."""

    status = 499


class InferenceFailed(ServerError):
    """The model itself failed on input that passed validation."""

    status = 500


class InjectedFault(InferenceFailed):
    """An abort injected by fault injection: a backend failure to the metrics, FAULT in the log."""


def failure_reason(exc: ServerError) -> str:
    """Why a request failed: Triton's reasons of nv_inference_request_failure (CANCELED, REJECTED,
    BACKEND: the version's, a model that refused an input included), OOM, or INVALID_INPUT (the
    client's request: the prediction log's outcome, no failure in the metrics, as in Triton)."""
    if isinstance(exc, OutOfMemory):
        return "OOM"
    if isinstance(exc, ClientTimeout | Cancelled):
        return "CANCELED"
    if isinstance(exc, Rejected):
        return "REJECTED"
    return "INVALID_INPUT" if exc.status < 500 and not isinstance(exc, ModelRejectedInput) else "BACKEND"


def outcome_of(exc: ServerError) -> str:
    """A failed inference's outcome in the prediction log: the metrics' reason, or FAULT."""
    return "FAULT" if isinstance(exc, InjectedFault) else failure_reason(exc)


class PolicyError(ValueError):
    """An invalid traffic policy; the message names the field and the reason (the admin API
    answers it as InvalidInput)."""


class MaskingUnavailable(Exception):
    """No usable key for a tenant: its records must not be written."""


class RequestRefused(Exception):
    """A request refused from its headers (over a limit: 431), raised from the HTTP parser's
    callback: the connection answers ``status`` before anything reaches the application
    (httpserver.py), and closes."""

    def __init__(self, status: int, reason: str, retry_after_s: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.retry_after_s = retry_after_s
