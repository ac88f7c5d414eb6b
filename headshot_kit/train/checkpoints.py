"""Checkpoints: which exist, which is the latest, and whether a run may continue one."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, TrainConfig, to_dict

# Settings a checkpoint must share with the run that resumes it: anything else can change
# (e.g. more steps). The optimizer that ran is checked too (its state fits no other).
RESUME_KEYS = ("model", "family", "rank", "alpha", "target_modules", "train_text_encoder",
               "resolution", "prior_preservation")


# Settings a resumed run may change: none of them shapes the weights already trained.
FREE_ON_RESUME = ("steps", "resume", "checkpoint_dir", "checkpoint_every", "checkpoints_keep",
                  "validate_every", "validation_prompts", "validation_seeds", "validation_steps",
                  "max_bad_steps", "force_fit", "device", "class_dir")


def check_resume(folder: Path, meta: dict, cfg: TrainConfig) -> None:
    """Refuse to continue a checkpoint with settings that did not make it, naming only those
    that changed, or with fewer steps than it already has."""
    # Through JSON, as the checkpoint stored them: a tuple and the list it became are equal.
    now = json.loads(json.dumps(to_dict(cfg), default=str))
    changed = [f"{k} {v!r} (now {now[k]!r})" for k, v in meta["config"].items()
               if k in now and k not in FREE_ON_RESUME and v != now[k]]
    if changed:
        raise ConfigError(f"{folder} continues a run trained with other settings: "
                          f"{', '.join(changed)}. A checkpoint goes on only with the settings "
                          "that made it (more steps are fine): set those back, train into a new "
                          "out folder (or checkpoint_dir), or set resume=False to start over.")
    if meta["step"] > cfg.steps:
        raise ConfigError(f"{folder} is already at step {meta['step']}, more than steps="
                          f"{cfg.steps}: set steps to {meta['step']} or more to keep (and "
                          "continue) that run, or train into a new out folder.")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones never carry the final name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("checkpoint-*")
                  if p.is_dir() and (p / "state.pt").is_file() and (p / "meta.json").is_file())


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None
