"""Loading diffusion models: one loader for every family, hub id or local folder alike.

The real models (SD 1.5, SDXL) come from the Hugging Face Hub on Colab. Offline, the `tiny-*`
models stand in for them: the same architectures shrunk to a few hundred thousand parameters,
built here from configs with a fixed seed and saved as ordinary diffusers folders, then loaded
through exactly the same `from_pretrained` path as the real ones. They prove the plumbing; their
pictures are noise.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import HUB_SDXL_FP16_VAE
from .storage import atomic_dir

TINY_MODELS = ("tiny-sd15",)
# Bumped whenever the tiny architecture changes, so stale caches are rebuilt.
TINY_VERSION = 1


class ModelUnavailable(RuntimeError):
    """A model could not be loaded; the message says why and what to do instead."""


def quiet_libraries() -> None:
    """Silence warnings that say nothing to a user of this workbench.

    transformers warns at import that torchvision is missing (we never use it), and diffusers
    prints a progress bar per pipeline call where our own bar already counts.
    """
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def cache_dir() -> Path:
    """Where locally built models live: $HEADSHOT_KIT_CACHE, the checkout's models/, or ~/.cache."""
    if os.environ.get("HEADSHOT_KIT_CACHE"):
        return Path(os.environ["HEADSHOT_KIT_CACHE"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "headshot_kit").is_dir():
        return checkout / "models"
    return Path.home() / ".cache" / "headshot-kit"


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, mixed_precision: str = "auto") -> torch.dtype:
    """fp16 on a T4 (it has no bf16), bf16 where the GPU has it, fp32 on the CPU."""
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "no" or device == "cpu":
        return torch.float32
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# ---------------------------------------------------------------------------------------------
# The tiny offline models


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level CLIP vocabulary without merges: every word spells out in characters.

    CLIP's own tokenizer files are a download; this small one keeps the same tokenizer class
    and special tokens, so prompts flow through the real code path.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(
        range(174, 256))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in chars]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, []


def build_tiny_sd15(folder: Path, seed: int = 0) -> Path:
    """Build the tiny SD-1.5-architecture pipeline into `folder` (fixed seed: same weights)."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(seed)
    # SD 1.5's layout (cross-attention down/up blocks, a mid block, 4 latent channels, a VAE
    # that downsamples 8x) at a width a CPU trains in seconds.
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    # SD 1.5's own noise schedule, so the training code sees the real timestep distribution.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    (folder / "headshot_kit_tiny.json").write_text(json.dumps(
        {"name": "tiny-sd15", "version": TINY_VERSION, "seed": seed}) + "\n")
    return folder


_TINY_BUILDERS = {"tiny-sd15": build_tiny_sd15}


def ensure_tiny_model(name: str = "tiny-sd15", root: Path | None = None) -> Path:
    """The folder of a tiny model, built on first use (about a second) and reused after."""
    if name not in _TINY_BUILDERS:
        raise ModelUnavailable(f"No tiny model called {name!r}; choose one of {TINY_MODELS}.")
    folder = (root or cache_dir()) / name
    marker = folder / "headshot_kit_tiny.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == TINY_VERSION:
        return folder
    quiet_libraries()
    with atomic_dir(folder) as tmp:
        _TINY_BUILDERS[name](tmp)
    return folder


# ---------------------------------------------------------------------------------------------
# Families and loading


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    # Text encoders whose LoRA the family supports (SDXL has two).
    text_encoders: tuple[str, ...]


FAMILIES = {
    "sd15": Family("sd15", "StableDiffusionPipeline", ("text_encoder",)),
    "sdxl": Family("sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2")),
}


def resolve_model(model: str) -> str:
    """A local folder for tiny models, the folder itself for paths, else the hub id unchanged."""
    if model in _TINY_BUILDERS:
        return str(ensure_tiny_model(model))
    return model


def is_hub_id(model: str) -> bool:
    return model not in _TINY_BUILDERS and not Path(model).exists()


def load_pipeline(model: str, family: str = "sd15", *, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, fp16_fix_vae: bool | None = None):
    """A diffusers pipeline for `model` (hub id, local folder or tiny name) on `device`.

    Loads with `low_cpu_mem_usage` (Colab's 12.7 GB of host RAM runs out otherwise) and, for
    SDXL in fp16, swaps in the fp16-fix VAE: the stock SDXL VAE overflows in fp16 and decodes
    black images.
    """
    import diffusers

    quiet_libraries()
    if family not in FAMILIES:
        raise ModelUnavailable(f"Unknown model family {family!r}; choose one of "
                               f"{', '.join(FAMILIES)}.")
    source = resolve_model(model)
    cls = getattr(diffusers, FAMILIES[family].pipeline_class)
    kwargs = {"dtype": dtype, "low_cpu_mem_usage": True}
    if family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if fp16_fix_vae is None:
        fp16_fix_vae = family == "sdxl" and dtype == torch.float16 and is_hub_id(model)
    try:
        if fp16_fix_vae:
            kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(HUB_SDXL_FP16_VAE, dtype=dtype)
        pipe = cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        if is_hub_id(model):
            raise ModelUnavailable(
                f"Could not load {model!r} from the Hugging Face Hub ({type(exc).__name__}). "
                "This needs network access and the model's licence accepted on the Hub: run "
                "this preset on Colab, or use the offline preset 'tiny' here.") from exc
        raise ModelUnavailable(f"{source}: not a diffusers model folder ({exc}).") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
