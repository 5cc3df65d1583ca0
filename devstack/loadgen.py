"""``python -m devstack.loadgen`` (from the checkout; no console script): replay the digits validation images as traffic.

Open loop at a target rate (requests are scheduled, not sent back to back), from several
users with device types, tenants and realistic sensitive-looking metadata (phone numbers,
e-mail addresses, ID and card numbers, which the shadow log must mask), through tritonclient.
A share of requests gets its true label posted as feedback after a delay. Stops by itself
after ``--duration`` seconds or ``--requests`` requests and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vision_rollout.replay import load_validation

DEVICES = ("ios", "android", "web")
MAX_FAILURES = 20


@dataclass
class LoadConfig:
    url: str = "127.0.0.1:8000"
    model: str = "digits"
    validation: Path = Path("models/digits/validation")
    rate: float = 20.0  # requests per second; 0: as fast as the workers go
    duration_s: float = 10.0
    max_requests: int | None = None
    concurrency: int = 4
    users: int = 200
    tenants: tuple[str, ...] = ("acme", "globex", "initech")
    feedback_share: float = 0.5
    feedback_delay_s: float = 2.0
    seed: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadStats:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # the first MAX_FAILURES, each with its reason
    served: Counter[str] = field(default_factory=Counter)
    correct: Counter[str] = field(default_factory=Counter)
    feedback_posted: int = 0
    feedback_accepted: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        return {
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(self.errors),
            "failures": self.failures,
            "served_by_version": dict(self.served),
            "accuracy_by_version": {v: self.correct[v] / n for v, n in self.served.items()},
            "feedback_posted": self.feedback_posted,
            "feedback_accepted": self.feedback_accepted,
            "achieved_rps": self.sent / self.elapsed_s if self.elapsed_s else 0.0,
            "p50_ms": lat[len(lat) // 2] if lat else None,
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        }


def sensitive_metadata(rng: random.Random, user: int) -> dict[str, str]:
    """Headers that look like what real clients leak: the masking must catch all of them."""
    phone = f"1{rng.choice('3456789')}{rng.randrange(10**9):09d}"
    meta = {
        "X-Meta-Contact": f"{phone}",
        "X-Meta-Email": f"user{user}@example.com",
        "X-Meta-Note": f"callback +86 {phone[:3]} {phone[3:7]} {phone[7:]}",
    }
    if rng.random() < 0.2:
        birth = f"{rng.randrange(1950, 2005)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
        meta["X-Meta-Id"] = f"110105{birth}{rng.randrange(1000):03d}{rng.choice('0123456789X')}"
    if rng.random() < 0.2:
        meta["X-Meta-Card"] = " ".join(f"{rng.randrange(10000):04d}" for _ in range(4))
    return meta


class FeedbackPoster:
    """Posts due labels in batches from a thread of its own."""

    def __init__(self, cfg: LoadConfig, stats: LoadStats, lock: threading.Lock):
        self.cfg, self.stats, self.lock = cfg, stats, lock
        self.due: list[tuple[float, str, int, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def add(self, request_id: str, label: int, tenant: str, token: str) -> None:
        with self.lock:
            self.due.append((time.monotonic() + self.cfg.feedback_delay_s, request_id, label, tenant, token))

    def _post(self, items: list[dict[str, Any]]) -> None:
        req = urllib.request.Request(
            f"http://{self.cfg.url}/v2/models/{self.cfg.model}/feedback",
            data=json.dumps(items).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 (our own server)
                results = json.loads(r.read())["results"]
        except (urllib.error.URLError, OSError, ValueError, KeyError):
            results = []
        with self.lock:
            self.stats.feedback_posted += len(items)
            self.stats.feedback_accepted += sum(1 for x in results if x.get("status") == 200)

    def flush(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            ready = [d for d in self.due if everything or d[0] <= now]
            self.due = [d for d in self.due if not (everything or d[0] <= now)]
        for i in range(0, len(ready), 200):
            # The tenant, so that a replica that did not serve the request masks its id alike.
            batch = ready[i : i + 200]
            self._post(
                [{"request_id": rid, "label": label, "tenant": t, "token": token} for _, rid, label, t, token in batch]
            )

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.flush()

    def close(self) -> None:
        """Wait for the last labels to fall due, then post them."""
        deadline = time.monotonic() + self.cfg.feedback_delay_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush(everything=True)


def run(cfg: LoadConfig) -> LoadStats:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    samples = [(image, label) for _, image, label in load_validation(cfg.validation)]
    stats = LoadStats()
    lock = threading.Lock()
    poster = FeedbackPoster(cfg, stats, lock)
    counter = iter(range(10**12))
    start = time.monotonic()
    stop_at = start + cfg.duration_s

    def worker(n: int) -> None:
        rng = random.Random(cfg.seed * 1000 + n)  # noqa: S311 (seeded traffic, not secrets)
        client = httpclient.InferenceServerClient(cfg.url, connection_timeout=30, network_timeout=60)
        output = [httpclient.InferRequestedOutput("probabilities", binary_data=True)]
        while True:
            with lock:
                i = next(counter)
            if cfg.max_requests is not None and i >= cfg.max_requests:
                return
            due = start + i / cfg.rate if cfg.rate > 0 else time.monotonic()
            if due >= stop_at:
                return
            time.sleep(max(0.0, due - time.monotonic()))
            image, label = samples[rng.randrange(len(samples))]
            user = rng.randrange(cfg.users)
            rid = uuid.uuid4().hex
            tenant = cfg.tenants[user % len(cfg.tenants)]
            headers = {
                "X-Request-ID": rid,
                "X-User-ID": f"user-{user}",
                "X-Device-Type": rng.choice(DEVICES),
                "X-Tenant": tenant,
                **sensitive_metadata(rng, user),
                **cfg.headers,
            }
            inp = httpclient.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(np.array([image], dtype=object))
            t = time.perf_counter()
            try:
                result = client.infer(cfg.model, [inp], outputs=output, headers=headers)
            except (InferenceServerException, OSError, http.client.HTTPException) as exc:  # refused, reset, closed
                status = exc.status() if isinstance(exc, InferenceServerException) else None
                with lock:
                    stats.sent += 1
                    stats.errors[str(status or "connection")] += 1
                    if len(stats.failures) < MAX_FAILURES:
                        stats.failures.append(f"request {rid}: {status or type(exc).__name__}: {str(exc)[:300]}")
                continue
            latency = (time.perf_counter() - t) * 1000
            response = result.get_response()
            version = response["model_version"]
            correct = int(result.as_numpy("probabilities")[0].argmax() == label)
            with lock:
                stats.sent += 1
                stats.ok += 1
                stats.served[version] += 1
                stats.correct[version] += correct
                stats.latencies_ms.append(latency)
            if rng.random() < cfg.feedback_share:
                poster.add(rid, label, tenant, response["parameters"]["feedback_token"])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(cfg.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats.elapsed_s = time.monotonic() - start
    poster.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m devstack.loadgen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="127.0.0.1:8000", help="model server host:port")
    p.add_argument("--model", default="digits")
    p.add_argument("--validation", type=Path, default=Path("models/digits/validation"))
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (0: unthrottled)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to run")
    p.add_argument("--requests", type=int, help="stop after this many requests")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--feedback-share", type=float, default=0.5)
    p.add_argument("--feedback-delay", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--header", action="append", default=[], metavar="NAME=VALUE", help="extra header")
    args = p.parse_args(argv)
    extra = dict(h.split("=", 1) for h in args.header)
    cfg = LoadConfig(
        url=args.url,
        model=args.model,
        validation=args.validation,
        rate=args.rate,
        duration_s=args.duration,
        max_requests=args.requests,
        concurrency=args.concurrency,
        users=args.users,
        feedback_share=args.feedback_share,
        feedback_delay_s=args.feedback_delay,
        seed=args.seed,
        headers=extra,
    )
    print(json.dumps(run(cfg).summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
