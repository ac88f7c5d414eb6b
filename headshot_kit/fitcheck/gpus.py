"""The GPUs the fit check knows, from their datasheets, and how a step's time follows from
its FLOPs on them (calibrated on a T4)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..config import ConfigError

GB = 1e9  # the published figures and our tables are in GB (10^9 bytes)
GIB = 2**30  # nvidia-smi reports GPU memory in MiB ("15360MiB" on a T4)
# CUDA context + cuBLAS/cuDNN handles and workspaces, which nvidia-smi counts but PyTorch's
# allocator does not: 300-500 MiB on a T4 with CUDA 12 lazy loading once the first conv and
# matmul have run (nvidia-smi minus torch.cuda.memory_reserved, as users report it).
CUDA_CONTEXT_GIB = 0.45
# The caching allocator reserves more than the tensors need (sizes rounded up, 2 MiB segments
# for small blocks, split blocks that cannot be reused): reserved/allocated ratios of 1.05-1.2
# are what torch.cuda.memory_summary() shows for steady training loops. We assume 10%.
FRAGMENTATION = 1.10


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
    # Fraction of the fp32 peak that a no-grad VAE pass in fp32 reaches (diffusers' SDXL LoRA
    # script encodes every micro-batch with an fp32 VAE; SDXL's stock VAE decodes upcast to
    # fp32). Large 3x3 convolutions without gradients run cuDNN's Winograd kernels, far above
    # the fp32 efficiency of a whole training step; fitted on the SDXL notebook (calibrate()).
    vae_fp32_efficiency: float = 1.0
    # Per denoising step of a render, whatever the FLOPs (scheduler, launches, guidance
    # bookkeeping): fitted on SD 1.x's 4.7 it/s at 512 px (diffusers#1050), with the
    # tensor-core efficiency above for the FLOPs, so renders and training share one model.
    sampling_overhead_s: float = 0.0


# Calibrated on the T4 only: the first three from ShivamShrirao's DreamBooth table, the fp32
# VAE's efficiency from Hugging Face's SDXL notebook (7.96 s/it) and the sampling overhead from
# SD 1.x's 4.7 it/s (see `calibrate()`, which re-derives these from those figures and our FLOP
# counts; tests/test_fitcheck.py checks they agree). Those figures are calibration points, not
# evidence; the held-out ones (tests/test_fitcheck.py, README) are.
# The same numbers are applied to every GPU in the table: a first guess off the T4.
T4_CALIBRATION = Calibration(tensor_efficiency=0.214, fp32_efficiency=0.433, overhead_s=0.592,
                             vae_fp32_efficiency=0.932, sampling_overhead_s=0.0975)


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
