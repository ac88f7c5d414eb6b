"""What sits on the GPU during each phase of a training run: one decision, two readers.

The train stage moves the pipeline's parts by it, and the fit check predicts memory by it, so
the prediction is of the run that actually happens. The phases:

- caching: the whole pipeline is on the GPU while every photo (in chunks) and caption is
  encoded once;
- training: the UNet and its LoRA train; the parts that are no longer needed wait on the CPU
  ("parked"), the others stay and run every micro-batch;
- validation: the parked parts come back to render, then leave again.

And one decision of generation: whether a decode runs in tiles (`tiles_decode`), which the
generate stage applies and the journey ETA predicts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig


@dataclass(frozen=True)
class Placement:
    """Where the VAE and the text encoders are while the UNet trains, and what runs when."""

    # Pipeline parts moved to the CPU once the photos and captions are encoded.
    parked: tuple[str, ...]
    # The VAE stays on the GPU and encodes every micro-batch (latents not cached).
    vae_every_step: bool
    # The captions are encoded again every micro-batch (a text-encoder LoRA is training).
    text_every_step: bool
    # The text encoders stay on the GPU while the UNet trains.
    text_on_gpu: bool
    # Photos per VAE call while caching latents.
    cache_chunk: int


def cache_chunk(resolution: int) -> int:
    """Photos per VAE call while caching latents: 8 at 512 px, 32 at 256 px (the count falls
    with the pixel count), and one at any size above 512 px.

    Measured with the fit check: 8 photos per call at 1024 px peak at 19.9 GB on SDXL, beyond
    a T4's 16 GB; one at a time needs 9.6 GB."""
    return max(1, 8 * (512 // resolution) ** 2)


def training_placement(cfg: TrainConfig) -> Placement:
    """The placement of a run with these settings on a GPU.

    Latents cached: the VAE leaves the GPU once every photo is encoded, and so do the text
    encoders, unless a text-encoder LoRA trains (its weights and their optimizer state stay
    on the GPU together, and captions are encoded at every step). Latents not cached: nothing
    leaves; the VAE encodes every micro-batch.
    """
    from .families import get_family

    encoders = get_family(cfg.family).text_encoders
    if not cfg.cache_latents:
        parked: tuple[str, ...] = ()
    else:
        parked = ("vae", *(() if cfg.train_text_encoder else encoders))
    return Placement(parked=parked, vae_every_step="vae" not in parked,
                     text_every_step=cfg.train_text_encoder,
                     text_on_gpu=not set(encoders) & set(parked),
                     cache_chunk=cache_chunk(cfg.resolution))


# The SDXL VAE's 1024 px decode in fp16 holds 1.6 GB of activations at its peak (measured on
# meta tensors, fitcheck.measure_vae; tests/test_eta.py checks it); twice that leaves room for
# allocator rounding and cuDNN workspaces.
UNTILED_DECODE_BYTES_1024 = 2 * 1.6e9
# Tiles of the fp16-fix VAE's sample_size (512 px), as diffusers tiles them.
DECODE_TILE = 512


def tiles_decode(family: str, resolution: int, free_bytes: float) -> int:
    """The tile side (px) a decode needs with `free_bytes` of GPU memory left, 0 = untiled:
    only a family that asks for tiles (SDXL) and only where one decode at once does not fit.
    With the SDXL pipeline on a T4 about 7 GB stay free, so a 1024 px decode runs whole:
    tiling it would decode 1.56x the pixels (9 overlapping tiles)."""
    from .families import get_family

    if not get_family(family).tiled_decode:
        return 0
    return 0 if free_bytes >= UNTILED_DECODE_BYTES_1024 * (resolution / 1024) ** 2 else (
        DECODE_TILE)
