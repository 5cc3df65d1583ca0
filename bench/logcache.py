"""A stage's pokes reading the prediction log whole vs through the stage's cache (logcache).

A log of ``--files`` files (as many pods' flushes since the stage began, ``--rows`` records
each, written by the real writer's layout), then a poke after ``--new`` more files: each way
in the same process, alternated ``--rounds`` times. Prints the ratios (files opened, seconds)
and writes ``bench/results/logcache.json``.
"""

from __future__ import annotations

import argparse
import statistics
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--new", type=int, default=20)
    p.add_argument("--rows", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
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
    result = {
        "files": args.files + args.rounds * args.new,
        "new_files_a_poke": args.new,
        "files_opened_whole_over_cached": opened[-1][0] / max(opened[-1][1], 1),
        "seconds_whole_over_cached": statistics.median(w / c for w, c in zip(whole_s, cached_s, strict=True)),
    }
    print(result)
    write_result(args.out, "logcache", result)


if __name__ == "__main__":
    main()
