"""A stage's sequential test kept across the runs of its tasks, in the run folder.

A stage is one group-sequential test: its looks are planned from when its weights took effect
(``engine.StageWindow.started``), and its alpha is spent over them. The window's start is the
XCom of the stage's ``apply_mesh_weights``, which a task cleared in Airflow's UI (or its stage's
task group, or the whole run) loses: from that alone the stage would start a fresh test, looks
1..K again with its alpha spent afresh, and a stage failed or left undecided could be run until
a look passed, each re-run another chance to promote a candidate at the margin (1 - (1 - alpha)^n
after n runs).

The stage's record (a JSON file in the run's folder: a disk every worker mounts, or an object
store) keeps, per attempt of its test: when its window started, when its weights were applied
and which runs of its wait judged it (each try of a task instance), the last look judged, and its outcome once decided
(``wait_for_metrics``' XCom, or the tripped guard). A re-run of the stage resumes its test: the
same window, its looks at their planned times (those judged already judged again, to the same
verdicts, on the same records), the alpha already spent spent. A stage whose test decided
reports that decision again and judges nothing (a failed stage is not re-run into a pass); its
weights are not applied again unless it passed. A fresh test of a stage is an explicit choice
(``request_restart``: ``rolloutctl restart-stage``), recorded with its reason: the next run of
the stage starts a new attempt, and the stage's report says so, with what it costs: each
attempt is a test at level alpha, so a candidate at the margin passes one of n with
probability up to 1 - (1 - alpha)^n. A stage applied again long after its window started
(``max_stage_seconds``), undecided, judges its further looks on a window from then, at the
alpha its earlier looks left (``Attempt.move_window``).

Each change is made to the record as it is in the folder and written only when it changed
something, and only if no other writer wrote it since (``Folder.write_if``): read and made
again otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from vision_rollout.folders import Folder, WriteConflict

if TYPE_CHECKING:
    from vision_rollout.spec import RolloutSpec

T = TypeVar("T")

MAX_ATTEMPTS = 20  # restarts a stage may be given, at most (each one a fresh test)
MAX_RUNS = 100  # applications and wait runs kept per attempt (the first ones and the last ones)
MAX_RECORD_ATTEMPTS = 2 * MAX_ATTEMPTS  # with the windows a record never saw (its file lost), at most
MAX_BYTES = 4 * 1024 * 1024  # a record larger is not one this module wrote
MAX_ID = 200  # characters of a wait run's id kept


RECORD_NAME = re.compile(r"stage-\d+-[0-9a-f]{16}\.json")  # (record_name's)


def record_name(run_id: str, index: int) -> str:
    """The file of stage ``index`` (0-based) of run ``run_id``: named by a hash of the run id,
    as the run folder's names are cut and cleaned and two ids could meet there."""
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:16]
    return f"stage-{index + 1}-{digest}.json"


@dataclass
class Attempt:
    """One test of the stage: from ``started`` (unix seconds: its window's start)."""

    started: float
    applied: list[float] = field(default_factory=list)  # when its weights were applied (a re-run adds one)
    tries: list[str] = field(default_factory=list)  # the runs of wait_for_metrics that judged it (their ids)
    look: int = 0  # the last look judged
    outcome: dict[str, Any] | None = None  # once decided: the stage's verdict (its status) or breach
    restart: str | None = None  # why it was started afresh (None: the stage's first)
    applications: int = 0  # how many times its weights were applied (``applied`` keeps MAX_RUNS)
    runs: int = 0  # how many runs of its wait judged it (``tries`` keeps MAX_RUNS)
    window: float | None = None  # where its looks are planned from when not ``started`` (``move_window``)
    level: float = 1.0  # the share of alpha its looks there may spend: what its earlier windows left
    moves: int = 0  # how many times its window was moved
    # What its last judgement reckoned, by the digest of what each was reckoned from: its looks'
    # levels and a waiting look's need (``gates.Reckoning``: the same for each poke of a look).
    reckoned: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @property
    def window_start(self) -> float:
        """Where its looks are planned from (unix seconds)."""
        return self.started if self.window is None else self.window

    def move_window(self, now: float, alpha: float, looks: int, spending: str) -> None:
        """Its further looks planned on a new window from ``now`` (its weights applied again long
        after its window started, its test undecided), at the level its looks so far left: they
        spent at most ``gates.spent`` of the alpha they were judged at (the chance that any of
        them decided when it should not), which stays spent, so that whatever the windows, the
        chance that one decides when it should not is at most alpha."""
        from vision_rollout.gates import spent

        used = spent(alpha * self.level, min(self.look, looks) / looks, spending) / alpha
        self.window, self.level, self.look, self.moves = now, max(0.0, self.level - used), 0, self.moves + 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attempt:
        """ValueError or TypeError for what is not one attempt's values."""
        started, outcome = float(d["started"]), d.get("outcome")
        if not math.isfinite(started) or not isinstance(outcome, dict | None):
            raise ValueError(f"not an attempt: started {started}, outcome {type(outcome).__name__}")
        if outcome is not None and (problem := _outcome_problem(outcome)):
            raise ValueError(f"not an outcome: {problem}")
        applied = [float(t) for t in _list(d.get("applied"))]
        tries = [str(t) for t in _list(d.get("tries"))]
        return cls(
            started,
            applied,
            tries,
            _count(d.get("look")),
            outcome,
            _text(d.get("restart")),
            max(_count(d.get("applications")), len(applied)),
            max(_count(d.get("runs")), len(tries)),
            None if d.get("window") is None else _time(d["window"]),
            _share(d.get("level", 1.0)),
            _count(d.get("moves")),
            _reckoned(d.get("reckoned")),
        )


