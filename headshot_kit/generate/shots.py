"""One image: the settings that decide it (a `Shot`), and rendering it again exactly.

The noise of every image comes from a CPU `torch.Generator` seeded for that image alone, so
the same Shot gives the same picture on the same device, batched or not; each PNG carries its
Shot in the AUTOMATIC1111 "parameters" text chunk (with the hashes and keys A1111/Forge,
ADetailer and Civitai read: formats.py), which `read_parameters` reads back, also from PNGs
written before those were added. A Shot
with a face-detail strength is rendered in two steps: the first render, then the face pass
(facedetail.py) with the same prompt, seed, guidance, sampler and LoRA.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import re
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, PngImagePlugin

from ..config import (DEFAULT_CLASS, DEFAULT_TOKEN, MAX_SIDE, MAX_STEPS, ConfigError,
                      GenerateConfig, agree, on_latent_grid, validate_generate)
from ..facedetail import (FaceDetailResult, FacePass, detail_faces, detail_parameters,
                          image_to_image, read_detail_parameters)
from ..families import get_family
from ..formats import lora_short_hash, lora_tag, model_short_hash, split_lora_tags
from ..lora import (LORA_WEIGHTS, LoraFileError, check_lora_file, check_lora_loaded,
                    lora_weights, pick_checkpoint, read_lora_record, ui_weights)
from ..placement import DECODE_TILE, UNTILED_DECODE_BYTES_1024, tiles_decode  # noqa: F401
from ..storage import atomic_path
from ..styles import Style


@dataclass(frozen=True)
class Sampler:
    """A sampler: the name AUTOMATIC1111 writes for it, and diffusers' scheduler for it."""

    a1111: str
    scheduler: str
    options: Mapping[str, Any] = field(default_factory=dict)


# Our scheduler names (GenerateConfig.scheduler), each with its sampler.
SAMPLERS = {
    # DPM-Solver++ 2M with Karras sigmas: sharp results in 30 steps.
    "dpmpp-karras": Sampler("DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                            {"algorithm_type": "dpmsolver++", "solver_order": 2,
                             "use_karras_sigmas": True}),
    "euler-a": Sampler("Euler a", "EulerAncestralDiscreteScheduler"),
    # DDIM's own default clips samples to [-1, 1], which is wrong for latents.
    "ddim": Sampler("DDIM", "DDIMScheduler", {"clip_sample": False}),
    # Latent consistency sampling: what LCM-LoRA's authors prescribe (fastpacks).
    "lcm": Sampler("LCM", "LCMScheduler"),
}


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
    # Denoising strength of the face-detail pass; 0 = no pass.
    face_detail_strength: float = 0.0
    # Its margin around each face (a fraction of the face's side); 0 while the pass is off,
    # so that a padding setting with the pass off changes no Shot.
    face_detail_padding: float = 0.0
    # The few-step LoRA stacked on the face LoRA (fastpacks.FAST_PACKS); "" = none.
    fast_pack: str = ""

    def __post_init__(self):
        # Floats, as the manifest reads them back: an unchanged image is recognised by its row.
        strength = float(self.face_detail_strength)
        object.__setattr__(self, "face_detail_strength", strength)
        object.__setattr__(self, "face_detail_padding",
                           float(self.face_detail_padding) if strength else 0.0)

    @property
    def lora_name(self) -> str:
        """The LoRA's name (the manifest's "lora" column): its UI file's (what
        `<lora:NAME:1>` names in A1111), else its folder's; "" for the base model."""
        if not self.lora_dir:
            return ""
        ui = ui_weights(self.lora_dir)
        return ui.stem if ui is not None else Path(self.lora_dir).name

    def parameters(self, face_detail_note: str = "") -> str:
        """The settings as AUTOMATIC1111 writes them, so that A1111/Forge accept them on paste
        and Civitai links the model and LoRA: the checkpoint's hash, the LoRA as a
        `<lora:NAME:WEIGHT>` tag in the prompt with its hash, the face pass under ADetailer's
        keys; with what the face-detail pass did."""
        fields = {"Steps": self.steps, "Sampler": SAMPLERS[self.scheduler].a1111,
                  "CFG scale": self.guidance, "Seed": self.seed,
                  "Size": f"{self.width}x{self.height}"}
        model_hash = model_short_hash(self.model)
        if model_hash:
            fields["Model hash"] = model_hash
        fields["Model"] = self.model
        prompt = self.prompt
        if self.lora_dir:
            prompt = f"{prompt} {lora_tag(self.lora_name, self.lora_scale)}"
            ui = ui_weights(self.lora_dir)
            if ui is not None:
                fields["Lora hashes"] = f"{self.lora_name}: {lora_short_hash(ui)}"
        if self.fast_pack:
            fields["Fast pack"] = self.fast_pack
        fields.update(detail_parameters(self.face_detail_strength, self.face_detail_padding,
                                        face_detail_note))
        line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items())
        return f"{prompt}\nNegative prompt: {self.negative_prompt}\n{line}"

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        del row["lora_dir"]
        return {**row, "lora": self.lora_name}


