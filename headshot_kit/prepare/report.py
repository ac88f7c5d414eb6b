"""What the prepare stage tells the user: the report table, the advice and the contact sheet.

Every input file gets one report row, used or not, with a pass/warn/fail per check and the
measurements behind them; the advice on top names the photos to replace and why; the contact
sheet shows every photo with its verdict.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path, PurePosixPath

import pandas as pd
from PIL import Image

from .. import images
from ..config import PrepareConfig
from ..images import Card
from .checks import THUMB_SIDE, Photo

# The report's check columns, in the order a photo goes through them. Each holds a verdict
# (pass, warn, fail); the measurements behind them (sharpness, brightness, contrast, ...) have
# columns of their own, named as the evaluate stage names them.
CHECKS = ("read", "face", "face_size", "framing", "focus", "exposure", "haze", "pose", "eyes",
          "duplicate", "identity")
REPORT_COLUMNS = (
    "file", "status", "reason", "output", *CHECKS, "chosen_face", "faces", "face_box", "face_px",
    "photo_size", "decoded_size", "format", "upscale", "framing_scale", "padding_pct",
    "sharpness", "brightness", "highlights_clipped", "contrast", "yaw_deg", "roll_deg",
    "eye_ratio", "duplicate_of", "identity_distance", "notes")

VERDICT_COLORS = {"pass": (46, 125, 50), "warn": (217, 119, 6), "fail": (198, 40, 40)}

VERDICT_CSS = {"pass": "background-color:#e8f5e9", "warn": "background-color:#fff3cd",
               "fail": "background-color:#f8d7da"}


def name_outputs(photos: list[Photo]) -> None:
    """images/<name>.png from each used photo's own name: safe characters, unique even when
    two folders hold the same name (and on case-insensitive disks)."""
    taken: set[str] = set()
    for photo in photos:
        if not photo.used:
            continue
        stem = unicodedata.normalize("NFC", PurePosixPath(photo.file).stem)
        slug = re.sub(r"[^\w-]+", "_", stem).strip("_")[:80] or "photo"
        name, k = slug, 2
        while name.casefold() in taken:
            name, k = f"{slug}_{k}", k + 1
        taken.add(name.casefold())
        photo.output = f"images/{name}.png"


def _reason(photo: Photo) -> str:
    if not photo.used:
        return " ".join(c.sentence for c in photo.verdicts("fail"))
    warned = photo.verdicts("warn")
    if warned:
        return "Used, but: " + " ".join(c.sentence for c in warned)
    return "Used: passed every check."


def make_report(photos: list[Photo]) -> pd.DataFrame:
    rows = []
    for p in photos:
        row = {"file": p.file, "status": "used" if p.used else "skipped", "reason": _reason(p),
               "output": p.output, "notes": " ".join(p.notes)}
        row.update({name: p.checks[name].verdict if name in p.checks else "" for name in CHECKS})
        row.update(p.values)
        rows.append(row)
    report = pd.DataFrame(rows, columns=list(REPORT_COLUMNS))
    return report.astype({"faces": "Int64", "face_px": "Int64"})


def _listing(photos: list[Photo], verdict: str) -> str:
    return ", ".join(f"{p.file} ({', '.join(c.label for c in p.verdicts(verdict))})"
                     for p in photos)


def advise(photos: list[Photo], cfg: PrepareConfig, out_dir: Path) -> list[str]:
    used = [p for p in photos if p.used]
    # Notes and checksums beside the photos (a README, SHA256SUMS) are not photos to replace.
    others = [p for p in photos if _other_file(p)]
    skipped = [p for p in photos if not p.used and not _other_file(p)]
    warned = [p for p in used if p.verdicts("warn")]
    n_photos = len(photos) - len(others)
    advice = [f"{len(used)} of {n_photos} photos are ready for training in {out_dir}."]
    if others:
        advice.append(f"Left out {len(others)} file{'s' * (len(others) > 1)} that "
                      f"{'are' if len(others) > 1 else 'is'} not a photo: "
                      f"{', '.join(p.file for p in others)}.")
    if skipped:
        advice.append(f"Replace {len(skipped)} photo{'s' * (len(skipped) > 1)}: "
                      f"{_listing(skipped, 'fail')}.")
    if warned:
        advice.append(f"Check {len(warned)} photo{'s' * (len(warned) > 1)} used with warnings: "
                      f"{_listing(warned, 'warn')}.")
    if len(used) < cfg.min_photos:
        advice.append(f"Only {len(used)} usable photo{'s' * (len(used) != 1)}: add at least "
                      f"{cfg.min_photos - len(used)} more; 5-20 varied photos work best.")
    elif len(used) > cfg.max_photos:
        advice.append(f"{len(used)} usable photos: more than {cfg.max_photos} add training time "
                      "without adding likeness; keep the 20 best.")
    if used and all(abs(p.yaw) < cfg.frontal_yaw_deg for p in used):
        advice.append(f"All {len(used)} usable photos face the camera straight on: add 2-3 with "
                      "the head turned a little left and right, so the model learns your face "
                      "from the side.")
    return advice


def _other_file(photo: Photo) -> bool:
    read = photo.checks.get("read")
    return read is not None and read.label == "not a photo"


def verdict_sheet(photos: list[Photo], title: str, cols: int = 5) -> Image.Image:
    """Every input as a thumbnail (face box white, crop square in the verdict's colour), a
    status bar, its name and one badge per flagged check."""
    cards = []
    for p in photos:
        worst = "fail" if not p.used else "warn" if p.verdicts("warn") else "pass"
        color = VERDICT_COLORS[worst]
        boxes = [(box, "white" if j == 0 else color, 2 + j) for j, box in enumerate(p.thumb_boxes)]
        flagged = [(c.label, VERDICT_COLORS[c.verdict]) for c in p.checks.values()
                   if c.verdict != "pass" and c.label]
        cards.append(Card(p.thumb, lines=[p.file], boxes=boxes,
                          banner=({"pass": "USED", "warn": "USED - CHECK",
                                   "fail": "SKIPPED"}[worst], color),
                          badges=flagged or [("all checks pass", VERDICT_COLORS["pass"])]))
    return images.card_sheet(cards, cols=cols, cell=THUMB_SIDE + 12, title=title)
