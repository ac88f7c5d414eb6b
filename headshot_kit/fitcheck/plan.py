"""The plan: a training config's peak GPU memory per phase, its time per step and its host
RAM, added up from the measurements (headshot_kit.fitcheck.measure) and the GPU's figures."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..config import ConfigError, TrainConfig
from ..models import training_precision
from ..placement import training_placement
from .gpus import CUDA_CONTEXT_GIB, FRAGMENTATION, GB, GIB, GPU, T4_CALIBRATION, Calibration
from .measure import (StepSpec, Transient, measure_sampling, measure_step, measure_text,
                      measure_vae, optimizer_bytes, parameter_counts, trainable_sizes)

# Bytes an AdamW step reads and writes per trainable fp32 value: weight (read + write) and
# gradient (read), plus the two states (read + write): 1 byte each in 8-bit, 4 in 32-bit.
ADAM_TRAFFIC = {"adamw8bit": 4 + 4 + 4 + 2 * 2, "adamw": 4 + 4 + 4 + 2 * 8,
                "prodigy": 4 + 4 + 4 + 2 * 16}
# Host RAM: the Python kernel with torch, CUDA and diffusers imported, before any model, shows
# about 2 GB on Colab's RAM gauge. An estimate, not measured here (bench/ measures RSS).
HOST_BASELINE_GB = 2.0
# Free Colab's host RAM, as its resource panel shows it for a T4 runtime.
COLAB_HOST_RAM_GB = 12.7
# Photos held as float pixels while training without cached latents: 5-20 selfies, what
# DreamBooth recipes and the paid services ask for.
HOST_PHOTOS = 20
# The plan's line for the face-weighted loss's weight maps (TrainConfig.background_weight).
MASK_COMPONENT = "face-mask loss weights (fp32, latent grid)"
OPTIMIZER_NAMES = {"adamw8bit": "8-bit AdamW", "adamw": "AdamW (32-bit)",
                   "prodigy": "Prodigy (32-bit)"}


@dataclass(frozen=True)
class Recipe:
    """Where the VAE and text encoders live and how the optimizer steps. The defaults (None)
    follow headshot_kit.placement, as the train stage does; the published recipes override them."""

    # The VAE stays on the GPU and encodes every micro-batch (the train stage: when not caching).
    vae_every_step: bool | None = None
    # "fp32" or "fp16"; None = the training dtype. diffusers' SDXL LoRA script kept it in fp32.
    vae_dtype: str | None = None
    # The train stage leaves the text encoders on the GPU when it does not cache latents, and when a
    # text-encoder LoRA is trained.
    text_encoders_on_gpu: bool | None = None
    # Re-encode the captions every micro-batch (the train stage: with a text-encoder LoRA;
    # diffusers' SDXL script: with per-image captions).
    text_encoders_every_step: bool | None = None
    # torch AdamW's multi-tensor path (the default on CUDA since torch 2.0) makes one fp32
    # temporary as large as the parameters during the step (_foreach_sqrt of exp_avg_sq).
    adam_foreach: bool = True
    # Photos per VAE call while caching latents; None = the train stage's (placement.cache_chunk).
    cache_batch: int | None = None


RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class FitPlan:
    """The prediction for one config on one GPU. Memory in GB (10^9 bytes)."""

    cfg: TrainConfig
    gpu: GPU
    mode: str
    dtype: str
    recipe: Recipe
    # GPU memory of each component at the peak phase, fixed overheads included.
    components: dict[str, float]
    # The peak of each phase of the run (allocated bytes, before fragmentation and context).
    phases: dict[str, float]
    peak_phase: str
    total_gb: float
    # True when activations were not measured because the rest alone does not fit.
    lower_bound: bool
    step_seconds: float
    flops_per_step: float
    host: dict[str, float]
    notes: list[str] = field(default_factory=list)
    fix: str | None = None
    # FLOPs of one micro-batch by kind, and the optimizer's seconds per step (what the step
    # time is made of; headshot_kit.fitcheck.published re-derives the calibration from them).
    micro_flops: dict[str, float] = field(default_factory=dict)
    optimizer_seconds: float = 0.0

    @property
    def budget_gb(self) -> float:
        return self.gpu.budget_gb

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.budget_gb

    @property
    def host_peak_gb(self) -> float:
        return max(self.host.values())

    def table(self):
        """Components of the peak GPU memory, then the total and the GPU's budget (GB)."""
        import pandas as pd

        rows = dict(self.components)
        rows["total" + (" (at least)" if self.lower_bound else "")] = self.total_gb
        rows[f"budget ({self.gpu.name})"] = self.budget_gb
        return pd.DataFrame({"GB": [round(v, 2) for v in rows.values()]}, index=list(rows))

    def describe(self) -> str:
        c = self.cfg
        what = f"LoRA rank {c.rank}" if self.mode == "lora" else "full UNet fine-tune"
        batch = f"batch {c.batch_size}" + (f" x {c.grad_accum} accumulated"
                                           if c.grad_accum > 1 else "")
        if c.prior_preservation:
            batch += " (+ as many class images)"
        return (f"{c.family} {what} at {c.resolution} px, {batch}, "
                f"checkpointing {'on' if c.gradient_checkpointing else 'off'}, "
                f"{OPTIMIZER_NAMES[c.optimizer]}, "
                f"{self.dtype}, latents {'cached' if c.cache_latents else 'encoded every step'}")

    def summary(self) -> str:
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        at_least = "at least " if self.lower_bound else ""
        lines = [
            f"Fit check: {self.describe()}",
            (f"on {self.gpu.name}: peak GPU memory {at_least}{self.total_gb:.1f} GB of "
             f"{self.budget_gb:.1f} GB, during {self.peak_phase} -> {verdict}"),
            "",
            self.table().to_string(),
            "",
            "Phase peaks (GB, before fragmentation and context): " + ", ".join(
                f"{k} {v:.1f}" for k, v in self.phases.items()),
            _time_line(self),
            f"Host RAM: peak about {self.host_peak_gb:.1f} GB "
            f"({max(self.host, key=self.host.get)}) of Colab's {COLAB_HOST_RAM_GB} GB; rough "
            "(bench/ measures it): " + ", ".join(f"{k} {v:.1f}" for k, v in self.host.items()),
        ]
        if self.fix:
            lines.append(f"Cheapest fix: {self.fix}.")
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> dict:
        return {
            "config": dataclasses.asdict(self.cfg), "mode": self.mode, "dtype": self.dtype,
            "recipe": dataclasses.asdict(self.recipe),
            "gpu": dataclasses.asdict(self.gpu) | {"budget_gb": round(self.budget_gb, 3)},
            "fits": self.fits, "total_gb": round(self.total_gb, 3),
            "lower_bound": self.lower_bound, "peak_phase": self.peak_phase,
            "components_gb": {k: round(v, 3) for k, v in self.components.items()},
            "phases_gb": {k: round(v, 3) for k, v in self.phases.items()},
            "step_seconds": None if math.isnan(self.step_seconds) else round(self.step_seconds,
                                                                             3),
            "flops_per_step": self.flops_per_step,
            "host_gb": {k: round(v, 3) for k, v in self.host.items()},
            "host_peak_gb": round(self.host_peak_gb, 3), "fix": self.fix, "notes": self.notes,
        }


