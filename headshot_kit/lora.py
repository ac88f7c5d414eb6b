"""LoRA adapters: attaching them, and writing them in the formats other tools load.

One way to attach a LoRA (`add_lora`), used by the train stage, the fit check (on `meta`
tensors) and the tests; one file name (`LORA_WEIGHTS`) that the train stage writes and the
generate stage and the work folder look for. The weights are saved in diffusers' format, which
`load_lora_weights` reads, and copied under kohya's names for A1111, ComfyUI and kohya's
scripts.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Mapping

from .config import ConfigError, DataError
from .storage import atomic_path, same_safetensors

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
# The sub-folder where training keeps the LoRA of the checkpoint chosen by likeness.
BEST_DIR = "best"
# The UNet attention projections: what diffusers' DreamBooth LoRA script adapts.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(module, rank: int, alpha: int | None = None, dropout: float = 0.0,
             targets: tuple[str, ...] = UNET_TARGETS) -> list:
    """Attach a fresh peft LoRA to `module` (frozen meanwhile) and return its trainable
    parameters, made fp32: under an fp16 model, fp32 LoRA weights are what keeps the loss
    scaler from refusing them ("Attempting to unscale FP16 gradients").

    The LoRA's B matrices start at zero, so a fresh LoRA leaves the model's output unchanged.
    On a `meta` model (the fit check) the new layers are built on `meta` too.
    """
    import torch
    from peft import LoraConfig

    from .compat import hide_unusable_torchao

    hide_unusable_torchao()  # peft refuses Colab's old torchao at every attach
    module.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=list(targets))
    device = next(module.parameters()).device
    with torch.device(device) if device.type == "meta" else nullcontext():
        module.add_adapter(config)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"target_modules {targets} matched no layer of "
                          f"{type(module).__name__}; for the UNet use the attention "
                          f"projections {UNET_TARGETS}.")
    for p in params:
        p.data = p.data.float()
    return params


def peft_state(module) -> dict:
    """The LoRA weights of `module` under peft's names, as fp32 CPU tensors."""
    import torch
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(module).items()}


def text_encoder_lora_state(encoder) -> dict:
    """A text encoder's LoRA under transformers 4's module names (`text_model.encoder...`).

    transformers 5 flattened CLIPTextModel and dropped the `text_model.` level, so the same
    weight has two names. diffusers' `load_lora_weights` strips the prefix when the installed
    transformers has no such level and uses it as it is where it has, so files written with
    it load under both majors, as do the kohya names derived from them.
    """
    state = peft_state(encoder)
    if hasattr(encoder, "text_model"):
        return state
    return {f"text_model.{k}": v for k, v in state.items()}


# LoraConfig fields every peft release since 0.9 knows: loaders rebuild the config from them.
_PORTABLE_LORA_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "rank_pattern",
                         "alpha_pattern", "use_dora", "use_rslora", "bias")


def adapter_metadata(module) -> dict:
    """The adapter's LoraConfig as the file's metadata, limited to fields that every loader
    understands: older diffusers releases (0.35 among them) index `rank_pattern` directly,
    and older peft releases refuse fields they do not know."""
    config = module.peft_config["default"].to_dict()
    return {k: sorted(config[k]) if isinstance(config[k], set) else config[k]
            for k in _PORTABLE_LORA_FIELDS if k in config}


def save_lora(folder: str | Path, family: str, modules: Mapping[str, object],
              name: str = LORA_WEIGHTS) -> Path:
    """Write the LoRAs of `modules` ({"unet": unet, "text_encoder": encoder, ...}) into
    `folder/name`, where diffusers' `load_lora_weights` finds them, with their rank and alpha.

    Written to a temporary file first: a crash never leaves a half-written LoRA behind, and
    the same weights saved again leave the file as it was (safetensors' header order varies).
    """
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    from .families import get_family

    kwargs = {}
    for owner, module in modules.items():
        state = peft_state(module) if owner == "unet" else text_encoder_lora_state(module)
        kwargs[f"{owner}_lora_layers"] = convert_state_dict_to_diffusers(state)
        kwargs[f"{owner}_lora_adapter_metadata"] = adapter_metadata(module)
    cls = getattr(diffusers, get_family(family).pipeline_class)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / name, same=same_safetensors) as tmp:
        cls.save_lora_weights(tmp.parent, weight_name=tmp.name, **kwargs)
    return folder / name


_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# diffusers writes 'module.lora.down.weight' (UNet) and 'module.lora_linear_layer.down.weight'
# (text encoders); peft writes 'module.lora_A.weight'.
_LORA_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\."
                       r"(?:(?:lora|lora_linear_layer)\.(down|up)|lora_(A|B))\.weight$")


