"""The fine-tune stage on the tiny model: it learns, saves a LoRA diffusers can load, and the
optimizer it runs is the 8-bit one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from headshot_kit import models
from headshot_kit.config import ConfigError, get_preset
from headshot_kit.train import LORA_WEIGHTS, Trainer, load_dataset, optimizer_state_dtypes

PROMPT = "a photo of ohwx person"


def render(pipe, seed: int = 0) -> np.ndarray:
    image = pipe(PROMPT, num_inference_steps=4, height=64, width=64,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def trained(prepared_dataset, tmp_path_factory):
    """A 30-step run of the tiny preset, with the fixed-batch loss before and after."""
    cfg = get_preset("tiny").train
    trainer = Trainer(prepared_dataset, tmp_path_factory.mktemp("lora"), cfg)
    before = trainer.fixed_loss()
    result = trainer.run(progress=False)
    return trainer, result, before, trainer.fixed_loss()


def test_loss_on_a_fixed_batch_falls(trained):
    _, result, before, after = trained
    assert len(result.metrics) == 30
    # Same noise, same timesteps, same images: only the LoRA changed.
    assert after < before * 0.97, (before, after)


def test_run_writes_lora_config_metrics_and_curve(trained):
    _, result, _, _ = trained
    for name in (LORA_WEIGHTS, "config.json", "metrics.csv", "loss.png"):
        assert (result.out_dir / name).is_file(), name
    assert result.metrics["loss"].notna().all()


def test_optimizer_state_is_8bit(trained):
    trainer = trained[0]
    pytest.importorskip("bitsandbytes")
    assert trainer.optimizer_name == "bitsandbytes AdamW8bit"
    # Both Adam moments are stored as uint8 (their scales stay fp32).
    state = next(iter(trainer.optimizer.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert torch.uint8 in optimizer_state_dtypes(trainer.optimizer)


def test_saved_lora_loads_in_diffusers_and_matches_memory(trained):
    trainer, result, _, _ = trained
    pipe = trainer.pipe
    pipe.unet = trainer.accelerator.unwrap_model(trainer.unet).eval()
    in_memory = render(pipe)

    fresh = models.load_pipeline(trainer.cfg.model)
    base = render(fresh)
    fresh.load_lora_weights(str(result.out_dir))
    loaded = render(fresh)

    assert np.abs(loaded - in_memory).max() <= 1  # the same image, bar rounding
    assert np.abs(loaded - base).mean() > 2  # and the LoRA really changed it


def test_bad_settings_fail_before_loading(prepared_dataset, tmp_path):
    cfg = dataclasses.replace(get_preset("tiny").train, rank=0)
    with pytest.raises(ConfigError, match="rank"):
        Trainer(prepared_dataset, tmp_path, cfg)


def test_missing_dataset_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_dataset(tmp_path)
