"""Fit check: will a training run fit the GPU, how long will a step take, and what is the
cheapest change when it does not fit.

`fit_check(cfg, gpu="t4")` predicts, without a GPU and without downloading weights:

- peak GPU memory. Parameters, gradients and optimizer states are counted by dtype from the
  real architecture configs in `headshot_kit/data/arch/*.json`, with the models built on the
  `meta` device (shapes, no data). Activation memory is *measured*: the real training step
  (UNet forward + loss + backward, with the peft LoRA attached or the whole UNet trainable,
  gradient checkpointing on or off) runs on meta tensors at the configured resolution while a
  dispatch mode keeps the bytes of every tensor storage alive at each moment (`measure_step`).
  The run is split into phases (caching, encoding, forward/backward, optimizer step,
  validation); the peak is the largest. Fixed overheads (CUDA context, allocator
  fragmentation) are added, each with its source beside it;
- time per step: FLOPs counted on the same meta runs (checkpointing's recompute included) at
  the GPU's datasheet peak times an efficiency, plus a fixed per-micro-batch overhead. The
  efficiencies and the overhead are calibrated on ONE published T4 table (full SD 1.x
  DreamBooth, 0.93 it/s, and its neighbouring rows; `calibrate()`) and used for every GPU;
- peak host RAM, roughly, per phase (load, train, save, reload).

How rough: the published SD 1.x memory figures are reproduced within a few percent; the
published SDXL T4 LoRA run is predicted to fit and its 7.96 s/step is predicted about 30% slow.
Expect +-15% on memory (allocator fragmentation and CUDA library workspaces are a flat
allowance, not a measurement) and +-30% or worse on time (two efficiencies and one overhead for
every kernel and every GPU; other GPUs than the T4 are not calibrated at all). Host RAM is the
roughest: a baseline guessed for Colab plus the weights each phase holds; `bench/` measures it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .config import ConfigError, TrainConfig, get_preset, validate_train

GB = 1e9  # the published figures and our tables are in GB (10^9 bytes)
GIB = 2**30  # nvidia-smi reports GPU memory in MiB ("15360MiB" on a T4)

# ---------------------------------------------------------------------------------------------
# Constants, each with where it comes from. The first two are flat allowances, not measured.

# CUDA context + cuBLAS/cuDNN handles and workspaces, which nvidia-smi counts but PyTorch's
# allocator does not: 300-500 MiB on a T4 with CUDA 12 lazy loading once the first conv and
# matmul have run (nvidia-smi minus torch.cuda.memory_reserved, as users report it).
CUDA_CONTEXT_GIB = 0.45
# The caching allocator reserves more than the tensors need (sizes rounded up, 2 MiB segments
# for small blocks, split blocks that cannot be reused): reserved/allocated ratios of 1.05-1.2
# are what torch.cuda.memory_summary() shows for steady training loops. We assume 10%.
FRAGMENTATION = 1.10


def cache_chunk(resolution: int) -> int:
    """Photos per VAE call while train.py caches latents: 8 at 512 px, one at 1024 px.

    Measured here: 8 photos per call at 1024 px peak at 19.9 GB on SDXL, beyond a T4's 16 GB;
    one at a time needs 9.6 GB. The count shrinks with the pixel count."""
    return max(1, 8 * (512 // resolution) ** 2)


def parked_after_caching(cfg: TrainConfig) -> tuple[str, ...]:
    """The pipeline parts train.py moves off the GPU once the photos and captions are encoded.

    The VAE leaves when latents are cached; the text encoders too, unless a text-encoder LoRA
    trains: its weights and their optimizer state stay on the GPU together."""
    from .families import get_family

    if not cfg.cache_latents:
        return ()
    return ("vae", *(() if cfg.train_text_encoder else get_family(cfg.family).text_encoders))

# Prompts are padded to CLIP's full context (tokenizer.model_max_length).
TEXT_TOKENS = 77
# bitsandbytes 8-bit Adam (0.45+): two uint8 states, one fp32 absmax per block of 256 values per
# state, and two 256-entry fp32 quantisation maps per tensor; tensors smaller than
# `optimizer_min_8bit_size` keep two fp32 states (read off bnb.optim.AdamW8bit's state here).
BNB_BLOCK = 256
BNB_QMAP_BYTES = 2 * 256 * 4
# Bytes an AdamW step reads and writes per trainable fp32 value: weight (read + write) and
# gradient (read), plus the two states (read + write): 1 byte each in 8-bit, 4 in 32-bit.
ADAM_TRAFFIC = {"adamw8bit": 4 + 4 + 4 + 2 * 2, "adamw": 4 + 4 + 4 + 2 * 8,
                "prodigy": 4 + 4 + 4 + 2 * 16}

# Host RAM: the Python kernel with torch, CUDA and diffusers imported, before any model, shows
# about 2 GB on Colab's RAM gauge. An estimate, not measured here (bench/ measures RSS).
HOST_BASELINE_GB = 2.0
# Free Colab's host RAM, as its resource panel shows it for a T4 runtime.
COLAB_HOST_RAM_GB = 12.7
# Photos held as float pixels while training without cached latents: 5-20 selfies (REFERENCE).
HOST_PHOTOS = 20

# ---------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    # What nvidia-smi reports as the card's total, context included: the budget.
    memory_gib: float
    # Dense (no sparsity) tensor-core fp16/bf16 peak and plain fp32 peak, from the datasheets.
    fp16_tflops: float
    fp32_tflops: float
    bandwidth_gbs: float
    bf16: bool
    # Regular expressions that all match torch.cuda.get_device_name() (lower case) of the card.
    match: tuple[str, ...]
    # True for a card missing from the table: its speed is the T4's, a guess.
    guessed: bool = False

    @property
    def budget_gb(self) -> float:
        return self.memory_gib * GIB / GB


GPUS: dict[str, GPU] = {g.key: g for g in (
    # NVIDIA T4 datasheet: 16 GB GDDR6 (nvidia-smi: 15360 MiB), 65 TFLOPS mixed-precision fp16,
    # 8.1 TFLOPS fp32, 320 GB/s; Turing has no bf16. Free Colab's GPU.
    GPU("t4", "Tesla T4", 15.0, 65.0, 8.1, 320.0, False, (r"\bt4\b",)),
    # NVIDIA L4 datasheet: 24 GB (nvidia-smi: 23034 MiB), 242 TFLOPS fp16 with sparsity = 121
    # dense, 30.3 TFLOPS fp32, 300 GB/s.
    GPU("l4", "NVIDIA L4", 22.5, 121.0, 30.3, 300.0, True, (r"\bl4\b",)),
    # NVIDIA A10 datasheet: 24 GB, 125 TFLOPS fp16 dense, 31.2 fp32, 600 GB/s. AWS's A10G is a
    # variant without a public datasheet; the A10's figures stand in for it.
    GPU("a10g", "NVIDIA A10G", 22.5, 125.0, 31.2, 600.0, True, (r"\ba10g?\b",)),
    # NVIDIA A100 datasheet: 312 TFLOPS fp16 dense, 19.5 fp32; 40 GB at 1555 GB/s.
    GPU("a100-40g", "NVIDIA A100-SXM4-40GB", 39.6, 312.0, 19.5, 1555.0, True, (r"\ba100\b",)),
    # A100 80 GB SXM: 2039 GB/s.
    GPU("a100-80g", "NVIDIA A100-SXM4-80GB", 80.0, 312.0, 19.5, 2039.0, True,
        (r"\ba100\b", r"80g")),
    # NVIDIA H100 SXM datasheet: 80 GB (nvidia-smi: 81559 MiB), 1979 TFLOPS fp16 with sparsity
    # = 989 dense, 67 fp32, 3.35 TB/s.
    GPU("h100", "NVIDIA H100 80GB HBM3", 79.6, 989.0, 67.0, 3350.0, True, (r"\bh100\b",)),
)}


@dataclass(frozen=True)
class Calibration:
    """How a step's time follows from its FLOPs: t = overhead + F16/(P16 e16) + F32/(P32 e32)
    per micro-batch, plus the optimizer's memory traffic at the datasheet bandwidth."""

    tensor_efficiency: float  # fraction of the fp16 tensor-core peak that UNet work reaches
    fp32_efficiency: float  # fraction of the fp32 peak (a VAE kept in fp32, fp32 training)
    overhead_s: float  # per micro-batch, whatever the FLOPs: Python, launches, syncs


