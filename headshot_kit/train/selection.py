"""Choosing the checkpoint by likeness: the validation images are scored against the prepared
photos, and the LoRA of the most alike checkpoint is kept beside the last one.

A face LoRA fails in two ways: too little training (weak likeness) and too much (the outputs
copy the training photos, and the face drifts). The loss says neither, so each validation
render is scored with the evaluate stage's face embedder (EasyPhoto chooses its checkpoint by
face similarity the same way). The rule, stated once here and written into the model card:

    a step's score is the median likeness of its validation images, an image without a face
    counting as 0; the best step has the highest score, ties going to the later step; a step
    where no validation image shows a face is never chosen.

Its LoRA goes to `<out>/best/` (a LoRA folder of its own: weights, UI file, config.json),
which generate uses by default (`GenerateConfig.lora_checkpoint`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..config import EvaluateConfig, TrainConfig

RULE = ("the median likeness of a step's validation images (an image without a face counts "
        "as 0), highest wins, ties to the later step; steps without a face are never chosen")


class LikenessJudge:
    """Scores validation images for likeness to the reference photos with one embedder."""

    def __init__(self, cfg: TrainConfig, references: Sequence[Path]) -> None:
        from ..evaluate import get_embedder, reference_vectors

        self.embedder = get_embedder(EvaluateConfig(embedder=cfg.checkpoint_embedder,
                                                    clip_model="", device=cfg.device))
        self.references, self.skipped = reference_vectors(self.embedder, list(references))

    @property
    def name(self) -> str:
        return self.embedder.name

    def likeness(self, images: Sequence[Image.Image]) -> list[float]:
        """Each image's likeness (NaN when no face is found in it)."""
        from ..evaluate import likeness

        scores = []
        for image in images:
            found = self.embedder.embed(image)
            scores.append(likeness(self.embedder, found[0][1] if found else None,
                                   self.references)["likeness"])
        return scores


def step_score(likenesses: Sequence[float]) -> float:
    """A validation step's score by the rule: the median, faceless images counting 0; NaN when
    no image shows a face (such a step is never chosen)."""
    values = np.asarray(likenesses, dtype=float)
    if not len(values) or np.isnan(values).all():
        return math.nan
    return float(np.median(np.nan_to_num(values, nan=0.0)))


def choose_best(history: Sequence[dict]) -> dict | None:
    """The metrics row of the best validation step by the rule (None when none qualifies)."""
    scored = [r for r in history if not math.isnan(r.get("likeness", math.nan))]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["likeness"], r["step"]))
