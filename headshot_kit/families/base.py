"""What every model family shares: the conditioning it hands the UNet, the interface a family
module fills in, and the byte-level tokenizer and text-encoder settings of the tiny offline
stand-ins. The family modules build on these; `headshot_kit.families` registers them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch


@dataclass
class Conditioning:
    """What the UNet is conditioned on, one row per caption."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL's pooled text embedding
    time_ids: torch.Tensor | None = None  # SDXL's size/crop micro-conditioning

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return replace(self, **{k: fn(v) for k, v in vars(self).items() if v is not None})

    def select(self, idx: torch.Tensor) -> Conditioning:
        return self._map(lambda t: t[idx.to(t.device)])

    def to(self, device=None, dtype=None) -> Conditioning:
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> Conditioning:
        return self._map(lambda t: t.detach())

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        kwargs = {"encoder_hidden_states": self.prompt_embeds.to(dtype)}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype),
                                           "time_ids": self.time_ids.to(dtype)}
        return kwargs


class Family(Protocol):
    name: str
    pipeline_class: str
    text_encoders: tuple[str, ...]
    # Attention projections of its text encoders, for an optional text-encoder LoRA.
    text_encoder_targets: tuple[str, ...]
    # Extra from_pretrained arguments of its pipeline.
    pipeline_kwargs: dict[str, Any]
    # A VAE that decodes in fp16 without overflowing, loaded instead of the model's own when
    # rendering from the hub in fp16 (None: the model's own VAE is fine in fp16).
    fp16_vae: str | None
    # Decode in tiles on a GPU: a whole image at once needs more memory than a T4 has left.
    tiled_decode: bool
    # The size the model was trained at.
    native_resolution: int
    # Seconds per sampling step (with classifier-free guidance) and per VAE decode on a T4 in
    # fp16 at the native size: a stated estimate from commonly reported T4 speeds.
    t4_seconds: tuple[float, float]

    def build_tiny(self, folder: Path, seed: int = 0) -> None: ...

    def encode_prompts(self, pipe, captions: list[str], resolution: int) -> Conditioning: ...


def byte_vocab() -> dict[str, int]:
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
    return {t: i for i, t in enumerate(tokens)}


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)


def tiny_text_config(projection_dim: int = 32):
    from transformers import CLIPTextConfig

    vocab = byte_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