def kohya_key(key: str) -> str:
    """diffusers' LoRA key -> the kohya/A1111/ComfyUI name of the same weight.

    'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight'
    -> 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight'
    """
    match = _LORA_KEY.match(key)
    if not match:
        raise ValueError(f"Unexpected LoRA key {key!r}: not a diffusers or peft LoRA weight.")
    owner, module, updown, peft_ab = match.groups()
    kind = updown or {"A": "down", "B": "up"}[peft_ab]
    if owner != "unet" and not module.startswith("text_model."):
        module = "text_model." + module  # kohya names follow transformers' CLIPTextModel paths
    return f"{_KOHYA_PREFIX[owner]}{module.replace('.', '_')}.lora_{kind}.weight"


def export_kohya(lora_path: Path, rank: int, alpha: float,
                 single_text_encoder: bool = True) -> Path:
    """A copy of the LoRA with kohya key names and an `.alpha` per module, which A1111,
    ComfyUI and kohya's scripts load; its metadata names the rank (ss_network_dim) and alpha
    (ss_network_alpha) as kohya's own files do. `single_text_encoder`: the family has one
    text encoder, which kohya calls plain "lora_te_" (SD 1.5)."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora_path))
    out = {}
    for key, value in state.items():
        name = kohya_key(key)
        if single_text_encoder:
            name = name.replace("lora_te1_", "lora_te_")
        out[name] = value.to(torch.float16)
        out[name.split(".lora_")[0] + ".alpha"] = torch.tensor(float(alpha))
    target = lora_path.with_name(KOHYA_WEIGHTS)
    with atomic_path(target, same=same_safetensors) as tmp:
        save_file(out, str(tmp), metadata={"ss_network_dim": str(int(rank)),
                                           "ss_network_alpha": str(alpha)})
    return target


# safetensors' own limit on a file's header; a header claiming more is a "header bomb".
MAX_HEADER_BYTES = 100_000_000
# The names of a LoRA layer's first (down) matrix in diffusers', peft's and kohya's files.
_DOWN_KEY = re.compile(r"\.(?:lora\.down|lora_A|lora_down|lora_linear_layer\.down)\.weight$")


class LoraFileError(DataError):
    """A LoRA file cannot be used as it is; the message names the file and says why."""


def check_lora_file(path: str | Path) -> Path:
    """Refuse a LoRA file that is cut short, whose header is oversized or not safetensors',
    or whose weights hold NaN or inf, in one sentence naming the file; before any loading."""
    import torch
    from safetensors import safe_open

    path = Path(path)

    def bad(reason: str) -> LoraFileError:
        return LoraFileError(f"{path} is not a usable LoRA file: {reason}. Train it again (or "
                             "download it again, if it came from elsewhere).")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"it is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise bad(f"its header claims {n:,} bytes, in a file of {size:,}")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise bad(f"its header is not safetensors' ({type(exc).__name__})") from None
    if 8 + n + max(ends, default=0) > size:
        raise bad(f"it is cut short ({size:,} bytes of {8 + n + max(ends):,})")
    if not ends:
        raise bad("it holds no weights")
    with safe_open(str(path), "pt") as weights:
        for key in weights.keys():
            tensor = weights.get_tensor(key)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise bad(f"{key} holds NaN or inf values (a diverged training)")
    return path


def check_lora_loaded(pipe, adapter: str, path: Path) -> None:
    """Refuse a LoRA whose layers did not all find a layer of the model to attach to: it was
    made for another model (diffusers only logs a warning, which it silences)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        expected = sum(bool(_DOWN_KEY.search(k)) for k in f.keys())
    loaded = sum(adapter in getattr(m, "lora_A", {})
                 for name in ("unet", "transformer", "text_encoder", "text_encoder_2")
                 if getattr(pipe, name, None) is not None
                 for m in getattr(pipe, name).modules())
    if loaded < expected:
        raise LoraFileError(f"{path}: {expected - loaded} of its {expected} LoRA layers match no "
                            "layer of the model: it was made for another model, or its weight "
                            "names are neither diffusers' nor kohya's. Use a LoRA trained on "
                            "this base model.")


def lora_weights(lora_dir: str | Path) -> Path:
    """The weights file of a trained LoRA folder; a clear error if it is not one."""
    path = Path(lora_dir) / LORA_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{lora_dir}: no {LORA_WEIGHTS} there, so it is not a trained "
                                "LoRA. Give the folder the train stage wrote (e.g. "
                                "<workdir>/lora), or leave the LoRA out to render with the base "
                                "model.")
    return path


def pick_checkpoint(lora_dir: str | Path, which: str) -> Path:
    """The LoRA folder to render with: `lora_dir/best/` for "best" when training chose a
    checkpoint by likeness, else `lora_dir` itself (its last weights)."""
    best = Path(lora_dir) / BEST_DIR
    return best if which == "best" and (best / LORA_WEIGHTS).is_file() else Path(lora_dir)


def chosen_checkpoint(folder: str | Path) -> dict:
    """The record training wrote into `folder` when it is the checkpoint chosen by likeness
    (a LoRA's best/): its step, likeness and the network that chose it (chosen_by); {} for
    any other folder."""
    try:
        record = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if record.get("checkpoint") == BEST_DIR and record.get("chosen_by") else {}
