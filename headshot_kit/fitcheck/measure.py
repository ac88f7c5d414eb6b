"""Measuring on `meta` tensors: the real architectures, built from their configs without
weights, run one training step (or one encode, decode or denoising step) while a dispatch mode
keeps the bytes of every live tensor and counts FLOPs.

Parameters, gradients and optimizer states are counted by dtype from the architecture configs
in `headshot_kit/data/arch/*.json`. Activation memory is measured: the UNet forward + loss +
backward, with the peft LoRA attached (`headshot_kit.lora.add_lora`, as the train stage attaches it)
or the whole UNet trainable, gradient checkpointing on or off, at the configured resolution,
with the train stage's own loss function (face-weighted or plain).
CUDA's kernel choices (memory-efficient attention, autocast) are emulated, since meta tensors
would take other paths. Results are cached for the life of the process.
"""

from __future__ import annotations

import functools
import json
import math
import time
import weakref
from contextlib import nullcontext
from dataclasses import KW_ONLY, dataclass
from importlib import resources
from typing import Any

from ..config import UNET_TARGETS, ConfigError
from ..lora import add_lora

# Prompts are padded to CLIP's full context (tokenizer.model_max_length).
TEXT_TOKENS = 77
# bitsandbytes 8-bit Adam (0.45+): two uint8 states, one fp32 absmax per block of 256 values per
# state, and two 256-entry fp32 quantisation maps per tensor; tensors smaller than
# `optimizer_min_8bit_size` keep two fp32 states (read off bnb.optim.AdamW8bit's state here).
BNB_BLOCK = 256
BNB_QMAP_BYTES = 2 * 256 * 4


@functools.cache
def load_arch(family: str) -> dict:
    """The architecture configs of a family (unet, vae, text_encoders), from data/arch/."""
    path = resources.files("headshot_kit") / "data" / "arch" / f"{family}.json"
    if not path.is_file():
        raise ConfigError(f"No architecture config for family {family!r}: expected {path}.")
    return json.loads(path.read_text())


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


class Quiet:
    """diffusers and transformers chatter about configs and dtypes that do not matter here."""

    def __enter__(self):
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        self.loggers = (dlog, tlog)
        self.levels = [log.get_verbosity() for log in self.loggers]
        for log in self.loggers:
            log.set_verbosity_error()

    def __exit__(self, *exc):
        for log, level in zip(self.loggers, self.levels, strict=True):
            log.set_verbosity(level)


def build_unet(family: str, device: str = "meta"):
    """A family's UNet from its data/arch/ config: shapes only on `meta`, random weights on a
    real device."""
    import torch
    from diffusers import UNet2DConditionModel

    with Quiet(), torch.device(device):
        return UNet2DConditionModel.from_config(_public(load_arch(family)["unet"]))


def build_vae(family: str, device: str = "meta"):
    """A family's VAE, as `build_unet` builds its UNet."""
    import torch
    from diffusers import AutoencoderKL

    with Quiet(), torch.device(device):
        return AutoencoderKL.from_config(_public(load_arch(family)["vae"]))


def build_text_encoders(family: str, device: str = "meta") -> list:
    """A family's text encoders, as `build_unet` builds its UNet."""
    import torch
    import transformers

    encoders = []
    for config in load_arch(family)["text_encoders"]:
        cls = getattr(transformers, config["_class_name"])
        with Quiet(), torch.device(device):
            encoders.append(cls(transformers.CLIPTextConfig(**_public(config))))
    return encoders


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_arch(family: str, device: str = "meta") -> dict:
    """A family's models from data/arch/, by pipeline name: shapes only on `meta`, freshly
    initialised random weights on a real device (bench/gpu_check.py's stand-in models)."""
    models = {"unet": build_unet(family, device), "vae": build_vae(family, device)}
    for i, encoder in enumerate(build_text_encoders(family, device)):
        models["text_encoder" + (f"_{i + 1}" if i else "")] = encoder
    return models


@functools.cache
def parameter_counts(family: str) -> dict[str, int]:
    """Exact parameter counts of a family's models, from their configs built on `meta`."""
    return {name: _count(model) for name, model in build_arch(family).items()}


def text_targets(family: str) -> tuple[str, ...]:
    from ..families import get_family

    return get_family(family).text_encoder_targets


