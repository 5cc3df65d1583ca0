"""Soak: minutes of mixed valid, malformed and hostile traffic against one model server with a
100% mirror and its prediction log, then a SIGKILL. What it reports:

- crashes: the server process gone, any 5xx answered, any traceback in its log;
- the largest stall a well-behaved client saw (a request every 50 ms from its own thread: its
  largest and p99 latency), beside the same client's figures in a quiet warm-up of the same run;
- peak memory: the server's largest resident set (VmHWM) and its RSS over time;
- records lost at a crash: the primary answers the clients received, against the primary records
  in the prediction log after the SIGKILL, and the age of the lost ones at the kill (the bound
  is the flush interval, ``--prediction-log-flush-s``, 2 s by default).

Hostile traffic, each on a thread of its own: headers just under Envoy's 60 KiB limit and over
it, masking-hostile metadata (long runs without "@", digits and escapes), JSON bodies at and over
the 4 MiB limit, pixel bombs (three 4096x4096 PNGs), feedback lists of 1000 forged items, slow
clients trickling headers, malformed bodies and policies (through the admin API, refused).

    python bench/soak.py [--seconds 600] [--rate 40] [--out bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import signal
import socket
import string
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import write_result  # noqa: E402
from devstack.loadgen import LoadConfig, run  # noqa: E402
from devstack.processes import start_model_server  # noqa: E402
from model_server import predictionlog  # noqa: E402
from model_server.traffic import TrafficPolicy  # noqa: E402
from vision_rollout.replay import load_validation  # noqa: E402

TOKEN = "bench-soak"
MIRROR_ALL: dict[str, Any] = {
    "route": [{"version": "1", "weight": 100}],
    "mirror": {"version": "2", "percent": 100},
}


def png(size: int, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    if size <= 64:
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    else:
        Image.new("L", (size, size), 0).save(buf, format="PNG")  # large and small on the wire
    return buf.getvalue()


def binary_body(images: list[bytes]) -> tuple[bytes, dict[str, str]]:
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(images)],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


def request_id(kind: str) -> str:
    """Letters only: no detector takes part of it for a phone number and masks it in the log."""
    return f"{kind}-" + "".join(random.choices(string.ascii_lowercase, k=16))


class Tally:
    """Statuses per traffic kind, and the request ids of the primary answers (status 200)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: dict[str, Counter[str]] = {}
        self.answered: list[tuple[float, str]] = []  # (time answered, request id)

    def add(self, kind: str, status: int | str, rid: str | None = None) -> None:
        with self.lock:
            self.statuses.setdefault(kind, Counter())[str(status)] += 1
            if status == 200 and rid is not None:
                self.answered.append((time.time(), rid))


