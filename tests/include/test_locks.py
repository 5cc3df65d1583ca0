"""The per-model rollout lock: one lease rule, two stores (a lock file; a Kubernetes Lease through
the real kubernetes client's CoordinationV1Api against the fake API server). The clock is
injected: expiry is tested by moving it, never by sleeping."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from devstack.cluster.kube import FakeKubeAPI
from vision_rollout.locks import (
    CLOCK_SKEW_S,
    LEASE_S,
    CompareAndSwapLock,
    FileLock,
    LeaseLock,
    LockError,
    LockLost,
    ModelBusy,
    held_record,
    lease_name,
    micro_time,
)

T0 = 1_790_000_000.0
NAMESPACES = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def kube() -> Iterator[tuple[FakeKubeAPI, Any]]:
    fake = FakeKubeAPI().start()
    cfg = client.Configuration()
    cfg.host = fake.url
    yield fake, client.ApiClient(cfg)
    fake.stop()


@pytest.fixture(params=["file", "lease"])
def make(request, tmp_path, kube) -> Callable[..., CompareAndSwapLock]:
    """Locks of one store: every lock made shares it (two workers looking at one model)."""
    namespace = f"test-{next(NAMESPACES)}"  # a fresh store per test on the module's API server

    def make(model: str = "digits", clock: Callable[[], float] | None = None) -> CompareAndSwapLock:
        clock = clock or Clock()
        if request.param == "file":
            return FileLock(model, tmp_path / "locks", clock=clock)
        return LeaseLock(model, namespace, kube[1], clock=clock)

    return make


def test_the_first_run_takes_the_model_and_a_second_is_refused_naming_it(make):
    clock = Clock()
    lock = make(clock=clock)
    held = lock.acquire("run-a")
    assert (held.holder, held.expires) == ("run-a", T0 + LEASE_S)
    assert lock.holding() == held
    clock.now += 60
    with pytest.raises(ModelBusy, match=r"model 'digits' is being rolled out by run 'run-a' \(its lease runs to"):
        make(clock=clock).acquire("run-b")
    assert lock.holding().holder == "run-a"  # the refusal changed nothing


def test_a_retry_of_the_holder_takes_it_again_and_another_model_is_free(make):
    clock = Clock()
    make(clock=clock).acquire("run-a")
    clock.now += 10
    again = make(clock=clock).acquire("run-a", seconds=30)  # build_image retried: still run-a's
    assert (again.renewed, again.seconds, again.acquired) == (T0 + 10, 30, T0)
    assert make("mnist", clock=clock).acquire("run-b").holder == "run-b"  # another model's run proceeds


def test_the_holder_renews_and_nobody_else_can(make):
    clock = Clock()
    lock = make(clock=clock)
    lock.acquire("run-a")
    clock.now += LEASE_S - 1
    assert lock.renew("run-a").expires == clock.now + LEASE_S
    with pytest.raises(LockLost, match=r"run 'run-b' does not hold model 'digits': run 'run-a' \(its lease"):
        lock.renew("run-b")
    with pytest.raises(LockLost, match="run 'run-a' does not hold model 'mnist': nobody holds it"):
        make("mnist", clock=clock).renew("run-a")  # never taken: renewing does not take it


def test_an_expired_lease_is_taken_over_and_the_old_holder_stops(make):
    clock = Clock()
    make(clock=clock).acquire("crashed-run", seconds=30)
    clock.now += 29 + CLOCK_SKEW_S
    with pytest.raises(ModelBusy):
        make(clock=clock).acquire("run-b")
    clock.now += 1  # 30 s without a renewal, and the clocks' margin: the run is taken for dead
    taken = make(clock=clock).acquire("run-b")
    assert (taken.holder, taken.acquired, taken.transitions) == ("run-b", clock.now, 1)
    with pytest.raises(LockLost, match="run 'run-b'"):  # the old holder's next step stops, naming the new one
        make(clock=clock).renew("crashed-run")
    assert not make(clock=clock).release("crashed-run")
    assert make(clock=clock).holding().holder == "run-b"


def test_a_worker_whose_clock_runs_ahead_does_not_take_a_live_lease(make):
    """The holder renews on its clock, another worker judges the expiry on its own: one running
    40 s ahead took a lease renewed a moment before that had 30 s to run."""
    holder_clock, ahead = Clock(), Clock()
    make(clock=holder_clock).acquire("run-a", seconds=30)
    ahead.now = holder_clock.now + 40
    with pytest.raises(ModelBusy, match="run 'run-a'"):
        make(clock=ahead).acquire("run-b")
    assert make().holding().holder == "run-a"


def test_an_abort_marks_the_holders_lease_which_its_renewals_keep(make):
    """``rolloutctl abort``: the holder's rollout marked aborted, the lease still its holder's
    (nothing released that a live run owns); the holder finds the mark at its next renewal, the
    first reason kept; nobody holding the model: LockLost."""
    clock = Clock()
    lock = make(clock=clock)
    with pytest.raises(LockLost, match="no rollout holds model 'digits'"):
        lock.abort("an operator's abort")
    lock.acquire("run-a")
    lock.renew("run-a", note="stage 25%: pass")
    marked = make(clock=clock).abort("an operator's abort")
    assert (marked.holder, marked.aborted, marked.note) == ("run-a", "an operator's abort", "stage 25%: pass")
    assert make(clock=clock).abort("again").aborted == "an operator's abort"  # idempotent
    clock.now += 10
    renewed = lock.renew("run-a")
    assert (renewed.aborted, renewed.renewed, renewed.note) == ("an operator's abort", clock.now, "stage 25%: pass")
    with pytest.raises(ModelBusy):
        make(clock=clock).acquire("run-b")
    assert lock.release("run-a")
    assert make(clock=clock).acquire("run-b").aborted == ""  # a later rollout starts unmarked


@pytest.mark.parametrize("writer", ["abort", "takeover"])
def test_a_renewal_whose_swap_is_refused_reads_again_and_fails_only_for_another_holder(make, writer):
    """Another write lands between a renewal's read and its replace: ``rolloutctl abort``'s mark
    (or a renewal of the run's own, answered 500 and committed late). The refused swap was taken
    for the lease lost (LockLost naming the holder itself: "run 'run-a' does not hold model
    'digits': run 'run-a' (...) holds it"), and the run failed without rolling back. It reads
    again: still the holder's, renewed from that read, the abort's mark kept (the abort wins: the
    holder rolls back); another run's, LockLost naming it."""
    clock = Clock()
    lock = make(clock=clock)
    lock.acquire("run-a", seconds=30)
    read = lock._read

    def read_then_another_writes() -> Any:
        seen = read()
        lock._read = read  # type: ignore[method-assign]
        if writer == "abort":
            make(clock=clock).abort("an operator's abort")
        else:
            make(clock=Clock()).release("run-a", to=replace(make(clock=clock).holding(), holder="run-c"))
        return seen

    lock._read = read_then_another_writes  # type: ignore[method-assign]
    clock.now += 10
    if writer == "takeover":
        with pytest.raises(LockLost, match=r"run 'run-a' does not hold model 'digits': run 'run-c'"):
            lock.renew("run-a")
        return
    renewed = lock.renew("run-a")
    assert (renewed.holder, renewed.aborted, renewed.renewed) == ("run-a", "an operator's abort", clock.now)
    assert make(clock=clock).holding() == renewed


def test_an_expired_lease_nobody_took_is_still_its_holders(make):
    clock = Clock()
    lock = make(clock=clock)
    lock.acquire("run-a", seconds=30)
    clock.now += 3600  # a long queue between two tasks, and no other run asked
    assert lock.renew("run-a").holder == "run-a"


def test_a_lease_taken_over_and_released_untouched_goes_back_to_the_run_it_was_taken_from(make):
    """A run that took over an expired lease and was refused before touching anything gives it
    back as it was: the late run renews it and finishes (deleted, it could do neither)."""
    clock = Clock()
    lock = make(clock=clock)
    lock.acquire("run-a", seconds=30)
    clock.now += 30 + CLOCK_SKEW_S
    before = lock.holding()
    taken = make(clock=clock).acquire("run-b")
    assert lock.release("run-b", to=before)
    back = lock.holding()
    assert (back.holder, back.renewed, back.seconds, back.acquired) == ("run-a", T0, 30, T0)
    assert back.transitions == taken.transitions + 1
    assert lock.renew("run-a").holder == "run-a"
    assert not lock.release("run-b", to=before)  # not run-b's any more: nothing changes
    assert lock.release("run-a", to=before)  # its own holding: released
    assert lock.holding() is None


def test_a_removed_lease_is_taken_again_only_by_the_run_whose_record_says_it_held_it(make):
    """``retake``: nobody holds the lease, and the run's own record says it renewed it, had not
    released it, and that renewal has not run out (no other run could have had it meanwhile)."""
    clock = Clock()
    lock = make(clock=clock)
    held = lock.acquire("run-a", seconds=60)
    record = held_record("run-a", held)
    assert lock.retake("run-a", record, "removed") is None  # still held: nothing to take
    lock.release("run-a")  # (as an operator's removal: the record not told)
    assert lock.retake("run-b", record, "removed") is None  # another run's record
    assert lock.retake("run-a", None, "removed") is None  # no record: it never held it
    assert lock.retake("run-a", held_record("run-a", None), "removed") is None  # it released it
    assert lock.retake("run-a", b"{not json", "removed") is None
    clock.now += 60  # its renewal ran out: another run may have taken it over and ended
    assert lock.retake("run-a", record, "removed") is None
    clock.now -= 1
    taken = lock.retake("run-a", record, "removed")
    assert taken is not None
    assert (taken.holder, taken.aborted) == ("run-a", "removed")
    assert make(clock=clock).holding() == taken
    make(clock=clock).release("run-a")
    make(clock=clock).acquire("run-b")
    assert lock.retake("run-a", record, "removed") is None  # another run holds it: never touched
    assert make(clock=clock).holding().holder == "run-b"


@pytest.mark.parametrize(
    "record",
    [
        b'{"holder": "run-a", "renewed": NaN, "seconds": 60}',
        b'{"holder": "run-a", "renewed": Infinity, "seconds": 60}',
        b'{"holder": "run-a", "renewed": 1e400, "seconds": 60}',
        b'{"holder": "run-a", "renewed": 1790000000.0, "seconds": 1000000000000}',
        b'{"holder": "run-a", "renewed": 1790000000.0, "seconds": "60"}',
        b"[" * 30_000 + b"]" * 30_000,
    ],
    ids=["nan", "infinity", "overflow", "seconds-huge", "seconds-text", "deep-json"],
)
def test_a_record_that_no_renewal_wrote_takes_no_lease_again(make, record):
    """``retake`` trusts the run's record only for a renewal that has not run out: one whose
    time never runs out (NaN, infinity, a lease of 30,000 years) took the lease again however
    long ago its last renewal was, when another run could have taken it over and ended; a JSON
    nesting deeper than Python's recursion was a RecursionError in the step. Refused (None),
    nothing written."""
    clock = Clock()
    lock = make(clock=clock)
    clock.now += 10 * 365 * 86400
    assert lock.retake("run-a", record, "removed") is None
    assert lock.holding() is None


def test_only_the_holder_releases(make):
    lock = make()
    lock.acquire("run-a")
    assert not lock.release("run-b")  # the refused run's teardown
    assert lock.holding().holder == "run-a"
    assert lock.release("run-a")
    assert lock.holding() is None
    assert not lock.release("run-a")  # twice: nothing left
    assert make().acquire("run-b").transitions == 0  # free again: created anew


def test_of_two_runs_taking_over_at_the_same_moment_one_wins(make):
    """Run b reads the expired lease; run c takes it over before b writes: b's compare-and-swap
    fails (409 Conflict, or the changed file) and b is refused naming c."""
    clock = Clock()
    make(clock=clock).acquire("crashed-run", seconds=30)
    clock.now += 31 + CLOCK_SKEW_S
    b = make(clock=clock)
    read = b._read

    def read_then_lose() -> Any:
        seen = read()
        make(clock=clock).acquire("run-c")
        return seen

    b._read = read_then_lose  # type: ignore[method-assign]
    with pytest.raises(ModelBusy, match=r"was taken by run 'run-c' \(.*\) at the same moment"):
        b.acquire("run-b")
    assert make(clock=clock).holding().holder == "run-c"


def test_many_runs_racing_for_a_free_model_one_wins(make):
    clock = Clock()
    won: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(6)

    def race(holder: str) -> None:
        start.wait()
        try:
            won.append(make(clock=clock).acquire(holder).holder)
        except ModelBusy:
            refused.append(holder)

    threads = [threading.Thread(target=race, args=(f"run-{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1
    assert len(refused) == 5
    assert make(clock=clock).holding().holder == won[0]


@pytest.mark.parametrize("rounds", [3, 4])
def test_a_lease_changing_hands_between_each_create_and_read_spends_the_one_budget_of_tries(make, monkeypatch, rounds):
    """Another run takes the model and lets it go again between each create of ours (refused: it
    holds it) and our read after it (nobody holds it). ``_acquire`` kept a loop of its own, two
    creates, inside ``settled``'s tries (a retry loop inside another's: the project's rule, none),
    and gave up after two, the model free at the third. The lease changing hands is a
    ``Conflicted``: created again within ``settled``'s one budget (``WRITE_TRIES`` creates at
    most), then refused naming the tries."""
    from vision_rollout import mesh
    from vision_rollout.mesh import WRITE_TRIES

    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    clock = Clock()
    other, lock = make(clock=clock), make(clock=clock)
    other.acquire("run-x")
    create, read = lock._create, lock._read
    creates = []

    def counted_create(holding: Any) -> bool:
        creates.append(holding)
        return create(holding)

    def read_once_run_x_let_go() -> Any:  # (run-x takes it again before our next create, ``rounds`` times)
        other.release("run-x")
        seen = read()
        if len(creates) < rounds:
            other.acquire("run-x")
        return seen

    lock._create = counted_create  # type: ignore[method-assign]
    lock._read = read_once_run_x_let_go  # type: ignore[method-assign]
    if rounds < WRITE_TRIES:
        assert lock.acquire("run-a").holder == "run-a"
        assert len(creates) == rounds + 1
    else:
        with pytest.raises(ModelBusy, match=rf"keeps changing hands .*\(tried {WRITE_TRIES} times: each refused"):
            lock.acquire("run-a")
        assert len(creates) == WRITE_TRIES
        assert make(clock=clock).holding() is None


def test_a_lease_renewed_on_a_clock_far_ahead_is_refused_naming_the_skew(make):
    """A holder whose clock ran two hours ahead stamped its renewals two hours in the future: to
    every other worker the lease ran two hours longer than it should, and the refusal only said
    "its lease runs to <then>", as for a lease renewed a moment ago (a crashed run's model held
    for hours, nobody knowing why). The refusal now names the skew, what the workers' clocks are
    assumed to keep, and the lease to remove once that run is gone."""
    holder_clock, behind = Clock(), Clock()
    holder_clock.now = T0 + 7200
    make(clock=holder_clock).acquire("run-a")
    with pytest.raises(ModelBusy) as refused:
        make(clock=behind).acquire("run-b")
    message = str(refused.value)
    assert "its last renewal is stamped 7200 s ahead of this worker's clock" in message
    assert f"within {CLOCK_SKEW_S} s" in message
    assert make().holding().holder == "run-a"
    behind.now = holder_clock.now - 30  # within the skew allowed: refused as any live lease
    with pytest.raises(ModelBusy) as refused:
        make(clock=behind).acquire("run-b")
    assert "ahead" not in str(refused.value)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda lock: lock.acquire(""), "a lock holder is a run id of 1 to 253 printable characters"),
        (lambda lock: lock.acquire("r" * 254), "a lock holder is a run id of 1 to 253 printable characters"),
        (lambda lock: lock.renew("run-a", seconds=0), "a lease lasts 1 to 604800 s, not 0"),
        (lambda lock: lock.acquire("run-a", seconds=10**9), "a lease lasts 1 to 604800 s"),
    ],
)
def test_bad_holders_and_durations_are_refused(make, call, needle):
    with pytest.raises(ValueError, match=needle):
        call(make())


@pytest.mark.parametrize("trouble", ["stale", "held"])
def test_a_file_locks_guard_that_goes_stale_or_stays_held_is_named_not_waited_on(tmp_path, monkeypatch, trouble):
    """FileLock's guard file: an ESTALE (NFS) opening or locking it went up bare ("[Errno 116]
    Stale file handle"), nothing named; one another process held (a holder stopped with
    SIGSTOP, a hung NFS lock) was waited on for ever, the run's lease never renewed. As a
    folder's guard file: the ESTALE names the guard file and the mount options to check, and
    the wait ends after ``LOCK_WAIT_S`` (WriteConflict naming the lock file)."""
    import errno
    import fcntl

    from vision_rollout import folders, locks
    from vision_rollout.folders import WriteConflict

    lock = FileLock("digits", tmp_path)
    guard = tmp_path / "digits.guard"
    if trouble == "stale":

        def stale(*args, **kwargs):
            raise OSError(errno.ESTALE, "Stale file handle")

        monkeypatch.setattr(locks, "guard_file", stale)
        with pytest.raises(OSError, match=f"Stale file handle opening {guard}") as e:
            lock.acquire("run-a")
        assert e.value.errno == errno.ESTALE
        assert "lookupcache=none" in str(e.value)
        return
    monkeypatch.setattr(folders, "LOCK_WAIT_S", 0.3)
    monkeypatch.setattr(locks, "LOCK_WAIT_S", 0.3, raising=False)
    with open(guard, "ab") as held:  # (another process's flock: another open file description)
        fcntl.flock(held, fcntl.LOCK_EX)
        outcome: list[BaseException] = []

        def acquire():
            try:
                lock.acquire("run-a")
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=acquire, daemon=True)
        worker.start()
        worker.join(5)
        assert not worker.is_alive(), "waited on the guard file for ever"
    (error,) = outcome
    assert isinstance(error, WriteConflict)
    assert str(tmp_path / "digits.lock") in str(error)


@pytest.mark.parametrize("model", ["../etc/passwd", "", "-x", "m" * 129])
def test_a_lock_is_only_for_a_model_name(tmp_path, model):
    with pytest.raises(ValueError, match="not a model name"):
        FileLock(model, tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"holder": "x"}',
        # Fields of another type, or a time no date holds (a clock off by centuries): a TypeError's
        # or an OverflowError's traceback, and the model refused until the file was found.
        '{"holder": "x", "renewed": "a", "seconds": 300, "acquired": 0}',
        '{"holder": "x", "renewed": 1e20, "seconds": 300, "acquired": 0}',
        '{"holder": "x", "renewed": NaN, "seconds": 300, "acquired": 0}',
        '{"holder": 7, "renewed": 0, "seconds": 300, "acquired": 0}',
        '{"holder": "x", "renewed": 0, "seconds": -1, "acquired": 0}',
    ],
)
def test_an_unreadable_lock_file_is_named(tmp_path, content):
    (tmp_path / "digits.lock").write_text(content)
    with pytest.raises(LockError, match=r"unreadable lock file .*digits\.lock .*remove it if no rollout runs"):
        FileLock("digits", tmp_path).acquire("run-a")


