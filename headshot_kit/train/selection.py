"""Choosing the checkpoint by likeness: the validation images are scored against the prepared
photos, and the LoRA of the most alike checkpoint is kept beside the last one.

A face LoRA fails in two ways: too little training (weak likeness) and too much (the outputs
copy the training photos, and the face drifts). The loss says neither, so each validation
render is scored with the evaluate stage's face embedder (EasyPhoto chooses its checkpoint by
face similarity the same way) and placed against the person's own band (evaluate.band): a
render far above it, close to one training photo, copies that photo. The rule, stated once
here and written into the model card:

    a step's score is the median likeness of its validation images, an image without a face
    counting as 0; the best step has the highest score, ties going to the later step; a step
    where no validation image shows a face is never chosen; a step with a validation image
    that copies a training photo is passed over while a step without one qualifies.

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
        "as 0), highest wins, ties to the later step; steps without a face are never chosen; "
        "steps whose images copy a training photo only when no other step qualifies")


class LikenessJudge:
    """Scores validation images for likeness to the reference photos with one embedder."""

    def __init__(self, cfg: TrainConfig, references: Sequence[Path]) -> None:
        from ..evaluate import get_embedder, reference_vectors
        from ..evaluate.band import reference_band

        self.embedder = get_embedder(EvaluateConfig(embedder=cfg.checkpoint_embedder,
                                                    clip_model="", device=cfg.device))
        self.references, self.skipped = reference_vectors(self.embedder, list(references))
        self.band = reference_band(self.embedder, self.references,
                                   [Path(p).name for p in references
                                    if Path(p).name not in self.skipped])
        # How many of the last judged images copy a training photo (see `judge`).
        self.copies = 0

    @property
    def name(self) -> str:
        return self.embedder.name

    def likeness(self, images: Sequence[Image.Image]) -> list[float]:
        """Each image's likeness (NaN when no face is found in it); `copies` counts those
        that copy a training photo."""
        from ..evaluate import likeness

        scores, self.copies = [], 0
        for image in images:
            found = self.embedder.embed(image)
            vector = found[0][1] if found else None
            scores.append(likeness(self.embedder, vector, self.references)["likeness"])
            if vector is not None:
                place = self.band.place(self.embedder.similarity(vector, self.references)[0])
                self.copies += place["band"] == "copy"
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
    # Over-fitting shows as copies of the training photos: any step without one first.
    scored = [r for r in scored if not r.get("copies")] or scored
    return max(scored, key=lambda r: (r["likeness"], r["step"]))