def _time_line(plan: FitPlan) -> str:
    if math.isnan(plan.step_seconds):
        return "Time: not estimated (nothing was run: it cannot fit)."
    return (f"Time: about {plan.step_seconds:.2f} s per step ({1 / plan.step_seconds:.2f} it/s),"
            f" {plan.cfg.steps} steps in about {duration(plan.step_seconds * plan.cfg.steps)};"
            " rough: +-20% at best, calibrated on published T4 runs only"
            + (", and this GPU is not the T4" if plan.gpu.key != "t4" else "") + ".")


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def split_overrides(cfg: TrainConfig, overrides: dict) -> tuple[TrainConfig, Recipe]:
    unknown = set(overrides) - TRAIN_FIELDS - RECIPE_FIELDS
    if unknown:
        raise ConfigError(f"fit_check: unknown setting(s) {', '.join(sorted(unknown))}; use "
                          f"TrainConfig fields or {', '.join(sorted(RECIPE_FIELDS))}.")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in TRAIN_FIELDS})
    return cfg, Recipe(**{k: v for k, v in overrides.items() if k in RECIPE_FIELDS})


def make_plan(cfg: TrainConfig, gpu: GPU, mode: str, recipe: Recipe, measure: bool = True
              ) -> FitPlan:
    """The arithmetic of a plan. With measure=False (or when the weights, gradients and
    optimizer alone do not fit) activations are left out and the total is a lower bound."""
    z = _sizes(cfg, gpu, mode, recipe)
    weights = _held_weights(cfg, mode, z)
    grads = 4 * sum(z.sizes)  # fp32, as the trainable weights
    fixed = CUDA_CONTEXT_GIB * GIB
    lower_bound = (not measure or (sum(weights.values()) + grads) * FRAGMENTATION + fixed
                   > gpu.budget_gb * GB)
    notes = []
    if gpu.guessed:
        notes.append(f"{gpu.name} is not in the table: its memory is its own, its speed is "
                     "guessed from the T4's.")
    if z.dtype == "bf16":
        notes.append("bf16 activations are measured as fp16 (same sizes).")
    # Each phase of the run, with what it holds on the GPU (bytes).
    if lower_bound:
        parts = {"optimizer step": weights | {"gradients (fp32)": grads}}
        flops = {True: 0, False: 0, "vae": 0}
        notes.append("Activations not measured: the weights, gradients and optimizer states "
                     "alone exceed the GPU, so the total is a lower bound.")
    else:
        parts, flops = _step_phases(cfg, mode, z, weights)
        parts |= _setup_phases(cfg, mode, z, weights)
    phases = {name: sum(held.values()) for name, held in parts.items()}
    peak_phase = max(phases, key=phases.get)
    if peak_phase == "caching" and z.cache_chunk > 1:
        notes.append(_caching_note(cfg, z, parts["caching"], fixed))
    allocated = phases[peak_phase]
    components = {k: v / GB for k, v in parts[peak_phase].items() if v}
    components[f"allocator fragmentation (+{FRAGMENTATION - 1:.0%})"] = (
        allocated * (FRAGMENTATION - 1) / GB)
    components["CUDA context"] = fixed / GB

    micro = math.nan if lower_bound else micro_seconds(flops, gpu)
    optimizer_s = sum(z.sizes) * ADAM_TRAFFIC[cfg.optimizer] / (gpu.bandwidth_gbs * GB)
    plan = FitPlan(cfg, gpu, mode, z.dtype, recipe, components,
                   {k: v / GB for k, v in phases.items()}, peak_phase,
                   (allocated * FRAGMENTATION + fixed) / GB, lower_bound,
                   cfg.grad_accum * micro + optimizer_s, cfg.grad_accum * sum(flops.values()),
                   _host_ram(cfg, mode, z), notes)
    plan.micro_flops = {"fp16": flops[True], "fp32": flops[False], "vae_fp32": flops["vae"]}
    plan.optimizer_seconds = optimizer_s
    return plan


