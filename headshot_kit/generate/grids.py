"""X/Y comparison grids: any two settings on the axes, the others held fixed and named in the
title (a base-vs-LoRA grid is the "checkpoint" axis against seeds; a "face_detail" axis shows
what the face-detail pass does, its values strengths with 0 or "off" for no pass)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from ..config import ConfigError, GenerateConfig
from ..images import image_grid
from ..lora import pick_checkpoint
from .shots import (SAMPLERS, Shot, check_face_detail_strength, check_generate, check_lora,
                    describe_shot, face_detail_label, load_generate_pipeline, make_shot, render,
                    with_lora_subject)
from ..fastpacks import FAST_PACKS
from ..styles import Style, load_styles

# The settings a compare grid can put on an axis.
AXES = ("style", "seed", "lora_scale", "guidance", "steps", "scheduler", "checkpoint", "prompt",
        "face_detail")
# The Shot field each axis sets, where its name differs.
_SHOT_FIELD = {"face_detail": "face_detail_strength"}


@dataclass
class ComparePlan:
    """What an X/Y grid will show: its shots row by row, its labels and its title."""
    x: str
    y: str
    col_labels: list[str]
    row_labels: list[str]
    title: str
    shots: list[Shot] = field(default_factory=list)

    def grid(self, images: Sequence[Image.Image]) -> Image.Image:
        return image_grid(images, len(self.row_labels), len(self.col_labels),
                          row_labels=self.row_labels, col_labels=self.col_labels,
                          title=self.title)


def parse_axis_values(axis: str, text: str) -> list[str]:
    """Values typed as text: prompts one per line, anything else separated by commas or lines."""
    parts = text.split("\n") if axis == "prompt" else re.split(r"[,\n]", text)
    return [p.strip() for p in parts if p.strip()]


def default_axis_values(axis: str, cfg: GenerateConfig,
                        lora_dirs: Sequence[str | Path | None] = ()) -> list:
    """Sensible values to start an axis with."""
    _check_axis(axis)
    styles = load_styles(cfg.style_dirs)
    names = list(cfg.styles) or list(styles)
    return {
        "style": names, "seed": list(cfg.seeds), "lora_scale": [0.0, 0.5, 1.0],
        "guidance": [max(1.0, cfg.guidance - 2), cfg.guidance, cfg.guidance + 2],
        "steps": sorted({max(1, cfg.steps // 2), cfg.steps, cfg.steps * 2}),
        # Not a fast pack's own sampler (LCM): without its LoRA it draws noise.
        "scheduler": [s for s in SAMPLERS if s not in {p.scheduler for p in FAST_PACKS.values()}],
        "checkpoint": [None, *_with_best(lora_dirs)],
        "prompt": [styles[n].prompt for n in names[:3]],
        "face_detail": [0.0, cfg.face_detail_strength],
    }[axis]


def _with_best(lora_dirs: Sequence[str | Path | None]) -> list[str | Path]:
    """Each LoRA folder, followed by its best/ checkpoint where training chose one: the last
    weights and the most alike side by side."""
    out = []
    for folder in (d for d in lora_dirs if d is not None):
        out.append(folder)
        best = pick_checkpoint(folder, "best")
        if best != Path(folder):
            out.append(best)
    return out


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ConfigError(f"Unknown axis {axis!r}; choose one of {', '.join(AXES)}.")


def _axis_value(axis: str, value: Any, styles: Mapping[str, Style],
                cfg: GenerateConfig) -> Any:
    """`value` converted to the axis's type (values may arrive as text from a widget)."""
    if axis == "face_detail" and str(value).strip().lower() in ("off", "on"):
        # "on" is the configured strength, whether cfg has the pass on or not.
        value = cfg.face_detail_strength if str(value).strip().lower() == "on" else 0.0
    try:
        if axis in ("seed", "steps"):
            return int(value)
        if axis in ("lora_scale", "guidance"):
            return float(value)
        if axis == "face_detail":
            return check_face_detail_strength(float(value), "face_detail value")
    except ValueError:
        raise ConfigError(f"{axis} value {value!r} is not a number"
                          + (" (nor 'off' or 'on')." if axis == "face_detail" else ".")) from None
    if axis == "style" and value not in styles:
        raise ConfigError(f"Unknown style {value!r}; available: {', '.join(styles)}.")
    if axis == "scheduler" and value not in SAMPLERS:
        raise ConfigError(f"Unknown scheduler {value!r}; choose one of {', '.join(SAMPLERS)}.")
    if axis == "checkpoint":
        if value is None or str(value).lower() in ("", "base", "none"):
            return None
        # A folder on the axis renders its own weights (the defaults put a LoRA's last weights
        # beside its best/), refused like the pack's if trained for another base model.
        return str(check_lora(value, dataclasses.replace(cfg, lora_checkpoint="last")))
    return value


def _axis_labels(axis: str, values: Sequence[Any]) -> list[str]:
    if axis == "checkpoint":
        names = [Path(v).name if v else "base model" for v in values]
        # Checkpoints from two runs often share a name ("final"); show their run folder too.
        if len(set(names)) < len(names):
            names = ["/".join(Path(v).parts[-2:]) if v else "base model" for v in values]
        return names
    fmt = {"seed": "seed {}", "steps": "{} steps", "guidance": "CFG {:g}",
           "lora_scale": "LoRA scale {:g}"}
    if axis == "scheduler":
        return [SAMPLERS[v].a1111 for v in values]
    if axis == "face_detail":
        return [face_detail_label(v) for v in values]
    if axis == "prompt":
        return [v if len(v) <= 40 else v[:39] + "…" for v in values]
    return [fmt.get(axis, "{}").format(v) for v in values]


