"""This model server against itself at an earlier commit: what a change to the request path bought.

The code at ``--base`` (any git revision; by default the commit before the leaner request path
began: the state the serving goals were set against) is exported with ``git archive`` into a
temporary folder and run beside this tree's, both as ``python -m model_server`` from this
environment, serving the same repository (``tiny``, 64 -> 10 MatMul + Softmax, built as
bench/peers.py builds it, and ``resnet_bench``), both driven by the same ``tritonclient.http``
code with binary tensors, one client per thread. Raw ``InferenceSession.run`` in this process is
the reference for the added latency; a fourth arm, ``floor``, a server that answers every
request at once with bytes the head server answered (httptools on uvloop, no model), shows
what the client and the loopback alone add. Rows are measured in interleaved rounds, the four
arms in a rotating order; throughput ratios are medians of per-round ratios. Prints a table,
writes ``bench/results/versus.json``. ``--logs``: both servers write the prediction log (a folder
each) and the JSON access log, the request path with its logging and masking in it;
``--rows tiny:1:1,tiny:1:4``: only these rows (model:batch:concurrency).

Goals (BENCHMARKS.md, "The request path"): ``tiny`` at concurrency 1 adds at most 0.25 ms to
raw ORT's p50; at concurrency 4 at least 1.5x the base's throughput.
"""

from __future__ import annotations

import argparse
import io
import socket
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
from devstack.processes import ModelServerProcess, on_a_free_port, spawn, start_model_server  # noqa: E402

BASE = "144330b^"  # before "Serving: a leaner request path"
ROWS = [("tiny", 1, 1), ("tiny", 1, 4), ("tiny", 8, 4), ("resnet_bench", 1, 1)]
ARMS = ("raw", "floor", "base", "head")

# Run as its own process: the parser and the event loop the servers use, one canned answer.
FLOOR_SERVER = """
import asyncio, sys, httptools, uvloop
answer = open(sys.argv[2], "rb").read()
class Canned(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.parser = transport, httptools.HttpRequestParser(self)
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_message_complete(self):
        self.transport.write(answer)
async def main():
    server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
uvloop.run(main())
"""


def start_floor(case: Any, head: ModelServerProcess, work: Path) -> ModelServerProcess:
    """The floor server, answering what ``head`` answers to ``case``'s request (read raw)."""
    import http.client

    import tritonclient.http as httpclient

    inputs = [case.make_input()]
    outputs = [httpclient.InferRequestedOutput(case.output, binary_data=True)]
    body, json_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    conn = http.client.HTTPConnection("127.0.0.1", head.port, timeout=30)
    headers = {"Inference-Header-Content-Length": str(json_length)} if json_length else {}
    conn.request("POST", f"/v2/models/{case.model}/infer", body, headers)
    response = conn.getresponse()
    payload = response.read()
    head_lines = [f"HTTP/1.1 {response.status} OK"] + [
        f"{k}: {v}" for k, v in response.getheaders() if k.lower() not in ("date", "server", "content-length")
    ]
    canned = work / f"floor-{case.model}-{case.batch}.bin"
    canned.write_bytes(("\r\n".join(head_lines) + f"\r\ncontent-length: {len(payload)}\r\n\r\n").encode() + payload)
    return start_canned(canned, work)


def start_canned(canned: Path, work: Path) -> ModelServerProcess:
    """FLOOR_SERVER answering ``canned`` on a free port, once it listens there itself (another
    process's port, which answers too: PortTaken, picked again)."""

    def start(port: int) -> ModelServerProcess:
        log = work / "floor.log"
        floor = spawn([sys.executable, "-c", FLOOR_SERVER, str(port), str(canned)], log)
        server = ModelServerProcess(floor, port, log, name="the floor server")

        def answers() -> bool:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True

        if server.wait_for(server.name, answers, 30, 0.1):
            return server
        server.stop(timeout_s=5)
        raise RuntimeError(f"{server.name} did not start; see {log}")

    return on_a_free_port(start, None)


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


