"""Where the rollout keeps what a reviewer reads after a run: a folder on this machine's disk or
a prefix in an object store.

The run folder (the connection's ``run_dir``) holds the shadow audits' reports and the Slack
reports that could not be posted (the outbox). In Kubernetes mode every task runs in a pod of
its own, whose disk goes with it: there ``run_dir`` is an object store URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``), like the prediction log's, written through
pyarrow's filesystems with the same credentials (``AWS_*`` in the environment, or the pod's
workload identity), never credentials in the URI: it is shown in logs and reports. Each file is
written whole or not at all: on a disk under a hidden name renamed into place, in an object
store as one PUT; in S3 a file is read in one GET (one version of it, whole) and a conditional
write's PUT carries its condition (``objects``: boto3, as pyarrow has neither).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

from model_server.files import (
    Listed,
    filesystem,
    folder_problem,
    list_folder,
    s3_client,
    store_errors,
    sync_folder,
    write_private,
)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = ["Folder", "NotAFile", "TooLarge", "WriteConflict", "folder_problem", "read_regular"]

log = logging.getLogger(__name__)

LOCK_WAIT_S = 10.0  # how long a conditional write waits for another one of the same file
# A guard file's lock refused with ESTALE (NFS: ``stale_guard``): not retried, the mount is to be fixed.
STALE_LOCK = (
    "on NFS, mount this folder with locking (neither nolock nor local_lock=flock or all) and "
    "lookupcache=none, as the README says"
)
# One listing of a folder (``names``, ``folders``, ``changed``) holds this many entries at most
# and begins no page of an object store's listing (S3's: ``LIST_PAGE`` keys) after ``LIST_S``: a
# folder of millions of files (or a hostile one) is listed in part (``complete`` false), never
# whole into memory, as the prediction log's reader lists (``list_folder``).
MAX_LISTED = 100_000
LIST_PAGE = 1000
LIST_S = 30.0


class Names(list[str]):
    """A listing's names; ``complete`` false when the folder was listed in part (``MAX_LISTED``,
    ``LIST_S``): a name not there may still be in the folder."""

    complete: bool = True


class Changed(dict[str, float]):
    """``changed``'s files and times; ``complete`` as ``Names``'."""

    complete: bool = True


_Found = TypeVar("_Found", Names, Changed)


def _listed(found: _Found, complete: bool) -> _Found:
    found.complete = complete
    return found


class WriteConflict(OSError):
    """A conditional write (``Folder.write_if``) found the file changed since it was read:
    nothing was written."""


class TooLarge(OSError):
    """A file holds more than its reader takes (``Folder.read_within``): read no further."""


class NotAFile(OSError):
    """What sits at a file's path on a disk is no regular file (a link, a named pipe, a device,
    a folder): not read. ``why`` says what it is."""

    def __init__(self, path: Path | str, why: str) -> None:
        super().__init__(f"{path} is {why}")
        self.why = why
        self.made = (path, why)

    def __reduce__(self) -> tuple[Any, ...]:  # (pickled, copied: made again as it was made)
        return type(self), self.made


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at ``path`` (``flags``: ``os.O_RDONLY``, or to write,
    with ``os.O_CREAT`` to create it), opened without following a link nor waiting for a named
    pipe's other end. NotAFile (an OSError naming it) for a link, a named pipe, a device or a
    folder there; FileNotFoundError when it is absent and not created."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        why = {errno.ELOOP: "a link", errno.EISDIR: "a folder", errno.ENXIO: "a named pipe"}.get(exc.errno or 0)
        if why:  # (ENXIO: a named pipe no process reads, or a socket, opened to write)
            raise NotAFile(path, f"{why}, not a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "a device")
            raise NotAFile(path, f"{kind}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, size: int = -1) -> bytes:
    """The regular file at ``path``, whole or its first ``size`` bytes (``open_regular``)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read(size)


def guard_file(path: Path, create: bool = True) -> BinaryIO:
    """The guard file at ``path`` that writers ``flock`` (created where absent; ``create``
    false: FileNotFoundError where there is none), opened to append as ``open_regular`` opens a
    file: a named pipe there is refused, not waited on."""
    return os.fdopen(open_regular(path, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)), "ab")


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"not a file or folder name: {name[:80]!r}")
    return name


