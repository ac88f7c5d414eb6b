"""Fine-tune: teach a diffusion model one face with a DreamBooth-style LoRA.

Reads the prepare stage's folder (`metadata.jsonl` + images), trains a peft LoRA on the UNet's
attention projections (and optionally the text encoders), and writes a diffusers-format
`pytorch_lora_weights.safetensors`, a kohya/A1111/ComfyUI copy, `config.json`, `metrics.csv`,
the loss curve, validation grids and a model card. accelerate handles device and precision;
bitsandbytes' 8-bit AdamW keeps the optimizer state at one byte per value.

Each failure Colab users keep reporting has its fix built in:
- out of GPU memory: latents and text embeddings are computed once and the VAE and text
  encoders leave the GPU; gradient checkpointing; PyTorch SDPA attention (no xformers);
- "Attempting to unscale FP16 gradients": trainable LoRA weights stay fp32 under an fp16 model;
- bitsandbytes failing to load: detected (by one real step), explained, torch AdamW used with
  its memory cost said;
- disconnects: atomic, resumable checkpoints to a folder you choose (e.g. Google Drive), and a
  resumed run continues exactly where it stopped, the fp16 loss scale included;
- a T4's fp16: validation renders under autocast, skipped fp16 updates are recorded, and a
  failed run hands its GPU memory back before the retry;
- NaN losses: the step is skipped and reported; several in a row stop the run with advice.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import models
from .config import (DEFAULT_CLASS, DEFAULT_TOKEN, HUB_SDXL_FP16_VAE, ConfigError, DataError,
                     TrainConfig, agree, config_hash, save_config, to_dict, validate_train,
                     with_optimizer_defaults)
from .families import Conditioning, get_family
from .fitcheck import cache_chunk, check_before_training, parked_after_caching
from .images import centre_square, image_grid, list_images, load_image
from .storage import atomic_dir, atomic_path, atomic_write_text, same_safetensors

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
# Elements of the tensor that proves the 8-bit optimizer runs: a few of bitsandbytes' 256-value
# quantisation blocks.
BNB_PROBE_SIZE = 1024
# Settings a checkpoint must share with the run that resumes it: anything else can change
# (e.g. more steps). The optimizer that ran is checked too (its state fits no other).
RESUME_KEYS = ("model", "family", "rank", "alpha", "target_modules", "train_text_encoder",
               "resolution", "prior_preservation")
# Settings a resumed run may change: none of them shapes the weights already trained.
FREE_ON_RESUME = ("steps", "resume", "checkpoint_dir", "checkpoint_every", "checkpoints_keep",
                  "validate_every", "validation_prompts", "validation_seeds", "validation_steps",
                  "max_bad_steps", "force_fit", "device", "class_dir")


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN/inf for several steps in a row."""


@dataclass
class TrainExample:
    image: Path
    caption: str


@dataclass
class TrainResult:
    out_dir: Path
    lora_path: Path
    metrics: pd.DataFrame
    optimizer: str  # the optimizer that actually ran, e.g. "bitsandbytes AdamW8bit"
    seconds: float
    skipped_steps: int = 0

    def plot(self):
        from .images import plot_loss

        return plot_loss(self.metrics.dropna(subset=["loss"]),
                         title=f"Training loss ({self.optimizer})")


# ---------------------------------------------------------------------------------------------
# Data


def load_dataset(data_dir: str | Path) -> list[TrainExample]:
    """The (image, caption) pairs of a prepared dataset folder."""
    data_dir = Path(data_dir)
    meta = data_dir / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: {data_dir} is not a prepared dataset. Run "
                                "the prepare stage first (notebook 01 or `headshot-kit prepare`).")
    examples = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append(TrainExample(data_dir / row["file_name"], row["text"]))
        except (json.JSONDecodeError, KeyError) as exc:
            raise DataError(f"{meta}, line {n}: expected JSON with 'file_name' and 'text' "
                             f"({exc}). Re-run the prepare stage.") from None
    missing = [e.image for e in examples if not e.image.is_file()]
    if missing:
        raise FileNotFoundError(f"{meta} lists images that are missing: "
                                f"{', '.join(map(str, missing[:3]))}. Re-run the prepare stage.")
    if not examples:
        raise DataError(f"{meta} lists no images: every photo was rejected. Read "
                        f"{data_dir / 'report.csv'} for why, add usable photos and run the "
                        "prepare stage again.")
    return examples


