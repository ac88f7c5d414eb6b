"""The fit check against published figures: full SD 1.x DreamBooth memory on a T4 (ShivamShrirao's
table), the SDXL LoRA T4 notebook (fits, 7.96 s/step), exact parameter counts, and the refusal
of a run that cannot fit.

The meta-tensor measurements are cached in the module for the whole session, so each
configuration runs once: about a minute in all, most of it SDXL at 1024 px.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from headshot_kit import fitcheck as fc
from headshot_kit.config import get_preset

RUNS = fc.published_runs()
FORK_MEMORY = [name for name, run in RUNS.items() if run.memory_gb is not None]
# The fork table's rows that calibrate() does not fit the speed model on.
HELD_OUT = ("sd15-full-fp16-b1-8bit", "sd15-full-fp16-b1-ckpt-adamw")


def plan_of(run: fc.PublishedRun, **extra) -> fc.FitPlan:
    return fc.fit_check(run.cfg, run.gpu, run.mode, suggest=False, **run.overrides, **extra)


def test_parameter_counts_match_the_published_models():
    # Totals of the released checkpoints (diffusers/transformers model cards, 1% slack).
    expected = {("sd15", "unet"): 859.52e6, ("sdxl", "unet"): 2567.46e6,
                ("sd15", "vae"): 83.65e6, ("sd15", "text_encoder"): 123.06e6,
                ("sdxl", "text_encoder"): 123.06e6, ("sdxl", "text_encoder_2"): 694.66e6}
    for (family, model), total in expected.items():
        assert fc.parameter_counts(family)[model] == pytest.approx(total, rel=0.01), model


def test_the_fork_table_is_all_there():
    # An empty table would leave the memory test below with nothing to check.
    assert FORK_MEMORY == ["sd15-full-fp16-b1-ckpt-8bit", "sd15-full-fp32-b1-ckpt-8bit",
                           "sd15-full-fp16-b2-ckpt-8bit", "sd15-full-fp16-b1-8bit",
                           "sd15-full-fp16-b1-ckpt-adamw"]
    figures = {RUNS[n].memory_gb: RUNS[n].cfg.optimizer for n in FORK_MEMORY}
    assert figures[9.92] == "adamw8bit" and figures[15.79] == "adamw"


@pytest.mark.parametrize("name", FORK_MEMORY)
def test_full_sd15_memory_within_5_percent_of_the_published_table(name):
    # Measured: +3.5% (9.92 GB), +4.2%, +1.9%, -2.9% and +0.7% (15.79 GB), row by row.
    run = RUNS[name]
    plan = plan_of(run)
    assert plan.total_gb == pytest.approx(run.memory_gb, rel=0.05), plan.summary()


def test_the_readme_fork_rows_are_what_the_fit_check_gives():
    from conftest import ROOT

    lines = (ROOT / "README.md").read_text().splitlines()
    rows = {name: next(line for line in lines if line.startswith(start)) for start, name in (
        ("| full SD 1.x DreamBooth", "sd15-full-fp16-b1-ckpt-8bit"),
        ("| the same without 8-bit Adam", "sd15-full-fp16-b1-ckpt-adamw"))}
    for name, row in rows.items():
        run, plan = RUNS[name], plan_of(RUNS[name])
        assert f"{run.memory_gb} GB, {run.seconds_per_step:.2f} s/step" in row, row
        error = 100 * (plan.total_gb / run.memory_gb - 1)
        assert f"{plan.total_gb:.2f} GB ({error:+.0f}%)" in row, row
    # The 32-bit Adam row shows the speed too: a row calibration leaves out.
    run = RUNS["sd15-full-fp16-b1-ckpt-adamw"]
    seconds = plan_of(run).step_seconds
    error = 100 * (seconds / run.seconds_per_step - 1)
    assert f"{seconds:.2f} s/step ({error:+.0f}%)" in rows[run.name]


def test_sdxl_lora_t4_recipe_fits_in_15_gib():
    plan = plan_of(RUNS["sdxl-lora-t4"])
    assert plan.fits and plan.total_gb < 15 * fc.GIB / fc.GB, plan.summary()
    # The frozen fp16 UNet alone is 5.1 GB: the activations were really counted on top.
    assert plan.phases["forward/backward"] > 5.2


def test_t4_calibration_is_what_the_sd15_table_gives_without_the_held_out_rows(monkeypatch):
    def calibrated_as_published() -> bool:
        derived = fc.calibrate()
        return all(getattr(derived, name) == pytest.approx(getattr(fc.T4_CALIBRATION, name),
                                                           rel=0.01)
                   for name in ("tensor_efficiency", "fp32_efficiency", "overhead_s"))

    def publish_speed(name: str, its: float) -> None:
        c = RUNS[name].cfg
        key = (c.mixed_precision == "fp16", c.batch_size, c.gradient_checkpointing,
               c.optimizer == "adamw8bit")
        monkeypatch.setitem(fc.FORK_ROWS, key, (fc.FORK_ROWS[key][0], its))

    assert calibrated_as_published()
    for name in HELD_OUT:  # other speeds there change nothing...
        publish_speed(name, 100.0)
    assert calibrated_as_published()
    publish_speed("sd15-full-fp16-b1-ckpt-8bit", 100.0)  # ...as they do in a row it is fitted on
    assert not calibrated_as_published()


@pytest.mark.parametrize("name", HELD_OUT)
def test_t4_calibration_predicts_the_rows_it_was_not_fitted_on_within_20_percent(name):
    # Measured: 0.99 s/step for the published 0.88 (1.14 it/s, no checkpointing: +13%) and
    # 1.11 for 1.30 (0.77 it/s, 32-bit AdamW: -15%).
    run = RUNS[name]
    plan = plan_of(run)
    assert plan.step_seconds == pytest.approx(run.seconds_per_step, rel=0.20), plan.summary()


def test_t4_calibration_predicts_the_sdxl_step_time_within_30_percent():
    run = RUNS["sdxl-lora-t4"]
    plan = plan_of(run)
    assert plan.step_seconds == pytest.approx(run.seconds_per_step, rel=0.30), plan.summary()
    # Three micro-batches of a 1024 px SDXL step: tens of TFLOPs, far more than SD 1.5's.
    assert plan.flops_per_step > 5 * plan_of(RUNS["sd15-full-fp16-b1-ckpt-8bit"]).flops_per_step


def test_8bit_adam_states_are_a_quarter_of_32bit():
    big, small = 1 << 20, 100  # bitsandbytes keeps tensors under 4096 values in 32-bit
    eight = fc.optimizer_bytes((big,), "adamw8bit")
    assert 8 * big / eight == pytest.approx(4, rel=0.02)  # 4x, less the per-block scales
    assert fc.optimizer_bytes((small,), "adamw8bit") == fc.optimizer_bytes((small,), "adamw")
    sizes = fc.trainable_sizes("sd15", "full", 4, ("to_q", "to_k", "to_v", "to_out.0"),
                               text_encoder=False)
    ratio = fc.optimizer_bytes(sizes, "adamw") / fc.optimizer_bytes(sizes, "adamw8bit")
    assert 3.8 < ratio <= 4.0


def test_8bit_state_bytes_match_bitsandbytes():
    import bitsandbytes as bnb  # a declared dependency: a broken install fails here
    params = [torch.nn.Parameter(torch.randn(n)) for n in (300_000, 5_000, 100)]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=4096)
    sum(p.sum() for p in params).backward()
    opt.step()
    real = sum(v.numel() * v.element_size() for state in opt.state.values()
               for v in state.values() if torch.is_tensor(v) and v.numel() > 1)
    assert fc.optimizer_bytes(tuple(p.numel() for p in params), "adamw8bit") == real


def test_a_step_is_measured_once_per_spec_and_its_switches_are_named():
    """measure_step is cached on a hashable StepSpec: the same spec, its settings named in any
    order, is measured once. Its switches (checkpointing, half, weighted), like the other
    measurements', cannot be passed by position, where True and False say nothing."""
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    with pytest.raises(TypeError):
        fc.measure_step("sd15", 64, 1, False, "lora")
    with pytest.raises(TypeError):
        fc.StepSpec("sd15", 64, 1, "lora", False)
    with pytest.raises(TypeError):
        fc.trainable_sizes("sd15", "lora", 4, targets, False)
    with pytest.raises(TypeError):
        fc.measure_vae("sd15", 64, 1, True)
    a = fc.StepSpec("sd15", 64, 1, mode="lora", checkpointing=False, half=True)
    b = fc.StepSpec("sd15", 64, 1, half=True, checkpointing=False, mode="lora")
    first = fc.measure_step(a)
    hits = fc.measure_step.cache_info().hits
    assert fc.measure_step(b) is first
    assert fc.measure_step.cache_info().hits == hits + 1


