"""Fine-tune: teach a diffusion model one face with a DreamBooth-style LoRA.

Reads the prepare stage's folder (`metadata.jsonl` + images), trains a peft LoRA on the UNet's
attention projections (and optionally the text encoders), and writes a diffusers-format
`pytorch_lora_weights.safetensors`, the file UIs load (`<token>-<run>.safetensors`, kohya's
names and metadata), `config.json`, `metrics.csv`, the loss curve, validation grids and a
model card. accelerate handles device and precision;
bitsandbytes' 8-bit AdamW keeps the optimizer state at one byte per value.

Each failure Colab users keep reporting has its fix built in:
- out of GPU memory: latents and text embeddings are computed once and the VAE and text
  encoders leave the GPU; gradient checkpointing; PyTorch SDPA attention (no xformers);
- "Attempting to unscale FP16 gradients": trainable LoRA weights stay fp32 under an fp16 model;
- bitsandbytes failing to load: detected (by one real step), explained, torch AdamW used with
  its memory cost said;
- disconnects: atomic, resumable checkpoints to a folder you choose (e.g. Google Drive), and a
  resumed run continues exactly where it stopped, the fp16 loss scale included;
- a T4's fp16: validation renders under autocast, skipped fp16 updates are recorded, and a
  failed run hands its GPU memory back before the retry;
- NaN losses: the step is skipped and reported; several in a row stop the run with advice.

The parts: `setup` (loading, encoding the inputs once, attaching the LoRA), `data` (the
prepared dataset, class images), `optimizers`, `loss`, `checkpoints` (writing, reading and
resuming them), `validation` (the validation renders and the likeness choice, by
`selection`'s rule), `outputs` (what a finished run writes) and `card` (the model card); the
LoRA itself is headshot_kit.lora's, and where each model sits on the GPU is
headshot_kit.placement's, which the fit check follows too.
"""

from __future__ import annotations

import gc
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import models
from ..config import RunFailed, TrainConfig, validate_train, with_optimizer_defaults
from ..families import Conditioning, get_family
from ..fitcheck import check_before_training
from ..hostmem import collector_spares_older, return_freed_memory
from ..layout import METRICS
from ..lora import BEST_DIR, LORA_WEIGHTS
from ..placement import training_placement
from ..storage import FolderLock, check_own_folder, mark_folder
from . import checkpoints, outputs, setup, validation
from .card import usage_snippet
from .checkpoints import latest_checkpoint, list_checkpoints
from .data import (TrainExample, dataset_fingerprint, dataset_subject, load_dataset,
                   with_dataset_subject)
from .loss import diffusion_loss, encode_latents, fixed_batch_loss
from .optimizers import optimizer_state_dtypes
from .outputs import METRICS_COLUMNS, TrainResult  # noqa: F401
from .setup import fresh_accelerator
from .validation import VALIDATION_CELL  # noqa: F401

__all__ = ["Trainer", "TrainExample", "TrainResult", "TrainingDiverged", "dataset_subject",
           "fresh_accelerator", "latest_checkpoint", "list_checkpoints", "load_dataset",
           "optimizer_state_dtypes", "train_lora", "usage_snippet"]


class TrainingDiverged(RunFailed):
    """The loss stayed NaN/inf for several steps in a row."""