@pytest.mark.parametrize(
    ("make_file", "needle"),
    [
        # A JSON nesting deeper than Python's recursion: a RecursionError's traceback.
        (lambda f: f.write_text("[" * 30_000 + "]" * 30_000), "nested deeper than any JSON this lock writes"),
        # Read whole: a file of gigabytes, or a link to /dev/zero, read until memory ran out.
        (lambda f: f.write_bytes(b" " * (1 << 20) + b"{}"), "over 65536 bytes"),
        (lambda f: f.symlink_to("/dev/zero"), "a link, not a regular file"),
        # A named pipe nobody writes to: the worker hung on its read for good.
        (lambda f: os.mkfifo(f), "not a regular file"),
        (lambda f: f.mkdir(), "not a regular file"),
    ],
    ids=["deep-json", "huge", "link-to-dev-zero", "fifo", "folder"],
)
def test_a_lock_path_that_is_no_lock_file_is_named_without_reading_it_whole(tmp_path, make_file, needle):
    """What sits at the lock's path is read at most ``MAX_LOCK_BYTES``, as the regular file it
    must be: anything else is an unreadable lock file, named, whatever the caller (the model
    refused until it is removed), never a hang, a crash or the worker's memory."""
    make_file(tmp_path / "digits.lock")
    for call in (
        lambda lock: lock.acquire("run-a"),
        lambda lock: lock.renew("run-a"),
        lambda lock: lock.release("run-a"),
    ):
        with pytest.raises(
            LockError, match=rf"unreadable lock file .*digits\.lock \(.*{needle}.*remove it if no rollout"
        ):
            call(FileLock("digits", tmp_path))