def _time(value: Any) -> float:
    t = float(value)
    if not math.isfinite(t):
        raise ValueError(f"not a time: {t}")
    return t


def _share(value: Any) -> float:
    share = float(value)
    if not 0 <= share <= 1:
        raise ValueError(f"not a share of alpha: {share}")
    return share


OUTCOMES = {"pass": ("pass",), "fail": ("fail",), "undecided": ("wait",), "breach": None}  # status: decisions


def _outcome_problem(outcome: dict[str, Any]) -> str | None:
    """What an outcome lacks that the stage's report and the decision read; None when nothing.
    (A stage's verdict: its ``status``, a ``summary``, and the ``decision`` its status takes.)"""
    status = outcome.get("status")
    if not isinstance(status, str) or status not in OUTCOMES:
        return f"status {str(status)[:40]!r}"
    if not isinstance(outcome.get("summary"), str):
        return f"{status} without a summary"
    decisions = OUTCOMES[status]
    if decisions is not None and outcome.get("decision") not in decisions:
        return f"{status} with the decision {str(outcome.get('decision'))[:40]!r}"
    return None


def _count(value: Any) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise ValueError(f"not a count: {str(value)[:40]}")
    return value


def _reckoned(value: Any) -> dict[str, Any]:
    """``Attempt.reckoned``: levels (floats in 0..1) and a need (a whole number, None: none),
    which has no bound (an estimate next to its margin needs billions of samples). Either is
    taken under any key (a digest: ``gates.Reckoning`` reckons again one not of its key's kind)."""
    from vision_rollout.gates import MAX_RECKONED

    if not isinstance(value, dict | None) or len(value or {}) > MAX_RECKONED:
        raise ValueError(f"not what a judgement reckoned: {str(value)[:80]}")
    for v in (value or {}).values():
        level = isinstance(v, float) and 0 <= v <= 1
        if not (v is None or level or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)):
            raise ValueError(f"not a level nor a need: {str(v)[:40]}")
    return {str(k): v for k, v in (value or {}).items()}


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list | None):
        raise ValueError(f"not a list: {type(value).__name__}")
    return value or []


def _text(value: Any) -> str | None:
    if not isinstance(value, str | None):
        raise ValueError(f"not a reason: {type(value).__name__}")
    return value


