"""The generate stage: a trained LoRA -> a pack of professional headshots.

`generate_pack` renders every chosen style with every seed and writes a results folder:

    images/<style>_seed<seed>.png   each PNG carries its settings in a "parameters" text chunk,
                                    in the AUTOMATIC1111 format most image tools read
    manifest.csv                    one row per image (MANIFEST_COLUMNS), with a `starred` column
    grid.png                        rows = styles, columns = seeds, labelled
    config.json                     the resolved GenerateConfig

Every image is a pure function of its settings (a `Shot`): the noise comes from a CPU
`torch.Generator` seeded for that image alone, so `regenerate` gives the same picture back from
a manifest row. `compare_grid` lays out X/Y grids over any two settings, and `best_of` copies the
top-scoring images once the evaluate stage has scored them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd
import yaml
from PIL import Image, PngImagePlugin

from .config import (DEFAULT_CLASS, DEFAULT_TOKEN, ConfigError, GenerateConfig, agree,
                     save_config, validate_generate)
from .images import image_grid
from .storage import atomic_dir, atomic_path, safetensors_digest

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# Our scheduler names and the sampler names AUTOMATIC1111 writes for the same samplers.
SAMPLERS = {"dpmpp-karras": "DPM++ 2M Karras", "euler-a": "Euler a", "ddim": "DDIM"}
# The settings a compare grid can put on an axis.
AXES = ("style", "seed", "lora_scale", "guidance", "steps", "scheduler", "checkpoint", "prompt")
MANIFEST_COLUMNS = ["file", "style", "seed", "prompt", "negative_prompt", "steps", "guidance",
                    "scheduler", "lora_scale", "width", "height", "model", "family", "lora",
                    "starred"]
# The fields a style may set: their types, and how an error message names those types.
STYLE_FIELDS = {"prompt": (str, "text"), "negative_prompt": (str, "text"),
                "guidance": ((int, float), "number"), "steps": (int, "whole number"),
                "description": (str, "text")}
_STYLE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class StyleError(ValueError):
    """A style file is wrong; the message names the file, the style and the field."""


# ---------------------------------------------------------------------------------------------
# Styles


@dataclass(frozen=True)
class Style:
    name: str
    # Contains {subject}, which becomes "<token> <class>" (e.g. "ohwx person").
    prompt: str
    negative_prompt: str = ""
    # Suggested settings; used when GenerateConfig.style_settings is True.
    guidance: float | None = None
    steps: int | None = None
    description: str = ""
    # The file the style came from, so a surprising prompt can be traced.
    source: str = ""


def load_styles(extra_dirs: Iterable[str | Path] = ()) -> dict[str, Style]:
    """The packaged styles, then every *.yaml / *.yml in `extra_dirs` (a later name replaces)."""
    packaged = resources.files("headshot_kit") / "data" / "styles.yaml"
    styles = _read_style_file(Path(str(packaged)))
    for folder in extra_dirs:
        folder = Path(folder)
        if not folder.exists():
            raise StyleError(f"Style folder {folder} does not exist; check "
                             "GenerateConfig.style_dirs.")
        files = [folder] if folder.is_file() else sorted(
            p for p in folder.iterdir() if p.suffix in (".yaml", ".yml"))
        for path in files:
            styles.update(_read_style_file(path))
    return styles


def _read_style_file(path: Path) -> dict[str, Style]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StyleError(f"{path}: not valid YAML ({exc}).") from None
    if not isinstance(data, dict):
        raise StyleError(f"{path}: expected a mapping of style names to fields, e.g. "
                         "'corporate: {prompt: \"headshot of {subject}, ...\"}'.")
    styles = {}
    for name, fields in data.items():
        # Keys starting with "_" hold shared text for YAML anchors, not styles.
        if str(name).startswith("_"):
            continue
        where = f"{path}: style {name!r}"
        if not _STYLE_NAME.match(str(name)):
            raise StyleError(f"{where}: the name must be lowercase letters, digits, '-' or '_' "
                             "(it becomes part of the image file names).")
        if not isinstance(fields, dict):
            raise StyleError(f"{where}: expected fields (prompt, negative_prompt, guidance, "
                             "steps, description) under the name.")
        for key, value in fields.items():
            if key not in STYLE_FIELDS:
                raise StyleError(f"{where}: unknown field {key!r}; valid fields: "
                                 f"{', '.join(STYLE_FIELDS)}.")
            types, type_name = STYLE_FIELDS[key]
            # YAML reads yes/no as booleans, which Python counts as ints.
            if isinstance(value, bool) or not isinstance(value, types):
                raise StyleError(f"{where}: field {key!r} is {value!r}; it must be "
                                 f"{type_name}.")
        if "{subject}" not in fields.get("prompt", ""):
            raise StyleError(f"{where}: field 'prompt' must contain {{subject}}, where the "
                             "trained token goes (e.g. 'headshot of {subject}, navy background').")
        for key in ("guidance", "steps"):
            if fields.get(key) is not None and fields[key] <= 0:
                raise StyleError(f"{where}: field {key!r} is {fields[key]}; it must be positive.")
        styles[name] = Style(name=name, source=str(path), **fields)
    return styles


# ---------------------------------------------------------------------------------------------
# One image


@dataclass(frozen=True)
class Shot:
    """Everything that decides one image; the same Shot always gives the same picture."""
    style: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    scheduler: str
    lora_scale: float
    width: int
    height: int
    model: str
    family: str = "sd15"
    # The LoRA folder; None = the base model.
    lora_dir: str | None = None

    @property
    def lora(self) -> str:
        return Path(self.lora_dir).name if self.lora_dir else ""

    def parameters(self) -> str:
        """The settings as AUTOMATIC1111 writes them, so other tools can read them too."""
        fields = {"Steps": self.steps, "Sampler": SAMPLERS[self.scheduler],
                  "CFG scale": self.guidance, "Seed": self.seed,
                  "Size": f"{self.width}x{self.height}", "Model": self.model}
        if self.lora_dir:
            fields.update({"Lora": self.lora, "Lora scale": self.lora_scale})
        line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items())
        return f"{self.prompt}\nNegative prompt: {self.negative_prompt}\n{line}"

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        del row["lora_dir"]
        return {**row, "lora": self.lora}


def make_shot(cfg: GenerateConfig, style: Style, seed: int, lora_dir: str | Path | None,
              **overrides: Any) -> Shot:
    """The Shot for `style` and `seed` under `cfg`; `overrides` set any Shot field directly."""
    suggest = cfg.style_settings
    shot = Shot(
        style=style.name,
        prompt=style.prompt,
        negative_prompt=cfg.negative_prompt or style.negative_prompt,
        seed=int(seed),
        steps=style.steps if suggest and style.steps else cfg.steps,
        guidance=float(style.guidance if suggest and style.guidance else cfg.guidance),
        # Without a LoRA the scale is recorded as 0, as the PNG (with no "Lora scale") reads back.
        scheduler=cfg.scheduler, lora_scale=float(cfg.lora_scale) if lora_dir else 0.0,
        width=cfg.resolution, height=cfg.resolution, model=cfg.model, family=cfg.family,
        lora_dir=str(lora_dir) if lora_dir else None)
    shot = replace(shot, **overrides)
    return replace(shot, prompt=fill_subject(shot.prompt, cfg))


def fill_subject(template: str, cfg: GenerateConfig) -> str:
    """Put the trained words ("ohwx person") where the template says {subject}."""
    token, class_name = cfg.token or DEFAULT_TOKEN, cfg.class_name or DEFAULT_CLASS
    return template.replace("{subject}", f"{token} {class_name}")


def with_lora_subject(cfg: GenerateConfig, lora_dir: str | Path | None) -> GenerateConfig:
    """`cfg` with the subject words the LoRA was trained on (its config.json records them);
    a token or class_name setting that names other words is refused."""
    trained = Path(lora_dir) / "config.json" if lora_dir is not None else None
    recorded = json.loads(trained.read_text()) if trained and trained.is_file() else {}
    if "token" not in recorded:  # the base model, or a LoRA from elsewhere: the settings hold
        return cfg
    fix = ", or train a LoRA on a dataset prepared with those words"
    return replace(cfg, token=agree("GenerateConfig.token", cfg.token, recorded["token"],
                                    trained, fix),
                   class_name=agree("GenerateConfig.class_name", cfg.class_name,
                                    recorded["class_name"], trained, fix))


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh scheduler of kind `name` on the model's own noise schedule.

    Only the noise-schedule keys are carried over, so switching samplers never leaks one
    sampler's options (Karras sigmas, say) into the next.
    """
    import diffusers

    kinds = {
        "dpmpp-karras": ("DPMSolverMultistepScheduler",
                         {"algorithm_type": "dpmsolver++", "solver_order": 2,
                          "use_karras_sigmas": True}),
        "euler-a": ("EulerAncestralDiscreteScheduler", {}),
        # DDIM's own default clips samples to [-1, 1], which is wrong for latents.
        "ddim": ("DDIMScheduler", {"clip_sample": False}),
    }
    if name not in kinds:
        raise ConfigError(f"scheduler is {name!r}; choose one of {', '.join(SAMPLERS)}.")
    class_name, options = kinds[name]
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "prediction_type", "steps_offset", "timestep_spacing", "set_alpha_to_one")
    base = {k: base_config[k] for k in keys if k in base_config and k in accepted}
    return cls(**base, **options)


