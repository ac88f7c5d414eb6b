"""Checkpoints: which exist, which is the latest, whether a run may continue one, and a
Trainer's writing, reading and resuming of them.

A checkpoint folder holds `meta.json` (the step, the settings and the photos that made it),
`state.safetensors` (every tensor of the resumable state: LoRA weights, optimizer moments, the
random generators' states) and `state.json` (the rest: numbers, lists and where each tensor
goes). Neither format can carry code, so a checkpoint from a shared Drive folder or a sweep's
network disk is data to read, never a program to run (unlike a pickled `state.pt`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, TrainConfig, to_dict

if TYPE_CHECKING:
    from . import Trainer

STATE_TENSORS, STATE_JSON, META = "state.safetensors", "state.json", "meta.json"


class CheckpointUnreadable(ValueError):
    """A checkpoint's files are cut short or damaged; an older one may still be good."""


# Settings a resumed run may change: none of them shapes the weights already trained. Every
# other setting must be the checkpoint's (check_resume), and so must the optimizer that ran (its
# state fits no other).
FREE_ON_RESUME = ("steps", "resume", "checkpoint_dir", "checkpoint_every", "checkpoints_keep",
                  "validate_every", "validation_prompts", "validation_seeds", "validation_steps",
                  "max_bad_steps", "force_fit", "device", "class_dir")


def check_resume(folder: Path, meta: dict, cfg: TrainConfig, data: str = "",
                 data_dir: Path | None = None) -> None:
    """Refuse to continue a checkpoint with photos or settings that did not make it, naming
    only those that changed, or with fewer steps than it already has. `data` is the prepared
    dataset's fingerprint (headshot_kit.train.data.dataset_fingerprint)."""
    if data and meta.get("data_fingerprint") != data:
        raise ConfigError(f"{folder} continues a run trained on other photos "
                          f"({meta.get('data_dir', 'not recorded')}), not on those in "
                          f"{data_dir}: its LoRA would keep the old face. Train these photos "
                          "into a new out folder (or checkpoint_dir), or set resume=False to "
                          "start over in this one (its LoRA is then replaced).")
    # Through JSON, as the checkpoint stored them: a tuple and the list it became are equal.
    now = json.loads(json.dumps(to_dict(cfg), default=str))
    changed = [f"{k} {v!r} (now {now[k]!r})" for k, v in meta["config"].items()
               if k in now and k not in FREE_ON_RESUME and v != now[k]]
    if changed:
        raise ConfigError(f"{folder} continues a run trained with other settings: "
                          f"{', '.join(changed)}. A checkpoint goes on only with the settings "
                          "that made it (more steps are fine): set those back, train into a new "
                          "out folder (or checkpoint_dir), or set resume=False to start over.")
    if meta["step"] > cfg.steps:
        raise ConfigError(f"{folder} is already at step {meta['step']}, more than steps="
                          f"{cfg.steps}: set steps to {meta['step']} or more to keep (and "
                          "continue) that run, or train into a new out folder.")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones never carry the final name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("checkpoint-*")
                  if p.is_dir() and all((p / n).is_file() for n in (STATE_TENSORS, STATE_JSON,
                                                                    META)))


def read_meta(folder: Path) -> dict:
    """A checkpoint's meta.json; CheckpointUnreadable when it is empty or damaged."""
    try:
        meta = json.loads((folder / META).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not \
                isinstance(meta.get("config"), dict):
            raise ValueError("no step and settings in it")
    except (OSError, ValueError) as exc:
        raise CheckpointUnreadable(f"{folder / META} cannot be read ({exc})") from None
    return meta


# -- the state: tensors in safetensors, everything else in JSON -------------------------------

def save_state(folder: Path, state: Any) -> None:
    """Write `state` (nested dicts, lists, tuples, numbers, strings, bytes, tensors, numpy
    arrays) as state.safetensors + state.json in `folder`."""
    from safetensors.torch import save_file

    tensors: dict = {}
    tree = _encode(state, tensors)
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(tree))


