"""`fit_check`: the plan of a training run on a GPU, with the cheapest change that makes it fit
when it does not."""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, TrainConfig, validate_train
from .fix import join, larger_gpu, suggest_fix
from .gpus import GPU, resolve_gpu
from .plan import FitPlan, make_plan, split_overrides


def fit_check(cfg: TrainConfig, gpu: str | GPU = "t4", mode: str = "lora", *,
              suggest: bool = True, **overrides: Any) -> FitPlan:
    """Predict peak GPU memory, time per step and host RAM for training `cfg` on `gpu`.

    mode: "lora" (what the train stage does) or "full" (the whole UNet, for comparing with published
    full fine-tuning figures). overrides: TrainConfig fields or Recipe fields. With `suggest`,
    a plan that does not fit names the cheapest change that makes it fit (see suggest_fix).
    The meta-tensor measurements take a few seconds (SD 1.5) to half a minute (SDXL at 1024 px)
    on a two-core CPU and are cached for the life of the process.
    """
    if mode not in ("lora", "full"):
        raise ConfigError(f"mode is {mode!r}; choose 'lora' or 'full'.")
    cfg, recipe = split_overrides(cfg, overrides)
    validate_train(cfg)
    gpu = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu)
    plan = make_plan(cfg, gpu, mode, recipe)
    if suggest and not plan.fits:
        changes = suggest_fix(cfg, gpu, mode, **overrides)
        plan.fix = join(changes) if changes else larger_gpu(cfg, gpu, mode, recipe)
    from ..models import TINY_MODELS

    if cfg.model in TINY_MODELS:
        plan.notes.append(f"{cfg.model} is a small local stand-in: this plans the real "
                          f"{cfg.family} architecture at these settings.")
    return plan