@dataclass
class StageRecord:
    run_id: str
    index: int
    attempts: list[Attempt] = field(default_factory=list)
    restart: str | None = None  # a fresh test asked for, started by the stage's next application
    read: bytes | None = field(default=None, repr=False, compare=False)  # the file as read (None: absent)

    def attempt(self, started: float) -> Attempt:
        """The attempt whose window starts at ``started`` (added when the record has none: a
        window it never saw, its file lost)."""
        for a in self.attempts:
            if a.started == started:
                return a
        if len(self.attempts) >= MAX_RECORD_ATTEMPTS:
            raise RecordError(
                f"the record of stage {self.index + 1} holds {len(self.attempts)} attempts already, none from "
                f"{started}: not one more"
            )
        self.attempts.append(Attempt(started))
        return self.attempts[-1]

    @property
    def tests(self) -> int:
        """How many tests of the stage there were: one per attempt, and one more before the first
        when that was a restart (its record, damaged, set aside: ``request_restart``)."""
        return len(self.attempts) + (1 if self.attempts and self.attempts[0].restart is not None else 0)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "stage": self.index + 1,
                "attempts": [a.to_dict() for a in self.attempts],
                "restart": self.restart,
            },
            indent=1,
        ).encode()


class RecordError(ValueError):
    """The stage's record is there but is not one (another run's, damaged): the stage does not
    start a test afresh on a record it cannot read."""


class RestartPending(ValueError):
    """The stage's wait was run on a window other than the fresh test asked for (``judged``)."""