# Calibrated on the T4 only, from ShivamShrirao's DreamBooth table (see `calibrate()`, which
# re-derives these from its rows and our FLOP counts; tests/test_fitcheck.py checks they agree).
# The same numbers are applied to every GPU in the table: a first guess off the T4.
T4_CALIBRATION = Calibration(tensor_efficiency=0.214, fp32_efficiency=0.433, overhead_s=0.592)


def resolve_gpu(name: str, total_memory_bytes: int | None = None) -> GPU:
    """A table key ("t4") or a torch.cuda.get_device_name() ("Tesla T4") -> its GPU entry.

    A card missing from the table needs `total_memory_bytes`; it gets that memory and the T4's
    speed figures, and is marked `guessed`.
    """
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    matches = [g for g in GPUS.values() if all(re.search(m, key) for m in g.match)]
    if matches:
        return max(matches, key=lambda g: len(g.match))  # "a100" + "80g" beats "a100"
    if total_memory_bytes is None:
        raise ConfigError(f"GPU {name!r} is not in the fit-check table ({', '.join(GPUS)}); "
                          "pick one of those.")
    return dataclasses.replace(GPUS["t4"], key="other", name=name, match=(),
                               memory_gib=total_memory_bytes / GIB, guessed=True)


# ---------------------------------------------------------------------------------------------
# Architectures and parameter counts


@functools.cache
def load_arch(family: str) -> dict:
    """The architecture configs of a family (unet, vae, text_encoders), from data/arch/."""
    path = resources.files("headshot_kit") / "data" / "arch" / f"{family}.json"
    if not path.is_file():
        raise ConfigError(f"No architecture config for family {family!r}: expected {path}.")
    return json.loads(path.read_text())


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


class _Quiet:
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


def _meta_unet(family: str, device: str = "meta"):
    import torch
    from diffusers import UNet2DConditionModel

    with _Quiet(), torch.device(device):
        return UNet2DConditionModel.from_config(_public(load_arch(family)["unet"]))


def _meta_vae(family: str, device: str = "meta"):
    import torch
    from diffusers import AutoencoderKL

    with _Quiet(), torch.device(device):
        return AutoencoderKL.from_config(_public(load_arch(family)["vae"]))


def _meta_text_encoders(family: str, device: str = "meta") -> list:
    import torch
    import transformers

    encoders = []
    for config in load_arch(family)["text_encoders"]:
        cls = getattr(transformers, config["_class_name"])
        with _Quiet(), torch.device(device):
            encoders.append(cls(transformers.CLIPTextConfig(**_public(config))))
    return encoders


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_arch(family: str, device: str = "meta") -> dict:
    """A family's models from data/arch/, by pipeline name: shapes only on `meta`, freshly
    initialised random weights on a real device (bench/gpu_check.py's stand-in models)."""
    models = {"unet": _meta_unet(family, device), "vae": _meta_vae(family, device)}
    for i, encoder in enumerate(_meta_text_encoders(family, device)):
        models["text_encoder" + (f"_{i + 1}" if i else "")] = encoder
    return models