def _plant(make: Callable[..., CompareAndSwapLock], kube: Any, **spec: Any) -> CompareAndSwapLock:
    """A lock whose store holds a lease written by hand (``spec``: holder, renewed, note)."""
    lock = make()
    renewed, note = spec.get("renewed", T0), spec.get("note", "")
    if isinstance(lock, FileLock):
        lock.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"holder": spec["holder"], "renewed": renewed, "seconds": LEASE_S, "acquired": renewed}
        lock.path.write_text(json.dumps({**record, **({"note": note} if note else {})}))
        return lock
    assert isinstance(lock, LeaseLock)
    body = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": lock.name, "annotations": {"model-rollout/note": note} if note else {}},
        "spec": {
            "holderIdentity": spec["holder"],
            "leaseDurationSeconds": LEASE_S,
            "acquireTime": micro_time(renewed),
            "renewTime": micro_time(renewed),
        },
    }
    client.CoordinationV1Api(kube[1]).create_namespaced_lease(lock.namespace, body)
    return lock


@pytest.mark.parametrize("holder", ["r" * 20_000, "run-a\n[2026-12-03 17:00:00] INFO - Marking task as SUCCESS"])
def test_a_lease_whose_holder_no_run_id_is_is_named_unreadable_in_a_bounded_line(make, kube, holder):
    """A lease written by hand whose holder is 20,000 characters long went whole into the
    refusal (the task's log, the refused run's Slack report), and one holding a line break
    into the holder an operator reads; run ids are 1 to ``MAX_HOLDER`` printable characters,
    so such a lease is unreadable, said in one bounded line."""
    lock = _plant(make, kube, holder=holder)
    with pytest.raises(LockError) as refused:
        lock.acquire("run-b")
    message = str(refused.value)
    assert len(message) < 600
    assert "\n" not in message
    assert "delete it if no rollout runs" in message or "remove it if no rollout runs" in message
    with pytest.raises(ValueError, match="a lock holder is a run id of 1 to 253 printable characters"):
        make().acquire("run-a\x1b[2J")


