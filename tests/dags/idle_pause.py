"""``dag.test()``'s idle pause, made short for the tests (``quick_idle_pause``).

Airflow's ``Dag.test`` loop sleeps 1 s whenever no task is schedulable but some are unfinished:
once per level while a failed stage's downstream tasks are marked upstream_failed one level a
loop, and on every tick while a reschedule-mode sensor waits for its next poke (so each poke
comes up to 1 s late). Here its sleep is, instead:

- short (``AFTER_A_CHANGE``) when a task's state changed since the last pause: the next level of
  a cascade, or the first look after a sensor asked to be rescheduled;
- until the earliest reschedule date of a waiting sensor when nothing changed (at most the loop's
  own 1 s), so a poke runs as soon as it is due and a wait costs no more loop turns (each turn
  queries the metadata database) than the old 1-second ticks did;
- the loop's own 1 s otherwise (a task awaiting a person's input).

Only the sleeps of ``Dag.test`` itself are changed; every other ``time.sleep`` is the real one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import CodeType
from typing import Any
from unittest import mock

from airflow.models.taskreschedule import TaskReschedule
from airflow.sdk import TaskInstanceState
from airflow.sdk.definitions.dag import DAG

AFTER_A_CHANGE = 0.05  # seconds
DUE_MARGIN = 0.01  # seconds past a reschedule date, so the loop's next look finds it passed


class IdlePause:
    """A ``time.sleep`` that shortens the idle pauses of ``Dag.test``'s loop (see the module)."""

    def __init__(self, sleep: Callable[[float], None], loop: CodeType = DAG.test.__code__) -> None:
        self._sleep = sleep
        self._loop = loop  # the code whose sleeps are the idle pauses
        self._last_states: frozenset[tuple[str, int, str | None]] | None = None

    def __call__(self, seconds: float) -> None:
        caller = sys._getframe(1)
        if caller.f_code is not self._loop:
            self._sleep(seconds)
            return
        self._idle_pause(caller.f_locals, seconds)

    def _idle_pause(self, loop: dict[str, Any], seconds: float) -> None:
        tis = loop.get("all_tis", ())
        states = frozenset((ti.task_id, ti.map_index, ti.state) for ti in tis)
        changed, self._last_states = states != self._last_states, states
        if changed:
            self._sleep(min(AFTER_A_CHANGE, seconds))
            return
        due = _next_reschedule(loop.get("session"), tis)
        if due is None:
            self._sleep(seconds)
            return
        wait = (due - datetime.now(UTC)).total_seconds() + DUE_MARGIN
        self._sleep(min(max(wait, AFTER_A_CHANGE), seconds))


def _next_reschedule(session: Any, tis: Any) -> datetime | None:
    """The earliest date a sensor waiting in the run asked to be poked again at, if any."""
    if session is None:
        return None
    dates = [
        session.scalar(
            TaskReschedule.stmt_for_task_instance(ti, descending=True)
            .with_only_columns(TaskReschedule.reschedule_date)
            .limit(1)
        )
        for ti in tis
        if ti.state == TaskInstanceState.UP_FOR_RESCHEDULE
    ]
    return min((d for d in dates if d is not None), default=None)


@contextmanager
def quick_idle_pause() -> Iterator[IdlePause]:
    """Within it, ``Dag.test``'s idle pauses are those of ``IdlePause``."""
    pause = IdlePause(time.sleep)
    with mock.patch.object(time, "sleep", pause):
        yield pause