def test_checkpointing_lowers_activation_memory():
    with_ckpt = fc.measure_step(fc.StepSpec("sd15", 512, 2, mode="full", checkpointing=True))
    without = fc.measure_step(fc.StepSpec("sd15", 512, 2, mode="full", checkpointing=False))
    assert with_ckpt.saved_for_backward < without.saved_for_backward / 3
    assert with_ckpt.activation_peak < without.activation_peak
    # ...and costs a second forward.
    assert with_ckpt.flops > 1.15 * without.flops


def test_refuses_what_cannot_fit_and_names_a_fix():
    cfg = dataclasses.replace(get_preset("sdxl-t4").train, optimizer="adamw",
                              gradient_checkpointing=False)
    with pytest.raises(fc.DoesNotFit, match="Cheapest fix: train a LoRA") as err:
        fc.check_before_training(cfg, "Tesla T4", mode="full")
    assert "gradient checkpointing" in str(err.value) and "T4" in str(err.value)
    assert "--set force_fit=true" in str(err.value)  # the setting that really exists
    assert not fc.check_before_training(cfg, "t4", force=True, mode="full").fits
    # No GPU in this process: the plan comes back, marked, and nothing is refused.
    if not torch.cuda.is_available():
        plan = fc.check_before_training(cfg, None, mode="full")
        assert not plan.fits and any("No GPU" in n for n in plan.notes)


