"""The data plane: what the server does with a request, without HTTP (KServe's ``DataPlane``).

The HTTP routes (app.py) parse a request and send the answer; everything between is here:
readiness, metadata, which version serves (the traffic policy), inference through the
repository, the copy for the shadow, the prediction log record, feedback labels. Methods take
plain values and protocol objects and raise the exceptions of errors.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from model_server import __version__, metrics
from model_server.config import MAX_JSON_BYTES, ModelConfig, instance_kind, version_number
from model_server.errors import (
    Cancelled,
    EveryInterval,
    InferenceFailed,
    InjectedFault,
    InvalidInput,
    ModelNotFound,
    ModelUnavailable,
    OutOfMemory,
    Preempted,
    ServerError,
    failure_reason,
    outcome_of,
    shown,
)
from model_server.feedback import FeedbackStore, LabelRules, check_tenant, count_label
from model_server.files import location
from model_server.predictionlog import Inference, Label, PredictionLog, predicted_classes
from model_server.protocol import (
    InferRequest,
    decode_infer_request,
    decode_raw_request,
    encode_infer_response,
    is_raw_request,
    top_classes,
)
from model_server.repository import ModelRepository
from model_server.shadow import ShadowJob, ShadowMirror, ShadowResult, request_metadata
from model_server.shadow import dropped as shadow_dropped
from model_server.trace import TraceContext, log_access
from model_server.traffic import PolicyStore, TrafficPolicy

log = logging.getLogger(__name__)

# A version's failed runs (a model bug, a device error or exhausted memory) are logged, ORT's
# own lines being off: one line a version at most this often, then how many more there were.
FAILURE_LOG_EVERY_S = 10.0

# schedule_policy: a request's parameters.priority and parameters.timeout, read by the dynamic batcher.
EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_configuration",
    "schedule_policy",
    "statistics",
]


@dataclass(frozen=True)
class RequestContext:
    """One inference request as the transport received it: its ids, its headers, its clock."""

    request_id: str
    trace: TraceContext = field(default_factory=lambda: TraceContext.from_header(None))
    headers: Mapping[str, str] = field(default_factory=dict)  # names in lower case (HTTP's match any case)
    client: str = "unknown"  # the client's address: the sticky key of a request without X-User-ID
    received_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)  # its latency counts from here
    shadow_copy: bool = False  # a copy made by Istio's mirror
    probe: bool = False  # the rollout's masking probe (the transport checked the admin token)
    # What header rules match when a header came more than once: its values joined by ',', as
    # Envoy matches them (None: ``headers``).
    rule_headers: Mapping[str, str] | None = None


class Route(NamedTuple):
    """Which version serves a request, what decided it, and the policy it was decided under."""

    version: str | None  # None: the highest loaded version
    decided_by: str  # version (the client named it), route, a rule (its name or rules[i]), mirror
    policy: TrafficPolicy | None


@dataclass(frozen=True)
class InferResult:
    """An encoded inference response, with what the transport sends beside it."""

    payload: bytes
    json_length: int | None  # the JSON part's length when binary outputs follow it, else None
    version: str  # the version that served
    feedback_token: str | None  # the credential for this prediction's label (none for a shadow copy)
    shadow: ShadowJob | None  # the copy for the shadow version: submit it once the response is sent
    # Metrics, access log, feedback record, prediction log: call it then too, saying whether the
    # copy was submitted (a request its client gave up has none, as Envoy resets a mirror's stream).
    settle: Callable[[bool], None]


def shadow_record(result: ShadowResult) -> Inference:
    """The prediction log record of an in-process shadow copy."""
    job = result.job
    scores = None if result.outputs is None else result.outputs[job.outputs[0]]
    data = job.inputs[0].data if job.inputs else None
    return Inference(
        job.received_at,
        job.model,
        job.shadow_version,
        "shadow",
        "mirror",
        job.request_id,
        job.trace.trace_id,
        job.trace.span_id,
        result.latency_ms,
        result.outcome,
        scores,
        data,
        job.batched,
        job.metadata,
        record_items(None, data, job.batched) if job.primary_rows is None else job.primary_rows,
        job.nbytes,  # what it holds until written: within the log's byte budget, as a primary's body
    )


def record_items(scores: np.ndarray | None, data: np.ndarray | None, batched: bool) -> int:
    """The items a prediction log record stands for: its output's rows (a batched model's), else,
    with no output, its input's."""
    if scores is not None:
        return scores.shape[0] if batched and scores.ndim > 1 else 1
    return data.shape[0] if data is not None and batched and data.ndim else 1


