"""What other programs read in our files: the names, hashes and metadata of AUTOMATIC1111 (and
Forge), ComfyUI, kohya's sd-scripts, InvokeAI and Civitai.

- Hashes as AUTOMATIC1111 computes them (modules/hashes.py): a checkpoint's "Model hash" is the
  first 10 hex digits of the sha256 of its file; a LoRA's hash (in "Lora hashes") is the first
  12 of the sha256 of a .safetensors file's tensor data, after its header (the "addnet" hash,
  which kohya's train_network.py also stores as `sshs_model_hash`).
- LoRA weight names as kohya's networks/lora.py names its modules: `lora_unet_<module path>`,
  `lora_te_` (SD 1.5's one text encoder) or `lora_te1_`/`lora_te2_` (SDXL's two), with '.'
  turned into '_'. SD 1.5 keeps diffusers' UNet block names (kohya trains it on that layout);
  SDXL uses the original Stability AI names (`input_blocks_4_1_...`, sd-scripts'
  library/sdxl_original_unet.py), which kohya's SDXL scripts and merge tools look up.
- The metadata kohya's train_network.py writes (`ss_*`, read by A1111 to tell SD 1 from SDXL,
  and by Civitai) and Stability AI's ModelSpec (`modelspec.*`, github.com/Stability-AI/ModelSpec,
  as sd-scripts' library/sai_model_spec.py writes it).
- The prompt's `<lora:NAME:WEIGHT>` tag (A1111's extra networks syntax).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

from .config import HUB_SD15, HUB_SDXL

# The single-file checkpoints that users of A1111, Forge and ComfyUI load for our hub presets,
# with their published sha256 (Hugging Face's LFS pointer of each file):
#   huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/blob/main/v1-5-pruned-emaonly.safetensors
#   huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/sd_xl_base_1.0.safetensors
# A1111 shows them as "v1-5-pruned-emaonly.safetensors [6ce0161689]" and
# "sd_xl_base_1.0.safetensors [31e35c80fc]".
SINGLE_FILE_CHECKPOINTS = {
    HUB_SD15: ("v1-5-pruned-emaonly.safetensors",
               "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
    "runwayml/stable-diffusion-v1-5": (
        "v1-5-pruned-emaonly.safetensors",
        "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"),
    HUB_SDXL: ("sd_xl_base_1.0.safetensors",
               "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b"),
}

# A1111's short hashes: 10 hex digits for checkpoints, 12 for LoRAs.
MODEL_HASH_LENGTH, LORA_HASH_LENGTH = 10, 12
_CHUNK = 1 << 20


# -- hashes -----------------------------------------------------------------------------------

def _sha256(path: Path, start: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=64)
def _file_sha256(key: tuple[str, int, int], start_at_data: bool) -> str:
    path = Path(key[0])
    start = 0
    if start_at_data:
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
    return _sha256(path, start)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a whole file (A1111's checkpoint hash), cached while the file is unchanged."""
    return _file_sha256(_stat_key(Path(path)), False)


def safetensors_data_sha256(path: str | Path) -> str:
    """The sha256 of a .safetensors file's tensor data, skipping the 8-byte length and the JSON
    header: A1111's LoRA hash (`addnet_hash_safetensors`), kohya's `sshs_model_hash`. Metadata
    does not change it."""
    return _file_sha256(_stat_key(Path(path)), True)


def safetensors_bytes_data_sha256(data: bytes) -> str:
    """The same hash for a file's content in memory (what `safetensors.torch.save` returns)."""
    start = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[start:]).hexdigest()


def lora_short_hash(path: str | Path) -> str:
    """The hash A1111 writes for a LoRA file in "Lora hashes" (and Civitai looks up)."""
    return safetensors_data_sha256(path)[:LORA_HASH_LENGTH]


def model_sha256(model: str, local: str | Path | None = None) -> str:
    """The sha256 A1111 would compute for the checkpoint `model` names: the published hash of
    the single-file checkpoint for a hub preset; the file's own for a local file; for a local
    diffusers folder (the tiny models), the sha256 of its weight files in path order, since no
    single file exists; "" for another hub model (unknown here)."""
    if model in SINGLE_FILE_CHECKPOINTS:
        return SINGLE_FILE_CHECKPOINTS[model][1]
    path = Path(local if local is not None else model)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        weights = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin"))
        digest = hashlib.sha256()
        for p in weights:
            digest.update(p.relative_to(path).as_posix().encode())
            digest.update(file_sha256(p).encode())
        return digest.hexdigest() if weights else ""
    return ""


