"""The model card: README.md beside the weights, saying what the LoRA is, how it was made and
how to use it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import models
from ..config import TrainConfig, to_dict
from ..families import get_family
from ..lora import BEST_DIR, KOHYA_WEIGHTS, LORA_WEIGHTS
from ..storage import atomic_write_text

if TYPE_CHECKING:
    from . import TrainResult


def usage_snippet(cfg: TrainConfig, lora_folder: str) -> str:
    """Python that renders with the LoRA on a GPU: the fp16 files (half the download), SDXL's
    fp16-fix VAE (the stock one decodes black in fp16), straight onto the GPU. Loading SDXL in
    fp32 on the CPU first is what runs Colab's 12.7 GB of host RAM out."""
    hub = models.is_hub_id(cfg.model)
    fp16_vae = get_family(cfg.family).fp16_vae
    fix_vae = hub and fp16_vae is not None
    classes = "AutoencoderKL, DiffusionPipeline" if fix_vae else "DiffusionPipeline"
    lines = ["import torch", f"from diffusers import {classes}"]
    load = f'"{cfg.model}", torch_dtype=torch.float16' + (', variant="fp16"' if hub else "")
    if fix_vae:
        lines.append(f'vae = AutoencoderKL.from_pretrained("{fp16_vae}", '
                     "torch_dtype=torch.float16)")
        load += ", vae=vae"
    lines += [f'pipe = DiffusionPipeline.from_pretrained({load}).to("cuda")',
              f'pipe.load_lora_weights("{lora_folder}")',
              f'image = pipe("a photo of {cfg.subject}, corporate headshot").images[0]']
    return "\n".join(lines)


def write_model_card(out: Path, cfg: TrainConfig, result: TrainResult, n_images: int) -> Path:
    """README.md beside the weights: what the LoRA is, how it was made, how to use it."""
    final = result.metrics["loss"].dropna()
    rows = "\n".join(f"| {k} | {v} |" for k, v in to_dict(cfg).items())
    has_grid = (out / "validation.png").is_file()
    samples = "\n![validation images](validation.png)\n" if has_grid else ""
    text = f"""---
base_model: {cfg.model}
library_name: diffusers
tags: [lora, dreambooth, headshot-kit, {cfg.family}]
---
# A face LoRA for {cfg.model}

A DreamBooth-style LoRA (rank {cfg.rank}, alpha {cfg.lora_alpha}) trained by headshot-kit on
{n_images} photos for {cfg.steps} steps with {result.optimizer}. Trigger words: `{cfg.subject}`.
Final loss (mean of the last 10 steps): {final.tail(10).mean():.4f}; skipped steps:
{result.skipped_steps}.

This LoRA was trained on photos of a real person: share it only with their consent.

## Which weights
{_checkpoints(cfg, result)}

## Use
```python
{usage_snippet(cfg, f"{out.name}/{BEST_DIR}" if result.best_step is not None else out.name)}
```
`{KOHYA_WEIGHTS}` holds the same weights under kohya names for A1111 and ComfyUI.
{samples}
## Settings
| setting | value |
| --- | --- |
{rows}
"""
    return atomic_write_text(out / "README.md", text)


def _checkpoints(cfg: TrainConfig, result: TrainResult) -> str:
    """Which checkpoint the likeness scores chose, by which rule and network, or why none."""
    from .selection import RULE

    last = f"`{LORA_WEIGHTS}` holds the weights after the last step ({cfg.steps})."
    if result.best_step is None:
        why = ("validation was off (validate_every=0)" if not cfg.validate_every else
               "no validation image showed a face")
        return f"{last} No checkpoint was chosen by likeness: {why}."
    scored = result.metrics.dropna(subset=["likeness"])
    steps = ", ".join(f"{int(r.step)}: {r.likeness:.2f}" for r in scored.itertuples())
    return (f"{last} `{BEST_DIR}/` holds the weights of step {result.best_step}, whose "
            f"validation images looked most like the photos (likeness {result.best_likeness:.2f}"
            f" by {result.chosen_by}); generate uses them unless lora_checkpoint='last'. The "
            f"rule: {RULE}. Likeness per validation step: {steps}. The same network choosing "
            "and scoring flatters the chosen step: score the headshots with another "
            "(EvaluateConfig.embedder) where one is installed.")
