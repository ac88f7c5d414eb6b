"""Model families: what differs between SD 1.5, SDXL and the next one, behind one interface.

A family knows its diffusers pipeline class, which text encoders it has, how to turn captions
into the UNet's conditioning, what loading and decoding need (a safety checker to leave out,
an fp16-safe VAE, tiled decoding), its native size and T4 speed, and how to build its tiny
offline stand-in. Training, generation, loading and the fit check ask the family; none of them
tests `if sdxl`. A new family (e.g. FLUX) is one more module registered in `FAMILIES`; its name
is what `TrainConfig.family` and `GenerateConfig.family` take.

torch is imported inside the functions that need it, so the settings can be checked against
`FAMILIES` before torch loads.
"""

from __future__ import annotations

from .base import (Conditioning, Family, byte_vocab, tiny_text_config, tiny_tokenizer,  # noqa: F401
                   tokenize)
from . import sd15, sdxl


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; choose one of {', '.join(FAMILIES)}.")
    return FAMILIES[name]


FAMILIES: dict[str, Family] = {f.name: f for f in (sd15.FAMILY, sdxl.FAMILY)}
