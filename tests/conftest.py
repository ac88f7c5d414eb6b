"""Shared test fixtures: the real sample photos, and one tiny model built once per session."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Tests never use the network: hub loads fail at once instead of retrying for half a minute.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

# pytester runs a test file in a subprocess: how tests/test_offline.py checks the guard itself.
pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data" / "samples" / "photos"


@pytest.fixture(scope="session")
def samples() -> Path:
    """The public-domain sample photos (see data/samples/PROVENANCE.md, beside them)."""
    return SAMPLES


@pytest.fixture(scope="session")
def obama_photos() -> list[Path]:
    return [SAMPLES / n for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Build tiny models into a per-session folder: tests never touch a user's cache, even
    when the user's shell names one in HEADSHOT_KIT_CACHE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADSHOT_KIT_CACHE", str(tmp_path_factory.mktemp("models")))
        yield


# ---------------------------------------------------------------------------------------------
# Nothing leaves the machine: the README promises it, and the tests must not need the network


class NetworkBlocked(ConnectionError):
    """A test (or the code it ran) tried to reach a host other than this machine.

    A ConnectionError, so code that copes with being offline (models.hub_reachable) answers as
    it would offline; the attempt still fails the test (see _no_connection_left_the_machine).
    """


# Every attempt the guard refused this session, as "host:port".
BLOCKED: list[str] = []
# The real methods, for the connections the guard lets through.
_REAL = {"connect": socket.socket.connect, "connect_ex": socket.socket.connect_ex,
         "create_connection": socket.create_connection}
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def is_local(host) -> bool:
    """Whether `host` is this machine: loopback (127.0.0.0/8, ::1, localhost) or "any"."""
    host = (host.decode() if isinstance(host, bytes) else str(host)).split("%")[0]
    if host.lower() in ("", *_LOCAL_NAMES):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name other than localhost: resolving it would already use the network
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback or ip.is_unspecified


def _refuse(address) -> None:
    where = f"{address[0]}:{address[1]}"
    BLOCKED.append(where)
    raise NetworkBlocked(f"tests must not use the network: a connection to {where} was "
                         "blocked (only loopback addresses and unix sockets are allowed). Build "
                         "what the test needs locally, as the tiny models are.")


def _guarded_connect(name: str):
    def connect(self, address):
        # Unix, netlink and other local families carry no host; only IP sockets can leave.
        if self.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
            _refuse(address)
        return _REAL[name](self, address)
    return connect


def _guarded_create_connection(address, *args, **kwargs):
    # Checked before the name is resolved: a DNS lookup is a network use too.
    if not is_local(address[0]):
        _refuse(address)
    return _REAL["create_connection"](address, *args, **kwargs)


@pytest.fixture(scope="session", autouse=True)
def _network_guard():
    """Refuse every connection from this process to a host other than this machine. The slow
    tests' local servers (JupyterLab and Chromium on 127.0.0.1, Ray on localhost) stay
    reachable, and subprocesses are their own processes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _guarded_connect("connect"))
        mp.setattr(socket.socket, "connect_ex", _guarded_connect("connect_ex"))
        mp.setattr(socket, "create_connection", _guarded_create_connection)
        yield


@pytest.fixture(autouse=True)
def _no_connection_left_the_machine(request, _network_guard):
    """Fail a test whose code tried the network, even where the code caught the error and
    carried on (a hub client falling back to its cache, say)."""
    start = len(BLOCKED)
    yield
    tried = BLOCKED[start:]
    if tried and "blocked_connections" not in request.fixturenames:
        pytest.fail(f"{request.node.name} tried to use the network: {', '.join(tried)}",
                    pytrace=False)


@pytest.fixture
def blocked_connections():
    """For tests of the guard itself: a function giving the attempts blocked so far in the
    test, which are then expected rather than a failure."""
    start = len(BLOCKED)
    return lambda: BLOCKED[start:]


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory, obama_photos) -> Path:
    """The three Obama photos run through the prepare stage with the tiny preset."""
    from headshot_kit.config import get_preset
    from headshot_kit.prepare import prepare_photos

    out = tmp_path_factory.mktemp("prepared")
    prepare_photos(obama_photos, out, get_preset("tiny").prepare)
    return out


