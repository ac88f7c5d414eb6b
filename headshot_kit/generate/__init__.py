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
LoRA, rendering, the PNG's parameters) and `grids` (X/Y grids over any two settings).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from contextlib import ExitStack
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from PIL import Image

from ..config import ConfigError, DataError, GenerateConfig, save_config
from ..facedetail import pass_steps
from ..images import image_grid
from ..layout import MANIFEST
from ..lora import chosen_checkpoint, lora_weights, read_lora_record
from ..records import manifest_path, read_manifest, write_manifest
from ..storage import (WORKBENCH_MARKER, FolderLock, atomic_dir, copy_ranked, is_lock_file,
                       made_by, mark_folder, read_record, safetensors_digest)
from .grids import (AXES, ComparePlan, base_vs_lora_grid, compare_grid, default_axis_values,
                    parse_axis_values, plan_compare, render_plan)
from .shots import (SAMPLERS, Shot, cell_text, check_generate, check_lora, describe_shot,
                    detail_shot, first_render, load_generate_pipeline, make_scheduler,
                    make_shot, pick_batch_size, read_parameters, render, render_batch, save_png,
                    shot_from_row, use_lora, with_lora_subject)
from ..styles import Style, StyleError, load_styles

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
                    "fast_pack", "starred", "image_check"]