def lora_weights(lora_dir: str | Path) -> Path:
    """The weights file of a trained LoRA folder; a clear error if it is not one."""
    path = Path(lora_dir) / LORA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{lora_dir}: no {LORA_WEIGHTS} there. Point lora_dir at the "
                                "folder the train stage wrote (or pass None for the base model).")
    return path


def check_lora(lora_dir: str | Path | None, cfg: GenerateConfig) -> Path | None:
    """Reject a missing LoRA, or one trained for another model family or on another base
    model, before any rendering."""
    if lora_dir is None:
        return None
    lora_weights(lora_dir)
    trained = Path(lora_dir) / "config.json"
    if trained.is_file():
        recorded = json.loads(trained.read_text())
        family, model = recorded.get("family"), recorded.get("model")
        if family and family != cfg.family:
            raise ConfigError(f"{trained}: this LoRA was trained for family {family!r} but "
                              f"GenerateConfig.family is {cfg.family!r}; set family={family!r} "
                              "and a matching model.")
        # Its weights only fit the model they were trained on, even within the family.
        if model and model != cfg.model:
            raise ConfigError(f"{trained}: this LoRA was trained on {model!r} but "
                              f"GenerateConfig.model is {cfg.model!r}; set model={model!r}.")
    return Path(lora_dir)


