"""Stable Diffusion XL: two text encoders (CLIP ViT-L and OpenCLIP bigG), their penultimate
hidden states concatenated, plus a pooled embedding and size/crop micro-conditioning."""

from __future__ import annotations

from pathlib import Path

from .base import Conditioning, tiny_text_config, tiny_tokenizer, tokenize
from .sd15 import sd_scheduler, tiny_vae


class SDXL:
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoders = ("text_encoder", "text_encoder_2")
    text_encoder_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    pipeline_kwargs: dict = {}
    # The stock SDXL VAE overflows in fp16 and decodes black images; this one does not.
    fp16_vae = "madebyollin/sdxl-vae-fp16-fix"
    tiled_decode = True
    native_resolution = 1024
    t4_seconds = (1.4, 2.5)

    def encode_prompts(self, pipe, captions: list[str], resolution: int) -> Conditioning:
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                   (pipe.tokenizer_2, pipe.text_encoder_2)):
            out = encoder(tokenize(tokenizer, captions).to(encoder.device),
                          output_hidden_states=True)
            # SDXL conditions on the penultimate layer of both encoders...
            hidden.append(out.hidden_states[-2])
            # ...and on the second encoder's projected pooled output.
            pooled = out[0]
        # Micro-conditioning: original size, crop top-left, target size. Prepared photos are
        # square crops at the training resolution, so (res, res), (0, 0), (res, res).
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                dtype=torch.float32).repeat(len(captions), 1)
        return Conditioning(torch.cat(hidden, dim=-1), pooled, time_ids.to(pooled.device))

    def build_tiny(self, folder: Path, seed: int = 0) -> None:
        """SDXL's layout (two text encoders, text_time added conditioning, linear projections
        in the transformer blocks) at a width a CPU trains in seconds."""
        import torch
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(2, 1),
            # 6 micro-conditioning numbers x 8 + the 32-wide pooled text embedding.
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
            norm_num_groups=8)
        torch.manual_seed(seed + 1)
        vae = tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(tiny_text_config())
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(projection_dim=32))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet,
            scheduler=sd_scheduler(), force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(folder)


FAMILY = SDXL()