@functools.cache
def parameter_counts(family: str) -> dict[str, int]:
    """Exact parameter counts of a family's models, from their configs built on `meta`."""
    return {name: _count(model) for name, model in build_arch(family).items()}


def _add_lora(model, rank: int, targets: tuple[str, ...]) -> None:
    """Attach a LoRA as train.add_lora does: peft on the frozen model, LoRA weights in fp32."""
    import torch
    from peft import LoraConfig

    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    with torch.device("meta"):  # the new LoRA layers are built on meta too
        model.add_adapter(config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.float32)


def _text_targets(family: str) -> tuple[str, ...]:
    from .families import get_family

    return get_family(family).text_encoder_targets


@functools.cache
def trainable_sizes(family: str, mode: str, rank: int, targets: tuple[str, ...],
                    text_encoder: bool) -> tuple[int, ...]:
    """The element count of every trainable tensor: the whole UNet ("full") or the LoRA tensors
    peft adds (plus the text encoders' LoRA when `text_encoder`)."""
    unet = _meta_unet(family)
    if mode == "full":
        sizes = [p.numel() for p in unet.parameters()]
    else:
        _add_lora(unet, rank, targets)
        sizes = [p.numel() for p in unet.parameters() if p.requires_grad]
    if text_encoder:
        for encoder in _meta_text_encoders(family):
            _add_lora(encoder, rank, _text_targets(family))
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


OPTIMIZER_NAMES = {"adamw8bit": "8-bit AdamW", "adamw": "AdamW (32-bit)",
                   "prodigy": "Prodigy (32-bit)"}


# ---------------------------------------------------------------------------------------------
# Measuring on meta tensors


class _LiveBytes:
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


