"""One rollout at a time per model: a lease the run takes in its first task and renews in each.

Two runs of one model would drive the same routes and Deployments. Runs of different models
may go on side by side, so the lock is the model's, not the DAG's, and it must hold across
workers on other machines. It is a lease, as Kubernetes leader election keeps one: the holder
(the run id) renews it in every task and sensor poke; a lease not renewed for its duration
belongs to a run that crashed, and another run may take it over. The rules, once for both
backends (``CompareAndSwapLock``):

- ``acquire``: taken when free, expired, or already this holder's; ``ModelBusy`` naming the
  holder otherwise. Expired means not renewed for its duration plus ``CLOCK_SKEW_S``: the
  renewal time is the holder's clock and the expiry is judged on the reader's, so a worker whose
  clock runs ahead of the holder's by less than that does not take a live lease (Kubernetes'
  leader election has no such window: it times a lease from when it saw it change).
- ``renew``: only by the holder the lease names (even expired: nobody took it over);
  ``LockLost`` otherwise, so a run whose lease was taken over stops before touching anything.
- ``release``: only by the holder; anyone else's call changes nothing. A run that took over an
  expired lease and then touched nothing gives it back to the run it took it from, as it was
  (``to``): that run, if only late, may renew it and finish, rather than finding it gone.
- ``abort``: anyone marks the holder's rollout aborted (``Holding.aborted``, the reason); the
  lease stays the holder's, and its renewals keep the mark, so the holder finds it at its next
  renewal and rolls back (``rolloutctl abort``). ``LockLost`` when nobody holds the model. Only
  the run it first read holding the lease is marked: gone meanwhile (another's or nobody's),
  ``LockLost``, or ``AbortInDoubt`` after a mark whose answer was lost (perhaps served).
- ``renew(..., note=...)``: the holder's last word on its progress (``Holding.note``: its stage
  and last decision), for ``rolloutctl status``.
- ``retake``: a lease removed while its holder held it (an operator's cleanup, a wiped folder)
  taken again by that holder, marked aborted, so that it puts the stable version back. Only
  when nobody holds it, and the holder's own record of it (``held_record``, kept where all of
  its workers read it) says it held it and had not released it, its last renewal not yet run
  out: no other run could have taken it over meanwhile (and, ended, released it). A lease
  another run holds is never touched.

Every write is a compare-and-swap on the version read, so of two runs racing for one model
exactly one wins. One whose answer left unknown whether it was served (a Lease's 500, 502 or
504, or no answer) is settled by reading the lease back (``mesh.settled``), never taken for
a race lost. Backends: ``LeaseLock``, a ``coordination.k8s.io/v1`` Lease in the model's
namespace (kubernetes mode; the mark and the note are its annotations); ``FileLock``, a JSON
file under the run folder (local mode). Workers' clocks are assumed synchronised (NTP) to within
``CLOCK_SKEW_S``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from model_server.files import sync_folder, write_private
from vision_rollout.attempts import printable
from vision_rollout.folders import LOCK_WAIT_S, NotAFile, guard_file, lock_guard, read_regular, stale_guard
from vision_rollout.mesh import Conflicted, settled, unsettled
from vision_rollout.settings import MODEL_PATTERN, model_name

LEASE_S = 300  # renewed by every task and poke of the run; a crashed run's lease frees after this
MAX_LEASE_S = 7 * 24 * 3600
MAX_HOLDER = 253
MAX_NOTE = 1000  # an abort's reason, a progress note: a sentence, not a log
MAX_LOCK_BYTES = 65536  # a lock file this lock writes is under 3 KiB: a larger one is read no further
# How far two workers' clocks may be apart: a lease is taken for dead this long after its expiry.
CLOCK_SKEW_S = 60
ABORTED, NOTE = "model-rollout/aborted", "model-rollout/note"  # a Lease's annotations


MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last time a datetime holds


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LockError(RuntimeError):
    """The lock's store failed or holds something unreadable (a transient failure may be retried).
    ``status``: the Kubernetes API server's answer that failed it, where one did."""

    status: int | None = None
    maybe_written: bool = False  # (``settled``'s: a write's answer left it unknown, and no read found it not in place)


