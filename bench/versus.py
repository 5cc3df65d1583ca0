"""This model server against itself at an earlier commit: what a change to the request path bought.

The code at ``--base`` (any git revision; by default the commit before the leaner request path
began, the state issue 12 measured) is exported with ``git archive`` into a temporary folder and
run beside this tree's, both as ``python -m model_server`` from this environment, serving the
same repository (``tiny``, 64 -> 10 MatMul + Softmax, built as bench/peers.py builds it, and
``resnet_bench``), both driven by the same ``tritonclient.http`` code with binary tensors, one
client per thread; raw ``InferenceSession.run`` in this process is the reference for the added
latency. Rows are measured in interleaved rounds, raw / base / head in a rotating order;
throughput ratios are medians of per-round ratios. Prints a table, writes
``bench/results/versus.json``.

Goals (issue 12): ``tiny`` at concurrency 1 adds at most 0.25 ms to raw ORT's p50; at
concurrency 4 at least 1.5x the base's throughput.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from bench.peers import check_answers, make_case, make_repository, raw_session, served, timed  # noqa: E402
from bench.serving import stateless  # noqa: E402
from devstack.processes import ModelServerProcess, start_model_server  # noqa: E402

BASE = "144330b^"  # before "Serving: a leaner request path" (the "today")
ROWS = [("tiny", 1, 1), ("tiny", 1, 4), ("tiny", 8, 4), ("resnet_bench", 1, 1)]
ARMS = ("raw", "base", "head")


def export(revision: str, into: Path) -> str:
    """The tree of ``revision`` written into ``into``; its full commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
    )
    if commit.returncode != 0:
        raise SystemExit(f"versus: {revision!r} is not a commit of {ROOT}: {commit.stderr.strip()}")
    archive = subprocess.run(["git", "archive", commit.stdout.strip()], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return commit.stdout.strip()


def measure(
    case: Any, session: Any, servers: dict[str, ModelServerProcess], concurrency: int, seconds: float, rounds: int
) -> dict:
    calls = {
        "raw": stateless(lambda: session.run([case.output], {case.input: case.x})),
        **{arm: served(case, server) for arm, server in servers.items()},
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        for arm in ARMS[r % 3 :] + ARMS[: r % 3]:
            runs[arm].append(timed(calls[arm], concurrency, seconds, servers.get(arm)))
    row: dict[str, Any] = {"model": case.model, "batch": case.batch, "concurrency": concurrency}
    for arm in ARMS:
        row[f"{arm}_requests_per_s"] = statistics.median(x["requests_per_s"] for x in runs[arm])
        row[f"{arm}_p50_ms"] = statistics.median(x["p50_ms"] for x in runs[arm])
    for arm in ("base", "head"):
        row[f"{arm}_added_p50_ms"] = statistics.median(
            x["p50_ms"] - y["p50_ms"] for x, y in zip(runs[arm], runs["raw"], strict=True)
        )
        row[f"{arm}_cpu_ms_per_request"] = statistics.median(x["cpu_ms_per_request"] for x in runs[arm])
    per_round = [x["requests_per_s"] / y["requests_per_s"] for x, y in zip(runs["head"], runs["base"], strict=True)]
    row["head_over_base"] = statistics.median(per_round)
    row["head_over_base_rounds"] = per_round
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | concurrency | head / base throughput | added p50 base | added p50 head | "
        "server CPU per request base | head |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['concurrency']} | **{r['head_over_base']:.2f}** | "
            f"{r['base_added_p50_ms']:+.3f} ms | {r['head_added_p50_ms']:+.3f} ms | "
            f"{r['base_cpu_ms_per_request']:.3f} ms | {r['head_cpu_ms_per_request']:.3f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=BASE, help=f"the git revision to compare with (default {BASE})")
    p.add_argument("--repository", type=Path, default=ROOT / "models", help="where resnet_bench is")
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement window")
    p.add_argument("--rounds", type=int, default=5, help="interleaved raw/base/head rounds (medians taken)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "versus.json")
    args = p.parse_args(argv)
    if not (args.repository / "resnet_bench" / "1" / "model.onnx").is_file():
        print(f"versus: no resnet_bench in {args.repository} (make models)", file=sys.stderr)
        return 2
    log_dir = ROOT / "bench" / ".logs" / "versus"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-versus-") as tmp:
        base_commit = export(args.base, Path(tmp) / "base")
        onnx_files = make_repository(Path(tmp) / "models", args.repository)
        sessions = {m: raw_session(path, "cpu") for m, path in onnx_files.items()}
        servers: dict[str, ModelServerProcess] = {}
        try:
            servers["base"] = start_model_server(Path(tmp) / "models", log_dir, source=Path(tmp) / "base")
            servers["head"] = start_model_server(Path(tmp) / "models", log_dir)
            for model, batch, concurrency in ROWS:
                case = make_case(model, batch)
                check_answers(case, sessions[model], servers)
                row = measure(case, sessions[model], servers, concurrency, args.seconds, args.rounds)
                rows.append(row)
                print(
                    f"{model:13s} batch {batch} conc {concurrency}: head/base {row['head_over_base']:.2f} "
                    f"(rounds {', '.join(f'{x:.2f}' for x in row['head_over_base_rounds'])}); added p50 "
                    f"base {row['base_added_p50_ms']:+.3f} ms head {row['head_added_p50_ms']:+.3f} ms; "
                    f"CPU/request base {row['base_cpu_ms_per_request']:.3f} ms head "
                    f"{row['head_cpu_ms_per_request']:.3f} ms",
                    flush=True,
                )
        finally:
            for server in servers.values():
                server.stop(timeout_s=10)
    print()
    print(table(rows))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    write_result(
        args.out,
        "versus",
        {
            "settings": {
                "base": {"revision": args.base, "commit": base_commit},
                "head": {"commit": head, "uncommitted_changes": dirty},
                "seconds": args.seconds,
                "rounds": args.rounds,
                "client": "tritonclient.http, binary data, one client per thread",
                "added_p50": "median over rounds of (server p50 - raw ORT p50 in the same round)",
                "ratios": "medians of per-round ratios of requests per second; rounds rotate raw/base/head",
            },
            "goals": "tiny c1 added p50 <= 0.25 ms; tiny c4 head/base >= 1.5",
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
