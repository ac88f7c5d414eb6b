"""The training loss: the denoising MSE of a batch, with min-SNR weighting and offset noise,
all its randomness drawn from one generator so a resumed run repeats an uninterrupted one.

The face weighs more than the background: each latent pixel's error counts by a weight map
made from the prepare stage's face mask (`loss_weights`), as replicate/cog-sdxl multiplies its
loss by a face mask and OneTrainer's masked training weights the unmasked area by
`unmasked_weight`. Each image's loss is its weighted mean (`per_image_mse`), so values stay
comparable across weights and equal the plain MSE when the weights are uniform."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..families import Conditioning
from ..objective import per_image_mse

# What the UNet can be trained to predict: the noise, or the velocity (Salimans & Ho 2022). A
# diffusers training script raises for any other, and so does diffusion_loss.
PREDICTION_TYPES = ("epsilon", "v_prediction")


def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
    return latents.float() * vae.config.scaling_factor


def loss_weights(masks: torch.Tensor, size: tuple[int, int],
                 background_weight: float) -> torch.Tensor:
    """Per-pixel loss weights on the latent grid, (N, 1, h, w), from face masks (N, 1, H, W) in
    [0, 1]: `background_weight` where the mask is 0, 1 where it is 1, in between on its soft
    edge. Each latent pixel takes the mean of the mask pixels it covers (area averaging), as
    the VAE's 8 x 8 pixels make one latent."""
    small = F.interpolate(masks.float(), size=size, mode="area")
    return background_weight + (1.0 - background_weight) * small


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: a copy from ordinary (pageable)
    memory to a GPU waits for every kernel queued before it, so the CPU could not run ahead of
    the GPU; from pinned memory it is queued like a kernel (PyTorch keeps the pinned buffer
    until the copy is done)."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, cond: Conditioning, *,
                   generator: torch.Generator, snr_gamma: float | None = None,
                   noise_offset: float = 0.0, weights: torch.Tensor | None = None,
                   reduce: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The denoising loss of one batch: the UNet's prediction vs its target, per image or mean.

    `weights`: per-pixel loss weights on the latent grid (`loss_weights`); None weighs every
    pixel alike. All randomness comes from `generator`, so a fixed generator gives a fixed loss
    and a resumed run draws the same noise as an uninterrupted one. `dtype`: the UNet's input
    dtype; a training loop passes it, read once: `unet.dtype` walks the model's parameters
    (tens of milliseconds a call on SD 1.5, hundreds on SDXL, bench/step_overhead.py).
    """
    kind = noise_scheduler.config.prediction_type
    if kind not in PREDICTION_TYPES:
        raise ConfigError(f"The model's noise scheduler predicts {kind!r}, which training does "
                          f"not know; it trains {' and '.join(map(repr, PREDICTION_TYPES))} "
                          "models (as diffusers' DreamBooth scripts do): choose a model whose "
                          "scheduler_config.json names one of them.")
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((n, latents.shape[1], 1, 1),
                                                   generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,),
                              generator=generator)
    noise, timesteps = to_device(noise, latents.device), to_device(timesteps, latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    dtype = dtype or unet.dtype
    pred = unet(noisy.to(dtype), timesteps, **cond.unet_kwargs(dtype)).sample
    v_pred = kind == "v_prediction"
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
    per_image = per_image_mse(pred, target, weights)
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        # Min-SNR-gamma (Hang et al. 2023): down-weight the easy, low-noise timesteps.
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_pred else snr)
        per_image = per_image * weight.float()
    return per_image.mean() if reduce else per_image


def fixed_batch_loss(unet, noise_scheduler, latents, cond: Conditioning, seed: int = 1234,
                     repeats: int = 8, weights: torch.Tensor | None = None) -> float:
    """Mean MSE (no min-SNR weighting; face-weighted by `weights` when given) over fixed noise
    and timesteps: comparable before and after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(np.mean([float(diffusion_loss(unet, noise_scheduler, latents, cond,
                                                   generator=generator, weights=weights))
                              for _ in range(repeats)]))