class DataPlane:
    """Serves inference on a model repository under its traffic policies: routes each request,
    runs it, mirrors copies to the shadow, logs predictions and takes their labels.

    ``start`` and ``stop`` bracket serving; the server is ready only in between.
    """

    def __init__(
        self,
        repo: ModelRepository,
        policies: PolicyStore,
        feedback: FeedbackStore,
        mirror: ShadowMirror,
        prediction_log: PredictionLog | None = None,
        max_json_bytes: int = MAX_JSON_BYTES,
    ):
        self.repo = repo
        self.policies = policies
        self.feedback_store = feedback
        self.mirror = mirror
        self.prediction_log = prediction_log
        self.max_json_bytes = max_json_bytes  # an infer request's JSON part
        self.running = False
        self._label_rules: dict[str, tuple[ModelConfig, LabelRules]] = {}  # model -> of its config
        self.failures: dict[tuple[str, str], EveryInterval] = {}  # (model, version) -> its failure lines
        repo.on_version_gone.append(self._forget_failures)  # (a version unloaded: its entry goes)
        if prediction_log is not None:
            # A label the log lost at its flush (never counted) may be sent again; one written is
            # counted in the live view, by the writer's thread (the counters are thread-safe).
            prediction_log.on_label_dropped = lambda label: feedback.forget(label.model, label.request_id, label.tenant)
            prediction_log.on_label_written = lambda label: count_label(
                label.model, label.version, len(label.labels), label.correct, label.why
            )
            prediction_log.tag = feedback.signer.tag  # (whose request a record is, as its label's token says)

    def _forget_failures(self, model: str, label: str) -> None:
        self.failures.pop((model, label), None)

    def _log_failure(self, model: str, label: str, exc: ServerError) -> None:
        """A version's failed run in the server log (through masking), rate-limited per version."""
        lines = self.failures.get((model, label))
        if lines is None:
            lines = self.failures[(model, label)] = EveryInterval(FAILURE_LOG_EVERY_S)
        since = lines.due()
        if since is not None:
            log.error("%s%s", exc.message, f" (and {since} more since the last line)" if since else "")

    async def start(self) -> None:
        """Restore the persisted traffic policies, start the prediction log and the mirror: ready."""
        restored = await asyncio.to_thread(self.policies.restore)
        if restored:
            log.info("restored traffic policies for %s", restored)
        if self.prediction_log is not None:
            self.prediction_log.start()
        self.mirror.start()
        self.running = True

    async def stop(self) -> None:
        """Not ready; finish the queued shadow copies and the log's last records; release the models,
        and the repository's hold on this DataPlane (a process may build another on it)."""
        self.running = False
        await self.mirror.stop()
        if self.prediction_log is not None:
            await asyncio.to_thread(self.prediction_log.close)  # the last records, shadow copies included
        self.repo.close_all()
        if self._forget_failures in self.repo.on_version_gone:
            self.repo.on_version_gone.remove(self._forget_failures)

    # -- health and metadata ----------------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        """Why the server is not ready, or None. Ready once started and while every traffic
        policy's versions are loaded (after a restart, a restored policy may name versions that
        have not loaded yet, or failed to)."""
        if not self.running:
            return "starting or stopping"
        reasons = [
            f"model '{m}' version {v} (--serve) is not loaded"
            for m, v in self.repo.pinned.items()
            if not self.repo.is_ready(m, str(v))
        ]
        reasons += [r for m in self.policies.models() if (r := self._unserved(m)) is not None]
        reasons += [f"model '{m}': {why}" for m, why in sorted(self.policies.unreadable.items())]
        return "; ".join(reasons) if reasons else None

    def model_not_ready_reason(self, model: str, version: str | None = None) -> str | None:
        """Why the model cannot be served as its traffic policy stands (a 503), or None; else,
        where no version (or not the one asked) is loaded, Triton's error
        (``ModelRepository.serving``)."""
        try:
            self.repo.serving(model, version)
        except ModelNotFound:
            reason = None if version is not None else self._unserved(model)
            if reason is None:
                raise
            self.repo.model_dir(model)  # a model the repository does not have: its 404
            return reason
        return None if version is not None else self._unserved(model)

    def _unserved(self, model: str) -> str | None:
        """Why the model's traffic policy cannot be served as it stands (a routed or mirrored
        version not loaded), or None."""
        wanted = self.policies.versions(model)
        loaded = {str(v) for v in self.repo.loaded_versions(model)}
        missing = sorted(wanted - loaded, key=int)
        if not missing:
            return None
        return f"model '{model}': the traffic policy routes to version(s) {missing}, not loaded"

    def server_metadata(self, show_log: bool = True) -> dict[str, Any]:
        """KServe v2's server metadata, and in ``parameters`` where this server writes its
        prediction log (``files.location``: no credentials, options or endpoint; null without
        one), so a reader can tell at once whether the log it reads is this one; without
        ``show_log``, not a word of it (null would say there is none)."""
        plog = self.prediction_log
        shown = {"prediction_log": None if plog is None else location(plog.uri)} if show_log else {}
        return {"name": "model-server", "version": __version__, "extensions": EXTENSIONS, "parameters": shown}

    def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        cfg, versions = self.repo.serving(model, version)
        return {
            "name": cfg.name,
            "versions": [str(v) for v in sorted(versions)],
            "platform": cfg.platform,
            "inputs": [s.as_metadata() for s in cfg.inputs],
            "outputs": [s.as_metadata() for s in cfg.outputs],
            "execution_providers": {str(v): lv.provider for v, lv in sorted(versions.items())},
            "parameters": {"versions": {str(v): lv.metadata() for v, lv in sorted(versions.items())}},
        }

    def model_config(self, model: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration JSON (``ModelConfig.as_triton``), the instance kind the
        version(s) run on."""
        cfg, versions = self.repo.serving(model, version)
        providers = {lv.provider for lv in versions.values()} - {"CPUExecutionProvider"}
        return cfg.as_triton(*instance_kind(min(providers, default="CPUExecutionProvider")))

    def statistics(self, model: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics extension: every loaded version of every model (no ``model``),
        of one model, or one version. As Triton, a model or version that is not loaded is a 400
        ("requested model 'm' is not available", "requested model version is not available for
        model 'm'"), a model the repository does not have too (Triton's ``ModelReadyVersions`` finds
        no version of it: tritonserver.cc's TRITONSERVER_ServerModelStatistics)."""
        if not model:
            loaded = self.repo.all_loaded()
        else:
            number = version_number(version) if version is not None else None
            versions = self.repo.all_loaded().get(model)
            if not versions:
                raise InvalidInput(f"requested model '{shown(model)}' is not available")
            if number is not None:
                lv = versions.get(number)
                if lv is None:
                    raise InvalidInput(f"requested model version is not available for model '{shown(model)}'")
                versions = {lv.version: lv}
            loaded = {model: versions}
        return {
            "model_stats": [
                versions[v].metrics.statistics() for _, versions in sorted(loaded.items()) for v in sorted(versions)
            ]
        }

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Triton's repository index: one entry per loaded version, one per idle model."""
        return self.repo.index(ready_only=ready_only)

    # -- inference --------------------------------------------------------------------------

    def route(self, model: str, version: str | None, ctx: RequestContext) -> Route:
        """The version a client named (``version``, else X-Model-Version), else the traffic
        policy's choice: its header rules (a header sent more than once matched as its values
        joined by ',', as Envoy does), then its weighted route by the sticky hash of X-User-ID
        (else of the client's address). A shadow copy goes to the policy's mirror."""
        headers = ctx.headers
        version = version or headers.get("x-model-version")
        decided = "version" if version else "route"
        policy = self.policies.get(model)
        if ctx.shadow_copy:
            decided = "mirror"
            if version is None and policy is not None and policy.mirror is not None:
                version = policy.mirror.version
        elif version is None and policy is not None:
            version, decided = policy.choose(ctx.rule_headers or headers, headers.get("x-user-id") or ctx.client)
        elif version is None and model in self.policies.unreadable:  # not the highest version: nobody chose it
            raise ModelUnavailable(
                f"model '{model}': {self.policies.unreadable[model]}; PUT a policy to /v2/models/{model}/traffic"
            )
        return Route(version, decided, policy)

    async def infer(
        self,
        model: str,
        version: str | None,
        body: bytes,
        ctx: RequestContext,
        json_length: str | None = None,
    ) -> InferResult:
        """Route, decode, run and encode one request (``body``: the KServe v2 JSON, or with
        ``json_length`` its JSON part and binary tensors).

        Every outcome is counted on the version that was chosen and, when sampled (always for
        shadow copies, replays and every request while a mirror runs), logged. A primary of a
        classifier is remembered for its label, and a routed one may carry a copy for the
        shadow: its result's, or its error's (``ServerError.shadow``) when it failed. A shadow copy yields to primaries and is counted and logged as shadow, never
        routed, mirrored or remembered for feedback.
        """
        route = self.route(model, version, ctx)
        decided, policy = route.decided_by, route.policy
        rid, trace, started, shadow_copy = ctx.request_id, ctx.trace, ctx.started, ctx.shadow_copy
        plog = self.prediction_log
        role = "shadow" if shadow_copy else "primary"
        # A version the client named (a shadow copy's too) not loaded is its 404, not the policy's 503.
        named = version is not None or "x-model-version" in ctx.headers
        with self.repo.use(model, route.version, routed_by=None if named else decided) as lv:
            vm = lv.shadow_metrics if shadow_copy else lv.metrics
            batched = bool(lv.config.max_batch_size)
            # Sampling spares pairs and evidence: shadow copies, every request of a version the
            # policy mirrors and requests that named their version (replays) are always logged.
            logged = plog is not None and (
                decided in ("mirror", "version")
                or (policy is not None and policy.mirror is not None and policy.mirror.version != lv.label)
                or plog.sampled(rid)
            )
            req: InferRequest | None = None
            outputs: list[str] | None = None  # once the request passed the model's checks
            try:
                if is_raw_request(json_length):  # Triton's raw binary request: the model's one input
                    req = decode_raw_request(body, lv.config.inputs, batched)
                else:
                    req = decode_infer_request(body, json_length, self.max_json_bytes)
                outputs = lv.validate(req.inputs, req.outputs)
                if shadow_copy:
                    results, batch, timing = await self.mirror.run_copy(lv, req.inputs, outputs, rid, started)
                else:
                    with self.mirror.gate:
                        results, batch, timing = await lv.infer(req.inputs, outputs, parameters=req.parameters)
                encode_start = time.perf_counter()
                specs = {s.name: s for s in lv.config.outputs}
                # The credential for this prediction's label (a shadow copy's answer has no client).
                token = (
                    None if shadow_copy else self.feedback_store.signer.token(model, rid, ctx.headers.get("x-tenant"))
                )
                answered = []
                for n, arr in zip(outputs, results, strict=True):
                    binary = req.outputs[n] if req.outputs else req.binary_output_default
                    if n in req.classification:  # Triton's classification extension
                        count, labels = req.classification[n], lv.config.labels.get(n, ())
                        top = top_classes(arr, specs[n].datatype, count, batched, labels)
                        answered.append((n, "BYTES", top, binary))
                    else:
                        answered.append((n, specs[n].datatype, arr, binary))
                payload, json_len = encode_infer_response(
                    lv.name, lv.label, answered, req.id, None if token is None else {"feedback_token": token}
                )
            except (ServerError, asyncio.CancelledError) as caught:
                # Cancelled: its client disconnected (the transport gives its request up) or the
                # server stops; counted and logged as given up, and the cancellation goes on.
                exc = caught if isinstance(caught, ServerError) else Cancelled("cancelled before its answer")
                latency_ms = (time.perf_counter() - started) * 1000
                # A copy given up before its answer (Envoy's mirror stream ended, the server
                # stopping) is dropped, as one never run: not the shadow's error in the audit.
                dropped = shadow_copy and isinstance(exc, Preempted | Cancelled)
                if shadow_copy:
                    # A copy the candidate refuses as a client error (Istio mirrors every request,
                    # garbage included) is counted apart: a client must not move the shadow guard.
                    if dropped:
                        shadow_dropped(model, lv.label, exc.reason if isinstance(exc, Preempted) else "given_up")
                    else:
                        outcome = "rejected" if exc.status < 500 else "error"
                        metrics.SHADOW_REQUESTS.labels(model, lv.label, outcome).inc()
                if not dropped:
                    vm.failure(failure_reason(exc), latency_ms / 1000)
                log_access(role, model, lv.label, rid, trace, exc.status, latency_ms, error=exc.message)
                if isinstance(exc, InferenceFailed | OutOfMemory) and not isinstance(exc, InjectedFault):
                    self._log_failure(model, lv.label, exc)
                # A request given up by its client has no copy (Envoy resets a mirror's stream with
                # its request's). An error may be shared by the requests of one batch: each sets its
                # copy here and the transport reads it before any other task runs.
                copy = None
                if isinstance(caught, ServerError):
                    copy = self._copy(model, route, lv.label, ctx, req, outputs, {}, latency_ms, batched, caught)
                    caught.shadow = copy
                if logged:
                    self._log(
                        ctx,
                        model,
                        role,
                        decided,
                        lv.label,
                        None if dropped else latency_ms,
                        "DROPPED" if dropped else outcome_of(exc),
                        None,
                        req,
                        batched,
                        len(body),
                        self._mirrored(route, lv.label, ctx, copy),
                    )
                raise
            done = time.perf_counter()
            served, decoded, ms = lv.label, req, (done - started) * 1000

            def settle(copied: bool) -> None:
                """The success's bookkeeping, once the answer is written (before the next event:
                a scrape or a label for this prediction comes after it); ``copied``: its copy
                for the shadow, if it has one, was submitted."""
                log_access(role, model, served, rid, trace, 200, ms, decoded.inputs[0].data, batched)
                scores = results[0]
                if shadow_copy:
                    vm.succeeded(batch, done - started, timing, 0.0)
                    metrics.SHADOW_REQUESTS.labels(model, served, "ok").inc()
                else:
                    vm.succeeded(batch, done - started, timing, done - encode_start)
                    vm.routed(decided)
                    if scores.ndim and scores.size and scores.dtype.kind in "fiu":  # its rows, as the log's
                        self.feedback_store.record(
                            rid, model, served, predicted_classes(scores).tolist(), ctx.headers.get("x-tenant")
                        )
                if logged:
                    mirrored = self._mirrored(route, served, ctx, shadow if copied else None)
                    self._log(
                        ctx, model, role, decided, served, ms, "ok", scores, decoded, batched, len(body), mirrored
                    )

        primary_outputs = dict(zip(outputs, results, strict=True))
        shadow = self._copy(model, route, lv.label, ctx, req, outputs, primary_outputs, ms, batched)
        return InferResult(payload, json_len, lv.label, token, shadow, settle)

    @staticmethod
    def _mirrored(route: Route, served: str, ctx: RequestContext, copy: ShadowJob | None) -> bool | None:
        """What a request's record says of the mirror (``Inference.mirrored``): whether this
        server copied it (``copy``) where it knows, None where it cannot: a shadow copy's, and a
        routed request's without a policy of this server's (a router in front of it, Istio's,
        decided it and may mirror it). A request that named its version is never mirrored."""
        if ctx.shadow_copy:
            return None
        if route.decided_by == "version":
            return False
        return None if route.policy is None else copy is not None

    def _copy(
        self,
        model: str,
        route: Route,
        served: str,
        ctx: RequestContext,
        req: InferRequest | None,
        outputs: list[str] | None,
        primary_outputs: dict[str, np.ndarray],
        latency_ms: float,
        batched: bool,
        failure: ServerError | None = None,
    ) -> ShadowJob | None:
        """The copy of a routed request for the policy's mirror, when it samples it, whatever the
        primary's outcome (``failure``): Envoy copies every request of a mirrored route before
        that is known. A request the primary refused before running it (``outputs`` None: its
        decoding or checks) is refused by the shadow alike. Requests that named their version
        (replays, tests) are targeted, not traffic, and Istio's copies are not copied again."""
        policy = route.policy
        if policy is None or route.decided_by in ("version", "mirror"):
            return None
        shadow_version = policy.mirror_for(served, ctx.request_id)
        if shadow_version is None:
            return None
        refused = None if failure is None or outputs is not None else (outcome_of(failure), failure.message)
        first = primary_outputs.get(outputs[0]) if outputs else None
        return ShadowJob(
            model=model,
            primary_version=served,
            shadow_version=shadow_version,
            inputs=[] if req is None or outputs is None else req.inputs,
            outputs=[] if outputs is None else outputs,
            request_id=ctx.request_id,
            trace=ctx.trace.child(),
            received_at=ctx.received_at,
            primary_rows=None if first is None else record_items(first, None, batched),
            primary_latency_ms=latency_ms,
            metadata=request_metadata(ctx.headers),
            batched=batched,
            probe=ctx.probe,
            primary_status=200 if failure is None else failure.status,
            refused=refused,
        )

    def _log(
        self,
        ctx: RequestContext,
        model: str,
        role: str,
        route: str,
        version: str,
        latency_ms: float | None,
        outcome: str,
        scores: np.ndarray | None,
        req: InferRequest | None,
        batched: bool,
        size: int,
        mirrored: bool | None,
    ) -> None:
        """Hand one inference to the prediction log: references only, no work on this path. The
        rollout's masking probe is logged as the route ``probe``: nobody's traffic, no evidence
        of either version."""
        assert self.prediction_log is not None
        if ctx.probe and role == "primary":
            route = "probe"
        data = req.inputs[0].data if req is not None and req.inputs else None
        record = Inference(
            ctx.received_at,
            model,
            version,
            role,
            route,
            ctx.request_id,
            ctx.trace.trace_id,
            ctx.trace.span_id,
            latency_ms,
            outcome,
            scores,
            data,
            batched,
            request_metadata(ctx.headers),
            record_items(scores, data, batched),
            size,
            mirrored,
        )
        self.prediction_log.append(record)

    # -- feedback ---------------------------------------------------------------------------

    def label_rules(self, model: str) -> LabelRules:
        """What a label for ``model`` may be (LabelRules, made once a config): its classes by
        the elements of a row of its first output, their names from the config's metadata.labels,
        else from that output's label_filename; ModelNotFound for a model the repository does
        not have."""
        config = self.repo.model_config(model)
        kept = self._label_rules.get(model)
        if kept is not None and kept[0] is config:
            return kept[1]
        output = config.outputs[0]
        names = config.metadata.get("labels")
        if not isinstance(names, list) or not names:  # (free-form metadata: a list, else not names)
            names = config.labels.get(output.name)
        rules = LabelRules.of(names, output.dims, config.max_batch_size)
        self._label_rules[model] = (config, rules)
        return rules

    def feedback(
        self,
        model: str,
        body: Any,
        rules: LabelRules,
        tenant: str | None = None,
        received_at: float | None = None,
    ) -> dict[str, Any]:
        """Delayed labels: one ``{"request_id", "label", "token"}``, or a list (answered item by
        item, each with its status). ``tenant`` is the request's X-Tenant.

        With a prediction log every valid label is appended to it, also for a request this
        replica did not serve (another may have): ``matched_locally: false``. Without one, a
        request id not served here is refused (ModelNotFound). A request id labelled here
        before is refused (Conflict), unless that label was not kept: with a prediction log,
        one it could not take (``logged: false``, its buffer full) or lost at its flush (its
        tenant's masking key unusable, its file not written: ``on_label_dropped``) may be sent
        again. The live view counts a label once the log has written all its rows (the labels the
        gates read), by the writer's thread: one the log could not take or lost (a row of it is
        enough) is never counted, and its resend, once written, is counted once. Without a log there is no
        file to wait for: a label is counted when taken.
        """
        received_at = time.time() if received_at is None else received_at
        plog = self.prediction_log
        if tenant is not None:  # (as long as the headers allow: bounded as a label's own)
            check_tenant(tenant, "the feedback request's X-Tenant")

        def one(item: Any) -> dict[str, Any]:
            fb = self.feedback_store.label(model, item, rules, accept_unmatched=plog is not None, tenant=tenant)
            logged = plog is not None and plog.append(
                Label(received_at, model, fb.version, fb.request_id, fb.truth, fb.tenant, fb.correct, fb.why)
            )
            if plog is None:  # no file to wait for: counted when taken
                fb.count(model)
            elif not logged:  # kept nowhere: its sender may send it again (the writer counts what it wrote)
                self.feedback_store.forget(model, fb.request_id, fb.tenant)
            return fb.answer(logged)

        if not isinstance(body, list):
            return one(body)
        results = []
        for item in body:
            try:
                results.append({"status": 200, **one(item)})
            except ServerError as exc:
                results.append({"status": exc.status, "error": exc.message})
        return {"results": results}
