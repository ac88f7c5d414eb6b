"""Shared bits of the benchmarks: where results go, and how time and memory are read.

Benchmarks report medians of repeated runs and peak resident memory; they assert nothing, since
the machines they run on are noisy. Each writes `results/bench/<name>.json`.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results" / "bench"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int = 3) -> tuple[float, list[float], object]:
    """Median seconds of `repeats` calls of `fn`, every timing, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def write_result(name: str, data: dict) -> Path:
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "machine": {"python": platform.python_version(), "cpu_count": _cpus(),
                    "torch": torch.__version__, "platform": platform.platform()},
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return path


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
