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

The parts: `data` (the prepared dataset, class images), `optimizers`, `loss`, `checkpoints`
and `card` (the model card); the LoRA itself is headshot_kit.lora's, and where each model sits
on the GPU is headshot_kit.placement's, which the fit check follows too.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import models
from ..config import (ConfigError, RunFailed, TrainConfig, config_hash, save_config, to_dict,
                      validate_train, with_optimizer_defaults)
from ..families import Conditioning, get_family
from ..fitcheck import check_before_training
from ..images import image_grid
from ..lora import (BEST_DIR, LORA_WEIGHTS, add_lora, chosen_checkpoint, export_kohya,
                    peft_state, save_lora)
from ..placement import training_placement
from ..storage import FolderLock, atomic_dir, atomic_path, check_own_folder, mark_folder
from .card import lora_file_metadata, lora_file_name, usage_snippet, write_model_card
from .checkpoints import (RESUME_KEYS, CheckpointUnreadable, check_resume, latest_checkpoint,
                          list_checkpoints, load_state, read_meta, save_state)
from .data import (TrainExample, dataset_fingerprint, dataset_subject, ensure_class_images,
                   image_tensor, load_dataset, mask_tensor, with_dataset_subject)
from .loss import diffusion_loss, encode_latents, fixed_batch_loss, loss_weights
from .optimizers import make_optimizer, optimizer_state_dtypes
from .selection import RULE, LikenessJudge, choose_best, step_score

__all__ = ["Trainer", "TrainExample", "TrainResult", "TrainingDiverged", "dataset_subject",
           "fresh_accelerator", "latest_checkpoint", "list_checkpoints", "load_dataset",
           "optimizer_state_dtypes", "train_lora", "usage_snippet"]


# metrics.csv: one row per step; likeness (of the validation images) and copies (of them that
# copy a training photo, train.selection) on validation steps only.
METRICS_COLUMNS = ("step", "loss", "lr", "skipped", "likeness", "copies")
# validation.png's cell: each row is kept in the checkpoint at this size (PNG), so a resumed run
# draws the rows before the restart exactly as they were.
VALIDATION_CELL = 160


class TrainingDiverged(RunFailed):
    """The loss stayed NaN/inf for several steps in a row."""


@dataclass
class TrainResult:
    out_dir: Path
    lora_path: Path
    metrics: pd.DataFrame
    optimizer: str  # the optimizer that actually ran, e.g. "bitsandbytes AdamW8bit"
    seconds: float
    skipped_steps: int = 0
    # The checkpoint chosen by likeness (its LoRA in out_dir/best/), when one was.
    best_step: int | None = None
    best_likeness: float | None = None
    chosen_by: str = ""  # the face network that scored it
    # Measured seconds of the run's phases (loads, caching, training, validation,
    # checkpoints), named as the journey ETA names them (headshot_kit.fitcheck.eta).
    timings: dict = field(default_factory=dict)

    def plot(self):
        from ..images import plot_loss

        return plot_loss(self.metrics.dropna(subset=["loss"]), best_step=self.best_step,
                         title=f"Training loss ({self.optimizer})")


