"""The training objective's per-image error: one definition with two readers, the train stage's
loss and the fit check's measured step (which runs it on meta tensors to count its memory).

torch is imported inside, so the fit check can be imported before torch loads."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def per_image_mse(pred: torch.Tensor, target: torch.Tensor,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each image's mean squared error, (N,); with `weights` (N, 1, h, w, shared by the
    channels) the weighted mean sum(w * se) / sum(w), normalised so that uniform weights give
    the plain mean and a smaller background weight does not shrink the loss, only shift it
    towards the face (OneTrainer's normalize_masked_area_loss)."""
    import torch.nn.functional as F

    se = F.mse_loss(pred.float(), target.float(), reduction="none")
    if weights is None:
        return se.mean(dim=(1, 2, 3))
    w = weights.float().expand_as(se)
    # An image whose weights are all 0 (background_weight 0 and no face) has nothing to learn.
    return (w * se).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1e-12)