def use_lora(pipe, lora_dir: str | Path | None, scale: float) -> None:
    """Make `lora_dir` the pipeline's only active LoRA at `scale`, or turn LoRAs off (None).

    Each LoRA is loaded once per pipeline, under a name derived from its file's path and
    modification time, so switching back and forth is free and a retrained LoRA is reloaded.
    """
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    if lora_dir is None:
        if loaded:
            pipe.disable_lora()
        return
    weights = lora_weights(lora_dir)
    stat = weights.stat()
    key = f"{weights.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    # Adapter names become module keys, which may not contain dots.
    name = "lora_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    if name not in loaded:
        pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS, adapter_name=name)
    pipe.enable_lora()
    pipe.set_adapters([name], adapter_weights=[scale])


def load_generate_pipeline(cfg: GenerateConfig):
    """The pipeline for `cfg.model`: fp16 on a GPU, fp32 on the CPU, VAE memory savers on a GPU."""
    from .models import load_pipeline, pick_device, pick_dtype

    device = pick_device(cfg.device)
    pipe = load_pipeline(cfg.model, cfg.family, device=device,
                         dtype=pick_dtype(device, "no" if device == "cpu" else "fp16"))
    if device.startswith("cuda"):
        save_decode_memory(pipe, cfg.family)
    return pipe