def test_a_leases_abort_reason_and_note_are_one_printable_line_whoever_wrote_them(make, kube):
    """The abort's reason goes into the run's failure ("the rollout was aborted: <reason>", in
    the task's log and its report) and the note into ``rolloutctl status``: a line break or a
    terminal escape in them, from ``rolloutctl abort --reason`` or a lease edited by hand, made
    lines of their own there. They are kept as one line of printable characters."""
    lock = _plant(make, kube, holder="run-a", note="stage 2\n\x1b[31mlooks fine")
    assert lock.holding().note == "stage 2 [31mlooks fine"
    marked = lock.abort("the candidate\nis\u202ewrong")
    assert marked.aborted == lock.holding().aborted == "the candidate is wrong"
    renewed = lock.renew("run-a", note="look 3\r\nok")
    assert renewed.note == lock.holding().note == "look 3 ok"


def test_a_lock_file_that_could_not_be_written_whole_is_not_left_behind(tmp_path, monkeypatch):
    """A full disk (or a kill) while the record is written: no empty lock file stays to refuse
    every later run as unreadable; the model is free and the next run takes it."""
    import vision_rollout.locks as locks

    record = locks._record

    def full_disk(holding):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(locks, "_record", full_disk)
    with pytest.raises(OSError, match="No space left"):
        FileLock("digits", tmp_path).acquire("run-a")
    assert not (tmp_path / "digits.lock").exists()
    monkeypatch.setattr(locks, "_record", record)
    assert FileLock("digits", tmp_path).acquire("run-b").holder == "run-b"


