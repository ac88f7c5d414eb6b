"""The four stage notebooks execute headless on the tiny preset, in order, and each leaves the
artifacts the next one reads."""

from __future__ import annotations

import json

import pytest

from headshot_kit.demo import run_notebooks


@pytest.fixture(scope="module")
def executed(tmp_path_factory, samples):
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, run_notebooks(workdir, preset="tiny", photos=samples)


def test_all_four_notebooks_run_and_write_their_stage(executed):
    workdir, notebooks = executed
    assert [p.name for p in notebooks] == ["01_prepare.ipynb", "02_finetune.ipynb",
                                           "03_generate.ipynb", "04_evaluate.ipynb"]
    for expected in ("prepared/metadata.jsonl", "prepared/report.csv",
                     "lora/pytorch_lora_weights.safetensors", "lora/metrics.csv",
                     "headshots/manifest.csv", "headshots/grid.png", "scores/scores.csv",
                     "scores/summary.csv"):
        assert (workdir / expected).is_file(), expected


def test_executed_notebooks_have_no_errors_and_show_results(executed):
    _, notebooks = executed
    for path in notebooks:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        outputs = [o for c in cells for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], path.name
        # Every stage shows a picture or a table, not just text.
        assert any("image/png" in o.get("data", {}) or "text/html" in o.get("data", {})
                   for o in outputs), path.name


def test_the_report_flags_the_problem_samples(executed):
    import pandas as pd

    workdir, _ = executed
    report = pd.read_csv(workdir / "prepared" / "report.csv")
    used = set(report.loc[report["status"] == "used", "file"])
    assert {"obama.jpg", "obama2.jpg", "obama3.jpg"} <= used
    assert "biden.jpg" not in used


def test_the_evaluate_notebook_evaluates_and_leaves_the_sweep_to_the_user(executed):
    """Run whole, 04_evaluate does its own stage: the sweep (training runs) only prints what it
    would cost, and starts when the user sets run_sweep = True."""
    workdir, notebooks = executed
    nb = json.loads(next(p for p in notebooks if p.name == "04_evaluate.ipynb").read_text())
    sweep_cell = next(c for c in nb["cells"] if c["cell_type"] == "code"
                      and "sweep(" in "".join(c["source"]))
    said = "".join("".join(o.get("text", "")) for o in sweep_cell["outputs"])
    assert "GPU hours of training on a t4" in said and "Not started: set run_sweep = True" in said
    assert not (workdir / "sweep").exists()


def test_the_notebooks_show_tables_and_sentences_not_walls_of_text(executed):
    """A stage config shows as a short line over a table of its settings, not as one long
    `PrepareConfig(...)` string; no empty "0 rows x N columns" table is shown."""
    _, notebooks = executed
    for path in notebooks:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        for o in (o for c in cells for o in c.get("outputs", [])):
            data = o.get("data", {})
            text = "".join(data.get("text/plain", ""))
            if text.startswith(("PrepareConfig(", "TrainConfig(", "GenerateConfig(",
                                "EvaluateConfig(")):
                assert "text/html" in data, f"{path.name}: {text[:60]}"
            assert "0 rows ×" not in "".join(data.get("text/html", "")), path.name