def fresh_accelerator(dtype: torch.dtype, device: str):
    """An Accelerator for one run, in its precision.

    accelerate keeps one state per process and refuses another precision later in the same
    process ("AcceleratorState has already been initialized"), so a notebook could not retry a
    diverged fp16 run in fp32. A run here is always a single process: each starts clean.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    return Accelerator(mixed_precision=precision, cpu=device == "cpu")


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
        check_own_folder(self.out_dir, "train", (LORA_WEIGHTS, "checkpoints", "metrics.csv",
                                                 "validation.png", BEST_DIR), "a trained LoRA")
        # One training per folder: a second one started meanwhile is refused before it loads
        # anything, and never deletes the first's checkpoint in progress.
        self._locks = [FolderLock(self.out_dir, "training run")]
        if self.checkpoint_dir.resolve().parent != self.out_dir.resolve():
            self._locks.append(FolderLock(self.checkpoint_dir, "training run"))
        with self.writing():
            mark_folder(self.out_dir, "train")  # from now on it is this stage's folder
            # Before any model loads: a wrong embedder name fails at once, not after loading.
            self.judge = self._likeness_judge() if cfg.validate_every else None
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
        """Load the models, encode the inputs, attach the LoRA, resume: the heavy part."""
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        cfg, progress = self.cfg, self.progress
        self.timings: dict[str, float] = defaultdict(float)
        self.accelerator = fresh_accelerator(self.dtype, device)
        self.device = self.accelerator.device
        with self.timed("loads"):
            self.pipe = models.load_pipeline(cfg.model, cfg.family, device=str(self.device),
                                             dtype=self.dtype)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        class_images = (ensure_class_images(self.pipe, cfg, progress)
                        if cfg.prior_preservation else [])
        with self.timed("caching"):
            self._cache_inputs(class_images)

        unet = self.pipe.unet
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # Seeded here, after loading: building a tiny model on first use (or a cache miss of any
        # kind) draws from the same generator, and the LoRA's start must not depend on it.
        torch.manual_seed(cfg.seed)
        params = add_lora(unet, cfg.rank, cfg.lora_alpha, cfg.lora_dropout,
                          tuple(cfg.target_modules))
        if cfg.train_text_encoder:
            for name in self.family.text_encoders:
                encoder = getattr(self.pipe, name)
                params += add_lora(encoder, cfg.rank, cfg.lora_alpha, cfg.lora_dropout,
                                   self.family.text_encoder_targets)
                if cfg.gradient_checkpointing:
                    # transformers 5 renamed it; older releases (as Colab may have) only know
                    # the old name.
                    enable = (getattr(encoder, "activation_checkpointing_enable", None)
                              or encoder.gradient_checkpointing_enable)
                    enable()
        self.params = params
        self.n_trainable = sum(p.numel() for p in params)
        optimizer, self.optimizer_name = make_optimizer(params, cfg)
        # The schedule counts optimizer steps; accumulation happens inside each step.
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                  num_warmup_steps=cfg.lr_warmup_steps,
                                  num_training_steps=cfg.steps)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            unet, optimizer, scheduler)
        # Read once: `unet.dtype` walks every parameter, and the loop needs it every micro-batch.
        self.unet_dtype = unet.dtype
        self.training_mode: bool | None = None  # what _train_mode last set
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step, self.bad_in_row = 0, 0
        self.started_at = time.time()  # for the LoRA file's metadata
        self.history: list[dict] = []
        self.validation_rows: list[tuple[int, list[Image.Image]]] = []
        self.resumed_from: Path | None = None
        # Folders of checkpoints whose writing was cut off never got their final name.
        for stale in self.checkpoint_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if cfg.resume:
            self._resume()

    def _resume(self) -> None:
        """Continue from the newest checkpoint that reads back whole; a damaged one (cut
        short by a full disk, say) is skipped for the one before it, with a sentence."""
        found = list_checkpoints(self.checkpoint_dir)
        if not found and list(self.checkpoint_dir.glob("checkpoint-*/state.pt")):
            print(f"{self.checkpoint_dir} holds checkpoints in the older state.pt format, which "
                  "is not loaded (a pickle can run code): training starts over. Delete them "
                  "once this run has finished.")
        for n, folder in enumerate(reversed(found)):
            try:
                self.load_checkpoint(folder)
                return
            except CheckpointUnreadable as exc:
                then = ("resuming from the one before it" if n + 1 < len(found)
                        else "no older one is left, so training starts over")
                print(f"{exc}: skipped, {then}.")

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
        accelerator = self.__dict__.pop("accelerator", None)
        if accelerator is not None:
            accelerator.free_memory()  # it holds the prepared UNet and optimizer too
        for name in ("pipe", "unet", "optimizer", "lr_scheduler", "params", "inputs",
                     "cached_cond", "weights", "noise_scheduler"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- inputs --------------------------------------------------------------------------------

    def _cache_inputs(self, class_images: list[Path]) -> None:
        """Encode every photo (and class image) once; captions too unless a text-encoder LoRA
        is trained. With everything cached the VAE and text encoders leave the GPU. The face
        masks' loss weights are made once too, whether latents are cached or not: they are
        small (one value per latent pixel) and cost nothing to keep."""
        cfg, pipe = self.cfg, self.pipe
        paths = [e.image for e in self.examples] + class_images
        self.captions = [e.caption for e in self.examples] + [cfg.class_prompt] * len(class_images)
        self.is_class = torch.tensor([False] * len(self.examples) + [True] * len(class_images))
        pixels = torch.stack([image_tensor(p, cfg.resolution) for p in paths])
        if cfg.cache_latents:
            chunk = self.placement.cache_chunk
            self.inputs = torch.cat([encode_latents(pipe, pixels[i:i + chunk])
                                     for i in range(0, len(pixels), chunk)])
        else:
            self.inputs = pixels
        with torch.no_grad():
            self.cached_cond = self.family.encode_prompts(
                pipe, self.captions, cfg.resolution).to(dtype=torch.float32).detach()
        self.weights = self._loss_weights(len(class_images))
        self._move(self._parked(), "cpu")

    def _loss_weights(self, n_class: int) -> torch.Tensor | None:
        """Every photo's per-pixel loss weights on the latent grid (N, 1, h, w), from its face
        mask; class images weigh every pixel alike (they teach the class, not a face). None
        (the plain loss) with background_weight 1, or for a dataset prepared without masks."""
        cfg = self.cfg
        if cfg.background_weight == 1:
            return None
        unmasked = sum(e.mask is None for e in self.examples)
        if unmasked:
            print(f"{self.data_dir / 'metadata.jsonl'} lists no face mask for {unmasked} of "
                  f"{len(self.examples)} photos (it was prepared before masks were written): "
                  "training with the plain loss, every pixel weighted alike. Run the prepare "
                  f"stage again to weight the face (background_weight={cfg.background_weight}).")
            return None
        masks = torch.stack([mask_tensor(e.mask, cfg.resolution) for e in self.examples])
        masks = torch.cat([masks, torch.ones(n_class, *masks.shape[1:])])
        side = cfg.resolution // self.pipe.vae_scale_factor
        return loss_weights(masks, (side, side), cfg.background_weight).to(self.device)

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
        cfg = self.cfg
        prompts = [p.format(subject=cfg.subject) for p in cfg.validation_prompts]
        self._train_mode(False)
        parked = self._parked()
        self._move(parked, str(self.device))
        try:
            # Under mixed precision the prepared UNet returns fp32 (accelerate wraps its
            # forward): autocast hands the half-precision VAE what it computes in, as diffusers'
            # DreamBooth scripts validate inside torch.autocast.
            with torch.no_grad(), self.accelerator.autocast():
                images = [self._render_validation(prompt, seed) for prompt in prompts
                          for seed in cfg.validation_seeds]
        finally:
            self._move(parked, "cpu")
        self._judge(images)
        self.validation_rows.append((self.step, images))
        # Label by what follows the subject words: every prompt starts the same way.
        # (image_grid wraps each to its cell's width.)
        columns = [f"{p.split(cfg.subject)[-1].strip(' ,')} s{s}" for p in prompts
                   for s in cfg.validation_seeds]
        grid = image_grid([im for _, row in self.validation_rows for im in row],
                          rows=len(self.validation_rows), cols=len(images),
                          row_labels=[f"step {s}" for s, _ in self.validation_rows],
                          col_labels=columns, title="Validation: each row a training step",
                          cell=VALIDATION_CELL)
        with atomic_path(self.out_dir / "validation.png") as tmp:
            grid.save(tmp, format="PNG")
        if self.on_validation:
            self.on_validation(self, self.step, images, grid)
        return grid

    def _render_validation(self, prompt: str, seed: int) -> Image.Image:
        cfg = self.cfg
        return self.pipe(prompt, num_inference_steps=cfg.validation_steps,
                         height=cfg.resolution, width=cfg.resolution,
                         generator=torch.Generator().manual_seed(seed)).images[0]

    def _likeness_judge(self) -> LikenessJudge | None:
        from ..evaluate import NoFaceError

        try:
            return LikenessJudge(self.cfg, [e.image for e in self.examples])
        except NoFaceError as exc:
            print(f"Validation images will not be scored for likeness: {exc}")
            return None

    def _judge(self, images: list[Image.Image]) -> None:
        """Record this step's likeness in its metrics row and, when it is the best so far,
        keep its LoRA in best/ (headshot_kit.train.selection states the rule)."""
        if self.judge is None or not self.history or self.history[-1]["step"] != self.step:
            return
        record = self.history[-1]
        record["likeness"] = step_score(self.judge.likeness(images))
        record["copies"] = self.judge.copies
        best = choose_best(self.history)
        if best is record:
            with atomic_dir(self.out_dir / BEST_DIR) as tmp:  # read by chosen_checkpoint
                self._save_lora(tmp, checkpoint=BEST_DIR, step=self.step,
                                likeness=round(record["likeness"], 4),
                                chosen_by=self.judge.name, rule=RULE)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly: LoRA weights, optimizer, scheduler, the fp16
        loss scaler, RNGs.

        Written to a temporary folder renamed into place, so the latest checkpoint on disk is
        always complete, whenever the process dies."""
        target = self.checkpoint_dir / f"checkpoint-{self.step:07d}"
        state = {
            "step": self.step, "bad_in_row": self.bad_in_row, "history": self.history,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if (scaler := self.accelerator.scaler) else None,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "lora": {name: peft_state(getattr(self.pipe, name)) for name in self._lora_modules()},
            "validation_rows": [(step, [_png(im) for im in row])
                                for step, row in self.validation_rows],
        }
        with self.writing():
            with atomic_dir(target) as tmp:
                save_state(tmp, state)
                (tmp / "meta.json").write_text(json.dumps({
                    "step": self.step, "config": to_dict(self.cfg),
                    "optimizer_used": self.optimizer_name,
                    "resume_hash": config_hash({k: to_dict(self.cfg)[k] for k in RESUME_KEYS}),
                    "data_dir": str(self.data_dir), "data_fingerprint": self.data_fingerprint,
                }, indent=2, default=str) + "\n")
            found = list_checkpoints(self.checkpoint_dir)
            if not self.cfg.resume:  # started over: later steps belong to the run it replaces
                found = [f for f in found if f.name <= target.name]
                for later in set(list_checkpoints(self.checkpoint_dir)) - set(found):
                    shutil.rmtree(later, ignore_errors=True)
            for old in found[: -max(1, self.cfg.checkpoints_keep)]:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def _lora_modules(self) -> list[str]:
        return ["unet", *(self.family.text_encoders if self.cfg.train_text_encoder else ())]

    def load_checkpoint(self, folder: Path) -> None:
        from peft.utils import set_peft_model_state_dict

        meta = read_meta(folder)
        check_resume(folder, meta, self.cfg, self.data_fingerprint, self.data_dir)
        used = meta.get("optimizer_used", self.optimizer_name)
        if used != self.optimizer_name:
            raise ConfigError(f"{folder} holds {used} state but this run steps with "
                              f"{self.optimizer_name}; they cannot continue each other. Set the "
                              "optimizer the checkpoint used, use a new checkpoint_dir, or set "
                              "resume=False to start over.")
        state = load_state(folder)  # tensors and JSON: nothing in it can run
        for name, weights in state["lora"].items():
            set_peft_model_state_dict(getattr(self.pipe, name), weights)
        for p in self.params:
            p.data = p.data.float()
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        self.step, self.bad_in_row = state["step"], state["bad_in_row"]
        self.history = state["history"]
        self.validation_rows = [(step, [_from_png(b) for b in row])
                                for step, row in state.get("validation_rows", [])]
        self.resumed_from = folder

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        with self.writing():
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
        return self.save(time.perf_counter() - start)

    def save_metrics(self) -> pd.DataFrame:
        metrics = pd.DataFrame(self.history, columns=list(METRICS_COLUMNS))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out_dir / "metrics.csv") as tmp:
            metrics.to_csv(tmp, index=False)
        return metrics

    def _save_lora(self, folder: Path, **record) -> Path:
        """The LoRA as it stands (diffusers and kohya files) and its config.json, in `folder`."""
        lora_path = save_lora(folder, self.cfg.family,
                              {name: getattr(self.pipe, name) for name in self._lora_modules()})
        token, class_name = dataset_subject(self.data_dir)
        name = lora_file_name(self.cfg, token, self.data_dir,
                              step=record["step"] if record["checkpoint"] == BEST_DIR else None)
        ui = export_kohya(lora_path, self.cfg.family, output_name=name, rank=self.cfg.rank,
                          alpha=self.cfg.lora_alpha, metadata=lora_file_metadata(
                              self.cfg, output_name=name, subject=f"{token} {class_name}",
                              n_images=len(self.examples), steps=record["step"],
                              optimizer=self.optimizer_name, started_at=self.started_at,
                              finished_at=time.time()),
                          layers_per_block=self.pipe.unet.config.layers_per_block)
        save_config(self.cfg, folder / "config.json", data_dir=str(self.data_dir),
                    token=token, class_name=class_name, optimizer_used=self.optimizer_name,
                    trainable_parameters=self.n_trainable, n_images=len(self.examples),
                    data_fingerprint=self.data_fingerprint, ui_weights=ui.name, **record)
        return lora_path

    def save(self, seconds: float = 0.0) -> TrainResult:
        out = self.out_dir
        metrics = self.save_metrics()
        skipped = int(metrics["skipped"].sum()) if len(metrics) else 0
        kept = {}
        if choose_best(self.history) is None:
            # A best/ left by an earlier run in this folder does not belong to these weights.
            shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        else:
            kept = chosen_checkpoint(out / BEST_DIR)
        lora_path = self._save_lora(out, checkpoint="last", step=self.step,
                                    skipped_steps=skipped, seconds=round(seconds, 2),
                                    best_step=kept.get("step"),
                                    best_likeness=kept.get("likeness"),
                                    checkpoint_chosen_by=kept.get("chosen_by"))
        result = TrainResult(out, lora_path, metrics, self.optimizer_name, seconds, skipped,
                             best_step=kept.get("step"), best_likeness=kept.get("likeness"),
                             chosen_by=kept.get("chosen_by", ""),
                             timings={k: round(v, 2) for k, v in self.timings.items()})
        if metrics["loss"].notna().any():
            import matplotlib.pyplot as plt

            fig = result.plot()
            fig.savefig(out / "loss.png", dpi=100)
            plt.close(fig)
        write_model_card(out, self.cfg, result, len(self.examples))
        return result


def _png(image: Image.Image) -> bytes:
    """A validation image as validation.png shows it (scaled to its cell), as PNG bytes."""
    import io

    from PIL import ImageOps

    buffer = io.BytesIO()
    ImageOps.contain(image.convert("RGB"), (VALIDATION_CELL, VALIDATION_CELL),
                     Image.Resampling.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()


def _from_png(data: bytes) -> Image.Image:
    import io

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


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