def test_a_lock_file_and_a_run_folders_records_are_synced_with_their_folder(tmp_path, monkeypatch):
    """The lock file was written with no fsync (its create, its renewal's temporary renamed over
    it) and a run folder's records were renamed into place with no fsync of their folder: a
    crash could leave an empty or half-written lock file (every later run refused: unreadable),
    or lose a record written just before (a stage's application, the lease's record). Each is
    now synced, its bytes and then its folder, before the write returns."""
    import os

    from vision_rollout.folders import Folder

    synced: list[str] = []
    fsync = os.fsync

    def recorded(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    locks = tmp_path / "run" / "locks"
    lock = FileLock("digits", locks)
    for step in (lambda: lock.acquire("run-a"), lambda: lock.renew("run-a", 60), lambda: lock.release("run-a")):
        synced.clear()
        step()
        assert str(locks) in synced  # the folder, after the file's create, rename or removal
        assert synced[-1] == str(locks)
    for synced_file in (lambda: lock.acquire("run-b"), lambda: lock.renew("run-b", 60)):
        synced.clear()
        synced_file()
        assert any(p.startswith(str(locks / ".digits.lock.")) for p in synced)  # its bytes, before the rename
    folder = Folder(str(tmp_path / "run" / "rollouts" / "digits" / "run-a"))
    synced.clear()
    folder.write("held.json", b"{}")
    made = [tmp_path / "run" / "rollouts" / "digits", tmp_path / "run" / "rollouts", tmp_path / "run"]
    assert synced[-4:] == [str(folder.path), *map(str, made)]  # (the folders it made, each in its own)
    synced.clear()
    folder.write_if("stage-1.json", b"{}", None)
    assert synced[-1] == str(folder.path)


def test_the_lock_file_holds_the_run_and_its_expiry(tmp_path):
    FileLock("digits", tmp_path, clock=Clock()).acquire("run-a", seconds=120)
    record = json.loads((tmp_path / "digits.lock").read_text())
    assert (record["holder"], record["renewed"] + record["seconds"]) == ("run-a", T0 + 120)


def test_the_lease_is_a_valid_kubernetes_lease_in_the_models_namespace(kube):
    fake, api_client = kube
    LeaseLock("My_Model.v2", "vision", api_client, clock=Clock()).acquire("manual__2026-11-30T16:00:00+00:00")
    assert lease_name("My_Model.v2") == "rollout-my-model-v2"
    lease = client.CoordinationV1Api(api_client).read_namespaced_lease("rollout-my-model-v2", "vision")
    assert lease.spec.holder_identity == "manual__2026-11-30T16:00:00+00:00"
    assert lease.spec.lease_duration_seconds == LEASE_S
    assert lease.spec.renew_time.timestamp() == T0
    stored = fake.objects[("leases", "vision", "rollout-my-model-v2")]["spec"]
    assert stored["renewTime"] == "2026-09-21T14:13:20.000000Z"  # MicroTime: six digits, even when zero
    assert micro_time(T0 + 0.25) == "2026-09-21T14:13:20.250000Z"


def test_the_fake_api_server_refuses_what_the_real_one_refuses(kube):
    from datetime import UTC, datetime

    _, api_client = kube
    api = client.CoordinationV1Api(api_client)
    base = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l1"}}
    api.create_namespaced_lease("refusals", {**base, "spec": {"holderIdentity": "a"}})

    def status(call: Callable[[], Any]) -> tuple[int, str]:
        with pytest.raises(ApiException) as refused:
            call()
        return refused.value.status, json.loads(refused.value.body)["reason"]

    assert status(lambda: api.create_namespaced_lease("refusals", {**base, "spec": {}})) == (409, "AlreadyExists")
    seconds_zero = {**base, "spec": {"leaseDurationSeconds": 0}}
    assert status(lambda: api.create_namespaced_lease("refusals", seconds_zero)) == (422, "Invalid")
    # Python's own datetime serialisation drops zero microseconds: the API server refuses it.
    no_micros = client.V1Lease(
        metadata=client.V1ObjectMeta(name="l2"), spec=client.V1LeaseSpec(renew_time=datetime.fromtimestamp(T0, UTC))
    )
    assert status(lambda: api.create_namespaced_lease("refusals", no_micros)) == (400, "BadRequest")
    other = {**base, "metadata": {"name": "l3"}}
    assert status(lambda: api.replace_namespaced_lease("l1", "refusals", other)) == (400, "BadRequest")
    assert status(lambda: api.replace_namespaced_lease("l3", "refusals", other)) == (404, "NotFound")
    stale = {**base, "metadata": {"name": "l1", "resourceVersion": "1"}}
    assert status(lambda: api.replace_namespaced_lease("l1", "refusals", stale)) == (409, "Conflict")
    precondition = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version="1"))
    assert status(lambda: api.delete_namespaced_lease("l1", "refusals", body=precondition)) == (409, "Conflict")
    assert api.read_namespaced_lease("l1", "refusals").spec.holder_identity == "a"  # nothing changed
    api.delete_namespaced_lease("l1", "refusals")
    assert status(lambda: api.read_namespaced_lease("l1", "refusals")) == (404, "NotFound")


def test_the_api_servers_other_answers_are_named(kube):
    lock = LeaseLock("digits", "Not_A_Namespace", kube[1])  # the API server has no such path
    with pytest.raises(
        LockError, match=r"create Lease Not_A_Namespace/rollout-digits: 404 .*could not find the requested resource"
    ):
        lock.acquire("run-a")


@pytest.mark.parametrize("status", [500, 504])
def test_a_renewals_read_failed_is_raised_as_it_came_not_read_back_as_a_write(kube, status):
    """A renewal settles a replace whose answer left unknown whether it was served; the read
    before it, failed (500 or 504 each time), was taken for such a write too: read 4 times, with
    backoff, then raised saying each answer left unknown whether the write was served and each
    read back found it not in place, though no write was sent. A read's failure is raised as it
    came, once (the client's own retries are the reads' retries)."""
    fake, api_client = kube
    lock = LeaseLock("digits", f"test-{next(NAMESPACES)}", api_client, clock=Clock())
    lock.acquire("run-a")
    before = len(fake.requests)
    fake.throttle, fake.throttle_status, fake.throttled_methods = 100, status, frozenset({"GET"})
    try:
        with pytest.raises(LockError, match=rf"^GET Lease .*/rollout-digits: {status} ") as failed:
            lock.renew("run-a")
    finally:
        fake.throttle, fake.throttled_methods = 0, frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
    assert "tried" not in str(failed.value)
    assert [r["method"] for r in fake.requests[before:]] == ["GET"]


