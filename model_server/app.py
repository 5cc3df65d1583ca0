"""HTTP layer: the KServe v2 / Triton HTTP protocol over the data plane.

Routes only parse a request (body limits, JSON, headers), call the data plane (dataplane.py)
or an admin call (admin.py), and encode the answer; every error becomes ``{"error": ...}``
with the status of its exception class, so nothing escapes as a crash. The admin token is
checked here, before any admin call, and with an admin port (``Settings.admin_port``) the port
the call arrived on (ASGI ``scope["server"]``): one app serves both listeners.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from model_server import metrics
from model_server.admin import Admin
from model_server.config import MAX_COPY_AGE_S, MAX_JSON_BYTES, ascii_uint, json_problem
from model_server.dataplane import DataPlane, InferResult, RequestContext, shadow_record
from model_server.errors import (
    AdminOnly,
    Cancelled,
    InvalidInput,
    MethodNotAllowed,
    ModelNotFound,
    NotSupported,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
    Unauthorized,
    shown,
)
from model_server.feedback import FeedbackSigner, FeedbackStore
from model_server.httpserver import Answer, BodyBudget, DirectRoute, NoBody, fix_mmap_threshold
from model_server.predictionlog import PredictionLog
from model_server.protocol import HEADER_LENGTH, parse_json, refuse_constant
from model_server.repository import ModelRepository
from model_server.shadow import ShadowMirror, ShadowResult, header_text
from model_server.trace import TraceContext, request_id
from model_server.traffic import PolicyStore

log = logging.getLogger(__name__)

DRAIN_FACTOR = 4
JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass
class Settings:
    max_body_bytes: int = 64 * 1024 * 1024
    max_bodies_bytes: int = 4 * 64 * 1024 * 1024  # the bodies being received together (BodyBudget); 503 above
    request_timeout_s: float = 30.0
    admin_token: str | None = None
    # Where the prediction log is written is no client's business (a bucket, a folder's path):
    # said to the admin token's holder, as the admin calls are (SHOW_LOG).
    show_prediction_log: str = "admin"
    admin_port: int | None = None  # admin calls are answered on this port only (None: on any)
    state_dir: Path | None = None  # traffic policies persist here (restored on restart)
    traffic_file: Path | None = None  # watched policy file: {"models": {name: policy}}
    traffic_poll_s: float = 1.0
    shadow_queue: int = 256  # mirrored requests waiting for the shadow; more are dropped
    shadow_queue_bytes: int = 256 * 1024 * 1024  # and the bytes of their inputs together
    shadow_copy_max_age_s: float = MAX_COPY_AGE_S  # how long a shadow copy may wait for idle time
    shadow_workers: int = 2
    # A mesh in front mirrors requests (Istio's copies, Host "...-shadow"); without one, the server
    # mirrors in process and a "-shadow" Host is any client's (it faked shadow successes: the
    # rollout's shadow-error guard diluted by anyone who reached the port).
    mesh_mirror: bool = False
    feedback_capacity: int = 200_000  # served items (a batch of N is N) kept for delayed labels
    feedback_ttl_s: float = 3600.0
    max_json_bytes: int = MAX_JSON_BYTES  # an infer request's JSON part, any other JSON body
    feedback_max_items: int = 1000  # labels in one feedback call
    feedback_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))  # shared by replicas


Handler = Callable[[Request], Awaitable[Response]]


CONTENT_CODINGS = {"identity": 0, "gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """A request body sent with ``Content-Encoding`` gzip or deflate (the zlib format, as
    tritonclient's ``request_compression_algorithm`` and Triton use it): at most ``limit`` bytes
    once decompressed (413 above, known without inflating further), one whole stream (else 400)."""
    inflater = zlib.decompressobj(CONTENT_CODINGS[encoding])
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"request body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes once decompressed ({encoding})")
    if not inflater.eof or inflater.unused_data:
        raise InvalidInput(f"request body is not one whole {encoding} stream (cut short, or data after it)")
    return out


def response_coding(accept: str | None) -> str:
    """The coding of an inference response, picked from ``Accept-Encoding`` as Triton picks it
    (tritonclient's ``response_compression_algorithm`` sends one): gzip, deflate or identity,
    the first of the highest weight above 0; the identity when none is named or none is valid."""
    best, weight = "identity", 0.0
    for entry in (accept or "").split(","):
        coding, *params = (part.strip().lower() for part in entry.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = -1.0  # a malformed weight: the entry is skipped
        if coding in CONTENT_CODINGS and 0.0 <= q <= 1.0 and q > weight:
            best, weight = coding, q
    return best


# A compressed request's JSON part (the whole body but for an inference's binary tensors) may
# inflate to at most this many times the compressed body, or to ``MIN_INFLATED_JSON``: its
# parsing holds the event loop (4 MiB of numbers 0.2 s), and a 4 KB gzip body inflating to 4 MiB
# stalled every request, health probes too, for seconds. Real tensors' text compresses 2 to 20 times.
MAX_JSON_INFLATION = 32
MIN_INFLATED_JSON = 256 * 1024


def check_inflation(compressed: int, body: bytes, json_length: str | None, encoding: str) -> None:
    """413 when the JSON part of a decompressed body (``json_length`` bytes of it, as
    Inference-Header-Content-Length says, or all of it) inflated past its bound."""
    json_len = len(body) if json_length is None else ascii_uint(json_length.strip())
    bound = max(MIN_INFLATED_JSON, MAX_JSON_INFLATION * compressed)
    if json_len is not None and json_len > bound:
        raise PayloadTooLarge(
            f"the JSON part of the request is {json_len} bytes once decompressed ({encoding}), over {bound} bytes: "
            f"{MAX_JSON_INFLATION} times the {compressed} bytes sent, at least {MIN_INFLATED_JSON}; send it "
            "uncompressed, or its tensors as binary data"
        )


MIN_COMPRESSED = 1024  # smaller answers as they are: gzip's framing and work not repaid
COMPRESSED_ON_LOOP = 16 * 1024  # smaller: compressed where it is (under 0.3 ms; a thread's hop costs about as much)
FEEDBACK_ON_LOOP = 16  # labels in a list answered where it is (under 0.3 ms); a longer list in a thread


def compress(body: bytes, coding: str) -> bytes:
    """A response body in gzip or deflate (the zlib format, as Triton and tritonclient read it)."""
    packer = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, CONTENT_CODINGS[coding])
    return packer.compress(body) + packer.flush()


class VersionConvertor(StringConvertor):
    """A path's version as Triton's routes take it (``/versions/([0-9]+)`` in its
    http_server.cc): other text matches no endpoint, a 404 as there, not a bad version."""

    regex = "[0-9]+"


register_url_convertor("version", VersionConvertor())

# The infer endpoints, served by InferFastPath without Starlette's router, request and response
# objects: they are most of a small model's time on the server.
INFER_ROUTES = ("/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer")
INFER_PATH = re.compile(rf"/v2/models/([^/]+)(?:/versions/({VersionConvertor.regex}))?/infer/?")


def client_gone() -> InvalidInput:
    return InvalidInput("client disconnected while sending the body")


def error(status: int, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = None if retry_after_s is None else {"retry-after": str(retry_after_s)}
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def error_headers(exc: ServerError) -> list[tuple[bytes, bytes]]:
    if exc.retry_after_s is None:
        return JSON_HEADERS
    return [*JSON_HEADERS, (b"retry-after", str(exc.retry_after_s).encode())]


def header_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's headers, names in lower case (as the server hands them), the first of each
    name; values as their sender wrote them (``header_text``: UTF-8, else Latin-1), so that the
    masking reads a full-width number as a number, and header rules match text as Envoy matches
    its bytes."""
    return {k.decode("latin-1"): header_text(v) for k, v in reversed(headers)}


# Headers that say one thing: sent twice, a proxy in front may act on the last and the server on
# the first (the body's length or coding, whose token), so a request naming one twice is a 400.
SINGLE_HEADERS = frozenset({b"authorization", b"content-encoding", HEADER_LENGTH.lower().encode()})


def check_single(headers: list[tuple[bytes, bytes]], first: Mapping[str, str]) -> None:
    """400 naming a header of ``SINGLE_HEADERS`` sent more than once (``first``: ``header_dict``'s,
    shorter than ``headers`` only when a name repeats)."""
    if len(first) == len(headers):
        return
    seen: set[bytes] = set()
    for name, _ in headers:
        if name in SINGLE_HEADERS:
            if name in seen:
                raise InvalidInput(f"the {name.decode()} header is sent more than once: send it once")
            seen.add(name)


def rule_headers(headers: list[tuple[bytes, bytes]], first: Mapping[str, str]) -> dict[str, str] | None:
    """The headers as Envoy's header matching sees them when a name is sent more than once (its
    values joined by ',', in order), for the traffic policy's rules; None when none repeats
    (``first``, ``header_dict``'s, is what they see)."""
    if len(first) == len(headers):
        return None
    joined: dict[str, list[str]] = {}
    for k, v in headers:
        joined.setdefault(k.decode("latin-1"), []).append(header_text(v))
    return {k: ",".join(values) for k, values in joined.items()}


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """An ASGI request body as it arrives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise client_gone()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def cancel_when_gone(receive: Receive, task: asyncio.Task[Any]) -> bool:
    """Cancel ``task`` when its client disconnects, once its request body was read whole (the
    next ASGI message is then the disconnect); True when it did."""
    if (await receive())["type"] != "http.disconnect":
        return False
    task.cancel()
    return True


class InferFastPath:
    """ASGI: ``.../infer`` straight to its handler, every other path to the Starlette app.
    ``direct``: the same handler for the requests the HTTP protocol answers itself."""

    def __init__(
        self,
        app: ASGIApp,
        infer: Callable[[Scope, Receive, Send, str, str | None], Awaitable[None]],
        direct: DirectRoute,
    ):
        self.app, self.infer, self.direct = app, infer, direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and b"%" in (raw := scope.get("raw_path") or b""):
            # Routed on the path as sent, as Triton's routes match evhtp's undecoded path: a
            # version "%31" is no [0-9]+ (a 404), a model "digit%73" no model (it was served
            # as version 1 and as digits).
            scope = {**scope, "path": raw.decode("latin-1")}
        if scope["type"] == "http" and (match := INFER_PATH.fullmatch(scope["path"])):
            await self.infer(scope, receive, send, match.group(1), match.group(2))
        else:
            await self.app(scope, receive, send)


def is_shadow_host(host: str | None) -> bool:
    """Whether Host/:authority marks a copy made by Envoy's (Istio's) request mirroring.

    Envoy appends ``-shadow`` to the host, before the port: ``digits.ml.svc:8000`` becomes
    ``digits.ml.svc-shadow:8000`` (envoyproxy/envoy#2600; before 2018 it went after the port,
    ``digits.ml.svc:8000-shadow``, also recognised).
    """
    if not host:
        return False
    host = host.strip().lower()
    if host.endswith("-shadow"):
        return True
    name, sep, port = host.rpartition(":")
    return bool(sep) and ascii_uint(port) is not None and name.endswith("-shadow")


def create_app(repo: ModelRepository, settings: Settings, prediction_log: PredictionLog | None = None) -> InferFastPath:
    plog = prediction_log
    policies = PolicyStore(settings.state_dir, on_change=metrics.show_traffic_policy)
    feedback = FeedbackStore(FeedbackSigner(settings.feedback_key), settings.feedback_capacity, settings.feedback_ttl_s)

    def log_shadow(result: ShadowResult) -> None:
        assert plog is not None
        plog.append(shadow_record(result))

    mirror = ShadowMirror(
        repo,
        settings.shadow_queue,
        settings.shadow_workers,
        sink=None if plog is None else log_shadow,
        queue_bytes=settings.shadow_queue_bytes,
        max_copy_age_s=settings.shadow_copy_max_age_s,
    )
    dataplane = DataPlane(repo, policies, feedback, mirror, plog, settings.max_json_bytes)
    admin_api = Admin(repo, policies)
    budget = BodyBudget(settings.max_bodies_bytes)
    fix_mmap_threshold()  # large request bodies go back to the system once freed

    http_counters: dict[tuple[str, int], Any] = {}  # (route, status): bounded by routes x statuses

    def count_http(route: str, status: int) -> None:
        counter = http_counters.get((route, status))
        if counter is None:
            counter = http_counters[route, status] = metrics.HTTP_REQUESTS.labels(route, str(status))
        counter.inc()

    def endpoint(route: str, admin: bool = False) -> Callable[[Handler], Handler]:
        """Map exceptions to statuses once, check the admin token, count by route."""

        def wrap(fn: Handler) -> Handler:
            async def handler(request: Request) -> Response:
                try:
                    check_single(request.headers.raw, header_dict(request.headers.raw))
                    if admin:
                        check_admin_port(request.scope)
                        check_admin(request.headers)
                    response = await fn(request)
                except ServerError as exc:
                    response = error(exc.status, exc.message, exc.retry_after_s)
                except Exception:  # a bug, not the client's fault: answer, log, keep serving
                    log.exception("unhandled error on %s %s", request.method, request.url.path)
                    response = error(500, "internal server error; see the server log")
                count_http(route, response.status_code)
                return response

            return handler

        return wrap

    def check_admin_port(scope: Scope) -> None:
        """With ``--admin-port``, the admin API (every ``endpoint(..., admin=True)``: traffic
        policies, load and unload, fault injection) is on that port only, which a Kubernetes
        Service need not expose: the data port answers 404, as for a path it does not serve."""
        if settings.admin_port is None:
            return
        server = scope.get("server")
        if server is None or server[1] != settings.admin_port:
            raise AdminOnly(
                f"{scope['method']} {scope['path']} is an admin call: it is served on the admin port "
                f"{settings.admin_port} only, not on this data port"
            )

    def is_admin(headers: Mapping[str, str]) -> bool:
        if settings.admin_token is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), settings.admin_token.encode())

    def check_admin(headers: Mapping[str, str]) -> None:
        if not is_admin(headers):
            raise Unauthorized("admin call: send 'Authorization: Bearer <admin token>'")

    def body_encoding(headers: Mapping[str, str]) -> str:
        """The body's Content-Encoding, checked with its Content-Length before it is read."""
        declared = headers.get("content-length")
        if declared is not None and ascii_uint(declared.strip()) is None:
            raise InvalidInput(f"invalid Content-Length {declared!r}")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in CONTENT_CODINGS:
            raise InvalidInput(f"unsupported Content-Encoding {encoding[:40]!r}: use gzip, deflate or identity")
        return encoding

    async def decoded(body: bytes, encoding: str, limit: int, json_length: str | None) -> bytes:
        """The body decompressed; ``json_length``: its JSON part's (None: all of it is JSON)."""
        if encoding == "identity" or not body:
            return body
        out = await asyncio.to_thread(decompress, body, encoding, limit)
        check_inflation(len(body), out, json_length, encoding)
        return out

    async def read_body(
        receive: Receive, headers: Mapping[str, str], limit: int | None = None, json_length: str | None = None
    ) -> bytes:
        limit = limit or settings.max_body_bytes
        encoding = body_encoding(headers)
        declared = headers.get("content-length")
        length = 0 if declared is None else int(declared)  # (checked by body_encoding)
        too_big = length > limit

        def over_limit(size: object) -> PayloadTooLarge:
            return PayloadTooLarge(f"request body of {size} bytes is over the limit of {limit} bytes")

        if too_big and (length > DRAIN_FACTOR * limit or "100-continue" in headers.get("expect", "").lower()):
            # Refused from the headers: before the client is told to send it (the first receive()
            # would tell it), or when it is too long to drain anyway (a client declaring 10 GB and
            # sending nothing held its connection until the body timeout, then got a 408).
            raise over_limit(length)

        async def read() -> bytes:
            chunks, size, held = [], 0, 0
            try:
                async for chunk in body_chunks(receive):
                    size += len(chunk)
                    if size <= limit:
                        budget.take(len(chunk))
                        held += len(chunk)
                        chunks.append(chunk)
                    elif size > DRAIN_FACTOR * limit:
                        break  # not worth draining: answer now, the connection closes
            finally:
                budget.give(held)
            if size > limit:
                # The rest was drained, not kept, so the client reads this 413, not a reset.
                raise over_limit(length or size)
            return b"".join(chunks)

        try:
            async with asyncio.timeout(settings.request_timeout_s):
                body = await read()
        except TimeoutError:
            if too_big:  # (drained so that the client reads the answer; what matters is its length)
                raise over_limit(length) from None
            raise body_timeout() from None
        return await decoded(body, encoding, limit, json_length)

    async def buffered_body(body: bytes | NoBody, headers: Mapping[str, str]) -> bytes:
        """The body the HTTP protocol buffered (at most ``max_body_bytes``), or why there is
        none, checked and refused as ``read_body`` checks and refuses one it reads."""
        encoding = body_encoding(headers)
        if body is NoBody.TIMED_OUT:
            raise body_timeout()
        if body is NoBody.DISCONNECTED:
            raise client_gone()
        return await decoded(body, encoding, settings.max_body_bytes, headers.get(HEADER_LENGTH.lower()))

    def body_timeout() -> RequestTimeout:
        return RequestTimeout(f"request body not received within {settings.request_timeout_s:g} s")

    async def json_body(request: Request, allow_list: bool = False) -> Any:
        body = await read_body(request.receive, request.headers, settings.max_json_bytes)
        if not body.strip():
            return {}
        data = parse_json(body)
        if not isinstance(data, dict) and not (allow_list and isinstance(data, list)):
            raise InvalidInput("request body must be a JSON object" + (" or a list" if allow_list else ""))
        return data

    # -- health and metadata ----------------------------------------------------------------

    @endpoint("/v2/health/live")
    async def live(request: Request) -> Response:
        return Response(status_code=200)

    @endpoint("/v2/health/ready")
    async def ready(request: Request) -> Response:
        reason = dataplane.not_ready_reason()
        return Response(status_code=200) if reason is None else error(503, reason)

    @endpoint("/v2")
    async def server_metadata(request: Request) -> Response:
        show = settings.show_prediction_log
        return JSONResponse(
            dataplane.server_metadata(show == "everyone" or (show == "admin" and is_admin(request.headers)))
        )

    @endpoint("/v2/models/{model}")
    async def model_metadata(request: Request) -> Response:
        params = request.path_params
        return JSONResponse(dataplane.model_metadata(params["model"], params.get("version")))

    @endpoint("/v2/models/{model}/config")
    async def model_config(request: Request) -> Response:
        params = request.path_params
        return JSONResponse(dataplane.model_config(params["model"], params.get("version")))

    @endpoint("/v2/models/{model}/ready")
    async def model_ready(request: Request) -> Response:
        params = request.path_params
        reason = dataplane.model_not_ready_reason(params["model"], params.get("version"))
        return Response(status_code=200) if reason is None else error(503, reason)

    @endpoint("/v2/models/{model}/stats")
    async def model_stats(request: Request) -> Response:
        """Triton's statistics extension: all models (/v2/models/stats), one, or one version."""
        params = request.path_params
        return JSONResponse(dataplane.statistics(params.get("model"), params.get("version")))

    # -- inference --------------------------------------------------------------------------

    async def answer_infer(
        method: str,
        path: str,
        raw_headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        model: str,
        version: str | None,
        read: Callable[[Mapping[str, str]], Awaitable[bytes]],
    ) -> Answer:
        """``POST /v2/models/{m}[/versions/{v}]/infer``, on either way it arrives (InferFastPath,
        or the HTTP protocol's DirectRoute): every outcome an answer, nothing raised."""
        started = time.perf_counter()
        received_at = time.time()
        rid = None
        result: InferResult | None = None
        shadow = None  # the copy for the shadow version, whatever the answer (dataplane.py)
        try:
            if method != "POST":
                raise MethodNotAllowed(f"method {method} not allowed on {shown(path)}")
            headers = header_dict(raw_headers)
            check_single(raw_headers, headers)
            rid = request_id(headers.get("x-request-id"))
            trace = TraceContext.from_header(headers.get("traceparent"))
            # The rollout's masking probe: its copy runs at once instead of in idle time (under
            # load there may be none for minutes). Only with the admin token: it takes the primary's time.
            probe = "x-shadow-probe" in headers
            if probe:
                check_admin(headers)
            # A copy made by Istio's mirror is served as a shadow (dataplane.py), where one is in front.
            ctx = RequestContext(
                rid,
                trace,
                headers,
                client[0] if client else "unknown",
                received_at,
                started,
                shadow_copy=settings.mesh_mirror and is_shadow_host(headers.get("host")),
                probe=probe,
                rule_headers=rule_headers(raw_headers, headers),
            )
            body = await read(headers)
            result = await dataplane.infer(model, version, body, ctx, headers.get(HEADER_LENGTH.lower()))
            status, payload, shadow = 200, result.payload, result.shadow
            out = [
                (b"content-type", b"application/json" if result.json_length is None else b"application/octet-stream"),
                (b"x-model-version", result.version.encode()),
                (b"traceparent", trace.header.encode()),
            ]
            if result.json_length is not None:
                out.append((HEADER_LENGTH.lower().encode(), str(result.json_length).encode()))
            if result.feedback_token is not None:
                out.append((b"x-feedback-token", result.feedback_token.encode()))
            # (aiohttp, so tritonclient.http.aio, and requests ask gzip by default.) A small
            # answer stays as it is: it would not shrink; a large one is compressed off the loop.
            coding = response_coding(headers.get("accept-encoding")) if len(payload) >= MIN_COMPRESSED else "identity"
            if coding != "identity":  # Inference-Header-Content-Length still counts the JSON part as it was
                if len(payload) < COMPRESSED_ON_LOOP:
                    payload = compress(payload, coding)
                else:
                    payload = await asyncio.to_thread(compress, payload, coding)
                out.append((b"content-encoding", coding.encode()))
        except ServerError as exc:
            status, payload, out = exc.status, json.dumps({"error": exc.message}).encode(), error_headers(exc)
            shadow = exc.shadow
        except asyncio.CancelledError:  # its client disconnected (or the server stops): nothing is written
            if result is not None:  # answered by the model: counted as an answer its client did not read
                result.settle(False)
            count_http(INFER_ROUTES[version is not None], Cancelled.status)
            raise
        except Exception:  # a bug, not the client's fault: answer, log, keep serving
            log.exception("unhandled error on %s %s", method, path)
            status, out = 500, JSON_HEADERS
            payload = json.dumps({"error": "internal server error; see the server log"}).encode()
        if rid is not None:
            out = [*out, (b"x-request-id", rid.encode())]

        def then() -> None:  # after the response is sent
            if result is not None:
                result.settle(True)
            count_http(INFER_ROUTES[version is not None], status)
            if shadow is not None:
                mirror.submit(shadow)

        return Answer(status, out, payload, then)

    async def infer(scope: Scope, receive: Receive, send: Send, model: str, version: str | None) -> None:
        """The ASGI way (InferFastPath): bodies the protocol does not buffer itself. Once the body
        is read, a client that disconnects cancels the request, as on the protocol's own way:
        it leaves the batcher's queue instead of holding its place and running for no one."""
        task = asyncio.current_task()
        assert task is not None
        watch: asyncio.Task[bool] | None = None

        async def read(headers: Mapping[str, str]) -> bytes:
            nonlocal watch
            body = await read_body(receive, headers, json_length=headers.get(HEADER_LENGTH.lower()))
            watch = asyncio.ensure_future(cancel_when_gone(receive, task))
            return body

        try:
            answer = await answer_infer(
                scope["method"], scope["path"], scope["headers"], scope.get("client"), model, version, read
            )
        except asyncio.CancelledError:
            if watch is None or not watch.done() or watch.cancelled() or not watch.result():
                raise  # (the server stops)
            task.uncancel()
            return  # nothing to write: the client is gone
        finally:
            if watch is not None and not watch.done():
                watch.cancel()
        out = [*answer.headers, (b"content-length", str(len(answer.body)).encode())]
        await send({"type": "http.response.start", "status": answer.status, "headers": out})
        await send({"type": "http.response.body", "body": answer.body})
        if answer.then is not None:
            answer.then()

    def direct_infer(
        match: re.Match[str],
        raw_headers: list[tuple[bytes, bytes]],
        client: tuple[str, int] | None,
        body: bytes | NoBody,
    ) -> Coroutine[Any, Any, Answer]:
        """The HTTP protocol's way (httpserver.DirectRoute): the body already buffered."""
        return answer_infer(
            "POST",
            match.string,
            raw_headers,
            client,
            match.group(1),
            match.group(2),
            lambda headers: buffered_body(body, headers),
        )

    @endpoint("/v2/models/{model}/feedback")
    async def post_feedback(request: Request) -> Response:
        """Delayed labels: one {"request_id", "label", "token"}, or a list (DataPlane.feedback).

        A copy Istio mirrored (Host ``...-shadow``) is answered 202 and ignored: the VirtualService
        mirrors a route's every request, labels too, and the original is taken where it went (the
        copy logged every label a second time, and counted it where the candidate served it)."""
        if settings.mesh_mirror and is_shadow_host(request.headers.get("host")):
            return JSONResponse({"ignored": "a mirrored copy: the original label is taken where it went"}, 202)
        model = request.path_params["model"]
        rules = dataplane.label_rules(model)  # before the body: an unknown model is a 404
        received_at = time.time()
        tenant = header_dict(request.headers.raw).get("x-tenant")  # as an inference reads it: UTF-8
        body = await json_body(request, allow_list=True)
        if isinstance(body, list) and len(body) > settings.feedback_max_items:
            raise PayloadTooLarge(
                f"feedback list of {len(body)} items is over the limit of {settings.feedback_max_items} "
                "per call; send it in parts"
            )
        if isinstance(body, list) and len(body) > FEEDBACK_ON_LOOP:  # (up to 64k labels: 10-30 ms of work)
            return JSONResponse(await asyncio.to_thread(dataplane.feedback, model, body, rules, tenant, received_at))
        return JSONResponse(dataplane.feedback(model, body, rules, tenant, received_at))

    # -- admin: traffic policy, fault injection ---------------------------------------------

    @endpoint("/v2/models/{model}/traffic", admin=True)
    async def traffic(request: Request) -> Response:
        model = request.path_params["model"]
        if request.method == "PUT":
            await admin_api.set_policy(model, await json_body(request))
        elif request.method == "DELETE":
            await admin_api.remove_policy(model)
            if not repo.loaded_versions(model):  # removed; no version loaded, so none in effect
                return Response(status_code=204)
        return JSONResponse(admin_api.policy(model).to_dict())

    @endpoint("/v2/models/{model}/versions/{version}/fault", admin=True)
    async def fault(request: Request) -> Response:
        """Inject a delay or failures into one version (as Istio's fault injection does)."""
        model, version = request.path_params["model"], request.path_params["version"]
        current = admin_api.fault(model, version)  # before the body: an unknown version is a 404
        if request.method == "PUT":
            current = admin_api.set_fault(model, version, await json_body(request))
        return JSONResponse(current.to_dict())

    # -- model repository extension ---------------------------------------------------------

    @endpoint("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        ready = (await json_body(request)).get("ready", False)
        if not isinstance(ready, bool):  # ("false" is no false)
            shown_ready = shown(repr(ready)[:40]) if isinstance(ready, str | int | float) else type(ready).__name__
            raise InvalidInput(f"'ready' must be true or false, got {shown_ready}")
        return JSONResponse(dataplane.index(ready_only=ready))

    @endpoint("/v2/repository/models/{model}/load", admin=True)
    async def load(request: Request) -> Response:
        name = request.path_params["model"]
        params = (await json_body(request)).get("parameters")
        params = {} if params is None else params  # [] or "" is not "no parameters"
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        files = sorted(k for k in params if k.startswith("file:"))
        if files:
            raise InvalidInput(f"file overrides {files} are not supported: put the model in the repository")
        unknown = sorted(k for k in params if k != "config")  # (Triton refuses them too)
        if unknown:
            raise InvalidInput(f"unknown load parameter(s) {shown(repr(unknown)[:200])}: a load takes 'config'")
        override = None
        if "config" in params:
            if not isinstance(params["config"], str):  # (Triton reads each parameter as a string)
                raise InvalidInput("parameters.config must be a string: the configuration's JSON text")
            try:
                override = json.loads(params["config"], parse_constant=refuse_constant)
            except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser
                raise InvalidInput(
                    f"parameters.config is not a JSON object: {json_problem(exc, params['config'])}"
                ) from None
            if not isinstance(override, dict):
                raise InvalidInput("parameters.config must be a JSON object")
        await admin_api.load(name, override)
        return Response(status_code=200)

    @endpoint("/v2/repository/models/{model}/unload", admin=True)
    async def unload(request: Request) -> Response:
        await json_body(request)
        await admin_api.unload(request.path_params["model"])
        return Response(status_code=200)

    # -- Triton's shared memory, trace and logging extensions: not implemented ---------------

    @endpoint("/v2/{memory}sharedmemory/status")
    async def shared_memory_status(request: Request) -> Response:
        """Triton's answer with no region registered: an empty list, and 404 for a region named
        (no region can be: registering one is not supported)."""
        region = request.path_params.get("region")
        if region is not None:
            # Routed on the path as sent (InferFastPath): decoded, the name is the one the client
            # registered (tritonclient quotes it); as long as the request line's limit allows.
            name = unquote(region)
            memory = "cuda" if request.url.path.startswith("/v2/cuda") else "system"
            raise ModelNotFound(f"Unable to find {memory} shared memory region: '{shown(name)}'")
        return JSONResponse([])

    @endpoint("/v2/{memory}sharedmemory/{action}")
    async def shared_memory_change(request: Request) -> Response:
        raise NotSupported(
            "shared memory is not supported by this server: send tensors in the request body "
            "(JSON, or binary with the binary tensor extension)"
        )

    @endpoint("/v2/trace/setting")
    async def trace_setting(request: Request) -> Response:
        raise NotSupported(
            "the server does not support tracing: it passes W3C traceparent through (the response's traceparent)"
        )

    @endpoint("/v2/logging")
    async def logging_setting(request: Request) -> Response:
        raise NotSupported("the server does not support dynamic logging: the log level is set at start (--log-level)")

    @endpoint("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/stats", model_stats, methods=["GET"]),  # before /v2/models/{model}, as in Triton
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version:version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/config", model_config, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version:version}/config", model_config, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version:version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version:version}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/traffic", traffic, methods=["GET", "PUT", "DELETE"]),
        Route("/v2/models/{model}/feedback", post_feedback, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version:version}/fault", fault, methods=["GET", "PUT"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", unload, methods=["POST"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
        *(
            route
            for memory in ("system", "cuda")
            for route in (
                Route(f"/v2/{memory}sharedmemory/status", shared_memory_status, methods=["GET"]),
                Route(f"/v2/{memory}sharedmemory/region/{{region}}/status", shared_memory_status, methods=["GET"]),
                Route(f"/v2/{memory}sharedmemory/region/{{region}}/register", shared_memory_change, methods=["POST"]),
                Route(f"/v2/{memory}sharedmemory/region/{{region}}/unregister", shared_memory_change, methods=["POST"]),
                Route(f"/v2/{memory}sharedmemory/unregister", shared_memory_change, methods=["POST"]),
            )
        ),
        Route("/v2/trace/setting", trace_setting, methods=["GET", "POST"]),
        Route("/v2/models/{model}/trace/setting", trace_setting, methods=["GET", "POST"]),
        Route("/v2/logging", logging_setting, methods=["GET", "POST"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error(404, f"no such endpoint: {request.method} {shown(request.url.path)}")
        if exc.status_code == 405:
            return error(405, f"method {request.method} not allowed on {shown(request.url.path)}")
        return error(exc.status_code, str(exc.detail))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await dataplane.start()
        watcher = None
        if settings.traffic_file is not None:
            watcher = asyncio.create_task(admin_api.watch_traffic_file(settings.traffic_file, settings.traffic_poll_s))
        yield
        if watcher is not None:
            watcher.cancel()
        await dataplane.stop()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    # A Content-Encoding or a masking probe may be refused from the headers alone (an unsupported
    # coding, no admin token): the ASGI way answers those before the body is read.
    asgi_headers = frozenset({b"content-encoding", b"x-shadow-probe"})
    direct = DirectRoute(INFER_PATH, direct_infer, settings.max_body_bytes, asgi_headers, budget)
    return InferFastPath(app, infer, direct)
