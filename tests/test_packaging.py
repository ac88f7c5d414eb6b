"""The project's own files agree with each other: dependencies, notebooks, layout."""

from __future__ import annotations

import json
import subprocess
import tomllib

import pytest
import yaml

from conftest import ROOT


def _name(spec: str) -> str:
    for sep in "<>=!~[; ":
        spec = spec.split(sep)[0]
    return spec.strip().lower().replace("_", "-")


def test_environment_yml_and_pyproject_name_the_same_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # The conda environment is for working on the project: the kernel and dlib-bin included.
    declared = project["dependencies"] + extras["dev"] + extras["notebooks"] + extras["dlib"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(map(_name, pip_list)) == sorted(map(_name, declared))
    # The same version floors too, not just the same names.
    assert {_name(s): s.replace(" ", "") for s in pip_list} == {
        _name(s): s.replace(" ", "") for s in declared}


def test_notebooks_are_committed_without_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert [n.name for n in notebooks] == ["00_quickstart.ipynb", "01_prepare.ipynb",
                                           "02_finetune.ipynb", "03_generate.ipynb",
                                           "04_evaluate.ipynb"]
    for path in notebooks:
        cells = json.loads(path.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs"), f"{path.name} carries outputs"
                assert cell.get("execution_count") is None, f"{path.name} has execution counts"
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one 'parameters' cell"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def _ignored(path: str) -> bool:
    """Whether git's ignore rules match `path` (--no-index: whether or not it is tracked)."""
    check = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
    assert check.returncode in (0, 1), f"git check-ignore failed on {path}"
    return check.returncode == 0


def test_photos_results_and_caches_are_ignored_and_the_samples_tracked():
    if not (ROOT / ".git").exists():  # a worktree's .git is a file
        pytest.skip("not a git checkout (an installed wheel)")
    # A user's photos, a run's outputs and built models can never be committed by accident.
    for path in ("data/me/x.jpg", "results/x", "models/x"):
        assert _ignored(path), f"{path} is not ignored by git"
    # ...while the folder READMEs and the public-domain samples the tests use are kept.
    for path in ("results/README.md", "models/README.md", "data/README.md",
                 "data/samples/photos/obama.jpg", "data/samples/photos/new-sample.jpg"):
        assert not _ignored(path), f"{path} is ignored by git"
    tracked = subprocess.run(["git", "ls-files", "data", "results", "models"], cwd=ROOT,
                             text=True, capture_output=True, check=True).stdout.split()
    assert {"results/README.md", "models/README.md", "data/README.md"} <= set(tracked)
    assert {f"data/samples/photos/{n}" for n in ("obama.jpg", "obama2.jpg", "obama3.jpg",
                                                 "biden.jpg")} <= set(tracked)
    assert {"data/samples/PROVENANCE.md", "data/samples/SHA256SUMS"} <= set(tracked)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_ships():
    """A subpackage added to the tree but not to pyproject.toml would be left out of the
    wheel (and so of every Colab install) while editable installs kept working."""
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapped = setuptools.get("package-dir", {})
    in_tree = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "headshot_kit").rglob("*") if p.is_file()
               and "__pycache__" not in p.parts}
    assert in_tree <= listed, sorted(in_tree - listed)
    for package, folder in mapped.items():
        assert package in listed and (ROOT / folder).is_dir(), package


