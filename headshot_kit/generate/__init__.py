"""The generate stage: a trained LoRA -> a pack of professional headshots.

`generate_pack` renders every chosen style with every seed and writes a results folder:

    images/<style>_seed<seed>.png   each PNG carries its settings in a "parameters" text chunk,
                                    in the AUTOMATIC1111 format most image tools read
    manifest.csv                    one row per image (MANIFEST_COLUMNS), with a `starred` column
    grid.png                        rows = styles, columns = seeds, labelled
    config.json                     the resolved GenerateConfig

Every image is a pure function of its settings (a `Shot`): the noise comes from a CPU
`torch.Generator` seeded for that image alone, so `regenerate` gives the same picture back from
a manifest row. With `face_detail` on, each image gets a second pass over its faces
(facedetail.py); its strength and padding are part of the Shot, and the manifest's
`face_detail_note` says what it did ("1 face redrawn", "no face found: image as rendered").
Re-run into the same folder, unchanged images keep their stars, and the user's favourites/ and
best/ stay.

The parts: `styles` (the prompt library), `shots` (one image: its settings, the sampler, the
LoRA, rendering, the PNG's parameters) and `compare` (X/Y grids over any two settings).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from PIL import Image

from ..config import GenerateConfig, save_config
from ..facedetail import pass_steps
from ..families import get_family
from ..images import image_grid
from ..lora import chosen_checkpoint, lora_weights
from ..storage import atomic_dir, atomic_path, copy_ranked, safetensors_digest
from .compare import (AXES, ComparePlan, base_vs_lora_grid, compare_grid, default_axis_values,
                      parse_axis_values, plan_compare, render_plan)
from .shots import (SAMPLERS, Shot, cell_text, check_generate, check_lora, describe_shot,
                    detail_shot, first_render, load_generate_pipeline, make_scheduler,
                    make_shot, pick_batch_size, read_parameters, render, render_batch, save_png,
                    shot_from_row, use_lora, with_lora_subject)
from .styles import Style, StyleError, load_styles

__all__ = ["AXES", "MANIFEST_COLUMNS", "SAMPLERS", "ComparePlan", "GenerateResult", "Shot", "Style",
           "StyleError", "base_vs_lora_grid", "check_generate", "check_lora", "compare_grid",
           "default_axis_values", "describe_shot", "detail_shot", "export_starred", "first_render",
           "generate_pack", "load_generate_pipeline", "load_manifest", "load_styles",
           "make_scheduler", "make_shot", "parse_axis_values", "pick_batch_size", "plan_compare",
           "read_parameters", "regenerate", "render", "render_batch", "render_plan", "save_png",
           "set_starred", "shot_from_row", "t4_estimate", "use_lora", "weights_digest",
           "with_lora_subject"]

MANIFEST_COLUMNS = ["file", "style", "seed", "prompt", "negative_prompt", "steps", "guidance",
                    "scheduler", "lora_scale", "width", "height", "model", "family", "lora",
                    "face_detail_strength", "face_detail_padding", "face_detail_note",
                    "fast_pack", "starred"]


@dataclass
class GenerateResult:
    out_dir: Path
    manifest: pd.DataFrame
    images: list[Image.Image]
    grid: Image.Image
    # Measured seconds: loading the pipeline, and rendering (first renders and face passes),
    # named as the journey ETA names its phases (headshot_kit.fitcheck.eta).
    timings: dict = field(default_factory=dict)


def generate_pack(lora_dir: str | Path | None, out_dir: str | Path,
                  cfg: GenerateConfig | None = None, *, pipe=None,
                  progress: bool = True) -> GenerateResult:
    """Render every style x seed with the LoRA in `lora_dir` (None = base model) into `out_dir`.

    The pack is written to a temporary folder and swapped in whole, so an interrupted run never
    replaces a good pack. Run again into the same folder, images whose settings and LoRA are
    unchanged are kept with their stars, and favourites/ and best/ stay. `pipe` reuses an
    already loaded pipeline (its scheduler is replaced).
    """
    from tqdm.auto import tqdm

    cfg = cfg or GenerateConfig()
    styles = load_styles(cfg.style_dirs)
    names = check_generate(cfg, styles)
    lora_dir = check_lora(lora_dir, cfg)
    cfg = with_lora_subject(cfg, lora_dir)
    shots = [make_shot(cfg, styles[n], seed, lora_dir) for n in names for seed in cfg.seeds]
    out_dir = Path(out_dir)
    digest = weights_digest(lora_dir)
    kept = _unchanged(out_dir, digest, shots)
    todo = [s for s in shots if _file(s) not in kept]
    print(f"{len(shots)} images ({len(names)} styles x {len(cfg.seeds)} seeds)"
          + _weights_used(lora_dir, cfg)
          + (f"; {len(kept)} unchanged since the last run are kept, with their stars"
             if kept else "") + f"; {len(todo)} to render, {t4_estimate(cfg, len(todo))}.")
    timings = {}
    start = time.perf_counter()
    if todo and pipe is None:
        pipe = load_generate_pipeline(cfg)
        timings["loads"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    # Each image with its face-detail note and its star.
    made: dict[str, tuple[Image.Image, str, bool]] = {}
    with atomic_dir(out_dir) as tmp, tqdm(total=len(todo), desc="generate",
                                          disable=not progress) as bar:
        _carry_over(out_dir, tmp, kept)
        made.update({file: (_open(tmp / file), cell_text(row.get("face_detail_note")),
                            bool(row["starred"])) for file, row in kept.items()})
        size = pick_batch_size(cfg, pipe) if todo else 1
        for name in names:  # one style's shots differ only in seed
            style_shots = [s for s in todo if s.style == name]
            for start in range(0, len(style_shots), size):
                batch = style_shots[start:start + size]
                for shot, done in zip(batch, render_batch(batch, pipe)):
                    save_png(done.image, tmp / _file(shot), shot, done.note)
                    made[_file(shot)] = (done.image, done.note, False)
                bar.update(len(batch))
        timings["images + face pass"] = round(time.perf_counter() - start, 2)
        rows = [{"file": _file(s), **s.row(), "face_detail_note": made[_file(s)][1],
                 "starred": made[_file(s)][2]} for s in shots]
        images = [made[_file(s)][0] for s in shots]
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        grid = image_grid(images, len(names), len(cfg.seeds), row_labels=names,
                          col_labels=[str(s) for s in cfg.seeds], x_name="seed ",
                          title=describe_shot(shots[0], skip=("style", "seed")))
        grid.save(tmp / "grid.png")
        save_config(cfg, tmp / "config.json", lora_sha256=digest,
                    lora_dir=str(lora_dir.resolve()) if lora_dir else None)
    return GenerateResult(out_dir=out_dir, manifest=manifest, images=images, grid=grid,
                          timings=timings)


def _weights_used(lora_dir: Path | None, cfg: GenerateConfig) -> str:
    """Which of the LoRA's weights render the pack, as a clause of the summary line."""
    if lora_dir is None:
        return " with the base model"
    chosen = chosen_checkpoint(lora_dir)
    if chosen:
        return (f" with the LoRA's most alike checkpoint (step {chosen['step']}, likeness "
                f"{chosen['likeness']})")
    if cfg.lora_checkpoint == "best":
        return " with the LoRA's last weights (training chose no checkpoint by likeness)"
    return " with the LoRA's last weights"