def save_decode_memory(pipe, family: str) -> None:
    """Decode a batch one image at a time (what pick_batch_size counts on, for every family)
    and, for SDXL, in tiles: a 1024 px decode at once needs more memory than a T4 has left."""
    pipe.vae.enable_slicing()
    if family == "sdxl":
        pipe.vae.enable_tiling()


def render(shot: Shot, pipe) -> Image.Image:
    """One image for `shot`: the same shot gives the same pixels on the same device."""
    return render_batch([shot], pipe)[0]


def render_batch(shots: Sequence[Shot], pipe) -> list[Image.Image]:
    """Images for shots that differ only in seed, in one pipeline call.

    Each image draws its starting noise from its own seeded CPU generator, so batching changes
    no image's noise; on the CPU the pixels are the same as one at a time.
    """
    import torch

    first = shots[0]
    if any(dataclasses.replace(s, seed=first.seed) != first for s in shots):
        raise ValueError("render_batch takes shots that differ only in their seed.")
    use_lora(pipe, first.lora_dir, first.lora_scale)
    pipe.scheduler = make_scheduler(first.scheduler, pipe.scheduler.config)
    # Our own bars count images; diffusers' per-step bar would only add noise.
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in shots]
    with torch.inference_mode():
        result = pipe(prompt=[first.prompt] * len(shots),
                      negative_prompt=[first.negative_prompt] * len(shots),
                      num_inference_steps=first.steps, guidance_scale=first.guidance,
                      width=first.width, height=first.height, generator=generators)
    return result.images


