"""``approve_promotion``'s wait: Airflow's human-in-the-loop trigger, with the last stage's hard
guards read again every look interval while the answer is awaited.

The trigger keeps its arguments (the run's Params, when the last stage began, the look interval,
the answer's deadline), and the count of the reads in a row that failed in the run folder
(``steps.keep_failed_reads``, per task instance, removed as the task resumes): a triggerer that restarts, or another
triggerer that takes it over, reads the same guards over the same stage and counts on from
there (counted in memory alone, a triggerer restarted more often than ``guard_error_limit``
looks never rolled back a candidate nobody could measure). A Roll back it recorded for a breach before a
restart lost its event is found again as its own (``own_answer``). An answer given in the UI
resumes the task at once (the API moves the deferred task on); the trigger is then cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.triggers.hitl import HITLTrigger
from airflow.triggers.base import TriggerEvent
from asgiref.sync import sync_to_async

if TYPE_CHECKING:
    from vision_rollout.engine import FailedReads

ROLL_BACK = "Roll back"


class GuardedApprovalTrigger(HITLTrigger):
    """Waits for the answer as ``HITLTrigger`` does (the default, Roll back, once the deadline
    passed), and every ``look_s`` reads the last stage's hard guards from ``since`` on
    (``steps.guards_while_waiting``). A guard that trips, or ``guard_error_limit`` reads in a
    row that fail, answer Roll back in the approver's stead (the question leaves Required
    Actions) and end the wait with the breach in the event's ``guard_breach``; an answer that
    came first is taken as it is."""

    def __init__(self, *, rollout: dict[str, Any], since: float, look_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rollout, self.since, self.look_s = rollout, since, look_s
        self.failed_reads: FailedReads | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        extra = {"rollout": self.rollout, "since": self.since, "look_s": self.look_s}
        return f"{type(self).__module__}.{type(self).__qualname__}", {**kwargs, **extra}

    async def guards(self) -> tuple[str | None, str | None]:
        """``steps.guards_while_waiting`` in a thread of its own: Prometheus' queries (up to its
        timeout each, where it does not answer) hold up no other trigger's calls, which the
        triggerer's one shared thread runs (``sync_to_async``'s default)."""
        from rollout_airflow import steps

        return await sync_to_async(steps.guards_while_waiting, thread_sensitive=False)(self.rollout, self.since)

    async def read_guards(self) -> str | None:
        """What ends the wait after this read: a tripped guard, or the ``guard_error_limit``-th
        read in a row that failed (``engine.FailedReads``); None while it goes on."""
        from rollout_airflow import steps
        from vision_rollout.engine import FailedReads

        if self.failed_reads is None:
            self.failed_reads = FailedReads(steps.spec_from(self.rollout).guard_error_limit, await self.kept(None))
        try:
            breach, unread = await self.guards()
        except Exception as exc:
            self.log.exception("the hard guards could not be read")
            breach, unread = None, f"{type(exc).__name__}: {exc}"[:500]
        before = self.failed_reads.count
        ended = self.failed_reads.judge(breach, unread)
        if self.failed_reads.count != before:
            await self.kept(self.failed_reads.count)
        if unread and not breach:  # (in the task's log, where the triggerer keeps a trigger's own)
            count, limit = self.failed_reads.count, self.failed_reads.limit
            self.log.warning("the hard guards could not be read (%d of %d in a row): %s", count, limit, unread)
        return ended

    async def kept(self, count: int | None) -> int:
        """The count of failed reads kept in the run folder: read (``count`` None), or written;
        a folder that cannot be used is a warning (the count in memory goes on)."""
        from rollout_airflow import steps

        try:
            if count is None:
                return await sync_to_async(steps.failed_reads_kept, thread_sensitive=False)(
                    self.rollout, str(self.ti_id)
                )
            await sync_to_async(steps.keep_failed_reads, thread_sensitive=False)(self.rollout, str(self.ti_id), count)
        except Exception as exc:
            self.log.warning("the count of failed reads is not kept in the run folder: %s", str(exc)[:300])
        return count or 0

    async def _handle_response(self) -> TriggerEvent | None:
        event = await super()._handle_response()
        return None if event is None else await self.own_answer(event)

    async def _handle_timeout(self) -> TriggerEvent:
        return await self.own_answer(await super()._handle_timeout())

    async def own_answer(self, event: TriggerEvent) -> TriggerEvent:
        """An answer found recorded, as ``HITLTrigger`` reads it; Roll back by nobody before the
        deadline is this wait's own for a breach, recorded by an earlier run of it whose event
        was lost (the triggerer restarted): the event names the breach again, the guards read
        anew (the P99 over the whole stage finds it again), and the task acts on it as on one."""
        answer = event.payload
        if "error" in answer or answer.get("responded_by_user") is not None or answer.get("guard_breach"):
            return event
        if self.timeout_datetime and answer["responded_at"] >= self.timeout_datetime:
            return event  # the deadline's default
        try:
            breach = (await self.guards())[0]
        except Exception:
            self.log.exception("the hard guards could not be read")
            breach = None
        breach = breach or (
            "a hard guard tripped, or the guards could not be read, before the triggerer restarted "
            "(Roll back was recorded then in the approver's stead)"
        )
        self.log.warning("%s: Roll back, recorded in the approver's stead before a restart", breach)
        return TriggerEvent({**answer, "timedout": False, "guard_breach": breach})

    async def roll_back(self, breach: str) -> TriggerEvent:
        """Roll back recorded as the answer, unless one came first (then that answer: the task
        reads the guards again before it acts on it)."""
        from airflow.sdk.execution_time import hitl

        try:
            resp = await sync_to_async(hitl.update_hitl_detail_response)(
                ti_id=self.ti_id, chosen_options=[ROLL_BACK], params_input=self.params.dump()
            )
        except Exception:
            answered = await self._handle_response()
            if answered is None:
                raise
            return answered
        self.log.warning("%s: Roll back, in the approver's stead", breach)
        return TriggerEvent(
            {
                "chosen_options": [ROLL_BACK],
                "params_input": self.params.dump(),
                "responded_by_user": None,
                "responded_at": resp.responded_at,
                "timedout": False,
                "guard_breach": breach,
            }
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.sdk.timezone import utcnow

        next_look = time.monotonic() + self.look_s  # (the stage read them last, as it passed)
        while True:
            if self.timeout_datetime and self.timeout_datetime < utcnow():
                yield await self._handle_timeout()
                return
            if event := await self._handle_response():
                yield event
                return
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + self.look_s
                if breach := await self.read_guards():
                    yield await self.roll_back(breach)
                    return
            await asyncio.sleep(self.poke_interval)
