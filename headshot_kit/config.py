"""Settings for every stage, and the named presets that bundle them.

One dataclass per stage (`PrepareConfig`, `TrainConfig`, `GenerateConfig`, `EvaluateConfig`).
The notebooks and the CLI build the same objects; a preset is just a named set of them. Every
default carries a comment saying why it is what it is. Nothing heavy is imported here, so the
configs can be built and checked before torch or dlib are loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_checks import (MAX_SIDE, MAX_STEPS, UNET_TARGETS, check_fields,  # noqa: F401
                            on_latent_grid, update_config)
from .errors import ConfigError, DataError, RunFailed  # noqa: F401

HUB_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# The subject words when nothing recorded others: a rare token and the class noun.
DEFAULT_TOKEN, DEFAULT_CLASS = "ohwx", "person"


class _ShownAsTable:
    """A stage config in a notebook: one line naming what differs from the defaults, and every
    setting in a table that opens on a click, instead of a wall of `Config(...)` text."""

    def _repr_html_(self) -> str:
        import html

        defaults = type(self)()
        rows, changed = [], []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            differs = value != getattr(defaults, f.name)
            if differs:
                changed.append(f"{f.name}={value!r}")
            bold = ' style="font-weight:bold"' if differs else ""
            rows.append(f"<tr><td><code>{f.name}</code></td><td{bold}>"
                        f"{html.escape(repr(value))}</td></tr>")
        said = ("changed from the defaults: " + ", ".join(changed)) if changed else \
            "all at their defaults"
        return (f"<details><summary><b>{type(self).__name__}</b>: {len(rows)} settings, "
                f"{html.escape(said)}</summary><table>{''.join(rows)}</table></details>")


@dataclass
class PrepareConfig(_ShownAsTable):
    # 512 is SD 1.5's native resolution; SDXL presets raise it to 1024.
    resolution: int = 512
    # A rare token the tokenizer splits into few pieces, so the LoRA can bind the face to it
    # without overwriting a common word (DreamBooth paper, section 4.1).
    # Recorded in the dataset's config.json: training and generation read the words from there.
    token: str = DEFAULT_TOKEN
    # The class noun: the prior the model already has for "a photo of a person".
    class_name: str = DEFAULT_CLASS
    # Side of the square crop as a multiple of dlib's face box (eyebrows to chin): 2.4 frames
    # head and shoulders, the framing of a professional headshot.
    crop_scale: float = 2.4
    # Move the crop centre down by this fraction of the face box so the shoulders fit.
    crop_shift_down: float = 0.25
    # Faces are found on a copy whose long side is at most this; 12 MP photos stay fast.
    detect_max_side: int = 1024
    # One upsampling pass lets dlib's HOG detector find faces down to about 40 px.
    detect_upsample: int = 1
    # Face distance from the other photos' centroid that earns a warning (a different person
    # is dlib's own same-person distance, faces.DLIB_SAME_PERSON_DISTANCE, 0.6): sample Obama
    # photos lie 0.17-0.25 from their centroid; from 0.5 the likeness is doubtful.
    identity_warn: float = 0.5
    # Refused unread above this: a 60 MP JPEG is ~30 MB; a zip entry inflating past it is a bomb.
    max_file_mb: int = 200
    # Refused before decoding above this (decompression bombs); above 108 MP phone cameras.
    max_pixels: int = 120_000_000
    # Below this no face is findable: dlib's HOG window is 80 px, 40 px after one upsampling.
    min_image_side: int = 40
    # Photos are decoded to a long side of at most this x resolution (JPEG draft): 12 MP at 1/2.
    work_side_factor: float = 3.5
    # Tightest framing (x the face box) before grey padding; tighter loses hair and chin.
    min_crop_scale: float = 1.8
    # A crop more than this fraction grey padding teaches the model grey borders: skip it.
    padding_fail: float = 0.3
    # A face box more than this fraction outside the photo is cut off (obama_partial_face: 0.23).
    max_face_outside: float = 0.1
    # Enlarging the crop by up to 20% is invisible after LANCZOS; beyond it, warn.
    upscale_warn: float = 1.2
    # Enlarging more than 2x trains the model on blur: the face is too small.
    upscale_fail: float = 2.0
    # Sharpness (headshot_kit.quality: Laplacian over intensity variance on the face at 128 px):
    # samples 0.09-0.28, Gaussian blur sigma 2: 0.022.
    sharpness_warn: float = 0.035
    # Gaussian blur sigma 4 on obama2.jpg's 262 px face scores 0.006: clearly unusable.
    sharpness_fail: float = 0.012
    # Face brightness (0 black, 1 white): samples 0.42-0.58, obama2 at half exposure 0.24.
    dark_warn: float = 0.215
    # Obama2 at 0.2x exposure scores 0.094: features lost in noise once brightened.
    dark_fail: float = 0.118
    # Share of face pixels with a channel at 250 or more (highlights_clipped): samples
    # 0.003-0.017, +1 stop 0.69.
    clipped_warn: float = 0.05
    clipped_fail: float = 0.2
    # Contrast, (p95-p5)/(p95+p5) of the face's grey levels: samples 0.44-0.71, contrast 0.3x
    # scores 0.28.
    contrast_warn: float = 0.3
    # Approximate yaw from the 5 landmarks; beyond this the far eye is hidden (dlib's HOG: ~40).
    yaw_warn_deg: float = 35.0
    # Head tilt beyond this makes the model learn tilted heads.
    roll_warn_deg: float = 20.0
    # Photos within this yaw count as facing the camera (for the variety advice).
    frontal_yaw_deg: float = 10.0
    # Eye-region / cheek luminance: samples 0.75-0.77, painted sunglasses 0.33.
    eyes_warn: float = 0.5
    eyes_fail: float = 0.4
    # Differing bits of a 64-bit difference hash: a re-saved copy 0, distinct photos 25-37.
    duplicate_hash_bits: int = 10
    # dlib distance of the same face in two files: re-saved copy 0.02, distinct photos >= 0.25.
    duplicate_face_distance: float = 0.1
    # Fewer usable photos than this gets advice: DreamBooth recipes use 5-20 photos.
    min_photos: int = 5
    # More than this adds training time without adding likeness.
    max_photos: int = 30
    # Rotate each photo so the eyes are level before cropping (off: tilt is part of variety).
    align_roll: bool = False

    def __post_init__(self) -> None:
        check_fields(self)

    def caption(self) -> str:
        return f"a photo of {self.token} {self.class_name}"


@dataclass
class TrainConfig(_ShownAsTable):
    # A hub id (downloaded on Colab) or a local diffusers folder; "tiny-sd15" is built locally.
    model: str = HUB_SD15
    # Which model family (headshot_kit.families) drives the training step: "sd15" or "sdxl".
    family: str = "sd15"
    # SD 1.5 was trained at 512 px; training elsewhere costs likeness.
    resolution: int = 512
    # diffusers' DreamBooth LoRA examples use 500-1000 steps for a face; 800 is the middle.
    steps: int = 800
    # Photos per step: 1 is what every T4 recipe uses; raise grad_accum instead.
    batch_size: int = 1
    # Accumulation gives a larger effective batch without more GPU memory.
    grad_accum: int = 1
    # diffusers' train_dreambooth_lora.py default for SD 1.5.
    lr: float = 5e-4
    # A constant rate, as diffusers' DreamBooth LoRA scripts default to; also
    # "constant_with_warmup", "linear" and "cosine".
    lr_scheduler: str = "constant"
    # Steps over which the rate rises from 0 (with a warmup schedule); 0 = none.
    lr_warmup_steps: int = 0
    # diffusers' default LoRA rank; a low rank also limits the face bleeding onto others.
    rank: int = 4
    # alpha = rank keeps the LoRA scale at 1.0, so lr means the same at every rank.
    alpha: int | None = None
    # Dropout on the LoRA's input; 0 as in diffusers' scripts (a few hundred steps barely
    # over-fit through it).
    lora_dropout: float = 0.0
    # The UNet attention projections: what diffusers' DreamBooth LoRA script adapts.
    target_modules: tuple[str, ...] = UNET_TARGETS
    # bitsandbytes 8-bit AdamW: optimizer state in 1 byte instead of 4 per value. Also "adamw"
    # and "prodigy" (pip install prodigyopt), which takes lr 1.0 and weight decay 1e-4 where
    # lr and adam_weight_decay are left at these AdamW defaults.
    optimizer: str = "adamw8bit"
    # bitsandbytes keeps tensors smaller than this in 32-bit state (its own default).
    optimizer_min_8bit_size: int = 4096
    # diffusers' DreamBooth default for AdamW; Prodigy's recipe uses 1e-4 (see optimizer).
    adam_weight_decay: float = 1e-2
    # "auto": fp16 on a T4 (no bf16 there), bf16 where the GPU has it, fp32 on the CPU.
    mixed_precision: str = "auto"
    # Trades about 30% more compute for far less activation memory: what makes a T4 fit.
    gradient_checkpointing: bool = True
    # Encode every photo once; the VAE then leaves the GPU.
    cache_latents: bool = True
    # Gradient clipping, diffusers' default: one bad batch cannot throw the LoRA far.
    max_grad_norm: float = 1.0
    # Seeds the LoRA's initialisation, the photo order, noise and timesteps: same seed, same run.
    seed: int = 0
    # Min-SNR-gamma loss weighting (Hang et al. 2023): converges faster; HF's SDXL DreamBooth
    # notebook uses 5. None = plain MSE.
    snr_gamma: float | None = 5.0
    # Offset noise lets the model make darker and brighter pictures than mid-grey; 0 = off,
    # 0.05-0.1 is the usual range.
    noise_offset: float = 0.0
    # The loss of a background pixel relative to a face pixel's (the face-and-hair mask the
    # prepare stage writes): 0.1 is OneTrainer's default unmasked_weight; 1.0 = every pixel
    # alike, the plain loss; 0 = the face alone. The weighted loss is normalised per image.
    background_weight: float = 0.1
    # A LoRA on the text encoder(s) too: helps likeness for faces (DreamBooth paper), costs
    # memory because captions are then encoded at every step.
    train_text_encoder: bool = False
    # Prior preservation (DreamBooth): also train on generated "a photo of a person" images so
    # the LoRA does not turn every person into you.
    prior_preservation: bool = False
    # "" = "a photo of a <class>", with the class noun the dataset records.
    class_prompt: str = ""
    # diffusers' DreamBooth default; the paper used 200 x (number of photos).
    num_class_images: int = 100
    # Weight of the class images' loss against the subject's: diffusers' DreamBooth default.
    prior_loss_weight: float = 1.0
    # Where generated class images are kept and reused; "" = a cache shared by runs of a model.
    class_dir: str = ""
    # Sampling steps for class images: quality matters less than variety here.
    class_image_steps: int = 25
    # Where the run's checkpoints go (e.g. a Google Drive folder on Colab); "" = <out>/checkpoints.
    checkpoint_dir: str = ""
    # Save a resumable checkpoint every N steps (0 = only at the end).
    checkpoint_every: int = 100
    # Older checkpoints are deleted beyond this many: Google Drive's free 15 GB fills fast.
    checkpoints_keep: int = 2
    # Continue from the latest checkpoint in checkpoint_dir when there is one.
    resume: bool = True
    # Render validation images every N steps (0 = never) so over-fitting and weak likeness
    # show while training; 100 adds about 5% to an 800-step run.
    validate_every: int = 100
    # Two headshot prompts; {subject} becomes the dataset's subject words.
    validation_prompts: tuple[str, ...] = (
        "a photo of {subject}, corporate headshot, navy background",
        "a photo of {subject}, smiling, outdoors")
    # One seed per prompt keeps validation cheap; the same seeds at every step make rows
    # comparable.
    validation_seeds: tuple[int, ...] = (0,)
    # Sampling steps of each validation render: enough to judge the face, not a final image.
    validation_steps: int = 25
    # Validation images are scored for likeness to the prepared photos with this face network,
    # and the LoRA of the most alike checkpoint is kept in <out>/best/ beside the last one, as
    # EasyPhoto judges checkpoints by face similarity. "auto": ArcFace or FaceNet where
    # installed, else dlib (then evaluate scores with another network, offline SFace); or
    # "dlib", "sface", "arcface", "facenet".
    checkpoint_embedder: str = "auto"
    # Skip a step whose loss is NaN/inf; stop after this many in a row (the run has diverged).
    max_bad_steps: int = 5
    # On a GPU, training first checks that the plan fits (headshot_kit.fitcheck) and refuses
    # when it cannot, naming the cheapest fix; True trains anyway.
    force_fit: bool = False
    # The subject words the captions use; validation prompts fill {subject} with them. "" = the
    # words the prepare stage recorded in the dataset (set it only to double-check them).
    subject: str = ""
    # "auto": the GPU when there is one, else the CPU; or "cpu", "cuda", "cuda:1".
    device: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else self.rank


@dataclass
class GenerateConfig(_ShownAsTable):
    # The base model the LoRA was trained on (a hub id, a local folder or a tiny model).
    model: str = HUB_SD15
    # Its model family: "sd15" or "sdxl".
    family: str = "sd15"
    # Style names from headshot_kit/data/styles.yaml; empty = every style. Ten styles x four
    # seeds: the 40 headshots the paid services deliver.
    styles: list[str] = field(default_factory=lambda: [
        "corporate", "creative", "executive", "linkedin", "studio-white", "office", "outdoor",
        "black-and-white", "tech", "editorial"])
    # One image per style and seed; the same seed gives the same image again.
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # 30 DPM-Solver++ steps is where SD 1.5 stops improving visibly.
    steps: int = 30
    # 7.0 is the usual SD 1.5 guidance: strong prompt adherence without burnt colours.
    guidance: float = 7.0
    # 1.0 applies the LoRA as trained; lower it if every face looks the same.
    lora_scale: float = 1.0
    # The model's native size: 512 px for SD 1.5, 1024 px for SDXL.
    resolution: int = 512
    # The subject words; "" = those recorded in the LoRA's config.json (from the dataset).
    token: str = ""
    # The class noun; "" = the one recorded in the LoRA's config.json.
    class_name: str = ""
    # DPM-Solver++ with Karras sigmas: sharp results in 30 steps; also "euler-a" and "ddim".
    scheduler: str = "dpmpp-karras"
    # Redraw each face at the model's full resolution after the first render (ADetailer's
    # face pass): in a 512 px headshot the face is ~150 px, too few for the eyes and features
    # that carry likeness. Off here, so a plain config renders one pass; the T4 presets turn it
    # on. Only pixels around each face change; an image without a face is kept as rendered.
    face_detail: bool = False
    # Denoising strength of that pass: ADetailer's default 0.4 keeps the face's pose and
    # lighting and redraws its detail; from about 0.6 it drifts from the first render.
    face_detail_strength: float = 0.4
    # Margin around each face as a fraction of its side, on every side, so forehead, hair line
    # and chin are redrawn with the face.
    face_detail_padding: float = 0.35
    # "auto": the GPU when there is one, else the CPU.
    device: str = "auto"
    # Replaces every style's own negative prompt when set; "" keeps each style's.
    negative_prompt: str = ""
    # Folders of the user's own style files (*.yaml), read after the packaged styles.
    style_dirs: list[str] = field(default_factory=list)
    # Use each style's suggested steps/guidance; off so a preset's steps (tiny: 4) hold.
    style_settings: bool = False
    # A few-step LoRA stacked on the face LoRA (headshot_kit.fastpacks): "lcm-lora" renders
    # in 4 steps at guidance 1 with LCMScheduler, as its authors prescribe (about 3x faster on
    # a T4; the negative prompt loses its effect). "" = the full sampler above. How much
    # likeness the face keeps under it is unpublished: `sweep --grid fast_pack=,lcm-lora`.
    fast_pack: str = ""
    # Images per pipeline call; 0 = as many as the GPU's free memory allows (1 on the CPU).
    batch_size: int = 0
    # The LoRA's weights to render with: "best" (the checkpoint whose validation images looked
    # most like you, kept in <lora>/best/; the last weights when training chose none) or
    # "last".
    lora_checkpoint: str = "best"
    # A LoRA learns the difference from the model it was trained on; on another model of its
    # family (an SD 1.5 fine-tune, say) it still loads, but the face comes out less alike.
    # False refuses that mix-up; True allows it on purpose.
    other_base_model: bool = False

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class EvaluateConfig(_ShownAsTable):
    # Which face network scores likeness: "dlib" or "sface" (offline), "arcface" or "facenet"
    # (weights download on Colab), or "auto": the first of ArcFace, FaceNet, dlib and SFace
    # that loads, other
    # than the one that chose the LoRA's checkpoint while another loads (a network that chose
    # a checkpoint flatters its likeness).
    embedder: str = "auto"
    # Upsampling pass so small generated faces are still found.
    detect_upsample: int = 1
    # Face descriptors are computed on a copy whose long side is at most this.
    detect_max_side: int = 1024
    # CLIP for a photo-vs-render score and CLIP-T prompt adherence (DreamBench); downloads on
    # Colab, skipped with a note where it cannot load; "" turns CLIP off.
    clip_model: str = "openai/clip-vit-base-patch32"
    # The headline names this many most-alike images: about what a user keeps from 40.
    best_n: int = 8
    # CLIP (and ArcFace/FaceNet) run on the GPU when there is one; dlib always uses the CPU.
    device: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Preset:
    name: str
    description: str
    prepare: PrepareConfig
    train: TrainConfig
    generate: GenerateConfig
    evaluate: EvaluateConfig
    # True when the model must come from the hub (Colab); False for locally built models.
    needs_download: bool


def _tiny() -> Preset:
    model = "tiny-sd15"
    return Preset(
        name="tiny",
        description="A tiny SD-1.5-architecture model built locally: runs offline on a CPU in "
        "seconds. It shows the plumbing, not pretty pictures.",
        # 256 px keeps faces large enough for dlib to find again in the prepared crops.
        # It learns no face, so 3 photos prove every stage: the bundled samples hold three usable
        # ones (real photos of one person, not copies), and a real preset keeps DreamBooth's 5.
        prepare=PrepareConfig(resolution=256, min_photos=3),
        train=TrainConfig(
            model=model, resolution=64, steps=30, rank=4,
            # A random tiny model learns slowly at SD's 5e-4; 3e-3 makes a 30-step run show it.
            lr=3e-3,
            # The tiny model's LoRA tensors are far below bitsandbytes' 4096-element floor;
            # quantise them anyway so the 8-bit path is the one that runs.
            optimizer_min_8bit_size=0,
            # On the CPU checkpointing only costs time: the tiny model has no memory to save.
            gradient_checkpointing=False,
            checkpoint_every=10, num_class_images=4, class_image_steps=4, validation_steps=4,
            validate_every=15,
        ),
        # Three styles x two seeds: enough to show every stage on a CPU in seconds.
        # The face-detail pass stays off: the tiny model draws no faces for it to find.
        generate=GenerateConfig(model=model, resolution=64, steps=4, seeds=[0, 1],
                                styles=["corporate", "creative", "executive"],
                                face_detail=False),
        # Offline there is no CLIP model to load; likeness and quality need none.
        evaluate=EvaluateConfig(clip_model=""),
        needs_download=False,
    )


def _sd15_t4() -> Preset:
    return Preset(
        name="sd15-t4",
        description="Stable Diffusion 1.5, LoRA on a free Colab T4 (16 GB): photos to 40 "
        "headshots in about 13 minutes (headshot-kit fitcheck --preset sd15-t4 shows the ETA).",
        prepare=PrepareConfig(resolution=512),
        # 500 steps: diffusers' DreamBooth LoRA README trains its SD 1.5 example for
        # max_train_steps=500 (the TrainConfig default, 800, costs 4 more T4 minutes).
        # Validation every 250 steps at 20 sampler steps: two looks at the face (the middle and
        # the end) with likeness scored, instead of five at 25 steps (about a minute saved).
        train=TrainConfig(model=HUB_SD15, family="sd15", resolution=512, steps=500,
                          validate_every=250, validation_steps=20),
        # 20 DPM++ 2M Karras steps: AUTOMATIC1111's default step count, where DPM-Solver++
        # (Lu et al. 2022) has converged for guided sampling; a third less than 30. A real
        # model draws faces: redraw them at full resolution for the likeness.
        generate=GenerateConfig(model=HUB_SD15, family="sd15", resolution=512, steps=20,
                                face_detail=True),
        evaluate=EvaluateConfig(),
        needs_download=True,
    )


def _sdxl_t4() -> Preset:
    return Preset(
        name="sdxl-t4",
        description="Stable Diffusion XL base 1.0, LoRA on a free Colab T4 (16 GB): 1024 px, "
        "8-bit Adam, checkpointing, fp16 with the fp16-fix VAE; photos to 40 headshots in "
        "about 40 minutes (headshot-kit fitcheck --preset sdxl-t4 shows the ETA).",
        prepare=PrepareConfig(resolution=1024),
        # Hugging Face's SDXL DreamBooth LoRA T4 notebook: 1024 px, lr 1e-4, 500 steps; it
        # accumulates 3 micro-batches per step (7.96 s/it there, 66 minutes). Here one: the
        # photos are cached latents and min-SNR weighting steadies the loss, and diffusers'
        # SD 1.5 DreamBooth LoRA recipe (500 steps, batch 1, no accumulation) is the same
        # schedule; a third of the time (about 17 T4 minutes). Sweep grad_accum=1,3 to check
        # the likeness on your photos.
        # Validation every 250 steps at 20 sampler steps, as the SD 1.5 preset.
        train=TrainConfig(model=HUB_SDXL, family="sdxl", resolution=1024, lr=1e-4, steps=500,
                          grad_accum=1, validate_every=250, validation_steps=20),
        # 20 DPM++ 2M Karras steps (see sd15-t4); decoded whole, not in tiles: with the SDXL
        # pipeline on a T4 about 7 GB stay free and a 1024 px decode holds 1.6 GB
        # (placement.tiles_decode).
        generate=GenerateConfig(model=HUB_SDXL, family="sdxl", resolution=1024, guidance=5.0,
                                steps=20, face_detail=True),
        evaluate=EvaluateConfig(),
        needs_download=True,
    )


PRESETS = {"tiny": _tiny, "sd15-t4": _sd15_t4, "sdxl-t4": _sdxl_t4}


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset (callers may change it freely)."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]()


def _check_family(name: str) -> None:
    from .families import FAMILIES  # light: the families import torch only when they run

    _check_choice(name, tuple(FAMILIES), "family")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{what} is {value!r}; choose one of {', '.join(choices)}.")


# Prodigy estimates its own step size and lr only scales it: the advanced SDXL DreamBooth recipe
# (diffusers' examples/advanced_diffusion_training) uses lr 1.0 and weight decay 1e-4.
PRODIGY_LR = 1.0
PRODIGY_WEIGHT_DECAY = 1e-4


def with_optimizer_defaults(cfg: TrainConfig) -> TrainConfig:
    """cfg with Prodigy's own lr and weight decay wherever they are still TrainConfig's AdamW
    defaults; a value someone set is kept (and a too small lr is refused by validate_train)."""
    if cfg.optimizer != "prodigy":
        return cfg
    changes = {}
    if cfg.lr == TrainConfig.lr:
        changes["lr"] = PRODIGY_LR
    if cfg.adam_weight_decay == TrainConfig.adam_weight_decay:
        changes["adam_weight_decay"] = PRODIGY_WEIGHT_DECAY
    return dataclasses.replace(cfg, **changes)


def validate_train(cfg: TrainConfig) -> TrainConfig:
    """Reject settings that cannot work, before any model is loaded."""
    _check_family(cfg.family)
    _check_choice(cfg.optimizer, ("adamw8bit", "adamw", "prodigy"), "optimizer")
    _check_choice(cfg.mixed_precision, ("auto", "no", "fp16", "bf16"), "mixed_precision")
    _check_choice(cfg.lr_scheduler, ("constant", "constant_with_warmup", "linear", "cosine"),
                  "lr_scheduler")
    if cfg.steps < 1:
        raise ConfigError(f"steps is {cfg.steps}; train for at least 1 step.")
    if not on_latent_grid(cfg.resolution):
        raise ConfigError(f"resolution is {cfg.resolution}; use a multiple of 8 (e.g. 512).")
    if cfg.rank < 1:
        raise ConfigError(f"rank is {cfg.rank}; a LoRA needs rank 1 or more (4 is usual).")
    if cfg.lr <= 0:
        raise ConfigError(f"lr is {cfg.lr}; the learning rate must be positive (e.g. 1e-4).")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError("batch_size and grad_accum must both be 1 or more.")
    if cfg.prior_preservation and cfg.num_class_images < 1:
        raise ConfigError("prior_preservation needs num_class_images >= 1 (100 is usual).")
    if cfg.snr_gamma is not None and cfg.snr_gamma <= 0:
        raise ConfigError(f"snr_gamma is {cfg.snr_gamma}; use a positive value (5 is usual) "
                          "or None to switch min-SNR weighting off.")
    if not 0 <= cfg.background_weight <= 1:
        raise ConfigError(f"background_weight is {cfg.background_weight}; use a value from 0 "
                          "(the face alone) to 1 (every pixel alike, the plain loss).")
    if cfg.optimizer == "prodigy" and cfg.lr < 0.1 and cfg.lr != TrainConfig.lr:
        raise ConfigError(f"optimizer='prodigy' with lr={cfg.lr}: Prodigy finds its own step "
                          f"size and lr multiplies it, so this would barely train. Set "
                          f"lr={PRODIGY_LR}, as the published Prodigy recipe does.")
    if cfg.device == "cpu" and cfg.mixed_precision == "fp16":
        raise ConfigError("mixed_precision='fp16' needs a GPU; on the CPU use 'no' or 'auto'.")
    return cfg


def validate_generate(cfg: GenerateConfig) -> GenerateConfig:
    _check_family(cfg.family)
    _check_choice(cfg.lora_checkpoint, ("best", "last"), "lora_checkpoint")
    if not on_latent_grid(cfg.resolution):
        raise ConfigError(f"resolution is {cfg.resolution}; use a multiple of 8 (e.g. 512).")
    if cfg.steps < 1:
        raise ConfigError(f"steps is {cfg.steps}; use at least 1 sampling step (30 is usual).")
    if not cfg.seeds:
        raise ConfigError("seeds is empty; give at least one seed, e.g. [0, 1, 2, 3].")
    return cfg


def agree(setting: str, value: Any, recorded: Any, source: str | Path, fix: str = "") -> Any:
    """The value a data folder recorded; an explicit setting must match it, never win over it.

    An unset setting ("" or None) takes the recorded value."""
    if value in ("", None) or value == recorded:
        return recorded
    raise ConfigError(f"{setting} is {value!r}, but {source} records {recorded!r}. Leave "
                      f"{setting.split('.')[-1]} unset to use the recorded value"
                      f"{fix or f', or set it to {recorded!r}'}.")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any) -> str:
    """A short, stable fingerprint of a config (or a dict of settings), to tell runs apart."""
    data = cfg if isinstance(cfg, dict) else to_dict(cfg)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def save_config(cfg: Any, path: str | Path, **extra: Any) -> Path:
    """Write the resolved config next to a run's results, so results trace to settings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"config_type": type(cfg).__name__, **to_dict(cfg), **extra}
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path
