"""A stage re-run until it passes: the wrong promotion of a candidate exactly at the latency
margin when whoever runs the rollout clears a stage each time it does not pass (up to R times).

One stage's test is its group-sequential latency check (``gates.latency_check`` at each look's
``nominal_alpha``, K = 10 looks over 1000 samples per arm: ``bench/gates.py`` section (a)), its
evidence drawn from its window's start (the same window, the same log: the same verdicts, as
the engine judges). Three ways a re-run goes:
- ``fresh``: every run of the stage a new window (``apply_mesh_weights`` re-run took a new
  start), so a new test at level alpha;
- ``kept``: the stage's test kept in the run folder (``vision_rollout.attempts``): a re-run
  resumes its window, and a test that decided reports that decision again;
- ``restarted``: each re-run an explicit restart (``attempts.request_restart``): a fresh test,
  as ``fresh``, but counted, and the report's bound (``attempts.chance``) next to it.

Seeded; prints a table and writes ``bench/results/reruns.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from bench.gates import CFG, sequential_latency  # noqa: E402
from vision_rollout import attempts  # noqa: E402
from vision_rollout.folders import Folder  # noqa: E402
from vision_rollout.gates import nominal_alpha  # noqa: E402

LOOKS, N_MAX = 10, 1000


def test_from(seed: int, started: float) -> str:
    """The stage's test over the window from ``started``: pass, fail or wait (undecided)."""
    rng = np.random.default_rng([seed, int(started)])
    return sequential_latency(rng, 1 + CFG.latency_margin, LOOKS, N_MAX, lambda k, K: nominal_alpha(CFG.alpha, k, K))[0]


def stage(folder: Folder | None, run_id: str, seed: int, reruns: int, restart: bool) -> bool:
    """The stage run, then cleared after each result that is not a pass, up to ``reruns`` times:
    whether it passed. ``folder`` None: no record (each run a fresh window)."""
    for run in range(reruns + 1):
        now = float(run + 1)  # each run of apply_mesh_weights at its own time
        if folder is None:
            if test_from(seed, now) == "pass":
                return True
            continue
        if restart and run:
            attempts.request_restart(folder, run_id, 0, "cleared after it did not pass")
        started, _ = attempts.applied(folder, run_id, 0, now)
        record, attempt = attempts.judged(folder, run_id, 0, started, str(run + 1))
        if attempt.outcome is None:  # (a decided test is reported again, not judged)
            decision = test_from(seed, started)
            attempts.decided(folder, record, attempt, LOOKS, {"status": decision, "decision": decision})
        assert attempt.outcome is not None
        if attempt.outcome["status"] == "pass":
            return True
    return False


def simulate(sims: int, seed: int, max_reruns: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Folder(tmp)
        for reruns in range(max_reruns + 1):
            row: dict[str, Any] = {"reruns": reruns}
            for way in ("fresh", "kept", "restarted"):
                results = [
                    stage(
                        None if way == "fresh" else folder, f"{way}-{reruns}-{i}", seed + i, reruns, way == "restarted"
                    )
                    for i in range(sims)
                ]
                row[way] = sum(results) / sims
            # What the report of a stage that passed on its last attempt says it cost.
            row["reported_bound"] = attempts.chance(CFG.alpha, reruns + 1)
            row["mc_error"] = math.sqrt(max(row["fresh"], CFG.alpha) * (1 - CFG.alpha) / sims)
            rows.append(row)
            print(
                f"re-run up to {reruns} times: wrongly passed {row['fresh']:.3f} with a fresh test each run, "
                f"{row['kept']:.3f} with the test kept, {row['restarted']:.3f} restarted on request "
                f"(its report's bound {row['reported_bound']:.3f}); alpha {CFG.alpha}, "
                f"MC error {row['mc_error']:.3f}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sims", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-reruns", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reruns.json")
    args = p.parse_args(argv)
    rows = simulate(args.sims, args.seed, args.max_reruns)
    settings = {"sims": args.sims, "seed": args.seed, "alpha": CFG.alpha, "looks": LOOKS, "n_max": N_MAX}
    write_result(args.out, "reruns", {"settings": settings, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
