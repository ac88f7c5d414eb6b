"""Setting a training run up: a fresh Accelerator, the pipeline loaded, every photo (and
class image) and caption encoded once with the face masks' loss weights, the LoRA attached,
the optimizer and its schedule prepared, and the run's state started (or resumed from its
latest checkpoint). The Trainer calls `build` once; the loop then reads what it set."""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .. import models
from ..hostmem import return_freed_memory
from ..lora import add_lora
from .checkpoints import resume
from .data import ensure_class_images, image_tensor, mask_tensor
from .loss import encode_latents, loss_weights
from .optimizers import make_optimizer

if TYPE_CHECKING:
    from . import Trainer


def fresh_accelerator(dtype: torch.dtype, device: str):
    """An Accelerator for one run, in its precision.

    accelerate keeps one state per process and refuses another precision later in the same
    process ("AcceleratorState has already been initialized"), so a notebook could not retry a
    diverged fp16 run in fp32. A run here is always a single process: each starts clean.
    """
    from accelerate import Accelerator

    _forget_accelerate_state()
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    return Accelerator(mixed_precision=precision, cpu=device == "cpu")


def _forget_accelerate_state() -> None:
    """Drop accelerate's per-process state, so that the next Accelerator may take another
    precision.

    accelerate (to 1.x) has no public call for this. `_reset_state` is private, but it is the
    one accelerate's own test base class (AccelerateTestCase.tearDown) and transformers'
    TrainingArguments call for the same need; tests/test_accelerate_state.py checks that a second
    run in the same process still changes precision. Nothing else in the package touches it.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build(trainer: Trainer, device: str) -> None:
    """Load the models, encode the inputs, attach the LoRA, resume: the heavy part."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    cfg, progress = trainer.cfg, trainer.progress
    trainer.timings: dict[str, float] = defaultdict(float)
    trainer.accelerator = fresh_accelerator(trainer.dtype, device)
    trainer.device = trainer.accelerator.device
    with trainer.timed("loads"):
        trainer.pipe = models.load_pipeline(cfg.model, cfg.family,
                                            device=str(trainer.device), dtype=trainer.dtype)
    trainer.noise_scheduler = DDPMScheduler.from_config(trainer.pipe.scheduler.config)
    class_images = (ensure_class_images(trainer.pipe, cfg, progress)
                    if cfg.prior_preservation else [])
    with trainer.timed("caching"):
        cache_inputs(trainer, class_images)
    return_freed_memory()  # what encoding held for a moment, before the UNet trains

    unet = trainer.pipe.unet
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # Seeded here, after loading: building a tiny model on first use (or a cache miss of any
    # kind) draws from the same generator, and the LoRA's start must not depend on it.
    torch.manual_seed(cfg.seed)
    params = add_lora(unet, cfg.rank, cfg.lora_alpha, cfg.lora_dropout,
                      tuple(cfg.target_modules))
    if cfg.train_text_encoder:
        for name in trainer.family.text_encoders:
            encoder = getattr(trainer.pipe, name)
            params += add_lora(encoder, cfg.rank, cfg.lora_alpha, cfg.lora_dropout,
                               trainer.family.text_encoder_targets)
            if cfg.gradient_checkpointing:
                # transformers 5 renamed it; older releases (as Colab may have) only know
                # the old name.
                enable = (getattr(encoder, "activation_checkpointing_enable", None)
                          or encoder.gradient_checkpointing_enable)
                enable()
    trainer.params = params
    trainer.n_trainable = sum(p.numel() for p in params)
    optimizer, trainer.optimizer_name = make_optimizer(params, cfg)
    # The schedule counts optimizer steps; accumulation happens inside each step.
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                              num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.steps)
    trainer.unet, trainer.optimizer, trainer.lr_scheduler = trainer.accelerator.prepare(
        unet, optimizer, scheduler)
    # Read once: `unet.dtype` walks every parameter, and the loop needs it every micro-batch.
    trainer.unet_dtype = unet.dtype
    trainer.training_mode: bool | None = None  # what _train_mode last set
    trainer.generator = torch.Generator().manual_seed(cfg.seed)
    trainer.step, trainer.bad_in_row = 0, 0
    trainer.started_at = time.time()  # for the LoRA file's metadata
    trainer.history: list[dict] = []
    trainer.validation_rows: list[tuple[int, list[Image.Image]]] = []
    trainer.resumed_from: Path | None = None
    # Folders of checkpoints whose writing was cut off never got their final name.
    for stale in trainer.checkpoint_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if cfg.resume:
        resume(trainer)


def cache_inputs(trainer: Trainer, class_images: list[Path]) -> None:
    """Encode every photo (and class image) once; captions too unless a text-encoder LoRA
    is trained. With everything cached the VAE and text encoders leave the GPU. The face
    masks' loss weights are made once too, whether latents are cached or not: they are
    small (one value per latent pixel) and cost nothing to keep."""
    cfg, pipe = trainer.cfg, trainer.pipe
    paths = [e.image for e in trainer.examples] + class_images
    examples = trainer.examples
    trainer.captions = [e.caption for e in examples] + [cfg.class_prompt] * len(class_images)
    trainer.is_class = torch.tensor([False] * len(examples) + [True] * len(class_images))
    pixels = torch.stack([image_tensor(p, cfg.resolution) for p in paths])
    if cfg.cache_latents:
        # On the CPU a batch runs no faster than its photos one by one, and holds all their
        # activations at once.
        chunk = trainer.placement.cache_chunk if trainer.device.type == "cuda" else 1
        trainer.inputs = torch.cat([encode_latents(pipe, pixels[i:i + chunk])
                                    for i in range(0, len(pixels), chunk)])
    else:
        trainer.inputs = pixels
    with torch.no_grad():
        trainer.cached_cond = trainer.family.encode_prompts(
            pipe, trainer.captions, cfg.resolution).to(dtype=torch.float32).detach()
    trainer.weights = photo_loss_weights(trainer, len(class_images))
    trainer._move(trainer._parked(), "cpu")


def photo_loss_weights(trainer: Trainer, n_class: int) -> torch.Tensor | None:
    """Every photo's per-pixel loss weights on the latent grid (N, 1, h, w), from its face
    mask; class images weigh every pixel alike (they teach the class, not a face). None
    (the plain loss) with background_weight 1, or for a dataset prepared without masks."""
    cfg = trainer.cfg
    if cfg.background_weight == 1:
        return None
    unmasked = sum(e.mask is None for e in trainer.examples)
    if unmasked:
        print(f"{trainer.data_dir / 'metadata.jsonl'} lists no face mask for {unmasked} of "
              f"{len(trainer.examples)} photos (it was prepared before masks were written): "
              "training with the plain loss, every pixel weighted alike. Run the prepare "
              f"stage again to weight the face (background_weight={cfg.background_weight}).")
        return None
    masks = torch.stack([mask_tensor(e.mask, cfg.resolution) for e in trainer.examples])
    masks = torch.cat([masks, torch.ones(n_class, *masks.shape[1:])])
    side = cfg.resolution // trainer.pipe.vae_scale_factor
    return loss_weights(masks, (side, side), cfg.background_weight).to(trainer.device)
