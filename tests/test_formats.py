"""Our LoRA files and PNGs as the programs that read them see them.

Each consumer's reading is written here from its public format (read in their code and docs,
not copied: A1111 is AGPL, ComfyUI GPL): which module a LoRA weight name reaches, how the base
model is told from the metadata, how the "parameters" text is parsed. The key sets are the
full-size SD 1.5 and SDXL models (UNet, and UNet + text encoders), built from
headshot_kit/data/arch/ on `meta` tensors; diffusers is asked directly, with its own loader, on
the tiny models and on the full-size key sets.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import PngImagePlugin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from headshot_kit import formats
from headshot_kit.facedetail import DETECTOR_NAME
from headshot_kit.families import get_family
from headshot_kit.fitcheck.measure import build_text_encoders, build_unet, load_arch
from headshot_kit.lora import add_lora, peft_state, text_encoder_lora_state

CASES = [("sd15", False), ("sd15", True), ("sdxl", False), ("sdxl", True)]
IDS = ["sd15-unet", "sd15-unet+te", "sdxl-unet", "sdxl-unet+te"]
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


# ---------------------------------------------------------------------------------------------
# The full-size models' LoRA files, names and shapes only


def diffusers_file_state(modules: dict) -> dict:
    """What the train stage's diffusers file holds for `modules` ({"unet": unet, ...}): each
    owner's LoRA under diffusers' names, prefixed with the owner."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = {}
    for owner, module in modules.items():
        part = peft_state(module) if owner == "unet" else text_encoder_lora_state(module)
        state.update({f"{owner}.{k}": v for k, v in convert_state_dict_to_diffusers(part).items()})
    return state


@functools.cache
def full_size(family: str, with_te: bool):
    """(kohya tensors of a rank-4 LoRA on the full-size model, the UNet's config)."""
    unet = build_unet(family)
    add_lora(unet, rank=4)
    modules = {"unet": unet}
    if with_te:
        fam = get_family(family)
        for name, encoder in zip(fam.text_encoders, build_text_encoders(family)):
            add_lora(encoder, rank=4, targets=fam.text_encoder_targets)
            modules[name] = encoder
    state = diffusers_file_state(modules)
    kohya = formats.kohya_state(state, family, alpha=4,
                                layers_per_block=unet.config.layers_per_block)
    return kohya, unet.config


def modules_of(tensors) -> set[str]:
    return {k.split(".")[0] for k in tensors if k.endswith(".lora_down.weight")}


def text_layers(family: str) -> list[int]:
    return [c["num_hidden_layers"] for c in load_arch(family)["text_encoders"]]


def original_unet_blocks(config) -> list[tuple[str, str, int]]:
    """(diffusers block, Stability AI block, transformer depth) of every attention block,
    walking the original (ldm/sgm) UNet forward: input_blocks.0 is the first conv, then per
    level `layers_per_block` (resnet, attention) pairs and a downsampler but at the last level;
    the middle block is resnet, attention, resnet; the output side has one more pair per level,
    deepest level first."""
    levels = len(config.block_out_channels)
    has_attention = [t.startswith("CrossAttn") for t in config.down_block_types]
    depth = config.transformer_layers_per_block
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    per = config.layers_per_block
    blocks, index = [], 0
    for level in range(levels):
        for j in range(per):
            index += 1
            if has_attention[level]:
                blocks.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{index}.1",
                               depth[level]))
        index += level < levels - 1
    blocks.append(("mid_block.attentions.0", "middle_block.1", depth[-1]))
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(per + 1):
            if has_attention[level]:
                blocks.append((f"up_blocks.{up}.attentions.{j}", f"output_blocks.{index}.1",
                               depth[level]))
            index += 1
    return blocks


def attention_projections(config, original: bool) -> set[str]:
    """Every attention projection of the UNet, under Stability AI's or diffusers' block names."""
    return {f"{sai if original else diffusers}.transformer_blocks.{t}.{attn}.{p}"
            for diffusers, sai, depth in original_unet_blocks(config) for t in range(depth)
            for attn in ("attn1", "attn2") for p in PROJECTIONS}


def under(path: str) -> str:
    return path.replace(".", "_")


CLIP_PARTS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
              "mlp_fc1", "mlp_fc2")


def test_the_walk_of_the_original_layout_lands_on_the_real_unet():
    """The block walk the checks below stand on names modules the real UNet has: 560
    projections in SDXL's 70 transformer blocks, 128 in SD 1.5's 16."""
    for family, count in (("sd15", 128), ("sdxl", 560)):
        unet = build_unet(family)
        names = {n for n, _ in unet.named_modules()}
        diffusers_names = attention_projections(unet.config, original=False)
        assert len(diffusers_names) == count and diffusers_names <= names


