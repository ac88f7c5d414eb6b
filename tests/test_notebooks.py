"""The four stage notebooks execute headless on the tiny preset, in order, and each leaves the
artifacts the next one reads."""

from __future__ import annotations

import base64
import json
import re

import pandas as pd
import pytest
from PIL import Image

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


def _outputs(notebooks, name: str, code: str) -> list[dict]:
    """The outputs of the code cell of notebook `name` whose source holds `code`."""
    nb = json.loads(next(p for p in notebooks if p.name == name).read_text())
    [cell] = [c for c in nb["cells"] if c["cell_type"] == "code" and code in "".join(c["source"])]
    return cell["outputs"]


def _shown(outputs: list[dict], mime: str) -> list:
    """What the outputs show as `mime`: PNG bytes, or HTML text."""
    found = ["".join(o["data"][mime]) if isinstance(o["data"][mime], list) else o["data"][mime]
             for o in outputs if mime in o.get("data", {})]
    return [base64.b64decode(f) for f in found] if mime == "image/png" else found


def _headers(html: str) -> list[str]:
    return [h.strip() for h in re.findall(r"<th(?:\s[^>]*)?>(.*?)</th>", html, flags=re.S)]


def test_each_notebook_shows_its_stages_own_results(executed):
    """What each notebook must show, compared with the files its stage wrote: the prepare
    report with its columns and the contact sheet, the loss curve, the pack's grid, the
    scores with their plots and the experiments table."""
    from conftest import assert_drawn
    from headshot_kit.prepare import CHECKS

    workdir, notebooks = executed
    # 01: the report, one row per photo with every check as a column, then the contact sheet.
    [report] = _shown(_outputs(notebooks, "01_prepare.ipynb", "prepare_photos("), "text/html")
    assert "Prepared 3 of 6 photos" in report
    assert {"file", "status", "reason", *CHECKS} <= set(_headers(report))
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "32bit.png"):
        assert f">{name}<" in report, name
    [sheet] = _shown(_outputs(notebooks, "01_prepare.ipynb", "result.contact_sheet"), "image/png")
    assert sheet == (workdir / "prepared" / "contact_sheet.png").read_bytes()
    # 02: the loss curve.
    [curve] = _shown(_outputs(notebooks, "02_finetune.ipynb", "result.plot()"), "image/png")
    assert_drawn(curve, min_size=(400, 200))
    # 03: the pack's grid (styles x seeds), as saved beside the pack.
    [grid] = _shown(_outputs(notebooks, "03_generate.ipynb", "pack.grid"), "image/png")
    with Image.open(workdir / "headshots" / "grid.png") as saved:
        assert assert_drawn(grid, min_size=(64, 64)).size == saved.size
    # 04: the headline over the summary table, the plots as saved, and the experiments table.
    [scores] = _shown(_outputs(notebooks, "04_evaluate.ipynb", "evaluate_images("), "text/html")
    assert "look like you" in scores
    summary = pd.read_csv(workdir / "scores" / "summary.csv")
    assert _headers(scores) == [c for c in summary.columns if c != "notes"]
    plots = [base64.b64decode(data) for data in
             re.findall(r'<img src="data:image/png;base64,([^"]+)"', scores)]
    assert sorted(plots) == sorted(p.read_bytes() for p in (workdir / "scores").glob("*.png"))
    [table] = _shown(_outputs(notebooks, "04_evaluate.ipynb", "record_experiment("), "text/html")
    experiments = list(pd.read_csv(workdir / "experiments.csv").columns)
    # pandas shows the first and last columns (a "..." between) and the row numbers.
    named = [h for h in _headers(table) if h not in ("", "...") and not h.isdigit()]
    assert named[:2] == ["run_id", "recorded"] and named[-1] == "out_dir" and len(named) >= 10
    assert named == [c for c in experiments if c in named]  # the file's columns, in order


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