def make_lora(pipe, folder: Path, seed: int = 0) -> Path:
    """A LoRA in the train stage's format whose random weights visibly change the image, for
    the tiny model of `pipe`'s family (SD 1.5 or SDXL)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from headshot_kit.formats import kohya_metadata
    from headshot_kit.lora import add_lora, export_kohya, save_lora

    # A copy, so the shared pipeline's UNet stays free of adapters.
    unet = copy.deepcopy(pipe.unet)
    add_lora(unet, rank=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            # lora_B starts at zero (a no-op LoRA); random values make it change the image.
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    family = "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"
    weights = save_lora(folder, family, {"unet": unet})
    # The file UIs load, as the train stage writes it beside the diffusers file.
    name = f"ohwx-test{seed:04d}"
    ui = export_kohya(weights, family, output_name=name, rank=4, alpha=4, metadata=kohya_metadata(
        family=family, output_name=name, title=name, trigger="ohwx person", rank=4, alpha=4,
        resolution=64, model=f"tiny-{family}", started_at=0.0, finished_at=0.0, settings={},
        train_text_encoder=False), layers_per_block=unet.config.layers_per_block)
    (folder / "config.json").write_text(json.dumps({"family": family, "model": f"tiny-{family}",
                                                    "ui_weights": ui.name}))
    return folder


def grid_of_single_renders(plan, pipe):
    """What a compare plan's grid must show: each of its shots (row by row) rendered on its
    own, in a grid of the plan's rows and columns with its labels and title."""
    from headshot_kit import generate as gen
    from headshot_kit.images import image_grid

    return image_grid([gen.render(shot, pipe) for shot in plan.shots], len(plan.row_labels),
                      len(plan.col_labels), row_labels=plan.row_labels,
                      col_labels=plan.col_labels, title=plan.title)


def text_overflows(sheet, cols: int) -> list[str]:
    """Where a labelled grid's text leaves its place, measured in its pixels: text in the last
    4 px of the sheet's width above the cells (a title or label running off the edge), or
    column-label text within 3 px of a boundary between two cells (a label running into its
    neighbour's). The cells (pictures, not white) start where the bottom row first turns
    non-white and at the first row that is nearly all non-white (no row of text is)."""
    import numpy as np

    grey = np.asarray(sheet.convert("L"))
    height, width = grey.shape
    left = int(np.argmax(grey[height - 2] < 250))
    top = int(np.argmax((grey[:, left:] < 250).mean(axis=1) > 0.9))
    cell = (width - left) // cols
    inked = (grey[:top, left:] < 200).any(axis=1)
    # The column labels: the lowest block of inked rows above the cells (gaps under 6 rows;
    # a title sits further up).
    lowest = int(np.nonzero(inked)[0].max()) if inked.any() else 0
    y, gap = lowest, 0
    while y > 0 and gap < 6:
        y -= 1
        gap = 0 if inked[y] else gap + 1
    band = grey[y:top]
    problems = []
    if (grey[:top, width - 4:] < 200).any():
        problems.append("text runs off the sheet's right edge")
    for c in range(1, cols):
        x = left + c * cell
        if (band[:, x - 3:x + 3] < 200).any():
            problems.append(f"column label {c} runs into column {c + 1}")
    return problems


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
    # The notebooks extra (a kernel, papermill) runs the notebooks; dlib-bin stands in for the
    # dlib a runtime like Colab brings.
    run_logged([python, "-m", "pip", "install", "-q", "-c", lock,
                f"{built_wheel}[notebooks,dlib]"], log)
    return WheelVenv(python, venv / "bin", built_wheel)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: offline, no path into the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return env


def assert_drawn(picture, min_size: tuple[int, int] = (300, 200)):
    """`picture` (a PNG file, or a PNG's bytes) opens as a PNG of at least `min_size` and holds
    a drawing: not one flat colour (an empty figure saves as white), and with coloured marks
    (data), not only black and grey axes and text. Returns it as an RGB image."""
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(picture) if isinstance(picture, bytes) else picture) as im:
        assert im.format == "PNG", im.format
        rgb = im.convert("RGB")
    assert rgb.width >= min_size[0] and rgb.height >= min_size[1], rgb.size
    pixels = np.asarray(rgb).reshape(-1, 3).astype(np.int16)
    _, counts = np.unique(pixels, axis=0, return_counts=True)
    assert counts.max() / len(pixels) < 0.98, "one colour fills the picture"
    coloured = (pixels.max(axis=1) - pixels.min(axis=1)) > 60
    assert coloured.sum() >= 50, "nothing but greys: no data drawn"  # a dot is about 30 px
    return rgb
