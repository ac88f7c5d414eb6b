"""Sweeps on the tiny model: every combination runs once, lands in the experiments table, and
the compare plot shows the metric against the swept setting."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from safetensors.torch import load_file

from headshot_kit.cli import main
from headshot_kit.config import ConfigError
from headshot_kit.evaluate import compare
from headshot_kit.stats import seed_intervals
from headshot_kit.sweep import SweepError, cost_summary, parse_grid, plan_runs, sweep
from headshot_kit.lora import LORA_WEIGHTS


def test_grid_settings_are_parsed_and_checked_before_running():
    runs = plan_runs("tiny", parse_grid(["rank=2,4", "lora_scale=0.5"]))
    assert [r[0] for r in runs] == ["rank=2_lora_scale=0.5", "rank=4_lora_scale=0.5"]
    assert runs[1][2].train.rank == 4 and runs[1][2].generate.lora_scale == 0.5
    with pytest.raises(ConfigError, match="not a train or generate setting"):
        plan_runs("tiny", parse_grid(["rnak=2,4"]))
    with pytest.raises(ConfigError, match="name=value1,value2"):
        parse_grid(["rank"])


def test_a_sweep_names_its_settings(tmp_path):
    """Past the dataset and the out folder every setting of a sweep is named: a preset and a
    grid passed by position are refused before anything runs."""
    from headshot_kit.sweep import sweep

    with pytest.raises(TypeError):
        sweep(tmp_path / "data", tmp_path / "out", "tiny", {"rank": [2]})
    assert not (tmp_path / "out").exists()


def test_a_grid_sweeps_the_background_weight():
    runs = plan_runs("tiny", parse_grid(["background_weight=0.1,1"]))
    assert [r[0] for r in runs] == ["background_weight=0.1", "background_weight=1.0"]
    assert [r[2].train.background_weight for r in runs] == [0.1, 1.0]


def test_sweep_2x1_records_each_run_once_and_compares(prepared_dataset, tmp_path, capsys):
    argv = ["sweep", "--data", str(prepared_dataset), "--out", str(tmp_path), "--preset",
            "tiny", "--grid", "rank=2,8", "--grid", "steps=6", "--seeds", "0"]
    assert main(argv) == 0
    table = pd.read_csv(tmp_path / "experiments.csv")
    assert sorted(table["rank"]) == [2, 8] and set(table["steps"]) == {6}
    assert {"likeness_mean", "faces_found", "n_images"} <= set(table.columns)
    for rank in (2, 8):
        run = tmp_path / f"rank={rank}_steps=6"
        # The setting reached the weights: every LoRA down-projection has `rank` rows.
        weights = load_file(run / "lora" / LORA_WEIGHTS)
        downs = [v for k, v in weights.items() if "lora.down" in k or "lora_A" in k]
        assert downs and {v.shape[0] for v in downs} == {rank}
        assert len(pd.read_csv(run / "lora" / "metrics.csv")) == 6  # one row per step
        scores = pd.read_csv(run / "scores" / "scores.csv")
        row = table[table["rank"] == rank].iloc[0]
        assert row["n_images"] == len(scores) == 3 * 1  # three styles, one seed
        assert row["same_person_rate"] == scores["same_person"].mean()
    # The intervals read each run's images through the table's out_dir column.
    intervals = seed_intervals(table, ["rank"], ["same_person_rate"])
    assert list(intervals["n_images"]) == [3, 3] and list(intervals["n_runs"]) == [1, 1]
    assert list(intervals["estimate"]) == list(table.sort_values("rank")["same_person_rate"])

    capsys.readouterr()
    assert main(argv) == 0  # a re-run skips finished combinations
    assert capsys.readouterr().out.count("already finished") == 2
    assert len(pd.read_csv(tmp_path / "experiments.csv")) == 2

    fig = compare(tmp_path / "experiments.csv", "rank", "n_images")
    assert fig.axes[0].get_xlabel() == "rank"


def test_a_run_lost_mid_training_is_resumed_by_the_next_sweep(prepared_dataset, tmp_path,
                                                              monkeypatch):
    """What a Ray retry or a re-run after a disconnect does, here: the sweep's second attempt
    at a run trains only the steps after the run's last checkpoint."""
    import headshot_kit.train as train

    real_train_lora, seen, stop = train.train_lora, [], {"at": 5}

    def watched(*args, **kwargs):
        def on_step(trainer, record):
            seen.append(record["step"])
            if record["step"] == stop["at"]:
                raise RuntimeError("worker lost")
        return real_train_lora(*args, **kwargs, on_step=on_step)

    monkeypatch.setattr(train, "train_lora", watched)
    grid = {"steps": [6], "checkpoint_every": [3], "validate_every": [0]}
    out = tmp_path / "sweep"
    with pytest.raises(SweepError, match=r"1 of 1 runs failed: .*RuntimeError: worker lost"):
        sweep(prepared_dataset, out, preset="tiny", grid=grid, seeds=[0], progress=False)
    assert seen == [1, 2, 3, 4, 5]
    seen.clear()
    stop["at"] = None
    table = sweep(prepared_dataset, out, preset="tiny", grid=grid, seeds=[0], progress=False)
    assert seen == [3, 4, 5, 6]  # where the checkpoint stands, then the steps left
    [run] = table["run_id"]
    starts = [r for r in map(json.loads, (out / run / "attempts.jsonl").read_text().splitlines())
              if "started" in r]
    assert [s["from_checkpoint"] for s in starts] == [None, "checkpoint-0000003"]
    # What the Ray test reads where it cannot watch the steps: the first attempt's checkpoint
    # was not written again by the second.
    meta = out / run / "lora" / "checkpoints" / "checkpoint-0000003" / "meta.json"
    assert meta.stat().st_mtime < starts[1]["started"]
    assert json.loads((out / run / "done.json").read_text())["attempts"] == 2
    assert list(pd.read_csv(out / run / "lora" / "metrics.csv")["step"]) == [1, 2, 3, 4, 5, 6]


