"""Validation during training: the validation prompts rendered at a step, scored for likeness
(the LoRA of the most alike step kept in `<out>/best/`, by train.selection's rule), and the
grid of every validation step so far (`validation.png`, each row a step).

The rows are kept in the checkpoint as PNG bytes at the grid's cell size, so a resumed run
draws the rows from before the restart exactly as they were."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..config import TrainConfig
from ..images import image_grid
from ..lora import BEST_DIR
from ..storage import atomic_dir, atomic_path
from .selection import RULE, LikenessJudge, choose_best, step_score

if TYPE_CHECKING:
    from pathlib import Path

    from . import Trainer

# validation.png's cell: each row is kept in the checkpoint at this size (PNG), so a resumed run
# draws the rows before the restart exactly as they were.
VALIDATION_CELL = 160


def validate(trainer: Trainer) -> Image.Image:
    """Render the validation prompts at this step, score them for likeness (keeping the
    most alike checkpoint's LoRA in best/) and grow the grid (steps x prompts)."""
    cfg = trainer.cfg
    prompts = [p.format(subject=cfg.subject) for p in cfg.validation_prompts]
    trainer._train_mode(False)
    parked = trainer._parked()
    trainer._move(parked, str(trainer.device))
    try:
        # Under mixed precision the prepared UNet returns fp32 (accelerate wraps its
        # forward): autocast hands the half-precision VAE what it computes in, as diffusers'
        # DreamBooth scripts validate inside torch.autocast.
        with torch.no_grad(), trainer.accelerator.autocast():
            images = [trainer._render_validation(prompt, seed) for prompt in prompts
                      for seed in cfg.validation_seeds]
    finally:
        trainer._move(parked, "cpu")
    judge(trainer, images)
    trainer.validation_rows.append((trainer.step, images))
    # Label by what follows the subject words: every prompt starts the same way.
    # (image_grid wraps each to its cell's width.)
    columns = [f"{p.split(cfg.subject)[-1].strip(' ,')} s{s}" for p in prompts
               for s in cfg.validation_seeds]
    grid = image_grid([im for _, row in trainer.validation_rows for im in row],
                      rows=len(trainer.validation_rows), cols=len(images),
                      row_labels=[f"step {s}" for s, _ in trainer.validation_rows],
                      col_labels=columns, title="Validation: each row a training step",
                      cell=VALIDATION_CELL)
    with atomic_path(trainer.out_dir / "validation.png") as tmp:
        grid.save(tmp, format="PNG")
    if trainer.on_validation:
        trainer.on_validation(trainer, trainer.step, images, grid)
    return grid


def likeness_judge(cfg: TrainConfig, photos: list[Path]) -> LikenessJudge | None:
    """The judge of the validation images' likeness to `photos`, or None (with a sentence)
    when the photos show no face it can read."""
    from ..evaluate import NoFaceError

    try:
        return LikenessJudge(cfg, photos)
    except NoFaceError as exc:
        print(f"Validation images will not be scored for likeness: {exc}")
        return None


def judge(trainer: Trainer, images: list[Image.Image]) -> None:
    """Record this step's likeness in its metrics row and, when it is the best so far,
    keep its LoRA in best/ (headshot_kit.train.selection states the rule)."""
    if (trainer.judge is None or not trainer.history
            or trainer.history[-1]["step"] != trainer.step):
        return
    record = trainer.history[-1]
    record["likeness"] = step_score(trainer.judge.likeness(images))
    record["copies"] = trainer.judge.copies
    best = choose_best(trainer.history)
    if best is record:
        with atomic_dir(trainer.out_dir / BEST_DIR) as tmp:  # read by chosen_checkpoint
            trainer._save_lora(tmp, checkpoint=BEST_DIR, step=trainer.step,
                               likeness=round(record["likeness"], 4),
                               chosen_by=trainer.judge.name, rule=RULE)


def to_png(image: Image.Image) -> bytes:
    """A validation image as validation.png shows it (scaled to its cell), as PNG bytes."""
    from PIL import ImageOps

    buffer = io.BytesIO()
    ImageOps.contain(image.convert("RGB"), (VALIDATION_CELL, VALIDATION_CELL),
                     Image.Resampling.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()


def from_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")
