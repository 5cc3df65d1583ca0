"""Triton's dynamic batcher for one model version: requests queue, run merged, and are split back.

Requests join a batch only when it can hold them: the same input names, datatypes and
dimensions after the batch dimension (whatever outputs each asks for: the merged run computes
those any of them asked for, as Triton's). The queue is ordered by
priority level (1 first), then by arrival. A batch is formed when an instance is free:

- before its oldest request has queued ``max_queue_delay``, it runs at once when it holds a
  preferred size (the largest it holds), or when it cannot grow: it reaches ``max_batch_size``
  or the largest preferred size, or the next queued request cannot join it (it runs up to the
  largest preferred size then); otherwise it waits for more;
- after that delay (or with none), it runs whatever it holds, up to ``max_batch_size``.

As Triton's ``DynamicBatchScheduler::GetDynamicBatch``: no preferred size is ``max_batch_size``.

The requests' inputs are prepared for the graph one request at a time (images decoded,
strings as text), so one that cannot be fails alone, then merged along the batch dimension and
run once; the outputs are split back, each request keeping its own rows. When a merged run
fails, its requests run again one by one: a bad request fails alone. An
injected abort is drawn per request, as Istio's fault injection is. With ``preserve_ordering``
responses are released in the order the requests arrived, whatever order their batches end in
(a request refused for its queue timeout is answered at once, as Triton does).

The batcher lives on the server's event loop; executions run on the version's thread pool
(``instance_count`` at a time), or on the loop when the merged batch is cheap enough.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from model_server.config import MAX_QUEUE, DynamicBatching
from model_server.errors import ClientTimeout, InferenceFailed, Rejected, ServerError
from model_server.protocol import InferInput, uint64_parameter

if TYPE_CHECKING:
    from model_server.model import LoadedVersion

Outcome = tuple[list[np.ndarray], int, dict[str, float]]
DELAYED = 1 << 62  # added to a delayed request's place: behind every request of its level not delayed


@dataclass(eq=False)
class Pending:
    """One queued request."""

    inputs: list[InferInput]
    outputs: list[str]
    batch: int
    key: tuple[Any, ...]
    priority: int
    seq: int
    enqueued: float
    deadline: float | None
    own_timeout: bool  # the deadline is the client's (parameters.timeout), not the model's default
    future: asyncio.Future[Outcome] = field(repr=False)
    outcome: Outcome | BaseException | None = None
    queued: bool = True  # still in the queue: not batched, withdrawn or expired
    place: int = -1  # its place within its priority level: seq, or DELAYED + seq once delayed

    def __post_init__(self) -> None:
        self.place = self.seq


def merge_key(inputs: list[InferInput]) -> tuple[Any, ...]:
    """Requests with equal keys can run as one: same tensors but for the batch dimension."""
    return tuple(sorted((i.name, i.datatype, i.shape[1:]) for i in inputs))


class DynamicBatcher:
    def __init__(self, lv: LoadedVersion, config: DynamicBatching, max_queue: int = MAX_QUEUE):
        self.lv = lv
        self.config = config
        self.max_queue = max_queue  # the server's cap on the requests queued, every level together
        self.max_batch = lv.config.max_batch_size
        self.preferred = set(config.preferred_batch_size) or {self.max_batch}  # as Triton normalizes it
        self.largest_preferred = max(self.preferred)
        self.delay_s = config.max_queue_delay_microseconds / 1e6
        # Each priority level's queue policy (level 0: the model has none), its own or the default.
        own = dict(config.priority_queue_policy) if config.priority_levels else {}
        default = config.default_queue_policy
        self.policies = {level: own.get(level, default) for level in range(config.priority_levels + 1)}
        self._queue: list[tuple[int, int, Pending]] = []  # sorted by (priority, place)
        self._sizes: dict[int, int] = {}  # queued requests per priority level (Triton's queue per level)
        self._seq = itertools.count()
        self._free = lv.config.instance_count
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._order: dict[int, Pending] = {}  # preserve_ordering: answered requests not yet released
        self._next_release = 0
        self._timeouts = 0  # queued requests with a deadline
        # A heap of (deadline, seq, request) of the requests queued with a deadline, and of some
        # that left the queue since (dropped when they reach the top, or when they outnumber
        # the rest): each arrival and wake-up costs O(log n), not a walk of the whole queue.
        self._deadlines: list[tuple[float, int, Pending]] = []

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the request's side --------------------------------------------------------------------

    def priority_of(self, parameters: dict[str, Any]) -> int:
        raw = uint64_parameter(parameters, "priority") or 0
        levels = self.config.priority_levels
        if not levels:
            return 0
        # As Triton's InferenceRequest::SetPriority: 0, or a level the model does not have, is
        # the default level.
        return raw if 0 < raw <= levels else self.config.default_priority_level

    def timeout_of(self, parameters: dict[str, Any], priority: int = 0) -> tuple[float, bool]:
        """The request's queue timeout in seconds (0: none), and whether the client chose it. As
        Triton's queue policy (its priority level's): with ``allow_timeout_override`` a
        request's ``timeout`` (0: not set) may shorten the default, never lengthen it; a
        default of 0 is no timeout, which no request's shortens (Triton's
        ``PolicyQueue::Enqueue`` takes a timeout only below the default)."""
        policy = self.policies[priority]
        # Triton's uint64: a JSON integer past it is refused, not divided (an OverflowError, a 500).
        raw = uint64_parameter(parameters, "timeout")
        if raw is not None:
            default = policy.default_timeout_microseconds
            if policy.allow_timeout_override and 0 < raw < default:
                return raw / 1e6, True
        return policy.default_timeout_microseconds / 1e6, False

    async def submit(self, inputs: list[InferInput], outputs: list[str], parameters: dict[str, Any]) -> Outcome:
        """Queue one validated request and wait for its share of a batch."""
        priority = self.priority_of(parameters)
        timeout, own = self.timeout_of(parameters, priority)
        limit = self.policies[priority].max_queue_size
        if limit and self._sizes.get(priority, 0) >= limit:  # as Triton: each level's own queue
            raise Rejected(f"model '{self.lv.name}' version {self.lv.version}: exceeds maximum queue size ({limit})")
        if self.queued >= self.max_queue:  # (a max_queue_size of 0 is unbounded, in Triton too)
            raise Rejected(
                f"model '{self.lv.name}' version {self.lv.version}: exceeds maximum queue size "
                f"({self.max_queue}, the server's --max-queue)"
            )
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():  # first request, or a new loop
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._form_batches())
        now = time.perf_counter()
        seq = next(self._seq)
        pending = Pending(
            inputs,
            outputs,
            inputs[0].shape[0],
            merge_key(inputs),
            priority,
            seq,
            now,
            now + timeout if timeout else None,
            own,
            loop.create_future(),
        )
        if pending.deadline is not None:
            self._timeouts += 1
            heapq.heappush(self._deadlines, (pending.deadline, seq, pending))
        bisect.insort(self._queue, (priority, pending.place, pending), key=_order)
        self._sizes[priority] = self._sizes.get(priority, 0) + 1
        assert self._wake is not None
        self._wake.set()
        try:
            return await pending.future
        except asyncio.CancelledError:  # the client went away: its place in the queue is freed
            self._withdraw(pending)
            raise

    def _withdraw(self, pending: Pending) -> None:
        if pending.queued:
            self._take(pending)
            self._answer(pending, asyncio.CancelledError())  # keeps preserve_ordering's count

    def _take(self, pending: Pending) -> None:
        """Take a queued request out of the queue, found by its place in the queue's order."""
        del self._queue[bisect.bisect_left(self._queue, (pending.priority, pending.place), key=_order)]
        self._left(pending)

    def _left(self, pending: Pending) -> None:
        """A request left the queue: its place at its level is free, its deadline no longer counts."""
        pending.queued = False
        self._sizes[pending.priority] -= 1
        if pending.deadline is None:
            return
        self._timeouts -= 1
        heap = self._deadlines
        if not self._timeouts:
            heap.clear()
        elif len(heap) > 2 * self._timeouts + 64:  # mostly requests that left: keep those queued
            heap[:] = [entry for entry in heap if entry[2].queued]
            heapq.heapify(heap)

    def close(self) -> None:
        """Stop forming batches (the version is drained: nothing is queued)."""
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)

    # -- forming batches -----------------------------------------------------------------------

    def _candidates(self) -> tuple[list[Pending], int, bool]:
        """Triton's walk of the queue from its head: the requests that can run together (up to
        ``max_batch_size``, stopping at the first that cannot join), how many of them make its
        best preferred batch (the last preferred size reached, else the most that stay within
        the largest preferred size once more would pass it; 0: neither), and whether it is
        complete (cannot usefully grow)."""
        head = self._queue[0][2]
        taken, size = [head], head.batch
        best = 1 if size in self.preferred else 0
        for _, _, p in itertools.islice(self._queue, 1, None):
            if not best and size + p.batch > self.largest_preferred:
                best = len(taken)
            if p.key != head.key or size + p.batch > self.max_batch:
                return taken, best, True  # the next request cannot join
            taken.append(p)
            size += p.batch
            if size in self.preferred:
                best = len(taken)
        return taken, best, size >= self.largest_preferred

    def _expire(self, now: float) -> None:
        """The queued requests whose timeout passed: refused, as Triton's REJECT action does, or
        with DELAY moved behind every request of their level not delayed, with no timeout."""
        heap = self._deadlines
        while heap and (heap[0][0] <= now or not heap[0][2].queued):
            pending = heapq.heappop(heap)[2]
            if not pending.queued:
                continue
            if self.policies[pending.priority].timeout_action == "DELAY":
                del self._queue[bisect.bisect_left(self._queue, (pending.priority, pending.place), key=_order)]
                self._timeouts -= 1
                pending.deadline, pending.place = None, DELAYED + pending.seq
                bisect.insort(self._queue, (pending.priority, pending.place, pending), key=_order)
                continue
            self._take(pending)
            # A client that chose its own timeout gave up: not the version's failure (as a 400 is not).
            error = ClientTimeout if pending.own_timeout else Rejected
            self._answer(pending, error(f"model '{self.lv.name}': request timeout expired in the queue"), at_once=True)

    async def _form_batches(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            now = time.perf_counter()
            if self._timeouts:
                self._expire(now)  # also while every instance is busy: a timeout is the client's
            if not self._queue or self._free == 0:
                await self._sleep(wake, None, now)
                continue
            taken, best, complete = self._candidates()
            until = min(p.enqueued for p in taken) + self.delay_s
            exceeded = bool(self.delay_s) and until <= now  # its oldest request has queued the delay
            if best and not exceeded:
                taken = taken[:best]
            elif self.delay_s and not (complete or exceeded):
                await self._sleep(wake, until, now)
                continue
            del self._queue[: len(taken)]  # a batch is always the head of the queue
            for p in taken:
                self._left(p)
            self._free -= 1
            task = asyncio.get_running_loop().create_task(self._execute(taken))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _sleep(self, wake: asyncio.Event, until: float | None, now: float) -> None:
        """Until woken (an arrival, a free instance), ``until``, or the next queue timeout."""
        heap = self._deadlines
        while heap and not heap[0][2].queued:
            heapq.heappop(heap)
        if heap:
            until = heap[0][0] if until is None else min(until, heap[0][0])
        wake.clear()
        if until is None:
            await wake.wait()
            return
        try:
            await asyncio.wait_for(wake.wait(), max(until - now, 0.0))
        except TimeoutError:
            pass

    # -- running and answering -----------------------------------------------------------------

    async def _execute(self, batch: list[Pending]) -> None:
        try:
            lv = self.lv
            pixels = sum(i.pixels for p in batch for i in p.inputs)
            if lv.runs_inline(merged_size(batch), sum(p.batch for p in batch), pixels):
                outcomes = lv.run_batch(batch)
            else:
                loop = asyncio.get_running_loop()
                outcomes = await loop.run_in_executor(lv.executor, lv.run_batch, batch)
        except BaseException as exc:  # every waiting request gets an answer, cancellation too
            outcomes = [exc] * len(batch)
        finally:
            self._free += 1
            assert self._wake is not None
            self._wake.set()
        for pending, outcome in zip(batch, outcomes, strict=True):
            self._answer(pending, outcome)

    def _answer(self, pending: Pending, outcome: Outcome | BaseException, at_once: bool = False) -> None:
        """Settle a request's future; with ``preserve_ordering`` once every earlier request's is,
        unless ``at_once`` (a request that never ran: Triton answers those outside the order)."""
        if at_once or not self.config.preserve_ordering:
            _settle(pending.future, outcome)
        if not self.config.preserve_ordering:
            return
        pending.outcome = outcome
        self._order[pending.seq] = pending
        while self._next_release in self._order:  # release in arrival order
            released = self._order.pop(self._next_release)
            self._next_release += 1
            assert released.outcome is not None
            _settle(released.future, released.outcome)


def _order(item: tuple[Any, ...]) -> tuple[Any, ...]:
    """A queue entry's place in the queue: (priority, place)."""
    return item[:2]


def merged_size(batch: list[Pending]) -> int:
    return sum(i.nbytes for p in batch for i in p.inputs)


def _settle(future: asyncio.Future[Outcome], outcome: Outcome | BaseException) -> None:
    if future.done():  # the client went away (cancelled)
        return
    if isinstance(outcome, BaseException):
        if not isinstance(outcome, (ServerError, asyncio.CancelledError)):  # a bug: answered, not lost
            outcome = InferenceFailed(f"batched execution failed: {type(outcome).__name__}: {outcome}")
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def split(results: list[np.ndarray], batch: list[Pending]) -> list[list[np.ndarray]] | None:
    """Each request's rows of a merged run's outputs; None when an output has no batch dimension
    of the merged size (the caller then runs the requests one by one)."""
    total = sum(p.batch for p in batch)
    if any(r.ndim == 0 or r.shape[0] != total for r in results):
        return None
    bounds = list(itertools.accumulate(p.batch for p in batch))
    starts = [0, *bounds[:-1]]
    return [[r[a:b] for r in results] for a, b in zip(starts, bounds, strict=True)]


def is_retryable(exc: BaseException) -> bool:
    """A merged run that failed is retried request by request, unless the failure is the server's
    state (an unloaded version) rather than something one request may have caused."""
    return isinstance(exc, ServerError) and not isinstance(exc, Rejected)
