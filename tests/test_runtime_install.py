"""The notebooks' setup cell on a runtime that already holds torch and a kernel (Colab,
Kaggle): run as the notebook runs it, against a runtime's published package list, with pip and
the network replaced, it asks pip for nothing that changes torch, numpy, pillow, pandas or the
kernel's packages. (The replica tests run the real pip in a replica of each runtime; this is
the fast check of the same promise.)"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import shlex
import subprocess
import sys
import tomllib
import urllib.request

import pytest
from packaging.requirements import Requirement

from conftest import ROOT
from headshot_kit import runtime

RAW = runtime.RAW + "/"
# The protected packages of Colab's GPU runtime of 2026-08-19 as googlecolab/backend-info
# publishes them (pip-freeze.gpu.txt), with dlib, which decides the dlib extra.
COLAB_2026_08_19 = {
    "torch": "2.11.0+cu128", "torchvision": "0.26.0+cu128", "torchaudio": "2.11.0+cu128",
    "torchao": "0.10.0", "numpy": "2.1.3", "pandas": "2.2.3", "pillow": "11.3.0",
    "ipython": "7.34.0", "ipykernel": "6.17.1", "jupyter-client": "7.4.9",
    "tornado": "6.5.7", "ipywidgets": "7.7.1", "setuptools": "75.2.0", "packaging": "26.3",
    "dlib": "19.24.6", "diffusers": "0.39.0", "peft": "0.20.0", "transformers": "5.15.0",
}


def _snapshot(folder) -> dict[str, str]:
    """A runtime's package list from its folder under runtimes/ (the freeze, then the layer
    Kaggle installs over Colab's image)."""
    meta = json.loads((folder / "runtime.json").read_text())
    have = runtime.parse_pins((folder / meta["freeze"]).read_text())
    have.update({runtime.canonical(k): v for k, v in meta.get("layer", {}).items()})
    for name in meta.get("layer_removed", []):
        have.pop(runtime.canonical(name), None)
    return have


RUNTIMES = {"colab-2026-08-19-published": COLAB_2026_08_19} | {
    p.parent.name: _snapshot(p.parent) for p in sorted(ROOT.glob("runtimes/*/runtime.json"))}


def setup_cell(name: str = "00_quickstart.ipynb") -> str:
    cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


class _Dist:
    def __init__(self, name, version):
        self.metadata, self.version = {"Name": name}, version


class _Pip:
    """Stands in for `pip install`: records the command, prints what pip prints."""

    def __init__(self, command, **kwargs):
        _Pip.commands.append(command)
        self.stdout, self.returncode = iter(["Requirement already satisfied: pip\n"]), 0

    def wait(self):
        return self.returncode


class _Shell:
    """Stands in for IPython's shell where a cell uses a line magic (%pip)."""

    def run_line_magic(self, magic, line):
        _Pip.commands.append([magic, *shlex.split(line)])


def _from_checkout(url, *args, **kwargs):
    """The repository's files instead of the network, as the cell would fetch them from main."""
    url = getattr(url, "full_url", url)
    assert url.startswith(RAW), f"the setup cell fetches {url}, outside the repository"
    return io.BytesIO((ROOT / url.removeprefix(RAW)).read_bytes())


def run_setup_cell(source: str, have: dict[str, str], monkeypatch) -> list[list[str]]:
    """Run the install part of a setup cell as a fresh runtime holding `have` would (the
    workbench not installed yet); the pip commands it ran."""
    from IPython.core.inputtransformer2 import TransformerManager

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "headshot_kit", "dlib") and runtime.canonical(name) not in have else find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: [_Dist(n, v) for n, v in have.items()])
    monkeypatch.setattr(urllib.request, "urlopen", _from_checkout)
    monkeypatch.setattr(subprocess, "Popen", _Pip)
    monkeypatch.delenv("HEADSHOT_KIT_SETUP", raising=False)
    _Pip.commands = []
    install_part = source.split("from headshot_kit.workspace import")[0]
    code = TransformerManager().transform_cell(install_part)
    exec(compile(code, "<setup cell>", "exec"), {"get_ipython": _Shell, "__name__": "__main__"})
    return _Pip.commands


def constraints_of(command: list[str], tmp_path) -> list[Requirement]:
    """The constraint lines a pip command installs under (files or URLs given to -c)."""
    lines = []
    for flag, value in zip(command, command[1:]):
        if flag == "-c":
            text = (_from_checkout(value).read().decode() if value.startswith("http")
                    else open(value).read())
            lines += [line.split("#")[0].strip() for line in text.splitlines()]
    return [Requirement(line) for line in lines if line]