@functools.cache
def trainable_sizes(family: str, mode: str, rank: int, targets: tuple[str, ...], *,
                    text_encoder: bool) -> tuple[int, ...]:
    """The element count of every trainable tensor: the whole UNet ("full") or the LoRA tensors
    peft adds (plus the text encoders' LoRA when `text_encoder`)."""
    unet = build_unet(family)
    if mode == "full":
        sizes = [p.numel() for p in unet.parameters()]
    else:
        add_lora(unet, rank, targets=targets)
        sizes = [p.numel() for p in unet.parameters() if p.requires_grad]
    if text_encoder:
        for encoder in build_text_encoders(family):
            add_lora(encoder, rank, targets=text_targets(family))
            sizes += [p.numel() for p in encoder.parameters() if p.requires_grad]
    return tuple(sizes)


def optimizer_bytes(sizes: tuple[int, ...], optimizer: str, min_8bit_size: int = 4096) -> int:
    """Bytes of optimizer state for trainable tensors of these sizes (fp32 parameters)."""
    if optimizer == "prodigy":
        # Prodigy keeps exp_avg, exp_avg_sq, the initial point p0 and s: four fp32 tensors.
        return 16 * sum(sizes)
    if optimizer != "adamw8bit":
        return 8 * sum(sizes)  # torch AdamW: exp_avg and exp_avg_sq in fp32
    total = 0
    for n in sizes:
        if n < min_8bit_size:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) + BNB_QMAP_BYTES
    return total


