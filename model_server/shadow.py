"""Shadow mirroring: a copy of a sampled request runs on the shadow version, off the primary path.

Every sampled request is copied, whatever its primary's outcome, as Envoy's mirror copies it
before that is known: a request the primary failed runs on the shadow all the same, and one it
refused as the client's before running it (the model's decoding and checks, the same for every
version) is refused alike and counted apart. The primary response is sent first (the copy is queued by a background task that runs after
the response), the queue is bounded, and a full queue or a failing shadow only drops and
counts the copy: the client never waits for, sees, or is hurt by the shadow. Every copy, run,
failed or dropped, goes to the sink (the prediction log), so primary/shadow pairs are complete.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from model_server import metrics
from model_server.config import MAX_COPY_AGE_S, copy_age_problem
from model_server.errors import ModelNotFound, ModelUnavailable, OutOfMemory, Preempted, ServerError, outcome_of
from model_server.model import LoadedVersion
from model_server.protocol import InferInput
from model_server.repository import ModelRepository
from model_server.trace import TraceContext, log_access

log = logging.getLogger(__name__)

PREEMPT_MIN_S = 0.002  # shadow runs predicted longer than this give way to arriving primaries
METADATA_HEADERS = ("x-user-id", "x-device-type", "x-tenant")


def header_text(value: bytes) -> str:
    """A header value as its sender wrote it: UTF-8 (what clients send beyond ASCII), else
    Latin-1 (HTTP's historical charset). Read as Latin-1 only, a full-width number would reach
    the masking as mojibake that no detector reads and any reader decodes back."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


def request_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """The request metadata a prediction record keeps: user, device, tenant and any X-Meta-*
    (``headers``: values decoded by ``header_text``). An X-Tenant of no characters is none, as a
    feedback token and a label have it: its records are masked under the default key and join
    the labels of no tenant."""
    return {
        k.lower(): v
        for k, v in headers.items()
        if (k.lower() in METADATA_HEADERS or k.lower().startswith("x-meta-")) and (v or k.lower() != "x-tenant")
    }


@dataclass
class ShadowJob:
    model: str
    primary_version: str
    shadow_version: str
    inputs: list[InferInput]
    outputs: list[str]
    request_id: str
    trace: TraceContext
    received_at: float
    # The items of the primary's answer (its first output's rows), None when it failed: its
    # shadow record pairs with them item by item. Not the outputs: a detector's are megabytes
    # beside its input, held while the copy waits, outside the queue's bound.
    primary_rows: int | None
    primary_latency_ms: float
    metadata: dict[str, str] = field(default_factory=dict)
    batched: bool = True  # the model has a batch dimension
    queued_at: float = field(default_factory=time.perf_counter)
    probe: bool = False  # the rollout's masking probe: runs at once, not in idle time
    primary_status: int = 200  # the primary's answer: a request it failed is mirrored too, as Envoy mirrors
    # (outcome, message) of a request the primary refused before running it: its decoding and
    # checks are the model's, the same for every version, so the copy is refused alike, not run.
    refused: tuple[str, str] | None = None

    @functools.cached_property
    def nbytes(self) -> int:
        """What the queued copy holds (``held_bytes``; the primary's outputs are small beside them)."""
        return held_bytes(self.inputs)


def held_bytes(inputs: list[InferInput]) -> int:
    """What a request's decoded inputs hold: their bytes, and the whole request body of those
    that are views of it (binary tensors: the JSON part too, up to its limit), once a body."""
    total, bodies = 0, {}
    for i in inputs:
        owner: Any = i.data
        while isinstance(owner, np.ndarray) and owner.base is not None:
            owner = owner.base
        if isinstance(owner, memoryview):  # np.frombuffer of the body
            bodies[id(owner.obj)] = memoryview(owner.obj).nbytes
        else:
            total += i.nbytes
    return total + sum(bodies.values())


def dropped(model: str, version: str, reason: str) -> None:
    """A copy dropped before it ran, counted (``shadow_requests_total``, ``shadow_dropped_total``)."""
    metrics.SHADOW_REQUESTS.labels(model, version, "dropped").inc()
    metrics.SHADOW_DROPPED.labels(model, version, reason).inc()


@dataclass
class ShadowResult:
    job: ShadowJob
    outputs: dict[str, np.ndarray] | None
    latency_ms: float | None  # None for a copy that never ran
    error: str | None
    outcome: str = "ok"  # ok, an error class (as the failure metrics), or DROPPED


# Where shadow results go (the prediction log); called on the event loop, must not block.
ShadowSink = Callable[[ShadowResult], None]


class PrimaryGate:
    """Primary requests in flight. Shadow runs start only when none is, and are aborted when
    one arrives: on a shared machine the shadow takes idle time, never the primary's.

    Used from the event loop only, so checks and updates need no lock.
    """

    def __init__(self) -> None:
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.shadow_runs: set[Any] = set()  # RunOptions of running shadow executions

    def __enter__(self) -> None:
        """A primary request starts executing: shadow runs stop and wait."""
        self.inflight += 1
        self.idle.clear()
        for run in self.shadow_runs:
            run.terminate = True

    def __exit__(self, *exc: object) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


class ShadowMirror:
    def __init__(
        self,
        repo: ModelRepository,
        queue_size: int = 256,
        workers: int = 2,
        sink: ShadowSink | None = None,
        max_preemptions: int = 5,
        queue_bytes: int = 256 * 1024 * 1024,
        max_copy_age_s: float = MAX_COPY_AGE_S,
    ):
        if problem := copy_age_problem(max_copy_age_s):  # (its bound, whoever builds the server)
            raise ValueError(f"the shadow copy max age (shadow_copy_max_age_s) {problem}")
        self.repo = repo
        self.gate = PrimaryGate()
        self.max_preemptions = max_preemptions
        self.queue: asyncio.Queue[ShadowJob] = asyncio.Queue(maxsize=queue_size)
        self.queue_bytes = queue_bytes  # the queued copies' inputs together, at most
        self.queued_bytes = 0
        self.workers = workers
        self.sink = sink
        self._tasks: list[asyncio.Task[None]] = []
        self._probes: set[asyncio.Task[None]] = set()
        self.waiting = 0  # copies Istio's mirror sent, waiting for idle time (run_copy)
        self.max_copy_age_s = max_copy_age_s  # how long from its arrival such a copy may wait
        self.waiting_bytes = 0

    def submit(self, job: ShadowJob) -> None:
        """Queue a copy; on the event loop's thread (asyncio's queue and the byte count are not
        thread-safe)."""
        if job.probe:  # a handful per rollout, sent with the admin token: never queued behind load
            task = asyncio.get_running_loop().create_task(self._finish(job))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
            return
        size = job.nbytes
        if self.queued_bytes + size > self.queue_bytes:
            self._dropped(job, f"shadow queue holds {self.queued_bytes} bytes; limit {self.queue_bytes}", "queue_full")
            return
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self._dropped(job, "shadow queue full", "queue_full")
            return
        self.queued_bytes += size

    def _dropped(self, job: ShadowJob, why: str, reason: str) -> None:
        dropped(job.model, job.shadow_version, reason)
        if self.sink is not None:
            self.sink(ShadowResult(job, None, None, why, "DROPPED"))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]

    async def stop(self, drain_s: float = 5.0) -> None:
        """Finish the queued copies and the probes (up to ``drain_s``); what is left is recorded
        as dropped."""

        async def drained() -> None:
            await self.queue.join()
            while self._probes:
                await asyncio.wait(set(self._probes))

        try:
            await asyncio.wait_for(drained(), drain_s)
        except TimeoutError:
            log.warning("%d shadow copies left unprocessed at shutdown", self.queue.qsize() + len(self._probes))
        running = [*self._tasks, *self._probes]
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        while not self.queue.empty():
            self._dropped(self.queue.get_nowait(), "server shutting down", "shutting_down")
        self.queued_bytes = 0

    async def _worker(self) -> None:
        while True:
            job = await self.queue.get()
            self.queued_bytes -= job.nbytes
            try:
                await self._finish(job)
            finally:
                self.queue.task_done()

    async def _finish(self, job: ShadowJob) -> None:
        try:
            result = await self.run(job)
            if result is not None and self.sink is not None:
                self.sink(result)
        except asyncio.CancelledError:  # the stop's drain ran out: its pair is still recorded
            self._dropped(job, "server shutting down", "shutting_down")
            raise
        except Exception:  # a shadow must never take the worker down
            log.exception("shadow copy of request %s failed unexpectedly", job.request_id)

    async def run(self, job: ShadowJob) -> ShadowResult | None:
        error = None
        outcome = "ok"
        status = 200
        outputs = None
        started = job.queued_at
        with ExitStack() as held:
            try:
                lv = held.enter_context(self.repo.use(job.model, job.shadow_version, routed_by="mirror"))
            except (ModelUnavailable, ModelNotFound) as exc:  # unloaded since it was queued: not its failure
                self._dropped(job, f"shadow version left service: {exc.message}", "left_service")
                return None
            try:
                if job.refused is not None:
                    (outcome, error), status = job.refused, job.primary_status
                    started = time.perf_counter() - job.primary_latency_ms / 1000  # refused as fast
                else:
                    try:
                        if job.probe:
                            run = ort.RunOptions()
                            results, batch, timing = await lv.infer(job.inputs, job.outputs, shadow_run=run)
                        else:
                            deadline = job.queued_at + self.max_copy_age_s
                            if time.perf_counter() > deadline:  # its turn came too late, idle or not
                                raise self.too_old(job.request_id)
                            results, batch, timing = await self.yielding_run(
                                lv, job.inputs, job.outputs, job.request_id, deadline
                            )
                    except OutOfMemory:
                        lv.shadow_metrics.failure("OOM")
                        raise
                    lv.shadow_metrics.succeeded(batch, time.perf_counter() - started, timing, 0.0)
                    outputs = dict(zip(job.outputs, results, strict=True))
            except Preempted as exc:  # primary traffic never left it an idle moment: like a full queue
                self._dropped(
                    job, "preempted: no idle time" if exc.reason == "no_idle_time" else exc.message, exc.reason
                )
                return None
            except ServerError as exc:
                error, outcome, status = exc.message, outcome_of(exc), exc.status
        latency_ms = (time.perf_counter() - started) * 1000
        log_access(
            "shadow",
            job.model,
            job.shadow_version,
            job.request_id,
            job.trace,
            status,
            latency_ms,
            job.inputs[0].data if job.inputs else None,
            error=error,
        )
        # A request both versions refuse as the client's is counted apart, as an Istio copy is
        # (dataplane.py): a client's garbage must not move the shadow guard.
        counted = "ok" if error is None else "rejected" if status < 500 and 400 <= job.primary_status < 500 else "error"
        metrics.SHADOW_REQUESTS.labels(job.model, job.shadow_version, counted).inc()
        if error is not None:
            log.info(
                "shadow %s v%s for request %s (trace %s): %s",
                job.model,
                job.shadow_version,
                job.request_id,
                job.trace.trace_id,
                error,
            )
        return ShadowResult(job, outputs, latency_ms, error, outcome)

    async def run_copy(
        self,
        lv: LoadedVersion,
        inputs: list[InferInput],
        outputs: list[str],
        request_id: str,
        received_at: float | None = None,
    ) -> tuple[list[np.ndarray], int, dict[str, float]]:
        """A copy Istio's mirror sent (``received_at``: when it arrived, ``time.perf_counter``),
        run as ``yielding_run`` runs one. At most the queue's count and bytes of such copies wait
        for idle time (while primaries keep a candidate busy, each held its body, without bound):
        past them it is dropped at once (Preempted), as a full queue drops a copy of this server's
        own mirror; and one still waiting ``max_copy_age_s`` after it arrived is dropped then
        (reason ``too_old``): Envoy has given up on it, and its slot goes to a newer one."""
        size = held_bytes(inputs)
        if self.waiting >= self.queue.maxsize or self.waiting_bytes + size > self.queue_bytes:
            raise Preempted(
                f"shadow copies waiting for idle time: {self.waiting} holding {self.waiting_bytes} bytes; "
                f"limits {self.queue.maxsize} and {self.queue_bytes} bytes",
                "queue_full",
            )
        self.waiting += 1
        self.waiting_bytes += size
        deadline = (time.perf_counter() if received_at is None else received_at) + self.max_copy_age_s
        try:
            return await self.yielding_run(lv, inputs, outputs, request_id, deadline)
        finally:
            self.waiting -= 1
            self.waiting_bytes -= size

    def too_old(self, request_id: str) -> Preempted:
        """A copy past its age bound: its record, stamped at its primary's arrival, would be
        written after the audit's range closed (late), and Envoy has given up on one of its."""
        return Preempted(
            f"shadow copy of {request_id} found no idle time within its age bound of {self.max_copy_age_s:g} s",
            "too_old",
        )

    async def yielding_run(
        self,
        lv: LoadedVersion,
        inputs: list[InferInput],
        outputs: list[str],
        request_id: str,
        deadline: float | None = None,
    ) -> tuple[list[np.ndarray], int, dict[str, float]]:
        """Run when no primary is in flight; a long run starts over when one arrives mid-run.
        With ``deadline`` (``time.perf_counter``), no idle moment by then drops it (Preempted,
        reason ``too_old``).

        Runs predicted shorter than ``PREEMPT_MIN_S`` are not aborted: they cost a primary less
        than aborting and retrying them would cost the shadow.
        """
        for _ in range(self.max_preemptions + 1):
            while self.gate.inflight:  # woken by an idle moment, a primary may have started since
                if deadline is None:
                    await self.gate.idle.wait()
                    continue
                try:
                    await asyncio.wait_for(self.gate.idle.wait(), max(0.0, deadline - time.perf_counter()))
                except TimeoutError:
                    raise self.too_old(request_id) from None
            run = ort.RunOptions()
            if lv.predicted_seconds(inputs) >= PREEMPT_MIN_S:
                self.gate.shadow_runs.add(run)
            try:
                return await lv.infer(inputs, outputs, shadow_run=run)
            except Preempted:
                continue
            finally:
                self.gate.shadow_runs.discard(run)
        raise Preempted(f"shadow copy of {request_id} preempted {self.max_preemptions + 1} times")