# ---------------------------------------------------------------------------------------------
# A1111 / Forge


def a1111_target(module: str, sdxl: bool) -> str:
    """The A1111 module a kohya LoRA module name reaches (extensions-builtin/Lora/networks.py:
    diffusers block names are converted to the original ones with three layers per level;
    original names only need 'lora_unet' -> 'diffusion_model'; SDXL's first text encoder is
    embedder 0's transformer, its second OpenCLIP's resblocks, whose q/k/v share in_proj)."""
    m = re.match(r"lora_unet_(down|up)_blocks_(\d+)_attentions_(\d+)_(.+)", module)
    if m:
        kind, block, index, rest = m.groups()
        n = 1 + int(block) * 3 + int(index) if kind == "down" else int(block) * 3 + int(index)
        side = "input_blocks" if kind == "down" else "output_blocks"
        return f"diffusion_model_{side}_{n}_1_{rest}"
    m = re.match(r"lora_unet_mid_block_attentions_0_(.+)", module)
    if m:
        return f"diffusion_model_middle_block_1_{m[1]}"
    if module.startswith("lora_unet_"):
        return module.replace("lora_unet", "diffusion_model", 1)
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", module)
    if m and not sdxl:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te1_text_model_encoder_layers_(\d+)_(.+)", module)
    if m and sdxl:
        return f"0_transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", module)
    if m and sdxl:
        rest = (m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
                .replace("self_attn", "attn"))
        rest = re.sub(r"attn_[qkv]_proj$", "attn", rest)  # the shared in_proj's module
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return ""


def a1111_modules(family: str, config) -> set[str]:
    """The module names A1111 gives the model it loads (the original layout, '.' -> '_')."""
    names = {"diffusion_model_" + under(p) for p in attention_projections(config, original=True)}
    layers = text_layers(family)
    if family == "sd15":
        names |= {f"transformer_text_model_encoder_layers_{i}_{p}"
                  for i in range(layers[0]) for p in CLIP_PARTS}
    else:
        names |= {f"0_transformer_text_model_encoder_layers_{i}_{p}"
                  for i in range(layers[0]) for p in CLIP_PARTS}
        names |= {f"1_model_transformer_resblocks_{i}_{p}" for i in range(layers[1])
                  for p in ("attn", "attn_out_proj", "mlp_c_fc", "mlp_c_proj")}
    return names


def a1111_version(metadata: dict) -> str:
    """A1111's NetworkOnDisk.detect_version: which checkpoints the LoRA is shown beside."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


@pytest.mark.parametrize("family,with_te", CASES, ids=IDS)
def test_a1111_and_forge_reach_every_module_and_tell_the_base_model(family, with_te,
                                                                    ui_files):
    tensors, config = full_size(family, with_te)
    targets = {m: a1111_target(m, family == "sdxl") for m in modules_of(tensors)}
    known = a1111_modules(family, config)
    missed = sorted(m for m, t in targets.items() if t not in known)
    assert not missed, f"{len(missed)} of {len(targets)} modules reach nothing: {missed[:3]}"
    assert any(m.startswith("lora_te") for m in targets) == with_te
    # The file's metadata decides beside which checkpoints A1111 and Forge list the LoRA.
    with safe_open(str(ui_files[family, with_te]), "pt") as f:
        metadata = f.metadata()
    assert a1111_version(metadata) == {"sd15": "SD1", "sdxl": "SDXL"}[family]


# ---------------------------------------------------------------------------------------------
# ComfyUI


def comfyui_key_map(family: str, config) -> dict[str, str]:
    """ComfyUI's LoRA key map (comfy/lora.py, model_lora_keys_unet and model_lora_keys_clip):
    `lora_unet_` + every weight of the original UNet and + the diffusers name of each
    (comfy.utils.unet_to_diffusers); `lora_te_` for SD 1.5's CLIP-L, `lora_te1_`/`lora_te2_`
    for SDXL's CLIP-L and CLIP-G, by layer and projection."""
    keys = {}
    for diffusers, sai, depth in original_unet_blocks(config):
        for t in range(depth):
            for attn in ("attn1", "attn2"):
                for p in PROJECTIONS:
                    target = f"diffusion_model.{sai}.transformer_blocks.{t}.{attn}.{p}.weight"
                    keys["lora_unet_" + under(f"{sai}.transformer_blocks.{t}.{attn}.{p}")] = target
                    keys["lora_unet_" + under(
                        f"{diffusers}.transformer_blocks.{t}.{attn}.{p}")] = target
    layers = text_layers(family)
    prefixes = ["lora_te"] if family == "sd15" else ["lora_te1", "lora_te2"]
    for prefix, n in zip(prefixes, layers):
        for i in range(n):
            for p in CLIP_PARTS:
                keys[f"{prefix}_text_model_encoder_layers_{i}_{p}"] = f"{prefix}.{i}.{p}"
    return keys


