"""Sweeps on a machine with several GPUs (Kaggle's two T4s): one run per GPU at a time.

Each run is a child process that sees one GPU only (CUDA_VISIBLE_DEVICES set before it
starts, so torch in it never touches the other card) and calls the job function it is given
(the sweep's `run_job`, exactly as a Ray worker would; it travels by name in the job file);
the parent hands each finished run to `finish` (the sweep records it in the experiments
table), one at a time, so the table is never written by two processes at once. A run's
output goes to `<out>/<run id>/gpu<N>.log`. A failed run is reported and the others go on;
finished runs are skipped when the sweep is run again, as everywhere.
"""

from __future__ import annotations

import os
import pickle
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable


def local_gpu_count() -> int:
    """The GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_on_gpus(data_dir: Path, out_dir: Path, todo: list, gpus: int, *,
                job_fn: Callable, finish: Callable) -> list[str]:
    """Run `todo` on `gpus` GPUs, one run per GPU at a time: `job_fn(data_dir, out_dir, run,
    progress=False)` in a child process, then `finish(result, run)` here as each finishes.
    Returns the failed runs, each with its exit status and log."""
    jobs: queue.Queue = queue.Queue()
    for run in todo:
        jobs.put(run)
    record, failed = threading.Lock(), []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",")[:gpus] if visible else [str(i) for i in range(gpus)]
    print(f"{len(todo)} runs on {len(devices)} GPUs, one run per GPU at a time.")

    def worker(device: str) -> None:
        while True:
            try:
                run = jobs.get_nowait()
            except queue.Empty:
                return
            folder = out_dir / run[0]
            folder.mkdir(parents=True, exist_ok=True)
            job, result = folder / "job.pkl", folder / "result.pkl"
            job.write_bytes(pickle.dumps((job_fn, str(data_dir.resolve()), str(out_dir.resolve()),
                                          run)))
            with open(folder / f"gpu{device}.log", "w") as log:
                proc = subprocess.run([sys.executable, "-m", "headshot_kit.multigpu", str(job),
                                       str(result)], stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "CUDA_VISIBLE_DEVICES": device})
            with record:
                if proc.returncode:
                    failed.append(f"{run[0]} (exit {proc.returncode}, see "
                                  f"{folder / f'gpu{device}.log'})")
                    print(f"{run[0]}: failed on GPU {device}.")
                else:
                    finish(pickle.loads(result.read_bytes()), run)
                    print(f"{run[0]}: done on GPU {device}.")
            job.unlink(missing_ok=True)
            result.unlink(missing_ok=True)

    threads = [threading.Thread(target=worker, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed


def _child(job: str, result: str) -> None:
    job_fn, data_dir, out_dir, run = pickle.loads(Path(job).read_bytes())
    Path(result).write_bytes(pickle.dumps(job_fn(data_dir, out_dir, run, progress=False)))


if __name__ == "__main__":
    _child(*sys.argv[1:3])
