"""A stage's prediction-log records kept between its pokes, so a poke reads only the files
written since the last one.

Each poke of a stage (a sensor's reschedule, possibly on another worker) read every log file
written since the stage began: an hour of 10 pods flushing every 2 s is 18,000 files a poke.
The log's files are named uniquely and never change once written, so what a poke read of a
file holds for every later poke of the stage. A stage's cache is one Parquet object in a
shared folder (the run folder: a disk every worker mounts, or an object store): the records
of the files it covers (every record from the stage's start on, none cut at a poke's end, in
the files' order) and, in its metadata, those files with their record counts. A poke reads the
cache, lists the log, reads the files listed that the cache does not cover, and writes the
cache back whole (one PUT, or a rename on a disk): a poke killed while writing leaves the
previous cache; a cache that cannot be read or is not this stage's is read as no cache. Two
pokes at once each write a cache consistent in itself (its files and their records, together):
the last one stays, and the files only the other covered are read again by the next poke.

A poke's records are the same as ``read``'s: the covered files still listed, and the new ones,
in the order ``read`` concatenates them, cut at the poke's end. Files that could not be read
are never covered: every poke tries them again, and holds the stage as ``read``'s skips do.
A cache is written only while under ``MAX_BYTES``; ``forget`` removes a stage's when it ends,
and each write removes the caches of stages started over ``MAX_AGE_S`` ago and all but the
newest ``MAX_CACHES``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model_server.predictionlog import read_files, read_schema, to_frame
from vision_rollout.folders import Folder

log = logging.getLogger(__name__)

MAX_BYTES = 256 * 1024 * 1024  # a cache larger than this is not written (the previous one stays)
MAX_AGE_S = 2 * 86400  # caches of stages started longer ago are removed
MAX_CACHES = 32  # and all but the newest this many
CACHE_NAME = re.compile(r"\d+-[^\\]*\.parquet")  # (name's: the stage's start first; a folder takes no backslash)
_META = b"vision_rollout.logcache"
_NEVER = datetime(9999, 1, 1, tzinfo=UTC)  # a cached file's records are kept whatever their time


def name(uri: str, model: str, start: datetime, columns: Sequence[str]) -> str:
    """The cache's name for a stage's reads: the stage's start (seconds), then a hash of all that
    decides what a file's read gives."""
    key = json.dumps([str(uri), model, start.isoformat(), list(columns)])
    return f"{int(start.timestamp())}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.parquet"


def _load(folder: Folder, cache: str, schema: pa.Schema) -> tuple[pa.Table, list[tuple[str, int, int]]]:
    """The cache's records and its files (path, records, malformed records); nothing for a
    cache absent, unreadable, torn, or of other records."""
    nothing: tuple[pa.Table, list[tuple[str, int, int]]] = (schema.empty_table(), [])
    try:
        table = pq.read_table(io.BytesIO(folder.read(cache)))
        meta = json.loads((table.schema.metadata or {})[_META])
        files = [(str(p), int(n), int(m)) for p, n, m in meta["files"]]
        table = table.replace_schema_metadata(None)
        if meta["name"] != cache or not table.schema.equals(schema) or sum(n for _, n, _ in files) != table.num_rows:
            raise ValueError("not this stage's records")
    except FileNotFoundError:
        return nothing
    except Exception as exc:  # (a torn object, another version's: read as none, rewritten)
        log.warning("log cache %s not used: %s", cache, str(exc)[:300])
        return nothing
    return table, files


def _store(folder: Folder, cache: str, table: pa.Table, files: list[tuple[str, int, int]]) -> None:
    meta = json.dumps({"name": cache, "files": files}).encode()
    out = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({_META: meta}), out, compression="zstd")
    if out.tell() > MAX_BYTES:
        log.info("log cache %s not written: %d bytes, over %d", cache, out.tell(), MAX_BYTES)
        return
    folder.write(cache, out.getvalue())
    _prune(folder, cache)


def _prune(folder: Folder, keep: str) -> None:
    names = [n for n in folder.names() if CACHE_NAME.fullmatch(n) and n != keep]
    names.sort(key=lambda n: int(n.split("-", 1)[0]), reverse=True)
    old = time.time() - MAX_AGE_S
    for i, n in enumerate(names):
        if i >= MAX_CACHES - 1 or int(n.split("-", 1)[0]) < old:
            folder.delete(n)


def prune(folder: Folder) -> int:
    """The caches in ``folder`` of stages started over ``MAX_AGE_S`` ago removed (a stage is
    decided within ``MAX_STAGE_SECONDS``: no running stage reads them), and the temporary files
    of cache writes killed mid-way (on a disk, up to ``MAX_BYTES`` each, which no listing of the
    caches sees) an hour old; how many files went. For a folder no stage writes to any more
    (a killed run's caches wait for the next stage's write otherwise)."""
    old = time.time() - MAX_AGE_S
    stale = [n for n in folder.names() if CACHE_NAME.fullmatch(n) and int(n.split("-", 1)[0]) < old]
    for n in stale:
        folder.delete(n)
    return len(stale) + folder.remove_temporaries(CACHE_NAME.fullmatch, time.time() - 3600)


def stage_records(
    folder: Folder, uri: str, start: datetime, end: datetime, model: str, columns: Sequence[str]
) -> pd.DataFrame:
    """``read(uri, start, end, model, columns, written=True)``, reading only the files the
    stage's cache in ``folder`` does not cover; ``attrs["files_opened"]``: the files read now.
    OSError when the log cannot be listed; a cache that cannot be read or written costs a
    full read, nothing more."""
    cache = name(uri, model, start, columns)
    schema = read_schema(columns, written=True)
    cached, covered = _load(folder, cache, schema)
    _, listed, results = read_files(
        uri, start, _NEVER, model, columns, written=True, done={p for p, _, _ in covered}, listed_until=end
    )
    segments: list[tuple[str, pa.Table, int]] = []
    offset = 0
    for path, rows, malformed in covered:
        segments.append((path, cached.slice(offset, rows), malformed))
        offset += rows
    reasons = {r.path: r.reason or "" for r in results if r.table is None}
    segments += [(r.path, r.table, r.malformed) for r in results if r.table is not None]
    segments.sort(key=lambda s: s[0])
    if any(r.table is not None for r in results):
        table = pa.concat_tables([t for _, t, _ in segments]) if segments else schema.empty_table()
        try:
            _store(folder, cache, table.combine_chunks(), [(p, t.num_rows, m) for p, t, m in segments])
        except Exception as exc:
            log.warning("log cache %s not written: %s", cache, str(exc)[:300])
    still = set(listed)  # (a file gone from the log since, or in an hour not listed now: not read now)
    segments = [s for s in segments if s[0] in still]
    tables = [t for _, t, _ in segments if t.num_rows]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = table.filter(pc.less(table["time"], pa.scalar(end, table.schema.field("time").type)))
    df = to_frame(table, reasons, sum(m for _, _, m in segments), len(segments), str(uri))
    df.attrs["files_opened"] = len(results)
    return df


def forget(folder: Folder, uri: str, start: datetime, model: str, columns: Sequence[str]) -> None:
    """The stage's cache removed (its stage ended); a store refusing is a warning."""
    try:
        folder.delete(name(uri, model, start, columns))
    except OSError as exc:
        log.warning("log cache of the stage from %s not removed: %s", start.isoformat(), str(exc)[:300])
