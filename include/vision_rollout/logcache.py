"""A stage's prediction-log records kept between its pokes, so a poke reads only the files
written since the last one.

Each poke of a stage (a sensor's reschedule, possibly on another worker) read every log file
written since the stage began: an hour of 10 pods flushing every 2 s is 18,000 files a poke.
The log's files are named uniquely and never change once written, so what a poke read of a
file holds for every later poke of the stage. A stage's cache is a folder in a shared folder
(the run folder: a disk every worker mounts, or an object store) of Parquet parts, each the
records of the log files it covers (every record from the stage's start on, none cut at a
poke's end, in the files' order) and, in its metadata, those files with their record counts.
A poke reads the parts, lists the log, reads the files listed that no part covers, and writes
those files' records as a part of their own (one PUT, or a rename on a disk): what a poke
writes is the size of what it read new, not of the cache. A file two parts cover (two pokes at
once, a merge killed before removing what it merged) is taken once: its records are the same
in both. A poke killed while writing leaves no part, or a whole one; a part that cannot be
read or is not this stage's is read as none (and removed by the next poke that writes), and
a part removed between a poke's listing and its read is read as none. A stage's folder holding
more files than a listing takes (``folders.MAX_LISTED``: not one this module wrote) is neither
read nor written: its pokes read the log whole.

The parts are merged, so that a stage's cache keeps few of them while each record is written
a few times only: after a poke's write, the smallest parts are merged into one while the
larger part above them is no larger than they are together (each part then at least as large
as all smaller ones together: about log2 of the cache over a poke's part in parts), and all of
them once they pass ``MAX_PARTS``. A merge writes its part, then removes those it merged: two
merges at once, or one killed in between, leave parts covering the same files, taken once.

A poke's records are the same as ``read``'s: the covered files still listed, and the new ones,
in the order ``read`` concatenates them, cut at the poke's end. Files that could not be read
are never covered: every poke tries them again, and holds the stage as ``read``'s skips do.
A part is written only while the stage's cache stays under ``MAX_BYTES``; ``forget`` removes
a stage's cache when it ends, and each write removes the caches of stages started over
``MAX_AGE_S`` ago and all but the newest ``MAX_CACHES``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model_server.predictionlog import Shortfall, read_files, read_schema, to_frame
from vision_rollout.folders import Folder, Names

log = logging.getLogger(__name__)

MAX_BYTES = 256 * 1024 * 1024  # a stage's parts together; a part taking them over is not written
MAX_PARTS = 16  # a stage's cache with more parts than this has them all merged into one
MAX_AGE_S = 2 * 86400  # caches of stages started longer ago are removed
MAX_CACHES = 32  # and all but the newest this many
STAGE_NAME = re.compile(r"\d+-[0-9a-f]{24}")  # a stage's cache folder (the stage's start first)
CACHE_NAME = re.compile(r"\d+-[^\\]*\.parquet")  # a stage's cache written whole, by earlier versions
PART_NAME = re.compile(r"[0-9a-f]{32}\.parquet")
_META = b"vision_rollout.logcache"
_NEVER = datetime(9999, 1, 1, tzinfo=UTC)  # a cached file's records are kept whatever their time

Files = list[tuple[str, int, int]]  # (path, records, malformed records)


def name(uri: str, model: str, start: datetime, columns: Sequence[str]) -> str:
    """The cache's folder name for a stage's reads: the stage's start (seconds), then a hash of
    all that decides what a file's read gives."""
    key = json.dumps([str(uri), model, start.isoformat(), list(columns)])
    return f"{int(start.timestamp())}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


@dataclass(frozen=True)
class _Part:
    name: str
    size: int
    table: pa.Table
    files: Files


class _Crowded(Exception):
    """A stage's cache folder listed in part: neither read nor written."""


class _NoRoom(Exception):
    """A part whose records would take more than what is left of the read's memory bound."""


def _read_part(stage: Folder, cache: str, part: str, schema: pa.Schema, room: int | None = None) -> _Part:
    """The part's records and files; FileNotFoundError when it is gone, ValueError (or pyarrow's)
    when it is torn or not this stage's, _NoRoom when its records (by its footer) take more than
    ``room`` bytes (None: no bound)."""
    data = stage.read_within(part, MAX_BYTES)
    if room is not None:
        meta = pq.read_metadata(io.BytesIO(data))
        if sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) > room:
            raise _NoRoom(part)
    table = pq.read_table(io.BytesIO(data))
    meta = json.loads((table.schema.metadata or {})[_META])
    files = [(str(p), int(n), int(m)) for p, n, m in meta["files"]]
    table = table.replace_schema_metadata(None)
    if meta["name"] != cache or not table.schema.equals(schema) or sum(n for _, n, _ in files) != table.num_rows:
        raise ValueError("not this stage's records")
    return _Part(part, len(data), table, files)


