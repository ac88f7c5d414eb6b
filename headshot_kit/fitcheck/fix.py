"""What to change when a run does not fit: the cheapest change, or combination, that makes
it fit, worded for a person with what it saves."""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from .gpus import GPU, GPUS, resolve_gpu
from .plan import RECIPE_FIELDS, FitPlan, Recipe, make_plan, split_overrides


def _candidates(cfg: TrainConfig, mode: str) -> list[tuple[str, dict]]:
    """Changes in order of cost: free ones first, then the ones that cost
    quality. Each is (what to tell a person, the overrides that make it)."""
    out = []
    if not cfg.gradient_checkpointing:
        out.append(("enable gradient checkpointing", {"gradient_checkpointing": True}))
    if cfg.optimizer != "adamw8bit":
        out.append(("use 8-bit AdamW (bitsandbytes)", {"optimizer": "adamw8bit"}))
    if not cfg.cache_latents:
        out.append(("cache latents so the VAE and text encoders leave the GPU",
                    {"cache_latents": True, "vae_every_step": None,
                     "text_encoders_on_gpu": None, "text_encoders_every_step": None}))
    for resolution in (768, 512):
        if cfg.resolution > resolution:
            out.append((f"lower the resolution to {resolution} px", {"resolution": resolution}))
    if mode == "lora" and cfg.rank > 4:
        out.append(("lower the LoRA rank to 4", {"rank": 4}))
    if cfg.batch_size > 1:
        accum = cfg.batch_size * cfg.grad_accum
        out.append((f"use batch_size=1 with grad_accum={accum} (the same effective batch)",
                    {"batch_size": 1, "grad_accum": accum}))
    return out


# Changes whose effect needs no new meta-tensor measurement: cheap to take back out.
_STATIC_KEYS = {"optimizer", "cache_latents"}


def suggest_fix(cfg: TrainConfig, gpu: str | GPU = "t4", mode: str = "lora",
                **overrides: Any) -> list[str]:
    """The cheapest change (or combination) that makes the run fit, each worded for a person
    with what it saves, e.g. ["enable gradient checkpointing (saves 6.1 GB)"].

    Tried in order: each change alone (gradient checkpointing, 8-bit Adam, cached latents,
    768 px, 512 px, rank 4, batch 1), then the changes added up one after another; a full
    fine-tune that still does not fit then becomes a LoRA with the free changes. Candidates
    whose weights and optimizer alone exceed the GPU are skipped without measuring. [] when the
    run already fits, or when nothing in the list is enough.
    """
    cfg, recipe = split_overrides(cfg, overrides)
    gpu = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu)
    base = dict(overrides)
    original = make_plan(cfg, gpu, mode, recipe)
    if original.fits:
        return []
    options = _candidates(cfg, mode)
    trials = [[o] for o in options] + [options[:i] for i in range(2, len(options) + 1)]
    if mode == "full":
        lora = ("train a LoRA instead of the full UNet", {"mode": "lora"})
        free = [o for o in options if not set(o[1]) & {"resolution", "rank", "batch_size"}]
        trials += [[lora, *free, *extra] for extra in ([], *[[o] for o in options
                                                             if o not in free])]
    for changes in trials:
        plan = _try(cfg, gpu, mode, base, changes)
        if plan is None or not plan.fits:
            continue
        # Take back changes that need no new measurement and turn out not to matter.
        for change in list(changes):
            if set(change[1]) <= _STATIC_KEYS | RECIPE_FIELDS and len(changes) > 1:
                fewer = [c for c in changes if c is not change]
                smaller = _try(cfg, gpu, mode, base, fewer)
                if smaller is not None and smaller.fits:
                    changes, plan = fewer, smaller
        saved = original.total_gb - plan.total_gb
        saving = (f"saves {'at least ' if original.lower_bound else ''}{saved:.1f} GB, "
                  f"{plan.total_gb:.1f} GB in all")
        return [name for name, _ in changes[:-1]] + [f"{changes[-1][0]} ({saving})"]
    return []


def _try(cfg: TrainConfig, gpu: GPU, mode: str, base: dict, changes: list[tuple[str, dict]]
         ) -> FitPlan | None:
    """The plan with these changes, or None when its weights and optimizer alone do not fit.
    A change may switch the mode ({"mode": "lora"})."""
    merged = dict(base)
    for _, change in changes:
        merged.update(change)
    mode = merged.pop("mode", mode)
    trial_cfg, recipe = split_overrides(cfg, merged)
    if make_plan(trial_cfg, gpu, mode, recipe, measure=False).total_gb > gpu.budget_gb:
        return None
    return make_plan(trial_cfg, gpu, mode, recipe)


def larger_gpu(cfg: TrainConfig, gpu: GPU, mode: str, recipe: Recipe) -> str:
    """When no change is enough: the smallest GPU of the table that runs it as it is."""
    for other in sorted(GPUS.values(), key=lambda g: g.memory_gib):
        if (other.memory_gib > gpu.memory_gib
                and make_plan(cfg, other, mode, recipe, measure=False).fits
                and make_plan(cfg, other, mode, recipe).fits):
            return f"none of the usual changes is enough on this GPU; train on a {other.key}"
    return "none of the usual changes is enough, on any GPU of the table"


def join(changes: list[str]) -> str:
    return changes[0] if len(changes) == 1 else ", ".join(changes[:-1]) + " and " + changes[-1]