def pick_batch_size(cfg: GenerateConfig, pipe) -> int:
    """cfg.batch_size, or for 0 as many images per call as the GPU's free memory allows.

    About 1.5 GB per 512 px image in fp16 (SD 1.5, activations of the UNet with classifier-free
    guidance, VAE decode sliced) and four times that at 1024 px; at most 8. One on the CPU,
    where a batch gains nothing.
    """
    if cfg.batch_size:
        return cfg.batch_size
    import torch

    if pipe.device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(pipe.device)
    per_image = 1.5e9 * (cfg.resolution / 512) ** 2
    return int(max(1, min(8, free * 0.8 // per_image)))


def save_png(image: Image.Image, path: str | Path, shot: Shot) -> Path:
    """Write `image` atomically with its settings in the PNG "parameters" text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", shot.parameters())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def _quote(value: Any) -> str:
    # AUTOMATIC1111 quotes values that would break its "key: value, " line.
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


# ---------------------------------------------------------------------------------------------
# A pack


@dataclass
class GenerateResult:
    out_dir: Path
    manifest: pd.DataFrame
    images: list[Image.Image]
    grid: Image.Image


def check_generate(cfg: GenerateConfig, styles: Mapping[str, Style]) -> list[str]:
    """Validate `cfg` against the known styles; returns the style names to render, in order."""
    validate_generate(cfg)
    if cfg.scheduler not in SAMPLERS:
        raise ConfigError(f"scheduler is {cfg.scheduler!r}; choose one of "
                          f"{', '.join(SAMPLERS)}.")
    names = list(cfg.styles) or list(styles)
    unknown = [n for n in names if n not in styles]
    if unknown:
        raise ConfigError(f"Unknown style(s) {', '.join(unknown)}; available: "
                          f"{', '.join(styles)} (or add your own with style_dirs).")
    for what, values in (("styles", names), ("seeds", cfg.seeds)):
        if len(set(values)) != len(values):
            raise ConfigError(f"{what} lists a value twice ({values}); each image needs its own "
                              "file name, so list each once.")
    return names


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
          + (f"; {len(kept)} unchanged since the last run are kept, with their stars"
             if kept else "") + f"; {len(todo)} to render, {t4_estimate(cfg, len(todo))}.")
    if todo and pipe is None:
        pipe = load_generate_pipeline(cfg)
    made: dict[str, tuple[Image.Image, bool]] = {}
    with atomic_dir(out_dir) as tmp, tqdm(total=len(todo), desc="generate",
                                          disable=not progress) as bar:
        _carry_over(out_dir, tmp, kept)
        made.update({file: (_open(tmp / file), starred) for file, starred in kept.items()})
        size = pick_batch_size(cfg, pipe) if todo else 1
        for name in names:  # one style's shots differ only in seed
            style_shots = [s for s in todo if s.style == name]
            for start in range(0, len(style_shots), size):
                batch = style_shots[start:start + size]
                for shot, image in zip(batch, render_batch(batch, pipe)):
                    save_png(image, tmp / _file(shot), shot)
                    made[_file(shot)] = (image, False)
                bar.update(len(batch))
        rows = [{"file": _file(s), **s.row(), "starred": made[_file(s)][1]} for s in shots]
        images = [made[_file(s)][0] for s in shots]
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        grid = image_grid(images, len(names), len(cfg.seeds), row_labels=names,
                          col_labels=[str(s) for s in cfg.seeds], x_name="seed ",
                          title=describe_shot(shots[0], skip=("style", "seed")))
        grid.save(tmp / "grid.png")
        save_config(cfg, tmp / "config.json", lora_sha256=digest,
                    lora_dir=str(lora_dir.resolve()) if lora_dir else None)
    return GenerateResult(out_dir=out_dir, manifest=manifest, images=images, grid=grid)


# Seconds per sampling step (with classifier-free guidance) and per VAE decode on a T4 in fp16,
# at each family's native resolution: a stated estimate from commonly reported T4 speeds.
T4_SECONDS = {"sd15": (512, 0.22, 0.3), "sdxl": (1024, 1.4, 2.5)}


def t4_estimate(cfg: GenerateConfig, n_images: int) -> str:
    """About how long `n_images` take on a free Colab T4, as a sentence."""
    native, per_step, decode = T4_SECONDS[cfg.family]
    scale = (cfg.resolution / native) ** 2
    seconds = n_images * (cfg.steps * per_step + decode) * scale
    when = "under a minute" if seconds < 60 else f"about {seconds / 60:.0f} min"
    return (f"on a T4 GPU {when} ({cfg.steps} steps each at {per_step * scale:.2g} s per step "
            f"at {cfg.resolution} px: an estimate)")


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


def _unchanged(out_dir: Path, digest: str, shots: Sequence[Shot]) -> dict[str, bool]:
    """The images of the pack already in `out_dir` that the same LoRA weights and settings
    made: their files and whether each is starred."""
    try:
        config = json.loads((out_dir / "config.json").read_text())
        manifest = load_manifest(out_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if config.get("lora_sha256") != digest:
        return {}
    old = {row["file"]: row for row in manifest.to_dict("records")}
    kept = {}
    for shot in shots:
        row = old.get(_file(shot))
        if row and (out_dir / _file(shot)).is_file() and all(
                str(row.get(k)) == str(v) for k, v in shot.row().items()):
            kept[_file(shot)] = bool(row["starred"])
    return kept


def _carry_over(out_dir: Path, tmp: Path, kept: Mapping[str, bool]) -> None:
    """Copy the kept images and the user's picks (favourites/, best/) into the new pack."""
    for file in kept:
        (tmp / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out_dir / file, tmp / file)
    for folder in ("favourites", "best"):
        if (out_dir / folder).is_dir():
            shutil.copytree(out_dir / folder, tmp / folder)


def describe_shot(shot: Shot, skip: Sequence[str] = ()) -> str:
    """A short line of the settings not in `skip` (the ones a grid's axes already show)."""
    if "checkpoint" in skip:
        lora = "" if "lora_scale" in skip else f"LoRA x{shot.lora_scale:g}"
    elif not shot.lora_dir:
        lora = "base model"
    else:
        lora = f"LoRA {shot.lora}" + ("" if "lora_scale" in skip else f" x{shot.lora_scale:g}")
    parts = {"style": shot.style, "seed": f"seed {shot.seed}", "steps": f"{shot.steps} steps",
             "guidance": f"CFG {shot.guidance:g}", "scheduler": SAMPLERS[shot.scheduler],
             "lora": lora}
    return ", ".join(v for k, v in parts.items() if v and k not in skip)


# ---------------------------------------------------------------------------------------------
# Reading images back


def read_parameters(png_path: str | Path) -> dict[str, Any]:
    """The settings stored in a PNG's "parameters" chunk, under the manifest's column names."""
    png_path = Path(png_path)
    with Image.open(png_path) as im:
        text = im.info.get("parameters")
    if not text:
        raise ValueError(f"{png_path}: no 'parameters' text chunk. Only PNGs written by "
                         "generate_pack carry one (image editors often strip it).")
    *head, line = text.strip("\n").split("\n")
    params = {k: (json.loads(v) if v.startswith('"') else v)
              for k, v in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)',
                                     line)}
    negative_at = next((i for i, h in enumerate(head) if h.startswith("Negative prompt:")),
                       len(head))
    negative = "\n".join(head[negative_at:])[len("Negative prompt:"):].strip()
    width, height = (int(v) for v in params["Size"].split("x"))
    by_sampler = {v: k for k, v in SAMPLERS.items()}
    return {
        "prompt": "\n".join(head[:negative_at]), "negative_prompt": negative,
        "steps": int(params["Steps"]), "guidance": float(params["CFG scale"]),
        "scheduler": by_sampler.get(params["Sampler"], params["Sampler"]),
        "seed": int(params["Seed"]), "width": width, "height": height,
        "model": params.get("Model", ""), "lora": params.get("Lora", ""),
        "lora_scale": float(params.get("Lora scale", 0.0)),
    }


def _text(value: Any) -> str:
    # pandas reads an empty CSV cell as NaN.
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def shot_from_row(row: Mapping[str, Any], lora_dir: str | Path | None) -> Shot:
    """The Shot a manifest row (or a `read_parameters` dict) describes, LoRA at `lora_dir`."""
    lora = _text(row.get("lora", ""))
    if lora and lora_dir is None:
        raise ValueError(f"This image was made with the LoRA {lora!r}; pass its folder as "
                         "lora_dir.")
    if not lora and lora_dir is not None:
        raise ValueError("This image was made with the base model; pass lora_dir=None.")
    return Shot(style=_text(row.get("style", "")), prompt=_text(row["prompt"]),
                negative_prompt=_text(row["negative_prompt"]), seed=int(row["seed"]),
                steps=int(row["steps"]), guidance=float(row["guidance"]),
                scheduler=str(row["scheduler"]), lora_scale=float(row["lora_scale"]),
                width=int(row["width"]), height=int(row["height"]), model=str(row["model"]),
                family=_text(row.get("family", "")) or "sd15",
                lora_dir=str(lora_dir) if lora_dir is not None else None)


def regenerate(manifest_row: Mapping[str, Any], lora_dir: str | Path | None,
               pipe=None) -> Image.Image:
    """The image a manifest row describes, rendered again (pixel-equal on the same device)."""
    shot = shot_from_row(manifest_row, lora_dir)
    if pipe is None:
        pipe = load_generate_pipeline(GenerateConfig(model=shot.model, family=shot.family))
    return render(shot, pipe)


# ---------------------------------------------------------------------------------------------
# Compare grids


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
        "scheduler": list(SAMPLERS), "checkpoint": [None, *lora_dirs],
        "prompt": [styles[n].prompt for n in names[:3]],
    }[axis]