def comfyui_load(tensors, key_map) -> tuple[set[str], list[str]]:
    """ComfyUI's load_lora: a module is patched when its up and down weights sit under a
    mapped name (its alpha is read beside them); every other key is "lora key not loaded"."""
    loaded, patched = set(), set()
    for name, target in key_map.items():
        up, down, alpha = f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"
        if up in tensors and down in tensors:
            loaded |= {up, down} | ({alpha} if alpha in tensors else set())
            patched.add(target)
    return patched, sorted(set(tensors) - loaded)


@pytest.mark.parametrize("family,with_te", CASES, ids=IDS)
def test_comfyui_loads_every_key(family, with_te):
    tensors, config = full_size(family, with_te)
    patched, not_loaded = comfyui_load(tensors, comfyui_key_map(family, config))
    assert not not_loaded, f"lora key not loaded: {not_loaded[:3]} ({len(not_loaded)})"
    assert len(patched) == len(modules_of(tensors))


# ---------------------------------------------------------------------------------------------
# kohya's sd-scripts


def kohya_network_modules(family: str, config) -> set[str]:
    """The LoRA module names kohya's networks/lora.py gives the model it trains: `lora_unet`
    + the path of each Linear in a Transformer2DModel (SD 1.5 on diffusers' UNet layout, SDXL
    on the original one, library/sdxl_original_unet.py), `lora_te`/`lora_te1`/`lora_te2` + the
    path of each Linear in CLIPAttention and CLIPMLP; '.' -> '_'."""
    names = {"lora_unet_" + under(p)
             for p in attention_projections(config, original=family == "sdxl")}
    prefixes = ["lora_te"] if family == "sd15" else ["lora_te1", "lora_te2"]
    for prefix, n in zip(prefixes, text_layers(family)):
        names |= {f"{prefix}_text_model_encoder_layers_{i}_{p}"
                  for i in range(n) for p in CLIP_PARTS}
    return names


@pytest.mark.parametrize("family,with_te", CASES, ids=IDS)
def test_kohya_create_network_from_weights_matches_every_module(family, with_te):
    """create_network_from_weights builds a module per `lora_down` name with that rank, then
    loads the weights into the network it built over the model (strict=False: a name it has
    no module for is silently dropped)."""
    tensors, config = full_size(family, with_te)
    ours = modules_of(tensors)
    dropped = sorted(ours - kohya_network_modules(family, config))
    assert not dropped, f"{len(dropped)} of {len(ours)} modules dropped: {dropped[:3]}"
    ranks = {tensors[f"{m}.lora_down.weight"].shape[0] for m in ours}
    assert ranks == {4} and all(float(tensors[f"{m}.alpha"]) == 4 for m in ours)


@pytest.mark.parametrize("with_te", [False, True], ids=["unet", "unet+te"])
def test_kohya_sdxl_merge_finds_every_module(with_te):
    """networks/sdxl_merge_lora.py looks each `lora_down` module up among the names it gives
    the SDXL model (original UNet layout, both text encoders) and skips the ones it cannot
    find ("no module found for LoRA weight")."""
    tensors, config = full_size("sdxl", with_te)
    names = kohya_network_modules("sdxl", config)
    skipped = sorted(k for k in tensors if "lora_down" in k
                     and k[:k.rfind(".lora_down")] not in names)
    assert not skipped, f"no module found for {len(skipped)} weights, e.g. {skipped[:2]}"
    assert len(modules_of(tensors)) == 560 + (12 * 4 + 32 * 4) * with_te


# ---------------------------------------------------------------------------------------------
# InvokeAI