def _load(
    stage: Folder,
    cache: str,
    schema: pa.Schema,
    max_bytes: int | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[_Part], list[str]]:
    """The stage's parts that read as its own, and the names of those that do not; none of a
    folder that cannot be listed. With ``max_bytes``, the parts whose records fit in it together
    (those beyond are read as none, left alone: their files are the log's to read). With
    ``deadline`` (a ``clock()``), a part's read begins only before it (a stalled store: each
    part's GET waits out its timeout); those not begun are read as none, left alone."""
    parts: list[_Part] = []
    bad: list[str] = []
    late = lambda: deadline is not None and clock() >= deadline  # noqa: E731
    try:
        listed = Names() if late() else stage.names()
    except OSError as exc:
        log.warning("log cache %s not used: %s", cache, str(exc)[:300])
        return parts, bad
    if not listed.complete:  # (a hostile folder: those not listed may be the newer parts)
        raise _Crowded(f"log cache {cache} not used: it holds more files than a listing takes (MAX_LISTED)")
    names = [n for n in listed if PART_NAME.fullmatch(n)]
    for i, part in enumerate(names):
        if late():
            log.warning(
                "log cache %s: %d of its %d parts not read: the poke's time was spent",
                cache,
                len(names) - i,
                len(names),
            )
            break
        room = None if max_bytes is None else max_bytes - sum(p.table.nbytes for p in parts)
        try:
            parts.append(_read_part(stage, cache, part, schema, room))
        except (FileNotFoundError, _NoRoom):  # (merged by another poke since the listing; no room)
            continue
        except OSError as exc:  # (the store refusing now: read as none, left alone)
            log.warning("log cache part %s/%s not used: %s", cache, part, str(exc)[:300])
        except Exception as exc:  # (a torn object, another version's: read as none, removed)
            log.warning("log cache part %s/%s not used: %s", cache, part, str(exc)[:300])
            bad.append(part)
    return parts, bad


def _covered(parts: list[_Part]) -> dict[str, tuple[pa.Table, int]]:
    """Each file the parts cover: its records and malformed records (a file two parts cover,
    once: its records are the same in both)."""
    covered: dict[str, tuple[pa.Table, int]] = {}
    for part in parts:
        offset = 0
        for path, rows, malformed in part.files:
            covered.setdefault(path, (part.table.slice(offset, rows), malformed))
            offset += rows
    return covered


def _encode(cache: str, segments: list[tuple[str, pa.Table, int]]) -> bytes:
    """A part of ``segments`` (path, records, malformed records), in path order."""
    segments = sorted(segments, key=lambda s: s[0])
    table = pa.concat_tables([t for _, t, _ in segments]).combine_chunks()
    meta = json.dumps({"name": cache, "files": [(p, t.num_rows, m) for p, t, m in segments]}).encode()
    out = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({_META: meta}), out, compression="zstd")
    return out.getvalue()


def _to_merge(sizes: dict[str, int]) -> list[str]:
    """The parts to merge: the smallest ones, while the next larger is no larger than they are
    together; all of them past ``MAX_PARTS``; none when fewer than two."""
    if len(sizes) > MAX_PARTS:
        return list(sizes)
    order = sorted(sizes, key=lambda n: (sizes[n], n), reverse=True)
    merge_from, tail = len(order), 0
    for i in range(len(order) - 1, 0, -1):
        tail += sizes[order[i]]
        if sizes[order[i - 1]] <= tail:
            merge_from = i - 1
    return order[merge_from:] if len(order) - merge_from >= 2 else []


def _write(
    folder: Folder, stage: Folder, cache: str, parts: list[_Part], bad: list[str], new: list[tuple[str, pa.Table, int]]
) -> None:
    """The poke's new files written as a part of their own, then the parts merged as
    ``_to_merge`` says, and the parts that did not read as this stage's removed."""
    data = _encode(cache, new)
    held = sum(p.size for p in parts)
    if held + len(data) > MAX_BYTES:
        log.info("log cache %s not written: %d bytes, over %d", cache, held + len(data), MAX_BYTES)
        return
    written = f"{uuid.uuid4().hex}.parquet"
    stage.write(written, data)
    for part in bad:
        stage.delete(part)
    sizes = {p.name: p.size for p in parts} | {written: len(data)}
    merged = set(_to_merge(sizes))
    if merged:
        covered = _covered([p for p in parts if p.name in merged])
        for path, _, _ in new if written in merged else []:
            covered.pop(path, None)
        segments = [(p, t, m) for p, (t, m) in covered.items()]
        segments += new if written in merged else []
        stage.write(f"{uuid.uuid4().hex}.parquet", _encode(cache, segments))
        for part in merged:
            stage.delete(part)
    _prune(folder, cache)


def _remove(folder: Folder, cache: str) -> None:
    """A stage's cache removed: a folder of parts (with temporaries and guard files of writes
    and removals killed mid-way: ``remove_temporaries``), or a cache file of earlier versions."""
    if CACHE_NAME.fullmatch(cache):
        folder.delete(cache)
        return
    stage = folder / cache
    for part in stage.names():
        stage.delete(part)
    stage.remove_temporaries(lambda _: True, time.time())
    stage.remove_if_empty()