# What a pack writes (and replaces on a re-run); anything else in its folder is kept as it is.
PACK_FILES = ("images", MANIFEST, "grid.png", "config.json", WORKBENCH_MARKER)
# A star clicked while the pack is written waits this long for the manifest at most.
STAR_WAIT_S = 120
LOCKS = (".headshot-kit.generate.lock", ".headshot-kit.manifest.lock")


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
    unchanged are kept with their stars, and favourites/ and best/ (and anything else the pack
    does not write itself) stay. A folder that holds other files and is not a pack is refused,
    as is a second generate into the same folder while one runs. `pipe` reuses an already
    loaded pipeline (its scheduler is replaced).
    """
    cfg = cfg or GenerateConfig()
    styles = load_styles(cfg.style_dirs)
    names = check_generate(cfg, styles)
    lora_dir = check_lora(lora_dir, cfg)
    cfg = with_lora_subject(cfg, lora_dir)
    shots = [make_shot(cfg, styles[n], seed, lora_dir) for n in names for seed in cfg.seeds]
    out_dir = Path(out_dir)
    check_pack_folder(out_dir)
    with _pack_lock(out_dir, "generate").held():
        return _write_pack(lora_dir, out_dir, cfg, names, shots, pipe, progress)


def _write_pack(lora_dir, out_dir: Path, cfg: GenerateConfig, names: list[str],
                shots: list[Shot], pipe, progress: bool) -> GenerateResult:
    from tqdm.auto import tqdm

    digest = weights_digest(lora_dir)
    kept = _unchanged(out_dir, digest, shots)
    todo = [s for s in shots if _file(s) not in kept]
    released = _released_stars(out_dir, digest, kept)
    print(f"{len(shots)} images ({_count(len(names), 'style')} x {_count(len(cfg.seeds), 'seed')})"
          + _weights_used(lora_dir, cfg)
          + (f"; {len(kept)} unchanged since the last run are kept, with their stars"
             if kept else "") + (f"; {len(todo)} to render, {t4_estimate(cfg, len(todo))}."
                                 if todo else "; nothing to render."))
    if released:
        print(released)
    timings = {}
    began = time.perf_counter()
    if todo and pipe is None:
        pipe = load_generate_pipeline(cfg)
        timings["loads"] = round(time.perf_counter() - began, 2)
    began = time.perf_counter()
    # Each image with its face-detail note and its star.
    made: dict[str, tuple[Image.Image, str, bool]] = {}
    # The manifest lock is taken at the end and held until the new pack is in place, so a
    # star clicked meanwhile is either in the old manifest (and carried over) or waits.
    with ExitStack() as swap_done:
        with atomic_dir(out_dir, links=LOCKS) as tmp, tqdm(total=len(todo), desc="generate",
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
            timings["images + face pass"] = round(time.perf_counter() - began, 2)
            swap_done.enter_context(_pack_lock(out_dir, "manifest").held(wait=STAR_WAIT_S))
            stars = _current_stars(out_dir, kept)
            _keep_others(out_dir, tmp)
            rows = [{"file": _file(s), **s.row(), "face_detail_note": made[_file(s)][1],
                     "starred": stars.get(_file(s), made[_file(s)][2]),
                     "image_check": image_check(made[_file(s)][0])} for s in shots]
            images = [made[_file(s)][0] for s in shots]
            manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
            write_manifest(manifest, tmp)
            grid = image_grid(images, len(names), len(cfg.seeds), row_labels=names,
                              col_labels=[f"seed {s}" for s in cfg.seeds],
                              title=describe_shot(shots[0], skip=("style", "seed")))
            grid.save(tmp / "grid.png")
            save_config(cfg, tmp / "config.json", lora_sha256=digest,
                        lora_dir=str(lora_dir.resolve()) if lora_dir else None)
            mark_folder(tmp, "generate")
    flagged = manifest[manifest["image_check"] != ""]
    if len(flagged):
        print(f"{len(flagged)} of {len(manifest)} images came out blank ({flagged['file'].iloc[0]}:"
              f" {flagged['image_check'].iloc[0]}); manifest.csv flags them in image_check.")
    return GenerateResult(out_dir=out_dir, manifest=manifest, images=images, grid=grid,
                          timings=timings)


def image_check(image: Image.Image) -> str:
    """"" for a picture; a note for an image that came out black or one flat colour (NaN in
    the model or LoRA decodes to black, as does fp16 overflow in SDXL's original VAE)."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB"))
    if pixels.max() <= 8:
        return ("black: the model gave NaN or nothing; check the LoRA's weights and the "
                "precision (SDXL in fp16 needs the fp16-fix VAE)")
    if int(pixels.max()) - int(pixels.min()) <= 2:
        return "blank: one flat colour, no picture"
    return ""


def check_pack_folder(out_dir: Path) -> None:
    """Refuse an out folder that is not empty and not a pack: writing the pack there would
    replace what it holds."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file; give a folder name for the pack.")
    held = sorted(p.name for p in out_dir.iterdir() if not is_lock_file(p.name))
    if not held or made_by(out_dir) == "generate":
        return
    try:  # a pack written before packs carried the workbench's marker
        if read_record(out_dir / "config.json").get(
                "config_type") == "GenerateConfig" and manifest_path(out_dir).is_file():
            return
    except (OSError, DataError):
        pass  # an unreadable or damaged record cannot tell: refused like any other file
    raise ConfigError(f"out_dir {out_dir} already holds files that are not a generated pack "
                      f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}), and the pack "
                      "would replace them; choose an empty or new folder (e.g. "
                      f"{out_dir / 'headshots'}).")


def _pack_lock(out_dir: str | Path, what: str) -> FolderLock:
    """The pack's lock for a generate run (a second is refused) or for its manifest (a star
    waits its turn). It lives in the pack and is carried into each new pack (atomic_dir's
    links), so it holds while the pack folder is swapped."""
    out_dir = Path(out_dir)
    doing = "generate run" if what == "generate" else "writer of its manifest"
    return FolderLock(out_dir, doing, out_dir / f".headshot-kit.{what}.lock")


def _current_stars(out_dir: Path, kept: Mapping[str, Any]) -> dict[str, bool]:
    """The stars of the kept images as manifest.csv holds them now (clicked during the run)."""
    try:
        manifest = load_manifest(out_dir)
    except FileNotFoundError:
        return {}
    return {f: bool(s) for f, s in zip(manifest["file"], manifest["starred"]) if f in kept}


def _keep_others(out_dir: Path, tmp: Path) -> None:
    """Copy everything in the old pack folder that the pack does not write itself (the user's
    favourites/ and best/, their notes) into the new one."""
    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        if entry.name in PACK_FILES or is_lock_file(entry.name) or (tmp / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, tmp / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, tmp / entry.name, follow_symlinks=False)


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
    from ..fastpacks import active_pack, get_fast_pack

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
        config = read_record(out_dir / "config.json")
        manifest = load_manifest(out_dir)
    except (FileNotFoundError, DataError):
        return {}  # nothing known to be reusable: every image is rendered again
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _released_stars(out_dir: Path, digest: str, kept: Mapping[str, Any]) -> str:
    """One line when starred images of the previous pack are not kept (they are rendered again,
    or left out): how many lose their star and why; "" when every star stays."""
    try:
        old = load_manifest(out_dir)
        config = read_record(out_dir / "config.json")
    except (FileNotFoundError, DataError):
        return ""
    lost = [f for f in old.loc[old["starred"], "file"] if f not in kept]
    if not lost:
        return ""
    why = ("the LoRA's weights changed" if config.get("lora_sha256") != digest
           else "their settings changed or they are no longer in the pack")
    line = (f"{len(lost)} starred image{'s' if len(lost) > 1 else ''} released "
            f"({', '.join(Path(f).name for f in lost)}): {why}, so the new pictures start "
            "unstarred.")
    if (out_dir / "favourites").is_dir():
        line += " favourites/ keeps the copies exported before."
    return line


def _carry_over(out_dir: Path, tmp: Path, kept: Mapping[str, Any]) -> None:
    """Copy the kept images into the new pack."""
    for file in kept:
        (tmp / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out_dir / file, tmp / file)


def regenerate(manifest_row: Mapping[str, Any], lora_dir: str | Path | None,
               pipe=None, *, model: str | None = None,
               other_base_model: bool = False) -> Image.Image:
    """The image a manifest row (or a PNG's `read_parameters`) describes, rendered again with
    its face-detail pass (pixel-equal on the same device).

    A PNG may come from anywhere, so the model it names is not loaded on its word: the model
    is `model`, or else the one the LoRA was trained on (its config.json), and a row naming
    another is refused unless `other_base_model` says so. Its size and steps must lie within
    the settings' limits (shots.check_shot)."""
    shot = shot_from_row(manifest_row, lora_dir)
    recorded = read_lora_record(lora_dir) if lora_dir is not None else None
    chosen = model or (recorded and recorded.model)
    if not chosen:
        raise ConfigError(f"The image names the model {shot.model!r}, and no LoRA records one: "
                          f"pass model={shot.model!r} (or the model you want) to render it with "
                          "that model on purpose.")
    if shot.model != chosen and not other_base_model:
        raise ConfigError(f"The image names the model {shot.model!r}, but "
                          f"{'the LoRA was trained on' if not model else 'model is'} "
                          f"{chosen!r}; pass model={shot.model!r} to use the image's model, or "
                          "other_base_model=True to render it with "
                          f"{chosen!r} anyway (the face comes out less alike).")
    family = recorded.family if recorded and recorded.family is not None else shot.family
    if family != shot.family:
        raise ConfigError(f"The image names the model family {shot.family!r}, but the LoRA "
                          f"was trained for {family!r}; use an image made with this LoRA.")
    shot = dataclasses.replace(shot, model=chosen)
    if pipe is None:
        pipe = load_generate_pipeline(GenerateConfig(model=shot.model, family=shot.family))
    return render(shot, pipe)


def load_manifest(out_dir: str | Path) -> pd.DataFrame:
    """The pack's manifest (records.read_manifest), with the `starred` column stars need."""
    return read_manifest(out_dir, required=("file", "starred"))


def set_starred(out_dir: str | Path, file: str, starred: bool = True) -> pd.DataFrame:
    """Mark one image (its manifest `file`) as a favourite or not, in manifest.csv.

    Read, changed and written under the manifest's lock: a star set from another notebook, or
    while generate writes the pack, is never lost."""
    load_manifest(out_dir)  # a folder without a pack is named before anything is written
    with _pack_lock(out_dir, "manifest").held(wait=STAR_WAIT_S):
        manifest = load_manifest(out_dir)
        hit = manifest["file"] == file
        if not hit.any():
            raise KeyError(f"{file!r} is not in {manifest_path(out_dir)}.")
        manifest.loc[hit, "starred"] = bool(starred)
        write_manifest(manifest, out_dir)
    return manifest


def export_starred(out_dir: str | Path) -> Path:
    """Copy the starred images of a pack into out_dir/favourites/ (replacing earlier exports)."""
    with _pack_lock(out_dir, "manifest").held(wait=STAR_WAIT_S):
        manifest = load_manifest(out_dir)
        return copy_ranked(manifest[manifest["starred"]], "file", Path(out_dir), "favourites")