def dataset_subject(data_dir: str | Path) -> tuple[str, str]:
    """The token and class noun the prepare stage recorded in the dataset's config.json."""
    path = Path(data_dir) / "config.json"
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    return recorded.get("token", DEFAULT_TOKEN), recorded.get("class_name", DEFAULT_CLASS)


def with_dataset_subject(cfg: TrainConfig, data_dir: str | Path) -> TrainConfig:
    """`cfg` with the subject words and class prompt of the dataset; a setting that names other
    words is refused (captions, validation and generation must all say the same thing)."""
    token, class_name = dataset_subject(data_dir)
    source = Path(data_dir) / "config.json"
    fix = ", or prepare the photos again with the token and class_name you want"
    subject = agree("TrainConfig.subject", cfg.subject, f"{token} {class_name}", source, fix)
    class_prompt = cfg.class_prompt or f"a photo of a {class_name}"
    if class_name not in class_prompt.split():
        raise ConfigError(f"TrainConfig.class_prompt {class_prompt!r} does not name the class "
                          f"{class_name!r} that {source} records; leave class_prompt unset, or "
                          f"write one with {class_name!r} in it.")
    return dataclasses.replace(cfg, subject=subject, class_prompt=class_prompt)


def image_tensor(path: Path, resolution: int) -> torch.Tensor:
    """A photo as a (3, H, W) tensor in [-1, 1], centre-cropped and resized to `resolution`."""
    image = centre_square(load_image(path), resolution)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def class_image_dir(cfg: TrainConfig) -> Path:
    if cfg.class_dir:
        return Path(cfg.class_dir)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.model)
    prompt = "".join(c if c.isalnum() else "_" for c in cfg.class_prompt)[:40]
    return models.cache_dir() / "class_images" / f"{safe}-{cfg.resolution}px-{prompt}"


def ensure_class_images(pipe, cfg: TrainConfig, progress: bool = True) -> list[Path]:
    """The prior-preservation images, generated by the base model the first time only."""
    folder = class_image_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    have = list_images(folder)
    missing = cfg.num_class_images - len(have)
    if missing > 0:
        for i in tqdm(range(len(have), cfg.num_class_images), desc="class images",
                      disable=not progress):
            image = pipe(cfg.class_prompt, num_inference_steps=cfg.class_image_steps,
                         height=cfg.resolution, width=cfg.resolution,
                         generator=torch.Generator().manual_seed(10_000 + i)).images[0]
            with atomic_path(folder / f"class_{i:05d}.png") as tmp:
                image.save(tmp, format="PNG")
    return list_images(folder)[: cfg.num_class_images]


# ---------------------------------------------------------------------------------------------
# Optimizer, LoRA, saving


def make_optimizer(params, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, str]:
    """bitsandbytes' AdamW8bit when asked for and loadable (else torch AdamW with a warning),
    Prodigy when asked for, or torch AdamW."""
    if cfg.optimizer == "adamw8bit":
        try:
            return adamw8bit(params, cfg), "bitsandbytes AdamW8bit"
        except Exception as exc:  # bitsandbytes fails in many ways when CUDA libraries move
            warnings.warn(
                f"bitsandbytes could not load ({type(exc).__name__}: {exc}); training with torch "
                "AdamW instead. Its optimizer state takes 8 bytes per trainable value instead "
                "of 2: small for a LoRA, about 5 GB more for a full SD 1.5 UNet. Fix: "
                "`pip install -U bitsandbytes` and restart the runtime.", stacklevel=2)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer='prodigy' needs its package: `pip install prodigyopt`, "
                              "or choose adamw8bit.") from None
        # Prodigy estimates its own step size: lr is a multiplier, 1.0 as the advanced SDXL
        # DreamBooth recipe uses.
        return Prodigy(params, lr=cfg.lr, weight_decay=cfg.adam_weight_decay,
                       safeguard_warmup=True, use_bias_correction=True), "Prodigy"
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.adam_weight_decay), "torch AdamW"


