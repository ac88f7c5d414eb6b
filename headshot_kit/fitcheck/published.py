"""Published memory and time figures, as runnable settings: what the fit check is checked
against, and what its T4 time calibration is derived from (`calibrate`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import TrainConfig, get_preset
from .gpus import GB, GPUS, Calibration
from .measure import StepSpec, measure_step, trainable_sizes
from .plan import ADAM_TRAFFIC


@dataclass(frozen=True)
class PublishedRun:
    """A published memory/time figure, with the settings that reproduce the run."""

    name: str
    source: str
    cfg: TrainConfig
    mode: str
    overrides: dict
    gpu: str
    memory_gb: float | None  # None: only "it ran", i.e. it fitted
    seconds_per_step: float | None


# The fork's README table (ShivamShrirao/diffusers, examples/dreambooth, commit f5d8aec8, 2 Oct
# 2022): "Tested on Tesla T4 GPU with `--cache_latents`". SD 1.4 (the UNet of 1.5), 512 px,
# fp16 autocast over an fp32 UNet, 8-bit Adam, xformers attention; caching freed the VAE and
# text encoder; torch 1.12's AdamW looped over tensors (no foreach). Its launch.sh and notebook
# train with prior preservation, which doubles the UNet's batch, and only that reproduces the
# table's own batch-2 and no-checkpointing rows (13.58 GB predicted for 13.67 published).
_FORK = "ShivamShrirao/diffusers DreamBooth README table (T4)"
# (fp16?, batch, checkpointing, 8-bit Adam) -> (GB, it/s), the rows this module uses.
FORK_ROWS = {
    (True, 1, True, True): (9.92, 0.93),
    (False, 1, True, True): (10.08, 0.42),
    (True, 2, True, True): (10.4, 0.66),
    (True, 1, False, True): (11.17, 1.14),
    (True, 1, True, False): (15.79, 0.77),
}


def _fork_run(fp16: bool, batch: int, checkpointing: bool, eight_bit: bool) -> PublishedRun:
    gb, its = FORK_ROWS[(fp16, batch, checkpointing, eight_bit)]
    # Its loss was the plain MSE (background_weight 1): no face masks.
    cfg = TrainConfig(family="sd15", resolution=512, batch_size=batch,
                      mixed_precision="fp16" if fp16 else "no",
                      gradient_checkpointing=checkpointing, cache_latents=True,
                      optimizer="adamw8bit" if eight_bit else "adamw", prior_preservation=True,
                      background_weight=1.0)
    name = (f"sd15-full-{'fp16' if fp16 else 'fp32'}-b{batch}"
            f"{'-ckpt' if checkpointing else ''}-{'8bit' if eight_bit else 'adamw'}")
    # It cached latents one training batch (instance + class image) at a time.
    overrides = {"adam_foreach": False, "cache_batch": 2 * batch}
    return PublishedRun(name, _FORK, cfg, "full", overrides, "t4", gb, 1 / its)


def published_runs() -> dict[str, PublishedRun]:
    """The published figures this module is checked against, as runnable settings."""
    runs = [_fork_run(*key) for key in FORK_ROWS]
    # huggingface/notebooks SDXL_DreamBooth_LoRA_.ipynb (saved output, Nov 2023): 1024 px, batch
    # 1, accumulation 3, checkpointing, fp16, 8-bit Adam, the fp16-fix VAE; 500 steps at 7.96
    # s/it, then host RAM ran out reloading the pipeline. Its train_dreambooth_lora_sdxl.py (21
    # Nov 2023) kept the VAE in fp32 on the GPU, encoding every micro-batch, and, with a BLIP
    # caption per image, kept both text encoders there too, encoding every micro-batch. Its
    # loss was the plain MSE (background_weight 1).
    sdxl = dataclasses.replace(get_preset("sdxl-t4").train, mixed_precision="fp16",
                               cache_latents=False, prior_preservation=False,
                               background_weight=1.0, grad_accum=3, steps=500, lr=1e-4,
                               resolution=1024, rank=4, optimizer="adamw8bit",
                               gradient_checkpointing=True)
    runs.append(PublishedRun(
        "sdxl-lora-t4", "huggingface/notebooks SDXL_DreamBooth_LoRA_.ipynb (T4)", sdxl, "lora",
        {"vae_dtype": "fp32", "text_encoders_on_gpu": True, "text_encoders_every_step": True},
        "t4", None, 7.96))
    # diffusers PR #4470 ("Allow SDXL LoRA to be run with less than 16GB of VRAM", Aug 2023),
    # a user's free-Colab T4 run after tuning: "500 steps for ~1h30m" (10.8 s/step) with the
    # settings of the README's dog example under 16 GB: 1024 px, batch 1, accumulation 4,
    # checkpointing, 8-bit Adam, fp16, the fp16-fix VAE. That script encoded every micro-batch
    # with the VAE in fp32 ("The VAE is always in float32 to avoid NaN losses") and, with one
    # instance prompt and no text-encoder training, encoded the prompt once and freed the
    # text encoders. Not used to calibrate anything: evidence only. Its ~1h30m is a rounded
    # wall time and may include its validation renders, so it is an upper bound.
    pr = dataclasses.replace(sdxl, grad_accum=4)
    runs.append(PublishedRun(
        "sdxl-lora-t4-pr4470", "diffusers PR #4470 (a user's T4 run, ~1 h 30 min / 500 steps)",
        pr, "lora", {"vae_dtype": "fp32", "vae_every_step": True,
                     "text_encoders_on_gpu": False, "text_encoders_every_step": False},
        "t4", None, 90 * 60 / 500))
    return {run.name: run for run in runs}


# Published T4 render rates (the journey ETA's renders are checked against them).
# SD 1.x, 512 px, fp16, classifier-free guidance (batch 2 through the UNet): about 4.7 it/s
# (diffusers#1050). Calibrates Calibration.sampling_overhead_s.
SD15_T4_ITS = 4.7
# SDXL, 1024 px, fp16, 25 steps with guidance: 26.5 s per image; with LCM-LoRA, 4 steps at
# guidance 1 (no second UNet pass): 8.4 s (Hugging Face blog "SDXL in 4 steps with LCM-LoRA",
# Colab T4, the stock VAE, which decodes upcast to fp32). Evidence only.
SDXL_T4_IMAGE_S = {25: 26.5}
SDXL_T4_LCM_IMAGE_S = {4: 8.4}


def calibrate() -> Calibration:
    """Re-derive T4_CALIBRATION from the fork's T4 table, the SDXL notebook, SD 1.x's
    published render rate and our FLOP counts.

    Three rows of one table, all full SD 1.x fine-tunes at 512 px with checkpointing and 8-bit
    Adam (the UNet sees 2 images per batch: prior preservation):
    - fp16, batch 1 at 0.93 it/s and batch 2 at 0.66 it/s: the extra time of the extra images
      is pure FLOPs, which gives the tensor-core efficiency; what remains of the batch-1 step
      beyond its FLOPs and its optimizer traffic is the fixed overhead;
    - fp32 ("no" mixed precision), batch 1 at 0.42 it/s: with that overhead, the fp32 efficiency.
    """
    t4 = GPUS["t4"]
    runs = published_runs()
    one, two, fp32 = (runs[n] for n in ("sd15-full-fp16-b1-ckpt-8bit",
                                        "sd15-full-fp16-b2-ckpt-8bit",
                                        "sd15-full-fp32-b1-ckpt-8bit"))

    def flops(run: PublishedRun) -> int:  # fp32 runs the same ops as fp16, so the same FLOPs
        c = run.cfg
        return measure_step(StepSpec(c.family, c.resolution, 2 * c.batch_size, mode="full",
                                     checkpointing=True)).flops

    tensor = (flops(two) - flops(one)) / (
        t4.fp16_tflops * 1e12 * (two.seconds_per_step - one.seconds_per_step))
    sizes = trainable_sizes("sd15", "full", 4, tuple(one.cfg.target_modules),
                            text_encoder=False)
    optimizer_s = sum(sizes) * ADAM_TRAFFIC["adamw8bit"] / (t4.bandwidth_gbs * GB)
    overhead = (one.seconds_per_step - optimizer_s
                - flops(one) / (t4.fp16_tflops * 1e12 * tensor))
    fp32_eff = flops(one) / (t4.fp32_tflops * 1e12 * (fp32.seconds_per_step - optimizer_s
                                                       - overhead))
    base = Calibration(tensor, fp32_eff, overhead)
    return dataclasses.replace(base, vae_fp32_efficiency=_vae_fp32_efficiency(base),
                               sampling_overhead_s=_sampling_overhead(base))


def _vae_fp32_efficiency(cal: Calibration) -> float:
    """- the SDXL notebook's 7.96 s/step (3 micro-batches, each one UNet forward + backward in
    fp16 and one fp32 VAE encode): what the fp16 work and the overhead leave of each
    micro-batch is the fp32 VAE's time, which gives its efficiency."""
    from .plan import make_plan, split_overrides

    t4 = GPUS["t4"]
    run = published_runs()["sdxl-lora-t4"]
    cfg, recipe = split_overrides(run.cfg, dict(run.overrides))
    plan = make_plan(cfg, t4, run.mode, recipe)
    f = plan.micro_flops
    micro = (run.seconds_per_step - plan.optimizer_seconds) / cfg.grad_accum
    rest = (micro - cal.overhead_s - f["fp16"] / (t4.fp16_tflops * 1e12 * cal.tensor_efficiency)
            - f["fp32"] / (t4.fp32_tflops * 1e12 * cal.fp32_efficiency))
    return f["vae_fp32"] / (t4.fp32_tflops * 1e12 * rest)


def _sampling_overhead(cal: Calibration) -> float:
    """- SD 1.x's 4.7 it/s at 512 px: what a denoising step takes beyond its FLOPs at the
    tensor-core efficiency."""
    from .measure import measure_sampling

    t4 = GPUS["t4"]
    flops = measure_sampling("sd15", 512, half=True).flops
    return 1 / SD15_T4_ITS - flops / (t4.fp16_tflops * 1e12 * cal.tensor_efficiency)
