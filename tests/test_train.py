"""The fine-tune stage on tiny models: it learns, saves LoRAs that diffusers loads, runs the
8-bit optimizer, survives interruptions exactly, and guards against NaN; its loss terms and
accumulated steps are what a hand computation from the same random draws gives."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from headshot_kit import models
from headshot_kit.config import ConfigError, get_preset
from headshot_kit.lora import LORA_WEIGHTS, peft_state, ui_weights
from headshot_kit.train import (Trainer, TrainingDiverged, latest_checkpoint, load_dataset,
                                optimizer_state_dtypes, train_lora)
from headshot_kit.train.checkpoints import load_state
from headshot_kit.train.loss import diffusion_loss

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


def test_validation_column_labels_stay_in_their_columns(trained):
    from conftest import text_overflows

    trainer, result = trained[:2]
    sheet = Image.open(result.out_dir / "validation.png")
    cols = len(trainer.cfg.validation_prompts) * len(trainer.cfg.validation_seeds)
    assert cols >= 2 and text_overflows(sheet, cols) == []


def test_loss_on_a_fixed_batch_falls(trained):
    trainer, result, before, after = trained
    assert len(result.metrics) == 30
    # The tiny preset trains with the face-weighted loss (background_weight 0.1).
    assert trainer.weights is not None and trainer.cfg.background_weight == 0.1
    # Same noise, same timesteps, same images: only the LoRA changed.
    assert after < before * 0.97, (before, after)


def test_run_writes_lora_records_and_model_card(trained):
    _, result, _, _ = trained
    for name in (LORA_WEIGHTS, "config.json", "metrics.csv", "loss.png", "README.md"):
        assert (result.out_dir / name).is_file(), name
    # One file for the UIs, named after the subject's token and the run.
    ui = ui_weights(result.out_dir)
    assert ui is not None and ui.name.startswith("ohwx-") and ui.suffix == ".safetensors"
    assert sorted(p.name for p in result.out_dir.glob("*.safetensors")) == sorted(
        [LORA_WEIGHTS, ui.name])
    assert result.metrics["loss"].notna().all()
    card = (result.out_dir / "README.md").read_text()
    assert "tiny-sd15" in card and "rank 4" in card
    # The card says which file goes where.
    assert f"copy `{ui.name}` into the UI's" in card and f"<lora:{ui.stem}:1>" in card
    assert f"**For diffusers** `{LORA_WEIGHTS}`" in card
    assert json.loads((result.out_dir / "config.json").read_text())["optimizer_used"]


def test_the_loss_plot_draws_every_step_of_the_loss(trained):
    import matplotlib.pyplot as plt
    from conftest import assert_drawn

    _, result, _, _ = trained
    assert_drawn(result.out_dir / "loss.png", min_size=(500, 250))
    fig = result.plot()
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "diffusion loss")
    steps, losses = ax.get_lines()[0].get_data()
    plt.close(fig)
    assert list(steps) == list(result.metrics["step"])
    assert np.allclose(losses, result.metrics["loss"])


def test_optimizer_state_is_8bit(trained):
    trainer = trained[0]
    assert trainer.optimizer_name == "bitsandbytes AdamW8bit"
    # Both Adam moments are stored as uint8 (their scales stay fp32).
    state = next(iter(trainer.optimizer.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert torch.uint8 in optimizer_state_dtypes(trainer.optimizer)


def assert_reloads_as_in_memory(trainer, result) -> None:
    """The saved LoRA, loaded by diffusers' own `load_lora_weights` into a fresh pipeline,
    draws what the trained pipeline draws, and visibly not what the base model draws."""
    for part in trainer.pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    in_memory = render(trainer.pipe)

    fresh = models.load_pipeline(trainer.cfg.model, trainer.cfg.family)
    base = render(fresh)
    fresh.load_lora_weights(str(result.out_dir))
    loaded = render(fresh)

    assert np.abs(loaded - in_memory).max() <= 1  # the same image, bar rounding
    assert np.abs(loaded - base).mean() > 2  # and the LoRA really changed it


def test_saved_lora_loads_in_diffusers_and_matches_memory(trained):
    assert_reloads_as_in_memory(*trained[:2])


def test_kohya_export_has_kohya_names(trained):
    result = trained[1]
    kohya = load_file(str(ui_weights(result.out_dir)))
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


class Stopped(Exception):
    """Stands in for a lost runtime: the process ends between two checkpoints."""


def test_a_run_stopped_after_a_checkpoint_resumes_there_and_ends_as_an_uninterrupted_one(
        prepared_dataset, tmp_path):
    """Stopped at step 5 with a checkpoint at step 3, the same call again trains steps 4 to 6
    only, and writes the LoRA an uninterrupted run writes. (Training from scratch would end
    with the same weights too: the steps it ran tell the two apart.)"""
    cfg = tiny(steps=6, checkpoint_every=3, validate_every=0, lr_scheduler="linear",
               lora_dropout=0.1)
    train_lora(prepared_dataset, tmp_path / "whole", cfg, progress=False)

    def stop_at_step_5(trainer, record):
        if record["step"] == 5:
            raise Stopped

    with pytest.raises(Stopped):
        train_lora(prepared_dataset, tmp_path / "cut", cfg, progress=False,
                   on_step=stop_at_step_5)
    seen = []
    result = train_lora(prepared_dataset, tmp_path / "cut", cfg, progress=False,
                        on_step=lambda trainer, record: seen.append(record["step"]))
    # The watcher hears where the run stands (the checkpoint's step), then each step trained.
    assert seen == [3, 4, 5, 6]
    assert list(pd.read_csv(tmp_path / "cut" / "metrics.csv")["step"]) == [1, 2, 3, 4, 5, 6]
    assert list(result.metrics["step"]) == [1, 2, 3, 4, 5, 6]
    whole = load_file(tmp_path / "whole" / LORA_WEIGHTS)
    resumed = load_file(tmp_path / "cut" / LORA_WEIGHTS)
    assert whole.keys() == resumed.keys()
    assert max(float((whole[k] - resumed[k]).abs().max()) for k in whole) < 1e-6


def test_a_resumed_run_keeps_the_validation_rows_before_the_restart(prepared_dataset, tmp_path):
    """validation.png grows a row per validation step; after a resume, the rows drawn before
    the restart are still there, pixel for pixel."""
    cfg = tiny(steps=4, validate_every=2, checkpoint_every=2, validation_steps=2)
    cut = Trainer(prepared_dataset, tmp_path / "run", cfg, progress=False)
    for _ in range(2):
        cut.train_step()
    cut.validate()
    cut.save_checkpoint()
    before = np.asarray(Image.open(tmp_path / "run" / "validation.png").convert("RGB"))
    del cut

    resumed = Trainer(prepared_dataset, tmp_path / "run", cfg, progress=False)
    assert resumed.step == 2
    resumed.run()
    after = np.asarray(Image.open(tmp_path / "run" / "validation.png").convert("RGB"))
    # One more row of cells (VALIDATION_CELL px), the same width, and the first row unchanged.
    assert after.shape[0] == before.shape[0] + 160 and after.shape[1] == before.shape[1]
    assert np.array_equal(after[: before.shape[0]], before)


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
import headshot_kit.train.checkpoints as checkpoints
real_save = checkpoints.save_state
def slow_save(folder, state):  # widen the window in which a kill lands mid-write
    real_save(folder, state)
    print("writing", flush=True)
    time.sleep(2)
checkpoints.save_state = slow_save
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
        state = load_state(latest)
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
    # diffusers loads the text-encoder LoRA too, and draws what the trained pipeline draws.
    assert_reloads_as_in_memory(trainer, result)


def test_the_class_images_loss_is_added_with_its_weight(prepared_dataset, tmp_path):
    def first_loss(weight: float) -> tuple[float, torch.Tensor]:
        """A fresh trainer's first micro-batch loss, and its per-image losses recomputed
        from the same draws."""
        cfg = tiny(prior_preservation=True, num_class_images=1, prior_loss_weight=weight,
                   class_dir=str(tmp_path / "class"))
        trainer = Trainer(prepared_dataset, tmp_path / f"weight{weight}", cfg, progress=False)
        start = trainer.generator.get_state()
        with torch.no_grad():
            loss = float(trainer.micro_loss())
            trainer.generator.set_state(start)
            latents, cond, n_instance, weights = trainer.batch()
            per_image = diffusion_loss(trainer.unet, trainer.noise_scheduler, latents, cond,
                                       generator=trainer.generator, reduce=False,
                                       snr_gamma=cfg.snr_gamma, weights=weights)
        assert n_instance == 1 and len(per_image) == 2  # one photo, then one class image
        return loss, per_image

    without, per_image = first_loss(0.0)
    with_prior, same_draws = first_loss(1.0)
    assert torch.equal(per_image, same_draws)  # same seed: same images, noise and timesteps
    assert without == pytest.approx(float(per_image[0]), rel=1e-6)  # the photo's loss alone
    assert with_prior == pytest.approx(float(per_image.sum()), rel=1e-6)
    assert with_prior > without


def test_tiny_sdxl_trains_and_its_saved_lora_matches_memory(prepared_dataset, tmp_path):
    # With both text encoders' LoRAs: all three must round-trip for the images to agree.
    cfg = tiny(model="tiny-sdxl", family="sdxl", steps=4, train_text_encoder=True,
               checkpoint_every=0)
    trainer = Trainer(prepared_dataset, tmp_path, cfg, progress=False)
    result = trainer.run()
    assert result.metrics["loss"].notna().all()
    keys = load_file(str(result.lora_path)).keys()
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any(k.startswith("text_encoder_2.") for k in keys)
    assert_reloads_as_in_memory(trainer, result)
    kohya = load_file(str(ui_weights(result.out_dir)))
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in kohya)


# ---------------------------------------------------------------------------------------------
# The loss and the optimizer step, recomputed by hand


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def photo_loss(trainer, seed: int, **options) -> torch.Tensor:
    """diffusion_loss per photo of the trainer's three photos, drawing from `seed`."""
    with torch.no_grad():
        return diffusion_loss(trainer.unet, trainer.noise_scheduler, trainer.inputs,
                              trainer.cached_cond, generator=seeded(seed), reduce=False,
                              **options)


