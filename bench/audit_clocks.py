"""The shadow audit behind Istio when the candidate's pods' clocks are off: how often the hourly
audits count each copied request where it belongs.

Behind Istio a copy is stamped by the candidate's pod on arrival, by its own clock; the audit
matches it to its primary's attempt by stamp less the pod's measured offset
(``predictionlog._clock_offsets``). Where a request failed and was retried a moment later, a copy
matched to the wrong attempt moves a comparison between the hour's ``rows`` and its
``primary_failed``, or between two hours. Each seeded scene (a stretch of two hours around 11:00):
one or two candidate pods, each clock ``steady`` (off by up to 4 s), ``drift`` (from one offset
to another over the two hours) or ``step`` (one offset, then another from a moment within 2 min
before to 4 min after 11:00), the scene's kind its pods' hardest; single requests at a random
rate (0.005, 0.02 or 0.1 a second), each copied; one to three bursts of 5 to 40 failed requests
retried 0.2 to 8 s later, centred on the hour's end, a minute before it, or the next hour's close
(AUDIT_CLOSE_S after it), the copy of each the retry's or the failed attempt's. Files of a minute's records, written a second or two
after it, as the pods' writers flush; read by ``audit`` as the hourly DAG does (10:00-11:00 and
11:00-12:00) and as a rollout's shadow check does (its range: 10:50-11:10).

Right: a copied retry is a row of its retry's stamp's range; a copied failed attempt, a
``primary_failed`` of its attempt's. A scene is exact when its ranges' two counts are. Prints, per
way of reading and clock kind, the scenes, the exact ones and the counts off (the sum over scenes
of |got - right|, rows and failed, against the right totals), and writes
``bench/results/audit-clocks.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "include")]

from bench import write_result  # noqa: E402
from model_server import predictionlog  # noqa: E402
from model_server.masking import KeyRing, Masker, create_key_file  # noqa: E402
from model_server.predictionlog import Inference, PredictionLog  # noqa: E402
from vision_rollout.audit import audit  # noqa: E402

HOUR = datetime(2026, 3, 1, 10, tzinfo=UTC)
END = (HOUR + timedelta(hours=1)).timestamp()  # 11:00, the hour's end the scenes are around
T0, T1 = END - 3600 + 120, END + 3600 - 180  # (the stretch the single requests fall in)
KINDS = ("steady", "drift", "step")
READS = {  # (the ranges each way of reading audits)
    "hourly": [(HOUR, HOUR + timedelta(hours=1)), (HOUR + timedelta(hours=1), HOUR + timedelta(hours=2))],
    "rollout": [(HOUR + timedelta(minutes=50), HOUR + timedelta(minutes=70))],
}


def scene(seed: int) -> tuple[dict[str, Any], list[tuple[float, int]], str]:
    """The records (``ok``, ``fault``: primaries, index -> stamp; ``copies``: pod -> index ->
    stamp by its clock), what each copy counts as where (its attempt's stamp and 0, a row, or 1,
    a ``primary_failed``) and the pods' hardest clock kind (a step's over a drift's over a steady
    one's)."""
    rng = np.random.default_rng(seed)
    pods = ["shadow-a", "shadow-b"][: int(rng.integers(1, 3))]
    clocks = {
        p: (str(rng.choice(KINDS)), rng.uniform(-4, 4), rng.uniform(-4, 4), END + rng.uniform(-120, 240)) for p in pods
    }

    def lag(p: str, t: float) -> float:
        kind, a, b, at = clocks[p]
        if kind == "steady":
            return a
        if kind == "drift":
            return a + (b - a) * (t - T0) / (T1 - T0)
        return a if t < at else b

    records: dict[str, Any] = {"ok": {}, "fault": {}, "copies": {p: {} for p in pods}}
    counts: list[tuple[float, int]] = []
    i = 0
    rate = float(rng.choice([0.005, 0.02, 0.1]))
    for t in np.sort(rng.uniform(T0, T1, rng.poisson(rate * (T1 - T0)))):
        p = pods[int(rng.integers(len(pods)))]
        records["ok"][i] = t
        records["copies"][p][i] = t + lag(p, t) + rng.uniform(-0.002, 0.002)
        counts.append((t, 0))
        i += 1
    for _ in range(int(rng.integers(1, 4))):
        centre = float(rng.choice([END - 60, END, END + predictionlog.AUDIT_CLOSE_S])) + rng.uniform(-3, 3)
        gap = float(rng.choice([0.2, 1.0, 4.0, 8.0]))
        copied_retry = bool(rng.integers(2))
        p = pods[int(rng.integers(len(pods)))]
        for _ in range(int(rng.integers(5, 40))):
            first = centre - gap / 2 + rng.uniform(-0.3, 0.3) * min(gap, 1)
            records["fault"][i], records["ok"][i] = first, first + gap
            at = first + gap if copied_retry else first
            records["copies"][p][i] = at + lag(p, at) + rng.uniform(-0.002, 0.002)
            counts.append((at, 0 if copied_retry else 1))
            i += 1
    return records, counts, max((clocks[p][0] for p in pods), key=KINDS.index)


