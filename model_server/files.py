"""Files the server writes: whole or not at all, readable by its own user only."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qsl, unquote, urlsplit

from model_server.errors import StateNotSaved

if TYPE_CHECKING:
    import pyarrow.fs as pafs


class NotAFile(OSError):
    """A path to read that is no regular file: a folder, a FIFO, a device or a socket."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` open for reading, when it is a regular file (through links); NotAFile naming what
    it is otherwise. Opened without blocking and checked on the open file: a FIFO nobody writes
    (a shell's ``<(...)``, a named pipe) or a terminal held its reader in ``open`` or ``read`` for
    ever, and a device such as /dev/null read as an empty file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFile(errno.EINVAL, f"not a file ({_kind(mode)})", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, limit: int) -> bytes:
    """A regular file's bytes (``open_regular``); ValueError when it holds more than ``limit``."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes: not the file meant")
    return data


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is no file to read ("no such file", "not a file (a FIFO)"), or None: the
    check of an argument, before it is opened (``open_regular`` checks again)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None if stat.S_ISREG(mode) else f"not a file ({_kind(mode)})"


# What fsync of a folder answers on a filesystem that has nothing to sync there (some FUSE and
# network mounts): its entries are as durable as it makes them.
NO_FOLDER_SYNC = (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def sync_folder(path: Path) -> None:
    """``path``'s entries on disk: a file created, renamed or removed in it stays so after a
    crash (the file's own bytes need its fsync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in NO_FOLDER_SYNC:
            raise
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes | memoryview, mode: int = 0o600) -> None:
    """Write ``path`` atomically (a hidden temporary name, fsync, rename, the folder's fsync: a
    crash leaves the file as it was or whole, never half-written or lost once this returned),
    ``mode`` 0600 unless given: records and policies hold masked values and routing that no
    other local user needs to read. The folders it makes are synced in their own."""
    made = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for synced in (path.parent, *(m.parent for m in made)):
        sync_folder(synced)


def write_state(path: Path, record: Any) -> None:
    """A state record as JSON (``write_private``); StateNotSaved if it cannot be written: the
    change it records is then not made."""
    try:
        write_private(path, json.dumps(record, indent=2).encode() + b"\n")
    except OSError as exc:
        raise StateNotSaved.writing(path, exc) from None


SCHEMES = ("file", "s3", "gs", "gcs")
_SECRET_OPTIONS = ("key", "secret", "token", "password", "credential")


def _host(value: str) -> str:
    """The host part of an option's value read as a URL (``http://u:p@minio:9000``,
    ``u:p@minio:9000``); a path has none."""
    return urlsplit(value if "://" in value else "//" + value).netloc if not value.startswith("/") else ""


def folder_problem(text: str) -> str | None:
    """What is wrong with ``text`` as a folder (a path, or a URI of ``SCHEMES`` with no
    credentials in it); None when nothing is. Never repeats the value."""
    if "\x00" in text:  # (no file system takes one: a ValueError at the first open, naming nothing)
        return "a NUL character in it"
    if "://" not in text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES:
        return f"a folder, or a URI of {', '.join(s + '://' for s in SCHEMES)}, not {parts.scheme[:16]!r}://"
    options = parse_qsl(parts.query, keep_blank_values=True)
    if (
        "@" in parts.netloc
        or any(word in key.lower() for key, _ in options for word in _SECRET_OPTIONS)
        or any("@" in _host(value) for _, value in options)  # endpoint_override=http://user:password@host
    ):
        return "credentials in the URI (they would be in logs and reports): they come from the environment"
    if parts.fragment:
        return "a URI with a fragment (#)"
    return None


def location(uri: str | Path) -> str:
    """Where a folder path or URI points, as one string two are compared by: ``file://`` and
    the absolute path, or the scheme (``gcs`` as ``gs``), bucket and prefix. Never its
    credentials, options or endpoint: it is shown to anyone who asks the server."""
    text = str(uri)
    if "://" not in text:
        return "file://" + Path(text).resolve().as_posix()
    parts = urlsplit(text)
    if parts.scheme == "file":
        return "file://" + Path(unquote(parts.path)).resolve().as_posix()
    scheme = "gs" if parts.scheme == "gcs" else parts.scheme
    bucket = parts.netloc.rsplit("@", 1)[-1]
    return f"{scheme}://{bucket}/{parts.path.strip('/')}".rstrip("/")


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and root path for a folder path, ``file://`` or ``s3://`` URI.

    On S3, ``allow_delayed_open`` unless the URI says otherwise: with it, pyarrow sends an object
    smaller than its part size as one PUT (without it, always as a multipart upload). And its
    requests wait ``CONNECT_TIMEOUT_S`` to connect and ``READ_TIMEOUT_S`` for the next bytes, as
    boto3's do: pyarrow's own (about 30 s, tried three times) held a read of a store that accepts
    and never answers for about 100 s a request. Not under ``tls_verify_certificates``, which
    pyarrow takes from a URI only (its own waits then). On GCS, ``retry_limit_seconds``
    (``GCS_RETRY_LIMIT_S``) unless the URI says otherwise: pyarrow's client retried a call it
    could not make (no credentials reachable, a store not answering) for 15 minutes.
    """
    import pyarrow.fs as pafs  # (numpy with it: not at a DAG file's parse)

    text = str(uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), Path(text).resolve().as_posix()
    if text.startswith("s3://") and "allow_delayed_open=" not in text:
        text += ("&" if "?" in text else "?") + "allow_delayed_open=true"
    if text.startswith(("gs://", "gcs://")) and "retry_limit_seconds=" not in text:
        text += ("&" if "?" in text else "?") + f"retry_limit_seconds={GCS_RETRY_LIMIT_S:g}"
    fs, path = pafs.FileSystem.from_uri(text)
    if isinstance(fs, pafs.S3FileSystem) and "tls_verify_certificates" not in dict(parse_qsl(urlsplit(text).query)):
        rebuild, (options,) = fs.__reduce__()  # (what the URI set, the region it resolved; pickle's way)
        fs = rebuild({**options, "connect_timeout": CONNECT_TIMEOUT_S, "request_timeout": READ_TIMEOUT_S})
    return fs, path.rstrip("/")


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """pyarrow's error of an object store's call that is neither an OSError nor a ValueError
    (``ArrowInvalid``: a URI it does not read) as an OSError: GCS's permanent failures of
    google-cloud-cpp's UNKNOWN status (a credentials file it cannot load) come as a bare
    ``ArrowException``, which every "the store cannot be read" missed."""
    import pyarrow as pa

    try:
        yield
    except pa.ArrowException as exc:
        if isinstance(exc, (OSError, ValueError)):
            raise
        raise OSError(str(exc).split(" error_info=", 1)[0][:800]) from None


# The S3 client of boto3 (conditional writes, one-GET reads, paged listings: what pyarrow's
# filesystems do not do). A store that accepts and never answers: boto3's defaults (60 s, 60 s,
# retried) held a call for three minutes, a poke's lease (300 s) for several. A read's wait is
# for the next bytes, not the whole object: a large one read at any speed is not cut.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
ATTEMPTS = 3  # (boto3's "standard" retries: throttling and 5xx answers too, with backoff)
GCS_RETRY_LIMIT_S = 30.0  # how long pyarrow's GCS client retries a call (a request that stalls waits on, 2 min)


@functools.cache
def _s3_client(pid: int, endpoint: str | None, region: str, verify: bool | str) -> Any:
    """One client per process (a forked worker does not share its parent's connections)."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"} if endpoint else {},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"total_max_attempts": ATTEMPTS, "mode": "standard"},
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region or None, verify=verify, config=config
    )


def s3_client(uri: str, region: str) -> Any:
    """The S3 client for the folder ``uri`` (its options as pyarrow's S3 filesystem takes them:
    ``endpoint_override``, ``scheme``, ``tls_ca_file_path``, ``tls_verify_certificates``, with
    path-style addressing under an endpoint override), in ``region`` (the one pyarrow resolved);
    credentials from boto3's default chain, as pyarrow's from AWS's."""
    options = dict(parse_qsl(urlsplit(uri).query))
    endpoint = options.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{options.get('scheme', 'https')}://{endpoint}"
    verify: bool | str = options.get("tls_ca_file_path") or options.get(
        "tls_verify_certificates", "true"
    ).lower() not in ("false", "0", "no")
    return _s3_client(os.getpid(), endpoint, region, verify)


@dataclass(frozen=True)
class Listed:
    """One entry of an object store's folder, as ``list_folder`` lists it."""

    name: str
    folder: bool
    size: int
    mtime: float | None  # (unix seconds; None where the store gives none)


def list_folder(
    fs: pafs.FileSystem,
    uri: str,
    path: str,
    keep: Callable[[Listed], bool],
    limit: int,
    page: int,
    expired: Callable[[], bool] | None = None,
    starting: str = "",
) -> tuple[list[Listed], str | None]:
    """The entries of the object store's folder ``path`` (files and folders, not below them) whose
    names begin with ``starting`` that ``keep`` takes, at most ``limit`` (in S3 only those are
    listed, by the keys' prefix); and why not all: "crowded" (more than ``limit``), or
    "unlisted" (``expired()`` true between two pages), None when all. In S3 by pages of ``page``
    keys (boto3's paged listing: never more than a page beyond ``limit`` in memory; an OSError when
    it fails, FileNotFoundError when its bucket does not exist); elsewhere (GCS) pyarrow lists it
    whole first."""
    import pyarrow.fs as pafs

    found: list[Listed] = []
    if isinstance(fs, pafs.S3FileSystem):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = path.partition("/")
        pages = s3_client(uri, fs.region).get_paginator("list_objects_v2")
        try:
            for answer in pages.paginate(
                Bucket=bucket, Prefix=f"{key}/{starting}", Delimiter="/", PaginationConfig={"PageSize": page}
            ):
                entries = [
                    Listed(p["Prefix"].rstrip("/").rsplit("/", 1)[-1], True, 0, None)
                    for p in answer.get("CommonPrefixes", ())
                ]
                for item in answer.get("Contents", ()):
                    modified = item.get("LastModified")
                    name = item["Key"].rsplit("/", 1)[-1]
                    mtime = modified.timestamp() if modified is not None else None
                    entries.append(Listed(name, False, int(item.get("Size") or 0), mtime))
                for entry in entries:
                    if entry.name and keep(entry):  # (not the folder's own marker, key/)
                        if len(found) >= limit:
                            return found, "crowded"
                        found.append(entry)
                if answer.get("IsTruncated") and expired is not None and expired():
                    return found, "unlisted"
        except (BotoCoreError, ClientError) as exc:
            missing = isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") == "NoSuchBucket"
            raise (FileNotFoundError if missing else OSError)(f"listing s3://{path}: {exc}") from None
        return found, None
    with store_errors():
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    for info in infos:
        if info.type not in (pafs.FileType.File, pafs.FileType.Directory):
            continue
        mtime = info.mtime.timestamp() if info.mtime is not None else None
        entry = Listed(info.base_name, info.type == pafs.FileType.Directory, info.size or 0, mtime)
        if entry.name.startswith(starting) and keep(entry):
            if len(found) >= limit:
                return found, "crowded"
            found.append(entry)
    return found, None