def _imports() -> set[str]:
    import ast
    import sys

    found = set()
    for path in (ROOT / "headshot_kit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"headshot_kit"}


# Imported only where they can exist, each behind an ImportError with advice.
OPTIONAL_IMPORTS = {
    "google": "google.colab, present on Colab only",
    "insightface": "ArcFace embedder, download-only weights (Colab)",
    "facenet_pytorch": "FaceNet embedder, download-only weights (Colab)",
    "dlib": "the runtime's own dlib (Colab's), or dlib-bin from the dlib extra",
    "pip": "its vendored packaging, for runtime.py where packaging is not installed yet",
    "papermill": "the notebooks extra (a kernel and papermill, for the demo)",
    "IPython": "the running kernel's own (in a notebook only); ipywidgets requires it, and the "
               "notebooks extra names it",
    "ray": "the cluster extra",
    "prodigyopt": "the dev extra, or pip install prodigyopt",
}


def test_every_imported_package_is_declared():
    from importlib.metadata import packages_distributions

    project = _pyproject()["project"]
    declared = {_name(s) for s in project["dependencies"]}
    dists = packages_distributions()
    missing = []
    for module in sorted(_imports()):
        if module in OPTIONAL_IMPORTS:
            continue
        names = {_name(d) for d in dists.get(module, [module])}
        if not names & declared:
            missing.append(f"{module} ({', '.join(sorted(names))})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "dlib-bin" in {_name(s) for s in project["optional-dependencies"]["dlib"]}


def test_the_library_does_not_upgrade_its_hosts_kernel():
    """Colab's and Kaggle's kernels run IPython 7.34 and ipywidgets 7.7.1, and stop starting
    once those change under them: the base requirements accept them, and the kernel, Jupyter
    and papermill live in the notebooks extra."""
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    base = {_name(s): Requirement(s) for s in project["dependencies"]}
    assert "ipython" not in base  # the kernel's own: only the notebooks extra names it
    notebooks = {_name(s): Requirement(s)
                 for s in project["optional-dependencies"]["notebooks"]}
    assert notebooks["ipython"].specifier.contains("7.34.0")
    assert base["ipywidgets"].specifier.contains("7.7.1")
    assert base["ipywidgets"].specifier.contains("8.1.9")
    kernel = {"ipykernel", "papermill", "jupyterlab", "notebook", "jupyter-client", "tornado",
              "pyzmq", "traitlets", "dlib-bin"}
    assert not kernel & set(base), kernel & set(base)
    assert {"ipykernel", "papermill"} <= {_name(s) for s in
                                          project["optional-dependencies"]["notebooks"]}
    assert "notebooks" in _makefile_extras() and "dlib" in _makefile_extras()


def _makefile_extras() -> list[str]:
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines()
                if l.startswith("EXTRAS :="))
    return line.split(":=")[1].strip().split(",")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, version = line.split(";")[0].strip().split("==")
            pins[_name(name)] = version
    return pins


def test_the_installed_versions_are_the_locked_ones():
    from importlib.metadata import PackageNotFoundError, version

    pins = _lock()
    # torch is the machine's (the CPU build here, Colab's CUDA build there): never locked.
    assert "torch" not in pins and not [n for n in pins if n.startswith("nvidia-")]
    for name in ("diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "ray"):
        assert name in pins, name
    wrong = []
    for name, pinned in pins.items():
        try:
            if version(name) != pinned:
                wrong.append(f"{name} {version(name)} (locked {pinned})")
        except PackageNotFoundError:
            wrong.append(f"{name} missing (locked {pinned})")
    assert not wrong, f"installed versions differ from requirements.lock: {wrong}"


def test_every_declared_dependency_is_locked():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    declared = [s for extra in _makefile_extras() for s in extras[extra]]
    # torch and setuptools are the machine's: pinning them would let the lock replace a
    # runtime's torch (Colab's torch 2.11 caps setuptools below 82).
    assert {_name(s) for s in project["dependencies"] + declared} - {"torch", "setuptools"
                                                                    } <= set(_lock())


def test_the_notebooks_share_one_setup_cell_that_leaves_the_runtime_whole():
    """Every notebook starts with the same setup cell; it installs through
    headshot_kit/runtime.py (what it asks pip for: tests/test_runtime_install.py), shows pip's
    output, and names no torch of its own."""
    from headshot_kit.runtime import RAW

    cells = {}
    for path in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        cells[path.name] = "".join(code[0]["source"])
    first = cells["00_quickstart.ipynb"]
    assert all(cell == first for cell in cells.values()), [
        name for name, cell in cells.items() if cell != first]
    assert f"{RAW}/headshot_kit/runtime.py" in first and "notebook_setup()" in first
    # pip runs from runtime.py, never quieted; the cell has no pip line of its own.
    assert not [line for line in first.splitlines() if "pip install" in line]
