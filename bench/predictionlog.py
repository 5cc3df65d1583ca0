"""The prediction log's cost: serving with it on vs off, the writer's rate, and reading 1M records.

In one run:
- serving: real ``python -m model_server`` processes on loopback, one with ``--prediction-log``,
  one without and a control identical to the latter (the noise floor of this machine),
  ``digits`` batch 1 at concurrency 4 through ``tritonclient.http``, in interleaved rounds (the
  order rotates; after each window the logging server has flushed its records, so its writer
  never runs into another's window). Throughput ratio on/off (of the medians, and the median
  of each round's ratio), the servers' CPU time per request (the logging one's including its
  writer's flush of the window's records), the same two ratios for the control, and the
  records the logging server wrote per second of its windows (none dropped);
- the writer alone: records per second one ``PredictionLog`` thread masks, encodes and writes
  (digits-like records of 2,000 users, each with user, device, tenant and two X-Meta-* headers);
- reading: 1,000,000 records written by the real writer in the real layout (primary, shadow
  and label records over one hour, one file per flush of 5,000), then in a fresh subprocess
  each: the shadow audit (``read`` of the audit's columns, ``shadow_pairs``, ``audit_frame``)
  and a gate-style read (model, version, role, route, latency_ms, outcome, top1, image_sha256,
  time): seconds and peak resident memory (``ru_maxrss``), beside a subprocess that only
  imports the same modules.

Prints ratios and writes ``bench/results/predictionlog.json``. Goals: at most 5%
serving throughput lost with the log on; the audit of 1M records under 30 s and 2 GiB.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from bench import write_result  # noqa: E402
from bench.serving import run_for  # noqa: E402
from devstack.processes import ModelServerProcess, start_model_server  # noqa: E402
from model_server.masking import KeyRing, Masker  # noqa: E402
from model_server.predictionlog import GATE_COLUMNS, Inference, Label, PredictionLog  # noqa: E402
from vision_rollout.replay import load_validation  # noqa: E402

HOUR = datetime(2026, 11, 25, 10, tzinfo=UTC).timestamp()
USERS = 2_000  # each with its own metadata: the writer's and the reader's caches see real variety
METADATA = [
    {
        "x-user-id": f"user-{u}",
        "x-device-type": ("android", "ios", "web")[u % 3],
        "x-tenant": ("acme", "globex", "initech")[u % 3],
        "x-meta-contact": f"user{u}@example.com, 138{u:08d}",
        "x-meta-note": "premium plan" if u % 2 else "free plan",
    }
    for u in range(USERS)
]


def masker(folder: Path) -> Masker:
    keys = folder / "keys.json"
    keys.write_text(json.dumps({"default": base64.b64encode(os.urandom(32)).decode()}))
    return Masker(KeyRing(keys), ["x-user-id"])


# -- serving with the log on and off ----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def written(server: ModelServerProcess) -> float:
    return server.metric("prediction_log_records_total", outcome="written") or 0.0


def serving(repository: Path, seconds: float, rounds: int, tmp: Path) -> dict[str, Any]:
    import tritonclient.http as httpclient

    [(_, image, _)] = load_validation(repository / "digits" / "validation", limit=1)
    servers = {
        "off": start_model_server(repository, tmp / "off", "--load-model", "digits"),
        "control": start_model_server(repository, tmp / "control", "--load-model", "digits"),  # = off
        "on": start_model_server(
            repository,
            tmp / "on",
            "--load-model",
            "digits",
            "--prediction-log",
            str(tmp / "predictions"),
            "--mask-header",
            "x-user-id",
        ),
    }
    headers = {name.title(): value for name, value in METADATA[17].items()}

    def call(server: ModelServerProcess) -> Any:
        def infer(state: dict) -> None:
            if "client" not in state:
                state["client"] = server.client()
                inp = httpclient.InferInput("image", [1], "BYTES")
                inp.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
                state["inputs"] = [inp]
                state["outputs"] = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
            state["client"].infer("digits", state["inputs"], outputs=state["outputs"], headers=headers)

        return infer

    def served(server: ModelServerProcess) -> float:
        return server.metric("nv_inference_request_success", model="digits", version="1") or 0.0

    def settle(server: ModelServerProcess) -> None:
        """Past the writer's next flush (2 s), then until it has written a record for every request
        served. Both servers get the same waits and scrapes, so that their CPU times compare."""
        time.sleep(2.5)
        deadline = time.monotonic() + 30
        while written(server) < served(server) and server is servers["on"] and time.monotonic() < deadline:
            time.sleep(0.5)

    runs: dict[str, list[dict]] = {"off": [], "on": [], "control": []}
    on_seconds = 0.0
    try:
        for server in servers.values():  # warm both: connections, first runs
            run_for(1.0, 4, call(server))
            settle(server)
        base = written(servers["on"])
        for r in range(rounds):
            order = ("off", "on", "control")
            for name in order[r % 3 :] + order[: r % 3]:  # each first in turn
                server = servers[name]
                cpu, count = cpu_seconds(server.proc.pid), served(server)
                result = run_for(seconds, 4, call(server))
                if name == "on":
                    on_seconds += result["requests"] / result["requests_per_s"]
                settle(server)  # the writer's work for the window's records counts too
                result["server_cpu_ms_per_request"] = (
                    1000 * (cpu_seconds(server.proc.pid) - cpu) / max(served(server) - count, 1)
                )
                runs[name].append(result)
        total_written = written(servers["on"]) - base
        dropped = servers["on"].metric("prediction_log_records_total", outcome="dropped") or 0.0
    finally:
        for s in servers.values():
            s.stop()
    off = statistics.median(r["requests_per_s"] for r in runs["off"])
    on = statistics.median(r["requests_per_s"] for r in runs["on"])
    cpu_off = statistics.median(r["server_cpu_ms_per_request"] for r in runs["off"])
    cpu_on = statistics.median(r["server_cpu_ms_per_request"] for r in runs["on"])
    pairs = [b["requests_per_s"] / a["requests_per_s"] for a, b in zip(runs["off"], runs["on"], strict=True)]
    control = statistics.median(r["requests_per_s"] for r in runs["control"])
    cpu_control = statistics.median(r["server_cpu_ms_per_request"] for r in runs["control"])
    return {
        "model": "digits",
        "batch": 1,
        "concurrency": 4,
        "rounds": rounds,
        "seconds": seconds,
        "off_requests_per_s": off,
        "on_requests_per_s": on,
        "throughput_ratio_on_off": on / off,
        "throughput_ratio_median_of_rounds": statistics.median(pairs),
        "server_cpu_ms_per_request_off": cpu_off,
        "server_cpu_ms_per_request_on": cpu_on,
        "server_cpu_ratio_on_off": cpu_on / cpu_off,
        # The same measurement between two identical servers without the log: the noise floor.
        "control_throughput_ratio": control / off,
        "control_cpu_ratio": cpu_control / cpu_off,
        "off_p50_ms": statistics.median(r["p50_ms"] for r in runs["off"]),
        "on_p50_ms": statistics.median(r["p50_ms"] for r in runs["on"]),
        "off_p99_ms": statistics.median(r["p99_ms"] for r in runs["off"]),
        "on_p99_ms": statistics.median(r["p99_ms"] for r in runs["on"]),
        "records_written_per_s_served": total_written / on_seconds,
        "records_dropped": dropped,
        "per_round": runs,
    }


# -- the writer alone ------------------------------------------------------------------------------


def digits_record(i: int, t: float, rng: np.random.Generator, role: str = "primary") -> Inference:
    scores = rng.dirichlet(np.full(10, 0.3), 1).astype(np.float32)
    image = np.array([b"\x89PNG" + rng.bytes(300)], dtype=object)
    version, route = ("1", "route") if role == "primary" else ("2", "mirror")
    return Inference(
        t,
        "digits",
        version,
        role,
        route,
        f"{i:08x}{rng.bytes(12).hex()}",
        rng.bytes(16).hex(),
        rng.bytes(8).hex(),
        float(rng.gamma(4, 0.3)),
        "ok",
        scores,
        image,
        True,
        METADATA[int(rng.integers(USERS))],
        1,
        310,
    )


def writer_rate(tmp: Path, n: int = 50_000) -> dict[str, Any]:
    log = PredictionLog(tmp / "writer", masker(tmp), replica="bench")
    rng = np.random.default_rng(1)
    records = [digits_record(i, time.time(), rng) for i in range(n)]
    t = time.process_time()
    start = time.perf_counter()
    for i in range(0, n, 5_000):  # a flush of 5,000: 2 s at 2,500 requests/s
        for rec in records[i : i + 5_000]:
            log.append(rec)
        log.flush()
    wall = time.perf_counter() - start
    cpu = time.process_time() - t
    t = time.perf_counter()
    for rec in records:
        log.append(rec)
    append_us = (time.perf_counter() - t) / n * 1e6
    log.flush()
    return {
        "records": n,
        "records_per_s": n / wall,
        "cpu_us_per_record": cpu / n * 1e6,
        "append_us_per_record": append_us,
    }


# -- reading a million records ------------------------------------------------------------------------


def write_million(folder: Path, tmp: Path, total: int) -> dict[str, Any]:
    """Primary + shadow pairs and labels for a share of them, over one hour, by the real writer."""
    log = PredictionLog(folder, masker(tmp), replica="bench", max_pending=10_000_000)
    rng = np.random.default_rng(2)
    pairs = int(total * 0.45)
    labels = total - 2 * pairs
    started = time.perf_counter()
    done = 0
    chunk = 2_500  # pairs per flush: 5,000 records, one file
    for first in range(0, pairs, chunk):
        for i in range(first, min(pairs, first + chunk)):
            t = HOUR + 3599.0 * i / pairs
            p = digits_record(i, t, rng)
            answer = np.asarray(p.scores)
            shadow = answer if rng.random() > 0.03 else np.roll(answer, 1, axis=1)  # 3% disagree
            log.append(p)
            log.append(
                p._replace(
                    version="2",
                    role="shadow",
                    route="mirror",
                    span_id=rng.bytes(8).hex(),
                    latency_ms=float(p.latency_ms or 0) * 1.2,
                    scores=shadow,
                )
            )
            if i < labels:
                log.append(Label(t + 1, "digits", "1", p.request_id, [int(answer.argmax())], "acme"))
        done += log.flush()
    files = list(folder.rglob("part-*.parquet"))
    return {
        "records": done,
        "pairs": pairs,
        "labels": labels,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "write_seconds": time.perf_counter() - started,
    }


def child(kind: str, folder: str) -> None:
    """One measured task in a fresh process: prints seconds, rows and peak RSS as JSON."""
    from model_server.predictionlog import SHADOW_PAIR_COLUMNS, read, shadow_pairs
    from vision_rollout.audit import audit_frame

    start, end = datetime.fromtimestamp(HOUR, UTC), datetime.fromtimestamp(HOUR + 3600, UTC)
    t = time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "audit":
        df = read(folder, start, end, "digits", columns=SHADOW_PAIR_COLUMNS, roles=("primary", "shadow"))
        out["read_seconds"] = time.perf_counter() - t
        pairs = shadow_pairs(df)
        out["pairs_seconds"] = time.perf_counter() - t - out["read_seconds"]
        result = audit_frame(pairs, model="digits")
        out.update(rows=len(df), pairs=len(pairs), verdict=result.verdict, agreement=result.agreement)
    elif kind == "gate":
        df = read(folder, start, end, "digits", columns=GATE_COLUMNS)
        out.update(rows=len(df))
    out["seconds"] = time.perf_counter() - t
    out["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def measured(kind: str, folder: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(folder)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--seconds", type=float, default=3.0, help="per serving window")
    p.add_argument("--rounds", type=int, default=8, help="interleaved off/on rounds (median taken)")
    p.add_argument("--records", type=int, default=1_000_000, help="records for the read benchmark")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "predictionlog.json")
    p.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-predictionlog-") as name:
        tmp = Path(name)
        serve = serving(args.repository, args.seconds, args.rounds, tmp)
        print(
            f"serving digits batch 1 conc 4: off {serve['off_requests_per_s']:.0f} rps, on "
            f"{serve['on_requests_per_s']:.0f} rps, ratio {serve['throughput_ratio_on_off']:.3f} (median of "
            f"rounds {serve['throughput_ratio_median_of_rounds']:.3f}); server CPU per request "
            f"{serve['server_cpu_ms_per_request_off']:.3f} -> {serve['server_cpu_ms_per_request_on']:.3f} ms "
            f"({serve['server_cpu_ratio_on_off']:.3f}x); control (off vs an identical off): throughput "
            f"{serve['control_throughput_ratio']:.3f}, CPU {serve['control_cpu_ratio']:.3f}x; p50 "
            f"{serve['off_p50_ms']:.3f} -> {serve['on_p50_ms']:.3f} ms; records written "
            f"{serve['records_written_per_s_served']:.0f}/s, dropped {serve['records_dropped']:.0f}",
            flush=True,
        )
        writer = writer_rate(tmp)
        print(
            f"writer alone: {writer['records_per_s']:.0f} records/s, {writer['cpu_us_per_record']:.1f} us CPU "
            f"per record; append {writer['append_us_per_record']:.2f} us",
            flush=True,
        )
        folder = tmp / "million"
        layout = write_million(folder, tmp, args.records)
        print(
            f"wrote {layout['records']} records in {layout['files']} files, {layout['bytes'] / 2**20:.0f} MiB, "
            f"{layout['write_seconds']:.1f} s",
            flush=True,
        )
        baseline = measured("imports", folder)
        audit = measured("audit", folder)
        gate = measured("gate", folder)
        for label, r in (("audit", audit), ("gate read", gate)):
            print(
                f"{label}: {r['seconds']:.1f} s, peak RSS {r['max_rss_mib']:.0f} MiB "
                f"(imports alone {baseline['max_rss_mib']:.0f} MiB), {r['rows']} rows",
                flush=True,
            )
    goals = {
        "throughput_ratio_on_off_min_0.95": serve["throughput_ratio_on_off"],
        "throughput_ratio_median_of_rounds": serve["throughput_ratio_median_of_rounds"],
        "control_throughput_ratio (noise floor)": serve["control_throughput_ratio"],
        "server_cpu_ratio_on_off": serve["server_cpu_ratio_on_off"],
        "control_cpu_ratio (noise floor)": serve["control_cpu_ratio"],
        "audit_seconds_max_30": audit["seconds"],
        "audit_max_rss_mib_max_2048": audit["max_rss_mib"],
    }
    print(json.dumps(goals, indent=2))
    write_result(
        args.out,
        "predictionlog",
        {
            "settings": {
                "seconds": args.seconds,
                "rounds": args.rounds,
                "records": args.records,
                "client": "tritonclient.http, binary data",
                "flush_s": 2.0,
                "compression": "zstd",
            },
            "serving": serve,
            "writer": writer,
            "layout": layout,
            "read": {"imports_only": baseline, "audit": audit, "gate": gate},
            "goals": goals,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
