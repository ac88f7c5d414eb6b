"""Sweeps: train, generate and evaluate every combination of a few settings, and compare.

`sweep(data, out, "tiny", {"rank": [4, 16], "lr": [1e-4, 5e-5]})` runs each combination in its
own folder, `<out>/<run id>/` (lora/, headshots/, scores/), and appends one row per run to the
experiments table (`<out>/experiments.csv`), so `evaluate.compare` can plot any metric against
any swept setting. A finished run leaves `done.json`; re-running the sweep skips it, so a Colab
disconnect costs one run at most (and that run's training resumes from its checkpoint).

A grid name is any field of the train or generate config (`rank`, `lr`, `steps`, `lora_scale`,
`guidance`, ...); `seeds` are the generation seeds each run is judged over.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pandas as pd

from .config import ConfigError, Preset, get_preset, update_config
from .workspace import HEADSHOTS, LORA, SCORES


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


def _stage_of(name: str, preset: Preset) -> str:
    stages = [s for s in ("train", "generate") if name in
              {f.name for f in dataclasses.fields(getattr(preset, s))}]
    if not stages:
        raise ConfigError(f"--grid {name}: not a train or generate setting. Sweepable settings "
                          "include rank, lr, steps, snr_gamma, lora_scale, guidance.")
    return stages[0]


def plan_runs(preset_name: str, grid: dict[str, list[Any]], seeds: list[int] | None = None,
              ) -> list[tuple[str, dict[str, Any], Preset]]:
    """Every combination as (run id, its settings, the preset with them applied).

    All settings are checked before anything runs."""
    runs = []
    names = list(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        preset = get_preset(preset_name)
        settings = dict(zip(names, values))
        for name, value in settings.items():
            stage = _stage_of(name, preset)
            cfg = update_config(getattr(preset, stage), {name: value}, source="--grid")
            setattr(preset, stage, cfg)
            settings[name] = getattr(cfg, name)  # parsed to the setting's type
        if seeds:
            preset.generate = update_config(preset.generate, {"seeds": list(seeds)})
        run_id = "_".join(f"{n}={settings[n]}" for n in names) or "default"
        runs.append((run_id, settings, preset))
    return runs


def sweep(data_dir: str | Path, out_dir: str | Path, preset: str = "tiny",
          grid: dict[str, list[Any]] | None = None, seeds: list[int] | None = None,
          table: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """Run every combination not yet finished; return the experiments table."""
    from .config import validate_generate, validate_train
    from .evaluate import evaluate_images, record_experiment
    from .generate import generate_pack
    from .train import train_lora

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    table = Path(table) if table else out_dir / "experiments.csv"
    runs = plan_runs(preset, grid or {}, seeds)
    for _, _, p in runs:
        validate_train(p.train)
        validate_generate(p.generate)
    for i, (run_id, settings, p) in enumerate(runs, 1):
        folder = out_dir / run_id
        if (folder / "done.json").is_file():
            print(f"[{i}/{len(runs)}] {run_id}: already finished, skipped.")
            continue
        print(f"[{i}/{len(runs)}] {run_id}")
        train_lora(data_dir, folder / LORA, p.train, progress=progress)
        generate_pack(folder / LORA, folder / HEADSHOTS, p.generate, progress=progress)
        result = evaluate_images(data_dir / "images", folder / HEADSHOTS, folder / SCORES,
                                 p.evaluate, run_id=run_id)
        record_experiment(result, run_id=run_id, settings={"preset": preset, **settings},
                          table=table)
        (folder / "done.json").write_text(json.dumps({"run_id": run_id, **settings},
                                                     default=str) + "\n")
    return pd.read_csv(table) if table.is_file() else pd.DataFrame()