def t4_estimate(cfg: GenerateConfig, n_images: int) -> str:
    """About how long `n_images` take on a free Colab T4, as a sentence: the journey ETA's
    render model (headshot_kit.fitcheck.eta: each step's FLOPs at the calibrated efficiency,
    the decode, and for the face-detail pass its img2img steps, encode and decode)."""
    from ..fitcheck import eta
    from ..fitcheck.gpus import GPUS

    t4 = GPUS["t4"]
    from .fast import active_pack, get_fast_pack

    cfg = replace(cfg, fast_pack=active_pack(cfg.fast_pack))
    steps, guidance = cfg.steps, cfg.guidance
    if cfg.fast_pack:
        pack = get_fast_pack(cfg.fast_pack)
        steps, guidance = pack.steps, pack.guidance
    tile = eta.decode_tile(cfg, t4)
    per_step = eta.sampling_step_seconds(cfg.family, cfg.resolution, guidance > 1, t4)
    seconds = n_images * eta.render_seconds(cfg.family, cfg.resolution, steps, guidance,
                                            tiled_at=tile, gpu=t4,
                                            fast_pack=bool(cfg.fast_pack))
    detail = ""
    if cfg.face_detail:
        extra = int(pass_steps(steps, cfg.face_detail_strength) * cfg.face_detail_strength)
        detail = f" + {extra} for the face pass"
        seconds += n_images * eta.face_pass_seconds(cfg, t4, steps=steps, guidance=guidance,
                                                    tiled_at=tile)
    when = "under a minute" if seconds < 60 else f"about {seconds / 60:.0f} min"
    pack = f", {cfg.fast_pack}" if cfg.fast_pack else ""
    return (f"on a T4 GPU {when} ({steps} steps{detail} each at {per_step:.2g} s "
            f"per step at {cfg.resolution} px{pack}: an estimate)")