class LiveBytes:
    """A dispatch mode that keeps the bytes of every live tensor storage, and counts FLOPs.

    Every storage an op returns is added once and removed when Python frees it (a weakref
    finalizer on the storage). Storages in `ignore` (the weights, counted separately) are
    skipped. `mark_gradient` moves a parameter's .grad from the activation tally to the gradient
    tally. FLOPs come from torch.utils.flop_counter's formulas (as FlopCounterMode, without its
    module tracking, which keeps tensors alive). Limits: only storages are seen, so scratch
    space inside one kernel (cuDNN workspaces, the attention kernel's tiles) and allocator
    rounding are not; FRAGMENTATION and CUDA_CONTEXT_GIB stand in for them.
    """

    def __init__(self, ignore: set[int]):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                count = flop_registry.get(func._overloadpacket)
                if count is not None:
                    tracker.flops += count(*args, **kwargs, out_val=out)
                tracker._add(out)
                return out

        self.mode = Mode()
        self.ignore = ignore
        self.sizes: dict[int, int] = {}
        self.grad_keys: set[int] = set()
        self.activations = self.gradients = self.flops = 0
        self.peak = self.activation_peak = 0
        self.at_peak = (0, 0)

    def _add(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.sizes or key in self.ignore:
                continue
            self.sizes[key] = storage.nbytes()
            self.activations += self.sizes[key]
            weakref.finalize(storage, self._free, key)
        self.activation_peak = max(self.activation_peak, self.activations)
        if self.activations + self.gradients > self.peak:
            self.peak = self.activations + self.gradients
            self.at_peak = (self.activations, self.gradients)

    def _free(self, key: int) -> None:
        size = self.sizes.pop(key)
        if key in self.grad_keys:
            self.grad_keys.discard(key)
            self.gradients -= size
        else:
            self.activations -= size

    def mark_gradient(self, param) -> None:
        key = param.grad.untyped_storage()._cdata
        if key in self.sizes and key not in self.grad_keys:
            self.grad_keys.add(key)
            self.activations -= self.sizes[key]
            self.gradients += self.sizes[key]


def _tracker(*models) -> LiveBytes:
    return LiveBytes({t.untyped_storage()._cdata for m in models
                       for t in [*m.parameters(), *m.buffers()]})


def _kernels(autocast_dtype, cache: bool):
    """CUDA's kernel choices, emulated for meta tensors at the torch-function level.

    Attention goes to PyTorch's memory-efficient SDPA kernel, which is what a T4 runs (meta
    tensors would take the math path and hold the whole attention matrix). With an
    `autocast_dtype`, CUDA autocast is emulated too, since torch.autocast ignores meta tensors
    and what autocast casts is what it saves for backward: matmuls, convolutions and attention
    run in that dtype; normalisations, softmax, exp and the MSE loss in fp32 (torch.amp's CUDA
    op lists, the ops a diffusion UNet uses). Casts of fp32 leaf parameters that require grad
    are cached until the region ends, as autocast does, so full fine-tuning holds an fp16 copy
    of every weight until its forward ends.
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_map

    low = {F.linear, F.conv2d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
           torch.Tensor.__matmul__, F.scaled_dot_product_attention}
    high = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax,
            F.mse_loss, torch.exp}

    class Kernels(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.cache: dict[int, Any] = {}

        def cast(self, x, to):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == to:
                return x
            if cache and to == autocast_dtype and x.is_leaf and x.requires_grad:
                if id(x) not in self.cache:
                    self.cache[id(x)] = x.to(to)
                return self.cache[id(x)]
            return x.to(to)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if autocast_dtype is not None and (func in low or func in high):
                to = autocast_dtype if func in low else torch.float32
                args, kwargs = tree_map(lambda x: self.cast(x, to), (args, kwargs))
            if func is F.scaled_dot_product_attention:
                return _efficient_attention(*args, **kwargs)
            return func(*args, **kwargs)

        def __exit__(self, *exc):
            self.cache.clear()  # autocast drops its weight cache when the region ends
            return super().__exit__(*exc)

    return Kernels()


def _efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    import torch

    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]


def _checkpointing(autocast_dtype):
    """diffusers' default checkpointing function, with our kernel emulation re-entered for the
    recompute (real autocast state is restored by torch.utils.checkpoint; ours is a mode, so it
    is handed over through `context_fn`)."""
    from torch.utils.checkpoint import checkpoint

    def context():
        return nullcontext(), _kernels(autocast_dtype, cache=False)

    def run(module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context)

    return run


@dataclass(frozen=True)
class StepMeasurement:
    """What one UNet forward + backward held and computed, measured on meta tensors (bytes).

    peak: the most bytes of activations + gradients alive at once during the step, split into
      activations_at_peak and gradients_at_peak;
    activation_peak: the most bytes of activations alone (what sits on top of gradients that
      already exist, e.g. when micro-batches accumulate into them);
    saved_for_backward: what was still alive when the forward ended;
    flops: forward + backward, checkpointing's recompute included.
    """

    peak: int
    activations_at_peak: int
    gradients_at_peak: int
    activation_peak: int
    saved_for_backward: int
    flops: int
    seconds: float


def _unet_inputs(family: str, batch: int, dtype) -> dict:
    import torch

    arch = load_arch(family)["unet"]
    inputs = {"encoder_hidden_states": torch.empty(
        batch, TEXT_TOKENS, arch["cross_attention_dim"], device="meta", dtype=dtype)}
    if arch.get("addition_embed_type") == "text_time":
        # SDXL's micro-conditioning: the pooled text embedding plus 6 size/crop numbers, each
        # embedded to addition_time_embed_dim.
        pooled = arch["projection_class_embeddings_input_dim"] - 6 * arch[
            "addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype)}
    return inputs


@dataclass(frozen=True)
class StepSpec:
    """One training step to measure: the family's UNet at `resolution`, seeing `batch` images
    (prior preservation doubles the batch), in `mode` "lora" (frozen UNet, the peft LoRA of
    `rank` on `targets` trainable, as the train stage sets it up) or "full" (every UNet weight
    trainable, fp32 master weights under fp16 autocast, as accelerate's mixed precision does).

    checkpointing: gradient checkpointing on. half=False: fp32 throughout, no autocast (bf16 is
    measured as fp16: same sizes). weighted: the face-weighted loss (background_weight below
    1), with the batch's fp32 weight map on the latent grid alive through the step, as the
    train stage selects it with the latents. Hashable: `measure_step` is cached per spec.
    """

    family: str
    resolution: int
    batch: int
    _: KW_ONLY
    mode: str
    checkpointing: bool
    rank: int = 4
    targets: tuple[str, ...] = UNET_TARGETS
    half: bool = True
    weighted: bool = False


@functools.cache
def measure_step(spec: StepSpec) -> StepMeasurement:
    """Run one training step of the real UNet on meta tensors, as `spec` says, and measure what
    it holds. Cached per spec for the life of the process."""
    import torch

    from ..objective import per_image_mse

    start = time.perf_counter()
    dtype = torch.float16 if spec.half else None
    unet = build_unet(spec.family)
    if spec.mode == "lora":
        if spec.half:
            torch.nn.Module.to(unet, torch.float16)  # the frozen model (skips diffusers' warning)
        add_lora(unet, spec.rank, targets=spec.targets)
    if spec.checkpointing:
        unet.enable_gradient_checkpointing(_checkpointing(dtype))
    unet.train()
    tracker = _tracker(unet)
    for p in unet.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(tracker.mark_gradient)
    batch, side = spec.batch, spec.resolution // 8
    latents = torch.empty(batch, load_arch(spec.family)["unet"]["in_channels"], side, side,
                          device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    with tracker.mode:
        weights = torch.empty(batch, 1, side, side, device="meta") if spec.weighted else None
        with _kernels(dtype, cache=True):
            pred = unet(latents.to(unet.dtype), timesteps,
                        **_unet_inputs(spec.family, batch, dtype or torch.float32)).sample
            loss = per_image_mse(pred, latents, weights).mean()
        saved = tracker.activations
        del weights  # from here only the loss's backward holds it, as in the train stage
        loss.backward()
        del loss, pred
    return StepMeasurement(tracker.peak, *tracker.at_peak, tracker.activation_peak, saved,
                           int(tracker.flops), time.perf_counter() - start)


@dataclass(frozen=True)
class Transient:
    """The most bytes a no-grad pass (or a text-encoder LoRA forward + backward) held on top of
    its weights, and its FLOPs."""

    peak: int
    flops: int


def _transient(models: list, run, grad: bool = False, dtype=None) -> Transient:
    import torch

    peak = flops = 0
    for model in models:
        tracker = _tracker(model)
        with torch.set_grad_enabled(grad), tracker.mode, _kernels(dtype, cache=False):
            run(model)
        peak, flops = max(peak, tracker.activation_peak), flops + tracker.flops
    return Transient(peak, int(flops))


def _to(model, half: bool):
    import torch

    if half:
        torch.nn.Module.to(model, torch.float16)
    return model


@functools.cache
def measure_vae(family: str, resolution: int, batch: int, *, half: bool,
                decode: bool = False) -> Transient:
    """The VAE encoding `batch` photos (or decoding one latent) without gradients, on meta."""
    import torch

    vae = _to(build_vae(family), half)
    dtype = vae.dtype
    if decode:
        side = resolution // 8
        z = torch.empty(1, vae.config.latent_channels, side, side, device="meta", dtype=dtype)
        return _transient([vae], lambda m: m.decode(z))
    pixels = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=dtype)
    return _transient([vae], lambda m: m.encode(pixels).latent_dist.sample())


@functools.cache
def measure_text(family: str, batch: int, *, half: bool, lora_rank: int = 0) -> Transient:
    """The text encoders on `batch` prompts: without gradients, or (lora_rank > 0) with a LoRA
    trained through them, forward + backward."""
    import torch

    encoders = [_to(e, half) for e in build_text_encoders(family)]
    tokens = torch.zeros(batch, TEXT_TOKENS, dtype=torch.long, device="meta")
    if not lora_rank:
        return _transient(encoders, lambda m: m(tokens, output_hidden_states=True))
    for encoder in encoders:
        add_lora(encoder, lora_rank, targets=text_targets(family))

    def train(model):
        out = model(tokens, output_hidden_states=True)
        out.hidden_states[-2].float().sum().backward()

    return _transient(encoders, train, grad=True, dtype=torch.float16 if half else None)


@functools.cache
def measure_sampling(family: str, resolution: int, *, half: bool) -> Transient:
    """One denoising step of a validation image (batch 2 for classifier-free guidance), no
    gradients, LoRA weights aside (they are tiny)."""
    import torch

    unet = _to(build_unet(family), half)
    side = resolution // 8
    dtype = unet.dtype
    latents = torch.empty(2, load_arch(family)["unet"]["in_channels"], side, side,
                          device="meta", dtype=dtype)
    timesteps = torch.zeros(2, dtype=torch.long, device="meta")
    inputs = _unet_inputs(family, 2, dtype)
    return _transient([unet], lambda m: m(latents, timesteps, **inputs))