def _check_axis(axis: str) -> None:
    if axis not in AXES:
        raise ConfigError(f"Unknown axis {axis!r}; choose one of {', '.join(AXES)}.")


def _axis_value(axis: str, value: Any, styles: Mapping[str, Style]) -> Any:
    """`value` converted to the axis's type (values may arrive as text from a widget)."""
    try:
        if axis in ("seed", "steps"):
            return int(value)
        if axis in ("lora_scale", "guidance"):
            return float(value)
    except ValueError:
        raise ConfigError(f"{axis} value {value!r} is not a number.") from None
    if axis == "style" and value not in styles:
        raise ConfigError(f"Unknown style {value!r}; available: {', '.join(styles)}.")
    if axis == "scheduler" and value not in SAMPLERS:
        raise ConfigError(f"Unknown scheduler {value!r}; choose one of {', '.join(SAMPLERS)}.")
    if axis == "checkpoint":
        if value is None or str(value).lower() in ("", "base", "none"):
            return None
        lora_weights(value)
        return str(value)
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
        return [SAMPLERS[v] for v in values]
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
    "prompt" axis replaces the style's prompt (write {subject} where the person goes).
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
        axis_values[axis] = [_axis_value(axis, v, styles) for v in values]
    cfg = with_lora_subject(cfg, next((d for d in lora_dirs if d is not None), None))
    fixed = {"style": (cfg.styles or list(styles))[0], "seed": cfg.seeds[0],
             "checkpoint": lora_dirs[0] if lora_dirs else None}
    if fixed["checkpoint"] is not None:
        check_lora(fixed["checkpoint"], cfg)
    shots = []
    for y_value in axis_values[y]:
        for x_value in axis_values[x]:
            chosen = {**fixed, x: x_value, y: y_value}
            overrides = {k: v for k, v in chosen.items()
                         if k in ("steps", "guidance", "scheduler", "lora_scale", "prompt")}
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
    """The base model (top row) and the LoRA (bottom row) on the same seeds."""
    cfg = cfg or GenerateConfig()
    return compare_grid(lora_dir, "seed", list(seeds or cfg.seeds), "checkpoint",
                        [None, lora_dir], cfg, pipe=pipe, progress=progress)