def weights_digest(lora_dir: Path | None) -> str:
    """A fingerprint of the LoRA's weights, not of the file's bytes ("" for the base model)."""
    if lora_dir is None:
        return ""
    return safetensors_digest(lora_weights(lora_dir))


def _file(shot: Shot) -> str:
    return f"images/{shot.style}_seed{shot.seed}.png"


def _open(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _unchanged(out_dir: Path, digest: str,
               shots: Sequence[Shot]) -> dict[str, Mapping[str, Any]]:
    """The images of the pack already in `out_dir` that the same LoRA weights and settings
    made: their files and manifest rows (the star, the face-detail note)."""
    try:
        config = json.loads((out_dir / "config.json").read_text())
        manifest = load_manifest(out_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if config.get("lora_sha256") != digest:
        return {}
    # A manifest from before a Shot field existed made its images with the field's default
    # (before the face-detail pass: no pass).
    defaults = {f.name: f.default for f in fields(Shot) if f.default is not MISSING}
    old = {row["file"]: {**defaults, **row} for row in manifest.to_dict("records")}
    kept = {}
    for shot in shots:
        row = old.get(_file(shot))
        if row and (out_dir / _file(shot)).is_file() and all(
                str(row.get(k)) == str(v) for k, v in shot.row().items()):
            kept[_file(shot)] = row
    return kept


def _carry_over(out_dir: Path, tmp: Path, kept: Mapping[str, Any]) -> None:
    """Copy the kept images and the user's picks (favourites/, best/) into the new pack."""
    for file in kept:
        (tmp / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out_dir / file, tmp / file)
    for folder in ("favourites", "best"):
        if (out_dir / folder).is_dir():
            shutil.copytree(out_dir / folder, tmp / folder)


def regenerate(manifest_row: Mapping[str, Any], lora_dir: str | Path | None,
               pipe=None) -> Image.Image:
    """The image a manifest row (or a PNG's `read_parameters`) describes, rendered again with
    its face-detail pass (pixel-equal on the same device)."""
    shot = shot_from_row(manifest_row, lora_dir)
    if pipe is None:
        pipe = load_generate_pipeline(GenerateConfig(model=shot.model, family=shot.family))
    return render(shot, pipe)


def load_manifest(out_dir: str | Path) -> pd.DataFrame:
    path = Path(out_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run generate_pack into {out_dir} first.")
    # keep_default_na: an empty negative prompt or LoRA name stays "" rather than NaN.
    manifest = pd.read_csv(path, keep_default_na=False)
    manifest["starred"] = manifest["starred"].astype(str).str.lower().isin(("true", "1"))
    return manifest


def set_starred(out_dir: str | Path, file: str, starred: bool = True) -> pd.DataFrame:
    """Mark one image (its manifest `file`) as a favourite or not, in manifest.csv."""
    manifest = load_manifest(out_dir)
    hit = manifest["file"] == file
    if not hit.any():
        raise KeyError(f"{file!r} is not in {Path(out_dir) / 'manifest.csv'}.")
    manifest.loc[hit, "starred"] = bool(starred)
    with atomic_path(Path(out_dir) / "manifest.csv") as tmp:
        manifest.to_csv(tmp, index=False)
    return manifest


def export_starred(out_dir: str | Path) -> Path:
    """Copy the starred images of a pack into out_dir/favourites/ (replacing earlier exports)."""
    manifest = load_manifest(out_dir)
    return copy_ranked(manifest[manifest["starred"]], "file", Path(out_dir), "favourites")
