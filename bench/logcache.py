"""A stage's pokes reading the prediction log whole vs through the stage's cache (logcache),
and the cache written whole each poke (as of ``--before``, a commit) vs in parts.

A log of ``--files`` files (as many pods' flushes since the stage began, ``--rows`` records
each, written by the real writer's layout), then a poke after ``--new`` more files: each way
in the same process, alternated ``--rounds`` times. Then ``--pokes`` pokes after ``--new`` more
files each, through the cache written whole and through the cache in parts, alternated: the
bytes each writes and its seconds. Prints the ratios and writes ``bench/results/logcache.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "include"))

from bench import write_result  # noqa: E402
from model_server.predictionlog import GATE_COLUMNS, SCHEMA, read  # noqa: E402
from vision_rollout.folders import Folder  # noqa: E402
from vision_rollout.logcache import stage_records  # noqa: E402


def flush(root: Path, t: float, rows: int) -> None:
    """One file of ``rows`` records received just before ``t``, named as the writer names it."""
    hour = datetime.fromtimestamp(t, UTC)
    folder = root / "model=digits" / f"dt={hour:%Y-%m-%d}" / f"hour={hour:%H}"
    folder.mkdir(parents=True, exist_ok=True)
    times = [datetime.fromtimestamp(t - 2 + 2 * i / rows, UTC) for i in range(rows)]
    cols = {
        "time": pa.array(times, SCHEMA.field("time").type),
        "model": pa.array(["digits"] * rows),
        "version": pa.array(["1", "2"] * (rows // 2) + ["1"] * (rows % 2)),
        "role": pa.array(["primary"] * rows),
        "route": pa.array(["route"] * rows),
        "request_id": pa.array([uuid.uuid4().hex for _ in range(rows)]),
        "item": pa.array([0] * rows, SCHEMA.field("item").type),
        "latency_ms": pa.array([5.0] * rows, SCHEMA.field("latency_ms").type),
        "outcome": pa.array(["ok"] * rows),
    }
    table = pa.table([cols.get(f.name, pa.nulls(rows, f.type)) for f in SCHEMA], schema=SCHEMA)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))
    pq.write_table(table, folder / f"part-pod-{uuid.uuid4().hex[:4]}-{stamp}-{uuid.uuid4().hex[:12]}.parquet")


def whole_cache(commit: str):
    """The ``stage_records`` of ``logcache`` as of ``commit`` (its cache written whole)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:include/vision_rollout/logcache.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("logcache_before", loader=None)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    exec(compile(source, "logcache_before.py", "exec"), module.__dict__)
    return module.stage_records


def pokes(root: Path, tmp: Path, args: argparse.Namespace, t0: float, start: datetime, before) -> dict:
    """``--pokes`` pokes after ``--new`` files each, through both caches alternated: the bytes
    each wrote and its seconds."""
    written = [0]
    write = Folder.write

    def counted(self: Folder, name: str, data: bytes) -> str:
        written[0] += len(data)
        return write(self, name, data)

    ways = {"whole": before, "parts": stage_records}
    caches = {w: Folder(str(tmp / f"pokes-{w}")) for w in ways}
    now = datetime.fromtimestamp(time.time(), UTC)
    for w, read_through in ways.items():
        read_through(caches[w], str(root), start, now, "digits", GATE_COLUMNS)  # (the earlier pokes)
    took: dict[str, list[float]] = {w: [] for w in ways}
    wrote: dict[str, list[int]] = {w: [] for w in ways}
    Folder.write = counted  # type: ignore[method-assign]
    try:
        for k in range(args.pokes):
            for i in range(args.new):
                flush(root, t0 + 5400 + 2 * (k * args.new + i + 1), args.rows)
            now = datetime.fromtimestamp(time.time(), UTC)
            for w in ways if k % 2 == 0 else reversed(ways):
                written[0] = 0
                began = time.perf_counter()
                got = ways[w](caches[w], str(root), start, now, "digits", GATE_COLUMNS)
                took[w].append(time.perf_counter() - began)
                wrote[w].append(written[0])
                assert got.attrs["files_opened"] == args.new
    finally:
        Folder.write = write  # type: ignore[method-assign]
    cache_bytes = {w: sum(p.stat().st_size for p in Path(caches[w].uri).rglob("*") if p.is_file()) for w in ways}
    return {
        "pokes": args.pokes,
        "records_cached": (args.files + args.rounds * args.new + args.pokes * args.new) * args.rows,
        "cache_bytes_whole_vs_parts": [cache_bytes["whole"], cache_bytes["parts"]],
        "bytes_written_a_poke_median_whole_vs_parts": [statistics.median(wrote[w]) for w in ways],
        "bytes_written_a_poke_max_whole_vs_parts": [max(wrote[w]) for w in ways],
        "bytes_written_whole_over_parts": sum(wrote["whole"]) / max(sum(wrote["parts"]), 1),
        "seconds_a_poke_median_whole_vs_parts": [statistics.median(took[w]) for w in ways],
        "seconds_a_poke_max_whole_vs_parts": [max(took[w]) for w in ways],
        "seconds_whole_over_parts": sum(took["whole"]) / sum(took["parts"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--new", type=int, default=20)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pokes", type=int, default=10)
    p.add_argument("--before", default="2ff4bb4", help="the commit whose cache is written whole")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "logcache.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, t0 = Path(tmp) / "log", time.time() - 3 * 3600
        start = datetime.fromtimestamp(t0, UTC)
        for i in range(args.files):
            flush(root, t0 + 2 + i * 3600 / args.files, args.rows)
        whole_s, cached_s, opened = [], [], []
        for r in range(args.rounds):
            cache = Folder(str(Path(tmp) / f"run-{r}"))
            end = datetime.fromtimestamp(time.time(), UTC)
            stage_records(cache, str(root), start, end, "digits", GATE_COLUMNS)  # the earlier pokes
            for i in range(args.new):
                flush(root, t0 + 3600 + 2 * (r * args.new + i + 1), args.rows)
            end = datetime.fromtimestamp(time.time(), UTC)
            began = time.perf_counter()
            whole = read(str(root), start, end, "digits", GATE_COLUMNS, written=True)
            whole_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            cached = stage_records(cache, str(root), start, end, "digits", GATE_COLUMNS)
            cached_s.append(time.perf_counter() - began)
            assert len(cached) == len(whole)
            opened.append((whole.attrs["files_read"], cached.attrs["files_opened"]))
        compared = pokes(root, Path(tmp), args, t0, start, whole_cache(args.before))
    result = {
        "files": args.files + args.rounds * args.new,
        "new_files_a_poke": args.new,
        "files_opened_whole_over_cached": opened[-1][0] / max(opened[-1][1], 1),
        "seconds_whole_over_cached": statistics.median(w / c for w, c in zip(whole_s, cached_s, strict=True)),
        "cache_written_whole_vs_in_parts": {"before": args.before, **compared},
    }
    print(result)
    write_result(args.out, "logcache", result)


if __name__ == "__main__":
    main()