def test_a_renewals_replace_answered_504_each_time_is_named_as_what_happened(kube, caplog):
    """A renewal's replace answered 504 at each try, not served: the last try logged "reading it
    back" though nothing was read after it. It names the tries, the answers in doubt and each read
    back finding the renewal not in place (a renewal read back as it was sent is that renewal,
    served: ``test_a_lease_write_served_and_answered_504_...``), and the last read back once
    (the renewal's attempt, its replace withheld): not in place, but a 504's write may commit
    after its answer, so it may still land; each read back is logged where one follows."""
    from vision_rollout.mesh import WRITE_TRIES

    fake, api_client = kube
    ticks = itertools.count(T0)  # (each renewal stamped anew: one read back is not it)
    lock = LeaseLock("digits", f"test-{next(NAMESPACES)}", api_client, clock=lambda: next(ticks))
    lock.acquire("run-a")
    before = len(fake.requests)
    fake.throttle, fake.throttle_status, fake.throttled_methods = 100, 504, frozenset({"PUT"})
    try:
        with pytest.raises(LockError) as failed:
            lock.renew("run-a")
    finally:
        fake.throttle, fake.throttled_methods = 0, frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
    assert str(failed.value).startswith("replace Lease ")
    assert str(failed.value).endswith(
        f"(tried {WRITE_TRIES} times: each answer left unknown whether the write was served, and each read "
        "back found it not in place; the last not in place when read back: it may still land)"
    )
    assert [r["method"] for r in fake.requests[before:]] == ["GET", "PUT"] * WRITE_TRIES + ["GET"]
    assert sum("reading it back" in r.getMessage() for r in caplog.records) == WRITE_TRIES - 1


def _doubted_lock(fake: FakeKubeAPI, clock: Clock) -> LeaseLock:
    """A lease lock on the fake API server through the client as the rollout makes it
    (``with_retries``: a write left without an answer is an ``ApiUnreachable``)."""
    from vision_rollout.mesh import with_retries

    cfg = client.Configuration()
    cfg.host = fake.url
    return LeaseLock("digits", f"test-{next(NAMESPACES)}", with_retries(client.ApiClient(cfg)), clock=clock)


@pytest.mark.parametrize("answer", [500, None], ids=["500", "no-answer"])
@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
@pytest.mark.parametrize("op", ["acquire", "takeover", "release", "give-back", "abort", "retake"])
def test_a_lease_write_left_in_doubt_is_read_back_not_taken_for_lost(kube, op, served, answer):
    """A lease's create, replace or delete answered 500 (etcd timing out, served or not) or not
    answered at all failed ``acquire``, ``release``, ``abort`` and ``retake`` (LockError, or the
    client's exception): a ``retake`` served then answered 500 was a race lost, the run failing
    for good with the lease its own. Each is settled as a renewal is (``mesh.settled``): the
    lease read back, the write found in place (done) or made again from what was read."""
    fake = kube[0]
    clock = Clock()
    lock = _doubted_lock(fake, clock)
    method = {"acquire": "POST", "retake": "POST", "release": "DELETE"}.get(op, "PUT")
    if op in ("takeover", "give-back"):
        lock.acquire("run-0", seconds=30)
        clock.now += 31 + CLOCK_SKEW_S
    before = lock.holding()
    if op in ("release", "give-back", "abort", "retake"):
        record = held_record("run-a", lock.acquire("run-a", seconds=60))
    if op == "retake":
        lock.release("run-a")  # (an operator's removal)
    fake.throttle, fake.throttle_status, fake.throttle_served = 1, answer, served
    fake.throttled_methods = frozenset({method})
    try:
        if op in ("acquire", "takeover"):
            assert lock.acquire("run-a").holder == "run-a"
            assert lock.holding().transitions == (1 if op == "takeover" else 0)
        elif op == "release":
            assert lock.release("run-a")
            assert lock.holding() is None
        elif op == "give-back":
            assert lock.release("run-a", to=before)
            assert lock.holding().holder == "run-0"
        elif op == "abort":
            assert lock.abort("an operator's abort").aborted == "an operator's abort"
        else:
            taken = lock.retake("run-a", record, "removed")
            assert taken is not None
            assert (taken.holder, taken.aborted) == ("run-a", "removed")
        assert fake.throttle == 0  # (the write in doubt was sent)
    finally:
        fake.throttle, fake.throttle_status, fake.throttle_served = 0, 429, False
        fake.throttled_methods = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
    if op == "abort":
        assert lock.holding().aborted == "an operator's abort"
    if op == "retake":
        assert lock.holding().holder == "run-a"


@pytest.mark.parametrize("call", ["renew", "abort"])
def test_a_lease_written_between_each_read_and_write_is_named_as_such_not_changing_hands(make, call):
    """Another writer wrote the lease between each of a renewal's (or an abort's) reads and its
    write, the holder the same each time (its own renewal from another worker): the call gave up
    with "model 'digits' keeps changing", as if the model changed hands, which it did not; nothing
    tested it. It names what happened: written meanwhile at each read, still the holder's, and
    that it may be tried again (a LockError, not a LockLost: the run still holds the model)."""
    from vision_rollout.mesh import WRITE_TRIES

    clock = Clock()
    lock = make(clock=clock)
    lock.acquire("run-a")
    read = lock._read
    writes = []

    def read_then_the_holder_renews_elsewhere() -> Any:
        seen = read()
        clock.now += 1
        writes.append(make(clock=clock).renew("run-a"))  # (the holder's other worker)
        return seen

    lock._read = read_then_the_holder_renews_elsewhere  # type: ignore[method-assign]
    with pytest.raises(LockError) as failed:
        lock.renew("run-a") if call == "renew" else lock.abort("an operator's abort")
    assert type(failed.value) is LockError
    said = str(failed.value)
    assert said.startswith(f"the lease of model 'digits' ({lock.where}) was written by another writer between each")
    assert "run 'run-a' holding it at the last; try again" in said
    assert "changing" not in said
    assert said.endswith(
        f"(tried {WRITE_TRIES} times: each refused (409), the object written by another between its read and its write)"
    )
    assert len(writes) == WRITE_TRIES  # (one budget of tries, as a write in doubt's)
    assert make(clock=clock).holding().holder == "run-a"