def _caches(folder: Folder) -> list[str]:
    """The stages' caches in ``folder``: their folders, and the files of earlier versions."""
    return [n for n in folder.names() if CACHE_NAME.fullmatch(n)] + [
        n for n in folder.folders() if STAGE_NAME.fullmatch(n)
    ]


def _prune(folder: Folder, keep: str) -> None:
    names = [n for n in _caches(folder) if n != keep]
    names.sort(key=lambda n: int(n.split("-", 1)[0]), reverse=True)
    old = time.time() - MAX_AGE_S
    for i, n in enumerate(names):
        if i >= MAX_CACHES - 1 or int(n.split("-", 1)[0]) < old:
            _remove(folder, n)


def prune(folder: Folder, dry_run: bool = False) -> list[str]:
    """The caches in ``folder`` of stages started over ``MAX_AGE_S`` ago removed (a stage is
    decided within ``MAX_STAGE_SECONDS``: no running stage reads them), and the temporary files
    of cache writes killed mid-way (on a disk, up to ``MAX_BYTES`` each, which no listing of the
    caches sees) an hour old; the names of what went, a stage's temporaries as
    ``<stage>/<file>`` (``dry_run``: of what would go, nothing removed). For a folder no stage
    writes to any more (a killed run's caches wait for the next stage's write otherwise)."""
    old = time.time() - MAX_AGE_S
    caches = _caches(folder)
    stale = [n for n in caches if int(n.split("-", 1)[0]) < old]
    if not dry_run:
        for n in stale:
            _remove(folder, n)
    hour_ago = time.time() - 3600
    removed = stale + folder.remove_temporaries(CACHE_NAME.fullmatch, hour_ago, dry_run)
    for n in caches:
        if n not in stale and STAGE_NAME.fullmatch(n):
            removed += [f"{n}/{t}" for t in (folder / n).remove_temporaries(PART_NAME.fullmatch, hour_ago, dry_run)]
    return removed


def stage_records(
    folder: Folder,
    uri: str,
    start: datetime,
    end: datetime,
    model: str,
    columns: Sequence[str],
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_bytes: int | None = None,
) -> pd.DataFrame:
    """``read(uri, start, end, model, columns, written=True, max_bytes=max_bytes,
    deadline=deadline, clock=clock)``, reading only the files the stage's cache in ``folder``
    does not cover (those read before a deadline or ``max_bytes`` cut a poke's read short are
    covered for the next poke; the cache's parts are counted in ``max_bytes``: those beyond it
    are not read, their files the log's to read); ``attrs["files_opened"]``: the files read
    now. OSError when the log cannot be listed; a cache that cannot be read or written costs a
    full read, nothing more."""
    cache = name(uri, model, start, columns)
    stage = folder / cache
    schema = read_schema(columns, written=True)
    try:
        parts, bad = _load(stage, cache, schema, max_bytes, deadline, clock)
        usable = True
    except _Crowded as exc:
        log.warning("%s", exc)
        parts, bad, usable = [], [], False
    covered = _covered(parts)
    room = None if max_bytes is None else max(0, max_bytes - sum(p.table.nbytes for p in parts))
    _, listed, results = read_files(
        uri,
        start,
        _NEVER,
        model,
        columns,
        written=True,
        done=covered,
        listed_until=end,
        max_bytes=room,
        deadline=deadline,
        clock=clock,
    )
    new = [(r.path, r.table, r.malformed) for r in results if r.table is not None]
    if new and usable:
        try:
            _write(folder, stage, cache, parts, bad, new)
        except Exception as exc:
            log.warning("log cache %s not written: %s", cache, str(exc)[:300])
    reasons = {r.path: r.reason or "" for r in results if r.table is None and not r.unread}
    segments = sorted([(p, t, m) for p, (t, m) in covered.items()] + new, key=lambda s: s[0])
    still = set(listed)  # (a file gone from the log since, or in an hour not listed now: not read now)
    segments = [s for s in segments if s[0] in still]
    tables = [t for _, t, _ in segments if t.num_rows]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = table.filter(pc.less(table["time"], pa.scalar(end, table.schema.field("time").type)))
    df = to_frame(table, reasons, sum(m for _, _, m in segments), len(segments), str(uri), Shortfall.of(results))
    df.attrs["files_opened"] = len(results)
    return df


def forget(folder: Folder, uri: str, start: datetime, model: str, columns: Sequence[str]) -> None:
    """The stage's cache removed (its stage ended); a store refusing is a warning."""
    try:
        _remove(folder, name(uri, model, start, columns))
    except OSError as exc:
        log.warning("log cache of the stage from %s not removed: %s", start.isoformat(), str(exc)[:300])