def mse_by_hand(trainer, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The plain loss written out: noise the photos' latents, predict the noise, MSE per
    photo (the tiny models predict epsilon)."""
    assert trainer.noise_scheduler.config.prediction_type == "epsilon"
    noisy = trainer.noise_scheduler.add_noise(trainer.inputs, noise, timesteps)
    with torch.no_grad():
        pred = trainer.unet(noisy, timesteps,
                            **trainer.cached_cond.unet_kwargs(torch.float32)).sample
    return ((pred - noise) ** 2).mean(dim=(1, 2, 3))


def test_min_snr_weights_each_photo_by_min_snr_gamma_over_snr(trained):
    from diffusers.training_utils import compute_snr

    trainer, seed = trained[0], 3
    draws = seeded(seed)  # diffusion_loss draws the noise, then the timesteps
    noise = torch.randn(trainer.inputs.shape, generator=draws)
    timesteps = torch.randint(0, trainer.noise_scheduler.config.num_train_timesteps, (3,),
                              generator=draws)
    snr = compute_snr(trainer.noise_scheduler, timesteps)
    assert (snr > 5).any() and (snr < 5).any()  # this seed draws both sides of gamma
    plain = mse_by_hand(trainer, noise, timesteps)
    torch.testing.assert_close(photo_loss(trainer, seed), plain)
    weighted = photo_loss(trainer, seed, snr_gamma=5)
    torch.testing.assert_close(weighted, plain * torch.clamp(snr, max=5) / snr)
    assert not torch.allclose(weighted, plain)


def test_a_prediction_type_the_loss_does_not_know_is_refused_in_one_sentence(trained):
    """diffusers' DreamBooth scripts raise for a prediction type other than epsilon and
    v_prediction; the loss refuses one too, naming it, instead of training it as epsilon."""
    from diffusers import DDPMScheduler

    trainer = trained[0]

    def loss_with(kind: str) -> torch.Tensor:
        scheduler = DDPMScheduler.from_config(trainer.noise_scheduler.config,
                                              prediction_type=kind)
        with torch.no_grad():
            return diffusion_loss(trainer.unet, scheduler, trainer.inputs, trainer.cached_cond,
                                  generator=seeded(0))

    with pytest.raises(ConfigError, match="'sample'") as refused:
        loss_with("sample")
    assert len(str(refused.value).splitlines()) == 1
    assert "epsilon" in str(refused.value) and "v_prediction" in str(refused.value)
    # The two it knows still give a loss, each against its own target.
    epsilon, velocity = loss_with("epsilon"), loss_with("v_prediction")
    assert torch.isfinite(epsilon) and torch.isfinite(velocity) and epsilon != velocity


def test_noise_offset_adds_one_constant_per_photo_and_channel(trained):
    trainer, seed = trained[0], 0
    draws = seeded(seed)  # the noise, then the offsets, then the timesteps
    noise = torch.randn(trainer.inputs.shape, generator=draws)
    offset = torch.randn((3, trainer.inputs.shape[1], 1, 1), generator=draws)
    timesteps = torch.randint(0, trainer.noise_scheduler.config.num_train_timesteps, (3,),
                              generator=draws)
    with_offset = photo_loss(trainer, seed, noise_offset=0.1)
    torch.testing.assert_close(with_offset, mse_by_hand(trainer, noise + 0.1 * offset,
                                                        timesteps))
    assert not torch.allclose(with_offset, photo_loss(trainer, seed))


def test_one_accumulated_step_uses_the_mean_gradient_of_its_micro_batches(prepared_dataset,
                                                                           tmp_path):
    # torch AdamW and no clipping: the gradient the optimizer sees is exactly the accumulated
    # one (the sdxl-t4 preset accumulates 3).
    cfg = tiny(grad_accum=3, optimizer="adamw", max_grad_norm=1e9, steps=1)
    accumulated = Trainer(prepared_dataset, tmp_path / "accumulated", cfg, progress=False)
    seen = []
    accumulated.optimizer.optimizer.register_step_pre_hook(
        lambda *_: seen.append([p.grad.clone() for p in accumulated.params]))
    record = accumulated.train_step()

    # The same three micro-batches on an identical trainer, one backward each.
    by_hand = Trainer(prepared_dataset, tmp_path / "by-hand", dataclasses.replace(
        cfg, grad_accum=1), progress=False)
    grads, losses = [], []
    for _ in range(3):
        loss = by_hand.micro_loss()
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([p.grad.clone() for p in by_hand.params])
        by_hand.optimizer.zero_grad(set_to_none=True)

    assert len(seen) == 1  # one optimizer step for the three micro-batches
    assert len(set(losses)) == 3  # three different draws, not one batch thrice
    for i, grad in enumerate(seen[0]):
        torch.testing.assert_close(grad, sum(g[i] for g in grads) / 3)
    assert record["loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    # ...and the step drew from the run's generator exactly what three micro-batches draw.
    assert torch.equal(accumulated.generator.get_state(), by_hand.generator.get_state())


def test_without_cached_latents_it_trains_from_the_same_first_loss(prepared_dataset,
                                                                    tmp_path):
    losses = {}
    for cache in (True, False):
        trainer = Trainer(prepared_dataset, tmp_path / f"cache-{cache}",
                          tiny(cache_latents=cache, steps=3), progress=False)
        # Cached: the photos' latents; not: the photos, encoded again at every step.
        assert trainer.inputs.shape[1:] == ((4, 8, 8) if cache else (3, 64, 64))
        losses[cache] = trainer.run().metrics["loss"]
    assert losses[False].notna().all()
    # Both ways the latents are the VAE's mean, so the first step's loss is the same.
    assert losses[False][0] == pytest.approx(losses[True][0], rel=1e-5)


def test_warmup_raises_the_rate_linearly_then_holds_it(prepared_dataset, tmp_path):
    cfg = tiny(lr_scheduler="constant_with_warmup", lr_warmup_steps=4, steps=6)
    train_lora(prepared_dataset, tmp_path, cfg, progress=False)
    # The rate recorded after each step: a quarter more for four steps, then lr.
    lr = pd.read_csv(tmp_path / "metrics.csv")["lr"].tolist()
    assert lr == pytest.approx([cfg.lr * k / 4 for k in (1, 2, 3, 4, 4, 4)], rel=1e-9)


def test_bad_settings_fail_before_loading(prepared_dataset, tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        Trainer(prepared_dataset, tmp_path, tiny(rank=0))


def test_missing_dataset_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_dataset(tmp_path)


def test_prodigy_optimizer_option_trains(prepared_dataset, tmp_path):
    # prodigyopt is in the dev extra the tests are installed with: missing, this fails.
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
    files = [first.lora_path, ui_weights(first.out_dir)]
    before = [f.read_bytes() for f in files]
    digest = weights_digest(tmp_path)
    for _ in range(2):  # two tries: a header order can repeat by chance
        train_lora(prepared_dataset, tmp_path, cfg, progress=False)
        assert [f.read_bytes() for f in files] == before
    assert weights_digest(tmp_path) == digest


def test_a_step_walks_no_model_for_its_dtype_or_mode(prepared_dataset, tmp_path, monkeypatch):
    # `unet.dtype` walks every parameter and `.train()` every module; the loop reads both once
    # (SDXL: hundreds of milliseconds a step otherwise, bench/step_overhead.py).
    from diffusers import UNet2DConditionModel

    trainer = Trainer(prepared_dataset, tmp_path, tiny(steps=5, grad_accum=2,
                                                       checkpoint_every=0, validate_every=0),
                      progress=False)
    trainer.train_step()  # the first step sets train mode
    calls = {"dtype": 0, "train": 0}
    dtype = UNet2DConditionModel.dtype

    def counted_dtype(self):
        calls["dtype"] += 1
        return dtype.fget(self)

    train = torch.nn.Module.train

    def counted_train(self, mode=True):
        calls["train"] += 1
        return train(self, mode)

    monkeypatch.setattr(UNet2DConditionModel, "dtype", property(counted_dtype))
    monkeypatch.setattr(torch.nn.Module, "train", counted_train)
    for _ in range(2):
        record = trainer.train_step()
    assert calls == {"dtype": 0, "train": 0}
    assert np.isfinite(record["loss"]) and trainer.unet.training
    # Validation switches to eval mode, and the next step back to train mode once.
    trainer.fixed_loss()
    trainer.train_step()
    assert trainer.unet.training and calls["train"] > 0
