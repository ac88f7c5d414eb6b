"""Every stage setting's type and range, checked whenever a config is built (in Python, from
--set or from a YAML/JSON file), before any model loads; and settings given as text
(`--set NAME=VALUE`, a settings file) read as the type each field declares. `headshot_kit.config`
builds its configs on these and re-exports them."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import typing
from typing import Any

from .errors import ConfigError

# The largest image side and sampling steps a setting (or a PNG's parameters) may ask for:
# SDXL's native side is 1024 px, and samplers stop improving long before AUTOMATIC1111's
# 150-step slider ends.
MAX_SIDE = 2048
MAX_STEPS = 150
# The UNet attention projections a LoRA adapts: what diffusers' DreamBooth LoRA script adapts
# (TrainConfig's default, the LoRA attach's, the fit check's).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def on_latent_grid(side: int) -> bool:
    """Whether an image side fits the latent grid: the VAE makes each side 8 times smaller, so
    a side must be a multiple of 8."""
    return side % 8 == 0

# (lowest, highest, whether the lowest itself is allowed); None = no bound on that side.
_POSITIVE, _NONNEG, _ONE_UP, _UNIT = (0, None, False), (0, None, True), (1, None, True), (0, 1, True)
_ANY = (None, None, True)
_RANGES: dict[str, dict[str, tuple]] = {
    "PrepareConfig": {
        "resolution": (64, 4096, True), "crop_shift_down": _ANY, "detect_upsample": (0, 3, True),
        "padding_fail": _UNIT, "max_face_outside": _UNIT, "dark_warn": _UNIT,
        "dark_fail": _UNIT, "clipped_warn": _UNIT, "clipped_fail": _UNIT,
        "contrast_warn": _UNIT, "duplicate_hash_bits": (-1, 64, True),
        # A negative duplicate distance switches the duplicate check off.
        "duplicate_face_distance": (-1, None, True),
        "yaw_warn_deg": (0, 180, True), "roll_warn_deg": (0, 180, True),
        "frontal_yaw_deg": (0, 180, True), "min_photos": _ONE_UP, "max_photos": _ONE_UP,
        "detect_max_side": _ONE_UP, "min_image_side": _ONE_UP, "max_file_mb": _POSITIVE,
        "max_pixels": _POSITIVE, "crop_scale": _POSITIVE, "min_crop_scale": _POSITIVE,
        "work_side_factor": _POSITIVE, "upscale_warn": _POSITIVE, "upscale_fail": _POSITIVE,
        "identity_warn": _POSITIVE},
    "TrainConfig": {
        "resolution": (8, 4096, True), "steps": _ONE_UP, "batch_size": _ONE_UP,
        "grad_accum": _ONE_UP, "lr": _POSITIVE, "rank": _ONE_UP, "alpha": _POSITIVE,
        "lora_dropout": (0, 1, True), "max_grad_norm": _POSITIVE, "snr_gamma": _POSITIVE,
        "background_weight": _UNIT, "class_image_steps": (1, MAX_STEPS, True),
        "checkpoints_keep": _ONE_UP, "validation_steps": (1, MAX_STEPS, True),
        "max_bad_steps": _ONE_UP},
    "GenerateConfig": {
        "steps": (1, MAX_STEPS, True), "guidance": (0, 50, True), "lora_scale": (-10, 10, True),
        "resolution": (8, MAX_SIDE, True), "face_detail_strength": _UNIT},
    "EvaluateConfig": {"detect_upsample": (0, 3, True), "detect_max_side": _ONE_UP,
                       "best_n": _ONE_UP},
}
# Settings whose range is best said in their own words.
_ADVICE = {"face_detail_strength": "use a denoising strength from 0 (off) to 1 (0.4 is "
                                   "ADetailer's default)."}
# Fields that must not be empty (GenerateConfig's token and class_name may: "" = recorded).
_NOT_EMPTY = {"PrepareConfig.token", "PrepareConfig.class_name", "model", "family", "target_modules", "optimizer",
              "mixed_precision", "lr_scheduler", "scheduler", "device", "lora_checkpoint",
              "checkpoint_embedder", "embedder", "seeds"}
# Fields whose value becomes one word of a prompt or a file name: no spaces or line breaks.
_ONE_WORD = {"token"}


def _bound_text(low, high, closed: bool) -> str:
    if low is not None and high is not None:
        return f"from {low} to {high}"
    if low is not None:
        return f"{'at least' if closed else 'greater than'} {low}"
    return f"at most {high}"


def _check_value(value: Any, kind: Any, where: str) -> Any:
    """`value` as a value of `kind` (a field's type), or ConfigError saying what it must be."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} is {value!r}; give a list (on the command line: "
                              "V1,V2).")
        item = (typing.get_args(kind) or (str,))[0]
        return origin(_check_value(v, item, f"{where} item") for v in value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} is {value!r}; use True or False.")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{where} is {value!r}; use a whole number.")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{where} is {value!r}; use a number.")
        if not math.isfinite(value):
            raise ConfigError(f"{where} is {value!r}; use a finite number.")
        return float(value)
    if kind is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where} is {value!r}; use a text (a string).")
        return value
    return value


