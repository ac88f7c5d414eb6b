"""What a training run writes when it finishes (and its best/ when validation chooses one):
`metrics.csv`, the LoRA's files with their `config.json`, `loss.png` and the model card, and
the `TrainResult` that names them."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ..lora import BEST_DIR, chosen_checkpoint, export_kohya, save_lora, write_lora_record
from ..records import METRICS_COLUMNS, write_metrics  # noqa: F401 (METRICS_COLUMNS: re-exported)
from .card import lora_file_metadata, lora_file_name, write_model_card
from .data import dataset_subject
from .selection import choose_best

if TYPE_CHECKING:
    import pandas as pd

    from . import Trainer


@dataclass
class TrainResult:
    out_dir: Path
    lora_path: Path
    history: list[dict]  # one metrics row per step, as metrics.csv holds them
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

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """The history as a table (METRICS_COLUMNS), made when first asked for."""
        import pandas as pd

        return pd.DataFrame(self.history, columns=list(METRICS_COLUMNS))

    def plot(self):
        from ..images import plot_loss

        return plot_loss(self.history, best_step=self.best_step,
                         title=f"Training loss ({self.optimizer})")


def save_metrics(trainer: Trainer) -> Path:
    """metrics.csv: one row per step (METRICS_COLUMNS)."""
    return write_metrics(trainer.history, trainer.out_dir)


def save_lora_folder(trainer: Trainer, folder: Path, **record) -> Path:
    """The LoRA as it stands (diffusers and kohya files) and its config.json, in `folder`."""
    lora_path = save_lora(folder, trainer.cfg.family,
                          {name: getattr(trainer.pipe, name) for name in trainer._lora_modules()})
    token, class_name = dataset_subject(trainer.data_dir)
    name = lora_file_name(trainer.cfg, token, trainer.data_dir,
                          step=record["step"] if record["checkpoint"] == BEST_DIR else None)
    ui = export_kohya(lora_path, trainer.cfg.family, output_name=name, rank=trainer.cfg.rank,
                      alpha=trainer.cfg.lora_alpha, metadata=lora_file_metadata(
                          trainer.cfg, output_name=name, subject=f"{token} {class_name}",
                          n_images=len(trainer.examples), steps=record["step"],
                          optimizer=trainer.optimizer_name, started_at=trainer.started_at,
                          finished_at=time.time()),
                      layers_per_block=trainer.pipe.unet.config.layers_per_block)
    write_lora_record(folder, trainer.cfg, data_dir=str(trainer.data_dir), token=token,
                      class_name=class_name, optimizer_used=trainer.optimizer_name,
                      trainable_parameters=trainer.n_trainable, n_images=len(trainer.examples),
                      data_fingerprint=trainer.data_fingerprint, ui_weights=ui.name, **record)
    return lora_path


def save(trainer: Trainer, seconds: float = 0.0) -> TrainResult:
    """What a finished run leaves in its folder: metrics.csv, the last LoRA (and best/ only
    when a checkpoint was chosen), loss.png and the model card."""
    out = trainer.out_dir
    save_metrics(trainer)
    history = list(trainer.history)
    skipped = sum(bool(r["skipped"]) for r in history)
    kept = {}
    if choose_best(trainer.history) is None:
        # A best/ left by an earlier run in this folder does not belong to these weights.
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    else:
        kept = chosen_checkpoint(out / BEST_DIR)
    lora_path = save_lora_folder(trainer, out, checkpoint="last", step=trainer.step,
                                 skipped_steps=skipped, seconds=round(seconds, 2),
                                 best_step=kept.get("step"),
                                 best_likeness=kept.get("likeness"),
                                 checkpoint_chosen_by=kept.get("chosen_by"))
    result = TrainResult(out, lora_path, history, trainer.optimizer_name, seconds, skipped,
                         best_step=kept.get("step"), best_likeness=kept.get("likeness"),
                         chosen_by=kept.get("chosen_by", ""),
                         timings={k: round(v, 2) for k, v in trainer.timings.items()})
    if any(not math.isnan(r["loss"]) for r in history):
        import matplotlib.pyplot as plt

        fig = result.plot()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
    write_model_card(out, trainer.cfg, result, len(trainer.examples))
    return result
