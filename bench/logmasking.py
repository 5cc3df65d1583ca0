"""The masking of what a request writes, at earlier commits and at this tree, side by side in one process.

With ``--logs`` (``bench/versus.py``) a ``tiny`` request from ``tritonclient`` writes an access-log
line (``trace.log_access``'s JSON, masked by the ``LogMasking`` filter on the request path) and a
prediction-log record (its request id masked in the writer's flush, ``PredictionLog._mask_ids``;
its metadata, none from this client, is cached). Each ``--base`` revision's ``model_server`` is
exported with ``git archive`` and imported under a name of its own (``ms_<commit>``, its imports
rewritten), this tree's as ``model_server``; every arm masks the same lines (random ids as the
server makes them, the one digest of the one tensor this client sends again) and the same ids,
in rotating order, rounds of ``--lines``; medians of per-round ratios against the first base.
Each arm's writer also takes those requests' records (``append``, then one ``flush``: masking,
hashing, top-k, Parquet, the file's write into its hour's folder, made in the first round), in
this thread's CPU time. Prints microseconds a line, an id and a record, writes
``bench/results/logmasking.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from bench.peers import make_case  # noqa: E402
from bench.versus import export  # noqa: E402


def import_revision(revision: str, tmp: Path) -> tuple[str, str]:
    """``revision``'s model_server, importable as ``ms_<commit>``: (that name, the commit)."""
    commit = export(revision, tmp / revision)
    name = f"ms_{commit[:7]}"
    package = tmp / "packages" / name
    package.mkdir(parents=True)
    for source in (tmp / revision / "model_server").glob("*.py"):
        text = re.sub(r"\bmodel_server\b", name, source.read_text())
        (package / source.name).write_text(text)
    return name, commit


def load(package: str) -> tuple[Any, Any, Any]:
    """Its masking, prediction log and trace modules (each arm's metrics in a registry of its own)."""
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):
        REGISTRY.unregister(collector)
    return tuple(importlib.import_module(f"{package}.{m}") for m in ("masking", "predictionlog", "trace"))  # type: ignore[return-value]


def access_lines(trace: Any, n: int) -> list[str]:
    """``n`` access-log lines as ``log_access`` writes them for ``tiny`` batch 1 from tritonclient."""
    digest = trace.item_hashes(make_case("tiny", 1).x, True)
    lines = []
    for i in range(n):
        ids = trace.TraceContext.from_header(None)
        record = {
            "path": "primary",
            "model": "tiny",
            "version": "1",
            "request_id": os.urandom(16).hex(),
            "trace_id": ids.trace_id,
            "span_id": ids.span_id,
            "status": 200,
            "latency_ms": round(0.2 + (i % 700) / 1000, 3),
            "image_sha256": digest,
        }
        lines.append(json.dumps(record))
    return lines


def mask_lines(masking: Any, keys: Path, lines: list[str]) -> tuple[float, list[str]]:
    """Microseconds a line through the access log's filter, and the lines it wrote."""
    log_filter = masking.LogMasking(masking.Masker(masking.KeyRing(keys)))
    out = []
    t0 = time.perf_counter()
    for line in lines:
        record = logging.LogRecord("model_server.access", logging.INFO, __file__, 1, line, None, None)
        log_filter.filter(record)
        out.append(record.msg)
    return (time.perf_counter() - t0) / len(lines) * 1e6, out


def mask_ids(masking: Any, predictionlog: Any, keys: Path, ids: list[str]) -> tuple[float, list[str]]:
    """Microseconds an id through the prediction log's flush masking, and the ids it wrote."""
    masker = masking.Masker(masking.KeyRing(keys))
    key = masker.keys.key_for(None)
    writer = types.SimpleNamespace(masker=masker)
    t0 = time.perf_counter()
    out = predictionlog.PredictionLog._mask_ids(writer, ids, [key] * len(ids))
    return (time.perf_counter() - t0) / len(ids) * 1e6, out


