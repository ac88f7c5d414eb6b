"""The project's own files agree with each other: dependencies, notebooks, layout."""

from __future__ import annotations

import json
import tomllib

import yaml

from conftest import ROOT


def _name(spec: str) -> str:
    for sep in "<>=!~[; ":
        spec = spec.split(sep)[0]
    return spec.strip().lower().replace("_", "-")


def test_environment_yml_and_pyproject_name_the_same_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
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


def test_results_and_caches_are_ignored():
    ignored = (ROOT / ".gitignore").read_text()
    assert "results/*" in ignored and "models/*" in ignored
    assert (ROOT / "results" / "README.md").is_file() and (ROOT / "models" / "README.md").is_file()