def test_suggests_the_first_change_that_fits():
    # The fork's 32-bit AdamW run without checkpointing: checkpointing alone makes it fit.
    run = RUNS["sd15-full-fp16-b1-ckpt-adamw"]
    cfg = dataclasses.replace(run.cfg, gradient_checkpointing=False)
    assert not fc.fit_check(cfg, "t4", "full", suggest=False, **run.overrides).fits
    fix = fc.suggest_fix(cfg, "t4", "full", **run.overrides)
    assert len(fix) == 1 and fix[0].startswith("enable gradient checkpointing (saves ")
    assert fc.suggest_fix(run.cfg, "t4", "full", **run.overrides) == []


def test_plan_reads_as_a_table_a_summary_and_json():
    plan = plan_of(RUNS["sd15-full-fp16-b1-ckpt-8bit"])
    table = plan.table()
    assert table.loc["total", "GB"] == pytest.approx(plan.total_gb, abs=0.01)
    assert table["GB"].iloc[:-2].sum() == pytest.approx(plan.total_gb, abs=0.05)
    assert "FITS" in str(plan) and "Tesla T4" in plan.summary()
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["fits"] is True and data["gpu"]["key"] == "t4"


def test_gpu_names_map_to_the_table_and_unknown_cards_are_guessed():
    assert fc.resolve_gpu("Tesla T4").key == "t4"
    assert fc.resolve_gpu("NVIDIA A100-SXM4-80GB").key == "a100-80g"
    assert fc.resolve_gpu("NVIDIA A100-SXM4-40GB").key == "a100-40g"
    other = fc.resolve_gpu("NVIDIA RTX 6000 Ada", total_memory_bytes=48 * fc.GIB)
    assert other.guessed and other.memory_gib == 48
    with pytest.raises(fc.ConfigError):
        fc.resolve_gpu("NVIDIA RTX 6000 Ada")
    run = RUNS["sd15-full-fp16-b1-ckpt-8bit"]
    plan, guessed = plan_of(run), fc.fit_check(run.cfg, other, "full", **run.overrides)
    assert any("not in the table" in n for n in guessed.notes)
    assert guessed.total_gb == pytest.approx(plan.total_gb)