class Trainer:
    """One LoRA training run, in steps, so notebooks can watch it and tests can probe it.

    Callbacks: `on_step(trainer, record)` after every step, `on_validation(trainer, step,
    images, grid)` after each validation render.
    """

    def __init__(self, data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                 progress: bool = True, on_step: Callable | None = None,
                 on_validation: Callable | None = None):
        self.cfg = cfg = with_optimizer_defaults(validate_train(cfg))
        self.family = get_family(cfg.family)
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.checkpoint_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else (
            self.out_dir / "checkpoints")
        self.progress, self.on_step, self.on_validation = progress, on_step, on_validation
        self.examples = load_dataset(self.data_dir)
        self.data_fingerprint = dataset_fingerprint(self.data_dir, self.examples)
        self.cfg = cfg = with_dataset_subject(cfg, self.data_dir)
        # Its own folder: a folder of other files (a config.json, a README.md) is refused.
        check_own_folder(self.out_dir, "train", (LORA_WEIGHTS, "checkpoints", METRICS,
                                                 "validation.png", BEST_DIR), "a trained LoRA")
        # One training per folder: a second one started meanwhile is refused before it loads
        # anything, and never deletes the first's checkpoint in progress.
        self._locks = [FolderLock(self.out_dir, "training run")]
        if self.checkpoint_dir.resolve().parent != self.out_dir.resolve():
            self._locks.append(FolderLock(self.checkpoint_dir, "training run"))
        with self.writing():
            mark_folder(self.out_dir, "train")  # from now on it is this stage's folder
            # Before any model loads: a wrong embedder name fails at once, not after loading.
            self.judge = (validation.likeness_judge(cfg, [e.image for e in self.examples])
                          if cfg.validate_every else None)
            device = models.pick_device(cfg.device)
            if device.startswith("cuda"):
                # Refuse a plan that cannot fit before minutes of loading end in out-of-memory.
                check_before_training(cfg, force=cfg.force_fit)
            self.dtype = models.pick_dtype(device, cfg.mixed_precision)
            self.placement = training_placement(cfg)
            try:
                self._build(device)
            except BaseException:
                self.close()  # a retry must not find this attempt's models still on the GPU
                raise

    @contextmanager
    def writing(self):
        """Hold the run's folders (out_dir, and checkpoint_dir when it is elsewhere) while
        writing to them; another training into them is refused meanwhile."""
        with ExitStack() as stack:
            for lock in self._locks:
                stack.enter_context(lock.held())
            yield

    def _build(self, device: str) -> None:
        """Load the models, encode the inputs, attach the LoRA, resume (train.setup)."""
        with collector_spares_older():  # the imports and loading make most of the objects
            setup.build(self, device)

    @contextmanager
    def timed(self, phase: str):
        """Add the wall time of the block to `timings[phase]` (the GPU's queue drained first
        and last, so the time is the work's, not the queue's)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.timings[phase] += time.perf_counter() - start

    def close(self) -> None:
        """Let go of the models, optimizer and cached inputs, and hand their GPU memory back.

        A notebook keeps the last exception, and with it every frame that held this trainer:
        after a failed run its models would stay on the GPU and the retry run out of memory.
        """
        # The accelerator holds the prepared UNet and optimizer too, and goes with the rest.
        # Not through its free_memory(): that runs a full collection of its own (a third of a
        # second after a tiny CPU run) before the rest is let go, and reference counting alone
        # frees these models.
        for name in ("accelerator", "pipe", "unet", "optimizer", "lr_scheduler", "params",
                     "inputs", "cached_cond", "weights", "noise_scheduler"):
            self.__dict__.pop(name, None)
        if torch.cuda.is_available():
            # A model caught in a reference cycle keeps its GPU memory until a collection.
            gc.collect()
            torch.cuda.empty_cache()
        return_freed_memory()

    # -- where the pipeline's parts sit --------------------------------------------------------

    def _parked(self) -> tuple[str, ...]:
        """The pipeline parts that wait on the CPU while the UNet trains (none on the CPU)."""
        return self.placement.parked if self.device.type == "cuda" else ()

    def _move(self, names: tuple[str, ...], device: str) -> None:
        for name in names:
            getattr(self.pipe, name).to(device)
        if names and device == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _train_mode(self, training: bool) -> None:
        """Train mode for every model with a LoRA while it learns: gradient checkpointing and
        dropout act only then. Eval mode for fixed losses and validation. Only a change of mode
        walks the models (`.train()` visits every module: milliseconds on SD 1.5, every step)."""
        if self.training_mode is training:
            return
        for name in self._lora_modules():
            getattr(self.pipe, name).train(training)
        self.training_mode = training

    def _draw(self, pool: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(0, len(pool), (self.cfg.batch_size,), generator=self.generator)
        return pool[pick]

    def batch(self) -> tuple[torch.Tensor, Conditioning, int, torch.Tensor | None]:
        """One micro-batch: instance photos, then as many class images with prior
        preservation. Returns latents, conditioning, the number of instance rows and the rows'
        loss weights (None: the plain loss)."""
        instance = torch.nonzero(~self.is_class).flatten()
        idx = self._draw(instance)
        if self.cfg.prior_preservation:
            idx = torch.cat([idx, self._draw(torch.nonzero(self.is_class).flatten())])
        inputs = self.inputs[idx]
        latents = inputs if self.cfg.cache_latents else encode_latents(self.pipe, inputs)
        if self.cfg.train_text_encoder:
            cond = self.family.encode_prompts(self.pipe, [self.captions[i] for i in idx],
                                              self.cfg.resolution)
        else:
            cond = self.cached_cond.select(idx)
        # The same rows as the latents; the weights already wait on the training device.
        weights = None if self.weights is None else self.weights[idx.to(self.weights.device)]
        return latents.to(self.device), cond.to(self.device), self.cfg.batch_size, weights

    # -- steps ---------------------------------------------------------------------------------

    def micro_loss(self) -> torch.Tensor:
        latents, cond, n_instance, weights = self.batch()
        with self.accelerator.autocast():
            per_image = diffusion_loss(self.unet, self.noise_scheduler, latents, cond,
                                       generator=self.generator, snr_gamma=self.cfg.snr_gamma,
                                       noise_offset=self.cfg.noise_offset, weights=weights,
                                       reduce=False, dtype=self.unet_dtype)
        loss = per_image[:n_instance].mean()
        if self.cfg.prior_preservation:
            loss = loss + self.cfg.prior_loss_weight * per_image[n_instance:].mean()
        return loss

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its metrics row.

        A non-finite loss skips the whole step (no update) and is recorded; `max_bad_steps` in
        a row raise TrainingDiverged with advice.
        """
        cfg = self.cfg
        self._train_mode(True)
        overflow = False
        losses = []
        for _ in range(cfg.grad_accum):
            loss = self.micro_loss()
            self.accelerator.backward(loss / cfg.grad_accum)
            losses.append(loss.detach())
        # The one point where the host waits for the GPU: the step is skipped when a
        # micro-batch's loss is not finite (its NaN gradients are thrown away with the rest),
        # and the values go to the record. Reading each loss as it came would stop the CPU
        # from queueing the next micro-batch while the GPU computes this one.
        values = torch.stack(losses).float().cpu().tolist()
        bad = not all(np.isfinite(values))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
        else:
            self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row = 0
            # In fp16 the loss scaler skips an update whose gradients overflowed and lowers its
            # scale (the LR schedule waits too): normal early in a run, not divergence.
            overflow = self.accelerator.optimizer_step_was_skipped
        self.step += 1
        record = {"step": self.step, "loss": float(np.mean(values)) if not bad else float("nan"),
                  "lr": self.lr_scheduler.get_last_lr()[0], "skipped": bad or overflow}
        self.history.append(record)
        if self.bad_in_row >= cfg.max_bad_steps:
            self.save_metrics()
            raise TrainingDiverged(
                f"The loss was NaN/inf for {self.bad_in_row} steps in a row (up to step "
                f"{self.step}); the run stopped. Try a lower learning rate (now {cfg.lr}), "
                "mixed_precision='no' (or 'bf16' on a GPU that has it, not a T4), and for SDXL "
                "in fp16 the fp16-fix VAE. The last good checkpoint is in "
                f"{self.checkpoint_dir}.")
        return record

    def fixed_loss(self) -> float:
        """The loss on every photo with fixed noise and timesteps, without min-SNR weighting
        and weighted by the face masks as training weighs it."""
        self._train_mode(False)
        latents = self.inputs if self.cfg.cache_latents else encode_latents(self.pipe,
                                                                            self.inputs)
        return fixed_batch_loss(self.unet, self.noise_scheduler, latents.to(self.device),
                                self.cached_cond.to(self.device), weights=self.weights)

    # -- validation ----------------------------------------------------------------------------

    def validate(self) -> Image.Image:
        """Render the validation prompts at this step, score them for likeness (keeping the
        most alike checkpoint's LoRA in best/) and grow the grid (steps x prompts)."""
        return validation.validate(self)

    def _render_validation(self, prompt: str, seed: int) -> Image.Image:
        cfg = self.cfg
        return self.pipe(prompt, num_inference_steps=cfg.validation_steps,
                         height=cfg.resolution, width=cfg.resolution,
                         generator=torch.Generator().manual_seed(seed)).images[0]

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly, written atomically (train.checkpoints)."""
        return checkpoints.save_checkpoint(self)

    def _lora_modules(self) -> list[str]:
        return ["unet", *(self.family.text_encoders if self.cfg.train_text_encoder else ())]

    def load_checkpoint(self, folder: Path) -> None:
        checkpoints.load_checkpoint(self, folder)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        with self.writing(), collector_spares_older():
            return self._run()

    def _run(self) -> TrainResult:
        cfg, start = self.cfg, time.perf_counter()
        if self.resumed_from:
            print(f"Resuming from {self.resumed_from} (step {self.step} of {cfg.steps})."
                  if self.step < cfg.steps else f"{self.resumed_from} already holds all "
                  f"{cfg.steps} steps: nothing left to train (raise steps to train longer).")
            if self.on_step and self.history:  # a watcher shows where the run stands
                self.on_step(self, self.history[-1])
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not self.progress)
        # Training steps are timed without syncing: each already waits for its loss.
        train_start = time.perf_counter()
        while self.step < cfg.steps:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if self.on_step:
                self.on_step(self, record)
            if cfg.validate_every and self.step % cfg.validate_every == 0:
                with self.timed("validation"):
                    self.validate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                with self.timed("checkpoints"):
                    self.save_checkpoint()
        last = latest_checkpoint(self.checkpoint_dir)
        if last is None or int(last.name.split("-")[-1]) != self.step:
            with self.timed("checkpoints"):
                self.save_checkpoint()  # the last step too: a re-run then knows it is finished
        self.timings["training"] += (time.perf_counter() - train_start
                                     - self.timings["validation"] - self.timings["checkpoints"])
        bar.close()
        return_freed_memory()  # the steps' activations, before the outputs are written
        return self.save(time.perf_counter() - start)

    def save_metrics(self) -> Path:
        return outputs.save_metrics(self)

    def _save_lora(self, folder: Path, **record) -> Path:
        return outputs.save_lora_folder(self, folder, **record)

    def save(self, seconds: float = 0.0) -> TrainResult:
        """Write what a finished run leaves (train.outputs); returns its TrainResult."""
        return outputs.save(self, seconds)


def train_lora(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig | None = None,
               **kwargs) -> TrainResult:
    """Train a LoRA on the prepared photos in `data_dir`; write it and its records to `out_dir`.

    Keyword arguments go to `Trainer` (progress, on_step, on_validation).
    """
    trainer = Trainer(data_dir, out_dir, cfg or TrainConfig(), **kwargs)
    try:
        print(f"Training a rank-{trainer.cfg.rank} LoRA ({trainer.n_trainable:,} parameters) "
              f"on {len(trainer.examples)} photos for {trainer.cfg.steps} steps on "
              f"{trainer.device.type} ({trainer.dtype}), optimizer: {trainer.optimizer_name}.")
        return trainer.run()
    finally:
        # Free the training models before anything loads an inference pipeline (on Colab,
        # holding both runs the 12.7 GB of host RAM out), and after a failure, so that a retry
        # starts with an empty GPU.
        trainer.close()
