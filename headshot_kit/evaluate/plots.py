"""The evaluate stage's pictures: likeness per style, likeness against technical quality,
the consistency histogram and the contact sheet ranked best first."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..images import Card, card_sheet
from ..quality import Metric
from ..storage import atomic_path
from .embedders import FaceEmbedder

SAME_COLOR, OTHER_COLOR, NO_FACE_COLOR = "#1b7f3a", "#c0392b", "#7f7f7f"
# Every embedder's same-person distance threshold maps onto this likeness (to_similarity).
SAME_PERSON_LIKENESS = 0.5


def _threshold_label(embedder: FaceEmbedder) -> str:
    return (f"same person: likeness above {SAME_PERSON_LIKENESS:g} ({embedder.name} "
            f"distance below {embedder.threshold:g})")


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, pil_kwargs={"compress_level": 1})
    return path


def _new_figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    # A bare Figure, not pyplot: saving 4 plots per run must not pile up open windows.
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_likeness_by_style(scores: pd.DataFrame, embedder: FaceEmbedder):
    fig, (ax,) = _new_figure(6.5, 3.6)
    groups = (list(scores.groupby("style", sort=False)) if "style" in scores.columns
              else [("all images", scores)])
    rng = np.random.default_rng(0)  # fixed jitter: the same run draws the same picture
    for x, (_, part) in enumerate(groups):
        found = part[part["face_found"]]
        jitter = rng.uniform(-0.15, 0.15, len(found))
        colors = [SAME_COLOR if s else OTHER_COLOR for s in found["same_person"]]
        ax.scatter(x + jitter, found["likeness"], c=colors, s=22, zorder=3)
        if len(found):
            ax.hlines(found["likeness"].median(), x - 0.3, x + 0.3, color="black", lw=2)
        missing = len(part) - len(found)
        if missing:
            ax.scatter([x] * missing, [0] * missing, marker="x", c=NO_FACE_COLOR, s=30)
    ax.axhline(SAME_PERSON_LIKENESS, ls="--", c="grey", lw=1, label=_threshold_label(embedder))
    ax.set_xticks(range(len(groups)),
                  [f"{style}\n{int(p['same_person'].sum())}/{len(p)}" for style, p in groups])
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel(f"likeness to you ({embedder.name})")
    ax.set_xlabel("style (look like you / images; x at 0 = no face)")
    ax.set_title("Likeness per style (bar: median)")
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_likeness_vs_quality(scores: pd.DataFrame, metrics: Sequence[Metric]):
    shown = [m for m in metrics if m.name in scores.columns]
    found = scores[scores["face_found"]]
    if found.empty:  # nothing to plot: one sentence, not a row of empty panels
        fig, (ax,) = _new_figure(6.0, 1.6)
        ax.text(0.5, 0.5, f"No face found in any of the {len(scores)} images: no likeness to "
                "plot against quality.", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    fig, axes = _new_figure(3.0 * len(shown), 3.2, ncols=len(shown))
    colors = [SAME_COLOR if s else OTHER_COLOR for s in found["same_person"]]
    for ax, metric in zip(axes, shown):
        ax.scatter(found[metric.name], found["likeness"], c=colors, s=18)
        ax.axhline(SAME_PERSON_LIKENESS, ls="--", c="grey", lw=1)
        ax.set_xlabel(metric.name)
        ax.set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("likeness to you")
    fig.suptitle("Likeness vs technical quality of the face (images without a face: "
                 f"{len(scores) - len(found)}, not shown)")
    return fig


def plot_consistency(pairs: np.ndarray, embedder: FaceEmbedder):
    fig, (ax,) = _new_figure(5.5, 3.2)
    if len(pairs):
        ax.hist(pairs, bins=np.linspace(0, 1, 21), color="#4c72b0")
    else:
        ax.text(0.5, 0.5, "fewer than two faces: no pairs to compare", ha="center",
                transform=ax.transAxes)
    ax.axvline(SAME_PERSON_LIKENESS, ls="--", c="grey", lw=1, label=_threshold_label(embedder))
    ax.set_xlabel(f"likeness between two generated faces ({embedder.name})")
    ax.set_ylabel("pairs")
    ax.set_title("Consistency: do the headshots show one person?")
    ax.legend(fontsize=8)
    return fig


def band_label(row) -> str:
    """A few words on where a face falls against the person's own band (evaluate.band)."""
    place = str(row.get("band", "") or "")
    if place == "copy":
        return f"copy of {row['nearest_photo']}?"
    return {"below": "below your band", "inside": "in your band"}.get(place, "")


def save_contact_sheet(scores: pd.DataFrame, thumbs: list[Image.Image], path: Path) -> Path:
    # Best first: the top of the sheet is what a user would keep (FaceChain and EasyPhoto rank
    # their outputs the same way).
    order = scores.sort_values("likeness", ascending=False, na_position="last").index
    cards = []
    for i in order:
        row = scores.loc[i]
        if row["face_found"]:
            verdict = "looks like you" if row["same_person"] else "someone else"
            line = f"likeness {row['likeness']:.2f} {verdict}"
            color = SAME_COLOR if row["same_person"] else OTHER_COLOR
            place = band_label(row)
            if place:
                line += f", {place}"
                color = OTHER_COLOR if row.get("band") == "copy" else color
        else:
            line, color = "no face found", NO_FACE_COLOR
        technical = f"sharpness {row['sharpness']:.3f}"
        if "brisque_technical" in row and not pd.isna(row["brisque_technical"]):
            technical += f"  brisque {row['brisque_technical']:.0f}"
        cards.append(Card(thumbs[i], lines=[Path(str(row["image"])).name, line, technical],
                          line_color=color))
    sheet = card_sheet(cards, cols=5, title=f"{int(scores['same_person'].sum())} of "
                                            f"{len(scores)} look like you, best first")
    with atomic_path(path) as tmp:
        # Fast compression: the default level takes seconds on a 40-image sheet.
        sheet.save(tmp, format="PNG", compress_level=1)
    return path