class ModelBusy(LockError):
    """Another run holds the model: this run must not touch it."""


class LockLost(LockError):
    """This run does not (or no longer) hold the model."""


class AbortInDoubt(LockError):
    """An abort's mark whose answer was lost, the run it marked gone since (that mark perhaps
    served: it rolled back and released), another run perhaps holding the model now, untouched."""


class Aborted(LockError):
    """This run's rollout was aborted (``Holding.aborted``): it puts the stable version back and stops."""


@dataclass(frozen=True)
class Holding:
    """Who holds a model's lease, since when (epoch seconds) and for how long after its last renewal."""

    holder: str
    renewed: float
    seconds: int
    acquired: float
    transitions: int = 0  # how many times the lease changed hands (the Lease's leaseTransitions)
    aborted: str = ""  # why its rollout was aborted ("": it was not): the holder rolls back
    note: str = ""  # what the holder last said of its progress

    def __post_init__(self) -> None:
        """ValueError unless each field is of its type and range (a lock file edited, or written
        by a clock off by centuries: its expiry could not even be shown; a holder no run id is,
        which would go whole into a refusal's line). The mark and the note kept as one line of
        printable characters: they go into the run's failure and ``rolloutctl status``."""
        times = (self.renewed, self.acquired)
        if not (
            isinstance(self.holder, str)
            and len(self.holder) <= MAX_HOLDER
            and self.holder.isprintable()
            and all(_number(t) and 0 <= t <= MAX_EPOCH for t in times)
            and _integer(self.seconds)
            and 0 <= self.seconds <= MAX_LEASE_S
            and _integer(self.transitions)
            and self.transitions >= 0
            and all(isinstance(t, str) and len(t) <= MAX_NOTE for t in (self.aborted, self.note))
        ):
            raise ValueError(f"not a lease: {str(self.__dict__)[:200]}")
        for name in ("aborted", "note"):
            object.__setattr__(self, name, printable(getattr(self, name)))

    @property
    def expires(self) -> float:
        return self.renewed + self.seconds

    def expired(self, now: float) -> bool:
        """Taken for dead: not renewed for its duration and ``CLOCK_SKEW_S`` on the clock of ``now``."""
        return now >= self.expires + CLOCK_SKEW_S

    def describe(self) -> str:
        until = datetime.fromtimestamp(self.expires, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"run {self.holder!r} (its lease runs to {until} unless renewed)"


class ModelLock(Protocol):
    """One model's lease (see the module's rules)."""

    model: str
    clock: Callable[[], float]  # this worker's clock, the lease's expiry judged on it
    by_hand: str  # the command that removes it (a release that failed: the model free sooner)

    def acquire(self, holder: str, seconds: int = LEASE_S) -> Holding: ...

    def renew(self, holder: str, seconds: int = LEASE_S, note: str | None = None) -> Holding: ...

    def release(self, holder: str, to: Holding | None = None) -> bool: ...

    def abort(self, reason: str) -> Holding: ...

    def retake(self, holder: str, record: bytes | None, reason: str) -> Holding | None: ...

    def holding(self) -> Holding | None: ...


class CompareAndSwapLock(ABC):
    """The lease rules over a store with four primitives, each a compare-and-swap on a version."""

    where: str  # the store, for messages ("Lease models/rollout-digits", a file's path)
    by_hand: str  # the command that removes it, for an operator ("kubectl -n models delete lease rollout-digits")

    def __init__(self, model: str, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(model, str) or len(model) > 128 or not re.fullmatch(MODEL_PATTERN, model):
            raise ValueError(f"not a model name: {str(model)[:80]!r}")
        self.model = model
        self.clock = clock

    @abstractmethod
    def _read(self) -> tuple[Holding | None, str | None]:
        """The holding and its version; (None, None) when there is none."""

    @abstractmethod
    def _create(self, holding: Holding) -> bool:
        """False when one exists already."""

    @abstractmethod
    def _replace(self, holding: Holding, version: str) -> bool:
        """False when the stored version is no longer ``version`` (someone else wrote)."""

    @abstractmethod
    def _delete(self, version: str) -> bool:
        """False when the stored version is no longer ``version``."""

    def holding(self) -> Holding | None:
        return self._read()[0]

    def acquire(self, holder: str, seconds: int = LEASE_S) -> Holding:
        """A write in doubt (``settled``) is settled by reading the lease back: as that write set
        it (``_landed``), served; else taken again from what is read."""
        _check(holder, seconds)
        sent: list[Holding] = []
        return settled(lambda doubted: self._acquire(holder, seconds, sent, doubted > 0))

    def _acquire(self, holder: str, seconds: int, sent: list[Holding], doubted: bool) -> Holding:
        """``sent``: the writes sent, the last one in doubt where ``doubted``. A lease released
        between our create (refused: it was held) and our read: ``Conflicted``, created again
        within ``settled``'s tries."""
        now = self.clock()
        fresh = Holding(holder, now, seconds, now)
        current, version = self._read() if doubted else (None, None)
        if current is not None and _landed(current, sent[-1]):
            return current
        if current is None or version is None:
            sent.append(fresh)
            if self._create(fresh):
                return fresh
            current, version = self._read()
            if current is None or version is None:
                raise Conflicted(ModelBusy(f"model {self.model!r} keeps changing hands ({self.where}); try again"))
        if current.holder and current.holder != holder and not current.expired(now):
            ahead = current.renewed - now
            skew = (
                f": its last renewal is stamped {ahead:.0f} s ahead of this worker's clock, and workers' clocks "
                f"must agree within {CLOCK_SKEW_S} s (NTP); if that run is gone, remove the lease"
                if ahead > CLOCK_SKEW_S
                else ""
            )
            raise ModelBusy(f"model {self.model!r} is being rolled out by {current.describe()}{skew}; {self.where}")
        if current.holder == holder:
            taken = replace(current, renewed=now, seconds=seconds)
        else:
            taken = replace(fresh, transitions=current.transitions + 1)
        sent.append(taken)
        if self._replace(taken, version):
            return taken
        winner = self.holding()
        by = winner.describe() if winner else "another run"
        raise ModelBusy(f"model {self.model!r} was taken by {by} at the same moment; {self.where}")

    def renew(self, holder: str, seconds: int = LEASE_S, note: str | None = None) -> Holding:
        """The holding renewed (its ``aborted`` mark kept: the caller stops when it is set), with
        ``note`` (cut to ``MAX_NOTE``) when given. Its compare-and-swap refused (a write between
        its read and its replace: ``abort``'s mark, a renewal of the holder's own that committed
        late: ``Conflicted``, within ``settled``'s tries), the lock is read again: still
        ``holder``'s, renewed from that read (an abort's mark kept: the abort wins); another's or
        nobody's, LockLost. Its replace in doubt (``settled``):
        still ``holder``'s, renewed again from what is read (its first body sent again would be
        refused, 409: the resourceVersion moved on by that write itself), unless what is read is
        what that write set (``_landed``): that write's, served, sent no more."""
        _check(holder, seconds)
        sent: list[Holding] = []
        return settled(lambda doubted: self._renew(holder, seconds, note, sent, doubted > 0))

    def _renew(self, holder: str, seconds: int, note: str | None, sent: list[Holding], doubted: bool) -> Holding:
        """``sent``: the writes sent, the last one in doubt where ``doubted``."""
        current, version = self._read()
        if doubted and current is not None and _landed(current, sent[-1]):
            return current
        if current is None or version is None or current.holder != holder:
            raise LockLost(self._not_held(holder, current))
        renewed = replace(current, renewed=self.clock(), seconds=seconds)
        if note is not None:
            renewed = replace(renewed, note=note[:MAX_NOTE])
        sent.append(renewed)
        if not self._replace(renewed, version):  # (someone wrote meanwhile: as ``abort``, read again)
            raise Conflicted(self._written_meanwhile(holder))
        return renewed

    def release(self, holder: str, to: Holding | None = None) -> bool:
        """``to``: the holding ``holder`` took over, put back as it was. A write in doubt
        (``settled``): read back no longer ``holder``'s, released."""
        return settled(lambda doubted: self._release(holder, to, doubted))

    def _known(self, holder: str) -> str | None:
        """The version of the lock as this object last read or wrote it ``holder``'s; None where
        not known (``_release`` reads it first)."""
        return None

    def _release(self, holder: str, to: Holding | None, doubted: int) -> bool:
        """Deleted at the version this object last read or wrote it ``holder``'s (``_known``), one
        call: the failure callback's release came after its read of the lease, and an API server
        answering in 4.5 s cut it at the callback's cap. A compare-and-swap: refused where it moved
        on since (an abort's mark, another run's), it is read as ever."""
        handed_on = to is not None and to.holder and to.holder != holder  # (put back as it was: read first)
        known = None if doubted or handed_on else self._known(holder)
        if known is not None and self._delete(known):
            return True
        current, version = self._read()
        if current is None or version is None or current.holder != holder:
            return doubted > 0  # (after a write in doubt: that write's, served)
        if to is not None and to.holder and to.holder != holder:
            return self._replace(replace(to, transitions=current.transitions + 1), version)
        return self._delete(version)

    def retake(self, holder: str, record: bytes | None, reason: str) -> Holding | None:
        """The lease taken again by ``holder``, marked aborted for ``reason``, when it was removed
        while ``holder`` held it: nobody holds it, and ``record`` (``held_record``: the holder's
        own, None when absent) names ``holder`` renewing it, not released, and its renewal (a time
        a ``Holding`` holds, for at most ``MAX_LEASE_S``) not run out on this clock. Other runs
        take a lease over only once it has run out (and ``CLOCK_SKEW_S`` more on their clocks),
        so none can have taken this one over and released it meanwhile. None, nothing written, otherwise (a record unreadable, a race lost).
        Its create in doubt (``settled``): read back ``holder``'s, marked, that create's."""
        try:
            last = json.loads(record or b"")
        except (ValueError, RecursionError):
            return None
        renewed: Any = last.get("renewed") if isinstance(last, dict) else None
        seconds: Any = last.get("seconds") if isinstance(last, dict) else None
        if not (_number(renewed) and 0 <= renewed <= MAX_EPOCH and _integer(seconds) and 0 < seconds <= MAX_LEASE_S):
            return None  # (a time that never runs out: NaN, infinity, a lease of centuries)
        now = self.clock()
        if last.get("holder") != holder or last.get("released") or now >= renewed + seconds:
            return None
        taken = Holding(holder, now, LEASE_S, now, aborted=reason[:MAX_NOTE])

        def attempt(doubted: int) -> Holding | None:
            current = self.holding()
            if current is not None:  # (after a create in doubt: this holder's, marked, is that create's)
                return current if doubted and current.holder == holder and current.aborted else None
            return taken if self._create(taken) else None

        return settled(attempt)

    def abort(self, reason: str) -> Holding:
        """Mark the holder's rollout aborted for ``reason`` (cut to ``MAX_NOTE``); the holding as
        marked. Marked already: as it is, its first reason kept. LockLost when nobody holds the
        model; the lease is never released or taken here (it stays its holder's). Only the holding
        first read is marked (its holder, taken at that time: ``_same_run``): gone at a later read,
        LockLost, nothing marked; after a write in doubt (``settled``), ``AbortInDoubt`` (that
        write perhaps served: the run saw it and released). A write in doubt read back marked, done."""
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("an abort needs a reason")
        first: list[Holding] = []  # the holding first read: the one run this abort marks
        return settled(lambda doubted: self._abort(reason, first, doubted > 0))

    def _abort(self, reason: str, first: list[Holding], doubted: bool) -> Holding:
        """``first``: the holding first read; ``doubted``: after a mark in doubt."""
        current, version = self._read()
        held = current if current is not None and current.holder else None
        if first and (held is None or not _same_run(held, first[0])):
            raise self._gone(first[0], held, doubted)
        if held is None or version is None:
            raise LockLost(f"no rollout holds model {self.model!r} ({self.where})")
        if not first:
            first.append(held)
        if held.aborted:
            return held
        marked = replace(held, aborted=reason[:MAX_NOTE])
        if not self._replace(marked, version):  # (the holder renewed meanwhile: read again)
            raise Conflicted(self._written_meanwhile(held.holder))
        return marked

    def _gone(self, marked: Holding, now: Holding | None, doubted: bool) -> LockError:
        """``marked``, the holding an abort first read, gone at a later read; ``now`` the lease's
        holding then. ``doubted``: after a mark whose answer was lost (perhaps served)."""
        who = f"run {now.holder!r} holds it now, not touched" if now else "nobody holds it now"
        if doubted:
            return AbortInDoubt(
                f"the answer to marking run {marked.holder!r} aborted was lost, and run {marked.holder!r} perhaps "
                f"marked (it released the lease since); {who} ({self.where})"
            )
        return LockLost(
            f"run {marked.holder!r} no longer holds model {self.model!r}, nothing marked; {who} ({self.where})"
        )

    def _written_meanwhile(self, holder: str) -> LockError:
        """A renewal's or an abort's compare-and-swap refused, the lease ``holder``'s at its read:
        written by another between that read and the write (an abort, the holder's renewal from
        another worker), not changing hands."""
        return LockError(
            f"the lease of model {self.model!r} ({self.where}) was written by another writer between each read "
            f"and this write, run {holder!r} holding it at the last; try again"
        )

    def _not_held(self, holder: str, current: Holding | None) -> str:
        now = f"{current.describe()} holds it" if current and current.holder else "nobody holds it"
        return f"run {holder!r} does not hold model {self.model!r}: {now} ({self.where})"


def _same_run(current: Holding, first: Holding) -> bool:
    """Whether ``current`` is the holding ``first`` read earlier: the same holder, taken at the same time."""
    return (current.holder, current.acquired) == (first.holder, first.acquired)


def _landed(current: Holding, sent: Holding) -> bool:
    """Whether ``current``, read back after a write in doubt, is what that write (``sent``) set:
    its holder, renewal (to the microsecond a Lease keeps), duration and note (a renewal stamped
    by this worker's clock at that moment: no other write sets it so)."""
    return (current.holder, micro_time(current.renewed), current.seconds, current.note) == (
        sent.holder,
        micro_time(sent.renewed),
        sent.seconds,
        sent.note,
    )


def held_record(holder: str, holding: Holding | None) -> bytes:
    """A run's own record of its lease, for ``retake``: as last renewed (``holding``), or
    released (None). Written before the release, so that a release is never taken for a removal."""
    if holding is None:
        return json.dumps({"holder": holder, "released": True}).encode()
    return json.dumps({"holder": holder, "renewed": holding.renewed, "seconds": holding.seconds}).encode()


def _check(holder: str, seconds: int) -> None:
    if not isinstance(holder, str) or not 0 < len(holder) <= MAX_HOLDER or not holder.isprintable():
        raise ValueError(
            f"a lock holder is a run id of 1 to {MAX_HOLDER} printable characters, not {str(holder)[:80]!r}"
        )
    if not isinstance(seconds, int) or not 0 < seconds <= MAX_LEASE_S:
        raise ValueError(f"a lease lasts 1 to {MAX_LEASE_S} s, not {seconds!r}")


class FileLock(CompareAndSwapLock):
    """Local mode: ``<folder>/<model>.lock``, holding the run id and expiry, written whole and
    synced with its folder (``_write``).

    Each primitive runs under ``flock`` of a sibling guard file (never deleted), so a compare
    and its write (a create: where no file is) are one step for every process on this machine."""

    def __init__(self, model: str, folder: Path, clock: Callable[[], float] = time.time) -> None:
        super().__init__(model, clock)
        self.path = folder / f"{model}.lock"
        self.where = str(self.path)
        self.by_hand = f"rm {shlex.quote(str(self.path))}"

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """``flock`` of the guard file held meanwhile, as a folder's guard file is (``folders``'
        ``lock_guard``: waited for ``LOCK_WAIT_S`` at most, WriteConflict past it; one removed
        meanwhile, by hand, the one there now; an ESTALE naming it and the mount options:
        ``stale_guard``, logged where an error is already going up)."""
        guard_path = self.path.with_suffix(".guard")
        deadline = time.monotonic() + LOCK_WAIT_S
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with stale_guard("opening", guard_path):
                opened = guard_file(guard_path)
            with opened as guard:
                with stale_guard("locking", guard_path):
                    locked = lock_guard(guard, guard_path, self.path, deadline)
                if not locked:
                    continue
                done, leaving = False, None
                try:
                    yield
                    done = True
                except BaseException as exc:
                    leaving = exc
                    raise
                finally:
                    with stale_guard("unlocking", guard_path, done, leaving=leaving):
                        fcntl.flock(guard, fcntl.LOCK_UN)
                return

    def _raw(self) -> str | None:
        """The file's text (bytes that are not UTF-8 replaced: read as the garbage they are).
        LockError for what this lock never writes there, not read whole: a link (to /dev/zero),
        a named pipe (whose read waits for a writer), a folder, a file over ``MAX_LOCK_BYTES``."""
        try:
            data = read_regular(self.path, MAX_LOCK_BYTES + 1)
        except FileNotFoundError:
            return None
        except NotAFile as exc:
            raise self._unreadable(exc.why) from None
        if len(data) > MAX_LOCK_BYTES:
            raise self._unreadable(f"over {MAX_LOCK_BYTES} bytes")
        return data.decode(errors="replace")

    def _unreadable(self, why: str) -> LockError:
        return LockError(f"unreadable lock file {self.path} ({why}); remove it if no rollout runs")

    def _read(self) -> tuple[Holding | None, str | None]:
        with self._guarded():
            raw = self._raw()
        if raw is None:
            return None, None
        try:
            return Holding(**json.loads(raw)), raw
        except RecursionError:
            raise self._unreadable("nested deeper than any JSON this lock writes") from None
        except (ValueError, TypeError) as exc:
            raise self._unreadable(str(exc)) from None

    def _write(self, holding: Holding) -> None:
        """The lock file holding ``holding``, whole (``write_private``: synced with its folder,
        a crash leaves no empty or half-written lock file, nor loses one taken or renewed)."""
        write_private(self.path, _record(holding).encode(), mode=0o644)

    def _create(self, holding: Holding) -> bool:
        with self._guarded():
            if os.path.lexists(self.path):  # (its guard held: nobody on this machine creates it meanwhile)
                return False
            self._write(holding)
        return True

    def _replace(self, holding: Holding, version: str) -> bool:
        with self._guarded():
            if self._raw() != version:
                return False
            self._write(holding)
        return True

    def _delete(self, version: str) -> bool:
        with self._guarded():
            if self._raw() != version:
                return False
            self.path.unlink()
            sync_folder(self.path.parent)
        return True


def _record(holding: Holding) -> str:
    """The lock file's JSON: the mark and the note only when set (a file as an earlier reader reads it)."""
    return json.dumps({k: v for k, v in holding.__dict__.items() if v or k not in ("aborted", "note")}, sort_keys=True)


def lease_name(model: str) -> str:
    """``rollout-<model>`` as a Kubernetes name (``My_Model`` and ``my-model`` share one lease:
    the cautious side)."""
    return f"rollout-{model_name(model)}"[:253].rstrip("-.")


class LeaseLock(CompareAndSwapLock):
    """Kubernetes mode: the Lease ``rollout-<key>`` (the target's VirtualService; the model's name
    without one) in the target's namespace, through the
    kubernetes client's ``CoordinationV1Api``. Create answers 409 AlreadyExists when it is held;
    replace and delete carry the resourceVersion read and answer 409 Conflict when someone else
    wrote in between."""

    def __init__(
        self,
        model: str,
        namespace: str,
        api_client: Any = None,
        clock: Callable[[], float] = time.time,
        key: str | None = None,
    ):
        super().__init__(model, clock)
        # ``key``: what the rollout writes (its VirtualService's name): models that share one
        # target share one lease, so their rollouts cannot interleave on it.
        self.namespace, self.name = namespace, lease_name(key or model)
        self.where = f"Lease {namespace}/{self.name}"
        self.by_hand = f"kubectl -n {shlex.quote(namespace)} delete lease {shlex.quote(self.name)}"
        self.api_client = api_client
        self._seen: tuple[str, str] | None = None  # (the holder and resourceVersion last read or written: ``_known``)

    def _known(self, holder: str) -> str | None:
        return self._seen[1] if self._seen is not None and self._seen[0] == holder else None

    def _api(self) -> Any:
        from kubernetes import client

        return client.CoordinationV1Api(self.api_client)

    def _call(self, what: str, call: Callable[[], Any], refused: tuple[int, ...] = ()) -> Any:
        """The API call's answer; None when it answered one of the ``refused`` statuses."""
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:
            if exc.status in refused:
                return None
            failed = LockError(f"{what} {self.where}: {exc.status} {exc.reason}: {str(exc.body)[:300]}")
            failed.status = exc.status
            raise failed from None

    def _written(self, what: str, call: Callable[[], Any], refused: tuple[int, ...] = (409, 404)) -> bool:
        """A write's ``_call``: False when ``refused`` (409: it exists, or moved on from the version
        sent; 404: gone); its answer leaving unknown whether it was served (a 500, 502 or 504, or
        none) raised as ``Unsettled``, for the operation's ``settled`` to read the lease back. A
        read's failure is raised as it came (the client's retries are a read's)."""
        with unsettled():
            return self._call(what, call, refused) is not None

    def _read(self) -> tuple[Holding | None, str | None]:
        self._seen = None
        lease = self._call("GET", partial(self._api().read_namespaced_lease, self.name, self.namespace), (404,))
        if lease is None:
            return None, None
        spec = lease.spec
        annotations = lease.metadata.annotations or {}
        renewed = spec.renew_time or spec.acquire_time
        try:
            holding = Holding(
                holder=spec.holder_identity or "",  # "": released as leader election releases, free to take
                renewed=renewed.timestamp() if renewed else 0.0,
                seconds=int(spec.lease_duration_seconds or 0),
                acquired=spec.acquire_time.timestamp() if spec.acquire_time else 0.0,
                transitions=int(spec.lease_transitions or 0),
                aborted=annotations.get(ABORTED, ""),
                note=annotations.get(NOTE, ""),
            )
        except ValueError as exc:
            raise LockError(
                f"{self.where} is not a lease this lock reads ({exc}); delete it if no rollout runs"
            ) from None
        self._seen = (holding.holder, str(lease.metadata.resource_version))
        return holding, self._seen[1]

    def _body(self, holding: Holding, version: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace, "labels": {"model-rollout/lock": "1"}}
        if version is not None:
            meta["resourceVersion"] = version
        annotations = {k: v for k, v in ((ABORTED, holding.aborted), (NOTE, holding.note)) if v}
        if annotations:
            meta["annotations"] = annotations
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": holding.holder,
                "leaseDurationSeconds": holding.seconds,
                "acquireTime": micro_time(holding.acquired),
                "renewTime": micro_time(holding.renewed),
                "leaseTransitions": holding.transitions,
            },
        }

    def _create(self, holding: Holding) -> bool:
        create = partial(self._api().create_namespaced_lease, self.namespace, self._body(holding))
        return self._written("create", create, (409,))

    def _replace(self, holding: Holding, version: str) -> bool:
        body = self._body(holding, version)
        self._seen = None
        with unsettled():
            lease = self._call(
                "replace", partial(self._api().replace_namespaced_lease, self.name, self.namespace, body), (409, 404)
            )
        if lease is not None:
            self._seen = (holding.holder, str(lease.metadata.resource_version))
        return lease is not None

    def _delete(self, version: str) -> bool:
        from kubernetes import client

        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=version))
        delete = partial(self._api().delete_namespaced_lease, self.name, self.namespace, body=options)
        self._seen = None
        return self._written("delete", delete)


def micro_time(epoch: float) -> str:
    """A Kubernetes MicroTime: exactly six fractional digits, which the API server requires
    (Python's ``isoformat`` drops them when they are zero)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
