"""The fine-tune stage on tiny models: it learns, saves LoRAs that diffusers loads, runs the
8-bit optimizer, survives interruptions exactly, and guards against NaN."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from headshot_kit import models
from headshot_kit.config import ConfigError, get_preset
from headshot_kit.lora import KOHYA_WEIGHTS, LORA_WEIGHTS, peft_state
from headshot_kit.train import (Trainer, TrainingDiverged, latest_checkpoint, load_dataset,
                                optimizer_state_dtypes, train_lora)

PROMPT = "a photo of ohwx person"


def tiny(**changes):
    return dataclasses.replace(get_preset("tiny").train, **changes)


def render(pipe, seed: int = 0) -> np.ndarray:
    image = pipe(PROMPT, num_inference_steps=4, height=64, width=64,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def trained(prepared_dataset, tmp_path_factory):
    """A 30-step run of the tiny preset, with the fixed-batch loss before and after."""
    trainer = Trainer(prepared_dataset, tmp_path_factory.mktemp("lora"), tiny(), progress=False)
    before = trainer.fixed_loss()
    result = trainer.run()
    return trainer, result, before, trainer.fixed_loss()


def test_loss_on_a_fixed_batch_falls(trained):
    trainer, result, before, after = trained
    assert len(result.metrics) == 30
    # The tiny preset trains with the face-weighted loss (background_weight 0.1).
    assert trainer.weights is not None and trainer.cfg.background_weight == 0.1
    # Same noise, same timesteps, same images: only the LoRA changed.
    assert after < before * 0.97, (before, after)


def test_run_writes_lora_records_and_model_card(trained):
    _, result, _, _ = trained
    for name in (LORA_WEIGHTS, KOHYA_WEIGHTS, "config.json", "metrics.csv", "loss.png",
                 "README.md"):
        assert (result.out_dir / name).is_file(), name
    assert result.metrics["loss"].notna().all()
    card = (result.out_dir / "README.md").read_text()
    assert "tiny-sd15" in card and "rank 4" in card
    assert json.loads((result.out_dir / "config.json").read_text())["optimizer_used"]


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
    trainer.unet.eval()
    in_memory = render(trainer.pipe)

    fresh = models.load_pipeline(trainer.cfg.model)
    base = render(fresh)
    fresh.load_lora_weights(str(result.out_dir))
    loaded = render(fresh)

    assert np.abs(loaded - in_memory).max() <= 1  # the same image, bar rounding
    assert np.abs(loaded - base).mean() > 2  # and the LoRA really changed it


def test_kohya_export_has_kohya_names(trained):
    result = trained[1]
    kohya = load_file(str(result.out_dir / KOHYA_WEIGHTS))
    diffusers_keys = load_file(str(result.lora_path))
    assert ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
            ".lora_down.weight") in kohya
    modules = {k.split(".")[0] for k in kohya}
    # Every module has its down, up and alpha; nothing else.
    assert len(kohya) == 3 * len(modules) == 3 * len(diffusers_keys) // 2
    assert all(k.startswith("lora_unet_") for k in kohya)
    alpha = kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]
    assert float(alpha) == 4.0


def test_resumed_run_matches_uninterrupted(prepared_dataset, tmp_path):
    cfg = tiny(steps=12, checkpoint_every=0, lr_scheduler="linear", lora_dropout=0.1)
    whole = Trainer(prepared_dataset, tmp_path / "whole", cfg, progress=False)
    whole.run()

    cut = Trainer(prepared_dataset, tmp_path / "cut", cfg, progress=False)
    for _ in range(5):
        cut.train_step()
    cut.save_checkpoint()
    for _ in range(3):  # steps after the checkpoint are lost with the process
        cut.train_step()
    del cut

    resumed = Trainer(prepared_dataset, tmp_path / "cut", cfg, progress=False)
    assert resumed.step == 5 and resumed.resumed_from is not None
    resumed.run()
    a, b = peft_state(whole.pipe.unet), peft_state(resumed.pipe.unet)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_resume_refuses_other_settings(prepared_dataset, tmp_path):
    trainer = Trainer(prepared_dataset, tmp_path, tiny(steps=2), progress=False)
    trainer.train_step()
    trainer.save_checkpoint()
    with pytest.raises(ConfigError, match="rank") as refused:
        Trainer(prepared_dataset, tmp_path, tiny(steps=2, rank=8), progress=False)
    # Only what changed is named: target_modules came back from JSON as a list, still equal.
    assert "target_modules" not in str(refused.value)


def test_rerun_of_a_finished_run_with_other_lr_is_refused_and_config_kept(prepared_dataset,
                                                                           tmp_path):
    cfg = tiny(steps=4, checkpoint_every=0, validate_every=0)
    train_lora(prepared_dataset, tmp_path, cfg, progress=False)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"lr 0\.003 \(now 0\.001\)") as refused:
        train_lora(prepared_dataset, tmp_path, tiny(steps=4, lr=1e-3), progress=False)
    assert "rank" not in str(refused.value)
    assert (tmp_path / "config.json").read_text() == before


def test_fewer_steps_than_the_checkpoint_says_so(prepared_dataset, tmp_path):
    cfg = tiny(steps=4, checkpoint_every=0, validate_every=0)
    train_lora(prepared_dataset, tmp_path, cfg, progress=False)
    with pytest.raises(ConfigError, match="already at step 4, more than steps=2"):
        Trainer(prepared_dataset, tmp_path, tiny(steps=2), progress=False)


def test_rerun_with_more_steps_trains_them_and_records_them(prepared_dataset, tmp_path):
    cfg = tiny(steps=3, checkpoint_every=0, validate_every=0)
    train_lora(prepared_dataset, tmp_path, cfg, progress=False)
    seen = []
    result = train_lora(prepared_dataset, tmp_path, tiny(steps=5, checkpoint_every=0,
                                                          validate_every=0),
                        progress=False, on_step=lambda t, r: seen.append(r["step"]))
    # The watcher first hears where the resumed run stands, then each new step.
    assert seen == [3, 4, 5]
    assert list(result.metrics["step"]) == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 5


def test_a_finished_run_tells_its_watcher_it_is_done(prepared_dataset, tmp_path):
    from headshot_kit.widgets import TrainingMonitor

    cfg = tiny(steps=3, checkpoint_every=0, validate_every=0)
    train_lora(prepared_dataset, tmp_path, cfg, progress=False)
    monitor = TrainingMonitor()
    train_lora(prepared_dataset, tmp_path, cfg, progress=False, **monitor.callbacks())
    assert monitor.status.value.startswith("finished: step 3 of 3")
    assert monitor.loss.value[:4] == b"\x89PNG"


def test_subject_comes_from_the_dataset_and_a_disagreeing_one_is_refused(tmp_path,
                                                                         obama_photos):
    from headshot_kit.prepare import prepare_photos

    data = tmp_path / "prepared"
    prep = dataclasses.replace(get_preset("tiny").prepare, token="zqx", class_name="man")
    prepare_photos(obama_photos, data, prep)
    cfg = tiny(steps=2, checkpoint_every=0, validate_every=0)
    trainer = Trainer(data, tmp_path / "lora", cfg, progress=False)
    assert trainer.cfg.subject == "zqx man" and trainer.cfg.class_prompt == "a photo of a man"
    with pytest.raises(ConfigError, match="TrainConfig.subject is 'ohwx person'.*'zqx man'"):
        Trainer(data, tmp_path / "other", tiny(subject="ohwx person"), progress=False)


KILLED_RUN = """
import sys, time, torch
import headshot_kit.train as train
real_save = torch.save
def slow_save(obj, path, *a, **k):  # widen the window in which a kill lands mid-write
    real_save(obj, path, *a, **k)
    print("writing", flush=True)
    time.sleep(2)
