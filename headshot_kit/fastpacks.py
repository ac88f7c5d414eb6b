"""Fast packs: a few-step distillation LoRA stacked on the face LoRA, so a pack renders in 4
steps instead of 20-30.

The one shipped is LCM-LoRA (latent-consistency/lcm-lora-sdv1-5 and lcm-lora-sdxl), chosen
on the evidence for this use:
- it is the only few-step LoRA with a published T4 figure (Hugging Face's LCM-LoRA blog:
  SDXL 1024 px in 8.4 s at 4 steps against 26.5 s at 25), and it exists for both families;
- diffusers' own docs stack it on a subject or style LoRA through the multi-adapter API
  (`load_lora_weights(..., adapter_name="lcm")`, `set_adapters(["lcm", "papercut"],
  adapter_weights=[1.0, 0.8])`), with `LCMScheduler`, 4 steps and guidance 1 (docs: steps
  2-8, guidance 1-2; above 1 the UNet runs twice per step again);
- Hyper-SD (1-8 steps; its CFG-preserving 8-step LoRAs keep negative prompts), DMD2 (an SDXL
  4-step LoRA, no SD 1.5 LoRA) and TCD (`TCDScheduler`) are the alternatives; none has a
  published T4 time, and DMD2 covers one family.
What it costs: guidance 1 drops the negative prompt, and stacking weakens the other LoRA
(diffusers#6156); no public figure says how much likeness a face LoRA keeps under it. That is
what `headshot-kit sweep --grid fast_pack=none,lcm-lora` measures (likeness with and without).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class FastPack:
    """A few-step LoRA and the sampling its authors prescribe."""

    name: str
    # Per model family: (hub repo or local folder, weight file name).
    sources: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    scheduler: str = "lcm"  # a generate.shots.SAMPLERS key
    steps: int = 4
    guidance: float = 1.0
    # The few-step LoRA's own weight; the face LoRA keeps GenerateConfig.lora_scale.
    weight: float = 1.0

    @property
    def adapter_name(self) -> str:
        # Adapter names become module keys, which may not contain dots or dashes.
        return "fast_" + "".join(c if c.isalnum() else "_" for c in self.name)


FAST_PACKS: dict[str, FastPack] = {
    # Model cards of latent-consistency/lcm-lora-sdv1-5 and lcm-lora-sdxl, and diffusers' "LCM"
    # inference docs: LCMScheduler, 4 steps, guidance 1 (1-2), the LoRA at full weight.
    "lcm-lora": FastPack(
        "lcm-lora",
        {"sd15": ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"),
         "sdxl": ("latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors")}),
}


# What turns the pack off: "" in a config, "none" or "off" in a sweep grid
# (`--grid fast_pack=none,lcm-lora`: a grid value cannot be empty).
NO_PACK = ("", "none", "off")


def active_pack(name: str) -> str:
    """The pack's name, or "" when `name` turns fast packs off."""
    return "" if (name or "").strip().lower() in NO_PACK else name.strip()


def get_fast_pack(name: str) -> FastPack:
    from .config import ConfigError

    if name not in FAST_PACKS:
        raise ConfigError(f"fast_pack is {name!r}; choose one of {', '.join(FAST_PACKS)}, or "
                          "leave it empty for the full sampler.")
    return FAST_PACKS[name]


def load_fast_pack(pipe, name: str, family: str) -> str:
    """Load the pack's LoRA into `pipe` as its own adapter (once per pipeline); returns the
    adapter's name. Downloads from the hub on first use, like the base model."""
    from .config import ConfigError

    pack = get_fast_pack(name)
    if family not in pack.sources:
        raise ConfigError(f"fast_pack {name!r} has no LoRA for family {family!r}; "
                          f"it has {', '.join(pack.sources)}.")
    loaded = {n for names in pipe.get_list_adapters().values() for n in names}
    if pack.adapter_name not in loaded:
        source, weight_name = pack.sources[family]
        pipe.load_lora_weights(source, weight_name=weight_name, adapter_name=pack.adapter_name)
    return pack.adapter_name