def test_host_ram_grows_with_the_model():
    sd15 = plan_of(RUNS["sd15-full-fp16-b1-ckpt-8bit"])
    sdxl = plan_of(RUNS["sdxl-lora-t4"])
    assert sd15.host_peak_gb < fc.COLAB_HOST_RAM_GB
    # An SDXL inference pipeline is ~7 GB in fp16 against ~2 GB for SD 1.5.
    assert sdxl.host["reload"] - sd15.host["reload"] > 4


def test_validation_and_text_encoder_lora_add_their_memory():
    run = RUNS["sd15-full-fp16-b1-ckpt-8bit"]
    base = plan_of(run)
    both = plan_of(run, validate_every=100, train_text_encoder=True)
    # Rendering brings the VAE back next to the weights and optimizer (gradients are freed).
    sizes = fc.trainable_sizes("sd15", "full", 4, run.cfg.target_modules, text_encoder=True)
    held = both.phases["optimizer step"] - 4 * sum(sizes) / fc.GB
    vae_fp16 = 2 * fc.parameter_counts("sd15")["vae"] / fc.GB
    assert both.phases["validation"] > held + vae_fp16
    # The text encoder stays on the GPU, with its LoRA, gradients and activations.
    assert both.phases["forward/backward"] > base.phases["forward/backward"] + 0.25
    assert "text encoders kept on the GPU (fp16)" in both.components


def test_the_face_weighted_loss_is_counted():
    tiny = get_preset("tiny").train
    assert tiny.background_weight == 0.1
    weighted = fc.fit_check(tiny, gpu="t4")
    plain = fc.fit_check(dataclasses.replace(tiny, background_weight=1.0), gpu="t4")
    # One fp32 weight per latent pixel (64 px / 8 = 8 x 8) of each of a dataset's 20 photos.
    assert weighted.components[fc.MASK_COMPONENT] * fc.GB == 20 * 8 * 8 * 4
    assert fc.MASK_COMPONENT not in plain.components
    assert weighted.phases["forward/backward"] > plain.phases["forward/backward"]
    # The step holds the batch's weight map and the weighted error on top of the plain step
    # (measured as the plans above measured it, so from the cache).
    targets = tuple(tiny.target_modules)
    spec = fc.StepSpec("sd15", 64, 1, mode="lora", checkpointing=False, targets=targets)
    with_masks = fc.measure_step(dataclasses.replace(spec, weighted=True))
    without = fc.measure_step(spec)
    assert with_masks.peak - without.peak >= 8 * 8 * 4


def test_the_tiny_plan_caches_no_more_photos_than_a_dataset_holds():
    text = str(fc.fit_check(get_preset("tiny").train, gpu="t4"))
    assert "512 photos" not in text


def test_the_readme_sdxl_prediction_is_what_the_fitcheck_command_prints():
    from conftest import ROOT

    plan = fc.fit_check(get_preset("sdxl-t4").train, gpu="t4")
    row = next(line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("| SDXL LoRA"))
    assert f"{plan.total_gb:.1f} GB" in row and f"{plan.step_seconds:.1f} s/step" in row


def test_the_notebooks_recipe_is_within_20_percent_of_its_7_96_s_calibration_point():
    # A calibration point: Calibration.vae_fp32_efficiency is fitted on it (calibrate()), so
    # agreement here is by construction; the PR #4470 run below is the evidence.
    run = RUNS["sdxl-lora-t4"]
    assert plan_of(run).step_seconds == pytest.approx(7.96, rel=0.20)
    derived = fc.calibrate()
    assert derived.vae_fp32_efficiency == pytest.approx(
        fc.T4_CALIBRATION.vae_fp32_efficiency, rel=0.01)


def test_the_held_out_sdxl_t4_run_of_diffusers_pr_4470_is_within_20_percent():
    # Evidence: not used to fit anything. 500 steps in about 1 h 30 min, accumulation 4.
    run = RUNS["sdxl-lora-t4-pr4470"]
    assert run.seconds_per_step == pytest.approx(10.8)
    plan = plan_of(run)
    assert plan.step_seconds == pytest.approx(run.seconds_per_step, rel=0.20), plan.summary()
    # Its micro-batches are the notebook's, less the text encoders: the same time each.
    notebook = plan_of(RUNS["sdxl-lora-t4"])
    assert plan.step_seconds / 4 == pytest.approx(notebook.step_seconds / 3, rel=0.05)