def changed_protected(have: dict[str, str], constraints: list[Requirement]) -> list[str]:
    """The runtime's protected packages that the constraints, or the workbench's own
    requirements, would move off the version the runtime has."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needs = constraints + [Requirement(r) for r in project["dependencies"]]
    return sorted({f"{runtime.canonical(r.name)} {have[runtime.canonical(r.name)]} ({r})"
                   for r in needs if runtime.is_protected(r.name)
                   and runtime.canonical(r.name) in have
                   and not r.specifier.contains(have[runtime.canonical(r.name)],
                                                prereleases=True)})


@pytest.mark.parametrize("name", list(RUNTIMES))
def test_the_setup_cell_changes_no_protected_package(name, monkeypatch, tmp_path):
    have = RUNTIMES[name]
    commands = run_setup_cell(setup_cell(), have, monkeypatch)
    (command,) = [c for c in commands if "install" in c]
    constraints = constraints_of(command, tmp_path)
    assert constraints, f"the setup cell installs without constraints: {command}"
    assert not changed_protected(have, constraints), changed_protected(have, constraints)
    # The guard: every protected package the runtime has is held at its own version, so no
    # resolution can swap it, whatever the workbench's dependencies ask for.
    pinned = {runtime.canonical(r.name): str(r.specifier) for r in constraints}
    for package in ("torch", "torchvision", "torchaudio", "numpy", "pillow", "ipykernel"):
        if package in have:
            assert pinned.get(package) == f"=={have[package]}", package
    # Nothing quiets pip: its "Successfully installed" line is what the user and Colab read.
    assert "-q" not in command and "--quiet" not in command
    # The runtime's own dlib is kept: dlib-bin (the dlib extra) only where there is none.
    assert any("[dlib]" in part for part in command) == ("dlib" not in have)


def test_a_runtime_without_the_protected_packages_gets_the_tested_versions(monkeypatch,
                                                                         tmp_path):
    (command,) = run_setup_cell(setup_cell(), {"pip": "26.3"}, monkeypatch)
    pins = {runtime.canonical(r.name): str(r.specifier) for r in constraints_of(command,
                                                                                tmp_path)}
    tested = runtime.parse_pins((ROOT / "requirements.lock").read_text())
    assert pins["diffusers"] == f"=={tested['diffusers']}"
    assert pins["peft"] == f"=={tested['peft']}"
    assert "torch" not in pins and "numpy" not in pins  # left to pip within pyproject's ranges


def test_an_installed_package_stays_unless_it_must_move_towards_the_tested_version():
    tested = {"diffusers": "0.42.1", "huggingface-hub": "2.4.0", "numpy": "2.4.6"}
    have = {"diffusers": "0.39.0", "huggingface-hub": "2.4.0", "numpy": "2.1.3", "torch": "2.11"}
    assert runtime.runtime_constraints(have, tested) == [
        "numpy==2.1.3", "torch==2.11", "diffusers>=0.39.0,<=0.42.1", "huggingface-hub==2.4.0"]


def test_the_runtime_constraints_are_the_lock_less_the_protected_packages():
    lock = (ROOT / "requirements.lock").read_text()
    assert (ROOT / "runtime-constraints.txt").read_text() == runtime.derive_constraints(lock), (
        "runtime-constraints.txt is out of step with requirements.lock: make runtime-constraints")
    pins = runtime.parse_pins((ROOT / "runtime-constraints.txt").read_text())
    assert not [n for n in pins if runtime.is_protected(n)]
    assert {"diffusers", "peft", "accelerate", "bitsandbytes"} <= set(pins)
    # The lock itself pins nothing that could make pip replace a runtime's torch: not torch,
    # nor its CUDA libraries, nor setuptools (torch caps it on Python 3.12+).
    locked = runtime.parse_pins(lock)
    assert not [n for n in locked if n.startswith(("torch", "nvidia-", "triton"))
                or n == "setuptools"]


def test_a_conflict_stops_in_one_sentence(monkeypatch):
    class Refusing(_Pip):
        def __init__(self, command, **kwargs):
            super().__init__(command)
            self.stdout = iter(["ERROR: Cannot install headshot-kit because these package "
                                "versions have conflicting dependencies.\n",
                                "ERROR: ResolutionImpossible: for help visit ...\n"])
            self.returncode = 1

    monkeypatch.setattr(subprocess, "Popen", Refusing)
    monkeypatch.setattr(runtime, "_read", lambda source: "diffusers==0.42.1\n")
    _Pip.commands = []
    with pytest.raises(SystemExit) as stopped:
        runtime.install()
    message = str(stopped.value)
    assert "nothing was changed" in message and "\n" not in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_a_module_the_kernel_holds_that_pip_replaced_asks_for_a_restart():
    said = ("Successfully installed diffusers-0.42.1 huggingface-hub-2.4.0 "
            "bitsandbytes-0.50.2")
    assert runtime.installed_by("Collecting x\n" + said) == ["diffusers", "huggingface-hub",
                                                            "bitsandbytes"]
    loaded = {"numpy", "numpy.linalg", "IPython"}
    assert runtime.replaced_while_loaded(["numpy", "pyyaml"], loaded) == ["numpy"]
    assert runtime.replaced_while_loaded(["pyyaml"], loaded) == []


def test_the_module_runs_on_the_standard_library_alone():
    """The cell runs it before anything is installed: it may import the standard library and
    pip's own packaging only."""
    import ast

    tree = ast.parse((ROOT / "headshot_kit" / "runtime.py").read_text())
    imported = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])}
    assert imported - set(sys.stdlib_module_names) <= {"packaging", "pip", "__future__"}