def plan_compare(lora_dir_or_dirs: str | Path | Sequence[str | Path | None] | None,
                 x: str, x_values: Sequence[Any] | None, y: str,
                 y_values: Sequence[Any] | None, cfg: GenerateConfig | None = None,
                 ) -> ComparePlan:
    """The shots and labels of an X/Y grid; settings not on an axis come from `cfg`.

    The fixed style is cfg.styles[0], the fixed seed cfg.seeds[0]. For the "checkpoint" axis the
    values are LoRA folders ("base" or None = the base model). Values left as None are
    `default_axis_values` (for "checkpoint": the base model, then `lora_dir_or_dirs`). The
    "prompt" axis replaces the style's prompt (write {subject} where the person goes). The
    "face_detail" axis takes strengths (0 or "off" = no pass, "on" = cfg's strength) at cfg's
    padding.
    """
    cfg = cfg or GenerateConfig()
    styles = load_styles(cfg.style_dirs)
    check_generate(cfg, styles)
    _check_axis(x)
    _check_axis(y)
    if x == y:
        raise ConfigError(f"Both axes are {x!r}; pick two different settings to compare.")
    if isinstance(lora_dir_or_dirs, (list, tuple)):
        lora_dirs = list(lora_dir_or_dirs)
    else:
        lora_dirs = [lora_dir_or_dirs] if lora_dir_or_dirs is not None else []
    if "checkpoint" not in (x, y) and len(lora_dirs) > 1:
        raise ConfigError(f"{len(lora_dirs)} LoRA folders were given but neither axis is "
                          "'checkpoint'; pass one folder, or compare over checkpoint.")
    axis_values = {}
    for axis, values in ((x, x_values), (y, y_values)):
        if values is None:
            values = default_axis_values(axis, cfg, lora_dirs)
        if not values:
            raise ConfigError(f"The {axis!r} axis has no values; give at least one.")
        axis_values[axis] = [_axis_value(axis, v, styles, cfg) for v in values]
    cfg = with_lora_subject(cfg, next((d for d in lora_dirs if d is not None), None))
    fixed = {"style": (cfg.styles or list(styles))[0], "seed": cfg.seeds[0],
             "checkpoint": lora_dirs[0] if lora_dirs else None}
    if fixed["checkpoint"] is not None:  # cfg.lora_checkpoint says which of its weights
        fixed["checkpoint"] = str(check_lora(fixed["checkpoint"], cfg))
    shots = []
    for y_value in axis_values[y]:
        for x_value in axis_values[x]:
            chosen = {**fixed, x: x_value, y: y_value}
            overrides = {_SHOT_FIELD.get(k, k): v for k, v in chosen.items()
                         if k in ("steps", "guidance", "scheduler", "lora_scale", "prompt",
                                  "face_detail")}
            shots.append(make_shot(cfg, styles[chosen["style"]], chosen["seed"],
                                   chosen["checkpoint"], **overrides))
    # Describe a LoRA shot when there is one: a base-model row has no LoRA scale to show.
    sample = next((s for s in shots if s.lora_dir), shots[0])
    return ComparePlan(x=x, y=y, col_labels=_axis_labels(x, axis_values[x]),
                       row_labels=_axis_labels(y, axis_values[y]),
                       title=describe_shot(sample, skip=(x, y)), shots=shots)


def render_plan(plan: ComparePlan, pipe, progress: bool = True) -> Image.Image:
    """Render a plan's shots into its labelled grid."""
    from tqdm.auto import tqdm

    images = [render(shot, pipe)
              for shot in tqdm(plan.shots, desc="compare", disable=not progress)]
    return plan.grid(images)


def compare_grid(lora_dir_or_dirs: str | Path | Sequence[str | Path | None] | None, x: str,
                 x_values: Sequence[Any] | None, y: str, y_values: Sequence[Any] | None,
                 cfg: GenerateConfig | None = None, pipe=None,
                 progress: bool = True) -> Image.Image:
    """An X/Y grid over any two of AXES, titled with the settings held fixed."""
    cfg = cfg or GenerateConfig()
    plan = plan_compare(lora_dir_or_dirs, x, x_values, y, y_values, cfg)
    return render_plan(plan, load_generate_pipeline(cfg) if pipe is None else pipe, progress)


def base_vs_lora_grid(lora_dir: str | Path, cfg: GenerateConfig | None = None,
                      seeds: Sequence[int] | None = None, pipe=None,
                      progress: bool = True) -> Image.Image:
    """The base model (top row) and the LoRA (bottom row) on the same seeds; the LoRA row
    renders the weights the pack does (cfg.lora_checkpoint: its best/ checkpoint by default)."""
    cfg = cfg or GenerateConfig()
    return compare_grid(lora_dir, "seed", list(seeds or cfg.seeds), "checkpoint",
                        [None, check_lora(lora_dir, cfg)], cfg, pipe=pipe, progress=progress)
