"""Stable Diffusion 1.5: one CLIP ViT-L text encoder, conditioning by cross-attention alone."""

from __future__ import annotations

from pathlib import Path

from .base import Conditioning, tiny_text_config, tiny_tokenizer, tokenize


class SD15:
    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    text_encoders = ("text_encoder",)
    text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    # No safety checker: it blacks out false positives and adds a download.
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    fp16_vae = None
    tiled_decode = False
    native_resolution = 512
    t4_seconds = (0.22, 0.3)

    def encode_prompts(self, pipe, captions: list[str], resolution: int) -> Conditioning:
        encoder = pipe.text_encoder
        ids = tokenize(pipe.tokenizer, captions).to(encoder.device)
        return Conditioning(encoder(ids)[0])

    def build_tiny(self, folder: Path, seed: int = 0) -> None:
        """SD 1.5's layout (cross-attention down/up blocks, a mid block, 4 latent channels, a
        VAE that downsamples 8x) at a width a CPU trains in seconds."""
        import torch
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=8)
        torch.manual_seed(seed + 1)
        vae = tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(tiny_text_config())
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
            scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(folder)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def sd_scheduler():
    """Stable Diffusion's own noise schedule, so training sees the real timestep distribution."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)


FAMILY = SD15()
