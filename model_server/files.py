"""Files the server writes: whole or not at all, readable by its own user only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from model_server.errors import StateNotSaved

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def write_private(path: Path, data: bytes | memoryview) -> None:
    """Write ``path`` atomically (a hidden temporary name, fsync, rename), mode 0600: records
    and policies hold masked values and routing that no other local user needs to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_state(path: Path, record: Any) -> None:
    """A state record as JSON (``write_private``); StateNotSaved if it cannot be written: the
    change it records is then not made."""
    try:
        write_private(path, json.dumps(record, indent=2).encode() + b"\n")
    except OSError as exc:
        raise StateNotSaved.writing(path, exc) from None


SCHEMES = ("file", "s3", "gs", "gcs")
_SECRET_OPTIONS = ("key", "secret", "token", "password", "credential")


def folder_problem(text: str) -> str | None:
    """What is wrong with ``text`` as a folder (a path, or a URI of ``SCHEMES`` with no
    credentials in it); None when nothing is. Never repeats the value."""
    if "://" not in text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in SCHEMES:
        return f"a folder, or a URI of {', '.join(s + '://' for s in SCHEMES)}, not {parts.scheme[:16]!r}://"
    if "@" in parts.netloc or any(
        word in key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True) for word in _SECRET_OPTIONS
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
    smaller than its part size as one PUT (without it, always as a multipart upload).
    """
    import pyarrow.fs as pafs  # (numpy with it: not at a DAG file's parse)

    text = str(uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), Path(text).resolve().as_posix()
    if text.startswith("s3://") and "allow_delayed_open=" not in text:
        text += ("&" if "?" in text else "?") + "allow_delayed_open=true"
    fs, path = pafs.FileSystem.from_uri(text)
    return fs, path.rstrip("/")