def adamw8bit(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit for `params`, once it has been seen to step.

    bitsandbytes 0.50 loads its native library at the first optimizer step, not at import or
    construction, so a broken install would otherwise pass here and crash the run at step 1.
    One step on a throwaway tensor on the parameters' device runs the same 8-bit kernels first.
    """
    import bitsandbytes as bnb

    probe = torch.nn.Parameter(torch.zeros(BNB_PROBE_SIZE, device=params[0].device))
    probe.grad = torch.ones_like(probe)
    bnb.optim.AdamW8bit([probe], lr=cfg.lr, min_8bit_size=0).step()
    return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.adam_weight_decay,
                               min_8bit_size=cfg.optimizer_min_8bit_size)


def optimizer_state_dtypes(optimizer: torch.optim.Optimizer) -> set[torch.dtype]:
    """The dtypes of every tensor the optimizer keeps as state (uint8 for 8-bit Adam)."""
    return {v.dtype for state in optimizer.state.values() for v in state.values()
            if torch.is_tensor(v) and v.numel() > 1}


def add_lora(module, rank: int, alpha: int, dropout: float,
             targets: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Attach a fresh peft LoRA to `module`; return its trainable parameters, made fp32."""
    from peft import LoraConfig

    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                  init_lora_weights="gaussian", target_modules=list(targets)))
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"target_modules {targets} matched no layer of "
                          f"{type(module).__name__}; for the UNet use the attention "
                          "projections ('to_q', 'to_k', 'to_v', 'to_out.0').")
    for p in params:
        p.data = p.data.float()
    return params


def peft_state(module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(module).items()}


def text_encoder_lora_state(encoder) -> dict[str, torch.Tensor]:
    """A text encoder's LoRA under transformers 4's module names (`text_model.encoder...`).

    transformers 5 flattened CLIPTextModel and dropped the `text_model.` level, so the same
    weight has two names. diffusers' `load_lora_weights` strips the prefix when the installed
    transformers has no such level and uses it as it is where it has, so files written with
    it load under both majors, as do the kohya names derived from them.
    """
    state = peft_state(encoder)
    if hasattr(encoder, "text_model"):
        return state
    return {f"text_model.{k}": v for k, v in state.items()}


# LoraConfig fields every peft release since 0.9 knows: loaders rebuild the config from them.
_PORTABLE_LORA_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "rank_pattern",
                         "alpha_pattern", "use_dora", "use_rslora", "bias")


def adapter_metadata(module) -> dict:
    """The adapter's LoraConfig as the file's metadata, limited to fields that every loader
    understands: older diffusers releases (0.35 among them) index `rank_pattern` directly,
    and older peft releases refuse fields they do not know."""
    config = module.peft_config["default"].to_dict()
    return {k: sorted(config[k]) if isinstance(config[k], set) else config[k]
            for k in _PORTABLE_LORA_FIELDS if k in config}


def save_lora(pipe, folder: Path, cfg: TrainConfig) -> Path:
    """Write the LoRA where diffusers' `load_lora_weights` finds it, with its rank and alpha.

    Written to a temporary file first: a crash never leaves a half-written LoRA behind.
    """
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    family = get_family(cfg.family)
    kwargs = {"unet_lora_layers": convert_state_dict_to_diffusers(peft_state(pipe.unet)),
              "unet_lora_adapter_metadata": adapter_metadata(pipe.unet)}
    if cfg.train_text_encoder:
        for name in family.text_encoders:
            encoder = getattr(pipe, name)
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
                text_encoder_lora_state(encoder))
            kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(encoder)
    cls = getattr(diffusers, family.pipeline_class)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / LORA_WEIGHTS, same=same_safetensors) as tmp:
        cls.save_lora_weights(tmp.parent, weight_name=tmp.name, **kwargs)
    return folder / LORA_WEIGHTS


_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# diffusers writes 'module.lora.down.weight' (UNet) and 'module.lora_linear_layer.down.weight'
# (text encoders); peft writes 'module.lora_A.weight'.
_LORA_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\."
                       r"(?:(?:lora|lora_linear_layer)\.(down|up)|lora_(A|B))\.weight$")


def kohya_key(key: str) -> str:
    """diffusers' LoRA key -> the kohya/A1111/ComfyUI name of the same weight.

    'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight'
    -> 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight'
    """
    match = _LORA_KEY.match(key)
    if not match:
        raise ValueError(f"Unexpected LoRA key {key!r}: not a diffusers or peft LoRA weight.")
    owner, module, updown, peft_ab = match.groups()
    kind = updown or {"A": "down", "B": "up"}[peft_ab]
    if owner != "unet" and not module.startswith("text_model."):
        module = "text_model." + module  # kohya names follow transformers' CLIPTextModel paths
    return f"{_KOHYA_PREFIX[owner]}{module.replace('.', '_')}.lora_{kind}.weight"