def make_shot(cfg: GenerateConfig, style: Style, seed: int, lora_dir: str | Path | None,
              **overrides: Any) -> Shot:
    """The Shot for `style` and `seed` under `cfg`; `overrides` set any Shot field directly
    (face_detail_strength=0.4 turns the pass on at cfg's padding even where cfg has it off)."""
    suggest = cfg.style_settings
    settings = dict(
        style=style.name,
        prompt=style.prompt,
        negative_prompt=cfg.negative_prompt or style.negative_prompt,
        seed=int(seed),
        steps=style.steps if suggest and style.steps else cfg.steps,
        guidance=float(style.guidance if suggest and style.guidance else cfg.guidance),
        # Without a LoRA the scale is recorded as 0, as the PNG (with no "Lora scale") reads back.
        scheduler=cfg.scheduler, lora_scale=float(cfg.lora_scale) if lora_dir else 0.0,
        width=cfg.resolution, height=cfg.resolution, model=cfg.model, family=cfg.family,
        lora_dir=str(lora_dir) if lora_dir else None,
        face_detail_strength=float(cfg.face_detail_strength) if cfg.face_detail else 0.0,
        face_detail_padding=float(cfg.face_detail_padding))
    from ..fastpacks import active_pack, get_fast_pack

    if active_pack(cfg.fast_pack):
        # The few-step LoRA's prescribed sampler, steps and guidance replace the config's.
        pack = get_fast_pack(active_pack(cfg.fast_pack))
        settings.update(fast_pack=pack.name, scheduler=pack.scheduler, steps=pack.steps,
                        guidance=float(pack.guidance))
    # One Shot from settings and overrides together: the padding drops to 0 only if the
    # strength that ends up in the Shot is 0.
    shot = Shot(**{**settings, **overrides})
    return replace(shot, prompt=fill_subject(shot.prompt, cfg))


def fill_subject(template: str, cfg: GenerateConfig) -> str:
    """Put the trained words ("ohwx person") where the template says {subject}."""
    token, class_name = cfg.token or DEFAULT_TOKEN, cfg.class_name or DEFAULT_CLASS
    return template.replace("{subject}", f"{token} {class_name}")


def with_lora_subject(cfg: GenerateConfig, lora_dir: str | Path | None) -> GenerateConfig:
    """`cfg` with the subject words the LoRA was trained on (its config.json records them);
    a token or class_name setting that names other words is refused."""
    recorded = read_lora_record(lora_dir) if lora_dir is not None else None
    if recorded is None or recorded.token is None:
        return cfg  # the base model, or a LoRA from elsewhere: the settings hold
    fix = ", or train a LoRA on a dataset prepared with those words"
    return replace(cfg, token=agree("GenerateConfig.token", cfg.token, recorded.token,
                                    recorded.path, fix),
                   class_name=agree("GenerateConfig.class_name", cfg.class_name,
                                    recorded.class_name, recorded.path, fix))


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
    if cfg.face_detail:
        check_face_detail_strength(cfg.face_detail_strength, "face_detail_strength")
        if not cfg.face_detail_strength:
            raise ConfigError("face_detail is on but face_detail_strength is 0, which redraws "
                              "nothing; set a strength (0.4 is ADetailer's default) or "
                              "face_detail=False.")
    if cfg.face_detail_padding < 0:
        raise ConfigError(f"face_detail_padding is {cfg.face_detail_padding}; use 0 or more "
                          "(0.35 adds a third of the face on each side).")
    return names


