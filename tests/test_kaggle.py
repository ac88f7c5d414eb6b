"""Kaggle as a home: model weights attached as an input are read with no network, and a GPU
that current torch builds no longer run (Kaggle's P100) is refused in one sentence."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from headshot_kit import models
from headshot_kit.config import ConfigError


def test_a_hub_model_attached_as_a_kaggle_input_loads_offline(tmp_path, monkeypatch):
    """Kaggle notebooks run without internet by default; the model attached with Add Input >
    Models is found under /kaggle/input by its name and loaded from there."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    inputs = tmp_path / "input"
    attached = inputs / "stable-diffusion-v1-5" / "pytorch" / "default" / "1"
    shutil.copytree(models.ensure_tiny_model("tiny-sd15"), attached)
    (inputs / "other-dataset").mkdir()
    monkeypatch.setattr(models, "KAGGLE_INPUT", inputs)
    model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert models.kaggle_input_model(model) == attached
    assert models.kaggle_input_model("stabilityai/stable-diffusion-xl-base-1.0") is None
    pipe = models.load_pipeline(model, "sd15")
    assert pipe.config._name_or_path == str(attached)


def test_a_gpu_older_than_current_torch_builds_is_refused_in_one_sentence(monkeypatch):
    with pytest.raises(ConfigError) as refused:
        models.check_gpu((6, 0), "Tesla P100-PCIE-16GB")
    message = str(refused.value)
    assert "Tesla P100-PCIE-16GB" in message and "6.0" in message and "GPU T4 x2" in message
    assert "\n" not in message
    models.check_gpu((7, 5), "Tesla T4")  # Kaggle's and Colab's T4: fine
    # Choosing the device is where every stage meets it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla P100-PCIE-16GB")
    with pytest.raises(ConfigError, match="P100"):
        models.pick_device("auto")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert models.pick_device("auto") == "cuda"


@pytest.mark.slow  # two tiny runs, each in a fresh process: minutes on a shared CPU
def test_a_sweep_uses_both_gpus_one_run_each_at_once(prepared_dataset, tmp_path, monkeypatch):
    """Kaggle's two T4s, faked on the CPU: the sweep runs two runs at once, each in its own
    process that sees one GPU only, and records both in the table."""
    import json

    import pandas as pd

    from headshot_kit import multigpu
    from headshot_kit.sweep import sweep

    monkeypatch.setattr(multigpu, "local_gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    table = sweep(prepared_dataset, tmp_path, preset="tiny", grid={"rank": [2, 4], "steps": [2]},
                  seeds=[0])
    assert sorted(table["rank"]) == [2, 4]
    runs = [tmp_path / "rank=2_steps=2", tmp_path / "rank=4_steps=2"]
    # One run per GPU: each ran in a process of its own with its own CUDA_VISIBLE_DEVICES...
    assert sorted(log.name for run in runs for log in run.glob("gpu*.log")) == ["gpu0.log",
                                                                               "gpu1.log"]
    pids = [json.loads(line)["pid"] for run in runs
            for line in (run / "attempts.jsonl").read_text().splitlines()][::2]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    # ...at the same time: each started before the other finished.
    spans = [json.loads((run / "done.json").read_text()) for run in runs]
    first, second = spans
    assert first["started"] < second["finished"] and second["started"] < first["finished"]
    assert len(pd.read_csv(tmp_path / "experiments.csv")) == 2