def export_kohya(lora_path: Path, rank: int, alpha: float,
                 single_text_encoder: bool = True) -> Path:
    """A copy of the LoRA with kohya key names and an `.alpha` per module, which A1111,
    ComfyUI and kohya's scripts load; its metadata names the rank (ss_network_dim) and alpha
    (ss_network_alpha) as kohya's own files do."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora_path))
    out = {}
    for key, value in state.items():
        name = kohya_key(key)
        if single_text_encoder:  # SD 1.5's only text encoder is plain "lora_te_"
            name = name.replace("lora_te1_", "lora_te_")
        out[name] = value.to(torch.float16)
        out[name.split(".lora_")[0] + ".alpha"] = torch.tensor(float(alpha))
    target = lora_path.with_name(KOHYA_WEIGHTS)
    with atomic_path(target, same=same_safetensors) as tmp:
        save_file(out, str(tmp), metadata={"ss_network_dim": str(int(rank)),
                                            "ss_network_alpha": str(alpha)})
    return target


# ---------------------------------------------------------------------------------------------
# The loss


def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return latents.float() * vae.config.scaling_factor


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, cond: Conditioning, *,
                   generator: torch.Generator, snr_gamma: float | None = None,
                   noise_offset: float = 0.0, reduce: bool = True) -> torch.Tensor:
    """The denoising loss of one batch: the UNet's prediction vs its target, per image or mean.

    All randomness comes from `generator`, so a fixed generator gives a fixed loss and a resumed
    run draws the same noise as an uninterrupted one.
    """
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((n, latents.shape[1], 1, 1),
                                                   generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,),
                              generator=generator)
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy.to(unet.dtype), timesteps, **cond.unet_kwargs(unet.dtype)).sample
    v_pred = noise_scheduler.config.prediction_type == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
    per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        # Min-SNR-gamma (Hang et al. 2023): down-weight the easy, low-noise timesteps.
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_pred else snr)
        per_image = per_image * weight.float()
    return per_image.mean() if reduce else per_image


def fixed_batch_loss(unet, noise_scheduler, latents, cond: Conditioning, seed: int = 1234,
                     repeats: int = 8) -> float:
    """Mean plain MSE over fixed noise and timesteps: comparable before and after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(np.mean([float(diffusion_loss(unet, noise_scheduler, latents, cond,
                                                   generator=generator))
                              for _ in range(repeats)]))


# ---------------------------------------------------------------------------------------------
# The run