def checkpoint_sha256(model: str) -> str:
    """`model_sha256` for a hub id, a local file or folder, or a tiny model's name."""
    from .models import TINY_MODELS, ensure_tiny_model

    local = ensure_tiny_model(model) if model in TINY_MODELS else None
    return model_sha256(model, local)


def model_short_hash(model: str) -> str:
    """A1111's "Model hash" for `model`; "" when it cannot be known."""
    return checkpoint_sha256(model)[:MODEL_HASH_LENGTH]


def model_name(model: str) -> str:
    """The name A1111 writes under "Model": the checkpoint file's name without its extension
    for the hub presets (what users of those UIs have), else the model as we name it."""
    if model in SINGLE_FILE_CHECKPOINTS:
        return Path(SINGLE_FILE_CHECKPOINTS[model][0]).stem
    return model


# -- the <lora:NAME:WEIGHT> tag ------------------------------------------------------------------

# A1111's extra-network syntax (modules/extra_networks.py reads `<(\w+):([^>]+)>` and splits
# the inside at ':'): a name without ':' or '>'.
LORA_TAG = re.compile(r" ?<lora:([^:>]+):([^:>]+)(?::[^>]*)?>")


def lora_tag(name: str, weight: float) -> str:
    return f"<lora:{name}:{float(weight)!r}>"


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:...>` tags (and the space before each), and the tags'
    (name, weight)."""
    tags = [(m.group(1), float(m.group(2))) for m in LORA_TAG.finditer(prompt)]
    return LORA_TAG.sub("", prompt), tags


def safe_name(text: str) -> str:
    """`text` as a file-name and prompt-tag friendly word: letters, digits, '_', '-', '.'."""
    return re.sub(r"[^\w.-]+", "_", text.strip()).strip("_") or "lora"


# -- kohya LoRA names ----------------------------------------------------------------------------

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# diffusers writes 'module.lora.down.weight' (UNet) and 'module.lora_linear_layer.down.weight'
# (text encoders); peft writes 'module.lora_A.weight'.
_LORA_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\."
                       r"(?:(?:lora|lora_linear_layer)\.(down|up)|lora_(A|B))\.weight$")
# SD and SDXL UNets both have two resnets per down block, three per up block.
LAYERS_PER_BLOCK = 2
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$")


def sai_unet_module(module: str, layers_per_block: int = LAYERS_PER_BLOCK) -> str:
    """A diffusers UNet attention module's path -> its path in the original Stability AI UNet
    (the layout of the single-file checkpoints, and of kohya's SDXL LoRAs).

    'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q'
    -> 'input_blocks.4.1.transformer_blocks.0.attn1.to_q'

    Block i of the down path holds `layers_per_block` resnet+attention pairs after one
    downsampler per level (input_blocks.0 is the first conv); the up path has one more pair
    per level and no conv in front; the middle block is resnet, attention, resnet.
    """
    if module.startswith("mid_block.attentions.0."):
        return "middle_block.1." + module[len("mid_block.attentions.0."):]
    match = _DIFFUSERS_BLOCK.match(module)
    if not match:
        raise ValueError(f"{module!r} is not in a UNet attention block; kohya's SDXL names are "
                         "only known here for the attention blocks (the modules LoRAs adapt).")
    kind, block, index, rest = match.groups()
    block, index = int(block), int(index)
    if kind == "down_blocks":
        return f"input_blocks.{1 + block * (layers_per_block + 1) + index}.1.{rest}"
    return f"output_blocks.{block * (layers_per_block + 1) + index}.1.{rest}"


def kohya_key(key: str, family: str = "sd15", layers_per_block: int = LAYERS_PER_BLOCK) -> str:
    """diffusers' (or peft's) LoRA key -> the kohya name of the same weight, as kohya's
    networks/lora.py names it for `family`.

    'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight'
    -> 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight'
    (SD 1.5); for SDXL the UNet part takes the Stability AI block names and the text encoders
    are 'lora_te1_' and 'lora_te2_'. `layers_per_block`: the UNet config's (2 for SD and
    SDXL; the tiny models have 1).
    """
    match = _LORA_KEY.match(key)
    if not match:
        raise ValueError(f"Unexpected LoRA key {key!r}: not a diffusers or peft LoRA weight.")
    owner, module, updown, peft_ab = match.groups()
    kind = updown or {"A": "down", "B": "up"}[peft_ab]
    prefix = KOHYA_PREFIX[owner]
    if owner == "unet":
        if family == "sdxl":
            module = sai_unet_module(module, layers_per_block)
    else:
        if not module.startswith("text_model."):
            module = "text_model." + module  # kohya follows transformers' CLIPTextModel paths
        if family != "sdxl":
            prefix = "lora_te_"  # one text encoder: kohya's plain name
    return f"{prefix}{module.replace('.', '_')}.lora_{kind}.weight"


def kohya_state(state: Mapping[str, Any], family: str, alpha: float, dtype=None,
                layers_per_block: int = LAYERS_PER_BLOCK) -> dict:
    """The kohya file's tensors for a LoRA in diffusers' (or peft's) names: every module's
    `lora_down`, `lora_up` and its `alpha`. Works on `meta` tensors (names and shapes only)."""
    import torch

    out = {}
    for key, value in state.items():
        name = kohya_key(key, family, layers_per_block)
        out[name] = value if dtype is None else value.to(dtype)
        out[name.split(".lora_")[0] + ".alpha"] = torch.tensor(float(alpha))
    return out


# -- kohya and ModelSpec metadata ----------------------------------------------------------------

# What train_network.py writes in ss_base_model_version, and ModelSpec's architecture ids.
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
# sai_model_spec.py: diffusers for SD 1.x/2.x LoRAs, Stability AI's for SDXL LoRAs.
IMPLEMENTATION = {"sd15": "diffusers",
                  "sdxl": "https://github.com/Stability-AI/generative-models"}
# Marks the files this workbench wrote, so that it only ever replaces its own.
TRAINING_COMMENT = "headshot-kit"
# Metadata that changes with the moment of saving, not with the weights.
VOLATILE_METADATA = ("ss_training_started_at", "ss_training_finished_at", "modelspec.date")


def kohya_metadata(*, family: str, output_name: str, title: str, trigger: str, rank: int,
                   alpha: float, resolution: int, model: str, started_at: float,
                   finished_at: float, settings: Mapping[str, Any],
                   train_text_encoder: bool) -> dict[str, str]:
    """kohya's `ss_*` keys (as train_network.py writes them, strings throughout) and
    ModelSpec's `modelspec.*` for a LoRA; the hashes are added by `with_hashes`."""
    import datetime
    import uuid

    from . import __version__

    sdxl = family == "sdxl"
    date = datetime.datetime.fromtimestamp(int(finished_at), datetime.timezone.utc)
    checkpoint = SINGLE_FILE_CHECKPOINTS.get(model, (model, ""))[0]
    meta = {
        "ss_session_id": str(uuid.UUID(int=int(hashlib.sha256(
            output_name.encode()).hexdigest()[:32], 16))),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished_at),
        "ss_output_name": output_name,
        "ss_training_comment": f"{TRAINING_COMMENT} {__version__}",
        "ss_sd_model_name": checkpoint,
        "ss_new_sd_model_hash": checkpoint_sha256(model),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps({}),
        "ss_network_train_unet_only": str(not train_text_encoder),
        "ss_resolution": str((int(resolution), int(resolution))),
        "ss_clip_skip": "None" if sdxl else "1",
        "ss_max_token_length": "None",
        "ss_v_parameterization": "False",
        # Every caption holds the trigger words (kohya counts tags per image folder).
        "ss_tag_frequency": json.dumps(
            {"img": {trigger: int(settings.get("num_train_images", 1))}}),
    }
    meta.update({f"ss_{k}": str(v) for k, v in settings.items()})
    meta.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCHITECTURE[family],
        "modelspec.implementation": IMPLEMENTATION[family],
        "modelspec.title": title,
        "modelspec.author": "headshot-kit",
        "modelspec.description": f"A face LoRA; put '{trigger}' in the prompt.",
        "modelspec.date": date.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{int(resolution)}x{int(resolution)}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.trigger_phrase": trigger,
        "modelspec.usage_hint": f"Put '{trigger}' in the prompt.",
        "modelspec.tags": "lora,headshot",
    })
    return meta


def with_hashes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, str]:
    """`metadata` with kohya's `sshs_model_hash` (the sha256 of the tensor data: what A1111
    and Civitai hash a LoRA by) and `sshs_legacy_hash` (the old additional-networks hash: 8
    hex digits of 64 KiB read at 1 MiB into the file holding only the `ss_*` metadata)."""
    from safetensors.torch import save

    data = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return {**metadata, "sshs_model_hash": safetensors_bytes_data_sha256(data),
            "sshs_legacy_hash": legacy}