def test_training_seeds_repeat_every_combination():
    runs = plan_runs("tiny", parse_grid(["rank=2,4"]), train_seeds=[0, 1])
    assert [r[0] for r in runs] == ["rank=2_train_seed=0", "rank=2_train_seed=1",
                                    "rank=4_train_seed=0", "rank=4_train_seed=1"]
    assert [r[2].train.seed for r in runs] == [0, 1, 0, 1]
    assert runs[3][1] == {"rank": 4, "train_seed": 1}


def test_dry_run_prints_the_gpu_hours_without_training(tmp_path, capsys):
    argv = ["sweep", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"),
            "--preset", "tiny", "--grid", "rank=4", "--train-seeds", "0", "1", "2", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 runs, about" in out and "GPU hours of training on a t4" in out
    assert not (tmp_path / "out").exists()


def test_cost_line_counts_gpu_hours_and_names_runs_that_do_not_fit():
    cost = pd.DataFrame({"run_id": ["rank=4", "rank=16", "rank=64"], "fits": [True, True, False],
                         "gpu_hours": [0.5, 1.0, float("nan")]})
    line = cost_summary(cost, "t4", n_gpus=(1, 8))
    # One GPU runs both in turn; eight GPUs wait for the longest run.
    assert "about 1.5 GPU hours" in line and "1 h 30 min on 1 GPU, 1 h 00 min on 8 GPUs" in line
    assert "1 do not fit a t4 (rank=64)" in line


def test_ray_is_optional_and_its_absence_is_one_line(monkeypatch, tmp_path, capsys):
    code = ("import sys, headshot_kit.sweep, headshot_kit.cli, headshot_kit.stats; "
            "print('ray' in sys.modules)")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, timeout=120).stdout.strip()
    assert imported == "False"  # the normal path never imports Ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is absent
    argv = ["sweep", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--grid",
            "rank=2", "--ray", "auto"]
    assert main(argv) == 2
    banner, *said = capsys.readouterr().err.strip().splitlines()
    assert banner.startswith("headshot-kit sweep: preset ")
    assert len(said) == 1 and 'pip install "headshot-kit[cluster]"' in said[0]


def test_a_setting_two_stages_share_reaches_both():
    """resolution and model are train and generate settings alike: a run trains and renders
    with the swept value (it once reached training only, and generate refused the LoRA)."""
    [run] = plan_runs("tiny", parse_grid(["resolution=128", "model=tiny-sdxl",
                                          "family=sdxl"]))
    train, generate = run[2].train, run[2].generate
    assert (train.resolution, generate.resolution) == (128, 128)
    assert (train.model, generate.model) == ("tiny-sdxl", "tiny-sdxl")
    assert (train.family, generate.family) == ("sdxl", "sdxl")
    assert run[1] == {"resolution": 128, "model": "tiny-sdxl", "family": "sdxl"}
