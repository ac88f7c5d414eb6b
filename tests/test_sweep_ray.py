"""A sweep on a local Ray cluster: two runs at once, one worker killed mid-run and retried by
Ray, and the same LoRA weights and scores as the same sweep run here, one run after another;
a run whose own code fails is reported once, not retried.

Ray is an optional extra: without it this test is skipped, except in CI, where it must run.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from headshot_kit.sweep import SweepError, sweep
from headshot_kit.lora import LORA_WEIGHTS

GRID = {"rank": [2, 4], "steps": [20]}  # the tiny preset checkpoints every 10 steps
KILLED = "rank=4_steps=20"
TIMEOUT_S = 300  # the whole Ray sweep; a few seconds of work on two cores

# About two minutes (a local Ray cluster, four tiny runs): `make test` leaves it to CI.
pytestmark = pytest.mark.slow


def _ray():
    try:
        import ray
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Ray must be installed in CI ({exc}): pip install -e '.[cluster]'.")
        pytest.skip('Ray is not installed here: pip install "headshot-kit[cluster]".')
    return ray


def _single_threaded(fn):
    """Run `fn` with one torch thread, as each one-CPU Ray worker does (Ray sets
    OMP_NUM_THREADS=1): the same arithmetic in the same order gives the same bits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _kill_after_first_checkpoint(run: Path, deadline: float) -> int:
    """SIGKILL the worker training `run` once its first checkpoint is on disk; its pid."""
    while time.monotonic() < deadline:
        if any((run / "lora" / "checkpoints").glob("checkpoint-*/meta.json")):
            pid = json.loads((run / "attempts.jsonl").read_text().splitlines()[0])["pid"]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.02)
    pytest.fail(f"{run} wrote no checkpoint within {TIMEOUT_S} s.")


def _starts(run: Path) -> list[dict]:
    """The attempts.jsonl records of each time a job began the run."""
    records = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    return [r for r in records if "started" in r]


def test_ray_sweep_survives_a_killed_worker_and_matches_a_sequential_sweep(prepared_dataset,
                                                                           tmp_path):
    ray = _ray()
    from safetensors.torch import load_file

    from headshot_kit.models import ensure_tiny_model

    # Built before either sweep: building draws from torch's global generator after training
    # has seeded it, so the run that builds the model would start from other LoRA weights.
    ensure_tiny_model()
    here = _single_threaded(lambda: sweep(prepared_dataset, tmp_path / "here", preset="tiny",
                                          grid=GRID, seeds=[0], progress=False))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome: dict = {}

        def run_on_ray():
            try:
                outcome["table"] = sweep(prepared_dataset, tmp_path / "ray", preset="tiny",
                                         grid=GRID, seeds=[0], ray="auto")
            except BaseException as exc:  # reported by the test thread below
                outcome["error"] = exc

        driver = threading.Thread(target=run_on_ray, daemon=True)
        driver.start()
        deadline = time.monotonic() + TIMEOUT_S
        killed = _kill_after_first_checkpoint(tmp_path / "ray" / KILLED, deadline)
        driver.join(max(1.0, deadline - time.monotonic()))
        assert not driver.is_alive(), f"the Ray sweep took more than {TIMEOUT_S} s"

        # A job that fails in its own code is reported, not retried: it would fail again.
        with pytest.raises(SweepError, match=r"1 of 1 runs failed: rank=2 \(FileNotFoundError"):
            sweep(tmp_path / "no-dataset", tmp_path / "broken", preset="tiny",
                  grid={"rank": [2]}, ray="auto")
        assert len(_starts(tmp_path / "broken" / "rank=2")) == 1
    finally:
        ray.shutdown()
    if "error" in outcome:
        raise outcome["error"]

    # Ray retried the killed job in a new worker, which resumed from a checkpoint.
    first, retry = _starts(tmp_path / "ray" / KILLED)
    assert first["pid"] == killed and retry["pid"] != killed
    assert first["from_checkpoint"] is None and retry["from_checkpoint"].startswith("checkpoint-")
    # ...and trained on from there: the checkpoint the first attempt wrote is still the one on
    # disk, where a retry that started over (the same weights in the end: training is
    # deterministic) would have trained those steps again and written it anew.
    resumed = tmp_path / "ray" / KILLED / "lora" / "checkpoints" / retry["from_checkpoint"]
    assert (resumed / "meta.json").stat().st_mtime < retry["started"], (
        f"the retry wrote {resumed.name} again: it trained from step 0")
    done = {run: json.loads((tmp_path / "ray" / run / "done.json").read_text())
            for run in ("rank=2_steps=20", KILLED)}
    assert done[KILLED]["attempts"] == 2 and done["rank=2_steps=20"]["attempts"] == 1
    # The two runs were in flight at the same time.
    assert max(d["started"] for d in done.values()) < min(d["finished"] for d in done.values())

    # Same weights and same scores as the sequential sweep.
    for run in done:
        a = load_file(tmp_path / "here" / run / "lora" / LORA_WEIGHTS)
        b = load_file(tmp_path / "ray" / run / "lora" / LORA_WEIGHTS)
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] - b[key]).abs().max() <= 1e-6, f"{run}: {key} differs"
        pd.testing.assert_frame_equal(
            pd.read_csv(tmp_path / "here" / run / "scores" / "scores.csv"),
            pd.read_csv(tmp_path / "ray" / run / "scores" / "scores.csv"), atol=1e-6)
    keep = lambda t: (t.drop(columns=["recorded", "out_dir"]).sort_values("run_id")  # noqa: E731
                      .reset_index(drop=True))
    pd.testing.assert_frame_equal(keep(here), keep(outcome["table"]), atol=1e-6)
