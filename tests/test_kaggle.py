"""Kaggle as a home: model weights attached as an input are read with no network, and a GPU
that current torch builds no longer run (Kaggle's P100) is refused in one sentence."""

from __future__ import annotations

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
