"""Sweeps: train, generate and evaluate every combination of a few settings, and compare.

`sweep(data, out, preset="tiny", grid={"rank": [4, 16], "lr": [1e-4, 5e-5]})` runs each
combination in its own folder, `<out>/<run id>/` (lora/, headshots/, scores/), and appends one
row per run to the experiments table (`<out>/experiments.csv`), so `evaluate.compare` can plot
any metric against any swept setting. A finished run leaves `done.json`; re-running the sweep
skips it, so a Colab disconnect costs one run at most (and that run's training resumes from its
checkpoint).

A grid name is any field of the train or generate config (`rank`, `lr`, `steps`, `lora_scale`,
`guidance`, ...); `seeds` are the generation seeds each run is judged over, and `train_seeds`
repeat every combination with other training seeds, so that `stats.seed_intervals` can tell a
setting's effect from a seed's.

Each run is one independent job (`run_job`). With `ray="auto"` (or a cluster's address) and
Ray installed, the jobs run on a Ray cluster, one GPU each, all writing to the shared `out`
folder; Ray retries a job whose worker is lost, and the retry resumes training from the run's
latest checkpoint. Without `ray` the jobs run here: on a machine with several GPUs (Kaggle's
two T4s) one run per GPU at a time (headshot_kit.multigpu), otherwise one after another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .config import ConfigError, Preset, get_preset, update_config
from .records import experiments_table, read_experiments
from .storage import atomic_write_text
from .workspace import HEADSHOTS, LORA, SCORES

# A lost worker (a preempted node, an out-of-memory kill) is retried this many times; each
# retry costs only the steps since the run's last checkpoint. Ray's docs: "Fault tolerance".
MAX_RETRIES = 3

Run = tuple[str, dict[str, Any], Preset]  # run id, its settings, the preset with them applied


class SweepError(RuntimeError):
    """Some runs of a sweep failed; the finished ones are recorded and skipped next time."""


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['rank=4,16', 'lr=1e-4,5e-5'] -> {'rank': ['4', '16'], 'lr': ['1e-4', '5e-5']}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        parsed = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not parsed:
            raise ConfigError(f"--grid {item!r}: write it as name=value1,value2, e.g. "
                              "--grid rank=4,16.")
        grid[name.strip()] = parsed
    return grid


def _stages_of(name: str, preset: Preset) -> list[str]:
    """The stages a grid name sets: every one that has it, so a setting two stages share
    (resolution, model, family) trains and renders with the same value."""
    stages = [s for s in ("train", "generate") if name in
              {f.name for f in dataclasses.fields(getattr(preset, s))}]
    if not stages:
        raise ConfigError(f"--grid {name}: not a train or generate setting. Sweepable settings "
                          "include rank, lr, steps, snr_gamma, lora_scale, guidance.")
    return stages


def plan_runs(preset_name: str, grid: dict[str, list[Any]], seeds: list[int] | None = None,
              train_seeds: list[int] | None = None) -> list[Run]:
    """Every combination (times every training seed) as (run id, its settings, the preset with
    them applied). All settings are checked before anything runs."""
    runs = []
    names = list(grid)
    for *values, train_seed in itertools.product(*(grid[n] for n in names),
                                                 train_seeds or [None]):
        preset = get_preset(preset_name)
        settings = dict(zip(names, values))
        for name, value in settings.items():
            for stage in _stages_of(name, preset):
                try:
                    cfg = update_config(getattr(preset, stage), {name: value}, source="--grid")
                except ConfigError as exc:  # before anything runs: the good values wait for a fix
                    raise ConfigError(f"--grid {name}={value}: {exc} Fix or drop that value; no "
                                      "run has started.") from None
                setattr(preset, stage, cfg)
                settings[name] = getattr(cfg, name)  # parsed to the setting's type
        if train_seed is not None:
            preset.train = update_config(preset.train, {"seed": train_seed},
                                         source="--train-seeds")
            settings["train_seed"] = preset.train.seed
        if seeds:
            preset.generate = update_config(preset.generate, {"seeds": list(seeds)})
        runs.append((safe_run_id(settings), settings, preset))
    return runs


def safe_run_id(settings: dict[str, Any]) -> str:
    """The run's folder name, `name=value_name=value`: one safe folder name whatever the
    values hold (a `../` or a `/` cannot lead outside the sweep's folder). A name that had to
    change carries a short hash of the settings, so two runs never share a folder."""
    text = "_".join(f"{n}={v}" for n, v in settings.items()) or "default"
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:150].lstrip(".") or "run"
    if safe != text:
        safe += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def run_job(data_dir: str | Path, out_dir: str | Path, run: Run, progress: bool = True):
    """Train, generate and evaluate one run in `<out_dir>/<run id>/`; its EvalResult, or None
    when the run had already finished.

    Safe to run again at any point: training resumes from the run's latest checkpoint, and the
    later stages rewrite their folders. Each attempt is logged in `attempts.jsonl` (which
    process, from which step, when) so a retried run shows where it picked up.
    """
    from .evaluate import evaluate_images
    from .generate import generate_pack
    from .train import latest_checkpoint, train_lora

    data_dir, folder = Path(data_dir), Path(out_dir) / run[0]
    if (folder / "done.json").is_file():
        return None
    _, _, preset = run
    checkpoint = latest_checkpoint(Path(preset.train.checkpoint_dir or folder / LORA /
                                        "checkpoints"))
    _log(folder, started=time.time(), host=socket.gethostname(),
         from_checkpoint=checkpoint.name if checkpoint else None)
    train_lora(data_dir, folder / LORA, preset.train, progress=progress)
    generate_pack(folder / LORA, folder / HEADSHOTS, preset.generate, progress=progress)
    result = evaluate_images(data_dir / "images", folder / HEADSHOTS, folder / SCORES,
                             preset.evaluate, run_id=run[0], progress=progress)
    _log(folder, finished=time.time())
    return result


def _log(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), **fields}) + "\n")


def _finish(result, run: Run, preset_name: str, table: Path, out_dir: Path) -> None:
    """Record a run in the experiments table, then mark it done (in that order, so a run that
    is marked done is always in the table)."""
    from .evaluate import record_experiment

    if result is None:  # another sweep of the same folder finished it meanwhile
        return
    run_id, settings, _ = run
    record_experiment(result, run_id=run_id, settings={"preset": preset_name, **settings},
                      table=table)
    folder = out_dir / run_id
    attempts = [json.loads(line) for line in (folder / "attempts.jsonl").read_text().splitlines()]
    starts = [a["started"] for a in attempts if "started" in a]
    ends = [a["finished"] for a in attempts if "finished" in a]
    atomic_write_text(folder / "done.json", json.dumps(
        {"run_id": run_id, **settings, "started": min(starts), "finished": max(ends),
         "attempts": len(starts)}, default=str) + "\n")


def sweep(data_dir: str | Path, out_dir: str | Path, *, preset: str = "tiny",
          grid: dict[str, list[Any]] | None = None, seeds: list[int] | None = None,
          train_seeds: list[int] | None = None, table: str | Path | None = None,
          progress: bool = True, ray: str | None = None) -> pd.DataFrame:
    """Run every combination not yet finished; return the experiments table.

    `ray`: a Ray cluster's address ("auto" for the one this machine belongs to, or
    "ray://host:10001"); the runs then go to the cluster. `data_dir` and `out_dir` must then be
    folders every node sees at the same path (a network or cloud-mounted disk). In a session
    that already called `ray.init()`, that connection is used.
    """
    from .config import validate_generate, validate_train

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    table = Path(table) if table else experiments_table(out_dir)
    runs = plan_runs(preset, grid or {}, seeds, train_seeds)
    for _, _, p in runs:
        validate_train(p.train)
        validate_generate(p.generate)
    todo = []
    for run in runs:
        if (out_dir / run[0] / "done.json").is_file():
            print(f"{run[0]}: already finished, skipped.")
        else:
            todo.append(run)
    from .multigpu import local_gpu_count, run_on_gpus

    if ray:
        _run_on_ray(ray, data_dir, out_dir, todo, preset, table)
    elif len(todo) > 1 and (gpus := local_gpu_count()) > 1:
        failed = run_on_gpus(data_dir, out_dir, todo, gpus, job_fn=run_job,
                             finish=lambda result, run: _finish(result, run, preset, table,
                                                                out_dir))
        if failed:
            raise SweepError(f"{len(failed)} of {len(todo)} runs failed: {'; '.join(failed)}. "
                             "Fix the cause and run the sweep again: finished runs are skipped.")
    else:
        failed = []
        for i, run in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {run[0]}")
            try:  # a failed run is reported and the others go on, as on Ray
                _finish(run_job(data_dir, out_dir, run, progress), run, preset, table, out_dir)
            except Exception as exc:
                print(f"{run[0]} failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
                failed.append(f"{run[0]} ({type(exc).__name__}: {str(exc).splitlines()[0]})")
        _report_failures(failed, len(todo))
    return read_experiments(table, missing_ok=True)


def _report_failures(failed: list[str], n_runs: int) -> None:
    if failed:
        raise SweepError(f"{len(failed)} of {n_runs} runs failed: {'; '.join(failed)}. "
                         "Their reasons are in the output above; fix the cause and run the "
                         "sweep again: finished runs are skipped.")


def estimate_cost(runs: list[Run], gpu: str = "t4") -> pd.DataFrame:
    """Each run's training time on `gpu` from the fit check's predicted step time (+-30% at
    best, see headshot_kit.fitcheck); generating and scoring add a few minutes a run."""
    from .fitcheck import fit_check

    rows = []
    for run_id, _, p in runs:
        plan = fit_check(p.train, gpu, suggest=False)
        rows.append({"run_id": run_id, "steps": p.train.steps, "fits": plan.fits,
                     "s_per_step": round(plan.step_seconds, 2),
                     "gpu_hours": plan.step_seconds * p.train.steps / 3600})
    return pd.DataFrame(rows)


def cost_summary(cost: pd.DataFrame, gpu: str = "t4", n_gpus: tuple[int, ...] = (1, 8)) -> str:
    """One line: the sweep's GPU hours and its wall-clock time on a few cluster sizes."""
    from .fitcheck import duration

    total = float(cost["gpu_hours"].sum())
    # With one job per GPU, no cluster finishes before its longest run.
    walls = [f"{duration(3600 * max(total / n, cost['gpu_hours'].max()))} on {n} GPU"
             f"{'s' * (n > 1)}" for n in n_gpus]
    line = (f"{len(cost)} runs, about {total:.1f} GPU hours of training on a {gpu} "
            f"(fit check, +-30%): " + ", ".join(walls) + ".")
    misfits = cost.loc[~cost["fits"], "run_id"].tolist()
    if misfits:
        line += (f" {len(misfits)} do not fit a {gpu} ({', '.join(misfits)}): run "
                 "headshot-kit fitcheck with their settings for the cheapest fix.")
    return line


