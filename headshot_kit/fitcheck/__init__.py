"""Fit check: will a training run fit the GPU, how long will a step take, and what is the
cheapest change when it does not fit.

`fit_check(cfg, gpu="t4")` predicts, without a GPU and without downloading weights:

- peak GPU memory. Parameters, gradients and optimizer states are counted by dtype from the
  real architecture configs in `headshot_kit/data/arch/*.json`, with the models built on the
  `meta` device (shapes, no data). Activation memory is *measured*: the real training step
  (UNet forward + loss + backward, with the peft LoRA attached or the whole UNet trainable,
  gradient checkpointing on or off) runs on meta tensors at the configured resolution while a
  dispatch mode keeps the bytes of every tensor storage alive at each moment (`measure_step`).
  The run is split into phases (caching, encoding, forward/backward, optimizer step,
  validation); the peak is the largest. Fixed overheads (CUDA context, allocator
  fragmentation) are added, each with its source beside it;
- time per step: FLOPs counted on the same meta runs (checkpointing's recompute included) at
  the GPU's datasheet peak times an efficiency, plus a fixed per-micro-batch overhead. The
  efficiencies and the overhead are calibrated on published T4 figures (`calibrate()`): full
  SD 1.x DreamBooth (0.93 it/s) and its neighbouring rows, and the fp32 VAE's efficiency on
  Hugging Face's SDXL notebook (7.96 s/it); the same numbers are used for every GPU;
- peak host RAM, roughly, per phase (load, train, save, reload);
- the journey's ETA (`eta.journey_eta`): every phase from photos to scored headshots, the
  renders from the same calibration.

How rough: the published SD 1.x memory figures are reproduced within a few percent; the
held-out time figures within 20%: two rows of the SD 1.x table (-15%, +13%) and a second
published SDXL T4 run (diffusers PR #4470, 10.8 s/step: -2%). Expect +-15% on memory
(allocator fragmentation and CUDA library workspaces are a flat allowance, not a measurement)
and +-20% or worse on time (a few efficiencies and one overhead for every kernel and every
GPU; other GPUs than the T4 are not calibrated at all). Host RAM is the roughest: a baseline
guessed for Colab plus the weights each phase holds; `bench/` measures it.

The parts: `gpus` (the table and the time calibration), `measure` (meta-tensor measuring),
`published` (the published runs it is checked against), `plan` (adding it up), `fix` (the
cheapest change), `check` (`fit_check`: the plan with its fix) and `eta` (the journey's ETA).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..config import ConfigError, TrainConfig, get_preset, validate_train
from .check import fit_check
from .eta import Eta, journey_eta, write_eta
from .fix import join, larger_gpu, suggest_fix  # noqa: F401
from .gpus import (CUDA_CONTEXT_GIB, FRAGMENTATION, GB, GIB, GPU, GPUS, T4_CALIBRATION,
                   Calibration, resolve_gpu)
from .measure import (StepMeasurement, StepSpec, build_arch, load_arch, measure_sampling,
                      measure_step, measure_text, measure_vae, optimizer_bytes, parameter_counts,
                      trainable_sizes)
from .plan import (COLAB_HOST_RAM_GB, MASK_COMPONENT, FitPlan, Recipe, duration, make_plan,
                   split_overrides)
from .published import FORK_ROWS, PublishedRun, calibrate, published_runs

__all__ = ["COLAB_HOST_RAM_GB", "CUDA_CONTEXT_GIB", "FORK_ROWS", "FRAGMENTATION", "GB", "GIB",
           "Eta", "GPU", "GPUS", "MASK_COMPONENT", "T4_CALIBRATION", "Calibration", "DoesNotFit",
           "FitPlan",
           "PublishedRun", "Recipe", "StepMeasurement", "StepSpec", "build_arch", "calibrate",
           "check_before_training", "duration", "fit_check", "fitcheck_cli", "journey_eta", "load_arch",
           "measure_sampling", "measure_step", "measure_text", "measure_vae", "optimizer_bytes",
           "parameter_counts", "published_runs", "resolve_gpu", "suggest_fix",
           "trainable_sizes", "write_eta"]


class DoesNotFit(ConfigError):
    """The plan does not fit the GPU; the message names the cheapest fix."""


def check_before_training(cfg: TrainConfig, gpu: str | None = None, force: bool = False,
                          mode: str = "lora") -> FitPlan | None:
    """Refuse, with the cheapest fix named, a run that will not fit the GPU it is about to use.

    gpu: a table key or torch.cuda.get_device_name(); None = the GPU this process sees. A GPU
    missing from the table is planned with its own total memory and the T4's speed (the plan
    says so). Without a GPU the plan is made for a T4 and returned without refusing. force=True
    (TrainConfig.force_fit) returns the plan even when it does not fit. Tiny models (built
    locally) fit anywhere: None.
    """
    from ..models import TINY_MODELS

    if cfg.model in TINY_MODELS:
        return None
    import torch

    note = None
    if gpu is None and torch.cuda.is_available():
        from ..models import cuda_has_bf16

        gpu_entry = resolve_gpu(torch.cuda.get_device_name(0),
                                torch.cuda.get_device_properties(0).total_memory)
        # Plan in the precision the run will use on this very card, whatever the table says.
        gpu_entry = dataclasses.replace(gpu_entry, bf16=cuda_has_bf16())
    elif gpu is None:
        gpu_entry, note = GPUS["t4"], "No GPU here: planned for a T4 and not enforced."
    else:
        total = (torch.cuda.get_device_properties(0).total_memory
                 if torch.cuda.is_available() else None)
        gpu_entry = resolve_gpu(gpu, total)
    plan = fit_check(cfg, gpu_entry, mode)
    if note:
        plan.notes.append(note)
        return plan
    if not plan.fits and not force:
        raise DoesNotFit(
            f"This run needs about {plan.total_gb:.1f} GB of GPU memory at its peak "
            f"({plan.peak_phase}), but the {gpu_entry.name} has {plan.budget_gb:.1f} GB. "
            f"Cheapest fix: {plan.fix}. To try anyway, set force_fit=True in the training "
            "config (`--set force_fit=true` on the command line).")
    return plan


def fitcheck_cli(cfg: TrainConfig | str, gpu: str = "t4", as_json: bool = False,
                 mode: str = "lora", preset: str | None = None) -> int:
    """`headshot-kit fitcheck`: print the plan (or its JSON) of a training config or of a
    preset's, with the journey's ETA (`eta` in the JSON: total_minutes and phases) of the
    preset with this training config. Returns 0 when it fits, 1 when it does not."""
    if isinstance(cfg, str):
        preset, cfg = cfg, get_preset(cfg).train
    plan = fit_check(cfg, gpu, mode)
    eta = None
    if preset is not None and mode == "lora":
        whole = get_preset(preset)
        whole.train = cfg
        eta = journey_eta(whole, plan.gpu, plan=plan)
    if as_json:
        data = plan.to_dict() | ({"eta": eta.to_dict()} if eta else {})
        print(json.dumps(data, indent=2, default=str))
    else:
        print(plan.summary() + (f"\n\n{eta.summary()}" if eta else ""))
    return 0 if plan.fits else 1