def fresh_accelerator(dtype: torch.dtype, device: str):
    """An Accelerator for one run, in its precision.

    accelerate keeps one state per process and refuses another precision later in the same
    process ("AcceleratorState has already been initialized"), so a notebook could not retry a
    diverged fp16 run in fp32. A run here is always a single process: each starts clean.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    return Accelerator(mixed_precision=precision, cpu=device == "cpu")


class Trainer:
    """One LoRA training run, in steps, so notebooks can watch it and tests can probe it.

    Callbacks: `on_step(trainer, record)` after every step, `on_validation(trainer, step,
    images, grid)` after each validation render.
    """

    def __init__(self, data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                 progress: bool = True, on_step: Callable | None = None,
                 on_validation: Callable | None = None):
        self.cfg = cfg = with_optimizer_defaults(validate_train(cfg))
        self.family = get_family(cfg.family)
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.checkpoint_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else (
            self.out_dir / "checkpoints")
        self.progress, self.on_step, self.on_validation = progress, on_step, on_validation
        self.examples = load_dataset(self.data_dir)
        self.cfg = cfg = with_dataset_subject(cfg, self.data_dir)
        device = models.pick_device(cfg.device)
        if device.startswith("cuda"):
            # Refuse a plan that cannot fit before minutes of loading end in out-of-memory.
            self.fit_plan = check_before_training(cfg, force=cfg.force_fit)
        self.dtype = models.pick_dtype(device, cfg.mixed_precision)
        try:
            self._build(device)
        except BaseException:
            self.close()  # a retry must not find this attempt's models still on the GPU
            raise

    def _build(self, device: str) -> None:
        """Load the models, encode the inputs, attach the LoRA, resume: the heavy part."""
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        cfg, progress = self.cfg, self.progress
        self.accelerator = fresh_accelerator(self.dtype, device)
        self.device = self.accelerator.device
        self.pipe = models.load_pipeline(cfg.model, cfg.family, device=str(self.device),
                                         dtype=self.dtype)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        class_images = (ensure_class_images(self.pipe, cfg, progress)
                        if cfg.prior_preservation else [])
        self._cache_inputs(class_images)

        unet = self.pipe.unet
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # Seeded here, after loading: building a tiny model on first use (or a cache miss of any
        # kind) draws from the same generator, and the LoRA's start must not depend on it.
        torch.manual_seed(cfg.seed)
        params = add_lora(unet, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
        if cfg.train_text_encoder:
            for name in self.family.text_encoders:
                encoder = getattr(self.pipe, name)
                params += add_lora(encoder, cfg.rank, cfg.lora_alpha, cfg.lora_dropout,
                                   self.family.text_encoder_targets)
                if cfg.gradient_checkpointing:
                    # transformers 5 renamed it; older releases (as Colab may have) only know
                    # the old name.
                    enable = (getattr(encoder, "activation_checkpointing_enable", None)
                              or encoder.gradient_checkpointing_enable)
                    enable()
        self.params = params
        self.n_trainable = sum(p.numel() for p in params)
        optimizer, self.optimizer_name = make_optimizer(params, cfg)
        # The schedule counts optimizer steps; accumulation happens inside each step.
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                  num_warmup_steps=cfg.lr_warmup_steps,
                                  num_training_steps=cfg.steps)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            unet, optimizer, scheduler)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step, self.bad_in_row = 0, 0
        self.history: list[dict] = []
        self.validation_rows: list[tuple[int, list[Image.Image]]] = []
        self.resumed_from: Path | None = None
        # Folders of checkpoints whose writing was cut off never got their final name.
        for stale in self.checkpoint_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if cfg.resume:
            latest = latest_checkpoint(self.checkpoint_dir)
            if latest is not None:
                self.load_checkpoint(latest)

    def close(self) -> None:
        """Let go of the models, optimizer and cached inputs, and hand their GPU memory back.

        A notebook keeps the last exception, and with it every frame that held this trainer:
        after a failed run its models would stay on the GPU and the retry run out of memory.
        """
        accelerator = self.__dict__.pop("accelerator", None)
        if accelerator is not None:
            accelerator.free_memory()  # it holds the prepared UNet and optimizer too
        for name in ("pipe", "unet", "optimizer", "lr_scheduler", "params", "inputs",
                     "cached_cond", "noise_scheduler"):
            self.__dict__.pop(name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- inputs --------------------------------------------------------------------------------

    def _cache_inputs(self, class_images: list[Path]) -> None:
        """Encode every photo (and class image) once; captions too unless a text-encoder LoRA
        is trained. With everything cached the VAE and text encoders leave the GPU."""
        cfg, pipe = self.cfg, self.pipe
        paths = [e.image for e in self.examples] + class_images
        self.captions = [e.caption for e in self.examples] + [cfg.class_prompt] * len(class_images)
        self.is_class = torch.tensor([False] * len(self.examples) + [True] * len(class_images))
        pixels = torch.stack([image_tensor(p, cfg.resolution) for p in paths])
        if cfg.cache_latents:
            chunk = cache_chunk(cfg.resolution)
            self.inputs = torch.cat([encode_latents(pipe, pixels[i:i + chunk])
                                     for i in range(0, len(pixels), chunk)])
        else:
            self.inputs = pixels
        with torch.no_grad():
            self.cached_cond = self.family.encode_prompts(
                pipe, self.captions, cfg.resolution).to(dtype=torch.float32).detach()
        self._move(self._parked(), "cpu")

    def _parked(self) -> tuple[str, ...]:
        """The pipeline parts that wait on the CPU while the UNet trains (none on the CPU)."""
        return parked_after_caching(self.cfg) if self.device.type == "cuda" else ()

    def _move(self, names: tuple[str, ...], device: str) -> None:
        for name in names:
            getattr(self.pipe, name).to(device)
        if names and device == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _train_mode(self, training: bool) -> None:
        """Train mode for every model with a LoRA while it learns: gradient checkpointing and
        dropout act only then. Eval mode for fixed losses and validation."""
        for name in self._lora_modules():
            getattr(self.pipe, name).train(training)

    def _draw(self, pool: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(0, len(pool), (self.cfg.batch_size,), generator=self.generator)
        return pool[pick]

    def batch(self) -> tuple[torch.Tensor, Conditioning, int]:
        """One micro-batch: instance photos, then as many class images with prior
        preservation. Returns latents, conditioning and the number of instance rows."""
        instance = torch.nonzero(~self.is_class).flatten()
        idx = self._draw(instance)
        if self.cfg.prior_preservation:
            idx = torch.cat([idx, self._draw(torch.nonzero(self.is_class).flatten())])
        inputs = self.inputs[idx]
        latents = inputs if self.cfg.cache_latents else encode_latents(self.pipe, inputs)
        if self.cfg.train_text_encoder:
            cond = self.family.encode_prompts(self.pipe, [self.captions[i] for i in idx],
                                              self.cfg.resolution)
        else:
            cond = self.cached_cond.select(idx)
        return latents.to(self.device), cond.to(self.device), self.cfg.batch_size

    # -- steps ---------------------------------------------------------------------------------

    def micro_loss(self) -> torch.Tensor:
        latents, cond, n_instance = self.batch()
        with self.accelerator.autocast():
            per_image = diffusion_loss(self.unet, self.noise_scheduler, latents, cond,
                                       generator=self.generator, snr_gamma=self.cfg.snr_gamma,
                                       noise_offset=self.cfg.noise_offset, reduce=False)
        loss = per_image[:n_instance].mean()
        if self.cfg.prior_preservation:
            loss = loss + self.cfg.prior_loss_weight * per_image[n_instance:].mean()
        return loss

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns its metrics row.

        A non-finite loss skips the whole step (no update) and is recorded; `max_bad_steps` in
        a row raise TrainingDiverged with advice.
        """
        cfg = self.cfg
        self._train_mode(True)
        losses, bad, overflow = [], False, False
        for _ in range(cfg.grad_accum):
            loss = self.micro_loss()
            if not torch.isfinite(loss):
                bad = True
                break
            self.accelerator.backward(loss / cfg.grad_accum)
            losses.append(float(loss.detach()))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
        else:
            self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row = 0
            # In fp16 the loss scaler skips an update whose gradients overflowed and lowers its
            # scale (the LR schedule waits too): normal early in a run, not divergence.
            overflow = self.accelerator.optimizer_step_was_skipped
        self.step += 1
        record = {"step": self.step, "loss": float(np.mean(losses)) if not bad else float("nan"),
                  "lr": self.lr_scheduler.get_last_lr()[0], "skipped": bad or overflow}
        self.history.append(record)
        if self.bad_in_row >= cfg.max_bad_steps:
            self.save_metrics()
            raise TrainingDiverged(
                f"The loss was NaN/inf for {self.bad_in_row} steps in a row (up to step "
                f"{self.step}); the run stopped. Try a lower learning rate (now {cfg.lr}), "
                "mixed_precision='no' (or 'bf16' on a GPU that has it, not a T4), and for SDXL "
                "in fp16 the fp16-fix VAE. The last good checkpoint is in "
                f"{self.checkpoint_dir}.")
        return record

    def fixed_loss(self) -> float:
        """The plain loss on every photo with fixed noise and timesteps."""
        self._train_mode(False)
        latents = self.inputs if self.cfg.cache_latents else encode_latents(self.pipe,
                                                                            self.inputs)
        return fixed_batch_loss(self.unet, self.noise_scheduler, latents.to(self.device),
                                self.cached_cond.to(self.device))

    # -- validation ----------------------------------------------------------------------------

    def validate(self) -> Image.Image:
        """Render the validation prompts at this step; grow the grid (steps x prompts)."""
        cfg = self.cfg
        prompts = [p.format(subject=cfg.subject) for p in cfg.validation_prompts]
        self._train_mode(False)
        parked = self._parked()
        self._move(parked, str(self.device))
        images = []
        try:
            # Under mixed precision the prepared UNet returns fp32 (accelerate wraps its
            # forward): autocast hands the half-precision VAE what it computes in, as diffusers'
            # DreamBooth scripts validate inside torch.autocast.
            with torch.no_grad(), self.accelerator.autocast():
                for prompt in prompts:
                    for seed in cfg.validation_seeds:
                        images.append(self.pipe(
                            prompt, num_inference_steps=cfg.validation_steps,
                            height=cfg.resolution, width=cfg.resolution,
                            generator=torch.Generator().manual_seed(seed)).images[0])
        finally:
            self._move(parked, "cpu")
        self.validation_rows.append((self.step, images))
        # Label by what follows the subject words: every prompt starts the same way.
        columns = [f"{p.split(cfg.subject)[-1].strip(' ,')[:28]} s{s}" for p in prompts
                   for s in cfg.validation_seeds]
        grid = image_grid([im for _, row in self.validation_rows for im in row],
                          rows=len(self.validation_rows), cols=len(images),
                          row_labels=[f"step {s}" for s, _ in self.validation_rows],
                          col_labels=columns, title="Validation: each row a training step",
                          cell=160)
        with atomic_path(self.out_dir / "validation.png") as tmp:
            grid.save(tmp, format="PNG")
        if self.on_validation:
            self.on_validation(self, self.step, images, grid)
        return grid

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly: LoRA weights, optimizer, scheduler, the fp16
        loss scaler, RNGs.

        Written to a temporary folder renamed into place, so the latest checkpoint on disk is
        always complete, whenever the process dies."""
        target = self.checkpoint_dir / f"checkpoint-{self.step:07d}"
        state = {
            "step": self.step, "bad_in_row": self.bad_in_row, "history": self.history,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if (scaler := self.accelerator.scaler) else None,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
            "lora": {name: peft_state(getattr(self.pipe, name)) for name in self._lora_modules()},
        }
        with atomic_dir(target) as tmp:
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({
                "step": self.step, "config": to_dict(self.cfg),
                "optimizer_used": self.optimizer_name,
                "resume_hash": config_hash({k: to_dict(self.cfg)[k] for k in RESUME_KEYS}),
            }, indent=2, default=str) + "\n")
        for old in list_checkpoints(self.checkpoint_dir)[: -max(1, self.cfg.checkpoints_keep)]:
            shutil.rmtree(old, ignore_errors=True)
        return target

    def _lora_modules(self) -> list[str]:
        return ["unet", *(self.family.text_encoders if self.cfg.train_text_encoder else ())]

    def load_checkpoint(self, folder: Path) -> None:
        from peft.utils import set_peft_model_state_dict

        meta = json.loads((folder / "meta.json").read_text())
        check_resume(folder, meta, self.cfg)
        used = meta.get("optimizer_used", self.optimizer_name)
        if used != self.optimizer_name:
            raise ConfigError(f"{folder} holds {used} state but this run steps with "
                              f"{self.optimizer_name}; they cannot continue each other. Set the "
                              "optimizer the checkpoint used, use a new checkpoint_dir, or set "
                              "resume=False to start over.")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        for name, weights in state["lora"].items():
            set_peft_model_state_dict(getattr(self.pipe, name), weights)
        for p in self.params:
            p.data = p.data.float()
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        self.step, self.bad_in_row = state["step"], state["bad_in_row"]
        self.history = state["history"]
        self.resumed_from = folder

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, start = self.cfg, time.perf_counter()
        if self.resumed_from:
            print(f"Resuming from {self.resumed_from} (step {self.step} of {cfg.steps})."
                  if self.step < cfg.steps else f"{self.resumed_from} already holds all "
                  f"{cfg.steps} steps: nothing left to train (raise steps to train longer).")
            if self.on_step and self.history:  # a watcher shows where the run stands
                self.on_step(self, self.history[-1])
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not self.progress)
        while self.step < cfg.steps:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if self.on_step:
                self.on_step(self, record)
            if cfg.validate_every and self.step % cfg.validate_every == 0:
                self.validate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        last = latest_checkpoint(self.checkpoint_dir)
        if last is None or int(last.name.split("-")[-1]) != self.step:
            self.save_checkpoint()  # the last step too: a re-run then knows the run is finished
        bar.close()
        return self.save(time.perf_counter() - start)

    def save_metrics(self) -> pd.DataFrame:
        metrics = pd.DataFrame(self.history, columns=["step", "loss", "lr", "skipped"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out_dir / "metrics.csv") as tmp:
            metrics.to_csv(tmp, index=False)
        return metrics

    def save(self, seconds: float = 0.0) -> TrainResult:
        out = self.out_dir
        lora_path = save_lora(self.pipe, out, self.cfg)
        export_kohya(lora_path, self.cfg.rank, self.cfg.lora_alpha,
                     single_text_encoder=self.cfg.family == "sd15")
        metrics = self.save_metrics()
        skipped = int(metrics["skipped"].sum()) if len(metrics) else 0
        token, class_name = dataset_subject(self.data_dir)
        save_config(self.cfg, out / "config.json", data_dir=str(self.data_dir),
                    token=token, class_name=class_name,
                    optimizer_used=self.optimizer_name, trainable_parameters=self.n_trainable,
                    n_images=len(self.examples), skipped_steps=skipped,
                    seconds=round(seconds, 2))
        result = TrainResult(out, lora_path, metrics, self.optimizer_name, seconds, skipped)
        if metrics["loss"].notna().any():
            import matplotlib.pyplot as plt

            fig = result.plot()
            fig.savefig(out / "loss.png", dpi=100)
            plt.close(fig)
        write_model_card(out, self.cfg, result, len(self.examples))
        return result


def check_resume(folder: Path, meta: dict, cfg: TrainConfig) -> None:
    """Refuse to continue a checkpoint with settings that did not make it, naming only those
    that changed, or with fewer steps than it already has."""
    # Through JSON, as the checkpoint stored them: a tuple and the list it became are equal.
    now = json.loads(json.dumps(to_dict(cfg), default=str))
    changed = [f"{k} {v!r} (now {now[k]!r})" for k, v in meta["config"].items()
               if k in now and k not in FREE_ON_RESUME and v != now[k]]
    if changed:
        raise ConfigError(f"{folder} continues a run trained with other settings: "
                          f"{', '.join(changed)}. A checkpoint goes on only with the settings "
                          "that made it (more steps are fine): set those back, train into a new "
                          "out folder (or checkpoint_dir), or set resume=False to start over.")
    if meta["step"] > cfg.steps:
        raise ConfigError(f"{folder} is already at step {meta['step']}, more than steps="
                          f"{cfg.steps}: set steps to {meta['step']} or more to keep (and "
                          "continue) that run, or train into a new out folder.")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones never carry the final name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("checkpoint-*")
                  if p.is_dir() and (p / "state.pt").is_file() and (p / "meta.json").is_file())


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def usage_snippet(cfg: TrainConfig, lora_folder: str) -> str:
    """Python that renders with the LoRA on a GPU: the fp16 files (half the download), SDXL's
    fp16-fix VAE (the stock one decodes black in fp16), straight onto the GPU. Loading SDXL in
    fp32 on the CPU first is what runs Colab's 12.7 GB of host RAM out."""
    hub = models.is_hub_id(cfg.model)
    fix_vae = hub and cfg.family == "sdxl"
    classes = "AutoencoderKL, DiffusionPipeline" if fix_vae else "DiffusionPipeline"
    lines = ["import torch", f"from diffusers import {classes}"]
    load = f'"{cfg.model}", torch_dtype=torch.float16' + (', variant="fp16"' if hub else "")
    if fix_vae:
        lines.append(f'vae = AutoencoderKL.from_pretrained("{HUB_SDXL_FP16_VAE}", '
                     "torch_dtype=torch.float16)")
        load += ", vae=vae"
    lines += [f'pipe = DiffusionPipeline.from_pretrained({load}).to("cuda")',
              f'pipe.load_lora_weights("{lora_folder}")',
              f'image = pipe("a photo of {cfg.subject}, corporate headshot").images[0]']
    return "\n".join(lines)