@dataclass(frozen=True)
class _Sizes:
    """What every phase of a plan reads: the training dtype, where the VAE and text encoders
    sit and how often they run, and the sizes of what is held."""

    dtype: str  # the training dtype
    half: bool  # the UNet and text encoders run in half precision
    wbytes: int  # bytes per frozen weight
    counts: dict[str, int]  # parameters per model
    unet_batch: int  # images the UNet sees per micro-batch (prior preservation doubles it)
    vae_half: bool
    vae_bytes: int
    text_bytes: int  # every text encoder
    vae_every_step: bool
    text_every_step: bool
    text_on_gpu: bool
    cache_chunk: int  # photos per VAE call while caching latents
    sizes: tuple[int, ...]  # the element count of every trainable tensor
    weighted: bool  # the face-weighted loss
    mask_bytes: int  # its weight maps, made while caching and held to the end
    adam_scratch: int  # foreach AdamW's fp32 temporary during the optimizer step


def _sizes(cfg: TrainConfig, gpu: GPU, mode: str, recipe: Recipe) -> _Sizes:
    dtype = training_precision(cfg.mixed_precision, "cuda", gpu.bf16)
    wbytes = 4 if dtype == "fp32" else 2
    counts = parameter_counts(cfg.family)
    vae_half = (recipe.vae_dtype or dtype) != "fp32"
    # Where the train stage puts each part (headshot_kit.placement), unless a published recipe
    # did otherwise.
    place = training_placement(cfg)
    text_every_step = (place.text_every_step if recipe.text_encoders_every_step is None
                       else recipe.text_encoders_every_step)
    sizes = trainable_sizes(cfg.family, mode, cfg.rank, tuple(cfg.target_modules),
                            text_encoder=cfg.train_text_encoder)
    # The face-weighted loss keeps one fp32 weight per latent pixel of every photo (and class
    # image) on the GPU, made while caching and held to the end; the plain loss keeps none.
    weighted = cfg.background_weight != 1
    n_images = HOST_PHOTOS + (cfg.num_class_images if cfg.prior_preservation else 0)
    return _Sizes(
        dtype=dtype, half=dtype != "fp32", wbytes=wbytes, counts=counts,
        unet_batch=cfg.batch_size * (2 if cfg.prior_preservation else 1),
        vae_half=vae_half, vae_bytes=counts["vae"] * (2 if vae_half else 4),
        text_bytes=wbytes * sum(v for k, v in counts.items() if k.startswith("text_encoder")),
        vae_every_step=(place.vae_every_step if recipe.vae_every_step is None
                        else recipe.vae_every_step),
        text_every_step=text_every_step,
        text_on_gpu=(place.text_on_gpu or text_every_step
                     if recipe.text_encoders_on_gpu is None else recipe.text_encoders_on_gpu),
        # A dataset holds about HOST_PHOTOS photos: a larger chunk is never filled.
        cache_chunk=recipe.cache_batch or min(place.cache_chunk, HOST_PHOTOS),
        sizes=sizes, weighted=weighted,
        mask_bytes=4 * n_images * (cfg.resolution // 8) ** 2 if weighted else 0,
        adam_scratch=4 * sum(sizes) if cfg.optimizer == "adamw" and recipe.adam_foreach else 0)


def _held_weights(cfg: TrainConfig, mode: str, z: _Sizes) -> dict[str, int]:
    """What stays on the GPU through the whole training loop (bytes)."""
    kind = "8-bit" if cfg.optimizer == "adamw8bit" else "32-bit"
    return {
        f"UNet weights (frozen, {z.dtype})": 0 if mode == "full" else z.counts["unet"] * z.wbytes,
        # fp32: the LoRA weights, or the full UNet's master weights.
        ("LoRA weights (fp32)" if mode == "lora" else "UNet master weights (fp32)"):
            4 * sum(z.sizes),
        f"VAE kept on the GPU ({'fp16' if z.vae_half else 'fp32'})":
            z.vae_bytes if z.vae_every_step else 0,
        f"text encoders kept on the GPU ({z.dtype})": z.text_bytes if z.text_on_gpu else 0,
        f"optimizer states ({kind} AdamW)":
            optimizer_bytes(z.sizes, cfg.optimizer, cfg.optimizer_min_8bit_size),
        MASK_COMPONENT: z.mask_bytes,
    }


def _step_phases(cfg: TrainConfig, mode: str, z: _Sizes, weights: dict[str, int]
                 ) -> tuple[dict[str, dict[str, float]], dict]:
    """The training step's phases (forward/backward, the optimizer step, encoding every step)
    with what each holds (bytes), measured; and one micro-batch's FLOPs by "runs in half
    precision" ("vae": an fp32 VAE's no-grad encode)."""
    family, grads = cfg.family, 4 * sum(z.sizes)
    # Gradients are freed after each optimizer step (zero_grad(set_to_none=True)), but live
    # through the whole step when micro-batches accumulate into them.
    grads_persist = cfg.grad_accum > 1
    step = measure_step(StepSpec(family, cfg.resolution, z.unet_batch, mode=mode,
                                 checkpointing=cfg.gradient_checkpointing, rank=cfg.rank,
                                 targets=tuple(cfg.target_modules), half=z.half,
                                 weighted=z.weighted))
    text_train = (measure_text(family, z.unet_batch, half=z.half, lora_rank=cfg.rank)
                  if cfg.train_text_encoder else Transient(0, 0))
    if grads_persist:
        fb = {"gradients (fp32)": grads,
              "activations (measured)": step.activation_peak + text_train.peak}
    else:
        fb = {"gradients (fp32)": step.gradients_at_peak,
              "activations (measured)": step.activations_at_peak + text_train.peak}
    parts = {"forward/backward": weights | fb,
             "optimizer step": weights | {"gradients (fp32)": grads,
                                          "optimizer scratch (foreach AdamW)": z.adam_scratch}}
    flops: dict = {True: 0, False: 0, "vae": 0}
    flops[z.half] += step.flops + text_train.flops
    # The VAE and the text encoders run one after the other: the larger one counts.
    encoders = []
    if z.vae_every_step:
        vae = measure_vae(family, cfg.resolution, z.unet_batch, half=z.vae_half)
        encoders.append(("VAE encoder activations (measured)", vae.peak))
        flops[True if z.vae_half else "vae"] += vae.flops
    if z.text_every_step and not cfg.train_text_encoder:
        text = measure_text(family, z.unet_batch, half=z.half)
        encoders.append(("text encoder activations (measured)", text.peak))
        flops[z.half] += text.flops
    if encoders:
        name, peak = max(encoders, key=lambda e: e[1])
        parts["encode (every step)"] = weights | {
            "gradients (fp32)": grads if grads_persist else 0, name: peak}
    return parts, flops


def _setup_phases(cfg: TrainConfig, mode: str, z: _Sizes, weights: dict[str, int]
                  ) -> dict[str, dict[str, float]]:
    """The phases around the step, with what each holds (bytes): caching the latents before
    the loop, validation renders inside it."""
    family, parts = cfg.family, {}
    if cfg.cache_latents:
        # The train stage loads the whole pipeline to the GPU and encodes the photos before the
        # LoRA and the optimizer exist; the VAE and text encoders leave afterwards.
        peak = max(measure_vae(family, cfg.resolution, z.cache_chunk, half=z.vae_half).peak,
                   measure_text(family, z.cache_chunk, half=z.half).peak)
        parts["caching"] = {
            f"UNet weights ({'fp32' if mode == 'full' else z.dtype})":
                z.counts["unet"] * (4 if mode == "full" else z.wbytes),
            "VAE + text encoders (caching)": z.vae_bytes + z.text_bytes,
            "encoder activations (measured)": peak, MASK_COMPONENT: z.mask_bytes}
    if cfg.validate_every:
        # Validation renders with the training state still on the GPU (gradients freed),
        # the VAE and text encoders brought back: one denoising step or the VAE decode.
        sample = measure_sampling(family, cfg.resolution, half=z.half)
        decode = measure_vae(family, cfg.resolution, 1, half=z.vae_half, decode=True)
        parts["validation"] = weights | {
            "VAE + text encoders back on the GPU": (0 if z.vae_every_step else z.vae_bytes)
            + (0 if z.text_on_gpu else z.text_bytes),
            "sampling activations (measured)": max(sample.peak, decode.peak)}
    return parts


def _caching_note(cfg: TrainConfig, z: _Sizes, caching: dict[str, float], fixed: float) -> str:
    """What caching the latents would need one photo per VAE call, where it is the peak."""
    one = max(measure_vae(cfg.family, cfg.resolution, 1, half=z.vae_half).peak,
              measure_text(cfg.family, 1, half=z.half).peak)
    alone = sum(caching.values()) - caching["encoder activations (measured)"] + one
    return (f"Caching latents {z.cache_chunk} photos per VAE call is the peak; one at a time "
            f"it would need {(alone * FRAGMENTATION + fixed) / GB:.1f} GB there.")


def micro_seconds(flops: dict, gpu: GPU, cal: Calibration | None = None) -> float:
    """One micro-batch's time: the fixed overhead plus its FLOPs at each kind's efficiency
    (tensor-core half precision, fp32 training work, an fp32 VAE's no-grad encode)."""
    cal = cal or T4_CALIBRATION
    return (cal.overhead_s + flops[True] / (gpu.fp16_tflops * 1e12 * cal.tensor_efficiency)
            + flops[False] / (gpu.fp32_tflops * 1e12 * cal.fp32_efficiency)
            + flops["vae"] / (gpu.fp32_tflops * 1e12 * cal.vae_fp32_efficiency))


def _host_ram(cfg: TrainConfig, mode: str, z: _Sizes) -> dict[str, float]:
    """Rough peak host RAM (GB) per phase, on Colab.

    load: from_pretrained(low_cpu_mem_usage=True) builds each model on the CPU in the training
      dtype before it moves to the GPU (file pages read through mmap are reclaimable and not
      counted); train: photos as float pixels when latents are not cached, and the VAE and text
      encoders that the train stage parks on the CPU after caching; save: the trainable weights
      copied to the CPU in fp32; reload: an inference pipeline loaded while the training objects
      still hold their host memory (what killed the SDXL notebook's run).
    """
    unet = z.counts["unet"] * (4 if mode == "full" else z.wbytes)
    encoders = z.vae_bytes + z.text_bytes
    parked = encoders if cfg.cache_latents and not cfg.train_text_encoder else 0
    photos = 0 if cfg.cache_latents else HOST_PHOTOS * 3 * cfg.resolution**2 * 4
    base = HOST_BASELINE_GB * GB
    train = base + parked + photos
    phases = {"load": base + unet + encoders, "train": train, "save": train + 4 * sum(z.sizes),
              "reload": train + z.counts["unet"] * z.wbytes + encoders}
    return {k: v / GB for k, v in phases.items()}