def loop(stop: threading.Event, pause_s: float, fn: Any) -> threading.Thread:
    def body() -> None:
        i = 0
        while not stop.is_set():
            try:
                fn(i)
            except requests.RequestException:
                pass
            i += 1
            stop.wait(pause_s)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def hostile_kinds(url: str, tally: Tally, digit: bytes) -> dict[str, tuple[float, Any]]:
    """Name -> (pause between requests, one request)."""
    infer = f"{url}/v2/models/digits/infer"
    small, small_headers = binary_body([digit])
    bombs, bomb_headers = binary_body([png(4096)] * 3)

    def post(kind: str, body: bytes, headers: dict[str, str], target: str = infer) -> None:
        rid = request_id(kind)
        r = requests.post(target, data=body, headers={"X-Request-ID": rid, **headers}, timeout=30)
        tally.add(kind, r.status_code, rid if target == infer else None)

    def big_headers(i: int) -> None:
        size = 58 * 1024 if i % 2 else 70 * 1024  # under Envoy's 60 KiB, and over it (431)
        post("big_headers", small, {**small_headers, "X-Meta-Session": "a" * size})

    def masking_hostile(i: int) -> None:
        values = ["a" * 30_000, "1 " * 10_000, "%41" * 8000, "\\u0031" * 5000, "+1" * 10_000]
        post(
            "masking_hostile",
            small,
            {**small_headers, "X-Meta-Note": values[i % len(values)], "X-User-ID": f"user-1380013{i % 10000:04d}"},
        )

    def big_json(i: int) -> None:
        n = (4 << 20) - 200 if i % 2 else 5 << 20  # at the 4 MiB limit, and over it (413)
        body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x" * n]}]})
        post("big_json", body.encode(), {"Content-Type": "application/json"})

    def pixel_bombs(i: int) -> None:
        post("pixel_bombs", bombs, bomb_headers)

    def forged_feedback(i: int) -> None:
        items = [{"request_id": f"forged-{i}-{k}", "label": 1, "token": "AAAA"} for k in range(1000)]
        post(
            "forged_feedback",
            json.dumps(items).encode(),
            {"Content-Type": "application/json"},
            f"{url}/v2/models/digits/feedback",
        )

    def malformed(i: int) -> None:
        bodies = [
            b"{not json",
            b'{"inputs": []}',
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["li.wei@example.com"]}]}
            ).encode(),
            small[:-5],
            b"\x00" * 100,
        ]
        headers = [{}, {}, {}, small_headers, {"Inference-Header-Content-Length": "999"}]
        post("malformed", bodies[i % len(bodies)], headers[i % len(headers)])

    def bad_policy(i: int) -> None:
        # Refused (400): a version that is no number, one not loaded, a look-behind Istio's RE2 lacks.
        policies: list[dict[str, Any]] = [
            {"route": [{"version": "²", "weight": 100}]},
            {"route": [{"version": "7", "weight": 100}]},
            {**MIRROR_ALL, "rules": [{"match": {"headers": {"x": {"regex": "(?<=a)b"}}}, "route": [{"version": "2"}]}]},
        ]
        r = requests.put(
            f"{url}/v2/models/digits/traffic",
            json=policies[i % len(policies)],
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        tally.add("bad_policy", r.status_code)

    def slow_client(i: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n")
            for _ in range(5):
                s.sendall(b"X-Meta-Slow: 1\r\n")
                time.sleep(1)
        tally.add("slow_client", "closed")

    return {
        "big_headers": (0.5, big_headers),
        "masking_hostile": (0.2, masking_hostile),
        "big_json": (2.0, big_json),
        "pixel_bombs": (2.0, pixel_bombs),
        "forged_feedback": (1.0, forged_feedback),
        "malformed": (0.1, malformed),
        "bad_policy": (1.0, bad_policy),
        "slow_client": (0.0, slow_client),
    }


def probe(url: str, digit: bytes, stop: threading.Event, out: list[float], tally: Tally) -> threading.Thread:
    """The well-behaved client: one small request every 50 ms, its latency in ms."""
    body, headers = binary_body([digit])

    def body_fn(i: int) -> None:
        rid = request_id("probe")
        t = time.perf_counter()
        r = requests.post(
            f"{url}/v2/models/digits/infer",
            data=body,
            headers={"X-Request-ID": rid, "Accept-Encoding": "identity", **headers},  # as tritonclient asks
            timeout=60,
        )
        out.append((time.perf_counter() - t) * 1000)
        tally.add("probe", r.status_code, rid)

    return loop(stop, 0.05, body_fn)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--quiet-seconds", type=float, default=30, help="the probe alone first: its baseline")
    p.add_argument("--rate", type=float, default=40, help="valid requests/s from the load generator")
    p.add_argument("--repository", type=Path, default=ROOT / "models")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, prediction log)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    repo = work / "models"
    shutil.copytree(args.repository / "digits", repo / "digits")
    log_dir = work / "predictions"
    server = start_model_server(
        repo,
        work,
        "--prediction-log",
        str(log_dir),
        "--state-dir",
        str(work / "state"),
        "--mask-header",
        "x-user-id",
        token=TOKEN,
    )
    server.load_versions("digits", 1, 2)
    server.api.set_traffic("digits", TrafficPolicy.from_dict(MIRROR_ALL))
    [(_, digit, _)] = load_validation(repo / "digits" / "validation", limit=1)
    tally = Tally()
    stop = threading.Event()

    quiet: list[float] = []
    probe(server.http, digit, stop, quiet, tally)
    time.sleep(args.quiet_seconds)
    stop.set()
    time.sleep(0.5)

    stop = threading.Event()
    loaded: list[float] = []
    threads = [probe(server.http, digit, stop, loaded, tally)]
    for _name, (pause, fn) in hostile_kinds(server.http, tally, digit).items():
        threads.append(loop(stop, pause, fn))
    valid: Counter[str] = Counter()

    def valid_traffic() -> None:
        while not stop.is_set():
            s = run(
                LoadConfig(
                    url=server.url,
                    validation=repo / "digits" / "validation",
                    rate=args.rate,
                    duration_s=10,
                    feedback_share=0.3,
                    feedback_delay_s=0.5,
                )
            )
            valid["sent"] += s.sent
            valid["ok"] += s.ok
            valid["feedback_accepted"] += s.feedback_accepted

    threads.append(threading.Thread(target=valid_traffic, daemon=True))
    threads[-1].start()
    started = time.time()
    rss: list[tuple[float, int]] = []
    while time.time() - started < args.seconds and server.proc.poll() is None:
        rss.append((round(time.time() - started, 1), rss_kib(server.proc.pid)))
        time.sleep(1)
    peak_kib = rss_kib(server.proc.pid, "VmHWM") if server.proc.poll() is None else None
    alive = server.proc.poll() is None
    # The crash, with the traffic still flowing: SIGKILL, no flush at shutdown. Lost = primary
    # answers the bench's clients received that no record in the log holds.
    log_counts = (
        {
            o: server.metric("prediction_log_records_total", outcome=o)
            for o in ("written", "dropped", "mask_unavailable")
        }
        if alive
        else {}
    )
    killed_at = time.time()
    if alive:
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    df = predictionlog.read(
        str(log_dir), datetime.now(UTC) - timedelta(hours=2), datetime.now(UTC) + timedelta(minutes=5)
    )
    logged = set(df.loc[df["role"] == "primary", "request_id"])
    with tally.lock:
        answered = list(tally.answered)
    lost = [(at, rid) for at, rid in answered if rid not in logged]
    ages = sorted(killed_at - at for at, _ in lost)
    log_text = server.log.read_text(errors="replace")
    five_xx = {k: sum(n for s, n in c.items() if s.startswith("5")) for k, c in tally.statuses.items()}
    result = {
        "seconds": args.seconds,
        "rate": args.rate,
        "mirror_percent": 100,
        "crashes": {
            "server_alive_at_end": alive,
            "responses_5xx": five_xx,
            "tracebacks_in_log": log_text.count("Traceback"),
        },
        "probe_quiet": stats(quiet),
        "probe_under_soak": stats(loaded),
        "peak_rss_mib": round(peak_kib / 1024, 1) if peak_kib else None,
        "rss_mib_first_last": [round(rss[0][1] / 1024, 1), round(rss[-1][1] / 1024, 1)] if rss else None,
        "statuses": {k: dict(v) for k, v in sorted(tally.statuses.items())},
        "valid_traffic": dict(valid),
        "crash_loss": {
            "answered_tracked": len(answered),
            "lost": len(lost),
            "lost_share": round(len(lost) / max(len(answered), 1), 5),
            "oldest_lost_age_s": round(ages[-1], 2) if ages else 0.0,
            "flush_interval_s": 2.0,
            "lost_by_kind": dict(Counter(rid.rsplit("-", 1)[0] for _, rid in lost)),
            "lost_older_than_flush": [rid for at, rid in lost if killed_at - at > 3.0][:20],
        },
        "prediction_log_rows": len(df),
        "prediction_log_records_before_kill": log_counts,
    }
    write_result(args.out, "soak", result)
    print(
        json.dumps(
            {k: result[k] for k in ("crashes", "probe_quiet", "probe_under_soak", "peak_rss_mib", "crash_loss")},
            indent=2,
        )
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
