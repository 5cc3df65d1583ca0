"""HTTP layer: the KServe v2 / Triton HTTP protocol over the model repository.

Handlers only translate HTTP to repository and model calls and back; every error becomes
``{"error": ...}`` with the status of its exception class, so nothing escapes as a crash.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from model_server import __version__, metrics
from model_server.config import ascii_uint
from model_server.errors import (
    InvalidInput,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
    Unauthorized,
)
from model_server.feedback import FeedbackSigner, FeedbackStore
from model_server.model import Fault, Preempted, failure_reason, outcome_of
from model_server.predictionlog import Inference, Label, PredictionLog
from model_server.protocol import (
    HEADER_LENGTH,
    MAX_JSON_BYTES,
    InferRequest,
    decode_infer_request,
    encode_infer_response,
)
from model_server.repository import ModelRepository
from model_server.shadow import ShadowJob, ShadowMirror, ShadowResult, request_metadata
from model_server.trace import TraceContext, log_access, request_id
from model_server.traffic import PolicyError, PolicyStore, TrafficPolicy, default_policy, read_traffic_file

log = logging.getLogger(__name__)

DRAIN_FACTOR = 4
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration"]


@dataclass
class Settings:
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout_s: float = 30.0
    admin_token: str | None = None
    state_dir: Path | None = None  # traffic policies persist here (restored on restart)
    traffic_file: Path | None = None  # watched policy file: {"models": {name: policy}}
    traffic_poll_s: float = 1.0
    shadow_queue: int = 256  # mirrored requests waiting for the shadow; more are dropped
    shadow_queue_bytes: int = 256 * 1024 * 1024  # and the bytes of their inputs together
    shadow_workers: int = 2
    feedback_capacity: int = 200_000  # served predictions kept for delayed labels
    feedback_ttl_s: float = 3600.0
    max_json_bytes: int = MAX_JSON_BYTES  # an infer request's JSON part, any other JSON body
    feedback_max_items: int = 1000  # labels in one feedback call
    feedback_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))  # shared by replicas


Handler = Callable[[Request], Awaitable[Response]]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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


def shadow_record(result: ShadowResult) -> Inference:
    """The prediction log record of an in-process shadow copy."""
    job = result.job
    scores = None if result.outputs is None else result.outputs[job.outputs[0]]
    primary = job.primary_outputs[job.outputs[0]]
    items = primary.shape[0] if job.batched and primary.ndim > 1 else 1
    return Inference(
        job.received_at, job.model, job.shadow_version, "shadow", "mirror", job.request_id,
        job.trace.trace_id, job.trace.span_id, result.latency_ms, result.outcome, scores,
        job.inputs[0].data, job.batched, job.metadata, items,
    )  # fmt: skip


def create_app(
    repo: ModelRepository, settings: Settings, prediction_log: PredictionLog | None = None
) -> Starlette:
    state = {"ready": False}
    plog = prediction_log

    def endpoint(route: str, admin: bool = False) -> Callable[[Handler], Handler]:
        """Map exceptions to statuses once, check the admin token, count by route."""

        def wrap(fn: Handler) -> Handler:
            async def handler(request: Request) -> Response:
                try:
                    if admin:
                        check_admin(request)
                    response = await fn(request)
                except ServerError as exc:
                    response = error(exc.status, exc.message)
                except Exception:  # a bug, not the client's fault: answer, log, keep serving
                    log.exception("unhandled error on %s %s", request.method, request.url.path)
                    response = error(500, "internal server error; see the server log")
                rid = getattr(request.state, "request_id", None)
                if rid is not None and "x-request-id" not in response.headers:
                    response.headers["X-Request-ID"] = rid
                metrics.HTTP_REQUESTS.labels(route, str(response.status_code)).inc()
                return response

            return handler

        return wrap

    def check_admin(request: Request) -> None:
        if settings.admin_token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.encode(), settings.admin_token.encode()
        ):
            raise Unauthorized("admin call: send 'Authorization: Bearer <admin token>'")

    async def read_body(request: Request, limit: int | None = None) -> bytes:
        limit = limit or settings.max_body_bytes
        declared = request.headers.get("content-length")

        async def read() -> bytes:
            chunks, size = [], 0
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size <= limit:
                        chunks.append(chunk)
                    elif size > DRAIN_FACTOR * limit:
                        break  # not worth draining: answer now, the connection closes
            except ClientDisconnect:
                raise InvalidInput("client disconnected while sending the body") from None
            if size > limit:
                # The rest was drained, not kept, so the client reads this 413, not a reset.
                raise PayloadTooLarge(
                    f"request body of {declared or size} bytes is over the limit of {limit} bytes"
                )
            return b"".join(chunks)

        if declared is not None and ascii_uint(declared) is None:
            raise InvalidInput(f"invalid Content-Length {declared!r}")
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                return await read()
        except TimeoutError:
            raise RequestTimeout(
                f"request body not received within {settings.request_timeout_s:g} s"
            ) from None

    async def json_body(request: Request, allow_list: bool = False) -> Any:
        body = await read_body(request, settings.max_json_bytes)
        if not body.strip():
            return {}
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidInput(f"malformed JSON in request body: {exc}") from None
        if not isinstance(data, dict) and not (allow_list and isinstance(data, list)):
            raise InvalidInput("request body must be a JSON object" + (" or a list" if allow_list else ""))
        return data

    # -- health and metadata ----------------------------------------------------------------

    @endpoint("/v2/health/live")
    async def live(request: Request) -> Response:
        return Response(status_code=200)

    def routed_versions(model: str) -> set[str]:
        policy = policies.get(model)
        return policy.versions() if policy is not None else set()

    def disagreement(model: str) -> str | None:
        """Why the model's traffic policy cannot be served as it stands (a routed or mirrored
        version not loaded), or None."""
        wanted = routed_versions(model)
        loaded = {str(v) for v in repo.loaded_versions(model)}
        missing = sorted(wanted - loaded, key=int)
        if not missing:
            return None
        return f"model '{model}': the traffic policy routes to version(s) {missing}, not loaded"

    @endpoint("/v2/health/ready")
    async def ready(request: Request) -> Response:
        """Ready once started and while every traffic policy's versions are loaded (after a
        restart, a restored policy may name versions that have not loaded yet, or failed to)."""
        if not state["ready"]:
            return error(503, "starting or stopping")
        reasons = [r for m in policies.models() if (r := disagreement(m)) is not None]
        return error(503, "; ".join(reasons)) if reasons else Response(status_code=200)

    @endpoint("/v2")
    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "model-server", "version": __version__, "extensions": EXTENSIONS})

    def _versions(request: Request) -> tuple[Any, dict[int, Any]]:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        if version is not None:
            with repo.use(name, version) as lv:
                return lv.config, {lv.version: lv}
        return repo.loaded(name)

    @endpoint("/v2/models/{model}")
    async def model_metadata(request: Request) -> Response:
        cfg, versions = _versions(request)
        return JSONResponse(
            {
                "name": cfg.name,
                "versions": [str(v) for v in sorted(versions)],
                "platform": cfg.platform,
                "inputs": [s.as_metadata() for s in cfg.inputs],
                "outputs": [s.as_metadata() for s in cfg.outputs],
                "execution_providers": {str(v): lv.provider for v, lv in sorted(versions.items())},
                "parameters": {"versions": {str(v): lv.metadata() for v, lv in sorted(versions.items())}},
            }
        )

    @endpoint("/v2/models/{model}/config")
    async def model_config(request: Request) -> Response:
        cfg, _ = _versions(request)
        return JSONResponse({**cfg.raw, "name": cfg.name, "version_policy": cfg.version_policy})

    @endpoint("/v2/models/{model}/ready")
    async def model_ready(request: Request) -> Response:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        if repo.is_ready(name, version):
            reason = None if version is not None else disagreement(name)
            return Response(status_code=200) if reason is None else error(503, reason)
        repo.model_dir(name)  # 404 for a model the repository does not have
        return error(503, f"model '{name}'" + (f" version {version}" if version else "") + " is not ready")

    # -- inference --------------------------------------------------------------------------

    def log_inference(
        model: str,
        role: str,
        route: str,
        version: str,
        rid: str,
        trace: TraceContext,
        received_at: float,
        latency_ms: float | None,
        outcome: str,
        scores: Any,
        req: InferRequest | None,
        batched: bool,
        headers: Any,
        size: int,
    ) -> None:
        """Hand one inference to the prediction log: references only, no work on this path."""
        assert plog is not None
        data = req.inputs[0].data if req is not None and req.inputs else None
        if scores is not None:
            items = scores.shape[0] if batched and scores.ndim > 1 else 1
        else:
            items = data.shape[0] if data is not None and batched and data.ndim else 1
        record = Inference(received_at, model, version, role, route, rid, trace.trace_id, trace.span_id,
                           latency_ms, outcome, scores, data, batched, request_metadata(headers), items,
                           size)  # fmt: skip
        plog.append(record)

    @endpoint("/v2/models/{model}/infer")
    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        received_at = time.time()
        headers = request.headers
        rid = request.state.request_id = request_id(headers.get("x-request-id"))
        trace = TraceContext.from_header(headers.get("traceparent"))
        model = request.path_params["model"]
        # A copy made by Istio's mirror: served as a shadow (yields to primaries, counted and
        # logged as shadow), never routed, mirrored or remembered for feedback.
        shadow_copy = is_shadow_host(headers.get("host"))
        # The rollout's masking probe: its copy runs at once instead of in idle time (under load
        # there may be none for minutes). Only with the admin token: it takes the primary's time.
        probe = "x-shadow-probe" in headers
        if probe:
            check_admin(request)
        version = request.path_params.get("version") or headers.get("x-model-version")
        decided = "version" if version else "route"
        policy = policies.get(model)
        if shadow_copy:
            decided = "mirror"
            if version is None and policy is not None and policy.mirror is not None:
                version = policy.mirror.version
        elif version is None and policy is not None:
            version, decided = policy.choose(headers, headers.get("x-user-id") or client_address(request))
        body = await read_body(request)
        role = "shadow" if shadow_copy else "primary"
        with repo.use(model, version, routed_by=None if decided == "version" else decided) as lv:
            vm = lv.shadow_metrics if shadow_copy else lv.metrics
            batched = bool(lv.config.max_batch_size)
            # Sampling spares pairs and evidence: shadow copies, every request of a version the
            # policy mirrors and requests that named their version (replays) are always logged.
            logged = plog is not None and (
                decided in ("mirror", "version")
                or (policy is not None and policy.mirror is not None and policy.mirror.version != lv.label)
                or plog.sampled(rid)
            )
            req = None
            try:
                req = decode_infer_request(body, request.headers.get(HEADER_LENGTH), settings.max_json_bytes)
                outputs = lv.validate(req.inputs, req.outputs)
                if shadow_copy:
                    results, batch, timing = await mirror.yielding_run(lv, req.inputs, outputs, rid)
                else:
                    with mirror.gate:
                        results, batch, timing = await lv.infer(req.inputs, outputs)
                encode_start = time.perf_counter()
                specs = {s.name: s for s in lv.config.outputs}
                # The credential for this prediction's label (a shadow copy's answer has no client).
                token = None if shadow_copy else feedback.signer.token(model, rid)
                payload, header_len = encode_infer_response(
                    lv.name,
                    lv.label,
                    [
                        (
                            n,
                            specs[n].datatype,
                            arr,
                            req.outputs[n] if req.outputs else req.binary_output_default,
                        )
                        for n, arr in zip(outputs, results, strict=True)
                    ],
                    req.id,
                    None if token is None else {"feedback_token": token},
                )
            except ServerError as exc:
                latency_ms = (time.perf_counter() - started) * 1000
                dropped = shadow_copy and isinstance(exc, Preempted)
                if shadow_copy:
                    # A copy the candidate refuses as a client error (Istio mirrors every request,
                    # garbage included) is counted apart: a client must not move the shadow guard.
                    outcome = "dropped" if dropped else "rejected" if exc.status < 500 else "error"
                    metrics.SHADOW_REQUESTS.labels(model, lv.label, outcome).inc()
                if not dropped:
                    vm.failure(failure_reason(exc))
                log_access(role, model, lv.label, rid, trace, exc.status, latency_ms, error=exc.message)
                if logged:
                    log_inference(model, role, decided, lv.label, rid, trace, received_at,
                                  None if dropped else latency_ms, "DROPPED" if dropped else outcome_of(exc),
                                  None, req, batched, headers, len(body))  # fmt: skip
                raise
            done = time.perf_counter()
            log_access(
                role, model, lv.label, rid, trace, 200, (done - started) * 1000, req.inputs[0].data, batched
            )
            scores = results[0]
            if shadow_copy:
                vm.succeeded(batch, done - started, timing, 0.0)
                metrics.SHADOW_REQUESTS.labels(model, lv.label, "ok").inc()
            else:
                vm.succeeded(batch, done - started, timing, done - encode_start)
                metrics.ROUTED.labels(model, lv.label, decided).inc()
                if scores.ndim == 2 and batched:  # a classifier: [batch, classes]
                    feedback.record(
                        rid, model, lv.label, scores.argmax(axis=1).tolist(), headers.get("x-tenant")
                    )
            if logged:
                log_inference(model, role, decided, lv.label, rid, trace, received_at, (done - started) * 1000,
                              "ok", scores, req, batched, headers, len(body))  # fmt: skip
        background = None
        # Requests that named their version (replays, tests) are targeted, not traffic: no mirror.
        shadow_version = None
        if policy is not None and decided not in ("version", "mirror"):
            shadow_version = policy.mirror_for(lv.label, rid)
        if shadow_version is not None:
            job = ShadowJob(
                model=model,
                primary_version=lv.label,
                shadow_version=shadow_version,
                inputs=req.inputs,
                outputs=outputs,
                request_id=rid,
                trace=trace.child(),
                received_at=received_at,
                primary_outputs=dict(zip(outputs, results, strict=True)),
                primary_latency_ms=(done - started) * 1000,
                metadata=request_metadata(headers),
                batched=batched,
                probe=probe,
            )
            background = BackgroundTask(mirror.submit, job)  # runs after the response is sent
        out_headers = {"X-Model-Version": lv.label, "X-Request-ID": rid, "traceparent": trace.header}
        if token is not None:
            out_headers["X-Feedback-Token"] = token
        if header_len is None:
            return Response(
                payload, media_type="application/json", headers=out_headers, background=background
            )
        out_headers[HEADER_LENGTH] = str(header_len)
        return Response(
            payload, media_type="application/octet-stream", headers=out_headers, background=background
        )

    # -- traffic policy -------------------------------------------------------------------------

    def set_policy_gauges(model: str, policy: TrafficPolicy | None) -> None:
        for gauge in (metrics.TRAFFIC_WEIGHT, metrics.MIRROR_PERCENT):
            for labels in [k for k in gauge._metrics if k[0] == model]:
                gauge.remove(*labels)
        if policy is None:
            return
        for d in policy.route:
            metrics.TRAFFIC_WEIGHT.labels(model, d.version).set(d.weight)
        if policy.mirror is not None:
            metrics.MIRROR_PERCENT.labels(model, policy.mirror.version).set(policy.mirror.percent)

    policies = PolicyStore(settings.state_dir, on_change=set_policy_gauges)
    feedback = FeedbackStore(
        FeedbackSigner(settings.feedback_key), settings.feedback_capacity, settings.feedback_ttl_s
    )

    def log_shadow(result: ShadowResult) -> None:
        assert plog is not None
        plog.append(shadow_record(result))

    mirror = ShadowMirror(
        repo,
        settings.shadow_queue,
        settings.shadow_workers,
        sink=None if plog is None else log_shadow,
        queue_bytes=settings.shadow_queue_bytes,
    )

    def validate_policy(model: str, raw: object) -> TrafficPolicy:
        try:
            policy = TrafficPolicy.from_dict(raw)
            _, loaded = repo.loaded(model)
            policy.check_loaded(loaded)
        except PolicyError as exc:
            raise InvalidInput(f"invalid traffic policy for model '{model}': {exc}") from None
        return policy

    @endpoint("/v2/models/{model}/traffic", admin=True)
    async def traffic(request: Request) -> Response:
        model = request.path_params["model"]
        if request.method == "PUT":
            policy = validate_policy(model, await json_body(request))
            await asyncio.to_thread(policies.apply, model, policy)
            log.info("traffic policy for %r: %s", model, json.dumps(policy.to_dict()))
        elif request.method == "DELETE":  # back to the default: the highest loaded version
            repo.model_dir(model)
            await asyncio.to_thread(policies.remove, model)
            log.info("traffic policy for %r removed", model)
        current = policies.get(model)
        if current is None:
            _, loaded = repo.loaded(model)
            current = default_policy(loaded)
        return JSONResponse(current.to_dict())

    @endpoint("/v2/models/{model}/feedback")
    async def post_feedback(request: Request) -> Response:
        """Delayed labels: one {"request_id", "label"}, or a list (answered item by item).

        With a prediction log every valid label is appended to it, also for a request this
        replica did not serve (another may have): 200 with ``matched_locally: false``.
        """
        model = request.path_params["model"]
        cfg = repo.model_config(model)
        labels = cfg.metadata.get("labels")
        received_at = time.time()
        tenant = request.headers.get("x-tenant")
        body = await json_body(request, allow_list=True)

        def one(item: Any) -> dict[str, Any]:
            fb = feedback.label(model, item, labels, accept_unmatched=plog is not None, tenant=tenant)
            logged = plog is not None and plog.append(
                Label(received_at, model, fb.version, fb.request_id, fb.truth, fb.tenant)
            )
            return fb.answer(logged)

        if isinstance(body, list):
            if len(body) > settings.feedback_max_items:
                raise PayloadTooLarge(
                    f"feedback list of {len(body)} items is over the limit of {settings.feedback_max_items} "
                    "per call; send it in parts"
                )
            results = []
            for item in body:
                try:
                    results.append({"status": 200, **one(item)})
                except ServerError as exc:
                    results.append({"status": exc.status, "error": exc.message})
            return JSONResponse({"results": results})
        return JSONResponse(one(body))

    @endpoint("/v2/models/{model}/versions/{version}/fault", admin=True)
    async def fault(request: Request) -> Response:
        """Inject a delay or failures into one version (as Istio's fault injection does)."""
        with repo.use(request.path_params["model"], request.path_params["version"]) as lv:
            if request.method == "PUT":
                lv.fault = Fault.from_dict(await json_body(request))
                log.warning(
                    "fault injection on %r version %s: %s",
                    lv.name,
                    lv.label,
                    lv.fault.to_dict() if lv.fault else "cleared",
                )
            return JSONResponse(lv.fault.to_dict() if lv.fault else Fault().to_dict())

    async def watch_traffic_file(path: Path) -> None:
        """Apply the file's policies when it changes; a bad file changes nothing."""
        seen: tuple[int, int] | None = None
        while True:
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if stamp is not None and stamp != seen:
                seen = stamp
                try:
                    wanted = read_traffic_file(path)
                    checked = {m: validate_policy(m, p.to_dict()) for m, p in wanted.items()}
                    for model, policy in checked.items():
                        if policies.get(model) != policy:
                            await asyncio.to_thread(policies.apply, model, policy)
                            log.info("traffic policy for %r from %s", model, path)
                except (PolicyError, ServerError) as exc:
                    metrics.TRAFFIC_FILE_ERRORS.inc()
                    log.error("traffic file not applied: %s", getattr(exc, "message", exc))
                except Exception:  # the watcher outlives any file: "²" as a version once ended it
                    metrics.TRAFFIC_FILE_ERRORS.inc()
                    log.exception("traffic file not applied")
            await asyncio.sleep(settings.traffic_poll_s)

    # -- model repository extension ---------------------------------------------------------

    @endpoint("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        body = await json_body(request)
        return JSONResponse(repo.index(ready_only=bool(body.get("ready", False))))

    @endpoint("/v2/repository/models/{model}/load", admin=True)
    async def load(request: Request) -> Response:
        name = request.path_params["model"]
        params = (await json_body(request)).get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        files = sorted(k for k in params if k.startswith("file:"))
        if files:
            raise InvalidInput(f"file overrides {files} are not supported: put the model in the repository")
        override = None
        if "config" in params:
            try:
                override = json.loads(params["config"])
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"parameters.config is not a JSON object: {exc}") from None
            if not isinstance(override, dict):
                raise InvalidInput("parameters.config must be a JSON object")
        await asyncio.to_thread(repo.load, name, override, routed_versions(name))
        return Response(status_code=200)

    @endpoint("/v2/repository/models/{model}/unload", admin=True)
    async def unload(request: Request) -> Response:
        await json_body(request)
        name = request.path_params["model"]
        await asyncio.to_thread(repo.unload, name, routed_versions(name))
        return Response(status_code=200)

    @endpoint("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/config", model_config, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/config", model_config, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/traffic", traffic, methods=["GET", "PUT", "DELETE"]),
        Route("/v2/models/{model}/feedback", post_feedback, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/fault", fault, methods=["GET", "PUT"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", unload, methods=["POST"]),
        Route("/metrics", prometheus_metrics, methods=["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error(404, f"no such endpoint: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error(405, f"method {request.method} not allowed on {request.url.path}")
        return error(exc.status_code, str(exc.detail))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        restored = await asyncio.to_thread(policies.restore)
        if restored:
            log.info("restored traffic policies for %s", restored)
        watcher = None
        if settings.traffic_file is not None:
            watcher = asyncio.create_task(watch_traffic_file(settings.traffic_file))
        if plog is not None:
            plog.start()
        mirror.start()
        state["ready"] = True
        yield
        state["ready"] = False
        if watcher is not None:
            watcher.cancel()
        await mirror.stop()
        if plog is not None:
            await asyncio.to_thread(plog.close)  # the last records, shadow copies included
        repo.close_all()

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
