"""A full-size SDXL base 1.0 stand-in for memory benchmarks: the published architecture with
random weights, built offline once and saved in fp16 as an ordinary diffusers folder.

The real weights are a download; host-RAM use depends on the architecture and the dtype, not on
the values, so a random model of the same shapes loads, encodes and trains with the same memory.
The configs below are those of `stabilityai/stable-diffusion-xl-base-1.0` (unet/, vae/,
text_encoder/, text_encoder_2/, scheduler/ config.json). The tokenizers are the library's tiny
byte-level CLIP tokenizer, since CLIP's vocabulary files are a download too; its ids all fall
inside the real 49,408-entry embedding tables.

Building needs about 5.5 GB of RAM at its peak (the UNet in fp16) and about 7 GB of disk. Run it
in its own process (`python bench/_sdxl_fullsize.py`) so its memory does not count against a
measurement.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# models/* is git-ignored (see .gitignore and models/README.md).
FOLDER = ROOT / "models" / "bench-sdxl-fullsize"
# Bumped whenever the configs below change, so a stale folder is rebuilt.
VERSION = 1
MARKER = "headshot_kit_bench.json"

UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}

VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14's text tower.
TEXT_ENCODER = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}

# OpenCLIP ViT-bigG/14's text tower, with its projection.
TEXT_ENCODER_2 = {
    **TEXT_ENCODER, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
    "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}

SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
    "feature_extractor": [None, None], "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def _build_component(name: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name == "unet":
        return UNet2DConditionModel(**UNET)
    if name == "vae":
        return AutoencoderKL(**VAE)
    if name == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
    if name == "text_encoder_2":
        return CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2))
    raise ValueError(name)


def build(folder: Path = FOLDER, seed: int = 0) -> dict:
    """Write the fp16 model to `folder`, one component at a time; return its parameter counts.

    Each component is constructed directly in fp16 (torch's default dtype set to half), saved,
    and freed before the next, so the peak is the UNet alone (about 5.1 GB).
    """
    import diffusers
    import torch
    from diffusers import EulerDiscreteScheduler

    from headshot_kit.families import tiny_tokenizer
    from headshot_kit.models import quiet_libraries
    from headshot_kit.storage import atomic_dir

    quiet_libraries()
    counts, start = {}, time.perf_counter()
    with atomic_dir(folder) as tmp:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)
        try:
            for i, name in enumerate(("unet", "vae", "text_encoder", "text_encoder_2")):
                torch.manual_seed(seed + i)
                module = _build_component(name)
                counts[name] = sum(p.numel() for p in module.parameters())
                module.save_pretrained(tmp / name)
                del module
                gc.collect()
        finally:
            torch.set_default_dtype(previous)
        for name in ("tokenizer", "tokenizer_2"):
            tiny_tokenizer().save_pretrained(tmp / name)
        # from_config, as diffusers reads the real file: it ignores the DDIM-era keys it keeps.
        EulerDiscreteScheduler.from_config(SCHEDULER).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(
            {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}, indent=2) + "\n")
        info = {"version": VERSION, "seed": seed, "dtype": "float16", "parameters": counts,
                "build_s": round(time.perf_counter() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info


def cached_info(folder: Path = FOLDER) -> dict | None:
    """The build record of an up-to-date folder, or None if it must be (re)built."""
    marker = folder / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("version") == VERSION:
            return info
    return None


if __name__ == "__main__":
    from common import peak_rss_mb  # bench/ is on sys.path when run as a script

    cached = cached_info()
    result = {**(cached or build()), "reused": cached is not None}
    if not cached:
        result["build_peak_rss_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result))