def parse_rows(text: str) -> list[tuple[str, int, int]]:
    """``model:batch:concurrency,...`` as rows; SystemExit naming a part that is not one."""
    rows = []
    for part in text.split(","):
        model, _, rest = part.strip().partition(":")
        batch, _, concurrency = rest.partition(":")
        if model not in ("tiny", "resnet_bench") or not batch.isdigit() or not concurrency.isdigit():
            raise SystemExit(f"versus: --rows: {part!r} is not tiny|resnet_bench:BATCH:CONCURRENCY")
        rows.append((model, int(batch), int(concurrency)))
    return rows


def measure(
    case: Any, session: Any, servers: dict[str, ModelServerProcess], concurrency: int, seconds: float, rounds: int
) -> dict:
    calls = {
        "raw": stateless(lambda: session.run([case.output], {case.input: case.x})),
        **{arm: served(case, server) for arm, server in servers.items()},
    }
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        for arm in ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]:
            runs[arm].append(timed(calls[arm], concurrency, seconds, servers.get(arm)))
    row: dict[str, Any] = {"model": case.model, "batch": case.batch, "concurrency": concurrency}
    for arm in ARMS:
        row[f"{arm}_requests_per_s"] = statistics.median(x["requests_per_s"] for x in runs[arm])
        row[f"{arm}_p50_ms"] = statistics.median(x["p50_ms"] for x in runs[arm])
    for arm in ("floor", "base", "head"):
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
        "| model | batch | concurrency | head / base throughput | added p50 floor | added p50 base | added p50 head | "
        "server CPU per request base | head |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['concurrency']} | **{r['head_over_base']:.2f}** | "
            f"{r['floor_added_p50_ms']:+.3f} ms | {r['base_added_p50_ms']:+.3f} ms | {r['head_added_p50_ms']:+.3f} ms | "
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
    p.add_argument("--rows", type=parse_rows, default=ROWS, help="model:batch:concurrency,... (default: all)")
    p.add_argument("--logs", action="store_true", help="both servers with --prediction-log and --access-log")
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
            for arm in ("base", "head"):
                logs = ("--prediction-log", str(Path(tmp) / f"log-{arm}"), "--access-log") if args.logs else ()
                source = Path(tmp) / "base" if arm == "base" else ROOT
                servers[arm] = start_model_server(Path(tmp) / "models", log_dir, *logs, source=source)
            for model, batch, concurrency in args.rows:
                case = make_case(model, batch)
                check_answers(case, sessions[model], servers)
                servers["floor"] = start_floor(case, servers["head"], Path(tmp))
                try:
                    row = measure(case, sessions[model], servers, concurrency, args.seconds, args.rounds)
                finally:
                    servers.pop("floor").stop(timeout_s=5)
                rows.append(row)
                print(
                    f"{model:13s} batch {batch} conc {concurrency}: head/base {row['head_over_base']:.2f} "
                    f"(rounds {', '.join(f'{x:.2f}' for x in row['head_over_base_rounds'])}); added p50 "
                    f"floor {row['floor_added_p50_ms']:+.3f} ms base {row['base_added_p50_ms']:+.3f} ms "
                    f"head {row['head_added_p50_ms']:+.3f} ms; "
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
                "logs": "prediction log (a folder) and access log on" if args.logs else "off",
                "rounds": args.rounds,
                "client": "tritonclient.http, binary data, one client per thread",
                "added_p50": "median over rounds of (server p50 - raw ORT p50 in the same round)",
                "floor": "httptools on uvloop answering every request with the head server's answer, no model",
                "ratios": "medians of per-round ratios of requests per second; rounds rotate raw/base/head",
            },
            "goals": "tiny c1 added p50 <= 0.25 ms; tiny c4 head/base >= 1.5",
            "results": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
