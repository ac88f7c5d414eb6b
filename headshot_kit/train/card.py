"""The model card: README.md beside the weights, saying what the LoRA is, how it was made and
how to use it; and its machine-readable twin, the name and metadata of the file UIs load
(kohya's `ss_*` and ModelSpec's `modelspec.*`, see formats.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .. import models
from ..config import TrainConfig, to_dict
from ..families import get_family
from ..formats import kohya_metadata, model_name, safe_name
from ..lora import BEST_DIR, LORA_WEIGHTS, ui_weights
from ..storage import atomic_write_text

if TYPE_CHECKING:
    from . import TrainResult

# The settings that name a run in its UI file's name, with the photos: what the weights are (the
# base model, the LoRA's shape, the resolution and the prior). A resumed run keeps its name:
# none of these is among the settings a resumed run may change (checkpoints.FREE_ON_RESUME).
NAME_SETTINGS = ("model", "family", "rank", "alpha", "target_modules", "train_text_encoder",
                 "resolution", "prior_preservation")


def lora_file_name(cfg: TrainConfig, token: str, data_dir: str | Path,
                   step: int | None = None) -> str:
    """The UI file's name (without .safetensors), which is also the name in `<lora:NAME:1>`:
    the subject's token and the run, e.g. "ohwx-3f9a2c1d", with "-step<N>" for a checkpoint
    other than the last. The run is a fingerprint of the photos (the dataset's captions and
    files) and of the settings that shape the weights, so two people's LoRAs (or one
    person's from two datasets or settings) never share a name, while resuming a run keeps it.
    """
    import hashlib

    from ..config import config_hash

    digest = hashlib.sha256()
    for path in sorted(Path(data_dir).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(data_dir).as_posix().encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    settings = {k: to_dict(cfg)[k] for k in NAME_SETTINGS}
    run = config_hash({"data": digest.hexdigest(), **settings})[:8]
    name = f"{safe_name(token)}-{run}"
    return name if step is None else f"{name}-step{step}"


def lora_file_metadata(cfg: TrainConfig, *, output_name: str, subject: str, n_images: int,
                       steps: int, optimizer: str, started_at: float,
                       finished_at: float) -> dict[str, str]:
    """kohya's and ModelSpec's metadata for the UI file of a LoRA trained with `cfg`."""
    return kohya_metadata(
        family=cfg.family, output_name=output_name,
        title=f"{subject} ({output_name})", trigger=subject, rank=cfg.rank,
        alpha=cfg.lora_alpha, resolution=cfg.resolution, model=cfg.model,
        started_at=started_at, finished_at=finished_at,
        train_text_encoder=cfg.train_text_encoder,
        settings={"learning_rate": cfg.lr, "unet_lr": cfg.lr,
                  "text_encoder_lr": cfg.lr if cfg.train_text_encoder else 0,
                  "max_train_steps": cfg.steps, "steps": steps,
                  "num_train_images": n_images, "optimizer": optimizer,
                  "seed": cfg.seed, "mixed_precision": cfg.mixed_precision,
                  "gradient_checkpointing": cfg.gradient_checkpointing,
                  "cache_latents": cfg.cache_latents, "max_grad_norm": cfg.max_grad_norm,
                  "min_snr_gamma": cfg.snr_gamma, "noise_offset": cfg.noise_offset,
                  "lr_scheduler": cfg.lr_scheduler,
                  "sd_model_name_or_path": cfg.model,
                  "base_model_name": model_name(cfg.model)})


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
    last = [r["loss"] for r in result.history if not math.isnan(r["loss"])][-10:]
    final = sum(last) / len(last) if last else float("nan")
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
Final loss (mean of the last 10 steps): {final:.4f}; skipped steps:
{result.skipped_steps}.

This LoRA was trained on photos of a real person: share it only with their consent.

## Which weights
{_checkpoints(cfg, result)}

## Use
```python
{usage_snippet(cfg, f"{out.name}/{BEST_DIR}" if result.best_step is not None else out.name)}
```
{_which_file(out, result)}
{samples}
## Settings
| setting | value |
| --- | --- |
{rows}
"""
    return atomic_write_text(out / "README.md", text)


def _which_file(out: Path, result: TrainResult) -> str:
    """Which file goes where: the UI file for A1111/Forge, ComfyUI, InvokeAI and Civitai, the
    diffusers file for `load_lora_weights`."""
    folder = out / BEST_DIR if result.best_step is not None else out
    ui = ui_weights(folder)
    if ui is None:
        return f"`{LORA_WEIGHTS}` is the file diffusers' `load_lora_weights` reads."
    where = f"{BEST_DIR}/{ui.name}" if folder != out else ui.name
    return (f"**For A1111/Forge, ComfyUI, InvokeAI or Civitai** copy `{where}` into the UI's "
            f"LoRA folder (`models/Lora/`, `models/loras/`) and write `<lora:{ui.stem}:1>` in "
            f"the prompt (A1111/Forge) or pick it in a LoRA loader node (ComfyUI). It holds "
            f"the weights under kohya's names with kohya's and ModelSpec's metadata.\n\n"
            f"**For diffusers** `{LORA_WEIGHTS}` (what `load_lora_weights` reads, as above) "
            "stays beside it.")


def _checkpoints(cfg: TrainConfig, result: TrainResult) -> str:
    """Which checkpoint the likeness scores chose, by which rule and network, or why none."""
    from .selection import RULE

    last = f"`{LORA_WEIGHTS}` holds the weights after the last step ({cfg.steps})."
    if result.best_step is None:
        why = ("validation was off (validate_every=0)" if not cfg.validate_every else
               "no validation image showed a face")
        return f"{last} No checkpoint was chosen by likeness: {why}."
    steps = ", ".join(f"{r['step']}: {r['likeness']:.2f}" for r in result.history
                      if r.get("likeness") is not None and not math.isnan(r["likeness"]))
    return (f"{last} `{BEST_DIR}/` holds the weights of step {result.best_step}, whose "
            f"validation images looked most like the photos (likeness {result.best_likeness:.2f}"
            f" by {result.chosen_by}); generate uses them unless lora_checkpoint='last'. The "
            f"rule: {RULE}. Likeness per validation step: {steps}. The same network choosing "
            "and scoring flatters the chosen step: score the headshots with another "
            "(EvaluateConfig.embedder) where one is installed.")
