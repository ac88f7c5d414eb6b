"""Optimizers: bitsandbytes' 8-bit AdamW (its state at one byte per value) once it has been
seen to work, torch AdamW as the fallback, or Prodigy."""

from __future__ import annotations

import warnings

import torch

from ..config import ConfigError, TrainConfig

# Elements of the tensor that proves the 8-bit optimizer runs: a few of bitsandbytes' 256-value
# quantisation blocks.
BNB_PROBE_SIZE = 1024


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
