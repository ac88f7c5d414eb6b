"""Consistency and diversity among a run's generated faces.

Consistency: how alike (by the identity embedder) the generated faces are to each other, and
which one is the odd one out. Diversity: how different their face crops look (1 - SSIM) and how
much the head turns vary, so a pack of copies of one face does not pass as a good pack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .. import faces, quality

CROP_SIDE = 64  # face crops for the diversity measure: enough for structure, cheap to compare


def ssim_matrix(crops: np.ndarray) -> np.ndarray:
    """Mean SSIM (Wang et al. 2004) between every pair of grey crops (n x s x s), with
    scikit-image's 7x7 uniform windows."""
    from skimage.metrics import structural_similarity

    n = len(crops)
    out = np.ones((n, n))
    for i, j in zip(*np.triu_indices(n, 1)):
        out[i, j] = out[j, i] = structural_similarity(crops[i], crops[j], win_size=7,
                                                      data_range=255.0)
    return out


def yaw(face: faces.Face) -> float:
    """Head turn in degrees (faces.head_pose), whichever network found the face."""
    return faces.head_pose(face.landmarks)[0]


def group_faces(idx: Sequence[int], names: Sequence[str], similarity: np.ndarray,
                 ssim: np.ndarray, yaws: np.ndarray) -> dict[str, Any]:
    """Consistency (identity likeness between generated faces), the odd one out, and
    diversity (structural dissimilarity of face crops, spread of head turn) of one group."""
    idx = np.asarray(idx, dtype=int)
    stats: dict[str, Any] = {"consistency_mean": np.nan, "consistency_min": np.nan,
                             "odd_one_out": "", "diversity_ssim": np.nan,
                             "pose_spread": float(np.nanstd(yaws[idx])) if len(idx) else np.nan}
    if len(idx) < 2:
        return stats
    sim = similarity[np.ix_(idx, idx)]
    off = ~np.eye(len(idx), dtype=bool)
    stats["consistency_mean"] = float(sim[off].mean())
    stats["consistency_min"] = float(sim[off].min())
    stats["diversity_ssim"] = float((1 - ssim[np.ix_(idx, idx)])[off].mean())
    if len(idx) >= 3:  # with two faces neither is odder than the other
        stats["odd_one_out"] = names[idx[int(np.argmin(_mean_to_others(sim)))]]
    return stats


def consistency_per_image(n_images: int, face_rows: list[int], similarity: np.ndarray
                           ) -> np.ndarray:
    """Each face's mean likeness to the run's other faces (NaN without a face or a second one).

    Their mean is the run's consistency_mean, so a per-image column lets the sweep's intervals
    (headshot_kit.stats) resample images for consistency as they do for likeness."""
    out = np.full(n_images, np.nan)
    if len(face_rows) >= 2:
        out[face_rows] = _mean_to_others(similarity)
    return out


def _mean_to_others(sim: np.ndarray) -> np.ndarray:
    """Row means of a square similarity matrix without its diagonal (each face with itself)."""
    return (sim * ~np.eye(len(sim), dtype=bool)).sum(axis=1) / (len(sim) - 1)


def face_region(image: Image.Image, face: faces.Face) -> Image.Image | None:
    """The face box cut to the image; None when less than 8 px of it is inside."""
    box = faces.clip_box(face.box, image.size)
    if box[2] - box[0] < 8 or box[3] - box[1] < 8:
        return None
    return image.crop(box)


def crop_grey(image: Image.Image, face: faces.Face) -> np.ndarray:
    region = face_region(image, face)
    region = region if region is not None else image
    return quality.grey(region.resize((CROP_SIDE, CROP_SIDE), Image.Resampling.BILINEAR))