@contextmanager
def _stopped(now: float) -> Iterator[None]:
    """The writer's clock (its files' names) stopped at ``now``."""

    class Clock:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def time(self) -> float:
            return now

    with mock.patch.object(predictionlog, "time", Clock()):
        yield


def write(folder: Path, keys: Path, records: dict[str, Any]) -> None:
    """Each pod's records in files of a minute's stamps, each written by the pod's writer a
    second (the primaries') or two (the copies') after its minute."""
    p = np.full((1, 10), 0.01, dtype=np.float32)
    p[0, 3] = 0.91
    files = [("primary-pod", "primary", records["ok"], "ok"), ("primary-pod", "primary", records["fault"], "FAULT")]
    files += [(pod, "shadow", stamps, "ok") for pod, stamps in records["copies"].items()]
    for replica, role, stamps, outcome in files:
        minutes: dict[int, dict[int, float]] = {}
        for i, at in stamps.items():
            minutes.setdefault(int(at // 60), {})[i] = at
        for minute, chunk in minutes.items():
            log = PredictionLog(folder, Masker(KeyRing(keys)), replica=replica)
            answer: tuple[float | None, str, np.ndarray | None] = (
                (3.0, "ok", p) if outcome == "ok" else (None, outcome, None)
            )
            for i, at in chunk.items():
                version, route = ("1", "route") if role == "primary" else ("2", "mirror")
                data = np.array([f"img-{i}".encode()], dtype=object)
                log.append(
                    Inference(at, "digits", version, role, route, f"r{i}", "0" * 32, "0" * 16, *answer, data, True, {})
                )
            with _stopped((minute + 1) * 60 + (1 if role == "primary" else 2)):
                log.flush()


def run(seeds: range) -> dict[str, dict[str, Any]]:
    by_read: dict[str, dict[str, Any]] = {read: {} for read in READS}
    for seed in seeds:
        records, counts, kind = scene(seed)
        with tempfile.TemporaryDirectory() as tmp:
            keys = Path(tmp) / "keys.json"
            create_key_file(keys)
            write(Path(tmp) / "log", keys, records)
            for read, ranges in READS.items():
                got, right = [], []
                for start, end in ranges:
                    a = audit(Path(tmp) / "log", start, end, "digits", earlier_hours=1)
                    got.append([a.rows, a.primary_failed])
                    within = [j for at, j in counts if start.timestamp() <= at < end.timestamp()]
                    right.append([within.count(0), within.count(1)])
                counters = dict.fromkeys(("scenes", "exact", "rows", "rows_off", "failed", "failed_off"), 0)
                row = by_read[read].setdefault(kind, {**counters, "wrong_seeds": []})
                row["scenes"] += 1
                row["exact"] += got == right
                if got != right:
                    row["wrong_seeds"].append(seed)
                for j, name in ((0, "rows"), (1, "failed")):
                    row[name] += sum(r[j] for r in right)
                    row[f"{name}_off"] += sum(abs(g[j] - r[j]) for g, r in zip(got, right, strict=True))
    return by_read


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=80)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit-clocks.json")
    args = ap.parse_args(argv)
    by_read = run(range(args.seeds))
    print(f"{'read':<8} {'clocks':<8} {'scenes':>6} {'exact':>6} {'rows off':>14} {'failed off':>14}")
    for read, by_kind in by_read.items():
        for kind, r in sorted(by_kind.items()):
            print(
                f"{read:<8} {kind:<8} {r['scenes']:>6} {r['exact']:>6} {r['rows_off']:>6} of {r['rows']:<6} "
                f"{r['failed_off']:>5} of {r['failed']:<6}"
            )
    write_result(args.out, "audit_clocks", {"seeds": args.seeds, "by_read_and_clocks": by_read})
    return 0


if __name__ == "__main__":
    sys.exit(main())
