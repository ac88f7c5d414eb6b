"""The model card: README.md beside the weights, saying what the LoRA is, how it was made and
how to use it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import models
from ..config import TrainConfig, to_dict
from ..families import get_family
from ..lora import KOHYA_WEIGHTS
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

## Use
```python
{usage_snippet(cfg, out.name)}
```
`{KOHYA_WEIGHTS}` holds the same weights under kohya names for A1111 and ComfyUI.
{samples}
## Settings
| setting | value |
| --- | --- |
{rows}
"""
    return atomic_write_text(out / "README.md", text)
