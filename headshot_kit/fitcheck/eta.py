"""The journey's ETA: selfies to a pack of headshots, phase by phase, on one GPU, from one model.

Training takes the fit check's step time (`make_plan`); every render (validation images, the
pack, the face-detail pass, a few-step pack) takes the same per-step rate: a denoising step's
FLOPs, counted on meta tensors like the training step's, at the tensor-core efficiency the
training calibration found, plus a fixed per-step overhead fitted on SD 1.x's 4.7 it/s
(`Calibration.sampling_overhead_s`); VAE passes are their FLOPs at the same efficiencies.
What is not GPU work (the download, loading weights, photo checks, scoring) is each phase's
size at a stated rate. Each constant says where it comes from; tests/test_eta.py ties each
phase's formula to its figure, and a run writes its measured phase times beside these
(`write_eta`), so a first run on a GPU shows where the model is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import GenerateConfig, Preset, get_preset
from .gpus import GB, GPU, T4_CALIBRATION, resolve_gpu
from .measure import measure_sampling, measure_vae, parameter_counts

# Downloading a model from the Hugging Face hub on Colab. No published figure: an assumption
# (Colab's network reaches the hub's CDN at about 100 MB/s); the fp16 variant is fetched
# (headshot_kit.models asks for it), so the bytes are the fp16 weights.
HUB_BYTES_PER_S = 100e6
# Reading cached fp16 weights from Colab's disk and moving them to the GPU: an assumption
# (Colab's local disk reads at about 300 MB/s, the GPU link is faster).
LOAD_BYTES_PER_S = 300e6
# dlib HOG detect + 128-d descriptor: about 0.2 s per 512x640 photo on a two-core CPU
# (REFERENCE: "Face models that work offline here"); prepare checks each photo with it,
# training scores each validation image, evaluate scores each headshot.
DLIB_S = 0.2
# Photos a user brings: the services ask for 5-20 selfies.
PHOTOS = 20
# Writing one resumable checkpoint (a LoRA's fp32 weights and optimizer state, a few MB to a
# few tens of MB) to Google Drive: an assumption.
CHECKPOINT_S = 2.0
# diffusers' tiled VAE decode: tiles of the VAE's sample_size with 25% overlap
# (AutoencoderKL.tile_overlap_factor), each decoded whole.
TILE_OVERLAP = 0.25


@dataclass(repr=False)
class Eta:
    """Predicted seconds per phase of the journey on one GPU; `formulas` says how each was
    counted, `notes` what the prediction does not know."""

    gpu: str
    phases: dict[str, float]
    formulas: dict[str, str]
    notes: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return sum(self.phases.values())

    @property
    def total_minutes(self) -> float:
        return self.total_seconds / 60

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "total_minutes": round(self.total_minutes, 2),
                "phases": {k: round(v / 60, 2) for k, v in self.phases.items()},
                "phase_seconds": {k: round(v, 1) for k, v in self.phases.items()},
                "formulas": self.formulas, "notes": self.notes}

    def summary(self) -> str:
        lines = [f"Journey ETA on a {self.gpu}: about {self.total_minutes:.0f} minutes "
                 "from photos to scored headshots (a prediction; the run writes its measured "
                 "times beside it in eta.json)."]
        width = max(map(len, self.phases))
        for name, seconds in self.phases.items():
            lines.append(f"  {name:<{width}}  {seconds / 60:5.1f} min  ({self.formulas[name]})")
        lines += [f"  Note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = __repr__ = summary


def sampling_step_seconds(family: str, resolution: int, guided: bool,
                          gpu: GPU | str = "t4") -> float:
    """One denoising step of one image: classifier-free guidance runs the UNet on two latents
    (a guidance of 1 or less, one)."""
    gpu = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu)
    cal = T4_CALIBRATION
    flops = measure_sampling(family, resolution, half=True).flops * (1 if guided else 0.5)
    return cal.sampling_overhead_s + flops / (gpu.fp16_tflops * 1e12 * cal.tensor_efficiency)


def tile_factor(resolution: int, tile: int) -> float:
    """How many times the pixels of an untiled decode diffusers' tiled decode works through
    (tiles of `tile` px every tile x 0.75 px, the last ones cut at the edge); 1 untiled."""
    if resolution <= tile:
        return 1.0
    stride = int(tile * (1 - TILE_OVERLAP))
    covered = sum(min(tile, resolution - start) for start in range(0, resolution, stride))
    return (covered / resolution) ** 2


def vae_seconds(family: str, resolution: int, *, decode: bool, fp32: bool = False,
                tiled_at: int = 0, gpu: GPU | str = "t4") -> float:
    """One VAE pass of one image (decode, or the encode of img2img); `tiled_at`: the tile side
    in px when the decode is tiled (0: untiled)."""
    gpu = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu)
    cal = T4_CALIBRATION
    flops = measure_vae(family, resolution, 1, half=True, decode=decode).flops
    if tiled_at:
        flops *= tile_factor(resolution, tiled_at)
    rate = (gpu.fp32_tflops * cal.vae_fp32_efficiency if fp32
            else gpu.fp16_tflops * cal.tensor_efficiency)
    return flops / (rate * 1e12)


def fast_pack_image_seconds(family: str, resolution: int) -> float:
    """What a few-step LoRA's render costs beyond its steps and decode, per pipeline call.

    Hugging Face's LCM-LoRA blog measured 8.4 s for a 4-step SDXL image on a T4 (guidance 1,
    the stock VAE decoding in fp32); the FLOP count says about 3.7 s. The rest (the unfused
    LoRA's extra layers on every projection, LCM's scheduler, the pipeline's own work) is not
    FLOPs the model sees: fitted on that one figure (a calibration point, not evidence),
    and scaled to other families and sizes by a denoising step's FLOPs."""
    from .published import SDXL_T4_LCM_IMAGE_S

    (steps, published), = SDXL_T4_LCM_IMAGE_S.items()
    t4 = resolve_gpu("t4")
    alone = (steps * sampling_step_seconds("sdxl", 1024, False, t4)
             + vae_seconds("sdxl", 1024, decode=True, fp32=True, gpu=t4))
    scale = (measure_sampling(family, resolution, half=True).flops
             / measure_sampling("sdxl", 1024, half=True).flops)
    return (published - alone) * scale


def render_seconds(family: str, resolution: int, steps: int, guidance: float, *,
                   tiled_at: int = 0, gpu: GPU | str = "t4", fast_pack: bool = False) -> float:
    """One text-to-image render: its steps and its decode (the prompt's encode is a few
    GFLOPs, nothing beside them), and with a few-step LoRA its per-call cost."""
    return (steps * sampling_step_seconds(family, resolution, guidance > 1, gpu)
            + vae_seconds(family, resolution, decode=True, tiled_at=tiled_at, gpu=gpu)
            + (fast_pack_image_seconds(family, resolution) if fast_pack else 0.0))


def face_pass_seconds(cfg: GenerateConfig, gpu: GPU | str = "t4", *, steps: int | None = None,
                      guidance: float | None = None, tiled_at: int = 0) -> float:
    """The face-detail pass of one headshot (one face): img2img at the model's resolution,
    int(steps x strength) denoising steps, an encode and a decode (and with a few-step LoRA
    its per-call cost)."""
    from ..facedetail import pass_steps

    steps = cfg.steps if steps is None else steps
    guidance = cfg.guidance if guidance is None else guidance
    n = int(pass_steps(steps, cfg.face_detail_strength) * cfg.face_detail_strength)
    res = cfg.resolution
    return (n * sampling_step_seconds(cfg.family, res, guidance > 1, gpu)
            + vae_seconds(cfg.family, res, decode=False, gpu=gpu)
            + vae_seconds(cfg.family, res, decode=True, tiled_at=tiled_at, gpu=gpu)
            + (fast_pack_image_seconds(cfg.family, res) if cfg.fast_pack else 0.0))


def decode_tile(cfg: GenerateConfig, gpu: GPU) -> int:
    """The tile side a pack's decode will use on `gpu` (0: untiled), as
    generate.shots.save_decode_memory decides it (placement.tiles_decode)."""
    from ..placement import tiles_decode
    from .gpus import CUDA_CONTEXT_GIB, GIB

    weights = 2 * sum(parameter_counts(cfg.family).values())
    free = gpu.budget_gb * GB - CUDA_CONTEXT_GIB * GIB - weights
    return tiles_decode(cfg.family, cfg.resolution, free)


def journey_eta(preset: Preset | str, gpu: str | GPU = "t4", *, plan=None,
                n_photos: int = PHOTOS) -> Eta:
    """Predicted seconds of every phase of a preset's journey on `gpu`: download and loads,
    prepare, training (the fit check's step time), validation renders, checkpoints, the pack
    (styles x seeds), its face-detail pass, and evaluate. `plan`: the fit check's plan of the
    preset's training, when already made."""
    from .check import fit_check
    from ..fastpacks import FAST_PACKS

    p = get_preset(preset) if isinstance(preset, str) else preset
    gpu = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu)
    t, g = p.train, p.generate
    plan = plan or fit_check(t, gpu, suggest=False)
    weights = 2 * sum(parameter_counts(t.family).values())  # fp16 bytes
    n_images = len(g.styles or _all_styles()) * len(g.seeds)
    phases: dict[str, float] = {}
    formulas: dict[str, str] = {}
    notes: list[str] = []

    def add(name: str, seconds: float, formula: str) -> None:
        phases[name], formulas[name] = seconds, formula

    if p.needs_download:
        add("download", weights / HUB_BYTES_PER_S,
            f"{weights / GB:.1f} GB of fp16 weights at {HUB_BYTES_PER_S / 1e6:.0f} MB/s "
            "(assumed)")
    # Training loads the pipeline, generate loads it again (training frees its models first:
    # holding both runs Colab's host RAM out).
    add("loads", 2 * weights / LOAD_BYTES_PER_S,
        f"2 x {weights / GB:.1f} GB from disk to GPU at {LOAD_BYTES_PER_S / 1e6:.0f} MB/s "
        "(assumed)")
    encode = vae_seconds(t.family, t.resolution, decode=False, gpu=gpu)
    add("prepare + caching", n_photos * (DLIB_S + encode),
        f"{n_photos} photos x (dlib {DLIB_S} s + VAE encode {encode:.2f} s)")
    if math.isnan(plan.step_seconds):
        notes.append("The training plan does not fit this GPU: no training time.")
        add("training", math.nan, "does not fit")
    else:
        add("training", t.steps * plan.step_seconds,
            f"{t.steps} steps x {plan.step_seconds:.2f} s (the fit check)")
    n_val = t.steps // t.validate_every if t.validate_every else 0
    renders = n_val * len(t.validation_prompts) * len(t.validation_seeds)
    val_render = render_seconds(t.family, t.resolution, t.validation_steps, 7.0, gpu=gpu)
    add("validation", renders * (val_render + DLIB_S),
        f"{n_val} validations x {renders // max(n_val, 1)} renders x ({t.validation_steps} steps"
        f" = {val_render:.1f} s + scoring {DLIB_S} s)")
    n_ckpt = math.ceil(t.steps / t.checkpoint_every) if t.checkpoint_every else 1
    add("checkpoints", n_ckpt * CHECKPOINT_S, f"{n_ckpt} x {CHECKPOINT_S} s (assumed)")
    from ..fastpacks import active_pack

    g = dataclasses.replace(g, fast_pack=active_pack(g.fast_pack))
    tile = decode_tile(g, gpu)
    steps, guidance = g.steps, g.guidance
    if g.fast_pack:
        pack = FAST_PACKS[g.fast_pack]
        steps, guidance = pack.steps, pack.guidance
    image = render_seconds(g.family, g.resolution, steps, guidance, tiled_at=tile, gpu=gpu,
                           fast_pack=bool(g.fast_pack))
    how = f"{g.fast_pack}, " if g.fast_pack else ""
    add("images", n_images * image,
        f"{n_images} images x {image:.1f} s ({how}{steps} steps at "
        f"{sampling_step_seconds(g.family, g.resolution, guidance > 1, gpu):.2f} s + decode"
        f"{' tiled' if tile else ''})")
    if g.face_detail:
        face = face_pass_seconds(g, gpu, steps=steps, guidance=guidance, tiled_at=tile)
        add("face pass", n_images * face,
            f"{n_images} faces x {face:.1f} s (img2img at strength {g.face_detail_strength})")
    add("evaluate", (n_images + n_photos) * DLIB_S,
        f"{n_images + n_photos} faces x dlib {DLIB_S} s")
    if gpu.guessed or gpu.key != "t4":
        notes.append("Rates are calibrated on a T4; other GPUs scale by their datasheet.")
    return Eta(gpu.name, phases, formulas, notes)


def _all_styles() -> list[str]:
    from ..styles import load_styles

    return list(load_styles())


def write_eta(folder: str | Path, eta: Eta, measured: dict[str, float]) -> Path:
    """`folder`/eta.json: each phase's predicted and measured seconds (None where one side has
    no such phase; a measured "a + b" stands beside the predicted a and b added), and the
    totals."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in dict.fromkeys([*eta.phases, *measured]):
        # A measured phase may time several predicted ones at once ("images + face pass").
        parts = [p for p in name.split(" + ") if p in eta.phases]
        predicted = (eta.phases.get(name) if name in eta.phases
                     else sum(eta.phases[p] for p in parts) if parts else None)
        rows[name] = {"predicted_s": _round(predicted), "measured_s": _round(measured.get(name))}
    data = {"gpu": eta.gpu, "phases": rows,
            "predicted_total_s": _round(eta.total_seconds),
            "measured_total_s": _round(sum(measured.values())) if measured else None,
            "formulas": eta.formulas}
    path = folder / "eta.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 1)