def _tracker(*models) -> _LiveBytes:
    return _LiveBytes({t.untyped_storage()._cdata for m in models
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


@functools.cache
def measure_step(family: str, resolution: int, batch: int, checkpointing: bool, mode: str,
                 rank: int = 4, targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                 half: bool = True) -> StepMeasurement:
    """Run one training step of the real UNet on meta tensors and measure what it holds.

    mode "lora": frozen UNet in fp16 with the peft LoRA in fp32, as train.py sets it up;
    "full": every UNet weight trainable, fp32 master weights under fp16 autocast, as accelerate's
    mixed precision does. half=False: fp32 throughout, no autocast. bf16 is measured as fp16
    (same sizes). `batch` is what the UNet sees (prior preservation doubles it). Cached per
    arguments for the life of the process.
    """
    import torch
    import torch.nn.functional as F

    start = time.perf_counter()
    dtype = torch.float16 if half else None
    unet = _meta_unet(family)
    if mode == "lora":
        if half:
            torch.nn.Module.to(unet, torch.float16)  # the frozen model (skips diffusers' warning)
        _add_lora(unet, rank, targets)
    if checkpointing:
        unet.enable_gradient_checkpointing(_checkpointing(dtype))
    unet.train()
    tracker = _tracker(unet)
    for p in unet.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(tracker.mark_gradient)
    side = resolution // 8
    latents = torch.empty(batch, load_arch(family)["unet"]["in_channels"], side, side,
                          device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    with tracker.mode:
        with _kernels(dtype, cache=True):
            pred = unet(latents.to(unet.dtype), timesteps,
                        **_unet_inputs(family, batch, dtype or torch.float32)).sample
            loss = F.mse_loss(pred.float(), latents.float())
        saved = tracker.activations
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
def measure_vae(family: str, resolution: int, batch: int, half: bool, decode: bool = False
                ) -> Transient:
    """The VAE encoding `batch` photos (or decoding one latent) without gradients, on meta."""
    import torch

    vae = _to(_meta_vae(family), half)
    dtype = vae.dtype
    if decode:
        side = resolution // 8
        z = torch.empty(1, vae.config.latent_channels, side, side, device="meta", dtype=dtype)
        return _transient([vae], lambda m: m.decode(z))
    pixels = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=dtype)
    return _transient([vae], lambda m: m.encode(pixels).latent_dist.sample())


@functools.cache
def measure_text(family: str, batch: int, half: bool, lora_rank: int = 0) -> Transient:
    """The text encoders on `batch` prompts: without gradients, or (lora_rank > 0) with a LoRA
    trained through them, forward + backward."""
    import torch

    encoders = [_to(e, half) for e in _meta_text_encoders(family)]
    tokens = torch.zeros(batch, TEXT_TOKENS, dtype=torch.long, device="meta")
    if not lora_rank:
        return _transient(encoders, lambda m: m(tokens, output_hidden_states=True))
    for encoder in encoders:
        _add_lora(encoder, lora_rank, _text_targets(family))

    def train(model):
        out = model(tokens, output_hidden_states=True)
        out.hidden_states[-2].float().sum().backward()

    return _transient(encoders, train, grad=True, dtype=torch.float16 if half else None)


@functools.cache
def measure_sampling(family: str, resolution: int, half: bool) -> Transient:
    """One denoising step of a validation image (batch 2 for classifier-free guidance), no
    gradients, LoRA weights aside (they are tiny)."""
    import torch

    unet = _to(_meta_unet(family), half)
    side = resolution // 8
    dtype = unet.dtype
    latents = torch.empty(2, load_arch(family)["unet"]["in_channels"], side, side,
                          device="meta", dtype=dtype)
    timesteps = torch.zeros(2, dtype=torch.long, device="meta")
    inputs = _unet_inputs(family, 2, dtype)
    return _transient([unet], lambda m: m(latents, timesteps, **inputs))


# ---------------------------------------------------------------------------------------------
# Recipes: how a run lays itself out on the GPU, beyond what TrainConfig says


@dataclass(frozen=True)
class Recipe:
    """Where the VAE and text encoders live and how the optimizer steps. The defaults (None)
    follow headshot_kit.train; the published recipes override them."""

    # The VAE stays on the GPU and encodes every micro-batch (train.py: when not caching).
    vae_every_step: bool | None = None
    # "fp32" or "fp16"; None = the training dtype. diffusers' SDXL LoRA script kept it in fp32.
    vae_dtype: str | None = None
    # train.py leaves the text encoders on the GPU when it does not cache latents, and when a
    # text-encoder LoRA is trained.
    text_encoders_on_gpu: bool | None = None
    # Re-encode the captions every micro-batch (train.py: with a text-encoder LoRA; diffusers'
    # SDXL script: with per-image captions).
    text_encoders_every_step: bool | None = None
    # torch AdamW's multi-tensor path (the default on CUDA since torch 2.0) makes one fp32
    # temporary as large as the parameters during the step (_foreach_sqrt of exp_avg_sq).
    adam_foreach: bool = True
    # Photos per VAE call while caching latents; None = train.py's (cache_chunk).
    cache_batch: int | None = None


RECIPE_FIELDS = {f.name for f in dataclasses.fields(Recipe)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class PublishedRun:
    """A published memory/time figure, with the settings that reproduce the run."""

    name: str
    source: str
    cfg: TrainConfig
    mode: str
    overrides: dict
    gpu: str
    memory_gb: float | None  # None: only "it ran", i.e. it fitted
    seconds_per_step: float | None


# The fork's README table (ShivamShrirao/diffusers, examples/dreambooth, commit f5d8aec8, 2 Oct
# 2022): "Tested on Tesla T4 GPU with `--cache_latents`". SD 1.4 (the UNet of 1.5), 512 px,
# fp16 autocast over an fp32 UNet, 8-bit Adam, xformers attention; caching freed the VAE and
# text encoder; torch 1.12's AdamW looped over tensors (no foreach). Its launch.sh and notebook
# train with prior preservation, which doubles the UNet's batch, and only that reproduces the
# table's own batch-2 and no-checkpointing rows (13.58 GB predicted for 13.67 published).
_FORK = "ShivamShrirao/diffusers DreamBooth README table (T4)"
# (fp16?, batch, checkpointing, 8-bit Adam) -> (GB, it/s), the rows this module uses.
FORK_ROWS = {
    (True, 1, True, True): (9.92, 0.93),
    (False, 1, True, True): (10.08, 0.42),
    (True, 2, True, True): (10.4, 0.66),
    (True, 1, False, True): (11.17, 1.14),
    (True, 1, True, False): (15.79, 0.77),
}


def _fork_run(fp16: bool, batch: int, checkpointing: bool, eight_bit: bool) -> PublishedRun:
    gb, its = FORK_ROWS[(fp16, batch, checkpointing, eight_bit)]
    cfg = TrainConfig(family="sd15", resolution=512, batch_size=batch,
                      mixed_precision="fp16" if fp16 else "no",
                      gradient_checkpointing=checkpointing, cache_latents=True,
                      optimizer="adamw8bit" if eight_bit else "adamw", prior_preservation=True)
    name = (f"sd15-full-{'fp16' if fp16 else 'fp32'}-b{batch}"
            f"{'-ckpt' if checkpointing else ''}-{'8bit' if eight_bit else 'adamw'}")
    # It cached latents one training batch (instance + class image) at a time.
    overrides = {"adam_foreach": False, "cache_batch": 2 * batch}
    return PublishedRun(name, _FORK, cfg, "full", overrides, "t4", gb, 1 / its)


def published_runs() -> dict[str, PublishedRun]:
    """The published figures this module is checked against, as runnable settings."""
    runs = [_fork_run(*key) for key in FORK_ROWS]
    # huggingface/notebooks SDXL_DreamBooth_LoRA_.ipynb (saved output, Nov 2023): 1024 px, batch
    # 1, accumulation 3, checkpointing, fp16, 8-bit Adam, the fp16-fix VAE; 500 steps at 7.96
    # s/it, then host RAM ran out reloading the pipeline. Its train_dreambooth_lora_sdxl.py (21
    # Nov 2023) kept the VAE in fp32 on the GPU, encoding every micro-batch, and, with a BLIP
    # caption per image, kept both text encoders there too, encoding every micro-batch.
    sdxl = dataclasses.replace(get_preset("sdxl-t4").train, mixed_precision="fp16",
                               cache_latents=False, prior_preservation=False)
    runs.append(PublishedRun(
        "sdxl-lora-t4", "huggingface/notebooks SDXL_DreamBooth_LoRA_.ipynb (T4)", sdxl, "lora",
        {"vae_dtype": "fp32", "text_encoders_on_gpu": True, "text_encoders_every_step": True},
        "t4", None, 7.96))
    return {run.name: run for run in runs}


# ---------------------------------------------------------------------------------------------
# The plan


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
            f" {plan.cfg.steps} steps in about {_duration(plan.step_seconds * plan.cfg.steps)};"
            " rough: +-30% at best, calibrated on one T4 table only"
            + (", and this GPU is not the T4" if plan.gpu.key != "t4" else "") + ".")


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def training_dtype(cfg: TrainConfig, gpu: GPU) -> str:
    """The precision train.py runs in on that GPU (models.training_precision decides both)."""
    from .models import training_precision

    return training_precision(cfg.mixed_precision, "cuda", gpu.bf16)


def _split_overrides(cfg: TrainConfig, overrides: dict) -> tuple[TrainConfig, Recipe]:
    unknown = set(overrides) - TRAIN_FIELDS - RECIPE_FIELDS
    if unknown:
        raise ConfigError(f"fit_check: unknown setting(s) {', '.join(sorted(unknown))}; use "
                          f"TrainConfig fields or {', '.join(sorted(RECIPE_FIELDS))}.")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k in TRAIN_FIELDS})
    return cfg, Recipe(**{k: v for k, v in overrides.items() if k in RECIPE_FIELDS})


