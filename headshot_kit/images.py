"""Reading photos and drawing pictures: grids with labelled axes, contact sheets, plots.

Every stage shows its work as an image a person can read at a glance; the helpers live here so
no notebook redefines them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .config import DataError

# Neutral grey for padding and flattened transparency: black or white would fake an exposure
# problem, and a model sees a flat grey border as what it is.
GREY = (128, 128, 128)
# The files read as photos (HEIC through pillow-heif, a GIF's first frame); the work folder's
# photos/ counts them too (workspace.list_photos).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".mpo", ".heic",
                  ".heif", ".gif")


class ImageReadError(DataError):
    """A file could not be read as a photo; the message names it and says what to do."""


def load_image(path: str | Path) -> Image.Image:
    """An RGB copy of the photo at `path`, turned upright by its EXIF orientation."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
    except Exception as exc:  # PIL raises many types for damaged files
        raise ImageReadError(f"{path}: could not be read as an image ({exc}). Replace it with "
                             "a JPEG or PNG photo.") from None
    if upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P"
                                                and "transparency" in upright.info):
        rgba = upright.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*GREY, 255))
        upright = Image.alpha_composite(background, rgba)
    return upright.convert("RGB")


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square of `image`, resized to size x size."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize(
        (size, size), Image.Resampling.LANCZOS)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def _fit(image: Image.Image, cell: int) -> Image.Image:
    return ImageOps.pad(image.convert("RGB"), (cell, cell), method=Image.Resampling.LANCZOS,
                        color=(240, 240, 240))


