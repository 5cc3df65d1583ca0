"""Benchmarks: side-by-side comparisons in one process run that print ratios (the machine is shared
and noisy, absolute times drift); results in bench/results/, the table in BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = _gpu_name()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "onnxruntime": _onnxruntime_version(),
        "execution_provider": "CUDAExecutionProvider" if gpu else "CPUExecutionProvider",
    }


def _gpu_name() -> str | None:
    """The first GPU's name and driver as nvidia-smi gives them, or None without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def _onnxruntime_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def write_result(out: Path, benchmark: str, result: dict[str, Any]) -> None:
    """The result as JSON in ``out`` (its folder made), named, dated, with the machine it ran on."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "machine": machine()}
    rest = {k: v for k, v in result.items() if k not in stamp}  # a result read back keeps this run's stamp
    out.write_text(json.dumps({**stamp, **rest}, indent=2, default=str) + "\n")
    print(f"wrote {out}")