def check_fields(cfg: Any) -> Any:
    """Check (and normalise: a list for a tuple setting, a whole number for a float one) every
    setting of a stage config: its type, and its range where it has one. Called when a config
    is built, so a value that cannot run never reaches a model."""
    name = type(cfg).__name__
    types = typing.get_type_hints(type(cfg))
    ranges = _RANGES.get(name, {})
    for f in dataclasses.fields(cfg):
        where = f"{name}.{f.name}"
        value = _check_value(getattr(cfg, f.name), types[f.name], where)
        object.__setattr__(cfg, f.name, value)
        numbers_in = ([] if value is None else list(value) if isinstance(value, (list, tuple))
                      else [value])
        low, high, closed = ranges.get(f.name, _NONNEG)
        for v in numbers_in:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if (low is not None and (v < low or (v == low and not closed))) or (
                    high is not None and v > high):
                usual = _default(f)
                usual = f" ({usual!r} is usual)" if isinstance(usual, (int, float)) else ""
                raise ConfigError(f"{where} is {v!r}; " + _ADVICE.get(
                    f.name, f"use a value {_bound_text(low, high, closed)}{usual}."))
        if {f.name, where} & _NOT_EMPTY and (value is None or not value or (
                isinstance(value, str) and not value.strip())
                or (isinstance(value, tuple) and not all(str(v).strip() for v in value))):
            raise ConfigError(f"{where} is {value!r}; it must not be empty (default: "
                              f"{_default(f)!r}).")
        if f.name in _ONE_WORD and value and len(value.split()) != 1:
            raise ConfigError(f"{where} is {value!r}; use one word without spaces "
                              f"(e.g. {_default(f)!r}).")
    return cfg


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def update_config(cfg: Any, overrides: dict[str, Any], source: str = "settings") -> Any:
    """A copy of `cfg` with `overrides` applied; unknown names are rejected with the closest.

    Values arriving as strings (from the command line) are converted to the field's declared
    type, so `--set snr_gamma=5.5` works whether the current value is 5.0 or None.
    """
    names = {f.name: f for f in dataclasses.fields(cfg)}
    types = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{source}: {type(cfg).__name__} has no setting {key!r}; {hint}"
                              f"valid settings: {', '.join(sorted(names))}.")
        if isinstance(value, str) and types[key] is not str:
            value = _parse_as(value, types[key], key, source)
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def _parse_as(text: str, annotation: Any, key: str, source: str) -> Any:
    """`text` as a value of the type a field declares (`int`, `float | None`, `list[int]`).

    transformers' HfArgumentParser converts dataclass fields too, but as one flag per field
    (`--rank 8`), with lists as separate words and tuple fields not at all; `--set` takes
    NAME=VALUE pairs, lists as V1,V2, from the command line and config files alike. For every
    setting it can read, tests/test_config.py checks that both give the same value."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if optional and text.lower() in ("none", "null", ""):
        return None
    kind = args[0] if optional and len(args) == 1 else annotation
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (int, float):
            return kind(text)
        if origin in (list, tuple):
            item = (typing.get_args(kind) or (str,))[0]
            items = [t.strip() for t in text.split(",") if t.strip()]
            return origin(_parse_as(t, item, key, source) for t in items)
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{source}: {key}={text!r} is not a valid {name}.") from None
    return text
