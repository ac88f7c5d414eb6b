"""The prepare stage: a handful of selfies in, a clean captioned headshot dataset out.

`prepare_photos(photos, out_dir)` reads a folder, a list of files or a .zip and writes:

    out_dir/images/<name>.png   square head-and-shoulders crops at cfg.resolution, no metadata
    out_dir/masks/<name>.png    a soft face-and-hair mask of each crop ('L', 255 on the face),
                                pixel for pixel; the train stage weights its loss by it
    out_dir/metadata.jsonl      Hugging Face imagefolder captions, one line per used photo,
                                with its mask
    out_dir/report.csv          one row per input file, used or not: why, and every check
    out_dir/contact_sheet.png   every photo with its verdict badges
    out_dir/config.json         the settings that made it

Every photo goes through the same checks (face found, size, framing, sharpness, exposure,
contrast, pose, covered eyes), then the set is checked as a whole (near-duplicates, someone
else's face). A photo with a failed check is skipped; one with warnings is used and listed in
the advice. A file that cannot be read gets a row saying why, and the batch goes on. Originals
are only ever read.

The parts: `intake` (folders, zips, decoding: the untrusted input), `crop` (framing), `checks`
(each photo, then the set) and `report` (the table, the advice, the contact sheet).
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd
from tqdm.auto import tqdm

from ..config import ConfigError, DataError, PrepareConfig, on_latent_grid, save_config
from ..storage import atomic_dir
from .checks import check_duplicates, check_identity, examine_safely
from .intake import gather
from .report import (CHECKS, REPORT_COLUMNS, VERDICT_CSS, _other_file, advise, make_report,
                     name_outputs, verdict_sheet)

__all__ = ["CHECKS", "REPORT_COLUMNS", "PrepareResult", "prepare_photos"]

# zlib level 3 writes PNGs twice as fast as the default 6, for files about 6% larger.
PNG_LEVEL = 3


@dataclass
class PrepareResult:
    """What `prepare_photos` made; in a notebook it shows the advice and the report."""

    out_dir: Path
    report: pd.DataFrame = field(repr=False)
    advice: list[str]
    n_used: int

    @property
    def contact_sheet_path(self) -> Path:
        """The verdict sheet: every input as a thumbnail with its verdict."""
        return self.out_dir / "contact_sheet.png"

    def _repr_html_(self) -> str:
        advice = "".join(f"<li>{html.escape(s)}</li>" for s in self.advice)
        table = self.report[["file", "status", "reason", *CHECKS]].fillna("")
        styled = (table.style.hide(axis="index")
                  .map(lambda v: VERDICT_CSS.get(v, ""), subset=list(CHECKS))
                  .map(lambda v: "font-weight:bold", subset=["status"])
                  # The reason is what people read: room for a sentence, not a word per line.
                  .set_properties(subset=["reason"], **{"min-width": "28em"}))
        # A cell's width holds the table; anything wider scrolls instead of being cut off.
        return (f"<h4>Prepared {self.n_used} of {len(self.report)} photos into "
                f"{html.escape(str(self.out_dir))}</h4><ul>{advice}</ul>"
                f'<div style="overflow-x:auto">{styled.to_html()}</div>')


def prepare_photos(photos: str | Path | Iterable[str | Path], out_dir: str | Path,
                   cfg: PrepareConfig | None = None) -> PrepareResult:
    """Check `photos` (a folder, a list of files or a .zip) and write a dataset to `out_dir`.

    Every input file gets a row in the report, whether it was used or not. An existing dataset
    in `out_dir` is replaced only once the new one is complete.
    """
    cfg = cfg or PrepareConfig()
    _validate(cfg)
    out_dir = Path(out_dir)
    sources = [Path(photos)] if isinstance(photos, (str, os.PathLike)) else [Path(p) for p in
                                                                             photos]
    _check_out_dir(out_dir, sources)
    with tempfile.TemporaryDirectory(prefix="headshot-prepare-") as scratch:
        inputs = gather(photos, sources, Path(scratch), cfg, skip=out_dir)
        if not inputs:  # nothing to report on: an empty dataset would only fail in training
            raise DataError(f"{', '.join(map(str, sources))}: no photos there. Put 5-20 photos "
                            "of the person in it (JPEG, PNG, HEIC, ... or a .zip), then run "
                            "this again.")
        found = []
        bar = tqdm(inputs, desc="prepare", unit="photo")
        for order, item in enumerate(bar):
            bar.set_postfix_str(item.file[-32:], refresh=False)
            found.append(examine_safely(item, order, cfg))
    check_duplicates(found, cfg)
    check_identity(found, cfg)
    name_outputs(found)
    report = make_report(found)
    n_used = sum(p.used for p in found)
    advice = advise(found, cfg, out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        lines = []
        for photo in found:
            if photo.used:
                mask = f"masks/{PurePosixPath(photo.output).name}"
                photo.crop.save(tmp / photo.output, format="PNG", compress_level=PNG_LEVEL)
                photo.mask.save(tmp / mask, format="PNG", compress_level=PNG_LEVEL)
                lines.append(json.dumps({"file_name": photo.output, "text": cfg.caption(),
                                         "mask": mask}, ensure_ascii=False))
        (tmp / "metadata.jsonl").write_text("".join(f"{line}\n" for line in lines),
                                            encoding="utf-8")
        report.to_csv(tmp / "report.csv", index=False)
        n_photos = sum(not _other_file(p) for p in found)  # notes beside them are no photos
        verdict_sheet(found, f"prepare: {n_used} of {n_photos} photos used").save(
            tmp / "contact_sheet.png", compress_level=PNG_LEVEL)
        save_config(cfg, tmp / "config.json", n_inputs=len(found), n_used=n_used)
    return PrepareResult(out_dir=out_dir, report=report, advice=advice, n_used=n_used)


def _validate(cfg: PrepareConfig) -> None:
    if cfg.resolution < 64 or not on_latent_grid(cfg.resolution):
        raise ConfigError(f"resolution is {cfg.resolution}; use a multiple of 8 of at least 64 "
                          "(512 for SD 1.5, 1024 for SDXL).")
    if not 1.0 <= cfg.min_crop_scale <= cfg.crop_scale:
        raise ConfigError(f"crop_scale {cfg.crop_scale} and min_crop_scale {cfg.min_crop_scale}"
                          " must satisfy 1 <= min_crop_scale <= crop_scale.")
    if not cfg.token.strip():
        raise ConfigError("token is empty; give a rare word such as 'ohwx'.")


def _check_out_dir(out_dir: Path, sources: list[Path]) -> None:
    """Refuse an out_dir whose replacement would destroy photos or unrelated files."""
    out = out_dir.resolve()
    for source in sources:
        if source.resolve() == out or out in source.resolve().parents:
            raise ConfigError(f"out_dir {out_dir} holds the input {source}: preparing would "
                              "replace your photos. Choose another out_dir.")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ConfigError(f"out_dir {out_dir} is a file; give a folder name.")
        is_dataset = (out_dir / "metadata.jsonl").exists() or (out_dir / "report.csv").exists()
        if any(out_dir.iterdir()) and not is_dataset:
            raise ConfigError(f"out_dir {out_dir} already holds files that are not a prepared "
                              "dataset, and would be replaced; choose an empty or new folder.")