def write_records(masking: Any, predictionlog: Any, keys: Path, folder: Path, lines: list[str], data: Any) -> float:
    """Microseconds of this thread's CPU a record through the prediction log's writer: ``append``
    and its share of one ``flush`` of them all (masking, hashing, top-k, Parquet, the file's
    write), a ``tiny`` batch-1 answer from tritonclient (no metadata headers)."""
    import numpy as np

    plog = predictionlog.PredictionLog(folder, masking.Masker(masking.KeyRing(keys)), replica="bench")
    scores = np.random.default_rng(0).random((1, 10), np.float32)
    now = time.time()
    records = [
        predictionlog.Inference(
            now, "tiny", "1", "primary", "route", f["request_id"], f["trace_id"], f["span_id"], f["latency_ms"],
            "ok", scores, data, True, {}, 1, data.nbytes, False,
        )
        for f in map(json.loads, lines)
    ]  # fmt: skip
    t0 = time.thread_time()
    for record in records:
        plog.append(record)
    plog.flush()
    return (time.thread_time() - t0) / len(records) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", action="append", help="a git revision to compare (repeatable; default 8776188)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--lines", type=int, default=2000, help="access-log lines and request ids a round")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "logmasking.json")
    args = p.parse_args(argv)
    revisions = args.base or ["8776188"]
    with tempfile.TemporaryDirectory(prefix="bench-logmasking-") as tmp_name:
        tmp = Path(tmp_name)
        sys.path.insert(0, str(tmp / "packages"))
        arms: dict[str, tuple[Any, Any, Any]] = {}
        commits = {}
        for revision in revisions:
            name, commits[revision] = import_revision(revision, tmp)
            arms[revision] = load(name)
        arms["head"] = load("model_server")
        arms["head"][0].create_key_file(tmp / "keys.json")
        lines = access_lines(arms["head"][2], args.lines)
        data = make_case("tiny", 1).x
        ids = [os.urandom(16).hex() for _ in range(args.lines)]
        names = list(arms)
        runs: dict[str, dict[str, list[float]]] = {arm: {"line": [], "id": [], "record": []} for arm in names}
        written: dict[str, tuple[list[str], list[str]]] = {}
        for r in range(args.rounds):
            for arm in names[r % len(names) :] + names[: r % len(names)]:
                masking, predictionlog, _ = arms[arm]
                us, out_lines = mask_lines(masking, tmp / "keys.json", lines)
                runs[arm]["line"].append(us)
                us, out_ids = mask_ids(masking, predictionlog, tmp / "keys.json", ids)
                runs[arm]["id"].append(us)
                folder = tmp / "log" / arm  # (its hour's folder made in the first round, as once an hour)
                runs[arm]["record"].append(
                    write_records(masking, predictionlog, tmp / "keys.json", folder, lines, data)
                )
                written.setdefault(arm, (out_lines, out_ids))
        plain = {arm: sum(not arms[arm][0]._plain(x) for x in lines) / len(lines) for arm in names}
    first = names[0]
    results = []
    for arm in names:
        row: dict[str, Any] = {"arm": arm, "commit": commits.get(arm, "this tree"), "lines_not_plain": plain[arm]}
        for part in ("line", "id", "record"):
            row[f"{part}_us"] = statistics.median(runs[arm][part])
            ratios = [a / b for a, b in zip(runs[arm][part], runs[first][part], strict=True)]
            row[f"{part}_over_{first}"] = statistics.median(ratios)
            row[f"{part}_over_{first}_rounds"] = ratios
        row["writes_what_head_writes"] = written[arm] == written["head"]
        results.append(row)
        print(
            f"{arm:9s} access-log line {row['line_us']:6.1f} us ({row[f'line_over_{first}']:.2f}x {first}), "
            f"request id {row['id_us']:5.2f} us ({row[f'id_over_{first}']:.2f}x), prediction-log record "
            f"{row['record_us']:5.1f} us CPU ({row[f'record_over_{first}']:.2f}x); lines not plain "
            f"{plain[arm]:.0%}; writes what head writes: {row['writes_what_head_writes']}",
            flush=True,
        )
    write_result(
        args.out,
        "logmasking",
        {
            "settings": {
                "rounds": args.rounds,
                "lines": args.lines,
                "what": "LogMasking.filter on access-log lines as log_access writes them for tiny from tritonclient; "
                "PredictionLog._mask_ids on request ids as the server makes them; "
                "PredictionLog.append and flush of tiny batch-1 records (thread CPU)",
                "ratios": f"medians of per-round ratios against {first}; arms in rotating order",
            },
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