# ---------------------------------------------------------------------------------------------
# Choosing and keeping images


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


def _copy_ranked(table: pd.DataFrame, column: str, out_dir: Path, folder: str) -> Path:
    """Copy the images named in `table[column]`, in order, into out_dir/folder (replaced whole)."""
    dest = out_dir / folder
    with atomic_dir(dest) as tmp:
        names = []
        for rank, rel in enumerate(table[column], start=1):
            source = out_dir / rel
            if not source.is_file():
                raise FileNotFoundError(f"{source} does not exist; pass the generate stage's "
                                        "folder (the one holding manifest.csv) as out_dir.")
            # The rank prefix keeps the order in any file browser.
            names.append(f"{rank:02d}_{Path(rel).name}")
            shutil.copy2(source, tmp / names[-1])
        table.assign(rank=range(1, len(names) + 1), copy=names).to_csv(tmp / f"{folder}.csv",
                                                                       index=False)
    return dest


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
    dest = _copy_ranked(ranked, column, Path(out_dir), "best")
    if ranked.empty:
        print(f"No face was found in any of the {n_images} images, so {dest} stays empty: "
              "look at the pack (the offline tiny model draws no faces).")
    else:
        print(f"The best {len(ranked)} of {n_images} by {', '.join(by)} are in {dest}.")
    return ranked


def export_starred(out_dir: str | Path) -> Path:
    """Copy the starred images of a pack into out_dir/favourites/ (replacing earlier exports)."""
    manifest = load_manifest(out_dir)
    return _copy_ranked(manifest[manifest["starred"]], "file", Path(out_dir), "favourites")
