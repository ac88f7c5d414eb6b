"""The training loss: the denoising MSE of a batch, with min-SNR weighting and offset noise,
all its randomness drawn from one generator so a resumed run repeats an uninterrupted one."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..families import Conditioning


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
