"""The user's own band: how alike real photos of this person are to each other.

Real photos of one person are less alike than one might think: pairs of real photos of one
person reach a median ArcFace cosine of only about 0.46 (WithAnyone, ICLR 2026). So a headshot
is placed against the person's own photos instead of against a fixed bar. Each reference
photo's likeness to its nearest other reference gives the band, from the lowest to the highest
of these; a headshot's likeness to its nearest reference is then

- "below": under the band by more than BAND_SLACK: it looks less like you than your own
  photos look like each other (weak likeness);
- "inside": like a photo of you (up to COPY_MARGIN above the band, since a generated face may
  sit a little closer to one photo than the photos sit to each other);
- "copy": more than COPY_MARGIN above the band, or near-identical (NEAR_IDENTICAL) to one
  reference photo: the LoRA reproduces that training photo (over-fitting), which is not
  likeness. The photo is named.

All values are the embedder's 0-1 likeness (its same-person threshold at 0.5), so the margins
mean the same for every network: 0.1 likeness is 0.12 in dlib's Euclidean distance and 0.13 in
SFace's cosine. On the sample photos, distinct photos of Obama sit 0.71-0.73 (dlib) and
0.80-0.83 (SFace) from their nearest other photo, the same photo saved again 0.99-1.0, Biden
0.28-0.43: the margins keep the first inside, the second a copy and the third below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A handful of photos gives few pairs, so the band's low end is an estimate: a real photo of
# the person may land a little under it.
BAND_SLACK = 0.05
# How far above the band's top a face must be to be a copy of the nearest photo.
COPY_MARGIN = 0.1
# Near-identical to one photo is a copy whatever the band (photos of one shoot make a high band).
NEAR_IDENTICAL = 0.95
PLACES = ("below", "inside", "copy")


@dataclass
class Band:
    """The range of likeness that real photos of the person reach to each other."""

    low: float
    high: float
    names: list[str]  # the reference photos, in the order of the embedder's vectors
    nearest: np.ndarray  # each reference's likeness to its nearest other reference

    def __str__(self) -> str:
        if np.isnan(self.low):
            return "no band (it needs two reference photos with a face)"
        return f"{self.low:.2f}-{self.high:.2f} over {len(self.names)} photos"

    def place(self, likeness_to_each: np.ndarray) -> dict[str, object]:
        """Where one face falls, from its likeness to each reference photo: `band`
        (below/inside/copy, "" without a band), `nearest_photo` and `likeness_nearest`."""
        values = np.asarray(likeness_to_each, dtype=float)
        nearest = int(np.argmax(values))
        top = float(values[nearest])
        if np.isnan(self.low):
            place = "copy" if top >= NEAR_IDENTICAL else ""
        elif top >= min(self.high + COPY_MARGIN, NEAR_IDENTICAL):
            place = "copy"
        elif top < self.low - BAND_SLACK:
            place = "below"
        else:
            place = "inside"
        return {"band": place, "nearest_photo": self.names[nearest], "likeness_nearest": top}


def reference_band(embedder, references: np.ndarray, names: Sequence[str]) -> Band:
    """The band of `references` (n x d vectors of the photos `names`) with `embedder`."""
    if len(references) < 2:
        return Band(np.nan, np.nan, list(names), np.full(len(references), np.nan))
    similar = np.array(embedder.similarity(references, references), dtype=float)
    np.fill_diagonal(similar, -np.inf)
    nearest = similar.max(axis=1)
    return Band(float(nearest.min()), float(nearest.max()), list(names), nearest)


def band_counts(places: Sequence[str]) -> dict[str, int]:
    return {place: sum(p == place for p in places) for place in PLACES}


class LikenessScorer:
    """One image at a time: its likeness to the person's photos and its place against their
    band, with the network that did not choose the LoRA's checkpoint (`avoid`, its name) where
    another loads. What the gallery and the prompt studio show under each image."""

    def __init__(self, references, cfg=None, avoid: str | None = None) -> None:
        from ..config import EvaluateConfig
        from .embedders import _reference_files, get_embedder, reference_vectors

        self.embedder = get_embedder(cfg or EvaluateConfig(clip_model=""), avoid=avoid)
        paths = _reference_files(references)
        self.references, skipped = reference_vectors(self.embedder, paths)
        self.band = reference_band(self.embedder, self.references,
                                   [p.name for p in paths if p.name not in skipped])

    def score(self, image) -> dict[str, object]:
        """likeness (0-1, NaN without a face), band, nearest_photo, likeness_nearest."""
        from .embedders import likeness

        found = self.embedder.embed(image)
        if not found:
            return {"likeness": np.nan, "band": "", "nearest_photo": "",
                    "likeness_nearest": np.nan}
        vector = found[0][1]
        return {"likeness": likeness(self.embedder, vector, self.references)["likeness"],
                **self.band.place(self.embedder.similarity(vector, self.references)[0])}

    def label(self, image) -> str:
        """A few words for under a thumbnail: "likeness 0.81, in your band"."""
        from .plots import band_label

        row = self.score(image)
        if np.isnan(row["likeness"]):
            return "no face found"
        place = band_label(row)
        return f"likeness {row['likeness']:.2f}" + (f", {place}" if place else "")