def load(folder: Folder, run_id: str, index: int) -> StageRecord:
    """The stage's record; an empty one when it has none. OSError when the folder cannot be
    read, RecordError for a file that is not this stage's record."""
    name = record_name(run_id, index)
    try:
        raw = folder.read(name, MAX_BYTES)
    except FileNotFoundError:
        return StageRecord(run_id, index)
    try:
        if len(raw) > MAX_BYTES:
            raise ValueError(f"over {MAX_BYTES} bytes")
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError(f"JSON {type(d).__name__}, not an object")
        if d["run_id"] != run_id or d["stage"] != index + 1:
            raise ValueError(f"the record of run {str(d['run_id'])[:200]!r}, stage {str(d['stage'])[:20]}")
        found = [Attempt.from_dict(a) for a in _list(d["attempts"])]
        if len(found) > MAX_RECORD_ATTEMPTS:
            raise ValueError(f"{len(found)} attempts, over {MAX_RECORD_ATTEMPTS}")
        return StageRecord(run_id, index, found, _text(d.get("restart")), raw)
    except KeyError as exc:
        raise RecordError(f"{folder}/{name} is not the record of stage {index + 1}: no {str(exc)[:60]}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        why = " ".join(str(exc).split())[:300]
        raise RecordError(f"{folder}/{name} is not the record of stage {index + 1}: {why}") from None


def save(folder: Folder, record: StageRecord) -> None:
    """``record`` written over the file it was read from; WriteConflict (an OSError), nothing
    written, when another writer changed that file since (``Folder.write_if``)."""
    for a in record.attempts:  # (a stage cleared without end: the first runs and the last ones)
        a.applied = _bounded(a.applied)
        a.tries = _bounded(a.tries)
    data = record.to_json()
    folder.write_if(record_name(record.run_id, record.index), data, record.read)
    record.read = data


def _bounded(values: list[Any]) -> list[Any]:
    return values if len(values) <= MAX_RUNS else values[: MAX_RUNS // 2] + values[-MAX_RUNS // 2 :]


CHANGE_TRIES = 10  # reads of the record a change is made on, when other writers keep changing it
CHANGE_BACKOFF_S = 0.05  # the first pause before reading it again (doubled each time, at most 1 s; jittered)


def _change(folder: Folder, run_id: str, index: int, change: Callable[[StageRecord], T]) -> tuple[StageRecord, T]:
    """``change`` made to the stage's record as it is in the folder, written only when it
    changed something: read, changed, written provided no other writer (a poke, a retry,
    ``rolloutctl restart-stage``) wrote it meanwhile, else all of it again on what that writer
    wrote, after a pause of random length (writers that collided do not collide again in step).
    WriteConflict when other writers won ``CHANGE_TRIES`` times in a row (nothing lost: nothing
    of this change written)."""
    for n in range(CHANGE_TRIES):
        if n:
            time.sleep(random.uniform(0, min(1.0, CHANGE_BACKOFF_S * 2 ** (n - 1))))  # noqa: S311 (a pause)
        record = load(folder, run_id, index)
        result = change(record)
        for a in record.attempts:
            a.applied, a.tries = _bounded(a.applied), _bounded(a.tries)
        if record.to_json() == record.read or (record.read is None and not record.attempts and not record.restart):
            return record, result
        try:
            save(folder, record)
        except WriteConflict:
            continue
        return record, result
    raise WriteConflict(
        f"{folder}/{record_name(run_id, index)} was changed by other writers {CHANGE_TRIES} times while this "
        "change was made to it: not written"
    )


def resumed(folder: Folder, run_id: str, index: int) -> Attempt | None:
    """The attempt the stage's next application resumes; None when it starts one (its first
    run, or a restart asked for)."""
    record = load(folder, run_id, index)
    return record.attempts[-1] if record.attempts and record.restart is None else None


def applied(
    folder: Folder, run_id: str, index: int, now: float, spec: RolloutSpec | None = None
) -> tuple[float, dict[str, Any] | None]:
    """The stage's weights are applied (its first run, or a re-run): the start of its attempt,
    and the outcome its test decided already (None while undecided). The attempt is the current
    one (a re-run resumes its test), or one from ``now`` for the stage's first run and for a
    restart asked for (``request_restart``). With ``spec``, an undecided attempt whose window
    started over ``max_stage_seconds`` ago (a run cleared long after its stage began) moves its
    window to ``now`` (``Attempt.move_window``): its looks judge traffic from now, not what it
    served before, at the alpha its earlier looks left."""

    def apply(record: StageRecord) -> Attempt:
        if record.attempts and record.restart is None:
            current = record.attempts[-1]
            if spec is not None and current.outcome is None and now - current.window_start > spec.max_stage_seconds:
                current.move_window(now, spec.alpha, spec.looks_per_stage, spec.spending)
        else:
            current = Attempt(now, restart=record.restart)
            record.attempts.append(current)
            record.restart = None
        current.applied.append(now)
        current.applications += 1
        return current

    _, current = _change(folder, run_id, index, apply)
    return current.started, current.outcome


def judged(folder: Folder, run_id: str, index: int, started: float, wait: str | None) -> tuple[StageRecord, Attempt]:
    """A run of the stage's wait (``wait``: its id, each try's own) judges the attempt from
    ``started``: the run recorded (the record written only when it is a new run, or a window
    the record did not have); the record and the attempt, whose ``outcome`` is set when its
    test decided already. RestartPending for a window the record never saw while a restart
    asked for waits for the stage's next application: that window's test is not the one asked
    for, and the record no longer holds what it spent."""

    def judge(record: StageRecord) -> Attempt:
        if record.restart is not None and all(a.started != started for a in record.attempts):
            raise RestartPending(
                f"a fresh test of stage {index + 1} was asked for ({record.restart[:300]}) and its weights were not "
                "applied since: its wait has no window to judge until its apply_mesh_weights runs again"
            )
        attempt = record.attempt(started)
        run = None if wait is None else wait[:MAX_ID]
        if run is not None and run not in attempt.tries:
            attempt.tries.append(run)
            attempt.runs += 1
        return attempt

    return _change(folder, run_id, index, judge)


def looked(
    folder: Folder, record: StageRecord, attempt: Attempt, look: int, reckoned: dict[str, Any] | None = None
) -> None:
    """The attempt's test judged up to ``look`` (kept when it went further), its judgement having
    reckoned ``reckoned`` (``Attempt.reckoned``; kept when it changed, None: as it is)."""
    if look > attempt.look or (reckoned is not None and reckoned != attempt.reckoned):
        _kept(folder, record, attempt, look, attempt.outcome, reckoned)


def decided(folder: Folder, record: StageRecord, attempt: Attempt, look: int, outcome: dict[str, Any]) -> None:
    """The attempt's test decided ``outcome`` (at ``look``): kept before anyone acts on it."""
    _kept(folder, record, attempt, look, outcome)


def _kept(
    folder: Folder,
    record: StageRecord,
    attempt: Attempt,
    look: int,
    outcome: dict[str, Any] | None,
    reckoned: dict[str, Any] | None = None,
) -> None:
    """``look``, ``outcome`` and ``reckoned`` (None: as it is) written into the record as it is now
    in the folder (read again: a restart asked for, or a run counted, while the looks were
    judged stays), and ``record`` and ``attempt`` brought up to date with it."""

    def keep(fresh: StageRecord) -> Attempt:
        current = fresh.attempt(attempt.started)
        current.look = max(current.look, attempt.look, look)
        current.outcome = outcome
        if reckoned is not None:
            current.reckoned = dict(reckoned)
        return current

    fresh, current = _change(folder, record.run_id, record.index, keep)
    record.attempts, record.restart, record.read = fresh.attempts, fresh.restart, fresh.read
    attempt.look, attempt.outcome, attempt.reckoned = current.look, current.outcome, current.reckoned


def request_restart(folder: Folder, run_id: str, index: int, reason: str) -> StageRecord:
    """A fresh test of the stage asked for, with ``reason``: the stage's next application starts
    it. ValueError without a reason, for a stage never applied, or one restarted ``MAX_ATTEMPTS``
    times already. A record that cannot be read (``RecordError``) is set aside, kept whole as
    ``<its name>.damaged-<unix time>``, and the fresh test's reason says so: the attempts it
    held are not counted."""
    reason = printable(reason)[:500]
    if not reason:
        raise ValueError("a restart needs a reason (it is in the stage's report)")

    def ask(record: StageRecord) -> None:
        if not record.attempts:
            raise ValueError(f"stage {index + 1} of run {run_id[:200]!r} has not started: nothing to restart")
        if len(record.attempts) >= MAX_ATTEMPTS:
            raise ValueError(f"stage {index + 1} was tested {len(record.attempts)} times already: trigger a new run")
        record.restart = reason

    try:
        return _change(folder, run_id, index, ask)[0]
    except RecordError:
        pass
    name = record_name(run_id, index)
    damaged = folder.read_within(name, MAX_BYTES)
    aside = folder.write(f"{name}.damaged-{int(time.time())}", damaged)
    fresh = StageRecord(
        run_id,
        index,
        restart=f"{reason} [its record could not be read: kept as {aside}; the attempts before are not counted]",
    )
    fresh.read = damaged
    save(folder, fresh)  # (WriteConflict when another writer replaced it meanwhile: nothing lost)
    return fresh


def restart_asked(folder: Folder, run_id: str, stages: int) -> str | None:
    """The reason of a fresh test asked for (``request_restart``) and not started yet, of the
    first of the run's ``stages`` that has one; None when none has (a record that cannot be read
    counts as none)."""
    for index in range(stages):
        try:
            restart = load(folder, run_id, index).restart
        except (RecordError, FileNotFoundError):
            continue
        if restart is not None:
            return f"stage {index + 1}: {restart}"
    return None


def printable(text: str) -> str:
    """``text`` on one line, its control and format characters (terminal escapes, bidi
    overrides) spaces, its runs of spaces one: as it goes into a report and a chat message."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def chance(alpha: float, attempts: int) -> float:
    """The chance that a candidate at the margin passes one of ``attempts`` tests at level alpha."""
    return 1 - (1 - alpha) ** attempts


def runs_sentence(record: StageRecord, alpha: float) -> str | None:
    """What the report says of the stage's runs: None for a stage run once; else how many times
    its weights were applied and its wait judged it (each resumed its test: no extra chance),
    and each restart asked for, with what the restarts cost."""
    if not record.attempts:
        return None
    current = record.attempts[-1]
    applications, tries = current.applications, current.runs
    restarts = [a.restart or "" for i, a in enumerate(record.attempts) if i or a.restart is not None]
    if not restarts and applications <= 1 and tries <= 1:
        return None
    parts = []
    if applications > 1 or tries > 1:
        parts.append(
            f"its weights were applied {_times(applications)} and its wait ran {_times(tries)}: each re-run "
            f"resumed its test at the next look, with the alpha it had spent (no extra chance)"
        )
    if current.moves:
        parts.append(
            f"its window had started over its max_stage_seconds before when its weights were applied again "
            f"({_times(current.moves)}): its further looks judged the traffic from then on, at {100 * current.level:.3g}% "
            f"of its alpha (what its earlier looks left unspent: no extra chance)"
        )
    if restarts:
        n = record.tests
        reasons = "; ".join(f"{i + 1}: {r}" for i, r in enumerate(restarts))
        parts.append(
            f"RESTARTED {_times(len(restarts))} on request ({reasons}): attempt {n} of {n} decided, each a "
            f"fresh test at level {alpha:g}, so a candidate at the margin passes one of them with "
            f"probability up to {100 * chance(alpha, n):.3g}% (not {100 * alpha:.3g}%)"
        )
    return "Stage runs: " + "; ".join(parts) + "."


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")
