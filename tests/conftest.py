"""Shared test fixtures: the real sample photos, and one tiny model built once per session."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Tests never use the network: hub loads fail at once instead of retrying for half a minute.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples"


@pytest.fixture(scope="session")
def samples() -> Path:
    """The public-domain sample photos (see data/samples/PROVENANCE.md)."""
    return SAMPLES


@pytest.fixture(scope="session")
def obama_photos() -> list[Path]:
    return [SAMPLES / n for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Build tiny models into a per-session folder: tests never touch a user's cache."""
    os.environ.setdefault("HEADSHOT_KIT_CACHE", str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory, obama_photos) -> Path:
    """The three Obama photos run through the prepare stage with the tiny preset."""
    from headshot_kit.config import get_preset
    from headshot_kit.prepare import prepare_photos

    out = tmp_path_factory.mktemp("prepared")
    prepare_photos(obama_photos, out, get_preset("tiny").prepare)
    return out


def make_lora(pipe, folder: Path, seed: int = 0) -> Path:
    """A LoRA in the train stage's format whose random weights visibly change the image."""
    import torch

    from headshot_kit.lora import add_lora, save_lora

    # A copy, so the shared pipeline's UNet stays free of adapters.
    unet = copy.deepcopy(pipe.unet)
    add_lora(unet, rank=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            # lora_B starts at zero (a no-op LoRA); random values make it change the image.
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    save_lora(folder, "sd15", {"unet": unet})
    (folder / "config.json").write_text(json.dumps({"family": "sd15", "model": "tiny-sd15"}))
    return folder


@pytest.fixture(scope="module")
def pipe():
    """The tiny SD 1.5 pipeline, loaded once per test module."""
    import torch

    from headshot_kit.models import load_pipeline

    # The tiny model gains nothing from threads, and on a busy 2-core machine torch's threads
    # wait on each other: one thread renders 10x faster there (0.2 s against 3 s an image).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_pipeline("tiny-sd15")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_dir(pipe, tmp_path_factory) -> Path:
    """A stand-in LoRA (see make_lora) for the generate and widget tests."""
    return make_lora(pipe, tmp_path_factory.mktemp("run") / "lora")


# ---------------------------------------------------------------------------------------------
# The workbench as users install it: a built wheel in a fresh venv outside the checkout


def run_logged(cmd: list, log: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd`; on failure, fail the test with the end of its output."""
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)
    log.write_text(proc.stdout)
    if proc.returncode:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                    f"{proc.stdout[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds from the project's files (tracked and new, not ignored),
    copied out first so the build leaves nothing in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                            "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    run_logged([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "-w", tmp / "dist", src], tmp / "build.log")
    (wheel,) = (tmp / "dist").glob("headshot_kit-*.whl")
    return wheel


@dataclass
class WheelVenv:
    python: Path
    bin: Path
    wheel: Path


@pytest.fixture(scope="session")
def wheel_venv(built_wheel, tmp_path_factory) -> WheelVenv:
    """A fresh venv holding the wheel (not editable) and the locked versions, as a Colab
    runtime or a new user gets them: torch first (the one these tests run with), then the
    wheel under the lock. pip's cache makes this a couple of minutes, not a download."""
    import torch

    venv = tmp_path_factory.mktemp("venv") / "venv"
    log = venv.parent / "install.log"
    run_logged([sys.executable, "-m", "venv", venv], log)
    python = venv / "bin" / "python"
    lock = ROOT / "requirements.lock"
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    run_logged([python, "-m", "pip", "install", "-q", "-c", lock, torch_pin], log)
    run_logged([python, "-m", "pip", "install", "-q", "-c", lock, built_wheel], log)
    return WheelVenv(python, venv / "bin", built_wheel)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: offline, no path into the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env
