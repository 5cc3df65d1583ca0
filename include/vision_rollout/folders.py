"""Where the rollout keeps what a reviewer reads after a run: a folder on this machine's disk or
a prefix in an object store.

The run folder (the connection's ``run_dir``) holds the shadow audits' reports and the Slack
reports that could not be posted (the outbox). In Kubernetes mode every task runs in a pod of
its own, whose disk goes with it: there ``run_dir`` is an object store URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``), like the prediction log's, written through
pyarrow's filesystems with the same credentials (``AWS_*`` in the environment, or the pod's
workload identity), never credentials in the URI: it is shown in logs and reports. Each file is
written whole or not at all: on a disk under a hidden name renamed into place, in an object
store as one PUT.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from model_server.files import filesystem, folder_problem, write_private

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = ["Folder", "folder_problem"]


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
        with fs.open_output_stream(key) as out:
            out.write(data)
        return self._location(name)

    def read(self, name: str) -> bytes:
        path = self.path
        if path is not None:
            return (path / _check_name(name)).read_bytes()
        fs, key = self._key(_check_name(name))
        with fs.open_input_stream(key) as f:
            return bytes(f.read())

    def delete(self, name: str) -> None:
        """``name`` in this folder is gone; nothing when it was not there."""
        path = self.path
        if path is not None:
            (path / _check_name(name)).unlink(missing_ok=True)
            return
        import pyarrow.fs as pafs

        fs, key = self._key(_check_name(name))
        if fs.get_file_info(key).type == pafs.FileType.File:
            fs.delete_file(key)

    def names(self) -> list[str]:
        """The files in this folder (not below it), sorted; [] when it does not exist."""
        path = self.path
        if path is not None:
            names = [p.name for p in path.iterdir() if p.is_file()] if path.is_dir() else []
            return sorted(n for n in names if not n.startswith("."))  # not one being written
        import pyarrow.fs as pafs

        fs, key = self._key()
        infos = fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def folders(self) -> list[str]:
        """The folders in this folder (not below them), sorted; [] when it does not exist. On a
        disk, a link to a folder is none: what is removed below a folder never lies elsewhere."""
        path = self.path
        if path is not None:
            names = [p.name for p in path.iterdir() if p.is_dir() and not p.is_symlink()] if path.is_dir() else []
            return sorted(n for n in names if not n.startswith("."))
        import pyarrow.fs as pafs

        fs, key = self._key()
        infos = fs.get_file_info(pafs.FileSelector(key, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def remove_temporaries(self, ours: Callable[[str], object], before: float) -> int:
        """The temporary files (``.<name>.<pid>.tmp``) that writes killed mid-way left in this
        folder on a disk, last changed before ``before`` (a ``time.time()``), removed: only those
        of the names ``ours`` is true of; how many. An object store's PUT leaves none."""
        path = self.path
        if path is None or not path.is_dir():
            return 0
        removed = 0
        for tmp in path.iterdir():
            match = re.fullmatch(r"\.(.+)\.\d+\.tmp", tmp.name)
            if not match or not ours(match[1]) or not tmp.is_file():
                continue
            if tmp.stat().st_mtime < before:
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def remove_if_empty(self) -> bool:
        """This folder removed when it holds nothing (in an object store, the marker pyarrow
        leaves for the folder of a file it deleted); whether it is gone."""
        path = self.path
        if path is None:
            if self.names() or self.folders():
                return False
            import pyarrow.fs as pafs

            fs, key = self._key()
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

        fs, key = self._key()
        if fs.get_file_info(pafs.FileSelector(key, allow_not_found=True)):
            return
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
