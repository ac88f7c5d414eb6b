"""The Colab journey, simulated: every notebook in a fresh runtime, the workbench installed
from its wheel (no checkout anywhere near), the working folder `/content` (here a temporary
folder), and Google Drive replaced by a folder the workbench is told about (HEADSHOT_KIT_DRIVE),
which also makes it behave as on Colab. The user's photos are already in the photo folder, as
the upload cell leaves them. Each notebook runs with its own defaults.

01 to 04 run one after the other on one Drive, then the quickstart on the same Drive: a user
coming back to the whole journey after the stage notebooks. (The browser test runs the
quickstart from nothing.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLES, clean_env

pytestmark = pytest.mark.slow

STAGES = ("01_prepare", "02_finetune", "03_generate", "04_evaluate")
# The user's own photos: three of one person and one of someone else.
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


class Runtime:
    """What a Colab user has: a working folder, a Drive and the installed workbench."""

    def __init__(self, venv, root: Path):
        self.venv, self.content = venv, root / "content"
        self.drive = root / "drive" / "MyDrive"
        self.executed = root / "executed"
        for folder in (self.content, self.drive, self.executed):
            folder.mkdir(parents=True)
        self.env = clean_env(PATH=f"{venv.bin}{os.pathsep}{os.environ['PATH']}",
                             HEADSHOT_KIT_DRIVE=str(self.drive),
                             # A runtime of its own: its own model cache and Jupyter folders.
                             HEADSHOT_KIT_CACHE=str(root / "cache"),
                             JUPYTER_DATA_DIR=str(root / "jupyter"))

    @property
    def workdir(self) -> Path:
        return self.drive / "headshot-kit"

    def python(self, code: str) -> str:
        return subprocess.run([self.venv.python, "-c", code], cwd=self.content, env=self.env,
                              capture_output=True, text=True, check=True).stdout.strip()

    def upload(self, names=PHOTOS) -> None:
        (self.workdir / "photos").mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(SAMPLES / name, self.workdir / "photos" / name)

    def run(self, notebook: Path) -> dict:
        """Execute a notebook in a fresh kernel, defaults untouched; the executed copy."""
        target = self.executed / notebook.name
        proc = subprocess.run([self.venv.python, "-m", "papermill", notebook, target,
                               "--cwd", self.content, "-k", "python3", "--no-progress-bar"],
                              cwd=self.content, env=self.env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{notebook.name} failed:\n{proc.stderr[-4000:]}"
        return json.loads(target.read_text())


def outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def text_of(nb: dict) -> str:
    parts = []
    for o in outputs(nb):
        parts += o.get("text", []) if "text" in o else o.get("data", {}).get("text/plain", [])
        parts += o.get("traceback", [])
    return "".join(parts)


@pytest.fixture(scope="module")
def notebooks(wheel_venv, tmp_path_factory) -> Path:
    runtime = Runtime(wheel_venv, tmp_path_factory.mktemp("probe"))
    folder = Path(runtime.python("from headshot_kit.demo import notebook_dir; "
                                 "print(notebook_dir())"))
    # The notebooks come from the installed wheel, not from the checkout.
    assert not folder.is_relative_to(ROOT) and folder.is_relative_to(wheel_venv.python.parents[1])
    return folder


def test_the_stage_notebooks_then_the_quickstart_each_in_a_fresh_runtime(wheel_venv, notebooks,
                                                                        tmp_path):
    runtime = Runtime(wheel_venv, tmp_path)
    runtime.upload()
    executed = {name: runtime.run(notebooks / f"{name}.ipynb") for name in STAGES}
    work = runtime.workdir
    for expected in ("prepared/metadata.jsonl", "lora/pytorch_lora_weights.safetensors",
                     "headshots/manifest.csv", "scores/scores.csv", "headshots/best/best.csv"):
        assert (work / expected).is_file(), expected
    # Everything went to Drive: nothing on the runtime's own disk, which a disconnect wipes.
    assert not any(runtime.content.iterdir())
    for name, nb in executed.items():
        assert not [o for o in outputs(nb) if o["output_type"] == "error"], name
        assert "Traceback" not in text_of(nb), name
    assert "biden.jpg (different person)" in text_of(executed["01_prepare"])

    # The user stars a headshot in 03's gallery, then runs the quickstart on the same Drive:
    # every step finds its work done and says so, and the star survives.
    runtime.python("from headshot_kit.generate import set_starred; "
                   f"set_starred({str(work / 'headshots')!r}, 'images/corporate_seed1.png')")
    weights = work / "lora" / "pytorch_lora_weights.safetensors"
    before = weights.read_bytes()
    quick = runtime.run(notebooks / "00_quickstart.ipynb")
    assert weights.read_bytes() == before, "re-running a finished training changed its LoRA"
    said = text_of(quick)
    assert "Traceback" not in said
    assert "already holds all 30 steps: nothing left to train" in said
    assert "6 unchanged since the last run are kept, with their stars; nothing to render" in said
    starred = (work / "headshots" / "manifest.csv").read_text()
    assert "images/corporate_seed1.png" in starred and ",True" in starred
    trained = json.loads((work / "lora" / "config.json").read_text())
    assert trained["subject"] == "ohwx person" and trained["steps"] == 30