def fit_check(cfg: TrainConfig, gpu: str | GPU = "t4", mode: str = "lora", *,
              suggest: bool = True, **overrides: Any) -> FitPlan:
    """Predict peak GPU memory, time per step and host RAM for training `cfg` on `gpu`.

    mode: "lora" (what train.py does) or "full" (the whole UNet, for comparing with published
    full fine-tuning figures). overrides: TrainConfig fields or Recipe fields. With `suggest`,
    a plan that does not fit names the cheapest change that makes it fit (see suggest_fix).
    The meta-tensor measurements take a few seconds (SD 1.5) to half a minute (SDXL at 1024 px)
    on a two-core CPU and are cached for the life of the process.
    """
    if mode not in ("lora", "full"):
        raise ConfigError(f"mode is {mode!r}; choose 'lora' or 'full'.")
    cfg, recipe = _split_overrides(cfg, overrides)
    validate_train(cfg)
    gpu = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu)
    plan = _plan(cfg, gpu, mode, recipe)
    if suggest and not plan.fits:
        changes = suggest_fix(cfg, gpu, mode, **overrides)
        plan.fix = _join(changes) if changes else _larger_gpu(cfg, gpu, mode, recipe)
    from .models import TINY_MODELS

    if cfg.model in TINY_MODELS:
        plan.notes.append(f"{cfg.model} is a small local stand-in: this plans the real "
                          f"{cfg.family} architecture at these settings.")
    return plan


def _larger_gpu(cfg: TrainConfig, gpu: GPU, mode: str, recipe: Recipe) -> str:
    """When no change is enough: the smallest GPU of the table that runs it as it is."""
    for other in sorted(GPUS.values(), key=lambda g: g.memory_gib):
        if (other.memory_gib > gpu.memory_gib
                and _plan(cfg, other, mode, recipe, measure=False).fits
                and _plan(cfg, other, mode, recipe).fits):
            return f"none of the usual changes is enough on this GPU; train on a {other.key}"
    return "none of the usual changes is enough, on any GPU of the table"


def _join(changes: list[str]) -> str:
    return changes[0] if len(changes) == 1 else ", ".join(changes[:-1]) + " and " + changes[-1]