def invokeai_token_vector_length(tensors) -> int | None:
    """InvokeAI's lora_token_vector_length (invokeai/backend/model_manager/util/
    model_util.py): the width of the first cross-attention key projection it meets, or the
    text encoders' (both summed for SDXL)."""
    te1 = te2 = None
    for key, tensor in tensors.items():
        model_key, _, lora_key = key.partition(".")
        width = tensor.shape[1] if lora_key == "lora_down.weight" else None
        if key.startswith("lora_unet_") and ("_attn2_to_k." in key or "_attn2_to_v." in key):
            if width:
                return width
        elif key.startswith("lora_te") and "_self_attn_" in key and width:
            if key.startswith("lora_te_"):
                return width
            if key.startswith("lora_te1_"):
                te1 = width
            elif key.startswith("lora_te2_"):
                te2 = width
            if te1 and te2:
                return te1 + te2
    return None


INVOKEAI_BASE = {768: "sd-1", 1024: "sd-2", 1280: "sdxl-refiner", 2048: "sdxl"}


@pytest.mark.parametrize("family,with_te", CASES, ids=IDS)
def test_invokeai_probe_takes_it_for_a_lora_of_its_base(family, with_te):
    tensors, config = full_size(family, with_te)
    # Its kohya (LyCORIS-style) format is told by these prefixes.
    assert all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))
               for k in tensors)
    base = INVOKEAI_BASE.get(invokeai_token_vector_length(tensors))
    assert base == {"sd15": "sd-1", "sdxl": "sdxl"}[family]
    if family == "sdxl":
        # InvokeAI turns an SDXL kohya LoRA's original block names into diffusers' by prefix
        # (sdxl_lora_conversion_utils.convert_sdxl_keys_to_diffusers_format); a key that
        # starts with none of them stays unconverted.
        prefixes = {under(sai) + "_" for _, sai, _ in original_unet_blocks(config)}
        unconverted = sorted(m for m in modules_of(tensors) if m.startswith("lora_unet_")
                             and not m[len("lora_unet_"):].startswith(tuple(prefixes)))
        assert not unconverted, f"{len(unconverted)} not converted, e.g. {unconverted[:2]}"


# ---------------------------------------------------------------------------------------------
# diffusers


