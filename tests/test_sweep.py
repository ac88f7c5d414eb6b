"""Sweeps on the tiny model: every combination runs once, lands in the experiments table, and
the compare plot shows the metric against the swept setting."""

from __future__ import annotations

import pandas as pd
import pytest

from headshot_kit.cli import main
from headshot_kit.config import ConfigError
from headshot_kit.evaluate import compare
from headshot_kit.sweep import parse_grid, plan_runs


def test_grid_settings_are_parsed_and_checked_before_running():
    runs = plan_runs("tiny", parse_grid(["rank=2,4", "lora_scale=0.5"]))
    assert [r[0] for r in runs] == ["rank=2_lora_scale=0.5", "rank=4_lora_scale=0.5"]
    assert runs[1][2].train.rank == 4 and runs[1][2].generate.lora_scale == 0.5
    with pytest.raises(ConfigError, match="not a train or generate setting"):
        plan_runs("tiny", parse_grid(["rnak=2,4"]))
    with pytest.raises(ConfigError, match="name=value1,value2"):
        parse_grid(["rank"])


def test_sweep_2x1_records_each_run_once_and_compares(prepared_dataset, tmp_path, capsys):
    argv = ["sweep", "--data", str(prepared_dataset), "--out", str(tmp_path), "--preset",
            "tiny", "--grid", "rank=2,8", "--grid", "steps=6", "--seeds", "0"]
    assert main(argv) == 0
    table = pd.read_csv(tmp_path / "experiments.csv")
    assert sorted(table["rank"]) == [2, 8] and set(table["steps"]) == {6}
    assert {"likeness_mean", "faces_found", "n_images"} <= set(table.columns)
    for run in ("rank=2_steps=6", "rank=8_steps=6"):
        assert (tmp_path / run / "scores" / "scores.csv").is_file()

    capsys.readouterr()
    assert main(argv) == 0  # a re-run skips finished combinations
    assert capsys.readouterr().out.count("already finished") == 2
    assert len(pd.read_csv(tmp_path / "experiments.csv")) == 2

    fig = compare(tmp_path / "experiments.csv", "rank", "n_images")
    assert fig.axes[0].get_xlabel() == "rank"