def _plan(cfg: TrainConfig, gpu: GPU, mode: str, recipe: Recipe, measure: bool = True
          ) -> FitPlan:
    """The arithmetic of a plan. With measure=False (or when the weights, gradients and
    optimizer alone do not fit) activations are left out and the total is a lower bound."""
    family, dtype = cfg.family, training_dtype(cfg, gpu)
    half, wbytes = dtype != "fp32", (4 if dtype == "fp32" else 2)
    counts = parameter_counts(family)
    text_count = sum(v for k, v in counts.items() if k.startswith("text_encoder"))
    unet_batch = cfg.batch_size * (2 if cfg.prior_preservation else 1)
    vae_half = (recipe.vae_dtype or dtype) != "fp32"
    vae_bytes = counts["vae"] * (2 if vae_half else 4)
    text_bytes = text_count * wbytes
    parked = parked_after_caching(cfg)
    vae_every_step = ("vae" not in parked if recipe.vae_every_step is None
                      else recipe.vae_every_step)
    text_every_step = (cfg.train_text_encoder if recipe.text_encoders_every_step is None
                       else recipe.text_encoders_every_step)
    text_on_gpu = (not set(parked) - {"vae"} or text_every_step
                   if recipe.text_encoders_on_gpu is None else recipe.text_encoders_on_gpu)
    targets = tuple(cfg.target_modules)
    sizes = trainable_sizes(family, mode, cfg.rank, targets, cfg.train_text_encoder)
    trainable = 4 * sum(sizes)  # fp32: LoRA weights, or the full UNet's master weights
    frozen_unet = 0 if mode == "full" else counts["unet"] * wbytes
    grads = trainable
    states = optimizer_bytes(sizes, cfg.optimizer, cfg.optimizer_min_8bit_size)
    scratch = trainable if cfg.optimizer == "adamw" and recipe.adam_foreach else 0
    weights = {  # held through the whole training loop
        f"UNet weights (frozen, {dtype})": frozen_unet,
        ("LoRA weights (fp32)" if mode == "lora" else "UNet master weights (fp32)"): trainable,
        f"VAE kept on the GPU ({'fp16' if vae_half else 'fp32'})":
            vae_bytes if vae_every_step else 0,
        f"text encoders kept on the GPU ({dtype})": text_bytes if text_on_gpu else 0,
        f"optimizer states ({'8-bit' if cfg.optimizer == 'adamw8bit' else '32-bit'} AdamW)":
            states,
    }
    static = sum(weights.values())
    # Gradients are freed after each optimizer step (zero_grad(set_to_none=True)), but live
    # through the whole step when micro-batches accumulate into them.
    grads_persist = cfg.grad_accum > 1
    fixed = CUDA_CONTEXT_GIB * GIB
    budget = gpu.budget_gb * GB
    lower_bound = not measure or (static + grads) * FRAGMENTATION + fixed > budget
    notes = []
    if gpu.guessed:
        notes.append(f"{gpu.name} is not in the table: its memory is its own, its speed is "
                     "guessed from the T4's.")
    if dtype == "bf16":
        notes.append("bf16 activations are measured as fp16 (same sizes).")

    # Each phase of the run, with what it holds on the GPU (bytes).
    parts: dict[str, dict[str, float]] = {}
    flops = {True: 0, False: 0}  # per micro-batch, by "runs in half precision"
    if lower_bound:
        parts["optimizer step"] = weights | {"gradients (fp32)": grads}
        notes.append("Activations not measured: the weights, gradients and optimizer states "
                     "alone exceed the GPU, so the total is a lower bound.")
    else:
        step = measure_step(family, cfg.resolution, unet_batch, cfg.gradient_checkpointing, mode,
                            cfg.rank, targets, half)
        text_train = (measure_text(family, unet_batch, half, cfg.rank)
                      if cfg.train_text_encoder else Transient(0, 0))
        if grads_persist:
            fb = {"gradients (fp32)": grads,
                  "activations (measured)": step.activation_peak + text_train.peak}
        else:
            fb = {"gradients (fp32)": step.gradients_at_peak,
                  "activations (measured)": step.activations_at_peak + text_train.peak}
        parts["forward/backward"] = weights | fb
        parts["optimizer step"] = weights | {"gradients (fp32)": grads,
                                             "optimizer scratch (foreach AdamW)": scratch}
        flops[half] += step.flops + text_train.flops
        # The VAE and the text encoders run one after the other: the larger one counts.
        encoders = []
        if vae_every_step:
            vae = measure_vae(family, cfg.resolution, unet_batch, vae_half)
            encoders.append(("VAE encoder activations (measured)", vae.peak))
            flops[vae_half] += vae.flops
        if text_every_step and not cfg.train_text_encoder:
            text = measure_text(family, unet_batch, half)
            encoders.append(("text encoder activations (measured)", text.peak))
            flops[half] += text.flops
        if encoders:
            name, peak = max(encoders, key=lambda e: e[1])
            parts["encode (every step)"] = weights | {
                "gradients (fp32)": grads if grads_persist else 0, name: peak}
        if cfg.cache_latents:
            # train.py loads the whole pipeline to the GPU and encodes the photos before the
            # LoRA and the optimizer exist; the VAE and text encoders leave afterwards.
            # A dataset holds about HOST_PHOTOS photos: a larger chunk is never filled.
            chunk = recipe.cache_batch or min(cache_chunk(cfg.resolution), HOST_PHOTOS)
            peak = max(measure_vae(family, cfg.resolution, chunk, vae_half).peak,
                       measure_text(family, chunk, half).peak)
            unet_dtype = "fp32" if mode == "full" else dtype
            parts["caching"] = {
                f"UNet weights ({unet_dtype})": counts["unet"] * (4 if mode == "full" else wbytes),
                "VAE + text encoders (caching)": vae_bytes + text_bytes,
                "encoder activations (measured)": peak}
        if cfg.validate_every:
            # Validation renders with the training state still on the GPU (gradients freed),
            # the VAE and text encoders brought back: one denoising step or the VAE decode.
            sample = measure_sampling(family, cfg.resolution, half)
            decode = measure_vae(family, cfg.resolution, 1, vae_half, decode=True)
            parts["validation"] = weights | {
                "VAE + text encoders back on the GPU": (0 if vae_every_step else vae_bytes)
                + (0 if text_on_gpu else text_bytes),
                "sampling activations (measured)": max(sample.peak, decode.peak)}
    phases = {name: sum(held.values()) for name, held in parts.items()}
    peak_phase = max(phases, key=phases.get)
    if peak_phase == "caching" and chunk > 1:
        one = max(measure_vae(family, cfg.resolution, 1, vae_half).peak,
                  measure_text(family, 1, half).peak)
        alone = phases["caching"] - parts["caching"]["encoder activations (measured)"] + one
        notes.append(f"Caching latents {chunk} photos per VAE call is the peak; one at a time "
                     f"it would need {(alone * FRAGMENTATION + fixed) / GB:.1f} GB there.")
    allocated = phases[peak_phase]
    components = {k: v / GB for k, v in parts[peak_phase].items() if v}
    components[f"allocator fragmentation (+{FRAGMENTATION - 1:.0%})"] = (
        allocated * (FRAGMENTATION - 1) / GB)
    components["CUDA context"] = fixed / GB
    total = (allocated * FRAGMENTATION + fixed) / GB

    cal = T4_CALIBRATION
    micro = math.nan if lower_bound else (
        cal.overhead_s + flops[True] / (gpu.fp16_tflops * 1e12 * cal.tensor_efficiency)
        + flops[False] / (gpu.fp32_tflops * 1e12 * cal.fp32_efficiency))
    optimizer_s = sum(sizes) * ADAM_TRAFFIC[cfg.optimizer] / (gpu.bandwidth_gbs * GB)
    return FitPlan(cfg, gpu, mode, dtype, recipe, components,
                   {k: v / GB for k, v in phases.items()}, peak_phase, total, lower_bound,
                   cfg.grad_accum * micro + optimizer_s,
                   cfg.grad_accum * (flops[True] + flops[False]),
                   _host_ram(cfg, mode, counts, wbytes, vae_bytes, text_bytes, sizes), notes)