@pytest.mark.parametrize("family,with_te", CASES, ids=IDS)
def test_diffusers_conversion_reaches_every_module_of_the_full_size_model(family, with_te):
    """diffusers' own reading of a kohya file (what load_lora_weights runs on one): the
    original block names mapped back with the UNet's config, then kohya names to diffusers'."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers, _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    tensors, config = full_size(family, with_te)
    state = _maybe_map_sgm_blocks_to_diffusers(dict(tensors), config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    # Then, as load_lora_into_unet and load_lora_into_text_encoder do, to peft's names.
    by_owner = {}
    for key, value in converted.items():
        owner, rest = key.split(".", 1)
        by_owner.setdefault(owner, {})[rest] = value
    peft_keys = [f"{owner}.{k}" for owner, part in by_owner.items()
                 for k in (convert_unet_state_dict_to_peft(part) if owner == "unet"
                           else convert_state_dict_to_peft(part))]
    unet = {n for n, _ in build_unet(family).named_modules()}
    encoders = [{n for n, _ in e.named_modules()} for e in build_text_encoders(family)]
    reached = 0
    for key in peft_keys:
        if not key.endswith("lora_A.weight"):
            continue
        owner, module = key.split(".", 1)
        module = module.removesuffix(".lora_A.weight")
        if owner == "unet":
            assert module in unet, key
        else:
            index = {"text_encoder": 0, "text_encoder_2": 1}[owner]
            assert module in encoders[index] or module.removeprefix("text_model.") in (
                encoders[index]), key
        reached += 1
    assert reached == len(modules_of(tensors))


def random_lora(pipe, modules: list[str], seed: int):
    """LoRAs on `modules` of `pipe` whose random up weights visibly change the image."""
    import copy

    family = get_family("sdxl" if "XL" in type(pipe).__name__ else "sd15")
    parts = {}
    generator = torch.Generator().manual_seed(seed)
    for name in modules:
        module = copy.deepcopy(getattr(pipe, name))
        add_lora(module, rank=4, targets=family.text_encoder_targets if name != "unet" else
                 ("to_q", "to_k", "to_v", "to_out.0"))
        with torch.no_grad():
            for pname, param in module.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        parts[name] = module
    return family.name, parts


@pytest.fixture(scope="module")
def ui_files(tmp_path_factory):
    """The UI file of a LoRA on the tiny models, as the train stage writes it, per case."""
    from headshot_kit.lora import export_kohya, save_lora
    from headshot_kit.models import load_pipeline

    files = {}
    for i, (family, with_te) in enumerate(CASES):
        pipe = load_pipeline(f"tiny-{family}", family)
        names = ["unet", *(get_family(family).text_encoders if with_te else ())]
        _, parts = random_lora(pipe, names, seed=i)
        folder = tmp_path_factory.mktemp(f"{family}-{int(with_te)}")
        weights = save_lora(folder, family, parts)
        name = f"ohwx-case{i}"
        files[family, with_te] = export_kohya(
            weights, family, output_name=name, rank=4, alpha=4,
            layers_per_block=pipe.unet.config.layers_per_block,
            metadata=formats.kohya_metadata(
                family=family, output_name=name, title=name, trigger="ohwx person", rank=4,
                alpha=4, resolution=64, model=f"tiny-{family}", started_at=1.7e9,
                finished_at=1.7e9 + 60, settings={}, train_text_encoder=with_te))
    return files


def render(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        image = pipe("a photo of ohwx person", num_inference_steps=2, width=64, height=64,
                     generator=generator, output_type="np").images[0]
    return image


@pytest.mark.parametrize("family,with_te", CASES, ids=IDS)
def test_diffusers_load_lora_weights_draws_the_same_from_the_ui_file(family, with_te,
                                                                     ui_files):
    """load_lora_weights on the UI file (kohya names, SDXL's original block names, fp16) draws
    what it draws from the diffusers file beside it."""
    from headshot_kit.lora import LORA_WEIGHTS
    from headshot_kit.models import load_pipeline

    ui = ui_files[family, with_te]
    images = {}
    for name in (LORA_WEIGHTS, ui.name):
        pipe = load_pipeline(f"tiny-{family}", family)
        base = render(pipe)
        pipe.load_lora_weights(str(ui.parent), weight_name=name)
        images[name] = render(pipe)
    assert np.abs(images[LORA_WEIGHTS] - base).mean() > 0.02  # the LoRA changes the image
    assert np.abs(images[ui.name] - images[LORA_WEIGHTS]).max() < 0.02  # fp16 rounding only


# ---------------------------------------------------------------------------------------------
# The file itself: name, metadata, hashes


def by_hand_data_sha256(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


@pytest.mark.parametrize("family,with_te", CASES, ids=IDS)
def test_kohya_and_modelspec_metadata_are_what_those_define(family, with_te, ui_files):
    ui = ui_files[family, with_te]
    with safe_open(str(ui), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(ui))
    # What kohya's train_network.py always writes, as it writes it (strings throughout).
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == ui.stem  # A1111's alias: the name in <lora:NAME:1>
    assert meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_network_train_unet_only"] == str(not with_te)
    assert json.loads(meta["ss_tag_frequency"])
    # kohya's hashes: the tensor data's sha256 (what A1111 and Civitai hash a LoRA by) and
    # the legacy one, 64 KiB at 1 MiB into a file with only the ss_* metadata: past the end
    # of a file this small, so the sha256 of nothing.
    assert meta["sshs_model_hash"] == by_hand_data_sha256(ui)
    assert meta["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]
    # Stability AI's ModelSpec, as sd-scripts' sai_model_spec.py writes it for a LoRA.
    assert meta["modelspec.architecture"] == {
        "sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}[family]
    assert meta["modelspec.implementation"] == {
        "sd15": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}[family]
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.title"] == ui.stem and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.trigger_phrase"] == "ohwx person"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if k.endswith(".weight"))
    prefix = {"sd15": "lora_unet_down_blocks_", "sdxl": "lora_unet_input_blocks_"}[family]
    assert any(k.startswith(prefix) for k in tensors)
    assert not any(k.startswith("lora_unet_down_blocks_") for k in tensors) or family == "sd15"


def test_the_hashes_are_a1111s_on_small_files(tmp_path):
    """A1111's checkpoint hash (sha256 of the file, 10 hex digits) and LoRA hash (sha256 of the
    tensor data after the header, 12), by hand on small files; metadata changes the second
    not."""
    ckpt = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(ckpt))
    assert formats.model_short_hash(str(ckpt)) == hashlib.sha256(
        ckpt.read_bytes()).hexdigest()[:10]
    lora = tmp_path / "lora.safetensors"
    plain = tmp_path / "plain.safetensors"
    tensors = {"a.lora_down.weight": torch.ones(2, 3), "a.lora_up.weight": torch.zeros(3, 2)}
    save_file(tensors, str(lora), metadata={"ss_output_name": "x" * 100})
    save_file(tensors, str(plain))
    data = lora.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert formats.lora_short_hash(lora) == hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    assert formats.lora_short_hash(lora) == formats.lora_short_hash(plain)
    assert formats.file_sha256(lora) != formats.file_sha256(plain)
    # The hub presets: the published hashes of the single files those UIs load.
    assert formats.model_short_hash("stable-diffusion-v1-5/stable-diffusion-v1-5") == "6ce0161689"
    assert formats.model_short_hash("stabilityai/stable-diffusion-xl-base-1.0") == "31e35c80fc"
    assert formats.model_short_hash("someone/unknown-model") == ""


def test_sdxl_block_names_follow_the_original_layout():
    assert formats.sai_unet_module("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
                                   ) == "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert formats.sai_unet_module("up_blocks.0.attentions.2.proj_in") == (
        "output_blocks.2.1.proj_in")
    assert formats.sai_unet_module("mid_block.attentions.0.transformer_blocks.9.attn2.to_k"
                                   ) == "middle_block.1.transformer_blocks.9.attn2.to_k"
    assert formats.kohya_key(
        "unet.down_blocks.2.attentions.1.transformer_blocks.3.attn1.to_out.0.lora.down.weight",
        "sdxl") == "lora_unet_input_blocks_8_1_transformer_blocks_3_attn1_to_out_0.lora_down.weight"
    with pytest.raises(ValueError, match="attention blocks"):
        formats.sai_unet_module("down_blocks.0.resnets.0.conv1")


# ---------------------------------------------------------------------------------------------
# The PNG "parameters" text: A1111's paste, ADetailer's keys, Civitai's hashes

# A1111's infotext grammar (modules/infotext_utils.py, parse_generation_parameters): the last
# line holds "key: value" pairs, a value quoted (JSON) when it holds ',', ':' or '"'.
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Its extra-networks syntax in the prompt (modules/extra_networks.py).
A1111_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def a1111_parse(text: str) -> dict[str, str]:
    """parse_generation_parameters, from its documented behaviour."""
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    found = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = A1111_SIZE.match(value)
        if size:
            found[f"{key}-1"], found[f"{key}-2"] = size.groups()
        else:
            found[key] = value
    return found


# The infotext keys ADetailer 25 writes and reads back (adetailer/args.py, ALL_ARGS), and the
# detectors it ships.
ADETAILER_25_KEYS = {
    "ADetailer model", "ADetailer model classes", "ADetailer prompt",
    "ADetailer negative prompt", "ADetailer confidence", "ADetailer method to decide top k masks",
    "ADetailer mask only top k", "ADetailer mask min ratio", "ADetailer mask max ratio",
    "ADetailer x offset", "ADetailer y offset", "ADetailer dilate erode",
    "ADetailer mask merge invert", "ADetailer mask blur", "ADetailer denoising strength",
    "ADetailer inpaint only masked", "ADetailer inpaint padding",
    "ADetailer use inpaint width height", "ADetailer inpaint width", "ADetailer inpaint height",
    "ADetailer use separate steps", "ADetailer steps", "ADetailer use separate CFG scale",
    "ADetailer CFG scale", "ADetailer use separate checkpoint", "ADetailer checkpoint",
    "ADetailer use separate VAE", "ADetailer VAE", "ADetailer use separate sampler",
    "ADetailer sampler", "ADetailer scheduler", "ADetailer use separate noise multiplier",
    "ADetailer noise multiplier", "ADetailer restore face", "ADetailer ControlNet model",
    "ADetailer ControlNet module", "ADetailer ControlNet weight",
    "ADetailer ControlNet guidance start/end", "ADetailer version"}
ADETAILER_FACE_MODELS = {"face_yolov8n.pt", "face_yolov8s.pt", "mediapipe_face_full",
                         "mediapipe_face_short", "mediapipe_face_mesh"}


def check_a1111_reads(text: str, lora_dir=None) -> dict[str, str]:
    """What A1111, ADetailer and Civitai take from `text`; fails where they would not."""
    found = a1111_parse(text)
    assert re.fullmatch(r"[0-9a-f]{10}", found["Model hash"])
    tags = [m.group(2).split(":") for m in A1111_EXTRA_NETWORK.finditer(found["Prompt"])
            if m.group(1) == "lora"]
    if lora_dir is not None:
        from headshot_kit.lora import ui_weights

        ui = ui_weights(lora_dir)
        [(name, weight)] = tags
        float(weight)
        # A1111 finds the LoRA by name or by its alias (ss_output_name); on paste, by hash.
        with safe_open(str(ui), "pt") as f:
            assert f.metadata()["ss_output_name"] == name == ui.stem
        pairs = [item.split(":") for item in found["Lora hashes"].split(",")]
        assert [(a.strip(), h.strip()) for a, h in pairs] == [
            (name, by_hand_data_sha256(ui)[:12])]
    else:
        assert not tags and "Lora hashes" not in found
    adetailer = {k for k in found if k.startswith("ADetailer")}
    if adetailer:
        assert adetailer <= ADETAILER_25_KEYS, adetailer - ADETAILER_25_KEYS
        assert found["ADetailer model"] in ADETAILER_FACE_MODELS
        assert 0 <= float(found["ADetailer confidence"]) <= 1
        assert 0 < float(found["ADetailer denoising strength"]) <= 1
        assert found["ADetailer method to decide top k masks"] in ("Area", "Confidence")
        for key in ("ADetailer mask only top k", "ADetailer dilate erode",
                    "ADetailer mask blur", "ADetailer inpaint padding"):
            int(found[key])
        assert found["ADetailer inpaint only masked"] == "True"
        assert found["ADetailer version"].startswith("25.")
    return found


@pytest.fixture(scope="module")
def sd15_pipe():
    from headshot_kit.models import load_pipeline

    return load_pipeline("tiny-sd15")


@pytest.fixture(scope="module")
def sd15_lora(sd15_pipe, tmp_path_factory):
    from conftest import make_lora

    return make_lora(sd15_pipe, tmp_path_factory.mktemp("run") / "lora")


def test_a1111_pastes_the_model_the_lora_and_the_face_pass(sd15_lora, tmp_path):
    from headshot_kit import generate as gen
    from headshot_kit.config import get_preset

    cfg = dataclasses.replace(get_preset("tiny").generate, face_detail=True)
    style = gen.Style("mine", "a photo of {subject}, with: commas")
    for lora in (sd15_lora, None):
        shot = gen.make_shot(cfg, style, 3, lora, lora_scale=0.75) if lora else gen.make_shot(
            cfg, style, 3, None)
        text = shot.parameters("1 face redrawn")
        found = check_a1111_reads(text, lora)
        assert found["Prompt"].startswith(shot.prompt) and found["Seed"] == "3"
        assert (found["Size-1"], found["Size-2"]) == ("64", "64")
        if lora:
            assert found["Prompt"].endswith("<lora:ohwx-test0000:0.75>")
        # The workbench's own detector and settings, under keys of its own.
        assert found["Face detail detector"] == DETECTOR_NAME == "yunet-2023mar-int8"
        assert float(found["Face detail padding"]) == cfg.face_detail_padding
        gen.save_png(gen.Image.new("RGB", (8, 8)), tmp_path / "x.png", shot, "1 face redrawn")
        params = gen.read_parameters(tmp_path / "x.png")
        assert shot == gen.shot_from_row({**params, "style": "mine",
                                          "family": "sd15"}, lora)


OLD_PARAMETERS = (
    "{prompt}\nNegative prompt: {negative}\nSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7.0, "
    "Seed: 1, Size: 64x64, Model: tiny-sd15, Lora: lora, Lora scale: 0.8, "
    "ADetailer model: dlib-hog, ADetailer denoising strength: 0.4, "
    "ADetailer mask only top k largest: 4, Face detail padding: 0.2, "
    "Face detail feather: 0.12, Face detail: 1 face redrawn")


def test_regenerate_still_reads_a_png_written_before(sd15_pipe, sd15_lora, tmp_path):
    """A PNG whose chunk names the LoRA in "Lora"/"Lora scale" and the face pass under the
    old ADetailer key (as generate wrote them before) renders its image again."""
    from headshot_kit import generate as gen
    from headshot_kit.config import get_preset

    cfg = dataclasses.replace(get_preset("tiny").generate, steps=3, face_detail=True,
                              face_detail_padding=0.2, lora_scale=0.8)
    shot = gen.make_shot(cfg, gen.load_styles()["corporate"], 1, sd15_lora)
    image = gen.render(shot, sd15_pipe)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", OLD_PARAMETERS.format(prompt=shot.prompt,
                                                      negative=shot.negative_prompt))
    image.save(tmp_path / "old.png", pnginfo=info)
    params = gen.read_parameters(tmp_path / "old.png")
    assert (params["lora"], params["lora_scale"]) == ("lora", 0.8)
    assert (params["face_detail_strength"], params["face_detail_padding"]) == (0.4, 0.2)
    again = gen.regenerate(params, sd15_lora, pipe=sd15_pipe)
    assert np.array_equal(np.asarray(again), np.asarray(image))


def test_a_trained_loras_headshots_carry_what_a1111_civitai_and_adetailer_read(
        prepared_dataset, sd15_pipe, tmp_path):
    """The demo's path in short (train the tiny LoRA, render with the face pass): every PNG
    carries the model's hash, the LoRA's tag and hash (its UI file's), ADetailer 25's keys."""
    from headshot_kit import generate as gen
    from headshot_kit.config import get_preset
    from headshot_kit.train import train_lora

    preset = get_preset("tiny")
    train_lora(prepared_dataset, tmp_path / "lora", dataclasses.replace(
        preset.train, steps=2, validate_every=0, checkpoint_every=0), progress=False)
    cfg = dataclasses.replace(preset.generate, face_detail=True, styles=["corporate"],
                              seeds=[0])
    pack = gen.generate_pack(tmp_path / "lora", tmp_path / "pack", cfg, pipe=sd15_pipe,
                             progress=False)
    text = gen.Image.open(pack.out_dir / pack.manifest.loc[0, "file"]).info["parameters"]
    found = check_a1111_reads(text, tmp_path / "lora")
    assert found["Model hash"] == formats.model_short_hash("tiny-sd15")
    assert "ADetailer denoising strength" in found and "<lora:ohwx-" in found["Prompt"]


def test_a_new_run_replaces_only_its_own_ui_file(sd15_pipe, tmp_path):
    """Saving under a new name (another run in the same folder) removes the workbench's
    earlier UI file, and the one it wrote under its old fixed name, never anyone else's."""
    from conftest import make_lora

    from headshot_kit.lora import LEGACY_KOHYA_WEIGHTS, LORA_WEIGHTS, export_kohya, ui_weights

    folder = make_lora(sd15_pipe, tmp_path / "lora")
    first = ui_weights(folder)
    (folder / LEGACY_KOHYA_WEIGHTS).write_bytes(first.read_bytes())
    theirs = folder / "someone-else.safetensors"
    save_file({"x.lora_down.weight": torch.ones(1, 1)}, str(theirs),
              metadata={"ss_output_name": "someone-else"})
    second = export_kohya(folder / LORA_WEIGHTS, "sd15", output_name="ohwx-other", rank=4,
                          alpha=4, metadata=formats.kohya_metadata(
                              family="sd15", output_name="ohwx-other", title="t", trigger="ohwx",
                              rank=4, alpha=4, resolution=64, model="tiny-sd15",
                              started_at=0.0, finished_at=0.0, settings={},
                              train_text_encoder=False), layers_per_block=1)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(
        [LORA_WEIGHTS, second.name, theirs.name])


def test_two_datasets_never_share_a_lora_name_and_a_resumed_run_keeps_it(tmp_path):
    from headshot_kit.config import TrainConfig
    from headshot_kit.train.card import lora_file_name

    names = []
    for person in ("alice", "bob"):
        data = tmp_path / person
        data.mkdir()
        (data / "metadata.jsonl").write_text(json.dumps({"file_name": f"{person}.png",
                                                         "text": "a photo of ohwx person"}))
        names.append(lora_file_name(TrainConfig(), "ohwx", data))
    assert names[0] != names[1] and all(re.fullmatch(r"ohwx-[0-9a-f]{8}", n) for n in names)
    # More steps (a resumed run) keep the name; another rank is another run.
    assert lora_file_name(TrainConfig(steps=1600), "ohwx", tmp_path / "alice") == names[0]
    assert lora_file_name(TrainConfig(rank=8), "ohwx", tmp_path / "alice") != names[0]
    assert lora_file_name(TrainConfig(), "ohwx", tmp_path / "alice", step=300) == (
        f"{names[0]}-step300")


def test_the_settings_in_a_lora_name_are_ones_a_resumed_run_keeps(tmp_path):
    """A resumed run keeps its LoRA's name: check_resume refuses a change to any setting the
    name is made of, and none of them is among those a resumed run may change."""
    from headshot_kit.config import ConfigError, TrainConfig, to_dict
    from headshot_kit.train.card import NAME_SETTINGS
    from headshot_kit.train.checkpoints import FREE_ON_RESUME, check_resume

    cfg = TrainConfig()
    saved = json.loads(json.dumps(to_dict(cfg), default=str))
    for key in NAME_SETTINGS:
        meta = {"step": 1, "config": {**saved, key: "another"}}
        with pytest.raises(ConfigError, match=f"other settings: {key} 'another'"):
            check_resume(tmp_path, meta, cfg)
    assert not set(NAME_SETTINGS) & set(FREE_ON_RESUME)