train.torch.save = slow_save
from headshot_kit.config import get_preset
import dataclasses
cfg = dataclasses.replace(get_preset("tiny").train, steps=1000, checkpoint_every=1)
train.Trainer(sys.argv[1], sys.argv[2], cfg, progress=False).run()
"""


def test_kill_during_checkpoint_write_keeps_latest_intact(prepared_dataset, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for kill in range(2):
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(prepared_dataset),
                                 str(out)], stdout=subprocess.PIPE, text=True, env=env)
        writes = 0
        for line in proc.stdout:  # kill inside the second write of this process's life
            writes += line.startswith("writing")
            if writes == 2:
                time.sleep(0.5)
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert list((out / "checkpoints").glob(".checkpoint-*.tmp")), "the kill missed the write"
        latest = latest_checkpoint(out / "checkpoints")
        assert latest is not None
        state = torch.load(latest / "state.pt", weights_only=False)
        assert state["step"] == json.loads((latest / "meta.json").read_text())["step"]
    resumed = Trainer(prepared_dataset, out, tiny(steps=1000, checkpoint_every=1),
                      progress=False)
    assert resumed.step >= 2
    assert not list((out / "checkpoints").glob(".checkpoint-*.tmp"))


def test_nan_guard_skips_a_poisoned_batch(prepared_dataset, tmp_path):
    trainer = Trainer(prepared_dataset, tmp_path, tiny(steps=20, checkpoint_every=0),
                      progress=False)
    trainer.inputs[0] = float("nan")  # one photo's latents are poisoned
    result = trainer.run()
    assert 0 < result.skipped_steps < 20
    assert result.metrics.loc[result.metrics["skipped"], "loss"].isna().all()
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_nan_guard_stops_a_diverged_run(prepared_dataset, tmp_path):
    trainer = Trainer(prepared_dataset, tmp_path, tiny(steps=20, max_bad_steps=3,
                                                       checkpoint_every=0), progress=False)
    trainer.inputs[:] = float("nan")
    with pytest.raises(TrainingDiverged, match="lower learning rate"):
        trainer.run()
    assert trainer.step == 3


def test_prior_preservation_and_text_encoder_lora(prepared_dataset, tmp_path):
    cfg = tiny(steps=4, prior_preservation=True, num_class_images=2, train_text_encoder=True,
               class_dir=str(tmp_path / "class"), validate_every=2, checkpoint_every=0)
    trainer = Trainer(prepared_dataset, tmp_path / "lora", cfg, progress=False)
    assert trainer.is_class.sum() == 2 and len(list((tmp_path / "class").glob("*.png"))) == 2
    # The face weighs more in the photos only: a class image teaches the class, every pixel.
    assert (trainer.weights[trainer.is_class] == 1).all()
    assert (trainer.weights[~trainer.is_class] < 1).any()
    result = trainer.run()
    keys = load_file(str(result.lora_path)).keys()
    assert any(k.startswith("text_encoder.") for k in keys)
    assert (result.out_dir / "validation.png").is_file()
    pipe = models.load_pipeline("tiny-sd15")
    pipe.load_lora_weights(str(result.out_dir))  # diffusers accepts the text-encoder LoRA too


def test_tiny_sdxl_trains_and_loads(prepared_dataset, tmp_path):
    cfg = tiny(model="tiny-sdxl", family="sdxl", steps=4, train_text_encoder=True,
               checkpoint_every=0)
    result = Trainer(prepared_dataset, tmp_path, cfg, progress=False).run()
    assert result.metrics["loss"].notna().all()
    keys = load_file(str(result.lora_path)).keys()
    assert any(k.startswith("text_encoder_2.") for k in keys)
    pipe = models.load_pipeline("tiny-sdxl", "sdxl")
    base = render(pipe)
    pipe.load_lora_weights(str(result.out_dir))
    assert np.abs(render(pipe) - base).mean() > 0
    kohya = load_file(str(result.out_dir / KOHYA_WEIGHTS))
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in kohya)


def test_bad_settings_fail_before_loading(prepared_dataset, tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        Trainer(prepared_dataset, tmp_path, tiny(rank=0))


def test_missing_dataset_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_dataset(tmp_path)


def test_prodigy_optimizer_option_trains(prepared_dataset, tmp_path):
    pytest.importorskip("prodigyopt")
    trainer = Trainer(prepared_dataset, tmp_path, tiny(optimizer="prodigy", lr=1.0, steps=3,
                                                       checkpoint_every=0, validate_every=0),
                      progress=False)
    before = [p.detach().clone() for p in trainer.params]
    result = trainer.run()
    assert trainer.optimizer_name == "Prodigy"
    assert result.metrics["loss"].notna().all()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params))


def test_the_lora_starts_the_same_whether_or_not_the_model_was_just_built(
        prepared_dataset, tmp_path, monkeypatch):
    """Same seed, same run: building the tiny model on first use draws random numbers too."""
    monkeypatch.setenv("HEADSHOT_KIT_CACHE", str(tmp_path / "fresh-cache"))
    cfg = tiny(steps=1, validate_every=0, checkpoint_every=0)
    first = Trainer(prepared_dataset, tmp_path / "a", cfg, progress=False)  # builds the model
    again = Trainer(prepared_dataset, tmp_path / "b", cfg, progress=False)  # finds it built
    a, b = peft_state(first.pipe.unet), peft_state(again.pipe.unet)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerunning_a_finished_run_leaves_its_weight_files_byte_for_byte(prepared_dataset,
                                                                         tmp_path):
    """safetensors writes its header in hash-map order, so the same weights saved again
    differ in bytes; a re-run that trains nothing must not touch the files (nor make generate
    think the LoRA changed)."""
    from headshot_kit.generate import weights_digest
    from headshot_kit.train import train_lora

    cfg = tiny(steps=3, validate_every=0)
    first = train_lora(prepared_dataset, tmp_path, cfg, progress=False)
    files = [first.lora_path, first.out_dir / KOHYA_WEIGHTS]
    before = [f.read_bytes() for f in files]
    digest = weights_digest(tmp_path)
    for _ in range(2):  # two tries: a header order can repeat by chance
        train_lora(prepared_dataset, tmp_path, cfg, progress=False)
        assert [f.read_bytes() for f in files] == before
    assert weights_digest(tmp_path) == digest