@pytest.mark.parametrize("op", ["acquire", "takeover", "renew"])
def test_a_lease_write_served_and_answered_504_each_time_is_found_in_place_not_sent_again(kube, op):
    """etcd slow: each create or replace of the lease committed, then answered 504. ``acquire``
    and ``renew`` read the lease back and, finding it this holder's, wrote it again from what they
    read (``settled(checks=False)``): each write served and answered 504 again, they raised after
    4 tries with the lease theirs (a teardown failing at its first hold, the traffic left on the
    candidate). A read back that holds what the write in doubt sent (holder, renewal to the
    microsecond, duration, note) is that write, served: taken as it is, nothing sent again."""
    fake = kube[0]
    clock = Clock()
    clock.now += 0.123456789  # (a time the lease keeps to the microsecond only)
    lock = _doubted_lock(fake, clock)
    if op == "takeover":
        lock.acquire("run-0", seconds=30)
        clock.now += 31 + CLOCK_SKEW_S
    if op == "renew":
        lock.acquire("run-a")
        clock.now += 10
    method = "PUT" if op != "acquire" else "POST"
    before = len(fake.requests)
    fake.throttle, fake.throttle_status, fake.throttle_served = 100, 504, True
    fake.throttled_methods = frozenset({method})
    try:
        got = lock.renew("run-a", note="stage 1") if op == "renew" else lock.acquire("run-a")
    finally:
        fake.throttle, fake.throttle_status, fake.throttle_served = 0, 429, False
        fake.throttled_methods = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
    assert (got.holder, micro_time(got.renewed)) == ("run-a", micro_time(clock.now))
    assert got.note == ("stage 1" if op == "renew" else "")
    assert lock.holding() == got
    assert [r["method"] for r in fake.requests[before:]].count(method) == 1  # (a takeover's create refused first)


@pytest.mark.parametrize("meanwhile", ["released", "taken"])
@pytest.mark.parametrize("doubt", ["served-then-500", "refused-409"])
def test_an_abort_marks_only_the_run_it_first_read_holding_the_lease(kube, monkeypatch, doubt, meanwhile):
    """An abort of run X whose mark was served then answered 500 was retried against whoever held
    the lease at its read back: X, having seen the mark, rolled back and released, and run Y took
    the model: Y was marked aborted with X's reason; or, nobody holding it, LockLost ("nothing to
    abort") though X was marked and rolled back. Its mark refused (409) because X released
    meanwhile and Y took the model, it marked Y too. An abort marks the holding it first read
    alone (its holder, taken at that time): that one gone, a mark in doubt is said to be lost
    (X perhaps marked, Y not touched: AbortInDoubt); a mark refused is LockLost, nothing marked."""
    from vision_rollout import mesh
    from vision_rollout.locks import AbortInDoubt

    fake = kube[0]
    clock = Clock()
    lock = _doubted_lock(fake, clock)
    lock.acquire("run-x")
    other = LeaseLock("digits", lock.namespace, lock.api_client, clock=clock)

    def x_ends() -> None:
        fake.throttle = 0
        other.release("run-x")
        if meanwhile == "taken":
            clock.now += 1
            other.acquire("run-y")

    if doubt == "served-then-500":
        fake.throttle, fake.throttle_status, fake.throttle_served = 1, 500, True
        fake.throttled_methods = frozenset({"PUT"})
        monkeypatch.setattr(mesh.time, "sleep", lambda _: x_ends())
    else:
        read = lock._read

        def read_then_x_ends() -> Any:
            seen = read()
            if seen[0] is not None and seen[0].holder == "run-x":
                x_ends()
            return seen

        monkeypatch.setattr(lock, "_read", read_then_x_ends)
    try:
        with pytest.raises(LockError) as failed:
            lock.abort("an operator aborts run-x")
    finally:
        fake.throttle, fake.throttle_status, fake.throttle_served = 0, 429, False
        fake.throttled_methods = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
    said = str(failed.value)
    now = "run 'run-y' holds it now, not touched" if meanwhile == "taken" else "nobody holds it now"
    if doubt == "served-then-500":
        assert type(failed.value) is AbortInDoubt
        assert said.startswith("the answer to marking run 'run-x' aborted was lost")
        assert "run 'run-x' perhaps marked (it released the lease since)" in said
    else:
        assert type(failed.value) is LockLost
        assert said.startswith("run 'run-x' no longer holds model 'digits', nothing marked")
    assert said.endswith(f"{now} ({lock.where})")
    held = lock.holding()
    if meanwhile == "taken":
        assert (held.holder, held.aborted) == ("run-y", "")
    else:
        assert held is None