# ---------------------------------------------------------------------------------------------
# Ray: an optional extra, imported only when a sweep is given a cluster.
# ---------------------------------------------------------------------------------------------

def connect_ray(address: str):
    """The `ray` module, connected to the cluster at `address` (or to the session's cluster)."""
    try:
        import ray
    except ImportError:
        raise ConfigError('Running a sweep on a cluster needs Ray: pip install '
                          '"headshot-kit[cluster]" (or leave out --ray to run it here).'
                          ) from None
    if not ray.is_initialized():
        try:
            ray.init(address=address)
        except ConnectionError as exc:
            raise ConfigError(f"No Ray cluster at {address!r} ({exc}); start one with "
                              "`ray start --head`, or give its address, e.g. "
                              "ray://head-node:10001.") from None
    return ray


def _run_on_ray(address: str, data_dir: Path, out_dir: Path, todo: list[Run], preset: str,
                table: Path) -> None:
    """Submit every run as a Ray task and record each as it finishes."""
    ray = connect_ray(address)
    # One GPU per job where there are GPUs; on a CPU-only cluster one core each.
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    job = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=MAX_RETRIES,
                     retry_exceptions=False)(run_job)
    # Inner progress bars would interleave in the driver's log; this bar counts runs instead.
    # Absolute paths: a worker's working folder is not the driver's.
    pending = {job.remote(str(data_dir.resolve()), str(out_dir.resolve()), run, False): run
               for run in todo}
    failed = []
    bar = tqdm(total=len(pending), desc=f"sweep on Ray ({'GPU' if gpus else 'CPU'})")
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(ready)
        try:
            _finish(ray.get(ready), run, preset, table, out_dir)
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            failed.append(f"{run[0]} ({type(cause).__name__}: {str(cause).splitlines()[0]})")
        bar.update()
        bar.set_postfix(run=run[0], failed=len(failed))
    bar.close()
    _report_failures(failed, len(todo))
