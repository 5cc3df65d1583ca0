"""One exception class per HTTP meaning, mapped to a status once (in app.py).

The body is always ``{"error": "<message>"}``: tritonclient turns exactly that into
``InferenceServerException(msg=<message>, status=<code>)``.
"""

from __future__ import annotations


class ServerError(Exception):
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(ServerError):
    status = 400


class Unauthorized(ServerError):
    status = 401


class ModelNotFound(ServerError):
    status = 404


class RequestTimeout(ServerError):
    status = 408


class Conflict(ServerError):
    """The request contradicts the server's state (a second label; unloading a routed version)."""

    status = 409


class PayloadTooLarge(ServerError):
    status = 413


class ModelUnavailable(ServerError):
    """The model exists but cannot serve now (not loaded, draining, out of GPU memory)."""

    status = 503


class InferenceFailed(ServerError):
    """The model itself failed on input that passed validation."""

    status = 500
