"""LoRA adapters: attaching them, and writing them in the formats other tools load.

One way to attach a LoRA (`add_lora`), used by the train stage, the fit check (on `meta`
tensors) and the tests; one file name (`LORA_WEIGHTS`) that the train stage writes and the
generate stage and the work folder look for. The weights are saved in diffusers' format, which
`load_lora_weights` reads, and copied into one file named after the subject and run, under
kohya's names and with kohya's metadata (formats.py), for A1111/Forge, ComfyUI, InvokeAI and
kohya's scripts. The LoRA's record beside its weights (config.json: the settings, the subject
words, the base model, the checkpoint's choice) is written by `write_lora_record` and read by
`read_lora_record`, and by nothing else.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import UNET_TARGETS, ConfigError, DataError, save_config
from .layout import LORA_WEIGHTS
from .storage import atomic_path, read_record, same_safetensors

# The name the UI file had before it was named after the subject and run.
LEGACY_KOHYA_WEIGHTS = "pytorch_lora_weights_kohya.safetensors"
# The sub-folder where training keeps the LoRA of the checkpoint chosen by likeness.
BEST_DIR = "best"
# The LoRA's record beside its weights: the resolved TrainConfig, the subject words the dataset
# carried, the UI file's name and, in best/, the checkpoint's choice. Written and read here only.
LORA_RECORD = "config.json"


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
    """The LoRA weights of `module` under peft's names, as fp32 CPU tensors (`meta` ones for a
    module on `meta`)."""
    import torch
    from peft.utils import get_peft_model_state_dict

    # On `meta` (the fit check, the format tests) names and shapes are all there is.
    return {k: v.detach().to("meta" if v.is_meta else "cpu", torch.float32).contiguous()
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


def export_kohya(lora_path: Path, family: str, *, output_name: str, rank: int, alpha: float,
                 metadata: Mapping[str, str], layers_per_block: int = 2) -> Path:
    """The file a user drops into a UI's LoRA folder: the LoRA of `lora_path` under kohya's
    names (formats.kohya_key) with an `.alpha` per module, in fp16, as
    `<output_name>.safetensors` beside it, carrying kohya's and ModelSpec's metadata
    (formats.kohya_metadata) and its hashes. A1111/Forge, ComfyUI, InvokeAI, kohya's scripts
    and diffusers' `load_lora_weights` load it. `layers_per_block`: the UNet config's, which
    places SDXL's blocks in the Stability AI layout.

    A file of ours there under another name (an earlier run's, or the old fixed name) is
    removed, so the folder holds one such file; nobody else's file is touched. The same
    weights saved again leave the file as it was, whatever the moment of saving.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from .formats import kohya_state, safe_name, with_hashes

    folder = Path(lora_path).parent
    target = folder / f"{safe_name(output_name)}.safetensors"
    tensors = kohya_state(load_file(str(lora_path)), family, alpha, dtype=torch.float16,
                          layers_per_block=layers_per_block)
    meta = with_hashes(tensors, {**metadata, "ss_network_dim": str(int(rank)),
                                 "ss_network_alpha": str(float(alpha))})
    with atomic_path(target, same=_same_export) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    for old in our_exports(folder):
        if old != target:
            old.unlink()
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


def _same_export(new: Path, old: Path) -> bool:
    """Same tensors and same metadata but for the moment of saving."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .formats import VOLATILE_METADATA

    def settled(path):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return {k: v for k, v in meta.items() if k not in VOLATILE_METADATA}

    if settled(new) != settled(old):
        return False
    a, b = load_file(str(new)), load_file(str(old))
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def our_exports(folder: str | Path) -> list[Path]:
    """The UI files this workbench wrote in `folder` (their metadata says so), and a file under
    the name it used before; never the diffusers file."""
    from safetensors import safe_open

    from .formats import TRAINING_COMMENT

    found = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        if path.name == LORA_WEIGHTS:
            continue
        if path.name == LEGACY_KOHYA_WEIGHTS:
            found.append(path)
            continue
        try:
            with safe_open(str(path), "pt") as f:
                comment = (f.metadata() or {}).get("ss_training_comment", "")
        except Exception:  # not a safetensors file we can read: not ours
            continue
        if comment.startswith(TRAINING_COMMENT):
            found.append(path)
    return found


@dataclass(frozen=True)
class LoraRecord:
    """What a LoRA folder's config.json records, as the other stages read it; None where it
    records nothing (a LoRA from elsewhere has no record at all)."""

    path: Path  # the record's file, for messages
    family: str | None = None
    model: str | None = None  # the base model it was trained on
    token: str | None = None  # the subject words, from the dataset
    class_name: str | None = None
    ui_weights: str | None = None  # the name of the file UIs load (export_kohya)
    checkpoint: str | None = None  # "last", or BEST_DIR for the checkpoint chosen by likeness
    step: int | None = None
    likeness: float | None = None
    chosen_by: str | None = None  # the face network that chose it

    @property
    def chosen(self) -> dict[str, Any]:
        """The choice by likeness (step, likeness, chosen_by) when this is a LoRA's best/;
        {} for any other LoRA."""
        if self.checkpoint != BEST_DIR or not self.chosen_by:
            return {}
        return {"step": self.step, "likeness": self.likeness, "chosen_by": self.chosen_by}


def write_lora_record(folder: str | Path, cfg, **record: Any) -> Path:
    """The LoRA's config.json in `folder`: the resolved `cfg` (a TrainConfig) and `record`
    (token, class_name, ui_weights, checkpoint, step, ... and what the run measured)."""
    return save_config(cfg, Path(folder) / LORA_RECORD, **record)


def read_lora_record(folder: str | Path) -> LoraRecord:
    """The record of the LoRA in `folder` (an empty one where there is none); a DataError
    naming the file when it is damaged, or names the token without the class noun."""
    path = Path(folder) / LORA_RECORD
    data = read_record(path)
    if ("token" in data) != ("class_name" in data):
        has, lacks = ("token", "class_name") if "token" in data else ("class_name", "token")
        raise DataError(f"{path} records the {has} but no {lacks}; train the LoRA again so "
                        "its record names the subject words whole.")
    return LoraRecord(path=path, **{name: data.get(name) for name in _RECORD_FIELDS})


_RECORD_FIELDS = [name for name in LoraRecord.__dataclass_fields__ if name != "path"]


def _recorded(folder: str | Path) -> LoraRecord:
    """The record, or an empty one where it cannot be read: the UI file and the checkpoint's
    choice are extras that a damaged record only leaves out."""
    try:
        return read_lora_record(folder)
    except (OSError, DataError):
        return LoraRecord(path=Path(folder) / LORA_RECORD)


def ui_weights(lora_dir: str | Path) -> Path | None:
    """The file of a LoRA folder that UIs load (see `export_kohya`), or None where there is
    none (a LoRA from elsewhere, or one written before the workbench wrote it)."""
    recorded = _recorded(lora_dir).ui_weights
    path = Path(lora_dir) / recorded if recorded else None
    return path if path is not None and path.is_file() else None


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
    return _recorded(folder).chosen