def check_face_detail_strength(strength: float, what: str) -> float:
    """Refuse a face-detail strength outside 0-1 (an img2img denoising strength)."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"{what} is {strength:g}; use a denoising strength from 0 (off) to 1 "
                          "(0.4 is ADetailer's default).")
    return strength


# The model's own scheduler config, per pipeline, as it was before the first render here: each
# render replaces pipe.scheduler, and a sampler built from another sampler's config would
# inherit that one's defaults (Euler a has no set_alpha_to_one, so DDIM would come back with
# its own default True instead of the model's False, and a DDIM image would depend on what
# rendered before it).
_MODEL_SCHEDULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_schedule(pipe) -> Mapping[str, Any]:
    if pipe not in _MODEL_SCHEDULES:
        _MODEL_SCHEDULES[pipe] = dict(pipe.scheduler.config)
    return _MODEL_SCHEDULES[pipe]


def make_scheduler(name: str, base_config: Mapping[str, Any]):
    """A fresh scheduler of kind `name` on the model's own noise schedule.

    Only the noise-schedule keys are carried over, so switching samplers never leaks one
    sampler's options (Karras sigmas, say) into the next.
    """
    import diffusers

    if name not in SAMPLERS:
        raise ConfigError(f"scheduler is {name!r}; choose one of {', '.join(SAMPLERS)}.")
    sampler = SAMPLERS[name]
    cls = getattr(diffusers, sampler.scheduler)
    accepted = inspect.signature(cls.__init__).parameters
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "prediction_type", "steps_offset", "timestep_spacing", "set_alpha_to_one")
    base = {k: base_config[k] for k in keys if k in base_config and k in accepted}
    return cls(**base, **sampler.options)


def check_lora(lora_dir: str | Path | None, cfg: GenerateConfig) -> Path | None:
    """The LoRA folder to render with (its best/ checkpoint when `cfg.lora_checkpoint` says
    so and training chose one); a missing LoRA, or one trained for another model family or
    another base model (unless `cfg.other_base_model` allows it), is refused before any
    rendering."""
    if lora_dir is None:
        return None
    lora_weights(lora_dir)
    lora_dir = pick_checkpoint(lora_dir, cfg.lora_checkpoint)
    check_lora_file(lora_weights(lora_dir))
    recorded = read_lora_record(lora_dir)
    trained, family, model = recorded.path, recorded.family, recorded.model
    if family and family != cfg.family:
        raise ConfigError(f"{trained}: this LoRA was trained for family {family!r} but "
                          f"GenerateConfig.family is {cfg.family!r}; set family={family!r} "
                          "and a matching model.")
    if model and model != cfg.model and not cfg.other_base_model:
        raise ConfigError(f"{trained}: this LoRA was trained on {model!r} but "
                          f"GenerateConfig.model is {cfg.model!r}; set model={model!r}, or "
                          "other_base_model=True to use it on another model of its family on "
                          "purpose (the face comes out less alike).")
    return Path(lora_dir)


def use_lora(pipe, lora_dir: str | Path | None, scale: float, fast_pack: str = "",
             family: str = "sd15") -> None:
    """Make `lora_dir` the pipeline's active LoRA at `scale` (None: the base model), with the
    few-step LoRA `fast_pack` stacked on it through diffusers' multi-adapter API
    (`set_adapters` with one weight per adapter), or turn LoRAs off.

    Each LoRA is loaded once per pipeline, under a name derived from its file's path and
    modification time, so switching back and forth is free and a retrained LoRA is reloaded.
    """
    loaded = {name for names in pipe.get_list_adapters().values() for name in names}
    active, strengths = [], []
    if fast_pack:
        from ..fastpacks import get_fast_pack, load_fast_pack

        active.append(load_fast_pack(pipe, fast_pack, family))
        strengths.append(get_fast_pack(fast_pack).weight)
    if lora_dir is None:
        if active:
            pipe.enable_lora()
            pipe.set_adapters(active, adapter_weights=strengths)
        elif loaded:
            pipe.disable_lora()
        return
    weights = lora_weights(lora_dir)
    stat = weights.stat()
    key = f"{weights.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    # Adapter names become module keys, which may not contain dots.
    name = "lora_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    if name not in loaded:
        check_lora_file(weights)
        try:
            pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHTS, adapter_name=name)
        except ValueError as exc:  # peft: not one of its layers is in the model
            raise LoraFileError(f"{weights}: its LoRA layers match no layer of the model "
                                f"({str(exc).splitlines()[0][:160]}); use a LoRA trained on "
                                "this base model.") from None
        try:
            check_lora_loaded(pipe, name, weights)
        except LoraFileError:
            pipe.delete_adapters([name])
            raise
    pipe.enable_lora()
    pipe.set_adapters([name, *active], adapter_weights=[scale, *strengths])


def load_generate_pipeline(cfg: GenerateConfig):
    """The pipeline for `cfg.model`: fp16 on a GPU, fp32 on the CPU, VAE memory savers on a GPU."""
    from ..models import load_pipeline, pick_device, pick_dtype

    device = pick_device(cfg.device)
    pipe = load_pipeline(cfg.model, cfg.family, device=device,
                         dtype=pick_dtype(device, "no" if device == "cpu" else "fp16"))
    if device.startswith("cuda"):
        save_decode_memory(pipe, cfg.family, cfg.resolution)
    return pipe


def save_decode_memory(pipe, family: str, resolution: int | None = None) -> None:
    """Decode a batch one image at a time (what pick_batch_size counts on, for every family)
    and in tiles where the family asks for it and the GPU's free memory is too small for one
    decode at once (tiles_decode)."""
    import torch

    pipe.vae.enable_slicing()
    resolution = resolution or get_family(family).native_resolution
    free = torch.cuda.mem_get_info(pipe.device)[0] if pipe.device.type == "cuda" else math.inf
    if tiles_decode(family, resolution, free):
        pipe.vae.enable_tiling()
    else:
        pipe.vae.disable_tiling()


def render(shot: Shot, pipe) -> Image.Image:
    """One image for `shot`: the same shot gives the same pixels on the same device."""
    return render_batch([shot], pipe)[0].image


def render_batch(shots: Sequence[Shot], pipe) -> list[FaceDetailResult]:
    """Images for shots that differ only in seed, in one pipeline call, then each through the
    face-detail pass where its Shot asks for it; each with the pass's note.

    Each image draws its starting noise from its own seeded CPU generator, so batching changes
    no image's noise; on the CPU the pixels are the same as one at a time.
    """
    first = shots[0]
    if any(dataclasses.replace(s, seed=first.seed) != first for s in shots):
        raise ValueError("render_batch takes shots that differ only in their seed.")
    # Set here, not in first_render: the face pass shares the pipeline's LoRA'd weights.
    use_lora(pipe, first.lora_dir, first.lora_scale, first.fast_pack, first.family)
    pipe.scheduler = make_scheduler(first.scheduler, model_schedule(pipe))
    # Our own bars count images; diffusers' per-step bar would only add noise.
    pipe.set_progress_bar_config(disable=True)
    images = first_render(shots, pipe)
    return [detail_shot(shot, image, pipe) for shot, image in zip(shots, images)]


def first_render(shots: Sequence[Shot], pipe) -> list[Image.Image]:
    """The text-to-image call for `shots` (one style, several seeds) on a pipeline whose LoRA
    and scheduler are already set."""
    import torch

    first = shots[0]
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in shots]
    with torch.inference_mode():
        result = pipe(prompt=[first.prompt] * len(shots),
                      negative_prompt=[first.negative_prompt] * len(shots),
                      num_inference_steps=first.steps, guidance_scale=first.guidance,
                      width=first.width, height=first.height, generator=generators)
    return result.images


def detail_shot(shot: Shot, image: Image.Image, pipe) -> FaceDetailResult:
    """`image` through the face-detail pass as `shot` sets it (unchanged, with no note, when
    its strength is 0): image-to-image on `pipe`'s weights, with the shot's prompt, seed,
    guidance, steps and sampler, at the model's resolution."""
    import torch

    if not shot.face_detail_strength:
        return FaceDetailResult(image)
    img2img = image_to_image(pipe)
    # A fresh scheduler of the shot's kind: a used one carries state from its last run.
    img2img.scheduler = make_scheduler(shot.scheduler, model_schedule(pipe))
    with torch.inference_mode():
        return detail_faces(image, img2img, FacePass(
            shot.prompt, seed=shot.seed, resolution=min(shot.width, shot.height),
            steps=shot.steps, strength=shot.face_detail_strength,
            padding=shot.face_detail_padding, negative_prompt=shot.negative_prompt,
            guidance=shot.guidance))


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