def _host_ram(cfg: TrainConfig, mode: str, counts: dict[str, int], wbytes: int,
              vae_bytes: int, text_bytes: int, sizes: tuple[int, ...]) -> dict[str, float]:
    """Rough peak host RAM (GB) per phase, on Colab.

    load: from_pretrained(low_cpu_mem_usage=True) builds each model on the CPU in the training
      dtype before it moves to the GPU (file pages read through mmap are reclaimable and not
      counted); train: photos as float pixels when latents are not cached, and the VAE and text
      encoders that train.py parks on the CPU after caching; save: the trainable weights copied
      to the CPU in fp32; reload: an inference pipeline loaded while the training objects still
      hold their host memory (what killed the SDXL notebook's run).
    """
    unet = counts["unet"] * (4 if mode == "full" else wbytes)
    pipeline = unet + vae_bytes + text_bytes
    parked = vae_bytes + text_bytes if cfg.cache_latents and not cfg.train_text_encoder else 0
    photos = 0 if cfg.cache_latents else HOST_PHOTOS * 3 * cfg.resolution**2 * 4
    base = HOST_BASELINE_GB * GB
    train = base + parked + photos
    phases = {"load": base + pipeline, "train": train, "save": train + 4 * sum(sizes),
              "reload": train + counts["unet"] * wbytes + vae_bytes + text_bytes}
    return {k: v / GB for k, v in phases.items()}


# ---------------------------------------------------------------------------------------------
# What to change when it does not fit


def _candidates(cfg: TrainConfig, mode: str) -> list[tuple[str, dict]]:
    """Changes in order of cost: free ones first, then the ones that cost
    quality. Each is (what to tell a person, the overrides that make it)."""
    out = []
    if not cfg.gradient_checkpointing:
        out.append(("enable gradient checkpointing", {"gradient_checkpointing": True}))
    if cfg.optimizer != "adamw8bit":
        out.append(("use 8-bit AdamW (bitsandbytes)", {"optimizer": "adamw8bit"}))
    if not cfg.cache_latents:
        out.append(("cache latents so the VAE and text encoders leave the GPU",
                    {"cache_latents": True, "vae_every_step": None,
                     "text_encoders_on_gpu": None, "text_encoders_every_step": None}))
    for resolution in (768, 512):
        if cfg.resolution > resolution:
            out.append((f"lower the resolution to {resolution} px", {"resolution": resolution}))
    if mode == "lora" and cfg.rank > 4:
        out.append(("lower the LoRA rank to 4", {"rank": 4}))
    if cfg.batch_size > 1:
        accum = cfg.batch_size * cfg.grad_accum
        out.append((f"use batch_size=1 with grad_accum={accum} (the same effective batch)",
                    {"batch_size": 1, "grad_accum": accum}))
    return out


# Changes whose effect needs no new meta-tensor measurement: cheap to take back out.
_STATIC_KEYS = {"optimizer", "cache_latents"}


def suggest_fix(cfg: TrainConfig, gpu: str | GPU = "t4", mode: str = "lora",
                **overrides: Any) -> list[str]:
    """The cheapest change (or combination) that makes the run fit, each worded for a person
    with what it saves, e.g. ["enable gradient checkpointing (saves 6.1 GB)"].

    Tried in order: each change alone (gradient checkpointing, 8-bit Adam, cached latents,
    768 px, 512 px, rank 4, batch 1), then the changes added up one after another; a full
    fine-tune that still does not fit then becomes a LoRA with the free changes. Candidates
    whose weights and optimizer alone exceed the GPU are skipped without measuring. [] when the
    run already fits, or when nothing in the list is enough.
    """
    cfg, recipe = _split_overrides(cfg, overrides)
    gpu = gpu if isinstance(gpu, GPU) else resolve_gpu(gpu)
    base = dict(overrides)
    original = _plan(cfg, gpu, mode, recipe)
    if original.fits:
        return []
    options = _candidates(cfg, mode)
    trials = [[o] for o in options] + [options[:i] for i in range(2, len(options) + 1)]
    if mode == "full":
        lora = ("train a LoRA instead of the full UNet", {"mode": "lora"})
        free = [o for o in options if not set(o[1]) & {"resolution", "rank", "batch_size"}]
        trials += [[lora, *free, *extra] for extra in ([], *[[o] for o in options
                                                             if o not in free])]
    for changes in trials:
        plan = _try(cfg, gpu, mode, base, changes)
        if plan is None or not plan.fits:
            continue
        # Take back changes that need no new measurement and turn out not to matter.
        for change in list(changes):
            if set(change[1]) <= _STATIC_KEYS | RECIPE_FIELDS and len(changes) > 1:
                fewer = [c for c in changes if c is not change]
                smaller = _try(cfg, gpu, mode, base, fewer)
                if smaller is not None and smaller.fits:
                    changes, plan = fewer, smaller
        saved = original.total_gb - plan.total_gb
        saving = (f"saves {'at least ' if original.lower_bound else ''}{saved:.1f} GB, "
                  f"{plan.total_gb:.1f} GB in all")
        return [name for name, _ in changes[:-1]] + [f"{changes[-1][0]} ({saving})"]
    return []


def _try(cfg: TrainConfig, gpu: GPU, mode: str, base: dict, changes: list[tuple[str, dict]]
         ) -> FitPlan | None:
    """The plan with these changes, or None when its weights and optimizer alone do not fit.
    A change may switch the mode ({"mode": "lora"})."""
    merged = dict(base)
    for _, change in changes:
        merged.update(change)
    mode = merged.pop("mode", mode)
    trial_cfg, recipe = _split_overrides(cfg, merged)
    if _plan(trial_cfg, gpu, mode, recipe, measure=False).total_gb > gpu.budget_gb:
        return None
    return _plan(trial_cfg, gpu, mode, recipe)