def image_grid(images: Sequence[Image.Image], rows: int, cols: int, *,
               row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               title: str = "", cell: int = 192) -> Image.Image:
    """Images laid out row by row, with column labels on top and row labels on the left.

    Small images (the tiny model's 64 px) are scaled up to `cell` so they can be seen. Every
    text is measured: the title wraps to the sheet's width, a column label to its cell's and a
    row label to the margin's (up to GRID_TEXT_LINES lines, then "..."), so none runs into its
    neighbour or off the sheet.
    """
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    label_font, title_font = font(max(11, cell // 14)), font(max(13, cell // 11))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_texts = list(row_labels or [])
    widest = max((measure.textlength(t, font=label_font) for t in row_texts), default=0)
    left = min(int(widest) + 2 * LABEL_PAD, cell * 2) if row_labels else 0
    width = left + cols * cell
    line_h = _line_height(label_font)
    col_lines = [wrap_text(measure, t, label_font, cell - 2 * LABEL_PAD)
                 for t in col_labels or []]
    col_h = max((len(ls) for ls in col_lines), default=0) * line_h + 8 if col_labels else 0
    title_lines = wrap_text(measure, title, title_font, width - 2 * LABEL_PAD) if title else []
    title_h = len(title_lines) * _line_height(title_font) + 8 if title else 0
    top = title_h + col_h
    sheet = Image.new("RGB", (width, top + rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((LABEL_PAD, 4 + i * _line_height(title_font)), line, fill="black",
                  font=title_font)
    for c, lines in enumerate(col_lines):
        for i, line in enumerate(lines):
            draw.text((left + c * cell + LABEL_PAD, title_h + 2 + i * line_h), line,
                      fill="black", font=label_font)
    for r, text in enumerate(row_texts):
        lines = wrap_text(measure, text, label_font, left - 2 * LABEL_PAD)
        y = top + r * cell + cell // 2 - len(lines) * line_h // 2
        for i, line in enumerate(lines):
            draw.text((LABEL_PAD, y + i * line_h), line, fill="black", font=label_font)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(_fit(image, cell), (left + c * cell, top + r * cell))
    return sheet


# Space between a label and its cell's edge, and the most lines a grid label or title wraps to.
LABEL_PAD = 6
GRID_TEXT_LINES = 3


def _line_height(face: ImageFont.ImageFont) -> int:
    box = face.getbbox("Ag")
    return int(box[3] - box[1]) + 4


def wrap_text(draw: ImageDraw.ImageDraw, text: str, face: ImageFont.ImageFont, width: float,
              max_lines: int = GRID_TEXT_LINES) -> list[str]:
    """`text` in lines no wider than `width` px, broken at spaces (a word too long for a line is
    cut), at most `max_lines`, the last ending in "..." when text is left over."""
    def fits(s: str) -> bool:
        return draw.textlength(s, font=face) <= width

    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if fits(candidate):
            line = candidate
            continue
        if line:
            lines.append(line)
        while not fits(word) and len(word) > 1:  # a word wider than the line: cut it
            cut = max(i for i in range(1, len(word) + 1) if fits(word[:i]) or i == 1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + "..."):
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last.rstrip() + "..."]
    return lines


@dataclass
class Card:
    """One picture of a contact sheet and what is written around it."""

    image: Image.Image | None  # None: a grey "?" (a file that could not be read)
    lines: Sequence[str] = ()  # caption lines under the picture
    line_color: Any = "black"  # e.g. a verdict's colour
    banner: tuple[str, Any] | None = None  # a coloured bar across the card: (text, colour)
    badges: Sequence[tuple[str, Any]] = ()  # rounded labels (text, colour), up to 3 rows
    # Rectangles drawn on the picture, in the picture's own pixels: (box, colour, width).
    boxes: Sequence[tuple[tuple[float, float, float, float], Any, int]] = ()


BADGE_ROWS = 3


def card_sheet(cards: Sequence[Card], *, cols: int = 4, cell: int = 200,
               title: str = "") -> Image.Image:
    """Cards in a grid, each a thumbnail with its boxes, banner, caption lines and badges:
    what the prepare stage's verdict sheet and the evaluate stage's ranked sheet draw."""
    n = max(1, len(cards))
    cols = min(cols, n)
    text, pad = font(13), 6
    banner_h = 22 if any(c.banner for c in cards) else 0
    lines_h = 16 * max((len(c.lines) for c in cards), default=0)
    badges_h = BADGE_ROWS * 20 if any(c.badges for c in cards) else 0
    card_h = cell + banner_h + lines_h + badges_h + pad
    head = 34 if title else 0
    sheet = Image.new("RGB", (cols * cell, head + math.ceil(n / cols) * card_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 8), title, fill="black", font=font(18))
    for i, card in enumerate(cards):
        x, y = (i % cols) * cell, head + (i // cols) * card_h
        _draw_picture(sheet, draw, card, x, y, cell)
        top = y + cell
        if card.banner:
            label, color = card.banner
            draw.rectangle((x + 6, top, x + cell - 6, top + banner_h - 2), fill=color)
            draw.text((x + 10, top + 3), label, fill="white", font=text)
            top += banner_h
        for j, line in enumerate(card.lines):
            draw.text((x + 8, top + 1 + 16 * j), _shorten(line, cell // 7),
                      fill=card.line_color, font=text)
        _draw_badges(draw, card.badges, x, top + lines_h + 2, cell, text)
    return sheet


def _draw_picture(sheet: Image.Image, draw: ImageDraw.ImageDraw, card: Card, x: int, y: int,
                  cell: int) -> None:
    inner = cell - 12
    if card.image is None:
        draw.rectangle((x + 6, y + 6, x + cell - 6, y + cell - 6), fill=(225, 225, 225))
        draw.text((x + cell // 2 - 8, y + cell // 2 - 20), "?", fill="grey", font=font(40))
        return
    image = card.image.convert("RGB")
    k = min(inner / image.width, inner / image.height)
    size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
    ox, oy = x + (cell - size[0]) // 2, y + (cell - size[1]) // 2
    sheet.paste(image.resize(size, Image.Resampling.LANCZOS), (ox, oy))
    for box, color, width in card.boxes:
        draw.rectangle((ox + box[0] * k, oy + box[1] * k, ox + box[2] * k, oy + box[3] * k),
                       outline=color, width=width)


def _draw_badges(draw: ImageDraw.ImageDraw, badges: Sequence[tuple[str, Any]], x: int, y: int,
                 cell: int, text: ImageFont.ImageFont) -> None:
    """Rounded labels left to right, wrapping to a new row, at most BADGE_ROWS rows."""
    bx, by, row = x + 6, y, 0
    for label, color in badges:
        label = _shorten(label, 26)
        width = int(draw.textlength(label, font=text)) + 10
        if bx + width > x + cell - 6 and bx > x + 6:
            row += 1
            bx, by = x + 6, by + 20
        if row >= BADGE_ROWS:
            break
        draw.rounded_rectangle((bx, by, bx + width, by + 17), radius=6, fill=color)
        draw.text((bx + 5, by + 2), label, fill="white", font=text)
        bx += width + 4


def _shorten(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


def plot_loss(history: Sequence[dict], ax=None, title: str = "Training loss",
              best_step: int | None = None):
    """Loss per step (faint) and its running mean (bold) from a run's metrics rows (steps
    whose loss is NaN left out); the validation steps' likeness on a second axis, and
    `best_step` (the checkpoint chosen by it) marked."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(6.5, 3.4))
    rows = [r for r in history if not math.isnan(r["loss"])]
    steps = [r["step"] for r in rows]
    losses = np.array([r["loss"] for r in rows], dtype=float)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    window = max(1, len(rows) // 10)
    ax.plot(steps, running_mean(losses, window), lw=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    scored = [r for r in rows if r.get("likeness") is not None
              and not math.isnan(r["likeness"])]
    if scored:
        right = ax.twinx()
        right.plot([r["step"] for r in scored], [r["likeness"] for r in scored], "o-",
                   color="#1b7f3a", label="likeness of the validation images")
        right.set_ylim(-0.05, 1.05)
        right.set_ylabel("likeness (median)")
        if best_step is not None:
            right.axvline(best_step, ls="--", color="#1b7f3a", lw=1,
                          label=f"kept in best/: step {best_step}")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.figure.tight_layout()
    return ax.figure


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)
