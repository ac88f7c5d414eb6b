"""Loading diffusion models: one loader for every family, hub id or local folder alike.

The real models (SD 1.5, SDXL) come from the Hugging Face Hub on Colab. Offline, the `tiny-*`
models stand in for them: the same architectures shrunk to a few hundred thousand parameters,
built here from configs with a fixed seed and saved as ordinary diffusers folders, then loaded
through exactly the same `from_pretrained` path as the real ones. They prove the plumbing; their
pictures are noise.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import warnings
from urllib.parse import urlparse
from pathlib import Path

import torch

from .compat import require_compatible
from .config import ConfigError
from .families import get_family
from .storage import atomic_dir

# Each tiny model is the named family's architecture, shrunk.
TINY_MODELS = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl"}
# Bumped whenever the tiny architecture changes, so stale caches are rebuilt.
TINY_VERSION = 1


class ModelUnavailable(RuntimeError):
    """A model could not be loaded; the message says why and what to do instead."""


def quiet_libraries() -> None:
    """Silence warnings that say nothing to a user of this workbench.

    transformers warns at import that torchvision is missing (we never use it), and diffusers
    prints a progress bar per pipeline call where our own bar already counts.
    """
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def cache_dir() -> Path:
    """Where locally built models live: $HEADSHOT_KIT_CACHE, the checkout's models/, or ~/.cache."""
    if os.environ.get("HEADSHOT_KIT_CACHE"):
        return Path(os.environ["HEADSHOT_KIT_CACHE"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "headshot_kit").is_dir():
        return checkout / "models"
    return Path.home() / ".cache" / "headshot-kit"


# The oldest GPUs that torch's CUDA 12.8+ builds (Colab's, Kaggle's) still run on: Volta,
# compute capability 7.0. Kaggle's P100 (6.0) no longer runs them (Kaggle/kaggle-cli#1151).
MIN_CAPABILITY = (7, 0)


def check_gpu(capability: tuple[int, int] | None = None, name: str | None = None) -> None:
    """Refuse, in one sentence, a GPU this torch build cannot run (by default the current one)."""
    if capability is None:
        if not torch.cuda.is_available():
            return
        capability, name = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    if tuple(capability) < MIN_CAPABILITY:
        raise ConfigError(
            f"This runtime's GPU ({name}, compute capability {capability[0]}.{capability[1]}) "
            f"is older than the {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} that current torch "
            "builds need: on Kaggle choose Settings > Accelerator > GPU T4 x2, on Colab a T4, "
            "then run the notebook again.")


def pick_device(requested: str = "auto") -> str:
    if requested != "auto":
        if requested.startswith("cuda"):
            check_gpu()
        return requested
    if torch.cuda.is_available():
        check_gpu()
        return "cuda"
    return "cpu"


def cuda_has_bf16() -> bool:
    """Whether this process's GPU computes in bf16 natively: compute capability 8.0 (Ampere:
    A100, A10, L4) and later. A T4 (7.5) has no bf16 hardware and cuDNN no bf16 convolutions
    below 8.0; `torch.cuda.is_bf16_supported()` still answers True there, since it counts
    emulation, so the capability is read instead."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


# Names of the training precisions, as TrainConfig.mixed_precision and the fit check use them.
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def training_precision(mixed_precision: str, device: str, bf16: bool | None = None) -> str:
    """The precision a run trains in: "fp32", "fp16" or "bf16". The one decision the train stage and
    the fit check both follow.

    "auto" is fp32 on the CPU, bf16 on a GPU that has it (`bf16`: None = ask this process's
    GPU) and fp16 on one that does not, such as Colab's T4; fp16 there is also what brings in
    SDXL's fp16-fix VAE.
    """
    on_gpu = device.startswith("cuda")
    if on_gpu and mixed_precision in ("auto", "bf16") and bf16 is None:
        bf16 = cuda_has_bf16()
    if mixed_precision == "bf16" and on_gpu and not bf16:
        raise ConfigError("mixed_precision='bf16' on a GPU without bf16 (compute capability "
                          "below 8.0, such as a T4): cuDNN has no bf16 convolutions there. Set "
                          "mixed_precision='fp16' or 'auto'.")
    if mixed_precision in ("fp16", "bf16"):
        return mixed_precision
    if mixed_precision == "no" or not on_gpu:
        return "fp32"
    return "bf16" if bf16 else "fp16"


def pick_dtype(device: str, mixed_precision: str = "auto") -> torch.dtype:
    """fp16 on a T4 (it has no bf16), bf16 where the GPU has it, fp32 on the CPU."""
    return PRECISION_DTYPES[training_precision(mixed_precision, device)]


# ---------------------------------------------------------------------------------------------
# The tiny offline models


def ensure_tiny_model(name: str = "tiny-sd15", root: Path | None = None) -> Path:
    """The folder of a tiny model, built on first use (about a second) and reused after."""
    if name not in TINY_MODELS:
        raise ModelUnavailable(f"No tiny model called {name!r}; choose one of "
                               f"{', '.join(TINY_MODELS)}.")
    folder = (root or cache_dir()) / name
    marker = folder / "headshot_kit_tiny.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == TINY_VERSION:
        return folder
    quiet_libraries()
    seed = 0
    with atomic_dir(folder) as tmp:
        get_family(TINY_MODELS[name]).build_tiny(tmp, seed=seed)
        (tmp / "headshot_kit_tiny.json").write_text(json.dumps(
            {"name": name, "version": TINY_VERSION, "seed": seed}) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------
# Families and loading


# Where Kaggle mounts a notebook's inputs (Add Input > Models or Datasets), read-only.
KAGGLE_INPUT = Path("/kaggle/input")


def kaggle_input_model(model: str, root: Path | None = None) -> Path | None:
    """A copy of hub model `model` attached to a Kaggle notebook as an input: the diffusers
    folder (one holding model_index.json) under /kaggle/input whose path names the model
    ("stable-diffusion-v1-5/stable-diffusion-v1-5" -> a folder path containing
    "stable-diffusion-v1-5"). Kaggle notebooks run without internet by default, so an input
    is how the weights get there."""
    root = KAGGLE_INPUT if root is None else root
    if not root.is_dir():
        return None
    want = model.rstrip("/").split("/")[-1].lower()
    found = sorted(p.parent for p in root.rglob("model_index.json")
                   if want in str(p.parent.relative_to(root)).lower())
    return min(found, key=lambda p: len(p.parts)) if found else None


def resolve_model(model: str) -> str:
    """A local folder for tiny models, the folder itself for paths (a Kaggle input folder
    included), a Kaggle input holding the hub model, else the hub id unchanged."""
    if model in TINY_MODELS:
        return str(ensure_tiny_model(model))
    if is_hub_id(model):
        attached = kaggle_input_model(model)
        if attached is not None:
            return str(attached)
    return model


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers. Offline, from_pretrained retries for up to a
    minute before failing, so loaders ask first and then read the local cache only."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def is_hub_id(model: str) -> bool:
    return model not in TINY_MODELS and not Path(model).exists()


def _from_pretrained(cls, source: str, half: bool, **kwargs):
    """Ask the hub for its fp16 files first when loading in half precision.

    Converting SDXL's default fp32 files to fp16 on load keeps both copies resident for a
    while (about 16 GB of host RAM, measured in bench/host_ram.py); the fp16 files map
    straight in (6.9 GB peak) and are half the download. Repos without them fall back.
    """
    if half:
        try:
            return cls.from_pretrained(source, variant="fp16", **kwargs)
        except (OSError, ValueError):
            pass
    return cls.from_pretrained(source, **kwargs)


def load_pipeline(model: str, family: str = "sd15", *, device: str = "cpu",
                  dtype: torch.dtype = torch.float32):
    """A diffusers pipeline for `model` (hub id, local folder or tiny name) on `device`.

    Loads with `low_cpu_mem_usage` (Colab's 12.7 GB of host RAM runs out otherwise) and, in
    fp16 from the hub, swaps in the family's fp16-safe VAE where it has one (SDXL's stock VAE
    overflows in fp16 and decodes black images).
    """
    require_compatible()  # a mismatched install fails here in one sentence, not minutes later
    import diffusers

    quiet_libraries()
    try:
        spec = get_family(family)
    except ValueError as exc:
        raise ModelUnavailable(str(exc)) from None
    cls = getattr(diffusers, spec.pipeline_class)
    source = resolve_model(model)  # a Kaggle input holding the model is read as a folder
    kwargs = {"dtype": dtype, "low_cpu_mem_usage": True, **spec.pipeline_kwargs}
    if is_hub_id(source) and not hub_reachable():
        kwargs["local_files_only"] = True  # a model cached earlier still loads offline
    fp16_fix_vae = bool(spec.fp16_vae) and dtype == torch.float16 and is_hub_id(source)
    try:
        if fp16_fix_vae:
            kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(
                spec.fp16_vae, dtype=dtype, local_files_only=kwargs.get(
                    "local_files_only", False))
        pipe = _from_pretrained(cls, source, half=is_hub_id(source) and dtype != torch.float32,
                                **kwargs)
    except OSError as exc:
        if is_hub_id(source):
            raise ModelUnavailable(
                f"Could not load {model!r} from the Hugging Face Hub ({type(exc).__name__}). "
                "This needs network access and the model's licence accepted on the Hub: run "
                "this preset on Colab (on Kaggle: turn on Internet in the notebook's settings, "
                "or attach the model with Add Input > Models), or use the offline preset "
                "'tiny' here.") from exc
        raise ModelUnavailable(f"{source}: not a diffusers model folder ({exc}).") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