@dataclass(frozen=True)
class Folder:
    """``uri`` (a path, or an object store URI with its options, such as
    ``s3://bucket/run?region=eu-west-1``) and the folders below it."""

    uri: str
    parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problem = folder_problem(self.uri)
        if problem:
            raise ValueError(f"not a folder: {problem}")

    def __truediv__(self, name: str) -> Folder:
        return Folder(self.uri, (*self.parts, _check_name(name)))

    def __str__(self) -> str:
        """Where it is, without the URI's options."""
        path = self.path
        return str(path) if path is not None else self._location()

    @property
    def path(self) -> Path | None:
        """Its path on this machine's disk; None in an object store."""
        if "://" not in self.uri:
            return Path(self.uri, *self.parts)
        if urlsplit(self.uri).scheme == "file":
            return Path(filesystem(self.uri)[1], *self.parts)
        return None

    def write(self, name: str, data: bytes) -> str:
        """``name`` in this folder holds ``data``, whole (replacing what was there); where it is.
        OSError when it cannot be written."""
        _check_name(name)
        path = self.path
        if path is not None:
            write_private(path / name, data)
            return str(path / name)
        fs, key = self._key(name)
        with store_errors(), fs.open_output_stream(key) as out:
            out.write(data)
        return self._location(name)

    def write_if(self, name: str, data: bytes, read: bytes | None) -> str:
        """``name`` holds ``data``, provided it still holds ``read`` (None: it is absent), as
        ``write`` writes it; WriteConflict, nothing written, when another writer changed it since.

        On a disk the comparison and the rename run under the lock of ``name`` (``_guard``: a
        killed writer's goes with its process), as a removal of it does (``delete``), so of
        two writers of what they both read, one writes and the other gets WriteConflict. In S3
        the file is read again with its ETag and put only if it is still that one (``If-Match``,
        ``If-None-Match: *`` for one absent), once the store is known to refuse such a PUT
        whose condition does not hold (``check_conditional``): the same, whatever the machines. In GCS it is read
        again just before its PUT, which has no condition there (pyarrow's): a writer whose PUT
        lands between that read and this one is not seen. On a disk the temporary files that
        writes of ``name`` killed mid-way left are removed (every writer of a file written so
        goes through here: none is writing it meanwhile)."""
        _check_name(name)
        self.check_conditional()
        where = self._location(name) if self.path is None else self.path / name
        with self._guard(name):
            try:
                now, etag = self._read(name, 0 if read is None else len(read))  # (a larger one differs)
            except FileNotFoundError:
                now, etag = None, None
            # (writes of it killed mid-way: none runs now; its guard file is this lock's, held)
            self.remove_temporaries(name.__eq__, time.time(), guards=False)
            if now != read:
                raise WriteConflict(f"{where} changed since it was read")
            if not self._s3():
                return self.write(name, data)
            from vision_rollout import objects

            fs, key = self._key(name)
            s3 = s3_client(self.uri, fs.region)
            if not objects.put_if(s3, key, data, etag) and not self._holds(s3, key, data):
                raise WriteConflict(f"{where} changed since it was read (by a write landing just before this one)")
            return str(where)

    def check_conditional(self) -> None:
        """In S3, ``objects.ConditionsIgnored`` (an OSError naming the store) unless the store
        refuses a PUT whose ``If-Match`` or ``If-None-Match`` does not hold, as ``write_if``
        needs: a store that ignores them (answering 200) lets two writers both win, unseen.
        Probed once per process and store, under the folder's URI (``objects.require_conditions``).
        Nothing on a disk (``flock``) or in GCS (best effort, as ``write_if`` says)."""
        if not self._s3():
            return
        from vision_rollout import objects

        fs, root = filesystem(self.uri)
        objects.require_conditions(s3_client(self.uri, fs.region), root)

    @staticmethod
    def _holds(s3: object, key: str, data: bytes) -> bool:
        """Whether the object holds ``data``: a conditional PUT answered as a conflict that was
        this one sent again by the client (its first answer lost), having landed."""
        from vision_rollout import objects

        try:
            return objects.get(s3, key, len(data))[0] == data
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def _guard(self, name: str, make: bool = True, gone: Path | None = None) -> Iterator[bool]:
        """On a disk, the lock of ``name`` held meanwhile (``write_if``'s, ``delete``'s): ``flock``
        of its guard file (``.<name>.lock``), made for the while and removed under the lock once
        done, so that none stays beside a file, nor keeps an emptied folder from being removed
        (``remove_if_empty``); a killed holder's, left, is pruned as a temporary is
        (``guarded_by``). A waiter that locks a guard file its holder removed meanwhile locks
        the one there now (``lock_guard``: one whose ``flock`` answers ESTALE too, NFS's answer for a
        file removed on another machine). True once held; ``make`` false: False, nothing locked,
        where this folder is not there (nor ``name`` in it). ``gone``: the file the holder removes
        (``delete``'s; its guard file, for a leftover one), whose removal an ESTALE's error calls
        done only where it is gone. An ESTALE removing, unlocking or closing the guard file while
        the holder's own error goes up (a WriteConflict) is logged, that error going up. In an
        object store, nothing (True)."""
        path = self.path
        if path is None:
            yield True
            return
        guard_path = path / f".{name}.lock"
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            if make:
                path.mkdir(parents=True, exist_ok=True)
            try:
                with stale_guard("opening", guard_path):
                    opened = guard_file(guard_path)
            except FileNotFoundError:  # (no folder: made again, or, not ``make``, nothing there)
                if not make:
                    yield False
                    return
                if time.monotonic() > deadline:  # (removed as often as it was made: a pruner's)
                    raise
                continue
            guard, done, leaving = opened, False, None
            try:
                with stale_guard("locking", guard_path):
                    locked = lock_guard(guard, guard_path, path / name, deadline)
                if not locked:  # (removed by its holder meanwhile)
                    continue
                try:
                    with stale_guard("looking up", guard_path):
                        held = _same_file(guard, guard_path)
                    if not held:  # (removed by its holder meanwhile)
                        continue
                    try:
                        yield True
                        done = True
                    except BaseException as exc:
                        leaving = exc
                        raise
                    finally:
                        with stale_guard("removing", guard_path, done, gone, leaving):
                            if _same_file(guard, guard_path):
                                guard_path.unlink()
                    return
                except BaseException as exc:
                    leaving = exc
                    raise
                finally:
                    with stale_guard("unlocking", guard_path, done, gone, leaving):
                        fcntl.flock(guard, fcntl.LOCK_UN)
            except BaseException as exc:
                leaving = exc
                raise
            finally:
                with stale_guard("closing", guard_path, done, gone, leaving):
                    guard.close()

    def read(self, name: str, limit: int | None = None) -> bytes:
        """``name`` in this folder, whole, or its first ``limit`` bytes and one more (a file
        larger reads as longer than ``limit``: one of gigabytes dropped there is read no
        further); in S3 as one version of it, read in one GET (a file replaced meanwhile is read
        as it was, or as it is, never a mix). FileNotFoundError when it is absent; on a disk,
        NotAFile (an OSError naming it) for a link, a named pipe, a device or a folder there,
        nothing read (``read_regular``)."""
        return self._read(name, limit)[0]

    def read_within(self, name: str, limit: int) -> bytes:
        """``name`` in this folder, whole, as ``read`` reads it; TooLarge (an OSError naming it)
        when it holds over ``limit`` bytes, having read ``limit`` and one more."""
        data = self.read(name, limit)
        if len(data) > limit:
            where = self._location(name) if self.path is None else self.path / name
            raise TooLarge(f"{where} holds over {limit} bytes: not a file this rollout wrote")
        return data

    def _read(self, name: str, limit: int | None = None) -> tuple[bytes, str | None]:
        """``name``'s bytes (``limit`` and one more at most) and, in S3, its ETag."""
        size = -1 if limit is None else limit + 1
        path = self.path
        if path is not None:
            return read_regular(path / _check_name(name), size), None
        fs, key = self._key(_check_name(name))
        if self._s3():
            from vision_rollout import objects

            return objects.get(s3_client(self.uri, fs.region), key, limit)
        with store_errors(), fs.open_input_stream(key) as f:
            return bytes(f.read(None if limit is None else size)), None

    def _s3(self) -> bool:
        return urlsplit(self.uri).scheme == "s3"

    def delete(self, name: str) -> None:
        """``name`` in this folder is gone; nothing when it was not there. NotAFile (an OSError
        naming it) when it is a folder (``check_files``), nothing removed. On a disk, removed
        under its lock (``_guard``), never between a ``write_if``'s read and its write (the
        write would bring it back: WriteConflict, nothing removed, where one holds it past
        ``LOCK_WAIT_S``); in S3 such a write's ``If-Match`` fails once it is gone. A temporary a
        write killed mid-way left (``.<name>.<pid>.tmp``) is removed without a lock, no guard
        file made beside it, as ``remove_temporaries`` removes one. On a disk the folder is
        synced once it is removed, under the lock (its guard file keeps another process's
        ``remove_if_empty`` from removing the folder first): a crash does not bring it back (a
        posted report, to be posted again)."""
        path = self.path
        if path is not None:
            self.check_files(name)
            if not os.path.lexists(path / name):  # (gone already: no lock made for nothing)
                return
            if temporary_of(name) is not None:  # (a killed write's: none waits on it, as ``remove_temporaries``)
                (path / name).unlink(missing_ok=True)
                return
            guarded = guarded_by(name)  # (a guard file a killed writer left: removed under its lock)
            with self._guard(guarded or name, make=False, gone=path / name) as there:
                if there and not guarded:
                    (path / name).unlink(missing_ok=True)
                if there:  # (gone for good, as a write is: synced under the lock, whose guard keeps the folder)
                    sync_folder(path)
            return
        import pyarrow.fs as pafs

        fs, key = self._key(_check_name(name))
        with store_errors():
            kind = fs.get_file_info(key).type
            if kind == pafs.FileType.File:
                fs.delete_file(key)
        if kind == pafs.FileType.Directory:
            raise NotAFile(self._location(name), "a folder, not a file: not removed")

    def check_files(self, *names: str) -> None:
        """NotAFile (an OSError naming it) for the first of ``names`` that is a folder here (in
        an object store, a prefix holding keys), ``delete`` refusing it; nothing otherwise (a
        file, or nothing there). One look each, not a listing: a caller removing several files
        checks them all before removing any."""
        import pyarrow.fs as pafs

        for name in names:
            _check_name(name)
            path = self.path
            if path is not None:
                try:
                    folder = stat.S_ISDIR((path / name).lstat().st_mode)
                except (FileNotFoundError, NotADirectoryError):
                    folder = False
                where: Path | str = path / name
            else:
                fs, key = self._key(name)
                with store_errors():
                    folder = fs.get_file_info(key).type == pafs.FileType.Directory
                where = self._location(name)
            if folder:
                raise NotAFile(where, "a folder, not a file: not removed")

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a file in this folder: one look, not a listing."""
        path = self.path
        if path is not None:
            return (path / _check_name(name)).is_file()
        import pyarrow.fs as pafs

        fs, key = self._key(_check_name(name))
        return bool(fs.get_file_info(key).type == pafs.FileType.File)

    def names(self, starting: str = "") -> Names:
        """The files in this folder (not below it) whose names begin with ``starting``, sorted;
        [] when it does not exist. Listed in part (``complete`` false) past ``MAX_LISTED`` entries
        or ``LIST_S``. In S3 only those names are listed (a request for each 1,000 of them: the
        keys' prefix); on a disk, and in GCS (pyarrow lists a folder whole), all are looked at."""
        path = self.path
        if path is not None:
            entries, complete = self._scan()
            names = (
                e.name for e in entries if e.name.startswith(starting) and not e.name.startswith(".") and _is(e.is_file)
            )  # (not one being written)
            return _listed(Names(sorted(names)), complete)
        listed, complete = self._listing(starting)
        return _listed(Names(sorted(e.name for e in listed if not e.folder)), complete)

    def folders(self) -> Names:
        """The folders in this folder (not below them), sorted; [] when it does not exist; listed
        in part as ``names`` says. On a disk, a link to a folder is none, nor is anything below a
        folder reached through one: what is removed below a folder never lies elsewhere."""
        path = self.path
        if path is not None:
            if self._through_link():
                return Names()
            entries, complete = self._scan()
            names = (e.name for e in entries if not e.name.startswith(".") and _is(e.is_dir, follow_symlinks=False))
            return _listed(Names(sorted(names)), complete)
        listed, complete = self._listing()
        return _listed(Names(sorted(e.name for e in listed if e.folder)), complete)

    def _scan(self) -> tuple[list[os.DirEntry[str]], bool]:
        """What this folder on a disk holds, ``MAX_LISTED`` entries at most (its hidden ones
        counted: a million of them listed in part too), and whether all; none when it is not a
        folder."""
        entries: list[os.DirEntry[str]] = []
        deadline = time.monotonic() + LIST_S
        try:
            with os.scandir(self.path) as found:
                for entry in found:
                    if len(entries) >= MAX_LISTED or (len(entries) % LIST_PAGE == 0 and time.monotonic() > deadline):
                        return entries, False
                    entries.append(entry)
        except (FileNotFoundError, NotADirectoryError):
            return [], True
        return entries, True

    def _listing(self, starting: str = "") -> tuple[list[Listed], bool]:
        """What an object store holds in this folder (not below it), its names beginning with
        ``starting``, as ``names`` lists it, and whether all."""
        fs, key = self._key()
        deadline = time.monotonic() + LIST_S
        try:
            listed, why = list_folder(
                fs, self.uri, key, lambda _: True, MAX_LISTED, LIST_PAGE, lambda: time.monotonic() > deadline, starting
            )
        except FileNotFoundError:  # (no such bucket: nothing there, as pyarrow lists it; ``check`` names it)
            return [], True
        return listed, why is None

    def remove_temporaries(
        self, ours: Callable[[str], object], before: float, dry_run: bool = False, guards: bool = True
    ) -> list[str]:
        """The temporary files (``.<name>.<pid>.tmp``) that writes killed mid-way left in this
        folder on a disk, and the guard files (``.<name>.lock``, ``guarded_by``) that writes and
        removals killed under their lock left (``_guard``'s: the file's next write or removal
        would remove it, but that may never come, and it keeps the folder from being removed),
        last changed before ``before`` (a ``time.time()``), removed: only those of the names
        ``ours`` is true of; their names (``dry_run``: of those that would go, none removed). A
        guard file is removed under its lock (``delete``), as ``prune`` removes one; ``guards``
        false: none looked at (``write_if``, holding its own). An object store leaves none."""
        path = self.path
        if path is None or not path.is_dir():
            return []
        removed: list[str] = []
        for tmp in path.iterdir():
            guarded = guarded_by(tmp.name) if guards else None
            of = temporary_of(tmp.name) or guarded
            if of is None or not ours(of) or not tmp.is_file() or (guarded and tmp.is_symlink()):
                continue
            if tmp.stat().st_mtime < before:
                if not dry_run and guarded:
                    self.delete(tmp.name)  # (under its lock: never while a holder holds it)
                elif not dry_run:
                    tmp.unlink(missing_ok=True)
                removed.append(tmp.name)
        return removed

    def changed(self) -> Changed:
        """The files in this folder (not below it) and when each last changed (unix seconds),
        those being written included (on a disk, the hidden temporaries); on a disk a link is
        none, nor is anything below a folder reached through one. {} when it does not exist.
        Listed in part (``complete`` false) as ``names`` says."""
        path = self.path
        if path is not None:
            if self._through_link():
                return Changed()
            entries, complete = self._scan()
            found = Changed()
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):  # (removed meanwhile)
                    if entry.is_file(follow_symlinks=False):
                        found[entry.name] = entry.stat(follow_symlinks=False).st_mtime
            return _listed(found, complete)
        listed, complete = self._listing()
        now = time.time()  # (a store that gives no time: taken for a file changed now, kept)
        found = Changed({e.name: e.mtime if e.mtime is not None else now for e in listed if not e.folder})
        return _listed(found, complete)

    def remove_older(
        self,
        before: float,
        ours: Callable[[str], object],
        limit: int,
        dry_run: bool = False,
        listed: Changed | None = None,
    ) -> list[str]:
        """The files in this folder that ``ours`` is true of last changed before ``before`` (a
        ``time.time()``) removed, the oldest ``limit`` at most; their names (``dry_run``: those
        that would go, none removed). A name no folder takes is left alone. Of a folder listed
        in part (``MAX_LISTED``, ``LIST_S``), of those listed (each of them that old). ``listed``:
        its ``changed()`` as the caller read it a moment ago, not listed again."""
        found = self.changed() if listed is None else listed
        stale = sorted((t, n) for n, t in found.items() if t < before and ours(n))
        gone: list[str] = []
        for _, name in stale:
            if len(gone) >= limit:
                break
            try:
                _check_name(name)
            except ValueError:
                continue
            if not dry_run:
                self.delete(name)
            gone.append(name)
        return gone

    def prune(
        self,
        before: float,
        ours: Callable[[str], object],
        limit: int,
        turn: int = 0,
        dry_run: bool = False,
        keep: Collection[str] = (),
    ) -> list[str]:
        """The folders in this folder in which nothing changed since ``before`` (a
        ``time.time()``: the last change of any file there, someone else's or a write in
        progress included) emptied of the files ``ours`` is true of and of the temporaries
        their writes killed mid-way left (``remove_older``), then removed once empty (one found
        empty, once it is itself that old): a file of someone else's, or a folder below, keeps
        one. ``limit`` of its folders are looked into, in turns: the ``turn``-th ``limit`` of
        them in name order (``turn`` the pass's number, such as the hour's: a pass over a
        million folders looks into ``limit``, and each folder has its turn). The names of those
        removed (``dry_run``: those that would be, nothing removed). The folders ``keep`` names
        are left as they are. A folder listed in part (``MAX_LISTED``, ``LIST_S``) is left as
        it is, nothing in it removed: a file not listed may be one changed since ``before``; of
        a folder whose folders are listed in part, those listed take their turns."""
        ours = with_leftovers(ours)
        names = [n for n in self.folders() if n not in keep]
        if len(names) > limit:
            first = turn * limit % len(names)
            names = (names[first:] + names[:first])[:limit]
        gone: list[str] = []
        for name in names:
            try:
                folder = self / name
            except ValueError:  # (a name no folder takes: not one this store wrote)
                continue
            files = folder.changed()
            if not files.complete:  # (a file not listed may have changed since: left as it is)
                continue
            if not files:  # (on a disk, its own time: a write may have just made it)
                if folder._made_before(before) and (not folder.folders() if dry_run else folder.remove_if_empty()):
                    gone.append(name)
                continue
            if max(files.values()) >= before:
                continue
            if dry_run:
                if all(ours(n) for n in files) and not folder.folders():
                    gone.append(name)
                continue
            folder.remove_older(before, ours, len(files))
            if folder.remove_if_empty():
                gone.append(name)
        return gone

    def _made_before(self, before: float) -> bool:
        """Whether, on a disk, this folder last changed before ``before`` (in an object store, a
        folder is no more than its files' prefix: always)."""
        path = self.path
        try:
            return path is None or path.lstat().st_mtime < before
        except FileNotFoundError:
            return False

    def _through_link(self) -> bool:
        """Whether, on a disk, one of its folders below its ``uri`` is a link."""
        path = Folder(self.uri).path
        for part in self.parts:
            path = path / part  # type: ignore[operator]
            if path.is_symlink():
                return True
        return False

    def remove_if_empty(self) -> bool:
        """This folder removed when it holds nothing (in an object store, the marker pyarrow
        leaves for the folder of a file it deleted); whether it is gone."""
        path = self.path
        if path is None:
            if self.names() or self.folders():
                return False
            import pyarrow.fs as pafs

            fs, key = self._key()
            with store_errors():
                if fs.get_file_info(key).type == pafs.FileType.Directory:
                    fs.delete_dir(key)
            return True
        try:
            path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:  # (not empty)
            return False
        return True

    def check(self) -> None:
        """OSError unless its object store answers and holds its bucket (a prefix need not exist
        before its first file; a folder on this disk is made when written). Listing a bucket
        that does not exist answers nothing, as an empty folder does: an empty listing has the
        bucket looked up, unless the credentials may not (rights on the prefix alone)."""
        if self.path is not None:
            return
        import pyarrow.fs as pafs

        if self._listing()[0]:
            return
        fs, key = self._key()
        bucket = key.split("/", 1)[0]
        try:
            missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError:
            return
        if missing:
            raise FileNotFoundError(f"no bucket {bucket[:80]!r} there")

    def _key(self, *name: str) -> tuple[pafs.FileSystem, str]:
        fs, root = filesystem(self.uri)
        return fs, "/".join((root, *self.parts, *name))

    def _location(self, *name: str) -> str:
        parts = urlsplit(self.uri)
        return "/".join((f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/"), *self.parts, *name))


def _is(test: Callable[..., bool], **options: bool) -> bool:
    """A directory entry's ``is_file``/``is_dir``: False for one removed meanwhile."""
    try:
        return test(**options)
    except FileNotFoundError:
        return False


def temporary_of(name: str) -> str | None:
    """The name of the file whose write left the temporary ``name`` (``.<name>.<pid>.tmp``);
    None when it is no temporary."""
    match = re.fullmatch(r"\.(.+)\.\d+\.tmp", name)
    return match[1] if match else None


def guarded_by(name: str) -> str | None:
    """The name of the file whose lock's guard file ``name`` is (``.<name>.lock``, ``_guard``'s:
    one a killed holder left); None when it is no guard file."""
    match = re.fullmatch(r"\.(.+)\.lock", name)
    return match[1] if match else None


def lock_guard(guard: BinaryIO, guard_path: Path, locked: Path, deadline: float) -> bool:
    """``flock`` of ``guard``, the guard file at ``guard_path`` of ``locked``, waited for until
    ``deadline`` (``time.monotonic``; WriteConflict past it). False where it answers ESTALE (NFS)
    for a guard file no longer at ``guard_path`` (removed by its holder on another machine) before
    ``deadline``: the caller locks the one there now. ESTALE of the guard file still there, or past
    ``deadline``: raised (``_guard`` names the file and the mount options to check: ``stale_guard``)."""
    while True:
        try:
            fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise WriteConflict(
                    f"{locked} is being written by another process for over {LOCK_WAIT_S:g} s"
                ) from None
            time.sleep(0.02)
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
            try:
                there = _same_file(guard, guard_path)
            except OSError:  # (the name, or this handle, not looked up: not the guard file held)
                there = False
            if not there and time.monotonic() <= deadline:
                return False
            raise


@contextlib.contextmanager
def stale_guard(
    doing: str,
    guard_path: Path,
    done: bool = False,
    gone: Path | None = None,
    leaving: BaseException | None = None,
) -> Iterator[None]:
    """An ESTALE (NFS) within, ``doing`` (opening, locking, ...) the guard file at ``guard_path``:
    an OSError (ESTALE still) naming them, the mount options to check (``STALE_LOCK``), and
    whether the write or removal under the lock was ``done`` (its holder's part; ``gone``: the
    file it removes, looked at then: done only where it is not found, not known where it cannot
    be looked at); logged instead where an error
    is already on its way out (``leaving``): that one goes up."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ESTALE:
            raise
        after = "the write or removal under its lock done" if done else "nothing written nor removed"
        if done and gone is not None:
            try:  # (gone where not found alone: a look-up that fails, ESTALE or EIO, knows nothing)
                os.lstat(gone)
                after = "nothing written nor removed"
            except FileNotFoundError:
                pass
            except OSError as looked:
                after = f"not known whether the write or removal under its lock was done ({gone}: {looked})"
        stale = OSError(errno.ESTALE, f"Stale file handle {doing} {guard_path}: {STALE_LOCK}; {after}")
        if leaving is None:
            raise stale from exc
        log.warning("%s (while %s: %s went up)", stale, type(leaving).__name__, leaving)


def _same_file(opened: BinaryIO, path: Path) -> bool:
    """Whether ``opened`` is the file at ``path`` still (not one removed, nor another made since)."""
    try:
        now = path.lstat()
    except FileNotFoundError:
        return False
    held = os.fstat(opened.fileno())
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def with_leftovers(ours: Callable[[str], object]) -> Callable[[str], bool]:
    """True of the names ``ours`` is, and of the temporaries and guard files (``_guard``'s
    ``.<name>.lock``) their writes and removals killed mid-way left (``remove_older`` removes
    a guard file under its lock, ``delete``)."""

    def of(name: str) -> str:
        return temporary_of(name) or guarded_by(name) or name

    return lambda name: bool(ours(of(name)))