def load_state(folder: Path) -> Any:
    """The state `save_state` wrote; CheckpointUnreadable when a file is cut short or damaged."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / STATE_TENSORS))
        return _decode(json.loads((folder / STATE_JSON).read_text()), tensors)
    except Exception as exc:  # safetensors, json and a missing tensor each raise their own
        raise CheckpointUnreadable(f"{folder} cannot be read ({type(exc).__name__}: "
                                   f"{str(exc)[:200]})") from None


def _encode(obj: Any, tensors: dict) -> Any:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        # A copy of its own: safetensors refuses tensors that share memory (bitsandbytes
        # shares one quantisation map between parameters).
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui"
                                        else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, bytes):  # a validation image's PNG
        key = str(len(tensors))
        tensors[key] = torch.frombuffer(bytearray(obj), dtype=torch.uint8) if obj else \
            torch.zeros(0, dtype=torch.uint8)
        return {"__bytes__": key}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": str(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"A checkpoint cannot hold a {type(obj).__name__}.")


def _decode(obj: Any, tensors: dict) -> Any:
    import numpy as np

    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__bytes__" in obj:
        return tensors[obj["__bytes__"]].numpy().tobytes()
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


# -- a Trainer's checkpoints ------------------------------------------------------------------


def save_checkpoint(trainer: Trainer) -> Path:
    """Everything needed to continue exactly: LoRA weights, optimizer, scheduler, the fp16
    loss scaler, RNGs.

    Written to a temporary folder renamed into place, so the latest checkpoint on disk is
    always complete, whenever the process dies."""
    import random
    import shutil

    import numpy as np
    import torch

    from ..lora import peft_state
    from ..storage import atomic_dir
    from .validation import to_png

    t = trainer
    target = t.checkpoint_dir / f"checkpoint-{t.step:07d}"
    state = {
        "step": t.step, "bad_in_row": t.bad_in_row, "history": t.history,
        "optimizer": t.optimizer.state_dict(),
        "lr_scheduler": t.lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if (scaler := t.accelerator.scaler) else None,
        "generator": t.generator.get_state(), "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
        "lora": {name: peft_state(getattr(t.pipe, name)) for name in t._lora_modules()},
        "validation_rows": [(step, [to_png(im) for im in row])
                            for step, row in t.validation_rows],
    }
    with t.writing():
        with atomic_dir(target) as tmp:
            save_state(tmp, state)
            (tmp / "meta.json").write_text(json.dumps({
                "step": t.step, "config": to_dict(t.cfg),
                "optimizer_used": t.optimizer_name,
                "data_dir": str(t.data_dir), "data_fingerprint": t.data_fingerprint,
            }, indent=2, default=str) + "\n")
        found = list_checkpoints(t.checkpoint_dir)
        if not t.cfg.resume:  # started over: later steps belong to the run it replaces
            found = [f for f in found if f.name <= target.name]
            for later in set(list_checkpoints(t.checkpoint_dir)) - set(found):
                shutil.rmtree(later, ignore_errors=True)
        for old in found[: -max(1, t.cfg.checkpoints_keep)]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(trainer: Trainer, folder: Path) -> None:
    """Continue `trainer` from the checkpoint in `folder`, refusing one it cannot continue."""
    import random

    import numpy as np
    import torch
    from peft.utils import set_peft_model_state_dict

    from .validation import from_png

    t = trainer
    meta = read_meta(folder)
    check_resume(folder, meta, t.cfg, t.data_fingerprint, t.data_dir)
    used = meta.get("optimizer_used", t.optimizer_name)
    if used != t.optimizer_name:
        raise ConfigError(f"{folder} holds {used} state but this run steps with "
                          f"{t.optimizer_name}; they cannot continue each other. Set the "
                          "optimizer the checkpoint used, use a new checkpoint_dir, or set "
                          "resume=False to start over.")
    state = load_state(folder)  # tensors and JSON: nothing in it can run
    for name, weights in state["lora"].items():
        set_peft_model_state_dict(getattr(t.pipe, name), weights)
    for p in t.params:
        p.data = p.data.float()
    t.optimizer.load_state_dict(state["optimizer"])
    t.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler") and t.accelerator.scaler is not None:
        t.accelerator.scaler.load_state_dict(state["scaler"])
    t.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    t.step, t.bad_in_row = state["step"], state["bad_in_row"]
    t.history = state["history"]
    t.validation_rows = [(step, [from_png(b) for b in row])
                         for step, row in state.get("validation_rows", [])]
    t.resumed_from = folder


def resume(trainer: Trainer) -> None:
    """Continue from the newest checkpoint that reads back whole; a damaged one (cut
    short by a full disk, say) is skipped for the one before it, with a sentence."""
    found = list_checkpoints(trainer.checkpoint_dir)
    if not found and list(trainer.checkpoint_dir.glob("checkpoint-*/state.pt")):
        print(f"{trainer.checkpoint_dir} holds checkpoints in the older state.pt format, which "
              "is not loaded (a pickle can run code): training starts over. Delete them "
              "once this run has finished.")
    for n, folder in enumerate(reversed(found)):
        try:
            trainer.load_checkpoint(folder)
            return
        except CheckpointUnreadable as exc:
            then = ("resuming from the one before it" if n + 1 < len(found)
                    else "no older one is left, so training starts over")
            print(f"{exc}: skipped, {then}.")