# ---------------------------------------------------------------------------------------------
# Before training, and from the command line


class DoesNotFit(ConfigError):
    """The plan does not fit the GPU; the message names the cheapest fix."""


def check_before_training(cfg: TrainConfig, gpu: str | None = None, force: bool = False,
                          mode: str = "lora") -> FitPlan | None:
    """Refuse, with the cheapest fix named, a run that will not fit the GPU it is about to use.

    gpu: a table key or torch.cuda.get_device_name(); None = the GPU this process sees. A GPU
    missing from the table is planned with its own total memory and the T4's speed (the plan
    says so). Without a GPU the plan is made for a T4 and returned without refusing. force=True
    (TrainConfig.force_fit) returns the plan even when it does not fit. Tiny models (built
    locally) fit anywhere: None.
    """
    from .models import TINY_MODELS

    if cfg.model in TINY_MODELS:
        return None
    import torch

    note = None
    if gpu is None and torch.cuda.is_available():
        from .models import cuda_has_bf16

        gpu_entry = resolve_gpu(torch.cuda.get_device_name(0),
                                torch.cuda.get_device_properties(0).total_memory)
        # Plan in the precision the run will use on this very card, whatever the table says.
        gpu_entry = dataclasses.replace(gpu_entry, bf16=cuda_has_bf16())
    elif gpu is None:
        gpu_entry, note = GPUS["t4"], "No GPU here: planned for a T4 and not enforced."
    else:
        total = (torch.cuda.get_device_properties(0).total_memory
                 if torch.cuda.is_available() else None)
        gpu_entry = resolve_gpu(gpu, total)
    plan = fit_check(cfg, gpu_entry, mode)
    if note:
        plan.notes.append(note)
        return plan
    if not plan.fits and not force:
        raise DoesNotFit(
            f"This run needs about {plan.total_gb:.1f} GB of GPU memory at its peak "
            f"({plan.peak_phase}), but the {gpu_entry.name} has {plan.budget_gb:.1f} GB. "
            f"Cheapest fix: {plan.fix}. To try anyway, set force_fit=True in the training "
            "config (`--set force_fit=true` on the command line).")
    return plan


def fitcheck_cli(cfg: TrainConfig | str, gpu: str = "t4", as_json: bool = False,
                 mode: str = "lora") -> int:
    """`headshot-kit fitcheck`: print the plan (or its JSON) of a training config or of a
    preset's. Returns 0 when it fits, 1 when it does not."""
    if isinstance(cfg, str):
        cfg = get_preset(cfg).train
    plan = fit_check(cfg, gpu, mode)
    print(json.dumps(plan.to_dict(), indent=2, default=str) if as_json else plan.summary())
    return 0 if plan.fits else 1


def compare_published():
    """Predicted vs published memory and time for every run in `published_runs()`."""
    import pandas as pd

    rows = []
    for run in published_runs().values():
        plan = fit_check(run.cfg, run.gpu, run.mode, suggest=False, **run.overrides)
        rows.append({
            "run": run.name, "GB published": run.memory_gb, "GB predicted": plan.total_gb,
            "fits": plan.fits, "s/step published": run.seconds_per_step,
            "s/step predicted": plan.step_seconds})
    table = pd.DataFrame(rows).set_index("run")
    table["GB error %"] = 100 * (table["GB predicted"] / table["GB published"] - 1)
    table["time error %"] = 100 * (table["s/step predicted"] / table["s/step published"] - 1)
    return table.round(2)


def calibrate() -> Calibration:
    """Re-derive T4_CALIBRATION from the fork's T4 table and our FLOP counts.

    Three rows of one table, all full SD 1.x fine-tunes at 512 px with checkpointing and 8-bit
    Adam (the UNet sees 2 images per batch: prior preservation):
    - fp16, batch 1 at 0.93 it/s and batch 2 at 0.66 it/s: the extra time of the extra images
      is pure FLOPs, which gives the tensor-core efficiency; what remains of the batch-1 step
      beyond its FLOPs and its optimizer traffic is the fixed overhead;
    - fp32 ("no" mixed precision), batch 1 at 0.42 it/s: with that overhead, the fp32 efficiency.
    """
    t4 = GPUS["t4"]
    runs = published_runs()
    one, two, fp32 = (runs[n] for n in ("sd15-full-fp16-b1-ckpt-8bit",
                                        "sd15-full-fp16-b2-ckpt-8bit",
                                        "sd15-full-fp32-b1-ckpt-8bit"))

    def flops(run: PublishedRun) -> int:  # fp32 runs the same ops as fp16, so the same FLOPs
        c = run.cfg
        return measure_step(c.family, c.resolution, 2 * c.batch_size, True, "full").flops

    tensor = (flops(two) - flops(one)) / (
        t4.fp16_tflops * 1e12 * (two.seconds_per_step - one.seconds_per_step))
    sizes = trainable_sizes("sd15", "full", 4, tuple(one.cfg.target_modules), False)
    optimizer_s = sum(sizes) * ADAM_TRAFFIC["adamw8bit"] / (t4.bandwidth_gbs * GB)
    overhead = (one.seconds_per_step - optimizer_s
                - flops(one) / (t4.fp16_tflops * 1e12 * tensor))
    fp32_eff = flops(one) / (t4.fp32_tflops * 1e12 * (fp32.seconds_per_step - optimizer_s
                                                       - overhead))
    return Calibration(tensor, fp32_eff, overhead)
