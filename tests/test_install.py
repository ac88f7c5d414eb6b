"""The workbench installed as users install it: the wheel carries every subpackage, data file
and notebook, and from a fresh venv outside the checkout (what Colab is) the demo runs, as
library calls and as notebooks."""

from __future__ import annotations

import zipfile

import pytest

from conftest import ROOT, clean_env, run_logged


def _tree(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).glob(pattern)}


def test_the_wheel_holds_the_whole_package(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    sources = {f"headshot_kit/{p}" for p in _tree("headshot_kit", "**/*.py")}
    assert sources and sources <= names, sorted(sources - names)
    assert {"headshot_kit/families/sd15.py", "headshot_kit/families/sdxl.py"} <= names
    data = {f"headshot_kit/data/{p}" for p in _tree("headshot_kit/data", "**/*.*")}
    assert {"headshot_kit/data/styles.yaml", "headshot_kit/data/arch/sdxl.json"} <= data <= names
    notebooks = {f"headshot_kit/notebooks/{p}" for p in _tree("notebooks", "[0-9]*.ipynb")}
    assert len(notebooks) >= 4 and notebooks <= names
    samples = {f"headshot_kit/data/samples/{p}" for p in _tree("data/samples", "**/*.*")}
    assert {"headshot_kit/data/samples/PROVENANCE.md",
            "headshot_kit/data/samples/photos/obama.jpg"} <= samples <= names
    # Nothing from outside the package lands in site-packages.
    assert {n.split("/")[0] for n in names} == {"headshot_kit", built_wheel.name.split("-")[0]
                                                + "-" + built_wheel.name.split("-")[1]
                                                + ".dist-info"}


@pytest.mark.slow
def test_demo_runs_from_an_installed_wheel_outside_the_checkout(wheel_venv, tmp_path):
    cwd = tmp_path / "somewhere"
    cwd.mkdir()
    env = clean_env(HEADSHOT_KIT_CACHE=str(tmp_path / "models"))
    where = run_logged([wheel_venv.python, "-c", "import headshot_kit; print(headshot_kit.__file__)"],
                       tmp_path / "where.log", cwd=cwd, env=env).stdout
    assert "site-packages" in where and str(ROOT) not in where

    cli = wheel_venv.bin / "headshot-kit"
    out = run_logged([cli, "demo", "--out", "stages"], tmp_path / "demo.log", cwd=cwd, env=env)
    assert "Traceback" not in out.stdout
    for stage in ("prepared/metadata.jsonl", "lora/pytorch_lora_weights.safetensors",
                  "headshots/manifest.csv", "scores/scores.csv"):
        assert (cwd / "stages" / stage).is_file(), stage

    out = run_logged([cli, "demo", "--notebooks", "--out", "notebooks"], tmp_path / "nb.log",
                     cwd=cwd, env=env)
    assert "Traceback" not in out.stdout
    executed = sorted(p.name for p in (cwd / "notebooks" / "notebooks").glob("*.ipynb"))
    assert executed[:4] == ["01_prepare.ipynb", "02_finetune.ipynb", "03_generate.ipynb",
                            "04_evaluate.ipynb"]
    assert (cwd / "notebooks" / "scores" / "scores.csv").is_file()
    assert "setuptools" not in out.stdout.lower()
