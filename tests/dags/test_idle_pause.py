"""dag.test()'s idle pause in the tests (idle_pause.py): short after a change, the loop's own
1 s while nothing changes and no sensor waits, and every other sleep untouched."""

from __future__ import annotations

import time
import types

from tests.dags.idle_pause import AFTER_A_CHANGE, IdlePause


def ti(task_id: str, state: str | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(task_id=task_id, map_index=-1, state=state)


def loop_turn(all_tis: list) -> None:
    """A stand-in for Dag.test's loop: an idle turn with its locals."""
    session = None  # noqa: F841 (read by the pause from this frame)
    time.sleep(1)


def test_the_loop_pauses_briefly_after_a_change_and_its_own_second_while_nothing_changes(monkeypatch):
    asked: list[float] = []
    pause = IdlePause(asked.append, loop=loop_turn.__code__)
    monkeypatch.setattr(time, "sleep", pause)
    loop_turn([ti("a", "failed"), ti("b", None), ti("c", None)])
    loop_turn([ti("a", "failed"), ti("b", "upstream_failed"), ti("c", None)])  # the cascade's next level
    loop_turn([ti("a", "failed"), ti("b", "upstream_failed"), ti("c", None)])  # nothing changed
    time.sleep(0.5)  # anyone else's sleep
    assert asked == [AFTER_A_CHANGE, AFTER_A_CHANGE, 1, 0.5]


def test_only_the_loops_sleeps_are_changed():
    """The pause the tests use is bound to Airflow's Dag.test."""
    from airflow.sdk.definitions.dag import DAG

    asked: list[float] = []
    pause = IdlePause(asked.append)
    pause(1)
    assert asked == [1]
    assert DAG.test.__code__.co_names.count("sleep") >= 1  # the loop still sleeps through time.sleep