def write_model_card(out: Path, cfg: TrainConfig, result: TrainResult, n_images: int) -> Path:
    """README.md beside the weights: what the LoRA is, how it was made, how to use it."""
    final = result.metrics["loss"].dropna()
    rows = "\n".join(f"| {k} | {v} |" for k, v in to_dict(cfg).items())
    has_grid = (out / "validation.png").is_file()
    samples = "\n![validation images](validation.png)\n" if has_grid else ""
    text = f"""---
base_model: {cfg.model}
library_name: diffusers
tags: [lora, dreambooth, headshot-kit, {cfg.family}]
---
# A face LoRA for {cfg.model}

A DreamBooth-style LoRA (rank {cfg.rank}, alpha {cfg.lora_alpha}) trained by headshot-kit on
{n_images} photos for {cfg.steps} steps with {result.optimizer}. Trigger words: `{cfg.subject}`.
Final loss (mean of the last 10 steps): {final.tail(10).mean():.4f}; skipped steps:
{result.skipped_steps}.

This LoRA was trained on photos of a real person: share it only with their consent.

## Use
```python
{usage_snippet(cfg, out.name)}
```
`{KOHYA_WEIGHTS}` holds the same weights under kohya names for A1111 and ComfyUI.
{samples}
## Settings
| setting | value |
| --- | --- |
{rows}
"""
    return atomic_write_text(out / "README.md", text)


def train_lora(data_dir: str | Path, out_dir: str | Path, cfg: TrainConfig | None = None,
               **kwargs) -> TrainResult:
    """Train a LoRA on the prepared photos in `data_dir`; write it and its records to `out_dir`.

    Keyword arguments go to `Trainer` (progress, on_step, on_validation).
    """
    trainer = Trainer(data_dir, out_dir, cfg or TrainConfig(), **kwargs)
    try:
        print(f"Training a rank-{trainer.cfg.rank} LoRA ({trainer.n_trainable:,} parameters) "
              f"on {len(trainer.examples)} photos for {trainer.cfg.steps} steps on "
              f"{trainer.device.type} ({trainer.dtype}), optimizer: {trainer.optimizer_name}.")
        return trainer.run()
    finally:
        # Free the training models before anything loads an inference pipeline (on Colab,
        # holding both runs the 12.7 GB of host RAM out), and after a failure, so that a retry
        # starts with an empty GPU.
        trainer.close()