def save_png(image: Image.Image, path: str | Path, shot: Shot,
             face_detail_note: str = "") -> Path:
    """Write `image` atomically with its settings (and what the face pass did) in the PNG
    "parameters" text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", shot.parameters(face_detail_note))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def _quote(value: Any) -> str:
    # AUTOMATIC1111 quotes values that would break its "key: value, " line.
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


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
    by_sampler = {v.a1111: k for k, v in SAMPLERS.items()}
    strength, padding, note = read_detail_parameters(params, GenerateConfig.face_detail_padding)
    prompt, tags = split_lora_tags("\n".join(head[:negative_at]))
    # The LoRA is the prompt's <lora:NAME:WEIGHT> tag; PNGs written before it named it in
    # "Lora" and "Lora scale".
    lora, scale = tags[0] if tags else (params.get("Lora", ""), params.get("Lora scale", 0.0))
    return {
        "prompt": prompt, "negative_prompt": negative,
        "steps": int(params["Steps"]), "guidance": float(params["CFG scale"]),
        "scheduler": by_sampler.get(params["Sampler"], params["Sampler"]),
        "seed": int(params["Seed"]), "width": width, "height": height,
        "model": params.get("Model", ""), "lora": lora, "lora_scale": float(scale),
        "face_detail_strength": strength, "face_detail_padding": padding,
        "face_detail_note": note, "fast_pack": params.get("Fast pack", ""),
    }


def cell_text(value: Any) -> str:
    # pandas reads an empty CSV cell as NaN.
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def shot_from_row(row: Mapping[str, Any], lora_dir: str | Path | None) -> Shot:
    """The Shot a manifest row (or a `read_parameters` dict) describes, LoRA at `lora_dir`."""
    lora = cell_text(row.get("lora", ""))
    if lora and lora_dir is None:
        raise ValueError(f"This image was made with the LoRA {lora!r}; pass its folder as "
                         "lora_dir.")
    if not lora and lora_dir is not None:
        raise ValueError("This image was made with the base model; pass lora_dir=None.")
    return check_shot(Shot(style=cell_text(row.get("style", "")), prompt=cell_text(row["prompt"]),
                negative_prompt=cell_text(row["negative_prompt"]), seed=int(row["seed"]),
                steps=int(row["steps"]), guidance=float(row["guidance"]),
                scheduler=str(row["scheduler"]), lora_scale=float(row["lora_scale"]),
                width=int(row["width"]), height=int(row["height"]), model=str(row["model"]),
                family=cell_text(row.get("family", "")) or "sd15",
                lora_dir=str(lora_dir) if lora_dir is not None else None,
                # A manifest from before the face-detail pass has no such columns: no pass.
                face_detail_strength=float(cell_text(row.get("face_detail_strength")) or 0),
                face_detail_padding=float(cell_text(row.get("face_detail_padding")) or 0),
                fast_pack=cell_text(row.get("fast_pack", ""))))


def check_shot(shot: Shot) -> Shot:
    """Refuse a Shot read from a file made elsewhere (a PNG, a manifest) that asks for more
    than a render can give: a size, steps or sampler outside the settings' own limits."""
    problems = []
    if not all(8 <= side <= MAX_SIDE and on_latent_grid(side)
               for side in (shot.width, shot.height)):
        problems.append(f"size {shot.width}x{shot.height} (at most {MAX_SIDE} px a side, a "
                        "multiple of 8)")
    if not 1 <= shot.steps <= MAX_STEPS:
        problems.append(f"{shot.steps} steps (1 to {MAX_STEPS})")
    if shot.scheduler not in SAMPLERS:
        problems.append(f"sampler {shot.scheduler!r} (one of {', '.join(SAMPLERS)})")
    for name, value, low, high in (("guidance", shot.guidance, 0, 50),
                                   ("LoRA scale", shot.lora_scale, -10, 10),
                                   ("face-detail strength", shot.face_detail_strength, 0, 1),
                                   ("face-detail padding", shot.face_detail_padding, 0, 5),
                                   ("seed", shot.seed, 0, 2 ** 64 - 1)):
        if not (math.isfinite(value) and low <= value <= high):
            problems.append(f"{name} {value} ({low} to {high})")
    if problems:
        raise ConfigError(f"The image's settings ask for {'; '.join(problems)}: outside what "
                          "the workbench renders. Fix them in the row (or use settings of your "
                          "own) and try again.")
    return shot


def describe_shot(shot: Shot, skip: Sequence[str] = ()) -> str:
    """A short line of the settings not in `skip` (the ones a grid's axes already show)."""
    if "checkpoint" in skip:
        lora = "" if "lora_scale" in skip else f"LoRA x{shot.lora_scale:g}"
    elif not shot.lora_dir:
        lora = "base model"
    else:
        lora = f"LoRA {shot.lora_name}" + ("" if "lora_scale" in skip
                                           else f" x{shot.lora_scale:g}")
    parts = {"style": shot.style, "seed": f"seed {shot.seed}", "steps": f"{shot.steps} steps",
             "guidance": f"CFG {shot.guidance:g}", "scheduler": SAMPLERS[shot.scheduler].a1111,
             "lora": lora, "face_detail": face_detail_label(shot.face_detail_strength)
             if shot.face_detail_strength else ""}
    return ", ".join(v for k, v in parts.items() if v and k not in skip)


def face_detail_label(strength: float) -> str:
    """How grids and titles name a face-detail strength."""
    return f"face detail {strength:g}" if strength else "face detail off"
