"""``python -m devstack.cluster``: run the one-machine cluster in the foreground until SIGTERM.

Starts the cluster (``Cluster.start``), installs each ``--model`` as production would have it
(version 1 at 100%), writes what clients need to ``--state`` (JSON: the API server, Prometheus,
the Services' data-plane ports, the Airflow connections; mode 0600, it holds the admin token),
then serves until SIGTERM or SIGINT, when every process it started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from devstack.cluster.cluster import Cluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devstack.cluster", description=__doc__)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--model", action="append", default=[], help="a model to install (repeatable; default digits)")
    p.add_argument("--replicas", type=int, default=2, help="pods of each model's version 1")
    p.add_argument("--scrape-interval", type=float, default=15.0, help="Prometheus' scrape interval, seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(args.workdir, args.repository, args.scrape_interval).start()
    try:
        models = args.model or ["digits"]
        for model in models:
            cluster.install(model, args.replicas)
        state = {
            **cluster.dump(),
            "pid": os.getpid(),
            "models": models,
            "connections": cluster.connections(),
        }
        tmp = args.state.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(args.state)
        print(f"cluster up: {json.dumps(cluster.dump())}", flush=True)
        stop.wait()
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
