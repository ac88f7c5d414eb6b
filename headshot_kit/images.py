"""Reading photos and drawing pictures: grids with labelled axes, contact sheets, plots.

Every stage shows its work as an image a person can read at a glance; the helpers live here so
no notebook redefines them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".mpo", ".heic",
                  ".heif", ".gif")


class ImageReadError(ValueError):
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
        # Flatten transparency onto neutral grey: black or white would fake an exposure problem.
        background = Image.new("RGBA", rgba.size, (128, 128, 128, 255))
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
               title: str = "", cell: int = 192, x_name: str = "", y_name: str = "",
               ) -> Image.Image:
    """Images laid out row by row, with column labels on top and row labels on the left.

    Small images (the tiny model's 64 px) are scaled up to `cell` so they can be seen.
    """
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    label_font, title_font = font(max(11, cell // 14)), font(max(13, cell // 11))
    left = (max((len(s) for s in row_labels), default=0) * cell // 24 + 16) if row_labels else 0
    left = min(left, cell * 2)
    top = (cell // 7 + 8 if col_labels else 0) + (cell // 6 if title else 0)
    sheet = Image.new("RGB", (left + cols * cell, top + rows * cell), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 4), title, fill="black", font=title_font)
    col_y = top - cell // 7 - 4
    for c, text in enumerate(col_labels or []):
        draw.text((left + c * cell + 6, col_y), f"{x_name}{text}", fill="black", font=label_font)
    for r, text in enumerate(row_labels or []):
        draw.text((6, top + r * cell + cell // 2 - 8), f"{y_name}{text}", fill="black",
                  font=label_font)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(_fit(image, cell), (left + c * cell, top + r * cell))
    return sheet


def contact_sheet(images: Sequence[Image.Image], captions: Sequence[Sequence[str]], *,
                  colors: Sequence[str] | None = None, cols: int = 4, cell: int = 200,
                  title: str = "") -> Image.Image:
    """Thumbnails with a few caption lines each; `colors` tints each caption (verdicts)."""
    n = max(1, len(images))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    lines = max((len(c) for c in captions), default=0)
    text_h = 16 * lines + 6
    head = 28 if title else 0
    sheet = Image.new("RGB", (cols * cell, head + rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    small = font(12)
    if title:
        draw.text((8, 6), title, fill="black", font=font(16))
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        x, y = c * cell, head + r * (cell + text_h)
        sheet.paste(_fit(image, cell - 8), (x + 4, y + 4))
        color = colors[i] if colors else "black"
        for j, line in enumerate(captions[i]):
            draw.text((x + 6, y + cell + 16 * j), line[: cell // 7], fill=color, font=small)
    return sheet


def plot_loss(metrics, ax=None, title: str = "Training loss"):
    """Loss per step (faint) and its running mean (bold) from a metrics table."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(metrics["step"], metrics["loss"], alpha=0.35, label="loss")
    window = max(1, len(metrics) // 10)
    ax.plot(metrics["step"], metrics["loss"].rolling(window, min_periods=1).mean(), lw=2,
            label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss (MSE)")
    ax.set_title(title)
    ax.legend()
    ax.figure.tight_layout()
    return ax.figure