@pytest.mark.parametrize("call", ["renew", "abort"])
def test_a_lease_write_refused_409_and_left_in_doubt_spends_one_budget_of_tries(kube, monkeypatch, call):
    """A renewal's or an abort's loop of 5 reads, each write refused (409) by another's meanwhile,
    ran inside ``settled``'s 4 tries of a write in doubt: up to 20 PUTs and 20 GETs, a retry loop
    inside another's (the project's rule: none). A 409 and a write in doubt spend the same tries
    (``mesh.WRITE_TRIES``), and the last error names both."""
    from vision_rollout import mesh
    from vision_rollout.mesh import WRITE_TRIES

    fake = kube[0]
    ticks = itertools.count(T0)
    lock = _doubted_lock(fake, lambda: next(ticks))  # type: ignore[arg-type]
    lock.acquire("run-a")
    monkeypatch.setattr(mesh.time, "sleep", lambda _: None)
    puts = itertools.count(1)

    def each_write() -> None:  # odd PUTs refused (another's write first), even ones answered 500 unserved
        if next(puts) % 2:
            fake.touch("leases", lock.namespace, lock.name, lambda o: None)
        else:
            fake.throttle, fake.throttle_status, fake.throttle_served = 1, 500, False
            fake.throttled_methods = frozenset({"PUT"})
        fake.before_write = each_write

    before = len(fake.requests)
    fake.before_write = each_write
    try:
        with pytest.raises(LockError) as failed:
            lock.renew("run-a") if call == "renew" else lock.abort("an operator's abort")
    finally:
        fake.before_write = None
        fake.throttle, fake.throttle_status, fake.throttle_served = 0, 429, False
        fake.throttled_methods = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
    assert [r["method"] for r in fake.requests[before:]].count("PUT") == WRITE_TRIES
    said = str(failed.value)
    assert f"(tried {WRITE_TRIES} times: 2 refused (409), the object written by another between its read" in said
    assert "2 answers left unknown whether the write was served" in said


def test_a_lock_names_the_command_that_removes_it_by_hand(tmp_path):
    """A run whose release of its lease failed (a Role without delete on leases, a read-only
    folder) left the model held until the lease ran out, its report saying only that: the
    operator had to work out what to delete. Each lock names the command that removes it
    (``by_hand``), which the report gives; run, it frees the model for another run."""
    import shlex
    import subprocess

    lock = FileLock("digits", tmp_path / "run folder" / "locks")
    lock.acquire("run-a")
    subprocess.run(shlex.split(lock.by_hand), check=True)
    assert FileLock("digits", tmp_path / "run folder" / "locks").acquire("run-b").holder == "run-b"
    lease = LeaseLock("My_Model.v2", "vision", None)
    assert lease.by_hand == f"kubectl -n vision delete lease {lease_name('My_Model.v2')}"


@pytest.mark.parametrize("served", [True, False], ids=["served", "not-served"])
def test_a_renewals_last_write_in_doubt_is_read_back_once(kube, served):
    """A renewal's replace answered 500 at each of its tries, the last one served: the last write
    in doubt was never read back (a lease's ``settled`` had no ``read_back``) and the renewal
    failed saying it "may have been served", the lease renewed. The last write in doubt is read
    back once by the renewal's own attempt, its write withheld: in place, the renewal's; not in
    place, said so ("read back once, not in place"), not "may have been served"."""
    from tests.support import in_doubt_each_time
    from vision_rollout.mesh import WRITE_TRIES

    fake = kube[0]
    clock = Clock()
    lock = _doubted_lock(fake, clock)
    lock.acquire("run-a")
    clock.now += 10
    before = len(fake.requests)
    in_doubt_each_time(fake, "PUT", f"/leases/{lease_name('digits')}", 500, WRITE_TRIES, served)
    try:
        if served:
            got = lock.renew("run-a", note="stage 1")
        else:
            with pytest.raises(LockError) as failed:
                lock.renew("run-a", note="stage 1")
    finally:
        fake.throttle, fake.throttle_status, fake.throttle_served, fake.before_write = 0, 429, False, None
        fake.throttled_methods, fake.throttled_path = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"}), None
    assert [r["method"] for r in fake.requests[before:]].count("PUT") == WRITE_TRIES
    if served:
        assert (got.holder, got.note, micro_time(got.renewed)) == ("run-a", "stage 1", micro_time(clock.now))
        assert lock.holding() == got
    else:
        said = str(failed.value)
        assert said.endswith("; the last read back once, not in place)")
        assert "may have been" not in said
        assert lock.holding().note == ""


def test_a_renewals_read_back_that_finds_the_lease_anothers_says_so(kube):
    """A renewal's replace answered 500 at each try, another run taking the lease as the last one
    failed: the read back read it (another's: ``LockLost``, what is so now) and ``settled``
    took that for "its read back failed", raising the replace's 500 ``LockError`` saying it "may
    have been served". The read back's definite answer is raised: ``LockLost``."""
    from tests.support import in_doubt_each_time
    from vision_rollout.mesh import WRITE_TRIES

    fake = kube[0]
    clock = Clock()
    lock = _doubted_lock(fake, clock)
    lock.acquire("run-a")
    clock.now += 10
    path = f"/leases/{lease_name('digits')}"
    in_doubt_each_time(fake, "PUT", path, 500, WRITE_TRIES, False)
    counted = fake.before_write
    seen = [0]

    def taken() -> None:  # (as the last replace arrives: run-b takes the lease)
        seen[0] += fake.requests[-1]["method"] == "PUT"
        counted()
        if seen[0] == WRITE_TRIES:
            fake.touch(
                "leases", lock.namespace, lease_name("digits"), lambda o: o["spec"].update(holderIdentity="run-b")
            )
        else:
            fake.before_write = taken

    fake.before_write = taken
    try:
        with pytest.raises(LockError) as failed:
            lock.renew("run-a", note="stage 1")
    finally:
        fake.throttle, fake.throttle_status, fake.throttle_served, fake.before_write = 0, 429, False, None
        fake.throttled_methods, fake.throttled_path = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"}), None
    assert type(failed.value) is LockLost
    assert "read back failed" not in str(failed.value)
    assert lock.holding().holder == "run-b"


def test_a_lease_read_failing_after_a_replace_in_doubt_keeps_maybe_written():
    """A replace answered 504, then the next try's read of the lease answered 500: that read's
    ``LockError`` (no RouterError) was raised as it came, saying nothing of the replace in doubt.
    As a RouterError's: "may have been served", ``maybe_written``."""
    from vision_rollout import mesh

    def attempt(doubted: int) -> None:
        failed = LockError(f"{'GET' if doubted else 'replace'} Lease rollout-digits: {500 if doubted else 504}")
        failed.status = 500 if doubted else 504
        if doubted:
            raise failed
        with mesh.unsettled():
            raise failed

    with pytest.raises(LockError) as raised:
        mesh.settled(attempt)
    assert str(raised.value).startswith("GET Lease rollout-digits: 500 (after 1 write whose answer left unknown")
    assert str(raised.value).endswith("it may have been served)")
    assert raised.value.maybe_written
